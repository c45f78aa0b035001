"""Scaled dot-product attention `softmax(q k^T / sqrt(d) + bias) v` on `[batch, length, heads, d]`.

One function covers multi-head, grouped-query and multi-query attention (fewer key/value heads
than query heads: each key/value head serves a group of consecutive query heads), additive
biases (T5 relative positions), boolean masks, dropout on the weights, and returning the weights
for plots. Scores and softmax run in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxformer_lite.ops.fast_paths import enabled

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

    if not use_dropout and not return_weights and _use_cpu_path():
        return _cpu_attention(q, k, v, bias, mask, scale, is_causal)
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


# ---- CPU path ----------------------------------------------------------------------------------
# The same math as above with a hand-written backward pass, used on the CPU backend when there is
# no dropout and no weights to return. Autodiff of the plain formula streams the
# [batch, heads, q, kv] scores through memory a dozen times, two of them as transposes, and
# stores the probabilities for the backward pass. Here (1) every matmul contracts the scores
# along their last axis or as the left operand's rows, so only the small [length, head_dim]
# operands are transposed (optimization barriers stop XLA from folding the output transposes
# back into the matmuls by transposing the scores instead); (2) the backward pass recomputes the
# probabilities from the saved row max and sum, bitwise as in the forward pass, and uses
# rowsum(dP * P) = rowsum(dO * O) (FlashAttention), a reduction over head_dim. (3) Score tensors
# too large to keep around (over _CHUNK_MIN_BYTES) are computed a few batch rows at a time under
# `lax.scan`, forward and backward, which bounds the memory for long sequences.
_CHUNK_BYTES = 32 * 2**20  # float32 scores per chunk
_CHUNK_MIN_BYTES = 256 * 2**20  # below this the whole batch is attended at once


def _use_cpu_path() -> bool:
    return jax.default_backend() == "cpu" and enabled("cpu_attention")


def _batch_chunk(b: int, scores_per_row: int) -> int:
    """Batch rows per chunk: the whole batch when small, else chunks of about _CHUNK_BYTES."""
    if b < 2 or b * scores_per_row * 4 < _CHUNK_MIN_BYTES:
        return b
    size = max(1, min(b // 2, _CHUNK_BYTES // (4 * scores_per_row)))
    while b % size:
        size -= 1
    return size


def _cpu_attention(q, k, v, bias, mask, scale, is_causal):
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk}).")
    g = h // hk
    scale = d ** -0.5 if scale is None else scale
    if is_causal:
        causal = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    bias_shape = None if bias is None else bias.shape
    bias5, mask5 = _to_groups(bias, hk, g), _to_groups(mask, hk, g)
    if mask5 is not None:
        mask5 = mask5.astype(bool)
    chunk = _batch_chunk(b, h * lq * lk)
    out = _attention_core(q.reshape(b, lq, hk, g, d), k, v, bias5, mask5, float(scale), chunk)
    del bias_shape
    return out.reshape(b, lq, h, v.shape[-1])


def _barrier(x):
    # Keeps XLA from folding the transpose that follows into the matmul, which it does by
    # transposing the large scores operand instead.
    return jax.lax.optimization_barrier(x)


def _scores(q, k, bias, mask, scale):
    """Masked float32 scores `[b, hk, g, q, k]` from q `[b, q, hk, g, d]`, k `[b, k, hk, d]`."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    return s


def _forward(q, k, v, bias, mask, scale):
    s = _scores(q, k, bias, mask, scale)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.exp(s - m)
    total = e.sum(-1, keepdims=True)
    p = (e / total).astype(v.dtype)
    o = _barrier(jnp.einsum("bhgqk,bkhd->bhgqd", p, v))
    return o.transpose(0, 3, 1, 2, 4), m, total


def _backward(q, k, v, bias, mask, scale, o, m, total, do):
    s = _scores(q, k, bias, mask, scale)
    p = jnp.exp(s - m) / total
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v, preferred_element_type=jnp.float32)
    rows = jnp.einsum("bqhgd,bqhgd->bhgq", do.astype(jnp.float32), o.astype(jnp.float32))
    ds = p * (dp - rows[..., None])  # gradient of the masked, biased scores
    if mask is not None:
        ds = jnp.where(mask, ds, 0.0)
    dsc = ds * jnp.float32(scale)
    dq = _barrier(jnp.einsum("bhgqk,bkhd->bhgqd", dsc.astype(q.dtype), k))
    # k and v gradients as [b, hk, d, k]: the scores stay the right-hand operand, untransposed.
    dk = _barrier(jnp.einsum("bqhgd,bhgqk->bhdk", q, dsc.astype(q.dtype)))
    dv = _barrier(jnp.einsum("bqhgd,bhgqk->bhdk", do, p.astype(do.dtype)))
    return (dq.transpose(0, 3, 1, 2, 4), dk.transpose(0, 3, 1, 2).astype(k.dtype),
            dv.transpose(0, 3, 1, 2).astype(v.dtype), ds)


def _reduce_to(x, shape):
    """Sum the `[b, hk, g, q, k]` array `x` down to a broadcastable `shape` (a bias's)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axes, keepdims=True).reshape(shape)


def _split(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def _merge(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _batched(x, b):
    return x is not None and x.shape[0] == b and b > 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_core(q, k, v, bias, mask, scale, chunk):
    """Attention output `[b, q, hk, g, d]`; bias/mask broadcastable to `[b, hk, g, q, k]`."""
    return _core_fwd(q, k, v, bias, mask, scale, chunk)[0]


def _core_fwd(q, k, v, bias, mask, scale, chunk):
    b = q.shape[0]
    if chunk == b:
        o, m, total = _forward(q, k, v, bias, mask, scale)
    else:
        n = b // chunk
        bias_b, mask_b = _batched(bias, b), _batched(mask, b)
        xs = (_split(q, n), _split(k, n), _split(v, n), _split(bias, n) if bias_b else None,
              _split(mask, n) if mask_b else None)

        def body(_, xs):
            qc, kc, vc, bc, mc = xs
            return None, _forward(qc, kc, vc, bc if bias_b else bias, mc if mask_b else mask,
                                  scale)

        _, (o, m, total) = jax.lax.scan(body, None, xs)
        o, m, total = _merge(o), _merge(m), _merge(total)
    return o, (q, k, v, bias, mask, o, m, total)


def _core_bwd(scale, chunk, res, do):
    q, k, v, bias, mask, o, m, total = res
    b = q.shape[0]
    if chunk == b:
        dq, dk, dv, ds = _backward(q, k, v, bias, mask, scale, o, m, total, do)
        dbias = None if bias is None else _reduce_to(ds, bias.shape).astype(bias.dtype)
    else:
        n = b // chunk
        bias_b, mask_b = _batched(bias, b), _batched(mask, b)
        xs = tuple(_split(x, n) for x in (q, k, v, o, m, total, do)) + (
            _split(bias, n) if bias_b else None, _split(mask, n) if mask_b else None)
        shared = bias is not None and not bias_b

        def body(acc, xs):
            qc, kc, vc, oc, mc_, tc, doc, bc, mc = xs
            bc = bc if bias_b else bias
            dq, dk, dv, ds = _backward(qc, kc, vc, bc, mc if mask_b else mask, scale, oc, mc_,
                                       tc, doc)
            db = None
            if bias_b:
                db = _reduce_to(ds, bc.shape)
            elif shared:
                acc = acc + _reduce_to(ds, bias.shape)
            return acc, (dq, dk, dv, db)

        acc0 = jnp.zeros(bias.shape, jnp.float32) if shared else None
        acc, (dq, dk, dv, db) = jax.lax.scan(body, acc0, xs)
        dq, dk, dv = _merge(dq), _merge(dk), _merge(dv)
        dbias = None if bias is None else (acc if shared else _merge(db)).astype(bias.dtype)
    return dq, dk, dv, dbias, None


_attention_core.defvjp(_core_fwd, _core_bwd)
