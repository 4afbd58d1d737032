"""A hostile but realistic user: crafted PNGs, odd file names, impossible settings, read-only and
full disks, two trainers, damaged checkpoints, outputs aimed at the run's own files, SIGKILLs.
Each case fails on the code before the hardening issue, and each ends in one line (exit 2) or a
warning, with no data lost."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import cli, data, synth
from cmc_kit.errors import CmcKitError
from helpers import tiny_config


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cmc-kit {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A few-hundred-byte PNG whose header claims width x height 8-bit RGB pixels (its image
    data covers one row only): a decompression bomb for any decoder that trusts the header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00" * 3 * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))


@pytest.fixture
def dataset(tmp_path):
    return synth.generate(tmp_path / "data", n=20, size=48, seed=4, progress=False)


# -- 5. bad files fail one sample, not the dataset -----------------------------------------------

def test_a_decompression_bomb_and_a_huge_real_image_are_one_samples_problems(dataset, capsys):
    folder = dataset / "_dataset"
    _png_claiming(folder / "0003_t.png", 60000, 60000)
    assert (folder / "0003_t.png").stat().st_size < 6000
    # A real 14000 x 14000 image (1-bit, so it stays small on disk).
    Image.new("1", (14000, 14000)).save(folder / "0005_h.png")
    report = data.validate(dataset)
    assert report.num_usable == 18 and report.counts["too_large"] == 2
    kinds = {(p.id, p.kind) for p in report.problems}
    assert kinds == {("0003", "too_large"), ("0005", "too_large")}
    assert "60000x60000" in next(p.message for p in report.problems if p.id == "0003")
    assert cli.main(["validate", str(dataset)]) == 0  # usable samples remain
    out = capsys.readouterr().out
    assert "too_large 2" in out and "Traceback" not in out


def test_a_file_name_that_is_not_utf8_is_reported_and_skipped_by_training(dataset, tmp_path,
                                                                          capsys):
    from cmc_kit import training

    folder = os.fsencode(dataset / "_dataset")
    for suffix in (b"t", b"h", b"i2"):
        os.rename(os.path.join(folder, b"0002_" + suffix + b".png"),
                  os.path.join(folder, b"00\xff2_" + suffix + b".png"))
    report = data.validate(dataset)
    assert report.num_usable == 19 and report.counts["bad_name"] == 3
    assert all("00\\xff2" in p.file for p in report.problems)
    assert cli.main(["validate", str(dataset)]) == 0
    assert "not valid UTF-8" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="3 problem"):
        result = training.train(dataset, tmp_path / "run", tiny_config(**{"train.epochs": 1,
                                                                           "train.eval_subset": 0}),
                                verbose=0)
    assert result.epoch == 1


# -- 7. impossible settings: one line, nothing written ---------------------------------------------

@pytest.mark.parametrize("flag", [
    ["--set", "train.temperature=inf"], ["--set", "model.attention_heads=0"],
    ["--set", "train.learning_rate=inf"], ["--time-limit", "nan"]])
def test_impossible_settings_are_one_line_and_leave_no_run_behind(dataset, tmp_path, capsys, flag):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(dataset), "--run", str(run), *flag]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert flag[1].split("=")[0] in line or "--time-limit" in line
    assert not run.exists()


# -- 1. resume settings are honest -------------------------------------------------------------------

def test_a_learning_rate_changed_on_resume_is_the_one_that_trains(dataset, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    base = ["train", "--data", str(dataset), "--run", str(run), "--set", "data.crop_size=32",
            "--set", "data.batch_size=4", "--set", "model.width=0.125",
            "--set", "model.trunk=resnet18",
            "--set", "model.embedding_dim=16", "--set", "train.queue_multiplier=2",
            "--set", "train.eval_subset=0", "--set", "data.validation_fraction=0.2"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    assert cli.main(base + ["--epochs", "2", "--set", "train.learning_rate=0.0005"]) == 0
    log = pd.read_csv(run / "log.csv")
    assert log["learning_rate"].tolist() == pytest.approx([1e-3, 5e-4])
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 5e-4
    # The split's settings cannot change: refused with the usual message, nothing rewritten.
    saved = (run / "config.json").read_text()
    capsys.readouterr()
    assert cli.main(base + ["--set", "data.validation_fraction=0.5"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "data.validation_fraction: saved 0.2, requested 0.5" in line
    assert (run / "config.json").read_text() == saved


def test_resuming_on_other_images_under_the_same_ids_is_noticed(dataset, tmp_path):
    import json

    from cmc_kit import training

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 1, "train.eval_subset": 0})
    training.train(dataset, run, config, verbose=0)
    fingerprint = json.loads((run / "dataset.json").read_text())
    assert fingerprint["image_size"] == [48, 48] and len(fingerprint["checksums"]) == 4
    # The same ids at another size: refused, unless the user says so.
    bigger = synth.generate(tmp_path / "bigger", n=20, size=64, seed=4, progress=False)
    again = config.with_overrides({"train.epochs": 2})
    with pytest.raises(CmcKitError, match=r"48x48 images.*64x64.*data.allow_changed_data=true"):
        training.train(bigger, run, again, verbose=0)
    # The same size, other content in a training file: a warning, and training goes on.
    first = sorted(fingerprint["checksums"])[0]
    terrain = dataset / "_dataset" / f"{first}_t.png"
    with Image.open(terrain) as image:
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(terrain)
    with pytest.warns(UserWarning, match=rf"sample\(s\) {first} differ"):
        result = training.train(dataset, run, again, verbose=0)
    assert result.epoch == 2
    allowed = again.with_overrides({"train.epochs": 3, "data.allow_changed_data": True})
    assert training.train(bigger, run, allowed, verbose=0).epoch == 3


# -- 3. an interrupted fresh start ------------------------------------------------------------------

TINY_TRAIN = ["--set", "data.crop_size=32", "--set", "data.batch_size=4", "--set", "model.width=0.125",
              "--set", "model.trunk=resnet18",
              "--set", "model.embedding_dim=16", "--set", "train.queue_multiplier=2",
              "--set", "train.eval_subset=0", "--set", "data.validation_fraction=0.2"]


def test_a_run_set_aside_by_a_killed_fresh_start_is_restored_before_its_settings_are_read(
        dataset, tmp_path, capsys):
    import json

    from cmc_kit import runs

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(dataset), "--run", str(run), "--epochs", "1",
                     *TINY_TRAIN]) == 0
    saved = json.loads((run / "config.json").read_text())
    runs.FreshStart.set_aside(run)  # a fresh start killed before its first checkpoint
    capsys.readouterr()
    assert cli.main(["info", "--run", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err, "info")
    assert "fresh start moved" in line and "cmc-kit train" in line
    # Plain `train` with no settings: the run's own settings come back, not the preset's.
    assert cli.main(["train", "--data", str(dataset), "--run", str(run), "--epochs", "2"]) == 0
    after = json.loads((run / "config.json").read_text())
    assert after["model"] == saved["model"] and after["train"]["epochs"] == 2
    assert runs.run_info(run)["epoch"] == 2


# -- 4. outputs never overwrite run files ----------------------------------------------------------

@pytest.mark.parametrize("command,target", [
    ("explore", "split.json"), ("explore", "config.json"), ("evaluate", "log.csv"),
    ("embed", "state.json"), ("explore", "checkpoints/checkpoint")])
def test_an_output_aimed_at_a_run_file_is_refused_and_the_file_survives(
        trained_run, small_dataset, capsys, command, target):
    path = trained_run / target
    before = path.read_bytes()
    out = ["--out", str(path)]
    assert cli.main([command, "--run", str(trained_run), "--data", str(small_dataset), *out]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert target.split("/")[0] in line and ("own" in line or "must end in" in line)
    assert path.read_bytes() == before


def test_an_output_over_a_foreign_file_needs_force(trained_run, small_dataset, tmp_path, capsys):
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my own notes</html>")
    args = ["explore", "--run", str(trained_run), "--data", str(small_dataset), "--out", str(notes)]
    assert cli.main(args) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err, "explore")
    assert notes.read_text() == "<html>my own notes</html>"
    wrong_suffix = ["evaluate", "--run", str(trained_run), "--data", str(small_dataset),
                    "--out", str(tmp_path / "table.html")]
    assert cli.main(wrong_suffix) == 2
    assert ".csv" in _one_error_line(capsys.readouterr().err, "evaluate")
    # Its own earlier page is replaced without asking; a foreign one with --force.
    assert cli.main(args + ["--force"]) == 0
    from cmc_kit import explore

    assert explore.is_cmc_kit_page(notes)
    capsys.readouterr()
    assert cli.main(args) == 0


# -- 6. bad checkpoints ------------------------------------------------------------------------------

def _data_file(checkpoint: str) -> Path:
    return next(Path(checkpoint).parent.glob(Path(checkpoint).name + ".data-*"))


def test_a_damaged_latest_checkpoint_is_named_and_the_newest_usable_one_is_used(
        dataset, tmp_path, capsys):
    import json

    from cmc_kit import embed, runs, training

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0})
    training.train(dataset, run, config, verbose=0)
    first, latest = [c["path"] for c in runs.list_checkpoints(run)]
    data_file = _data_file(latest)
    data_file.write_bytes(data_file.read_bytes()[:100])  # cut short, e.g. by a full disk
    info = runs.run_info(run)
    assert info["latest_checkpoint"] == first and latest in info["damaged_checkpoints"]
    assert "cut short" in info["damaged_checkpoints"][latest]
    assert cli.main(["info", "--run", str(run)]) == 0
    assert "cut short" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"Damaged checkpoint.*cut short.*Using .*ckpt-1"):
        table = embed.embed_run(run, dataset, progress=False)
    assert table.attrs["epoch"] == 1
    # Training goes on from the usable checkpoint, saving over the damaged number.
    with pytest.warns(UserWarning, match=r"Passed over .*ckpt-2 \(.*cut short.*resuming from .*ckpt-1"):
        result = training.train(dataset, run, config, verbose=0)
    assert (result.epoch, runs.run_info(run)["damaged_checkpoints"]) == (2, {})
    assert json.loads((run / "state.json").read_text())["epoch"] == 2


def test_non_finite_weights_never_resume_and_never_embed(dataset, tmp_path, capsys):
    from cmc_kit import runs, training

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 1, "train.eval_subset": 0})
    training.train(dataset, run, config, verbose=0)
    catalog = runs.apply_split(data.discover(dataset), runs.read_json(run / "split.json"))
    trainer = training.Trainer(config, run, catalog["train"], verbose=0)
    trainer.restore_or_initialize()
    kernel = trainer.online.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    poisoned = trainer.checkpointer.manager.save()  # as a damaged copy would hold it
    capsys.readouterr()
    assert cli.main(["embed", "--run", str(run), "--data", str(dataset), "--checkpoint", poisoned,
                     "--out", str(tmp_path / "table.parquet")]) == 2
    assert "not finite" in _one_error_line(capsys.readouterr().err, "embed")
    assert not (tmp_path / "table.parquet").exists()
    with pytest.warns(UserWarning, match=r"Passed over .*ckpt-2 \(non-finite values"):
        result = training.train(dataset, run, config.with_overrides({"train.epochs": 2}),
                                verbose=0)
    assert result.epoch == 2


def test_leftovers_of_a_killed_save_and_a_stale_state_file_are_mended_at_the_next_start(
        dataset, tmp_path):
    import json

    from cmc_kit import training

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 2, "train.eval_subset": 0})
    training.train(dataset, run, config, verbose=0)
    (run / "checkpoints" / "ckpt-3_temp").mkdir()  # a save killed halfway
    (run / "checkpoints" / "ckpt-3_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    state = json.loads((run / "state.json").read_text())
    stale = dict(state, step=state["step"] // 2, epoch=1, latest_checkpoint="ckpt-1")
    (run / "state.json").write_text(json.dumps(stale))  # killed between a save and this file
    training.train(dataset, run, config, verbose=0)   # nothing left to train
    assert not (run / "checkpoints" / "ckpt-3_temp").exists()
    mended = json.loads((run / "state.json").read_text())
    assert (mended["epoch"], mended["step"]) == (2, state["step"])
    assert mended["latest_checkpoint"].endswith("ckpt-2")


# -- 2. one trainer per run directory ----------------------------------------------------------------

SLOW_TRAINER = """
import sys, time
import tensorflow as tf
from cmc_kit import training
from cmc_kit.config import Config

def slow_down(dataset):
    def pause(batch):
        tf.py_function(lambda: time.sleep(0.5), [], [])
        return batch
    return dataset.map(pause)

training.train(sys.argv[1], sys.argv[2], Config.load(sys.argv[3]), verbose=0,
               dataset_transform=slow_down)
"""


def test_a_second_trainer_on_a_live_run_is_refused_at_once_and_a_killed_ones_lock_is_taken_over(
        dataset, tmp_path, capsys):
    import json
    import signal
    import time

    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 3, "train.eval_subset": 0})
    config.save(tmp_path / "config.json")
    script = tmp_path / "slow.py"
    script.write_text(SLOW_TRAINER)
    first = subprocess.Popen([sys.executable, str(script), str(dataset), str(run),
                              str(tmp_path / "config.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (run / "state.json").exists():  # training is under way
            assert first.poll() is None, first.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first trainer never got going"
            time.sleep(0.2)
        before = (run / "log.csv").read_text()
        for extra in ([], ["--fresh"]):
            started = time.monotonic()
            assert cli.main(["train", "--data", str(dataset), "--run", str(run), *extra]) == 2
            line = _one_error_line(capsys.readouterr().err, "train")
            assert f"pid {first.pid}" in line and "another process" in line
            assert time.monotonic() - started < 60  # refused at once, not after its own setup
        # The live trainer may have logged another epoch meanwhile; nothing else wrote.
        after = (run / "log.csv").read_text()
        epochs = [int(row.split(",")[0]) for row in after.splitlines()[1:]]
        assert after.startswith(before) and epochs == list(range(1, len(epochs) + 1)), after
        assert not (run / ".before-fresh").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed trainer's lock is not stale forever: the next start takes it over.
    from cmc_kit import training

    result = training.train(dataset, run, config, verbose=0)
    assert result.epoch == 3
    assert json.loads((run / "state.json").read_text())["epoch"] == 3


# -- 7. a read-only run directory, a full disk ---------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small disk here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_read_only_run_directory_is_one_line(dataset, small_disk, tmp_path, capsys):
    run = small_disk / "run"
    args = ["train", "--data", str(dataset), "--run", str(run), "--epochs", "1", *TINY_TRAIN]
    assert cli.main(args) == 0
    before = sorted(p.name for p in run.iterdir())
    # The same run seen through a read-only mount, as a run attached under /kaggle/input is.
    view = tmp_path / "read-only"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(run), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        capsys.readouterr()
        assert cli.main(["train", "--data", str(dataset), "--run", str(view), "--epochs", "2"]) == 2
        line = _one_error_line(capsys.readouterr().err, "train")
        assert str(view) in line and "Read-only file system" in line and "RUN_DIR" in line
        assert cli.main(["info", "--run", str(view)]) == 0  # reading still works
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(dataset, small_disk, capsys):
    from cmc_kit import runs

    run = small_disk / "run"
    args = ["train", "--data", str(dataset), "--run", str(run), *TINY_TRAIN]
    assert cli.main(args + ["--epochs", "1"]) == 0
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # fill the disk to the last byte
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError:
            pass
    capsys.readouterr()
    assert cli.main(args + ["--epochs", "2"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "No space left on the disk of" in line and str(run) in line and "MB free" in line
    assert "ckpt-1" in line and "not touched" in line
    info = runs.run_info(run)
    assert info["epoch"] == 1 and not info["damaged_checkpoints"]
    filler.unlink()  # space again: the same command resumes
    assert cli.main(args + ["--epochs", "2"]) == 0
    assert runs.run_info(run)["epoch"] == 2


# -- 8. messages that send nobody in circles ---------------------------------------------------------

def test_with_too_few_training_samples_the_advice_is_one_that_works(tmp_path):
    from cmc_kit import training
    from cmc_kit.errors import DataError

    root = synth.generate(tmp_path / "three", n=3, size=48, seed=2, progress=False)
    with pytest.raises(DataError, match=r"fewer than the 4 training needs.*validation_fraction"):
        training.train(root, tmp_path / "run", tiny_config(**{"data.validation_fraction": 0.5}),
                       verbose=0)
    # A batch that is merely too big gets a batch size that gives two batches.
    root = synth.generate(tmp_path / "ten", n=10, size=48, seed=2, progress=False)
    with pytest.raises(DataError, match=r"data.batch_size=4\)") as err:
        training.train(root, tmp_path / "run2", tiny_config(**{
            "data.validation_fraction": 0.1, "data.batch_size": 6}), verbose=0)
    assert "fewer than two batches of 6" in str(err.value)


def test_broken_credentials_are_named_as_broken_not_as_missing(tmp_path, monkeypatch):
    from cmc_kit import kaggle
    from cmc_kit.errors import CredentialsError

    planted = "kaggle-key-0123456789abcdef"
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(kaggle, "import_kagglehub", lambda: None)
    (tmp_path / "kaggle.json").write_text('{"username": "me", "key": "' + planted + '",}')
    with pytest.raises(CredentialsError, match=r"cannot be used: .*kaggle.json is not valid JSON"
                                               r".*line 1") as err:
        kaggle.download(dest=tmp_path / "data")
    assert planted not in str(err.value) and "not found" not in str(err.value)
    (tmp_path / "kaggle.json").write_bytes(b"\xff\xfe" + planted.encode("utf-16-le"))
    with pytest.raises(CredentialsError, match=r"cannot be used: .*kaggle.json is not a text "
                                               r"file; download a new one"):
        kaggle.download(dest=tmp_path / "data")
    (tmp_path / "kaggle.json").unlink()
    monkeypatch.setenv("KAGGLE_API_TOKEN", f'"{planted}"')  # pasted with its quotes
    with pytest.raises(CredentialsError, match=r"KAGGLE_API_TOKEN is set but is not a Kaggle "
                                               r"token") as err:
        kaggle.download(dest=tmp_path / "data")
    assert planted not in str(err.value)


def test_an_archive_never_deletes_a_dataset_folder_already_there(tmp_path):
    import zipfile

    from cmc_kit.kaggle.archive import safe_unzip

    dest = tmp_path / "data"
    (dest / "_dataset").mkdir(parents=True)
    (dest / "_dataset" / "mine_t.png").write_bytes(b"the user's own file")
    archive = tmp_path / "download.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("_dataset/0001_t.png", b"from kaggle")
    with pytest.warns(UserWarning, match=r"_dataset was in the way.*kept as .*_dataset.before-unzip"):
        safe_unzip(archive, dest)
    assert (dest / "_dataset" / "0001_t.png").read_bytes() == b"from kaggle"
    assert (dest / "_dataset.before-unzip" / "mine_t.png").read_bytes() == b"the user's own file"


# -- 9. SIGKILLs at random points: the run still ends bit-identical ------------------------------------

KILLABLE_TRAINER = """
import sys, time
import tensorflow as tf
from cmc_kit import training
from cmc_kit.config import Config

def slow_down(dataset):  # test-only: room to be killed between (and during) steps
    def pause(batch):
        tf.py_function(lambda: time.sleep(0.2), [], [])
        return batch
    return dataset.map(pause)

training.train(sys.argv[1], sys.argv[2], Config.load(sys.argv[3]), verbose=0,
               dataset_transform=slow_down if sys.argv[4] == "slow" else None)
"""


@pytest.mark.slow
def test_soak_random_sigkills_resume_bit_identical_to_a_straight_run(dataset, tmp_path):
    import json
    import random
    import signal
    import time

    import tensorflow as tf

    from cmc_kit import runs

    config = tiny_config(**{"train.epochs": 3, "train.checkpoint_every_steps": 1,
                            "train.deterministic": True, "train.eval_subset": 0})
    config.save(tmp_path / "config.json")
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE_TRAINER)
    env = dict(os.environ, PYTHONHASHSEED="0")

    def start(run, mode):
        return subprocess.Popen([sys.executable, str(script), str(dataset), str(run),
                                 str(tmp_path / "config.json"), mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    straight = start(tmp_path / "straight", "fast")
    victim_run, rng, kills = tmp_path / "victim", random.Random(7), 0
    deadline = time.monotonic() + 480  # bounded: two kills (each restart is a TensorFlow start)
    total_steps = 3 * (16 // 4)
    while time.monotonic() < deadline and kills < 2:
        victim = start(victim_run, "slow")
        state_file = victim_run / "state.json"
        done = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
        target = done + rng.randint(1, 3)
        while victim.poll() is None and time.monotonic() < deadline:
            if state_file.exists() and json.loads(state_file.read_text())["step"] >= target:
                time.sleep(rng.uniform(0.0, 0.6))  # anywhere: mid-step, mid-save, mid-log
                break
            time.sleep(0.05)
        if victim.poll() is not None:  # it finished before the kill came
            break
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
    assert kills >= 2, "too few kills happened to mean anything"
    finish = start(victim_run, "fast")
    for process in (straight, finish):
        output = process.communicate(timeout=600)[0].decode()
        assert process.returncode == 0, output[-3000:]

    a, b = runs.load_run(tmp_path / "straight"), runs.load_run(victim_run)
    assert a.step == b.step == total_steps
    for network in ("online", "momentum"):
        for wa, wb in zip(a.encoder(network).get_weights(), b.encoder(network).get_weights()):
            np.testing.assert_array_equal(wa, wb)  # bit for bit
    ra, rb = tf.train.load_checkpoint(a.checkpoint_path), tf.train.load_checkpoint(b.checkpoint_path)
    for name in ra.get_variable_to_shape_map():
        if name.startswith("queues/") and "OPTIMIZER" not in name:
            np.testing.assert_array_equal(ra.get_tensor(name), rb.get_tensor(name))
    assert pd.read_csv(victim_run / "log.csv")["epoch"].tolist() == [1, 2, 3]


# -- run files that are not even text (a disk error, a half-synced bucket) -----------------------

NOT_TEXT = b"\xff\xfe\x00\x81"


def test_a_state_file_that_is_not_text_only_costs_its_summary(trained_run, tmp_path, capsys):
    """state.json only summarises the checkpoints: info and every reader carry on from them."""
    import json
    import shutil

    from cmc_kit import runs

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    expected = runs.list_checkpoints(run)[-1]
    (run / "state.json").write_bytes(NOT_TEXT)
    assert cli.main(["info", "--run", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert (info["epoch"], info["step"], info["latest_checkpoint"]) == \
        (expected["epoch"], expected["step"], expected["path"])
    assert info["queue_fill"] is None  # unknown, not a made-up 0
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "state.json is damaged" in warning[0], captured.err
    assert "Traceback" not in captured.err
    assert runs.load_run(run).encoder("online") is not None


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"[]", "Settings must be an object of sections"),
    ("config.json", b'{"train": 5}', "section 'train' must be an object of train.* settings"),
    ("split.json", b"[1, 2]", "a JSON object was expected, not list"),
    ("split.json", b'{"train": 5, "validation": []}', "'train' should be a list of sample ids"),
])
def test_run_files_that_are_json_of_the_wrong_shape_are_one_line(trained_run, small_dataset,
                                                                 tmp_path, capsys, name, content,
                                                                 message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / name).write_bytes(content)
    for command in (["embed", "--run", str(run), "--data", str(small_dataset), "--out",
                     str(tmp_path / "table.parquet")],
                    ["train", "--run", str(run), "--data", str(small_dataset), "--epochs", "3"]):
        assert cli.main(command) == 2
        line = _one_error_line(capsys.readouterr().err, command[0])
        assert str(run / name) in line and message in line, line
    assert (run / name).read_bytes() == content


def test_a_state_file_of_the_wrong_shape_only_costs_its_summary(trained_run, tmp_path):
    import shutil

    from cmc_kit import runs

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "state.json").write_text("[]")
    with pytest.warns(UserWarning, match=r"state.json is damaged \(a JSON object was expected"):
        info = runs.run_info(run)
    assert info["step"] == runs.list_checkpoints(run)[-1]["step"]


@pytest.mark.parametrize("name", ["config.json", "split.json"])
def test_a_run_file_that_is_not_text_is_one_line_naming_it(trained_run, small_dataset, tmp_path,
                                                          capsys, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / name).write_bytes(NOT_TEXT)
    command = ["embed", "--run", str(run), "--data", str(small_dataset), "--out",
               str(tmp_path / "table.parquet")]
    assert cli.main(command) == 2
    line = _one_error_line(capsys.readouterr().err, "embed")
    assert f"{run / name}" in line and "codec can't decode" in line
    assert (run / name).read_bytes() == NOT_TEXT  # left for the user to look at


def test_a_log_that_is_not_text_is_set_aside_and_training_goes_on(trained_run, small_dataset,
                                                                 tmp_path, capsys):
    import shutil

    import pandas as pd

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "log.csv").write_bytes(NOT_TEXT)
    assert cli.main(["train", "--data", str(small_dataset), "--run", str(run), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "log.csv could not be read" in err and "moved to" in err and "Traceback" not in err
    assert (run / "log.csv.damaged").read_bytes() == NOT_TEXT  # kept, not deleted
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [3]  # a new log from here on
    # A fresh start replaces it with the rest of the old run.
    assert cli.main(["train", "--data", str(small_dataset), "--run", str(run), "--epochs", "1",
                     "--fresh", *TINY_TRAIN]) == 0
    assert not list(run.glob("log.csv.damaged*")) and not (run / ".before-fresh").exists()


def test_a_damaged_data_fingerprint_says_the_run_is_intact_and_how_to_resume(
        trained_run, small_dataset, tmp_path, capsys):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "dataset.json").write_bytes(NOT_TEXT)
    command = ["train", "--data", str(small_dataset), "--run", str(run), "--epochs", "3"]
    assert cli.main(command) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "dataset.json" in line and "run itself is intact: delete that file" in line
    assert "--fresh" not in line  # starting over would throw the run away
    (run / "dataset.json").unlink()
    assert cli.main(command) == 0  # as the message says
    assert json.loads((run / "dataset.json").read_text())["checksums"]
