"""Flax Linen layers: they own the parameters and call the pure functions in `ops`.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, and
`layers` when scanned) through `nn.with_logical_partitioning`; `training.partitioning` maps them
onto a device mesh. Activations are constrained with `batch`, `length`, `act_embed`, ... names,
which are no-ops outside a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite import ops
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.ops.sharding import explicit_sharding, mesh_of, refit, spec_of, take_rows

Array = jnp.ndarray


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation (no-op without mesh axis rules)."""
    return nn.with_logical_constraint(x, names)


def mesh_splits(names: Sequence[str | None]) -> tuple[int, ...]:
    """Into how many pieces the current mesh and logical axis rules split each named axis: all
    1 outside `jax.set_mesh` (one device, `pmap`) or without rules."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(names):
        return (1,) * len(names)
    out = []
    for entry in nn.logical_to_mesh_axes(tuple(names)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(math.prod(mesh.shape.get(a, 1) for a in axes))
    return tuple(out)


def fit_to_write(cache: Array, update: Array, axis: int) -> tuple[Array, Array]:
    """`(cache, update)` laid out alike for `dynamic_update_slice(cache, update, ...)` along
    `axis`: on an Explicit mesh (`jax.make_mesh`'s default), the layout of what is written
    (its batch split, say), with `axis` whole. So a cache made on one device (`init_cache`)
    takes the sharding of the keys, values or flags it stores. A no-op elsewhere."""
    source = update if explicit_sharding(update) is not None else cache
    if explicit_sharding(source) is None:
        return cache, update
    spec = list(spec_of(source, update.ndim))
    spec[axis] = None
    target = jax.sharding.NamedSharding(mesh_of(source), jax.sharding.PartitionSpec(*spec))
    return refit(cache, target), refit(update, target)


Initializer = Any  # (key, shape, dtype) -> array


def kernel_init(cfg: TransformerConfig, in_ndim: int, *, kind: str = "dense",
                residual_layers: int = 0, scale: float = 1.0) -> Initializer:
    """The initializer of a dense kernel `in_shape + out_shape`, by `cfg.init`.

    - "gpt2": N(0, init_std); a residual branch's output projection (`residual_layers` = the
      stack's depth) N(0, init_std / sqrt(2 * layers)), as GPT-2 does.
    - "bert": N(0, init_std) truncated at two standard deviations (TF's
      `truncated_normal_initializer`, as BERT's code uses everywhere).
    - "t5": variance 1 / fan_in, fan_in the product of the input axes (T5X's flattened
      `DenseGeneral`); normal for attention projections (`kind="attention"`), truncated normal
      of that same variance otherwise (feed-forward, untied output head).

    `scale` multiplies the standard deviation (a query's folded score scale).
    """
    if cfg.init == "t5":
        dist = "normal" if kind == "attention" else "truncated_normal"

        def init(key, shape, dtype):
            return nn.initializers.variance_scaling(
                scale ** 2, "fan_in", dist, in_axis=tuple(range(in_ndim)),
                out_axis=tuple(range(in_ndim, len(shape))))(key, shape, dtype)
        return init
    std = scale * cfg.init_std
    if cfg.init == "bert":
        return nn.initializers.truncated_normal(std)
    return nn.initializers.normal(std / math.sqrt(2 * residual_layers) if residual_layers
                                  else std)


def embedding_init(cfg: TransformerConfig, token_table: bool = False) -> Initializer:
    """The initializer of an embedding table `[num, d_model]`, by `cfg.init`.

    A token table whose lookups are multiplied by sqrt(d_model) (`scale_embeddings`) starts at
    std d_model**-0.5, so that the scaled embedding has unit variance. Otherwise "gpt2" and
    "bert" use `init_std` (normal / truncated), and "t5" N(0, 1) for the token table (T5X) and
    variance 1 / d_model for any other table.
    """
    if token_table and cfg.scale_embeddings:
        std = cfg.d_model ** -0.5
    elif cfg.init == "t5":
        std = 1.0 if token_table else cfg.d_model ** -0.5
    else:
        std = cfg.init_std
    if cfg.init == "bert":
        return nn.initializers.truncated_normal(std)
    return nn.initializers.normal(std)


def annotate_swaps(cls: type, names: Sequence[str]) -> None:
    """Make the sub-layer class fields `names` that `cls`'s body sets without a type annotation
    (`ffn_cls = MyFFN`) dataclass fields: a plain class attribute is not one, so instances took
    the inherited default (None) and silently built the stock sub-layer. Called from
    `__init_subclass__` before Flax turns the class into a dataclass."""
    own = cls.__dict__.get("__annotations__", {})
    missing = [name for name in names if name in cls.__dict__ and name not in own]
    if missing:
        cls.__annotations__ = {**own, **dict.fromkeys(missing, "Any")}


class Dense(nn.Module):
    """`y = x W + b` contracting the last `len(in_shape)` axes of `x` into `out_shape`.

    The kernel has shape `in_shape + out_shape` with logical `axes` (e.g. `[embed, heads, kv]`
    for a query projection) and is multiplied as a 2-D matrix through `ops.matmul`, whose
    backward is laid out for XLA:CPU when `barrier` is on. Flattening `[3, heads, head_dim]`
    into one axis would lose a split of `heads` (only a split of the leading factor survives a
    reshape), so when the mesh splits an axis other than the first of `in_shape` or
    `out_shape` (a fused q/k/v or k/v projection under tensor parallelism) the kernel is
    contracted as it is, and each device computes only its own heads.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    config: TransformerConfig
    use_bias: bool = True
    # `kernel_init`'s arguments: "attention" or "dense"; the depth of the stack whose residual
    # branch this layer ends (0: none); a factor on the standard deviation.
    init_kind: str = "dense"
    residual_layers: int = 0
    init_scale: float = 1.0
    pad_out_multiple: int = 0  # see `ops.matmul_padded_out`
    # Multiplies the initial kernel's slices along the first output axis (e.g. q of a fused
    # [embed, 3, heads, head_dim] kernel), one factor each; None = all 1.
    slice_init_scales: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        init = kernel_init(cfg, len(self.in_shape), kind=self.init_kind,
                           residual_layers=self.residual_layers, scale=self.init_scale)
        if self.slice_init_scales is not None:
            factors = jnp.asarray(self.slice_init_scales, jnp.float32).reshape(
                (1,) * len(self.in_shape) + (-1,) + (1,) * (len(self.out_shape) - 1))
            base = init

            def init(key, shape, dtype):
                return (base(key, shape, jnp.float32) * factors).astype(dtype)

        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.axes),
            self.in_shape + self.out_shape, cfg.params_dtype)
        n_in = len(self.in_shape)
        if x.ndim < n_in or tuple(x.shape[x.ndim - n_in:]) != tuple(self.in_shape):
            where = self.scope.path_text or self.name
            hint = (" A cross-attention memory of another width needs "
                    "MultiHeadAttention(..., kv_features=width)."
                    if self.name == "key_value" else "")
            raise ValueError(f"Dense layer {where!r} takes inputs [..., "
                             f"{', '.join(map(str, self.in_shape))}]; got shape "
                             f"{tuple(x.shape)}.{hint}")
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             self.axes[n_in:]),
                self.out_shape, cfg.params_dtype)
        splits = mesh_splits(self.axes)
        if max(splits[1:n_in] + splits[n_in + 1:], default=1) > 1:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x.astype(cfg.compute_dtype),
                                    kernel.astype(cfg.compute_dtype), (contract, ((), ())))
            return y if bias is None else ops.bias_add(y, bias.astype(cfg.compute_dtype))
        batch_shape = x.shape[: x.ndim - n_in]
        k_in, k_out = math.prod(self.in_shape), math.prod(self.out_shape)
        x2 = x.reshape(*batch_shape, k_in).astype(cfg.compute_dtype)
        w2 = kernel.reshape(k_in, k_out).astype(cfg.compute_dtype)
        y = ops.matmul_padded_out(x2, w2, self.pad_out_multiple, cfg.matmul_barrier)
        if bias is not None:
            y = ops.bias_add(y, bias.reshape(k_out).astype(cfg.compute_dtype))
        return y.reshape(*batch_shape, *self.out_shape)


class Embed(nn.Module):
    """Token (or position / type) embedding table `[num_embeddings, d_model]`.

    `attend(x)` multiplies by the transposed table: the tied output projection.
    """

    num_embeddings: int
    config: TransformerConfig
    axes: tuple[str, str] = ("vocab", "embed")
    token_table: bool = False  # the token embedding (see `embedding_init`)

    def setup(self):
        cfg = self.config
        init = embedding_init(cfg, self.token_table)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, self.axes),
            (self.num_embeddings, cfg.d_model), cfg.params_dtype)

    def __call__(self, ids: Array) -> Array:
        """`[...]` int ids -> `[..., d_model]` in the compute dtype."""
        return take_rows(self.embedding, ids).astype(self.config.compute_dtype)

    def attend(self, x: Array) -> Array:
        """`[..., d_model]` -> logits `[..., num_embeddings]`."""
        cfg = self.config
        table = self.embedding.astype(cfg.compute_dtype)
        return ops.matmul_padded_out(x.astype(cfg.compute_dtype), table.T,
                                     cfg.vocab_pad_multiple, cfg.matmul_barrier)


class Norm(nn.Module):
    """LayerNorm (scale, and bias unless `config.norm_bias` is off) or RMSNorm (scale only), by
    `config.norm`, in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("embed",)),
                           (x.shape[-1],), cfg.params_dtype)
        if cfg.norm == "rms":
            return ops.rms_norm(x, scale, eps=cfg.norm_eps)
        bias = None
        if cfg.norm_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   ("embed",)),
                              (x.shape[-1],), cfg.params_dtype)
        return ops.layer_norm(x, scale, bias, eps=cfg.norm_eps)


class RelativePositionBias(nn.Module):
    """T5's learned bias table `[num_buckets, heads]`, shared by all layers of one stack."""

    config: TransformerConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, q_positions: Array, kv_positions: Array) -> Array:
        """Positions `[q]`, `[kv]` or `[batch, q]`, `[batch, kv]` -> bias `[b|1, heads, q, kv]`."""
        cfg = self.config
        # T5X: uniform with variance 1 / fan_avg; otherwise as the other weights.
        init = (nn.initializers.variance_scaling(1.0, "fan_avg", "uniform") if cfg.init == "t5"
                else embedding_init(cfg))
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(init, (None, "heads")),
            (cfg.relative_num_buckets, cfg.num_heads), cfg.params_dtype)
        return ops.relative_position_bias(
            table, q_positions, kv_positions, bidirectional=self.bidirectional,
            num_buckets=cfg.relative_num_buckets, max_distance=cfg.relative_max_distance)


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) attention, self or cross, with an optional KV cache.

    Self-attention projects q, k, v with one fused kernel `[embed, 3, heads, kv]` when the key
    and value heads equal the query heads. With `decode=True` the keys and values of the new
    tokens are written into the `cache` collection at `cache_index` (`[batch, kv_heads,
    max_length, head_dim]`), and the queries attend over the whole cache under `mask` (on the
    CPU over the cache as it was plus the new keys, written after: `ops.cached_attention`); for
    cross attention the projected encoder keys/values are computed once (at `cache_index == 0`).

    Where the "intermediates" collection is mutable (`apply(..., capture_intermediates=True)` or
    `mutable=["intermediates"]`) it sows `attention_weights`, the float32 weights `[batch,
    heads, q_len, kv_len]` it attended with (in decode mode over the cache slots), for
    interpretability; elsewhere nothing is added to the program.
    """

    config: TransformerConfig
    is_cross: bool = False
    residual_layers: int = 0  # the output projection's `Dense.residual_layers`
    # Cross-attention: the width of the memory it attends to (an image encoder's, a
    # retriever's); None = d_model. The keys and values are projected from that width.
    kv_features: int | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv_inputs: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        q_positions: Array | None = None,
        decode: bool = False,
        cache_index: Array | None = None,
        deterministic: bool = True,
        is_causal: bool = False,
    ) -> Array:
        """x `[batch, q_len, d_model]`, kv_inputs `[batch, kv_len, kv_features or d_model]`
        (cross only).

        mask `[b|1, 1|heads, q_len, kv_len]` (True = attend), bias likewise (added to scores);
        in decode mode `kv_len` is the cache length. `q_positions` `[batch, q_len]` drive the
        rotary embedding of the queries and of the keys projected from `x` (self-attention;
        default `0..q_len-1`, in decode mode `cache_index + 0..q_len-1`). `is_causal` adds the
        causal mask inside the attention function, which (unlike a causal `mask`) lets it skip
        the blocks above the diagonal. In decode mode self-attention without a `mask` (or with
        `is_causal`) attends causally over the slots written so far: new token i sees slots
        `<= cache_index + i`; pass `is_causal=True` with a decoder's mask, so that a prompt
        written into an empty cache runs in causal query blocks on the CPU path. Returns
        `[batch, q_len, d_model]`.
        """
        if self.is_cross and kv_inputs is None:
            raise ValueError("MultiHeadAttention(is_cross=True) needs kv_inputs, the encoder "
                             "output [batch, kv_len, d_model] (or kv_features wide).")
        if not self.is_cross and kv_inputs is not None:
            raise ValueError("kv_inputs is given to a self-attention layer, which would ignore "
                             "it; build MultiHeadAttention(config, is_cross=True) to attend to "
                             "it.")
        cache_name = "cross_kv" if self.is_cross else "cached_key"
        if decode and not self.has_variable("cache", cache_name) and not self.is_initializing():
            raise ValueError("decode=True without a cache: create it first with "
                             "`init(..., decode=True)` at the full decoding length (or "
                             "`init_cache`), and apply with `mutable=['cache']`.")
        cached = decode and self.has_variable("cache", cache_name)
        if cached and cache_index is None:
            raise ValueError("decode=True needs cache_index, the cache slot of the first new "
                             "token (the number of tokens decoded so far).")
        cfg = self.config
        h, hk, dh, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        dense = dict(config=cfg, use_bias=cfg.use_bias, init_kind="attention")
        # An explicit score scale (T5's 1.0) moves the default head_dim**-0.5 into the query's
        # initialisation, so that the model starts out computing the same function.
        fold = 1.0 if cfg.attention_scale is None else dh ** -0.5 / cfg.attention_scale
        q_init = dict(init_scale=fold)
        if self.is_cross:
            q = Dense((d,), (h, dh), ("embed", "heads", "kv"), name="query", **q_init,
                      **dense)(x)
            if decode:
                k, v = self._cross_cache(kv_inputs, cache_index, dense)
            else:
                kv = Dense((self.kv_features or d,), (2, hk, dh), self._kv_axes(),
                           name="key_value", **dense)(kv_inputs)
                k, v = ops.unstack(kv, 2)
        elif cfg.fused_qkv and hk == h:
            qkv = Dense((d,), (3, h, dh), ("embed", None, "heads", "kv"), name="qkv",
                        slice_init_scales=None if fold == 1.0 else (fold, 1.0, 1.0),
                        **dense)(x)
            q, k, v = ops.unstack(qkv, 2)
        else:
            q = Dense((d,), (h, dh), ("embed", "heads", "kv"), name="query", **q_init,
                      **dense)(x)
            kv = Dense((d,), (2, hk, dh), ("embed", None, "heads", "kv"), name="key_value",
                       **dense)(x)
            k, v = ops.unstack(kv, 2)

        causal_new = False  # the mask holds causality among the new tokens
        if cached and not self.is_cross and (mask is None or is_causal):
            causal_new = True
            length = self.get_variable("cache", "cached_key").shape[2]
            new = cache_index + jnp.arange(x.shape[1])
            causal = (jnp.arange(length)[None, :] <= new[:, None])[None, None]
            mask, is_causal = (causal if mask is None else mask.astype(bool) & causal), False
        if cfg.position == "rotary" and not self.is_cross:
            pos = q_positions
            if pos is None:
                pos = jnp.arange(x.shape[1])[None] + (cache_index if cached else 0)
            q = ops.apply_rotary(q, pos, base=cfg.rotary_base, fraction=cfg.rotary_fraction)
            k = ops.apply_rotary(k, pos, base=cfg.rotary_base, fraction=cfg.rotary_fraction)

        dropout = not deterministic and cfg.attention_dropout_rate > 0
        sow = self.is_mutable_collection("intermediates") and not self.is_initializing()
        if (decode and not self.is_cross and not dropout
                and ops.attention.read_cache_before_write(cfg.attention_implementation)
                and self.has_variable("cache", "cached_key")):
            out = self._attend_then_cache(q, k, v, cache_index, bias, mask, causal_new)
            if sow:  # the written cache, whose slots past the new tokens went unread
                k = self.get_variable("cache", "cached_key").transpose(0, 2, 1, 3)
                mask = mask.astype(bool) & (jnp.arange(k.shape[1]) < cache_index + x.shape[1])
        else:
            if decode and not self.is_cross:
                k, v = self._self_cache(k, v, cache_index)
            out = ops.scaled_dot_product_attention(
                q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                scale=cfg.attention_scale, dropout_rate=cfg.attention_dropout_rate,
                dropout_rng=self.make_rng("dropout") if dropout else None,
                implementation=cfg.attention_implementation)
        if sow:
            # Before dropout, from the same q (rotated), k, bias, mask and scale as above.
            self.sow("intermediates", "attention_weights", ops.attention_weights(
                q, k, bias=bias, mask=mask, scale=cfg.attention_scale, is_causal=is_causal))
        return Dense((h, dh), (d,), ("heads", "kv", "embed"), name="out",
                     residual_layers=self.residual_layers, **dense)(out)

    def _attend_then_cache(self, q, k, v, cache_index, bias, mask, causal) -> Array:
        # Attend over the cache as it was plus the new keys (`ops.cached_attention`), then
        # write them. The write takes a zero that depends on the attention's output, so XLA
        # orders it after the cache's last read and updates the loop buffer in place; read after
        # the write, XLA:CPU copied each batch-1 cache four times a token.
        out = ops.cached_attention(q, self.get_variable("cache", "cached_key"),
                                   self.get_variable("cache", "cached_value"), k, v,
                                   cache_index, bias=bias, mask=mask,
                                   scale=self.config.attention_scale, causal=causal)
        after = out[:, :1, :1, :1] * 0  # per row: a NaN in one row stays in that row
        self._self_cache(k + after.astype(k.dtype), v + after.astype(v.dtype), cache_index)
        return out

    def _self_cache(self, k: Array, v: Array, cache_index: Array) -> tuple[Array, Array]:
        # Stored head-major, [batch, kv_heads, length, head_dim]: the layout the attention dots
        # read, so XLA does not transpose the whole cache at every decoding step.
        is_initialized = self.has_variable("cache", "cached_key")
        head_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 (its own inverse)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, head_major(k).shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, head_major(v).shape,
                                 v.dtype)
        if not is_initialized:  # model.init(..., decode=True): shapes come from the inputs
            return k, v
        zero = jnp.zeros_like(cache_index)  # not a literal 0: int64 under jax_enable_x64
        start = (zero, zero, cache_index, zero)
        cached_k.value = jax.lax.dynamic_update_slice(
            *fit_to_write(cached_k.value, head_major(k), axis=2), start)
        cached_v.value = jax.lax.dynamic_update_slice(
            *fit_to_write(cached_v.value, head_major(v), axis=2), start)
        return head_major(cached_k.value), head_major(cached_v.value)

    def _kv_axes(self) -> tuple[str | None, ...]:
        """Logical axes of the cross-attention key/value kernel: a memory of another width
        than d_model is not "embed" (rules splitting embed would not fit it): replicated."""
        width = self.kv_features
        embed = "embed" if width in (None, self.config.d_model) else None
        return (embed, None, "heads", "kv")

    def _cross_cache(self, kv_inputs: Array, cache_index: Array, dense: dict):
        cfg = self.config
        proj = Dense((self.kv_features or cfg.d_model,), (2, cfg.kv_heads, cfg.dim_per_head),
                     self._kv_axes(), name="key_value", **dense)
        is_initialized = self.has_variable("cache", "cross_kv")
        shape = kv_inputs.shape[:2] + (2, cfg.kv_heads, cfg.dim_per_head)
        cached = self.variable("cache", "cross_kv", jnp.zeros, shape, cfg.compute_dtype)
        if not is_initialized:
            kv = proj(kv_inputs)
        else:
            if kv_inputs.shape[:2] != cached.value.shape[:2]:
                raise ValueError(
                    f"The cross-attention cache was made for a memory of [batch, length] = "
                    f"{cached.value.shape[:2]}, got {kv_inputs.shape[:2]}: make a new cache "
                    "for each memory (models.init_cache(..., encoded=memory)).")
            # On an Explicit mesh the cache takes the memory's [batch, length] layout (the
            # cond's branches must agree; one made by `init_cache` has none).
            held = cached.value
            if explicit_sharding(kv_inputs) is not None:
                layout = jax.sharding.NamedSharding(
                    mesh_of(kv_inputs), jax.sharding.PartitionSpec(*spec_of(kv_inputs, 2)))
                held = refit(held, layout)
            kv = jax.lax.cond(
                cache_index == 0,
                lambda: refit(proj(kv_inputs).astype(held.dtype), jax.typeof(held).sharding),
                lambda: held)
            cached.value = kv
        return kv[:, :, 0], kv[:, :, 1]


class FeedForward(nn.Module):
    """Position-wise feed-forward block: `ops.feed_forward`'s math with owned parameters.

    Parameters: `wi` `[d_model, d_ff]` (gated activations: `[d_model, 2, d_ff]`, slice 0 the
    gate that goes through the activation, `ops.feed_forward`'s `w_gate`, and slice 1 its
    `w_in`), `wo` `[d_ff, d_model]`, and their biases when `config.use_bias`.
    """

    config: TransformerConfig
    residual_layers: int = 0  # the output projection's `Dense.residual_layers`

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """`[batch, length, d_model]` -> `[batch, length, d_model]`."""
        cfg = self.config
        dense = dict(config=cfg, use_bias=cfg.use_bias)
        if cfg.gated:
            hg = Dense((cfg.d_model,), (2, cfg.d_ff), ("embed", None, "mlp"), name="wi",
                       **dense)(x)
            h = ops.activation(cfg.activation)(hg[..., 0, :]) * hg[..., 1, :]
        else:
            h = Dense((cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), name="wi", **dense)(x)
            h = ops.activation(cfg.activation)(h)
        h = constrain(h, ("batch", "length", "act_mlp"))
        if cfg.ffn_hidden_dropout:
            h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return Dense((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), name="wo",
                     residual_layers=self.residual_layers, **dense)(h)


class TransformerLayer(nn.Module):
    """One encoder or decoder layer: self-attention, optional cross-attention, feed-forward.

    Pre-LN: `x + f(norm(x))` per sub-layer. Post-LN (the paper's): `norm(x + f(x))`. Dropout on
    each sub-layer's output before the residual add. Signature fits `nn.scan`:
    `(x, None) -> (x, None)` with the rest passed as broadcast arguments. `causal`: the
    self-attention is causal on top of `self_mask` (decoders; in decode mode over the cache
    slots).
    """

    config: TransformerConfig
    has_cross: bool = False
    num_layers: int = 1
    decode: bool = False
    deterministic: bool = True
    causal: bool = False
    # The sub-layers' classes (None: MultiHeadAttention, FeedForward). A subclass that sets
    # one swaps that part, e.g. a mixture of experts for the feed-forward; it is built as
    # `cls(config, residual_layers=..., name=...)` (attention also with `is_cross=True`) and
    # called as they are.
    attention_cls: Any = None
    ffn_cls: Any = None

    def __init_subclass__(cls, **kwargs):
        annotate_swaps(cls, ("attention_cls", "ffn_cls"))
        super().__init_subclass__(**kwargs)

    @nn.compact
    def __call__(self, x: Array, _unused: Any = None, encoded: Array | None = None,
                 self_mask: Array | None = None, self_bias: Array | None = None,
                 cross_mask: Array | None = None, positions: Array | None = None,
                 cache_index: Array | None = None):
        cfg = self.config
        decode, deterministic = self.decode, self.deterministic
        depth = max(self.num_layers, 1)
        drop = nn.Dropout(cfg.dropout_rate)

        def sublayer(name, fn, x):
            if cfg.norm_position == "pre":
                y = fn(Norm(cfg, name=f"{name}_norm")(x))
                return x + drop(y, deterministic=deterministic)
            y = fn(x)
            return Norm(cfg, name=f"{name}_norm")(x + drop(y, deterministic=deterministic))

        attention_cls = self.attention_cls or MultiHeadAttention
        attn = attention_cls(cfg, residual_layers=depth, name="self_attention")
        x = sublayer("self_attention", lambda y: attn(
            y, mask=self_mask, bias=self_bias, q_positions=positions, decode=decode,
            cache_index=cache_index, deterministic=deterministic, is_causal=self.causal), x)
        if self.has_cross:
            cross = attention_cls(cfg, is_cross=True, residual_layers=depth,
                                  name="cross_attention")
            x = sublayer("cross_attention", lambda y: cross(
                y, encoded, mask=cross_mask, decode=decode, cache_index=cache_index,
                deterministic=deterministic), x)
        ffn = (self.ffn_cls or FeedForward)(cfg, residual_layers=depth, name="mlp")
        x = sublayer("mlp", lambda y: ffn(y, deterministic=deterministic), x)
        x = constrain(x, ("batch", "length", "act_embed"))
        return x, None


class EncoderLayer(TransformerLayer):
    """An encoder layer: bidirectional self-attention + feed-forward."""

    has_cross: bool = False


class DecoderLayer(TransformerLayer):
    """A decoder layer: causal self-attention + cross-attention + feed-forward."""

    has_cross: bool = True
    causal: bool = True


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerStack(nn.Module):
    """`num_layers` TransformerLayers, optionally rematerialised and/or scanned.

    With `config.scan_layers` the layers are one `nn.scan` (parameters stacked on a leading
    `layers` axis), so compile time does not grow with depth; what the layers put in the
    "intermediates" collection (`capture_intermediates`, `sow`) comes back stacked the same
    way, on a leading `[num_layers]` axis.
    """

    config: TransformerConfig
    num_layers: int
    has_cross: bool = False
    layer_cls: Any = None  # a TransformerLayer subclass; None: TransformerLayer

    @nn.compact
    def __call__(self, x: Array, *, encoded=None, self_mask=None, self_bias=None,
                 cross_mask=None, positions=None, decode=False, cache_index=None,
                 deterministic=True, causal=False) -> Array:
        cfg = self.config
        layer_cls = self.layer_cls or TransformerLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat],
                                 prevent_cse=not cfg.scan_layers)
        args = (encoded, self_mask, self_bias, cross_mask, positions, cache_index)
        kwargs = dict(has_cross=self.has_cross, num_layers=self.num_layers, decode=decode,
                      deterministic=deterministic, causal=causal)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "cache": 0, "losses": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * (len(args) + 1), length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="layers", **kwargs)(x, None, *args)
        else:
            for i in range(self.num_layers):
                x, _ = layer_cls(cfg, name=f"layer_{i}", **kwargs)(x, None, *args)
        return x


def shift_right(targets: Array, segment_ids: Array | None = None) -> Array:
    """Decoder inputs from targets `[batch, length]`: shift right by one, 0 (pad) as start token.

    With packed `segment_ids`, each segment starts with 0 instead of the previous segment's
    last token.
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    if segment_ids is not None:
        starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
        shifted = jnp.where(starts, 0, shifted)
    return shifted


def default_positions(ids: Array, offset: int | Array = 0) -> Array:
    """`[batch, length]` positions 0..length-1 (+ offset) for unpacked rows."""
    return jnp.broadcast_to(jnp.arange(ids.shape[1]) + offset, ids.shape)
