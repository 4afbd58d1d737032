"""Learning-rate and EMA-momentum schedules, both functions of the global step."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def momentum_at(step, total_steps, base: float, schedule: str):
    """EMA momentum for a step: constant, or MoCo/BYOL-style cosine ramp from base to 1."""
    if schedule == "constant":
        return tf.constant(base, tf.float32)
    progress = tf.minimum(tf.cast(step, tf.float32) / float(max(total_steps, 1)), 1.0)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def make_learning_rate(train_config, total_steps: int):
    """Adam's learning rate: a float (constant) or a Keras schedule (warmup, cosine decay)."""
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
