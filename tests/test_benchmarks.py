"""Benchmark scripts run (smoke mode on the CPU; the GPU report must work when a GPU session
finally gets one), and the learning benchmark's verdicts are right."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_report_smoke_runs_and_prints_every_figure():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--smoke"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for label in ("samples/s", "GFLOP per step", "achieved TFLOP/s", "achieved / matmul",
                  "achieved / datasheet peak", "peak GPU memory, GB",
                  "time per FLOP, grouped RegNetX / dense ResNet-34"):
        assert label in out, out
    figures = {line[:34].strip(): line[34:].strip() for line in out.splitlines()
               if line[:34].strip() in ("samples/s", "GFLOP per step")}
    assert float(figures["samples/s"]) > 0 and float(figures["GFLOP per step"]) > 0


def test_gpu_report_without_a_gpu_measures_nothing():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is attached")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "No GPU: nothing to measure" in result.stdout


@pytest.mark.slow
def test_learning_benchmark_smoke_runs_and_prints_every_source(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--smoke",
                             "--supervised", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "mean +- sd over 2 seeds" in out and "2x2 crops each" in out  # 64 px, 32 px crops
    for column in ("trained", "random_init", "raw_pixels", "mean_colour", "trained - best baseline",
                   "winner", "epoch2_accuracy", "train_seconds", "probes with signal",
                   "supervised", "share of supervised gain"):
        assert column in out, out
    assert (tmp_path / "seed0" / "log.csv").is_file() and (tmp_path / "seed1" / "log.csv").is_file()
    # The supervised reference is the random_init fine-tune arm at every label, per seed.
    for seed in (0, 1):
        reference = pd.read_csv(tmp_path / f"seed{seed}" / "finetune" / "supervised_reference.csv")
        assert list(reference["arm"]) == ["random_init"] and list(reference["labels"]) == [1.0]


@pytest.mark.slow
def test_multi_worker_benchmark_smoke_runs_two_local_workers():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_worker.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line[:34].strip(): line[34:].split() for line in result.stdout.splitlines()}
    assert float(lines["one worker (1 process)"][0]) > 0
    assert float(lines["two workers (2 processes)"][0]) > 0
    assert float(lines["scaling efficiency (speedup / 2)"][0]) > 0


def _learning_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_benchmark",
                                                  ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_verdict_names_the_winner_and_the_probes_nobody_predicts():
    learning = _learning_module()
    sources = ("trained", "random_init", "raw_pixels", "mean_colour")
    rows = []
    for task, probe, metric, values in [
            ("dominant_class", "knn", "accuracy", (0.8, 0.7, 0.6, 0.65)),    # trained wins
            ("height_mean", "linear", "r2", (0.3, 0.4, 0.1, 0.1)),          # random init wins
            ("ridge", "linear", "r2", (-0.03, 1e-5, -0.03, -0.03)),          # no signal
            ("slope", "linear", "r2", (-0.01, 0.02, -0.03, -0.03))]:         # a weak one wins
        rows += [{"task": task, "probe": probe, "metric": metric, "source": s, "value": v,
                  "sd": 0.01} for s, v in zip(sources, values)]
    summary = learning.summary_table(pd.DataFrame(rows))
    assert list(summary["winner"]) == ["trained", "random_init", "no signal", "random_init"]
    assert list(summary["trained - best baseline"]) == ["+0.100", "-0.100", "-0.030", "-0.030"]
    line = learning.verdict_line(summary)
    assert line.startswith("trained beats every baseline on 1 of 3 probes with signal")
    assert "height_mean linear (random_init)" in line and "no source predicts ridge" in line


def test_learning_lists_per_seed_the_probes_below_random_init():
    learning = _learning_module()
    rows = []
    for task, trained, random_init, pixels in [
            ("dominant_class", (0.8, 0.6), (0.7, 0.7), (0.1, 0.1)),
            ("height_mean", (0.5, 0.5), (0.4, 0.4), (0.1, 0.1)),
            ("ridge", (-0.2, -0.2), (-0.1, -0.1), (-0.1, -0.1))]:  # no signal: not counted
        for source, values in (("trained", trained), ("random_init", random_init),
                               ("raw_pixels", pixels), ("mean_colour", pixels)):
            rows.append({"task": task, "probe": "linear", "metric": "r2", "source": source,
                         "value": sum(values) / 2, "sd": 0.0, "values": list(values)})
    table = pd.DataFrame(rows)
    summary = learning.summary_table(table)
    assert learning.below_random_init(table, summary, seeds=2) == ["-", "dominant_class linear"]


def test_the_supervised_reference_is_no_baseline_and_reports_its_share_of_the_gain():
    learning = _learning_module()
    sources = ("trained", "random_init", "raw_pixels", "mean_colour", "supervised")
    rows = []
    for task, values in [("dominant_class", (0.85, 0.80, 0.6, 0.7, 0.90)),   # half the gain
                         ("height_mean", (0.50, 0.40, 0.1, 0.1, 0.35)),      # supervision lost
                         ("ridge", (-0.03, -0.03, -0.03, -0.03, 0.005))]:    # no signal
        rows += [{"task": task, "probe": "linear", "metric": "r2", "source": s, "value": v,
                  "sd": 0.0} for s, v in zip(sources, values)]
    summary = learning.summary_table(pd.DataFrame(rows))
    # The supervised network beats the trained one on dominant_class but never wins a verdict.
    assert list(summary["winner"]) == ["trained", "trained", "no signal"]
    assert list(summary["trained - best baseline"]) == ["+0.050", "+0.100", "+0.000"]
    assert list(summary["share of supervised gain"]) == ["50%", "-", "-"]
    assert summary["supervised"].iloc[0] == "0.900 +- 0.000"
