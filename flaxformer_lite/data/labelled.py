"""Labelled texts for sequence classification: `[{"text": str, "label": int}, ...]`.

- `read_labelled_file`: a TSV or CSV file, GLUE's format (SST-2's `train.tsv`: a header, then
  `sentence<TAB>label`); columns named or numbered (CoLA's header-less files), labels given as
  class ids or as names mapped to ids by `label_names`, or none (`label_column=None`: texts to
  predict). Sentence pairs are refused.
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
    if label < 0:
        raise ValueError(f"{where}: label {label} is negative; class ids start at 0 (GLUE's "
                         "test files hold -1 or no label: read texts to predict with "
                         "label_column=None).")
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"{where}: label {label} is outside [0, num_classes={num_classes}); "
                         "fix the row, or raise num_classes (and TransformerConfig.num_classes).")
    return label


PAIR_COLUMNS = (("sentence1", "sentence2"), ("#1 string", "#2 string"),
                ("question1", "question2"), ("question", "sentence"),
                ("premise", "hypothesis"))  # GLUE's two-text tasks: MRPC, QQP, QNLI, RTE, MNLI

PAIRS_UNSUPPORTED = ("sentence pairs are not supported: a row holds one text (docs/training.md, "
                     "'Sequence classification'); join the two texts into one yourself, or "
                     "build the id rows and their token_type_ids yourself")


def _column(column: str | int | None, header: list[str] | None, path: Path, role: str
            ) -> int | None:
    """The index of a column named (with a header) or numbered (0 = the first field)."""
    if column is None:
        return None
    if isinstance(column, int) and not isinstance(column, bool):
        if column < 0:
            raise ValueError(f"{role}={column}: column numbers count from 0 (the first field).")
        if header is not None and column >= len(header):
            raise ValueError(f"{path}:1: {role}={column}, but the header names "
                             f"{len(header)} columns {header}.")
        return column
    if header is None:
        raise ValueError(f"{role}={column!r} names a column, but header=False: a file without "
                         f"a header line has no names; pass the column's number (0 = the "
                         f"first field), e.g. GLUE's CoLA: text_column=3, label_column=1.")
    return header.index(column)


def read_labelled_file(path: str | os.PathLike, *, text_column: str | int = "sentence",
                       label_column: str | int | None = "label",
                       label_names: Sequence[str] | None = None,
                       num_classes: int | None = None, delimiter: str | None = None,
                       header: bool | None = None) -> list[dict[str, Any]]:
    """`[{"text": ..., "label": class id}, ...]` from a TSV/CSV file whose first line names
    the columns (GLUE's SST-2: `sentence<TAB>label`, labels 0/1).

    `delimiter`: by default a tab for `.tsv` / `.tab` / `.txt` files (read as GLUE writes them,
    without quoting: a `"` is text) and a comma for `.csv` (with CSV quoting). A UTF-8
    byte-order mark (Excel's "CSV UTF-8") is skipped. Every row must have as many fields as the
    header: a comma in a CSV text must be quoted (`"good, really"`), and a TSV text cannot hold
    a tab.
    `header`: whether the first line names the columns; by default it does when the columns
    are given by name, and does not when they are given by number from 0 (GLUE's CoLA
    `train.tsv`, no header: `text_column=3, label_column=1`). Without a header every row has as
    many fields as the first; `header=True` with numbers skips a header line.
    `label_column=None`: a file without labels (GLUE's `test.tsv`: `index<TAB>sentence`) gives
    `[{"text": ...}, ...]`, texts to predict (`evaluation.classify([ex["text"] for ex in
    examples], ...)`); `classification_pipeline` refuses them.
    `label_names`: labels written as names (`["negative", "positive"]`), mapped to their
    position in the list; then `num_classes` defaults to its length. `num_classes`: class ids
    must lie in `[0, num_classes)`. A header naming a sentence pair (`sentence1`/`sentence2`,
    MRPC's `#1 String`/`#2 String`, `question`/`sentence`, ...) is refused: pairs are not
    supported. Errors name the file and line: a missing file, an empty one, a header without
    the columns, a row with too few or too many fields, a label that is not a class id (or not
    one of `label_names`), a file with no examples.
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
    if header is None:
        header = not all(isinstance(c, int) and not isinstance(c, bool)
                         for c in (text_column, label_column) if c is not None)
    sep = _delimiter(path, delimiter)
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    fix = ("quote the text field (\"...\", doubling a \" inside it)" if quoting != csv.QUOTE_NONE
           else "remove the tab inside the text (a TSV text cannot hold one)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f, delimiter=sep, quoting=quoting)
        names = None
        if header:
            names = next(rows, None)
            if names is None or not any(h.strip() for h in names):
                raise ValueError(f"{path}: the file is empty; it needs a header line naming the "
                                 f"columns ({text_column!r} and {label_column!r}), then one "
                                 "example per line (without one, number the columns: "
                                 "text_column=3).")
            names = [h.strip() for h in names]
            lower = {h.lower() for h in names}
            pair = next((p for p in PAIR_COLUMNS if set(p) <= lower), None)
            if pair is not None:
                raise ValueError(f"{path}:1: the header names the columns {names}, a sentence "
                                 f"pair ({pair[0]!r} and {pair[1]!r}); {PAIRS_UNSUPPORTED}.")
            missing = [c for c in (text_column, label_column)
                       if isinstance(c, str) and c not in names]
            if missing:
                raise ValueError(f"{path}:1: the header names the columns {names}, not "
                                 f"{missing}; pass text_column= / label_column= to name the "
                                 "ones holding the text and the label (or delimiter= if the "
                                 "columns are not split; or number them, text_column=3, if "
                                 "the file has no header line).")
        text_at = _column(text_column, names, path, "text_column")
        if text_at is None:
            raise ValueError("text_column=None: every example needs its text.")
        label_at = _column(label_column, names, path, "label_column")
        width = len(names) if names is not None else None
        out, end = [], rows.line_num
        for row in rows:
            # the row's first line: a quoted field may span several
            line, end = end + 1, rows.line_num
            if not row or not any(field.strip() for field in row):
                continue  # a blank line
            where = f"{path}:{line}"
            if width is None:
                width = len(row)
                if width <= max(text_at, -1 if label_at is None else label_at):
                    raise ValueError(f"{where}: the row has {width} field(s), too few for "
                                     f"text_column={text_column} and label_column="
                                     f"{label_column} (numbered from 0); check delimiter=.")
            if len(row) != width:
                what = "the header" if names is not None else "the first row"
                raise ValueError(
                    f"{where}: the row has {len(row)} field(s), {what} {width} (fields split "
                    f"by {sep!r}). "
                    + (f"A text holding {sep!r} is cut there, and its pieces shift the other "
                       f"fields: {fix}." if len(row) > width else
                       f"Each line needs a {text_column!r} and a {label_column!r} field "
                       f"separated by {sep!r}."))
            example = {"text": row[text_at]}
            if label_at is not None:
                example["label"] = _label_id(row[label_at], where, label_names, num_classes)
            out.append(example)
    if not out:
        raise ValueError(f"{path}: " + ("a header but no examples" if header else "no examples")
                         + "; add one example per line.")
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
