"""Pure train and eval steps: `(state, batch) -> (state, metrics)`, the same in every mode.

The step reads the batch format shared by the data layer (int32 arrays, leading axis = batch,
token 0 = padding, or a decoder-only model's `config.pad_id`) and dispatches on
`config.architecture`:

- decoder_only: `inputs`, `targets` `[batch, length]`, optional `segment_ids`, `positions`;
- encoder_decoder: `inputs` `[batch, src_len]`, `targets` `[batch, tgt_len]`, optional
  `inputs_segment_ids`, `targets_segment_ids`, `inputs_positions`, `targets_positions`;
- encoder_only (masked LM, needs `config.mlm_head`): `inputs`, `targets` (original ids at the
  selected positions, 0 elsewhere), optional `segment_ids`, `positions`, `token_type_ids`.

- encoder_only classifier (`config.num_classes > 0`): `inputs` `[batch, length]`, `labels`
  `[batch]` (class ids), optional `segment_ids`, `positions`, `token_type_ids`; the objective
  is the cross-entropy of the model's `class_logits` `[batch, num_classes]` per example (label
  smoothing and z-loss as configured), and the metric counts (`tokens`, `sequences`) count
  examples. A row whose `inputs` are all padding (0) weighs 0 (`models.example_weights`): the
  rows `Engine.pad_batch` adds.

The loss weight of a target is `targets != config.pad_id` (0; None: `segment_ids != 0`,
every target without segment ids), times the batch's optional `loss_weights` `[batch, length]`
(float or bool; a classifier's `[batch]`, times its example weights): e.g. 0 on a prompt's
targets trains on the completion alone while attention still reads the prompt.
Gradients are of the *global* token mean: each device differentiates its weighted loss sum
divided by the token count of the whole batch, and the per-device gradients are summed
(`lax.psum`) under `pmap`; under `jit` on a mesh the compiler does the same reduction. So a
batch gives the same update whether it sits on 1 device or 8, even when padding is spread
unevenly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxformer_lite.models import LOSS_WEIGHTS, example_weights, masked_positions, model_kwargs
from flaxformer_lite.training import losses
from flaxformer_lite.training.state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]
# A training objective of your own: `loss_fn(model, params, batch, *, deterministic,
# dropout_rng) -> {"loss": sum, "tokens": count, ...}` (see `train_step`).
LossFn = Callable[..., Mapping[str, Array]]

def _check_keys(batch: Batch, arch: str) -> None:
    for key in ("inputs", "targets"):
        if key not in batch:
            raise ValueError(f"A {arch} batch needs {key!r}; got keys {sorted(batch)}.")


def logits_fn(model: nn.Module, params, batch: Batch, *, deterministic: bool = True,
              dropout_rng: Array | None = None, mlm_positions: Array | None = None,
              sown: list | None = None) -> Array:
    """Model logits `[batch, length, vocab]` (float32) for a training batch of any architecture
    (an encoder-only model's at `mlm_positions` `[batch, k]` only, when given). With a list
    as `sown`, what the model sows into its "losses" collection is appended to it."""
    cfg = model.config
    arch = cfg.architecture
    _check_keys(batch, arch)
    kwargs = model_kwargs(batch, arch, model)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    variables = {"params": params}

    def apply(*args, **kw):
        if sown is None:
            return model.apply(variables, *args, **kw)
        out, state = model.apply(variables, *args, mutable=[LOSSES], **kw)
        sown.append(state.get(LOSSES, {}))
        return out

    if arch == "decoder_only":
        return apply(batch["inputs"], deterministic=deterministic, rngs=rngs, **kwargs)
    if arch == "encoder_decoder":
        return apply(batch["inputs"], batch["targets"], deterministic=deterministic, rngs=rngs,
                     **kwargs)
    out = apply(batch["inputs"], deterministic=deterministic, rngs=rngs,
                mlm_positions=mlm_positions, **kwargs)
    if not isinstance(out, Mapping) or "logits" not in out:
        raise ValueError("Training an encoder_only model needs logits: set "
                         "TransformerConfig.mlm_head=True (masked-LM head); a model of your "
                         "own returns them as {\"logits\": [batch, length or k, vocab]}.")
    return out["logits"]


# The collection whose sown values the train step adds to the objective (auxiliary losses).
LOSSES = "losses"


def classifies(model: nn.Module) -> bool:
    """Whether the steps train `model` as a sequence classifier (`config.num_classes > 0`)."""
    return bool(getattr(model.config, "num_classes", 0))


def class_logits(model: nn.Module, params, batch: Batch, *, deterministic: bool = True,
                 dropout_rng: Array | None = None, sown: list | None = None) -> Array:
    """A classifier's `class_logits` `[batch, num_classes]` (float32) for a batch holding
    `inputs` `[batch, length]` (and the optional entries the model reads); `sown` as in
    `logits_fn`."""
    cfg = model.config
    if "inputs" not in batch:
        raise ValueError(f"A classification batch needs 'inputs'; got keys {sorted(batch)}.")
    kwargs = model_kwargs(batch, cfg.architecture, model)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    variables = {"params": params}
    if sown is None:
        out = model.apply(variables, batch["inputs"], deterministic=deterministic, rngs=rngs,
                          **kwargs)
    else:
        out, state = model.apply(variables, batch["inputs"], deterministic=deterministic,
                                 rngs=rngs, mutable=[LOSSES], **kwargs)
        sown.append(state.get(LOSSES, {}))
    logits = out.get("class_logits") if isinstance(out, Mapping) else None
    rows = batch["inputs"].shape[0]
    if logits is None or logits.shape != (rows, cfg.num_classes):
        got = "none" if logits is None else f"shape {tuple(logits.shape)}"
        raise ValueError(f"Training a classifier (TransformerConfig.num_classes="
                         f"{cfg.num_classes}) needs the model's output dict to hold "
                         f"'class_logits' [batch, num_classes] = [{rows}, {cfg.num_classes}]; "
                         f"got {got}.")
    return logits


def classification_sums(model: nn.Module, params, batch: Batch, *, loss_config,
                        deterministic: bool = True, dropout_rng: Array | None = None,
                        sown: list | None = None) -> dict[str, Array]:
    """`losses.metric_sums` of a classifier's batch: `class_logits` against `labels`, one
    weight per example (`example_loss_weights`), so `tokens` counts the real examples."""
    if "labels" not in batch:
        raise ValueError(f"A classification batch needs 'labels' [batch]; got keys "
                         f"{sorted(batch)}.")
    logits = class_logits(model, params, batch, deterministic=deterministic,
                          dropout_rng=dropout_rng, sown=sown)
    return losses.metric_sums(logits, batch["labels"], example_loss_weights(batch),
                              label_smoothing=loss_config.label_smoothing,
                              z_loss=loss_config.z_loss)


def _head_positions(model: nn.Module) -> int:
    """k of an encoder-only model whose masked-LM head runs at k positions a row, else 0."""
    cfg = model.config
    return cfg.mlm_predictions if cfg.architecture == "encoder_only" else 0


def loss_targets(model: nn.Module, batch: Batch) -> Array:
    """The targets the loss reads: the batch's, or at most `mlm_predictions` a row (what
    `predictions` scores), so the token count that divides the gradient counts the same
    tokens."""
    _check_keys(batch, model.config.architecture)
    k = _head_positions(model)
    return masked_positions(batch["targets"], k)[1] if k else batch["targets"]


def target_weights(model: nn.Module, batch: Batch, targets: Array, *,
                   at_head_positions: bool = True) -> Array:
    """The loss weights `[batch, length or k]` of `targets` (`predictions`'): 0 on padding,
    `config.pad_id`; without one (None), where a decoder-only batch's `segment_ids` are 0;
    times the batch's `loss_weights` `[batch, length]` when it has them. For an encoder-only
    model with `mlm_predictions = k` those are taken at the k positions `predictions` scores,
    unless `at_head_positions=False` (`targets` are then the batch's own, every position). So
    a prompt's targets can be left out of the loss (weights 0) while the model still attends
    to its tokens, whatever the padding id."""
    weights = losses.loss_weights(targets, model.config.pad_id, batch.get("segment_ids"))
    given = batch.get(LOSS_WEIGHTS)
    if given is None:
        return weights
    given = jnp.asarray(given).astype(jnp.float32)
    if at_head_positions and _head_positions(model):  # where the masked-LM head scores
        positions = masked_positions(batch["targets"], _head_positions(model))[0]
        given = jnp.take_along_axis(given, positions, axis=-1)
    if given.shape != weights.shape:
        raise ValueError(f"Batch entry 'loss_weights' has shape {tuple(given.shape)}; it "
                         f"weighs the targets, {tuple(weights.shape)} [batch, length].")
    return weights * given


def example_loss_weights(batch: Batch) -> Array:
    """A classifier's weight per example `[batch]`: 0 for a padding row (`inputs` all 0,
    `models.example_weights`), times the batch's `loss_weights` `[batch]` when given."""
    weights = example_weights(batch["inputs"])
    given = batch.get(LOSS_WEIGHTS)
    if given is None:
        return weights
    given = jnp.asarray(given).astype(jnp.float32)
    if given.shape != weights.shape:
        raise ValueError(f"Batch entry 'loss_weights' has shape {tuple(given.shape)}; a "
                         f"classifier's weigh the examples, {tuple(weights.shape)} [batch].")
    return weights * given


def predictions(model: nn.Module, params, batch: Batch, *, deterministic: bool = True,
                dropout_rng: Array | None = None, sown: list | None = None
                ) -> tuple[Array, Array]:
    """`(logits, targets)` the loss compares: `logits_fn`'s and the batch's targets, or, for
    an encoder-only model with `mlm_predictions = k`, the logits `[batch, k, vocab]` of the
    masked-LM head applied only at each row's (at most k) selected positions and the targets
    there (`models.masked_positions`): the same loss, without the head's matmul and softmax
    over every position (BERT's max_predictions_per_seq)."""
    k = _head_positions(model)
    if not k:
        logits = logits_fn(model, params, batch, deterministic=deterministic,
                           dropout_rng=dropout_rng, sown=sown)
        return _check_logits(logits, batch["targets"], k), batch["targets"]
    _check_keys(batch, "encoder_only")
    positions, targets = masked_positions(batch["targets"], k)
    logits = logits_fn(model, params, batch, deterministic=deterministic,
                       dropout_rng=dropout_rng, mlm_positions=positions, sown=sown)
    return _check_logits(logits, targets, k), targets


def _check_logits(logits: Array, targets: Array, k: int) -> Array:
    """Logits `[batch, length, vocab]` that line up with `targets` `[batch, length]` (a model
    of your own may return others; the loss would fail in a broadcast naming neither)."""
    if logits.ndim == targets.ndim + 1 and logits.shape[:-1] == targets.shape:
        return logits
    where = (f"at the mlm_predictions={k} positions a row (the model is called with "
             f"mlm_positions [batch, {k}] and returns its logits there; or set "
             "mlm_predictions=0 for logits at every position)" if k else "at every position")
    raise ValueError(f"The model returned logits of shape {tuple(logits.shape)} for targets "
                     f"{tuple(targets.shape)}: the loss wants [batch, length, vocab] logits "
                     f"{where}.")


def step_rng(state: TrainState, axis_name: str | None = None) -> Array:
    """Dropout key of this step: `fold_in(run key, step)` (and the device index under pmap).

    Under `jit` the key is the same for the whole global batch and XLA's partitionable
    threefry draws the same bits however the batch is sharded; under `pmap` each device
    draws for its own shard, so dropout masks (only those) depend on the device count.
    """
    key = jax.random.fold_in(state.key, state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def uses_dropout(model: nn.Module) -> bool:
    """Whether the train step runs `model` with `deterministic=False` and a "dropout" key:
    the library's models when their config has a dropout rate, a model of your own (or one
    with a `layer_cls` of your own) always: its dropout may be its own."""
    cfg = model.config
    if (type(model).__module__ == "flaxformer_lite.models"
            and getattr(model, "layer_cls", None) is None):
        return cfg.dropout_rate > 0 or cfg.attention_dropout_rate > 0
    return True


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _count(total: Array) -> Array:
    """What a mean divides by: the weights' sum, or 1 where it is 0 (a batch of padding alone,
    whose loss sum is 0 too). Float weights may sum below 1 (a weighted mean keeps its value
    when all weights are scaled), so only 0 is replaced."""
    return jnp.where(total > 0, total, jnp.ones_like(total))


def custom_sums(loss_fn: LossFn, model: nn.Module, params, batch: Batch, *,
                deterministic: bool, dropout_rng: Array | None) -> dict[str, Array]:
    """`loss_fn`'s metric sums for `batch`, checked: a mapping of float32 scalars holding
    `loss` (the sum of the per-example or per-token losses the objective is the mean of) and
    `tokens` (what that mean divides by: the sum of their weights)."""
    sums = loss_fn(model, params, batch, deterministic=deterministic, dropout_rng=dropout_rng)
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    if not isinstance(sums, Mapping) or "loss" not in sums or "tokens" not in sums:
        got = sorted(sums) if isinstance(sums, Mapping) else type(sums).__name__
        raise ValueError(
            f"loss_fn {name} returned {got}; it returns a dict of scalar sums with 'loss' (the "
            "sum of the losses the objective is the mean of) and 'tokens' (the sum of their "
            "weights, which the step divides by), e.g. losses.metric_sums(...).")
    out = {}
    for key, value in sums.items():
        value = jnp.asarray(value)
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"loss_fn {name} returned {key!r} of shape {value.shape} and "
                             f"dtype {value.dtype}; every value is a float scalar (a sum over "
                             "the batch: sums add up over micro-batches, devices and steps).")
        out[key] = value.astype(jnp.float32)
    return out


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation,
               loss_config: losses.LossConfig | None = None,
               learning_rate_fn=None, axis_name: str | None = None, microbatches: int = 1,
               trainable: tuple[bool, ...] | None = None, loss_fn: LossFn | None = None
               ) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step (one micro-batch when accumulating) on `batch`.

    `learning_rate_fn(step)` only feeds the `learning_rate` metric. `axis_name` is the pmap axis
    (None under jit). Returns the new state and metric sums (see `losses.metric_sums`) plus
    `grad_norm` (global L2 norm of this step's gradient, before clipping), `learning_rate`,
    `steps` (= 1) and `nonfinite` (1.0 when the loss or the gradient norm is NaN or infinite).

    Values the model sows into its "losses" collection (`self.sow("losses", name, value)`,
    e.g. a mixture of experts' load-balancing loss times its weight) are summed (every element,
    every layer: `scan_layers` stacks a layer's value on a leading axis) and added to the
    objective, and reported as `aux_loss` (per step, like `grad_norm`); the eval step leaves
    them out. Each device and micro-batch weighs its value by its share of the batch's rows,
    so a value that is a mean over the slice's positions adds up to the whole batch's mean, as
    one device computes it: the update then does not depend on the device count or `k`
    (a value that is not linear in the data, e.g. a squared mean, does).

    `microbatches = k` computes the gradient in `k` slices of the batch, one after another
    inside the step (`lax.scan`), and sums them: the same update (up to float rounding) with
    about 1/k of the activation memory. Slice i holds examples i, i + k, i + 2k, ..., so on a
    mesh each slice stays spread over the batch shards. With dropout, slice i draws its masks
    from `fold_in(step key, i)`.

    `trainable`: one bool per parameter array (in `jax.tree.leaves(params)` order) or None
    (all). Only the trainable arrays are differentiated, so the backward pass skips what only
    frozen ones need (their weight gradients; layers below the lowest trainable one), and
    `grad_norm` is theirs; `tx` gets zeros for the frozen ones (`Engine(trainable=...)` gives
    them `optax.set_to_zero()`, which XLA then leaves uncomputed).

    `loss_fn`: an objective of your own in place of the cross-entropy (DPO, a policy
    gradient, a distillation loss), called as `loss_fn(model, params, batch, *,
    deterministic, dropout_rng)` on each micro-batch and device's slice of the batch (every
    entry, `[rows, ...]`), with `params` the model's (frozen ones as constants). It returns a
    dict of float32 scalar *sums* over the slice: `loss`, the sum of the per-example (or
    per-token) losses, and `tokens`, the sum of their weights (0 for the padding rows
    `Engine.pad_batch` adds; a constant of the batch, not of the parameters), plus any other
    sums to report. Sums, not means, because the slices' sums add up to the whole batch's:
    the step differentiates the slices' `loss`, adds the gradients over micro-batches and
    devices and divides them by the batch's `tokens`, so the update is that of the mean loss
    of the whole batch whatever the slicing (a mean per slice would weigh a slice of padding
    as much as a full one). Metrics: the sums as returned (`losses.summarize` divides `loss`,
    `nll`, `z_loss` and `correct` by `tokens`; other keys stay sums). `label_smoothing`,
    `z_loss` and values the model sows are then the function's to add (`predictions`,
    `target_weights` and `losses.metric_sums` give the built-in objective's sums). Without
    it (None) the step is the built-in one, compiled as before.
    """
    loss_config = loss_config or losses.LossConfig()
    dropout = uses_dropout(model)
    key = step_rng(state, axis_name) if dropout else None
    # The gradient of the global mean: local sums over the global count (a constant).
    classify = classifies(model)
    custom = loss_fn  # a loss_fn's count comes with its sums (divided below)
    if custom is None:
        if classify:  # one weight per example
            weights = example_loss_weights(batch)
        else:
            weights = target_weights(model, batch, loss_targets(model, batch))
        total_tokens = _count(_psum(jnp.sum(weights), axis_name))
        total_rows = _psum(jnp.float32(batch["inputs"].shape[0]), axis_name)  # sown losses'

    def loss_fn(params, batch, key):
        if custom is not None:  # its loss sum; the gradient is divided by the count below
            sums = custom_sums(custom, model, params, batch, deterministic=not dropout,
                               dropout_rng=key)
            return sums["loss"], sums
        sown: list = []
        if classify:
            sums = classification_sums(model, params, batch, loss_config=loss_config,
                                       deterministic=not dropout, dropout_rng=key, sown=sown)
        else:
            logits, targets = predictions(model, params, batch, deterministic=not dropout,
                                          dropout_rng=key, sown=sown)
            sums = losses.metric_sums(logits, targets,
                                      target_weights(model, batch, targets),
                                      label_smoothing=loss_config.label_smoothing,
                                      z_loss=loss_config.z_loss)
        objective = sums["loss"] / total_tokens
        if jax.tree.leaves(sown):  # auxiliary losses the model sowed (a router's balance)
            aux = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(sown))
            # This slice's share of the batch's rows: over devices and micro-batches the
            # shares of a mean add up to the whole batch's mean (the value under plain jit).
            share = aux * (batch["inputs"].shape[0] / total_rows)
            objective = objective + share
            sums = {**sums, "aux_loss": share}
        return objective, sums

    leaves, treedef = jax.tree.flatten(state.params)
    if trainable is not None and len(trainable) != len(leaves):
        raise ValueError(f"trainable holds {len(trainable)} flags for {len(leaves)} parameter "
                         "arrays.")
    if trainable is None:
        grad_fn, wrt = jax.grad(loss_fn, has_aux=True), state.params
    else:  # differentiate the trainable arrays alone; the frozen ones are constants
        def loss_of_trainable(train, batch, key):
            it = iter(train)
            params = treedef.unflatten([next(it) if t else jax.lax.stop_gradient(x)
                                        for x, t in zip(leaves, trainable)])
            return loss_fn(params, batch, key)

        grad_fn = jax.grad(loss_of_trainable, has_aux=True)
        wrt = [x for x, t in zip(leaves, trainable) if t]
    if microbatches == 1:
        grads, sums = grad_fn(wrt, batch, key)
    else:
        slices = split_microbatches(batch, microbatches)

        def accumulate(carry, xs):
            i, micro = xs
            micro_key = None if key is None else jax.random.fold_in(key, i)
            return jax.tree.map(jnp.add, carry, grad_fn(wrt, micro, micro_key)), None

        first = jax.tree.map(lambda x: x[0], slices)
        shapes = jax.eval_shape(grad_fn, wrt, first, key)
        # summed in float32 (bfloat16 parameters' gradients too), rounded once after
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(
            x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
            shapes)
        (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                        (jnp.arange(microbatches), slices))
        grads, sums = jax.tree.map(lambda x, s: x.astype(s.dtype), (grads, sums), shapes)
    grads, sums = _psum((grads, sums), axis_name)
    if custom is not None:  # the gradient of the batch's mean: the sums' over their count
        scale = 1.0 / _count(sums["tokens"])
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    differentiated = grads
    if trainable is not None:
        it = iter(grads)
        grads = treedef.unflatten([next(it) if t else jnp.zeros_like(x)
                                   for x, t in zip(leaves, trainable)])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(sums)
    metrics["grad_norm"] = optax.tree.norm(differentiated)
    metrics["learning_rate"] = (jnp.asarray(learning_rate_fn(state.step), jnp.float32)
                                if learning_rate_fn is not None else jnp.zeros((), jnp.float32))
    metrics["steps"] = jnp.ones((), jnp.float32)
    # An update can overflow where the loss and gradient did not (Adam's 0/0, float16): its
    # parameters must never be saved as the last good state.
    finite = (jnp.isfinite(sums["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & _all_finite(updates))
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def _all_finite(tree) -> Array:
    """Whether every float entry of `tree` is finite (a scalar bool)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def split_microbatches(batch: Batch, microbatches: int) -> dict[str, Array]:
    """`[batch, ...]` arrays -> `[microbatches, batch / microbatches, ...]`, slice i holding
    examples i, i + microbatches, ... (a reshape that keeps each device's rows on it)."""
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches={microbatches!r} must be a positive integer.")
    out = {}
    for name, x in batch.items():
        if x.shape[0] % microbatches:
            raise ValueError(
                f"Batch {name!r} has {x.shape[0]} examples (per device under pmap), not "
                f"divisible by microbatches={microbatches}; make the batch size a multiple "
                "of it.")
        out[name] = jnp.swapaxes(
            x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]), 0, 1)
    return out


def eval_step(state_or_params, batch: Batch, *, model: nn.Module,
              loss_config: losses.LossConfig | None = None,
              axis_name: str | None = None, loss_fn: LossFn | None = None
              ) -> dict[str, Array]:
    """Metric sums on `batch` without dropout (accepts a `TrainState` or bare params); with
    `loss_fn` (see `train_step`), its sums."""
    loss_config = loss_config or losses.LossConfig()
    params = (state_or_params.params if isinstance(state_or_params, TrainState)
              else state_or_params)
    if loss_fn is not None:
        return _psum(custom_sums(loss_fn, model, params, batch, deterministic=True,
                                 dropout_rng=None), axis_name)
    if classifies(model):
        return _psum(classification_sums(model, params, batch, loss_config=loss_config), axis_name)
    logits, targets = predictions(model, params, batch, deterministic=True)
    sums = losses.metric_sums(logits, targets, target_weights(model, batch, targets),
                              label_smoothing=loss_config.label_smoothing,
                              z_loss=loss_config.z_loss)
    return _psum(sums, axis_name)
