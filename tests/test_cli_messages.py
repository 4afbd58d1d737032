"""What a user sees from `cmc-kit`: one-line errors before any work, quiet start-up, short
progress in logs, helpful messages and help texts. No training: tiny synthetic sets and fake runs."""

import functools
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from cmc_kit import cli, startup, synth
from cmc_kit.config import ConfigError, preset, valid_keys
from cmc_kit.errors import CmcKitError


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cmc-kit {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    synth.generate(root, n=4, size=24, seed=0, progress=False)
    return root


@pytest.fixture
def fake_run(tmp_path):
    """A run directory as training leaves it, minus real weights: config + checkpoint indexes."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    preset("cpu-demo").save(run / "config.json")
    for number in (2, 10, 11):  # numeric order, not text order
        (run / "checkpoints" / f"ckpt-{number}.index").write_bytes(b"")
        (run / "checkpoints" / f"ckpt-{number}.data-00000-of-00001").write_bytes(b"")
    return run


# -- 1. synth arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,expected", [("--n", "0", ">= 1"), ("--size", "4", "at least 16")])
def test_synth_bad_sizes_are_one_line_and_create_nothing(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "OUT"
    assert cli.main(["synth", str(out), flag, value]) == 2
    line = _one_error_line(capsys.readouterr().err, "synth")
    assert flag in line and expected in line and value in line
    assert not out.exists()


def test_synth_library_checks_size_before_creating_folders(tmp_path):
    with pytest.raises(ValueError, match="size must be an integer >= 16"):
        synth.generate(tmp_path / "OUT", n=2, size=4, progress=False)
    assert not (tmp_path / "OUT").exists()


# -- 2. a checkpoint that does not exist --------------------------------------------------------

def test_embed_missing_checkpoint_names_it_and_lists_the_existing_ones(fake_run, tiny_data, capsys):
    missing = fake_run / "checkpoints" / "ckpt-9"
    assert cli.main(["embed", "--run", str(fake_run), "--data", str(tiny_data),
                     "--checkpoint", str(missing)]) == 2
    line = _one_error_line(capsys.readouterr().err, "embed")
    assert f"Checkpoint {missing} does not exist" in line
    assert "ckpt-2, ckpt-10, ckpt-11 (the last is the latest)" in line
    assert "NotFoundError" not in line


def test_checkpoint_given_by_name_resolves_in_the_run(fake_run, tmp_path):
    from cmc_kit.runs import resolve_checkpoint

    assert resolve_checkpoint(fake_run, "ckpt-10") == str(fake_run / "checkpoints" / "ckpt-10")
    full = str(fake_run / "checkpoints" / "ckpt-2")
    assert resolve_checkpoint(fake_run, full) == full
    assert resolve_checkpoint(fake_run, None) is None
    empty = tmp_path / "empty_run"
    empty.mkdir()
    preset("cpu-demo").save(empty / "config.json")
    with pytest.raises(CmcKitError, match="holds no checkpoints"):
        resolve_checkpoint(empty, "ckpt-1")


# -- 3. a file where a folder is needed -----------------------------------------------------------

def test_train_run_that_is_a_file_fails_before_anything_else(tmp_path, tiny_data, capsys, monkeypatch):
    def not_called(**kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "train_from_cli", not_called)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for run in (afile, afile / "sub"):
        assert cli.main(["train", "--data", str(tiny_data), "--run", str(run)]) == 2
        line = _one_error_line(capsys.readouterr().err, "train")
        assert str(afile) in line and "is a file, not a folder" in line
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("command", ["synth", "prepare", "demo"])
def test_other_output_folders_that_are_files(tmp_path, tiny_data, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = {"synth": ["synth", str(afile), "--n", "1", "--size", "16"],
            "prepare": ["prepare", str(tiny_data), str(afile)],
            "demo": ["demo", "--out", str(afile), "--data", str(tiny_data)]}[command]
    assert cli.main(argv) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err, command)


def test_embed_out_with_a_wrong_suffix_fails_before_embedding(fake_run, tiny_data, tmp_path, capsys):
    assert cli.main(["embed", "--run", str(fake_run), "--data", str(tiny_data),
                     "--out", str(tmp_path / "table.txt")]) == 2
    assert ".parquet or .csv" in _one_error_line(capsys.readouterr().err, "embed")


# -- 4. evaluate --out ----------------------------------------------------------------------------

def test_evaluate_out_folder_gets_evaluation_csv_checked_before_the_probes(tmp_path, capsys,
                                                                           monkeypatch):
    from cmc_kit import evaluate

    folder = tmp_path / "X"
    folder.mkdir()
    seen = {}

    def fake_evaluate_run(run, data, *, out=None, grid=None, **kwargs):
        seen["out"], seen["grid"] = out, grid
        table = pd.DataFrame([{"task": "dominant_class", "probe": "knn", "metric": "accuracy",
                               "source": "trained", "value": 0.5, "low": 0.4, "high": 0.6}])
        evaluate.write_table(table, out)
        return table

    monkeypatch.setattr(evaluate, "evaluate_run", fake_evaluate_run)
    assert cli.main(["evaluate", "--run", "R", "--data", "D", "--out", str(folder)]) == 0
    assert seen["out"] == folder / "evaluation.csv" and seen["grid"] == 1
    assert f"Wrote {folder / 'evaluation.csv'}" in capsys.readouterr().out
    assert os.listdir(folder) == ["evaluation.csv"] and os.listdir(tmp_path) == ["X"]


def test_evaluate_out_below_a_file_fails_before_loading_the_run(tmp_path, capsys):
    from cmc_kit import evaluate

    afile = tmp_path / "afile"
    afile.write_text("")
    # The run does not exist either: the --out check comes first, before any work.
    assert cli.main(["evaluate", "--run", str(tmp_path / "no_run"), "--data", "D",
                     "--out", str(afile / "eval.csv")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err, "evaluate")
    with pytest.raises(CmcKitError, match="is a file, not a folder"):
        evaluate.evaluate_run(tmp_path / "no_run", "D", out=afile / "eval.csv")


def test_evaluate_grid_is_checked_before_loading_the_run(tmp_path, capsys):
    assert cli.main(["evaluate", "--run", str(tmp_path / "no_run"), "--data", "D",
                     "--grid", "0"]) == 2
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert "grid (--grid" in line and "Received: 0" in line


def test_atomic_write_text_leaves_no_temp_file_when_it_fails(tmp_path):
    from cmc_kit.config import atomic_write_text

    (tmp_path / "X").mkdir()
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "X", "text")
    assert os.listdir(tmp_path) == ["X"] and os.listdir(tmp_path / "X") == []
    atomic_write_text(tmp_path / "ok.csv", "a,b\n")
    assert (tmp_path / "ok.csv").read_text() == "a,b\n" and sorted(os.listdir(tmp_path)) == ["X", "ok.csv"]


# -- 5. start-up noise ----------------------------------------------------------------------------

def _run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # conftest sets it
    return subprocess.run([sys.executable, "-m", "cmc_kit", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_info_error_is_the_only_line_on_stderr(tmp_path):
    result = _run_cli("info", "--run", str(tmp_path / "MISSING"))
    assert result.returncode == 2
    assert "not a run directory" in _one_error_line(result.stderr, "info")


def test_tensorflow_start_up_log_is_not_shown(tmp_path):
    # prepare imports TensorFlow (oneDNN / cpu_feature_guard / absl lines) before it fails.
    result = _run_cli("prepare", str(tmp_path / "MISSING"), str(tmp_path / "cache"))
    assert result.returncode == 2
    assert "does not exist" in _one_error_line(result.stderr, "prepare")


def test_the_users_log_level_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.main(["info", "--run", str(tmp_path / "MISSING")])
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    cli.main(["info", "--run", str(tmp_path / "MISSING")])
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_native_log_filter_keeps_what_the_level_allows():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1795995048.781801   19421 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1795995048.815042   19421 cpu_feature_guard.cc:227] This TensorFlow binary\n"
            "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n"
            "E0000 00:00:1795995048.9   19421 cuda_dnn.cc:8579] Unable to register cuDNN factory\n"
            "a Python warning after an error line is kept\n"
            "2025-01-01 12:00:00.000001: W tensorflow/core/x.cc:1] an old-style warning\n")
    kept = startup.filter_native_log(text, 2)
    assert kept.splitlines() == [
        "E0000 00:00:1795995048.9   19421 cuda_dnn.cc:8579] Unable to register cuDNN factory",
        "a Python warning after an error line is kept"]
    assert startup.filter_native_log("a Python warning\n", 2) == "a Python warning\n"
    assert startup.filter_native_log(text, 0) == text
    assert "old-style warning" in startup.filter_native_log(text, 1)


# -- 6. progress in logs --------------------------------------------------------------------------

def test_synth_progress_is_a_few_lines_when_not_a_terminal(tmp_path, capsys):
    synth.generate(tmp_path / "d", n=30, size=16, seed=0, progress=True, workers=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 11 and lines[-1] == "synth: 30/30 samples (100%)"


def test_progress_line_rewrites_one_line_on_a_terminal():
    import io

    from cmc_kit.progress import ProgressLine

    stream = io.StringIO()
    progress = ProgressLine("synth", 3, stream=stream, interactive=True, min_interval_s=0.0)
    for done in (1, 2, 3):
        progress(done)
    assert stream.getvalue() == "\rsynth: 1/3 samples\rsynth: 2/3 samples\rsynth: 3/3 samples\n"


def test_validate_progress_is_a_few_lines_in_a_log(tmp_path, capsys):
    from cmc_kit import data

    synth.generate(tmp_path, n=60, size=16, seed=0, progress=False)
    data.validate(tmp_path, progress=True, check_pixels=False)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) <= 11 and "60/60" in err


# -- 7. messages ----------------------------------------------------------------------------------

def test_validate_suggests_the_cli_flag_and_the_python_argument(tmp_path, capsys):
    synth.generate(tmp_path, n=4, size=24, seed=0, progress=False)
    (tmp_path / "_dataset" / "0002_t.png").write_bytes(b"not a png")
    assert cli.main(["validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "`cmc-kit download --force`" in out and "download(force=True)" in out
    assert "add force=True" not in out


def test_bad_boolean_lists_the_accepted_words(tiny_data, tmp_path, capsys):
    assert cli.main(["train", "--data", str(tiny_data), "--run", str(tmp_path / "run"),
                     "--set", "data.augment=maybe"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "data.augment" in line and "'maybe'" in line
    for word in ("true", "false", "yes/no", "on/off", "1/0"):
        assert word in line
    with pytest.raises(ConfigError, match="an integer"):
        preset("cpu-demo").with_overrides(["data.batch_size=many"])


@pytest.mark.parametrize("text", ['["terrain","height"]', "terrain,height", "[terrain, height]",
                                  "['terrain', 'height']", " terrain , height "])
def test_list_settings_accept_json_and_commas(text):
    config = preset("cpu-demo").with_overrides([f"model.views={text}"])
    assert config.model.views == ("terrain", "height")


def test_malformed_list_setting_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"model\.views.*JSON list.*comma-separated"):
        preset("cpu-demo").with_overrides(['model.views=["terrain",3]'])
    assert preset("cpu-demo").with_overrides(['train.pairs="full"']).train.pairs == "full"


def test_prepare_says_what_it_wrote(tiny_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli.main(["prepare", str(tiny_data), str(cache)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert f"Wrote 4 samples of 24x24 px in {len(manifest['shards'])} shard(s) to {cache}" in out
    assert f"--set data.cache={cache}" in out


# -- 8. Ctrl-C during train -----------------------------------------------------------------------

def _interrupt_training(monkeypatch):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_from_cli", interrupted)


def test_ctrl_c_in_train_says_where_the_run_resumes(tmp_path, tiny_data, capsys, monkeypatch):
    _interrupt_training(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = str(run / "checkpoints" / "ckpt-7")
    (run / "state.json").write_text(json.dumps({"epoch": 3, "step": 120, "batch_in_epoch": 4,
                                                "latest_checkpoint": checkpoint}))
    assert cli.main(["train", "--data", str(tiny_data), "--run", str(run)]) == 130
    err = capsys.readouterr().err
    assert "step 120" in err and "3 epoch(s) done" in err and checkpoint in err
    assert "same command again to resume" in err


def test_ctrl_c_before_the_first_checkpoint(tmp_path, tiny_data, capsys, monkeypatch):
    _interrupt_training(monkeypatch)
    assert cli.main(["train", "--data", str(tiny_data), "--run", str(tmp_path / "new")]) == 130
    err = capsys.readouterr().err
    assert "before" in err and "from the beginning" in err


# -- 9. help texts --------------------------------------------------------------------------------

def _subparsers():
    import argparse

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_argument_has_help_text():
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, sub in _subparsers().items() for action in sub._actions
               if not action.help]
    assert missing == []


def test_train_help_lists_every_setting_name(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "All names are listed at the end of this help" in " ".join(text.split())
    epilog = text[text.index("settings for --set"):]
    for key in valid_keys():
        section, _, name = key.partition(".")
        assert f"{name}," in epilog or f"{name}\n" in epilog, key
        assert f"  {section}: " in epilog


def test_warnings_read_like_the_errors_without_a_source_line(tmp_path, capsys, monkeypatch):
    import warnings

    def warn_then_fail(**kwargs):
        warnings.warn("the queue was capped", UserWarning)
        warnings.warn("old option", DeprecationWarning)
        raise CmcKitError("stopped")

    monkeypatch.setattr(cli, "train_from_cli", warn_then_fail)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = cli.main(["train", "--data", str(tmp_path), "--run", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "cmc-kit train: warning: the queue was capped",
        "cmc-kit train: warning: DeprecationWarning: old option",
        "cmc-kit train: error: stopped",
    ]
    assert not isinstance(warnings.showwarning, functools.partial)  # put back afterwards
