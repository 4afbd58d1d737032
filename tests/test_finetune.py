"""`cmc-kit finetune`: segmentation scores against hand-computed confusion matrices, the
labelled subsets, the decoder, and the arms on a tiny run: training ids only, held-out scoring,
the checkpoint's weights in the pretrained arms, skip and resume."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from cmc_kit import finetune, runs
from cmc_kit.errors import CheckpointError, ConfigError
from cmc_kit.finetune.arms import repeated_subset

# -- scores -----------------------------------------------------------------------------------

TRUTH = np.array([[0, 0, 1], [1, 2, 2]])
PREDICTED = np.array([[0, 1, 1], [1, 2, 0]])
# Rows truth, columns prediction, counted by hand from the six pixels above.
HAND_CONFUSION = np.array([[1, 1, 0],
                           [0, 2, 0],
                           [1, 0, 1]])


def test_confusion_matrix_and_iou_against_a_hand_computed_example():
    confusion = finetune.confusion_matrix(TRUTH, PREDICTED)
    assert confusion.shape == (7, 7) and confusion.sum() == TRUTH.size
    np.testing.assert_array_equal(confusion[:3, :3], HAND_CONFUSION)
    assert confusion[3:].sum() == confusion[:, 3:].sum() == 0
    scores = finetune.segmentation_scores(confusion)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6)
    # IoU = TP / (TP + FP + FN): water 1/(1+1+1), grassland 2/(2+1+0), forest 1/(1+0+1).
    assert scores["iou_water"] == pytest.approx(1 / 3)
    assert scores["iou_grassland"] == pytest.approx(2 / 3)
    assert scores["iou_forest"] == pytest.approx(1 / 2)
    # Classes in neither truth nor prediction have no IoU and stay out of the mean.
    assert all(math.isnan(scores[f"iou_{name}"]) for name in ("hills", "desert", "mountain", "tundra"))
    assert scores["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_a_class_only_predicted_counts_with_iou_zero():
    scores = finetune.segmentation_scores(finetune.confusion_matrix([0, 0, 0, 0], [0, 0, 0, 5]))
    assert scores["iou_water"] == pytest.approx(3 / 4) and scores["iou_mountain"] == 0.0
    assert scores["mean_iou"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_per_image_confusions_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 7, (4, 8, 8)), rng.integers(0, 7, (4, 8, 8))
    per_image = finetune.image_confusions(truth, predicted)
    assert per_image.shape == (4, 7, 7)
    for index in range(4):
        np.testing.assert_array_equal(per_image[index],
                                      finetune.confusion_matrix(truth[index], predicted[index]))
    np.testing.assert_array_equal(per_image.sum(0), finetune.confusion_matrix(truth, predicted))
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        finetune.confusion_matrix([0, 7], [0, 1])


# -- settings ------------------------------------------------------------------------------

def test_labels_must_be_fractions_in_zero_to_one():
    assert finetune.parse_labels("1.0,0.01, 0.1") == (0.01, 0.1, 1.0)
    assert finetune.parse_labels([0.5, 1]) == (0.5, 1.0)
    for bad in ("0", "0.1,1.5", "-0.2", "nan", "ten", ""):
        with pytest.raises(ConfigError, match=r"--labels .*in \(0, 1\].*e\.g\. 0\.01,0\.1,1"):
            finetune.parse_labels(bad)


def test_labelled_subsets_are_seeded_nested_and_at_least_one_sample():
    catalog = pd.DataFrame({"id": [f"{i:04d}" for i in range(50)]})
    small, large = (finetune.labelled_subset(catalog, f, seed=3) for f in (0.1, 0.5))
    assert (len(small), len(large)) == (5, 25)
    assert set(small["id"]) <= set(large["id"])
    assert list(small["id"]) == sorted(small["id"])  # catalog order
    assert small.equals(finetune.labelled_subset(catalog, 0.1, seed=3))
    assert not small.equals(finetune.labelled_subset(catalog, 0.1, seed=4))
    assert len(finetune.labelled_subset(catalog, 0.001, seed=3)) == 1
    assert len(finetune.labelled_subset(catalog, 1.0, seed=3)) == 50
    stream = repeated_subset(small, 50)
    assert len(stream) == 50 and stream["id"].is_unique  # 10 copies of 5, ids "~r"-suffixed
    assert stream["id"].str.split("~").str[0].value_counts().eq(10).all()
    assert repeated_subset(large, 20) is large


def test_the_segmentation_model_starts_every_arm_from_the_same_decoder():
    from cmc_kit import models
    from cmc_kit.config import ModelConfig

    config = ModelConfig(width=0.125, embedding_dim=8, views=("terrain", "height"))
    first = finetune.build_segmentation_model(models.build_encoder(config, 32, seed=1), seed=0)
    second = finetune.build_segmentation_model(models.build_encoder(config, 32, seed=2), seed=0)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    logits = first(x)
    assert tuple(logits.shape) == (2, 32, 32, 7) and logits.dtype.name == "float32"

    def decoder_weights(model):
        return [w for layer in model.layers if layer.name != "backbone" for w in layer.weights]

    for a, b in zip(decoder_weights(first), decoder_weights(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    backbone_a, backbone_b = first.get_layer("backbone"), second.get_layer("backbone")
    assert not np.array_equal(np.asarray(backbone_a.weights[0]), np.asarray(backbone_b.weights[0]))
    backbone_a.trainable = False  # what the frozen arm does: only the decoder learns
    assert len(first.trainable_weights) == len(decoder_weights(first))


# -- on a tiny run --------------------------------------------------------------------------

def test_the_random_init_arm_starts_from_the_weights_the_run_started_from(trained_run):
    """Like evaluate's random_init column (tested there against the Trainer's first weights):
    the arms then differ by what pretraining did, not by the luck of another draw."""
    from cmc_kit import evaluate, runs

    handle = runs.load_run(trained_run)
    start = evaluate.initial_encoder(handle.config)
    arm = finetune.segmenter.arm_encoder(handle, "random_init")
    trained = finetune.segmenter.arm_encoder(handle, "finetuned")

    def backbone(encoder):
        model = finetune.build_segmentation_model(encoder, seed=0).get_layer("backbone")
        return [np.asarray(w) for w in model.weights]

    for a, b in zip(backbone(arm), backbone(start), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(backbone(arm), backbone(trained)))


def _copy_run(source, target):
    """A private copy of the shared run (fine-tunes write into RUN/finetune)."""
    shutil.copytree(source, target)
    state = target / "checkpoints" / "checkpoint"  # absolute paths: point them at the copy
    state.write_text(state.read_text().replace(str(source), str(target)))
    return target


class DatasetCalls:
    """Records every views.make_dataset call (its catalog's ids and flags)."""

    def __init__(self, monkeypatch, stop_after_batches=None):
        from cmc_kit import views

        self.calls, self.batches, self.stop = [], 0, stop_after_batches
        real = views.make_dataset

        def recording(catalog, **kwargs):
            self.calls.append({"ids": list(catalog["id"]), **kwargs})
            dataset = real(catalog, **kwargs)
            return dataset if self.stop is None or not kwargs["training"] else self._stopping(dataset)

        monkeypatch.setattr(views, "make_dataset", recording)

    def _stopping(self, dataset):
        for batch in dataset:
            if self.batches == self.stop:
                raise KeyboardInterrupt
            self.batches += 1
            yield batch

    def training(self):
        return [c for c in self.calls if c["training"]]


@pytest.fixture(scope="module")
def finetuned(trained_run, small_dataset, tmp_path_factory):
    """Every arm at labels 0.2 and 1, one pass each, on a copy of the shared run."""
    run = _copy_run(trained_run, tmp_path_factory.mktemp("finetune") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = DatasetCalls(monkeypatch)
        table = finetune.finetune_run(run, small_dataset, labels="0.2,1", epochs=1,
                                      progress=False)
    return run, table, calls


@pytest.mark.slow
def test_arms_train_on_training_ids_and_are_scored_on_held_out_ones(finetuned):
    run, table, calls = finetuned
    split = json.loads((run / "split.json").read_text())
    assert [(row.labels, row.arm) for row in table.itertuples()] == [
        (f, arm) for f in (0.2, 1.0) for arm in ("frozen", "finetuned", "random_init")]
    training, scoring = calls.training(), [c for c in calls.calls if not c["training"]]
    labelled = [tuple(sorted({i.split("~")[0] for i in c["ids"]})) for c in training]  # repeats
    assert training and all(set(ids) <= set(split["train"]) for ids in labelled)
    assert len(scoring) == 6 and all(c["ids"] == sorted(split["validation"]) for c in scoring)
    # One seeded subset per fraction, the same for every arm, nested across fractions; a small
    # one is repeated to (about) the training split's size.
    subsets = {}
    for ids, call in zip(labelled, training):
        subsets.setdefault(len(ids), set()).add(ids)
        assert len(split["train"]) <= len(call["ids"]) < len(split["train"]) + len(ids)
    assert sorted(subsets) == [math.ceil(0.2 * len(split["train"])), len(split["train"])]
    assert all(len(variants) == 1 for variants in subsets.values())
    small, full = (next(iter(subsets[n])) for n in sorted(subsets))
    assert set(small) <= set(full)
    # Every arm had the same budget, and scores are proper fractions.
    passes = len(split["train"]) // 6
    assert set(table["steps"]) == {passes}
    assert list(table["labelled_samples"]) == [len(small)] * 3 + [len(full)] * 3
    for column in ("pixel_accuracy", "mean_iou"):
        assert ((table[column] >= 0) & (table[column] <= 1)).all()
    assert set(table["images"]) == {len(split["validation"])}
    written = pd.read_csv(run / "finetune" / "label_efficiency.csv")
    np.testing.assert_allclose(written["mean_iou"], table["mean_iou"])
    text = finetune.format_table(table)
    assert "frozen" in text and "random_init" in text and "held-out images" in text


@pytest.mark.slow
def test_a_rerun_skips_finished_arms(finetuned, small_dataset, monkeypatch):
    run, table, _ = finetuned
    calls = DatasetCalls(monkeypatch)
    again = finetune.finetune_run(run, small_dataset, labels="0.2,1", epochs=1, progress=False)
    assert calls.calls == []  # nothing trained, nothing scored again
    pd.testing.assert_frame_equal(again, table)


@pytest.mark.slow
def test_a_damaged_result_is_scored_again_from_the_arms_checkpoint(finetuned, small_dataset,
                                                                  tmp_path, monkeypatch):
    run, table, _ = finetuned
    run = _copy_run(run, tmp_path / "run")
    result = next((run / "finetune").rglob("frozen-labels1-*/result.json"))
    result.write_bytes(b"\xff\xfe\x00")
    calls = DatasetCalls(monkeypatch)
    with pytest.warns(UserWarning, match=r"result.json is damaged .*continued from its "
                                         r"checkpoints and scored again"):
        again = finetune.finetune_run(run, small_dataset, labels="0.2,1", epochs=1,
                                      progress=False)
    assert not calls.training() and len(calls.calls) == 1  # one arm scored, none trained
    pd.testing.assert_frame_equal(again, table)
    assert json.loads(result.read_text())  # written again
    # The copy found every other finished arm too: their folders do not depend on where the run
    # lives (the fine-tune did not train again).
    assert sorted(p.name for p in (run / "finetune").iterdir() if p.is_dir()) == \
        sorted(p.name for p in (finetuned[0] / "finetune").iterdir() if p.is_dir())


@pytest.mark.slow
def test_the_pretrained_arms_read_the_chosen_checkpoint(finetuned, small_dataset):
    run, latest, _ = finetuned
    earlier = finetune.finetune_run(run, small_dataset, labels="1", epochs=1, checkpoint="1",
                                    arms=("frozen", "random_init"), progress=False)
    by_arm = {row.arm: row for row in earlier.itertuples()}
    at_latest = {row.arm: row for row in latest[latest["labels"] == 1.0].itertuples()}
    assert by_arm["frozen"].pretrained_checkpoint == "ckpt-1"
    assert at_latest["frozen"].pretrained_checkpoint == "ckpt-2"
    # Another checkpoint changes the frozen arm's result and leaves random_init's alone.
    assert by_arm["frozen"].held_out_loss != at_latest["frozen"].held_out_loss
    assert by_arm["random_init"].folder == at_latest["random_init"].folder
    assert by_arm["random_init"].mean_iou == at_latest["random_init"].mean_iou
    # The frozen arm's backbone holds exactly the checkpoint's terrain stem and trunk.
    handle = runs.load_run(run, checkpoint=runs.resolve_checkpoint(run, "1"))
    model = finetune.load_arm_model(handle, by_arm["frozen"].folder)
    encoder = handle.encoder("online")
    expected = encoder.stem("terrain").weights + encoder.trunk("terrain").weights
    got = model.get_layer("backbone").weights
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_arms_encoder_holds_its_fine_tuned_backbone(finetuned):
    from cmc_kit import evaluate, models

    run, table, _ = finetuned
    handle = runs.load_run(run)
    folder = table[(table["arm"] == "random_init") & (table["labels"] == 1.0)]["folder"].iloc[0]
    encoder = finetune.load_arm_encoder(handle, folder)
    backbone = finetune.load_arm_model(handle, folder).get_layer("backbone")
    got = encoder.stem("terrain").weights + encoder.trunk("terrain").weights
    assert len(got) == len(backbone.weights)
    for a, b in zip(got, backbone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Trained away from the run's starting weights, and its stages compute like the backbone's.
    start = evaluate.initial_encoder(handle.config)
    assert not np.array_equal(np.asarray(got[0]), np.asarray(start.stem("terrain").weights[0]))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    stages = models.stage_model(encoder.trunk("terrain"))(encoder.stem("terrain")(x))
    np.testing.assert_allclose(np.asarray(stages[-1]), np.asarray(backbone(x)[-1]), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_the_finetune_command_prints_the_table_and_writes_the_csv(finetuned, small_dataset,
                                                                  tmp_path, capsys):
    from cmc_kit.cli import main

    run, table, _ = finetuned
    out = tmp_path / "table.csv"
    assert main(["finetune", "--run", str(run), "--data", str(small_dataset), "--labels", "1",
                 "--epochs", "1", "--out", str(out)]) == 0  # finished arms: read back
    printed = capsys.readouterr().out
    assert "Label efficiency of" in printed and "random_init" in printed and str(out) in printed
    written = pd.read_csv(out)
    np.testing.assert_allclose(written["mean_iou"], table[table["labels"] == 1.0]["mean_iou"])


@pytest.mark.slow
def test_an_interrupted_arm_resumes_at_its_checkpoint_and_ends_where_a_straight_run_does(
        trained_run, small_dataset, tmp_path, monkeypatch):
    settings = dict(labels="1", epochs=2, arms=("finetuned",), checkpoint_every=2, progress=False)
    straight = finetune.finetune_run(_copy_run(trained_run, tmp_path / "straight"),
                                     small_dataset, **settings)
    run = _copy_run(trained_run, tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        DatasetCalls(patch, stop_after_batches=7)  # 7 steps done, the last checkpoint at 6
        with pytest.raises(KeyboardInterrupt):
            finetune.finetune_run(run, small_dataset, **settings)
    calls = DatasetCalls(monkeypatch)
    resumed = finetune.finetune_run(run, small_dataset, **settings)
    per_epoch = len(json.loads((run / "split.json").read_text())["train"]) // 6
    first = calls.training()[0]
    assert (first["epoch"], first["start_batch"]) == divmod(6, per_epoch)
    for column in ("held_out_loss", "pixel_accuracy", "mean_iou"):
        assert resumed[column].iloc[0] == pytest.approx(straight[column].iloc[0], rel=1e-4)


def test_bad_requests_are_refused_with_the_fix(trained_run, small_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"--labels"):
        finetune.finetune_run(trained_run, small_dataset, labels="0,1")
    with pytest.raises(CheckpointError, match=r"not a run directory"):
        finetune.finetune_run(tmp_path / "nothing", small_dataset)
    with pytest.raises(ConfigError, match=r"arms must be names from frozen, finetuned"):
        finetune.finetune_run(trained_run, small_dataset, arms=("linear",))
    run = tmp_path / "no-terrain"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["views"] = ["segmentation", "height"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"without 'terrain'.*model.views includes terrain"):
        finetune.finetune_run(run, small_dataset)
    assert not (run / "finetune").exists()


def test_the_command_refuses_bad_labels_in_one_line(tmp_path, capsys):
    from cmc_kit.cli import main

    assert main(["finetune", "--run", str(tmp_path), "--data", str(tmp_path),
                 "--labels", "0.5,2"]) == 2
    assert "cmc-kit finetune: error: --labels" in capsys.readouterr().err
