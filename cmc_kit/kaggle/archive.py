"""Safe unzip: a downloaded archive is extracted only if every entry stays inside the target."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from cmc_kit.errors import DataError


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
