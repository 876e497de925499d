"""Training engine: truncated/full BPTT loop, clipping, optimizers and schedules, callbacks, exact resume
from pickle-free checkpoints, metrics/TensorBoard logging and data-parallel training.

    from rnnkit.train import Trainer, TrainerConfig, OptimConfig, ScheduleConfig, StreamData, load_config

See docs/training.md.
"""

from .checkpoint import find_checkpoint, latest_good_checkpoint, list_checkpoints, load_checkpoint, model_state_dict
from .config import (
    OptimConfig,
    ScheduleConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    replace_config,
    save_config,
)
from .optim import Schedule, build_optimizer
from .rundir import lock_run_dir
from .trainer import (
    EVENTS,
    StreamData,
    Trainer,
    TrainState,
    detach_state,
    evaluate_stream,
    seed_everything,
    tree_map,
)

__all__ = ["Trainer", "TrainerConfig", "OptimConfig", "ScheduleConfig", "StreamData", "load_config",
           "save_config", "config_to_dict", "config_from_dict", "replace_config", "EVENTS", "seed_everything",
           "detach_state", "tree_map", "build_optimizer", "Schedule", "load_checkpoint", "list_checkpoints",
           "latest_good_checkpoint", "evaluate_stream", "find_checkpoint", "model_state_dict", "TrainState",
           "lock_run_dir"]
