"""Training: CMC + MoCo train step, memory queues, exact checkpoint/resume, progress and logs.

One `Trainer` owns everything that must survive a restart (online and momentum weights, the
queues and their write pointer, the optimizer, the step and epoch counters and the place in the
epoch's sample plan) inside one
`tf.train.Checkpoint`, so resuming never rebuilds anything at random.

Run directory layout:
    RUN/config.json          the Config (model fields must match to resume)
    RUN/split.json           train / validation ids, fixed when the run is created
    RUN/checkpoints/         tf.train.CheckpointManager files (last few kept)
    RUN/state.json           epoch, step, queue fill, latest checkpoint (written after each save)
    RUN/log.csv              one row per epoch: every loss term, lr, momentum, skipped steps, seconds
    RUN/log_steps.csv        optional per-step rows (train.log_every_steps)
    RUN/tensorboard/         TensorBoard scalars
    RUN/embeddings/          embeddings of a fixed evaluation subset per epoch
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cmc_kit.config import (Config, ConfigError, atomic_write_text, default_paths, on_kaggle,
                             parse_duration, preset)
from cmc_kit.errors import CheckpointError, DataError, TrainingError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
LOSS_SCALE = "loss_scale"  # checkpoint key of mixed_float16's dynamic loss scale
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------

def queue_size(multiplier: int, global_batch: int, num_train: int) -> int:
    """K = multiplier x batch, capped below the training-set size.

    Keys of the same sample must not come back as negatives, so K stays under the number of
    training samples (the largest multiple of the batch below it), with a warning.
    """
    if num_train < 2 * global_batch:
        raise DataError(
            f"The training split has {num_train} samples, fewer than two batches of "
            f"{global_batch}. Lower data.batch_size (e.g. --set data.batch_size="
            f"{max(2, num_train // 2)}) or use more data.")
    size = multiplier * global_batch
    if size >= num_train:
        capped = ((num_train - 1) // global_batch) * global_batch
        warnings.warn(
            f"Queue size {multiplier} x {global_batch} = {size} would reach the {num_train} "
            f"training samples; capped at {capped}. Lower train.queue_multiplier to silence this.",
            stacklevel=2)
        size = capped
    return size


def momentum_at(step, total_steps, base: float, schedule: str):
    """EMA momentum for a step: constant, or MoCo/BYOL-style cosine ramp from base to 1."""
    import tensorflow as tf

    if schedule == "constant":
        return tf.constant(base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def make_learning_rate(train_config, total_steps: int):
    import keras

    if train_config.lr_schedule == "constant" and train_config.warmup_steps == 0:
        return train_config.learning_rate
    warmup = train_config.warmup_steps
    if train_config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else train_config.learning_rate,
            decay_steps=max(total_steps - warmup, 1),
            warmup_target=train_config.learning_rate if warmup else None,
            warmup_steps=warmup)
    # constant after a linear warmup
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=1, alpha=1.0,
        warmup_target=train_config.learning_rate, warmup_steps=warmup)


class _NoSummaries:
    """Stands in for a TensorBoard writer when the tensorboard package is missing."""

    def as_default(self, step=None):
        import contextlib
        return contextlib.nullcontext()

    def flush(self):
        pass


def _summary_writer(path: Path):
    import tensorflow as tf

    try:
        import tensorboard  # noqa: F401  (tf.summary.scalar needs it since TF 2.21)
    except ImportError:
        warnings.warn("The tensorboard package is not installed, so no TensorBoard scalars are "
                      "written (log.csv still is). `pip install tensorboard` to get them.",
                      stacklevel=3)
        return _NoSummaries()
    return tf.summary.create_file_writer(str(path))


def _scalar(writer, name: str, value: float):
    import tensorflow as tf

    if not isinstance(writer, _NoSummaries):
        tf.summary.scalar(name, value)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}. The run directory may be damaged; "
                              "restore the file or start over with --fresh.") from err


# Device files of TPU chips attached to the VM itself: /dev/accel* (TPU v2-v4 VMs, e.g. Kaggle's
# v3-8), /dev/vfio/N (v5e and later, e.g. Kaggle's v5e-8).
LOCAL_TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def tpu_addresses_to_try(environ=None, device_globs=None) -> list:
    """`TPUClusterResolver(tpu=...)` arguments to try, most likely first.

    TPU_NAME in the environment: that TPU only. TPU chips attached to this VM (Kaggle's and
    Colab's TPU VMs): "local" first, as TensorFlow's TPU guide recommends there (the default
    resolver goes through the Cloud TPU API, which such VMs may not answer), then the default.
    Otherwise the default resolver (a Cloud TPU node found through the GCE metadata server).
    """
    import glob

    environ = os.environ if environ is None else environ
    device_globs = LOCAL_TPU_DEVICE_GLOBS if device_globs is None else device_globs
    if environ.get("TPU_NAME"):
        return [environ["TPU_NAME"]]
    attached = any(glob.glob(pattern) for pattern in device_globs)
    return ["local", None] if attached or environ.get("TPU_ACCELERATOR_TYPE") else [None]


def connect_tpu(addresses=None):
    """A TPUStrategy for the first TPU in `addresses` that initialises, or None.

    Also returns the errors met on the way, for the message when a TPU was insisted on.
    """
    import tensorflow as tf

    errors = []
    for address in tpu_addresses_to_try() if addresses is None else addresses:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver), errors
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            errors.append(f"tpu={address!r}: {first_line[:200]}")
    return None, errors


def select_strategy(name: str = "auto"):
    """The tf.distribute strategy for `train.strategy`.

    "auto": TPUStrategy if a TPU is attached, MirroredStrategy over all GPUs if there are
    two or more (Kaggle's 2x T4), else the default strategy. "mirrored" mirrors over all
    GPUs, or over all logical CPU devices when there is no GPU (CPU tests split the CPU in
    two); "default" is the default strategy; "tpu" insists on a TPU (see
    `tpu_addresses_to_try` for where it looks; set TPU_NAME to name one).
    """
    import tensorflow as tf

    if name in ("auto", "tpu"):
        strategy, errors = connect_tpu()
        if strategy is not None:
            return strategy
        if name == "tpu":
            raise TrainingError(
                "train.strategy=tpu but no TPU could be initialised ("
                + "; ".join(errors) + "). On Kaggle pick a TPU accelerator in the notebook "
                "settings; elsewhere set TPU_NAME to the TPU's name or address, or use "
                "--set train.strategy=auto.")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def precision_for_devices(*, tpu: bool, gpu_capabilities: list[tuple[int, int]]) -> str:
    """The mixed-precision policy for the attached accelerators.

    TPU, or GPUs that are all Hopper (compute capability >= 9.0): "mixed_bfloat16" (no loss
    scaling needed). GPUs that all have tensor cores (>= 7.0: V100, T4, A100...):
    "mixed_float16". Otherwise (CPU, older GPUs): "float32". Mirrored replicas run the same
    program, so the weakest GPU decides.
    """
    if tpu:
        return "mixed_bfloat16"
    if not gpu_capabilities:
        return "float32"
    weakest = min(gpu_capabilities)
    if weakest >= (9, 0):
        return "mixed_bfloat16"
    if weakest >= (7, 0):
        return "mixed_float16"
    return "float32"


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` -> a Keras dtype policy name; "auto" looks at the devices."""
    import tensorflow as tf

    if setting != "auto":
        return "float32" if setting == "off" else setting
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return precision_for_devices(tpu=bool(tf.config.list_logical_devices("TPU")),
                                 gpu_capabilities=capabilities)


def _global_clipped_shares(grads, ctx, optimizer, clipnorm, replicas: int, loss_scaled: bool):
    """Per-replica gradient shares whose sum over replicas is the clipped global gradient.

    Keras's optimizer sums the replicas' gradients but clips each share first. Here the shares
    are summed first (G, the gradient of the whole batch, on every replica), each variable's
    G is clipped to `clipnorm` as Keras does on one device, and G / R is returned for Keras to
    sum back. Costs one extra all-reduce per step; as a bonus every replica sees the same G,
    so the loss-scale optimizer's overflow check (first replica only) covers all replicas.
    """
    import tensorflow as tf

    summed = ctx.all_reduce("sum", grads)  # G, identical on every replica
    if clipnorm:
        # Scaled gradients (float16) are unscaled by the optimizer after this: scale the bound.
        bound = clipnorm * tf.cast(optimizer.dynamic_scale, tf.float32) if loss_scaled else clipnorm
        summed = [tf.clip_by_norm(g, tf.cast(bound, g.dtype)) for g in summed]
    return [g / tf.cast(replicas, g.dtype) for g in summed]


def _intra_term(query, positive, global_keys, offset, ctx, *, online_positive: bool,
                replicas: int, temperature, kind):
    """Intra-batch loss of this replica's queries [b, D] against the GLOBAL batch of keys.

    One replica: plain `intra_batch_loss(query, positive)`. R replicas: the keys of all
    replicas [R*b, D] are the candidates and query i's positive is row offset + i, so the
    mean over replicas equals the single-device loss of the whole batch. Online positives
    carry gradients, so they are gathered inside the tape (all_gather is differentiable).
    """
    from cmc_kit import objectives

    if replicas == 1:
        return objectives.intra_batch_loss(query, positive, temperature=temperature, kind=kind)
    candidates = ctx.all_gather(positive, axis=0) if online_positive else global_keys  # [R*b, D]
    return objectives.intra_batch_loss(query, candidates, temperature=temperature, kind=kind,
                                       key_offset=offset)


# ---------------------------------------------------------------------------------------------
# Memory queues
# ---------------------------------------------------------------------------------------------

def _make_queues_module(views, size: int, dim: int):
    import tensorflow as tf

    class MemoryQueues(tf.Module):
        """One FIFO queue of momentum keys per key view, shape (K, dim), plus a shared write pointer.

        Non-trainable variables: saved in every checkpoint, so resume continues the same queue.
        """

        def __init__(self):
            super().__init__(name="memory_queues")
            self.size = size
            self.views = tuple(views)
            agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
            self.queues = {
                view: tf.Variable(tf.zeros([size, dim], tf.float32), trainable=False,
                                  name=f"queue_{view}", aggregation=agg)
                for view in self.views
            }
            self.pointer = tf.Variable(0, dtype=tf.int64, trainable=False, name="pointer",
                                       aggregation=agg)
            self.filled = tf.Variable(0, dtype=tf.int64, trainable=False, name="filled",
                                      aggregation=agg)

        def enqueue(self, keys: dict):
            """Writes keys {view: [B, dim]} at the pointer (FIFO); K is a multiple of B."""
            batch = tf.shape(next(iter(keys.values())), out_type=tf.int64)[0]
            indices = (self.pointer + tf.range(batch, dtype=tf.int64)) % self.size  # [B]
            for view in self.views:
                normalised = tf.math.l2_normalize(tf.cast(keys[view], tf.float32), axis=-1)
                # scatter_update (not scatter_nd_update): MirroredVariable implements it.
                self.queues[view].scatter_update(tf.IndexedSlices(normalised, indices))
            self.pointer.assign((self.pointer + batch) % self.size)
            self.filled.assign(tf.minimum(self.filled + batch, self.size))

    return MemoryQueues()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    status: str            # "completed", "time_limit"
    epoch: int
    step: int
    run: Path
    checkpoint: str | None
    history: list[dict]


class Trainer:
    """Builds models, optimizer, queues and checkpoint for one run directory and trains them.

    Args:
        config: the run's Config.
        run_dir: where checkpoints and logs go.
        train_catalog: DataFrame of training samples (id, terrain, height, segmentation).
        eval_catalog: held-out samples for per-epoch embeddings / kNN (optional).
        verbose: 0 silent, 1 progress bar per epoch.
        strategy: a tf.distribute strategy (default: `select_strategy(train.strategy)`).
        jit_compile: force XLA on (True) or off (False); None follows train.jit_compile, which
            only takes effect with a GPU/TPU attached.
        dataset_transform: applied to every epoch's dataset (tests, experiments). Training
            batches also hold "position": int64 [B], the samples' plan places, from which the
            checkpoint's resume point is taken: pass it through unchanged.
    """

    def __init__(self, config: Config, run_dir: Path, train_catalog, eval_catalog=None, *,
                 verbose: int = 1, strategy=None, dataset_transform: Callable | None = None,
                 callbacks: list | None = None, jit_compile: bool | None = None,
                 metadata_csv: Path | None = None):
        import keras
        import tensorflow as tf

        from cmc_kit import models, objectives

        self.config = config
        self.run_dir = Path(run_dir)
        self.train_catalog = train_catalog.reset_index(drop=True)
        self.eval_catalog = eval_catalog
        self.verbose = verbose
        self.dataset_transform = dataset_transform
        self.metadata_csv = metadata_csv  # joined into the per-epoch embedding tables
        # None: XLA as train.jit_compile says, only with a GPU/TPU attached. True/False force it
        # (e.g. to benchmark or test XLA on a CPU).
        self.jit_override = jit_compile
        # keras.callbacks.Callback objects (or anything with the same hooks): on_train_begin,
        # on_epoch_begin, on_train_batch_end(step, logs), on_epoch_end(epoch, row), on_train_end.
        self.callbacks = list(callbacks or [])
        tc, dc, mc = config.train, config.data, config.model
        from cmc_kit import views
        views.check_crop_size(self.train_catalog, dc.crop_size)  # before building anything

        if tc.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(tc.seed)
        # The strategy first: a TPU's devices exist only once it is initialised, and "auto"
        # precision asks which devices there are.
        self.strategy = strategy or select_strategy(tc.strategy)
        self.precision = resolve_mixed_precision(tc.mixed_precision)
        self.replicas = self.strategy.num_replicas_in_sync
        if dc.batch_size % self.replicas:
            raise ConfigError(f"Setting 'data.batch_size' ({dc.batch_size}) must be divisible by "
                              f"the {self.replicas} replicas in sync.")
        self.global_batch = dc.batch_size
        self.steps_per_epoch = len(self.train_catalog) // self.global_batch
        self.pairs = objectives.resolve_pairs(tc.pairs, mc.views)
        self.key_views = tuple(sorted({key for _, key in self.pairs}, key=mc.views.index))
        self.queue_size = queue_size(tc.queue_multiplier, self.global_batch, len(self.train_catalog))
        self.total_steps = tc.epochs * self.steps_per_epoch

        # Layers take the global dtype policy when they are built; restore it afterwards so
        # models built later in the same process (embedding, probes, tests) stay float32.
        policy_before = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            with self.strategy.scope():
                self.online = models.build_encoder(mc, crop_size=dc.crop_size, name="online")
                self.momentum = models.build_momentum_twin(self.online, name="momentum")
        finally:
            keras.mixed_precision.set_global_policy(policy_before)
        with self.strategy.scope():
            # Keras clips each replica's share of the gradient before summing the replicas,
            # which is not clipping the batch's gradient: with several replicas the train step
            # clips the summed gradient itself (`_global_clipped_shares`).
            optimizer = keras.optimizers.Adam(
                learning_rate=make_learning_rate(tc, self.total_steps), beta_1=tc.beta_1,
                clipnorm=tc.clipnorm if self.replicas == 1 else None)
            if self.precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.optimizer.build(self.online.trainable_variables)
            self.queues = _make_queues_module(self.key_views, self.queue_size, mc.embedding_dim)
            agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step", aggregation=agg)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch", aggregation=agg)
            self.skipped_total = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped",
                                             aggregation=agg)
            # Position inside the current epoch. Not derived from the global step: an epoch
            # shortened by an unreadable file would shift every later epoch.
            self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                                              name="batch_in_epoch", aggregation=agg)
            # Where the epoch plan continues: batches x batch size plus the unreadable samples
            # passed on the way, so a resumed epoch starts at exactly the next sample.
            self.epoch_position = tf.Variable(0, dtype=tf.int64, trainable=False,
                                              name="epoch_position", aggregation=agg)
            # Running sums of the epoch's logged values (sum_keys over steps with a finite loss,
            # then that step count, skipped updates, skipped samples): a resumed epoch logs the
            # same means.
            self.sum_keys = ["loss", "accuracy", "momentum"] + [
                f"{kind}_{q}-{k}" for q, k in self.pairs for kind in ("inter", "intra")]
            self.epoch_sums = tf.Variable(tf.zeros([len(self.sum_keys) + 3], tf.float64),
                                          trainable=False, name="epoch_sums", aggregation=agg)
            # What the data order and queue depend on: checked before any restore.
            self.geometry = tf.Variable(self._geometry(), dtype=tf.int64, trainable=False,
                                        name="geometry", aggregation=agg)
        # The optimizer is saved without its loss-scale wrapper, and the loss scale (float16
        # only) on its own: the layout then does not depend on the precision, so a run resumes
        # on other hardware (2x T4 mixed_float16 -> P100 float32 -> TPU mixed_bfloat16).
        self.checkpointed = dict(
            online=self.online, momentum=self.momentum, optimizer=self._inner_optimizer,
            queues=self.queues, step=self.step, epoch=self.epoch, skipped=self.skipped_total,
            batch_in_epoch=self.batch_in_epoch, epoch_position=self.epoch_position,
            epoch_sums=self.epoch_sums, geometry=self.geometry)
        if self._inner_optimizer is not self.optimizer:
            self.checkpointed[LOSS_SCALE] = tf.train.Checkpoint(
                step_counter=self.optimizer.step_counter,
                dynamic_scale=self.optimizer.dynamic_scale)
        self.checkpoint = tf.train.Checkpoint(**self.checkpointed)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.run_dir / CHECKPOINT_DIR), max_to_keep=tc.keep_checkpoints,
            checkpoint_name="ckpt")
        self.term_names = self.sum_keys[3:]
        self._epoch_end_seconds = 0.0  # measured cost of the epoch-end work, for the time limit
        self._train_step = self._compile_train_step()
        from cmc_kit import views
        self.skipped_samples = views.SkippedCounter()  # files unreadable since validation

    GEOMETRY_FIELDS = ("training samples", "steps per epoch", "queue size", "global batch",
                       "data-order seed")

    def _geometry(self) -> list[int]:
        return [len(self.train_catalog), self.steps_per_epoch, self.queue_size, self.global_batch,
                self.config.train.seed]

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, epoch: int, seed: int | None = None, start_batch: int = 0,
                start_position: int | None = None, with_positions: bool = False,
                transform: bool = True):
        """The epoch's batches ({view: [B, S, S, C]}, plus "position": [B] if asked), through
        `dataset_transform` unless `transform` is False."""
        from cmc_kit import views

        dc = self.config.data
        ds = views.make_dataset(
            self.train_catalog, views=self.config.model.views, crop_size=dc.crop_size,
            batch_size=self.global_batch, training=True,
            seed=self.config.train.seed if seed is None else seed, epoch=epoch,
            augment=dc.augment, cache=dc.cache or None, skipped_counter=self.skipped_samples,
            start_batch=start_batch, start_position=start_position,
            with_positions=with_positions)
        if transform and self.dataset_transform is not None:
            ds = self.dataset_transform(ds)
        return ds

    # -- the compiled step ----------------------------------------------------------------------
    def _compile_train_step(self):
        import tensorflow as tf

        from cmc_kit import models, objectives

        tc = self.config.train
        pairs, key_views, replicas = self.pairs, self.key_views, self.replicas
        online, momentum_net, optimizer, queues = self.online, self.momentum, self.optimizer, self.queues
        loss_scaled = self.precision == "mixed_float16"

        # XLA on CPU makes grouped convolutions ~9x slower (measured in models.py): GPU/TPU only.
        has_accelerator = bool(tf.config.list_logical_devices("GPU") or
                               tf.config.list_logical_devices("TPU"))
        jit = tc.jit_compile and has_accelerator if self.jit_override is None else self.jit_override
        # One replica: the whole step compiles. Several: collectives (all-gather, all-reduce,
        # the optimizer's merge_call) cannot sit inside an XLA cluster, so each replica compiles
        # its encoder passes and losses and the collectives run between them. Online positives
        # are gathered inside the gradient tape, which prevents that split: no XLA then.
        jit_whole_step = jit and replicas == 1
        jit_per_replica = jit and replicas > 1 and tc.positive == "momentum"
        self.jit_mode = "step" if jit_whole_step else "replica" if jit_per_replica else "off"

        def encode_keys(batch):
            keys = momentum_net(batch, training=False)                      # {view: [b, D]}
            return {v: tf.stop_gradient(tf.cast(keys[v], tf.float32)) for v in key_views}

        def losses_and_grads(batch, keys, global_keys, offset):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                queries = online(batch, training=True)                      # {view: [b, D]}
                terms = {}
                for q_view, k_view in pairs:
                    positive = keys[k_view] if tc.positive == "momentum" else queries[k_view]
                    terms[f"inter_{q_view}-{k_view}"] = objectives.inter_batch_loss(
                        queries[q_view], positive, queues.queues[k_view].read_value(),
                        temperature=tc.temperature, kind=tc.loss)
                    terms[f"intra_{q_view}-{k_view}"] = _intra_term(
                        queries[q_view], positive, global_keys[k_view], offset, ctx,
                        online_positive=tc.positive == "online", replicas=replicas,
                        temperature=tc.temperature, kind=tc.loss)
                total = tf.add_n([
                    (tc.inter_weight if name.startswith("inter") else tc.intra_weight) * value
                    for name, value in terms.items()])
                # Each replica's terms are means over its b = B / R rows, and Keras sums the
                # replicas' gradients: 1/R per replica gives the gradient of the global mean.
                replica_loss = total / replicas
                if loss_scaled:
                    replica_loss = optimizer.scale_loss(replica_loss)
            variables = online.trainable_variables
            query_list = [queries[v] for v in sorted(queries)]               # [b, D] each
            gradients = tape.gradient(replica_loss, variables + query_list)
            grads, query_grads = gradients[:len(variables)], gradients[len(variables):]
            first = pairs[0]
            if replicas == 1:
                accuracy = objectives.contrastive_accuracy(queries[first[0]], keys[first[1]])
            else:
                accuracy = objectives.contrastive_accuracy(
                    queries[first[0]], global_keys[first[1]], key_offset=offset)
            return total, terms, grads, accuracy, [g for g in query_grads if g is not None]

        if jit_per_replica:
            encode_keys = tf.function(encode_keys, jit_compile=True)
            losses_and_grads = tf.function(losses_and_grads, jit_compile=True)

        def replica_step(batch, momentum_value):
            ctx = tf.distribute.get_replica_context()
            # Momentum keys first: no gradient, and they are the positives and the new queue entries.
            keys = encode_keys(batch)                                       # {view: [b, D]}
            # Every replica sees the global batch of keys: the same queue entries everywhere, and
            # intra-batch negatives from the whole batch. This replica's rows start at `offset`.
            global_keys = {v: ctx.all_gather(keys[v], axis=0) for v in key_views}  # {v: [R*b, D]}
            local_batch = tf.shape(keys[key_views[0]])[0]
            offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * local_batch
            total, terms, grads, accuracy, query_grads = losses_and_grads(batch, keys, global_keys,
                                                                         offset)
            if replicas > 1:
                grads = _global_clipped_shares(grads, ctx, optimizer, tc.clipnorm, replicas,
                                               loss_scaled)
            loss_finite = tf.math.is_finite(total)
            # Under float16 loss scaling an overflow anywhere is routine and decides whether the
            # optimizer applies: every gradient is checked. Otherwise the embeddings' gradients
            # (the first out of backprop) are: waiting for all of them held the optimizer back
            # until the last one was ready, 5% of a CPU step (benchmarks/train_step.py). A
            # non-finite weight still never reaches a checkpoint: `save` checks.
            checked = grads if loss_scaled else query_grads
            grads_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in checked])
            # Every replica decides together: [bad losses, bad gradients] summed over replicas.
            bad = ctx.all_reduce("sum", tf.stack([1.0 - tf.cast(loss_finite, tf.float32),
                                                  1.0 - tf.cast(grads_finite, tf.float32)]))
            return total, terms, accuracy, bad[0] < 0.5, bad[1] < 0.5, global_keys, grads

        def apply_gradients(grads):
            optimizer.apply_gradients(zip(grads, online.trainable_variables))

        def step_fn(batch):
            momentum_value = momentum_at(self.step, self.total_steps, tc.momentum,
                                         tc.momentum_schedule)
            total, terms, accuracy, loss_ok, grads_ok, keys, grads = self.strategy.run(
                replica_step, args=(batch, momentum_value))
            reduce = lambda x: self.strategy.reduce("MEAN", x, axis=None)  # noqa: E731
            total = reduce(total)
            terms = {name: reduce(value) for name, value in terms.items()}
            accuracy = reduce(accuracy)
            loss_ok = self.strategy.experimental_local_results(loss_ok)[0]
            grads_ok = self.strategy.experimental_local_results(grads_ok)[0]
            update = tf.logical_and(loss_ok, grads_ok)
            # Under float16 loss scaling, overflowing gradients are routine: the loss-scale
            # optimizer must still see them (it skips the update and lowers its scale), but the
            # EMA and the queue wait for a real update.
            apply = tf.logical_and(loss_ok, grads_ok) if not loss_scaled else loss_ok
            # all-gathered: every replica holds the same global keys [B, D]; take the first copy.
            keys = {v: self.strategy.experimental_local_results(k)[0] for v, k in keys.items()}

            def optimize():
                # The optimizer all-reduces inside the replicas (merge_call), which is not allowed
                # under a cond in replica context: the cond lives here, in cross-replica context.
                self.strategy.run(apply_gradients, args=(grads,))
                return tf.constant(True)

            def commit():
                # Cross-replica: every replica's copy gets the same EMA and queue update.
                models.momentum_update(online, momentum_net, momentum_value)
                queues.enqueue(keys)
                return tf.constant(0, tf.int64)

            def skip():
                self.skipped_total.assign_add(1)
                return tf.constant(1, tf.int64)

            tf.cond(apply, optimize, lambda: tf.constant(False))
            skipped = tf.cond(update, commit, skip)
            self.step.assign_add(1)
            self.batch_in_epoch.assign_add(1)
            # A non-finite loss (or gradient without loss scaling) is a real problem; an
            # overflow under loss scaling is not: it only counts as a skipped update.
            nonfinite = tf.cast(tf.logical_not(loss_ok if loss_scaled else update), tf.int64)
            return {"loss": total, "accuracy": accuracy, "skipped": skipped,
                    "nonfinite": nonfinite, "momentum": momentum_value, **terms}

        return tf.function(step_fn, jit_compile=True if jit_whole_step else None,
                           reduce_retracing=True)

    # -- queue fill -----------------------------------------------------------------------------
    def fill_queues(self):
        """Fills the queues with momentum keys of the first K / batch batches (no random vectors)."""
        import tensorflow as tf

        batches = self.queue_size // self.global_batch
        # A different shuffle than epoch 0, so the first training batches are not all queued.
        dataset = self.dataset(epoch=0, seed=self.config.train.seed + 1_000_003).take(batches)
        dataset = self.strategy.experimental_distribute_dataset(dataset)

        @tf.function
        def keys_of(batch):
            def replica(b):
                keys = self.momentum(b, training=False)
                ctx = tf.distribute.get_replica_context()
                return {v: ctx.all_gather(tf.cast(keys[v], tf.float32), axis=0) for v in self.key_views}
            out = self.strategy.run(replica, args=(batch,))
            return {v: self.strategy.experimental_local_results(k)[0] for v, k in out.items()}

        for batch in dataset:
            self.queues.enqueue(keys_of(batch))
        if int(self.queues.filled.numpy()) < self.queue_size:
            raise TrainingError(
                f"Could fill only {int(self.queues.filled.numpy())} of {self.queue_size} queue "
                f"entries: {self.skipped_samples.count} sample(s) could not be read "
                f"({', '.join(self.skipped_samples.ids[:5])}). Run `cmc-kit validate DATA` and fix "
                "or remove them.")

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> str:
        # Numbered by the checkpoint's own save counter, never by step: a number is never reused,
        # so a checkpoint is never overwritten in place (TF writes the state file atomically).
        self._check_finite_state()
        path = self.manager.save()
        self.write_state(path)
        return path

    def _check_finite_state(self):
        """Refuses to checkpoint non-finite weights or queues: the last good checkpoint stays latest."""
        named = [(f"online/{w.path}", w) for w in self.online.weights]
        named += [(f"momentum/{w.path}", w) for w in self.momentum.weights]
        named += [(f"queue/{view}", queue) for view, queue in self.queues.queues.items()]
        bad = [name for name, value in named if not np.all(np.isfinite(np.asarray(value)))]
        if bad:
            latest = self.manager.latest_checkpoint
            kept = (f"The latest checkpoint, {latest}, is intact and training resumes from it."
                    if latest else "No checkpoint was written; nothing was overwritten.")
            raise TrainingError(
                f"Not saving step {int(self.step.numpy())} of {self.run_dir}: non-finite values in "
                f"{len(bad)} tensor(s) ({', '.join(bad[:3])}). {kept} Lower "
                "train.learning_rate or check the data with `cmc-kit validate`.")

    def write_state(self, checkpoint_path: str | None):
        state = {
            "epoch": int(self.epoch.numpy()),
            "step": int(self.step.numpy()),
            "batch_in_epoch": int(self.batch_in_epoch.numpy()),
            "epoch_position": int(self.epoch_position.numpy()),
            "steps_per_epoch": self.steps_per_epoch,
            "num_train": len(self.train_catalog),
            "queue_size": self.queue_size,
            "queue_fill": int(self.queues.filled.numpy()),
            "queue_pointer": int(self.queues.pointer.numpy()),
            "skipped_steps": int(self.skipped_total.numpy()),
            "latest_checkpoint": checkpoint_path,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    @property
    def _inner_optimizer(self):
        """Adam, also under mixed_float16's LossScaleOptimizer."""
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    def restore_or_initialize(self) -> bool:
        """Restores the latest checkpoint (True) or fills the queues for a fresh run (False)."""
        latest = self.manager.latest_checkpoint
        if latest:
            self._check_geometry(latest)
            saved_keys = self._saved_keys(latest)
            saved = {key.split("/")[0] for key in saved_keys}
            checkpoint = self._checkpoint_for(saved, saved_keys)
            status = checkpoint.restore(latest)
            try:
                status.assert_existing_objects_matched()
            except AssertionError as err:
                raise CheckpointError(
                    f"Checkpoint {latest} does not match the model built from "
                    f"{self.run_dir / CONFIG_FILE}: {str(err)[:300]}. Start over with --fresh.") from err
            # What is saved but not restored on purpose: the loss scale, resuming without
            # float16 (and the old wrapper's own unused counters). Silences TF's warnings.
            status.expect_partial()
            if checkpoint is not self.checkpoint:  # the manager numbers saves by this counter
                self.checkpoint.save_counter.assign(checkpoint.save_counter)
            if "epoch_position" not in saved:
                # Written before epoch_position existed: batches x B, exact unless a sample
                # before the resume point was unreadable.
                self.epoch_position.assign(int(self.batch_in_epoch.numpy()) * self.global_batch)
            self._reconcile_logs()
            return True
        self.fill_queues()
        return False

    @staticmethod
    def _saved_keys(checkpoint_path: str) -> set[str]:
        import tensorflow as tf

        return set(tf.train.load_checkpoint(checkpoint_path).get_variable_to_shape_map())

    def _checkpoint_for(self, saved: set[str], saved_keys: set[str] = frozenset()):
        """The checkpoint object to restore a checkpoint holding `saved` (top-level names) and
        `saved_keys` (variable keys) from: less what an older checkpoint does not have yet, and
        with an older mixed_float16 checkpoint's optimizer layout (Adam inside its loss-scale
        wrapper), which the current precision may not have."""
        import tensorflow as tf

        optional = {"epoch_position", LOSS_SCALE} & set(self.checkpointed)
        wrapped_layout = any(key.startswith("optimizer/inner_optimizer/") for key in saved_keys)
        if optional <= saved and not wrapped_layout:
            return self.checkpoint
        objects = {name: value for name, value in self.checkpointed.items()
                   if name in saved or name not in optional}
        if wrapped_layout:
            objects.pop(LOSS_SCALE, None)
            # The loss scale came along inside the wrapper; without float16 now, only Adam.
            objects["optimizer"] = (self.optimizer if self.optimizer is not self._inner_optimizer
                                    else tf.train.Checkpoint(inner_optimizer=self.optimizer))
        return tf.train.Checkpoint(**objects)

    def _check_geometry(self, checkpoint_path: str):
        import tensorflow as tf

        reader = tf.train.load_checkpoint(checkpoint_path)
        saved = reader.get_tensor("geometry/.ATTRIBUTES/VARIABLE_VALUE").tolist()
        diffs = [f"{name}: saved {old}, now {new}" for name, old, new
                 in zip(self.GEOMETRY_FIELDS, saved, self._geometry()) if old != new]
        if diffs:
            raise CheckpointError(
                f"Cannot resume {self.run_dir} exactly: {'; '.join(diffs)}. The data order and the "
                f"queue depend on these. Restore the run's training files (its ids are in "
                f"{self.run_dir / SPLIT_FILE}) or start over with --fresh.")

    def _reconcile_logs(self):
        """Drops log rows written after the restored checkpoint (a crash between log and save)."""
        import pandas as pd

        for name, column, limit in (("log.csv", "epoch", int(self.epoch.numpy())),
                                    ("log_steps.csv", "step", int(self.step.numpy()))):
            path = self.run_dir / name
            if not path.exists():
                continue
            frame = pd.read_csv(path)
            kept = frame[frame[column] <= limit]
            if len(kept) < len(frame):
                atomic_write_text(path, kept.to_csv(index=False))

    def _epoch_totals(self) -> dict:
        values = self.epoch_sums.numpy()
        counted, skipped_steps, skipped_samples = values[-3:]
        means = {key: values[i] / counted for i, key in enumerate(self.sum_keys)} if counted else {}
        return {"means": means, "counted": int(counted), "skipped_steps": int(skipped_steps),
                "skipped_samples": int(skipped_samples)}

    def _progress_values(self, logs: dict, step_seconds: float) -> list:
        inter = sum(v for k, v in logs.items() if k.startswith("inter_"))
        intra = sum(v for k, v in logs.items() if k.startswith("intra_"))
        values = [("loss", logs["loss"]), ("inter", inter), ("intra", intra),
                  ("acc", logs["accuracy"])]
        if self.verbose >= 2:  # every pair's terms
            values += [(name, logs[name]) for name in self.term_names]
        if step_seconds is None:  # no step ran in this session
            return values
        return values + [("samples/s", self.global_batch / max(step_seconds, 1e-9))]

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, *, time_limit: float | None = None) -> TrainResult:
        import keras
        import tensorflow as tf

        started = time.monotonic()
        tc = self.config.train
        resumed = self.restore_or_initialize()
        if self.verbose:
            where = f"resumed at step {int(self.step.numpy())}" if resumed else "fresh run"
            print(f"Training {self.run_dir} ({where}): {len(self.train_catalog)} samples, "
                  f"{self.steps_per_epoch} steps/epoch, batch {self.global_batch}, queue "
                  f"{self.queue_size}, pairs {len(self.pairs)}, {self.replicas} replica(s), "
                  f"precision {self.precision}")
        writer = _summary_writer(self.run_dir / "tensorboard")
        history = []
        consecutive_bad = 0
        step_seconds = None
        status = "completed"
        last_path = self.manager.latest_checkpoint
        self._notify("on_train_begin", {"step": int(self.step.numpy()), "resumed": resumed})

        while int(self.epoch.numpy()) < tc.epochs:
            epoch = int(self.epoch.numpy())
            done_in_epoch = int(self.batch_in_epoch.numpy())
            start_position = int(self.epoch_position.numpy())
            dataset = self.dataset(epoch, start_position=start_position, with_positions=True)
            dataset = self.strategy.experimental_distribute_dataset(dataset)
            progbar = keras.utils.Progbar(self.steps_per_epoch, verbose=self.verbose,
                                          stateful_metrics=["samples/s"]) if self.verbose else None
            if progbar is not None:
                print(f"Epoch {epoch + 1}/{tc.epochs}")
                progbar.update(done_in_epoch)
            self.skipped_samples.reset()
            sums = self.epoch_sums.numpy().copy()  # restored mid-epoch, or zeros
            # Unreadable samples passed before a resume (plan places without a batch slot), as
            # the checkpoint counted them (also for checkpoints from before epoch_position).
            skipped_before = int(sums[-1])
            epoch_started = time.monotonic()
            self._notify("on_epoch_begin", epoch)
            for batch in dataset:
                step_started = time.monotonic()
                positions = batch.pop("position")                           # [B] plan places
                logs = self._train_step(batch)
                self.epoch_position.assign(1 + max(
                    int(np.max(p)) for p in self.strategy.experimental_local_results(positions)))
                logs = {k: float(v.numpy()) for k, v in logs.items()}
                seconds = time.monotonic() - step_started
                step_seconds = seconds if step_seconds is None else 0.9 * step_seconds + 0.1 * seconds
                if logs["skipped"]:
                    sums[-2] += 1
                if logs["nonfinite"]:
                    consecutive_bad += 1
                    if consecutive_bad >= tc.max_nonfinite_steps:
                        raise TrainingError(
                            f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                            f"(step {int(self.step.numpy())}); training stopped. The last good "
                            f"checkpoint is intact: {last_path}. Lower train.learning_rate, check "
                            f"the data with `cmc-kit validate`, or raise train.max_nonfinite_steps.")
                else:
                    consecutive_bad = 0
                if not logs["nonfinite"]:  # finite loss: logged, even if the update was skipped
                    sums[-3] += 1
                    sums[:len(self.sum_keys)] += [logs[key] for key in self.sum_keys]
                step = int(self.step.numpy())
                in_epoch = int(self.batch_in_epoch.numpy())
                # Exact, unlike the counter, which also sees samples the pipeline read ahead.
                sums[-1] = skipped_before + (int(self.epoch_position.numpy()) - start_position) \
                    - (in_epoch - done_in_epoch) * self.global_batch
                self.epoch_sums.assign(sums)
                self._notify("on_train_batch_end", step, logs)
                if progbar is not None:
                    shown = logs
                    if in_epoch >= self.steps_per_epoch:
                        # Keras's Progbar shows the values of its final update as they are (it
                        # expects epoch means, as fit passes): the epoch's means, not this step's.
                        shown = {**logs, **self._epoch_totals()["means"]}
                    progbar.update(min(in_epoch, self.steps_per_epoch),
                                   values=self._progress_values(shown, step_seconds))
                if tc.log_every_steps and step % tc.log_every_steps == 0:
                    self._append_csv(self.run_dir / "log_steps.csv", {"step": step, **logs})
                    with writer.as_default(step=step):
                        for name, value in logs.items():
                            _scalar(writer, f"step/{name}", value)
                epoch_ends_now = in_epoch >= self.steps_per_epoch  # the epoch-end save follows
                if (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0
                        and not epoch_ends_now):
                    last_path = self.save()
                if (time_limit is not None and not epoch_ends_now
                        and self._out_of_time(started, time_limit, step_seconds)):
                    last_path = self.save()
                    status = "time_limit"
                    break
            if status == "time_limit":
                break
            # epoch end
            end_started = time.monotonic()
            sums[-1] = skipped_before + self.skipped_samples.count  # incl. after the last step
            self.epoch_sums.assign(sums)
            totals = self._epoch_totals()
            in_epoch = int(self.batch_in_epoch.numpy())
            if progbar is not None and in_epoch < self.steps_per_epoch:
                # Unreadable samples cost this epoch a batch: the bar never reached its target,
                # so finish it here, with the epoch's means.
                values = (self._progress_values(totals["means"], step_seconds)
                          if totals["means"] else None)
                progbar.update(in_epoch, values=values, finalize=True)
            if totals["counted"] == 0:
                warnings.warn(f"Epoch {epoch + 1} of {self.run_dir} had no step with a finite loss "
                              "(all were non-finite or unreadable).", stacklevel=2)
            seconds = time.monotonic() - epoch_started
            row = {"epoch": epoch + 1, "step": int(self.step.numpy()), **totals["means"],
                   "learning_rate": self._current_lr(), "skipped_steps": totals["skipped_steps"],
                   "skipped_samples": totals["skipped_samples"], "seconds": round(seconds, 3),
                   "samples_per_s": round((int(self.batch_in_epoch.numpy()) - done_in_epoch)
                                          * self.global_batch / max(seconds, 1e-9), 2)}
            self.epoch.assign_add(1)
            self.batch_in_epoch.assign(0)
            self.epoch_position.assign(0)
            self.epoch_sums.assign(tf.zeros_like(self.epoch_sums))
            row.update(self._epoch_evaluation(epoch + 1))
            self._append_csv(self.run_dir / "log.csv", row)
            with writer.as_default(step=int(self.step.numpy())):
                for name, value in row.items():
                    if name not in ("epoch", "step") and isinstance(value, (int, float)):
                        _scalar(writer, f"epoch/{name}", value)
            writer.flush()
            history.append(row)
            last_path = self.save()
            self._epoch_end_seconds = time.monotonic() - end_started
            self._notify("on_epoch_end", epoch, row)
            if self.verbose:
                extra = f", knn_acc {row['knn_accuracy']:.3f}" if "knn_accuracy" in row else ""
                print(f"  loss {row.get('loss', float('nan')):.4f}{extra}; saved {last_path}")
            if time_limit is not None and self._out_of_time(started, time_limit, step_seconds):
                status = "time_limit" if int(self.epoch.numpy()) < tc.epochs else status
                break
        self._notify("on_train_end", {"status": status, "step": int(self.step.numpy())})
        if status == "time_limit" and self.verbose:
            # A new line first: Keras's progress bar leaves the cursor at the end of its line.
            print(f"\nStopped before the time limit at step {int(self.step.numpy())}; run the "
                  "same command (or notebook 03_resume) again to continue.")
        return TrainResult(status=status, epoch=int(self.epoch.numpy()), step=int(self.step.numpy()),
                           run=self.run_dir, checkpoint=last_path, history=history)

    def _notify(self, hook: str, *args):
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def _out_of_time(self, started: float, limit: float, step_seconds: float | None) -> bool:
        # Room for one more step, a checkpoint and the epoch-end work (embeddings, kNN, save) as
        # last measured; at least 30 s for real session limits.
        margin = 3 * (step_seconds or 0.0) + self._epoch_end_seconds
        if limit > 120:
            margin = max(30.0, margin)
        return time.monotonic() - started + margin >= limit

    def _current_lr(self) -> float:
        lr = self._inner_optimizer.learning_rate
        return float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr))

    def _epoch_evaluation(self, epoch: int) -> dict:
        """Embeds a fixed held-out subset (saved for the explorer) and, if enabled, a kNN accuracy."""
        tc = self.config.train
        if self.eval_catalog is None or len(self.eval_catalog) == 0 or tc.eval_subset <= 0:
            return {}
        from cmc_kit import embed, probes

        eval_subset = self.eval_catalog.iloc[:tc.eval_subset]
        kwargs = dict(view=self.config.model.views[0], source="trunk",
                      crop_size=self.config.data.crop_size,
                      batch_size=max(self.global_batch, 16), progress=False)
        table = embed.compute_embeddings(self.online, eval_subset, metadata_csv=self.metadata_csv,
                                         **kwargs)
        embed.save_table(table, self.run_dir / "embeddings" / f"epoch_{epoch:03d}.parquet")
        if not tc.knn_every_epoch:
            return {}
        bank = self.train_catalog.iloc[:max(2 * tc.eval_subset, 32)]
        bank_table = embed.compute_embeddings(self.online, bank, **kwargs)
        predictions = probes.knn_classify(
            embed.embedding_matrix(bank_table), bank_table["dominant_class_id"].to_numpy(),
            embed.embedding_matrix(table), k=min(20, len(bank_table)), num_classes=7)
        accuracy = float(np.mean(predictions == table["dominant_class_id"].to_numpy()))
        return {"knn_accuracy": round(accuracy, 4)}

    @staticmethod
    def _append_csv(path: Path, row: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        exists = path.exists()
        if exists:
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), None) or []
            missing = [k for k in row if k not in header]
            if missing:  # new columns (e.g. knn enabled later): rewrite with the wider header
                import pandas as pd
                frame = pd.read_csv(path)
                frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
                atomic_write_text(path, frame.to_csv(index=False))
                return
        else:
            header = list(row)
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------

def _catalog_for(data, *, check_pixels: bool) -> Any:
    """The usable samples of a dataset: fully decoded when a run is created, so bad files never
    reach an epoch; header checks only when resuming (the split is fixed by then)."""
    from cmc_kit import data as data_module

    if hasattr(data, "columns"):
        return data
    report = data_module.validate(data, check_pixels=check_pixels)
    if report.num_usable == 0:
        report.require_usable()
    problems = len(report.problems)
    if problems:
        warnings.warn(f"{problems} problem(s) found in {data}; {report.num_usable} usable samples "
                      f"kept. Run `cmc-kit validate {data}` for the list.", stacklevel=2)
    return report.usable


def new_run_split(catalog, config: Config) -> dict:
    """{'train': ids, 'validation': ids} for a new run (what RUN/split.json keeps)."""
    from cmc_kit import data as data_module

    train_df, val_df = data_module.split_catalog(
        catalog, validation_fraction=config.data.validation_fraction, seed=config.data.split_seed)
    return {"train": list(train_df["id"]), "validation": list(val_df["id"])}


def apply_split(catalog, split: dict) -> dict:
    """{'train': df, 'validation': df} from a catalog and a stored split (ids absent are dropped)."""
    out = {}
    for name in ("train", "validation"):
        wanted = set(split[name])
        out[name] = catalog[catalog["id"].isin(wanted)].reset_index(drop=True)
    missing = len(split["train"]) - len(out["train"])
    if missing:
        warnings.warn(f"{missing} training id(s) of this run are not in the dataset (missing, "
                      "or excluded by validation).", stacklevel=2)
    return out


def resolve_config(run_dir: Path, *, preset_name: str | None, epochs: int | None,
                   overrides: list[str] | dict | None, fresh: bool) -> Config:
    """The config to train with: saved (resume) or preset (new run) plus overrides.

    On resume, the model fields, batch, queue multiplier, pairs and seed must match the saved
    config; anything else (epochs, learning rate, time limit...) may change.
    """
    config_path = Path(run_dir) / CONFIG_FILE
    saved = None if fresh or not config_path.exists() else Config.load(config_path)
    if saved is not None and preset_name is None:
        base = saved
    else:
        base = preset(preset_name or "cpu-demo")
    config = base.with_overrides(overrides or [])
    if epochs is not None:
        config = config.with_overrides({"train.epochs": epochs})
    if saved is not None:
        diffs = config.model_differences(saved)
        if diffs:
            raise CheckpointError(
                f"{run_dir} was trained with different settings ({'; '.join(diffs)}). Resume with "
                f"the saved settings (drop these from --preset/--set or OVERRIDES), use another "
                f"run directory (--run / RUN_DIR), or start over (--fresh / FRESH = True).")
    return config


def has_checkpoint(run_dir: Path) -> bool:
    """True when the run directory's checkpoint state names a checkpoint."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(Path(run_dir) / CHECKPOINT_DIR)) is not None



def find_previous_run(source: Path) -> Path | None:
    """A run directory (holding config.json and checkpoints/) at or below `source`."""
    source = Path(source)
    if (source / CONFIG_FILE).exists() and (source / CHECKPOINT_DIR).is_dir():
        return source
    for config_path in sorted(source.rglob(CONFIG_FILE)):
        if (config_path.parent / CHECKPOINT_DIR).is_dir():
            return config_path.parent
    return None


def import_previous_run(source: Path, run_dir: Path) -> Path:
    """Copies a previous run (e.g. a Kaggle notebook version's output under /kaggle/input) into
    the writable run directory, unless that already holds a checkpoint."""
    previous = find_previous_run(source)
    if previous is None:
        raise CheckpointError(f"No run directory (config.json + checkpoints/) found under {source}. "
                              "Attach the previous notebook version's output, or leave out --resume-from "
                              "(RESUME_FROM = None in 03_resume).")
    run_dir = Path(run_dir)
    if has_checkpoint(run_dir):
        return run_dir
    if previous.resolve() == run_dir.resolve():
        return run_dir
    tmp = run_dir.with_name(run_dir.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(previous, tmp)
    if run_dir.exists():
        for child in tmp.iterdir():
            target = run_dir / child.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(child), str(target))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, run_dir)
    # CheckpointManager stores absolute paths: point them at the new location.
    state_file = run_dir / CHECKPOINT_DIR / "checkpoint"
    if state_file.exists():
        text = state_file.read_text()
        text = text.replace(str(previous / CHECKPOINT_DIR), str(run_dir / CHECKPOINT_DIR))
        atomic_write_text(state_file, text)
    return run_dir


def train(data, run, config: Config | None = None, *, fresh: bool = False,
          time_limit: float | str | None = None, resume_from: Path | None = None,
          verbose: int = 1, dataset_transform: Callable | None = None,
          callbacks: list | None = None) -> TrainResult:
    """Trains a run directory on a dataset, resuming from its latest checkpoint if present.

    Args:
        data: dataset root (PNG triplets, any depth) or a catalog DataFrame.
        run: run directory; created if needed.
        config: settings for a new run (default: saved config.json, else the cpu-demo preset).
        fresh: delete the run's checkpoints, logs and split and start over (a previous output
            attached on Kaggle is then ignored).
        time_limit: seconds (or "11.5h") after which to checkpoint and return cleanly.
        resume_from: a previous run directory to copy in and continue (Kaggle inputs); None:
            on Kaggle, one named like `run` under /kaggle/input, if any.
        callbacks: keras.callbacks.Callback-like objects (e.g. a live loss plot).
    """
    run_dir = Path(run)
    _refuse_fresh_with_resume_from(fresh, resume_from)
    _recover_set_aside(run_dir)
    # fresh: the old run is moved aside, not deleted, until every setting and the data have
    # been checked; a typo in --data or --set then leaves it as it was.
    set_aside = _SetAside(run_dir, RUN_OUTPUTS) if fresh else None
    try:
        _bring_in_previous(run_dir, resume_from, fresh)
        if config is None:
            config = resolve_config(run_dir, preset_name=None, epochs=None, overrides=None,
                                    fresh=fresh)
        saved_path = run_dir / CONFIG_FILE
        if saved_path.exists() and has_checkpoint(run_dir):
            diffs = config.model_differences(Config.load(saved_path))
            if diffs:
                raise CheckpointError(f"{run_dir} was trained with different settings "
                                      f"({'; '.join(diffs)}). Use another run directory or "
                                      "fresh=True.")
        split_path = run_dir / SPLIT_FILE
        resuming = split_path.exists()
        catalog = _catalog_for(data, check_pixels=not resuming)
        if resuming:
            split_ids = read_json(split_path)
            catalog = _keep_lost_training_samples(catalog, split_ids, data, run_dir,
                                                  cache=config.data.cache)
        else:
            split_ids = new_run_split(catalog, config)
        split = apply_split(catalog, split_ids)
        metadata_csv = None
        if not hasattr(data, "columns"):
            from cmc_kit.embed import find_metadata_csv
            metadata_csv = find_metadata_csv(data)
        # Checks every setting (strategy, pairs, crop size...) before anything is written.
        trainer = Trainer(config, run_dir, split["train"], split["validation"], verbose=verbose,
                          dataset_transform=dataset_transform, callbacks=callbacks,
                          metadata_csv=metadata_csv)
        # The input pipeline's own checks (the cache, its image size); reads no batch.
        trainer.dataset(0, transform=False)
    except BaseException:
        if set_aside is not None:
            set_aside.put_back()
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_text(split_path, json.dumps(split_ids) + "\n")
    config_to_save = config
    reached = _saved_state(run_dir).get("epoch")
    if saved_path.exists() and reached is not None and config.train.epochs < reached:
        # Asking for fewer epochs than done trains nothing; it must not shrink the run's goal.
        kept = Config.load(saved_path).train.epochs
        warnings.warn(f"train.epochs {config.train.epochs} is below the {reached} epoch(s) "
                      f"{run_dir} has trained: nothing to train. Its config.json keeps "
                      f"train.epochs {kept}.", stacklevel=2)
        config_to_save = config.with_overrides({"train.epochs": kept})
    config_to_save.save(saved_path)
    if set_aside is not None:
        set_aside.discard()
    return trainer.fit(time_limit=parse_duration(time_limit, "time_limit"))


# What a run directory holds that `fresh` replaces (folders and files).
RUN_OUTPUTS = (CHECKPOINT_DIR, "tensorboard", "embeddings", STATE_FILE, "log.csv",
               "log_steps.csv", SPLIT_FILE, CONFIG_FILE,
               # made from the run by the demo and notebooks 04/05: stale after a fresh start
               "umap_cache", "evaluation.csv", "explorer.html", "mosaic.png",
               "embedding_over_epochs.html")


SET_ASIDE_DIR = ".before-fresh"


def _recover_set_aside(run_dir: Path) -> None:
    """Puts back a run that a `fresh` start had moved aside when its process was killed before
    the new run's first checkpoint (the new run's files, if any, give way)."""
    folder = Path(run_dir) / SET_ASIDE_DIR
    if not folder.is_dir() or has_checkpoint(run_dir):
        return
    aside = _SetAside.left_behind(run_dir)
    if aside.moved:
        warnings.warn(f"Restoring {run_dir} from {folder}: a fresh start was interrupted before "
                      "its first checkpoint.", stacklevel=3)
    aside.put_back()


class _SetAside:
    """Moves a run's outputs into RUN/.before-fresh (a rename: nothing is copied) and either
    puts them back (the new run failed its checks) or deletes them (it passed)."""

    def __init__(self, run_dir: Path, names):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / SET_ASIDE_DIR
        # Still here only next to a newer run's checkpoint (else recovered): superseded.
        shutil.rmtree(self.folder, ignore_errors=True)
        self.moved = [name for name in names if (self.run_dir / name).exists()]
        if self.moved:
            self.folder.mkdir(parents=True)
            for name in self.moved:
                os.replace(self.run_dir / name, self.folder / name)

    @classmethod
    def left_behind(cls, run_dir: Path) -> "_SetAside":
        """The outputs an interrupted process had set aside, to put back."""
        aside = cls.__new__(cls)
        aside.run_dir, aside.folder = Path(run_dir), Path(run_dir) / SET_ASIDE_DIR
        aside.moved = [child.name for child in aside.folder.iterdir()]
        return aside

    def put_back(self) -> None:
        for name in self.moved:
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.folder / name, target)
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _bring_in_previous(run_dir: Path, resume_from, fresh: bool) -> None:
    """Copies `resume_from` (None: on Kaggle, an attached previous output; nothing with
    `fresh`) into an empty run directory; a run directory with a checkpoint continues itself."""
    if resume_from is None and not fresh:
        resume_from = find_previous_output(run_dir)  # on Kaggle: a previous version's output
    elif resume_from is not None and has_checkpoint(run_dir):
        warnings.warn(f"{run_dir} already holds a checkpoint (step {_saved_state(run_dir).get('step', 'unknown')}), so "
                      f"{resume_from} is not copied in: {run_dir} continues. To continue "
                      f"{resume_from} instead, give another run directory.", stacklevel=3)
        return
    if resume_from is not None:
        import_previous_run(Path(resume_from), run_dir)


def _saved_state(run_dir: Path) -> dict:
    """RUN/state.json of a run that holds a checkpoint (epoch, step, ...); {} otherwise."""
    if not has_checkpoint(run_dir):
        return {}
    try:
        return read_json(Path(run_dir) / STATE_FILE)
    except (OSError, ValueError):
        return {}


def _keep_lost_training_samples(catalog, split: dict, data, run_dir: Path, *, cache=None):
    """On resume, training samples whose files went missing or broke since the run began stay
    in the catalog (with their old or expected paths), in the catalog's id order: the epoch
    plan, which the exact resume depends on, keeps its length and its rows, and the pipeline
    skips and counts them like any unreadable file (with a cache, it still reads them there)."""
    import pandas as pd

    from cmc_kit import data as data_module

    if hasattr(data, "columns"):
        return catalog
    lost = sorted(set(split["train"]) - set(catalog["id"]), key=data_module._id_sort_key)
    lost_validation = set(split["validation"]) - set(catalog["id"])
    if lost_validation:
        warnings.warn(f"{len(lost_validation)} held-out sample(s) of {run_dir} can no longer be "
                      "read; the evaluations leave them out.", stacklevel=3)
    if not lost:
        return catalog
    found = data_module.discover(data, include_incomplete=True).set_index("id")
    rows = []
    for sample_id in lost:
        row = {"id": sample_id}
        for view, suffix in data_module.VIEW_SUFFIXES.items():
            path = found.at[sample_id, view] if sample_id in found.index else None
            # A sample deleted outright: its expected name at the dataset root.
            row[view] = path if isinstance(path, str) else str(Path(data) / f"{sample_id}_{suffix}.png")
        rows.append(row)
    shown = f"{', '.join(map(str, lost[:5]))}{', ...' if len(lost) > 5 else ''}"
    if cache:
        what = f"training reads them from the cache {cache}"
    else:
        what = ("every epoch skips them and log.csv counts them (skipped_samples); the resume is "
                "exact otherwise")
    warnings.warn(f"{len(lost)} training sample(s) of {run_dir} can no longer be read from "
                  f"{data} ({shown}): {what}. Run `cmc-kit validate {data}` for the files.",
                  stacklevel=3)
    kept = pd.concat([catalog, pd.DataFrame(rows, columns=catalog.columns)], ignore_index=True)
    order = sorted(range(len(kept)), key=lambda i: data_module._id_sort_key(str(kept.at[i, "id"])))
    return kept.iloc[order].reset_index(drop=True)


def train_from_cli(*, data, run, preset_name=None, epochs=None, overrides=None, fresh=False,
                   time_limit=None, resume_from=None) -> TrainResult:
    _refuse_fresh_with_resume_from(fresh, resume_from)
    _bring_in_previous(Path(run), resume_from, fresh)  # first: its config.json is the saved one
    config = resolve_config(Path(run), preset_name=preset_name, epochs=epochs,
                            overrides=overrides, fresh=fresh)
    result = train(data, run, config, fresh=fresh, time_limit=time_limit)
    print(f"{result.status}: epoch {result.epoch}, step {result.step}; run directory {result.run}")
    return result


def _refuse_fresh_with_resume_from(fresh: bool, resume_from) -> None:
    """`fresh` starts over, `resume_from` continues another run: asking for both is a mistake.

    (`fresh` alone also ignores a previous output attached on Kaggle: starting over must not
    quietly continue the attached run.)
    """
    if fresh and resume_from is not None:
        raise CheckpointError(f"fresh=True (--fresh) starts the run over, but resume_from "
                              f"(--resume-from) {resume_from} asks to continue that run. "
                              "Drop one of the two.")


def find_previous_output(run, input_root: Path | None = None) -> Path | None:
    """A previous Kaggle notebook version's copy of this run, attached as input.

    Looks under `input_root` (default: /kaggle/input when running on Kaggle, else nowhere) for a
    run directory with the same name as `run`; None when `run` already holds a checkpoint.
    """
    run_dir = Path(run)
    if has_checkpoint(run_dir):
        return None
    if input_root is None:
        if not on_kaggle():
            return None
        input_root = default_paths()["input"]
    input_root = Path(input_root)
    if not input_root.is_dir():
        return None
    for config_path in sorted(input_root.rglob(CONFIG_FILE)):
        candidate = config_path.parent
        if candidate.name == run_dir.name and (candidate / CHECKPOINT_DIR).is_dir():
            print(f"Continuing from the previous notebook output {candidate}")
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Reading runs back
# ---------------------------------------------------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[dict]:
    """Kept checkpoints, oldest first: {path, step, epoch, batch_in_epoch} read from each one."""
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(Path(run_dir) / CHECKPOINT_DIR))
    if state is None:
        return []
    out = []
    for path in state.all_model_checkpoint_paths:
        path = str(Path(run_dir) / CHECKPOINT_DIR / Path(path).name)
        try:
            reader = tf.train.load_checkpoint(path)
            values = {name: int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                      for name in ("step", "epoch", "batch_in_epoch")}
        except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as err:
            raise CheckpointError(f"Checkpoint {path} cannot be read ({str(err)[:200]}). Delete "
                                  "it (and its entry in checkpoints/checkpoint) to use the "
                                  "previous one, or start over with --fresh.") from err
        out.append({"path": path, **values})
    return out


def run_info(run) -> dict:
    run_dir = Path(run)
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}). Train one with "
                              f"`cmc-kit train --data DATA --run {run_dir}` or notebook 02_train "
                              "with this RUN_DIR.")
    config = Config.load(run_dir / CONFIG_FILE)
    state = read_json(run_dir / STATE_FILE) if (run_dir / STATE_FILE).exists() else {}
    checkpoints = list_checkpoints(run_dir)
    return {
        "run": str(run_dir),
        "epoch": state.get("epoch", 0),
        "epochs": config.train.epochs,
        "step": state.get("step", 0),
        "queue_fill": state.get("queue_fill", 0),
        "queue_size": state.get("queue_size"),
        "skipped_steps": state.get("skipped_steps", 0),
        "latest_checkpoint": checkpoints[-1]["path"] if checkpoints else None,
        "checkpoints": [c["path"] for c in checkpoints],
        "config": config.to_dict(),
    }


class RunHandle:
    """A trained run, read back: config, split, checkpoints and encoders with restored weights."""

    def __init__(self, run_dir: Path, checkpoint: str | None = None):
        self.run_dir = Path(run_dir)
        info = run_info(self.run_dir)
        self.config = Config.load(self.run_dir / CONFIG_FILE)
        self.checkpoints = list_checkpoints(self.run_dir)
        if checkpoint is None and not self.checkpoints:
            raise CheckpointError(f"{self.run_dir} has no checkpoint yet. Train it first.")
        self.checkpoint_path = checkpoint or self.checkpoints[-1]["path"]
        self.epoch, self.step = info["epoch"], info["step"]
        for entry in self.checkpoints:
            if entry["path"] == self.checkpoint_path:
                self.epoch, self.step = entry["epoch"], entry["step"]
        self._encoders = {}

    def encoder(self, network: str = "online"):
        import tensorflow as tf

        from cmc_kit import models

        if network not in ("online", "momentum"):
            raise ValueError(f"network must be 'online' or 'momentum'. Received: {network!r}")
        if network not in self._encoders:
            online = models.build_encoder(self.config.model, crop_size=self.config.data.crop_size,
                                          name="online")
            momentum = models.build_momentum_twin(online, name="momentum")
            checkpoint = tf.train.Checkpoint(online=online, momentum=momentum)
            checkpoint.restore(self.checkpoint_path).expect_partial().assert_existing_objects_matched()
            self._encoders = {"online": online, "momentum": momentum}
        return self._encoders[network]

    def split_ids(self) -> dict:
        """{'train': ids, 'validation': ids} of RUN/split.json."""
        split_path = self.run_dir / SPLIT_FILE
        if not split_path.exists():
            raise CheckpointError(f"{split_path} is missing, so the held-out samples are unknown. "
                                  "Restore it from the run's output.")
        return read_json(split_path)

    def split(self, catalog) -> dict:
        return apply_split(catalog, self.split_ids())


def load_run(run, checkpoint: str | None = None) -> RunHandle:
    return RunHandle(Path(run), checkpoint)
