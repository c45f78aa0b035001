"""Engine-level runs in their own process (the device count is fixed at JAX start-up).

    equivalence --devices 8 --out DIR   3 steps on the same global batches (the third as device
                                        arrays) in "single", "pmap",
                                        "mesh" (data=2, fsdp=2, tensor=2) and "mesh_micro" (the
                                        same mesh, 2 micro-batches per step, and the output
                                        head, whose vocabulary is split over `tensor`,
                                        multiplied padded); writes
                                        DIR/<mode>.npz (params) and DIR/<mode>.json (losses
                                        and eval sums on a 5-row batch),
                                        DIR/init.npz (the initial params), then saves the mesh
                                        state to DIR/ckpt and records the loss of a 4th step in
                                        DIR/next.json; DIR/collectives.json counts the
                                        collectives of the compiled data-parallel step (data=8)
                                        with the whole batch and with 2 micro-batches;
                                        DIR/flops.json the per-device FLOPs of the step on one
                                        device and on a (data=2, tensor=4) mesh, with q/k/v in
                                        one projection and with q apart from k/v.
    weights --devices 2 --out DIR       2 steps on batches with float `loss_weights` (and a
                                        5-row eval batch) in "single", "pmap", "mesh" (data=2)
                                        and "mesh_micro" (data=2, 2 micro-batches); writes
                                        DIR/<mode>.npz (params) and DIR/<mode>.json; the same
                                        with a `loss_fn` reading a batch entry of its own
                                        (`row_scale`), as DIR/custom_<mode>.*.
    restore --devices N --mode M --ckpt DIR/ckpt --out FILE
                                        restores that checkpoint onto N devices in mode M,
                                        writes the params to FILE.npz and the 4th step's loss
                                        to FILE.json (and whether `load_state` agrees, also as
                                        `init_state(params=...)` in mode M).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# `experiments/mesh_report.py` reads compiled steps (FLOPs, collectives) for these checks too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))


def tiny_config(**changes):
    from flaxformer_lite import get_config

    return get_config("gpt2", vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                      max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0, **changes)


def global_batches(n: int, batch: int = 8, length: int = 16, vocab: int = 64):
    """`n` batches with uneven padding, so per-device token counts differ."""
    import numpy as np

    rng = np.random.RandomState(0)
    out = []
    for i in range(n):
        tokens = rng.randint(4, vocab, size=(batch, length + 1))
        tokens[i % batch, length // 2:] = 0
        tokens[(3 * i + 1) % batch, 3:] = 0
        out.append({"inputs": tokens[:, :-1].astype(np.int32),
                    "targets": tokens[:, 1:].astype(np.int32)})
    return out


def flatten(tree):
    import jax
    import numpy as np

    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree.leaves_with_path(tree)}


def compiled_collectives(engine, batch) -> dict[str, int]:
    """Collective ops in the compiled train step, by kind (from the optimized HLO text)."""
    import collections

    from mesh_report import collective_ops

    text = engine.lower_train_step(batch).compile().as_text()
    return dict(collections.Counter(kind for kind, _ in collective_ops(text)))


def compiled_flops(engine, batch) -> float:
    """XLA's count of the compiled train step's floating-point operations on one device."""
    from mesh_report import step_cost

    return step_cost(engine.lower_train_step(batch).compile())["flops"]


def make_engine(mode: str, trainable=None, **model_changes):
    from flaxformer_lite.training import Engine, LossConfig, OptimizerConfig, ParallelConfig

    optimizer = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, clip_norm=1.0,
                                warmup_steps=2)
    parallel = {"single": ParallelConfig(mode="single"),
                "pmap": ParallelConfig(mode="pmap"),
                "mesh": ParallelConfig(mode="mesh", data=2, fsdp=2, tensor=2),
                "mesh4": ParallelConfig(mode="mesh", data=1, fsdp=2, tensor=2),
                "mesh_micro": ParallelConfig(mode="mesh", data=2, fsdp=2, tensor=2,
                                             microbatches=2),
                "data8": ParallelConfig(mode="mesh", data=8),
                "data8_micro": ParallelConfig(mode="mesh", data=8, microbatches=2),
                "tensor4": ParallelConfig(mode="mesh", data=2, tensor=4)}[mode]
    # "mesh_micro" also pads the head (64 columns, 32 per tensor shard, multiplied as 96): one
    # more compiled mesh program would cost the suite ~15 s, and either change alone breaking
    # its equality with the single device fails the test.
    model = tiny_config(vocab_pad_multiple=48 if mode == "mesh_micro" else 0, **model_changes)
    return Engine(model, optimizer, parallel, LossConfig(label_smoothing=0.1),
                  trainable=trainable)


def run_equivalence(out: str) -> None:
    import jax
    import numpy as np

    from flaxformer_lite.training import Checkpointer

    batches = global_batches(4)
    for mode in ("single", "pmap", "mesh", "mesh_micro"):
        engine = make_engine(mode)
        state = engine.init_state(0)
        if mode == "single":
            np.savez(os.path.join(out, "init.npz"), **flatten(engine.params(state)))
        losses = []
        for i, batch in enumerate(batches[:3]):
            if i == 2:  # a batch already on a device is laid out from there
                batch = jax.tree.map(jax.numpy.asarray, batch)
            state, metrics = engine.train_step(state, batch)
            m = engine.metrics_to_host(metrics)
            losses.append(m["loss"] / m["tokens"])
        host = flatten(engine.params(state))
        np.savez(os.path.join(out, f"{mode}.npz"), **host)
        on_devices = flatten(engine.device_params(state))  # what the samplers get
        assert sorted(on_devices) == sorted(host) and all(
            np.array_equal(on_devices[k], host[k]) for k in host), mode
        # 5 eval rows: padded with empty rows to fill 8 (pmap) or 4 (mesh) batch shards.
        odd = {k: v[:5] for k, v in global_batches(5)[4].items()}
        evaluated = engine.metrics_to_host(engine.eval_step(state, odd))
        with open(os.path.join(out, f"{mode}.json"), "w") as f:
            json.dump({"losses": losses, "describe": engine.describe(),
                       "eval": {k: float(v) for k, v in evaluated.items()}}, f)
        if mode == "mesh":
            ckpt = Checkpointer(os.path.join(out, "ckpt"))
            ckpt.save(3, engine.to_checkpoint(state), data_state={"batches": 3})
            ckpt.close()
            _, metrics = engine.train_step(state, batches[3])
            m = engine.metrics_to_host(metrics)
            with open(os.path.join(out, "next.json"), "w") as f:
                json.dump({"loss": m["loss"] / m["tokens"]}, f)
    # Frozen parameters: the last layer and the final norm trained, on one device and a mesh.
    def top(path):
        return "/layer_1/" in path or "final_norm" in path

    for mode in ("single", "mesh"):
        engine = make_engine(mode, trainable=top)
        state = engine.init_state(0)
        for batch in batches[:2]:
            state, _ = engine.train_step(state, batch)
        np.savez(os.path.join(out, f"trainable_{mode}.npz"), **flatten(engine.params(state)))
    # Sequence parallelism on CPU: the attention fast path cannot compile it (XLA's
    # "unsupported reduction"); named when the Engine is built.
    from flaxformer_lite.training import Engine, OptimizerConfig, ParallelConfig, partitioning

    rules = tuple((n, "tensor" if n == "length" else a) for n, a in partitioning.DEFAULT_RULES)
    try:
        Engine(tiny_config(), OptimizerConfig(), ParallelConfig(mode="mesh", data=2, fsdp=2,
                                                                tensor=2, axis_rules=rules))
        refused = ""
    except ValueError as error:
        refused = str(error)
    with open(os.path.join(out, "length_rule.json"), "w") as f:
        json.dump({"error": refused}, f)
    # Micro-batch i takes rows i, i + k, ... of each device's rows: no data moves between
    # devices, so slicing must not add collectives (contiguous slices would).
    rows16 = global_batches(1, batch=16)[0]
    with open(os.path.join(out, "collectives.json"), "w") as f:
        json.dump({mode: compiled_collectives(make_engine(mode), rows16)
                   for mode in ("data8", "data8_micro")}, f)
    with open(os.path.join(out, "flops.json"), "w") as f:
        json.dump({f"{mode}/{'fused' if fused else 'separate'}":
                   compiled_flops(make_engine(mode, fused_qkv=fused), rows16)
                   for mode in ("single", "tensor4") for fused in (True, False)}, f)


def weighted_batches(n: int, batch: int = 8):
    """`global_batches` with float `loss_weights`: 0 on each row's first targets (a prompt),
    in [0.25, 2] elsewhere, so the devices' weight sums differ."""
    import numpy as np

    rng = np.random.RandomState(1)
    out = []
    for b in global_batches(n, batch=batch):
        weights = rng.uniform(0.25, 2.0, b["targets"].shape).astype(np.float32)
        weights[np.arange(weights.shape[1])[None, :] < rng.randint(1, 9, (batch, 1))] = 0.0
        out.append({**b, "loss_weights": weights})
    return out


def scaled_loss(model, params, batch, *, deterministic, dropout_rng):
    """A `loss_fn`: cross-entropy with each row's weights times its `row_scale` [batch]."""
    from flaxformer_lite.training import metric_sums, steps

    logits, targets = steps.predictions(model, params, batch, deterministic=deterministic,
                                        dropout_rng=dropout_rng)
    weights = steps.target_weights(model, batch, targets)
    sums = metric_sums(logits, targets, weights * batch["row_scale"][:, None])
    return {**sums, "tokens": weights.sum()}


def run_weights(out: str) -> None:
    from flaxformer_lite.training import Engine, LossConfig, OptimizerConfig, ParallelConfig

    layouts = {"single": ParallelConfig(mode="single"), "pmap": ParallelConfig(mode="pmap"),
               "mesh": ParallelConfig(mode="mesh", data=2),
               "mesh_micro": ParallelConfig(mode="mesh", data=2, microbatches=2)}
    import numpy as np

    batches = weighted_batches(3)
    for i, batch in enumerate(batches):
        batch["row_scale"] = np.linspace(0.5, 2.0, 8, dtype=np.float32)[::(-1) ** i]
    odd = {k: v[:5] for k, v in batches[2].items()}
    runs = [(mode, parallel, {}) for mode, parallel in layouts.items()] + [
        (f"custom_{mode}", parallel, {"loss_fn": scaled_loss, "loss_batch_keys": ("row_scale",)})
        for mode, parallel in layouts.items()]
    for mode, parallel, custom in runs:
        engine = Engine(tiny_config(pad_id=None), OptimizerConfig(learning_rate=1e-3),
                        parallel, LossConfig(label_smoothing=0.1), **custom)
        state = engine.init_state(0)
        losses = []
        for batch in batches[:2]:
            state, metrics = engine.train_step(state, batch)
            m = engine.metrics_to_host(metrics)
            losses.append([m["loss"], m["tokens"]])
        np.savez(os.path.join(out, f"{mode}.npz"), **flatten(engine.params(state)))
        evaluated = engine.metrics_to_host(engine.eval_step(state, odd))
        with open(os.path.join(out, f"{mode}.json"), "w") as f:
            json.dump({"losses": losses, "eval": {k: float(v) for k, v in evaluated.items()},
                       "describe": engine.describe()}, f)


def run_restore(ckpt_dir: str, mode: str, out: str) -> None:
    import jax
    import numpy as np

    from flaxformer_lite.training import Checkpointer, load_params, load_state

    engine = make_engine(mode)
    ckpt = Checkpointer(ckpt_dir)
    restored = ckpt.restore(engine.abstract_state())
    ckpt.close()
    state = engine.from_checkpoint(restored.state)
    leaf_devices = len(jax.tree.leaves(state.params)[0].devices())
    params = flatten(engine.params(state))
    np.savez(out + ".npz", **params)
    loaded = load_state(ckpt_dir)[1]["params"]  # no model, no optimizer needed: device 0
    raw = flatten(loaded)
    same_as_raw = sorted(raw) == sorted(params) and all(
        np.array_equal(raw[k], params[k]) for k in params)
    # Fine-tuning's start: those arrays as init_params, laid out for this mode's devices.
    fresh = flatten(engine.params(engine.init_state(1, params=loaded)))
    same_as_raw = same_as_raw and all(np.array_equal(fresh[k], params[k]) for k in params)
    # The parameters alone, straight into this mode's layout (what a state restore gives).
    target = engine.abstract_state().params
    _, sharded = load_params(ckpt_dir, target=target)
    placed = all(x.sharding == t.sharding for x, t in
                 zip(jax.tree.leaves(sharded), jax.tree.leaves(target), strict=True))
    values = flatten(sharded)
    same_as_raw = same_as_raw and placed and sorted(values) == sorted(params) and all(
        np.array_equal(values[k], params[k]) for k in params)
    _, metrics = engine.train_step(state, global_batches(4)[3])
    m = engine.metrics_to_host(metrics)
    with open(out + ".json", "w") as f:
        json.dump({"step": restored.step, "data_state": restored.data_state,
                   "loss": m["loss"] / m["tokens"], "devices": jax.device_count(),
                   "leaf_devices": leaf_devices,
                   "load_state_matches": same_as_raw, "describe": engine.describe()}, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["equivalence", "weights", "restore"])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--mode", default="mesh")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # the last count wins
                               f"--xla_force_host_platform_device_count={args.devices}")
    if args.command == "equivalence":
        run_equivalence(args.out)
    elif args.command == "weights":
        run_weights(args.out)
    else:
        run_restore(args.ckpt, args.mode, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
