"""Fake Kaggle objects for the Kaggle tests: stand-ins for the kaggle package's KaggleApi and for
kagglehub, with the installed packages' signatures (checked in the tests), and an environment
without credentials, so that no test ever reaches the network."""

import json
import os
import shutil
import sys
import types
import zipfile
from pathlib import Path

import pytest

from cmc_kit import kaggle

SECRET = "s3cr3t-kaggle-key-0123456789"
OWNER, SLUG = kaggle.KAGGLE_DATASET.split("/")


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


def fake_kaggle_modules(monkeypatch, api_class):
    package = types.ModuleType("kaggle")
    api_package = types.ModuleType("kaggle.api")
    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = api_class
    for name, module in (("kaggle", package), ("kaggle.api", api_package),
                         ("kaggle.api.kaggle_api_extended", extended)):
        monkeypatch.setitem(sys.modules, name, module)


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
