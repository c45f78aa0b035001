"""A training run in its own process, driven by tests/test_parallel.py.

Trains a tiny GPT on deterministic synthetic batches with `flaxformer_lite.training.train`,
appends every step's loss to `--log` (JSON lines, main process only) and writes the final
parameters to `--out` (.npz). `--pause_at N` makes step N write `--pause_file` and wait until
`<pause_file>.go` exists, so the test can signal (or kill) the process at a known step.
Multi-process runs pass --num_processes/--process_id/--coordinator; each process then feeds its
slice of every global batch. `--eval_batches N` evaluates N batches every half run; the
last one's second half is empty, so with two processes the second yields one batch fewer
(the trainer must still end the evaluation together).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_steps", type=int, default=8)
    p.add_argument("--mode", default="single")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor for --mode mesh")
    p.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
    p.add_argument("--checkpoint_every", type=int, default=2)
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--eval_batches", type=int, default=0)
    p.add_argument("--log", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--pause_at", type=int, default=-1)
    p.add_argument("--pause_file", default=None)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # the last count wins
                               f"--xla_force_host_platform_device_count={args.devices}")
    import numpy as np

    from flaxformer_lite import get_config
    from flaxformer_lite.training import (
        LossConfig,
        OptimizerConfig,
        ParallelConfig,
        distributed,
        train,
    )

    if args.num_processes > 1:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    class SyntheticBatches:
        """Batch i is a function of i alone; `get_state`/`set_state` like a grain iterator."""

        def __init__(self, global_batch: int, length: int = 16, vocab: int = 64):
            self.index, self.global_batch, self.length, self.vocab = 0, global_batch, length, vocab

        def __iter__(self):
            return self

        def __next__(self):
            rng = np.random.RandomState(1000 + self.index)
            tokens = rng.randint(4, self.vocab, size=(self.global_batch, self.length + 1))
            lengths = rng.randint(self.length // 2, self.length + 2, size=self.global_batch)
            tokens[np.arange(self.length + 1)[None, :] >= lengths[:, None]] = 0  # padding
            batch = {"inputs": tokens[:, :-1].astype(np.int32),
                     "targets": tokens[:, 1:].astype(np.int32)}
            self.index += 1
            return distributed.local_batch(batch)

        def get_state(self):
            return {"index": self.index}

        def set_state(self, state):
            self.index = int(state["index"])

    def eval_batches():
        """Global batch j from seed 5000 + j; the last one's second half is padding, and a
        process whose slice of it is all padding yields nothing for it."""
        for j in range(args.eval_batches):
            tokens = np.random.RandomState(5000 + j).randint(
                4, 64, size=(args.global_batch, 17)).astype(np.int32)
            if j == args.eval_batches - 1:
                tokens[args.global_batch // 2:] = 0
            local = distributed.local_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
            if np.any(local["targets"]):
                yield local

    def record(step, metrics):
        if args.log and "eval/loss" in metrics:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "eval": {k: v for k, v in metrics.items()
                                                          if k.startswith("eval/")}}) + "\n")
        if args.log and "train/loss" in metrics:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "loss": metrics["train/loss"],
                                    "tokens": metrics["train/tokens"]}) + "\n")
        if step == args.pause_at and args.pause_file:
            with open(args.pause_file, "w") as f:
                f.write(str(step))
            deadline = time.time() + 300
            while not os.path.exists(args.pause_file + ".go") and time.time() < deadline:
                time.sleep(0.05)  # signal handlers run between sleeps

    config = get_config("gpt2", vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=1,
                        max_len=16, dropout_rate=0.1, attention_dropout_rate=0.0)
    optimizer = OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=2,
                                decay_steps=20, weight_decay=0.01, clip_norm=1.0,
                                accumulation_steps=args.accumulation_steps)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    result = train(config, optimizer, SyntheticBatches(args.global_batch), workdir=args.workdir,
                   num_steps=args.num_steps,
                   parallel=ParallelConfig(mode=args.mode, data=data, fsdp=fsdp, tensor=tensor),
                   loss=LossConfig(label_smoothing=0.1, z_loss=1e-4), seed=0,
                   checkpoint_every=args.checkpoint_every, keep_checkpoints=3,
                   log_every=args.log_every,
                   eval_data=eval_batches if args.eval_batches else None,
                   eval_every=max(1, args.num_steps // 2),
                   hooks=[record])
    params = result.params  # every process takes part (gathers sharded arrays)
    if args.out and distributed.is_main_process():
        import jax

        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree.leaves_with_path(params)}
        np.savez(args.out, **flat)
        with open(args.out + ".json", "w") as f:
            json.dump({"step": result.step, "interrupted": result.interrupted}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
