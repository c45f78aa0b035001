"""Token cross-entropy with label smoothing, padding weights and z-loss; metrics as sums.

Every metric leaves a step as a *sum* plus the count it should be divided by (`tokens`,
`steps`), never as a mean. Sums add correctly across devices, hosts, micro-batches and logging
windows, and padding (weight 0) contributes nothing; `summarize` turns them into means at the
very end. Means of means would weight a device holding mostly padding as much as a full one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.config import check_number, plain_fields

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the training objective adds to plain cross-entropy.

    label_smoothing: eps of Szegedy et al. (2016): the target distribution is
      `(1 - eps) * one_hot + eps / vocab`. Vaswani et al. (2017) used 0.1.
    z_loss: coefficient of `log(Z)**2` per token (PaLM used 1e-4); it keeps the softmax
      normaliser near 1 so bfloat16 logits do not drift. 0 disables it.
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def __post_init__(self):
        plain_fields(self)
        check_number("LossConfig", "label_smoothing", self.label_smoothing, 0.0, 1.0,
                     high_open=True, hint="; 0.1 is the paper's value")
        check_number("LossConfig", "z_loss", self.z_loss, 0.0, hint=" (0 disables it)")


def cross_entropy(logits: Array, targets: Array, *, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> tuple[Array, Array, Array]:
    """Per-token losses for logits `[..., vocab]` and integer targets `[...]`.

    Returns `(loss, nll, z)`, each shaped like `targets`, in float32:
      nll: `-log p(target)`, the true cross-entropy (perplexity = exp of its mean);
      z: `z_loss * logsumexp(logits)**2`;
      loss: the optimised objective, `-sum_k q_k log p_k + z` with the smoothed target
        distribution `q = (1 - eps) * one_hot(target) + eps / vocab`.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_p_target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    nll = -log_p_target
    loss = nll
    if label_smoothing:
        # -mean_k log p_k = log Z - mean_k logits_k: no [..., vocab] one-hot is materialised.
        uniform = log_z - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    z = z_loss * jnp.square(log_z) if z_loss else jnp.zeros_like(log_z)
    return loss + z, nll, z


def loss_weights(targets: Array, pad_id: int | None = 0,
                 segment_ids: Array | None = None) -> Array:
    """Loss weight per target `[batch, length]`: 1.0 for real tokens, 0.0 for padding
    (`pad_id`, the model's `TransformerConfig.pad_id`). Without a padding id (None) padding is
    where a decoder-only batch's `segment_ids` are 0 (given), else every target counts."""
    if pad_id is None:
        if segment_ids is None:
            return jnp.ones(targets.shape, jnp.float32)
        return (segment_ids != 0).astype(jnp.float32)
    return (targets != pad_id).astype(jnp.float32)


def metric_sums(logits: Array, targets: Array, weights: Array | None = None, *,
                label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict[str, Array]:
    """Weighted sums for one batch: logits `[batch, length, vocab]`, targets `[batch, length]`.

    Keys: `loss` (objective), `nll`, `z_loss`, `correct` (argmax hits), `tokens` (sum of
    weights) and `sequences` (rows with at least one weighted token). All float32 scalars.
    """
    if weights is None:
        weights = loss_weights(targets)
    weights = weights.astype(jnp.float32)
    loss, nll, z = cross_entropy(logits, targets, label_smoothing=label_smoothing,
                                 z_loss=z_loss)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    row_weight = weights.reshape(weights.shape[0], -1).sum(axis=-1)
    return {
        "loss": jnp.sum(loss * weights),
        "nll": jnp.sum(nll * weights),
        "z_loss": jnp.sum(z * weights),
        "correct": jnp.sum(correct * weights),
        "tokens": jnp.sum(weights),
        "sequences": jnp.sum((row_weight > 0).astype(jnp.float32)),
    }


def add_metrics(a: Mapping[str, object], b: Mapping[str, object]) -> dict[str, object]:
    """Sum two metric dicts key by key (keys missing on one side count as 0)."""
    keys = list(a) + [k for k in b if k not in a]
    return {k: a.get(k, 0) + b.get(k, 0) for k in keys}


def summarize(sums: Mapping[str, object]) -> dict[str, float]:
    """Means from metric sums (host side, float64).

    Per token: `loss`, `nll`, `z_loss`, `accuracy` (= correct / tokens), `perplexity`
    (= exp(nll / tokens)). Per step: `grad_norm`, `learning_rate`, `aux_loss` (sown auxiliary
    losses; means over the steps summed). Counts pass through: `tokens`,
    `sequences`, `steps`. Other keys pass through unchanged.
    """
    s = {k: float(np.asarray(v, np.float64)) for k, v in sums.items()}
    out: dict[str, float] = {}
    tokens = s.get("tokens", 0.0)
    steps = s.get("steps", 0.0)
    for key, value in s.items():
        if key in ("loss", "nll", "z_loss"):
            out[key] = value / tokens if tokens else float("nan")
        elif key == "correct":
            out["accuracy"] = value / tokens if tokens else float("nan")
        elif key in ("grad_norm", "learning_rate", "aux_loss"):
            out[key] = value / steps if steps else value
        else:
            out[key] = value
    if "nll" in out:
        out["perplexity"] = math.exp(min(out["nll"], 700.0)) if tokens else float("nan")
    return out
