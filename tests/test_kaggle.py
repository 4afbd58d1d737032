"""Kaggle download (attached copy, kagglehub, the kaggle package), credentials, attached-input
discovery and previous notebook outputs, with fake API objects (tests/kaggle_fakes.py: never the
network)."""

import inspect
import os
import re
import sys
import types
import zipfile

import pytest
from kaggle_fakes import (OWNER, SECRET, SLUG, ExplodingApi, FakeApi, FakeHub, HTTPFailure,
                          OldHub, fake_kaggle_modules, no_credentials)  # noqa: F401 (fixture)

from cmc_kit import cli, data, kaggle, synth
from cmc_kit.errors import CredentialsError, DataError


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory):
    """A zip laid out like the Kaggle archive: _dataset/NNNN_{t,h,i2}.png."""
    root = synth.generate(tmp_path_factory.mktemp("zipsrc"), n=3, size=24, seed=0, progress=False)
    archive = tmp_path_factory.mktemp("zip") / f"{SLUG}.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((root / "_dataset").iterdir()):
            bundle.write(path, f"_dataset/{path.name}")
    return archive


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


def test_kaggle_json_is_found_and_a_readable_one_warns(tmp_path, dataset_zip, no_credentials, monkeypatch):
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
    os.chmod(config / "kaggle.json", 0o644)
    fake_kaggle_modules(monkeypatch, lambda: FakeApi(dataset_zip))
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

    fake_kaggle_modules(monkeypatch, LeakyApi)
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
    fake_kaggle_modules(monkeypatch, lambda: built.append(FakeApi(dataset_zip)) or built[-1])
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


# -- notebooks pushed as their own kernels -------------------------------------------------------

def test_a_pushed_notebook_finds_the_attached_dataset_without_01s_record(tmp_path, monkeypatch,
                                                                        capsys):
    from cmc_kit.notebook import datasets

    attached = synth.generate(tmp_path / "input" / SLUG, n=2, size=24, seed=0, progress=False)
    paths = {"input": tmp_path / "input", "data": tmp_path / "working" / "data"}
    monkeypatch.setattr(datasets, "default_paths", lambda: paths)
    monkeypatch.setattr(datasets, "on_kaggle", lambda: False)
    with pytest.raises(DataError, match="No dataset recorded"):
        datasets.find_data()
    paths["data"].mkdir(parents=True)
    (paths["data"] / datasets.DATASET_POINTER).write_bytes(b"\xff\xfe\x00")  # not even text
    with pytest.raises(DataError, match="No dataset recorded"):
        datasets.find_data()
    monkeypatch.setattr(datasets, "on_kaggle", lambda: True)
    assert datasets.find_data() == attached
    assert f"attached at {attached}" in capsys.readouterr().out



def test_the_note_01_prints_on_falling_back_holds_no_key(tmp_path, no_credentials, monkeypatch,
                                                        capsys):
    from cmc_kit import notebook

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    hub = types.ModuleType("kagglehub")
    hub.dataset_download = FakeHub(error=HTTPFailure(f"401 for key {SECRET}", 401)).dataset_download
    monkeypatch.setitem(sys.modules, "kagglehub", hub)
    fake_kaggle_modules(monkeypatch, lambda: FakeApi(fail_auth=True))
    choice = notebook.get_data(tmp_path / "terrain", synthetic_samples=2, synthetic_size=24)
    assert choice.source == "synthetic" and "kagglehub" in choice.note
    printed = capsys.readouterr()
    assert SECRET not in choice.note + printed.out + printed.err
