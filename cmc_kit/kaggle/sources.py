"""The two download clients behind `cmc-kit download`: kagglehub, Kaggle's current client (its
own cache, automatic authentication inside Kaggle notebooks, KAGGLE_API_TOKEN), and the older
kaggle package's API (a zip fetched into a folder of ours and unzipped safely).

Each returns the folder that holds the samples or raises a CmcKitError saying why, with any key
or token taken out of the other library's message.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cmc_kit.errors import CmcKitError, CredentialsError, DataError
from cmc_kit.kaggle.archive import safe_unzip
from cmc_kit.kaggle.credentials import credentials_help, redact, redacted_output
from cmc_kit.layout import holds_samples

_REFUSED = (401, 403)


def import_kagglehub() -> Any | None:
    """The kagglehub module, or None when it is not installed (it is the `[kaggle]` extra)."""
    try:
        import kagglehub
    except ImportError:
        return None
    return kagglehub


def kagglehub_download(hub: Any, dataset: str, *, output_dir: Path | None = None,
                       force: bool = False) -> Path:
    """`hub.dataset_download(dataset)`: kagglehub's cached copy (or `output_dir`, where the
    installed kagglehub offers it), checked to hold samples.

    `hub` is the kagglehub module or a stand-in with the same `dataset_download(handle, path=None,
    *, force_download=False, output_dir=None) -> str`.
    """
    options: dict[str, Any] = {"force_download": True} if force else {}
    if output_dir is not None and accepts(hub.dataset_download, "output_dir"):
        options["output_dir"] = str(output_dir)  # kagglehub >= 0.3.12; older ones use the cache
    try:
        with redacted_output():
            path = Path(hub.dataset_download(dataset, **options))
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # kagglehub's HTTP, authentication and network errors
        raise _refused_or_failed(err, f"kagglehub could not download {dataset}",
                                 with_help=False) from None
    if not holds_samples(path, complete=True):
        raise DataError(f"kagglehub returned {path}, which holds no complete <id>_t.png, "
                        "<id>_h.png, <id>_i2.png sample. Run `cmc-kit download --force` to fetch "
                        "it again.")
    return path


def kaggle_api_download(api: Any, dataset: str, dest: Path, *,
                        replace_existing: bool = False) -> Path:
    """The dataset zip fetched with the kaggle package's `api` into a staging folder inside
    `dest`, unzipped into `dest`; returns `dest` once it holds samples.

    `api` is an authenticated `KaggleApi`-like object (`dataset_download_files(dataset, path=,
    unzip=, quiet=)`). Folders of `dest` that the archive would replace are moved aside (with a
    warning) unless `replace_existing` (they are an earlier download of ours).
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cmc_kit_download-", dir=dest))
    try:
        try:
            with redacted_output():
                api.dataset_download_files(dataset, path=str(staging), unzip=False, quiet=False)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # requests.HTTPError, network errors, kaggle's own errors
            raise _refused_or_failed(err, f"Downloading {dataset} into {dest} failed") from None
        archives = sorted(staging.glob("*.zip"))
        if not archives:
            raise DataError(f"The Kaggle API returned no zip file for {dataset}. Retry "
                            "`cmc-kit download`; if it persists, download the zip from the "
                            f"dataset page and unzip it into {dest}.")
        for archive in archives:
            safe_unzip(archive, dest, replace_existing=replace_existing)
            archive.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not holds_samples(dest, complete=True):
        raise DataError(f"The archive of {dataset} unpacked into {dest} holds no complete "
                        "<id>_t.png, <id>_h.png, <id>_i2.png sample. Delete the folder and run "
                        "`cmc-kit download --force` again.")
    return dest


def _refused_or_failed(err: Exception, what: str, *, with_help: bool = True) -> CmcKitError:
    """A CredentialsError for HTTP 401/403 or an authentication error (with the ways to give
    credentials when `with_help`), else a DataError quoting the first line of `err`; keys and
    tokens are taken out."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    detail = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if status in _REFUSED or "unauthenticated" in type(err).__name__.lower():
        return CredentialsError(
            f"{what}: Kaggle refused it ({f'HTTP {status}' if status else type(err).__name__}): "
            "the credentials are missing, wrong or expired, or the dataset's terms were not "
            "accepted on its page. Create a new token on kaggle.com -> Settings -> API."
            + ("\n" + credentials_help() if with_help else ""))
    return DataError(f"{what}: {detail}. Check the internet connection and retry "
                     "`cmc-kit download`.")


def accepts(function: Any, name: str) -> bool:
    """Whether `function` takes a parameter `name` (an installed library's version differs)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
