"""Train the U-Net on LGG brain MRI slices, evaluate on held-out patients, optionally push to the Hub.

    python train.py --data-dir ../shared/data/lgg_subset --out-dir runs/lgg        # train
    python train.py --out-dir runs/lgg --resume                                    # go on after a stop
    python train.py --synthetic --epochs 2 --out-dir runs/smoke                    # no dataset needed
    torchrun --nproc_per_node 4 train.py --data-dir DATA --batch-size 32 --out-dir runs/ddp   # 4 GPUs, one model

The run folder holds last.pt (everything needed to resume), best/ (the best validation epoch), history.csv,
curves.png and, at the end, model/: the final model in the Hub layout, ready for `python -m unet.evaluate`,
the app or --push. The training itself is `unet.training`; this is its command line.

Under torchrun (also with --nnodes/--rdzv-endpoint) the processes train one model with DistributedDataParallel,
one process a device: --batch-size is the global batch, shared equally among them, so a run gives what one process
with the same --batch-size would (up to batch-norm statistics) and may resume with another number of processes.
Rank 0 alone validates, checkpoints and writes the model; the out-dir and data must be at the same paths on every
node.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from unet import distributed as ddp
from unet.config import CONFIG_FILE_FIELDS, NonFiniteLoss, TrainConfig, TrainingError
from unet.data import DatasetError
from unet.reader import ReadError
from unet.training import Trainer

log = logging.getLogger("train")

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_options(p)
    add_run_options(p)
    return p


def setting(group: argparse._ArgumentGroup, flag: str, help: str, **kwargs: object) -> None:
    """A flag of a `TrainConfig` setting. It defaults to None, not to the recipe's value (shown in the help), so
    that a resume can tell the settings given from those left out."""
    name = flag[2:].replace("-", "_")
    default = getattr(DEFAULTS, name if name != "data_dir" else "data_dirs")
    shown = " ".join(default) if isinstance(default, tuple) else default
    if isinstance(default, (int, float, str)):
        kwargs.setdefault("type", type(default))
    note = "" if default is None else f" (default: {shown})"
    group.add_argument(flag, default=None, help=help + note, **kwargs)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """Data, model and optimisation: what the weights depend on."""
    data = p.add_argument_group("data")
    setting(
        data,
        "--data-dir",
        "one or more kaggle_3m folders (or their parents), read as one set; with --resume, the run's own",
        nargs="+",
        dest="data_dirs",
        metavar="DIR",
    )
    data.add_argument(
        "--synthetic",
        action="store_true",
        default=None,
        help="train on generated phantom slices written to OUT_DIR/synthetic",
    )
    setting(data, "--patients", "use only the first N patients (quick runs)", type=int)
    setting(data, "--val-fraction", "share of patients for validation")
    setting(data, "--test-fraction", "share of patients for the test")
    setting(data, "--folds", "cross-validation: the test patients are fold --fold of this many, not --test-fraction")
    setting(data, "--fold", "which fold is the test, 0..FOLDS-1")
    setting(data, "--image-size", "training and inference size")
    setting(data, "--workers", "DataLoader workers; 0 is fastest on a small CPU")
    model = p.add_argument_group("model")
    setting(model, "--width", "channels of the first level")
    setting(model, "--depth", "number of poolings")
    setting(
        model,
        "--upsampling",
        "transposed convolutions, or bilinear as in the classic U-Net",
        choices=["bilinear", "transpose"],
    )
    opt = p.add_argument_group("optimisation")
    setting(opt, "--epochs", "epochs to train")
    setting(opt, "--steps-per-epoch", "steps of an epoch (default: one pass over the training slices)", type=int)
    setting(opt, "--batch-size", "slices per step; under torchrun the global batch, which must divide by the processes")
    setting(opt, "--lr", "peak learning rate of AdamW")
    setting(opt, "--patience", "stop after this many epochs without a better validation Dice")
    setting(
        opt,
        "--precision",
        "auto: bf16 autocast on CUDA (fp16 before Ampere) or a CPU with bf16 units, else fp32",
        choices=["auto", "fp32", "bf16"],
    )
    opt.add_argument(
        "--sync-batchnorm",
        action="store_true",
        default=None,
        help="under torchrun on GPUs: batch-norm statistics over the global batch (SyncBatchNorm) instead of each "
        "device's share; worth it when the per-device batch is small (under 8 or so); a resume may change it",
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The config file, the run folder, the machine, and publishing."""
    run = p.add_argument_group("run")
    run.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="a JSON or YAML file of settings, for those only an experiment changes: "
        f"{', '.join(CONFIG_FILE_FIELDS)} (their defaults are the recipe's; see "
        "unet/training.py TrainConfig). It may hold any other setting too; a flag given wins",
    )
    run.add_argument("--out-dir", default="runs/unet", help="run folder (default: %(default)s)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/last.pt with the run's own split, model and recipe; only --epochs, "
        "--patience, --workers, --device, --data-dir, --sync-batchnorm and the number of torchrun processes "
        "may change",
    )
    setting(run, "--checkpoint-every", "also checkpoint every N steps within an epoch")
    setting(run, "--device", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps; under torchrun: auto, cuda, cpu")
    setting(run, "--seed", "seed of the split, sampling, initialisation and augmentation")
    hub = p.add_argument_group("hub")
    hub.add_argument("--push", action="store_true", help="publish OUT_DIR/model to the Hub at the end")
    hub.add_argument("--repo-id", help="USER/NAME on the Hub (with --push)")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument("--revision", default=None, help="Hub branch to push to (default: main)")


def read_config_file(path: str) -> dict:
    """The settings of a JSON or YAML file (by its suffix), or TrainingError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        settings = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"--config {path}: cannot read it ({detail})") from None
    if not isinstance(settings, dict):
        raise TrainingError(f"--config {path}: holds a {type(settings).__name__}, not settings")
    return settings


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """The run's config (defaults, then the config file, then the flags given) and the names of the settings
    given, which a resume needs (a default left out is not a setting asked for)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = read_config_file(args.config) if args.config else {}
    flags = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    config = TrainConfig.from_dict({**settings, **flags}, f"--config {args.config}" if args.config else "settings")
    return config, set(settings) | set(flags)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    here = ddp.start()  # SINGLE unless started by torchrun
    configure_logging(here)
    try:
        return run(args, here)
    finally:
        ddp.stop()


def configure_logging(here: ddp.Distributed) -> None:
    """One log for the run: rank 0 says everything, the other ranks only their warnings and errors."""
    if not here.active:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        return
    level = logging.INFO if here.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {here.rank}] %(message)s", datefmt="%H:%M:%S")


def fail(here: ddp.Distributed, error: Exception, code: int, every_rank_alike: bool) -> int:
    """Log ``error`` in one line and hand it to torchrun; an error that every rank meets alike (a setting, a
    diverged loss, which all ranks share) is said by rank 0 alone."""
    if here.is_main or not every_rank_alike:
        log.error("error: %s", error)
        ddp.record_failure(f"[rank {here.rank}] error: {error}")
    return code


def run(args: argparse.Namespace, here: ddp.Distributed) -> int:
    if args.push and not args.repo_id:
        return fail(here, TrainingError("--push needs --repo-id USER/NAME"), 2, every_rank_alike=True)
    try:
        config, named = config_from_args(args)
    except TrainingError as error:
        return fail(here, error, 2, every_rank_alike=True)
    try:
        trainer = Trainer(config, args.out_dir, resume=args.resume, named=named, distributed=here)
        trainer.fit()
        if not here.is_main:  # rank 0 alone tunes, tests, writes the model and pushes; torchrun waits for it
            return 0
        model_dir = trainer.write_final_model()
    except NonFiniteLoss as error:
        return fail(here, error, 1, every_rank_alike=True)
    except (TrainingError, DatasetError, ReadError) as error:
        return fail(here, error, 2, every_rank_alike=False)
    if args.push:
        from unet.evaluation import held_out_split, recorded_metrics
        from unet.push import push_model

        examples = trainer.frames[held_out_split(recorded_metrics(model_dir))]
        return push_model(model_dir, args.repo_id, private=args.private, revision=args.revision, examples_from=examples)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # last.pt is at most --checkpoint-every steps old
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the Ctrl-C: one says it
            log.error("interrupted: the same command with --resume goes on from OUT_DIR/last.pt, where there is one")
        sys.exit(130)
