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
# # 02 · Train: Contrastive Multiview Coding with Momentum Contrast
#
# **What it does.** Picks a preset, shows every setting, and trains one encoder on the four views
# with a momentum (EMA) twin and a memory queue of past keys. A progress bar and a live loss plot
# show how it goes; checkpoints and `log.csv` land in the run directory (`runs/terrain-cmc`),
# which `03_resume`, `04_explore` and `05_evaluate` read.
#
# **Accelerator.** GPU (Kaggle: *Settings → Accelerator → GPU T4 x2* or *P100*). On a CPU it
# trains the small `cpu-demo` preset instead.
#
# **Expected runtime.** Kaggle T4, `kaggle-t4` preset (5,000 samples, 256 px crops, ResNet-34,
# 20 epochs): not measured yet (no GPU was available to the project); expect hours, and
# `TIME_LIMIT` stops it cleanly before Kaggle's 12-hour limit either way. CPU, `cpu-demo`
# preset (64 px crops, ResNet-34 at width 0.125, 15 epochs) on the synthetic set: about
# 3 minutes for 400 samples on two cores (measured: 285 steps, ~10 s per epoch).

# %% [markdown]
# ## Setup
#
# Same first cell in every notebook (`01_data_prep` says more): import `cmc_kit`, installing it
# in a fresh Kaggle session from the attached wheel dataset (Internet may be off) or else from
# `CMC_KIT_SOURCE`, and report versions and the accelerator. Then this notebook's imports.

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
from cmc_kit import embed, models, runs, training

# %% [markdown]
# ## Parameters
#
# `None` means "let cmc_kit decide": the dataset recorded by `01_data_prep`, the run directory
# `runs/terrain-cmc` (under `/kaggle/working` on Kaggle), the `kaggle-t4` preset with a GPU and
# `cpu-demo` without. `OVERRIDES` changes any setting by its dotted name; an unknown name is an
# error that lists the valid ones.

# %% tags=["parameters"]
DATA_DIR = None       # None: the dataset 01_data_prep chose
RUN_DIR = None        # None: runs/terrain-cmc
PRESET = None         # "cpu-demo", "kaggle-t4", "original"; None: kaggle-t4 with a GPU, else cpu-demo
EPOCHS = None         # total epochs to reach; None: the preset's
OVERRIDES = {}        # e.g. {"model.trunk": "regnetx-400mf", "train.temperature": 0.1}
TIME_LIMIT = "11.5h"  # checkpoint and stop cleanly before this much time (Kaggle stops at 12 h)
FRESH = False         # True: delete this run's checkpoints and logs and start over
SMOKE = in_ci()       # CI: a tiny model for two epochs

# %%
if SMOKE:
    PRESET, EPOCHS = "cpu-demo", 2
    OVERRIDES = {"data.crop_size": 32, "data.batch_size": 8, "data.validation_fraction": 0.2,
                 "model.trunk": "resnet18", "model.width": 0.125, "model.embedding_dim": 16,
                 "train.queue_multiplier": 2, "train.eval_subset": 8, **OVERRIDES}

DATA = notebook.find_data(DATA_DIR)
RUN = notebook.run_dir(RUN_DIR)
CACHE = notebook.cache_setting(notebook.cache_dir_for(DATA))
print(f"data {DATA}\nrun  {RUN}\ncache {CACHE or '(none: reading the PNGs)'}")
# Kaggle: a previous version's output attached as input is copied in first, so that its saved
# settings (not this session's GPU) decide the batch size. FRESH ignores it.
copied_from = runs.bring_in_previous_run(RUN, fresh=FRESH)
if copied_from:
    print(f"continuing {copied_from} (set FRESH = True to start over)")

# %% [markdown]
# ## Hyperparameters
#
# A run keeps its settings in `RUN/config.json`. Running this notebook again on the same run
# continues it with those settings (then only epochs, learning rate, time limit and the like may
# change; a different model is refused with the fields named). The preset values follow the
# original research code where it was sound: Adam with gradient clipping, temperature 0.07,
# momentum 0.99, a queue of 10 × batch past keys, all ordered pairs among the three crops plus
# terrain ↔ overview. What changed and why: InfoNCE instead of the unstable NCE form, positive
# keys from the momentum network (as in MoCo), mixed precision and a larger batch on a T4.

# %%
config = notebook.choose_config(RUN, preset=PRESET, epochs=EPOCHS,
                                overrides={**OVERRIDES, "data.cache": CACHE}, fresh=FRESH)
notebook.config_table(config)

# %% [markdown]
# ## Model
#
# One shared trunk (ResNet-34 by default, built from Normalized Convolutions, which replace
# BatchNorm: the original training collapsed with BatchNorm) behind a small stem per view and an
# MLP head per view that maps to the embedding. A momentum twin (an exponential moving average of
# these weights) makes the keys; each view keeps a queue of recent keys as negatives. The loss
# has two terms per view pair: *inter-batch* (negatives from the queue) and *intra-batch*
# (negatives are the other samples of the batch), which stops the encoder from merely telling new
# embeddings from old queued ones.

# %%
encoder = models.build_encoder(config.model, crop_size=config.data.crop_size)
print(f"{config.model.trunk} trunk, width {config.model.width}, views {', '.join(config.model.views)}: "
      f"{encoder.count_params():,} weights (the momentum twin has as many)")
del encoder  # training builds its own; this one only showed the size

# %% [markdown]
# ## Train
#
# `training.train` resumes by itself when the run holds a checkpoint, saves one at the end of
# every epoch (and every `train.checkpoint_every_steps`), and returns cleanly when `TIME_LIMIT`
# is close. The progress bar shows the loss and the contrastive accuracy (how often the positive
# key beats every negative); the plot below redraws every few steps, with the per-epoch mean and
# the kNN accuracy of a fixed held-out subset (a cheap check that the embedding carries
# information about the terrain class). That subset's embedding after every epoch, which
# `04_explore` animates, and its kNN accuracy come from the `embed.EpochEmbeddings` callback;
# it goes first so the plot sees the accuracy.

# %%
live_plot = notebook.LiveLossPlot(RUN, update_every=5)
result = training.train(DATA, RUN, config, fresh=FRESH, time_limit=TIME_LIMIT,
                        callbacks=[embed.EpochEmbeddings(), live_plot])
print(f"{result.status}: epoch {result.epoch}, step {result.step}, checkpoint {result.checkpoint}")

# %% [markdown]
# ## What the run directory holds
#
# `config.json` and `split.json` (which samples are held out: never trained on, used by the
# evaluations), `checkpoints/` (weights of both networks, the queues and their write pointer, the
# optimizer, step and epoch: everything a resume needs), `state.json`, `log.csv` (one row per
# epoch), `embeddings/` (the held-out subset's embedding after each epoch, which `04_explore`
# animates) and `tensorboard/`.

# %%
info = runs.run_info(RUN)
notebook.info_table(info, labels=["now"])

# %%
notebook.read_log(RUN)

# %% [markdown]
# ## Next
#
# `03_resume` continues this run (also in a later Kaggle session), `04_explore` shows the learned
# embedding, `05_evaluate` measures it against untrained baselines.
