"""Training as a library: the recipe's settings, the loop, its checkpoint and resume, and the final model.

    config = TrainConfig(data_dirs=["../shared/data/lgg_subset"], epochs=60)
    model_dir = train(config, "runs/lgg")                      # runs/lgg/model: the Hub layout
    model_dir = train(config, "runs/lgg", resume=True)         # go on from runs/lgg/last.pt

A run folder holds ``last.pt`` (a `Checkpoint`: everything needed to resume, written every epoch and every
``checkpoint_every`` steps), ``best/`` (the best validation epoch as a segmenter folder), ``history.csv``,
``curves.png`` and, at the end, ``model/``: the kept epoch with the post-processing tuned on validation, its
metrics.json, curves and model card. ``train.py`` is the command line of this module.

Under ``torchrun`` (`unet.distributed`) one model trains with DistributedDataParallel: ``batch_size`` is the global
batch, each rank taking its share of every global batch of the one-process sample order; rank 0 alone reads and
writes the run folder, validates and writes the final model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from unet.card import write_model_card
from unet.checkpoint import Checkpoint, save_best
from unet.config import RUN_FILES, NonFiniteLoss, TrainConfig, TrainingError, resumed_config
from unet.data import DatasetError, LGGDataset, channel_stats, scan_dataset, split_patients, train_transforms
from unet.device import autocast_for, machine_description, pick_device, precision_name
from unet.distributed import SINGLE, Distributed
from unet.evaluation import evaluate, with_and_without_volume_step
from unet.losses import BCEDiceLoss
from unet.metrics import json_safe
from unet.model import UNet, count_parameters
from unet.processing import Postprocessing, Preprocessing
from unet.run_record import dataset_name, machines_text, plot_history, training_command
from unet.segmenter import Segmenter
from unet.synthetic import make_synthetic_dataset
from unet.tuning import tune_postprocessing

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# The parts of the loop


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 1% of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_indices(has_tumor: np.ndarray, tumor_fraction: float, num_samples: int, seed: int, epoch: int) -> list[int]:
    """The epoch's slice order, a pure function of (seed, epoch) so a resume replays it.

    Tumor slices get ``tumor_fraction`` of the draws, healthy ones the rest; without this, two thirds of every
    batch would be empty masks.
    """
    has_tumor = np.asarray(has_tumor, bool)
    weights = np.where(
        has_tumor, tumor_fraction / max(has_tumor.sum(), 1), (1 - tumor_fraction) / max((~has_tumor).sum(), 1)
    )
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.multinomial(
        torch.as_tensor(weights, dtype=torch.double), num_samples, replacement=True, generator=generator
    ).tolist()


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
) -> float:
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


def load_frames(
    config: TrainConfig, out_dir: Path, recorded: dict[str, list[str]] | None = None
) -> tuple[dict[str, list[str]], dict[str, pd.DataFrame]]:
    """The run's patient ids and slices by split: the recorded split on resume, else a new one from the seed.

    Raises DatasetError naming the folder when the data is unreadable or lacks a patient of the split.
    """
    if config.synthetic:
        data_dirs = [
            make_synthetic_dataset(
                out_dir / "synthetic",
                patients=10,
                slices=16,
                size=config.image_size,
                healthy_patients=2,
                seed=config.seed,
            )
        ]
    else:
        data_dirs = list(config.data_dirs)
    df = scan_dataset(data_dirs)
    if config.patients:
        df = df[df["patient"].isin(sorted(df["patient"].unique())[: config.patients])]
    splits = recorded or split_patients(
        df, config.val_fraction, config.test_fraction, config.seed, config.folds, config.fold
    )
    missing = sorted(set().union(*splits.values()) - set(df["patient"]))
    if missing:
        where = " + ".join(str(d) for d in data_dirs)
        raise DatasetError(f"{where} lacks {len(missing)} patients of the run's split, e.g. {missing[0]}")
    frames = {name: df[df["patient"].isin(ids)].reset_index(drop=True) for name, ids in splits.items()}
    for name, frame in frames.items():
        log.info(
            "%-5s %3d patients %5d slices (%d with tumor)",
            name,
            len(splits[name]),
            len(frame),
            int(frame["has_tumor"].sum()),
        )
    return splits, frames


# ---------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One run in ``out_dir``: started fresh, or resumed from its ``last.pt``.

    ``named`` are the settings the user set (on the command line or in a config file); on resume only the
    run-control ones among them change the run (`resumed_config`). ``distributed`` is this process's place in a
    torchrun run (`unet.distributed.start`); `SINGLE` for a plain one-process run.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        resume: bool = False,
        named: set[str] | frozenset[str] = frozenset(),
        distributed: Distributed = SINGLE,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoint_path = self.out_dir / "last.pt"
        self.distributed = distributed
        # Rank 0 alone reads the run folder, the checkpoint and the data index; the other ranks are handed what it
        # found, so they never touch the run folder (another node need not see it) and all start from one state.
        # Should rank 0 fail here, the others wait in the broadcast until torchrun stops them.
        found = self._read_run(config, resume, named) if distributed.is_main else None
        self.config, self.splits, self.frames, self.preprocessing, state = distributed.broadcast(found)
        self.device = self._device(self.config)
        torch.backends.cudnn.benchmark = self.device.type == "cuda"  # one input size: pick the fastest kernels once
        self.state = state or Checkpoint(self.config.as_dict(), self.splits, dataclasses.asdict(self.preprocessing))
        self.state.config, self.state.preprocessing = self.config.as_dict(), dataclasses.asdict(self.preprocessing)
        self._build()
        self.saved_at = None
        if state:
            self._restore(state)
            self.saved_at = (state.epoch, state.step_in_epoch)
        self._wrap()
        machine = machine_description(self.device)
        if distributed.active:
            machine += f", {distributed.world_size} processes (DDP)"
        if not self.state.machines or self.state.machines[-1]["machine"] != machine:
            self.state.machines.append({"machine": machine, "from_epoch": self.state.epoch + 1})

    def _read_run(
        self, config: TrainConfig, resume: bool, named: set[str] | frozenset[str]
    ) -> tuple[TrainConfig, dict, dict, Preprocessing, Checkpoint | None]:
        """The run's config, split, slices, preprocessing and checkpoint (None for a new run), read from the run
        folder and the data; settings that cannot work are refused before any data is read."""
        state = self._read_checkpoint(resume)
        self.config = (
            resumed_config(TrainConfig.from_dict(state.config, str(self.checkpoint_path)), config, named)
            if state
            else config
        )
        self._check_processes(self.config, resumed=state is not None)
        self._device(self.config)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.splits, self.frames = load_frames(self.config, self.out_dir, state.splits if state else None)
        self.preprocessing = self._recorded_preprocessing(state) if state else self._measure_preprocessing()
        return self.config, self.splits, self.frames, self.preprocessing, state

    def _device(self, config: TrainConfig) -> torch.device:
        try:
            if self.distributed.active:
                return self.distributed.device(config.device)
            return pick_device(config.device)
        except ValueError as error:  # its message names --device
            raise TrainingError(str(error)) from None

    def _check_processes(self, config: TrainConfig, resumed: bool) -> None:
        """The global batch must split evenly over the processes, and SyncBatchNorm needs GPUs."""
        processes = self.distributed.world_size
        if config.batch_size % processes:
            whose = "the run's global --batch-size" if resumed else "--batch-size, the global batch,"
            raise TrainingError(
                f"{whose} {config.batch_size} does not divide among {processes} processes: each takes an equal "
                f"share; {'resume with' if resumed else 'give'} a number of processes that divides it"
                + ("" if resumed else ", or another --batch-size")
            )
        if config.sync_batchnorm and processes > 1 and self._device(config).type != "cuda":
            raise TrainingError("--sync-batchnorm needs CUDA: torch's SyncBatchNorm does not run on the CPU")

    def _read_checkpoint(self, resume: bool) -> Checkpoint | None:
        earlier = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if not resume:
            if earlier:
                raise TrainingError(
                    f"{self.out_dir} already holds a run ({earlier[0]}): add --resume to go on with "
                    "it, or choose another --out-dir"
                )
            return None
        if not self.checkpoint_path.is_file():
            raise TrainingError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = Checkpoint.load(self.checkpoint_path)
        log.info("resuming %s at epoch %d, step %d", self.checkpoint_path, state.epoch + 1, state.step_in_epoch)
        return state

    def _recorded_preprocessing(self, state: Checkpoint) -> Preprocessing:
        try:
            preprocessing = Preprocessing(**state.preprocessing)
        except (TypeError, ValueError) as error:
            raise TrainingError(f"{self.checkpoint_path}: its preprocessing: {error}") from None
        if preprocessing.normalization == "dataset":  # measured at the run's start, kept whatever the data is now
            log.info(
                "training-set channel statistics: mean %s, std %s", list(preprocessing.mean), list(preprocessing.std)
            )
        return preprocessing

    def _measure_preprocessing(self) -> Preprocessing:
        """The input's preprocessing; with dataset normalisation, the statistics of exactly the slices this run
        learns from, measured once at its start."""
        if self.config.normalization != "dataset":
            return Preprocessing(image_size=self.config.image_size, normalization=self.config.normalization)
        mean, std = channel_stats(self.frames["train"])
        log.info("training-set channel statistics: mean %s, std %s", mean, std)
        return Preprocessing(image_size=self.config.image_size, normalization="dataset", mean=mean, std=std)

    def _build(self) -> None:
        """Network, data, optimiser, schedule and loss scaling of the run, as at its first step."""
        c = self.config
        torch.manual_seed(c.seed)
        self.network = UNet(width=c.width, depth=c.depth, upsampling=c.upsampling)
        if c.sync_batchnorm and self.distributed.world_size > 1:  # same parameter and buffer names: same checkpoint
            self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
        self.network.to(self.device).to(memory_format=torch.channels_last)
        self.train_set = LGGDataset(
            self.frames["train"], train_transforms(c.image_size, c.flair_only_p), self.preprocessing
        )
        if c.steps_per_epoch is None and len(self.train_set) < c.batch_size:  # an epoch of no steps
            raise TrainingError(
                f"--batch-size {c.batch_size} is more than the {len(self.train_set)} training slices "
                "(or give --steps-per-epoch)"
            )
        self.steps_per_epoch = c.steps_per_epoch or len(self.train_set) // c.batch_size
        total_steps = self.steps_per_epoch * c.epochs
        warmup_steps = int(c.warmup_epochs * self.steps_per_epoch)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
        )
        self.loss_fn = BCEDiceLoss()
        self.precision_used = precision_name(self.device, c.precision)
        # fp16 autocast (a GPU without bf16) needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision_used == "fp16")
        log.info(
            "model: width %d, depth %d, %s upsampling, %d px, %.2f M parameters; device %s, precision %s, "
            "%d steps/epoch",
            c.width,
            c.depth,
            c.upsampling,
            c.image_size,
            count_parameters(self.network) / 1e6,
            self.device,
            self.precision_used,
            self.steps_per_epoch,
        )
        processes = self.distributed.world_size
        if self.distributed.active:
            log.info(
                "DDP: %d processes, batch %d per device, global batch %d, %s batch norm",
                processes,
                c.batch_size // processes,
                c.batch_size,
                "synchronised" if c.sync_batchnorm and processes > 1 else "per-device",
            )
        elif c.sync_batchnorm:
            log.warning("--sync-batchnorm does nothing in a one-process run (it applies under torchrun)")

    def _wrap(self) -> None:
        """``self.trained``: what the training steps call; under torchrun, DDP around the network, which averages
        the gradients over the ranks. Checkpoints, validation and ``best/`` use ``self.network`` itself."""
        self.trained = self.network
        if self.distributed.active:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.network, device_ids=device_ids)

    def _restore(self, state: Checkpoint) -> None:
        try:
            self.network.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            if state.scaler:  # empty when saved by a run without loss scaling (bf16, fp32)
                self.scaler.load_state_dict(state.scaler)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TrainingError(f"{self.checkpoint_path} does not fit the run it records ({detail})") from None

    def save_checkpoint(self) -> None:
        self.state.model = self.network.state_dict()
        self.state.optimizer = self.optimizer.state_dict()
        self.state.scheduler = self.scheduler.state_dict()
        self.state.scaler = self.scaler.state_dict()
        self.state.save(self.checkpoint_path)
        self.saved_at = (self.state.epoch, self.state.step_in_epoch)

    def saved_text(self) -> str:
        """Where the run stands in ``last.pt``, for a message."""
        if self.saved_at is None:
            return "no checkpoint was written yet"
        epochs, steps = self.saved_at
        return f"{self.checkpoint_path} holds the run after epoch {epochs}" + (f" and {steps} steps" if steps else "")

    def segmenter(self, postprocessing: Postprocessing | None = None) -> Segmenter:
        """The live network with the run's preprocessing: what validation scores and ``best/`` keeps."""
        return Segmenter(self.network, self.preprocessing, postprocessing, precision=self.config.precision)

    def fit(self) -> None:
        """Train until the last epoch or until patience runs out, checkpointing as it goes (rank 0 alone validates
        and writes; the other ranks wait for its verdict)."""
        c, s, main = self.config, self.state, self.distributed.is_main
        while s.epoch < c.epochs and s.bad_epochs < c.patience:
            self._train_epoch()
            if main:
                self._validate_epoch()
            s.best_score, s.best_epoch, s.bad_epochs = self.distributed.broadcast(
                (s.best_score, s.best_epoch, s.bad_epochs)
            )
            s.epoch, s.step_in_epoch, s.loss_sum = s.epoch + 1, 0, 0.0
            if main:
                self.save_checkpoint()
        if s.bad_epochs >= c.patience:
            log.info("early stop: no better validation Dice for %d epochs", c.patience)
        log.info("best validation patient Dice %.4f at epoch %d", s.best_score, s.best_epoch)

    def _train_epoch(self) -> None:
        c, s = self.config, self.state
        indices = epoch_indices(
            self.frames["train"]["has_tumor"].to_numpy(),
            c.tumor_fraction,
            self.steps_per_epoch * c.batch_size,
            c.seed,
            s.epoch,
        )
        # Augmentation draws from albumentations' own generator, which no global seed reaches: each sample
        # carries its seed (run seed, epoch, position), so neither the worker count nor a resume changes it.
        # Under torchrun rank r takes the r-th share of each global batch: the ranks together see the
        # one-process order, sample for sample, and a resume with another number of processes replays it.
        share = c.batch_size // self.distributed.world_size
        first = self.distributed.rank * share
        samples = [
            (indices[i], (c.seed, s.epoch, i))
            for step in range(s.step_in_epoch, self.steps_per_epoch)
            for i in range(step * c.batch_size + first, step * c.batch_size + first + share)
        ]
        loader = DataLoader(
            self.train_set,
            batch_size=share,
            sampler=samples,
            drop_last=True,
            num_workers=c.workers,
            pin_memory=self.device.type == "cuda",
        )
        self.trained.train()
        started = time.time()
        bar = tqdm(
            loader,
            desc=f"epoch {s.epoch + 1}/{c.epochs}",
            unit="batch",
            initial=s.step_in_epoch,
            total=self.steps_per_epoch,
            mininterval=10,
            file=sys.stderr,
            disable=not self.distributed.is_main,  # one bar for the run
        )
        for images, masks in bar:
            loss = train_step(self.trained, images, masks, self.loss_fn, self.optimizer, self.scaler, c.precision)
            loss = self.distributed.mean(loss)  # every rank sees the same value: all stop together on NaN
            if not math.isfinite(loss):  # the weights are spoilt now: nothing of this step is saved
                bar.close()
                raise NonFiniteLoss(
                    f"loss {loss} at epoch {s.epoch + 1}, step {s.step_in_epoch + 1}: the run stops; "
                    f"{self.saved_text()} (a lower --lr may help)"
                )
            self.scheduler.step()
            s.loss_sum += loss
            s.step_in_epoch += 1
            bar.set_postfix(loss=f"{s.loss_sum / s.step_in_epoch:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if s.step_in_epoch % c.checkpoint_every == 0 and s.step_in_epoch < self.steps_per_epoch:
                s.train_seconds += time.time() - started
                started = time.time()
                if self.distributed.is_main:
                    self.save_checkpoint()
        bar.close()
        s.train_seconds += time.time() - started

    def _validate_epoch(self) -> None:
        """Score the epoch on validation with the default post-processing; keep it in ``best/`` if it is the best."""
        s = self.state
        val = evaluate(self.segmenter(), self.frames["val"], progress=False)
        row = {
            "epoch": s.epoch + 1,
            "train_loss": s.loss_sum / max(s.step_in_epoch, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "val_patient_dice": val["patient_dice_mean"],
            "val_tumor_slice_dice": val["tumor_slice_dice_mean"],
            "val_slice_dice": val["slice_dice_mean"],
            "val_healthy_fp_rate": val["healthy_fp_rate"],
            "train_seconds": round(s.train_seconds, 1),
        }
        s.history.append(row)
        log.info(
            "epoch %d: loss %.4f, val patient Dice %.4f, tumor-slice Dice %.4f, healthy FP %.3f",
            row["epoch"],
            row["train_loss"],
            row["val_patient_dice"],
            row["val_tumor_slice_dice"],
            row["val_healthy_fp_rate"],
        )
        if val["patient_dice_mean"] > s.best_score:
            s.best_score, s.best_epoch, s.bad_epochs = val["patient_dice_mean"], s.epoch + 1, 0
            save_best(self.segmenter(), self.out_dir / "best")
        else:
            s.bad_epochs += 1
        history = pd.DataFrame(s.history)
        history.to_csv(self.out_dir / "history.csv", index=False)
        plot_history(history, self.out_dir / "curves.png")

    def write_final_model(self) -> Path:
        """Load the kept epoch, choose its post-processing on validation, score it once on validation and test,
        and write it in the Hub layout (weights, configs, metrics.json, curves, model card) to ``out_dir/model``."""
        kept = Segmenter.from_pretrained(self.out_dir / "best", device=self.device, precision=self.config.precision)
        kept = kept.with_postprocessing(tune_postprocessing(kept, self.frames["val"], self.config.consider_tta))
        val, val_per_slice = with_and_without_volume_step(kept, self.frames["val"])
        test, test_per_slice = with_and_without_volume_step(kept, self.frames["test"])
        s, c = self.state, self.config
        metrics = {
            "test": test,
            "test_per_slice": test_per_slice,
            "val": val,
            "val_per_slice": val_per_slice,
            "best_epoch": s.best_epoch,
            "trained_on": ["train"],
            "epochs_trained": s.epoch,
            "train_hours": round(s.train_seconds / 3600, 3),
            "machine": machines_text(s.machines, s.epoch),
            "precision": self.precision_used,
            "parameters": count_parameters(kept.network),
            "splits": s.splits,
            "data": "synthetic phantoms" if c.synthetic else " + ".join(dataset_name(d) for d in c.data_dirs),
            "command": training_command(c),
        }
        model_dir = self.out_dir / "model"
        kept.save_pretrained(model_dir)
        (model_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
        shutil.copy(self.out_dir / "curves.png", model_dir / "curves.png")
        write_model_card(model_dir, metrics)
        if test:
            log.info(
                "test: patient Dice %.4f (median %.4f, worst %.4f), tumor-slice Dice %.4f, healthy FP %.3f",
                test["patient_dice_mean"],
                test["patient_dice_median"],
                test["patient_dice_min"],
                test["tumor_slice_dice_mean"],
                test["healthy_fp_rate"],
            )
        log.info("model written to %s", model_dir)
        return model_dir


def train(
    config: TrainConfig, out_dir: str | Path, resume: bool = False, named: set[str] | frozenset[str] = frozenset()
) -> Path:
    """Run (or resume) training in ``out_dir`` and write the final model; its folder is returned.

    Raises TrainingError (a setting, checkpoint or run folder; `NonFiniteLoss` when the loss diverges),
    `unet.data.DatasetError` or `unet.reader.ReadError` (the data), each with a one-line message.
    """
    trainer = Trainer(config, out_dir, resume, named)
    trainer.fit()
    return trainer.write_final_model()
