"""Views and the input pipeline: PNG (or cache) -> paired crops -> tf.data batches.

A catalog row (`id`, `terrain`, `height`, `segmentation` paths) is decoded once into raw arrays
(`decode_sample`: terrain uint8 [H, W, 3], height uint16 [H, W, 1], segmentation class ids
uint8 [H, W, 1]); `make_views` cuts one shared crop window out of them, applies the same optional
flip/rotation to every view and normalises each view as `VIEW_SPECS` says.

Exact resume: the epoch order and every sample's random seed are drawn in NumPy from
(seed, epoch) before the pipeline starts, and all randomness inside the pipeline is stateless
(keyed by that per-sample seed), so the batches of an epoch are a pure function of
(catalog, seed, epoch) and `make_dataset(..., epoch=e).skip(k)` continues an interrupted epoch.

`prepare_cache` converts the PNGs once into .npy shards (class ids instead of RGB for the
segmentation) that `make_dataset(..., cache=...)` reads by memory map; it decodes with the same
`decode_sample`, so both paths give identical batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from cmc_kit.errors import ConfigError, DataError
from cmc_kit.palette import HEIGHT_SCALE, NUM_CLASSES, PALETTE, TERRAIN_SCALE

logger = logging.getLogger(__name__)

SOURCES = ("terrain", "height", "segmentation")
SOURCE_CHANNELS = {"terrain": 3, "height": 1, "segmentation": 1}  # raw arrays, [H, W, C]
SOURCE_DTYPES = {"terrain": tf.uint8, "height": tf.uint16, "segmentation": tf.uint8}

CACHE_FORMAT = "cmc_kit-cache"
CACHE_VERSION = 1
CACHE_MANIFEST = "manifest.json"
_SHARD_META = "shard.json"


# -- view specs ------------------------------------------------------------------------------

def normalise_terrain(x: tf.Tensor) -> tf.Tensor:
    """uint8-range RGB [..., 3] -> float32 in [-1, 1] (x / 127.5 - 1, as the original)."""
    return tf.cast(x, tf.float32) / TERRAIN_SCALE - 1.0


def normalise_height(x: tf.Tensor) -> tf.Tensor:
    """uint16-range height [..., 1] -> float32 in [-1, 1] (x / 32767.5 - 1, as the original)."""
    return tf.cast(x, tf.float32) / HEIGHT_SCALE - 1.0


def one_hot_classes(class_ids: tf.Tensor) -> tf.Tensor:
    """Class ids [..., 1] -> float32 one-hot [..., NUM_CLASSES]."""
    return tf.one_hot(tf.cast(class_ids[..., 0], tf.int32), NUM_CLASSES, dtype=tf.float32)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How one view is made from the raw arrays of a sample."""

    name: str
    source: str          # which raw array of `decode_sample` it is cut from
    channels: int        # channels of the float32 view tensor
    whole_image: bool    # True: the whole image resized to the crop size; False: the shared crop
    normalise: Callable[[tf.Tensor], tf.Tensor]  # raw (or resized) [h, w, c] -> float32 view


VIEW_SPECS: dict[str, ViewSpec] = {
    "terrain": ViewSpec("terrain", "terrain", 3, False, normalise_terrain),
    "segmentation": ViewSpec("segmentation", "segmentation", NUM_CLASSES, False, one_hot_classes),
    "height": ViewSpec("height", "height", 1, False, normalise_height),
    # Bilinear with antialias, then the terrain normalisation (both are linear, so the order
    # only changes float rounding).
    "overview": ViewSpec("overview", "terrain", 3, True, normalise_terrain),
}


def check_views(views: Iterable[str]) -> tuple[str, ...]:
    """Validates a list of view names and returns it as a tuple (order kept)."""
    views = (views,) if isinstance(views, str) else tuple(views)
    unknown = [v for v in views if v not in VIEW_SPECS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct names from {tuple(VIEW_SPECS)} "
                         f"(e.g. data views 'terrain,height'). Received: views={views!r}")
    return views


def sources_for(views: Iterable[str]) -> tuple[str, ...]:
    """The raw arrays the views need, in `SOURCES` order (decode only these)."""
    needed = {VIEW_SPECS[v].source for v in check_views(views)}
    return tuple(s for s in SOURCES if s in needed)


# -- decoding ---------------------------------------------------------------------------------

def nearest_palette_class(rgb: tf.Tensor) -> tf.Tensor:
    """Index of the nearest palette colour (L2 in RGB), TensorFlow twin of `palette.nearest_class`.

    Args:
        rgb: uint8 (or integer-valued) tensor [..., 3].
    Returns:
        uint8 tensor [...] of class ids in [0, NUM_CLASSES).
    """
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every c, so it is left out.
    # int32 keeps this exact; written per channel it is ~3x faster than a [..., 7, 3] difference.
    pixels = tf.cast(rgb, tf.int32)[..., None, :]                        # [..., 1, 3]
    palette = tf.constant(PALETTE, dtype=tf.int32)                        # [7, 3]
    dot = (pixels[..., 0] * palette[:, 0] + pixels[..., 1] * palette[:, 1]
           + pixels[..., 2] * palette[:, 2])                              # [..., 7]
    score = tf.reduce_sum(palette * palette, axis=-1) - 2 * dot          # [..., 7]
    # Ties go to the lower class id, as NumPy's argmin (tf.argmin leaves ties unspecified).
    distances = score * NUM_CLASSES + tf.range(NUM_CLASSES)              # [..., 7], unique
    return tf.cast(tf.argmin(distances, axis=-1), tf.uint8)             # [...]


def decode_terrain(path: tf.Tensor | str) -> tf.Tensor:
    """Terrain PNG -> uint8 [H, W, 3]."""
    return tf.io.decode_png(tf.io.read_file(path), channels=3, dtype=tf.uint8)


def decode_height(path: tf.Tensor | str) -> tf.Tensor:
    """16-bit height PNG -> uint16 [H, W, 1] (an 8-bit decoder would lose the precision)."""
    return tf.io.decode_png(tf.io.read_file(path), channels=1, dtype=tf.uint16)


def decode_segmentation(path: tf.Tensor | str) -> tf.Tensor:
    """Palette PNG -> class ids uint8 [H, W, 1] of the nearest palette colour."""
    rgb = tf.io.decode_png(tf.io.read_file(path), channels=3, dtype=tf.uint8)  # [H, W, 3]
    return nearest_palette_class(rgb)[..., None]


_DECODERS = {"terrain": decode_terrain, "height": decode_height,
             "segmentation": decode_segmentation}


def decode_sample(*, terrain=None, height=None, segmentation=None) -> dict[str, tf.Tensor]:
    """Decodes the given PNG paths of one sample into its raw arrays.

    Only the arrays whose path is given are decoded. Used by the PNG pipeline and by
    `prepare_cache`, so both produce the same arrays.

    Returns:
        {"terrain": uint8 [H, W, 3], "height": uint16 [H, W, 1],
         "segmentation": uint8 class ids [H, W, 1]} restricted to the given paths.
    """
    paths = {"terrain": terrain, "height": height, "segmentation": segmentation}
    raw = {name: _DECODERS[name](path) for name, path in paths.items() if path is not None}
    if not raw:
        raise ValueError("decode_sample needs at least one of terrain=, height=, segmentation=.")
    return raw


# -- views of one sample ------------------------------------------------------------------------

def make_views(raw: Mapping[str, tf.Tensor], seed: tf.Tensor, *, views: Iterable[str],
               crop_size: int, training: bool, augment: bool = False) -> dict[str, tf.Tensor]:
    """Cuts the views of one sample out of its raw arrays.

    The crop views share one window: random (from `seed`) when training, the centre otherwise.
    With `augment` (training only) one random horizontal flip and 90-degree rotation is applied
    to every view, overview included, so the views stay pixel-aligned.

    Args:
        raw: the arrays of `decode_sample` the views need, all [H, W, C] of one size.
        seed: int64 [2] stateless seed of this sample (ignored when not training).
    Returns:
        {view_name: float32 [crop_size, crop_size, channels]}
    """
    views = check_views(views)
    first = raw[sources_for(views)[0]]
    size = tf.shape(first)[:2]                                           # [2]: H, W
    checks = [tf.debugging.assert_equal(tf.shape(raw[s])[:2], size,
                                        message=f"{s} image size differs from the other views")
              for s in raw]
    checks.append(tf.debugging.assert_greater_equal(
        size, crop_size, message=f"image smaller than crop_size={crop_size}"))
    with tf.control_dependencies(checks):
        size = tf.identity(size)
    crop_seed, flip_seed, rotate_seed = tf.unstack(tf.random.split(tf.cast(seed, tf.int64), 3))

    if training:
        # One window for all crop views: top-left corner uniform over every valid position.
        # (The modulo bias is below 2^-21 for images up to 1024 px.)
        corner = tf.random.stateless_uniform([2], crop_seed, minval=0, maxval=tf.int32.max,
                                             dtype=tf.int32) % (size - crop_size + 1)  # [2]
    else:
        corner = (size - crop_size) // 2                                   # centre crop
    top, left = corner[0], corner[1]

    shaped = {}
    for name in views:
        spec = VIEW_SPECS[name]
        image = raw[spec.source]
        if spec.whole_image:
            image = tf.image.resize(tf.cast(image, tf.float32), (crop_size, crop_size),
                                    method="bilinear", antialias=True)     # [c, c, C]
        else:
            image = image[top:top + crop_size, left:left + crop_size, :]   # [c, c, C]
        shaped[name] = image

    if training and augment:
        flip = tf.random.stateless_uniform([], flip_seed, minval=0, maxval=2, dtype=tf.int32)
        turns = tf.random.stateless_uniform([], rotate_seed, minval=0, maxval=4, dtype=tf.int32)
        shaped = {name: tf.image.rot90(tf.cond(flip > 0, lambda x=x: tf.reverse(x, axis=[1]),
                                               lambda x=x: x), k=turns)
                  for name, x in shaped.items()}

    out = {}
    for name, image in shaped.items():
        spec = VIEW_SPECS[name]
        image = tf.ensure_shape(image, (crop_size, crop_size, SOURCE_CHANNELS[spec.source]))
        out[name] = spec.normalise(image)                               # [c, c, channels]
    return out


# -- skipped samples ----------------------------------------------------------------------------

class SkippedCounter:
    """Counts samples the pipeline dropped because their files could not be read.

    Pass one to `make_dataset(..., skipped_counter=counter)`; `count` and `ids` grow as the
    dataset is iterated (a sample counts once it is known to be missing: when a later sample of
    the epoch arrives, or at the end of the epoch). Reuse it across epochs or `reset()` it.
    """

    def __init__(self):
        self.count = 0
        self.ids: list[str] = []

    def reset(self) -> None:
        self.count = 0
        self.ids = []

    def record(self, ids: Iterable[str]) -> None:
        ids = [str(i) for i in ids]
        self.count += len(ids)
        self.ids.extend(ids)

    def __repr__(self) -> str:
        return f"SkippedCounter(count={self.count})"


# -- the dataset --------------------------------------------------------------------------------

def make_dataset(
    catalog: pd.DataFrame,
    *,
    views: Iterable[str],
    crop_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int = 0,
    augment: bool = False,
    cache: str | os.PathLike | None = None,
    with_ids: bool = False,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    skipped_counter: SkippedCounter | None = None,
    start_batch: int = 0,
    start_position: int | None = None,
    with_positions: bool = False,
) -> tf.data.Dataset:
    """Batches of views of the catalog's samples.

    Training: the whole epoch shuffled by (seed, epoch), one random crop window per sample,
    optional aligned flips/rotations, incomplete last batch dropped. Evaluation
    (`training=False`): catalog order, centre crops, no randomness (seed, epoch and augment are
    ignored), last batch kept. Either way the batches are a pure function of the arguments, so
    `make_dataset(..., epoch=e).skip(k)` resumes an epoch after k batches.

    Samples whose files cannot be read are skipped with a warning (and counted in
    `skipped_counter`) instead of ending the epoch.

    Args:
        catalog: DataFrame with `id` and the path columns the views need (only `id` with `cache`).
        views: view names from `VIEW_SPECS`.
        cache: folder written by `prepare_cache`; read instead of the PNGs.
        with_ids: add `"id"`: tf.string [B] to every batch.
        with_positions: add `"position"`: tf.int64 [B], each sample's place in the epoch plan.
            After a batch, `max(position) + 1` is where the epoch continues, also when
            unreadable samples were skipped on the way (then it differs from batches x B).
        start_batch: training only: begin the epoch at this batch, as `.skip(start_batch)`
            would, but without decoding the skipped samples (resuming mid-epoch on 5,000 PNGs).
        start_position: training only: begin at this place in the epoch plan instead (a
            saved `max(position) + 1`). Exact where start_batch is not: with an unreadable
            sample before the resume point, batch k starts one plan place later.
    Returns:
        tf.data.Dataset of {view_name: float32 [B, crop_size, crop_size, C]}.
    """
    views = check_views(views)
    sources = sources_for(views)
    crop_size = _positive_int("crop_size", crop_size, "data.crop_size")
    batch_size = _positive_int("batch_size", batch_size, "data.batch_size")
    seed, epoch = _non_negative_int("seed", seed), _non_negative_int("epoch", epoch)
    ids = _catalog_ids(catalog)
    n = len(ids)
    if training and n < batch_size:
        raise DataError(f"The training catalog has {n} sample(s), fewer than batch_size="
                        f"{batch_size}, so an epoch would hold no full batch. Lower "
                        "data.batch_size or add samples.")

    start_batch = _non_negative_int("start_batch", start_batch)
    if start_position is not None:
        start_position = _non_negative_int("start_position", start_position)
        if start_batch:
            raise ValueError(f"Pass start_batch or start_position, not both. Received: "
                             f"start_batch={start_batch}, start_position={start_position}")
    if (start_batch or start_position) and not training:
        raise ValueError(f"start_batch and start_position apply to training datasets only. "
                         f"Received: start_batch={start_batch}, start_position={start_position}, "
                         "training=False")
    # First plan position to decode.
    first = min(start_batch * batch_size if start_position is None else start_position, n)

    order, sample_seeds = epoch_plan(n, seed=seed, epoch=epoch, training=training)
    table = {"id": ids[order], "position": np.arange(n, dtype=np.int64), "seed": sample_seeds}
    epoch_ids = table["id"]
    if cache is not None:
        reader = _CacheReader(Path(cache))
        _check_crop_fits(crop_size, reader.image_size, f"the cache {reader.root}")
        shard, row = reader.locate(ids)
        table.update(shard=shard[order], row=row[order])

        def load(element):
            return reader.load(element["shard"], element["row"], sources)
    else:
        missing = [s for s in sources if s not in catalog.columns]
        if missing:
            raise DataError(f"The catalog has no column(s) {missing} needed by views {views}. "
                            "Build it with cmc_kit.data.discover(DATA).")
        for s in sources:
            table[s] = catalog[s].astype(str).to_numpy()[order]
        image_size = _first_png_size(catalog[sources[0]])
        if image_size is not None:
            _check_crop_fits(crop_size, image_size, f"the images of {catalog[sources[0]].iloc[0]}")

        def load(element):
            return decode_sample(**{s: element[s] for s in sources})

    def sample_views(element):
        out = make_views(load(element), element["seed"], views=views, crop_size=crop_size,
                         training=training, augment=augment)
        out.update(id=element["id"], position=element["position"])
        return out

    epoch_table = table
    table = {key: value[first:] for key, value in table.items()}
    options = tf.data.Options()
    options.deterministic = True  # parallel decode, but batches in plan order
    dataset = (tf.data.Dataset.from_tensor_slices(table)
               .map(sample_views, num_parallel_calls=num_parallel_calls, deterministic=True)
               .ignore_errors(log_warning=True))
    dataset = _count_skipped(dataset, epoch_ids=epoch_ids, views=views, crop_size=crop_size,
                             counter=skipped_counter, first=first,
                             epoch_files=None if cache is not None else epoch_table[sources[0]])
    keep = set(views) | {name for name, wanted in (("id", with_ids), ("position", with_positions))
                         if wanted}
    dataset = dataset.map(lambda element: {k: v for k, v in element.items() if k in keep})
    dataset = dataset.batch(batch_size, drop_remainder=training)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def epoch_plan(n: int, *, seed: int, epoch: int, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """The order of the catalog rows in an epoch and each position's stateless seed.

    Returns:
        order: int64 [n] catalog row per position; seeds: int64 [n, 2] seed per position.
        Training draws both from (seed, epoch); evaluation is catalog order with zero seeds.
    """
    if not training:
        return np.arange(n, dtype=np.int64), np.zeros((n, 2), dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).astype(np.int64)
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=(n, 2), dtype=np.int64)
    return order, seeds


def _count_skipped(dataset, *, epoch_ids, views, crop_size, counter, first=0, epoch_files=None):
    """Notices gaps in the positions that survive `ignore_errors`, warns and counts them.

    A sentinel element at position n closes the epoch so trailing failures count too; the
    gap bookkeeping is a `scan` state, so it restarts with every pass over the dataset.
    `epoch_files` (one PNG per plan position) lets the warning name a file and its folder.
    """
    n = len(epoch_ids)
    counter = counter if counter is not None else SkippedCounter()
    sentinel = {name: tf.zeros((crop_size, crop_size, VIEW_SPECS[name].channels), tf.float32)
                for name in views}
    sentinel.update(id=tf.constant(""), position=tf.constant(n, tf.int64))

    def record(first: np.int64, stop: np.int64) -> np.int64:
        skipped = epoch_ids[int(first):int(stop)]
        if epoch_files is not None:
            folder = Path(str(epoch_files[int(first)])).parent
            where = (f" in {folder}", f"`cmc-kit validate {folder}`")
        else:
            where = (" (marked unreadable in the cache)",
                     "`cmc-kit validate` on the dataset folder, then `cmc-kit prepare` again,")
        logger.warning("Skipped %d unreadable sample(s), id(s) %s%s: their files are missing, "
                       "corrupt or of different sizes. Run %s for details and fix or remove them.",
                       len(skipped), ", ".join(map(str, skipped)), *where)
        counter.record(skipped)
        return np.int64(len(skipped))

    def step(expected, element):
        position = element["position"]
        gap = tf.cond(position > expected,
                      # stateful=False: under op determinism a stateful function would
                      # make tf.data run every map of the pipeline serially.
                      lambda: tf.numpy_function(record, [expected, position], tf.int64,
                                                stateful=False),
                      lambda: tf.constant(0, tf.int64))
        with tf.control_dependencies([gap]):
            return position + 1, dict(element)

    return (dataset.concatenate(tf.data.Dataset.from_tensors(sentinel))
            .scan(tf.constant(first, tf.int64), step)
            .filter(lambda element: element["position"] < n))


# -- cache ------------------------------------------------------------------------------------

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
    shard_size = _positive_int("shard_size", shard_size, "shard_size")
    if isinstance(data, pd.DataFrame):
        catalog = data
    else:
        from cmc_kit.data import discover

        catalog = discover(data)
    missing = [c for c in ("id", *SOURCES) if c not in catalog.columns]
    if missing:
        raise DataError(f"The catalog has no column(s) {missing}; prepare needs all three images. "
                        "Build it with cmc_kit.data.discover(DATA).")
    catalog = catalog.assign(id=_catalog_ids(catalog)).sort_values("id").reset_index(drop=True)
    if len(catalog) == 0:
        raise DataError(f"No samples to cache in {data}. Check the folder holds "
                        "<id>_t.png, <id>_h.png and <id>_i2.png files.")
    image_size = _first_png_size(catalog["terrain"])
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
    except (OSError, json.JSONDecodeError):
        return None


def _write_manifest(root: Path, image_size, shard_size: int, entries: list[dict]) -> None:
    from cmc_kit.config import atomic_write_text

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


class _CacheReader:
    """Random access to the samples of a `prepare_cache` folder by memory-mapped .npy shards."""

    def __init__(self, root: Path):
        self.root = root
        path = root / CACHE_MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
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


# -- small helpers ---------------------------------------------------------------------------

def _catalog_ids(catalog: pd.DataFrame) -> np.ndarray:
    if "id" not in catalog.columns:
        raise DataError("The catalog has no 'id' column. Build it with cmc_kit.data.discover(DATA).")
    ids = catalog["id"].astype(str).to_numpy()
    if len(ids) == 0:
        raise DataError("The catalog is empty: check the data folder and the split settings.")
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(duplicated):
        raise DataError(f"The catalog repeats sample id(s) {list(duplicated[:5])}; every id must "
                        "appear once. Rebuild it with cmc_kit.data.discover(DATA).")
    return ids


def _first_png_size(paths: pd.Series) -> tuple[int, int] | None:
    """(height, width) from the header of the first readable PNG, without decoding it."""
    for path in paths.head(8):
        try:
            with open(path, "rb") as handle:
                header = handle.read(24)
        except OSError:
            continue
        if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR":
            width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
            return height, width
    return None


def check_crop_size(catalog: pd.DataFrame, crop_size: int) -> None:
    """Raises ConfigError when `crop_size` exceeds the catalog's images (read from the first
    readable terrain PNG's header; nothing to check when none is readable)."""
    if "terrain" in catalog.columns:
        image_size = _first_png_size(catalog["terrain"])
        if image_size is not None:
            _check_crop_fits(crop_size, image_size, f"the images of {catalog['terrain'].iloc[0]}")


def _check_crop_fits(crop_size: int, image_size, where: str) -> None:
    height, width = image_size
    if crop_size > min(height, width):
        raise ConfigError(f"Setting 'data.crop_size' ({crop_size}) is larger than {where} "
                          f"({width}x{height}). Set data.crop_size to at most {min(height, width)}.")


def _positive_int(name: str, value, setting: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer (setting {setting}). "
                         f"Received: {name}={value!r}")
    return int(value)


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0. Received: {name}={value!r}")
    return int(value)


def _progress_bar(total: int):
    import keras

    return keras.utils.Progbar(total, unit_name="sample")
