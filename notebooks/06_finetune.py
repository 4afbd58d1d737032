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
# # 06 · Fine-tune: does the pretraining save labels?
#
# **What it does.** Puts a small U-Net decoder on the trained encoder's terrain stem and trunk and
# teaches it the 7-class segmentation that the dataset carries, from a few of the training
# samples' labels (1 %, 10 %, all of them). Three arms get the same decoder, batches, steps and
# seed: the pretrained trunk **frozen**, the pretrained trunk **finetuned**, and the same network
# from **random_init**. All are scored on the run's held-out samples (pixel accuracy, mean IoU).
# Then the encoder is exported as a `.keras` model, a SavedModel and a model card.
#
# **Accelerator.** Recommended on the Kaggle data: nine trainings of the whole network (a GPU
# makes each a few minutes; estimate, not measured). Works on a CPU.
#
# **Expected runtime.** CPU, synthetic demo run (`cpu-demo`, 400 samples): 10 minutes at
# `EPOCHS = 10` on a shared 2-core CPU (measured with the same settings through `cmc-kit
# finetune`, see the README). Kaggle, 5,000 samples at 256 px with `kaggle-t4`: about 1,500
# steps per arm, likely an hour or more for nine arms on a T4 (an estimate; not measured). Finished arms are kept under `RUN/finetune/`: running it again skips them, and an
# interrupted arm continues from its last checkpoint.

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
from cmc_kit import export, finetune

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
DATA_DIR = None          # None: the dataset 01_data_prep chose
RUN_DIR = None           # None: runs/terrain-cmc (or a previous version's output attached on Kaggle)
LABELS = "0.01,0.1,1.0"  # fractions of the training split that keep their labels
EPOCHS = 10              # every arm's budget, in passes' worth of the whole training split
CHECKPOINT = None        # the pretrained weights: None (the latest), N or "ckpt-N"
PICTURE_SAMPLES = 4      # held-out images in the picture
SMOKE = in_ci()          # CI: two fractions, one pass each

# %%
if SMOKE:
    LABELS, EPOCHS, PICTURE_SAMPLES = "0.25,1", 1, 2

DATA = notebook.find_data(DATA_DIR)
RUN = notebook.require_run(notebook.run_dir(RUN_DIR))
EXPORT_DIR = RUN.parent / f"{RUN.name}-export"

# %% [markdown]
# ## Fine-tune the three arms
#
# Why three arms: **random_init** is what the same labels buy without pretraining. **frozen**
# measures what the learned features already say about the classes (only the decoder learns), and
# **finetuned** what they are worth as a starting point. All arms take the same number of steps
# whatever the fraction, so a column compares arms at equal labels and a row compares label
# budgets at equal compute. The held-out samples are only ever scored, once, at the end.

# %%
table = finetune.finetune_run(RUN, DATA, labels=LABELS, epochs=EPOCHS, checkpoint=CHECKPOINT)
print(finetune.format_table(table))
print(f"\nwrote {table.attrs['out']}")

# %%
finetune.label_efficiency_figure(table)

# %% [markdown]
# ## What the arms see
#
# Held-out terrain, its true classes and each arm's prediction at the smallest labelled fraction,
# where pretraining has the most to give. Colours are the dataset's palette (water blue, forest
# green, ...).

# %%
picture = finetune.prediction_picture(RUN, table, data=DATA, samples=PICTURE_SAMPLES)
notebook.show(picture)

# %% [markdown]
# ## Take the encoder with you
#
# The terrain stem + trunk as a `.keras` file (`keras.saving.load_model` after `import cmc_kit`),
# a SavedModel that takes uint8 terrain and returns the embedding (no cmc_kit needed), and a model
# card with this run's settings, its evaluation and the table above. Publishing it on Kaggle
# Models is one command, written in the card.

# %%
written = export.export_run(RUN, EXPORT_DIR, checkpoint=CHECKPOINT, data=DATA)
for name in ("keras", "saved_model", "card"):
    print(f"{name:>12}: {written[name]}")

# %% [markdown]
# ## Reading the result
#
# The smoke run (one pass over a few tiny synthetic samples) only checks that everything
# connects: its numbers mean nothing. On a real run, pretraining pays off where **frozen** or
# **finetuned** beat **random_init** by more than the ± (the spread over held-out images; it does
# not include the spread between training seeds), and most at the smallest fraction. If
# **random_init** wins even at 1 %, the contrastive features do not carry the class boundaries:
# look at the probes in `05_evaluate` and train longer.
