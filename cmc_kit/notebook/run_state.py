"""A run's state for the notebooks: the run 02 wrote (or a previous version's, copied in) and
its counters side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cmc_kit import runs


def require_run(run: str | os.PathLike, *, input_root: str | os.PathLike | None = None) -> Path:
    """The run directory 02 wrote (or a previous version's output, copied in). Raises a clear
    error when there is none."""
    from cmc_kit.errors import CheckpointError

    run = Path(run)
    runs.bring_in_previous_run(run, input_root=input_root)
    if not runs.has_checkpoint(run):
        raise CheckpointError(f"{run} holds no checkpoint. Run 02_train.ipynb with the same RUN_DIR "
                              "first, or on Kaggle attach the output of a notebook version that "
                              "trained it (Add Input -> Your Work).")
    return run


def info_table(*infos: Mapping[str, Any], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """`runs.run_info` dicts side by side: epoch, step, queue fill and latest checkpoint."""
    labels = list(labels) if labels is not None else [f"#{i + 1}" for i in range(len(infos))]
    if len(labels) != len(infos):
        raise ValueError(f"info_table got {len(infos)} infos but {len(labels)} labels.")
    keys = ("epoch", "epochs", "step", "queue_fill", "queue_size", "latest_checkpoint")
    rows = {}
    for label, info in zip(labels, infos):
        column = {k: info.get(k) for k in keys}
        if column["latest_checkpoint"]:
            column["latest_checkpoint"] = Path(column["latest_checkpoint"]).name
        rows[label] = column
    return pd.DataFrame(rows).rename_axis("state")