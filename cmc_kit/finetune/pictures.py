"""Pictures of a fine-tune: held-out terrain, its true classes and each arm's prediction side
by side, and the label-efficiency curves."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cmc_kit.finetune.arms import ARMS, VIEWS, load_arm_model
from cmc_kit.palette import PALETTE

TILE_MIN = 128  # tiles are upscaled (nearest) to at least this many pixels
GAP, HEADER, LABEL = 4, 18, 64


def _to_uint8(terrain: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> uint8 RGB (the inverse of views.normalise_terrain)."""
    return np.clip(np.rint((terrain + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _tile(rgb: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(rgb).resize((side, side), Image.NEAREST)


def prediction_picture(run: str | os.PathLike, table: pd.DataFrame, *, data=None, dataset=None,
                       labels: float | None = None, samples: int = 3) -> Image.Image:
    """Rows: the first `samples` held-out images; columns: terrain, truth, then each arm's
    prediction (palette colours) at the labelled fraction `labels` (default: the smallest)."""
    from cmc_kit import data as data_module
    from cmc_kit import evaluate, runs, views

    handle = runs.load_run(run)
    dataset = data_module.as_dataset(data, dataset)
    _, test_catalog = evaluate.run_split(handle, dataset, what="pictures")
    labels = float(table["labels"].min()) if labels is None else float(labels)
    rows = table[np.isclose(table["labels"], labels)]
    if rows.empty:
        raise ValueError(f"The table has no arm at labels={labels:g}; it has "
                         f"{sorted(set(table['labels']))}.")
    rows = rows.set_index("arm").loc[[arm for arm in ARMS if arm in set(rows["arm"])]]
    crop = int(rows["eval_crop_size"].iloc[0])
    batch = next(iter(views.make_dataset(test_catalog.head(samples), views=VIEWS,
                                         crop_size=crop, batch_size=samples, training=False,
                                         seed=0, with_ids=True)))
    columns = {"terrain": _to_uint8(batch["terrain"].numpy()),
               "truth": PALETTE[np.argmax(batch["segmentation"].numpy(), axis=-1)]}
    for arm, row in rows.iterrows():
        model = load_arm_model(handle, row["folder"])
        predicted = np.argmax(np.asarray(model(batch["terrain"], training=False)), axis=-1)
        columns[arm] = PALETTE[predicted]                                  # [B, S, S, 3]
    ids = [i.decode() for i in batch["id"].numpy()]
    return _grid(columns, ids, title=f"labels {labels:g} "
                                     f"({int(rows['labelled_samples'].iloc[0])} samples)")


def _grid(columns: dict[str, np.ndarray], ids: list[str], *, title: str) -> Image.Image:
    count, crop = len(ids), next(iter(columns.values())).shape[1]
    side = crop * max(1, -(-TILE_MIN // crop))
    width = LABEL + len(columns) * (side + GAP)
    picture = Image.new("RGB", (width, 2 * HEADER + count * (side + GAP)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((4, 2), title, fill="black")
    for column, (name, images) in enumerate(columns.items()):
        x = LABEL + column * (side + GAP)
        draw.text((x, HEADER + 2), name, fill="black")
        for row in range(count):
            picture.paste(_tile(images[row], side), (x, 2 * HEADER + row * (side + GAP)))
    for row, sample_id in enumerate(ids):
        draw.text((4, 2 * HEADER + row * (side + GAP) + side // 2), sample_id, fill="black")
    return picture


def label_efficiency_figure(table: pd.DataFrame):
    """Mean IoU (with its bootstrap std) against the labelled fraction, one line per arm."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for arm in [a for a in ARMS if a in set(table["arm"])]:
        rows = table[table["arm"] == arm].sort_values("labels")
        figure.add_trace(go.Scatter(x=rows["labels"], y=rows["mean_iou"], name=arm,
                                    mode="lines+markers",
                                    error_y={"type": "data", "array": rows["mean_iou_std"]}))
    figure.update_layout(template="plotly_white", width=720, height=420,
                         xaxis={"title": "labelled fraction of the training split",
                                "type": "log"},
                         yaxis={"title": "held-out mean IoU"},
                         title="Label efficiency: segmentation from the learned trunk")
    return figure
