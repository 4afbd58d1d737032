"""What the notebooks show: the four views as the network sees them, the live loss plot, the
probe bars, and the display plumbing that keeps a saved notebook's figures visible. Nothing is
shown outside a Jupyter kernel, so every helper also works headless."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cmc_kit import runs
from cmc_kit.config import ALL_VIEWS
from cmc_kit.errors import DataError


def keep_figures_in_saved_notebooks() -> str:
    """Adds Plotly's `notebook_connected` renderer (HTML loading plotly.js from its CDN) to the
    default one, so figures shown as a cell's value also appear in viewers of a saved notebook
    without the Plotly extension (Kaggle's version viewer, nbconvert's HTML); JupyterLab keeps
    drawing them from the Plotly JSON. Kaggle's and Colab's own renderers already do. Returns
    the renderer now in use."""
    import plotly.io as pio

    current = pio.renderers.default or "plotly_mimetype"
    parts = current.split("+")
    if not any(p in ("notebook", "notebook_connected", "kaggle", "colab", "iframe",
                     "iframe_connected") for p in parts):
        pio.renderers.default = current + "+notebook_connected"
    return pio.renderers.default


def views_grid(catalog: pd.DataFrame, *, crop_size: int, samples: int = 4,
               views: Sequence[str] = ALL_VIEWS, tile: int = 160) -> Image.Image:
    """One row per sample, one column per view, as the network sees them (evaluation crops).

    The crops are centre crops; the overview is the whole image resized to the crop size, with
    the crop window outlined. Tiles are enlarged to `tile` px with nearest-neighbour sampling so
    small crops stay visible pixel for pixel.
    """
    from cmc_kit import views as views_module
    from cmc_kit.explore import displayable

    views = views_module.check_views(views)
    rows = catalog.head(samples)
    if len(rows) == 0:
        raise DataError("views_grid needs a catalog with at least one sample.")
    dataset = views_module.make_dataset(rows, views=views, crop_size=crop_size,
                                        batch_size=len(rows), training=False, seed=0, with_ids=True)
    batch = next(iter(dataset))
    images = {v: displayable(batch[v].numpy(), v) for v in views}  # {view: uint8 [S, c, c, 3]}
    ids = [i.decode() for i in batch["id"].numpy()]
    with Image.open(rows["terrain"].iloc[0]) as first:
        full_width, full_height = first.size

    tile = max(int(tile), crop_size)
    gap, header, label = 4, 18, 56
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (label + len(views) * (tile + gap), header + len(ids) * (tile + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, view in enumerate(views):
        x = label + column * (tile + gap)
        channels = views_module.VIEW_SPECS[view].channels
        draw.text((x + 2, 3), f"{view} ({channels} ch)", fill=(0, 0, 0), font=font)
        for row, sample_id in enumerate(ids):
            y = header + row * (tile + gap)
            picture = Image.fromarray(images[view][row]).resize((tile, tile), Image.Resampling.NEAREST)
            if view == "overview":
                _outline_centre_crop(picture, full_height, full_width, crop_size)
            canvas.paste(picture, (x, y))
            if column == 0:
                draw.text((4, y + tile // 2 - 6), sample_id, fill=(0, 0, 0), font=font)
    return canvas


def _outline_centre_crop(picture: Image.Image, height: int, width: int, crop_size: int) -> None:
    """Draws where the centre crop lies on the resized whole image."""
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    sx, sy = picture.width / width, picture.height / height
    box = (left * sx, top * sy, (left + crop_size) * sx - 1, (top + crop_size) * sy - 1)
    ImageDraw.Draw(picture).rectangle(box, outline=(255, 255, 0), width=2)


def show_views(catalog: pd.DataFrame, *, crop_size: int, samples: int = 4,
               out_png: str | os.PathLike | None = None, **kwargs) -> Image.Image:
    """`views_grid`, displayed in a notebook and optionally saved as PNG."""
    picture = views_grid(catalog, crop_size=crop_size, samples=samples, **kwargs)
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        picture.save(out_png)
    show(picture)
    return picture


def in_kernel() -> bool:
    """True inside a Jupyter kernel (papermill included), where display() reaches a notebook."""
    from cmc_kit.explore import widgets_can_render  # the same check: a kernel with a comm

    return widgets_can_render()


def show(obj) -> None:
    """display(obj) in a kernel; nothing elsewhere (scripts and tests stay quiet).

    PIL images go out as PNG only (IPython would also attach a JPEG copy).
    """
    if not in_kernel():
        return
    from IPython.display import display

    if isinstance(obj, Image.Image):
        buffer = io.BytesIO()
        obj.save(buffer, format="PNG")
        display({"image/png": buffer.getvalue(), "text/plain": f"<image {obj.width}x{obj.height}>"},
                raw=True)
    else:
        display(obj)


def figure_bundle(figure) -> dict:
    """A Plotly figure as a display bundle: the renderer's own (e.g. Kaggle's, or the Plotly JSON
    that JupyterLab draws) plus standalone HTML loading plotly.js from its CDN, so a saved
    notebook shows the figure in viewers without a Plotly extension."""
    bundle = dict(figure._repr_mimebundle_())  # the IPython display protocol
    if "application/vnd.plotly.v1+json" not in bundle:
        bundle["application/vnd.plotly.v1+json"] = json.loads(figure.to_json())
    if "text/html" not in bundle:
        bundle["text/html"] = figure.to_html(full_html=False, include_plotlyjs="cdn")
    bundle.setdefault("text/plain", f"<plotly figure: {figure.layout.title.text or ''}>")
    return bundle


def read_log(run: str | os.PathLike) -> pd.DataFrame:
    """RUN/log.csv (one row per epoch), or an empty frame before the first epoch ends."""
    path = Path(run) / runs.LOG_FILE
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["epoch", "step", "loss"])


def loss_figure(epoch_rows: pd.DataFrame, *, steps: Sequence[int] = (),
                step_losses: Sequence[float] = (), resumed_at_step: int | None = None,
                title: str = "Training loss"):
    """Plotly figure: per-step loss (thin), per-epoch mean loss (markers, x = the epoch's last
    step) and, when logged, the online kNN accuracy and the embedding spread (~1 healthy, ~0
    collapsed) on a second axis."""
    import plotly.graph_objects as go

    figure = go.Figure()
    if len(steps):
        figure.add_trace(go.Scatter(x=list(steps), y=list(step_losses), mode="lines",
                                    name="loss per step", line=dict(width=1, color="#9fb7d9")))
    if len(epoch_rows):
        figure.add_trace(go.Scatter(
            x=epoch_rows["step"], y=epoch_rows["loss"], mode="lines+markers",
            name="epoch mean loss", line=dict(color="#1f4e99"),
            text=[f"epoch {int(e)}" for e in epoch_rows["epoch"]]))
        for column, name, colour in (("knn_accuracy", "kNN accuracy (held out)", "#d9822b"),
                                     ("embedding_spread", "embedding spread (0: collapsed)",
                                      "#3a9a5b")):
            if column in epoch_rows and epoch_rows[column].notna().any():
                figure.add_trace(go.Scatter(x=epoch_rows["step"], y=epoch_rows[column],
                                            mode="lines+markers", name=name, yaxis="y2",
                                            line=dict(color=colour, dash="dot")))
    if resumed_at_step is not None:
        figure.add_vline(x=resumed_at_step, line=dict(color="grey", dash="dash"),
                         annotation_text=f"resumed at step {resumed_at_step}")
    figure.update_layout(
        title=title, template="plotly_white", height=380, width=760,
        margin=dict(l=50, r=50, t=50, b=40), xaxis_title="step", yaxis_title="loss",
        yaxis2=dict(title="kNN accuracy, spread", overlaying="y", side="right", range=[0, 1.2],
                    tickmode="linear", tick0=0, dtick=0.2, showgrid=False),
        legend=dict(orientation="h", y=-0.2))
    return figure


def plot_log(run: str | os.PathLike, *, resumed_at_step: int | None = None):
    """`loss_figure` of RUN/log.csv (every epoch of every session)."""
    return loss_figure(read_log(run), resumed_at_step=resumed_at_step,
                       title=f"{Path(run).name}: loss per epoch")


class LiveLossPlot(keras.callbacks.Callback):
    """Per-step and per-epoch loss in a Plotly figure redrawn in place while `training.train` runs.

    In a Jupyter kernel the figure is displayed once with a display id and replaced every
    `update_every` steps and at every epoch end, so the saved notebook keeps the final picture
    (FigureWidget state would not survive "Save & Run All"). Without a kernel nothing is shown;
    the numbers are still collected (`steps`, `step_losses`, `epochs`).

    Args:
        run: run directory whose log.csv holds earlier epochs (drawn too, so a resumed run's
            curve continues where it stopped).
        update_every: redraw after this many steps (the figure is sent whole each time).
    """

    def __init__(self, run: str | os.PathLike | None = None, *, update_every: int = 10,
                 title: str = "Training loss"):
        super().__init__()
        if int(update_every) < 1:
            raise ValueError(f"update_every must be >= 1. Received: update_every={update_every!r}")
        self.run = Path(run) if run is not None else None
        self.update_every = int(update_every)
        self.title = title
        self.steps: list[int] = []
        self.step_losses: list[float] = []
        self.epochs = pd.DataFrame(columns=["epoch", "step", "loss"])
        self.resumed_at_step: int | None = None
        self.redraws = 0
        self._handle = None

    # -- Trainer hooks ------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        logs = logs or {}
        self.epochs = read_log(self.run) if self.run is not None else self.epochs.iloc[0:0]
        self.resumed_at_step = logs.get("step") if logs.get("resumed") else None
        if in_kernel():
            from IPython.display import display

            # A raw bundle, because display(figure) goes through Plotly's _ipython_display_,
            # which ignores display_id and would append a new plot at every redraw.
            self._handle = display(figure_bundle(self.figure()), raw=True, display_id=True)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if logs.get("skipped") or "loss" not in logs:
            return  # a skipped step (non-finite loss) changed nothing
        self.steps.append(int(batch))
        self.step_losses.append(float(logs["loss"]))
        if len(self.steps) % self.update_every == 0:
            self._redraw()

    def on_epoch_end(self, epoch, logs=None):
        row = dict(logs or {})
        row.setdefault("epoch", epoch + 1)
        row.setdefault("step", self.steps[-1] if self.steps else None)
        self.epochs = pd.concat([self.epochs, pd.DataFrame([row])], ignore_index=True)
        self._redraw()

    def on_train_end(self, logs=None):
        self._redraw()

    # -- drawing ------------------------------------------------------------------------------
    def figure(self):
        last = f", last loss {self.step_losses[-1]:.4f} at step {self.steps[-1]}" if self.steps else ""
        return loss_figure(self.epochs, steps=self.steps, step_losses=self.step_losses,
                           resumed_at_step=self.resumed_at_step, title=self.title + last)

    def _redraw(self):
        self.redraws += 1
        if self._handle is not None:
            self._handle.update(figure_bundle(self.figure()), raw=True)


def probe_figure(table: pd.DataFrame):
    """Grouped bars of an `evaluate.evaluate_run` long table: one bar per feature source for
    every task and probe, with its 95% interval, accuracy and R^2 in separate panels."""
    import plotly.express as px

    frame = table.assign(task_probe=table["task"] + " / " + table["probe"],
                         above=table["high"] - table["value"],
                         below=table["value"] - table["low"])
    grid = table.attrs.get("grid", 1)
    crops = "centre crops" if grid == 1 else f"{grid}x{grid} crops per sample"
    title = (f"held-out probes ({crops}); trained and random_init features: "
             f"{table.attrs.get('features', 'trunk')}")
    figure = px.bar(frame, x="task_probe", y="value", color="source", barmode="group",
                    error_y="above", error_y_minus="below", facet_row="metric",
                    template="plotly_white", height=620, width=900, title=title,
                    labels={"task_probe": "", "value": ""})
    figure.update_yaxes(matches=None)
    figure.for_each_annotation(lambda a: a.update(text=a.text.replace("metric=", "")))
    return figure