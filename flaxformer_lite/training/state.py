"""`TrainState`: everything a training run needs to continue, as one pytree of arrays.

The model and the optimizer are not in it: they are static (functions of the configs), passed to
`train_step` separately, so the state is plain data that Orbax saves and restores as is.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import dummy_inputs, init_params
from flaxformer_lite.training.optim import OptimizerConfig, make_optimizer


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar, train steps taken (micro-batches when accumulating);
    params: the parameters (unboxed), in `TransformerConfig.param_dtype`;
    opt_state: the optax state;
    rng: the run's dropout key as raw `uint32` key data (`jax.random.key_data`), folded with
    `step` in every train step, so the randomness of step t never depends on earlier steps,
    on restarts or (under jit) on the device count; `pmap` also folds in the device index.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        """The dropout base key as a typed key."""
        return jax.random.wrap_key_data(self.rng)


def boxed_params(config: TransformerConfig, rng: jax.Array, model: nn.Module | None = None):
    """Freshly initialised parameters with their logical axis names (`nn.LogicallyPartitioned`)
    of `make_model(config)`, or of `model` (a module of your own, initialised on
    `models.dummy_inputs(config)`)."""
    if model is None:
        return init_params(config, rng)
    return model.init({"params": rng}, **dummy_inputs(config))["params"]


def param_logical_specs(config: TransformerConfig, model: nn.Module | None = None):
    """`PartitionSpec` of logical axis names for every parameter (no memory is allocated);
    a parameter without names (a plain `nn.Dense` in a model of your own) is replicated."""
    abstract = jax.eval_shape(lambda: boxed_params(config, jax.random.key(0), model))
    return nn.get_partition_spec(abstract)


def as_key(rng: jax.Array | int) -> jax.Array:
    """`rng` as a typed key: an integer seed (Python or NumPy) becomes `jax.random.key(seed)`;
    a key passes through."""
    return jax.random.key(int(rng)) if isinstance(rng, numbers.Integral) else rng


def create_train_state(config: TransformerConfig, optimizer_config: OptimizerConfig,
                       rng: jax.Array | int, *,
                       tx: optax.GradientTransformation | None = None,
                       params: Any = None, model: nn.Module | None = None) -> TrainState:
    """Initial state: parameters from `rng`'s "params" half (or `params`, e.g. pretrained
    ones to fine-tune, cast to `config.param_dtype`), dropout key from the other half.
    `model`: a module of your own to initialise instead of `make_model(config)`.

    `rng` is a typed key (`jax.random.key(seed)`) or an int seed. Runs eagerly or under
    `jax.jit` (the parallel engine jits it with output shardings, so large models are created
    directly in their sharded layout).
    """
    rng = as_key(rng)
    if tx is None:
        tx = make_optimizer(optimizer_config, d_model=config.d_model)
    params_rng, dropout_rng = jax.random.split(rng)
    if params is None:
        params = nn.meta.unbox(boxed_params(config, params_rng, model))
    else:
        params = jax.tree.map(lambda p: jnp.asarray(p, config.params_dtype), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(dropout_rng))
