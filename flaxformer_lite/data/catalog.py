"""TFDS catalog datasets by name, and `load_dataset`: one entry point for every data source.

Catalog datasets are read with `tfds.data_source` from array_record files, so reading needs
neither TensorFlow nor network. *Preparing* them (downloading and writing the array_record
files, once) is TFDS's job and does need both: TFDS extracts the archives and reads the raw files
through `tf.io.gfile`. On a machine with network and TensorFlow:

    pip install tensorflow importlib_resources
    tfds build tiny_shakespeare --file_format=array_record --data_dir=DIR

or `load_catalog(name, data_dir=DIR, download=True)`; then copy DIR to machines without either.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flaxformer_lite.data.builders import (
    SYNTHETIC_TASKS,
    Dataset,
    ExampleSource,
    default_data_dir,
    load_parallel_corpus,
    load_synthetic_task,
    load_text_corpus,
    split_units,
)


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """What the library needs to know about one TFDS catalog family."""

    kind: str  # "text" or "translation"
    splits: tuple[str, ...]
    download: str  # what preparing it downloads
    module: str | None = None  # module to import so TFDS registers the builder
    joiner: str = ""  # joins a text split's examples into running text
    # Split each stored example into these units (`split_units`): for datasets that store a
    # whole split as one example, which a pipeline would otherwise cut to its first `max_len`.
    unit: str | None = None


CATALOG: dict[str, CatalogEntry] = {
    "tiny_shakespeare": CatalogEntry(
        "text", ("train", "validation", "test"), "about 1 MB (one text file)",
        unit="paragraph"),  # TFDS stores each split as a single example
    "lm1b": CatalogEntry(
        "text", ("train", "test"), "about 1.7 GB (one sentence per example)", joiner="\n"),
    "wmt14_translate": CatalogEntry(
        "translation", ("train", "validation", "test"), "several GB of WMT corpora",
        module="tensorflow_datasets.translate.wmt14"),
    "wmt17_translate": CatalogEntry(
        "translation", ("train", "validation", "test"), "several GB of WMT corpora",
        module="tensorflow_datasets.translate.wmt17"),
}
CATALOG_NAMES = ("tiny_shakespeare", "lm1b", "wmt14_translate/de-en", "wmt17_translate/de-en")


def _entry(name: str) -> tuple[str, str | None, CatalogEntry]:
    """(family, config, entry) of a catalog name, or a ValueError listing the known names."""
    family, _, config = name.partition("/")
    entry = CATALOG.get(family)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}: not a catalog name ({', '.join(CATALOG_NAMES)}"
                         f"), a synthetic task (synthetic/<{'|'.join(SYNTHETIC_TASKS)}>), or an "
                         "existing file or folder.")
    if entry.kind == "translation":
        module = importlib.import_module(entry.module)
        cls = next(v for v in vars(module).values()
                   if isinstance(v, type) and getattr(v, "name", None) == family)
        pairs = [c.name for c in cls.BUILDER_CONFIGS]
        if config not in pairs:
            raise ValueError(f"{family} needs a language pair, one of {pairs}: e.g. "
                             f"'{family}/de-en'; got {name!r}.")
    elif config:
        raise ValueError(f"{family} has no configs; use {family!r}, not {name!r}.")
    return family, config or None, entry


def load_catalog(name: str, *, data_dir: str | os.PathLike | None = None,
                 source_lang: str | None = None, target_lang: str | None = None,
                 download: bool = False) -> Dataset:
    """A TFDS catalog dataset (tiny_shakespeare, lm1b, wmt14_translate/de-en, ...) by name.

    Reads prepared array_record data from `data_dir` (default `$TFDS_DATA_DIR` or
    ~/tensorflow_datasets). Data not prepared there raises a clear error, unless
    `download=True`, which asks TFDS to download and prepare it (needs network and TensorFlow).
    Translation direction: `source_lang` -> `target_lang`, default the pair's order ("de-en":
    German to English); given one, the other is the pair's other language. Tokenizers are
    cached in `data_dir/flaxformer_lite/<name with "/" as "_">/`.
    """
    import tensorflow_datasets as tfds

    family, config, entry = _entry(name)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if entry.kind == "translation":
        first, second = config.split("-")
        if source_lang and not target_lang:  # the other language of the pair
            target_lang = second if source_lang == first else first
        elif target_lang and not source_lang:
            source_lang = second if target_lang == first else first
        source_lang, target_lang = source_lang or first, target_lang or second
        if {source_lang, target_lang} != {first, second}:
            raise ValueError(f"{name} holds {first!r} and {second!r}; got source_lang="
                             f"{source_lang!r}, target_lang={target_lang!r}.")
        fields = {"inputs": source_lang, "targets": target_lang}
    else:
        if source_lang or target_lang:
            raise ValueError(f"{name} is a text dataset: source_lang/target_lang do not apply.")
        fields = {"text": "text"}
    kwargs = dict(data_dir=str(data_dir), download=download, try_gcs=False)
    if download:
        kwargs["download_and_prepare_kwargs"] = {"download_config": tfds.download.DownloadConfig(
            try_download_gcs=False)}
    try:
        sources = {split: tfds.data_source(name, split=split, **kwargs)
                   for split in entry.splits}
    except Exception as e:
        raise _explain(name, entry, data_dir, download, e) from e
    splits = {s: ExampleSource(src, fields) for s, src in sources.items()}
    if entry.unit is not None:  # small whole-text splits: held as a list of units
        splits = {s: ExampleSource([{"text": u} for ex in src
                                    for u in split_units(ex["text"], entry.unit)],
                                   {"text": "text"}) for s, src in splits.items()}
    return Dataset(name=name, kind=entry.kind, splits=splits,
                   cache_dir=data_dir / "flaxformer_lite" / name.replace("/", "_"),
                   joiner=entry.joiner, info={"catalog": name, "data_dir": str(data_dir),
                                              **({"source_lang": source_lang,
                                                  "target_lang": target_lang}
                                                 if entry.kind == "translation" else {})})


def _explain(name: str, entry: CatalogEntry, data_dir: Path, download: bool,
             error: Exception) -> Exception:
    """A clear error for a catalog dataset that could not be read or prepared."""
    how = (f"Preparing it downloads {entry.download} and needs network access and TensorFlow "
           "(TFDS extracts and reads the raw files with tf.io.gfile); tensorflow-datasets 4.9.10 "
           "on Python >= 3.9 also needs `pip install importlib_resources`. On such a machine run "
           f"`tfds build {name} --file_format=array_record --data_dir={data_dir}` (or "
           f"load_catalog({name!r}, download=True)) and copy the folder here.")
    if not download:
        import tensorflow_datasets as tfds

        try:
            prepared = tfds.builder(name, data_dir=str(data_dir)).is_prepared()
        except Exception:  # only used to word the message
            prepared = False
        if prepared:
            return RuntimeError(
                f"catalog dataset {name!r} in {str(data_dir)!r} cannot be read as a random-access "
                f"source ({type(error).__name__}: {error}). It was probably prepared as tfrecord; "
                f"the library reads array_record. Convert it where TensorFlow is installed with "
                f"`tfds convert_format --dataset_dir={data_dir / name} "
                f"--out_file_format=array_record`, or prepare it again. " + how)
        return RuntimeError(f"catalog dataset {name!r} is not prepared in {str(data_dir)!r} "
                            f"(pass download=True to prepare it, or point data_dir at a folder "
                            f"where it is prepared). {how}")
    missing = f" (missing module {error.name!r})" if isinstance(error, ImportError) else ""
    return RuntimeError(f"preparing catalog dataset {name!r} in {str(data_dir)!r} failed"
                        f"{missing}: {type(error).__name__}: {error}. {how}")


def _check_options(loader: Callable, options: Mapping[str, Any], spec: str) -> None:
    """A misspelt option names what the loader takes, instead of a TypeError from the call."""
    known = [name for name, p in inspect.signature(loader).parameters.items()
             if p.kind == p.KEYWORD_ONLY and name not in ("data_dir", "source_lang",
                                                           "target_lang")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"options {unknown} do not apply to {spec!r} "
                         f"({loader.__name__}); it takes {known}.")


def load_dataset(spec: str | os.PathLike, *, kind: str | None = None,
                 data_dir: str | os.PathLike | None = None, source_lang: str | None = None,
                 target_lang: str | None = None, download: bool = False,
                 **options) -> Dataset:
    """Any dataset the library knows, from one string (what `--config.dataset=` takes).

    - an existing file or folder: a text corpus (`kind="text"`, the default), or with
      `kind="translation"` a folder of `<split>.<lang>` files (needs source/target_lang);
    - `synthetic/<task>` for task in copy, reverse, sort, addition (options: min_length,
      max_length, num_symbols, num_train, num_validation, num_test, seed);
    - a TFDS catalog name: tiny_shakespeare, lm1b, wmt14_translate/de-en, wmt17_translate/de-en.

    Anything else is a ValueError listing these forms. `options` go to the loader
    (`load_text_corpus`, `load_parallel_corpus`, `load_synthetic_task`); unknown ones raise.
    """
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if kind in (None, "text"):
            _check_options(load_text_corpus, options, spec)
            return load_text_corpus(path, data_dir=data_dir, **options)
        if kind == "translation":
            _check_options(load_parallel_corpus, options, spec)
            return load_parallel_corpus(path, source_lang=source_lang, target_lang=target_lang,
                                        data_dir=data_dir, **options)
        raise ValueError(f"kind must be 'text' or 'translation', got {kind!r}.")
    match = re.fullmatch(r"synthetic/(\w+)", spec)
    if match:
        _check_options(load_synthetic_task, options, spec)
        return load_synthetic_task(match.group(1), data_dir=data_dir, **options)
    if options:
        raise ValueError(f"options {sorted(options)} do not apply to catalog dataset {spec!r}.")
    if spec.split("/")[0] not in CATALOG and (
            "/" in spec or os.sep in spec or spec.startswith((".", "~")) or path.suffix):
        raise FileNotFoundError(f"dataset path {spec!r} does not exist (relative to "
                                f"{os.getcwd()}).")
    ds = load_catalog(spec, data_dir=data_dir, source_lang=source_lang, target_lang=target_lang,
                      download=download)
    if kind is not None and ds.kind != kind:
        raise ValueError(f"{spec!r} is a {ds.kind} dataset, not {kind}.")
    return ds
