"""Which dataset the notebooks use (the Kaggle one, a folder, or the synthetic set), recorded by
01 for the later notebooks, and where its training cache goes."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cmc_kit.config import default_paths, on_kaggle
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.fileio import atomic_write_text
from cmc_kit.layout import holds_samples

DATASET_POINTER = "dataset.json"


@dataclasses.dataclass(frozen=True)
class DataChoice:
    path: Path
    source: str   # "folder" (given), "kaggle" (attached or downloaded), "synthetic"
    note: str     # one or more lines saying why


def get_data(data_dir: str | os.PathLike | None = None, *, force_synthetic: bool = False,
             synthetic_samples: int = 400, synthetic_size: int = 256, seed: int = 0,
             downloader: Callable[..., Path] | None = None, pointer: Path | None = None) -> DataChoice:
    """Picks the dataset for the notebooks, in this order:

    1. `force_synthetic`: the synthetic set in `data_dir` (default DATA_ROOT/synthetic),
       generated unless already there;
    2. `data_dir` already holding `<id>_t/_h/_i2.png` triplets: used as it is;
    3. the Kaggle dataset (`cmc_kit.kaggle.download`): the copy attached under /kaggle/input on
       Kaggle, else kagglehub's copy, else a download with the kaggle package into `data_dir`
       (default DATA_ROOT/terrain) when credentials exist;
    4. otherwise the synthetic set, with the reason Kaggle was not used in `note`.

    When `data_dir` is None the choice is recorded in DATA_ROOT/dataset.json (or `pointer`) for
    the later notebooks (`find_data`).

    Args:
        downloader: `cmc_kit.kaggle.download`-like callable `(dest=...) -> Path` (tests pass a fake).
    """
    from cmc_kit import kaggle
    from cmc_kit.demo import ensure_synthetic

    given = Path(data_dir).expanduser() if data_dir is not None else None
    synthetic_home = given or default_paths()["data"] / "synthetic"
    if force_synthetic:
        path = ensure_synthetic(synthetic_home, synthetic_samples, synthetic_size, seed)
        choice = DataChoice(Path(path), "synthetic", "Synthetic dataset requested (FORCE_SYNTHETIC).")
    elif given is not None and holds_samples(given):
        choice = DataChoice(given, "folder", f"Using the dataset already in {given}.")
    else:
        downloader = downloader or kaggle.download
        try:
            path = Path(downloader(dest=given))
            where = "attached Kaggle input" if on_kaggle() else "downloaded or cached"
            choice = DataChoice(path, "kaggle", f"Kaggle Terrain Map dataset ({where}): {path}")
        except CmcKitError as err:
            missing = (f"DATA_DIR {given} did not exist (a typo? it is where a download would "
                       "go).\n" if given is not None and not given.exists() else "")
            path = ensure_synthetic(synthetic_home, synthetic_samples, synthetic_size, seed)
            choice = DataChoice(Path(path), "synthetic",
                                f"{missing}The Kaggle dataset is not available here:\n{err}\n"
                                f"Using the synthetic dataset in {path} instead.")
    if data_dir is None:
        remember_data(choice, pointer)
    return choice


def remember_data(choice: DataChoice, pointer: Path | None = None) -> Path:
    """Writes the chosen dataset to DATA_ROOT/dataset.json so notebooks 02-05 find it."""
    pointer = Path(pointer) if pointer is not None else default_paths()["data"] / DATASET_POINTER
    atomic_write_text(pointer, json.dumps({"path": str(Path(choice.path).resolve()),
                                           "source": choice.source}, indent=2) + "\n")
    return pointer


def find_data(data_dir: str | os.PathLike | None = None, *, pointer: Path | None = None) -> Path:
    """The dataset notebook 01 chose: `data_dir` if given, else the one recorded in dataset.json;
    on Kaggle without that record (another session), the Terrain Map copy attached as input.

    Raises DataError naming the folder and the fix (run 01_data_prep, or set DATA_DIR).
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not holds_samples(folder):
            raise DataError(f"DATA_DIR={folder} holds no <id>_t.png/_h.png/_i2.png samples. Run "
                            "01_data_prep.ipynb with the same DATA_DIR first, or fix DATA_DIR.")
        return folder
    pointer = Path(pointer) if pointer is not None else default_paths()["data"] / DATASET_POINTER
    folder = _pointed_to(pointer)
    if folder is not None and holds_samples(folder):
        return folder
    attached = _attached_on_kaggle()
    if attached is not None:
        print(f"Using the Terrain Map dataset attached at {attached} ({pointer} from "
              "01_data_prep is not in this session)")
        return attached
    if folder is None:
        raise DataError(f"No dataset recorded in {pointer}. Run 01_data_prep.ipynb first "
                        "(it picks the Kaggle or the synthetic data), or set DATA_DIR.")
    raise DataError(f"{pointer} points to {folder}, which holds no samples any more. Run "
                    "01_data_prep.ipynb again, or set DATA_DIR.")


def _pointed_to(pointer: Path) -> Path | None:
    """The folder 01_data_prep remembered in `pointer`; None when there is none or the file is
    damaged (then the other ways of finding the data apply)."""
    try:
        return Path(json.loads(pointer.read_text())["path"]) if pointer.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):  # not JSON / UTF-8, or no "path"
        return None


def _attached_on_kaggle() -> Path | None:
    """On Kaggle, the Terrain Map copy attached to this notebook: a notebook pushed as its own
    kernel (`cmc-kit kaggle push`) runs in a session where 01 recorded nothing."""
    if not on_kaggle():
        return None
    from cmc_kit import kaggle

    return kaggle.find_attached_dataset(default_paths()["input"])


def cache_dir_for(data: str | os.PathLike) -> Path:
    """Where the training cache of a dataset goes.

    On Kaggle: the local temp folder, because everything under /kaggle/working is saved as the
    notebook's output (the cache of the full dataset is ~8 GB and is rebuilt in minutes).
    Elsewhere: next to the dataset (`<data>-cache`) when that folder is writable, else
    DATA_ROOT/<name>-cache.
    """
    data = Path(data).resolve()
    if on_kaggle():
        parent = Path(tempfile.gettempdir()) / "cmc_kit"
    elif os.access(data.parent, os.W_OK):
        parent = data.parent
    else:
        parent = default_paths()["data"]
    return parent / f"{data.name}-cache"


def cache_setting(cache: str | os.PathLike | None) -> str:
    """The `data.cache` setting for a cache folder: its path when it is complete, else "" (PNGs).

    A resumed Kaggle session may lack the cache of the previous one; "" then trains from the
    PNGs, which give the same batches.
    """
    if cache is None:
        return ""
    return str(Path(cache)) if (Path(cache) / "manifest.json").is_file() else ""
