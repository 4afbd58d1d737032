"""What a run directory's files are called, which of them training owns, and the small reads
and writes of them that every part of cmc_kit shares."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from cmc_kit.errors import CheckpointError
from cmc_kit.fileio import atomic_write_text, output_file_path, read_json_object

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "ckpt"  # checkpoints are CHECKPOINT_DIR/ckpt-N
LOG_FILE = "log.csv"
STEP_LOG_FILE = "log_steps.csv"
TENSORBOARD_DIR = "tensorboard"
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_TABLE = "embeddings.parquet"  # `cmc-kit embed`'s default, inside EMBEDDINGS_DIR
UMAP_CACHE_DIR = "umap_cache"
EVALUATION_FILE = "evaluation.csv"
EXPLORER_FILE = "explorer.html"
MOSAIC_FILE = "mosaic.png"
EPOCHS_PAGE_FILE = "embedding_over_epochs.html"
FINETUNE_DIR = "finetune"  # `cmc-kit finetune`'s arms: checkpoints, results, the table
SET_ASIDE_DIR = ".before-fresh"
DATASET_FILE = "dataset.json"  # what the run was created on: sample count, image size, checksums
LOCK_FILE = ".trainer.lock"    # held by the process that trains the run (see RunLock)

# What a fresh start replaces: the training's files and what was made from them (the demo and
# notebooks 04/05/06 write the explorer, mosaic, evaluation, UMAP cache and fine-tunes into it).
RUN_OUTPUTS = (CHECKPOINT_DIR, TENSORBOARD_DIR, EMBEDDINGS_DIR, STATE_FILE, LOG_FILE,
               STEP_LOG_FILE, SPLIT_FILE, CONFIG_FILE, DATASET_FILE, UMAP_CACHE_DIR,
               EVALUATION_FILE, EXPLORER_FILE, MOSAIC_FILE, EPOCHS_PAGE_FILE, FINETUNE_DIR)


# A log training could not read is moved to <name>.damaged[-N] (training/logs.py); a fresh
# start replaces those with the rest of the old run.
DAMAGED_SUFFIX = ".damaged"


def damaged_logs(run_dir: str | os.PathLike) -> list[str]:
    """Names of the logs of `run_dir` that training set aside as unreadable."""
    return sorted(path.name for name in (LOG_FILE, STEP_LOG_FILE)
                  for path in Path(run_dir).glob(f"{name}{DAMAGED_SUFFIX}*"))


# What training owns in a run directory: no output of another command may replace these.
TRAINING_FILES = (CONFIG_FILE, SPLIT_FILE, STATE_FILE, LOG_FILE, STEP_LOG_FILE, DATASET_FILE,
                  CHECKPOINT_DIR, TENSORBOARD_DIR, SET_ASIDE_DIR, LOCK_FILE)


def output_path(out: str | os.PathLike, *, run: str | os.PathLike | None, what: str,
                default_name: str, suffixes: tuple[str, ...], kind: str,
                looks_like_ours: Callable[[Path], bool], force: bool = False) -> Path:
    """Where a command may write its output file `out` (an existing folder gets
    `default_name`), checked before any work: the suffix; not one of the run's own training
    files; and an existing file only when it is this command's own earlier output (as
    `looks_like_ours` tells) or `force`."""
    path = output_file_path(out, what, default_name, suffixes)
    if run is not None:
        try:
            inside = path.resolve().relative_to(Path(run).resolve())
        except ValueError:
            inside = None
        if inside is not None and inside.parts and inside.parts[0] in TRAINING_FILES:
            raise CheckpointError(
                f"{what} {path} is {run}'s own {inside.parts[0]}, which training needs; "
                f"writing there would destroy it. Give another file, e.g. "
                f"{Path(run) / default_name}.")
    if path.exists() and not force and not looks_like_ours(path):
        raise CheckpointError(
            f"{what} {path} already exists and is not {kind} that cmc_kit wrote, so it is not "
            "replaced. Give another file name, or add --force to replace it.")
    return path


def epoch_table_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """RUN/embeddings/epoch_NNN.parquet: the held-out subset's embedding after `epoch`."""
    return Path(run_dir) / EMBEDDINGS_DIR / f"epoch_{epoch:03d}.parquet"


def read_json(path: str | os.PathLike) -> dict:
    """A run file's JSON object; CheckpointError naming the file if it is anything else."""
    try:
        return read_json_object(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}. The run directory may be damaged; "
                              "restore the file or start over with --fresh.") from err


def read_split(path: str | os.PathLike) -> dict:
    """RUN/split.json: {"train": ids, "validation": ids}; CheckpointError naming the file if it
    holds anything else."""
    split = read_json(path)
    for side in ("train", "validation"):
        ids = split.get(side)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise CheckpointError(
                f"{path} is damaged: '{side}' should be a list of sample ids, not "
                f"{str(ids)[:60]}. Restore the file (the split decides which samples were held "
                "out) or start over with --fresh.")
    return split


def write_state(run_dir: str | os.PathLike, state: dict) -> None:
    """RUN/state.json, what `info` and an interrupted CLI read (written after each save)."""
    atomic_write_text(Path(run_dir) / STATE_FILE, json.dumps(state, indent=2) + "\n")
