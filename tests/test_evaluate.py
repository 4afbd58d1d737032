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
    table = evaluate.evaluate_run(trained_run, small_dataset, out=out)
    # The random-init baseline is seeded locally: NumPy's global stream was not reseeded.
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))

    assert set(table["source"]) == {"trained", "random_init", "raw_pixels"}
    # Probes fit on the training split and score on the validation split, for every source.
    assert seen_test_sizes == [(len(split["train"]), len(split["validation"]))] * 3
    assert table.attrs["test_samples"] == len(split["validation"])
    tasks = set(table["task"])
    assert {"dominant_class", "class_fractions", "height_mean"} <= tasks
    assert any(t.startswith("generator:") for t in tasks)  # synthetic metadata.csv is used
    accuracies = table[table["metric"] == "accuracy"]["value"]
    assert ((accuracies >= 0) & (accuracies <= 1)).all()

    wide = pd.read_csv(out)
    assert list(wide.columns[:6]) == ["task", "probe", "metric", "trained", "random_init", "raw_pixels"]
    assert len(wide) == len(table) // 3
    text = evaluate.format_table(table)
    assert "dominant_class" in text and "random_init" in text


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
    table["aridity"] = rng.uniform(size=12)
    table["meta_fraction_water"] = rng.uniform(size=12)  # whole-image duplicate: not a task
    table["hemisphere"] = [0, 1] * 6                      # binary: not a regression task
    targets = evaluate.label_targets(table)
    assert set(targets) == {"dominant_class", "class_fractions", "height_mean", "generator:aridity"}
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
