"""Suite-wide settings and fixtures."""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests check what XLA computes, not how fast the code it emits runs, and they compile
# hundreds of small programs. LLVM's optimizations are ~70% of each XLA:CPU compile (a 2-layer
# train step: 10.4 s, 2.95 s without) and change only the machine code: the optimized HLO is the
# same, results agree to float rounding. So the suite, and the scripts it starts (they inherit
# the environment), compile at backend optimization level 0, unless XLA_FLAGS already sets one.
# Set before JAX creates its backend; subprocesses that set their own device count append it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()


@pytest.fixture(scope="session")
def load_script():
    """`load_script("experiments/benchmark.py")`: a repository script imported as a module (its
    `main` not run), with the repository root on `sys.path` while it imports, as when run."""

    def load(path: str):
        spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ROOT))
        return module

    return load


@pytest.fixture(scope="session", autouse=True)
def full_precision_float32_matmuls():
    """Float32 matmuls at full precision on accelerators.

    The tests compare against float64 NumPy references with tolerances for float32 arithmetic.
    JAX's default precision on NVIDIA GPUs multiplies float32 in TF32 (and on TPUs in bfloat16
    passes), which misses them by ~1e-3 for reasons that are not the library's. CPUs already
    compute float32 dots in float32; there nothing changes.
    """
    if jax.default_backend() == "cpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|"""
                r"""\s+""")
GPT2_TRAINING_WORDS = (
    "the quick brown fox jumps over lazy dog it's we've they're I'm you'll she'd 2024 3.14 "
    "100,000 café naïve Zürich Ünïcödé 日本語 東京 Привет мир 😀 🎉 👍🏽 <|endoftext|> (x) "
    "[y] {z} a-b c_d e/f  \t\n").split(" ")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (its encoder.py), in GPT-2's id order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="session")
def gpt2_vocab(tmp_path_factory):
    """A small byte-level BPE vocabulary in GPT-2's layout and its independent reference.

    Hugging Face's trainer learns ~150 merges on a few KB of text; the folder then holds
    GPT-2's `vocab.json` (the 256 byte characters in GPT-2's order, "!" = 0, then one piece
    per merge in merge order, "<|endoftext|>" last) and `merges.txt`. The reference is a
    tiktoken `Encoding` made from the same vocabulary as byte-string ranks with GPT-2's regex:
    it never reads merges.txt. Returns `(folder, vocab, encoding)`."""
    import json

    import numpy as np
    import tiktoken
    from tokenizers import ByteLevelBPETokenizer

    rng = np.random.default_rng(0)
    lines = ["".join(w + (" " if rng.random() < 0.8 else "")
                     for w in rng.choice(GPT2_TRAINING_WORDS, 12)) for _ in range(300)]
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(lines, vocab_size=420, min_frequency=2, show_progress=False)
    merges = json.loads(trainer._tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    b2u = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(b2u.values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    u2b = {c: b for b, c in b2u.items()}
    ranks = {bytes(u2b[c] for c in piece): i for piece, i in vocab.items()
             if piece != "<|endoftext|>"}
    encoding = tiktoken.Encoding("tiny_gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})
    return folder, vocab, encoding
