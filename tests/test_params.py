"""Parameter counts against published figures, the breakdown, FLOPs, memory and the CLI."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from flaxformer_lite import get_config, params

# name -> (published figure, allowed relative error); see flaxformer_lite/params.py for sources.
TOLERANCE = {
    "gpt2": 0.0,
    "bert-base": 0.0,
    "t5-small": 0.0,
    "t5-base": 0.0,
    "t5-large": 0.0,
    "transformer-big": 0.01,
    "transformer-base": 0.05,
    "gpt3-175b": 0.005,
}


@pytest.fixture(scope="module")
def counts():
    return {name: params.breakdown(name) for name in params.PUBLISHED}


def test_exact_reference_counts(counts):
    assert counts["gpt2"]["total"] == 124_439_808
    assert counts["bert-base"]["total"] == 109_482_240
    assert counts["bert-large"]["total"] == 335_141_888
    assert counts["t5-small"]["total"] == 60_506_624
    # The paper's 770M for t5-large is the checkpoint plus an untied output matrix.
    assert counts["t5-large"]["total"] + 32128 * 1024 == 770_567_168


@pytest.mark.parametrize("name", list(params.PUBLISHED))
def test_every_preset_matches_its_published_figure(counts, name):
    published = params.PUBLISHED[name]
    err = abs(counts[name]["total"] - published) / published
    assert err <= TOLERANCE.get(name, 0.03), (name, counts[name]["total"], published)


def test_breakdown_adds_up_and_matches_closed_form(counts):
    for c in counts.values():
        assert sum(c[k] for k in params.COMPONENTS) == c["total"]
    d, layers, vocab = 768, 12, 50257
    gpt2 = counts["gpt2"]
    assert gpt2["token_embeddings"] == vocab * d
    assert gpt2["position_embeddings"] == 1024 * d
    assert gpt2["attention"] == layers * (4 * d * d + 4 * d)
    assert gpt2["feed_forward"] == layers * (8 * d * d + 5 * d)
    assert gpt2["norms"] == (2 * layers + 1) * 2 * d
    assert gpt2["output_head"] == 0  # tied
    bert = counts["bert-base"]
    assert bert["type_embeddings"] == 2 * d
    assert bert["output_head"] == d * d + d  # pooler
    t5 = counts["t5-small"]
    assert t5["position_embeddings"] == 2 * 32 * 8  # one relative table per stack


@pytest.mark.parametrize("name", ["gpt2", "bert-base", "t5-small", "transformer-base"])
def test_breakdown_through_scan_equals_the_unrolled_model(name):
    # `breakdown` traces the layers as one scan; the unrolled model users build by default has
    # the same parameters, component by component.
    cfg = get_config(name)
    assert not cfg.scan_layers
    assert params._tally(params.param_shapes(cfg)) == params.breakdown(cfg)


def test_count_without_biases_matches_nanogpt():
    # nanoGPT's GPT with bias=False (no biases in its Linear or LayerNorm layers): tied token
    # table, learned positions, per layer two norm scales, qkv + output projection (4 d^2) and
    # the MLP (8 d^2), then the final norm's scale.
    d, layers, vocab, ctx = 128, 4, 65, 64
    cfg = get_config("gpt2", vocab_size=vocab, d_model=d, num_heads=4, d_ff=4 * d,
                     num_layers=layers, max_len=ctx, use_bias=False, norm_bias=False)
    c = params.breakdown(cfg)
    assert c["total"] == vocab * d + ctx * d + layers * (12 * d * d + 2 * d) + d
    assert c["norms"] == (2 * layers + 1) * d


def test_count_allocates_nothing_for_175b():
    # eval_shape: if this allocated, 175e9 float32 parameters would need 700 GB.
    assert params.count("gpt3-175b") > 174e9


def test_flops_and_memory():
    cfg = get_config("gpt2")
    c = params.breakdown(cfg)
    n = c["total"] - c["position_embeddings"]  # tied embeddings are the output matmul
    f = params.flops_per_token(cfg, seq_len=1024, counts=c)
    assert f["params_term"] == 6 * n
    assert f["attention_term"] == 12 * 12 * 1024 * 768
    mem = params.training_memory(cfg, counts=c)
    # fp32 params + grads + two Adam moments, and AdamW's step counter
    assert 0 < mem["total"] - 16 * c["total"] <= 8
    untied = cfg.replace(tie_embeddings=False)
    cu = params.breakdown(untied)
    assert cu["output_head"] == 50257 * 768
    assert params.matmul_params(untied, cu) == cu["total"] - cu["position_embeddings"] - cu[
        "token_embeddings"]


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "flaxformer_lite.params", "gpt2", "bert-base",
                          "--json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["gpt2", "bert-base"]
    assert rows[0]["total"] == 124_439_808 and isinstance(rows[0]["total"], int)


def test_cli_unknown_name():
    res = subprocess.run([sys.executable, "-m", "flaxformer_lite.params", "gpt5"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "gpt2-medium" in res.stderr


@pytest.mark.parametrize("name, changes", [
    ("gpt2", {}),
    ("gpt2", dict(tie_embeddings=False)),
    ("bert-base", {}),  # backbone: the token table is only looked up, the pooler runs once
    ("bert-base", dict(mlm_head=True)),  # the tied table is the masked-LM decoder
    ("bert-base", dict(mlm_head=True, mlm_predictions=5)),  # the head at 5 positions a row
    ("transformer-base", dict(share_encoder_decoder_embeddings=False)),
    ("t5-small", {}),
])
def test_flops_per_token_match_xla_on_the_forward_pass(name, changes):
    """A third of `flops_per_token` (the forward of forward + backward) against XLA's own count
    of the compiled forward pass, on a small model whose vocabulary table is large enough that
    counting it wrongly shows (~20% of N). XLA also counts the softmax, norms and activations,
    hence a few percent of slack in one direction."""
    import jax
    import jax.numpy as jnp

    from flaxformer_lite import make_model
    from flaxformer_lite.models import dummy_inputs

    config = get_config(name, vocab_size=512, d_model=64, num_heads=4, d_ff=256, num_layers=2,
                        max_len=32, **changes)
    batch, length = 4, 32
    model = make_model(config)
    shapes = params.param_shapes(config)
    inputs = dummy_inputs(config, batch=batch, length=length)
    inputs = {k: jnp.ones_like(v) for k, v in inputs.items()}
    if config.mlm_predictions:  # what the train step hands the model
        inputs["mlm_positions"] = jnp.zeros((batch, config.mlm_predictions), jnp.int32)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, **x)).lower(
        shapes, inputs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_token = cost["flops"] / (batch * length)
    expected = params.flops_per_token(config, seq_len=length)["total"] / 3
    assert expected <= per_token <= 1.06 * expected, (per_token, expected)


def test_a_masked_lm_head_at_some_positions_saves_its_whole_parameter_count():
    """`mlm_predictions=k` runs the head (transform, norm, bias and the tied table) at k of T
    positions: 6 x (1 - k/T) x its parameters fewer FLOPs a token. Its norm and biases were
    left out of the saving (+3e-4 on bert-base at k=20, T=128)."""
    from flaxformer_lite import init_params

    config = get_config("bert-base", vocab_size=96, d_model=32, num_heads=4, d_ff=64,
                        num_layers=1, max_len=16, mlm_head=True)
    tree = init_params(config, jax.random.key(0))
    head = sum(x.size for key, sub in nn.meta.unbox(tree).items()
               if key.startswith("mlm") or key == "token_embed" for x in jax.tree.leaves(sub))
    full = params.flops_per_token(config, seq_len=16)["total"]
    some = params.flops_per_token(config.replace(mlm_predictions=4), seq_len=16)["total"]
    assert full - some == pytest.approx(6 * head * (1 - 4 / 16), rel=1e-12)


@pytest.mark.parametrize("param_dtype,k,optimizer", [
    ("float32", 1, "adamw"), ("bfloat16", 1, "adamw"), ("float32", 4, "adamw"),
    ("bfloat16", 4, "adamw"), ("float32", 1, "adafactor")])
def test_training_memory_equals_the_optimizer_the_library_builds(param_dtype, k, optimizer):
    """The state Engine.init_state builds (Adafactor's statistics, MultiSteps' float32 sum for
    bfloat16 parameters: both used to be counted wrong)."""
    from flaxformer_lite.training import Engine, OptimizerConfig, ParallelConfig
    cfg = get_config("gpt2", vocab_size=96, d_model=256, num_heads=4, d_ff=512, num_layers=1,
                     max_len=16, param_dtype=param_dtype)
    engine = Engine(cfg, OptimizerConfig(optimizer=optimizer, accumulation_steps=k),
                    ParallelConfig(mode="single"))
    state = engine.abstract_state()
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
    mem = params.training_memory(cfg, optimizer=optimizer, accumulation_steps=k)
    assert mem["optimizer"] + mem.get("accumulated_grads", 0) == held
    assert mem["params"] == sum(x.size * x.dtype.itemsize
                                for x in jax.tree.leaves(nn.meta.unbox(state.params)))
    if optimizer == "adafactor":  # neither 0 (the old count) nor a full second moment
        assert 0 < mem["optimizer"] < mem["params"]


def test_sizing_a_user_config():
    """`training_memory` used to read float32 whatever the config's param_dtype (2x too high
    for bfloat16 parameters); bad arguments raised bare KeyErrors or gave negative FLOPs."""
    cfg = get_config("gpt2", vocab_size=96, d_model=32, num_heads=2, d_ff=64, num_layers=2,
                     max_len=16)
    n = params.count(cfg)
    assert params.training_memory(cfg)["params"] == 4 * n
    half = params.training_memory(cfg.replace(param_dtype="bfloat16"))
    assert half["params"] == half["grads"] == 2 * n
    assert 0 < half["optimizer"] - 2 * 4 * n <= 8  # float32 moments, the counter
    # Counts of another tree (a model of one's own): every term follows them (the state was
    # traced from the config's tree while params and grads followed the counts).
    other = dict(params.breakdown(cfg), total=n // 2)
    for optimizer in ("adamw", "adam"):
        mem = params.training_memory(cfg, counts=other, optimizer=optimizer)
        assert mem["optimizer"] == 2 * mem["params"] == 2 * 4 * (n // 2)
    for bad in (dict(optimizer="lion"), dict(accumulation_steps=0), dict(param_dtype="int8"),
                dict(optimizer="adafactor", optimizer_dtype="float32")):  # int8 sized 1 byte;
        with pytest.raises(ValueError, match=list(bad)[-1]):  # adafactor's state read 0 bytes
            params.training_memory(cfg, **bad)
    assert params.training_memory(cfg, param_dtype=jax.numpy.bfloat16)["params"] == 2 * n
    # Rows shorter than mlm_predictions train (every position predicted); they were refused.
    mlm = get_config("bert-base", vocab_size=64, d_model=32, num_heads=2, d_ff=64,
                     num_layers=1, max_len=16, mlm_head=True, mlm_predictions=8)
    short, longer = (params.training_memory(mlm, batch_size=2, seq_len=t)["activations"]
                     for t in (4, 8))
    assert 0 < short < longer
    for seq_len in (0, -5, 17):
        with pytest.raises(ValueError, match=r"seq_len=.* \[1, 16\] \(max_len=16"):
            params.flops_per_token(cfg, seq_len=seq_len)
    r = params.report(cfg, name="mine")
    assert (r.name, r.counts["total"], r.published) == ("mine", n, None)
    assert params.report(cfg).name == "custom"


def test_breakdown_of_a_parameter_tree_of_your_own():
    """A user's tree (a mixture-of-experts feed-forward beside the library's names): counted
    exactly, its own modules as "other" (they used to land in output_head); the library's
    heads stay in output_head."""
    import numpy as np

    tree = {"token_embed": {"embedding": np.zeros((100, 16))},
            "layer_0": {"attention": {"qkv": {"kernel": np.zeros((16, 3, 2, 8))}},
                        "norm": {"scale": np.zeros(16)},
                        "router": {"kernel": np.zeros((16, 4))},
                        "experts": {"wi": np.zeros((4, 16, 64)), "wo": np.zeros((4, 64, 16))}}}
    counts = params.breakdown(tree)
    assert counts["total"] == params.count(tree) == sum(x.size for x in jax.tree.leaves(tree))
    assert counts["other"] == 16 * 4 + 2 * 4 * 16 * 64 and counts["output_head"] == 0
    assert counts["attention"] == 16 * 48 and counts["norms"] == 16
    # Flax's automatic names for the library's layers (a model with unnamed layers).
    unnamed = {"MultiHeadAttention_0": {"qkv": {"kernel": np.zeros((16, 48))}},
               "FeedForward_1": {"wi": {"kernel": np.zeros((16, 64))}},
               "Norm_2": {"scale": np.zeros(16)}, "Dense_0": {"kernel": np.zeros((16, 2))}}
    c = params.breakdown(unnamed)
    assert (c["attention"], c["feed_forward"], c["norms"], c["other"]) == (768, 1024, 16, 32)
    for cfg in (get_config("bert-base", mlm_head=True),
                get_config("t5-small", tie_embeddings=False, scale_tied_logits=False)):
        c = params.breakdown(cfg)
        assert "other" not in c and c["output_head"] > 0


# ---- activation memory -------------------------------------------------------------------------

TINY = dict(vocab_size=97, d_model=64, num_heads=4, d_ff=256, num_layers=3, max_len=64,
            dropout_rate=0.0, attention_dropout_rate=0.0)


def _attention_bytes(p, b, t, s, d, a, a_kv, h, mask, cross=False):
    """One attention sub-layer's residuals, as `activation_memory`'s docstring derives them:
    input and norm input/output, q, o and o's reshape over the t queries, k and v over the s
    keys, float32 row max and sum, one norm's float32 statistics, a boolean mask."""
    return (p * b * (t * (2 * d + 3 * a) + s * 2 * a_kv) + 8 * b * t + 8 * b * h * t
            + (b * t * s if mask else 0))


def _layer_formula(cfg, b, s, t=None):
    """Closed-form bytes of one layer of `cfg` (CPU attention path, no dropout, non-gated):
    (encoder layer, decoder layer) for an encoder-decoder, else (layer, None)."""
    p = 2 if cfg.dtype == "bfloat16" else 4
    d, f, h = cfg.d_model, cfg.d_ff, cfg.num_heads
    a, a_kv = h * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    act = p * f + (f if cfg.activation == "relu" else p * f)  # ReLU: output + boolean mask
    mask = not cfg.scan_layers  # a scanned stack keeps one mask for all its layers

    def ffn(n):
        return p * b * n * (2 * d) + b * n * act + 8 * b * n

    if cfg.remat == "full":
        return (p * b * s * d, p * b * (t or s) * d if t else None)
    self_layer = _attention_bytes(p, b, s, s, d, a, a_kv, h, mask) + ffn(s)
    if t is None:
        return self_layer, None
    decoder = (_attention_bytes(p, b, t, t, d, a, a_kv, h, mask)
               + _attention_bytes(p, b, t, s, d, a, a_kv, h, mask) + ffn(t))
    return self_layer, decoder


FORMULA_CASES = [
    ("gpt2", {}, 2, 64, None),
    ("gpt2", dict(dtype="bfloat16", num_kv_heads=2), 3, 48, None),
    ("gpt2", dict(remat="full", scan_layers=True), 2, 64, None),
    ("gpt2", dict(scan_layers=True, activation="relu"), 2, 32, None),
    ("transformer-base", dict(num_heads=4), 2, 64, 40),
    ("transformer-base", dict(num_heads=4, remat="full", scan_layers=True), 2, 64, 40),
]


@pytest.mark.parametrize("name, changes, b, s, t", FORMULA_CASES)
def test_activation_memory_equals_the_closed_form_and_the_full_trace(name, changes, b, s, t):
    cfg = get_config(name, **{**TINY, **changes})
    mem = params.activation_memory(cfg, batch_size=b, seq_len=s, target_len=t, platform="cpu")
    enc, dec = _layer_formula(cfg, b, s, t)
    if t is None:
        assert mem["per_layer"] == enc
    else:
        assert (mem["per_encoder_layer"], mem["per_decoder_layer"]) == (enc, dec)
    assert mem["activations"] == mem["layers"] + mem["embeddings_and_head"] == mem["total"]
    # Traced with one and two layers and extrapolated: the same as tracing all three.
    full = params._traced_residuals(cfg, b, s, t or s, "cpu")
    assert full == {"activations": mem["activations"], "weights": mem["weights_and_constants"]}


def test_activation_memory_is_linear_in_the_batch_and_remat_scan_shrinks_it():
    cfg = get_config("gpt2", **TINY)
    one, three = (params.activation_memory(cfg, batch_size=b, seq_len=64, platform="cpu")
                  for b in (1, 3))
    for key in ("per_layer", "layers", "embeddings_and_head", "activations"):
        assert three[key] == 3 * one[key] > 0, key
    remat = params.activation_memory(cfg.replace(remat="full", scan_layers=True),
                                     batch_size=3, seq_len=64, platform="cpu")
    assert remat["per_layer"] == 4 * 3 * 64 * 64  # the layer's float32 input alone
    assert remat["activations"] < three["activations"] / 2
    # The plain attention path (GPUs) keeps the [batch, heads, q, kv] softmax; the CPU one not.
    gpu = params.activation_memory(cfg, batch_size=3, seq_len=64, platform="gpu")
    assert gpu["per_layer"] >= three["per_layer"] + 4 * 3 * 4 * 64 * 64


def test_activation_memory_of_175b_allocates_nothing():
    cfg = get_config("gpt3-175b", dropout_rate=0.0, attention_dropout_rate=0.0)
    mem = params.activation_memory(cfg, batch_size=1, seq_len=2048, platform="cpu")
    assert mem["per_layer"] == _layer_formula(cfg, 1, 2048)[0]
    assert mem["layers"] == 96 * mem["per_layer"]
    # With the presets' dropout (masks, and attention's plain path keeping the softmax).
    assert params.activation_memory("gpt3-175b", batch_size=1, seq_len=2048,
                                    platform="cpu")["per_layer"] > 3 * mem["per_layer"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=-2), "batch_size=-2"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(batch_size=True), "batch_size=True"),
    (dict(batch_size=2, seq_len=65), "seq_len=65 .*max_len=64"),
    (dict(batch_size=2, seq_len=0), "seq_len=0"),
    (dict(batch_size=2, target_len=8), "target_len applies to architecture='encoder_decoder'"),
])
def test_activation_memory_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        params.activation_memory(get_config("gpt2", **TINY), **kwargs)
    if "seq_len" in kwargs:
        with pytest.raises(ValueError, match=match.replace("seq_len", "target_len")):
            params.activation_memory(get_config("transformer-base", **TINY), batch_size=2,
                                     target_len=kwargs["seq_len"])


def test_activation_memory_of_an_encoder_needs_its_head():
    with pytest.raises(ValueError, match=r"masked-LM head \(mlm_head=True\) or a classifier"):
        params.activation_memory(get_config("bert-base", **TINY), batch_size=2)
    mlm = params.activation_memory(get_config("bert-base", **TINY, mlm_head=True),
                                   batch_size=2, seq_len=32, platform="cpu")
    assert mlm["per_layer"] > 0 and mlm["embeddings_and_head"] > 0
    # A classifier traces its own loss: the same layers, none of the vocabulary's softmax.
    cls = params.activation_memory(get_config("bert-base", **TINY, num_classes=3),
                                   batch_size=2, seq_len=32, platform="cpu")
    assert cls["per_layer"] == mlm["per_layer"]
    assert 0 < cls["embeddings_and_head"] < mlm["embeddings_and_head"]
    assert params.report(get_config("bert-base", **TINY, num_classes=3), batch_size=2,
                         seq_len=32, platform="cpu").memory["activations"] == cls["activations"]


def test_planning_a_cudnn_config_from_a_cpu_host():
    """gpu_config's cuDNN attention refused every planning call on a CPU host (counts too);
    its activations are traced as the fused kernel keeps them, like the CPU path."""
    cfg = get_config("gpt2", **TINY)
    cudnn = cfg.replace(attention_implementation="cudnn", dtype="bfloat16")
    assert params.count(cudnn) == params.count(cfg)
    fused = params.activation_memory(cudnn, batch_size=2, seq_len=64, platform="gpu")
    assert fused == params.activation_memory(cfg.replace(dtype="bfloat16"), batch_size=2,
                                             seq_len=64, platform="cpu")
    # ... which keeps less than the plain path a GPU runs for ops attention (the softmax).
    plain = params.activation_memory(cfg.replace(dtype="bfloat16"), batch_size=2, seq_len=64,
                                     platform="gpu")
    assert fused["per_layer"] + 4 * 2 * 4 * 64 * 64 <= plain["per_layer"]


def test_training_memory_adds_the_activations_and_the_cli_shows_them():
    cfg = get_config("gpt2", **TINY)
    plain = params.training_memory(cfg)
    mem = params.training_memory(cfg, batch_size=4, seq_len=32)
    act = params.activation_memory(cfg, batch_size=4, seq_len=32)["activations"]
    assert mem["activations"] == act > 0
    assert mem["total"] == plain["total"] + act == sum(v for k, v in mem.items() if k != "total")
    # batch_size is a step's rows, as train() takes them: accumulating over 2 steps keeps
    # them all at each step (and adds the gradient sum); 2 micro-batches keep half of them.
    accumulated = params.training_memory(cfg, batch_size=4, seq_len=32, accumulation_steps=2)
    assert accumulated["activations"] == act and accumulated["accumulated_grads"] > 0
    micro = params.training_memory(cfg, batch_size=4, seq_len=32, microbatches=2)
    assert micro["activations"] == act // 2 and "accumulated_grads" not in micro
    with pytest.raises(ValueError, match="batch_size=3 must be a multiple of microbatches"):
        params.training_memory(cfg, batch_size=3, microbatches=2)
    with pytest.raises(ValueError, match="give batch_size too"):
        params.training_memory(cfg, seq_len=32)
    out = subprocess.run([sys.executable, "-m", "flaxformer_lite.params", "gpt2", "--set",
                          "num_layers=2,d_model=64,num_heads=4,d_ff=128", "--batch-size", "2",
                          "--seq-len", "128", "--json"],
                         capture_output=True, text=True, check=True).stdout
    memory = json.loads(out)[0]["training_memory_bytes"]
    assert memory["activations"] > 0 and memory["total"] > memory["activations"]
    # --platform gpu traces the plain attention path a GPU takes (the presets' attention
    # dropout takes it on every platform: without it, the softmax kept is the difference).
    flags = ["gpt2", "--set", "num_layers=2,d_model=64,num_heads=4,d_ff=128,"
             "attention_dropout_rate=0.0", "--batch-size", "2", "--seq-len", "128", "--json"]
    cpu, gpu = (json.loads(subprocess.run(
        [sys.executable, "-m", "flaxformer_lite.params", *flags, "--platform", p],
        capture_output=True, text=True, check=True).stdout)[0]["training_memory_bytes"]
        for p in ("cpu", "gpu"))
    assert gpu["activations"] > cpu["activations"]
    res = subprocess.run([sys.executable, "-m", "flaxformer_lite.params", "gpt2",
                          "--batch-size", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "batch_size=0" in res.stderr
