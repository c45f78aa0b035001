"""Sequence classification with the encoder-only model: the config field, the classifier head
against float64 NumPy, the per-example loss and its padding rule, the update on one device and
on a mesh, train() on a learnable task, fine-tuning from a masked-LM run, the labelled-text
loaders and `evaluation.classify`."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import flaxformer_lite as fl
from flaxformer_lite import evaluation
from flaxformer_lite import params as params_lib
from flaxformer_lite.config import TransformerConfig, model_config_dict
from flaxformer_lite.data import (
    BOS_ID,
    EOS_ID,
    CharTokenizer,
    classification_pipeline,
    encode_texts,
    load_tfds_labelled,
    read_labelled_file,
)
from flaxformer_lite.models import check_batch, flat_leaves
from flaxformer_lite.training import (
    Engine,
    LossConfig,
    OptimizerConfig,
    ParallelConfig,
    load_params,
    load_run,
    summarize,
    train,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB, LENGTH, CLASSES = 24, 10, 3
CFG = fl.get_config("bert-base", vocab_size=VOCAB, d_model=16, num_heads=2, d_ff=32,
                    num_layers=1, max_len=LENGTH, num_classes=CLASSES, dropout_rate=0.0,
                    attention_dropout_rate=0.0)
OPT = OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_steps=0)
LOSS = LossConfig(label_smoothing=0.1, z_loss=1e-3)


def random_batch(rng, rows, length=LENGTH, pad_rows=0):
    """Rows of BOS + random tokens + EOS + padding, and labels; `pad_rows` all-zero rows."""
    inputs = np.zeros((rows, length), np.int32)
    for i in range(rows - pad_rows):
        n = rng.integers(1, length - 1)
        inputs[i, :n + 2] = [BOS_ID, *rng.integers(5, VOCAB, n), EOS_ID]
    labels = rng.integers(0, CLASSES, rows).astype(np.int32)
    return {"inputs": inputs, "labels": labels}


@pytest.fixture(scope="module")
def engine():
    return Engine(CFG, OPT, ParallelConfig(mode="single"), LOSS)


@pytest.fixture(scope="module")
def state(engine):
    return engine.init_state(0)


# ---- config -------------------------------------------------------------------------------------

def test_config_field_is_validated():
    with pytest.raises(ValueError, match=r"num_classes=2 needs pooler=True"):
        CFG.replace(pooler=False, num_classes=2)
    with pytest.raises(ValueError, match=r"num_classes=2 has no effect with "
                       r"architecture='decoder_only'"):
        fl.get_config("gpt2", num_classes=2)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_classes"):
            CFG.replace(num_classes=bad)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CFG.replace(num_classes=1)
    # A config recorded before the field existed loads, without a classifier.
    record = dataclasses.asdict(CFG)
    del record["num_classes"]
    assert TransformerConfig(**record).num_classes == 0
    assert "num_classes" in model_config_dict("bert-base")  # settable as a flag


# ---- the head ----------------------------------------------------------------------------------

def test_class_logits_equal_numpy(state):
    """class_logits = tanh(hidden[:, 0] W_p + b_p) W_c + b_c, recomputed in float64 from the
    parameters and the model's hidden states."""
    params = nn.meta.unbox(state.params)
    model = fl.make_model(CFG)
    batch = random_batch(np.random.default_rng(0), 4)
    out = model.apply({"params": params}, batch["inputs"])
    assert out["class_logits"].shape == (4, CLASSES)
    assert out["class_logits"].dtype == np.float32
    h0 = np.asarray(out["hidden"], np.float64)[:, 0]
    p, c = params["pooler"], params["classifier"]
    pooled = np.tanh(h0 @ np.float64(p["kernel"]) + np.float64(p["bias"]))
    want = pooled @ np.float64(c["kernel"]) + np.float64(c["bias"])
    np.testing.assert_allclose(out["class_logits"], want, rtol=1e-5, atol=1e-6)
    # The masked-LM head beside it would ride along untrained: refused.
    with pytest.raises(ValueError, match=r"num_classes=\d with mlm_head=True: the steps train "
                       "the classifier alone"):
        CFG.replace(mlm_head=True)


def test_params_count_the_classifier_under_output_head():
    base = params_lib.breakdown(CFG.replace(num_classes=0))
    with_head = params_lib.breakdown(CFG)
    assert with_head["output_head"] - base["output_head"] == (CFG.d_model + 1) * CLASSES
    assert with_head["total"] - base["total"] == (CFG.d_model + 1) * CLASSES
    assert params_lib.count("bert-base") == 109_482_240  # the published backbone, no head
    # Run once a sequence, like the pooler: not in the per-token matmul count.
    assert params_lib.matmul_params(CFG) == params_lib.matmul_params(CFG.replace(num_classes=0))


# ---- loss, metrics, padding ---------------------------------------------------------------------

def numpy_sums(logits, labels, weights, eps, z_coef):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits - log_z[:, None]
    nll = -logp[np.arange(len(labels)), labels]
    loss = (1 - eps) * nll + eps * (-logp.mean(-1)) + z_coef * log_z ** 2
    return {"loss": (loss * weights).sum(), "nll": (nll * weights).sum(),
            "correct": ((logits.argmax(-1) == labels) * weights).sum(),
            "tokens": weights.sum()}


def test_eval_sums_equal_numpy_and_padding_rows_weigh_zero(engine, state):
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 6, pad_rows=2)  # two rows of padding with (random) labels
    batch["labels"][-2:] = [2, 1]
    params = nn.meta.unbox(state.params)
    logits = fl.make_model(CFG).apply({"params": params}, batch["inputs"])["class_logits"]
    weights = np.array([1, 1, 1, 1, 0, 0], np.float64)
    want = numpy_sums(logits, batch["labels"], weights, 0.1, 1e-3)
    got = engine.metrics_to_host(engine.eval_step(state, batch))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, err_msg=k)
    assert got["tokens"] == 4 and got["sequences"] == 4
    # Padded further with Engine.pad_batch's rows: the same sums.
    padded = engine.pad_batch({k: v[:4] for k, v in batch.items()}, rows=9)
    assert padded["labels"].shape == (9,) and not padded["inputs"][4:].any()
    again = engine.metrics_to_host(engine.eval_step(state, padded))
    for k in want:
        np.testing.assert_allclose(again[k], got[k], rtol=1e-6, err_msg=k)
    means = summarize(got)
    assert means["accuracy"] == got["correct"] / 4


def test_train_step_gradient_is_the_mean_over_real_examples(engine, state):
    """Adding padding rows to a train batch changes neither the loss sums nor the update."""
    rng = np.random.default_rng(2)
    batch = random_batch(rng, 4)
    s1, m1 = engine.train_step(state, batch)
    big = Engine(CFG, OPT, ParallelConfig(mode="single"), LOSS)
    s2, m2 = big.train_step(big.init_state(0), engine.pad_batch(batch, rows=8))
    m1, m2 = engine.metrics_to_host(m1), big.metrics_to_host(m2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    a, b = engine.params(s1), big.params(s2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_check_batch_refuses_bad_labels():
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 3)
    check_batch(CFG, batch)
    with pytest.raises(ValueError, match=r"'labels' holds class ids from .* to 3; they must lie "
                       r"in \[0, 3\)"):
        check_batch(CFG, {**batch, "labels": np.array([0, 1, 3], np.int32)})
    with pytest.raises(ValueError, match=r"labels' has shape \(3, 1\)"):
        check_batch(CFG, {**batch, "labels": batch["labels"][:, None]})
    with pytest.raises(ValueError, match=r"no 'labels' entry"):
        check_batch(CFG, {"inputs": batch["inputs"]})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        check_batch(CFG, {**batch, "labels": batch["labels"][:2]})


# ---- one device and a mesh ----------------------------------------------------------------------

MESH_SCRIPT = """
import json, sys
import jax, numpy as np
import flaxformer_lite as fl
from flaxformer_lite.training import Engine, LossConfig, OptimizerConfig, ParallelConfig
cfg = fl.get_config("bert-base", vocab_size=24, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                    max_len=10, num_classes=3, dropout_rate=0.0, attention_dropout_rate=0.0)
opt = OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_steps=0)
loss = LossConfig(label_smoothing=0.1)
rng = np.random.default_rng(0)
inputs = rng.integers(5, 24, (8, 10)).astype(np.int32)
inputs[[1, 2, 3], :] = 0           # padding rows, all on the first devices' shards
labels = rng.integers(0, 3, 8).astype(np.int32)
batch = {"inputs": inputs, "labels": labels}
out = {}
for name, par, devices in (("single", ParallelConfig(mode="single"), jax.devices()[:1]),
                           ("mesh", ParallelConfig(mode="mesh", data=2, fsdp=2), None),
                           ("micro", ParallelConfig(mode="mesh", data=2, fsdp=2, microbatches=2),
                            None)):
    engine = Engine(cfg, opt, par, loss, devices=devices)
    state = engine.init_state(0)
    for _ in range(2):
        state, metrics = engine.train_step(state, batch)
    out[name] = {"params": [np.asarray(x).tolist() for x in jax.tree.leaves(engine.params(state))],
                 "loss": float(engine.metrics_to_host(metrics)["loss"]),
                 "eval": {k: float(v) for k, v in engine.metrics_to_host(
                     engine.eval_step(state, {k: v[:5] for k, v in batch.items()})).items()}}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_one_device_and_a_mesh_give_the_same_update(tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4").strip()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.json")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for other in ("mesh", "micro"):
        np.testing.assert_allclose(out[other]["loss"], out["single"]["loss"], rtol=1e-5)
        for a, b in zip(out[other]["params"], out["single"]["params"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
        for k, v in out["single"]["eval"].items():
            np.testing.assert_allclose(out[other]["eval"][k], v, rtol=1e-5, err_msg=k)
    assert out["single"]["eval"]["tokens"] == 2  # 5 rows (padded to 8 on the mesh), 3 padding


# ---- train() on a learnable task ----------------------------------------------------------------

TASK = CFG.replace(num_classes=2, d_model=32, num_heads=4, d_ff=64, max_len=12)


def token_task(rng, n):
    """Label 1 when token 7 occurs among 8 random tokens of 5..23 (about half of the rows)."""
    rows = np.zeros((n, 12), np.int32)
    body = rng.integers(5, VOCAB, (n, 8))
    body[rng.random(n) < 0.3, rng.integers(0, 8)] = 7
    rows[:, 0], rows[:, 1:9], rows[:, 9] = BOS_ID, body, EOS_ID
    labels = (body == 7).any(axis=1).astype(np.int32)
    return rows, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_x, train_y = token_task(rng, 2048)
    eval_x, eval_y = token_task(rng, 200)
    eval_batches = [{"inputs": eval_x[i:i + 64], "labels": eval_y[i:i + 64]}
                    for i in range(0, 200, 64)]  # the last one holds 8 rows

    def batches():
        for i in range(10_000):
            j = (i * 32) % 2048
            yield {"inputs": train_x[j:j + 32], "labels": train_y[j:j + 32]}

    workdir = tmp_path_factory.mktemp("cls_run")
    result = train(TASK, OptimizerConfig(learning_rate=2e-3, schedule="constant",
                                         warmup_steps=0), batches, workdir=workdir,
                   num_steps=300, eval_data=lambda: eval_batches, eval_every=300,
                   checkpoint_every=150, log_every=150, hooks=[])
    majority = max(eval_y.mean(), 1 - eval_y.mean())
    return result, workdir, batches, eval_batches, majority


def test_train_learns_the_task_and_resumes(trained):
    result, workdir, batches, eval_batches, majority = trained
    final = result.history[-1]
    assert final["eval/tokens"] == 200  # examples; the short last batch is padded, weight 0
    assert final["eval/accuracy"] > majority + 0.2, (final, majority)
    assert final["train/tokens"] == 150 * 32
    # A rerun resumes from the checkpoint at step 300 and trains on.
    again = train(TASK, result.engine.optimizer_config, batches, workdir=workdir,
                  num_steps=310, engine=result.engine, hooks=[], log_every=10)
    assert again.step == 310 and again.history[0]["step"] == 310
    assert again.history[0]["train/steps"] == 10
    run = load_run(workdir)
    assert run.config.num_classes == 2 and run.step == 310


def test_classify_predicts_what_the_eval_step_scores(trained):
    result, _, _, eval_batches, _ = trained
    model, params = fl.make_model(TASK), result.params
    x = np.concatenate([b["inputs"] for b in eval_batches])
    y = np.concatenate([b["labels"] for b in eval_batches])
    out = evaluation.classify(model, params, x, batch_size=48)  # 200 rows: a padded last batch
    assert out["labels"].shape == (200,) and out["probabilities"].shape == (200, 2)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)
    assert (out["labels"] == y).mean() == pytest.approx(result.history[-1]["eval/accuracy"])
    logits = model.apply({"params": params}, x[:5])["class_logits"]
    np.testing.assert_allclose(out["probabilities"][:5], jax.nn.softmax(logits), rtol=1e-5)
    # Short inputs pad to a power of two (few compiled shapes, where each row count compiled
    # its own); the padding rows change nothing.
    for n in (1, 3, 5, 7):
        part = evaluation.classify(model, params, x[:n], batch_size=48)
        np.testing.assert_allclose(part["probabilities"], out["probabilities"][:n], rtol=1e-5)
    with pytest.raises(ValueError, match=r"classify: params hold 5 parameter\(s\) this "
                       r"EncoderOnly never reads \(mlm_bias"):  # a masked LM's, for instance
        head = nn.meta.unbox(fl.init_params(TASK.replace(mlm_head=True, num_classes=0),
                                            jax.random.key(0)))
        evaluation.classify(model, {**nn.meta.unbox(params), **{
            k: v for k, v in head.items() if k.startswith("mlm")}}, x)
    with pytest.raises(ValueError, match="num_classes > 0"):
        evaluation.classify(fl.make_model(TASK.replace(num_classes=0)),
                            fl.init_params(TASK.replace(num_classes=0), jax.random.key(0)), x)
    with pytest.raises(ValueError, match="all padding"):
        evaluation.classify(model, params, np.zeros((2, 12), np.int32))
    with pytest.raises(ValueError, match="tokenizer"):
        evaluation.classify(model, params, ["a text"])



def test_classify_refuses_pairs_and_warns_on_rows_without_bos(monkeypatch, caplog):
    model, params = fl.make_model(CFG), fl.init_params(CFG, jax.random.key(0))
    tok = CharTokenizer.from_texts(["a man rides"], reserve_mask=True)
    with pytest.raises(TypeError, match=r"classify: input 0 is a tuple of texts .*sentence "
                       r"pairs are not supported"):
        evaluation.classify(model, params, [("A man rides.", "A person rides.")], tokenizer=tok)
    with pytest.raises(TypeError, match="sentence pairs are not supported"):
        encode_texts(tok, [["a man", "rides"]], 8)
    monkeypatch.setattr(evaluation, "_UNFRAMED_WARNED", False)
    framed = random_batch(np.random.default_rng(0), 4)["inputs"]
    with caplog.at_level("WARNING", logger="flaxformer_lite.evaluation"):
        evaluation.classify(model, params, framed)
        assert "BOS" not in caplog.text
        bare = np.zeros_like(framed)
        bare[:, :3] = [7, 8, 9]  # a bare tokenizer.encode: no [BOS] ... [EOS]
        bare[0] = framed[0]
        evaluation.classify(model, params, bare)
        evaluation.classify(model, params, bare)
    assert caplog.text.count("3 of 4 id rows do not start with BOS") == 1  # once a process
    # An empty list (no texts, no ids) gave "inputs is float64"; FrozenDict variables were
    # refused as unread parameters.
    empty = evaluation.classify(model, params, [], tokenizer=tok)
    assert empty["labels"].shape == (0,) and empty["probabilities"].shape == (0, CFG.num_classes)
    from flax.core import freeze

    np.testing.assert_array_equal(
        evaluation.classify(model, freeze({"params": params}), framed)["probabilities"],
        evaluation.classify(model, params, framed)["probabilities"])


# ---- fine-tuning from a masked-LM run -----------------------------------------------------------

def test_fine_tune_from_a_masked_lm_run(tmp_path):
    """The documented route: a masked-LM run's parameters merged into the classifier's fresh
    ones carry the encoder and pooler over and initialise the classifier."""
    mlm = TASK.replace(num_classes=0, mlm_head=True)
    rng = np.random.default_rng(4)
    x, y = token_task(rng, 64)
    targets = np.where(rng.random(x.shape) < 0.15, x, 0).astype(np.int32)
    mlm_batches = [{"inputs": x[i:i + 16], "targets": targets[i:i + 16]}
                   for i in range(0, 64, 16)]
    train(mlm, OPT, mlm_batches, workdir=tmp_path / "mlm", num_steps=4, hooks=[],
          checkpoint_every=None)
    _, pretrained = load_params(tmp_path / "mlm" / "checkpoints")
    merged, report = fl.merge_params(fl.init_params(TASK, jax.random.key(1)), pretrained)
    assert sorted(report.initialised) == ["classifier/bias", "classifier/kernel"]
    assert report.dropped == ["mlm_bias", "mlm_norm/bias", "mlm_norm/scale",
                              "mlm_transform/bias", "mlm_transform/kernel"]
    assert "pooler/kernel" in report.copied and not report.resized
    batches = [{"inputs": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    result = train(TASK, OPT, batches, workdir=tmp_path / "cls", num_steps=4, hooks=[],
                   init_params=merged, eval_data=lambda: batches[:1], log_every=2)
    assert np.isfinite(result.history[-1]["eval/loss"])
    engine = result.engine
    start = flat_leaves(engine.params(engine.init_state(0, params=merged)))
    before = flat_leaves(nn.meta.unbox(pretrained))
    for k in ("encoder/layers/layer_0/mlp/wi/kernel", "pooler/kernel",
              "token_embed/embedding"):
        np.testing.assert_array_equal(start[k], before[k])


# ---- data ------------------------------------------------------------------------------------

def test_read_labelled_file_sst2_style(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit \'s a "charming" journey \t1\n\nflat and dull\t0\n')
    assert read_labelled_file(path, num_classes=2) == [
        {"text": 'it \'s a "charming" journey ', "label": 1},
        {"text": "flat and dull", "label": 0}]
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('id,review,mood\n1,"good, really",pos\n2,bad,neg\n3,so-so,neutral\n')
    got = read_labelled_file(csv_path, text_column="review", label_column="mood",
                             label_names=["neg", "neutral", "pos"])
    assert got == [{"text": "good, really", "label": 2}, {"text": "bad", "label": 0},
                   {"text": "so-so", "label": 1}]


@pytest.mark.parametrize("content, kwargs, message", [
    ("", {}, r"train.tsv: the file is empty"),
    ("text\tlabel\na\t1\n", {}, r"train.tsv:1: the header names the columns \['text', "
     r"'label'\], not \['sentence'\]; pass text_column="),
    ("sentence\tlabel\na\t1\nb\t2\n", {"num_classes": 2}, r"train.tsv:3: label 2 is outside "
     r"\[0, num_classes=2\)"),
    ("sentence\tlabel\na\tpositive\n", {}, r"train.tsv:2: label 'positive' is not a class id.*"
     r"label_names"),
    ("sentence\tlabel\na\tgreat\n", {"label_names": ["neg", "pos"]},
     r"train.tsv:2: label 'great' is not one of label_names \['neg', 'pos'\]"),
    ("sentence\tlabel\nno tab here\n", {}, r"train.tsv:2: the row has 1 field"),
    # a tab inside the text: 'first half' would be read with label 0, the rest dropped
    ("sentence\tlabel\nfirst half\tsecond half\t0\n", {},
     r"train.tsv:2: the row has 3 field\(s\), the header 2 .*remove the tab"),
    ("sentence\tlabel\nx\t-1\n", {"num_classes": 2},
     r"train.tsv:2: label -1 is negative; class ids start at 0 \(GLUE's test files .*"
     r"label_column=None\)\.$"),
    ("sentence1\tsentence2\tlabel\nA man rides.\tA person rides.\t1\n",
     {"text_column": "sentence1"}, r"train.tsv:1: .*sentence pairs are not supported"),
    ("#1 ID\t#2 ID\t#1 String\t#2 String\tQuality\n", {"text_column": "#1 String",
     "label_column": "Quality"}, r"a sentence pair \('#1 string' and '#2 string'\); "
     r"sentence pairs are not supported"),
    ("gj04\t1\t\tfine\n", {"text_column": "sentence", "header": False},
     r"header=False: a file without a header line has no names; pass the column's number"),
    ("sentence\tlabel\n", {}, r"train.tsv: a header but no examples"),
])
def test_read_labelled_file_errors_name_file_line_and_fix(tmp_path, content, kwargs, message):
    path = tmp_path / "train.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_labelled_file(path, **kwargs)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_labelled_file(tmp_path / "missing.tsv")


def test_read_labelled_file_refuses_a_csv_row_split_by_an_unquoted_comma(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("sentence,label\nScored 10,1,0\n")  # the label 0, not the 1 of the text
    with pytest.raises(ValueError, match=r"scores.csv:2: the row has 3 field\(s\), the header "
                       r"2 .*quote the text field"):
        read_labelled_file(path, num_classes=2)
    path.write_text('sentence,label\n"Scored 10,1",0\n')
    assert read_labelled_file(path, num_classes=2) == [{"text": "Scored 10,1", "label": 0}]


def test_read_labelled_file_glue_layouts_bom_and_lines(tmp_path):
    cola = tmp_path / "cola.tsv"  # GLUE's CoLA: no header; source, label, mark, sentence
    cola.write_text("gj04\t1\t\tOur friends will not buy this analysis.\n"
                    "gj04\t0\t*\tOne more pseudo generalization.\n")
    assert read_labelled_file(cola, text_column=3, label_column=1, num_classes=2) == [
        {"text": "Our friends will not buy this analysis.", "label": 1},
        {"text": "One more pseudo generalization.", "label": 0}]
    assert read_labelled_file(cola, text_column=3, label_column=1, header=True) == [
        {"text": "One more pseudo generalization.", "label": 0}]
    cola.write_text("gj04\t1\t\tfine\ngj04\t0\tfine\n")
    with pytest.raises(ValueError, match=r"cola.tsv:2: the row has 3 field\(s\), the first "
                       r"row 4"):
        read_labelled_file(cola, text_column=3, label_column=1)
    test = tmp_path / "test.tsv"  # GLUE's test split: no labels
    test.write_text("index\tsentence\n0\tit 's a charming journey .\n1\tflat\n")
    texts = read_labelled_file(test, label_column=None)
    assert texts == [{"text": "it 's a charming journey ."}, {"text": "flat"}]
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_text("sentence,label\nnice,1\n", encoding="utf-8-sig")
    assert read_labelled_file(bom) == [{"text": "nice", "label": 1}]
    multi = tmp_path / "multi.csv"  # a quoted text over three lines: 'bad,x' is on line 6
    multi.write_text('sentence,label\n"line one\nline two\nline three",1\nok,0\nbad,x\n')
    with pytest.raises(ValueError, match=r"multi.csv:6: label 'x' is not a class id"):
        read_labelled_file(multi)


def test_classification_pipeline_frames_batches_and_counts_truncation():
    tok = CharTokenizer.from_texts(["abcdefgh"], reserve_mask=True)
    data = [{"text": "abc", "label": 1}, {"text": "abcdefgh", "label": 0},
            {"text": "", "label": 2}]
    pipe = classification_pipeline(data, tok, batch_size=2, max_len=6, num_classes=3,
                                    shuffle=False, num_epochs=1)
    batches = list(pipe)
    assert len(batches) == 2
    first, last = batches
    assert first["inputs"].shape == (2, 6) and first["labels"].tolist() == [1, 0]
    assert first["inputs"][0].tolist() == [BOS_ID, *tok.encode("abc"), EOS_ID, 0]
    assert first["inputs"][1].tolist() == [BOS_ID, *tok.encode("abcd"), EOS_ID]  # cut to 6
    assert last["inputs"][0].tolist()[:2] == [BOS_ID, EOS_ID] and last["labels"][0] == 2
    assert not last["inputs"][1].any() and last["labels"][1] == 0  # filler row: weight 0
    assert pipe.stats.truncated == 1 and pipe.stats.tokens_dropped == 4
    np.testing.assert_array_equal(encode_texts(tok, ["abc", "abcdefgh"], 6), first["inputs"])
    with pytest.raises(ValueError, match=r"example 1 has label 5, not a class id in \[0, "
                       r"num_classes=3\)"):
        classification_pipeline([data[0], {"text": "x", "label": 5}], tok, batch_size=2,
                                 max_len=6, num_classes=3)
    with pytest.raises(ValueError, match=r"need the fields \['text', 'label'\]"):
        classification_pipeline([{"sentence": "x", "label": 0}], tok, batch_size=2, max_len=6)



@pytest.mark.parametrize("example, num_classes, message", [
    ({"text": "x", "label": "pos"}, None, r"example 1 has label 'pos', not a class id \(>= 0\): "
     r"map label names to ids"),
    ({"text": "x", "label": 1.7}, None, r"example 1 has label 1.7, .*not floats, which would be "
     r"truncated"),
    ({"text": "x", "label": -1}, None, r"example 1 has label -1, not a class id \(>= 0\): class "
     r"ids start at 0"),
    ({"text": "x", "label": np.array([0.0, 1.0])}, None, r"example 1 has label array.*one-hot"),
    ({"text": "x", "label": True}, 2, r"example 1 has label True, not a class id in \[0, "
     r"num_classes=2\)"),
    ({"text": ("A man rides.", "A person rides."), "label": 1}, None,
     r"example 1's text is a tuple of 2 .*sentence pairs are not supported"),
    ({"text": b"bytes", "label": 1}, None, r"example 1's text is a bytes .*not a str"),
])
def test_classification_pipeline_checks_every_example_up_front(example, num_classes, message):
    tok = CharTokenizer.from_texts(["abc"], reserve_mask=True)
    with pytest.raises((ValueError, TypeError), match=message):
        classification_pipeline([{"text": "abc", "label": 0}, example], tok, batch_size=2,
                                max_len=6, num_classes=num_classes)


def test_classification_pipeline_refuses_texts_without_labels(tmp_path):
    path = tmp_path / "test.tsv"  # GLUE's test split: texts to predict
    path.write_text("index\tsentence\n0\tabc\n")
    tok = CharTokenizer.from_texts(["abc"], reserve_mask=True)
    with pytest.raises(ValueError, match=r"texts without labels .*evaluation.classify"):
        classification_pipeline(read_labelled_file(path, label_column=None), tok,
                                batch_size=2, max_len=6)


def test_classification_truncation_warning_gives_advice_that_applies(monkeypatch, caplog):
    monkeypatch.setattr("flaxformer_lite.data.pipeline._TRUNCATION_WARNED", set())
    tok = CharTokenizer.from_texts(["abcdefgh"], reserve_mask=True)
    with caplog.at_level("WARNING", logger="flaxformer_lite.data.pipeline"):
        pipe = classification_pipeline([{"text": "abcdefgh", "label": 0}], tok, batch_size=1,
                                       max_len=6, num_epochs=1)
        list(pipe)
    assert "raise max_len" in caplog.text and "accept the cut" in caplog.text
    assert "window_pipeline" not in caplog.text and "unit='line'" not in caplog.text
    assert pipe.stats.truncated == 1


def test_load_tfds_labelled(monkeypatch, tmp_path):
    """Without network or a prepared dataset: the refusal names how to prepare it; a stand-in
    data source (what `tfds.data_source` returns, indexable records) gives the examples."""
    import tensorflow_datasets as tfds

    with pytest.raises(RuntimeError, match=r"tfds build glue/sst2 --file_format=array_record"):
        load_tfds_labelled("glue/sst2", "train", data_dir=tmp_path)
    records = [{"idx": 0, "sentence": b"a gem", "label": 1},
               {"idx": 1, "sentence": b"a dud", "label": 0}]
    monkeypatch.setattr(tfds, "data_source", lambda name, split, **kw: records)
    assert load_tfds_labelled("glue/sst2", "validation", data_dir=tmp_path) == [
        {"text": "a gem", "label": 1}, {"text": "a dud", "label": 0}]
    records.append({"idx": 2, "sentence": b"?", "label": -1})
    with pytest.raises(ValueError, match=r"example 2: label -1 .*'validation'"):
        load_tfds_labelled("glue/sst2", "test", data_dir=tmp_path)
