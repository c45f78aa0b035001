"""The experiment scripts end to end on tiny configs: train, evaluate, write, resume."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxformer_lite import get_config
from flaxformer_lite.models import init_params

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--config.model.d_model=32", "--config.model.num_heads=2",
              "--config.model.d_ff=64", "--config.model.num_layers=1"]


def run(script, workdir, *flags):
    cmd = [sys.executable, str(ROOT / "experiments" / script), f"--workdir={workdir}",
           "--config.progress=False" if script != "translate.py" else "--config.log_every=5",
           *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               FLAXFORMER_LITE_COMPILATION_CACHE=str(Path(workdir).parent / "jax_cache"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lm_trains_on_a_local_file_and_resumes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    common = [f"--config.dataset={text}", f"--config.data_dir={tmp_path / 'data'}",
              "--config.seq_len=16", "--config.batch_size=4", "--config.eval_every=10",
              "--config.eval_batches=2", "--config.log_every=5", "--config.sample_length=8",
              "--config.model.max_len=32", "--config.optimizer.warmup_steps=2",
              "--config.optimizer.decay_steps=20", *TINY_MODEL,
              # Settings meant for GPUs, exact anywhere: rows of running text hold no padding.
              "--config.model.padding=trailing", "--config.model.vocab_pad_multiple=16"]
    work = tmp_path / "work"
    out = run("lm.py", work, "--config.num_steps=10", *common)
    assert f"compilation cache {tmp_path / 'jax_cache'}" in out
    # The parallel mode is printed at start: the config splits the CPU into two devices.
    assert "2 device(s) [cpu]" in out and "mesh" in out
    cached = set(os.listdir(tmp_path / "jax_cache"))
    # The second run loads the init from disk (on Intel CPUs the steps hold oneDNN calls,
    # which XLA cannot serialize, and are compiled again).
    assert any("_create" in name for name in cached)
    first = metrics(work)
    assert [m["step"] for m in first] == [10]
    assert 0 < first[0]["eval_loss"] < 10
    # eval_loss is the nll (as train_nll); the smoothed objective is kept beside it.
    assert first[0]["eval_loss"] == first[0]["eval_nll"] and "eval_objective" in first[0]
    run("lm.py", work, "--config.num_steps=20", *common)
    second = metrics(work)
    assert [m["step"] for m in second] == [10, 20]  # resumed from step 10, not restarted
    assert second[1]["eval_loss"] < second[0]["eval_loss"]
    assert (work / "loss.png").exists() and (work / "samples.txt").exists()
    assert json.loads((work / "results.json").read_text())["step"] == 20
    # Rerunning the finished run trains nothing and rewrites nothing.
    written = {name: (work / name).read_bytes() for name in ("results.json", "loss.png")}
    run("lm.py", work, "--config.num_steps=20", *common)
    assert all((work / name).read_bytes() == data for name, data in written.items())
    # A run killed after logging step 20 but before its checkpoint: the rerun resumes from 10
    # and logs 11..20 again, once (the records past step 10 used to stay, and repeat).
    shutil.rmtree(work / "checkpoints" / "20")
    run("lm.py", work, "--config.num_steps=20", *common)
    third = metrics(work)
    assert [m["step"] for m in third] == [10, 20]
    assert third[1]["eval_loss"] == pytest.approx(second[1]["eval_loss"], rel=1e-6)
    train_steps = [json.loads(line)["step"] for line in
                   (work / "train_metrics.jsonl").read_text().splitlines()]
    assert train_steps == [5, 10, 15, 20]
    assert (work / "samples.txt").read_text().count("=== step 20 ===") == 1
    # The run reads back for decoding: config, parameters and the tokenizer it trained with.
    from flaxformer_lite.training import load_run

    loaded = load_run(work)
    assert loaded.step == 20 and loaded.experiment["seq_len"] == 16
    # The corpus's digest is recorded: an edited file at the same path is a changed field.
    assert re.fullmatch(r"corpus-[0-9a-f]{16}", loaded.experiment["dataset_prepared"])
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the lazy dog")) == "the lazy dog"
    assert loaded.tokenizer.vocab_size <= loaded.config.vocab_size  # padded to 16s
    assert {x.shape for x in jax.tree.leaves(loaded.params)} == {
        x.shape for x in jax.tree.leaves(jax.eval_shape(
            lambda: init_params(loaded.config, jax.random.key(0))))}
    # Resuming with another tokenizer (other ids) is refused before anything trains.
    cmd = [sys.executable, str(ROOT / "experiments" / "lm.py"), f"--workdir={work}",
           "--config.num_steps=30", "--config.tokenizer=byte", *common]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode != 0 and "holds the run's tokenizer" in res.stderr


@pytest.mark.slow
def test_translate_reverse_task(tmp_path):
    out = run("translate.py", tmp_path / "work", f"--config.data_dir={tmp_path / 'data'}",
              "--config.num_steps=20", "--config.eval_every=10",
              "--config.eval_decode_examples=16", "--config.dataset_options.num_train=200",
              "--config.dataset_options.num_validation=16",
              "--config.dataset_options.num_test=16", "--config.optimizer.warmup_steps=2",
              "--config.optimizer.decay_steps=20", *TINY_MODEL)
    evals = metrics(tmp_path / "work")
    assert [m["step"] for m in evals] == [10, 20]
    assert all("eval_loss" in m and "eval_exact_match" in m for m in evals)
    result = json.loads((tmp_path / "work" / "results.json").read_text())
    assert result["examples"] == 16 and 0.0 <= result["exact_match"] <= 1.0
    assert result["eval_loss"] == evals[-1]["eval_loss"] and result["eval_step"] == 20
    assert result["dataset"].startswith("synthetic")
    assert "exact_match" in out
    # The trained run translates a file of one's own, one hypothesis a line, no training.
    sources = tmp_path / "sources.txt"
    sources.write_text("3 4 5\n7 8 9 1\n\n")
    out = run("translate.py", tmp_path / "work", f"--config.translate={sources}",
              "--config.beam_size=2")
    assert "Translated 3 lines with the step-20 parameters" in out and "beam 2" in out
    assert "sources cut at 16 tokens, hypotheses at 16" in out  # the run's recorded lengths
    hyps = (tmp_path / "sources.txt.hyp").read_text().splitlines()
    assert len(hyps) == 3 and hyps[0] and hyps[2] == ""  # an empty source translates as ""
    assert [m["step"] for m in metrics(tmp_path / "work")] == [10, 20]  # nothing trained
    # A run trained by train() from code of one's own records no experiment: the lengths are
    # the model's, not this script's defaults.
    shutil.copytree(tmp_path / "work", tmp_path / "own")
    record = json.loads((tmp_path / "own" / "config.json").read_text())
    del record["experiment"]
    (tmp_path / "own" / "config.json").write_text(json.dumps(record))
    out = run("translate.py", tmp_path / "own", f"--config.translate={sources}")
    assert "sources cut at 32 tokens, hypotheses at 32" in out


@pytest.mark.slow
def test_translate_tests_and_translates_with_averaged_checkpoints(tmp_path):
    """--config.average_last=2: the test scores and --config.translate use the mean of the
    last two checkpoints' parameters, and say so; more than the run holds is refused."""
    from flaxformer_lite.training import average_params, load_params

    out = run("translate.py", tmp_path / "work", f"--config.data_dir={tmp_path / 'data'}",
              "--config.num_steps=8", "--config.eval_every=8", "--config.checkpoint_every=4",
              "--config.average_last=2", "--config.eval_decode_examples=8",
              "--config.dataset_options.num_train=64",
              "--config.dataset_options.num_validation=8",
              "--config.dataset_options.num_test=8", "--config.optimizer.warmup_steps=2",
              *TINY_MODEL)
    assert "Testing on test with the mean of the parameters of steps 4, 8." in out
    result = json.loads((tmp_path / "work" / "results.json").read_text())
    assert result["averaged_steps"] == [4, 8] and result["step"] == 8
    assert {k: result[k] for k in ("split", "beam_size", "average_last", "max_decode_len")} == {
        "split": "test", "beam_size": 1, "average_last": 2, "max_decode_len": 16}
    checkpoints = tmp_path / "work" / "checkpoints"
    steps, mean = average_params(checkpoints, last=2)
    assert steps == [4, 8]
    assert any(float(abs(a - b).max()) > 0 for a, b in zip(
        jax.tree.leaves(mean), jax.tree.leaves(load_params(checkpoints)[1]), strict=True))
    sources = tmp_path / "sources.txt"
    sources.write_text("3 4 5\n7 8 9 1\n")
    out = run("translate.py", tmp_path / "work", f"--config.translate={sources}",
              "--config.average_last=2")
    assert "Translated 2 lines with the mean of the parameters of steps 4, 8 of" in out
    cmd = [sys.executable, str(ROOT / "experiments" / "translate.py"),
           f"--workdir={tmp_path / 'work'}", f"--config.translate={sources}",
           "--config.average_last=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode != 0 and re.search(
        r"--config.average_last=3: last=3, but .* holds 2 checkpoints \(steps \[4, 8\]\).*"
        r"keep_checkpoints", res.stderr), res.stderr[-2000:]


@pytest.mark.slow
def test_mlm_on_a_local_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"paragraph {i}: masked language models read both ways."
                                for i in range(300)) + "\n")
    # The CPU split into two devices: the run is data parallel over them.
    out = run("mlm.py", tmp_path / "work", f"--config.dataset={text}",
              f"--config.data_dir={tmp_path / 'data'}", "--config.tokenizer=char",
              "--config.num_steps=10", "--config.eval_every=5", "--config.eval_batches=2",
              "--config.seq_len=32", "--config.batch_size=4", "--config.model.max_len=32",
              "--config.optimizer.warmup_steps=2", "--config.optimizer.decay_steps=10",
              "--config.parallel.cpu_devices=2", *TINY_MODEL)
    assert "2 device(s) [cpu]" in out and "mesh" in out
    evals = metrics(tmp_path / "work")
    assert [m["step"] for m in evals] == [5, 10]
    assert all(m["eval_loss"] > 0 and 0 <= m["eval_accuracy"] <= 1 for m in evals)
    masked = [line for line in out.splitlines() if line.startswith("masked: ")]
    assert masked and all("[MASK]" in line for line in masked)  # the display shows them
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert results["step"] == 10 and results["eval_loss"] == evals[-1]["eval_loss"]
    from flaxformer_lite.training import load_run

    assert load_run(tmp_path / "work").tokenizer.reserve_mask  # ids as in training


ARCHITECTURES = {"lm": "decoder_only", "shakespeare_char": "decoder_only",
                 "translate": "encoder_decoder", "multi30k": "encoder_decoder",
                 "mlm": "encoder_only"}


@pytest.mark.parametrize("name, trailing", [("lm", True), ("shakespeare_char", True),
                                            ("translate", False), ("multi30k", False),
                                            ("mlm", False)])
def test_gpu_flag_applies_gpu_config_and_set_fields_win(name, trailing, load_script,
                                                        monkeypatch):
    import dataclasses

    import jax

    from flaxformer_lite import TransformerConfig, gpu_config

    common = load_script("experiments/common.py")
    cfg = load_script(f"experiments/configs/{name}.py").get_config()
    model_config = functools.partial(common.model_config, architecture=ARCHITECTURES[name])
    # Every model field can be set from the command line, and a preset of another
    # architecture is named at start-up (it used to train, then fail at the first sample).
    assert {f.name for f in dataclasses.fields(TransformerConfig)} - set(cfg.model) == {
        "architecture", "vocab_size"}
    wrong = cfg.copy_and_resolve_references()
    wrong.model.preset = "bert-base" if name != "mlm" else "gpt2"
    with pytest.raises(ValueError, match=r"--config.model.preset=.* this script trains"):
        model_config(wrong, 100)
    plain = model_config(cfg, 100, trailing_padding=trailing)
    assert (plain.dtype, plain.vocab_pad_multiple, plain.padding) == ("float32", 0, "anywhere")
    cfg.model.gpu = True
    with pytest.raises(ValueError, match="but JAX runs on cpu"):  # cuDNN would fail later
        model_config(cfg, 100, trailing_padding=trailing)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fast = model_config(cfg, 100, trailing_padding=trailing)
    assert fast == gpu_config(plain, trailing_padding=trailing)
    assert fast.dtype == "bfloat16" and fast.padding == ("trailing" if trailing else "anywhere")
    cfg.model.dtype = "float32"  # what the command line sets wins over the GPU settings
    cfg.model.num_kv_heads = 2
    chosen = model_config(cfg, 100, trailing_padding=trailing)
    assert (chosen.dtype, chosen.num_kv_heads) == ("float32", 2)


def test_a_preset_chosen_on_the_command_line_comes_as_published(load_script, monkeypatch,
                                                                 capsys):
    """translate.py --config.model.preset=t5-small built a 4.8M-parameter model: the file's
    sizes for its own preset were laid over t5-small. Now only the command line's model
    fields (and the script's own) go on top of a preset it names."""
    from flaxformer_lite import get_config

    common = load_script("experiments/common.py")
    cfg = load_script("experiments/configs/translate.py").get_config()
    cfg.model.preset, cfg.model.num_layers = "t5-small", 3
    monkeypatch.setattr(common, "command_line_fields",
                        lambda: {"model.preset", "model.num_layers"})
    chosen = common.model_config(cfg, 100, architecture="encoder_decoder")
    assert chosen == get_config("t5-small", vocab_size=100, num_layers=3)
    assert "d_model" in capsys.readouterr().out  # what was left out is said
    mlm = load_script("experiments/configs/mlm.py").get_config()
    mlm.model.preset = "bert-large"
    monkeypatch.setattr(common, "command_line_fields", lambda: {"model.preset"})
    chosen = common.model_config(mlm, 100, architecture="encoder_only",
                                 script={"mlm_head": True})
    assert chosen == get_config("bert-large", vocab_size=100, mlm_head=True)
    monkeypatch.setattr(common, "command_line_fields", lambda: {"model.num_layers"})
    assert common.model_config(cfg, 100, architecture="encoder_decoder").d_model == 128
    mlm.model.mlm_head = False  # mlm.py sets it itself: the flag was silently overridden
    with pytest.raises(ValueError, match="this script sets mlm_head=True itself"):
        common.model_config(mlm, 100, architecture="encoder_only", script={"mlm_head": True})


def test_count_and_fraction_flags_are_checked(load_script):
    """`common.check_fields`, which each script runs first: -1 decoded all but the last
    example (`eval_decode_examples`), True passed as 1, 1.5 as a masking rate."""
    from absl import app

    common = load_script("experiments/common.py")
    cfg = load_script("experiments/configs/translate.py").get_config()
    common.check_fields(cfg, at_least={"eval_decode_examples": 0, "beam_size": 1})
    for field, value in (("eval_decode_examples", -1), ("beam_size", True), ("beam_size", 0),
                         ("seed", -1), ("data_seed", -1)):  # seeds: NumPy's error at batch 1
        bad = cfg.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(app.UsageError, match=f"--config.{field}={value!r} must be"):
            common.check_fields(bad, at_least={"eval_decode_examples": 0, "beam_size": 1})
    mlm = load_script("experiments/configs/mlm.py").get_config()
    common.check_fields(mlm, fractions=("mask_rate",))
    for value in (0.0, 1.0, 1.5):
        mlm.mask_rate = value
        with pytest.raises(app.UsageError, match="mask_rate"):
            common.check_fields(mlm, fractions=("mask_rate",))


def test_lm_samples_start_like_training_rows(load_script):
    """Packed rows are BOS + a stripped document + EOS; windows are running text."""
    from flaxformer_lite.data import BOS_ID, EOS_ID, CharTokenizer

    common = load_script("experiments/common.py")
    tok = CharTokenizer.from_texts(["\nto be\n"])
    assert common.lm_prompt(tok, "\nto\n", "packed") == (
        [BOS_ID, *tok.encode("to")], (EOS_ID,), "to")
    assert common.lm_prompt(tok, "\nto", "windows") == (tok.encode("\nto"), (), "\nto")
    assert common.lm_prompt(tok, "", "windows")[0] == tok.encode("\n")


def test_results_come_from_every_run_and_not_from_an_interrupted_one(tmp_path, load_script):
    """A rerun of a finished run trains and evaluates nothing; results.json must keep the last
    evaluation (from metrics.jsonl), and an interrupted run has no final results."""
    import types

    common = load_script("experiments/common.py")
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "eval_loss": 2.0, "eval_bits_per_token": 2.885, "eval_accuracy": 0.4}\n'
        '{"step": 20, "eval_loss": 1.5, "eval_bits_per_token": 2.164, "eval_accuracy": 0.5}\n')
    rerun = types.SimpleNamespace(step=20, interrupted=False, history=[])
    assert common.final_results(str(tmp_path), rerun, parameters=7) == {
        "step": 20, "parameters": 7, "eval_loss": 1.5, "eval_bits_per_token": 2.164,
        "eval_accuracy": 0.5, "eval_step": 20}
    early = common.final_results(str(tmp_path), types.SimpleNamespace(step=15,
                                                                       interrupted=False))
    assert early["eval_loss"] == 2.0 and early["eval_step"] == 10  # not a later run's, and said
    assert common.final_results(str(tmp_path), types.SimpleNamespace(
        step=20, interrupted=True)) is None


def test_a_finished_run_is_tested_again_when_its_test_settings_changed(tmp_path, load_script,
                                                                        capsys):
    """translate.py's rerun of a finished run with another beam printed the old results.json;
    the settings its test depends on are compared with those results.json records."""
    import types

    common = load_script("experiments/common.py")
    settings = {"split": "test", "beam_size": 4, "alpha": 0.6}
    (tmp_path / "results.json").write_text(json.dumps({"step": 20, "bleu": 30.0, **settings}))
    rerun = types.SimpleNamespace(step=20, interrupted=False)
    writer = types.SimpleNamespace(start_step=20)
    assert common.finished_before(str(tmp_path), rerun, writer, settings)
    assert '"bleu": 30.0' in capsys.readouterr().out
    for changed in ({"beam_size": 1}, {"alpha": 0.0}, {"split": "validation"},
                    {"max_decode_len": 64}):  # the last: not recorded by an older run
        assert not common.finished_before(str(tmp_path), rerun, writer,
                                          {**settings, **changed})
        field, value = next(iter(changed.items()))
        assert f"{field}={settings.get(field, '(not recorded)')!r} -> {value!r}" in (
            capsys.readouterr().out)
    assert common.finished_before(str(tmp_path), rerun, writer)  # lm.py, mlm.py: no settings
    trained = types.SimpleNamespace(step=30, interrupted=False)  # a rerun that trained on
    assert not common.finished_before(str(tmp_path), trained, writer, settings)


def test_an_interrupted_run_exits_with_the_signal_status(load_script, capsys):
    """A job restarter reruns only a job that exits nonzero: an interrupted script exits with
    128 + the signal's number (it exited with 0, like a finished run); a finished one returns."""
    import signal

    from flaxformer_lite.training import TrainResult

    common = load_script("experiments/common.py")

    def result(interrupted, sig):
        return TrainResult(state=None, step=32, history=[], interrupted=interrupted,
                           engine=None, signal=sig)

    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (None, 143)):
        with pytest.raises(SystemExit) as stop:
            common.exit_if_interrupted(result(True, sig))
        assert stop.value.code == status
        assert f"step 32; its checkpoint is saved. Rerun the same command to resume (exit " \
               f"status {status})" in capsys.readouterr().err
    assert common.exit_if_interrupted(result(False, None)) is None
    for script in ("lm.py", "mlm.py", "translate.py"):
        assert "common.exit_if_interrupted(result)" in (ROOT / "experiments" / script).read_text()


def test_a_torn_metrics_line_is_skipped_and_named(tmp_path, load_script, caplog):
    """A crash or a full disk in mid-write left `{"step": 21` as the last line: every rerun
    failed with a bare JSONDecodeError. The line is now skipped with a warning naming it, and
    the resumed run's trim rewrites the file without it (the next record would have been
    appended to it)."""
    common = load_script("experiments/common.py")
    path = tmp_path / "train_metrics.jsonl"
    path.write_text('{"step": 10, "train_loss": 3.0}\n{"step": 20, "train_loss": 2.5}\n'
                    '{"step": 21')
    assert [r["step"] for r in common.read_metrics(str(tmp_path), path.name)] == [10, 20]
    assert f"Skipping {path}:3, not a metrics record" in caplog.text
    assert [r["step"] for r in common._trim_jsonl(str(path), 20)] == [10, 20]
    assert path.read_text() == ('{"step": 10, "train_loss": 3.0}\n'
                                '{"step": 20, "train_loss": 2.5}\n')
    caplog.clear()
    assert common.read_metrics(str(tmp_path), path.name) and not caplog.text


def test_a_resumed_run_says_so_and_counts_the_earlier_time(tmp_path, load_script, capsys):
    """With --config.progress=False a resumed run printed nothing saying it resumed (the
    trainer's line is INFO); results.json's wall_seconds counted the last attempt alone."""
    import time

    common = load_script("experiments/common.py")
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "time": 30.0, "eval_loss": 2.0}\n'
                                            '{"step": 30, "time": 90.0, "eval_loss": 1.0}\n')
    writer = common.MetricsWriter(str(tmp_path), 40, progress=False)
    writer.on_start(20)
    assert f"Resumed from step 20 ({tmp_path / 'checkpoints' / '20'})." in capsys.readouterr().out
    assert writer.wall_seconds(time.time() - 5.0) == pytest.approx(35.0, abs=0.5)
    # A stopped run logs its train window at the step it saved (18 here, after 54 s): that
    # time counts, its steps are not redone (only the evaluation's 30 s counted).
    writer(12, {"train/nll": 2.0})
    assert json.loads((tmp_path / "train_metrics.jsonl").read_text())["time"] >= 30.0
    (tmp_path / "train_metrics.jsonl").write_text('{"step": 18, "time": 54.0, "train_nll": 1.5}'
                                                  '\n{"step": 25, "time": 75.0}\n')
    writer.on_start(18)
    assert writer.wall_seconds(time.time() - 5.0) == pytest.approx(59.0, abs=0.5)
    capsys.readouterr()
    common.MetricsWriter(str(tmp_path / "new"), 40, progress=False).on_start(0)
    assert "Resumed" not in capsys.readouterr().out


def test_cpu_devices_must_be_a_whole_number(monkeypatch, load_script):
    import ml_collections

    common = load_script("experiments/common.py")
    for bad in (-1, 1.5, True, "2"):
        cfg = ml_collections.ConfigDict({"parallel": {"cpu_devices": bad}})
        with pytest.raises(ValueError, match="config.parallel.cpu_devices"):
            common.use_cpu_devices(cfg)
    common.use_cpu_devices(ml_collections.ConfigDict({"parallel": {"cpu_devices": 0}}))
    # A device count the user set in XLA_FLAGS wins: JAX's setting is left alone.
    calls = []
    monkeypatch.setattr(common.jax.config, "update", lambda *a: calls.append(a))
    two = ml_collections.ConfigDict({"parallel": {"cpu_devices": 2}})
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    common.use_cpu_devices(two)
    assert calls == []
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    common.use_cpu_devices(two)
    assert calls == [("jax_num_cpu_devices", 2)]


def test_mesh_report_splits_work_state_and_gradients(tmp_path):
    """The per-device report of a compiled step on 4 CPU devices, checked against what each
    layout must do: data parallel all-reduces every gradient (at least the parameters' bytes)
    and keeps the whole state; FSDP holds ~1/4 of it; tensor parallel splits the FLOPs."""
    from flaxformer_lite import get_config, params

    model = "vocab_size=64,d_model=32,num_heads=4,d_ff=64,num_layers=2,max_len=16"
    out = tmp_path / "mesh.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "mesh_report.py"), "--config=gpt2",
         f"--set={model}", "--batch=8", "--meshes=4x1x1,1x4x1,2x1x2", f"--out={out}"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GFLOP/dev" in res.stdout
    report = json.loads(out.read_text())
    assert not report["loops_counted_once"]  # no scan, no micro-batches: whole-step counts
    rows = {r["mesh"]: r for r in report["rows"]}
    one, data, fsdp, tensor = (rows[m] for m in ("one device", "4x1x1", "1x4x1", "2x1x2"))
    n = params.count(get_config("gpt2", vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                                num_layers=2, max_len=16))
    assert data["collective_bytes"]["all-reduce"] >= 4 * n
    assert data["argument_bytes"] >= 3 * 4 * n  # parameters and Adam's two moments, whole
    assert fsdp["argument_bytes"] < 0.4 * one["argument_bytes"]
    assert fsdp["collective_bytes"]["all-gather"] > 0
    for row in (data, fsdp, tensor):
        assert row["devices"] == 4 and row["flops_vs_ideal"] < 1.3


def test_mesh_report_compiles_the_attention_path_a_gpu_takes(load_script):
    """On a CPU host the report compiled the CPU's attention (row statistics kept); a GPU's
    plain path keeps the softmax and computes every score block: --attention_path=gpu."""
    mesh_report = load_script("experiments/mesh_report.py")
    config = get_config("gpt2", vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=1,
                        max_len=128, dropout_rate=0.0, attention_dropout_rate=0.0)
    cpu, gpu = (mesh_report.report(config, [], batch=2, length=128, attention_path=path)[0]
                for path in ("cpu", "gpu"))
    assert gpu["temp_bytes"] > cpu["temp_bytes"] and gpu["flops"] > cpu["flops"]


@pytest.mark.parametrize("flags, message", [
    (["--meshes=2x2x2,2x1x1"], "every mesh must use all"),
    (["--meshes=2x2"], "DATAxFSDPxTENSOR"),
    (["--meshes=4x1x1", "--batch=6"], "multiple of data * fsdp"),
    (["--set=num_layers"], "FIELD=VALUE"),
    (["--config=bert-base", "--meshes=2x1x1", "--batch=2"], "mlm_head=True"),
    (["--meshes=1x1x1", "--batch=1", "--length=2048"], "--length=2048 must lie in"),
])
def test_mesh_report_rejects_bad_flags(flags, message):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "mesh_report.py"), *flags],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_translate_refuses_an_unknown_metric_at_once(tmp_path):
    """Any metric but bleu used to report exact match and exit 0."""
    cmd = [sys.executable, str(ROOT / "experiments" / "translate.py"),
           f"--workdir={tmp_path}", "--config.metric=rouge"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode != 0 and "--config.metric='rouge'" in res.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cosine_decay_follows_num_steps_unless_set(load_script):
    common = load_script("experiments/common.py")
    cfg = load_script("experiments/configs/lm.py").get_config()
    cfg.num_steps, cfg.optimizer.accumulation_steps = 5001, 2
    assert common.optimizer_config(cfg).decay_steps == 2500  # updates: MultiSteps drops the odd one
    cfg.optimizer.decay_steps = 700
    assert common.optimizer_config(cfg).decay_steps == 700
    cfg.optimizer.decay_steps, cfg.num_steps = None, 8  # 4 updates inside 100 of warmup
    with pytest.raises(ValueError, match=r"--config.num_steps=8 .*warmup_steps=100"):
        common.optimizer_config(cfg)
    cfg.num_steps, cfg.optimizer.clip_norm = 5000, 0.0  # the command line's None
    assert common.optimizer_config(cfg).clip_norm is None


@pytest.mark.parametrize("name", ["lm", "mlm", "translate", "shakespeare_char", "multi30k"])
def test_the_data_order_has_its_own_seed(load_script, name):
    """One seed drove the initialisation and the data order alike: a sweep could not vary one
    over the other fixed."""
    common = load_script("experiments/common.py")
    cfg = load_script(f"experiments/configs/{name}.py").get_config()
    cfg.seed = 3
    assert cfg.data_seed is None and common.data_seed(cfg) == 3
    cfg.data_seed = 11
    assert common.data_seed(cfg) == 11 and cfg.seed == 3


def test_the_first_line_names_the_peak_learning_rate(load_script):
    """vaswani reads `learning_rate` as a multiplier: the config's 1e-3 peaked near 1e-5,
    silently."""
    from flaxformer_lite.training import OptimizerConfig, learning_rate_at

    common = load_script("experiments/common.py")

    class Stub:
        model_config = get_config("gpt2", d_model=384, num_heads=6, num_layers=1, vocab_size=64)

        def describe(self):
            return "single device"

    for opt, peak_update in ((OptimizerConfig(learning_rate=1e-3, schedule="vaswani",
                                              warmup_steps=10), 10),
                             (OptimizerConfig(learning_rate=1e-3, schedule="cosine",
                                              warmup_steps=100, decay_steps=2000), 100)):
        engine = Stub()
        engine.optimizer_config = opt
        line = common.describe_run("data", type("Tok", (), {"kind": "char", "vocab_size": 64}),
                                   engine, 10)
        rates = [float(learning_rate_at(opt, n, d_model=384)) for n in range(0, 200)]
        assert int(np.argmax(rates)) + 1 == peak_update  # updates count from 1, steps from 0
        assert (f"{opt.schedule} learning rate peaking at {max(rates):.3g} "
                f"(update {peak_update})") in line


@pytest.mark.parametrize("script, flags, message", [
    ("translate.py", ["--config.test_split=tset"], "has no split 'tset'"),
    ("translate.py", ["--config.max_decode_len=64"], "--config.max_decode_len=64 exceeds"),
    ("lm.py", ["--config.sample_length=0"], "--config.sample_length=0 with a prompt"),
    ("lm.py", ["--config.temperature=0.0"], "--config.temperature=0.0 must be"),
    ("lm.py", ["--config.model.preset=t5-small"], "this script trains decoder_only"),
    ("lm.py", ["--config.seq_len=40"], "--config.seq_len=40 exceeds the model's max_len=32"),
    ("translate.py", ["--config.max_source_len=40"], "--config.max_source_len=40 exceeds"),
    ("translate.py", ["--config.beam_size=0"], "--config.beam_size=0 must be"),
    # Out-of-range counts failed later under another field's name (or took a wrong meaning).
    ("lm.py", ["--config.eval_batches=-1"],
     "--config.eval_batches=-1 must be an integer >= 0 (0 = all)"),
    ("mlm.py", ["--config.mask_rate=1.5"],
     "--config.mask_rate=1.5 must be a finite number in (0, 1)"),
    ("translate.py", ["--config.translate=in.txt", "--config.beam_size=0"],
     "--config.beam_size=0 must be"),
    ("translate.py", ["--config.average_last=3"],
     "--config.average_last=3 averages the last 3 checkpoints, but "
     "--config.keep_checkpoints=2 keeps only 2"),
    ("translate.py", ["--config.average_last=2", "--config.checkpoint_every=0"],
     "--config.average_last=2, but the run ends with 1 checkpoint (steps [2]"),
])
def test_settings_used_only_after_training_are_checked_at_start(tmp_path, script, flags,
                                                                  message):
    """These used to fail at the first evaluation (losing the steps before it) or, for the
    test split, after the whole run."""
    cmd = [sys.executable, str(ROOT / "experiments" / script), f"--workdir={tmp_path / 'w'}",
           f"--config.data_dir={tmp_path / 'data'}", "--config.num_steps=2", *TINY_MODEL,
           "--config.model.max_len=32", *(["--config.seq_len=16"] if script == "lm.py" else []),
           *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_batch_the_cpu_devices_cannot_split_names_the_setting(tmp_path):
    """lm.py splits the CPU in two devices: a batch of 7 named only the batch shards."""
    cmd = [sys.executable, str(ROOT / "experiments" / "lm.py"), f"--workdir={tmp_path / 'w'}",
           f"--config.data_dir={tmp_path / 'data'}", "--config.num_steps=2", *TINY_MODEL,
           "--config.model.max_len=32", "--config.seq_len=16", "--config.batch_size=7",
           "--config.optimizer.schedule=constant", "--config.optimizer.final_learning_rate=0.0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode != 0 and (
        "multiple of 2; these devices split one CPU (jax_num_cpu_devices; the experiment "
        "scripts' --config.parallel.cpu_devices, 0 for one device)" in res.stderr), (
        res.stderr[-2000:])


def test_the_tokenizer_is_written_once_train_holds_the_workdir(tmp_path, load_script):
    """A second launch on a workdir in use must not replace the running job's tokenizer
    before the lock refuses it: building the hook writes nothing, its on_start does."""
    from flaxformer_lite.data import ByteTokenizer, CharTokenizer, load_tokenizer

    common = load_script("experiments/common.py")
    char = CharTokenizer.from_texts(["abc"])
    first = common.TokenizerFile(char, str(tmp_path))
    assert not list(tmp_path.iterdir())
    first.on_start(0)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("cab") == char.encode("cab")
    common.TokenizerFile(ByteTokenizer(), str(tmp_path))  # no checkpoint yet: not refused ...
    assert load_tokenizer(tmp_path / "tokenizer.json").kind == "char"  # ... and nothing written
