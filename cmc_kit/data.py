"""Finding, checking, splitting and downloading Terrain Map datasets (PIL + NumPy + pandas only).

A dataset is any folder tree holding `<id>_t.png` (terrain RGB), `<id>_h.png` (16-bit height)
and `<id>_i2.png` (palette segmentation) triplets, at any depth. The catalog is a DataFrame
with columns `id, terrain, height, segmentation` (str paths), sorted by id.
"""

from __future__ import annotations

from collections import Counter

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cmc_kit.config import default_paths, on_kaggle
from cmc_kit.errors import CredentialsError, DataError
from cmc_kit.palette import PALETTE, palette_distance

KAGGLE_DATASET = "tpapp157/earth-terrain-height-and-segmentation-map-images"
COMPLETE_MARKER = ".cmc_kit_complete"
CATALOG_COLUMNS = ("id", "terrain", "height", "segmentation")
VIEW_SUFFIXES = {"terrain": "t", "height": "h", "segmentation": "i2"}
_FILE_PATTERN = re.compile(r"^(?P<id>.+)_(?P<suffix>t|h|i2)\.png$", re.IGNORECASE)
_SUFFIX_TO_VIEW = {suffix: view for view, suffix in VIEW_SUFFIXES.items()}

# A segmentation is "off palette" when more than this fraction of its pixels lie farther than
# this RGB distance from every palette colour. JPEG-like noise stays well inside 40; the
# closest two palette colours (grassland, desert) are 38 apart.
OFF_PALETTE_DISTANCE = 40.0
OFF_PALETTE_MAX_FRACTION = 0.05

_PACKED_PALETTE = [(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in PALETTE]

PROBLEM_KINDS = ("missing", "unreadable", "wrong_size", "wrong_mode", "height_8bit", "off_palette")
_HINT_NO_DATA = ("Create a synthetic dataset with `cmc-kit synth DIR` or get the real one with "
                 "`cmc-kit download`, then point to that folder.")


class ProgressLine:
    """`label: done/total samples` on stderr, for loops over samples (no TensorFlow needed).

    On a terminal one line is rewritten in place (at most ~10 times a second); otherwise (a log
    file, a notebook's captured output) a line is printed at each 10% and at the end, so a long
    run adds at most 11 lines to a log. Call it with the number of samples done so far.
    """

    def __init__(self, label: str, total: int, *, stream=None, interactive: bool | None = None,
                 min_interval_s: float = 0.1):
        self.label, self.total = label, int(total)
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.min_interval_s = min_interval_s
        self._last_time = 0.0
        self._last_decile = 0

    def __call__(self, done: int) -> None:
        final = done >= self.total
        if self.interactive:
            now = time.monotonic()
            if not final and now - self._last_time < self.min_interval_s:
                return
            self._last_time = now
            print(f"\r{self.label}: {done}/{self.total} samples", end="\n" if final else "",
                  file=self.stream, flush=True)
            return
        decile = 10 * done // max(self.total, 1)
        if final or decile > self._last_decile:
            self._last_decile = decile
            print(f"{self.label}: {done}/{self.total} samples ({100 * done // max(self.total, 1)}%)",
                  file=self.stream, flush=True)


# -- discovery ---------------------------------------------------------------------------------

def discover(root: str | os.PathLike, *, include_incomplete: bool = False) -> pd.DataFrame:
    """Finds `<id>_t.png`, `<id>_h.png`, `<id>_i2.png` triplets anywhere under `root`.

    Args:
        root: dataset folder (searched recursively; symlinked folders are followed once).
        include_incomplete: keep samples missing a partner file (its path is None).
    Returns:
        DataFrame with columns id, terrain, height, segmentation (str paths), sorted by id.
    Raises:
        DataError: `root` does not exist, holds no (complete) triplet, or one id has the same
            kind of file in two folders.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist or is not a folder. {_HINT_NO_DATA}")
    found: dict[str, dict[str, str]] = {}
    for path in _walk_pngs(root):
        match = _FILE_PATTERN.match(path.name)
        if not match:
            continue
        sample_id, view = match.group("id"), _SUFFIX_TO_VIEW[match.group("suffix").lower()]
        files = found.setdefault(sample_id, {})
        if view in files:
            first, second = sorted([files[view], str(path)])
            raise DataError(
                f"Sample id {sample_id} has two {view} files: {first} and {second}. "
                f"Keep one copy (delete or move the other folder) or point to a folder that "
                f"holds a single copy of the dataset.")
        files[view] = str(path)
    rows = [{"id": sample_id, **{view: files.get(view) for view in VIEW_SUFFIXES}}
            for sample_id, files in found.items()
            if include_incomplete or len(files) == len(VIEW_SUFFIXES)]
    if not rows:
        what = "no sample files" if not found else f"only incomplete samples ({len(found)})"
        raise DataError(f"Dataset folder {root} holds {what}: expected <id>_t.png, <id>_h.png and "
                        f"<id>_i2.png triplets at any depth. {_HINT_NO_DATA}")
    # object dtype keeps None for missing partners (pandas' str dtype would turn it into NaN).
    catalog = pd.DataFrame(rows, columns=list(CATALOG_COLUMNS), dtype=object)
    order = sorted(range(len(catalog)), key=lambda i: _id_sort_key(catalog.at[i, "id"]))
    return catalog.iloc[order].reset_index(drop=True)


def _walk_pngs(root: Path):
    """Yields PNG paths under root, following symlinked folders but never the same folder twice."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(files):
            if name.lower().endswith(".png"):
                yield Path(folder) / name


def _id_sort_key(sample_id: str) -> tuple:
    # Numeric order for digit ids of any width ("10" after "9"), text order for the rest.
    return (0, int(sample_id), sample_id) if sample_id.isdigit() else (1, 0, sample_id)


def catalog_ids(catalog: pd.DataFrame) -> np.ndarray:
    """The catalog's sample ids as str [n]; DataError when there is no id column, no row, or an
    id appears twice."""
    if "id" not in catalog.columns:
        raise DataError("The catalog has no 'id' column. Build it with cmc_kit.data.discover(DATA).")
    ids = catalog["id"].astype(str).to_numpy()
    if len(ids) == 0:
        raise DataError("The catalog is empty: check the data folder and the split settings.")
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(duplicated):
        raise DataError(f"The catalog repeats sample id(s) {list(duplicated[:5])}; every id must "
                        "appear once. Rebuild it with cmc_kit.data.discover(DATA).")
    return ids


# -- split -------------------------------------------------------------------------------------

def split_catalog(
    catalog: pd.DataFrame, *, validation_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits a catalog into (train, validation) by hashing each sample id with the seed.

    A sample's side depends only on (seed, id), so adding or removing other samples never moves
    it. Exception, for tiny catalogs: with a fraction > 0 and >= 2 samples, the sample with the
    lowest hash goes to validation if none did (and the highest to train if all did).
    Both frames keep all columns, gain `split` ("train" / "validation"), and are sorted by id.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError("validation_fraction (setting data.validation_fraction) must be in [0, 1). "
                         f"Received: validation_fraction={validation_fraction!r}")
    if "id" not in catalog.columns:
        raise ValueError(f"split_catalog needs a catalog with an 'id' column (from discover()). "
                         f"Received columns: {list(catalog.columns)}")
    ids = catalog["id"].astype(str)
    if ids.duplicated().any():
        raise ValueError(f"Catalog ids must be unique. Duplicated: {sorted(set(ids[ids.duplicated()]))[:5]}")
    scores = np.array([_hash_unit(seed, sample_id) for sample_id in ids])
    is_validation = scores < validation_fraction
    if validation_fraction > 0 and len(ids) >= 2:
        if not is_validation.any():
            is_validation[scores.argmin()] = True
        if is_validation.all():
            is_validation[scores.argmax()] = False
    frames = []
    for mask, name in ((~is_validation, "train"), (is_validation, "validation")):
        part = catalog[mask].copy()
        part["split"] = name
        order = sorted(range(len(part)), key=lambda i: _id_sort_key(str(part["id"].iat[i])))
        frames.append(part.iloc[order].reset_index(drop=True))
    return frames[0], frames[1]


def _hash_unit(seed: int, sample_id: str) -> float:
    """Deterministic uniform number in [0, 1) from (seed, id); stable across Python runs."""
    digest = hashlib.sha1(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# -- validation --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    file: str
    kind: str  # one of PROBLEM_KINDS
    message: str


@dataclasses.dataclass
class ValidationReport:
    """What `validate` found. `usable` is the catalog of samples that passed every check."""

    root: str
    usable: pd.DataFrame
    problems: list[Problem]
    num_samples: int
    num_incomplete: int  # samples missing one or two partner files
    num_unreadable: int  # complete samples with a corrupt or invalid file (see `counts`)
    checked_pixels: bool

    @property
    def num_usable(self) -> int:
        return len(self.usable)

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind (a sample can have several)."""
        return {kind: sum(p.kind == kind for p in self.problems) for kind in PROBLEM_KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "num_samples": self.num_samples,
            "num_usable": self.num_usable,
            "num_incomplete": self.num_incomplete,
            "num_unreadable": self.num_unreadable,
            "checked_pixels": self.checked_pixels,
            "counts": self.counts,
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def format(self) -> str:
        lines = [
            f"Dataset {self.root}: {self.num_samples} samples, {self.num_usable} usable, "
            f"{self.num_incomplete} incomplete, {self.num_unreadable} unreadable or invalid"
            + ("" if self.checked_pixels else " (headers only; pixels not checked)"),
        ]
        counts = {kind: n for kind, n in self.counts.items() if n}
        if counts:
            lines.append("Problems: " + ", ".join(f"{kind} {n}" for kind, n in counts.items()))
            lines += [f"  [{p.kind}] {p.id}: {p.file}: {p.message}" for p in self.problems]
        if self.num_usable == 0:
            lines.append(f"No usable samples. {_HINT_NO_DATA}")
        return "\n".join(lines)

    def require_usable(self) -> pd.DataFrame:
        """Returns `usable`, or raises DataError when no sample passed the checks."""
        if self.num_usable == 0:
            first = f" First problem: {self.problems[0].file}: {self.problems[0].message}" if self.problems else ""
            raise DataError(f"No usable samples in {self.root} ({self.num_samples} found, "
                            f"{self.num_incomplete} incomplete, {self.num_unreadable} unreadable or "
                            f"invalid).{first} Run `cmc-kit validate {self.root}` for the full list. "
                            f"{_HINT_NO_DATA}")
        return self.usable


def validate(
    root: str | os.PathLike, *, check_pixels: bool = True, progress: bool = False,
    workers: int | None = None,
) -> ValidationReport:
    """Checks every sample under `root` and reports which are usable.

    Headers (format, size, mode) are always read; with `check_pixels` every image is also fully
    decoded (catches truncated files) and segmentations are checked against the palette.
    Detected: missing partners, unreadable/corrupt/truncated PNGs, sizes that differ within a
    sample or are not square, colour/grey mode mix-ups, 8-bit heights, off-palette segmentations.
    """
    catalog = discover(root, include_incomplete=True)
    records = catalog.to_dict("records")
    workers = workers or min(16, 2 * (os.cpu_count() or 1))  # decoding releases the GIL
    problems_per_sample: list[list[Problem]] = []
    sample_sizes: list[tuple[int, int] | None] = []
    report_progress = ProgressLine("validate", len(records)) if progress and records else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (found, size) in enumerate(
                pool.map(lambda r: _check_sample(r, check_pixels), records), 1):
            problems_per_sample.append(found)
            sample_sizes.append(size)
            if report_progress is not None:
                report_progress(done)
    _check_dataset_size(records, problems_per_sample, sample_sizes)
    incomplete = [any(p.kind == "missing" for p in found) for found in problems_per_sample]
    bad = [bool(found) for found in problems_per_sample]
    usable = catalog[[not b for b in bad]].reset_index(drop=True)
    return ValidationReport(
        root=str(root),
        usable=usable,
        problems=[p for found in problems_per_sample for p in found],
        num_samples=len(catalog),
        num_incomplete=sum(incomplete),
        num_unreadable=sum(b and not i for b, i in zip(bad, incomplete)),
        checked_pixels=check_pixels,
    )


def _check_dataset_size(records, problems_per_sample, sample_sizes) -> None:
    """Flags samples whose (square, self-consistent) size differs from the dataset's usual size.

    Training crops and the cache assume one image size; a stray 256 px sample in a 512 px
    dataset would otherwise be dropped mid-epoch or stop `cmc-kit prepare` halfway.
    """
    counts = Counter(size for size, found in zip(sample_sizes, problems_per_sample)
                     if size is not None and not found)
    if len(counts) < 2:
        return
    (usual, usual_count), total = counts.most_common(1)[0], sum(counts.values())
    for record, found, size in zip(records, problems_per_sample, sample_sizes):
        if size is not None and not found and size != usual:
            found.append(Problem(
                record["id"], record["terrain"], "wrong_size",
                f"images are {size[0]}x{size[1]} while {usual_count} of {total} samples are "
                f"{usual[0]}x{usual[1]}; every sample must have the same size. Resize the "
                "sample's three files or remove them."))


def _check_sample(record: dict[str, Any], check_pixels: bool
                  ) -> tuple[list[Problem], tuple[int, int] | None]:
    """The sample's problems, and its image size when its three images agree."""
    sample_id = record["id"]
    present = {view: record[view] for view in VIEW_SUFFIXES if isinstance(record[view], str)}
    if len(present) < len(VIEW_SUFFIXES):
        folder = Path(next(iter(present.values()))).parent
        return [Problem(sample_id, str(folder / f"{sample_id}_{suffix}.png"), "missing",
                        f"{view} file is missing; the sample is skipped. Restore it or remove the "
                        f"sample's other files.")
                for view, suffix in VIEW_SUFFIXES.items() if view not in present], None
    problems: list[Problem] = []
    sizes = {}
    for view, path in present.items():
        try:
            with Image.open(path) as image:
                if image.format != "PNG":
                    raise UnidentifiedImageError(f"it is a {image.format} file, not a PNG")
                sizes[view] = image.size
                problem = _check_mode(sample_id, view, path, image.mode)
                if problem is None and check_pixels:
                    problem = _check_pixels(sample_id, view, path, image)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            problem = Problem(sample_id, path, "unreadable",
                              f"cannot decode the PNG ({err}). Replace the file, e.g. re-download "
                              "the dataset with `cmc-kit download --force` (in Python: "
                              "`cmc_kit.data.download(force=True)`).")
        if problem is not None:
            problems.append(problem)
    if len(sizes) == len(VIEW_SUFFIXES):
        distinct = set(sizes.values())
        if len(distinct) > 1:
            detail = ", ".join(f"{view} {w}x{h}" for view, (w, h) in sizes.items())
            problems.append(Problem(sample_id, present["terrain"], "wrong_size",
                                    f"the sample's images differ in size ({detail}); all three must "
                                    "be the same square size. Replace or remove the sample."))
        elif (size := distinct.pop())[0] != size[1]:
            problems.append(Problem(sample_id, present["terrain"], "wrong_size",
                                    f"images are {size[0]}x{size[1]}, not square. Crop or resize "
                                    "all three to the same square size, or remove the sample."))
    agreed = set(sizes.values())
    return problems, (agreed.pop() if len(sizes) == len(VIEW_SUFFIXES) and len(agreed) == 1 else None)


def _check_mode(sample_id: str, view: str, path: str, mode: str) -> Problem | None:
    if view == "height":
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            return None
        if mode in ("L", "P", "1", "LA", "RGB", "RGBA"):
            return Problem(sample_id, path, "height_8bit",
                           f"height is 8-bit (PIL mode {mode}); 16-bit greyscale is expected, "
                           "8 bits lose the elevation detail. Use the original 16-bit PNG.")
        return Problem(sample_id, path, "wrong_mode",
                       f"height has PIL mode {mode}; expected 16-bit greyscale (I;16).")
    if mode not in ("RGB", "RGBA", "P"):
        return Problem(sample_id, path, "wrong_mode",
                       f"{view} has PIL mode {mode}; expected an RGB colour image. "
                       "Check that the files of this sample were not swapped.")
    return None


def _check_pixels(sample_id: str, view: str, path: str, image: Image.Image) -> Problem | None:
    image.load()  # full decode: raises OSError for truncated or corrupt data
    if view != "segmentation":
        return None
    rgb = np.asarray(image.convert("RGB"))
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    # Exact palette pixels (nearly all, for lossless files) first; only the rest needs distances,
    # computed once per distinct colour.
    exact = np.zeros(packed.shape, dtype=bool)
    for colour in _PACKED_PALETTE:
        exact |= packed == colour
    colours, counts = np.unique(packed[~exact], return_counts=True)
    unique_rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)
    far = palette_distance(unique_rgb) > OFF_PALETTE_DISTANCE
    fraction = counts[far].sum() / packed.size
    if fraction > OFF_PALETTE_MAX_FRACTION:
        return Problem(sample_id, path, "off_palette",
                       f"{fraction:.1%} of pixels are farther than {OFF_PALETTE_DISTANCE:.0f} from every "
                       f"palette colour (allowed {OFF_PALETTE_MAX_FRACTION:.0%}); this does not look "
                       "like a Terrain Map segmentation. Check the file is the sample's _i2.png.")
    return None


# -- download ----------------------------------------------------------------------------------

def download(
    dest: str | os.PathLike | None = None,
    *,
    api: Any = None,
    kaggle_input: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Returns a folder holding the Kaggle Terrain Map dataset, downloading it if needed.

    Inside a Kaggle notebook (or when `kaggle_input` is given) the attached copy under
    /kaggle/input is located and returned: no download, no copy. Elsewhere the dataset zip is
    fetched with the Kaggle API into `dest` (default: data/terrain), unzipped safely, and
    `dest/.cmc_kit_complete` is written last; later calls return at once unless `force`.

    Args:
        dest: folder to download into.
        api: a `kaggle.api.kaggle_api_extended.KaggleApi`-like object (`authenticate()`,
            `dataset_download_files(dataset, path=, unzip=, quiet=)`); default: the kaggle package.
        kaggle_input: folder to search for an attached copy instead of /kaggle/input.
        force: download again even if `dest` is complete.
    """
    if kaggle_input is not None or on_kaggle():
        input_root = Path(kaggle_input) if kaggle_input is not None else default_paths()["input"]
        attached = find_attached_dataset(input_root)
        if attached is not None:
            return attached
        if kaggle_input is not None or _find_credentials() is None:
            raise DataError(
                f"The Terrain Map dataset is not attached under {input_root}. In the notebook "
                f"choose 'Add Input' and add the dataset {KAGGLE_DATASET} (no credentials needed), "
                "or add Kaggle secrets KAGGLE_USERNAME and KAGGLE_KEY to download it instead.")
    dest = Path(dest).expanduser() if dest is not None else default_paths()["data"] / "terrain"
    marker = dest / COMPLETE_MARKER
    if marker.exists() and not force:
        return dest
    if api is None:
        if _find_credentials() is None:
            raise CredentialsError(_credentials_help())
        api = _import_kaggle_api()
    _authenticate(api)
    dest.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cmc_kit_download-", dir=dest))
    try:
        try:
            api.dataset_download_files(KAGGLE_DATASET, path=str(staging), unzip=False, quiet=False)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # requests.HTTPError, network errors, kaggle's own errors
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise CredentialsError(
                    f"Kaggle refused the download of {KAGGLE_DATASET} (HTTP {status}): the "
                    "credentials are wrong or expired, or the dataset's terms were not accepted "
                    "on its page. Create a new token on kaggle.com -> Settings -> API and update "
                    "them.\n" + _credentials_help()) from None
            raise DataError(f"Downloading {KAGGLE_DATASET} into {dest} failed: {err}. Check the "
                            "internet connection and retry `cmc-kit download`.") from err
        archives = sorted(staging.glob("*.zip"))
        if not archives:
            raise DataError(f"The Kaggle API returned no zip file for {KAGGLE_DATASET}. "
                            "Retry `cmc-kit download`; if it persists, download the zip from the "
                            f"dataset page and unzip it into {dest}.")
        for archive in archives:
            safe_unzip(archive, dest)
            archive.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    discover(dest)  # fails clearly if the archive held no triplets
    marker.write_text(json.dumps({"dataset": KAGGLE_DATASET}) + "\n")
    return dest


def find_attached_dataset(input_root: str | os.PathLike) -> Path | None:
    """The folder of an attached copy of the dataset under a Kaggle input root, or None.

    Looks first at the two Kaggle mount layouts, `<root>/<slug>` and
    `<root>/datasets/<owner>/<slug>`, then at any top-level input holding triplets.
    """
    input_root = Path(input_root)
    owner, slug = KAGGLE_DATASET.split("/")
    for candidate in (input_root / slug, input_root / "datasets" / owner / slug):
        if _holds_triplet_file(candidate):
            return candidate
    if not input_root.is_dir():
        return None
    # Renamed or versioned mounts: the first input (or input/datasets/<owner>/<name>) with files.
    children = sorted(p for p in input_root.iterdir() if p.is_dir() and p.name != "datasets")
    datasets = input_root / "datasets"
    if datasets.is_dir():
        children += sorted(q for p in datasets.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir())
    return next((child for child in children if _holds_triplet_file(child)), None)


def _holds_triplet_file(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any(path.name.lower().endswith("_i2.png") for path in _walk_pngs(folder))


def safe_unzip(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extracts `archive` into `dest`, refusing entries that would land outside it.

    Every entry is checked before anything is written; extraction goes to a temporary folder
    inside `dest` and is moved into place only when complete, so a failure leaves no partial files.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _check_zip_entry(info, archive, dest_real)
            staging = Path(tempfile.mkdtemp(prefix=".cmc_kit_unzip-", dir=dest))
            try:
                bundle.extractall(staging)
                for entry in sorted(staging.iterdir()):
                    target = dest / entry.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(entry, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a valid zip file ({err}). Delete it and run "
                        "`cmc-kit download` again.") from err


def _check_zip_entry(info: zipfile.ZipInfo, archive: Path, dest_real: Path) -> None:
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    is_symlink = stat.S_ISLNK(info.external_attr >> 16)
    if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in pure.parts or is_symlink
            or not (dest_real / name).resolve().is_relative_to(dest_real)):
        raise DataError(f"Refusing to unzip {archive}: entry {info.filename!r} would be written outside "
                        f"{dest_real} (absolute path, '..' or link). The archive is not the expected "
                        "dataset; delete it and download again from kaggle.com.")


# -- credentials -------------------------------------------------------------------------------

def _kaggle_config_dir() -> Path:
    """Where the kaggle package looks for kaggle.json (same rule as kaggle 1.6+/2.x)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return legacy


def _find_credentials() -> str | None:
    """Names the first credential source the kaggle package would use, or None. Never the key."""
    config_file = _kaggle_config_dir() / "kaggle.json"
    from_file: dict[str, Any] = {}
    if config_file.is_file():
        if os.name != "nt" and config_file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.warn(f"{config_file} is readable by other users; protect your Kaggle key with "
                          f"`chmod 600 {config_file}`.", stacklevel=3)
        try:
            from_file = json.loads(config_file.read_text())
        except (OSError, ValueError):
            from_file = {}
        from_file = from_file if isinstance(from_file, dict) else {}
    username = os.environ.get("KAGGLE_USERNAME") or from_file.get("username")
    key = os.environ.get("KAGGLE_KEY") or from_file.get("key")
    if username and key:
        return f"{config_file}" if from_file.get("key") else "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_API_V1_TOKEN") and Path(os.environ["KAGGLE_API_V1_TOKEN"]).is_file():
        return "KAGGLE_API_V1_TOKEN"
    for name in ("access_token", "access_token.txt", "credentials.json"):  # new-style / OAuth
        if (Path.home() / ".kaggle" / name).is_file():
            return str(Path.home() / ".kaggle" / name)
    return None


def _credentials_help() -> str:
    config_file = _kaggle_config_dir() / "kaggle.json"
    partial = ""
    if bool(os.environ.get("KAGGLE_USERNAME")) != bool(os.environ.get("KAGGLE_KEY")):
        missing = "KAGGLE_KEY" if os.environ.get("KAGGLE_USERNAME") else "KAGGLE_USERNAME"
        partial = f" ({missing} is not set while its partner is)"
    return (
        f"Kaggle credentials not found{partial}. Get a token on kaggle.com -> Settings -> API -> "
        "'Create New Token', then provide it in one of these ways and rerun `cmc-kit download`:\n"
        "  1. environment variables KAGGLE_USERNAME and KAGGLE_KEY;\n"
        f"  2. the downloaded kaggle.json saved as {config_file} with mode 600 "
        f"(`chmod 600 {config_file}`); set KAGGLE_CONFIG_DIR to keep it in another folder;\n"
        "  3. a new-style API token in the environment variable KAGGLE_API_TOKEN "
        "(or saved as ~/.kaggle/access_token);\n"
        "  4. in a Kaggle notebook: Add-ons -> Secrets, add KAGGLE_USERNAME and KAGGLE_KEY, then "
        "set them: `from kaggle_secrets import UserSecretsClient; s = UserSecretsClient(); "
        "os.environ['KAGGLE_USERNAME'] = s.get_secret('KAGGLE_USERNAME'); "
        "os.environ['KAGGLE_KEY'] = s.get_secret('KAGGLE_KEY')` "
        f"(or simply attach the dataset {KAGGLE_DATASET} with 'Add Input')."
    )


def _import_kaggle_api() -> Any:
    """Imports the kaggle package lazily; its import authenticates and may exit or raise."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kaggle prints its own auth help
            from kaggle.api.kaggle_api_extended import KaggleApi
    except (SystemExit, OSError) as err:
        raise CredentialsError(_credentials_help()) from None  # kaggle's text can quote config values
    except ImportError as err:
        raise DataError("The `kaggle` package is not installed. Install it with "
                        "`pip install kaggle` (it is a cmc-kit dependency).") from err
    return KaggleApi()


def _authenticate(api: Any) -> None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except (SystemExit, OSError) as err:
        raise CredentialsError(_credentials_help()) from None  # kaggle's text can quote config values

