"""A run read back: where it stands (`run_info`) and its encoders with a checkpoint's weights
(`load_run`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from cmc_kit.config import Config
from cmc_kit.errors import CheckpointError
from cmc_kit.runs.checkpoints import list_checkpoints, newest_usable_checkpoint
from cmc_kit.runs.files import (CONFIG_FILE, SET_ASIDE_DIR, SPLIT_FILE, STATE_FILE, read_json,
                               read_split)
from cmc_kit.runs.settings import apply_split

if TYPE_CHECKING:
    import pandas as pd


def run_info(run: str | os.PathLike) -> dict:
    """Epoch, step, queue fill, skipped steps, checkpoints and config of a run directory."""
    run_dir = Path(run)
    if not (run_dir / CONFIG_FILE).exists() and (run_dir / SET_ASIDE_DIR).is_dir():
        raise CheckpointError(
            f"{run_dir} holds a run that a fresh start moved to {run_dir / SET_ASIDE_DIR} and "
            "was interrupted before its first checkpoint. Run `cmc-kit train --run "
            f"{run_dir} --data DATA` (or notebook 03_resume) to put it back and continue it, "
            "or add --fresh to start over.")
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}). Train one with "
                              f"`cmc-kit train --data DATA --run {run_dir}` or notebook 02_train "
                              "with this RUN_DIR.")
    config = Config.load(run_dir / CONFIG_FILE)
    state = _summary_or_nothing(run_dir / STATE_FILE)
    checkpoints = list_checkpoints(run_dir)
    usable = [c for c in checkpoints if c["problem"] is None]
    # Where the run stands is what its newest usable checkpoint holds (state.json may name a
    # newer, damaged one).
    latest = usable[-1] if usable else {"path": None}
    return {
        "run": str(run_dir),
        "epoch": latest.get("epoch", state.get("epoch", 0)),
        "epochs": config.train.epochs,
        "step": latest.get("step", state.get("step", 0)),
        "queue_fill": state.get("queue_fill", None if usable else 0),  # None: unknown
        "queue_size": state.get("queue_size"),
        "skipped_steps": state.get("skipped_steps", 0),
        "latest_checkpoint": latest["path"],
        "checkpoints": [c["path"] for c in checkpoints],
        "damaged_checkpoints": {c["path"]: c["problem"] for c in checkpoints if c["problem"]},
        "config": config.to_dict(),
    }


def _summary_or_nothing(path: Path) -> dict:
    """state.json, or {} when it is missing or damaged: it only summarises the checkpoints,
    which say where the run stands, and the next training session writes it again."""
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except CheckpointError as err:
        warnings.warn(f"{path} is damaged ({err.__cause__}); epoch and step are read from the "
                      "checkpoints instead, and the next `cmc-kit train` of this run writes it "
                      "again. Nothing else is lost.", stacklevel=3)
        return {}


class RunHandle:
    """A trained run, read back: config, split, checkpoints and encoders with restored weights."""

    def __init__(self, run_dir: str | os.PathLike, checkpoint: str | None = None):
        self.run_dir = Path(run_dir)
        info = run_info(self.run_dir)
        self.config = Config.load(self.run_dir / CONFIG_FILE)
        self.checkpoints = [c for c in list_checkpoints(self.run_dir) if c["problem"] is None]
        if checkpoint is None:
            newest = newest_usable_checkpoint(self.run_dir)
            if newest is None:
                raise CheckpointError(f"{self.run_dir} has no checkpoint yet. Train it first.")
            checkpoint = newest["path"]
        elif str(checkpoint) in info["damaged_checkpoints"]:
            raise CheckpointError(f"Checkpoint {checkpoint} is damaged: "
                                  f"{info['damaged_checkpoints'][str(checkpoint)]}. Pick another "
                                  "one (--checkpoint) or leave it out for the newest usable one.")
        self.checkpoint_path = str(checkpoint)
        self.epoch, self.step = info["epoch"], info["step"]
        for entry in self.checkpoints:
            if entry["path"] == self.checkpoint_path:
                self.epoch, self.step = entry["epoch"], entry["step"]
        self._encoders = {}

    def encoder(self, network: str = "online"):
        """The online network or its momentum twin, with the checkpoint's weights."""
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
        return read_split(split_path)

    def split(self, catalog: pd.DataFrame) -> dict:
        """{'train': df, 'validation': df}: the catalog's rows on each side of the run's split."""
        return apply_split(catalog, self.split_ids())


def load_run(run: str | os.PathLike, checkpoint: str | None = None) -> RunHandle:
    """The run directory `run`, read back; `checkpoint` None is the latest."""
    return RunHandle(Path(run), checkpoint)
