"""Per-sample embeddings of a trained encoder, with metadata, as a pandas table; UMAP layouts.

Table format (written by `save_table`, read by `load_table`, also used for the trainer's
`RUN/embeddings/epoch_NNN.parquet`), one row per sample:

- `id`: the sample id (string, e.g. "0042")
- `emb_0 .. emb_{D-1}`: the embedding, float32
- `fraction_<class>` for the 7 classes: share of pixels of each class in the segmentation of the
  SAME centre crop the encoder saw (the centre crop, also when `view="overview"`)
- `dominant_class` (name) and `dominant_class_id` (0..6): the class with the largest fraction
- `height_mean`, `height_std`: of the centre crop's height map, in raw 16-bit PNG units (0..65535)
- any column of `metadata.csv` beside the dataset (the synthetic generator's parameters); a name
  that clashes with one above is kept as `meta_<name>` (e.g. the generator's whole-image
  `fraction_water` becomes `meta_fraction_water`)
- `split` ("train"/"validation") when the table came from `embed_run`
- `window` (0..grid^2-1) with `compute_embeddings(grid=...)`: one row per crop of a grid over
  each sample (`cmc_kit.views.window_corners`), the labels of that crop; ids then repeat

`table.attrs` carries provenance (source, view, network, checkpoint, epoch, step); Parquet keeps
it, CSV does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from cmc_kit import data as data_module
from cmc_kit import features, layout, probes, runs
from cmc_kit.config import ALL_VIEWS
from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.fileio import atomic_path
from cmc_kit.palette import CLASS_NAMES, FRACTION_COLUMNS, HEIGHT_SCALE, NUM_CLASSES

EMBEDDING_PREFIX = "emb_"
NETWORKS = ("online", "momentum")
# config.ALL_VIEWS lists the names of views.VIEW_SPECS (tested) without importing TensorFlow.
EMBEDDABLE_VIEWS = ALL_VIEWS


# -- computing embeddings -------------------------------------------------------------------

def compute_embeddings(encoder, catalog: pd.DataFrame, *, view: str = "terrain",
                       source: str = "trunk", crop_size: int, batch_size: int = 32,
                       progress: bool = True,
                       metadata_csv: str | os.PathLike | None = None,
                       grid: int = 1) -> pd.DataFrame:
    """Embeds every sample of `catalog` in one batched pass over deterministic centre crops.

    Args:
        encoder: a `cmc_kit.models` encoder: `encoder.embed(x, view=view)` (or, without that
            method, `encoder({view: x})[view]`) -> [B, D] head embeddings,
            `encoder.encode_features(x, view=view)` -> [B, F] mean-pooled trunk features.
        catalog: DataFrame with `id, terrain, height, segmentation` (see `cmc_kit.data.discover`).
        view: which input the encoder embeds: a centre-crop view or "overview".
        source: "trunk" (the last stage, mean-pooled: the original's UMAP embedding),
            "stages" (every stage, mean and std per channel), "stage<N>" (stage N, mean and
            std per channel) or "head" (see `cmc_kit.features.SOURCES`).
        crop_size: crop side in pixels (the run's `data.crop_size`).
        batch_size: samples per batch; memory holds the embeddings plus one batch.
        progress: show a keras Progbar.
        metadata_csv: optional `metadata.csv` whose columns are joined on `id`.
        grid: embed grid x grid crops of each sample (a tiling, see `views.window_corners`)
            instead of its centre crop: a row per crop, with a `window` column.
    Returns:
        DataFrame in the table format of this module's docstring, in catalog order (a sample's
        windows in a row).
    """
    features.check_source(source)
    if view not in EMBEDDABLE_VIEWS:
        raise CmcKitError(f"Embedding view must be one of {EMBEDDABLE_VIEWS}. "
                          f"Received: view={view!r}")
    if len(catalog) == 0:
        raise DataError("The catalog to embed is empty: check the data folder and the split "
                        "(e.g. --split all when the validation split holds no samples).")
    if batch_size < 1:
        raise CmcKitError(f"batch_size must be >= 1. Received: batch_size={batch_size}")

    from cmc_kit import views as views_module  # TensorFlow is imported only when embedding

    # Segmentation and height ride along for the metadata even when the encoder ignores them.
    needed_views = tuple(dict.fromkeys((view, "segmentation", "height")))
    dataset = views_module.make_dataset(catalog, views=needed_views, crop_size=crop_size,
                                        batch_size=batch_size, training=False, seed=0,
                                        with_ids=True, grid=grid)
    progbar = None
    if progress:
        import keras
        progbar = keras.utils.Progbar(len(catalog) * grid * grid,
                                      unit_name="sample" if grid == 1 else "crop")

    features_of = features.feature_function(encoder, view=view, source=source)
    ids, windows, embeddings, fractions, height_means, height_stds = [], [], [], [], [], []
    seen = 0
    for batch in dataset:
        x = batch[view]  # [B, H, W, C]
        embeddings.append(features_of(x))  # [B, F]
        ids.extend(_decode_ids(batch["id"]))
        if grid > 1:
            windows.append(np.asarray(batch["window"], dtype=np.int64))
        segmentation = np.asarray(batch["segmentation"], dtype=np.float32)  # [B, H, W, 7]
        fractions.append(segmentation.mean(axis=(1, 2)))  # [B, 7]
        raw_height = (np.asarray(batch["height"], dtype=np.float64) + 1.0) * HEIGHT_SCALE
        height_means.append(raw_height.mean(axis=(1, 2, 3)))  # [B]
        height_stds.append(raw_height.std(axis=(1, 2, 3)))
        seen += len(embeddings[-1])
        if progbar is not None:
            progbar.update(seen)

    matrix = np.concatenate(embeddings, axis=0)  # [N, D]
    if matrix.ndim != 2:
        raise CmcKitError(f"The encoder's {source} output for view {view!r} has shape "
                          f"{matrix.shape}; expected [batch, features]. Check the encoder.")
    broken = ~np.all(np.isfinite(matrix), axis=1)
    if broken.any():
        raise CmcKitError(f"{int(broken.sum())} of {len(matrix)} embeddings are not finite (NaN "
                          f"or inf), e.g. sample {np.asarray(ids)[broken][0]}: the encoder's "
                          "weights are damaged. Use an earlier checkpoint (--checkpoint) or "
                          "train again.")
    table = embeddings_frame(ids, matrix)
    if grid > 1:
        table.insert(1, "window", np.concatenate(windows))
    fraction_matrix = np.concatenate(fractions, axis=0)  # [N, 7]
    for class_id, column in enumerate(FRACTION_COLUMNS):
        table[column] = fraction_matrix[:, class_id].astype(np.float32)
    dominant = fraction_matrix.argmax(axis=1)
    table["dominant_class_id"] = dominant.astype(np.int64)
    table["dominant_class"] = np.asarray(CLASS_NAMES, dtype=object)[dominant]
    table["height_mean"] = np.concatenate(height_means).astype(np.float32)
    table["height_std"] = np.concatenate(height_stds).astype(np.float32)
    if metadata_csv is not None:
        table = join_metadata(table, layout.read_metadata(metadata_csv))
    table.attrs.update({"source": source, "view": view, "crop_size": int(crop_size),
                        "grid": int(grid)})
    return table


def embed_run(run: str | os.PathLike, data: str | os.PathLike | None = None, *,
              dataset: data_module.Dataset | None = None, split: str = "validation",
              source: str = "trunk", view: str = "terrain", network: str = "online",
              checkpoint: str | os.PathLike | None = None, progress: bool = True) -> pd.DataFrame:
    """Embeds a run's own split of a dataset with the online or momentum network of a checkpoint.

    The dataset is `data` (a folder) or `dataset` (a `cmc_kit.data.Dataset` found already).
    `split` is "validation", "train" or "all" (both, with a `split` column saying which);
    `checkpoint` None means the latest. The dataset's metadata.csv is joined when present.
    """
    if network not in NETWORKS:
        raise CmcKitError(f"--network must be one of {NETWORKS}. Received: {network!r}")
    if split not in ("validation", "train", "all"):
        raise CmcKitError(f"split (--split, SPLIT in 04_explore) must be 'validation', 'train' "
                          f"or 'all'. Received: {split!r}")
    checkpoint = runs.resolve_checkpoint(run, checkpoint)
    handle = runs.load_run(run, checkpoint=checkpoint)
    model_views = tuple(handle.config.model.views)
    if view not in model_views:
        raise CmcKitError(f"--view {view!r} was not trained in run {run} (its views: "
                          f"{', '.join(model_views)}). Pick one of those.")
    found = data_module.as_dataset(data, dataset)
    parts = handle.split(found.catalog)
    names = ("train", "validation") if split == "all" else (split,)
    catalog = pd.concat([parts[name].assign(split=name) for name in names], ignore_index=True)
    if len(catalog) == 0:
        raise DataError(f"Split {split!r} of {found.root} is empty for run {run}. Use --split all "
                        "or a dataset with more samples.")
    table = compute_embeddings(handle.encoder(network), catalog, view=view, source=source,
                               crop_size=handle.config.data.crop_size,
                               batch_size=handle.config.data.batch_size, progress=progress,
                               metadata_csv=found.metadata_csv)
    split_by_id = dict(zip(catalog["id"].astype(str), catalog["split"]))
    table["split"] = table["id"].map(split_by_id)
    table.attrs.update({"run": str(run), "network": network, "split": split,
                        "checkpoint": str(checkpoint) if checkpoint else "latest",
                        "epoch": handle.epoch, "step": handle.step})
    return table


class EpochEmbeddings(keras.callbacks.Callback):
    """After every epoch: the run's fixed held-out subset embedded by the online network (trunk
    features of the first view's centre crop), saved as RUN/embeddings/epoch_NNN.parquet (the
    explorer's embedding over epochs), and its kNN accuracy on the dominant class, against
    training samples, added to the epoch's log row as `knn_accuracy`.

    The run's settings decide: train.eval_subset (how many held-out samples; 0 turns this off)
    and train.knn_every_epoch. Pass it to `training.train(callbacks=[...])` ahead of callbacks
    that show the row (e.g. `notebook.LiveLossPlot`).
    """

    def __init__(self):
        super().__init__()
        self.trainer = None

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        trainer = self.trainer
        tc = trainer.config.train
        held_out = trainer.eval_catalog
        if logs is None or held_out is None or len(held_out) == 0 or tc.eval_subset <= 0:
            return
        options = dict(view=trainer.config.model.views[0], source="trunk",
                       crop_size=trainer.config.data.crop_size,
                       batch_size=max(trainer.global_batch, 16), progress=False)
        table = compute_embeddings(trainer.online, held_out.iloc[:tc.eval_subset],
                                   metadata_csv=trainer.metadata_csv, **options)
        save_table(table, runs.epoch_table_path(trainer.run_dir, epoch + 1))
        if not tc.knn_every_epoch:
            return
        bank = compute_embeddings(
            trainer.online, trainer.train_catalog.iloc[:max(2 * tc.eval_subset, 32)], **options)
        accuracy = probes.knn_accuracy(
            embedding_matrix(bank), bank["dominant_class_id"].to_numpy(), embedding_matrix(table),
            table["dominant_class_id"].to_numpy(), k=min(20, len(bank)), num_classes=NUM_CLASSES)
        logs["knn_accuracy"] = round(accuracy, 4)


def embeddings_frame(ids, matrix: np.ndarray) -> pd.DataFrame:
    """A table with `id` and `emb_0..emb_{D-1}` columns from ids [N] and a matrix [N, D]."""
    matrix = np.asarray(matrix, dtype=np.float32)
    columns = {f"{EMBEDDING_PREFIX}{i}": matrix[:, i] for i in range(matrix.shape[1])}
    return pd.DataFrame({"id": [str(i) for i in ids], **columns})


def _decode_ids(id_tensor) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value)
            for value in np.asarray(id_tensor).tolist()]


# -- metadata --------------------------------------------------------------------------------

def join_metadata(table: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """Left-joins metadata on id; "7" and "0007" match. Clashing names get a `meta_` prefix."""
    metadata = metadata.rename(columns={c: f"meta_{c}" for c in metadata.columns
                                        if c != "id" and c in table.columns})
    keys = metadata["id"].map(_id_key)
    metadata = metadata.drop(columns="id").assign(_key=keys.values)
    metadata = metadata.drop_duplicates("_key")
    joined = table.assign(_key=table["id"].map(_id_key)).merge(metadata, on="_key", how="left")
    joined = joined.drop(columns="_key")
    joined.attrs = dict(table.attrs)
    return joined


def _id_key(value: Any) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


# -- table helpers -----------------------------------------------------------------------------

def embedding_columns(table: pd.DataFrame) -> list[str]:
    """The `emb_<i>` column names in index order."""
    columns = [c for c in table.columns if c.startswith(EMBEDDING_PREFIX)
               and c[len(EMBEDDING_PREFIX):].isdigit()]
    if not columns:
        raise CmcKitError("The table has no emb_<i> columns: it is not an embeddings table "
                          "(make one with cmc_kit.embed.compute_embeddings or `cmc-kit embed`).")
    return sorted(columns, key=lambda c: int(c[len(EMBEDDING_PREFIX):]))


def embedding_matrix(table: pd.DataFrame) -> np.ndarray:
    """The embeddings as float32 [N, D], in row order."""
    return table[embedding_columns(table)].to_numpy(dtype=np.float32)


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """Every column except id and the embedding."""
    embedding = set(c for c in table.columns if c.startswith(EMBEDDING_PREFIX))
    return [c for c in table.columns if c != "id" and c not in embedding]


def save_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes a table as .parquet (keeps `table.attrs`) or .csv, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise CmcKitError(f"Cannot write embeddings to {path}: use a .parquet or .csv file name.")
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return path


def is_embeddings_table(path: str | os.PathLike) -> bool:
    """True when `path` is an embeddings table that `save_table` wrote (id and emb_ columns)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            with open(path, encoding="utf-8", errors="replace") as handle:
                columns = handle.readline().strip().split(",")
    except (OSError, ValueError):
        return False
    return "id" in columns and f"{EMBEDDING_PREFIX}0" in columns


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Reads a table written by `save_table`; ids stay strings, embeddings float32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Embeddings file {path} does not exist. Create it with "
                        "`cmc-kit embed --run RUN --data DATA --out FILE`.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
        elif suffix == ".csv":
            table = pd.read_csv(path, dtype={"id": str})
        else:
            raise CmcKitError(f"Cannot read embeddings from {path}: expected .parquet or .csv.")
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read embeddings file {path}: {err}. Recreate it with "
                        "`cmc-kit embed`.") from err
    if "id" not in table.columns:
        raise DataError(f"Embeddings file {path} has no 'id' column. Recreate it with "
                        "`cmc-kit embed`.")
    table["id"] = table["id"].astype(str)
    columns = embedding_columns(table)
    table[columns] = table[columns].astype(np.float32)
    return table


# -- UMAP ----------------------------------------------------------------------------------------

def umap_layout(embeddings: np.ndarray, *, n_components: int = 2, n_neighbors: int = 15,
                min_dist: float = 0.1, metric: str = "cosine", seed: int = 0,
                cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """UMAP of embeddings [N, D] -> float32 [N, n_components], cached on disk.

    The cache key hashes the embedding values (so a different checkpoint, source or view is a
    different entry) and every parameter. `n_neighbors` is clipped to N - 1 so small tables work.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise CmcKitError(f"umap_layout expects a non-empty [N, D] matrix. "
                          f"Received shape={embeddings.shape}")
    if n_components < 1 or n_neighbors < 2 or min_dist < 0:
        raise CmcKitError("umap_layout needs n_components >= 1, n_neighbors >= 2, min_dist >= 0. "
                          f"Received: n_components={n_components}, n_neighbors={n_neighbors}, "
                          f"min_dist={min_dist}")
    count = len(embeddings)
    parameters = {"n_components": int(n_components), "n_neighbors": int(n_neighbors),
                  "min_dist": float(min_dist), "metric": metric, "seed": int(seed)}
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        digest.update(str(embeddings.shape).encode())
        digest.update(embeddings.tobytes())
        digest.update(json.dumps(parameters, sort_keys=True).encode())
        cache_path = Path(cache_dir) / f"umap-{digest.hexdigest()[:24]}.npy"
        if cache_path.is_file():
            try:
                cached = np.load(cache_path)
                if cached.shape == (count, n_components):
                    return cached
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed and overwritten

    if count <= n_components + 1:
        # Too few points for a neighbour graph: place them on a small circle, in row order.
        angles = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
        layout = np.zeros((count, n_components), dtype=np.float32)
        layout[:, 0] = np.cos(angles) if count > 1 else 0.0
        if n_components > 1:
            layout[:, 1] = np.sin(angles) if count > 1 else 0.0
    else:
        import warnings

        import umap

        reducer = umap.UMAP(n_components=n_components, n_neighbors=min(n_neighbors, count - 1),
                            min_dist=min_dist, metric=metric, random_state=seed,
                            # the spectral initialisation fails on tiny graphs
                            init="spectral" if count > 2 * n_components + 8 else "random")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "n_jobs overridden by random_state"
            layout = np.asarray(reducer.fit_transform(embeddings), dtype=np.float32)

    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            np.save(tmp, layout)
    return layout
