"""Scaled dot-product attention `softmax(q k^T / sqrt(d) + bias) v` on `[batch, length, heads, d]`.

One function covers multi-head, grouped-query and multi-query attention (fewer key/value heads
than query heads: each key/value head serves a group of consecutive query heads), additive
biases (T5 relative positions), boolean masks, dropout on the weights, and returning the weights
for plots. Scores and softmax run in float32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers

import jax
import jax.numpy as jnp

from flaxformer_lite.ops.fast_paths import enabled
from flaxformer_lite.ops.masks import causal_mask

Array = jnp.ndarray

IMPLEMENTATIONS = ("ops", "xla", "cudnn")

# The platform whose attention path is traced, or None: both, chosen when lowering.
_TRACE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flaxformer_lite_trace_platform", default=None)


@contextlib.contextmanager
def traced_platform(platform: str | None):
    """Within it, attention traces only the path `platform` ("cpu", "gpu", "tpu", ...) runs,
    instead of staging out every platform's path (`jax.lax.platform_dependent`) for lowering
    to choose: a jaxpr then holds one program (`params.activation_memory` reads its
    residuals, where a staged choice would hold both paths' residuals). None: as outside."""
    token = _TRACE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TRACE_PLATFORM.reset(token)



def _to_groups(x: Array | None, kv_heads: int, groups: int) -> Array | None:
    """Reshape a `[b|1, heads|1, q, k]` mask/bias to `[b|1, kv_heads|1, groups|1, q, k]`."""
    if x is None:
        return None
    while x.ndim < 4:
        x = x[None]
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])


def _groups_and_scale(heads: int, kv_heads: int, head_dim: int, scale: float | None):
    """Query heads per key/value head, and the score scale (default `head_dim ** -0.5`)."""
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads "
                         f"({kv_heads}).")
    return heads // kv_heads, head_dim ** -0.5 if scale is None else scale


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
    _check_ranks(q=q, k=k)
    _check_operands(q, k, k, bias, mask)
    b, lq, h, d = q.shape
    hk = k.shape[2]
    g, scale = _groups_and_scale(h, hk, d, scale)
    qg = q.reshape(b, lq, hk, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias is not None:
        logits = logits + _to_groups(bias, hk, g).astype(jnp.float32)
    if is_causal:
        mask = _and_causal(mask, lq, k.shape[1])
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

    A query whose keys are all masked (a padding row) gets an output no loss should read, and
    it depends on the implementation: "ops" averages the values over all keys (over the keys of
    its block in the CPU path's causal blocks).

    Args:
      q: queries `[batch, q_length, heads, head_dim]`.
      k, v: keys and values `[batch, kv_length, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      bias: additive scores, broadcastable to `[batch, heads, q_length, kv_length]`.
      mask: booleans, True = may attend, broadcastable like `bias`.
      scale: score scale, default `head_dim ** -0.5` (T5 passes 1.0).
      is_causal: add a causal mask with the queries as the *last* `q_length` of the keys'
        positions, i.e. `causal_mask(q_length, kv_length, offset=kv_length - q_length)`
        (`causal_mask` without an offset puts them first; the two agree when the lengths do).
        Prefer it to a causal `mask`: on the CPU path causal attention then runs in blocks of
        queries and never computes the scores above the diagonal.
      dropout_rate, dropout_rng: dropout on the weights; active when both are given (a traced
        rate, e.g. a jit argument, counts as given).
      return_weights: also return the float32 weights `[batch, heads, q_length, kv_length]`.
      implementation: "ops" (this module, float32 softmax, dropout, weights), or "xla" / "cudnn"
        to delegate to `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    _check_ranks(q=q, k=k, v=v)
    _check_operands(q, k, v, bias, mask)
    if isinstance(dropout_rate, numbers.Real) and not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must lie in [0, 1).")
    # A traced rate (a jit argument of a sweep) cannot be compared: dropout is on with a key.
    use_dropout = dropout_rng is not None and (
        not isinstance(dropout_rate, numbers.Real) or dropout_rate > 0.0)
    if implementation != "ops":
        if use_dropout or return_weights:
            raise ValueError(f"implementation={implementation!r} supports neither attention "
                             "dropout nor returning weights; use implementation='ops'.")
        return _delegate(q, k, v, bias, mask, scale, is_causal, implementation)

    if (not use_dropout and not return_weights and _use_cpu_path(q, k)
            and (scale is None or isinstance(scale, numbers.Real))):  # compiled-in scale
        # Chosen by the platform the program is lowered for, not the one JAX runs on: a
        # `jax.export` for GPUs from a CPU host takes the plain path.
        cpu = lambda q, k, v, bias, mask: _cpu_attention(q, k, v, bias, mask, scale,  # noqa: E731
                                                         is_causal)
        default = lambda q, k, v, bias, mask: _plain_attention(  # noqa: E731
            q, k, v, bias, mask, scale, is_causal)
        platform = _TRACE_PLATFORM.get()
        if platform is not None:
            return (cpu if platform == "cpu" else default)(q, k, v, bias, mask)
        return jax.lax.platform_dependent(q, k, v, bias, mask, cpu=cpu, default=default)
    return _plain_attention(q, k, v, bias, mask, scale, is_causal, dropout_rate,
                            dropout_rng if use_dropout else None, return_weights)


def _plain_attention(q, k, v, bias, mask, scale, is_causal, dropout_rate=0.0, dropout_rng=None,
                     return_weights=False):
    use_dropout = dropout_rng is not None
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


def _check_ranks(**arrays: Array) -> None:
    shapes = {name: jnp.shape(x) for name, x in arrays.items()}
    if any(len(shape) != 4 for shape in shapes.values()):
        raise ValueError(f"{', '.join(shapes)} must be [batch, length, heads, head_dim]; got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()) + ".")


def _check_mask_dtype(mask: Array | None) -> None:
    if mask is not None and jnp.issubdtype(jnp.result_type(mask), jnp.floating):
        raise ValueError(
            f"mask is {jnp.result_type(mask)}; it must be boolean (True = may attend) or 0/1 "
            "integers. Pass an additive mask as `bias=` with a large finite negative value "
            "(jnp.finfo(jnp.float32).min or -1e9), not -inf: a row of -inf gives NaN "
            "gradients.")


def _check_operands(q, k, v, bias, mask) -> None:
    """Shape and mask-type errors that name the argument, raised while tracing: every path
    (the CPU one would otherwise slice a longer `v` or mask down without a word)."""
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            "q, k, v: the batch sizes must agree and k, v must share [kv_length, kv_heads]; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim; got q {q.shape}, k {k.shape}.")
    if q.shape[1] == 0:
        raise ValueError(f"q has no queries (shape {q.shape}); q_length must be at least 1.")
    _check_bias_mask(bias, mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))


def _check_bias_mask(bias, mask, full: tuple[int, int, int, int]) -> None:
    for name, x in (("mask", mask), ("bias", bias)):
        if x is None:
            continue
        try:
            ok = jnp.broadcast_shapes(jnp.shape(x), full) == full
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {jnp.shape(x)} does not broadcast to [batch, "
                             f"heads, q_length, kv_length] = {full}.")
    _check_mask_dtype(mask)


def _delegate(q, k, v, bias, mask, scale, is_causal, implementation):
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation='cudnn' (TransformerConfig.attention_implementation) needs an "
            f"NVIDIA GPU, but JAX runs on {jax.default_backend()}; use 'ops' or 'xla' here.")

    def four_d(x):
        if x is None:
            return None
        while x.ndim < 4:
            x = x[None]
        return x

    bias, mask = four_d(bias), four_d(mask)
    if bias is not None and bias.dtype != q.dtype:
        # finfo(float32).min, the advised mask value, would round to -inf in bfloat16/float16
        # (NaN outputs and gradients on masked rows): clip into q's range first.
        info = jnp.finfo(q.dtype)
        bias = jnp.clip(bias, info.min, info.max).astype(q.dtype)
    if mask is not None:
        mask = mask.astype(bool)  # "ops" takes any 0/1 mask; jax's wants booleans
    if is_causal and q.shape[1] != k.shape[1]:
        # jax's is_causal aligns queries to the first keys; "ops" aligns them to the last.
        mask = _and_causal(mask, q.shape[1], k.shape[1])
        is_causal = False
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        implementation=implementation)


def cached_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    k_new: Array,
    v_new: Array,
    index: Array | int,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> Array:
    """Attention of new tokens over a KV cache *before* their keys and values are written to it.

    The result equals `scaled_dot_product_attention(q, k, v, bias=bias, mask=mask)` with the new
    keys/values written at `index` (a query that may attend nothing gets another, equally
    meaningless, average): the scores of the old cache and of the new keys are normalised
    together. Why: inside a decoding loop the cache is a loop-carried
    buffer, and the caller can then write the new keys into it *after* this read (make the write
    depend on the result, as `layers.MultiHeadAttention` does), so XLA updates it in place. Read
    after the write instead, XLA:CPU copied each batch-1 cache four times per token.

    q: `[batch, new, heads, head_dim]`; k_cache, v_cache: `[batch, kv_heads, cache, head_dim]`
    (head-major: the layer's cache layout), valid at slots `< index`; k_new, v_new:
    `[batch, new, kv_heads, head_dim]`, to be written at slots `index .. index + new - 1`.
    bias, mask: broadcastable to `[batch, heads, new, cache]` over the *written* cache (slots
    `>= index + new` are ignored); without a mask the new tokens attend causally among
    themselves. `causal=True` says the mask is causal among them (as a decoder's is): a prompt
    written into an empty cache then attends in causal query blocks. Returns
    `[batch, new, heads, head_dim]` in q's dtype; scores in float32.
    """
    _check_ranks(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, lq, h, d = q.shape
    length = k_cache.shape[2]
    _check_bias_mask(bias, mask, (b, h, lq, length))
    if not isinstance(index, jax.core.Tracer):  # concrete: a slice past the end would clamp
        if not 0 <= int(index) <= length - lq:
            raise ValueError(f"cached_attention: {lq} new token(s) at index {int(index)} do not "
                             f"fit a cache of {length} slots.")
    if lq == 1:
        return _attend_cache(q, k_cache, v_cache, k_new, v_new, index, bias, mask, scale)
    # Several new tokens (a prompt): into an empty cache (index 0, the prefill) they attend
    # to their own keys alone, in the main function's causal query blocks when the mask is
    # causal (or absent) and under the mask alone otherwise. Scoring them
    # against every empty slot as well took 1.8-2.7x a forward pass's memory, and XLA folded
    # the all-masked scores of a fresh (constant) cache while compiling: minutes at a
    # 2048-token prompt.
    def fresh():
        return scaled_dot_product_attention(q, k_new, v_new, bias=_new_slots(bias, 0, lq),
                                            mask=_new_slots(mask, 0, lq), scale=scale,
                                            is_causal=causal or mask is None)

    def written():
        return _attend_cache(q, k_cache, v_cache, k_new, v_new, index, bias, mask, scale)

    if not isinstance(index, jax.core.Tracer):
        return fresh() if int(index) == 0 else written()
    return jax.lax.cond(index == 0, fresh, written)


def _attend_cache(q, k_cache, v_cache, k_new, v_new, index, bias, mask, scale):
    """`cached_attention`'s scores over the old cache and the new keys, normalised together."""
    b, lq, h, d = q.shape
    hk, length = k_cache.shape[1], k_cache.shape[2]
    g, scale = _groups_and_scale(h, hk, d, scale)
    out_dtype = q.dtype
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for some of these grouped dots
        # ("Unsupported element type for DotThunk"): compute in float32 there.
        q, k_cache, v_cache, k_new, v_new = (
            x.astype(jnp.float32) for x in (q, k_cache, v_cache, k_new, v_new))
    qg = q.reshape(b, lq, hk, g, d)
    s_old = jnp.einsum("bqhgd,bhkd->bhgqk", qg, k_cache, preferred_element_type=jnp.float32)
    s_new = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k_new, preferred_element_type=jnp.float32)
    s_old, s_new = s_old * jnp.float32(scale), s_new * jnp.float32(scale)
    if bias is not None:
        bias5 = _to_groups(bias, hk, g).astype(jnp.float32)
        s_old = s_old + bias5
        s_new = s_new + _new_slots(bias5, index, lq)
    old_ok = (jnp.arange(length) < index)[None, None, None, None, :]
    new_ok = jnp.tril(jnp.ones((lq, lq), bool))
    if mask is not None:
        mask5 = _to_groups(mask, hk, g).astype(bool)
        old_ok = old_ok & mask5
        new_ok = _new_slots(mask5, index, lq)
    low = jnp.finfo(jnp.float32).min
    s_old, s_new = jnp.where(old_ok, s_old, low), jnp.where(new_ok, s_new, low)
    top = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
    total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)  # [b, hk, g, q, 1]
    out = jnp.einsum("bhgqk,bhkd->bqhgd", p_old.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bhgqk,bkhd->bqhgd", p_new.astype(v_new.dtype), v_new,
                           preferred_element_type=jnp.float32)
    out = out / total.transpose(0, 3, 1, 2, 4)
    return out.reshape(b, lq, h, v_cache.shape[-1]).astype(out_dtype)


def read_cache_before_write(implementation: str) -> bool:
    """Whether a decoding step should attend with `cached_attention` and write its keys and
    values afterwards: the "ops" implementation on the CPU backend, where it was measured
    (fast path `cached_attention`)."""
    return (implementation == "ops" and jax.default_backend() == "cpu"
            and enabled("cached_attention"))


def _new_slots(x: Array | None, index, n: int) -> Array | None:
    """Key slots `index .. index + n - 1` (the last axis) of a bias/mask (None, or a key axis
    of size 1, stays)."""
    if x is None or x.shape[-1] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, index, n, axis=x.ndim - 1)


# ---- CPU path ----------------------------------------------------------------------------------
# The same math as above with a hand-written backward pass, used on the CPU backend when there is
# no dropout and no weights to return. Autodiff of the plain formula streams the
# [batch, heads, q, kv] scores through memory a dozen times, two of them as transposes, and
# stores the probabilities for the backward pass. Here (1) every matmul contracts the scores
# along their last axis or as the left operand's rows, so only the small [length, head_dim]
# operands are transposed (optimization barriers stop XLA from folding the output transposes
# back into the matmuls by transposing the scores instead); (2) the backward pass recomputes the
# probabilities from the saved row max and sum, bitwise as in the forward pass, and uses
# rowsum(dP * P) = rowsum(dO * O) (FlashAttention), a reduction over head_dim; (3) causal
# attention runs in blocks of queries, each against only the keys up to its last query, so the
# score blocks above the diagonal (all masked) are never computed: about half the matmul work
# and memory traffic at long lengths; (4) the row max is a compare-and-select reduction, which
# XLA:CPU vectorises (its NaN-propagating max is ~2x slower; a NaN score still makes its row
# NaN through the exponentials). (5) Score tensors too large to keep around (over
# _CHUNK_MIN_BYTES) are computed a few batch rows at a time under `lax.scan`, forward and
# backward, which bounds the memory of long sequences in batches; when the batch is not split
# (one row, or rows that fit), bidirectional scores that large are computed a chunk of
# queries at a time under `lax.scan` instead (causal ones already run in query blocks).
_CHUNK_BYTES = 32 * 2**20  # float32 scores per chunk
_CHUNK_MIN_BYTES = 256 * 2**20  # below this the whole batch is attended at once


def _use_cpu_path(q, k) -> bool:
    """Whether the CPU path may be taken (where the program runs on a CPU): its blocks and
    chunks are sized from the shapes, so symbolic ones (`jax.export` with a polymorphic batch
    or length) take the plain path."""
    concrete = all(isinstance(d, int) for d in (*q.shape, *k.shape))
    return concrete and enabled("cpu_attention")


def _and_causal(mask, lq, lk):
    """`mask` (or None) and the causal mask, with the `lq` queries at the last key positions."""
    tri = causal_mask(lq, lk, offset=lk - lq)
    return tri if mask is None else jnp.logical_and(mask, tri)


def _batch_chunk(b: int, scores_per_row: int) -> int:
    """Batch rows per chunk: the whole batch when small, else chunks of about _CHUNK_BYTES."""
    if b < 2 or b * scores_per_row * 4 < _CHUNK_MIN_BYTES:
        return b
    size = max(1, min(b // 2, _CHUNK_BYTES // (4 * scores_per_row)))
    while b % size:
        size -= 1
    return size


def _query_chunk(h: int, lq: int, lk: int, causal: bool, chunk: int) -> int:
    """Queries per scanned chunk of bidirectional attention: all of them unless the scores of
    one batch chunk (`chunk` rows) pass _CHUNK_MIN_BYTES, else chunks of about _CHUNK_BYTES
    (at least 64 queries; a last, shorter chunk takes the remainder)."""
    if causal or chunk * h * lq * lk * 4 < _CHUNK_MIN_BYTES:
        return lq
    return min(lq, max(64, _CHUNK_BYTES // (4 * chunk * h * lk)))


def _query_block(lq: int) -> int:
    """Queries per block of causal attention (measured on a 2-core x86 CPU, forward + backward:
    32 best up to 128 queries, 64 up to 1024, then a sixteenth of the length)."""
    return 32 if lq <= 128 else max(64, lq // 16)


def _cpu_attention(q, k, v, bias, mask, scale, is_causal):
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    g, scale = _groups_and_scale(h, hk, d, scale)
    # Blocks need every query to see a key of its own block; with more queries than keys the
    # causal mask goes in whole.
    causal = is_causal and lq <= lk
    if is_causal and not causal:
        mask = _and_causal(mask, lq, lk)
    bias5, mask5 = _to_groups(bias, hk, g), _to_groups(mask, hk, g)
    if mask5 is not None:
        mask5 = mask5.astype(bool)
    block = _query_block(lq) if causal else lq
    chunk = _batch_chunk(b, h * lq * lk)
    qchunk = _query_chunk(h, lq, lk, causal, chunk)
    out = _attention_core(q.reshape(b, lq, hk, g, d), k, v, bias5, mask5, float(scale), chunk,
                          causal, block, qchunk)
    return out.reshape(b, lq, h, v.shape[-1])


def _barrier(x):
    # Keeps XLA from folding the transpose that follows into the matmul, which it does by
    # transposing the large scores operand instead.
    return jax.lax.optimization_barrier(x)


def _row_max(s):
    """Max over the last axis, keepdims, as a select reduction (see (4) above)."""
    m = jax.lax.reduce(s, jnp.array(-jnp.inf, s.dtype), lambda a, c: jnp.where(a > c, a, c),
                       (s.ndim - 1,))
    return m[..., None]


def _blocks(lq, lk, causal, block):
    """`(lo, hi, keys)`: queries `[lo, hi)` attend keys `[0, keys)`; queries are the last `lq`
    of the keys' positions, as in `scaled_dot_product_attention`."""
    if not causal:
        return [(0, lq, lk)]
    return [(lo, min(lo + block, lq), min(lk, min(lo + block, lq) + lk - lq))
            for lo in range(0, lq, block)]


def _block_of(x, lo, hi, keys):
    """Rows `[lo, hi)` and keys `[0, keys)` of a mask or bias broadcastable to
    `[b, hk, g, q, k]` (axes of size 1 stay whole)."""
    if x is None:
        return None
    rows = slice(lo, hi) if x.shape[3] != 1 else slice(None)
    cols = slice(0, keys) if x.shape[4] != 1 else slice(None)
    return x[:, :, :, rows, cols]


def _block_mask(mask, lo, hi, keys, causal, offset):
    m = _block_of(mask, lo, hi, keys)
    if causal and keys - 1 > lo + offset:  # the block's first query does not see all its keys
        tri = causal_mask(hi - lo, keys, offset=lo + offset)[None]
        m = tri if m is None else jnp.logical_and(m, tri)
    return m


def _scores(q, k, bias, mask, scale):
    """Masked float32 scores `[b, hk, g, q, k]` from q `[b, q, hk, g, d]`, k `[b, k, hk, d]`."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    s = s * jnp.float32(scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    return s


def _forward(q, k, v, bias, mask, scale, causal, block):
    """Output `[b, q, hk, g, d]`, row max and row sum `[b, hk, g, q, 1]`, block by block."""
    lq, lk = q.shape[1], k.shape[1]
    outs, ms, totals = [], [], []
    for lo, hi, keys in _blocks(lq, lk, causal, block):
        s = _scores(q[:, lo:hi], k[:, :keys], _block_of(bias, lo, hi, keys),
                    _block_mask(mask, lo, hi, keys, causal, lk - lq), scale)
        m = jax.lax.stop_gradient(_row_max(s))
        e = jnp.exp(s - m)
        total = e.sum(-1, keepdims=True)
        p = (e / total).astype(v.dtype)
        outs.append(_barrier(jnp.einsum("bhgqk,bkhd->bhgqd", p, v[:, :keys])))
        ms.append(m)
        totals.append(total)
    o, m, total = (x[0] if len(x) == 1 else jnp.concatenate(x, 3) for x in (outs, ms, totals))
    return o.transpose(0, 3, 1, 2, 4), m, total


def _backward(q, k, v, bias, mask, scale, causal, block, o, m, total, do, f32=False):
    """dq `[b, q, hk, g, d]`, dk and dv `[b, k, hk, d]` (in float32 if `f32`, to be summed
    over query chunks), and the bias gradient (if a bias)."""
    lq, lk = q.shape[1], k.shape[1]
    rows = jnp.einsum("bqhgd,bqhgd->bhgq", do.astype(jnp.float32), o.astype(jnp.float32))
    dqs, dks, dvs, dbs = [], [], [], []
    for lo, hi, keys in _blocks(lq, lk, causal, block):
        qb, kb, vb, dob = q[:, lo:hi], k[:, :keys], v[:, :keys], do[:, lo:hi]
        bmask = _block_mask(mask, lo, hi, keys, causal, lk - lq)
        s = _scores(qb, kb, _block_of(bias, lo, hi, keys), bmask, scale)
        p = jnp.exp(s - m[..., lo:hi, :]) / total[..., lo:hi, :]
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - rows[..., lo:hi, None])  # gradient of the masked, biased scores
        if bmask is not None:
            ds = jnp.where(bmask, ds, 0.0)
        dsc = ds * jnp.float32(scale)
        dqs.append(_barrier(jnp.einsum("bhgqk,bkhd->bhgqd", dsc.astype(q.dtype), kb)))
        # k and v gradients as [b, hk, d, k]: the scores stay the right-hand operand,
        # untransposed; blocks that see fewer keys are padded with zeros and summed, in
        # float32 (summed in bfloat16, 16 blocks made dk/dv 4-5x less accurate than autodiff).
        pad = ((0, 0), (0, 0), (0, 0), (0, lk - keys))
        dks.append(jnp.pad(_barrier(jnp.einsum("bqhgd,bhgqk->bhdk", qb, dsc.astype(q.dtype),
                                               preferred_element_type=jnp.float32)), pad))
        dvs.append(jnp.pad(_barrier(jnp.einsum("bqhgd,bhgqk->bhdk", dob, p.astype(do.dtype),
                                               preferred_element_type=jnp.float32)), pad))
        if bias is not None:
            dbs.append(_bias_block_grad(ds, bias.shape, lk, keys))
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, 3)
    dk, dv = functools.reduce(jnp.add, dks), functools.reduce(jnp.add, dvs)
    dbias = None
    if bias is not None:
        dbias = (functools.reduce(jnp.add, dbs) if bias.shape[3] == 1 or len(dbs) == 1
                 else jnp.concatenate(dbs, 3))
    dq, dk, dv = dq.transpose(0, 3, 1, 2, 4), dk.transpose(0, 3, 1, 2), dv.transpose(0, 3, 1, 2)
    if not f32:  # each gradient in its input's dtype (q's promoted to k's in the einsum)
        dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    return dq, dk, dv, dbias


def _bias_block_grad(ds, bias_shape, lk, keys):
    """One block's `ds` `[b, hk, g, rows, keys]` summed to the bias's broadcast axes, its key
    axis padded to `lk` (masked-out keys get no gradient)."""
    shape = (*bias_shape[:3], ds.shape[3] if bias_shape[3] != 1 else 1,
             keys if bias_shape[4] != 1 else 1)
    r = _reduce_to(ds, shape)
    if bias_shape[4] != 1 and keys < lk:
        r = jnp.pad(r, ((0, 0),) * 4 + ((0, lk - keys),))
    return r


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


def _chunk(x, i, qc, axis):
    """Chunk i (`qc` rows from `i * qc`) of `x` along `axis`; a size-1 axis (a bias or mask
    shared across queries) and None stay as they are. Dynamic slices read the chunk in place:
    reshaping a [1, heads, q, k] bias into chunks copied it whole."""
    if x is None or x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, i * qc, qc, axis=axis)


def _forward_query_chunks(q, k, v, bias, mask, scale, qc):
    """`_forward` of bidirectional attention, `qc` queries at a time under `lax.scan` (the
    remainder in one last call): the scores of one chunk live at a time."""
    b, lq = q.shape[:2]
    n = lq // qc

    def body(_, i):
        return None, _forward(_chunk(q, i, qc, 1), k, v, _chunk(bias, i, qc, 3),
                              _chunk(mask, i, qc, 3), scale, False, qc)

    _, (o, m, total) = jax.lax.scan(body, None, jnp.arange(n))
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * qc, *o.shape[3:])
    m, total = (jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], n * qc, 1) for x in (m, total))
    if n * qc < lq:
        lo, lk = n * qc, k.shape[1]
        rest = _forward(q[:, lo:], k, v, _block_of(bias, lo, lq, lk),
                        _block_of(mask, lo, lq, lk), scale, False, lq - lo)
        o = jnp.concatenate([o, rest[0]], 1)
        m, total = (jnp.concatenate([x, y], 3) for x, y in ((m, rest[1]), (total, rest[2])))
    return o, m, total


def _backward_query_chunks(q, k, v, bias, mask, scale, qc, o, m, total, do):
    """`_backward` of `_forward_query_chunks`: dq chunk by chunk, dk, dv (and a bias shared
    across queries) summed over the chunks in float32, a per-query bias's gradient written
    chunk by chunk into its buffer."""
    b, lq = q.shape[:2]
    n = lq // qc
    shared = bias is not None and bias.shape[3] == 1
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    acc0 = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), dbias0)

    def body(acc, i):
        dq, dk, dv, db = _backward(
            _chunk(q, i, qc, 1), k, v, _chunk(bias, i, qc, 3), _chunk(mask, i, qc, 3), scale,
            False, qc, _chunk(o, i, qc, 1), _chunk(m, i, qc, 3), _chunk(total, i, qc, 3),
            _chunk(do, i, qc, 1), f32=True)
        dk_acc, dv_acc, db_acc = acc
        if shared:
            db_acc = db_acc + db
        elif bias is not None:
            db_acc = jax.lax.dynamic_update_slice_in_dim(db_acc, db.astype(jnp.float32),
                                                         i * qc, axis=3)
        return (dk_acc + dk, dv_acc + dv, db_acc), dq

    (dk, dv, dbias), dq = jax.lax.scan(body, acc0, jnp.arange(n))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, n * qc, *dq.shape[3:])
    if n * qc < lq:
        lo = n * qc
        lk = k.shape[1]
        rest = _backward(q[:, lo:], k, v, _block_of(bias, lo, lq, lk), _block_of(mask, lo, lq, lk),
                         scale, False, lq - lo, o[:, lo:], m[:, :, :, lo:], total[:, :, :, lo:],
                         do[:, lo:], f32=True)
        dq = jnp.concatenate([dq, rest[0]], 1)
        dk, dv = dk + rest[1], dv + rest[2]
        if shared:
            dbias = dbias + rest[3]
        elif bias is not None:
            dbias = dbias.at[:, :, :, lo:].set(rest[3].astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention_core(q, k, v, bias, mask, scale, chunk, causal, block, qchunk):
    """Attention output `[b, q, hk, g, d]`; bias/mask broadcastable to `[b, hk, g, q, k]`."""
    return _core_fwd(q, k, v, bias, mask, scale, chunk, causal, block, qchunk)[0]


def _core_fwd(q, k, v, bias, mask, scale, chunk, causal, block, qchunk):
    b, lq = q.shape[:2]

    def forward(q, k, v, bias, mask):
        if qchunk < lq:
            return _forward_query_chunks(q, k, v, bias, mask, scale, qchunk)
        return _forward(q, k, v, bias, mask, scale, causal, block)

    if chunk == b:
        o, m, total = forward(q, k, v, bias, mask)
    else:
        n = b // chunk
        bias_b, mask_b = _batched(bias, b), _batched(mask, b)
        xs = (_split(q, n), _split(k, n), _split(v, n), _split(bias, n) if bias_b else None,
              _split(mask, n) if mask_b else None)

        def body(_, xs):
            qc, kc, vc, bc, mc = xs
            return None, forward(qc, kc, vc, bc if bias_b else bias, mc if mask_b else mask)

        _, (o, m, total) = jax.lax.scan(body, None, xs)
        o, m, total = _merge(o), _merge(m), _merge(total)
    return o, (q, k, v, bias, mask, o, m, total)


def _core_bwd(scale, chunk, causal, block, qchunk, res, do):
    q, k, v, bias, mask, o, m, total = res
    b, lq = q.shape[:2]

    def backward(q, k, v, bias, mask, o, m, total, do):
        if qchunk < lq:
            return _backward_query_chunks(q, k, v, bias, mask, scale, qchunk, o, m, total, do)
        return _backward(q, k, v, bias, mask, scale, causal, block, o, m, total, do)

    if chunk == b:
        dq, dk, dv, dbias = backward(q, k, v, bias, mask, o, m, total, do)
        dbias = None if bias is None else dbias.astype(bias.dtype)
    else:
        n = b // chunk
        bias_b, mask_b = _batched(bias, b), _batched(mask, b)
        xs = tuple(_split(x, n) for x in (q, k, v, o, m, total, do)) + (
            _split(bias, n) if bias_b else None, _split(mask, n) if mask_b else None)
        shared = bias is not None and not bias_b

        def body(acc, xs):
            qc, kc, vc, oc, mc_, tc, doc, bc, mc = xs
            bc = bc if bias_b else bias
            dq, dk, dv, db = backward(qc, kc, vc, bc, mc if mask_b else mask, oc, mc_, tc, doc)
            if shared:
                acc, db = acc + db, None
            return acc, (dq, dk, dv, db)

        acc0 = jnp.zeros(bias.shape, jnp.float32) if shared else None
        acc, (dq, dk, dv, db) = jax.lax.scan(body, acc0, xs)
        dq, dk, dv = _merge(dq), _merge(dk), _merge(dv)
        dbias = None if bias is None else (acc if shared else _merge(db)).astype(bias.dtype)
    return dq, dk, dv, dbias, None


_attention_core.defvjp(_core_fwd, _core_bwd)
