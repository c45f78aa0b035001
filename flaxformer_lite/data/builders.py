"""TFDS builders for local data: text corpora, parallel corpora and synthetic sequence tasks.

Each builder is a `tfds.core.GeneratorBasedBuilder`, prepared as array_record files and read
back with `tfds.data_source` as random-access sources, so no TensorFlow is needed. The builder
config's name holds a hash of the source files' contents and of the options, so prepared data
lives under

    data_dir/<builder>/<slug>-<hash>/<VERSION>/

and is reused while the sources are unchanged; an edited file gets a new hash and is rebuilt.
Tokenizers built for a dataset are cached in the same folder (`Dataset.cache_dir`).

Loaders (the public entry points) check the input first and raise clear errors: a missing file
(`FileNotFoundError`), an empty file, bytes that are not UTF-8 (with the byte offset and line),
parallel files whose line counts differ (both files and both counts), unknown options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flaxformer_lite.data.tokenizers import Tokenizer, build_tokenizer

try:
    import fcntl
except ImportError:  # Windows: preparation is then not locked across processes
    fcntl = None

log = logging.getLogger(__name__)

UNITS = ("paragraph", "line", "document")
SYNTHETIC_TASKS = ("copy", "reverse", "sort", "addition")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
VERSION = "1.2.0"  # 1.1.0: a lone "\r" is text; 1.2.0: whitespace-only lines end paragraphs


def default_data_dir() -> Path:
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (TFDS's own default)."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


# --------------------------------------------------------------------------------------------
# Reading and checking source files


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of the file's bytes, memoised per (path, size, mtime) within a process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def _resolve_files(paths: str | os.PathLike | Sequence[str | os.PathLike], what: str
                   ) -> list[Path]:
    """Files named by `paths`; a folder stands for its visible regular files, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what}: no files given.")
    files = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not inside:
                raise ValueError(f"{what}: folder {str(p)!r} holds no files.")
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what}: {str(p)!r} does not exist (or is not a file).")
    return [f.resolve() for f in files]


def read_text_file(path: str | os.PathLike) -> str:
    """The file's text: strict UTF-8, CRLF line ends turned into LF.

    Raises FileNotFoundError for a missing file and ValueError for an empty file or bytes that
    are not UTF-8 (naming the byte offset and line, and how to fix it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (or is not a file).")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{str(path)!r} is empty" + (" (only whitespace)." if data else ".")
                         + " Remove it from the dataset or give a file with text.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{str(path)!r} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} "
            f"(line {line}). Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark is not text
    return text.replace("\r\n", "\n")  # a lone "\r" stays text, as `wc -l` reads it


def split_units(text: str, unit: str) -> list[str]:
    """Splits text into examples, keeping every character: `"".join(units) == text`.

    "paragraph": blocks separated by blank lines, or lines of spaces and tabs only (they stay
    with the block before);
    "line": one line each (with its "\\n"; split on "\\n" only, as `wc -l` counts); "document":
    the whole text.
    """
    if unit == "paragraph":
        units, current, after_blank = [], [], False
        for line in re.split(r"(?<=\n)", text):
            blank = not line.strip(" \t\n")  # whitespace-only lines are blank lines too
            if current and after_blank and not blank:
                units.append("".join(current))
                current, after_blank = [], False
            current.append(line)
            after_blank = after_blank or blank
        units.append("".join(current))
    elif unit == "line":
        units = re.split(r"(?<=\n)", text)
    elif unit == "document":
        units = [text]
    else:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
    return [u for u in units if u]


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file (split on "\\n" only, as `wc -l` counts them), checked as above."""
    text = read_text_file(path)
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")


# --------------------------------------------------------------------------------------------
# Examples as Python dicts of str (what every loader hands to the pipelines)


class ExampleSource(Sequence):
    """Random access to examples as dicts of `str`, e.g. `{"text": ...}` or
    `{"inputs": ..., "targets": ...}`, over a TFDS data source or any sequence of dicts.

    `fields` maps the output name to the stored feature name (TFDS `Text` features come back as
    UTF-8 bytes and are decoded here).
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], fields: Mapping[str, str]):
        self.source = source
        self.fields = dict(fields)

    def __len__(self) -> int:
        return len(self.source)

    def _convert(self, record: Mapping[str, Any]) -> dict[str, str]:
        out = {}
        for name, key in self.fields.items():
            value = record[key]
            if isinstance(value, np.ndarray):
                value = value.item()
            out[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range for {n} examples.")
        return self._convert(self.source[int(index) % n])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is None:
            return [self[i] for i in indices]
        return [self._convert(r) for r in getitems([int(i) for i in indices])]

    def __iter__(self) -> Iterator[dict[str, str]]:
        for start in range(0, len(self), 1024):
            yield from self.__getitems__(range(start, min(start + 1024, len(self))))

    def __repr__(self) -> str:
        return f"ExampleSource({len(self)} examples, fields={list(self.fields)})"


@dataclasses.dataclass
class Dataset:
    """A dataset ready for the pipelines: named splits of examples, plus metadata.

    kind: "text" (examples `{"text": str}`) or "translation" (`{"inputs", "targets"}`).
    joiner: what joins consecutive text examples into the running text of a split ("" when
      examples keep their own line breaks, as local corpora do).
    cache_dir: where tokenizers built for this dataset are cached (None: not cached).
    """

    name: str
    kind: str
    splits: dict[str, ExampleSource]
    cache_dir: Path | None = None
    joiner: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> ExampleSource:
        """The examples of split `name` (a clear error lists the splits that exist)."""
        name = SPLIT_ALIASES.get(name, name)
        if name not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {name!r}; "
                             f"it has {sorted(self.splits)}.")
        return self.splits[name]

    def texts(self, split: str = "train") -> Iterator[str]:
        """Every text of a split (both sides for translation): the tokenizer's training data."""
        for ex in self.split(split):
            yield from ex.values()

    def full_text(self, split: str = "train") -> str:
        """The running text of a text split (for the random-window sampler)."""
        if self.kind != "text":
            raise ValueError(f"full_text needs a text dataset; {self.name!r} is {self.kind}.")
        return self.joiner.join(ex["text"] for ex in self.split(split))

    def tokenizer(self, kind: str, vocab_size: int | None = None, *,
                  reserve_mask: bool = False, split: str = "train",
                  max_chars: int = 10_000_000) -> Tokenizer:
        """A tokenizer trained on `split` (shared by both languages of a translation set),
        cached in `cache_dir` (another split's in `cache_dir/<split>`). See
        `tokenizers.build_tokenizer`."""
        cache = self.cache_dir
        if cache is not None and split != "train":
            cache = Path(cache) / split
        return build_tokenizer(kind, lambda: self.texts(split), cache_dir=cache,
                               vocab_size=vocab_size, reserve_mask=reserve_mask,
                               max_chars=max_chars)

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.splits.items()}
        return f"Dataset({self.name!r}, kind={self.kind!r}, splits={sizes})"


# --------------------------------------------------------------------------------------------
# TFDS builders


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    unit: str = "paragraph"


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Local text files for language modelling: `{"text": str}` per paragraph/line/file.

    Without `validation_files`, the validation split is the last `validation_fraction` of
    the characters of all files joined in order (as nanoGPT splits its text).
    """

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIG_CLASS = TextCorpusConfig
    code_path = None  # local data: no download checksums to look up

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True)  # keep the text's order: the running text is exact

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = _text_corpus_splits(self.builder_config)
        return {name: self._generate_examples(units) for name, units in splits.items()}

    def _generate_examples(self, units):
        for i, u in enumerate(units):
            yield i, {"text": u}


@dataclasses.dataclass
class ParallelCorpusConfig(tfds.core.BuilderConfig):
    split_files: tuple[tuple[str, str, str], ...] = ()  # (split, source, target)


class ParallelCorpus(tfds.core.GeneratorBasedBuilder):
    """Line-aligned source/target files: `{"inputs": str, "targets": str}` per line."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIG_CLASS = ParallelCorpusConfig
    code_path = None  # local data: no download checksums to look up

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"inputs": tfds.features.Text(),
                                                 "targets": tfds.features.Text()}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(src, tgt)
                for split, src, tgt in self.builder_config.split_files}

    def _generate_examples(self, src, tgt):
        pairs = _read_parallel(src, tgt)
        for i, (s, t) in enumerate(zip(*pairs)):
            yield i, {"inputs": s, "targets": t}


@dataclasses.dataclass
class SyntheticTasksConfig(tfds.core.BuilderConfig):
    task: str = "reverse"
    min_length: int = 1
    max_length: int = 10
    num_symbols: int = 10
    num_train: int = 10000
    num_validation: int = 500
    num_test: int = 500
    seed: int = 0


class SyntheticTasks(tfds.core.GeneratorBasedBuilder):
    """Copy, reverse, sort and multi-digit addition as text pairs, from a fixed seed.

    Validation and test examples never occur in train, so held-out accuracy is honest.
    """

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIG_CLASS = SyntheticTasksConfig
    code_path = None  # local data: no download checksums to look up

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"inputs": tfds.features.Text(),
                                                 "targets": tfds.features.Text()}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = synthetic_task_splits(**_config_fields(self.builder_config,
                                                        SyntheticTasksConfig))
        return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

    def _generate_examples(self, pairs):
        for i, (x, y) in enumerate(pairs):
            yield i, {"inputs": x, "targets": y}


_BUILDERS = {"text_corpus": TextCorpus, "parallel_corpus": ParallelCorpus,
             "synthetic_tasks": SyntheticTasks}


def _config_fields(config, cls) -> dict[str, Any]:
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
            if f.name not in base}


def _train_chars(total: int, validation_fraction: float) -> int:
    """The characters before the validation cut (nanoGPT: data[:int(n * 0.9)])."""
    return int(total * (1.0 - validation_fraction))


def _text_corpus_splits(cfg) -> dict[str, list[str]]:
    """Units of the train and validation splits of a TextCorpusConfig."""
    def units_of(files):
        return [u for f in files for u in split_units(read_text_file(f), cfg.unit)]

    train = units_of(cfg.files)
    if cfg.validation_files:
        return {"train": train, "validation": units_of(cfg.validation_files)}
    total = sum(len(u) for u in train)
    cut = _train_chars(total, cfg.validation_fraction)
    head, tail, seen = [], [], 0
    for u in train:
        if seen + len(u) <= cut:
            head.append(u)
        elif seen >= cut:
            tail.append(u)
        else:  # the unit that straddles the cut is split in two
            head.append(u[:cut - seen])
            tail.append(u[cut - seen:])
        seen += len(u)
    return {"train": head, "validation": tail}


def _read_parallel(src: str | os.PathLike, tgt: str | os.PathLike
                   ) -> tuple[list[str], list[str]]:
    source, target = read_lines(src), read_lines(tgt)
    if len(source) != len(target):
        raise ValueError(
            f"parallel files are not aligned: {str(src)!r} has {len(source)} lines but "
            f"{str(tgt)!r} has {len(target)} lines; line i of one must translate line i of "
            "the other.")
    return source, target


def _config_name(slug: str, payload: Mapping[str, Any]) -> str:
    """`<slug>-<16 hex>`: TFDS config names allow letters, digits, '-', '_' and '.'."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)[:40].strip("_.-") or "data"
    return f"{slug}-{digest}"


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_tfds(verbose: bool):
    """Hides TFDS's chatter about local data (progress bars, "Downloading ...", "Using custom
    data configuration") unless `verbose`; restores everything afterwards."""
    if verbose:
        yield
        return
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    drop = _DropMessages(("Using custom data configuration", "Constructing tf.data",
                          "Generating split", "Done writing", "Reusing dataset",
                          "Load dataset info", "Creating a tf.data"))
    absl_logger = logging.getLogger("absl")
    tqdm_utils.display_progress_bar(False)
    absl_logger.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.removeFilter(drop)
        tqdm_utils.display_progress_bar(before)


def _prepare(builder, verbose: bool = False) -> None:
    """download_and_prepare under a file lock, so concurrent processes build the data once."""
    lock_dir = Path(builder.data_dir).parent.parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock_path = lock_dir / f".{Path(builder.data_dir).parent.name}.lock"
    with open(lock_path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (Path(builder.data_dir) / "dataset_info.json").exists():
                log.info("preparing %s in %s", builder.builder_config.description,
                         builder.data_dir)
            with _quiet_tfds(verbose):
                builder.download_and_prepare(
                    file_format="array_record",
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _load(builder_name: str, config, *, data_dir, kind: str, fields: Mapping[str, str],
          name: str, verbose: bool, info: dict[str, Any]) -> Dataset:
    cls = _BUILDERS[builder_name]
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    with _quiet_tfds(verbose):
        builder = cls(config=config, data_dir=str(data_dir))
    _prepare(builder, verbose)
    with _quiet_tfds(verbose):  # read back exactly as any TFDS user would
        sources = tfds.data_source(f"{builder_name}/{config.name}", data_dir=str(data_dir),
                                   download=False)
    splits = {split: ExampleSource(src, fields) for split, src in sources.items()}
    for split, src in splits.items():
        if len(src) == 0:
            raise ValueError(f"dataset {name!r}: split {split!r} is empty; give more text or "
                             "a larger validation_fraction.")
    return Dataset(name=name, kind=kind, splits=splits, cache_dir=Path(builder.data_dir),
                   info={"builder": builder_name, "config": config.name,
                         "prepared_dir": str(builder.data_dir), **info})


# --------------------------------------------------------------------------------------------
# Public loaders


_SPLIT_WORDS = {"train": "train", "validation": "validation", "test": "test", **SPLIT_ALIASES}


def _split_of(f: Path) -> str | None:
    """The split a file's name gives (`wiki.valid.txt`: "validation"), or None."""
    words = {_SPLIT_WORDS.get(w) for w in re.split(r"[._\-]", f.name.lower())}
    words.discard(None)
    return words.pop() if len(words) == 1 else None


def _split_named_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """A folder's files named by split (`wiki.train.txt`, `valid.txt`, `test.txt`): (train,
    validation); test files are left out. Joined into one corpus, the test text would train
    and the validation split would be the corpus's last tenth. Unnamed folders pass as given."""
    named = {f: _split_of(f) for f in files}
    if not any(named.values()):
        return files, []
    loose = [f.name for f, s in named.items() if s is None]
    train = [f for f, s in named.items() if s == "train"]
    if loose or not train:
        raise ValueError(
            f"The folder's files are named by split ({', '.join(f.name for f in files)}), but "
            + (f"{loose} name none" if loose else "none is a train file")
            + "; pass the train files and validation_files= explicitly.")
    stems = [f.stem for f in train]
    if len(set(stems)) < len(stems):  # train.de + train.en: one text per language
        raise ValueError(
            f"The folder holds {', '.join(f.name for f in train)}: a parallel corpus, not one "
            "text. Load it with kind='translation', source_lang=..., target_lang=... (e.g. "
            "load_dataset(folder, kind='translation', source_lang='de', target_lang='en')).")
    test = [f.name for f, s in named.items() if s == "test"]
    if test:
        log.warning("Left out of the corpus as test files: %s.", test)
    return train, [f for f, s in named.items() if s == "validation"]


def load_text_corpus(files: str | os.PathLike | Sequence[str | os.PathLike], *,
                     data_dir: str | os.PathLike | None = None,
                     validation_files: str | os.PathLike | Sequence[str | os.PathLike]
                     | None = None,
                     validation_fraction: float = 0.1, unit: str = "paragraph",
                     verbose: bool = False) -> Dataset:
    """Local text files (or a folder of them) as a language-modelling dataset.

    Splits "train" and "validation"; each example is `{"text": str}`, one `unit`
    ("paragraph", "line" or "document" = whole file) with its line breaks kept, so joining a
    split's examples gives back its exact text. The validation split is `validation_files`, or
    else the last `validation_fraction` of the characters (nanoGPT's split of Tiny Shakespeare).
    A folder whose files are named by split (`wiki.train.txt`, `wiki.valid.txt` or `dev`,
    `wiki.test.txt`) is split by those names, test files left out (`validation_files` given
    replace its validation files; a validation file never trains); subfolders are not read.
    Prepared once under `data_dir` (default `default_data_dir()`) and reused until a file
    changes.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
    train_files = _resolve_files(files, "text corpus")
    val_files = (_resolve_files(validation_files, "validation_files")
                 if validation_files else [])
    both = [f.name for f in train_files if f in val_files]
    if isinstance(files, (str, os.PathLike)) and Path(files).expanduser().is_dir():
        # Split by the files' names; a folder's validation and test files never train, and
        # validation_files given (which may be one of them) replace its validation files.
        train_files, named_val = _split_named_files(train_files)
        train_files = [f for f in train_files if f not in val_files]
        val_files = val_files or named_val
        if not train_files:
            raise ValueError(f"text corpus {str(files)!r}: every file of the folder is a "
                             "validation_files one; no text is left to train on.")
    elif both:
        raise ValueError(f"{both} are given as training files and as validation_files; a "
                         "validation file must not be trained on: leave it out of files.")
    if not val_files and not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    # Fail early, with a clear message, before TFDS starts writing (an empty split stops its
    # writer with an AssertionError).
    chars = sum(len(read_text_file(f)) for f in train_files)
    for f in val_files:
        read_text_file(f)
    cut = _train_chars(chars, validation_fraction)
    if not val_files and not 0 < cut < chars:
        split, fix = (("train", "a smaller") if cut == 0 else ("validation", "a larger"))
        raise ValueError(
            f"text corpus {', '.join(map(str, train_files))}: the {split} split would be "
            f"empty ({chars} characters, of which validation_fraction={validation_fraction} "
            f"leaves {cut} for training); use a longer text, {fix} validation_fraction, or "
            "validation_files=.")
    payload = {"files": [_file_digest(f) for f in train_files],
               "validation_files": [_file_digest(f) for f in val_files],
               "validation_fraction": None if val_files else validation_fraction,
               "unit": unit}
    config = TextCorpusConfig(name=_config_name(train_files[0].stem, payload),
                 description="Local text corpus: " + ", ".join(map(str, train_files)),
                 files=tuple(map(str, train_files)),
                 validation_files=tuple(map(str, val_files)),
                 validation_fraction=validation_fraction, unit=unit)
    ds = _load("text_corpus", config, data_dir=data_dir, kind="text", fields={"text": "text"},
               name=str(train_files[0]) if len(train_files) == 1 else str(train_files[0].parent),
               verbose=verbose, info={"files": [str(f) for f in train_files], "unit": unit})
    return ds


def find_parallel_files(folder: str | os.PathLike, source_lang: str, target_lang: str
                        ) -> dict[str, tuple[Path, Path]]:
    """`{split: (source, target)}` for every `<split>.<source_lang>` with a
    `<split>.<target_lang>` beside it (`val`, `valid` and `dev` are named "validation")."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise ValueError(f"{str(folder)!r} is a file; a parallel corpus is a folder of "
                         "<split>.<lang> files, or {split: (source_file, target_file)}.")
    if not folder.is_dir():
        raise FileNotFoundError(f"parallel corpus folder {str(folder)!r} does not exist.")
    found = {}
    for src in sorted(folder.glob(f"*.{source_lang}")):
        tgt = src.with_suffix(f".{target_lang}")
        stem = src.name[:-len(source_lang) - 1]
        if not tgt.is_file():
            raise FileNotFoundError(f"{str(src)!r} has no parallel file {str(tgt)!r}.")
        split = SPLIT_ALIASES.get(stem, stem)
        if split in found:
            raise ValueError(
                f"{str(found[split][0])!r} and {str(src)!r} both name the {split!r} split "
                f"({', '.join(sorted(SPLIT_ALIASES))} all mean validation); keep one, or pass "
                "{split: (source_file, target_file)} explicitly.")
        found[split] = (src, tgt)
    if "train" not in found:
        raise ValueError(f"no 'train.{source_lang}' / 'train.{target_lang}' pair in "
                         f"{str(folder)!r}; files there: "
                         f"{sorted(p.name for p in folder.iterdir())[:20]}. A folder without "
                         "a training split (a held-out set alone) loads as "
                         "{split: (source_file, target_file)}.")
    return found


def load_parallel_corpus(files: str | os.PathLike | Mapping[str, tuple[str | os.PathLike,
                                                                       str | os.PathLike]],
                         *, source_lang: str | None = None, target_lang: str | None = None,
                         data_dir: str | os.PathLike | None = None,
                         verbose: bool = False) -> Dataset:
    """Line-aligned parallel text as a translation dataset (`{"inputs", "targets"}`).

    `files` is `{split: (source_file, target_file)}`, or a folder holding
    `<split>.<source_lang>` / `<split>.<target_lang>` pairs (e.g. Multi30k's train.de/train.en,
    val.de/val.en). Line counts that differ raise ValueError naming both files and counts.
    """
    if isinstance(files, (str, os.PathLike)):
        if not (source_lang and target_lang):
            raise ValueError("a parallel corpus folder needs source_lang and target_lang, "
                             "e.g. source_lang='de', target_lang='en'.")
        files = find_parallel_files(files, source_lang, target_lang)
    if not files:
        raise ValueError("load_parallel_corpus: no files given.")
    split_files = []
    for split, pair in files.items():
        split = SPLIT_ALIASES.get(split, split)
        if not re.fullmatch(r"\w+", split):
            raise ValueError(f"split name {split!r} (files {pair}) must be letters, digits and "
                             "'_': rename the files <split>.<lang>, or pass {split: "
                             "(source_file, target_file)}.")
        src, tgt = (_resolve_files(p, f"split {split!r}") for p in pair)
        if len(src) != 1 or len(tgt) != 1:
            raise ValueError(f"split {split!r}: give one source file and one target file.")
        _read_parallel(src[0], tgt[0])  # fail early on bad or misaligned files
        split_files.append((split, str(src[0]), str(tgt[0])))
    payload = {"splits": [(s, _file_digest(Path(a)), _file_digest(Path(b)))
                          for s, a, b in split_files]}
    slug = Path(split_files[0][1]).parent.name + (f"_{source_lang}-{target_lang}"
                                                  if source_lang else "")
    config = ParallelCorpusConfig(name=_config_name(slug, payload),
                 description="Local parallel corpus: " + "; ".join(
                     f"{s}: {a} -> {b}" for s, a, b in split_files),
                 split_files=tuple(split_files))
    return _load("parallel_corpus", config, data_dir=data_dir, kind="translation",
                 fields={"inputs": "inputs", "targets": "targets"},
                 name=slug, verbose=verbose,
                 info={"source_lang": source_lang, "target_lang": target_lang,
                       "files": {s: (a, b) for s, a, b in split_files}})


def synthetic_example(task: str, rng: np.random.Generator, min_length: int, max_length: int,
                      num_symbols: int = 10) -> tuple[str, str]:
    """One (input, target) text pair of a synthetic task.

    copy / reverse / sort: a random string of `min_length..max_length` letters from the first
    `num_symbols` of a-z, and that string copied, reversed or sorted. addition: "a+b" -> "c",
    each operand with `min_length..max_length` digits.
    """
    if task == "addition":
        def number():
            n = int(rng.integers(min_length, max_length + 1))
            digits = rng.integers(0, 10, size=n)
            if n > 1:
                digits[0] = rng.integers(1, 10)
            return int("".join(map(str, digits)))

        a, b = number(), number()
        return f"{a}+{b}", str(a + b)
    n = int(rng.integers(min_length, max_length + 1))
    alphabet = np.array(list(string.ascii_lowercase[:num_symbols]))
    x = "".join(rng.choice(alphabet, size=n))
    if task == "copy":
        return x, x
    if task == "reverse":
        return x, x[::-1]
    if task == "sort":
        return x, "".join(sorted(x))
    raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}.")


def _check_synthetic(task, min_length, max_length, num_symbols, num_train, num_validation,
                     num_test):
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}.")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length}, "
                         f"max_length={max_length}.")
    if not 1 <= num_symbols <= 26:
        raise ValueError(f"num_symbols must be in [1, 26], got {num_symbols}.")
    if num_train < 1 or num_validation < 0 or num_test < 0:
        raise ValueError("num_train must be >= 1 and num_validation, num_test >= 0.")


def synthetic_task_splits(task: str, *, min_length: int, max_length: int, num_symbols: int,
                          num_train: int, num_validation: int, num_test: int, seed: int
                          ) -> dict[str, list[tuple[str, str]]]:
    """The three splits of a synthetic task; held-out inputs never appear in train."""
    _check_synthetic(task, min_length, max_length, num_symbols, num_train, num_validation,
                     num_test)
    splits: dict[str, list[tuple[str, str]]] = {}
    held_out: set[str] = set()
    for index, (split, n) in enumerate([("validation", num_validation), ("test", num_test),
                                        ("train", num_train)]):
        rng = np.random.default_rng([seed, index])
        pairs, tries = [], 0
        while len(pairs) < n:
            tries += 1
            if tries > 20 * n + 1000:
                raise ValueError(
                    f"synthetic task {task!r}: too few distinct inputs of length "
                    f"{min_length}..{max_length} to draw {n} {split} examples that do not "
                    "occur in the held-out splits; raise max_length or num_symbols, or ask "
                    "for fewer examples.")
            x, y = synthetic_example(task, rng, min_length, max_length, num_symbols)
            if split == "train" and x in held_out:
                continue
            pairs.append((x, y))
        if split != "train":
            held_out.update(x for x, _ in pairs)
        splits[split] = pairs
    return {k: v for k, v in splits.items() if v}


def load_synthetic_task(task: str, *, min_length: int = 1, max_length: int = 10,
                        num_symbols: int = 10, num_train: int = 10000,
                        num_validation: int = 500, num_test: int = 500, seed: int = 0,
                        data_dir: str | os.PathLike | None = None,
                        verbose: bool = False) -> Dataset:
    """A synthetic sequence task (copy, reverse, sort, addition) as a translation dataset."""
    opts = dict(task=task, min_length=min_length, max_length=max_length,
                num_symbols=num_symbols, num_train=num_train, num_validation=num_validation,
                num_test=num_test, seed=seed)
    _check_synthetic(task, min_length, max_length, num_symbols, num_train, num_validation,
                     num_test)
    config = SyntheticTasksConfig(name=_config_name(task, opts),
                                  description=f"Synthetic task: {opts}", **opts)
    return _load("synthetic_tasks", config, data_dir=data_dir, kind="translation",
                 fields={"inputs": "inputs", "targets": "targets"},
                 name=f"synthetic/{task}", verbose=verbose, info=opts)


def in_memory_dataset(splits: Mapping[str, Iterable[Mapping[str, str]]], *, kind: str,
                      name: str = "in_memory", cache_dir: str | os.PathLike | None = None
                      ) -> Dataset:
    """A Dataset over Python lists of example dicts (tests, notebooks, quick experiments).

    Tokenizers learned from it are cached under `cache_dir/<digest of the examples>`, so other
    examples never reuse a tokenizer learned from these."""
    if kind not in ("text", "translation"):
        raise ValueError(f"kind must be 'text' or 'translation', got {kind!r}.")
    fields = ["text"] if kind == "text" else ["inputs", "targets"]
    out = {}
    digest = hashlib.sha256()
    for split, examples in splits.items():
        examples = list(examples)
        for i, ex in enumerate(examples):
            missing = [f for f in fields if not isinstance(ex, Mapping) or f not in ex]
            if missing:
                raise ValueError(f"{kind} examples need fields {fields}; example {i} of split "
                                 f"{split!r} has no {missing}.")
            bad = [f for f in fields if not isinstance(ex[f], str)]
            if bad:
                raise ValueError(f"example {i} of split {split!r}: {bad[0]!r} is "
                                 f"{type(ex[bad[0]]).__name__}; it must be a string.")
            for f in fields:
                digest.update(ex[f].encode("utf-8") + b"\0")
        digest.update(split.encode("utf-8") + b"\1")
        out[split] = ExampleSource(examples, {f: f for f in fields})
    cache = None if cache_dir is None else Path(cache_dir) / digest.hexdigest()[:16]
    return Dataset(name=name, kind=kind, splits=out, cache_dir=cache)

