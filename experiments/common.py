"""What the experiment scripts share: configs to library objects, data, logging and plots.

Each script (`lm.py`, `translate.py`, `mlm.py`) takes `--config=FILE` (an ml_collections
config, overridable with `--config.a.b=value`) and `--workdir=DIR`. The workdir collects
`config.json`, `checkpoints/`, the tokenizer (`tokenizer.json` or `tokenizer.model`),
`metrics.jsonl` (one JSON line per evaluation, with `step` and `eval_loss` in mean nats per
target token without label smoothing, as `train_metrics.jsonl`'s `train_nll`; the objective
the console's `eval/loss` shows, smoothing and z-loss included, is `eval_objective`, as
`train_loss` is), TensorBoard events under `tensorboard/`, and `loss.png`. Rerunning with the same
workdir resumes; `flaxformer_lite.training.load_run(workdir)` reads the model config, the
parameters and the tokenizer back.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
from absl import app

from flaxformer_lite import PRESETS, get_config, gpu_config
from flaxformer_lite.config import check_number
from flaxformer_lite.data import BOS_ID, EOS_ID, load_dataset
from flaxformer_lite.data.builders import default_data_dir
from flaxformer_lite.data.embedded import python_docs_corpus
from flaxformer_lite.training import (
    Engine,
    LossConfig,
    OptimizerConfig,
    ParallelConfig,
    TensorBoardHook,
    is_main_process,
    learning_rate_at,
    num_updates,
)
from flaxformer_lite.training.checkpoint import TOKENIZER_FILES

log = logging.getLogger("experiments")

EMBEDDED = "embedded"  # the default dataset: the Python standard library's docstrings


def define_flags(config_file: str, workdir: str):
    """The `--config` (an ml_collections file in experiments/configs/, default `config_file`)
    and `--workdir` flags every script takes; returns their flag holders."""
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", config_file),
        "Experiment config file; set any of its fields with --config.<field>=<value>, e.g. "
        "--config.num_steps=100 --config.model.num_kv_heads=2.")
    workdir_flag = flags.DEFINE_string(
        "workdir", workdir, "Checkpoints, metrics, samples and plots go here; reruns resume.")
    return config, workdir_flag


def embedded_corpus_file(data_dir: str | None = None) -> Path:
    """Write the offline docstring corpus once under the data dir and return its path."""
    root = Path(data_dir or default_data_dir()) / "embedded"
    path = root / f"python_docs_{sys.version_info.major}{sys.version_info.minor}.txt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(python_docs_corpus(), encoding="utf-8")
        os.replace(tmp, path)  # never leave a half-written corpus behind
    return path


def resolve_dataset(spec: str, *, kind: str, data_dir: str | None = None, **options):
    """`config.dataset` -> a `Dataset`: "embedded", a local file/folder, `synthetic/<task>`
    or a TFDS catalog name."""
    data_dir = data_dir or None
    if spec in ("", EMBEDDED):
        spec = str(embedded_corpus_file(data_dir))
    return load_dataset(spec, kind=kind, data_dir=data_dir, **options)


def lm_prompt(tok, text: str, sampler: str) -> tuple[list[int], tuple[int, ...], str]:
    """(prompt ids, stop tokens, the prompt as shown) for sampling an LM the way its training
    rows start: running text after `text` (the windows sampler), or a packed document: BOS and
    the stripped text, ending at EOS."""
    if sampler == "packed":  # packed documents are stripped of outer newlines, then framed
        text = text.strip("\n")
        return [BOS_ID] + tok.encode(text), (EOS_ID,), text
    return tok.encode(text) or [tok.encode("\n")[0]], (), text


def command_line_fields() -> set[str] | None:
    """The `--config.a.b=...` paths given on the command line (`"model.preset"`, ...), or None
    when no parsed `--config` flag exists (a config built in code)."""
    from absl import flags

    if "config" not in flags.FLAGS or not flags.FLAGS.is_parsed():
        return None
    return set(getattr(flags.FLAGS["config"], "override_values", {}) or {})


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int, *, architecture: str,
                 trailing_padding: bool = False, script: Mapping | None = None):
    """`cfg.model` -> `TransformerConfig`: the preset named `preset`, with `gpu_config`'s
    settings when `gpu` is true (`trailing_padding` passed on), then every field that is set
    (unset placeholders, None, keep the preset's or the GPU setting's value), then `script`'s
    fields (what the script itself needs, e.g. mlm.py's head). The preset must build an
    `architecture` model, the one the script trains.

    A preset chosen on the command line comes as published with only the command line's model
    fields on top: the config file's model values (sizes, dropout, biases) shape the file's own
    preset, and on another preset they built a model nobody asked for (t5-small with the
    translation config's 128-wide, 2-layer sizes: 4.8M parameters instead of 60.5M). The
    fields left out are printed."""
    overrides = {k: v for k, v in cfg.model.to_dict().items() if v is not None}
    preset = overrides.pop("preset")
    given = command_line_fields()
    if given is not None and "model.preset" in given:
        left_out = sorted(k for k in overrides if f"model.{k}" not in given
                          and k != "gpu" and k not in (script or {}))
        if left_out:
            print(f"--config.model.preset={preset}: {preset} as published, with the command "
                  "line's model fields on top; the config file's model settings "
                  f"({', '.join(left_out)}) are for its own preset and are left out.",
                  flush=True)
        overrides = {k: v for k, v in overrides.items() if k not in left_out}
    for key, value in (script or {}).items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"--config.model.{key}={overrides[key]!r}: this script sets "
                             f"{key}={value!r} itself (it trains with it); leave the flag out.")
    overrides.update(script or {})
    kind = get_config(preset).architecture
    if kind != architecture:
        fits = [name for name, c in PRESETS.items() if c.architecture == architecture]
        raise ValueError(f"--config.model.preset={preset!r} builds a {kind} model; this script "
                         f"trains {architecture} models: {', '.join(fits)}.")
    if overrides.pop("gpu", False):
        if jax.default_backend() != "gpu":
            raise ValueError(f"--config.model.gpu=True selects the GPU settings (cuDNN "
                             f"attention, bfloat16), but JAX runs on {jax.default_backend()}; "
                             "leave it out here.")
        return gpu_config(preset, trailing_padding=trailing_padding, vocab_size=vocab_size,
                          **overrides)
    return get_config(preset, vocab_size=vocab_size, **overrides)


def check_fields(cfg: ml_collections.ConfigDict, *, at_least: Mapping[str, int] | None = None,
                 fractions: tuple[str, ...] = ()) -> None:
    """Refuse (naming the flag) a config whole number below its least value, or a fraction
    outside (0, 1), at start-up: such values failed later, inside a compile or a pipeline,
    under another field's name. The seeds the config has are checked too (whole numbers >= 0;
    an unset `data_seed` follows `seed`): -1 failed in NumPy at the first batch."""
    seeds = {name: 0 for name in ("seed", "data_seed", "eval_seed")
             if name in cfg and cfg[name] is not None}
    try:
        for name, least in {**seeds, **(at_least or {})}.items():
            check_number("--config", name, cfg[name], least, integer=True,
                         hint=" (0 = all)" if least == 0 and name.startswith("eval_") else "")
        for name in fractions:
            check_number("--config", name, cfg[name], 0.0, 1.0, low_open=True, high_open=True)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def check_lengths(model_cfg, **lengths: int) -> None:
    """Each `--config.<name>` sequence length fits the model's `max_len`: named at start-up,
    not by the first batch's check (which knows neither flag)."""
    for name, n in lengths.items():
        if n > model_cfg.max_len:
            raise ValueError(f"--config.{name}={n} exceeds the model's max_len="
                             f"{model_cfg.max_len}; lower it or raise --config.model.max_len.")


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """`config.optimizer`; an unset `decay_steps` is the run's number of updates, so that
    `--config.num_steps` alone moves the end of the cosine schedule with it."""
    fields = cfg.optimizer.to_dict()
    if fields.get("clip_norm") == 0:  # the command line's way to say None (no clipping)
        fields["clip_norm"] = None
    if fields.get("schedule") != "cosine":  # the config file's cosine settings do not apply
        fields["final_learning_rate"] = 0.0
    if fields.get("decay_steps") is None and fields.get("schedule") == "cosine":
        fields["decay_steps"] = num_updates(cfg.num_steps, fields.get("accumulation_steps", 1))
        if fields["decay_steps"] <= fields.get("warmup_steps", 0):
            raise ValueError(
                f"--config.num_steps={cfg.num_steps} gives {fields['decay_steps']} updates, no "
                f"more than --config.optimizer.warmup_steps={fields['warmup_steps']}: the "
                "cosine schedule would end inside its warmup. Lower warmup_steps or raise "
                "num_steps (or set --config.optimizer.schedule=constant).")
    return OptimizerConfig(**fields)


def parallel_config(cfg: ml_collections.ConfigDict) -> ParallelConfig:
    fields = cfg.parallel.to_dict()
    fields.pop("cpu_devices", None)  # applied at start-up by `use_cpu_devices`
    return ParallelConfig(**fields)


def use_cpu_devices(cfg: ml_collections.ConfigDict) -> None:
    """`config.parallel.cpu_devices = n` (> 0): JAX sees this host's CPU as n devices, and the
    default parallel mode trains data parallel over them (mode "auto" becomes "mesh").

    On a 2-core CPU two devices run two half-batch programs side by side, presumably keeping the
    cores busier than one program whose ops each split over both: the Shakespeare model's train
    step took 0.85-0.9x the time on an Intel Xeon and ~0.65x on an AMD EPYC, the 6-layer/384
    model's 0.85-0.90x on the Xeon (docs/performance.md). Call it first thing in `main`, before
    anything starts JAX's backend; 0 leaves JAX's default (one CPU device). A device count the
    user set already (`--xla_force_host_platform_device_count` in `XLA_FLAGS`, or
    `JAX_NUM_CPU_DEVICES`) wins. Accelerators are unaffected.
    """
    n = cfg.parallel.get("cpu_devices", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"config.parallel.cpu_devices={n!r} must be a whole number >= 0 "
                         "(0 = JAX's default, n = split the CPU into n devices).")
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or "JAX_NUM_CPU_DEVICES" in os.environ):
        return
    if n:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError as e:
            raise RuntimeError("config.parallel.cpu_devices must be applied before JAX starts "
                               "its backend; call use_cpu_devices(cfg) before any JAX "
                               f"operation ({e}).") from e


def make_engine(cfg: ml_collections.ConfigDict, model_cfg, loss: LossConfig | None = None
                ) -> Engine:
    """The compiled steps for `cfg.optimizer` and `cfg.parallel` (pass it to `train`)."""
    return Engine(model_cfg, optimizer_config(cfg), parallel_config(cfg), loss)


class TokenizerFile:
    """The run's tokenizer in its workdir (`tokenizer.json` for byte/char, `tokenizer.model`
    for SentencePiece), where `load_run` finds it. Built before training, it refuses a workdir
    whose checkpoints were trained with another tokenizer (resuming on other ids of the same
    vocabulary size would train on nonsense). As a `train()` hook it writes the file at
    `on_start`, once train() holds the workdir's lock, so a second launch refused by the lock
    cannot overwrite the running job's file."""

    def __init__(self, tok, workdir: str):
        from flaxformer_lite.data import load_tokenizer

        self.tok, self.workdir = tok, workdir
        json_file, sentencepiece_file = TOKENIZER_FILES
        self.name = json_file if tok.kind in ("byte", "char") else sentencepiece_file
        saved = [n for n in TOKENIZER_FILES
                 if os.path.exists(os.path.join(workdir, n))]
        if saved and latest_step(workdir):
            old = load_tokenizer(os.path.join(workdir, saved[0]))
            if _tokenizer_bytes(old) != _tokenizer_bytes(tok):
                raise ValueError(
                    f"{workdir} holds the run's tokenizer ({saved[0]}: {old!r}, {old.kind}), "
                    f"and this run builds another ({tok!r}, {tok.kind}) from its "
                    "--config.dataset/tokenizer/vocab_size: resume with the same data and "
                    "tokenizer, or pass a new --workdir.")

    def on_start(self, step: int) -> None:
        del step
        for name in TOKENIZER_FILES:
            path = os.path.join(self.workdir, name)
            if name != self.name and os.path.exists(path):
                os.remove(path)
        self.tok.save(os.path.join(self.workdir, self.name))  # atomic: temp file + rename

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        del step, metrics


def _tokenizer_bytes(tok) -> bytes:
    """The tokenizer's saved form (what decides its ids)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return tok.save(os.path.join(tmp, "t")).read_bytes()


def data_seed(cfg: ml_collections.ConfigDict) -> int:
    """The data order's seed: `config.data_seed`, else `config.seed`. Setting it apart lets
    a sweep vary the initialisation (`seed`) over one data order, or the reverse."""
    value = cfg.get("data_seed")
    return cfg.seed if value is None else value


def experiment_record(cfg: ml_collections.ConfigDict, ds) -> dict:
    """`train(experiment=...)`: the script's whole config, plus the prepared dataset's name,
    which for local files holds a digest of their contents, so a rerun on an edited corpus
    at the same path is named among the changed fields."""
    return {**cfg.to_dict(), "dataset_prepared": ds.info.get("config")}


def describe_run(ds, tok, engine: Engine, num_params: int) -> str:
    """The line every script prints first: data, devices, parallel mode, model, compile cache."""
    cache = jax.config.jax_compilation_cache_dir or "off"
    opt = engine.optimizer_config
    # The schedules peak at the warmup's last update, said as they count updates (from 1;
    # `learning_rate_at` takes the 0-based step); vaswani's `learning_rate` is a multiplier,
    # so its peak is said in numbers (1e-3 there peaks near 1e-5 at d_model 384).
    peak_update = max(opt.warmup_steps, 1)
    peak = float(learning_rate_at(opt, (peak_update - 1) * opt.accumulation_steps,
                                  d_model=engine.model_config.d_model))
    return (f"dataset {ds!r}; tokenizer {tok.kind} ({tok.vocab_size} ids); "
            f"{jax.device_count()} device(s) [{jax.devices()[0].platform}], "
            f"{jax.process_count()} process(es); {engine.describe()}; "
            f"{engine.model_config.architecture} model with "
            f"{num_params:,} parameters; {opt.schedule} learning rate peaking at {peak:.3g} "
            f"(update {peak_update}); compilation cache {cache}")


class MetricsWriter:
    """Hook: eval results -> `metrics.jsonl`; train windows -> `train_metrics.jsonl`;
    everything -> TensorBoard; a tqdm progress bar with loss, tokens/s and ETA (main process
    only). On a resumed run (`on_start`) the records a killed run wrote past the restored
    checkpoint are dropped from these files and `samples.txt`, so every step appears once."""

    def __init__(self, workdir: str, num_steps: int, start_step: int = 0,
                 progress: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.train_path = os.path.join(workdir, "train_metrics.jsonl")
        self.main = is_main_process()
        self.tb = TensorBoardHook(os.path.join(workdir, "tensorboard")) if self.main else None
        self.bar = None
        if self.main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, initial=start_step, dynamic_ncols=True,
                            unit="step", file=sys.stdout, mininterval=1.0)
        self.start = time.time()
        self.start_step = start_step
        self.time_offset = 0.0  # seconds the earlier runs took up to the restored step

    def on_start(self, step: int) -> None:
        """The step the run starts from (0, or the restored checkpoint's)."""
        self.start_step = step
        if not self.main:
            return
        self.tb.on_start(step)
        kept = _trim_jsonl(self.path, step) + _trim_jsonl(self.train_path, step)
        _trim_samples(os.path.join(self.workdir, "samples.txt"), step)
        # The latest time a kept record holds: a stopped run logs its train window at the step
        # it saved, so its time up to that step counts (the steps are not redone).
        self.time_offset = max((r.get("time", 0.0) for r in kept), default=0.0)
        if step:  # said even without a progress bar, whatever the logging level
            self.write(f"Resumed from step {step} "
                       f"({os.path.join(self.workdir, 'checkpoints', str(step))}).")
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def wall_seconds(self, t0: float) -> float:
        """`results.json`'s wall time: this attempt's since `t0`, plus the earlier attempts' up
        to the last record (train window or evaluation) the resumed run kept (`time_offset`;
        time they spent past it, redone by this attempt, is not counted)."""
        return round(self.time_offset + time.time() - t0, 1)

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.main:
            return
        self.tb(step, metrics)
        elapsed = round(self.time_offset + time.time() - self.start, 2)
        if "train/nll" in metrics:
            train = {"step": step, "time": elapsed,
                     **{k.replace("/", "_"): v for k, v in metrics.items()
                        if k.startswith("train/")}}
            with open(self.train_path, "a") as f:
                f.write(json.dumps(train) + "\n")
        if any(k.startswith("eval/") for k in metrics):
            record = {"step": step, "time": elapsed}
            for k, v in metrics.items():
                record[k.replace("/", "_")] = v
            if "eval/nll" in metrics:  # mean nats per target token, without label smoothing
                # eval_loss is the nll, as the plot's curves and train_nll are; the training
                # objective (label smoothing, z-loss: the console's eval/loss) is kept beside.
                record["eval_objective"] = record.get("eval_loss")
                record["eval_loss"] = metrics["eval/nll"]
                record["eval_bits_per_token"] = metrics["eval/nll"] / math.log(2)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            line = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                             if isinstance(v, int | float))
            self.write(f"[eval @ {step}] {line}")
        if self.bar is not None:
            if "train/loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                     tok_s=f"{metrics.get('train/tokens_per_second', 0):.0f}",
                                     refresh=False)
            self.bar.update(max(0, step - self.bar.n))

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict]:
    """The records of `workdir/name`, one JSON object with a "step" a line; a line that is not
    one (torn by a crash or a full disk in mid-write) is skipped with a warning naming it."""
    return _read_jsonl(os.path.join(workdir, name))[0]


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    """`read_metrics` of a path, and how many lines it skipped."""
    if not os.path.exists(path):
        return [], 0
    records, skipped = [], 0
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a record with a step")
            except ValueError as error:
                log.warning("Skipping %s:%d, not a metrics record (%s; written by a run that "
                            "stopped in mid-write?): %.80r", path, number, error, line)
                skipped += 1
                continue
            records.append(record)
    return records, skipped


def _trim_jsonl(path: str, last_step: int) -> list[dict]:
    """Keep the records of steps <= `last_step` (rewritten atomically, without unreadable
    lines, which the next record would otherwise be appended to); return them."""
    if not os.path.exists(path):
        return []
    records, skipped = _read_jsonl(path)
    kept = [r for r in records if r["step"] <= last_step]
    if skipped or len(kept) != len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return kept


def _trim_samples(path: str, last_step: int) -> None:
    """Drop the `=== step N ===` blocks of `samples.txt` with N > `last_step`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    blocks = re.split(r"(?m)^(?==== step \d+ ===$)", text)
    kept = [b for b in blocks if not b.startswith("=== step ")
            or int(b.split()[2]) <= last_step]
    if len(kept) != len(blocks):
        with open(path + ".tmp", "w") as f:
            f.write("".join(kept))
        os.replace(path + ".tmp", path)


def finished_before(workdir: str, result, writer: MetricsWriter,
                    settings: dict | None = None) -> bool:
    """True when this is a rerun of a finished run that trained no step: its `results.json`
    is printed and left, with `loss.png` and the test outputs, as it was (the script then
    returns). With `settings` (what the script's final test depends on), a `results.json`
    that records other values (or none) is not the rerun's: False, and the script tests
    again."""
    path = os.path.join(workdir, "results.json")
    if result.interrupted or result.step != writer.start_step or not os.path.exists(path):
        return False
    with open(path) as f:
        recorded = json.load(f)
    changed = [f"{k}={recorded.get(k, '(not recorded)')!r} -> {v!r}"
               for k, v in (settings or {}).items() if recorded.get(k, _MISSING) != v]
    if changed:
        print(f"results.json was tested with other settings ({', '.join(changed)}): testing "
              f"the step-{result.step} run again.", flush=True)
        return False
    print(json.dumps(recorded, indent=2))
    skip_teardown()
    return True


_MISSING = object()


def final_results(workdir: str, result, **extra) -> dict | None:
    """What `results.json` holds: the run's step and the last evaluation in `metrics.jsonl`
    (earlier runs included, so rerunning a finished run keeps its numbers); None when the run
    was interrupted (no final results to write)."""
    if result.interrupted:
        return None
    evals = [m for m in read_metrics(workdir) if "eval_loss" in m and m["step"] <= result.step]
    out = {"step": result.step, **extra}
    if evals:
        last = evals[-1]
        out.update({k: last[k] for k in ("eval_loss", "eval_bits_per_token", "eval_accuracy")
                    if k in last})
        out["eval_step"] = last["step"]
        if last["step"] != result.step:  # the final evaluation was cut short by a stop
            print(f"results.json: the last evaluation is from step {last['step']}, not the "
                  f"final step {result.step} (its evaluation was cut short).", flush=True)
    return out


def exit_if_interrupted(result) -> None:
    """An interrupted run (SIGTERM, Ctrl-C; its checkpoint is written) exits with 128 + the
    signal's number (143, 130), not 0: a job restarter (a Kubernetes Job with
    `restartPolicy: OnFailure`, `until python lm.py ...; do :; done`) then reruns it, and the
    rerun resumes. Returns for a run that ended."""
    if not result.interrupted:
        return
    name = result.signal.name if result.signal is not None else "a stop request"
    print(f"Interrupted by {name} at step {result.step}; its checkpoint is saved. Rerun the "
          f"same command to resume (exit status {result.exit_status}).", file=sys.stderr,
          flush=True)
    skip_teardown()
    sys.exit(result.exit_status)


def plot_losses(workdir: str, history: list[dict]) -> str | None:
    """Train and eval loss curves (`train_metrics.jsonl`, else this run's history, and
    `metrics.jsonl`: earlier runs of the workdir included) -> `loss.png`."""
    if not is_main_process():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nll on both curves: train/loss adds label smoothing and z-loss, which eval_loss leaves out
    train = ([(m["step"], m["train_nll"]) for m in read_metrics(workdir, "train_metrics.jsonl")]
             or [(h["step"], h["train/nll"]) for h in history if "train/nll" in h])
    evals = [(m["step"], m["eval_loss"]) for m in read_metrics(workdir) if "eval_loss" in m]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def skip_teardown() -> None:
    """Call last, once everything is written and closed: `gc.freeze()` moves every live object
    out of the garbage collector's reach, so the interpreter's exit does not collect and destroy
    them one by one (compiled executables, device buffers, traces): ~1 s on the Shakespeare run.
    Objects that own files or threads must have been closed already; the scripts close theirs."""
    gc.freeze()


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in `workdir`, ascending (read from the directory names:
    nothing is opened)."""
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() \
        else []


def latest_step(workdir: str) -> int:
    """The step of the newest checkpoint in `workdir` (0 if none), for the progress bar."""
    return max(checkpoint_steps(workdir), default=0)
