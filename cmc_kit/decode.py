"""A sample's raw arrays, decoded from its three PNGs with TensorFlow.

`decode_sample` gives terrain uint8 [H, W, 3], height uint16 [H, W, 1] and segmentation class
ids uint8 [H, W, 1] (nearest palette colour). The input pipeline (`views`) and the `prepare`
cache (`cache`) both decode with it, so batches from the PNGs and from the cache are identical.
"""

from __future__ import annotations

import pandas as pd
import tensorflow as tf

from cmc_kit.layout import png_size
from cmc_kit.palette import NUM_CLASSES, PALETTE

SOURCES = ("terrain", "height", "segmentation")
SOURCE_CHANNELS = {"terrain": 3, "height": 1, "segmentation": 1}  # raw arrays, [H, W, C]
SOURCE_DTYPES = {"terrain": tf.uint8, "height": tf.uint16, "segmentation": tf.uint8}


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
    `cache.prepare_cache`, so both produce the same arrays.

    Returns:
        {"terrain": uint8 [H, W, 3], "height": uint16 [H, W, 1],
         "segmentation": uint8 class ids [H, W, 1]} restricted to the given paths.
    """
    paths = {"terrain": terrain, "height": height, "segmentation": segmentation}
    raw = {name: _DECODERS[name](path) for name, path in paths.items() if path is not None}
    if not raw:
        raise ValueError("decode_sample needs at least one of terrain=, height=, segmentation=.")
    return raw


def first_png_size(paths: pd.Series) -> tuple[int, int] | None:
    """(height, width) from the header of the first readable PNG, without decoding it."""
    return next((size for size in map(png_size, paths.head(8)) if size is not None), None)
