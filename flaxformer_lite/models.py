"""The four model families: EncoderDecoder (Vaswani), DecoderOnly (GPT), EncoderOnly (BERT), T5.

All take integer token ids `[batch, length]` (0 = padding) and optional packing information:
`segment_ids` `[batch, length]` (1, 2, ... per packed example, 0 = padding) and `positions`
`[batch, length]` (restarting at 0 in each segment). Logits come back in float32.

Decoding: call with `decode=True` on a model whose `cache` collection was made by
`init_cache`; each call appends its tokens to the cache. Per-token `positions` and a `valid` flag
let prompts of different lengths share one batch (see `flaxformer_lite.decoding`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import math
from collections.abc import Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import ops
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.layers import (
    Dense,
    Embed,
    LayerStack,
    Norm,
    RelativePositionBias,
    annotate_swaps,
    constrain,
    default_positions,
    fit_to_write,
    shift_right,
)

Array = jnp.ndarray
Shape = tuple[int, ...]


def concrete_range(x) -> tuple[int, int] | None:
    """`(min, max)` of `x` when its values can be read here (not traced, not spread over
    other processes, not empty), else None: for range checks outside `jit`."""
    if (x is None or isinstance(x, jax.core.Tracer) or not np.size(x)
            or isinstance(x, jax.Array) and not x.is_fully_addressable):
        return None
    x = np.asarray(x)  # NumPy: jnp here would be traced inside a caller's jit
    return int(x.min()), int(x.max())


def check_token_ids(what: str, ids: Array, *, vocab_size: int | None = None,
                    type_vocab_size: int | None = None, max_positions: int | None = None,
                    **aux: Array | None) -> None:
    """`ids` are integer `[batch, length]`, and the per-token entries given with them
    (segment ids, positions, token types) have their shape: named errors while tracing.

    With `vocab_size` (`type_vocab_size`, `max_positions`: a learned position table's rows),
    concrete ids (token types, positions) outside the table are refused too: an embedding
    lookup past its table gives NaN, a negative one wraps around, and positions used to be
    clamped to the last row. Traced values (inside `jit`) cannot be checked here;
    `check_batch` checks batches."""
    if getattr(ids, "ndim", None) != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{what} must be integer token ids [batch, length], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} of shape "
                         f"{getattr(ids, 'shape', None)}.")
    for name, x in aux.items():
        if x is not None and tuple(jnp.shape(x)) != ids.shape:
            raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}; it must match {what} "
                             f"{ids.shape}.")
    tables = ((what, ids, vocab_size, f"the model's vocab_size={vocab_size}"),
              ("token_type_ids", aux.get("token_type_ids"), type_vocab_size,
               f"the model's type_vocab_size={type_vocab_size}"),
              ("positions", aux.get("positions"), max_positions,
               f"the learned position table of max_len={max_positions} rows"))
    for name, x, size, table in tables:
        span = None if size is None else concrete_range(x)
        if span is None:
            continue
        low, high = span
        if low < 0 or high >= max(size, 1):  # no type embedding: only type 0, as check_batch
            raise ValueError(f"{name} hold values in [{low}, {high}], outside {table} "
                             f"(valid: 0..{max(size, 1) - 1}).")


def _learned_positions(cfg: TransformerConfig) -> int | None:
    """Rows of the learned position table (None: no table, positions are not looked up)."""
    return cfg.max_len if cfg.position == "learned" else None


def _check_length(cfg: TransformerConfig, length: int, what: str) -> None:
    if cfg.position in ("learned",) and length > cfg.max_len:
        raise ValueError(
            f"{what} has length {length}, longer than the model's max_len={cfg.max_len}; "
            "truncate the input or build the model with a larger TransformerConfig.max_len.")


def _positions(ids: Array, segment_ids: Array | None, positions: Array | None
               ) -> tuple[Array, Array]:
    """`(positions, relative)`: the token positions `[batch, length]` (the given ones; else,
    with segment ids, each token's position within its segment, so a packed row's examples
    each start at 0 rather than where the one before ended; else 0..length-1) and those a
    relative-position bias reads. Within a segment, derived positions differ from 0..length-1
    by a constant, which relative offsets ignore (and other segments are masked), so the bias
    is one `[1, length]` row for every row unless positions are given."""
    if positions is not None:
        return positions, positions
    shared = default_positions(ids)
    if segment_ids is not None:
        return ops.segment_positions(segment_ids), shared[:1]
    return shared, shared[:1]


def _token_positions(segment_ids: Array) -> Array:
    """`[batch, length]`: how many real tokens (segment id != 0) come before each token of an
    unpacked row: 0..n-1 on a row's n tokens wherever its padding is (padding takes the
    position of the token before it, 0 before the first)."""
    return jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1, dtype=jnp.int32) - 1, 0)


def _segments(ids: Array, segment_ids: Array | None, pad_id: int | None = 0) -> Array:
    """Segment ids given, or 1 for every token but padding (`pad_id`; None: every token)."""
    if segment_ids is not None:
        return segment_ids
    return jnp.ones_like(ids, jnp.int32) if pad_id is None else (ids != pad_id).astype(jnp.int32)


class _Embedder(nn.Module):
    """Token embedding (+ scale) + absolute positions (+ token types) (+ norm) + dropout."""

    config: TransformerConfig
    token_embed: nn.Module

    @nn.compact
    def __call__(self, ids: Array, positions: Array, token_type_ids: Array | None,
                 deterministic: bool) -> Array:
        cfg = self.config
        x = self.token_embed(ids)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        # Saliency, opt-in: with mutable=["perturbations"] an apply returns zeros shaped like
        # the token embeddings; passed back as variables, they are added here, and their
        # gradient is the gradient with respect to the embeddings (after scale_embeddings'
        # sqrt(d_model): the table rows' gradient is that times sqrt(d_model)). Never made by
        # model.init (its variables would then carry an entry shaped by the init inputs).
        if (self.has_variable("perturbations", "token_embeddings")
                or self.is_mutable_collection("perturbations") and not self.is_initializing()):
            x = self.perturb("token_embeddings", x)
        if cfg.position == "learned":  # given positions are range-checked (check_token_ids)
            x = x + Embed(cfg.max_len, cfg, axes=(None, "embed"), name="position_embed")(
                jnp.minimum(positions, cfg.max_len - 1))
        elif cfg.position == "sinusoidal":
            x = x + ops.sinusoidal_embedding(positions, cfg.d_model, dtype=x.dtype)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + Embed(cfg.type_vocab_size, cfg, axes=(None, "embed"), name="type_embed")(types)
        if cfg.embedding_norm:
            x = Norm(cfg, name="embed_norm")(x)
        x = constrain(x, ("batch", "length", "act_embed"))
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


def _embed_table(cfg: TransformerConfig, name: str) -> Embed:
    return Embed(cfg.vocab_size, cfg, token_table=True, name=name)


class Encoder(nn.Module):
    """Embeddings + bidirectional layer stack (+ final norm): ids -> `[batch, length, d_model]`."""

    config: TransformerConfig
    token_embed: nn.Module
    layer_cls: Any = None  # see `DecoderOnly.layer_cls`

    @nn.compact
    def __call__(self, inputs: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, token_type_ids: Array | None = None,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        check_token_ids("inputs", inputs, segment_ids=segment_ids, positions=positions,
                        token_type_ids=token_type_ids, vocab_size=cfg.vocab_size,
                        type_vocab_size=cfg.type_vocab_size,
                        max_positions=_learned_positions(cfg))
        _check_length(cfg, inputs.shape[1], "inputs")
        positions, rel_pos = _positions(inputs, segment_ids, positions)
        segment_ids = _segments(inputs, segment_ids, cfg.pad_id)
        x = _Embedder(cfg, self.token_embed, name="embedder")(
            inputs, positions, token_type_ids, deterministic)
        mask = ops.make_attention_mask(segment_ids)
        bias = None
        if cfg.position == "relative":
            # One [1, heads, q, kv] bias for every row, unless positions were given.
            bias = RelativePositionBias(cfg, bidirectional=True, name="relative_bias")(
                rel_pos, rel_pos)
        elif cfg.position == "alibi":
            bias = ops.alibi_bias(cfg.num_heads, rel_pos, rel_pos)
        x = LayerStack(cfg, cfg.encoder_layers, layer_cls=self.layer_cls, name="layers")(
            x, self_mask=mask, self_bias=bias, positions=positions, deterministic=deterministic)
        if cfg.final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if cfg.final_dropout:
            x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return x


class Decoder(nn.Module):
    """Embeddings + causal layer stack (+ cross-attention) + output projection -> logits.

    `has_cross=False` is the decoder-only (GPT) stack.
    """

    config: TransformerConfig
    token_embed: nn.Module
    has_cross: bool = True
    layer_cls: Any = None  # see `DecoderOnly.layer_cls`

    @nn.compact
    def __call__(self, ids: Array, *, encoded: Array | None = None,
                 encoder_segment_ids: Array | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None, decode: bool = False,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        check_token_ids("decoder inputs", ids, segment_ids=segment_ids, positions=positions,
                        vocab_size=cfg.vocab_size, max_positions=_learned_positions(cfg))
        if encoded is not None and (
                encoded.ndim != 3 or encoded.shape[0] != ids.shape[0] or
                encoder_segment_ids is not None
                and tuple(jnp.shape(encoder_segment_ids)) != encoded.shape[:2]):
            raise ValueError(
                f"The encoder output {encoded.shape} must be [batch, source_length, d_model] "
                f"for the decoder's batch of {ids.shape[0]}, with source segment ids of shape "
                f"[batch, source_length] (got {jnp.shape(encoder_segment_ids)}): the inputs and "
                "targets must hold the same examples.")
        given_segments = segment_ids is not None
        if decode and segment_ids is None:  # every fed token is real (0 is the start token)
            segment_ids = jnp.ones_like(ids)
        elif self.has_cross and segment_ids is None:
            # Shifted targets start with the start token 0, which is not padding: a row's first
            # column always counts (it was masked out, and `decode` gave other logits).
            first = (jnp.arange(ids.shape[1]) == 0)[None]
            segment_ids = ((ids != 0) | first).astype(jnp.int32)
        segment_ids = _segments(ids, segment_ids, cfg.pad_id)
        overflow = None
        if decode:
            mask, positions, kv_positions, cache_index, overflow = decode_state(
                self, ids, positions, segment_ids != 0)
            rel_q, rel_kv = positions, kv_positions
        else:
            _check_length(cfg, ids.shape[1], "decoder inputs")
            packed = positions is not None or given_segments
            positions, rel_q = _positions(ids, segment_ids if given_segments else None,
                                          positions)
            if (not packed and cfg.pad_id is not None and cfg.padding == "anywhere"
                    and cfg.position in ("learned", "sinusoidal")):
                # Absolute positions count real tokens only, so a row padded on the left (or
                # anywhere) embeds its tokens as the unpadded row does; right-padded rows keep
                # 0..length-1 at every token. (Rotary, relative and ALiBi read offsets, which
                # left padding does not change.)
                positions = _token_positions(segment_ids)
            rel_kv = rel_q
            cache_index = None
            # Causality goes to the attention function (is_causal), which then skips the score
            # blocks above the diagonal; the mask keeps padding and packed segments apart, and
            # is left out where padding only trails the tokens (`config.padding`).
            mask = None
            if (cfg.padding != "trailing" or packed) and (given_segments
                                                            or cfg.pad_id is not None):
                # (pad_id None and no segment ids: every token is real, causality is all)
                mask = ops.make_attention_mask(segment_ids)
        x = _Embedder(cfg, self.token_embed, name="embedder")(ids, positions, None, deterministic)
        bias = None
        if cfg.position == "relative":
            bias = RelativePositionBias(cfg, bidirectional=False, name="relative_bias")(
                rel_q, rel_kv)
        elif cfg.position == "alibi":
            bias = ops.alibi_bias(cfg.num_heads, rel_q, rel_kv)
        cross_mask = None
        if self.has_cross:
            enc_seg = (jnp.ones(encoded.shape[:2], jnp.int32) if encoder_segment_ids is None
                       else encoder_segment_ids)
            if decode:  # no packing while decoding: validity alone
                cross_mask = ops.segment_mask((segment_ids != 0).astype(jnp.int32),
                                              (enc_seg != 0).astype(jnp.int32))
            else:
                cross_mask = ops.segment_mask(segment_ids, enc_seg)
        x = LayerStack(cfg, cfg.decoder_layers, has_cross=self.has_cross,
                       layer_cls=self.layer_cls, name="layers")(
            x, encoded=encoded, self_mask=mask, self_bias=bias, cross_mask=cross_mask,
            positions=positions, decode=decode, cache_index=cache_index,
            deterministic=deterministic, causal=True)
        if cfg.final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if cfg.final_dropout:
            x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_embeddings:
            if cfg.scale_tied_logits:
                x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
            logits = self.token_embed.attend(x)
        else:
            logits = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg,
                           use_bias=False, pad_out_multiple=cfg.vocab_pad_multiple,
                           name="logits")(x)
        logits = logits.astype(jnp.float32)
        if overflow is not None:  # written past the cache: NaN, not quietly wrong logits
            logits = jnp.where(overflow, jnp.nan, logits)
        return constrain(logits, ("batch", "length", "act_vocab"))


def decode_state(module: nn.Module, ids: Array, positions: Array | None, valid: Array):
    """A decoder's cache bookkeeping in decode mode, shared by all its layers: call it from
    the `decode=True` branch of a decoder's compact `__call__` (the library's `Decoder` does),
    so that `decoding.generate` and `beam_search` can drive a decoder of your own.

    The decoding functions feed `ids` `[batch, new]` with `segment_ids` (here `valid =
    segment_ids != 0`: slot written but never to be attended, the tail of a shorter prompt)
    and explicit `positions` `[batch, new]`. This keeps, in `module`'s "cache" collection,
    the write index, each slot's position and its validity.

    Returns `(mask, positions, kv_positions, cache_index, overflow)`: the attention mask
    `[batch, 1, new, cache]` (valid cached slots up to each new token) to pass with
    `cache_index` to each `MultiHeadAttention(decode=True)`, the new tokens' positions
    (default: counted from the index), the cached positions `[batch, cache]` (for relative
    biases), and whether this call writes past the cache's end. At init (`init_cache`) the
    mask is causal over `ids` and the index None. `dynamic_update_slice` would clamp a write
    past the end onto the last slots and the logits would look fine; a concrete index raises
    instead, and a traced one (inside `jit`) is reported as `overflow` (the library's decoder
    then turns its logits into NaN).
    """
    b, t = ids.shape
    initialized = module.has_variable("cache", "index")
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    kv_pos = module.variable("cache", "positions", jnp.zeros, (b, t), jnp.int32)
    kv_valid = module.variable("cache", "valid", jnp.zeros, (b, t), jnp.bool_)
    if not initialized:
        _check_length(module.config, t, "the decoding cache")
        positions = default_positions(ids) if positions is None else positions
        mask = ops.make_attention_mask(valid.astype(jnp.int32), causal=True)
        return mask, positions, positions, None, None
    i = index.value
    size = kv_valid.value.shape[1]
    if not isinstance(i, jax.core.Tracer) and int(i) + t > size:
        raise ValueError(
            f"This decode=True call writes tokens {int(i)}..{int(i) + t - 1} into a cache "
            f"of {size} slots; make the cache longer (models.init_cache(model, params, "
            "batch, length)).")
    if positions is None:
        positions = default_positions(ids, offset=i)
    # Index zeros of the index's own type: a literal 0 is int64 under jax_enable_x64.
    start = (jnp.zeros_like(i), i)
    # On an Explicit mesh the cache takes the layout of what is written (layers.fit_to_write).
    kv_pos.value = jax.lax.dynamic_update_slice(
        *fit_to_write(kv_pos.value, positions.astype(jnp.int32), axis=1), start)
    kv_valid.value = jax.lax.dynamic_update_slice(
        *fit_to_write(kv_valid.value, valid, axis=1), start)
    slots = jnp.arange(kv_valid.value.shape[1])
    causal = slots[None, :] <= (i + jnp.arange(t))[:, None]
    mask = kv_valid.value[:, None, None, :] & causal[None, None]
    index.value = i + t
    return mask, positions, kv_pos.value, i, i + t > size


class DecoderOnly(nn.Module):
    """GPT-style language model: `ids [batch, length] -> logits [batch, length, vocab]`.

    `layer_cls`: the layer class of its stack, `layers.TransformerLayer` by default. A subclass
    of it swaps one part and keeps the rest (norms, residuals, dropout, remat, scan, the KV
    cache), e.g. `class MoELayer(TransformerLayer): ffn_cls: Any = MyMixtureOfExperts`, then
    `DecoderOnly(config, layer_cls=MoELayer)`. `EncoderDecoder` and `EncoderOnly` take it too.
    """

    config: TransformerConfig
    layer_cls: Any = None

    def __init_subclass__(cls, **kwargs):
        annotate_swaps(cls, ("layer_cls",))
        super().__init_subclass__(**kwargs)

    def setup(self):
        self.token_embed = _embed_table(self.config, "token_embed")
        self.decoder = Decoder(self.config, self.token_embed, has_cross=False,
                               layer_cls=self.layer_cls)

    def __call__(self, inputs: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, decode: bool = False,
                 deterministic: bool = True) -> Array:
        """Next-token logits for every position (causal; packed rows stay separate)."""
        return self.decoder(inputs, segment_ids=segment_ids, positions=positions, decode=decode,
                            deterministic=deterministic)


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer (Vaswani et al. 2017; T5 with a T5 config)."""

    config: TransformerConfig
    layer_cls: Any = None  # see `DecoderOnly.layer_cls`

    def __init_subclass__(cls, **kwargs):
        annotate_swaps(cls, ("layer_cls",))
        super().__init_subclass__(**kwargs)

    def setup(self):
        cfg = self.config
        if cfg.architecture != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs architecture='encoder_decoder', "
                             f"got {cfg.architecture!r}.")
        if cfg.share_encoder_decoder_embeddings:
            shared = _embed_table(cfg, "token_embed")
            enc_embed = dec_embed = shared
        else:
            enc_embed = _embed_table(cfg, "encoder_token_embed")
            dec_embed = _embed_table(cfg, "decoder_token_embed")
        self.encoder = Encoder(cfg, enc_embed, layer_cls=self.layer_cls)
        self.decoder = Decoder(cfg, dec_embed, has_cross=True, layer_cls=self.layer_cls)

    def encode(self, inputs: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
        """Source ids `[batch, src_len]` -> encoded `[batch, src_len, d_model]`."""
        return self.encoder(inputs, segment_ids=segment_ids, positions=positions,
                            deterministic=deterministic)

    def decode(self, encoded: Array, decoder_inputs: Array, *,
               encoder_segment_ids: Array | None = None, segment_ids: Array | None = None,
               positions: Array | None = None, decode: bool = False,
               deterministic: bool = True) -> Array:
        """Decoder ids `[batch, tgt_len]` (already shifted) -> logits `[batch, tgt_len, vocab]`.

        `encoder_segment_ids` `[batch, src_len]` masks source padding (0) and, when packed,
        keeps each target segment on its own source segment; without it every source position
        is attended to, so pass `(inputs != 0)` for padded sources, as `__call__` does.
        `segment_ids` default to the non-zero ids plus the first column (the start token 0).
        """
        return self.decoder(decoder_inputs, encoded=encoded,
                            encoder_segment_ids=encoder_segment_ids, segment_ids=segment_ids,
                            positions=positions, decode=decode, deterministic=deterministic)

    def __call__(self, inputs: Array, targets: Array, *,
                 inputs_segment_ids: Array | None = None,
                 targets_segment_ids: Array | None = None,
                 inputs_positions: Array | None = None,
                 targets_positions: Array | None = None,
                 deterministic: bool = True) -> Array:
        """Teacher-forced logits `[batch, tgt_len, vocab]` predicting `targets`.

        The decoder reads `targets` shifted right with 0 as the start token (per segment).
        """
        inputs_segment_ids = _segments(inputs, inputs_segment_ids)
        targets_segment_ids = _segments(targets, targets_segment_ids)
        encoded = self.encode(inputs, segment_ids=inputs_segment_ids,
                              positions=inputs_positions, deterministic=deterministic)
        decoder_inputs = shift_right(targets, targets_segment_ids)
        return self.decode(encoded, decoder_inputs, encoder_segment_ids=inputs_segment_ids,
                           segment_ids=targets_segment_ids, positions=targets_positions,
                           deterministic=deterministic)


class T5(EncoderDecoder):
    """T5 (Raffel et al. 2020): an EncoderDecoder with relative position buckets, RMS norm,
    pre-LN and no dense biases; use `get_config("t5-small")` and friends."""

    def setup(self):
        if self.config.position != "relative" or self.config.norm != "rms":
            raise ValueError("T5 needs TransformerConfig.position='relative' and norm='rms'; "
                             "use a t5-* preset or EncoderDecoder.")
        super().setup()


class EncoderOnly(nn.Module):
    """BERT-style bidirectional encoder.

    Returns a dict: `hidden` `[batch, length, d_model]`; `pooled` `[batch, d_model]` (dense +
    tanh on the first token) when `config.pooler`; `logits` `[batch, length, vocab]` from the
    masked-LM head (dense + activation + norm + tied decoder + bias) when `config.mlm_head`;
    `class_logits` `[batch, num_classes]` (float32) from the classifier (dropout + dense on
    `pooled`, BERT's sequence classification head) when `config.num_classes > 0`.
    """

    config: TransformerConfig
    layer_cls: Any = None  # see `DecoderOnly.layer_cls`

    def __init_subclass__(cls, **kwargs):
        annotate_swaps(cls, ("layer_cls",))
        super().__init_subclass__(**kwargs)

    def setup(self):
        cfg = self.config
        if cfg.architecture != "encoder_only":
            raise ValueError(f"EncoderOnly needs architecture='encoder_only', "
                             f"got {cfg.architecture!r}.")
        self.token_embed = _embed_table(cfg, "token_embed")
        self.encoder = Encoder(cfg, self.token_embed, layer_cls=self.layer_cls)
        if cfg.pooler:
            self.pooler = Dense((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), cfg,
                                name="pooler")
        if cfg.num_classes:
            # Classes replicated ("embed" splits over fsdp like the pooler's input axis).
            self.classifier_dropout = nn.Dropout(cfg.dropout_rate)
            self.classifier = Dense((cfg.d_model,), (cfg.num_classes,), ("embed", None), cfg,
                                    name="classifier")
        if cfg.mlm_head:
            self.mlm_transform = Dense((cfg.d_model,), (cfg.d_model,), ("embed", "mlp"), cfg,
                                       name="mlm_transform")
            self.mlm_norm = Norm(cfg)
            self.mlm_bias = self.param(
                "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         ("vocab",)),
                (cfg.vocab_size,), cfg.params_dtype)

    def __call__(self, inputs: Array, *, token_type_ids: Array | None = None,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 mlm_positions: Array | None = None,
                 deterministic: bool = True) -> dict[str, Array]:
        """`mlm_positions` `[batch, k]`: apply the masked-LM head there only (`logits` then
        `[batch, k, vocab]`), e.g. from `masked_positions(targets, k)`."""
        cfg = self.config
        hidden = self.encoder(inputs, segment_ids=segment_ids, positions=positions,
                              token_type_ids=token_type_ids, deterministic=deterministic)
        out = {"hidden": hidden}
        if cfg.pooler:
            out["pooled"] = jnp.tanh(self.pooler(hidden[:, 0]))
        if cfg.num_classes:
            pooled = self.classifier_dropout(out["pooled"], deterministic=deterministic)
            out["class_logits"] = self.classifier(pooled).astype(jnp.float32)
        if cfg.mlm_head:
            if mlm_positions is not None:
                if mlm_positions.ndim != 2 or mlm_positions.shape[0] != inputs.shape[0]:
                    raise ValueError(f"mlm_positions {mlm_positions.shape} must be "
                                     f"[batch, k] for inputs {inputs.shape}.")
                hidden = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)
            h = ops.activation(cfg.activation)(self.mlm_transform(hidden))
            h = self.mlm_norm(h)
            logits = ops.bias_add(self.token_embed.attend(h), self.mlm_bias.astype(h.dtype))
            out["logits"] = logits.astype(jnp.float32)
        return out


def masked_positions(targets: Array, k: int) -> tuple[Array, Array]:
    """`(positions, targets)`, both `[batch, k]` (`k` at most the row length): where the
    first `k` nonzero `targets` of each row sit (in order), and those targets; slots past a
    row's count hold position 0 and target 0 (no loss). A row with more than `k` loses the
    rest (`check_batch` refuses such host batches; the train step counts only the kept ones).
    What the train and eval steps hand `EncoderOnly(mlm_positions=...)` under
    `TransformerConfig.mlm_predictions`."""
    length = targets.shape[-1]
    k = min(k, length)  # rows shorter than k (a bucketed or shorter batch): every position
    rank = jnp.where(targets != 0, length - jnp.arange(length, dtype=jnp.int32), 0)
    score, positions = jax.lax.top_k(rank, k)  # earliest selected position first
    return positions, jnp.where(score > 0, jnp.take_along_axis(targets, positions, -1), 0)


# Optional batch entries each architecture's model reads, besides "inputs" and "targets".
OPTIONAL_BATCH_KEYS = {
    "decoder_only": ("segment_ids", "positions"),
    "encoder_decoder": ("inputs_segment_ids", "targets_segment_ids", "inputs_positions",
                        "targets_positions"),
    "encoder_only": ("segment_ids", "positions", "token_type_ids"),
}


# The optional batch entry every architecture's loss reads (not the model): a weight per
# target `[batch, length]` (a classifier's: per example, `[batch]`), float or bool, multiplied
# into the padding weights (`training.steps.target_weights`).
LOSS_WEIGHTS = "loss_weights"


def batch_keys(architecture: str, model: nn.Module | None = None, *,
               classes: bool | None = None) -> tuple[str, ...]:
    """The batch entries a model of `architecture` and its loss read (others are ignored):
    `inputs`, `targets`, the architecture's optional entries, `loss_weights` (the loss's, not
    passed to the model), plus those a model of your own names in its class attribute
    `extra_batch_keys` (each passed to its `__call__` as a keyword argument by the train and
    eval steps). A classifier (`classes`, by default whether `model.config.num_classes > 0`)
    reads `labels` `[batch]` in place of `targets`."""
    extra = tuple(getattr(model, "extra_batch_keys", ())) if model is not None else ()
    if classes is None:
        classes = bool(getattr(getattr(model, "config", None), "num_classes", 0))
    return (("inputs", "labels") if classes else ("inputs", "targets")) + (
        OPTIONAL_BATCH_KEYS[architecture] + (LOSS_WEIGHTS,) + extra)


def model_kwargs(batch: Mapping[str, Any], architecture: str, model: nn.Module | None = None
                 ) -> dict[str, Any]:
    """The batch entries passed to a model's `__call__` as keyword arguments: what
    `batch_keys` names, less `inputs`, `targets`, `labels` (positional or the loss's) and
    `loss_weights` (the loss's)."""
    return {k: batch[k] for k in batch_keys(architecture, model)
            if k not in ("inputs", "targets", "labels", LOSS_WEIGHTS) and k in batch}


def example_weights(inputs: Array) -> Array:
    """Per-example weights `[batch]` (float32) of a classification batch: 0.0 for a row whose
    `inputs` are all padding (id 0: the rows `Engine.pad_batch` and the pipelines add to fill
    a batch), 1.0 for every other row."""
    return jnp.any(inputs != 0, axis=-1).astype(jnp.float32)


_WARNED_KEYS: set[tuple[str, str]] = set()  # (architecture, entry) told once


def check_batch(config: TransformerConfig, batch: Mapping[str, Any], *,
                checked: Collection[str] = (), extra_keys: Collection[str] = ()) -> None:
    """Raise `ValueError` for a host batch the model would silently misread.

    `inputs` and `targets` are present. Every entry the model reads is `[batch, length]` and
    they agree (an encoder-decoder's
    `inputs*` and `targets*` entries agree among themselves and in batch size). Token ids lie in
    `[0, vocab_size)`: JAX's gathers clamp or fill out-of-range ids instead of failing, so -1
    (PyTorch's ignore index) trained as the last token and ids past the vocabulary gave NaN.
    Likewise `token_type_ids` in `[0, type_vocab_size)` (only 0 without a type embedding)
    and learned `positions` below `max_len`; all entries are integers. Keys the model does
    not read are dropped, each reported once (`logging`; a misspelt key with its likely
    name). Values that are not concrete
    (traced) are skipped, and so are those of the keys in `checked` (already checked).
    `loss_weights` (optional, `[batch, length]` like `targets`; a classifier's `[batch]`) are
    bool, integer or float, finite and >= 0.
    `extra_keys` (a model's `extra_batch_keys`, a `loss_fn`'s `loss_batch_keys`) are passed
    on with only their leading (example) axis checked. A classifier's batch
    (`config.num_classes > 0`) holds `inputs` and `labels` `[batch]`, class ids in
    `[0, num_classes)`, in place of `targets`.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"A batch is a mapping of [batch, length] integer arrays, e.g. "
                        f"{{'inputs': ..., 'targets': ...}}; got a {type(batch).__name__} (for "
                        "a loader yielding (x, y), map it: {'inputs': x, 'targets': y}).")
    classes = config.num_classes
    keys = batch_keys(config.architecture, classes=bool(classes))
    missing = [k for k in keys[:2] if batch.get(k) is None]
    if missing and classes:
        raise ValueError(f"The batch has no {' or '.join(map(repr, missing))} entry (it has "
                         f"{sorted(batch)}); a classifier's batch (TransformerConfig."
                         f"num_classes={classes}) holds 'inputs' [batch, length] and 'labels' "
                         "[batch] (class ids; data.classification_pipeline makes them).")
    if missing:
        raise ValueError(f"The batch has no {' or '.join(map(repr, missing))} entry (it has "
                         f"{sorted(batch)}); every batch holds 'inputs' and 'targets' "
                         "[batch, length] (targets 0 = padding, no loss).")
    for key in batch:
        told = (config.architecture, key)
        if key not in keys and key not in extra_keys and told not in _WARNED_KEYS:
            _WARNED_KEYS.add(told)
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
            logging.getLogger(__name__).warning(
                "Batch entry %r is not read by a %s model (%s); it is ignored (a loss_fn of "
                "your own reads the entries named in Engine/train(loss_batch_keys=...), a "
                "model of your own those in its extra_batch_keys).", key,
                config.architecture, f"did you mean {close[0]!r}?" if close else
                f"it reads {', '.join(keys)}")
    arrays = {k: batch[k] for k in keys if batch.get(k) is not None and k not in checked
              and not isinstance(batch[k], jax.core.Tracer)}
    groups = ([("inputs", "inputs_segment_ids", "inputs_positions"),
               ("targets", "targets_segment_ids", "targets_positions", LOSS_WEIGHTS)]
              if config.architecture == "encoder_decoder"
              else [tuple(k for k in keys if k != "labels"
                          and not (classes and k == LOSS_WEIGHTS))])
    for k, v in arrays.items():
        dtype = getattr(v, "dtype", None)
        dtype = np.asarray(v).dtype if dtype is None else np.dtype(dtype)
        if k == LOSS_WEIGHTS:
            _check_loss_weights(v, dtype)
        elif not np.issubdtype(dtype, np.integer):
            raise ValueError(f"Batch entry {k!r} is {dtype}; token ids, segment ids and "
                             "positions are integers.")
    rows = {}
    for group in groups:
        shapes = {k: tuple(np.shape(arrays[k])) for k in group if k in arrays}
        for k, shape in shapes.items():
            if len(shape) != 2:
                raise ValueError(f"Batch entry {k!r} has shape {shape}; it must be "
                                 "[batch, length].")
        if len(set(shapes.values())) > 1:
            raise ValueError(f"Batch entries must share one [batch, length] shape; got {shapes}.")
        rows.update({k: shape[0] for k, shape in shapes.items()})
    if classes and "labels" in arrays:
        shape = tuple(np.shape(arrays["labels"]))
        if len(shape) != 1:
            raise ValueError(f"Batch entry 'labels' has shape {shape}; a classifier's labels "
                             "are one class id per row, [batch].")
        rows["labels"] = shape[0]
    if classes and LOSS_WEIGHTS in arrays:
        shape = tuple(np.shape(arrays[LOSS_WEIGHTS]))
        if len(shape) != 1:
            raise ValueError(f"Batch entry 'loss_weights' has shape {shape}; a classifier's "
                             "loss weights are one per example, [batch].")
        rows[LOSS_WEIGHTS] = shape[0]
    for k in extra_keys:  # the model's or a loss_fn's own entries: one row per example
        value = batch.get(k)
        if value is None or k in checked or isinstance(value, jax.core.Tracer):
            continue
        shape = np.shape(value)
        if rows and (not shape or shape[0] != next(iter(rows.values()))):
            raise ValueError(f"Batch entry {k!r} has shape {tuple(shape)}, but the batch has "
                             f"{next(iter(rows.values()))} rows: every entry is laid out and "
                             "split by its leading (example) axis.")
    if len(set(rows.values())) > 1:
        raise ValueError(f"Batch entries disagree on the batch size: {rows}.")
    if (classes and "labels" in arrays
            and not isinstance(arrays["labels"], jax.ShapeDtypeStruct)
            and np.size(arrays["labels"])):
        labels = np.asarray(arrays["labels"])
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"Batch entry 'labels' holds class ids from {low} to {high}; they "
                             f"must lie in [0, {classes}) (TransformerConfig.num_classes="
                             f"{classes}). Padding rows are marked by inputs of id 0 alone, "
                             "with any label in range (0); there is no -100 ignore index.")
    limits = {"inputs": config.vocab_size, "targets": config.vocab_size}
    if "token_type_ids" in keys:
        limits["token_type_ids"] = config.type_vocab_size
    for k in ("positions", "inputs_positions", "targets_positions"):
        limits[k] = config.max_len if config.position == "learned" else None
    for k, limit in limits.items():
        if (k not in arrays or isinstance(arrays[k], jax.ShapeDtypeStruct)  # shapes only
                or np.size(arrays[k]) == 0):
            continue
        values = np.asarray(arrays[k])
        low, high = int(values.min()), int(values.max())
        if k == "token_type_ids" and not limit:
            if high > 0 or low < 0:
                raise ValueError("Batch entry 'token_type_ids' holds types other than 0, but "
                                 "the model has no token-type embedding "
                                 "(TransformerConfig.type_vocab_size=0).")
            continue
        if low < 0 or (limit is not None and high >= limit):
            bound = f"[0, {limit})" if limit is not None else ">= 0"
            what = {"inputs": "vocab_size", "targets": "vocab_size",
                    "token_type_ids": "type_vocab_size"}.get(k, "max_len")
            raise ValueError(
                f"Batch entry {k!r} holds values from {low} to {high}; they must lie in {bound}"
                + (f" (TransformerConfig.{what}={limit})" if limit is not None else "")
                + (f". {_pad_words(config)}; there is no -100 ignore index."
                   if low < 0 and k in ("inputs", "targets") else "."))
    if config.architecture == "encoder_decoder":
        _check_segment_pairs(batch, arrays)
    if (config.architecture == "encoder_only" and config.mlm_predictions
            and "targets" in arrays and not isinstance(arrays["targets"], jax.ShapeDtypeStruct)
            and np.size(arrays["targets"])):
        most = int((np.asarray(arrays["targets"]) != 0).sum(axis=-1).max())
        if most > config.mlm_predictions:
            raise ValueError(
                f"A row of the batch selects {most} positions for the masked-LM loss, more "
                f"than TransformerConfig.mlm_predictions={config.mlm_predictions}, where the "
                "head is applied: cap the masking (mlm_pipeline(max_predictions=...)) or raise "
                "mlm_predictions (0: every position).")


def _check_loss_weights(value: Any, dtype: np.dtype) -> None:
    """`loss_weights` are bool, integer or float, finite and >= 0 (they weigh the loss and
    count the tokens that divide it)."""
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)
            or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"Batch entry 'loss_weights' is {dtype}; loss weights are float, "
                         "integer or bool (1 = in the loss, 0 = left out).")
    if isinstance(value, jax.ShapeDtypeStruct) or not np.size(value):
        return
    values = np.asarray(value, np.float32)
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise ValueError(f"Batch entry 'loss_weights' holds values from {values.min()} to "
                         f"{values.max()}; they must be finite and >= 0 (a weight per target: "
                         "0 leaves it out of the loss, 1 counts it once).")


def _pad_words(config: TransformerConfig) -> str:
    if config.pad_id is None:
        return "Every id is a real token (TransformerConfig.pad_id=None) and carries loss"
    return f"Token id {config.pad_id} is padding (TransformerConfig.pad_id) and carries no loss"


def _check_segment_pairs(batch: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """A packed encoder-decoder batch numbers the examples on both sides: a target segment
    attends to the source segment of the same id, so one side's ids alone (the other then
    defaults to one segment a row) or a target segment without its source mixes examples
    and trains on the wrong task, with finite losses."""
    given = [k for k in ("inputs_segment_ids", "targets_segment_ids")
             if batch.get(k) is not None]
    if len(given) == 1:
        raise ValueError(f"The batch has {given[0]!r} but not the other side's segment ids: a "
                         "packed encoder-decoder batch needs both 'inputs_segment_ids' and "
                         "'targets_segment_ids' (the same id for an example's source and "
                         "target), or neither.")
    src, tgt = arrays.get("inputs_segment_ids"), arrays.get("targets_segment_ids")
    if (src is None or tgt is None or isinstance(src, jax.ShapeDtypeStruct)
            or isinstance(tgt, jax.ShapeDtypeStruct)):
        return
    src, tgt = np.asarray(src), np.asarray(tgt)
    if not tgt.size or tgt.min() < 0 or src.size and src.min() < 0:
        return
    # Which ids each row holds, one [rows, ids] table a side (vectorised: this runs on the
    # host before every step).
    ids = int(max(tgt.max(), src.max() if src.size else 0)) + 1
    rows = np.arange(tgt.shape[0])[:, None]
    held = np.zeros((2, tgt.shape[0], ids), bool)
    held[0, rows, src] = True
    held[1, rows, tgt] = True
    orphans = held[1] & ~held[0]
    orphans[:, 0] = False
    if orphans.any():
        row = int(np.flatnonzero(orphans.any(axis=1))[0])
        raise ValueError(f"Row {row}: target segment(s) {np.flatnonzero(orphans[row]).tolist()} "
                         "have no source segment of the same id ('inputs_segment_ids'), so "
                         "they would attend to no source; number each example the same on "
                         "both sides.")


def make_model(config: TransformerConfig) -> nn.Module:
    """The model class for `config.architecture` (T5 for relative-position RMS-norm seq2seq)."""
    if config.architecture == "decoder_only":
        return DecoderOnly(config)
    if config.architecture == "encoder_only":
        return EncoderOnly(config)
    if config.position == "relative" and config.norm == "rms":
        return T5(config)
    return EncoderDecoder(config)


def dummy_inputs(config: TransformerConfig, batch: int = 1, length: int | None = None) -> dict:
    """Keyword arguments for `model.init` with the right shapes (int32 zeros + ones)."""
    length = min(config.max_len, 8) if length is None else length
    ids = jnp.ones((batch, length), jnp.int32)
    if config.architecture == "encoder_decoder":
        return {"inputs": ids, "targets": ids}
    return {"inputs": ids}


def init_params(config: TransformerConfig, rng: Array, batch: int = 1,
                length: int | None = None):
    """Initialised parameters (boxed with their logical axis names) of `make_model(config)`.

    The boxes (`nn.LogicallyPartitioned`) carry the sharding names the training Engine lays
    the arrays out by; `model.apply` reads them as they are. `flax.linen.meta.unbox(params)`
    gives plain arrays (for `np.savez`, arithmetic, `.shape`), which apply reads as well.

    Jitted, and cached per `(config, batch, length)`: one compiled program instead of one small
    compilation per parameter shape, compiled once however often it is called.
    """
    return _init_params(config, rng, batch, length)


@functools.partial(jax.jit, static_argnames=("config", "batch", "length"))
def _init_params(config: TransformerConfig, rng: Array, batch: int, length: int | None):
    # Module-level, so repeated calls with an equal config reuse the compiled program.
    return make_model(config).init({"params": rng}, **dummy_inputs(config, batch, length))[
        "params"]


def jit_model_fn(fn=None, *, static_argnames: tuple[str, ...] = ()):
    """`jax.jit(fn, static_argnames=...)` for a function that applies a model: the Flax method
    interceptors active at the call (`nn.intercept_methods`, an ablation) are part of its cache
    key. They act while the function traces, so a plain `jax.jit` reused the program of the
    first call: an ablation after a plain call ran the plain model, and a plain call after an
    ablation the ablated one."""
    if fn is None:
        return functools.partial(jit_model_fn, static_argnames=static_argnames)

    def traced(*args, _interceptors, **kwargs):
        del _interceptors
        return fn(*args, **kwargs)

    # fn's signature with the key as one more keyword: jit maps static names to positions by it.
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    key = inspect.Parameter("_interceptors", inspect.Parameter.KEYWORD_ONLY)
    at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    traced.__signature__ = sig.replace(parameters=params[:at] + [key] + params[at:])
    compiled = jax.jit(traced, static_argnames=(*static_argnames, "_interceptors"))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        stack = getattr(nn.module, "_global_interceptor_stack", ())
        return compiled(*args, _interceptors=tuple(stack), **kwargs)

    return call


def _leaf_paths(tree) -> set[str]:
    return set(flat_leaves(nn.meta.unbox(tree)))


@functools.lru_cache(maxsize=32)
def _param_paths(model: nn.Module) -> frozenset[str]:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  **dummy_inputs(model.config)))
    return frozenset(_leaf_paths(variables.get("params", {})))


def unwrap_params(params):
    """`params` given bare or as the variables `{"params": params}` (a dict or Flax's
    FrozenDict, as `model.init` returns): the bare tree."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return params["params"]
    return params


def check_params_read(model: nn.Module, params, fn: str) -> None:
    """Refuse `params` holding parameters `model` never reads. Flax's `apply` ignores them, so a
    run trained with a model of its own (adapters through `layer_cls`) given to
    `make_model(config)` computed the base model without a word. `fn` names the caller. A
    model whose `init` needs more than `dummy_inputs` is not checked."""
    try:
        try:
            known = _param_paths(model)
        except TypeError:  # an unhashable module: not cached
            known = _param_paths.__wrapped__(model)
    except Exception:  # a check, never the reason a call fails
        return
    got = _leaf_paths(params)
    extra, missing = sorted(got - known), sorted(known - got)
    if not extra:
        return
    more = lambda names: ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")  # noqa: E731
    hint = (f" They also lack {len(missing)} this model reads ({more(missing)}): parameters of "
            "another config, or of the other scan_layers layout (models.stack_layers / "
            "unstack_layers convert)." if missing else "")
    raise ValueError(
        f"{fn}: params hold {len(extra)} parameter(s) this {type(model).__name__} never reads "
        f"({more(extra)}); Flax would ignore them and compute another model.{hint} A run "
        "trained with a model of your own (`train(model=...)`; `load_run(workdir).module` "
        "names its class) needs that module, not `make_model(config)`.")


def stack_layers(params) -> dict:
    """Parameters of per-layer stacks (`.../layers/layer_0`, `layer_1`, ...; `scan_layers=False`)
    in the `scan_layers=True` layout (`.../layers/layers/...`, each array stacked on a leading
    `[num_layers]` axis). Exact: the scanned model computes the same function. Boxed
    parameters are unboxed; anything else is left as it is."""
    params = nn.meta.unbox(params)
    if not isinstance(params, Mapping):
        return params
    out = {}
    for key, value in params.items():
        names = sorted(value, key=str) if isinstance(value, Mapping) else []
        if key == "layers" and names and names == sorted(
                (f"layer_{i}" for i in range(len(names))), key=str):
            layers = [value[f"layer_{i}"] for i in range(len(names))]
            out[key] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
        else:
            out[key] = stack_layers(value)
    return out


def unstack_layers(params) -> dict:
    """The inverse of `stack_layers`: `scan_layers=True` parameters in the per-layer layout."""
    params = nn.meta.unbox(params)
    if not isinstance(params, Mapping):
        return params
    out = {}
    for key, value in params.items():
        if key == "layers" and isinstance(value, Mapping) and set(value) == {"layers"}:
            stacked = value["layers"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out[key] = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                        for i in range(n)}
        else:
            out[key] = unstack_layers(value)
    return out


@dataclasses.dataclass
class MergeReport:
    """What `merge_params` did with each parameter path ("a/b/c", as error messages name them).

    `copied`: old's values (same shape); `resized`: `path -> (old shape, new shape)`, old's
    values in the leading block, the rest new's initialisation; `initialised`: only in new,
    new's initialisation; `reinitialised`: `path -> (old shape, new shape)` of other shapes,
    new's initialisation (`mismatched="init"`); `dropped`: only in old, left out; `relaid`: the
    `scan_layers` layout old was converted to (None: as it was). `print(report)` lists them.
    """

    copied: list[str] = dataclasses.field(default_factory=list)
    resized: dict[str, tuple[Shape, Shape]] = dataclasses.field(default_factory=dict)
    initialised: list[str] = dataclasses.field(default_factory=list)
    reinitialised: dict[str, tuple[Shape, Shape]] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    relaid: str | None = None

    def __str__(self) -> str:
        counts = ", ".join(f"{len(getattr(self, name))} {name}" for name in (
            "copied", "resized", "initialised", "reinitialised", "dropped"))
        lines = [f"merge_params: {counts}"]
        if self.relaid:
            lines.append(f"  old parameters converted to the {self.relaid} layout")
        lines += [f"  resized        {k}: {old} -> {new}" for k, (old, new) in
                  self.resized.items()]
        lines += [f"  initialised    {k}" for k in self.initialised]
        lines += [f"  reinitialised  {k}: {old} -> {new}" for k, (old, new) in
                  self.reinitialised.items()]
        lines += [f"  dropped        {k}" for k in self.dropped]
        return "\n".join(lines)


def path_names(path) -> tuple[str, ...]:
    """A `jax.tree` key path as its names: `("decoder", "layers", "layer_0", ...)`."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _key(path) -> str:
    """A tree path as "a/b/c" (the names messages use)."""
    return "/".join(path_names(path))


def flat_leaves(tree) -> dict[str, Any]:
    """`{"path/to/leaf": leaf}` of a pytree (parameters, their metadata): for comparing two
    trees path by path and naming what differs."""
    return {_key(path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}


def merge_params(new, old, *, mismatched: str = "raise") -> tuple[Any, MergeReport]:
    """`(params, report)`: a changed model's freshly initialised `new` parameters with every
    trained value of `old` that fits, to start the changed model from a trained one (a longer
    learned `max_len`, a larger vocabulary, an untied head, adapters or a head added with
    `layer_cls` / `attention_cls` / `ffn_cls` or a model of one's own).

    Path by path (`new` and `old` boxed or plain, NumPy or JAX arrays):
      - in both, same shape: old's value, cast to new's dtype ("copied");
      - in both, same rank, new at least as large on every axis: old's values in the leading
        block, new's initialisation elsewhere ("resized"). New vocabulary or position rows
        (and, scanned, appended layers) leave old's computation unchanged on old ids,
        positions and layers; a widened `d_model`, `d_ff` or head axis does not (those copies
        are a starting point, not the old function);
      - in both, other shapes (a smaller or reshaped array): a `ValueError` naming every
        such path and both shapes, or with `mismatched="init"` new's initialisation
        ("reinitialised");
      - only in new: new's initialisation ("initialised"); only in old: left out ("dropped").
    `old` in the other `scan_layers` layout is first converted (`stack_layers` /
    `unstack_layers`, exact) when that shares more paths with `new`. The result has `new`'s
    tree and boxes (`nn.LogicallyPartitioned` from `init_params` keep their axis names), ready
    for `Engine.init_state(params=...)` or `train(init_params=...)`; print the report to check
    the merge.
    """
    if mismatched not in ("raise", "init"):
        raise ValueError(f"mismatched must be 'raise' or 'init', got {mismatched!r}.")
    want = flat_leaves(nn.meta.unbox(new))
    have = flat_leaves(nn.meta.unbox(old))
    report = MergeReport()
    if set(have) != set(want):  # the other scan_layers layout? (an exact conversion)
        shared = len(set(have) & set(want))
        for layout, convert in (("scan_layers=True", stack_layers),
                                ("scan_layers=False", unstack_layers)):
            paths = set(flat_leaves(jax.eval_shape(convert, old)))  # shapes only: nothing copied
            if len(paths & set(want)) > shared:
                shared, relaid = len(paths & set(want)), (layout, convert)
        if shared > len(set(have) & set(want)):
            report.relaid = relaid[0]
            have = flat_leaves(relaid[1](old))
    wrong = []
    for key, target in want.items():
        if key not in have:
            report.initialised.append(key)
            continue
        got, shape = tuple(np.shape(have[key])), tuple(np.shape(target))
        if got == shape:
            report.copied.append(key)
        elif len(got) == len(shape) and all(g <= s for g, s in zip(got, shape)):
            report.resized[key] = (got, shape)
        elif mismatched == "init":
            report.reinitialised[key] = (got, shape)
        else:
            wrong.append(f"{key}: {got} in old, {shape} in new")
    if wrong:
        raise ValueError(
            f"merge_params cannot fit old parameters into new ones of a smaller or other "
            f"shape: {wrong[:5]} ({len(wrong)} in all); change the model so each is at least "
            "as large on every axis, or pass mismatched='init' to keep new's initialisation "
            "there.")
    report.dropped = sorted(set(have) - set(want))

    copied = set(report.copied)

    def merged(key: str, value):
        if key in report.resized:
            block = tuple(slice(0, n) for n in report.resized[key][0])
            return jnp.asarray(value).at[block].set(jnp.asarray(have[key], value.dtype))
        if key in copied:
            return have[key] if have[key].dtype == value.dtype else have[key].astype(
                value.dtype)
        return value

    def is_box(x) -> bool:
        return isinstance(x, nn.meta.AxisMetadata)

    leaves, tree = jax.tree.flatten_with_path(new, is_leaf=is_box)
    out = [x.replace_boxed(merged(_key(path), x.unbox())) if is_box(x)
           else merged(_key(path), x) for path, x in leaves]
    return jax.tree.unflatten(tree, out), report


def init_cache(model: nn.Module, params, batch: int, length: int, *,
               encoded: Array | None = None, encoder_segment_ids: Array | None = None):
    """Zeroed decoding cache for `batch` sequences of up to `length` tokens (no compute).

    An encoder-decoder's cache also holds the cross-attention keys and values, shaped by the
    source: pass `encoded` (`model.apply(..., method="encode")`, `[batch, source_length,
    d_model]`) and its `encoder_segment_ids`."""
    if isinstance(model, EncoderDecoder) and encoded is None:
        raise ValueError(
            "init_cache of an encoder-decoder needs the encoded source: encoded = "
            "model.apply({'params': params}, inputs, method='encode'), then "
            "init_cache(model, params, batch, length, encoded=encoded, "
            "encoder_segment_ids=(inputs != 0).astype(jnp.int32)).")
    ids = jnp.zeros((batch, length), jnp.int32)

    def fn():
        if isinstance(model, EncoderDecoder):
            return model.init({"params": jax.random.key(0)}, encoded, ids,
                              encoder_segment_ids=encoder_segment_ids, decode=True,
                              method=EncoderDecoder.decode)
        return model.init({"params": jax.random.key(0)}, ids, decode=True)

    shapes = jax.eval_shape(fn)["cache"]
    del params
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
