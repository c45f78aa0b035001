"""Training engine on one device: losses vs NumPy, optimizer pieces, steps, checkpoints, loop.

Multi-device and multi-process behaviour is in tests/test_parallel.py (subprocesses).
"""

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flaxformer_lite import evaluation, get_config, make_model, perf
from flaxformer_lite import params as params_lib
from flaxformer_lite.models import init_params
from flaxformer_lite.training import (
    Checkpointer,
    Engine,
    LossConfig,
    NonFiniteLossError,
    OptimizerConfig,
    ParallelConfig,
    TrainState,
    cross_entropy,
    decay_mask,
    eval_step,
    iterator_state,
    learning_rate_at,
    make_optimizer,
    make_schedule,
    metric_sums,
    num_updates,
    partitioning,
    restore_iterator,
    summarize,
    train,
    train_step,
)
from flaxformer_lite.training import parallel as parallel_module

REPO = Path(__file__).resolve().parent.parent
VOCAB, LENGTH = 64, 16
# One layer keeps compile times short; tests/test_parallel.py uses two.
TINY = get_config("gpt2", vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64, num_layers=1,
                  max_len=LENGTH, dropout_rate=0.0, attention_dropout_rate=0.0)
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, weight_decay=0.01, clip_norm=1.0)
LOSS = LossConfig(label_smoothing=0.1)


# ---- helpers -----------------------------------------------------------------------------------

def np_losses(logits, targets, label_smoothing=0.0, z_loss=0.0):
    """float64 reference: smoothed CE + z-loss, plain NLL and z, per token."""
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    vocab = x.shape[-1]
    q = np.full(x.shape, label_smoothing / vocab)
    np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing + label_smoothing / vocab, -1)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    z = z_loss * lse ** 2
    return -(q * logp).sum(-1) + z, nll, z


def synthetic_batch(index, batch=8, pad=True):
    rng = np.random.RandomState(1000 + index)
    tokens = rng.randint(4, VOCAB, size=(batch, LENGTH + 1))
    if pad:
        lengths = rng.randint(LENGTH // 2, LENGTH + 2, size=batch)
        tokens[np.arange(LENGTH + 1)[None, :] >= lengths[:, None]] = 0
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}


class Batches:
    """Deterministic batches with grain-style get_state/set_state."""

    def __init__(self, poison_from=None):
        self.index, self.poison_from = 0, poison_from

    def __iter__(self):
        return self

    def __next__(self):
        batch = synthetic_batch(self.index)
        self.index += 1
        if self.poison_from is not None and self.index >= self.poison_from:
            batch["targets"][0, 0] = 10 ** 6  # an id outside the vocabulary: NaN loss
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def numpy_params(config, seed=0):
    """Random parameters of the right shapes without compiling the initializer."""
    abstract = jax.eval_shape(lambda: nn.meta.unbox(init_params(config, jax.random.key(0))))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(s.dtype), abstract)


def manual_state(params, tx, seed=0):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def engine():
    return Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)


def run(engine, workdir, num_steps, data=None, **kw):
    kw.setdefault("checkpoint_every", 2)
    kw.setdefault("hooks", [])
    return train(TINY, OPT, data if data is not None else Batches(), workdir=workdir,
                 num_steps=num_steps, parallel=ParallelConfig(mode="single"), loss=LOSS,
                 engine=engine, log_every=1, **kw)


# ---- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.2, 1e-3)])
def test_metric_sums_match_numpy(label_smoothing, z_loss):
    rng = np.random.RandomState(0)
    logits = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    targets = rng.randint(1, 11, (3, 5)).astype(np.int32)
    targets[0, 3:] = 0
    targets[2, :] = 0
    sums = metric_sums(jnp.asarray(logits), jnp.asarray(targets),
                       label_smoothing=label_smoothing, z_loss=z_loss)
    loss, nll, z = np_losses(logits, targets, label_smoothing, z_loss)
    w = (targets != 0).astype(np.float64)
    np.testing.assert_allclose(sums["loss"], (loss * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["nll"], (nll * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["z_loss"], (z * w).sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sums["correct"], ((logits.argmax(-1) == targets) * w).sum())
    assert sums["tokens"] == w.sum() and sums["sequences"] == 2
    means = summarize(sums)
    np.testing.assert_allclose(means["perplexity"], np.exp((nll * w).sum() / w.sum()), rtol=1e-5)


def test_label_smoothing_matches_optax_and_gradient():
    rng = np.random.RandomState(1)
    logits = jnp.asarray(rng.normal(0, 2, (4, 7, 13)), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 13, (4, 7)), jnp.int32)
    eps = 0.1
    loss, _, _ = cross_entropy(logits, targets, label_smoothing=eps)
    soft = optax.smooth_labels(jax.nn.one_hot(targets, 13), eps)
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(logits, soft), rtol=1e-5)
    # d loss / d logits = softmax(logits) - q, from float64 NumPy.
    grad = jax.jit(jax.grad(
        lambda x: cross_entropy(x, targets, label_smoothing=eps)[0].sum()))(logits)
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.full(x.shape, eps / 13)
    np.put_along_axis(q, np.asarray(targets)[..., None], 1 - eps + eps / 13, -1)
    np.testing.assert_allclose(grad, p - q, atol=1e-6)


def test_summarize_adds_sums_not_means():
    a = {"loss": 10.0, "correct": 3.0, "tokens": 10.0, "grad_norm": 2.0, "steps": 1.0}
    b = {"loss": 2.0, "correct": 2.0, "tokens": 2.0, "grad_norm": 4.0, "steps": 1.0}
    from flaxformer_lite.training import add_metrics

    out = summarize(add_metrics(a, b))
    assert out["loss"] == pytest.approx(12.0 / 12.0)  # token-weighted, not (1.0 + 1.0) / 2
    assert out["accuracy"] == pytest.approx(5.0 / 12.0)
    assert out["grad_norm"] == pytest.approx(3.0)


# ---- optimizer ---------------------------------------------------------------------------------

def test_vaswani_schedule_matches_formula():
    d_model, warmup = 512, 4000
    config = OptimizerConfig.paper(warmup_steps=warmup)
    schedule = make_schedule(config, d_model=d_model)
    counts = np.array([0, 1, 2, 100, warmup - 2, warmup - 1, warmup, 10_000, 100_000])
    n = counts.astype(np.float64) + 1.0  # the paper counts steps from 1
    expected = d_model ** -0.5 * np.minimum(n ** -0.5, n * warmup ** -1.5)
    got = np.array([float(schedule(c)) for c in counts])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] > 0  # the first update is not wasted
    assert got.argmax() == list(counts).index(warmup - 1)  # peak at step n = warmup
    np.testing.assert_allclose(got.max(), (d_model * warmup) ** -0.5, rtol=1e-6)
    # With accumulation the schedule advances once per update (every k train steps).
    acc = config.replace(accumulation_steps=4)
    np.testing.assert_allclose(float(learning_rate_at(acc, 4 * 7 + 3, d_model=d_model)),
                               float(schedule(7)), rtol=1e-7)
    with pytest.raises(ValueError, match="d_model"):
        make_schedule(config)


def test_cosine_and_constant_schedules():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                          decay_steps=110, final_learning_rate=0.1)
    s = make_schedule(cfg)
    lr = np.array([float(s(c)) for c in range(130)])
    np.testing.assert_allclose(lr[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    n = np.arange(10, 130) + 1.0
    p = np.clip((n - 10) / 100, 0, 1)
    np.testing.assert_allclose(lr[10:], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)), rtol=1e-5)
    const = make_schedule(OptimizerConfig(learning_rate=0.5, warmup_steps=4))
    np.testing.assert_allclose([float(const(c)) for c in range(6)],
                               [0.125, 0.25, 0.375, 0.5, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_mask_spares_norms_biases_and_vectors(scan):
    config = TINY.replace(scan_layers=scan, activation="swiglu")
    params = numpy_params(config)
    mask = decay_mask(params)
    seen = set()
    for (path, leaf), (_, decays) in zip(jax.tree.leaves_with_path(params),
                                         jax.tree.leaves_with_path(mask), strict=True):
        name = path[-1].key
        seen.add(name)
        assert decays == (name in ("kernel", "embedding")), (path, leaf.shape)
    assert {"kernel", "bias", "scale", "embedding"} <= seen
    # The real optimizers: zero gradients leave Adam's and Adafactor's steps at 0, so only
    # decay moves params, by the same learning-rate-scaled amount in both (warmup included:
    # the first update's rate is 1/4 of the peak).
    peak, wd = 0.4, 0.5
    zeros = jax.tree.map(np.zeros_like, params)
    for optimizer in ("adamw", "adafactor"):
        tx = make_optimizer(OptimizerConfig(optimizer=optimizer, learning_rate=peak,
                                            warmup_steps=4, weight_decay=wd))
        new = jax.jit(lambda p, tx=tx: optax.apply_updates(
            p, tx.update(zeros, tx.init(p), p)[0]))(params)
        for p, n, m in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                           jax.tree.leaves(mask), strict=True):
            np.testing.assert_allclose(n, p * (1 - peak / 4 * wd) if m else p, rtol=1e-6,
                                       err_msg=optimizer)


# d_model 128 and 2 heads of 64: every attention kernel is a 128 x 128 (or 128 x 384) matrix,
# factored by Adafactor once [heads, head_dim] is one axis. T5: q, k/v, qkv and out kernels.
ADAFACTOR_T5 = get_config("t5-small", vocab_size=64, d_model=128, num_heads=2, d_ff=256,
                          num_layers=1, max_len=16)


def _logical_matrices(boxed):
    """Each parameter as Adafactor should factor it, from its logical axis names alone:
    `heads` and `kv` (head_dim) side by side merged into one axis."""
    def view(x):
        names, shape = tuple(x.names), x.value.shape
        for i in range(len(names) - 1):
            if names[i:i + 2] == ("heads", "kv"):
                return shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
        return shape
    return jax.tree.map(view, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=True, num_layers=2),
                                       dict(fused_qkv=False, num_kv_heads=1)])
def test_heads_merged_shape_follows_the_logical_axis_names(overrides):
    from flaxformer_lite.training.optim import heads_merged_shape
    cfg = ADAFACTOR_T5.replace(**overrides)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    want = jax.tree.leaves_with_path(_logical_matrices(boxed),
                                     is_leaf=lambda x: isinstance(x, tuple))
    merged = 0
    for (path, shape), x in zip(want, jax.tree.leaves(nn.meta.unbox(boxed)), strict=True):
        got = heads_merged_shape(path, x.shape)
        assert (got or x.shape) == shape, (path, x.shape, got)
        merged += got is not None
    assert merged >= 3  # self-attention qkv/query, key_value and out at least


@pytest.mark.parametrize("k", [1, 2])
def test_adafactor_factors_attention_kernels_and_upgrades_old_states(k, tmp_path):
    """Adafactor factors an attention kernel as the 2-D matrix it is (optax's factoring needs
    two axes of >= 128 entries: [embed, 3, heads, head_dim] with head_dim 64 kept the whole
    second moment, as much memory as AdamW); a checkpoint saved with those whole moments
    resumes, its moments averaged into the statistics factoring from the start gives."""
    rng = np.random.default_rng(0)
    engine = Engine(ADAFACTOR_T5, OptimizerConfig(optimizer="adafactor", learning_rate=0.1,
                                                  accumulation_steps=k),
                    ParallelConfig(mode="single"))
    state = engine.init_state(0)
    params = nn.meta.unbox(state.params)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
             for _ in range(3)]
    shapes = _logical_matrices(jax.eval_shape(lambda: init_params(ADAFACTOR_T5,
                                                                  jax.random.key(0))))
    as_matrices = functools.partial(jax.tree.map, jnp.reshape)

    def run(tx, view=lambda t: t):
        step = jax.jit(lambda g, opt: tx.update(view(g), opt, view(params)))
        opt, out = jax.jit(lambda: tx.init(view(params)))(), []
        for g in grads:
            update, opt = step(g, opt)
            out.append(update)
        return opt, out

    def with_k(tx):
        return optax.MultiSteps(tx, k).gradient_transformation() if k > 1 else tx

    opt, updates = run(make_optimizer(engine.optimizer_config))
    # What older versions built (a schedule, so the same state tree), on 2-D kernels.
    plain = optax.adafactor(make_schedule(engine.optimizer_config), weight_decay_mask=decay_mask)
    _, reference = run(with_k(plain), lambda t: as_matrices(t, shapes))
    for u, r in zip(updates, reference, strict=True):
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r), strict=True):
            np.testing.assert_allclose(a, np.reshape(b, a.shape), rtol=1e-6, atol=1e-9)
    held = sum(x.size for x in jax.tree.leaves(opt)) - (k > 1) * 2 * sum(
        x.size for x in jax.tree.leaves(params))  # MultiSteps' sum of gradients
    assert held < sum(x.size for x in jax.tree.leaves(params)) / 10

    # An older version's state: plain optax Adafactor, the same gradients.
    old, _ = run(with_k(plain))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state.replace(step=jnp.asarray(3, jnp.int32), opt_state=old))
    ckpt.wait()
    restored = ckpt.restore(engine.abstract_state()).state.opt_state
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(opt)
    for (path, a), b in zip(jax.tree.leaves_with_path(restored), jax.tree.leaves(opt),
                            strict=True):
        assert a.shape == b.shape, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30, err_msg=str(path))


def test_adafactor_treats_a_scanned_stack_layer_by_layer():
    """The same updates for a model scanned (`scan_layers=True`) as unscanned. Adafactor clips
    each update to a root mean square of 1 and scales it by the parameter's; taken over a whole
    stacked array (optax's block functions) they mixed the layers, and the second layer here
    (parameters x3, gradients x10) moved unlike its unscanned self."""
    from flaxformer_lite.models import path_names, stack_layers, unstack_layers

    cfg = ADAFACTOR_T5.replace(num_layers=2)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)

    def name(path) -> str:
        return "/".join(path_names(path))

    def second_layer_louder(tree, factor):
        return jax.tree.map_with_path(
            lambda path, x: x * factor if "layer_1" in name(path) else x, tree)

    params = second_layer_louder(params, 3.0)
    grads = [second_layer_louder(jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params), 10.0)
        for _ in range(2)]
    tx = make_optimizer(OptimizerConfig(optimizer="adafactor", learning_rate=0.1,
                                        weight_decay=0.01))

    def run(p, gs):
        step = jax.jit(tx.update)  # ~100 leaves: eager dispatch took seconds
        opt, out = tx.init(p), []
        for g in gs:
            update, opt = step(g, opt, p)
            out.append(update)
        return out

    unscanned = run(params, grads)
    scanned = run(stack_layers(params), [stack_layers(g) for g in grads])
    for u, v in zip(unscanned, scanned, strict=True):
        v = unstack_layers(v)
        assert jax.tree.structure(u) == jax.tree.structure(v)
        for (path, a), b in zip(jax.tree.leaves_with_path(u), jax.tree.leaves(v), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9,
                                       err_msg=name(path))


def test_the_optimizer_runs_in_float32_for_bfloat16_parameters():
    """bfloat16 parameters keep float32 optimizer state and get each float32 update rounded
    once (their Adam moments were bfloat16: b2=0.999 rounded to 1.0, so the second moment
    never decayed); float16 training and Adam without eps are refused."""
    cfg = TINY.replace(param_dtype="bfloat16")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, x.dtype),
                          params) for _ in range(3)]
    config = OptimizerConfig(learning_rate=1e-2, b2=0.999)
    tx = make_optimizer(config)
    reference = optax.adamw(make_schedule(config), b2=0.999, mask=decay_mask)
    opt, ref = tx.init(params), reference.init(jax.tree.map(lambda x: x.astype(jnp.float32),
                                                            params))
    assert {x.dtype for x in jax.tree.leaves(opt) if x.ndim} == {jnp.dtype(jnp.float32)}
    up32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))

    @jax.jit
    def ours_step(p, g, opt):
        update, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, update), opt

    @jax.jit
    def reference_step(p, g, ref):  # a float32 optimizer on float32 copies, rounded once
        update, ref = reference.update(up32(g), ref, up32(p))
        return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), p,
                            update), ref

    ours = theirs = params
    for g in grads:
        ours, opt = ours_step(ours, g, opt)
        theirs, ref = reference_step(theirs, g, ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # equal but where float32 rounding (fused differently) tipped a bfloat16 rounding,
        # which the next steps carry: rare, and a step or two of bfloat16 apart
        assert np.mean(a != b) < 0.01
        np.testing.assert_allclose(a, b, rtol=2 ** -6, atol=0)
    for bad in (dict(dtype="float16"), dict(param_dtype="float16")):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}='float16' cannot train"):
            Engine(TINY.replace(**bad), OPT, ParallelConfig(mode="single"))
    with pytest.raises(ValueError, match="eps=0"):
        OptimizerConfig(eps=0.0)


def test_numpy_seeds_and_single_process_launchers(monkeypatch):
    """A NumPy integer seed is a seed (it used to reach the init as raw key data), and a
    launcher exporting JAX_NUM_PROCESSES=1 alone starts no multi-process run."""
    from flaxformer_lite.training import distributed
    from flaxformer_lite.training.state import create_train_state

    a, b = (create_train_state(TINY, OPT, seed) for seed in (7, np.int64(7)))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    monkeypatch.setattr(distributed, "_initialized", False)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize() is False


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="OptimizerConfig.schedule"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_steps"):
        OptimizerConfig(schedule="cosine", warmup_steps=10)
    with pytest.raises(ValueError, match="accumulation_steps"):
        OptimizerConfig(accumulation_steps=0)
    for field, value in (("b1", 1.5), ("b2", -0.1), ("eps", -1.0), ("learning_rate", math.inf),
                         ("weight_decay", math.nan), ("warmup_steps", 2.5),
                         ("warmup_steps", None), ("clip_norm", 0.0)):
        with pytest.raises(ValueError, match=f"OptimizerConfig.{field}="):
            OptimizerConfig(**{field: value})
    with pytest.raises(ValueError, match="OptimizerConfig.decay_steps=10.5"):
        OptimizerConfig(schedule="cosine", decay_steps=10.5)
    with pytest.raises(ValueError, match="LossConfig.label_smoothing"):
        LossConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="LossConfig.z_loss=nan"):
        LossConfig(z_loss=math.nan)
    with pytest.raises(ValueError, match="ParallelConfig.mode"):
        ParallelConfig(mode="dp")
    with pytest.raises(ValueError, match="ParallelConfig.compiler_options"):
        ParallelConfig(mode="pmap", compiler_options={"xla_cpu_use_onednn": True})
    renamed = tuple((k, "model" if v == "tensor" else v) for k, v in partitioning.DEFAULT_RULES)
    with pytest.raises(ValueError, match="'act_mlp' to mesh axis 'model'"):  # was a KeyError
        ParallelConfig(mode="mesh", axis_rules=renamed)
    with pytest.raises(ValueError, match="devices"):
        partitioning.make_mesh(data=3)


# ---- steps -------------------------------------------------------------------------------------

def test_engine_and_perplexity_check_host_batches(engine):
    """Out-of-range ids are refused before any step; so are entries of different lengths,
    which `pad_batch` would otherwise pad into agreement on several devices."""
    from flaxformer_lite.evaluation import perplexity
    ids = np.ones((2, 8), np.int32)
    with pytest.raises(ValueError, match="targets.*vocab_size"):
        engine.shard_batch({"inputs": ids, "targets": ids * VOCAB})
    with pytest.raises(ValueError, match="share one"):
        engine.pad_batch({"inputs": ids[:1], "targets": ids})
    model = make_model(TINY)
    with pytest.raises(ValueError, match="-100 ignore"):
        perplexity(model, numpy_params(TINY), [{"inputs": ids, "targets": ids - 101}])


def test_a_schedule_that_does_not_fit_the_run_is_reported(caplog):
    from flaxformer_lite.training import trainer
    cosine = OptimizerConfig(schedule="cosine", warmup_steps=100, decay_steps=2000,
                             accumulation_steps=2)
    with caplog.at_level(logging.WARNING, logger="flaxformer_lite.training"):
        trainer._warn_schedule(cosine, 4000)  # 2000 updates: fits
        assert not caplog.records
        trainer._warn_schedule(cosine, 10_000)
        trainer._warn_schedule(cosine.replace(decay_steps=200), 150)
    text = caplog.text
    assert "ends at update 2000, but this run makes 5000 updates" in text
    assert "warmup_steps=100: the run's 75 updates end before" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxformer_lite.training"):
        trainer._warn_schedule(cosine.replace(decay_steps=1000), 2001)
    assert "ends at update" not in caplog.text  # 2001 micro-batches make 1000 updates
    assert "the last 1 micro-batch(es) are accumulated but never applied" in caplog.text


@pytest.mark.parametrize("num_steps,k", [(7, 3), (6, 3), (2, 3), (5, 1)])
def test_num_updates_counts_what_multisteps_applies(num_steps, k):
    tx = make_optimizer(OptimizerConfig(learning_rate=1.0, accumulation_steps=k,
                                        weight_decay=0.0))
    params = {"w": jnp.zeros(())}
    opt_state, applied = tx.init(params), 0
    for _ in range(num_steps):
        updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
        new = optax.apply_updates(params, updates)
        applied += int(new["w"] != params["w"])
        params = new
    assert applied == num_updates(num_steps, k)


@pytest.fixture(scope="module")
def step_setup():
    model = make_model(TINY)
    params = numpy_params(TINY)
    return model, params


def test_accumulation_over_4_micro_batches_equals_one_big_batch(step_setup):
    model, params = step_setup
    big_cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=3, weight_decay=0.1,
                              clip_norm=0.05)
    small_cfg = big_cfg.replace(accumulation_steps=4)
    runs = {}
    for name, cfg in (("big", big_cfg), ("small", small_cfg)):
        tx = make_optimizer(cfg)
        step = jax.jit(functools.partial(
            train_step, model=model, tx=tx, loss_config=LOSS,
            learning_rate_fn=functools.partial(learning_rate_at, cfg)))
        runs[name] = (step, manual_state(params, tx))
    step, state = runs["big"]
    big_metrics = []
    for i in range(2):  # unpadded rows: every micro-batch holds the same number of tokens
        state, m = step(state, synthetic_batch(i, batch=16, pad=False))
        big_metrics.append(m)
    big_params = state.params
    step, state = runs["small"]
    small_metrics = []
    for i in range(2):
        batch = synthetic_batch(i, batch=16, pad=False)
        for j in range(4):
            before = state.params
            state, m = step(state, {k: v[4 * j: 4 * j + 4] for k, v in batch.items()})
            small_metrics.append(m)
            if j < 3:  # parameters move only on the 4th micro-batch
                assert max_diff(before, state.params) == 0.0
    assert max_diff(big_params, state.params) < 1e-5  # float32 rounding; one update ~1e-2
    assert max_diff(big_params, params) > 1e-3
    assert int(state.step) == 8
    # Token-weighted sums of the micro-batches reproduce the big batches' metrics.
    for k in ("loss", "nll", "correct", "tokens"):
        np.testing.assert_allclose(sum(float(m[k]) for m in small_metrics),
                                   sum(float(m[k]) for m in big_metrics), rtol=1e-5)
    lrs = [float(m["learning_rate"]) for m in small_metrics]
    np.testing.assert_allclose(lrs, [1e-2 / 3] * 4 + [2e-2 / 3] * 4, rtol=1e-6)


def test_microbatches_inside_the_step_equal_the_whole_batch(step_setup):
    # Padded rows: the slices hold different token counts, and the step still takes the
    # gradient of the whole batch's token mean (unlike accumulation over train steps).
    model, params = step_setup
    tx = make_optimizer(OPT)
    states, metrics = {}, {}
    for k in (1, 4):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_config=LOSS,
                                         microbatches=k))
        state = manual_state(params, tx)
        for i in range(2):
            state, m = step(state, synthetic_batch(i, batch=16, pad=True))
        states[k], metrics[k] = state, m
    assert max_diff(states[1].params, states[4].params) < 1e-5
    assert max_diff(states[1].params, params) > 1e-3
    for key in ("loss", "nll", "correct", "tokens", "sequences", "grad_norm"):
        np.testing.assert_allclose(float(metrics[4][key]), float(metrics[1][key]), rtol=1e-5)


def test_microbatches_with_dropout_draw_one_key_per_slice(step_setup):
    # With SGD at rate 1 the update is minus the gradient; the step's gradient must be the sum
    # of each slice's gradient under dropout key fold_in(step key, slice).
    from flaxformer_lite.training.steps import logits_fn, step_rng

    _, params = step_setup
    model = make_model(TINY.replace(dropout_rate=0.3))
    tx = optax.sgd(1.0)
    state = manual_state(params, tx)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0, batch=8, pad=True).items()}
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, microbatches=2))
    new, _ = step(state, batch)
    got = jax.tree.map(jnp.subtract, params, new.params)
    total = float((batch["targets"] != 0).sum())

    def slice_loss(p, i):
        micro = {k: v[i::2] for k, v in batch.items()}
        logits = logits_fn(model, p, micro, deterministic=False,
                           dropout_rng=jax.random.fold_in(step_rng(state), i))
        return metric_sums(logits, micro["targets"], micro["targets"] != 0)["loss"] / total

    want = jax.tree.map(jnp.add, *(jax.jit(jax.grad(slice_loss), static_argnums=1)(params, i)
                                   for i in range(2)))
    assert max_diff(got, want) < 1e-5
    # ...and not the gradient with one key for the whole batch.
    whole = jax.tree.map(jnp.subtract, params, jax.jit(functools.partial(
        train_step, model=model, tx=tx))(state, batch)[0].params)
    assert max_diff(got, whole) > 1e-4


def test_microbatch_gradients_of_bfloat16_parameters_are_summed_in_float32(step_setup):
    """The micro-batches' gradients add up in float32 and are rounded once: summed in
    bfloat16 (the parameters' dtype) the error against a float32 computation doubled at 16
    micro-batches."""
    _, params = step_setup
    keep = optax.GradientTransformation(  # keeps the gradient it gets, as float32, as state
        lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g),
                              jax.tree.map(lambda x: x.astype(jnp.float32), g)))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0, batch=16, pad=False).items()}
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)

    def gradient(config, p, k):
        step = jax.jit(functools.partial(train_step, model=make_model(config), tx=keep,
                                         microbatches=k))
        g = step(manual_state(p, keep), batch)[0].opt_state
        return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])

    exact = gradient(TINY, jax.tree.map(lambda x: x.astype(jnp.float32), half), 1)
    bf16 = TINY.replace(param_dtype="bfloat16")
    error = {k: np.linalg.norm(gradient(bf16, half, k) - exact) / np.linalg.norm(exact)
             for k in (1, 16)}
    assert error[16] < 1.3 * error[1], error


def test_microbatches_errors(step_setup):
    model, params = step_setup
    tx = make_optimizer(OPT)
    state = manual_state(params, tx)
    batch = synthetic_batch(0, batch=6)
    with pytest.raises(ValueError, match="microbatches=4"):
        train_step(state, batch, model=model, tx=tx, microbatches=4)
    with pytest.raises(ValueError, match="positive integer"):
        train_step(state, batch, model=model, tx=tx, microbatches=0)
    with pytest.raises(ValueError, match="ParallelConfig.microbatches"):
        ParallelConfig(microbatches=0)
    engine = Engine(TINY, OPT, ParallelConfig(mode="single", microbatches=4))
    # Checked on the host batch, before the state is read or anything compiles.
    with pytest.raises(ValueError, match="not divisible by ParallelConfig.microbatches=4"):
        engine.train_step(engine.abstract_state(), batch)


def test_step_metrics_match_an_independent_gradient(engine, step_setup):
    model, params = step_setup
    batch = synthetic_batch(3)
    extra = {"text": np.array(["unused"] * 8)}  # entries the model does not read are dropped
    new_state, metrics = engine.train_step(manual_state(params, engine.tx), {**batch, **extra})

    def mean_loss(p):
        logits = model.apply({"params": p}, batch["inputs"])
        logp = jax.nn.log_softmax(logits)
        q = optax.smooth_labels(jax.nn.one_hot(batch["targets"], VOCAB), 0.1)
        w = batch["targets"] != 0
        return jnp.sum(-(q * logp).sum(-1) * w) / jnp.sum(w)

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    np.testing.assert_allclose(metrics["loss"] / metrics["tokens"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    np.testing.assert_allclose(metrics["learning_rate"], 3e-3 / 2, rtol=1e-6)
    assert int(new_state.step) == 1 and float(metrics["nonfinite"]) == 0.0


def test_cpu_steps_use_onednn_and_match_xla_defaults(engine):
    """On CPU the engine can compile its steps with oneDNN matmuls (the default on Intel CPUs);
    XLA's own kernels, the reference, give the same parameters and metrics."""
    if jax.devices()[0].platform != "cpu":
        pytest.skip("oneDNN compile options apply to CPUs only")
    assert engine.step_compiler_options() == perf.step_compiler_options(jax.devices())
    onednn_engine = Engine(TINY, OPT, ParallelConfig(
        mode="single", compiler_options=perf.CPU_STEP_COMPILER_OPTIONS), LOSS)
    plain = Engine(TINY, OPT, ParallelConfig(mode="single", compiler_options={}), LOSS)
    assert plain.step_compiler_options() == {}
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0).items()}
    state = onednn_engine.init_state(0)
    onednn = '"kind":"__onednn_fusion"'  # the fusion's backend config in the compiled HLO
    assert onednn in onednn_engine._train.lower(state, batch).compile().as_text()
    assert onednn not in plain._train.lower(state, batch).compile().as_text()
    states = {"onednn": onednn_engine.init_state(0), "xla": plain.init_state(0)}
    metrics = {}
    for name, eng in (("onednn", onednn_engine), ("xla", plain)):
        for i in range(3):
            states[name], m = eng.train_step(states[name], synthetic_batch(i))
        metrics[name] = {**m, **{f"eval_{k}": v for k, v in
                                 eng.eval_step(states[name], synthetic_batch(5)).items()}}
    assert max_diff(states["onednn"].params, states["xla"].params) < 1e-5
    assert max_diff(states["onednn"].params, onednn_engine.init_state(0).params) > 1e-3
    for k in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose(metrics["onednn"][k], metrics["xla"][k], rtol=1e-5)


def _compiles(records, name: str) -> int:
    """How many programs named `name` JAX lowered for XLA (it logs each under log_compiles)."""
    return sum(f"Compiling jit({name})" in r.getMessage() for r in records)


def test_precompile_takes_the_eval_batch_lazily():
    """A function for the eval batch is called only when the eval step is compiled ahead: in
    "pmap" mode (steps compile on first use) never, so no eval batch is fetched for nothing."""
    calls = []

    def fetch():
        calls.append(1)
        return synthetic_batch(50, batch=6)

    pmapped = Engine(TINY, OPT, ParallelConfig(mode="pmap"), LOSS)
    pmapped.precompile(pmapped.init_state(0), synthetic_batch(0), fetch)
    assert calls == [] and not pmapped._eval.compiling
    single = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)
    single.precompile(single.init_state(0), synthetic_batch(0), fetch)
    assert calls == [1] and single._eval.compiling
    single._eval.wait()
    single._train.wait()


def test_precompile_compiles_each_step_once_and_changes_nothing(caplog):
    """Steps compiled ahead on background threads are not compiled again when they run, and
    compute exactly what an engine that compiles on first use computes."""
    ahead = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)
    usual = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)
    eval_batch = synthetic_batch(50, batch=6)
    results = {}
    for name, eng in (("ahead", ahead), ("usual", usual)):
        state = eng.init_state(0)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            if name == "ahead":
                eng.precompile(state, synthetic_batch(0), eval_batch)
                assert eng._train.compiling and eng._eval.compiling  # the steps must wait
            for i in range(2):
                state, m = eng.train_step(state, synthetic_batch(i))
            ev = eng.eval_step(state, eval_batch)
        assert _compiles(caplog.records, "train_step") == 1
        assert _compiles(caplog.records, "eval_step") == 1
        results[name] = (state.params, m, ev)
    assert max_diff(results["ahead"], results["usual"]) == 0.0


@pytest.mark.parametrize("one_shot", [False, True])
def test_train_compiles_ahead_and_warms_up_once(tmp_path, caplog, one_shot):
    """train() compiles the eval step with the train step (peeking at a re-iterable eval set,
    never at a one-shot iterator) and calls warm_up once, before the first step."""
    eng = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    every = 4 if one_shot else 2  # a one-shot iterator serves one evaluation only
    calls = []
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        result = train(TINY, OPT, Batches(), workdir=tmp_path, engine=eng, num_steps=4,
                       loss=LOSS, parallel=ParallelConfig(mode="single"),
                       eval_data=iter(eval_batches) if one_shot else (lambda: iter(eval_batches)),
                       eval_every=every, checkpoint_every=None, log_every=2, hooks=[],
                       warm_up=lambda state, engine: calls.append(
                           (int(state.step), engine,
                            [n for n in ("eval", "train")
                             if getattr(engine, f"_{n}").compiling])))
    assert calls == [(0, eng, ["train"] if one_shot else ["eval", "train"])]
    assert _compiles(caplog.records, "train_step") == 1
    assert _compiles(caplog.records, "eval_step") == 1
    tokens = {h["step"]: h.get("eval/tokens") for h in result.history}
    assert tokens[every] == sum(float((b["targets"] != 0).sum()) for b in eval_batches)


@pytest.mark.parametrize("preset", ["gpt2", "transformer-base", "bert-base", "t5-small"])
def test_engine_counts_parameters_like_params_count(preset):
    config = get_config(preset, vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64,
                        num_layers=1, max_len=LENGTH)
    assert Engine(config, OPT, ParallelConfig(mode="single")).num_params() == \
        params_lib.count(config)


@pytest.mark.parametrize("preset", ["transformer-base", "bert-base"])
def test_step_dispatches_on_architecture(preset):
    extra = {"mlm_head": True} if preset == "bert-base" else {}
    config = get_config(preset, vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64,
                        num_layers=1, max_len=LENGTH, dropout_rate=0.0,
                        attention_dropout_rate=0.0, **extra)
    model = make_model(config)
    params = numpy_params(config)
    rng = np.random.RandomState(0)
    inputs = rng.randint(5, VOCAB, (4, 12)).astype(np.int32)
    inputs[1, 8:] = 0
    if config.architecture == "encoder_decoder":
        targets = rng.randint(5, VOCAB, (4, 10)).astype(np.int32)
        targets[2, 6:] = 0
        logits = jax.jit(model.apply)({"params": params}, inputs, targets)
    else:  # masked LM: targets only at the selected positions
        targets = np.where(rng.rand(4, 12) < 0.3, inputs, 0).astype(np.int32)
        logits = jax.jit(model.apply)({"params": params}, inputs)["logits"]
    tx = make_optimizer(OPT)
    state, metrics = jax.jit(functools.partial(train_step, model=model, tx=tx))(
        manual_state(params, tx), {"inputs": inputs, "targets": targets})
    _, nll, _ = np_losses(logits, targets)
    w = targets != 0
    np.testing.assert_allclose(metrics["loss"], (nll * w).sum(), rtol=1e-5)
    assert float(metrics["tokens"]) == w.sum()
    assert max_diff(state.params, params) > 0


def test_mlm_head_at_the_selected_positions_only_gives_the_same_step():
    """`mlm_predictions = k`: the head runs on each row's (at most k) selected positions
    instead of every position; loss, metrics, gradient and update equal the full head's."""
    from flaxformer_lite.models import check_batch, masked_positions

    full = get_config("bert-base", vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64,
                      num_layers=1, max_len=LENGTH, dropout_rate=0.0,
                      attention_dropout_rate=0.0, mlm_head=True)
    gathered = full.replace(mlm_predictions=5)
    params = numpy_params(full)
    rng = np.random.RandomState(3)
    inputs = rng.randint(5, VOCAB, (4, LENGTH)).astype(np.int32)
    inputs[1, 10:] = 0
    targets = np.zeros_like(inputs)
    for row, n in enumerate([5, 3, 0, 1]):  # up to k per row; one row with none
        chosen = rng.choice(np.flatnonzero(inputs[row]), n, replace=False)
        targets[row, chosen] = inputs[row, chosen]
    batch = {"inputs": inputs, "targets": targets}
    positions, picked = masked_positions(jnp.asarray(targets), 5)
    for row in range(4):  # the selected positions in order, then empty slots
        where = np.flatnonzero(targets[row])
        np.testing.assert_array_equal(np.asarray(positions[row, :where.size]), where)
        np.testing.assert_array_equal(np.asarray(picked[row]),
                                      np.pad(targets[row, where], (0, 5 - where.size)))
    tx = make_optimizer(OPT)
    out = {}
    for name, cfg in (("full", full), ("gathered", gathered)):
        step = jax.jit(functools.partial(train_step, model=make_model(cfg), tx=tx))
        out[name] = step(manual_state(params, tx), batch)
        evaluated = jax.jit(functools.partial(eval_step, model=make_model(cfg)))(params, batch)
        assert float(evaluated["tokens"]) == 9
    (a, ma), (b, mb) = out["full"], out["gathered"]
    for key in ("loss", "tokens", "correct", "grad_norm"):
        np.testing.assert_allclose(mb[key], ma[key], rtol=1e-5)
    assert max_diff(a.params, b.params) < 1e-6
    assert max_diff(a.params, params) > 1e-4
    over = targets.copy()
    over[2, :6] = inputs[2, :6]  # six selections in a row, one more than k
    with pytest.raises(ValueError, match="selects 6 positions.*mlm_predictions=5"):
        check_batch(gathered, {"inputs": inputs, "targets": over})
    # Past the host check (a batch already on the device), the step scores the first k of
    # such a row and divides by the tokens it scores: the full head's step on those k.
    kept = over.copy()
    kept[2, 5] = 0
    full_step = jax.jit(functools.partial(train_step, model=make_model(full), tx=tx))
    head_step = jax.jit(functools.partial(train_step, model=make_model(gathered), tx=tx))
    a, ma = full_step(manual_state(params, tx), {"inputs": inputs, "targets": kept})
    b, mb = head_step(manual_state(params, tx), {"inputs": inputs, "targets": over})
    np.testing.assert_allclose(mb["grad_norm"], ma["grad_norm"], rtol=1e-5)
    assert float(mb["tokens"]) == float(ma["tokens"]) == 14 and max_diff(a.params, b.params) < 1e-6
    # Rows shorter than k (a bucketed batch): every position, no top_k error.
    short = {"inputs": inputs[:, :4], "targets": targets[:, :4]}
    a, ma = full_step(manual_state(params, tx), short)
    b, mb = jax.jit(functools.partial(train_step, model=make_model(full.replace(
        mlm_predictions=12)), tx=tx))(manual_state(params, tx), short)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="needs mlm_head=True"):
        full.replace(mlm_head=False, mlm_predictions=5)
    with pytest.raises(ValueError, match="exceeds max_len"):
        full.replace(mlm_predictions=LENGTH + 1)


def test_lower_train_step_allocates_nothing_and_refuses_pmap():
    engine = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS)
    compiled = engine.lower_train_step(synthetic_batch(0)).compile()
    assert compiled.cost_analysis() and compiled.memory_analysis().argument_size_in_bytes > 0
    assert not engine._init_compiled  # the state was never built: the abstract one sufficed
    with pytest.raises(ValueError, match="mode='pmap'"):
        Engine(TINY, OPT, ParallelConfig(mode="pmap"), LOSS).lower_train_step(synthetic_batch(0))


def test_mesh_shardings_follow_logical_axes():
    mesh = partitioning.make_mesh(1, 1, 1)
    engine = Engine(TINY, OPT, ParallelConfig(mode="mesh", data=1, fsdp=1, tensor=1))
    specs = partitioning.describe(engine._state_sharding)
    qkv = [k for k in specs if k.startswith("params/") and k.endswith("qkv/kernel")]
    assert qkv and all(specs[k] == str(P("fsdp", None, "tensor", None)) for k in qkv)
    # Adam's moments are sharded like their parameters; counters and the RNG are replicated.
    for name in qkv:
        moments = [k for k in specs if k.startswith("opt_state") and k.endswith(name[7:])]
        assert len(moments) == 2 and {specs[k] for k in moments} == {specs[name]}
    assert specs["step"] == specs["rng"] == str(P())
    assert str(mesh.axis_names) == "('data', 'fsdp', 'tensor')"

    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 2}

    spec = partitioning.fit_spec(P("tensor", "fsdp"), (5, 4), FakeMesh)
    assert spec == P(None, "fsdp")  # 5 rows cannot be split in two
    # An axis tuple keeps its longest leading part that divides the dimension.
    spec = partitioning.fit_spec(P(("fsdp", "tensor"), ("tensor", "fsdp")), (6, 3), FakeMesh)
    assert spec == P("fsdp", None)
    assert partitioning.fit_spec(P(("fsdp", "tensor")), (8,), FakeMesh) == P(("fsdp", "tensor"))

    class Fsdp1(FakeMesh):
        shape = {"data": 1, "fsdp": 1, "tensor": 4}

    # Only an fsdp of size 1 divides 6: replicated (it was kept, and reported as a split).
    assert partitioning.fit_spec(P(("fsdp", "tensor")), (6,), Fsdp1) == P(None)


# ---- checkpoints -------------------------------------------------------------------------------

def _corrupt(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.write(b"\0" * max(size, 1))


def test_checkpoint_save_restore_keep_and_fallback(engine, tmp_path, caplog):
    state = engine.init_state(0)
    ckpt = Checkpointer(tmp_path, keep=2)
    states = {}
    for step in (1, 2, 3):
        states[step] = state.replace(step=jnp.asarray(step, jnp.int32),
                                     params=jax.tree.map(lambda x, s=step: x + s, state.params))
        assert ckpt.save(step, states[step], data_state={"batches": step})
    assert not ckpt.save(3, states[3])  # an existing step is never overwritten
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored = ckpt.restore(engine.abstract_state())
    assert restored.step == 3 and restored.data_state == {"batches": 3}
    assert max_diff(restored.state.params, states[3].params) == 0.0
    np.testing.assert_array_equal(restored.state.rng, state.rng)

    _corrupt(tmp_path / "3")
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(engine.abstract_state())
    assert restored.step == 2 and max_diff(restored.state.params, states[2].params) == 0.0
    assert "step 3" in caplog.text
    assert (tmp_path / "3.corrupt").exists() and ckpt.all_steps() == [2]
    assert ckpt.save(3, states[3])  # the step can be written again
    ckpt.wait()
    assert ckpt.restore(engine.abstract_state()).step == 3

    for step in ckpt.all_steps():
        _corrupt(tmp_path / str(step))
    with pytest.raises(RuntimeError, match="could be restored .*nothing was moved or deleted"):
        ckpt.restore(engine.abstract_state())
    assert ckpt.all_steps() == [2, 3]  # nothing discarded when nothing loads
    ckpt.close()


def test_iterator_state_round_trip_for_dict_and_bytes():
    class BytesIterator:  # like grain.DataLoader's iterator: JSON bytes
        def __init__(self):
            self.state = b'{"next_index": 7}'

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

    for it, value in ((Batches(), {"index": 5}), (BytesIterator(), b'{"next_index": 9}')):
        it.set_state(value)
        saved = iterator_state(it)
        it.set_state({"index": 0} if isinstance(value, dict) else b"{}")
        restore_iterator(it, saved)
        assert it.get_state() == value
    assert iterator_state(iter([1, 2])) is None


def test_grain_iterator_position_survives_json():
    import json

    import grain

    ds = (grain.MapDataset.range(40).shuffle(seed=1)
          .map(lambda i: {"inputs": np.full((3,), i, np.int32)}).batch(4).to_iter_dataset())
    it = iter(ds)
    for _ in range(3):
        next(it)
    saved = json.loads(json.dumps(iterator_state(it)))  # what the checkpoint stores
    expected = next(it)["inputs"]
    fresh = iter(ds)
    restore_iterator(fresh, saved)
    np.testing.assert_array_equal(next(fresh)["inputs"], expected)


# ---- the loop ----------------------------------------------------------------------------------

def _losses(result):
    return {h["step"]: h["train/loss"] for h in result.history if "train/loss" in h}


@pytest.mark.parametrize("checkpointable", [True, False])
def test_resume_reproduces_uninterrupted_run(engine, tmp_path, checkpointable):
    def data():
        if checkpointable:
            return Batches()
        return (synthetic_batch(i) for i in range(10 ** 6))  # no get_state: skipped on resume

    full = run(engine, tmp_path / "full", 5, data)
    first = run(engine, tmp_path / "split", 3, data)
    resumed = run(engine, tmp_path / "split", 5, data)
    assert first.step == 3 and resumed.step == 5 and not resumed.interrupted
    assert sorted(_losses(resumed)) == [4, 5]
    for step, loss in {**_losses(first), **_losses(resumed)}.items():
        assert loss == pytest.approx(_losses(full)[step], rel=1e-6)
    assert max_diff(full.params, resumed.params) < 1e-6
    assert Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [2, 3, 4, 5][-3:]


def test_each_train_row_counts_its_steps(engine, tmp_path):
    """The first row after a resume averages fewer steps than log_every; `train/steps` says
    how many (nothing did)."""
    def steps(num_steps):
        result = train(TINY, OPT, Batches(), workdir=tmp_path, num_steps=num_steps, loss=LOSS,
                       parallel=ParallelConfig(mode="single"), engine=engine, log_every=2,
                       checkpoint_every=3, hooks=[])
        return {h["step"]: h["train/steps"] for h in result.history if "train/loss" in h}

    assert steps(3) == {2: 2, 3: 1}
    assert steps(6) == {4: 1, 6: 2}


def test_nan_guard_keeps_last_good_checkpoint(engine, tmp_path, monkeypatch):
    # The poisoned batches' out-of-range ids are the easy way to a NaN loss; the engine's batch
    # check (which refuses them) is switched off so that the guard itself is tested.
    monkeypatch.setattr(parallel_module, "check_batch", lambda config, batch, **kw: None)
    with pytest.raises(NonFiniteLossError, match="at step 4") as error:
        run(engine, tmp_path, 8, Batches(poison_from=4), checkpoint_every=2)
    assert "step 2" in str(error.value)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    restored = ckpt.restore(engine.abstract_state())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


def test_nan_guard_catches_an_update_that_overflows(tmp_path):
    """A finite loss and gradient whose update is not finite (Adam's 0/0, a float16
    overflow) stops the run before its parameters are saved (they used to be checkpointed as
    the last good state, and a rerun resumed from NaN parameters)."""
    def update(updates, state, params=None):
        bad = jnp.where(state >= 3, jnp.nan, 1e-3)  # from the fourth update (step 4) on
        return jax.tree.map(lambda u: -bad * u, updates), state + 1

    tx = optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)
    with pytest.raises(NonFiniteLossError, match="at step 4.*update is not finite"):
        train(TINY, OPT, Batches(), workdir=tmp_path, num_steps=6, tx=tx, loss=LOSS,
              parallel=ParallelConfig(mode="single"), log_every=1, checkpoint_every=2,
              hooks=[])
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]
    params = ckpt.restore(Engine(TINY, OPT, ParallelConfig(mode="single"), tx=tx
                                 ).abstract_state()).state.params
    ckpt.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_saves_at_the_current_step(engine, tmp_path, sig, status):
    def hook(step, metrics):
        if step == 3:
            os.kill(os.getpid(), sig)

    previous = signal.getsignal(sig)
    result = train(TINY, OPT, Batches(), workdir=tmp_path, num_steps=8, loss=LOSS,
                   parallel=ParallelConfig(mode="single"), engine=engine, log_every=1,
                   checkpoint_every=5, hooks=[hook])
    assert result.interrupted and result.step == 3
    # What a job restarter reads: a status of 0 marked the stopped run as done.
    assert result.signal == sig and result.exit_status == status
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    assert signal.getsignal(sig) is previous
    finished = run(engine, tmp_path, 4)
    assert not finished.interrupted and finished.signal is None and finished.exit_status == 0


def _failing_commit(monkeypatch, step, delay=0.0):
    """Make the background write of checkpoint `step` fail as on a full disk; returns an Event
    set once it has failed."""
    import errno
    import threading
    import time

    from orbax.checkpoint._src.checkpointers import async_checkpointer

    original = async_checkpointer._background_wait_for_commit_futures
    failed = threading.Event()

    def commit(directory, commit_futures, on_commit_callback, **kwargs):
        def finish():  # after the files are written, instead of the final rename
            time.sleep(delay)
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))

        return original(directory, commit_futures,
                        finish if directory.name == str(step) else on_commit_callback, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", commit)
    return failed


def test_a_failed_background_save_stops_the_run_at_once(engine, tmp_path, monkeypatch):
    """The save at step 4 fails in the background: the run stops at the next log after the
    failure (step 6's, before its metrics are reported), not at the next save, naming the
    step, the newest complete checkpoint and the fix; a rerun with room resumes from step 2."""
    import time

    from flaxformer_lite.training import CheckpointSaveError

    failed = _failing_commit(monkeypatch, 4)
    logged = []

    def hook(step, metrics):
        logged.append(step)
        if step == 5:  # the failure has surely arrived by the next log
            assert failed.wait(30)
            time.sleep(0.5)

    with pytest.raises(CheckpointSaveError) as error:
        run(engine, tmp_path, 12, checkpoint_every=2, hooks=[hook])
    message = str(error.value)
    assert "step 4 could not be written" in message and "No space left on device" in message
    assert "newest complete checkpoint is step 2" in message and "rerun" in message
    assert logged[-1] in (4, 5)  # step 5's log or step 6's, whichever comes after the failure
    monkeypatch.undo()
    # (Listed by hand: a Checkpointer here would remove 4's temporary directory on a background
    # thread, racing the rerun's own clean-up.)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    resumed = run(engine, tmp_path, 4)
    assert resumed.step == 4 and sorted(_losses(resumed)) == [3, 4]


def test_an_error_is_not_buried_by_a_failing_last_save(engine, tmp_path, monkeypatch, caplog):
    """A hook fails while the save of step 4 is being written, and that save fails too (as
    on a full disk): train() raises the hook's error; the save's is logged."""
    _failing_commit(monkeypatch, 4, delay=1.0)

    def hook(step, metrics):
        if step == 5:
            raise ValueError("the hook broke")

    with pytest.raises(ValueError, match="the hook broke"):
        run(engine, tmp_path, 8, checkpoint_every=2, hooks=[hook])
    assert "closing the checkpoints failed too: CheckpointSaveError" in caplog.text
    assert "newest complete checkpoint is step 2" in caplog.text


def test_a_second_run_on_a_workdir_in_use_is_refused(engine, tmp_path):
    """Two runs on one workdir deleted each other's in-flight checkpoints; the second now stops
    before touching anything, naming the first; the lock goes with the run, also when it fails."""
    import socket

    refused = []

    def hook(step, metrics):
        if step == 2:
            with pytest.raises(RuntimeError, match="is in use by another run") as error:
                run(engine, tmp_path, 8)
            refused.append(str(error.value))

    run(engine, tmp_path, 3, hooks=[hook])
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in refused[0]
    assert "wait for it to finish, stop it" in refused[0] and "another workdir" in refused[0]
    with pytest.raises(ValueError, match="ran out after 0 batches while skipping"):
        run(engine, tmp_path, 4, [])  # fails while holding the lock
    assert run(engine, tmp_path, 4).step == 4


def test_the_checkpoint_of_an_eval_step_is_saved_before_the_evaluation(engine, tmp_path):
    """A kill during a long evaluation lost checkpoint_every steps: the evaluation ran before
    the save of its step. Now the save starts first (with best_metric it needs the metrics)."""
    seen = {}

    def eval_fn(state, engine):
        step = int(engine.to_host(state.step))
        seen[step] = Checkpointer(tmp_path / "checkpoints").all_steps()
        return {"score": 1.0}

    run(engine, tmp_path, 4, checkpoint_every=2, eval_fn=eval_fn, eval_every=2,
        async_checkpointing=False)
    assert seen == {2: [2], 4: [2, 4]}


def test_sigterm_during_an_evaluation_cuts_it_short(engine, tmp_path, caplog):
    """SIGTERM waited for the whole evaluation; now the evaluation stops at the next batch, is
    not recorded, and the run stops with the step's checkpoint, saved before it."""
    served, called = [], []

    def eval_data():
        for i in range(6):
            if i == 2 and 2 not in served:  # the first evaluation's third batch
                os.kill(os.getpid(), signal.SIGTERM)
            served.append(i)
            yield synthetic_batch(100 + i)

    with caplog.at_level(logging.WARNING):
        result = run(engine, tmp_path, 8, checkpoint_every=4, eval_every=4,
                     eval_data=eval_data, eval_fn=lambda state, engine: called.append(1))
    assert result.interrupted and result.step == 4
    assert max(served) == 2  # batches 3, 4, 5 never read
    assert not called and not any("eval/loss" in h for h in result.history)
    assert "The evaluation at step 4 was cut short by SIGTERM and is not recorded" in caplog.text
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4]
    # The last step's evaluation cut short: interrupted too (it returned as finished, exit 0).
    served.clear()
    last = run(engine, tmp_path / "last", 4, checkpoint_every=4, eval_every=4,
               eval_data=eval_data)
    assert last.interrupted and last.step == 4 and last.exit_status == 143


def test_eval_metrics_and_best_checkpoint(engine, tmp_path):
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    seen = []
    result = train(TINY, OPT, Batches(), workdir=tmp_path, engine=engine,
                   num_steps=6, loss=LOSS, parallel=ParallelConfig(mode="single"),
                   eval_data=lambda: iter(eval_batches), eval_every=2, checkpoint_every=2,
                   keep_checkpoints=1, best_metric="eval/loss", log_every=3,
                   hooks=[lambda step, m: seen.append((step, m))])
    evals = {h["step"]: h["eval/loss"] for h in result.history if "eval/loss" in h}
    assert sorted(evals) == [2, 4, 6]
    # eval loss = token-weighted mean over both batches, recomputed here.
    model, params = result.engine.model, result.params
    total = tokens = 0.0
    forward = jax.jit(model.apply)
    for b in eval_batches:
        logits = forward({"params": params}, b["inputs"])
        loss, _, _ = np_losses(logits, b["targets"], 0.1)
        total += (loss * (b["targets"] != 0)).sum()
        tokens += (b["targets"] != 0).sum()
    assert evals[6] == pytest.approx(total / tokens, rel=1e-5)
    best = min(evals, key=evals.get)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == sorted({best, 6})
    assert [s for s, m in seen if "train/loss" in m] == [3, 6]
    # The best checkpoint is handed back: its step, and load_run(step="best") (the final
    # parameters are the last step's, which need not be the best).
    from flaxformer_lite.training import load_params, load_run
    assert result.best_step == best
    run = load_run(tmp_path, step="best")
    assert run.step == best
    assert jax.tree.all(jax.tree.map(np.array_equal, run.params,
                                     load_params(tmp_path / "checkpoints", best)[1]))


def test_an_evaluation_cut_short_after_its_save_is_redone_by_the_resume(engine, tmp_path):
    """The save of an evaluation step starts before the evaluation; a run killed during that
    evaluation left the checkpoint, and its resume went on without the evaluation (a finished
    run's final one too): the resume evaluates the restored step first."""
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]

    def evals(result):
        return {h["step"]: h["eval/loss"] for h in result.history if "eval/loss" in h}

    whole = evals(run(engine, tmp_path / "whole", 4, eval_data=lambda: iter(eval_batches),
                      eval_every=2))
    assert sorted(whole) == [2, 4]

    def killed_at(kill_step):
        def eval_fn(state, engine):  # dies inside the evaluation, after its save started
            if int(jax.device_get(state.step)) == kill_step:
                raise KeyboardInterrupt("killed during the evaluation")
        return eval_fn

    for kill_step in (2, 4):  # an intermediate evaluation, then the final one
        workdir = tmp_path / f"killed{kill_step}"
        with pytest.raises(KeyboardInterrupt):
            run(engine, workdir, 4, eval_data=lambda: iter(eval_batches), eval_every=2,
                eval_fn=killed_at(kill_step))
        assert Checkpointer(workdir / "checkpoints").latest_step() == kill_step
        resumed = evals(run(engine, workdir, 4, eval_data=lambda: iter(eval_batches),
                            eval_every=2))
        assert sorted(resumed) == [s for s in (2, 4) if s >= kill_step]
        for step, loss in resumed.items():
            assert loss == pytest.approx(whole[step], rel=1e-6)
        again = run(engine, workdir, 4, eval_data=lambda: iter(eval_batches), eval_every=2)
        assert again.history == []  # evaluated now: a rerun owes nothing


def test_best_mode_follows_the_metric_and_the_line_shows_eval_fn_metrics(engine, tmp_path):
    """best_metric="eval/accuracy" used to keep the worst checkpoint (best_mode defaulted to
    "min"); a run without best_metric has no best to load; an eval_fn's F1 was left out of
    the printed line."""
    from flaxformer_lite.training import load_run
    from flaxformer_lite.training.trainer import _compact, default_best_mode
    assert [default_best_mode(m) for m in (
        "eval/accuracy", "eval/bleu", "eval/exact_match", "eval/f1", "eval/f1_macro",
        "eval/top5_acc", "eval/rougeL", "eval/loss", "eval/perplexity", "eval/wer", None)
    ] == ["max"] * 7 + ["min"] * 4
    for unclear in ("eval/neg_accuracy", "eval/loss_f1", "eval/f1/macro", "eval/mine"):
        with pytest.raises(ValueError, match="pass best_mode='max'"):
            default_best_mode(unclear)
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    result = train(TINY, OPT, Batches(), workdir=tmp_path / "acc", engine=engine, num_steps=4,
                   loss=LOSS, parallel=ParallelConfig(mode="single"),
                   eval_data=lambda: iter(eval_batches), eval_every=1, keep_checkpoints=1,
                   best_metric="eval/accuracy", hooks=[])
    evals = {h["step"]: h["eval/accuracy"] for h in result.history if "eval/accuracy" in h}
    assert len(set(evals.values())) > 1  # else any step would do
    assert evals[result.best_step] == max(evals.values())
    assert json.loads((tmp_path / "acc" / "config.json").read_text())["run"]["best_mode"] == "max"
    assert load_run(tmp_path / "acc", step="best").step == result.best_step
    plain = train(TINY, OPT, Batches(), workdir=tmp_path / "plain", engine=engine, num_steps=1,
                  loss=LOSS, parallel=ParallelConfig(mode="single"), hooks=[])
    assert plain.best_step is None
    with pytest.raises(ValueError, match="records no best_metric .*carry no metrics"):
        load_run(tmp_path / "plain", step="best")
    # A NaN is never best, a tie goes to the latest step, and the train result and load_run
    # agree (Orbax's own ranking let a NaN win and took the other end of a tie).
    from flaxformer_lite.training import best_step
    scores = iter([float("nan"), 0.5, 0.75, 0.75, 0.5])
    ranked = train(TINY, OPT, Batches(), workdir=tmp_path / "f1", engine=engine, num_steps=5,
                   loss=LOSS, parallel=ParallelConfig(mode="single"), eval_every=1,
                   eval_fn=lambda state, engine: {"f1": next(scores)}, keep_checkpoints=5,
                   best_metric="eval/f1", hooks=[])
    assert ranked.best_step == 4 == load_run(tmp_path / "f1", step="best").step
    assert best_step(tmp_path / "f1" / "checkpoints", "eval/f1", "min") == 5
    # A name that says neither needs best_mode once: a rerun of the run ranks as it did.
    mine = dict(loss=LOSS, parallel=ParallelConfig(mode="single"), eval_every=1, hooks=[],
                eval_fn=lambda state, engine: {"mine": 1.0}, best_metric="eval/mine")
    train(TINY, OPT, Batches(), workdir=tmp_path / "mine", engine=engine, num_steps=1,
          best_mode="max", **mine)
    again = train(TINY, OPT, Batches(), workdir=tmp_path / "mine", engine=engine, num_steps=2,
                  **mine)
    assert again.best_step == 2  # a tie: the latest
    # Every entry point infers the mode from the name (Checkpointer and best_step said "min").
    assert best_step(tmp_path / "f1" / "checkpoints", "eval/f1") == 4
    assert Checkpointer(tmp_path / "f1" / "checkpoints", best_metric="eval/f1").best_step() == 4
    line = _compact(4, {"eval/loss": 1.5, "eval/accuracy": 0.5, "eval/f1": 0.25,
                        "eval/nll": 1.5, "eval/tokens": 9.0, "eval/bleu_signature": "nrefs:1"})
    assert line == "step 4: e.loss=1.5 e.accuracy=0.5 e.f1=0.25"


def test_an_endless_eval_pipeline_is_refused_before_training(engine, tmp_path):
    """An eval pipeline built with num_epochs=None (the pipelines' default) repeats forever:
    the first evaluation used to never return."""
    from flaxformer_lite import data

    tokens = np.arange(400) % (VOCAB - 1) + 1
    endless = data.window_pipeline(tokens, batch_size=2, seq_len=LENGTH)
    finite = data.window_pipeline(tokens, batch_size=2, seq_len=LENGTH, random=False)
    assert endless.endless and not finite.endless
    for i, eval_data in enumerate((endless, lambda: endless, lambda: iter(endless))):
        with pytest.raises(ValueError, match="repeats forever .*num_epochs=1"):
            train(TINY, OPT, Batches(), workdir=tmp_path / str(i), engine=engine, num_steps=2,
                  loss=LOSS, parallel=ParallelConfig(mode="single"), eval_data=eval_data,
                  hooks=[])
        assert not list((tmp_path / str(i)).glob("checkpoints/[0-9]*"))  # nothing trained


def test_best_checkpoint_is_kept_between_checkpoint_steps(engine, tmp_path):
    """Evaluations at steps 2, 4, 6 and checkpoints every 3: the best evaluation (by "max", so
    the first, the loss falling) must still be kept; it used to be saved only at common steps."""
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    result = train(TINY, OPT, Batches(), workdir=tmp_path, engine=engine,
                   num_steps=6, loss=LOSS, parallel=ParallelConfig(mode="single"),
                   eval_data=lambda: iter(eval_batches), eval_every=2, checkpoint_every=3,
                   keep_checkpoints=1, best_metric="eval/loss", best_mode="max", hooks=[])
    evals = {h["step"]: h["eval/loss"] for h in result.history if "eval/loss" in h}
    best = max(evals, key=evals.get)
    assert best != 6  # else the check below could not tell
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [best, 6]


def test_best_metric_with_nothing_to_rank_or_new_on_resume(engine, tmp_path, caplog):
    """Every evaluation NaN: train() raised after its last save instead of returning
    best_step None. A resume choosing a metric the earlier checkpoints lack failed every save
    (a KeyError named as a failed write), so the run could not go on."""
    def eval_fn(state, engine):
        return {"score": math.nan}

    def with_bleu(state, engine):  # a metric the first run's checkpoints do not hold
        return {**eval_fn(state, engine), "bleu": float(engine.to_host(state.step))}

    with caplog.at_level("WARNING"):
        first = run(engine, tmp_path, 2, eval_fn=eval_fn, eval_every=2,
                    best_metric="eval/score", best_mode="max")
    assert first.best_step is None and "No best checkpoint" in caplog.text
    again = run(engine, tmp_path, 4, eval_fn=with_bleu, eval_every=2, best_metric="eval/bleu",
                best_mode="max", checkpoint_every=1)
    assert again.step == 4 and again.best_step == 4


def test_the_last_evaluation_ranks_the_last_checkpoint(engine, tmp_path):
    """num_steps a multiple of checkpoint_every but not of eval_every: the final step's
    checkpoint used to be saved before its evaluation ran, so best_metric never saw it."""
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    result = train(TINY, OPT, Batches(), workdir=tmp_path, engine=engine,
                   num_steps=5, loss=LOSS, parallel=ParallelConfig(mode="single"),
                   eval_data=lambda: iter(eval_batches), eval_every=2, checkpoint_every=5,
                   keep_checkpoints=1, best_metric="eval/loss", hooks=[])
    evals = {h["step"]: h["eval/loss"] for h in result.history if "eval/loss" in h}
    assert sorted(evals) == [2, 4, 5] and min(evals, key=evals.get) == 5  # the loss falls
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [5]


def test_train_arguments_that_would_fail_later_are_named(engine, tmp_path):
    common = dict(engine=engine, num_steps=2, loss=LOSS, parallel=ParallelConfig(mode="single"),
                  hooks=[])
    batch = synthetic_batch(0)
    cases = [
        (dict(seed=1.5), r"seed=1.5\) must be an integer"),
        (dict(keep_checkpoints=0), r"keep_checkpoints=0 must be"),
        (dict(train_data=batch), "train_data is a single batch"),
        (dict(train_data=[{"inputs": batch["inputs"]}]), "no 'targets' entry"),
        (dict(parallel=ParallelConfig(mode="single", microbatches=2)),
         "built for a different parallel"),
    ]
    for i, (change, match) in enumerate(cases):
        kwargs = {**common, "train_data": Batches(), **change}
        with pytest.raises(ValueError, match=match):
            train(TINY, OPT, workdir=tmp_path / str(i), **kwargs)
        assert not list((tmp_path / str(i)).glob("checkpoints/[0-9]*"))  # nothing trained


def test_eval_misuse_is_refused(engine, tmp_path):
    eval_batches = [synthetic_batch(100 + i) for i in range(2)]
    common = dict(engine=engine, num_steps=4, loss=LOSS, parallel=ParallelConfig(mode="single"),
                  eval_every=2, hooks=[])
    with pytest.raises(ValueError, match="one-shot iterator"):  # before any step
        train(TINY, OPT, Batches(), workdir=tmp_path / "a", eval_data=iter(eval_batches),
              **common)
    with pytest.raises(ValueError, match=r"best_metric='eval/los': .*typo of 'eval/loss'"):
        train(TINY, OPT, Batches(), workdir=tmp_path / "b", eval_data=lambda: eval_batches,
              best_metric="eval/los", **common)
    with pytest.raises(ValueError, match="best_metric='eval/los' .*'eval/loss'"):  # mode given
        train(TINY, OPT, Batches(), workdir=tmp_path / "b", eval_data=lambda: eval_batches,
              best_metric="eval/los", best_mode="min", **common)
    # Step counts that used to run as something else (-2 as 2, 2.5 as 3).
    for bad in (dict(eval_every=-2), dict(checkpoint_every=2.5), dict(num_steps=2.5),
                dict(log_every=0)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"{name}=.* must be an integer"):
            train(TINY, OPT, Batches(), workdir=tmp_path / "c", **{**common, **bad})
    # Without eval_every the evaluation still runs at the end, as documented.
    result = train(TINY, OPT, Batches(), workdir=tmp_path / "d",
                   eval_data=lambda: eval_batches, **{**common, "eval_every": None})
    assert [h["step"] for h in result.history if "eval/loss" in h] == [4]


def _read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars in TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_hook_writes_scalars_and_skips_non_finite(tmp_path):
    from flaxformer_lite.training import TensorBoardHook

    hook = TensorBoardHook(tmp_path / "tb")
    hook(10, {"train/loss": 2.5, "train/bad": float("nan"), "eval/name": "text"})
    hook(20, {"train/loss": 1.25})
    hook.close()
    scalars = _read_scalars(tmp_path / "tb")
    assert scalars == {"train/loss": [(10, 2.5), (20, 1.25)]}


def test_tensorboard_hook_leaves_torch_unimported(tmp_path):
    """tensorboardX imports PyTorch when installed (~1.6 s); the hook loads it without, and
    `import torch` works normally afterwards."""
    code = ("import importlib.util, sys; from flaxformer_lite.training import TensorBoardHook; "
            f"h = TensorBoardHook({str(tmp_path / 'tb')!r}); h(1, {{'train/loss': 1.0}}); "
            "h.close(); loaded = 'torch' in sys.modules; "
            "importlib.util.find_spec('torch') and __import__('torch'); print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
    assert _read_scalars(tmp_path / "tb") == {"train/loss": [(1, 1.0)]}


def test_tensorboard_hook_reports_a_writer_error_on_first_use(tmp_path):
    from flaxformer_lite.training import TensorBoardHook

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    hook = TensorBoardHook(blocker / "tb")  # cannot create a directory inside a file
    with pytest.raises(OSError):
        hook(1, {"train/loss": 1.0})


def test_a_short_last_batch_trains_as_itself(engine, tmp_path):
    """The end of an epoch (a torch DataLoader's default) used to crash a multi-device run
    mid-way; short batches are now padded with empty rows to the first batch's rows, which
    must change nothing: the same update as the short batch stepped on its own."""
    batches = [synthetic_batch(0), synthetic_batch(1), synthetic_batch(2, batch=5)]
    result = run(engine, tmp_path, 3, batches, checkpoint_every=0)
    state = engine.init_state(0)
    for batch in batches:
        state, metrics = engine.train_step(state, batch)
    # Two compilations of different shapes round differently, and Adam turns ~0 gradients'
    # rounding into updates of up to ~lr; a padded row with any weight would move far more.
    assert max_diff(result.params, engine.params(state)) < 1e-5
    last = engine.metrics_to_host(metrics)
    assert result.history[-1]["train/tokens"] == last["tokens"]


def test_rerun_and_eval_fn_surprises(engine, tmp_path, caplog):
    """A finished run's rerun reads no batch; eval_fn may return None or a text; a resume whose
    data runs out while skipping names it (was a bare StopIteration); data with no batch at
    all is refused (it saved an untrained step-0 checkpoint and returned), eval data with no
    batch too."""
    samples = iter([{"bleu": 1.5, "sample": "some text"}, None])
    first = run(engine, tmp_path / "a", 2, [synthetic_batch(i) for i in range(2)],
                eval_fn=lambda state, engine: next(samples), eval_every=1)
    assert [h.get("eval/bleu") for h in first.history if "eval/bleu" in h] == [1.5]
    assert not any("eval/sample" in h for h in first.history)
    assert "'sample' is str, not a number" in caplog.text

    def untouched():
        raise AssertionError("a finished run read its data")
        yield

    caplog.clear()
    again = run(engine, tmp_path / "a", 2, untouched())
    assert again.step == 2 and again.history == []
    assert "configs differ" not in caplog.text  # was: run.global_batch 8 -> (not recorded)
    with pytest.raises(ValueError, match="ran out after 1 batches while skipping the 2"):
        run(engine, tmp_path / "a", 4, [synthetic_batch(0)])
    with pytest.raises(ValueError, match="train_data yielded no batch"):  # an empty file
        run(engine, tmp_path / "b", 2, [])
    with pytest.raises(TypeError, match="mapping of .*got a int"):  # was an AttributeError
        run(engine, tmp_path / "d", 2, [1, 2])
    # Eval data without a batch reported nothing, and best_metric failed after the last step.
    with pytest.raises(ValueError, match="eval_data yielded no batch"):
        run(engine, tmp_path / "c", 2, eval_data=lambda: [], eval_every=1)


def test_a_rerun_that_cannot_restore_names_the_changed_fields(engine, tmp_path):
    run(engine, tmp_path, 2, checkpoint_every=2)
    other = OPT.replace(clip_norm=None)
    with pytest.raises(RuntimeError, match=r"optimizer.clip_norm: 1.0 -> None"):
        train(TINY, other, Batches(), workdir=tmp_path, num_steps=4, hooks=[],
              parallel=ParallelConfig(mode="single"), loss=LOSS)


def test_a_changed_model_size_is_told_from_the_metadata(engine, tmp_path, caplog):
    """Parameters of other shapes are refused before Orbax reads them (on a mesh its failed
    reads printed pages of TensorStore messages around the error)."""
    run(engine, tmp_path, 2, checkpoint_every=2)
    wider = TINY.replace(d_ff=128)
    with pytest.raises(RuntimeError, match=r"model.d_ff: 64 -> 128"):
        train(wider, OPT, Batches(), workdir=tmp_path, num_steps=4, hooks=[],
              parallel=ParallelConfig(mode="single"), loss=LOSS)
    assert "its parameters do not fit this model" in caplog.text
    assert "(32, 64) -> (32, 128)" in caplog.text


def test_damaged_checkpoints_with_unchanged_configs_are_called_damaged(engine, tmp_path):
    """Every checkpoint unreadable, the configs as recorded: the error blamed a config change;
    it now says the files look damaged, quotes the read error and leaves them in place."""
    run(engine, tmp_path, 4, checkpoint_every=2)
    for step in (2, 4):
        _corrupt(tmp_path / "checkpoints" / str(step))
    with pytest.raises(RuntimeError) as error:
        run(engine, tmp_path, 6)
    message = str(error.value)
    assert "configs equal the recorded run's, so the files look damaged" in message
    assert "The read error of step 4: " in message and "Nothing was moved or deleted" in message
    assert "move " + str(tmp_path / "checkpoints") + " aside" in message
    assert "differs from the one that wrote them" not in message
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]


def test_default_hook_prints_progress(engine, tmp_path, capsys):
    train(TINY, OPT, Batches(), workdir=tmp_path, num_steps=2, log_every=1, engine=engine,
          parallel=ParallelConfig(mode="single"), loss=LOSS)
    assert "step 2: t.loss=" in capsys.readouterr().out


def test_optimizer_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="schedule='constant' never reads them"):
        OptimizerConfig(decay_steps=100, final_learning_rate=1e-4)
    with pytest.raises(ValueError, match="the cosine schedule would rise"):
        OptimizerConfig(schedule="cosine", decay_steps=10, learning_rate=1e-4,
                        final_learning_rate=1e-3)
    assert OptimizerConfig(accumulation_steps=np.int64(2)).accumulation_steps == 2
    assert ParallelConfig(microbatches=np.int64(2)).microbatches == 2
    for bad in (dict(accumulation_steps=True), dict(accumulation_steps=0)):
        with pytest.raises(ValueError, match="accumulation_steps"):
            OptimizerConfig(**bad)


def test_a_rerun_names_changed_experiment_settings(engine, tmp_path, caplog):
    run(engine, tmp_path, 2, experiment={"data": {"batch_size": 8, "seq_len": 16}})
    with caplog.at_level("WARNING"):
        run(engine, tmp_path, 3, experiment={"data": {"batch_size": 4, "seq_len": 16}})
    assert "experiment.data.batch_size: 8 -> 4" in caplog.text
    assert "seq_len" not in caplog.text
    caplog.clear()  # resumed by a bare train(): the section's loss was not named
    with caplog.at_level("WARNING"):
        run(engine, tmp_path, 4)
    assert "experiment.data.batch_size: 4 -> (not recorded)" in caplog.text


def test_the_padding_id_decides_which_targets_count():
    """TransformerConfig.pad_id: targets equal to it carry no loss (0 by default); without one
    (None: a vocabulary such as GPT-2's, whose id 0 is a token) segment ids 0 mark padding,
    and without segment ids every target counts. Against a float64 reference; a short batch
    is filled with padding rows, which need segment ids when there is no padding id."""
    base = synthetic_batch(3)  # ids 4.. with trailing 0 padding
    base["targets"][0, :3] = 9
    real = (base["inputs"] != 0).astype(np.int32)
    params = nn.meta.unbox(init_params(TINY, jax.random.key(0)))
    single = ParallelConfig(mode="single")
    cases = [(0, base, base["targets"] != 0), (9, base, base["targets"] != 9),
             (None, base, np.ones(base["targets"].shape, bool)),
             (None, {**base, "segment_ids": real}, real.astype(bool))]
    for pad_id, batch, keep in cases:
        cfg = TINY.replace(pad_id=pad_id)
        model = make_model(cfg)
        segments = batch.get("segment_ids", np.ones_like(base["inputs"]) if pad_id is None
                             else (base["inputs"] != pad_id).astype(np.int32))
        positions = np.broadcast_to(np.arange(LENGTH), segments.shape)
        if pad_id is not None:  # positions count a row's tokens, padding anywhere left out
            positions = np.maximum(np.cumsum(segments != 0, axis=1) - 1, 0)
        logits = model.apply({"params": params}, batch["inputs"], segment_ids=segments,
                             positions=positions)
        _, nll, _ = np_losses(logits, batch["targets"])
        sums = jax.tree.map(float, eval_step(params, batch, model=model))
        assert sums["tokens"] == keep.sum(), pad_id
        np.testing.assert_allclose(sums["nll"], nll[keep].sum(), rtol=1e-5)
        ppl = evaluation.perplexity(model, params, [batch])
        assert ppl["tokens"] == keep.sum()
        np.testing.assert_allclose(ppl["nll"], nll[keep].sum(), rtol=1e-5)
        engine = Engine(cfg, OPT, single, LOSS)
        short = {k: v[:5] for k, v in batch.items()}
        if pad_id is None and "segment_ids" not in batch:
            with pytest.raises(ValueError, match=r"pad_id=None only segment ids 0 \(or "
                               r"loss_weights 0\) mark padding and the batch has neither"):
                engine.pad_batch(short, rows=8)
            continue
        filled = engine.pad_batch(short, rows=8)
        if pad_id is not None:
            assert np.all(filled["targets"][5:] == pad_id)
        a, b = (jax.tree.map(float, eval_step(params, x, model=model)) for x in (short, filled))
        assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], rel=1e-6)


def _weighted_batch(seed=5, rows=8):
    """A batch whose `loss_weights` leave each row's first targets (a prompt) out and weigh
    the others in [0.25, 2] (a float weight per target)."""
    batch = synthetic_batch(seed, batch=rows)
    rng = np.random.RandomState(seed)
    weights = rng.uniform(0.25, 2.0, batch["targets"].shape).astype(np.float32)
    weights[np.arange(LENGTH)[None, :] < rng.randint(1, 6, (rows, 1))] = 0.0
    return {**batch, "loss_weights": weights}


@pytest.mark.parametrize("pad_id", [0, None])
def test_loss_weights_weigh_the_loss_like_a_numpy_masked_mean(pad_id):
    """`loss_weights` [batch, length] multiply into the padding weights: eval and train step,
    token_nll and perplexity give the weighted sums over the same logits (float64 NumPy),
    and the model still attends to the targets left out (its logits are those of the
    unweighted batch)."""
    cfg = TINY.replace(pad_id=pad_id)
    model = make_model(cfg)
    params = numpy_params(cfg)
    batch = _weighted_batch()
    logits = model.apply({"params": params}, batch["inputs"])
    _, nll, _ = np_losses(logits, batch["targets"])
    pad = batch["targets"] != 0 if pad_id == 0 else np.ones(nll.shape, bool)
    w = batch["loss_weights"] * pad
    sums = jax.tree.map(float, eval_step(params, batch, model=model, loss_config=LOSS))
    np.testing.assert_allclose(sums["tokens"], w.sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["nll"], (nll * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["nll"] / sums["tokens"], (nll * w).sum() / w.sum(),
                               rtol=1e-5)
    assert sums["sequences"] == (w.sum(-1) > 0).sum()
    token, weights = evaluation.token_nll(model, params, batch)
    np.testing.assert_allclose(np.asarray(weights), w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(token), nll * w, rtol=1e-5, atol=1e-6)
    ppl = evaluation.perplexity(model, params, [batch])
    np.testing.assert_allclose(ppl["nll"], (nll * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(ppl["tokens"], w.sum(), rtol=1e-6)
    tx = make_optimizer(OPT)
    _, m = jax.jit(functools.partial(train_step, model=model, tx=tx))(
        manual_state(params, tx), batch)
    np.testing.assert_allclose(float(m["nll"]), (nll * w).sum(), rtol=1e-5)
    # Bool weights (a mask) are 0/1 weights.
    mask = {**batch, "loss_weights": batch["loss_weights"] > 0}
    sums = jax.tree.map(float, eval_step(params, mask, model=model))
    keep = (batch["loss_weights"] > 0) & pad
    assert sums["tokens"] == keep.sum()
    np.testing.assert_allclose(sums["nll"], nll[keep].sum(), rtol=1e-5)


def test_loss_weights_of_one_change_nothing_and_split_like_the_batch():
    """Weights 1 give bitwise the step without them; with weights, 2 micro-batches give the
    whole batch's update, and so does an Engine's padded eval batch."""
    model = make_model(TINY)
    params = numpy_params(TINY)
    tx = make_optimizer(OPT)
    batch = synthetic_batch(2)
    ones = {**batch, "loss_weights": np.ones(batch["targets"].shape, np.float32)}
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_config=LOSS))
    (a, ma), (b, mb) = (step(manual_state(params, tx), x) for x in (batch, ones))
    assert max_diff(a.params, b.params) == 0.0
    assert all(float(ma[k]) == float(mb[k]) for k in ma)
    weighted = _weighted_batch(rows=8)
    states = {}
    for k in (1, 2):
        micro = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_config=LOSS,
                                          microbatches=k))
        states[k] = micro(manual_state(params, tx), weighted)
    assert max_diff(states[1][0].params, states[2][0].params) < 1e-6
    assert max_diff(states[1][0].params, a.params) > 1e-4  # the weights change the update
    np.testing.assert_allclose(float(states[2][1]["loss"]), float(states[1][1]["loss"]),
                               rtol=1e-6)
    engine = Engine(TINY.replace(pad_id=None), OPT, ParallelConfig(mode="single"), LOSS)
    short = {k: v[:5] for k, v in weighted.items()}
    filled = engine.pad_batch(short, rows=8)  # no segment ids: weights 0 mark the rows
    assert np.all(filled["loss_weights"][5:] == 0)
    state = engine.init_state(0, params=params)
    a, b = (engine.metrics_to_host(engine.eval_step(state, x)) for x in (short, filled))
    assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert sorted(engine.shard_batch(short)) == ["inputs", "loss_weights", "targets"]


def test_loss_weights_summing_below_one_give_the_weighted_mean_gradient():
    """A weighted mean keeps its value and gradient when every weight is scaled: weights of
    0.01 (summing below 1, as per-sequence normalised weights do) give the update of weights
    1, with the built-in objective and with a `loss_fn` (the count was floored at 1)."""
    model = make_model(TINY)
    params = numpy_params(TINY)
    tx = optax.sgd(1.0)  # the update is the gradient itself
    batch = synthetic_batch(3)
    shape = batch["targets"].shape
    for loss_fn in (None, cross_entropy_loss):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_config=LOSS,
                                         loss_fn=loss_fn))
        runs = [step(manual_state(params, tx),
                     {**batch, "loss_weights": np.full(shape, w, np.float32)})
                for w in (1.0, 0.01)]
        (one, m_one), (small, m_small) = runs
        assert float(m_small["tokens"]) < 1.0
        np.testing.assert_allclose(float(m_small["grad_norm"]), float(m_one["grad_norm"]),
                                   rtol=1e-5)
        assert max_diff(one.params, small.params) < 1e-6
        assert max_diff(one.params, params) > 1e-3


@pytest.mark.parametrize("preset", ["transformer-base", "bert-base"])
def test_loss_weights_in_encoder_decoder_and_masked_lm_steps(preset):
    """Encoder-decoder: the weights follow `targets`. Masked LM with `mlm_predictions=k`:
    they are taken at the k scored positions, the same sums as the full head's."""
    extra = {"mlm_head": True} if preset == "bert-base" else {}
    config = get_config(preset, vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64,
                        num_layers=1, max_len=LENGTH, dropout_rate=0.0,
                        attention_dropout_rate=0.0, **extra)
    params = numpy_params(config)
    rng = np.random.RandomState(0)
    inputs = rng.randint(5, VOCAB, (4, 12)).astype(np.int32)
    if config.architecture == "encoder_decoder":
        targets = rng.randint(5, VOCAB, (4, 10)).astype(np.int32)
        targets[2, 6:] = 0
        logits = make_model(config).apply({"params": params}, inputs, targets)
    else:
        targets = np.where(rng.rand(4, 12) < 0.4, inputs, 0).astype(np.int32)
        logits = make_model(config).apply({"params": params}, inputs)["logits"]
    weights = rng.uniform(0.0, 2.0, targets.shape).astype(np.float32)
    batch = {"inputs": inputs, "targets": targets, "loss_weights": weights}
    _, nll, _ = np_losses(logits, targets)
    w = weights * (targets != 0)
    configs = [config] + ([config.replace(mlm_predictions=8)] if extra else [])
    for cfg in configs:
        sums = jax.tree.map(float, eval_step(params, batch, model=make_model(cfg)))
        np.testing.assert_allclose(sums["tokens"], w.sum(), rtol=1e-6)
        np.testing.assert_allclose(sums["nll"], (nll * w).sum(), rtol=1e-5)
    token, _ = evaluation.token_nll(make_model(configs[-1]), params, batch)
    np.testing.assert_allclose(np.asarray(token), nll * w, rtol=1e-5, atol=1e-6)


def test_loss_weights_are_checked_on_the_host():
    from flaxformer_lite.models import check_batch

    batch = synthetic_batch(1, batch=4)
    good = np.ones(batch["targets"].shape, np.float32)
    for bad, match in [(-good, "from -1.0 to -1.0; they must be finite and >= 0"),
                       (good * np.nan, "must be finite"),
                       (good[:, :3], "must share one"),
                       (good.astype(np.complex64), "complex64; loss weights are float")]:
        with pytest.raises(ValueError, match=match):
            check_batch(TINY, {**batch, "loss_weights": bad})
    check_batch(TINY, {**batch, "loss_weights": good.astype(bool)})
    classifier = get_config("bert-base", vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64,
                            num_layers=1, max_len=LENGTH, num_classes=3)
    rows = {"inputs": batch["inputs"], "labels": np.zeros(4, np.int32)}
    check_batch(classifier, {**rows, "loss_weights": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"one per example, \[batch\]"):
        check_batch(classifier, {**rows, "loss_weights": good})


def test_trainable_parameters_alone_are_differentiated_and_updated(tmp_path):
    """Engine(trainable=...): the frozen arrays stay bitwise, get no optimizer state and no
    gradient work (fewer FLOPs than full training, which a multi_transform with set_to_zero
    alone did not save: the gradient norm read every gradient); the update equals that
    multi_transform's, with micro-batches too."""
    cfg = TINY.replace(num_layers=3)
    single = ParallelConfig(mode="single")

    def top(path):  # the last layer and the final norm
        return "layer_2" in path or "final_norm" in path

    batch = synthetic_batch(0)
    frozen = Engine(cfg, OPT, single, LOSS, trainable=top)
    params = numpy_params(cfg)
    state, metrics = frozen.train_step(frozen.init_state(0, params=params), batch)
    flat = {k: np.asarray(v) for k, v in partitioning.flat_leaves(frozen.params(state)).items()}
    before = partitioning.flat_leaves(params)
    for path, value in flat.items():
        assert np.array_equal(value, before[path]) != top(path), path
    opt_leaves = partitioning.flat_leaves(state.opt_state)
    assert opt_leaves and all("layer_0" not in k and "layer_1" not in k for k in opt_leaves)
    labels = jax.tree.map_with_path(
        lambda path, _: "train" if top("/".join(str(getattr(k, "key", k)) for k in path))
        else "frozen", params)
    tx = optax.multi_transform({"train": make_optimizer(OPT, d_model=cfg.d_model),
                                "frozen": optax.set_to_zero()}, labels)
    masked = Engine(cfg, OPT, single, LOSS, tx=tx)
    ref, ref_metrics = masked.train_step(masked.init_state(0, params=params), batch)
    assert max_diff(frozen.params(state), masked.params(ref)) < 1e-6
    assert metrics["loss"] == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)

    def flops(engine):
        return engine.lower_train_step(batch).compile().cost_analysis()["flops"]
    assert flops(frozen) < 0.8 * flops(masked)
    micro = Engine(cfg, OPT, ParallelConfig(mode="single", microbatches=2), LOSS,
                   trainable=top)
    state2, _ = micro.train_step(micro.init_state(0, params=params), batch)
    assert max_diff(frozen.params(state), micro.params(state2)) < 1e-5
    tree = jax.tree.map_with_path(
        lambda path, _: top("/".join(str(getattr(k, "key", k)) for k in path)), params)
    assert Engine(cfg, OPT, single, LOSS, trainable=tree).trainable == frozen.trainable
    with pytest.raises(ValueError, match="trainable selects none of the"):
        Engine(cfg, OPT, single, LOSS, trainable=lambda path: False)
    # scan_layers: a stack is asked about each layer's path, and trains or freezes whole.
    scanned = cfg.replace(scan_layers=True)
    whole = Engine(scanned, OPT, single, LOSS, trainable=lambda p: "/layer_" in p)
    assert sum(whole.trainable) == sum(
        "layer_" in k for k in partitioning.flat_leaves(frozen._abstract.params)) // 3
    with pytest.raises(ValueError, match=r"selects layers \[2\] of the 3 in decoder/layers/"
                       r"layers/.*set scan_layers=False"):
        Engine(scanned, OPT, single, LOSS, trainable=top)
    with pytest.raises(ValueError, match="tree of bools shaped like the parameters"):
        Engine(cfg, OPT, single, LOSS, trainable={"decoder": True})
    train(cfg, OPT, Batches(), workdir=tmp_path, num_steps=1, hooks=[], parallel=single,
          loss=LOSS, trainable=top)
    recorded = json.loads((tmp_path / "config.json").read_text())["optimizer"]["trainable"]
    assert recorded.startswith(f"{sum(frozen.trainable)} of {len(frozen.trainable)} arrays")


def test_a_tx_of_your_own_must_agree_with_accumulation_steps_and_take_unboxed_labels():
    """With tx=, accumulation_steps drove the logged learning rate and a warning about
    micro-batches "accumulated but never applied" while nothing accumulated; labels built on
    init_params' boxed parameters failed in a bare pytree structure error."""
    single = ParallelConfig(mode="single")
    with pytest.raises(ValueError, match=r"accumulation_steps=4, but the tx given to the Engine "
                       r"does not accumulate.*optax.MultiSteps\(tx, every_k_schedule=4\)"):
        Engine(TINY, OptimizerConfig(accumulation_steps=4), single, LOSS, tx=optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"accumulates gradients \(optax.MultiSteps\) but "
                       r"OptimizerConfig.accumulation_steps=1"):
        Engine(TINY, OptimizerConfig(), single, LOSS,
               tx=optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2))
    inner = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2)  # nested: found as well
    Engine(TINY, OptimizerConfig(accumulation_steps=2), single, LOSS,
           tx=optax.chain(optax.clip_by_global_norm(1.0), inner))
    boxed = init_params(TINY, jax.random.key(0))
    labels = jax.tree.map(lambda _: "train", boxed)
    tx = optax.multi_transform({"train": optax.adam(1e-3)}, labels)
    with pytest.raises(ValueError, match=r"tx.init failed .* Build them on "
                       r"`flax.linen.meta.unbox\(params\)`"):
        Engine(TINY, OPT, single, LOSS, tx=tx)
    Engine(TINY, OPT, single, LOSS, tx=optax.multi_transform(
        {"train": optax.adam(1e-3)}, jax.tree.map(lambda _: "train", nn.meta.unbox(boxed))))


def test_remat_without_scan_layers_on_cpu_is_warned(caplog):
    """Unscanned, XLA:CPU's compiled step kept its memory under remat and added the
    recomputation's FLOPs; scanned, remat lowers it."""
    single = ParallelConfig(mode="single")
    with caplog.at_level("WARNING"):
        Engine(TINY.replace(remat="full"), OPT, single, LOSS)
    assert "remat='full' without scan_layers: on XLA:CPU" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Engine(TINY.replace(remat="full", scan_layers=True), OPT, single, LOSS)
        Engine(TINY, OPT, single, LOSS)
    assert "remat" not in caplog.text


def test_fine_tune_from_pretrained_params_with_frozen_embeddings(engine, tmp_path):
    """`train(init_params=..., tx=...)`: start from another run's parameters with an optax
    transformation of one's own (here: embeddings frozen), keeping the loop's checkpoints."""
    from flaxformer_lite.training import load_state

    run(engine, tmp_path / "pretrain", 2)
    pretrained = load_state(tmp_path / "pretrain" / "checkpoints")[1]["params"]
    labels = jax.tree.map_with_path(
        lambda path, _: "frozen" if any("embed" in str(getattr(k, "key", k)) for k in path)
        else "train",
        pretrained)
    tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()},
                               labels)
    start = Engine(TINY, OPT, ParallelConfig(mode="single"), LOSS, tx=tx).init_state(
        0, params=pretrained)
    assert max_diff(start.params, pretrained) == 0.0
    result = train(TINY, OPT, Batches(), workdir=tmp_path / "tune", num_steps=2, hooks=[],
                   parallel=ParallelConfig(mode="single"), loss=LOSS, tx=tx,
                   init_params=pretrained)
    tuned, before = params_lib_flat(result.params), params_lib_flat(pretrained)
    assert all(np.array_equal(tuned[k], before[k]) for k in tuned if "embed" in k)
    assert any(not np.allclose(tuned[k], before[k]) for k in tuned if "embed" not in k)
    # A rerun without that transformation cannot restore its state, and says why.
    with pytest.raises(RuntimeError, match=r"optimizer.tx: 'custom: train\(tx=...\)' -> "
                       r"\(not recorded\)"):
        run(engine, tmp_path / "tune", 3)
    other = get_config("gpt2", vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=32,
                       num_layers=1, max_len=LENGTH)
    with pytest.raises(ValueError, match="other shapes than this model's"):
        engine.init_state(0, params=init_params(other, jax.random.key(0)))
    with pytest.raises(ValueError, match="do not fit this model: missing"):
        engine.init_state(0, params={"decoder": {}})


def test_load_params_reads_the_parameters_alone(engine, tmp_path):
    """`load_params`: the same arrays as `load_state(...)["params"]`, cast on request, placed
    by a target tree (checked against the checkpoint), and the missing step named."""
    from flaxformer_lite.training import load_params, load_state

    run(engine, tmp_path, 2)
    directory = tmp_path / "checkpoints"
    step, params = load_params(directory)
    full_step, state = load_state(directory)
    assert step == full_step == 2
    assert max_diff(params, state["params"]) == 0.0
    _, half = load_params(directory, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    abstract = engine.abstract_state().params
    _, placed = load_params(directory, target=abstract)
    assert all(x.sharding == t.sharding for x, t in
               zip(jax.tree.leaves(placed), jax.tree.leaves(abstract), strict=True))
    assert max_diff(placed, params) == 0.0
    with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 7 .* holds steps \[2\]"):
        load_params(directory, step=7)
    with pytest.raises(FileNotFoundError, match="keeps them in"):
        load_params(tmp_path)
    other = jax.eval_shape(lambda: init_params(
        get_config("gpt2", vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=32, num_layers=1,
                   max_len=LENGTH), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"target shapes differ.*load without a target and "
                       r"merge: `merge_params\(new, load_params\(dir\)\[1\]\)\[0\]`"):
        load_params(directory, target=other)
    with pytest.raises(ValueError, match="does not fit the parameters.*merge_params"):
        load_params(directory, target={"decoder": {}})


def test_load_run_reads_config_params_and_tokenizer(engine, tmp_path):
    from flaxformer_lite.data import CharTokenizer
    from flaxformer_lite.training import load_params, load_run

    run(engine, tmp_path, 2, checkpoint_every=1)
    assert load_run(tmp_path).tokenizer is None  # a run of one's own: none saved
    tok = CharTokenizer.from_texts(["some text"])
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_run(tmp_path)
    assert loaded.config == TINY and loaded.step == 2 and loaded.experiment is None
    assert loaded.averaged_steps is None
    assert max_diff(loaded.params, load_params(tmp_path / "checkpoints")[1]) == 0.0
    # average_last: the mean of the last k checkpoints' parameters, and which steps they were
    averaged = load_run(tmp_path, average_last=2)
    assert averaged.step == 2 and averaged.averaged_steps == [1, 2]
    assert averaged.tokenizer.encode("text") == tok.encode("text")
    first, second = (load_params(tmp_path / "checkpoints", s)[1] for s in (1, 2))
    mean = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b)) / 2,
                        first, second)
    assert max_diff(first, second) > 0  # a mean that differs from either checkpoint
    jax.tree.map(lambda x, m: np.testing.assert_allclose(
        np.asarray(x), m.astype(np.float32), rtol=1e-7, atol=0), averaged.params, mean)
    with pytest.raises(ValueError, match=r"last=3, but .* holds 2 checkpoints .*keep_checkpoints"):
        load_run(tmp_path, average_last=3)
    with pytest.raises(ValueError, match="not both"):
        load_run(tmp_path, 1, average_last=2)
    assert loaded.tokenizer.encode("text") == tok.encode("text")
    with pytest.raises(FileNotFoundError, match="is not a train\\(\\) workdir"):
        load_run(tmp_path / "checkpoints")


def _save_params(directory, trees: dict) -> None:
    """Checkpoints holding `{"params": tree}` at each step of `trees` (no model, no compile)."""
    ckpt = Checkpointer(directory, keep=None, async_save=False)
    for step, tree in trees.items():
        assert ckpt.save(step, {"params": tree})
    ckpt.close()


def _np_mean(trees):
    """float64 NumPy mean of parameter trees."""
    return jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0),
                        *trees)


def test_average_params_is_the_float64_mean_of_the_chosen_checkpoints(engine, tmp_path):
    """float32 parameters: the mean rounded once (accumulated in float64); `last` takes the
    newest k; placed by `target`; cast by `dtype`."""
    from flaxformer_lite.training import average_params

    trees = {step: numpy_params(TINY, seed=step) for step in (2, 4, 6, 8)}
    _save_params(tmp_path, trees)

    def check(params, steps):
        want = _np_mean([trees[s] for s in steps])
        jax.tree.map(lambda x, m: np.testing.assert_allclose(
            np.asarray(x), m.astype(np.float32), rtol=1e-7, atol=0), params, want)

    steps, params = average_params(tmp_path, [8, 2, 6])
    assert steps == [2, 6, 8]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert {x.sharding for x in jax.tree.leaves(params)} == {
        jax.sharding.SingleDeviceSharding(jax.local_devices()[0])}
    check(params, [2, 6, 8])
    steps, params = average_params(tmp_path, last=2)
    assert steps == [6, 8]
    check(params, [6, 8])
    steps, params = average_params(tmp_path, last=1)
    assert steps == [8] and max_diff(params, trees[8]) == 0.0
    abstract = engine.abstract_state().params
    _, placed = average_params(tmp_path, last=4, target=abstract)
    assert all(x.sharding == t.sharding for x, t in
               zip(jax.tree.leaves(placed), jax.tree.leaves(abstract), strict=True))
    check(placed, [2, 4, 6, 8])
    _, half = average_params(tmp_path, last=4, dtype=jnp.bfloat16)
    jax.tree.map(lambda x, m: np.testing.assert_array_equal(
        np.asarray(x), m.astype(np.float32).astype(jnp.bfloat16)),
        half, _np_mean(list(trees.values())))


def test_average_params_of_bfloat16_checkpoints_sums_in_float32_or_wider(tmp_path):
    """bfloat16 parameters: averaged exactly, then rounded to bfloat16 (a bfloat16 sum would
    round at every addition); `dtype=float32` keeps the mean's float32 digits."""
    from flaxformer_lite.training import average_params

    trees = {step: jax.tree.map(lambda x: (x * 7).astype(jnp.bfloat16),
                                numpy_params(TINY, seed=step)) for step in (1, 2, 3)}
    _save_params(tmp_path, trees)
    mean = _np_mean(list(trees.values()))
    _, params = average_params(tmp_path, last=3)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda x, m: np.testing.assert_array_equal(
        np.asarray(x), m.astype(np.float32).astype(jnp.bfloat16)), params, mean)
    _, wide = average_params(tmp_path, last=3, dtype=jnp.float32)
    jax.tree.map(lambda x, m: np.testing.assert_allclose(
        np.asarray(x), m.astype(np.float32), rtol=1e-7, atol=0), wide, mean)


def test_average_params_refuses_before_reading_an_array(tmp_path, monkeypatch):
    from flaxformer_lite.training import average_params
    from flaxformer_lite.training import checkpoint as checkpoint_module

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    table = np.arange(4, dtype=np.int32)
    _save_params(tmp_path / "ok", {1: {"w": w, "table": table}, 2: {"w": w + 1, "table": table},
                                   3: {"w": w + 3, "table": table}})
    # integer leaves equal in every checkpoint are kept as they are
    steps, params = average_params(tmp_path / "ok", last=3)
    assert steps == [1, 2, 3]
    np.testing.assert_array_equal(params["table"], table)
    assert params["table"].dtype == np.int32
    np.testing.assert_array_equal(params["w"], ((3 * w.astype(np.float64) + 4) / 3).astype(
        np.float32))

    _save_params(tmp_path / "shape", {1: {"a": w, "b": w}, 2: {"a": w, "b": w.T}})
    _save_params(tmp_path / "tree", {1: {"a": w, "b": w}, 2: {"a": w, "c": w}})
    _save_params(tmp_path / "ints", {1: {"w": w, "table": table},
                                     2: {"w": w, "table": table + 1}})

    def no_reading(*args, **kwargs):
        raise AssertionError("an array was read before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "_read_params", no_reading)
        for kwargs, error, message in [
            (dict(), ValueError, "either steps=.* or last=k, not neither"),
            (dict(steps=[1], last=1), ValueError, "not both"),
            (dict(last=4), ValueError,
             r"last=4, but .* holds 3 checkpoints \(steps \[1, 2, 3\]\): train\(\) keeps "
             r"only the last `keep_checkpoints`.*keep_checkpoints >= 4"),
            (dict(last=0), ValueError, "last=0 must be a whole number >= 1"),
            (dict(steps=[1, 5, 7]), FileNotFoundError,
             r"No checkpoint of steps 5, 7 in .*; it holds steps \[1, 2, 3\]"),
            (dict(steps=[1, 1]), ValueError, r"names step\(s\) \[1\] more than once"),
            (dict(steps=[]), ValueError, "names no checkpoint"),
        ]:
            with pytest.raises(error, match=message):
                average_params(tmp_path / "ok", **kwargs)
        with pytest.raises(ValueError, match="steps 1 and 2 .* differ in shape at b: "
                           r"\(2, 3\) and \(3, 2\)"):
            average_params(tmp_path / "shape", last=2)
        with pytest.raises(ValueError, match="other parameter trees: b is in step 1's, not in "
                           "step 2's"):
            average_params(tmp_path / "tree", [1, 2])
        with pytest.raises(FileNotFoundError, match="No checkpoint in"):
            average_params(tmp_path / "empty", last=1)
    with pytest.raises(ValueError, match="table is not floating point .int32. and differs "
                       "between the checkpoints of steps 1 and 2"):
        average_params(tmp_path / "ints", last=2)


def params_lib_flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree.leaves_with_path(tree)}


def test_an_error_before_the_first_step_waits_for_the_background_compiles(engine, tmp_path):
    """A warm_up that raised left XLA compiling the steps on daemon threads, and the script's
    exit then aborted the process (SIGABRT or SIGSEGV)."""
    def refuse(state, engine):
        raise ValueError("temperature=0.0 must be a finite number > 0")

    with pytest.raises(ValueError, match="temperature"):
        train(TINY, OPT, Batches(), workdir=tmp_path, num_steps=2, hooks=[], engine=engine,
              parallel=ParallelConfig(mode="single"), loss=LOSS, warm_up=refuse,
              eval_data=lambda: [synthetic_batch(9)], eval_every=1)
    assert not engine._train.compiling and not engine._eval.compiling


def test_init_params_beside_a_checkpoint_is_reported(engine, tmp_path, caplog):
    run(engine, tmp_path, 2)
    start = engine.params(engine.init_state(5))
    with caplog.at_level("WARNING"):
        run(engine, tmp_path, 3, init_params=start)
    assert "init_params is not used" in caplog.text
    # A fine-tune's own workdir, rerun with the same call, resumes without the warning.
    caplog.clear()
    run(engine, tmp_path / "tune", 2, init_params=start)
    with caplog.at_level("INFO"):
        run(engine, tmp_path / "tune", 3, init_params=start)
    assert "init_params is not used" not in caplog.text
    assert "The fine-tune resumes from its own checkpoint (step 2)" in caplog.text


def test_parallel_config_refuses_what_it_would_ignore_or_misread():
    """Mesh fields in pmap/single mode were ignored (a fully replicated model, no word), a typo
    in a logical name replicated its arrays silently, a batch rule never changed the input
    layout, and data=0 or fsdp=2.0 failed only when the mesh was built."""
    cases = [
        (dict(mode="pmap", tensor=2), "replicates the model"),
        (dict(mode="single", fsdp=2), "replicates the model"),
        (dict(data=0), "ParallelConfig.data=0 must be an integer >= 1"),
        (dict(fsdp=2.0), "ParallelConfig.fsdp=2.0"),
        (dict(tensor=True), "ParallelConfig.tensor=True"),
        (dict(mode="mesh", axis_rules=(("embd", "fsdp"),)), "name 'embd', which no array"),
        (dict(mode="mesh", axis_rules=(("batch", "data"),)), "batch is always split over"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**kwargs)
    as_lists = [[name, list(axes) if isinstance(axes, tuple) else axes]
                for name, axes in partitioning.DEFAULT_RULES]  # as JSON gives them back
    assert ParallelConfig(mode="pmap", axis_rules=as_lists).mode == "pmap"
    # data= in single/pmap mode: 4-way asked for, the step ran on 1 device (or on all of pmap's)
    n = jax.device_count()
    for mode, data in (("single", 4), ("pmap", n + 1)):
        with pytest.raises(ValueError, match=rf"data={data}\) with mode '{mode}', which runs on"):
            Engine(TINY, OPT, ParallelConfig(mode=mode, data=data), LOSS)
    assert Engine(TINY, OPT, ParallelConfig(mode="pmap", data=n), LOSS).mode == "pmap"


def test_lower_train_step_takes_shapes_alone(engine):
    batch = {k: jax.ShapeDtypeStruct((8, LENGTH), jnp.int32) for k in ("inputs", "targets")}
    assert engine.lower_train_step(batch).compile().cost_analysis()["flops"] > 0


def test_device_params_are_the_state_params_on_device(engine):
    state = engine.init_state(0)
    on_device = engine.device_params(state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device))
    assert max_diff(on_device, engine.params(state)) == 0.0


def test_dimensions_a_mesh_does_not_divide_are_listed():
    """They are replicated (documented); `undivided` names them, and the Engine warns."""
    mesh = jax.sharding.AbstractMesh((1, 1, 4), partitioning.MESH_AXES)
    cfg = TINY.replace(num_heads=2, d_ff=34)  # heads 2 and d_ff 34 do not split 4 ways
    from flaxformer_lite.training import param_logical_specs

    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    found = partitioning.undivided(param_logical_specs(cfg), shapes, mesh)
    assert any("mlp/wi/kernel: dim 1 (34) over ('tensor',) = 4" in f for f in found)
    assert any("qkv/kernel: dim 2 (2)" in f for f in found)
    mesh = jax.sharding.AbstractMesh((1, 2, 4), partitioning.MESH_AXES)
    rules = tuple((name, ("fsdp", "tensor")) if name == "mlp" else (name, axes)
                  for name, axes in partitioning.DEFAULT_RULES)
    found = partitioning.undivided(param_logical_specs(cfg), shapes, mesh, rules)
    assert any("mlp/wi/bias: dim 0 (34) over ('fsdp', 'tensor') = 8, split over 'fsdp' only"
               in f for f in found)
    assert partitioning.undivided(param_logical_specs(TINY), jax.eval_shape(
        lambda: nn.meta.unbox(init_params(TINY, jax.random.key(0)))), mesh) == []


# ---- a model of the user's own -------------------------------------------------------------------

class PrefixLM(nn.Module):
    """A research model: a prefix-LM (bidirectional over each row's first `prefix_lengths`
    tokens, causal after) from the library's layers plus a plain `nn.Dense` (no logical axis
    names) and its own dropout, reading a batch entry the library does not know."""

    config: object
    extra_batch_keys = ("prefix_lengths",)

    @nn.compact
    def __call__(self, inputs, *, segment_ids=None, positions=None, prefix_lengths=None,
                 deterministic=True):
        from flaxformer_lite import layers, ops

        cfg = self.config
        n = inputs.shape[1]
        prefix = jnp.zeros((inputs.shape[0],), jnp.int32) if prefix_lengths is None else (
            prefix_lengths)
        seen = (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None])[None] | (
            jnp.arange(n)[None, None, :] < prefix[:, None, None])
        mask = seen[:, None] & ops.padding_mask(inputs)
        embed = layers.Embed(cfg.vocab_size, cfg, token_table=True, name="token_embed")
        x = embed(inputs) + layers.Embed(cfg.max_len, cfg, name="position_embed")(
            jnp.arange(n)[None])
        x = x + layers.MultiHeadAttention(cfg)(layers.Norm(cfg)(x), mask=mask)
        x = x + nn.Dense(cfg.d_model, name="plain_mlp")(layers.Norm(cfg)(x))
        x = nn.Dropout(0.5)(x, deterministic=deterministic)
        return embed.attend(layers.Norm(cfg)(x)).astype(jnp.float32)


class _TokenClassifier(nn.Module):
    """An encoder-only model of the user's own: 3 classes at every position."""

    config: object
    out: str = "logits"

    @nn.compact
    def __call__(self, inputs, *, mlm_positions=None, deterministic=True, **unused):
        h = nn.Embed(self.config.vocab_size, 8)(inputs)
        return {self.out: nn.Dense(3)(h)}


def test_an_encoder_model_of_your_own_is_told_what_logits_the_loss_wants():
    """Logits at every position while the loss reads mlm_predictions=k of them failed in a
    broadcast inside the loss; a model returning no "logits" was told to set mlm_head."""
    from flaxformer_lite import TransformerConfig
    from flaxformer_lite.training import steps

    cfg = TransformerConfig(architecture="encoder_only", mlm_head=True, mlm_predictions=2,
                            vocab_size=16, d_model=8, num_heads=2, d_ff=16, num_layers=1,
                            max_len=8)
    inputs = jnp.ones((2, 8), jnp.int32)
    batch = {"inputs": inputs, "targets": inputs.at[:, 3:].set(0)}
    model = _TokenClassifier(cfg)
    params = model.init(jax.random.key(0), inputs)["params"]
    with pytest.raises(ValueError, match=r"returned logits of shape \(2, 8, 3\) for targets "
                       r"\(2, 2\).*mlm_predictions=2 positions.*mlm_predictions=0"):
        steps.predictions(model, params, batch)
    logits, targets = steps.predictions(_TokenClassifier(cfg.replace(mlm_predictions=0)),
                                        params, batch)
    assert logits.shape == (2, 8, 3) and targets.shape == (2, 8)
    with pytest.raises(ValueError, match=r"a model of your own returns them as \{\"logits\""):
        steps.predictions(_TokenClassifier(cfg.replace(mlm_predictions=0), out="scores"),
                          params, batch)


@pytest.mark.parametrize("mode", ["single", "mesh"])
def test_a_model_of_your_own_trains_with_the_engine_and_train(tmp_path, mode):
    """`Engine(model=...)` / `train(model=...)`: the user's module is initialised, laid out
    (parameters without axis names replicated), fed its own batch entry, run with dropout in
    the train step although the config's rates are 0, and recorded in config.json."""
    from flaxformer_lite.training import load_run, steps

    model = PrefixLM(TINY)
    parallel = ParallelConfig(mode=mode) if mode == "single" else ParallelConfig(
        mode="mesh", data=1, fsdp=1, tensor=1)
    engine = Engine(TINY, OPT, parallel, model=model)
    state = engine.init_state(0)
    assert "plain_mlp" in state.params and steps.uses_dropout(model)
    assert not steps.uses_dropout(make_model(TINY))  # the library's: by the config's rates
    batch = dict(synthetic_batch(0), prefix_lengths=np.full((8,), 6, np.int32))
    shard = engine.shard_batch(batch)
    assert set(shard) == {"inputs", "targets", "prefix_lengths"}
    with_prefix = engine.metrics_to_host(engine.eval_step(state, shard))["loss"]
    without = engine.metrics_to_host(engine.eval_step(state, engine.shard_batch(
        synthetic_batch(0))))["loss"]
    assert with_prefix != without  # the entry reached the model
    # Dropout in the train step (rates 0 in the config): its loss is not the eval loss.
    _, metrics = engine.train_step(state, shard)
    assert abs(engine.metrics_to_host(metrics)["loss"] - with_prefix) > 1e-3 * with_prefix
    with pytest.raises(ValueError, match="the model's `config` must equal model_config"):
        Engine(TINY.replace(d_model=64), OPT, model=model)

    data = [dict(synthetic_batch(i), prefix_lengths=np.full((8,), 4, np.int32))
            for i in range(3)]
    result = train(TINY, OPT, data, workdir=tmp_path, num_steps=3, model=model, hooks=[],
                   parallel=parallel)
    assert result.step == 3
    run = load_run(tmp_path)
    assert run.module.endswith("test_training.PrefixLM") and run.config == TINY
    assert set(run.params) == set(state.params)
    with pytest.raises(Exception, match="model.module"):  # a rerun with the library's model
        train(TINY, OPT, data, workdir=tmp_path, num_steps=4, hooks=[], parallel=parallel)


def test_config_json_describes_the_steps_it_trained(engine, tmp_path, caplog):
    """A finished run's rerun with other settings used to rewrite config.json (it trained
    nothing); a resumed run's earlier steps now stay described in config_history.jsonl; the
    seed, length, versions and devices are recorded; experiment values keep their types."""
    import argparse
    import json

    def record():
        return json.loads((tmp_path / "config.json").read_text())

    def history():
        return [json.loads(line) for line in
                (tmp_path / "config_history.jsonl").read_text().splitlines()]

    experiment = argparse.Namespace(batch=8, rate=np.float32(0.25), missing=float("nan"),
                                    betas=[0.9, float("nan")])
    run(engine, tmp_path, 2, experiment=experiment, seed=3)
    first = record()
    assert {k: v for k, v in first["experiment"].items() if k in ("batch", "rate")} == {
        "batch": 8, "rate": 0.25} and math.isnan(first["experiment"]["missing"])
    assert first["run"]["seed"] == 3 and first["run"]["num_steps"] == 2
    assert first["run"]["versions"]["jax"] == jax.__version__
    assert first["run"]["devices"] == 1 and first["run"]["backend"] == jax.default_backend()
    assert [h["step"] for h in history()] == [0]

    caplog.clear()
    run(engine, tmp_path, 2, experiment=vars(experiment) | {"batch": 4}, seed=3)
    assert record() == first and len(history()) == 1
    assert "trains nothing: the record is left as it was" in caplog.text
    assert "missing" not in caplog.text and "betas" not in caplog.text  # NaN == NaN here

    run(engine, tmp_path, 4, experiment=experiment, seed=5)
    assert record()["run"]["seed"] == 5
    later = history()[-1]
    assert later["step"] == 2 and later["record"] == record()
    assert "run.seed: 3 -> 5" in later["changed"] and "run.num_steps: 2 -> 4" in later["changed"]
    assert history()[0]["record"] == first
    with pytest.raises(ValueError, match=r"train\(experiment=...\) must be a mapping"):
        run(engine, tmp_path / "b", 2, experiment=3)
    # A workdir from before the history: its record comes first, of unknown start.
    (tmp_path / "config_history.jsonl").unlink()
    before = record()
    run(engine, tmp_path, 6, experiment=experiment, seed=5)
    assert [(h["step"], h["record"] == before) for h in history()] == [(None, True), (4, False)]
    (tmp_path / "config_history.jsonl").unlink()
    run(engine, tmp_path, 6, experiment=experiment, seed=5)  # nothing to train: no record
    assert not (tmp_path / "config_history.jsonl").exists()
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # resumes at 4 with the same settings
    run(engine, tmp_path, 6, experiment=experiment, seed=5)
    assert [h["step"] for h in history()] == [None]  # the old record alone, no repeat
    # A record from before the library gained a field: at its default now, nothing changed;
    # a recorded field missing with another value than the default is still named.
    older = record()
    del older["model"]["eos_id"], older["model"]["pad_id"], older["loss"]["z_loss"]
    del older["model"]["num_layers"]  # TINY has 1, the default is 4
    del older["run"]["backend"]  # a fact the record gained
    (tmp_path / "config.json").write_text(json.dumps(older))
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    caplog.clear()
    # A script's new settings at an unset value (or, under "model.", the config default).
    script = vars(experiment) | {"average_last": 0, "model": {"eos_id": None, "num_layers": 1}}
    run(engine, tmp_path, 6, experiment=script, seed=5)
    assert history()[-1]["changed"] == ["model.num_layers: (not recorded) -> 1",
                                        "experiment.model.num_layers: (not recorded) -> 1"]
    assert "eos_id" not in caplog.text and "z_loss" not in caplog.text
    assert "backend" not in caplog.text and "average_last" not in caplog.text


class _SowingExperts(nn.Module):
    """A feed-forward with a router that sows an auxiliary loss into "losses": a mean over the
    positions of the slice it sees (so it depends on the data)."""

    config: object
    residual_layers: int = 0

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        from flaxformer_lite import layers

        gate = jax.nn.sigmoid(nn.Dense(1, name="router")(x))
        self.sow("losses", "balance", 0.1 * jnp.mean(gate))
        return layers.FeedForward(self.config, self.residual_layers, name="expert")(x) * gate


@pytest.mark.parametrize("scan", [False, True])
def test_sown_auxiliary_losses_join_the_objective(scan):
    """Values sown into "losses" are added to the objective: the update is SGD on the
    cross-entropy mean plus them over the whole batch, with or without micro-batches (each
    slice weighs its mean by its share of the rows), reported as aux_loss; scanned layers'
    values reach the step too (they were dropped by the scan)."""
    from flaxformer_lite import DecoderOnly, TransformerLayer, unstack_layers
    from flaxformer_lite.training import steps

    class Layer(TransformerLayer):
        ffn_cls: object = _SowingExperts

    config = TINY.replace(num_layers=2, scan_layers=scan)
    model = DecoderOnly(config, layer_cls=Layer)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0).items()}
    params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
    tx = optax.sgd(1.0)
    state = manual_state(params, tx)

    def objective(p, model=model):
        logits, sown = model.apply({"params": p}, batch["inputs"], mutable=["losses"])
        sums = metric_sums(logits, batch["targets"])
        aux = sum(jnp.sum(x) for x in jax.tree.leaves(sown))
        return sums["loss"] / sums["tokens"] + aux, aux

    grads, aux = jax.grad(objective, has_aux=True)(params)
    want = jax.tree.map(lambda p, g: p - g, params, grads)
    for k in (1, 2):
        new, metrics = jax.jit(functools.partial(
            train_step, model=model, tx=tx, microbatches=k))(state, batch)
        assert max_diff(new.params, want) < 1e-6, k
        assert summarize(jax.device_get(metrics))["aux_loss"] == pytest.approx(float(aux),
                                                                               rel=1e-5)
    assert float(aux) > 0 and steps.uses_dropout(model)
    if scan:  # the same value as the unscanned model's, layer by layer
        plain = DecoderOnly(config.replace(scan_layers=False), layer_cls=Layer)
        _, plain_aux = objective(unstack_layers(params), plain)
        assert float(plain_aux) == pytest.approx(float(aux), rel=1e-6)


# ---- an objective of the user's own ----------------------------------------------------------

def cross_entropy_loss(model, params, batch, *, deterministic, dropout_rng):
    """The built-in objective (LOSS's label smoothing) written as a `loss_fn`."""
    from flaxformer_lite.training import steps

    logits, targets = steps.predictions(model, params, batch, deterministic=deterministic,
                                        dropout_rng=dropout_rng)
    return metric_sums(logits, targets, steps.target_weights(model, batch, targets),
                       label_smoothing=LOSS.label_smoothing)


def test_a_loss_fn_equal_to_the_cross_entropy_reproduces_the_built_in_run(tmp_path):
    """`loss_fn=`: the same losses, metrics and parameters after 2 steps as the built-in
    objective (the gradient of the loss sum divided by the token count after the sums, not
    before: float rounding), with 2 micro-batches too, and its eval sums are the eval step's."""
    single = ParallelConfig(mode="single")
    params = numpy_params(TINY)
    batches = [synthetic_batch(i) for i in range(2)]
    runs = {}
    for name, kw in (("built-in", {}), ("custom", {"loss_fn": cross_entropy_loss}),
                     ("micro", {"loss_fn": cross_entropy_loss})):
        parallel = single.replace(microbatches=2) if name == "micro" else single
        engine = Engine(TINY, OPT, parallel, LOSS, **kw)
        state = engine.init_state(0, params=params)
        metrics = []
        for batch in batches:
            state, m = engine.train_step(state, batch)
            metrics.append(engine.metrics_to_host(m))
        runs[name] = (engine.params(state), metrics,
                      engine.metrics_to_host(engine.eval_step(state, batches[0])))
    reference, ref_metrics, ref_eval = runs["built-in"]
    assert max_diff(reference, params) > 1e-3
    for name in ("custom", "micro"):
        got, got_metrics, got_eval = runs[name]
        assert max_diff(reference, got) < 1e-5, name  # Adam: updates ~3e-3 a step
        for a, b in zip(ref_metrics, got_metrics):
            assert set(a) == set(b)
            for key in ("loss", "nll", "correct", "tokens", "sequences", "grad_norm"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
        for key in ("loss", "nll", "tokens"):
            np.testing.assert_allclose(got_eval[key], ref_eval[key], rtol=1e-5)


class PolicyAndReference(nn.Module):
    """Two copies of a decoder-only LM: `policy` (called by the steps' default call) and
    `reference` (initialised alongside, read by the DPO loss)."""

    config: object

    def setup(self):
        from flaxformer_lite.models import DecoderOnly

        self.policy = DecoderOnly(self.config)
        self.reference = DecoderOnly(self.config)

    def __call__(self, inputs, *, segment_ids=None, positions=None, deterministic=True):
        if self.is_initializing():
            self.reference(inputs, deterministic=True)
        return self.policy(inputs, segment_ids=segment_ids, positions=positions,
                           deterministic=deterministic)


def dpo_loss(model, params, batch, *, deterministic, dropout_rng, beta=0.1):
    """DPO (Rafailov et al., 2023): the chosen completions are `inputs`/`targets` with
    `loss_weights` on their completion tokens, the rejected ones `rejected_*`. Sums over the
    pairs: `loss`, `tokens` (pairs; 0 for padding rows), `correct` (pairs ranked right)."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}

    def logp(copy, inputs, targets, weights):
        logits = model.apply({"params": params}, inputs, rngs=rngs, method=lambda m, x: getattr(
            m, copy)(x, deterministic=deterministic if copy == "policy" else True))
        token = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return (token * weights).sum(-1)

    chosen = (batch["inputs"], batch["targets"], batch["loss_weights"])
    rejected = (batch["rejected_inputs"], batch["rejected_targets"], batch["rejected_weights"])
    margin = beta * ((logp("policy", *chosen) - logp("reference", *chosen))
                     - (logp("policy", *rejected) - logp("reference", *rejected)))
    pairs = (batch["loss_weights"].sum(-1) > 0).astype(jnp.float32)
    return {"loss": -(jax.nn.log_sigmoid(margin) * pairs).sum(), "tokens": pairs.sum(),
            "correct": ((margin > 0) * pairs).sum()}


def preference_batch(index, rows=8, prompt=4):
    chosen, rejected = synthetic_batch(index, rows, pad=False), synthetic_batch(index + 50, rows)
    rejected["inputs"][:, :prompt] = chosen["inputs"][:, :prompt]  # the same prompts
    weights = (np.arange(LENGTH)[None, :] >= prompt - 1).astype(np.float32)  # completions
    return {**chosen, "loss_weights": np.repeat(weights, rows, 0),
            "rejected_inputs": rejected["inputs"], "rejected_targets": rejected["targets"],
            "rejected_weights": weights * (rejected["targets"] != 0)}


def test_a_dpo_loss_trains_the_policy_against_a_frozen_reference(tmp_path):
    """A DPO `loss_fn` on a model holding two copies: the reference frozen (`trainable=`,
    bitwise unchanged), the policy trained; its extra batch entries reach it; at the start
    (policy = reference) the loss is log 2; 2 micro-batches give the same step; `train()`
    runs it and records it, and a rerun without it is told."""
    model = PolicyAndReference(TINY)
    keys = ("rejected_inputs", "rejected_targets", "rejected_weights")
    base = numpy_params(TINY)
    params = {"policy": base, "reference": base}

    def policy(path):
        return path.startswith("policy/")

    out = {}
    for k in (1, 2):
        engine = Engine(TINY, OPT, ParallelConfig(mode="single", microbatches=k), model=model,
                        trainable=policy, loss_fn=dpo_loss, loss_batch_keys=keys)
        state = engine.init_state(0, params=params)
        assert set(engine.shard_batch(preference_batch(0))) == {
            "inputs", "targets", "loss_weights", *keys}
        state, m = engine.train_step(state, preference_batch(0))
        first = engine.metrics_to_host(m)
        state, m = engine.train_step(state, preference_batch(1))
        out[k] = engine.params(state), first, engine.metrics_to_host(m)
    trained, first, second = out[1]
    assert first["tokens"] == 8 and first["loss"] / first["tokens"] == pytest.approx(
        math.log(2), abs=1e-6)
    assert second["loss"] / second["tokens"] != pytest.approx(math.log(2), abs=1e-4)
    assert max_diff(trained["reference"], base) == 0.0
    assert max_diff(trained["policy"], base) > 1e-3
    assert max_diff(trained["policy"], out[2][0]["policy"]) < 1e-6
    np.testing.assert_allclose(out[2][2]["loss"], second["loss"], rtol=1e-5)
    summary = summarize(second)
    assert 0 <= summary["accuracy"] <= 1 and "perplexity" not in summary
    # Without the declaration the entries are dropped before the step: a KeyError at trace.
    bare = Engine(TINY, OPT, ParallelConfig(mode="single"), model=model, loss_fn=dpo_loss)
    with pytest.raises(KeyError, match="rejected_inputs"):
        bare.train_step(bare.init_state(0, params=params), preference_batch(0))
    result = train(TINY, OPT, [preference_batch(i) for i in range(2)], workdir=tmp_path,
                   num_steps=2, hooks=[], model=model, trainable=policy, init_params=params,
                   loss_fn=dpo_loss, loss_batch_keys=keys, log_every=1)
    assert result.history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[-1]["train/tokens"] == 8
    recorded = json.loads((tmp_path / "config.json").read_text())["loss"]["loss_fn"]
    assert recorded.endswith("test_training.dpo_loss")


def test_loss_fn_misuse_is_named():
    single = ParallelConfig(mode="single")
    with pytest.raises(ValueError, match="names batch entries for a loss_fn, but there is none"):
        Engine(TINY, OPT, single, loss_batch_keys=("advantages",))
    with pytest.raises(TypeError, match="loss_batch_keys='advantages'"):
        Engine(TINY, OPT, single, loss_fn=cross_entropy_loss, loss_batch_keys="advantages")

    def mean_only(model, params, batch, **kw):
        return {"loss": jnp.mean(model.apply({"params": params}, batch["inputs"]))}

    def per_row(model, params, batch, **kw):
        return {"loss": jnp.zeros(batch["inputs"].shape[0]), "tokens": jnp.float32(1)}

    for fn, match in ((mean_only, r"returned \['loss'\]; it returns a dict of scalar sums"),
                      (per_row, r"'loss' of shape \(8,\).*every value is a float scalar")):
        engine = Engine(TINY, OPT, single, loss_fn=fn)
        with pytest.raises(ValueError, match=match):
            engine.train_step(engine.init_state(0), synthetic_batch(0))
    with pytest.raises(ValueError, match=r"'advantages' has shape \(3,\), but the batch has 8"):
        Engine(TINY, OPT, single, loss_fn=cross_entropy_loss,
               loss_batch_keys=("advantages",)).shard_batch(
            {**synthetic_batch(0), "advantages": np.zeros(3, np.float32)})


def test_resume_records_the_global_batch_and_a_refused_first_batch_keeps_the_record(
        engine, tmp_path, caplog):
    """A resume with another global batch is named, with the route that keeps the update
    (ParallelConfig(microbatches=k)); a resume refused at its first batch leaves config.json
    and config_history.jsonl as the run that trained left them."""
    def record():
        return json.loads((tmp_path / "config.json").read_text())

    run(engine, tmp_path, 2)
    assert record()["run"]["global_batch"] == 8
    before = (record(), (tmp_path / "config_history.jsonl").read_text())

    class Bad(Batches):  # rows the model refuses: longer than max_len
        def __next__(self):
            batch = super().__next__()
            return {k: np.concatenate([v, v], axis=1) for k, v in batch.items()}

    with pytest.raises((ValueError, TypeError)):
        run(engine, tmp_path, 4, data=Bad(), seed=7)
    assert (record(), (tmp_path / "config_history.jsonl").read_text()) == before

    class Half(Batches):
        def __next__(self):
            return {k: v[:4] for k, v in super().__next__().items()}

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(engine, tmp_path, 4, data=Half())
    assert "global batch changes from 8 to 4 rows at step 2" in caplog.text
    assert "ParallelConfig(microbatches=k)" in caplog.text
    assert record()["run"]["global_batch"] == 4
    assert "run.global_batch: 8 -> 4" in json.loads(
        (tmp_path / "config_history.jsonl").read_text().splitlines()[-1])["changed"]


def test_data_position_restores_from_every_process_state(tmp_path, caplog):
    """train()'s restore hands a pipeline the states of all the processes of the saving run,
    so a run saved by 2 processes resumes on 1 exactly (no skipping, no warning), while an
    iterator whose state is not in global terms is skipped with a warning that says the
    order may then differ."""
    from flaxformer_lite import data as fd
    from flaxformer_lite.training.checkpoint import iterator_state
    from flaxformer_lite.training.trainer import _restore_position

    tok = fd.ByteTokenizer()
    examples = [{"text": f"x{i:03d}"} for i in range(48)]

    def pipe(shard):
        return fd.lm_pipeline(examples, tok, batch_size=8, max_len=8, pack=False,
                              shard=shard, prefetch=0)

    reference = list(itertools.islice(iter(pipe((0, 1))), 8))
    its = [iter(pipe((i, 2))) for i in range(2)]
    for _ in range(3):
        for it in its:
            next(it)
    peers = [{"batches": 3, "iterator": iterator_state(it)} for it in its]
    resumed = iter(pipe((0, 1)))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _restore_position(resumed, None, 3, json.loads(json.dumps(peers)))
    assert "skipping" not in caplog.text
    for want in reference[3:]:
        got = next(resumed)
        assert all((got[k] == want[k]).all() for k in want)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _restore_position(Batches(), None, 3, [{"batches": 3, "iterator": None}] * 2)
    assert "saved by 2 processes" in caplog.text and "repeated or skipped" in caplog.text


def test_changed_accumulation_names_microbatches(engine, tmp_path):
    run(engine, tmp_path, 2)
    with pytest.raises(RuntimeError, match=r"ParallelConfig\(microbatches=k\)") as error:
        train(TINY, dataclasses.replace(OPT, accumulation_steps=2), Batches(),
              workdir=tmp_path, num_steps=4, parallel=ParallelConfig(mode="single"), loss=LOSS,
              hooks=[])
    assert error.value.__cause__ is None and "partial_restore" not in str(error.value)


def test_param_shardings_in_every_mode():
    """`Engine.param_shardings` exists in every mode (it was the mesh's alone): a tree like the
    params, where `jax.device_put` lays out a frozen copy as the trained one is laid out; in
    "pmap" the replicated layout of `abstract_state()`, which `generate` reads."""
    from flaxformer_lite import decoding

    params = nn.meta.unbox(init_params(TINY, jax.random.key(0)))
    for mode in ("single", "pmap"):
        eng = Engine(TINY, OPT, ParallelConfig(mode=mode), LOSS)
        shardings = eng.param_shardings
        assert jax.tree.structure(shardings) == jax.tree.structure(params)
        abstract = eng.abstract_state().params
        assert jax.tree.leaves(shardings) == [x.sharding for x in jax.tree.leaves(abstract)]
        ref = jax.device_put(params, shardings)
        assert [x.sharding for x in jax.tree.leaves(ref)] == jax.tree.leaves(shardings)
        out = decoding.generate(eng.model, ref, np.array([[5, 6, 7]], np.int32),
                                max_new_tokens=2, greedy=True, stop_tokens=())
        assert out.tokens.shape == (1, 2)
