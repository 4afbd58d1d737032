# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Resume: continue a run exactly where it stopped, across Kaggle sessions
#
# **What it does.** Continues the run `02_train` wrote, from its latest checkpoint, in this
# session or from a previous Kaggle notebook version's output attached as input. It shows that
# the step counter, the memory queues and the loss curve carry on where they stopped.
#
# **Accelerator.** The same as the run was trained with (GPU for `kaggle-t4`).
#
# **Expected runtime.** Up to `TIME_LIMIT` (11.5 h) on Kaggle, by design: each version trains
# as far as the session allows and saves. On a CPU with `cpu-demo` on the synthetic set: about
# 10 s to rebuild and restore, then a few seconds per extra epoch.

# %% [markdown]
# ## Why resuming needs care, and the time budget
#
# A Kaggle session ends after 12 hours, and *Save & Run All* (a "version") runs the notebook
# top to bottom without you. Training for longer than one session therefore means: each version
# trains until shortly before the limit, checkpoints, and leaves the run directory in
# `/kaggle/working`, which Kaggle saves as the version's output. The next version attaches that
# output (*Add Input → Your Work → this notebook*) and continues.
#
# The budget: `TIME_LIMIT = "11.5h"` leaves 30 minutes of the 12 hours for installing, loading,
# the final checkpoint and Kaggle saving the output. The trainer checks the clock after every step
# (it knows how long a step takes) and stops with a checkpoint before the limit; the next step
# resumes from that exact step, mid-epoch if need be.
#
# What makes the continuation exact: the checkpoint holds the online and momentum weights, the
# optimizer state, the step and epoch counters, and the queues with their write pointer, and the
# data order of an epoch is a pure function of (seed, epoch). Nothing is re-initialised at
# random on resume (the original code rebuilt its queue on restart).

# %% [markdown]
# ## Setup
#
# The first cell is the same in every notebook (`01_data_prep` explains it); the second holds
# this notebook's imports.

# %%
CMC_KIT_SOURCE = ""  # pip source if no wheel dataset is attached: "git+https://github.com/YOU/cmc_kit"

try:
    import cmc_kit
except ImportError:  # a fresh Kaggle session: the attached wheel dataset, else CMC_KIT_SOURCE
    import glob
    import importlib
    import os

    WHEELS = sorted(glob.glob("/kaggle/input/**/cmc_kit-*.whl", recursive=True))
    if not WHEELS and not CMC_KIT_SOURCE:
        raise ModuleNotFoundError(
            "cmc_kit is not installed: attach the wheel dataset of `cmc-kit kaggle bundle` "
            "(Add Input), or set CMC_KIT_SOURCE to a pip source and turn Internet on.")
    PIP_ARGS = (f"--no-index --find-links {os.path.dirname(WHEELS[-1])} {WHEELS[-1]}" if WHEELS
                else CMC_KIT_SOURCE)  # --no-index: from the dataset alone, Internet on or off
    # %pip install -q {PIP_ARGS}
    importlib.invalidate_caches()
    import cmc_kit

from cmc_kit import notebook
from cmc_kit.config import in_ci

ENVIRONMENT = notebook.environment_report()

# %%
from cmc_kit import embed, runs, training

# %% [markdown]
# ## Parameters
#
# `RESUME_FROM = None` finds the previous output by itself on Kaggle: a folder under
# `/kaggle/input` with the run's name that holds `config.json` and `checkpoints/`. Name it
# explicitly to continue another copy. `EPOCHS` is the total to reach: `None` finishes what the
# run was configured for; a larger number trains longer.

# %% tags=["parameters"]
DATA_DIR = None       # None: the dataset 01_data_prep chose
RUN_DIR = None        # None: runs/terrain-cmc
RESUME_FROM = None    # a previous run directory; None: look under /kaggle/input on Kaggle
EPOCHS = None         # total epochs to reach; None: the run's own setting
OVERRIDES = {}        # e.g. {"train.mixed_precision": "mixed_float16"}; model settings stay fixed
TIME_LIMIT = "11.5h"  # stop cleanly before Kaggle's 12 h session limit
SMOKE = in_ci()       # CI: one more epoch of the tiny smoke run

# %%
if SMOKE:
    EPOCHS = 3

DATA = notebook.find_data(DATA_DIR)
RUN = notebook.run_dir(RUN_DIR)
copied_from = runs.bring_in_previous_run(RUN, RESUME_FROM)
notebook.require_run(RUN)  # a clear error when there is nothing to continue
print(f"continuing from {copied_from}" if copied_from else f"continuing the run in {RUN}")

# %% [markdown]
# ## Where the run stopped

# %%
before = runs.run_info(RUN)
notebook.info_table(before, labels=["before"])

# %% [markdown]
# ## Hyperparameters
#
# The saved `config.json` is used as it is; only the number of epochs and the cache location
# (a new Kaggle session may not have the cache of the old one; the PNGs give the same batches)
# are set here, plus `OVERRIDES` if any. The hardware may differ from the last session's (T4 x2,
# P100, TPU): the precision follows it and the checkpoint restores under each; only the batch
# stays the run's, and a warning below says when it may not fit.

# %%
CACHE = notebook.cache_setting(notebook.cache_dir_for(DATA))
config = notebook.choose_config(RUN, epochs=EPOCHS, overrides={**OVERRIDES, "data.cache": CACHE})
print(f"epoch {before['epoch']} of {config.train.epochs}; "
      + ("nothing left to train: raise EPOCHS to train longer."
         if before["epoch"] >= config.train.epochs else "continuing."))

# %% [markdown]
# ## Train (continued)
#
# The progress bar starts at the saved step, not at zero, and the live plot draws the earlier
# epochs from `log.csv` with a dashed line where this session began.

# %%
live_plot = notebook.LiveLossPlot(RUN, update_every=5, title="Training loss (resumed)")
result = training.train(DATA, RUN, config, time_limit=TIME_LIMIT,
                        callbacks=[embed.EpochEmbeddings(), live_plot])
print(f"{result.status}: epoch {result.epoch}, step {result.step}")

# %% [markdown]
# ## Did it continue where it stopped?
#
# The step grows from the saved value, the queues stay full (they were restored, not refilled),
# and `log.csv` continues its epoch numbering: one curve across sessions.

# %%
after = runs.run_info(RUN)
notebook.info_table(before, after, labels=["before", "after"])

# %%
if after["step"] < before["step"] or after["epoch"] < before["epoch"]:
    raise RuntimeError(f"The run went backwards: {before['step']} -> {after['step']}")
notebook.plot_log(RUN, resumed_at_step=before["step"])

# %% [markdown]
# ## Next session
#
# On Kaggle: *Save Version → Save & Run All*. When it has finished, open the notebook again,
# *Add Input → Your Work →* the version just saved, and *Save & Run All* again: it continues from
# that version's checkpoint. Repeat until `log.csv` reaches the epochs you want (raise `EPOCHS`
# to go further).
