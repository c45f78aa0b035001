"""Optax optimizers and learning-rate schedules from one small frozen config.

Counting convention: optax hands a schedule the number of optimizer updates already applied
(0 for the first update). The schedules here use the 1-based update number `n = count + 1`, as
the paper does, so the first update never has a learning rate of exactly 0 (Vaswani's formula at
step 0 would be `min(inf, 0) = 0`: a wasted step).

With gradient accumulation (`accumulation_steps = k`) a train step is one micro-batch; the
parameters (and the schedule's count) move once every k steps, so `warmup_steps` and
`decay_steps` count optimizer updates, not micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxformer_lite.config import check_number, plain_fields

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "cosine", "vaswani")

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How parameters are updated.

    optimizer: "adamw" (Adam with decoupled weight decay) or "adafactor" (factored second
      moments, no momentum, relative step size; `b1`, `b2`, `eps` are not used; attention
      kernels factored as `[embed, heads * head_dim]` matrices, see `factor_heads`; scanned
      layers treated one by one, see `adafactor`).
    learning_rate: the peak learning rate; for `schedule="vaswani"` a multiplier on the paper's
      formula (1.0 reproduces it exactly).
    schedule: "constant" (after an optional linear warmup), "cosine" (linear warmup to
      `learning_rate`, then half a cosine down to `final_learning_rate` at update
      `decay_steps`) or "vaswani" (`d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)`).
    weight_decay: decoupled decay, applied only to matrices (never to biases, norm scales or
      other 1-D parameters; see `decay_mask`): each update subtracts `lr * weight_decay * p`,
      `lr` the scheduled learning rate, for AdamW and Adafactor alike.
    clip_norm: clip the (accumulated) gradient to this global L2 norm; None = no clipping.
    accumulation_steps: average the gradients of this many consecutive train steps
      (micro-batches) into one update (`optax.MultiSteps`).
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    final_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = None
    accumulation_steps: int = 1

    def __post_init__(self):
        plain_fields(self)
        _validate(self)

    @classmethod
    def paper(cls, warmup_steps: int = 4000, **overrides) -> OptimizerConfig:
        """Vaswani et al. (2017), section 5.3: Adam(0.9, 0.98, 1e-9) and the warmup/rsqrt rate."""
        values = dict(optimizer="adamw", learning_rate=1.0, schedule="vaswani",
                      warmup_steps=warmup_steps, b1=0.9, b2=0.98, eps=1e-9)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> OptimizerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(name: str, value, low: float, high: float = math.inf, **kw) -> None:
    check_number("OptimizerConfig", name, value, low, high, **kw)


def _validate(c: OptimizerConfig) -> None:
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"OptimizerConfig.optimizer={c.optimizer!r} is not one of "
                         f"{', '.join(OPTIMIZERS)}.")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"OptimizerConfig.schedule={c.schedule!r} is not one of "
                         f"{', '.join(SCHEDULES)}.")
    _number("learning_rate", c.learning_rate, 0.0, low_open=True)
    _number("warmup_steps", c.warmup_steps, 0, integer=True)
    if c.decay_steps is not None:
        _number("decay_steps", c.decay_steps, 1, integer=True)
    _number("final_learning_rate", c.final_learning_rate, 0.0)
    _number("weight_decay", c.weight_decay, 0.0)
    _number("b1", c.b1, 0.0, 1.0, high_open=True)
    _number("b2", c.b2, 0.0, 1.0, high_open=True)
    _number("eps", c.eps, 0.0)
    if c.optimizer == "adamw" and c.eps == 0:
        raise ValueError(
            "OptimizerConfig.eps=0 makes Adam divide 0 by 0 wherever a parameter's gradient has "
            "always been 0 (an unused embedding row): NaN parameters. Keep it > 0 (1e-8, or the "
            "paper's 1e-9).")
    if c.schedule == "vaswani" and c.warmup_steps < 1:
        raise ValueError("OptimizerConfig.warmup_steps must be >= 1 for schedule='vaswani' "
                         "(the paper used 4000).")
    if c.schedule == "cosine" and (c.decay_steps is None or c.decay_steps <= c.warmup_steps):
        raise ValueError(
            f"OptimizerConfig.decay_steps={c.decay_steps} must be set and larger than "
            f"warmup_steps={c.warmup_steps} for schedule='cosine' (usually the number of "
            "optimizer updates in the run).")
    if c.schedule == "cosine" and c.final_learning_rate > c.learning_rate:
        raise ValueError(
            f"OptimizerConfig.final_learning_rate={c.final_learning_rate} is above "
            f"learning_rate={c.learning_rate}: the cosine schedule would rise.")
    if c.schedule != "cosine" and (c.decay_steps is not None or c.final_learning_rate):
        raise ValueError(
            f"OptimizerConfig.decay_steps={c.decay_steps} / final_learning_rate="
            f"{c.final_learning_rate} are set, but schedule={c.schedule!r} never reads them; "
            "set schedule='cosine' to decay, or leave them out.")
    if c.clip_norm is not None:
        _number("clip_norm", c.clip_norm, 0.0, low_open=True)
    _number("accumulation_steps", c.accumulation_steps, 1, integer=True,
            hint=" (1 = no accumulation)")


# ---- schedules ---------------------------------------------------------------------------------

def vaswani_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> Schedule:
    """`scale * d_model**-0.5 * min(n**-0.5, n * warmup_steps**-1.5)` at update `n = count + 1`.

    Rises linearly for `warmup_steps` updates, peaks at `(d_model * warmup_steps)**-0.5`, then
    decays as `n**-0.5`.
    """
    if warmup_steps < 1:
        raise ValueError(f"vaswani_schedule: warmup_steps={warmup_steps} must be >= 1.")

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model ** -0.5 * jnp.minimum(n ** -0.5, n * warmup_steps ** -1.5)

    return schedule


def warmup_cosine_schedule(peak: float, warmup_steps: int, decay_steps: int,
                           final: float = 0.0) -> Schedule:
    """Linear warmup to `peak` at update `warmup_steps`, cosine down to `final` at `decay_steps`.

    At update `n = count + 1`: `peak * n / warmup` while `n <= warmup`, then
    `final + (peak - final) * (1 + cos(pi * p)) / 2` with `p = (n - warmup) / (decay - warmup)`
    clipped to [0, 1], so the rate stays at `final` after `decay_steps`.
    """

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * n / max(warmup_steps, 1)
        progress = jnp.clip((n - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(n <= warmup_steps, warm, cosine)

    return schedule


def constant_schedule(value: float, warmup_steps: int = 0) -> Schedule:
    """`value`, reached linearly over the first `warmup_steps` updates (if any)."""

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        if warmup_steps:
            return value * jnp.minimum(1.0, n / warmup_steps)
        return jnp.full_like(n, value)

    return schedule


def make_schedule(config: OptimizerConfig, d_model: int | None = None) -> Schedule:
    """The learning rate as a function of the optimizer update count (0-based)."""
    if config.schedule == "vaswani":
        if d_model is None:
            raise ValueError("schedule='vaswani' needs the model width: pass d_model= "
                             "(TransformerConfig.d_model).")
        return vaswani_schedule(d_model, config.warmup_steps, config.learning_rate)
    if config.schedule == "cosine":
        return warmup_cosine_schedule(config.learning_rate, config.warmup_steps,
                                      config.decay_steps, config.final_learning_rate)
    return constant_schedule(config.learning_rate, config.warmup_steps)


def num_updates(num_steps: int, accumulation_steps: int = 1) -> int:
    """Optimizer updates a run of `num_steps` train steps makes: `num_steps // k`.

    `optax.MultiSteps` applies the average at the end of every k-th micro-batch, so a trailing
    partial group (`num_steps % k` micro-batches) is accumulated but never applied.
    """
    return num_steps // accumulation_steps


def learning_rate_at(config: OptimizerConfig, step, d_model: int | None = None):
    """Learning rate used by train step number `step` (0-based, counting micro-batches).

    With accumulation the update at the end of micro-batches `[j*k, (j+1)*k)` is update j.
    """
    return make_schedule(config, d_model)(step // config.accumulation_steps)


# ---- weight decay mask ---------------------------------------------------------------------------

def decay_mask(params) -> object:
    """Pytree of bools like `params`: True where weight decay applies.

    Spared: biases (any parameter whose name ends in "bias"), norm scales and anything inside a
    module whose name contains "norm", and every parameter with fewer than 2 dimensions. With
    `scan_layers` a 1-D parameter gains a leading layer axis, so names decide there.
    """

    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if jnp.ndim(leaf) < 2:
            return False
        if names and (names[-1].endswith("bias") or names[-1] == "scale"):
            return False
        return not any("norm" in name for name in names)

    return jax.tree.map_with_path(decays, params)


# ---- Adafactor's view of attention kernels -------------------------------------------------------

# The library's multi-head projections: kernels `[..., embed, (2 | 3,) heads, head_dim]`.
_HEAD_PROJECTIONS = ("query", "qkv", "key_value")


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def heads_merged_shape(path, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape Adafactor sees a multi-head attention kernel in, or None to leave it as is.

    The library keeps attention kernels with `heads` and `head_dim` as two axes
    (`[embed, heads, head_dim]`, `[embed, 3, heads, head_dim]`, `[heads, head_dim, embed]`,
    each with a leading `[layers]` axis when scanned). Adafactor factors the second moment
    over an array's two largest axes, and only when both have at least 128 entries, so with
    `head_dim` 64 it kept the whole second moment of every attention kernel (as much memory as
    AdamW's). Merged into one axis, `[embed, heads * head_dim]`, each projection is factored as
    the 2-D matrix it is (as T5's Adafactor does; q, k and v of a fused kernel each apart).
    `path` is the parameter's tree path (keys or names).
    """
    names = _names(path)
    if len(names) < 2 or names[-1] != "kernel" or len(shape) < 3:
        return None
    if names[-2] in _HEAD_PROJECTIONS:
        return tuple(shape[:-2]) + (shape[-2] * shape[-1],)
    if names[-2] == "out" and any("attention" in n for n in names[:-2]):
        return tuple(shape[:-3]) + (shape[-3] * shape[-2], shape[-1])
    return None


def factor_heads(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to attention kernels with `[heads, head_dim]` merged into one axis.

    Reshapes (no copies) parameters and updates into `heads_merged_shape` before `inner` and
    the updates back after it; everything else passes unchanged. For Adafactor: every step of
    it other than the factored second moment (update clipping, the parameter scale, decay)
    reads an array as a whole, so only the factoring changes.
    """

    def views(tree):
        return jax.tree.map_with_path(
            lambda path, x: x if (v := heads_merged_shape(path, jnp.shape(x))) is None
            else jnp.reshape(x, v), tree)

    def init(params):
        return inner.init(views(params))

    def update(updates, state, params=None):
        new, state = inner.update(views(updates), state,
                                  None if params is None else views(params))
        return jax.tree.map(lambda n, u: jnp.reshape(n, jnp.shape(u)), new, updates), state

    return optax.GradientTransformation(init, update)


# ---- Adafactor, layer by layer in scanned stacks ------------------------------------------------

def is_layer_stack(path) -> bool:
    """Whether a parameter (or update, or moment) at tree `path` belongs to a `scan_layers`
    stack (`.../layers/layers/...`), its arrays holding every layer on a leading axis."""
    names = _names(path)
    return any(a == b == "layers" for a, b in zip(names, names[1:], strict=False))


def _block_rms(path, x: jax.Array) -> jax.Array:
    """Root mean square of `x` as a whole, or of each layer's slice (`[layers, 1, ...]`) in a
    scanned stack, so that a stacked parameter is treated as its layers' parameters are."""
    if is_layer_stack(path):
        return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
    """`optax.clip_by_block_rms`, per layer in scanned stacks."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map_with_path(
            lambda path, u: u / jnp.maximum(1.0, _block_rms(path, u) / threshold), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _scale_by_param_block_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """`optax.scale_by_param_block_rms`, per layer in scanned stacks."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Adafactor's parameter scale needs the parameters: pass params= to "
                             "update.")
        return jax.tree.map_with_path(
            lambda path, u, p: u * jnp.maximum(_block_rms(path, p), min_scale),
            updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def adafactor(learning_rate: Schedule | float, *, weight_decay_rate=None,
              weight_decay_mask=None) -> optax.GradientTransformation:
    """`optax.adafactor` with its defaults, each layer of a `scan_layers` stack on its own.

    Adafactor clips each parameter's update to a root mean square of 1 and scales it by the
    parameter's root mean square, both over the parameter's whole array. A scanned stack holds
    every layer's copy of a parameter in one array, so optax's chain would take those over all
    layers at once, and `scan_layers`, a layout choice, would change the training. Here they
    are taken per layer (the stack's leading axis), as for the same model unscanned. The
    factored second moments already keep the layers apart (they average over an array's two
    largest axes), unless the layer count is one of those: 1-D parameters stacked from 128
    layers up, or layers outnumbering a kernel's sides. The transformations and their state
    are optax's own, in its order, so states saved by either restore into the other.
    """
    return optax.chain(
        optax.scale_by_factored_rms(factored=True, decay_rate=0.8, step_offset=0,
                                    min_dim_size_to_factor=128, epsilon=1e-30),
        _clip_by_block_rms(1.0),
        optax.scale_by_learning_rate(learning_rate, flip_sign=False),
        _scale_by_param_block_rms(),
        *([] if weight_decay_rate is None else [
            optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask)]),
        optax.scale(-1))


def _factored_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """`(row, col)`: the axes Adafactor's row and column statistics average over (its two
    largest, as optax picks them)."""
    order = np.argsort(shape)
    return int(order[-1]), int(order[-2])


def _split_moment(key: str) -> tuple[str, str, str] | None:
    """`(before, field, param path)` of an Adafactor second-moment leaf's "a/b/..." path."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part in ("v_row", "v_col", "v") and i + 1 < len(parts):
            return "/".join(parts[:i]), part, "/".join(parts[i + 1:])
    return None


def unfactored_heads(saved: Mapping[str, tuple[int, ...]], wanted: Mapping[str, Any]
                     ) -> dict[str, tuple[int, ...]] | None:
    """Whether an optimizer state was saved before Adafactor factored attention kernels.

    `saved` and `wanted` map "a/b/c" paths of the saved state's leaves to their shapes and of
    this run's state to its (abstract) leaves. Returns `{path: shape}` of the whole second
    moments to read as saved (one per attention kernel, `[..., heads, head_dim, ...]`), or None
    when the two states do not differ exactly that way (then they do not fit at all).
    Adafactor's statistics are moving averages of the squared gradient, and averaging commutes
    with them, so `factor_moments` turns the whole moments into the row and column statistics
    the run would have had with factoring from its start.
    """
    if set(saved) != set(wanted):
        return None
    differ = [k for k in wanted if tuple(saved[k]) != tuple(wanted[k].shape)]
    whole = {}
    for key in differ:
        split = _split_moment(key)
        if split is None:
            return None
        before, _, param = split
        v = f"{before}/v/{param}"
        shape = tuple(saved.get(v, ()))
        view = heads_merged_shape(param.split("/"), shape)
        if (view is None or tuple(wanted[v].shape) != (1,)
                or any(tuple(saved[f"{before}/{f}/{param}"]) != (1,) for f in ("v_row", "v_col"))):
            return None
        row, col = _factored_axes(view)
        fits = (tuple(wanted[f"{before}/v_row/{param}"].shape) == view[:row] + view[row + 1:]
                and tuple(wanted[f"{before}/v_col/{param}"].shape) == view[:col] + view[col + 1:])
        if not fits:
            return None
        whole[v] = shape
    return whole or None


def factor_moments(restored: Mapping[str, Any], whole: Mapping[str, tuple[int, ...]]
                   ) -> dict[str, Any]:
    """`{path: array}` replacing, for each whole second moment `whole` names (see
    `unfactored_heads`), its row and column statistics and the moment itself (`[1]`, as
    optax keeps an unused one) in `restored` ("a/b/c" paths to the restored arrays)."""
    out = {}
    for v in whole:
        before, _, param = _split_moment(v)
        moment = restored[v]
        view = heads_merged_shape(param.split("/"), moment.shape)
        full = jnp.reshape(moment, view)
        row, col = _factored_axes(view)
        out[f"{before}/v_row/{param}"] = jnp.mean(full, axis=row).astype(moment.dtype)
        out[f"{before}/v_col/{param}"] = jnp.mean(full, axis=col).astype(moment.dtype)
        out[v] = jnp.zeros((1,), moment.dtype)
    return out


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run in float32 whatever the parameters' dtype: its state (moments, factored
    statistics, accumulated gradients) and its updates are float32, and
    `optax.apply_updates` adds an update to its parameter in float32 before rounding once.

    Kept in bfloat16, Adam's moments lose what they are for: `b2=0.999` rounds to 1.0 (the
    second moment never decays) and `b1=0.9` to 0.898, and small squared gradients vanish. For
    float32 parameters this changes nothing (no cast is made).
    """

    def up(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32)
                            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32
                            else x, tree)

    def init(params):
        return inner.init(up(params))

    def update(updates, state, params=None):
        return inner.update(up(updates), state, None if params is None else up(params))

    return optax.GradientTransformation(init, update)


# ---- the optimizer -------------------------------------------------------------------------------

def make_optimizer(config: OptimizerConfig, d_model: int | None = None
                   ) -> optax.GradientTransformation:
    """Optax transformation for `config`: [clip] -> adamw | adafactor, wrapped in MultiSteps.

    `d_model` is needed only by the "vaswani" schedule.
    """
    schedule = make_schedule(config, d_model)
    if config.optimizer == "adamw":
        base = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask)
    else:
        # optax adds Adafactor's decay after the learning-rate scaling (p -= wd * p); scale it
        # by the schedule so that `weight_decay` means what it means for AdamW (p -= lr*wd*p).
        wd = config.weight_decay
        base = factor_heads(adafactor(
            schedule, weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
            weight_decay_mask=decay_mask))
    if config.clip_norm is not None:
        base = optax.chain(optax.clip_by_global_norm(config.clip_norm), base)
    if config.accumulation_steps > 1:
        base = optax.MultiSteps(base, every_k_schedule=config.accumulation_steps
                                ).gradient_transformation()
    return in_float32(base)
