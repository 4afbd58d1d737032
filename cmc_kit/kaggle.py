"""Kaggle: previous notebook versions' outputs attached as input (the rest moves here next)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cmc_kit.config import default_paths, on_kaggle


def find_previous_output(run_name: str, input_root: str | os.PathLike | None = None, *,
                         is_run: Callable[[Path], bool]) -> Path | None:
    """A previous Kaggle notebook version's copy of a run, attached as input: the first folder
    named `run_name` for which `is_run(folder)` holds, anywhere under `input_root` (default:
    /kaggle/input when running on Kaggle, nowhere elsewhere)."""
    if input_root is None:
        if not on_kaggle():
            return None
        input_root = default_paths()["input"]
    input_root = Path(input_root)
    if not input_root.is_dir():
        return None
    for folder in sorted(path for path in input_root.rglob(run_name) if path.is_dir()):
        if is_run(folder):
            return folder
    return None
