"""Layouts on meshes with Explicit axes (`jax.make_mesh`'s default since JAX 0.7).

There every array's type carries its sharding, and ops refuse operands laid out differently
(`dynamic_update_slice` into a cache made on one device) or gathers whose result's layout they
cannot infer. These helpers are no-ops on one device and on Auto meshes (`training.make_mesh`),
where XLA chooses the layouts, so the programs compiled there are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def explicit_sharding(x: Array) -> jax.sharding.NamedSharding | None:
    """`x`'s sharding when it lives on a mesh with Explicit axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding


def mesh_of(x: Array):
    """The mesh `x` lives on: the devices' own outside `jit` (where a reshard needs them), the
    abstract one of its type inside."""
    concrete = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if isinstance(concrete, jax.sharding.NamedSharding):
        return concrete.mesh
    return jax.typeof(x).sharding.mesh


def spec_of(x: Array, ndim: int) -> tuple:
    """`x`'s partition spec on an Explicit mesh, one entry an axis (None: whole)."""
    sharding = explicit_sharding(x)
    spec = () if sharding is None else tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def refit(x: Array, sharding) -> Array:
    """`x` resharded to `sharding` (on a mesh), unless it is laid out so already."""
    if getattr(sharding, "mesh", None) is None or sharding.mesh.empty:
        return x
    now = jax.typeof(x).sharding if isinstance(x, jax.core.Tracer) else x.sharding
    return x if now == sharding else jax.sharding.reshard(x, sharding)


def take_rows(table: Array, ids: Array) -> Array:
    """`jnp.take(table, ids, axis=0)`: rows of `table` `[n, ...]` -> `[*ids.shape, ...]`.

    On an Explicit mesh the result is laid out as `ids`, then as `table`'s trailing axes (an
    embedding table split over `embed` keeps that split); there a gather names its layout.
    """
    if explicit_sharding(ids) is None and explicit_sharding(table) is None:
        return jnp.take(table, ids, axis=0)
    mesh = mesh_of(ids if explicit_sharding(ids) is not None else table)
    spec = spec_of(ids, ids.ndim) + spec_of(table, table.ndim)[1:]
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return table.at[ids].get(out_sharding=out)
