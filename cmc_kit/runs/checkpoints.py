"""A run's checkpoints: which there are, which are damaged (cut short, unreadable), the newest
usable one, and a checkpoint named on the command line."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from cmc_kit.errors import CheckpointError
from cmc_kit.runs.files import CHECKPOINT_DIR, CHECKPOINT_NAME, CONFIG_FILE, STATE_FILE, read_json


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when the run directory's checkpoint state names a checkpoint."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(Path(run_dir) / CHECKPOINT_DIR)) is not None


def checkpoint_paths(run_dir: str | os.PathLike) -> list[str]:
    """The checkpoints in RUN/checkpoints (by their .index files), oldest first (by number)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    indexes = sorted(folder.glob("*.index"), key=lambda p: (checkpoint_number(p.stem), p.stem))
    return [str(path.with_suffix("")) for path in indexes]


COUNTERS = ("step", "epoch", "batch_in_epoch")


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """Checkpoints in RUN/checkpoints, oldest first: {path, step, epoch, batch_in_epoch,
    problem}; `problem` says why a checkpoint cannot be used (its counters are then None)."""
    out = []
    for path in checkpoint_paths(run_dir):
        counters, problem = _read_counters(path)
        out.append({"path": path, **counters, "problem": problem})
    return out


def _read_counters(path: str) -> tuple[dict, str | None]:
    """A checkpoint's counters, or Nones and the reason it is damaged: files missing or cut
    short (the data shards hold fewer bytes than the index lists), or an unreadable index."""
    import numpy as np
    import tensorflow as tf

    unreadable = {name: None for name in COUNTERS}
    shards = sorted(Path(path).parent.glob(f"{Path(path).name}.data-*"))
    if not shards:
        return unreadable, "its .data file is missing"
    try:
        reader = tf.train.load_checkpoint(path)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        expected = sum(int(np.prod(shape)) * dtypes[name].size for name, shape in shapes.items()
                       if dtypes[name] != tf.string)
        actual = sum(shard.stat().st_size for shard in shards)
        if actual < expected:
            return unreadable, f"it is cut short ({actual} of {expected} bytes)"
        return {name: int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                for name in COUNTERS}, None
    except (tf.errors.OpError, ValueError, OSError) as err:
        return unreadable, f"it cannot be read ({' '.join(str(err).split())[:160]})"


def newest_usable_checkpoint(run_dir: str | os.PathLike) -> dict | None:
    """The newest checkpoint that is not damaged, with a warning naming any newer damaged one
    it passes over; None when there is no checkpoint. Raises CheckpointError when there are
    checkpoints but none can be used."""
    entries = list_checkpoints(run_dir)
    usable = [entry for entry in entries if entry["problem"] is None]
    damaged_newer = [e for e in entries if e["problem"] is not None
                     and (not usable or checkpoint_number(e["path"]) > checkpoint_number(usable[-1]["path"]))]
    if entries and not usable:
        raise CheckpointError(
            f"No checkpoint of {run_dir} can be used: "
            + "; ".join(f"{Path(e['path']).name}: {e['problem']}" for e in entries)
            + ". Restore the files from a copy of the run, or start over with --fresh.")
    if damaged_newer:
        warnings.warn(
            "Damaged checkpoint(s) passed over: "
            + "; ".join(f"{e['path']} ({e['problem']})" for e in damaged_newer)
            + f". Using {usable[-1]['path']} (step {usable[-1]['step']}) instead.", stacklevel=3)
    return usable[-1] if usable else None


def checkpoint_number(path: str | os.PathLike) -> int:
    """N of RUN/checkpoints/ckpt-N (-1 for other names)."""
    suffix = Path(path).name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def resolve_checkpoint(run: str | os.PathLike, checkpoint: str | os.PathLike | None) -> str | None:
    """Checks that `checkpoint` names a saved checkpoint of `run` (None: the latest, unchecked).

    Accepts a checkpoint prefix (`RUN/checkpoints/ckpt-3`, whose `.index` file exists), a
    bare name looked up in `RUN/checkpoints` (`ckpt-3`) or its number (`3`). Raises
    CheckpointError naming the path and the checkpoints that do exist, instead of TensorFlow's
    NotFoundError when restoring.
    """
    if checkpoint is None or str(checkpoint) == "":
        return None
    if str(checkpoint).isdigit():  # `--checkpoint 3`: the manager's ckpt-3
        checkpoint = f"{CHECKPOINT_NAME}-{checkpoint}"
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        return str(checkpoint)  # not a run: load_run says so, with the fix
    given = Path(checkpoint)
    folder = run / CHECKPOINT_DIR
    candidates = [given] + ([folder / given.name] if len(given.parts) == 1 else [])
    for candidate in candidates:
        if Path(f"{candidate}.index").is_file():
            return str(candidate)
    existing = [Path(path).name for path in checkpoint_paths(run)]
    if existing:
        listing = (f"Checkpoints in {folder}: {', '.join(existing)} (the last is the latest). "
                   f"Pass one of those (e.g. --checkpoint {folder / existing[-1]}), or leave "
                   "--checkpoint out for the latest.")
    else:
        listing = f"{folder} holds no checkpoints: train the run first."
    raise CheckpointError(f"Checkpoint {checkpoint} does not exist (no {checkpoint}.index). "
                          f"{listing}")


def saved_state(run_dir: str | os.PathLike) -> dict:
    """RUN/state.json of a run that holds a checkpoint (epoch, step, ...); {} otherwise."""
    if not has_checkpoint(run_dir):
        return {}
    try:
        return read_json(Path(run_dir) / STATE_FILE)
    except CheckpointError:
        return {}
