"""Training engine: pure train/eval steps, optax from config, pmap or mesh, Orbax checkpoints.

    from flaxformer_lite.training import OptimizerConfig, ParallelConfig, train
    result = train(model_config, OptimizerConfig(learning_rate=3e-4), batches,
                   workdir="/tmp/run", num_steps=1000)

See `trainer.train` for the loop, `parallel.Engine` for the device layouts and
`checkpoint.Checkpointer` for saving and restoring.
"""

from flaxformer_lite.training.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    CheckpointSaveError,
    Restored,
    Run,
    average_params,
    best_step,
    iterator_state,
    load_params,
    load_run,
    load_state,
    restore_iterator,
)
from flaxformer_lite.training.distributed import (
    initialize,
    is_main_process,
    local_batch,
    process_slice,
)
from flaxformer_lite.training.losses import (
    LossConfig,
    add_metrics,
    cross_entropy,
    loss_weights,
    metric_sums,
    summarize,
)
from flaxformer_lite.training.optim import (
    OptimizerConfig,
    constant_schedule,
    decay_mask,
    learning_rate_at,
    make_optimizer,
    make_schedule,
    num_updates,
    vaswani_schedule,
    warmup_cosine_schedule,
)
from flaxformer_lite.training.parallel import Engine, ParallelConfig
from flaxformer_lite.training.partitioning import (
    DEFAULT_RULES,
    MESH_AXES,
    logical_to_shardings,
    make_mesh,
    state_shardings,
)
from flaxformer_lite.training.state import TrainState, create_train_state, param_logical_specs
from flaxformer_lite.training.steps import eval_step, logits_fn, step_rng, train_step
from flaxformer_lite.training.trainer import (
    NonFiniteLossError,
    TensorBoardHook,
    TrainResult,
    evaluate,
    log_hook,
    print_hook,
    train,
)

__all__ = [
    "CheckpointRestoreError", "CheckpointSaveError", "Checkpointer", "DEFAULT_RULES", "Engine",
    "LossConfig", "MESH_AXES", "NonFiniteLossError", "OptimizerConfig", "ParallelConfig",
    "Restored", "Run", "TensorBoardHook", "TrainResult", "TrainState", "add_metrics",
    "average_params", "best_step", "constant_schedule", "create_train_state", "cross_entropy",
    "decay_mask", "eval_step", "evaluate", "initialize", "is_main_process", "iterator_state",
    "learning_rate_at", "load_params", "load_run", "load_state", "local_batch", "log_hook",
    "logical_to_shardings", "logits_fn", "loss_weights", "make_mesh", "make_optimizer",
    "make_schedule", "metric_sums", "num_updates", "param_logical_specs", "print_hook",
    "process_slice", "restore_iterator", "state_shardings", "step_rng", "summarize", "train",
    "train_step", "vaswani_schedule", "warmup_cosine_schedule",
]
