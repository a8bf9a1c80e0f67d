"""What the app shows of a prediction: overlays, the probability image, and summaries as JSON-able dicts and as
Markdown; the one-slice function behind the ``/segment`` API and the volume tab's results.

No Gradio here: tests call every function directly. Masks come from the `Segmenter` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unet import viewer
from unet.metrics import dice, pixel_counts
from unet.nifti import NiftiVolume, is_nifti_name, read_nifti_volume
from unet.reader import ReadError, read_slice
from unet.segmenter import Segmenter
from unet.uploads import read_reference, read_upload, read_volume

BACKGROUND_LEVEL = 8  # a pixel whose brightest channel is above this counts as brain (not background)
PRED_COLOR = (255, 40, 40)  # red: predicted tumor (fill and outline)
REF_COLOR = (0, 190, 255)  # light blue: reference mask outline
FILL_ALPHA = 0.4
THRESHOLD_RANGE = (0.01, 0.99)  # the slider's range, and what the API accepts
DISCLAIMER = (
    "**Research demo, not for clinical use.** The model was trained on a small public dataset of lower-grade "
    "glioma MRI; it is not a medical device and must not inform any diagnosis or treatment."
)


def check_threshold(threshold: float) -> float:
    """A threshold in THRESHOLD_RANGE as a float, or ReadError: near 0 every pixel is tumor, near 1 none is."""
    low, high = THRESHOLD_RANGE
    threshold = float(threshold)
    if not low <= threshold <= high:  # NaN fails this too
        raise ReadError(f"threshold {threshold:g}: choose a probability cut from {low} to {high}")
    return threshold


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Non-background pixels: any channel brighter than BACKGROUND_LEVEL."""
    return image.max(axis=2) > BACKGROUND_LEVEL


def draw_overlay(image: np.ndarray, mask: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The slice with the predicted tumor filled and outlined in red (reference outlined in blue)."""
    out = np.array(image, np.uint8, order="C")
    viewer.blend(out, mask, PRED_COLOR, FILL_ALPHA)
    thickness = viewer.outline_thickness(image.shape)
    viewer.outline(out, mask, PRED_COLOR, thickness)
    viewer.outline(out, reference, REF_COLOR, thickness)
    return out


def compact_probability(prob: np.ndarray, model_size: int) -> np.ndarray:
    """What a session keeps, and thresholds for every answer: the float32 map as it is up to the model's input size
    (so its masks are exactly the segmenter's), float16 above it (half the bytes of a large upload; a pixel within
    float16's rounding of the threshold may fall on the other side)."""
    return prob if prob.size <= model_size**2 else prob.astype(np.float16)


def slice_summary(
    image: np.ndarray, prob: np.ndarray, mask: np.ndarray, threshold: float, reference: np.ndarray | None = None
) -> dict:
    """The JSON-able facts of one prediction: area in pixels and as a share of the brain, and Dice."""
    tumor = int(mask.sum())
    brain = int((brain_mask(image) | mask).sum())
    summary = {
        "tumor_found": tumor > 0,
        "tumor_pixels": tumor,
        "brain_pixels": brain,
        "tumor_share_of_brain": round(tumor / brain, 6) if brain else 0.0,
        "threshold": round(float(threshold), 4),
        "max_probability": round(float(prob.max()), 4),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
    }
    if reference is not None:
        counts = pixel_counts(mask[None], reference[None])[0]
        summary["reference_pixels"] = int(counts[2])
        summary["dice"] = round(float(dice(*counts)), 4)
    return summary


def summary_markdown(summary: dict, notes: Sequence[str] = (), synthetic: bool = False, name: str = "") -> str:
    t = summary["threshold"]
    if summary["tumor_found"]:
        share = summary["tumor_share_of_brain"] * 100
        text = (
            f"### Tumor found: {summary['tumor_pixels']:,} pixels\n"
            f"That is **{share:.1f} %** of the brain ({summary['brain_pixels']:,} pixels) at threshold {t:.2f}."
        )
    else:
        text = (
            f"### No tumor found\nNo pixel reaches threshold {t:.2f}; the highest tumor probability on this "
            f"slice is {summary['max_probability']:.2f}. Lower the threshold to see less certain regions."
        )
    if "dice" in summary:
        both_empty = summary["reference_pixels"] == 0 and not summary["tumor_found"]
        text += f"\n\n**Dice against the reference mask: {summary['dice']:.3f}**" + (
            " (no tumor in either)" if both_empty else " (cyan outline: reference)"
        )
    if name:
        shown = name.replace("`", "'")
        text += f"\n\nSlice: `{shown}` ({summary['width']}x{summary['height']})"
    if synthetic:
        text += "\n\n*This example is a synthetic phantom made by the project, not a real MRI.*"
    for note in notes:
        text += f"\n\n*Note: {note}.*"
    return text


def segment_image(
    segmenter: Segmenter, path: str | Path, threshold: float | None = None, reference_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """An image file -> (overlay RGB uint8, mask uint8 0/255, summary dict). The ``/segment`` API's function.

    ``threshold`` defaults to the model's; ``reference_path`` adds the Dice against that mask. Raises ReadError
    (one line) for anything that is not a usable image or threshold.
    """
    if threshold is not None:
        segmenter = segmenter.with_postprocessing(threshold=check_threshold(threshold))
    loaded = read_slice(read_upload(path), Path(path).name)
    reference = None if reference_path is None else read_reference(reference_path, loaded.image.shape[:2])
    mask, prob = segmenter.segment_slice(loaded.image)
    summary = slice_summary(loaded.image, prob, mask, segmenter.postprocessing.threshold, reference)
    summary["notes"] = loaded.notes
    return draw_overlay(loaded.image, mask, reference), mask.astype(np.uint8) * 255, summary


# ---------------------------------------------------------------------------------------------------------------
# Volumes


def shared_prefix(names: Sequence[str]) -> str:
    """The start all names share, never cut inside a number: slices 10-19 of P share 'P_', not 'P_1'."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    return prefix[: len(prefix.rstrip("0123456789"))]


def short_labels(names: Sequence[str]) -> list[str]:
    """Slice names without their shared prefix: 'TCGA_CS_4941_19960909_12' -> '12'."""
    prefix = shared_prefix(names)
    return [n[len(prefix) :] or n for n in names]


def volume_name(names: Sequence[str]) -> str:
    """What a volume's downloads are called: the patient part of its slice names."""
    return (shared_prefix(names) if len(names) > 1 else names[0]).rstrip("_- ") or "volume"


@dataclass
class VolumeResult:
    masks: list[np.ndarray]
    summary: dict
    gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (overlay, caption) a slice


def volume_masks(segmenter: Segmenter, probs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], str, int]:
    """(masks, the whole-volume step's state, pixels it removed): the segmenter's volume masks, or its slice masks
    where the slices differ in size and cannot be stacked."""
    # Each slice's mask once; the whole-volume step (what Segmenter.volume_masks adds) on top of them, so the
    # pixels it removed are counted without post-processing every slice a second time. Maps kept as float16 are
    # compared in float32 one at a time: no float32 copy of a whole volume.
    slice_masks = [segmenter.slice_mask(p.astype(np.float32, copy=False)) for p in probs]
    if len({m.shape for m in slice_masks}) > 1:
        return slice_masks, "skipped: the slices differ in size", 0
    if not segmenter.postprocessing.largest_3d_component:
        return slice_masks, "off", 0
    masks = segmenter.postprocessing.volume_masks(np.stack(slice_masks), probs)
    return list(masks), "on", sum(int(m.sum()) for m in slice_masks) - int(masks.sum())


def volume_result(
    segmenter: Segmenter,
    names: Sequence[str],
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    references: dict[str, np.ndarray],
    draw: bool = True,
) -> VolumeResult:
    """Masks of every slice with the segmenter's post-processing (the 3D step included), the gallery of
    overlays with their captions (unless ``draw`` is False: the page's viewer draws one slice at a time), and the
    volume's summary."""
    masks, step, removed = volume_masks(segmenter, probs)
    gallery, counts = [], []
    tumor_total = brain_total = 0
    for name, label, image, mask in zip(names, short_labels(names), images, masks):
        reference = references.get(name)
        caption = f"{label}: {int(mask.sum()):,} px" if mask.any() else f"{label}: no tumor"
        if reference is not None:
            counts.append(pixel_counts(mask[None], reference[None])[0])
            caption += f" · Dice {float(dice(*counts[-1])):.2f}"
        if draw:
            gallery.append((draw_overlay(image, mask, reference), caption))
        tumor_total += int(mask.sum())
        brain_total += int((brain_mask(image) | mask).sum())
    areas = [int(m.sum()) for m in masks]
    summary = {
        "slices": len(names),
        "slices_with_tumor": sum(a > 0 for a in areas),
        "tumor_pixels": tumor_total,
        "brain_pixels": brain_total,
        "tumor_share_of_brain": round(tumor_total / brain_total, 6) if brain_total else 0.0,
        "largest_slice": names[int(np.argmax(areas))] if tumor_total else None,
        "threshold": round(float(segmenter.postprocessing.threshold), 4),
        "largest_3d_component": step,  # the model's whole-volume step
        "pixels_outside_largest_3d_component": removed,
        "per_slice_pixels": dict(zip(names, areas)),
    }
    if counts:
        summary["references"] = len(counts)
        summary["dice"] = round(float(dice(*np.sum(counts, axis=0))), 4)
    return VolumeResult(masks, summary, gallery)


def volume_markdown(summary: dict) -> str:
    if not summary["tumor_pixels"]:
        text = f"### No tumor found on any of the {summary['slices']} slices\n(threshold {summary['threshold']:.2f})"
    else:
        text = (
            f"### Tumor on {summary['slices_with_tumor']} of {summary['slices']} slices: "
            f"{summary['tumor_pixels']:,} pixels in all\n"
            f"That is **{summary['tumor_share_of_brain'] * 100:.1f} %** of the brain across the slices "
            f"({summary['brain_pixels']:,} pixels); the largest area is on {summary['largest_slice']} "
            f"(threshold {summary['threshold']:.2f})."
        )
    step = summary["largest_3d_component"]
    if step == "on":
        text += (
            "\n\nAs the model's config asks, only the largest 3D tumor component across the slices is kept: "
            f"{summary['pixels_outside_largest_3d_component']:,} predicted pixels outside it were removed."
        )
    elif step != "off":
        text += f"\n\nThe model's largest-3D-component step was {step}."
    if "tumor_volume_ml" in summary:
        spacing = " x ".join(f"{z:g}" for z in summary["voxel_size_mm"])
        text += (
            f"\n\n**Tumor volume: {summary['tumor_volume_ml']:.2f} mL** ({summary['tumor_voxels']:,} voxels of "
            f"{spacing} mm)"
        )
    if "dice" in summary:
        text += (
            f"\n\n**Dice against the reference masks (whole volume, {summary['references']} slices): "
            f"{summary['dice']:.3f}**"
        )
    return text


@dataclass
class LoadedVolume:
    """One patient's slices from image files, a zip or NIfTI, in slice order, with their reference masks."""

    names: list[str]
    images: list[np.ndarray]
    references: dict[str, np.ndarray]
    nifti: NiftiVolume | None = None
    notes: list[str] = field(default_factory=list)


def load_volume(paths: Sequence[str | Path]) -> LoadedVolume:
    """Uploaded files -> `LoadedVolume`: NIfTI files (``.nii``/``.nii.gz``, see `unet.nifti`), or image slices
    and zips (see `unet.uploads.read_volume`); the two are not mixed."""
    paths = [Path(p) for p in paths]
    niftis = [p for p in paths if is_nifti_name(p.name)]
    if not niftis:
        volume = read_volume(paths)
        return LoadedVolume(volume.names, volume.images, volume.references)
    if len(niftis) != len(paths):
        raise ReadError("NIfTI volumes and image slices were uploaded together; upload one kind")
    nifti = read_nifti_volume(niftis)
    names = [f"{nifti.name}_{k + 1}" for k in range(len(nifti.images))]
    references = {} if nifti.reference is None else dict(zip(names, nifti.reference))
    return LoadedVolume(names, nifti.images, references, nifti, list(nifti.notes))


def add_volume_units(summary: dict, nifti: NiftiVolume | None) -> dict:
    """A NIfTI volume's summary also gives voxels and millilitres (from its voxel spacing)."""
    if nifti is not None:
        summary["tumor_voxels"] = summary["tumor_pixels"]
        summary["voxel_size_mm"] = [round(z, 4) for z in nifti.spacing]
        summary["tumor_volume_ml"] = round(summary["tumor_pixels"] * nifti.voxel_ml, 3)
    return summary


def card_body(model_dir: Path) -> str:
    """The model card without its YAML header, or '' if there is none."""
    from huggingface_hub import ModelCard

    card = model_dir / "README.md"
    if not card.is_file():  # checked first: ModelCard.load takes a missing path for a repo id
        return ""
    try:
        return ModelCard.load(card, ignore_metadata_errors=True).text.strip()
    except Exception:  # noqa: BLE001 - a hand-edited card must not stop the app: show it as it is
        return card.read_text(encoding="utf-8", errors="replace")
