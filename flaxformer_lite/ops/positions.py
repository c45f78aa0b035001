"""Position information: sinusoidal tables, rotary embeddings, T5 relative-position buckets,
ALiBi's linear biases.

Learned absolute positions are a plain embedding table and live in `flaxformer_lite.layers`.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.ops.sharding import take_rows

Array = jnp.ndarray


def segment_positions(segment_ids: Array) -> Array:
    """`[batch, length]` position of each token within its segment: 0 where the segment id
    changes from the token before (a packed example's first token), counting up after it.

    What the data pipelines give packed rows as `positions`; the models derive it when only
    `segment_ids` are given, so that a packed example's positions do not run on from the one
    before it.
    """
    segment_ids = jnp.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    before = jnp.pad(segment_ids, [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)],
                     constant_values=-1)[..., :-1]
    starts = jnp.where(segment_ids != before, index, 0)
    return index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)


def sinusoidal_embedding(positions: Array, d_model: int, *, max_timescale: float = 10000.0,
                         dtype=jnp.float32) -> Array:
    """The paper's encoding for integer `positions` `[...]` -> `[..., d_model]`.

    `PE[pos, 2i] = sin(pos / 10000^(2i/d_model))`, `PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))`
    (Vaswani et al. 2017, section 3.5): sines and cosines interleaved, as the formula reads.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}.")
    i = jnp.arange(d_model // 2, dtype=jnp.float32)
    inv_freq = jnp.exp(-(2.0 * i / d_model) * math.log(max_timescale))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return table.reshape(*angles.shape[:-1], d_model).astype(dtype)


def sinusoidal_table(length: int, d_model: int, *, max_timescale: float = 10000.0) -> np.ndarray:
    """`[length, d_model]` float64 NumPy table of the same formula (for plots and references)."""
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}.")
    pos = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(d_model // 2, dtype=np.float64)[None, :]
    angles = pos / np.power(max_timescale, 2.0 * i / d_model)
    table = np.empty((length, d_model))
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


def apply_rotary(x: Array, positions: Array, *, base: float = 10000.0,
                 fraction: float = 1.0) -> Array:
    """Rotary position embedding (RoPE, Su et al. 2021) of `x` `[batch, length, heads, head_dim]`.

    `positions` `[batch, length]` (or `[length]`). The first `fraction * head_dim` dimensions are
    rotated as pairs (i, i + half) with frequency `base^(-2i/rot_dims)` (the "rotate half" layout
    of GPT-NeoX and LLaMA); the rest pass through. q.k then depends only on relative position.
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rotary: x must be [batch, length, heads, head_dim]; got shape "
                         f"{x.shape}.")
    d = x.shape[-1]
    rot = int(d * fraction)
    if rot % 2 or not 0 < rot <= d:
        raise ValueError(f"apply_rotary: fraction={fraction} of head_dim={d} gives {rot} "
                         "dimensions; it must rotate an even number of them, at least 2.")
    half = rot // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot)
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xr = x[..., :rot].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rot:]], axis=-1)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
    """T5's bucket index for `relative_position = key_position - query_position` (int array).

    Half the buckets (per direction when bidirectional) hold exact small distances; the rest
    cover distances up to `max_distance` logarithmically; larger distances share the last bucket.
    """
    n = -jnp.asarray(relative_position)
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


def relative_position_bias(table: Array, q_positions: Array, kv_positions: Array, *,
                           bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """Additive attention bias from a learned `[num_buckets, heads]` table.

    Positions `[q]`/`[kv]` give a `[1, heads, q, kv]` bias; `[batch, q]`/`[batch, kv]` give
    `[batch, heads, q, kv]`.
    """
    if jnp.shape(table)[0] != num_buckets:  # jnp.take would fill missing rows with NaN
        raise ValueError(f"relative_position_bias: the table has {jnp.shape(table)[0]} rows "
                         f"for num_buckets={num_buckets}; it must be [num_buckets, heads].")
    rel = kv_positions[..., None, :] - q_positions[..., :, None]
    buckets = relative_position_bucket(rel, bidirectional=bidirectional,
                                       num_buckets=num_buckets, max_distance=max_distance)
    bias = take_rows(table, buckets)  # [..., q, kv, heads]
    bias = jnp.moveaxis(bias, -1, -3)
    return bias if bias.ndim == 4 else bias[None]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes `[heads]` (Press et al. 2022): the geometric sequence
    `2 ** (-8 i / n)`, i = 1..n, for n heads a power of two; otherwise those of the largest
    power of two below n, then every other slope of twice that many heads (the authors'
    reference code, as BLOOM uses it)."""
    try:  # NumPy integers too
        n = -1 if isinstance(num_heads, bool) else operator.index(num_heads)
    except TypeError:
        n = -1
    if n < 1:
        raise ValueError(f"alibi_slopes: num_heads={num_heads!r} must be a positive integer.")
    num_heads = n

    def powers(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    base = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(base) + powers(2 * base)[0::2][:num_heads - base]
    return np.asarray(slopes, np.float32)


def alibi_bias(num_heads: int, q_positions: Array, kv_positions: Array) -> Array:
    """ALiBi's additive attention bias `-slope_h * |q - k|` in float32, no parameters.

    Positions `[q]`/`[kv]` give `[1, heads, q, kv]`; `[batch, q]`/`[batch, kv]` give
    `[batch, heads, q, kv]`. Causal attention masks the keys after each query, so there it is
    the paper's `-slope * (q - k)`; bidirectional encoders see the distance both ways.
    """
    distance = jnp.abs(jnp.asarray(kv_positions)[..., None, :]
                       - jnp.asarray(q_positions)[..., :, None]).astype(jnp.float32)
    slopes = jnp.asarray(alibi_slopes(num_heads))[:, None, None]
    bias = -slopes * distance[..., None, :, :]
    return bias if bias.ndim == 4 else bias[None]
