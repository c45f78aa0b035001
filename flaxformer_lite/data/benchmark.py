"""Input-pipeline throughput: packing vs padding, on real text files.

    python -m flaxformer_lite.data.benchmark \\
        --text /path/to/tinyshakespeare/input.txt --parallel /path/to/multi30k

Prints, per pipeline, examples/s, real (non-padding) tokens/s and the fill (real tokens / all
slots of the batch: what fraction of the model's compute sees data). Only the data work is
timed (no model). Prepared data and tokenizers are cached under --data_dir.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from flaxformer_lite.data.builders import load_parallel_corpus, load_text_corpus
from flaxformer_lite.data.pipeline import (
    Pipeline,
    lm_pipeline,
    translation_pipeline,
    window_pipeline,
)


def _count(batch: dict[str, np.ndarray], both_sides: bool) -> tuple[int, int, int]:
    """(examples, real tokens, slots) in a batch; `both_sides` counts inputs and targets
    (translation), else the targets only (language modelling)."""
    seg = batch.get("segment_ids", batch.get("targets_segment_ids"))
    if seg is not None:
        examples = sum(len(np.unique(r[r != 0])) for r in seg)
    else:
        examples = int((batch["targets"] != 0).any(axis=1).sum())
    keys = ("inputs", "targets") if both_sides else ("targets",)
    tokens = sum(int((batch[k] != 0).sum()) for k in keys)
    return examples, tokens, sum(batch[k].size for k in keys)


def measure(make: Callable[[], Pipeline], seconds: float, *, both_sides: bool = False,
            warmup: int = 3) -> dict[str, float]:
    """Pulls batches from a fresh iterator for about `seconds` after `warmup` batches."""
    it = iter(make())
    for _ in range(warmup):
        next(it)
    n = examples = tokens = slots = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        e, t, s = _count(next(it), both_sides)
        n, examples, tokens, slots = n + 1, examples + e, tokens + t, slots + s
    elapsed = time.perf_counter() - start
    it.close()
    return {"batches/s": n / elapsed, "examples/s": examples / elapsed,
            "tokens/s": tokens / elapsed, "fill": tokens / max(slots, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The corpora beside a source checkout (../shared/data from its root), wherever it runs.
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                          "shared", "data")
    parser.add_argument("--text",
                        default=os.path.normpath(os.path.join(shared, "tinyshakespeare",
                                                              "input.txt")),
                        help="a text file for the language-model pipelines")
    parser.add_argument("--parallel", default=os.path.normpath(os.path.join(shared, "multi30k")),
                        help="a folder of <split>.<lang> files for the translation pipelines")
    parser.add_argument("--source_lang", default="de")
    parser.add_argument("--target_lang", default="en")
    parser.add_argument("--data_dir", default=None,
                        help="where prepared data and tokenizers are cached (default: "
                             "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lm_len", type=int, default=256)
    parser.add_argument("--mt_len", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores; "
          f"batch {args.batch_size}, {args.seconds:g} s per row, {args.threads} read threads")
    rows = []
    common = dict(batch_size=args.batch_size, num_threads=args.threads)
    if args.text:
        ds = load_text_corpus(args.text, data_dir=args.data_dir)
        tok = ds.tokenizer("char")
        lm = functools.partial(lm_pipeline, ds, tok, max_len=args.lm_len, **common)
        stream = np.asarray(tok.encode(ds.full_text("train")), np.int32)
        n = args.lm_len
        rows += [
            (f"char LM, paragraphs, packed (L={n})", lm),
            (f"char LM, paragraphs, padded (L={n})", functools.partial(lm, pack=False)),
            (f"char LM, paragraphs, padded + buckets (L<={n})",
             functools.partial(lm, pack=False, bucket_boundaries=(32, 64, 128))),
            (f"char LM, random windows (L={n})",
             functools.partial(window_pipeline, stream, batch_size=args.batch_size,
                               seq_len=n)),
        ]
    if args.parallel:
        mt_ds = load_parallel_corpus(args.parallel, source_lang=args.source_lang,
                                     target_lang=args.target_lang, data_dir=args.data_dir)
        spm = mt_ds.tokenizer("bpe", args.vocab_size)
        mt = functools.partial(translation_pipeline, mt_ds, spm, max_source_len=args.mt_len,
                               **common)
        n = args.mt_len
        rows += [
            (f"translation, BPE {spm.vocab_size}, packed (L={n})", mt),
            (f"translation, BPE {spm.vocab_size}, padded (L={n})",
             functools.partial(mt, pack=False)),
            (f"translation, BPE {spm.vocab_size}, padded + buckets (L<={n})",
             functools.partial(mt, pack=False, bucket_boundaries=(16, 32))),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"{'pipeline':<{width}}  {'examples/s':>10}  {'tokens/s':>10}  {'batches/s':>9}  "
          f"{'fill':>5}")
    for name, make in rows:
        r = measure(make, args.seconds, both_sides=name.startswith("translation"))
        print(f"{name:<{width}}  {r['examples/s']:>10,.0f}  {r['tokens/s']:>10,.0f}  "
              f"{r['batches/s']:>9,.1f}  {r['fill']:>5.1%}", flush=True)


if __name__ == "__main__":
    main()
