"""One frozen, hashable model config, validated at construction, plus named presets.

`TransformerConfig` describes every architecture the library builds: the encoder-decoder of
Vaswani et al. (2017), decoder-only GPT-2/GPT-3, encoder-only BERT and T5. Because it is a frozen
dataclass it is hashable, so it can be a static argument of `jax.jit` and a field of a Flax module.

Every check raises `ValueError` naming the field and what is allowed, before anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

ARCHITECTURES = ("encoder_decoder", "decoder_only", "encoder_only")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu")
POSITIONS = ("sinusoidal", "learned", "rotary", "relative", "alibi", "none")
NORMS = ("layer", "rms")
NORM_POSITIONS = ("pre", "post")
ATTENTION_IMPLEMENTATIONS = ("ops", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
PADDINGS = ("anywhere", "trailing")
INITS = ("gpt2", "bert", "t5")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of one Transformer; see the module docstring.

    Sizes: `d_model` is the residual width, `num_heads * head_dim` the attention width
    (`head_dim` defaults to `d_model // num_heads`), `d_ff` the feed-forward hidden width.
    `num_kv_heads` below `num_heads` gives grouped-query attention (1 = multi-query).
    """

    architecture: str = "decoder_only"
    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 512
    num_layers: int = 4  # decoder layers (decoder_only) or encoder layers (encoder_only)
    num_encoder_layers: int | None = None  # encoder_decoder only; default num_layers
    num_decoder_layers: int | None = None  # encoder_decoder only; default num_layers
    max_len: int = 256
    activation: str = "gelu"  # exact GELU; "gelu_tanh" the tanh form; "geglu" gates with tanh
    # "learned" absolute table (max_len rows), "sinusoidal" (Vaswani), "rotary" (RoFormer),
    # "relative" (T5's learned buckets), "alibi" (Press et al. 2022: fixed linear biases, no
    # parameters), or "none"; only "learned" ties the model to max_len.
    position: str = "learned"
    norm: str = "layer"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's learned bias (nanoGPT's bias=False drops it too)
    use_bias: bool = True
    final_norm: bool = True  # a norm after the last layer (pre-LN models need it)
    tie_embeddings: bool = True  # output projection = input embedding matrix transposed
    share_encoder_decoder_embeddings: bool = True  # encoder_decoder: one shared table
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani)
    type_vocab_size: int = 0  # BERT token-type (segment A/B) embeddings; 0 = none
    embedding_norm: bool = False  # a norm right after the summed embeddings (BERT)
    pooler: bool = False  # BERT pooler (dense + tanh on the first token)
    mlm_head: bool = False  # BERT masked-LM head (dense + act + norm + tied decoder)
    # Training and eval steps apply the masked-LM head only at the (at most) this many selected
    # positions of each row, not at every position (BERT's max_predictions_per_seq: 20 of 128
    # tokens, 80 of 512); 0 = every position. Rows selecting more are refused by check_batch;
    # `mlm_pipeline(max_predictions=...)` caps its masking to fit.
    mlm_predictions: int = 0
    # Sequence classification (encoder_only, needs `pooler`): > 0 adds BERT's classifier,
    # dropout + Dense(num_classes) on the pooled first token, whose `class_logits`
    # `[batch, num_classes]` the train and eval steps score against `batch["labels"]`
    # `[batch]` (cross-entropy per example) instead of the masked-LM targets. 0 = none.
    num_classes: int = 0
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rotary_base: float = 10000.0
    rotary_fraction: float = 1.0  # fraction of head_dim rotated
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    final_dropout: bool = False  # dropout after the last layer (and final norm): T5 has it
    # Dropout also on the feed-forward's hidden activation `[batch, length, d_ff]` (T5; also
    # tensor2tensor's `relu_dropout` and Flax's WMT example). GPT-2, BERT and the paper drop
    # only the sub-layer outputs.
    ffn_hidden_dropout: bool = False
    # Multiplier of q . k; None = head_dim**-0.5. T5 uses 1.0 with the 1/sqrt(head_dim) folded
    # into the query's initialisation, which the library then does too (same function at init).
    attention_scale: float | None = None
    scale_tied_logits: bool = False  # tied output head reads x * d_model**-0.5 (T5)
    # How parameters start (`layers.kernel_init`): "gpt2" N(0, init_std), residual-branch
    # output projections divided by sqrt(2 * layers); "bert" N(0, init_std) truncated at two
    # standard deviations (TF's initializer), nothing divided; "t5" variance scaling by fan-in
    # (T5X), token embeddings N(0, 1), `init_std` unused.
    init: str = "gpt2"
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_implementation: str = "ops"
    # Where a decoder-only model's unpacked rows may hold padding (id 0). "trailing": only
    # after a row's last token, so causal self-attention needs no padding mask (a real token
    # never sees a later key): `is_causal` alone, exact at every real position, which lets
    # cuDNN run its causal kernel instead of reading a [batch, 1, length, length] bias.
    # Rows with segment ids or positions given (packed) keep their mask either way. With
    # "anywhere", learned and sinusoidal positions count a row's tokens, so a left-padded row
    # scores as it would unpadded.
    padding: str = "anywhere"
    # The token id of padding in a decoder-only model: no loss, never generated, not attended
    # where segment ids come from the ids. None: every id is a real token (a pretrained
    # vocabulary without a padding token, GPT-2's, whose id 0 is "!"): padded rows then carry
    # `segment_ids` (0 on padding: no attention, no loss; without them every target counts),
    # and prompts `prompt_lengths`. Encoders and encoder-decoders keep 0 (their sources and
    # masked-LM targets).
    pad_id: int | None = 0
    # The end-of-sequence id, decoding's default stop token (`generate`'s `stop_tokens`,
    # `beam_search`'s `eos_id`) for decoder-only and encoder-decoder models. None: the library
    # tokenizers' EOS (1); with `pad_id=None` (a vocabulary of its own, where 1 is an ordinary
    # token) none, and decoding asks for one. `convert.load_gpt2` sets GPT-2's <|endoftext|>.
    eos_id: int | None = None
    # Rematerialise each layer in the backward pass (`nn.remat`): "none"; "full" keeps only the
    # layer's input (the least memory kept between the layers, the forward recomputed; at long
    # context attention's own temporaries dominate, which no policy shrinks, and the
    # recomputation can raise the peak: `scan_layers` lowers it there); "dots" also keeps the matmul
    # outputs (`checkpoint_dots`); "dots_no_batch" those without a batch dimension, i.e. the
    # projections but not attention's score and weighted-sum products. On XLA:CPU it saves
    # memory only with `scan_layers=True` (unscanned, the compiled step keeps its buffers and
    # adds the recomputation; the Engine warns).
    remat: str = "none"
    # One `nn.scan` over the layers: parameters stacked on a leading [num_layers] axis (one
    # compiled layer, faster compiles of deep models). `stack_layers` / `unstack_layers`
    # convert parameters between the two layouts; `Engine.init_state(params=)` does it itself.
    # The same seed initialises the two layouts differently (the random keys split another way):
    # to compare them, start both from one set of parameters.
    scan_layers: bool = False
    # Barrier on each dense layer's incoming gradient (`ops.matmul`): it halved XLA:CPU's step
    # before the fast paths in `ops.fast_paths` existed; with them it measures neutral on small
    # models and 10% slower on larger ones, so it is off unless asked for.
    matmul_barrier: bool = False
    fused_qkv: bool = True  # one projection for q, k, v in self-attention
    # The output head (tied or untied, and BERT's masked-LM decoder) multiplies as if the
    # vocabulary were padded with zero rows to a multiple of this (0: off); parameters and
    # logits keep `vocab_size` and the same values.
    # GPT-2's 50,257 columns make the step's largest matmul misaligned on GPUs: 128 is the
    # setting for accelerators (see docs/performance.md).
    vocab_pad_multiple: int = 0

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.bfloat16, Flax's spelling, as its name
            value = getattr(self, name)
            if not isinstance(value, str):
                try:
                    object.__setattr__(self, name, jnp.dtype(value).name)
                except TypeError:
                    pass
        plain_fields(self)
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def encoder_layers(self) -> int:
        if self.architecture == "decoder_only":
            return 0
        if self.architecture == "encoder_only":
            return self.num_layers
        return self.num_encoder_layers if self.num_encoder_layers is not None else self.num_layers

    @property
    def decoder_layers(self) -> int:
        if self.architecture == "encoder_only":
            return 0
        if self.architecture == "decoder_only":
            return self.num_layers
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu", "reglu")

    def replace(self, **changes) -> TransformerConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plain_fields(config: Any) -> None:
    """Replace a frozen dataclass's NumPy scalar fields with Python ones (np.int64(2) -> 2),
    so that configs built from NumPy values hash, compare and record (config.json) the same as
    configs of plain values. Shared by the library's configs."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
            object.__setattr__(config, f.name, value.item())


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"TransformerConfig.{name}={value!r} is not one of {', '.join(allowed)}.")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TransformerConfig.{name}={value!r} must be a positive integer.")


def check_number(owner: str, name: str, value: Any, low: float, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 hint: str = "") -> None:
    """`value` a finite number (an integer if `integer`) from `low` to `high` (ends closed
    unless `*_open`), else a ValueError naming `owner.name`. Shared by the library's configs."""
    ok = (isinstance(value, numbers.Integral if integer else numbers.Real)
          and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        kind = "an integer" if integer else "a finite number"
        where = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                 if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}")
        raise ValueError(f"{owner}.{name}={value!r} must be {kind} {where}{hint}.")


def check_whole(name: str, value: Any, low: int, high: float = math.inf, why: str = "") -> None:
    """`value` a whole number (a Python or NumPy integer, not a bool) from `low` to `high`,
    else a ValueError naming `name`. For the sizes functions take as arguments (a float 2.0
    passed such checks and failed later, in an obscure TypeError)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not low <= value <= high):
        where = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{name}={value!r} must be a whole number {where}{why}.")


def _real(name: str, value: Any, low: float, high: float = math.inf, **kw) -> None:
    check_number("TransformerConfig", name, value, low, high, **kw)


BOOL_FIELDS = ("norm_bias", "use_bias", "final_norm", "tie_embeddings",
               "share_encoder_decoder_embeddings", "scale_embeddings", "embedding_norm",
               "pooler", "mlm_head", "scan_layers", "matmul_barrier", "fused_qkv",
               "final_dropout", "ffn_hidden_dropout", "scale_tied_logits")


def _validate(c: TransformerConfig) -> None:
    _choice("architecture", c.architecture, ARCHITECTURES)
    _choice("activation", c.activation, ACTIVATIONS)
    _choice("position", c.position, POSITIONS)
    _choice("norm", c.norm, NORMS)
    _choice("norm_position", c.norm_position, NORM_POSITIONS)
    _choice("attention_implementation", c.attention_implementation, ATTENTION_IMPLEMENTATIONS)
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) == "float64":
            raise ValueError(
                f"TransformerConfig.{name}='float64' is not supported: the kernels compute "
                "scores, norms, activations' derivatives and weight gradients in float32, so "
                "the model would run at float32 precision under float64 labels. Use float32 "
                "(the tests check it against float64 NumPy references).")
    _choice("dtype", c.dtype, DTYPES)
    _choice("init", c.init, INITS)
    _choice("param_dtype", c.param_dtype, DTYPES)
    _choice("remat", c.remat, REMAT_POLICIES)
    _choice("padding", c.padding, PADDINGS)
    if c.pad_id is not None and (not isinstance(c.pad_id, int) or isinstance(c.pad_id, bool)
                                 or not 0 <= c.pad_id < c.vocab_size):
        raise ValueError(f"TransformerConfig.pad_id={c.pad_id!r} must be a token id in "
                         f"[0, vocab_size={c.vocab_size}) or None (no padding token).")
    if c.eos_id is not None and (not isinstance(c.eos_id, int) or isinstance(c.eos_id, bool)
                                 or not 0 <= c.eos_id < c.vocab_size):
        raise ValueError(f"TransformerConfig.eos_id={c.eos_id!r} must be a token id in "
                         f"[0, vocab_size={c.vocab_size}) or None (the library's EOS id 1).")
    pad = c.pad_id if c.architecture == "decoder_only" else 0
    if c.eos_id is not None and c.eos_id == pad:
        raise ValueError(f"TransformerConfig.eos_id={c.eos_id} is the padding id, which "
                         "decoding never emits, so it could never end a sequence: name the "
                         "vocabulary's end-of-sequence token.")
    if (not isinstance(c.vocab_pad_multiple, int) or isinstance(c.vocab_pad_multiple, bool)
            or c.vocab_pad_multiple < 0):
        raise ValueError(f"TransformerConfig.vocab_pad_multiple={c.vocab_pad_multiple!r} must be "
                         "0 (off) or a positive integer such as 128.")
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_len",
                 "relative_num_buckets", "relative_max_distance"):
        _positive(name, getattr(c, name))
    for name in ("num_kv_heads", "head_dim", "num_encoder_layers", "num_decoder_layers"):
        _positive(name, getattr(c, name), allow_none=True)
    if c.vocab_size < 2:
        raise ValueError(f"TransformerConfig.vocab_size={c.vocab_size} must be at least 2: one "
                         "token leaves nothing to predict.")
    if c.head_dim is None and c.d_model % c.num_heads:
        raise ValueError(
            f"TransformerConfig.d_model={c.d_model} is not divisible by num_heads={c.num_heads}; "
            "choose num_heads dividing d_model, or set head_dim explicitly.")
    if c.num_heads % c.kv_heads:
        raise ValueError(
            f"TransformerConfig.num_heads={c.num_heads} is not divisible by "
            f"num_kv_heads={c.kv_heads}; grouped-query attention needs whole groups.")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"TransformerConfig.{name}={getattr(c, name)!r} must be True or "
                             "False.")
    if c.position == "sinusoidal" and c.d_model % 2:
        raise ValueError(f"TransformerConfig.d_model={c.d_model} must be even for "
                         "position='sinusoidal' (sine and cosine halves).")
    if c.position == "rotary":
        _real("rotary_base", c.rotary_base, 1.0, low_open=True)  # 1: every pair at one rate
        _real("rotary_fraction", c.rotary_fraction, 0.0, 1.0, low_open=True)
        rotated = int(c.dim_per_head * c.rotary_fraction)
        if rotated < 2 or rotated % 2:
            raise ValueError(
                f"TransformerConfig.rotary_fraction={c.rotary_fraction} must rotate an even "
                f"number (at least 2) of the head_dim={c.dim_per_head} dimensions; it rotates "
                f"{rotated}.")
    if c.position == "relative":
        # Half the buckets (a quarter per direction in the encoder) hold exact distances; the
        # logarithmic rest needs max_distance beyond them (T5: 32 buckets, distance 128).
        exact = c.relative_num_buckets // (2 if c.decoder_layers else 4)
        if c.relative_num_buckets < 4 or c.relative_max_distance <= exact:
            raise ValueError(
                f"TransformerConfig.relative_num_buckets={c.relative_num_buckets} and "
                f"relative_max_distance={c.relative_max_distance}: need at least 4 buckets and "
                f"a max distance above the {exact} exact-distance buckets (T5 uses 32 and "
                "128).")
    for name in ("dropout_rate", "attention_dropout_rate"):
        _real(name, getattr(c, name), 0.0, 1.0, high_open=True)
    _real("norm_eps", c.norm_eps, 0.0, low_open=True)
    if c.attention_scale is not None:
        _real("attention_scale", c.attention_scale, 0.0, low_open=True)
    _real("init_std", c.init_std, 0.0)
    if c.architecture != "encoder_only" and (c.pooler or c.mlm_head or c.type_vocab_size):
        raise ValueError(
            "TransformerConfig.pooler, mlm_head and type_vocab_size belong to "
            f"architecture='encoder_only', not {c.architecture!r}.")
    if (not isinstance(c.type_vocab_size, int) or isinstance(c.type_vocab_size, bool)
            or c.type_vocab_size < 0):
        raise ValueError(f"TransformerConfig.type_vocab_size={c.type_vocab_size!r} must be an "
                         "integer >= 0 (0: no token types; BERT uses 2).")
    if c.architecture != "encoder_decoder" and (
            c.num_encoder_layers is not None or c.num_decoder_layers is not None):
        raise ValueError(
            "TransformerConfig.num_encoder_layers / num_decoder_layers apply to "
            f"architecture='encoder_decoder'; use num_layers for {c.architecture!r}.")
    if c.scale_tied_logits and (c.architecture == "encoder_only" or not c.tie_embeddings):
        raise ValueError("TransformerConfig.scale_tied_logits scales what a decoder's tied "
                         "output head reads; it needs a decoder and tie_embeddings=True. For "
                         "an untied head (T5 v1.1: get_config('t5-small', "
                         "tie_embeddings=False, ...)) also set scale_tied_logits=False.")
    if (not isinstance(c.mlm_predictions, int) or isinstance(c.mlm_predictions, bool)
            or c.mlm_predictions < 0):
        raise ValueError(f"TransformerConfig.mlm_predictions={c.mlm_predictions!r} must be an "
                         "integer >= 0 (0: the head at every position).")
    if c.mlm_predictions and not c.mlm_head:
        raise ValueError("TransformerConfig.mlm_predictions limits the masked-LM head; it needs "
                         "mlm_head=True.")
    if c.mlm_predictions > c.max_len:
        raise ValueError(f"TransformerConfig.mlm_predictions={c.mlm_predictions} exceeds "
                         f"max_len={c.max_len}; at most a row's length.")
    if c.mlm_head and not c.tie_embeddings:
        raise ValueError("TransformerConfig.mlm_head needs tie_embeddings=True (BERT ties them).")
    if (not isinstance(c.num_classes, int) or isinstance(c.num_classes, bool)
            or c.num_classes < 0):
        raise ValueError(f"TransformerConfig.num_classes={c.num_classes!r} must be an integer "
                         ">= 0 (0: no classifier; 2 for SST-2).")
    if c.num_classes == 1:
        raise ValueError("TransformerConfig.num_classes=1: a classifier needs at least 2 "
                         "classes (a softmax over one class is always right); 0 turns it off.")
    if c.num_classes and c.mlm_head:
        raise ValueError(f"TransformerConfig.num_classes={c.num_classes} with mlm_head=True: the "
                         "steps train the classifier alone, so the masked-LM head would ride "
                         "along untrained (and shrink under weight decay); set mlm_head=False "
                         "(merge_params leaves a masked-LM run's head out) or num_classes=0.")
    if c.num_classes and c.architecture == "encoder_only" and not c.pooler:
        raise ValueError(f"TransformerConfig.num_classes={c.num_classes} needs pooler=True: "
                         "the classifier reads the pooled first token, as BERT's does; set "
                         "pooler=True (the bert presets have it), or num_classes=0.")
    _check_no_effect(c)


# Fields that only one setting of another field reads: a value other than the default under
# any other setting would be ignored, which is nearly always a mistake (a sweep over
# `rotary_base` of a model with learned positions trains the same model each time).
_USED_ONLY_WITH = {
    "rotary_base": ("position", ("rotary",)),
    "rotary_fraction": ("position", ("rotary",)),
    "init_std": ("init", ("gpt2", "bert")),
    "relative_num_buckets": ("position", ("relative",)),
    "relative_max_distance": ("position", ("relative",)),
    "share_encoder_decoder_embeddings": ("architecture", ("encoder_decoder",)),
    "padding": ("architecture", ("decoder_only",)),
    "pad_id": ("architecture", ("decoder_only",)),
    "eos_id": ("architecture", ("decoder_only", "encoder_decoder")),
    "num_classes": ("architecture", ("encoder_only",)),
}


def _check_no_effect(c: TransformerConfig) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    for name, (owner, values) in _USED_ONLY_WITH.items():
        if getattr(c, owner) not in values and getattr(c, name) != defaults[name]:
            raise ValueError(
                f"TransformerConfig.{name}={getattr(c, name)!r} has no effect with "
                f"{owner}={getattr(c, owner)!r}: it applies to {owner}="
                f"{' or '.join(map(repr, values))}. Set {owner} too, or leave {name} at its "
                f"default ({defaults[name]!r}).")
    if c.attention_implementation != "ops" and c.attention_dropout_rate > 0:
        raise ValueError(
            f"TransformerConfig.attention_implementation={c.attention_implementation!r} has no "
            f"attention dropout, but attention_dropout_rate={c.attention_dropout_rate}: set "
            "attention_dropout_rate=0.0 (gpu_config does when it picks cuDNN), or keep "
            "attention_implementation='ops'.")


# ---- presets ---------------------------------------------------------------------------------
# Each preset names its source; params.PUBLISHED holds the parameter count that source reports.

def _vaswani(d_model, d_ff, num_heads, dropout):
    # Vaswani et al. 2017, Table 3. Post-LN, sinusoidal positions, ReLU, one embedding matrix
    # shared by encoder, decoder and the pre-softmax projection, scaled by sqrt(d_model).
    # Vocabulary: the paper's shared EN-DE byte-pair vocabulary of "about 37000 tokens".
    return TransformerConfig(
        architecture="encoder_decoder", vocab_size=37000, d_model=d_model, num_heads=num_heads,
        d_ff=d_ff, num_layers=6, max_len=512, activation="relu", position="sinusoidal",
        norm="layer", norm_position="post", norm_eps=1e-6, final_norm=False,
        scale_embeddings=True, dropout_rate=dropout, attention_dropout_rate=0.0)


def _bert(d_model, num_layers, num_heads):
    # Devlin et al. 2019 (BERT); the released uncased checkpoints' config: WordPiece 30522,
    # 512 positions, 2 token types, post-LN with eps 1e-12, GELU, pooler. `mlm_head` is off so the
    # preset is the published backbone (embeddings + encoder + pooler); MLM training turns it on.
    # Every weight starts from a normal of std 0.02 truncated at two std (`init="bert"`).
    return TransformerConfig(
        architecture="encoder_only", vocab_size=30522, d_model=d_model, num_heads=num_heads,
        d_ff=4 * d_model, num_layers=num_layers, max_len=512, activation="gelu",
        position="learned", norm="layer", norm_position="post", norm_eps=1e-12,
        final_norm=False, type_vocab_size=2, embedding_norm=True, pooler=True, dropout_rate=0.1,
        attention_dropout_rate=0.1, init="bert")


def _gpt(d_model, num_layers, num_heads, max_len):
    # GPT-2 (Radford et al. 2019) and GPT-3 (Brown et al. 2020, Table 2.1): pre-LN, learned
    # positions, GELU, d_ff = 4 d_model, BPE vocabulary 50257, output head tied to the embedding.
    return TransformerConfig(
        architecture="decoder_only", vocab_size=50257, d_model=d_model, num_heads=num_heads,
        d_ff=4 * d_model, num_layers=num_layers, max_len=max_len, activation="gelu_tanh",
        position="learned", norm="layer", norm_position="pre", norm_eps=1e-5,
        dropout_rate=0.1, attention_dropout_rate=0.1)


def _t5(d_model, d_ff, num_layers, num_heads):
    # Raffel et al. 2020 (T5 v1.0 checkpoints): relative position buckets (32, max distance 128),
    # RMS norm without bias, no dense biases, ReLU, head_dim 64 (d_model / num_heads in these
    # sizes, so left derived: a shrunk preset shrinks its heads), SentencePiece vocab 32128,
    # one embedding shared by encoder, decoder and the (tied) output projection, which reads
    # the decoder output scaled by d_model**-0.5; unscaled q . k; dropout 0.1 everywhere,
    # attention weights and the stacks' outputs included. Initialised as T5X does (`init="t5"`).
    return TransformerConfig(
        architecture="encoder_decoder", vocab_size=32128, d_model=d_model, num_heads=num_heads,
        d_ff=d_ff, num_layers=num_layers, max_len=512, activation="relu",
        position="relative", norm="rms", norm_position="pre", norm_eps=1e-6, use_bias=False,
        scale_embeddings=False, relative_num_buckets=32, relative_max_distance=128,
        dropout_rate=0.1, attention_dropout_rate=0.1, final_dropout=True,
        ffn_hidden_dropout=True, attention_scale=1.0, scale_tied_logits=True, init="t5")


PRESETS: dict[str, TransformerConfig] = {
    "transformer-base": _vaswani(512, 2048, 8, 0.1),
    "transformer-big": _vaswani(1024, 4096, 16, 0.3),
    "bert-base": _bert(768, 12, 12),
    "bert-large": _bert(1024, 24, 16),
    "gpt2": _gpt(768, 12, 12, 1024),
    "gpt2-medium": _gpt(1024, 24, 16, 1024),
    "gpt2-large": _gpt(1280, 36, 20, 1024),
    "gpt2-xl": _gpt(1600, 48, 25, 1024),
    "gpt3-small": _gpt(768, 12, 12, 2048),
    "gpt3-medium": _gpt(1024, 24, 16, 2048),
    "gpt3-large": _gpt(1536, 24, 16, 2048),
    # Table 2.1 lists 24 heads of 128 for a 2048-wide model, which cannot split 2048 evenly;
    # 16 heads of 128 keep d_head = 128 and n_heads * d_head = d_model as in every other row.
    "gpt3-xl": _gpt(2048, 24, 16, 2048),
    "gpt3-2.7b": _gpt(2560, 32, 32, 2048),
    "gpt3-6.7b": _gpt(4096, 32, 32, 2048),
    # Table 2.1 lists d_model 5140, not divisible by its 40 heads of 128; 40 * 128 = 5120.
    "gpt3-13b": _gpt(5120, 40, 40, 2048),
    "gpt3-175b": _gpt(12288, 96, 96, 2048),
    "t5-small": _t5(512, 2048, 6, 8),
    "t5-base": _t5(768, 3072, 12, 12),
    "t5-large": _t5(1024, 4096, 24, 16),
}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset called `name` with `overrides` applied; unknown names list the known ones."""
    if isinstance(name, TransformerConfig):
        return name.replace(**overrides) if overrides else name
    if name not in PRESETS:
        raise ValueError(f"Unknown config name {name!r}; known presets: {', '.join(PRESETS)}.")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config


def gpu_config(config: TransformerConfig | str, *, trailing_padding: bool = False,
               **overrides) -> TransformerConfig:
    """`config` (or the preset of that name) with the settings that make a step fast on NVIDIA
    GPUs, none of which changes the model's parameters:

    - `dtype="bfloat16"`: bfloat16 compute; parameters and optimizer state stay float32.
    - `attention_implementation="cudnn"`: cuDNN flash attention through
      `jax.nn.dot_product_attention`. It has no attention dropout, so a config with
      `attention_dropout_rate > 0` keeps its own implementation (set the rate to 0 to get cuDNN).
    - `vocab_pad_multiple=128`: the output head multiplied 128-aligned (GPT-2's 50,257 columns
      as 50,304).
    - `padding="trailing"` when `trailing_padding=True` and the model is decoder-only: a promise
      that unpacked rows pad only after their last token (rows of running text, packed rows),
      so causal attention needs no padding mask and cuDNN runs its causal kernel.

    gpt2's bfloat16 train step on an H200: 44.0 ms with cuDNN against 73.8 ms with the `ops`
    attention, 5% faster causal-only than with the mask, and 36.6 against 43.9 ms with the
    padded head (docs/performance.md, "Results: one NVIDIA H200"). `overrides` are applied
    last.
    """
    base = get_config(config)
    settings: dict[str, Any] = dict(dtype="bfloat16", vocab_pad_multiple=128)
    if overrides.get("attention_dropout_rate", base.attention_dropout_rate) == 0:
        settings["attention_implementation"] = "cudnn"
    if trailing_padding and base.architecture == "decoder_only":
        settings["padding"] = "trailing"
    return base.replace(**{**settings, **overrides})


_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def model_config_dict(preset: str, **values):
    """An `ml_collections.ConfigDict` for experiment configs (`config.model`): `preset`, `gpu`
    (False) and every `TransformerConfig` field but `architecture` and `vocab_size` as a typed
    placeholder (None: keep the preset's value), then `values`. Every field can then be set
    from the command line, e.g. `--config.model.num_kv_heads=2 --config.model.position=rotary`;
    `experiments/common.model_config` turns it into the `TransformerConfig`."""
    import ml_collections
    from ml_collections.config_dict import placeholder

    fields = dict(preset=preset, gpu=False)
    for f in dataclasses.fields(TransformerConfig):
        if f.name not in ("architecture", "vocab_size"):
            fields[f.name] = placeholder(_FIELD_TYPES[str(f.type).split(" | ")[0]])
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"model_config_dict: {unknown} are not TransformerConfig fields.")
    config = ml_collections.ConfigDict(fields)
    config.update(values)
    return config


def parse_overrides(text: str) -> dict[str, Any]:
    """`"num_layers=4,norm=rms,scan_layers=True"` -> `{"num_layers": 4, "norm": "rms",
    "scan_layers": True}`: the `--set` of `python -m flaxformer_lite.params` and
    `experiments/mesh_report.py`. Values are Python literals, else strings."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: {item!r} is not FIELD=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out
