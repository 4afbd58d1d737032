"""cmc_kit: Contrastive Multiview Coding + Momentum Contrast for multi-view terrain images.

Importing the package is cheap (no TensorFlow); submodules that need it import it themselves.
"""

from cmc_kit.palette import CLASS_NAMES, NUM_CLASSES, PALETTE

__version__ = "0.1.0"
__all__ = ["PALETTE", "CLASS_NAMES", "NUM_CLASSES", "__version__"]
