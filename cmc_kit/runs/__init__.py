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

The trainer asks and this package answers; nothing here builds a training step:

    files        the file names, what training owns, state.json, output paths
    checkpoints  the checkpoints: listing, damage, the newest usable one
    settings     config and split, what may not change on resume, the dataset's fingerprint
    lifecycle    one trainer per run, a fresh start, a previous run brought in
    reading      run_info, load_run
"""

from cmc_kit.runs.checkpoints import (COUNTERS, checkpoint_number, checkpoint_paths,
                                      has_checkpoint, list_checkpoints, newest_usable_checkpoint,
                                      resolve_checkpoint, saved_state)
from cmc_kit.runs.files import (CHECKPOINT_DIR, CHECKPOINT_NAME, CONFIG_FILE, DAMAGED_SUFFIX,
                                DATASET_FILE,
                                EMBEDDINGS_DIR, EMBEDDINGS_TABLE, EPOCHS_PAGE_FILE,
                                EVALUATION_FILE, EXPLORER_FILE, FINETUNE_DIR, LOCK_FILE,
                                LOG_FILE, MOSAIC_FILE, RUN_OUTPUTS, SET_ASIDE_DIR, SPLIT_FILE,
                                STATE_FILE, STEP_LOG_FILE, TENSORBOARD_DIR, TRAINING_FILES,
                                UMAP_CACHE_DIR, epoch_table_path, output_path, read_json,
                                read_split, write_state)
from cmc_kit.runs.lifecycle import (FreshStart, RunLock, bring_in_previous_run, find_run,
                                    is_run_dir, recover_set_aside, refuse_fresh_with_resume_from)
from cmc_kit.runs.reading import RunHandle, load_run, run_info
from cmc_kit.runs.settings import (apply_split, check_dataset, check_resume_settings,
                                   dataset_fingerprint, keep_lost_training_samples, new_split,
                                   resolve_config, usable_catalog, write_dataset_fingerprint)

__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_NAME", "CONFIG_FILE", "COUNTERS", "DAMAGED_SUFFIX",
    "DATASET_FILE",
    "EMBEDDINGS_DIR", "EMBEDDINGS_TABLE", "EPOCHS_PAGE_FILE", "EVALUATION_FILE", "EXPLORER_FILE",
    "FINETUNE_DIR", "FreshStart", "LOCK_FILE", "LOG_FILE", "MOSAIC_FILE", "RUN_OUTPUTS",
    "RunHandle", "RunLock", "SET_ASIDE_DIR", "SPLIT_FILE", "STATE_FILE", "STEP_LOG_FILE",
    "TENSORBOARD_DIR", "TRAINING_FILES", "UMAP_CACHE_DIR", "apply_split", "bring_in_previous_run",
    "check_dataset", "check_resume_settings", "checkpoint_number", "checkpoint_paths",
    "dataset_fingerprint", "epoch_table_path", "find_run", "has_checkpoint", "is_run_dir",
    "keep_lost_training_samples", "list_checkpoints", "load_run", "new_split",
    "newest_usable_checkpoint", "output_path", "read_json", "read_split", "recover_set_aside",
    "refuse_fresh_with_resume_from", "resolve_checkpoint", "resolve_config", "run_info",
    "saved_state", "usable_catalog", "write_dataset_fingerprint", "write_state",
]
