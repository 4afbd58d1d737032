"""The compiled CMC + MoCo train step: encoder passes, losses, clipping, update, EMA, enqueue.

`build_train_step` returns `train_step(batch, step) -> logs`, a tf.function of its explicit
inputs: it updates what it is given (the online weights through the optimizer, the momentum
twin, the queues) and returns what happened (losses, accuracy, whether the update was
skipped); the caller keeps the counters.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cmc_kit import models, objectives
from cmc_kit.training.schedules import momentum_at


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What one step computes; fixed when the step is built."""

    pairs: tuple[tuple[str, str], ...]  # (query view, key view)
    key_views: tuple[str, ...]          # views whose momentum keys are queued
    replicas: int
    temperature: float
    loss: str                           # "infonce" or "nce"
    positive: str                       # "momentum" (MoCo) or "online" (the original)
    inter_weight: float
    intra_weight: float
    clipnorm: float
    momentum: float
    momentum_schedule: str
    total_steps: int
    loss_scaled: bool                   # mixed_float16: the optimizer scales the loss

    @classmethod
    def from_config(cls, train_config, *, pairs, key_views, replicas: int, total_steps: int,
                    loss_scaled: bool) -> "StepSettings":
        tc = train_config
        return cls(pairs=tuple(pairs), key_views=tuple(key_views), replicas=replicas,
                   temperature=tc.temperature, loss=tc.loss, positive=tc.positive,
                   inter_weight=tc.inter_weight, intra_weight=tc.intra_weight,
                   clipnorm=tc.clipnorm, momentum=tc.momentum,
                   momentum_schedule=tc.momentum_schedule, total_steps=total_steps,
                   loss_scaled=loss_scaled)


def jit_mode(jit: bool, settings: StepSettings) -> str:
    """How much of the step XLA compiles: "step", "replica" or "off".

    One replica: the whole step compiles. Several: collectives (all-gather, all-reduce, the
    optimizer's merge_call) cannot sit inside an XLA cluster, so each replica compiles its
    encoder passes and losses and the collectives run between them. Online positives are
    gathered inside the gradient tape, which prevents that split: no XLA then.
    """
    if not jit:
        return "off"
    if settings.replicas == 1:
        return "step"
    return "replica" if settings.positive == "momentum" else "off"


def global_clipped_shares(grads, ctx, optimizer, clipnorm, replicas: int, loss_scaled: bool):
    """Per-replica gradient shares whose sum over replicas is the clipped global gradient.

    Keras's optimizer sums the replicas' gradients but clips each share first. Here the shares
    are summed first (G, the gradient of the whole batch, on every replica), each variable's
    G is clipped to `clipnorm` as Keras does on one device, and G / R is returned for Keras to
    sum back. Costs one extra all-reduce per step; as a bonus every replica sees the same G,
    so the loss-scale optimizer's overflow check (first replica only) covers all replicas.
    """
    summed = ctx.all_reduce("sum", grads)  # G, identical on every replica
    if clipnorm:
        # Scaled gradients (float16) are unscaled by the optimizer after this: scale the bound.
        bound = clipnorm * tf.cast(optimizer.dynamic_scale, tf.float32) if loss_scaled else clipnorm
        summed = [tf.clip_by_norm(g, tf.cast(bound, g.dtype)) for g in summed]
    return [g / tf.cast(replicas, g.dtype) for g in summed]


def intra_term(query, positive, global_keys, offset, ctx, *, online_positive: bool,
               replicas: int, temperature, kind):
    """Intra-batch loss of this replica's queries [b, D] against the GLOBAL batch of keys.

    One replica: plain `intra_batch_loss(query, positive)`. R replicas: the keys of all
    replicas [R*b, D] are the candidates and query i's positive is row offset + i, so the
    mean over replicas equals the single-device loss of the whole batch. Online positives
    carry gradients, so they are gathered inside the tape (all_gather is differentiable).
    """
    if replicas == 1:
        return objectives.intra_batch_loss(query, positive, temperature=temperature, kind=kind)
    candidates = ctx.all_gather(positive, axis=0) if online_positive else global_keys  # [R*b, D]
    return objectives.intra_batch_loss(query, candidates, temperature=temperature, kind=kind,
                                       key_offset=offset)


def collapse_signals(queries: dict, keys: dict, pair: tuple[str, str]) -> dict:
    """How spread out the embeddings are, to see a collapse coming: `spread_<view>`, the std of
    each view's L2-normalised online embeddings [B, D] over the batch (~1/sqrt(D) healthy, ~0
    collapsed), and for the first pair the alignment and uniformity of Wang & Isola (2020),
    against the momentum keys [B, D]."""
    query_view, key_view = pair
    signals = {f"spread_{view}": objectives.embedding_spread(q)
               for view, q in sorted(queries.items())}
    signals["alignment"] = objectives.alignment(queries[query_view], keys[key_view])
    signals["uniformity"] = objectives.uniformity(queries[query_view])
    return signals


def _replica_functions(online, momentum_net, optimizer, queues, s: StepSettings, mode: str):
    """The per-replica pieces: momentum keys, and losses with their gradients."""

    def encode_keys(batch):
        keys = momentum_net(batch, training=False)                      # {view: [b, D]}
        return {v: tf.stop_gradient(tf.cast(keys[v], tf.float32)) for v in s.key_views}

    def losses_and_grads(batch, keys, global_keys, offset):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            queries = online(batch, training=True)                      # {view: [b, D]}
            terms = {}
            for q_view, k_view in s.pairs:
                positive = keys[k_view] if s.positive == "momentum" else queries[k_view]
                terms[f"inter_{q_view}-{k_view}"] = objectives.inter_batch_loss(
                    queries[q_view], positive, queues.queues[k_view].read_value(),
                    temperature=s.temperature, kind=s.loss)
                terms[f"intra_{q_view}-{k_view}"] = intra_term(
                    queries[q_view], positive, global_keys[k_view], offset, ctx,
                    online_positive=s.positive == "online", replicas=s.replicas,
                    temperature=s.temperature, kind=s.loss)
            total = tf.add_n([
                (s.inter_weight if name.startswith("inter") else s.intra_weight) * value
                for name, value in terms.items()])
            # Each replica's terms are means over its b = B / R rows, and Keras sums the
            # replicas' gradients: 1/R per replica gives the gradient of the global mean.
            replica_loss = total / s.replicas
            if s.loss_scaled:
                replica_loss = optimizer.scale_loss(replica_loss)
        variables = online.trainable_variables
        query_list = [queries[v] for v in sorted(queries)]               # [b, D] each
        gradients = tape.gradient(replica_loss, variables + query_list)
        grads, query_grads = gradients[:len(variables)], gradients[len(variables):]
        first = s.pairs[0]
        if s.replicas == 1:
            accuracy = objectives.contrastive_accuracy(queries[first[0]], keys[first[1]])
        else:
            accuracy = objectives.contrastive_accuracy(
                queries[first[0]], global_keys[first[1]], key_offset=offset)
        embeddings = {v: tf.stop_gradient(tf.cast(q, tf.float32)) for v, q in queries.items()}
        return total, terms, grads, accuracy, embeddings, [g for g in query_grads if g is not None]

    if mode == "replica":
        encode_keys = tf.function(encode_keys, jit_compile=True)
        losses_and_grads = tf.function(losses_and_grads, jit_compile=True)
    return encode_keys, losses_and_grads


def _replica_step_function(online, momentum_net, optimizer, queues, s: StepSettings, mode: str):
    """`replica_step(batch)`: one replica's keys, losses, gradients and verdicts."""
    encode_keys, losses_and_grads = _replica_functions(online, momentum_net, optimizer, queues,
                                                       s, mode)

    def replica_step(batch):
        ctx = tf.distribute.get_replica_context()
        # Momentum keys first: no gradient, and they are the positives and the new queue entries.
        keys = encode_keys(batch)                                       # {view: [b, D]}
        # Every replica sees the global batch of keys: the same queue entries everywhere, and
        # intra-batch negatives from the whole batch. This replica's rows start at `offset`.
        global_keys = {v: ctx.all_gather(keys[v], axis=0) for v in s.key_views}  # {v: [R*b, D]}
        local_batch = tf.shape(keys[s.key_views[0]])[0]
        offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * local_batch
        total, terms, grads, accuracy, queries, query_grads = losses_and_grads(
            batch, keys, global_keys, offset)
        if s.replicas > 1:  # over the global batch, as on one device ([R*b, D] each)
            queries = {v: ctx.all_gather(q, axis=0) for v, q in queries.items()}
        health = collapse_signals(queries, global_keys, s.pairs[0])
        if s.replicas > 1:
            grads = global_clipped_shares(grads, ctx, optimizer, s.clipnorm, s.replicas,
                                          s.loss_scaled)
        loss_finite = tf.math.is_finite(total)
        # Under float16 loss scaling an overflow anywhere is routine and decides whether the
        # optimizer applies: every gradient is checked. Otherwise the embeddings' gradients
        # (the first out of backprop) are: waiting for all of them held the optimizer back
        # until the last one was ready, 5% of a CPU step (benchmarks/train_step.py). A
        # non-finite weight still never reaches a checkpoint: the checkpointer checks.
        checked = grads if s.loss_scaled else query_grads
        grads_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in checked])
        # Every replica decides together: [bad losses, bad gradients] summed over replicas.
        bad = ctx.all_reduce("sum", tf.stack([1.0 - tf.cast(loss_finite, tf.float32),
                                              1.0 - tf.cast(grads_finite, tf.float32)]))
        return total, {**terms, **health}, accuracy, bad[0] < 0.5, bad[1] < 0.5, global_keys, grads

    return replica_step


def build_train_step(strategy, online, momentum_net, optimizer, queues, settings: StepSettings,
                     mode: str = "off"):
    """`train_step(batch, step) -> logs` for a distributed batch and the global step before it.

    logs: loss, accuracy, momentum, every pair's inter_/intra_ term and the collapse signals of
    `collapse_signals` (means over the replicas' batches), skipped (1: no EMA or queue update)
    and nonfinite (1: a real problem, unlike a float16 overflow under loss scaling, which only
    skips).
    """
    s = settings
    replica_step = _replica_step_function(online, momentum_net, optimizer, queues, s, mode)

    def apply_gradients(grads):
        optimizer.apply_gradients(zip(grads, online.trainable_variables))

    def first_copy(value):
        return strategy.experimental_local_results(value)[0]

    def train_step(batch, step):
        momentum_value = momentum_at(step, s.total_steps, s.momentum, s.momentum_schedule)
        total, terms, accuracy, loss_ok, grads_ok, keys, grads = strategy.run(
            replica_step, args=(batch,))
        mean = lambda x: strategy.reduce("MEAN", x, axis=None)  # noqa: E731
        loss_ok, grads_ok = first_copy(loss_ok), first_copy(grads_ok)
        update = tf.logical_and(loss_ok, grads_ok)
        # Under float16 loss scaling, overflowing gradients are routine: the loss-scale
        # optimizer must still see them (it skips the update and lowers its scale), but the
        # EMA and the queue wait for a real update.
        apply = loss_ok if s.loss_scaled else update
        # all-gathered: every replica holds the same global keys [B, D]; take the first copy.
        keys = {v: first_copy(k) for v, k in keys.items()}

        def optimize():
            # The optimizer all-reduces inside the replicas (merge_call), which is not allowed
            # under a cond in replica context: the cond lives here, in cross-replica context.
            strategy.run(apply_gradients, args=(grads,))
            return tf.constant(True)

        def commit():
            # Cross-replica: every replica's copy gets the same EMA and queue update.
            models.momentum_update(online, momentum_net, momentum_value)
            queues.enqueue(keys)
            return tf.constant(0, tf.int64)

        tf.cond(apply, optimize, lambda: tf.constant(False))
        skipped = tf.cond(update, commit, lambda: tf.constant(1, tf.int64))
        # A non-finite loss (or gradient without loss scaling) is a real problem; an
        # overflow under loss scaling is not: it only counts as a skipped update.
        nonfinite = tf.cast(tf.logical_not(loss_ok if s.loss_scaled else update), tf.int64)
        return {"loss": mean(total), "accuracy": mean(accuracy), "skipped": skipped,
                "nonfinite": nonfinite, "momentum": momentum_value,
                **{name: mean(value) for name, value in terms.items()}}

    return tf.function(train_step, jit_compile=True if mode == "step" else None,
                       reduce_retracing=True)
