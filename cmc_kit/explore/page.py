"""The standalone explorer page: one self-contained HTML file that works offline.

`write_explorer_html(table, layout, out, catalog=...)` writes the UMAP scatter with Plotly JS,
every sample's thumbnails and metadata inlined; `export_html(run, data, out)` embeds a run first.
The page's markup, style and script are the package files `page.html`, `page.css`, `page.js`.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import embed
from cmc_kit.explore.scatter import (check_layout, colour_options, marker_colours, marker_size,
                                     scatter_trace)
from cmc_kit.explore.thumbnails import THUMBNAIL_KINDS, check_one_source, data_uri, thumbnails_for
from cmc_kit.fileio import atomic_write_bytes


# In the <head> of every page cmc_kit writes (page.html has it), so a later --out can tell its
# own earlier page from a file it must not replace.
GENERATOR_TAG = '<meta name="generator" content="cmc_kit explorer">'
# What pages written before the tag existed hold: the explorer's data, the epochs plot's div.
_OLDER_PAGE_MARKS = ('id="cmc-data"', '<div id="epochs"')


def is_cmc_kit_page(path: str | os.PathLike) -> bool:
    """True when `path` is an explorer or epochs page that cmc_kit wrote."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 12)
            if GENERATOR_TAG.encode() in head:
                return True
            page = head + handle.read(64 << 20)  # older pages: the marks sit after plotly.js
    except OSError:
        return False
    return any(mark.encode() in page for mark in _OLDER_PAGE_MARKS)


@functools.cache
def page_file(name: str) -> str:
    """The text of one of the page's package files: page.html, page.css or page.js."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def write_explorer_html(table: pd.DataFrame, layout: np.ndarray, out: str | os.PathLike, *,
                        catalog: pd.DataFrame | None = None,
                        thumbnails: Mapping[str, Mapping[str, bytes]] | None = None,
                        title: str = "cmc_kit embedding explorer", thumb: int = 64,
                        max_grid: int = 120, progress: bool = False) -> Path:
    """Writes one self-contained HTML page: scatter of `layout`, thumbnails and metadata on hover.

    Args:
        table: embeddings table (`cmc_kit.embed` format), one row per point.
        layout: [N, 2] (or [N, 3]) positions, row-aligned with the table.
        out: the .html file to write.
        catalog: the dataset catalog; the thumbnails are made from its PNGs. Or:
        thumbnails: a ready `{id: {"terrain": bytes, "height": bytes, "segmentation": bytes}}`
            mapping. Pass exactly one of the two.
        thumb: terrain thumbnail side in pixels (height and segmentation get 3/4 of it); 64
            keeps a 5,000-sample page under 25 MB (see benchmarks/explorer.py).
        max_grid: most thumbnails shown for a lasso selection.
    """
    check_one_source("write_explorer_html", catalog, thumbnails)
    layout = check_layout(layout, table)
    ids = list(table["id"].astype(str))
    thumbs = thumbnails_for(ids, thumb, catalog=catalog, thumbnails=thumbnails,
                            detail_size=max(8, thumb * 3 // 4), progress=progress)
    options = colour_options(table)
    payload = _page_data(table, ids, thumbs, options, max_grid)
    data = json.dumps(payload, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    page = page_file("page.html").format(
        title=html.escape(title), style=page_file("page.css"), data=data,
        plot=_plot_html(table, layout, options[0]), count=len(table),
        options="".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>'
                        for c in options))
    # Bytes, not config.atomic_write_text: the page must be UTF-8 whatever the locale.
    return atomic_write_bytes(out, page.encode("utf-8"))


def _page_data(table: pd.DataFrame, ids: list[str], thumbs: dict, options: list[str],
               max_grid: int) -> dict:
    """What page.js reads from the page's JSON block: ids, metadata, thumbnails, colourings."""
    colourings = {}
    for column in options:
        colours = marker_colours(table, column)
        colourings[column] = {k: colours[k] for k in
                              ("color", "colorscale", "showscale", "title", "legend")}
    columns = [c for c in embed.metadata_columns(table) if c != "dominant_class_id"]
    meta = [[_json_value(v) for v in row] for row in table[columns].itertuples(index=False)]
    return {
        "ids": ids, "columns": columns, "meta": meta, "kinds": list(THUMBNAIL_KINDS),
        "thumbs": {k: [data_uri(thumbs[i][k]) for i in ids] for k in THUMBNAIL_KINDS},
        "colourings": colourings, "maxGrid": int(max_grid),
    }


def _plot_html(table: pd.DataFrame, layout: np.ndarray, colour_by: str) -> str:
    """The Plotly div (plotly.js inlined) with page.js run once the plot exists."""
    import plotly.graph_objects as go

    figure = go.Figure(scatter_trace(layout, table, marker_colours(table, colour_by),
                                     marker_size(len(table))))
    figure.update_layout(template="plotly_white", margin=dict(l=10, r=10, t=10, b=10),
                         dragmode="lasso", hovermode="closest", xaxis=dict(visible=False),
                         yaxis=dict(visible=False, scaleanchor="x"))
    # Plotly fills in {plot_id}; the line break first keeps the page as it was when the
    # script was an inline string.
    return figure.to_html(full_html=False, include_plotlyjs=True, div_id="cmc-plot",
                          post_script="\n" + page_file("page.js"), default_width="100%",
                          default_height="100%",
                          config={"displaylogo": False, "responsive": True})


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


def export_html(run: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike,
                *, dataset=None, split: str = "all", source: str = "trunk",
                view: str = "terrain", network: str = "online", checkpoint: str | None = None,
                n_neighbors: int = 15, min_dist: float = 0.1, thumb: int = 64,
                progress: bool = True) -> Path:
    """Embeds a run's samples, lays them out with UMAP (cached in RUN/umap_cache), writes a page.

    The dataset is `data` (a folder) or `dataset` (a `cmc_kit.data.Dataset` found already)."""
    from cmc_kit import data as data_module
    from cmc_kit import runs

    dataset = data_module.as_dataset(data, dataset)
    table = embed.embed_run(run, dataset=dataset, split=split, source=source, view=view,
                            network=network, checkpoint=checkpoint, progress=progress)
    layout = embed.umap_layout(embed.embedding_matrix(table), n_neighbors=n_neighbors,
                               min_dist=min_dist, cache_dir=Path(run) / runs.UMAP_CACHE_DIR)
    epoch = table.attrs.get("epoch")
    title = f"{Path(run).name}: {source} / {view} / {network}" + \
        (f", epoch {epoch}" if epoch is not None else "")
    return write_explorer_html(table, layout, out, catalog=dataset.catalog,
                               title=title, thumb=thumb, progress=progress)
