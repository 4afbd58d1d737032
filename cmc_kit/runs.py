"""The run directory: what its files are called, the settings and split a run keeps, a fresh
start, bringing in a previous run, and reading a run back (`run_info`, `load_run`, checkpoints).

    RUN/config.json          the Config (model fields, batch, pairs and seed must match to resume)
    RUN/split.json           train / validation ids, fixed when the run is created
    RUN/checkpoints/         tf.train.CheckpointManager files (the last few kept)
    RUN/state.json           epoch, step, queue fill, latest checkpoint (written after each save)
    RUN/log.csv              one row per epoch: every loss term, lr, momentum, skipped steps, seconds
    RUN/log_steps.csv        optional per-step rows (train.log_every_steps)
    RUN/tensorboard/         TensorBoard scalars
    RUN/embeddings/          embeddings of a fixed held-out subset per epoch, and `cmc-kit embed`'s

The trainer asks and this module answers: nothing here builds a training step.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from cmc_kit.config import Config, preset
from cmc_kit.errors import CheckpointError
from cmc_kit.fileio import atomic_write_text

if TYPE_CHECKING:  # pandas is imported where it is used: `cmc-kit --help` needs none of it
    import pandas as pd

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "ckpt"  # checkpoints are CHECKPOINT_DIR/ckpt-N
LOG_FILE = "log.csv"
STEP_LOG_FILE = "log_steps.csv"
TENSORBOARD_DIR = "tensorboard"
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_TABLE = "embeddings.parquet"  # `cmc-kit embed`'s default, inside EMBEDDINGS_DIR
UMAP_CACHE_DIR = "umap_cache"
EVALUATION_FILE = "evaluation.csv"
EXPLORER_FILE = "explorer.html"
MOSAIC_FILE = "mosaic.png"
EPOCHS_PAGE_FILE = "embedding_over_epochs.html"
FINETUNE_DIR = "finetune"  # `cmc-kit finetune`'s arms: checkpoints, results, the table
SET_ASIDE_DIR = ".before-fresh"

# What a fresh start replaces: the training's files and what was made from them (the demo and
# notebooks 04/05/06 write the explorer, mosaic, evaluation, UMAP cache and fine-tunes into it).
RUN_OUTPUTS = (CHECKPOINT_DIR, TENSORBOARD_DIR, EMBEDDINGS_DIR, STATE_FILE, LOG_FILE,
               STEP_LOG_FILE, SPLIT_FILE, CONFIG_FILE, UMAP_CACHE_DIR, EVALUATION_FILE,
               EXPLORER_FILE, MOSAIC_FILE, EPOCHS_PAGE_FILE, FINETUNE_DIR)


def epoch_table_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """RUN/embeddings/epoch_NNN.parquet: the held-out subset's embedding after `epoch`."""
    return Path(run_dir) / EMBEDDINGS_DIR / f"epoch_{epoch:03d}.parquet"


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}. The run directory may be damaged; "
                              "restore the file or start over with --fresh.") from err


# -- checkpoints -------------------------------------------------------------------------------

def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when the run directory's checkpoint state names a checkpoint."""
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(Path(run_dir) / CHECKPOINT_DIR)) is not None


def checkpoint_paths(run_dir: str | os.PathLike) -> list[str]:
    """The checkpoints in RUN/checkpoints (by their .index files), oldest first (by number)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []

    def number(path: Path):
        suffix = path.stem.rsplit("-", 1)[-1]
        return (0, int(suffix), path.stem) if suffix.isdigit() else (1, 0, path.stem)

    return [str(path.with_suffix("")) for path in sorted(folder.glob("*.index"), key=number)]


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict]:
    """Kept checkpoints, oldest first: {path, step, epoch, batch_in_epoch} read from each one."""
    import tensorflow as tf

    out = []
    for path in checkpoint_paths(run_dir):
        try:
            reader = tf.train.load_checkpoint(path)
            values = {name: int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                      for name in ("step", "epoch", "batch_in_epoch")}
        except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as err:
            raise CheckpointError(f"Checkpoint {path} cannot be read ({str(err)[:200]}). Delete "
                                  "it (and its entry in checkpoints/checkpoint) to use the "
                                  "previous one, or start over with --fresh.") from err
        out.append({"path": path, **values})
    return out


def resolve_checkpoint(run: str | os.PathLike, checkpoint: str | os.PathLike | None) -> str | None:
    """Checks that `checkpoint` names a saved checkpoint of `run` (None: the latest, unchecked).

    Accepts a checkpoint prefix (`RUN/checkpoints/ckpt-3`, whose `.index` file exists), a
    bare name looked up in `RUN/checkpoints` (`ckpt-3`) or its number (`3`). Raises
    CheckpointError naming the path and the checkpoints that do exist, instead of TensorFlow's
    NotFoundError when restoring.
    """
    if checkpoint is None or str(checkpoint) == "":
        return None
    if str(checkpoint).isdigit():  # `--checkpoint 3`: the manager's ckpt-3
        checkpoint = f"{CHECKPOINT_NAME}-{checkpoint}"
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        return str(checkpoint)  # not a run: load_run says so, with the fix
    given = Path(checkpoint)
    folder = run / CHECKPOINT_DIR
    candidates = [given] + ([folder / given.name] if len(given.parts) == 1 else [])
    for candidate in candidates:
        if Path(f"{candidate}.index").is_file():
            return str(candidate)
    existing = [Path(path).name for path in checkpoint_paths(run)]
    if existing:
        listing = (f"Checkpoints in {folder}: {', '.join(existing)} (the last is the latest). "
                   f"Pass one of those (e.g. --checkpoint {folder / existing[-1]}), or leave "
                   "--checkpoint out for the latest.")
    else:
        listing = f"{folder} holds no checkpoints: train the run first."
    raise CheckpointError(f"Checkpoint {checkpoint} does not exist (no {checkpoint}.index). "
                          f"{listing}")


def saved_state(run_dir: str | os.PathLike) -> dict:
    """RUN/state.json of a run that holds a checkpoint (epoch, step, ...); {} otherwise."""
    if not has_checkpoint(run_dir):
        return {}
    try:
        return read_json(Path(run_dir) / STATE_FILE)
    except CheckpointError:
        return {}


def write_state(run_dir: str | os.PathLike, state: dict) -> None:
    """RUN/state.json, what `info` and an interrupted CLI read (written after each save)."""
    atomic_write_text(Path(run_dir) / STATE_FILE, json.dumps(state, indent=2) + "\n")


# -- settings and split --------------------------------------------------------------------------

def resolve_config(run_dir: str | os.PathLike, *, preset_name: str | None = None,
                   epochs: int | None = None, overrides: list[str] | dict | None = None,
                   fresh: bool = False) -> Config:
    """The config to train with: the saved one (resume) or a preset (new run), plus overrides.

    On resume the settings `Config.model_differences` names must match the saved config
    (`check_resume_settings`); anything else (epochs, learning rate, time limit...) may change.
    """
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
    diffs = config.model_differences(saved)
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
        for view, suffix in data_module.VIEW_SUFFIXES.items():
            path = found.at[sample_id, view] if sample_id in found.index else None
            # A sample deleted outright: its expected name at the dataset root.
            row[view] = path if isinstance(path, str) else str(Path(data) / f"{sample_id}_{suffix}.png")
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


# -- a fresh start --------------------------------------------------------------------------------

class FreshStart:
    """Moves a run's outputs into RUN/.before-fresh (a rename: nothing is copied), then either
    puts them back (`put_back`: the new run failed its checks) or deletes them (`discard`)."""

    def __init__(self, run_dir: str | os.PathLike, moved: list[str]):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / SET_ASIDE_DIR
        self.moved = moved

    @classmethod
    def set_aside(cls, run_dir: str | os.PathLike, names=RUN_OUTPUTS) -> "FreshStart":
        run_dir = Path(run_dir)
        folder = run_dir / SET_ASIDE_DIR
        # Still here only next to a newer run's checkpoint (else recovered): superseded.
        shutil.rmtree(folder, ignore_errors=True)
        moved = [name for name in names if (run_dir / name).exists()]
        if moved:
            folder.mkdir(parents=True)
            for name in moved:
                os.replace(run_dir / name, folder / name)
        return cls(run_dir, moved)

    @classmethod
    def left_behind(cls, run_dir: str | os.PathLike) -> "FreshStart":
        """The outputs an interrupted process had set aside, to put back."""
        folder = Path(run_dir) / SET_ASIDE_DIR
        return cls(run_dir, [child.name for child in folder.iterdir()])

    def put_back(self) -> None:
        for name in self.moved:
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.folder / name, target)
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def recover_set_aside(run_dir: str | os.PathLike) -> None:
    """Puts back a run that a fresh start had moved aside when its process was killed before
    the new run's first checkpoint (the new run's files, if any, give way)."""
    folder = Path(run_dir) / SET_ASIDE_DIR
    if not folder.is_dir() or has_checkpoint(run_dir):
        return
    aside = FreshStart.left_behind(run_dir)
    if aside.moved:
        warnings.warn(f"Restoring {run_dir} from {folder}: a fresh start was interrupted before "
                      "its first checkpoint.", stacklevel=3)
    aside.put_back()


def refuse_fresh_with_resume_from(fresh: bool, resume_from) -> None:
    """`fresh` starts over, `resume_from` continues another run: asking for both is a mistake.

    (`fresh` alone also ignores a previous output attached on Kaggle: starting over must not
    quietly continue the attached run.)
    """
    if fresh and resume_from is not None:
        raise CheckpointError(f"fresh=True (--fresh) starts the run over, but resume_from "
                              f"(--resume-from) {resume_from} asks to continue that run. "
                              "Drop one of the two.")


# -- bringing in a previous run -----------------------------------------------------------------

def bring_in_previous_run(run: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                          *, fresh: bool = False,
                          input_root: str | os.PathLike | None = None) -> Path | None:
    """Copies a previous run into the writable `run`, unless `run` already holds a checkpoint.

    `resume_from` names the previous run (a run directory at or below it); None looks for a
    previous Kaggle notebook version's output of the same name attached under `input_root`
    (default: /kaggle/input on Kaggle, nowhere elsewhere), unless `fresh`. Returns the run
    directory copied from, or None when nothing was copied.
    """
    from cmc_kit import kaggle

    run = Path(run)
    if has_checkpoint(run):
        if resume_from is not None:
            warnings.warn(
                f"{run} already holds a checkpoint (step {saved_state(run).get('step', 'unknown')}"
                f"), so {resume_from} (--resume-from / RESUME_FROM) is not copied in: {run} "
                f"continues. To continue {resume_from} instead, give another run directory "
                "(--run / RUN_DIR).", stacklevel=2)
        return None
    if resume_from is not None:
        source = find_run(Path(resume_from))
        if source is None:
            raise CheckpointError(
                f"No run directory ({CONFIG_FILE} + {CHECKPOINT_DIR}/) found under {resume_from}. "
                "Attach the previous notebook version's output, or leave out --resume-from "
                "(RESUME_FROM = None in 03_resume).")
    elif fresh:
        return None
    else:
        source = kaggle.find_previous_output(run.name, input_root, is_run=is_run_dir)
        if source is None:
            return None
        print(f"Continuing from the previous notebook output {source}")
    if source.resolve() != run.resolve():
        _copy_run(source, run)
    return source


def is_run_dir(folder: str | os.PathLike) -> bool:
    """A folder holding a run's config.json and checkpoints/ (not necessarily a checkpoint)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / CHECKPOINT_DIR).is_dir()


def find_run(source: Path) -> Path | None:
    """The run directory at or below `source` (the first by path), or None."""
    if is_run_dir(source):
        return source
    return next((path.parent for path in sorted(source.rglob(CONFIG_FILE))
                 if is_run_dir(path.parent)), None)


def _copy_run(previous: Path, run_dir: Path) -> None:
    """Copies a run directory (e.g. from read-only /kaggle/input) to `run_dir`, through a
    temporary folder, and points the checkpoint state at the new place."""
    tmp = run_dir.with_name(run_dir.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(previous, tmp)
    if run_dir.exists():
        for child in tmp.iterdir():
            target = run_dir / child.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(child), str(target))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, run_dir)
    # CheckpointManager stores absolute paths: point them at the new location.
    state_file = run_dir / CHECKPOINT_DIR / "checkpoint"
    if state_file.exists():
        text = state_file.read_text()
        text = text.replace(str(previous / CHECKPOINT_DIR), str(run_dir / CHECKPOINT_DIR))
        atomic_write_text(state_file, text)


# -- reading a run back -------------------------------------------------------------------------

def run_info(run: str | os.PathLike) -> dict:
    """Epoch, step, queue fill, skipped steps, checkpoints and config of a run directory."""
    run_dir = Path(run)
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE}). Train one with "
                              f"`cmc-kit train --data DATA --run {run_dir}` or notebook 02_train "
                              "with this RUN_DIR.")
    config = Config.load(run_dir / CONFIG_FILE)
    state = read_json(run_dir / STATE_FILE) if (run_dir / STATE_FILE).exists() else {}
    checkpoints = list_checkpoints(run_dir)
    return {
        "run": str(run_dir),
        "epoch": state.get("epoch", 0),
        "epochs": config.train.epochs,
        "step": state.get("step", 0),
        "queue_fill": state.get("queue_fill", 0),
        "queue_size": state.get("queue_size"),
        "skipped_steps": state.get("skipped_steps", 0),
        "latest_checkpoint": checkpoints[-1]["path"] if checkpoints else None,
        "checkpoints": [c["path"] for c in checkpoints],
        "config": config.to_dict(),
    }


class RunHandle:
    """A trained run, read back: config, split, checkpoints and encoders with restored weights."""

    def __init__(self, run_dir: str | os.PathLike, checkpoint: str | None = None):
        self.run_dir = Path(run_dir)
        info = run_info(self.run_dir)
        self.config = Config.load(self.run_dir / CONFIG_FILE)
        self.checkpoints = list_checkpoints(self.run_dir)
        if checkpoint is None and not self.checkpoints:
            raise CheckpointError(f"{self.run_dir} has no checkpoint yet. Train it first.")
        self.checkpoint_path = checkpoint or self.checkpoints[-1]["path"]
        self.epoch, self.step = info["epoch"], info["step"]
        for entry in self.checkpoints:
            if entry["path"] == self.checkpoint_path:
                self.epoch, self.step = entry["epoch"], entry["step"]
        self._encoders = {}

    def encoder(self, network: str = "online"):
        """The online network or its momentum twin, with the checkpoint's weights."""
        import tensorflow as tf

        from cmc_kit import models

        if network not in ("online", "momentum"):
            raise ValueError(f"network must be 'online' or 'momentum'. Received: {network!r}")
        if network not in self._encoders:
            online = models.build_encoder(self.config.model, crop_size=self.config.data.crop_size,
                                          name="online")
            momentum = models.build_momentum_twin(online, name="momentum")
            checkpoint = tf.train.Checkpoint(online=online, momentum=momentum)
            checkpoint.restore(self.checkpoint_path).expect_partial().assert_existing_objects_matched()
            self._encoders = {"online": online, "momentum": momentum}
        return self._encoders[network]

    def split_ids(self) -> dict:
        """{'train': ids, 'validation': ids} of RUN/split.json."""
        split_path = self.run_dir / SPLIT_FILE
        if not split_path.exists():
            raise CheckpointError(f"{split_path} is missing, so the held-out samples are unknown. "
                                  "Restore it from the run's output.")
        return read_json(split_path)

    def split(self, catalog: pd.DataFrame) -> dict:
        """{'train': df, 'validation': df}: the catalog's rows on each side of the run's split."""
        return apply_split(catalog, self.split_ids())


def load_run(run: str | os.PathLike, checkpoint: str | None = None) -> RunHandle:
    """The run directory `run`, read back; `checkpoint` None is the latest."""
    return RunHandle(Path(run), checkpoint)
