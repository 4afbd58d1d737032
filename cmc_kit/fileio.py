"""Atomic file writes: a crash or an error never leaves a half-written file at the target path.

`atomic_path(path)` hands out a temporary path in the target's folder for any writer that takes a
path (`DataFrame.to_parquet`, `np.save`, `Image.save`); on success the file is fsynced and renamed
over the target, on error it is deleted and the target is left as it was. Text goes through
`atomic_write_text`, bytes through `atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from cmc_kit.errors import CmcKitError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; fsyncs it and renames it onto `path` on success.

    The temporary name keeps the target's suffix, because some writers choose the format from it
    (`np.save` appends ".npy" otherwise, pandas infers compression). The parent folder is created.
    On an exception inside the block the temporary file is removed and the exception re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random token: unique across processes and threads writing the same target.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        # Flush the data to disk before the rename, or a power loss could leave an empty file
        # under the final name. "r+b": Windows refuses to fsync a read-only handle.
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (see `atomic_path`); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` atomically (see `atomic_path`), in the locale's encoding; returns
    the path. On any error (e.g. `path` is an existing folder) the target is left as it was."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
    return path


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`. Raises OSError (unreadable) or ValueError (not UTF-8 text, not
    JSON, or JSON that is not an object) for the caller to turn into its own one-line message."""
    content = json.loads(Path(path).read_text())
    if not isinstance(content, dict):
        raise ValueError(f"a JSON object was expected, not {type(content).__name__} "
                         f"{str(content)[:60]}")
    return content


def write_problem(err: BaseException) -> str | None:
    """"no space", "read-only" or None: why a write failed, from the OS error or from the text
    of a library's error that wraps it (TensorFlow's checkpoint saver, pyarrow)."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space left on device" in text:
        return "no space"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text \
            or "Permission denied" in text:
        return "read-only"
    return None


def free_megabytes(folder: str | os.PathLike) -> float:
    """Free space on the disk holding `folder` (or its nearest existing parent), in MB."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / 1e6


def check_folder_path(path: str | os.PathLike | None, what: str, error_cls=None) -> None:
    """`path` must be a folder or creatable as one: not a file, nor below a file.

    Raises `error_cls` (default CmcKitError) naming `what`, before any work is done.
    """
    if path is None:
        return
    error_cls = error_cls or CmcKitError
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error_cls(f"{what} {path} is a file, not a folder. Give a folder path (it is "
                        "created if missing) or move the file away.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error_cls(f"{what} {path} cannot be created: {parent} is a file, not a "
                                "folder. Choose another path.")
            break


def output_file_path(path: str | os.PathLike, what: str, default_name: str,
                     suffixes: tuple[str, ...] | None = None) -> Path:
    """Where to write an output file: an existing folder gets `default_name` inside it.

    Checked before any work: the suffix (if `suffixes`) and a folder that can hold the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if suffixes and path.suffix.lower() not in suffixes:
        raise CmcKitError(f"{what} {path} must end in {' or '.join(suffixes)} (or be a folder, "
                          f"which gets {default_name}).")
    check_folder_path(path.parent, f"The folder of {what}")
    return path
