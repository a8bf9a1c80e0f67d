"""Shared fixtures: generated data, a tiny model trained on it, and the real LGG subset."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# No test may reach the internet: analytics off, and the Hub client never calls home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

REAL_DATA = Path(os.environ.get("LGG_DATA_DIR", ROOT.parent / "shared" / "data" / "lgg_subset"))


def pytest_collection_modifyitems(config, items):
    # In CI the real subset is always there: a missing one must fail, not skip.
    if REAL_DATA.is_dir() or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=f"real LGG data not found at {REAL_DATA} (set LGG_DATA_DIR)")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    return REAL_DATA


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A kaggle_3m folder of 8 generated patients (1 healthy) x 10 slices at 256x256."""
    from unet.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), patients=8, slices=10, healthy_patients=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run folder of train.py on synthetic data (a few CPU seconds); its model is run/model."""
    import train

    out = tmp_path_factory.mktemp("run")
    code = train.main(["--synthetic", "--epochs", "2", "--steps-per-epoch", "6", "--batch-size", "4",
                       "--image-size", "64", "--width", "8", "--out-dir", str(out), "--checkpoint-every", "3"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(trained_run) -> Path:
    return trained_run / "model"


@pytest.fixture
def dead_endpoint():
    """A local port that refuses connections at once: bound and never listening, held for the whole test so
    that no other process can start listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
