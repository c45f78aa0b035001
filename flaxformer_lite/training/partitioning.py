"""Logical axis names -> a device mesh with axes `data`, `fsdp`, `tensor`.

The layers name every parameter axis (`vocab`, `embed`, `heads`, `kv`, `mlp`, `layers`) and
every constrained activation axis (`batch`, `length`, `act_embed`, `act_mlp`, `act_vocab`). The
rules below say which mesh axes each name is split over:

- `data`: pure data parallelism; parameters are replicated along it.
- `fsdp`: the batch is split along it too, and so are parameters and optimizer moments along
  their `embed` axis (ZeRO-3 / fully sharded data parallel): each device stores 1/fsdp of them
  and XLA all-gathers a layer's weights just before use.
- `tensor`: Megatron-style tensor parallelism: attention heads, the feed-forward hidden units
  and the vocabulary are split, activations along those axes too.

A parameter dimension that the assigned mesh axes do not divide is replicated instead (GPT-2's
vocabulary of 50257 cannot be split in two), or, for a tuple of axes, split over the longest
leading part of it that divides it; so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxformer_lite.models import flat_leaves, path_names

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes).

    One of the sizes may be -1: it takes whatever the others leave. `jax.make_mesh` orders the
    devices so that the fastest links carry the innermost (`tensor`) axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"Only one mesh axis may be -1; got {sizes}.")
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"Mesh axis {name}={size!r} must be a positive integer or -1.")
    known = math.prod(size for size in sizes.values() if size != -1)
    hint = ("; on a CPU, jax.config.update('jax_num_cpu_devices', n) before JAX starts gives n "
            "devices (the scripts: --config.parallel.cpu_devices=n)"
            if all(d.platform == "cpu" for d in devices) else "")
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with {sizes}: "
                             f"{known} does not divide {len(devices)}{hint}.")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{len(devices)} are available; make data * fsdp * tensor equal the "
                         f"device count (or set one axis to -1){hint}.")
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _fit_axes(axes, dim: int, mesh: Mesh):
    """The mesh axes a dimension of size `dim` is split over: `axes` if they divide it, else
    the longest leading part of an axis tuple that does (`("fsdp", "tensor")` on a dimension
    only `fsdp` divides keeps `fsdp`), else None (replicated)."""
    if dim % _axis_size(mesh, axes) == 0:
        return axes
    if isinstance(axes, str) or axes is None:
        return None
    for end in range(len(axes) - 1, 0, -1):
        size = _axis_size(mesh, axes[:end])
        if dim % size == 0:
            if size == 1:  # axes of size 1 split nothing: replicated, and said so
                return None
            return tuple(axes[:end]) if end > 1 else axes[0]
    return None


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with every dimension fitted to what its mesh axes divide (`_fit_axes`): whole,
    over a leading part of an axis tuple, or unsharded."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return P(*(_fit_axes(axes, dim, mesh) for axes, dim in zip(entries, shape, strict=True)))


def logical_to_shardings(logical_specs, shapes, mesh: Mesh,
                         rules: LogicalRules = DEFAULT_RULES):
    """`NamedSharding` per leaf from logical `PartitionSpec`s and matching shapes (a pytree of
    arrays or `ShapeDtypeStruct`s)."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def undivided(logical_specs, shapes, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
              ) -> list[str]:
    """`"path: dim 1 (6) over ('tensor',) = 4"` for every parameter dimension the rules would
    shard but the mesh does not divide, so that `logical_to_shardings` replicates it (each
    device then holds and computes that dimension whole), or splits it over the leading axes
    of a tuple that do divide it (`", split over 'fsdp' only"`)."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    out = []
    specs = jax.tree.leaves_with_path(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    for (path, spec), x in zip(specs, jax.tree.leaves(shapes), strict=True):
        for i, (axes, dim) in enumerate(zip(list(spec) + [None] * (len(x.shape) - len(spec)),
                                            x.shape)):
            size = _axis_size(mesh, axes)
            if dim % size:
                names = (axes,) if isinstance(axes, str) else tuple(axes)
                kept = _fit_axes(axes, dim, mesh)
                split = f", split over {kept!r} only" if kept is not None else ""
                out.append(f"{'/'.join(path_names(path))}: dim {i} ({dim}) over {names} = "
                           f"{size}{split}")
    return out


def state_shardings(abstract_state, param_shardings, mesh: Mesh):
    """Shardings for a whole `TrainState` (abstract or concrete).

    Parameters get `param_shardings`. An optimizer-state leaf whose tree path ends with a
    parameter's path and whose shape equals that parameter's (Adam's moments, accumulated
    gradients) is sharded like the parameter; everything else (step counters, Adafactor's
    factored row/column statistics, the RNG) is replicated.
    """
    by_path = {}
    for path, sharding in jax.tree.leaves_with_path(param_shardings):
        by_path[path_names(path)] = sharding
    param_shapes = {path_names(p): x.shape
                    for p, x in jax.tree.leaves_with_path(abstract_state.params)}
    replicated = NamedSharding(mesh, P())

    def for_opt_leaf(path, leaf):
        key = path_names(path)
        for start in range(len(key)):
            suffix = key[start:]
            if suffix in by_path and param_shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    opt = jax.tree.map_with_path(for_opt_leaf, abstract_state.opt_state)
    return abstract_state.replace(step=replicated, params=param_shardings, opt_state=opt,
                                  rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(shardings) -> dict[str, str]:
    """`{"path/to/param": "P(...)"}`: a readable summary of a sharding pytree."""
    return {path: str(s.spec) for path, s in flat_leaves(shardings).items()}


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
