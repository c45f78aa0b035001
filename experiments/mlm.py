"""Train a BERT-style encoder with the masked-language-model objective.

    python experiments/mlm.py --workdir=/tmp/mlm                   # offline default corpus
    python experiments/mlm.py --workdir=/tmp/mlm --config.dataset=path/to/text_or_folder

Each evaluation appends the masked-token loss (nats per masked token) and accuracy to
`WORKDIR/metrics.jsonl`, and shows how the model fills the masks of a validation example.
The masked-LM head runs only at the selected positions: at most `--config.model.mlm_predictions`
a row (default 1.25 x mask_rate x seq_len, at most seq_len: 24 of 128; 0 = every position).
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
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import common  # noqa: E402
from flaxformer_lite import make_model  # noqa: E402
from flaxformer_lite.data import MASK_ID, mlm_pipeline  # noqa: E402
from flaxformer_lite.training import initialize, train  # noqa: E402

_CONFIG, _WORKDIR = common.define_flags("mlm.py", "/tmp/flaxformer_mlm")
flags.adopt_module_key_flags(common)  # --help lists --config and --workdir


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    logging.set_verbosity(logging.WARNING)
    common.check_fields(cfg, at_least={"num_steps": 0, "eval_batches": 0, "eval_batch_size": 1},
                        fractions=("mask_rate",))
    common.use_cpu_devices(cfg)  # before anything starts JAX
    initialize()
    t0 = time.time()
    ds = common.resolve_dataset(cfg.dataset, kind="text", data_dir=cfg.data_dir)
    tok = ds.tokenizer(cfg.tokenizer, cfg.vocab_size or None, reserve_mask=True)
    tokenizer_file = common.TokenizerFile(tok, workdir)  # refuses another run's workdir
    # The head only where the loss is read: at most this many positions a row (BERT's
    # max_predictions_per_seq: 20 of 128 at a 15% rate), with room for packed rows'
    # per-example rounding (never past a row); the pipeline caps its masking to fit.
    predictions = (min(cfg.seq_len, math.ceil(1.25 * cfg.mask_rate * cfg.seq_len))
                   if cfg.model.mlm_predictions is None else cfg.model.mlm_predictions)
    model_cfg = common.model_config(cfg, tok.vocab_size, architecture="encoder_only",
                                    script={"mlm_head": True, "mlm_predictions": predictions})
    common.check_lengths(model_cfg, seq_len=cfg.seq_len)
    model = make_model(model_cfg)
    cap = model_cfg.mlm_predictions or None
    pipe = mlm_pipeline(ds, tok, split="train", batch_size=cfg.batch_size, max_len=cfg.seq_len,
                        mask_rate=cfg.mask_rate, seed=common.data_seed(cfg),
                        max_predictions=cap)

    def eval_batches():
        it = iter(mlm_pipeline(ds, tok, split="validation", batch_size=cfg.eval_batch_size,
                               max_len=cfg.seq_len, mask_rate=cfg.mask_rate, seed=cfg.eval_seed,
                               shuffle=False, num_epochs=1, drop_remainder=False,
                               max_predictions=cap))
        return it if not cfg.eval_batches else (b for _, b in zip(range(cfg.eval_batches), it))

    example = next(iter(eval_batches()))
    predict = jax.jit(lambda p, x, seg, pos: model.apply(
        {"params": p}, x, segment_ids=seg, positions=pos)["logits"].argmax(-1))

    def eval_fn(state, engine):
        # The longest example of the first packed row (the row's first may be the tail of a
        # paragraph the split cut), read as training reads it (its own positions, attending
        # only within itself).
        segments = np.asarray(example["segment_ids"][:1])
        ids, counts = np.unique(segments[segments != 0], return_counts=True)
        first = segments == ids[np.argmax(counts)]
        row = np.where(first, example["inputs"][:1], 0)
        guess = np.asarray(predict(engine.device_params(state), row, first.astype(np.int32),
                                   np.asarray(example["positions"][:1])))[0]
        masked = row[0] == MASK_ID
        filled = np.where(masked & first[0], guess, row[0])
        # decode drops padding, BOS and EOS and writes the masks as "[MASK]"
        writer.write("masked: " + tok.decode(row[0].tolist())[:200].replace("\n", " "))
        writer.write("filled: " + tok.decode(filled.tolist())[:200].replace("\n", " "))
        return {}

    writer = common.MetricsWriter(workdir, cfg.num_steps, common.latest_step(workdir),
                                  progress=cfg.progress)
    engine = common.make_engine(cfg, model_cfg)
    num_params = engine.num_params()
    writer.write(common.describe_run(ds, tok, engine, num_params))
    result = train(model_cfg, engine.optimizer_config, lambda: iter(pipe), engine=engine,
                   workdir=workdir, num_steps=cfg.num_steps, seed=cfg.seed,
                   eval_data=eval_batches, eval_fn=eval_fn, eval_every=cfg.eval_every,
                   checkpoint_every=cfg.checkpoint_every,
                   keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every,
                   experiment=common.experiment_record(cfg, ds), hooks=[writer, tokenizer_file])
    writer.close()
    if common.finished_before(workdir, result, writer):
        return
    common.plot_losses(workdir, result.history)
    common.exit_if_interrupted(result)  # the checkpoint holds the state, a rerun continues
    final = common.final_results(workdir, result, wall_seconds=writer.wall_seconds(t0),
                                 parameters=num_params)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(final, f, indent=2)
    print(json.dumps(final, indent=2))
    common.skip_teardown()


if __name__ == "__main__":
    app.run(main)
