"""Run-level evaluation: probes of trained vs baseline features on the run's own held-out split."""

import json

import numpy as np
import pandas as pd
import pytest

from cmc_kit import evaluate
from cmc_kit.palette import CLASS_NAMES


@pytest.mark.slow
def test_evaluate_run_scores_every_source_on_held_out_ids_only(trained_run, small_dataset,
                                                                tmp_path, monkeypatch):
    from cmc_kit import probes

    split = json.loads((trained_run / "split.json").read_text())
    seen_test_sizes = []
    real_knn = probes.knn_classify

    def recording_knn(train_x, train_y, test_x, **kwargs):
        seen_test_sizes.append((len(train_x), len(test_x)))
        return real_knn(train_x, train_y, test_x, **kwargs)

    monkeypatch.setattr(probes, "knn_classify", recording_knn)
    out = tmp_path / "evaluation.csv"
    numpy_state = np.random.get_state()
    with pytest.warns(UserWarning, match=r"Only \d+ held-out samples.*rough"):
        table = evaluate.evaluate_run(trained_run, small_dataset, out=out)
    # The random-init baseline is seeded locally: NumPy's global stream was not reseeded.
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))

    assert set(table["source"]) == {"trained", "random_init", "raw_pixels", "mean_colour"}
    assert table.attrs["features"] == "stages"
    # Probes fit on the training split and score on the validation split, for every source.
    assert seen_test_sizes == [(len(split["train"]), len(split["validation"]))] * 4
    assert table.attrs["test_samples"] == len(split["validation"])
    tasks = set(table["task"])
    assert {"dominant_class", "class_fractions", "height_mean"} <= tasks
    assert any(t.startswith("generator:") for t in tasks)  # synthetic metadata.csv is used
    accuracies = table[table["metric"] == "accuracy"]["value"]
    assert ((accuracies >= 0) & (accuracies <= 1)).all()
    # Every value sits inside its 95% interval.
    finite = table.dropna(subset=["low", "high"])
    assert len(finite) == len(table)
    assert ((finite["low"] <= finite["value"] + 1e-9) & (finite["value"] <= finite["high"] + 1e-9)).all()

    wide = pd.read_csv(out)
    assert list(wide.columns[:8]) == ["task", "probe", "metric", "features", "grid", "trained",
                                      "trained_low", "trained_high"]
    assert (wide["grid"] == 1).all()
    assert {"random_init", "raw_pixels_low", "mean_colour_high"} <= set(wide.columns)
    assert (wide["features"] == "stages").all()
    assert len(wide) == len(table) // 4
    text = evaluate.format_table(table)
    assert "dominant_class" in text and "random_init" in text and "rough" in text
    assert "features: stages" in text and "95% bootstrap interval" in text


@pytest.mark.slow
def test_a_grid_scores_every_crop_of_the_held_out_samples_and_resamples_whole_samples(
        trained_run, small_dataset, monkeypatch):
    from cmc_kit import probes

    split = json.loads((trained_run / "split.json").read_text())
    seen = {"knn": [], "groups": [], "linear_groups": []}
    real_knn, real_interval = probes.knn_classify, probes.bootstrap_interval
    real_linear = probes.linear_probe_regression

    def recording_knn(train_x, train_y, test_x, **kwargs):
        seen["knn"].append((len(train_x), len(test_x)))
        return real_knn(train_x, train_y, test_x, **kwargs)

    def recording_interval(metric, *arrays, groups=None, **kwargs):
        seen["groups"].append(groups)
        return real_interval(metric, *arrays, groups=groups, **kwargs)

    def recording_linear(*args, groups=None, **kwargs):
        seen["linear_groups"].append(groups)
        return real_linear(*args, groups=groups, **kwargs)

    monkeypatch.setattr(probes, "knn_classify", recording_knn)
    monkeypatch.setattr(probes, "bootstrap_interval", recording_interval)
    monkeypatch.setattr(probes, "linear_probe_regression", recording_linear)
    with pytest.warns(UserWarning, match="rough"):
        table = evaluate.evaluate_run(trained_run, small_dataset, grid=2)  # 64 px, 32 px crops
    train_n, test_n = len(split["train"]), len(split["validation"])
    assert seen["knn"] == [(4 * train_n, 4 * test_n)] * 4  # every source, every crop
    assert table.attrs["grid"] == 2 and table.attrs["test_samples"] == test_n
    assert table.attrs["test_crops"] == 4 * test_n
    # The bootstrap draws held-out samples (4 crops each), the probes' folds training samples.
    for groups in seen["groups"]:
        assert sorted(set(groups)) == sorted(split["validation"]) and len(groups) == 4 * test_n
    for groups in seen["linear_groups"]:
        assert sorted(set(groups)) == sorted(split["train"]) and len(groups) == 4 * train_n
    assert "2x2 crops each" in evaluate.format_table(table)
    # The mean colour of a crop is its raw pixels at 1x1: both baselines agree on the tiles.
    test_catalog = small_dataset_catalog(small_dataset, split["validation"])
    colours = evaluate.raw_pixel_features(test_catalog, 32, side=1, grid=2)
    pixels = evaluate.raw_pixel_features(test_catalog, 32, side=2, grid=2)
    np.testing.assert_allclose(colours, pixels.reshape(-1, 4, 3).mean(axis=1), atol=1e-5)
    assert colours.shape == (4 * test_n, 3)


def small_dataset_catalog(root, ids):
    from cmc_kit import data

    catalog = data.Dataset.find(root).catalog
    return catalog[catalog["id"].isin(ids)].reset_index(drop=True)


def test_tiling_grid_is_the_most_crops_that_fit_side_by_side(small_dataset):
    from cmc_kit import data

    catalog = data.Dataset.find(small_dataset).catalog  # 64 px images
    assert [evaluate.tiling_grid(catalog, crop) for crop in (64, 40, 32, 21, 16, 8)] == \
        [1, 1, 2, 3, 4, 4]
    assert evaluate.tiling_grid(catalog, 8, most=8) == 8
    assert evaluate.tiling_grid(catalog.drop(columns="terrain"), 16) == 1  # size unknown


def test_the_grid_setting_is_checked_before_any_work(tmp_path):
    from cmc_kit.errors import CmcKitError

    for bad in (0, 2.5, "4", True, 17):
        with pytest.raises(CmcKitError, match="grid"):
            evaluate.evaluate_run(tmp_path / "no-run", tmp_path / "no-data", grid=bad)


def test_label_targets_from_an_embeddings_table():
    rng = np.random.default_rng(0)
    fractions = rng.dirichlet(np.ones(7), size=12)
    table = pd.DataFrame({"id": [f"{i:04d}" for i in range(12)], "emb_0": rng.normal(size=12)})
    for index, name in enumerate(CLASS_NAMES):
        table[f"fraction_{name}"] = fractions[:, index]
    table["dominant_class_id"] = fractions.argmax(1)
    table["dominant_class"] = np.asarray(CLASS_NAMES)[fractions.argmax(1)]
    table["height_mean"] = rng.normal(size=12)
    table["height_std"] = rng.normal(size=12)
    table["aridity"] = rng.uniform(size=12)              # written by cmc_kit's generator
    table["rainfall_mm"] = rng.uniform(size=12)          # a dataset's own metadata column
    table["meta_fraction_water"] = rng.uniform(size=12)  # whole-image duplicate: not a task
    table["hemisphere"] = [0, 1] * 6                      # binary: not a regression task
    targets = evaluate.label_targets(table)
    assert set(targets) == {"dominant_class", "class_fractions", "height_mean",
                            "generator:aridity", "metadata:rainfall_mm"}
    kind, labels = targets["dominant_class"]
    assert kind == "classification" and (labels == fractions.argmax(1)).all()
    assert targets["class_fractions"][1].shape == (12, 7)


def test_probe_features_separable_vs_shuffled():
    """Features that encode the label give near-perfect scores; noise gives near chance."""
    rng = np.random.default_rng(1)
    n = 280
    labels = np.repeat(np.arange(7), n // 7)
    centres = rng.normal(size=(7, 16)) * 5
    features = centres[labels] + rng.normal(size=(n, 16))
    fractions = np.eye(7)[labels] * 0.8 + 0.2 / 7
    table = pd.DataFrame({f"fraction_{name}": fractions[:, i] for i, name in enumerate(CLASS_NAMES)})
    table["dominant_class_id"] = labels
    table["height_mean"] = features[:, 0] * 3.0 + 1.0
    order = rng.permutation(n)
    train, test = order[:200], order[200:]
    rows = evaluate.probe_features(features[train], features[test], table.iloc[train],
                                   table.iloc[test], source="blobs")
    scores = {(r["task"], r["probe"]): r["value"] for r in rows}
    assert scores[("dominant_class", "knn")] > 0.95
    assert scores[("dominant_class", "linear")] > 0.95
    assert scores[("height_mean", "linear")] > 0.99
    noise = rng.normal(size=(n, 16))
    rows = evaluate.probe_features(noise[train], noise[test], table.iloc[train], table.iloc[test],
                                   source="noise")
    scores = {(r["task"], r["probe"]): r["value"] for r in rows}
    assert scores[("dominant_class", "knn")] < 0.35


def test_sources_probed_in_parallel_give_the_rows_of_one_at_a_time():
    rng = np.random.default_rng(2)
    n = 210
    labels = rng.permutation(np.repeat(np.arange(7), n // 7))
    fractions = np.eye(7)[labels] * 0.7 + 0.3 / 7
    table = pd.DataFrame({f"fraction_{name}": fractions[:, i] for i, name in enumerate(CLASS_NAMES)})
    table["dominant_class_id"] = labels
    table["height_mean"] = rng.normal(size=n)
    table["id"] = [f"{i // 3:04d}" for i in range(n)]  # three crops per sample
    table["window"] = np.arange(n) % 3
    train, test = np.arange(150), np.arange(150, n)
    features = {}
    for name, signal in (("strong", 4.0), ("weak", 1.0), ("none", 0.0), ("pixels", 2.0)):
        x = signal * np.eye(7)[labels] @ rng.normal(size=(7, 12)) + rng.normal(size=(n, 12))
        features[name] = (x[train], x[test])
    options = dict(seed=0, resamples=50)
    one = evaluate.probe_sources(features, table.iloc[train], table.iloc[test], workers=1, **options)
    two = evaluate.probe_sources(features, table.iloc[train], table.iloc[test], workers=2, **options)
    one, two = pd.DataFrame(one), pd.DataFrame(two)
    assert one.drop(columns=["value", "low", "high"]).equals(two.drop(columns=["value", "low", "high"]))
    np.testing.assert_allclose(two[["value", "low", "high"]], one[["value", "low", "high"]],
                               rtol=1e-12, atol=1e-12)  # BLAS threads only change rounding
    one, two = one.to_dict("records"), two.to_dict("records")
    assert list(dict.fromkeys(r["source"] for r in two)) == list(features)
    accuracy = {r["source"]: r["value"] for r in one if r["probe"] == "knn"}
    assert accuracy["strong"] > accuracy["weak"] > accuracy["none"]


def test_an_unknown_checkpoints_choice_is_refused_before_any_work(tmp_path):
    from cmc_kit import evaluate
    from cmc_kit.errors import CmcKitError

    with pytest.raises(CmcKitError, match=r"CHECKPOINTS.*'latest' or 'all'.*'last'"):
        evaluate.evaluate_run(tmp_path / "no-run", tmp_path / "no-data", checkpoints="last")


def test_evaluating_on_another_dataset_says_so(trained_run, tmp_path):
    from cmc_kit import synth
    from cmc_kit.errors import DataError

    other = synth.generate(tmp_path / "other", n=6, size=32, seed=9, progress=False)
    for path in other.rglob("*.png"):  # ids the run never saw
        path.rename(path.with_name("x" + path.name))
    with pytest.raises(DataError, match=r"holds only 0 of the \d+ samples .* the run's dataset"):
        evaluate.evaluate_run(trained_run, other)


def test_several_runs_are_summarised_by_their_mean_and_a_t_interval():
    def run_table(values):
        rows = [{"task": "dominant_class", "probe": "knn", "metric": "accuracy", "source": source,
                 "value": value, "low": value - 0.1, "high": value + 0.1}
                for source, value in values.items()]
        return pd.DataFrame(rows)

    tables = [run_table({"trained": t, "random_init": r})
              for t, r in ((0.70, 0.50), (0.74, 0.52), (0.66, 0.49))]
    summary = evaluate.summarise_over_runs(tables).set_index("source")
    assert summary.loc["trained", "value"] == pytest.approx(0.70)
    assert summary.loc["trained", "sd"] == pytest.approx(0.04)
    half = 4.302652730 * 0.04 / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert summary.loc["trained", "low"] == pytest.approx(0.70 - half)
    assert summary.loc["trained", "high"] == pytest.approx(0.70 + half)
    assert summary.loc["random_init", "values"] == [0.5, 0.52, 0.49]
    assert list(summary.index) == ["trained", "random_init"]


def test_evaluating_one_run_as_several_is_refused(tmp_path):
    from cmc_kit.errors import CmcKitError

    with pytest.raises(CmcKitError, match="two or more runs"):
        evaluate.evaluate_runs([tmp_path / "a"], tmp_path)


def test_an_unknown_feature_source_is_refused_before_any_work(tmp_path):
    from cmc_kit.errors import CmcKitError

    with pytest.raises(CmcKitError, match=r"stage<N>.*'pixels'"):
        evaluate.evaluate_run(tmp_path / "no-run", tmp_path / "no-data", features="pixels")


@pytest.mark.slow
def test_the_random_init_baseline_uses_the_same_feature_source(trained_run, small_dataset,
                                                                monkeypatch):
    from cmc_kit import probes, runs

    widths = {}
    real_knn = probes.knn_classify

    def recording_knn(train_x, train_y, test_x, **kwargs):
        widths.setdefault(len(widths), np.shape(train_x)[1])
        return real_knn(train_x, train_y, test_x, **kwargs)

    monkeypatch.setattr(probes, "knn_classify", recording_knn)
    handle = runs.load_run(trained_run)
    with pytest.warns(UserWarning, match="rough"):
        # A reference network goes through the same embedding and probes as the trained one.
        table = evaluate.evaluate_run(trained_run, small_dataset, features="stage1",
                                      references={"same_network": handle.encoder("online")})
    config = handle.config
    from cmc_kit import models

    stage1_channels = models.trunk_stage_channels(config.model.trunk, config.model.width)[0]
    # trained, random_init, the reference: stage 1's mean and std per channel; pixels 8x8x3;
    # mean colour 3 (sources are probed in parallel: in any order).
    assert sorted(widths.values()) == sorted([2 * stage1_channels] * 3 + [192, 3])
    by_source = {source: part["value"].to_numpy() for source, part in table.groupby("source")}
    np.testing.assert_array_equal(by_source["same_network"], by_source["trained"])
    assert table.attrs["features"] == "stage1"
    assert "features: stage1" in evaluate.format_table(table)



@pytest.mark.parametrize("seed", [0, 7])
def test_the_random_init_baseline_is_the_network_training_started_from(small_dataset, tmp_path,
                                                                       seed):
    from cmc_kit import data as data_module
    from cmc_kit import training
    from helpers import tiny_config

    config = tiny_config(**{"train.seed": seed})
    trainer = training.Trainer(config, tmp_path / "run", data_module.discover(small_dataset),
                               verbose=0)
    started = trainer.online.get_weights()
    baseline = evaluate.initial_encoder(config).get_weights()
    assert len(started) == len(baseline) > 0
    for a, b in zip(started, baseline):
        np.testing.assert_array_equal(a, b)
    other = evaluate.initial_encoder(config.with_overrides({"train.seed": seed + 1}))
    assert not all(np.array_equal(a, b) for a, b in zip(started, other.get_weights()))
