"""Shared fixtures: offline Hub, a private HF_HOME, the synthetic dataset written once, the real MVTec subset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("DIFFAD_REAL_DATA", REPO_ROOT.parent / "shared" / "data"))
REAL_SUBSET = REAL_DATA / "mvtec_subset"


@pytest.fixture(autouse=True, scope="session")
def _offline_hf_home(tmp_path_factory):
    """Tests never touch the network, and remote code is copied into a writable, private HF_HOME."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The embedded default dataset in MVTec AD layout, written once per test session (small, 64 px)."""
    from diffad import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), seed=0, resolution=64,
                                  num_train=40, num_test_good=10, num_test_defect_per_type=4)


@pytest.fixture(scope="session")
def real_subset() -> Path:
    """The real MVTec AD subset beside the checkout (../shared/data/mvtec_subset); skipped where absent."""
    if not (REAL_SUBSET / "bottle").is_dir():
        pytest.skip(f"real MVTec AD subset not found at {REAL_SUBSET} (set DIFFAD_REAL_DATA to its parent)")
    return REAL_SUBSET
