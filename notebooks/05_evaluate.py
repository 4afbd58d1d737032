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
# # 05 · Evaluate: does the embedding beat honest baselines?
#
# **What it does.** Freezes the trained encoder and fits two cheap probes on its features: a
# k-nearest-neighbour classifier and linear models. They predict properties read from the data
# itself (dominant segmentation class of the crop, class fractions, mean height, and on the
# synthetic set the generator's parameters). The same probes run on three baselines: the same
# network **untrained** (the very weights this run started from), the **raw pixels** of the crop downsampled to
# 8×8, and the crop's **mean colour**. Probes fit on the run's training split and score on its
# held-out split. The features are every stage's activations (mean and std per channel), for the
# trained and the random network alike. Each image is scored on the `GRID` x `GRID` crops that
# tile it, not only on its centre: more scored crops from the same images, firmer figures.
#
# **Accelerator.** Optional (embedding the samples is the only network work).
#
# **Expected runtime.** Kaggle, 5,000 samples: a few minutes (estimate; a 2x2 grid embeds 4
# crops per image); more with `CHECKPOINTS = "all"`, which probes every kept checkpoint. CPU,
# demo synthetic set with `GRID = 4`: about a minute per checkpoint.

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
from cmc_kit import data, evaluate, runs

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
DATA_DIR = None         # None: the dataset 01_data_prep chose
RUN_DIR = None          # None: runs/terrain-cmc (or a previous version's output attached on Kaggle)
CHECKPOINTS = "all"     # "all": one column per kept checkpoint (learning over epochs); "latest"
GRID = None             # GRID x GRID crops scored per image; None: as many as tile it, at most
                        # 4x4 (2x2 for 512 px Kaggle tiles, 4x4 for the demo's 256 px); 1: centre
SMOKE = in_ci()         # CI: the latest checkpoint only

# %%
if SMOKE:
    CHECKPOINTS = "latest"

DATA = notebook.find_data(DATA_DIR)
RUN = notebook.require_run(notebook.run_dir(RUN_DIR))
OUT = RUN / "evaluation.csv"
DATASET = data.Dataset.find(DATA)  # found once, for the grid and the probes
if GRID is None:
    GRID = evaluate.tiling_grid(DATASET.catalog, runs.load_run(RUN).config.data.crop_size)
print(f"scoring {GRID}x{GRID} crops per image")

# %% [markdown]
# ## Evaluate
#
# Why these baselines: a randomly initialised convolutional network already gives features that
# a linear probe can use (the architecture is a prior), and for terrain much is visible in the
# average colour. Training has taught the encoder something only where **trained** beats all
# three. Accuracy is for the 7-way dominant class (chance is the share of the most common class);
# R² (variance-weighted over a target's columns) is 1 for perfect predictions and 0 for
# predicting the mean.
#
# Every value comes with a 95% interval (`_low`, `_high`): a bootstrap over the held-out
# samples. Crops of one image look alike, so the bootstrap draws whole images (all their crops
# at once), and the linear probes' cross-validation keeps an image's crops in one fold; scoring
# 16 crops per image therefore does not pretend to 16 times the evidence. The interval says how
# much the held-out set's luck moves the figure, not how much another
# training seed would; for that, train several seeds and pass their runs to
# `evaluate.evaluate_runs` (a t-interval over seeds; `benchmarks/learning.py` does it all).
# Overlapping intervals mean the difference is not shown by this split.

# %%
table = evaluate.evaluate_run(RUN, dataset=DATASET, out=OUT, checkpoints=CHECKPOINTS, grid=GRID)
print(evaluate.format_table(table))
print(f"\nwrote {OUT}")

# %%
notebook.probe_figure(table)

# %% [markdown]
# ## Reading the result
#
# The smoke run (a few steps on 40 tiny synthetic samples) is only a check that everything
# connects: its numbers mean nothing. On the Kaggle data with the `kaggle-t4` preset, look for
# **trained** above **random_init**, **raw_pixels** and **mean_colour** (beyond the intervals)
# on the dominant class and the class
# fractions; with `CHECKPOINTS = "all"` the `epoch_N` columns show whether the gap grew with
# training. If it does not, the embedding learned little about terrain: check the loss curve in
# `02_train` / `03_resume` and the explorer in `04_explore`.
#
# What to expect from the CPU demo (the `cpu-demo` preset on the synthetic set, 4x4 crops per
# image, 5 training seeds): dominant-class kNN 0.873 +- 0.009 trained against 0.849 +- 0.015 for
# the network it started from, 0.750 for the mean colour and 0.707 for raw pixels; the gap to the
# random network is small because a crop's dominant class is mostly its colour and texture,
# which even a random network's first stages summarise. Training shows more on what colour
# does not give away: mean height R² 0.889 vs 0.848, relief 0.786 vs 0.753 (README, "What the
# demo measured"). For scale: the same network trained for as long on the segmentation *labels*
# reaches kNN 0.897, so the labels themselves add about 5 points there; self-supervision gets
# half of that, and matches supervision on the linear accuracy (0.922 vs 0.920)
# (`benchmarks/learning.py --supervised`).
