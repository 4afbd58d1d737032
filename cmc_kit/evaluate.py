"""Does it learn? kNN and linear probes on frozen features, against honest baselines.

Every feature source is probed on the same split with the same probes:
  - `trained`: the run's checkpoint (online network, trunk features of the terrain centre crop,
    mean-pooled: the original's UMAP embedding);
  - `random_init`: the same architecture, randomly initialised, never trained;
  - `raw_pixels`: the terrain centre crop downsampled to 8x8x3;
  - optionally `epoch_N` for each earlier checkpoint kept in the run.
Labels come from the data itself: the dominant segmentation class of the evaluation crop
(7-way), class fractions (R^2), mean height (R^2), and, on synthetic data, the generator's
parameters from metadata.csv. Probes fit on the run's training split and score on its
held-out validation split: no training id is ever scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import data as data_module
from cmc_kit import runs
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.fileio import atomic_write_text, output_file_path
from cmc_kit.palette import CLASS_NAMES, FRACTION_COLUMNS

RAW_PIXEL_SIDE = 8


def resolve_output(out: str | os.PathLike | None) -> Path | None:
    """Where `evaluate_run(out=...)` writes: an existing folder gets `evaluation.csv` inside it.

    Checked before any work, so a bad path fails in a second, not after minutes of probes.
    Raises CmcKitError when the path (or a folder above it) is an existing file that is in the way.
    """
    return None if out is None else output_file_path(out, "--out", runs.EVALUATION_FILE)


def raw_pixel_features(catalog: pd.DataFrame, crop_size: int, batch_size: int = 64,
                       side: int = RAW_PIXEL_SIDE) -> np.ndarray:
    """Terrain centre crops downsampled (area average) to side x side x 3: [N, side*side*3]."""
    import tensorflow as tf

    from cmc_kit import views

    dataset = views.make_dataset(catalog, views=("terrain",), crop_size=crop_size,
                                 batch_size=batch_size, training=False, seed=0)
    chunks = []
    for batch in dataset:
        small = tf.image.resize(batch["terrain"], (side, side), method="area")  # [B, s, s, 3]
        chunks.append(tf.reshape(small, [tf.shape(small)[0], -1]).numpy())
    return np.concatenate(chunks, axis=0)


def label_targets(table: pd.DataFrame) -> dict[str, tuple[str, np.ndarray]]:
    """Task name -> ("classification" | "regression", labels) from an embeddings table."""
    targets = {
        "dominant_class": ("classification", table["dominant_class_id"].to_numpy()),
        "class_fractions": ("regression", table[list(FRACTION_COLUMNS)].to_numpy(np.float64)),
        "height_mean": ("regression", table["height_mean"].to_numpy(np.float64)),
    }
    skip = set(FRACTION_COLUMNS) | {"id", "dominant_class", "dominant_class_id", "height_mean",
                                    "height_std", "split"}
    for column in table.columns:
        if column.startswith("emb_") or column in skip or column.startswith("meta_fraction_"):
            continue
        values = table[column]
        if pd.api.types.is_numeric_dtype(values) and values.nunique() > 2:
            targets[f"generator:{column}"] = ("regression", values.to_numpy(np.float64))
    return targets


def probe_features(train_x: np.ndarray, test_x: np.ndarray, train_table: pd.DataFrame,
                   test_table: pd.DataFrame, *, source: str, seed: int = 0,
                   k: int = 20) -> list[dict]:
    """Rows {task, probe, metric, source, value} for every task and probe."""
    from cmc_kit import probes

    rows = []
    train_targets, test_targets = label_targets(train_table), label_targets(test_table)
    for task, (kind, train_y) in train_targets.items():
        if task not in test_targets:
            continue
        test_y = test_targets[task][1]
        if kind == "classification":
            accuracy = probes.knn_accuracy(train_x, train_y, test_x, test_y,
                                           k=min(k, len(train_x)), num_classes=len(CLASS_NAMES))
            rows.append(_row(task, "knn", "accuracy", source, accuracy))
            result = probes.linear_probe_classification(train_x, train_y, test_x, test_y, seed=seed)
            rows.append(_row(task, "linear", "accuracy", source, result["accuracy"]))
        else:
            result = probes.linear_probe_regression(train_x, train_y, test_x, test_y)
            rows.append(_row(task, "linear", "r2", source, result["r2"]))
    return rows


def _row(task, probe, metric, source, value) -> dict:
    return {"task": task, "probe": probe, "metric": metric, "source": source, "value": float(value)}


def evaluate_run(run: str | os.PathLike, data: str | os.PathLike | None = None, *,
                 dataset: data_module.Dataset | None = None, out: str | os.PathLike | None = None,
                 checkpoints: str = "latest", seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Probes the run's features and the baselines on its held-out split.

    Args:
        data, dataset: the run's dataset, as a folder or as a `cmc_kit.data.Dataset` found
            already (one of the two).
        out: CSV file for the wide table; an existing folder gets `evaluation.csv` inside it.
            Checked before any work (see `resolve_output`).
        checkpoints: "latest", or "all" to add a column per kept checkpoint (learning over epochs).
    Returns:
        long table: task, probe, metric, source, value. Written wide to `out` (CSV) if given.
    """
    from cmc_kit import embed, models

    if checkpoints not in ("latest", "all"):
        raise CmcKitError(f"checkpoints (CHECKPOINTS in 05_evaluate) must be 'latest' or 'all'. "
                          f"Received: {checkpoints!r}")
    out = resolve_output(out)
    handle = runs.load_run(run)
    config = handle.config
    dataset = data_module.as_dataset(data, dataset)
    train_catalog, test_catalog = run_split(handle, dataset, what="probes")
    metadata_csv = dataset.metadata_csv
    kwargs = dict(view="terrain" if "terrain" in config.model.views else config.model.views[0],
                  source="trunk", crop_size=config.data.crop_size,
                  batch_size=max(config.data.batch_size, 32), progress=progress,
                  metadata_csv=metadata_csv)

    def tables_for(encoder):
        return (embed.compute_embeddings(encoder, train_catalog, **kwargs),
                embed.compute_embeddings(encoder, test_catalog, **kwargs))

    rows = []
    train_table, test_table = tables_for(handle.encoder("online"))
    rows += probe_features(embed.embedding_matrix(train_table), embed.embedding_matrix(test_table),
                           train_table, test_table, source="trained", seed=seed)

    # Seeded locally: the same weights on every evaluation, the caller's random streams untouched.
    random_encoder = models.build_encoder(config.model, crop_size=config.data.crop_size,
                                          name="random_init", seed=config.train.seed + 12345)
    r_train, r_test = tables_for(random_encoder)
    rows += probe_features(embed.embedding_matrix(r_train), embed.embedding_matrix(r_test),
                           train_table, test_table, source="random_init", seed=seed)

    px_train = raw_pixel_features(train_catalog, config.data.crop_size)
    px_test = raw_pixel_features(test_catalog, config.data.crop_size)
    rows += probe_features(px_train, px_test, train_table, test_table, source="raw_pixels", seed=seed)

    if checkpoints == "all":
        for entry in handle.checkpoints[:-1]:
            earlier = runs.load_run(run, checkpoint=entry["path"])
            e_train, e_test = tables_for(earlier.encoder("online"))
            label = f"epoch_{entry['epoch']}" if entry["epoch"] is not None else f"step_{entry['step']}"
            rows += probe_features(embed.embedding_matrix(e_train), embed.embedding_matrix(e_test),
                                   train_table, test_table, source=label, seed=seed)

    table = pd.DataFrame(rows)
    table.attrs.update({"run": str(run), "epoch": handle.epoch, "step": handle.step,
                        "train_samples": len(train_catalog), "test_samples": len(test_catalog)})
    if out is not None:
        atomic_write_text(out, wide(table).to_csv(index=False, lineterminator="\n"))
    return table


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
    """One row per (task, probe, metric), one column per feature source (trained first)."""
    pivot = table.pivot_table(index=["task", "probe", "metric"], columns="source", values="value",
                              sort=False).reset_index()
    pivot.columns.name = None
    ordered = ["task", "probe", "metric", "trained", "random_init", "raw_pixels"]
    rest = [c for c in pivot.columns if c not in ordered]
    return pivot[[c for c in ordered if c in pivot.columns] + rest]


def format_table(table: pd.DataFrame) -> str:
    frame = wide(table)
    header = ""
    if table.attrs:
        header = (f"Held-out evaluation of {table.attrs.get('run')} (epoch {table.attrs.get('epoch')}, "
                  f"step {table.attrs.get('step')}): {table.attrs.get('train_samples')} train / "
                  f"{table.attrs.get('test_samples')} held-out samples\n")
    return header + frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")
