"""Helpers for the notebooks in notebooks/: environment report, where data and runs live, a look
at the four views, a live loss plot and small tables of a run's state.

Nothing here builds models or trains: the notebooks call cmc_kit for that. Anything shown goes
through IPython only when a Jupyter kernel is running, so every helper also works headless
(papermill without a frontend, scripts, tests).

Notebooks hand over through files, never through globals:
  01 records the dataset it chose in `DATA_ROOT/dataset.json` (when DATA_DIR is not given) and
  builds the training cache next to the dataset; 02 writes the run directory
  (`RUNS_ROOT/terrain-cmc`) that 03, 04 and 05 read.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

import cmc_kit
from cmc_kit import runs
from cmc_kit.config import ALL_VIEWS, Config, default_paths, in_ci, on_kaggle
from cmc_kit.errors import CmcKitError, ConfigError, DataError
from cmc_kit.fileio import atomic_write_text

DEFAULT_RUN_NAME = "terrain-cmc"
DATASET_POINTER = "dataset.json"


# =============================================================================================
# Environment and paths
# =============================================================================================

def accelerators() -> list[str]:
    """Human-readable names of the GPUs / TPUs TensorFlow sees, e.g. ['GPU:0 Tesla T4 (compute 7.5)']."""
    import tensorflow as tf

    found = []
    for kind in ("GPU", "TPU"):
        for device in tf.config.list_physical_devices(kind):
            label = device.name.replace("/physical_device:", "")
            if kind == "GPU":
                details = tf.config.experimental.get_device_details(device)
                name = details.get("device_name")
                capability = details.get("compute_capability")
                if name:
                    label += f" {name}"
                if capability:
                    label += f" (compute {capability[0]}.{capability[1]})"
            found.append(label)
    return found


def environment_report(*, show: bool = True) -> dict[str, Any]:
    """Versions, accelerators and paths of this session; printed when `show`.

    Returns a dict with python, tensorflow, keras, cmc_kit, accelerators (list), on_kaggle,
    smoke (the CI switch the notebooks use), data_root, runs_root.
    """
    import tensorflow as tf

    paths = default_paths()
    report = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cmc_kit": cmc_kit.__version__,
        "accelerators": accelerators(),
        "on_kaggle": on_kaggle(),
        "smoke": in_ci(),
        "data_root": str(paths["data"]),
        "runs_root": str(paths["runs"]),
    }
    if in_kernel():
        keep_figures_in_saved_notebooks()
    if show:
        found = ", ".join(report["accelerators"]) or "none (CPU only: use the cpu-demo preset)"
        print(f"Python {report['python']}, TensorFlow {report['tensorflow']}, "
              f"Keras {report['keras']}, cmc_kit {report['cmc_kit']}")
        print(f"Accelerator: {found}")
        print(f"Kaggle: {'yes' if report['on_kaggle'] else 'no'}; smoke mode (CI set): "
              f"{'on' if report['smoke'] else 'off'}")
        print(f"Data under {report['data_root']}, runs under {report['runs_root']}")
    return report


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


def default_preset(accelerator_names: Sequence[str] | None = None) -> str:
    """'kaggle-t4' when a GPU or TPU is present, else 'cpu-demo'."""
    names = accelerators() if accelerator_names is None else accelerator_names
    return "kaggle-t4" if names else "cpu-demo"


def run_dir(run: str | os.PathLike | None = None, name: str = DEFAULT_RUN_NAME) -> Path:
    """`run` if given, else RUNS_ROOT/name (/kaggle/working/runs on Kaggle, the repository's runs/)."""
    return Path(run) if run is not None else default_paths()["runs"] / name


def _holds_samples(folder: Path) -> bool:
    return folder.is_dir() and next(folder.rglob("*_i2.png"), None) is not None


# =============================================================================================
# Which dataset
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class DataChoice:
    path: Path
    source: str   # "folder" (given), "kaggle" (attached or downloaded), "synthetic"
    note: str     # one or more lines saying why


def get_data(data_dir: str | os.PathLike | None = None, *, force_synthetic: bool = False,
             synthetic_samples: int = 400, synthetic_size: int = 256, seed: int = 0,
             downloader: Callable[..., Path] | None = None, pointer: Path | None = None) -> DataChoice:
    """Picks the dataset for the notebooks, in this order:

    1. `force_synthetic`: the synthetic set in `data_dir` (default DATA_ROOT/synthetic),
       generated unless already there;
    2. `data_dir` already holding `<id>_t/_h/_i2.png` triplets: used as it is;
    3. the Kaggle dataset: the copy attached under /kaggle/input on Kaggle, else a download with
       the Kaggle API into `data_dir` (default DATA_ROOT/terrain) when credentials exist;
    4. otherwise the synthetic set, with the reason Kaggle was not used in `note`.

    When `data_dir` is None the choice is recorded in DATA_ROOT/dataset.json (or `pointer`) for
    the later notebooks (`find_data`).

    Args:
        downloader: `cmc_kit.kaggle.download`-like callable `(dest=...) -> Path` (tests pass a fake).
    """
    from cmc_kit import kaggle
    from cmc_kit.demo import ensure_synthetic

    given = Path(data_dir).expanduser() if data_dir is not None else None
    synthetic_home = given or default_paths()["data"] / "synthetic"
    if force_synthetic:
        path = ensure_synthetic(synthetic_home, synthetic_samples, synthetic_size, seed)
        choice = DataChoice(Path(path), "synthetic", "Synthetic dataset requested (FORCE_SYNTHETIC).")
    elif given is not None and _holds_samples(given):
        choice = DataChoice(given, "folder", f"Using the dataset already in {given}.")
    else:
        downloader = downloader or kaggle.download
        try:
            path = Path(downloader(dest=given))
            where = "attached Kaggle input" if on_kaggle() else "Kaggle API download"
            choice = DataChoice(path, "kaggle", f"Kaggle Terrain Map dataset ({where}): {path}")
        except CmcKitError as err:
            missing = (f"DATA_DIR {given} did not exist (a typo? it is where a download would "
                       "go).\n" if given is not None and not given.exists() else "")
            path = ensure_synthetic(synthetic_home, synthetic_samples, synthetic_size, seed)
            choice = DataChoice(Path(path), "synthetic",
                                f"{missing}The Kaggle dataset is not available here:\n{err}\n"
                                f"Using the synthetic dataset in {path} instead.")
    if data_dir is None:
        remember_data(choice, pointer)
    return choice


def remember_data(choice: DataChoice, pointer: Path | None = None) -> Path:
    """Writes the chosen dataset to DATA_ROOT/dataset.json so notebooks 02-05 find it."""
    pointer = Path(pointer) if pointer is not None else default_paths()["data"] / DATASET_POINTER
    atomic_write_text(pointer, json.dumps({"path": str(Path(choice.path).resolve()),
                                           "source": choice.source}, indent=2) + "\n")
    return pointer


def find_data(data_dir: str | os.PathLike | None = None, *, pointer: Path | None = None) -> Path:
    """The dataset notebook 01 chose: `data_dir` if given, else the one recorded in dataset.json.

    Raises DataError naming the folder and the fix (run 01_data_prep, or set DATA_DIR).
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not _holds_samples(folder):
            raise DataError(f"DATA_DIR={folder} holds no <id>_t.png/_h.png/_i2.png samples. Run "
                            "01_data_prep.ipynb with the same DATA_DIR first, or fix DATA_DIR.")
        return folder
    pointer = Path(pointer) if pointer is not None else default_paths()["data"] / DATASET_POINTER
    if not pointer.is_file():
        raise DataError(f"No dataset recorded in {pointer}. Run 01_data_prep.ipynb first "
                        "(it picks the Kaggle or the synthetic data), or set DATA_DIR.")
    folder = Path(json.loads(pointer.read_text())["path"])
    if not _holds_samples(folder):
        raise DataError(f"{pointer} points to {folder}, which holds no samples any more. Run "
                        "01_data_prep.ipynb again, or set DATA_DIR.")
    return folder


def cache_dir_for(data: str | os.PathLike) -> Path:
    """Where the training cache of a dataset goes.

    On Kaggle: the local temp folder, because everything under /kaggle/working is saved as the
    notebook's output (the cache of the full dataset is ~8 GB and is rebuilt in minutes).
    Elsewhere: next to the dataset (`<data>-cache`) when that folder is writable, else
    DATA_ROOT/<name>-cache.
    """
    data = Path(data).resolve()
    if on_kaggle():
        parent = Path(tempfile.gettempdir()) / "cmc_kit"
    elif os.access(data.parent, os.W_OK):
        parent = data.parent
    else:
        parent = default_paths()["data"]
    return parent / f"{data.name}-cache"


def cache_setting(cache: str | os.PathLike | None) -> str:
    """The `data.cache` setting for a cache folder: its path when it is complete, else "" (PNGs).

    A resumed Kaggle session may lack the cache of the previous one; "" then trains from the
    PNGs, which give the same batches.
    """
    if cache is None:
        return ""
    return str(Path(cache)) if (Path(cache) / "manifest.json").is_file() else ""


# =============================================================================================
# Looking at the data and the settings
# =============================================================================================

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


# One kaggle-t4 train step on the CPU (benchmarks/step_memory.py): about 0.31 GB per sample in
# mixed precision and 0.57 GB in float32, plus about 1.2-1.3 GB. Batch 32 in float32 on one 16 GB
# GPU (a P100: no tensor cores, so no mixed precision) would need about 19.5 GB.
FLOAT32_GPU_BATCH = 16


def choose_config(run: str | os.PathLike, *, preset: str | None = None, epochs: int | None = None,
                  overrides: Mapping[str, Any] | None = None, fresh: bool = False,
                  accelerator_names: Sequence[str] | None = None,
                  gpu_precision: str | None = None) -> Config:
    """The settings to train `run` with (see `runs.resolve_config`).

    A run that already has a config.json keeps it unless `preset` is named (its model settings
    must then still match); a new run starts from `preset`, or from `default_preset()`.
    `overrides` and `epochs` apply on top either way.

    A new kaggle-t4 run that trains in float32 on GPUs (no tensor cores, e.g. Kaggle's P100,
    or `train.mixed_precision` "off" in `overrides`) gets `data.batch_size` 16 instead of 32,
    which would not fit in 16 GB (estimated, see FLOAT32_GPU_BATCH), unless `overrides` sets
    the batch. A saved run whose batch per GPU is larger than that, resumed in float32 on GPUs
    (a T4 x2 run continued on a P100), gets a warning with the fix: the batch of a run cannot
    change. `gpu_precision` is the policy the GPUs get with "auto" (default: what
    `train.mixed_precision=auto` picks for the attached GPUs; None without GPUs).
    """
    from cmc_kit import training

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"OVERRIDES must be a dict of setting names to values, e.g. "
                          f"{{'model.width': 0.25, 'train.epochs': 30}}. Received: {overrides!r}")
    overrides = dict(overrides or {})
    exists = (Path(run) / runs.CONFIG_FILE).is_file() and not fresh
    if preset is None and not exists:
        preset = default_preset(accelerator_names)
    gpus = None
    if gpu_precision is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
        if gpus:
            gpu_precision = training.resolve_mixed_precision("auto")
    if gpus is None:
        gpus = sum(name.startswith("GPU") for name in accelerator_names or []) or 1

    def on_these_gpus(setting: str) -> str | None:
        """The policy a `train.mixed_precision` setting gives on these GPUs (None: no GPU)."""
        if gpu_precision is None or setting == "auto":
            return gpu_precision
        return training.resolve_mixed_precision(setting)

    if (preset == "kaggle-t4" and not exists and "data.batch_size" not in overrides
            and on_these_gpus(overrides.get("train.mixed_precision", "auto")) == "float32"):
        overrides["data.batch_size"] = FLOAT32_GPU_BATCH
        print(f"Training in float32 on these GPUs: data.batch_size "
              f"{FLOAT32_GPU_BATCH} instead of the preset's 32, which needs about 19.5 GB "
              "(estimated). Set OVERRIDES['data.batch_size'] to choose yourself.")
    config = runs.resolve_config(Path(run), preset_name=preset, epochs=epochs,
                                 overrides=overrides, fresh=fresh)
    per_gpu = config.data.batch_size // max(1, gpus)
    if (exists and on_these_gpus(config.train.mixed_precision) == "float32"
            and per_gpu > FLOAT32_GPU_BATCH):
        warnings.warn(
            f"{run} trains with batch {config.data.batch_size} ({per_gpu} per GPU), chosen for "
            f"mixed precision; these GPUs train in float32, where more than {FLOAT32_GPU_BATCH} "
            "per GPU may not fit in 16 GB (about 19.5 GB for 32, estimated). The batch of a run "
            "cannot change: continue on GPU T4 x2, or set OVERRIDES['train.mixed_precision'] = "
            "'mixed_float16' (a P100 computes in float16 without tensor cores; memory about "
            "halves).", stacklevel=2)
    return config


def config_table(config: Config) -> pd.DataFrame:
    """The settings as rows (setting, value), e.g. 'model.trunk' -> 'resnet34'."""
    rows = [{"setting": f"{section}.{key}", "value": value if not isinstance(value, list)
             else ",".join(map(str, value))}
            for section, values in config.to_dict().items() for key, value in values.items()]
    return pd.DataFrame(rows)


# =============================================================================================
# Live loss plot
# =============================================================================================

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
    step) and, when logged, the online kNN accuracy on a second axis."""
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
        if "knn_accuracy" in epoch_rows and epoch_rows["knn_accuracy"].notna().any():
            figure.add_trace(go.Scatter(x=epoch_rows["step"], y=epoch_rows["knn_accuracy"],
                                        mode="lines+markers", name="kNN accuracy (held out)",
                                        yaxis="y2", line=dict(color="#d9822b", dash="dot")))
    if resumed_at_step is not None:
        figure.add_vline(x=resumed_at_step, line=dict(color="grey", dash="dash"),
                         annotation_text=f"resumed at step {resumed_at_step}")
    figure.update_layout(
        title=title, template="plotly_white", height=380, width=760,
        margin=dict(l=50, r=50, t=50, b=40), xaxis_title="step", yaxis_title="loss",
        yaxis2=dict(title="kNN accuracy", overlaying="y", side="right", range=[0, 1],
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


# =============================================================================================
# Resuming and run state
# =============================================================================================

def require_run(run: str | os.PathLike, *, input_root: str | os.PathLike | None = None) -> Path:
    """The run directory 02 wrote (or a previous version's output, copied in). Raises a clear
    error when there is none."""
    from cmc_kit.errors import CheckpointError

    run = Path(run)
    runs.bring_in_previous_run(run, input_root=input_root)
    if not runs.has_checkpoint(run):
        raise CheckpointError(f"{run} holds no checkpoint. Run 02_train.ipynb with the same RUN_DIR "
                              "first, or on Kaggle attach the output of a notebook version that "
                              "trained it (Add Input -> Your Work).")
    return run


def probe_figure(table: pd.DataFrame):
    """Grouped bars of an `evaluate.evaluate_run` long table: one bar per feature source for
    every task and probe, with its 95% interval, accuracy and R^2 in separate panels."""
    import plotly.express as px

    frame = table.assign(task_probe=table["task"] + " / " + table["probe"],
                         above=table["high"] - table["value"],
                         below=table["value"] - table["low"])
    title = f"held-out probes; trained and random_init features: {table.attrs.get('features', 'trunk')}"
    figure = px.bar(frame, x="task_probe", y="value", color="source", barmode="group",
                    error_y="above", error_y_minus="below", facet_row="metric",
                    template="plotly_white", height=620, width=900, title=title,
                    labels={"task_probe": "", "value": ""})
    figure.update_yaxes(matches=None)
    figure.for_each_annotation(lambda a: a.update(text=a.text.replace("metric=", "")))
    return figure


def info_table(*infos: Mapping[str, Any], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """`runs.run_info` dicts side by side: epoch, step, queue fill and latest checkpoint."""
    labels = list(labels) if labels is not None else [f"#{i + 1}" for i in range(len(infos))]
    if len(labels) != len(infos):
        raise ValueError(f"info_table got {len(infos)} infos but {len(labels)} labels.")
    keys = ("epoch", "epochs", "step", "queue_fill", "queue_size", "latest_checkpoint")
    rows = {}
    for label, info in zip(labels, infos):
        column = {k: info.get(k) for k in keys}
        if column["latest_checkpoint"]:
            column["latest_checkpoint"] = Path(column["latest_checkpoint"]).name
        rows[label] = column
    return pd.DataFrame(rows).rename_axis("state")


__all__ = [
    "DEFAULT_RUN_NAME", "choose_config", "probe_figure", "DataChoice", "LiveLossPlot", "accelerators",
    "cache_dir_for", "cache_setting", "config_table", "default_preset",
    "environment_report", "figure_bundle", "keep_figures_in_saved_notebooks", "find_data", "get_data", "in_kernel", "info_table", "loss_figure",
    "plot_log", "read_log", "remember_data", "require_run", "run_dir", "show",
    "show_views", "views_grid",
]
