"""Cached decoding against full recomputation; sampling, stop tokens, beam search, errors.

References are independent of the cache: a plain causal forward pass (no `decode`) over each
row's whole sequence gives, at position j, exactly what recomputing the prefix up to j gives, so
one pass checks every step. Log-probabilities and beam scores are recomputed in float64 NumPy.
"""

import functools
import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxformer_lite import decoding, get_config
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import DecoderOnly, init_cache, init_params, make_model

NEW = 8  # tokens generated per row
SEED = 0


def tiny(**overrides) -> TransformerConfig:
    base = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=32)
    return TransformerConfig(**{**base, **overrides})


def random_params(model, seed: int = SEED):
    """NumPy-drawn params of the model's shapes: weights N(0, 0.3) (large, so next-token
    distributions are peaked and varied), biases N(0, 0.1), norm scales 1 + N(0, 0.1).
    Drawing them in NumPy avoids compiling the random initialisers."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(model.config, jax.random.key(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        std, mean = (0.1, 1.0) if "scale" in name else (0.1, 0.0) if "bias" in name else (0.3, 0)
        return jnp.asarray(mean + std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree.map_with_path(draw, shapes)


CONFIGS = {
    "gpt_learned": tiny(position="learned"),
    "gpt_rotary_gqa": tiny(position="rotary", num_kv_heads=2, scan_layers=True),
    "gpt_alibi_gqa": tiny(position="alibi", num_kv_heads=2),
    "encdec_sinusoidal": tiny(architecture="encoder_decoder", position="sinusoidal",
                              norm_position="post", final_norm=False, scale_embeddings=True,
                              activation="relu", share_encoder_decoder_embeddings=False),
    "t5_relative_gqa": tiny(architecture="encoder_decoder", position="relative", norm="rms",
                            use_bias=False, num_kv_heads=2, relative_num_buckets=8,
                            relative_max_distance=16, activation="relu", attention_scale=1.0,
                            scale_tied_logits=True),
}
SAMPLED = ("gpt_learned", "t5_relative_gqa")  # checked on sampled runs; the others on greedy


class Setup:
    """A model, its params and a ragged batch: prompts (decoder-only) or sources."""

    def __init__(self, name: str, cfg: TransformerConfig | None = None):
        self.name = name
        self.cfg = cfg or CONFIGS[name]
        self.model = make_model(self.cfg)
        self.params = random_params(self.model)
        self.lm = isinstance(self.model, DecoderOnly)
        rng = np.random.default_rng(SEED)
        self.lengths = np.array([5, 2, 4] if self.lm else [6, 3, 5], np.int32)
        width = int(self.lengths.max())
        ids = rng.integers(4, self.cfg.vocab_size, (len(self.lengths), width))
        ids[np.arange(width)[None, :] >= self.lengths[:, None]] = 0
        self.ids = ids.astype(np.int32)

    def generate(self, **kw):
        fn = decoding.generate if self.lm else decoding.generate_seq2seq
        out = fn(self.model, self.params, self.ids, max_new_tokens=NEW, **kw)
        return jax.tree.map(np.asarray, out)

    def beams(self, max_len=NEW, **kw):
        out = decoding.beam_search(self.model, self.params, self.ids, max_len=max_len, **kw)
        return jax.tree.map(np.asarray, out)

    def teacher_forced_logits(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Full-forward logits `[m, T, vocab]` for generated `tokens` `[m, T]` after row `rows[i]`.

        Entry `[i, t]` predicts `tokens[i, t]` from the prompt/source and `tokens[i, :t]`.
        Rows are padded to a multiple of 16 (and decoder-only sequences to max_len) so the
        reference compiles a few times only.
        """
        m, t = tokens.shape
        pad_rows = -m % 16
        rows = np.concatenate([rows, np.zeros(pad_rows, rows.dtype)])
        tokens = np.concatenate([tokens, np.zeros((pad_rows, t), tokens.dtype)])
        if not self.lm:
            logits = _s2s_forward(self.model, self.params, self.ids[rows], tokens)
            return np.asarray(logits, np.float64)[:m]
        lengths = self.lengths[rows]
        seqs = np.zeros((len(rows), self.cfg.max_len), np.int32)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            seqs[i, :n] = self.ids[r, :n]
            seqs[i, n:n + t - 1] = tokens[i, :t - 1]
        valid = (np.arange(self.cfg.max_len)[None] < (lengths + t - 1)[:, None])
        logits = np.asarray(_lm_forward(self.model, self.params, seqs, valid.astype(np.int32)),
                            np.float64)
        take = lengths[:, None] - 1 + np.arange(t)[None, :]
        return np.take_along_axis(logits, take[:, :, None], axis=1)[:m]

    def sequence_log_probs(self, rows, tokens, lengths) -> np.ndarray:
        """float64 log p(tokens[i, :lengths[i]] | row rows[i]) by teacher forcing."""
        logp = log_softmax(self.teacher_forced_logits(rows, tokens))
        per_token = np.take_along_axis(logp, tokens[:, :, None], axis=2)[:, :, 0]
        keep = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return np.sum(np.where(keep, per_token, 0.0), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _lm_forward(model, params, ids, valid):
    return model.apply({"params": params}, ids, segment_ids=valid)


@functools.partial(jax.jit, static_argnums=0)
def _s2s_forward(model, params, inputs, targets):
    # Every target slot is a real token (a generated 0 included): explicit segment ids.
    return model.apply({"params": params}, inputs, targets,
                       targets_segment_ids=jnp.ones_like(targets))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def gnmt(length, alpha):
    return ((5.0 + np.asarray(length, np.float64)) / 6.0) ** alpha


@functools.cache
def setup(name: str) -> Setup:
    return Setup(name)


@functools.cache
def sampled_run(name: str):
    """Sampling at temperature 0.8 with all `NEW` steps (no stop tokens), logits kept."""
    return setup(name).generate(rng=jax.random.key(1), temperature=0.8, stop_tokens=(),
                                return_logits=True)


@functools.cache
def greedy_run(name: str):
    """Greedy with a stop token taken from the output itself (the first token of row 0 that
    appears from step 2 on), so row 0 stops early; returns (run, stop token)."""
    s = setup(name)
    first = s.generate(greedy=True, return_logits=True)
    row = first.tokens[0, :first.lengths[0]].tolist()
    stop = next((t for i, t in enumerate(row) if i >= 2 and t not in row[:i]), row[-1])
    return s.generate(greedy=True, stop_tokens=(stop,), return_logits=True), stop


def run_for(name: str):
    return sampled_run(name) if name in SAMPLED else greedy_run(name)[0]


# ---- the cache is exact --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_match_full_recomputation(name):
    s, run = setup(name), run_for(name)
    rows = np.arange(len(s.lengths))
    ref = s.teacher_forced_logits(rows, run.tokens)
    for b in rows:
        n = run.lengths[b]
        assert n >= 1
        np.testing.assert_allclose(run.logits[b, :n], ref[b, :n], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}, row {b}")
    np.testing.assert_allclose(run.log_probs, s.sequence_log_probs(rows, run.tokens, run.lengths),
                               rtol=1e-5, atol=1e-4)
    if name in SAMPLED:
        assert len(np.unique(run.tokens)) > 4  # varied output, not one repeated token


@pytest.mark.parametrize("name", ["gpt_learned", "t5_relative_gqa"])
def test_decoding_runs_with_x64_enabled(name):
    # Analysis scripts turn on jax_enable_x64 for float64 checks; the cache writes' index zeros
    # then were int64 beside the int32 cache index (a TypeError in dynamic_update_slice).
    s = setup(name)
    plain, plain_beams = s.generate(greedy=True), s.beams(beam_size=2, max_len=4)
    with jax.enable_x64(True):
        wide, wide_beams = s.generate(greedy=True), s.beams(beam_size=2, max_len=4)
    np.testing.assert_array_equal(wide.tokens, plain.tokens)
    np.testing.assert_array_equal(wide_beams.tokens, plain_beams.tokens)


def test_an_interceptor_reaches_inside_the_compiled_decoding_and_perplexity():
    """Flax interceptors act while a function traces: the compiled generate/perplexity reused
    the plain program under an ablation, and a plain call after an ablated first compile ran
    the ablated model."""
    from flaxformer_lite import evaluation

    s = setup("gpt_learned")
    model, params = s.model, s.params
    prompt = s.ids[:1, :s.lengths[0]]

    def ablate(next_fun, args, kwargs, context):  # the last layer's feed-forward outputs 0
        out = next_fun(*args, **kwargs)
        path = context.module.scope.path if context.module.scope else ()
        if context.method_name == "__call__" and path[-2:] == ("layer_1", "mlp"):
            return jnp.zeros_like(out)
        return out

    def first_logits():
        return np.asarray(decoding.generate(model, params, prompt, max_new_tokens=3,
                                            greedy=True, return_logits=True).logits[0, 0])

    batch = [{"inputs": s.ids[:, :-1], "targets": s.ids[:, 1:]}]
    plain = (first_logits(), evaluation.perplexity(model, params, batch)["loss"])
    with nn.intercept_methods(ablate):
        ablated = (first_logits(), evaluation.perplexity(model, params, batch)["loss"])
        logits = model.apply({"params": params}, prompt)[0, -1]
        nll, w = evaluation._token_nll.__wrapped__(model, params, {
            k: jnp.asarray(v) for k, v in batch[0].items()})
    np.testing.assert_allclose(ablated[0], logits, atol=1e-5)
    assert np.max(np.abs(ablated[0] - plain[0])) > 1e-2
    np.testing.assert_allclose(ablated[1], float(nll.sum() / w.sum()), rtol=1e-6)
    assert abs(ablated[1] - plain[1]) > 1e-3
    again = (first_logits(), evaluation.perplexity(model, params, batch)["loss"])
    np.testing.assert_array_equal(again[0], plain[0])
    assert again[1] == plain[1]


def _favouring_zero(cfg):
    """A model whose every next-token distribution peaks at id 0: the final norm outputs a
    constant vector u (scale 0, bias u) and token 0's tied embedding is 3u (logit 3 against
    ~N(0, 0.3^2) for the others)."""
    model = make_model(cfg)
    params = random_params(model)
    d = cfg.d_model
    u = np.zeros(d, np.float32)
    u[0] = 1.0
    table = np.asarray(params["token_embed"]["embedding"]).copy()
    table[0] = 3 * u
    params["token_embed"]["embedding"] = jnp.asarray(table)
    params["decoder"]["final_norm"] = {"scale": jnp.zeros(d), "bias": jnp.asarray(u)}
    return model, params


def test_a_vocabulary_without_padding_generates_and_attends_to_id_0():
    """pad_id=None (GPT-2's vocabulary, where 0 is "!"): id 0 may be generated, prompt
    columns holding 0 are tokens, and cached decoding equals recomputation; the library's
    default pad_id=0 never emits it."""
    plain_model, plain_params = _favouring_zero(tiny())
    model, params = _favouring_zero(tiny(pad_id=None))
    prompts = np.array([[5, 0, 7, 0], [9, 9, 0, 3]], np.int32)
    run = decoding.generate(model, params, prompts, max_new_tokens=4, greedy=True,
                            stop_tokens=(), return_logits=True)
    assert np.all(np.asarray(run.tokens) == 0)
    assert not np.any(np.asarray(decoding.generate(
        plain_model, plain_params, prompts, max_new_tokens=4, greedy=True,
        prompt_lengths=np.array([4, 4])).tokens) == 0)
    # The zeros in the prompts are attended: recomputation with every column a token.
    seqs = np.concatenate([prompts, np.asarray(run.tokens)[:, :3]], axis=1)
    full = model.apply({"params": params}, seqs)
    np.testing.assert_allclose(run.logits, full[:, 3:], atol=1e-5)
    np.testing.assert_allclose(full, plain_model.apply({"params": params}, seqs,
                                                       segment_ids=np.ones_like(seqs)),
                               atol=1e-6)
    beams = decoding.beam_search(model, params, prompts, beam_size=2, max_len=3, eos_id=1)
    assert np.all(np.asarray(beams.tokens)[:, 0] == 0)
    with pytest.raises(ValueError, match=r"stop_tokens=\(0,\) must be ids in \[0, "
                       r"vocab_size=64\) but the padding id 0"):
        decoding.generate(plain_model, plain_params, prompts, max_new_tokens=2, greedy=True,
                          stop_tokens=(0,))
    decoding.generate(model, params, prompts, max_new_tokens=2, greedy=True, stop_tokens=(0,))
    # The library's EOS (1) is an ordinary token there ('"' in GPT-2's): no default stop.
    with pytest.raises(ValueError, match=r"stop_tokens: the default, the library's EOS id 1, "
                       r"is an ordinary token.*GPT-2: stop_tokens=\(50256,\)"):
        decoding.generate(model, params, prompts, max_new_tokens=2, greedy=True)
    with pytest.raises(ValueError, match=r"eos_id: the default.*GPT-2: eos_id=50256"):
        decoding.beam_search(model, params, prompts, beam_size=2, max_len=3)
    decoding.generate(model, params, prompts, max_new_tokens=2, greedy=True, stop_tokens=(1,))


def test_the_configs_eos_id_is_the_default_stop_token():
    """`config.eos_id` stops generation and beams by default (a vocabulary without padding,
    where the library's id 1 is refused): the favoured id 0 ends every row at once, as an
    explicit stop token does; without it the rows run on."""
    prompts = np.array([[5, 6, 8], [9, 9, 2]], np.int32)
    model, params = _favouring_zero(tiny(pad_id=None, eos_id=0))
    run = decoding.generate(model, params, prompts, max_new_tokens=3, greedy=True)
    np.testing.assert_array_equal(run.lengths, [1, 1])
    plain_model = make_model(tiny(pad_id=None))
    named = decoding.generate(plain_model, params, prompts, max_new_tokens=3, greedy=True,
                              stop_tokens=(0,))
    np.testing.assert_array_equal(run.tokens, named.tokens)
    on = decoding.generate(model, params, prompts, max_new_tokens=3, greedy=True, stop_tokens=())
    np.testing.assert_array_equal(on.lengths, [3, 3])
    beams = decoding.beam_search(model, params, prompts, beam_size=2, max_len=3)
    np.testing.assert_array_equal(np.asarray(beams.lengths)[:, 0], [1, 1])
    # An encoder-decoder's too (its padding id is 0, so the config names another end id).
    s2s = make_model(tiny(architecture="encoder_decoder", eos_id=5))
    s2s_params = random_params(s2s)
    src = np.array([[3, 4, 1]], np.int32)
    ours = decoding.generate_seq2seq(s2s, s2s_params, src, max_new_tokens=6, greedy=True)
    given = decoding.generate_seq2seq(make_model(tiny(architecture="encoder_decoder")),
                                      s2s_params, src, max_new_tokens=6, greedy=True,
                                      stop_tokens=(5,))
    np.testing.assert_array_equal(ours.tokens, given.tokens)
    np.testing.assert_array_equal(ours.lengths, given.lengths)


def test_another_padding_id_is_never_generated_and_pads_prompts():
    """pad_id=7: prompts right-padded with 7 get their lengths from it, and 7 is never
    generated (the favoured id 0 stands in: with pad_id=0 it would be excluded)."""
    model, params = _favouring_zero(tiny(pad_id=7))
    prompts = np.array([[5, 6, 8, 7], [9, 9, 7, 7]], np.int32)
    run = decoding.generate(model, params, prompts, max_new_tokens=3, greedy=True,
                            stop_tokens=())
    given = decoding.generate(model, params, prompts, max_new_tokens=3, greedy=True,
                              stop_tokens=(), prompt_lengths=np.array([3, 2]))
    np.testing.assert_array_equal(run.tokens, given.tokens)
    assert np.all(np.asarray(run.tokens) == 0)
    # Every row stops at once (the loop ends early): the padding id follows the stop token.
    stopped = decoding.generate(model, params, prompts, max_new_tokens=3, greedy=True,
                                stop_tokens=(0,))
    np.testing.assert_array_equal(stopped.tokens, [[0, 7, 7], [0, 7, 7]])
    beams = decoding.beam_search(model, params, prompts, beam_size=2, max_len=3, eos_id=0)
    assert np.all(np.asarray(beams.tokens)[:, 0, 1:] == 7)
    cfg = tiny(pad_id=7)
    model7, params7 = make_model(cfg), random_params(make_model(cfg))
    table = np.asarray(params7["token_embed"]["embedding"]).copy()
    table[7] = 3 * np.eye(cfg.d_model, dtype=np.float32)[0]
    params7["token_embed"]["embedding"] = jnp.asarray(table)
    params7["decoder"]["final_norm"] = {"scale": jnp.zeros(cfg.d_model),
                                        "bias": jnp.eye(cfg.d_model)[0]}
    out = decoding.generate(model7, params7, prompts, max_new_tokens=3, greedy=True,
                            stop_tokens=(), return_logits=True)
    assert np.all(np.argmax(out.logits, -1) == 7) and not np.any(np.asarray(out.tokens) == 7)


def test_cross_attention_keys_values_come_from_the_cache_after_the_first_step():
    s = setup("encdec_sinusoidal")
    model, params = s.model, s.params
    seg = (s.ids != 0).astype(np.int32)
    encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, segment_ids=x != 0,
                                               method="encode"))(params, s.ids)
    other = jax.random.normal(jax.random.key(3), encoded.shape)

    @jax.jit
    def step(params, cache, enc, token, pos):
        ids = jnp.full((len(s.ids), 1), token, jnp.int32)
        logits, state = model.apply(
            {"params": params, "cache": cache}, enc, ids, encoder_segment_ids=seg,
            segment_ids=jnp.ones_like(ids), positions=jnp.full_like(ids, pos), decode=True,
            method="decode", mutable=["cache"])
        return logits, state["cache"]

    cache = init_cache(model, params, len(s.ids), 4, encoded=encoded, encoder_segment_ids=seg)
    first, cache = step(params, cache, encoded, 0, 0)
    first_other, _ = step(params, init_cache(model, params, len(s.ids), 4, encoded=encoded,
                                             encoder_segment_ids=seg), other, 0, 0)
    assert not np.allclose(first, first_other)  # at step 0 the encoder output is read ...
    second, _ = step(params, cache, encoded, 7, 1)
    second_other, _ = step(params, cache, other, 7, 1)
    np.testing.assert_array_equal(second, second_other)  # ... afterwards only the cache is


# ---- sampling ------------------------------------------------------------------------------

def _np_filter(logits, temperature, top_k, top_p, pad_id):
    """NumPy `decoding.filter_logits` as documented, the padding id ruled out first."""
    x = np.array(logits, np.float64)
    x[..., pad_id] = -np.inf
    x = (x - x.max(-1, keepdims=True)) / temperature
    order = np.argsort(-x, axis=-1, kind="stable")  # descending, ties by id
    rank = np.argsort(order, axis=-1)
    x = np.where(rank < top_k, x, -np.inf)
    probs = np.exp(log_softmax(np.take_along_axis(x, order, axis=-1)))
    before = np.cumsum(probs, axis=-1) - probs
    inside = before < top_p - 1e-6
    inside[..., 0] = True
    return np.where(np.take_along_axis(inside, rank, axis=-1), x, -np.inf)


def test_per_token_log_probs_under_the_model_and_the_sampling_distribution():
    """`token_log_probs` are the model's log-probs of each generated token (a forward pass over
    prompt + completion, NumPy log-softmax), 0 past `lengths`, summing to `log_probs`;
    `sampled_log_probs` those under the tempered, top-k / top-p filtered distribution without
    the padding id, which the tokens were drawn from."""
    s = setup("gpt_learned")
    kw = dict(temperature=0.7, top_k=6, top_p=0.9)
    first = s.generate(rng=jax.random.key(4), stop_tokens=(), **kw)
    stop = int(first.tokens[0, 2])  # row 0 stops at step 2 (or before)
    out = s.generate(rng=jax.random.key(4), stop_tokens=(stop,), **kw)
    np.testing.assert_array_equal(out.tokens, first.tokens[:, :out.tokens.shape[1]] * (
        np.arange(NEW)[None] < out.lengths[:, None]))
    assert out.lengths[0] <= 3 and out.lengths.max() == NEW
    rows = np.arange(len(s.ids))
    logits = s.teacher_forced_logits(rows, out.tokens)
    past = np.arange(NEW)[None, :] >= out.lengths[:, None]
    want = np.take_along_axis(log_softmax(logits), out.tokens[:, :, None], axis=2)[:, :, 0]
    np.testing.assert_allclose(out.token_log_probs, np.where(past, 0.0, want), atol=1e-4)
    np.testing.assert_allclose(out.token_log_probs.sum(1), out.log_probs, rtol=1e-5, atol=1e-5)
    behaviour = np.take_along_axis(log_softmax(_np_filter(logits, pad_id=0, **kw)),
                                   out.tokens[:, :, None], axis=2)[:, :, 0]
    assert np.isfinite(behaviour[~past]).all()  # every drawn token was allowed
    np.testing.assert_allclose(out.sampled_log_probs, np.where(past, 0.0, behaviour), atol=1e-4)
    assert (out.sampled_log_probs[~past] > out.token_log_probs[~past]).mean() > 0.5
    greedy = s.generate(greedy=True)
    np.testing.assert_allclose(greedy.token_log_probs.sum(1), greedy.log_probs, rtol=1e-5)
    assert not greedy.sampled_log_probs.any()  # the argmax is certain


def test_left_padded_prompts_continue_as_the_unpadded_prompt():
    """`padding_side="left"` gives each row the continuation of its unpadded prompt (a row
    alone, and the right-padded batch); prompts padded on the other side than the one named
    are refused, with `prompt_lengths` too (they used to continue rows from their padding)."""
    s = setup("gpt_learned")
    width = s.ids.shape[1]
    left = np.zeros_like(s.ids)
    for b, n in enumerate(s.lengths):
        left[b, width - n:] = s.ids[b, :n]
    kw = dict(max_new_tokens=NEW, rng=jax.random.key(6), temperature=0.8, stop_tokens=())
    right = decoding.generate(s.model, s.params, s.ids, **kw)
    for lengths in (None, s.lengths):
        out = decoding.generate(s.model, s.params, left, prompt_lengths=lengths,
                                padding_side="left", **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(right.tokens))
        np.testing.assert_allclose(out.token_log_probs, right.token_log_probs, atol=1e-5)
    alone = decoding.generate(s.model, s.params, s.ids[1:2, :s.lengths[1]], greedy=True,
                              max_new_tokens=NEW, stop_tokens=())
    batch = decoding.generate(s.model, s.params, left, greedy=True, max_new_tokens=NEW,
                              stop_tokens=(), padding_side="left")
    np.testing.assert_array_equal(np.asarray(batch.tokens[1]), np.asarray(alone.tokens[0]))
    no_cache = decoding.generate_no_cache(s.model, s.params, left, greedy=True,
                                          max_new_tokens=NEW, stop_tokens=(),
                                          padding_side="left")
    np.testing.assert_array_equal(np.asarray(no_cache.tokens), np.asarray(batch.tokens))
    beams = [decoding.beam_search(s.model, s.params, ids, beam_size=2, max_len=4,
                                  padding_side=side) for ids, side in ((s.ids, "right"),
                                                                       (left, "left"))]
    np.testing.assert_array_equal(np.asarray(beams[0].tokens), np.asarray(beams[1].tokens))

    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2\] are empty or not right-padded"
                       r".*padding_side="):
        decoding.generate(s.model, s.params, left, **kw)
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2\] look left-padded.*"
                       r"padding_side='left'"):
        decoding.generate(s.model, s.params, left, prompt_lengths=s.lengths, **kw)
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2\] look right-padded"):
        decoding.beam_search(s.model, s.params, s.ids, beam_size=2, max_len=4,
                             prompt_lengths=s.lengths, padding_side="left")
    with pytest.raises(ValueError, match=r"not left-padded"):
        decoding.generate(s.model, s.params, s.ids, padding_side="left", **kw)
    with pytest.raises(ValueError, match="padding_side='middle' must be"):
        decoding.generate(s.model, s.params, s.ids, padding_side="middle", **kw)


def test_sampling_is_reproducible_for_a_key_and_differs_across_keys():
    s, run = setup("gpt_learned"), sampled_run("gpt_learned")
    again = s.generate(rng=jax.random.key(1), temperature=0.8, stop_tokens=(),
                       return_logits=True)
    other = s.generate(rng=jax.random.key(2), temperature=0.8, stop_tokens=(),
                       return_logits=True)
    np.testing.assert_array_equal(again.tokens, run.tokens)
    assert (other.tokens != run.tokens).mean() > 0.3


def test_several_samples_a_source_encode_it_once():
    """`num_samples=k` equals sampling the sources repeated k times (source i's samples in
    rows i*k ... i*k + k - 1), with the encoder run on each source once."""
    s = setup("t5_relative_gqa")
    kw = dict(max_new_tokens=NEW, rng=jax.random.key(3), temperature=0.8, stop_tokens=())
    many = decoding.generate_seq2seq(s.model, s.params, s.ids, num_samples=3, **kw)
    repeated = decoding.generate_seq2seq(s.model, s.params, np.repeat(s.ids, 3, axis=0), **kw)
    np.testing.assert_array_equal(many.tokens, repeated.tokens)
    assert many.tokens.shape[0] == 3 * len(s.ids)
    assert (np.asarray(many.tokens[0]) != np.asarray(many.tokens[1])).any()  # distinct draws
    with pytest.raises(ValueError, match="equal rows"):
        decoding.generate_seq2seq(s.model, s.params, s.ids, max_new_tokens=NEW, greedy=True,
                                  num_samples=2)


def test_stop_tokens_end_each_row_at_its_first_stop():
    s, base = setup("gpt_learned"), sampled_run("gpt_learned")
    stop = int(base.tokens[0, 3])
    out = s.generate(rng=jax.random.key(1), temperature=0.8, stop_tokens=(stop, 60),
                     return_logits=True)
    step_logp = np.take_along_axis(log_softmax(base.logits.astype(np.float64)),
                                   base.tokens[:, :, None], axis=2)[:, :, 0]
    early = 0
    for b in range(len(s.lengths)):
        hits = np.flatnonzero(np.isin(base.tokens[b], (stop, 60)))
        n = hits[0] + 1 if len(hits) else NEW
        early += n < NEW
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], base.tokens[b, :n])
        assert (out.tokens[b, n:] == 0).all()
        np.testing.assert_allclose(out.log_probs[b], step_logp[b, :n].sum(), rtol=1e-5,
                                   atol=1e-5)
    assert early >= 1


def first_stop(tokens: np.ndarray, stops) -> int:
    """Tokens a row keeps: through the first stop sequence ending within `tokens`, else all."""
    for j in range(len(tokens)):
        for seq in stops:
            seq = (seq,) if np.ndim(seq) == 0 else tuple(seq)
            if j + 1 >= len(seq) and tuple(tokens[j + 1 - len(seq):j + 1]) == seq:
                return j + 1
    return len(tokens)


def test_stop_sequences_end_a_row_after_their_last_token():
    """Stop sequences (a stop string's tokens) mixed with single ids: a row ends after the
    first one completed in its generated tokens, against a NumPy scan of the unstopped run;
    a sequence spanning the prompt's end does not count. Likewise without the cache and with
    the `[n, w]` array (left-padded with -1) traced by a caller's jit."""
    s, base = setup("gpt_learned"), sampled_run("gpt_learned")
    t = base.tokens
    last_prompt = int(s.ids[0, s.lengths[0] - 1])
    stops = ((int(t[0, 2]), int(t[0, 3])), 60, tuple(int(x) for x in t[1, 4:7]),
             (last_prompt, int(t[0, 0])))
    kw = dict(rng=jax.random.key(1), temperature=0.8)
    out = s.generate(**kw, stop_tokens=stops)
    step_logp = np.take_along_axis(log_softmax(base.logits.astype(np.float64)),
                                   t[:, :, None], axis=2)[:, :, 0]
    early = []
    for b in range(len(s.lengths)):
        n = first_stop(t[b], stops)
        early.append(n < NEW)
        assert out.lengths[b] == n, b
        np.testing.assert_array_equal(out.tokens[b, :n], t[b, :n])
        assert (out.tokens[b, n:] == 0).all()
        np.testing.assert_allclose(out.log_probs[b], step_logp[b, :n].sum(), rtol=1e-5,
                                   atol=1e-5)
    assert early[0] and early[1]  # rows 0 and 1 meet the sequences taken from them
    assert first_stop(t[0], stops[:1]) > 2  # not at a lone token of the pair
    no_cache = jax.tree.map(np.asarray, decoding.generate_no_cache(
        s.model, s.params, s.ids, max_new_tokens=NEW, **kw, stop_tokens=stops))
    np.testing.assert_array_equal(no_cache.lengths, out.lengths)
    np.testing.assert_array_equal(no_cache.tokens, out.tokens)
    matrix = np.full((len(stops), 3), -1, np.int32)
    for i, seq in enumerate(stops):
        seq = np.atleast_1d(seq)
        matrix[i, 3 - len(seq):] = seq
    traced = jax.jit(lambda m: decoding.generate(s.model, s.params, s.ids, max_new_tokens=NEW,
                                                 **kw, stop_tokens=m))(matrix)
    np.testing.assert_array_equal(traced.tokens, out.tokens)
    np.testing.assert_array_equal(traced.lengths, out.lengths)
    for bad in ((((5, 9),),), ((),), ((5, -1, 9),), (5.0,), np.zeros((2, 2, 2), np.int32)):
        with pytest.raises(ValueError, match="each entry an id or a non-empty sequence of ids"):
            s.generate(greedy=True, stop_tokens=bad)


def test_prompts_padded_past_max_len_are_cut_to_fit():
    """Prompts bucketed to a width that leaves too little room (a harness's fixed width) are
    cut to the width max_len leaves when every row fits: the same tokens as unbucketed (they
    were refused as too long)."""
    s = setup("gpt_learned")
    new = s.cfg.max_len - 6  # room for 6 prompt columns; the longest prompt has 5
    wide = np.concatenate([s.ids, np.zeros((len(s.ids), 6), np.int32)], axis=1)
    for fn, kw in ((decoding.generate, dict(max_new_tokens=new, greedy=True)),
                   (decoding.beam_search, dict(max_len=new, beam_size=2))):
        a, b = (jax.tree.map(np.asarray, fn(s.model, s.params, ids, **kw))
                for ids in (s.ids, wide))
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        decoding.generate(s.model, s.params, wide, max_new_tokens=s.cfg.max_len - 4,
                          greedy=True)


def test_stop_tokens_and_eos_id_may_be_traced_by_a_caller_jit():
    """Documented as traced arguments: passing them through the caller's jit must work and
    give what the same values give eagerly."""
    s, base = setup("gpt_learned"), sampled_run("gpt_learned")
    stop = int(base.tokens[0, 3])
    eager = s.generate(rng=jax.random.key(1), temperature=0.8, stop_tokens=(stop, 60))
    traced = jax.jit(lambda stops: decoding.generate(
        s.model, s.params, s.ids, max_new_tokens=NEW, rng=jax.random.key(1), temperature=0.8,
        stop_tokens=stops))(jnp.asarray([stop, 60]))
    np.testing.assert_array_equal(traced.tokens, eager.tokens)
    np.testing.assert_array_equal(traced.lengths, eager.lengths)
    one_traced = jax.jit(lambda stop: decoding.generate(  # a tuple holding a traced id
        s.model, s.params, s.ids, max_new_tokens=NEW, rng=jax.random.key(1), temperature=0.8,
        stop_tokens=(stop, 60)))(jnp.int32(stop))
    np.testing.assert_array_equal(one_traced.tokens, eager.tokens)
    e = setup("encdec_sinusoidal")
    beams = e.beams(beam_size=2, eos_id=(stop, 60))
    traced = jax.jit(lambda eos: decoding.beam_search(  # several end ids as one [n] array
        e.model, e.params, e.ids, beam_size=2, max_len=NEW, eos_id=eos))(jnp.asarray([stop, 60]))
    np.testing.assert_array_equal(traced.tokens, beams.tokens)
    np.testing.assert_allclose(traced.scores, beams.scores, rtol=1e-6)


def test_no_cache_reference_matches_cached_generation():
    s, run = setup("gpt_learned"), sampled_run("gpt_learned")
    ref = decoding.generate_no_cache(s.model, s.params, s.ids, max_new_tokens=NEW,
                                     rng=jax.random.key(1), temperature=0.8, stop_tokens=(),
                                     return_logits=True)
    np.testing.assert_array_equal(np.asarray(ref.tokens), run.tokens)
    np.testing.assert_allclose(np.asarray(ref.logits), run.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's program")
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_loop_updates_the_cache_in_place(batch):
    """The compiled loop writes each layer's cache in place: no copy of a whole cache per token
    (reading it after the write, XLA:CPU made four a layer at batch 1)."""
    import re

    config = tiny(position="rotary", num_kv_heads=2)
    params = random_params(make_model(config))
    prompts = jnp.ones((batch, 3), jnp.int32)
    fn = jax.jit(lambda p, x: decoding.generate(make_model(config), p, x, max_new_tokens=5,
                                                greedy=True).tokens)
    text = fn.lower(params, prompts).compile().as_text()
    (body_name,) = set(re.findall(r"while\(.*?body=%([\w.\-]+)", text))
    start = text.index(f"%{body_name} (")
    body = text[start:text.index("\n}\n", start)]  # the loop's computation
    # [batch, kv_heads, prompt - 1 + new, head_dim]
    cache = rf"f32\[{batch},2,7,8\]\{{[0-9,]*\}}"
    assert len(re.findall(cache + r" fusion\(", body)) >= 4  # K and V of 2 layers, written
    assert not re.findall(cache + r" copy\(", body)


def test_cache_written_before_or_after_the_read_decodes_alike(monkeypatch):
    """The fast path (attend, then write the cache) against writing first and attending over
    the written cache (`FLAXFORMER_LITE_DISABLE=cached_attention`, the path accelerators take):
    the same tokens and logits, on a model with rotary positions, GQA and a ragged batch."""
    from flaxformer_lite.ops import fast_paths

    s = setup("gpt_rotary_gqa")
    fast = s.generate(greedy=True, return_logits=True)
    monkeypatch.setenv(fast_paths.ENV, "cached_attention")
    # The switch is read while tracing: one more step (a new program) is traced with it off.
    plain = decoding.generate(s.model, s.params, s.ids, max_new_tokens=NEW + 1, greedy=True,
                              return_logits=True)
    np.testing.assert_array_equal(fast.tokens, np.asarray(plain.tokens)[:, :NEW])
    np.testing.assert_allclose(fast.logits, np.asarray(plain.logits)[:, :NEW], rtol=1e-5,
                               atol=1e-5)


def test_no_loop_emits_the_padding_id():
    """A model whose every next-token distribution ranks 0 (padding) first: generation used to
    return rows of 0 that read as empty. Now the best other token, with the model's own
    log-probability (pad's mass included)."""
    s = Setup("gpt_learned")
    params = jax.tree.map(np.array, s.params)
    norm, table = params["decoder"]["final_norm"], params["token_embed"]["embedding"]
    rng = np.random.default_rng(1)
    b = rng.standard_normal(s.cfg.d_model)
    norm["scale"][:], norm["bias"][:] = 0.0, b  # every final hidden state is b
    table[0] = 10 * b / (b @ b)  # logit of 0 is 10, the others b . E_j
    logits = table @ b
    assert logits.argmax() == 0
    best = 1 + logits[1:].argmax()
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    out = decoding.generate(s.model, params, s.ids, max_new_tokens=NEW, greedy=True,
                            stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens), best)
    np.testing.assert_allclose(np.asarray(out.log_probs), NEW * logp[best], rtol=1e-5)
    # Hot enough that -1e9 / temperature stopped ruling pad out; cold enough that the scaled
    # logits overflowed and the nucleus fell back to id 0.
    for kw in (dict(temperature=3.0), dict(temperature=1e9), dict(temperature=1e30),
               dict(temperature=1e-38, top_p=0.9)):
        sampled = decoding.generate(s.model, params, s.ids, max_new_tokens=NEW, stop_tokens=(),
                                    rng=jax.random.key(0), **kw)
        assert np.all(np.asarray(sampled.tokens) != 0), kw
    beams = decoding.beam_search(s.model, params, s.ids, beam_size=3, max_len=NEW, eos_id=1)
    for row, n in zip(np.asarray(beams.tokens).reshape(-1, NEW),
                      np.asarray(beams.lengths).reshape(-1)):
        assert np.all(row[:n] != 0)


def test_top_k_one_equals_greedy():
    s = setup("gpt_rotary_gqa")
    greedy, stop = greedy_run("gpt_rotary_gqa")
    top1 = s.generate(rng=jax.random.key(5), top_k=1, stop_tokens=(stop,), return_logits=True)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(top1.lengths, greedy.lengths)
    assert greedy.lengths[0] < NEW


def test_sample_logits_filters_and_temperature_match_their_distributions():
    probs = np.array([0.5, 0.3, 0.1, 0.1])
    n = 20000
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    settings = [dict(top_p=0.75), dict(top_k=2), dict(temperature=2.0), {}, dict(greedy=True)]

    @jax.jit
    def draw(logits, key):
        return [decoding.sample_logits(logits, jax.random.fold_in(key, i), **kw)
                for i, kw in enumerate(settings)]

    top_p, top_k, hot, plain, greedy = (np.bincount(np.asarray(t), minlength=len(probs)) / n
                                        for t in draw(logits, jax.random.key(11)))
    tol = 4 * np.sqrt(0.25 / n)
    kept = probs[:2] / probs[:2].sum()
    np.testing.assert_allclose(top_p, [*kept, 0, 0], atol=tol)
    np.testing.assert_allclose(top_k, [*kept, 0, 0], atol=tol)
    np.testing.assert_allclose(hot, probs ** 0.5 / (probs ** 0.5).sum(), atol=tol)
    np.testing.assert_allclose(plain, probs, atol=tol)
    np.testing.assert_array_equal(greedy, [1, 0, 0, 0])


def test_sample_logits_sets_are_exact_under_ties():
    """Tied logits (bfloat16 models make many) must not widen the top-k or nucleus set: ties
    rank by id, as argmax does. Kept sets and frequencies against the documented definition."""
    n = 20000
    tied = jnp.tile(jnp.log(jnp.asarray([0.4, 0.2, 0.2, 0.2], jnp.float32)), (n, 1))
    top_max = jnp.tile(jnp.asarray([0.0, 2.0, 2.0, 1.0], jnp.float32), (n, 1))
    key = jax.random.key(3)
    freq = {name: np.bincount(np.asarray(jax.jit(functools.partial(
        decoding.sample_logits, **kw))(logits, jax.random.fold_in(key, i))), minlength=4) / n
        for i, (name, logits, kw) in enumerate([
            ("top_p", tied, dict(top_p=0.5)), ("top_k", tied, dict(top_k=2)),
            ("top_1", top_max, dict(top_k=1)), ("both", tied, dict(top_k=3, top_p=0.6))])}
    tol = 4 * np.sqrt(0.25 / n)
    for name in ("top_p", "top_k", "both"):  # {0, 1}: 0.4 and the first 0.2, renormalised
        np.testing.assert_allclose(freq[name], [2 / 3, 1 / 3, 0, 0], atol=tol, err_msg=name)
    np.testing.assert_array_equal(freq["top_1"], [0, 1, 0, 0])  # argmax's pick of the tie
    # Twelve tied tokens of sixteen and top_p=0.5: the first six (the float32 cumulative sum
    # of six twelfths is 0.49999997 and used to let a seventh in).
    twelve = jnp.tile(jnp.asarray([0.0] * 12 + [-jnp.inf] * 4), (n, 1))
    kept = np.bincount(np.asarray(jax.jit(functools.partial(
        decoding.sample_logits, top_p=0.5))(twelve, key)), minlength=16) / n
    np.testing.assert_allclose(kept, [1 / 6] * 6 + [0] * 10, atol=tol)


# ---- beam search ---------------------------------------------------------------------------

def test_beam_size_one_equals_greedy():
    name = "encdec_sinusoidal"
    greedy, stop = greedy_run(name)
    beams = setup(name).beams(beam_size=1, alpha=0.0, eos_id=stop)
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beams.lengths[:, 0], greedy.lengths)
    np.testing.assert_allclose(beams.log_probs[:, 0], greedy.log_probs, rtol=1e-5, atol=1e-5)
    assert greedy.lengths.min() < NEW  # EOS handling was exercised


def test_beam_scores_are_exact_and_at_least_greedy():
    """Scanned layers and grouped-query attention: the beam reordering of the cache is exact."""
    name = "gpt_rotary_gqa"
    s = setup(name)
    greedy, stop = greedy_run(name)
    alpha, k = 0.6, 3
    beams = s.beams(beam_size=k, alpha=alpha, eos_id=stop)
    b = len(s.lengths)
    tokens = beams.tokens.reshape(b * k, NEW)
    lengths = beams.lengths.reshape(-1)
    rows = np.repeat(np.arange(b), k)
    logp = s.sequence_log_probs(rows, tokens, lengths)
    np.testing.assert_allclose(beams.log_probs.reshape(-1), logp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(beams.scores.reshape(-1), logp / gnmt(lengths, alpha),
                               rtol=1e-5, atol=1e-4)
    assert (np.diff(beams.scores, axis=1) <= 0).all()  # best first
    for tok, n in zip(tokens, lengths):
        assert n == NEW or tok[n - 1] == stop
        assert stop not in tok[:n - 1] and (tok[n:] == 0).all()
    for i in range(b):
        assert len({tuple(t) for t in beams.tokens[i]}) == k  # distinct beams
    # Not a theorem for a narrow beam in general (the greedy prefix can fall out of the beam),
    # but expected of any working beam search; the exhaustive test below makes it exact.
    greedy_score = (s.sequence_log_probs(np.arange(b), greedy.tokens, greedy.lengths)
                    / gnmt(greedy.lengths, alpha))
    assert (beams.scores[:, 0] >= greedy_score - 1e-5).all()


@pytest.mark.parametrize("eos", [decoding.EOS_ID, (decoding.EOS_ID, 5)])
def test_exhaustive_beam_search_equals_brute_force(eos):
    """With a beam wider than the search space, beam search must return the exact top beams
    (of the sequences without the padding id 0, which no decoding loop emits); with several
    end ids, a sequence ends at the first of any of them."""
    vocab, steps, alpha = 6, 3, 0.6
    ends = np.atleast_1d(eos).tolist()
    s = Setup("t5_vocab6", CONFIGS["t5_relative_gqa"].replace(vocab_size=vocab))
    others = [t for t in range(vocab) if t not in ends + [decoding.PAD_ID]]
    last = [t for t in range(vocab) if t != decoding.PAD_ID]
    seqs = [[e] for e in ends] + [[a, e] for a in others for e in ends]
    seqs += [[a, b, c] for a, b in itertools.product(others, repeat=2) for c in last]
    k = len(others) ** 2 * len(last)  # all candidates of the last step fit in the beam
    beams = s.beams(beam_size=k, alpha=alpha, eos_id=eos, max_len=steps)
    tokens = np.zeros((len(seqs), steps), np.int32)
    lengths = np.array([len(q) for q in seqs])
    for i, q in enumerate(seqs):
        tokens[i, :len(q)] = q
    for b in range(len(s.lengths)):
        logp = s.sequence_log_probs(np.full(len(seqs), b), tokens, lengths)
        score = logp / gnmt(lengths, alpha)
        order = np.argsort(-score)[:k]
        np.testing.assert_allclose(beams.scores[b], score[order], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(beams.tokens[b, 0], tokens[order[0]])
        np.testing.assert_array_equal(beams.lengths[b], lengths[order])


# ---- argument checks (all raise before anything compiles) ----------------------------------

def test_value_errors():
    s, e = setup("gpt_learned"), setup("encdec_sinusoidal")
    m, p, ids = s.model, s.params, s.ids
    with pytest.raises(ValueError, match="max_len=32"):
        decoding.generate(m, p, ids, max_new_tokens=28, greedy=True)
    with pytest.raises(ValueError, match="max_len=32"):
        decoding.generate_seq2seq(e.model, e.params, e.ids, max_new_tokens=33, greedy=True)
    with pytest.raises(ValueError, match="max_len=32"):
        decoding.beam_search(e.model, e.params, e.ids, beam_size=2, max_len=40)
    with pytest.raises(ValueError, match="generate_seq2seq"):
        decoding.generate(e.model, e.params, e.ids, max_new_tokens=4, greedy=True)
    with pytest.raises(ValueError, match="generate for decoder-only"):
        decoding.generate_seq2seq(m, p, ids, max_new_tokens=4, greedy=True)
    bad = [
        dict(max_new_tokens=0, greedy=True),
        dict(max_new_tokens=4),  # sampling without rng
        dict(max_new_tokens=4, rng=jax.random.key(0), temperature=0.0),
        dict(max_new_tokens=4, rng=jax.random.key(0), top_p=0.0),
        dict(max_new_tokens=4, rng=jax.random.key(0), top_p=1.5),
        dict(max_new_tokens=4, rng=jax.random.key(0), top_k=-1),
        dict(max_new_tokens=4, greedy=True, stop_tokens=(64,)),
        dict(max_new_tokens=4, greedy=True, prompt_lengths=np.array([1, 2])),
        dict(max_new_tokens=4, greedy=True, prompt_lengths=np.array([0, 2, 3])),
    ]
    key = jax.random.key(0)
    named = [  # each refused with a ValueError naming the argument, before compiling
        ("rng", dict(rng=0)),  # a seed, not a key
        ("rng", dict(rng=jax.random.split(key, 2))),
        ("top_p", dict(rng=key, top_p=np.array([0.5, 0.9]))),
        ("top_k", dict(rng=key, top_k=True)),
        ("max_new_tokens", dict(max_new_tokens=True, greedy=True)),
        ("prompt_lengths", dict(greedy=True, prompt_lengths=np.array([2.9, 1.5, 3.0]))),
        ("prompt_lengths", dict(greedy=True, prompt_lengths=[2.9, 1.5, 3.0])),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            decoding.generate(m, p, ids, **kw)
    for name, kw in named:
        with pytest.raises(ValueError, match=name):
            decoding.generate(m, p, ids, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="prompts must hold integer ids"):
        decoding.generate(m, p, np.asarray(ids, np.float32), max_new_tokens=4, greedy=True)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(m, p, ids, beam_size=True, max_len=4)
    with pytest.raises(ValueError, match="prompts"):
        decoding.generate(m, p, ids[0], max_new_tokens=4, greedy=True)
    # Left padding, or an empty row, used to continue from a pad token without a word.
    for rows in ([[0, 0, 6, 8], [5, 6, 7, 8]], [[5, 6, 0, 0], [0, 0, 0, 0]]):
        with pytest.raises(ValueError, match="not right-padded"):
            decoding.generate(m, p, np.array(rows, np.int32), max_new_tokens=4, greedy=True)
        with pytest.raises(ValueError, match="not right-padded"):
            decoding.beam_search(m, p, np.array(rows, np.int32), beam_size=2, max_len=4)
    with pytest.raises(ValueError, match="stop_tokens"):
        decoding.generate(m, p, ids, max_new_tokens=4, greedy=True, stop_tokens=(1.5,))
    # Accepted before, then: a stop of 0 never fired; inf gave uniform draws, pad included; a
    # per-row array failed inside tracing.
    for kw, match in [(dict(stop_tokens=(0,), greedy=True), "padding id 0, which is never emitted"),
                      (dict(temperature=float("inf")), "temperature=inf must be a finite"),
                      (dict(temperature=np.array([1.0, 2.0])), "temperature must be one number")]:
        with pytest.raises(ValueError, match=match):
            decoding.generate(m, p, ids, max_new_tokens=4, rng=jax.random.key(0), **kw)
    empty_row = np.asarray(e.ids).copy()
    empty_row[1] = 0
    with pytest.raises(ValueError, match=r"inputs row\(s\) \[1\] hold only padding"):
        decoding.generate_seq2seq(e.model, e.params, empty_row, max_new_tokens=4, greedy=True)
    with pytest.raises(ValueError, match=r"inputs row\(s\) \[1\] hold only padding"):
        decoding.beam_search(e.model, e.params, empty_row, beam_size=2, max_len=4)
    with pytest.raises(ValueError, match=r"eos_id=0 must be an id in \[0, vocab_size=64\) "
                       r"but the padding id 0"):
        decoding.beam_search(m, p, ids, beam_size=2, max_len=4, eos_id=0)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(m, p, ids, beam_size=0, max_len=4)
    for bad in (64, (1, 64), (1, 0), (), [[1]], (1, 2.0), "1", True):
        with pytest.raises(ValueError, match="eos_id"):
            decoding.beam_search(m, p, ids, beam_size=2, max_len=4, eos_id=bad)
    # Ids outside the vocabulary decoded to NaN scores and tokens 0 without a word.
    for bad_ids in (np.full((2, 4), 64, np.int32), np.full((2, 4), -1, np.int32)):
        with pytest.raises(ValueError, match=r"prompts holds ids.*\[0, 64\)"):
            decoding.generate(m, p, bad_ids, max_new_tokens=4, greedy=True)
        with pytest.raises(ValueError, match="inputs holds ids"):
            decoding.beam_search(e.model, e.params, bad_ids, beam_size=2, max_len=4)


# ---- sharded and replicated params ---------------------------------------------------------

_SHARDED = textwrap.dedent("""
    import jax, numpy as np
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flaxformer_lite import decoding
    from flaxformer_lite.config import TransformerConfig
    from flaxformer_lite.models import init_params, make_model
    from flaxformer_lite.training import partitioning

    assert jax.device_count() == 8
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)

    def close(out, ref, what):
        for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=what)

    for arch in ("decoder_only", "encoder_decoder"):
        cfg = TransformerConfig(architecture=arch, vocab_size=64, d_model=32, num_heads=4,
                                num_kv_heads=2, d_ff=64, num_layers=2, max_len=32,
                                init_std=0.3, position="rotary")
        model = make_model(cfg)
        with jax.threefry_partitionable(False):  # compiles ~3x faster on XLA:CPU
            boxed = init_params(cfg, jax.random.key(0))
        params = nn.meta.unbox(boxed)
        sharded = jax.device_put(params, partitioning.logical_to_shardings(
            nn.get_partition_spec(boxed), params, mesh))
        specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
        assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
        gen = decoding.generate if arch == "decoder_only" else decoding.generate_seq2seq

        def sample(p):
            return gen(model, p, prompts, max_new_tokens=6, rng=jax.random.key(1),
                       return_logits=True)

        ref = sample(params)
        close(sample(sharded), ref, arch + " sharded")
        if arch == "decoder_only":
            beams = decoding.beam_search(model, params, prompts, beam_size=2, max_len=6)
            close(decoding.beam_search(model, sharded, prompts, beam_size=2, max_len=6), beams,
                  "beams sharded")
            close(sample(jax.device_put(params, NamedSharding(mesh, P()))), ref, "replicated")
            jitted = jax.jit(lambda p, x: gen(model, p, x, max_new_tokens=6, greedy=True))
            greedy = gen(model, params, prompts, max_new_tokens=6, greedy=True)
            close(jitted(sharded, prompts), greedy, "inside the caller's jit")
    print("ok")
""")




@pytest.mark.slow
def test_generation_with_sharded_and_replicated_params():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


_EXPLICIT = textwrap.dedent("""
    import contextlib
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flaxformer_lite import decoding
    from flaxformer_lite.config import TransformerConfig
    from flaxformer_lite.models import init_cache, make_model
    from tests.test_decoding import random_params

    assert jax.device_count() == 2
    mesh = jax.make_mesh((2,), ("data",))  # Explicit axes by default
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0], [12, 13, 14, 0]], np.int32)

    def same(out, ref, what):
        for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=what)

    base = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=1, max_len=16)
    for arch, extra in (("decoder_only", dict(position="rotary", num_kv_heads=2,
                                              scan_layers=True)),
                        ("encoder_decoder", dict(position="relative", num_kv_heads=2))):
        model = make_model(TransformerConfig(architecture=arch, **base, **extra))
        params = random_params(model)
        lm = arch == "decoder_only"
        gen = decoding.generate if lm else decoding.generate_seq2seq
        calls = {
            "sample": lambda p, x: gen(model, p, x, max_new_tokens=5, rng=jax.random.key(1),
                                       top_k=20, top_p=0.9, return_logits=True),
            "beams": lambda p, x: decoding.beam_search(model, p, x, beam_size=2, max_len=4),
        }
        if lm:
            calls["one column"] = lambda p, x: gen(model, p, x[:, :1], max_new_tokens=3,
                                                   greedy=True)
        else:
            calls["num_samples"] = lambda p, x: gen(model, p, x, max_new_tokens=3,
                                                    rng=jax.random.key(2), num_samples=2)
        refs = {name: call(params, prompts) for name, call in calls.items()}
        replicated = jax.device_put(params, NamedSharding(mesh, P()))
        split = jax.device_put(prompts, NamedSharding(mesh, P("data")))
        # Each call meets whole and batch-split prompts, one inside set_mesh and one outside,
        # the pairing alternating over the calls and flipped for the second model: sampling and
        # beams each meet all four layouts (each layout costs a compilation of the loop).
        for k, (name, call) in enumerate(calls.items()):
            split_in_mesh = (k + (not lm)) % 2 == 0
            for x, how in ((prompts, "whole prompts"), (split, "batch-split prompts")):
                in_mesh = split_in_mesh == (x is split)
                with jax.set_mesh(mesh) if in_mesh else contextlib.nullcontext():
                    what = f"{arch} {extra.get('position')} {name}, {how}, set_mesh {in_mesh}"
                    same(call(replicated, x), refs[name], what)
        in_mesh = lm  # beams inside a jit of one's own: in set_mesh for one model, out for
        with jax.set_mesh(mesh) if in_mesh else contextlib.nullcontext():  # the other
            jitted = jax.jit(calls["beams"])
            same(jitted(replicated, split), refs["beams"], f"{arch} beams in a jit")

        if lm:  # a loop of one's own: init_cache, then model.apply(..., decode=True)
            @jax.jit
            def own_loop(p, x):
                cache = init_cache(model, p, x.shape[0], 8)
                out = []
                for t in range(x.shape[1]):
                    logits, state = model.apply({"params": p, "cache": cache}, x[:, t:t + 1],
                                                decode=True, mutable=["cache"])
                    cache = state["cache"]
                    out.append(logits)
                return jnp.concatenate(out, axis=1)

            ref = own_loop(params, prompts[:, :3])
            same(own_loop(replicated, split[:, :3]), ref, "own loop")
            with jax.set_mesh(mesh):
                same(own_loop(replicated, split[:, :3]), ref, "own loop, set_mesh")
    print("ok")
""")


@pytest.mark.slow
def test_generation_on_a_mesh_with_explicit_axes():
    """`jax.make_mesh` gives Explicit axes, whose ops refuse operands of other layouts: the
    caches made on one device (`init_cache`) met keys, values and flags split over the batch
    (or replicated on the mesh). On replicated params and whole or batch-split prompts, inside
    and outside `jax.set_mesh`, every decoding call gives the one-device result."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _EXPLICIT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_inputs_as_users_pass_them(caplog, monkeypatch):
    """Lists of rows are taken as arrays; stop_tokens=None means none; a prompt as wide as
    max_len is named (the old message advised "at most 0" new tokens); a NaN alpha returned
    empty beams; sources without EOS, which the pipelines always append, are reported."""
    s, e = setup("gpt_learned"), setup("encdec_sinusoidal")
    want = s.generate(greedy=True)
    got = decoding.generate(s.model, s.params, s.ids.tolist(), max_new_tokens=NEW, greedy=True)
    np.testing.assert_array_equal(np.asarray(got.tokens), want.tokens)
    out = decoding.generate(s.model, s.params, s.ids, max_new_tokens=NEW, greedy=True,
                            stop_tokens=None)
    assert np.asarray(out.lengths).tolist() == [NEW] * len(s.ids)
    with pytest.raises(ValueError, match="differ in length; right-pad"):
        decoding.generate(s.model, s.params, [[5, 6], [7]], max_new_tokens=2, greedy=True)
    wide = np.full((1, s.cfg.max_len), 5, np.int32)
    with pytest.raises(ValueError, match="32 columns wide .* leaves no room"):
        decoding.generate(s.model, s.params, wide, max_new_tokens=1, greedy=True)
    with pytest.raises(ValueError, match="alpha=nan must be one finite number"):
        decoding.beam_search(e.model, e.params, e.ids, beam_size=2, max_len=4,
                             alpha=float("nan"))
    # Scores past the empty-beam mark (-1e9) or a penalty overflowing: real beams came back
    # as empty ones (alpha=-100) or unranked (200).
    for alpha in (-100.0, 200.0):
        with pytest.raises(ValueError, match=f"alpha={alpha:g} puts the length penalty"):
            decoding.beam_search(e.model, e.params, e.ids, beam_size=2, max_len=6, alpha=alpha)
    monkeypatch.setattr(decoding, "_WARNED_NO_EOS", False)
    with caplog.at_level("WARNING"):
        e.generate(greedy=True)
    assert "No source row holds EOS" in caplog.text and "encode_sources" in caplog.text


def test_fill_masks_ranks_the_real_tokens_by_the_model_probability():
    """Top-k of the masked-LM head's softmax over the real tokens (specials never guessed),
    padding masked out of the attention as in training; checked against NumPy."""
    from flaxformer_lite.data import MASK_ID

    cfg = get_config("bert-base", vocab_size=40, d_model=32, num_heads=4, d_ff=64,
                        num_layers=1, max_len=16, mlm_head=True)
    model, params = make_model(cfg), init_params(cfg, jax.random.key(0))
    ids = np.array([[2, 9, MASK_ID, 11, 1, 0, 0], [2, MASK_ID, 7, 8, 12, 1, 0]], np.int32)
    tokens, probs = decoding.fill_masks(model, params, ids, top_k=3)
    assert tokens.shape == probs.shape == (2, 7, 3)
    logits = np.asarray(model.apply({"params": params}, ids, segment_ids=(ids != 0) * 1)[
        "logits"], np.float64)[..., 5:]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.argsort(-p, axis=-1)[..., :3]
    for row, col in zip(*np.nonzero(ids == MASK_ID), strict=True):
        np.testing.assert_array_equal(np.asarray(tokens[row, col]), want[row, col] + 5)
        np.testing.assert_allclose(probs[row, col], p[row, col, want[row, col]], rtol=1e-4)
    top = int(want[0, 2, 0]) + 5  # excluded, the rest move up, renormalised without it
    tokens_x, probs_x = decoding.fill_masks(model, params, ids, top_k=2, exclude=[top])
    np.testing.assert_array_equal(np.asarray(tokens_x[0, 2]), want[0, 2, 1:3] + 5)
    np.testing.assert_allclose(probs_x[0, 2], p[0, 2, want[0, 2, 1:3]] / (1 - p[0, 2, top - 5]),
                               rtol=1e-4)
    one_id = decoding.fill_masks(model, params, ids, top_k=2, exclude=top)  # one id, bare
    np.testing.assert_array_equal(np.asarray(one_id[0]), np.asarray(tokens_x))
    # Asking for more guesses than ids that may be guessed returned specials, probability 0.
    with pytest.raises(ValueError, match="top_k=36 exceeds the 35 ids"):
        decoding.fill_masks(model, params, ids, top_k=36)
    with pytest.raises(ValueError, match="top_k=3 exceeds the 0 ids .*exclude fewer"):
        decoding.fill_masks(model, params, ids, top_k=3, exclude=range(40))
    for bad in ("6", [6.0], [True]):
        with pytest.raises(ValueError, match="exclude"):
            decoding.fill_masks(model, params, ids, exclude=bad)
    with pytest.raises(ValueError, match="mlm_head=True"):
        decoding.fill_masks(make_model(cfg.replace(mlm_head=False)), params, ids)
    with pytest.raises(ValueError, match="takes a EncoderOnly"):
        decoding.fill_masks(make_model(get_config("gpt2", vocab_size=40, d_model=32,
                                                     num_heads=4, d_ff=64, num_layers=1)),
                            params, ids)


# ---- decoders of the user's own -----------------------------------------------------------------

class ParallelBlockDecoder(nn.Module):
    """GPT-J-style parallel blocks (x + attention(norm x) + mlp(norm x)) from the library's
    layers, as a user writes them. `track_validity=False` ignores segment ids in decode mode:
    its own write index, causal over every written slot."""

    config: TransformerConfig
    track_validity: bool = True

    @nn.compact
    def __call__(self, ids, *, segment_ids=None, positions=None, decode=False,
                 deterministic=True):
        from flaxformer_lite import layers, ops
        from flaxformer_lite.models import decode_state

        cfg = self.config
        segment_ids = (ids != 0).astype(jnp.int32) if segment_ids is None else segment_ids
        index = None
        if decode and self.track_validity:
            mask, positions, _, index, _ = decode_state(self, ids, positions, segment_ids != 0)
        elif decode:
            started = self.has_variable("cache", "index")
            counter = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            index, mask = (counter.value if started else None), None
            if started:
                counter.value += ids.shape[1]
        else:
            mask = ops.make_attention_mask(segment_ids)
        embed = layers.Embed(cfg.vocab_size, cfg, token_table=True, name="token_embed")
        x = embed(ids)
        for i in range(cfg.num_layers):
            h = layers.Norm(cfg, name=f"norm_{i}")(x)
            x = (x + layers.MultiHeadAttention(cfg, name=f"attention_{i}")(
                     h, mask=mask, is_causal=True, decode=decode,
                     cache_index=index, q_positions=positions)
                 + layers.FeedForward(cfg, name=f"mlp_{i}")(h))
        return embed.attend(layers.Norm(cfg, name="final_norm")(x)).astype(jnp.float32)


class ParallelGPT(DecoderOnly):
    track_validity: bool = True

    def setup(self):
        self.decoder = ParallelBlockDecoder(self.config, self.track_validity)

    def __call__(self, inputs, *, segment_ids=None, positions=None, decode=False,
                 deterministic=True):
        return self.decoder(inputs, segment_ids=segment_ids, positions=positions,
                            decode=decode)


@pytest.mark.parametrize("track_validity", [True, False])
def test_a_decoder_of_your_own_generates_as_recomputation(track_validity):
    """`generate` drives a DecoderOnly subclass with its own blocks. With `decode_state`, ragged
    prompts decode as a full forward pass does; a decoder that caches whatever it is fed (no
    validity) decodes prompts of one length right, since the prefill then writes only valid
    slots, in order (it used to write each row's last token twice)."""
    cfg = tiny(position="rotary", num_kv_heads=2, num_layers=2)
    model = ParallelGPT(cfg, track_validity=track_validity)
    variables = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    params = jax.tree.map(lambda p: 4.0 * p if p.ndim > 1 else p,
                          nn.meta.unbox(variables["params"]))
    rng = np.random.default_rng(3)
    prompts = rng.integers(5, cfg.vocab_size, (3, 6)).astype(np.int32)
    if track_validity:
        prompts[1, 4:], prompts[2, 2:] = 0, 0
    run = decoding.generate(model, params, prompts, max_new_tokens=NEW, greedy=True,
                            stop_tokens=(), return_logits=True)
    ref = decoding.generate_no_cache(model, params, prompts, max_new_tokens=NEW, greedy=True,
                                     stop_tokens=(), return_logits=True)
    np.testing.assert_array_equal(np.asarray(run.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(run.logits), np.asarray(ref.logits), rtol=1e-5,
                               atol=1e-5)
    assert len(np.unique(np.asarray(run.tokens))) > 3
    if track_validity:
        beams = decoding.beam_search(model, params, prompts, beam_size=1, max_len=NEW,
                                     alpha=0.0)
        np.testing.assert_array_equal(np.asarray(beams.tokens)[:, 0], np.asarray(run.tokens))


def test_a_long_prompt_is_prefilled_in_about_a_forward_pass_of_memory():
    """The prefill attends a prompt written into an empty cache to its own keys (causal query
    blocks on the CPU path). Scored against every empty slot as well, a 1024-token prompt
    took 2.7x the forward pass's temporary memory (49 against 18 MiB here), and XLA spent
    minutes folding the masked scores of the fresh cache at 2048 tokens."""
    length = 1024
    cfg = tiny(position="rotary", max_len=length + NEW)
    model = make_model(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    prompts = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def temp_bytes(fn):
        return jax.jit(fn).lower(params, prompts).compile().memory_analysis().temp_size_in_bytes

    forward = temp_bytes(lambda p, x: model.apply({"params": p}, x))
    generate = temp_bytes(lambda p, x: decoding.generate(model, p, x, max_new_tokens=NEW,
                                                         greedy=True).tokens)
    assert generate < 1.3 * forward, (generate / 2**20, forward / 2**20)
