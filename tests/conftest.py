"""Shared test settings. Module-specific fixtures live in each test file."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Keep the 2-core CI machine responsive: TensorFlow's own pools, not one per test.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset in the Kaggle layout (24 samples of 96x96), made once per session."""
    from cmc_kit import synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.generate(root, n=24, size=96, seed=7, progress=False)
    return root


@pytest.fixture(scope="session")
def train_root(tmp_path_factory):
    """30 synthetic samples of 64x64 for training tests (24 train / 6 held out with
    helpers.tiny_config)."""
    from cmc_kit import synth

    root = tmp_path_factory.mktemp("train_data")
    synth.generate(root, n=30, size=64, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """40 synthetic samples of 64x64: enough for a held-out split of ~10."""
    from cmc_kit import synth

    root = tmp_path_factory.mktemp("small_dataset")
    synth.generate(root, n=40, size=64, seed=11, progress=False)
    return root


@pytest.fixture(scope="session")
def trained_run(small_dataset, tmp_path_factory):
    """A tiny run trained for 2 epochs on `small_dataset` (shared, read-only for tests)."""
    from cmc_kit import embed, training
    from cmc_kit.config import preset

    config = preset("cpu-demo").with_overrides({
        "data.crop_size": 32, "data.batch_size": 6, "data.validation_fraction": 0.25,
        "model.trunk": "resnet18", "model.width": 0.125, "model.embedding_dim": 16,
        "train.epochs": 2,
        "train.queue_multiplier": 2, "train.eval_subset": 8})
    run = tmp_path_factory.mktemp("trained_run") / "run"
    training.train(small_dataset, run, config, verbose=0, callbacks=[embed.EpochEmbeddings()])
    return run


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    """Debian's headless chromium through playwright (skips without it: `make browser`)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (`make browser` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            yield launched
        finally:
            launched.close()
