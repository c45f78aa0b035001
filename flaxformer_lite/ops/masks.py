"""Boolean attention masks: True = the query may attend to the key.

Every builder returns an array broadcastable to `[batch, heads, q_length, kv_length]`, the layout
`scaled_dot_product_attention` and `jax.nn.dot_product_attention` take. Token id 0 is padding
and segment id 0 marks padding in packed rows.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

Array = jnp.ndarray


def causal_mask(q_length: int, kv_length: int | None = None, *, offset: int = 0) -> Array:
    """`[1, 1, q_length, kv_length]`: query i sees keys j <= i + offset.

    `offset` places the queries after a prefix, e.g. `kv_length - q_length` when the last
    `q_length` positions of a cached sequence are the queries.
    """
    kv_length = q_length if kv_length is None else kv_length
    q = jnp.arange(q_length)[:, None] + offset
    k = jnp.arange(kv_length)[None, :]
    return (k <= q)[None, None]


def sliding_window_mask(q_length: int, kv_length: int | None = None, *, window: int,
                        offset: int = 0) -> Array:
    """`[1, 1, q_length, kv_length]`: query i sees the `window` keys ending at its own
    position, `i + offset - window < j <= i + offset` (Longformer's and Mistral's local causal
    attention; `offset` as in `causal_mask`)."""
    if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window_mask: window={window!r} must be a positive integer.")
    return causal_mask(q_length, kv_length, offset=offset) & ~causal_mask(
        q_length, kv_length, offset=offset - int(window))


def prefix_lm_mask(prefix_lengths: Array, length: int) -> Array:
    """`[batch, 1, length, length]`: a prefix LM's mask (T5's prefix LM, UniLM): every token
    sees the whole prefix of its row (its first `prefix_lengths[b]` tokens, bidirectionally)
    and, after it, the tokens up to itself."""
    prefix = jnp.asarray(prefix_lengths)
    if prefix.ndim != 1:
        raise ValueError(f"prefix_lm_mask: prefix_lengths has shape {prefix.shape}; it must be "
                         "[batch].")
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    return ((k <= q)[None] | (k[None] < prefix[:, None, None]))[:, None]


def causal_mask_from_positions(q_positions: Array, kv_positions: Array) -> Array:
    """`[batch, 1, q, kv]` causal mask from explicit positions `[batch, q]`, `[batch, kv]`."""
    return (kv_positions[:, None, None, :] <= q_positions[:, None, :, None])


def padding_mask(q_valid: Array, kv_valid: Array | None = None) -> Array:
    """`[batch, 1, q, kv]` from validity or token ids (nonzero = valid) `[batch, q]`, `[batch, kv]`.

    Padded queries are masked as well as padded keys; their outputs are meaningless and the loss
    weights drop them.
    """
    kv_valid = q_valid if kv_valid is None else kv_valid
    q_valid = q_valid.astype(bool) if q_valid.dtype == bool else q_valid != 0
    kv_valid = kv_valid.astype(bool) if kv_valid.dtype == bool else kv_valid != 0
    return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array | None = None) -> Array:
    """`[batch, 1, q, kv]`: attend only within the same packed segment (id 0 = padding)."""
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    return same & (q_segment_ids != 0)[:, None, :, None] & (kv_segment_ids != 0)[:, None, None, :]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (None if all are None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0].astype(bool)
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def make_attention_mask(
    q_segment_ids: Array,
    kv_segment_ids: Array | None = None,
    *,
    causal: bool = False,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
) -> Array:
    """Padding + segment (+ causal) mask `[batch, 1, q, kv]` for (packed) sequences.

    Unpacked rows pass `(tokens != 0).astype(jnp.int32)` as their segment ids. With `causal`,
    positions (defaults: the row index) decide order; packed rows may pass per-segment positions,
    since the segment mask already separates segments. Self-attention (no `kv_segment_ids`)
    uses one set of positions for both sides: the one given.
    """
    if kv_segment_ids is None:
        q_positions = q_positions if q_positions is not None else kv_positions
        kv_positions = kv_positions if kv_positions is not None else q_positions
    mask = segment_mask(q_segment_ids, kv_segment_ids)
    if causal:
        if q_positions is None and kv_positions is None:
            mask = mask & causal_mask(mask.shape[-2], mask.shape[-1])
        else:
            b = q_segment_ids.shape[0]
            qp = q_positions if q_positions is not None else jnp.broadcast_to(
                jnp.arange(mask.shape[-2]), (b, mask.shape[-2]))
            kp = kv_positions if kv_positions is not None else jnp.broadcast_to(
                jnp.arange(mask.shape[-1]), (b, mask.shape[-1]))
            mask = mask & causal_mask_from_positions(qp, kp)
    return mask
