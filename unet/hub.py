"""Where a model comes from: a local folder, a Hub repo id, or the model shipped in the repo.

(Interface stub: the Hub work of issue 4 fills in the caching and offline fallbacks.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

log = logging.getLogger(__name__)

# The model trained by this project, in the Hub layout, used when no other model is named.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "brain-mri-unet"

# What a model repo may hold: weights (safetensors only: no pickle from the network), config,
# card, metrics, curves and example slices (examples/<stem>.png with examples/<stem>_mask.png).
MODEL_FILES = ["config.json", "model.safetensors", "README.md", "metrics.json", "curves.png", "examples/*"]


def resolve_model_dir(source: str, revision: str | None = None) -> Path:
    """A local folder as it is, else a Hub snapshot (safetensors and config only)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"no model.safetensors in model folder {path}")
        return path
    return Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=MODEL_FILES))


@dataclass
class ServingModel:
    """A loaded model and where it came from, for the app to show."""

    model: "UNet"  # noqa: F821
    model_dir: Path
    description: str  # e.g. "user/brain-mri-unet @ main (a1b2c3d)" or "shipped model models/brain-mri-unet"
    notice: str | None = None  # e.g. "offline: using the cached copy of user/name"

    @property
    def examples_dir(self) -> Path | None:
        folder = self.model_dir / "examples"
        return folder if folder.is_dir() else None


def load_for_serving(source: str | None = None, revision: str | None = None) -> ServingModel:
    """The model the app serves: ``source`` (folder or repo id), else the shipped model."""
    from unet.model import load_model

    if not source:
        return ServingModel(load_model(str(SHIPPED_MODEL_DIR)), SHIPPED_MODEL_DIR, f"shipped model {SHIPPED_MODEL_DIR.name}")
    model_dir = resolve_model_dir(source, revision)
    return ServingModel(load_model(str(model_dir)), model_dir, source + (f" @ {revision}" if revision else ""))
