"""A run's logs: RUN/log.csv (one row per epoch), RUN/log_steps.csv (optional, per step) and
TensorBoard scalars in RUN/tensorboard."""

from __future__ import annotations

import contextlib
import csv
import warnings
from pathlib import Path

import pandas as pd
import tensorflow as tf

from cmc_kit import runs
from cmc_kit.fileio import atomic_write_text


class _NoSummaries:
    """Stands in for a TensorBoard writer when the tensorboard package is missing."""

    def as_default(self, step=None):
        return contextlib.nullcontext()

    def flush(self):
        pass


def readable_log(path: Path, column: str) -> pd.DataFrame | None:
    """The log at `path` as a table, or None when there is none. One that cannot be read (not
    CSV, not UTF-8 text, no `column`) is set aside (`_set_aside`) and None returned."""
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path)
        if column not in frame.columns:
            raise ValueError(f"no {column!r} column")
        return frame
    except (OSError, ValueError) as err:  # pandas' ParserError and UnicodeDecodeError included
        _set_aside(path, err)
        return None


def _set_aside(path: Path, err: Exception) -> None:
    """Moves an unreadable log to `<name>.damaged[-N]`, never deleting it, and warns: a log only
    records, the checkpoints are what resumes, so training goes on with a new one."""
    aside = path.with_name(f"{path.name}{runs.DAMAGED_SUFFIX}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}{runs.DAMAGED_SUFFIX}-{number}")
    path.rename(aside)
    warnings.warn(f"{path} could not be read ({err}); it was moved to {aside} and a new log "
                  "starts with the next row. The checkpoints are intact.", stacklevel=4)


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle), None) or []


def append_csv(path: Path, row: dict, key: str) -> None:
    """Appends a row (`key`: a column every row has) after reading only the header; a row with
    new columns (e.g. kNN enabled later) rewrites the file with the wider header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists()
    if exists:
        try:
            header = _header(path)
            if key not in header:
                raise ValueError(f"no {key!r} column in its header")
        except (OSError, ValueError, csv.Error) as err:  # not UTF-8 text, not CSV
            _set_aside(path, err)
            exists = False
    if exists and any(k not in header for k in row):
        frame = readable_log(path, key)
        if frame is not None:
            frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
            atomic_write_text(path, frame.to_csv(index=False))
            return
        exists = False
    if not exists:
        header = list(row)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerow(row)


class RunLog:
    """Writes a run's epoch and step rows to CSV and TensorBoard; with `enabled` False (a
    worker other than the chief) it writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            try:
                import tensorboard  # noqa: F401  (tf.summary.scalar needs it since TF 2.21)
            except ImportError:
                warnings.warn("The tensorboard package is not installed, so no TensorBoard "
                              "scalars are written (log.csv still is). `pip install tensorboard` "
                              "to get them.", stacklevel=3)
                self._writer = _NoSummaries()
            else:
                self._writer = tf.summary.create_file_writer(
                    str(self.run_dir / runs.TENSORBOARD_DIR))
        return self._writer

    def _scalars(self, prefix: str, step: int, values: dict) -> None:
        if isinstance(self.writer, _NoSummaries):
            return
        with self.writer.as_default(step=step):
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(f"{prefix}/{name}", value)

    def step_row(self, step: int, logs: dict) -> None:
        if not self.enabled:
            return
        append_csv(self.run_dir / runs.STEP_LOG_FILE, {"step": step, **logs}, key="step")
        self._scalars("step", step, logs)

    def epoch_row(self, row: dict) -> None:
        if not self.enabled:
            return
        append_csv(self.run_dir / runs.LOG_FILE, row, key="epoch")
        self._scalars("epoch", row["step"],
                      {k: v for k, v in row.items() if k not in ("epoch", "step")})
        self.writer.flush()

    def drop_rows_after(self, *, epoch: int, step: int) -> None:
        """Drops rows written after the restored checkpoint (a crash between log and save)."""
        if not self.enabled:
            return
        for name, column, limit in ((runs.LOG_FILE, "epoch", epoch),
                                    (runs.STEP_LOG_FILE, "step", step)):
            path = self.run_dir / name
            frame = readable_log(path, column)
            if frame is None:
                continue
            kept = frame[frame[column] <= limit]
            if len(kept) < len(frame):
                atomic_write_text(path, kept.to_csv(index=False))
