"""Helpers for the notebooks in notebooks/: environment report, where data and runs live, a look
at the four views, a live loss plot and small tables of a run's state.

Nothing here builds models or trains: the notebooks call cmc_kit for that. Anything shown goes
through IPython only when a Jupyter kernel is running, so every helper also works headless
(papermill without a frontend, scripts, tests).

Notebooks hand over through files, never through globals:
  01 records the dataset it chose in `DATA_ROOT/dataset.json` (when DATA_DIR is not given) and
  builds the training cache next to the dataset; 02 writes the run directory
  (`RUNS_ROOT/terrain-cmc`) that 03, 04 and 05 read.
"""

from cmc_kit.notebook.datasets import (DATASET_POINTER, DataChoice, cache_dir_for, cache_setting,
                                       find_data, get_data, remember_data)
from cmc_kit.notebook.environment import (DEFAULT_RUN_NAME, FLOAT32_GPU_BATCH, accelerators,
                                          choose_config, config_table, default_preset,
                                          environment_report, run_dir)
from cmc_kit.notebook.figures import (LiveLossPlot, figure_bundle, in_kernel,
                                      keep_figures_in_saved_notebooks, loss_figure, plot_log,
                                      probe_figure, read_log, show, show_views, views_grid)
from cmc_kit.notebook.run_state import info_table, require_run

__all__ = [
    "DATASET_POINTER", "DEFAULT_RUN_NAME", "FLOAT32_GPU_BATCH", "DataChoice", "LiveLossPlot",
    "accelerators", "cache_dir_for", "cache_setting", "choose_config", "config_table",
    "default_preset", "environment_report", "figure_bundle", "find_data", "get_data", "in_kernel",
    "info_table", "keep_figures_in_saved_notebooks", "loss_figure", "plot_log", "probe_figure",
    "read_log", "remember_data", "require_run", "run_dir", "show", "show_views", "views_grid",
]
