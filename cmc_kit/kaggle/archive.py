"""Safe unzip: a downloaded archive is extracted only if every entry stays inside the target."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from cmc_kit.errors import DataError


def safe_unzip(archive: str | os.PathLike, dest: str | os.PathLike, *,
               replace_existing: bool = False) -> None:
    """Extracts `archive` into `dest`, refusing entries that would land outside it.

    Every entry is checked before anything is written; extraction goes to a temporary folder
    inside `dest` and is moved into place only when complete, so a failure leaves no partial files.
    A file or folder of `dest` with the name of one of the archive's top-level entries (e.g. a
    `_dataset` folder already there) is moved aside to `<name>.before-unzip` with a warning,
    never deleted, unless `replace_existing`.
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
                    if target.exists() or target.is_symlink():
                        _clear(target, keep=not replace_existing)
                    os.replace(entry, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a valid zip file ({err}). Delete it and run "
                        "`cmc-kit download` again.") from err


def _clear(target: Path, *, keep: bool) -> None:
    """Makes room for an extracted entry: moves `target` aside (`keep`) or deletes it."""
    if keep:
        aside = target.with_name(target.name + ".before-unzip")
        number = 1
        while aside.exists():
            number += 1
            aside = target.with_name(f"{target.name}.before-unzip-{number}")
        os.replace(target, aside)
        warnings.warn(f"{target} was in the way of the download and is kept as {aside}; delete "
                      "it if you do not need it.", stacklevel=4)
    elif target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def _check_zip_entry(info: zipfile.ZipInfo, archive: Path, dest_real: Path) -> None:
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    is_symlink = stat.S_ISLNK(info.external_attr >> 16)
    if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in pure.parts or is_symlink
            or not (dest_real / name).resolve().is_relative_to(dest_real)):
        raise DataError(f"Refusing to unzip {archive}: entry {info.filename!r} would be written outside "
                        f"{dest_real} (absolute path, '..' or link). The archive is not the expected "
                        "dataset; delete it and download again from kaggle.com.")
