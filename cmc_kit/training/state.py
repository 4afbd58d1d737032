"""What a restart needs: the counters, the epoch's running sums (named), and the checkpoint
that holds them beside the networks, the optimizer and the queues."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf

from cmc_kit import runs
from cmc_kit.errors import CheckpointError, TrainingError

LOSS_SCALE = "loss_scale"  # checkpoint key of mixed_float16's dynamic loss scale
# What the data order and the queue depend on: checked before any restore, in this order.
GEOMETRY_FIELDS = ("training samples", "steps per epoch", "queue size", "global batch",
                   "data-order seed")
# Entries that checkpoints written by older versions lack.
OPTIONAL_ENTRIES = ("epoch_position", LOSS_SCALE, "epoch_signal_sums")


@dataclasses.dataclass
class EpochTally:
    """Running sums of one epoch's logged values, so a resumed epoch logs the same means.

    As a float64 vector [len(keys) + 3]: the sums of `keys` over the steps with a finite loss,
    then `counted` (those steps), `skipped_steps` (updates skipped) and `skipped_samples`
    (unreadable samples the epoch passed). The checkpoint keeps it in two variables (see
    `TrainState`).
    """

    keys: tuple[str, ...]
    sums: np.ndarray                # float64 [len(keys)]
    counted: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0

    @classmethod
    def from_vector(cls, keys, vector) -> "EpochTally":
        vector = np.asarray(vector, np.float64)
        counted, skipped_steps, skipped_samples = (int(v) for v in vector[len(keys):])
        return cls(tuple(keys), vector[:len(keys)].copy(), counted, skipped_steps, skipped_samples)

    def to_vector(self) -> np.ndarray:
        return np.concatenate([self.sums, [self.counted, self.skipped_steps,
                                           self.skipped_samples]]).astype(np.float64)

    def add(self, logs: dict) -> None:
        """One step's logs: summed when its loss was finite; a skipped update is counted."""
        if logs["skipped"]:
            self.skipped_steps += 1
        if not logs["nonfinite"]:  # finite loss: logged, even if the update was skipped
            self.counted += 1
            self.sums += [logs[key] for key in self.keys]

    def means(self) -> dict:
        """{key: mean over the counted steps}; {} before the first counted step."""
        return dict(zip(self.keys, self.sums / self.counted)) if self.counted else {}


class TrainState(tf.Module):
    """The counters of a run, as non-trainable variables saved in every checkpoint.

    step: updates tried; epoch: epochs finished; skipped: updates skipped in all; batch_in_epoch
    and epoch_position: where the current epoch stands (batches done, and the plan place the
    next batch starts at: batches x B plus the unreadable samples passed on the way, so a
    resumed epoch starts at exactly the next sample); epoch_sums: the `EpochTally`; geometry:
    what the data order depends on (`GEOMETRY_FIELDS`). Build it inside the strategy's scope.
    """

    def __init__(self, tally_keys, geometry: list[int], signal_keys=()):
        super().__init__(name="train_state")
        # The epoch's sums: `tally_keys` (losses, accuracy, momentum) and the three counts in
        # `epoch_sums`, as checkpoints have always kept them; the collapse signals, added later,
        # in `epoch_signal_sums`, which older checkpoints lack (they resume with zeros there).
        self.tally_keys = tuple(tally_keys)
        self.signal_keys = tuple(signal_keys)
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA

        def counter(name, value=0, dtype=tf.int64):
            return tf.Variable(value, dtype=dtype, trainable=False, name=name, aggregation=agg)

        self.step = counter("step")
        self.epoch = counter("epoch")
        self.skipped = counter("skipped")
        # Not derived from the global step: an epoch shortened by an unreadable file would
        # shift every later epoch.
        self.batch_in_epoch = counter("batch_in_epoch")
        self.epoch_position = counter("epoch_position")
        self.epoch_sums = counter("epoch_sums", tf.zeros([len(self.tally_keys) + 3], tf.float64),
                                  tf.float64)
        self.epoch_signal_sums = counter("epoch_signal_sums",
                                         tf.zeros([len(self.signal_keys)], tf.float64), tf.float64)
        self.geometry = counter("geometry", geometry)

    def entries(self) -> dict:
        """Checkpoint entries, by the names checkpoints have always used."""
        return dict(step=self.step, epoch=self.epoch, skipped=self.skipped,
                    batch_in_epoch=self.batch_in_epoch, epoch_position=self.epoch_position,
                    epoch_sums=self.epoch_sums, epoch_signal_sums=self.epoch_signal_sums,
                    geometry=self.geometry)

    def tally(self) -> EpochTally:
        """The epoch's running sums, over `tally_keys` then `signal_keys`."""
        core, counts = np.split(self.epoch_sums.numpy(), [len(self.tally_keys)])
        vector = np.concatenate([core, self.epoch_signal_sums.numpy(), counts])
        return EpochTally.from_vector(self.tally_keys + self.signal_keys, vector)

    def store_tally(self, tally: EpochTally) -> None:
        vector = tally.to_vector()
        core, signals, counts = np.split(vector, [len(self.tally_keys), len(tally.keys)])
        self.epoch_sums.assign(np.concatenate([core, counts]))
        self.epoch_signal_sums.assign(signals)

    def record_step(self, skipped) -> None:
        """After a train step: one more step in the run and in the epoch."""
        self.step.assign_add(1)
        self.batch_in_epoch.assign_add(1)
        self.skipped.assign_add(tf.cast(skipped, tf.int64))

    def next_epoch(self) -> None:
        self.epoch.assign_add(1)
        self.batch_in_epoch.assign(0)
        self.epoch_position.assign(0)
        self.epoch_sums.assign(tf.zeros_like(self.epoch_sums))
        self.epoch_signal_sums.assign(tf.zeros_like(self.epoch_signal_sums))

    def check_geometry(self, checkpoint_path: str, run_dir) -> None:
        """Refuses to resume when what the data order and queue depend on has changed."""
        reader = tf.train.load_checkpoint(checkpoint_path)
        saved = reader.get_tensor("geometry/.ATTRIBUTES/VARIABLE_VALUE").tolist()
        diffs = [f"{name}: saved {old}, now {new}" for name, old, new
                 in zip(GEOMETRY_FIELDS, saved, self.geometry.numpy().tolist()) if old != new]
        if diffs:
            raise CheckpointError(
                f"Cannot resume {run_dir} exactly: {'; '.join(diffs)}. The data order and the "
                f"queue depend on these. Restore the run's training files (its ids are in "
                f"{runs.SPLIT_FILE}) or start over with --fresh.")


def saved_optimizer(optimizer):
    """What the checkpoint keeps of the optimizer: Adam, also under mixed_float16's
    LossScaleOptimizer, so the layout does not depend on the precision and a run resumes on
    other hardware (2x T4 mixed_float16 -> P100 float32 -> TPU mixed_bfloat16)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class Checkpointer:
    """The run's tf.train.Checkpoint and CheckpointManager: networks, optimizer, queues, state.

    Checkpoints are numbered by the checkpoint's own save counter, never by step, so a number
    is never reused and a checkpoint never overwritten in place (TF writes its state file
    atomically). Older layouts restore too (see `_checkpoint_for`).

    Several workers: every worker saves (TensorFlow's collective save), the chief into the run
    directory, each other worker (`chief=False`) into a temporary folder of its own that is
    removed again; every worker restores the chief's checkpoints.
    """

    def __init__(self, run_dir, *, online, momentum, optimizer, queues, state: TrainState,
                 keep: int, chief: bool = True, worker_index: int = 0):
        self.run_dir = run_dir
        self.worker_index = worker_index
        self.online, self.momentum, self.optimizer, self.queues = online, momentum, optimizer, queues
        self.state = state
        inner = saved_optimizer(optimizer)
        self.objects = dict(online=online, momentum=momentum, optimizer=inner, queues=queues,
                            **state.entries())
        if inner is not optimizer:  # the loss scale (float16 only), on its own
            self.objects[LOSS_SCALE] = tf.train.Checkpoint(
                step_counter=optimizer.step_counter, dynamic_scale=optimizer.dynamic_scale)
        self.checkpoint = tf.train.Checkpoint(**self.objects)
        self.directory = str(run_dir / runs.CHECKPOINT_DIR)
        # Only the chief's manager writes (and prunes) RUN/checkpoints.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.directory, max_to_keep=keep,
            checkpoint_name=runs.CHECKPOINT_NAME) if chief else None
        self.verified: str | None = None  # the last checkpoint saved or restored and checked

    @property
    def latest(self) -> str | None:
        """The latest checkpoint; another worker reads the chief's checkpoint state each time."""
        if self.manager is None:
            return tf.train.latest_checkpoint(self.directory)
        return self.manager.latest_checkpoint

    def checkpoint_variables(self) -> list:
        """Every variable a checkpoint holds (for its size)."""
        return [v for obj in self.objects.values() for v in getattr(obj, "variables", [obj])
                if hasattr(v, "dtype") and hasattr(v, "shape")]

    def remove_unfinished_saves(self) -> list[str]:
        """Deletes the `ckpt-N_temp` folders a save killed halfway leaves behind (TensorFlow
        writes there, then renames); returns what was removed."""
        folder = self.run_dir / runs.CHECKPOINT_DIR
        leftovers = sorted(p for p in folder.glob("*_temp*") if p.is_dir()) if folder.is_dir() else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return [str(p) for p in leftovers]

    def save(self) -> str:
        """Writes a checkpoint (refused when a weight or queue is non-finite) and returns it
        (another worker: the path of the chief's, which this save took part in)."""
        self._check_finite()
        if self.manager is not None:
            self.verified = self.manager.save()
            return self.verified
        scratch = tempfile.mkdtemp(prefix=f"cmc-kit-worker{self.worker_index}-checkpoint-")
        try:  # counts like the chief's save: the same save counter, the same next number
            self.checkpoint.save(os.path.join(scratch, runs.CHECKPOINT_NAME))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.verified = os.path.join(self.directory,
                                     f"{runs.CHECKPOINT_NAME}-{int(self.checkpoint.save_counter.numpy())}")
        return self.verified

    def _non_finite(self) -> list[str]:
        named = [(f"online/{w.path}", w) for w in self.online.weights]
        named += [(f"momentum/{w.path}", w) for w in self.momentum.weights]
        named += [(f"queue/{view}", queue) for view, queue in self.queues.queues.items()]
        return [name for name, value in named if not np.all(np.isfinite(np.asarray(value)))]

    def _check_finite(self) -> None:
        """Refuses to checkpoint non-finite weights or queues: the last good checkpoint stays latest."""
        bad = self._non_finite()
        if bad:
            # Only a checkpoint this session saved or restored and found finite is called intact.
            kept = (f"The latest checkpoint, {self.verified}, is intact and training resumes "
                    "from it." if self.verified else
                    "Nothing was overwritten; no checkpoint of this session was checked.")
            raise TrainingError(
                f"Not saving step {int(self.state.step.numpy())} of {self.run_dir}: non-finite "
                f"values in {len(bad)} tensor(s) ({', '.join(bad[:3])}). {kept} Lower "
                "train.learning_rate or check the data with `cmc-kit validate`.")

    def restore_latest(self) -> bool:
        """Restores the newest usable checkpoint (True), or leaves everything as built when there
        is none (False). Damaged checkpoints (cut short, unreadable) and ones holding non-finite
        weights are passed over with a warning naming them; none usable is a CheckpointError."""
        entries = runs.list_checkpoints(self.run_dir)
        passed = []
        for entry in reversed(entries):
            if entry["problem"] is None:
                try:
                    self._restore(entry["path"])
                except tf.errors.OpError as err:  # damage the size check could not see
                    entry["problem"] = f"it cannot be restored ({' '.join(str(err).split())[:160]})"
                    passed.append(f"{entry['path']} ({entry['problem']})")
                    continue
                bad = self._non_finite()
                if not bad:
                    if passed:
                        warnings.warn(f"Passed over {'; '.join(passed)}: resuming from "
                                      f"{entry['path']} (step {entry['step']}).", stacklevel=4)
                    self.verified = entry["path"]
                    return True
                entry["problem"] = f"non-finite values in {', '.join(bad[:3])}"
            passed.append(f"{entry['path']} ({entry['problem']})")
        if passed:
            raise CheckpointError(f"No checkpoint of {self.run_dir} can be resumed from: "
                                  f"{'; '.join(passed)}. Restore the files from a copy of the "
                                  "run, or start over with --fresh.")
        return False

    def _restore(self, latest: str) -> None:
        """Restores one checkpoint into the built objects, whatever layout it was saved in."""
        self.state.check_geometry(latest, self.run_dir)
        saved_keys = set(tf.train.load_checkpoint(latest).get_variable_to_shape_map())
        saved = {key.split("/")[0] for key in saved_keys}
        checkpoint = self._checkpoint_for(saved, saved_keys)
        status = checkpoint.restore(latest)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as err:
            raise CheckpointError(
                f"Checkpoint {latest} does not match the model built from "
                f"{self.run_dir / runs.CONFIG_FILE}: {str(err)[:300]}. Start over with --fresh.") from err
        # What is saved but not restored on purpose: the loss scale, resuming without
        # float16 (and the old wrapper's own unused counters). Silences TF's warnings.
        status.expect_partial()
        if checkpoint is not self.checkpoint:  # the manager numbers saves by this counter
            self.checkpoint.save_counter.assign(checkpoint.save_counter)
        if "epoch_position" not in saved:
            # Written before epoch_position existed: batches x B, exact unless a sample before
            # the resume point was unreadable.
            batch = int(self.state.geometry.numpy()[GEOMETRY_FIELDS.index("global batch")])
            self.state.epoch_position.assign(int(self.state.batch_in_epoch.numpy()) * batch)
        if "epoch_signal_sums" not in saved:
            self.state.epoch_signal_sums.assign(tf.zeros_like(self.state.epoch_signal_sums))

    def _checkpoint_for(self, saved: set[str], saved_keys: set[str]):
        """The checkpoint object to restore a checkpoint holding `saved` (top-level names) and
        `saved_keys` (variable keys) from: less what an older checkpoint does not have yet, and
        with an older mixed_float16 checkpoint's optimizer layout (Adam inside its loss-scale
        wrapper), which the current precision may not have."""
        optional = set(OPTIONAL_ENTRIES) & set(self.objects)
        wrapped_layout = any(key.startswith("optimizer/inner_optimizer/") for key in saved_keys)
        if optional <= saved and not wrapped_layout:
            return self.checkpoint
        objects = {name: value for name, value in self.objects.items()
                   if name in saved or name not in optional}
        if wrapped_layout:
            objects.pop(LOSS_SCALE, None)
            # The loss scale came along inside the wrapper; without float16 now, only Adam.
            inner = saved_optimizer(self.optimizer)
            objects["optimizer"] = (self.optimizer if self.optimizer is not inner
                                    else tf.train.Checkpoint(inner_optimizer=self.optimizer))
        return tf.train.Checkpoint(**objects)


def state_summary(state: TrainState, queues, *, steps_per_epoch: int, num_train: int,
                  checkpoint_path: str | None) -> dict:
    """What RUN/state.json says: where the run stands after the checkpoint `checkpoint_path`."""
    return {
        "epoch": int(state.epoch.numpy()),
        "step": int(state.step.numpy()),
        "batch_in_epoch": int(state.batch_in_epoch.numpy()),
        "epoch_position": int(state.epoch_position.numpy()),
        "steps_per_epoch": steps_per_epoch,
        "num_train": num_train,
        "queue_size": queues.size,
        "queue_fill": int(queues.filled.numpy()),
        "queue_pointer": int(queues.pointer.numpy()),
        "skipped_steps": int(state.skipped.numpy()),
        "latest_checkpoint": checkpoint_path,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
