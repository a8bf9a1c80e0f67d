"""What a run writes to resume and to keep: ``last.pt`` (a typed `Checkpoint`, loaded with the weights-only
unpickler, so a planted file runs no code) and ``best/``, each written so that a kill mid-save loses nothing."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unet.config import TrainingError
from unet.segmenter import Segmenter


@dataclass
class Checkpoint:
    """``last.pt``: a run's state, plain tensors and values only, so loading it runs no code."""

    config: dict
    splits: dict[str, list[str]]
    preprocessing: dict  # `Preprocessing` fields: the dataset statistics are measured once, at the run's start
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps of the next epoch already taken
    loss_sum: float = 0.0  # over those steps
    best_score: float = -1.0  # best validation patient Dice so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one: the patience count
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    machines: list[dict] = field(default_factory=list)  # {"machine", "from_epoch"}
    model: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        save_atomic({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read ``path`` with the weights-only unpickler; TrainingError in one line naming it otherwise."""
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # a global or a call: refused before anything runs
            raise TrainingError(
                f"{path} is not a checkpoint of train.py: it holds objects other than tensors "
                "and plain values, and is not loaded"
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TrainingError(f"{path} is not a readable checkpoint ({detail})") from None
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if not isinstance(raw, dict) or name not in raw]
        if missing:
            raise TrainingError(f"{path} is not a checkpoint of train.py (it lacks {missing[0]!r})")
        return cls(**{name: raw[name] for name in names})


def save_atomic(obj: dict, path: Path) -> None:
    """Write, flush to disk, then rename, so a kill or a power cut during the save never leaves a torn checkpoint."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # torch's zip writer, cut short by Ctrl-C, fails again as it closes: report the interrupt, not its echo
        if isinstance(error, RuntimeError) and isinstance(error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    os.replace(tmp, path)


def save_best(segmenter: Segmenter, best_dir: Path) -> None:
    """Write the kept epoch's segmenter beside ``best_dir``, then move each file in with one rename.

    save_pretrained deletes and rewrites in place: a kill between its files would leave no weights, or a config
    without them. A run writes the same configs every epoch, so the renames cannot mismatch.
    """
    staging = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    segmenter.save_pretrained(staging)
    best_dir.mkdir(exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, best_dir / path.name)
    shutil.rmtree(staging)
