"""Evaluate a saved model on a kaggle_3m folder: the metrics users compare with papers.

    python -m unet.evaluate --data-dir ../shared/data/lgg_subset --model models/brain-mri-unet --split test --json
    python -m unet.evaluate --data-dir ../shared/data/lgg_subset --cv runs/cv-*/model     # pool k-fold runs
    ... --largest-3d-component off --context off   # exactly the masks of the app's one-slice tab

Post-processing is the model's own (config.json), whole-volume steps included, unless overridden.
``--split`` takes the patients train.py recorded in the model's metrics.json, so a model is tested on
its own test patients whatever folder it is pointed at; only a model without that record has its
split worked out again from ``--seed`` and the fractions.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from unet.card import METRICS
from unet.data import DatasetError, read_image, read_mask, scan_dataset, split_patients, volume_rows
from unet.hub import resolve_model_dir
from unet.inference import (keep_largest_volume_component, pick_device, postprocess, predict_proba,
                            prepare_for_inference)
from unet.metrics import json_safe, pixel_counts, summarize
from unet.model import UNet, load_model

log = logging.getLogger(__name__)

# How a split is worked out again for a model that did not record one; a recorded split makes them moot.
SPLIT_RECIPE_OPTIONS = ("seed", "folds", "fold", "val_fraction", "test_fraction")
SPLIT_OPTIONS = ("split", "patients", *SPLIT_RECIPE_OPTIONS)


def predict_frame(model: UNet, df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                  progress: bool = True, context: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Probabilities and reference masks for every slice of a `scan_dataset` frame, in its row order.

    A context model gets each patient's slices as one volume, so every slice goes in with its
    neighbours; without ``context``, each slice alone, as the app's one-slice tab gets it.
    """
    volume = bool(context and model.context_slices)
    if volume:
        parts = list(volume_rows(df).values())
    else:
        parts = [np.arange(start, min(start + batch_size, len(df))) for start in range(0, len(df), batch_size)]
    probs, targets = [None] * len(df), [None] * len(df)
    for rows in tqdm(parts, desc="evaluate", unit="patient" if volume else "batch", disable=not progress, leave=False):
        part = df.iloc[rows]
        images = [read_image(p) for p in part["image_path"]]
        probs_of_part = predict_proba(model, images, batch_size, precision, volume)
        for row, prob, path in zip(rows, probs_of_part, part["mask_path"]):
            probs[row], targets[row] = prob, read_mask(path)
    return probs, targets


def mask_counts(probs: list[np.ndarray], targets: list[np.ndarray], threshold: float,
                min_component_area: int, volumes: pd.DataFrame | None = None, area_size: int | None = None,
                fill_holes: bool = False) -> np.ndarray:
    """Per-slice `pixel_counts` of the masks that a threshold and post-processing make of ``probs``.

    With ``volumes`` (the slices' `scan_dataset` rows, for their patient and slice number), each
    patient's masks are then cut to the largest 3D component, `keep_largest_volume_component`.
    """
    preds = np.stack([postprocess(p, threshold, min_component_area, area_size, fill_holes) for p in probs])
    if volumes is not None:
        for rows in volume_rows(volumes).values():
            preds[rows] = keep_largest_volume_component(preds[rows])
    return pixel_counts(preds, np.stack(targets))


def score(probs: list[np.ndarray], targets: list[np.ndarray], df: pd.DataFrame, threshold: float,
          min_component_area: int, largest_3d_component: bool = False, area_size: int | None = None,
          fill_holes: bool = False) -> dict:
    """`unet.metrics.summarize` of the masks one post-processing setting makes of ``probs`` (rows of ``df``)."""
    counts = mask_counts(probs, targets, threshold, min_component_area, df if largest_3d_component else None, area_size,
                         fill_holes)
    return summarize(counts, list(df["patient"])) | {"largest_3d_component": largest_3d_component}


def volume_step(model: UNet, largest_3d_component: bool | None) -> bool:
    """Whether to keep the largest 3D component: as given, or as the model's config says (None)."""
    return model.largest_3d_component if largest_3d_component is None else largest_3d_component


def predict_counts(model: UNet, df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                   progress: bool = True, largest_3d_component: bool | None = None, context: bool = True) -> np.ndarray:
    """Per-slice `pixel_counts` of the model's masks on ``df``, post-processed as its config says.

    ``largest_3d_component`` overrides the config's whole-volume step (None: as the config says);
    ``context`` as for `predict_frame`.
    """
    probs, targets = predict_frame(model, df, batch_size, precision, progress, context)
    volume = volume_step(model, largest_3d_component)
    return mask_counts(probs, targets, model.threshold, model.min_component_area, df if volume else None,
                       model.image_size, model.fill_holes)


def evaluate_model(model: UNet, df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                   progress: bool = True, largest_3d_component: bool | None = None, context: bool = True) -> dict:
    """The metrics of `unet.metrics.summarize` for a model on the slices of ``df``."""
    probs, targets = predict_frame(model, df, batch_size, precision, progress, context)
    return score(probs, targets, df, model.threshold, model.min_component_area,
                 volume_step(model, largest_3d_component), model.image_size, model.fill_holes)


def recorded_metrics(model_dir: str | Path) -> dict:
    """The model folder's metrics.json as train.py wrote it (split, training set, scores); {} if it has none."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        metrics = None
    if not isinstance(metrics, dict):
        raise DatasetError(f"{path} is not a metrics.json written by train.py")
    return metrics


def trained_patients(metrics: dict) -> set[str]:
    """The patients a model learned from: its train split, and its validation split after --train-on-val."""
    splits = metrics.get("splits") or {}
    return set().union(*(splits.get(name, []) for name in metrics.get("trained_on", ["train"])))


def load_for_evaluation(model_dir: str, device: str | torch.device = "cpu", fill_holes: bool | None = None) -> UNet:
    """A saved model ready for inference, its hole filling overridden where given (None: as its config says)."""
    model = prepare_for_inference(load_model(model_dir, device=device))
    if fill_holes is not None:
        model.fill_holes = fill_holes
    return model


def evaluate_folds(model_dirs: list[str], df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                   largest_3d_component: bool | None = None, device: str | torch.device = "cpu",
                   fill_holes: bool | None = None, context: bool = True) -> dict:
    """Cross-validation: each fold's model on its own test patients, pooled into one set of metrics.
    ``largest_3d_component`` and ``fill_holes`` override each fold's config where given; ``context``
    as for `predict_frame`.

    The slices' pixel counts are pooled before summarising, so every metric is exactly what one
    evaluation over all the tested patients would give.
    """
    tests, tested = [], set()
    for model_dir in model_dirs:  # check every fold before evaluating any
        test = (recorded_metrics(model_dir).get("splits") or {}).get("test")
        if not test:
            raise DatasetError(f"no test split recorded in {Path(model_dir) / 'metrics.json'}: "
                               "--cv takes model folders written by train.py")
        if tested & set(test):
            raise DatasetError(f"{model_dir} tests {sorted(tested & set(test))[0]}, which another fold tests too")
        tested |= set(test)
        tests.append(patient_rows(df, test))
    counts, patients, volume = [], [], set()
    for model_dir, part in zip(model_dirs, tests):
        model = load_for_evaluation(model_dir, device, fill_holes)
        counts.append(predict_counts(model, part, batch_size, precision, largest_3d_component=largest_3d_component,
                                     context=context))
        patients += list(part["patient"])
        volume.add(volume_step(model, largest_3d_component))
    log.info("%d folds tested %d of the folder's %d patients", len(model_dirs), len(tested), df["patient"].nunique())
    metrics = summarize(np.concatenate(counts), patients)
    metrics["largest_3d_component"] = volume.pop() if len(volume) == 1 else "per fold config"
    return metrics


def patient_rows(df: pd.DataFrame, patients: Collection[str]) -> pd.DataFrame:
    """The slices of exactly these patients; an id the folder lacks is an error, not an empty score."""
    unknown = sorted(set(patients) - set(df["patient"]))
    if unknown:
        raise DatasetError(f"patients not in the data folder: {', '.join(unknown)}")
    return df[df["patient"].isin(patients)]


def model_patients(df: pd.DataFrame, recorded: dict, args: argparse.Namespace,
                   named: Collection[str] = ()) -> pd.DataFrame:
    """The slices of the patients the command line asks for, with the split the model recorded when it has one.

    Recomputing a split from a seed gives other patients on another folder (the full 110-patient dataset
    instead of the subset a model was trained on), so the record wins; any patient the model learned
    from is flagged, since its score is not a held-out one.
    """
    splits = recorded.get("splits") or {}
    if args.patients:
        part = patient_rows(df, args.patients)
    elif args.split == "all":
        part = df
    elif splits:
        if not splits.get(args.split):
            raise DatasetError(f"the model's recorded {args.split} split is empty")
        log.info("%s split as recorded in the model's metrics.json: %d patients", args.split, len(splits[args.split]))
        for name in (n for n in SPLIT_RECIPE_OPTIONS if n in named):
            log.warning("--%s ignored: the model recorded its split", name.replace("_", "-"))
        part = patient_rows(df, splits[args.split])
    else:
        log.info("no split recorded with the model: working it out from --seed %d", args.seed)
        ids = split_patients(df, args.val_fraction, args.test_fraction, args.seed, args.folds, args.fold)[args.split]
        part = df[df["patient"].isin(ids)]
    seen = sorted(trained_patients(recorded) & set(part["patient"]))
    if seen and (args.patients or args.split != "train"):
        log.warning("%d of the %d patients evaluated trained this model (e.g. %s): not a held-out score",
                    len(seen), part["patient"].nunique(), seen[0])
    return part


def format_table(metrics: dict) -> str:
    lines = [f"{key:<24}{metrics[key]:.4f}" for key, _, _ in METRICS]
    low, high = metrics["patient_dice_ci95"]
    lines.insert(1, f"{'patient_dice_ci95':<24}{low:.4f} to {high:.4f}")
    lines.append(f"{'worst_patient':<24}{metrics['worst_patient']}")
    lines.append(f"{'largest_3d_component':<24}{metrics.get('largest_3d_component', False)}")
    lines.append(f"{'patients / slices':<24}{metrics['patients']} / {metrics['slices']} ({metrics['tumor_slices']} with tumor)")
    return "\n".join(lines)


def options_named(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options a command line names, even where it gives their default value (train.py shares it)."""
    argv = sys.argv[1:] if argv is None else argv
    unset = object()  # argparse leaves alone a setting the namespace already holds, unless the line names it
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args(argv))})
    return {dest for dest, value in vars(parser.parse_args(argv, namespace=namespace)).items() if value is not unset}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a U-Net on a kaggle_3m folder.")
    parser.add_argument("--data-dir", required=True, help="the kaggle_3m folder, or a folder that contains it")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a model folder (config.json + model.safetensors) or a Hub repo id")
    target.add_argument("--cv", nargs="+", metavar="MODEL_DIR",
                        help="the model folders of k-fold runs (train.py --folds K --fold k): each is evaluated on its "
                             "own test patients and the folds are pooled")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (with a repo id)")
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                        help="which patients: all, or a split of the model as recorded in its metrics.json "
                             "(default: all)")
    parser.add_argument("--patients", nargs="+", help="evaluate exactly these patient ids (overrides --split)")
    parser.add_argument("--seed", type=int, default=42,
                        help="for a model without a recorded split: the split seed given to train.py (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=0, help="for a model without a recorded split: train.py's --folds")
    parser.add_argument("--fold", type=int, default=0, help="for a model without a recorded split: train.py's --fold")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="for a model without a recorded split")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="for a model without a recorded split")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a CPU with bf16 units or a GPU (fp16 before Ampere), else fp32 "
                             "(default: %(default)s)")
    parser.add_argument("--largest-3d-component", choices=["config", "on", "off"], default="config",
                        help="keep only each patient's largest 3D connected component (whole-volume post-processing, "
                             "as in Buda et al.'s reference code): as the model's config.json says (default), or "
                             "force it on or off; off (with --context off) gives exactly the masks of the app's "
                             "one-slice tab")
    parser.add_argument("--fill-holes", choices=["config", "on", "off"], default="config",
                        help="fill the holes of each predicted tumor component: as the model's config.json says "
                             "(default), or force it on or off")
    parser.add_argument("--context", choices=["config", "off"], default="config",
                        help="a model with context slices (config.json) sees each slice with its neighbours in the "
                             "patient's volume (default), or off: each slice alone, as the app's one-slice tab "
                             "gives it")
    parser.add_argument("--json", action="store_true", help="end the output with one JSON line of all metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    named = options_named(parser, argv)
    if args.cv and (given := [n for n in (*SPLIT_OPTIONS, "revision") if n in named]):
        parser.error(f"--cv tests each fold's model on the test patients it recorded: "
                     f"--{given[0].replace('_', '-')} does not apply")
    if args.fold and not args.folds:
        parser.error(f"--fold {args.fold} needs --folds K (the number of folds)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, not {args.batch_size}")
    volume = {"config": None, "on": True, "off": False}[args.largest_3d_component]
    fill_holes = {"config": None, "on": True, "off": False}[args.fill_holes]
    context = args.context == "config"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = pick_device(args.device)
        if args.cv:
            metrics = evaluate_folds(args.cv, scan_dataset(args.data_dir), args.batch_size, args.precision, volume,
                                     device, fill_holes, context)
        else:
            model_dir = resolve_model_dir(args.model, revision=args.revision)
            model = load_for_evaluation(str(model_dir), device, fill_holes)
            df = model_patients(scan_dataset(args.data_dir), recorded_metrics(model_dir), args, named)
            metrics = evaluate_model(model, df, args.batch_size, args.precision, largest_3d_component=volume,
                                     context=context)
    except (DatasetError, OSError, ValueError) as error:
        log.error("error: %s", error)
        return 2
    print(format_table(metrics))
    if args.json:
        print(json.dumps(json_safe(metrics), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
