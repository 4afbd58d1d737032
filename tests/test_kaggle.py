"""Kaggle download (attached copy, kagglehub, the kaggle package), credentials, attached-input
discovery and previous notebook outputs, with fake API objects (never the network)."""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from cmc_kit import cli, data, kaggle, synth
from cmc_kit.errors import CredentialsError, DataError

SECRET = "s3cr3t-kaggle-key-0123456789"
OWNER, SLUG = kaggle.KAGGLE_DATASET.split("/")


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory):
    """A zip laid out like the Kaggle archive: _dataset/NNNN_{t,h,i2}.png."""
    root = synth.generate(tmp_path_factory.mktemp("zipsrc"), n=3, size=24, seed=0, progress=False)
    archive = tmp_path_factory.mktemp("zip") / f"{SLUG}.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((root / "_dataset").iterdir()):
            bundle.write(path, f"_dataset/{path.name}")
    return archive


class FakeApi:
    """KaggleApi stand-in: records calls and 'downloads' a prepared zip."""

    def __init__(self, archive=None, extra_entries=(), fail_auth=False):
        self.archive, self.extra_entries, self.fail_auth = archive, extra_entries, fail_auth
        self.calls = []

    def authenticate(self):
        self.calls.append("authenticate")
        if self.fail_auth:
            print("Kaggle says: key " + SECRET)  # must not reach the user through our error
            raise SystemExit(1)

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append(("download", dataset, unzip))
        target = os.path.join(path, f"{SLUG}.zip")
        with zipfile.ZipFile(self.archive) as source, zipfile.ZipFile(target, "w") as out:
            for info in source.infolist():
                out.writestr(info, source.read(info))
            for name in self.extra_entries:
                out.writestr(name, b"evil")


class ExplodingApi:
    def __getattr__(self, name):
        raise AssertionError(f"the Kaggle API must not be used here (called {name})")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment without any Kaggle credentials, outside Kaggle, kaggle import forbidden."""
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN",
                 "KAGGLE_KERNEL_RUN_TYPE", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: False)
    monkeypatch.setitem(sys.modules, "kaggle", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # "not installed"
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)
    return tmp_path


def test_download_unzips_returns_root_and_marks_complete(tmp_path, dataset_zip, no_credentials):
    api = FakeApi(dataset_zip)
    root = kaggle.download(tmp_path / "terrain", api=api)
    assert root == tmp_path / "terrain"
    assert api.calls == ["authenticate", ("download", kaggle.KAGGLE_DATASET, False)]
    assert list(data.discover(root)["id"]) == ["0001", "0002", "0003"]
    assert (root / kaggle.COMPLETE_MARKER).is_file()
    leftovers = [p.name for p in root.iterdir() if p.name not in ("_dataset", kaggle.COMPLETE_MARKER)]
    assert leftovers == []  # zip and staging folders are gone


def test_second_download_is_cached_without_touching_the_api(tmp_path, dataset_zip, no_credentials):
    kaggle.download(tmp_path / "terrain", api=FakeApi(dataset_zip))
    assert kaggle.download(tmp_path / "terrain", api=ExplodingApi()) == tmp_path / "terrain"
    assert kaggle.download(tmp_path / "terrain") == tmp_path / "terrain"  # no credentials needed
    again = FakeApi(dataset_zip)
    kaggle.download(tmp_path / "terrain", api=again, force=True)
    assert ("download", kaggle.KAGGLE_DATASET, False) in again.calls


def test_missing_credentials_message_lists_every_way_and_leaks_no_key(
        tmp_path, no_credentials, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KEY", SECRET)  # a key without a username is not enough
    with pytest.raises(CredentialsError) as err:
        kaggle.download(tmp_path / "terrain")  # would raise ImportError had it imported kaggle
    message = str(err.value)
    for needle in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "chmod 600", "KAGGLE_CONFIG_DIR",
                   str(tmp_path / "kaggle-config" / "kaggle.json"), "KAGGLE_API_TOKEN", "Secrets",
                   "KAGGLE_USERNAME is not set"):
        assert needle in message, needle
    assert SECRET not in message
    assert cli.main(["download", "--dest", str(tmp_path / "terrain")]) == 2
    captured = capsys.readouterr()
    assert "KAGGLE_USERNAME" in captured.err and SECRET not in captured.out + captured.err


def test_failed_authentication_becomes_credentials_error_without_kaggle_output(
        tmp_path, dataset_zip, no_credentials, capsys):
    with pytest.raises(CredentialsError) as err:
        kaggle.download(tmp_path / "terrain", api=FakeApi(dataset_zip, fail_auth=True))
    assert SECRET not in str(err.value) and err.value.__cause__ is None
    assert SECRET not in capsys.readouterr().out
    assert not (tmp_path / "terrain" / kaggle.COMPLETE_MARKER).exists()


def _fake_kaggle_modules(monkeypatch, api_class):
    package = types.ModuleType("kaggle")
    api_package = types.ModuleType("kaggle.api")
    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = api_class
    for name, module in (("kaggle", package), ("kaggle.api", api_package),
                         ("kaggle.api.kaggle_api_extended", extended)):
        monkeypatch.setitem(sys.modules, name, module)


def test_kaggle_json_is_found_and_a_readable_one_warns(tmp_path, dataset_zip, no_credentials, monkeypatch):
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
    os.chmod(config / "kaggle.json", 0o644)
    _fake_kaggle_modules(monkeypatch, lambda: FakeApi(dataset_zip))
    with pytest.warns(UserWarning, match=r"chmod 600") as caught:
        root = kaggle.download(tmp_path / "terrain")
    assert all(SECRET not in str(w.message) for w in caught)
    assert len(data.discover(root)) == 3


def test_kaggle_import_that_exits_becomes_credentials_error(tmp_path, no_credentials, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)

    class ExitingModule(types.ModuleType):
        def __getattr__(self, name):  # kaggle < 2 authenticated at import and called exit(1)
            raise SystemExit(1)

    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    monkeypatch.setitem(sys.modules, "kaggle.api", types.ModuleType("kaggle.api"))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", ExitingModule("x"))
    with pytest.raises(CredentialsError) as err:
        kaggle.download(tmp_path / "terrain")
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("evil", ["../evil.txt", "_dataset/../../evil.txt", "/tmp/cmc_kit_abs_evil.txt"])
def test_zip_entries_outside_dest_are_rejected_and_nothing_is_left(tmp_path, dataset_zip, no_credentials, evil):
    dest = tmp_path / "terrain"
    with pytest.raises(DataError) as err:
        kaggle.download(dest, api=FakeApi(dataset_zip, extra_entries=[evil]))
    assert repr(evil) in str(err.value)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/cmc_kit_abs_evil.txt")
    assert list(dest.iterdir()) == []  # no partial extraction, no zip, no marker


def test_failed_download_is_a_data_error_naming_the_dataset(tmp_path, no_credentials):
    class OfflineApi(FakeApi):
        def dataset_download_files(self, *args, **kwargs):
            raise ConnectionError("network unreachable")

    with pytest.raises(DataError, match=r"earth-terrain.*network unreachable.*retry"):
        kaggle.download(tmp_path / "terrain", api=OfflineApi())


@pytest.mark.parametrize("layout", [(SLUG,), ("datasets", OWNER, SLUG), ("terrain-copy-v2",)])
def test_kaggle_input_is_found_in_both_mount_layouts_without_download(tmp_path, layout):
    input_root = tmp_path / "input"
    (input_root / "some-other-dataset").mkdir(parents=True)
    (input_root / "some-other-dataset" / "readme.txt").write_text("unrelated")
    synth.generate(input_root.joinpath(*layout), n=2, size=24, seed=0, progress=False)
    root = kaggle.download(kaggle_input=input_root, api=ExplodingApi())
    assert root == input_root.joinpath(*layout)
    assert list(data.discover(root)["id"]) == ["0001", "0002"]


def test_kaggle_input_without_the_dataset_explains_how_to_attach(tmp_path, no_credentials):
    (tmp_path / "input" / "other").mkdir(parents=True)
    with pytest.raises(CredentialsError) as err:
        kaggle.download(tmp_path / "terrain", kaggle_input=tmp_path / "input")
    message = str(err.value)
    assert re.search(r"1\. an attached copy under .*input: none.*Add Input.*" + OWNER, message)
    assert re.search(r"2\. kagglehub: not installed.*cmc-kit\[kaggle\]", message)
    assert re.search(r"3\. the kaggle package: Kaggle credentials not found", message)


# -- kagglehub, the source order, credentials -------------------------------------------------

@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory):
    """What kagglehub's cache holds after a download: the unpacked archive."""
    return synth.generate(tmp_path_factory.mktemp("hubcache") / "versions" / "1", n=2, size=24,
                          seed=0, progress=False)


class FakeHub:
    """kagglehub stand-in with the installed kagglehub's `dataset_download` signature
    (checked by test_the_fake_kagglehub_has_the_installed_signature)."""

    def __init__(self, folder=None, error=None):
        self.folder, self.error, self.calls, self.environment = folder, error, [], []

    def dataset_download(self, handle, path=None, *, force_download=False, output_dir=None):
        self.calls.append({"handle": handle, "path": path, "force_download": force_download,
                           "output_dir": output_dir})
        self.environment.append({name: os.environ.get(name) for name in
                                 ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")})
        if self.error is not None:
            raise self.error
        if output_dir is not None:
            shutil.copytree(self.folder, output_dir, dirs_exist_ok=True)
            return output_dir
        return str(self.folder)


class OldHub:
    """kagglehub before `output_dir` (0.3.11 and older)."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def dataset_download(self, handle, path=None, *, force_download=False):
        self.calls.append({"handle": handle, "force_download": force_download})
        return str(self.folder)


class HTTPFailure(Exception):
    def __init__(self, text, status):
        super().__init__(text)
        self.response = types.SimpleNamespace(status_code=status)


def test_the_fake_kagglehub_has_the_installed_signature():
    kagglehub = pytest.importorskip("kagglehub")
    real = inspect.signature(kagglehub.dataset_download).parameters
    fake = inspect.signature(FakeHub().dataset_download).parameters
    assert [(p.name, p.kind, p.default) for p in fake.values()] == \
        [(p.name, p.kind, p.default) for p in real.values()]


def test_kagglehub_comes_before_the_kaggle_package_and_keeps_its_cache(
        tmp_path, hub_copy, no_credentials, capsys):
    hub = FakeHub(hub_copy)
    root = kaggle.download(hub=hub, api=ExplodingApi())
    assert root == hub_copy
    assert hub.calls == [{"handle": kaggle.KAGGLE_DATASET, "path": None, "force_download": False,
                          "output_dir": None}]
    assert f"with kagglehub: {hub_copy}" in capsys.readouterr().err


def test_kagglehub_downloads_into_a_given_dest_and_forces_when_asked(tmp_path, hub_copy,
                                                                     no_credentials):
    hub = FakeHub(hub_copy)
    root = kaggle.download(tmp_path / "terrain", hub=hub, api=ExplodingApi(), force=True)
    assert root == tmp_path / "terrain" and len(data.discover(root)) == 2
    assert hub.calls[0]["output_dir"] == str(tmp_path / "terrain")
    assert hub.calls[0]["force_download"] is True


def test_an_old_kagglehub_without_output_dir_is_asked_only_what_it_knows(tmp_path, hub_copy,
                                                                        no_credentials):
    hub = OldHub(hub_copy)
    assert kaggle.download(tmp_path / "terrain", hub=hub, api=ExplodingApi()) == hub_copy
    assert hub.calls == [{"handle": kaggle.KAGGLE_DATASET, "force_download": False}]


def test_the_attached_copy_comes_before_kagglehub(tmp_path):
    synth.generate(tmp_path / "input" / SLUG, n=2, size=24, seed=0, progress=False)
    root = kaggle.download(kaggle_input=tmp_path / "input", hub=ExplodingApi(), api=ExplodingApi())
    assert root == tmp_path / "input" / SLUG


def test_a_failing_kagglehub_falls_back_to_the_kaggle_package(tmp_path, dataset_zip,
                                                              no_credentials):
    hub = FakeHub(error=ConnectionError("kaggle.com unreachable"))
    api = FakeApi(dataset_zip)
    root = kaggle.download(tmp_path / "terrain", hub=hub, api=api)
    assert root == tmp_path / "terrain" and len(data.discover(root)) == 3
    assert len(hub.calls) == 1 and ("download", kaggle.KAGGLE_DATASET, False) in api.calls


def test_when_every_source_fails_each_is_named_and_no_key_is_shown(
        tmp_path, no_credentials, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    hub = FakeHub(error=HTTPFailure(f"401 Client Error for url https://x/?key={SECRET}", 401))

    class RefusingApi(FakeApi):
        def dataset_download_files(self, *args, **kwargs):
            print(f"kaggle says: your key {SECRET} was refused")
            raise HTTPFailure(f"403 Forbidden ({SECRET})", 403)

    with pytest.raises(CredentialsError) as err:
        kaggle.download(tmp_path / "terrain", kaggle_input=tmp_path / "no-input", hub=hub,
                        api=RefusingApi())
    message = str(err.value)
    assert re.search(r"1\. an attached copy.*\n.*2\. kagglehub: .*HTTP 401.*\n.*"
                     r"3\. the kaggle package: .*HTTP 403", message)
    assert SECRET not in message
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err


def test_the_cli_never_prints_a_planted_key(tmp_path, no_credentials, monkeypatch, capsys):
    """`cmc-kit download` with the real import paths: a kagglehub and a kaggle package that both
    quote the key in their errors."""
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
    os.chmod(config / "kaggle.json", 0o600)
    hub = types.ModuleType("kagglehub")
    hub.dataset_download = FakeHub(error=RuntimeError(f"bad token {SECRET}")).dataset_download
    monkeypatch.setitem(sys.modules, "kagglehub", hub)

    class LeakyApi(FakeApi):
        def dataset_download_files(self, *args, **kwargs):
            raise ValueError(f"config key={SECRET}")

    _fake_kaggle_modules(monkeypatch, LeakyApi)
    assert cli.main(["download", "--dest", str(tmp_path / "terrain")]) == 2
    printed = capsys.readouterr()
    assert "kagglehub: kagglehub could not download" in printed.err
    assert "bad token ***" in printed.err and "config key=***" in printed.err
    assert SECRET not in printed.out + printed.err


def test_kaggle_secrets_are_loaded_on_kaggle_and_never_shown(tmp_path, hub_copy, no_credentials,
                                                             monkeypatch, capsys):
    class UserSecretsClient:
        def get_secret(self, name):
            if name == "KAGGLE_API_TOKEN":
                return SECRET
            raise KeyError(f"no secret {name}")

    secrets = types.ModuleType("kaggle_secrets")
    secrets.UserSecretsClient = UserSecretsClient
    monkeypatch.setitem(sys.modules, "kaggle_secrets", secrets)
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: True)
    monkeypatch.setattr(kaggle, "default_paths", lambda: {"input": tmp_path / "input",
                                                          "data": tmp_path / "working"})
    hub = FakeHub(hub_copy)
    assert kaggle.download(hub=hub, api=ExplodingApi()) == hub_copy
    assert hub.environment == [{"KAGGLE_API_TOKEN": SECRET, "KAGGLE_USERNAME": None,
                                "KAGGLE_KEY": None}]
    printed = capsys.readouterr()
    assert "secrets KAGGLE_API_TOKEN" in printed.err
    assert SECRET not in printed.out + printed.err


@pytest.mark.parametrize("source", ["KAGGLE_API_TOKEN", "KAGGLE_USERNAME/KAGGLE_KEY", "kaggle.json",
                                    "access_token"])
def test_every_kind_of_credential_reaches_the_kaggle_package(tmp_path, dataset_zip, no_credentials,
                                                             monkeypatch, source):
    from cmc_kit.kaggle import credentials

    if source == "KAGGLE_API_TOKEN":
        monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
        expected = "KAGGLE_API_TOKEN"
    elif source == "KAGGLE_USERNAME/KAGGLE_KEY":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        monkeypatch.setenv("KAGGLE_KEY", SECRET)
        expected = source
    elif source == "kaggle.json":
        config = tmp_path / "kaggle-config"
        config.mkdir()
        (config / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
        os.chmod(config / "kaggle.json", 0o600)
        expected = str(config / "kaggle.json")
    else:
        token = tmp_path / "home" / ".kaggle" / "access_token"
        token.parent.mkdir(parents=True)
        token.write_text(SECRET)
        expected = str(token)
    assert credentials.find_credentials() == expected
    built = []
    _fake_kaggle_modules(monkeypatch, lambda: built.append(FakeApi(dataset_zip)) or built[-1])
    root = kaggle.download(tmp_path / "terrain")
    assert len(data.discover(root)) == 3 and built[0].calls[0] == "authenticate"
    assert credentials.redact(f"token {SECRET}!") == "token ***!"


# -- previous notebook versions ---------------------------------------------------------------

def _a_run(folder):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def _is_run(folder):
    return (folder / "config.json").is_file() and (folder / "checkpoints").is_dir()


def test_previous_output_is_the_first_attached_run_of_the_same_name(tmp_path, capsys):
    inputs = tmp_path / "input"
    (inputs / "cmc-train-v0" / "runs" / "terrain-cmc").mkdir(parents=True)  # no run in it
    _a_run(inputs / "other-run" / "runs" / "demo")                          # another name
    found = _a_run(inputs / "cmc-train-v1" / "runs" / "terrain-cmc")
    _a_run(inputs / "cmc-train-v2" / "runs" / "terrain-cmc")
    (inputs / "notes" / "terrain-cmc").parent.mkdir(parents=True)
    (inputs / "notes" / "terrain-cmc").write_text("a file, not a run")
    assert kaggle.find_previous_output(tmp_path / "work" / "terrain-cmc", inputs,
                                       is_run=_is_run) == found
    assert f"previous notebook output {found}" in capsys.readouterr().out
    assert kaggle.find_previous_output("terrain-cmc", inputs, is_run=_is_run) == found
    assert kaggle.find_previous_output("missing", inputs, is_run=_is_run) is None
    assert kaggle.find_previous_output("terrain-cmc", tmp_path / "nowhere", is_run=_is_run) is None
    _a_run(inputs / "x" / "run[1]")
    assert kaggle.find_previous_output("run[1]", inputs, is_run=_is_run) == inputs / "x" / "run[1]"


def test_previous_output_looks_in_kaggle_input_only_on_kaggle(tmp_path, monkeypatch):
    inputs = tmp_path / "input"
    found = _a_run(inputs / "v1" / "terrain-cmc")
    monkeypatch.setattr(kaggle, "default_paths", lambda: {"input": inputs})
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: False)
    assert kaggle.find_previous_output("terrain-cmc", is_run=_is_run) is None
    monkeypatch.setattr(kaggle, "on_kaggle", lambda: True)
    assert kaggle.find_previous_output("terrain-cmc", is_run=_is_run) == found


# -- the wheel dataset: cmc-kit kaggle bundle ----------------------------------------------------

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


# -- the notebooks as kernels: cmc-kit kaggle push ----------------------------------------------

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# kernel-metadata.json as Kaggle documents it (Kaggle/kaggle-cli docs/kernels_metadata.md) and as
# the kaggle package 2.2 reads it (KaggleApi.kernels_push, kernels_initialize); machine shapes
# from docs/kernels.md ("Accelerators available as of Feb 2026").
KERNEL_FIELDS = {"id", "id_no", "title", "code_file", "language", "kernel_type", "is_private",
                 "enable_gpu", "enable_tpu", "enable_internet", "machine_shape",
                 "dataset_sources", "competition_sources", "kernel_sources", "model_sources",
                 "docker_image", "docker_image_pinning_type", "keywords"}
MACHINE_SHAPES = {"NvidiaTeslaP100", "TpuV38", "NvidiaTeslaT4", "NvidiaTeslaT4Highmem",
                  "Tpu1VmV38", "NvidiaTeslaA100", "NvidiaL4", "TpuV5E8", "NvidiaL4X1", "TpuV6E8",
                  "NvidiaH100", "NvidiaRtxPro6000"}
BOOLEANS = {"true", "false", True, False}


def _owner_slug(text):
    parts = text.split("/")
    assert len(parts) == 2 and all(parts), text
    return parts


def check_kernel_folder(folder):
    """A folder `kaggle kernels push -p folder` accepts; returns its metadata."""
    import nbformat

    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert set(metadata) <= KERNEL_FIELDS, set(metadata) - KERNEL_FIELDS
    for required in ("id", "title", "code_file", "language", "kernel_type"):
        assert metadata.get(required), required
    owner, slug = _owner_slug(metadata["id"])
    assert len(metadata["title"]) >= 5
    try:
        from slugify import slugify  # python-slugify: how the kaggle package derives the slug
    except ImportError:
        slugify = None
    if slugify is not None:
        assert slugify(metadata["title"]) == slug
    assert metadata["language"] in {"python", "r", "rmarkdown"}
    assert metadata["kernel_type"] in {"script", "notebook"}
    for flag in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        assert metadata.get(flag, "false") in BOOLEANS, flag
    assert metadata.get("machine_shape", "") in MACHINE_SHAPES | {""}
    for source in metadata.get("dataset_sources", []) + metadata.get("kernel_sources", []):
        _owner_slug(source)
    assert all("/" not in c for c in metadata.get("competition_sources", []))
    code = folder / metadata["code_file"]
    assert code.is_file() and code.parent == folder
    if metadata["kernel_type"] == "notebook":
        nbformat.validate(nbformat.read(code, as_version=4))
    return metadata


class FakeKernelsApi:
    """KaggleApi stand-in for pushes, with the installed kernels_push signature (checked below);
    records each pushed folder as Kaggle would receive it."""

    def __init__(self, responses=None, username=None):
        self.responses, self.username, self.pushed, self.calls = responses or {}, username, [], []

    def authenticate(self):
        self.calls.append("authenticate")

    def get_config_value(self, name):
        return self.username if name == "username" else None

    def kernels_push(self, folder, timeout=None, acc=None, no_run=False):
        metadata = json.loads((Path(folder) / "kernel-metadata.json").read_text())
        code = (Path(folder) / metadata["code_file"]).read_bytes()
        self.pushed.append({"folder": Path(folder).name, "metadata": metadata, "no_run": no_run,
                            "code": code})
        answer = self.responses.get(Path(folder).name, {})
        if isinstance(answer, Exception):
            raise answer
        return types.SimpleNamespace(**{"error": None, "url": f"https://kaggle.com/code/{metadata['id']}",
                                        "invalid_dataset_sources": [], "invalid_kernel_sources": [],
                                        **answer})


class OldKernelsApi(FakeKernelsApi):
    """kaggle packages whose kernels_push cannot save without running."""

    def kernels_push(self, folder, timeout=None):
        return super().kernels_push(folder, timeout)


def _notebook_numbers():
    return sorted(p.name[:2] for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_the_fake_kernels_api_has_the_installed_signature():
    extended = pytest.importorskip("kaggle.api.kaggle_api_extended")
    real = inspect.signature(extended.KaggleApi.kernels_push).parameters
    fake = inspect.signature(FakeKernelsApi.kernels_push).parameters
    assert [(p.name, p.default) for p in fake.values()] == [(p.name, p.default) for p in real.values()]


def test_dry_run_writes_one_valid_kernel_folder_per_notebook(tmp_path):
    from cmc_kit.kaggle.kernels import write_kernel_folders

    kernels = write_kernel_folders(tmp_path / "kernels", user="someone")
    numbers = _notebook_numbers()
    assert [k.number for k in kernels] == numbers and numbers[:2] == ["01", "02"]
    for kernel in kernels:
        metadata = check_kernel_folder(kernel.folder)
        notebook = NOTEBOOKS / metadata["code_file"]
        assert (kernel.folder / notebook.name).read_bytes() == notebook.read_bytes()
        assert metadata["id"] == f"someone/cmc-kit-{kernel.folder.name.replace('_', '-')}"
        assert metadata["kernel_type"] == "notebook" and metadata["is_private"] == "true"
        assert metadata["enable_internet"] == "false"  # the wheel dataset installs offline
        assert metadata["dataset_sources"] == [kaggle.KAGGLE_DATASET, "someone/cmc-kit-wheels"]
        later = int(kernel.number) > 2
        assert metadata["kernel_sources"] == (["someone/cmc-kit-02-train"] if later else [])
        gpu = kernel.number != "01"  # 01 decodes PNGs on the CPU
        assert (metadata["enable_gpu"], metadata.get("machine_shape")) == \
            (("true", "NvidiaTeslaT4") if gpu else ("false", None))


@pytest.mark.parametrize("accelerator, fields", [
    ("gpu-t4x2", {"enable_gpu": "true", "enable_tpu": "false", "machine_shape": "NvidiaTeslaT4"}),
    ("p100", {"enable_gpu": "true", "enable_tpu": "false", "machine_shape": "NvidiaTeslaP100"}),
    ("tpu", {"enable_gpu": "false", "enable_tpu": "true", "machine_shape": "TpuV5E8"}),
    ("none", {"enable_gpu": "false", "enable_tpu": "false", "machine_shape": None}),
])
def test_accelerator_internet_and_wheels_dataset_choices(tmp_path, accelerator, fields):
    from cmc_kit.kaggle.kernels import write_kernel_folders

    kernels = write_kernel_folders(tmp_path, user="someone", accelerator=accelerator,
                                   internet=True, wheels_dataset="team/our-wheels", only=["2"])
    assert [k.number for k in kernels] == ["02"]
    metadata = check_kernel_folder(kernels[0].folder)
    assert {key: metadata.get(key) for key in fields} == fields
    assert metadata["enable_internet"] == "true"
    assert metadata["dataset_sources"][1] == "team/our-wheels"


def test_bad_push_settings_are_one_clear_error(tmp_path):
    from cmc_kit.errors import ConfigError
    from cmc_kit.kaggle.kernels import write_kernel_folders

    with pytest.raises(ConfigError, match=r"--accelerator must be one of gpu-t4x2, p100, tpu, none"):
        write_kernel_folders(tmp_path, user="someone", accelerator="v100")
    with pytest.raises(ConfigError, match=r"--only 09: no such notebook. The notebooks are 01, 02"):
        write_kernel_folders(tmp_path, user="someone", only=["09"])
    with pytest.raises(ConfigError, match=r"No NN_name\.ipynb notebooks in"):
        write_kernel_folders(tmp_path, user="someone", notebooks_dir=tmp_path)


def test_push_sends_every_notebook_in_order_and_saves_the_later_ones_unrun(tmp_path, capsys):
    from cmc_kit.kaggle.kernels import push_notebooks

    api = FakeKernelsApi()
    outcomes = push_notebooks(user="someone", api=api)
    numbers = _notebook_numbers()
    assert api.calls == ["authenticate"]
    assert [p["folder"][:2] for p in api.pushed] == numbers
    assert [p["no_run"] for p in api.pushed] == [int(n) > 2 for n in numbers]
    assert all(p["code"] == (NOTEBOOKS / p["metadata"]["code_file"]).read_bytes() for p in api.pushed)
    assert [o.split(":")[0] for _, o in outcomes] == \
        ["running"] * 2 + ["saved, not run"] * (len(numbers) - 2)
    out = capsys.readouterr().out
    assert "03_resume: saved, not run: https://kaggle.com/code/someone/cmc-kit-03-resume" in out
    assert "`cmc-kit kaggle push --only 03` once someone/cmc-kit-02-train has finished" in out


def test_push_only_later_notebooks_runs_them(tmp_path):
    from cmc_kit.kaggle.kernels import push_notebooks

    api = FakeKernelsApi(username="from-token")
    push_notebooks(api=api, only=["03", "04"])  # no user given: the API's own
    assert [(p["folder"][:2], p["no_run"]) for p in api.pushed] == [("03", False), ("04", False)]
    assert api.pushed[0]["metadata"]["kernel_sources"] == ["from-token/cmc-kit-02-train"]


def test_an_old_kaggle_package_leaves_out_what_must_wait(tmp_path, capsys):
    from cmc_kit.kaggle.kernels import push_notebooks

    api = OldKernelsApi()
    push_notebooks(user="someone", api=api)
    assert [p["folder"][:2] for p in api.pushed] == ["01", "02"]
    assert "03_resume: not pushed" in capsys.readouterr().out


def test_kaggle_refusals_are_clear_errors_without_the_key(tmp_path, no_credentials, monkeypatch,
                                                         capsys):
    from cmc_kit.errors import KaggleError
    from cmc_kit.kaggle.kernels import push_notebooks

    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    refusing = FakeKernelsApi({"01_data_prep": {"error": f"Notebook limit reached ({SECRET})"}})
    with pytest.raises(KaggleError, match=r"Kaggle refused someone/cmc-kit-01-data-prep: .*\*\*\*"):
        push_notebooks(user="someone", api=refusing, only=["01"])
    unknown = FakeKernelsApi({"01_data_prep": {"invalid_dataset_sources": ["someone/cmc-kit-wheels"]}})
    with pytest.raises(KaggleError, match=r"without the dataset\(s\) someone/cmc-kit-wheels.*"
                                          r"cmc-kit kaggle bundle OUT.*kaggle datasets create"):
        push_notebooks(user="someone", api=unknown)
    assert len(unknown.pushed) == 1  # stops at the first kernel that cannot work
    denied = FakeKernelsApi({"01_data_prep": HTTPFailure(f"401 for key {SECRET}", 401)})
    with pytest.raises(CredentialsError, match=r"HTTP 401"):
        push_notebooks(user="someone", api=denied)
    assert SECRET not in capsys.readouterr().out
    with pytest.raises(CredentialsError, match=r"KAGGLE_API_TOKEN"):
        push_notebooks(user="someone")  # no credentials, and the kaggle package never imported


def test_the_kernel_folders_pass_the_kaggle_packages_own_checks(tmp_path, capsys):
    """The installed kaggle package's kernels_push reads each folder and validates it (title,
    slug, language, type, sources) up to the HTTP request, which a fake client receives."""
    extended = pytest.importorskip("kaggle.api.kaggle_api_extended")
    from cmc_kit.kaggle.kernels import write_kernel_folders

    requests = []

    class FakeClient:
        def __enter__(self):
            save = lambda request: requests.append(request) or types.SimpleNamespace(error=None)
            return types.SimpleNamespace(kernels=types.SimpleNamespace(
                kernels_api_client=types.SimpleNamespace(save_kernel=save)))

        def __exit__(self, *exc):
            return False

    api = extended.KaggleApi()
    if not hasattr(api, "build_kaggle_client"):
        pytest.skip("this kaggle package has no build_kaggle_client to stand in for")
    api.build_kaggle_client = FakeClient
    api.config_values = {"username": "someone"}
    for kernel in write_kernel_folders(tmp_path, user="someone"):
        api.kernels_push(str(kernel.folder))
        request = requests[-1]
        assert request.slug == kernel.id and request.kernel_type == "notebook"
        assert request.dataset_data_sources == kernel.metadata["dataset_sources"]
        assert request.kernel_data_sources == kernel.metadata["kernel_sources"]
        assert request.enable_internet is False and request.is_private is True
        assert request.enable_gpu is (kernel.number != "01")
    assert len(requests) == len(_notebook_numbers())
    assert "does not resolve to the specified id" not in capsys.readouterr().out


# -- the command line ------------------------------------------------------------------------------

def test_cmc_kit_kaggle_push_dry_run_writes_the_folders(tmp_path, capsys):
    assert cli.main(["kaggle", "push", "--dry-run", str(tmp_path), "--user", "someone",
                     "--accelerator", "tpu", "--only", "01,02"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / '02_train'}  (someone/cmc-kit-02-train)" in out
    assert f"kaggle kernels push -p {tmp_path / '01_data_prep'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_data_prep", "02_train"]
    assert check_kernel_folder(tmp_path / "02_train")["machine_shape"] == "TpuV5E8"


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


def test_cmc_kit_kaggle_errors_name_the_subcommand(tmp_path, no_credentials, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "kaggle" in capsys.readouterr().out
    with pytest.raises(SystemExit) as no_subcommand:
        cli.main(["kaggle"])
    assert no_subcommand.value.code == 2
    capsys.readouterr()
    assert cli.main(["kaggle", "push", "--dry-run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("cmc-kit kaggle push: error: No Kaggle user name")
    assert cli.main(["kaggle", "bundle", str(tmp_path / "w"), "--user", "a/b"]) == 2
    assert capsys.readouterr().err.startswith("cmc-kit kaggle bundle: error: --user must be")
    assert cli.main(["kaggle", "push", "--user", "someone"]) == 2  # not --dry-run: credentials
    err = capsys.readouterr().err
    assert err.startswith("cmc-kit kaggle push: error: Kaggle credentials not found")
    assert len(err.strip().splitlines()) == 1
