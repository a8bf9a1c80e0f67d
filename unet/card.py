"""The model card (README.md) written beside every trained model."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def write_model_card(model_dir: str | Path, metrics: dict) -> Path:
    """Write ``model_dir/README.md`` with Hub metadata and the training metrics."""
    test = metrics.get("test") or {}
    data = ModelCardData(license="mit", library_name="brain-mri-unet", pipeline_tag="image-segmentation",
                         tags=["medical-imaging", "brain-mri", "segmentation", "unet", "lgg"])
    rows = "\n".join(f"| {k} | {test[k]:.4f} |" for k in ("patient_dice_mean", "patient_dice_median", "patient_dice_min",
                                                           "tumor_slice_dice_mean", "slice_dice_mean", "healthy_fp_rate") if k in test)
    content = f"""---
{data.to_yaml()}
---

# brain-mri-unet

U-Net segmenting FLAIR abnormality (lower-grade glioma) in brain MRI slices of the LGG
MRI Segmentation dataset (Buda et al., 2019). **Research use only, not for clinical use.**

## Test metrics ({test.get('patients', 0)} held-out patients, {test.get('slices', 0)} slices)

| metric | value |
|---|---|
{rows}

Trained with `{metrics.get('command', '')}` on {metrics.get('machine', '?')} in {metrics.get('train_hours', 0):.2f} h.
"""
    path = Path(model_dir) / "README.md"
    ModelCard(content).save(path)
    return path
