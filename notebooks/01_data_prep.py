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
# # 01 · Data: get the Terrain Map samples, check them, look at the four views, cache them
#
# **What it does.** Finds the data (the Kaggle dataset attached to this notebook, a download with
# kagglehub or the Kaggle API, or the built-in synthetic terrain set), checks every sample, shows
# what the network will see, and builds the fast training cache that `02_train` uses.
#
# **Accelerator.** None needed; this is all decoding PNGs on the CPU.
#
# **Expected runtime.** Kaggle (5,000 samples of 512 px attached): a few minutes for the
# full pixel check and about as long again for the cache (estimate, not timed on Kaggle).
# CPU, synthetic set (400 samples of 256 px): generating it takes about 20 s on two cores (160
# samples: 8 s, measured); the check and the cache take seconds.
#
# **Order.** `01_data_prep` → `02_train` → `03_resume` → `04_explore` → `05_evaluate`. The
# notebooks hand over through files: this one records which dataset it chose in
# `data/dataset.json` (under `/kaggle/working` on Kaggle), `02_train` writes the run directory the
# others read.

# %% [markdown]
# ## Setup
#
# The model code lives in the `cmc_kit` package, not in these notebooks. The first cell is the
# same in every notebook: it imports `cmc_kit`, and in a fresh Kaggle session, which lacks it,
# installs it first, from the wheel dataset that `cmc-kit kaggle bundle` made when it is attached
# (*Add Input*; installed with `pip install --no-index`, so *Internet* may stay off), else from
# `CMC_KIT_SOURCE` (any pip source, e.g. your fork on GitHub, with *Internet* on). Locally,
# `make venv` installs cmc_kit into `.venv` and the cell only imports it. The second cell imports
# what this notebook uses.
#
# `environment_report()` prints the versions and the accelerator TensorFlow sees, so the logs
# say what the results were produced with.

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
from cmc_kit import cache, data
from cmc_kit.config import preset

# %% [markdown]
# ## Parameters
#
# The next cell is tagged `parameters`, so papermill (`papermill 01_data_prep.ipynb out.ipynb -p
# DATA_DIR /my/data`) can replace it. `None` means "let cmc_kit decide": on Kaggle everything goes
# under `/kaggle/working`, locally under the repository's `data/`.
#
# `SMOKE` is on when the `CI` environment variable is set (the test suite runs every notebook
# that way): a tiny synthetic set so the whole chain finishes in minutes on a laptop CPU.

# %% tags=["parameters"]
DATA_DIR = None          # a dataset folder; None: Kaggle input, else Kaggle API, else synthetic
FORCE_SYNTHETIC = False  # True: always use the built-in synthetic terrain set
SYNTHETIC_SAMPLES = 400  # synthetic set size when it is used (enough for cpu-demo to beat random init)
SYNTHETIC_SIZE = None    # synthetic image side; None: 512 (the Kaggle size) with a GPU, else 256
SHOW_SAMPLES = 4         # samples in the four-view figure
BUILD_CACHE = True       # the cache makes training read .npy instead of decoding PNGs
SMOKE = in_ci()          # CI: tiny synthetic data

# %%
if SMOKE:
    FORCE_SYNTHETIC, SYNTHETIC_SAMPLES, SYNTHETIC_SIZE, SHOW_SAMPLES = True, 40, 96, 3
if SYNTHETIC_SIZE is None:
    SYNTHETIC_SIZE = 512 if ENVIRONMENT["accelerators"] else 256
# The crop the network trains on: the preset 02_train will pick on this machine.
CROP_SIZE = 32 if SMOKE else preset(notebook.default_preset(ENVIRONMENT["accelerators"])).data.crop_size
print(f"crop size {CROP_SIZE}, smoke mode {'on' if SMOKE else 'off'}")

# %% [markdown]
# ## Data
#
# ### Where it comes from
#
# `notebook.get_data` tries, in order: the folder in `DATA_DIR` if it already holds samples; on
# Kaggle the dataset attached with *Add Input* (read in place, nothing copied, no credentials);
# then a download with kagglehub, Kaggle's download client (in the Kaggle image; elsewhere
# `pip install 'cmc-kit[kaggle]'`), then with the `kaggle` package. Both find the credentials
# themselves: `KAGGLE_API_TOKEN`, or `KAGGLE_USERNAME` and `KAGGLE_KEY`, or `~/.kaggle/kaggle.json`;
# in a Kaggle notebook also *Add-ons → Secrets* with those names, which cmc_kit reads (and never
# prints). When none of that works it says what each source answered and falls back to the
# synthetic set, which has the same layout: `<id>_t.png` terrain RGB, `<id>_h.png` 16-bit height,
# `<id>_i2.png` segmentation in the 7-colour palette.

# %%
choice = notebook.get_data(DATA_DIR, force_synthetic=FORCE_SYNTHETIC,
                           synthetic_samples=SYNTHETIC_SAMPLES, synthetic_size=SYNTHETIC_SIZE)
DATA = choice.path
print(choice.note)
print(f"source: {choice.source}; dataset folder: {DATA}")

# %% [markdown]
# ### Is every sample usable?
#
# Real downloads break in boring ways: a partner file missing, a truncated PNG, an 8-bit height
# map (it would lose most of the altitude precision), a segmentation that is not in the
# palette. `validate` decodes every file once and lists what it found; training later uses only
# the usable samples, so a handful of bad files costs nothing but a line in this report.

# %%
report = data.validate(DATA, progress=True)
print(report.format())
catalog = report.require_usable()
catalog.head()

# %% [markdown]
# ### The four views
#
# Contrastive Multiview Coding learns by matching *views* of the same place: the terrain crop,
# the segmentation crop (7 one-hot channels), the height crop (16-bit, one channel), all cut
# from the same window, and the overview, the whole tile shrunk to the crop size (the yellow box
# marks where the crop lies). A good embedding puts the four views of one place close together
# and views of different places apart. Below are centre crops (height in grey, stretched per
# sample to show the relief); training draws a random window per sample and step.

# %%
VIEWS_PNG = notebook.cache_dir_for(DATA).with_name(f"{DATA.name}-views.png")
notebook.show_views(catalog, crop_size=CROP_SIZE, samples=SHOW_SAMPLES, out_png=VIEWS_PNG)
print(f"saved {VIEWS_PNG}")

# %% [markdown]
# ### The training cache
#
# Decoding a 512 px terrain PNG and a 16-bit height PNG costs more than a training step of a
# small model. `prepare_cache` decodes every sample once into `.npy` shards (class ids instead of
# RGB for the segmentation) that training memory-maps; the batches are identical to the PNG path.
# On Kaggle the cache goes to the local temp folder, not `/kaggle/working`, so it is not saved as
# notebook output. Rerunning skips finished shards.

# %%
if BUILD_CACHE:
    CACHE = cache.prepare_cache(DATA, notebook.cache_dir_for(DATA))
    size_mb = sum(f.stat().st_size for f in CACHE.rglob("*") if f.is_file()) / 1e6
    print(f"cache {CACHE}: {size_mb:,.1f} MB")

# %% [markdown]
# ## Next
#
# `02_train` finds this dataset (and the cache) on its own. Run it in the same session, or pass
# the same `DATA_DIR` if you set one here.
