"""How the app draws a slice for a reader: one channel in grayscale, the prediction filled or outlined, the
reference outlined in another colour, agreement coloured; a probability map with its colour bar; and the volume
viewer's pictures (the axial slice at a scrubber position, coronal and sagittal reconstructions, the area chart).

No Gradio here: tests call every function directly. The `/segment` API keeps `unet.render.draw_overlay` (the
dataset's composite with the prediction in red); the page uses `draw_view`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

# What the "Show" switch offers: a channel index of the LGG slice (pre-contrast, FLAIR, post-contrast), or None
# for the dataset's false-colour composite. FLAIR first: the tumor the model marks is the FLAIR abnormality.
CHANNELS: dict[str, int | None] = {"FLAIR": 1, "Pre-contrast": 0, "Post-contrast": 2, "Composite (R, G, B)": None}
STYLES = ("Filled", "Outline")
DEFAULT_OPACITY = 0.45

# Colours a reader can tell apart on grayscale: prediction red, reference cyan; with a reference the filled
# prediction is split into hits (gold), false positives (red) and misses (blue).
PREDICTION = (255, 50, 50)
REFERENCE = (0, 230, 230)
HIT = (255, 200, 0)
FALSE_POSITIVE = PREDICTION
MISS = (40, 110, 255)
BAR_WIDTH = 64  # pixels the colour bar and its labels add to the right of a probability map
# The area chart's two lines, by the names its legend shows: the prediction's red, and a darker cyan that reads
# on the chart's white background.
AREA_COLORS = {"predicted": "#{:02x}{:02x}{:02x}".format(*PREDICTION), "reference": "#0096a0"}


def base_image(image: np.ndarray, channel: str = "FLAIR") -> np.ndarray:
    """The slice as shown under the overlay: one channel in grayscale (as RGB), or the composite as it is."""
    index = CHANNELS.get(channel, 1)
    if index is None:
        return np.ascontiguousarray(image)
    return np.repeat(image[..., index : index + 1], 3, axis=2)


def outline_thickness(shape: tuple[int, ...]) -> int:
    """Outlines one pixel wide on a 256 px slice, as wide relative to the slice on a larger one."""
    return max(1, round(max(shape[:2]) / 256))


def outline(out: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int], thickness: int) -> None:
    """Draw the outer contours of ``mask`` onto the uint8 RGB picture ``out``, in place."""
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, thickness)


def blend(out: np.ndarray, where: np.ndarray, color: tuple[int, int, int], opacity: float) -> None:
    """Mix ``color`` into the uint8 RGB picture ``out`` where ``where`` is set, in place: only those pixels go
    through float32, never a float copy of the whole picture (a 4096 px slice would take 200 MB)."""
    if where.any():
        mixed = out[where].astype(np.float32) * (1 - opacity) + np.array(color, np.float32) * opacity
        out[where] = mixed.round().astype(np.uint8)


def draw_view(
    image: np.ndarray,
    mask: np.ndarray,
    reference: np.ndarray | None = None,
    channel: str = "FLAIR",
    style: str = "Filled",
    opacity: float = DEFAULT_OPACITY,
) -> np.ndarray:
    """The slice as a reader sees it: ``channel`` in grayscale (or the composite), the prediction filled at
    ``opacity`` or outlined, the reference outlined in cyan; with a reference and a fill, hits, false positives
    and misses each in their own colour."""
    out = np.array(base_image(image, channel), np.uint8, order="C")  # a copy: the caller's slice stays as it is
    if style != "Outline":
        if reference is None:
            blend(out, mask, PREDICTION, opacity)
        else:  # three disjoint regions
            blend(out, mask & reference, HIT, opacity)
            blend(out, mask & ~reference, FALSE_POSITIVE, opacity)
            blend(out, reference & ~mask, MISS, opacity)
    thickness = outline_thickness(image.shape)
    outline(out, mask, PREDICTION, thickness)
    outline(out, reference, REFERENCE, thickness)
    return out


def _swatch(color: tuple[int, int, int], label: str) -> str:
    hex_color = "#{:02x}{:02x}{:02x}".format(*color)
    return f'<span style="color:{hex_color}; font-size:1.2em">■</span> {label}'


def legend_html(has_reference: bool, style: str = "Filled") -> str:
    """The overlay's colours in words (HTML for a Markdown block)."""
    if not has_reference:
        items = [_swatch(PREDICTION, "predicted tumor")]
    elif style == "Outline":
        items = [_swatch(PREDICTION, "predicted tumor (outline)"), _swatch(REFERENCE, "reference (outline)")]
    else:
        items = [
            _swatch(HIT, "hit: predicted and in the reference"),
            _swatch(FALSE_POSITIVE, "false positive: predicted only"),
            _swatch(MISS, "miss: reference only"),
            _swatch(REFERENCE, "reference outline"),
        ]
    return " &nbsp; ".join(items)


def probability_image(prob: np.ndarray) -> np.ndarray:
    """Probability map in the inferno colour map, as RGB (OpenCV's colour maps are BGR)."""
    levels = (np.clip(prob.astype(np.float32, copy=False), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)[..., ::-1])


def probability_with_colorbar(prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The tumor probability in the inferno colour map, with a labelled colour bar (0 to 1) to its right and,
    where given, the threshold marked on the bar."""
    height = prob.shape[0]
    heat = probability_image(prob)
    panel = np.full((height, BAR_WIDTH, 3), 255, np.uint8)
    margin = max(6, height // 32)
    bar_height = height - 2 * margin
    ramp = np.linspace(255, 0, bar_height).round().astype(np.uint8)[:, None].repeat(14, axis=1)
    panel[margin : margin + bar_height, 6:20] = cv2.applyColorMap(ramp, cv2.COLORMAP_INFERNO)[..., ::-1]
    scale = max(0.3, height / 700)
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = margin + round((1 - value) * (bar_height - 1))
        cv2.line(panel, (20, y), (25, y), (0, 0, 0), 1)
        cv2.putText(panel, f"{value:g}", (27, y + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    if threshold is not None:
        y = margin + round((1 - float(threshold)) * (bar_height - 1))
        cv2.line(panel, (2, y), (24, y), (0, 200, 255), 2)
    return np.ascontiguousarray(np.concatenate([heat, panel], axis=1))


# ---------------------------------------------------------------------------------------------------------------
# The volume viewer


def most_tumor_slice(masks: Sequence[np.ndarray]) -> int:
    """The index of the slice with the largest predicted area; the middle slice when there is no tumor."""
    areas = [int(np.count_nonzero(m)) for m in masks]
    return int(np.argmax(areas)) if any(areas) else len(areas) // 2


def reconstruction_centre(masks: np.ndarray) -> tuple[int, int]:
    """(row, column) the coronal and sagittal planes pass through: the centre of the predicted tumor, else the
    middle of the slices."""
    if masks.any():
        _, rows, cols = np.nonzero(masks)
        return int(np.median(rows)), int(np.median(cols))
    return masks.shape[1] // 2, masks.shape[2] // 2


def _plane(base: np.ndarray, masks: np.ndarray, refs: np.ndarray | None, stretch: float, current: int) -> np.ndarray:
    """One reconstruction (slices x width), the last slice on top (superior, as NIfTI's canonical order is), rows
    stretched by ``stretch`` (slice spacing / pixel spacing), the current axial slice marked."""
    view = draw_view(base, masks, refs, channel="Composite (R, G, B)", style="Filled")
    view = view[::-1]
    height = max(1, round(view.shape[0] * stretch))
    view = cv2.resize(view, (view.shape[1], height), interpolation=cv2.INTER_NEAREST)
    y = round((view.shape[0] / masks.shape[0]) * (masks.shape[0] - 1 - current + 0.5))
    cv2.line(view, (0, y), (8, y), (255, 255, 255), 1)
    cv2.line(view, (view.shape[1] - 9, y), (view.shape[1] - 1, y), (255, 255, 255), 1)
    return view


def reconstructions(
    images: Sequence[np.ndarray],
    masks: np.ndarray,
    references: np.ndarray | None,
    channel: str = "FLAIR",
    stretch: float = 1.0,
    current: int = 0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(coronal, sagittal, (row, column)): the stack cut through the tumor's centre along and across the slices,
    in ``channel`` with the 3D mask (and reference) drawn; ``current`` is marked at the sides."""
    row, col = reconstruction_centre(masks)
    gray = np.stack([base_image(image, channel) for image in images])  # (S, H, W, 3)
    refs = references
    coronal = _plane(gray[:, row], masks[:, row], None if refs is None else refs[:, row], stretch, current)
    sagittal = _plane(gray[:, :, col], masks[:, :, col], None if refs is None else refs[:, :, col], stretch, current)
    return coronal, sagittal, (row, col)


def area_frame(
    labels: Sequence[str], areas: Sequence[int], reference_areas: Sequence[int] | None = None
) -> pd.DataFrame:
    """The area chart's long-format rows: slice number (1-based, so 200 slices stay a readable axis), area and
    series ('predicted', 'reference')."""
    n = len(areas)
    frame = pd.DataFrame({"slice": np.arange(1, n + 1), "tumor pixels": list(areas), "series": "predicted"})
    if reference_areas is not None:
        ref = pd.DataFrame({"slice": np.arange(1, n + 1), "tumor pixels": list(reference_areas), "series": "reference"})
        frame = pd.concat([frame, ref], ignore_index=True)
    frame["label"] = list(labels) * (len(frame) // max(1, n))
    return frame


def slice_caption(index: int, label: str, total: int, area: int, reference_area: int | None, dice: float | None) -> str:
    """The full caption of one axial slice of a volume."""
    text = f"Slice {index + 1} of {total} ({label}): "
    text += f"{area:,} tumor pixels predicted" if area else "no tumor predicted"
    if reference_area is not None:
        text += f"; reference {reference_area:,} pixels"
        if dice is not None:
            text += f"; Dice {dice:.3f}"
    return text


def pair_slice_and_mask(paths: Sequence[str], reference: str | None = None) -> tuple[str, str | None]:
    """(slice, reference mask or None) from what was dropped on the upload box: one slice, or ``X.tif`` with
    ``X_mask.tif`` together (paired by name); a separately uploaded ``reference`` wins."""
    from unet.reader import ReadError
    from unet.uploads import MASK_SUFFIX, is_mask_name

    names = {Path(p).name: p for p in paths}
    slices = [p for name, p in names.items() if not is_mask_name(name)]
    masks = {Path(p).stem.removesuffix(MASK_SUFFIX): p for name, p in names.items() if is_mask_name(name)}
    if len(slices) != 1 or len(masks) > 1:
        raise ReadError(
            f"{len(slices)} slices and {len(masks)} masks dropped; drop one slice, or X.png with X_mask.png"
        )
    image = slices[0]
    if masks and Path(image).stem not in masks:
        raise ReadError(f"{Path(next(iter(masks.values()))).name} is not the mask of {Path(image).name}")
    return image, reference or next(iter(masks.values()), None)
