"""Checkpoints with Orbax: train state + data-iterator position, kept, pruned and restored.

Layout of `directory` (an Orbax `CheckpointManager` root):

    <step>/state/...                    the TrainState (params, opt_state, step, rng), as sharded
                                        arrays; restorable onto any device count or mesh
    <step>/data/process_<i>-of-<n>.json each process's data-iterator state (JSON)
    <step>/metrics/...                  eval metrics of that step, with best_metric (to rank)

Orbax writes every step into a temporary directory and renames it when all processes have
finished, so a run killed mid-save leaves no directory that looks complete; leftovers are removed
on the next start. If the latest checkpoint still cannot be read (a truncated file, a disk
error), `restore` warns, moves it aside to `<step>.corrupt` and falls back to the one before.
A save that fails in the background (a full disk) raises `CheckpointSaveError` at the next
`check`, `save`, `wait` or `close`, naming the step and the newest complete checkpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import meta
from jax.experimental import multihost_utils

from flaxformer_lite.config import check_whole
from flaxformer_lite.training import optim
from flaxformer_lite.training.partitioning import flat_leaves, path_names

log = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data"


# ---- data iterator state ---------------------------------------------------------------------

def iterator_state(iterator: Any) -> dict | None:
    """A JSON-able record of `iterator`'s position, or None if it cannot tell.

    Grain-style iterators expose `get_state()`: a dict (`grain.DatasetIterator`) or JSON bytes
    (`grain.DataLoader` iterators); both are kept exactly.
    """
    get_state = getattr(iterator, "get_state", None)
    if get_state is None:
        return None
    state = get_state()
    if isinstance(state, bytes | bytearray):
        return {"format": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    return {"format": "json", "value": state}


def restore_iterator(iterator: Any, saved: Mapping[str, Any]) -> None:
    """Put `iterator` back at the position recorded by `iterator_state`."""
    if not hasattr(iterator, "set_state"):
        raise ValueError(f"{type(iterator).__name__} has no set_state(); cannot restore its "
                         "position from the checkpoint.")
    value = saved["value"]
    if saved["format"] == "bytes":
        value = base64.b64decode(value)
    iterator.set_state(value)


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler writing one JSON file per process (every process has its own data slice)."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        path = self._path(directory)
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            log.info("No data-iterator state for this process in %s (found %s: saved by another "
                     "process count).", directory, found)
            return None
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ---- the manager -------------------------------------------------------------------------------

def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The items a checkpoint holds and their handlers (Orbax's `handler_registry`, which
    replaces `item_names`/`item_handlers`): the state, with Orbax's standard pytree handler,
    and the data-iterator record."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(STATE_ITEM, args, ocp.StandardCheckpointHandler)
    for args in (DataStateSave, DataStateRestore):
        registry.add(DATA_ITEM, args, DataStateHandler)
    return registry


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); the message names the step,
    the cause and the newest complete checkpoint, from which a rerun resumes."""


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class CheckpointRestoreError(RuntimeError):
    """No checkpoint in a directory could be restored (nothing was moved or deleted).
    `steps`: those tried, newest first; `first_error`: why the newest failed."""

    def __init__(self, steps: list[int], directory: Any, first_error: BaseException):
        self.steps, self.directory, self.first_error = steps, directory, first_error
        super().__init__(
            f"None of the checkpoints {steps} in {directory} could be restored (the newest: "
            f"{_first_line(first_error)}); nothing was moved or deleted. A model or optimizer "
            "config, or an optax transformation passed as train(tx=...), that differs from the "
            "one that wrote them fails this way; with the same ones, the files are damaged.")


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` found: the step, the state and the data-iterator record."""

    step: int
    state: Any
    data_state: Any


# Words of a metric's name (its last "/" part, split at "_") that say which way is better.
SCORES = ("accuracy", "acc", "bleu", "sacrebleu", "chrf", "exact", "f1", "mcc", "matthews",
          "precision", "recall", "auc", "rouge", "rouge1", "rouge2", "rougel", "spearman",
          "pearson", "score")
COSTS = ("loss", "nll", "perplexity", "ppl", "error", "err", "wer", "cer", "ter", "neg")


def default_best_mode(best_metric: str | None) -> str:
    """`best_mode` when none is given (`train`, `Checkpointer`, `best_step`), from the metric's
    name: "max" for a score ("eval/accuracy", "eval/bleu", "eval/f1_macro", "eval/top5_acc":
    a word of `SCORES`), "min" for a cost ("eval/loss", "eval/perplexity", "eval/wer": a word
    of `COSTS`). A name with neither, or both ("eval/neg_accuracy"), is refused: pass
    `best_mode`."""
    if best_metric is None:
        return "min"
    words = set(re.split(r"[_\-.]", best_metric.rsplit("/", 1)[-1].lower()))
    score, cost = bool(words & set(SCORES)), bool(words & set(COSTS))
    if score == cost:
        last = best_metric.rsplit("/", 1)[-1]
        close = difflib.get_close_matches(last.lower(), SCORES + COSTS, n=1, cutoff=0.75)
        hint = (f" (a typo of {best_metric[:len(best_metric) - len(last)] + close[0]!r}?)"
                if close and not score else "")
        raise ValueError(f"best_metric={best_metric!r}: cannot tell whether higher or lower is "
                         f"better{hint}; pass best_mode='max' (a score) or best_mode='min' (a "
                         "cost).")
    return "max" if score else "min"



class Checkpointer:
    """Saves and restores `TrainState`s (+ data state) under `directory`.

    keep: how many of the most recent checkpoints to keep (None = all).
    best_metric / best_mode / keep_best: additionally keep the `keep_best` checkpoints with the
      best value of `metrics[best_metric]` ("min" or "max"; default from the metric's name,
      `default_best_mode`) among those saved with metrics.
    async_save: write in a background thread (device arrays are copied to host first, so
      training continues at once); `wait()` blocks until written, `check()` raises at once if
      the last save failed, without waiting for one in progress.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3,
                 best_metric: str | None = None, best_mode: str | None = None, keep_best: int = 1,
                 async_save: bool = True):
        if best_mode is None:
            best_mode = default_best_mode(best_metric)
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'.")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (or None to keep every checkpoint).")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.best_metric = best_metric
        self._best_mode = best_mode
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            worst = math.inf if best_mode == "min" else -math.inf

            def best_fn(metrics):  # a NaN (a diverged evaluation) ranks worst, never best
                # saved before best_metric was chosen (a resumed run's new metric): no candidate
                value = float(metrics.get(best_metric, math.nan))
                return value if math.isfinite(value) else worst

            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=_registry())
        self._saving: int | None = None  # the step of a save not yet known to be written

    # ---- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def data_states(self, step: int) -> list[Any] | None:
        """The data records (`save(data_state=...)`) of every process of the run that saved
        `step`, in process order, whatever the process count now; None when they are not all
        there (or unreadable)."""
        folder = self.directory / str(step) / DATA_ITEM
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            return None
        counts = {int(m.group(2)) for m in (re.fullmatch(r"process_(\d+)-of-(\d+)\.json", n)
                                            for n in names) if m}
        if len(counts) != 1:
            return None
        count = counts.pop()
        try:
            return [json.loads((folder / f"process_{i}-of-{count}.json").read_text())
                    for i in range(count)]
        except (OSError, ValueError):
            return None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Best step by `best_metric` (latest step when no metric is tracked): the module's
        `best_step` over the checkpoints present; None (with a warning) when none holds a
        finite value of it (stopped before the first evaluation, or every one NaN)."""
        if self.best_metric is None:
            return self._manager.latest_step()
        try:
            return best_step(self.directory, self.best_metric, self._best_mode)
        except (FileNotFoundError, ValueError) as why:  # no evaluation yet, or only NaNs
            log.warning("No best checkpoint: %s", why)
            return None

    # ---- save
    def save(self, step: int, state: Any, *, data_state: Any = None,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start saving `state` at `step` (every process must call this). False if that step
        already exists. `state` must hold one logical copy of each array (`Engine.to_checkpoint`).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric is not None and self.best_metric not in metrics:
                raise ValueError(
                    f"best_metric={self.best_metric!r} is not among the metrics saved at step "
                    f"{step}: {sorted(metrics)}. Pick one of those (eval metrics are named "
                    "'eval/...').")
        self.wait()  # Orbax waits for the previous save anyway; its failure is named here
        try:
            started = self._manager.save(
                step, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    DATA_ITEM: DataStateSave(data_state)}),
                metrics=metrics, force=True)
        except Exception as error:
            raise self._save_failed(step, error) from error
        if started:
            self._saving = step
        return started

    def check(self) -> None:
        """Raise `CheckpointSaveError` if the last asynchronous save has failed; cheap, and
        never waits for a save still in progress (call it between steps)."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (`CheckpointSaveError` if one
        failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(self._saving, error) from error
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        """The error for a failed save of `step`: the cause, the newest complete checkpoint
        (Orbax forgets the failed step; its temporary directory goes at the next start) and
        what to do."""
        self._saving = None
        complete = [s for s in self.all_steps() if s != step]
        what = f"The checkpoint at step {step}" if step is not None else "A checkpoint"
        if complete:
            newest = (f"the newest complete checkpoint is step {max(complete)}; free space (or "
                      f"fix the cause) and rerun to resume from it")
        else:
            newest = ("there is no complete checkpoint yet; free space (or fix the cause) and "
                      "rerun, which starts from step 0")
        return CheckpointSaveError(f"{what} could not be written to {self.directory} "
                                   f"({_first_line(error)}); {newest}.")

    # ---- restore
    def restore(self, abstract_state: Any, step: int | None = None) -> Restored | None:
        """Restore onto `abstract_state` (`ShapeDtypeStruct`s carrying target shardings).

        With `step=None` tries the latest step, then older ones: a checkpoint that fails to load
        is reported and moved aside (only once an older one loads, so a config mismatch that
        breaks them all raises instead of discarding anything). Returns None if there is no
        checkpoint.
        """
        if step is not None:
            return self._restore(step, abstract_state)
        steps = sorted(self._manager.all_steps(), reverse=True)
        failed: list[int] = []
        first_error: Exception | None = None
        for candidate in steps:
            try:
                restored = self._restore(candidate, abstract_state)
            except Exception as error:  # any failure means "unreadable"
                log.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying the "
                            "previous one.", candidate, self.directory, type(error).__name__,
                            error)
                failed.append(candidate)
                first_error = first_error or error
                continue
            if failed:
                self._quarantine(failed)
            return restored
        if failed:
            raise CheckpointRestoreError(steps, self.directory, first_error) from first_error
        return None

    def _restore(self, step: int, abstract_state: Any) -> Restored:
        # Parameters of other shapes (a changed model config) are told from the metadata:
        # Orbax's own restore of them fails inside TensorStore, with pages of messages.
        try:
            saved = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception:  # unreadable metadata: the restore below says why
            saved = None
        saved = getattr(saved, "tree", saved)
        params = getattr(abstract_state, "params", None)
        if isinstance(saved, Mapping) and "params" in saved and params is not None:
            missing, extra, shapes = _differences(meta.unbox(params), saved["params"])
            differ = ([f"not in the checkpoint: {missing[:3]}"] if missing else []) + (
                [f"not in this model: {extra[:3]}"] if extra else []) or [
                f"{k}: {had} -> {wanted}" for k, wanted, had in shapes][:3]
            if differ:
                raise ValueError(f"its parameters do not fit this model: {'; '.join(differ)}")
        whole = None
        if isinstance(saved, Mapping) and "opt_state" in saved and params is not None:
            whole = optim.unfactored_heads(
                {k: tuple(x.shape) for k, x in flat_leaves(saved["opt_state"]).items()},
                flat_leaves(abstract_state.opt_state))
        target = abstract_state
        if whole:  # Adafactor's state of a run saved before it factored attention kernels
            target = _whole_moments_target(abstract_state, saved["opt_state"], whole)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            DATA_ITEM: DataStateRestore()}))
        state = out[STATE_ITEM]
        if whole:
            state = _factored_state(state, abstract_state, whole)
            log.info("Checkpoint at step %d: Adafactor's whole second moments of %d attention "
                     "kernels turned into row and column statistics (as factored from the "
                     "start).", step, len(whole))
        return Restored(step=step, state=state, data_state=out[DATA_ITEM])

    def _quarantine(self, steps: list[int]) -> None:
        """Rename unreadable step directories to `<step>.corrupt[-<time>]` (kept for
        inspection, invisible to Orbax, so the step can be written again)."""
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                if path.exists():
                    target = self.directory / f"{step}.corrupt"
                    if target.exists():
                        target = self.directory / f"{step}.corrupt-{int(time.time())}"
                    path.rename(target)
                    log.warning("Moved unreadable checkpoint %s to %s.", path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("flaxformer_lite_checkpoint_quarantine")
        self._manager.reload()


def _whole_moments_target(abstract_state: Any, saved_opt: Any, whole: Mapping) -> Any:
    """`abstract_state` with the optimizer-state leaves that differ from the checkpoint's (see
    `optim.unfactored_heads`) in their saved shapes: whole moments sharded like their
    parameters, the unused `[1]` statistics like the leaves they replace."""
    shardings = {k: getattr(x, "sharding", None)
                 for k, x in flat_leaves(abstract_state.params).items()}
    saved = flat_leaves(saved_opt)
    names = {key for v in whole for key in _moment_keys(v)}

    def leaf(path, x):
        key = _path_key(path)
        if key not in names:
            return x
        sharding = (shardings.get(key.split("/v/", 1)[-1]) if key in whole else None) or getattr(
            x, "sharding", None)
        return jax.ShapeDtypeStruct(tuple(saved[key].shape), x.dtype, sharding=sharding)

    return abstract_state.replace(
        opt_state=jax.tree.map_with_path(leaf, abstract_state.opt_state))


def _moment_keys(v: str) -> tuple[str, str, str]:
    before, _, param = optim._split_moment(v)
    return tuple(f"{before}/{f}/{param}" for f in ("v", "v_row", "v_col"))


def _path_key(path) -> str:
    return "/".join(path_names(path))


def _factored_state(state: Any, abstract_state: Any, whole: Mapping) -> Any:
    """The restored `state` with each whole second moment turned into Adafactor's row and
    column statistics (`optim.factor_moments`), placed as `abstract_state` places them."""
    restored = flat_leaves(state.opt_state)
    wanted = flat_leaves(abstract_state.opt_state)
    new = optim.factor_moments({v: restored[v] for v in whole}, whole)

    def leaf(path, x):
        key = _path_key(path)
        if key not in new:
            return x
        sharding = getattr(wanted[key], "sharding", None)
        return jax.device_put(new[key], sharding) if sharding is not None else new[key]

    return state.replace(opt_state=jax.tree.map_with_path(leaf, state.opt_state))


def _latest(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None) -> int:
    """`step`, or the newest one in `directory`, with the fix named when there is none."""
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
        if step is None:
            hint = (f" (a train() workdir keeps them in {directory / 'checkpoints'})"
                    if (directory / "checkpoints").is_dir() else "")
            raise FileNotFoundError(f"No checkpoint in {directory}{hint}.")
    elif int(step) not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; it holds steps "
                                f"{sorted(steps)}.")
    return int(step)


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's "Given directory is read only" warning, which every read-only manager
    (opened on purpose to read a checkpoint) logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Given directory is read only" not in record.getMessage()


_READ_ONLY_NOTICE = _ReadOnlyNotice()


def _reader(directory: str | os.PathLike) -> tuple[epath.Path, ocp.CheckpointManager]:
    """A read-only manager on `directory` (nothing created or cleaned up there)."""
    logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)  # idempotent
    directory = epath.Path(os.path.abspath(os.fspath(directory)))
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return directory, ocp.CheckpointManager(directory, options=options,
                                            handler_registry=_registry())


def load_state(directory: str | os.PathLike, step: int | None = None) -> tuple[int, Any]:
    """`(step, state)` of a checkpoint as saved, without knowing the model or optimizer: nested
    dicts of arrays on this process's first device (whatever the saving run's device layout).
    For the parameters alone, `load_params` reads a third of it (under Adam) and can place
    them sharded.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    directory, manager = _reader(directory)
    with manager:
        step = _latest(manager, directory, step)
        metadata = manager.item_metadata(step)[STATE_ITEM]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              metadata)
        out = manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target)}))
    return step, out[STATE_ITEM]


def load_params(directory: str | os.PathLike, step: int | None = None, *,
                target: Any = None, dtype: Any = None) -> tuple[int, Any]:
    """`(step, params)` of a checkpoint, reading only the parameters (not the optimizer state,
    twice their size under Adam), for decoding, evaluation or fine-tuning.

    target: where the arrays go.
      - None: this process's first local device.
      - a `jax.sharding.Sharding`: every array with it (e.g. replicated over a mesh).
      - a tree of `jax.ShapeDtypeStruct`s with shardings in the parameters' structure, e.g.
        `engine.abstract_state().params`: each array restored straight into its shards, so a
        model too big for one device never lands whole on one (then
        `engine.init_state(rng, params=...)` to fine-tune it). Paths and shapes must match
        the checkpoint's (for a model meant to differ, load without a target and use
        `merge_params`); a different dtype casts; entries without a sharding (e.g. from
        `jax.eval_shape`) go to the first local device.
    dtype: cast every array to it (e.g. `jnp.bfloat16` for inference); overrides the target's.
    """
    directory, manager = _reader(directory)
    with manager:
        step = _latest(manager, directory, step)
        saved = _saved_params(manager, directory, step)
    target = _params_target(saved, target, dtype, f"step {step} in {directory}")
    return step, _read_params(directory, step, target)


def _saved_params(manager: ocp.CheckpointManager, directory: epath.Path, step: int) -> Any:
    """The metadata (shapes, dtypes) of the parameters of `step`'s checkpoint; nothing read."""
    saved = manager.item_metadata(step)[STATE_ITEM]
    saved = getattr(saved, "tree", saved)  # Orbax's TreeMetadata wraps the nested dicts
    if not isinstance(saved, Mapping) or "params" not in saved:
        held = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise ValueError(f"The checkpoint of step {step} in {directory} holds no 'params' "
                         f"(it holds {held}); use load_state() for other states.")
    return saved["params"]


def _params_target(saved: Any, target: Any, dtype: Any, where: str) -> Any:
    """`load_params`' `target` and `dtype` as a tree of `ShapeDtypeStruct`s with shardings in
    the structure of the checkpoint's parameter metadata `saved`."""
    if target is None or isinstance(target, jax.sharding.Sharding):
        sharding = target or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              saved)
    else:
        target = _check_target(meta.unbox(target), saved, where)
    if dtype is not None:
        target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, dtype, sharding=t.sharding),
                              target)
    return target


def _read_params(directory: epath.Path, step: int, target: Any) -> Any:
    """The parameters of `step`'s checkpoint, read into `target`'s shardings and dtypes."""
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
    # Orbax's pytree handler reads a subtree when asked for a partial restore; the optimizer
    # state's arrays are never read.
    out = ocp.PyTreeCheckpointer().restore(
        directory / str(step) / STATE_ITEM, args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args},
            partial_restore=True))
    return out["params"]


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)


def _choose_steps(present: list[int], steps: Any, last: Any, directory: epath.Path) -> list[int]:
    """The steps `average_params` averages (ascending), or why not."""
    if (steps is None) == (last is None):
        raise ValueError("average_params takes either steps=[...] or last=k, not "
                         f"{'both' if last is not None else 'neither'}.")
    if not present:
        hint = (f" (a train() workdir keeps them in {directory / 'checkpoints'})"
                if (directory / "checkpoints").is_dir() else "")
        raise FileNotFoundError(f"No checkpoint in {directory}{hint}.")
    if last is not None:
        check_whole("last", last, 1)
        if last > len(present):
            raise ValueError(
                f"last={last}, but {directory} holds {len(present)} checkpoint"
                f"{'s' if len(present) != 1 else ''} (steps {present}): train() keeps only the "
                f"last `keep_checkpoints` (3 by default); train with keep_checkpoints >= {last} "
                f"to average the last {last}, or average fewer.")
        return present[-last:]
    if isinstance(steps, int | str) or not all(
            isinstance(s, int | np.integer) and not isinstance(s, bool) for s in steps):
        raise ValueError(f"steps={steps!r} must be a list of whole step numbers.")
    chosen = sorted(int(s) for s in steps)
    if not chosen:
        raise ValueError("steps=[] names no checkpoint to average.")
    repeated = sorted({s for s in chosen if chosen.count(s) > 1})
    if repeated:
        raise ValueError(f"steps={list(steps)} names step(s) {repeated} more than once (each "
                         "would weigh that much more in the mean).")
    missing = [s for s in chosen if s not in present]
    if missing:
        raise FileNotFoundError(f"No checkpoint of step{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(map(str, missing))} in {directory}; it holds steps "
                                f"{present}.")
    return chosen


def _check_alike(saved: dict[int, Any], directory: epath.Path) -> None:
    """Refuse checkpoints whose parameter trees, shapes or kinds of dtype (floating or not)
    differ, naming the first differing path."""
    (first, reference), *others = saved.items()
    want = flat_leaves(reference)
    for step, tree in others:
        have = flat_leaves(tree)
        for path in sorted(set(want) | set(have)):
            if path not in have or path not in want:
                holder, lacks = (first, step) if path in want else (step, first)
                raise ValueError(
                    f"The checkpoints of steps {first} and {step} in {directory} hold other "
                    f"parameter trees: {path} is in step {holder}'s, not in step {lacks}'s "
                    "(checkpoints of different models cannot be averaged).")
            a, b = want[path], have[path]
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"The checkpoints of steps {first} and {step} in {directory} differ in "
                    f"shape at {path}: {tuple(a.shape)} and {tuple(b.shape)} (checkpoints of "
                    "different models cannot be averaged).")
            if _is_float(a.dtype) != _is_float(b.dtype) or (
                    not _is_float(a.dtype) and jnp.dtype(a.dtype) != jnp.dtype(b.dtype)):
                raise ValueError(
                    f"The checkpoints of steps {first} and {step} in {directory} differ in "
                    f"dtype at {path}: {a.dtype} and {b.dtype}.")


def average_params(directory: str | os.PathLike, steps: Any = None, *, last: int | None = None,
                   dtype: Any = None, target: Any = None) -> tuple[list[int], Any]:
    """`(steps, params)`: the element-wise mean of the parameters of the checkpoints of
    `steps`, or of the `last` k in `directory`, as "Attention Is All You Need" evaluates (the
    base model: the mean of the last 5 checkpoints, written 10 minutes apart; the big one: the
    last 20). `steps`: those averaged, ascending.

    The checkpoints are read one at a time (parameters only, as `load_params` reads them) and
    summed on the host in float64, so memory holds a checkpoint and the sum, whatever k; the
    mean is rounded to float32, then to the parameters' own dtype (bfloat16 parameters are
    averaged exactly and rounded once more), or to `dtype`. `target` places the result as in
    `load_params` (a device, a `Sharding`, or a tree of `ShapeDtypeStruct`s with shardings:
    each process sums only its own shards). Parameters saved in other float dtypes (a run
    resumed with another `param_dtype`) average together and come out in the newest one's.
    Leaves that are not floating point (integer tables of a model of one's own) must hold the
    same values in every checkpoint, which the result keeps.

    Refused before any array is read: both or neither of `steps` and `last`, `last` larger
    than the number of checkpoints (`train(keep_checkpoints=...)` keeps the last 3 by
    default), a step not present (the present ones named), checkpoints whose parameter trees
    or shapes differ (the first differing path named), a `target` that does not fit.
    """
    directory, manager = _reader(directory)
    with manager:
        present = sorted(manager.all_steps())
        chosen = _choose_steps(present, steps, last, directory)
        saved = {step: _saved_params(manager, directory, step) for step in chosen}
    _check_alike(saved, directory)
    newest = saved[chosen[-1]]
    out_target = _params_target(newest, target, dtype, f"step {chosen[-1]} in {directory}")
    # Each checkpoint is read in its own dtypes (no rounding before the sum) into the result's
    # shardings; the sum is kept per distinct shard of this process (replicas added once).
    slots, treedef = jax.tree.flatten(out_target)
    paths = list(flat_leaves(out_target))
    sums: list[dict] = [{} for _ in slots]
    for i, step in enumerate(chosen):
        kinds = flat_leaves(saved[step])
        read_target = jax.tree.unflatten(treedef, [
            jax.ShapeDtypeStruct(t.shape, kinds[path].dtype, sharding=t.sharding)
            for t, path in zip(slots, paths, strict=True)])
        for leaf, path, acc in zip(jax.tree.leaves(_read_params(directory, step, read_target)),
                                   paths, sums, strict=True):
            seen = set()
            for shard in leaf.addressable_shards:
                key = _shard_key(shard.index)
                if key in seen:
                    continue
                seen.add(key)
                value = np.asarray(shard.data)
                if not _is_float(value.dtype):
                    if not i:
                        acc[key] = value
                    elif not np.array_equal(acc[key], value):
                        raise ValueError(
                            f"{path} is not floating point ({value.dtype}) and differs between "
                            f"the checkpoints of steps {chosen[0]} and {step} in {directory}: "
                            "only floating-point parameters are averaged.")
                elif not i:
                    acc[key] = value.astype(np.float64)
                else:
                    acc[key] += value.astype(np.float64)  # exact for any float
        # this checkpoint's arrays are dropped here, before the next one is read
    out_leaves = []
    for t, acc in zip(slots, sums, strict=True):
        shards = []
        for device, index in t.sharding.addressable_devices_indices_map(t.shape).items():
            value = acc[_shard_key(index)]
            if value.dtype == np.float64:  # the sum of floating-point leaves
                value = (value / len(chosen)).astype(np.float32)
            shards.append(jax.device_put(value.astype(t.dtype), device))
        out_leaves.append(jax.make_array_from_single_device_arrays(t.shape, t.sharding, shards))
    return chosen, jax.tree.unflatten(treedef, out_leaves)


def _shard_key(index: tuple) -> tuple:
    """A hashable key of a shard's index (a tuple of slices)."""
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _differences(want: Any, have: Any) -> tuple[list[str], list[str], list[tuple]]:
    """How the parameter tree `want` differs from a checkpoint's `have` (arrays or metadata):
    the paths missing from `have`, those only in `have`, and `(path, wanted shape, saved
    shape)` where both hold a path with other shapes."""
    want, have = flat_leaves(want), flat_leaves(have)
    shapes = [(k, tuple(want[k].shape), tuple(have[k].shape)) for k in want
              if k in have and tuple(want[k].shape) != tuple(have[k].shape)]
    return sorted(set(want) - set(have)), sorted(set(have) - set(want)), shapes


# The refusals' way out when the model is meant to differ from the checkpoint's.
_MERGE = ("For a model meant to differ from the checkpoint's (a longer max_len, a larger "
          "vocabulary, added parameters), load without a target and merge: "
          "`merge_params(new, load_params(dir)[1])[0]`, `new` its fresh parameters "
          "(`init_params(config, rng)`): flaxformer_lite.merge_params copies what fits and "
          "reports the rest.")


def _check_target(target: Any, saved: Any, where: str) -> Any:
    """`target` as a tree of `ShapeDtypeStruct`s with shardings (the first local device where
    it has none), checked against the checkpoint's parameter metadata (paths and shapes)."""
    missing, extra, shapes = _differences(target, saved)
    if missing or extra:
        raise ValueError(
            f"target does not fit the parameters of {where}: missing from the checkpoint "
            f"{missing[:5]}, not in target {extra[:5]} (at most 5 of each). Pass the abstract "
            f"parameters of the config that wrote it (engine.abstract_state().params). {_MERGE}")
    bad = [f"{k}: {wanted} != {had}" for k, wanted, had in shapes]
    if bad:
        raise ValueError(f"target shapes differ from the checkpoint's ({where}): {bad[:5]}. "
                         f"{_MERGE}")
    first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda t: jax.ShapeDtypeStruct(
        t.shape, t.dtype, sharding=getattr(t, "sharding", None) or first), target)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # byte/char JSON, or SentencePiece


@dataclasses.dataclass
class Run:
    """What `load_run` reads back from a `train()` workdir."""

    config: Any  # TransformerConfig: `make_model(run.config)` applies `params`
    params: Any
    step: int
    tokenizer: Any  # data.Tokenizer, or None when the workdir holds none
    experiment: dict | None  # the caller's settings, `train(experiment=...)`
    # "package.module.Class" of a model of your own (`train(model=...)`), which you rebuild
    # yourself from `config`; None for the library's models (`make_model`).
    module: str | None = None
    # The steps whose parameters `params` averages (`load_run(average_last=k)`), ascending;
    # None when `params` are those of `step` alone.
    averaged_steps: list[int] | None = None


def _saved_metric_names(directory: str | os.PathLike) -> list[str]:
    """The metric names saved with any checkpoint in `directory` (sorted; [] if none)."""
    directory, m = _reader(directory)
    with m:
        return sorted({k for s in m.all_steps() for k in (m.metrics(s) or {})})


def best_step(directory: str | os.PathLike, best_metric: str,
              best_mode: str | None = None) -> int:
    """The step of the best checkpoint in `directory` by the eval metric `best_metric` saved
    with it (`best_mode` "min" or "max", default from its name), as `train(best_metric=...)`
    ranks them: a
    non-finite value is never best, a tie goes to the latest step. Read only."""
    if best_mode is None:
        best_mode = default_best_mode(best_metric)
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'.")
    directory, m = _reader(directory)
    with m:
        ranked = [s for s in m.all_steps() if best_metric in (m.metrics(s) or {})]
        if not ranked:
            raise FileNotFoundError(f"No checkpoint in {directory} was saved with the metric "
                                    f"{best_metric!r} to rank it (steps: "
                                    f"{sorted(m.all_steps())}).")
        values = {s: float(m.metrics(s)[best_metric]) for s in ranked}
    finite = {s: v for s, v in values.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"Every checkpoint in {directory} has a non-finite {best_metric!r} "
                         f"({values}): none is best.")
    sign = 1.0 if best_mode == "max" else -1.0
    return max(finite, key=lambda s: (sign * finite[s], s))  # a tie: the latest


def load_run(workdir: str | os.PathLike, step: int | str | None = None, *, target: Any = None,
             dtype: Any = None, average_last: int | None = None) -> Run:
    """A trained run back from its workdir, for decoding or evaluation:

        run = load_run("/tmp/lm")
        model = make_model(run.config)
        ids = run.tokenizer.encode("ROMEO:")

    The model config comes from `workdir/config.json`, the parameters from the latest (or
    `step`'s) checkpoint via `load_params` (`target`, `dtype` as there), the tokenizer from
    `workdir/tokenizer.json` or `tokenizer.model`, which the experiment scripts write (None if
    absent: a run of one's own can `tokenizer.save(workdir + "/tokenizer.json")` too).

    step="best": the best checkpoint by the `best_metric` the run was trained with
    (`train(best_metric=..., best_mode=...)`, recorded in config.json).

    average_last=k: the parameters are the mean of the last k checkpoints' (`average_params`),
    `run.step` the last of them and `run.averaged_steps` all k (None without averaging).
    """
    from flaxformer_lite.config import TransformerConfig
    from flaxformer_lite.data.tokenizers import load_tokenizer

    workdir = os.path.abspath(os.fspath(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a train() workdir "
                                "(load_params reads a checkpoint directory alone).")
    with open(path) as f:
        record = json.load(f)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    model_record = dict(record.get("model", {}))
    module = model_record.pop("module", None)
    unknown = sorted(set(model_record) - fields)
    if unknown:
        raise ValueError(f"{path} records model fields this version does not have: {unknown}.")
    config = TransformerConfig(**model_record)
    if step == "best":
        ran = record.get("run", {})
        if not ran.get("best_metric"):
            saved = _saved_metric_names(os.path.join(workdir, "checkpoints"))
            raise ValueError(
                f"load_run(step='best'): {path} records no best_metric (a run trained without "
                "one, or recorded before runs recorded it). "
                + (f"Its checkpoints carry the metrics {saved}: name the step with "
                   "flaxformer_lite.training.best_step, e.g. load_run(workdir, step=best_step("
                   f"workdir + '/checkpoints', {saved[0]!r})). " if saved else
                   "Its checkpoints carry no metrics to rank. ")
                + "Or pass a step, or None for the latest.")
        step = best_step(os.path.join(workdir, "checkpoints"), ran["best_metric"],
                         ran.get("best_mode", "min"))
    averaged = None
    if average_last is not None:
        if step is not None:
            raise ValueError(f"load_run takes step={step} or average_last={average_last} (the "
                             "last checkpoints), not both; average_params(dir, steps=[...]) "
                             "averages chosen ones.")
        averaged, params = average_params(os.path.join(workdir, "checkpoints"),
                                          last=average_last, target=target, dtype=dtype)
        step = averaged[-1]
    else:
        step, params = load_params(os.path.join(workdir, "checkpoints"), step, target=target,
                                   dtype=dtype)
    found = [os.path.join(workdir, name) for name in TOKENIZER_FILES
             if os.path.exists(os.path.join(workdir, name))]
    tokenizer = load_tokenizer(found[0]) if found else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{found[0]} has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {config.vocab_size}: not this run's tokenizer.")
    return Run(config=config, params=params, step=step, tokenizer=tokenizer,
               experiment=record.get("experiment"), module=module, averaged_steps=averaged)
