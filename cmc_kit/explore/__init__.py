"""A run's embedding space: notebook explorer, standalone HTML page, mosaic, feature maps.

One module per job; this face re-exports their public names, so `cmc_kit.explore.X` works:

- `widget`: `Explorer(table, catalog)` / `Explorer.from_run(run, data)`, a Plotly FigureWidget
  scatter of the UMAP layout with ipywidgets controls; hover/click shows a sample's thumbnails
  and metadata, the lasso shows a grid of the selected terrains.
- `page`: `write_explorer_html(table, layout, out, catalog=...)` / `export_html(run, data, out)`,
  one self-contained HTML file (Plotly JS and thumbnails inlined) that works offline.
- `over_epochs`: `embedding_over_epochs(run)` / `write_epochs_html(run)`, an animated Plotly
  figure (or page) of the held-out subset the trainer embeds after every epoch
  (`RUN/embeddings/epoch_NNN.parquet`), one UMAP frame per epoch.
- `pictures`: `mosaic(layout, out_png, catalog=...)`, terrain thumbnails placed on the layout
  without overlap; `feature_maps(encoder, batch)`, PCA of a trunk stage's feature map as RGB.
- `thumbnails`: the small pictures of whole samples the others show.
- `scatter`: colouring options, marker colours and the scatter trace, shared by the above.
"""

from cmc_kit.errors import CmcKitError, DataError
from cmc_kit.explore.over_epochs import (align_layout, embedding_over_epochs, epoch_tables,
                                         write_epochs_html)
from cmc_kit.explore.page import export_html, is_cmc_kit_page, write_explorer_html
from cmc_kit.explore.pictures import FeatureMaps, displayable, feature_maps, mosaic, pca_rgb
from cmc_kit.explore.scatter import DOMINANT, colour_options, marker_colours
from cmc_kit.explore.thumbnails import (THUMBNAIL_KINDS, data_uri, encode_thumbnails,
                                        height_colour_map, make_thumbnails, read_sample,
                                        sample_thumbnails, thumbnail_images)
from cmc_kit.explore.widget import (FIGURE_WIDTH, Explorer, figure_widget_available,
                                    widgets_can_render)

__all__ = [
    "CmcKitError", "DOMINANT", "DataError", "Explorer", "FIGURE_WIDTH", "FeatureMaps",
    "THUMBNAIL_KINDS", "align_layout", "colour_options", "data_uri", "displayable",
    "embedding_over_epochs", "encode_thumbnails", "epoch_tables", "export_html", "feature_maps",
    "figure_widget_available", "height_colour_map", "is_cmc_kit_page", "make_thumbnails",
    "marker_colours", "mosaic",
    "pca_rgb", "read_sample", "sample_thumbnails", "thumbnail_images", "widgets_can_render",
    "write_epochs_html", "write_explorer_html",
]
