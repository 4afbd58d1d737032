"""Views and the input pipeline: PNG (or cache) -> paired crops -> tf.data batches.

A catalog row (`id`, `terrain`, `height`, `segmentation` paths) is decoded once into raw arrays
(`decode_sample`: terrain uint8 [H, W, 3], height uint16 [H, W, 1], segmentation class ids
uint8 [H, W, 1]); `make_views` cuts one shared crop window out of them, applies the same optional
flip/rotation to every view and normalises each view as `VIEW_SPECS` says.

Exact resume: the epoch order and every sample's random seed are drawn in NumPy from
(seed, epoch) before the pipeline starts, and all randomness inside the pipeline is stateless
(keyed by that per-sample seed), so the batches of an epoch are a pure function of
(catalog, seed, epoch) and `make_dataset(..., epoch=e).skip(k)` continues an interrupted epoch.

`cache.prepare_cache` converts the PNGs once into .npy shards (class ids instead of RGB for the
segmentation) that `make_dataset(..., cache=...)` reads by memory map; it decodes with the same
`decode.decode_sample`, so both paths give identical batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from cmc_kit.cache import CacheReader
from cmc_kit.data import catalog_ids
from cmc_kit.decode import SOURCE_CHANNELS, SOURCES, decode_sample, first_png_size
from cmc_kit.errors import ConfigError, DataError
from cmc_kit.palette import HEIGHT_SCALE, NUM_CLASSES, TERRAIN_SCALE

logger = logging.getLogger(__name__)


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


# -- views of one sample ------------------------------------------------------------------------

def make_views(raw: Mapping[str, tf.Tensor], seed: tf.Tensor, *, views: Iterable[str],
               crop_size: int, training: bool, augment: bool = False,
               corner: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Cuts the views of one sample out of its raw arrays.

    The crop views share one window: random (from `seed`) when training, the centre otherwise,
    or `corner` when given (evaluation only, see `window_corners`). With `augment` (training
    only) one random horizontal flip and 90-degree rotation is applied to every view, overview
    included, so the views stay pixel-aligned.

    Args:
        raw: the arrays of `decode_sample` the views need, all [H, W, C] of one size.
        seed: int64 [2] stateless seed of this sample (ignored when not training).
        corner: int32 [2] top-left (row, column) of the crop window; not with `training`.
    Returns:
        {view_name: float32 [crop_size, crop_size, channels]}
    """
    if corner is not None and training:
        raise ValueError("make_views: a fixed crop `corner` is for evaluation; training draws "
                         "its window from the sample's seed. Received: training=True")
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
    elif corner is None:
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


def window_corners(size: tf.Tensor, crop_size: int, grid: int) -> tf.Tensor:
    """Top-left corners of a grid x grid set of evaluation crops, row-major: int32 [grid^2, 2].

    Each crop is centred in its cell of the image cut into grid x grid equal cells and clipped
    to the image, so grid 1 is the centre crop and a 256 px image with 64 px crops and grid 4
    is tiled exactly (corners 0, 64, 128, 192). Crops overlap when grid x crop_size > size.

    Args:
        size: int32 [2] image height and width.
    """
    steps = (tf.range(grid, dtype=tf.float64) + 0.5) / grid                 # [g] cell centres
    size = tf.cast(size, tf.float64)                                        # [2]
    starts = tf.round(steps[:, None] * size[None, :] - crop_size / 2)       # [g, 2]
    starts = tf.clip_by_value(starts, 0.0, size - crop_size)
    starts = tf.cast(starts, tf.int32)
    rows = tf.repeat(starts[:, 0], grid)                                    # [g^2]
    columns = tf.tile(starts[:, 1], [grid])                                 # [g^2]
    return tf.stack([rows, columns], axis=1)                                # [g^2, 2]


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
    grid: int = 1,
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
        cache: folder written by `cache.prepare_cache`; read instead of the PNGs.
        with_ids: add `"id"`: tf.string [B] to every batch.
        grid: evaluation only: every sample gives grid x grid crops in a row (`window_corners`,
            row-major) instead of its centre crop, each with `"window"`: tf.int64, its index
            in the grid (kept with `with_ids`); batches then hold crops, not samples.
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
    grid = _positive_int("grid", grid, "the evaluation grid")
    if grid > 1 and training:
        raise ValueError(f"grid={grid} cuts fixed evaluation crops; training draws one random "
                         "crop per sample. Pass training=False or grid=1.")
    ids = catalog_ids(catalog)
    n = len(ids)
    if training and n < batch_size:
        raise DataError(f"The training catalog has {n} sample(s), fewer than batch_size="
                        f"{batch_size}, so an epoch would hold no full batch. Lower "
                        "data.batch_size or add samples.")

    # First plan position to decode.
    first = _first_position(start_batch, start_position, batch_size, n, training)

    order, sample_seeds = epoch_plan(n, seed=seed, epoch=epoch, training=training)
    table = {"id": ids[order], "position": np.arange(n, dtype=np.int64), "seed": sample_seeds}
    epoch_ids = table["id"]
    load = _sample_loader(catalog, table, order, ids, cache=cache, views=views,
                          crop_size=crop_size)

    sample_views = _view_maker(load, views=views, crop_size=crop_size, training=training,
                               augment=augment, grid=grid)
    epoch_table = table
    table = {key: value[first:] for key, value in table.items()}
    options = tf.data.Options()
    options.deterministic = True  # parallel decode, but batches in plan order
    dataset = (tf.data.Dataset.from_tensor_slices(table)
               .map(sample_views, num_parallel_calls=num_parallel_calls, deterministic=True)
               .ignore_errors(log_warning=True))
    if grid > 1:
        dataset = dataset.unbatch()  # one element per window, a sample's windows in a row
    dataset = _count_skipped(dataset, epoch_ids=epoch_ids,
                             counter=skipped_counter, first=first,
                             epoch_files=None if cache is not None else epoch_table[sources[0]])
    keep = set(views) | {name for name, wanted in (("id", with_ids), ("position", with_positions),
                                                   ("window", with_ids and grid > 1))
                         if wanted}
    dataset = dataset.map(lambda element: {k: v for k, v in element.items() if k in keep})
    dataset = dataset.batch(batch_size, drop_remainder=training)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def _view_maker(load: Callable[[dict], dict], *, views: tuple[str, ...], crop_size: int,
                training: bool, augment: bool, grid: int) -> Callable[[dict], dict]:
    """The map from an epoch-plan element to its views (plus id, position and window): one crop
    window per sample, or with grid > 1 every window of the grid, stacked [grid^2, ...]."""
    source = sources_for(views)[0]

    def sample_views(element):
        out = make_views(load(element), element["seed"], views=views, crop_size=crop_size,
                         training=training, augment=augment)
        out.update(id=element["id"], position=element["position"])
        return out

    def sample_windows(element):
        raw = load(element)
        corners = window_corners(tf.shape(raw[source])[:2], crop_size, grid)  # [g^2, 2]
        crops = [make_views(raw, element["seed"], views=views, crop_size=crop_size,
                            training=False, corner=corners[i]) for i in range(grid * grid)]
        out = {name: tf.stack([crop[name] for crop in crops]) for name in views}  # [g^2, c, c, C]
        out.update(id=tf.fill([grid * grid], element["id"]),
                   position=tf.fill([grid * grid], element["position"]),
                   window=tf.range(grid * grid, dtype=tf.int64))
        return out

    return sample_views if grid == 1 else sample_windows


def _first_position(start_batch, start_position, batch_size: int, n: int,
                    training: bool) -> int:
    """The epoch plan place a (resumed) training epoch starts at: start_batch x batch_size or
    start_position (not both), at most n; 0 for evaluation."""
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
    return min(start_batch * batch_size if start_position is None else start_position, n)


def _sample_loader(catalog: pd.DataFrame, table: dict, order: np.ndarray, ids: np.ndarray, *,
                   cache, views: tuple[str, ...], crop_size: int) -> Callable[[dict], dict]:
    """`load(element) -> raw arrays` of one sample, from the cache or from the PNGs.

    Adds what `load` reads to the epoch `table` (per plan position): the cache's shard and
    row, or the PNG paths. Checks first that `crop_size` fits the images.
    """
    sources = sources_for(views)
    if cache is not None:
        reader = CacheReader(Path(cache))
        _check_crop_fits(crop_size, reader.image_size, f"the cache {reader.root}")
        shard, row = reader.locate(ids)
        table.update(shard=shard[order], row=row[order])
        return lambda element: reader.load(element["shard"], element["row"], sources)
    missing = [s for s in sources if s not in catalog.columns]
    if missing:
        raise DataError(f"The catalog has no column(s) {missing} needed by views {views}. "
                        "Build it with cmc_kit.data.discover(DATA).")
    for s in sources:
        table[s] = catalog[s].astype(str).to_numpy()[order]
    image_size = first_png_size(catalog[sources[0]])
    if image_size is not None:
        _check_crop_fits(crop_size, image_size, f"the images of {catalog[sources[0]].iloc[0]}")
    return lambda element: decode_sample(**{s: element[s] for s in sources})


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


def _count_skipped(dataset, *, epoch_ids, counter, first=0, epoch_files=None):
    """Notices gaps in the positions that survive `ignore_errors`, warns and counts them.

    A sentinel element at position n closes the epoch so trailing failures count too; the
    gap bookkeeping is a `scan` state, so it restarts with every pass over the dataset.
    `epoch_files` (one PNG per plan position) lets the warning name a file and its folder.
    """
    n = len(epoch_ids)
    counter = counter if counter is not None else SkippedCounter()
    # Shaped like the elements (views, plus `window` with a grid), from the dataset's own spec.
    sentinel = {name: tf.zeros(spec.shape, spec.dtype)
                for name, spec in dataset.element_spec.items() if spec.dtype != tf.string}
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
        # A sample's grid windows share its position: only a jump past `expected` is a gap.
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


# -- small helpers ---------------------------------------------------------------------------

def check_crop_size(catalog: pd.DataFrame, crop_size: int) -> None:
    """Raises ConfigError when `crop_size` exceeds the catalog's images (read from the first
    readable terrain PNG's header; nothing to check when none is readable)."""
    if "terrain" in catalog.columns:
        image_size = first_png_size(catalog["terrain"])
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
