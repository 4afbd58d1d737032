"""Everything Kaggle: the dataset (attached /kaggle/input copy, kagglehub, the kaggle package's
API), credentials, safe unzip, a previous notebook version's run output, and the way there from a
laptop: a wheel dataset for offline installs and the notebooks pushed as kernels.

    credentials.py  where the credentials are (never their values), Kaggle Secrets, redaction
    sources.py      the two download clients: kagglehub and the kaggle package
    archive.py      safe unzip
    bundle.py       `cmc-kit kaggle bundle`: cmc_kit's wheel + what Kaggle's image may lack
    kernels.py      `cmc-kit kaggle push`: one kernel folder per notebook, pushed in order

Like `config`, this package reads environment variables (credentials). Nothing here imports
TensorFlow or the training code.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmc_kit.config import default_paths, on_kaggle
from cmc_kit.errors import CmcKitError, CredentialsError
from cmc_kit.fileio import atomic_write_text
from cmc_kit.kaggle.archive import safe_unzip
from cmc_kit.kaggle.credentials import (authenticate, credentials_help, credentials_problem,
                                        find_credentials,
                                        import_kaggle_api, load_kaggle_secrets)
from cmc_kit.kaggle.sources import import_kagglehub, kaggle_api_download, kagglehub_download
from cmc_kit.layout import holds_samples

KAGGLE_DATASET = "tpapp157/earth-terrain-height-and-segmentation-map-images"
COMPLETE_MARKER = ".cmc_kit_complete"

__all__ = ["COMPLETE_MARKER", "KAGGLE_DATASET", "download", "find_attached_dataset",
           "find_previous_output", "safe_unzip"]


def download(
    dest: str | os.PathLike | None = None,
    *,
    api: Any = None,
    hub: Any = None,
    kaggle_input: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Returns a folder holding the Kaggle Terrain Map dataset, downloading it if needed.

    Tries, in order, and says which it used (on stderr):
      1. on Kaggle (or when `kaggle_input` is given) the copy attached under /kaggle/input, read
         in place: no download, no credentials. Not attached: this notebook's Kaggle Secrets
         (KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY) are loaded for the next two;
      2. a finished earlier download in `dest` (default: data/terrain), unless `force`;
      3. kagglehub, when installed (`pip install 'cmc-kit[kaggle]'`): its cache, or `dest` when
         `dest` is given; credentials as kagglehub finds them (automatic inside Kaggle);
      4. the kaggle package: the zip into `dest`, unzipped safely, `dest/.cmc_kit_complete`
         written last.
    When all fail, the error lists what each source said; no key or token is ever in it.

    Args:
        dest: folder to download into.
        api: a `kaggle.api.kaggle_api_extended.KaggleApi`-like object (`authenticate()`,
            `dataset_download_files(dataset, path=, unzip=, quiet=)`); default: the kaggle package.
        hub: a kagglehub-like object (`dataset_download(handle, path=None, *,
            force_download=False, output_dir=None) -> str`); default: kagglehub if installed.
        kaggle_input: folder to search for an attached copy instead of /kaggle/input.
        force: download again even if a copy is complete.
    """
    tried: list[str] = []
    if kaggle_input is not None or on_kaggle():
        input_root = Path(kaggle_input) if kaggle_input is not None else default_paths()["input"]
        attached = find_attached_dataset(input_root)
        if attached is not None:
            _tell(f"Using the copy of {KAGGLE_DATASET} attached at {attached} (nothing downloaded).")
            return attached
        tried.append(f"an attached copy under {input_root}: none (in the notebook choose 'Add "
                     f"Input' and add the dataset {KAGGLE_DATASET}: no credentials needed)")
        if on_kaggle():
            loaded = load_kaggle_secrets()
            if loaded:
                _tell(f"Using this notebook's Kaggle secrets {', '.join(loaded)}.")
    given = dest is not None
    dest = Path(dest).expanduser() if given else default_paths()["data"] / "terrain"
    if (dest / COMPLETE_MARKER).exists() and not force:
        return dest
    hub = import_kagglehub() if hub is None else hub
    if hub is None:
        tried.append("kagglehub: not installed (`pip install 'cmc-kit[kaggle]'` adds it)")
    else:
        try:
            path = kagglehub_download(hub, KAGGLE_DATASET, output_dir=dest if given else None,
                                      force=force)
            _tell(f"Downloaded {KAGGLE_DATASET} with kagglehub: {path}")
            return path
        except CmcKitError as err:
            tried.append(f"kagglehub: {err}")
    try:
        _download_with_kaggle_api(api, dest)
    except CmcKitError as err:
        lines = [f"Could not get {KAGGLE_DATASET}. Tried, in order:"]
        lines += [f"  {number}. {text}" for number, text in enumerate(tried, start=1)]
        lines.append(f"  {len(tried) + 1}. the kaggle package: {err}")
        raise type(err)("\n".join(lines)) from None
    _tell(f"Downloaded {KAGGLE_DATASET} with the kaggle package into {dest}")
    return dest


def _download_with_kaggle_api(api: Any, dest: Path) -> None:
    if api is None:
        if find_credentials() is None or credentials_problem() is not None:
            raise CredentialsError(credentials_help())
        api = import_kaggle_api()
    authenticate(api)
    ours = (dest / COMPLETE_MARKER).exists()  # an earlier download of ours may be replaced
    (dest / COMPLETE_MARKER).unlink(missing_ok=True)
    kaggle_api_download(api, KAGGLE_DATASET, dest, replace_existing=ours)
    atomic_write_text(dest / COMPLETE_MARKER, json.dumps({"dataset": KAGGLE_DATASET}) + "\n")


def _tell(line: str) -> None:
    """Where the data came from, on stderr: stdout of `cmc-kit download` is the path alone."""
    print(line, file=sys.stderr)


def find_attached_dataset(input_root: str | os.PathLike) -> Path | None:
    """The folder of an attached copy of the dataset under a Kaggle input root, or None.

    Looks first at the two Kaggle mount layouts, `<root>/<slug>` and
    `<root>/datasets/<owner>/<slug>`, then at any top-level input holding triplets.
    """
    input_root = Path(input_root)
    owner, slug = KAGGLE_DATASET.split("/")
    for candidate in (input_root / slug, input_root / "datasets" / owner / slug):
        if holds_samples(candidate):
            return candidate
    if not input_root.is_dir():
        return None
    # Renamed or versioned mounts: the first input (or input/datasets/<owner>/<name>) with files.
    children = sorted(p for p in input_root.iterdir() if p.is_dir() and p.name != "datasets")
    datasets = input_root / "datasets"
    if datasets.is_dir():
        children += sorted(q for p in datasets.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir())
    return next((child for child in children if holds_samples(child)), None)


# -- previous notebook versions --------------------------------------------------------------

def find_previous_output(run: str | os.PathLike, input_root: str | os.PathLike | None = None, *,
                         is_run: Callable[[Path], bool]) -> Path | None:
    """A previous Kaggle notebook version's copy of a run, attached as input.

    Looks under `input_root` (default: /kaggle/input when running on Kaggle, else nowhere) for a
    folder with the same name as `run` (a run directory or just its name) for which
    `is_run(folder)` holds, e.g. "holds config.json and checkpoints/"; the first in path order.
    Whether `run` itself already holds a checkpoint is the caller's question.
    """
    name = Path(run).name
    if input_root is None:
        if not on_kaggle():
            return None
        input_root = default_paths()["input"]
    input_root = Path(input_root)
    if not input_root.is_dir():
        return None
    for candidate in sorted(input_root.rglob(glob.escape(name))):
        if candidate.is_dir() and is_run(candidate):
            print(f"Continuing from the previous notebook output {candidate}")
            return candidate
    return None
