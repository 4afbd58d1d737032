"""kNN and linear probes: naive references, separable and random data, no test leakage."""

import math

import numpy as np
import pytest
from sklearn.metrics import r2_score
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cmc_kit.probes import (
    ProbeError,
    accuracy_of,
    bootstrap_interval,
    knn_accuracy,
    knn_classify,
    knn_regress,
    knn_scores,
    linear_probe_classification,
    linear_probe_regression,
    seed_interval,
    variance_weighted_r2,
)

NUM_CLASSES = 7


def gaussian_blobs(seed, per_class, dim=16, spread=0.3, num_classes=NUM_CLASSES):
    """Well separated classes: random unit centres at distance ~1.4, small isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread / math.sqrt(dim) * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return features[order], labels[order]


@pytest.fixture(scope="module")
def blobs():
    train_x, train_y = gaussian_blobs(0, per_class=20)
    test_x, test_y = gaussian_blobs(0, per_class=50)  # same centres (seed), fresh noise below
    rng = np.random.default_rng(1)
    test_x = test_x + 0.3 / 4 * rng.normal(size=test_x.shape)
    return train_x, train_y, test_x, test_y


# -- kNN -------------------------------------------------------------------------------------

def naive_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """One query at a time: sort all cosines, take the k best, add exp(sim/T) to their classes."""
    predictions, scores = [], []
    for query in test_x:
        similarities = [float(np.dot(query, row) / (np.linalg.norm(query) * np.linalg.norm(row)))
                        for row in train_x]
        order = sorted(range(len(train_x)), key=lambda i: -similarities[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(similarities[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
        scores.append([v / sum(votes) for v in votes])
    return np.array(predictions), np.array(scores)


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (7, 0.5), (100, 1.0)])
def test_knn_matches_naive_reference(k, temperature):
    rng = np.random.default_rng(k)
    train_x = rng.normal(size=(30, 8)) * rng.uniform(0.1, 10, size=(30, 1))
    train_y = rng.integers(0, 4, size=30)
    test_x = rng.normal(size=(11, 8))
    expected_predictions, expected_scores = naive_knn(train_x, train_y, test_x, min(k, 30),
                                                      temperature, num_classes=5)
    scores = knn_scores(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=5,
                        chunk_size=4)  # several chunks, one partial
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(
        knn_classify(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=5),
        expected_predictions)


def test_knn_regress_matches_naive_reference():
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(25, 6)), rng.normal(size=(9, 6))
    targets = rng.normal(size=(25, 3))
    k, temperature = 4, 0.2
    expected = []
    for query in test_x:
        sims = train_x @ query / (np.linalg.norm(train_x, axis=1) * np.linalg.norm(query))
        best = np.argsort(-sims)[:k]
        weights = np.exp(sims[best] / temperature)
        expected.append((weights[:, None] * targets[best]).sum(0) / weights.sum())
    got = knn_regress(train_x, targets, test_x, k=k, temperature=temperature, chunk_size=2)
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-10)
    got_1d = knn_regress(train_x, targets[:, 0], test_x, k=k, temperature=temperature)
    np.testing.assert_allclose(got_1d, np.array(expected)[:, 0], rtol=1e-10)


def test_knn_separable_blobs(blobs):
    train_x, train_y, test_x, test_y = blobs
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) >= 0.97
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1) >= 0.97


def test_knn_small_temperature_stays_finite():
    train_x, train_y = gaussian_blobs(2, per_class=3)
    scores = knn_scores(train_x, train_y, train_x, k=5, temperature=1e-4)
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    # The nearest neighbour of a training point is itself: T -> 0 becomes 1-NN.
    np.testing.assert_array_equal(np.argmax(scores, axis=1), train_y)


def test_knn_single_class_and_tiny_bank():
    train_x = np.random.default_rng(0).normal(size=(2, 4))
    test_x = np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_array_equal(knn_classify(train_x, [3, 3], test_x, k=20), [3] * 5)
    scores = knn_scores(train_x, [3, 3], test_x, k=20, num_classes=7)
    assert scores.shape == (5, 7)
    np.testing.assert_allclose(scores[:, 3], 1.0)


def test_knn_rejects_bad_input():
    x = np.ones((4, 3))
    with pytest.raises(ProbeError, match=r"k=0"):
        knn_classify(x, [0, 1, 0, 1], x, k=0)
    with pytest.raises(ProbeError, match=r"temperature=0"):
        knn_classify(x, [0, 1, 0, 1], x, temperature=0)
    with pytest.raises(ProbeError, match=r"train_labels.*\(3,\)"):
        knn_classify(x, [0, 1, 0], x)
    with pytest.raises(ProbeError, match=r"same feature size"):
        knn_classify(x, [0, 1, 0, 1], np.ones((2, 5)))
    with pytest.raises(ProbeError, match=r"integer class ids"):
        knn_classify(x, [0.5, 1, 0, 1], x)
    with pytest.raises(ProbeError, match=r"num_classes=1"):
        knn_classify(x, [0, 1, 0, 1], x, num_classes=1)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ProbeError, match=r"test_features has 1 row.*row 2"):
        knn_classify(x, [0, 1, 0, 1], bad)


# -- linear probes ---------------------------------------------------------------------------

def test_linear_probe_separable_blobs(blobs):
    train_x, train_y, test_x, test_y = blobs
    result = linear_probe_classification(train_x, train_y, test_x, test_y, seed=0)
    assert result["accuracy"] >= 0.97
    assert result["cv_accuracy"] >= 0.9 and result["cv_folds"] == 5
    assert result["predictions"].shape == test_y.shape


def test_shuffled_labels_give_chance_accuracy(blobs):
    # Labels independent of the features: 350 test points, chance 1/7 = 0.143, sd ~ 0.019.
    train_x, train_y, test_x, test_y = blobs
    rng = np.random.default_rng(11)
    train_y, test_y = rng.permutation(train_y), rng.permutation(test_y)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    linear = linear_probe_classification(train_x, train_y, test_x, test_y, seed=0)["accuracy"]
    for accuracy in (knn, linear):
        assert 0.07 <= accuracy <= 0.23, accuracy


def test_linear_probe_matches_manual_fit_on_train_only(blobs):
    train_x, train_y, test_x, test_y = blobs
    result = linear_probe_classification(train_x, train_y, test_x, test_y, seed=0)
    scaler = StandardScaler().fit(train_x)
    manual = LogisticRegression(C=result["C"], max_iter=1000)
    manual.fit(scaler.transform(train_x), train_y)
    np.testing.assert_array_equal(result["predictions"], manual.predict(scaler.transform(test_x)))


def test_linear_probes_do_not_look_at_the_test_set(blobs):
    """Appending wild test rows must not change C/alpha nor the predictions on the other rows.

    A scaler or CV fitted on train+test would shift with the 1000x rows and change both.
    """
    train_x, train_y, test_x, test_y = blobs
    rng = np.random.default_rng(4)
    wild_x = 1000.0 * rng.normal(size=(60, train_x.shape[1])) + 500.0
    wild_y = rng.integers(0, NUM_CLASSES, size=60)
    plain = linear_probe_classification(train_x, train_y, test_x, test_y, seed=0)
    padded = linear_probe_classification(train_x, train_y, np.concatenate([test_x, wild_x]),
                                         np.concatenate([test_y, wild_y]), seed=0)
    assert padded["C"] == plain["C"] and padded["cv_accuracy"] == plain["cv_accuracy"]
    np.testing.assert_array_equal(padded["predictions"][:len(test_x)], plain["predictions"])

    weights = rng.normal(size=(train_x.shape[1], 2))
    plain = linear_probe_regression(train_x, train_x @ weights, test_x, test_x @ weights)
    padded = linear_probe_regression(train_x, train_x @ weights,
                                     np.concatenate([test_x, wild_x]),
                                     np.concatenate([test_x, wild_x]) @ weights)
    assert padded["alpha"] == plain["alpha"]
    np.testing.assert_allclose(padded["predictions"][:len(test_x)], plain["predictions"])


def test_linear_probe_tiny_training_sets():
    rng = np.random.default_rng(5)
    # 20 samples, one class with a single member: fewer members than folds.
    train_y = np.array([0] * 10 + [1] * 9 + [2])
    train_x = rng.normal(size=(20, 8)) + 3.0 * np.eye(8)[train_y]
    test_y = np.array([0, 1, 2, 0, 1])
    test_x = rng.normal(size=(5, 8)) + 3.0 * np.eye(8)[test_y]
    result = linear_probe_classification(train_x, train_y, test_x, test_y)
    assert result["cv_folds"] >= 1 and 0.0 <= result["accuracy"] <= 1.0
    assert result["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

    # Two samples: no fold can hold both classes in its training part -> C = 1.0, CV NaN.
    tiny = linear_probe_classification(train_x[[0, 10]], train_y[[0, 10]], test_x, test_y)
    assert tiny["C"] == 1.0 and tiny["cv_folds"] == 0 and math.isnan(tiny["cv_accuracy"])

    with pytest.raises(ProbeError, match=r"at least two classes.*class 0"):
        linear_probe_classification(train_x[:10], train_y[:10], test_x, test_y)


def test_linear_regression_probe_recovers_linear_targets(blobs):
    train_x, _, test_x, _ = blobs
    rng = np.random.default_rng(6)
    weights = rng.normal(size=(train_x.shape[1], 3))
    train_t = train_x @ weights + 0.01 * rng.normal(size=(len(train_x), 3))
    test_t = test_x @ weights

    one = linear_probe_regression(train_x, train_t[:, 0], test_x, test_t[:, 0])
    assert one["r2"] >= 0.99 and len(one["r2_per_target"]) == 1
    assert one["predictions"].shape == (len(test_x),)

    several = linear_probe_regression(train_x, train_t, test_x, test_t)
    assert len(several["r2_per_target"]) == 3 and min(several["r2_per_target"]) >= 0.99
    np.testing.assert_allclose(several["r2"], r2_score(test_t, several["predictions"],
                                                       multioutput="variance_weighted"))

    # Noise targets: nothing to learn, test R^2 at or below ~0.
    noise = linear_probe_regression(train_x, rng.normal(size=len(train_x)), test_x,
                                    rng.normal(size=len(test_x)))
    assert noise["r2"] < 0.1


def test_regression_probe_constant_test_target_is_undefined(blobs):
    train_x, train_y, test_x, test_y = blobs
    fractions = np.eye(NUM_CLASSES)[train_y]  # one-hot "area fractions"
    test_fractions = np.eye(NUM_CLASSES)[test_y]
    test_fractions[:, 6] = 0.0  # class 6 absent from the test set: constant target
    result = linear_probe_regression(train_x, fractions, test_x, test_fractions)
    assert math.isnan(result["r2_per_target"][6])
    assert np.isfinite(result["r2"])
    # The constant target has no variance, so it carries no weight (sklearn's definition).
    np.testing.assert_allclose(result["r2"], r2_score(
        test_fractions[:, :6], result["predictions"][:, :6], multioutput="variance_weighted"))


def test_linear_probes_reject_bad_input():
    x = np.ones((6, 3))
    with pytest.raises(ProbeError, match=r"test_x.shape=\(6, 4\)"):
        linear_probe_classification(x, [0, 1] * 3, np.ones((6, 4)), [0, 1] * 3)
    with pytest.raises(ProbeError, match=r"train_y must be 1-D"):
        linear_probe_classification(x, [[0, 1]] * 6, x, [0, 1] * 3)
    with pytest.raises(ProbeError, match=r"same number of targets"):
        linear_probe_regression(x, np.ones((6, 2)), x, np.ones((6, 3)))
    with pytest.raises(ProbeError, match=r"non-empty 2-D"):
        linear_probe_regression(np.ones(6), np.ones(6), x, np.ones(6))


# -- trustworthy summaries ---------------------------------------------------------------------------

def test_a_rare_target_no_longer_sinks_the_multi_target_r2():
    """Seven class fractions, one of them rare (std ~0.01): a model that is good on the common
    targets and bad on the rare one scores by the variance it explains, not by the rare target's
    R^2 far below 0 (the unweighted mean over targets did that)."""
    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.ones(6) * 2, size=200) * 0.98               # [200, 6] common
    rare = np.abs(rng.normal(0.01, 0.01, size=(200, 1)))                 # [200, 1] rare
    truth = np.concatenate([truth, rare], axis=1)
    predicted = truth + rng.normal(0, 0.02, size=truth.shape)            # good on common ones
    predicted[:, 6] = rare[:, 0].mean() + rng.normal(0, 0.05, size=200)  # hopeless on the rare one
    per_target = [variance_weighted_r2(truth[:, t], predicted[:, t]) for t in range(7)]
    assert per_target[6] < -10                      # the rare target alone is far below 0 ...
    assert np.mean(per_target) < 0                  # ... and sank the unweighted mean
    weighted = variance_weighted_r2(truth, predicted)
    assert weighted > 0.9                           # the variance-weighted R^2 does not sink
    assert weighted == pytest.approx(r2_score(truth, predicted, multioutput="variance_weighted"))


def test_regression_probe_on_uninformative_features_stays_near_zero():
    """Many noise features and few samples: strong regularisation is in the grid, chosen on the
    training split, so the probe predicts about the mean instead of overfitting far below 0."""
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(60, 200)), rng.normal(size=(60, 200))
    train_y, test_y = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    result = linear_probe_regression(train_x, train_y, test_x, test_y)
    assert -0.15 < result["r2"] < 0.1
    assert min(result["alpha"]) >= 100 and max(result["alpha"]) >= 1e6  # strong ones are chosen


def test_shuffled_labels_score_chance_and_separable_ones_score_one(blobs):
    train_x, train_y, test_x, test_y = blobs
    assert knn_accuracy(train_x, train_y, test_x, test_y) >= 0.97
    assert linear_probe_classification(train_x, train_y, test_x, test_y)["accuracy"] >= 0.97
    # Held-out labels shuffled: the features say nothing about them any more (350 samples:
    # chance 1/7 with a standard error of ~0.02).
    shuffled = np.random.default_rng(2).permutation(test_y)
    chance = 1 / NUM_CLASSES
    assert abs(knn_accuracy(train_x, train_y, test_x, shuffled) - chance) < 0.06
    linear = linear_probe_classification(train_x, train_y, test_x, shuffled)
    assert abs(linear["accuracy"] - chance) < 0.06


def test_bootstrap_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    """Simulated probes: a classifier right with probability 0.7 on 85 held-out samples. Over
    many independent held-out sets, the 95% interval holds 0.7 about 95% of the time."""
    rng = np.random.default_rng(3)
    covered = []
    for trial in range(200):
        truth = rng.integers(0, 7, size=85)
        right = rng.random(85) < 0.7
        predicted = np.where(right, truth, (truth + 1) % 7)
        low, high = bootstrap_interval(accuracy_of, truth, predicted, resamples=400, seed=trial)
        assert low <= accuracy_of(truth, predicted) <= high
        covered.append(low <= 0.7 <= high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_of_r2_covers_the_true_value():
    rng = np.random.default_rng(4)
    covered = []
    for trial in range(100):
        truth = rng.normal(size=120)
        predicted = 0.8 * truth + 0.6 * rng.normal(size=120)  # R^2 = 1 - E[(0.2x - 0.6e)^2] = 0.6
        low, high = bootstrap_interval(variance_weighted_r2, truth, predicted, resamples=300,
                                       seed=trial)
        covered.append(low <= 0.6 <= high)
    assert 0.85 <= np.mean(covered) <= 1.0


def test_seed_interval_is_the_t_interval_of_the_mean():
    values = [0.61, 0.66, 0.70, 0.64, 0.69]
    low, high = seed_interval(values)
    mean, sd = np.mean(values), np.std(values, ddof=1)
    half = 2.776445105 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6)
    assert all(math.isnan(v) for v in seed_interval([0.5]))
    with pytest.raises(ProbeError, match="row-aligned"):
        bootstrap_interval(accuracy_of, np.zeros(3), np.zeros(4))



# -- grouped rows (several crops per image) ----------------------------------------------------

def test_group_bootstrap_covers_the_truth_where_a_row_bootstrap_is_overconfident():
    """40 images x 16 crops: each image has its own chance (0.7 +- 0.2) of the crops being right,
    so crops of one image agree. Drawing whole images covers the true 0.7 about 95% of the
    time; drawing crops as if independent is far too narrow."""
    rng = np.random.default_rng(5)
    images, crops = 40, 16
    groups = np.repeat(np.arange(images), crops)
    covered = {"groups": [], "rows": []}
    for trial in range(150):
        chance = np.clip(0.7 + 0.2 * rng.uniform(-1, 1, size=images) * math.sqrt(3), 0, 1)
        truth = rng.integers(0, 7, size=images * crops)
        right = rng.random(images * crops) < chance[groups]
        predicted = np.where(right, truth, (truth + 1) % 7)
        for name, labels in (("groups", groups), ("rows", None)):
            low, high = bootstrap_interval(accuracy_of, truth, predicted, resamples=300,
                                           seed=trial, groups=labels)
            covered[name].append(low <= 0.7 <= high)
    assert 0.88 <= np.mean(covered["groups"]) <= 0.99
    assert np.mean(covered["rows"]) < 0.75


def test_group_bootstrap_of_singleton_groups_is_the_row_bootstrap():
    rng = np.random.default_rng(6)
    truth, predicted = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    rows = bootstrap_interval(accuracy_of, truth, predicted, resamples=200, seed=1)
    singletons = bootstrap_interval(accuracy_of, truth, predicted, resamples=200, seed=1,
                                    groups=np.arange(50))
    assert singletons == pytest.approx(rows)
    with pytest.raises(ProbeError, match="groups"):
        bootstrap_interval(accuracy_of, truth, predicted, groups=np.arange(49))


def copies_per_image(x, y, copies, noise, seed):
    """Each row repeated `copies` times with a little noise: crops of one image."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(x)), copies)
    return x[groups] + noise * rng.normal(size=(len(groups), x.shape[1])), y[groups], groups


def test_grouped_ridge_choice_matches_a_brute_force_grouped_search():
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 12))
    y = np.stack([x[:, 0] + 0.5 * rng.normal(size=30), rng.normal(size=30)], axis=1)
    x, y, groups = copies_per_image(x, y, 4, 0.05, 8)
    alphas = (0.1, 1.0, 10.0, 100.0, 1e4)
    result = linear_probe_regression(x, y, x[:8], y[:8], alpha_grid=alphas, groups=groups)
    errors = np.zeros((len(alphas), 2))
    for fit, val in GroupKFold(n_splits=5).split(x, y, groups):
        for index, alpha in enumerate(alphas):
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x[fit], y[fit])
            errors[index] += ((model.predict(x[val]) - y[val]) ** 2).sum(axis=0)
    assert result["alpha"] == [alphas[i] for i in np.argmin(errors, axis=0)]
    assert result["alpha"][1] == 1e4  # the noise target falls back to the mean


def test_crops_of_one_image_do_not_validate_each_other():
    """Noise features, 16 near-copies per image: leave-one-out (or ungrouped folds) sees each
    validation crop's twins in training, so it trusts the noise and picks weak regularisation;
    grouped folds see that the features predict nothing and regularise strongly."""
    rng = np.random.default_rng(9)
    x, y, groups = copies_per_image(rng.normal(size=(200, 60)), rng.normal(size=200), 16,
                                    0.01, 10)
    test_x, test_y, _ = copies_per_image(rng.normal(size=(200, 60)), rng.normal(size=200), 16,
                                         0.01, 11)
    ungrouped = linear_probe_regression(x, y, test_x, test_y)
    grouped = linear_probe_regression(x, y, test_x, test_y, groups=groups)
    assert ungrouped["alpha"] < 1e3 and ungrouped["r2"] < -0.3
    assert grouped["alpha"] >= 1e4 and abs(grouped["r2"]) < 0.05
    labels, test_labels = (y > 0).astype(int), (test_y > 0).astype(int)
    leaky = linear_probe_classification(x, labels, test_x, test_labels)
    honest = linear_probe_classification(x, labels, test_x, test_labels, groups=groups)
    assert leaky["cv_accuracy"] > 0.65  # twins in the training folds: looks learnable
    assert abs(honest["cv_accuracy"] - 0.5) < 0.1  # chance, as on the held-out images
    assert abs(honest["accuracy"] - 0.5) < 0.1
