"""The Trainer: builds a run's networks, optimizer, queues, state and step, and trains them in
epochs of steps with a time limit and callbacks (`launch.train` does it for a run directory).

One `Trainer` owns everything that must survive a restart (online and momentum weights, the
queues and their write pointer, the optimizer, the step and epoch counters and the place in
the epoch's sample plan) inside one `tf.train.Checkpoint`, so resuming never rebuilds anything
at random.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from cmc_kit import models, objectives, runs, views
from cmc_kit.config import Config
from cmc_kit.errors import ConfigError, TrainingError
from cmc_kit.fileio import free_megabytes, write_problem
from cmc_kit.training import cluster, devices, health
from cmc_kit.training.logs import RunLog
from cmc_kit.training.queues import MemoryQueues, queue_size
from cmc_kit.training.schedules import make_learning_rate
from cmc_kit.training.state import (Checkpointer, EpochTally, TrainState, saved_optimizer,
                                    state_summary)
from cmc_kit.training.step import StepSettings, build_train_step, jit_mode


@dataclasses.dataclass
class TrainResult:
    status: str            # "completed", "time_limit"
    epoch: int
    step: int
    run: Path
    checkpoint: str | None
    history: list[dict]


@dataclasses.dataclass
class _Session:
    """What one `fit` call tracks beyond the checkpoint: its clock and its recent steps."""

    started: float
    time_limit: float | None
    last_checkpoint: str | None
    step_seconds: float | None = None  # moving average; None until a step ran
    consecutive_bad: int = 0

    def timed(self, seconds: float) -> None:
        self.step_seconds = (seconds if self.step_seconds is None
                             else 0.9 * self.step_seconds + 0.1 * seconds)


@dataclasses.dataclass
class _EpochRun:
    """An epoch in progress: where it started (maybe mid-epoch, after a resume)."""

    epoch: int
    done_before: int        # batches done before this session (a resumed epoch)
    start_position: int     # the plan place this session started at
    skipped_before: int     # unreadable samples the epoch passed before this session
    started: float
    tally: EpochTally
    progbar: keras.utils.Progbar | None


class Trainer:
    """Builds models, optimizer, queues and checkpoint for one run directory and trains them.

    Args:
        config: the run's Config.
        run_dir: where checkpoints and logs go.
        train_catalog: DataFrame of training samples (id, terrain, height, segmentation).
        eval_catalog: held-out samples, for callbacks that evaluate per epoch (optional).
        verbose: 0 silent, 1 progress bar per epoch, 2 also every pair's loss terms.
        strategy: a tf.distribute strategy (default: `select_strategy(train.strategy)`).
        workers: `cluster.Workers` of that strategy, if already built (`launch.train` has one).
        dataset_transform: applied to every epoch's dataset (tests, experiments). Training
            batches also hold "position": int64 [B], the samples' plan places, from which the
            checkpoint's resume point is taken: pass it through unchanged.
        callbacks: keras.callbacks.Callback objects (or anything with the same hooks):
            on_train_begin, on_epoch_begin, on_train_batch_end(step, logs),
            on_epoch_end(epoch, row) (before the row is logged, so a callback may add values,
            e.g. `embed.EpochEmbeddings`), on_train_end; `set_trainer(trainer)` if defined.
            Several workers: called on the chief only, which alone writes the run directory
            (`trainer.is_chief`); the other workers' logs are the chief's.
        jit_compile: force XLA on (True) or off (False); None follows train.jit_compile, which
            only takes effect with a GPU/TPU attached.
        metadata_csv: the dataset's metadata.csv, for callbacks that make embedding tables.
    """

    def __init__(self, config: Config, run_dir: Path, train_catalog: pd.DataFrame,
                 eval_catalog: pd.DataFrame | None = None, *, verbose: int = 1, strategy=None,
                 workers: cluster.Workers | None = None,
                 dataset_transform: Callable | None = None, callbacks: list | None = None,
                 jit_compile: bool | None = None, metadata_csv: Path | None = None):
        tc, dc, mc = config.train, config.data, config.model
        self.config = config
        self.run_dir = Path(run_dir)
        self.train_catalog = train_catalog.reset_index(drop=True)
        self.eval_catalog = eval_catalog
        self.verbose = verbose
        self.dataset_transform = dataset_transform
        self.metadata_csv = metadata_csv
        views.check_crop_size(self.train_catalog, dc.crop_size)  # before building anything

        if tc.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(tc.seed)
        # The strategy first: a TPU's devices exist only once it is initialised, and "auto"
        # precision asks which devices there are.
        self.strategy = strategy or devices.select_strategy(
            tc.strategy, collective_timeout=tc.collective_timeout)
        # One, or this worker's place among several.
        self.workers = workers or cluster.Workers(self.strategy)
        self.is_chief = self.workers.is_chief
        self.precision = devices.resolve_mixed_precision(tc.mixed_precision)
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
        self._build(tc, dc, mc)
        self.term_names = [f"{kind}_{q}-{k}" for q, k in self.pairs for kind in ("inter", "intra")]
        settings = StepSettings.from_config(
            tc, pairs=self.pairs, key_views=self.key_views, replicas=self.replicas,
            total_steps=self.total_steps, loss_scaled=self.precision == "mixed_float16")
        jit = (tc.jit_compile and devices.has_accelerator() if jit_compile is None
               else jit_compile)
        self.jit_mode = jit_mode(jit, settings)
        self.step_function = build_train_step(self.strategy, self.online, self.momentum,
                                              self.optimizer, self.queues, settings, self.jit_mode)
        self.skipped_samples = views.SkippedCounter()  # files unreadable since validation
        self.log = RunLog(self.run_dir, enabled=self.is_chief)
        self._epoch_end_seconds = 0.0  # measured cost of the epoch-end work, for the time limit
        self.collapse_watch = health.CollapseWatch(self.run_dir)
        self.callbacks = list(callbacks or [])
        for callback in self.callbacks:
            if hasattr(callback, "set_trainer"):
                callback.set_trainer(self)

    def _build(self, tc, dc, mc) -> None:
        """Networks, optimizer, queues, counters and checkpoint, inside the strategy's scope."""
        with devices.dtype_policy(self.precision), self.strategy.scope():
            self.online = models.build_encoder(mc, crop_size=dc.crop_size, name="online")
            self.momentum = models.build_momentum_twin(self.online, name="momentum")
        with self.strategy.scope():
            # Keras clips each replica's share of the gradient before summing the replicas,
            # which is not clipping the batch's gradient: with several replicas the train step
            # clips the summed gradient itself (`step.global_clipped_shares`).
            optimizer = keras.optimizers.Adam(
                learning_rate=make_learning_rate(tc, self.total_steps), beta_1=tc.beta_1,
                clipnorm=tc.clipnorm if self.replicas == 1 else None)
            if self.precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.optimizer.build(self.online.trainable_variables)
            self.queues = MemoryQueues(self.key_views, self.queue_size, mc.embedding_dim)
            tally_keys = ["loss", "accuracy", "momentum"] + [
                f"{kind}_{q}-{k}" for q, k in self.pairs for kind in ("inter", "intra")]
            self.signal_keys = [f"spread_{v}" for v in sorted(mc.views)] + ["alignment",
                                                                            "uniformity"]
            self.state = TrainState(tally_keys, [
                len(self.train_catalog), self.steps_per_epoch, self.queue_size, self.global_batch,
                tc.seed], signal_keys=self.signal_keys)
        self.checkpointer = Checkpointer(
            self.run_dir, online=self.online, momentum=self.momentum, optimizer=self.optimizer,
            queues=self.queues, state=self.state, keep=tc.keep_checkpoints,
            chief=self.is_chief, worker_index=self.workers.index)

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, epoch: int, seed: int | None = None, start_batch: int = 0,
                start_position: int | None = None, with_positions: bool = False,
                transform: bool = True):
        """The epoch's batches ({view: [B, S, S, C]}, plus "position": [B] if asked), through
        `dataset_transform` unless `transform` is False."""
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

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        """One update on a (distributed) batch; returns the step's logs as tensors."""
        logs = self.step_function(batch, self.state.step.value())
        self.state.record_step(logs["skipped"])
        return logs

    def fill_queues(self):
        """Fills the queues with momentum keys of the first K / batch batches (no random vectors)."""
        batches = self.queue_size // self.global_batch
        # A different shuffle than epoch 0, so the first training batches are not all queued.
        dataset = self.dataset(epoch=0, seed=self.config.train.seed + 1_000_003).take(batches)
        dataset = cluster.distribute_batches(self.strategy, dataset, self.global_batch,
                                             self.workers)

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
        """A checkpoint of everything a restart needs, then RUN/state.json naming it (every
        worker saves; the chief writes RUN)."""
        with self.writing("saving"):
            path = self.checkpointer.save()
            self._write_state(path)
        return path

    @contextlib.contextmanager
    def writing(self, doing: str):
        """A write to the run directory that fails for want of space or permission ends with
        one line naming the folder and what to do; the last checkpoint stays as it was (TF
        writes a checkpoint under a temporary name, removed at the next start)."""
        try:
            yield
        except (OSError, tf.errors.OpError) as err:
            problem = write_problem(err)
            if problem is None:
                raise
            step, kept = int(self.state.step.numpy()), self.checkpointer.latest
            resume = (f"The latest checkpoint, {kept}, was not touched: " if kept
                      else "No checkpoint was written yet: ")
            if problem == "no space":
                need = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
                           for v in self.checkpointer.checkpoint_variables())
                raise TrainingError(
                    f"No space left on the disk of {self.run_dir} while {doing} step {step}: "
                    f"{free_megabytes(self.run_dir):.0f} MB free, a checkpoint of this run takes "
                    f"about {need / 1e6:.0f} MB. {resume}free some space (or move the run to a "
                    "larger disk) and run the same command again to resume.") from None
            raise TrainingError(
                f"{self.run_dir} cannot be written while {doing} step {step} ({err}). {resume}"
                "make the folder writable and run the same command again.") from None

    def _write_state(self, checkpoint_path: str | None) -> None:
        if not self.is_chief:  # only the chief writes RUN
            return
        runs.write_state(self.run_dir, state_summary(
            self.state, self.queues, steps_per_epoch=self.steps_per_epoch,
            num_train=len(self.train_catalog), checkpoint_path=checkpoint_path))

    def restore_or_initialize(self) -> bool:
        """Restores the newest usable checkpoint (True) or fills the queues for a fresh run
        (False). Either way leftovers of a save killed halfway are removed first, and after a
        restore RUN/state.json says again where the run stands (a kill between a save and its
        state.json would otherwise leave it one checkpoint behind)."""
        if self.is_chief:
            self.checkpointer.remove_unfinished_saves()
        latest = self.checkpointer.latest
        # Every worker must take the same branch (both run collectives), on the same data.
        self.workers.agree({
            "the checkpoint to resume from": int(latest.rsplit("-", 1)[1]) if latest else -1,
            "the settings": cluster.fingerprint(self.config.to_dict()),
            "the training samples": cluster.fingerprint(list(self.train_catalog["id"]))},
            fix="Run the same command on every worker, with the same dataset at the same path "
                "and the same run directory, a folder all of them share (a bucket mount): the "
                "others read the chief's checkpoints.")
        if self.checkpointer.restore_latest():
            self.workers.agree(  # a damaged checkpoint passed over: by all alike
                {"the checkpoint restored": int(self.checkpointer.verified.rsplit("-", 1)[1])},
                fix="Give every worker the same run directory, a folder all of them share.")
            self._write_state(self.checkpointer.verified)
            # The checkpoint holds the optimizer's learning rate too; the settings decide it,
            # so a changed train.learning_rate applies on resume (a schedule is rebuilt anyway).
            optimizer = saved_optimizer(self.optimizer)
            if isinstance(make_learning_rate(self.config.train, self.total_steps), float):
                optimizer.learning_rate = self.config.train.learning_rate
            self.log.drop_rows_after(epoch=int(self.state.epoch.numpy()),
                                     step=int(self.state.step.numpy()))
            return True
        self.fill_queues()
        return False

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, *, time_limit: float | None = None) -> TrainResult:
        """Trains until train.epochs, or checkpoints and returns before `time_limit` seconds."""
        session = _Session(started=time.monotonic(), time_limit=time_limit, last_checkpoint=None)
        resumed = self.restore_or_initialize()
        session.last_checkpoint = self.checkpointer.latest
        if self.verbose:
            where = f"resumed at step {int(self.state.step.numpy())}" if resumed else "fresh run"
            where += f", {self.workers.describe()}" if self.workers.count > 1 else ""
            print(f"Training {self.run_dir} ({where}): {len(self.train_catalog)} samples, "
                  f"{self.steps_per_epoch} steps/epoch, batch {self.global_batch}, queue "
                  f"{self.queue_size}, pairs {len(self.pairs)}, {self.replicas} replica(s), "
                  f"precision {self.precision}")
        history, status = [], "completed"
        self._notify("on_train_begin", {"step": int(self.state.step.numpy()), "resumed": resumed})
        epochs = self.config.train.epochs
        while int(self.state.epoch.numpy()) < epochs:
            epoch_run = self._run_epoch(session)
            if epoch_run is None:
                status = "time_limit"
                break
            history.append(self._finish_epoch(epoch_run, session))
            if time_limit is not None and self._stop_for_time(session):
                status = "time_limit" if int(self.state.epoch.numpy()) < epochs else status
                break
        step = int(self.state.step.numpy())
        self._notify("on_train_end", {"status": status, "step": step})
        if status == "time_limit" and self.verbose:
            # A new line first: Keras's progress bar leaves the cursor at the end of its line.
            print(f"\nStopped before the time limit at step {step}; run the same command (or "
                  "notebook 03_resume) again to continue.")
        return TrainResult(status=status, epoch=int(self.state.epoch.numpy()), step=step,
                           run=self.run_dir, checkpoint=session.last_checkpoint, history=history)

    def _start_epoch(self) -> _EpochRun:
        epoch = int(self.state.epoch.numpy())
        done_before = int(self.state.batch_in_epoch.numpy())
        progbar = None
        if self.verbose:
            progbar = keras.utils.Progbar(self.steps_per_epoch, verbose=self.verbose,
                                          stateful_metrics=["samples/s"])
            print(f"Epoch {epoch + 1}/{self.config.train.epochs}")
            progbar.update(done_before)
        self.skipped_samples.reset()
        tally = self.state.tally()  # restored mid-epoch, or zeros
        # Unreadable samples passed before a resume (plan places without a batch slot), as
        # the checkpoint counted them (also for checkpoints from before epoch_position).
        return _EpochRun(epoch=epoch, done_before=done_before,
                         start_position=int(self.state.epoch_position.numpy()),
                         skipped_before=tally.skipped_samples, started=time.monotonic(),
                         tally=tally, progbar=progbar)

    def _run_epoch(self, session: _Session) -> _EpochRun | None:
        """The epoch's remaining steps; None when the time limit stopped it (checkpointed)."""
        run = self._start_epoch()
        tc = self.config.train
        dataset = self.dataset(run.epoch, start_position=run.start_position, with_positions=True)
        self._notify("on_epoch_begin", run.epoch)
        for batch in cluster.distribute_batches(self.strategy, dataset, self.global_batch,
                                                self.workers):
            step_started = time.monotonic()
            resume_at = batch.pop("resume_position")   # [b] per replica: after the global batch
            logs = self.train_step(batch)
            self.state.epoch_position.assign(max(
                int(np.max(p)) for p in self.strategy.experimental_local_results(resume_at)))
            logs = {k: float(v.numpy()) for k, v in logs.items()}
            session.timed(time.monotonic() - step_started)
            self._count_nonfinite(logs, session)
            run.tally.add(logs)
            step, in_epoch = int(self.state.step.numpy()), int(self.state.batch_in_epoch.numpy())
            # Exact, unlike the counter, which also sees samples the pipeline read ahead.
            run.tally.skipped_samples = (run.skipped_before + int(self.state.epoch_position.numpy())
                                         - run.start_position
                                         - (in_epoch - run.done_before) * self.global_batch)
            self.state.store_tally(run.tally)
            self._notify("on_train_batch_end", step, logs)
            epoch_ends_now = in_epoch >= self.steps_per_epoch  # the epoch-end save follows
            self._show_step(run, logs, in_epoch, session.step_seconds, epoch_ends_now)
            if tc.log_every_steps and step % tc.log_every_steps == 0:
                self.log.step_row(step, logs)
            if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0 \
                    and not epoch_ends_now:
                session.last_checkpoint = self.save()
            if session.time_limit is not None and not epoch_ends_now \
                    and self._stop_for_time(session):
                session.last_checkpoint = self.save()
                return None
        return run

    def _count_nonfinite(self, logs: dict, session: _Session) -> None:
        if not logs["nonfinite"]:
            session.consecutive_bad = 0
            return
        session.consecutive_bad += 1
        if session.consecutive_bad >= self.config.train.max_nonfinite_steps:
            raise health.nonfinite_streak(session.consecutive_bad, int(self.state.step.numpy()),
                                          session.last_checkpoint)

    def _show_step(self, run: _EpochRun, logs: dict, in_epoch: int, step_seconds: float,
                   last: bool) -> None:
        if run.progbar is None:
            return
        # Keras's Progbar shows the values of its final update as they are (it expects epoch
        # means, as fit passes): the epoch's means there, not this step's.
        shown = {**logs, **run.tally.means()} if last else logs
        run.progbar.update(min(in_epoch, self.steps_per_epoch),
                           values=self._progress_values(shown, step_seconds))

    def _finish_epoch(self, run: _EpochRun, session: _Session) -> dict:
        """The epoch's log row, callbacks, checkpoint and summary line."""
        end_started = time.monotonic()
        run.tally.skipped_samples = run.skipped_before + self.skipped_samples.count  # to the end
        self.state.store_tally(run.tally)
        means = run.tally.means()
        in_epoch = int(self.state.batch_in_epoch.numpy())
        if run.progbar is not None and in_epoch < self.steps_per_epoch:
            # Unreadable samples cost this epoch a batch: the bar never reached its target,
            # so finish it here, with the epoch's means.
            values = self._progress_values(means, session.step_seconds) if means else None
            run.progbar.update(in_epoch, values=values, finalize=True)
        if run.tally.counted == 0:
            warnings.warn(f"Epoch {run.epoch + 1} of {self.run_dir} had no step with a finite "
                          "loss (all were non-finite or unreadable).", stacklevel=3)
        seconds = time.monotonic() - run.started
        row = {"epoch": run.epoch + 1, "step": int(self.state.step.numpy()), **means,
               "learning_rate": self.current_learning_rate(),
               "skipped_steps": run.tally.skipped_steps,
               "skipped_samples": run.tally.skipped_samples, "seconds": round(seconds, 3),
               "samples_per_s": round((in_epoch - run.done_before) * self.global_batch
                                      / max(seconds, 1e-9), 2)}
        if means:
            row["embedding_spread"] = round(self.embedding_spread(means), 4)
            self.collapse_watch.check(run.epoch, row["embedding_spread"])
        self.state.next_epoch()
        self._notify("on_epoch_end", run.epoch, row)  # may add values to the row
        with self.writing("logging"):
            self.log.epoch_row(row)
        session.last_checkpoint = self.save()
        self._epoch_end_seconds = time.monotonic() - end_started
        if self.verbose:
            extra = f", knn_acc {row['knn_accuracy']:.3f}" if "knn_accuracy" in row else ""
            print(f"  loss {row.get('loss', float('nan')):.4f}{extra}; saved "
                  f"{session.last_checkpoint}")
        return row

    def _progress_values(self, logs: dict, step_seconds: float | None) -> list:
        inter = sum(v for k, v in logs.items() if k.startswith("inter_"))
        intra = sum(v for k, v in logs.items() if k.startswith("intra_"))
        values = [("loss", logs["loss"]), ("inter", inter), ("intra", intra),
                  ("acc", logs["accuracy"]), ("spread", self.embedding_spread(logs)),
                  ("unif", logs["uniformity"])]
        if self.verbose >= 2:  # every pair's terms
            values += [(name, logs[name]) for name in self.term_names]
        if step_seconds is None:  # no step ran in this session
            return values
        return values + [("samples/s", self.global_batch / max(step_seconds, 1e-9))]

    def embedding_spread(self, logs: dict) -> float:
        """`health.embedding_spread` of this run's views: ~1 healthy, ~0 collapsed."""
        return health.embedding_spread(logs, self.config.model.views,
                                       self.config.model.embedding_dim)

    def _notify(self, hook: str, *args) -> None:
        if not self.is_chief:  # callbacks write (embeddings, plots): the chief's job
            return
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def _stop_for_time(self, session: _Session) -> bool:
        """Out of time here or on another worker: all stop at the same step, or some would wait
        for the others' next step for ever."""
        return self.workers.any(self.out_of_time(session.started, session.time_limit,
                                                 session.step_seconds))

    def out_of_time(self, started: float, limit: float, step_seconds: float | None) -> bool:
        """True when one more step, a checkpoint and the epoch-end work (as last measured) would
        pass `limit` seconds after `started`; at least 30 s are kept for real session limits."""
        margin = 3 * (step_seconds or 0.0) + self._epoch_end_seconds
        if limit > 120:
            margin = max(30.0, margin)
        return time.monotonic() - started + margin >= limit

    def current_learning_rate(self) -> float:
        lr = saved_optimizer(self.optimizer).learning_rate
        return float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr))
