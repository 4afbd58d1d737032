"""`cmc-kit export`: the .keras file and the SavedModel reproduce the run's encoder, also in a
fresh process, and the model card carries the run's facts."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from cmc_kit import export, runs
from cmc_kit.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def trunk_export(trained_run, small_dataset, tmp_path_factory):
    """The default export (terrain stem + trunk) of the shared tiny run, made once."""
    out = tmp_path_factory.mktemp("export") / "terrain"
    return export.export_run(trained_run, out, data=small_dataset)


def _terrain(crop, count=3, seed=5):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (count, crop, crop, 3)).astype("float32")


def test_the_keras_trunk_gives_exactly_the_runs_encoder_outputs(trunk_export, trained_run):
    import keras

    from cmc_kit import models

    encoder = runs.load_run(trained_run).encoder("online")
    loaded = keras.saving.load_model(trunk_export["keras"])
    x = _terrain(encoder.crop_size)
    feature_map = np.asarray(loaded(x))
    expected = np.asarray(encoder.trunk("terrain")(encoder.stem("terrain")(x)))
    np.testing.assert_array_equal(feature_map, expected)
    # Mean-pooled, it is the embedding `cmc-kit embed` and the probes use.
    np.testing.assert_array_equal(feature_map.mean(axis=(1, 2)),
                                  np.asarray(encoder.encode_features(x, "terrain")))
    # Its trunk still gives the stages (for a user's own U-Net).
    stages = models.stage_model(loaded.get_layer("trunk"))(loaded.get_layer("stem_terrain")(x))
    for got, want in zip(stages, encoder.stage_features(x, "terrain")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # A larger input than the crop works too (fully convolutional).
    big = _terrain(2 * encoder.crop_size, count=1)
    np.testing.assert_array_equal(np.asarray(loaded(big)), np.asarray(
        encoder.trunk("terrain")(encoder.stem("terrain")(big))))


def test_the_whole_encoder_exports_and_reloads_identically(trained_run, tmp_path):
    import keras

    handle = runs.load_run(trained_run, checkpoint=runs.resolve_checkpoint(trained_run, "1"))
    encoder = handle.encoder("online")
    written = export.export_run(trained_run, tmp_path / "encoder", part="encoder", checkpoint="1")
    assert written["keras"].name == "encoder.keras"
    loaded = keras.saving.load_model(written["keras"])
    crop = encoder.crop_size
    rng = np.random.default_rng(1)
    inputs = {"terrain": _terrain(crop), "overview": _terrain(crop, seed=6),
              "height": rng.uniform(-1, 1, (3, crop, crop, 1)).astype("float32"),
              "segmentation": np.eye(7, dtype="float32")[rng.integers(0, 7, (3, crop, crop))]}
    got, want = loaded(inputs), encoder(inputs)
    assert set(got) == set(handle.config.model.views)
    for view in want:
        np.testing.assert_array_equal(np.asarray(got[view]), np.asarray(want[view]))
    card = json.loads(written["card_json"].read_text())
    assert card["part"] == "encoder" and card["training"]["epoch"] == 1
    assert set(card["preprocessing"]["views"]) == set(handle.config.model.views)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    images = np.load(sys.argv[3])
    serve = tf.saved_model.load(sys.argv[1]).signatures["serve"]
    served = serve(terrain=tf.constant(images))
    saved_model_needs_cmc_kit = any(name.startswith("cmc_kit") for name in sys.modules)

    import keras
    import cmc_kit  # after keras: registers cmc_kit's layers
    model = keras.saving.load_model(sys.argv[2])
    feature_map = model(images.astype("float32") / 127.5 - 1.0)
    print(json.dumps({
        "signature_inputs": sorted(serve.structured_input_signature[1]),
        "input_dtype": serve.structured_input_signature[1]["terrain"].dtype.name,
        "embedding": served["embedding"].numpy().tolist(),
        "feature_map": served["feature_map"].numpy().tolist(),
        "keras_feature_map": np.asarray(feature_map).tolist(),
        "saved_model_needs_cmc_kit": saved_model_needs_cmc_kit,
    }))
""")


@pytest.mark.slow
def test_saved_model_and_keras_file_load_in_a_fresh_process(trunk_export, trained_run, tmp_path):
    from cmc_kit import views

    encoder = runs.load_run(trained_run).encoder("online")
    images = np.random.default_rng(3).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), str(trunk_export["saved_model"]),
                           str(trunk_export["keras"]), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["signature_inputs"] == ["terrain"] and result["input_dtype"] == "uint8"
    assert not result["saved_model_needs_cmc_kit"]
    # The reference: the run's own encoder on the same uint8 images, normalised as in training.
    x = views.normalise_terrain(images)
    expected_map = np.asarray(encoder.trunk("terrain")(encoder.stem("terrain")(x)))
    scale = np.abs(expected_map).max()
    # The SavedModel runs as a graph (other fusions, other rounding); the .keras file eagerly.
    np.testing.assert_allclose(result["feature_map"], expected_map, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(result["embedding"], expected_map.mean(axis=(1, 2)),
                               atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(result["keras_feature_map"], expected_map, atol=1e-6 * scale,
                               rtol=0)


def test_the_model_card_says_what_was_trained_and_how_to_feed_it(trunk_export, trained_run,
                                                                small_dataset):
    card = json.loads(trunk_export["card_json"].read_text())
    config = runs.load_run(trained_run).config
    training = card["training"]
    assert (training["epoch"], training["step"]) == (2, runs.run_info(trained_run)["step"])
    assert training["preset"] == "cpu-demo" and "data.crop_size=32" in training["overrides"]
    split = json.loads((trained_run / "split.json").read_text())
    assert training["train_samples"] == len(split["train"])
    assert training["held_out_samples"] == len(split["validation"])
    assert card["preprocessing"]["crop_size"] == config.data.crop_size
    assert card["checks"]["keras_max_abs_difference"] == 0.0
    assert str(small_dataset) in card["data"] and "synthetic" in card["data"]
    text = trunk_export["card"].read_text()
    for needed in ("x = rgb_uint8.astype('float32') / 127.5 - 1.0", "R, G, B", "crop size**: 32",
                   "kaggle models instances create -p DIR -r zip", "## Limits",
                   "## Intended use", "epoch 2 of 2"):
        assert needed in text, needed
    assert "## Evaluation" not in text  # the run has no evaluation.csv


def test_the_card_carries_the_evaluation_table_when_the_run_has_one(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = run / "checkpoints" / "checkpoint"  # absolute paths: point them at the copy
    state.write_text(state.read_text().replace(str(trained_run), str(run)))
    pd.DataFrame([{"task": "dominant_class", "probe": "knn", "metric": "accuracy",
                   "trained": 0.6473, "random_init": 0.518, "raw_pixels": 0.659}]).to_csv(
        run / "evaluation.csv", index=False)
    written = export.export_run(run, tmp_path / "out")
    text = written["card"].read_text()
    assert "## Evaluation: probes on the held-out samples" in text
    assert "| dominant_class | knn | accuracy | 0.647 | 0.518 | 0.659 |" in text
    card = json.loads(written["card_json"].read_text())
    assert card["tables"]["evaluation"]["rows"][0]["trained"] == pytest.approx(0.6473)


def test_bad_requests_fail_before_any_work_with_the_fix(trained_run, tmp_path):
    with pytest.raises(ConfigError, match=r"--part .*trunk, encoder.*'head'"):
        export.export_run(trained_run, tmp_path / "x", part="head")
    with pytest.raises(CheckpointError, match=r"not a run directory.*cmc-kit train"):
        export.export_run(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"ckpt-7 does not exist.*ckpt-1, ckpt-2"):
        export.export_run(trained_run, tmp_path / "x", checkpoint="7")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"--out .* is a file"):
        export.export_run(trained_run, tmp_path / "file")
    assert not (tmp_path / "x").exists()


def test_a_run_without_the_terrain_view_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["views"] = ["segmentation", "height"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"without 'terrain'.*model.views includes terrain"):
        export.export_run(run, tmp_path / "out")


@pytest.mark.slow
def test_the_export_command_writes_the_files(trained_run, tmp_path, capsys):
    from cmc_kit.cli import main

    assert main(["export", "--run", str(trained_run), "--out", str(tmp_path / "e"),
                 "--checkpoint", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("terrain_trunk.keras", "saved_model", "MODEL_CARD.md"):
        assert name in printed and (tmp_path / "e" / name).exists()
    assert "`ckpt-1` (epoch 1" in (tmp_path / "e" / "MODEL_CARD.md").read_text()
    with pytest.raises(SystemExit):  # argparse refuses an unknown part
        main(["export", "--run", str(trained_run), "--out", str(tmp_path / "e"), "--part", "all"])
