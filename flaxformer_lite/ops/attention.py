"""Scaled dot-product attention `softmax(q k^T / sqrt(d) + bias) v` on `[batch, length, heads, d]`.

One function covers multi-head, grouped-query and multi-query attention (fewer key/value heads
than query heads: each key/value head serves a group of consecutive query heads), additive
biases (T5 relative positions), boolean masks, dropout on the weights, and returning the weights
for plots. Scores and softmax run in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray

IMPLEMENTATIONS = ("ops", "xla", "cudnn")


def _to_groups(x: Array | None, kv_heads: int, groups: int) -> Array | None:
    """Reshape a `[b|1, heads|1, q, k]` mask/bias to `[b|1, kv_heads|1, groups|1, q, k]`."""
    if x is None:
        return None
    while x.ndim < 4:
        x = x[None]
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])


def attention_weights(
    q: Array,
    k: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> Array:
    """Softmax attention weights `[batch, heads, q_length, kv_length]` in float32.

    q: `[batch, q_length, heads, head_dim]`; k: `[batch, kv_length, kv_heads, head_dim]` with
    `heads % kv_heads == 0`. `bias` (added) and `mask` (True = attend) broadcast to
    `[batch, heads, q_length, kv_length]`. A query whose keys are all masked gets uniform weights.
    """
    b, lq, h, d = q.shape
    hk = k.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk}).")
    g = h // hk
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, lq, hk, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias is not None:
        logits = logits + _to_groups(bias, hk, g).astype(jnp.float32)
    if is_causal:
        lk = k.shape[1]
        causal = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(_to_groups(mask, hk, g), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return weights.reshape(b, h, lq, -1)


def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    implementation: str = "ops",
) -> Array | tuple[Array, Array]:
    """Attention output `[batch, q_length, heads, head_dim]` (and weights if `return_weights`).

    Args:
      q: queries `[batch, q_length, heads, head_dim]`.
      k, v: keys and values `[batch, kv_length, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      bias: additive scores, broadcastable to `[batch, heads, q_length, kv_length]`.
      mask: booleans, True = may attend, broadcastable like `bias`.
      scale: score scale, default `head_dim ** -0.5` (T5 passes 1.0).
      is_causal: add a causal mask (queries are the last `q_length` of the keys' positions).
      dropout_rate, dropout_rng: dropout on the weights; active when both are given.
      return_weights: also return the float32 weights `[batch, heads, q_length, kv_length]`.
      implementation: "ops" (this module, float32 softmax, dropout, weights), or "xla" / "cudnn"
        to delegate to `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be [batch, length, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    if implementation != "ops":
        if use_dropout or return_weights:
            raise ValueError(f"implementation={implementation!r} supports neither attention "
                             "dropout nor returning weights; use implementation='ops'.")
        return _delegate(q, k, v, bias, mask, scale, is_causal, implementation)

    weights = attention_weights(q, k, bias=bias, mask=mask, scale=scale, is_causal=is_causal)
    probs = weights
    if use_dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    b, lq, h, d = q.shape
    hk = k.shape[2]
    probs = probs.reshape(b, hk, h // hk, lq, -1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, h, v.shape[-1])
    return (out, weights) if return_weights else out


def _delegate(q, k, v, bias, mask, scale, is_causal, implementation):
    def four_d(x):
        if x is None:
            return None
        while x.ndim < 4:
            x = x[None]
        return x

    bias, mask = four_d(bias), four_d(mask)
    if bias is not None:
        bias = bias.astype(q.dtype)
    if is_causal and q.shape[1] != k.shape[1]:
        # jax's is_causal aligns queries to the first keys; "ops" aligns them to the last.
        lq, lk = q.shape[1], k.shape[1]
        causal = (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq))[None, None]
        mask = causal if mask is None else mask & causal
        is_causal = False
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        implementation=implementation)
