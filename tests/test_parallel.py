"""Several devices and several processes. JAX fixes the device count when it starts, so every
run here is a subprocess (tests/_parallel_worker.py, tests/_train_worker.py) with its own
`--xla_force_host_platform_device_count`; the references are other runs (one device, one
process, no interruption), never stored numbers.

The subprocesses share a persistent XLA compilation cache, so a program compiled by one run is
not compiled again by the next (this changes no result, only start-up time).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TIMEOUT = 900  # seconds per subprocess; generous for a loaded 2-core machine


@pytest.fixture(scope="session")
def worker_env(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # share compiled programs between xdist workers
        base = base.parent
    cache = base / "jax_compilation_cache"
    cache.mkdir(exist_ok=True)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # Each worker appends its own device count to XLA_FLAGS (the last one counts).
    return env


def start(script, args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, expect_rc=0) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker timed out:\n{out[-4000:]}")
    assert proc.returncode == expect_rc, f"worker exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def run(script, args, env) -> str:
    return finish(start(script, args, env))


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_params_close(a, b, atol=1e-5, key_bias=False):
    """Every parameter within `atol`. The key bias (`qkv/bias[1]`) is left out unless
    `key_bias`: its gradient is zero in exact arithmetic (it adds `q . b_k` to every score of a
    row, which the softmax cancels), so what is computed is rounding noise, which Adam turns into
    updates of ~lr whose size differs between any two compilations (seen: 1.6e-5 at lr 3e-3,
    every other parameter within 1.3e-7)."""
    assert sorted(a) == sorted(b)

    def diff(k):
        d = np.abs(a[k] - b[k])
        return d[[0, 2]] if k.endswith("qkv/bias") and not key_bias else d

    worst = max(float(np.max(diff(k))) for k in a)
    assert worst < atol, f"params differ by {worst}"


def read_log(path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a resumed run logs some steps twice)."""
    out: dict[int, list[float]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                out.setdefault(record["step"], []).append(record["loss"])
    return out


def read_eval_log(path) -> dict[int, dict[str, float]]:
    """step -> the eval metrics logged for it."""
    out = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "eval" in record:
                out[record["step"]] = record["eval"]
    return out


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited early:\n{proc.communicate()[0][-4000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("worker never reached the pause step")
        time.sleep(0.1)


# ---- single vs pmap vs mesh; restore on other device counts -----------------------------------

@pytest.fixture(scope="module")
def equivalence(tmp_path_factory, worker_env):
    out = tmp_path_factory.mktemp("equivalence")
    run("_parallel_worker.py", ["equivalence", "--devices", 8, "--out", out], worker_env)
    return out


def test_single_pmap_mesh_give_the_same_params(equivalence):
    single = load(equivalence / "single.npz")
    assert_params_close(single, load(equivalence / "init.npz"), atol=10.0)  # same tree
    moved = max(float(np.max(np.abs(single[k] - v)))
                for k, v in load(equivalence / "init.npz").items())
    assert moved > 1e-3  # three steps really changed the parameters
    reference = json.loads((equivalence / "single.json").read_text())
    mesh = "mesh (data=2, fsdp=2, tensor=2) over 8 devices"
    for mode, layout in (("pmap", "pmap over 8 local devices"), ("mesh", mesh),
                         ("mesh_micro", mesh)):
        assert_params_close(single, load(equivalence / f"{mode}.npz"))
        record = json.loads((equivalence / f"{mode}.json").read_text())
        assert record["describe"].startswith(layout)
        assert record["describe"].endswith("2 micro-batches per step") == (mode == "mesh_micro")
        # Micro-batches add the same sums in another order: float32 rounding only. (The
        # micro-batched run also pads its vocabulary-split head, which changes no number.)
        rtol = 1e-5 if mode == "mesh_micro" else 1e-6
        np.testing.assert_allclose(record["losses"], reference["losses"], rtol=rtol)
        # Eval on 5 rows: padding rows added to fill the shards change no sum.
        for key in ("loss", "nll", "correct", "tokens", "sequences"):
            np.testing.assert_allclose(record["eval"][key], reference["eval"][key], rtol=1e-5)
    assert reference["eval"]["sequences"] == 5


def test_loss_weights_train_alike_on_two_devices(tmp_path, worker_env):
    """Batches with float `loss_weights` (pad_id=None): pmap, a 2-device mesh and 2
    micro-batches a device give one device's parameters, loss and weight sums; the eval
    batch's padding rows (weights 0) change no sum. Likewise a `loss_fn` of your own that
    reads a batch entry of its own (`loss_batch_keys`), laid out and split with the rows."""
    run("_parallel_worker.py", ["weights", "--devices", 2, "--out", tmp_path], worker_env)
    for prefix in ("", "custom_"):
        single = load(tmp_path / f"{prefix}single.npz")
        reference = json.loads((tmp_path / f"{prefix}single.json").read_text())
        for mode in ("pmap", "mesh", "mesh_micro"):
            assert_params_close(single, load(tmp_path / f"{prefix}{mode}.npz"))
            record = json.loads((tmp_path / f"{prefix}{mode}.json").read_text())
            assert "2" in record["describe"]
            np.testing.assert_allclose(record["losses"], reference["losses"], rtol=1e-5)
            for key in ("loss", "nll", "tokens", "sequences"):
                np.testing.assert_allclose(record["eval"][key], reference["eval"][key],
                                           rtol=1e-5)
        tokens = [t for _, t in reference["losses"]]
        assert all(t != int(t) for t in tokens)  # weighted sums, not token counts
    plain = json.loads((tmp_path / "single.json").read_text())["losses"]
    scaled = json.loads((tmp_path / "custom_single.json").read_text())["losses"]
    assert plain[0][1] == pytest.approx(scaled[0][1]) and plain[0][0] != pytest.approx(
        scaled[0][0])  # the same weights; the row scales reached the loss


def test_trainable_parameters_train_alike_on_a_mesh(equivalence):
    """Engine(trainable=...) on a (data, fsdp, tensor) mesh: the same parameters as on one
    device, the frozen ones where they started."""
    init = load(equivalence / "init.npz")
    single = load(equivalence / "trainable_single.npz")
    assert_params_close(single, load(equivalence / "trainable_mesh.npz"))
    for k, v in single.items():
        assert np.array_equal(v, init[k]) != ("/layer_1/" in k or "final_norm" in k), k


def test_a_length_rule_the_cpu_attention_cannot_compile_is_named(equivalence):
    error = json.loads((equivalence / "length_rule.json").read_text())["error"]
    assert "split 'length' over ['tensor']" in error and "cpu_attention" in error


def test_microbatches_add_no_collectives(equivalence):
    """On a data-parallel mesh the micro-batched step compiles to the same collectives as the
    whole-batch step (the gradient all-reduce): slicing moves no rows between devices."""
    counts = json.loads((equivalence / "collectives.json").read_text())
    assert counts["data8"].get("all-reduce", 0) >= 1
    assert counts["data8_micro"] == counts["data8"]


@pytest.mark.parametrize("projection", ["fused", "separate"])
def test_tensor_parallel_splits_the_work(equivalence, projection):
    """On a (data=2, tensor=4) mesh each device does ~1/8 of the one-device step's FLOPs (XLA's
    count of each compiled program). The q/k/v (or k/v) projection's kernel, `[embed, 3 | 2,
    heads, head_dim]`, must be contracted unflattened: flattened, it lost the split of `heads`
    and every device computed every head's projection and its gradients (1.98x and 1.71x of
    1/8 here; small norms, masks and the loss, repeated on each tensor shard, keep it ~1.15x)."""
    flops = json.loads((equivalence / "flops.json").read_text())
    per_device = flops[f"tensor4/{projection}"]
    assert per_device < 1.3 * flops[f"single/{projection}"] / 8


@pytest.mark.parametrize("devices,mode", [(1, "single"), (4, "mesh4"), (8, "pmap")])
def test_restore_on_other_devices_and_modes(equivalence, worker_env, tmp_path, devices, mode):
    """Saved from a (2, 2, 2) mesh on 8 devices, restored on 1 device, a (1, 2, 2) mesh and
    replicated under pmap on the same 8 devices."""
    out = tmp_path / "restored"
    run("_parallel_worker.py", ["restore", "--devices", devices, "--mode", mode, "--ckpt",
                                equivalence / "ckpt", "--out", out], worker_env)
    saved = load(equivalence / "mesh.npz")
    restored = load(str(out) + ".npz")
    assert_params_close(saved, restored, atol=1e-30, key_bias=True)  # bit-exact
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["step"] == 3 and record["data_state"] == {"batches": 3}
    assert record["devices"] == devices and record["leaf_devices"] == devices
    # Also laid out again as init_state(params=...), and load_params into the mode's layout.
    assert record["load_state_matches"]
    expected = json.loads((equivalence / "next.json").read_text())["loss"]
    assert record["loss"] == pytest.approx(expected, rel=1e-5)  # training continues identically


# ---- trainer runs: kill/resume, SIGTERM, two processes -----------------------------------------

STEPS = 8
TRAIN_ARGS = ["--num_steps", STEPS, "--checkpoint_every", 2]
EVAL_ARGS = ["--eval_batches", 3]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, worker_env):
    """One process, one device, never interrupted."""
    d = tmp_path_factory.mktemp("reference")
    run("_train_worker.py", [*TRAIN_ARGS, *EVAL_ARGS, "--workdir", d / "work",
                             "--log", d / "log.jsonl", "--out", d / "params.npz"], worker_env)
    return d


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, worker_env, tmp_path):
    args = [*TRAIN_ARGS, "--workdir", tmp_path / "work", "--log", tmp_path / "log.jsonl",
            "--out", tmp_path / "params.npz"]
    pause = tmp_path / "paused"
    proc = start("_train_worker.py", [*args, "--pause_at", 5, "--pause_file", pause], worker_env)
    wait_for(pause, proc)
    proc.send_signal(signal.SIGKILL)  # no handler, no final save
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert max(read_log(tmp_path / "log.jsonl")) == 5
    steps = sorted(int(p.name) for p in (tmp_path / "work" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps and max(steps) <= 5 and STEPS not in steps

    run("_train_worker.py", args, worker_env)  # resumes from the latest checkpoint
    assert json.loads((tmp_path / "params.npz.json").read_text()) == {"step": STEPS,
                                                                       "interrupted": False}
    expected = {step: losses[0] for step, losses in read_log(reference_run / "log.jsonl").items()}
    got = read_log(tmp_path / "log.jsonl")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, losses in got.items():  # steps redone after the restart repeat their loss
        np.testing.assert_allclose(losses, expected[step], rtol=1e-6)
    # Usually bit-identical; but each process compiles its own executables, and float32 rounding
    # differences between two compilations of one program are amplified by Adam (updates of
    # ~lr for parameters whose gradients are ~0), hence allclose at 1e-5 (lr is 3e-3).
    assert_params_close(load(tmp_path / "params.npz"), load(reference_run / "params.npz"),
                        atol=1e-5)


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_at_the_current_step(worker_env, tmp_path):
    pause = tmp_path / "paused"
    proc = start("_train_worker.py", [*TRAIN_ARGS, "--checkpoint_every", 100, "--workdir",
                                      tmp_path / "work", "--out", tmp_path / "params.npz",
                                      "--pause_at", 3, "--pause_file", pause], worker_env)
    wait_for(pause, proc)
    proc.send_signal(signal.SIGTERM)
    Path(str(pause) + ".go").touch()  # let step 3 finish; the loop then sees the signal
    finish(proc, expect_rc=0)
    assert json.loads((tmp_path / "params.npz.json").read_text()) == {"step": 3,
                                                                       "interrupted": True}
    steps = [p.name for p in (tmp_path / "work" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == ["3"]


@pytest.mark.slow
def test_long_log_interval_on_two_cpu_devices_finishes(worker_env, tmp_path):
    """Between logs the trainer waits for the step `STEPS_AHEAD` back. Unbounded, two CPU
    devices in one process queued hundreds of steps and XLA aborted the run after 40 s: each
    queued all-reduce held one of its few CPU threads, waiting for peers that had none left."""
    steps = 3000
    run("_train_worker.py", ["--workdir", tmp_path / "work", "--devices", 2, "--mode", "mesh",
                             "--num_steps", steps, "--log_every", steps, "--checkpoint_every", 0,
                             "--out", tmp_path / "params.npz"], worker_env)
    assert json.loads((tmp_path / "params.npz.json").read_text()) == {"step": steps,
                                                                       "interrupted": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args, env, while_running=None) -> None:
    """`_train_worker.py` as processes 0 and 1 with `args`; `while_running(procs)` is called
    once both started; then both must exit 0 (any left running is killed)."""
    procs = [start("_train_worker.py", [*args, "--process_id", i], env) for i in range(2)]
    try:
        if while_running is not None:
            while_running(procs)
        for proc in procs:
            finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_match_one_process(reference_run, worker_env,
                                                              tmp_path):
    """Two processes x 2 CPU devices, a (data=2, fsdp=2) mesh over both, gloo collectives; each
    process feeds half of every global batch. Compared with one process on one device that was
    never interrupted.

    A preemption notice reaches process 1 only (SIGTERM while process 0 is paused in its hook):
    both must leave the loop at the same step and save together (a process stopping alone
    would leave the other waiting in a collective), each with its own data position. Both then
    restart from that checkpoint and finish; losses, evaluations and final parameters must match
    the reference. The second process runs out of eval batches one before the first: the
    evaluation must still end together (not hang in a collective step) and sum the same
    examples as one process."""
    pause = tmp_path / "paused"
    common = [*TRAIN_ARGS, *EVAL_ARGS, "--mode", "mesh", "--mesh", "2,2,1", "--devices", 2,
              "--num_processes", 2, "--workdir", tmp_path / "work", "--log", tmp_path / "log.jsonl",
              "--out", tmp_path / "params.npz"]

    def stop_process_1(procs):
        wait_for(pause, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        Path(str(pause) + ".go").touch()

    two_processes([*common, "--coordinator", f"127.0.0.1:{free_port()}", "--pause_at", 2,
                   "--pause_file", pause], worker_env, stop_process_1)
    stopped = json.loads((tmp_path / "params.npz.json").read_text())
    assert stopped["interrupted"] and 2 <= stopped["step"] < STEPS
    checkpoint = tmp_path / "work" / "checkpoints" / str(stopped["step"])
    data = sorted(p.name for p in (checkpoint / "data").iterdir() if p.suffix == ".json")
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    assert max(read_log(tmp_path / "log.jsonl")) == stopped["step"]

    two_processes([*common, "--coordinator", f"127.0.0.1:{free_port()}"], worker_env)
    assert json.loads((tmp_path / "params.npz.json").read_text()) == {"step": STEPS,
                                                                       "interrupted": False}
    expected = read_log(reference_run / "log.jsonl")
    got = read_log(tmp_path / "log.jsonl")  # written by process 0 only: one entry per step
    assert sorted(got) == sorted(expected)
    for step in got:
        assert len(got[step]) == 1  # the restart began where the stop saved: no step redone
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)
    assert_params_close(load(tmp_path / "params.npz"), load(reference_run / "params.npz"))
    expected_eval = read_eval_log(reference_run / "log.jsonl")
    got_eval = read_eval_log(tmp_path / "log.jsonl")
    assert sorted(expected_eval) == [STEPS // 2, STEPS]
    # The mid-run evaluation is skipped when the stop arrives during it (the checkpoint first).
    assert STEPS in got_eval and set(got_eval) <= set(expected_eval)
    for step, metrics in got_eval.items():
        assert sorted(metrics) == sorted(expected_eval[step])
        for name, value in metrics.items():
            np.testing.assert_allclose(value, expected_eval[step][name], rtol=1e-5, err_msg=name)
    data = sorted(p.name for p in (tmp_path / "work" / "checkpoints" / str(STEPS) /
                                   "data").iterdir() if p.suffix == ".json")
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
