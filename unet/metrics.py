"""Segmentation metrics, computed in one place so train, evaluate and benchmarks agree.

Everything derives from three pixel counts per slice (intersection, predicted, reference),
so the metrics themselves need no masks once those are counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def pixel_counts(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, H, W) binary masks -> (N, 3) int64: intersection, predicted, reference pixels."""
    pred = pred.astype(bool).reshape(len(pred), -1)
    target = target.astype(bool).reshape(len(target), -1)
    return np.stack([(pred & target).sum(1), pred.sum(1), target.sum(1)], axis=1).astype(np.int64)


def dice(intersection: np.ndarray, predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """2|P&T| / (|P|+|T|), and 1 where both are empty (the classic convention)."""
    denominator = predicted + reference
    return np.where(denominator == 0, 1.0, 2 * intersection / np.maximum(denominator, 1))


def iou(intersection: np.ndarray, predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    union = predicted + reference - intersection
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the mean: how far the mean of this few patients could move
    with other patients like them. Seeded, so a rerun prints the same interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return [float("nan"), float("nan")]
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(1)
    tail = (1 - confidence) / 2 * 100
    return [round(float(v), 4) for v in np.percentile(means, [tail, 100 - tail])]


def summarize(counts: np.ndarray, patients: Sequence[str]) -> dict:
    """All the metrics from per-slice `pixel_counts` and each slice's patient id.

    - slice Dice: mean over all slices (empty vs empty counts as 1);
    - patient Dice: each patient's slices pooled as one volume (Buda et al. report its mean), with a
      95% bootstrap interval of the mean over patients;
    - tumor-slice Dice: mean over slices whose reference has tumor;
    - healthy FP rate: share of tumor-free slices where any pixel is predicted.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    if len(counts) != len(patients):
        raise ValueError(f"{len(counts)} slices of counts but {len(patients)} patient ids")
    inter, pred, ref = counts.T
    slice_dice = dice(inter, pred, ref)
    tumor = ref > 0
    healthy = ~tumor
    per_patient = pd.DataFrame({"patient": list(patients), "i": inter, "p": pred, "r": ref}).groupby("patient").sum()
    patient_dice = pd.Series(
        dice(per_patient["i"].to_numpy(), per_patient["p"].to_numpy(), per_patient["r"].to_numpy()),
        index=per_patient.index,
    )
    nan = float("nan")
    return {
        "patient_dice_mean": float(patient_dice.mean()),
        "patient_dice_median": float(patient_dice.median()),
        "patient_dice_min": float(patient_dice.min()),
        "patient_dice_ci95": bootstrap_interval(patient_dice.to_numpy()),
        "worst_patient": str(patient_dice.idxmin()),
        "slice_dice_mean": float(slice_dice.mean()),
        "tumor_slice_dice_mean": float(slice_dice[tumor].mean()) if tumor.any() else nan,
        "slice_iou_mean": float(iou(inter, pred, ref).mean()),
        "healthy_fp_rate": float((pred[healthy] > 0).mean()) if healthy.any() else nan,
        "patients": int(len(patient_dice)),
        "slices": int(len(counts)),
        "tumor_slices": int(tumor.sum()),
        "per_patient_dice": {k: round(float(v), 4) for k, v in patient_dice.items()},
    }


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinity (an interval over one patient, a rate over no slices) as None:
    JSON has no NaN, and strict readers (jq, browsers) refuse the ``NaN`` that ``json.dumps`` writes."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
