"""Perplexity against float64 NumPy, BLEU against sacrebleu and a hand count, exact match."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import linen as nn

from flaxformer_lite import evaluation
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import init_params, make_model

B, L, VOCAB = 4, 16, 64


def tiny(**overrides) -> TransformerConfig:
    base = dict(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=32)
    return TransformerConfig(**{**base, **overrides})


@functools.cache
def model_and_params(architecture: str):
    extra = {"mlm_head": True} if architecture == "encoder_only" else {}
    cfg = tiny(architecture=architecture, **extra)
    model = make_model(cfg)
    # NumPy-drawn weights of the right shapes (no random-initialiser compile), N(0, 0.2).
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                          shapes)
    return model, params


def lm_batches(seed=0):
    """Three [B, L] decoder-only batches: ragged padding, then one packed with segments."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(3):
        tokens = rng.integers(4, VOCAB, (B, L + 1)).astype(np.int32)
        lengths = rng.integers(3, L + 1, B)
        tokens[np.arange(L + 1)[None] > lengths[:, None]] = 0
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        if i == 2:  # packed: two segments per row, positions restart, no padding
            cut = L // 2
            batch["segment_ids"] = np.where(np.arange(L) < cut, 1, 2)[None].repeat(B, 0)
            batch["positions"] = np.concatenate([np.arange(cut), np.arange(L - cut)])[None]
            batch["positions"] = batch["positions"].repeat(B, 0).astype(np.int32)
            batch["inputs"] = rng.integers(4, VOCAB, (B, L)).astype(np.int32)
            batch["targets"] = rng.integers(4, VOCAB, (B, L)).astype(np.int32)
            batch["targets"][:, cut - 1] = 0  # the last token of a segment predicts nothing
            batch["segment_ids"] = batch["segment_ids"].astype(np.int32)
        out.append(batch)
    return out


def numpy_nll_sum(logits, targets) -> tuple[float, int]:
    """float64: sum of -log softmax(logits)[target] over targets != 0, and their count."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = targets != 0
    return float(nll[mask].sum()), int(mask.sum())


@pytest.mark.parametrize("architecture", ["decoder_only", "encoder_decoder", "encoder_only"])
def test_perplexity_matches_numpy(architecture):
    model, params = model_and_params(architecture)
    rng = np.random.default_rng(1)
    if architecture == "decoder_only":
        batches = lm_batches()
    elif architecture == "encoder_decoder":
        batches = []
        for _ in range(2):
            inputs = rng.integers(4, VOCAB, (B, L)).astype(np.int32)
            inputs[:, 10:] = 0
            targets = rng.integers(4, VOCAB, (B, L)).astype(np.int32)
            targets[1:, 7:] = 0
            batches.append({"inputs": inputs, "targets": targets})
    else:  # masked LM: targets hold the original id at the selected positions only
        batches = []
        for _ in range(2):
            inputs = rng.integers(5, VOCAB, (B, L)).astype(np.int32)
            targets = np.where(rng.random((B, L)) < 0.3, inputs, 0).astype(np.int32)
            inputs = np.where(targets != 0, 4, inputs).astype(np.int32)  # [MASK] = 4
            batches.append({"inputs": inputs, "targets": targets})

    @jax.jit
    def reference_logits(params, batch):
        kw = {k: v for k, v in batch.items() if k not in ("inputs", "targets")}
        if architecture == "encoder_decoder":
            return model.apply({"params": params}, batch["inputs"], batch["targets"], **kw)
        out = model.apply({"params": params}, batch["inputs"], **kw)
        return out["logits"] if architecture == "encoder_only" else out

    nll, count = 0.0, 0
    for batch in batches:
        s, c = numpy_nll_sum(reference_logits(params, batch), batch["targets"])
        nll, count = nll + s, count + c

    chars = 3 * count + 7
    sizes = ({} if architecture == "encoder_only"  # a masked LM has no bits per character
             else {"num_characters": chars, "num_bytes": chars + 5})
    out = evaluation.perplexity(model, params, iter(batches), **sizes)
    assert out["tokens"] == count
    np.testing.assert_allclose(out["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"], math.exp(nll / count), rtol=1e-5)
    np.testing.assert_allclose(out["bits_per_token"], nll / count / math.log(2), rtol=1e-5)
    if sizes:
        np.testing.assert_allclose(out["bits_per_character"], nll / math.log(2) / chars,
                                   rtol=1e-5)
        np.testing.assert_allclose(out["bits_per_byte"], nll / math.log(2) / (chars + 5),
                                   rtol=1e-5)


def test_token_nll_is_zero_on_padding_and_the_packed_rows_stay_separate():
    model, params = model_and_params("decoder_only")
    batch = lm_batches()[2]
    nll, weights = evaluation.token_nll(model, params, {k: jnp.asarray(v)
                                                        for k, v in batch.items()})
    np.testing.assert_array_equal(np.asarray(weights), batch["targets"] != 0)
    assert (np.asarray(nll)[batch["targets"] == 0] == 0).all()
    # The second segment scored alone (as its own row from position 0) gives the same NLL.
    cut = L // 2
    alone = {"inputs": jnp.asarray(batch["inputs"][:, cut:]),
             "targets": jnp.asarray(batch["targets"][:, cut:])}
    nll_alone, _ = evaluation.token_nll(model, params, alone)
    np.testing.assert_allclose(np.asarray(nll)[:, cut:], np.asarray(nll_alone), rtol=1e-5,
                               atol=1e-5)


def test_token_nll_checks_its_batch_and_perplexity_compiles_once(monkeypatch):
    """token_nll checks a batch as perplexity does (a -100 target gave NaN with weight 1) and
    takes `{"params": ...}`; a split's short last batch runs padded in the full batches'
    program (it compiled a second one), with the same sums."""
    model, params = model_and_params("decoder_only")
    batch = lm_batches()[0]
    bad = dict(batch, targets=np.where(batch["targets"] == 0, -100, batch["targets"]))
    with pytest.raises(ValueError, match="targets"):
        evaluation.token_nll(model, params, bad)
    with pytest.raises(ValueError, match="'inputs' and 'targets'"):
        evaluation.token_nll(model, params, {"inputs": batch["inputs"]})
    nll, _ = evaluation.token_nll(model, {"params": params}, batch)
    np.testing.assert_array_equal(nll, evaluation.token_nll(model, params, batch)[0])

    traces = []
    real = evaluation._model_logits
    monkeypatch.setattr(evaluation, "_model_logits",
                        lambda *a: traces.append(a[2]["inputs"].shape) or real(*a))
    rows = [{k: v[:, :12] for k, v in b.items()} for b in lm_batches(seed=5)[:2]]  # new shape
    split = rows + [{k: v[:3] for k, v in rows[0].items()}]
    out = evaluation.perplexity(model, params, split)
    assert traces == [(B, 12)]
    want = sum(numpy_nll_sum(np.asarray(model.apply({"params": params}, b["inputs"])),
                             b["targets"])[0] for b in split)
    np.testing.assert_allclose(out["nll"], want, rtol=1e-5)
    assert out["tokens"] == sum(int((b["targets"] != 0).sum()) for b in split)


def test_perplexity_errors():
    model, params = model_and_params("decoder_only")
    with pytest.raises(ValueError, match="no target tokens"):
        evaluation.perplexity(model, params, [])
    with pytest.raises(ValueError, match="'inputs' and 'targets'"):
        evaluation.perplexity(model, params, [{"inputs": np.ones((1, 4), np.int32)}])
    with pytest.raises(ValueError, match="num_characters=0"):
        evaluation.perplexity(model, params, lm_batches()[:1], num_characters=0)
    mlm_less = make_model(tiny(architecture="encoder_only"))
    with pytest.raises(ValueError, match="mlm_head"):
        evaluation.perplexity(mlm_less, params, [])
    mlm, mlm_params = model_and_params("encoder_only")  # bits/char would follow the mask rate
    with pytest.raises(ValueError, match="a masked LM scores only the masked"):
        evaluation.perplexity(mlm, mlm_params, [], num_characters=100)


# ---- BLEU ----------------------------------------------------------------------------------

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog",
        "hello there general kenobi"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped over the lazy dog",
        "hello there general kenobi"]


def test_bleu_equals_sacrebleu_with_its_signature():
    out = evaluation.bleu(HYPS, REFS)
    metric = sacrebleu.metrics.BLEU()
    ref = metric.corpus_score(HYPS, [REFS])
    assert out["bleu"] == pytest.approx(ref.score, abs=1e-9)
    assert out["signature"] == str(metric.get_signature())
    assert out["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert out["precisions"] == pytest.approx(ref.precisions)
    # Two reference streams and lower-casing pass through to sacrebleu unchanged.
    refs2 = [REFS, [r.upper() for r in REFS]]
    lower = sacrebleu.metrics.BLEU(lowercase=True)
    assert evaluation.bleu(HYPS, refs2, lowercase=True)["bleu"] == pytest.approx(
        lower.corpus_score(HYPS, refs2).score)


def test_bleu_of_one_sentence_by_hand():
    """n-gram matches of "the cat sat on the mat" against "the cat sat on a mat":
    1-grams 5/6 ("the" clipped to one), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; equal lengths."""
    expected = 100 * math.exp(np.mean(np.log([5 / 6, 3 / 5, 2 / 4, 1 / 3])))
    out = evaluation.bleu(HYPS[:1], REFS[:1])
    assert out["bleu"] == pytest.approx(expected, rel=1e-9)
    assert out["brevity_penalty"] == 1.0
    assert evaluation.bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_bleu_from_ids_cuts_at_eos_and_drops_padding():
    def detokenize(ids):
        return "".join(chr(i) for i in ids)

    def encode(text):
        return [ord(c) for c in text]

    width = max(len(h) for h in HYPS) + 4
    rows = np.zeros((len(HYPS), width), np.int32)
    for i, h in enumerate(HYPS):
        ids = encode(h) + [evaluation.EOS_ID] + encode(" junk after eos")[: width - len(h) - 1]
        ids = ids[:width]
        rows[i, :len(ids)] = ids
    out = evaluation.bleu_from_ids(rows, REFS, detokenize)
    assert out == evaluation.bleu(HYPS, REFS)


def test_bleu_errors():
    with pytest.raises(ValueError, match="align"):
        evaluation.bleu(HYPS, REFS[:2])
    with pytest.raises(ValueError, match="strings"):
        evaluation.bleu([[1, 2, 3]], REFS[:1])
    with pytest.raises(ValueError, match="at least one"):
        evaluation.bleu([], [])
    with pytest.raises(ValueError, match="needs references"):
        evaluation.bleu(HYPS, [])
    np_refs = evaluation.bleu(HYPS, np.array(REFS))  # a NumPy array of strings is a stream
    assert np_refs["bleu"] == evaluation.bleu(HYPS, REFS)["bleu"]


# ---- exact match ---------------------------------------------------------------------------

def test_exact_match_ignores_eos_tail_and_padding():
    rng = np.random.default_rng(0)
    n = 10
    targets = np.zeros((n, 8), np.int32)
    lengths = rng.integers(1, 7, n)
    for i, m in enumerate(lengths):
        targets[i, :m] = rng.integers(4, 20, m)
        targets[i, m] = evaluation.EOS_ID
    # Predictions: same sequences in a wider array, with tokens after EOS that must not count.
    predictions = np.full((n, 12), 7, np.int32)
    for i, m in enumerate(lengths):
        predictions[i, :m] = targets[i, :m]
        predictions[i, m] = evaluation.EOS_ID
    wrong = [1, 4, 6]
    predictions[wrong, 0] += 1  # a different first token
    predictions[9, lengths[9]] = 5  # no EOS: the prediction runs on with extra tokens
    expected = (n - len(wrong) - 1) / n
    assert evaluation.exact_match(predictions, targets) == pytest.approx(expected)
    assert evaluation.exact_match(["abc", "abd"], ["abc", "abc"]) == 0.5
    assert evaluation.strip_ids([5, 0, 6, 1, 7]) == [5, 6]
    with pytest.raises(ValueError, match="same number"):
        evaluation.exact_match(predictions[:3], targets)


def test_misuse_that_used_to_score_quietly():
    """A string scored each character as a sentence (BLEU 0); beams passed to bleu_from_ids
    were joined into one hypothesis; an unknown tokenizer raised sacrebleu's KeyError; one
    batch dict passed to perplexity iterated over its keys."""
    from flaxformer_lite import evaluation

    with pytest.raises(TypeError, match="lists of sentences"):
        evaluation.bleu("a dog runs", "a dog runs")
    beams = np.ones((2, 3, 4), np.int32)
    with pytest.raises(ValueError, match=r"beams.tokens\[:, 0\]"):
        evaluation.bleu_from_ids(beams, ["a", "b"], lambda ids: "x")
    assert isinstance(evaluation.bleu_from_ids(beams[:, 0], ["x y", "x y"],
                                               lambda ids: "x y")["bleu"], float)
    with pytest.raises(ValueError, match="tokenize='foo' is not one of sacrebleu's"):
        evaluation.bleu(["a"], ["a"], tokenize="foo")
    with pytest.raises(TypeError, match=r"perplexity\(model, params, \[batch\]\)"):
        evaluation.perplexity(None, None, {"inputs": beams[0], "targets": beams[0]})
    # exact_match compared beams [n, beams, length] joined (0.0 where the best beam is right)
    beams[:, 0, 3] = evaluation.EOS_ID
    with pytest.raises(ValueError, match=r"tokens\[:, 0\]"):
        evaluation.exact_match(beams, beams[:, 0])
    with pytest.raises(ValueError, match="strip_ids takes one sequence"):
        evaluation.strip_ids(beams[0])
    assert evaluation.exact_match(beams[:, 0], beams[:, 0, :3]) == 1.0


def test_the_variables_of_init_are_taken_as_params_everywhere():
    """`{"params": ...}` as Flax's FrozenDict (token_nll took it; perplexity and generate said
    the params held parameters the model never reads)."""
    from flax.core import freeze

    from flaxformer_lite import decoding

    model, params = model_and_params("decoder_only")
    frozen = freeze({"params": params})
    batches = lm_batches()[:1]
    assert evaluation.perplexity(model, frozen, batches) == evaluation.perplexity(
        model, params, batches)
    prompts = batches[0]["inputs"][:2, :3]
    np.testing.assert_array_equal(
        decoding.generate(model, frozen, prompts, max_new_tokens=2, greedy=True).tokens,
        decoding.generate(model, params, prompts, max_new_tokens=2, greedy=True).tokens)


def test_perplexity_feeds_a_models_extra_batch_keys(caplog):
    """A model of one's own reading another batch entry (`extra_batch_keys`): perplexity used
    to drop it (scoring another function than the eval step's) and warn that it is unread."""
    from flaxformer_lite.models import DecoderOnly
    from flaxformer_lite.training import Engine, OptimizerConfig, ParallelConfig

    class Scaled(DecoderOnly):
        extra_batch_keys = ("row_scale",)

        def __call__(self, inputs, *, row_scale=None, **kwargs):
            logits = super().__call__(inputs, **kwargs)
            if row_scale is None:  # initialisation
                return logits
            return logits * (1.0 + row_scale[:, :1, None].astype(jnp.float32))

    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, num_heads=2, d_ff=64, num_layers=1,
                            max_len=L)
    model = Scaled(cfg)
    engine = Engine(cfg, OptimizerConfig(), ParallelConfig(mode="single"), model=model)
    state = engine.init_state(0)
    ids = np.random.default_rng(0).integers(5, VOCAB, (2, 9)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "row_scale": np.full((2, 8), 3)}
    sums = engine.metrics_to_host(engine.eval_step(state, batch))
    with caplog.at_level("WARNING"):
        ours = evaluation.perplexity(model, engine.params(state), [batch])
    np.testing.assert_allclose(ours["loss"], sums["loss"] / sums["tokens"], rtol=1e-5)
    assert "row_scale" not in caplog.text
