"""Where a model comes from: a local folder or a Hub repo id."""
from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import snapshot_download

log = logging.getLogger(__name__)

MODEL_FILES = ["config.json", "model.safetensors", "README.md", "metrics.json"]


def resolve_model_dir(source: str, revision: str | None = None) -> Path:
    """A local folder as it is, else a Hub snapshot (safetensors and config only)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"no model.safetensors in model folder {path}")
        return path
    return Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=MODEL_FILES))
