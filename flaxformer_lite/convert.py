"""Pretrained weights from other implementations: GPT-2 in Hugging Face's layout, both ways.

    config, params = convert.load_gpt2("/path/to/gpt2")   # a folder holding config.json and
    model = make_model(config)                              # model.safetensors (or a .bin)
    logits = model.apply({"params": params}, ids)

Nothing is downloaded: fetch the checkpoint yourself (`huggingface-cli download gpt2`, or
`git clone https://huggingface.co/gpt2`) and point `load_gpt2` at the folder. Its
`config.json` gives the sizes; `model.safetensors` is read with the `safetensors` package
(`pip install flaxformer_lite[hf]`), a `pytorch_model.bin` with PyTorch. A state dict you
loaded yourself (names -> arrays) goes to `gpt2_params` with `gpt2_config`.

GPT-2's vocabulary has no padding token, so the config says `pad_id=None`: every id is a
token, rows padded at the end carry `segment_ids` (0 on padding: no attention, no loss),
prompts `prompt_lengths`. The config's `eos_id` is `<|endoftext|>` (50256, from
`config.json`'s `eos_token_id`), so `generate` and `beam_search` stop there by default (the
library's own default, id 1, is '"' in this vocabulary). The token ids come from GPT-2's
byte-level BPE: `load_gpt2_tokenizer(folder)` reads it from the same folder (`tokenizer.json`,
or `vocab.json` + `merges.txt`) as a `data.GPT2Tokenizer` (Hugging Face's `tokenizers`
package, `pip install flaxformer_lite[hf]`):

    tok = convert.load_gpt2_tokenizer("/path/to/gpt2")
    out = decoding.generate(model, params, np.array([tok.encode("Hello")]), max_new_tokens=20)
    text = tok.decode(out.tokens[0, :out.lengths[0]])   # <|endoftext|> dropped

The mapping, for GPT-2's Conv1D layers (`y = x @ W + b`, W `[in, out]`): `c_attn` `[d, 3d]`
is the fused q/k/v kernel `[d, 3, heads, head_dim]` (q, k, v side by side, each split into
heads), `c_proj` `[d, d]` the output kernel `[heads, head_dim, d]`, `c_fc` / `mlp.c_proj` the
feed-forward's `wi` / `wo`, `ln_1` / `ln_2` / `ln_f` the pre-attention, pre-MLP and final
LayerNorms, `wte` / `wpe` the token and position tables (the output head is tied to `wte`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxformer_lite.config import TransformerConfig, get_config

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu",
                "swish": "silu"}
_SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")


def gpt2_config(hf_config: Mapping[str, Any] | str | os.PathLike,
                **overrides) -> TransformerConfig:
    """The `TransformerConfig` of a GPT-2 checkpoint from its Hugging Face `config.json`
    (a dict, or the file's path): sizes, LayerNorm epsilon, activation and dropout rates, and
    `pad_id=None` (the vocabulary has no padding token: id 0 is "!", a token like any other),
    `eos_id` from `eos_token_id` (GPT-2's <|endoftext|>, 50256, when the file has none and the
    vocabulary holds it), decoding's default stop token; `overrides` last (e.g.
    `dropout_rate=0.0, attention_dropout_rate=0.0` for inference).
    Settings the library does not implement are refused."""
    if isinstance(hf_config, (str, os.PathLike)):
        with open(hf_config) as f:
            hf_config = json.load(f)
    c = dict(hf_config)
    missing = [k for k in _SIZES if k not in c]
    if missing or c.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"Not a GPT-2 config.json (model_type={c.get('model_type')!r}"
                         + (f", no {', '.join(missing)}" if missing else "") + "): "
                         "gpt2_config reads the Hugging Face GPT-2 layout.")
    for key, value in (("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if c.get(key, value) != value:
            raise ValueError(f"GPT-2 config {key}={c[key]!r} is not supported.")
    if c.get("tie_word_embeddings", True) is not True:
        raise ValueError("GPT-2 config tie_word_embeddings=False is not supported (GPT-2 ties "
                         "its output head to the token table).")
    activation = c.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"GPT-2 config activation_function={activation!r} is not one of "
                         f"{', '.join(_ACTIVATIONS)}.")
    d = int(c["n_embd"])
    fields = dict(vocab_size=int(c["vocab_size"]), d_model=d, num_heads=int(c["n_head"]),
                  num_layers=int(c["n_layer"]), max_len=int(c["n_positions"]),
                  d_ff=int(c.get("n_inner") or 4 * d),
                  norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
                  activation=_ACTIVATIONS[activation],
                  dropout_rate=float(c.get("resid_pdrop", 0.1)),
                  attention_dropout_rate=float(c.get("attn_pdrop", 0.1)),
                  # GPT-2's vocabulary has no padding token (id 0 is "!"): every id is real.
                  pad_id=None)
    eos = c.get("eos_token_id", 50256 if fields["vocab_size"] > 50256 else None)
    pad = c.get("pad_token_id")
    if pad is not None and pad != eos and "pad_id" not in overrides:
        # A padding id of its own (`save_gpt2` of a model trained with one). Fine-tunes that
        # pad with <|endoftext|> (pad = eos) keep pad_id=None: as a padding id it would leave
        # every end of text out of the loss, and the model would not learn to stop.
        if isinstance(pad, bool) or not isinstance(pad, int) or not (
                0 <= pad < fields["vocab_size"]):
            raise ValueError(f"GPT-2 config pad_token_id={pad!r} is not one token id in [0, "
                             f"vocab_size={fields['vocab_size']}): pass pad_id= (or None) "
                             "to gpt2_config / load_gpt2.")
        fields["pad_id"] = pad
    if "eos_id" not in overrides and eos is not None and (
            isinstance(eos, bool) or not isinstance(eos, int)
            or not 0 <= eos < fields["vocab_size"]):
        raise ValueError(f"GPT-2 config eos_token_id={eos!r} is not one token id in [0, "
                         f"vocab_size={fields['vocab_size']}): pass eos_id= (or None) to "
                         "gpt2_config / load_gpt2.")
    fields["eos_id"] = eos
    if not c.get("scale_attn_weights", True):
        fields["attention_scale"] = 1.0
    return get_config("gpt2", **{**fields, **overrides})


def _check_gpt2_shaped(config: TransformerConfig) -> None:
    """Refuse a config whose model is not GPT-2's function of GPT-2's weights, naming the
    settings (weights loaded into it, or written from it, would compute something else)."""
    h = config.num_heads
    wrong = [name for name, ok in (
        ("architecture='decoder_only'", config.architecture == "decoder_only"),
        ("position='learned'", config.position == "learned"),
        ("norm='layer'", config.norm == "layer"),
        ("norm_position='pre'", config.norm_position == "pre"),
        ("final_norm=True", config.final_norm),
        ("norm_bias=True", config.norm_bias),
        ("use_bias=True", config.use_bias),
        ("tie_embeddings=True", config.tie_embeddings),
        ("fused_qkv=True", config.fused_qkv),
        ("num_kv_heads=None (or num_heads)", config.num_kv_heads in (None, h)),
        ("head_dim=d_model // num_heads", config.dim_per_head * h == config.d_model),
        ("an ungated activation", not config.gated),
        ("attention_scale=None (or 1.0)", config.attention_scale in (None, 1.0)),
        ("scale_embeddings=False", not config.scale_embeddings),
        ("scale_tied_logits=False", not config.scale_tied_logits),
        ("embedding_norm=False", not config.embedding_norm),
    ) if not ok]
    if wrong:
        raise ValueError("GPT-2 weights need a GPT-2-shaped config (gpt2_config builds one); "
                         f"this one needs {', '.join(wrong)}.")


def gpt2_params(state_dict: Mapping[str, Any], config: TransformerConfig) -> dict:
    """Parameters of `make_model(config)` (NumPy, in `config.param_dtype`) from a GPT-2 state
    dict in Hugging Face's names (with or without the `transformer.` prefix; `lm_head.weight`
    and the attention-mask buffers are skipped). Every weight the model needs must be there,
    with its shape; anything else left over is named in the error."""
    from flaxformer_lite.models import stack_layers

    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    used: set[str] = set()
    _check_gpt2_shaped(config)
    d, h = config.d_model, config.num_heads
    dh = config.dim_per_head

    def take(name: str, shape: tuple[int, ...], stored: tuple[int, ...] | None = None
             ) -> np.ndarray:
        """The weight `name`, of shape `stored` in the file (Conv1D `[in, out]`; default
        `shape`), as `shape`."""
        if name not in sd:
            raise ValueError(f"The GPT-2 state dict has no {name!r} (it has "
                             f"{sorted(sd)[:6]} ...).")
        x = _numpy(sd[name])
        if x.shape != (stored or shape):
            hint = (f"; a token table padded past the vocabulary loads with the override "
                    f"vocab_size={x.shape[0]}" if name == "wte.weight" and x.ndim == 2
                    and x.shape[0] > shape[0] else "")
            raise ValueError(f"GPT-2 weight {name!r} has shape {x.shape}; this config needs "
                             f"{stored or shape} (vocab_size, d_model, num_heads, d_ff, "
                             f"max_len from the checkpoint's config.json){hint}.")
        used.add(name)
        return x.reshape(shape).astype(config.params_dtype)

    def norm(prefix: str) -> dict:
        return {"scale": take(f"{prefix}.weight", (d,)), "bias": take(f"{prefix}.bias", (d,))}

    layers = {}
    for i in range(config.num_layers):
        p = f"h.{i}"
        layers[f"layer_{i}"] = {
            "self_attention_norm": norm(f"{p}.ln_1"),
            "self_attention": {
                "qkv": {"kernel": take(f"{p}.attn.c_attn.weight", (d, 3, h, dh), (d, 3 * d)),
                        "bias": take(f"{p}.attn.c_attn.bias", (3, h, dh), (3 * d,))},
                "out": {"kernel": take(f"{p}.attn.c_proj.weight", (h, dh, d), (d, d)),
                        "bias": take(f"{p}.attn.c_proj.bias", (d,))}},
            "mlp_norm": norm(f"{p}.ln_2"),
            "mlp": {"wi": {"kernel": take(f"{p}.mlp.c_fc.weight", (d, config.d_ff)),
                           "bias": take(f"{p}.mlp.c_fc.bias", (config.d_ff,))},
                    "wo": {"kernel": take(f"{p}.mlp.c_proj.weight", (config.d_ff, d)),
                           "bias": take(f"{p}.mlp.c_proj.bias", (d,))}},
        }
    params = {
        "token_embed": {"embedding": take("wte.weight", (config.vocab_size, d))},
        "decoder": {
            "embedder": {"position_embed": {"embedding": take("wpe.weight",
                                                              (config.max_len, d))}},
            "layers": layers,
            "final_norm": norm("ln_f"),
        },
    }
    if "lm_head.weight" in sd and not np.array_equal(_numpy(sd["lm_head.weight"]),
                                                     _numpy(sd["wte.weight"])):
        raise ValueError("lm_head.weight differs from wte.weight: an untied head, which "
                         "GPT-2 (and this conversion) does not have.")
    skipped = {"lm_head.weight"} | {k for k in sd if k.endswith((".attn.bias",
                                                                 ".attn.masked_bias"))}
    left = sorted(set(sd) - used - skipped)
    if left:
        raise ValueError(f"The GPT-2 state dict has weights this config does not use: "
                         f"{left[:6]} (num_layers={config.num_layers}?).")
    return stack_layers(params) if config.scan_layers else params


def load_gpt2(source: str | os.PathLike, **overrides) -> tuple[TransformerConfig, dict]:
    """`(config, params)` of a GPT-2 checkpoint folder in Hugging Face's layout: its
    `config.json` and `model.safetensors` (or `pytorch_model.bin`). `overrides` go to
    `gpt2_config` (e.g. `scan_layers=True`, `dropout_rate=0.0`)."""
    folder = os.fspath(source)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: load_gpt2 reads a Hugging Face GPT-2 "
                                "folder (config.json and model.safetensors); nothing is "
                                "downloaded.")
    with open(path) as f:
        config = gpt2_config(json.load(f), **overrides)
    return config, gpt2_params(read_state_dict(folder), config)


def load_gpt2_tokenizer(source: str | os.PathLike):
    """The `data.GPT2Tokenizer` of the GPT-2 folder `load_gpt2` reads: its `tokenizer.json`,
    else its `vocab.json` + `merges.txt` (an error names the folder's files when it has
    neither)."""
    from flaxformer_lite.data.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer.from_folder(source)


def read_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The weights of a Hugging Face checkpoint folder as NumPy arrays: `model.safetensors`
    (the `safetensors` package) or else `pytorch_model.bin` (PyTorch), or the shards their
    `.index.json` lists."""
    folder = os.fspath(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_weights(os.path.join(folder, name))
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(_read_weights(os.path.join(folder, shard)))
            return out
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin "
                            "(nor their sharded .index.json).")


def _read_weights(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("Reading model.safetensors needs the safetensors package: "
                              "pip install 'flaxformer_lite[hf]'.") from e
        return load_file(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch file; reading it needs torch (or convert it "
                          "to model.safetensors).") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def gpt2_state_dict(params, config: TransformerConfig) -> dict[str, np.ndarray]:
    """The inverse of `gpt2_params`: `make_model(config)`'s parameters (either `scan_layers`
    layout, boxed or not) as a GPT-2 state dict in Hugging Face's names (`transformer.` prefix,
    Conv1D `[in, out]` kernels, float32 NumPy; the tied `lm_head.weight` left out, as
    `save_pretrained` writes it)."""
    import flax.linen as nn
    import jax

    from flaxformer_lite.models import flat_leaves, unstack_layers

    _check_gpt2_shaped(config)
    params = nn.meta.unbox(params)
    p = jax.tree.map(np.asarray, unstack_layers(params) if config.scan_layers else params)
    d, f = config.d_model, config.d_ff
    names = [f"decoder/layers/layer_{i}/{sub}/{leaf}" for i in range(config.num_layers)
             for sub, leaf in (("self_attention_norm", "scale"), ("self_attention_norm", "bias"),
                               ("self_attention/qkv", "kernel"), ("self_attention/qkv", "bias"),
                               ("self_attention/out", "kernel"), ("self_attention/out", "bias"),
                               ("mlp_norm", "scale"), ("mlp_norm", "bias"), ("mlp/wi", "kernel"),
                               ("mlp/wi", "bias"), ("mlp/wo", "kernel"), ("mlp/wo", "bias"))]
    names += ["token_embed/embedding", "decoder/embedder/position_embed/embedding",
              "decoder/final_norm/scale", "decoder/final_norm/bias"]
    have = flat_leaves(p)
    extra, missing = sorted(set(have) - set(names)), sorted(set(names) - set(have))
    if extra or missing:
        raise ValueError("These parameters are not GPT-2's: "
                         + (f"GPT-2's layout has no place for {extra[:8]}" if extra else "")
                         + ("; " if extra and missing else "")
                         + (f"missing {missing[:8]}" if missing else "")
                         + " (a model with layers of its own, or another config's parameters).")
    dec = p["decoder"]
    sd = {"wte.weight": p["token_embed"]["embedding"],
          "wpe.weight": dec["embedder"]["position_embed"]["embedding"],
          "ln_f.weight": dec["final_norm"]["scale"], "ln_f.bias": dec["final_norm"]["bias"]}
    for i in range(config.num_layers):
        layer, h = dec["layers"][f"layer_{i}"], f"h.{i}"
        attn, mlp = layer["self_attention"], layer["mlp"]
        sd.update({
            f"{h}.ln_1.weight": layer["self_attention_norm"]["scale"],
            f"{h}.ln_1.bias": layer["self_attention_norm"]["bias"],
            f"{h}.attn.c_attn.weight": attn["qkv"]["kernel"].reshape(d, 3 * d),
            f"{h}.attn.c_attn.bias": attn["qkv"]["bias"].reshape(3 * d),
            f"{h}.attn.c_proj.weight": attn["out"]["kernel"].reshape(d, d),
            f"{h}.attn.c_proj.bias": attn["out"]["bias"],
            f"{h}.ln_2.weight": layer["mlp_norm"]["scale"],
            f"{h}.ln_2.bias": layer["mlp_norm"]["bias"],
            f"{h}.mlp.c_fc.weight": mlp["wi"]["kernel"].reshape(d, f),
            f"{h}.mlp.c_fc.bias": mlp["wi"]["bias"],
            f"{h}.mlp.c_proj.weight": mlp["wo"]["kernel"].reshape(f, d),
            f"{h}.mlp.c_proj.bias": mlp["wo"]["bias"],
        })
    return {f"transformer.{k}": np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def save_gpt2(folder: str | os.PathLike, config: TransformerConfig, params) -> None:
    """Write `params` as a Hugging Face GPT-2 folder: `config.json` and `model.safetensors`
    (`gpt2_state_dict`), which `load_gpt2` (and Hugging Face's `GPT2LMHeadModel`) read back."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ImportError("Writing model.safetensors needs the safetensors package: "
                          "pip install 'flaxformer_lite[hf]'.") from e
    _check_gpt2_shaped(config)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          "vocab_size": config.vocab_size, "n_positions": config.max_len,
          "n_embd": config.d_model, "n_layer": config.num_layers, "n_head": config.num_heads,
          "n_inner": config.d_ff, "activation_function": activation[config.activation],
          "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout_rate,
          "embd_pdrop": config.dropout_rate, "attn_pdrop": config.attention_dropout_rate,
          "scale_attn_weights": config.attention_scale is None, "tie_word_embeddings": True}
    # The ids decoding and the loss use, written so that `load_gpt2` reads the same model: a
    # padding id (out of the loss and attention), and the end id (the library's EOS 1 when the
    # config names none and has a padding id, see `TransformerConfig.eos_id`).
    from flaxformer_lite.data.tokenizers import EOS_ID

    eos = config.eos_id if config.eos_id is not None or config.pad_id is None else EOS_ID
    if eos is not None:
        hf["eos_token_id"] = hf["bos_token_id"] = eos
    if config.pad_id is not None:
        hf["pad_token_id"] = config.pad_id
    save_file(gpt2_state_dict(params, config), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)
