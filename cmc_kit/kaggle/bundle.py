"""`cmc-kit kaggle bundle OUT`: the wheels a Kaggle notebook needs to install cmc_kit with
Internet off, in a folder ready for `kaggle datasets create -p OUT`.

OUT holds cmc_kit's own wheel, the wheels of the dependencies Kaggle's image may lack
(`BUNDLED_DEPENDENCIES`, built for Kaggle's Python and platform) and `dataset-metadata.json`.
Attached to a notebook, the notebooks' first cell finds `/kaggle/input/**/cmc_kit-*.whl` and runs
`pip install --no-index --find-links <its folder> <the wheel>`: pip keeps what the image has and
takes the rest from the bundle, with no network.
"""

from __future__ import annotations

import dataclasses
import email.parser
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from cmc_kit.errors import ConfigError, KaggleError
from cmc_kit.fileio import atomic_write_text, check_folder_path

# What Kaggle's Python image ships, from Kaggle/docker-python's package list of the CPU image
# (branch list_packages, installed_cpu_packages.txt, 2026-06-17); the GPU image is built from the
# same requirements. tests/test_kaggle.py checks that every requirement of cmc_kit's wheel is met
# by these versions or bundled. To refresh: `!pip list` in a Kaggle notebook.
KAGGLE_IMAGE_PACKAGES = {
    "tensorflow": "2.19.0", "keras": "3.13.2", "numpy": "2.4.6", "pandas": "2.3.3",
    "pillow": "11.3.0", "pyarrow": "24.0.0", "scikit-learn": "1.6.1", "threadpoolctl": "3.6.0",
    "tensorboard": "2.19.0", "plotly": "5.24.1", "ipywidgets": "8.1.5", "kaggle": "2.0.1",
    "kagglehub": "1.0.0", "umap-learn": "0.5.12", "pynndescent": "0.6.0", "numba": "0.65.1",
    "anywidget": "0.9.21", "psygnal": "0.15.1",
}

# Dependency -> why the image may lack it. By that list the image has every dependency in
# pyproject.toml today; these four are in it only through Colab's base image (Kaggle's own
# kaggle_requirements.txt names none of them, while it pins ipywidgets, kaggle, kagglehub and
# scikit-learn), and nothing the image is built around needs them, so a base-image update can drop
# them unnoticed. Together they are under 1 MB, and pip installs a bundled wheel only when the
# image lacks the package. Transitive dependencies are listed by hand (`pip download --no-deps`):
# the image's numba, scipy and scikit-learn stay out of the bundle.
BUNDLED_DEPENDENCIES = {
    "umap-learn": "the embedding's UMAP (embed, explore); only in Colab's base image, not pinned "
                  "by Kaggle; pure Python",
    "pynndescent": "umap-learn's nearest-neighbour search; same origin; pure Python",
    "anywidget": "the notebook explorer's widget (plotly >= 6 FigureWidget needs it); only in "
                 "Colab's base image, not pinned by Kaggle; pure Python",
    "psygnal": "anywidget's event library; same origin; compiled per Python version (hence the "
               "target Python below), with a pure-Python fallback wheel",
}

# Kaggle's notebooks: Python 3.12 since Kaggle/docker-python's "Upgrade to Python 3.12" (Dec 2025;
# 3.11 before), on Colab's Ubuntu 22.04 base (glibc 2.35, x86_64). Both are settings of the command.
KAGGLE_PYTHON = "3.12"
KAGGLE_PLATFORM = "manylinux_2_35_x86_64"
WHEELS_SLUG = "cmc-kit-wheels"
WHEELS_TITLE = "cmc_kit wheels"
DATASET_METADATA = "dataset-metadata.json"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A finished bundle folder: its wheels and the Kaggle dataset it is meant to become."""

    folder: Path
    dataset_id: str
    wheels: tuple[str, ...]

    def next_commands(self) -> list[str]:
        """The kaggle CLI commands that upload it: a new dataset, or a new version of it."""
        return [f"kaggle datasets create -p {self.folder}",
                f"kaggle datasets version -p {self.folder} -m 'cmc_kit update'"]


def build_bundle(out: str | os.PathLike, *, user: str, slug: str = WHEELS_SLUG,
                 source: str | os.PathLike | None = None, python_version: str = KAGGLE_PYTHON,
                 platform: str = KAGGLE_PLATFORM,
                 dependencies: Iterable[str] | None = None,
                 pip_options: Iterable[str] = (), build_isolation: bool = True) -> Bundle:
    """Writes the wheel dataset into `out` (replacing a previous bundle there) and returns it.

    Args:
        user: the Kaggle user name that will own the dataset (its id is `user/slug`).
        source: the cmc_kit source checkout to build (default: the one this cmc_kit runs from).
        python_version, platform: the Kaggle interpreter the dependency wheels are for, e.g.
            "3.12" and "manylinux_2_35_x86_64" (older manylinux tags are accepted too).
        dependencies: distributions whose wheels are added (`pip download --no-deps`; default:
            BUNDLED_DEPENDENCIES).
        pip_options: more options for `pip download`, e.g. ("--no-index", "--find-links", DIR).
        build_isolation: False builds with this environment's setuptools (>= 77), offline.
    """
    out = Path(out).expanduser()
    dataset_id = f"{_check_user(user)}/{_check_slug(slug)}"
    abi = _abi(python_version)
    _check_out(out)
    source = Path(source) if source is not None else source_checkout()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        wheels_dir = staging / "bundle"
        print(f"Building cmc_kit's wheel from {source}", file=sys.stderr)
        _build_wheel(source, staging / "source", wheels_dir, build_isolation)
        dependencies = list(BUNDLED_DEPENDENCIES if dependencies is None else dependencies)
        if dependencies:
            print(f"Downloading {', '.join(dependencies)} for Python {python_version} on "
                  f"{platform}", file=sys.stderr)
            platforms = [option for tag in platform_tags(platform) for option in ("--platform", tag)]
            _pip(["download", "--only-binary=:all:", "--no-deps", "--python-version",
                  python_version, "--implementation", "cp", "--abi", abi, *platforms,
                  "--dest", str(wheels_dir), *pip_options, *dependencies],
                 f"Downloading the wheels of {', '.join(dependencies)}")
        wheels = sorted(wheels_dir.glob("*.whl"))
        atomic_write_text(wheels_dir / DATASET_METADATA,
                          json.dumps(dataset_metadata(dataset_id, wheels), indent=2) + "\n")
        _replace_folder(wheels_dir, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Bundle(out, dataset_id, tuple(w.name for w in wheels))


def dataset_metadata(dataset_id: str, wheels: list[Path]) -> dict:
    """Kaggle's dataset-metadata.json: title (6-50 characters), id, one licence, and a
    description that lists each wheel with the licence its metadata states."""
    listing = "\n".join(f"- `{w.name}` ({_wheel_license(w)})" for w in wheels)
    return {
        "title": WHEELS_TITLE,
        "id": dataset_id,
        "subtitle": "Offline install of cmc_kit in Kaggle notebooks",
        "description": ("Wheels made by `cmc-kit kaggle bundle`. Attach this dataset to the "
                        "cmc_kit notebooks: their first cell installs cmc_kit from it with "
                        "`pip install --no-index`, Internet on or off.\n\n" + listing),
        "licenses": [{"name": "other"}],  # several packages, each under its own licence (above)
    }


def platform_tags(platform: str) -> list[str]:
    """`platform` and the older manylinux tags whose wheels run there too; pip does not widen a
    `manylinux_2_X` tag given with --platform by itself."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc, arch = int(match[1]), match[2]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 16, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}  # PEP 600 aliases
    return tags + [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc]


def source_checkout() -> Path:
    """The source checkout this cmc_kit runs from (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "cmc-kit"' not in pyproject.read_text():
        raise ConfigError(f"cmc-kit kaggle bundle builds cmc_kit's wheel from a source checkout, "
                          f"but this cmc_kit is installed from a wheel ({root}). Run it from a "
                          "clone of the repository (`pip install -e .` there) or give --source.")
    return root


def _build_wheel(source: Path, copy: Path, wheels_dir: Path, build_isolation: bool) -> None:
    """`pip wheel --no-deps` of a clean copy of the package: setuptools' build/ folder in a
    checkout can carry modules that no longer exist into the wheel."""
    if not (source / "pyproject.toml").is_file():
        raise ConfigError(f"--source {source} holds no pyproject.toml: give the cmc_kit checkout.")
    copy.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (source / name).is_file():
            shutil.copy2(source / name, copy / name)
    shutil.copytree(source / "cmc_kit", copy / "cmc_kit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = [] if build_isolation else ["--no-build-isolation"]
    _pip(["wheel", "--no-deps", *isolation, "--wheel-dir", str(wheels_dir), str(copy)],
         "Building cmc_kit's wheel")


def _pip(arguments: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments],
                          capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(errors) if line.startswith("ERROR")),
                      errors[-1] if errors else f"exit status {done.returncode}")
        raise KaggleError(f"{what} failed: {reason.strip()} (pip {' '.join(arguments[:2])}). Check "
                          "the internet connection or the package name; the list of bundled "
                          "dependencies is BUNDLED_DEPENDENCIES in cmc_kit/kaggle/bundle.py.")


def _replace_folder(new: Path, out: Path) -> None:
    """Moves the finished `new` to `out`; a previous bundle there goes only once `new` is whole."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_out(out: Path) -> None:
    """OUT must be new, empty, or a previous bundle (wheels and the metadata file only)."""
    check_folder_path(out, "OUT (the bundle folder)", ConfigError)
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir()
                    if not (p.is_file() and (p.suffix == ".whl" or p.name == DATASET_METADATA)))
    if others or (any(out.iterdir()) and not (out / DATASET_METADATA).is_file()):
        listed = ", ".join(others[:3]) or "wheels without " + DATASET_METADATA
        raise ConfigError(f"OUT {out} holds files that are not a previous bundle ({listed}). Give "
                          "a new or empty folder: its whole content becomes the Kaggle dataset.")


def _check_user(user: str) -> str:
    if not user or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", user):
        raise ConfigError(f"--user must be your kaggle.com user name (letters, digits, '-', '_'). "
                          f"Received: {user!r}")
    return user


def _check_slug(slug: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,48}[a-z0-9]", slug):
        raise ConfigError("--slug must be 3-50 lowercase letters, digits and dashes (Kaggle's rule "
                          f"for dataset slugs), e.g. {WHEELS_SLUG}. Received: {slug!r}")
    return slug


def _abi(python_version: str) -> str:
    """"3.12" -> "cp312", the CPython ABI tag of Kaggle's interpreter."""
    match = re.fullmatch(r"3\.(\d{1,2})", python_version)
    if not match:
        raise ConfigError("--python-version must be a CPython version such as 3.12 (Kaggle's "
                          f"notebooks). Received: {python_version!r}")
    return f"cp3{match[1]}"


def _wheel_license(wheel: Path) -> str:
    """The licence a wheel's METADATA states (License-Expression, License, or a classifier)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode("utf-8", "replace"))
    except (OSError, StopIteration, zipfile.BadZipFile):
        return "licence not stated"
    for text in (metadata.get("License-Expression"), metadata.get("License")):
        if text and len(text.strip().splitlines()[0]) <= 60:
            return text.strip().splitlines()[0]
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    return classifiers[0] if classifiers else "licence not stated"
