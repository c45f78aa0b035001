"""Train an encoder-decoder Transformer for translation (or a synthetic sequence task).

    python experiments/translate.py --workdir=/tmp/reverse          # offline default: reverse
    python experiments/translate.py --config=experiments/configs/multi30k.py \\
        --workdir=/tmp/multi30k --config.dataset=../shared/data/multi30k

Evaluates (loss, plus exact match or sacreBLEU with beam search) every `eval_every` steps and
on the test split at the end; results land in `WORKDIR/metrics.jsonl` and `results.json`.
A trained run translates a file of one's own (one source a line) without training:

    python experiments/translate.py --workdir=/tmp/reverse --config.translate=sources.txt

`--config.average_last=k` tests (and translates) with the mean of the last k checkpoints'
parameters (`training.average_params`), as "Attention Is All You Need" does.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxformer_lite import perf

perf.relaunch_with_fast_malloc()  # jemalloc or huge pages: far fewer page faults
perf.configure_cpu()
perf.enable_compilation_cache()  # reruns load compiled programs from disk

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import common  # noqa: E402
from flaxformer_lite import decoding, evaluation, make_model  # noqa: E402
from flaxformer_lite.data import encode_sources, translation_pipeline  # noqa: E402
from flaxformer_lite.training import LossConfig, initialize, load_run, train  # noqa: E402

_CONFIG, _WORKDIR = common.define_flags("translate.py", "/tmp/flaxformer_translate")
flags.adopt_module_key_flags(common)  # --help lists --config and --workdir


def make_decoder(model, cfg, tok):
    """`decode(params, source_texts) -> hypothesis texts` (beam search or greedy), jitted once
    per chunk shape."""
    chunk = 128

    @perf.CompiledAhead
    @jax.jit
    def run(params, src):
        if cfg.beam_size > 1:
            beams = decoding.beam_search(model, params, src, beam_size=cfg.beam_size,
                                         alpha=cfg.alpha, max_len=cfg.max_decode_len)
            return beams.tokens[:, 0]
        return decoding.generate_seq2seq(model, params, src, max_new_tokens=cfg.max_decode_len,
                                         greedy=True).tokens

    def decode(params, texts):
        # An empty source translates as "": decoded, its EOS alone gives a made-up sentence.
        real = [i for i, text in enumerate(texts) if text.strip()]
        src = encode_sources(tok, [texts[i] for i in real], cfg.max_source_len)  # as trained
        out = [""] * len(texts)
        for start in range(0, len(src), chunk):
            part = src[start:start + chunk]
            n = len(part)
            if n < chunk:  # keep one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], chunk - n, 0)])
            ids = np.asarray(run(params, part))[:n]
            for i, row in zip(real[start:start + n], ids):
                out[i] = tok.decode(evaluation.strip_ids(row))
        return out

    # during the train step's compile
    decode.warm_up = lambda params: run.warm_up(
        params, np.zeros((chunk, cfg.max_source_len), np.int32))
    return decode


def write_hypotheses(path: str, hyps: list[str]) -> None:
    """One hypothesis a line, in the sources' order: a decoded newline piece becomes a space
    (it would shift every line after it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(" ".join(h.splitlines()) + "\n" for h in hyps))


def score(cfg, hyps, refs) -> dict[str, float | str]:
    if cfg.metric == "bleu":
        result = evaluation.bleu(hyps, refs)
        return {"bleu": result["bleu"], "bleu_signature": result["signature"]}
    return {"exact_match": evaluation.exact_match(hyps, refs)}


DECODING_FIELDS = ("max_source_len", "max_decode_len", "beam_size", "alpha")


def test_settings(cfg) -> dict:
    """What the test scores depend on besides the parameters: recorded in `results.json`, so a
    rerun of a finished run with other settings tests again instead of printing old scores."""
    return {"split": cfg.test_split, "metric": cfg.metric, "average_last": cfg.average_last,
            **{name: cfg[name] for name in DECODING_FIELDS}}


def average_last(cfg) -> int:
    """`--config.average_last`, checked."""
    k = cfg.average_last
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise app.UsageError(f"--config.average_last={k!r} must be a whole number >= 0 (0 = "
                             "the last checkpoint alone).")
    return k


def check_average_last(cfg, workdir: str) -> None:
    """Refuse, before training, an `average_last` the run cannot average: more than
    `keep_checkpoints` keeps, or than the checkpoints it writes (every `checkpoint_every` steps
    and at `num_steps`, with those already in the workdir)."""
    k = average_last(cfg)
    if k == 0:
        return
    keep = cfg.keep_checkpoints
    if keep is not None and keep < k:
        raise app.UsageError(
            f"--config.average_last={k} averages the last {k} checkpoints, but "
            f"--config.keep_checkpoints={keep} keeps only {keep}: set keep_checkpoints >= {k}.")
    every = cfg.checkpoint_every or cfg.num_steps
    if not (isinstance(every, int) and every > 0):
        return  # train() names the bad setting
    steps = set(range(every, cfg.num_steps + 1, every)) | {cfg.num_steps}
    steps |= {s for s in common.checkpoint_steps(workdir) if s <= cfg.num_steps}
    if len(steps) < k:
        raise app.UsageError(
            f"--config.average_last={k}, but the run ends with {len(steps)} checkpoint"
            f"{'s' if len(steps) != 1 else ''} (steps {sorted(steps)}: every "
            f"--config.checkpoint_every={cfg.checkpoint_every} steps and the last of "
            f"--config.num_steps={cfg.num_steps}): checkpoint more often or average fewer.")


def load_params_of(workdir: str, average_last: int):
    """The run in `workdir` (`load_run`), its parameters averaged over the last
    `average_last` checkpoints when > 0; and the words naming which parameters they are."""
    try:
        run = load_run(workdir, average_last=average_last or None)
    except ValueError as error:
        if not average_last:
            raise
        raise app.UsageError(f"--config.average_last={average_last}: {error}") from error
    if run.averaged_steps is None:
        return run, f"the step-{run.step} parameters"
    return run, (f"the mean of the parameters of steps "
                 f"{', '.join(map(str, run.averaged_steps))}")


def translate_file(cfg, workdir: str) -> None:
    """`--config.translate=FILE`: decode FILE's lines with the run in `workdir` (its config,
    latest parameters, or the mean of the last `average_last` checkpoints', and tokenizer,
    `load_run`), framed and decoded with the run's recorded `DECODING_FIELDS` unless the
    command line sets them; one hypothesis a line to `--config.output` (default FILE +
    ".hyp")."""
    t0 = time.time()
    with open(cfg.translate, encoding="utf-8") as f:
        texts = f.read().splitlines()
    if not texts:
        raise app.UsageError(f"--config.translate={cfg.translate!r} holds no lines to translate.")
    run, which = load_params_of(workdir, average_last(cfg))
    if run.tokenizer is None:
        raise app.UsageError(f"{workdir} holds no tokenizer.json / tokenizer.model (a run "
                             "written before the scripts saved it): rerun its training command "
                             "once, which saves it and trains no further.")
    given = common.command_line_fields() or set()
    settings = cfg.copy_and_resolve_references()
    recorded = run.experiment or {}
    defaulted = []
    for name in DECODING_FIELDS:
        if name in given:
            continue
        if name in recorded:
            settings[name] = recorded[name]
        else:  # a run trained by train() from code of its own records no experiment
            if name in ("max_source_len", "max_decode_len"):
                settings[name] = run.config.max_len
            defaulted.append(f"{name}={settings[name]}")
    if defaulted:
        logging.warning("%s records no decoding settings of this script (a run trained "
                        "outside it): using %s; set them with --config.<name>.", workdir,
                        ", ".join(defaulted))
    if settings.max_decode_len > run.config.max_len:
        raise app.UsageError(f"--config.max_decode_len={settings.max_decode_len} exceeds the "
                             f"model's max_len={run.config.max_len}.")
    decode = make_decoder(make_model(run.config), settings, run.tokenizer)
    hyps = decode(run.params, texts)
    output = cfg.output or cfg.translate + ".hyp"
    write_hypotheses(output, hyps)
    print(f"Translated {len(texts)} lines with {which} of {workdir} "
          f"(beam {settings.beam_size}, alpha {settings.alpha}, sources cut at "
          f"{settings.max_source_len} tokens, hypotheses at {settings.max_decode_len}) into "
          f"{output} in {time.time() - t0:.1f} s.", flush=True)


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    common.check_fields(cfg, at_least={"num_steps": 0, "beam_size": 1, "max_decode_len": 1,
                                       "eval_decode_examples": 0})
    if cfg.translate:
        translate_file(cfg, workdir)
        common.skip_teardown()
        return
    if cfg.metric not in ("bleu", "exact_match"):
        raise app.UsageError(f"--config.metric={cfg.metric!r}: use bleu or exact_match.")
    check_average_last(cfg, workdir)
    common.use_cpu_devices(cfg)  # before anything starts JAX
    initialize()
    t0 = time.time()
    options = cfg.dataset_options.to_dict() if cfg.dataset.startswith("synthetic/") else {}
    ds = common.resolve_dataset(cfg.dataset, kind="translation", data_dir=cfg.data_dir,
                                source_lang=cfg.source_lang, target_lang=cfg.target_lang,
                                **options)
    tok = ds.tokenizer(cfg.tokenizer, cfg.vocab_size or None)
    tokenizer_file = common.TokenizerFile(tok, workdir)  # refuses another run's workdir
    model_cfg = common.model_config(cfg, tok.vocab_size, architecture="encoder_decoder")
    common.check_lengths(model_cfg, max_source_len=cfg.max_source_len,
                         max_target_len=cfg.max_target_len)
    model = make_model(model_cfg)
    pipe = translation_pipeline(ds, tok, split="train", batch_size=cfg.batch_size,
                                max_source_len=cfg.max_source_len,
                                max_target_len=cfg.max_target_len, pack=cfg.pack,
                                seed=common.data_seed(cfg))

    def eval_batches():
        return translation_pipeline(ds, tok, split=cfg.eval_split, batch_size=cfg.batch_size,
                                    max_source_len=cfg.max_source_len,
                                    max_target_len=cfg.max_target_len, pack=False,
                                    shuffle=False, num_epochs=1, drop_remainder=False)

    if cfg.max_decode_len > model_cfg.max_len:  # at start-up, not at the first evaluation
        raise app.UsageError(f"--config.max_decode_len={cfg.max_decode_len} exceeds the "
                             f"model's max_len={model_cfg.max_len} (--config.model.max_len).")
    decode = make_decoder(model, cfg, tok)
    test = list(ds.split(cfg.test_split))  # a wrong name fails now, not after training
    eval_split = list(ds.split(cfg.eval_split))
    if cfg.eval_decode_examples:
        eval_split = eval_split[:cfg.eval_decode_examples]

    def eval_fn(state, engine):
        hyps = decode(engine.device_params(state), [ex["inputs"] for ex in eval_split])
        out = score(cfg, hyps, [ex["targets"] for ex in eval_split])
        for src, hyp in list(zip(eval_split, hyps))[:2]:
            writer.write(f"  {src['inputs']!r} -> {hyp!r} (reference {src['targets']!r})")
        return {k: v for k, v in out.items() if not isinstance(v, str)}

    writer = common.MetricsWriter(workdir, cfg.num_steps, common.latest_step(workdir),
                                  progress=cfg.progress)
    engine = common.make_engine(cfg, model_cfg, LossConfig(label_smoothing=cfg.label_smoothing))
    num_params = engine.num_params()
    writer.write(common.describe_run(ds, tok, engine, num_params))
    result = train(model_cfg, engine.optimizer_config, lambda: iter(pipe), engine=engine,
                   workdir=workdir, num_steps=cfg.num_steps, seed=cfg.seed,
                   eval_data=eval_batches, eval_fn=eval_fn, eval_every=cfg.eval_every,
                   checkpoint_every=cfg.checkpoint_every,
                   keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every,
                   experiment=common.experiment_record(cfg, ds), hooks=[writer, tokenizer_file],
                   warm_up=lambda state, engine: decode.warm_up(engine.device_params(state)))
    writer.close()
    if common.finished_before(workdir, result, writer, test_settings(cfg)):
        return
    common.plot_losses(workdir, result.history)
    common.exit_if_interrupted(result)  # the checkpoint holds the state, a rerun continues
    params, which, averaged = result.params, f"the step-{result.step} parameters", None
    if cfg.average_last:  # the checkpoints are on disk: train() waited for its saves
        run, which = load_params_of(workdir, cfg.average_last)
        params, averaged = run.params, run.averaged_steps
    print(f"Testing on {cfg.test_split} with {which}.", flush=True)
    hyps = decode(params, [ex["inputs"] for ex in test])
    # The last evaluation's loss and step as lm.py and mlm.py give them, then the test scores.
    final = common.final_results(workdir, result, wall_seconds=writer.wall_seconds(t0),
                                 parameters=num_params, dataset=ds.name)
    final.update(score(cfg, hyps, [ex["targets"] for ex in test]))
    final.update(examples=len(test), **test_settings(cfg))
    if averaged is not None:
        final.update(averaged_steps=averaged)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(final, f, indent=2)
        write_hypotheses(os.path.join(workdir, f"{cfg.test_split}.hyp.txt"), hyps)
    logging.info("test results: %s", final)
    print(json.dumps(final, indent=2))
    common.skip_teardown()


if __name__ == "__main__":
    app.run(main)
