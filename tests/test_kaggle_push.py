"""`cmc-kit kaggle push`: one kernel folder per notebook, validated against the fields Kaggle
documents and the installed kaggle package's own checks, pushed through fake API objects
(tests/kaggle_fakes.py: never the network)."""

import inspect
import json
import types
from pathlib import Path

import pytest
from kaggle_fakes import (SECRET, FakeKernelsApi, HTTPFailure, OldKernelsApi,
                          no_credentials)  # noqa: F401 (fixture)

from cmc_kit import cli, kaggle
from cmc_kit.errors import CredentialsError

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


