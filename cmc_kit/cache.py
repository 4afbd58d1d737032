"""The `prepare` cache: PNG triplets decoded once into .npy shards that training reads fast.

`prepare_cache(data, cache_dir)` writes the shards (class ids instead of RGB for the
segmentation) and `CacheReader` reads samples back by memory map for
`views.make_dataset(..., cache=...)`. Both sides use `decode.decode_sample`'s arrays, so batches
from the cache and from the PNGs are identical.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from cmc_kit.config import atomic_write_text
from cmc_kit.data import catalog_ids, discover
from cmc_kit.decode import SOURCE_CHANNELS, SOURCE_DTYPES, SOURCES, decode_sample, first_png_size
from cmc_kit.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cmc_kit-cache"
CACHE_VERSION = 1
CACHE_MANIFEST = "manifest.json"
_SHARD_META = "shard.json"


def prepare_cache(data: str | os.PathLike | pd.DataFrame, cache_dir: str | os.PathLike, *,
                  shard_size: int = 256, progress: bool = True) -> Path:
    """Converts PNG triplets once into .npy shards that `make_dataset(cache=...)` reads fast.

    Shard k holds the samples k*shard_size ... in id order: `terrain.npy` uint8 [S, H, W, 3],
    `height.npy` uint16 [S, H, W, 1], `segmentation.npy` class ids uint8 [S, H, W, 1], and
    `shard.json` (ids, unreadable ids). `manifest.json` lists the shards. Each shard is written
    under a temporary name and renamed when complete, so rerunning skips finished shards and an
    interrupted run resumes. Unreadable samples are recorded (and skipped by `make_dataset`).

    Args:
        data: dataset root folder (searched recursively) or a catalog DataFrame.
        cache_dir: output folder (created).
    Returns:
        `cache_dir` as a Path.
    """
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer. "
                         f"Received: shard_size={shard_size!r}")
    shard_size = int(shard_size)
    catalog = data if isinstance(data, pd.DataFrame) else discover(data)
    missing = [c for c in ("id", *SOURCES) if c not in catalog.columns]
    if missing:
        raise DataError(f"The catalog has no column(s) {missing}; prepare needs all three images. "
                        "Build it with cmc_kit.data.discover(DATA).")
    catalog = catalog.assign(id=catalog_ids(catalog)).sort_values("id").reset_index(drop=True)
    if len(catalog) == 0:
        raise DataError(f"No samples to cache in {data}. Check the folder holds "
                        "<id>_t.png, <id>_h.png and <id>_i2.png files.")
    image_size = first_png_size(catalog["terrain"])
    if image_size is None:
        raise DataError(f"None of the terrain PNGs of {data} can be read (e.g. "
                        f"{catalog['terrain'].iloc[0]}). Run `cmc-kit validate DATA`.")

    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    planned = [catalog.iloc[i:i + shard_size] for i in range(0, len(catalog), shard_size)]
    bar = _progress_bar(len(catalog)) if progress else None
    entries, built = [], 0
    for index, rows in enumerate(planned):
        name = f"shard-{index:05d}"
        meta = _read_shard_meta(root / name)
        wanted = rows["id"].tolist()
        if not (meta and meta["ids"] == wanted and meta["image_size"] == list(image_size)
                and meta["version"] == CACHE_VERSION):
            meta = _write_shard(root, name, rows, image_size, bar)
            built += 1
        elif bar is not None:
            bar.add(len(rows))
        entries.append({"name": name, "ids": meta["ids"], "unreadable": meta["unreadable"]})
        _write_manifest(root, image_size, shard_size, entries)
    _remove_stale_shards(root, {e["name"] for e in entries})

    unreadable = sum(len(e["unreadable"]) for e in entries)
    logger.info("Cache %s: %d samples in %d shards (%d built, %d reused), %d unreadable.",
                root, len(catalog), len(entries), built, len(entries) - built, unreadable)
    return root


def _write_shard(root: Path, name: str, rows: pd.DataFrame, image_size, bar) -> dict:
    """Decodes one shard's samples into a temporary folder, then renames it into place."""
    height, width = image_size
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {s: np.lib.format.open_memmap(tmp / f"{s}.npy", mode="w+", dtype=SOURCE_DTYPES[s]
                                           .as_numpy_dtype,
                                           shape=(len(rows), height, width, SOURCE_CHANNELS[s]))
              for s in SOURCES}

    def decode(row, terrain, height_path, segmentation):
        raw = decode_sample(terrain=terrain, height=height_path, segmentation=segmentation)
        return row, raw

    paths = (np.arange(len(rows)), *(rows[s].astype(str).to_numpy() for s in SOURCES))
    decoded = (tf.data.Dataset.from_tensor_slices(paths)
               .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ignore_errors(log_warning=True))
    readable = set()
    for row, raw in decoded.as_numpy_iterator():
        for s in SOURCES:
            if raw[s].shape[:2] != (height, width):
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(
                    f"{rows[s].iloc[row]} is {raw[s].shape[1]}x{raw[s].shape[0]} but the cache "
                    f"holds {width}x{height} images: every sample must have one size. Remove or "
                    "resize that sample, then rerun `cmc-kit prepare`.")
            arrays[s][row] = raw[s]
        readable.add(int(row))
        if bar is not None:
            bar.add(1)
    for array in arrays.values():
        array.flush()
    del arrays
    unreadable = []
    for i in sorted(set(range(len(rows))) - readable):
        unreadable.append(rows["id"].iloc[i])
        logger.warning("Sample %s cannot be decoded (%s); the cache marks it unreadable and "
                       "training skips it. Fix or remove those PNGs and rerun `cmc-kit prepare`.",
                       rows["id"].iloc[i], ", ".join(rows[s].iloc[i] for s in SOURCES))
        if bar is not None:
            bar.add(1)
    meta = {"version": CACHE_VERSION, "image_size": [height, width],
            "ids": rows["id"].tolist(), "unreadable": unreadable}
    (tmp / _SHARD_META).write_text(json.dumps(meta))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return meta


def _read_shard_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _SHARD_META).read_text())
    except (OSError, ValueError):  # not JSON, or not UTF-8 text
        return None


def _write_manifest(root: Path, image_size, shard_size: int, entries: list[dict]) -> None:
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                "image_size": list(image_size), "shard_size": shard_size,
                "sources": {s: {"dtype": SOURCE_DTYPES[s].name, "channels": SOURCE_CHANNELS[s]}
                            for s in SOURCES},
                "shards": entries}
    atomic_write_text(root / CACHE_MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _remove_stale_shards(root: Path, keep: set[str]) -> None:
    """Removes shard folders (and leftovers of interrupted runs) the manifest no longer lists."""
    for path in root.iterdir():
        stale_shard = path.name.startswith("shard-") and path.name not in keep
        leftover = path.name.startswith(".shard-") and ".tmp-" in path.name
        if path.is_dir() and (stale_shard or leftover):
            shutil.rmtree(path, ignore_errors=True)


class CacheReader:
    """Random access to the samples of a `prepare_cache` folder by memory-mapped .npy shards."""

    def __init__(self, root: Path):
        self.root = root
        path = root / CACHE_MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # not JSON, or not UTF-8 text
            raise DataError(f"Cannot read the cache manifest {path} ({err}). Build the cache "
                            f"with `cmc-kit prepare DATA {root}`.") from None
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            raise DataError(f"{path} is not a cmc_kit cache of version {CACHE_VERSION}. Rebuild it "
                            f"with `cmc-kit prepare DATA {root}` (into an empty folder).")
        self.image_size = tuple(manifest["image_size"])
        self.shards = [entry["name"] for entry in manifest["shards"]]
        self.where: dict[str, tuple[int, int]] = {}
        for index, entry in enumerate(manifest["shards"]):
            unreadable = set(entry["unreadable"])
            for row, sample_id in enumerate(entry["ids"]):
                # Unreadable samples point nowhere: loading them fails and the epoch skips them.
                self.where[sample_id] = (-1, -1) if sample_id in unreadable else (index, row)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard index and row of every id: int64 [n] each. Raises DataError for unknown ids."""
        missing = [i for i in ids if i not in self.where]
        if missing:
            raise DataError(f"{len(missing)} sample id(s) of the catalog are not in the cache "
                            f"{self.root} (e.g. {', '.join(missing[:5])}). Rebuild it with "
                            f"`cmc-kit prepare DATA {self.root}` from the same dataset.")
        located = np.array([self.where[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        return located[:, 0], located[:, 1]

    def _array(self, shard: int, source: str) -> np.ndarray:
        key = (shard, source)
        if key not in self._maps:
            self._maps[key] = np.load(self.root / self.shards[shard] / f"{source}.npy",
                                      mmap_mode="r")
        return self._maps[key]

    def read(self, shard: np.int64, row: np.int64, sources: tuple[str, ...]) -> list[np.ndarray]:
        if shard < 0:
            raise DataError(f"The sample at this position is marked unreadable in {self.root}.")
        return [np.array(self._array(int(shard), s)[int(row)]) for s in sources]

    def load(self, shard: tf.Tensor, row: tf.Tensor, sources: tuple[str, ...]) -> dict:
        """Graph op: the raw arrays of one cached sample, as `decode_sample` returns them."""
        arrays = tf.numpy_function(lambda s, r: self.read(s, r, sources), [shard, row],
                                   [SOURCE_DTYPES[s] for s in sources], stateful=False)
        height, width = self.image_size
        return {s: tf.ensure_shape(a, (height, width, SOURCE_CHANNELS[s]))
                for s, a in zip(sources, arrays)}


def _progress_bar(total: int):
    import keras

    return keras.utils.Progbar(total, unit_name="sample")
