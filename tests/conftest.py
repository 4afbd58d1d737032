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
