"""Synthetic terrain maps in the exact layout of the Kaggle Terrain Map dataset.

Each sample is drawn from a few global parameters (latitude/temperature, aridity, sea level,
relief, spectral slope, ridge strength). From them:

1. elevation: fractal 1/f^beta noise plus ridged mountain ranges where a smooth "tectonic" field
   is high; water wherever it lies below sea level (0 m);
2. segmentation: water / mountain / tundra / hills / desert / forest / grassland from elevation,
   slope of the smoothed elevation, temperature (lapse rate + north-south gradient) and a separate
   smooth moisture field (wetter near coasts), then a land-only majority smoothing so classes
   form large regions;
3. terrain RGB: per-class colours that vary with moisture, depth, elevation and texture noise,
   softly blended across class edges and hillshaded with light from the north-west.

So the three views share information, but none is a function of another: moisture and
temperature are not in the height map, texture and shading are not in the segmentation.
All fields are made on a canvas 25% larger than the output and cropped, so images do not tile.
Pure NumPy + Pillow (no TensorFlow); deterministic for a seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cmc_kit.layout import DATASET_FOLDER, METADATA_FILENAME, SAMPLE_FILE, read_metadata
from cmc_kit.fileio import atomic_write_text
from cmc_kit.progress import ProgressLine
from cmc_kit.errors import DataError
from cmc_kit.palette import FRACTION_COLUMNS, NUM_CLASSES, class_to_rgb

WATER, GRASSLAND, FOREST, HILLS, DESERT, MOUNTAIN, TUNDRA = range(NUM_CLASSES)

# Height PNG encoding: uint16 = (elevation_m + HEIGHT_OFFSET_M) * HEIGHT_UNITS_PER_M, which
# covers -10,000 m .. +11,845 m; sea level (0 m) is HEIGHT_SEA_LEVEL.
HEIGHT_OFFSET_M = 10_000.0
HEIGHT_UNITS_PER_M = 3.0
HEIGHT_SEA_LEVEL = int(HEIGHT_OFFSET_M * HEIGHT_UNITS_PER_M)

# A patch covers about 512 km whatever its pixel size, so small samples look like
# downscaled large ones (slopes and blur widths are defined per patch, not per pixel).
PATCH_WIDTH_M = 512_000.0
_LAPSE_RATE_C_PER_M = 6.5e-3
_PNG_COMPRESS_LEVEL = 3  # level 6 (default) is ~2x slower for ~10% smaller files

# Satellite-like colours per class, (dry or deep end, wet or shallow end), RGB in [0, 255].
_CLASS_COLOURS = np.array([
    [(12, 42, 88), (48, 118, 150)],      # water: deep -> shallow
    [(168, 164, 98), (104, 138, 64)],    # grassland: dry -> wet
    [(58, 84, 44), (30, 68, 36)],        # forest
    [(140, 118, 84), (104, 108, 70)],    # hills
    [(222, 196, 150), (196, 160, 116)],  # desert
    [(126, 116, 106), (104, 100, 96)],   # mountain rock (snow added separately)
    [(160, 154, 132), (132, 134, 116)],  # tundra
], dtype=np.float32)
_SNOW = np.array([238, 240, 246], dtype=np.float32)

# Parameter name -> short description; the metadata.csv columns after `id`.
PARAMETERS = {
    "latitude_deg": "absolute latitude; drives temperature and the subtropical dry belt",
    "temperature_c": "mean sea-level temperature of the patch",
    "aridity": "0 wet .. 1 dry; shifts the moisture field",
    "base_elevation_m": "mean elevation; sets how much of the patch is under water",
    "relief_m": "standard deviation of elevation",
    "spectral_slope": "beta of the 1/f^beta power spectrum; lower is rougher",
    "ridge_strength": "weight of ridged mountain ranges",
    "hemisphere": "+1 north (colder towards the top of the image), -1 south",
}


def generate_sample(
    seed_or_rng: int | np.random.Generator | np.random.SeedSequence, size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Draws one synthetic sample in memory.

    Args:
        seed_or_rng: an int seed, a SeedSequence or a numpy Generator (consumed).
        size: image side in pixels (>= 16).
    Returns:
        terrain uint8 [S, S, 3], height uint16 [S, S] (see HEIGHT_* constants),
        segmentation class ids uint8 [S, S] (palette order), params dict (PARAMETERS keys).
    """
    _check_size(size)
    size = int(size)
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    params = _draw_parameters(rng)
    margin = max(4, size // 8)
    canvas = size + 2 * margin
    fields = _Fields(rng, canvas, size)

    elevation = _elevation(fields, params)                      # [C, C] metres
    pixel_m = PATCH_WIDTH_M / size
    # Coastlines of a rough field are speckled with one-pixel lakes and islets: smooth the
    # water mask, then flatten the coast so "below sea level" and "water" stay the same thing.
    water = fields.blur((elevation < 0.0).astype(np.float32), max(0.8, 0.006 * size)) > 0.5
    elevation = np.where(water, np.minimum(elevation, -1.0), np.maximum(elevation, 1.0))
    # Slope of the smoothed land surface (the sea floor would ring every coast with "hills").
    slope = _slope(fields.blur(np.maximum(elevation, 0.0), 0.012 * size), pixel_m)  # [C, C]
    jitter = fields.noise(beta=3.5)                             # [C, C] smooth, unit std
    coast_wetness = fields.blur(water.astype(np.float32), 0.05 * size)
    moisture = _sigmoid(1.6 * fields.noise(beta=3.0) + 4.0 * (0.5 - params["aridity"])
                        + 2.5 * coast_wetness)                  # [C, C] in (0, 1)
    rows = (np.arange(canvas, dtype=np.float32)[:, None] - margin) / size  # 0 north .. 1 south
    # 4 C colder at the poleward edge: the top of the image in the north, the bottom in the south.
    temperature = (params["temperature_c"] - _LAPSE_RATE_C_PER_M * np.maximum(elevation, 0.0)
                   - params["hemisphere"] * 4.0 * (0.5 - rows) + 1.5 * jitter)

    classes = _classify(water, elevation, slope, temperature, moisture, jitter)
    classes = _smooth_land_classes(fields, classes, water, sigma=max(1.0, 0.008 * size))
    terrain = _colour(fields, classes, elevation, moisture, temperature, pixel_m,
                      edge_sigma=0.1 + 0.002 * size)

    crop = (slice(margin, margin + size), slice(margin, margin + size))
    height = np.clip(np.round((elevation[crop] + HEIGHT_OFFSET_M) * HEIGHT_UNITS_PER_M), 0, 65535)
    public = {k: float(params[k]) for k in PARAMETERS}
    return terrain[crop], height.astype(np.uint16), classes[crop], public


def generate(
    out: str | os.PathLike,
    *,
    n: int = 128,
    size: int = 512,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Writes `n` synthetic samples in the Kaggle layout and returns `out`.

    Layout: `out/_dataset/0001_t.png` (terrain RGB), `0001_h.png` (height, 16-bit grey),
    `0001_i2.png` (segmentation, palette RGB), ... and `out/metadata.csv` (`id`, the generating
    parameters, `fraction_<class>`). Sample i depends only on (seed, i), so a larger `n` extends
    a smaller one. Rerunning into the same folder overwrites; files from a different dataset
    there are an error rather than silently mixed in.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer. Received: n={n!r}")
    _check_size(size)  # before anything is created
    out = Path(out)
    folder = out / DATASET_FOLDER
    width = max(4, len(str(n)))
    ids = [f"{i:0{width}d}" for i in range(1, n + 1)]
    _refuse_foreign_files(folder, set(ids))
    folder.mkdir(parents=True, exist_ok=True)

    def make(index: int) -> dict[str, Any]:
        sample_id = ids[index]
        terrain, height, classes, params = generate_sample(np.random.SeedSequence([seed, index]), size)
        _save_png(terrain, folder / f"{sample_id}_t.png")
        _save_png(height, folder / f"{sample_id}_h.png")
        _save_png(class_to_rgb(classes), folder / f"{sample_id}_i2.png")
        fractions = np.bincount(classes.ravel(), minlength=NUM_CLASSES) / classes.size
        row = {"id": sample_id, **params}
        row.update({column: float(f) for column, f in zip(FRACTION_COLUMNS, fractions)})
        return row

    workers = workers or min(8, os.cpu_count() or 1)  # more threads than cores is slower
    rows = []
    # One line rewritten on a terminal; at most 11 lines in a log (each 10%).
    report_progress = ProgressLine("synth", n) if progress else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, row in enumerate(pool.map(make, range(n)), start=1):
            rows.append(row)
            if report_progress is not None:
                report_progress(done)
    table = pd.DataFrame(rows)
    # "\n": text mode already writes the platform's line ending.
    atomic_write_text(out / METADATA_FILENAME,
                      table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    return out


MIN_SIZE = 16


def _check_size(size) -> None:
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}. Received: size={size!r}")


def load_metadata(root: str | os.PathLike) -> pd.DataFrame:
    """Reads `root/metadata.csv` of a synthetic dataset, keeping ids as zero-padded strings."""
    path = Path(root) / METADATA_FILENAME
    if not path.is_file():
        raise DataError(f"No synthetic metadata at {path}. Only datasets written by "
                        f"`cmc-kit synth` have one; regenerate with `cmc-kit synth {root}`.")
    return read_metadata(path)


def hillshade(elevation: np.ndarray, pixel_m: float, *, exaggeration: float = 3.0) -> np.ndarray:
    """Lambertian shading, light from the north-west at 45 degrees; north is row 0.

    Args:
        elevation: [H, W] metres. pixel_m: ground size of a pixel in metres.
    Returns:
        float32 [H, W]; 1.0 on flat ground, > 1 on slopes facing the light, < 1 facing away.
    """
    d_row, d_col = np.gradient(elevation.astype(np.float32) * exaggeration / pixel_m)
    dz_east, dz_north = d_col, -d_row
    altitude = np.deg2rad(45.0)
    # Unit vector towards the light: west (-east), north, up.
    light = np.array([-np.cos(altitude) * np.sqrt(0.5), np.cos(altitude) * np.sqrt(0.5), np.sin(altitude)],
                     dtype=np.float32)
    # Surface normal (-dz/dx, -dz/dy, 1), normalised.
    shade = (-dz_east * light[0] - dz_north * light[1] + light[2]) / np.sqrt(1.0 + dz_east**2 + dz_north**2)
    return np.maximum(shade, 0.0) / light[2]


# -- internals -------------------------------------------------------------------------------

class _Fields:
    """Random smooth fields on a square canvas, by filtering white noise in Fourier space."""

    def __init__(self, rng: np.random.Generator, canvas: int, size: int):
        self.rng, self.canvas = rng, canvas
        fy = np.fft.fftfreq(canvas).astype(np.float32)[:, None]   # cycles / pixel
        fx = np.fft.rfftfreq(canvas).astype(np.float32)[None, :]
        self.freq_sq = fy**2 + fx**2                                # [C, C//2+1]
        # Frequency in cycles per output patch, floored at 1 so one mode cannot dominate.
        self.patch_freq_sq = np.maximum(self.freq_sq * float(size) ** 2, 1.0)

    def noise(self, beta: float) -> np.ndarray:
        """Zero-mean unit-std field with power spectrum ~ 1/f^beta. [C, C] float32."""
        spectrum_shape = self.freq_sq.shape
        white = (self.rng.standard_normal(spectrum_shape, dtype=np.float32)
                 + 1j * self.rng.standard_normal(spectrum_shape, dtype=np.float32))
        amplitude = self.patch_freq_sq ** np.float32(-beta / 4.0)
        amplitude[0, 0] = 0.0
        field = np.fft.irfft2(white * amplitude, s=(self.canvas, self.canvas))
        return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)

    def blur(self, image: np.ndarray, sigma: float) -> np.ndarray:
        """Gaussian blur (periodic; the wrapped edge is in the cropped margin). [..., C, C]."""
        gain = np.exp(np.float32(-2.0 * np.pi**2 * sigma**2) * self.freq_sq)
        spectrum = np.fft.rfft2(image.astype(np.float32))
        return np.fft.irfft2(spectrum * gain, s=image.shape[-2:]).astype(np.float32)


def _draw_parameters(rng: np.random.Generator) -> dict[str, float]:
    latitude = float(rng.uniform(0.0, 70.0))
    temperature = 30.0 - 0.45 * latitude + float(rng.normal(0.0, 3.0))
    # Subtropical dry belt around 25 degrees, plus local variation.
    aridity = 0.3 + 0.4 * np.exp(-(((latitude - 25.0) / 10.0) ** 2)) + float(rng.normal(0.0, 0.18))
    relief = float(np.exp(rng.uniform(np.log(200.0), np.log(3000.0))))  # plains more common
    return {
        "latitude_deg": latitude,
        "temperature_c": temperature,
        "aridity": float(np.clip(aridity, 0.0, 1.0)),
        "base_elevation_m": relief * float(rng.uniform(-0.5, 1.6)),
        "relief_m": relief,
        "spectral_slope": float(rng.uniform(2.8, 3.8)),
        "ridge_strength": float(rng.uniform(0.0, 1.2)),
        "hemisphere": float(rng.choice([-1.0, 1.0])),
    }


def _elevation(fields: _Fields, params: dict[str, float]) -> np.ndarray:
    base = fields.noise(params["spectral_slope"])
    # Ridged noise: sharp crests along the zero set of a smooth field -> mountain chains.
    ridges = (1.0 - np.abs(fields.noise(3.4))) ** 3
    tectonic = _sigmoid(3.0 * (fields.noise(4.0) - 0.3))  # where ranges are allowed
    relief = base + params["ridge_strength"] * 2.0 * tectonic * (ridges - ridges.mean())
    # Rougher detail on high ground than on plains.
    relief = relief + 0.15 * np.maximum(relief, 0.0) * fields.noise(2.4)
    relief = (relief - relief.mean()) / (relief.std() + 1e-12)
    return params["base_elevation_m"] + params["relief_m"] * relief


def _slope(elevation: np.ndarray, pixel_m: float) -> np.ndarray:
    d_row, d_col = np.gradient(elevation, pixel_m)
    return np.sqrt(d_row**2 + d_col**2)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _classify(water, elevation, slope, temperature, moisture, jitter) -> np.ndarray:
    """Per-pixel class from the physical fields; later rules overwrite earlier ones."""
    classes = np.full(elevation.shape, GRASSLAND, dtype=np.uint8)
    classes[moisture > 0.62 + 0.05 * jitter] = FOREST
    classes[moisture < 0.30 + 0.05 * jitter] = DESERT
    classes[slope > 0.04 * (1.0 + 0.2 * jitter)] = HILLS
    classes[temperature < -2.0] = TUNDRA
    classes[(slope > 0.08 * (1.0 + 0.2 * jitter)) | (elevation > 3500.0 + 300.0 * jitter)] = MOUNTAIN
    classes[water] = WATER
    return classes


def _smooth_land_classes(fields: _Fields, classes, water, sigma: float) -> np.ndarray:
    """Majority vote of land classes in a Gaussian window: no speckle, water kept exact."""
    land_classes = np.arange(1, NUM_CLASSES)
    one_hot = (classes[None] == land_classes[:, None, None]).astype(np.float32)  # [6, C, C]
    votes = fields.blur(one_hot, sigma)
    smoothed = (votes.argmax(axis=0) + 1).astype(np.uint8)
    smoothed[water] = WATER
    return smoothed


def _colour(fields: _Fields, classes, elevation, moisture, temperature, pixel_m, edge_sigma) -> np.ndarray:
    """Terrain RGB uint8 [C, C, 3]: class colours + moisture/depth/texture, soft edges, hillshade."""
    texture = fields.noise(1.2)                                     # fine grain
    patches = fields.noise(2.4)                                     # field-sized variation
    # Where each class sits between its two end colours. [C, C]
    depth_mix = np.clip(1.0 + elevation / 400.0, 0.0, 1.0)          # shallow water lighter
    wet_mix = np.clip(moisture + 0.12 * patches, 0.0, 1.0)
    mix = np.where(classes == WATER, depth_mix, wet_mix)[..., None]   # [C, C, 1]
    rgb = _CLASS_COLOURS[classes, 0] * (1.0 - mix) + _CLASS_COLOURS[classes, 1] * mix  # [C, C, 3]
    # Soften class edges over ~1 px so they look like imagery, not a label map.
    rgb = np.moveaxis(fields.blur(np.moveaxis(rgb, -1, 0), edge_sigma), 0, -1)
    # Snow on peaks below -6 C, on any land below -11 C (ice caps); ramps over 4 C.
    snow_line = np.where(classes == MOUNTAIN, -6.0, -11.0)
    snow = np.clip((snow_line - temperature) / 4.0, 0.0, 1.0) * (elevation > 0)
    rgb = rgb * (1.0 - snow[..., None]) + _SNOW * snow[..., None]
    rgb *= (1.0 + 0.07 * texture + 0.04 * patches)[..., None]
    land = (elevation >= 0.0)[..., None]
    rgb = np.where(land, rgb * np.clip(hillshade(elevation, pixel_m), 0.35, 1.6)[..., None], rgb)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Writes through a temporary name, so an interrupted run leaves no half-written PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    # uint16 [H, W] becomes PIL mode "I;16" (16-bit grey PNG); uint8 [H, W, 3] is RGB.
    Image.fromarray(array).save(tmp, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    os.replace(tmp, path)


def _refuse_foreign_files(folder: Path, ids: set[str]) -> None:
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir()
                     if (m := SAMPLE_FILE.match(p.name)) and m.group("id") not in ids)
    if foreign:
        raise DataError(
            f"{folder} already holds {len(foreign)} sample file(s) this run would not overwrite "
            f"(e.g. {foreign[0]}), so the dataset would mix two generations. "
            "Write to an empty folder or delete that one first.")
