"""GPT-2 weights in Hugging Face's layout, against a float64 NumPy GPT-2 written from its
definition (Conv1D layers `x @ W + b`, fused q/k/v split into heads, tanh GELU, pre-LN,
tied head)."""

import json
import math

import jax
import numpy as np
import pytest

from flaxformer_lite import convert, make_model

HF_CONFIG = {"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 32,
             "n_layer": 2, "n_head": 4, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "attn_pdrop": 0.1,
             "embd_pdrop": 0.1}


def hf_state_dict(cfg=HF_CONFIG, seed=0):
    """Random weights under GPT2LMHeadModel's names (norm scales near 1)."""
    rng = np.random.default_rng(seed)
    d, f = cfg["n_embd"], 4 * cfg["n_embd"]

    def w(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {"transformer.wte.weight": w(cfg["vocab_size"], d),
          "transformer.wpe.weight": w(cfg["n_positions"], d),
          "transformer.ln_f.weight": 1 + w(d, scale=0.1), "transformer.ln_f.bias": w(d)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}"
        sd.update({
            f"{p}.ln_1.weight": 1 + w(d, scale=0.1), f"{p}.ln_1.bias": w(d),
            f"{p}.attn.c_attn.weight": w(d, 3 * d), f"{p}.attn.c_attn.bias": w(3 * d),
            f"{p}.attn.c_proj.weight": w(d, d), f"{p}.attn.c_proj.bias": w(d),
            f"{p}.ln_2.weight": 1 + w(d, scale=0.1), f"{p}.ln_2.bias": w(d),
            f"{p}.mlp.c_fc.weight": w(d, f), f"{p}.mlp.c_fc.bias": w(f),
            f"{p}.mlp.c_proj.weight": w(f, d), f"{p}.mlp.c_proj.bias": w(d),
        })
    sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    return sd


def numpy_gpt2(sd, cfg, ids):
    """Logits `[batch, length, vocab]` in float64, as GPT-2's reference code computes them."""
    p = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in sd.items()}
    nh, d = cfg["n_head"], cfg["n_embd"]
    dh = d // nh

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg["layer_norm_epsilon"]) * p[f"{name}.weight"] + p[
            f"{name}.bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    b, t = ids.shape
    h = p["wte.weight"][ids] + p["wpe.weight"][np.arange(t)]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg["n_layer"]):
        a = ln(h, f"h.{i}.ln_1") @ p[f"h.{i}.attn.c_attn.weight"] + p[f"h.{i}.attn.c_attn.bias"]
        q, k, v = (x.reshape(b, t, nh, dh).transpose(0, 2, 1, 3) for x in np.split(a, 3, -1))
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = h + o @ p[f"h.{i}.attn.c_proj.weight"] + p[f"h.{i}.attn.c_proj.bias"]
        m = gelu_new(ln(h, f"h.{i}.ln_2") @ p[f"h.{i}.mlp.c_fc.weight"] + p[f"h.{i}.mlp.c_fc.bias"])
        h = h + m @ p[f"h.{i}.mlp.c_proj.weight"] + p[f"h.{i}.mlp.c_proj.bias"]
    return ln(h, "ln_f") @ p["wte.weight"].T


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face GPT-2 folder: config.json and model.safetensors."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("gpt2")
    sd = hf_state_dict()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    return folder, sd


@pytest.mark.parametrize("scan", [False, True])
def test_a_gpt2_folder_loads_and_matches_the_reference(checkpoint, scan):
    folder, sd = checkpoint
    config, params = convert.load_gpt2(folder, scan_layers=scan)
    assert (config.d_model, config.num_heads, config.num_layers, config.max_len,
            config.vocab_size, config.activation, config.pad_id) == (
        32, 4, 2, 16, 50, "gelu_tanh", None)
    ids = np.random.default_rng(1).integers(0, 50, (2, 11))
    ids[:, 3] = 0  # id 0 is a token in GPT-2's vocabulary ("!"), attended like any other
    logits = make_model(config).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(logits), numpy_gpt2(sd, HF_CONFIG, ids),
                               atol=2e-4, rtol=1e-4)


def test_a_state_dict_of_torch_tensors_converts_alike(checkpoint):
    torch = pytest.importorskip("torch")
    _, sd = checkpoint
    config = convert.gpt2_config(HF_CONFIG)
    from_torch = convert.gpt2_params({k: torch.from_numpy(v) for k, v in sd.items()}, config)
    from_numpy = convert.gpt2_params(sd, config)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_torch, from_numpy))


def test_checkpoints_that_do_not_fit_are_named(checkpoint, tmp_path):
    _, sd = checkpoint
    config = convert.gpt2_config(HF_CONFIG)
    missing = {k: v for k, v in sd.items() if "h.1.mlp.c_fc.bias" not in k}
    with pytest.raises(ValueError, match=r"no 'h.1.mlp.c_fc.bias'"):
        convert.gpt2_params(missing, config)
    with pytest.raises(ValueError, match=r"weights this config does not use: \['h.1.attn"):
        convert.gpt2_params(sd, config.replace(num_layers=1))
    with pytest.raises(ValueError, match=r"'wte.weight' has shape \(50, 32\); this config "
                       r"needs \(64, 32\)"):
        convert.gpt2_params(sd, config.replace(vocab_size=64))
    transposed = dict(sd, **{"transformer.h.0.attn.c_attn.weight":
                             sd["transformer.h.0.attn.c_attn.weight"].T.copy()})
    with pytest.raises(ValueError, match=r"'h.0.attn.c_attn.weight' has shape \(96, 32\); "
                       r"this config needs \(32, 96\)"):
        convert.gpt2_params(transposed, config)
    untied = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="untied head"):
        convert.gpt2_params(untied, config)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not"):
        convert.gpt2_config(dict(HF_CONFIG, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        convert.load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        convert.load_gpt2(tmp_path)


def test_greedy_generation_of_a_converted_gpt2_follows_the_reference(checkpoint):
    """The KV-cache loop on converted weights picks the float64 reference's argmax at every
    step, id 0 included (GPT-2 has no padding id to exclude)."""
    from flaxformer_lite import decoding

    folder, sd = checkpoint
    config, params = convert.load_gpt2(folder, dropout_rate=0.0, attention_dropout_rate=0.0)
    prompt = np.array([[7, 0, 12, 0, 3]], np.int32)
    out = decoding.generate(make_model(config), params, prompt, max_new_tokens=6, greedy=True,
                            stop_tokens=())
    seq = prompt
    for _ in range(6):
        nxt = numpy_gpt2(sd, HF_CONFIG, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, 5:])


def test_a_fine_tuned_gpt2_saves_back_to_the_hugging_face_layout(checkpoint, tmp_path):
    """save_gpt2 / gpt2_state_dict invert load_gpt2 bitwise, from either scan_layers layout."""
    from flaxformer_lite.models import stack_layers

    folder, sd = checkpoint
    config, params = convert.load_gpt2(folder, eos_id=49)
    for scan in (False, True):
        cfg = config.replace(scan_layers=scan)
        out = tmp_path / f"saved_{scan}"
        convert.save_gpt2(out, cfg, stack_layers(params) if scan else params)
        again_config, again = convert.load_gpt2(out)
        assert again_config == config and again_config.eos_id == 49
        assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
        written = convert.read_state_dict(out)
        assert set(written) == {k for k in sd if k != "lm_head.weight"}
        assert all(np.array_equal(written[k], sd[k]) for k in written)


def test_a_model_with_a_padding_id_keeps_its_padding_and_end_ids_through_the_folder(
        checkpoint, tmp_path):
    """A model trained with the library's ids (pad 0, end id 1 by default) came back with
    pad_id=None: its padding targets were then scored as tokens and generate lost its stop
    token. A Hugging Face fine-tune padding with its end id keeps pad_id=None."""
    folder, _ = checkpoint
    config, params = convert.load_gpt2(folder)
    ours = config.replace(pad_id=0, eos_id=None)
    convert.save_gpt2(tmp_path / "ours", ours, params)
    again, _ = convert.load_gpt2(tmp_path / "ours")
    assert (again.pad_id, again.eos_id) == (0, 1)
    hf = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (hf["pad_token_id"], hf["eos_token_id"]) == (0, 1)
    hf.update(pad_token_id=49, eos_token_id=49)
    assert convert.gpt2_config(hf).pad_id is None
    hf["pad_token_id"] = 50
    with pytest.raises(ValueError, match="pad_token_id=50 is not one token id"):
        convert.gpt2_config(hf)
    assert convert.gpt2_config(hf, pad_id=3).pad_id == 3


@pytest.mark.parametrize("override", [dict(scale_embeddings=True),
                                      dict(scale_tied_logits=True), dict(embedding_norm=True),
                                      dict(fused_qkv=False), dict(norm_bias=False)])
def test_settings_gpt2_lacks_are_refused_both_ways(checkpoint, tmp_path, override):
    """A config GPT-2's weights do not describe (its scaled embeddings wrote and loaded 0.4
    off in the logits, its embedding norm was left out of the folder, unfused q/k/v failed in a
    KeyError) is refused by name, loading and saving."""
    folder, _ = checkpoint
    (name, value), = override.items()
    with pytest.raises(ValueError, match=f"this one needs {name}={not value}"):
        convert.load_gpt2(folder, **override)
    config, params = convert.load_gpt2(folder)
    with pytest.raises(ValueError, match=f"this one needs {name}={not value}"):
        convert.save_gpt2(tmp_path, config.replace(**override), params)


def test_parameters_gpt2_has_no_place_for_are_refused(checkpoint):
    folder, _ = checkpoint
    config, params = convert.load_gpt2(folder)
    extra = jax.tree.map(lambda x: x, params)
    extra["decoder"]["layers"]["layer_0"]["self_attention"]["lora_a"] = np.zeros((32, 4))
    with pytest.raises(ValueError, match=r"GPT-2's layout has no place for "
                       r"\['decoder/layers/layer_0/self_attention/lora_a'\]"):
        convert.gpt2_state_dict(extra, config)
    del extra["decoder"]["layers"]["layer_0"]["self_attention"]["lora_a"]
    del extra["decoder"]["final_norm"]["bias"]
    with pytest.raises(ValueError, match=r"missing \['decoder/final_norm/bias'\]"):
        convert.gpt2_state_dict(extra, config)


def test_config_paths_shards_and_refusals(checkpoint, tmp_path):
    from safetensors.numpy import save_file

    folder, sd = checkpoint
    assert convert.gpt2_config(folder / "config.json") == convert.gpt2_config(HF_CONFIG)
    # The end token: config.json's eos_token_id, else <|endoftext|> where the vocabulary has it.
    assert convert.gpt2_config(HF_CONFIG).eos_id is None
    assert convert.gpt2_config(dict(HF_CONFIG, eos_token_id=49)).eos_id == 49
    assert convert.gpt2_config(dict(HF_CONFIG, vocab_size=50257)).eos_id == 50256
    with pytest.raises(ValueError, match=r"eos_token_id=50256 is not one token id in \[0, "
                       r"vocab_size=50\): pass eos_id="):
        convert.gpt2_config(dict(HF_CONFIG, eos_token_id=50256))
    assert convert.gpt2_config(dict(HF_CONFIG, eos_token_id=50256), eos_id=None).eos_id is None
    assert convert.gpt2_config(dict(HF_CONFIG, activation_function="gelu_fast")).activation == (
        "gelu_tanh")
    with pytest.raises(ValueError, match=r"Not a GPT-2 config.json \(model_type='bert', no "
                       r"n_embd"):
        convert.gpt2_config({"model_type": "bert", "hidden_size": 32})
    # Sharded: the index names each weight's file.
    names = sorted(k for k in sd if k != "lm_head.weight")
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    _, sharded = convert.load_gpt2(tmp_path)
    _, whole = convert.load_gpt2(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, sharded, whole))
    padded = dict(sd, **{"transformer.wte.weight": np.pad(sd["transformer.wte.weight"],
                                                           ((0, 14), (0, 0)))})
    with pytest.raises(ValueError, match="padded past the vocabulary loads with the override "
                       "vocab_size=64"):
        convert.gpt2_params({k: v for k, v in padded.items() if k != "lm_head.weight"},
                            convert.gpt2_config(HF_CONFIG))


def test_a_gpt2_folder_with_its_tokenizer_goes_from_text_to_text(gpt2_vocab, tmp_path):
    """A GPT-2 folder holding vocab.json + merges.txt: its tokenizer's ids prompt `generate`
    (greedy, as the float64 reference continues them), the output decodes, and `perplexity`
    of lm_pipeline's rows (<|endoftext|> + text + <|endoftext|>) is the reference's."""
    import shutil

    from safetensors.numpy import save_file

    from flaxformer_lite import data, decoding, evaluation

    vocab_folder, vocab, _ = gpt2_vocab
    hf_config = dict(HF_CONFIG, vocab_size=len(vocab), n_positions=32,
                     eos_token_id=vocab["<|endoftext|>"])
    sd = hf_state_dict(hf_config, seed=3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_folder / name, tmp_path / name)

    config, params = convert.load_gpt2(tmp_path, dropout_rate=0.0, attention_dropout_rate=0.0)
    tok = convert.load_gpt2_tokenizer(tmp_path)
    assert tok.vocab_size == config.vocab_size and tok.eos_id == config.eos_id
    model = make_model(config)
    prompt = tok.encode("the quick brown fox")
    out = decoding.generate(model, params, np.array([prompt], np.int32), max_new_tokens=8,
                            greedy=True)
    seq = np.array([prompt])
    for _ in range(8):
        seq = np.concatenate([seq, numpy_gpt2(sd, hf_config, seq)[:, -1:].argmax(-1)], axis=1)
        if seq[0, -1] == tok.eos_id:
            break
    n = int(out.lengths[0])
    np.testing.assert_array_equal(np.asarray(out.tokens[0, :n]), seq[0, len(prompt):])
    assert tok.decode(out.tokens[0, :n]) == tok.decode(seq[0, len(prompt):])

    text = "日本語 😀 it's"
    batch = next(iter(data.lm_pipeline([{"text": text}], tok, batch_size=1, max_len=16,
                                       shuffle=False, num_epochs=1)))
    result = evaluation.perplexity(model, params, [batch])
    ids = np.array([[tok.eos_id, *tok.encode(text), tok.eos_id]])
    logits = numpy_gpt2(sd, hf_config, ids[:, :-1])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).sum()
    assert result["tokens"] == ids.shape[1] - 1
    np.testing.assert_allclose(result["nll"], nll, rtol=1e-4)
