"""The Terrain Map layout on disk, as Kaggle ships it and `cmc-kit synth` writes it: what a
sample's three files and the metadata are called.

    DATA/_dataset/0001_t.png    terrain, RGB
    DATA/_dataset/0001_h.png    height, 16-bit grey
    DATA/_dataset/0001_i2.png   segmentation, palette RGB
    DATA/metadata.csv           optional: one row per sample id (the synthetic set's parameters)

Samples may sit at any depth under DATA; the `_dataset` folder name is a convention, not a rule.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from cmc_kit.errors import DataError

VIEW_SUFFIXES = {"terrain": "t", "height": "h", "segmentation": "i2"}
DATASET_FOLDER = "_dataset"
METADATA_FILENAME = "metadata.csv"
SAMPLE_FILE = re.compile(r"^(?P<id>.+)_(?P<suffix>t|h|i2)\.png$", re.IGNORECASE)
_SUFFIX_TO_VIEW = {suffix: view for view, suffix in VIEW_SUFFIXES.items()}


def sample_file(name: str) -> tuple[str, str] | None:
    """(sample id, view) of a sample file name such as "0042_i2.png"; None for other names."""
    match = SAMPLE_FILE.match(name)
    if not match:
        return None
    return match.group("id"), _SUFFIX_TO_VIEW[match.group("suffix").lower()]


def sample_file_name(sample_id: str, view: str) -> str:
    """The file name of one view of a sample: ("0042", "segmentation") -> "0042_i2.png"."""
    return f"{sample_id}_{VIEW_SUFFIXES[view]}.png"


def walk_pngs(root: str | os.PathLike):
    """Yields PNG paths under root, following symlinked folders but never the same folder twice."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(files):
            if name.lower().endswith(".png"):
                yield Path(folder) / name


def holds_samples(folder: str | os.PathLike, *, complete: bool = False) -> bool:
    """True when a segmentation file (`complete`: all three files of one sample) is under
    `folder`; stops at the first one, so it is cheap on a large dataset."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    views_of: dict[str, set[str]] = {}
    for path in walk_pngs(folder):
        found = sample_file(path.name)
        if found is None:
            continue
        sample_id, view = found
        if not complete and view == "segmentation":
            return True
        views_of.setdefault(sample_id, set()).add(view)
        if len(views_of[sample_id]) == len(VIEW_SUFFIXES):
            return True
    return False


def png_size(path) -> tuple[int, int] | None:
    """(height, width) that a PNG's header claims, without decoding it; None when the file
    cannot be read or is not a PNG."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(24)
    except (OSError, ValueError, UnicodeError):
        return None
    if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR":
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
        return height, width
    return None


def find_metadata_csv(root: str | os.PathLike) -> Path | None:
    """`metadata.csv` at the data root (or beside a `_dataset` folder given as the root)."""
    root = Path(root)
    if (root / METADATA_FILENAME).is_file():
        return root / METADATA_FILENAME
    if root.name == DATASET_FOLDER and (root.parent / METADATA_FILENAME).is_file():
        return root.parent / METADATA_FILENAME
    return None


def read_metadata(path: str | os.PathLike) -> pd.DataFrame:
    """A metadata.csv with its `id` column as strings."""
    path = Path(path)
    try:
        metadata = pd.read_csv(path, dtype={"id": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"Cannot read metadata file {path}: {err}. Fix or delete it.") from err
    if "id" not in metadata.columns:
        raise DataError(f"Metadata file {path} has no 'id' column (columns: "
                        f"{', '.join(metadata.columns)}). Add one or delete the file.")
    return metadata
