"""The prepared GPU script must run when a GPU session finally gets one: smoke it on the CPU."""

import subprocess
import sys
from pathlib import Path

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
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "mean +- sd over 2 seeds" in out
    for column in ("trained", "random_init", "raw_pixels", "mean_colour", "trained - best baseline",
                   "epoch2_accuracy"):
        assert column in out, out
    assert (tmp_path / "seed0" / "log.csv").is_file() and (tmp_path / "seed1" / "log.csv").is_file()


@pytest.mark.slow
def test_multi_worker_benchmark_smoke_runs_two_local_workers():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_worker.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line[:34].strip(): line[34:].split() for line in result.stdout.splitlines()}
    assert float(lines["one worker (1 process)"][0]) > 0
    assert float(lines["two workers (2 processes)"][0]) > 0
    assert float(lines["scaling efficiency (speedup / 2)"][0]) > 0
