"""Labelled texts for sequence classification: `[{"text": str, "label": int}, ...]`.

- `read_labelled_file`: a TSV or CSV file with a header, GLUE's format (SST-2's
  `train.tsv`: `sentence<TAB>label`); column names configurable, labels given as class ids or
  as names mapped to ids by `label_names`.
- `load_tfds_labelled`: a TFDS dataset prepared locally as array_record (`glue/sst2`, keys
  `sentence` and `label`); nothing is downloaded.

Both return a list that `classification_pipeline` batches. Bad input is refused with the file,
the line and the fix.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaxformer_lite.data.builders import default_data_dir


def _delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        return delimiter
    if path.suffix.lower() in (".tsv", ".tab", ".txt"):
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    raise ValueError(f"{path}: cannot tell TSV from CSV by its name; pass delimiter='\\t' or "
                     "delimiter=','.")


def _label_id(raw: str, where: str, label_names: Sequence[str] | None,
              num_classes: int | None) -> int:
    value = raw.strip()
    if label_names is not None:
        if value not in label_names:
            raise ValueError(f"{where}: label {value!r} is not one of label_names "
                             f"{list(label_names)}; add it there, or fix the row.")
        return list(label_names).index(value)
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not a class id (an integer); for labels "
                         "given as names pass label_names=[...] (their order gives the ids)."
                         ) from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"{where}: label {label} is outside [0, num_classes={num_classes}); "
                         "fix the row, or raise num_classes (and TransformerConfig.num_classes).")
    if label < 0:
        raise ValueError(f"{where}: label {label} is negative; class ids start at 0.")
    return label


def read_labelled_file(path: str | os.PathLike, *, text_column: str = "sentence",
                       label_column: str = "label", label_names: Sequence[str] | None = None,
                       num_classes: int | None = None, delimiter: str | None = None
                       ) -> list[dict[str, Any]]:
    """`[{"text": ..., "label": class id}, ...]` from a TSV/CSV file whose first line names
    the columns (GLUE's SST-2: `sentence<TAB>label`, labels 0/1).

    `delimiter`: by default a tab for `.tsv` / `.tab` / `.txt` files (read as GLUE writes them,
    without quoting: a `"` is text) and a comma for `.csv` (with CSV quoting).
    `label_names`: labels written as names (`["negative", "positive"]`), mapped to their
    position in the list; then `num_classes` defaults to its length. `num_classes`: class ids
    must lie in `[0, num_classes)`. Errors name the file and line: a missing file, an empty
    one, a header without the columns, a row with too few fields, a label that is not a
    class id (or not one of `label_names`), a file with no examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a TSV/CSV of labelled texts).")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names {label_names} repeat a name.")
        num_classes = len(label_names) if num_classes is None else num_classes
        if len(label_names) > num_classes:
            raise ValueError(f"label_names holds {len(label_names)} names for num_classes="
                             f"{num_classes}.")
    sep = _delimiter(path, delimiter)
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter=sep, quoting=quoting)
        header = next(rows, None)
        if header is None or not any(h.strip() for h in header):
            raise ValueError(f"{path}: the file is empty; it needs a header line naming the "
                             f"columns ({text_column!r} and {label_column!r}), then one "
                             "example per line.")
        header = [h.strip() for h in header]
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}:1: the header names the columns {header}, not "
                             f"{missing}; pass text_column= / label_column= to name the ones "
                             "holding the text and the label (or delimiter= if the columns "
                             "are not split).")
        text_at, label_at = header.index(text_column), header.index(label_column)
        out = []
        for line, row in enumerate(rows, start=2):
            if not row or not any(field.strip() for field in row):
                continue  # a blank line
            where = f"{path}:{line}"
            if len(row) <= max(text_at, label_at):
                raise ValueError(f"{where}: the row has {len(row)} field(s), the header "
                                 f"{len(header)}; each line needs a {text_column!r} and a "
                                 f"{label_column!r} field separated by {sep!r}.")
            out.append({"text": row[text_at],
                        "label": _label_id(row[label_at], where, label_names, num_classes)})
    if not out:
        raise ValueError(f"{path}: a header but no examples; add one example per line.")
    return out


def load_tfds_labelled(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                       text_key: str = "sentence", label_key: str = "label",
                       num_classes: int | None = None) -> list[dict[str, Any]]:
    """`[{"text": ..., "label": ...}, ...]` of a TFDS dataset prepared as array_record in
    `data_dir` (default `$TFDS_DATA_DIR` or ~/tensorflow_datasets), e.g. `glue/sst2` (keys
    `sentence`, `label`). Nothing is downloaded: prepare it once where there is network and
    TensorFlow (`tfds build glue/sst2 --file_format=array_record --data_dir=DIR`) and copy
    DIR here. GLUE's test splits hold label -1 (unknown), which is refused: evaluate on
    `validation`."""
    import tensorflow_datasets as tfds

    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    try:
        source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False,
                                  try_gcs=False)
    except Exception as e:
        raise RuntimeError(
            f"TFDS dataset {name!r} (split {split!r}) cannot be read from {str(data_dir)!r} "
            f"({type(e).__name__}: {e}). It must be prepared there as array_record; on a "
            f"machine with network and TensorFlow run `tfds build {name} "
            f"--file_format=array_record --data_dir={data_dir}` and copy the folder here."
        ) from e
    out = []
    for i in range(len(source)):
        example = source[i]
        where = f"{name} split {split!r} example {i}"
        missing = [k for k in (text_key, label_key) if k not in example]
        if missing:
            raise ValueError(f"{where} has the keys {sorted(example)}, not {missing}; pass "
                             "text_key= / label_key=.")
        text = example[text_key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        label = int(example[label_key])
        if label < 0 or num_classes is not None and label >= num_classes:
            raise ValueError(f"{where}: label {label} is not a class id in [0, "
                             f"{num_classes or 'num_classes'}) (GLUE's test splits hold -1, "
                             "unknown: evaluate on 'validation').")
        out.append({"text": text, "label": label})
    if not out:
        raise ValueError(f"{name} split {split!r} holds no examples.")
    return out
