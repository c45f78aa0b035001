"""What a device mesh costs, per device, before anything runs: FLOPs, collectives and memory.

    python experiments/mesh_report.py --config=gpt2 --batch=16 --length=1024 \\
        --meshes=8x1x1,1x8x1,2x1x4,1x2x4
    python experiments/mesh_report.py --config=gpt2-xl --set=scan_layers=True,remat=full \\
        --meshes=8x1x1,1x8x1,1x4x2,2x1x4 --batch=8

Each mesh is `data x fsdp x tensor` (`ParallelConfig(mode="mesh", ...)`). The train step (the
library's `Engine`, AdamW) is compiled for the abstract state, so no parameter is allocated,
on `--devices` CPU devices (`--xla_force_host_platform_device_count`), next to the same step on
one device. Per device, from XLA's compiled program: FLOPs (`cost_analysis`) and their ratio to
1/n of the one-device step (1.00x: the work divides evenly; more: work repeated on several
devices), the bytes each kind of collective returns per step (the optimized HLO's all-gather,
all-reduce, reduce-scatter, all-to-all and collective-permute results; a loop body counts once
even if it runs per layer or per micro-batch), and memory: the state and batch it holds
(arguments) and the step's temporaries. Bytes and FLOPs are what XLA:CPU compiles; a GPU or
TPU compiler fuses and schedules differently but partitions the same way. Attention takes the
CPU's path (query blocks keeping row statistics, not the `[batch, heads, q, kv]` softmax)
unless `--attention_path=gpu`, which compiles the path a GPU or TPU takes with the library's
`ops` attention (the softmax kept: its temporaries, at long contexts far more).

XLA counts a loop's body once: with `scan_layers=True` (or micro-batches) the FLOPs and bytes
cover one layer (one micro-batch) of the loop plus everything outside it, so compare such rows
with each other only, or report with `scan_layers=False` for whole-step totals. Memory is the
compiled program's either way (a scanned stack's temporaries are one layer's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE_RE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES)
                            + r")(?:-start)?\(", re.MULTILINE)


def _array_bytes(shapes: str) -> int:
    """Bytes of the arrays in an HLO shape such as `(f32[8,4]{1,0}, bf16[3])`."""
    return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes))


def collective_ops(hlo_text: str) -> list[tuple[str, int]]:
    """`(kind, bytes of its result)` for each collective in optimized HLO text. An async
    collective counts at its `-start`; a tuple result counts each of its arrays (a start's tuple
    holds its operands too, so those count as well: an upper bound)."""
    return [(m.group(2), _array_bytes(m.group(1))) for m in _COLLECTIVE_RE.finditer(hlo_text)]


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the collectives' results per device, by kind (`collective_ops`)."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for kind, size in collective_ops(hlo_text):
        out[kind] += size
    return out


def step_cost(compiled) -> dict:
    """Per device, from a compiled program: XLA's FLOPs, collective bytes by kind, and the
    memory of its arguments and temporaries."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {"flops": float(cost.get("flops", float("nan"))),
            "collective_bytes": collective_bytes(compiled.as_text()),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes)}


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--meshes: {text!r} is not DATAxFSDPxTENSOR (e.g. 2x1x4)")
    return tuple(int(p) for p in parts)


def report(config, meshes, batch: int, length: int, microbatches: int = 1,
           attention_path: str = "cpu") -> list[dict]:
    """One row per mesh (and a first row for one device): per-device FLOPs, their ratio to
    1/n of the one-device step, collective bytes by kind, memory and compile time; attention
    traced as `attention_path` ("cpu" or "gpu") runs it."""
    import jax
    import numpy as np

    from flaxformer_lite.ops.attention import traced_platform
    from flaxformer_lite.training import Engine, LossConfig, OptimizerConfig, ParallelConfig

    rng = np.random.RandomState(0)
    vocab = config.vocab_size
    inputs = rng.randint(1, vocab, (batch, length)).astype(np.int32)
    if config.architecture == "encoder_only":  # masked LM: targets at ~15% of the positions
        targets = np.where(rng.rand(batch, length) < 0.15, inputs, 0).astype(np.int32)
    else:
        targets = rng.randint(1, vocab, (batch, length)).astype(np.int32)
    data = {"inputs": inputs, "targets": targets}
    if config.num_classes:  # a classifier: one label a row
        data = {"inputs": inputs,
                "labels": rng.randint(0, config.num_classes, batch).astype(np.int32)}
    rows = []
    for mesh in [None, *meshes]:
        if mesh is None:
            parallel = ParallelConfig(mode="single", microbatches=microbatches)
            devices = 1
        else:
            parallel = ParallelConfig(mode="mesh", data=mesh[0], fsdp=mesh[1], tensor=mesh[2],
                                      microbatches=microbatches)
            devices = math.prod(mesh)
        engine = Engine(config, OptimizerConfig(learning_rate=1e-4), parallel, LossConfig())
        t0 = time.perf_counter()
        with traced_platform(attention_path):
            compiled = engine.lower_train_step(data).compile()
        compile_s = time.perf_counter() - t0
        rows.append({
            "mesh": "one device" if mesh is None else "x".join(map(str, mesh)),
            "devices": devices, **step_cost(compiled),
            "compile_s": compile_s, "describe": engine.describe()})
        print(f"  {rows[-1]['mesh']}: compiled in {compile_s:.1f} s", flush=True)
        del engine, compiled
        jax.clear_caches()
    one = rows[0]["flops"]
    for row in rows:
        row["flops_vs_ideal"] = row["flops"] / (one / row["devices"])
    return rows


def print_rows(rows: list[dict]) -> None:
    mib = 2 ** -20
    kinds = [k for k in COLLECTIVES if any(r["collective_bytes"][k] for r in rows)]
    cols = ["mesh (dxfxt)", "GFLOP/dev", "x of 1/n", *[f"{k} MiB" for k in kinds],
            "state+batch MiB", "temp MiB", "compile s"]
    lines = [[r["mesh"], f"{r['flops'] / 1e9:.2f}", f"{r['flops_vs_ideal']:.2f}",
              *[f"{r['collective_bytes'][k] * mib:.1f}" for k in kinds],
              f"{r['argument_bytes'] * mib:.0f}", f"{r['temp_bytes'] * mib:.0f}",
              f"{r['compile_s']:.1f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines)]
    for line in [cols, *lines]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gpt2",
                        help="a preset of flaxformer_lite.get_config")
    parser.add_argument("--set", default="",
                        help="config fields, e.g. num_layers=4,scan_layers=True")
    parser.add_argument("--meshes", default="8x1x1,1x8x1,2x1x4,1x2x4",
                        help="comma list of DATAxFSDPxTENSOR, each using all --devices")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices to present (default: the meshes' size)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--length", type=int, default=None,
                        help="sequence length (default: the config's max_len)")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--attention_path", default="cpu", choices=("cpu", "gpu"),
                        help="whose attention path to compile: the CPU's (row statistics) or "
                             "the one GPUs and TPUs take with ops attention (the softmax kept)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    try:
        meshes = [parse_mesh(m) for m in args.meshes.split(",") if m]
    except ValueError as e:
        parser.error(str(e))
    for flag in ("batch", "microbatches", "length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}={value} must be >= 1")
    sizes = {math.prod(m) for m in meshes}
    devices = args.devices or max(sizes, default=1)
    if sizes - {devices}:
        parser.error(f"--meshes: every mesh must use all {devices} devices; "
                     f"got sizes {sorted(sizes)} (set --devices or change the meshes)")
    for mesh in meshes:
        if args.batch % (mesh[0] * mesh[1] * args.microbatches):
            parser.error(f"--batch={args.batch} does not split over mesh "
                         f"{'x'.join(map(str, mesh))}: make it a multiple of data * fsdp * "
                         f"microbatches = {mesh[0] * mesh[1] * args.microbatches}")
    # Before JAX starts: the CPU as `devices` devices, and no accelerator.
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    from flaxformer_lite.config import get_config, parse_overrides

    try:
        overrides = parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    try:
        config = get_config(args.config, **overrides)
    except (TypeError, ValueError) as e:
        parser.error(f"--config/--set: {e}")
    if config.architecture == "encoder_only" and not (config.mlm_head or config.num_classes):
        parser.error(f"--config={args.config} trains with its masked-LM head or a classifier: "
                     "add mlm_head=True (or num_classes=2) to --set")
    length = config.max_len if args.length is None else args.length
    if not 1 <= length <= config.max_len:
        parser.error(f"--length={length} must lie in [1, max_len={config.max_len}] "
                     "(raise it with --set=max_len=...).")
    print(f"{args.config} {overrides or ''}: global batch {args.batch} x {length} tokens, "
          f"{devices} CPU devices; compiling the train step (nothing allocated) ...", flush=True)
    rows = report(config, meshes, args.batch, length, args.microbatches, args.attention_path)
    print_rows(rows)
    loops = config.scan_layers or args.microbatches > 1
    if loops:
        print("  (scan_layers / micro-batches: XLA counts a loop body once, so FLOPs and bytes "
              "hold one iteration of the loop; compare rows, or use scan_layers=False and "
              "--microbatches=1 for whole-step totals)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, "batch": args.batch,
                       "length": length, "devices": devices, "loops_counted_once": loops,
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
