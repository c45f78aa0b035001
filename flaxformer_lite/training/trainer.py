"""`train(...)`: the loop every experiment runs, resumable, interruptible and guarded.

    result = train(get_config("gpt2", ...), OptimizerConfig(learning_rate=3e-4),
                   lambda: my_batches(), workdir="/tmp/run", num_steps=10_000,
                   checkpoint_every=1000, eval_data=lambda: my_eval_batches(), eval_every=1000)

What it guarantees:
- Resume: if `workdir` holds checkpoints, training continues from the latest readable one: the
  state (params, optimizer, step, RNG) and the data iterator's position (`get_state`/`set_state`
  when the iterator has them, otherwise by skipping the batches already consumed), so a resumed
  run reproduces the uninterrupted one.
- Interrupts: SIGTERM or SIGINT (Ctrl-C) finish the current step, save a checkpoint at that step
  and return with `interrupted=True` and `signal` set (a second Ctrl-C aborts at once); a script
  then exits with `result.exit_status` (143, 130) so that job restarters rerun it. Every
  process of a multi-process run stops at the same step.
- Non-finite loss: a NaN/inf loss, gradient norm or update raises `NonFiniteLossError`
  naming the step. The check runs
  before every save, so no checkpoint holds a diverged state; the last good one stays.
- Checkpoints every `checkpoint_every` steps and at the end, the last `keep_checkpoints` kept
  (plus the best by `best_metric`), written asynchronously; a failed save stops the run at the
  next log step (`CheckpointSaveError`).
- One run per workdir: a second `train` on a workdir in use raises (a `flock` on
  `workdir/.lock`, which the kernel drops when the process ends).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from flaxformer_lite.config import TransformerConfig, check_number
from flaxformer_lite.training import distributed, partitioning
from flaxformer_lite.training.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    _first_line,
    default_best_mode,
    iterator_state,
    restore_iterator,
)
from flaxformer_lite.training.losses import LossConfig, add_metrics, summarize
from flaxformer_lite.training.optim import OptimizerConfig, num_updates
from flaxformer_lite.training.parallel import STEPS_AHEAD, Engine, ParallelConfig
from flaxformer_lite.training.state import TrainState
from flaxformer_lite.training.steps import LossFn

log = logging.getLogger("flaxformer_lite.training")

# Steps the host may dispatch before the devices finish them (`parallel.STEPS_AHEAD`, imported
# above): between logs `Engine.train_step` only waits for the step `STEPS_AHEAD` back, which
# keeps the devices fed (the host prepares the next batch while a step runs) and bounds the
# executions queued at once. Unbounded, several CPU devices in one process
# (`--xla_force_host_platform_device_count`) can deadlock: every queued execution's all-reduce
# waits for its peers on one of XLA's few CPU threads, until none is left for the peers and XLA
# aborts the process after 40 s (reproduced with 2 devices and a long `log_every`).

Batch = Mapping[str, Any]
Hook = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """state: the final state (device layout of `engine`); step: steps done; history: every
    logged metrics dict (with its "step"); interrupted: stopped by SIGTERM/SIGINT; signal: the
    one this process received (`signal.SIGTERM`, `signal.SIGINT`), None if it received none
    (a multi-process run stopped by another process's)."""

    state: TrainState
    step: int
    history: list[dict[str, float]]
    interrupted: bool
    engine: Engine
    signal: signal.Signals | None = None
    # With `best_metric`: the step of the best checkpoint kept (`load_run(workdir,
    # step="best")` loads it); None without one.
    best_step: int | None = None

    @property
    def exit_status(self) -> int:
        """The status a script should exit with: 0 for a run that ended, 128 + the signal's
        number for an interrupted one (143 for SIGTERM, 130 for SIGINT; 143 when another
        process received it), as for a process the signal killed. A supervisor that restarts
        failed jobs then reruns it, and the rerun resumes from its checkpoint."""
        if not self.interrupted:
            return 0
        return 128 + int(self.signal or signal.SIGTERM)

    @property
    def params(self) -> Any:
        """Host (numpy) copy of the final parameters."""
        return self.engine.params(self.state)


# ---- hooks ------------------------------------------------------------------------------------

# What the eval step reports besides loss and accuracy (the compact line leaves them out).
_EVAL_STEP_SUMS = ("nll", "z_loss", "perplexity", "tokens", "sequences", "steps", "correct")


def _compact(step: int, metrics: Mapping[str, float]) -> str:
    keys = ("train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm",
            "train/tokens_per_second", "eval/loss", "eval/accuracy")
    # An eval_fn's own metrics too (a BLEU, an F1), not the eval step's other sums.
    keys += tuple(k for k in metrics if k.startswith("eval/") and k not in keys
                  and k.split("/", 1)[1] not in _EVAL_STEP_SUMS
                  and isinstance(metrics[k], int | float))
    parts = [f"{k.split('/')[0][0]}.{k.split('/', 1)[1]}={metrics[k]:.4g}" for k in keys
             if k in metrics]
    return f"step {step}: {' '.join(parts)}"


def log_hook(step: int, metrics: Mapping[str, float]) -> None:
    """Log a compact line (loss, accuracy, learning rate, gradient norm, tokens/s, eval)
    through `logging` at INFO, which Python shows only once configured to."""
    log.info("%s", _compact(step, metrics))


def print_hook(step: int, metrics: Mapping[str, float]) -> None:
    """Print `log_hook`'s line to stdout: `train()`'s default."""
    print(_compact(step, metrics), flush=True)


class TensorBoardHook:
    """Write every metric as a scalar to `logdir` with tensorboardX.

    The writer (and its event file) is created with the first metrics.
    """

    def __init__(self, logdir: str | os.PathLike):
        self._logdir = os.fspath(logdir)
        self._writer = None
        self._purge_step = None

    def on_start(self, step: int) -> None:
        """A resumed run: events a killed run wrote after `step` are purged (hidden from
        TensorBoard), so each step's curve holds one value."""
        self._purge_step = step + 1 if step else None

    @property
    def writer(self):
        """The `tensorboardX.SummaryWriter` (created on first use)."""
        if self._writer is None:
            self._writer = _summary_writer_class()(self._logdir, purge_step=self._purge_step)
        return self._writer

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _summary_writer_class():
    """`tensorboardX.SummaryWriter`, imported without PyTorch when PyTorch is not loaded yet.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (these
    hooks pass floats): ~1.6 s of CPU at the start of every run. `sys.modules["torch"] = None`
    turns that import into an ImportError for the moment tensorboardX loads; torch imports
    normally afterwards.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return SummaryWriter


# ---- signals ----------------------------------------------------------------------------------

class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked between steps (second SIGINT aborts)."""

    def __init__(self, enabled: bool):
        self.requested: str | None = None
        self.signal: signal.Signals | None = None  # the first one received
        self._previous = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._pending: collections.deque = collections.deque()  # multi-process: in flight
        self._any = None

    def __enter__(self):
        if self._enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum)
        self.requested = self.signal.name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether to stop before this step: on one process, whether it was asked to.

        On several, every call enqueues a tiny collective "did any process ask?" on the
        devices, asynchronously like a train step, and reads the one enqueued `STEPS_AHEAD`
        calls earlier, computed by then. All processes thus leave the loop at the same step,
        `STEPS_AHEAD` steps after the request, and the host never waits for the device here.
        """
        local = self.requested is not None
        if jax.process_count() == 1:
            return local
        if self._any is None:
            devices = np.array(jax.devices()).reshape(jax.process_count(), -1)
            mesh = jax.sharding.Mesh(devices, ("processes", "local"))
            self._flags = jax.sharding.NamedSharding(mesh, P(("processes", "local")))
            self._any = jax.jit(jnp.any, out_shardings=jax.sharding.NamedSharding(mesh, P()))
        flags = np.full((jax.local_device_count(),), local)
        self._pending.append(self._any(
            jax.make_array_from_process_local_data(self._flags, flags)))
        if len(self._pending) <= STEPS_AHEAD:
            return False
        return bool(np.asarray(self._pending.popleft().addressable_data(0)))


# ---- the loop ---------------------------------------------------------------------------------

def _make_iterator(data) -> Iterator[Batch]:
    if hasattr(data, "__next__"):
        return data
    if callable(data) and not hasattr(data, "__iter__"):
        data = data()
    return data if hasattr(data, "__next__") else iter(data)


CUSTOM_TX = "custom: train(tx=...)"  # config.json's optimizer.tx of a run with its own optax


def _write_config(workdir: str, record: dict, step: int, num_steps: int,
                  global_batch: int | None = None) -> None:
    """Record the run's configs in `workdir/config.json`, once its checkpoint (if any) has been
    restored with them and its first train step has been dispatched (a run that fails to
    restore, or whose first batch is refused, leaves the record alone); name the fields that
    changed since the recorded run, e.g. a schedule moved by a larger `num_steps`.
    `global_batch`: the rows of a global batch (the first batch's rows times the processes),
    recorded as `run.global_batch`; a resume that changes it is warned about.

    config.json holds the latest settings; `config_history.jsonl` gets a line (`step`: where
    they took effect, `changed`, `record`) each time they change, so a resumed run's earlier
    steps stay described. A rerun with nothing left to train records nothing."""
    path = os.path.join(workdir, "config.json")
    was = _recorded_run(workdir).get("global_batch")
    if global_batch is None and isinstance(was, int):
        record["run"]["global_batch"] = was  # a rerun with nothing to train reads no batch
    if global_batch is not None:
        record["run"]["global_batch"] = int(global_batch)
        if step and isinstance(was, int) and was != global_batch:
            log.warning(
                "The global batch changes from %d to %d rows at step %d: each update now "
                "averages %s examples with the same learning rate and optimizer state. To keep "
                "the batch on fewer devices, keep batch_size=%d (the global batch) and set "
                "ParallelConfig(microbatches=k), which runs each step in k sequential parts.",
                was, global_batch, step, "more" if global_batch > was else "fewer", was)
    changed = _config_changes(workdir, record, with_run=True)
    if step >= num_steps and changed is not None:
        if changed:
            log.warning("This rerun's configs differ from the run recorded in %s (%s), but it "
                        "trains nothing: the record is left as it was.", path,
                        "; ".join(changed))
        return
    if changed:
        log.warning("This run's configs differ from the run recorded in %s: %s. From step "
                    "%d on; config_history.jsonl keeps the earlier settings.", path,
                    "; ".join(changed), step)
    history = os.path.join(workdir, "config_history.jsonl")
    lines = []
    if not os.path.exists(history) and changed is not None:
        # A workdir from before the history: its record as the first line, of unknown start.
        with open(path) as f:
            lines.append({"step": None, "changed": [], "record": json.load(f)})
    if changed or (not os.path.exists(history) and changed is None):
        lines.append({"step": step, "changed": changed or [], "record": record})
    if lines:
        with open(history, "a") as f:
            for line in lines:
                f.write(json.dumps(line, sort_keys=True, allow_nan=True) + "\n")
    _write_json(path, record, indent=2, sort_keys=True)


def _write_json(path: str, obj, **kw) -> None:
    """`obj` as JSON at `path`, whole or not at all (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    os.replace(tmp, path)


def _run_record(seed, num_steps: int, engine: Engine) -> dict:
    """What else a rebuild needs: the seed, the length, the software and the devices."""
    from importlib import metadata

    versions = {}
    for name in ("flaxformer_lite", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"seed": int(seed) if isinstance(seed, numbers.Integral) else "a typed key",
            "num_steps": int(num_steps), "versions": versions,
            "backend": jax.default_backend(), "device_kind": engine.devices[0].device_kind,
            "devices": len(engine.devices), "processes": jax.process_count(),
            "mode": engine.describe()}


def _trainable_record(engine: Engine) -> str:
    """The `Engine(trainable=...)` selection as config.json records it: counts and a digest
    of the trainable paths, so a rerun with another selection is named."""
    paths = [p for p, t in zip(partitioning.flat_leaves(engine._abstract.params),
                               engine.trainable) if t]
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:12]
    return f"{len(paths)} of {len(engine.trainable)} arrays ({digest})"


def _recorded_run(workdir: str) -> dict:
    """The `run` section of `workdir/config.json` ({} without one)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            run = json.load(f).get("run")
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):  # np.float32(0.1) is a number, not "0.1"
        return value.item()
    return str(value)


def _config_record(**configs) -> dict:
    """The configs as `config.json` holds them (JSON types; None entries left out)."""
    out = {}
    for name, c in configs.items():
        if c is None:
            continue
        if hasattr(c, "to_dict"):
            out[name] = c.to_dict()
        elif isinstance(c, Mapping):
            out[name] = dict(c)
        elif dataclasses.is_dataclass(c) and not isinstance(c, type):
            out[name] = dataclasses.asdict(c)
        elif hasattr(c, "__dict__"):  # argparse.Namespace and the like
            out[name] = dict(vars(c))
        else:
            raise ValueError(f"train({name}=...) must be a mapping, a dataclass or an object "
                             f"with attributes (argparse.Namespace); got {type(c).__name__}.")
    return json.loads(json.dumps(out, default=_json_default))


def _flat(record: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_changes(workdir: str, record: dict, with_run: bool = False) -> list[str] | None:
    """`"optimizer.clip_norm: None -> 1.0"` for each field of `record` (`_config_record`) that
    differs from the run recorded in `workdir/config.json` (None if there is no record); the
    `run` section (seed, length, versions, devices) too if `with_run`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    changed = []
    names = ("model", "optimizer", "loss", "parallel", "experiment") + (
        ("run",) if with_run else ())
    for name in names:
        # An experiment section may come or go (a script's run resumed by a bare train()); the
        # library's sections are compared where both records hold them.
        present = [isinstance(r.get(name), dict) for r in (old, record)]
        if not (all(present) or (name == "experiment" and any(present))):
            continue
        was, now = _flat(old.get(name) or {}), _flat(record.get(name) or {})
        new_default = _new_fields_at_default(name, was, now)
        changed += [f"{name}.{k}: {_shown(was, k)} -> {_shown(now, k)}"
                    for k in sorted(set(was) | set(now))
                    if (k not in was or k not in now or not _same(was[k], now[k]))
                    and k not in new_default]
    return changed


def _new_fields_at_default(name: str, was: Mapping, now: Mapping) -> set[str]:
    """Fields the recorded run predates that are at their default now: the run behaved as the
    default does, so nothing changed (a resume after an upgrade is not told of each field the
    library or a script gained). The library's configs by their defaults; an experiment
    script's by an unset value (None, False, 0, "") or, under its "model.", the
    TransformerConfig default; the `run` section's facts (seed, versions, best_metric, ...)
    are recorded, not compared, when the old record lacks them."""
    new = set(now) - set(was)
    if name == "run":
        return new
    cls = {"model": TransformerConfig, "optimizer": OptimizerConfig, "loss": LossConfig,
           "parallel": ParallelConfig}.get(name)
    if cls is not None:
        defaults = _flat(_config_record(d=cls())["d"])
        return {k for k in new if k in defaults and _same(now[k], defaults[k])}
    if name == "experiment":
        model = _flat(_config_record(d=TransformerConfig())["d"])
        return {k for k in new if now[k] in (None, False, 0, "") or (
            k.startswith("model.") and k[6:] in model and _same(now[k], model[k[6:]]))}
    return set()


def _shown(record: Mapping, key: str) -> str:
    """A recorded value as a change names it; a field one record lacks (a field the library
    gained since) is "(not recorded)", not None, which some fields take as a value."""
    return repr(record[key]) if key in record else "(not recorded)"


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN (also inside lists)."""
    return a == b or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _first_eval_batch(eval_data) -> Batch | None:
    """The first batch of a re-iterable `eval_data` (a factory or a collection), to compile the
    eval step early; None for a one-shot iterator, which peeking would consume."""
    if eval_data is None or hasattr(eval_data, "__next__"):
        return None
    return next(_eval_iterator(eval_data), None)


def _eval_iterator(eval_data) -> Iterator[Batch]:
    """The batches of one evaluation; a pipeline that repeats forever is refused (the
    evaluation would never end)."""
    data = eval_data
    if callable(data) and not hasattr(data, "__iter__") and not hasattr(data, "__next__"):
        data = data()
    if getattr(data, "endless", False):
        raise ValueError(
            f"eval_data gives {data!r}, which repeats forever (num_epochs=None): an evaluation "
            "over it would never end. Build it with num_epochs=1 (and shuffle=False), or cap "
            "it: lambda: itertools.islice(make_pipeline(), n).")
    return _make_iterator(data)


def evaluate(engine: Engine, state: TrainState, eval_data,
             stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Mean eval metrics over every batch of `eval_data` (a factory or an iterable).

    stop: asked before each batch; once it says True the evaluation is abandoned and None
    returned (`train` passes its stop-signal check, so SIGTERM does not wait for a whole eval
    set). On several processes it must answer alike on all of them at each call. An
    `eval_data` that yields no batch raises a ValueError (its metrics would be missing
    quietly, and a checkpoint ranked by them could not be saved).

    On a multi-process run the processes' eval sets may end at different batches (a finite
    pipeline shards examples, and packing or a remainder leaves some processes a batch short).
    Each step then agrees on whether any process still has a batch (one tiny all-gather), and
    a process that has run out feeds a batch of padding shaped like its last one (weight 0: it
    changes no metric sum), so that no process waits alone in a collective step.
    """
    sums: dict[str, Any] = {}
    outputs = []
    batches = _eval_iterator(eval_data)
    multi = jax.process_count() > 1
    last = None
    while True:
        if stop is not None and stop():
            return None
        batch = next(batches, None)
        if multi:  # 2: has a batch, 1: ran out after some, 0: never had one
            code = 2 if batch is not None else int(last is not None)
            codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel()
            if not np.any(codes == 2):
                break
            if np.any(codes == 0):  # every process raises, none waits in a collective
                raise ValueError(
                    f"eval_data yields no batch on process(es) {np.flatnonzero(codes == 0)} "
                    "while others have some; give every process at least one eval batch "
                    "(fewer processes, or a smaller eval batch size).")
            if (np.any(codes == 1) and engine.model_config.pad_id is None
                    and "segment_ids" not in (batch if batch is not None else last)):
                raise ValueError(  # on every process alike: none waits in a collective
                    f"eval_data ran out on process(es) {np.flatnonzero(codes == 1)} before "
                    "the others, and with TransformerConfig.pad_id=None only segment ids 0 "
                    "can mark the blank batch it would feed: give the eval batches "
                    "segment_ids, or every process the same number of them.")
            if batch is None:  # rows of padding shaped like the last batch
                rows = len(next(iter(last.values())))
                batch = engine.pad_batch({k: np.asarray(v)[:0] for k, v in last.items()},
                                         rows=rows)
            last = batch
        elif batch is None:
            break
        outputs.append(engine.eval_step(state, batch))  # fetched at the end: no wait a batch
    if not outputs:  # every process alike (none had a batch): none waits in a collective
        raise ValueError(
            "eval_data yielded no batch: an empty validation split (a text too short for one "
            "eval row), a filter that dropped every example, or fewer examples than one batch "
            "with the remainder dropped. Check the data (or lower the eval batch size), or "
            "pass eval_data=None.")
    for metrics in outputs:
        sums = add_metrics(sums, engine.metrics_to_host(metrics))
    return summarize(sums)


def _warn_schedule(opt: OptimizerConfig, num_steps: int) -> None:
    """A learning-rate schedule that does not fit the run trains quietly with the wrong rates
    (a cosine ending at update 2000 of 10000 sits at its final rate for 80% of the run)."""
    updates = num_updates(num_steps, opt.accumulation_steps)
    if num_steps % opt.accumulation_steps:
        log.warning("num_steps=%d is not a multiple of accumulation_steps=%d: the last %d "
                    "micro-batch(es) are accumulated but never applied.", num_steps,
                    opt.accumulation_steps, num_steps % opt.accumulation_steps)
    if opt.schedule == "cosine" and opt.decay_steps != updates:
        fix = (f"set decay_steps={updates} to decay over the run" if updates > opt.warmup_steps
               else f"lower warmup_steps={opt.warmup_steps} below the run's updates, then set "
                    "decay_steps to them")
        log.warning("The cosine schedule ends at update %d, but this run makes %d updates "
                    "(num_steps=%d / accumulation_steps=%d); %s.", opt.decay_steps, updates,
                    num_steps, opt.accumulation_steps, fix)
    if 0 < updates < opt.warmup_steps and opt.schedule != "vaswani":
        log.warning("warmup_steps=%d: the run's %d updates end before the learning rate "
                    "reaches its peak.", opt.warmup_steps, updates)


def train(model_config: TransformerConfig, optimizer_config: OptimizerConfig,
          train_data: Callable[[], Iterable[Batch]] | Iterable[Batch], *,
          workdir: str | os.PathLike, num_steps: int,
          parallel: ParallelConfig | None = None, loss: LossConfig | None = None,
          seed: int | jax.Array = 0,
          eval_data: Callable[[], Iterable[Batch]] | None = None,
          eval_fn: Callable[[TrainState, Engine], Mapping[str, float]] | None = None,
          eval_every: int | None = None,
          checkpoint_every: int | None = 1000, keep_checkpoints: int | None = 3,
          best_metric: str | None = None, best_mode: str | None = None,
          log_every: int = 100, hooks: Sequence[Hook] | None = None,
          async_checkpointing: bool = True, handle_signals: bool = True,
          engine: Engine | None = None,
          warm_up: Callable[[TrainState, Engine], Any] | None = None,
          experiment: Mapping[str, Any] | None = None,
          tx: optax.GradientTransformation | None = None,
          init_params: Any = None, model: nn.Module | None = None,
          trainable: Callable[[str], bool] | Any | None = None,
          loss_fn: LossFn | None = None, loss_batch_keys: Sequence[str] = ()) -> TrainResult:
    """Train for `num_steps` steps (batches), resuming from `workdir` if it has checkpoints.

    train_data: a factory returning an iterator of host batches (this process's slice of each
      global batch, see `distributed.local_batch`), or an iterable/iterator. If the iterator
      has `get_state()`/`set_state()` (grain) its position is checkpointed.
    eval_data: factory of a finite iterable of eval batches (pad the last one with padding
      rows: targets `pad_id`, or segment ids 0 with `pad_id=None`; `Engine.pad_batch`);
      summed with `eval_step` into "eval/loss", "eval/accuracy", "eval/perplexity", ...
    eval_fn: `(state, engine) -> {name: number}` for other scalar metrics (BLEU, exact
      match); keys without a "/" get the "eval/" prefix; None counts as no metrics, and a
      value that is not a number (a text sample) is skipped with a warning: write those
      yourself. Both run every `eval_every` steps (None or 0: only
      at the end) and at the end of the run.
    checkpoint_every: save every this many steps (None or 0: only at the end and on
      interrupts).
    best_metric: e.g. "eval/loss": also keep the best checkpoint by it (`best_mode` "min" or
      "max"; by default from its name, `default_best_mode`: "max" for a score such as
      accuracy, bleu, f1; "min" for a cost such as loss, perplexity; refused when the name
      says neither); every evaluation then also saves a checkpoint, so the best one is always
      among them (a NaN is never best). `TrainResult.best_step` names it (None when no
      checkpoint holds a finite value) and `load_run(workdir, step="best")` loads it.
    log_every: how often train metrics (means over the window) reach the hooks and history.
    hooks: `hook(step, metrics)` called on the main process at every log/eval step
      (default: `print_hook`, a line to stdout; `log_hook` sends it through `logging`).
      Metric names are "train/..." and "eval/...". A hook with an
      `on_start(step)` method is first told the step the run starts from: 0, or the restored
      checkpoint's, past which a killed run may have logged (`TensorBoardHook` then hides
      those events).
    engine: reuse an `Engine` (and its compiled steps) built for the same configs; `parallel`
      and `loss` then default to the engine's.
    warm_up: `(state, engine) -> None`, called once before the first step, after the train and
      eval steps have started compiling on background threads (`Engine.precompile`; for that
      the `eval_data` factory is called once more, for its first batch). Start compiling what
      `eval_fn` runs here (a sampler, a beam search) so that it overlaps too.
    tx: an optax transformation to train with instead of `optimizer_config`'s (which then
      only supplies the learning-rate metric), e.g. `optax.multi_transform` to freeze the
      embeddings while fine-tuning.
    init_params: parameters to start from when the workdir has no checkpoint (pretrained
      ones to fine-tune, e.g. `load_params(pretrained_dir)[1]`; for a changed model,
      `merge_params(new, old)[0]`), with a fresh optimizer state; a resumed run continues
      from its checkpoint instead.
    trainable: the parameters to train, the rest frozen (a fine-tune of the head, the last
      layers or adapters): a function of a parameter's path ("decoder/layers/layer_3/mlp/wi/
      kernel") or a tree of bools shaped like the parameters (see `Engine`). Frozen ones are
      not differentiated and get no optimizer state; config.json records the selection.
    loss_fn: an objective of your own instead of the cross-entropy (DPO, a policy gradient;
      `steps.train_step` says what it is called with and returns), with every device layout,
      micro-batches, `trainable`, the NaN guard, checkpoints and resuming; the eval step
      reports its sums too. `loss_batch_keys`: the batch entries it reads besides the model's
      (`[batch, ...]` arrays, laid out and split with the batch). config.json records its name
      (`loss.loss_fn`), so a rerun with another is told.
    model: a Flax module of your own to train instead of `make_model(model_config)`, with
      `model.config == model_config` (see `Engine`). Its class is recorded in config.json
      (`model.module`), and a rerun with another class (or none) is told so.
    experiment: the caller's own settings (data, batch size, ...; e.g. an ml_collections
      config's `to_dict()`), recorded in `workdir/config.json` beside the library's configs
      and, like them, compared on a rerun: each changed field is named in a warning (a resumed
      run on other data or batches continues silently otherwise).
    """
    # Step counts are integers (2.5 or -2 used to run as something else).
    check_number("train", "num_steps", num_steps, 0, integer=True)
    check_number("train", "log_every", log_every, 1, integer=True)
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None:
            check_number("train", name, value, 0, integer=True,
                         hint=" (0 or None: only at the end)")
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, jax.Array)):
        raise ValueError(f"train(seed={seed!r}) must be an integer or a typed key "
                         "(jax.random.key(n)).")
    if keep_checkpoints is not None:
        check_number("train", "keep_checkpoints", keep_checkpoints, 1, integer=True,
                     hint=" (None keeps all)")
    if isinstance(train_data, Mapping):
        raise ValueError("train_data is a single batch (a mapping); pass an iterable of "
                         "batches, e.g. [batch] or itertools.repeat(batch), or a function "
                         "returning an iterator.")
    if eval_every and eval_data is None and eval_fn is None:
        log.warning("eval_every=%s, but there is neither eval_data nor eval_fn: nothing will "
                    "be evaluated.", eval_every)
    recorded = _recorded_run(os.fspath(workdir))
    if best_mode is None and best_metric is not None and (
            recorded.get("best_metric") == best_metric):
        best_mode = recorded.get("best_mode")  # the mode this run has ranked by
    if best_mode is None:
        best_mode = default_best_mode(best_metric)
        if best_metric is not None:
            log.info("best_metric=%r ranks with best_mode=%r (from its name).", best_metric,
                     best_mode)
    if best_metric is not None and eval_data is None and eval_fn is None:
        raise ValueError(f"best_metric={best_metric!r} needs eval_data or eval_fn (and "
                         "eval_every) so checkpoints have metrics to rank by.")
    if (hasattr(eval_data, "__next__") and eval_every and eval_every < num_steps):
        raise ValueError(
            f"eval_data is a one-shot iterator, but evaluation runs every {eval_every} steps and "
            "the iterator would be empty after the first; pass a function returning a fresh "
            "iterator (eval_data=lambda: make_eval_batches()) or a list of batches.")
    parallel = parallel or (engine.parallel if engine is not None else ParallelConfig())
    loss = loss or (engine.loss if engine is not None else LossConfig())
    if engine is not None:
        given = {"model_config": model_config, "optimizer_config": optimizer_config,
                 "loss": loss, "parallel": parallel}
        differ = [k for k, v in given.items() if getattr(engine, k) != v]
        if tx is not None and engine.given_tx is not tx:
            differ.append("tx")
        if trainable is not None:
            differ.append("trainable (give it to the Engine)")
        if model is not None and engine.model is not model:
            differ.append("model")
        if loss_fn is not None and engine.loss_fn is not loss_fn or (
                loss_batch_keys and tuple(loss_batch_keys) != engine.loss_batch_keys):
            differ.append("loss_fn (give it to the Engine)")
        if differ:
            raise ValueError(f"train(engine=...) was built for a different {', '.join(differ)} "
                             "than the one(s) passed to train(); pass the engine's, or leave "
                             "parallel/loss out to use the engine's.")
    workdir = os.path.abspath(os.fspath(workdir))
    hooks = [print_hook] if hooks is None else list(hooks)
    main = distributed.is_main_process()
    if main:
        os.makedirs(workdir, exist_ok=True)
    record = _config_record(model=model_config, optimizer=optimizer_config, loss=loss,
                            parallel=parallel, experiment=experiment)
    if tx is not None or (engine is not None and engine.custom_tx):
        # Its state cannot be described, only told apart: a rerun without it is named.
        record["optimizer"]["tx"] = CUSTOM_TX
    if engine is None:
        engine = Engine(model_config, optimizer_config, parallel, loss, tx=tx, model=model,
                        trainable=trainable, loss_fn=loss_fn, loss_batch_keys=loss_batch_keys)
    if engine.loss_fn is not None:  # a rerun with another objective (or none) is told
        fn = engine.loss_fn
        record["loss"]["loss_fn"] = (f"{getattr(fn, '__module__', '?')}."
                                     f"{getattr(fn, '__qualname__', type(fn).__name__)}")
    if engine.trainable is not None:  # the optimizer state holds the trainable arrays alone
        record["optimizer"]["trainable"] = _trainable_record(engine)
    if engine.custom_model:  # a rerun without it would build the library's model
        def name(cls):
            return f"{cls.__module__}.{cls.__qualname__}"

        layer = getattr(engine.model, "layer_cls", None)
        record["model"]["module"] = name(type(engine.model)) + (
            f"(layer_cls={name(layer)})" if layer is not None else "")
    record["run"] = _run_record(seed, num_steps, engine)
    if best_metric is not None:  # what load_run(step="best") ranks by
        record["run"].update(best_metric=best_metric, best_mode=best_mode)
    # Whether the workdir's first run started from init_params: a rerun of that call resumes.
    fine_tune = _recorded_run(workdir).get("init_params", False)
    record["run"]["init_params"] = init_params is not None and (
        fine_tune or not os.path.exists(os.path.join(workdir, "config.json")))
    log.info("Training on %s.", engine.describe())
    if main:
        _warn_schedule(optimizer_config, num_steps)
    lock = _WorkdirLock(workdir, main)  # before Orbax cleans up another run's temporary files
    try:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep_checkpoints,
                            best_metric=best_metric, best_mode=best_mode,
                            async_save=async_checkpointing)
        failed = True
        try:
            result = _loop(engine, ckpt, train_data, num_steps=num_steps, seed=seed,
                           eval_data=eval_data, eval_fn=eval_fn, eval_every=eval_every,
                           checkpoint_every=checkpoint_every, log_every=log_every,
                           hooks=hooks if main else [], handle_signals=handle_signals,
                           warm_up=warm_up, init_params=init_params, fine_tune=fine_tune,
                           record_config=functools.partial(_write_config, workdir, record)
                           if main else None,
                           config_changes=functools.partial(_config_changes, workdir, record),
                           eval_marker=os.path.join(workdir, EVAL_MARKER) if main else None)
            if best_metric is not None:  # once written, the best is among the saves
                ckpt.wait()
                result.best_step = ckpt.best_step()
            failed = False
            return result
        finally:
            _close(engine, ckpt, failed)
    finally:
        lock.release()


class _WorkdirLock:
    """An exclusive `flock` on `workdir/.lock`, held by process 0 while train() runs, so that a
    second run on the workdir (a restarted job whose old instance still runs) stops at once
    instead of deleting the first one's in-flight checkpoints and mixing their logs. The kernel
    releases it when the process dies, even by SIGKILL: no stale lock survives a crash. The
    file records the holder's pid, host and start time for the error. A filesystem without
    `flock` (some network mounts) gets a warning and no lock."""

    def __init__(self, workdir: str, main: bool):
        self._file = None
        held_by = None
        if main:
            path = os.path.join(workdir, ".lock")
            f = None
            try:
                f = open(path, "a+")
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                held_by = _describe_holder(f.read())
                f.close()
            except OSError as error:  # a read-only workdir fails later, naming the file
                if f is not None:
                    f.close()
                log.warning("Cannot lock %s (%s): nothing stops a second run on %s from "
                            "using its checkpoints at the same time.", path, error, workdir)
            else:
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n")
                f.flush()
                self._file = f
        if jax.process_count() > 1:  # every process stops, none waits for process 0
            in_use = bool(multihost_utils.broadcast_one_to_all(np.int32(held_by is not None)))
        else:
            in_use = held_by is not None
        if in_use:
            raise RuntimeError(
                f"The workdir {workdir} is in use by another run ({held_by or 'see process 0'}"
                "). A second run would delete its in-flight checkpoints and mix their logs: wait "
                "for it to finish, stop it (SIGTERM saves a checkpoint, from which a rerun "
                "resumes), or pass another workdir.")

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe_holder(text: str) -> str:
    """`pid 123 on host h, started 2026-...` from a lock file's record."""
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on host {holder['host']}, started "
                f"{holder['started']}")
    except (ValueError, TypeError, KeyError):
        return "its lock file names no holder yet"


def _close(engine: Engine, ckpt: Checkpointer, failed: bool) -> None:
    """Wait for the background compiles (an early error must not exit while XLA still
    compiles) and the last save. After an error, a second one here (the save it interrupted
    fails too, e.g. on a full disk) is logged, not raised: the first is the one to see."""
    try:
        try:
            engine.wait_for_compiles()
        finally:
            ckpt.close()
    except Exception as error:
        if not failed:
            raise
        log.error("While stopping after the error below, closing the checkpoints failed too: "
                  "%s: %s", type(error).__name__, error)


EVAL_MARKER = "evaluation.json"  # {"pending": step} or {"evaluated": step}, in the workdir


def _mark_eval(path: str | None, state: str, step: int) -> None:
    """Record (main process) that the evaluation of `step` is owed by a save that comes before
    it ("pending") or has completed ("evaluated"); written atomically."""
    if path is not None:
        _write_json(path, {state: int(step)})


def _eval_owed(path: str | None, step: int) -> bool:
    """Whether the restored `step` was saved before its evaluation and the run stopped before
    that evaluation completed (a kill during it). Decided by the main process, told to all."""
    owed = False
    if path is not None and step:
        try:
            with open(path) as f:
                owed = json.load(f).get("pending") == step
        except (OSError, ValueError, AttributeError):
            owed = False
    if jax.process_count() > 1:
        owed = bool(multihost_utils.broadcast_one_to_all(np.int32(owed)))
    return owed


def _loop(engine: Engine, ckpt: Checkpointer, train_data, *, num_steps, seed, eval_data,
          eval_fn, eval_every, checkpoint_every, log_every, hooks, handle_signals, warm_up,
          record_config, config_changes, init_params, fine_tune=False,
          eval_marker: str | None = None) -> TrainResult:
    try:
        restored = ckpt.restore(engine.abstract_state())
    except CheckpointRestoreError as error:
        changed = config_changes()
        if changed is None:  # no record to compare with: both causes stay possible
            raise
        if not changed:
            custom = (" (an optax transformation passed as train(tx=...) is not recorded: if "
                      "it differs from the one that wrote them, that is the cause instead)"
                      if engine.custom_tx else "")
            raise RuntimeError(
                f"None of the checkpoints {error.steps} in {ckpt.directory} could be restored, "
                f"and this run's configs equal the recorded run's{custom}, so the files look "
                f"damaged (a truncated or overwritten file, a disk error). The read error of "
                f"step {error.steps[0]}: {_first_line(error.first_error)}. Nothing was moved "
                f"or deleted: restore the files from a backup, or move {ckpt.directory} aside "
                "to start over.") from error
        accumulation = [c for c in changed if c.startswith("optimizer.accumulation_steps:")]
        route = ""
        if accumulation and all(c.startswith(("optimizer.accumulation_steps:", "parallel."))
                                for c in changed):
            route = (" To train on other devices with the same update, keep accumulation_steps "
                     "and the global batch (batch_size) and set ParallelConfig(microbatches=k): "
                     "each step then runs in k sequential parts on fewer devices, and the "
                     "optimizer state resumes.")
        raise RuntimeError(
            f"None of the checkpoints {error.steps} in {ckpt.directory} could be restored "
            f"(the newest: {_first_line(error.first_error)}); nothing was moved or deleted. "
            "This run's configs differ from the run that wrote them: "
            f"{'; '.join(changed)}. Fields that change the parameters or the optimizer state "
            "(model sizes, the scan_layers layout, clip_norm, accumulation_steps, the "
            "optimizer) cannot resume these checkpoints: restore the recorded values, or train "
            "in another workdir (a changed model can start there from these parameters: "
            "merge_params, which also converts the scan_layers layout exactly, docs/training.md, "
            f"'Fine-tuning'; the optimizer state starts afresh).{route}") from None
    if restored is None:
        state, step, data_state = engine.init_state(seed, params=init_params), 0, None
    else:
        state = engine.from_checkpoint(restored.state)
        step, data_state = restored.step, restored.data_state
        log.info("Resumed from step %d in %s.", step, ckpt.directory)
        if init_params is not None and fine_tune:
            log.info("The fine-tune resumes from its own checkpoint (step %d); init_params, "
                     "which it started from, are not read again.", step)
        elif init_params is not None:
            log.warning("init_params is not used: %s holds a checkpoint (step %d), and the run "
                        "resumes from it. Fine-tune in a new workdir.", ckpt.directory, step)
    recorded = False

    def record(global_batch: int | None = None) -> None:
        """config.json and config_history.jsonl, once this run has trained (or has nothing
        to train): a run refused at its first batch leaves the record of the one that did."""
        nonlocal recorded
        if record_config is not None and not recorded:
            record_config(step, num_steps, global_batch)
        recorded = True

    if step >= num_steps:
        record()
    for hook in hooks:  # e.g. drop what a killed run logged past the restored checkpoint
        if callable(getattr(hook, "on_start", None)):
            hook.on_start(step)
    iterator = _make_iterator(train_data)
    if step >= num_steps:
        log.warning("The checkpoint in %s is at step %d: nothing left to train (num_steps=%d).",
                    ckpt.directory, step, num_steps)
    elif step:
        _restore_position(iterator, data_state, step, ckpt.data_states(step))

    history: list[dict[str, float]] = []
    pending: list[dict[str, Any]] = []  # per-step device metrics since the last flush
    window = {"time": time.perf_counter(), "steps": 0, "sums": {}}  # since the last report
    last_eval: dict[str, float] = {}
    last_eval_step = -1

    def flush(log_now: bool) -> None:
        """Fetch pending metrics, stop on a non-finite loss or a failed checkpoint save, report
        a window if asked."""
        nonlocal pending
        ckpt.check()  # a save that failed in the background stops the run now, not at the next
        host = [engine.metrics_to_host(m) for m in pending]
        first = step - len(host) + 1
        for offset, m in enumerate(host):
            if m["nonfinite"] or not np.isfinite(m["loss"]):
                last = ckpt.latest_step()
                kept = (f"Nothing after the last good checkpoint (step {last}) was saved. "
                        if last is not None else "No checkpoint was saved. ")
                raise NonFiniteLossError(
                    f"The training loss is {m['loss'] / (m['tokens'] or 1):.4g} and the "
                    f"gradient norm {m['grad_norm']:.4g} at step {first + offset}; the loss, "
                    f"the gradient or the parameters' update is not finite. {kept}Lower the "
                    "learning rate or add warmup (rerunning then resumes from that "
                    "checkpoint), or look for bad data; adding clip_norm or "
                    "accumulation_steps changes the optimizer state, so those start afresh in "
                    "another workdir.")
        for m in host:
            window["sums"] = add_metrics(window["sums"], m)
        window["steps"] += len(host)
        pending = []
        if log_now and window["steps"]:
            report(train_window())

    def train_window() -> dict[str, float]:
        elapsed = time.perf_counter() - window["time"]
        out = {f"train/{k}": v for k, v in summarize(window["sums"]).items()
               if k not in ("nonfinite", "steps")}
        out["train/steps"] = window["steps"]  # fewer than log_every after a resume or a stop
        if elapsed > 0:
            out["train/steps_per_second"] = window["steps"] / elapsed
            out["train/tokens_per_second"] = out.get("train/tokens", 0.0) / elapsed
        window.update(time=time.perf_counter(), steps=0, sums={})
        return out

    def report(metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        if history and history[-1]["step"] == step:
            history[-1].update(record)
        else:
            history.append(record)
        for hook in hooks:
            hook(step, dict(metrics))

    def run_eval() -> bool:
        """Evaluate and report; False when a stop signal cut the evaluation short (the run
        then counts as interrupted)."""
        nonlocal last_eval, last_eval_step
        metrics: dict[str, float] = {}
        if eval_data is not None:
            means = evaluate(engine, state, eval_data, stop=signals.agreed)
            if means is None:  # a stop signal: the checkpoint matters, the eval can wait
                log.warning("The evaluation at step %d was cut short by %s and is not "
                            "recorded.", step, signals.requested or "a stop request on another "
                            "process")
                return False
            metrics.update({f"eval/{k}": v for k, v in means.items()})
        if eval_fn is not None:
            for k, v in (eval_fn(state, engine) or {}).items():
                try:
                    metrics[k if "/" in k else f"eval/{k}"] = float(v)
                except (TypeError, ValueError):
                    log.warning("eval_fn's %r is %s, not a number: not reported to the hooks.",
                                k, type(v).__name__)
        last_eval, last_eval_step = metrics, step
        _mark_eval(eval_marker, "evaluated", step)
        report(metrics)
        return True

    def save() -> None:
        flush(log_now=False)  # never checkpoint a diverged state
        data = {"batches": step, "iterator": iterator_state(iterator)}
        metrics = last_eval if last_eval_step == step and last_eval else None
        if ckpt.save(step, engine.to_checkpoint(state), data_state=data, metrics=metrics):
            log.info("Saving checkpoint at step %d.", step)

    evaluating = eval_data is not None or eval_fn is not None
    ranked = ckpt.best_metric is not None  # checkpoints saved with eval metrics to rank them
    interrupted = False
    start_step = step
    rows = None  # the first batch's rows: shorter batches are padded to them
    padded = False
    with _StopSignals(handle_signals) as signals:
        if evaluating and _eval_owed(eval_marker, step):
            log.info("The evaluation of step %d was cut short when the run that saved it "
                     "stopped: evaluating it now.", step)
            interrupted = not run_eval()
        while step < num_steps and not interrupted:
            if signals.agreed():
                interrupted = True
                log.warning("Received %s: saving at step %d and stopping.",
                            signals.requested or "a stop request on another process", step)
                break
            try:
                batch = next(iterator)
            except StopIteration:
                if step == 0:
                    raise ValueError(
                        "train_data yielded no batch: an empty file or split, a filter that "
                        "dropped every example, or fewer examples than one batch with the "
                        "remainder dropped. Check the data (or lower the batch size)."
                    ) from None
                log.warning("The training data ran out after %d steps (num_steps=%d).", step,
                            num_steps)
                break
            n = _batch_rows(batch)
            if rows is None:
                rows = n
            elif 0 < n < rows:  # the end of an epoch: it fits the layout and compiled step
                if not padded:
                    log.warning("Train batch %d has %d rows, the first had %d: padded with "
                                "empty rows (no loss, no gradient; the update is the short "
                                "batch's).", step + 1, n, rows)
                padded = True
                batch = engine.pad_batch(batch, rows=rows)
            if step == start_step:  # compile what the run needs side by side, then train
                batch = engine.shard_batch(batch)  # laid out once, for the compile and the step
                engine.precompile(state, batch, functools.partial(_first_eval_batch, eval_data)
                                  if evaluating else None)
                if warm_up is not None:
                    warm_up(state, engine)
            try:
                state, metrics = engine.train_step(state, batch)
            except (ValueError, TypeError) as error:  # a batch the step refuses
                kind = ValueError if isinstance(error, ValueError) else TypeError
                last = ckpt.latest_step()
                saved = "no checkpoint yet" if last is None else f"the last checkpoint is {last}"
                raise kind(f"Train batch {step + 1} ({saved}): {error}") from error
            if not recorded:
                record(rows * jax.process_count() if rows else None)
            step += 1
            pending.append(metrics)  # Engine.train_step keeps at most STEPS_AHEAD queued
            is_log = step % log_every == 0 or step == num_steps
            # The last step evaluates in the loop too, so a checkpoint saved there carries
            # the metrics (best_metric ranks it).
            is_eval = evaluating and (bool(eval_every) and step % eval_every == 0
                                      or step == num_steps)
            is_ckpt = (bool(checkpoint_every) and step % checkpoint_every == 0
                       or is_eval and ckpt.best_metric is not None)
            if is_log or is_ckpt or is_eval:
                flush(log_now=is_log)
            # The save goes first (asynchronous: it is written while the evaluation runs), so
            # a kill during a long evaluation loses no training (the resume redoes the
            # evaluation: `evaluation.json`); with best_metric it needs the
            # evaluation's metrics, so it comes after.
            if is_ckpt and not ranked:
                if is_eval:  # saved before it is evaluated: a resume redoes a cut-short eval
                    _mark_eval(eval_marker, "pending", step)
                save()
            if is_eval and not run_eval():
                interrupted = True  # saved below; a final evaluation would be cut short too
                break
            if is_ckpt and ranked:
                save()
        flush(log_now=True)
        record()  # a run stopped before its first step trained nothing, but saves
        final_eval = (not interrupted and evaluating and last_eval_step != step
                      and step > start_step)
        if final_eval and ranked:
            interrupted = not run_eval()
        if final_eval and not ranked:
            _mark_eval(eval_marker, "pending", step)
        save()
        if final_eval and not ranked:
            interrupted = not run_eval()
    return TrainResult(state=state, step=step, history=history, interrupted=interrupted,
                       engine=engine, signal=signals.signal if interrupted else None)


def _global_states(peers: list | None) -> list | None:
    """The iterator states of every process of the saving run when they are in global terms
    (the library's pipelines: `{"layout": ..., "inner": ...}`), which restore under any
    process count; else None."""
    if not peers:
        return None
    states = []
    for record in peers:
        saved = (record or {}).get("iterator") if isinstance(record, Mapping) else None
        value = saved.get("value") if isinstance(saved, Mapping) and saved.get(
            "format") == "json" else None
        if not (isinstance(value, Mapping) and isinstance(value.get("layout"), Mapping)):
            return None
        states.append(value)
    return states


def _restore_position(iterator, data_state, step: int, peers: list | None = None) -> None:
    """Put a fresh iterator where the checkpointed run's iterator was after `step` batches.
    `peers`: the data records of every process of the saving run (`Checkpointer.data_states`):
    a pipeline whose state is in global terms restores from them exactly under another
    process count or batch size."""
    saved = (data_state or {}).get("iterator")
    states = _global_states(peers)
    if states is not None and hasattr(iterator, "set_state"):
        iterator.set_state({"processes": states})
        if saved is None or len(peers) != jax.process_count():
            log.info("The data position of the checkpoint's %d process(es) is restored exactly "
                     "on %d: the pipeline's order does not depend on the process count.",
                     len(peers), jax.process_count())
        return
    if saved is not None and hasattr(iterator, "set_state"):
        restore_iterator(iterator, saved)
        return
    batches = (data_state or {}).get("batches", step)
    if not hasattr(iterator, "set_state"):
        why = "the iterator has no set_state()"
    else:
        saved_by = f"{len(peers)} processes" if peers else "another process count"
        why = (f"the checkpoint holds no iterator state for this process: it was saved by "
               f"{saved_by}. Unless this iterator's order is the same for any process count "
               "(the library's pipelines' is), examples of this epoch are repeated or skipped; "
               "resume with the saving run's process count to keep the data order")
    log.warning("Restoring the data position by skipping %d batches (%s).", batches, why)
    for i in range(batches):
        if next(iterator, None) is None:
            raise ValueError(f"train_data ran out after {i} batches while skipping the "
                             f"{batches} the checkpoint at step {step} had consumed: resuming "
                             "needs the same data (or a new workdir).")


def _batch_rows(batch) -> int:
    """Rows of a batch (its first entry's leading size; 0 if it has none)."""
    first = next(iter(batch.values()), None) if isinstance(batch, Mapping) else None
    return np.shape(first)[0] if np.ndim(first) else 0
