"""Evaluate a saved model on a kaggle_3m folder: the metrics users compare with papers.

    python -m unet.evaluate --data-dir ../shared/data/lgg_subset --model models/brain-mri-unet --split test --json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
import pandas as pd
from tqdm import tqdm

from unet.data import DatasetError, read_image, read_mask, scan_dataset, split_patients
from unet.inference import postprocess, predict_proba, prepare_for_inference
from unet.metrics import pixel_counts, summarize
from unet.model import UNet, load_model

log = logging.getLogger(__name__)


def predict_frame(model: UNet, df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                  progress: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Probabilities and reference masks for every slice of a `scan_dataset` frame."""
    probs, targets = [], []
    rows = range(0, len(df), batch_size)
    for start in tqdm(rows, desc="evaluate", unit="batch", disable=not progress, leave=False):
        part = df.iloc[start:start + batch_size]
        probs += predict_proba(model, [read_image(p) for p in part["image_path"]], batch_size, precision)
        targets += [read_mask(p) for p in part["mask_path"]]
    return probs, targets


def score(probs: list[np.ndarray], targets: list[np.ndarray], patients: list[str],
          threshold: float, min_component_area: int) -> dict:
    preds = np.stack([postprocess(p, threshold, min_component_area) for p in probs])
    return summarize(pixel_counts(preds, np.stack(targets)), patients)


def evaluate_model(model: UNet, df: pd.DataFrame, batch_size: int = 16, precision: str = "auto",
                   progress: bool = True) -> dict:
    """The metrics of `unet.metrics.summarize` for a model on the slices of ``df``."""
    probs, targets = predict_frame(model, df, batch_size, precision, progress)
    return score(probs, targets, list(df["patient"]), model.threshold, model.min_component_area)


def select_patients(df: pd.DataFrame, split: str, seed: int, val_fraction: float, test_fraction: float,
                    patients: list[str] | None = None) -> pd.DataFrame:
    if patients:
        unknown = sorted(set(patients) - set(df["patient"]))
        if unknown:
            raise DatasetError(f"patients not in the data folder: {', '.join(unknown)}")
        return df[df["patient"].isin(patients)]
    if split == "all":
        return df
    return df[df["patient"].isin(split_patients(df, val_fraction, test_fraction, seed)[split])]


def format_table(metrics: dict) -> str:
    keys = ["patient_dice_mean", "patient_dice_median", "patient_dice_min", "tumor_slice_dice_mean",
            "slice_dice_mean", "slice_iou_mean", "healthy_fp_rate"]
    lines = [f"{k:<24}{metrics[k]:.4f}" for k in keys]
    lines.append(f"{'worst_patient':<24}{metrics['worst_patient']}")
    lines.append(f"{'patients / slices':<24}{metrics['patients']} / {metrics['slices']} ({metrics['tumor_slices']} with tumor)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a U-Net on a kaggle_3m folder.")
    parser.add_argument("--data-dir", required=True, help="the kaggle_3m folder, or a folder that contains it")
    parser.add_argument("--model", required=True, help="a model folder (config.json + model.safetensors) or a Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (with a repo id)")
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                        help="which patients: all, or a split made as train.py makes it (default: all)")
    parser.add_argument("--patients", nargs="+", help="evaluate exactly these patient ids (overrides --split)")
    parser.add_argument("--seed", type=int, default=42, help="split seed, as given to train.py")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the CPU or GPU supports it, else fp32")
    parser.add_argument("--json", action="store_true", help="end the output with one JSON line of all metrics")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = prepare_for_inference(load_model(args.model, revision=args.revision))
        df = select_patients(scan_dataset(args.data_dir), args.split, args.seed, args.val_fraction,
                             args.test_fraction, args.patients)
    except (DatasetError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = evaluate_model(model, df, args.batch_size, args.precision)
    print(format_table(metrics))
    if args.json:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
