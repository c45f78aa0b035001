"""Train a decoder-only (GPT) language model and sample from it.

    python experiments/lm.py --workdir=/tmp/lm                     # offline default corpus
    python experiments/lm.py --config=experiments/configs/shakespeare_char.py \\
        --workdir=/tmp/shakespeare --config.dataset=../shared/data/tinyshakespeare/input.txt

`--config.dataset` takes a text file or folder, "embedded" (the Python standard library's
docstrings, always available offline) or a TFDS catalog name (tiny_shakespeare, lm1b). Every
evaluation appends validation loss (nats per token), bits per token and a sample to the workdir.
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
from flaxformer_lite import decoding, make_model  # noqa: E402
from flaxformer_lite.data import lm_pipeline, window_pipeline  # noqa: E402
from flaxformer_lite.training import initialize, train  # noqa: E402

_CONFIG, _WORKDIR = common.define_flags("lm.py", "/tmp/flaxformer_lm")
flags.adopt_module_key_flags(common)  # --help lists --config and --workdir
SAMPLE_STREAM = 0x5A4D9  # folded into the seed's key for the samples' keys


def make_data(cfg, ds, tok):
    """(train iterator factory, eval batches factory) for the configured sampler."""
    if cfg.sampler == "windows":  # nanoGPT: random windows of the running text
        train_tokens = np.asarray(tok.encode(ds.full_text("train")), np.int32)
        val_tokens = np.asarray(tok.encode(ds.full_text("validation")), np.int32)
        for split, tokens in (("train", train_tokens), ("validation", val_tokens)):
            if len(tokens) < cfg.seq_len + 1:  # now, not at the first evaluation
                raise ValueError(
                    f"The {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = "
                    f"{cfg.seq_len + 1}; use a shorter --config.seq_len or more text.")
        train_pipe = window_pipeline(train_tokens, batch_size=cfg.batch_size,
                                     seq_len=cfg.seq_len, seed=common.data_seed(cfg))

        def eval_batches():
            pipe = window_pipeline(val_tokens, batch_size=cfg.eval_batch_size,
                                   seq_len=cfg.seq_len, random=False)
            it = iter(pipe)
            return it if not cfg.eval_batches else (b for _, b in zip(range(cfg.eval_batches),
                                                                      it))

        return (lambda: iter(train_pipe)), eval_batches, len(val_tokens)
    if cfg.sampler != "packed":
        raise ValueError(f"config.sampler={cfg.sampler!r} must be 'windows' or 'packed'.")
    train_pipe = lm_pipeline(ds, tok, split="train", batch_size=cfg.batch_size,
                             max_len=cfg.seq_len, pack=True,
                             seed=common.data_seed(cfg))

    def eval_batches():
        pipe = lm_pipeline(ds, tok, split="validation", batch_size=cfg.eval_batch_size,
                           max_len=cfg.seq_len, pack=True, shuffle=False, num_epochs=1,
                           drop_remainder=False)
        it = iter(pipe)
        return it if not cfg.eval_batches else (b for _, b in zip(range(cfg.eval_batches), it))

    return (lambda: iter(train_pipe)), eval_batches, None


def make_sampler(model, cfg, tok):
    """Samples that start the way training rows do: running text after `sample_prompt` for
    the windows sampler; for packed documents, BOS + the stripped prompt, ending at EOS."""
    if not (isinstance(cfg.temperature, (int, float)) and 0 < cfg.temperature < float("inf")):
        raise app.UsageError(f"--config.temperature={cfg.temperature} must be a number > 0 "
                             "(small values approach greedy sampling).")
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise app.UsageError(f"--config.top_k={cfg.top_k} must be a whole number >= 0 "
                             "(0 = no limit).")
    prompt, stops, text = common.lm_prompt(tok, cfg.sample_prompt, cfg.sampler)
    prompts = np.asarray([prompt] * cfg.num_samples, np.int32)
    new = min(cfg.sample_length, model.config.max_len - len(prompt))
    if new < 1:  # at start-up, not at the first evaluation
        raise app.UsageError(
            f"--config.sample_length={cfg.sample_length} with a prompt of {len(prompt)} tokens "
            f"(--config.sample_prompt) leaves no token to sample within the model's max_len="
            f"{model.config.max_len}; shorten the prompt or set sample_length >= 1 "
            "(num_samples=0 turns sampling off).")

    @perf.CompiledAhead
    @jax.jit
    def run(params, rng):
        return decoding.generate(model, params, prompts, max_new_tokens=new, rng=rng,
                                 temperature=cfg.temperature, top_k=cfg.top_k,
                                 stop_tokens=stops)

    def key(step):
        # A stream of its own: fold_in(key(seed), i) would equal the training keys that
        # create_train_state splits from key(seed) (split(k)[i] is fold_in(k, i) under threefry).
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), SAMPLE_STREAM),
                                  step)

    def sample(params, step):
        out = run(params, key(step))
        return [text + tok.decode(row.tolist()) for row in np.asarray(out.tokens)]

    sample.warm_up = lambda params: run.warm_up(params, key(0))  # during the train step's compile
    return sample


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    common.check_fields(cfg, at_least={"num_steps": 0, "eval_batches": 0, "eval_batch_size": 1,
                                       "num_samples": 0})
    common.use_cpu_devices(cfg)  # before anything starts JAX
    initialize()
    t0 = time.time()
    ds = common.resolve_dataset(cfg.dataset, kind="text", data_dir=cfg.data_dir)
    tok = ds.tokenizer(cfg.tokenizer, cfg.vocab_size or None)
    tokenizer_file = common.TokenizerFile(tok, workdir)  # refuses another run's workdir
    model_cfg = common.model_config(cfg, tok.vocab_size, architecture="decoder_only",
                                    trailing_padding=True)
    common.check_lengths(model_cfg, seq_len=cfg.seq_len)
    model = make_model(model_cfg)
    train_data, eval_data, _ = make_data(cfg, ds, tok)
    sample = make_sampler(model, cfg, tok) if cfg.num_samples else None
    writer = common.MetricsWriter(workdir, cfg.num_steps, common.latest_step(workdir),
                                  progress=cfg.progress)
    engine = common.make_engine(cfg, model_cfg)
    num_params = engine.num_params()
    writer.write(common.describe_run(ds, tok, engine, num_params))

    def eval_fn(state, engine):
        if sample is None:
            return {}
        step = int(engine.to_host(state.step))  # one value, whatever the parallel mode
        texts = sample(engine.device_params(state), step)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(f"=== step {step} ===\n" + "\n---\n".join(texts) + "\n")
        writer.write(f"sample: {texts[0][:300]!r}")
        return {}

    result = train(model_cfg, engine.optimizer_config, train_data, engine=engine,
                   workdir=workdir, num_steps=cfg.num_steps, seed=cfg.seed,
                   eval_data=eval_data, eval_fn=eval_fn, eval_every=cfg.eval_every,
                   checkpoint_every=cfg.checkpoint_every,
                   keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every,
                   experiment=common.experiment_record(cfg, ds), hooks=[writer, tokenizer_file],
                   warm_up=(lambda state, engine: sample.warm_up(engine.device_params(state)))
                   if sample else None)
    writer.close()
    if common.finished_before(workdir, result, writer):
        return
    common.plot_losses(workdir, result.history)
    common.exit_if_interrupted(result)  # the checkpoint holds the state, a rerun continues
    final = common.final_results(workdir, result, wall_seconds=writer.wall_seconds(t0),
                                 parameters=num_params, dataset=ds.name)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(final, f, indent=2)
    print(json.dumps(final, indent=2))
    common.skip_teardown()


if __name__ == "__main__":
    app.run(main)
