"""The Terrain Map segmentation palette and the nearest-colour class mapping.

Pure NumPy so validation and the synthetic generator need no TensorFlow.
"""

from __future__ import annotations

import numpy as np

# Index = class id. Order from the dataset; names are a community convention.
PALETTE = np.array(
    [
        (17, 141, 215),   # 0 water
        (225, 227, 155),  # 1 grassland
        (127, 173, 123),  # 2 forest
        (185, 122, 87),   # 3 hills
        (230, 200, 181),  # 4 desert
        (150, 150, 150),  # 5 mountain
        (193, 190, 175),  # 6 tundra
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)
CLASS_NAMES = ("water", "grassland", "forest", "hills", "desert", "mountain", "tundra")
NUM_CLASSES = len(CLASS_NAMES)

# Normalisation of the original: terrain x / 127.5 - 1 (uint8), height x / 32767.5 - 1 (uint16).
TERRAIN_SCALE = 127.5
HEIGHT_SCALE = 32767.5
# Columns of the embeddings table (and of the synthetic metadata.csv): share of pixels per class.
FRACTION_COLUMNS = tuple(f"fraction_{name}" for name in CLASS_NAMES)


def _squared_distances(rgb: np.ndarray, caller: str) -> np.ndarray:
    """Squared RGB distance of every pixel to every palette colour: [..., 3] -> int32 [N, 7].

    int32 keeps it exact for 0..255 input (at most 3 * 255^2), so ties are true ties and argmin
    picks the lower class id.
    """
    if rgb.shape[-1:] != (3,):
        raise ValueError(f"{caller} expects [..., 3] RGB input. Received shape={rgb.shape}")
    pixels = rgb.reshape(-1, 3).astype(np.int32)                      # [N, 3]
    differences = pixels[:, None, :] - PALETTE.astype(np.int32)[None]  # [N, 7, 3]
    return (differences ** 2).sum(axis=-1)                            # [N, 7]


def nearest_class(rgb: np.ndarray) -> np.ndarray:
    """Maps RGB pixels to the index of the nearest palette colour (L2 in RGB).

    Args:
        rgb: uint8 or float array [..., 3].
    Returns:
        uint8 array [...] of class ids in [0, 7).
    """
    rgb = np.asarray(rgb)
    distances = _squared_distances(rgb, "nearest_class")  # [N, 7]
    return distances.argmin(axis=1).astype(np.uint8).reshape(rgb.shape[:-1])


def palette_distance(rgb: np.ndarray) -> np.ndarray:
    """Euclidean distance from each RGB pixel to its nearest palette colour. [..., 3] -> [...]."""
    rgb = np.asarray(rgb)
    distances = _squared_distances(rgb, "palette_distance")  # [N, 7]
    return np.sqrt(distances.min(axis=1)).reshape(rgb.shape[:-1])


def class_to_rgb(class_ids: np.ndarray) -> np.ndarray:
    """Class ids [...] -> palette colours uint8 [..., 3]."""
    return PALETTE[np.asarray(class_ids, dtype=np.intp)]
