"""Probes on frozen features: weighted kNN and linear probes (NumPy + scikit-learn only).

Everything that is fitted (neighbour bank, scaler, regularisation strength) is fitted on the
training split alone; the test split is only ever transformed and scored.

- `knn_scores` / `knn_classify` / `knn_accuracy`: cosine-similarity kNN with votes weighted by
  exp(sim / T), summed per class, as solo-learn's `WeightedKNNClassifier` (Wu et al. 2018).
- `knn_regress`: the same neighbours and weights, averaging the neighbours' targets.
- `linear_probe_classification`: StandardScaler + LogisticRegression, C chosen by stratified
  cross-validation on the training split.
- `linear_probe_regression`: StandardScaler + RidgeCV (efficient leave-one-out on train, one
  strength per target, up to strong regularisation); several targets are scored by the
  variance-weighted R^2, so a rare target with a tiny variance cannot sink the mean.
- `bootstrap_interval` / `seed_interval`: 95% intervals over held-out samples (predictions
  fixed) or over independent runs.
- `groups` (the linear probes, `bootstrap_interval`): rows that share a label (crops of one
  image) stay together in cross-validation folds and in bootstrap draws.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from cmc_kit.errors import ProbeError

DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Up to 1e7: on standardised features that predicts the training mean, so a probe on features
# that carry nothing about a target scores R^2 near 0 instead of overfitting far below it.
DEFAULT_ALPHA_GRID = tuple(np.logspace(-2, 7, 19))
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


# -- kNN -------------------------------------------------------------------------------------

def knn_scores(train_features, train_labels, test_features, *, k=20, temperature=0.07,
               num_classes=None, chunk_size=1024) -> np.ndarray:
    """Temperature-weighted kNN class scores.

    Args:
        train_features: [N, D] bank of features (any scale; cosine similarity is used).
        train_labels: [N] integer class ids in [0, num_classes).
        test_features: [M, D] queries.
        k: neighbours per query (capped at N).
        temperature: T in the vote weight exp(sim / T).
        num_classes: number of classes C; default max(train_labels) + 1.
        chunk_size: test rows per similarity block (bounds memory to chunk_size x N).
    Returns:
        float64 [M, C]: each row's weighted votes per class, normalised to sum to 1. The
        argmax equals solo-learn's prediction (its unnormalised sums differ by a per-row factor).
    """
    train, test = _feature_pair(train_features, test_features, "train_features", "test_features")
    labels = _labels(train_labels, "train_labels", len(train))
    if labels.dtype.kind not in "iu":
        raise ProbeError("knn_scores needs integer class ids in train_labels. "
                         f"Received: dtype={labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ProbeError(f"train_labels must be class ids >= 0. Received: min={labels.min()}")
    needed = int(labels.max()) + 1
    if num_classes is None:
        num_classes = needed
    elif num_classes < needed:
        raise ProbeError(f"num_classes={num_classes} is smaller than the largest train label + 1 "
                         f"({needed}). Pass num_classes >= {needed} or leave it as None.")
    scores = []
    for top_similarity, top_index in _neighbours(train, test, k=k, temperature=temperature,
                                                 chunk_size=chunk_size):
        weights = _vote_weights(top_similarity, temperature)  # [m, k], rows sum to 1
        rows = np.arange(len(weights))[:, None]                # [m, 1]
        flat = (rows * num_classes + labels[top_index]).ravel()
        votes = np.bincount(flat, weights=weights.ravel(), minlength=len(weights) * num_classes)
        scores.append(votes.reshape(len(weights), num_classes))
    return np.concatenate(scores, axis=0)


def knn_classify(train_features, train_labels, test_features, *, k=20, temperature=0.07,
                 num_classes=None, chunk_size=1024) -> np.ndarray:
    """Predicted class ids [M] (int64) of the weighted kNN; see `knn_scores`."""
    scores = knn_scores(train_features, train_labels, test_features, k=k,
                        temperature=temperature, num_classes=num_classes, chunk_size=chunk_size)
    return np.argmax(scores, axis=1)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k=20,
                 temperature=0.07, num_classes=None, chunk_size=1024) -> float:
    """Top-1 accuracy of `knn_classify` on labelled test features."""
    test_rows = len(_features(test_features, "test_features"))
    test_labels = _labels(test_labels, "test_labels", test_rows)
    predictions = knn_classify(train_features, train_labels, test_features, k=k,
                               temperature=temperature, num_classes=num_classes,
                               chunk_size=chunk_size)
    return float(np.mean(predictions == test_labels))


def knn_regress(train_features, train_targets, test_features, *, k=20, temperature=0.07,
                chunk_size=1024) -> np.ndarray:
    """Weighted mean of the neighbours' targets, with the same weights as `knn_scores`.

    train_targets is [N] or [N, T]; the result is [M] or [M, T] float64.
    """
    train, test = _feature_pair(train_features, test_features, "train_features", "test_features")
    targets = _targets(train_targets, "train_targets", len(train))
    predictions = []
    for top_similarity, top_index in _neighbours(train, test, k=k, temperature=temperature,
                                                 chunk_size=chunk_size):
        weights = _vote_weights(top_similarity, temperature)  # [m, k]
        neighbour_targets = targets[top_index]                 # [m, k] or [m, k, T]
        if targets.ndim == 2:
            weights = weights[..., None]
        predictions.append(np.sum(weights * neighbour_targets, axis=1))
    return np.concatenate(predictions, axis=0)


def _neighbours(train, test, *, k, temperature, chunk_size):
    """Yields (cosine similarity [m, k'], train index [m, k']) per block of test rows.

    train [N, D] and test [M, D] are validated float64 arrays; k' = min(k, N).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ProbeError(f"k must be a positive integer. Received: k={k!r}")
    if not (isinstance(temperature, numbers.Real) and np.isfinite(temperature) and temperature > 0):
        raise ProbeError("temperature must be a positive number. "
                         f"Received: temperature={temperature!r}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
            or chunk_size < 1):
        raise ProbeError("chunk_size must be a positive integer. "
                         f"Received: chunk_size={chunk_size!r}")
    train, test = _unit_rows(train), _unit_rows(test)  # [N, D], [M, D]
    k = min(int(k), len(train))
    for start in range(0, len(test), chunk_size):
        similarity = test[start:start + chunk_size] @ train.T  # [m, N]
        if k < len(train):
            top_index = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [m, k], unordered
        else:
            top_index = np.broadcast_to(np.arange(len(train)), similarity.shape)
        yield np.take_along_axis(similarity, top_index, axis=1), top_index


def _vote_weights(top_similarity, temperature):
    # exp(sim/T) normalised per row; subtracting the row max first keeps small T finite.
    logits = top_similarity / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


# -- linear probes -----------------------------------------------------------------------------

def linear_probe_classification(train_x, train_y, test_x, test_y, *, seed=0,
                                c_grid=DEFAULT_C_GRID, folds=5, max_iter=1000,
                                groups=None) -> dict:
    """Logistic regression on standardised frozen features, C chosen by CV on train only.

    Cross-validation uses stratified folds (shuffled with `seed`); with rare classes the number
    of folds drops to the smallest class count (at least 2), and folds whose training part has a
    single class are skipped. If no fold is usable (e.g. 3 training samples), C = 1.0.
    `groups` (one label per training row, e.g. its image) keeps each group within one fold, so
    crops of one image never validate each other (which would favour weak regularisation).

    Returns:
        dict with accuracy (test top-1), C (chosen), cv_accuracy (its mean validation accuracy,
        NaN when CV was impossible), cv_folds (folds used) and predictions ([M] test predictions).
    """
    train_x, test_x = _feature_pair(train_x, test_x, "train_x", "test_x")
    train_y = _labels(train_y, "train_y", len(train_x))
    test_y = _labels(test_y, "test_y", len(test_x))
    classes, counts = np.unique(train_y, return_counts=True)
    if len(classes) < 2:
        raise ProbeError(f"The linear probe needs at least two classes in train_y; all "
                         f"{len(train_y)} training samples are class {classes[0].item()!r}. "
                         "Use more training samples (a larger data set or validation split) "
                         "or the kNN probe.")
    if not c_grid or any(not np.isfinite(c) or c <= 0 for c in c_grid):
        raise ProbeError("c_grid must list positive regularisation strengths. "
                         f"Received: c_grid={c_grid!r}")

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    units = len(train_y) if groups is None else len(_group_members(groups, len(train_y)))
    n_splits = min(int(folds), max(2, int(counts.min())), units)
    splits = []
    if counts.max() >= n_splits and units >= 2:  # else nothing to validate on
        splitter = (StratifiedKFold if groups is None else StratifiedGroupKFold)(
            n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # Classes smaller than the fold count are expected here; those folds just lack them.
            warnings.filterwarnings("ignore", message="The least populated class",
                                    category=UserWarning)
            splits = [(fit, val) for fit, val in splitter.split(train_x, train_y, groups)
                      if len(val) and len(np.unique(train_y[fit])) >= 2]

    best_c, best_score = 1.0, float("nan")
    # lbfgs makes many small BLAS calls: one thread avoids the thread hand-offs that dominate
    # them (measured ~100x slower with 2 BLAS threads on a loaded 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        grid = sorted(c_grid)  # ascending: on a tie the stronger regularisation wins
        scores = np.zeros((len(grid), len(splits)))  # [C, folds]
        for fold, (fit, val) in enumerate(splits):
            scaler = StandardScaler().fit(train_x[fit])
            fit_x, val_x = scaler.transform(train_x[fit]), scaler.transform(train_x[val])
            # Each C starts from the previous (stronger) one's solution: the same optimum,
            # reached in a fraction of the iterations of a cold start.
            model = LogisticRegression(max_iter=max_iter, warm_start=True)
            for index, c in enumerate(grid):
                scores[index, fold] = model.set_params(C=c).fit(fit_x, train_y[fit]).score(
                    val_x, train_y[val])
        for c, fold_scores in zip(grid, scores):
            if splits and (np.isnan(best_score) or fold_scores.mean() > best_score):
                best_c, best_score = float(c), float(fold_scores.mean())
        final = clone(probe).set_params(logisticregression__C=best_c).fit(train_x, train_y)
    predictions = final.predict(test_x)
    return {
        "accuracy": float(np.mean(predictions == test_y)),
        "C": best_c,
        "cv_accuracy": best_score,
        "cv_folds": len(splits),
        "predictions": predictions,
    }


def linear_probe_regression(train_x, train_y, test_x, test_y, *,
                            alpha_grid=DEFAULT_ALPHA_GRID, groups=None, folds=5) -> dict:
    """Ridge regression on standardised frozen features, alpha by leave-one-out on train only.

    train_y / test_y are [N] or [N, T] (e.g. per-class area fractions); each target gets its own
    alpha. R^2 over several targets is variance-weighted (`variance_weighted_r2`); a target that
    is constant over the test set has no R^2 of its own and reports NaN in `r2_per_target`.
    With `groups` (one label per training row, e.g. its image) alpha is chosen by `folds`-fold
    cross-validation that keeps each group in one fold instead: leaving out one crop of an
    image whose other crops stay in would favour weak regularisation.

    Returns:
        dict with r2 (variance-weighted over targets), r2_per_target (list of T floats), alpha
        (chosen per target: a float, or a list for T > 1) and predictions ([M] or [M, T]).
    """
    train_x, test_x = _feature_pair(train_x, test_x, "train_x", "test_x")
    train_y = _targets(train_y, "train_y", len(train_x))
    test_y = _targets(test_y, "test_y", len(test_x))
    if train_y.shape[1:] != test_y.shape[1:]:
        raise ProbeError(f"train_y and test_y must have the same number of targets. Received: "
                         f"train_y.shape={train_y.shape}, test_y.shape={test_y.shape}")
    if len(train_x) < 3:
        raise ProbeError(f"The regression probe needs at least 3 training samples. "
                         f"Received: {len(train_x)}")
    if not alpha_grid or any(not np.isfinite(a) or a <= 0 for a in alpha_grid):
        raise ProbeError("alpha_grid must list positive regularisation strengths. "
                         f"Received: alpha_grid={alpha_grid!r}")

    if groups is None:
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=tuple(alpha_grid),
                                                        alpha_per_target=train_y.ndim == 2))
    else:
        chosen = _grouped_ridge_alphas(train_x, train_y, groups, alpha_grid, folds)  # [T]
        probe = make_pipeline(StandardScaler(),
                              Ridge(alpha=chosen if train_y.ndim == 2 else float(chosen[0])))
    probe.fit(train_x, train_y)
    predictions = probe.predict(test_x)
    truth_2d = test_y.reshape(len(test_y), -1)          # [M, T]
    predicted_2d = predictions.reshape(len(test_y), -1)  # [M, T]
    per_target = [variance_weighted_r2(truth_2d[:, t], predicted_2d[:, t])
                  for t in range(truth_2d.shape[1])]
    alpha = np.asarray(probe[-1].alpha_ if groups is None else probe[-1].alpha, dtype=np.float64)
    return {
        "r2": variance_weighted_r2(test_y, predictions),
        "r2_per_target": per_target,
        "alpha": float(alpha) if alpha.ndim == 0 else alpha.tolist(),
        "predictions": predictions,
    }


def _grouped_ridge_alphas(x, y, groups, alpha_grid, folds: int) -> np.ndarray:
    """Per target, the alpha of `alpha_grid` with the least squared error summed over grouped
    cross-validation folds (the strongest on a tie): float64 [T]. Every alpha of a fold comes
    from one SVD of its standardised, centred training part, as ridge's closed form allows."""
    y2 = y.reshape(len(y), -1)                                       # [N, T]
    alphas = np.sort(np.asarray(alpha_grid, dtype=np.float64))[::-1]  # strongest first
    units = len(_group_members(groups, len(y)))
    if units < 2:  # one group: nothing to validate on, take the strongest
        return np.full(y2.shape[1], alphas[0])
    errors = np.zeros((len(alphas), y2.shape[1]))                    # [A, T]
    for fit, val in GroupKFold(n_splits=min(int(folds), units)).split(x, y2, groups):
        scaler = StandardScaler().fit(x[fit])
        fit_x, val_x = scaler.transform(x[fit]), scaler.transform(x[val])
        x_mean, y_mean = fit_x.mean(axis=0), y2[fit].mean(axis=0)
        u, singular, vt = np.linalg.svd(fit_x - x_mean, full_matrices=False)  # [n, r], [r], [r, D]
        projected_y = u.T @ (y2[fit] - y_mean)                       # [r, T]
        projected_val = (val_x - x_mean) @ vt.T                      # [m, r]
        for index, alpha in enumerate(alphas):
            shrink = singular / (singular ** 2 + alpha)              # [r]
            predicted = projected_val @ (shrink[:, None] * projected_y) + y_mean  # [m, T]
            errors[index] += np.sum((y2[val] - predicted) ** 2, axis=0)
    return alphas[np.argmin(errors, axis=0)]  # argmin takes the first (strongest) on a tie


def variance_weighted_r2(truth, predicted) -> float:
    """R^2 of predictions [M] or [M, T]: 1 - (sum of squared errors) / (sum of squares about the
    test mean), both summed over the targets that vary on the test set, so each target counts by
    its variance (sklearn's multioutput="variance_weighted"). NaN when no target varies."""
    truth = np.asarray(truth, np.float64).reshape(len(truth), -1)        # [M, T]
    predicted = np.asarray(predicted, np.float64).reshape(len(truth), -1)
    spread = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)           # [T]
    varies = spread > 0
    if len(truth) < 2 or not varies.any():
        return float("nan")
    errors = np.sum((truth - predicted) ** 2, axis=0)                     # [T]
    return float(1.0 - errors[varies].sum() / spread[varies].sum())


# -- intervals ---------------------------------------------------------------------------------

def bootstrap_interval(metric: Callable[..., float], *arrays, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0,
                       groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(*arrays)` over the rows (held-out samples).

    The arrays are row-aligned (e.g. truth and fixed predictions); each resample draws M rows
    with replacement and re-scores them, without refitting anything. With `groups` (one label
    per row, e.g. the image each crop came from) whole groups are drawn instead, so rows that
    share an image count as one draw: a cluster bootstrap, honest when rows are correlated.
    Resamples where the metric is undefined (NaN) are left out; (NaN, NaN) when none is.
    """
    arrays = [np.asarray(a) for a in arrays]
    rows = len(arrays[0])
    if rows == 0 or any(len(a) != rows for a in arrays):
        raise ProbeError(f"bootstrap_interval needs row-aligned, non-empty arrays. Received "
                         f"lengths {[len(a) for a in arrays]}")
    if not 0 < confidence < 1:
        raise ProbeError(f"confidence must be in (0, 1). Received: confidence={confidence!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, rows, size=(int(resamples), rows))
    else:
        members = _group_members(groups, rows)  # one index array per group
        picks = rng.integers(0, len(members), size=(int(resamples), len(members)))
        draws = [np.concatenate([members[g] for g in pick]) for pick in picks]
    values = np.array([metric(*(a[draw] for a in arrays)) for draw in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def seed_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of independent runs' values (e.g. seeds); (NaN, NaN) for
    fewer than two finite values."""
    from scipy import stats

    values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def accuracy_of(truth, predicted) -> float:
    """Share of rows where the prediction equals the label (a bootstrap metric)."""
    return float(np.mean(np.asarray(truth) == np.asarray(predicted)))


# -- validation ------------------------------------------------------------------------------

def _group_members(groups, rows: int) -> list[np.ndarray]:
    """Row indices of each distinct group label, in order of first appearance."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != rows:
        raise ProbeError(f"groups must be 1-D with one label per row ({rows}). "
                         f"Received: groups.shape={groups.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # group number by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels = rank[inverse]
    sorted_rows = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=len(order)))[:-1]
    return np.split(sorted_rows, bounds)


def _features(x, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ProbeError(f"{name} must be a non-empty 2-D array [samples, dims]. "
                         f"Received: {name}.shape={array.shape}")
    bad = ~np.all(np.isfinite(array), axis=1)
    if bad.any():
        raise ProbeError(f"{name} has {int(bad.sum())} row(s) with NaN or infinite values "
                         f"(first: row {int(np.argmax(bad))}); re-embed with a finite checkpoint "
                         "or drop those rows.")
    return array


def _feature_pair(train, test, name_train: str, name_test: str):
    train, test = _features(train, name_train), _features(test, name_test)
    if train.shape[1] != test.shape[1]:
        raise ProbeError(f"{name_train} and {name_test} must have the same feature size. "
                         f"Received: {name_train}.shape={train.shape}, "
                         f"{name_test}.shape={test.shape}")
    return train, test


def _labels(y, name: str, rows: int) -> np.ndarray:
    array = np.asarray(y)
    if array.ndim != 1 or len(array) != rows:
        raise ProbeError(f"{name} must be 1-D with one label per feature row ({rows}). "
                         f"Received: {name}.shape={array.shape}")
    return array


def _targets(y, name: str, rows: int) -> np.ndarray:
    array = np.asarray(y, dtype=np.float64)
    if array.ndim not in (1, 2) or len(array) != rows:
        raise ProbeError(f"{name} must be [samples] or [samples, targets] with one row per "
                         f"feature row ({rows}). Received: {name}.shape={array.shape}")
    if not np.all(np.isfinite(array)):
        raise ProbeError(f"{name} contains NaN or infinite values; drop those samples.")
    return array


def _unit_rows(x: np.ndarray) -> np.ndarray:
    # Same clamp as torch.nn.functional.normalize: a zero row stays zero.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


__all__ = [
    "ProbeError",
    "accuracy_of",
    "bootstrap_interval",
    "knn_accuracy",
    "knn_classify",
    "knn_regress",
    "knn_scores",
    "linear_probe_classification",
    "linear_probe_regression",
    "seed_interval",
    "variance_weighted_r2",
]
