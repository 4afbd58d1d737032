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
# # 04 · Explore: what did the encoder learn?
#
# **What it does.** Embeds every sample with the trained encoder (terrain centre crop, trunk
# features, mean-pooled, as in the original's UMAP), lays the embeddings out with UMAP, and opens
# an interactive explorer: hover or click a point to see its terrain, height and segmentation,
# lasso a region to see what it holds, colour by class or any metadata. Then a mosaic of the
# layout, feature maps of the trunk, and a standalone HTML page of the explorer that works
# offline.
#
# **Accelerator.** Optional: embedding 5,000 samples takes about a minute on a GPU, several on a
# CPU (estimate).
#
# **Expected runtime.** Kaggle: a few minutes (UMAP of 5,000 points and 5,000 thumbnails for the
# page). CPU, synthetic set: under a minute.

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
from IPython.display import Image

from cmc_kit import data, explore, runs, views

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
DATA_DIR = None     # None: the dataset 01_data_prep chose
RUN_DIR = None      # None: runs/terrain-cmc (or a previous version's output attached on Kaggle)
SPLIT = "all"       # "validation" (never trained on), "train" or "all"
COLOUR_BY = "dominant_class"
FEATURE_SAMPLES = 4
SMOKE = in_ci()     # CI: fewer feature-map samples

# %%
if SMOKE:
    FEATURE_SAMPLES = 2

DATA = notebook.find_data(DATA_DIR)
RUN = notebook.require_run(notebook.run_dir(RUN_DIR))
catalog = data.discover(DATA)
handle = runs.load_run(RUN)
print(f"run {RUN}: epoch {handle.epoch}, step {handle.step}; {len(catalog)} samples in {DATA}")

# %% [markdown]
# ## The interactive explorer
#
# Points are samples; nearby points have similar embeddings. If training worked, neighbours look
# alike: the colours (dominant class of the crop) form regions, and hovering across a region shows
# terrain changing gradually. The controls re-run UMAP (`n_neighbors` trades local for global
# structure), switch to 3D, or re-embed with another checkpoint, view or network (online or
# momentum). Hover and lasso need a live kernel with `anywidget`; elsewhere a static plot is
# shown, and the standalone page below has the hover details.

# %%
explorer = explore.Explorer.from_run(RUN, DATA, split=SPLIT, colour_by=COLOUR_BY)
explorer

# %% [markdown]
# The same layout as a plain figure: widgets are not stored in a saved notebook, this is (with
# an HTML copy for Kaggle's version viewer; GitHub shows no Plotly output at all, which is what
# the standalone `explorer.html` page is for).

# %%
explorer.static_figure()

# %% [markdown]
# ## How the embedding formed during training
#
# After every epoch the trainer embedded the same held-out samples (`train.eval_subset` of
# them, `RUN/embeddings/epoch_NNN.parquet`). Each epoch gets its own UMAP, rotated and scaled
# onto the next one (UMAP's axes are arbitrary), so a point moves only as far as its
# neighbourhood changed. Press *play* or drag the slider: early epochs are usually one mixed
# cloud; classes pulling apart over the epochs is the encoder learning. The page is saved as
# `embedding_over_epochs.html` beside the run.

# %%
if explore.epoch_tables(RUN):
    over_epochs = explore.embedding_over_epochs(RUN)
    print(f"wrote {explore.write_epochs_html(RUN, figure=over_epochs)}")
else:
    over_epochs = None
    print("This run has no per-epoch embeddings (no held-out split, or train.eval_subset=0).")
over_epochs

# %% [markdown]
# ## Mosaic
#
# The same layout with each point replaced by its terrain thumbnail (one per grid cell, the
# point nearest the cell centre): a one-glance check of what the regions hold.

# %%
mosaic_png = explore.mosaic(explorer.layout, RUN / "mosaic.png", catalog=catalog,
                            ids=list(explorer.table["id"].astype(str)))
Image(filename=str(mosaic_png), width=640)

# %% [markdown]
# ## Feature maps
#
# What the trunk responds to inside a crop: the last stage's feature map projected onto its
# three principal components and shown as RGB (same colours mean similar features, across the
# samples shown). Boundaries between water, forest and mountains in the crop should show up as
# colour changes if the encoder separates them.

# %%
held_out = handle.split(catalog)["validation"]
batch = next(iter(views.make_dataset(held_out if len(held_out) else catalog,
                                     views=handle.config.model.views,
                                     crop_size=handle.config.data.crop_size,
                                     batch_size=FEATURE_SAMPLES, training=False, seed=0)))
maps = explore.feature_maps(handle.encoder("online"), batch, view="terrain", samples=FEATURE_SAMPLES)
print(f"explained variance of the 3 components: {maps.explained_variance_ratio.round(3)}")
maps.figure

# %% [markdown]
# ## A page to share
#
# One self-contained HTML file (Plotly and the thumbnails inlined): open it in any browser,
# offline, hover for details. On Kaggle it is part of the notebook's output.

# %%
page = explore.write_explorer_html(explorer.table, explorer.layout, RUN / "explorer.html",
                                   catalog=catalog, title=f"{RUN.name}: epoch {handle.epoch}, step {handle.step}")
print(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB)")
