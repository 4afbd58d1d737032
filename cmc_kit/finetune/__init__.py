"""Fine-tune: a light segmentation decoder over a run's learned trunk, and the label-efficiency
table that says whether the pretraining pays for itself downstream.

For each fraction of labelled training samples (one seeded draw, nested: the same subset for
every arm) three arms train the same seeded decoder (`segmenter`) with the same batches, steps
and learning rate:

    frozen       the run's terrain stem + trunk, frozen: only the decoder learns
    finetuned    the run's terrain stem + trunk, everything learns
    random_init  the weights the run started from (its random initialisation), everything learns

Every (arm, fraction) trains for the same number of steps of the same batch size, `epochs`
passes' worth of the whole training split: a smaller labelled subset is repeated (each repeat
with its own random crops) to the size of the training split.
Each is scored once, after its last step, on the run's held-out split: pixel accuracy and mean
IoU of the 7 classes (per class too, `scores`) over the held-out images, centre-cropped to the
largest multiple of the encoder's stride. The held-out split is never read for training or for
choosing anything. Arms are checkpointed under RUN/finetune/ (`arms`): a rerun continues an
unfinished arm and skips finished ones.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from cmc_kit import runs
from cmc_kit.errors import CheckpointError, ConfigError
from cmc_kit.fileio import atomic_write_text, output_file_path
from cmc_kit.finetune.arms import (ARMS, arm_settings, labelled_subset, load_arm_encoder,
                                  load_arm_model, run_arm)
from cmc_kit.finetune.pictures import label_efficiency_figure, prediction_picture
from cmc_kit.finetune.scores import (class_iou, confusion_matrix, image_confusions,
                                     segmentation_scores)
from cmc_kit.finetune.segmenter import build_segmentation_model

DEFAULT_LABELS = (0.01, 0.1, 1.0)
DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 1e-3
TABLE_FILE = "label_efficiency.csv"  # RUN/finetune/label_efficiency.csv unless --out says


def parse_labels(labels) -> tuple[float, ...]:
    """"0.01,0.1,1" or a sequence of numbers -> sorted distinct fractions in (0, 1]."""
    text = labels if isinstance(labels, str) else ",".join(map(str, labels))
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fractions = []
    if not fractions or any(not (0.0 < f <= 1.0) or math.isnan(f) for f in fractions):
        raise ConfigError(f"--labels (LABELS) must be fractions of the labelled training "
                          f"samples in (0, 1], comma-separated, e.g. 0.01,0.1,1. Received: "
                          f"{text!r}")
    return tuple(sorted(set(fractions)))


def check_arms(arms) -> tuple[str, ...]:
    arms = tuple(arms)
    if not arms or any(arm not in ARMS for arm in arms):
        raise ConfigError(f"arms must be names from {', '.join(ARMS)}. Received: {arms!r}")
    return tuple(arm for arm in ARMS if arm in arms)


def _positive(name: str, value, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            kind is int and int(value) != value):
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{name} must be {what}. Received: {value!r}")
    return kind(value)


def resolve_output(out: str | os.PathLike | None, run: str | os.PathLike) -> Path:
    """Where the table goes: `out` (a folder gets label_efficiency.csv), else RUN/finetune/."""
    if out is None:
        return Path(run) / runs.FINETUNE_DIR / TABLE_FILE
    return output_file_path(out, "--out", TABLE_FILE, (".csv",))


def _require_terrain(handle) -> None:
    views = handle.config.model.views
    if "terrain" not in views:
        raise CheckpointError(f"{handle.run_dir} was trained on the views {', '.join(views)} "
                              "without 'terrain': the segmentation decoder reads the terrain "
                              "view. Fine-tune a run whose model.views includes terrain.")


def _eval_crop_size(test_catalog: pd.DataFrame, stride: int, requested: int | None) -> int:
    """The largest multiple of `stride` inside the held-out images (or `requested`, checked)."""
    from PIL import Image

    with Image.open(test_catalog["terrain"].iloc[0]) as image:
        side = min(image.size)
    crop = requested if requested is not None else side // stride * stride
    if crop < stride or crop % stride or crop > side:
        raise ConfigError(f"The fine-tune's evaluation crop ({crop}) must be a multiple of the "
                          f"encoder's stride {stride} between {stride} and the held-out images' "
                          f"side {side}. Choose eval_crop_size accordingly (default: "
                          f"{side // stride * stride}).")
    return crop


def _base_settings(handle, encoder_stride: int, train_size: int, test_catalog, *, epochs,
                   batch_size, learning_rate, seed, eval_crop_size, decoder_channels) -> dict:
    """The settings every arm shares (all of them part of each arm's key)."""
    config = handle.config
    batch_size = _positive("batch_size", batch_size or config.data.batch_size)
    crop_size = config.data.crop_size
    if crop_size % encoder_stride:
        raise ConfigError(f"The run's data.crop_size ({crop_size}) is not a multiple of its "
                          f"encoder's stride ({encoder_stride}), which the decoder's skip "
                          "connections need. Fine-tune a run trained on such crops.")
    steps = _positive("epochs", epochs) * max(1, train_size // batch_size)
    return {"epochs": epochs, "steps": steps, "batch_size": batch_size, "crop_size": crop_size,
            "epoch_size": train_size,
            "eval_crop_size": _eval_crop_size(test_catalog, encoder_stride, eval_crop_size),
            "learning_rate": _positive("learning_rate", learning_rate, float),
            "seed": int(seed), "decoder_channels": decoder_channels}


def finetune_run(run: str | os.PathLike, data: str | os.PathLike | None = None, *,
                 dataset=None, labels=DEFAULT_LABELS, epochs: int = DEFAULT_EPOCHS,
                 out: str | os.PathLike | None = None, checkpoint: str | None = None,
                 arms=ARMS, batch_size: int | None = None,
                 learning_rate: float = DEFAULT_LEARNING_RATE, seed: int = 0,
                 eval_crop_size: int | None = None, checkpoint_every: int | None = None,
                 decoder_channels: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Trains and scores every (fraction, arm) on `run`'s split of `data`; writes the table.

    Args:
        labels: fractions in (0, 1] of the training split that keep their labels.
        epochs: the budget of every arm, in passes' worth of the whole training split.
        checkpoint: the pretrained weights (`ckpt-3`, `3` or a path); None is the latest.
        batch_size: default the run's data.batch_size; crops are the run's data.crop_size.
        checkpoint_every: steps between an arm's checkpoints (default: one pass's worth).
    Returns:
        one row per (labels, arm): labelled_samples, steps, pixel_accuracy(_std),
        mean_iou(_std), held_out_loss, iou_<class>..., images, pretrained_checkpoint, folder.
        Written to `out` (default RUN/finetune/label_efficiency.csv).
    """
    from cmc_kit import data as data_module
    from cmc_kit import evaluate, models

    fractions, arms = parse_labels(labels), check_arms(arms)
    out = resolve_output(out, run)
    handle = runs.load_run(run, checkpoint=runs.resolve_checkpoint(run, checkpoint))
    _require_terrain(handle)
    dataset = data_module.as_dataset(data, dataset)
    train_catalog, test_catalog = evaluate.run_split(handle, dataset, what="fine-tune scores")
    stride = models.input_stride(handle.config.model.trunk)
    base = _base_settings(handle, stride, len(train_catalog), test_catalog, epochs=epochs,
                          batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                          eval_crop_size=eval_crop_size, decoder_channels=decoder_channels)
    # Not part of the key: how often an arm is saved does not change what it learns.
    every = _positive("checkpoint_every", checkpoint_every or max(1, base["steps"] // epochs))
    rows = []
    for fraction in fractions:
        subset = labelled_subset(train_catalog, fraction, seed)
        for arm in arms:
            settings = arm_settings(handle, arm, fraction, subset, base)
            rows.append(run_arm(handle, settings, subset, test_catalog,
                                checkpoint_every=every, progress=progress))
    table = pd.DataFrame(rows)
    table.attrs.update({"run": str(run), "checkpoint": Path(handle.checkpoint_path).name,
                        "epoch": handle.epoch, "step": handle.step,
                        "train_samples": len(train_catalog), "test_samples": len(test_catalog),
                        "eval_crop_size": base["eval_crop_size"], "steps": base["steps"]})
    atomic_write_text(out, table.to_csv(index=False, lineterminator="\n"))
    table.attrs["out"] = str(out)
    return table


def format_table(table: pd.DataFrame) -> str:
    """Rows: labelled fraction; columns: arms; cells: mean IoU ± bootstrap std (pixel accuracy)."""
    cells = table.assign(cell=[f"{r.mean_iou:.3f} ± {r.mean_iou_std:.3f} ({r.pixel_accuracy:.3f})"
                               for r in table.itertuples()])
    wide = cells.pivot_table(index=["labels", "labelled_samples"], columns="arm", values="cell",
                             aggfunc="first", sort=False)
    wide = wide[[arm for arm in ARMS if arm in wide.columns]].reset_index()
    wide.columns.name = None
    header = ""
    if table.attrs:
        a = table.attrs
        header = (f"Label efficiency of {a.get('run')} (pretrained: {a.get('checkpoint')}, epoch "
                  f"{a.get('epoch')}, step {a.get('step')}): {a.get('train_samples')} training "
                  f"samples, {a.get('steps')} steps per arm; scored on {a.get('test_samples')} "
                  f"held-out images ({a.get('eval_crop_size')} px centre crops).\n"
                  "Cells: mean IoU ± bootstrap std over held-out images (pixel accuracy).\n")
    return header + wide.to_string(index=False)


__all__ = ["ARMS", "DEFAULT_LABELS", "DEFAULT_EPOCHS", "TABLE_FILE", "finetune_run",
           "format_table", "parse_labels", "check_arms", "resolve_output", "labelled_subset",
           "build_segmentation_model", "load_arm_model", "load_arm_encoder",
           "confusion_matrix", "image_confusions",
           "class_iou", "segmentation_scores", "label_efficiency_figure", "prediction_picture"]
