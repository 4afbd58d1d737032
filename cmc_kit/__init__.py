"""cmc_kit: Contrastive Multiview Coding + Momentum Contrast for multi-view terrain images.

Importing the package is cheap (no TensorFlow); submodules that need it import it themselves.
When Keras is already loaded, the import also registers cmc_kit's layers and models, so that
`keras.saving.load_model` reads an exported `.keras` file (`import cmc_kit.models` does that in
any order).
"""

import sys

from cmc_kit.palette import CLASS_NAMES, NUM_CLASSES, PALETTE

__version__ = "0.1.0"
__all__ = ["PALETTE", "CLASS_NAMES", "NUM_CLASSES", "__version__"]

if "keras" in sys.modules:  # the user works with Keras: the custom classes must be known to it
    from cmc_kit import models as _models  # noqa: F401  (registers NormalizedConv2D, CMCEncoder)
