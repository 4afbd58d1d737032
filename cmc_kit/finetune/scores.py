"""Segmentation scores: confusion matrices, pixel accuracy and (mean) IoU, with a bootstrap
over held-out images for their uncertainty. NumPy only, apart from `score_model`.

Confusion matrix C [K, K]: rows are the true class, columns the predicted one, counts of pixels.
    pixel accuracy = trace(C) / sum(C)
    IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])   (TP / (TP + FN + FP))
    mean IoU = the mean of IoU_k over the classes present in the truth or the prediction
               (a class absent from both has no IoU: NaN, left out of the mean)
"""

from __future__ import annotations

import numpy as np

from cmc_kit.palette import CLASS_NAMES, NUM_CLASSES

BOOTSTRAP_RESAMPLES = 200


def image_confusions(truth: np.ndarray, predicted: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Per-image confusion matrices: class ids [B, H, W] twice -> int64 [B, K, K]."""
    truth, predicted = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    if truth.shape != predicted.shape or truth.ndim < 1:
        raise ValueError(f"truth and predicted must be class-id arrays of one shape [B, ...]. "
                         f"Received: {truth.shape} and {predicted.shape}")
    for name, ids in (("truth", truth), ("predicted", predicted)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} holds class ids outside [0, {num_classes}). Received: "
                             f"min={ids.min()}, max={ids.max()}")
    batch = truth.shape[0]
    cells = num_classes * num_classes
    # One bincount for the whole batch: image b's cell (t, p) is b*K*K + t*K + p.
    flat = (np.arange(batch)[:, None] * cells
            + (truth * num_classes + predicted).reshape(batch, -1))
    counts = np.bincount(flat.ravel(), minlength=batch * cells)
    return counts.reshape(batch, num_classes, num_classes)


def confusion_matrix(truth, predicted, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixel confusion matrix int64 [K, K] (rows: truth, columns: prediction) of any shape."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return image_confusions(truth.reshape(1, -1), predicted.reshape(1, -1), num_classes)[0]


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class, float64 [K]; NaN for a class in neither the truth nor the prediction."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=1) + confusion.sum(axis=0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def segmentation_scores(confusion: np.ndarray, class_names=CLASS_NAMES) -> dict:
    """{"pixel_accuracy", "mean_iou", "iou_<class>" ...} of a confusion matrix [K, K]."""
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum()
    if total == 0:
        raise ValueError("The confusion matrix is empty: no pixel was scored.")
    iou = class_iou(confusion)
    scores = {"pixel_accuracy": float(np.trace(confusion) / total),
              "mean_iou": float(np.nanmean(iou))}
    scores.update({f"iou_{name}": float(value) for name, value in zip(class_names, iou)})
    return scores


def bootstrap_std(confusions: np.ndarray, *, seed: int = 0,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Standard deviation of pixel accuracy and mean IoU over images resampled with
    replacement: per-image confusions [N, K, K] -> {"pixel_accuracy_std", "mean_iou_std"}.

    It measures how much the scores depend on which held-out images there are, not how much
    they vary between training runs.
    """
    confusions = np.asarray(confusions)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(confusions), size=(resamples, len(confusions)))
    accuracy, mean_iou = [], []
    for pick in picks:
        scores = segmentation_scores(confusions[pick].sum(axis=0))
        accuracy.append(scores["pixel_accuracy"])
        mean_iou.append(scores["mean_iou"])
    return {"pixel_accuracy_std": float(np.std(accuracy)), "mean_iou_std": float(np.std(mean_iou))}


def score_model(model, catalog, *, crop_size: int, batch_size: int) -> dict:
    """Scores a segmentation model on the centre crops of a catalog's samples.

    Returns the `segmentation_scores` of all pixels, their `bootstrap_std`, "held_out_loss"
    (mean per-pixel cross-entropy) and "images"; "confusions" holds the per-image matrices.
    """
    import tensorflow as tf

    from cmc_kit import views

    dataset = views.make_dataset(catalog, views=("terrain", "segmentation"), crop_size=crop_size,
                                 batch_size=batch_size, training=False, seed=0)
    confusions, losses, pixels = [], 0.0, 0
    for batch in dataset:
        logits = model(batch["terrain"], training=False)                   # [B, S, S, 7]
        truth = tf.argmax(batch["segmentation"], axis=-1)                 # [B, S, S]
        loss = tf.nn.softmax_cross_entropy_with_logits(batch["segmentation"], logits)
        losses += float(tf.reduce_sum(loss))
        pixels += int(tf.size(loss))
        confusions.append(image_confusions(truth.numpy(), tf.argmax(logits, axis=-1).numpy()))
    if not confusions:
        raise ValueError("No held-out sample could be read: nothing to score.")
    confusions = np.concatenate(confusions)                                # [N, K, K]
    result = segmentation_scores(confusions.sum(axis=0))
    result.update(bootstrap_std(confusions))
    result.update(held_out_loss=losses / pixels, images=len(confusions), confusions=confusions)
    return result
