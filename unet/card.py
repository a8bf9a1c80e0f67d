"""The model card (README.md) written beside every trained model and published with it.

The YAML metadata (license, library, pipeline tag, tags, datasets and a ``model-index`` with
the test metrics) is built with `huggingface_hub.ModelCardData`, so the Hub and
``ModelCard.load`` read it back; the prose says how the model was trained and evaluated,
what it is for, and that it is not for clinical use.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# The Kaggle dataset of Buda et al. (2019): 110 TCGA lower-grade glioma patients, FLAIR masks.
DATASET_ID = "mateuszbuda/lgg-mri-segmentation"
DATASET_NAME = "LGG MRI Segmentation (Buda et al., 2019)"
TAGS = ["medical-imaging", "brain-mri", "segmentation", "unet", "lgg", "pytorch", "model_hub_mixin",
        "pytorch_model_hub_mixin"]

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


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def card_data(metrics: dict) -> ModelCardData:
    """The card's YAML metadata, with one model-index entry per test metric."""
    synthetic = "synthetic" in str(metrics.get("data", ""))
    test = metrics.get("test") or {}
    dataset_name = "synthetic phantoms (smoke test, not real MRI)" if synthetic else f"{DATASET_NAME}, held-out test patients"
    results = [
        EvalResult(task_type="image-segmentation", task_name="Brain MRI FLAIR abnormality segmentation",
                   dataset_type="synthetic" if synthetic else DATASET_ID, dataset_name=dataset_name,
                   dataset_split="test", metric_type=metric_type, metric_name=name, metric_value=round(value, 4))
        for key, metric_type, name in METRICS if (value := _number(test.get(key))) is not None
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


def _metrics_table(metrics: dict) -> str:
    names = {"test": "test", "test_per_slice": "test, slice by slice", "val": "val"}
    splits = [(label, metrics.get(name) or {}) for name, label in names.items()]
    splits = [(label, m) for label, m in splits if m]
    if not splits:
        return "No evaluation was recorded with this model."
    lines = ["| metric | " + " | ".join(name for name, _ in splits) + " |",
             "|---|" + "---:|" * len(splits)]
    for key, _, label in METRICS:
        cells = [f"{v:.4f}" if (v := _number(m.get(key))) is not None else "n/a" for _, m in splits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| Mean patient Dice, 95% bootstrap interval | " + " | ".join(
        f"{ci[0]:.3f} to {ci[1]:.3f}" if (ci := m.get("patient_dice_ci95")) and all(_number(v) is not None for v in ci) else "n/a"
        for _, m in splits) + " |")
    lines.append("| Worst patient | " + " | ".join(f"`{m.get('worst_patient', '?')}`" for _, m in splits) + " |")
    lines.append("| Patients / slices (with tumor) | " + " | ".join(
        f"{m.get('patients', '?')} / {m.get('slices', '?')} ({m.get('tumor_slices', '?')})" for _, m in splits) + " |")
    return "\n".join(lines)


def _split_section(splits: dict) -> str:
    if not splits:
        return "The patient split was not recorded."
    parts = []
    for name in ("train", "val", "test"):
        ids = splits.get(name) or []
        parts.append(f"<details><summary>{name}: {len(ids)} patients</summary>\n\n{', '.join(ids) or '(none)'}\n\n</details>")
    return "\n\n".join(parts)


def model_card_text(metrics: dict, config: dict | None = None, repo_id: str | None = None) -> str:
    """The whole README.md: YAML metadata, then the prose."""
    config = config or {}
    repo = repo_id or "USER/NAME"
    synthetic = "synthetic" in str(metrics.get("data", ""))
    test = metrics.get("test") or {}
    headline = (f"mean patient Dice **{test['patient_dice_mean']:.4f}** on {test.get('patients', '?')} held-out patients"
                if _number(test.get("patient_dice_mean")) is not None else "no test evaluation recorded")
    data_note = ("> **This model was trained on synthetic phantom slices** (a smoke test of the pipeline), "
                 "not on MRI: its metrics say nothing about real images.\n\n" if synthetic else "")
    architecture = (f"U-Net, width {config.get('width', '?')}, depth {config.get('depth', '?')}, "
                    f"{config.get('upsampling', '?')} upsampling, {metrics.get('parameters', 0) / 1e6:.2f} M parameters"
                    if config else "U-Net")
    post = (f"threshold {config.get('threshold', 0.5)}, minimum component area {config.get('min_component_area', 0)} px, "
            f"hole filling {'on' if config.get('fill_holes') else 'off'}, "
            f"flip test-time augmentation {'on' if config.get('tta_flips') else 'off'}, "
            f"largest 3D component per patient {'on' if config.get('largest_3d_component') else 'off'}"
            if config else "see config.json")
    context = int(config.get("context_slices", 0))
    needs = "Context slices and the largest 3D component need" if context else "The largest 3D component needs"
    per_slice_note = (f" {needs} the patient's other slices, so \"test, slice by slice\" gives the masks a single "
                      "uploaded slice gets." if metrics.get("test_per_slice") else "")
    context_note = (f", each with {context} neighbouring slice{'s' if context > 1 else ''} on either side (2.5D input)"
                    if context else "")
    sees = (f"{2 * context + 1} adjacent slices at a time, little 3D context" if context
            else "one slice at a time, with no 3D context")
    volume_note = ("\n  The largest 3D component needs a patient's neighbouring slices: `unet.evaluate` and the demo's volume tab apply it,"
                   "\n  a single slice on its own gets the per-slice steps only."
                   if config.get("largest_3d_component") else "")
    post_note = f"\n- Post-processing: {metrics['post_processing']}." if metrics.get("post_processing") else ""
    splits, trained_on = metrics.get("splits") or {}, metrics.get("trained_on") or ["train"]
    trained_patients = sum(len(splits.get(name, [])) for name in trained_on)
    if "val" in trained_on:
        epochs_note = "the last one kept; trained on the training and validation patients, so nothing was selected on validation"
    else:
        epochs_note = f"best validation epoch {metrics.get('best_epoch', '?')}"
    if config.get("normalization") == "slice":
        scaling = "standardised per channel with each slice's own mean and std over its non-background pixels"
    else:
        scaling = "standardised with the mean and std stored in `config.json`"
    return f"""---
{card_data(metrics).to_yaml()}
---

# brain-mri-unet

A U-Net that segments the FLAIR abnormality of lower-grade glioma in axial brain MRI slices
(one binary mask per 3-channel slice), {"trained on synthetic phantoms" if synthetic else "trained on the LGG MRI Segmentation dataset (Buda et al., 2019)"}:
{headline}.

> **Research use only. Not a medical device and not for clinical use:** do not use it to
> diagnose, treat or make any decision about a patient.

{data_note}## Model

- {architecture}; input {config.get('image_size', 256)}x{config.get('image_size', 256)} slices{context_note}.
- Input channels in file order ({config.get('channel_order', 'RGB')}): pre-contrast, FLAIR, post-contrast, scaled to
  [0, 1] and {scaling}.
- Output: one logit map; the mask is `sigmoid(logit) >= threshold`, then post-processing ({post});
  train.py chooses these on the validation patients (unless run with `--no-tune`) and stores them in `config.json`.{volume_note}
- Weights: `model.safetensors` only (no pickle).

## Use

With this project's code (the `unet` package):

```python
from unet.model import load_model
model = load_model("{repo}")  # or a local folder; revision="..." pins a branch, tag or commit
```

```bash
python -m unet.evaluate --data-dir kaggle_3m --model {repo} --split test
MODEL_ID={repo} python app.py
```

A copy published with the data at hand (`train.py --push`, or `python -m unet.push` with `--data-dir`) has
`examples/`: a few test-split slices (PNG, channels in file order) with their reference masks (`*_mask.png`,
0/255) for the demo app. One published without it, or the copy in the project's repository, has none.

## Evaluation

Patient Dice pools each patient's slices as one volume (the figure Buda et al. report);
tumor-slice Dice averages the slices whose reference mask has tumor; slice Dice averages all
slices (an empty prediction on an empty slice counts as 1); the healthy-slice false-positive
rate is the share of tumor-free slices where any pixel is predicted. The numbers use all of the
post-processing in `config.json`.{per_slice_note}

{_metrics_table(metrics)}

## Training

- Command: `{metrics.get('command', '?')}`{post_note}
- Data: {metrics.get('data', '?')}
- Epochs: {metrics.get('epochs_trained', '?')} ({epochs_note}),
  {float(metrics.get('train_hours') or 0):.2f} h on {metrics.get('machine', '?')}, precision {metrics.get('precision', '?')}.
- Patients are split (never slices), stratified by institution where every institution has patients enough:

{_split_section(metrics.get('splits') or {})}

## Intended use and limitations

- Intended for research and teaching on brain MRI segmentation, and as a demo.
- Trained on {trained_patients} patients from a few institutions of one public
  dataset (TCGA lower-grade glioma, FLAIR-based masks by one annotator); expect lower accuracy on other scanners,
  protocols, tumor types, on post-operative or pediatric brains, and on slices not preprocessed like the dataset's
  (skull, orientation and the 3-channel stacking matter).
- The network sees {sees} (only the optional largest-3D-component step looks
  across slices), and small lesions are the hardest; the worst patient above shows how far a single case can
  fall below the mean.
- Metrics come from a small test set; their uncertainty is large.

## License and data

The code and these weights are released under the MIT license. The training data is the Kaggle
dataset `{DATASET_ID}` (images from The Cancer Imaging Archive, TCGA-LGG); its license has not been
verified here: treat it, and anything derived from it, as non-commercial research use only.

Buda, M., Saha, A., Mazurowski, M. A. *Association of genomic subtypes of lower-grade gliomas with
shape features automatically extracted by a deep learning algorithm.* Computers in Biology and
Medicine, 2019.
"""


def write_model_card(model_dir: str | Path, metrics: dict, repo_id: str | None = None) -> Path:
    """Write ``model_dir/README.md`` from ``metrics`` and the folder's ``config.json``."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    path = model_dir / "README.md"
    ModelCard(model_card_text(metrics, config, repo_id)).save(path)
    return path
