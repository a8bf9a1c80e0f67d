"""The model card (README.md) written beside every trained model and published with it.

The YAML metadata (license, library, pipeline tag, tags, datasets and a ``model-index`` with the test metrics) is
built with `huggingface_hub.ModelCardData`, so the Hub and ``ModelCard.load`` read it back. The prose is the Jinja
template ``model_card.md`` beside this file, rendered by ``ModelCard.from_template``: it says how the model was
trained and evaluated, with which processing, what it is for, and that it is not for clinical use. This module only
turns a model's records (metrics.json, config.json and the processing files) into the template's values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from unet.evaluation import SPLIT_NAMES, held_out_split
from unet.model import ARCHITECTURE_KEYS
from unet.processing import Postprocessing, Preprocessing, load_processing, read_settings_file

TEMPLATE = Path(__file__).with_name("model_card.md")
# `python -m unet.evaluate --cv ... --record MODEL_DIR` writes it: the cross-validated estimate of the model's recipe
CROSS_VALIDATION_FILE = "cross_validation.json"

# The Kaggle dataset of Buda et al. (2019): 110 TCGA lower-grade glioma patients, FLAIR masks.
DATASET_ID = "mateuszbuda/lgg-mri-segmentation"
DATASET_NAME = "LGG MRI Segmentation (Buda et al., 2019)"
TAGS = [
    "medical-imaging",
    "brain-mri",
    "segmentation",
    "unet",
    "lgg",
    "pytorch",
    "model_hub_mixin",
    "pytorch_model_hub_mixin",
]

# (metrics key, model-index metric type, human name), in the order of the card's table.
METRICS = [
    ("patient_dice_mean", "dice", "Mean patient Dice"),
    ("patient_dice_median", "dice", "Median patient Dice"),
    ("patient_dice_min", "dice", "Worst patient Dice"),
    ("tumor_slice_dice_mean", "dice", "Tumor-slice Dice"),
    ("slice_dice_mean", "dice", "Slice Dice"),
    ("slice_iou_mean", "iou", "Slice IoU"),
    ("healthy_fp_rate", "false_positive_rate", "Healthy-slice false-positive rate"),
]
# The columns of the card's table: metrics.json key -> heading.
TABLE_SPLITS = {
    "test": "test",
    "test_per_slice": "test, slice by slice",
    "val": "val",
    "val_per_slice": "val, slice by slice",
}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def is_synthetic(metrics: dict) -> bool:
    return "synthetic" in str(metrics.get("data", ""))


def card_data(metrics: dict, cross_validation: dict | None = None) -> ModelCardData:
    """The card's YAML metadata, with one model-index entry per metric of the cross-validation, else of the test."""
    synthetic = is_synthetic(metrics)
    if cross_validation:
        scores, split = cross_validation, "cross-validation"
        held_out = f"{len(cross_validation.get('folds', []))}-fold cross-validation"
    else:
        scores, split, held_out = metrics.get("test") or {}, "test", "held-out test patients"
    dataset_name = "synthetic phantoms (smoke test, not real MRI)" if synthetic else f"{DATASET_NAME}, {held_out}"
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Brain MRI FLAIR abnormality segmentation",
            dataset_type="synthetic" if synthetic else DATASET_ID,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(value, 4),
        )
        for key, metric_type, name in METRICS
        if (value := _number(scores.get(key))) is not None
    ]
    return ModelCardData(
        model_name="brain-mri-unet",
        license="mit",
        library_name="brain-mri-unet",
        pipeline_tag="image-segmentation",
        tags=TAGS + (["synthetic-data"] if synthetic else []),
        datasets=None if synthetic else [DATASET_ID],
        metrics=["dice"],
        eval_results=results or None,
    )


def metrics_table(metrics: dict) -> dict | None:
    """The card's table of the model's own splits: ``{"columns": [...], "rows": [(label, cells), ...]}``, or None
    with nothing recorded."""
    return scores_table([(label, metrics[name]) for name, label in TABLE_SPLITS.items() if metrics.get(name)])


def cross_validation_values(cv: dict | None) -> dict:
    """What the card says of a recorded cross-validation: its table (with the 3D step and slice by slice), the
    folds, the commands."""
    if not cv:
        return {"cv": None}
    step = cv.get("volume_step", "off")
    step = "each fold's 3D step" if step == "per fold config" else f"the {step}"
    columns = [("pooled, " + (f"with {step}" if cv.get("per_slice") else "as configured"), cv)]
    if cv.get("per_slice"):
        columns.append(("pooled, slice by slice", cv["per_slice"]))
    folds = [
        {
            "name": fold.get("model", "?"),
            "patients": fold.get("patients", "?"),
            "mean": f"{fold['patient_dice_mean']:.4f}",
            "per_slice": f"{fold.get('patient_dice_mean_per_slice', float('nan')):.4f}",
            "median": f"{fold['patient_dice_median']:.4f}",
            "worst": f"{fold['patient_dice_min']:.4f} (`{fold.get('worst_patient', '?')}`)",
            "fp": f"{fold['healthy_fp_rate']:.3f}",
            "command": fold.get("command", "?"),
        }
        for fold in cv.get("folds", [])
    ]
    return {
        "cv": {
            "table": scores_table(columns),
            "folds": folds,
            "command": cv.get("command", "?"),
            "data": cv.get("data", "?"),
            "patients": cv.get("patients", "?"),
        }
    }


def scores_table(splits: list[tuple[str, dict]]) -> dict | None:
    """A table of METRICS, one column per (label, metrics)."""
    if not splits:
        return None
    rows = [
        (label, [f"{v:.4f}" if (v := _number(m.get(key))) is not None else "n/a" for _, m in splits])
        for key, _, label in METRICS
    ]

    def interval(m: dict) -> str:
        ci = m.get("patient_dice_ci95")
        return f"{ci[0]:.3f} to {ci[1]:.3f}" if ci and all(_number(v) is not None for v in ci) else "n/a"

    rows.append(("Mean patient Dice, 95% bootstrap interval", [interval(m) for _, m in splits]))
    rows.append(("Worst patient", [f"`{m.get('worst_patient', '?')}`" for _, m in splits]))
    rows.append(
        (
            "Patients / slices (with tumor)",
            [f"{m.get('patients', '?')} / {m.get('slices', '?')} ({m.get('tumor_slices', '?')})" for _, m in splits],
        )
    )
    return {"columns": [label for label, _ in splits], "rows": rows}


def processing_values(preprocessing: Preprocessing | None, postprocessing: Postprocessing | None) -> dict:
    """What the card says about the input and the mask; a folder without processing files points at them."""
    pre = preprocessing or Preprocessing()
    if pre.normalization == "slice":
        scaling = "standardised per channel with each slice's own mean and std over its non-background pixels"
    else:
        scaling = "standardised with the mean and std stored in `preprocessor_config.json`"
    values = {"image_size": pre.image_size, "channel_order": pre.channel_order, "scaling": scaling}
    if postprocessing is None:
        return values | {"post": "see postprocessor_config.json", "volume_step": False}
    p = postprocessing
    post = (
        f"threshold {p.threshold}, minimum component area {p.min_component_area} px, "
        f"hole filling {'on' if p.fill_holes else 'off'}, "
        f"flip test-time augmentation {'on' if p.tta_flips else 'off'}, "
        f"whole-volume step: {p.volume_step}"
    )
    return values | {"post": post, "volume_step": p.largest_3d_component}


def training_values(metrics: dict) -> dict:
    """The card's record of the run: command, data, epochs, machine, split."""
    splits, trained_on = metrics.get("splits") or {}, metrics.get("trained_on") or ["train"]
    if "val" in trained_on:  # models trained before --train-on-val was removed
        epochs_note = (
            "the last one kept; trained on the training and validation patients, so nothing was selected on validation"
        )
    else:
        epochs_note = f"best validation epoch {metrics.get('best_epoch', '?')}"
    return {
        "command": metrics.get("command", "?"),
        "post_processing": metrics.get("post_processing"),
        "data": metrics.get("data", "?"),
        "epochs": metrics.get("epochs_trained", "?"),
        "epochs_note": epochs_note,
        "train_hours": float(metrics.get("train_hours") or 0),
        "machine": metrics.get("machine", "?"),
        "precision": metrics.get("precision", "?"),
        "splits": [(name, splits.get(name) or []) for name in ("train", "val", "test")] if splits else [],
        "trained_patients": sum(len(splits.get(name, [])) for name in trained_on),
    }


def model_card_text(
    metrics: dict,
    architecture: dict | None = None,
    preprocessing: Preprocessing | None = None,
    postprocessing: Postprocessing | None = None,
    repo_id: str | None = None,
    cross_validation: dict | None = None,
) -> str:
    """The whole README.md: YAML metadata, then the template's prose. ``architecture`` is config.json's content;
    ``cross_validation`` a recorded `CROSS_VALIDATION_FILE`, which becomes the headline."""
    test, val = metrics.get("test") or {}, metrics.get("val") or {}
    cv = cross_validation
    if cv and _number(cv.get("patient_dice_mean")) is not None:
        low, high = cv.get("patient_dice_ci95") or ("?", "?")
        headline = (
            f"mean patient Dice **{cv['patient_dice_mean']:.4f}** (95% interval {low} to {high}; median "
            f"{cv['patient_dice_median']:.4f}, worst {cv['patient_dice_min']:.4f}) in a "
            f"{len(cv.get('folds', []))}-fold cross-validation of its recipe over {cv.get('patients', '?')} patients"
        )
    elif _number(test.get("patient_dice_mean")) is not None:
        headline = (
            f"mean patient Dice **{test['patient_dice_mean']:.4f}** on {test.get('patients', '?')} held-out patients"
        )
    elif _number(val.get("patient_dice_mean")) is not None:
        headline = (
            f"mean patient Dice **{val['patient_dice_mean']:.4f}** on its {val.get('patients', '?')} validation "
            "patients, which chose its epoch and post-processing (so the figure flatters it)"
        )
    else:
        headline = "no evaluation recorded"
    if architecture:
        arch = architecture
        described = (
            f"U-Net, width {arch.get('width', '?')}, depth {arch.get('depth', '?')}, "
            f"{arch.get('upsampling', '?')} upsampling, {metrics.get('parameters', 0) / 1e6:.2f} M parameters"
        )
    else:
        described = "U-Net"
    held_out = held_out_split(metrics)
    card = ModelCard.from_template(
        card_data(metrics, cross_validation),
        template_path=str(TEMPLATE),
        synthetic=is_synthetic(metrics),
        headline=headline,
        architecture=described,
        repo=repo_id or "USER/NAME",
        per_slice=bool(metrics.get(f"{held_out}_per_slice")),
        held_out=held_out,
        held_out_name=SPLIT_NAMES[held_out],
        table=metrics_table(metrics),
        dataset_id=DATASET_ID,
        **processing_values(preprocessing, postprocessing),
        **training_values(metrics),
        **cross_validation_values(cross_validation),
    )
    return card.content


def folder_card_text(model_dir: str | Path, metrics: dict, repo_id: str | None = None) -> str:
    """`model_card_text` from a model folder's own files: config.json and the processing files (an old flat
    config.json included); a folder without them gets a card that points at them."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    architecture = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    try:
        preprocessing, postprocessing = load_processing(model_dir, config)
    except FileNotFoundError:
        preprocessing = postprocessing = None
    cross_validation = recorded_cross_validation(model_dir)
    return model_card_text(metrics, architecture, preprocessing, postprocessing, repo_id, cross_validation)


def recorded_cross_validation(model_dir: str | Path) -> dict | None:
    """The model folder's pooled cross-validation as `unet.evaluate --cv --record` wrote it; None if it has none."""
    path = Path(model_dir) / CROSS_VALIDATION_FILE
    return read_settings_file(path) if path.is_file() else None


def write_model_card(model_dir: str | Path, metrics: dict, repo_id: str | None = None) -> Path:
    """Write ``model_dir/README.md`` from ``metrics`` and the folder's config and processing files."""
    path = Path(model_dir) / "README.md"
    ModelCard(folder_card_text(model_dir, metrics, repo_id)).save(path)
    return path
