"""Scoring a segmenter on patients of a ``kaggle_3m`` frame, one model or the folds of a cross-validation.

Probabilities are computed once per slice (`predict_frame`) and scored under any post-processing (`score`), which
is what tuning needs; every mask comes from `unet.segmenter.Segmenter`, the road the app takes. The command line
is `unet.evaluate`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from unet.data import DatasetError, split_patients, volume_rows
from unet.metrics import pixel_counts, summarize
from unet.reader import read_image, read_mask
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

# what the per-fold table of a cross-validation shows of each fold
FOLD_KEYS = (
    "patients",
    "patient_dice_mean",
    "patient_dice_median",
    "patient_dice_min",
    "worst_patient",
    "healthy_fp_rate",
)


def predict_frame(
    segmenter: Segmenter, df: pd.DataFrame, progress: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Probabilities and reference masks for every slice of a `scan_dataset` frame, in its row order."""
    size = segmenter.batch_size
    probs, targets = [], []
    for start in tqdm(range(0, len(df), size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        part = df.iloc[start : start + size]
        images = [read_image(path, str(path)) for path in part["image_path"]]
        probs += segmenter.probabilities(images)
        targets += [read_mask(path, str(path)) for path in part["mask_path"]]
    return probs, targets


def frame_masks(segmenter: Segmenter, probs: Sequence[np.ndarray], df: pd.DataFrame) -> np.ndarray:
    """(N, H, W) masks of the frame's slices: each patient's slices as one volume, post-processed in slice order."""
    masks = np.zeros((len(probs), *np.shape(probs[0])), bool) if len(probs) else np.zeros((0, 0, 0), bool)
    for rows in volume_rows(df).values():
        masks[rows] = segmenter.volume_masks([probs[row] for row in rows])
    return masks


def score(segmenter: Segmenter, probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], df: pd.DataFrame) -> dict:
    """`unet.metrics.summarize` of the masks the segmenter's post-processing makes of ``probs`` (rows of ``df``)."""
    counts = pixel_counts(frame_masks(segmenter, probs, df), np.stack(targets))
    post = segmenter.postprocessing
    return summarize(counts, list(df["patient"])) | {
        "largest_3d_component": post.largest_3d_component,
        "volume_step": post.volume_step,
    }


def evaluate(segmenter: Segmenter, df: pd.DataFrame, progress: bool = True) -> dict:
    """The metrics of `unet.metrics.summarize` for a segmenter on the slices of ``df``."""
    probs, targets = predict_frame(segmenter, df, progress)
    return score(segmenter, probs, targets, df)


def evaluate_folds(
    model_dirs: Sequence[str | Path], df: pd.DataFrame, override: dict | None = None, **options: object
) -> dict:
    """Cross-validation: each fold's model on its own test patients, pooled into one set of metrics.

    ``override`` changes each fold's post-processing (e.g. ``{"largest_3d_component": False}``); ``options`` go to
    each `Segmenter` (device, precision, batch_size). The slices' pixel counts are pooled before summarising, so
    every metric is exactly what one evaluation over all the tested patients would give. ``per_slice`` holds the
    same metrics without the 3D step (the masks a single uploaded slice gets; {} where no fold has the step), from
    the same probabilities; ``folds`` each fold's own figures (`FOLD_KEYS`), for the per-fold table.
    """
    tests = fold_test_rows(model_dirs, df)
    counts, per_slice_counts, patients, folds = [], [], [], []
    for model_dir, part in zip(model_dirs, tests):
        segmenter = Segmenter.from_pretrained(model_dir, **options)
        segmenter = segmenter.with_postprocessing(**(override or {}))
        probs, targets = predict_frame(segmenter, part)
        targets = np.stack(targets)
        slice_by_slice = segmenter.with_postprocessing(largest_3d_component=False)
        counts.append(pixel_counts(frame_masks(segmenter, probs, part), targets))
        per_slice_counts.append(pixel_counts(frame_masks(slice_by_slice, probs, part), targets))
        patients += list(part["patient"])
        fold = summarize(counts[-1], list(part["patient"]))
        fold_per_slice = summarize(per_slice_counts[-1], list(part["patient"]))
        folds.append(
            {"model": str(model_dir), "volume_step": segmenter.postprocessing.volume_step}
            | {key: fold[key] for key in FOLD_KEYS}
            | {"patient_dice_mean_per_slice": fold_per_slice["patient_dice_mean"]}
        )
    tested = sum(part["patient"].nunique() for part in tests)
    log.info("%d folds tested %d of the folder's %d patients", len(model_dirs), tested, df["patient"].nunique())
    metrics = summarize(np.concatenate(counts), patients)
    for key, values in (
        ("largest_3d_component", {fold["volume_step"] != "off" for fold in folds}),
        ("volume_step", {fold["volume_step"] for fold in folds}),
    ):
        metrics[key] = values.pop() if len(values) == 1 else "per fold config"
    per_slice = summarize(np.concatenate(per_slice_counts), patients) if metrics["largest_3d_component"] else {}
    return metrics | {"per_slice": per_slice, "folds": folds}


def fold_test_rows(model_dirs: Sequence[str | Path], df: pd.DataFrame) -> list[pd.DataFrame]:
    """Each fold model's recorded test patients' slices; every fold is checked before any is evaluated, and no
    patient may be tested by two folds."""
    tests, tested = [], set()
    for model_dir in model_dirs:
        test = (recorded_metrics(model_dir).get("splits") or {}).get("test")
        if not test:
            raise DatasetError(
                f"no test split recorded in {Path(model_dir) / 'metrics.json'}: "
                "--cv takes model folders written by train.py"
            )
        if tested & set(test):
            raise DatasetError(f"{model_dir} tests {sorted(tested & set(test))[0]}, which another fold tests too")
        tested |= set(test)
        tests.append(patient_rows(df, test))
    return tests


def recorded_metrics(model_dir: str | Path) -> dict:
    """The model folder's metrics.json as train.py wrote it (split, training set, scores); {} if it has none."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        metrics = None
    if not isinstance(metrics, dict):
        raise DatasetError(f"{path} is not a metrics.json written by train.py")
    return metrics


# How the app, the card and the NOTICE name a split.
SPLIT_NAMES = {"train": "training", "test": "test", "val": "validation"}


def held_out_split(metrics: dict) -> str:
    """The split a model's examples come from: its test patients, or, for a model trained with no test split (the
    shipped recipe, whose estimate is a cross-validation), its validation patients. Those chose its epoch and
    post-processing but never trained it."""
    return "test" if (metrics.get("splits") or {}).get("test") else "val"


def trained_patients(metrics: dict) -> set[str]:
    """The patients a model learned from: its recorded train split."""
    return set((metrics.get("splits") or {}).get("train", []))


def patient_rows(df: pd.DataFrame, patients: Collection[str]) -> pd.DataFrame:
    """The slices of exactly these patients; an id the folder lacks is an error, not an empty score."""
    unknown = sorted(set(patients) - set(df["patient"]))
    if unknown:
        raise DatasetError(f"patients not in the data folder: {', '.join(unknown)}")
    return df[df["patient"].isin(patients)]


def select_patients(
    df: pd.DataFrame,
    recorded: dict,
    split: str = "all",
    patients: Collection[str] = (),
    split_recipe: dict | None = None,
) -> pd.DataFrame:
    """The slices of the patients asked for: ``patients`` by id, else ``split`` of the model's recorded split
    (train, val, test) or all of them.

    Recomputing a split from a seed gives other patients on another folder, so the record wins; only a model
    without one has its split worked out again from ``split_recipe`` (`unet.data.split_patients`' keyword
    arguments). Any patient the model learned from is flagged, since its score is not a held-out one.
    """
    splits = recorded.get("splits") or {}
    if patients:
        part = patient_rows(df, patients)
    elif split == "all":
        part = df
    elif splits:
        if not splits.get(split):
            raise DatasetError(f"the model's recorded {split} split is empty")
        log.info("%s split as recorded in the model's metrics.json: %d patients", split, len(splits[split]))
        part = patient_rows(df, splits[split])
    else:
        log.info("no split recorded with the model: working it out from %s", split_recipe or "the defaults")
        ids = split_patients(df, **(split_recipe or {}))[split]
        part = df[df["patient"].isin(ids)]
    seen = sorted(trained_patients(recorded) & set(part["patient"]))
    if seen and (patients or split != "train"):
        log.warning(
            "%d of the %d patients evaluated trained this model (e.g. %s): not a held-out score",
            len(seen),
            part["patient"].nunique(),
            seen[0],
        )
    return part


def with_and_without_volume_step(segmenter: Segmenter, df: pd.DataFrame) -> tuple[dict, dict]:
    """The segmenter's metrics on ``df`` and, where its post-processing keeps the largest 3D component, those of the
    masks a single uploaded slice gets beside them ({} otherwise): one prediction, both post-processings."""
    if not len(df):
        return {}, {}
    probs, targets = predict_frame(segmenter, df, progress=False)
    full = score(segmenter, probs, targets, df)
    if not segmenter.postprocessing.largest_3d_component:
        return full, {}
    return full, score(segmenter.with_postprocessing(largest_3d_component=False), probs, targets, df)
