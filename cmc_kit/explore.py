"""A run's embedding space: notebook explorer, standalone HTML page, mosaic, feature maps.

- `Explorer(table, catalog)` / `Explorer.from_run(run, data)`: a Plotly FigureWidget scatter of the
  UMAP layout with ipywidgets controls; hover/click shows a sample's thumbnails and metadata,
  the lasso shows a grid of the selected terrains.
- `write_explorer_html(table, layout, catalog, out)` / `export_html(run, data, out)`: one
  self-contained HTML file (Plotly JS and thumbnails inlined) that works offline.
- `mosaic(layout, catalog, out_png)`: terrain thumbnails placed on the layout, without overlap.
- `embedding_over_epochs(run)` / `write_epochs_html(run)`: an animated Plotly figure (or page) of
  the held-out subset the trainer embeds after every epoch (`RUN/embeddings/epoch_NNN.parquet`),
  one UMAP frame per epoch.
- `feature_maps(encoder, batch)`: PCA of a trunk stage's feature map as RGB.

Thumbnails show the whole sample (not the crop): terrain as JPEG, height colour-mapped with a
per-image min-max stretch (relief, not absolute altitude), segmentation in the palette colours.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cmc_kit import embed
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.fileio import atomic_path, atomic_write_bytes
from cmc_kit.palette import CLASS_NAMES, PALETTE, nearest_class

THUMBNAIL_KINDS = ("terrain", "height", "segmentation")
FIGURE_WIDTH = 640  # px, the notebook explorer's scatter
DOMINANT = "dominant_class"
# Height colour map anchors (position, RGB): water-blue lowlands to snowy peaks.
_HEIGHT_ANCHORS = (
    (0.00, (38, 70, 83)), (0.20, (42, 157, 143)), (0.45, (138, 177, 125)),
    (0.65, (233, 196, 106)), (0.82, (166, 118, 76)), (1.00, (250, 250, 250)),
)
_QUALITATIVE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
                "#b6e880", "#ff97ff", "#fecb52")
_MAX_CATEGORIES = 30


# =============================================================================================
# Thumbnails
# =============================================================================================

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
    height = np.asarray(height, np.float64)
    small = np.asarray(Image.fromarray(height.astype(np.float32))
                       .resize((detail_size, detail_size), Image.Resampling.BOX))
    low, high = float(small.min()), float(small.max())
    levels = np.zeros(small.shape, np.uint8) if high <= low else \
        ((small - low) / (high - low) * 255).round().astype(np.uint8)
    height_image = Image.fromarray(levels).convert("P")
    height_image.putpalette(height_colour_map().ravel().tolist())
    # Nearest-neighbour shrink first, then the palette mapping on the few pixels left.
    seg_small = Image.fromarray(np.asarray(segmentation, np.uint8)).convert("RGB").resize(
        (detail_size, detail_size), Image.Resampling.NEAREST)
    classes = nearest_class(np.asarray(seg_small))
    segmentation_image = Image.fromarray(classes).convert("P")
    segmentation_image.putpalette(PALETTE.ravel().tolist())
    return {"terrain": terrain_image, "height": height_image,
            "segmentation": segmentation_image}


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
    rows = _catalog_by_id(catalog)
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


def _catalog_by_id(catalog: pd.DataFrame) -> pd.DataFrame:
    required = {"id", "terrain", "height", "segmentation"}
    if not required <= set(catalog.columns):
        raise DataError(f"The catalog lacks column(s) {sorted(required - set(catalog.columns))}; "
                        "make it with cmc_kit.data.discover(DATA).")
    return catalog.assign(id=catalog["id"].astype(str)).set_index("id", drop=False)


def _resolve_thumbnails(catalog_or_thumbs, ids: Sequence[str], size: int,
                        detail_size: int | None = None,
                        progress: bool = False) -> dict[str, dict[str, bytes]]:
    if isinstance(catalog_or_thumbs, pd.DataFrame):
        return make_thumbnails(catalog_or_thumbs, ids, size=size, detail_size=detail_size,
                               progress=progress)
    missing = [i for i in ids if i not in catalog_or_thumbs]
    if missing:
        raise DataError(f"No thumbnails for {len(missing)} id(s), e.g. {missing[:3]}: pass a "
                        "catalog or a {id: {kind: bytes}} mapping covering the table.")
    return {i: catalog_or_thumbs[i] for i in ids}


# =============================================================================================
# Colouring
# =============================================================================================

def colour_options(table: pd.DataFrame) -> list[str]:
    """Columns a scatter can be coloured by: dominant class, class fractions, height, metadata."""
    preferred = [DOMINANT, *embed.FRACTION_COLUMNS, "height_mean", "height_std"]
    rest = [c for c in embed.metadata_columns(table)
            if c not in preferred and c != "dominant_class_id"]
    options = []
    for column in [c for c in preferred if c in table.columns] + rest:
        values = table[column]
        if values.isna().all():
            continue
        if (column != DOMINANT and not pd.api.types.is_numeric_dtype(values)
                and values.nunique() > _MAX_CATEGORIES):
            continue  # e.g. file names: too many categories to colour
        options.append(column)
    return options


def marker_colours(table: pd.DataFrame, column: str) -> dict[str, Any]:
    """Plotly marker settings colouring points by `column`, plus a legend for categories.

    Returns {"color": list, "colorscale", "showscale", "title", "legend": [(label, css colour)]}.
    """
    if column not in table.columns:
        raise CmcKitError(f"Cannot colour by {column!r}: no such column. Choose one of "
                          f"{', '.join(colour_options(table))}.")
    values = table[column]
    if column == DOMINANT:
        ids = table["dominant_class_id"].to_numpy(np.int64) if "dominant_class_id" in table \
            else np.array([CLASS_NAMES.index(v) for v in values])
        css = [f"rgb({r},{g},{b})" for r, g, b in PALETTE]
        return {"color": [css[i] for i in ids], "colorscale": None, "showscale": False,
                "title": "dominant class", "legend": list(zip(CLASS_NAMES, css))}
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype(float)
        return {"color": [None if math.isnan(v) else round(v, 5) for v in numbers],
                "colorscale": "Viridis", "showscale": True, "title": column, "legend": []}
    labels = values.astype(str).where(values.notna(), "n/a")
    categories = sorted(labels.unique())
    css = {c: _QUALITATIVE[i % len(_QUALITATIVE)] for i, c in enumerate(categories)}
    return {"color": [css[v] for v in labels], "colorscale": None, "showscale": False,
            "title": column, "legend": [(c, css[c]) for c in categories]}


def _marker_update(colours: dict) -> dict:
    return {"color": colours["color"], "colorscale": colours["colorscale"],
            "showscale": colours["showscale"], "colorbar": {"title": {"text": colours["title"]}}}


def _scatter_trace(layout: np.ndarray, table: pd.DataFrame, colours: dict, marker_size: float):
    import plotly.graph_objects as go

    marker = dict(size=marker_size, opacity=0.85, line=dict(width=0), **_marker_update(colours))
    common = dict(mode="markers", marker=marker, text=list(table["id"].astype(str)),
                  hovertemplate="%{text}<extra></extra>", name="samples", showlegend=False)
    if layout.shape[1] >= 3:
        return go.Scatter3d(x=layout[:, 0], y=layout[:, 1], z=layout[:, 2], **common)
    return go.Scatter(x=layout[:, 0], y=layout[:, 1], **common)


def _marker_size(count: int) -> float:
    return float(np.clip(14 - 2.2 * math.log10(max(count, 1)), 4, 11))


def _check_layout(layout, table: pd.DataFrame) -> np.ndarray:
    layout = np.asarray(layout, dtype=np.float32)
    if layout.ndim != 2 or layout.shape[1] not in (2, 3) or len(layout) != len(table):
        raise CmcKitError(f"The layout must be [N, 2] or [N, 3] with N = {len(table)} rows of the "
                          f"table. Received shape={layout.shape}; compute it with "
                          "cmc_kit.embed.umap_layout(embedding_matrix(table)).")
    return layout


# =============================================================================================
# Standalone HTML page
# =============================================================================================

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #222; background: #fafafa; }}
#cmc-wrap {{ display: flex; height: 100vh; }}
#cmc-plot-col {{ flex: 1 1 auto; min-width: 0; overflow: hidden; }}
#cmc-plot-col > div {{ height: 100%; }}
/* The panel comes first in the page so its width is known when Plotly sizes the plot. */
#cmc-panel {{ order: 2; flex: 0 0 400px; overflow-y: auto; padding: 12px 16px; background: #fff;
  border-left: 1px solid #ddd; }}
#cmc-panel h1 {{ font-size: 17px; margin: 0 0 4px; }}
.cmc-note {{ color: #666; font-size: 12px; margin: 0 0 10px; }}
.cmc-thumbs {{ display: flex; gap: 6px; }}
.cmc-thumbs figure {{ margin: 0; text-align: center; font-size: 11px; color: #555; }}
.cmc-thumbs img {{ width: 120px; height: 120px; image-rendering: pixelated;
  border: 1px solid #ccc; }}
#cmc-sample table {{ border-collapse: collapse; margin-top: 6px; font-size: 12px; }}
#cmc-sample th {{ text-align: left; font-weight: normal; color: #555; padding: 1px 10px 1px 0; }}
#cmc-grid {{ display: flex; flex-wrap: wrap; gap: 2px; margin-top: 6px; }}
#cmc-grid img {{ width: 56px; height: 56px; cursor: pointer; }}
.cmc-swatch {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 8px;
  border: 1px solid #999; }}
.cmc-item {{ white-space: nowrap; }}
#cmc-legend {{ font-size: 12px; margin: 4px 0 10px; }}
</style></head>
<body><script type="application/json" id="cmc-data">{data}</script>
<div id="cmc-wrap">
<aside id="cmc-panel"><h1>{title}</h1>
<p class="cmc-note">{count} samples. Hover or click a point to see the sample; use the lasso
(toolbar) to see a group. Works offline.</p>
<label>Colour by <select id="cmc-colour-by">{options}</select></label>
<div id="cmc-legend"></div>
<div id="cmc-sample"><p class="cmc-note">No sample selected yet.</p></div>
<div id="cmc-selection"></div>
</aside>
<div id="cmc-plot-col">{plot}</div></div></body></html>
"""

_SCRIPT = """
// Runs after Plotly.newPlot; the side panel below the plot may not be parsed yet.
function cmcExplorerInit() {
var gd = document.getElementById('{plot_id}');
var D = JSON.parse(document.getElementById('cmc-data').textContent);
var panel = document.getElementById('cmc-sample');
var selection = document.getElementById('cmc-selection');
var select = document.getElementById('cmc-colour-by');
var legend = document.getElementById('cmc-legend');
function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
  return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
function fmt(v) {
  return (typeof v === 'number' && !Number.isInteger(v)) ? String(Number(v.toPrecision(4))) : v;
}
function showSample(i) {
  var out = '<div class="cmc-thumbs">';
  D.kinds.forEach(function (k) {
    out += '<figure><img alt="' + k + ' of ' + esc(D.ids[i]) + '" src="' + D.thumbs[k][i] +
           '"><figcaption>' + k + '</figcaption></figure>';
  });
  out += '</div><h3 id="cmc-sample-id">' + esc(D.ids[i]) + '</h3><table>';
  D.columns.forEach(function (c, j) {
    var v = D.meta[i][j];
    if (v !== null) out += '<tr><th>' + esc(c) + '</th><td>' + esc(fmt(v)) + '</td></tr>';
  });
  panel.innerHTML = out + '</table>';
}
function showLegend(c) {
  legend.innerHTML = c.legend.map(function (e) {
    return '<span class="cmc-item"><span class="cmc-swatch" style="background:' + e[1] +
           '"></span>' + esc(e[0]) + '</span>';
  }).join(' ');
}
function onPoint(ev) {
  if (ev && ev.points && ev.points.length && ev.points[0].curveNumber === 0)
    showSample(ev.points[0].pointNumber);
}
gd.on('plotly_hover', onPoint);
gd.on('plotly_click', onPoint);
gd.on('plotly_selected', function (ev) {
  if (!ev || !ev.points) { selection.innerHTML = ''; return; }
  var picked = ev.points.filter(function (p) { return p.curveNumber === 0; });
  var shown = picked.slice(0, D.maxGrid);
  selection.innerHTML = '<h3>' + picked.length + ' selected' +
    (picked.length > shown.length ? ' (first ' + shown.length + ' shown)' : '') +
    '</h3><div id="cmc-grid">' + shown.map(function (p) {
      return '<img title="' + esc(D.ids[p.pointNumber]) + '" data-index="' + p.pointNumber +
             '" src="' + D.thumbs.terrain[p.pointNumber] + '">';
    }).join('') + '</div>';
  selection.querySelectorAll('img').forEach(function (img) {
    img.addEventListener('click', function () { showSample(+img.dataset.index); });
  });
});
select.addEventListener('change', function () {
  var c = D.colourings[select.value];
  Plotly.restyle(gd, {'marker.color': [c.color], 'marker.colorscale': [c.colorscale],
                      'marker.showscale': [c.showscale],
                      'marker.colorbar.title.text': [c.title]}, [0]);
  showLegend(c);
});
showLegend(D.colourings[select.value]);
}
if (document.readyState === 'loading') {
  document.addEventListener('DOMContentLoaded', cmcExplorerInit);
} else {
  cmcExplorerInit();
}
"""


def write_explorer_html(table: pd.DataFrame, layout: np.ndarray, catalog_or_thumbs,
                        out: str | os.PathLike, *, title: str = "cmc_kit embedding explorer",
                        thumb: int = 64, max_grid: int = 120, progress: bool = False) -> Path:
    """Writes one self-contained HTML page: scatter of `layout`, thumbnails and metadata on hover.

    Args:
        table: embeddings table (`cmc_kit.embed` format), one row per point.
        layout: [N, 2] (or [N, 3]) positions, row-aligned with the table.
        catalog_or_thumbs: the dataset catalog (thumbnails are made from the PNGs), or a ready
            `{id: {"terrain": bytes, "height": bytes, "segmentation": bytes}}` mapping.
        out: the .html file to write.
        thumb: terrain thumbnail side in pixels (height and segmentation get 3/4 of it); 64
            keeps a 5,000-sample page under 25 MB (see benchmarks/explorer.py).
        max_grid: most thumbnails shown for a lasso selection.
    """
    import plotly.graph_objects as go

    layout = _check_layout(layout, table)
    ids = list(table["id"].astype(str))
    thumbs = _resolve_thumbnails(catalog_or_thumbs, ids, thumb, detail_size=max(8, thumb * 3 // 4),
                                 progress=progress)
    options = colour_options(table)
    colourings = {}
    for column in options:
        colours = marker_colours(table, column)
        colourings[column] = {k: colours[k] for k in
                              ("color", "colorscale", "showscale", "title", "legend")}
    columns = [c for c in embed.metadata_columns(table) if c != "dominant_class_id"]
    meta = [[_json_value(v) for v in row] for row in table[columns].itertuples(index=False)]
    payload = {
        "ids": ids, "columns": columns, "meta": meta, "kinds": list(THUMBNAIL_KINDS),
        "thumbs": {k: [data_uri(thumbs[i][k]) for i in ids] for k in THUMBNAIL_KINDS},
        "colourings": colourings, "maxGrid": int(max_grid),
    }

    figure = go.Figure(_scatter_trace(layout, table, marker_colours(table, options[0]),
                                      _marker_size(len(table))))
    figure.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=10, b=10),
                         dragmode="lasso", hovermode="closest", xaxis=dict(visible=False),
                         yaxis=dict(visible=False, scaleanchor="x"))
    plot = figure.to_html(full_html=False, include_plotlyjs=True, div_id="cmc-plot",
                          post_script=_SCRIPT, default_width="100%", default_height="100%",
                          config={"displaylogo": False, "responsive": True})
    data = json.dumps(payload, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.format(
        title=html.escape(title), data=data, plot=plot, count=len(table),
        options="".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>'
                        for c in options))
    # Bytes, not config.atomic_write_text: the page must be UTF-8 whatever the locale.
    return atomic_write_bytes(out, page.encode("utf-8"))


def _json_value(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else round(float(value), 5)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value if isinstance(value, (int, str)) else str(value)


def export_html(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                split: str = "all", source: str = "trunk", view: str = "terrain",
                network: str = "online", checkpoint: str | None = None, n_neighbors: int = 15,
                min_dist: float = 0.1, thumb: int = 64, progress: bool = True) -> Path:
    """Embeds a run's samples, lays them out with UMAP (cached in RUN/umap_cache), writes a page."""
    from cmc_kit import data as data_module

    table = embed.embed_run(run, data, split=split, source=source, view=view, network=network,
                            checkpoint=checkpoint, progress=progress)
    layout = embed.umap_layout(embed.embedding_matrix(table), n_neighbors=n_neighbors,
                               min_dist=min_dist, cache_dir=Path(run) / "umap_cache")
    epoch = table.attrs.get("epoch")
    title = f"{Path(run).name}: {source} / {view} / {network}" + \
        (f", epoch {epoch}" if epoch is not None else "")
    return write_explorer_html(table, layout, data_module.discover(data), out, title=title,
                               thumb=thumb, progress=progress)


# =============================================================================================
# The embedding over training
# =============================================================================================

def epoch_tables(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """The per-epoch embedding tables the trainer wrote, as (epoch, path), oldest first."""
    found = []
    for path in (Path(run) / "embeddings").glob("epoch_*.parquet"):
        suffix = path.stem.split("_", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def align_layout(layout: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`layout` rotated (or mirrored), scaled and shifted onto `reference`.

    UMAP's axes mean nothing: two runs on similar embeddings can come out rotated, mirrored or
    scaled. The rotation is the least-squares one (orthogonal Procrustes); the scale gives the
    layout the reference's spread (RMS distance to the centre). The least-squares scale would
    shrink a layout that matches its reference poorly (early epochs) towards a dot. Distance
    ratios within the layout do not change. Both [N, d], rows matching.
    """
    layout = np.asarray(layout, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if layout.shape != reference.shape or layout.ndim != 2:
        raise CmcKitError(f"align_layout needs two [N, d] layouts of the same shape. Received "
                          f"{layout.shape} and {reference.shape}.")
    centred, ref_centred = layout - layout.mean(0), reference - reference.mean(0)
    u, _, vt = np.linalg.svd(centred.T @ ref_centred)                   # [d, d]
    spread, ref_spread = np.sqrt((centred ** 2).sum()), np.sqrt((ref_centred ** 2).sum())
    scale = ref_spread / spread if spread > 0 else 1.0
    return (scale * centred @ (u @ vt) + reference.mean(0)).astype(np.float32)


def _spread(count: int, most: int) -> list[int]:
    """At most `most` indices of range(count), evenly spread, always the first and the last."""
    if count <= most:
        return list(range(count))
    if most < 2:
        return [count - 1]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def embedding_over_epochs(run: str | os.PathLike, *, colour_by: str = DOMINANT,
                          n_neighbors: int = 15, min_dist: float = 0.1, max_frames: int = 30,
                          cache_dir: str | os.PathLike | None = None):
    """An animated Plotly figure: the held-out subset's UMAP after each epoch, with a slider.

    The trainer embeds the same `train.eval_subset` held-out samples after every epoch (trunk
    features of the first view, online network). Each epoch gets its own UMAP; frames are then
    aligned to the next one (`align_layout`, from the last epoch backwards: rotation, mirror,
    shift and the same spread) so a point moves only as much as its neighbourhood changed. `max_frames` spreads long runs' epochs evenly.
    `figure.write_html(path)` keeps the animation in a standalone page.
    """
    import plotly.graph_objects as go

    found = epoch_tables(run)
    if not found:
        raise CmcKitError(f"{Path(run) / 'embeddings'} holds no epoch_NNN.parquet tables. The "
                          "trainer writes them after each epoch when the run has a held-out "
                          "split and train.eval_subset > 0.")
    found = [found[i] for i in _spread(len(found), max(int(max_frames), 1))]
    tables, dropped = [], []
    for epoch, path in found:
        table = embed.load_table(path)
        finite = np.isfinite(embed.embedding_matrix(table)).all(axis=1)
        if not finite.any():  # e.g. an epoch whose weights overflowed: no frame for it
            dropped.append(f"epoch {epoch}: all")
            continue
        if not finite.all():
            dropped.append(f"epoch {epoch}: {int((~finite).sum())}")
        tables.append((epoch, table[finite]))
    if dropped:
        warnings.warn(f"Non-finite embeddings left out of the animation of {run} "
                      f"({'; '.join(dropped)} sample(s)).", stacklevel=2)
    if not tables:
        raise CmcKitError(f"Every epoch table of {run} holds only non-finite embeddings.")
    # Samples present in every table (an unreadable file can drop one from some epochs).
    common = set(tables[-1][1]["id"].astype(str))
    for _, table in tables:
        common &= set(table["id"].astype(str))
    order = [i for i in tables[-1][1]["id"].astype(str) if i in common]
    if len(order) < 3:
        raise CmcKitError(f"The epoch tables of {run} share only {len(order)} sample(s); a layout "
                          "needs at least 3. Raise train.eval_subset.")
    tables = [(epoch, table.set_index(table["id"].astype(str)).loc[order].reset_index(drop=True))
              for epoch, table in tables]
    cache_dir = Path(run) / "umap_cache" if cache_dir is None else cache_dir
    layouts = [embed.umap_layout(embed.embedding_matrix(table), n_neighbors=n_neighbors,
                                 min_dist=min_dist, cache_dir=cache_dir)
               for _, table in tables]
    for i in range(len(layouts) - 2, -1, -1):
        layouts[i] = align_layout(layouts[i], layouts[i + 1])

    colours = marker_colours(tables[-1][1], colour_by)
    size = _marker_size(len(order))

    def trace(epoch, table, layout):
        hover = [f"{sample_id}<br>{cls}<br>epoch {epoch}" for sample_id, cls in
                 zip(order, table[DOMINANT] if DOMINANT in table else [""] * len(order))]
        return go.Scatter(x=layout[:, 0], y=layout[:, 1], ids=order, mode="markers",
                          marker=dict(size=size, opacity=0.85, line=dict(width=0),
                                      **_marker_update(colours)),
                          text=hover, hovertemplate="%{text}<extra></extra>", showlegend=False)

    frames = [go.Frame(data=[trace(epoch, table, layout)], name=f"epoch {epoch}",
                       layout=dict(title=dict(text=f"epoch {epoch}")))
              for (epoch, table), layout in zip(tables, layouts)]
    every = np.concatenate(layouts)
    low, high = every.min(0), every.max(0)
    pad = 0.05 * np.maximum(high - low, 1e-6)
    # Play always runs from the first epoch: the figure opens on the last one.
    play = dict(frame=dict(duration=600, redraw=False), transition=dict(duration=400),
                fromcurrent=False, mode="immediate")
    figure = go.Figure(data=frames[-1].data, frames=frames)
    figure.update_layout(
        template="plotly_white", width=640, height=600, hovermode="closest",
        title=dict(text=f"epoch {tables[-1][0]}"),
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(visible=False, range=[float(low[0] - pad[0]), float(high[0] + pad[0])]),
        yaxis=dict(visible=False, range=[float(low[1] - pad[1]), float(high[1] + pad[1])]),
        updatemenus=[dict(type="buttons", direction="left", x=0.0, y=0.0, xanchor="left",
                          yanchor="top", pad=dict(t=30), buttons=[
                              dict(label="play", method="animate", args=[None, play]),
                              dict(label="pause", method="animate",
                                   args=[[None], dict(mode="immediate",
                                                      frame=dict(duration=0, redraw=False))])])],
        sliders=[dict(active=len(frames) - 1, x=0.25, len=0.75, y=0.0, yanchor="top",
                      currentvalue=dict(visible=False), steps=[
                          dict(label=str(epoch), method="animate",
                               args=[[f"epoch {epoch}"], dict(mode="immediate",
                                                              frame=dict(duration=0, redraw=False),
                                                              transition=dict(duration=300))])
                          for epoch, _ in tables])])
    return figure


def write_epochs_html(run: str | os.PathLike, out: str | os.PathLike | None = None, *,
                      figure=None, **options) -> Path:
    """`embedding_over_epochs(run, **options)` as one self-contained page (default
    RUN/embedding_over_epochs.html), written atomically. Pass `figure` when it is already made."""
    figure = embedding_over_epochs(run, **options) if figure is None else figure
    out = Path(run) / "embedding_over_epochs.html" if out is None else Path(out)
    # Opens on the last epoch, still (auto_play would start the animation on load).
    page = figure.to_html(include_plotlyjs=True, full_html=True, div_id="epochs",
                          auto_play=False, config={"displaylogo": False})
    return atomic_write_bytes(out, page.encode("utf-8"))


# =============================================================================================
# Mosaic
# =============================================================================================

def mosaic(layout: np.ndarray, catalog_or_thumbs, out_png: str | os.PathLike, *,
           canvas: int = 2048, thumb: int = 64, ids: Sequence[str] | None = None,
           background: tuple[int, int, int] = (24, 24, 24)) -> Path:
    """A PNG of the layout with terrain thumbnails at their points, none overlapping.

    The canvas is a grid of thumb-sized cells; each cell holds the point nearest its centre, so
    any dataset size works and at most (canvas // thumb)^2 images are read.

    Args:
        layout: [N, >=2] positions (the first two columns are used).
        catalog_or_thumbs: catalog DataFrame, or {id: {"terrain": bytes}} mapping.
        ids: the id of each layout row; default: the catalog's ids (or the mapping's keys) in order.
    """
    layout = np.asarray(layout, dtype=np.float64)
    if ids is None:
        ids = (list(catalog_or_thumbs["id"].astype(str))
               if isinstance(catalog_or_thumbs, pd.DataFrame) else list(catalog_or_thumbs))
    ids = [str(i) for i in ids]
    if layout.ndim != 2 or layout.shape[1] < 2 or len(layout) != len(ids) or len(ids) == 0:
        raise CmcKitError(f"mosaic needs a layout [N, 2] with one row per id; received "
                          f"layout shape {layout.shape} for {len(ids)} ids.")
    if thumb < 4 or canvas < thumb:
        raise CmcKitError(f"mosaic needs 4 <= thumb <= canvas. Received thumb={thumb}, "
                          f"canvas={canvas}")
    cells = canvas // thumb
    points = layout[:, :2]
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
    chosen = order[first]

    chosen_ids = [ids[i] for i in chosen]
    if isinstance(catalog_or_thumbs, pd.DataFrame):
        rows = _catalog_by_id(catalog_or_thumbs)
        def terrain_of(sample_id):
            with Image.open(rows.loc[sample_id, "terrain"]) as image:
                return image.convert("RGB").resize((thumb, thumb), Image.Resampling.BOX)
    else:
        thumbs = _resolve_thumbnails(catalog_or_thumbs, chosen_ids, thumb)
        def terrain_of(sample_id):
            image = Image.open(io.BytesIO(thumbs[sample_id]["terrain"])).convert("RGB")
            return image if image.size == (thumb, thumb) else image.resize((thumb, thumb))

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
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

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
    rows = len(x)
    figure = make_subplots(rows=rows, cols=2, horizontal_spacing=0.02, vertical_spacing=0.02,
                           column_titles=[f"{view} crop",
                                          f"stage {stage} PCA ({ratio.sum():.0%} of variance)"])
    for i in range(rows):
        figure.add_trace(go.Image(z=inputs[i]), row=i + 1, col=1)
        # Upscale the small map to the crop size so both panels line up.
        scale = max(1, inputs.shape[1] // rgb.shape[1])
        big = np.repeat(np.repeat((rgb[i] * 255).round().astype(np.uint8), scale, 0), scale, 1)
        figure.add_trace(go.Image(z=big), row=i + 1, col=2)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(height=220 * rows, width=460, margin=dict(l=5, r=5, t=30, b=5))
    return FeatureMaps(rgb=rgb, inputs=inputs, explained_variance_ratio=ratio, figure=figure)


# =============================================================================================
# Notebook explorer
# =============================================================================================

def figure_widget_available() -> bool:
    """Plotly's FigureWidget needs the `anywidget` package."""
    try:
        import anywidget  # noqa: F401
    except ImportError:
        return False
    return True


def widgets_can_render() -> bool:
    """True inside a Jupyter kernel that can talk to widgets (a comm channel exists)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Explorer:
    """Interactive UMAP explorer of an embeddings table, for notebooks.

    Controls: colour by (dominant class in the palette colours, class fractions, height, any
    metadata column), UMAP n_neighbors / min_dist, 2D / 3D and, when built from a run, the
    checkpoint, embedding source, view and network. Hover or click a point to see its terrain,
    height and segmentation with its metadata; lasso points to see their terrains.

    The handlers `on_hover`, `on_click`, `on_select`, `set_colour_by`, `set_umap` and
    `set_embedding` are plain methods, so they can be driven from code (and tests).
    """

    def __init__(self, table: pd.DataFrame, catalog: pd.DataFrame, *, layout=None,
                 run: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                 checkpoints: Sequence[dict] | None = None, views: Sequence[str] | None = None,
                 embed_options: dict | None = None,
                 colour_by: str = DOMINANT, n_neighbors: int = 15, min_dist: float = 0.1,
                 n_components: int = 2, cache_dir: str | os.PathLike | None = None,
                 thumb_size: int = 128, grid_thumb: int = 64, max_grid: int = 48):
        import ipywidgets as widgets

        if run is not None and data is None:
            raise CmcKitError("Explorer(run=...) also needs data=DATA to re-embed checkpoints.")
        self.catalog = _catalog_by_id(catalog)
        self.run, self.data = run, data
        self.cache_dir = cache_dir
        self.thumb_size, self.grid_thumb, self.max_grid = thumb_size, grid_thumb, max_grid
        self.umap_settings = {"n_neighbors": int(n_neighbors), "min_dist": float(min_dist),
                              "n_components": int(n_components)}
        self.embed_options = {"split": "validation", "source": "trunk", "view": "terrain",
                              "network": "online", "checkpoint": None, **(embed_options or {})}
        self._tables: dict[tuple, pd.DataFrame] = {}
        self._thumb_cache: OrderedDict = OrderedDict()
        self._set_table(table, layout)
        if colour_by not in colour_options(self.table):
            raise CmcKitError(f"Cannot colour by {colour_by!r}. Choose one of "
                              f"{', '.join(colour_options(self.table))}.")
        self.colour_by = colour_by
        self.interactive = figure_widget_available()
        self.shown_index: int | None = None
        self.selected_indices: list[int] = []

        # -- widgets ------------------------------------------------------------------------
        self.sample_images = {kind: widgets.Image(format="png", width=thumb_size,
                                                  height=thumb_size) for kind in THUMBNAIL_KINDS}
        self.sample_info = widgets.HTML("<i>Hover or click a point to see the sample.</i>")
        self.selection_info = widgets.HTML("")
        self.selection_grid = widgets.GridBox(
            [], layout=widgets.Layout(grid_template_columns=f"repeat(8, {grid_thumb + 4}px)"))
        self.status = widgets.HTML("")
        self.controls = {
            "colour_by": widgets.Dropdown(options=colour_options(self.table), value=colour_by,
                                          description="colour by"),
            "n_neighbors": widgets.IntSlider(value=n_neighbors, min=2, max=100,
                                             description="neighbours", continuous_update=False),
            "min_dist": widgets.FloatSlider(value=min_dist, min=0.0, max=0.99, step=0.01,
                                            description="min dist", continuous_update=False),
            "dimensions": widgets.ToggleButtons(options=[("2D", 2), ("3D", 3)],
                                                value=n_components, description="layout"),
        }
        if run is not None:
            labels = [("latest", None)] + [
                (f"epoch {c.get('epoch')} / step {c.get('step')}", c["path"])
                for c in (checkpoints or [])]
            self.controls.update({
                "checkpoint": widgets.Dropdown(options=labels, value=None,
                                               description="checkpoint"),
                "source": widgets.Dropdown(options=list(embed.SOURCES),
                                           value=self.embed_options["source"],
                                           description="source"),
                "view": widgets.Dropdown(options=list(views or embed.EMBEDDABLE_VIEWS),
                                         value=self.embed_options["view"], description="view"),
                "network": widgets.Dropdown(options=list(embed.NETWORKS),
                                            value=self.embed_options["network"],
                                            description="network"),
            })
        self.controls["colour_by"].observe(lambda c: self.set_colour_by(c["new"]), names="value")
        self.controls["n_neighbors"].observe(
            lambda c: self.set_umap(n_neighbors=c["new"]), names="value")
        self.controls["min_dist"].observe(lambda c: self.set_umap(min_dist=c["new"]),
                                          names="value")
        self.controls["dimensions"].observe(lambda c: self.set_umap(n_components=c["new"]),
                                            names="value")
        for name in ("checkpoint", "source", "view", "network"):
            if name in self.controls:
                self.controls[name].observe(
                    lambda c, name=name: self.set_embedding(**{name: c["new"]}), names="value")

        # Never narrower than the figure: in a flex row the box would shrink and the sample
        # panel would cover the plot's right side (seen in JupyterLab).
        self.plot_box = widgets.Box([], layout=widgets.Layout(flex="0 0 auto",
                                                              min_width=f"{FIGURE_WIDTH + 10}px"))
        self._render_figure()
        note = "" if self.interactive else (
            "<b>Static plot:</b> install <code>anywidget</code> for hover, click and lasso.")
        self.widget = widgets.VBox([
            widgets.HBox([widgets.VBox(list(self.controls.values())), self.status]),
            widgets.HTML(note),
            widgets.HBox([self.plot_box, widgets.VBox([
                widgets.HBox([widgets.VBox([self.sample_images[k], widgets.Label(k)])
                              for k in THUMBNAIL_KINDS]),
                self.sample_info, self.selection_info, self.selection_grid])]),
        ])

    # -- construction from a run ------------------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | os.PathLike, data: str | os.PathLike, *,
                 split: str = "validation", source: str = "trunk", view: str = "terrain",
                 network: str = "online", checkpoint: str | None = None, **kwargs) -> "Explorer":
        """Embeds the run's split of `data` and opens the explorer on it."""
        from cmc_kit import data as data_module
        from cmc_kit.training import load_run

        options = {"split": split, "source": source, "view": view, "network": network,
                   "checkpoint": checkpoint}
        table = embed.embed_run(run, data, progress=True, **options)
        kwargs.setdefault("cache_dir", Path(run) / "umap_cache")
        handle = load_run(run)
        return cls(table, data_module.discover(data), run=run, data=data,
                   checkpoints=handle.checkpoints, views=handle.config.model.views,
                   embed_options=options, **kwargs)

    # -- state ---------------------------------------------------------------------------------
    def _set_table(self, table: pd.DataFrame, layout=None):
        self.table = table.reset_index(drop=True)
        missing = [i for i in self.table["id"].astype(str) if i not in self.catalog.index]
        if missing:
            raise DataError(f"{len(missing)} id(s) of the table are not in the catalog "
                            f"(e.g. {missing[:3]}): pass the catalog of the run's data folder.")
        if layout is None:
            layout = embed.umap_layout(embed.embedding_matrix(self.table), seed=0,
                                       cache_dir=self.cache_dir, **self.umap_settings)
        self.layout = _check_layout(layout, self.table)

    def _render_figure(self):
        import plotly.graph_objects as go

        trace = _scatter_trace(self.layout, self.table, marker_colours(self.table, self.colour_by),
                               _marker_size(len(self.table)))
        figure_class = go.FigureWidget if self.interactive else go.Figure
        self.figure = figure_class(data=[trace])
        self.figure.update_layout(template="plotly_white", width=FIGURE_WIDTH, height=560,
                                  margin=dict(l=10, r=10, t=10, b=10), hovermode="closest",
                                  dragmode="lasso" if self.layout.shape[1] == 2 else "orbit",
                                  xaxis=dict(visible=False), yaxis=dict(visible=False))
        if self.interactive:
            points = self.figure.data[0]
            points.on_hover(lambda trace, p, state: self.on_hover(p.point_inds))
            points.on_click(lambda trace, p, state: self.on_click(p.point_inds))
            if self.layout.shape[1] == 2:
                points.on_selection(lambda trace, p, state: self.on_select(p.point_inds))
            self.plot_box.children = [self.figure]
        else:
            import ipywidgets as widgets

            # Formats without printing, so nothing leaks to stdout outside a kernel.
            output = widgets.Output()
            output.append_display_data(self.figure)
            self.plot_box.children = [output]

    # -- handlers ------------------------------------------------------------------------------
    def on_hover(self, point_indices: Sequence[int]):
        if len(point_indices):
            self.show_sample(int(point_indices[0]))

    def on_click(self, point_indices: Sequence[int]):
        self.on_hover(point_indices)

    def show_sample(self, index: int):
        """Shows row `index` of the table: its three thumbnails and its metadata."""
        row = self.table.iloc[index]
        thumbs = self._thumbnails(str(row["id"]), self.thumb_size)
        for kind, image in self.sample_images.items():
            image.format = "png" if kind == "segmentation" else "jpeg"
            image.value = thumbs[kind]
        lines = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(_format(row[c]))}</td></tr>"
                        for c in embed.metadata_columns(self.table) if c != "dominant_class_id"
                        and not (isinstance(row[c], float) and math.isnan(row[c])))
        self.sample_info.value = (f"<b>{html.escape(str(row['id']))}</b>"
                                  f"<table style='font-size:12px'>{lines}</table>")
        self.shown_index = index

    def on_select(self, point_indices: Sequence[int]):
        """Shows the terrain thumbnails of the selected rows (at most `max_grid`)."""
        import ipywidgets as widgets

        indices = [int(i) for i in point_indices]
        shown = indices[:self.max_grid]
        children = []
        for index in shown:
            sample_id = str(self.table.iloc[index]["id"])
            children.append(widgets.Image(value=self._thumbnails(sample_id, self.grid_thumb)
                                          ["terrain"], format="jpeg", width=self.grid_thumb,
                                          height=self.grid_thumb,
                                          layout=widgets.Layout(margin="1px")))
        self.selection_grid.children = children
        more = f" (first {len(shown)} shown)" if len(indices) > len(shown) else ""
        self.selection_info.value = f"<b>{len(indices)} selected</b>{more}" if indices else ""
        self.selected_indices = indices

    def set_colour_by(self, column: str):
        colours = marker_colours(self.table, column)
        self.colour_by = column
        with self.figure.batch_update():
            self.figure.data[0].marker.update(_marker_update(colours))
        self.status.value = _legend_html(colours)
        if self.controls["colour_by"].value != column:
            self.controls["colour_by"].value = column

    def set_umap(self, **settings):
        """Recomputes the layout with new n_neighbors / min_dist / n_components (cached)."""
        unknown = set(settings) - set(self.umap_settings)
        if unknown:
            raise CmcKitError(f"Unknown UMAP setting(s) {sorted(unknown)}; use "
                              f"{sorted(self.umap_settings)}.")
        self.umap_settings.update(settings)
        self.status.value = "computing UMAP ..."
        self.layout = embed.umap_layout(embed.embedding_matrix(self.table), seed=0,
                                        cache_dir=self.cache_dir, **self.umap_settings)
        self._render_figure()
        self.status.value = _legend_html(marker_colours(self.table, self.colour_by))

    def set_embedding(self, **options):
        """Re-embeds with another checkpoint / source / view / network (runs only; cached)."""
        if self.run is None:
            raise CmcKitError("Switching checkpoints needs a run: use "
                              "Explorer.from_run(RUN, DATA).")
        self.embed_options.update(options)
        key = tuple(sorted((k, str(v)) for k, v in self.embed_options.items()))
        if key not in self._tables:
            self.status.value = "embedding ..."
            self._tables[key] = embed.embed_run(self.run, self.data, progress=False,
                                                **self.embed_options)
        self._set_table(self._tables[key])
        options = colour_options(self.table)
        if self.colour_by not in options:
            self.colour_by = DOMINANT
        if list(self.controls["colour_by"].options) != options:
            self.controls["colour_by"].options = options
            self.controls["colour_by"].value = self.colour_by
        self._render_figure()
        self.status.value = _legend_html(marker_colours(self.table, self.colour_by))

    def _thumbnails(self, sample_id: str, size: int) -> dict[str, bytes]:
        key = (sample_id, size)
        if key not in self._thumb_cache:
            self._thumb_cache[key] = sample_thumbnails(self.catalog.loc[sample_id], size)
            if len(self._thumb_cache) > 1024:
                self._thumb_cache.popitem(last=False)
        return self._thumb_cache[key]

    # -- display ----------------------------------------------------------------------------------
    def static_figure(self):
        """A plain Plotly figure of the current layout and colouring (no kernel needed)."""
        import plotly.graph_objects as go

        figure = go.Figure(_scatter_trace(self.layout, self.table,
                                          marker_colours(self.table, self.colour_by),
                                          _marker_size(len(self.table))))
        figure.update_layout(template="plotly_white", width=640, height=560,
                             margin=dict(l=10, r=10, t=30, b=10),
                             title=f"coloured by {self.colour_by}")
        return figure

    def show(self, static: bool = False):
        from IPython.display import HTML, display

        if static or not widgets_can_render():
            display(HTML("<p><b>Static view:</b> interactive widgets need a running Jupyter "
                         "kernel (and the anywidget package). For a page that works anywhere, "
                         "use <code>cmc_kit.explore.write_explorer_html</code>.</p>"))
            display(self.static_figure())
        else:
            display(self.widget)

    def _ipython_display_(self):
        self.show()


def _legend_html(colours: dict) -> str:
    return " ".join(f"<span style='display:inline-block;width:10px;height:10px;"
                    f"background:{css}'></span> {html.escape(str(label))}"
                    for label, css in colours["legend"])


def _format(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)
