"""Does it learn? kNN and linear probes on frozen features, against honest baselines.

Every source is probed on the same split with the same probes:
  - `trained`: the run's checkpoint (online network, features of the terrain centre crop;
    which features is `features`, see `cmc_kit.features.SOURCES`: by default every stage's
    activations pooled to mean and std per channel, which keeps the early stages' colour and
    texture; "trunk" is the original's UMAP embedding, the last stage mean-pooled);
  - `random_init`: the network the run started from (its `train.seed`'s initial weights, see
    `initial_encoder`), never trained, with the *same* feature source: trained minus random
    init is what training added, seed for seed;
  - `raw_pixels`: the terrain centre crop downsampled to 8x8x3;
  - `mean_colour`: the crop's mean colour (1x1x3), the simplest baseline;
  - optionally `epoch_N` for each earlier checkpoint kept in the run.
Labels come from the data itself: the dominant segmentation class of the evaluation crop
(7-way), class fractions (variance-weighted R^2), mean height (R^2), the synthetic generator's
parameters (`generator:<name>`) and any other numeric column of the dataset's metadata.csv
(`metadata:<name>`). Probes fit on the run's training split and score on its held-out split:
no training id is ever scored. Every value carries a 95% interval: a bootstrap over the
held-out samples for one run, a t-interval over runs (seeds) for several.

`grid` scores grid x grid crops per sample (a tiling of each image, `views.window_corners`)
instead of its centre crop, each with its own labels: 16 crops of 64 px per 256 px demo image
make the held-out figures firmer than 100 centre crops can. Crops of one image are not
independent, so the probes' cross-validation folds and the bootstrap keep a sample's crops
together: the interval is over held-out samples, whatever the grid.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import data as data_module
from cmc_kit import probes, runs, synth
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.fileio import atomic_write_text
from cmc_kit.palette import CLASS_NAMES, FRACTION_COLUMNS

RAW_PIXEL_SIDE = 8
BASELINES = ("random_init", "raw_pixels", "mean_colour")
# Below this many held-out samples one sample moves an accuracy by > 2 points: say so.
ROUGH_BELOW = 50


def resolve_output(out: str | os.PathLike | None, run: str | os.PathLike | None = None, *,
                   force: bool = False) -> Path | None:
    """Where `evaluate_run(out=...)` writes: an existing folder gets `evaluation.csv` inside it.

    Checked before any work, so a bad path fails in a second, not after minutes of probes:
    a .csv name, not one of the run's own training files, and not an existing file other than
    an evaluation table (unless `force`). Raises CheckpointError / CmcKitError saying which.
    """
    if out is None:
        return None
    return runs.output_path(out, run=run, what="--out", default_name=runs.EVALUATION_FILE,
                            suffixes=(".csv",), kind="an evaluation table",
                            looks_like_ours=is_evaluation_table, force=force)


def is_evaluation_table(path: str | os.PathLike) -> bool:
    """True when `path` is a CSV that `write_table` wrote (it starts task,probe,metric)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith("task,probe,metric")
    except OSError:
        return False


def raw_pixel_features(catalog: pd.DataFrame, crop_size: int, batch_size: int = 64,
                       side: int = RAW_PIXEL_SIDE, grid: int = 1) -> np.ndarray:
    """Terrain centre crops downsampled (area average) to side x side x 3: [N, side*side*3]
    (side 1: the crop's mean colour); with `grid`, every crop of the grid, [N * grid^2, ...],
    in the order of `embed.compute_embeddings(grid=grid)`."""
    return downsampled_crops(catalog, crop_size, (side,), batch_size=batch_size, grid=grid)[side]


def downsampled_crops(catalog: pd.DataFrame, crop_size: int, sides, *, batch_size: int = 64,
                      grid: int = 1) -> dict[int, np.ndarray]:
    """`raw_pixel_features` for several sides from one pass over the images: {side: matrix}."""
    import tensorflow as tf

    from cmc_kit import views

    dataset = views.make_dataset(catalog, views=("terrain",), crop_size=crop_size,
                                 batch_size=batch_size, training=False, seed=0, grid=grid)
    chunks = {side: [] for side in sides}
    for batch in dataset:
        for side, parts in chunks.items():
            small = tf.image.resize(batch["terrain"], (side, side), method="area")  # [B, s, s, 3]
            parts.append(tf.reshape(small, [tf.shape(small)[0], -1]).numpy())
    return {side: np.concatenate(parts, axis=0) for side, parts in chunks.items()}


def label_targets(table: pd.DataFrame) -> dict[str, tuple[str, np.ndarray]]:
    """Task name -> ("classification" | "regression", labels) from an embeddings table."""
    targets = {
        "dominant_class": ("classification", table["dominant_class_id"].to_numpy()),
        "class_fractions": ("regression", table[list(FRACTION_COLUMNS)].to_numpy(np.float64)),
        "height_mean": ("regression", table["height_mean"].to_numpy(np.float64)),
    }
    skip = set(FRACTION_COLUMNS) | {"id", "dominant_class", "dominant_class_id", "height_mean",
                                    "height_std", "split", "window"}
    for column in table.columns:
        if column.startswith("emb_") or column in skip or column.startswith("meta_fraction_"):
            continue
        values = table[column]
        if pd.api.types.is_numeric_dtype(values) and values.nunique() > 2:
            origin = "generator" if column in synth.PARAMETERS else "metadata"
            targets[f"{origin}:{column}"] = ("regression", values.to_numpy(np.float64))
    return targets


def _row(task, probe, metric, source, value, interval) -> dict:
    return {"task": task, "probe": probe, "metric": metric, "source": source,
            "value": float(value), "low": interval[0], "high": interval[1]}


def probe_features(train_x: np.ndarray, test_x: np.ndarray, train_table: pd.DataFrame,
                   test_table: pd.DataFrame, *, source: str, seed: int = 0, k: int = 20,
                   per_target: bool = False,
                   resamples: int = probes.BOOTSTRAP_RESAMPLES) -> list[dict]:
    """Rows {task, probe, metric, source, value, low, high} for every task and probe; low/high
    is the 95% bootstrap interval over the held-out samples (the fitted probes stay fixed).
    `per_target`: also one row per class fraction, `class_fractions[<class>]`. Tables with a
    `window` column (several crops per sample) keep each sample's crops together in the
    linear probes' cross-validation and in the bootstrap."""
    rows = []
    train_targets, test_targets = label_targets(train_table), label_targets(test_table)
    train_groups, test_groups = sample_groups(train_table), sample_groups(test_table)
    interval = lambda metric, *arrays: probes.bootstrap_interval(  # noqa: E731
        metric, *arrays, resamples=resamples, seed=seed, groups=test_groups)
    for task, (kind, train_y) in train_targets.items():
        if task not in test_targets:
            continue
        test_y = test_targets[task][1]
        if kind == "classification":
            predicted = probes.knn_classify(train_x, train_y, test_x, k=min(k, len(train_x)),
                                            num_classes=len(CLASS_NAMES))
            rows.append(_row(task, "knn", "accuracy", source, probes.accuracy_of(test_y, predicted),
                             interval(probes.accuracy_of, test_y, predicted)))
            result = probes.linear_probe_classification(train_x, train_y, test_x, test_y, seed=seed,
                                                        groups=train_groups)
            rows.append(_row(task, "linear", "accuracy", source, result["accuracy"],
                             interval(probes.accuracy_of, test_y, result["predictions"])))
            continue
        result = probes.linear_probe_regression(train_x, train_y, test_x, test_y,
                                                groups=train_groups)
        rows.append(_row(task, "linear", "r2", source, result["r2"],
                         interval(probes.variance_weighted_r2, test_y, result["predictions"])))
        if per_target and test_y.ndim == 2:
            for index, name in enumerate(CLASS_NAMES):
                truth, predicted = test_y[:, index], result["predictions"][:, index]
                rows.append(_row(f"{task}[{name}]", "linear", "r2", source,
                                 result["r2_per_target"][index],
                                 interval(probes.variance_weighted_r2, truth, predicted)))
    return rows


def probe_sources(features: dict[str, tuple[np.ndarray, np.ndarray]], train_table: pd.DataFrame,
                  test_table: pd.DataFrame, *, workers: int | None = None,
                  **options) -> list[dict]:
    """`probe_features` rows of every source ({name: (train_x, test_x)}), in source order.

    Sources are independent, so `workers` of them (default: one per available core, at most one
    per source) are probed at once, in threads with single-threaded BLAS: the logistic probes'
    many small lbfgs steps cannot use a second BLAS thread (see `probes`), and NumPy and
    scikit-learn release the GIL in their numeric loops. The rows do not depend on `workers`
    beyond float rounding (one BLAS thread sums in another order: ~1e-16).
    """
    def probed(item):
        name, (train_x, test_x) = item
        return probe_features(train_x, test_x, train_table, test_table, source=name, **options)

    workers = min(len(features), workers or _available_cores())
    if workers <= 1:
        return [row for item in features.items() for row in probed(item)]
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        return [row for rows in pool.map(probed, features.items()) for row in rows]


def _available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def sample_groups(table: pd.DataFrame) -> np.ndarray | None:
    """The sample id of every row when a sample has several rows (a `window` column), else None."""
    return table["id"].to_numpy() if "window" in table.columns else None


def evaluate_run(run: str | os.PathLike, data: str | os.PathLike | None = None, *,
                 dataset: data_module.Dataset | None = None, out: str | os.PathLike | None = None,
                 checkpoints: str = "latest", features: str = "stages", per_target: bool = False,
                 grid: int = 1, seed: int = 0, progress: bool = False,
                 force: bool = False, workers: int | None = None,
                 references: dict | None = None) -> pd.DataFrame:
    """Probes the run's features and the baselines on its held-out split.

    Args:
        data, dataset: the run's dataset, as a folder or as a `cmc_kit.data.Dataset` found
            already (one of the two).
        out: CSV file for the wide table; an existing folder gets `evaluation.csv` inside it.
            Checked before any work (see `resolve_output`; `force` replaces a file that is not
            an evaluation table).
        checkpoints: "latest", or "all" to add a column per kept checkpoint (learning over epochs).
        features: the feature source of the trained and random-init encoders (`features.SOURCES`).
        per_target: also one row per class fraction.
        grid: score grid x grid crops of every sample (see the module docstring); 1: the
            centre crop only.
        workers: sources probed at once (`probe_sources`; default one per core).
        references: {name: encoder} of other networks of the run's architecture, probed like
            the trained one (e.g. one trained on the labels, for scale); never baselines.
    Returns:
        long table: task, probe, metric, source, value, low, high; `attrs` say the features,
        the grid, the run's epoch and step and the sample counts. Written wide to `out` (CSV) if given.
    """
    from cmc_kit import embed
    from cmc_kit.features import check_source

    if checkpoints not in ("latest", "all"):
        raise CmcKitError(f"checkpoints (CHECKPOINTS in 05_evaluate) must be 'latest' or 'all'. "
                          f"Received: {checkpoints!r}")
    check_source(features)
    grid = check_grid(grid)
    out = resolve_output(out, run, force=force)
    handle = runs.load_run(run)
    config = handle.config
    dataset = data_module.as_dataset(data, dataset)
    train_catalog, test_catalog = run_split(handle, dataset, what="probes")
    options = dict(view="terrain" if "terrain" in config.model.views else config.model.views[0],
                   source=features, crop_size=config.data.crop_size,
                   batch_size=max(config.data.batch_size, 32), progress=progress,
                   metadata_csv=dataset.metadata_csv, grid=grid)

    def tables_for(encoder):
        return (embed.compute_embeddings(encoder, train_catalog, **options),
                embed.compute_embeddings(encoder, test_catalog, **options))

    train_table, test_table = tables_for(handle.encoder("online"))
    sources = {"trained": (train_table, test_table)}
    sources["random_init"] = tables_for(initial_encoder(config))
    if checkpoints == "all":
        for entry in handle.checkpoints[:-1]:
            earlier = runs.load_run(run, checkpoint=entry["path"]).encoder("online")
            label = f"epoch_{entry['epoch']}" if entry["epoch"] is not None else f"step_{entry['step']}"
            sources[label] = tables_for(earlier)
    for name, encoder in (references or {}).items():
        sources[name] = tables_for(encoder)

    matrices = {name: (embed.embedding_matrix(source_train), embed.embedding_matrix(source_test))
                for name, (source_train, source_test) in sources.items()}
    sides = {"raw_pixels": RAW_PIXEL_SIDE, "mean_colour": 1}
    train_pixels, test_pixels = (downsampled_crops(catalog, config.data.crop_size,
                                                   sides.values(), grid=grid)
                                 for catalog in (train_catalog, test_catalog))
    matrices.update({name: (train_pixels[side], test_pixels[side]) for name, side in sides.items()})
    rows = probe_sources(matrices, train_table, test_table, seed=seed, per_target=per_target,
                         workers=workers)
    table = _ordered(pd.DataFrame(rows))
    table.attrs.update({"run": str(run), "epoch": handle.epoch, "step": handle.step,
                        "features": features, "grid": grid,
                        "train_samples": train_table["id"].nunique(),
                        "test_samples": test_table["id"].nunique(), "test_crops": len(test_table),
                        "interval": "bootstrap"})
    if table.attrs["test_samples"] < ROUGH_BELOW:
        warnings.warn(_rough_note(table), stacklevel=2)
    if out is not None:
        write_table(table, out)
    return table


def tiling_grid(catalog: pd.DataFrame, crop_size: int, most: int = 4) -> int:
    """The largest grid whose crops tile the catalog's images without overlap, at most `most`:
    4 for the demo's 256 px images with 64 px crops, 2 for 512 px Kaggle tiles with 256 px
    crops, 1 when unknown (no readable terrain PNG)."""
    from cmc_kit.decode import first_png_size

    size = first_png_size(catalog["terrain"]) if "terrain" in catalog.columns else None
    if size is None:
        return 1
    return int(max(1, min(most, min(size) // int(crop_size))))


def check_grid(grid) -> int:
    """The evaluation grid as an int >= 1, or CmcKitError naming the setting."""
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 1 <= grid <= 16:
        raise CmcKitError(f"grid (--grid, GRID in 05_evaluate) must be a whole number from 1 (the "
                          f"centre crop) to 16 (grid x grid crops per sample). Received: {grid!r}")
    return int(grid)


def initial_encoder(config):
    """The encoder a run with `config` starts training from: the Trainer seeds Keras with
    `train.seed` before building it, and `models.build_encoder(seed=...)` makes the same weights
    without touching the caller's random streams. (An independent draw instead would mix the
    luck of two initialisations into every trained-vs-random comparison: on the demo set,
    random-init networks alone vary by 0.038 (sd over seeds 0-4) in held-out kNN accuracy.)"""
    from cmc_kit import models

    return models.build_encoder(config.model, crop_size=config.data.crop_size, name="random_init",
                                seed=config.train.seed)


def evaluate_runs(run_dirs, data: str | os.PathLike | None = None, *,
                  dataset: data_module.Dataset | None = None,
                  out: str | os.PathLike | None = None, **options) -> pd.DataFrame:
    """`evaluate_run` for several runs (e.g. seeds) on one dataset, summarised per row: the mean
    over runs with its 95% t-interval, the standard deviation and every run's value.

    `options` go to `evaluate_run` (features, per_target, checkpoints, seed, progress).
    """
    run_dirs = list(run_dirs)
    if len(run_dirs) < 2:
        raise CmcKitError(f"evaluate_runs needs two or more runs (seeds) to give an interval "
                          f"over them; for one run use evaluate_run. Received: {run_dirs}")
    out = resolve_output(out, run_dirs[0], force=options.pop("force", False))
    dataset = data_module.as_dataset(data, dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # each run's rough note: summarised below
        tables = [evaluate_run(run, dataset=dataset, **options) for run in run_dirs]
    table = summarise_over_runs(tables)
    table.attrs.update({"run": ", ".join(map(str, run_dirs)), "runs": len(run_dirs),
                        "features": tables[0].attrs["features"], "interval": "seeds",
                        "grid": tables[0].attrs["grid"], "test_crops": tables[0].attrs["test_crops"],
                        "train_samples": tables[0].attrs["train_samples"],
                        "test_samples": tables[0].attrs["test_samples"]})
    if out is not None:
        write_table(table, out)
    return table


def summarise_over_runs(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Long tables of independent runs -> one row per (task, probe, metric, source): value =
    mean over runs, low/high = its 95% t-interval, sd, and the runs' values in `values`."""
    keys = ["task", "probe", "metric", "source"]
    stacked = pd.concat([t[keys + ["value"]] for t in tables], ignore_index=True)
    rows = []
    for key, group in stacked.groupby(keys, sort=False):
        values = group["value"].to_numpy()
        low, high = probes.seed_interval(values)
        rows.append({**dict(zip(keys, key)), "value": float(np.mean(values)), "low": low,
                     "high": high, "sd": float(np.std(values, ddof=1)),
                     "values": [round(float(v), 4) for v in values]})
    return _ordered(pd.DataFrame(rows))


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in task order, sources trained first, then the baselines, then earlier epochs."""
    order = {name: i for i, name in enumerate(("trained",) + BASELINES)}
    rank = table["source"].map(lambda s: order.get(s, len(order)))
    tasks = {task: i for i, task in enumerate(dict.fromkeys(table["task"]))}
    return (table.assign(_task=table["task"].map(tasks), _source=rank)
            .sort_values(["_task", "probe", "_source"], kind="stable")
            .drop(columns=["_task", "_source"]).reset_index(drop=True))


def run_split(handle: runs.RunHandle, dataset: data_module.Dataset, *,
              what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) catalogs of a run's stored split in `dataset`, checked: the dataset is
    the run's, at least 2 samples are held out (`what` needs them), and no id is on both sides."""
    split = handle.split(dataset.catalog)
    train_catalog, test_catalog = split["train"], split["validation"]
    run, data = handle.run_dir, dataset.root
    saved_ids = handle.split_ids()
    wanted = len(saved_ids["train"]) + len(saved_ids["validation"])
    found = len(train_catalog) + len(test_catalog)
    if found < wanted / 2:  # most of the run's samples are not in `data`
        raise DataError(f"{data} holds only {found} of the {wanted} samples {run} was trained "
                        f"and held out on: is it the run's dataset? Point --data (DATA_DIR) at "
                        "the folder the run was trained on.")
    if len(test_catalog) < 2:
        raise DataError(f"Run {run} holds out only {len(test_catalog)} sample(s) of {data}; "
                        f"{what} need a larger validation split (data.validation_fraction).")
    overlap = set(train_catalog["id"]) & set(test_catalog["id"])
    if overlap:  # cannot happen with a stored split; guard anyway, scores would be meaningless
        raise CmcKitError(f"Training ids in the evaluation split: {sorted(overlap)[:5]}")
    return train_catalog, test_catalog


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, probe, metric); per source its value and 95% interval
    (`<source>`, `<source>_low`, `<source>_high`), trained first; `features` names the source
    of the trained and random-init features."""
    frames = []
    for source in dict.fromkeys(table["source"]):
        part = table[table["source"] == source].set_index(["task", "probe", "metric"])
        frames.append(part[["value", "low", "high"]].rename(columns={
            "value": source, "low": f"{source}_low", "high": f"{source}_high"}))
    out = pd.concat(frames, axis=1).reset_index()
    out.insert(3, "features", table.attrs.get("features", "trunk"))
    out.insert(4, "grid", table.attrs.get("grid", 1))
    return out


def write_table(table: pd.DataFrame, out: str | os.PathLike) -> Path:
    """The wide table as CSV, atomically."""
    return atomic_write_text(out, wide(table).to_csv(index=False, lineterminator="\n"))


def _rough_note(table: pd.DataFrame) -> str:
    n = table.attrs.get("test_samples")
    return (f"Only {n} held-out samples: one sample moves an accuracy by {100 / n:.1f} points, so "
            "these figures are rough (see the intervals). A larger data.validation_fraction or "
            "more data makes them firmer.")


def format_table(table: pd.DataFrame) -> str:
    """The table as text: every value with its 95% interval, a header saying what was probed."""
    attrs = table.attrs
    lines = []
    if attrs:
        over = (f"mean over {attrs['runs']} runs, 95% t-interval over the runs"
                if attrs.get("interval") == "seeds"
                else "95% bootstrap interval over the held-out samples")
        grid = attrs.get("grid", 1)
        crops = ("centre crops" if grid == 1 else
                 f"{grid}x{grid} crops each, {attrs.get('test_crops')} held-out crops scored")
        lines.append(f"Held-out evaluation of {attrs.get('run')} (epoch {attrs.get('epoch', '-')}, "
                     f"step {attrs.get('step', '-')}): {attrs.get('train_samples')} train / "
                     f"{attrs.get('test_samples')} held-out samples ({crops}); trained and "
                     f"random_init features: {attrs.get('features', 'trunk')}; {over}")
        if attrs.get("test_samples") is not None and attrs["test_samples"] < ROUGH_BELOW:
            lines.append(_rough_note(table))
    frame = wide(table).drop(columns=["features", "grid"])
    sources = [c for c in frame.columns[3:] if not c.endswith(("_low", "_high"))]
    shown = frame[["task", "probe", "metric"]].copy()
    for source in sources:
        shown[source] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{v:.3f}"
                         for v, lo, hi in zip(frame[source], frame[f"{source}_low"],
                                              frame[f"{source}_high"])]
    lines.append(shown.to_string(index=False))
    return "\n".join(lines)
