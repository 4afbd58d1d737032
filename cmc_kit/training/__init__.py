"""Training: the CMC + MoCo train step, memory queues, exact checkpoint/resume, progress and logs.

    devices    strategy (one device, Mirrored, MultiWorker, TPU) and mixed precision
    cluster    several machines: TF_CONFIG checked, each worker's share of a batch, agreements
    schedules  learning-rate and EMA-momentum schedules
    queues     memory queues [K, D] with pointer and fill
    step       the compiled train step
    state      counters, the epoch's running sums, the checkpoint
    health     collapsed embeddings (warned once), streaks of non-finite steps
    logs       log.csv, log_steps.csv and TensorBoard
    trainer    Trainer.fit (epochs of steps, time limit, callbacks)
    launch     `train` for a run directory, on one machine or every worker of a cluster

The run directory itself (file names, settings, split, fresh start, reading runs back) is
`cmc_kit.runs`.
"""

from cmc_kit.training.cluster import WorkerCluster, parse_tf_config
from cmc_kit.training.devices import (connect_tpu, precision_for_devices, resolve_mixed_precision,
                                      select_strategy, tpu_addresses_to_try)
from cmc_kit.training.launch import train
from cmc_kit.training.queues import MemoryQueues, queue_size
from cmc_kit.training.schedules import make_learning_rate, momentum_at
from cmc_kit.training.state import Checkpointer, EpochTally, TrainState
from cmc_kit.training.step import StepSettings, build_train_step
from cmc_kit.training.trainer import Trainer, TrainResult

__all__ = [
    "Checkpointer", "EpochTally", "MemoryQueues", "StepSettings", "TrainResult", "TrainState",
    "Trainer", "WorkerCluster", "build_train_step", "connect_tpu", "make_learning_rate",
    "momentum_at", "parse_tf_config", "precision_for_devices", "queue_size",
    "resolve_mixed_precision", "select_strategy", "tpu_addresses_to_try", "train",
]
