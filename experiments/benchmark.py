"""Training and attention benchmark: flaxformer_lite (JAX) next to the same GPT in PyTorch.

    python experiments/benchmark.py --out=/tmp/benchmark.json
    python experiments/benchmark.py --sections=train --models=nanogpt-char --repeats=9
    python experiments/benchmark.py --sections=attention --attention_lengths=128,256,512,1024

Training: step time, tokens/s, model FLOPs per token (`flaxformer_lite.params.flops_per_token`:
6N plus the attention term), achieved FLOP/s, MFU against the device's datasheet peak (when
known) and against a matmul peak in the step's dtype measured in the same run (the best rate
JAX, with and, where it has any, without the step's compile options, or PyTorch reached in any
round), compile time and peak memory, for the library's model with an optax AdamW step,
PyTorch eager and `torch.compile`.

Each framework runs in its own worker process. The parent alternates them round by round,
rotating which goes first, so machine noise lands on all of them alike; tables report medians
over all timed steps and the median of the per-round speed ratios. PyTorch is optional
(`pip install -e ".[bench]"`); without it the PyTorch columns are skipped.

Attention: `ops.scaled_dot_product_attention` against `jax.nn.dot_product_attention` (XLA, and
cuDNN on a GPU), and PyTorch's fused `scaled_dot_product_attention` when PyTorch is installed;
causal, forward + backward time and (JAX) the compiled function's memory.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# name: layers, heads, d_model, context, batch, vocab, accelerator only
MODELS = {
    "nanogpt-char": dict(layers=4, heads=4, d_model=128, context=64, batch=12, vocab=65),
    "gpt-6x384": dict(layers=6, heads=6, d_model=384, context=256, batch=64, vocab=65),
    "gpt2": dict(layers=12, heads=12, d_model=768, context=1024, batch=16, vocab=50257,
                 accelerator_only=True),
}

# Datasheet dense bfloat16 (V100: float16) tensor peaks, FLOP/s, by device-kind substring;
# the longest matching name counts ("H100 PCIe" before "H100", the SXM part).
DATASHEET_PEAKS = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12,
    "V100": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
}
FRAMEWORKS = ("jax", "torch", "torch_compile")
RESERVED_ROWS = ("jax", "torch eager", "torch.compile")  # row names variants may not take


def datasheet_peak(device_kind: str) -> float | None:
    """The datasheet bfloat16 peak of `device_kind` (the longest matching name), or None."""
    hits = [k for k in DATASHEET_PEAKS if k.lower() in device_kind.lower()]
    return DATASHEET_PEAKS[max(hits, key=len)] if hits else None

REPLY = "@@bench "
PROGRESS = "@@progress "  # a line the parent prints as it arrives (kept if a run is cut short)


# ---------------------------------------------------------------------------------------------
# Worker side: one framework per process, answering JSON commands on stdin.
# ---------------------------------------------------------------------------------------------

def _reply(obj) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _TrainingRss:
    """The process's max RSS as training left it, before the first matmul reference (which only
    some workers run: its arrays and compile would count in theirs alone)."""

    _rss_before_matmul: int | None = None

    def _note_matmul(self) -> None:
        if self._rss_before_matmul is None:
            self._rss_before_matmul = _max_rss_bytes()

    def _training_rss(self) -> int:
        return self._rss_before_matmul or _max_rss_bytes()


def _batches(spec: dict, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` (inputs, targets) int32 batches `[batch, context]`, identical in every worker.

    Ids start at 1: id 0 is padding in the library (no loss, not attended), so leaving it out
    gives both frameworks the same loss over every token.
    """
    rng = np.random.default_rng(spec["seed"])
    b, t, v = spec["batch"], spec["context"], spec["vocab"]
    if spec.get("data"):
        with open(spec["data"], encoding="utf-8") as f:
            text = f.read()
        chars = sorted(set(text))
        lookup = {c: i + 1 for i, c in enumerate(chars)}
        data = np.array([lookup[c] for c in text[:1_000_000]], np.int32)
        out = []
        for _ in range(n):
            starts = rng.integers(0, len(data) - t - 1, b)
            x = np.stack([data[s:s + t] for s in starts])
            y = np.stack([data[s + 1:s + t + 1] for s in starts])
            out.append((x, y))
        return out
    return [(rng.integers(1, v, (b, t)).astype(np.int32),
             rng.integers(1, v, (b, t)).astype(np.int32)) for _ in range(n)]


def _serve(runner) -> None:
    """Answer commands until 'quit': run k steps, matmul peak, stats."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return
        try:
            _reply(getattr(runner, cmd["op"])(**cmd.get("args", {})))
        except Exception as e:  # report, keep serving
            _reply({"error": f"{type(e).__name__}: {e}"})


def op_category(name: str) -> str:
    """Kind of an XLA:CPU thunk from its HLO name: matmul, reduction, elementwise, copy,
    collective (with the devices' rendezvous waits), other."""
    base = name.split(".")[0].removeprefix("wrapped_")
    if base.startswith(("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                        "all-to-all", "Rendezvous", "Wait")):
        return "collective/wait"
    if (base.startswith(("dot", "convolution", "onednn")) or "custom-call" in base
            or "gemm" in base):
        return "matmul"
    if base.startswith(("copy", "transpose", "broadcast", "concatenate", "slice", "pad",
                        "dynamic", "gather", "scatter", "iota")):
        return "copy/transpose"
    if "reduce" in base:
        return "reduction"
    if "fusion" in base or base in ("add", "multiply", "select", "exponential", "convert"):
        return "elementwise"
    return "other"


# Model components by the module path in an op's metadata (`op_name`), first match wins.
COMPONENTS = (
    ("attention projections", re.compile(r"_attention/(query|key_value|qkv|out)/")),
    ("attention: scores, softmax, values", re.compile(r"(self|cross)_attention/")),
    ("feed-forward", re.compile(r"/mlp/")),
    ("norms", re.compile(r"_norm/")),
    ("embeddings, output head", re.compile(
        r"/(embedder|token_embed|position_embed|type_embed|logits|relative_bias|pooler|"
        r"mlm_transform)\b")),
)
PASSES = ("forward", "backward", "other")
# Thunks that hold others (a loop over micro-batches, a branch): in flight while their body
# runs, so they would be counted twice.
CONTAINERS = ("while", "conditional", "call")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """`{instruction name: metadata op_name}` from a compiled module's HLO text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"",
                         hlo_text, re.MULTILINE):
        out[m.group(1)] = m.group(2)
    return out


def op_component(op_name: str | None) -> tuple[str, str]:
    """`(component, pass)` of an op from its metadata `op_name`, e.g.
    "jit(train_step)/transpose(jvp(DecoderOnly))/decoder/layers/layer_0/mlp/wi/dot_general"
    is ("feed-forward", "backward"). Ops outside the differentiated function (the optimizer's
    update) and ops XLA rewrote without metadata (split reductions, matrix-vector products,
    copies) count in the "other" pass; model ops that match no component are "loss,
    residuals, masks". A fusion counts where the metadata XLA gave it points (its root op's),
    so the split is approximate at fusion borders."""
    if not op_name:
        return "no metadata (rewritten by XLA)", "other"
    if "transpose(jvp(" in op_name:
        step = "backward"
    elif "jvp(" in op_name:
        step = "forward"
    else:
        return "optimizer update, rest", "other"
    for name, pattern in COMPONENTS:
        if pattern.search(op_name):
            return name, step
    return "loss, residuals, masks", step


def _op_name(event: dict) -> str:
    """The HLO op of a trace event: its name on XLA:CPU, `args.hlo_op` on a GPU stream, where
    the event is named after the kernel."""
    return (event.get("args") or {}).get("hlo_op") or event["name"]


def summarize_trace(trace, steps: int, wall_s: float,
                    op_names: dict[str, str] | None = None) -> dict:
    """Op time per step by category from a Perfetto JSON trace of `steps` training steps.

    On XLA:CPU an op's time runs from the start of its thunk to its completion marker
    ("end: <op>"), so a matmul whose shards run on the Eigen pool counts in full. On a GPU the
    ops are the kernels on the device's streams (XLA's command buffers hide which HLO op a
    kernel belongs to: profile with `--xla_gpu_enable_command_buffer=`). Independent ops can
    run at the same time (on two CPU threads, or GPU streams), so the per-category sums may add
    up to more than the step; `idle_s` is the part of the step during which no op was in
    flight at all (loops and branches count through the ops in their bodies, `CONTAINERS`).
    Each op's `wall_seconds` is the step time attributed to it: every moment split evenly
    among the ops then in flight, so they sum to the busy part of the step (`busy_wall_s`).
    With `op_names` (`hlo_op_names` of the compiled step), that time is split by model
    component and pass (`op_component`): where in the model the step's time goes.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}

    def is_op(e):
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if "XLA" in thread:  # XLA:CPU's thunk executor
            return not e["name"].startswith(("ThunkExecutor", "ThreadpoolListener"))
        # GPU kernels: the streams of a "/device:GPU:n" process.
        return (processes.get(e.get("pid"), "").startswith("/device:")
                and thread.startswith("Stream"))

    ops = sorted(((_op_name(e), e) for e in events if e.get("ph") == "X" and is_op(e)),
                 key=lambda ne: ne[1]["ts"])
    open_ops: dict[str, list[list[float]]] = {}
    spans: list[tuple[str, list[float]]] = []
    for name, e in ops:
        if name.split(".")[0] in CONTAINERS:
            continue
        if name.startswith("end: "):  # completion of the oldest open op of that name
            queue = open_ops.get(name[5:])
            if queue:
                span = queue.pop(0)
                span[1] = max(span[1], e["ts"])
            continue
        span = [e["ts"], e["ts"] + e.get("dur", 0)]
        open_ops.setdefault(name, []).append(span)
        spans.append((name, span))
    per_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, (a, b) in spans:
        per_op[name] = per_op.get(name, 0.0) + (b - a) * 1e-6 / steps
        counts[name] = counts.get(name, 0) + 1
    # The step's time attributed to the ops in flight, split evenly among them (two ops
    # sharing the cores each get half): sums to the time during which any op ran.
    per_wall = dict.fromkeys(per_op, 0.0)
    edges = sorted([(a, 1, i) for i, (_, (a, _b)) in enumerate(spans)]
                   + [(b, -1, i) for i, (_, (_a, b)) in enumerate(spans)])
    active: set[int] = set()
    last = covered = 0.0
    for t, kind, i in edges:  # microseconds
        if active and t > last:
            covered += t - last
            for j in active:
                per_wall[spans[j][0]] += (t - last) * 1e-6 / steps / len(active)
        if kind == 1:
            active.add(i)
        else:
            active.discard(i)
        last = t
    cats: dict[str, dict] = {}
    for name, t in per_op.items():
        c = cats.setdefault(op_category(name), {"seconds": 0.0, "wall_seconds": 0.0, "ops": 0,
                                                "examples": []})
        c["seconds"] += t
        c["wall_seconds"] += per_wall[name]
        c["ops"] += counts[name] / steps
        if len(c["examples"]) < 3:
            c["examples"].append(name)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    out = {"wall_s": wall_s / steps, "busy_s": sum(per_op.values()),
           "busy_wall_s": covered * 1e-6 / steps,
           "idle_s": max(0.0, wall_s - covered * 1e-6) / steps, "categories": cats,
           "top": [{"op": n, "seconds": t, "category": op_category(n)} for n, t in top]}
    if op_names is not None:
        comps: dict[str, dict[str, float]] = {}
        for name, t in per_wall.items():
            comp, step = op_component(op_names.get(name))
            row = comps.setdefault(comp, dict.fromkeys(PASSES, 0.0))
            row[step] += t
        out["components"] = comps
    return out


class JaxTrain(_TrainingRss):
    """The library's DecoderOnly trained by `flaxformer_lite.training.train_step` (AdamW).

    `spec["jax_step"] = "plain"` swaps in a bare optax AdamW step written here instead.
    `spec["cpu_devices"] = n` presents the CPU to JAX as n devices (`jax_num_cpu_devices`) and
    trains data parallel over them: the same step and global batch, the batch split n ways and
    the state replicated, so XLA sums the gradients across the devices.
    """

    def __init__(self, spec: dict):
        from flaxformer_lite import perf
        if spec.get("configure_cpu", True):
            self.applied = perf.configure_cpu(malloc=spec["allocator"] == "glibc")
        else:
            self.applied = perf.configure_cpu(xla_flags=False,
                                              malloc=spec["allocator"] == "glibc")
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import optax

        import flaxformer_lite as fl

        if spec.get("cpu_devices"):
            jax.config.update("jax_num_cpu_devices", int(spec["cpu_devices"]))
        self.jax, self.jnp = jax, jnp
        self.spec = spec
        on_gpu = jax.default_backend() == "gpu"
        overrides = dict(vocab_size=spec["vocab"], d_model=spec["d_model"],
                         num_heads=spec["heads"], d_ff=4 * spec["d_model"],
                         num_layers=spec["layers"], max_len=spec["context"], dropout_rate=0.0,
                         attention_dropout_rate=0.0, dtype=spec["dtype"])
        overrides.update(spec.get("cfg", {}))
        if on_gpu and spec["dtype"] == "bfloat16":
            # The library's GPU settings (`gpu_config`); the ids here start at 1 and hold no
            # padding, so `padding="trailing"` is exact.
            self.config = fl.gpu_config("gpt2", trailing_padding=True, **overrides)
        else:
            self.config = fl.get_config("gpt2", **overrides)
        model = fl.make_model(self.config)
        self.batches = [{"inputs": jax.device_put(x), "targets": jax.device_put(y)}
                        for x, y in _batches(spec)]
        self.step_kind = spec.get("jax_step", "library")
        try:
            from flaxformer_lite import training
        except ImportError:
            self.step_kind = "plain"
        if self.step_kind == "library":
            # What users run: the training package's TrainState and train_step.
            opt = training.OptimizerConfig(learning_rate=spec["lr"], b1=0.9, b2=0.99,
                                           weight_decay=0.1)
            tx = training.make_optimizer(opt)
            self.state = training.create_train_state(self.config, opt, spec["seed"], tx=tx)

            def train_step(state, batch):
                state, metrics = training.train_step(state, batch, model=model, tx=tx,
                                                     microbatches=spec.get("microbatches", 1))
                return state, metrics["loss"] / metrics["tokens"]
        else:
            # A plain optax AdamW step, for comparison with the library's.
            params = nn.meta.unbox(model.init(jax.random.key(spec["seed"]),
                                              self.batches[0]["inputs"][:1])["params"])
            decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
            tx = optax.adamw(spec["lr"], b1=0.9, b2=0.99, weight_decay=0.1, mask=decay_mask)
            self.state = (params, tx.init(params))

            def loss_fn(p, batch):
                logits = model.apply({"params": p}, batch["inputs"])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, batch["targets"]).mean()

            def train_step(state, batch):
                p, opt_state = state
                loss, grads = jax.value_and_grad(loss_fn)(p, batch)
                updates, opt_state = tx.update(grads, opt_state, p)
                return (optax.apply_updates(p, updates), opt_state), loss

        # The library's step gets the compile options `Engine` gives it (on Intel CPUs: matmuls
        # through oneDNN); the plain step XLA's defaults.
        self.compiler_options = (perf.step_compiler_options(jax.devices())
                                 if self.step_kind == "library" else {})
        out_shardings = None
        self.num_devices = 1
        if spec.get("cpu_devices", 0) > 1 and jax.default_backend() == "cpu":
            # Data parallel over the CPU's devices; elsewhere every row uses one device, as
            # the MFU columns assume.
            self.num_devices = jax.device_count()
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from flaxformer_lite.training.partitioning import make_mesh

            mesh = make_mesh()  # every device on the data axis
            out_shardings = NamedSharding(mesh, P())
            self.state = jax.device_put(self.state, out_shardings)
            self.batches = [jax.device_put(b, NamedSharding(mesh, P("data")))
                            for b in self.batches]
        t0 = time.perf_counter()
        step = jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)
        self.compiled = step.lower(self.state, self.batches[0]).compile(
            self.compiler_options or None)
        self.compile_s = time.perf_counter() - t0
        self.i = 0
        self.loss = float("nan")
        self.run(2)  # warm up: first executions allocate and page in

    def run(self, steps: int) -> dict:
        times, cpu = [], []
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            t0, c0 = time.perf_counter(), time.process_time()
            self.state, loss = self.compiled(self.state, batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            self.i += 1
        self.loss = float(loss)
        return {"times": times, "cpu": cpu}

    def matmul(self, n: int, repeats: int = 3) -> dict:
        """`[n, n] @ [n, n]` rate in the step's compute dtype, FLOP/s (median of `repeats`),
        compiled with the step's compile options; where it has any (oneDNN on Intel CPUs) also
        without them (`default_flops_per_s`, else None): they suit the step's shapes, not
        necessarily a square matmul, and the reference is a peak."""
        self._note_matmul()
        jax, jnp = self.jax, self.jnp
        if not hasattr(self, "_mm"):
            k1, k2 = jax.random.split(jax.random.key(1))
            dtype = jnp.dtype(self.spec["dtype"])
            self._mm_args = (jax.random.normal(k1, (n, n), dtype),
                             jax.random.normal(k2, (n, n), dtype))
            lowered = jax.jit(jnp.matmul).lower(*self._mm_args)
            self._mm = {"step": lowered.compile(self.compiler_options or None)}
            if self.compiler_options:
                self._mm["default"] = lowered.compile()
        out = {}
        for name, fn in self._mm.items():
            fn(*self._mm_args).block_until_ready()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(*self._mm_args).block_until_ready()
                times.append(time.perf_counter() - t0)
            out[name] = 2 * n ** 3 / float(np.median(times))
        return {"flops_per_s": out["step"], "default_flops_per_s": out.get("default")}

    def profile(self, steps: int = 5) -> dict:
        """Per-op time of `steps` steps from a `jax.profiler` trace (see `summarize_trace`)."""
        import glob
        import gzip

        with tempfile.TemporaryDirectory() as d:
            with self.jax.profiler.trace(d, create_perfetto_trace=True):
                t0 = time.perf_counter()  # after the profiler has started
                self.run(steps)
                wall = time.perf_counter() - t0
            path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
            with gzip.open(path[0]) as f:
                trace = json.load(f)
        return summarize_trace(trace, steps, wall, hlo_op_names(self.compiled.as_text()))

    def stats(self) -> dict:
        jax = self.jax
        dev = jax.devices()[0]
        mem = dev.memory_stats() or {}
        ma = self.compiled.memory_analysis()
        step_bytes = None
        if ma is not None:
            step_bytes = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                          + ma.output_size_in_bytes - ma.alias_size_in_bytes)
        from flaxformer_lite.params import flops_per_token
        return {"compile_s": self.compile_s, "loss": self.loss, "max_rss": self._training_rss(),
                "device_peak": mem.get("peak_bytes_in_use"), "step_buffers": step_bytes,
                "jax_step": self.step_kind, "devices": self.num_devices,
                "device_kind": dev.device_kind, "platform": dev.platform,
                "flops_per_token": flops_per_token(self.config, self.spec["context"])["total"],
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "applied": self.applied}


class TorchTrain(_TrainingRss):
    """The same GPT written plainly in PyTorch: pre-LN, tanh GELU, learned positions, tied head."""

    def __init__(self, spec: dict):
        if spec["allocator"] == "glibc":
            from flaxformer_lite import perf
            perf.configure_cpu(xla_flags=False)
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torch import nn

        self.torch = torch
        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            # JAX multiplies float32 on NVIDIA GPUs in TF32 by default; PyTorch in full float32
            # unless told. Both alike, so a float32 row compares the same arithmetic.
            torch.set_float32_matmul_precision("high")
        L, H, D, T, V = (spec[k] for k in ("layers", "heads", "d_model", "context", "vocab"))

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
                self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
                self.c_fc, self.mlp_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

            def forward(self, x):
                b, t, d = x.shape
                q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
                q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in (q, k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
                h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
                return x + self.mlp_proj(h)

        class GPT(nn.Module):
            def __init__(self):
                super().__init__()
                self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
                self.blocks = nn.ModuleList(Block() for _ in range(L))
                self.ln_f = nn.LayerNorm(D)
                for name, p in self.named_parameters():  # GPT-2 initialisation
                    if p.dim() >= 2:
                        std = 0.02 / math.sqrt(2 * L) if name.endswith(
                            ("c_proj.weight", "mlp_proj.weight")) else 0.02
                        nn.init.normal_(p, 0.0, std)
                    elif name.endswith("bias"):
                        nn.init.zeros_(p)

            def forward(self, idx, targets):
                pos = torch.arange(idx.shape[1], device=idx.device)
                x = self.wte(idx) + self.wpe(pos)
                for block in self.blocks:
                    x = block(x)
                logits = self.ln_f(x) @ self.wte.weight.T  # tied output head
                return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))

        torch.manual_seed(spec["seed"])
        self.model = GPT().to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=spec["lr"], betas=(0.9, 0.99))
        self.forward = self.model
        if spec["compile"]:
            self.forward = torch.compile(self.model)
        # bfloat16 compute as the JAX row's (on CPUs too: the ratios compare one dtype)
        self.autocast = (torch.autocast(self.device, torch.bfloat16)
                         if spec["dtype"] == "bfloat16" else None)
        self.batches = [(torch.from_numpy(x).long().to(self.device),
                         torch.from_numpy(y).long().to(self.device)) for x, y in _batches(spec)]
        self.i = 0
        self.loss = float("nan")
        # Two warm-up steps, as `JaxTrain`: the rows then train on the same batches.
        first = self.run(1)["times"][0]
        later = self.run(1)["times"][0]
        self.compile_s = max(first - later, 0.0) if spec["compile"] else 0.0

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _step(self, x, y):
        if self.autocast is not None:
            with self.autocast:
                loss = self.forward(x, y)
        else:
            loss = self.forward(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps: int) -> dict:
        times, cpu = [], []
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = self._step(x, y)
            self._sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            self.i += 1
        self.loss = float(loss.detach())
        return {"times": times, "cpu": cpu}

    def matmul(self, n: int, repeats: int = 3) -> dict:
        self._note_matmul()
        torch = self.torch
        dtype = getattr(torch, self.spec["dtype"])
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            self._sync()
            times.append(time.perf_counter() - t0)
        return {"flops_per_s": 2 * n ** 3 / float(np.median(times))}

    def stats(self) -> dict:
        torch = self.torch
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return {"compile_s": self.compile_s, "loss": self.loss, "max_rss": self._training_rss(),
                "device_peak": peak, "torch": torch.__version__, "threads":
                torch.get_num_threads()}


class JaxAttention:
    """Causal attention forward + backward: the library's ops vs jax.nn.dot_product_attention."""

    def __init__(self, spec: dict):
        from flaxformer_lite import perf
        if spec.get("configure_cpu", True):
            perf.configure_cpu(malloc=spec["allocator"] == "glibc")
        import jax

        self.jax = jax
        self.spec = spec

    def run_all(self) -> dict:
        import jax
        import jax.numpy as jnp

        from flaxformer_lite import ops

        spec = self.spec
        on_gpu = jax.default_backend() == "gpu"
        dtype = jnp.bfloat16 if spec["dtype"] == "bfloat16" else jnp.float32
        impls = {
            "ops": lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="xla"),
        }
        if on_gpu and dtype != jnp.float32:
            impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn")
        b, h, d = spec["batch"], spec["heads"], spec["head_dim"]
        rows = []
        for length in spec["lengths"]:
            keys = jax.random.split(jax.random.key(length), 4)
            q, k, v, ct = (jax.random.normal(key, (b, length, h, d), dtype) for key in keys)
            compiled, outs, row = {}, {}, {"length": length}
            for name, fn in impls.items():
                def loss(q, k, v, ct, fn=fn):
                    return (fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32)).sum()
                try:
                    c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, ct).compile()
                    outs[name] = jax.jit(fn)(q, k, v).astype(jnp.float32)
                    jax.block_until_ready(c(q, k, v, ct))
                except Exception as e:  # e.g. cuDNN missing or an unsupported shape
                    row[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                compiled[name] = c
                ma = c.memory_analysis()
                row[name] = {"times": [], "memory": None if ma is None else (
                    ma.temp_size_in_bytes + ma.output_size_in_bytes)}
            for _ in range(spec["repeats"]):  # interleaved
                for name, c in compiled.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(c(q, k, v, ct))
                    row[name]["times"].append(time.perf_counter() - t0)
            if "ops" in outs:
                row["max_abs_diff_vs_ops"] = {
                    n: float(jnp.abs(o - outs["ops"]).max()) for n, o in outs.items()
                    if n != "ops"}
            rows.append(row)
        return {"rows": rows, "flops": "12 * batch * heads * length^2 * head_dim"}

    def stats(self) -> dict:
        return {"max_rss": _max_rss_bytes()}


def decoding_config(name: str, dtype: str = "float32"):
    """The decoding section's model: "small" (`decoding.BENCHMARK_CONFIG`, 6 layers of 384,
    vocabulary 256) or "gpt2" (124M, vocabulary 50,257), in compute `dtype`."""
    import flaxformer_lite as fl
    from flaxformer_lite import decoding
    if name == "small":
        return decoding.BENCHMARK_CONFIG.replace(dtype=dtype)
    if name == "gpt2":
        return fl.get_config("gpt2", dropout_rate=0.0, attention_dropout_rate=0.0, dtype=dtype)
    raise ValueError(f"--decoding_model: unknown {name!r}; known: small, gpt2")


class JaxDecoding:
    """Greedy generation with the KV cache vs recomputation (`flaxformer_lite.decoding`)."""

    def __init__(self, spec: dict):
        from flaxformer_lite import perf
        if spec.get("configure_cpu", True):
            perf.configure_cpu(malloc=spec["allocator"] == "glibc")
        self.spec = spec

    def run_all(self) -> dict:
        from flaxformer_lite import decoding
        s = self.spec
        config = decoding_config(s["model"], s["dtype"])
        def progress(r):
            sys.stdout.write(f"{PROGRESS}batch {r['batch']}, {r['method']}: {r['seconds']:.3f} s, "
                             f"{r['tokens_per_s']:.1f} tokens/s\n")
            sys.stdout.flush()

        rows = decoding.benchmark(config, batch_sizes=s["batch_sizes"],
                                  new_tokens=s["new_tokens"], repeats=s["repeats"],
                                  on_row=progress)
        return {"rows": rows, "model": s["model"], "dtype": s["dtype"],
                "layers": config.num_layers, "d_model": config.d_model,
                "vocab": config.vocab_size}


class TorchAttention:
    """PyTorch's fused `scaled_dot_product_attention`, causal, forward + backward, same shapes."""

    def __init__(self, spec: dict):
        import torch

        self.torch = torch
        self.spec = spec

    def run_all(self) -> dict:
        torch = self.torch
        import torch.nn.functional as F  # noqa: N812

        spec = self.spec
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
        b, h, d = spec["batch"], spec["heads"], spec["head_dim"]

        def step(q, k, v, ct):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), ct)

        rows = []
        for length in spec["lengths"]:
            torch.manual_seed(length)
            q, k, v, ct = (torch.randn(b, h, length, d, device=device, dtype=dtype,
                                       requires_grad=True) for _ in range(4))
            step(q, k, v, ct)  # warm-up
            times = []
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                step(q, k, v, ct)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append({"length": length, "times": times})
        return {"rows": rows}


WORKERS = {"jax": JaxTrain, "torch": TorchTrain, "attention": JaxAttention,
           "decoding": JaxDecoding, "torch_attention": TorchAttention}


def worker_main(kind: str, spec: dict) -> None:
    try:
        runner = WORKERS[kind](spec)
    except Exception as e:
        _reply({"error": f"{type(e).__name__}: {e}"[:2000]})
        return
    _reply({"ready": True})
    _serve(runner)


# ---------------------------------------------------------------------------------------------
# Parent side: start workers, alternate them, summarise.
# ---------------------------------------------------------------------------------------------

class Worker:
    """A benchmark worker subprocess speaking JSON lines."""

    def __init__(self, name: str, kind: str, spec: dict, env: dict):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind,
             "--worker_spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        ready = self._read()
        self.error = ready.get("error")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                tail = self.log.read()[-1500:]
                return {"error": f"worker exited (code {self.proc.poll()}): {tail}"}
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
            if line.startswith(PROGRESS):
                print(f"  {self.name}: {line[len(PROGRESS):].rstrip()}", flush=True)

    def call(self, op: str, **args) -> dict:
        if self.error:
            return {"error": self.error}
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out and self.proc.poll() is not None:
            self.error = out["error"]
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def _parse_variant(text: str) -> tuple[str, dict, dict, dict]:
    """'name:KEY=VAL,cfg.field=VAL,disable=a+b,configure_cpu=0,cpu_devices=2,batch=32' ->
    (name, env, cfg, spec).

    `disable=a+b` turns off fast paths a and b (`flaxformer_lite.ops.fast_paths`);
    `cpu_devices=n` trains data parallel over the CPU presented as n devices (`JaxTrain`);
    `microbatches=k` computes the library step's gradient in k slices of the batch;
    `batch=n` trains on n sequences a step (the row's tokens/s, MFU and speed ratios then count
    its own tokens: ratios compare time per token). Other upper-case keys are environment
    variables of the row's worker; anything else raises `ValueError` (a typo must not give a
    silent copy of the baseline).
    """
    name, _, rest = text.partition(":")
    if not name or name in RESERVED_ROWS:
        raise ValueError(f"--variant {text!r}: give the row a name of its own before ':' (not "
                         f"empty, nor one of {', '.join(RESERVED_ROWS)}).")
    env, cfg, spec = {}, {}, {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE.")
        if key.startswith("cfg."):
            try:
                cfg[key[4:]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                cfg[key[4:]] = value
        elif key == "disable":
            env["FLAXFORMER_LITE_DISABLE"] = value.replace("+", ",")
        elif key == "configure_cpu":
            spec["configure_cpu"] = value not in ("0", "false", "False")
        elif key in ("cpu_devices", "microbatches", "batch"):
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--variant {text!r}: {key}={value!r} must be a positive "
                                 "integer.")
            spec[key] = int(value)
        elif re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            env[key] = value
        else:
            raise ValueError(
                f"--variant {text!r}: unknown key {key!r}; known: cfg.<TransformerConfig "
                "field>, disable, configure_cpu, cpu_devices, microbatches, batch, or an "
                "upper-case environment variable.")
    return name, env, cfg, spec


def _env(args) -> tuple[dict, str]:
    from flaxformer_lite import perf
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", REPO)
    # Several workers share one GPU; JAX would otherwise take 75% of its memory per process.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    allocator = args.allocator
    if allocator == "auto":
        allocator = "jemalloc" if perf.jemalloc_path() else "glibc"
    if allocator == "jemalloc":
        if perf.jemalloc_path() is None:
            raise SystemExit("--allocator=jemalloc: no libjemalloc found (apt install "
                             "libjemalloc2), or use --allocator=glibc.")
        env = perf.jemalloc_env(env)
    elif allocator == "glibc":
        env = perf.hugepage_env(env)  # transparent huge pages where the kernel allows
    return env, allocator


def speed_ratio(ref_times: list[float], times: list[float], ref_work: float = 1.0) -> float:
    """Median over rounds of `ref time / time / ref_work`: how many times faster a row is than
    the reference row, per unit of work (`ref_work`: the reference's work per step over the
    row's). Only rounds where both ran count; a failed round holds NaN."""
    return _median([a / b / ref_work for a, b in zip(ref_times, times)
                    if not (math.isnan(a) or math.isnan(b))])


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _median(xs):
    return float(np.median(xs)) if xs else float("nan")


def _accelerator() -> bool:
    """Whether JAX sees a GPU or TPU (asked in a subprocess so this process stays jax-free)."""
    code = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() in ("gpu", "tpu", "cuda", "rocm")


def _model_spec(model: str, args, allocator: str,
                accelerator: bool) -> tuple[dict, dict] | None:
    """`(shape, spec)` of `model` for the train and profile sections' workers, or None for an
    accelerator-only model without an accelerator. gpt2 trains in bfloat16 on an accelerator
    (the library's GPU settings), other models in --dtype; with --data the vocabulary holds
    its characters (ids 1..n; 0 is padding)."""
    shape = dict(MODELS[model])
    if shape.pop("accelerator_only", False) and not accelerator:
        return None
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            shape["vocab"] = max(shape["vocab"], len(set(f.read())) + 1)
    dtype = "bfloat16" if (accelerator and model == "gpt2") else args.dtype
    return shape, dict(shape, seed=0, lr=1e-3, dtype=dtype, allocator=allocator,
                       data=args.data, configure_cpu=args.configure_cpu)


def bench_train(args, env, allocator, accelerator) -> list[dict]:
    results = []
    for model_name in args.models:
        specs = _model_spec(model_name, args, allocator, accelerator)
        if specs is None:
            print(f"\n[{model_name}] skipped: accelerator only (no GPU/TPU here)")
            results.append({"model": model_name, "skipped": "accelerator only"})
            continue
        m, base = specs
        dtype = base["dtype"]
        workers = []
        print(f"\n[{model_name}] starting workers ...", flush=True)
        jax_specs = [("jax", {}, {}, {})] + [_parse_variant(v) for v in args.variant]
        batch_of = {}  # sequences per step, by row
        for name, venv, cfg, over in jax_specs:
            workers.append(Worker(name, "jax", dict(base, cfg=cfg, **over), {**env, **venv}))
            batch_of[name] = over.get("batch", m["batch"])
        if "torch" in args.frameworks:
            workers.append(Worker("torch eager", "torch", dict(base, compile=False), env))
        if "torch_compile" in args.frameworks:
            workers.append(Worker("torch.compile", "torch", dict(base, compile=True), env))
        for w in workers:
            batch_of.setdefault(w.name, m["batch"])
        live = [w for w in workers if not w.error]
        for w in workers:
            if w.error:
                print(f"  {w.name}: unavailable ({w.error.splitlines()[-1][:200]})")
        jax_worker = workers[0]
        probe = jax_worker.call("run", steps=1)
        if "error" in probe:
            raise SystemExit(f"JAX training failed: {probe['error']}")
        steps = max(1, round(args.round_seconds / max(probe["times"][0], 1e-4)))
        for w in live[1:]:  # the same step count everywhere: the loss column compares alike
            w.call("run", steps=1)
        times = {w.name: [] for w in live}
        cpu_times = {w.name: [] for w in live}
        round_medians = {w.name: [] for w in live}
        # The matmul reference, measured by every framework between the rounds: a peak, so
        # the best round counts (the machine is shared; interference only slows it down).
        mm = {"jax": [], "jax_default": [], "torch": []}
        torch_w = next((w for w in live if w.name == "torch eager"), None)
        for r in range(args.repeats):
            order = live[r % len(live):] + live[:r % len(live)]
            for w in order:
                out = w.call("run", steps=steps)
                if "error" in out:
                    print(f"  {w.name}: failed ({out['error'][:200]})")
                    round_medians[w.name].append(float("nan"))  # keeps rounds aligned
                    continue
                times[w.name] += out["times"]
                cpu_times[w.name] += out["cpu"]
                round_medians[w.name].append(_median(out["times"]))
            jax_mm = jax_worker.call("matmul", n=args.matmul_size)
            mm["jax"].append(jax_mm["flops_per_s"])
            if jax_mm["default_flops_per_s"] is not None:
                mm["jax_default"].append(jax_mm["default_flops_per_s"])
            if torch_w is not None:
                rate = torch_w.call("matmul", n=args.matmul_size).get("flops_per_s")
                if rate:
                    mm["torch"].append(rate)
            print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {1e3 * round_medians[n][-1]:.1f} ms" for n in round_medians
                if round_medians[n] and not math.isnan(round_medians[n][-1])), flush=True)
        stats = {w.name: w.call("stats") for w in workers}
        for w in workers:
            w.close()
        info = stats[jax_worker.name]
        # The MFU reference: the best matmul rate of any framework in any round. JAX's alone,
        # compiled with the step's options, can trail the machine (on the AMD EPYC 94-98
        # GFLOP/s against PyTorch's 118-135), which read as MFU over 100%.
        peak_measured = max(max(v) for v in mm.values() if v)
        # The datasheet peak is bfloat16's: a float32 row's fraction of it would mislead.
        datasheet = datasheet_peak(info["device_kind"]) if dtype == "bfloat16" else None
        rows = []
        for w in workers:
            st = stats[w.name]
            if w.name not in times or not times[w.name]:
                rows.append({"framework": w.name, "error": w.error or st.get("error")})
                continue
            t = _median(times[w.name])
            tokens = batch_of[w.name] * m["context"]
            # A variant's own model (`cfg.num_layers=2`, ...) does its own work; the PyTorch
            # rows are the base model.
            flops_tok = st.get("flops_per_token") or info["flops_per_token"]
            achieved = flops_tok * tokens / t
            row = {
                "framework": w.name, "batch": batch_of[w.name],
                "step_s": t, "steps": len(times[w.name]),
                "step_cpu_s": _median(cpu_times[w.name]),
                "tokens_per_s": tokens / t, "flops_per_token": flops_tok,
                "achieved_flops_per_s": achieved,
                "mfu_datasheet": achieved / datasheet if datasheet else None,
                "mfu_measured_matmul": achieved / peak_measured,
                "compile_s": st.get("compile_s"), "loss": st.get("loss"),
                "peak_memory": st.get("device_peak") or st.get("max_rss"),
                "peak_memory_kind": "device" if st.get("device_peak") else "process max RSS",
                "step_buffers": st.get("step_buffers"), "devices": st.get("devices", 1),
            }
            for ref in ("jax", "torch eager", "torch.compile"):
                if ref in round_medians and round_medians[ref] and w.name != ref:
                    # Time per token: rows with another batch (`batch=n`) compare alike.
                    row[f"speed_vs_{ref.replace(' ', '_').replace('.', '_')}"] = speed_ratio(
                        round_medians[ref], round_medians[w.name],
                        batch_of[ref] / batch_of[w.name])
            rows.append(row)
        results.append({
            "model": model_name, "shape": m, "dtype": dtype, "steps_per_round": steps,
            "rounds": args.repeats, "matmul_peak_flops_per_s": peak_measured,
            "matmul_size": args.matmul_size,
            "jax_matmul_flops_per_s": _median(mm["jax"]),
            "jax_default_matmul_flops_per_s": (_median(mm["jax_default"]) if mm["jax_default"]
                                               else None),
            "torch_matmul_flops_per_s": _median(mm["torch"]) if mm["torch"] else None,
            "matmul_flops_per_s_by_round": mm,
            "datasheet_peak_flops_per_s": datasheet, "device_kind": info["device_kind"],
            "xla_flags": info["xla_flags"], "rows": rows,
        })
        print_train(results[-1])
    return results


def _fmt(x, scale=1.0, spec=".1f", none="n/a"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(
        x * scale, spec)


def print_train(res: dict) -> None:
    cols = ["framework", "step ms", "cpu ms", "tok/s", "GFLOP/tok", "GFLOP/s", "MFU sheet",
            "MFU mm", "x eager", "x compile", "x jax", "compile s", "peak MB", "loss"]
    lines = []
    for r in res["rows"]:
        if "error" in r:
            lines.append([r["framework"], "failed: " + str(r["error"]).splitlines()[-1][:60]])
            continue
        lines.append([
            r["framework"], _fmt(r["step_s"], 1e3), _fmt(r["step_cpu_s"], 1e3),
            _fmt(r["tokens_per_s"], 1, ".0f"),
            _fmt(r["flops_per_token"], 1e-9, ".4f"), _fmt(r["achieved_flops_per_s"], 1e-9, ".0f"),
            _fmt(r["mfu_datasheet"], 100, ".1f") + ("%" if r["mfu_datasheet"] else ""),
            _fmt(r["mfu_measured_matmul"], 100, ".0f") + "%",
            _fmt(r.get("speed_vs_torch_eager"), 1, ".2f", "-"),
            _fmt(r.get("speed_vs_torch_compile"), 1, ".2f", "-"),
            _fmt(r.get("speed_vs_jax"), 1, ".2f", "-"),
            _fmt(r["compile_s"], 1, ".1f"), _fmt(r["peak_memory"], 2 ** -20, ".0f"),
            _fmt(r["loss"], 1, ".3f")])
    print(f"\n{res['model']}: {res['shape']}, {res['dtype']}, {res['rounds']} rounds x "
          f"{res['steps_per_round']} steps; {res['dtype']} {res['matmul_size']}^2 matmul, "
          "median of "
          f"rounds: {_fmt(res['jax_matmul_flops_per_s'], 1e-9, '.0f')} GFLOP/s (JAX, step's "
          f"compile options), {_fmt(res['jax_default_matmul_flops_per_s'], 1e-9, '.0f')} "
          f"(JAX, without them), {_fmt(res['torch_matmul_flops_per_s'], 1e-9, '.0f')} "
          f"(PyTorch); MFU mm "
          f"divides by the best of any round, "
          f"{_fmt(res['matmul_peak_flops_per_s'], 1e-9, '.0f')}; datasheet peak "
          f"{_fmt(res['datasheet_peak_flops_per_s'], 1e-12, '.0f')} TFLOP/s")
    _print_rows(cols, lines)


def _print_rows(cols, lines) -> None:
    widths = [max(len(str(row[i])) for row in [cols, *lines] if i < len(row))
              for i in range(len(cols))]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in lines:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


def _call_worker(kind: str, spec: dict, env: dict, op: str = "run_all", **op_args) -> dict:
    """Run one command in a fresh `kind` worker; print the error, if any, under `kind`."""
    w = Worker(kind, kind, spec, env)
    out = w.call(op, **op_args)
    w.close()
    if "error" in out:
        print(f"  {kind} failed: {out['error'][:300]}")
    return out


def bench_attention(args, env, allocator, accelerator) -> dict:
    lengths = args.attention_lengths or ([128, 256, 512, 1024, 2048, 4096] if accelerator
                                         else [128, 256, 512, 1024, 2048])
    spec = dict(batch=args.attention_batch, heads=args.attention_heads,
                head_dim=args.attention_head_dim, lengths=lengths,
                repeats=args.attention_repeats, allocator=allocator,
                dtype="bfloat16" if accelerator else "float32",
                configure_cpu=args.configure_cpu)
    print(f"\n[attention] causal, batch {spec['batch']}, {spec['heads']} heads of "
          f"{spec['head_dim']}, {spec['dtype']}, forward + backward ...", flush=True)
    out = _call_worker("attention", spec, env)
    if "error" in out:
        return out
    if "torch" in args.frameworks:  # PyTorch's fused kernel, in its own process
        sdpa = _call_worker("torch_attention", spec, env)
        for row, trow in zip(out["rows"], sdpa.get("rows", [])):
            row["torch_sdpa"] = {"times": trow["times"], "memory": None}
    impls = [k for k in out["rows"][0] if k not in ("length", "max_abs_diff_vs_ops")]
    cols = ["length"] + [f"{n} ms" for n in impls] + [f"{n} MB" for n in impls] + [
        f"{n} GFLOP/s" for n in impls]
    lines = []
    for row in out["rows"]:
        flops = 12 * spec["batch"] * spec["heads"] * row["length"] ** 2 * spec["head_dim"]
        ms, mb, rate = [], [], []
        for n in impls:
            r = row.get(n, {})
            if "times" not in r:
                ms.append("err")
                mb.append("err")
                rate.append("err")
                continue
            t = _median(r["times"])
            r["median_s"] = t
            ms.append(_fmt(t, 1e3, ".2f"))
            mb.append(_fmt(r["memory"], 2 ** -20, ".1f"))
            rate.append(_fmt(flops / t, 1e-9, ".0f"))
        lines.append([row["length"], *ms, *mb, *rate])
    out.update(spec)
    _print_rows(cols, lines)
    return out


def bench_profile(args, env, allocator, accelerator) -> dict:
    """Where a JAX training step's time goes, by op category and by model component and
    pass, for each model of --models (a `jax.profiler` trace; see `summarize_trace`)."""
    out = {}
    rows = [("", {}, {}, {})] + [_parse_variant(v) for v in args.variant]
    for model in args.models:
        specs = _model_spec(model, args, allocator, accelerator)
        if specs is None:
            print(f"\n[profile] {model} skipped: accelerator only (no GPU/TPU here)")
            continue
        for variant, venv, cfg, over in rows:
            spec = dict(specs[1], cfg=cfg, **over)
            name = f"{model} {variant}" if variant else model
            print(f"\n[profile] {name}: jax.profiler trace of {args.profile_steps} training "
                  "steps", flush=True)
            out[name] = _call_worker("jax", spec, {**env, **venv}, "profile",
                                     steps=args.profile_steps)
            _print_profile(out[name])
    return out


def _print_profile(res: dict) -> None:
    """The profile of one row: op categories, model components by pass, the slowest ops."""
    if "error" in res:
        print(f"  failed: {res['error'][:300]}")
        return
    busy, wall = res["busy_s"], res["busy_wall_s"]
    if not wall:
        print("  no XLA ops in the trace (this summary reads XLA:CPU's thunks and GPU "
              "stream kernels)")
        return
    lines = [[c, _fmt(v["seconds"], 1e3, ".1f"), _fmt(v["wall_seconds"], 1e3, ".1f"),
              f"{100 * v['wall_seconds'] / wall:.0f}%", f"{v['ops']:.0f}"]
             for c, v in sorted(res["categories"].items(),
                                key=lambda kv: -kv[1]["wall_seconds"])]
    print(f"  step {res['wall_s'] * 1e3:.1f} ms wall while traced; sum of op times "
          f"{busy * 1e3:.1f} ms (independent ops overlap); no op in "
          f"flight {res['idle_s'] * 1e3:.1f} ms")
    _print_rows(["category", "op time ms", "step ms", "share", "ops/step"], lines)
    comps = res.get("components")
    if comps:
        print("  by model component (step time, ms/step, each moment split among the ops "
              "in flight):")
        lines = [[c, *(_fmt(v[p], 1e3, ".1f") for p in PASSES),
                  _fmt(sum(v.values()), 1e3, ".1f"),
                  f"{100 * sum(v.values()) / wall:.0f}%"]
                 for c, v in sorted(comps.items(), key=lambda kv: -sum(kv[1].values()))]
        _print_rows(["component", *PASSES, "total", "share"], lines)
    print("  top ops: " + ", ".join(f"{t['op']} {t['seconds'] * 1e3:.2f} ms"
                                    for t in res["top"][:6]))


def bench_decoding(args, env, allocator, accelerator) -> dict:
    spec = dict(batch_sizes=args.decoding_batch, new_tokens=args.decoding_new_tokens,
                repeats=args.decoding_repeats, allocator=allocator,
                configure_cpu=args.configure_cpu, model=args.decoding_model,
                dtype="bfloat16" if accelerator else args.dtype)
    print(f"\n[decoding] {spec['model']} model, {spec['dtype']}, greedy, {spec['new_tokens']} "
          f"new tokens, batch {spec['batch_sizes']}, KV cache vs recomputation ...", flush=True)
    out = _call_worker("decoding", spec, env)
    if "error" in out:
        return out
    base = {r["batch"]: r["tokens_per_s"] for r in out["rows"] if r["method"] == "no cache"}
    lines = [[r["batch"], r["method"], _fmt(r["seconds"], 1, ".3f"),
              _fmt(r["tokens_per_s"], 1, ".1f"), _fmt(r["tokens_per_s"] / base[r["batch"]], 1,
                                                      ".1f") + "x"] for r in out["rows"]]
    _print_rows(["batch", "method", "seconds", "tokens/s", "speed-up"], lines)
    out.update(spec)
    return out


def machine_info(env) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    versions = subprocess.run(
        [sys.executable, "-c", "import jax, jaxlib, flax, optax; print(jax.__version__, "
         "jaxlib.__version__, flax.__version__, optax.__version__)"],
        capture_output=True, text=True, env=env).stdout.split()
    try:
        import importlib.metadata as md
        torch_version = md.version("torch")
    except Exception:
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": versions[:1], "jaxlib": versions[1:2], "flax": versions[2:3],
            "optax": versions[3:4], "torch": torch_version,
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="train,attention",
                        help="comma list of: train, attention, decoding, profile")
    parser.add_argument("--models", default="nanogpt-char,gpt-6x384,gpt2",
                        help=f"comma list of: {', '.join(MODELS)} (gpt2 needs an accelerator)")
    parser.add_argument("--frameworks", default="jax,torch,torch_compile",
                        help="comma list of: jax, torch, torch_compile")
    parser.add_argument("--repeats", type=_positive_int, default=5,
                        help="alternated rounds per model")
    parser.add_argument("--round_seconds", type=_positive_float, default=1.0,
                        help="about how long each framework runs per round")
    parser.add_argument("--matmul_size", type=_positive_int, default=None,
                        help="n of the [n, n] @ [n, n] matmul peak, in the training dtype "
                             "(default 2048 on CPU, 8192 on accelerators)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the CPU models (gpt2 on GPU uses bfloat16)")
    parser.add_argument("--data", default=None,
                        help="a text file to draw character batches from (default: random ids)")
    parser.add_argument("--allocator", default="auto",
                        choices=("auto", "jemalloc", "glibc", "default"),
                        help="memory allocator for every worker alike: jemalloc (preloaded), "
                             "glibc (raised mmap/trim thresholds; transparent huge pages where the "
                             "kernel allows, see perf.hugepage_env), default; auto = jemalloc if "
                             "installed, else glibc")
    parser.add_argument("--configure_cpu", type=int, default=1,
                        help="1: JAX workers call flaxformer_lite.perf.configure_cpu()")
    parser.add_argument("--variant", action="append", default=[],
                        help="an extra JAX row, 'name:ENV=VAL,cfg.field=VAL,disable=a+b,"
                             "configure_cpu=0,cpu_devices=2,microbatches=4,batch=32' "
                             "(repeatable; disable names fast paths of "
                             "flaxformer_lite.ops.fast_paths; cpu_devices=n trains data "
                             "parallel over the CPU split into n JAX devices; microbatches=k "
                             "computes the gradient in k slices; batch=n trains n sequences a "
                             "step, compared per token)")
    parser.add_argument("--attention_lengths", default=None,
                        help="comma list (default 128..2048 on CPU, ..4096 on accelerators)")
    parser.add_argument("--attention_batch", type=_positive_int, default=1)
    parser.add_argument("--attention_heads", type=_positive_int, default=8)
    parser.add_argument("--attention_head_dim", type=_positive_int, default=64)
    parser.add_argument("--attention_repeats", type=_positive_int, default=5)
    parser.add_argument("--profile_steps", type=_positive_int, default=5,
                        help="steps traced by the profile section")
    parser.add_argument("--decoding_batch", default="1",
                        help="comma list of batch sizes for the decoding section")
    parser.add_argument("--decoding_model", default="small", choices=("small", "gpt2"),
                        help="decoding section's model: small (6 layers of 384, vocabulary 256) "
                             "or gpt2 (124M); bfloat16 on accelerators, --dtype on a CPU")
    parser.add_argument("--decoding_new_tokens", type=_positive_int, default=256)
    parser.add_argument("--decoding_repeats", type=_positive_int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.worker_spec))
        return 0

    args.sections = args.sections.split(",")
    for name in args.sections:
        if name not in ("train", "attention", "decoding", "profile"):
            parser.error(f"--sections: unknown {name!r}; known: train, attention, decoding, "
                         "profile")
    args.models = args.models.split(",")
    args.frameworks = args.frameworks.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; known: {', '.join(MODELS)}")
    for name in args.frameworks:
        if name not in FRAMEWORKS:
            parser.error(f"--frameworks: unknown {name!r}; known: {', '.join(FRAMEWORKS)} "
                         "(the JAX rows always run)")
    names = []
    for text in args.variant:
        try:
            names.append(_parse_variant(text)[0])
        except ValueError as e:
            parser.error(str(e))
    if len(set(names)) < len(names):
        parser.error(f"--variant: row names must differ, got {', '.join(names)}")
    for flag in ("decoding_batch", "attention_lengths"):
        text = getattr(args, flag)
        if text:
            try:
                setattr(args, flag, [_positive_int(x) for x in text.split(",")])
            except argparse.ArgumentTypeError as e:
                parser.error(f"--{flag}={text}: {e}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is not installed (pip install -e '.[bench]'): JAX rows only.")
        args.frameworks = [f for f in args.frameworks if not f.startswith("torch")]

    env, allocator = _env(args)
    accelerator = _accelerator()
    if args.matmul_size is None:
        args.matmul_size = 8192 if accelerator else 2048
    info = machine_info(env)
    from flaxformer_lite.perf import GLIBC_HUGEPAGE_TUNABLE
    label = allocator  # workers get `allocator`; "glibc" tells them to call mallopt
    if allocator == "glibc" and GLIBC_HUGEPAGE_TUNABLE in env.get("GLIBC_TUNABLES", ""):
        label = "glibc, huge pages"
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_average']}; "
          f"allocator {label}; jax {info['jax']}, torch {info['torch']}")
    results = {"machine": info, "allocator": label, "args": vars(args)}
    if "train" in args.sections:
        results["train"] = bench_train(args, env, allocator, accelerator)
    if "attention" in args.sections:
        results["attention"] = bench_attention(args, env, allocator, accelerator)
    if "decoding" in args.sections:
        results["decoding"] = bench_decoding(args, env, allocator, accelerator)
    if "profile" in args.sections:
        results["profile"] = bench_profile(args, env, allocator, accelerator)
    results["machine"]["load_average_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
