"""The settings and data a run trains with: the saved config or a preset, what may not change
on resume, the split, training files lost between sessions, and the dataset's fingerprint."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from cmc_kit import layout
from cmc_kit.config import Config, preset
from cmc_kit.errors import CheckpointError
from cmc_kit.fileio import atomic_write_text, read_json_object
from cmc_kit.runs.files import CONFIG_FILE, DATASET_FILE
from cmc_kit.runs.lifecycle import recover_set_aside

if TYPE_CHECKING:  # pandas is imported where it is used: `cmc-kit --help` needs none of it
    import pandas as pd


def resolve_config(run_dir: str | os.PathLike, *, preset_name: str | None = None,
                   epochs: int | None = None, overrides: list[str] | dict | None = None,
                   fresh: bool = False) -> Config:
    """The config to train with: the saved one (resume) or a preset (new run), plus overrides.

    On resume the settings `Config.resume_differences` names must match the saved config
    (`check_resume_settings`); anything else (epochs, learning rate, time limit...) may change.
    A run that an interrupted fresh start had set aside is put back first (unless `fresh`: a
    fresh start under way sets it aside itself), so its own settings are the saved ones.
    """
    if not fresh:
        recover_set_aside(run_dir)
    config_path = Path(run_dir) / CONFIG_FILE
    saved = None if fresh or not config_path.exists() else Config.load(config_path)
    base = saved if saved is not None and preset_name is None else preset(preset_name or "cpu-demo")
    config = base.with_overrides(overrides or [])
    if epochs is not None:
        config = config.with_overrides({"train.epochs": epochs})
    if saved is not None:
        check_resume_settings(config, saved, run_dir)
    return config


def check_resume_settings(config: Config, saved: Config, run_dir: str | os.PathLike) -> None:
    """Raises CheckpointError naming each setting that differs from the run's saved config but
    must not change on resume (the weights' shapes, the queue and the data order depend on it)."""
    diffs = config.resume_differences(saved)
    if diffs:
        raise CheckpointError(
            f"{run_dir} was trained with different settings ({'; '.join(diffs)}). Resume with "
            f"the saved settings (drop these from --preset/--set or OVERRIDES), use another "
            f"run directory (--run / RUN_DIR), or start over (--fresh / FRESH = True).")


def usable_catalog(data: str | os.PathLike, *, check_pixels: bool) -> pd.DataFrame:
    """The usable samples of a dataset folder: fully decoded when a run is created, so bad files
    never reach an epoch; header checks only when resuming (the split is fixed by then)."""
    from cmc_kit import data as data_module

    report = data_module.validate(data, check_pixels=check_pixels)
    if report.num_usable == 0:
        report.require_usable()
    problems = len(report.problems)
    if problems:
        warnings.warn(f"{problems} problem(s) found in {data}; {report.num_usable} usable samples "
                      f"kept. Run `cmc-kit validate {data}` for the list.", stacklevel=2)
    return report.usable


def new_split(catalog: pd.DataFrame, config: Config) -> dict:
    """{'train': ids, 'validation': ids} for a new run (what RUN/split.json keeps)."""
    from cmc_kit import data as data_module

    train_df, val_df = data_module.split_catalog(
        catalog, validation_fraction=config.data.validation_fraction, seed=config.data.split_seed)
    return {"train": list(train_df["id"]), "validation": list(val_df["id"])}


def apply_split(catalog: pd.DataFrame, split: dict) -> dict:
    """{'train': df, 'validation': df} from a catalog and a stored split (ids absent are dropped)."""
    out = {}
    for name in ("train", "validation"):
        wanted = set(split[name])
        out[name] = catalog[catalog["id"].isin(wanted)].reset_index(drop=True)
    missing = len(split["train"]) - len(out["train"])
    if missing:
        warnings.warn(f"{missing} training id(s) of this run are not in the dataset (missing, "
                      "or excluded by validation).", stacklevel=2)
    return out


def keep_lost_training_samples(catalog: pd.DataFrame, split: dict, data: str | os.PathLike,
                               run_dir: str | os.PathLike, *, cache: str = "") -> pd.DataFrame:
    """On resume, training samples whose files went missing or broke since the run began stay
    in the catalog (with their old or expected paths), in the catalog's id order: the epoch
    plan, which the exact resume depends on, keeps its length and its rows, and the pipeline
    skips and counts them like any unreadable file (with a cache, it still reads them there)."""
    import pandas as pd

    from cmc_kit import data as data_module

    lost = sorted(set(split["train"]) - set(catalog["id"]), key=data_module.id_sort_key)
    lost_validation = set(split["validation"]) - set(catalog["id"])
    if lost_validation:
        warnings.warn(f"{len(lost_validation)} held-out sample(s) of {run_dir} can no longer be "
                      "read; the evaluations leave them out.", stacklevel=3)
    if not lost:
        return catalog
    found = data_module.discover(data, include_incomplete=True).set_index("id")
    rows = []
    for sample_id in lost:
        row = {"id": sample_id}
        for view in layout.VIEW_SUFFIXES:
            path = found.at[sample_id, view] if sample_id in found.index else None
            # A sample deleted outright: its expected name at the dataset root.
            row[view] = (path if isinstance(path, str)
                         else str(Path(data) / layout.sample_file_name(sample_id, view)))
        rows.append(row)
    shown = f"{', '.join(map(str, lost[:5]))}{', ...' if len(lost) > 5 else ''}"
    if cache:
        what = f"training reads them from the cache {cache}"
    else:
        what = ("every epoch skips them and log.csv counts them (skipped_samples); the resume is "
                "exact otherwise")
    warnings.warn(f"{len(lost)} training sample(s) of {run_dir} can no longer be read from "
                  f"{data} ({shown}): {what}. Run `cmc-kit validate {data}` for the files.",
                  stacklevel=3)
    kept = pd.concat([catalog, pd.DataFrame(rows, columns=catalog.columns)], ignore_index=True)
    order = sorted(range(len(kept)), key=lambda i: data_module.id_sort_key(str(kept.at[i, "id"])))
    return kept.iloc[order].reset_index(drop=True)


def dataset_fingerprint(catalog: pd.DataFrame, split: dict, samples: int = 4) -> dict:
    """What a later session checks the data against: the number of training samples, the
    image size and a checksum of the first few training samples' terrain files."""
    import hashlib

    from cmc_kit import data as data_module

    rows = catalog.set_index("id")
    ids = [i for i in sorted(split["train"], key=data_module.id_sort_key) if i in rows.index]
    checksums = {}
    for sample_id in ids[:samples]:
        try:
            checksums[sample_id] = hashlib.sha256(Path(rows.at[sample_id, "terrain"])
                                                  .read_bytes()).hexdigest()[:16]
        except OSError:
            continue
    size = layout.png_size(rows.at[ids[0], "terrain"]) if ids else None
    return {"training_samples": len(split["train"]), "image_size": list(size or []),
            "checksums": checksums}


def check_dataset(run_dir: str | os.PathLike, now: dict, *, allow_changed: bool) -> None:
    """Compares the data a run resumes on with its fingerprint (RUN/dataset.json): images of
    another size are refused unless `allow_changed` (data.allow_changed_data); other content
    under the same ids is warned about."""
    path = Path(run_dir) / DATASET_FILE
    if not path.is_file():
        return
    try:
        saved = read_json_object(path)
        if not isinstance(saved.get("checksums", {}), dict):
            raise ValueError("its checksums are not an object")
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"Cannot read {path} ({err}), the fingerprint of the data {run_dir} was trained on. "
            "The run itself is intact: delete that file and run the same command again to "
            "resume (it is written anew from the data given then, which is not compared with "
            "the data the run was trained on this once).") from None
    size_then, size_now = saved.get("image_size"), now.get("image_size")
    if size_then and size_now and size_then != size_now and not allow_changed:
        raise CheckpointError(
            f"{run_dir} was trained on {size_then[1]}x{size_then[0]} images; the data given now "
            f"has {size_now[1]}x{size_now[0]} under the same sample ids. Point --data / DATA_DIR "
            "at the run's dataset, or add --set data.allow_changed_data=true (OVERRIDES) to "
            "resume on these images anyway.")
    changed = sorted(i for i, digest in saved.get("checksums", {}).items()
                     if i in now["checksums"] and now["checksums"][i] != digest)
    if changed:
        warnings.warn(f"The terrain files of sample(s) {', '.join(changed)} differ from the ones "
                      f"{run_dir} was created on ({DATASET_FILE}): the dataset's content changed "
                      "under the same ids. Resuming on it; point --data at the run's dataset if "
                      "that was not meant.", stacklevel=3)


def write_dataset_fingerprint(run_dir: str | os.PathLike, fingerprint: dict) -> None:
    atomic_write_text(Path(run_dir) / DATASET_FILE, json.dumps(fingerprint, indent=2) + "\n")
