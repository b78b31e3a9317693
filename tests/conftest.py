"""Shared fixtures: offline Hub, a private HF_HOME, the synthetic dataset written once, the real MVTec subset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before huggingface_hub / datasets are imported anywhere: they read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread for in-process tests: tiny 32-64 px models gain nothing from more, and on a
    shared 2-core machine two threads thrash (measured 10-30x slower under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def busy_port():
    """A port of 127.0.0.1 that another socket listens on for the test's duration."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


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


@pytest.fixture(scope="session")
def trained_tiny_pipeline(synthetic_root, tmp_path_factory) -> Path:
    """A tiny self-conditioned DDPM (preset ``tiny``: 0.69M parameters, 32 px) trained by
    ``training/train_ddpm.py`` on the synthetic ``SYNTHETIC_CATEGORIES[0]`` category for at most
    150 optimiser steps or 45 s of training (about a minute in all); returns its pipeline folder
    (``unet/``, ``scheduler/``, ``model_index.json``, ``training_log.json``)."""
    import subprocess
    import sys

    from diffad.synthetic import SYNTHETIC_CATEGORIES

    out = tmp_path_factory.mktemp("trained_tiny_pipeline")
    cmd = [sys.executable, str(REPO_ROOT / "training" / "train_ddpm.py"),
           "--data_dir", str(synthetic_root), "--category", SYNTHETIC_CATEGORIES[0], "--preset", "tiny",
           "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "150",
           "--max_train_minutes", "0.75", "--checkpointing_steps", "100000", "--seed", "0",
           "--report_to", "none", "--output_dir", str(out)]
    # One thread: on a shared 2-core machine, two OpenMP threads per process are many times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"training the tiny pipeline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out
