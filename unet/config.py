"""The training recipe's settings: one frozen record with one home for its defaults, checked in one place.

`train.py` fills a `TrainConfig` from its flags and an optional config file; a resumed run takes its saved config,
with the run-control settings (its length, the machine) that the user named taking their new values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg_subset"
# What a resume may change: the run's length and the machine, including where the data lies on it. Everything
# else (data, split, model, recipe) is fixed by the run's first start.
# sync_batchnorm is the machine's too: a run may resume with another number of processes.
RUN_CONTROL_FIELDS = ("epochs", "patience", "workers", "device", "data_dirs", "sync_batchnorm")
# Settings only an experiment changes: train.py takes them from a --config file, not as flags.
CONFIG_FILE_FIELDS = (
    "weight_decay",
    "warmup_epochs",
    "tumor_fraction",
    "flair_only_p",
    "normalization",
    "consider_tta",
)
RUN_FILES = ("last.pt", "best", "model", "history.csv")


class TrainingError(ValueError):
    """A setting, data folder or checkpoint that a run cannot use: the message is one line."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite: the run stops, ``last.pt`` keeps the last good state."""


def option_name(name: str) -> str:
    """How train.py names a setting: ``--image-size`` for a flag, the key itself for a config-file setting."""
    if name in CONFIG_FILE_FIELDS:
        return name
    return "--data-dir" if name == "data_dirs" else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: one home for its defaults. Invalid values raise `TrainingError` naming the option."""

    data_dirs: tuple[str, ...] = (str(DEFAULT_DATA_DIR),)  # kaggle_3m folders, read as one set
    synthetic: bool = False  # generated phantoms, written to OUT_DIR/synthetic
    patients: int | None = None  # the first N patients only (quick runs)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    folds: int = 0  # cross-validation: the test patients are fold `fold` of this many
    fold: int = 0
    image_size: int = 256
    width: int = 16
    depth: int = 4
    upsampling: str = "transpose"
    epochs: int = 60
    steps_per_epoch: int | None = None  # default: one pass over the training slices
    batch_size: int = 8  # the global batch: under torchrun each of N processes takes batch_size / N
    lr: float = 1e-3  # AdamW's peak
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay
    patience: int = 20  # epochs without a better validation patient Dice before stopping
    tumor_fraction: float = 0.5  # share of the draws that are tumor slices
    flair_only_p: float = 0.2
    normalization: str = "slice"
    precision: str = "auto"
    device: str = "auto"
    workers: int = 0
    seed: int = 42
    checkpoint_every: int = 50  # steps
    sync_batchnorm: bool = False  # under torchrun on GPUs: batch-norm statistics over the global batch
    consider_tta: bool = False  # let tuning try flip test-time augmentation

    def __post_init__(self) -> None:
        dirs = [self.data_dirs] if isinstance(self.data_dirs, (str, Path)) else list(self.data_dirs)
        object.__setattr__(self, "data_dirs", tuple(str(d) for d in dirs))
        for holds, requirement in self._checks():
            if not holds:
                raise TrainingError(requirement)

    def _checks(self) -> list[tuple[bool, str]]:
        """(holds, what the setting must be); written as what is valid, so that NaN fails every check."""
        c, o = self, option_name
        return [
            (len(c.data_dirs) >= 1, "--data-dir needs at least one folder"),
            (c.fold == 0 or c.folds, f"--fold {c.fold} needs --folds K (the number of folds)"),
            (c.folds == 0 or c.folds >= 2, f"--folds must be at least 2, not {c.folds}"),
            (c.folds == 0 or 0 <= c.fold < c.folds, f"--fold must be from 0 to {c.folds - 1}, not {c.fold}"),
            (
                0 < c.val_fraction < 1,
                f"--val-fraction must lie between 0 and 1, not {c.val_fraction}: validation "
                "chooses the epoch and the post-processing",
            ),
            (
                0 <= c.test_fraction < 1 - c.val_fraction,
                f"--test-fraction must be from 0 to below 1 - --val-fraction, not {c.test_fraction}",
            ),
            (
                c.folds < 2 or c.val_fraction < 1 - 1 / c.folds,
                f"--val-fraction must be below 1 - 1/--folds = {1 - 1 / max(c.folds, 2):.2f}, not {c.val_fraction}: "
                "each fold's test patients come first",
            ),
            (
                c.patients is None or c.patients >= 3,
                f"--patients must be at least 3 (train, validation, test), not {c.patients}",
            ),
            (c.width >= 1, f"--width must be at least 1, not {c.width}"),
            (c.depth >= 1, f"--depth must be at least 1, not {c.depth}"),
            (
                c.image_size > 0 and c.image_size % 2**c.depth == 0,
                f"--image-size {c.image_size} must be a positive multiple of 2**depth = {2**c.depth}",
            ),
            (
                c.upsampling in ("bilinear", "transpose"),
                f"--upsampling must be bilinear or transpose, not {c.upsampling}",
            ),
            (c.epochs >= 1 and c.patience >= 1, "--epochs and --patience must be at least 1"),
            (c.batch_size >= 1, f"--batch-size must be at least 1, not {c.batch_size}"),
            (
                c.steps_per_epoch is None or c.steps_per_epoch >= 1,
                f"--steps-per-epoch must be at least 1, not {c.steps_per_epoch}",
            ),
            (c.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, not {c.checkpoint_every}"),
            (c.workers >= 0, f"--workers cannot be negative, not {c.workers}"),
            (0 < c.lr < math.inf, f"--lr must be a positive number, not {c.lr}"),
            (c.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16, not {c.precision}"),
            (0 <= c.weight_decay < math.inf, f"{o('weight_decay')} must be a number from 0, not {c.weight_decay}"),
            (0 <= c.warmup_epochs < math.inf, f"{o('warmup_epochs')} must be a number from 0, not {c.warmup_epochs}"),
            (
                0 <= c.tumor_fraction <= 1,
                f"{o('tumor_fraction')} is a share of each batch, from 0 to 1, not {c.tumor_fraction}",
            ),
            (0 <= c.flair_only_p <= 1, f"{o('flair_only_p')} is a probability, from 0 to 1, not {c.flair_only_p}"),
            (
                c.normalization in ("slice", "dataset"),
                f"{o('normalization')} must be slice or dataset, not {c.normalization}",
            ),
        ]

    @classmethod
    def from_dict(cls, settings: dict, source: str = "settings") -> TrainConfig:
        """A config from a dict (a config file, a checkpoint's record); an unknown key is an error naming it."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TrainingError(f"{source}: unknown setting {unknown[0]!r}; the settings are {', '.join(known)}")
        try:
            return cls(**settings)
        except TypeError as error:  # e.g. a string where a number belongs
            raise TrainingError(f"{source}: {error}") from None

    def as_dict(self) -> dict:
        """Plain values only, as a checkpoint stores them (`torch.load(weights_only=True)` reads them back)."""
        return {**dataclasses.asdict(self), "data_dirs": list(self.data_dirs)}


def resumed_config(saved: TrainConfig, given: TrainConfig, named: set[str] | frozenset[str]) -> TrainConfig:
    """The config of a resumed run: the saved one, with the run-control settings the user ``named`` (set on the
    command line or in a config file) taking their new values. Any other named setting that differs is ignored,
    with a warning: the data, split, model and recipe of a run are fixed by its first start."""
    changes = {}
    for name in sorted(named):
        new, old = getattr(given, name), getattr(saved, name)
        if name in RUN_CONTROL_FIELDS:
            changes[name] = new
        elif new != old:
            log.warning(
                "--resume keeps the run's %s %s; the %s given is ignored", option_name(name), _shown(old), _shown(new)
            )
    return dataclasses.replace(saved, **changes)


def _shown(value: object) -> str:
    return " ".join(value) if isinstance(value, tuple) else str(value)
