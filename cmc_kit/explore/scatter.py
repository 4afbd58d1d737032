"""The layout as a Plotly scatter: what it can be coloured by, marker colours, the trace.

Shared by the notebook explorer (`widget`), the standalone page (`page`) and the animation over
epochs (`over_epochs`), so all three colour a sample alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from cmc_kit import embed
from cmc_kit.errors import CmcKitError
from cmc_kit.palette import CLASS_NAMES, PALETTE

DOMINANT = "dominant_class"
_QUALITATIVE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
                "#b6e880", "#ff97ff", "#fecb52")
_MAX_CATEGORIES = 30


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


def marker_update(colours: dict) -> dict:
    """The Plotly `marker` properties of a `marker_colours` result."""
    return {"color": colours["color"], "colorscale": colours["colorscale"],
            "showscale": colours["showscale"], "colorbar": {"title": {"text": colours["title"]}}}


def point_marker(colours: dict, size: float) -> dict:
    """A whole marker: size, opacity, no outline, and the colours."""
    return dict(size=size, opacity=0.85, line=dict(width=0), **marker_update(colours))


def scatter_trace(layout: np.ndarray, table: pd.DataFrame, colours: dict, size: float):
    """One Scatter (2-D layout) or Scatter3d (3-D) of the table's rows, hover text = id."""
    import plotly.graph_objects as go

    common = dict(mode="markers", marker=point_marker(colours, size),
                  text=list(table["id"].astype(str)),
                  hovertemplate="%{text}<extra></extra>", name="samples", showlegend=False)
    if layout.shape[1] >= 3:
        return go.Scatter3d(x=layout[:, 0], y=layout[:, 1], z=layout[:, 2], **common)
    return go.Scatter(x=layout[:, 0], y=layout[:, 1], **common)


def marker_size(count: int) -> float:
    """Marker diameter in px for `count` points: 11 for a few, down to 4 for very many."""
    return float(np.clip(14 - 2.2 * math.log10(max(count, 1)), 4, 11))


def check_layout(layout, table: pd.DataFrame) -> np.ndarray:
    """The layout as float32 [N, 2] or [N, 3], one row per table row; CmcKitError otherwise."""
    layout = np.asarray(layout, dtype=np.float32)
    if layout.ndim != 2 or layout.shape[1] not in (2, 3) or len(layout) != len(table):
        raise CmcKitError(f"The layout must be [N, 2] or [N, 3] with N = {len(table)} rows of the "
                          f"table. Received shape={layout.shape}; compute it with "
                          "cmc_kit.embed.umap_layout(embedding_matrix(table)).")
    return layout
