"""`train`: a run directory trained from its settings to its last epoch, on one machine or on
every worker of a cluster.

Several workers (TF_CONFIG): the strategy comes first, before anything runs in TensorFlow;
the chief alone readies and writes the run directory (a fresh start, a previous run brought
in, config.json, split.json), the others wait for it at a barrier and then read the same
settings, split and checkpoints, and the Trainer checks that all agree before the first step.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cmc_kit import layout, runs
from cmc_kit.config import Config, parse_duration
from cmc_kit.fileio import atomic_write_text
from cmc_kit.training import cluster, devices
from cmc_kit.training.trainer import Trainer, TrainResult


def train(data=None, run=None, config: Config | None = None, *,
          catalog: pd.DataFrame | None = None, fresh: bool = False,
          time_limit: float | str | None = None, resume_from: Path | None = None,
          verbose: int = 1, dataset_transform: Callable | None = None,
          callbacks: list | None = None) -> TrainResult:
    """Trains a run directory on a dataset, resuming from its latest checkpoint if present.

    Args:
        data: dataset folder (PNG triplets, any depth); or give `catalog` instead.
        run: run directory; created if needed.
        config: settings for a new run (default: saved config.json, else the cpu-demo preset).
        catalog: a catalog DataFrame (`cmc_kit.data.discover`) to train on as it is.
        fresh: start over: the run's checkpoints, logs and split are replaced once the new
            settings and data pass their checks (a previous output attached on Kaggle is then
            ignored).
        time_limit: seconds (or "11.5h") after which to checkpoint and return cleanly.
        resume_from: a previous run directory to copy in and continue (Kaggle inputs); None:
            on Kaggle, one named like `run` under /kaggle/input, if any.
        callbacks: keras.callbacks.Callback-like objects, e.g. `embed.EpochEmbeddings()` (the
            held-out subset's embedding and kNN accuracy after each epoch, as the CLI and the
            notebooks use) or a live loss plot. Several workers: the chief's only.

    Several machines: make the same call (or `cmc-kit train`) on every machine TF_CONFIG
    names, with the dataset and the run directory at the same paths on all of them (README,
    "Several machines"). Call it before anything else runs in TensorFlow.
    """
    if run is None:
        raise TypeError("train() needs run=, the run directory.")
    if (data is None) == (catalog is None):
        raise TypeError("train() takes data= (a dataset folder) or catalog= (a DataFrame), "
                        "exactly one of them.")
    run_dir = Path(run)
    runs.refuse_fresh_with_resume_from(fresh, resume_from)
    tf_cluster = cluster.cluster_from_environment()
    chief = cluster.writes_run_directory(tf_cluster)
    # One trainer per run: a second one is refused at once. On several machines the chief
    # holds the lock for all; the others share its folder.
    with runs.RunLock(run_dir) if chief else contextlib.nullcontext():
        trainer = _prepare(data, catalog, run_dir, config, chief=chief, tf_cluster=tf_cluster,
                           fresh=fresh, resume_from=resume_from, verbose=verbose,
                           callbacks=callbacks, dataset_transform=dataset_transform)

        def where() -> str:
            return (f"at step {int(trainer.state.step.numpy())}; the latest checkpoint is "
                    f"{trainer.checkpointer.latest}")

        with cluster.lost_workers_explained(trainer.workers, where,
                                            trainer.config.train.collective_timeout):
            return trainer.fit(time_limit=parse_duration(time_limit, "time_limit"))


def _prepare(data, catalog, run_dir: Path, config: Config | None, *, chief: bool, tf_cluster,
             fresh: bool, resume_from, **trainer_options):
    """Everything before the first step: the run directory made ready (by the chief), the
    settings and data checked, config.json / split.json / dataset.json written, the Trainer
    built."""
    set_aside = None
    if chief:
        runs.recover_set_aside(run_dir)
        # fresh: the old run is moved aside, not deleted, until every setting and the data have
        # been checked; a typo in --data or --set then leaves it as it was.
        set_aside = runs.FreshStart.set_aside(run_dir) if fresh else None
    try:
        if chief:
            runs.bring_in_previous_run(run_dir, resume_from, fresh=fresh)
        if config is None:
            config = runs.resolve_config(run_dir, fresh=fresh)
        tc = config.train
        # Before anything runs in TensorFlow (the PNG checks decode with it): a multi-worker
        # strategy configures the collectives, which TensorFlow allows only at program start.
        strategy = devices.select_strategy(tc.strategy, tf_cluster,
                                           collective_timeout=tc.collective_timeout)
        workers = cluster.Workers(strategy)
        with cluster.lost_workers_explained(workers, lambda: "before the first step",
                                            tc.collective_timeout):
            workers.barrier()  # the chief has readied RUN (fresh start, previous run) for all
            # A run with a split is resumed. Every worker decides that before the chief may
            # write a new run's split.json, or a slow worker could take it for an old run's.
            resuming = _has_split(run_dir)
            workers.barrier()
            trainer, split_ids, fingerprint = _checked_trainer(
                data, catalog, run_dir, config, resuming=resuming, strategy=strategy,
                workers=workers, **trainer_options)
    except BaseException:
        if set_aside is not None:
            set_aside.put_back()
        raise
    if chief:
        with trainer.writing("starting at"):
            _save_settings(run_dir, config, split_ids, resuming, fingerprint)
    if set_aside is not None:
        set_aside.discard()
    return trainer


def _has_split(run_dir: Path) -> bool:
    """A run with a saved split is resumed on it."""
    return (run_dir / runs.SPLIT_FILE).exists()


def _checked_trainer(data, catalog, run_dir: Path, config: Config, *, resuming: bool,
                     **trainer_options):
    """A Trainer for the run, once the settings match a run being resumed and the input
    pipeline passed its own checks (the cache, its image size; it reads no batch)."""
    saved_path = run_dir / runs.CONFIG_FILE
    if saved_path.exists() and runs.has_checkpoint(run_dir):
        runs.check_resume_settings(config, Config.load(saved_path), run_dir)
    trainer, split_ids, fingerprint = _trainer_for(data, catalog, run_dir, config,
                                                   resuming=resuming, **trainer_options)
    trainer.dataset(0, transform=False)
    return trainer, split_ids, fingerprint


def _trainer_for(data, catalog, run_dir: Path, config: Config, *, resuming: bool,
                 **trainer_options):
    """The run's catalog and split (saved when `resuming`, else new), and a Trainer built on
    them: building it checks every setting (strategy, pairs, crop size...) before anything is
    written."""
    split_path = run_dir / runs.SPLIT_FILE
    metadata_csv = None
    if catalog is None:
        catalog = runs.usable_catalog(data, check_pixels=not resuming)
        metadata_csv = layout.find_metadata_csv(data)
    if resuming:
        split_ids = runs.read_split(split_path)
        if data is not None:
            catalog = runs.keep_lost_training_samples(catalog, split_ids, data, run_dir,
                                                      cache=config.data.cache)
    else:
        split_ids = runs.new_split(catalog, config)
    fingerprint = runs.dataset_fingerprint(catalog, split_ids)
    if resuming:
        runs.check_dataset(run_dir, fingerprint, allow_changed=config.data.allow_changed_data)
    split = runs.apply_split(catalog, split_ids)
    trainer = Trainer(config, run_dir, split["train"], split["validation"],
                      metadata_csv=metadata_csv, **trainer_options)
    return trainer, split_ids, fingerprint


def _save_settings(run_dir: Path, config: Config, split_ids: dict, resuming: bool,
                   fingerprint: dict) -> None:
    """config.json, split.json and dataset.json, once everything passed its checks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_text(run_dir / runs.SPLIT_FILE, json.dumps(split_ids) + "\n")
    if not resuming or not (run_dir / runs.DATASET_FILE).exists():  # older runs: from now on
        runs.write_dataset_fingerprint(run_dir, fingerprint)
    saved_path = run_dir / runs.CONFIG_FILE
    reached = runs.saved_state(run_dir).get("epoch")
    if saved_path.exists() and reached is not None and config.train.epochs < reached:
        # Asking for fewer epochs than done trains nothing; it must not shrink the run's goal.
        kept = Config.load(saved_path).train.epochs
        warnings.warn(f"train.epochs {config.train.epochs} is below the {reached} epoch(s) "
                      f"{run_dir} has trained: nothing to train. Its config.json keeps "
                      f"train.epochs {kept}.", stacklevel=3)
        config = config.with_overrides({"train.epochs": kept})
    elif saved_path.exists() and reached is not None:
        _warn_if_schedule_stretches(Config.load(saved_path), config, reached)
    config.save(saved_path)


def _warn_if_schedule_stretches(saved: Config, config: Config, reached: int) -> None:
    """A cosine schedule spans train.epochs: resuming with another number of epochs re-spaces
    it from the current step on (more epochs: the learning rate goes back up)."""
    stretched = [name for name in ("lr_schedule", "momentum_schedule")
                 if getattr(config.train, name) == "cosine"]
    if saved.train.epochs == config.train.epochs or not stretched:
        return
    warnings.warn(f"train.epochs changes from {saved.train.epochs} to {config.train.epochs} after "
                  f"{reached} epoch(s): the cosine {' and '.join(stretched)} is re-spaced over "
                  f"{config.train.epochs} epochs, so it jumps from where the "
                  f"{saved.train.epochs}-epoch schedule had taken it, and the run will not match "
                  f"a straight {config.train.epochs}-epoch run.", stacklevel=4)
