"""The run directory: resume settings, fresh starts that lose nothing, previous runs brought in,
training files lost between sessions."""

import json
from pathlib import Path

import pandas as pd
import pytest

from cmc_kit.errors import CheckpointError
from helpers import tiny_config


def test_resume_with_a_different_model_names_the_fields(train_root, tmp_path):
    from cmc_kit import training

    run = tmp_path / "run"
    cosine = {"train.lr_schedule": "cosine"}
    training.train(train_root, run, tiny_config(**cosine, **{"train.epochs": 1}), verbose=0)
    with pytest.raises(CheckpointError, match="model.embedding_dim: saved 16, requested 32"):
        training.train(train_root, run, tiny_config(**{"model.embedding_dim": 32}), verbose=0)
    # Epochs may change on resume: training continues from the checkpoint, and a cosine
    # schedule, which spans the epochs asked for, says it is re-spaced.
    with pytest.warns(UserWarning, match="from 1 to 2 after 1 epoch.*cosine lr_schedule is "
                                         "re-spaced over 2 epochs"):
        result = training.train(train_root, run, tiny_config(**cosine, **{"train.epochs": 2}),
                                verbose=0)
    assert result.step == 12 and result.epoch == 2


def test_an_attached_previous_output_is_continued_unless_fresh(train_root, tmp_path, monkeypatch):
    import keras

    from cmc_kit import cli, kaggle, runs, training

    class StepCounter(keras.callbacks.Callback):
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            StepCounter.steps += 1

    inputs = tmp_path / "input"
    previous = inputs / "cmc-train-v1" / "runs" / "terrain-cmc"
    training.train(train_root, previous, tiny_config(**{"train.epochs": 1}), verbose=0)  # 6 steps
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: True)
    monkeypatch.setattr(kaggle, "default_paths", lambda: {"input": inputs})

    # Without fresh, the attached run is copied in and continued from its step 6.
    continued = training.train(train_root, tmp_path / "a" / "terrain-cmc",
                               tiny_config(**{"train.epochs": 2}), verbose=0,
                               callbacks=[StepCounter()])
    assert (continued.step, StepCounter.steps) == (12, 6)

    # fresh=True starts over: all of epoch 1 is trained again, nothing is copied in.
    StepCounter.steps = 0
    started_over = training.train(train_root, tmp_path / "b" / "terrain-cmc",
                                  tiny_config(**{"train.epochs": 1}), fresh=True, verbose=0,
                                  callbacks=[StepCounter()])
    assert (started_over.step, StepCounter.steps) == (6, 6)
    assert runs.run_info(previous)["step"] == 6  # the input was only read

    with pytest.raises(CheckpointError, match=r"fresh=True.*resume_from.*Drop one"):
        training.train(train_root, tmp_path / "c", tiny_config(), fresh=True,
                       resume_from=previous, verbose=0)
    with pytest.raises(CheckpointError, match=r"--fresh.*--resume-from"):
        cli.train_from_cli(data=train_root, run=tmp_path / "c", fresh=True,
                                resume_from=previous)


def _run_files(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_fresh_with_a_mistake_keeps_the_old_run(train_root, tmp_path):
    from cmc_kit import training
    from cmc_kit.errors import CmcKitError

    run = tmp_path / "run"
    training.train(train_root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    (run / "explorer.html").write_text("<html>made from the old run</html>")
    before = _run_files(run)
    assert "checkpoints/checkpoint" in before
    mistakes = [
        (tmp_path / "no-such-data", tiny_config(), "does not exist"),
        (train_root, tiny_config(**{"data.crop_size": 128}), r"data.crop_size.*at most 64"),
        (train_root, tiny_config(**{"train.strategy": "tpu"}), "TPU"),
        # Checked by the input pipeline, not by the Trainer itself.
        (train_root, tiny_config(**{"data.cache": str(tmp_path / "no-cache")}), "cache manifest"),
    ]
    for data, config, message in mistakes:
        with pytest.raises(CmcKitError, match=message):
            training.train(data, run, config, fresh=True, verbose=0)
        assert _run_files(run) == before, message  # nothing deleted, nothing added
    # A fresh start that passes its checks does replace the run.
    training.train(train_root, run, tiny_config(**{"train.epochs": 1, "model.embedding_dim": 8}),
                   fresh=True, verbose=0)
    assert not (run / ".before-fresh").exists()
    assert json.loads((run / "config.json").read_text())["model"]["embedding_dim"] == 8
    assert not (run / "explorer.html").exists()  # made from the old run: gone with it


def test_fewer_epochs_than_trained_train_nothing_and_keep_the_runs_goal(train_root, tmp_path):
    from cmc_kit import training

    run = tmp_path / "run"
    training.train(train_root, run, tiny_config(**{"train.epochs": 2}), verbose=0)
    with pytest.warns(UserWarning, match=r"train.epochs 1 is below the 2 epoch\(s\).*keeps "
                                         r"train.epochs 2"):
        result = training.train(train_root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    assert (result.epoch, result.step) == (2, 12)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_a_run_set_aside_by_a_killed_fresh_start_comes_back(train_root, tmp_path):
    from cmc_kit import runs, training
    from cmc_kit.errors import CmcKitError

    run = tmp_path / "run"
    training.train(train_root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    before = _run_files(run)
    runs.FreshStart.set_aside(run)  # the process dies here: no put_back, no discard
    assert not runs.has_checkpoint(run)
    # Even the next fresh start, failing its checks, gives the old run back...
    with pytest.raises(CmcKitError, match="data.crop_size"):
        training.train(train_root, run, tiny_config(**{"data.crop_size": 128}), fresh=True,
                       verbose=0)
    assert _run_files(run) == before
    # ... and a plain resume continues it.
    runs.FreshStart.set_aside(run)
    with pytest.warns(UserWarning, match="fresh start was interrupted"):
        result = training.train(train_root, run, tiny_config(**{"train.epochs": 2}), verbose=0)
    assert result.step == 12


def test_a_setting_that_fails_leaves_no_settings_behind(train_root, tmp_path):
    from cmc_kit import training
    from cmc_kit.errors import CmcKitError

    run = tmp_path / "run"
    with pytest.raises(CmcKitError, match="data.crop_size"):
        training.train(train_root, run, tiny_config(**{"data.crop_size": 128}), verbose=0)
    # No config.json or split.json to trip the next attempt, which then simply works.
    assert not (run / "config.json").exists() and not (run / "split.json").exists()
    result = training.train(train_root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    assert result.step == 6

    # A finished run given an impossible crop size: refused, its saved settings unchanged.
    saved = (run / "config.json").read_text()
    with pytest.raises(CmcKitError, match="data.crop_size"):
        training.train(train_root, run, tiny_config(**{"train.epochs": 1, "data.crop_size": 128}),
                       verbose=0)
    assert (run / "config.json").read_text() == saved


def test_resume_after_training_files_went_missing_skips_them_and_continues(tmp_path):
    from cmc_kit import runs, synth, training

    root = synth.generate(tmp_path / "data", n=30, size=64, seed=3, progress=False)
    run = tmp_path / "run"
    training.train(root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    split = json.loads((run / "split.json").read_text())
    intact = runs.apply_split(runs.usable_catalog(root, check_pixels=False), split)["train"]
    deleted, garbled = split["train"][5], split["train"][11]
    next(Path(root).rglob(f"{deleted}_h.png")).unlink()
    next(Path(root).rglob(f"{garbled}_t.png")).write_bytes(b"not a png")

    # The training table keeps every row in place: the epoch plan (a permutation of rows) and
    # each row's crop seed are the uninterrupted run's.
    with pytest.warns(UserWarning, match="can no longer be read"):
        kept = runs.keep_lost_training_samples(
            runs.usable_catalog(root, check_pixels=False), split, root, run)
    assert runs.apply_split(kept, split)["train"]["id"].tolist() == intact["id"].tolist()

    with pytest.warns(UserWarning, match=rf"2 training sample\(s\) of .* ({deleted}|{garbled})"):
        result = training.train(root, run, tiny_config(**{"train.epochs": 2}), verbose=0)
    assert result.epoch == 2
    log = pd.read_csv(run / "log.csv")
    assert log["skipped_samples"].tolist() == [0, 2]
    # 24 training samples, batch 4: the two skipped leave 22, i.e. 5 full batches.
    assert result.step == 6 + 5


def test_resume_from_is_not_copied_over_a_run_that_has_a_checkpoint(train_root, tmp_path):
    from cmc_kit import training

    mine, other = tmp_path / "mine", tmp_path / "other"
    training.train(train_root, mine, tiny_config(**{"train.epochs": 1}), verbose=0)
    training.train(train_root, other, tiny_config(**{"train.epochs": 2}), verbose=0)
    with pytest.warns(UserWarning, match=r"already holds a checkpoint \(step 6\).*not copied in"):
        result = training.train(train_root, mine, tiny_config(**{"train.epochs": 1}),
                                resume_from=other, verbose=0)
    assert result.step == 6


# -- bringing in a previous run (a Kaggle notebook version's output) --------------------------------

def _fake_run(folder: Path, checkpoint_step: int | None = None) -> Path:
    from cmc_kit.config import preset

    (folder / "checkpoints").mkdir(parents=True)
    preset("cpu-demo").save(folder / "config.json")
    if checkpoint_step is not None:  # the text file tf.train.CheckpointManager writes
        name = f"ckpt-{checkpoint_step}"
        (folder / "checkpoints" / "checkpoint").write_text(
            f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
        (folder / "checkpoints" / f"{name}.index").write_bytes(b"")  # what TF checks exists
    return folder


def test_a_previous_output_is_found_by_the_runs_name_under_the_input_root(tmp_path):
    from cmc_kit import kaggle, runs

    inputs = tmp_path / "input"
    _fake_run(inputs / "other-notebook" / "runs" / "something-else", 4)
    previous = _fake_run(inputs / "cmc-train-v3" / "runs" / "terrain-cmc", 4)
    assert kaggle.find_previous_output("terrain-cmc", inputs, is_run=runs.is_run_dir) == previous
    assert kaggle.find_previous_output("no-such-run", inputs, is_run=runs.is_run_dir) is None


def test_bring_in_previous_run_copies_once_and_keeps_a_local_checkpoint(tmp_path):
    from cmc_kit import runs

    previous = _fake_run(tmp_path / "input" / "v1" / "terrain-cmc", 12)
    run = tmp_path / "work" / "terrain-cmc"
    assert runs.bring_in_previous_run(run, input_root=tmp_path / "input") == previous
    assert (run / "config.json").read_text() == (previous / "config.json").read_text()
    # Checkpoint paths now point into the writable copy.
    assert "ckpt-12" in (run / "checkpoints" / "checkpoint").read_text()
    # The run now holds a checkpoint: a second call (the next cell rerun) copies nothing.
    assert runs.bring_in_previous_run(run, input_root=tmp_path / "input") is None


def test_bring_in_previous_run_says_when_resume_from_is_not_used(tmp_path):
    from cmc_kit import runs

    run = _fake_run(tmp_path / "work" / "terrain-cmc", 3)
    with pytest.warns(UserWarning, match=r"already holds a checkpoint.*RESUME_FROM"):
        assert runs.bring_in_previous_run(run, tmp_path / "nope") is None
