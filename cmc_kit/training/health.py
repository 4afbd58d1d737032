"""Signs that a run went wrong, as training sees them: embeddings that collapse to a point
(warned once per session) and a streak of non-finite steps (training stops, the last good
checkpoint intact)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from cmc_kit.errors import TrainingError

# Below this `embedding_spread` (std of normalised embeddings x sqrt(D); ~1 healthy) an epoch's
# embeddings count as collapsed and the trainer warns. Measured on cpu-demo: a stalled run's
# first epoch read 0.05-0.08, healthy ReZero runs 0.15-0.19 after their first epoch.
COLLAPSE_SPREAD = 0.1


def embedding_spread(logs: dict, views, embedding_dim: int) -> float:
    """The least spread-out view's embedding std (`spread_<view>` in `logs`), times sqrt(D):
    ~1 when the embeddings cover the sphere, ~0 when they collapse to a point."""
    spreads = [logs[f"spread_{view}"] for view in views]
    return float(min(spreads) * np.sqrt(embedding_dim))


class CollapseWatch:
    """Warns the first time an epoch's embeddings have (nearly) collapsed."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.warned = False

    def check(self, epoch: int, spread: float) -> None:
        if spread >= COLLAPSE_SPREAD or self.warned:
            return
        self.warned = True
        warnings.warn(
            f"Epoch {epoch + 1} of {self.run_dir}: the embeddings have nearly collapsed "
            f"(embedding_spread {spread:.3f}, below {COLLAPSE_SPREAD}; ~1 is healthy), so they "
            "tell samples apart poorly. Lower train.learning_rate, raise train.warmup_steps or "
            "train.momentum, or check log.csv's spread_<view> columns for the view that "
            "collapsed.", stacklevel=3)


def nonfinite_streak(streak: int, step: int, last_checkpoint: str | None) -> TrainingError:
    """What stops training after `streak` consecutive non-finite steps."""
    return TrainingError(
        f"{streak} consecutive steps had a non-finite loss or gradient (step {step}); training "
        f"stopped. The last good checkpoint is intact: {last_checkpoint}. Lower "
        "train.learning_rate, check the data with `cmc-kit validate`, or raise "
        "train.max_nonfinite_steps.")
