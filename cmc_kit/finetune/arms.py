"""One fine-tune arm: its labelled subset, its folder, its training (checkpointed, resumable)
and its score.

    RUN/finetune/<arm>-labels<fraction>-<key>/
        settings.json     what the arm was trained with (the key hashes it)
        checkpoints/      tf.train.CheckpointManager: model (backbone + decoder), Adam, step
        result.json       the held-out scores, written once the arm is finished

The key hashes the settings, the labelled ids, the architecture and, for the pretrained arms,
the checkpoint's .index file (which holds a checksum of every saved tensor), so a change of
any of them gets a fresh folder and a rerun with the same ones finds its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cmc_kit import runs
from cmc_kit.errors import DataError
from cmc_kit.fileio import atomic_write_text, read_json_object
from cmc_kit.finetune import scores, segmenter

ARMS = ("frozen", "finetuned", "random_init")
PRETRAINED_ARMS = ("frozen", "finetuned")
VIEWS = ("terrain", "segmentation")
SETTINGS_FILE = "settings.json"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"


def labelled_subset(train_catalog: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The first ceil(fraction * N) training samples of one seeded permutation, in catalog
    order. Nested: a smaller fraction's samples are part of every larger one's."""
    order = np.random.default_rng(seed).permutation(len(train_catalog))
    count = max(1, math.ceil(fraction * len(train_catalog) - 1e-9))
    return train_catalog.iloc[np.sort(order[:count])].reset_index(drop=True)


def repeated_subset(subset: pd.DataFrame, size: int) -> pd.DataFrame:
    """`subset` repeated to at least `size` rows (copies' ids get "~r"), so that an epoch of a
    small labelled subset holds about as many samples as one of the whole training split: each
    repeat gets its own random crop, and one `make_dataset` call (~0.5 s to build on 2 cores)
    serves many steps instead of one."""
    repeats = max(1, math.ceil(size / len(subset)))
    if repeats == 1:
        return subset
    copies = [subset.assign(id=subset["id"].astype(str) + f"~{r}") for r in range(repeats)]
    return pd.concat(copies, ignore_index=True)


def checkpoint_fingerprint(checkpoint_path: str) -> str:
    """sha256 of a checkpoint's .index file: the tensors' names, shapes and checksums."""
    return hashlib.sha256(Path(f"{checkpoint_path}.index").read_bytes()).hexdigest()


def arm_settings(handle, arm: str, fraction: float, subset: pd.DataFrame, base: dict) -> dict:
    """Everything an arm's result depends on (hashed into its folder name)."""
    settings = {"arm": arm, "labels": fraction, "labelled_ids": list(map(str, subset["id"])),
                **base, "model": handle.config.to_dict()["model"],
                "decoder_version": segmenter.DECODER_VERSION}
    if arm in PRETRAINED_ARMS:
        # Its name in the run, not its path: a run moved or copied (a Kaggle output attached to
        # the next session) keeps its finished arms; the fingerprint pins the weights.
        settings["pretrained_checkpoint"] = Path(handle.checkpoint_path).name
        settings["pretrained_fingerprint"] = checkpoint_fingerprint(handle.checkpoint_path)
    else:
        # The run's own starting weights (`evaluate.initial_encoder`), made from train.seed.
        settings["random_init"] = {"start_of_run": True, "seed": handle.config.train.seed}
    return settings


def arm_folder(run_dir: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(run_dir) / runs.FINETUNE_DIR / f"{settings['arm']}-labels{settings['labels']:g}-{key}"


def build_arm_model(handle, settings: dict, encoder=None):
    """The arm's segmentation model at its starting weights (backbone frozen for "frozen"),
    sharing the layers of `encoder` (default: a fresh `segmenter.arm_encoder`)."""
    model = segmenter.build_segmentation_model(
        encoder if encoder is not None else segmenter.arm_encoder(handle, settings["arm"]),
        decoder_channels=settings["decoder_channels"], seed=settings["seed"])
    model.get_layer("backbone").trainable = settings["arm"] != "frozen"
    return model


def _train_step(model, optimizer):
    import keras
    import tensorflow as tf

    @tf.function
    def step(terrain, segmentation):                       # [B, S, S, 3], one-hot [B, S, S, 7]
        with tf.GradientTape() as tape:
            logits = model(terrain, training=True)                         # [B, S, S, 7]
            loss = keras.ops.mean(keras.losses.categorical_crossentropy(
                segmentation, logits, from_logits=True))
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


class ArmTraining:
    """The model, Adam and step counter of one arm, in one tf.train.Checkpoint under the
    arm's folder; `restore` continues where the last checkpoint left off."""

    def __init__(self, model, folder: Path, learning_rate: float):
        import keras
        import tensorflow as tf

        self.model = model
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(model.trainable_variables)  # its slots exist before a restore
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=self.optimizer,
                                              step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(folder / CHECKPOINTS),
                                                  max_to_keep=1)

    def restore(self) -> int:
        """Restores the latest checkpoint (if any); returns the step it holds."""
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step.numpy())

    def fit(self, subset: pd.DataFrame, settings: dict, *, checkpoint_every: int,
            progress: bool, title: str) -> None:
        """Trains to settings["steps"]: epoch e is `make_dataset(stream, ..., epoch=e)` of the
        subset repeated to the training split's size, so a resumed arm sees exactly the batches
        an uninterrupted one would."""
        import keras

        from cmc_kit import views

        total, every = settings["steps"], checkpoint_every
        stream = repeated_subset(subset, settings["epoch_size"])
        batch_size = min(settings["batch_size"], len(stream))
        per_epoch = len(stream) // batch_size
        done = self.restore()
        if progress:
            print(f"{title}: {len(subset)} labelled sample(s), {total} steps of batch "
                  f"{batch_size}" + (f", resuming at step {done}" if done else ""))
        bar = keras.utils.Progbar(total, stateful_metrics=["loss"]) if progress else None
        step = _train_step(self.model, self.optimizer)
        while done < total:
            epoch, start = divmod(done, per_epoch)
            batches = views.make_dataset(stream, views=VIEWS, crop_size=settings["crop_size"],
                                         batch_size=batch_size, training=True,
                                         seed=settings["seed"], epoch=epoch, start_batch=start)
            before = done
            for batch in batches:
                loss = float(step(batch["terrain"], batch["segmentation"]))
                done += 1
                self.step.assign(done)
                if bar is not None:
                    bar.update(done, [("loss", loss)])
                if done % every == 0 or done == total:
                    self.manager.save(checkpoint_number=done)
                if done == total:
                    break
            if done == before:
                raise DataError(f"No sample of the labelled subset ({len(subset)} samples, "
                                f"e.g. {subset['id'].iloc[0]}) could be read. Run "
                                "`cmc-kit validate` on the dataset.")


def run_arm(handle, settings: dict, subset: pd.DataFrame, test_catalog: pd.DataFrame, *,
            checkpoint_every: int, progress: bool) -> dict:
    """Trains (or continues, or skips when finished) one arm and returns its result row."""
    folder = arm_folder(handle.run_dir, settings)
    title = f"{settings['arm']}, labels {settings['labels']:g}"
    result_path = folder / RESULT_FILE
    finished = _finished_result(result_path)
    if finished is not None:
        if progress:
            print(f"{title}: finished before, skipped ({result_path})")
        return finished
    atomic_write_text(folder / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    training = ArmTraining(build_arm_model(handle, settings), folder, settings["learning_rate"])
    training.fit(subset, settings, checkpoint_every=checkpoint_every, progress=progress,
                 title=title)
    scored = scores.score_model(training.model, test_catalog, crop_size=settings["eval_crop_size"],
                                batch_size=settings["batch_size"])
    scored.pop("confusions")
    result = {"labels": settings["labels"], "labelled_samples": len(subset),
              "arm": settings["arm"], "steps": settings["steps"], **scored,
              "eval_crop_size": settings["eval_crop_size"],
              "pretrained_checkpoint": Path(settings.get("pretrained_checkpoint", "")).name,
              "folder": str(folder.relative_to(handle.run_dir))}
    atomic_write_text(result_path, json.dumps(result, indent=1) + "\n")
    return result


def load_arm_model(handle, folder: str | Path):
    """An arm's trained segmentation model, from its folder (relative to the run or absolute)."""
    return _load_arm(handle, folder)[0]


def load_arm_encoder(handle, folder: str | Path):
    """An arm's encoder at its fine-tuned weights (its terrain stem and trunk are the trained
    model's backbone), e.g. to probe what supervision taught it like a run's own encoder."""
    return _load_arm(handle, folder)[1]


def _finished_result(path: Path) -> dict | None:
    """A finished arm's result row; None if there is none, or it is damaged (then the arm's
    checkpoints continue it and score it again)."""
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except (OSError, ValueError) as err:
        warnings.warn(f"{path} is damaged ({err}); that arm is continued from its checkpoints "
                      "and scored again.", stacklevel=4)
        return None


def _load_arm(handle, folder: str | Path):
    folder = Path(handle.run_dir) / folder
    try:
        settings = read_json_object(folder / SETTINGS_FILE)
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read {folder / SETTINGS_FILE} ({err}). Delete {folder} and run "
                        "`cmc-kit finetune` again to train that arm anew.") from None
    encoder = segmenter.arm_encoder(handle, settings["arm"])
    training = ArmTraining(build_arm_model(handle, settings, encoder), folder,
                           settings["learning_rate"])
    if training.restore() != settings["steps"]:
        raise DataError(f"{folder} holds no finished training: run `cmc-kit finetune` again to "
                        "complete it.")
    return training.model, encoder
