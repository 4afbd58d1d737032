"""Atomic file writes: a crash or an error never leaves a half-written file at the target path.

`atomic_path(path)` hands out a temporary path in the target's folder for any writer that takes a
path (`DataFrame.to_parquet`, `np.save`, `Image.save`); on success the file is fsynced and renamed
over the target, on error it is deleted and the target is left as it was. Text goes through
`cmc_kit.config.atomic_write_text`; bytes through `atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


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
