"""The model the app serves: a folder, a Hub repo id, or the model shipped in the repo.

A repo id is pulled through `unet.hub`; when the Hub cannot be reached and nothing is cached, the shipped model
is served instead, with a notice the page shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from unet.hub import HubUnavailable, is_repo_id, pull_model, resolve_model_dir
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

# The model trained by this project, in the Hub layout, used when no other model is named.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "brain-mri-unet"


@dataclass
class ServingModel:
    """A loaded segmenter and where it came from, for the app to show."""

    segmenter: Segmenter
    model_dir: Path
    description: str  # e.g. "user/brain-mri-unet @ main (a1b2c3d)" or "shipped model brain-mri-unet"
    notice: str | None = None  # e.g. "offline: ...; using the cached copy of user/name"

    @property
    def examples_dir(self) -> Path | None:
        folder = self.model_dir / "examples"
        return folder if folder.is_dir() else None


def load_for_serving(source: str | None = None, revision: str | None = None, **options: object) -> ServingModel:
    """``source`` (folder or repo id), else ``MODEL_ID``, else the shipped model; ``options`` go to the
    `Segmenter` (batch_size, precision).

    ``revision`` defaults to ``MODEL_REVISION``. When the Hub cannot be reached and nothing is cached, the shipped
    model is served and ``notice`` says so; a missing repo or a refused token is an error, not a silent fallback.
    """
    source = source or os.environ.get("MODEL_ID") or None
    revision = revision or os.environ.get("MODEL_REVISION") or None
    if not source:
        return _shipped(None, options)
    if Path(source).expanduser().is_dir() or not is_repo_id(source):
        model_dir = resolve_model_dir(source)
        return ServingModel(Segmenter.from_pretrained(model_dir, **options), model_dir, f"local model {model_dir}")
    try:
        model_dir, notice = pull_model(source, revision)
    except HubUnavailable as error:
        if not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
            raise
        notice = f"{error}: serving the shipped model {SHIPPED_MODEL_DIR.name} instead"
        log.warning(notice)
        return _shipped(notice, options)
    description = f"{source} @ {revision or 'main'} ({model_dir.name[:7]})"
    return ServingModel(Segmenter.from_pretrained(model_dir, **options), model_dir, description, notice)


def _shipped(notice: str | None, options: dict) -> ServingModel:
    segmenter = Segmenter.from_pretrained(SHIPPED_MODEL_DIR, **options)
    return ServingModel(segmenter, SHIPPED_MODEL_DIR, f"shipped model {SHIPPED_MODEL_DIR.name}", notice)
