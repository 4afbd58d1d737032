"""Still pictures of a run: the thumbnail mosaic of a layout, PCA colours of feature maps.

- `mosaic(layout, out_png, catalog=...)`: terrain thumbnails placed on the layout, no overlap.
- `feature_maps(encoder, batch)`: PCA of a trunk stage's feature map as RGB, beside the crops.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cmc_kit.errors import CmcKitError
from cmc_kit.explore.thumbnails import catalog_by_id, check_one_source, thumbnails_for
from cmc_kit.fileio import atomic_path
from cmc_kit.palette import CLASS_NAMES, PALETTE

# =============================================================================================
# Mosaic
# =============================================================================================


def mosaic(layout: np.ndarray, out_png: str | os.PathLike, *,
           catalog: pd.DataFrame | None = None,
           thumbnails: Mapping[str, Mapping[str, bytes]] | None = None,
           canvas: int = 2048, thumb: int = 64, ids: Sequence[str] | None = None,
           background: tuple[int, int, int] = (24, 24, 24)) -> Path:
    """A PNG of the layout with terrain thumbnails at their points, none overlapping.

    The canvas is a grid of thumb-sized cells; each cell holds the point nearest its centre, so
    any dataset size works and at most (canvas // thumb)^2 images are read.

    Args:
        layout: [N, >=2] positions (the first two columns are used).
        catalog: the dataset catalog (terrains read from its PNGs), or
        thumbnails: a {id: {"terrain": bytes}} mapping. Pass exactly one of the two.
        ids: the id of each layout row; default: the catalog's ids (or the mapping's keys) in order.
    """
    check_one_source("mosaic", catalog, thumbnails)
    layout = np.asarray(layout, dtype=np.float64)
    if ids is None:
        ids = list(catalog["id"].astype(str)) if catalog is not None else list(thumbnails)
    ids = [str(i) for i in ids]
    if layout.ndim != 2 or layout.shape[1] < 2 or len(layout) != len(ids) or len(ids) == 0:
        raise CmcKitError(f"mosaic needs a layout [N, 2] with one row per id; received "
                          f"layout shape {layout.shape} for {len(ids)} ids.")
    if thumb < 4 or canvas < thumb:
        raise CmcKitError(f"mosaic needs 4 <= thumb <= canvas. Received thumb={thumb}, "
                          f"canvas={canvas}")
    cells = canvas // thumb
    cell, chosen = _grid_cells(layout[:, :2], cells)
    chosen_ids = [ids[i] for i in chosen]
    terrain_of = _terrain_reader(chosen_ids, thumb, catalog=catalog, thumbnails=thumbnails)

    side = cells * thumb
    picture = Image.new("RGB", (side, side), background)
    for index, sample_id in zip(chosen, chosen_ids):
        column, row = cell[index]
        # y grows upwards in the layout, downwards in the image.
        picture.paste(terrain_of(sample_id), (int(column) * thumb, (cells - 1 - int(row)) * thumb))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        picture.save(tmp)  # the temporary name keeps the suffix, so the format is the same
    return out_png


def _grid_cells(points: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's (column, row) cell of a cells x cells grid over the points' bounding box,
    and the points kept: per occupied cell the one nearest its centre.

    Returns (cell int64 [N, 2], chosen int64 [M] point indices).
    """
    low, span = points.min(axis=0), np.ptp(points, axis=0)
    span[span == 0] = 1.0
    scaled = (points - low) / span * (cells - 1e-6)  # [N, 2] in cell units, [0, cells)
    cell = np.floor(scaled).astype(np.int64)
    distance = ((scaled - (cell + 0.5)) ** 2).sum(axis=1)
    # For each occupied cell keep the point nearest its centre.
    order = np.lexsort((distance, cell[:, 1], cell[:, 0]))
    flat = cell[order, 0] * cells + cell[order, 1]
    first = np.ones(len(order), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    return cell, order[first]


def _terrain_reader(ids: Sequence[str], thumb: int, *, catalog: pd.DataFrame | None,
                    thumbnails: Mapping | None) -> Callable[[str], Image.Image]:
    """id -> thumb x thumb RGB terrain image, from the catalog's PNGs or the given thumbnails."""
    if catalog is not None:
        rows = catalog_by_id(catalog)

        def from_png(sample_id):
            with Image.open(rows.loc[sample_id, "terrain"]) as image:
                return image.convert("RGB").resize((thumb, thumb), Image.Resampling.BOX)
        return from_png
    thumbs = thumbnails_for(ids, thumb, thumbnails=thumbnails)

    def from_bytes(sample_id):
        image = Image.open(io.BytesIO(thumbs[sample_id]["terrain"])).convert("RGB")
        return image if image.size == (thumb, thumb) else image.resize((thumb, thumb))
    return from_bytes


# =============================================================================================
# Feature maps
# =============================================================================================

@dataclass
class FeatureMaps:
    rgb: np.ndarray                       # [S, h, w, 3] float in [0, 1]: PCA components as RGB
    inputs: np.ndarray                    # [S, H, W, 3] uint8: the input crops, displayable
    explained_variance_ratio: np.ndarray  # [3]: of the feature-map pixels, descending
    figure: Any                           # plotly Figure: input | PCA panels, one row per sample


def pca_rgb(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of feature maps [S, h, w, c] over all pixels of all samples -> RGB [S, h, w, 3].

    Components are fitted jointly so colours mean the same across samples; each RGB channel is
    min-max scaled to [0, 1]. Returns (rgb, explained_variance_ratio [3]).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 4:
        raise CmcKitError(f"pca_rgb expects feature maps [S, h, w, c]. Received {features.shape}")
    samples, h, w, c = features.shape
    pixels = features.reshape(-1, c)  # [S*h*w, c]
    centred = pixels - pixels.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)  # components [k, c]
    k = min(3, components.shape[0])
    projected = np.zeros((len(pixels), 3))
    projected[:, :k] = centred @ components[:k].T  # [S*h*w, 3]
    total = float((singular ** 2).sum())
    ratio = np.zeros(3)
    if total > 0:
        ratio[:k] = singular[:k] ** 2 / total
    low, high = projected.min(axis=0), projected.max(axis=0)
    scale = np.where(high > low, high - low, 1.0)
    rgb = (projected - low) / scale
    return rgb.reshape(samples, h, w, 3).astype(np.float32), ratio


def displayable(x: np.ndarray, view: str) -> np.ndarray:
    """Normalised view tensors [S, H, W, C] -> uint8 RGB [S, H, W, 3] for display."""
    x = np.asarray(x, dtype=np.float32)
    if view == "segmentation" or x.shape[-1] == len(CLASS_NAMES):
        return PALETTE[x.argmax(axis=-1)]
    if x.shape[-1] == 1:  # height: relief stretch per sample
        low = x.min(axis=(1, 2, 3), keepdims=True)
        high = x.max(axis=(1, 2, 3), keepdims=True)
        grey = (x - low) / np.where(high > low, high - low, 1.0)
        return np.repeat((grey * 255).round().astype(np.uint8), 3, axis=-1)
    return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)


def feature_maps(encoder, batch, *, view: str = "terrain", stage: int = -1,
                 samples: int = 4) -> FeatureMaps:
    """PCA (3 components -> RGB) of one trunk stage's feature map for a few samples.

    Args:
        encoder: has `stage_features(x, view=view)` -> list of [B, h, w, c] maps.
        batch: a `make_dataset` batch dict {view: [B, H, W, C]} or the view's array itself.
        stage: index into the list of stages (-1: the last, most semantic one).
        samples: how many samples of the batch to show.
    """
    x = batch[view] if isinstance(batch, Mapping) else batch
    x = np.asarray(x)[:samples]  # [S, H, W, C]
    stages = encoder.stage_features(x, view=view)
    try:
        features = np.asarray(stages[stage])  # [S, h, w, c]
    except IndexError:
        raise CmcKitError(f"stage={stage} is out of range: the trunk has {len(stages)} stages "
                          f"(use -{len(stages)}..{len(stages) - 1}).") from None
    rgb, ratio = pca_rgb(features)
    inputs = displayable(x, view)
    figure = _feature_map_figure(inputs, rgb, title=f"stage {stage} PCA "
                                                    f"({ratio.sum():.0%} of variance)", view=view)
    return FeatureMaps(rgb=rgb, inputs=inputs, explained_variance_ratio=ratio, figure=figure)


def _feature_map_figure(inputs: np.ndarray, rgb: np.ndarray, *, title: str, view: str):
    """One row per sample: the input crop | its PCA colours, upscaled to the crop size."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    rows = len(inputs)
    figure = make_subplots(rows=rows, cols=2, horizontal_spacing=0.02, vertical_spacing=0.02,
                           column_titles=[f"{view} crop", title])
    for i in range(rows):
        figure.add_trace(go.Image(z=inputs[i]), row=i + 1, col=1)
        # Upscale the small map to the crop size so both panels line up.
        scale = max(1, inputs.shape[1] // rgb.shape[1])
        big = np.repeat(np.repeat((rgb[i] * 255).round().astype(np.uint8), scale, 0), scale, 1)
        figure.add_trace(go.Image(z=big), row=i + 1, col=2)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(height=220 * rows, width=460, margin=dict(l=5, r=5, t=30, b=5))
    return figure
