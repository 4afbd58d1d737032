"""The notebook explorer: a Plotly FigureWidget scatter of the UMAP layout with ipywidgets.

`Explorer(table, catalog)` / `Explorer.from_run(run, data)`: hover or click a point to see the
sample's thumbnails and metadata, lasso points to see a grid of their terrains; controls for the
colouring, the UMAP settings and, from a run, the checkpoint, source, view and network.
"""

from __future__ import annotations

import html
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import data as data_module
from cmc_kit import embed
from cmc_kit.features import SOURCES
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.layout import find_metadata_csv
from cmc_kit.explore.scatter import (DOMINANT, check_layout, colour_options, marker_colours,
                                     marker_size, marker_update, scatter_trace)
from cmc_kit.explore.thumbnails import THUMBNAIL_KINDS, catalog_by_id, sample_thumbnails

FIGURE_WIDTH = 640  # px, the notebook explorer's scatter


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
        self.catalog = catalog_by_id(catalog)
        self.run, self.data = run, data
        # What re-embedding reads: the data as found once (its catalog is the one given).
        self.dataset = (None if data is None else
                        data_module.Dataset(Path(data), catalog, find_metadata_csv(data)))
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

        self._make_panel()
        self.controls = self._make_controls(n_neighbors, min_dist, n_components, checkpoints,
                                            views)
        self._observe_controls()
        # Never narrower than the figure: in a flex row the box would shrink and the sample
        # panel would cover the plot's right side (seen in JupyterLab).
        self.plot_box = widgets.Box([], layout=widgets.Layout(flex="0 0 auto",
                                                              min_width=f"{FIGURE_WIDTH + 10}px"))
        self._render_figure()
        self.widget = self._assemble()

    # -- widgets -----------------------------------------------------------------------------------
    def _make_panel(self):
        """The side panel: the shown sample's thumbnails and metadata, the lasso grid, status."""
        import ipywidgets as widgets

        self.sample_images = {kind: widgets.Image(format="png", width=self.thumb_size,
                                                  height=self.thumb_size)
                              for kind in THUMBNAIL_KINDS}
        self.sample_info = widgets.HTML("<i>Hover or click a point to see the sample.</i>")
        self.selection_info = widgets.HTML("")
        self.selection_grid = widgets.GridBox([], layout=widgets.Layout(
            grid_template_columns=f"repeat(8, {self.grid_thumb + 4}px)"))
        self.status = widgets.HTML("")

    def _make_controls(self, n_neighbors, min_dist, n_components, checkpoints, views) -> dict:
        """Colouring and UMAP controls; with a run also checkpoint, source, view and network."""
        import ipywidgets as widgets

        controls = {
            "colour_by": widgets.Dropdown(options=colour_options(self.table),
                                          value=self.colour_by, description="colour by"),
            "n_neighbors": widgets.IntSlider(value=n_neighbors, min=2, max=100,
                                             description="neighbours", continuous_update=False),
            "min_dist": widgets.FloatSlider(value=min_dist, min=0.0, max=0.99, step=0.01,
                                            description="min dist", continuous_update=False),
            "dimensions": widgets.ToggleButtons(options=[("2D", 2), ("3D", 3)],
                                                value=n_components, description="layout"),
        }
        if self.run is not None:
            labels = [("latest", None)] + [
                (f"epoch {c.get('epoch')} / step {c.get('step')}", c["path"])
                for c in (checkpoints or [])]
            controls.update({
                "checkpoint": widgets.Dropdown(options=labels, value=None,
                                               description="checkpoint"),
                "source": widgets.Dropdown(options=list(SOURCES),
                                           value=self.embed_options["source"],
                                           description="source"),
                "view": widgets.Dropdown(options=list(views or embed.EMBEDDABLE_VIEWS),
                                         value=self.embed_options["view"], description="view"),
                "network": widgets.Dropdown(options=list(embed.NETWORKS),
                                            value=self.embed_options["network"],
                                            description="network"),
            })
        return controls

    def _observe_controls(self):
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

    def _assemble(self):
        """Controls and status on top, then the plot beside the sample panel."""
        import ipywidgets as widgets

        note = "" if self.interactive else (
            "<b>Static plot:</b> install <code>anywidget</code> for hover, click and lasso.")
        return widgets.VBox([
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
        from cmc_kit import runs

        options = {"split": split, "source": source, "view": view, "network": network,
                   "checkpoint": checkpoint}
        dataset = data_module.Dataset.find(data)
        table = embed.embed_run(run, dataset=dataset, progress=True, **options)
        kwargs.setdefault("cache_dir", Path(run) / runs.UMAP_CACHE_DIR)
        handle = runs.load_run(run)
        return cls(table, dataset.catalog, run=run, data=data,
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
        self.layout = check_layout(layout, self.table)

    def _render_figure(self):
        import plotly.graph_objects as go

        trace = scatter_trace(self.layout, self.table, marker_colours(self.table, self.colour_by),
                              marker_size(len(self.table)))
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
            self.figure.data[0].marker.update(marker_update(colours))
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
            self._tables[key] = embed.embed_run(self.run, dataset=self.dataset, progress=False,
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

        figure = go.Figure(scatter_trace(self.layout, self.table,
                                         marker_colours(self.table, self.colour_by),
                                         marker_size(len(self.table))))
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
