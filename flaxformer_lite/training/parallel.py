"""One engine, three ways to run the same `train_step`: single device, `pmap`, or a mesh.

- "single": `jax.jit` on one device. Anything fits that fits one device.
- "pmap": data parallel. The state is replicated (a copy per local device, leading axis =
  device), each device takes `batch / devices` examples, gradients and metric sums are
  `lax.psum`-ed over the `devices` axis. Works across hosts (the axis spans every device of
  every process); the model must fit one device.
- "mesh": `jax.jit` over a `(data, fsdp, tensor)` device mesh with `NamedSharding`s derived
  from the layers' logical axis names (see `partitioning`): parameters and optimizer moments
  sharded (FSDP and tensor parallel), the batch split over `data x fsdp`, activations
  constrained inside the model. The general mode; use it for anything that does not fit one
  device and for multi-host runs.
- "auto": "single" on one device, otherwise "mesh" with all devices on the `data` axis.

`Engine` hides the differences: it creates or places the state, splits host batches into device
batches, runs the compiled steps and converts state to and from the layout checkpoints use (one
logical copy of every array), so a run saved in one mode/device count restores in any other.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from flaxformer_lite import ops, perf
from flaxformer_lite.config import TransformerConfig, check_number, plain_fields
from flaxformer_lite.models import (
    batch_keys,
    check_batch,
    make_model,
    stack_layers,
    unstack_layers,
)
from flaxformer_lite.training import partitioning
from flaxformer_lite.training.losses import LossConfig
from flaxformer_lite.training.optim import OptimizerConfig, learning_rate_at, make_optimizer
from flaxformer_lite.training.state import (
    TrainState,
    as_key,
    boxed_params,
    create_train_state,
    param_logical_specs,
)
from flaxformer_lite.training.steps import LossFn, eval_step, train_step

log = logging.getLogger(__name__)

# The refusals' way out when the model is meant to differ from the parameters'.
_MERGE = ("For a model meant to differ from theirs (a longer max_len, a larger vocabulary, "
          "added parameters), start from `merge_params(new, params)[0]`, `new` its fresh "
          "parameters (`init_params(config, rng)`; a model of your own: `model.init(...)"
          "['params']`): flaxformer_lite.merge_params copies what fits and reports the rest.")

MODES = ("auto", "single", "pmap", "mesh")
PMAP_AXIS = "devices"
# Train steps queued at most: the devices always have the next one, and no more pile up.
STEPS_AHEAD = 2

# XLA cannot serialize programs with oneDNN calls (see `ParallelConfig.compiler_options`), so the
# persistent compilation cache skips the CPU train and eval steps; its warning says nothing the
# user can act on.
warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry"
                        r".*onednn", category=UserWarning)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a run uses its devices (see the module docstring for the modes).

    data, fsdp, tensor: mesh axis sizes for mode "mesh" (one may be -1 = the rest); modes
      "single" and "pmap" take `data` only as -1 or the devices they run on (1; all the
      Engine's: choose them with `Engine(devices=...)`).
    axis_rules: logical axis name -> mesh axes (`partitioning.DEFAULT_RULES`).
    donate: let each step reuse the previous state's device memory.
    microbatches: compute each train step's gradient in this many slices of the batch, one
      after another inside the step (`train_step(microbatches=...)`): the same update with
      about 1/k of the activation memory, and on a 2-core CPU a faster large-model step
      (docs/performance.md). Each device's share of the batch must divide by it.
    compiler_options: XLA compile options for the train and eval steps ("jit" modes; `jax.pmap`
      takes none). None = `perf.step_compiler_options(devices)`: on Intel CPUs, matmuls
      through oneDNN (~11% faster steps, see docs/performance.md), at the price of compiling
      them on every run: XLA cannot write them to the persistent compilation cache. `{}` =
      XLA's defaults.
    """

    mode: str = "auto"
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    axis_rules: partitioning.LogicalRules = partitioning.DEFAULT_RULES
    donate: bool = True
    compiler_options: Mapping[str, Any] | None = None
    microbatches: int = 1

    def __post_init__(self):
        plain_fields(self)
        check_number("ParallelConfig", "microbatches", self.microbatches, 1, integer=True,
                     hint=" (1 = the whole batch at once)")
        if self.mode not in MODES:
            raise ValueError(f"ParallelConfig.mode={self.mode!r} is not one of "
                             f"{', '.join(MODES)}.")
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if value != -1:
                check_number("ParallelConfig", name, value, 1, integer=True,
                             hint=" (-1: the devices the other axes leave)")
        def plain(rules):  # lists (from JSON or ml_collections) compare as tuples
            return [(name, tuple(a) if isinstance(a, (list, tuple)) else a) for name, a in rules]

        if self.mode in ("single", "pmap") and (
                self.fsdp != 1 or self.tensor != 1
                or plain(self.axis_rules) != plain(partitioning.DEFAULT_RULES)):
            raise ValueError(f"ParallelConfig(mode={self.mode!r}) replicates the model: fsdp, "
                             "tensor and axis_rules apply to mode='mesh' (or 'auto').")
        known = {logical for logical, _ in partitioning.DEFAULT_RULES}
        for rule in self.axis_rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise ValueError(f"ParallelConfig.axis_rules: {rule!r} is not a (logical name, "
                                 "mesh axes) pair.")
            logical, axes = rule
            if logical not in known:
                raise ValueError(f"ParallelConfig.axis_rules name {logical!r}, which no array of "
                                 f"the models carries; the logical names are "
                                 f"{', '.join(sorted(known))}.")
            if logical == "batch" and tuple(axes or ()) != tuple(partitioning.BATCH_AXES):
                raise ValueError("ParallelConfig.axis_rules: the batch is always split over "
                                 f"{partitioning.BATCH_AXES} (the input layout); leave 'batch' "
                                 "out of the rules.")
            named = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            unknown = [a for a in named if a not in partitioning.MESH_AXES]
            if unknown:
                raise ValueError(
                    f"ParallelConfig.axis_rules map {logical!r} to mesh axis {unknown[0]!r}; the "
                    f"mesh's axes are {', '.join(partitioning.MESH_AXES)} (None: replicated).")
        if self.mode == "pmap" and self.compiler_options:
            raise ValueError("ParallelConfig.compiler_options cannot apply to mode='pmap' "
                             "(jax.pmap takes no compile options); use mode='mesh' or drop them.")

    def replace(self, **changes) -> ParallelConfig:
        return dataclasses.replace(self, **changes)


def resolve_mode(config: ParallelConfig, num_devices: int) -> str:
    if config.mode != "auto":
        return config.mode
    return "single" if num_devices == 1 else "mesh"


def _assemble(shape, sharding, per_device: Mapping[Any, jax.Array]) -> jax.Array:
    """A global array from one buffer per addressable device of `sharding`."""
    devices = sharding.addressable_devices_indices_map(shape).keys()
    return jax.make_array_from_single_device_arrays(shape, sharding,
                                                    [per_device[d] for d in devices])


def _first_replica(x) -> np.ndarray:
    """Host copy of an array replicated over (or stacked per) devices: the first device's."""
    return np.asarray(x.addressable_data(0))


def _trainable_flags(trainable, shapes) -> tuple[tuple[bool, ...], Any]:
    """`(flags, labels)` for `Engine(trainable=...)`: one bool per parameter array in
    `jax.tree.leaves` order, and the "train" / "frozen" labels tree for
    `optax.multi_transform`. `trainable` is a function of a parameter's path ("a/b/c", as
    messages name them) or a tree of bools shaped like the parameters."""
    flat = partitioning.flat_leaves(shapes)
    paths = list(flat)
    if callable(trainable):
        flags = tuple(_path_flag(trainable, p, flat[p].shape) for p in paths)
    else:
        given = partitioning.flat_leaves(nn.meta.unbox(trainable))
        if set(given) != set(paths):
            raise ValueError(
                f"trainable must be a function of a parameter path or a tree of bools shaped "
                f"like the parameters; missing {sorted(set(paths) - set(given))[:3]}, "
                f"unexpected {sorted(set(given) - set(paths))[:3]}.")
        flags = tuple(bool(given[p]) for p in paths)
    if not any(flags):
        raise ValueError(f"trainable selects none of the {len(paths)} parameter arrays (e.g. "
                         f"{paths[0]!r}): pass a function of the path that is True for the "
                         "ones to train.")
    labels = jax.tree.unflatten(jax.tree.structure(shapes),
                                ["train" if f else "frozen" for f in flags])
    return flags, labels


def _path_flag(trainable: Callable[[str], bool], path: str, shape) -> bool:
    """`trainable(path)`; for an array of a `scan_layers` stack (".../layers/layers/...",
    `[num_layers, ...]`) also asked of each layer's own path (".../layers/layer_3/..."), as
    the unscanned model names it: all of them or none, as one array cannot be half frozen."""
    if trainable(path):
        return True
    head, sep, rest = path.partition("layers/layers/")
    if not sep or (head and not head.endswith("/")):
        return False
    votes = [bool(trainable(f"{head}layers/layer_{i}/{rest}")) for i in range(shape[0])]
    if any(votes) and not all(votes):
        picked = [i for i, v in enumerate(votes) if v]
        raise ValueError(
            f"trainable selects layers {picked} of the {len(votes)} in {path}, but "
            "scan_layers=True stacks them into one array, which trains or freezes whole: set "
            "scan_layers=False to train some layers alone.")
    return all(votes)


def _check_trainable_dtypes(config: TransformerConfig) -> None:
    """Refuses float16 for training: without loss scaling (which the steps do not do) the
    gradient of a mean over many tokens underflows in float16 (10-70% off at 16k tokens a
    step), and float16 parameters overflow the gradient norm past 256. bfloat16 has float32's
    range."""
    bad = [f"{name}='float16'" for name in ("dtype", "param_dtype")
           if getattr(config, name) == "float16"]
    if bad:
        raise ValueError(
            f"TransformerConfig {' and '.join(bad)} cannot train here: float16 needs loss "
            "scaling, which the train step does not do, so small gradients underflow to 0. "
            "Train with dtype='bfloat16' (float32 parameters, bfloat16 compute) and keep "
            "float16 for inference (make_model, decoding, evaluation).")


def _check_accumulation(opt_state, optimizer_config: OptimizerConfig) -> None:
    """A tx of the user's own accumulates gradients (`optax.MultiSteps`) exactly when
    `optimizer_config.accumulation_steps > 1` says so: the logged learning rate, the update
    count and the schedule checks read that field, so a mismatch misreported them (and the
    library's accumulation never ran)."""
    def is_multi(x):
        return isinstance(x, optax.MultiStepsState)

    accumulates = any(is_multi(x) for x in jax.tree.leaves(opt_state, is_leaf=is_multi))
    k = optimizer_config.accumulation_steps
    if k > 1 and not accumulates:
        raise ValueError(
            f"OptimizerConfig.accumulation_steps={k}, but the tx given to the Engine does not "
            f"accumulate gradients (no optax.MultiSteps in it): wrap it, "
            f"optax.MultiSteps(tx, every_k_schedule={k}), or set accumulation_steps=1. With "
            "tx= the OptimizerConfig's other settings (clip_norm, weight_decay, the optimizer) "
            "apply only through what tx itself holds (make_optimizer(config) builds them).")
    if k == 1 and accumulates:
        raise ValueError(
            "The tx given to the Engine accumulates gradients (optax.MultiSteps) but "
            "OptimizerConfig.accumulation_steps=1: set it to the tx's every_k_schedule, so the "
            "logged learning rate and the update count follow the updates.")


class Engine:
    """Model + optimizer + device layout: the compiled train and eval steps for one mode.

    Example:
        engine = Engine(get_config("gpt2", ...), OptimizerConfig(learning_rate=3e-4),
                        ParallelConfig(mode="mesh", data=2, fsdp=2, tensor=2))
        state = engine.init_state(jax.random.key(0))
        state, metrics = engine.train_step(state, host_batch)   # numpy, this process's slice
        print(engine.metrics_to_host(metrics)["loss"])
    """

    def __init__(self, model_config: TransformerConfig, optimizer_config: OptimizerConfig,
                 parallel: ParallelConfig | None = None, loss: LossConfig | None = None,
                 *, devices: Sequence[jax.Device] | None = None,
                 tx: optax.GradientTransformation | None = None,
                 model: nn.Module | None = None,
                 trainable: Callable[[str], bool] | Any | None = None,
                 loss_fn: LossFn | None = None, loss_batch_keys: Sequence[str] = ()):
        self.model_config = model_config
        self.optimizer_config = optimizer_config
        _check_trainable_dtypes(model_config)
        self.parallel = parallel = parallel or ParallelConfig()
        self.loss = loss or LossConfig()
        # `model`: a module of your own (new layers, a new block) to train instead of
        # `make_model(model_config)`; see `steps.logits_fn` for the call it gets.
        if model is not None and getattr(model, "config", None) != model_config:
            raise ValueError(
                f"Engine(model=...): the model's `config` must equal model_config (the "
                f"architecture, dropout rates, dtypes and sizes the steps read); got "
                f"{type(model).__name__} with config "
                f"{getattr(model, 'config', None)!r:.80}. Pass Engine(model.config, ..., "
                "model=model).")
        self.model = make_model(model_config) if model is None else model
        self.custom_model = model is not None
        # `loss_fn`: an objective of your own (`steps.train_step`), `loss_batch_keys` the batch
        # entries it reads besides the model's, laid out and split with the batch.
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Engine(loss_fn={loss_fn!r}) must be a function (model, params, "
                            "batch, *, deterministic, dropout_rng) -> {'loss': sum, "
                            "'tokens': count, ...}.")
        if isinstance(loss_batch_keys, str) or not all(
                isinstance(k, str) for k in loss_batch_keys):
            raise TypeError(f"Engine(loss_batch_keys={loss_batch_keys!r}) is a sequence of "
                            "batch entry names, e.g. ('rejected_inputs', 'rejected_targets').")
        if loss_batch_keys and loss_fn is None:
            raise ValueError(f"Engine(loss_batch_keys={tuple(loss_batch_keys)}) names batch "
                             "entries for a loss_fn, but there is none: pass loss_fn=, or "
                             "give a model of your own `extra_batch_keys` for entries it reads.")
        self.loss_fn = loss_fn
        self.loss_batch_keys = tuple(loss_batch_keys)
        used = batch_keys(model_config.architecture, self.model)
        # Every batch entry the steps read (the model's and the loss's); the others are dropped.
        self.batch_keys = used + tuple(k for k in self.loss_batch_keys if k not in used)
        self._extra_keys = (tuple(getattr(self.model, "extra_batch_keys", ()))
                            + self.loss_batch_keys)
        # `tx`: any optax transformation (e.g. `optax.multi_transform` freezing the embeddings);
        # `optimizer_config` then only supplies the learning-rate metric's schedule.
        self.tx = tx if tx is not None else make_optimizer(optimizer_config,
                                                           d_model=model_config.d_model)
        self.custom_tx = tx is not None
        self.given_tx = tx
        # `trainable`: the parameters to train (a fine-tune of some of them), the others frozen.
        self.trainable = None
        if trainable is not None:
            self.trainable, labels = _trainable_flags(trainable, jax.eval_shape(
                lambda: nn.meta.unbox(boxed_params(model_config, jax.random.key(0), model))))
            self.tx = optax.multi_transform({"train": self.tx, "frozen": optax.set_to_zero()},
                                            labels)
        self.learning_rate_fn = functools.partial(learning_rate_at, optimizer_config,
                                                  d_model=model_config.d_model)
        self.devices = list(jax.devices() if devices is None else devices)
        self._custom_devices = devices is not None
        self.mode = resolve_mode(parallel, len(self.devices))
        replicas = len(self.devices) if self.mode == "pmap" else 1
        if self.mode in ("single", "pmap") and parallel.data not in (-1, replicas):
            raise ValueError(
                f"ParallelConfig(data={parallel.data}) with mode {self.mode!r}, which runs on "
                f"{replicas} device{'s' if replicas > 1 else ''}: choose the devices with "
                "Engine(devices=...), or use mode='mesh' for a data axis of another size.")
        self.mesh: Mesh | None = None
        # `param_shardings`: a tree of shardings like the params, where one logical copy of
        # them lives in this mode, so `jax.device_put(params, engine.param_shardings)` lays out
        # another copy (a frozen reference model) like the trained one: the mesh layout
        # ("mesh"), the one device ("single"), replicated over the devices ("pmap": the layout
        # of `abstract_state()` and checkpoints, which a `jax.jit` reads; the pmapped steps'
        # own state stacks one copy per local device instead, see `device_params`).
        self.param_shardings: Any = None
        self._init_compiled: dict[Any, Any] = {}  # key shape and dtype -> executable
        self._in_flight: collections.deque = collections.deque()  # metrics of queued steps
        self._build()

    # ---- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        step = functools.partial(train_step, model=self.model, tx=self.tx, loss_config=self.loss,
                                 trainable=self.trainable,
                                 learning_rate_fn=self.learning_rate_fn,
                                 microbatches=self.parallel.microbatches,
                                 loss_fn=self.loss_fn)
        evaluate = functools.partial(eval_step, model=self.model, loss_config=self.loss,
                                     loss_fn=self.loss_fn)
        donate = (0,) if self.parallel.donate else ()
        options = self.step_compiler_options() or None
        try:
            abstract = jax.eval_shape(self._create, jax.random.key(0))
        except (TypeError, ValueError) as e:
            if self.custom_tx and "LogicallyPartitioned" in str(e):
                raise ValueError(
                    "Engine(tx=...): tx.init failed on the model's parameters, which it gets as "
                    "plain arrays: optax labels or masks (multi_transform, masked) built on "
                    "init_params' boxed parameters do not match them. Build them on "
                    "`flax.linen.meta.unbox(params)` (or `load_params(...)[1]`).") from e
            raise
        if self.custom_tx:
            _check_accumulation(abstract.opt_state, self.optimizer_config)
        cfg = self.model_config
        if (cfg.remat != "none" and not cfg.scan_layers
                and all(d.platform == "cpu" for d in self.devices)):
            log.warning("remat=%r without scan_layers: on XLA:CPU the unscanned layers' "
                        "recomputation keeps the step's memory as it was (measured) and adds "
                        "its FLOPs; set scan_layers=True for the memory, or remat='none'.",
                        cfg.remat)
        self._abstract = abstract
        if self.mode == "single":
            if jax.process_count() > 1:
                raise ValueError("ParallelConfig.mode='single' cannot run on several processes; "
                                 "use mode='mesh' (or 'pmap').")
            device = self.devices[0] if self._custom_devices else jax.local_devices()[0]
            self._device_sharding = SingleDeviceSharding(device)
            self._state_sharding = jax.tree.map(lambda _: self._device_sharding, abstract)
            self.param_shardings = self._state_sharding.params
            self._batch_sharding = self._device_sharding
            self._train = jax.jit(step, donate_argnums=donate, compiler_options=options)
            self._eval = jax.jit(evaluate, compiler_options=options)
            self._init = jax.jit(self._create, out_shardings=self._state_sharding)
            self.batch_shards = 1
        elif self.mode == "pmap":
            if self._custom_devices and jax.process_count() > 1:
                raise ValueError("pmap over a subset of devices works on one process only; "
                                 "leave Engine(devices=None) on multi-process runs.")
            local = [d for d in self.devices if d.process_index == jax.process_index()]
            self._local_devices = local
            self._pmap_sharding = NamedSharding(Mesh(np.array(local), (PMAP_AXIS,)), P(PMAP_AXIS))
            # The checkpoint layout: one replicated copy over every device of every process.
            self._replicated = NamedSharding(Mesh(np.array(self.devices), (PMAP_AXIS,)), P())
            self.param_shardings = jax.tree.map(lambda _: self._replicated, abstract.params)
            pmap_devices = local if self._custom_devices else None
            self._train = jax.pmap(functools.partial(step, axis_name=PMAP_AXIS),
                                   axis_name=PMAP_AXIS, devices=pmap_devices,
                                   donate_argnums=donate)
            self._eval = jax.pmap(functools.partial(evaluate, axis_name=PMAP_AXIS),
                                  axis_name=PMAP_AXIS, devices=pmap_devices)
            self._init = jax.jit(self._create,
                                 out_shardings=SingleDeviceSharding(local[0]))
            self.batch_shards = len(local)
        elif self.mode == "mesh":
            p = self.parallel
            self.mesh = partitioning.make_mesh(p.data, p.fsdp, p.tensor, devices=self.devices)
            length_axes = [a for name, axes in p.axis_rules if name == "length" and axes
                           for a in ((axes,) if isinstance(axes, str) else axes)
                           if self.mesh.shape[a] > 1]
            if (length_axes and all(d.platform == "cpu" for d in self.devices)
                    and ops.fast_paths.enabled("cpu_attention")):
                raise ValueError(
                    f"ParallelConfig.axis_rules split 'length' over {length_axes}, which the CPU "
                    "attention fast path cannot compile (XLA: unsupported reduction); set "
                    "FLAXFORMER_LITE_DISABLE=cpu_attention before JAX starts to use the plain "
                    "attention on CPU, or keep 'length' unsplit.")
            specs = param_logical_specs(self.model_config,
                                        self.model if self.custom_model else None)
            self.param_shardings = partitioning.logical_to_shardings(
                specs, abstract.params, self.mesh, p.axis_rules)
            replicated_dims = partitioning.undivided(specs, abstract.params, self.mesh,
                                                     p.axis_rules)
            if replicated_dims:
                log.warning(
                    "%d parameter dimension(s) do not divide over their mesh axes and are "
                    "replicated instead (each device holds and computes them whole), or split "
                    "over fewer axes where said: %s%s. "
                    "Choose sizes the mesh divides (experiments/mesh_report.py measures the "
                    "cost).", len(replicated_dims), "; ".join(replicated_dims[:4]),
                    " ..." if len(replicated_dims) > 4 else "")
            self._state_sharding = partitioning.state_shardings(
                abstract, self.param_shardings, self.mesh)
            self._batch_sharding = partitioning.batch_sharding(self.mesh)
            replicated = partitioning.replicated(self.mesh)
            self._train = jax.jit(step, in_shardings=(self._state_sharding, self._batch_sharding),
                                  out_shardings=(self._state_sharding, replicated),
                                  donate_argnums=donate, compiler_options=options)
            self._eval = jax.jit(evaluate, in_shardings=(self._state_sharding,
                                                         self._batch_sharding),
                                 out_shardings=replicated, compiler_options=options)
            self._init = jax.jit(self._create, out_shardings=self._state_sharding)
            self.batch_shards = partitioning.num_batch_shards(self.mesh)
            if self.batch_shards % jax.process_count():
                raise ValueError(
                    f"The batch is split {self.batch_shards} ways (data * fsdp) but there are "
                    f"{jax.process_count()} processes, each feeding its own slice; make "
                    "data * fsdp a multiple of the process count.")
        else:  # pragma: no cover - resolve_mode never returns anything else
            raise ValueError(self.mode)
        # `precompile` starts their compilation on background threads; calls wait for it.
        self._train = perf.CompiledAhead(self._train)
        self._eval = perf.CompiledAhead(self._eval)

    def step_compiler_options(self) -> dict[str, Any]:
        """The XLA compile options of the train and eval steps (see `ParallelConfig`)."""
        if self.mode == "pmap":
            return {}
        if self.parallel.compiler_options is not None:
            return dict(self.parallel.compiler_options)
        return perf.step_compiler_options(self.devices)

    def _init_compiler_options(self) -> dict[str, Any] | None:
        """The init runs once, so on CPU it is compiled with LLVM at -O1: its random-number and
        inverse-erf fusions then compile in about half the time (4.4-5.1 s -> 2.3-2.8 s on the
        0.8M-parameter Shakespeare model), to bitwise the same parameters."""
        if all(d.platform == "cpu" for d in self.devices):
            return {"xla_backend_optimization_level": 1}
        return None

    def _create(self, rng, params=None) -> TrainState:
        return create_train_state(self.model_config, self.optimizer_config, rng, tx=self.tx,
                                  params=params,
                                  model=self.model if self.custom_model else None)

    def _mesh_context(self):
        """Activation constraints are live only while tracing under the mesh and rules."""
        if self.mode != "mesh":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.parallel.axis_rules))
        return stack

    def describe(self) -> str:
        """One line: mode, devices and mesh shape (and micro-batches, if any)."""
        if self.mode == "mesh":
            shape = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
            text = f"mesh ({shape}) over {len(self.devices)} devices"
        elif self.mode == "pmap":
            text = (f"pmap over {len(self._local_devices)} local devices "
                    f"x {jax.process_count()} processes")
        else:
            text = f"single device ({self._device_sharding.device_set})"
        if self.parallel.microbatches > 1:
            text += f", {self.parallel.microbatches} micro-batches per step"
        return text

    # ---- state ----------------------------------------------------------------------------------
    def init_state(self, rng: jax.Array | int, params: Any = None) -> TrainState:
        """A fresh state from `rng` (a typed key or int seed), laid out for this mode.

        `params`: start from these parameters instead (pretrained ones to fine-tune, e.g.
        `load_params(dir)[1]`; host or device arrays in the model's tree, cast to
        `param_dtype`; either `scan_layers` layout, converted by `models.stack_layers` /
        `unstack_layers`), with a fresh optimizer state for them. A changed model (a larger
        vocabulary, added adapters) starts from `models.merge_params`'s result instead.
        """
        rng = as_key(rng)
        if params is not None:
            params = self._fit_params(params)
            state = self._init.lower(rng, params).compile(self._init_compiler_options())(
                rng, params)
            return self._replicate(state) if self.mode == "pmap" else state
        kind = (rng.shape, rng.dtype)
        if kind not in self._init_compiled:
            self._init_compiled[kind] = self._init.lower(rng).compile(
                self._init_compiler_options())
        state = self._init_compiled[kind](rng)
        if self.mode == "pmap":
            state = self._replicate(state)
        return state

    def _fit_params(self, params) -> Any:
        """`params` (boxed or not) rebuilt in this model's parameter tree, every path and
        shape checked."""
        leaves = partitioning.flat_leaves
        want, got = leaves(self._abstract.params), leaves(nn.meta.unbox(params))
        if set(want) != set(got):  # the other scan_layers layout? (an exact conversion)
            relaid = leaves((stack_layers if self.model_config.scan_layers
                             else unstack_layers)(params))
            if set(relaid) == set(want):
                log.info("params are in the scan_layers=%s layout: converted to this model's.",
                         not self.model_config.scan_layers)
                got = relaid
        if set(want) != set(got):
            raise ValueError(
                f"params do not fit this model: missing {sorted(set(want) - set(got))[:5]}, "
                f"unexpected {sorted(set(got) - set(want))[:5]} (at most 5 of each); pass the "
                f"parameters of the same TransformerConfig (e.g. `load_params(dir)[1]`). {_MERGE}")
        bad = [f"{k}: {tuple(np.shape(got[k]))} != {tuple(w.shape)}" for k, w in want.items()
               if tuple(np.shape(got[k])) != tuple(w.shape)]
        if bad:
            raise ValueError(f"params have other shapes than this model's: {bad[:5]}. {_MERGE}")
        tree = jax.tree.unflatten(jax.tree.structure(self._abstract.params),
                                  [got[k] for k in want])
        # Where the init reads them: arrays committed to another device (load_params puts them on
        # the first) would clash with the init's output shardings.
        if self.mode == "mesh":
            return jax.device_put(tree, self.param_shardings)
        target = self._device_sharding if self.mode == "single" else SingleDeviceSharding(
            self._local_devices[0])
        return jax.device_put(tree, target)

    def wait_for_compiles(self) -> None:
        """Block until the background compilations `precompile` started have finished (a
        process must not exit while XLA compiles on a daemon thread: it aborts)."""
        self._train.wait()
        self._eval.wait()

    def _replicate(self, tree):
        """Host-or-device arrays (one logical copy) -> stacked per local device for pmap."""
        n = len(self._local_devices)

        def one(x):
            x = np.asarray(x) if x.is_fully_addressable else _first_replica(x)
            return jax.device_put(np.broadcast_to(x, (n,) + x.shape), self._pmap_sharding)

        return jax.tree.map(one, tree)

    def num_params(self) -> int:
        """Number of model parameters, from the state's shapes (nothing traced or allocated)."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self._abstract.params))

    def abstract_state(self) -> TrainState:
        """`ShapeDtypeStruct`s with the shardings checkpoints are restored onto."""
        if self.mode == "pmap":
            shardings = jax.tree.map(lambda _: self._replicated, self._abstract)
        else:
            shardings = self._state_sharding
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self._abstract, shardings)

    def to_checkpoint(self, state: TrainState) -> TrainState:
        """The state as global arrays holding one logical copy (what Orbax saves)."""
        if self.mode != "pmap":
            return state

        def one(x):
            shape = x.shape[1:]
            per_device = {s.device: s.data.reshape(shape) for s in x.addressable_shards}
            return _assemble(shape, self._replicated, per_device)

        return jax.tree.map(one, state)

    def from_checkpoint(self, restored: TrainState) -> TrainState:
        """Inverse of `to_checkpoint` for a state restored onto `abstract_state()`."""
        if self.mode != "pmap":
            return restored
        n = len(self._local_devices)

        def one(x):
            per_device = {s.device: s.data[None] for s in x.addressable_shards}
            return _assemble((n,) + x.shape, self._pmap_sharding, per_device)

        return jax.tree.map(one, restored)

    def to_host(self, tree) -> Any:
        """Numpy copy (one logical copy) of a state, params or metrics pytree from this engine."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: _first_replica(x)[0], tree)

        def one(x):
            if x.is_fully_addressable:
                return np.asarray(x)
            if x.is_fully_replicated:
                return _first_replica(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(one, tree)

    def metrics_to_host(self, metrics: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
        """Metric sums of one step as float64 numpy scalars."""
        return {k: np.float64(v) for k, v in self.to_host(dict(metrics)).items()}

    # ---- batches --------------------------------------------------------------------------------
    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's slice of the global batch (numpy, leading axis = examples) -> device
        arrays laid out for this mode. In "mesh" mode across processes the global batch is the
        processes' slices stacked in process order. Entries neither the model nor the loss
        reads (`batch_keys`: a model's `extra_batch_keys`, `loss_batch_keys`) are dropped,
        each named once in a warning.
        """
        target = self._pmap_sharding if self.mode == "pmap" else self._batch_sharding
        laid_out = {k for k, v in (batch.items() if isinstance(batch, Mapping) else ())
                    if isinstance(v, jax.Array) and v.sharding == target}  # checked then
        check_batch(self.model_config, batch, checked=laid_out, extra_keys=self._extra_keys)
        return self._lay_out(batch)

    def _lay_out(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """`shard_batch` for a batch already checked (the output of `pad_batch`)."""
        target = self._pmap_sharding if self.mode == "pmap" else self._batch_sharding
        local_shards = self._local_batch_shards()
        used = self.batch_keys
        out = {}
        for key, value in batch.items():
            if key not in used:
                continue
            if isinstance(value, jax.Array) and value.sharding == target:
                out[key] = value  # already laid out (the output of an earlier shard_batch)
                continue
            abstract = isinstance(value, jax.ShapeDtypeStruct)  # lower_train_step's shapes
            if not (abstract or isinstance(value, jax.Array) and jax.process_count() == 1):
                value = np.asarray(value)  # device arrays stay on device (no host round trip)
            rows = value.shape[0]
            if rows % local_shards:
                k = self.parallel.microbatches
                one_cpu = (jax.process_count() == 1
                           and all(d.platform == "cpu" for d in self.devices))
                raise ValueError(
                    f"Batch {key!r} has {rows} examples on this process, not divisible by its "
                    f"{local_shards} batch shards ({self.describe()}); make the per-process "
                    f"batch size a multiple of {local_shards}"
                    + (f" (of {local_shards * k} for training with {k} micro-batches)"
                       if k > 1 else "")
                    + ("; these devices split one CPU (jax_num_cpu_devices; the experiment "
                       "scripts' --config.parallel.cpu_devices, 0 for one device)"
                       if one_cpu else "") + ".")
            if abstract:
                out[key] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target)
            elif self.mode == "pmap":
                value = value.reshape((local_shards, rows // local_shards) + value.shape[1:])
                out[key] = jax.device_put(value, self._pmap_sharding)
            elif self.mode == "mesh" and not isinstance(value, jax.Array):
                out[key] = jax.make_array_from_process_local_data(self._batch_sharding, value)
            else:
                out[key] = jax.device_put(value, self._batch_sharding)
        return out

    def _local_batch_shards(self) -> int:
        if self.mode == "pmap":
            return len(self._local_devices)
        return max(self.batch_shards // jax.process_count(), 1)

    def pad_batch(self, batch: Mapping[str, Any], rows: int | None = None) -> dict[str, Any]:
        """Host batch padded with rows of padding (ids `config.pad_id`, other entries 0: weight
        0, they change no metric sum or gradient) to `rows`, by default to a multiple of this
        process's batch shards, e.g. for the short last batch of an eval set or of a training
        epoch. Without a padding id (`pad_id=None`) the added rows' segment ids 0 (or
        `loss_weights` 0) mark them, so the batch needs one of them. A classifier's added rows
        (`inputs` all 0, label 0) weigh 0 too (`models.example_weights`)."""
        shards = self._local_batch_shards()
        used = self.batch_keys
        check_batch(self.model_config, batch,  # before padding can make row counts agree
                    extra_keys=self._extra_keys)
        pad_id = self.model_config.pad_id
        out = {}
        for key, value in batch.items():
            if key not in used:
                continue
            n = np.shape(value)[0]
            missing = -n % shards if rows is None else rows - n
            if missing:
                if (pad_id is None and "segment_ids" not in batch
                        and "loss_weights" not in batch):
                    raise ValueError(
                        f"A batch of {n} rows needs {missing} more to fill its shape, but "
                        "with TransformerConfig.pad_id=None only segment ids 0 (or "
                        "loss_weights 0) mark padding and the batch has neither: give it "
                        "segment_ids (1 on its tokens) or loss_weights, or give every batch "
                        "the same number of rows, divisible by the devices.")
                value = np.asarray(value)
                fill = pad_id if key in ("inputs", "targets") and pad_id is not None else 0
                value = np.concatenate([value, np.full((missing,) + value.shape[1:], fill,
                                                       value.dtype)])
            out[key] = value
        return out

    # ---- steps ----------------------------------------------------------------------------------
    def precompile(self, state: TrainState, batch: Mapping[str, Any],
                   eval_batch: Mapping[str, Any] | Callable[[], Mapping[str, Any] | None]
                   | None = None) -> None:
        """Start compiling the train step for batches shaped like `batch`, and the eval step for
        `eval_batch`, on background threads; returns once both are traced. `eval_batch` may be
        a function returning it (or None), called only when it is used, so a caller need not
        fetch an eval batch for nothing.

        Tracing is Python and holds the GIL; XLA compiles without it and leaves part of the CPU
        idle. Started together, the eval step is traced while the train step compiles and is
        compiled while training runs, instead of stalling the first evaluation (on the
        Shakespeare recipe about a second). The threads run at a lower priority
        (`perf.CompiledAhead`) so that the train step, which the caller waits for, comes
        first. `train_step` and `eval_step` wait for their compilation and then find the
        executable in JAX's cache, so nothing compiles twice. A failed background compile
        is ignored: the step raises the same error when it runs.
        `train()` calls this before its first step; it does nothing in "pmap" mode.
        """
        if self.mode == "pmap":
            return
        jobs = [("train", self._train, self._train_batch(batch))]
        if callable(eval_batch):
            eval_batch = eval_batch()
        if eval_batch is not None:
            jobs.append(("eval", self._eval, self._lay_out(self.pad_batch(eval_batch))))
        for name, step, example in jobs:
            if step.compiling:
                continue
            with self._mesh_context():
                lowered = step.lower(state, example)
            step.compile_ahead(lowered, name=f"compile-{name}-step")

    def train_step(self, state: TrainState, batch: Mapping[str, Any]
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step; `batch` is host data (sharded here) or the output of `shard_batch`.

        Returns at once (JAX dispatches asynchronously) unless more than `STEPS_AHEAD` steps
        are queued; it then waits for the oldest, so that a loop that never reads its metrics
        cannot queue hundreds of steps (on a CPU split into devices, their collectives then
        starve each other of threads and XLA aborts the process)."""
        batch = self._train_batch(batch)
        with self._mesh_context():
            state, metrics = self._train(state, batch)
        self._in_flight.append(metrics)
        if len(self._in_flight) > STEPS_AHEAD:
            jax.block_until_ready(self._in_flight.popleft())
        return state, metrics

    def lower_train_step(self, batch: Mapping[str, Any],
                         state: TrainState | None = None) -> jax.stages.Lowered:
        """The train step lowered for `batch`'s shapes (arrays, or `jax.ShapeDtypeStruct`s:
        nothing allocated at all), against `state` or by default the abstract state, so no
        parameter is allocated. `.compile()` it to read, per device,
        XLA's `cost_analysis()` (FLOPs), `memory_analysis()` and the optimized HLO (its
        collectives): what a mesh layout costs before any run (`experiments/mesh_report.py`).
        Not in "pmap" mode, whose step is not a `jax.jit`.
        """
        if self.mode == "pmap":
            raise ValueError("lower_train_step: ParallelConfig.mode='pmap' steps are pmapped; "
                             "use mode='single' or 'mesh'.")
        state = self.abstract_state() if state is None else state
        batch = self._train_batch(batch)
        with self._mesh_context():
            return self._train.lower(state, batch)

    def _train_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """`shard_batch`, checking that each device's rows split into the micro-batches."""
        batch = self.shard_batch(batch)
        k = self.parallel.microbatches
        for key, value in batch.items():
            rows = value.shape[1] if self.mode == "pmap" else value.shape[0] // self.batch_shards
            if rows % k:
                raise ValueError(
                    f"Batch {key!r} has {rows} examples per device ({self.describe()}), not "
                    f"divisible by ParallelConfig.microbatches={k}; make the batch size a "
                    f"multiple of {k * self.batch_shards} or change microbatches.")
        return batch

    def eval_step(self, state: TrainState, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Metric sums on one batch (no dropout, no update). A batch whose size the batch
        shards do not divide is padded with empty rows first (see `pad_batch`)."""
        batch = self._lay_out(self.pad_batch(batch))
        with self._mesh_context():
            return self._eval(state, batch)

    def params(self, state: TrainState) -> Any:
        """Host copy of the parameters."""
        return self.to_host(state.params)

    def device_params(self, state: TrainState) -> Any:
        """The parameters on the devices, for inference during training (a sampler, a beam
        search): sharded ones as they are, so a model that needs `fsdp` to fit keeps its
        layout (a host copy would land whole on one device); replicated ones as the first
        device's copy, so the inference runs once, not on every device, with no host round
        trip."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x.addressable_data(0)[0], state.params)
        if all(x.is_fully_replicated for x in jax.tree.leaves(state.params)):
            return jax.tree.map(lambda x: x.addressable_data(0), state.params)
        return state.params
