"""Evaluate a saved model on a kaggle_3m folder: the metrics users compare with papers.

    python -m unet.evaluate --data-dir ../shared/data/lgg_subset --model models/brain-mri-unet --split test --json
    python -m unet.evaluate --data-dir ../shared/data/lgg_subset --cv runs/cv-*/model     # pool k-fold runs
    ... --largest-3d-component off      # exactly the masks of the app's one-slice tab
    ... --largest-3d-component probability   # the 3D step, its component chosen by summed probability
    ... --cv runs/cv-*/model --record models/brain-mri-unet   # the estimate into a model's folder and card

Post-processing is the model's own (postprocessor_config.json), whole-volume step included, unless overridden.
``--split`` takes the patients train.py recorded in the model's metrics.json, so a model is tested on its own test
patients whatever folder it is pointed at; only a model without that record has its split worked out again from
``--seed`` and the fractions. The work is `unet.evaluation`'s; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from unet.card import CROSS_VALIDATION_FILE, METRICS, write_model_card
from unet.data import DatasetError, scan_dataset
from unet.device import pick_device
from unet.evaluation import evaluate, evaluate_folds, recorded_metrics, select_patients
from unet.hub import redact, resolve_model_dir
from unet.metrics import json_safe
from unet.processing import VOLUME_COMPONENT_MEASURES
from unet.run_record import dataset_name
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

# How a split is worked out again for a model that did not record one; a recorded split makes them moot.
SPLIT_RECIPE_OPTIONS = ("seed", "folds", "fold", "val_fraction", "test_fraction")
SPLIT_OPTIONS = ("split", "patients", *SPLIT_RECIPE_OPTIONS)
SWITCH = {"config": None, "on": True, "off": False}  # --fill-holes
# --largest-3d-component: each choice as the post-processing settings it overrides
VOLUME_STEP = {"config": {}, "on": {"largest_3d_component": True}, "off": {"largest_3d_component": False}} | {
    measure: {"largest_3d_component": True, "largest_3d_component_by": measure} for measure in VOLUME_COMPONENT_MEASURES
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (``error: ...``) and exit status 2, like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def format_table(metrics: dict) -> str:
    lines = [f"{key:<24}{metrics[key]:.4f}" for key, _, _ in METRICS]
    low, high = metrics["patient_dice_ci95"]
    lines.insert(1, f"{'patient_dice_ci95':<24}{low:.4f} to {high:.4f}")
    lines.append(f"{'worst_patient':<24}{metrics['worst_patient']}")
    lines.append(f"{'volume_step':<24}{metrics.get('volume_step', 'off')}")
    patients = f"{metrics['patients']} / {metrics['slices']} ({metrics['tumor_slices']} with tumor)"
    lines.append(f"{'patients / slices':<24}{patients}")
    if metrics.get("folds"):
        lines += ["", "fold  patients  mean    by slice  median  worst   healthy FP  worst patient"]
        lines += [
            f"{k:<6}{f['patients']:<10}{f['patient_dice_mean']:<8.4f}{f['patient_dice_mean_per_slice']:<10.4f}"
            f"{f['patient_dice_median']:<8.4f}"
            f"{f['patient_dice_min']:<8.4f}{f['healthy_fp_rate']:<12.3f}{f['worst_patient']}"
            for k, f in enumerate(metrics["folds"])
        ]
    return "\n".join(lines)


def options_named(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options a command line names, even where it gives their default value (train.py shares it)."""
    argv = sys.argv[1:] if argv is None else argv
    unset = object()  # argparse leaves alone a setting the namespace already holds, unless the line names it
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args(argv))})
    return {dest for dest, value in vars(parser.parse_args(argv, namespace=namespace)).items() if value is not unset}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="Evaluate a U-Net on a kaggle_3m folder.")
    parser.add_argument(
        "--data-dir",
        required=True,
        nargs="+",
        metavar="DIR",
        help="the kaggle_3m folder, or a folder that contains it; several are one dataset",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a model folder (config.json + model.safetensors) or a Hub repo id")
    target.add_argument(
        "--cv",
        nargs="+",
        metavar="MODEL_DIR",
        help="the model folders of k-fold runs (train.py --folds K --fold k): each is evaluated on its "
        "own test patients and the folds are pooled",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (with a repo id)")
    parser.add_argument(
        "--split",
        choices=["all", "train", "val", "test"],
        default="all",
        help="which patients: all, or a split of the model as recorded in its metrics.json (default: all)",
    )
    parser.add_argument("--patients", nargs="+", help="evaluate exactly these patient ids (overrides --split)")
    recipe = "for a model without a recorded split: train.py's"
    parser.add_argument("--seed", type=int, default=42, help=f"{recipe} --seed (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=0, help=f"{recipe} --folds")
    parser.add_argument("--fold", type=int, default=0, help=f"{recipe} --fold")
    parser.add_argument("--val-fraction", type=float, default=0.15, help=f"{recipe} --val-fraction")
    parser.add_argument("--test-fraction", type=float, default=0.15, help=f"{recipe} --test-fraction")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on a CPU with bf16 units or a GPU (fp16 before Ampere), else fp32 (default: %(default)s)",
    )
    parser.add_argument(
        "--largest-3d-component",
        choices=list(VOLUME_STEP),
        default="config",
        help="keep only each patient's largest 3D connected component (whole-volume post-processing, "
        "as in Buda et al.'s reference code): as the model's postprocessor_config.json says "
        "(default), force it on (measured as the config says) or off, or on measured by voxels or by summed "
        "probability; off gives exactly the masks of the app's one-slice tab",
    )
    parser.add_argument(
        "--fill-holes",
        choices=list(SWITCH),
        default="config",
        help="fill the holes of each predicted tumor component: as the model's "
        "postprocessor_config.json says (default), or force it on or off",
    )
    parser.add_argument("--json", action="store_true", help="end the output with one JSON line of all metrics")
    parser.add_argument(
        "--record",
        metavar="MODEL_DIR",
        help="with --cv: write the pooled result to MODEL_DIR/cross_validation.json and rewrite the folder's model "
        "card, which then reports it (the estimate of the recipe the model was trained with)",
    )
    return parser


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace, named: set[str]) -> None:
    """Combinations argparse cannot see: refused in one line before any work."""
    if args.cv and (given := [n for n in (*SPLIT_OPTIONS, "revision") if n in named]):
        parser.error(
            f"--cv tests each fold's model on the test patients it recorded: "
            f"--{given[0].replace('_', '-')} does not apply"
        )
    if args.record and not args.cv:
        parser.error("--record writes a cross-validation: it needs --cv")
    if args.fold and not args.folds:
        parser.error(f"--fold {args.fold} needs --folds K (the number of folds)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, not {args.batch_size}")


def run(args: argparse.Namespace, named: set[str]) -> dict:
    """The metrics the command line asks for; the library's errors pass through."""
    override = dict(VOLUME_STEP[args.largest_3d_component])
    if SWITCH[args.fill_holes] is not None:
        override["fill_holes"] = SWITCH[args.fill_holes]
    options = {"device": pick_device(args.device), "precision": args.precision, "batch_size": args.batch_size}
    if args.cv:
        return evaluate_folds(args.cv, scan_dataset(args.data_dir), override, **options)
    model_dir = resolve_model_dir(args.model, revision=args.revision)
    segmenter = Segmenter.from_pretrained(model_dir, **options).with_postprocessing(**override)
    recorded = recorded_metrics(model_dir)
    if not args.patients and args.split != "all":
        if recorded.get("splits"):
            for name in (n for n in SPLIT_RECIPE_OPTIONS if n in named):
                log.warning("--%s ignored: the model recorded its split", name.replace("_", "-"))
        else:
            log.info("no split recorded with the model: working it out from --seed %d", args.seed)
    recipe = {name: getattr(args, name) for name in SPLIT_RECIPE_OPTIONS}
    df = select_patients(scan_dataset(args.data_dir), recorded, args.split, args.patients or (), recipe)
    return evaluate(segmenter, df)


def one_line_error(error: Exception) -> str:
    """An error's first line, redacted: a Hub error carries the server's words, a model error the cache's path,
    and neither may show a token."""
    message = redact(str(error)).strip()
    return message.splitlines()[0] if message else type(error).__name__


def run_name(model_dir: str) -> str:
    """A fold's model folder by name, without the machine's path to it: its path from here when it lies here
    (a fold kept in the repository, as ``models/cv80/fold0``), else its run folder for train.py's ``model``."""
    path = Path(os.path.abspath(model_dir))
    if path.is_relative_to(Path.cwd()):
        return path.relative_to(Path.cwd()).as_posix()
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name


def record_cross_validation(model_dir: str, metrics: dict, args: argparse.Namespace) -> Path:
    """``model_dir/cross_validation.json`` (the pooled metrics, the folds by name with the commands that trained
    them, and the command that pooled them) and the folder's card rewritten to report it."""
    folds = [
        fold | {"model": run_name(fold["model"]), "command": recorded_metrics(fold["model"]).get("command", "?")}
        for fold in metrics["folds"]
    ]
    words = ["python", "-m", "unet.evaluate", "--data-dir", *map(dataset_name, args.data_dir), "--cv"]
    words += [run_name(fold) for fold in args.cv]
    words += [
        f"--{name.replace('_', '-')} {value}"
        for name, value in (("largest_3d_component", args.largest_3d_component), ("fill_holes", args.fill_holes))
        if value != "config"
    ]
    record = metrics | {
        "folds": folds,
        "command": " ".join(words),
        "data": " + ".join(map(dataset_name, args.data_dir)),
    }
    path = Path(model_dir) / CROSS_VALIDATION_FILE
    path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False))
    write_model_card(model_dir, recorded_metrics(model_dir))
    log.info("cross-validation recorded in %s and its model card", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    named = options_named(parser, argv)
    check_options(parser, args, named)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        metrics = run(args, named)
    except (DatasetError, OSError, ValueError) as error:
        log.error("error: %s", one_line_error(error))
        return 2
    print(format_table(metrics))
    if args.record:
        record_cross_validation(args.record, metrics, args)
    if args.json:
        print(json.dumps(json_safe(metrics), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
