"""Train the U-Net on LGG brain MRI slices, evaluate on held-out patients, optionally push.

    python train.py --data-dir ../shared/data/lgg_subset --out-dir runs/lgg        # train
    python train.py --out-dir runs/lgg --resume                                    # go on after a stop
    python train.py --synthetic --epochs 2 --out-dir runs/smoke                    # no dataset needed

The run folder holds ``last.pt`` (everything needed to resume, written every epoch and every
``--checkpoint-every`` steps), ``best/`` (the best validation epoch; the last one with
``--train-on-val``), ``history.csv``, ``curves.png`` and, at the end, ``model/``: the final model in
the Hub layout (config.json, model.safetensors, README.md model card, metrics.json, curves.png), ready
for ``unet.evaluate``, the app or ``--push``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from unet.card import write_model_card
from unet.data import DatasetError, LGGDataset, channel_stats, scan_dataset, split_patients, train_transforms
from unet.evaluate import evaluate_model, options_named, predict_frame, score
from unet.inference import autocast_dtype, autocast_for, pick_device
from unet.losses import BCEDiceLoss
from unet.metrics import json_safe
from unet.model import LGG_MEAN, LGG_STD, UNet, count_parameters, load_model
from unet.synthetic import make_synthetic_dataset

log = logging.getLogger("train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "lgg_subset"
PUBLISH_OPTIONS = ("push", "repo_id", "private", "revision")
# What a --resume may change, where its command line names it: the run's length, the machine, where the data lies,
# what follows the last epoch (post-processing, publishing). Everything else is fixed by the run's first start.
RUN_CONTROL_OPTIONS = ("epochs", "patience", "workers", "device", "data_dir", "no_tune", "tta", "threshold",
                       "min_component_area", "fill_holes", "largest_3d_component", *PUBLISH_OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help=f"kaggle_3m folder or its parent (default: {DEFAULT_DATA_DIR}; with --resume, the run's own)")
    data.add_argument("--synthetic", action="store_true", help="train on generated phantom slices written to OUT_DIR/synthetic")
    data.add_argument("--patients", type=int, default=None, help="use only the first N patients (quick runs)")
    data.add_argument("--val-fraction", type=float, default=0.15, help="share of patients for validation (default: %(default)s)")
    data.add_argument("--test-fraction", type=float, default=0.15, help="share of patients for the test (default: %(default)s)")
    data.add_argument("--folds", type=int, default=0,
                      help="cross-validation: the test patients are fold --fold of this many instead of --test-fraction")
    data.add_argument("--fold", type=int, default=0, help="which fold is the test, 0..FOLDS-1 (default: %(default)s)")
    data.add_argument("--train-on-val", action="store_true",
                      help="final fit: train on the training and validation patients for exactly --epochs, keep the last "
                           "epoch, and take the post-processing from --threshold, --min-component-area, --fill-holes and "
                           "--largest-3d-component (choose all of them in a run without this flag first)")
    data.add_argument("--image-size", type=int, default=256, help="training and inference size (default: %(default)s)")
    data.add_argument("--tumor-fraction", type=float, default=0.5, help="share of each batch drawn from tumor slices (default: %(default)s)")
    data.add_argument("--tumor-sampling", choices=["slice", "patient"], default="slice",
                      help="draw the tumor share by slice, or by patient first so that small tumors are drawn as often "
                           "as large ones (default: %(default)s)")
    data.add_argument("--normalization", choices=["dataset", "slice"], default="slice",
                      help="standardise with the training set's channel statistics, or each slice's own (default: %(default)s)")
    data.add_argument("--flair-only-p", type=float, default=0.2,
                      help="probability of training on a slice whose three channels are all FLAIR (default: %(default)s)")
    data.add_argument("--gamma-p", type=float, default=0.0,
                      help="probability of a random intensity gamma (0.7 to 1.5) on a training slice (default: %(default)s)")
    data.add_argument("--strong-augmentation", action="store_true",
                      help="a wider affine (scale 0.8-1.25, rotation 30 degrees) and elastic bending of a fifth of the "
                           "training slices")
    data.add_argument("--workers", type=int, default=0, help="DataLoader workers; 0 is fastest on a small CPU (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--width", type=int, default=16, help="channels of the first level (default: %(default)s)")
    model.add_argument("--depth", type=int, default=4, help="number of poolings (default: %(default)s)")
    model.add_argument("--upsampling", choices=["bilinear", "transpose"], default="transpose",
                       help="transposed convolutions, or bilinear as in the classic U-Net (default: %(default)s)")
    model.add_argument("--context-slices", type=int, default=0,
                       help="2.5D input: feed each slice with this many neighbouring slices of its patient on each side "
                            "(default: %(default)s, one slice alone)")
    model.add_argument("--context-dropout", type=float, default=0.25,
                       help="with --context-slices: probability that a training slice's neighbours are all the slice "
                            "itself, so the model also works on one uploaded slice (default: %(default)s)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=60, help="(default: %(default)s)")
    opt.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the training slices")
    opt.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (default: %(default)s)")
    opt.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay (default: %(default)s)")
    opt.add_argument("--fn-weight", type=float, default=0.5,
                     help="weight of a missed tumor pixel against a false-positive one in the overlap term of the loss: "
                          "0.5 is Dice, above it a Tversky loss that favours recall, e.g. 0.7 (default: %(default)s)")
    opt.add_argument("--ema", type=float, default=0.0,
                     help="validate, keep and ship an exponential moving average of the weights with this decay per "
                          "step, e.g. 0.999; 0 turns it off (default: %(default)s)")
    opt.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better validation Dice (default: %(default)s)")
    opt.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="auto: bf16 autocast on CUDA (fp16 before Ampere) or a CPU with bf16 units, else fp32 "
                          "(default: %(default)s)")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs/unet", help="run folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT_DIR/last.pt with the run's own split, model and recipe; only its length, "
                          "the machine, and what happens after the last epoch (post-processing, --push) may change")
    run.add_argument("--checkpoint-every", type=int, default=50, help="also checkpoint every N steps within an epoch (default: %(default)s)")
    run.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default: %(default)s)")
    run.add_argument("--seed", type=int, default=42, help="seed of the split, sampling, initialisation and augmentation (default: %(default)s)")
    run.add_argument("--no-tune", action="store_true",
                     help="use --threshold, --min-component-area, --fill-holes and --largest-3d-component instead of "
                          "choosing them on validation")
    run.add_argument("--threshold", type=float, default=0.5, help="with --no-tune or --train-on-val (default: %(default)s)")
    run.add_argument("--min-component-area", type=int, default=0,
                     help="with --no-tune or --train-on-val: drop predicted components under this many pixels, counted at "
                          "--image-size (default: %(default)s)")
    run.add_argument("--fill-holes", action="store_true",
                     help="with --no-tune or --train-on-val: fill the holes of each predicted tumor component")
    run.add_argument("--largest-3d-component", action="store_true",
                     help="with --no-tune or --train-on-val: keep only each patient's largest 3D component when its "
                          "slices are segmented together (evaluation, the app's volume tab)")
    run.add_argument("--tta", action="store_true", help="let the tuning consider flip test-time augmentation (doubles inference time)")
    hub = p.add_argument_group("hub")
    hub.add_argument("--push", action="store_true", help="publish OUT_DIR/model to the Hub at the end")
    hub.add_argument("--repo-id", help="USER/NAME on the Hub (with --push)")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument("--revision", default=None, help="Hub branch to push to (default: main)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every setting that cannot work refused before any data is read."""
    p = build_parser()
    args = p.parse_args(argv)
    a = args
    # (holds, what the setting must be); written as what is valid, so that NaN fails every check
    checks = [
        (not a.push or a.repo_id, "--push needs --repo-id USER/NAME"),
        (a.fold == 0 or a.folds, f"--fold {a.fold} needs --folds K (the number of folds)"),
        (a.folds == 0 or a.folds >= 2, f"--folds must be at least 2, not {a.folds}"),
        (a.folds == 0 or 0 <= a.fold < a.folds, f"--fold must be from 0 to {a.folds - 1}, not {a.fold}"),
        (0 < a.val_fraction < 1, f"--val-fraction must lie between 0 and 1, not {a.val_fraction}: validation "
                                 "chooses the epoch and the post-processing"),
        (0 <= a.test_fraction < 1 - a.val_fraction, f"--test-fraction must be from 0 to below 1 - --val-fraction, "
                                                     f"not {a.test_fraction}"),
        (a.folds < 2 or a.val_fraction < 1 - 1 / a.folds, f"--val-fraction must be below 1 - 1/--folds = "
                                                         f"{1 - 1 / max(a.folds, 2):.2f}, not {a.val_fraction}: each fold's "
                                                         "test patients come first"),
        (a.patients is None or a.patients >= 3, f"--patients must be at least 3 (train, validation, test), not {a.patients}"),
        (a.width >= 1, f"--width must be at least 1, not {a.width}"),
        (a.depth >= 1, f"--depth must be at least 1, not {a.depth}"),
        (a.image_size > 0 and a.image_size % 2**a.depth == 0,
         f"--image-size {a.image_size} must be a positive multiple of 2**depth = {2 ** a.depth}"),
        (a.epochs >= 1 and a.patience >= 1, "--epochs and --patience must be at least 1"),
        (a.batch_size >= 1, f"--batch-size must be at least 1, not {a.batch_size}"),
        (a.steps_per_epoch is None or a.steps_per_epoch >= 1, f"--steps-per-epoch must be at least 1, not {a.steps_per_epoch}"),
        (a.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, not {a.checkpoint_every}"),
        (a.workers >= 0, f"--workers cannot be negative, not {a.workers}"),
        (0 < a.lr < math.inf, f"--lr must be a positive number, not {a.lr}"),
        (0 <= a.weight_decay < math.inf, f"--weight-decay must be a number from 0, not {a.weight_decay}"),
        (0 <= a.warmup_epochs < math.inf, f"--warmup-epochs must be a number from 0, not {a.warmup_epochs}"),
        (0 < a.fn_weight < 1, f"--fn-weight must lie between 0 and 1, not {a.fn_weight}"),
        (0 <= a.ema < 1, f"--ema is a decay from 0 (off) to below 1, not {a.ema}"),
        (0 < a.threshold < 1, f"--threshold must lie between 0 and 1, not {a.threshold}"),
        (a.min_component_area >= 0, f"--min-component-area cannot be negative, not {a.min_component_area}"),
        (0 <= a.tumor_fraction <= 1, f"--tumor-fraction is a share of each batch, from 0 to 1, not {a.tumor_fraction}"),
        (0 <= a.flair_only_p <= 1, f"--flair-only-p is a probability, from 0 to 1, not {a.flair_only_p}"),
        (0 <= a.gamma_p <= 1, f"--gamma-p is a probability, from 0 to 1, not {a.gamma_p}"),
        (a.context_slices >= 0, f"--context-slices cannot be negative, not {a.context_slices}"),
        (0 <= a.context_dropout <= 1, f"--context-dropout is a probability, from 0 to 1, not {a.context_dropout}"),
    ]
    for holds, requirement in checks:
        if not holds:
            p.error(requirement)
    return args


def dataset_name(data_dir: str | Path) -> str:
    """The data folder by name, without the machine's path to it: ``lgg_subset/kaggle_3m`` or ``lgg_subset``."""
    path = Path(os.path.abspath(data_dir))  # not resolve(): a link is named as the user named it
    return f"{path.parent.name}/{path.name}" if path.name == "kaggle_3m" else path.name


def training_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run: every setting that differs from its default."""
    parser = build_parser()
    words = ["python", "train.py"]
    for key, value in vars(args).items():
        # where the data and the run lie on this machine changes nothing in the weights, and a path would
        # publish the trainer's directory layout on the Hub
        if key in ("resume", "out_dir", "data_dir", *PUBLISH_OPTIONS) or value == parser.get_default(key):
            continue
        words.append("--" + key.replace("_", "-"))
        if not isinstance(value, bool):
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def restore_run_settings(args: argparse.Namespace, saved: dict, named: set[str]) -> None:
    """Make a resumed run the run it was: its first command line, with the run-control options the new
    command line names (e.g. a longer ``--epochs``) taking their new values.

    Any other option the new command line names with another value is ignored, with a warning: the
    data, split, model and recipe of a run are fixed by its first start.
    """
    for key in vars(args):
        if key in ("resume", "out_dir") or key not in saved:  # runs older than a flag lack it: its default
            continue
        if key in named:
            if key in RUN_CONTROL_OPTIONS:
                continue
            if getattr(args, key) != saved[key]:
                log.warning("--resume keeps the run's --%s %s; the %s given is ignored", key.replace("_", "-"),
                            saved[key], getattr(args, key))
        setattr(args, key, saved[key])


def load_splits(args: argparse.Namespace, out_dir: Path,
                recorded: dict[str, list[str]] | None) -> tuple[dict[str, list[str]], dict[str, pd.DataFrame]]:
    """The run's patient ids and slices by split: the recorded split on resume, else a new one from the seed.

    Raises DatasetError naming the folder when the data is unreadable or lacks a patient of the split.
    """
    data_dir = make_synthetic_dataset(out_dir / "synthetic", patients=10, slices=16, size=args.image_size,
                                      healthy_patients=2, seed=args.seed) if args.synthetic else args.data_dir
    df = scan_dataset(data_dir)
    if args.patients:
        df = df[df["patient"].isin(sorted(df["patient"].unique())[: args.patients])]
    splits = recorded or split_patients(df, args.val_fraction, args.test_fraction, args.seed, args.folds, args.fold)
    missing = sorted(set().union(*splits.values()) - set(df["patient"]))
    if missing:
        raise DatasetError(f"{data_dir} lacks {len(missing)} patients of the run's split, e.g. {missing[0]}")
    frames = {name: df[df["patient"].isin(ids)].reset_index(drop=True) for name, ids in splits.items()}
    for name, frame in frames.items():
        log.info("%-5s %3d patients %5d slices (%d with tumor)", name, len(splits[name]), len(frame), int(frame["has_tumor"].sum()))
    return splits, frames


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 1% of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_indices(has_tumor: np.ndarray, tumor_fraction: float, num_samples: int, seed: int, epoch: int,
                  patients: np.ndarray | None = None) -> list[int]:
    """The epoch's slice order, a pure function of (seed, epoch) so a resume replays it.

    Tumor slices get ``tumor_fraction`` of the draws, healthy ones the rest; without this,
    two thirds of every batch would be empty masks. Given each slice's patient, the tumor draws
    are shared equally between the patients with tumor first, so a tumor seen on 5 slices is drawn
    as often as one seen on 28.
    """
    tumor_weights = np.full(len(has_tumor), tumor_fraction / max(has_tumor.sum(), 1))
    if patients is not None:
        patients = np.asarray(patients)
        tumor_patients = np.unique(patients[has_tumor])
        tumor_slices_of = pd.Series(has_tumor).groupby(patients).transform("sum").to_numpy()
        tumor_weights = tumor_fraction / (len(tumor_patients) * np.maximum(tumor_slices_of, 1))
    weights = np.where(has_tumor, tumor_weights, (1 - tumor_fraction) / max((~has_tumor).sum(), 1))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.double), num_samples, replacement=True,
                             generator=generator).tolist()


def train_step(model: UNet, images: torch.Tensor, masks: torch.Tensor, loss_fn: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: str) -> float:
    """One optimisation step on a batch: channels_last input, autocast forward, fp32 loss."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    masks = masks.to(device, non_blocking=True)
    with autocast_for(device, precision):
        logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """An exponential moving average of the weights, as `AveragedModel`'s ``multi_avg_fn``.

    The decay warms up as (1 + n) / (10 + n) after n updates: at 0.999 from the start, the random
    initialisation would still weigh a third of the average after 1,100 steps, and such a mix of
    trained and untrained weights predicts nothing.
    """
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        n = float(updates)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # BatchNorm's batch counter is a count, not a weight
                a.copy_(c)
    return update


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


def save_best(model: UNet, best_dir: Path) -> None:
    """Write the kept epoch's weights and config beside ``best_dir``, then move each file in with one rename.

    save_pretrained deletes and rewrites in place: a kill between its files would leave no weights, or
    a config without them. A run writes the same config.json every epoch, so the renames cannot mismatch.
    """
    staging = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    best_dir.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        os.replace(staging / name, best_dir / name)
    shutil.rmtree(staging)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="BCE + Dice (Tversky) loss", title="training loss")
    for column in ("val_patient_dice", "val_tumor_slice_dice"):
        ax_dice.plot(history["epoch"], history[column], marker="o", label=column)
    ax_dice.plot(history["epoch"], history["val_healthy_fp_rate"], marker=".", linestyle=":", label="val_healthy_fp_rate")
    ax_dice.set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validation_rank(metrics: dict) -> tuple[float, float]:
    """How tuning orders settings: patient Dice to 4 places, then fewer false positives on healthy slices."""
    return round(metrics["patient_dice_mean"], 4), -metrics["healthy_fp_rate"]


def tune_postprocessing(model: UNet, val_df: pd.DataFrame, consider_tta: bool = False, precision: str = "auto") -> dict:
    """Pick the post-processing by validation patient Dice: threshold, minimum component area (and flip
    TTA) for single slices first, since that is all the app's one-slice tab sees, then whether filling the
    holes of what they keep helps; then whether keeping each patient's largest 3D component on top of
    them helps whole volumes.

    Ties go to fewer false positives on healthy slices, then to the simpler setting.
    """
    best = None
    for tta in (False, True) if consider_tta else (False,):
        model.tta_flips = tta
        probs, targets = predict_frame(model, val_df, precision=precision, progress=False)
        for threshold in (0.3, 0.4, 0.5, 0.6, 0.7):
            for min_area in (0, 16, 32, 64, 128, 256):
                m = score(probs, targets, val_df, threshold, min_area, area_size=model.image_size)
                key = validation_rank(m)
                if best is None or key > best[0]:
                    best = (key, {"tta_flips": tta, "threshold": threshold, "min_component_area": min_area},
                            m, probs)
    key, chosen, m, probs = best
    post = (probs, targets, val_df, chosen["threshold"], chosen["min_component_area"])
    filled = score(*post, False, model.image_size, fill_holes=True)
    chosen["fill_holes"] = validation_rank(filled) > key
    if chosen["fill_holes"]:
        key, m = validation_rank(filled), filled
    volume = score(*post, True, model.image_size, fill_holes=chosen["fill_holes"])
    chosen["largest_3d_component"] = validation_rank(volume) > key
    model.tta_flips = False
    log.info("post-processing chosen on validation: %s (patient Dice %.4f, healthy FP %.3f; with the largest "
             "3D component %.4f, %.3f)", chosen, m["patient_dice_mean"], m["healthy_fp_rate"],
             volume["patient_dice_mean"], volume["healthy_fp_rate"])
    return chosen


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def machines_text(machines: list[dict], last_epoch: int) -> str:
    """One machine by name; a run resumed elsewhere as 'A (epochs 1-46), B (epochs 47-60)'."""
    if machines[0]["from_epoch"] > 1:  # started by a train.py that did not record machines
        machines = [{"machine": "an unrecorded machine", "from_epoch": 1}, *machines]
    if len(machines) == 1:
        return machines[0]["machine"]
    ends = [m["from_epoch"] - 1 for m in machines[1:]] + [last_epoch]
    return ", ".join(f"{m['machine']} (epochs {m['from_epoch']}-{end})" for m, end in zip(machines, ends))


def write_final_model(args: argparse.Namespace, state: dict, frames: dict[str, pd.DataFrame], device: torch.device,
                      precision_used: str, out_dir: Path) -> Path:
    """Load the kept epoch, choose its post-processing on validation, score it once on validation and test,
    and write it in the Hub layout (weights, config, metrics.json, curves, model card) to ``out_dir/model``."""
    model = load_model(str(out_dir / "best")).to(device).to(memory_format=torch.channels_last).eval()
    if args.no_tune or args.train_on_val:
        model.threshold, model.min_component_area = args.threshold, args.min_component_area
        model.fill_holes, model.largest_3d_component = args.fill_holes, args.largest_3d_component
    else:
        for key, value in tune_postprocessing(model, frames["val"], args.tta, args.precision).items():
            setattr(model, key, value)

    def scores(frame: pd.DataFrame) -> tuple[dict, dict]:
        """The model's metrics and, with the 3D step or context slices, beside them those of the masks a single
        uploaded slice gets."""
        if not len(frame):
            return {}, {}
        probs, targets = predict_frame(model, frame, precision=args.precision)  # once, for both post-processings

        def scored(p: list[np.ndarray], volume: bool) -> dict:
            return score(p, targets, frame, model.threshold, model.min_component_area, volume, model.image_size,
                         model.fill_holes)
        per_slice = {}
        if model.context_slices:  # a single uploaded slice has no neighbours either
            per_slice = scored(predict_frame(model, frame, precision=args.precision, context=False)[0], False)
        elif model.largest_3d_component:
            per_slice = scored(probs, False)
        return scored(probs, model.largest_3d_component), per_slice

    val, val_per_slice = ({}, {}) if args.train_on_val else scores(frames["val"])
    test, test_per_slice = scores(frames["test"])
    metrics = {
        "test": test,
        "test_per_slice": test_per_slice,
        "val": val,
        "val_per_slice": val_per_slice,
        "best_epoch": state["best_epoch"],
        "trained_on": ["train", "val"] if args.train_on_val else ["train"],
        "epochs_trained": state["epoch"],
        "train_hours": round(state["train_seconds"] / 3600, 3),
        "machine": machines_text(state["machines"], state["epoch"]),
        "precision": precision_used,
        "parameters": count_parameters(model),
        "splits": state["splits"],
        "data": "synthetic phantoms" if args.synthetic else dataset_name(args.data_dir),
        "command": training_command(args),
    }
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    (model_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
    shutil.copy(out_dir / "curves.png", model_dir / "curves.png")
    write_model_card(model_dir, metrics)
    if test:
        log.info("test: patient Dice %.4f (median %.4f, worst %.4f), tumor-slice Dice %.4f, healthy FP %.3f",
                 test["patient_dice_mean"], test["patient_dice_median"], test["patient_dice_min"],
                 test["tumor_slice_dice_mean"], test["healthy_fp_rate"])
    return model_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "last.pt"
    state = None
    earlier_run = [name for name in ("last.pt", "best", "model", "history.csv") if (out_dir / name).exists()]
    if not args.resume and earlier_run:
        log.error("error: %s already holds a run (%s): add --resume to go on with it, or choose another --out-dir",
                  out_dir, earlier_run[0])
        return 2
    if args.resume:
        if not checkpoint_path.is_file():
            log.error("--resume: no checkpoint at %s", checkpoint_path)
            return 2
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            log.error("error: %s is not a readable checkpoint (%s)", checkpoint_path,
                      str(error).splitlines()[0] if str(error) else type(error).__name__)
            return 2
        if not isinstance(state, dict) or not {"args", "epoch", "step_in_epoch", "splits"} <= state.keys():
            log.error("error: %s is not a checkpoint of train.py", checkpoint_path)
            return 2
        restore_run_settings(args, state["args"], options_named(build_parser(), argv))
        log.info("resuming %s at epoch %d, step %d", checkpoint_path, state["epoch"] + 1, state["step_in_epoch"])

    args.data_dir = args.data_dir or str(DEFAULT_DATA_DIR)
    torch.manual_seed(args.seed)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        log.error("error: %s", error)
        return 2
    torch.backends.cudnn.benchmark = device.type == "cuda"  # one input size: pick the fastest kernels once

    try:
        splits, frames = load_splits(args, out_dir, state["splits"] if state else None)
    except DatasetError as error:
        log.error("error: %s", error)
        return 2
    if args.train_on_val:
        # The split stays as recorded; only what the model learns from grows, and nothing is selected on it.
        frames["train"] = pd.concat([frames["train"], frames["val"]], ignore_index=True)
        log.info("--train-on-val: training on %d slices of %d patients; no validation, the last epoch is kept",
                 len(frames["train"]), frames["train"]["patient"].nunique())

    stats = {}
    if args.normalization == "dataset":  # the statistics of exactly the slices this run learns from, fixed at its start
        if state:  # runs from before this measurement trained with the constructor's defaults
            stats = state.get("stats") or {"mean": list(LGG_MEAN), "std": list(LGG_STD)}
        else:
            stats = dict(zip(("mean", "std"), channel_stats(frames["train"])))
        log.info("training-set channel statistics: mean %s, std %s", stats["mean"], stats["std"])
    model = UNet(in_channels=3 * (2 * args.context_slices + 1), context_slices=args.context_slices, width=args.width,
                 depth=args.depth, upsampling=args.upsampling, image_size=args.image_size,
                 normalization=args.normalization, **stats)
    model.to(device).to(memory_format=torch.channels_last)
    train_set = LGGDataset(frames["train"], train_transforms(args.image_size, args.flair_only_p, args.gamma_p,
                                                            args.strong_augmentation), model.mean, model.std,
                           model.normalization, args.context_slices, args.context_dropout)
    if args.steps_per_epoch is None and len(train_set) < args.batch_size:  # an epoch of no steps
        log.error("error: --batch-size %d is more than the %d training slices (or give --steps-per-epoch)",
                  args.batch_size, len(train_set))
        return 2
    steps_per_epoch = args.steps_per_epoch or len(train_set) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(args.warmup_epochs * steps_per_epoch), total_steps))
    loss_fn = BCEDiceLoss(fn_weight=args.fn_weight)
    dtype = autocast_dtype(device, args.precision)
    precision_used = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    # fp16 autocast (a GPU without bf16) needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    log.info("model: width %d, depth %d, %s upsampling, %d px, %d context slices each side, %.2f M parameters; "
             "device %s, precision %s, %d steps/epoch", args.width, args.depth, args.upsampling, args.image_size,
             args.context_slices, count_parameters(model) / 1e6, device, precision_used, steps_per_epoch)

    # The average is what gets validated, kept and shipped; the raw weights only train.
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(args.ema), use_buffers=True)
           if args.ema else None)
    if state:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved by a run without loss scaling (bf16, fp32)
            scaler.load_state_dict(state["scaler"])
    else:
        state = {"epoch": 0, "step_in_epoch": 0, "loss_sum": 0.0, "best_score": -1.0, "best_epoch": 0,
                 "bad_epochs": 0, "history": [], "train_seconds": 0.0, "splits": splits, "stats": stats,
                 "args": vars(args)}

    machine = machine_description(device)
    if not state.get("machines") or state["machines"][-1]["machine"] != machine:
        state.setdefault("machines", []).append({"machine": machine, "from_epoch": state["epoch"] + 1})

    def checkpoint() -> None:
        state.update(model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                     optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), args=vars(args))
        save_atomic(state, checkpoint_path)

    has_tumor = frames["train"]["has_tumor"].to_numpy()
    patients = frames["train"]["patient"].to_numpy()
    while state["epoch"] < args.epochs and state["bad_epochs"] < args.patience:
        epoch = state["epoch"]
        indices = epoch_indices(has_tumor, args.tumor_fraction, steps_per_epoch * args.batch_size, args.seed, epoch,
                                patients if args.tumor_sampling == "patient" else None)
        skip = state["step_in_epoch"] * args.batch_size
        # Augmentation draws from albumentations' own generator, which no global seed reaches: each sample
        # carries its seed (run seed, epoch, position), so neither the worker count nor a resume changes it.
        samples = [(indices[i], (args.seed, epoch, i)) for i in range(skip, len(indices))]
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=samples, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False)
        model.train()
        started = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", initial=state["step_in_epoch"],
                   total=steps_per_epoch, mininterval=10, file=sys.stderr)
        for images, masks in bar:
            state["loss_sum"] += train_step(model, images, masks, loss_fn, optimizer, scaler, args.precision)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            state["step_in_epoch"] += 1
            bar.set_postfix(loss=f"{state['loss_sum'] / state['step_in_epoch']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if state["step_in_epoch"] % args.checkpoint_every == 0 and state["step_in_epoch"] < steps_per_epoch:
                state["train_seconds"] += time.time() - started
                started = time.time()
                checkpoint()
        bar.close()
        state["train_seconds"] += time.time() - started

        kept = ema.module if ema is not None else model
        kept.eval()
        nan = float("nan")
        val = ({"patient_dice_mean": nan, "tumor_slice_dice_mean": nan, "slice_dice_mean": nan, "healthy_fp_rate": nan}
               if args.train_on_val else evaluate_model(kept, frames["val"], precision=args.precision, progress=False))
        row = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / max(state["step_in_epoch"], 1),
               "lr": scheduler.get_last_lr()[0], "val_patient_dice": val["patient_dice_mean"],
               "val_tumor_slice_dice": val["tumor_slice_dice_mean"], "val_slice_dice": val["slice_dice_mean"],
               "val_healthy_fp_rate": val["healthy_fp_rate"], "train_seconds": round(state["train_seconds"], 1)}
        state["history"].append(row)
        if args.train_on_val:  # nothing to select on: the last epoch is the model
            log.info("epoch %d: loss %.4f", row["epoch"], row["train_loss"])
            state.update(best_epoch=epoch + 1)
            save_best(kept, out_dir / "best")
        else:
            log.info("epoch %d: loss %.4f, val patient Dice %.4f, tumor-slice Dice %.4f, healthy FP %.3f", row["epoch"],
                     row["train_loss"], row["val_patient_dice"], row["val_tumor_slice_dice"], row["val_healthy_fp_rate"])
            if val["patient_dice_mean"] > state["best_score"]:
                state.update(best_score=val["patient_dice_mean"], best_epoch=epoch + 1, bad_epochs=0)
                save_best(kept, out_dir / "best")
            else:
                state["bad_epochs"] += 1
        history = pd.DataFrame(state["history"])
        history.to_csv(out_dir / "history.csv", index=False)
        plot_history(history, out_dir / "curves.png")
        state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
        checkpoint()

    if state["bad_epochs"] >= args.patience:
        log.info("early stop: no better validation Dice for %d epochs", args.patience)
    if not args.train_on_val:
        log.info("best validation patient Dice %.4f at epoch %d", state["best_score"], state["best_epoch"])

    model_dir = write_final_model(args, state, frames, device, precision_used, out_dir)
    log.info("model written to %s", model_dir)

    if args.push:
        from unet.push import push_model

        return push_model(model_dir, args.repo_id, private=args.private, revision=args.revision,
                          examples_from=frames["test"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # last.pt is at most --checkpoint-every steps old
        log.error("interrupted: the same command with --resume goes on from OUT_DIR/last.pt, where there is one")
        sys.exit(130)
