"""Tokenizers: bytes, characters, SentencePiece (BPE or unigram) and GPT-2's byte-level BPE.

Every tokenizer maps text to int ids and back with the same reserved ids, fixed across the
library (the models treat 0 as padding):

    0 = PAD, 1 = EOS, 2 = BOS, 3 = UNK, and 4 = MASK when a mask id is reserved (MLM).

Real tokens start at `first_real_id` (4, or 5 with a mask id). `encode` never adds BOS/EOS: the
pipelines add them where the task needs them. `decode` drops PAD/BOS/EOS, writes MASK as
"[MASK]" and UNK as " ⁇ " (SentencePiece's convention), so `decode(encode(s)) == s` for every
string the tokenizer covers (bytes: every string; characters: strings made of known characters;
SentencePiece: every string, thanks to byte fallback and identity normalisation, except that
U+2581 "▁", SentencePiece's own marker for a space, decodes as a space).

`GPT2Tokenizer` is the exception: it reads a pretrained vocabulary (GPT-2's `vocab.json` +
`merges.txt`, or a `tokenizer.json`) whose ids must stay as the weights learned them, so it keeps
GPT-2's own: "<|endoftext|>" (50256) is both EOS and BOS, there is no PAD and no UNK, and id 0 is
"!". Every tokenizer names its ids (`pad_id`, `eos_id`, `bos_id`, `uses_reserved_ids`); the
parts of the library that frame rows with the reserved ids above refuse a tokenizer without
them.

Tokenizers built for a dataset are cached beside its prepared data (`build_tokenizer`), so the
second run, and every process of a multi-host run, loads the same vocabulary.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
MASK_ID = 4
SPECIAL_IDS = (PAD_ID, EOS_ID, BOS_ID, UNK_ID)
MASK_TOKEN = "[MASK]"
UNK_TEXT = " \u2047 "  # " ⁇ ", what SentencePiece decodes an unknown id to
TOKENIZER_KINDS = ("byte", "char", "bpe", "unigram")
GPT2_EOS_TOKEN = "<|endoftext|>"  # GPT-2's one special token: end (and start) of a text


class Tokenizer(abc.ABC):
    """Common interface: `encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size`."""

    kind: str = ""
    # The special ids the pipelines frame rows with: the library's reserved ids, unless a
    # tokenizer with a pretrained vocabulary of its own (GPT2Tokenizer) says otherwise.
    uses_reserved_ids: bool = True
    pad_id: int | None = PAD_ID
    eos_id: int = EOS_ID
    bos_id: int = BOS_ID
    unk_id: int | None = UNK_ID

    def __init__(self, reserve_mask: bool = False):
        self.reserve_mask = bool(reserve_mask)

    @property
    def first_real_id(self) -> int:
        """The smallest id of a real (non-special) token: 4, or 5 when MASK is reserved."""
        return MASK_ID + 1 if self.reserve_mask else MASK_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included: the model's `vocab_size`."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; PAD, BOS and EOS are dropped."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the tokenizer to `path` (JSON, or a SentencePiece `.model`); returns it."""

    def _special_text(self, i: int) -> str | None:
        """Text of a reserved id, "" for dropped ids, None for a real token."""
        if i in (PAD_ID, EOS_ID, BOS_ID):
            return ""
        if i == UNK_ID:
            return UNK_TEXT
        if i == MASK_ID and self.reserve_mask:
            return MASK_TOKEN
        return None

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this {self.kind} tokenizer's "
                                 f"vocabulary [0, {self.vocab_size}).")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"reserve_mask={self.reserve_mask})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: id = byte + first_real_id. Covers every string; vocab 260 (261 with MASK)."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256 + self.first_real_id

    def encode(self, text: str) -> list[int]:
        offset = self.first_real_id
        return [b + offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        offset, out, run = self.first_real_id, [], bytearray()
        for i in ids:
            if i >= offset:
                run.append(i - offset)
                continue
            special = self._special_text(i)
            if special:  # flush the bytes before a visible special token
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(special)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_json(path, {"type": "byte", "reserve_mask": self.reserve_mask})


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (nanoGPT's character model).

    The alphabet is built from the training text (`from_texts`); characters outside it encode
    to UNK. Saved and loaded as JSON.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str], reserve_mask: bool = False):
        super().__init__(reserve_mask)
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet; the training text "
                             "is empty.")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must be distinct single characters.")
        self.chars = chars
        self._ids = {c: i + self.first_real_id for i, c in enumerate(chars)}
        # a lookup table over code points makes encode one vectorised gather; its last entry
        # (UNK) catches every code point above the alphabet's largest
        self._table = np.full(max(map(ord, chars)) + 2, UNK_ID, np.int64)
        for c, i in self._ids.items():
            self._table[ord(c)] = i

    @classmethod
    def from_texts(cls, texts: str | Iterable[str], reserve_mask: bool = False
                   ) -> CharTokenizer:
        """The sorted set of characters in `texts` (a string or an iterable of strings)."""
        seen: set[str] = set()
        for text in [texts] if isinstance(texts, str) else texts:
            seen.update(text)
        return cls(sorted(seen), reserve_mask=reserve_mask)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + self.first_real_id

    def encode(self, text: str) -> list[int]:
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        return self._table[np.minimum(points, len(self._table) - 1)].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        offset, chars = self.first_real_id, self.chars
        return "".join(chars[i - offset] if i >= offset else self._special_text(i) or ""
                       for i in ids)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_json(path, {"type": "char", "reserve_mask": self.reserve_mask,
                                  "chars": self.chars})


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (BPE or unigram) with the library's reserved ids."""

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        proto = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.model_proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        sp = self._sp
        got = (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id())
        if got != SPECIAL_IDS:
            raise ValueError(f"SentencePiece model has (pad, eos, bos, unk) ids {got}, the "
                             f"library needs {SPECIAL_IDS}; train it with "
                             "train_sentencepiece().")
        super().__init__(reserve_mask=sp.get_piece_size() > MASK_ID
                         and sp.id_to_piece(MASK_ID) == MASK_TOKEN)
        from sentencepiece import sentencepiece_model_pb2 as pb

        spec = pb.ModelProto.FromString(proto).trainer_spec
        self.kind = "unigram" if spec.model_type == pb.TrainerSpec.UNIGRAM else "bpe"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    @property
    def space_id(self) -> int | None:
        """The id of the bare word-start piece ("▁"), which SentencePiece puts before a
        "[MASK]" that follows a space; None if the vocabulary has none."""
        i = self._sp.piece_to_id("\u2581")
        return None if i == self._sp.unk_id() else i

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (SentencePiece's C++ loop, faster)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._sp.decode(ids)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_bytes(path, self.model_proto)


def _hf_tokenizers():
    """The `tokenizers` package, imported when a GPT2Tokenizer is first made."""
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError("GPT2Tokenizer wraps Hugging Face's tokenizers package: "
                          'pip install ".[hf]" (or pip install tokenizers).') from error
    return tokenizers


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (Hugging Face `tokenizers`), with GPT-2's own ids.

    Made from GPT-2's `vocab.json` + `merges.txt` (`from_files`), a `tokenizer.json`
    (`from_json_file`) or a folder holding either (`from_folder`, which `load_tokenizer` and
    `convert.load_gpt2_tokenizer` call). Every string encodes (byte-level: no UNK) and
    `decode(encode(s)) == s`. "<|endoftext|>" (`eos_id`, 50256 in GPT-2) is EOS and BOS;
    `decode` drops it, as the other tokenizers drop EOS, and `encode` reads the text
    "<|endoftext|>" as ordinary text (its BPE pieces, as GPT-2's own encoder and tiktoken's
    `encode_ordinary` do), never as the special id: append `eos_id` yourself where a text
    ends. There is no padding id (`pad_id=None`, matching `convert.gpt2_config`): packed rows
    carry `segment_ids`. `save` writes the `tokenizer.json` (special token included, as
    Hugging Face writes GPT-2's), which `load_tokenizer` recognises.
    """

    kind = "gpt2"
    uses_reserved_ids = False
    pad_id = None
    unk_id = None

    def __init__(self, tokenizer_json: str):
        """`tokenizer_json`: the text of a Hugging Face `tokenizer.json` for byte-level BPE
        with "<|endoftext|>" in its vocabulary."""
        super().__init__(reserve_mask=False)
        hf = _hf_tokenizers()
        spec = json.loads(tokenizer_json)
        _check_byte_level(spec)
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        vocab = spec["model"]["vocab"]
        if GPT2_EOS_TOKEN not in vocab and GPT2_EOS_TOKEN not in added:
            raise ValueError(f"the vocabulary has no {GPT2_EOS_TOKEN!r}, GPT-2's end-of-text "
                             "token: not a GPT-2 vocabulary.")
        self.tokenizer_json = tokenizer_json
        # The special token stays in the saved JSON but not in the encoder, so "<|endoftext|>"
        # in a text is text; the id keeps its row of the vocabulary for decode's check.
        plain = dict(spec, added_tokens=[])
        if GPT2_EOS_TOKEN not in vocab:
            plain["model"] = dict(spec["model"], vocab={**vocab,
                                                        GPT2_EOS_TOKEN: added[GPT2_EOS_TOKEN]})
        self._hf = hf.Tokenizer.from_str(json.dumps(plain))
        self.eos_id = self.bos_id = int(self._hf.token_to_id(GPT2_EOS_TOKEN))
        self._vocab_size = max(self._hf.get_vocab(with_added_tokens=False).values()) + 1

    @classmethod
    def from_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> GPT2Tokenizer:
        """GPT-2's `vocab.json` (piece -> id) and `merges.txt` (the merges, in order)."""
        hf = _hf_tokenizers()
        for path in (vocab, merges):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{os.fspath(path)!r} does not exist: GPT2Tokenizer "
                                        "reads GPT-2's vocab.json and merges.txt.")
        tok = hf.Tokenizer(hf.models.BPE.from_file(os.fspath(vocab), os.fspath(merges)))
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        tok.post_processor = hf.processors.ByteLevel(trim_offsets=False)
        if GPT2_EOS_TOKEN in tok.get_vocab():  # else __init__ says the vocabulary lacks it
            tok.add_special_tokens([hf.AddedToken(GPT2_EOS_TOKEN, special=True)])
        return cls(tok.to_str())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """A Hugging Face `tokenizer.json` (GPT-2's, or one `save` wrote)."""
        return cls(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> GPT2Tokenizer:
        """The tokenizer of a Hugging Face GPT-2 folder: its `tokenizer.json`, else its
        `vocab.json` + `merges.txt`."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_json_file(folder / "tokenizer.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt")
        have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        raise FileNotFoundError(
            f"{str(folder)!r} " + ("does not exist" if have is None else f"holds {have[:8]}")
            + ": a GPT-2 tokenizer needs tokenizer.json, or vocab.json and merges.txt, "
            "from the model's Hugging Face folder (nothing is downloaded).")

    @property
    def first_real_id(self) -> int:
        """0: every id is a token (id 0 is "!" in GPT-2)."""
        return 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (the Rust library's threads)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._hf.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> Path:
        return _write_bytes(path, self.tokenizer_json.encode("utf-8"))

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _is_hf_tokenizer_json(spec: object) -> bool:
    return isinstance(spec, dict) and isinstance(spec.get("model"), dict) and "type" not in spec


def _check_byte_level(spec: dict) -> None:
    """Refuses a tokenizer.json that is not GPT-2-style byte-level BPE (other models or
    normalisers would break the ids or `decode(encode(s)) == s`), naming what differs."""
    if not _is_hf_tokenizer_json(spec):
        raise ValueError("not a Hugging Face tokenizer.json (no 'model').")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    wrong = [what for what, ok in (
        (f"model type {spec['model'].get('type')!r} (needs 'BPE')",
         spec["model"].get("type") == "BPE"),
        (f"normalizer {(spec.get('normalizer') or {}).get('type')!r} (needs none)",
         not spec.get("normalizer")),
        (f"pre_tokenizer {pre.get('type')!r} (needs ByteLevel)", bool(byte_level)),
        ("ByteLevel add_prefix_space=True (GPT-2 adds no space)",
         not any(s.get("add_prefix_space") for s in byte_level)),
        (f"decoder {(spec.get('decoder') or {}).get('type')!r} (needs ByteLevel)",
         (spec.get("decoder") or {}).get("type") == "ByteLevel"),
    ) if not ok]
    if wrong:
        raise ValueError("GPT2Tokenizer reads byte-level BPE as GPT-2's tokenizer.json has "
                         f"it; this one has {'; '.join(wrong)}.")


def _capped_chunks(texts: Iterable[str], max_chars: int, chunk: int) -> Iterator[str]:
    """The lines of `texts`, cut into pieces of at most `chunk` characters, until `max_chars`
    characters have been given (the last piece cut short), however long one text is."""
    left = max_chars
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start)
            end = len(text) if end < 0 else end
            for piece in range(start, end, chunk):
                part = text[piece:min(piece + chunk, end, piece + left)]
                yield part
                left -= len(part)
                if left <= 0:
                    return
            start = end + 1


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
                        reserve_mask: bool = False, byte_fallback: bool = True,
                        character_coverage: float = 1.0, max_chars: int = 10_000_000,
                        max_sentence_length: int = 16384, num_threads: int = 2,
                        path: str | os.PathLike | None = None) -> SentencePieceTokenizer:
    """Trains SentencePiece on `texts` (one sentence or paragraph each) and returns it.

    Ids: pad 0, eos 1, bos 2, unk 3, then "[MASK]" (4, when `reserve_mask`), then "\\n" (so
    multi-line text keeps its line breaks), then byte pieces (`byte_fallback`: any character
    round-trips, even one never seen) and the learned pieces. Normalisation is the identity and
    whitespace is kept, so decode(encode(s)) == s. Reads at most `max_chars` characters, line
    breaks not counted, even from one long text (the Flax WMT example caps its vocabulary
    corpus the same way); lines longer than `max_sentence_length` bytes are split. Training is
    deterministic for fixed input.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    user_symbols = ([MASK_TOKEN] if reserve_mask else []) + ["\n"]
    sentences = list(_capped_chunks(texts, max_chars, max_sentence_length // 4))  # <= 4 bytes
    if not sentences:
        raise ValueError("cannot train SentencePiece on empty text.")
    alphabet = set().union(*map(set, sentences))
    needed = len(SPECIAL_IDS) + len(user_symbols) + len(alphabet) + (256 if byte_fallback else 0)
    if vocab_size <= needed:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {len(SPECIAL_IDS)} special ids, "
            f"{len(user_symbols)} symbols, {len(alphabet)} distinct characters in the text"
            + (" and 256 byte pieces" if byte_fallback else "") + f" need {needed}; use a "
            f"vocab_size above {needed}.")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        user_defined_symbols=user_symbols, byte_fallback=byte_fallback,
        character_coverage=character_coverage, normalization_rule_name="identity",
        remove_extra_whitespaces=False, max_sentence_length=max_sentence_length,
        hard_vocab_limit=False, num_threads=num_threads, minloglevel=2)
    tokenizer = SentencePieceTokenizer(proto.getvalue())
    if tokenizer.vocab_size < vocab_size:  # hard_vocab_limit=False: the text ran out of merges
        logging.getLogger(__name__).warning(
            "SentencePiece learned %d pieces of the %d asked for: the text is too small for "
            "more.", tokenizer.vocab_size, vocab_size)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer written by `Tokenizer.save` (JSON for byte/char, a Hugging Face
    `tokenizer.json` for GPT-2's BPE, else SentencePiece), or a Hugging Face GPT-2 folder
    (`tokenizer.json`, or `vocab.json` + `merges.txt`) as a `GPT2Tokenizer`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist.")
    if path.is_dir():
        return GPT2Tokenizer.from_folder(path)
    with open(path, "rb") as f:
        is_json = f.read(1) == b"{"  # by content: a tokenizer saved under any name
    if is_json:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        if _is_hf_tokenizer_json(spec):
            return GPT2Tokenizer(text)
        kind = spec.get("type")
        if kind == "byte":
            return ByteTokenizer(reserve_mask=spec["reserve_mask"])
        if kind == "char":
            return CharTokenizer(spec["chars"], reserve_mask=spec["reserve_mask"])
        raise ValueError(f"{str(path)!r} is not a tokenizer file (type={kind!r}; expected "
                         "'byte' or 'char', or a Hugging Face tokenizer.json).")
    try:
        return SentencePieceTokenizer(path)
    except RuntimeError as error:
        raise ValueError(f"{str(path)!r} is neither a SentencePiece model nor a tokenizer's "
                         "JSON (written by Tokenizer.save).") from error


def build_tokenizer(kind: str, texts: Callable[[], Iterable[str]], *,
                    cache_dir: str | os.PathLike | None, vocab_size: int | None = None,
                    reserve_mask: bool = False, max_chars: int = 10_000_000) -> Tokenizer:
    """A tokenizer of `kind` for a corpus, loaded from `cache_dir` or built and cached there.

    `texts()` yields the training text (called only when the tokenizer must be built). `kind`:
    "byte" (nothing to learn), "char" (alphabet of the training text), "bpe" / "unigram"
    (SentencePiece with at most `vocab_size` pieces: fewer, with a warning, when the text is
    too small for more). With `cache_dir=None` nothing is cached.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}.")
    if kind == "byte":
        return ByteTokenizer(reserve_mask=reserve_mask)
    suffix = "_mask" if reserve_mask else ""
    if kind == "char":
        name = f"char{suffix}.json"
    else:
        if not vocab_size:
            raise ValueError(f"a {kind} tokenizer needs vocab_size (e.g. 8000).")
        name = f"spm_{kind}_{vocab_size}{suffix}_{max_chars}.model"
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.exists():
        return load_tokenizer(path)
    if kind == "char":
        tokenizer = CharTokenizer.from_texts(texts(), reserve_mask=reserve_mask)
    else:
        tokenizer = train_sentencepiece(texts(), vocab_size, model_type=kind,
                                        reserve_mask=reserve_mask, max_chars=max_chars)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def _write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomic write (temp file + rename): concurrent writers never leave a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_json(path: str | os.PathLike, obj) -> Path:
    return _write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))
