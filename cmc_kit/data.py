"""Finding, checking and splitting Terrain Map datasets (PIL + NumPy + pandas only).

A dataset is any folder tree holding `<id>_t.png` (terrain RGB), `<id>_h.png` (16-bit height)
and `<id>_i2.png` (palette segmentation) triplets, at any depth. The catalog is a DataFrame
with columns `id, terrain, height, segmentation` (str paths), sorted by id. Getting the Kaggle
copy is `cmc_kit.kaggle`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cmc_kit import layout
from cmc_kit.errors import DataError
from cmc_kit.palette import PALETTE, palette_distance
from cmc_kit.progress import ProgressLine

CATALOG_COLUMNS = ("id", "terrain", "height", "segmentation")

# A segmentation is "off palette" when more than this fraction of its pixels lie farther than
# this RGB distance from every palette colour. JPEG-like noise stays well inside 40; the
# closest two palette colours (grassland, desert) are 38 apart.
OFF_PALETTE_DISTANCE = 40.0
OFF_PALETTE_MAX_FRACTION = 0.05

_PACKED_PALETTE = [(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in PALETTE]

PROBLEM_KINDS = ("missing", "unreadable", "wrong_size", "wrong_mode", "height_8bit", "off_palette",
                 "too_large", "bad_name")
# Larger images are not decoded: a header claiming more is a decompression bomb or the wrong
# file (the Kaggle set is 512 px; a 8192 px RGB image already decodes to 200 MB).
MAX_IMAGE_SIDE = 8192
_HINT_NO_DATA = ("Create a synthetic dataset with `cmc-kit synth DIR` or get the real one with "
                 "`cmc-kit download`, then point to that folder.")


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
    for path in layout.walk_pngs(root):
        found_file = layout.sample_file(path.name)
        if found_file is None:
            continue
        sample_id, view = found_file
        files = found.setdefault(sample_id, {})
        if view in files:
            first, second = sorted([files[view], str(path)])
            raise DataError(
                f"Sample id {sample_id} has two {view} files: {first} and {second}. "
                f"Keep one copy (delete or move the other folder) or point to a folder that "
                f"holds a single copy of the dataset.")
        files[view] = str(path)
    rows = [{"id": sample_id, **{view: files.get(view) for view in layout.VIEW_SUFFIXES}}
            for sample_id, files in found.items()
            if include_incomplete or len(files) == len(layout.VIEW_SUFFIXES)]
    if not rows:
        what = "no sample files" if not found else f"only incomplete samples ({len(found)})"
        raise DataError(f"Dataset folder {root} holds {what}: expected <id>_t.png, <id>_h.png and "
                        f"<id>_i2.png triplets at any depth. {_HINT_NO_DATA}")
    # object dtype keeps None for missing partners (pandas' str dtype would turn it into NaN).
    catalog = pd.DataFrame(rows, columns=list(CATALOG_COLUMNS), dtype=object)
    order = sorted(range(len(catalog)), key=lambda i: id_sort_key(catalog.at[i, "id"]))
    return catalog.iloc[order].reset_index(drop=True)


def id_sort_key(sample_id: str) -> tuple:
    """Sort key of a sample id: numeric order for digit ids of any width ("10" after "9"), text
    order for the rest."""
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
        order = sorted(range(len(part)), key=lambda i: id_sort_key(str(part["id"].iat[i])))
        frames.append(part.iloc[order].reset_index(drop=True))
    return frames[0], frames[1]


def _hash_unit(seed: int, sample_id: str) -> float:
    """Deterministic uniform number in [0, 1) from (seed, id); stable across Python runs."""
    digest = hashlib.sha1(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# -- metadata and the dataset as a whole -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset folder, found once: its catalog (`discover`) and its metadata.csv (or None).

    Commands that embed, evaluate and explore the same data find it once and hand this on.
    """

    root: Path
    catalog: pd.DataFrame
    metadata_csv: Path | None

    @classmethod
    def find(cls, root: str | os.PathLike) -> "Dataset":
        return cls(Path(root), discover(root), layout.find_metadata_csv(root))


def as_dataset(data: str | os.PathLike | None, dataset: Dataset | None) -> Dataset:
    """The `Dataset` of a call that takes `data` (a folder) or `dataset` (found), by name."""
    if (data is None) == (dataset is None):
        raise TypeError("Pass data= (a dataset folder) or dataset= (a cmc_kit.data.Dataset), "
                        "exactly one of them.")
    return dataset if dataset is not None else Dataset.find(data)


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
    present = {view: record[view] for view in layout.VIEW_SUFFIXES
               if isinstance(record[view], str)}
    if len(present) < len(layout.VIEW_SUFFIXES):
        folder = Path(next(iter(present.values()))).parent
        return [Problem(sample_id, str(folder / f"{sample_id}_{suffix}.png"), "missing",
                        f"{view} file is missing; the sample is skipped. Restore it or remove the "
                        f"sample's other files.")
                for view, suffix in layout.VIEW_SUFFIXES.items() if view not in present], None
    problems: list[Problem] = []
    sizes = {}
    for view, path in present.items():
        refused = _refuse_before_decoding(sample_id, view, path)
        if refused is not None:
            problems.append(refused)
            continue
        try:
            with Image.open(path) as image:
                if image.format != "PNG":
                    raise UnidentifiedImageError(f"it is a {image.format} file, not a PNG")
                sizes[view] = image.size
                problem = _check_mode(sample_id, view, path, image.mode)
                if problem is None and check_pixels:
                    problem = _check_pixels(sample_id, view, path, image)
        except Image.DecompressionBombError as err:
            problem = Problem(sample_id, path, "too_large", f"{err} Remove or resize the file.")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            problem = Problem(sample_id, path, "unreadable",
                              f"cannot decode the PNG ({err}). Replace the file, e.g. re-download "
                              "the dataset with `cmc-kit download --force` (in Python: "
                              "`cmc_kit.kaggle.download(force=True)`).")
        if problem is not None:
            problems.append(problem)
    if len(sizes) == len(layout.VIEW_SUFFIXES):
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
    complete = len(sizes) == len(layout.VIEW_SUFFIXES)
    return problems, (agreed.pop() if complete and len(agreed) == 1 else None)


def _refuse_before_decoding(sample_id: str, view: str, path: str) -> Problem | None:
    """A file not to open at all: a name that is not valid UTF-8 (TensorFlow, pandas and
    Parquet cannot carry it) or a header claiming an enormous image."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return Problem(printable(sample_id), printable(path), "bad_name",
                       f"the {view} file's name is not valid UTF-8; the sample is skipped. "
                       "Rename the sample's three files (e.g. with `convmv` or by hand).")
    size = layout.png_size(path)
    if size is not None and max(size) > MAX_IMAGE_SIDE:
        return Problem(sample_id, path, "too_large",
                       f"the {view} PNG's header claims {size[1]}x{size[0]} pixels, more than the "
                       f"{MAX_IMAGE_SIDE} px cmc_kit decodes (a decompression bomb, or not a "
                       "Terrain Map tile); the sample is skipped. Resize the sample's three files "
                       "to the dataset's size or remove them.")
    return None


def printable(text: str) -> str:
    """`text` with the bytes of a name that is not valid UTF-8 shown as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
