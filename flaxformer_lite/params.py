"""Parameter accounting: exact counts, a per-component breakdown, memory and FLOPs.

Counts come from `jax.eval_shape(model.init, ...)`, so they are exact for the code that trains
and allocate no parameter memory. `breakdown` traces the layer stack as one `nn.scan` (the same
parameters, stacked), so even gpt3-175b's 96 layers count in a fraction of a second.

    python -m flaxformer_lite.params gpt2 bert-base gpt3-175b [--json]
    python -m flaxformer_lite.params gpt2 --batch-size 8 [--seq-len 1024]  # + activations

`activation_memory` counts what a train step's backward pass keeps (traced, never allocated).

Published figures (`PUBLISHED`) and where they come from:
- transformer-base / -big: Vaswani et al. 2017, Table 3 ("65M", "213M"). The paper rounds and its
  shared EN-DE BPE vocabulary is "about 37000" tokens; we count 37000, one embedding matrix shared
  by encoder, decoder and pre-softmax projection, sinusoidal positions (no parameters).
- bert-base / -large: Devlin et al. 2019 ("110M", "340M"); the released checkpoints' BertModel
  (embeddings + encoder + pooler, no MLM head) holds exactly 109,482,240 / 335,141,888.
- gpt2: the reference GPT-2 implementation counts 124,439,808 (tied head, learned positions);
  gpt2-medium / -large / -xl: Radford et al. 2019, Table 2 ("345M", "762M", "1542M").
- gpt3-*: Brown et al. 2020, Table 2.1 (125M ... 175.0B).
- t5-small / -base / -large: the released T5 v1.0 checkpoints, which tie the output projection to
  the shared embedding: 60,506,624 / 222,903,552 / 737,668,096 parameters. Raffel et al. 2020
  (section 3.7) rounds these to "60M", "220M" and "770M"; the 770M of t5-large is the checkpoint
  plus an untied 32128 x 1024 output matrix (770,567,168), so we compare with the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import re
import sys
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.config import (
    DTYPES,
    PRESETS,
    TransformerConfig,
    check_whole,
    get_config,
    parse_overrides,
)
from flaxformer_lite.models import dummy_inputs, make_model

PUBLISHED: dict[str, float] = {
    "transformer-base": 65e6,
    "transformer-big": 213e6,
    "bert-base": 109_482_240,
    "bert-large": 340e6,
    "gpt2": 124_439_808,
    "gpt2-medium": 345e6,
    "gpt2-large": 762e6,
    "gpt2-xl": 1542e6,
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "t5-large": 737_668_096,
}

COMPONENTS = ("token_embeddings", "position_embeddings", "type_embeddings", "attention",
              "feed_forward", "norms", "output_head")

# Parameters that are looked up, not multiplied: they cost no FLOPs per token.
_LOOKUP_ONLY = ("position_embeddings", "type_embeddings")


def _component(path: tuple[str, ...]) -> str:
    """Which component a parameter belongs to, from its module path: the library's names,
    and Flax's automatic ones for its layers (`MultiHeadAttention_0`, `FeedForward_1`,
    `Norm_0`: a model of your own with unnamed layers)."""
    path = tuple(re.sub(r"_\d+$", "", p).lower() for p in path)
    joined = "/".join(path)
    if "position_embed" in joined or "relative_bias" in joined:
        return "position_embeddings"
    if "type_embed" in joined:
        return "type_embeddings"
    if "token_embed" in joined:
        return "token_embeddings"
    if any(p.endswith("norm") for p in path):
        return "norms"
    if any("attention" in p for p in path):
        return "attention"
    if "mlp" in path or "feedforward" in path:
        return "feed_forward"
    if any(p in ("logits", "pooler", "classifier") or p.startswith("mlm") for p in path):
        return "output_head"  # untied logits, pooler, classifier, masked-LM head
    return "other"  # a module of your own (a router, experts, ...)


def param_shapes(config: TransformerConfig | str):
    """The parameter pytree as `jax.ShapeDtypeStruct`s (no memory), unboxed."""
    config = get_config(config) if isinstance(config, str) else config
    # Shapes depend neither on the attention kernel (cuDNN's needs a GPU to trace) nor on the
    # input length (2 tokens keep tracing cheap).
    model = make_model(config.replace(attention_implementation="ops"))
    inputs = dummy_inputs(config, batch=1, length=2)
    variables = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, **inputs))
    return nn.meta.unbox(variables["params"])


def breakdown(config: TransformerConfig | str | Mapping) -> dict[str, int]:
    """Parameter count per component (see `COMPONENTS`) plus `"total"`.

    Of `make_model(config)`, traced with `scan_layers=True`: scanning stacks identical layers'
    parameters on a leading axis, so every count is the same while tracing costs one layer
    instead of `num_layers`. Or of a parameter tree (arrays or `ShapeDtypeStruct`s, boxed or
    not: a model of your own, e.g. `jax.eval_shape(model.init, ...)["params"]`), by module
    names as the library's layers use them; what none of them names counts as `"other"`.
    """
    if isinstance(config, Mapping):
        return _tally(nn.meta.unbox(config))
    config = get_config(config) if isinstance(config, str) else config
    return _tally(param_shapes(config.replace(scan_layers=True)))


def _tally(shapes) -> dict[str, int]:
    """Per-component counts of a parameter pytree (of arrays or `ShapeDtypeStruct`s); an
    `"other"` entry only when some parameter belongs to none of `COMPONENTS`."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for path, leaf in jax.tree.leaves_with_path(shapes):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        component = _component(keys)
        counts[component] = counts.get(component, 0) + math.prod(leaf.shape)
    counts["total"] = sum(counts.values())
    return counts


def count(config: TransformerConfig | str | Mapping) -> int:
    """Exact number of parameters of `make_model(config)`, or of a parameter tree."""
    return breakdown(config)["total"]


def matmul_params(config: TransformerConfig | str, counts: dict[str, int] | None = None) -> int:
    """Parameters used in a matrix multiply per token (N in `6N`): all but lookup tables.

    A token table counts only where it is also the output projection: tied, in a model that
    produces logits over the vocabulary (a decoder, or BERT's masked-LM head). Otherwise it is
    only looked up: an untied table (the untied output matrix is in `output_head`), a backbone
    encoder's table without `mlm_head`, and the encoder's own table when an encoder-decoder
    does not share them. BERT's pooler and classifier run once per sequence, not per token:
    left out.
    """
    config = get_config(config) if isinstance(config, str) else config
    counts = breakdown(config) if counts is None else counts
    n = counts["total"] - sum(counts[c] for c in _LOOKUP_ONLY)
    tables = counts["token_embeddings"]
    if not config.tie_embeddings or (config.architecture == "encoder_only"
                                     and not config.mlm_head):
        n -= tables
    elif (config.architecture == "encoder_decoder"
          and not config.share_encoder_decoder_embeddings):
        n -= tables // 2  # two [vocab, d_model] tables; the decoder's is the output projection
    if config.pooler:
        n -= config.d_model * config.d_model + config.d_model  # Dense with a bias
    if config.architecture == "encoder_only" and config.num_classes:  # once a sequence too
        n -= (config.d_model + 1) * config.num_classes
    return n


def flops_per_token(config: TransformerConfig | str, seq_len: int | None = None,
                    counts: dict[str, int] | None = None) -> dict[str, float]:
    """Training FLOPs per token: `6 N` (forward 2N, backward 4N) plus the attention term.

    The attention term is `6 * 2 * layers * seq_len * heads * head_dim` (scores and weighted sum,
    forward and backward, every query against every key: PaLM's appendix B and Chinchilla's
    convention; Kaplan et al. 2020 count half, as if causal masking halved the work), over all
    attention stacks (self and cross). `seq_len` defaults to `config.max_len`. A masked-LM
    head limited to `mlm_predictions` positions counts for those positions only.
    """
    config = get_config(config) if isinstance(config, str) else config
    seq_len = config.max_len if seq_len is None else seq_len
    seq_len = _check_length("seq_len", seq_len, config)
    n = matmul_params(config, counts)
    if config.architecture == "encoder_only" and config.mlm_predictions:
        # The masked-LM head (transform, its norm, the tied output and its bias: every `mlm_*`
        # parameter and the token table) runs at mlm_predictions positions a row.
        shapes = param_shapes(config.replace(scan_layers=True))
        head = config.vocab_size * config.d_model + sum(
            math.prod(x.shape) for key, tree in shapes.items() if key.startswith("mlm")
            for x in jax.tree.leaves(tree))
        n -= head * (1 - min(config.mlm_predictions, seq_len) / seq_len)
    attn_layers = config.encoder_layers + config.decoder_layers * (
        2 if config.architecture == "encoder_decoder" else 1)
    attn = 12 * attn_layers * seq_len * config.num_heads * config.dim_per_head
    return {"params_term": 6.0 * n, "attention_term": float(attn), "total": 6.0 * n + attn}


OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}


def training_memory(config: TransformerConfig | str, *, param_dtype: str | None = None,
                    optimizer: str = "adamw", optimizer_dtype: str | None = None,
                    accumulation_steps: int = 1,
                    counts: dict[str, int] | None = None, batch_size: int | None = None,
                    seq_len: int | None = None, target_len: int | None = None,
                    microbatches: int = 1, platform: str | None = None) -> dict[str, int]:
    """Bytes held across a training step: params, grads, optimizer state, and with
    `batch_size` (the rows of one step, as `train` takes them: the global batch, whose
    activations a data-parallel layout divides among its devices) the activations its backward
    pass keeps (`activation_memory`'s "activations" for rows of `seq_len` tokens, default
    `max_len`; an encoder-decoder's targets `target_len`, default `seq_len`; attention traced
    for `platform`, default this machine's backend).

    `param_dtype` defaults to the config's. The library's optimizers ("adamw", "adafactor"
    with `optimizer_dtype` unset, and `counts` the config's own) are counted exactly: the
    state `training.make_optimizer` builds, from its shapes (Adafactor factors a matrix's
    second moment only where its two largest dimensions are both >= 128 and keeps the others
    whole; an attention kernel counts as the `[embed, heads * head_dim]` matrix it factors
    as). Otherwise Adam keeps two
    moments a parameter and SGD with momentum one, in `optimizer_dtype` (default the
    parameters'). The library's mixed precision (`dtype="bfloat16"` compute, float32
    `param_dtype`) is the float32 layout: 16 bytes a parameter with AdamW.
    `accumulation_steps = k > 1` (`OptimizerConfig`) adds `optax.MultiSteps`' running
    gradient sum ("accumulated_grads"; float32 for bfloat16 parameters, as optax keeps it);
    each of the k steps still holds `batch_size` rows' activations. `microbatches = m`
    (`ParallelConfig`) computes a step's gradient in m slices: activations of
    `batch_size / m` rows, no other state.
    """
    config = get_config(config) if isinstance(config, str) else config
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZER_MOMENTS)}.")
    for name, value in (("accumulation_steps", accumulation_steps),
                        ("microbatches", microbatches)):
        check_whole(name, value, 1)
    param_dtype = config.param_dtype if param_dtype is None else param_dtype
    for name, value in (("param_dtype", param_dtype), ("optimizer_dtype", optimizer_dtype)):
        try:  # a name or a dtype (jnp.bfloat16)
            known = value is None or jnp.dtype(value).name in DTYPES
        except TypeError:
            known = False
        if not known:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(DTYPES)}.")
    if optimizer == "adafactor" and optimizer_dtype is not None:
        raise ValueError(f"optimizer_dtype={optimizer_dtype!r} with optimizer='adafactor': the "
                         "library's Adafactor keeps float32 statistics, counted exactly; leave "
                         "optimizer_dtype unset.")
    counts = breakdown(config) if counts is None else counts
    n = counts["total"]
    pbytes = jnp.dtype(param_dtype).itemsize
    out = {"params": n * pbytes, "grads": n * pbytes}
    exact = (_library_optimizer_bytes(config, param_dtype, optimizer, accumulation_steps, n)
             if optimizer in ("adamw", "adafactor") and optimizer_dtype is None else None)
    if exact is not None:
        out.update(exact)
    else:
        obytes = jnp.dtype(optimizer_dtype or param_dtype).itemsize
        out["optimizer"] = n * obytes * OPTIMIZER_MOMENTS[optimizer]
        if accumulation_steps > 1:
            out["accumulated_grads"] = n * pbytes
    if batch_size is not None:
        rows = batch_size  # anything but a positive whole number: activation_memory says so
        if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool):
            if batch_size % microbatches:
                raise ValueError(f"batch_size={batch_size!r} must be a multiple of "
                                 f"microbatches={microbatches}.")
            rows = batch_size // microbatches
        out["activations"] = activation_memory(config, batch_size=rows, seq_len=seq_len,
                                               target_len=target_len,
                                               platform=platform)["activations"]
    elif seq_len is not None or target_len is not None:
        raise ValueError("seq_len and target_len size the activations: give batch_size too.")
    out["total"] = sum(out.values())
    return out


def _library_optimizer_bytes(config: TransformerConfig, param_dtype: str, optimizer: str,
                             accumulation_steps: int, n: int) -> dict[str, int] | None:
    """The state of `training.make_optimizer` for `config`'s parameters (abstract: nothing
    allocated): "optimizer" and, with accumulation, "accumulated_grads"; None when `n`, the
    parameters counted (`counts` given), is not this config's tree."""
    from flaxformer_lite.training import OptimizerConfig, make_optimizer

    # AdamW's moments mirror each parameter, so the scanned layout (one layer traced, as
    # `breakdown` does) holds the same bytes; Adafactor factors by each array's own shape,
    # so it needs the layout the run trains.
    layout = config.replace(scan_layers=True) if optimizer == "adamw" else config
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype),
                          param_shapes(layout))
    if sum(x.size for x in jax.tree.leaves(shapes)) != n:
        return None

    def state_bytes(k: int) -> int:
        tx = make_optimizer(OptimizerConfig(optimizer=optimizer, accumulation_steps=k,
                                            schedule="constant", warmup_steps=0))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
            tx.init, shapes)))

    plain = state_bytes(1)
    out = {"optimizer": plain}
    if accumulation_steps > 1:
        out["accumulated_grads"] = state_bytes(accumulation_steps) - plain
    return out


def _abstract_batch(config, batch_size, seq_len, target_len):
    ids = lambda n: jax.ShapeDtypeStruct((batch_size, n), jnp.int32)  # noqa: E731
    if config.num_classes:  # a sequence classifier: one label a row
        return {"inputs": ids(seq_len), "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    if config.architecture == "encoder_decoder":
        return {"inputs": ids(seq_len), "targets": ids(target_len)}
    return {"inputs": ids(seq_len), "targets": ids(seq_len)}


def _data_flags(jaxpr, flags):
    """For each outvar of `jaxpr`, whether it depends on an invar flagged True (the batch, the
    dropout key) rather than only on the parameters. Scans and jitted calls are followed
    inside (a scan's stacked per-layer residuals keep the flags of their layer); any other
    primitive with sub-programs counts its outputs data-dependent if any input is."""
    env = {v: f for v, f in zip(jaxpr.invars, flags)}

    def read(v):
        return env.get(v, False) if not isinstance(v, jax.extend.core.Literal) else False

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
            carry = ins[nc:nc + ncarry]
            for _ in range(ncarry + 1):  # a fixpoint over the carry
                out = _data_flags(body, ins[:nc] + carry + ins[nc + ncarry:])
                new = [a or b for a, b in zip(carry, out[:ncarry])]
                if new == carry:
                    break
                carry = new
            outs = carry + out[ncarry:]
        elif name in ("pjit", "jit", "closed_call") and "jaxpr" in eqn.params:
            outs = _data_flags(eqn.params["jaxpr"].jaxpr, ins)
        else:
            outs = [any(ins)] * len(eqn.outvars)
        for v, f in zip(eqn.outvars, outs):
            env[v] = f
    return [read(v) for v in jaxpr.outvars]


def _traced_residuals(config, batch_size, seq_len, target_len, platform):
    """`{"activations": bytes, "weights": bytes}` of the residuals that the train loss's
    backward pass keeps, by tracing `make_model(config)`'s loss with abstract arrays."""
    # Imported here: `training` is a heavy import that counting parameters does not need.
    from flaxformer_lite.ops import attention
    from flaxformer_lite.training import losses, steps

    model = make_model(config)
    dropout = steps.uses_dropout(model)
    args = (param_shapes(config), _abstract_batch(config, batch_size, seq_len, target_len),
            jax.eval_shape(lambda: jax.random.key(0)) if dropout else None)
    loss_config = losses.LossConfig()

    def residuals_of(params, batch, key):
        def loss(params):  # train_step's objective, before dividing by the token count
            if steps.classifies(model):
                return steps.classification_sums(
                    model, params, batch, loss_config=loss_config, deterministic=not dropout,
                    dropout_rng=key)["loss"]
            logits, targets = steps.predictions(model, params, batch, deterministic=not dropout,
                                                dropout_rng=key)
            return losses.metric_sums(logits, targets, steps.target_weights(model, batch, targets),
                                      label_smoothing=loss_config.label_smoothing,
                                      z_loss=loss_config.z_loss)["loss"]
        return jax.vjp(loss, params)[1]  # the backward function: its leaves are the residuals

    with attention.traced_platform(platform):
        closed = jax.make_jaxpr(residuals_of)(*args)
    jaxpr = closed.jaxpr
    n_params = len(jax.tree.leaves(args[0]))
    flags = [i >= n_params for i in range(len(jaxpr.invars))]
    arguments = set(jaxpr.invars)
    out = {"activations": 0, "weights": 0}
    seen = set()
    for v, data in zip(jaxpr.outvars, _data_flags(jaxpr, flags)):
        if isinstance(v, jax.extend.core.Literal) or v in arguments or v in seen:
            continue  # a literal; a parameter or the batch, in memory anyway
        seen.add(v)
        out["activations" if data else "weights"] += _nbytes(v.aval)
    return out


def _nbytes(aval) -> int:
    try:
        itemsize = aval.dtype.itemsize
    except (AttributeError, TypeError):  # a PRNG key: its key data
        itemsize = jax.random.key_data(jax.random.key(0)).nbytes
    return math.prod(aval.shape) * itemsize


def _check_length(name: str, value, config: TransformerConfig) -> int:
    check_whole(name, value, 1, config.max_len, why=f" (max_len={config.max_len}; raise the "
                "config's max_len for longer sequences)")
    return int(value)  # a NumPy integer gave NumPy results


def activation_memory(config: TransformerConfig | str, *, batch_size: int,
                      seq_len: int | None = None, target_len: int | None = None,
                      platform: str | None = None) -> dict[str, int]:
    """Bytes of the residuals that the train step's backward pass keeps from its forward pass,
    for `batch_size` rows of `seq_len` tokens (default `max_len`; an encoder-decoder's targets
    `target_len`, default `seq_len`). Nothing is allocated.

    What is counted: `make_model(config)`'s train loss (the train step's `predictions` and
    cross-entropy, dropout when the config has it) is traced with abstract arrays
    (`jax.ShapeDtypeStruct`), its backward function taken with `jax.vjp` with respect to the
    parameters, and the residuals that function closes over summed (the arrays
    `jax.ad_checkpoint.print_saved_residuals` lists), less the arguments (parameters and
    batch, in memory anyway). So it follows the config's
    dtype, remat policy, `scan_layers` (a scan's residuals come out stacked over its layers),
    fused QKV, grouped-query heads, activation and attention implementation. Attention is
    traced for `platform` (default: JAX's default backend; "gpu" to size a GPU run from a
    CPU host), whose path it takes: the CPU path keeps the output and two float32 row
    statistics, as FlashAttention does; the others keep the `[batch, heads, q, kv]` softmax
    (2.5x the estimate of gpt2 at batch 32 x 1024 without attention dropout), except
    `attention_implementation="cudnn"`, whose fused kernel keeps what the CPU path does and is
    traced as it. A classifier (`num_classes`) is traced with its classification loss.

    Returns:
      `per_layer` (decoder-only, encoder-only) or `per_encoder_layer` and `per_decoder_layer`:
      one layer's residuals; `layers`: all layers'; `embeddings_and_head`: the rest (embedding
      output, final norm, logits' softmax, loss); `activations`: the two together, the
      figure that grows with the batch (`training_memory`'s "activations"), and `total`;
      beside them, not added, `weights_and_constants`: residuals computed without the batch
      (parameters reshaped or cast to the compute dtype, the tied table transposed, a
      dropout's broadcast zeros), which XLA keeps as views of the parameters, folds or
      fuses: at the jaxpr level they are arrays, in a compiled step mostly not (a bfloat16
      copy of the weights may be).

    The layers are traced with one and two layers per stack (a 96-layer model costs what a
    2-layer one does) and extrapolated: every layer keeps the same residuals, so the count is
    linear in the depth (the tests check it against tracing every layer).

    Per layer, with `p` the compute dtype's bytes, `b` rows, `s` their length (`t` the
    decoder's, `s` the source's, in an encoder-decoder), `d` = d_model, `a` = heads x
    head_dim, `a_kv` = kv_heads x head_dim, `f` = d_ff, `h` heads, the CPU attention path,
    no dropout, `remat="none"`, LayerNorm and GELU or ReLU (RMSNorm, SiLU and the gated
    activations keep more, e.g. RMSNorm two float32 `[b, s, d]` arrays a norm: traced, not in
    the formula):

        self-attention   p b s (2 d + 3 a + 2 a_kv) + 8 b s + 8 b h s   [+ b s^2 mask]
        cross-attention  p b (t (2 d + 3 a) + 2 s a_kv) + 8 b t + 8 b h t   [+ b t s mask]
        feed-forward     p b s (2 d + 2 f) + 8 b s   (relu: p b s (2 d + f) + b s f + 8 b s)

    Per attention: the sub-layer's input and its norm's input or output (2 d), q, k and v,
    the output and its reshape for the output projection (q, o, o: 3 a), float32 row max and
    sum (8 b h s) and the boolean mask (1 byte, where there is a padding mask; a scanned
    stack keeps one for all layers); per norm float32 mean and 1/std (8 b s); the
    feed-forward's activation input and output (2 f; ReLU keeps its output and a boolean
    mask). GPT-2 in float32 (b = 8, s = 1024, d = 768, f = 3072, h = 12): 4 b s (9 d + 2 f) +
    16 b s + 8 b h s + b s^2 = 437 MB a layer, against Korthikanti et al.'s (2022) s b d
    (34 + 5 h s / d) = 717 MB (16-bit, dropout masks and the softmax kept). The presets'
    dropout adds masks and, with attention dropout, takes the plain attention path that keeps
    the softmax: gpt2 as published, 1.42 GB a layer. `remat="full"` keeps the
    layer's input alone, p b s d.

    What it is not: XLA's peak. These are residuals at the jaxpr level. XLA may fuse or
    rematerialise them (a reshape is a view, the attention output and its reshape one buffer),
    adds the backward pass's own temporaries, the gradients being built and workspace, and
    on XLA:CPU without `scan_layers` does not free rematerialised layers' buffers early
    (docs/performance.md compares this estimate with compiled train steps).
    """
    config = get_config(config) if isinstance(config, str) else config
    check_whole("batch_size", batch_size, 1)
    seq_len = config.max_len if seq_len is None else seq_len
    seq_len = _check_length("seq_len", seq_len, config)
    if config.architecture != "encoder_decoder" and target_len is not None:
        raise ValueError(f"target_len applies to architecture='encoder_decoder', not "
                         f"{config.architecture!r}: its targets are seq_len long.")
    target_len = seq_len if target_len is None else target_len
    target_len = _check_length("target_len", target_len, config)
    if config.architecture == "encoder_only" and not (config.mlm_head or config.num_classes):
        raise ValueError("An encoder_only config trains its masked-LM head (mlm_head=True) or a "
                         "classifier (num_classes > 0); this one has neither, so there is no "
                         "train step to estimate.")
    platform = jax.default_backend() if platform is None else platform
    if config.attention_implementation == "cudnn":
        # cuDNN's fused attention keeps the output and its row statistics, as the CPU path
        # (FlashAttention's scheme) does: traced in its place, it needs no GPU here.
        config, platform = config.replace(attention_implementation="ops"), "cpu"

    def traced(**layers):
        return _traced_residuals(config.replace(**layers), batch_size, seq_len, target_len,
                                 platform)

    if config.architecture == "encoder_decoder":
        stacks = {"encoder": ("num_encoder_layers", config.encoder_layers),
                  "decoder": ("num_decoder_layers", config.decoder_layers)}
    else:
        stacks = {"": ("num_layers", config.num_layers)}
    one = {field: 1 for field, _ in stacks.values()}
    base = traced(**one)
    rest = dict(base)  # base less one layer of each stack: what lies outside the stacks
    out: dict[str, int] = {}
    layers = {"activations": 0, "weights": 0}
    for stack, (field, depth) in stacks.items():
        two = traced(**{**one, field: 2})
        per = {k: two[k] - base[k] for k in layers}
        out[f"per_{stack}_layer" if stack else "per_layer"] = per["activations"]
        for k in layers:
            layers[k] += depth * per[k]
            rest[k] -= per[k]
    base = rest
    out["layers"] = layers["activations"]
    out["embeddings_and_head"] = base["activations"]
    out["activations"] = out["layers"] + out["embeddings_and_head"]
    out["weights_and_constants"] = layers["weights"] + base["weights"]
    out["total"] = out["activations"]
    return out


@dataclasses.dataclass
class Report:
    name: str
    counts: dict[str, int]
    published: float | None
    flops: dict[str, float]
    memory: dict[str, int]

    def to_json(self) -> dict:
        return {"name": self.name, "total": self.counts["total"], "breakdown": self.counts,
                "published": self.published,
                "relative_error": None if not self.published else
                (self.counts["total"] - self.published) / self.published,
                "flops_per_token": self.flops, "training_memory_bytes": self.memory}


def report(config: TransformerConfig | str, name: str | None = None, *,
           batch_size: int | None = None, seq_len: int | None = None,
           platform: str | None = None) -> Report:
    """Counts, FLOPs per token at `seq_len` (default `max_len`) and training memory (with the
    activations of `batch_size` rows when given, attention traced for `platform`) of a preset
    (by name) or of any config (`name` labels it; default "custom"); a preset's published
    count if known."""
    if isinstance(config, str):
        name = config if name is None else name
        published = PUBLISHED.get(config)
        config = get_config(config)
    else:
        name, published = name or "custom", None
    counts = breakdown(config)
    if config.architecture == "encoder_only" and not (config.mlm_head or config.num_classes):
        batch_size = None  # a backbone without a training head: no train loss to trace
    return Report(name, counts, published,
                  flops_per_token(config, seq_len=seq_len, counts=counts),
                  training_memory(config, counts=counts, batch_size=batch_size,
                                  seq_len=seq_len if batch_size else None, platform=platform))


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_table(reports: Sequence[Report]) -> str:
    cols = ["name", "total", "published", "err%", "embed", "pos", "attention", "ffn", "norms",
            "head", "train GFLOP/tok", "Adam mem"]
    batched = any("activations" in r.memory for r in reports)
    if batched:
        cols += ["activations", "total mem"]
    rows = []
    for r in reports:
        c = r.counts
        err = "" if not r.published else f"{100 * (c['total'] - r.published) / r.published:+.2f}"
        rows.append([r.name, f"{c['total']:,}", _human(r.published) if r.published else "",
                     err, _human(c["token_embeddings"] + c["type_embeddings"]),
                     _human(c["position_embeddings"]), _human(c["attention"]),
                     _human(c["feed_forward"]), _human(c["norms"]), _human(c["output_head"]),
                     f"{r.flops['total'] / 1e9:.3g}",
                     f"{(r.memory['total'] - r.memory.get('activations', 0)) / 2**30:.1f} GiB"])
        if batched:
            act = r.memory.get("activations")
            rows[-1] += (["n/a", ""] if act is None else
                         [f"{act / 2**30:.1f} GiB", f"{r.memory['total'] / 2**30:.1f} GiB"])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxformer_lite.params",
        description="Exact parameter counts, breakdown, training memory and FLOPs per token.")
    parser.add_argument("names", nargs="*",
                        help=f"preset names (default: all): {', '.join(PRESETS)}")
    parser.add_argument("--set", default="", metavar="FIELD=VALUE,...",
                        help="TransformerConfig fields changed in every named preset, e.g. "
                             "num_kv_heads=4,max_len=2048 (a hypothetical model)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="add the activations the backward pass keeps for B rows "
                             "(params.activation_memory)")
    parser.add_argument("--platform", default=None, choices=("cpu", "gpu", "tpu"),
                        help="whose attention path the activations trace (default: this "
                             "machine's backend; gpu to size a GPU run from a CPU host)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="S",
                        help="tokens a row for FLOPs and activations (default: max_len)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    names = args.names or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown config name(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    try:
        changes = parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    try:
        configs = [(get_config(n, **changes), f"{n} ({args.set})") if changes else (n, None)
                   for n in names]
    except (TypeError, ValueError) as e:
        parser.error(f"--set: {e}")
    try:
        reports = [report(c, name=label, batch_size=args.batch_size, seq_len=args.seq_len,
                          platform=args.platform) for c, label in configs]
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        print(format_table(reports))
        at = f"seq_len {args.seq_len}" if args.seq_len else "max_len"
        platform = args.platform or jax.default_backend()
        print(f"\ntrain GFLOP/tok = 6 N + attention term at {at}; Adam mem = params + grads + "
              "AdamW's state as training.make_optimizer builds it, in the config's param_dtype "
              "(float32 in the presets)"
              + ("; activations excluded (--batch-size adds them)." if args.batch_size is None
                 else
                 f"; activations = what the backward pass keeps for {args.batch_size} rows at "
                 f"{at}, attention traced for {platform} (params.activation_memory: jaxpr "
                 "residuals, a lower bound on XLA's peak; n/a: an encoder without a training "
                 "head); total mem = the two. remat saves memory on XLA:CPU only with "
                 "scan_layers=True."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
