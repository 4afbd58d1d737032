"""Small pictures of whole samples (not crops), for the explorer, its page and the mosaic.

Terrain as JPEG, height colour-mapped with a per-image min-max stretch (relief, not absolute
altitude) as JPEG, segmentation in the palette colours as a palette PNG (exact class colours).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.palette import PALETTE, nearest_class

THUMBNAIL_KINDS = ("terrain", "height", "segmentation")
# Height colour map anchors (position, RGB): water-blue lowlands to snowy peaks.
_HEIGHT_ANCHORS = (
    (0.00, (38, 70, 83)), (0.20, (42, 157, 143)), (0.45, (138, 177, 125)),
    (0.65, (233, 196, 106)), (0.82, (166, 118, 76)), (1.00, (250, 250, 250)),
)


def height_colour_map() -> np.ndarray:
    """256 x 3 uint8 colour ramp for height thumbnails."""
    positions = np.linspace(0.0, 1.0, 256)
    anchors = np.array([a[0] for a in _HEIGHT_ANCHORS])
    colours = np.array([a[1] for a in _HEIGHT_ANCHORS], dtype=np.float64)
    ramp = np.stack([np.interp(positions, anchors, colours[:, c]) for c in range(3)], axis=1)
    return ramp.round().astype(np.uint8)


def thumbnail_images(terrain: np.ndarray, height: np.ndarray, segmentation: np.ndarray,
                     size: int, detail_size: int | None = None) -> dict[str, Image.Image]:
    """Small PIL images of one sample.

    Args:
        terrain: uint8 [H, W, 3]; height: uint16 [H, W]; segmentation: palette RGB uint8 [H, W, 3].
        size: terrain thumbnail side in pixels.
        detail_size: height and segmentation side (default `size`); smaller keeps pages light.
    """
    detail_size = detail_size or size
    terrain_image = Image.fromarray(np.asarray(terrain, np.uint8)).convert("RGB")
    terrain_image = terrain_image.resize((size, size), Image.Resampling.BOX)
    return {"terrain": terrain_image, "height": _height_image(height, detail_size),
            "segmentation": _segmentation_image(segmentation, detail_size)}


def _height_image(height: np.ndarray, size: int) -> Image.Image:
    """Height [H, W] shrunk to size x size, min-max stretched, in the height colour map."""
    height = np.asarray(height, np.float64)
    small = np.asarray(Image.fromarray(height.astype(np.float32))
                       .resize((size, size), Image.Resampling.BOX))
    low, high = float(small.min()), float(small.max())
    levels = np.zeros(small.shape, np.uint8) if high <= low else \
        ((small - low) / (high - low) * 255).round().astype(np.uint8)
    image = Image.fromarray(levels).convert("P")
    image.putpalette(height_colour_map().ravel().tolist())
    return image


def _segmentation_image(segmentation: np.ndarray, size: int) -> Image.Image:
    """Palette RGB [H, W, 3] -> size x size palette image of the nearest classes."""
    # Nearest-neighbour shrink first, then the palette mapping on the few pixels left.
    small = Image.fromarray(np.asarray(segmentation, np.uint8)).convert("RGB").resize(
        (size, size), Image.Resampling.NEAREST)
    image = Image.fromarray(nearest_class(np.asarray(small))).convert("P")
    image.putpalette(PALETTE.ravel().tolist())
    return image


def encode_thumbnails(images: Mapping[str, Image.Image], *, jpeg_quality: int = 70) -> dict:
    """Terrain and colour-mapped height -> JPEG bytes, segmentation -> palette PNG bytes.

    At 64 px: about 1.3 kB (terrain) + 1.2 kB (height) + 0.8 kB (segmentation). A smooth
    colour-mapped height is 3-4x larger as PNG; the segmentation stays PNG so its class colours
    are exact.
    """
    out = {}
    for kind, image in images.items():
        buffer = io.BytesIO()
        if kind == "segmentation":
            image.save(buffer, format="PNG", optimize=True)
        else:
            image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality, optimize=True)
        out[kind] = buffer.getvalue()
    return out


def read_sample(row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """terrain uint8 [H, W, 3], height uint16 [H, W], segmentation uint8 [H, W, 3] of a row."""
    try:
        terrain = _read_png(row["terrain"], "RGB")
        height = _read_png(row["height"]).astype(np.uint16)
        segmentation = _read_png(row["segmentation"], "RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read the images of sample {row['id']}: {err}. Run "
                        "`cmc-kit validate DATA` to find and remove broken samples.") from err
    if height.ndim == 3:
        height = height[..., 0]
    return terrain, height, segmentation


def _read_png(path, mode: str | None = None) -> np.ndarray:
    """The pixels of an image file (converted to `mode` if given); the file is closed after."""
    with Image.open(path) as image:
        return np.asarray(image if mode is None else image.convert(mode))


def sample_thumbnails(row, size: int = 64, detail_size: int | None = None) -> dict[str, bytes]:
    """Encoded thumbnails {kind: bytes} of one catalog row."""
    return encode_thumbnails(thumbnail_images(*read_sample(row), size=size,
                                              detail_size=detail_size))


def make_thumbnails(catalog: pd.DataFrame, ids: Sequence[str] | None = None, *, size: int = 64,
                    detail_size: int | None = None,
                    progress: bool = False) -> dict[str, dict[str, bytes]]:
    """{id: {"terrain": jpeg, "height": jpeg, "segmentation": png}} for ids (default all)."""
    rows = catalog_by_id(catalog)
    ids = list(rows.index) if ids is None else [str(i) for i in ids]
    missing = [i for i in ids if i not in rows.index]
    if missing:
        raise DataError(f"{len(missing)} id(s) of the embeddings table are not in the catalog "
                        f"(e.g. {missing[:3]}): pass the --data folder the run was trained on.")
    progbar = None
    if progress:
        import keras
        progbar = keras.utils.Progbar(len(ids), unit_name="thumbnail")
    out = {}
    for count, sample_id in enumerate(ids, start=1):
        out[sample_id] = sample_thumbnails(rows.loc[sample_id], size, detail_size)
        if progbar is not None and (count % 50 == 0 or count == len(ids)):
            progbar.update(count)
    return out


def data_uri(payload: bytes) -> str:
    kind = "jpeg" if payload[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(payload).decode("ascii")


def catalog_by_id(catalog: pd.DataFrame) -> pd.DataFrame:
    """The catalog indexed by its ids as str (the id column kept); DataError without paths."""
    required = {"id", "terrain", "height", "segmentation"}
    if not required <= set(catalog.columns):
        raise DataError(f"The catalog lacks column(s) {sorted(required - set(catalog.columns))}; "
                        "make it with cmc_kit.data.discover(DATA).")
    return catalog.assign(id=catalog["id"].astype(str)).set_index("id", drop=False)


def check_one_source(function: str, catalog, thumbnails) -> None:
    """Raises unless exactly one of `catalog=` and `thumbnails=` is given."""
    if (catalog is None) == (thumbnails is None):
        given = "both" if catalog is not None else "neither"
        raise CmcKitError(f"{function} needs catalog=DataFrame (thumbnails are made from its "
                          "PNGs) or thumbnails={id: {kind: bytes}}, exactly one. Received "
                          f"{given}.")


def thumbnails_for(ids: Sequence[str], size: int, *, catalog: pd.DataFrame | None = None,
                   thumbnails: Mapping[str, Mapping[str, bytes]] | None = None,
                   detail_size: int | None = None,
                   progress: bool = False) -> dict[str, dict[str, bytes]]:
    """{id: {kind: bytes}} for `ids`: made from the catalog's PNGs, or taken from `thumbnails`."""
    if catalog is not None:
        return make_thumbnails(catalog, ids, size=size, detail_size=detail_size,
                               progress=progress)
    missing = [i for i in ids if i not in thumbnails]
    if missing:
        raise DataError(f"No thumbnails for {len(missing)} id(s), e.g. {missing[:3]}: pass "
                        "catalog= or a thumbnails= {id: {kind: bytes}} mapping covering the table.")
    return {i: thumbnails[i] for i in ids}
