"""Tests of the data layer: tokenizers, TFDS builders, catalog names, grain pipelines.

Every test writes its own tiny data under tmp_path. The key check runs the models: a packed row
must give each example exactly the outputs it gets when run alone.
"""

import json
import os
import subprocess
import sys

import flax.linen
import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import flaxformer_lite as ffl
from flaxformer_lite import data as fd
from flaxformer_lite.data.builders import read_lines

WORDS = ("the a cat dog sat ran on in mat hat big red old new sun sky tree see you we go "
         "and but so not far near up down").split()


def _text(seed: int, paragraphs: int, max_lines: int = 2, max_words: int = 5) -> str:
    """Deterministic English-like text: short paragraphs separated by blank lines."""
    rng = np.random.default_rng(seed)
    paras = []
    for _ in range(paragraphs):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words + 1)))
                 for _ in range(rng.integers(1, max_lines + 1))]
        paras.append("\n".join(lines).capitalize())
    return "\n\n".join(paras) + "\n"


def _sentences(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 7))) for _ in range(n)]


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def text_ds(workdir):
    corpus = _write(workdir / "corpus.txt", _text(0, 80))
    return fd.load_text_corpus(corpus, data_dir=workdir / "tfds")


@pytest.fixture(scope="module")
def char_tok(text_ds):
    return text_ds.tokenizer("char")


@pytest.fixture(scope="module")
def parallel_ds(workdir):
    folder = workdir / "para"
    folder.mkdir()
    for split, n, seed in [("train", 60, 1), ("val", 12, 2)]:
        src = _sentences(seed, n)
        _write(folder / f"{split}.xx", "\n".join(src) + "\n")
        # the "translation": each sentence reversed word by word, upper-cased
        _write(folder / f"{split}.yy", "\n".join(" ".join(s.split()[::-1]).upper()
                                                 for s in src) + "\n")
    return fd.load_parallel_corpus(folder, source_lang="xx", target_lang="yy",
                                  data_dir=workdir / "tfds")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("reserve_mask", [False, True])
def test_byte_and_char_round_trip(tmp_path, reserve_mask):
    texts = ["Hello, world!", "Zwei Männer — naïve café 日本語 🙂", " lead\n\ntrail \t", ""]
    byte = fd.ByteTokenizer(reserve_mask=reserve_mask)
    first = 5 if reserve_mask else 4
    assert byte.first_real_id == first and byte.vocab_size == 256 + first
    for s in texts:
        ids = byte.encode(s)
        assert ids == [b + first for b in s.encode("utf-8")]
        assert byte.decode(ids) == s
    char = fd.CharTokenizer.from_texts(texts, reserve_mask=reserve_mask)
    assert char.vocab_size == len(set("".join(texts))) + first
    for s in texts:
        assert min(char.encode(s), default=first) >= first
        assert char.decode(char.encode(s)) == s
    # specials: pad/bos/eos vanish, an unknown character becomes UNK
    assert char.decode([fd.BOS_ID] + char.encode("café") + [fd.EOS_ID, fd.PAD_ID]) == "café"
    assert char.encode("x") == [fd.UNK_ID]
    for tok in (byte, char):
        loaded = fd.load_tokenizer(tok.save(tmp_path / f"{tok.kind}.json"))
        assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(texts[1]) == tok.encode(texts[1])
    with pytest.raises(ValueError, match="outside"):
        char.decode([char.vocab_size])


def test_tokenizers_of_different_splits_are_cached_apart(tmp_path):
    """A tokenizer asked for another split is that split's, not the cached train one."""
    ds = fd.load_text_corpus(_write(tmp_path / "c.txt", "abc\n\n" * 9 + "xyz\n"),
                             data_dir=tmp_path / "tfds")
    train, validation = (ds.tokenizer("char", split=s) for s in ("train", "validation"))
    assert set(train.chars) == set("abc\n") and set(validation.chars) == set("xyz\n")
    assert ds.tokenizer("char").chars == train.chars  # both cached, neither overwritten


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip_and_cache(text_ds, model_type):
    tok = text_ds.tokenizer(model_type, vocab_size=400)
    cached = text_ds.cache_dir / f"spm_{model_type}_400_10000000.model"
    assert cached.exists()  # cached beside the prepared data
    assert isinstance(tok, fd.SentencePieceTokenizer) and tok.kind == model_type
    assert tok.vocab_size <= 400 and not tok.reserve_mask
    for s in [text_ds.split("validation")[0]["text"], "Unseen: Ωmega ✓  double  space\n",
              "the cat sat on the mat"]:
        ids = tok.encode(s)
        assert all(i >= tok.first_real_id for i in ids)  # encode adds no specials
        assert tok.decode(ids) == s
    sp = tok._sp
    assert [sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()] == [
        fd.PAD_ID, fd.EOS_ID, fd.BOS_ID, fd.UNK_ID]
    mtime = cached.stat().st_mtime_ns
    again = text_ds.tokenizer(model_type, vocab_size=400)  # loaded, not retrained
    assert cached.stat().st_mtime_ns == mtime and again.model_proto == tok.model_proto
    masked = fd.train_sentencepiece(text_ds.texts("train"), 400, model_type=model_type,
                                   reserve_mask=True)
    assert masked.reserve_mask and masked.first_real_id == 5
    ids = masked.encode("the [MASK] sat")
    assert ids.count(fd.MASK_ID) == 1 and masked.decode(ids) == "the [MASK] sat"


def test_sentencepiece_says_when_the_text_cannot_fill_the_vocabulary(caplog):
    with caplog.at_level("WARNING"):
        tok = fd.train_sentencepiece(["the cat sat on the mat"] * 20, 2000)
    assert tok.vocab_size < 2000 and f"learned {tok.vocab_size} pieces of the 2000" in caplog.text


def test_sentencepiece_reads_at_most_max_chars_even_of_one_long_text():
    # One document (a whole file as one example): the cap used to be checked only between
    # texts, so all of it was read. Past the cap lie 600 characters seen nowhere else, which
    # a 300-piece vocabulary without byte pieces could not hold.
    head = "the cat sat on the mat " * 400
    tail = "".join(map(chr, range(0x4E00, 0x4E00 + 600)))
    tok = fd.train_sentencepiece([head + tail], 300, byte_fallback=False, max_chars=len(head))
    assert fd.UNK_ID in tok.encode(tail[:5])
    with pytest.raises(ValueError, match="distinct characters"):
        fd.train_sentencepiece([head + tail], 300, byte_fallback=False,
                               max_chars=len(head) + 600)


GPT2_TEXTS = [
    "the quick brown fox", "It's 2024: we've 100,000 cats, they're 3.14x faster!",
    "café naïve Zürich Ünïcödé", "日本語と東京 Привет, мир", "😀🎉 👍🏽 emoji in a row 😀😀",
    "   leading spaces, trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n", "a  b   c    d",
    "\n", " ", "", "x" * 40, "I'M SHOUTING, YOU'LL SEE", "'s's 't", "(x) [y] {z} a-b c_d e/f",
    "\u00a0non-breaking\u2003spaces\u200bzero-width", "\ud7ff\ue000\U0010ffff",
    "<|endoftext|>", "end<|endoftext|>start", " <|endoftext|> ",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings of pieces of the training words and of characters it never saw."""
    rng = np.random.default_rng(seed)
    pool = ("the quick fox jumps it's we've 2024 3.14 café Zürich 日本語 Привет 😀 👍🏽 "
            "<|endoftext|> (x) a-b").split(" ")
    pool += list("  \t\n'’\"!?.,;:0123456789ßøΩжЖ中文한국어🚀🧪\u0301")
    return ["".join(rng.choice(pool, rng.integers(0, 15))) for _ in range(n)]


def test_gpt2_tokenizer_gives_tiktoken_ids_and_round_trips(gpt2_vocab):
    """The ids equal an independent byte-level BPE (tiktoken on the same vocabulary as byte
    ranks, GPT-2's regex) on varied text; every string round-trips; "<|endoftext|>" in a text
    is text (its pieces, as tiktoken's encode_ordinary), and decode drops the EOS id."""
    folder, vocab, reference = gpt2_vocab
    tok = fd.load_tokenizer(folder)
    eos = vocab["<|endoftext|>"]
    assert isinstance(tok, fd.GPT2Tokenizer) and tok.kind == "gpt2"
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (
        len(vocab), eos, eos, None, None)
    assert not tok.uses_reserved_ids and tok.first_real_id == 0
    merged = 0
    for text in GPT2_TEXTS + _random_texts(300):
        ids = tok.encode(text)
        assert ids == reference.encode_ordinary(text), text
        assert tok.decode(ids) == text, text
        assert eos not in ids
        merged += len(ids) < len(text.encode("utf-8"))
    assert merged > 100  # the merges were used, not only the byte pieces
    assert tok.encode("the quick") == [vocab["the"], vocab["Ġquick"]]
    assert reference.encode("a<|endoftext|>", allowed_special="all")[-1] == eos  # not ours
    assert tok.decode([eos, *tok.encode("hi"), eos, eos]) == "hi"
    assert tok.decode([vocab["!"]]) == "!"  # id 0 is a token, not padding
    assert tok.encode_batch(GPT2_TEXTS) == [tok.encode(t) for t in GPT2_TEXTS]
    with pytest.raises(ValueError, match="outside this gpt2 tokenizer's vocabulary"):
        tok.decode([len(vocab)])


def test_gpt2_tokenizer_saves_loads_and_reads_hugging_face_files(gpt2_vocab, tmp_path):
    """save writes a Hugging Face tokenizer.json (the special token registered, as GPT-2's
    is), which load_tokenizer and tokenizers itself read with the same ids; a folder with a
    tokenizer.json loads from it."""
    from tokenizers import Tokenizer as HFTokenizer

    from flaxformer_lite import convert

    folder, vocab, _ = gpt2_vocab
    tok = convert.load_gpt2_tokenizer(folder)
    texts = [t for t in GPT2_TEXTS + _random_texts(50, seed=1) if "<|endoftext|>" not in t]
    path = tok.save(tmp_path / "any_name")
    loaded = fd.load_tokenizer(path)
    assert isinstance(loaded, fd.GPT2Tokenizer) and loaded.vocab_size == tok.vocab_size
    hf = HFTokenizer.from_file(str(path))
    assert hf.token_to_id("<|endoftext|>") == tok.eos_id
    assert hf.encode("end<|endoftext|>").ids[-1] == tok.eos_id  # Hugging Face: the special id
    assert loaded.encode("end<|endoftext|>") == tok.encode("end<|endoftext|>")  # ours: text
    for text in texts:
        assert loaded.encode(text) == tok.encode(text) == hf.encode(text).ids, text
    only_json = tmp_path / "hf_folder"
    tok.save(only_json / "tokenizer.json")
    from_json = fd.load_tokenizer(only_json)
    assert [from_json.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_gpt2_tokenizer_errors_name_the_files_and_the_fix(gpt2_vocab, tmp_path, monkeypatch):
    import json
    import sys

    from flaxformer_lite import convert

    folder, vocab, _ = gpt2_vocab
    empty = tmp_path / "weights_only"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    for load in (convert.load_gpt2_tokenizer, fd.load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"holds \['config.json'\]: a GPT-2 "
                           "tokenizer needs tokenizer.json, or vocab.json and merges.txt"):
            load(empty)
    (empty / "vocab.json").write_text((folder / "vocab.json").read_text(encoding="utf-8"),
                                      encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="needs tokenizer.json, or vocab.json and "):
        convert.load_gpt2_tokenizer(empty)  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        fd.GPT2Tokenizer.from_files(folder / "vocab.json", tmp_path / "merges.txt")
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "vocab.json").write_text(json.dumps({k: i for k, i in vocab.items()
                                                   if k != "<|endoftext|>"}))
    (no_eos / "merges.txt").write_text((folder / "merges.txt").read_text(encoding="utf-8"),
                                       encoding="utf-8")
    with pytest.raises(ValueError, match="has no '<|endoftext|>'"):
        fd.load_tokenizer(no_eos)
    spec = json.loads(fd.load_tokenizer(folder).tokenizer_json)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    spec["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(ValueError, match="normalizer 'Lowercase' .needs none.; pre_tokenizer "
                       "'Whitespace' .needs ByteLevel."):
        fd.GPT2Tokenizer(json.dumps(spec))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    with pytest.raises(ImportError, match=r'pip install "\.\[hf\]"'):
        fd.load_tokenizer(folder)


def test_gpt2_tokenizer_frames_lm_rows_with_its_own_ids_and_is_refused_elsewhere(gpt2_vocab):
    """lm_pipeline frames rows with "<|endoftext|>" on both ends; padded rows carry
    segment_ids (id 0 is a token). The framings built on the reserved ids refuse it."""
    folder, vocab, _ = gpt2_vocab
    tok = fd.load_tokenizer(folder)
    eos = tok.eos_id
    examples = [{"text": "the quick brown fox"}, {"text": "日本語 😀!"}]
    for pack in (True, False):
        batch = next(iter(fd.lm_pipeline(examples, tok, batch_size=2, max_len=16, pack=pack,
                                         shuffle=False, num_epochs=1)))
        seg = batch["segment_ids"]
        for row in range(2):
            for s in set(seg[row].tolist()) - {0}:
                inputs, targets = batch["inputs"][row][seg[row] == s], batch["targets"][row][
                    seg[row] == s]
                assert inputs[0] == eos and targets[-1] == eos
                assert tok.decode(inputs) in ("the quick brown fox", "日本語 😀!")
                assert list(inputs[1:]) == list(targets[:-1])
        if not pack:
            lengths = [len(tok.encode(e["text"])) + 1 for e in examples]
            assert seg.sum(1).tolist() == lengths and not batch["inputs"][seg == 0].any()
    calls = {
        "encode_sources": lambda: fd.encode_sources(tok, ["a"], 8),
        "encode_texts": lambda: fd.encode_texts(tok, ["a"], 8),
        "encode_masked": lambda: fd.encode_masked(tok, ["a [MASK]"], 8),
        "translation_pipeline": lambda: fd.translation_pipeline(
            [{"inputs": "a", "targets": "b"}], tok, batch_size=1, max_source_len=8),
        "mlm_pipeline": lambda: fd.mlm_pipeline(examples, tok, batch_size=1, max_len=8),
        "classification_pipeline": lambda: fd.classification_pipeline(
            [{"text": "a", "label": 0}], tok, batch_size=1, max_len=8),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name} frames rows with the library's reserved "
                           f"ids .* GPT2Tokenizer does not use .its eos_id={eos}, bos_id={eos}, "
                           "pad_id=None: id 0 is a token.: for language modelling use "
                           "lm_pipeline"):
            call()


def test_shared_translation_vocabulary(parallel_ds):
    tok = parallel_ds.tokenizer("char")
    ex = parallel_ds.split("train")[0]
    for side in ("inputs", "targets"):  # one vocabulary covers both languages
        assert fd.UNK_ID not in tok.encode(ex[side])
        assert tok.decode(tok.encode(ex[side])) == ex[side]


# --------------------------------------------------------------------------------------------
# Builders and bad input


def test_text_corpus_split_and_array_record_round_trip(workdir, text_ds):
    text = (workdir / "corpus.txt").read_text()
    cut = int(len(text) * 0.9)  # nanoGPT's split
    assert text_ds.full_text("train") == text[:cut]
    assert text_ds.full_text("validation") == text[cut:]
    prepared = text_ds.info["prepared_dir"]
    files = os.listdir(prepared)
    assert any(".array_record" in f for f in files), files
    # the files stand alone: TFDS reads them back without our builder class
    builder = tfds.builder_from_directory(prepared)
    src = builder.as_data_source()["train"]
    assert [src[i]["text"].decode() for i in range(len(src))] == list(
        ex["text"] for ex in text_ds.split("train"))
    units = [ex["text"] for ex in text_ds.split("train")]
    assert all(u.rstrip("\n").count("\n\n") == 0 for u in units)  # one paragraph each


def test_parallel_corpus_round_trip(workdir, parallel_ds):
    assert set(parallel_ds.splits) == {"train", "validation"}  # "val" is named validation
    src = (workdir / "para" / "train.xx").read_text().splitlines()
    tgt = (workdir / "para" / "train.yy").read_text().splitlines()
    assert list(parallel_ds.split("train")) == [
        {"inputs": s, "targets": t} for s, t in zip(src, tgt)]


def test_synthetic_tasks(tmp_path):
    for task in fd.SYNTHETIC_TASKS:
        ds = fd.load_synthetic_task(task, min_length=2, max_length=6, num_train=300,
                                   num_validation=40, num_test=40, seed=3,
                                   data_dir=tmp_path)
        train = list(ds.split("train"))
        assert len(train) == 300
        held_out = {ex["inputs"] for s in ("validation", "test") for ex in ds.split(s)}
        assert not held_out & {ex["inputs"] for ex in train}
        for ex in train + list(ds.split("validation")):
            x, y = ex["inputs"], ex["targets"]
            if task == "addition":
                a, b = x.split("+")
                assert int(y) == int(a) + int(b) and 2 <= len(a) <= 6
            else:
                assert 2 <= len(x) <= 6
                assert y == {"copy": x, "reverse": x[::-1], "sort": "".join(sorted(x))}[task]
        again = fd.load_synthetic_task(task, min_length=2, max_length=6, num_train=300,
                                      num_validation=40, num_test=40, seed=3,
                                      data_dir=tmp_path / "elsewhere")
        assert list(again.split("train")) == train  # same seed, same data
    with pytest.raises(ValueError, match="too few distinct"):
        fd.load_synthetic_task("copy", min_length=1, max_length=1, num_symbols=1, num_train=10,
                              num_validation=2, num_test=0, data_dir=tmp_path)


def test_cache_reused_and_rebuilt_when_source_changes(tmp_path):
    path = _write(tmp_path / "doc.txt", _text(5, 30))
    first = fd.load_text_corpus(path, data_dir=tmp_path / "tfds")
    again = fd.load_text_corpus(path, data_dir=tmp_path / "tfds")
    assert again.info["prepared_dir"] == first.info["prepared_dir"]
    _write(path, _text(6, 30))
    changed = fd.load_text_corpus(path, data_dir=tmp_path / "tfds")
    assert changed.info["prepared_dir"] != first.info["prepared_dir"]
    assert changed.full_text("train") + changed.full_text("validation") == path.read_text()


def test_parallel_mismatch_names_files_and_counts(tmp_path):
    src = _write(tmp_path / "train.de", "eins\nzwei\ndrei\n")
    tgt = _write(tmp_path / "train.en", "one\ntwo\n")
    with pytest.raises(ValueError) as err:
        fd.load_parallel_corpus({"train": (src, tgt)}, data_dir=tmp_path)
    msg = str(err.value)
    assert str(src) in msg and str(tgt) in msg and "3 lines" in msg and "2 lines" in msg


def test_lines_split_on_newline_only(tmp_path):
    """A stray CR (or form feed, or Unicode line separator) inside a line is text: the line
    counts are `wc -l`'s, so aligned parallel files stay aligned; CRLF is one line end."""
    src = _write(tmp_path / "train.de", "eins\rzwei\r\ndrei\x0cvier\nf\u2028nf\n")
    tgt = _write(tmp_path / "train.en", "one two\nthree four\nfive\n")
    assert [read_lines(p) for p in (src, tgt)] == [
        ["eins\rzwei", "drei\x0cvier", "f\u2028nf"], ["one two", "three four", "five"]]
    assert fd.split_units("a\x0cb\u2028c\x85d\ne\n", "line") == ["a\x0cb\u2028c\x85d\n", "e\n"]
    ds = fd.load_parallel_corpus({"train": (src, tgt)}, data_dir=tmp_path)
    assert len(ds.split("train")) == 3


def test_endless_pipeline_of_empty_examples_raises(char_tok):
    """Used to spin forever inside next(): every epoch skipped every example. Run in a thread
    so that a regression fails after a minute instead of hanging the suite."""
    import threading

    empty = [{"text": "\n"}, {"text": "\n\n"}] * 100
    for pack in (True, False):
        outcome = []

        def first(pack=pack, outcome=outcome):
            try:
                next(iter(fd.lm_pipeline(empty, char_tok, batch_size=2, max_len=8, pack=pack)))
            except ValueError as e:
                outcome.append(str(e))

        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "next() did not return"
        assert outcome and "whole epoch of this process's 200 examples gave no tokens" in outcome[0]


def test_two_files_for_one_split_are_refused(tmp_path):
    for stem in ("train", "dev", "val"):
        for lang in ("de", "en"):
            _write(tmp_path / f"{stem}.{lang}", f"{stem} {lang}\n")
    with pytest.raises(ValueError, match="both name the 'validation' split"):
        fd.load_parallel_corpus(tmp_path, source_lang="de", target_lang="en",
                                data_dir=tmp_path / "tfds")


def test_bad_input_errors(tmp_path):
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="empty"):
        fd.load_text_corpus(empty, data_dir=tmp_path)
    blank = _write(tmp_path / "blank.txt", " \n\n")
    with pytest.raises(ValueError, match="empty"):
        fd.load_text_corpus(blank, data_dir=tmp_path)
    one = _write(tmp_path / "one.txt", "a")  # TFDS's writer stopped on an empty train split
    with pytest.raises(ValueError, match=r"train split would be empty \(1 characters"):
        fd.load_text_corpus(one, data_dir=tmp_path)
    with pytest.raises(ValueError, match="validation split would be empty .*a larger"):
        fd.load_text_corpus(_write(tmp_path / "few.txt", "abc\n"), data_dir=tmp_path,
                            validation_fraction=1e-17)  # rounds to no character
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\nna\xefve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte 0xef at offset 13 \(line 2\)"):
        fd.load_text_corpus(latin1, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        fd.load_text_corpus(tmp_path / "missing.txt", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        fd.load_dataset("no_such_dataset", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        fd.load_dataset("synthetic/shuffle", data_dir=tmp_path)
    with pytest.raises(ValueError, match="language pair"):
        fd.load_dataset("wmt14_translate/xx-en", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="'data/nope.txt' does not exist"):
        fd.load_dataset("data/nope.txt", data_dir=tmp_path)  # a path, not an unknown name
    with pytest.raises(TypeError, match="mappings like {'text': '...'}; the first one is a str"):
        fd.lm_pipeline(["some text", "more"], fd.ByteTokenizer(), batch_size=2, max_len=8)
    # Sizes that passed construction and failed at the first batch (a float), or took another
    # meaning (max_target_len=0: the source's; a negative bucket: ignored).
    tok, rows = fd.ByteTokenizer(), [{"text": "abc"}]
    for kw, name in ((dict(batch_size=2.0), "batch_size=2.0"), (dict(max_len=8.0), "max_len=8.0"),
                     (dict(pack=False, bucket_boundaries=(-3, 4)), "bucket_boundaries entry=-3"),
                     (dict(pack=False, bucket_window=True), "bucket_window=True")):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            fd.lm_pipeline(rows, tok, **{"batch_size": 2, "max_len": 8, **kw})
    with pytest.raises(ValueError, match="max_target_len=0 must be a whole number >= 2"):
        fd.translation_pipeline([{"inputs": "a", "targets": "b"}], tok, batch_size=2,
                                max_source_len=8, max_target_len=0)
    good = _write(tmp_path / "good.txt", _text(1, 20))
    with pytest.raises(ValueError, match=r"options \['unitt'\] .* it takes \[.*'unit'"):
        fd.load_dataset(good, data_dir=tmp_path, unitt="document")
    with pytest.raises(ValueError, match=r"options \['num_trian'\]"):
        fd.load_dataset("synthetic/copy", data_dir=tmp_path, num_trian=5)
    with pytest.raises(ValueError, match="unit must be one of"):
        fd.load_text_corpus(good, unit="sentence", data_dir=tmp_path)
    ds = fd.load_text_corpus(good, data_dir=tmp_path)
    with pytest.raises(ValueError, match="has no split 'test'"):
        ds.split("test")
    with pytest.raises(RuntimeError, match="not prepared"):  # catalog data, not downloaded
        fd.load_catalog("tiny_shakespeare", data_dir=tmp_path / "empty_catalog")


def _fake_catalog_source(builder, split, **kwargs):
    """Stands in for the prepared array_record data of a catalog dataset (TFDS's own random
    mock data lacks a working batched read)."""
    del kwargs
    if builder.name.startswith("wmt"):
        return [{"de": f"Satz {i} ({split})".encode(), "en": f"sentence {i} ({split})".encode()}
                for i in range(6)]
    lines = [f"line {i} of {builder.name} ({split})\n" for i in range(6)]
    if builder.name == "tiny_shakespeare":  # as TFDS stores it: one example per split
        return [{"text": "\n".join(lines).encode()}]
    return [{"text": line.encode()} for line in lines]  # lm1b: one sentence per example


@pytest.mark.parametrize("name", fd.CATALOG_NAMES)
def test_catalog_names_through_tfds_mock(tmp_path, name):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=_fake_catalog_source):
        ds = fd.load_dataset(name, data_dir=tmp_path)
        assert set(ds.splits) >= {"train", "test"} and len(ds.split("train")) == 6
        tok = fd.ByteTokenizer()
        if ds.kind == "text":
            # tiny_shakespeare's one example is split into its paragraphs.
            assert ds.split("test")[2]["text"].strip() == f"line 2 of {name} (test)"
            pipe = fd.lm_pipeline(ds, tok, batch_size=2, max_len=32, num_epochs=1,
                                  shuffle=False, pack=False)
            first = "line 0 of " + name
        else:  # de-en: German source, English target
            assert ds.split("test")[2] == {"inputs": "Satz 2 (test)",
                                           "targets": "sentence 2 (test)"}
            # One language given: the other is the pair's other one.
            en_de = fd.load_dataset(name, data_dir=tmp_path / "en_de", source_lang="en")
            assert en_de.split("test")[2] == {"inputs": "sentence 2 (test)",
                                              "targets": "Satz 2 (test)"}
            assert fd.load_dataset(name, data_dir=tmp_path / "de_en", target_lang="en").split(
                "test")[2] == ds.split("test")[2]
            pipe = fd.translation_pipeline(ds, tok, batch_size=2, max_source_len=32,
                                           num_epochs=1, shuffle=False, pack=False)
            first = "sentence 0 (train)"
        batch = next(iter(pipe))
    assert batch["inputs"].shape == (2, 32) and batch["inputs"].dtype == np.int32
    assert tok.decode(batch["targets"][0]).startswith(first)


# --------------------------------------------------------------------------------------------
# Pipelines: determinism, resume, packing


def test_determinism_across_runs(text_ds, char_tok):
    def run(seed):
        pipe = fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32, seed=seed)
        return _take(iter(pipe), 4)

    assert _same(run(0), run(0))
    assert not _same(run(0), run(1))


@pytest.mark.parametrize("kind", ["lm_packed", "lm_buckets", "translation_packed", "mlm",
                                  "windows", "windows_prefetch"])
def test_resume_mid_epoch_gives_same_batches(text_ds, parallel_ds, char_tok, kind):
    mlm_tok = fd.CharTokenizer(char_tok.chars, reserve_mask=True)
    make = {
        "lm_packed": lambda: fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32),
        "lm_buckets": lambda: fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32,
                                            pack=False, bucket_boundaries=(8, 16),
                                            bucket_window=3),
        "translation_packed": lambda: fd.translation_pipeline(
            parallel_ds, parallel_ds.tokenizer("char"), batch_size=4, max_source_len=32),
        "mlm": lambda: fd.mlm_pipeline(text_ds, mlm_tok, batch_size=4, max_len=32),
        "windows": lambda: fd.window_pipeline(char_tok.encode(text_ds.full_text()),
                                             batch_size=4, seq_len=16),
        "windows_prefetch": lambda: fd.window_pipeline(char_tok.encode(text_ds.full_text()),
                                                      batch_size=4, seq_len=16, prefetch=2),
    }[kind]
    it = iter(make())
    steps = 40  # several epochs of the tiny corpus: resuming crosses epoch boundaries
    reference = _take(it, steps)
    for k in (1, 7, 23):
        it = iter(make())
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
        resumed = iter(make())
        resumed.set_state(state)
        assert _same(_take(resumed, steps - k), reference[k:]), f"resume after {k}"


@pytest.mark.parametrize("pack", [True, False])
def test_an_iterator_already_used_resumes_exactly(text_ds, char_tok, pack):
    # The state of a finished epoch restored on an iterator that had run (to its end, or
    # partly) used to replay the last group of examples read.
    def make():
        return iter(fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32, num_epochs=1,
                                   shuffle=False, prefetch=0, pack=pack))

    it = make()
    batches = list(it)
    end = json.loads(json.dumps(it.get_state()))
    for used in (len(batches), 2):
        again = make()
        _take(again, used)
        again.set_state(end)
        assert list(again) == []
    middle = make()
    _take(middle, 3)
    mid_state, rest = middle.get_state(), list(middle)
    middle.set_state(mid_state)  # back to the middle of an iterator that reached its end
    assert _same(list(middle), rest)


def _segments(row_seg):
    return [int(s) for s in np.unique(row_seg) if s != 0]


def test_packed_batches_well_formed(text_ds, char_tok):
    pipe = fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32, num_epochs=1, seed=5)
    seen = []
    for batch in pipe:
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
        assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in batch.values())
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            inp, tgt = batch["inputs"][row], batch["targets"][row]
            pad = seg == 0
            assert (inp[pad] == 0).all() and (tgt[pad] == 0).all() and (pos[pad] == 0).all()
            ids = _segments(seg)
            assert ids == list(range(1, len(ids) + 1))  # 1, 2, ... in order
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()  # contiguous
                assert (pos[where] == np.arange(len(where))).all()  # restart at 0
                assert inp[where[0]] == fd.BOS_ID and (inp[where[1:]] == tgt[where[:-1]]).all()
                seen.append(char_tok.decode(tgt[where]))
    # one epoch: every example exactly once, longer ones cut to their first max_len targets
    texts = [ex["text"].strip("\n") for ex in text_ds.split("train")]
    assert sorted(seen) == sorted(t[:32] for t in texts)
    assert pipe.stats.truncated == sum(len(t) + 2 > 33 for t in texts) > 0


def test_packer_matches_grain_first_fit():
    """The library's packer is grain's first-fit algorithm, only cheaper: same rows."""
    from flaxformer_lite.data.pipeline import _PackDataset

    rng = np.random.default_rng(0)
    examples = [{"inputs": rng.integers(5, 99, size=rng.integers(1, 20)).astype(np.int32),
                 "targets": rng.integers(5, 99, size=rng.integers(1, 20)).astype(np.int32)}
                for _ in range(300)]
    lengths = {"inputs": 32, "targets": 24}
    source = grain.MapDataset.source(examples)
    want = list(grain.experimental.FirstFitPackIterDataset(
        source.to_iter_dataset(), length_struct=lengths, num_packing_bins=8,
        shuffle_bins=False))
    got = list(_PackDataset(source.to_iter_dataset(), lengths=lengths, num_bins=8, seed=0,
                            shuffle=False, rename={}))
    assert len(got) == len(want) > 40 and _same(got, want)


def test_truncation_is_counted(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("flaxformer_lite.data.pipeline._TRUNCATION_WARNED", set())
    lines = ["short", "x" * 50, "y" * 12, "z" * 31, "w" * 30]
    ds = fd.in_memory_dataset({"train": [{"text": t} for t in lines]}, kind="text")
    tok = fd.ByteTokenizer()

    def build():
        return fd.lm_pipeline(ds, tok, batch_size=1, max_len=31, pack=False, num_epochs=1,
                              shuffle=False, prefetch=0)

    with caplog.at_level("WARNING"):
        pipe = build()
        out = list(pipe)
        list(build())  # a script's eval pipeline, built anew at each evaluation
    assert caplog.text.count("was truncated") == 1  # warned once a process, not per pipeline
    # [BOS] + text + [EOS] holds len + 2 tokens; max_len + 1 = 32 fit
    assert pipe.stats.truncated == sum(len(t) + 2 > 32 for t in lines) == 2
    assert pipe.stats.tokens_dropped == (50 + 2 - 32) + (31 + 2 - 32)
    assert tok.decode(out[1]["targets"][0]) == "x" * 31  # first max_len targets, no EOS


def test_padded_buckets_and_final_batch(text_ds, char_tok):
    pipe = fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32, pack=False,
                         bucket_boundaries=(8, 16), num_epochs=1, shuffle=False)
    batches = list(pipe)
    widths = {b["inputs"].shape[1] for b in batches}
    assert widths <= {8, 16, 32} and len(widths) > 1
    rows = [r for b in batches for r, t in zip(b["inputs"], b["targets"]) if t.any()]
    assert len(rows) == len(text_ds.split("train"))  # the last batch is padded, not dropped
    for b in batches:
        lengths = (b["targets"] != 0).sum(1)
        width = b["inputs"].shape[1]
        assert lengths.max() <= width and (width == 8 or lengths.max() > width // 2)


def test_process_shards_are_disjoint_and_complete(parallel_ds):
    tok = parallel_ds.tokenizer("char")
    seen = []
    for index in range(2):
        pipe = fd.translation_pipeline(parallel_ds, tok, batch_size=4, max_source_len=48,
                                      pack=False, shuffle=False, num_epochs=1,
                                      shard=(index, 2))
        assert pipe.local_batch_size == 2
        part = [tok.decode(r) for b in pipe for r in b["inputs"] if r.any()]
        seen.append(part)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ex["inputs"] for ex in parallel_ds.split("train"))


def test_window_sampler(char_tok, text_ds):
    tokens = np.asarray(char_tok.encode(text_ds.full_text()), np.int32)
    pipe = fd.window_pipeline(tokens, batch_size=4, seq_len=16, seed=3)
    b = next(iter(pipe))
    assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
    for x, y in zip(b["inputs"], b["targets"]):  # each row is a contiguous slice
        starts = [s for s in range(len(tokens) - 16) if (tokens[s:s + 16] == x).all()]
        assert any((tokens[s + 1:s + 17] == y).all() for s in starts)
    # the global batch does not depend on the number of processes
    halves = [next(iter(fd.window_pipeline(tokens, batch_size=4, seq_len=16, seed=3,
                                          shard=(i, 2)))) for i in range(2)]
    assert _same([b], [{k: np.concatenate([h[k] for h in halves]) for k in b}])
    with pytest.raises(ValueError, match="holds id 0 at index 3; .* id 0 is padding"):
        fd.window_pipeline(np.array([5, 6, 7, 0, 8]), batch_size=1, seq_len=2)
    # sequential windows cover every target exactly once
    seq = list(fd.window_pipeline(tokens, batch_size=3, seq_len=16, random=False))
    targets = np.concatenate([t for s in seq for t in s["targets"]])
    assert (targets[: len(tokens) - 1] == tokens[1:]).all() and not targets[len(tokens):].any()


def test_sequential_windows_without_a_padding_id_mark_their_tokens():
    """pad_id=None (GPT-2's vocabulary, where 0 is a token): id 0 is read as a token, and the
    padded windows carry segment_ids, so a pad_id=None model scores exactly the stream's
    targets (it scored the padding too: 128 targets for 99)."""
    from flaxformer_lite import evaluation, get_config, make_model
    from flaxformer_lite.models import init_params

    tokens = np.random.default_rng(0).integers(0, 32, 100).astype(np.int32)
    tokens[[3, 50]] = 0
    seq = list(fd.window_pipeline(tokens, batch_size=3, seq_len=16, random=False, pad_id=None))
    real = np.concatenate([b["segment_ids"] for b in seq]).astype(bool)
    assert real.sum() == len(tokens) - 1
    assert (np.concatenate([b["targets"] for b in seq])[real] == tokens[1:]).all()
    assert (np.concatenate([b["inputs"] for b in seq])[real] == tokens[:-1]).all()
    cfg = get_config("gpt2", vocab_size=32, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                     max_len=16, pad_id=None)
    model = make_model(cfg)
    params = init_params(cfg, jax.random.key(0))
    out = evaluation.perplexity(model, params, seq)
    assert out["tokens"] == len(tokens) - 1
    logits = np.asarray(model.apply({"params": params}, tokens[None, :16]), np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    first = -logp[np.arange(16), tokens[1:17]].sum()
    np.testing.assert_allclose(
        np.asarray(evaluation.token_nll(model, params, seq[0])[0])[0].sum(), first, rtol=1e-5)
    with pytest.raises(ValueError, match="holds id 7 at index 0; .*id 7 is padding"):
        fd.window_pipeline(np.array([7, 6, 5, 4]), batch_size=1, seq_len=2, pad_id=7)


def test_mlm_masking():
    rng = np.random.default_rng(0)
    ids = np.concatenate([[fd.BOS_ID], rng.integers(5, 60, size=4000), [fd.EOS_ID]]).astype(
        np.int32)
    inputs, targets = fd.mask_tokens(ids, rng, vocab_size=60, first_real_id=5)
    chosen = targets != 0
    assert (targets[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    assert not chosen[0] and not chosen[-1]  # specials are never selected
    assert abs(chosen.mean() - 0.15) < 0.01
    masked = (inputs[chosen] == fd.MASK_ID).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    assert abs(masked - 0.8) < 0.04 and 0.06 < kept < 0.16
    assert ((inputs >= 5) | (inputs <= fd.MASK_ID)).all()


def test_mlm_masks_belong_to_the_example_not_to_the_process(text_ds, char_tok):
    """Each example's masks are the same on one process or two (so processes do not repeat
    one another's masks), and differ between epochs."""
    tok = fd.CharTokenizer(char_tok.chars, reserve_mask=True)

    def masks(shard, epochs=1):
        pipe = fd.mlm_pipeline(text_ds, tok, batch_size=4, max_len=48, seed=4, pack=False,
                               shuffle=False, num_epochs=epochs, shard=shard)
        out: dict[tuple, list] = {}
        for b in pipe:
            for x, t in zip(b["inputs"], b["targets"]):
                if x.any():
                    original = tuple(np.where(t != 0, t, x)[:np.count_nonzero(x)])
                    out.setdefault(original, []).append(tuple(x))
        return out

    one, two = masks((0, 1)), masks((0, 2))
    for key, value in masks((1, 2)).items():
        two.setdefault(key, []).extend(value)
    assert len(one) > 8 and {k: sorted(v) for k, v in one.items()} == {
        k: sorted(v) for k, v in two.items()}
    twice = masks((0, 1), epochs=2)
    pairs = [(v[0], v[1]) for k, v in twice.items() if len(one[k]) == 1]
    assert len(pairs) > 8 and sum(a != b for a, b in pairs) > len(pairs) // 2  # fresh masks


def test_prefetch_to_device_keeps_checkpoint_position(text_ds, char_tok):
    pipe = fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32)
    reference = _take(iter(pipe), 6)
    it = pipe.iterator(device_prefetch=2)
    first = _take(it, 3)
    assert isinstance(first[0]["inputs"], jax.Array)
    assert _same([jax.device_get(b) for b in first], reference[:3])
    resumed = iter(pipe)
    resumed.set_state(it.get_state())  # the queued batches are not skipped
    assert _same(_take(resumed, 3), reference[3:])


_SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import numpy as np
from flaxformer_lite import data as fd

mesh = jax.make_mesh((8,), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
tokens = (np.arange(1000) * 7 % 90 + 5).astype(np.int32)
pipe = fd.window_pipeline(tokens, batch_size=16, seq_len=8, seed=0)
plain = iter(pipe)
on_devices = pipe.iterator(device_prefetch=2, sharding=sharding)
for _ in range(3):
    want, got = next(plain), next(on_devices)
    for k in want:
        assert got[k].sharding.is_equivalent_to(sharding, 2), got[k].sharding
        assert len({s.device for s in got[k].addressable_shards}) == 8
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])
print("ok")
"""


def test_prefetch_to_device_shards_the_global_batch(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The key check: attention never crosses a packed segment


def _alone(rows, length=32, batch=4):
    """Each example at the start of its own zero-padded row, in groups of `batch` rows."""
    n = -(-len(rows) // batch) * batch
    out = np.zeros((n, length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.reshape(n // batch, batch, length)


def _single(ids):
    """Segment ids and positions of rows holding one example each (as the model derives them
    for an unpacked batch: segment 1 where ids != 0, positions 0, 1, ...)."""
    return (ids != 0).astype(np.int32), np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)


def _assert_multi_segment(seg):
    assert max(len(_segments(r)) for r in seg) >= 2, "the test needs rows with 2+ examples"


def _forward(preset, vocab_size, *args, **overrides):
    """A tiny model's jitted forward pass `fn(*args, **kwargs) -> outputs` (`args` shows the
    input shapes). Parameters are random, drawn in NumPy with the shapes `jax.eval_shape`
    gives (compiling the initialisers costs several times the forward pass); norm scales
    stay near 1. One compilation serves packed and single-example rows alike."""
    cfg = ffl.get_config(preset, vocab_size=vocab_size, d_model=32, num_heads=4, d_ff=64,
                         num_layers=2, max_len=32, dropout_rate=0.0, **overrides)
    model = ffl.make_model(cfg)
    shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
    rng = np.random.default_rng(0)
    params = jax.tree.map_with_path(
        lambda path, s: (getattr(path[-1], "key", "") == "scale") + rng.normal(
            0.0, 0.3, s.shape).astype(s.dtype), shapes)
    apply = jax.jit(lambda *a, **k: model.apply(params, *a, **k))

    def fn(*a, **k):
        out = apply(*a, **k)
        return np.asarray(out["hidden"] if isinstance(out, dict) else out)

    return fn


def test_packed_lm_rows_equal_examples_alone(text_ds, char_tok):
    batch = next(iter(fd.lm_pipeline(text_ds, char_tok, batch_size=4, max_len=32, seed=2)))
    seg, pos = batch["segment_ids"], batch["positions"]
    _assert_multi_segment(seg)
    forward = _forward("gpt2", char_tok.vocab_size, batch["inputs"])
    packed = forward(batch["inputs"], segment_ids=seg, positions=pos)
    where = [(r, np.flatnonzero(seg[r] == s)) for r in range(4) for s in _segments(seg[r])]
    alone = np.concatenate([forward(x, segment_ids=_single(x)[0], positions=_single(x)[1])
                            for x in _alone([batch["inputs"][r, w] for r, w in where])])
    for i, (r, w) in enumerate(where):
        np.testing.assert_allclose(packed[r, w], alone[i, :len(w)], rtol=1e-5, atol=1e-5)
    # control: read as one sequence per row, the later examples see the earlier ones
    leaky = forward(batch["inputs"], segment_ids=_single(batch["inputs"])[0],
                    positions=_single(batch["inputs"])[1])
    later = [i for i, (r, w) in enumerate(where) if seg[r, w[0]] >= 2]
    r, w = where[later[0]]
    assert not np.allclose(leaky[r, w], alone[later[0], :len(w)], atol=1e-4)


@pytest.mark.parametrize("preset", ["transformer-base", "t5-small"])
def test_packed_translation_rows_equal_examples_alone(parallel_ds, preset):
    tok = parallel_ds.tokenizer("char")
    batch = next(iter(fd.translation_pipeline(parallel_ds, tok, batch_size=4, max_source_len=32,
                                              seed=1)))
    iseg, tseg = batch["inputs_segment_ids"], batch["targets_segment_ids"]
    _assert_multi_segment(tseg)
    assert all(_segments(a) == _segments(b) for a, b in zip(iseg, tseg))  # aligned pairs
    forward = _forward(preset, tok.vocab_size, batch["inputs"], batch["targets"],
                       **({"head_dim": 8} if preset == "t5-small" else {}))
    packed = forward(batch["inputs"], batch["targets"], inputs_segment_ids=iseg,
                     targets_segment_ids=tseg, inputs_positions=batch["inputs_positions"],
                     targets_positions=batch["targets_positions"])
    pairs = [(r, np.flatnonzero(iseg[r] == s), np.flatnonzero(tseg[r] == s))
             for r in range(4) for s in _segments(tseg[r])]
    sources = _alone([batch["inputs"][r, a] for r, a, _ in pairs])
    targets = _alone([batch["targets"][r, b] for r, _, b in pairs])
    alone = np.concatenate([
        forward(x, y, inputs_segment_ids=_single(x)[0], targets_segment_ids=_single(y)[0],
                inputs_positions=_single(x)[1], targets_positions=_single(y)[1])
        for x, y in zip(sources, targets)])
    for i, (r, _, b) in enumerate(pairs):
        np.testing.assert_allclose(packed[r, b], alone[i, :len(b)], rtol=1e-5, atol=1e-5)


def test_packed_mlm_rows_equal_examples_alone(text_ds, char_tok):
    tok = fd.CharTokenizer(char_tok.chars, reserve_mask=True)
    batch = next(iter(fd.mlm_pipeline(text_ds, tok, batch_size=4, max_len=32, seed=4)))
    seg, pos = batch["segment_ids"], batch["positions"]
    _assert_multi_segment(seg)
    chosen = batch["targets"] != 0
    assert (seg[chosen] != 0).all() and ((batch["inputs"] == fd.MASK_ID) <= chosen).all()
    forward = _forward("bert-base", tok.vocab_size, batch["inputs"])
    packed = forward(batch["inputs"], segment_ids=seg, positions=pos)
    where = [(r, np.flatnonzero(seg[r] == s)) for r in range(4) for s in _segments(seg[r])]
    alone = np.concatenate([forward(x, segment_ids=_single(x)[0], positions=_single(x)[1])
                            for x in _alone([batch["inputs"][r, w] for r, w in where])])
    for i, (r, w) in enumerate(where):
        np.testing.assert_allclose(packed[r, w], alone[i, :len(w)], rtol=1e-5, atol=1e-5)


def test_mlm_max_predictions_gives_back_the_excess_selections(text_ds, char_tok):
    """`max_predictions=k`: each row keeps at most k selections; the others are ordinary
    tokens again (original id in `inputs`, no target), everything else as without the cap."""
    tok = fd.CharTokenizer(char_tok.chars, reserve_mask=True)

    def first_batches(**kw):
        pipe = fd.mlm_pipeline(text_ds, tok, batch_size=4, max_len=48, seed=4, shuffle=False,
                               num_epochs=1, **kw)
        return [b for _, b in zip(range(3), pipe)], pipe.stats

    plain, _ = first_batches()
    capped, stats = first_batches(max_predictions=4)
    given_back = 0
    for a, b in zip(plain, capped, strict=True):
        before, after = a["targets"] != 0, b["targets"] != 0
        assert (after <= before).all() and (after.sum(-1) == np.minimum(before.sum(-1), 4)).all()
        undone = before & ~after
        np.testing.assert_array_equal(b["inputs"][undone], a["targets"][undone])
        np.testing.assert_array_equal(b["inputs"][~undone], a["inputs"][~undone])
        np.testing.assert_array_equal(b["targets"][after], a["targets"][after])
        given_back += int(undone.sum())
    assert given_back > 0 and stats.uncapped >= given_back  # read-ahead may count more
    with pytest.raises(ValueError, match="max_predictions=0"):
        fd.mlm_pipeline(text_ds, tok, batch_size=4, max_len=48, max_predictions=0)


def test_encode_masked_frames_masks_for_every_tokenizer(text_ds, char_tok):
    """"[MASK]" in text becomes MASK_ID for char/byte tokenizers too (they spelt it out), and
    SentencePiece's lone word-start piece before a mask is dropped (training masked whole
    "▁word" pieces)."""
    char = fd.CharTokenizer(char_tok.chars, reserve_mask=True)
    rows = fd.encode_masked(char, ["the [MASK]at", "[MASK]"], 16)
    assert rows.shape == (2, 16) and rows.dtype == np.int32
    assert rows[0, :9].tolist() == [fd.BOS_ID, *char.encode("the "), fd.MASK_ID,
                                    *char.encode("at"), fd.EOS_ID]
    assert rows[1, :3].tolist() == [fd.BOS_ID, fd.MASK_ID, fd.EOS_ID] and not rows[1, 3:].any()
    byte = fd.ByteTokenizer(reserve_mask=True)
    assert fd.MASK_ID in fd.encode_masked(byte, ["a [MASK] b"], 16)[0]
    sp = fd.train_sentencepiece(text_ds.texts("train"), 400, reserve_mask=True)
    plain = sp.encode("the [MASK] sat")
    assert sp.space_id in plain  # "▁", "[MASK]": what SentencePiece makes of the text
    framed = fd.encode_masked(sp, ["the [MASK] sat"], 16)[0]
    ids = framed[1:np.flatnonzero(framed == fd.EOS_ID)[0]].tolist()
    assert ids == [t for t in plain if t != sp.space_id] and ids.count(fd.MASK_ID) == 1
    with pytest.raises(ValueError, match="more than max_len=4"):
        fd.encode_masked(char, ["the [MASK]at"], 4)
    with pytest.raises(ValueError, match="reserved"):
        fd.encode_masked(char_tok, ["a [MASK]"], 8)


def test_encode_sources_frames_sources_as_training_does(parallel_ds):
    """Decoding must see sources framed like the training rows: stripped, EOS-terminated, cut
    keeping the EOS (a model trained so decoded unframed sources to nonsense)."""
    tok = parallel_ds.tokenizer("char")
    pipe = fd.translation_pipeline(parallel_ds, tok, batch_size=4, max_source_len=8,
                                   max_target_len=32, pack=False, shuffle=False, num_epochs=1)
    batch = next(iter(pipe))
    texts = [ex["inputs"] for ex in list(parallel_ds.split("train"))[:4]]
    np.testing.assert_array_equal(fd.encode_sources(tok, ["  " + t + "\n" for t in texts], 8),
                                  batch["inputs"])


def test_a_folder_of_split_named_files_is_split_by_name(tmp_path, caplog, monkeypatch):
    """wiki.train.txt / wiki.valid.txt / wiki.test.txt used to be joined into one corpus in
    name order: the test text trained, and validation was the corpus's last tenth."""
    folder = tmp_path / "wiki"
    folder.mkdir()
    texts = {"train": "train text one.\n\ntrain text two.\n",
             "valid": "validation text.\n", "test": "test text, never trained on.\n"}
    for split, text in texts.items():
        _write(folder / f"wiki.{split}.txt", text)
    with caplog.at_level("WARNING"):
        ds = fd.load_text_corpus(folder, data_dir=tmp_path / "tfds")
    assert "wiki.test.txt" in caplog.text
    assert ds.full_text("train") == texts["train"]
    assert ds.full_text("validation") == texts["valid"]
    # Named through "~", or with its validation file given: the validation and test files were
    # joined into the train split.
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in ({}, {"validation_files": folder / "wiki.valid.txt"}):
        again = fd.load_text_corpus("~/wiki", data_dir=tmp_path / "tfds", **given)
        assert again.full_text("train") == texts["train"], given
        assert again.full_text("validation") == texts["valid"], given
    with pytest.raises(ValueError, match=r"\['wiki.valid.txt'\] are given as training files "
                       "and as validation_files"):
        fd.load_text_corpus([folder / "wiki.train.txt", folder / "wiki.valid.txt"],
                            validation_files=folder / "wiki.valid.txt")
    _write(folder / "README", "about the data\n")
    with pytest.raises(ValueError, match=r"named by split .*\['README'\] name none"):
        fd.load_text_corpus(folder, data_dir=tmp_path / "tfds")
    pairs = tmp_path / "pairs"  # Multi30k's layout, loaded without kind="translation"
    pairs.mkdir()
    for name in ("train.de", "train.en", "val.de", "val.en"):
        _write(pairs / name, "ein satz\n")
    with pytest.raises(ValueError, match="a parallel corpus, not one text.*kind='translation'"):
        fd.load_text_corpus(pairs, data_dir=tmp_path / "tfds")


def test_in_memory_tokenizers_are_cached_per_examples(tmp_path):
    """The cache was named by kind alone: other records with the same cache_dir silently got
    the first records' alphabet (their letters encoded as UNK)."""
    first = fd.in_memory_dataset({"train": [{"text": "abc"}]}, kind="text", cache_dir=tmp_path)
    assert first.tokenizer("char").decode(first.tokenizer("char").encode("abc")) == "abc"
    other = fd.in_memory_dataset({"train": [{"text": "ZQ"}]}, kind="text", cache_dir=tmp_path)
    tok = other.tokenizer("char")
    assert tok.decode(tok.encode("ZQ")) == "ZQ" and fd.UNK_ID not in tok.encode("ZQ")
    with pytest.raises(ValueError, match=r"example 1 of split 'train': 'text' is NoneType"):
        fd.in_memory_dataset({"train": [{"text": "a"}, {"text": None}]}, kind="text")


def test_lines_of_spaces_or_tabs_end_paragraphs():
    """A blank line holding spaces or a tab did not end a paragraph: 200 paragraphs separated
    so became one example, which the pipelines then truncated."""
    text = "one\n \ntwo\n\t\nthree\n\n  \nfour"
    units = fd.split_units(text, "paragraph")
    assert units == ["one\n \n", "two\n\t\n", "three\n\n  \n", "four"]
    assert "".join(units) == text


def test_bring_your_own_data_errors_name_the_fix(tmp_path):
    """A char tokenizer saved under a name without .json loaded as SentencePiece (INTERNAL
    error); float ids were floored and ids past int32 wrapped; a file given as a parallel
    folder was "a folder that does not exist"."""
    tok = fd.CharTokenizer.from_texts(["abc"])
    tok.save(tmp_path / "tokenizer")
    assert fd.load_tokenizer(tmp_path / "tokenizer").encode("cab") == tok.encode("cab")
    _write(tmp_path / "junk.model", "not a model")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor"):
        fd.load_tokenizer(tmp_path / "junk.model")
    for ids in (np.full(100, 5.7), np.full(100, 2 ** 31, np.int64)):
        with pytest.raises(ValueError, match="integer ids below 2\\*\\*31"):
            fd.window_pipeline(ids, batch_size=2, seq_len=4)
    src = _write(tmp_path / "train.de", "eins\n")
    with pytest.raises(ValueError, match="is a file; a parallel corpus is a folder"):
        fd.load_parallel_corpus(src, source_lang="de", target_lang="en")
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    files = {"test": (_write(held_out / "test.de", "eins\n"), _write(held_out / "test.en",
                                                                      "one\n"))}
    with pytest.raises(ValueError, match=r"no 'train.de' / 'train.en' pair.*loads as "
                       r"\{split: \(source_file, target_file\)\}"):
        fd.load_parallel_corpus(held_out, source_lang="de", target_lang="en")
    assert len(fd.load_parallel_corpus(files, data_dir=tmp_path / "prep").split("test")) == 1


def test_encode_sources_refuses_a_string_and_reports_cuts(caplog):
    tok = fd.CharTokenizer.from_texts(["abcdef"])
    with pytest.raises(TypeError, match="a list of sentences"):
        fd.encode_sources(tok, "abc", 8)
    with pytest.raises(ValueError, match="max_len=0"):
        fd.encode_sources(tok, ["abc"], 0)
    with caplog.at_level("WARNING"):
        rows = fd.encode_sources(tok, ["abcdef", "ab"], 4)
    assert "1 of 2 sources are longer than max_len=4" in caplog.text
    assert rows.tolist() == [tok.encode("abc") + [fd.EOS_ID], tok.encode("ab") + [fd.EOS_ID, 0]]
    # A generator is a list of sentences too; a line that is no string is named.
    np.testing.assert_array_equal(fd.encode_sources(tok, (t for t in ["abcdef", "ab"]), 4), rows)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, not a string"):
        fd.encode_sources(tok, ["ab", None], 4)
    caplog.clear()
    with caplog.at_level("WARNING"):
        blank = fd.encode_sources(tok, ["ab", "  ", ""], 4)
    assert "source(s) [1, 2] are empty" in caplog.text
    assert blank[1].tolist() == [fd.EOS_ID, 0, 0, 0]


# ---- one global order, whatever the number of processes -----------------------------------

_IDS = [{"text": f"x{i:03d}"} for i in range(48)]


def _ids_of(batch):
    """The ids of the examples in a batch of `_IDS` rows (packed or padded)."""
    tok = fd.ByteTokenizer()
    inputs = np.asarray(batch["inputs"])
    segments = batch.get("segment_ids", (inputs > 0).astype(np.int32))
    out = []
    for row, seg in zip(inputs, np.asarray(segments)):
        for s in np.unique(seg[seg > 0]):
            out.append(int(tok.decode([int(t) for t in row[seg == s][2:5]])))
    return out


def _ids_pipe(batch_size, shard, pack=False, **kw):
    return fd.lm_pipeline(_IDS, fd.ByteTokenizer(), batch_size=batch_size,
                          max_len=16 if pack else 8, pack=pack, shard=shard, seed=3,
                          num_packing_bins=4, **kw)


def test_global_batches_do_not_depend_on_the_process_count():
    """Process i of n takes rows i*L..(i+1)*L-1 of each global batch of the one global order:
    1 and 2 processes train on the same global batches, each epoch holds every example
    once, and the processes' shares are not fixed neighbours (one permutation per shard
    used to put examples 2j and 2j+1 in the same step of every epoch)."""
    one = iter(_ids_pipe(8, (0, 1)))
    two = [iter(_ids_pipe(8, (i, 2))) for i in range(2)]
    epochs = [[], []]
    neighbours = rows = 0
    for step in range(12):  # two epochs of 48 examples
        a, b = (_ids_of(next(it)) for it in two)
        assert _ids_of(next(one)) == a + b, step
        epochs[step // 6] += a + b
        neighbours += sum(y == x + 1 for x, y in zip(a, b))
        rows += len(a)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(48))
    assert epochs[0] != epochs[1] and neighbours < rows // 2


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("before,after", [((8, 2), (8, 1)), ((8, 1), (8, 2)),
                                          ((8, 2), (4, 1)), ((4, 1), (8, 2))])
def test_resume_under_another_process_count_or_batch(pack, before, after):
    """The states of every process of a run restore into a pipeline of another process count
    and batch size: over the run's 3 epochs every example is trained 3 times, neither more
    nor less; unpacked, the batches are those of an uninterrupted run."""
    (b0, n0), (b1, n1) = before, after
    old = [iter(_ids_pipe(b0, (i, n0), pack, num_epochs=3)) for i in range(n0)]
    seen = []
    for _ in range(5 if b0 == 4 else 3):
        for it in old:
            seen += _ids_of(next(it))
    states = json.loads(json.dumps({"processes": [it.get_state() for it in old]}))
    new = [iter(_ids_pipe(b1, (i, n1), pack, num_epochs=3)) for i in range(n1)]
    for it in new:
        it.set_state(states)
    rest, alive = [], list(new)
    while alive:  # step by step, process by process: the global order when unpacked
        for it in list(alive):
            batch = next(it, None)
            if batch is None:
                alive.remove(it)
            else:
                rest += _ids_of(batch)
    assert sorted(seen + rest) == sorted(list(range(48)) * 3)
    if not pack:  # the same examples, batch by batch, as one process uninterrupted
        assert seen + rest == sum((_ids_of(b) for b in _ids_pipe(8, (0, 1), num_epochs=3)),
                                  [])


@pytest.mark.parametrize("pack_before", [False, True])
def test_resume_with_packing_switched_converts_the_position(pack_before, caplog):
    """A state of a packed pipeline restored into an unpacked one of the same layout (or back)
    failed in a bare KeyError; it converts by the examples consumed: each trained once."""
    old = iter(_ids_pipe(8, (0, 1), pack_before, num_epochs=1))
    seen = _ids_of(next(old)) + _ids_of(next(old))
    new = iter(_ids_pipe(8, (0, 1), not pack_before, num_epochs=1))
    new.set_state(json.loads(json.dumps(old.get_state())))
    rest = [i for batch in new for i in _ids_of(batch)]
    assert sorted(seen + rest) == list(range(48))


def test_a_state_over_other_data_is_named(caplog):
    """Resumed over a changed corpus (48 -> 40 examples) under the same layout the positions
    name other examples: said, not silent (under another layout, refused)."""
    it = iter(_ids_pipe(8, (0, 1)))
    next(it)
    fewer = fd.lm_pipeline(_IDS[:40], fd.ByteTokenizer(), batch_size=8, max_len=8, seed=3,
                           pack=False)
    with caplog.at_level("WARNING", logger="flaxformer_lite.data.pipeline"):
        iter(fewer).set_state(it.get_state())
    assert "saved over 48 examples; this pipeline has 40: the data changed" in caplog.text
    with pytest.raises(ValueError, match="saved over 48 examples; this pipeline has 40"):
        iter(fd.lm_pipeline(_IDS[:40], fd.ByteTokenizer(), batch_size=4, max_len=8,
                            seed=3, pack=False)).set_state(it.get_state())


def test_one_process_state_of_a_multi_process_run_is_refused_elsewhere():
    it = iter(_ids_pipe(8, (0, 2)))
    next(it)
    with pytest.raises(ValueError, match=r"process 0's of 2 .*needs every process's state"):
        iter(_ids_pipe(8, (0, 1))).set_state(it.get_state())
    same = iter(_ids_pipe(8, (0, 2)))  # its own layout restores as before
    same.set_state(it.get_state())
    assert _same([next(same)], [next(it)])


def test_window_state_restores_under_another_batch_size():
    tokens = np.arange(1, 200, dtype=np.int32)
    it = iter(fd.window_pipeline(tokens, batch_size=4, seq_len=7, random=False, shard=(1, 2)))
    for _ in range(2):
        next(it)
    state = {"processes": [it.get_state()]}
    resumed = iter(fd.window_pipeline(tokens, batch_size=8, seq_len=7, random=False))
    resumed.set_state(state)  # 8 windows read: the next batch of 8 is the second
    assert (next(resumed)["inputs"][0] == tokens[8 * 7:8 * 7 + 7]).all()
    with pytest.raises(ValueError, match="global batch 3 does not divide"):
        iter(fd.window_pipeline(tokens, batch_size=3, seq_len=7, random=False)).set_state(
            state)
