"""Shared fixtures: generated data, a small model trained on it that finds its tumors, and the real LGG subset."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# No test may reach the internet: analytics off, and the Hub client never calls home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

REAL_DATA = Path(os.environ.get("LGG_DATA_DIR", ROOT.parent / "shared" / "data" / "lgg_subset"))

# The post-processing the trained_run fixture's model carries: every value off its default, so a test of config
# wiring can tell a component that reads it from one that falls back to the defaults. The phantoms' tumor sits at
# another place on each slice, so keeping the largest 3D component changes their scores too.
FIXTURE_POSTPROCESSING = {
    "threshold": 0.4,
    "min_component_area": 16,
    "fill_holes": True,
    "tta_flips": False,
    "largest_3d_component": True,
    "largest_3d_component_by": "probability",
}


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
def eighty_patient_dirs(real_data_dir) -> list[Path]:
    """The two folders the 80-patient cross-validation and the shipped model use: the subset and its extra 20."""
    return [real_data_dir, real_data_dir.parent / "lgg_extra"]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A kaggle_3m folder of 8 generated patients (1 healthy) x 10 slices at 256x256."""
    from unet.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), patients=8, slices=10, healthy_patients=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run folder of train.py on synthetic data (about 10 CPU seconds); its model is run/model.

    3 epochs of 30 steps at 64 px find the phantoms' tumors (test patient Dice about 0.9). The tuning step is
    replaced by `FIXTURE_POSTPROCESSING`, so the saved postprocessor_config.json is non-default and metrics.json
    holds the scores of exactly that post-processing.
    """
    import train
    import unet.training
    from unet.processing import Postprocessing

    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unet.training, "tune_postprocessing", lambda *_, **__: Postprocessing(**FIXTURE_POSTPROCESSING))
        code = train.main(
            [
                "--synthetic",
                "--epochs",
                "3",
                "--steps-per-epoch",
                "30",
                "--batch-size",
                "6",
                "--lr",
                "3e-3",
                "--image-size",
                "64",
                "--width",
                "8",
                "--checkpoint-every",
                "10",
                "--out-dir",
                str(out),
            ]
        )
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
