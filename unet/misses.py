"""Which patients a model largely misses, and what they share: size, FLAIR contrast, institution, 3D components.

    python -m unet.misses --data-dir ../shared/data/lgg_extra --model models/brain-mri-unet
    python -m unet.misses --data-dir DIR [DIR ...] --cv runs/cv80-*/model --below 0.6

Each patient is profiled from one prediction: Dice with the model's whole post-processing and slice by slice,
the tumor's size, its FLAIR contrast (mean FLAIR inside the reference over the mean of the rest of the brain),
and the 3D components of the slice masks with their voxels, their voxels on the reference and their summed
probability, the figures the 3D step ranks them by. The table lists the patients under ``--below``; the lines
under it compare them with the rest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from unet.data import DatasetError, institution, scan_dataset, volume_rows
from unet.evaluate import OneLineParser, one_line_error
from unet.evaluation import fold_test_rows, recorded_metrics, select_patients
from unet.hub import resolve_model_dir
from unet.metrics import dice
from unet.processing import label_volume_components
from unet.reader import read_image, read_mask
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

BRAIN_LEVEL = 8  # FLAIR values above this are brain, below it background


def flair_contrast(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean FLAIR inside the reference over the mean FLAIR of the rest of the brain; NaN without tumor."""
    flair = images[..., 1]
    rest = (flair > BRAIN_LEVEL) & ~reference
    if not reference.any() or not rest.any():
        return float("nan")
    return float(flair[reference].mean() / flair[rest].mean())


def components(slice_masks: np.ndarray, probs: np.ndarray, reference: np.ndarray, top: int = 4) -> list[tuple]:
    """The 3D components of a patient's slice masks, largest first: (voxels, voxels on the reference, summed
    probability), labelled as the 3D step labels them."""
    labels, count = label_volume_components(slice_masks)
    if not count:
        return []
    index = np.arange(1, count + 1)
    voxels = ndimage.sum_labels(np.ones_like(labels), labels, index)
    on_reference = ndimage.sum_labels(reference, labels, index)
    mass = ndimage.sum_labels(probs, labels, index)
    found = sorted(zip(voxels.astype(int), on_reference.astype(int), mass.round(1)), reverse=True)
    return found[:top]


def patient_profile(segmenter: Segmenter, patient: str, rows: pd.DataFrame) -> dict:
    """One patient's row of the table (``rows``: its slices, in slice order)."""
    images = np.stack([read_image(path, str(path)) for path in rows["image_path"]])
    reference = np.stack([read_mask(path, str(path)) for path in rows["mask_path"]])
    probs = np.stack(segmenter.probabilities(list(images)))
    slice_masks = np.stack([segmenter.slice_mask(p) for p in probs])
    masks = segmenter.postprocessing.volume_masks(slice_masks, probs)
    return {
        "patient": patient,
        "institution": institution(patient),
        "dice": float(dice((masks & reference).sum(), masks.sum(), reference.sum())),
        "dice_per_slice": float(dice((slice_masks & reference).sum(), slice_masks.sum(), reference.sum())),
        "reference_px": int(reference.sum()),
        "predicted_px": int(masks.sum()),
        "flair_contrast": flair_contrast(images, reference),
        "components": components(slice_masks, probs, reference),
    }


def profiles(segmenters: Sequence[Segmenter], parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Every patient of each part, profiled with its segmenter."""
    found = []
    for segmenter, part in zip(segmenters, parts):
        for patient, rows in tqdm(volume_rows(part).items(), desc="patients", unit="patient", leave=False):
            found.append(patient_profile(segmenter, patient, part.iloc[rows]))
    return pd.DataFrame(found).sort_values("dice").reset_index(drop=True)


def rank_correlations(table: pd.DataFrame) -> dict[str, float]:
    """Spearman correlation of each patient's Dice with its FLAIR contrast and its tumor size, over the patients
    with tumor (``patients``): whether the misses are the tail of a trend or a few outliers."""
    ranked = table[["dice", "flair_contrast", "reference_px"]].dropna()
    rho = {
        name: float(ranked["dice"].corr(ranked[name], method="spearman")) for name in ("flair_contrast", "reference_px")
    }
    return rho | {"patients": len(ranked)}


def report(table: pd.DataFrame, below: float) -> str:
    """The missed patients as a Markdown table, then how they compare with the rest."""
    missed = table[table["dice"] < below]
    lines = [
        "| patient | Dice with / without 3D step | reference px | predicted px | FLAIR contrast | "
        "3D components, voxels (on the reference, summed probability) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for _, row in missed.iterrows():
        found = "; ".join(f"{v} ({r} on the reference, sum {m:g})" for v, r, m in row["components"]) or "none"
        lines.append(
            f"| {row['patient']} | {row['dice']:.3f} / {row['dice_per_slice']:.3f} | {row['reference_px']:,} | "
            f"{row['predicted_px']:,} | {row['flair_contrast']:.2f} | {found} |"
        )
    rest = table[table["dice"] >= below]
    lines += ["", f"{len(missed)} of {len(table)} patients under Dice {below}; medians, missed against the rest:"]
    lines.append(f"  reference px: {missed['reference_px'].median():,.0f} against {rest['reference_px'].median():,.0f}")
    lines.append(
        f"  FLAIR contrast: {missed['flair_contrast'].median():.2f} against {rest['flair_contrast'].median():.2f}"
    )
    rho = rank_correlations(table)
    lines.append(
        f"  Spearman correlation with Dice over the {rho['patients']} with tumor: "
        f"FLAIR contrast {rho['flair_contrast']:+.2f}, reference px {rho['reference_px']:+.2f}"
    )
    by_site = table.groupby("institution")["dice"].agg(lambda d: f"{(d < below).sum()} of {len(d)}")
    lines.append("  missed by institution: " + ", ".join(f"{site} {text}" for site, text in by_site.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="Profile the patients a model largely misses.")
    parser.add_argument("--data-dir", required=True, nargs="+", metavar="DIR", help="kaggle_3m folders, as one set")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a model folder or Hub repo id: all the folder's patients, or --split")
    target.add_argument("--cv", nargs="+", metavar="MODEL_DIR", help="fold models, each on its own test patients")
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all", help="with --model")
    parser.add_argument("--below", type=float, default=0.6, help="a miss: patient Dice under this (default 0.6)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        df = scan_dataset(args.data_dir)
        if args.cv:
            parts = fold_test_rows(args.cv, df)
            segmenters = [Segmenter.from_pretrained(model_dir) for model_dir in args.cv]
        else:
            model_dir = resolve_model_dir(args.model)
            parts = [select_patients(df, recorded_metrics(model_dir), args.split)]
            segmenters = [Segmenter.from_pretrained(model_dir)]
    except (DatasetError, OSError, ValueError) as error:
        log.error("error: %s", one_line_error(error))
        return 2
    print(report(profiles(segmenters, parts), args.below))
    return 0


if __name__ == "__main__":
    sys.exit(main())
