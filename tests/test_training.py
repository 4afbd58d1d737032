"""Training: queues, schedules, the loss going down, exact resume after SIGKILL, bad steps and files."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmc_kit.config import preset
from cmc_kit.errors import CheckpointError, DataError, TrainingError
from helpers import tiny_config


# -- pieces ------------------------------------------------------------------------------------

def test_queue_size_is_capped_below_the_training_set():
    from cmc_kit.training import queue_size

    assert queue_size(10, 5, 1000) == 50
    with pytest.warns(UserWarning, match="capped at 20"):
        assert queue_size(10, 5, 24) == 20
    with pytest.warns(UserWarning):
        assert queue_size(10, 5, 25) == 20  # K must stay below N
    with pytest.raises(DataError, match="fewer than two batches"):
        queue_size(10, 5, 9)


def test_queue_is_fifo_with_a_wrapping_pointer():
    import tensorflow as tf

    from cmc_kit.training import MemoryQueues

    queues = MemoryQueues(("terrain",), size=6, dim=2)
    reference = np.zeros((6, 2), np.float32)
    pointer = 0
    rng = np.random.default_rng(0)
    for _ in range(5):  # 5 batches of 2 into 6 slots: wraps around
        keys = rng.normal(size=(2, 2)).astype(np.float32)
        queues.enqueue({"terrain": tf.constant(keys)})
        normalised = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        for row in normalised:
            reference[pointer] = row
            pointer = (pointer + 1) % 6
    np.testing.assert_allclose(queues.queues["terrain"].numpy(), reference, rtol=1e-6)
    assert int(queues.pointer.numpy()) == pointer
    assert int(queues.filled.numpy()) == 6


def test_cosine_momentum_ramps_to_one():
    from cmc_kit.training import momentum_at

    assert float(momentum_at(0, 100, 0.99, "cosine")) == pytest.approx(0.99)
    assert float(momentum_at(50, 100, 0.99, "cosine")) == pytest.approx(0.995)
    assert float(momentum_at(100, 100, 0.99, "cosine")) == pytest.approx(1.0)
    assert float(momentum_at(70, 100, 0.99, "constant")) == pytest.approx(0.99)


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_short_cpu_demo_run_lowers_the_loss_and_writes_its_outputs(train_root, tmp_path):
    from cmc_kit import embed, runs, training

    config = preset("cpu-demo").with_overrides({
        "data.crop_size": 32, "data.batch_size": 8, "data.validation_fraction": 0.2,
        "train.epochs": 5, "train.queue_multiplier": 2, "train.eval_subset": 6})
    run = tmp_path / "run"
    result = training.train(train_root, run, config, verbose=0,
                            callbacks=[embed.EpochEmbeddings()])
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4, 5]
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    for column in ("inter_terrain-segmentation", "intra_overview-terrain", "learning_rate",
                   "skipped_steps", "seconds", "knn_accuracy"):
        assert column in log.columns
    assert (run / "embeddings" / "epoch_005.parquet").exists()
    assert list((run / "tensorboard").iterdir())
    info = runs.run_info(run)
    assert info["epoch"] == 5 and info["step"] == result.step == 5 * (24 // 8)
    assert info["queue_fill"] == info["queue_size"] == 16
    # Held-out ids never trained on.
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["validation"])


@pytest.mark.slow
def test_momentum_keys_and_online_positives_both_train(train_root, tmp_path):
    from cmc_kit import training

    for positive in ("momentum", "online"):
        result = training.train(train_root, tmp_path / positive,
                                tiny_config(**{"train.positive": positive, "train.epochs": 1}),
                                verbose=0)
        assert result.status == "completed" and result.step == 6


def test_non_finite_losses_skip_updates_then_stop_with_the_checkpoint_intact(train_root, tmp_path):
    import tensorflow as tf

    from cmc_kit import runs, training

    run = tmp_path / "run"
    training.train(train_root, run, tiny_config(**{"train.epochs": 1}), verbose=0)
    before = runs.load_run(run).encoder("online").get_weights()
    checkpoints_before = sorted(p.name for p in (run / "checkpoints").iterdir())

    def poison(dataset):  # every view NaN; the plan positions pass through
        return dataset.map(lambda batch: {k: v * np.float32("nan") if v.dtype.is_floating else v
                                          for k, v in batch.items()})

    config = tiny_config(**{"train.epochs": 2, "train.max_nonfinite_steps": 3})
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss") as err:
        training.train(train_root, run, config, verbose=0, dataset_transform=poison)
    assert "checkpoint is intact" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints_before
    after = runs.load_run(run).encoder("online").get_weights()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    del tf


def test_non_finite_steps_change_no_weights_queue_or_ema(train_root, tmp_path):
    """Inside one process: skipped steps leave online, momentum, queues and pointer untouched."""
    from cmc_kit import training
    from cmc_kit.data import discover

    config = tiny_config(**{"train.epochs": 1, "train.max_nonfinite_steps": 100})
    catalog = discover(train_root)
    trainer = training.Trainer(config, tmp_path / "run", catalog.iloc[:24], catalog.iloc[24:],
                               verbose=0)
    trainer.restore_or_initialize()
    snapshot = lambda: ([w.copy() for w in trainer.online.get_weights()],  # noqa: E731
                        [w.copy() for w in trainer.momentum.get_weights()],
                        {v: q.numpy().copy() for v, q in trainer.queues.queues.items()},
                        int(trainer.queues.pointer.numpy()))
    online, momentum, queues, pointer = snapshot()
    batch = next(iter(trainer.dataset(0)))
    poisoned = {k: v * np.float32("nan") for k, v in batch.items()}
    logs = trainer.train_step(poisoned)
    assert int(logs["skipped"]) == 1 and int(trainer.state.skipped.numpy()) == 1
    online2, momentum2, queues2, pointer2 = snapshot()
    for a, b in zip(online + momentum, online2 + momentum2):
        np.testing.assert_array_equal(a, b)
    for view in queues:
        np.testing.assert_array_equal(queues[view], queues2[view])
    assert pointer == pointer2
    logs = trainer.train_step(batch)  # a good step then changes all of them
    assert int(logs["skipped"]) == 0
    assert int(trainer.queues.pointer.numpy()) != pointer


def test_non_finite_weights_are_never_checkpointed(train_root, tmp_path):
    from cmc_kit import runs, training
    from cmc_kit.data import discover

    catalog = discover(train_root)
    trainer = training.Trainer(tiny_config(), tmp_path / "run", catalog.iloc[:24], verbose=0)
    trainer.restore_or_initialize()
    good = trainer.save()
    kernel = trainer.online.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    with pytest.raises(TrainingError, match=r"non-finite values in 1 tensor.*intact"):
        trainer.save()
    assert trainer.checkpointer.latest == good
    assert runs.list_checkpoints(tmp_path / "run")[-1]["path"] == good


def test_time_limit_checkpoints_and_returns_then_resumes(train_root, tmp_path):
    from cmc_kit import runs, training

    run = tmp_path / "run"
    result = training.train(train_root, run, tiny_config(**{"train.epochs": 3}), time_limit=0.001,
                            verbose=0)
    assert result.status == "time_limit"
    assert 1 <= result.step < 18
    assert runs.run_info(run)["step"] == result.step
    finished = training.train(train_root, run, tiny_config(**{"train.epochs": 3}), verbose=0)
    assert finished.status == "completed" and finished.step == 18


def test_training_split_smaller_than_two_batches_is_a_clear_error(tmp_path):
    from cmc_kit import synth, training

    root = synth.generate(tmp_path / "small", n=6, size=48, seed=1, progress=False)
    with pytest.raises(DataError, match="fewer than two batches"):
        training.train(root, tmp_path / "run", tiny_config(), verbose=0)


# -- exact resume across a killed process ----------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent("""
    import sys, time
    import tensorflow as tf
    from cmc_kit import training
    from cmc_kit.config import Config
    data, run, config_path, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "slow"

    def slow_down(dataset):
        # Test-only: sleeps between batches so the parent can SIGKILL mid-epoch.
        def pause(batch):
            tf.py_function(lambda: time.sleep(0.4), [], [])
            return batch
        return dataset.map(pause) if slow else dataset

    config = Config.load(config_path)
    training.train(data, run, config, verbose=0, dataset_transform=slow_down)
""")


def _run_training(script, data, run, config_path, mode):
    env = dict(os.environ, PYTHONHASHSEED="0", TF_DETERMINISTIC_OPS="1")
    return subprocess.Popen([sys.executable, str(script), str(data), str(run), str(config_path), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_exact_resume_after_sigkill_matches_a_straight_run(train_root, tmp_path):
    from cmc_kit import runs

    config = tiny_config(**{"train.epochs": 2, "train.checkpoint_every_steps": 2,
                            "train.deterministic": True, "train.eval_subset": 0})
    config_path = tmp_path / "config.json"
    config.save(config_path)
    script = tmp_path / "train_script.py"
    script.write_text(RESUME_SCRIPT)

    straight = _run_training(script, train_root, tmp_path / "straight", config_path, "fast")
    killed_run = tmp_path / "killed"
    victim = _run_training(script, train_root, killed_run, config_path, "slow")
    deadline = time.monotonic() + 300
    state_file = killed_run / "state.json"
    while time.monotonic() < deadline:
        if state_file.exists() and json.loads(state_file.read_text())["step"] >= 4:
            break
        assert victim.poll() is None, victim.stdout.read().decode()[-2000:]
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be interrupted"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(state_file.read_text())["step"]
    assert 4 <= killed_at < 12

    resumed = _run_training(script, train_root, killed_run, config_path, "fast")
    for process in (straight, resumed):
        output = process.communicate(timeout=600)[0].decode()
        assert process.returncode == 0, output[-3000:]

    a, b = runs.load_run(tmp_path / "straight"), runs.load_run(killed_run)
    assert a.step == b.step == 12
    for network in ("online", "momentum"):
        for wa, wb in zip(a.encoder(network).get_weights(), b.encoder(network).get_weights()):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    qa, qb = _queues(a), _queues(b)
    assert qa.keys() == qb.keys()
    for name in qa:
        np.testing.assert_allclose(qa[name], qb[name], rtol=1e-5, atol=1e-6)


def _queues(handle):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(handle.checkpoint_path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("queues/") and "OPTIMIZER" not in name}


def test_callbacks_see_every_step_and_epoch(train_root, tmp_path):
    import keras

    from cmc_kit import training

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.epochs, self.ended = [], [], None

        def on_train_batch_end(self, step, logs=None):
            self.steps.append((step, logs["loss"]))

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append((epoch, logs["loss"]))

        def on_train_end(self, logs=None):
            self.ended = logs

    recorder = Recorder()
    result = training.train(train_root, tmp_path / "run", tiny_config(**{"train.epochs": 2}),
                            verbose=0, callbacks=[recorder])
    assert [s for s, _ in recorder.steps] == list(range(1, result.step + 1))
    assert [e for e, _ in recorder.epochs] == [0, 1]
    step_losses = [loss for _, loss in recorder.steps]
    per_epoch = len(step_losses) // 2
    assert recorder.epochs[0][1] == pytest.approx(np.mean(step_losses[:per_epoch]), rel=1e-5)
    assert recorder.ended == {"status": "completed", "step": result.step}


def test_an_unreadable_training_file_shortens_one_epoch_but_never_empties_the_next(tmp_path,
                                                                                    capsys):
    """A file broken after validation drops one batch; later epochs still train in full."""
    from cmc_kit import synth, training

    # 28 training samples, batch 4: losing one sample loses a whole batch of every later epoch.
    root = synth.generate(tmp_path / "data", n=28, size=64, seed=5, progress=False)
    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 3, "train.eval_subset": 0,
                            "data.validation_fraction": 0.0})
    training.train(root, run, config.with_overrides({"train.epochs": 1}), verbose=0)
    split = json.loads((run / "split.json").read_text())
    victim = next((root / "_dataset").glob(f"{split['train'][0]}_t.png"))
    victim.write_bytes(victim.read_bytes()[:200])  # truncated after validation
    result = training.train(root, run, config, verbose=1)
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    assert log["loss"].notna().all() and (log.loc[1:, "skipped_samples"] == 1).all()
    full = len(split["train"]) // 4
    expected = full + 2 * ((len(split["train"]) - 1) // 4)
    assert result.step == expected
    # The shortened epochs' progress bars still finish, on the epoch's mean loss, before the
    # epoch's summary line.
    out = capsys.readouterr().out
    finished = re.findall(r"loss: ([0-9.]+)[^\n\r]*\n  loss ([0-9.]+)", out)
    assert len(finished) == 2
    for shown, logged in finished:
        assert float(shown) == pytest.approx(float(logged), abs=1e-3)


def test_resume_after_an_unreadable_sample_continues_at_exactly_the_next_sample(
        tmp_path, monkeypatch):
    """An epoch interrupted after a skipped sample resumes where a straight run goes on.

    Batches after a skip start one plan place later than batches x B; resuming at batches x B
    (the old way) trained one sample twice and ended with different weights.
    """
    import shutil

    from cmc_kit import runs, synth, training, views

    root = synth.generate(tmp_path / "data", n=28, size=64, seed=5, progress=False)
    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0, "train.deterministic": True,
                            "data.validation_fraction": 0.0})
    base = tmp_path / "base"
    training.train(root, base, config.with_overrides({"train.epochs": 1}), verbose=0)
    # The sample at place 1 of epoch 2's plan, in the trainer's catalog order, becomes unreadable.
    split = json.loads((base / "split.json").read_text())
    catalog = runs.apply_split(runs.usable_catalog(root, check_pixels=False), split)["train"]
    order, _ = views.epoch_plan(len(catalog), seed=config.train.seed, epoch=1, training=True)
    victim = Path(catalog["terrain"].iloc[order[1]])
    victim.write_bytes(victim.read_bytes()[:200])
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(base, straight)
    shutil.copytree(base, interrupted)

    training.train(root, straight, config, verbose=0)
    steps_per_epoch = len(catalog) // 4
    monkeypatch.setattr(training.Trainer, "out_of_time",
                        lambda self, *args: int(self.state.step.numpy()) >= steps_per_epoch + 3)
    stopped = training.train(root, interrupted, config, time_limit=3600, verbose=0)
    assert stopped.status == "time_limit" and stopped.step == steps_per_epoch + 3
    state = json.loads((interrupted / "state.json").read_text())
    assert state["epoch_position"] == 3 * 4 + 1  # three batches and the skipped sample
    monkeypatch.undo()
    training.train(root, interrupted, config, verbose=0)

    a, b = runs.load_run(straight), runs.load_run(interrupted)
    assert a.step == b.step == 2 * steps_per_epoch - 1  # epoch 2 lost its last full batch
    for network in ("online", "momentum"):
        for wa, wb in zip(a.encoder(network).get_weights(), b.encoder(network).get_weights()):
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    qa, qb = _queues(a), _queues(b)
    for name in qa:
        np.testing.assert_allclose(qa[name], qb[name], rtol=1e-5, atol=1e-6)
    log_a, log_b = pd.read_csv(straight / "log.csv"), pd.read_csv(interrupted / "log.csv")
    assert list(log_a["skipped_samples"]) == list(log_b["skipped_samples"]) == [0, 1]
    np.testing.assert_allclose(log_a["loss"], log_b["loss"], rtol=1e-5)


def test_a_checkpoint_without_epoch_position_still_resumes_and_numbers_on(
        train_root, tmp_path, monkeypatch):
    """Checkpoints written before `epoch_position` existed resume at batches x B."""
    import tensorflow as tf

    from cmc_kit import runs, training

    original_init = training.Trainer.__init__

    def older_trainer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        checkpointer = self.checkpointer
        checkpointer.objects = {k: v for k, v in checkpointer.objects.items()
                                if k != "epoch_position"}
        checkpointer.checkpoint = tf.train.Checkpoint(**checkpointer.objects)
        checkpointer.manager = tf.train.CheckpointManager(
            checkpointer.checkpoint, str(self.run_dir / "checkpoints"),
            max_to_keep=self.config.train.keep_checkpoints, checkpoint_name="ckpt")

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0})
    monkeypatch.setattr(training.Trainer, "__init__", older_trainer)
    monkeypatch.setattr(training.Trainer, "out_of_time",
                        lambda self, *args: int(self.state.step.numpy()) >= 2)
    stopped = training.train(train_root, run, config, time_limit=3600, verbose=0)
    assert stopped.status == "time_limit" and stopped.step == 2
    saved = tf.train.load_checkpoint(stopped.checkpoint).get_variable_to_shape_map()
    assert not any(name.startswith("epoch_position") for name in saved)
    monkeypatch.undo()

    finished = training.train(train_root, run, config, verbose=0)
    assert finished.status == "completed" and finished.step == 12
    number = lambda path: int(str(path).rsplit("-", 1)[1])  # noqa: E731
    later = [c for c in runs.list_checkpoints(run) if c["step"] > stopped.step]
    assert later and all(number(c["path"]) > number(stopped.checkpoint) for c in later), \
        "a checkpoint number was reused after the resume"
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2]


def test_stopping_on_the_last_step_of_an_epoch_resumes_without_empty_or_duplicate_rows(
        train_root, tmp_path, monkeypatch):
    from cmc_kit import training

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0})
    # Out of time exactly when the first epoch's last step is done.
    steps_per_epoch = None

    def out_of_time(self, started, limit, step_seconds):
        return int(self.state.step.numpy()) >= self.steps_per_epoch

    monkeypatch.setattr(training.Trainer, "out_of_time", out_of_time)
    first = training.train(train_root, run, config, time_limit=3600, verbose=0)
    assert first.status == "time_limit"
    monkeypatch.undo()
    second = training.train(train_root, run, config, verbose=0)
    assert second.status == "completed"
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert log["loss"].notna().all()
    del steps_per_epoch


def test_resume_after_the_training_set_changed_size_names_the_cause(tmp_path):
    """A catalog passed as a table is taken as it is (files lost from a dataset *folder* are
    kept and skipped instead, see above): one sample fewer cannot resume exactly."""
    from cmc_kit import data, synth, training

    root = synth.generate(tmp_path / "data", n=30, size=64, seed=5, progress=False)
    run = tmp_path / "run"
    catalog = data.discover(root)
    training.train(run=run, catalog=catalog,
                   config=tiny_config(**{"train.epochs": 1, "train.eval_subset": 0}), verbose=0)
    split = json.loads((run / "split.json").read_text())
    smaller = catalog[catalog["id"] != split["train"][0]]
    with pytest.raises(CheckpointError, match="training samples: saved 24, now 23"):
        training.train(run=run, catalog=smaller,
                       config=tiny_config(**{"train.epochs": 2, "train.eval_subset": 0}), verbose=0)


def test_progress_bar_shows_the_loss_terms(train_root, tmp_path, capsys):
    from cmc_kit import training

    training.train(train_root, tmp_path / "run",
                   tiny_config(**{"train.epochs": 1, "train.eval_subset": 0}), verbose=1)
    out = capsys.readouterr().out
    assert "inter:" in out and "intra:" in out and "samples/s:" in out
    # The bar's final line shows the epoch's mean loss, as log.csv has it (not the last step's).
    shown = float(re.findall(r"loss: ([0-9.]+)", out)[-1])
    logged = pd.read_csv(tmp_path / "run" / "log.csv")["loss"].iloc[-1]
    assert shown == pytest.approx(logged, abs=1e-3)




def test_a_collapsed_encoder_shows_in_the_log_and_warns_once(train_root, tmp_path):
    """Inputs made identical across the batch (every sample replaced by the batch's first) give
    every sample the same embedding: the spread columns read ~0 and the trainer warns once;
    real inputs do not."""
    import tensorflow as tf

    from cmc_kit import training

    def identical_inputs(dataset):
        def first_everywhere(v):
            return tf.repeat(v[:1], tf.shape(v)[0], axis=0)   # [B, ...] all the first sample
        return dataset.map(lambda batch: {k: first_everywhere(v) if v.dtype.is_floating else v
                                          for k, v in batch.items()})

    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0})
    with pytest.warns(UserWarning, match=r"nearly collapsed.*embedding_spread 0\.0") as caught:
        training.train(train_root, tmp_path / "collapsed", config, verbose=0,
                       dataset_transform=identical_inputs)
    assert sum("nearly collapsed" in str(w.message) for w in caught) == 1  # once, not per epoch
    log = pd.read_csv(tmp_path / "collapsed" / "log.csv")
    for view in ("terrain", "height", "segmentation"):
        assert (log[f"spread_{view}"] < 1e-4).all()
    assert (log["embedding_spread"] < 0.01).all()
    assert (log["uniformity"] > -1e-3).all()          # all points coincide: log(1) = 0
    assert (log["alignment"] >= 0).all()

    # The same run on real inputs: its first epoch's embeddings are spread out.
    training.train(train_root, tmp_path / "real", config.with_overrides({"train.epochs": 1}),
                   verbose=0)
    real_log = pd.read_csv(tmp_path / "real" / "log.csv")
    assert real_log["embedding_spread"].iloc[0] > 100 * log["embedding_spread"].iloc[0] + 0.05
    assert real_log["uniformity"].iloc[0] < -0.1
