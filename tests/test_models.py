"""Every model family inits and runs under jit; causality, padding and packing hold."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as fl
from flaxformer_lite.models import dummy_inputs
from flaxformer_lite.ops import attention as attention_module

TINY = dict(vocab_size=61, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=24,
            dropout_rate=0.0, attention_dropout_rate=0.0)

VARIANTS = {
    "gpt2": fl.get_config("gpt2", **TINY),
    "gpt_rotary_gqa_swiglu_rms": fl.get_config(
        "gpt2", position="rotary", num_kv_heads=2, activation="swiglu", norm="rms",
        use_bias=False, tie_embeddings=False, **TINY),
    "gpt_sinusoidal_postln_scan_remat": fl.get_config(
        "gpt2", position="sinusoidal", norm_position="post", final_norm=False, scan_layers=True,
        remat="full", **TINY),
    "gpt_mqa_unfused_no_biases": fl.get_config("gpt2", num_kv_heads=1, fused_qkv=False,
                                               use_bias=False, norm_bias=False, **TINY),
    "transformer": fl.get_config("transformer-base", **TINY),
    "t5": fl.get_config("t5-small", head_dim=8, **TINY),
    "t5_scan": fl.get_config("t5-small", head_dim=8, scan_layers=True, **TINY),
    "bert": fl.get_config("bert-base", mlm_head=True, **TINY),
}


def _ids(shape, seed=0, vocab=61):
    return jax.random.randint(jax.random.key(seed), shape, 4, vocab)


_JITTED = {}


def _run(model, params, *args, **kwargs):
    """`model.apply({"params": params}, *args, **kwargs)` under jit.

    One compile per input shape instead of one per operation (eager `apply`), which made these
    tests several times slower. Python values (flags, `method`, `mutable`) are static.
    """
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()
              if isinstance(v, (bool, str, list, tuple)) or callable(v)}
    key = (id(model), tuple(sorted(static.items(), key=lambda kv: kv[0])))
    if key not in _JITTED:  # the model is kept with its function, so its id stays unique
        _JITTED[key] = (model, jax.jit(functools.partial(model.apply, **static)))
    traced = {k: v for k, v in kwargs.items() if k not in static}
    return _JITTED[key][1]({"params": params}, *args, **traced)


def _apply(model, params, batch, **kw):
    out = _run(model, params, **batch, **kw)
    return out["logits"] if isinstance(out, dict) else out


class _Built(dict):
    """(config, model, params) per variant name, initialised on first use.

    `init` runs under jit with JAX's non-partitionable threefry: on XLA:CPU that compiles ~3x
    faster (2-3 s instead of ~8 s per tiny model); the tests here need random parameters, not
    a particular random stream.
    """

    def __missing__(self, name):
        cfg = VARIANTS[name]
        model = fl.make_model(cfg)
        with jax.threefry_partitionable(False):
            params = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(cfg, 2, 8))["params"]
        self[name] = (cfg, model, params)
        return self[name]


@pytest.fixture(scope="module")
def built():
    return _Built()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_under_jit(built, name):
    cfg, model, params = built[name]
    batch = {"inputs": _ids((2, 12))}
    if cfg.architecture == "encoder_decoder":
        batch["targets"] = _ids((2, 10), seed=1)
    logits = jax.jit(lambda p, b: _apply(model, p, b))(params, batch)
    length = batch.get("targets", batch["inputs"]).shape[1]
    assert logits.shape == (2, length, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # The exact count from params.count equals the parameters actually created.
    created = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
    assert fl.params.count(cfg) == created


def test_bert_pooler_and_hidden(built):
    cfg, model, params = built["bert"]
    out = _run(model, params, _ids((2, 9)), token_type_ids=jnp.ones((2, 9), jnp.int32))
    assert out["hidden"].shape == (2, 9, 32) and out["pooled"].shape == (2, 32)
    assert np.abs(np.asarray(out["pooled"])).max() <= 1.0


@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms", "t5"])
def test_bfloat16_forward_close_to_float32(built, name):
    cfg, _, params = built[name]
    model16 = fl.make_model(cfg.replace(dtype="bfloat16"))
    batch = {"inputs": _ids((2, 12))}
    if cfg.architecture == "encoder_decoder":
        batch["targets"] = _ids((2, 10), seed=1)
    f32 = _apply(fl.make_model(cfg), params, batch)
    b16 = _apply(model16, params, batch)
    assert b16.dtype == jnp.float32  # logits are returned in float32
    np.testing.assert_allclose(b16, f32, atol=0.05, rtol=0.05)
    p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(b16)
    assert float(jnp.abs(p32 - p16).sum(-1).max()) < 0.02


@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms",
                                  "gpt_sinusoidal_postln_scan_remat", "t5"])
def test_causality_by_perturbation(built, name):
    cfg, model, params = built[name]
    x = _ids((1, 12))
    y = x.at[0, 7].set((x[0, 7] + 1 - 4) % (cfg.vocab_size - 4) + 4)
    if cfg.architecture == "encoder_decoder":
        src = _ids((1, 9), seed=3)
        a = _run(model, params, src, x)
        b = _run(model, params, src, y)
        # Target t feeds decoder position t + 1 (shift right): positions <= 7 are unchanged.
        np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-5)
        assert not np.allclose(a[0, 8:], b[0, 8:])
    else:
        a, b = _apply(model, params, {"inputs": x}), _apply(model, params, {"inputs": y})
        np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-5)
        assert not np.allclose(a[0, 7:], b[0, 7:])


@pytest.mark.parametrize("name", ["transformer", "t5", "bert"])
def test_source_padding_invariance(built, name):
    cfg, model, params = built[name]
    src = _ids((1, 7))
    padded = jnp.pad(src, ((0, 0), (0, 5)))
    if cfg.architecture == "encoder_decoder":
        tgt = _ids((1, 6), seed=2)
        a = _run(model, params, src, tgt)
        b = _run(model, params, padded, tgt)
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:
        a = _run(model, params, src)
        b = _run(model, params, padded)
        np.testing.assert_allclose(a["logits"], b["logits"][:, :7], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gpt_sinusoidal_postln_scan_remat",
                                  "gpt_rotary_gqa_swiglu_rms"])
def test_a_left_padded_row_gives_the_unpadded_rows_logits(built, name):
    """With `padding="anywhere"` (the default) a row padded on the left scores as the row
    without its padding: learned and sinusoidal positions count tokens, not columns (they
    numbered columns, and a left-padded row was read 3 positions on: logits 0.1-1 off)."""
    cfg, model, params = built[name]
    rows = _ids((2, 6), seed=3)
    left = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), rows], axis=1)
    middle = jnp.concatenate([rows[:, :2], jnp.zeros((2, 3), jnp.int32), rows[:, 2:]], axis=1)
    plain = _apply(model, params, {"inputs": rows})
    np.testing.assert_allclose(_apply(model, params, {"inputs": left})[:, 3:], plain, atol=1e-5)
    if cfg.position != "rotary":  # offsets across padding inside a row count its columns
        kept = np.r_[0:2, 5:9]
        np.testing.assert_allclose(_apply(model, params, {"inputs": middle})[:, kept], plain,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gpt_sinusoidal_postln_scan_remat"])
def test_trailing_padding_needs_no_decoder_mask(built, name):
    """`padding="trailing"` drops the decoder-only model's padding mask: the same parameters
    give the same logits at every real position of right-padded rows, and rows with explicit
    segment ids keep their mask. Left padding breaks the promise, and the logits then differ
    (so the test can fail)."""
    cfg, model, params = built[name]
    trailing = fl.make_model(cfg.replace(padding="trailing"))
    run = lambda m, t, **kw: _apply(m, params, {"inputs": t}, **kw)  # noqa: E731
    rows = _ids((2, 9), seed=8)
    right = rows.at[0, 6:].set(0)  # row 0: six tokens, then padding
    exact, fast = run(model, right), run(trailing, right)
    np.testing.assert_allclose(fast[0, :6], exact[0, :6], atol=1e-5)
    np.testing.assert_allclose(fast[1], exact[1], atol=1e-5)
    left = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), rows[:, :6]], axis=1)
    assert np.abs(np.asarray(run(trailing, left)[:, 3:] - run(model, left)[:, 3:])).max() > 1e-3
    seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])
    np.testing.assert_array_equal(run(trailing, rows, segment_ids=seg),
                                  run(model, rows, segment_ids=seg))


@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms", "bert"])
def test_padded_vocab_head_is_exact(built, name):
    """`vocab_pad_multiple` pads the output head's matmul (tied table, untied kernel, BERT's
    masked-LM decoder; vocab 61 -> 64) but neither the parameters nor the logits or their
    gradients. (Encoder-decoder models share the tied head of the first.)"""
    cfg, model, params = built[name]
    padded = fl.make_model(cfg.replace(vocab_pad_multiple=16))
    batch = {"inputs": _ids((2, 7))}
    a, b = _apply(model, params, batch), _apply(padded, params, batch)
    assert a.shape == b.shape == (2, 7, cfg.vocab_size)
    np.testing.assert_allclose(b, a, atol=1e-5)
    if name != "bert":  # the same tied `attend` as gpt2's; its logits suffice there
        weights = jax.random.normal(jax.random.key(5), (2, 7, cfg.vocab_size))

        def loss(m, p):  # a random cotangent for the logits
            return (_apply(m, p, batch) * weights).sum()

        grads = [jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(m, params)
                 for m in (model, padded)]
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), *grads)
    assert fl.params.count(cfg.replace(vocab_pad_multiple=16)) == fl.params.count(cfg)
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        cfg.replace(vocab_pad_multiple=-1)


@pytest.mark.parametrize("given_positions", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms", "t5", "bert"])
def test_packed_segments_are_isolated(built, name, given_positions):
    """Each packed example gives what it gives alone; positions left out restart with each
    segment (they ran on from the example before, 2.0 off on BERT's second example)."""
    cfg, model, params = built[name]
    a, b = _ids((1, 5), seed=4), _ids((1, 7), seed=5)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7 + [0] * 2])
    pos = jnp.array([list(range(5)) + list(range(7)) + [0, 0]])
    if cfg.architecture == "encoder_decoder":
        sa, sb = _ids((1, 4), seed=6), _ids((1, 6), seed=7)
        src = jnp.concatenate([sa, sb], axis=1)
        sseg = jnp.array([[1] * 4 + [2] * 6])
        spos = jnp.array([list(range(4)) + list(range(6))])
        where = (dict(inputs_positions=spos, targets_positions=pos) if given_positions
                 else {})
        out = _run(model, params, src, packed, inputs_segment_ids=sseg,
                   targets_segment_ids=seg, **where)
        alone_a = _run(model, params, sa, a)
        alone_b = _run(model, params, sb, b)
    else:
        kw = {"segment_ids": seg, "positions": pos} if given_positions else {
            "segment_ids": seg}
        out = _apply(model, params, {"inputs": packed}, **kw)
        alone_a = _apply(model, params, {"inputs": a})
        alone_b = _apply(model, params, {"inputs": b})
    np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:12], alone_b, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms", "t5"])
def test_causal_query_blocks_match_jax_attention(built, name, monkeypatch):
    """Decoders pass is_causal with a padding/packing mask; on the CPU the attention then runs
    in query blocks (here of 4). Logits match `jax.nn.dot_product_attention` on a batch with
    padding and packed segments (padding positions are not compared: no loss reads them)."""
    monkeypatch.setattr(attention_module, "_query_block", lambda lq: 4)
    cfg, model, params = built[name]
    reference = fl.make_model(cfg.replace(attention_implementation="xla"))
    x = _ids((2, 14), seed=10).at[1, 11:].set(0)
    seg = jnp.array([[1] * 6 + [2] * 8, [1] * 11 + [0] * 3])
    pos = jnp.array([list(range(6)) + list(range(8)), list(range(11)) + [0] * 3])
    if cfg.architecture == "encoder_decoder":
        src = _ids((2, 9), seed=11)
        kw = dict(targets_segment_ids=seg, targets_positions=pos,
                  inputs_segment_ids=jnp.ones((2, 9), jnp.int32))
        got = _run(model, params, src, x, **kw)
        want = _run(reference, params, src, x, **kw)
    else:
        kw = {"segment_ids": seg, "positions": pos}
        got = _apply(model, params, {"inputs": x}, **kw)
        want = _apply(reference, params, {"inputs": x}, **kw)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gpt_rotary_gqa_swiglu_rms",
                                  "gpt_sinusoidal_postln_scan_remat", "transformer", "t5_scan"])
def test_kv_cache_matches_full_forward(built, name):
    cfg, model, params = built[name]
    x = _ids((2, 10), seed=8)
    if cfg.architecture == "encoder_decoder":
        src = _ids((2, 6), seed=9)
        full = _run(model, params, src, x)
        encoded = _run(model, params, src, method=model.encode)
        dec_in = fl.shift_right(x)
        cache = fl.init_cache(model, params, 2, 10, encoded=encoded)
        with pytest.raises(ValueError, match="needs the encoded source"):
            fl.init_cache(model, params, 2, 10)  # was an AttributeError on None.shape

        def step(cache, tok):
            return model.apply({"params": params, "cache": cache}, encoded, tok, decode=True,
                               method=model.decode, mutable=["cache"])
    else:
        full = _run(model, params, x)
        dec_in = x
        cache = fl.init_cache(model, params, 2, 10)

        def step(cache, tok):
            return model.apply({"params": params, "cache": cache}, tok, decode=True,
                               mutable=["cache"])

    step = jax.jit(step)
    # Prefill 4 tokens in one call, then one token at a time.
    logits, mut = step(cache, dec_in[:, :4])
    cache = mut["cache"]
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-4, rtol=1e-4)
    for t in range(4, 10):
        logits, mut = step(cache, dec_in[:, t:t + 1])
        cache = mut["cache"]
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)


def test_dropout_active_only_when_training(built):
    cfg = VARIANTS["gpt2"].replace(dropout_rate=0.3, attention_dropout_rate=0.2)
    model = fl.make_model(cfg)
    params = built["gpt2"][2]
    x = _ids((2, 8))
    det = _run(model, params, x)
    np.testing.assert_array_equal(det, _run(model, params, x))
    r1 = _run(model, params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r2 = _run(model, params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(r1, r2) and not np.allclose(r1, det)


def test_too_long_sequence_is_a_clear_error(built):
    cfg, model, params = built["gpt2"]
    with pytest.raises(ValueError, match="max_len=24"):
        _run(model, params, _ids((1, 30)))


def test_layers_name_inputs_of_the_wrong_width():
    """Cross-attention to a memory that is not d_model wide, and a cached memory swapped for
    one of another length, used to fail in a bare reshape and in `lax.cond`'s branch types."""
    cfg = fl.TransformerConfig(**{**TINY, "num_layers": 1})
    cross = fl.MultiHeadAttention(cfg, is_cross=True)
    x, memory = jnp.zeros((2, 3, 32)), jnp.zeros((2, 5, 32))
    with pytest.raises(ValueError, match=r"'/key_value' takes inputs \[\.\.\., 32\]; got "
                       r"shape \(2, 5, 48\)\. A cross-attention memory of another width "
                       r"needs MultiHeadAttention\(\.\.\., kv_features=width\)"):
        cross.init(jax.random.key(0), x, kv_inputs=jnp.zeros((2, 5, 48)))
    # kv_features: a 48-wide memory, attended with and without the cache alike.
    wide = fl.MultiHeadAttention(cfg, is_cross=True, kv_features=48)
    memory48 = jax.random.normal(jax.random.key(2), (2, 5, 48))
    queries = jax.random.normal(jax.random.key(3), (2, 3, 32))
    params48 = wide.init(jax.random.key(0), queries, kv_inputs=memory48)
    kernel = params48["params"]["key_value"]["kernel"]
    assert kernel.value.shape[0] == 48 and kernel.names == (None, None, "heads", "kv")
    full = wide.apply(params48, queries, kv_inputs=memory48)
    cache48 = wide.init(jax.random.key(0), queries[:, :1], kv_inputs=memory48,
                        decode=True)["cache"]
    step, _ = wide.apply({**params48, "cache": cache48}, queries[:, :1], kv_inputs=memory48,
                         decode=True, cache_index=jnp.int32(0), mutable=["cache"])
    np.testing.assert_allclose(step, full[:, :1], atol=1e-5)
    variables = cross.init(jax.random.key(0), x[:, :1], kv_inputs=memory, decode=True)
    with pytest.raises(ValueError, match=r"made for a memory of \[batch, length\] = \(2, 5\), "
                       r"got \(2, 7\)"):
        cross.apply(variables, x[:, :1], kv_inputs=jnp.zeros((2, 7, 32)), decode=True,
                    cache_index=jnp.int32(0), mutable=["cache"])
    ffn = fl.FeedForward(cfg)
    with pytest.raises(ValueError, match=r"'/wi' takes inputs \[\.\.\., 32\]; got shape "
                       r"\(2, 3, 16\)\.(?! Cross)"):
        ffn.init(jax.random.key(0), jnp.zeros((2, 3, 16)))


@pytest.mark.parametrize("arch", ["decoder_only", "encoder_only"])
def test_alibi_depends_on_distances_only(arch):
    """ALiBi (`position="alibi"`): no parameters of its own; shifting every position leaves
    the outputs unchanged (it sees distances), and the bias is in effect (the outputs differ
    from `position="none"` with the same parameters)."""
    extra = dict(mlm_head=True, type_vocab_size=0) if arch == "encoder_only" else {}
    cfg = fl.get_config("gpt2", **TINY).replace(architecture=arch, position="alibi", **extra)
    model = fl.make_model(cfg)
    params = nn.meta.unbox(fl.init_params(cfg, jax.random.key(0)))
    none = jax.eval_shape(lambda: nn.meta.unbox(fl.init_params(cfg.replace(position="none"),
                                                               jax.random.key(0))))
    assert jax.tree.structure(none) == jax.tree.structure(params)
    ids = _ids((2, 9))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    base = _apply(model, params, {"inputs": ids, "positions": positions})
    shifted = _apply(model, params, {"inputs": ids, "positions": positions + 7})
    np.testing.assert_allclose(shifted, base, atol=1e-5)
    plain = _apply(fl.make_model(cfg.replace(position="none")), params, {"inputs": ids})
    assert np.max(np.abs(np.asarray(plain) - np.asarray(base))) > 1e-3


class _TwoExperts(nn.Module):
    """A soft mixture of two feed-forward experts: the user's module swapped in by a
    `TransformerLayer` subclass."""

    config: fl.TransformerConfig
    residual_layers: int = 0

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        gate = jax.nn.softmax(nn.Dense(2, name="router")(x), axis=-1)
        experts = [fl.FeedForward(self.config, self.residual_layers, name=f"expert_{i}")(
            x, deterministic=deterministic) for i in range(2)]
        return gate[..., :1] * experts[0] + gate[..., 1:] * experts[1]


class _MoELayer(fl.TransformerLayer):
    ffn_cls: object = _TwoExperts


@pytest.mark.parametrize("scan", [False, True])
def test_a_layer_subclass_swaps_the_feed_forward(scan):
    """`DecoderOnly(config, layer_cls=...)`: with the router at zero and both experts holding
    the plain model's feed-forward weights, the logits are the plain model's (so the swapped
    module is the one running, under remat and scan too); decoding it with the cache matches
    recomputation."""
    from flaxformer_lite import decoding

    cfg = fl.get_config("gpt2", **TINY).replace(scan_layers=scan, remat="full")
    plain = fl.make_model(cfg)
    moe = fl.DecoderOnly(cfg, layer_cls=_MoELayer)
    ids = _ids((2, 7))
    plain_params = nn.meta.unbox(plain.init(jax.random.key(0), ids)["params"])
    moe_params = nn.meta.unbox(moe.init(jax.random.key(1), ids)["params"])
    layers = [k for k in moe_params["decoder"]["layers"]]

    def mixed(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if "router" in keys:
            return jnp.zeros_like(leaf)
        at = plain_params  # the same path, an expert's as the plain feed-forward's
        for k in keys:
            at = at if k.startswith("expert_") else at[k]
        return at

    copied = jax.tree.map_with_path(mixed, moe_params)
    # The experts and their router count as the feed-forward (they sit under "mlp").
    assert layers and fl.params.breakdown(copied)["feed_forward"] == (
        2 * fl.params.breakdown(plain_params)["feed_forward"] + cfg.num_layers * (32 * 2 + 2))
    np.testing.assert_allclose(moe.apply({"params": copied}, ids),
                               plain.apply({"params": plain_params}, ids), atol=1e-5)
    prompts = np.asarray(_ids((2, 4), seed=3))
    run = decoding.generate(moe, moe_params, prompts, max_new_tokens=5, greedy=True,
                            stop_tokens=(), return_logits=True)
    ref = decoding.generate_no_cache(moe, moe_params, prompts, max_new_tokens=5, greedy=True,
                                     stop_tokens=(), return_logits=True)
    np.testing.assert_allclose(run.logits, ref.logits, atol=1e-5)


def test_params_the_model_never_reads_are_refused_by_decoding_and_evaluation():
    """A layer_cls model's params given to `make_model(config)`: Flax's apply ignores the extra
    leaves, so generate and perplexity computed the plain model without a word."""
    from flaxformer_lite import decoding, evaluation

    cfg = fl.get_config("gpt2", **TINY)
    ids = _ids((2, 6))
    moe_params = nn.meta.unbox(fl.DecoderOnly(cfg, layer_cls=_MoELayer).init(
        jax.random.key(1), ids)["params"])
    plain = fl.make_model(cfg)
    with pytest.raises(ValueError, match=r"generate: params hold \d+ parameter\(s\) this "
                       r"DecoderOnly never reads \(decoder/layers/layer_0/mlp/expert_0/.*"
                       r"load_run\(workdir\).module"):
        decoding.generate(plain, moe_params, ids, max_new_tokens=2)
    batch = {"inputs": ids, "targets": ids}
    with pytest.raises(ValueError, match="perplexity: params hold"):
        evaluation.perplexity(plain, {"params": moe_params}, [batch])
    scanned = fl.make_model(cfg.replace(scan_layers=True))
    params = nn.meta.unbox(fl.init_params(cfg, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"They also lack .* scan_layers layout"):
        decoding.beam_search(scanned, params, ids, beam_size=2, max_len=2)
    evaluation.perplexity(plain, params, [batch])  # the model's own params pass


def test_sub_layer_classes_swap_without_a_type_annotation():
    """`ffn_cls = X` in a subclass body, without `: Any`, was a plain class attribute, not a
    dataclass field: instances took the inherited None and built the stock layer silently."""

    class PlainLayer(fl.TransformerLayer):
        ffn_cls = _TwoExperts

    class PlainGPT(fl.DecoderOnly):
        layer_cls = PlainLayer

    cfg = fl.get_config("gpt2", **TINY)
    ids = _ids((1, 5))
    for model in (fl.DecoderOnly(cfg, layer_cls=PlainLayer), PlainGPT(cfg)):
        params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
        assert "router" in params["decoder"]["layers"]["layer_0"]["mlp"], type(model)
    assert PlainLayer(cfg).ffn_cls is _TwoExperts  # an explicit argument still wins:
    assert PlainLayer(cfg, ffn_cls=None).ffn_cls is None


def test_learned_positions_past_the_table_are_refused(built):
    """`apply` with learned positions >= max_len returned the last row's logits (clamped)."""
    cfg, model, params = built["gpt2"]
    ids = _ids((1, 4))
    with pytest.raises(ValueError, match=r"positions hold values in \[30, 33\], outside the "
                       r"learned position table of max_len=24"):
        model.apply({"params": params}, ids, positions=jnp.arange(30, 34)[None])
    from flaxformer_lite import decoding

    rotary = fl.get_config("gpt2", position="rotary", **TINY)
    with pytest.raises(ValueError, match=r"position='rotary' the same parameters run at any "
                       r"length: pass the model make_model\(config.replace\(max_len=N\)\)"):
        decoding.generate(fl.make_model(rotary), None, jnp.ones((1, 20), jnp.int32),
                          max_new_tokens=8, greedy=True)


def test_parameters_carry_logical_axes(built):

    for name in ("gpt2", "t5_scan", "bert"):
        _, _, params = built[name]
        specs = nn.get_partition_spec(params)
        for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: x is None or
                                              isinstance(x, jax.sharding.PartitionSpec)),
                              jax.tree.leaves(nn.meta.unbox(params))):
            assert len(spec) == leaf.ndim
        names = {a for s in jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) for a in s}
        assert {"embed", "heads", "kv", "mlp"} <= names
        if name == "t5_scan":
            assert "layers" in names


# ---- T5's own conventions -------------------------------------------------------------------

def test_t5_attention_scale_and_query_init_fold(built):
    """T5 multiplies q . k by 1.0, not head_dim**-0.5; with the query kernel rescaled by
    sqrt(head_dim) the default-scaled model must give the same logits. At init the query
    slice is head_dim**-0.5 as wide as the key slice (T5's fold), so both start alike."""
    cfg, model, params = built["t5"]
    params = nn.meta.unbox(params)
    assert cfg.attention_scale == 1.0 and cfg.dim_per_head == 8
    plain = fl.make_model(cfg.replace(attention_scale=None))

    def widen(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("qkv/kernel"):
            return x.at[:, 0].multiply(8 ** 0.5)
        return x * 8 ** 0.5 if name.endswith("query/kernel") else x

    widened = jax.tree.map_with_path(widen, params)
    batch = {"inputs": _ids((2, 8), 1), "targets": _ids((2, 6), 2)}
    np.testing.assert_allclose(_apply(plain, widened, batch), _apply(model, params, batch),
                               rtol=2e-5, atol=2e-5)
    qkv = np.asarray(params["encoder"]["layers"]["layer_0"]["self_attention"]["qkv"]["kernel"])
    ratio = qkv[:, 0].std() / qkv[:, 1].std()
    assert abs(ratio - 8 ** -0.5) < 0.05, ratio


def test_scaled_tied_logits_are_the_unscaled_ones_times_rsqrt_d(built):
    cfg, model, params = built["t5"]
    assert cfg.scale_tied_logits
    unscaled = fl.make_model(cfg.replace(scale_tied_logits=False))
    batch = {"inputs": _ids((2, 8), 1), "targets": _ids((2, 6), 2)}
    np.testing.assert_allclose(_apply(model, params, batch),
                               _apply(unscaled, params, batch) * cfg.d_model ** -0.5,
                               rtol=1e-5, atol=1e-6)


# ---- host batches the models would misread -------------------------------------------------

def test_check_batch_refuses_what_the_gathers_would_misread(caplog):
    """JAX's gathers do not fail on bad ids: -1 trained as the last token, ids past the
    vocabulary gave NaN. Mismatched entries were padded into agreement on several devices."""
    from flaxformer_lite.models import check_batch
    gpt, bert = VARIANTS["gpt2"], VARIANTS["bert"]
    s2s = VARIANTS["transformer"]
    ok = np.ones((2, 5), np.int32)
    check_batch(gpt, {"inputs": ok, "targets": ok, "segment_ids": ok, "positions": 0 * ok})
    check_batch(s2s, {"inputs": np.ones((2, 7), np.int32), "targets": ok})
    check_batch(s2s, {"inputs": ok, "targets": ok, "inputs_segment_ids": ok + (ok > 0) * 1,
                      "targets_segment_ids": 2 * ok})  # the same ids on both sides
    check_batch(bert, {"inputs": ok, "targets": 0 * ok, "token_type_ids": ok})
    check_batch(gpt.replace(type_vocab_size=0), {"inputs": ok, "targets": ok})
    cases = [
        (gpt, {"inputs": ok, "targets": ok - 2}, "from -1 to -1.*no -100"),
        (gpt, {"inputs": ok * 61, "targets": ok}, r"\[0, 61\).*vocab_size=61"),
        (gpt, {"inputs": ok, "targets": np.ones((3, 5), np.int32)}, "share one"),
        (gpt, {"inputs": ok, "targets": ok, "positions": ok * 24}, "max_len=24"),
        (gpt, {"inputs": ok[0], "targets": ok[0]}, r"\[batch, length\]"),
        (s2s, {"inputs": np.ones((3, 7), np.int32), "targets": ok}, "batch size"),
        (bert, {"inputs": ok, "targets": ok, "token_type_ids": 2 * ok}, "type_vocab_size=2"),
        # A packed encoder-decoder batch numbers its examples on both sides (one side alone,
        # or a target without its source, trained on mixed examples with finite losses).
        (s2s, {"inputs": ok, "targets": ok, "targets_segment_ids": ok}, "needs both"),
        (s2s, {"inputs": ok, "targets": ok, "inputs_segment_ids": ok}, "needs both"),
        (s2s, {"inputs": ok, "targets": ok, "inputs_segment_ids": ok,
               "targets_segment_ids": np.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])},
         r"Row 0: target segment\(s\) \[2\] have no source"),
    ]
    for cfg, batch, match in cases:
        with pytest.raises(ValueError, match=match):
            check_batch(cfg, batch)
    with pytest.raises(ValueError, match="'targets' is bool; token ids"):
        check_batch(gpt, {"inputs": ok, "targets": ok.astype(bool)})
    with pytest.raises(TypeError, match="got a tuple .*'inputs': x, 'targets': y"):
        check_batch(gpt, (ok, ok))
    with caplog.at_level("WARNING"):
        check_batch(gpt, {"inputs": ok, "targets": ok, "segment_id": ok,
                          "decoder_loss_weights": ok})
    assert "did you mean 'segment_ids'" in caplog.text  # and T5X's name for loss_weights:
    assert ("'decoder_loss_weights' is not read by a decoder_only model (did you mean "
            "'loss_weights'?)") in caplog.text


@pytest.mark.parametrize("name", ["transformer", "t5"])
def test_encode_then_decode_methods_equal_the_teacher_forced_call(built, name):
    """`decode` on shifted targets used to read the start token 0 as padding."""
    from flaxformer_lite.layers import shift_right
    cfg, model, params = built[name]
    inputs = np.array(_ids((2, 9), 1))
    inputs[1, 5:] = 0  # a padded source
    targets = np.array(_ids((2, 7), 2))
    targets[0, 4:] = 0
    full = _apply(model, params, {"inputs": inputs, "targets": targets})
    encoded = _run(model, params, inputs, method="encode", segment_ids=(inputs != 0) * 1)
    split = _run(model, params, encoded, shift_right(jnp.asarray(targets)), method="decode",
                 encoder_segment_ids=(inputs != 0) * 1)
    real = targets != 0  # where the loss reads them
    np.testing.assert_allclose(np.asarray(split)[real], np.asarray(full)[real], rtol=1e-5,
                               atol=1e-5)


def test_model_inputs_of_the_wrong_shape_are_named():
    """Used to fail deep in a broadcast or reshape ("add got incompatible shapes")."""
    gpt, s2s = VARIANTS["gpt2"], VARIANTS["transformer"]
    ids = jnp.ones((2, 5), jnp.int32)
    cases = [
        (gpt, dict(inputs=ids[0]), "integer token ids"),
        (gpt, dict(inputs=ids.astype(jnp.float32)), "integer token ids"),
        (gpt, dict(inputs=ids, segment_ids=ids[:, :3]), "segment_ids has shape"),
        (gpt, dict(inputs=ids, positions=ids[:1]), "positions has shape"),
        (s2s, dict(inputs=jnp.ones((3, 5), jnp.int32), targets=ids), "same examples"),
    ]
    for cfg, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(functools.partial(fl.make_model(cfg).init, jax.random.key(0)),
                           **kwargs)


def test_concrete_ids_outside_the_tables_are_named(built):
    """Applied outside `jit`, an id past the vocabulary gave NaN and a negative one wrapped
    around; token types likewise."""
    cfg, model, params = built["bert"]
    ok = np.ones((1, 6), np.int32)
    cases = [({"inputs": ok * cfg.vocab_size}, "outside the model's vocab_size"),
             ({"inputs": -ok}, r"\[-1, -1\], outside the model's vocab_size"),
             ({"inputs": ok, "token_type_ids": ok * cfg.type_vocab_size}, "type_vocab_size")]
    for batch, match in cases:
        with pytest.raises(ValueError, match=match):
            model.apply({"params": params}, **batch)
    gpt_cfg, gpt, gpt_params = built["gpt2"]
    with pytest.raises(ValueError, match="decoder inputs hold values"):
        gpt.apply({"params": gpt_params}, ok * gpt_cfg.vocab_size)


# ---- initialisation: each scheme against its source's formula ------------------------------

def _truncated_std(bound: float = 2.0) -> float:
    """Standard deviation of N(0, 1) truncated to [-bound, bound] (closed form)."""
    pdf = math.exp(-bound ** 2 / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * bound * pdf / math.erf(bound / math.sqrt(2)))


def _expected_init(scheme: str, d: int, h: int, dh: int, d_ff: int, layers: int, buckets: int):
    """(path suffix -> (std, bound or None, uniform)) written from each source: GPT-2 (std
    0.02, residual outputs / sqrt(2 * layers)), BERT (TF truncated normal, std 0.02 before
    truncation), T5X (variance 1 / fan_in; query / sqrt(head_dim); N(0, 1) token table;
    uniform relative bias of variance 1 / fan_avg)."""
    if scheme == "gpt2":
        r = 0.02 / math.sqrt(2 * layers)
        return {"qkv/kernel": (0.02, None, False), "out/kernel": (r, None, False),
                "wi/kernel": (0.02, None, False), "wo/kernel": (r, None, False),
                "token_embed/embedding": (0.02, None, False),
                "position_embed/embedding": (0.02, None, False)}
    if scheme == "bert":
        t = (0.02 * _truncated_std(), 0.04, False)
        return {k: t for k in ("qkv/kernel", "out/kernel", "wi/kernel", "wo/kernel",
                               "token_embed/embedding", "position_embed/embedding",
                               "type_embed/embedding", "pooler/kernel", "mlm_transform/kernel")}
    trunc = lambda fan: (fan ** -0.5, 2 * fan ** -0.5 / _truncated_std(), False)  # noqa: E731
    fan_avg = (buckets + h) / 2
    return {"query/kernel": ((d * dh) ** -0.5, None, False),
            "key_value/kernel": (d ** -0.5, None, False),
            "qkv/kernel:q": ((d * dh) ** -0.5, None, False),
            "qkv/kernel:kv": (d ** -0.5, None, False),
            "out/kernel": ((h * dh) ** -0.5, None, False),
            "wi/kernel": trunc(d), "wo/kernel": trunc(d_ff), "logits/kernel": trunc(d),
            "token_embed/embedding": (1.0, None, False),
            "rel_embedding": (fan_avg ** -0.5, (3 / fan_avg) ** 0.5, True)}


@pytest.mark.parametrize("scheme,cfg", [
    ("gpt2", fl.get_config("gpt2", vocab_size=512, d_model=256, num_heads=4, d_ff=1024,
                           num_layers=3, max_len=256)),
    ("bert", fl.get_config("bert-base", vocab_size=512, d_model=256, num_heads=4, d_ff=1024,
                           num_layers=1, max_len=256, mlm_head=True)),
    ("t5", fl.get_config("t5-small", vocab_size=512, d_model=256, num_heads=4, d_ff=1024,
                         num_layers=1, scan_layers=True, tie_embeddings=False,
                         scale_tied_logits=False)),
    ("t5", fl.get_config("t5-small", vocab_size=512, d_model=256, num_heads=4, d_ff=1024,
                         num_layers=1, fused_qkv=False)),
])
def test_initialisation_follows_each_source(scheme, cfg):
    """Every kernel and table starts with its source's standard deviation (within 4%, on
    65k-262k values) and truncation bound; biases and norm offsets at 0, norm scales at 1."""
    assert cfg.init == scheme
    expected = _expected_init(scheme, cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff,
                              cfg.num_layers, cfg.relative_num_buckets)
    params = nn.meta.unbox(fl.init_params(cfg, jax.random.key(0)))
    seen = set()
    for path, x in jax.tree.leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        x = np.asarray(x, np.float64)
        if name.endswith(("bias", "mlm_bias")) or "norm/" in name:
            assert np.all(x == (1.0 if name.endswith("scale") else 0.0)), name
            continue
        if name.endswith("qkv/kernel") and scheme == "t5":  # q folded, k and v as they are
            parts = {"qkv/kernel:q": x[..., 0, :, :], "qkv/kernel:kv": x[..., 1:, :, :]}
        else:
            parts = {name: x}
        for part, values in parts.items():
            key = next(k for k in expected if part.endswith(k))
            std, bound, uniform = expected[key]
            seen.add(key)
            tol = 0.2 if values.size < 1000 else 0.04
            assert abs(values.std() / std - 1) < tol, (part, values.std(), std)
            assert abs(values.mean()) < 3 * std / math.sqrt(values.size) + 1e-12, part
            if bound is not None:
                assert np.abs(values).max() <= bound * (1 + 1e-6), (part, bound)
            if uniform:  # flat: no value far beyond the bound, many near it
                assert np.abs(values).max() > 0.8 * bound, part
    unused = set()  # cross-attention always has query and key_value
    if scheme == "t5" and not cfg.fused_qkv:
        unused |= {"qkv/kernel:q", "qkv/kernel:kv"}
    if scheme == "t5" and cfg.tie_embeddings:
        unused.add("logits/kernel")
    assert seen == set(expected) - unused, seen


@pytest.mark.parametrize("final_dropout", [False, True])
def test_no_dropout_between_the_final_norm_and_the_head_unless_asked(built, final_dropout):
    """GPT-2 and BERT feed the final norm's output straight to the head; T5 drops it out."""
    cfg = VARIANTS["gpt2"].replace(dropout_rate=0.5, final_dropout=final_dropout)
    model, params = fl.make_model(cfg), nn.meta.unbox(built["gpt2"][2])
    logits, state = _run(model, params, _ids((2, 8)), deterministic=False,
                         rngs={"dropout": jax.random.key(1)}, capture_intermediates=True,
                         mutable=["intermediates"])
    normed = state["intermediates"]["decoder"]["final_norm"]["__call__"][0]
    head = normed @ params["token_embed"]["embedding"].T
    assert np.allclose(logits, head, rtol=1e-5, atol=1e-5) != final_dropout
    assert fl.get_config("t5-small").final_dropout and not fl.get_config("gpt2").final_dropout


@pytest.mark.parametrize("name", ["gpt2", "transformer"])
def test_decoding_past_the_cache_is_refused_or_nan(built, name):
    """A write past the cache's end used to be clamped onto its last slots: finite, wrong
    logits. Concrete calls raise; inside jit the logits are NaN."""
    cfg, model, params = built[name]
    x = _ids((2, 5), seed=8)
    if cfg.architecture == "encoder_decoder":
        encoded = _run(model, params, _ids((2, 6), seed=9), method=model.encode)
        cache = fl.init_cache(model, params, 2, 4, encoded=encoded)

        def step(cache, tok):
            return model.apply({"params": params, "cache": cache}, encoded, tok, decode=True,
                               method=model.decode, mutable=["cache"])
    else:
        cache = fl.init_cache(model, params, 2, 4)

        def step(cache, tok):
            return model.apply({"params": params, "cache": cache}, tok, decode=True,
                               mutable=["cache"])

    logits, mut = jax.jit(step)(cache, x[:, :3])
    assert np.isfinite(logits).all()
    logits, _ = jax.jit(step)(mut["cache"], x[:, 3:4])  # fills the last slot: fine
    assert np.isfinite(logits).all()
    logits, _ = jax.jit(step)(mut["cache"], x[:, 3:5])  # one slot too many
    assert np.isnan(logits).all()
    with pytest.raises(ValueError, match="writes tokens 3..4 into a cache of 4 slots"):
        step(mut["cache"], x[:, 3:5])


@pytest.mark.parametrize("preset", ["gpt2", "bert-base", "transformer-base", "t5-small"])
def test_feed_forward_hidden_dropout_only_where_the_source_has_it(preset):
    # T5 drops the feed-forward's hidden activation; GPT-2, BERT and the paper only drop each
    # sub-layer's output (outside the block). Small widths, the preset's dropout switches.
    from flaxformer_lite.layers import FeedForward
    base = fl.get_config(preset)
    cfg = VARIANTS["gpt2"].replace(dropout_rate=0.5, activation=base.activation,
                                   ffn_hidden_dropout=base.ffn_hidden_dropout)
    assert base.ffn_hidden_dropout == preset.startswith("t5")
    block = FeedForward(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
    params = block.init(jax.random.key(1), x)
    det = block.apply(params, x)
    train = block.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.array_equal(det, train) != cfg.ffn_hidden_dropout


def test_init_params_compiles_once_per_config():
    """It used to jit a fresh lambda per call: every call recompiled (seconds each)."""
    from flaxformer_lite.models import _init_params

    cfg = fl.get_config("gpt2", **{**TINY, "num_layers": 1, "d_model": 16, "d_ff": 16})
    before = _init_params._cache_size()
    a = fl.init_params(cfg, jax.random.key(0))
    b = fl.init_params(fl.get_config("gpt2", **{**TINY, "num_layers": 1, "d_model": 16,
                                                "d_ff": 16}), jax.random.key(1))
    assert _init_params._cache_size() == before + 1
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_decoder_layer_is_causal_in_user_code():
    """`DecoderLayer` said "causal self-attention" but was built non-causal: position 0 saw
    the future. It is now a `TransformerLayer` subclass (so `isinstance`, `nn.remat` work)."""
    cfg = fl.get_config("transformer-base", **TINY)
    layer = fl.DecoderLayer(cfg)
    assert isinstance(layer, fl.TransformerLayer) and layer.causal
    assert not fl.EncoderLayer(cfg).has_cross
    x = jax.random.normal(jax.random.key(0), (1, 6, 32))
    encoded = jax.random.normal(jax.random.key(1), (1, 3, 32))
    params = layer.init(jax.random.key(2), x, None, encoded)
    y, _ = layer.apply(params, x, None, encoded)
    y2, _ = layer.apply(params, x.at[:, 5].add(1.0), None, encoded)
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])
    assert not np.allclose(y[:, 5], y2[:, 5])
    remat = nn.remat(fl.DecoderLayer)(cfg)
    np.testing.assert_allclose(remat.apply(params, x, None, encoded)[0], y, atol=1e-6)


@pytest.mark.parametrize("path", ["cached_attention", "plain", "xla"])
def test_attention_layer_decodes_causally_without_a_mask(path, monkeypatch):
    """A user's own decoding loop over `MultiHeadAttention(decode=True)` with no mask and no
    positions: the new tokens must see the written slots only, and rotary positions must count
    from the cache index. On paths other than the CPU's `cached_attention` the tokens used to
    attend to the empty slots, and rotary rotated every step as position 0."""
    from flaxformer_lite.ops import fast_paths

    if path == "plain":
        monkeypatch.setenv(fast_paths.ENV, "cached_attention")
    cfg = fl.get_config("gpt2", position="rotary", num_kv_heads=2,
                        attention_implementation="xla" if path == "xla" else "ops", **TINY)
    mha = fl.MultiHeadAttention(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    params = mha.init(jax.random.key(1), x)
    full = mha.apply(params, x, is_causal=True)
    cache = mha.init(jax.random.key(1), jnp.zeros((2, 8, 32)), decode=True)["cache"]
    outs = []
    for start, stop in ((0, 3), (3, 4), (4, 6)):  # a prompt of 3, then 1 and 2 tokens
        out, mutated = mha.apply({**params, "cache": cache}, x[:, start:stop], decode=True,
                                 cache_index=jnp.int32(start), mutable=["cache"])
        cache = mutated["cache"]
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def test_attention_layer_misuse_is_named():
    cfg = fl.get_config("transformer-base", **TINY)
    x = jnp.ones((1, 3, 32))
    self_attn, cross = fl.MultiHeadAttention(cfg), fl.MultiHeadAttention(cfg, is_cross=True)
    params = self_attn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="is_cross=True"):
        self_attn.apply(params, x, x)  # kv_inputs would be ignored
    with pytest.raises(ValueError, match="needs kv_inputs"):
        cross.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="without a cache"):
        self_attn.apply(params, x, decode=True, cache_index=0, mutable=["cache"])
    cache = self_attn.init(jax.random.key(0), jnp.zeros((1, 8, 32)), decode=True)["cache"]
    with pytest.raises(ValueError, match="needs cache_index"):
        self_attn.apply({**params, "cache": cache}, x, decode=True, mutable=["cache"])


def test_export_with_a_symbolic_batch_and_length(built):
    """`jax.export` with polymorphic shapes: the CPU attention sized its blocks from concrete
    shapes and failed ('b' < '2'); symbolic shapes now take the plain path."""
    from jax import export

    cfg, model, params = built["gpt2"]
    b, length = export.symbolic_shape("b, l", constraints=[f"l <= {cfg.max_len}"])
    exported = export.export(jax.jit(lambda p, x: model.apply({"params": p}, x)))(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        jax.ShapeDtypeStruct((b, length), jnp.int32))
    ids = _ids((3, 7), seed=2)
    np.testing.assert_allclose(exported.call(params, ids), _apply(model, params, {"inputs": ids}),
                               atol=1e-5)


def test_export_for_a_gpu_from_a_cpu_host_takes_the_plain_attention():
    """The attention path is chosen by the platform the program is lowered for: exported
    for CUDA on this CPU host it used to carry the CPU path's blocks and barriers. The CPU
    export keeps them and runs as the jitted function does."""
    from jax import export

    from flaxformer_lite import ops

    x = jax.ShapeDtypeStruct((2, 8, 4, 16), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: ops.scaled_dot_product_attention(
        q, k, v, is_causal=True).sum(), argnums=(0, 1, 2)))
    texts = {p: export.export(grad, platforms=(p,))(x, x, x).mlir_module()
             for p in ("cpu", "cuda")}
    assert "optimization_barrier" in texts["cpu"]
    assert "optimization_barrier" not in texts["cuda"]
    q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
    on_cpu = export.export(grad, platforms=("cpu",))(x, x, x)
    for got, want in zip(on_cpu.call(q, q, q), grad(q, q, q)):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("preset", ["gpt2", "t5-small"])
def test_stack_and_unstack_layers_convert_between_the_scan_layouts(preset):
    """Parameters of the per-layer model give the scanned model the same logits once stacked
    (and back), and an Engine of either layout starts from the other's parameters."""
    from flaxformer_lite.training import Engine, OptimizerConfig, ParallelConfig

    extra = dict(num_decoder_layers=2) if preset == "t5-small" else {}
    plain = fl.get_config(preset, **TINY, **extra).replace(num_layers=3)
    scanned = plain.replace(scan_layers=True)
    params = nn.meta.unbox(fl.init_params(plain, jax.random.key(0)))
    stacked = fl.stack_layers(params)
    want = jax.eval_shape(lambda: nn.meta.unbox(fl.init_params(scanned, jax.random.key(0))))
    assert jax.tree.map(lambda x: x.shape, stacked) == jax.tree.map(lambda x: x.shape, want)
    jax.tree.map(np.testing.assert_array_equal, fl.unstack_layers(stacked), params)
    x = _ids((2, 7), seed=3)
    inputs = (x, x) if plain.architecture == "encoder_decoder" else (x,)
    np.testing.assert_allclose(fl.make_model(scanned).apply({"params": stacked}, *inputs),
                               fl.make_model(plain).apply({"params": params}, *inputs),
                               atol=1e-5)
    engine = Engine(scanned, OptimizerConfig(), ParallelConfig(mode="single"))
    jax.tree.map(np.testing.assert_array_equal,
                 engine.params(engine.init_state(0, params=params)), stacked)


def test_embedding_perturbations_give_the_saliency_and_stay_out_of_init(built):
    """Opt-in saliency: an apply with mutable=["perturbations"] returns zeros shaped like the
    token embeddings; the gradient of a logit with respect to them matches a central
    difference along a random direction. model.init makes none (an entry shaped by the init
    inputs broke applying its variables to a larger batch)."""
    cfg, model, params = built["gpt2"]
    ids = _ids((2, 6), seed=5)
    assert set(model.init(jax.random.key(0), ids[:1, :2])) == {"params"}
    _, made = model.apply({"params": params}, ids, mutable=["perturbations"])
    zeros = made["perturbations"]
    assert [x.shape for x in jax.tree.leaves(zeros)] == [(2, 6, cfg.d_model)]

    def logit(pert):
        return model.apply({"params": params, "perturbations": pert}, ids)[1, -1, 7]

    grad = jax.grad(logit)(zeros)
    direction = jax.tree.map(lambda z: jax.random.normal(jax.random.key(1), z.shape), zeros)
    eps = 1e-3  # the embeddings are ~0.02 in size: a small step keeps the logit linear
    plus = logit(jax.tree.map(lambda z, d: z + eps * d, zeros, direction))
    minus = logit(jax.tree.map(lambda z, d: z - eps * d, zeros, direction))
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                       jax.tree.leaves(direction), strict=True))
    np.testing.assert_allclose((plus - minus) / (2 * eps), along, rtol=2e-2)
    np.testing.assert_allclose(logit(zeros), _apply(model, params, {"inputs": ids})[1, -1, 7],
                               rtol=1e-6)  # zero perturbations: the plain model


# ---- merge_params: a changed model started from a trained one ----------------------------------

MERGE_BASE = fl.get_config("gpt2", **TINY)  # learned positions, tied head


@pytest.fixture(scope="module")
def trained():
    """The "trained" model: `(boxed params, plain params, its logits on old-length ids)`."""
    params = fl.init_params(MERGE_BASE, jax.random.key(0))
    plain = nn.meta.unbox(params)
    logits = _apply(fl.make_model(MERGE_BASE), plain, {"inputs": _ids((2, 24), seed=7)})
    return params, plain, logits


def _boxes(tree):
    return [type(x).__name__ + str(getattr(x, "names", "")) for x in jax.tree.leaves(
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))]


def test_merge_params_of_an_equal_model_copies_every_value_exactly(trained):
    """Equal configs: every leaf is old's, bit for bit (from NumPy too), in new's boxes with
    their axis names; a new dtype casts."""
    old, plain, _ = trained
    new = fl.init_params(MERGE_BASE, jax.random.key(1))
    for given in (old, jax.tree.map(np.asarray, plain)):
        merged, report = fl.merge_params(new, given)
        assert _boxes(merged) == _boxes(new) and "LogicallyPartitioned" in _boxes(merged)[0]
        jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(merged), plain)
        assert len(report.copied) == len(jax.tree.leaves(plain))
        assert not (report.resized or report.initialised or report.dropped or report.relaid)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nn.meta.unbox(new))
    merged, _ = fl.merge_params(half, old)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda m, p: np.testing.assert_array_equal(m, p.astype(jnp.bfloat16)),
                 merged, plain)


def test_merge_params_extends_the_vocabulary(trained):
    """A larger vocabulary (tied head): old ids keep their embeddings, new ids get new's
    initialisation, so the logits over the old vocabulary are the old model's; the Engine
    takes the merged parameters, and its refusal of the old ones points at merge_params."""
    from flaxformer_lite.training import Engine, OptimizerConfig, ParallelConfig

    old, plain, logits = trained
    bigger = MERGE_BASE.replace(vocab_size=80)
    new = fl.init_params(bigger, jax.random.key(1))
    merged, report = fl.merge_params(new, old)
    assert report.resized == {"token_embed/embedding": ((61, 32), (80, 32))}
    table = nn.meta.unbox(merged)["token_embed"]["embedding"]
    np.testing.assert_array_equal(table[:61], plain["token_embed"]["embedding"])
    np.testing.assert_array_equal(table[61:], nn.meta.unbox(new)["token_embed"]["embedding"][61:])
    got = _apply(fl.make_model(bigger), nn.meta.unbox(merged), {"inputs": _ids((2, 24), seed=7)})
    assert got.shape == (2, 24, 80)
    np.testing.assert_allclose(got[..., :61], logits, rtol=0, atol=1e-6)
    engine = Engine(bigger, OptimizerConfig(), ParallelConfig(mode="single"))
    with pytest.raises(ValueError, match=r"other shapes than this model's.*merge_params\(new"):
        engine.init_state(0, params=old)
    jax.tree.map(np.testing.assert_array_equal,
                 engine.params(engine.init_state(0, params=merged)), nn.meta.unbox(merged))


def test_merge_params_lengthens_learned_positions(trained):
    """A longer max_len: the position table's first rows are old's, so sequences within the
    old length get the old model's logits."""
    _, plain, logits = trained
    longer = MERGE_BASE.replace(max_len=40)
    merged, report = fl.merge_params(fl.init_params(longer, jax.random.key(1)), plain)
    assert report.resized == {"decoder/embedder/position_embed/embedding": ((24, 32), (40, 32))}
    got = _apply(fl.make_model(longer), merged, {"inputs": _ids((2, 24), seed=7)})
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6)


class _LoRAFeedForward(fl.FeedForward):
    """The feed-forward plus a low-rank update `x a b` with `b` zero at first: the plain
    feed-forward until trained (a LoRA-style adapter under the same "mlp" path)."""

    rank: int = 4

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        a = self.param("lora_a", nn.initializers.normal(0.02), (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, x.shape[-1]))
        return super().__call__(x, deterministic=deterministic) + (x @ a) @ b


class _LoRALayer(fl.TransformerLayer):
    ffn_cls: object = _LoRAFeedForward


def test_merge_params_adds_adapters_that_start_as_the_old_model(trained):
    """A layer subclass with added parameters: they are initialised (the zero `lora_b` makes
    the adapter add nothing), everything else is copied, and the logits are the old model's."""
    _, plain, logits = trained
    model = fl.DecoderOnly(MERGE_BASE, layer_cls=_LoRALayer)
    ids = _ids((2, 24), seed=7)
    new = model.init(jax.random.key(1), ids)["params"]
    merged, report = fl.merge_params(new, plain)
    assert report.initialised == [f"decoder/layers/layer_{i}/mlp/lora_{ab}"
                                  for i in range(2) for ab in "ab"]
    assert len(report.copied) == len(jax.tree.leaves(plain)) and not report.dropped
    np.testing.assert_array_equal(_apply(model, merged, {"inputs": ids}), logits)
    assert np.max(np.abs(_apply(model, new, {"inputs": ids}) - logits)) > 1e-3


def test_merge_params_converts_the_scan_layout(trained):
    """Old parameters of the other `scan_layers` layout are converted first (both ways); a
    scanned stack of more layers keeps old's layers in front and initialises the rest."""
    _, plain, logits = trained
    scanned = MERGE_BASE.replace(scan_layers=True)
    stacked, report = fl.merge_params(fl.init_params(scanned, jax.random.key(1)), plain)
    assert report.relaid == "scan_layers=True" and not report.initialised + report.dropped
    ids = {"inputs": _ids((2, 24), seed=7)}
    np.testing.assert_allclose(_apply(fl.make_model(scanned), nn.meta.unbox(stacked), ids),
                               logits, rtol=0, atol=1e-5)
    back, report = fl.merge_params(fl.init_params(MERGE_BASE, jax.random.key(1)), stacked)
    assert report.relaid == "scan_layers=False"
    jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(back), plain)
    deeper = fl.init_params(scanned.replace(num_layers=3), jax.random.key(1))
    merged, report = fl.merge_params(deeper, plain)
    kernel = "decoder/layers/layers/mlp/wi/kernel"
    assert report.resized[kernel] == ((2, 32, 64), (3, 32, 64))
    got = nn.meta.unbox(merged)["decoder"]["layers"]["layers"]["mlp"]["wi"]["kernel"]
    np.testing.assert_array_equal(got[1], plain["decoder"]["layers"]["layer_1"]["mlp"]["wi"][
        "kernel"])
    np.testing.assert_array_equal(got[2], nn.meta.unbox(deeper)["decoder"]["layers"]["layers"][
        "mlp"]["wi"]["kernel"][2])


def test_merge_params_refuses_a_smaller_shape_unless_told_to_reinitialise(trained):
    """A shape old's values cannot be copied into is named with both shapes; with
    `mismatched="init"` it keeps new's initialisation and the report says so."""
    old, plain, _ = trained
    new = fl.init_params(MERGE_BASE.replace(d_ff=32), jax.random.key(1))
    with pytest.raises(ValueError, match=re.escape(
            "decoder/layers/layer_0/mlp/wi/kernel: (32, 64) in old, (32, 32) in new")):
        fl.merge_params(new, old)
    merged, report = fl.merge_params(new, old, mismatched="init")
    assert report.reinitialised["decoder/layers/layer_0/mlp/wi/kernel"] == ((32, 64), (32, 32))
    assert len(report.reinitialised) == 6  # wi kernel and bias, wo kernel, in 2 layers
    ffn = nn.meta.unbox(merged)["decoder"]["layers"]["layer_0"]["mlp"]
    np.testing.assert_array_equal(
        ffn["wo"]["kernel"], nn.meta.unbox(new)["decoder"]["layers"]["layer_0"]["mlp"]["wo"][
            "kernel"])
    np.testing.assert_array_equal(ffn["wo"]["bias"],
                                  plain["decoder"]["layers"]["layer_0"]["mlp"]["wo"]["bias"])


def test_merge_params_reports_what_it_did(trained):
    """An untied head, rotary positions instead of learned, a larger vocabulary: the report
    lists each path once, under what happened to it, and prints them."""
    old, plain, _ = trained
    other = MERGE_BASE.replace(tie_embeddings=False, position="rotary", vocab_size=64)
    merged, report = fl.merge_params(fl.init_params(other, jax.random.key(1)), old)
    assert report.resized == {"token_embed/embedding": ((61, 32), (64, 32))}
    assert report.initialised == ["decoder/logits/kernel"]
    assert report.dropped == ["decoder/embedder/position_embed/embedding"]
    assert len(report.copied) == len(jax.tree.leaves(plain)) - 2
    assert "decoder/layers/layer_1/mlp/wo/kernel" in report.copied
    assert str(report).splitlines() == [
        "merge_params: 26 copied, 1 resized, 1 initialised, 0 reinitialised, 1 dropped",
        "  resized        token_embed/embedding: (61, 32) -> (64, 32)",
        "  initialised    decoder/logits/kernel",
        "  dropped        decoder/embedder/position_embed/embedding"]
    with pytest.raises(ValueError, match="mismatched must be"):
        fl.merge_params(merged, old, mismatched="keep")


# ---- the "intermediates" collection: captures, sown values, attention weights --------------------


def _layer_captures(tree):
    """Captures of a scanned model (`.../layers/layers/...`, stacked on a leading axis) in the
    per-layer layout (`.../layers/layer_0/...`); the rest as it is."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers" and isinstance(value, dict) and "layers" in value:
            stacked = value["layers"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out[key] = {k: _layer_captures(v) for k, v in value.items() if k != "layers"}
            out[key].update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                             for i in range(n)})
        else:
            out[key] = _layer_captures(value)
    return out


@pytest.mark.parametrize("name", ["gpt_sinusoidal_postln_scan_remat", "t5_scan"])
def test_scanned_layers_capture_what_the_unscanned_ones_do(built, name):
    """`capture_intermediates` under `scan_layers` (and remat) returned the stack's output only:
    the layers' captures and sown values were dropped. They come back stacked on a leading
    [num_layers] axis and equal the per-layer model's, attention weights included."""
    cfg, model, params = built[name]
    plain = fl.make_model(cfg.replace(scan_layers=False))
    x = _ids((2, 7), seed=4)
    args = (x, x) if cfg.architecture == "encoder_decoder" else (x,)
    _, scanned = _run(model, params, *args, capture_intermediates=True)
    _, unscanned = _run(plain, fl.unstack_layers(params), *args, capture_intermediates=True)
    got = _layer_captures(scanned["intermediates"])
    want = unscanned["intermediates"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5), got, want)
    stack = scanned["intermediates"]["decoder"]["layers"]["layers"]
    assert stack["self_attention"]["attention_weights"][0].shape == (cfg.num_layers, 2, 4, 7, 7)
    # Sown alone (no captures), the weights are all the collection holds.
    _, sown = _run(model, params, *args, mutable=["intermediates"])
    names = {jax.tree_util.keystr(path[-2:]) for path, _ in
             jax.tree_util.tree_leaves_with_path(sown)}
    assert names == {"['attention_weights'][0]"}


def _np_softmax(scores, allowed):
    allowed = allowed | ~allowed.any(-1, keepdims=True)  # rows that attend nothing: unread
    s = np.where(allowed, scores, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_rotary(x, positions, base):
    """`ops.apply_rotary` (rotate-half, full head_dim) in float64."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / x.shape[-1])
    angles = positions[:, :, None, None].astype(np.float64) * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_t5_bias(table, q_len, kv_len, bidirectional, num_buckets=32, max_distance=128):
    """T5's relative position bias `[heads, q, kv]` over positions 0..len-1, in float64."""
    n = -(np.arange(kv_len)[None, :] - np.arange(q_len)[:, None])
    bucket = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    exact = num_buckets // 2
    large = exact + (np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact)
                     * (num_buckets - exact)).astype(int)
    bucket = bucket + np.where(n < exact, n, np.minimum(large, num_buckets - 1))
    return np.moveaxis(np.asarray(table, np.float64)[bucket], -1, 0)


def _np_qkv(p, x, kv_x):
    """Projections `[batch, len, heads, head_dim]` (float64) from an attention's parameters."""
    def dense(name, inputs):
        y = np.einsum("bld,d...->bl...", inputs, np.asarray(p[name]["kernel"], np.float64))
        return y + np.asarray(p[name]["bias"], np.float64) if "bias" in p[name] else y

    if "qkv" in p:
        q, k, v = np.moveaxis(dense("qkv", x), 2, 0)
    else:
        q = dense("query", x)
        k, v = np.moveaxis(dense("key_value", x if kv_x is None else kv_x), 2, 0)
    return q, k, v


def _check_attention(p, weights, output, x, kv_x, allowed, real, *, bias=None, scale,
                     rotary=None):
    """The sown `weights` `[b, h, q, kv]` are a distribution over the allowed keys equal to a
    float64 recomputation from the parameters `p` and the layer's input `x` (and `kv_x`), and
    the layer's `output` is `weights @ v` through the output projection (on `real` queries)."""
    q, k, v = _np_qkv(p, np.asarray(x, np.float64),
                      None if kv_x is None else np.asarray(kv_x, np.float64))
    if rotary is not None:
        q, k = _np_rotary(q, *rotary), _np_rotary(k, *rotary)
    group = q.shape[2] // k.shape[2]  # consecutive query heads share a key/value head
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + (0.0 if bias is None else bias)
    want = _np_softmax(scores, allowed[:, None])
    w = np.asarray(weights)
    assert w.dtype == np.float32 and w.shape == want.shape
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    rows = real[:, None, :, None] & np.ones(w.shape, bool)
    assert (w[rows & ~allowed[:, None]] == 0).all()  # masked: causality, padding, segments
    np.testing.assert_allclose(w[rows], want[rows], atol=2e-6, rtol=1e-4)
    heads = np.einsum("bhqk,bkhd->bqhd", w.astype(np.float64), v)
    out = np.einsum("bqhd,hde->bqe", heads, np.asarray(p["out"]["kernel"], np.float64))
    if "bias" in p["out"]:
        out = out + np.asarray(p["out"]["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(output)[real], out[real], atol=1e-5, rtol=1e-4)


def test_gpt_attention_weights_equal_a_float64_recomputation(built):
    """Rotary (the keys and queries as rotated), grouped-query heads, packed segments and
    padding: each layer sows the weights it attended with."""
    cfg, model, params = built["gpt_rotary_gqa_swiglu_rms"]
    params = nn.meta.unbox(params)
    x = _ids((2, 10), seed=6).at[1, 7:].set(0)
    seg = np.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])
    pos = np.array([list(range(6)) + list(range(4)), list(range(7)) + [0] * 3])
    _, state = _run(model, params, x, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos),
                    capture_intermediates=True)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    allowed = same & np.tril(np.ones((10, 10), bool)) & (seg != 0)[:, :, None]
    for i in range(cfg.num_layers):
        layer = state["intermediates"]["decoder"]["layers"][f"layer_{i}"]
        attn = layer["self_attention"]
        _check_attention(params["decoder"]["layers"][f"layer_{i}"]["self_attention"],
                         attn["attention_weights"][0], attn["__call__"][0],
                         layer["self_attention_norm"]["__call__"][0], None, allowed, seg != 0,
                         scale=cfg.dim_per_head ** -0.5, rotary=(pos, cfg.rotary_base))


def test_t5_attention_weights_equal_a_float64_recomputation(built):
    """T5: the relative position bias, the score scale 1.0, source and target padding, and the
    cross-attention over the encoder's output."""
    cfg, model, params = built["t5"]
    params = nn.meta.unbox(params)
    src = _ids((2, 9), seed=7).at[1, 6:].set(0)
    tgt = _ids((2, 8), seed=8).at[0, 5:].set(0)
    _, state = _run(model, params, src, tgt, capture_intermediates=True)
    inter = state["intermediates"]
    s_ok, t_ok = np.asarray(src) != 0, np.asarray(tgt) != 0
    enc_table = params["encoder"]["relative_bias"]["rel_embedding"]
    dec_table = params["decoder"]["relative_bias"]["rel_embedding"]
    enc_allowed = s_ok[:, :, None] & s_ok[:, None, :]
    dec_allowed = t_ok[:, :, None] & t_ok[:, None, :] & np.tril(np.ones((8, 8), bool))
    cross_allowed = t_ok[:, :, None] & s_ok[:, None, :]
    encoded = inter["encoder"]["__call__"][0]
    for i in range(cfg.encoder_layers):
        layer = inter["encoder"]["layers"][f"layer_{i}"]
        _check_attention(params["encoder"]["layers"][f"layer_{i}"]["self_attention"],
                         layer["self_attention"]["attention_weights"][0],
                         layer["self_attention"]["__call__"][0],
                         layer["self_attention_norm"]["__call__"][0], None, enc_allowed, s_ok,
                         bias=_np_t5_bias(enc_table, 9, 9, True), scale=1.0)
    for i in range(cfg.decoder_layers):
        layer = inter["decoder"]["layers"][f"layer_{i}"]
        p = params["decoder"]["layers"][f"layer_{i}"]
        _check_attention(p["self_attention"], layer["self_attention"]["attention_weights"][0],
                         layer["self_attention"]["__call__"][0],
                         layer["self_attention_norm"]["__call__"][0], None, dec_allowed, t_ok,
                         bias=_np_t5_bias(dec_table, 8, 8, False), scale=1.0)
        _check_attention(p["cross_attention"], layer["cross_attention"]["attention_weights"][0],
                         layer["cross_attention"]["__call__"][0],
                         layer["cross_attention_norm"]["__call__"][0], encoded, cross_allowed,
                         t_ok, scale=1.0)


@pytest.mark.parametrize("name,path", [("gpt_rotary_gqa_swiglu_rms", "cached_attention"),
                                       ("gpt_rotary_gqa_swiglu_rms", "plain"),
                                       ("t5_scan", "cached_attention")])
def test_decoding_sows_the_rows_of_the_full_sequence_weights(built, name, path, monkeypatch):
    """A decode step sows its queries' weights over the cache slots: the rows of the full
    sequence's weights (self and cross attention, scanned layers too), on the CPU's
    read-before-write path and the plain one."""
    from flaxformer_lite.ops import fast_paths

    if path == "plain":
        monkeypatch.setenv(fast_paths.ENV, "cached_attention")
    cfg, model, params = built[name]
    x = _ids((2, 10), seed=8)
    if cfg.architecture == "encoder_decoder":
        src = _ids((2, 6), seed=9)
        _, full = _run(model, params, src, x, mutable=["intermediates"])
        encoded = _run(model, params, src, method=model.encode)
        dec_in = fl.shift_right(x)
        cache = fl.init_cache(model, params, 2, 10, encoded=encoded)
        args = (encoded,)
        kw = dict(method=model.decode)
    else:
        _, full = _run(model, params, x, mutable=["intermediates"])
        dec_in, cache, args, kw = x, fl.init_cache(model, params, 2, 10), (), {}
    full = full["intermediates"]["decoder"]

    @jax.jit
    def step(cache, tok):
        return model.apply({"params": params, "cache": cache}, *args, tok, decode=True,
                           mutable=["cache", "intermediates"], **kw)

    for start, stop in ((0, 4), *((t, t + 1) for t in range(4, 10))):  # prefill, then 1 by 1
        _, state = step(cache, dec_in[:, start:stop])
        cache = state["cache"]
        got = state["intermediates"]["decoder"]
        assert jax.tree.structure(got) == jax.tree.structure(full)
        jax.tree.map(lambda g, f, a=start, b=stop: np.testing.assert_allclose(
            g, f[..., a:b, :], atol=1e-5), got, full)


@pytest.mark.parametrize("name", ["gpt2", "t5-small"])
def test_the_readme_logit_lens_gives_the_logits_on_the_last_layer(name):
    extra = {} if name == "gpt2" else {"head_dim": 8}
    cfg = fl.get_config(name, **TINY, **extra)
    model = fl.make_model(cfg)
    params = nn.meta.unbox(fl.init_params(cfg, jax.random.key(0)))
    ids = _ids((2, 6))
    args = (ids,) if name == "gpt2" else (ids, ids)
    logits, state = model.apply({"params": params}, *args, capture_intermediates=True)
    last = f"layer_{cfg.decoder_layers - 1}"
    h, _ = state["intermediates"]["decoder"]["layers"][last]["__call__"][0]
    h = fl.Norm(cfg).apply({"params": params["decoder"]["final_norm"]}, h)
    if cfg.scale_tied_logits:
        h = h * cfg.d_model ** -0.5
    np.testing.assert_allclose(h @ params["token_embed"]["embedding"].T, logits, atol=1e-5)
