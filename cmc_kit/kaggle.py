"""Everything Kaggle: the attached /kaggle/input copy, the API download, credentials, safe unzip,
and a previous notebook version's run output.

Like `config`, this module reads environment variables (the kaggle package's credentials).
Nothing here imports TensorFlow or the training code.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from cmc_kit.config import default_paths, on_kaggle
from cmc_kit.layout import holds_samples
from cmc_kit.errors import CredentialsError, DataError

KAGGLE_DATASET = "tpapp157/earth-terrain-height-and-segmentation-map-images"
COMPLETE_MARKER = ".cmc_kit_complete"


def download(
    dest: str | os.PathLike | None = None,
    *,
    api: Any = None,
    kaggle_input: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Returns a folder holding the Kaggle Terrain Map dataset, downloading it if needed.

    Inside a Kaggle notebook (or when `kaggle_input` is given) the attached copy under
    /kaggle/input is located and returned: no download, no copy. Elsewhere the dataset zip is
    fetched with the Kaggle API into `dest` (default: data/terrain), unzipped safely, and
    `dest/.cmc_kit_complete` is written last; later calls return at once unless `force`.

    Args:
        dest: folder to download into.
        api: a `kaggle.api.kaggle_api_extended.KaggleApi`-like object (`authenticate()`,
            `dataset_download_files(dataset, path=, unzip=, quiet=)`); default: the kaggle package.
        kaggle_input: folder to search for an attached copy instead of /kaggle/input.
        force: download again even if `dest` is complete.
    """
    if kaggle_input is not None or on_kaggle():
        input_root = Path(kaggle_input) if kaggle_input is not None else default_paths()["input"]
        attached = find_attached_dataset(input_root)
        if attached is not None:
            return attached
        if kaggle_input is not None or _find_credentials() is None:
            raise DataError(
                f"The Terrain Map dataset is not attached under {input_root}. In the notebook "
                f"choose 'Add Input' and add the dataset {KAGGLE_DATASET} (no credentials needed), "
                "or add Kaggle secrets KAGGLE_USERNAME and KAGGLE_KEY to download it instead.")
    dest = Path(dest).expanduser() if dest is not None else default_paths()["data"] / "terrain"
    marker = dest / COMPLETE_MARKER
    if marker.exists() and not force:
        return dest
    if api is None:
        if _find_credentials() is None:
            raise CredentialsError(_credentials_help())
        api = _import_kaggle_api()
    _authenticate(api)
    dest.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    _download_and_unzip(api, dest)
    if not holds_samples(dest, complete=True):
        raise DataError(f"The archive of {KAGGLE_DATASET} unpacked into {dest} holds no complete "
                        "<id>_t.png, <id>_h.png, <id>_i2.png sample. Delete the folder and run "
                        "`cmc-kit download --force` again.")
    marker.write_text(json.dumps({"dataset": KAGGLE_DATASET}) + "\n")
    return dest


def _download_and_unzip(api: Any, dest: Path) -> None:
    """The dataset zip fetched into a staging folder inside `dest`, unzipped into `dest`."""
    staging = Path(tempfile.mkdtemp(prefix=".cmc_kit_download-", dir=dest))
    try:
        try:
            api.dataset_download_files(KAGGLE_DATASET, path=str(staging), unzip=False, quiet=False)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # requests.HTTPError, network errors, kaggle's own errors
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise CredentialsError(
                    f"Kaggle refused the download of {KAGGLE_DATASET} (HTTP {status}): the "
                    "credentials are wrong or expired, or the dataset's terms were not accepted "
                    "on its page. Create a new token on kaggle.com -> Settings -> API and update "
                    "them.\n" + _credentials_help()) from None
            raise DataError(f"Downloading {KAGGLE_DATASET} into {dest} failed: {err}. Check the "
                            "internet connection and retry `cmc-kit download`.") from err
        archives = sorted(staging.glob("*.zip"))
        if not archives:
            raise DataError(f"The Kaggle API returned no zip file for {KAGGLE_DATASET}. "
                            "Retry `cmc-kit download`; if it persists, download the zip from the "
                            f"dataset page and unzip it into {dest}.")
        for archive in archives:
            safe_unzip(archive, dest)
            archive.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def safe_unzip(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extracts `archive` into `dest`, refusing entries that would land outside it.

    Every entry is checked before anything is written; extraction goes to a temporary folder
    inside `dest` and is moved into place only when complete, so a failure leaves no partial files.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _check_zip_entry(info, archive, dest_real)
            staging = Path(tempfile.mkdtemp(prefix=".cmc_kit_unzip-", dir=dest))
            try:
                bundle.extractall(staging)
                for entry in sorted(staging.iterdir()):
                    target = dest / entry.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(entry, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a valid zip file ({err}). Delete it and run "
                        "`cmc-kit download` again.") from err


def _check_zip_entry(info: zipfile.ZipInfo, archive: Path, dest_real: Path) -> None:
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    is_symlink = stat.S_ISLNK(info.external_attr >> 16)
    if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in pure.parts or is_symlink
            or not (dest_real / name).resolve().is_relative_to(dest_real)):
        raise DataError(f"Refusing to unzip {archive}: entry {info.filename!r} would be written outside "
                        f"{dest_real} (absolute path, '..' or link). The archive is not the expected "
                        "dataset; delete it and download again from kaggle.com.")


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


# -- credentials -------------------------------------------------------------------------------

def _kaggle_config_dir() -> Path:
    """Where the kaggle package looks for kaggle.json (same rule as kaggle 1.6+/2.x)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return legacy


def _find_credentials() -> str | None:
    """Names the first credential source the kaggle package would use, or None. Never the key."""
    config_file = _kaggle_config_dir() / "kaggle.json"
    from_file: dict[str, Any] = {}
    if config_file.is_file():
        if os.name != "nt" and config_file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.warn(f"{config_file} is readable by other users; protect your Kaggle key with "
                          f"`chmod 600 {config_file}`.", stacklevel=3)
        try:
            from_file = json.loads(config_file.read_text())
        except (OSError, ValueError):
            from_file = {}
        from_file = from_file if isinstance(from_file, dict) else {}
    username = os.environ.get("KAGGLE_USERNAME") or from_file.get("username")
    key = os.environ.get("KAGGLE_KEY") or from_file.get("key")
    if username and key:
        return f"{config_file}" if from_file.get("key") else "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_API_V1_TOKEN") and Path(os.environ["KAGGLE_API_V1_TOKEN"]).is_file():
        return "KAGGLE_API_V1_TOKEN"
    for name in ("access_token", "access_token.txt", "credentials.json"):  # new-style / OAuth
        if (Path.home() / ".kaggle" / name).is_file():
            return str(Path.home() / ".kaggle" / name)
    return None


def _credentials_help() -> str:
    config_file = _kaggle_config_dir() / "kaggle.json"
    partial = ""
    if bool(os.environ.get("KAGGLE_USERNAME")) != bool(os.environ.get("KAGGLE_KEY")):
        missing = "KAGGLE_KEY" if os.environ.get("KAGGLE_USERNAME") else "KAGGLE_USERNAME"
        partial = f" ({missing} is not set while its partner is)"
    return (
        f"Kaggle credentials not found{partial}. Get a token on kaggle.com -> Settings -> API -> "
        "'Create New Token', then provide it in one of these ways and rerun `cmc-kit download`:\n"
        "  1. environment variables KAGGLE_USERNAME and KAGGLE_KEY;\n"
        f"  2. the downloaded kaggle.json saved as {config_file} with mode 600 "
        f"(`chmod 600 {config_file}`); set KAGGLE_CONFIG_DIR to keep it in another folder;\n"
        "  3. a new-style API token in the environment variable KAGGLE_API_TOKEN "
        "(or saved as ~/.kaggle/access_token);\n"
        "  4. in a Kaggle notebook: Add-ons -> Secrets, add KAGGLE_USERNAME and KAGGLE_KEY, then "
        "set them: `from kaggle_secrets import UserSecretsClient; s = UserSecretsClient(); "
        "os.environ['KAGGLE_USERNAME'] = s.get_secret('KAGGLE_USERNAME'); "
        "os.environ['KAGGLE_KEY'] = s.get_secret('KAGGLE_KEY')` "
        f"(or simply attach the dataset {KAGGLE_DATASET} with 'Add Input')."
    )


def _import_kaggle_api() -> Any:
    """Imports the kaggle package lazily; its import authenticates and may exit or raise."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kaggle prints its own auth help
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (SystemExit, OSError) as err:
        raise CredentialsError(_credentials_help()) from None  # kaggle's text can quote config values
    except ImportError as err:
        raise DataError("The `kaggle` package is not installed. Install it with "
                        "`pip install kaggle` (it is a cmc-kit dependency).") from err
    return KaggleApi()


def _authenticate(api: Any) -> None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except (SystemExit, OSError) as err:
        raise CredentialsError(_credentials_help()) from None  # kaggle's text can quote config values

