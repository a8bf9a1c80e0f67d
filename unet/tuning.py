"""Choosing the post-processing on validation patients: its own step, whose result is saved as data.

`tune_postprocessing` returns a new `Postprocessing`; nothing about a model changes until the caller saves it.
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from unet.evaluation import predict_frame, score
from unet.processing import VOLUME_COMPONENT_MEASURES, Postprocessing
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_COMPONENT_AREAS = (0, 16, 32, 64, 128, 256)  # pixels at the input size


def validation_rank(metrics: dict) -> tuple[float, float]:
    """How tuning orders settings: patient Dice to 4 places, then fewer false positives on healthy slices."""
    return round(metrics["patient_dice_mean"], 4), -metrics["healthy_fp_rate"]


def tune_postprocessing(segmenter: Segmenter, val_df: pd.DataFrame, consider_tta: bool = False) -> Postprocessing:
    """The post-processing with the best validation patient Dice, chosen in the order a single slice needs it.

    Threshold and minimum component area (and flip TTA) first, since that is all a single uploaded slice gets;
    then whether filling the holes of what they keep helps; then whether keeping each patient's largest 3D
    component on top of them helps whole volumes, measured by voxels or by summed probability. Ties go to fewer
    false positives on healthy slices, then to the simpler setting (no 3D step, then the step by voxels).
    """
    best = None
    for tta in (False, True) if consider_tta else (False,):
        candidate = segmenter.with_postprocessing(Postprocessing(tta_flips=tta))
        probs, targets = predict_frame(candidate, val_df, progress=False)
        for threshold in THRESHOLDS:
            for area in MIN_COMPONENT_AREAS:
                post = Postprocessing(threshold=threshold, min_component_area=area, tta_flips=tta)
                metrics = score(segmenter.with_postprocessing(post), probs, targets, val_df)
                if best is None or validation_rank(metrics) > validation_rank(best[1]):
                    best = (post, metrics, probs, targets)
    chosen, metrics, probs, targets = best
    filled = dataclasses.replace(chosen, fill_holes=True)
    filled_metrics = score(segmenter.with_postprocessing(filled), probs, targets, val_df)
    if validation_rank(filled_metrics) > validation_rank(metrics):
        chosen, metrics = filled, filled_metrics
    slice_metrics, by_step = metrics, {}
    for measure in VOLUME_COMPONENT_MEASURES:  # in order of preference on a tie: the reference code's first
        volume = dataclasses.replace(chosen, largest_3d_component=True, largest_3d_component_by=measure)
        by_step[measure] = score(segmenter.with_postprocessing(volume), probs, targets, val_df)
        if validation_rank(by_step[measure]) > validation_rank(metrics):
            chosen, metrics = volume, by_step[measure]
    log.info(
        "post-processing chosen on validation: %s; patient Dice (healthy FP) slice by slice %s, %s",
        chosen,
        _scores(slice_metrics),
        ", ".join(f"largest 3D component by {measure} {_scores(m)}" for measure, m in by_step.items()),
    )
    return chosen


def _scores(metrics: dict) -> str:
    return f"{metrics['patient_dice_mean']:.4f} ({metrics['healthy_fp_rate']:.3f})"
