"""The session the notebooks run in: versions and accelerators, where runs live, which preset
and settings a run trains with."""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import pandas as pd

import cmc_kit
from cmc_kit import runs
from cmc_kit.config import Config, default_paths, in_ci, on_kaggle
from cmc_kit.errors import ConfigError
from cmc_kit.notebook.figures import in_kernel, keep_figures_in_saved_notebooks

DEFAULT_RUN_NAME = "terrain-cmc"


def accelerators() -> list[str]:
    """Human-readable names of the GPUs / TPUs TensorFlow sees, e.g. ['GPU:0 Tesla T4 (compute 7.5)']."""
    import tensorflow as tf

    found = []
    for kind in ("GPU", "TPU"):
        for device in tf.config.list_physical_devices(kind):
            label = device.name.replace("/physical_device:", "")
            if kind == "GPU":
                details = tf.config.experimental.get_device_details(device)
                name = details.get("device_name")
                capability = details.get("compute_capability")
                if name:
                    label += f" {name}"
                if capability:
                    label += f" (compute {capability[0]}.{capability[1]})"
            found.append(label)
    return found


def environment_report(*, show: bool = True) -> dict[str, Any]:
    """Versions, accelerators and paths of this session; printed when `show`.

    Returns a dict with python, tensorflow, keras, cmc_kit, accelerators (list), on_kaggle,
    smoke (the CI switch the notebooks use), data_root, runs_root.
    """
    import tensorflow as tf

    paths = default_paths()
    report = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cmc_kit": cmc_kit.__version__,
        "accelerators": accelerators(),
        "on_kaggle": on_kaggle(),
        "smoke": in_ci(),
        "data_root": str(paths["data"]),
        "runs_root": str(paths["runs"]),
    }
    if in_kernel():
        keep_figures_in_saved_notebooks()
    if show:
        found = ", ".join(report["accelerators"]) or "none (CPU only: use the cpu-demo preset)"
        print(f"Python {report['python']}, TensorFlow {report['tensorflow']}, "
              f"Keras {report['keras']}, cmc_kit {report['cmc_kit']}")
        print(f"Accelerator: {found}")
        print(f"Kaggle: {'yes' if report['on_kaggle'] else 'no'}; smoke mode (CI set): "
              f"{'on' if report['smoke'] else 'off'}")
        print(f"Data under {report['data_root']}, runs under {report['runs_root']}")
    return report


def default_preset(accelerator_names: Sequence[str] | None = None) -> str:
    """'kaggle-t4' when a GPU or TPU is present, else 'cpu-demo'."""
    names = accelerators() if accelerator_names is None else accelerator_names
    return "kaggle-t4" if names else "cpu-demo"


def run_dir(run: str | os.PathLike | None = None, name: str = DEFAULT_RUN_NAME) -> Path:
    """`run` if given, else RUNS_ROOT/name (/kaggle/working/runs on Kaggle, the repository's runs/)."""
    return Path(run) if run is not None else default_paths()["runs"] / name


# One kaggle-t4 train step on the CPU (benchmarks/step_memory.py): about 0.31 GB per sample in
# mixed precision and 0.57 GB in float32, plus about 1.2-1.3 GB. Batch 32 in float32 on one 16 GB
# GPU (a P100: no tensor cores, so no mixed precision) would need about 19.5 GB.
FLOAT32_GPU_BATCH = 16


def choose_config(run: str | os.PathLike, *, preset: str | None = None, epochs: int | None = None,
                  overrides: Mapping[str, Any] | None = None, fresh: bool = False,
                  accelerator_names: Sequence[str] | None = None,
                  gpu_precision: str | None = None) -> Config:
    """The settings to train `run` with (see `runs.resolve_config`).

    A run that already has a config.json keeps it unless `preset` is named (its model settings
    must then still match); a new run starts from `preset`, or from `default_preset()`.
    `overrides` and `epochs` apply on top either way.

    A new kaggle-t4 run that trains in float32 on GPUs (no tensor cores, e.g. Kaggle's P100,
    or `train.mixed_precision` "off" in `overrides`) gets `data.batch_size` 16 instead of 32,
    which would not fit in 16 GB (estimated, see FLOAT32_GPU_BATCH), unless `overrides` sets
    the batch. A saved run whose batch per GPU is larger than that, resumed in float32 on GPUs
    (a T4 x2 run continued on a P100), gets a warning with the fix: the batch of a run cannot
    change. `gpu_precision` is the policy the GPUs get with "auto" (default: what
    `train.mixed_precision=auto` picks for the attached GPUs; None without GPUs).
    """
    from cmc_kit import training

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"OVERRIDES must be a dict of setting names to values, e.g. "
                          f"{{'model.width': 0.25, 'train.epochs': 30}}. Received: {overrides!r}")
    overrides = dict(overrides or {})
    exists = (Path(run) / runs.CONFIG_FILE).is_file() and not fresh
    if preset is None and not exists:
        preset = default_preset(accelerator_names)
    gpus = None
    if gpu_precision is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
        if gpus:
            gpu_precision = training.resolve_mixed_precision("auto")
    if gpus is None:
        gpus = sum(name.startswith("GPU") for name in accelerator_names or []) or 1

    def on_these_gpus(setting: str) -> str | None:
        """The policy a `train.mixed_precision` setting gives on these GPUs (None: no GPU)."""
        if gpu_precision is None or setting == "auto":
            return gpu_precision
        return training.resolve_mixed_precision(setting)

    if (preset == "kaggle-t4" and not exists and "data.batch_size" not in overrides
            and on_these_gpus(overrides.get("train.mixed_precision", "auto")) == "float32"):
        overrides["data.batch_size"] = FLOAT32_GPU_BATCH
        print(f"Training in float32 on these GPUs: data.batch_size "
              f"{FLOAT32_GPU_BATCH} instead of the preset's 32, which needs about 19.5 GB "
              "(estimated). Set OVERRIDES['data.batch_size'] to choose yourself.")
    config = runs.resolve_config(Path(run), preset_name=preset, epochs=epochs,
                                 overrides=overrides, fresh=fresh)
    per_gpu = config.data.batch_size // max(1, gpus)
    if (exists and on_these_gpus(config.train.mixed_precision) == "float32"
            and per_gpu > FLOAT32_GPU_BATCH):
        warnings.warn(
            f"{run} trains with batch {config.data.batch_size} ({per_gpu} per GPU), chosen for "
            f"mixed precision; these GPUs train in float32, where more than {FLOAT32_GPU_BATCH} "
            "per GPU may not fit in 16 GB (about 19.5 GB for 32, estimated). The batch of a run "
            "cannot change: continue on GPU T4 x2, or set OVERRIDES['train.mixed_precision'] = "
            "'mixed_float16' (a P100 computes in float16 without tensor cores; memory about "
            "halves).", stacklevel=2)
    return config


def config_table(config: Config) -> pd.DataFrame:
    """The settings as rows (setting, value), e.g. 'model.trunk' -> 'resnet34'."""
    rows = [{"setting": f"{section}.{key}", "value": value if not isinstance(value, list)
             else ",".join(map(str, value))}
            for section, values in config.to_dict().items() for key, value in values.items()]
    return pd.DataFrame(rows)