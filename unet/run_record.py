"""How a run describes itself in its model folder: the curves, the data by name, the command that reproduces it,
and the machines it ran on. None of it may carry a path of the training machine."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path

import pandas as pd

from unet.config import CONFIG_FILE_FIELDS, TrainConfig, option_name


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="BCE + Dice loss", title="training loss")
    for column in ("val_patient_dice", "val_tumor_slice_dice"):
        ax_dice.plot(history["epoch"], history[column], marker="o", label=column)
    ax_dice.plot(
        history["epoch"], history["val_healthy_fp_rate"], marker=".", linestyle=":", label="val_healthy_fp_rate"
    )
    ax_dice.set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dataset_name(data_dir: str | Path) -> str:
    """The data folder by name, without the machine's path to it: ``lgg_subset/kaggle_3m`` or ``lgg_subset``."""
    path = Path(os.path.abspath(data_dir))  # not resolve(): a link is named as the user named it
    return f"{path.parent.name}/{path.name}" if path.name == "kaggle_3m" else path.name


def training_command(config: TrainConfig) -> str:
    """The command line that reproduces this run's weights: every setting that differs from its default.

    Where the data lies on this machine changes nothing in the weights, and a path would publish the trainer's
    directory layout on the Hub; settings of the config file are shown as the file's content.
    """
    default = TrainConfig()
    words, in_file = ["python", "train.py"], {}
    for name, value in dataclasses.asdict(config).items():
        if name == "data_dirs" or value == getattr(default, name):
            continue
        if name in CONFIG_FILE_FIELDS:
            in_file[name] = value
            continue
        words.append(option_name(name))
        if not isinstance(value, bool):
            words.append(shlex.quote(str(value)))
    if in_file:
        return " ".join([*words, "--config", "config.json"]) + f"  # config.json: {json.dumps(in_file)}"
    return " ".join(words)


def machines_text(machines: list[dict], last_epoch: int) -> str:
    """One machine by name; a run resumed elsewhere as 'A (epochs 1-46), B (epochs 47-60)'."""
    if machines[0]["from_epoch"] > 1:  # started by a train.py that did not record machines
        machines = [{"machine": "an unrecorded machine", "from_epoch": 1}, *machines]
    if len(machines) == 1:
        return machines[0]["machine"]
    ends = [m["from_epoch"] - 1 for m in machines[1:]] + [last_epoch]
    return ", ".join(f"{m['machine']} (epochs {m['from_epoch']}-{end})" for m, end in zip(machines, ends))
