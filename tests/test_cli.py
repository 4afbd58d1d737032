"""The `cmc-kit` command line: train / resume / info / embed / explore / evaluate contracts."""

import json
import subprocess
import sys

import pytest

from cmc_kit.cli import main


def test_help_lists_every_design_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("synth", "validate", "download", "prepare", "train", "info", "embed",
                    "explore", "evaluate", "demo"):
        assert command in text


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "cmc_kit", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "cmc-kit" in result.stdout


def test_unknown_setting_is_a_clear_error(small_dataset, tmp_path, capsys):
    code = main(["train", "--data", str(small_dataset), "--run", str(tmp_path / "run"),
                 "--set", "model.nope=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.nope" in err and "model.embedding_dim" in err


def test_info_of_a_trained_run(trained_run, capsys):
    assert main(["info", "--run", str(trained_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epoch"] == 2 and info["step"] > 0
    assert info["queue_fill"] == info["queue_size"] > 0
    from cmc_kit.runs import list_checkpoints

    latest = list_checkpoints(trained_run)[-1]
    assert info["latest_checkpoint"] == latest["path"] and latest["step"] == info["step"]
    assert latest["epoch"] == 2 and latest["batch_in_epoch"] == 0


def test_info_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["info", "--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_train_resumes_automatically_and_rejects_a_different_model(small_dataset, trained_run,
                                                                     tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "state.json").read_text())["step"]
    assert main(["train", "--data", str(small_dataset), "--run", str(run), "--epochs", "3"]) == 0
    after = json.loads((run / "state.json").read_text())
    assert after["epoch"] == 3 and after["step"] == before * 3 // 2
    code = main(["train", "--data", str(small_dataset), "--run", str(run),
                 "--set", "model.width=0.25"])
    assert code == 2
    assert "model.width: saved 0.125, requested 0.25" in capsys.readouterr().err


@pytest.mark.slow
def test_embed_and_explore_commands_write_their_files(trained_run, small_dataset, tmp_path):
    import pandas as pd

    table_path = tmp_path / "table.csv"
    assert main(["embed", "--run", str(trained_run), "--data", str(small_dataset),
                 "--out", str(table_path)]) == 0
    table = pd.read_csv(table_path, dtype={"id": str})
    split = json.loads((trained_run / "split.json").read_text())
    assert sorted(table["id"]) == sorted(split["validation"])
    page, epochs_page = tmp_path / "explorer.html", tmp_path / "epochs.html"
    assert main(["explore", "--run", str(trained_run), "--data", str(small_dataset),
                 "--out", str(page), "--over-epochs", str(epochs_page)]) == 0
    assert page.stat().st_size > 100_000 and "plotly" in page.read_text()[:200_000].lower()
    # One frame per epoch the trainer embedded (2 epochs), in a standalone page.
    text = epochs_page.read_text()
    assert text.count('"name":"epoch ') == 2 and "Plotly.newPlot" in text
