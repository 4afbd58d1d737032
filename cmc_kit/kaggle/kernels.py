"""`cmc-kit kaggle push`: the notebooks as Kaggle kernels, one folder each (the .ipynb and its
kernel-metadata.json), pushed in order through the kaggle package's `KaggleApi.kernels_push`.

Every kernel attaches the Terrain Map dataset and the wheel dataset of `cmc-kit kaggle bundle`,
from which its first cell installs cmc_kit (Internet on or off). 02_train's output holds the run,
so the notebooks after it attach that output as a kernel source: 03 continues the run, 04 and
later read it. Pushed in the same call as 02, they are saved without running (their input does
not exist until 02's version finishes); `--only` runs them later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cmc_kit.errors import ConfigError, CredentialsError, KaggleError
from cmc_kit.fileio import atomic_write_bytes, atomic_write_text, check_folder_path
from cmc_kit.kaggle import KAGGLE_DATASET
from cmc_kit.kaggle.bundle import WHEELS_SLUG, source_checkout
from cmc_kit.kaggle.credentials import (authenticate, credentials_help, find_credentials,
                                        import_kaggle_api, kaggle_username, redact,
                                        redacted_output, require_username)
from cmc_kit.kaggle.sources import accepts

KERNEL_METADATA = "kernel-metadata.json"
NOTEBOOK_FILE = re.compile(r"^(?P<number>\d\d)_(?P<topic>[a-z0-9_]+)\.ipynb$")
TRAIN_NOTEBOOK = "02"   # its output (runs/terrain-cmc) is what the later notebooks continue or read
CPU_NOTEBOOKS = {"01"}  # decodes PNGs on the CPU: an accelerator there would only spend quota

# --accelerator -> kernel-metadata fields. Machine shapes as the kaggle package 2.2 names them
# (`kaggle kernels push --accelerator` help: NvidiaTeslaT4 for "GPU T4 x2", TpuV5E8 for
# "TPU v5e-8"); Kaggle has retired the P100: kaggle 2.2 warns that such a session runs on a T4.
ACCELERATORS = {
    "gpu-t4x2": {"enable_gpu": "true", "enable_tpu": "false", "machine_shape": "NvidiaTeslaT4"},
    "p100": {"enable_gpu": "true", "enable_tpu": "false", "machine_shape": "NvidiaTeslaP100"},
    "tpu": {"enable_gpu": "false", "enable_tpu": "true", "machine_shape": "TpuV5E8"},
    "none": {"enable_gpu": "false", "enable_tpu": "false"},
}


@dataclasses.dataclass(frozen=True)
class KernelFolder:
    """One notebook, ready for `kaggle kernels push -p folder`."""

    number: str
    folder: Path
    metadata: dict

    @property
    def id(self) -> str:
        return self.metadata["id"]


def default_notebooks_dir() -> Path:
    return source_checkout() / "notebooks"


def kernel_title(notebook: str | os.PathLike) -> str:
    """"01_data_prep.ipynb" -> "cmc_kit 01 data prep"."""
    match = _match(Path(notebook))
    return f"cmc_kit {match['number']} {match['topic'].replace('_', ' ')}"


def kernel_slug(title: str) -> str:
    """Kaggle's slug of a title: lowercase, dashes for everything else ("cmc-kit-01-data-prep")."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def kernel_metadata(notebook: str | os.PathLike, *, user: str, accelerator: str = "gpu-t4x2",
                    internet: bool = False, wheels_dataset: str | None = None,
                    train_kernel: str | None = None) -> dict:
    """kernel-metadata.json of one notebook (the fields Kaggle's docs list; booleans as the
    strings "true"/"false", as `kaggle kernels init` writes them).

    `train_kernel`: the id of 02_train's kernel, attached by the notebooks after it.
    """
    notebook = Path(notebook)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator must be one of {', '.join(ACCELERATORS)}. "
                          f"Received: {accelerator!r}")
    number = _match(notebook)["number"]
    title = kernel_title(notebook)
    later = train_kernel is not None and int(number) > int(TRAIN_NOTEBOOK)
    return {
        "id": f"{user}/{kernel_slug(title)}",
        "title": title,
        "code_file": notebook.name,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": "true",
        **ACCELERATORS["none" if number in CPU_NOTEBOOKS else accelerator],
        "enable_internet": "true" if internet else "false",
        "dataset_sources": [KAGGLE_DATASET, wheels_dataset or f"{user}/{WHEELS_SLUG}"],
        "competition_sources": [],
        "kernel_sources": [train_kernel] if later else [],
        "model_sources": [],
    }


def write_kernel_folders(out: str | os.PathLike, *, user: str,
                         notebooks_dir: str | os.PathLike | None = None,
                         only: Iterable[str] | None = None, **options: Any) -> list[KernelFolder]:
    """Writes OUT/NN_name/{NN_name.ipynb, kernel-metadata.json} for each notebook (or the
    numbers in `only`, e.g. {"03", "04"}), in order. `options` go to `kernel_metadata`."""
    out = Path(out)
    check_folder_path(out, "--dry-run DIR", ConfigError)
    notebooks = notebook_paths(notebooks_dir if notebooks_dir is not None
                               else default_notebooks_dir())
    numbers = {_match(n)["number"]: n for n in notebooks}
    wanted = _check_only(only, numbers)
    train = numbers.get(TRAIN_NOTEBOOK)
    train_kernel = f"{user}/{kernel_slug(kernel_title(train))}" if train is not None else None
    kernels = []
    for number, notebook in numbers.items():
        if number not in wanted:
            continue
        metadata = kernel_metadata(notebook, user=user, train_kernel=train_kernel, **options)
        folder = out / notebook.stem
        atomic_write_bytes(folder / notebook.name, notebook.read_bytes())
        atomic_write_text(folder / KERNEL_METADATA, json.dumps(metadata, indent=2) + "\n")
        kernels.append(KernelFolder(number, folder, metadata))
    return kernels


def notebook_paths(notebooks_dir: str | os.PathLike) -> list[Path]:
    """The NN_name.ipynb files of a folder, in their order."""
    found = sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if NOTEBOOK_FILE.match(p.name))
    if not found:
        raise ConfigError(f"No NN_name.ipynb notebooks in {notebooks_dir}. Give the repository's "
                          "notebooks/ folder with --notebooks.")
    return found


def push_kernels(kernels: list[KernelFolder], api: Any, *,
                 say: Callable[[str], None] = print) -> list[tuple[KernelFolder, str]]:
    """Pushes each folder with `api.kernels_push(folder)`, in order; returns (kernel, outcome).

    A kernel whose kernel source was pushed to run in this same call is saved without running
    (`no_run=True`, where the kaggle package offers it), or left out with older kaggle packages: its input appears only
    when that version finishes. Raises KaggleError when Kaggle refuses a kernel or does not know
    one of its datasets (the wheel dataset not created yet), CredentialsError on HTTP 401/403.
    """
    running: set[str] = set()
    saves_without_running = accepts(api.kernels_push, "no_run")
    outcomes = []
    for kernel in kernels:
        waits_for = [s for s in kernel.metadata["kernel_sources"] if s in running]
        later = f"`cmc-kit kaggle push --only {kernel.number}` once {', '.join(waits_for)} has finished"
        if waits_for and not saves_without_running:
            outcome = f"not pushed (this kaggle package cannot save without running): {later}"
        else:
            response = _push_one(api, kernel, {"no_run": True} if waits_for else {})
            url = _field(response, "url") or kernel.id
            if waits_for:
                outcome = f"saved, not run: {url}; run it with {later}"
            else:
                running.add(kernel.id)
                outcome = f"running: {url}"
        say(f"{kernel.folder.name}: {outcome}")
        outcomes.append((kernel, outcome))
    return outcomes


def push_notebooks(*, user: str | None = None, api: Any = None, dry_run: str | os.PathLike | None = None,
                   **options: Any) -> list[KernelFolder] | list[tuple[KernelFolder, str]]:
    """`cmc-kit kaggle push`: with `dry_run` only the kernel folders are written there; else they
    are written to a temporary folder and pushed through `api` (default: the kaggle package,
    authenticated). `options` go to `write_kernel_folders`."""
    if dry_run is not None:
        return write_kernel_folders(dry_run, user=require_username(user), **options)
    if api is None:
        if find_credentials() is None:
            raise CredentialsError(credentials_help())
        api = import_kaggle_api()
    authenticate(api)
    user = kaggle_username(user) or _api_username(api)
    with tempfile.TemporaryDirectory(prefix="cmc_kit_kernels-") as folder:
        kernels = write_kernel_folders(folder, user=require_username(user), **options)
        return push_kernels(kernels, api)


def _push_one(api: Any, kernel: KernelFolder, options: dict) -> Any:
    try:
        with redacted_output():
            response = api.kernels_push(str(kernel.folder), **options)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # HTTP errors, kaggle's ValueErrors about the metadata
        status = _field(_field(err, "response"), "status_code")
        if status in (401, 403):
            raise CredentialsError(f"Kaggle refused the push of {kernel.id} (HTTP {status}).\n"
                                   + credentials_help()) from None
        raise KaggleError(f"Pushing {kernel.folder} as {kernel.id} failed: "
                          f"{redact(str(err).strip() or type(err).__name__)}") from None
    error = _field(response, "error") if response is not None else "no answer"
    if error:
        raise KaggleError(f"Kaggle refused {kernel.id}: {redact(str(error))}. Check "
                          f"{kernel.folder / KERNEL_METADATA} and push again.")
    unknown = _field(response, "invalid_dataset_sources", "invalidDatasetSources") or []
    if unknown:
        raise KaggleError(
            f"Kaggle pushed {kernel.id} without the dataset(s) {', '.join(unknown)}, which it does "
            "not know. Create the wheel dataset first (`cmc-kit kaggle bundle OUT`, then `kaggle "
            "datasets create -p OUT`), or pass --wheels-dataset OWNER/SLUG, then push again.")
    missing = _field(response, "invalid_kernel_sources", "invalidKernelSources") or []
    if missing:
        warnings.warn(f"{kernel.id} was pushed without the output of {', '.join(missing)} (no "
                      "finished version yet): push it again once that version has finished.",
                      stacklevel=3)
    return response


def _field(obj: Any, *names: str) -> Any:
    """The first of `names` that `obj` has (kagglesdk answers have snake_case and camelCase)."""
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _api_username(api: Any) -> str | None:
    """The user name the authenticated kaggle package knows (from kaggle.json or a token)."""
    get = getattr(api, "get_config_value", None)
    return get("username") if callable(get) else None


def _check_only(only: Iterable[str] | None, numbers: dict[str, Path]) -> set[str]:
    wanted = set(numbers) if only is None else {str(n).zfill(2) for n in only}
    unknown = sorted(wanted - set(numbers))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: no such notebook. The notebooks are "
                          f"{', '.join(numbers)}.")
    return wanted


def _match(notebook: Path) -> re.Match:
    match = NOTEBOOK_FILE.match(notebook.name)
    if match is None:
        raise ConfigError(f"{notebook} is not named like NN_topic.ipynb (e.g. 01_data_prep.ipynb).")
    return match
