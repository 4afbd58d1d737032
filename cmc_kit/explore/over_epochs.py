"""The embedding over training: one UMAP frame per epoch, animated.

The trainer embeds the same held-out subset after every epoch (`RUN/embeddings/epoch_NNN.parquet`);
`embedding_over_epochs(run)` turns those tables into an animated Plotly figure with a slider,
`write_epochs_html(run)` into a standalone page.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import embed
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.explore.page import GENERATOR_TAG
from cmc_kit.explore.scatter import DOMINANT, marker_colours, marker_size, point_marker
from cmc_kit.fileio import atomic_write_bytes


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
    shift and the same spread) so a point moves only as much as its neighbourhood changed.
    `max_frames` spreads long runs' epochs evenly.
    `figure.write_html(path)` keeps the animation in a standalone page.
    """
    found = epoch_tables(run)
    if not found:
        raise CmcKitError(f"{Path(run) / 'embeddings'} holds no epoch_NNN.parquet tables. The "
                          "trainer writes them after each epoch when the run has a held-out "
                          "split and train.eval_subset > 0.")
    found = [found[i] for i in _spread(len(found), max(int(max_frames), 1))]
    tables, order = _shared_samples(run, _finite_tables(run, found))
    cache_dir = Path(run) / "umap_cache" if cache_dir is None else cache_dir
    layouts = [embed.umap_layout(embed.embedding_matrix(table), n_neighbors=n_neighbors,
                                 min_dist=min_dist, cache_dir=cache_dir)
               for _, table in tables]
    for i in range(len(layouts) - 2, -1, -1):
        layouts[i] = align_layout(layouts[i], layouts[i + 1])
    return _animated_figure(tables, layouts, order, marker_colours(tables[-1][1], colour_by))


def _finite_tables(run, found: list[tuple[int, Path]]) -> list[tuple[int, pd.DataFrame]]:
    """(epoch, table) with the rows of non-finite embeddings left out, and epochs whose table
    cannot be read (a damaged file: training wrote it, nothing can write it again), with a
    warning."""
    tables, dropped = [], []
    for epoch, path in found:
        try:
            table = embed.load_table(path)
        except DataError as err:
            warnings.warn(f"Epoch {epoch} is left out of the animation of {run}: {path} cannot "
                          f"be read ({err.__cause__ or err}).", stacklevel=3)
            continue
        finite = np.isfinite(embed.embedding_matrix(table)).all(axis=1)
        if not finite.any():  # e.g. an epoch whose weights overflowed: no frame for it
            dropped.append(f"epoch {epoch}: all")
            continue
        if not finite.all():
            dropped.append(f"epoch {epoch}: {int((~finite).sum())}")
        tables.append((epoch, table[finite]))
    if dropped:
        warnings.warn(f"Non-finite embeddings left out of the animation of {run} "
                      f"({'; '.join(dropped)} sample(s)).", stacklevel=3)
    if not tables:
        raise CmcKitError(f"No epoch table of {run} holds finite embeddings that can be read.")
    return tables


def _shared_samples(run, tables: list[tuple[int, pd.DataFrame]]):
    """The tables cut to the samples present in every one, rows in the last table's order.

    (An unreadable file can drop a sample from some epochs.) Returns (tables, ids in order).
    """
    common = set(tables[-1][1]["id"].astype(str))
    for _, table in tables:
        common &= set(table["id"].astype(str))
    order = [i for i in tables[-1][1]["id"].astype(str) if i in common]
    if len(order) < 3:
        raise CmcKitError(f"The epoch tables of {run} share only {len(order)} sample(s); a layout "
                          "needs at least 3. Raise train.eval_subset.")
    tables = [(epoch, table.set_index(table["id"].astype(str)).loc[order].reset_index(drop=True))
              for epoch, table in tables]
    return tables, order


def _animated_figure(tables, layouts, order: list[str], colours: dict):
    """One frame per (epoch, table) at its layout; opens on the last epoch, plays from the first."""
    import plotly.graph_objects as go

    size = marker_size(len(order))

    def trace(epoch, table, layout):
        hover = [f"{sample_id}<br>{cls}<br>epoch {epoch}" for sample_id, cls in
                 zip(order, table[DOMINANT] if DOMINANT in table else [""] * len(order))]
        return go.Scatter(x=layout[:, 0], y=layout[:, 1], ids=order, mode="markers",
                          marker=point_marker(colours, size),
                          text=hover, hovertemplate="%{text}<extra></extra>", showlegend=False)

    frames = [go.Frame(data=[trace(epoch, table, layout)], name=f"epoch {epoch}",
                       layout=dict(title=dict(text=f"epoch {epoch}")))
              for (epoch, table), layout in zip(tables, layouts)]
    every = np.concatenate(layouts)
    low, high = every.min(0), every.max(0)
    pad = 0.05 * np.maximum(high - low, 1e-6)
    figure = go.Figure(data=frames[-1].data, frames=frames)
    figure.update_layout(
        template="plotly_white", width=640, height=600, hovermode="closest",
        title=dict(text=f"epoch {tables[-1][0]}"),
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(visible=False, range=[float(low[0] - pad[0]), float(high[0] + pad[0])]),
        yaxis=dict(visible=False, range=[float(low[1] - pad[1]), float(high[1] + pad[1])]),
        **_animation_controls([epoch for epoch, _ in tables]))
    return figure


def _animation_controls(epochs: list[int]) -> dict:
    """Play / pause buttons and an epoch slider (on the last epoch) for `update_layout`."""
    # Play always runs from the first epoch: the figure opens on the last one.
    play = dict(frame=dict(duration=600, redraw=False), transition=dict(duration=400),
                fromcurrent=False, mode="immediate")
    still = dict(mode="immediate", frame=dict(duration=0, redraw=False))
    buttons = [dict(label="play", method="animate", args=[None, play]),
               dict(label="pause", method="animate", args=[[None], still])]
    steps = [dict(label=str(epoch), method="animate",
                  args=[[f"epoch {epoch}"], dict(mode="immediate",
                                                 frame=dict(duration=0, redraw=False),
                                                 transition=dict(duration=300))])
             for epoch in epochs]
    return dict(
        updatemenus=[dict(type="buttons", direction="left", x=0.0, y=0.0, xanchor="left",
                          yanchor="top", pad=dict(t=30), buttons=buttons)],
        sliders=[dict(active=len(epochs) - 1, x=0.25, len=0.75, y=0.0, yanchor="top",
                      currentvalue=dict(visible=False), steps=steps)])


def write_epochs_html(run: str | os.PathLike, out: str | os.PathLike | None = None, *,
                      figure=None, **options) -> Path:
    """`embedding_over_epochs(run, **options)` as one self-contained page (default
    RUN/embedding_over_epochs.html), written atomically. Pass `figure` when it is already made."""
    figure = embedding_over_epochs(run, **options) if figure is None else figure
    out = Path(run) / "embedding_over_epochs.html" if out is None else Path(out)
    # Opens on the last epoch, still (auto_play would start the animation on load).
    page = figure.to_html(include_plotlyjs=True, full_html=True, div_id="epochs",
                          auto_play=False, config={"displaylogo": False})
    page = page.replace("<head>", f"<head>{GENERATOR_TAG}", 1)  # marks it as ours (see page)
    return atomic_write_bytes(out, page.encode("utf-8"))
