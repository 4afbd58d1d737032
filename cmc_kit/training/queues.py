"""Memory queues of past momentum keys, one [K, D] FIFO per key view, kept in the checkpoint."""

from __future__ import annotations

import warnings

import tensorflow as tf

from cmc_kit.errors import DataError


def queue_size(multiplier: int, global_batch: int, num_train: int) -> int:
    """K = multiplier x batch, capped below the training-set size.

    Keys of the same sample must not come back as negatives, so K stays under the number of
    training samples (the largest multiple of the batch below it), with a warning.
    """
    if num_train < 4:  # no batch size helps: two batches of at least 2 samples are needed
        raise DataError(
            f"The training split has {num_train} sample(s), fewer than the 4 training needs (two "
            "batches of at least 2). Add samples, or hold fewer out (e.g. --set "
            "data.validation_fraction=0.1).")
    if num_train < 2 * global_batch:
        raise DataError(
            f"The training split has {num_train} samples, fewer than two batches of "
            f"{global_batch}. Lower data.batch_size (e.g. --set data.batch_size="
            f"{num_train // 2}) or use more data.")
    size = multiplier * global_batch
    if size >= num_train:
        capped = ((num_train - 1) // global_batch) * global_batch
        warnings.warn(
            f"Queue size {multiplier} x {global_batch} = {size} would reach the {num_train} "
            f"training samples; capped at {capped}. Lower train.queue_multiplier to silence this.",
            stacklevel=2)
        size = capped
    return size


class MemoryQueues(tf.Module):
    """One FIFO queue of momentum keys per key view, shape (K, dim), plus a shared write pointer.

    Non-trainable variables: saved in every checkpoint, so resume continues the same queue.
    Build it inside the strategy's scope; `enqueue` runs in cross-replica context, so every
    replica's copy gets the same entries.
    """

    def __init__(self, views, size: int, dim: int):
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
