"""Palette mapping (cmc_kit.palette) against a naive per-pixel reference."""

import math

import numpy as np
import pytest

from cmc_kit import palette
from cmc_kit.palette import CLASS_NAMES, PALETTE, nearest_class, palette_distance


def naive_nearest(pixel):
    """(class id, distance) by looping over the palette; strict < keeps the lower id on ties."""
    best_id, best_squared = None, None
    for class_id, colour in enumerate(PALETTE.tolist()):
        squared = sum((int(p) - c) ** 2 for p, c in zip(pixel, colour))
        if best_squared is None or squared < best_squared:
            best_id, best_squared = class_id, squared
    return best_id, math.sqrt(best_squared)


def test_nearest_class_and_distance_match_a_naive_loop():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    ids, distances = nearest_class(pixels), palette_distance(pixels)
    assert ids.shape == distances.shape == (5, 9) and ids.dtype == np.uint8
    for index in np.ndindex(5, 9):
        expected_id, expected_distance = naive_nearest(pixels[index])
        assert ids[index] == expected_id
        assert distances[index] == pytest.approx(expected_distance, abs=1e-12)


def test_palette_colours_map_to_themselves_at_distance_zero():
    np.testing.assert_array_equal(nearest_class(PALETTE), np.arange(len(CLASS_NAMES)))
    np.testing.assert_array_equal(palette_distance(PALETTE), np.zeros(len(CLASS_NAMES)))


def test_exact_ties_go_to_the_lower_class_id():
    # Pixels near the midpoint of every pair of palette colours; keep those whose two nearest
    # colours are exactly equidistant (computed here in Python ints).
    offsets = np.stack(np.meshgrid(*[np.arange(-6, 7)] * 3, indexing="ij"), -1).reshape(-1, 3)
    colours = PALETTE.astype(int)
    tied_pixels, lowest_ids = [], []
    for i in range(len(colours)):
        for j in range(i + 1, len(colours)):
            for pixel in np.clip((colours[i] + colours[j]) // 2 + offsets, 0, 255):
                squared = [int(((pixel - c) ** 2).sum()) for c in colours]
                nearest = [k for k, d in enumerate(squared) if d == min(squared)]
                if len(nearest) > 1:
                    tied_pixels.append(pixel)
                    lowest_ids.append(nearest[0])
    assert len(tied_pixels) > 10, "the search found too few ties to test"
    np.testing.assert_array_equal(nearest_class(np.array(tied_pixels)), lowest_ids)


def test_both_functions_reject_non_rgb_input():
    for function in (nearest_class, palette_distance):
        with pytest.raises(ValueError, match=rf"{function.__name__} expects \[\.\.\., 3\]"):
            function(np.zeros((4, 4), np.uint8))


def test_fraction_columns_follow_class_names():
    assert palette.FRACTION_COLUMNS == tuple("fraction_" + name for name in CLASS_NAMES)
