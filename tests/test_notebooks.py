"""Notebooks: jupytext pairs in sync, outputs stripped, all six executed in order in a real
Jupyter kernel (smoke mode, tiny synthetic data), and the helpers of cmc_kit/notebook.py."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit.errors import CmcKitError, CredentialsError, DataError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ORDER = ["01_data_prep", "02_train", "03_resume", "04_explore", "05_evaluate", "06_finetune"]


# -- the committed notebooks ---------------------------------------------------------------------

def _cells(notebook):
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in notebook.cells]


def test_every_notebook_has_its_py_twin_and_nothing_else_is_there():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == ORDER
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_py_source_and_committed_ipynb_are_in_sync(name):
    import jupytext
    import nbformat

    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert _cells(from_py) == _cells(committed), (
        f"notebooks/{name}.py and .ipynb differ: run `make notebooks-sync` "
        f"(jupytext --sync notebooks/*.py)")
    assert committed.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert committed.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", ORDER)
def test_committed_notebook_has_no_outputs(name):
    import nbformat

    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"notebooks/{name}.ipynb holds outputs: strip them with "
                f"`jupytext --to ipynb notebooks/{name}.py`")


@pytest.mark.parametrize("name", ORDER)
def test_notebook_follows_the_house_layout(name):
    import nbformat

    cells = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells
    header = cells[0].source
    assert cells[0].cell_type == "markdown"
    for part in ("What it does", "Accelerator", "Expected runtime"):
        assert part in header, f"{name}: header lacks {part!r}"
    code = [c for c in cells if c.cell_type == "code"]
    assert "CMC_KIT_SOURCE" in code[0].source and "%pip install" in code[0].source
    assert "environment_report()" in code[0].source
    parameters = [c for c in cells if "parameters" in c.metadata.get("tags", ())]
    assert len(parameters) == 1
    defined = {}
    exec(parameters[0].source, {"in_ci": lambda: "CI"}, defined)  # plain assignments only
    assert defined["DATA_DIR"] is None
    assert name == "01_data_prep" or defined["RUN_DIR"] is None
    assert defined["SMOKE"] == "CI"
    for cell in code:  # notebooks call cmc_kit; models, losses and loops live in the library
        for forbidden in ("tf.GradientTape", "keras.layers.", "def train", "class "):
            assert forbidden not in cell.source, f"{name}: {forbidden!r} in a notebook cell"


# -- running them ------------------------------------------------------------------------------

def _execute(name, out_dir, parameters):
    import papermill

    return papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"), parameters=parameters,
        kernel_name="python3", cwd=str(out_dir), progress_bar=False, log_output=False,
        execution_timeout=600)


def _outputs(notebook, kind):
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if kind in o.get("data", {})]


@pytest.mark.slow
def test_notebooks_run_in_order_and_hand_over_through_files(tmp_path, monkeypatch):
    from cmc_kit import data, runs
    from cmc_kit.config import default_paths

    monkeypatch.setenv("CI", "1")  # the kernel inherits it: smoke mode
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    data_dir, run = tmp_path / "data", tmp_path / "runs" / "terrain-cmc"
    pointer = default_paths()["data"] / "dataset.json"
    pointer_before = pointer.read_bytes() if pointer.exists() else None

    _execute("01_data_prep", tmp_path, {"DATA_DIR": str(data_dir)})
    assert len(data.discover(data_dir)) == 40
    assert (tmp_path / "data-cache" / "manifest.json").is_file()
    with Image.open(tmp_path / "data-views.png") as views_png:
        assert views_png.width > 4 * 32 and views_png.height > 3 * 32

    params = {"DATA_DIR": str(data_dir), "RUN_DIR": str(run)}
    trained = _execute("02_train", tmp_path, params)
    split = json.loads((run / "split.json").read_text())
    steps_per_epoch = len(split["train"]) // 8  # smoke batch size
    after_02 = runs.run_info(run)
    assert after_02["latest_checkpoint"] and Path(after_02["latest_checkpoint"] + ".index").is_file()
    assert (after_02["epoch"], after_02["step"]) == (2, 2 * steps_per_epoch)
    # The live plot redrew one display in place: one plot output, holding every step's loss.
    plots = _outputs(trained, "application/vnd.plotly.v1+json")
    live = [p for p in plots if "loss per step" in json.dumps(p["data"])]
    assert len(live) == 1
    step_trace = next(t for t in live[0]["data"]["application/vnd.plotly.v1+json"]["data"]
                      if t["name"] == "loss per step")
    assert list(step_trace["x"]) == list(range(1, 2 * steps_per_epoch + 1))

    _execute("03_resume", tmp_path, params)
    after_03 = runs.run_info(run)
    assert (after_03["epoch"], after_03["step"]) == (3, 3 * steps_per_epoch)
    assert after_03["queue_fill"] == after_02["queue_fill"]
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    assert list(log["step"]) == [steps_per_epoch * e for e in (1, 2, 3)]

    _execute("04_explore", tmp_path, params)
    page = (run / "explorer.html").read_text()
    assert "plotly" in page.lower() and '"0040"' in page
    assert (run / "mosaic.png").is_file()
    epochs_page = (run / "embedding_over_epochs.html").read_text()
    assert [f'"name":"epoch {e}"' in epochs_page for e in (1, 2, 3)] == [True] * 3

    _execute("05_evaluate", tmp_path, params)
    table = pd.read_csv(run / "evaluation.csv")
    assert {"task", "probe", "metric", "trained", "random_init", "raw_pixels"} <= set(table.columns)
    assert "dominant_class" in set(table["task"])

    finetuned = _execute("06_finetune", tmp_path, params)
    efficiency = pd.read_csv(run / "finetune" / "label_efficiency.csv")
    assert sorted(set(efficiency["arm"])) == ["finetuned", "frozen", "random_init"]
    assert sorted(set(efficiency["labels"])) == [0.25, 1.0]  # the smoke fractions
    assert efficiency["images"].eq(len(split["validation"])).all()
    assert len(_outputs(finetuned, "image/png")) == 1  # terrain / truth / arms, side by side
    export_dir = run.parent / "terrain-cmc-export"
    assert (export_dir / "terrain_trunk.keras").is_file()
    assert "Label efficiency" in (export_dir / "MODEL_CARD.md").read_text()

    # Everything went to the tmp folders: the repository's data/dataset.json is untouched.
    assert (pointer.read_bytes() if pointer.exists() else None) == pointer_before


# -- helpers: data choice -----------------------------------------------------------------------

def _fake_dataset(root: Path) -> Path:
    from cmc_kit import synth

    synth.generate(root, n=2, size=32, seed=1, progress=False)
    return root


def test_get_data_uses_a_folder_that_already_holds_samples(tmp_path):
    from cmc_kit import notebook

    folder = _fake_dataset(tmp_path / "mine")
    calls = []
    choice = notebook.get_data(folder, downloader=lambda **kw: calls.append(kw))
    assert (choice.path, choice.source, calls) == (folder, "folder", [])


def test_get_data_downloads_into_the_given_folder_when_it_is_empty(tmp_path):
    from cmc_kit import notebook

    target = tmp_path / "terrain"
    received = {}

    def downloader(dest):
        received["dest"] = dest
        return _fake_dataset(dest)

    choice = notebook.get_data(target, downloader=downloader)
    assert received["dest"] == target
    assert (choice.path, choice.source) == (target, "kaggle")


def test_get_data_falls_back_to_synthetic_and_says_why(tmp_path):
    from cmc_kit import data, notebook

    def no_credentials(dest):
        raise CredentialsError("No Kaggle credentials found: put kaggle.json in ~/.kaggle")

    choice = notebook.get_data(tmp_path / "d", downloader=no_credentials, synthetic_samples=3,
                               synthetic_size=32)
    assert choice.source == "synthetic"
    assert "No Kaggle credentials found" in choice.note and "synthetic" in choice.note
    catalog = data.discover(choice.path)
    assert len(catalog) == 3
    with Image.open(catalog["terrain"].iloc[0]) as image:
        assert image.size == (32, 32)


def test_force_synthetic_never_asks_kaggle(tmp_path):
    from cmc_kit import notebook

    def must_not_run(dest):
        raise AssertionError("downloader called")

    choice = notebook.get_data(tmp_path / "s", force_synthetic=True, downloader=must_not_run,
                               synthetic_samples=2, synthetic_size=32)
    assert choice.source == "synthetic" and (tmp_path / "s" / "metadata.csv").is_file()


def test_force_synthetic_never_writes_into_another_dataset(tmp_path):
    from cmc_kit import notebook

    folder = _fake_dataset(tmp_path / "mine")
    (folder / "metadata.csv").unlink()  # the user's own triplets, not a synthetic set
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(DataError, match=r"(?s)already holds a dataset.*another folder"):
        notebook.get_data(folder, force_synthetic=True, synthetic_samples=2, synthetic_size=32)
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_a_data_dir_that_does_not_exist_is_said_when_falling_back(tmp_path):
    from cmc_kit import notebook

    def no_credentials(dest):
        raise CredentialsError("No Kaggle credentials found")

    typo = tmp_path / "my_terain"
    choice = notebook.get_data(typo, downloader=no_credentials, synthetic_samples=2,
                               synthetic_size=32)
    assert choice.source == "synthetic" and f"DATA_DIR {typo} did not exist" in choice.note
    # An existing (empty) download folder is not a typo: no such line.
    (tmp_path / "empty").mkdir()
    choice = notebook.get_data(tmp_path / "empty", downloader=no_credentials,
                               synthetic_samples=2, synthetic_size=32)
    assert "did not exist" not in choice.note


def test_overrides_must_be_a_dict(tmp_path):
    from cmc_kit import notebook
    from cmc_kit.config import ConfigError

    with pytest.raises(ConfigError, match=r"OVERRIDES must be a dict.*model.width"):
        notebook.choose_config(tmp_path / "run", overrides=["model.width=0.25"],
                               accelerator_names=[])


def test_saved_notebooks_keep_an_html_copy_of_plotly_figures():
    import plotly.graph_objects as go
    import plotly.io as pio

    from cmc_kit import notebook

    before = pio.renderers.default
    try:
        pio.renderers.default = "plotly_mimetype"
        assert notebook.keep_figures_in_saved_notebooks() == "plotly_mimetype+notebook_connected"
        bundle = pio.renderers._build_mime_bundle(go.Figure().to_dict())  # what a cell shows
        assert {"application/vnd.plotly.v1+json", "text/html"} <= set(bundle)
        assert notebook.keep_figures_in_saved_notebooks() == "plotly_mimetype+notebook_connected"
        pio.renderers.default = "kaggle"  # Kaggle's renderer already writes HTML: left alone
        assert notebook.keep_figures_in_saved_notebooks() == "kaggle"
    finally:
        pio.renderers.default = before


def test_find_data_reads_the_choice_01_recorded(tmp_path):
    from cmc_kit import notebook

    folder = _fake_dataset(tmp_path / "chosen")
    pointer = tmp_path / "data-root" / "dataset.json"
    notebook.remember_data(notebook.DataChoice(folder, "synthetic", ""), pointer)
    assert notebook.find_data(pointer=pointer) == folder.resolve()
    assert notebook.find_data(folder) == folder


def test_find_data_errors_name_the_folder_and_the_fix(tmp_path):
    from cmc_kit import notebook

    with pytest.raises(DataError, match=r"(?s)empty.*01_data_prep"):
        notebook.find_data(tmp_path / "empty")
    with pytest.raises(DataError, match=r"(?s)nothing\.json.*01_data_prep"):
        notebook.find_data(pointer=tmp_path / "nothing.json")


def test_cache_setting_only_points_at_a_finished_cache(tmp_path):
    from cmc_kit import notebook

    cache = tmp_path / "c"
    assert notebook.cache_setting(cache) == ""
    cache.mkdir()
    assert notebook.cache_setting(cache) == ""
    (cache / "manifest.json").write_text("{}")
    assert notebook.cache_setting(cache) == str(cache)
    assert notebook.cache_dir_for(tmp_path / "terrain") == tmp_path.resolve() / "terrain-cache"


# -- helpers: looking at things ---------------------------------------------------------------------

def test_views_grid_shows_the_centre_crops_pixel_for_pixel(synthetic_root):
    from cmc_kit import data, notebook

    catalog = data.discover(synthetic_root)
    crop, tile, samples = 32, 64, 2
    grid = np.asarray(notebook.views_grid(catalog, crop_size=crop, samples=samples, tile=tile))
    gap, header, label = 4, 18, 56  # the grid's layout
    assert grid.shape == (header + samples * (tile + gap), label + 4 * (tile + gap), 3)
    scale = tile // crop
    for row in range(samples):
        with Image.open(catalog["terrain"].iloc[row]) as t, Image.open(catalog["segmentation"].iloc[row]) as s:
            terrain, segmentation = np.asarray(t.convert("RGB")), np.asarray(s.convert("RGB"))
        top = (terrain.shape[0] - crop) // 2
        expected = {0: terrain, 1: segmentation}  # columns: terrain, segmentation, height, overview
        y = header + row * (tile + gap)
        for column, image in expected.items():
            x = label + column * (tile + gap)
            shown = grid[y:y + tile:scale, x:x + tile:scale]
            np.testing.assert_array_equal(shown, image[top:top + crop, top:top + crop])
        # The overview carries the yellow outline of the crop window at its scaled position.
        x = label + 3 * (tile + gap)
        edge = int(round(top * tile / terrain.shape[0]))
        assert tuple(grid[y + tile // 2, x + edge]) == (255, 255, 0)
        assert tuple(grid[y + 1, x + 1]) != (255, 255, 0)


def test_config_table_lists_every_setting_with_its_value():
    from cmc_kit import notebook
    from cmc_kit.config import preset, valid_keys

    config = preset("cpu-demo").with_overrides({"model.width": 0.25})
    table = notebook.config_table(config)
    assert list(table["setting"]) == valid_keys()
    values = dict(zip(table["setting"], table["value"]))
    assert values["model.width"] == 0.25 and values["model.views"] == "terrain,segmentation,height,overview"


def test_default_preset_follows_the_accelerator():
    from cmc_kit import notebook

    assert notebook.default_preset([]) == "cpu-demo"
    assert notebook.default_preset(["GPU:0 Tesla T4"]) == "kaggle-t4"


def test_choose_config_keeps_a_saved_run_and_picks_a_preset_for_a_new_one(tmp_path):
    from cmc_kit import notebook
    from cmc_kit.config import preset

    new = notebook.choose_config(tmp_path / "new", accelerator_names=["GPU:0"])
    assert new == preset("kaggle-t4")
    saved = preset("cpu-demo").with_overrides({"model.width": 0.25})
    (tmp_path / "old").mkdir()
    saved.save(tmp_path / "old" / "config.json")
    resumed = notebook.choose_config(tmp_path / "old", epochs=30, accelerator_names=["GPU:0"])
    assert resumed.model == saved.model and resumed.train.epochs == 30


def test_kaggle_t4_on_a_float32_gpu_gets_a_batch_that_fits(tmp_path, capsys):
    from cmc_kit import notebook

    p100 = notebook.choose_config(tmp_path / "p100", accelerator_names=["GPU:0 Tesla P100"],
                                  gpu_precision="float32")
    assert p100.data.batch_size == notebook.FLOAT32_GPU_BATCH == 16
    assert "float32" in capsys.readouterr().out
    t4 = notebook.choose_config(tmp_path / "t4", accelerator_names=["GPU:0 Tesla T4"],
                                gpu_precision="mixed_float16")
    assert t4.data.batch_size == 32
    chosen = notebook.choose_config(tmp_path / "mine", accelerator_names=["GPU:0 Tesla P100"],
                                    gpu_precision="float32", overrides={"data.batch_size": 24})
    assert chosen.data.batch_size == 24
    forced = notebook.choose_config(tmp_path / "forced", accelerator_names=["GPU:0 Tesla T4"],
                                    gpu_precision="mixed_float16",
                                    overrides={"train.mixed_precision": "off"})
    assert forced.data.batch_size == 16


def test_resuming_a_mixed_precision_batch_on_a_float32_gpu_warns_with_the_fix(tmp_path):
    import warnings

    from cmc_kit import notebook

    t4_run = tmp_path / "terrain-cmc"
    notebook.choose_config(t4_run, accelerator_names=["GPU:0 T4", "GPU:1 T4"],
                           gpu_precision="mixed_float16").save(t4_run / "config.json")
    with pytest.warns(UserWarning, match=r"(?s)batch 32 \(32 per GPU\).*mixed_float16"):
        resumed = notebook.choose_config(t4_run, accelerator_names=["GPU:0 Tesla P100"],
                                         gpu_precision="float32")
    assert resumed.data.batch_size == 32  # a run's batch never changes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Back on T4 x2 (16 per GPU), or float16 forced on the P100: nothing to warn about.
        notebook.choose_config(t4_run, accelerator_names=["GPU:0 T4", "GPU:1 T4"],
                               gpu_precision="float32")
        notebook.choose_config(t4_run, accelerator_names=["GPU:0 Tesla P100"],
                               gpu_precision="float32",
                               overrides={"train.mixed_precision": "mixed_float16"})
        notebook.choose_config(t4_run, accelerator_names=["GPU:0 Tesla T4"],
                               gpu_precision="mixed_float16")

    # The run's own saved precision counts too: float16 saved -> nothing to warn about on a P100;
    # float32 saved ("off") -> a warning even on a T4.
    for setting, gpu, warned in (("mixed_float16", "float32", False),
                                 ("off", "mixed_float16", True)):
        run = tmp_path / setting
        notebook.choose_config(run, preset="kaggle-t4", gpu_precision="mixed_float16",
                               overrides={"train.mixed_precision": setting,
                                          "data.batch_size": 32}).save(run / "config.json")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            notebook.choose_config(run, accelerator_names=["GPU:0"], gpu_precision=gpu)
        assert any("float32" in str(w.message) for w in caught) == warned, setting


def test_environment_report_matches_the_libraries():
    import keras
    import tensorflow as tf

    from cmc_kit import notebook

    report = notebook.environment_report(show=False)
    assert report["tensorflow"] == tf.__version__ and report["keras"] == keras.__version__
    devices = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
    assert len(report["accelerators"]) == len(devices)


def test_info_table_puts_runs_side_by_side():
    from cmc_kit import notebook

    before = {"epoch": 2, "epochs": 3, "step": 8, "queue_fill": 16, "queue_size": 16,
              "latest_checkpoint": "/x/checkpoints/ckpt-8"}
    after = {**before, "epoch": 3, "step": 12, "latest_checkpoint": "/x/checkpoints/ckpt-12"}
    table = notebook.info_table(before, after, labels=["before", "after"])
    assert table.loc["step"].tolist() == [8, 12]
    assert table.loc["latest_checkpoint"].tolist() == ["ckpt-8", "ckpt-12"]
    with pytest.raises(ValueError, match="labels"):
        notebook.info_table(before, labels=["a", "b"])


def test_probe_figure_has_one_bar_series_per_feature_source():
    from cmc_kit import notebook

    rows = [{"task": t, "probe": p, "metric": m, "source": s, "value": v, "low": v - 0.1,
             "high": v + 0.05}
            for (t, p, m) in [("dominant_class", "knn", "accuracy"), ("height_mean", "linear", "r2")]
            for s, v in [("trained", 0.8), ("random_init", 0.4), ("raw_pixels", 0.5)]]
    table = pd.DataFrame(rows)
    table.attrs.update(features="stages", grid=4)
    figure = notebook.probe_figure(table)
    assert "4x4 crops per sample" in figure.layout.title.text and "stages" in figure.layout.title.text
    sources = {trace.name for trace in figure.data}
    assert sources == {"trained", "random_init", "raw_pixels"}
    assert sum(len(trace.y) for trace in figure.data) == len(rows)
    # Each bar carries its 95% interval as an error bar.
    for trace in figure.data:
        np.testing.assert_allclose(trace.error_y.array, 0.05)
        np.testing.assert_allclose(trace.error_y.arrayminus, 0.1)


# -- helpers: the live loss plot -------------------------------------------------------------------

def _feed(plot, losses_per_epoch, skipped=()):
    step = 0
    for epoch, losses in enumerate(losses_per_epoch):
        for loss in losses:
            step += 1
            plot.on_train_batch_end(step, {"loss": loss, "skipped": float(step in skipped)})
        kept = [l for i, l in enumerate(losses) if step - len(losses) + i + 1 not in skipped]
        plot.on_epoch_end(epoch, {"epoch": epoch + 1, "step": step, "loss": float(np.mean(kept))})
    plot.on_train_end({"status": "completed", "step": step})


def test_live_plot_collects_steps_and_epochs_headless():
    from cmc_kit import notebook

    plot = notebook.LiveLossPlot(update_every=2)
    plot.on_train_begin({"step": 0, "resumed": False})
    _feed(plot, [[5.0, 4.0, 3.0], [2.5, 2.0, 1.5]], skipped={2})
    assert plot.steps == [1, 3, 4, 5, 6]  # the skipped step left no point
    assert plot.step_losses == [5.0, 3.0, 2.5, 2.0, 1.5]
    assert plot.epochs["loss"].tolist() == [4.0, 2.0]
    figure = plot.figure()
    by_name = {trace.name: trace for trace in figure.data}
    assert list(by_name["loss per step"].y) == plot.step_losses
    assert list(by_name["epoch mean loss"].x) == [3, 6]
    assert plot.resumed_at_step is None and not figure.layout.shapes


def test_live_plot_continues_the_curve_of_a_resumed_run(tmp_path):
    from cmc_kit import notebook

    pd.DataFrame({"epoch": [1, 2], "step": [4, 8], "loss": [9.0, 8.0],
                  "knn_accuracy": [0.2, 0.3]}).to_csv(tmp_path / "log.csv", index=False)
    plot = notebook.LiveLossPlot(tmp_path)
    plot.on_train_begin({"step": 8, "resumed": True})
    for step in (9, 10, 11, 12):
        plot.on_train_batch_end(step, {"loss": 7.0, "skipped": 0.0})
    plot.on_epoch_end(2, {"epoch": 3, "step": 12, "loss": 7.0, "knn_accuracy": 0.4})
    assert plot.epochs["epoch"].tolist() == [1, 2, 3]
    figure = plot.figure()
    by_name = {trace.name: trace for trace in figure.data}
    assert list(by_name["epoch mean loss"].x) == [4, 8, 12]
    assert list(by_name["kNN accuracy (held out)"].y) == [0.2, 0.3, 0.4]
    assert [shape.x0 for shape in figure.layout.shapes] == [8]


def test_live_plot_redraws_one_display_in_place(monkeypatch):
    import IPython.display

    from cmc_kit import notebook

    shown = []

    class Handle:
        def update(self, obj, **kwargs):
            shown.append(("update", obj, kwargs))

    def fake_display(obj, **kwargs):
        shown.append(("display", obj, kwargs))
        return Handle()

    monkeypatch.setattr(notebook.figures, "in_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", fake_display)
    plot = notebook.LiveLossPlot(update_every=2)
    plot.on_train_begin({"step": 0, "resumed": False})
    _feed(plot, [[3.0, 2.0, 1.0, 0.5]])
    kinds = [kind for kind, _, _ in shown]
    # One display, then a redraw every 2 steps (2), at the epoch end and at the train end.
    assert kinds == ["display"] + ["update"] * 4
    assert shown[0][2] == {"raw": True, "display_id": True}
    last = shown[-1][1]["application/vnd.plotly.v1+json"]
    step_trace = next(t for t in last["data"] if t["name"] == "loss per step")
    assert list(step_trace["y"]) == [3.0, 2.0, 1.0, 0.5]
    assert "text/html" in shown[-1][1]


def test_live_plot_rejects_a_zero_refresh_interval():
    from cmc_kit import notebook

    with pytest.raises(ValueError, match="update_every"):
        notebook.LiveLossPlot(update_every=0)


def test_plot_log_reads_every_epoch_of_the_run(tmp_path):
    from cmc_kit import notebook

    assert len(notebook.plot_log(tmp_path).data) == 0  # no log yet: an empty figure, no error
    pd.DataFrame({"epoch": [1, 2, 3], "step": [5, 10, 15], "loss": [3.0, 2.0, 1.0]}).to_csv(
        tmp_path / "log.csv", index=False)
    figure = notebook.plot_log(tmp_path, resumed_at_step=10)
    assert list(figure.data[0].y) == [3.0, 2.0, 1.0]
    assert [shape.x0 for shape in figure.layout.shapes] == [10]


# -- helpers: resuming ---------------------------------------------------------------------------

def test_require_run_says_which_notebook_to_run_first(tmp_path):
    from cmc_kit import notebook

    with pytest.raises(CmcKitError, match=r"(?s)no checkpoint.*02_train"):
        notebook.require_run(tmp_path / "missing", input_root=tmp_path / "nothing")
