"""`cmc-kit kaggle bundle`: the wheel dataset, built offline from a local wheelhouse, checked
against Kaggle's dataset-metadata rules and the image's package list, and installed with the
notebooks' own first cell into a fresh environment with no network."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from kaggle_fakes import SLUG, ExplodingApi

from cmc_kit import cli, kaggle, synth

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


# Kaggle's rules for dataset-metadata.json (Kaggle/kaggle-cli docs/datasets_metadata.md).
DATASET_LICENSES = {
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0",
    "DbCL-1.0", "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL",
    "CC-BY-3.0", "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO",
    "CDLA-Permissive-1.0", "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0",
    "LGPL-3.0", "AGPL-3.0", "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0",
}


def check_dataset_metadata(metadata):
    """The fields `kaggle datasets create` evaluates, with the limits its docs state."""
    assert 6 <= len(metadata["title"]) <= 50
    owner, slug = metadata["id"].split("/")
    assert owner and re.fullmatch(r"[a-z0-9-]{3,50}", slug)
    assert len(metadata["licenses"]) == 1 and metadata["licenses"][0]["name"] in DATASET_LICENSES
    if "subtitle" in metadata:
        assert 20 <= len(metadata["subtitle"]) <= 80
    assert set(metadata) <= {"title", "subtitle", "description", "id", "id_no", "licenses",
                             "resources", "keywords"}


def _build_wheel(project, out):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(out), str(project)], check=True, timeout=300)


def _tiny_project(folder, name):
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\nlicense = "MIT"\n'
        f'[tool.setuptools]\npy-modules = ["{name}"]\n')
    (folder / f"{name}.py").write_text("VALUE = 42\n")
    return folder


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """A local stand-in for PyPI, built offline: a pure-Python wheel `tinydep`, and `compiled`
    tagged for CPython 3.11 and 3.12 on manylinux_2_17 (as a compiled package ships it)."""
    root = tmp_path_factory.mktemp("wheelhouse")
    house = root / "house"
    _build_wheel(_tiny_project(root / "tinydep", "tinydep"), house)
    _build_wheel(_tiny_project(root / "compiled", "compiled"), root / "plain")
    plain = next((root / "plain").glob("compiled-*.whl"))
    for python in ("cp311", "cp312"):
        shutil.copy(plain, house / f"compiled-1.0-{python}-{python}-manylinux_2_17_x86_64.whl")
    return house


@pytest.fixture(scope="module")
def pip_calls():
    return []


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, wheelhouse, pip_calls):
    from cmc_kit.kaggle import bundle as bundle_module

    real_run = subprocess.run

    def recording_run(command, **kwargs):
        pip_calls.append(command)
        return real_run(command, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle_module.subprocess, "run", recording_run)
        return bundle_module.build_bundle(
            tmp_path_factory.mktemp("bundle") / "wheels", user="someone",
            dependencies=["tinydep", "compiled"], build_isolation=False,
            pip_options=["--no-index", "--find-links", str(wheelhouse)])


def test_bundle_holds_cmc_kit_the_dependencies_and_kaggles_dataset_metadata(bundle):
    import cmc_kit

    names = sorted(p.name for p in bundle.folder.iterdir())
    assert names == sorted([f"cmc_kit-{cmc_kit.__version__}-py3-none-any.whl",
                            "compiled-1.0-cp312-cp312-manylinux_2_17_x86_64.whl",
                            "tinydep-1.0-py3-none-any.whl", "dataset-metadata.json"])
    metadata = json.loads((bundle.folder / "dataset-metadata.json").read_text())
    check_dataset_metadata(metadata)
    assert metadata["id"] == bundle.dataset_id == "someone/cmc-kit-wheels"
    assert "`tinydep-1.0-py3-none-any.whl` (MIT)" in metadata["description"]
    assert bundle.next_commands()[0] == f"kaggle datasets create -p {bundle.folder}"


def test_the_wheel_carries_the_package_data_and_no_stale_module(bundle):
    wheel = next(bundle.folder.glob("cmc_kit-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    source = {str(p.relative_to(Path(kaggle.__file__).parents[1].parent))
              for p in Path(kaggle.__file__).parents[1].rglob("*.py")}
    assert source <= names
    assert {"cmc_kit/explore/page.html", "cmc_kit/explore/page.js", "cmc_kit/explore/page.css",
            "cmc_kit/kaggle/bundle.py"} <= names
    assert "cmc_kit/kaggle.py" not in names and not any("__pycache__" in n for n in names)


def test_dependency_wheels_are_asked_for_kaggles_python_and_platform(bundle, pip_calls):
    download = next(c for c in pip_calls if "download" in c)
    text = " ".join(download)
    for part in ("--only-binary=:all:", "--no-deps", "--python-version 3.12", "--implementation cp",
                 "--abi cp312", "--platform manylinux_2_35_x86_64",
                 "--platform manylinux_2_17_x86_64", "--platform manylinux2014_x86_64"):
        assert part in text, part
    assert download[-2:] == ["tinydep", "compiled"]


def test_every_requirement_is_in_kaggles_image_or_bundled(bundle):
    """cmc_kit's wheel asks for nothing a Kaggle notebook cannot satisfy offline: each requirement
    is bundled or met by the version the image ships (KAGGLE_IMAGE_PACKAGES)."""
    from email.parser import Parser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from cmc_kit.kaggle.bundle import BUNDLED_DEPENDENCIES, KAGGLE_IMAGE_PACKAGES

    wheel = next(bundle.folder.glob("cmc_kit-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        meta = Parser().parsestr(archive.read(next(n for n in archive.namelist()
                                                   if n.endswith(".dist-info/METADATA"))).decode())
    image = {canonicalize_name(k): v for k, v in KAGGLE_IMAGE_PACKAGES.items()}
    bundled = {canonicalize_name(k) for k in BUNDLED_DEPENDENCIES}
    unmet = []
    for line in meta.get_all("Requires-Dist"):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None or name in bundled:
            continue  # extras ([cpu], [test], ...) are not installed on Kaggle
        if name not in image or not requirement.specifier.contains(image[name], prereleases=True):
            unmet.append(f"{requirement} (Kaggle: {image.get(name, 'absent')})")
    assert not unmet, unmet
    assert set(BUNDLED_DEPENDENCIES) == {"umap-learn", "pynndescent", "anywidget", "psygnal"}


def test_rebuilding_replaces_the_previous_bundle_and_other_folders_are_refused(
        tmp_path, wheelhouse):
    from cmc_kit.errors import ConfigError
    from cmc_kit.kaggle.bundle import build_bundle

    options = dict(user="someone", dependencies=["tinydep"], build_isolation=False,
                   pip_options=["--no-index", "--find-links", str(wheelhouse)])
    out = tmp_path / "wheels"
    out.mkdir()
    (out / "dataset-metadata.json").write_text("{}")
    (out / "cmc_kit-0.0.1-py3-none-any.whl").write_bytes(b"old")
    build_bundle(out, **options)
    assert not (out / "cmc_kit-0.0.1-py3-none-any.whl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]  # no staging or old copy left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes.*todo\.txt.*new or empty folder"):
        build_bundle(notes, **options)
    assert (notes / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("setting, message", [
    ({"user": "a/b"}, r"--user must be your kaggle\.com user name.*'a/b'"),
    ({"slug": "X"}, r"--slug must be 3-50 lowercase.*'X'"),
    ({"python_version": "3"}, r"--python-version must be a CPython version.*'3'"),
])
def test_bad_bundle_settings_fail_before_any_build(tmp_path, monkeypatch, setting, message):
    from cmc_kit.errors import ConfigError
    from cmc_kit.kaggle import bundle as bundle_module

    monkeypatch.setattr(bundle_module.subprocess, "run", ExplodingApi())
    with pytest.raises(ConfigError, match=message):
        bundle_module.build_bundle(tmp_path / "wheels", **{"user": "someone", **setting})
    assert not (tmp_path / "wheels").exists()


def test_a_dependency_pip_cannot_find_is_one_clear_error(tmp_path, wheelhouse):
    from cmc_kit.errors import KaggleError
    from cmc_kit.kaggle.bundle import build_bundle

    with pytest.raises(KaggleError, match=r"no-such-dependency.*failed: ERROR.*BUNDLED_DEPENDENCIES"):
        build_bundle(tmp_path / "wheels", user="someone", dependencies=["no-such-dependency"],
                     build_isolation=False,
                     pip_options=["--no-index", "--find-links", str(wheelhouse)])
    assert list(tmp_path.iterdir()) == []


# -- the notebooks' first cell: installing from the wheel dataset, offline -------------------------

def _first_cells():
    import nbformat

    return {p.stem: next(c.source for c in nbformat.read(p, as_version=4).cells
                         if c.cell_type == "code")
            for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def test_every_notebook_starts_with_the_same_setup_cell():
    cells = _first_cells()
    assert len(cells) >= 5 and len(set(cells.values())) == 1, (
        "the first code cell differs between notebooks: " + ", ".join(cells))
    cell = next(iter(cells.values()))
    assert 'CMC_KIT_SOURCE = ""' in cell and "%pip install" in cell
    assert cell.count("\n") < 30  # short: the install lives here, everything else in cmc_kit


_SHELL = '''
import shlex, subprocess, sys

RUN_PIP = {run_pip}


class _Shell:  # IPython's %pip: `python -m pip` with {{names}} filled in from the notebook
    def run_line_magic(self, magic, line, _stack_depth=1):
        assert magic == "pip", magic
        arguments = shlex.split(line.format(**globals()))
        print("PIP:", " ".join(arguments), flush=True)
        if RUN_PIP:
            subprocess.run([sys.executable, "-m", "pip", *arguments], check=True)


def get_ipython():
    return _Shell()

'''
_AFTER = '''
import importlib.resources
print("CMC_KIT_AT", cmc_kit.__file__)
print("PAGE", importlib.resources.files("cmc_kit.explore").joinpath("page.html").is_file())
print("REPORT", sorted(ENVIRONMENT))
'''


@pytest.fixture(scope="module")
def fresh_kaggle_python(tmp_path_factory):
    """A new virtual environment standing in for Kaggle's image: it sees this environment's
    packages (TensorFlow, keras, pandas, ...) but not cmc_kit, and has its own pip."""
    import sysconfig

    root = tmp_path_factory.mktemp("kaggle-image")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    image = root / "image-packages"
    image.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.lower().startswith(("cmc_kit", "cmc-kit", "__editable__", "pip")) \
                and entry.suffix != ".pth":
            (image / entry.name).symlink_to(entry)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout
    (Path(purelib.strip()) / "kaggle_image.pth").write_text(f"{image}\n")
    return python, Path(purelib.strip())


def _run_first_cell(python, tmp_path, input_root, *, source="", run_pip=True):
    from IPython.core.inputtransformer2 import TransformerManager

    cell = next(iter(_first_cells().values()))
    cell = cell.replace("/kaggle/input", str(input_root))
    cell = cell.replace('CMC_KIT_SOURCE = ""', f'CMC_KIT_SOURCE = "{source}"')
    script = tmp_path / "first_cell.py"
    script.write_text(_SHELL.format(run_pip=run_pip) + TransformerManager().transform_cell(cell)
                      + _AFTER)
    offline = "http://127.0.0.1:9"  # a proxy that refuses: any network use would fail
    env = {"PATH": f"{python.parent}:{os.defpath}", "HOME": str(tmp_path / "home"),
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PYTHONNOUSERSITE": "1",
           "http_proxy": offline, "https_proxy": offline, "HTTP_PROXY": offline,
           "HTTPS_PROXY": offline, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([str(python), str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_first_cell_installs_the_bundle_offline_in_a_fresh_environment(
        tmp_path, bundle, fresh_kaggle_python):
    python, site_packages = fresh_kaggle_python
    inputs = tmp_path / "input"
    synth.generate(inputs / SLUG, n=2, size=24, seed=0, progress=False)  # the data is beside it

    nothing = _run_first_cell(python, tmp_path, tmp_path / "empty-input")
    assert nothing.returncode != 0
    assert "ModuleNotFoundError: cmc_kit is not installed: attach the wheel dataset" in nothing.stderr
    from_source = _run_first_cell(python, tmp_path, tmp_path / "empty-input",
                                  source="git+https://example.invalid/cmc_kit", run_pip=False)
    assert "PIP: install -q git+https://example.invalid/cmc_kit" in from_source.stdout

    shutil.copytree(bundle.folder, inputs / "cmc-kit-wheels")
    installed = _run_first_cell(python, tmp_path, inputs)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    wheel = inputs / "cmc-kit-wheels" / next(w for w in bundle.wheels if w.startswith("cmc_kit-"))
    assert (f"PIP: install -q --no-index --find-links {wheel.parent} {wheel}"
            in installed.stdout)
    assert f"CMC_KIT_AT {site_packages / 'cmc_kit' / '__init__.py'}" in installed.stdout
    assert "PAGE True" in installed.stdout and "'tensorflow'" in installed.stdout
    assert not list(site_packages.glob("tinydep*"))  # bundled wheels go in only when needed

    again = _run_first_cell(python, tmp_path, inputs)  # installed now: the cell only imports
    assert again.returncode == 0 and "PIP:" not in again.stdout


def test_cmc_kit_kaggle_bundle_prints_the_next_command(tmp_path, wheelhouse, monkeypatch, capsys):
    from cmc_kit.kaggle import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "BUNDLED_DEPENDENCIES", {"tinydep": "a test dependency"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    out = tmp_path / "wheels"
    assert cli.main(["kaggle", "bundle", str(out), "--user", "someone", "--no-build-isolation"]) == 0
    printed = capsys.readouterr().out
    assert "tinydep-1.0-py3-none-any.whl" in printed
    assert f"kaggle datasets create -p {out}" in printed
    assert json.loads((out / "dataset-metadata.json").read_text())["id"] == "someone/cmc-kit-wheels"

