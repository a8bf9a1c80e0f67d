"""The demo: upload a brain MRI slice, see the tumor the U-Net finds. Research use only.

    python app.py                                  # the shipped model, http://127.0.0.1:7860
    python app.py --model runs/unet/model          # a local model folder
    python app.py --model USER/brain-mri-unet      # a Hub repo (or MODEL_ID=... in the environment)
    python app.py --examples ../shared/data/lgg_subset   # examples picked from a kaggle_3m folder

The prediction is also an API endpoint, ``/segment`` (image file and threshold in; overlay
PNG, mask PNG and a JSON summary out), for ``gradio_client``.
"""
from __future__ import annotations

import os

MAX_SIDE = 4096  # pixels per side; larger images are refused before they are decoded

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home, from any Blocks or launch of this process
# OpenCV reads this once, before its first decode: it then refuses an image over MAX_SIDE x MAX_SIDE before
# allocating it, so a small compressed upload cannot claim gigabytes.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_SIDE * MAX_SIDE))

import argparse
import atexit
import io
import logging
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pandas as pd
from huggingface_hub import ModelCard
from PIL import Image, ImageOps, UnidentifiedImageError

from unet.data import DatasetError, binary_mask, example_slices, find_kaggle_3m, imdecode_quietly, scan_dataset
from unet.evaluate import recorded_metrics
from unet.hub import SHIPPED_MODEL_DIR, ServingModel, load_for_serving
from unet.inference import (iter_proba, keep_largest_volume_component, postprocess, predict_proba,
                            prepare_for_inference, to_rgb_uint8)
from unet.metrics import dice, pixel_counts
from unet.model import UNet

log = logging.getLogger("app")
# Pillow warns about damaged metadata (e.g. "Corrupt EXIF data"): an upload either decodes or is refused in one
# line, so the log needs no more. A filter for the process, set once: catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

ROOT = Path(__file__).resolve().parent
PROJECT_EXAMPLES_DIR = ROOT / "examples"  # synthetic slices written by examples/make_examples.py
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")  # PNG, JPEG, TIFF: how they begin
MAX_FILE_MB = 50  # per upload, enforced by the server (launch max_file_size) and by read_upload
MAX_VOLUME_SLICES = 200
MAX_VOLUME_PIXELS = 200 * 512 * 512
BACKGROUND_LEVEL = 8  # a pixel whose brightest channel is above this counts as brain (not background)
PRED_COLOR = (255, 40, 40)  # red: predicted tumor (fill and outline)
REF_COLOR = (0, 190, 255)  # light blue: reference mask outline
FILL_ALPHA = 0.4
DISCLAIMER = ("**Research demo, not for clinical use.** The model was trained on a small public dataset of "
              "lower-grade glioma MRI; it is not a medical device and must not inform any diagnosis or treatment.")


class InputError(ValueError):
    """A file the app cannot use; the message is one line, fit to show in the page."""


# ---------------------------------------------------------------------------------------------
# Reading uploads

@dataclass
class Slice:
    image: np.ndarray  # HxWx3 uint8, RGB = file order (pre-contrast, FLAIR, post-contrast)
    notes: list[str] = field(default_factory=list)  # how the file was converted, for the page


def _rawmode(im: Image.Image) -> str:
    args = im.tile[0].args if im.tile else ""
    return args if isinstance(args, str) else str(args[0]) if args else ""


def decode_image(data: bytes, name: str = "upload") -> Slice:
    """Image file bytes -> RGB uint8 slice, the way training read the dataset (file order RGB).

    Grayscale is repeated into three channels, transparency is flattened onto black, 16-bit and
    float images are rescaled by their own range. Raises InputError with a one-line message.
    """
    if not data:
        raise InputError(f"{name}: the file is empty")
    notes = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            refuse_oversize(name, w, h)
            if w < 1 or h < 1:
                raise InputError(f"{name}: the image has no pixels")
            if im.mode in ("RGB", "RGBA") and ";16" in _rawmode(im):
                array = opencv_decode(data, name, notes)  # Pillow would cut 16-bit colour to its high byte
            else:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                    im = Image.alpha_composite(background, im.convert("RGBA"))
                    notes.append("transparency flattened onto black")
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                    notes.append(rescaled_note(sixteen_bit=im.mode.startswith("I;16")))
                elif im.mode not in ("L", "RGB"):
                    im = im.convert("RGB")
                array = np.asarray(im)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the image is too large to decode safely") from None
    except UnidentifiedImageError:
        array = opencv_decode(data, name, notes)  # OpenCV reads some files Pillow cannot, e.g. a float colour TIFF
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{name}: the image is corrupt or truncated ({str(error).splitlines()[0]})") from None
    if array.dtype.kind == "f":
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        notes.append("grayscale image: repeated into the three channels the model reads "
                     "(pre-contrast, FLAIR, post-contrast), so expect weaker results")
    try:
        return Slice(to_rgb_uint8(array), notes)
    except ValueError as error:
        raise InputError(f"{name}: {error}") from None


def refuse_oversize(name: str, width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InputError(f"{name}: the image is {width}x{height} pixels; at most {MAX_SIDE}x{MAX_SIDE} is accepted")


def rescaled_note(sixteen_bit: bool) -> str:
    return f"{'16-bit' if sixteen_bit else 'high bit-depth'} image: rescaled to 8 bits by its own intensity range"


def opencv_decode(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    """An image Pillow cannot read at full depth (16-bit colour) or at all (float colour TIFF), decoded by
    OpenCV in the file's RGB order, transparency flattened onto black like Pillow's path; or InputError."""
    try:
        array = imdecode_quietly(data)
    except cv2.error:  # e.g. a header claiming more pixels than OPENCV_IO_MAX_IMAGE_PIXELS
        raise InputError(f"{name}: the image is too large to decode safely") from None
    if array is None or array.ndim not in (2, 3):
        if data.startswith(IMAGE_SIGNATURES):  # the start of an image file whose rest is missing or damaged
            raise InputError(f"{name}: the image is corrupt or truncated")
        raise InputError(f"{name}: not an image (expected PNG, JPEG or TIFF)")
    refuse_oversize(name, array.shape[1], array.shape[0])
    stored = array.dtype  # before flattening makes it float
    if array.ndim == 3 and array.shape[2] == 4:
        scale = np.iinfo(stored).max if stored.kind in "ui" else 1.0
        array = array[..., :3] * (array[..., 3:] / scale)
        notes.append("transparency flattened onto black")
    if stored != np.uint8:
        notes.append(rescaled_note(sixteen_bit=stored == np.uint16))
    return array[..., 2::-1] if array.ndim == 3 and array.shape[2] >= 3 else array  # BGR -> RGB


def read_upload(path: str | Path) -> bytes:
    """The bytes of an uploaded file, refusing missing or oversized files with one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: file not found")
    size = path.stat().st_size
    if size > MAX_FILE_MB * 2**20:
        raise InputError(f"{path.name}: the file is {size / 2**20:.1f} MB; at most {MAX_FILE_MB} MB is accepted")
    return path.read_bytes()


def load_slice(path: str | Path) -> Slice:
    return decode_image(read_upload(path), Path(path).name)


def load_mask(data: bytes, name: str) -> np.ndarray:
    """Reference mask file bytes -> HxW bool; InputError (one line) if it is not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            refuse_oversize(name, *im.size)
            im = ImageOps.exif_transpose(im)  # as the image is turned, so must its mask be
            # Colour as it is: a gray conversion would weigh a pure red mask down to 76, under the cut.
            return binary_mask(np.asarray(im if im.mode in ("1", "L") else im.convert("RGB")))
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InputError(f"{name}: the mask is not a readable image") from None


# ---------------------------------------------------------------------------------------------
# Prediction and what is shown of it

def predict(model: UNet, image: np.ndarray) -> np.ndarray:
    """RGB uint8 slice of any size -> tumor probability (H, W) float32; a context model gets it as its own neighbours."""
    return predict_proba(model, [image], volume=False)[0]


def predict_volume(model: UNet, images: list[np.ndarray],
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """One patient's slices in slice order -> their tumor probabilities; a context model sees each slice with
    its neighbours among them. ``progress`` is told how many slices are done."""
    probs = []
    # one slice a batch, as `predict` does, so a model without context gives each slice the one-slice tab's map
    for prob in iter_proba(model, images, batch_size=1, volume=True):
        probs.append(prob)
        if progress is not None:
            progress(len(probs))
    return probs


def threshold_mask(model: UNet, prob: np.ndarray, threshold: float) -> np.ndarray:
    """Probability -> mask with the model's per-slice post-processing, exactly as `unet.evaluate` and
    the tuning in train.py make it (the minimum component area is set at the model's input size)."""
    return postprocess(prob, threshold, model.min_component_area, model.image_size, model.fill_holes)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Non-background pixels: any channel brighter than BACKGROUND_LEVEL."""
    return image.max(axis=2) > BACKGROUND_LEVEL


def slice_summary(image: np.ndarray, prob: np.ndarray, mask: np.ndarray, threshold: float,
              reference: np.ndarray | None = None) -> dict:
    """The JSON-able facts of one prediction: area in pixels and as a share of the brain, and Dice."""
    tumor = int(mask.sum())
    brain = int((brain_mask(image) | mask).sum())
    out = {
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
        out["reference_pixels"] = int(counts[2])
        out["dice"] = round(float(dice(*counts)), 4)
    return out


def draw_overlay(image: np.ndarray, mask: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The slice with the predicted tumor filled and outlined in red (reference outlined in blue)."""
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1 - FILL_ALPHA) + np.array(PRED_COLOR, np.float32) * FILL_ALPHA
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    thickness = max(1, round(max(image.shape[:2]) / 256))
    for m, color in ((mask, PRED_COLOR), (reference, REF_COLOR)):
        if m is not None and m.any():
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, color, thickness)
    return out


def probability_image(prob: np.ndarray) -> np.ndarray:
    """Probability map in the inferno colour map, as RGB (OpenCV's colour maps are BGR)."""
    heat = cv2.applyColorMap((np.clip(prob, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(heat[..., ::-1])


def segment_image(model: UNet, path: str | Path, threshold: float | None = None,
                  reference_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """An image file -> (overlay RGB uint8, mask uint8 0/255, summary dict). The API's function.

    ``threshold`` defaults to the model's; ``reference_path`` adds the Dice against that mask.
    Raises InputError (one line) for anything that is not a usable image.
    """
    threshold = model.threshold if threshold is None else float(threshold)
    if not 0 < threshold < 1:  # NaN fails this too
        raise InputError(f"threshold {threshold}: a probability cut strictly between 0 and 1")
    sl = load_slice(path)
    reference = None
    if reference_path is not None:
        reference = load_mask(read_upload(reference_path), Path(reference_path).name)
        if reference.shape != sl.image.shape[:2]:
            raise InputError(f"reference mask is {reference.shape[1]}x{reference.shape[0]} but the slice is "
                             f"{sl.image.shape[1]}x{sl.image.shape[0]}")
    prob = predict(model, sl.image)
    mask = threshold_mask(model, prob, threshold)
    summary = slice_summary(sl.image, prob, mask, threshold, reference)
    summary["notes"] = sl.notes
    return draw_overlay(sl.image, mask, reference), mask.astype(np.uint8) * 255, summary


def summary_markdown(summary: dict, notes: Sequence[str] = (), synthetic: bool = False, name: str = "") -> str:
    t = summary["threshold"]
    if summary["tumor_found"]:
        share = summary["tumor_share_of_brain"] * 100
        text = (f"### Tumor found: {summary['tumor_pixels']:,} pixels\n"
                f"That is **{share:.1f} %** of the brain ({summary['brain_pixels']:,} pixels) at threshold {t:.2f}.")
    else:
        text = (f"### No tumor found\nNo pixel reaches threshold {t:.2f}; the highest tumor probability on this "
                f"slice is {summary['max_probability']:.2f}. Lower the threshold to see less certain regions.")
    if "dice" in summary:
        both_empty = summary["reference_pixels"] == 0 and not summary["tumor_found"]
        text += (f"\n\n**Dice against the reference mask: {summary['dice']:.3f}**"
                 + (" (no tumor in either)" if both_empty else " (blue outline: reference)"))
    if name:
        shown = name.replace("`", "'")
        text += f"\n\nSlice: `{shown}` ({summary['width']}x{summary['height']})"
    if synthetic:
        text += "\n\n*This example is a synthetic phantom made by the project, not a real MRI.*"
    for note in notes:
        text += f"\n\n*Note: {note}.*"
    return text


# ---------------------------------------------------------------------------------------------
# Volumes: several slices of one patient, or a zip of them

def shared_prefix(names: list[str]) -> str:
    """The start all names share, never cut inside a number: slices 10-19 of P share 'P_', not 'P_1'."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    return prefix[:len(prefix.rstrip("0123456789"))]


def short_labels(names: list[str]) -> list[str]:
    """Slice names without their shared prefix: 'TCGA_CS_4941_19960909_12' -> '12'."""
    prefix = shared_prefix(names)
    return [n[len(prefix):] or n for n in names]


def natural_key(name: str) -> list:
    """'P_10.tif' after 'P_9.tif': digits compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_volume(paths: list[str | Path]) -> tuple[list[str], list[Slice], dict[str, np.ndarray]]:
    """Files and zips -> (slice names, slices, reference masks by name), in natural name order.

    Files named ``<name>_mask.<ext>`` are reference masks of ``<name>``; everything else that
    is not an image is refused with one line.
    """
    # Every limit holds before anything is decoded: a small compressed file can decode to 50 MB of pixels.
    if len(paths) > 2 * MAX_VOLUME_SLICES:
        raise InputError(f"{len(paths)} files; at most {MAX_VOLUME_SLICES} slices (and their masks) are accepted")
    files: list[tuple[str, bytes]] = []
    for path in paths:
        path = Path(path)
        if path.suffix.lower() != ".zip":
            files.append((path.name, read_upload(path)))
            if sum(len(data) for _, data in files) > 4 * MAX_FILE_MB * 2**20:
                raise InputError(f"the files hold more than {4 * MAX_FILE_MB} MB in all")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir() and "__MACOSX" not in m.filename
                           and not Path(m.filename).name.startswith(".")
                           and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES]
                if len(members) > 2 * MAX_VOLUME_SLICES:
                    raise InputError(f"{path.name}: {len(members)} images; at most {MAX_VOLUME_SLICES} slices are accepted")
                if sum(m.file_size for m in members) > 4 * MAX_FILE_MB * 2**20:
                    raise InputError(f"{path.name}: the zip unpacks to more than {4 * MAX_FILE_MB} MB")
                files += [(Path(m.filename).name, archive.read(m)) for m in members]
        except zipfile.BadZipFile:
            raise InputError(f"{path.name}: not a valid zip file") from None
        except (RuntimeError, NotImplementedError) as error:  # encrypted, or packed by a method zipfile lacks
            raise InputError(f"{path.name}: cannot unpack ({str(error).splitlines()[0]}); "
                             "zip the slices without a password, with the usual Deflate method") from None
    is_mask = [Path(name).stem.endswith("_mask") for name, _ in files]
    if len(files) - sum(is_mask) > MAX_VOLUME_SLICES or sum(is_mask) > MAX_VOLUME_SLICES:
        raise InputError(f"{len(files) - sum(is_mask)} slices and {sum(is_mask)} masks; at most {MAX_VOLUME_SLICES} "
                         "of each are accepted")
    masks, slices = {}, {}
    pixels = {True: 0, False: 0}  # masks, slices: each stops at the limit, one image past it at most decoded
    for (name, data), mask in zip(files, is_mask):
        stem = Path(name).stem
        if mask:
            array = masks[stem[:-5]] = load_mask(data, name)
        else:
            slices[stem] = decode_image(data, name)
            array = slices[stem].image
        pixels[mask] += array.shape[0] * array.shape[1]
        if pixels[mask] > MAX_VOLUME_PIXELS:
            raise InputError(f"the {'masks' if mask else 'slices'} hold more than {MAX_VOLUME_PIXELS / 1e6:.0f} "
                             "megapixels in all")
    if not slices:
        raise InputError("no image slices found among the uploaded files")
    names = sorted(slices, key=natural_key)
    for name in names:
        if name in masks and masks[name].shape != slices[name].image.shape[:2]:
            raise InputError(f"{name}_mask: mask size differs from its slice")
    return names, [slices[n] for n in names], {n: masks[n] for n in names if n in masks}


def volume_results(model: UNet, names: list[str], images: list[np.ndarray], probs: list[np.ndarray],
                   references: dict[str, np.ndarray], threshold: float) -> tuple[list, list[np.ndarray], dict]:
    """Threshold every slice, then apply the model's whole-volume post-processing:
    (gallery items (overlay, caption), masks, volume summary)."""
    masks = [threshold_mask(model, prob, threshold) for prob in probs]
    volume_step, removed = "off", 0
    if model.largest_3d_component and masks:
        if len({m.shape for m in masks}) == 1:
            before = int(sum(m.sum() for m in masks))
            masks = list(keep_largest_volume_component(np.stack(masks)))
            volume_step, removed = "on", before - int(sum(m.sum() for m in masks))
        else:
            volume_step = "skipped: the slices differ in size"
    gallery, counts = [], []
    tumor_total = brain_total = 0
    for name, label, image, mask in zip(names, short_labels(names), images, masks):
        ref = references.get(name)
        caption = f"{label}: {int(mask.sum()):,} px" if mask.any() else f"{label}: no tumor"
        if ref is not None:
            c = pixel_counts(mask[None], ref[None])[0]
            counts.append(c)
            caption += f" · Dice {float(dice(*c)):.2f}"
        gallery.append((draw_overlay(image, mask, ref), caption))
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
        "threshold": round(float(threshold), 4),
        "largest_3d_component": volume_step,  # the model config's whole-volume step
        "pixels_outside_largest_3d_component": removed,
        "per_slice_pixels": dict(zip(names, areas)),
    }
    if counts:
        total = np.sum(counts, axis=0)
        summary["references"] = len(counts)
        summary["dice"] = round(float(dice(*total)), 4)
    return gallery, masks, summary


def volume_markdown(summary: dict) -> str:
    if not summary["tumor_pixels"]:
        text = (f"### No tumor found on any of the {summary['slices']} slices\n"
                f"(threshold {summary['threshold']:.2f})")
    else:
        text = (f"### Tumor on {summary['slices_with_tumor']} of {summary['slices']} slices: "
                f"{summary['tumor_pixels']:,} pixels in all\n"
                f"That is **{summary['tumor_share_of_brain'] * 100:.1f} %** of the brain across the slices "
                f"({summary['brain_pixels']:,} pixels); the largest area is on {summary['largest_slice']} "
                f"(threshold {summary['threshold']:.2f}).")
    step = summary["largest_3d_component"]
    if step == "on":
        text += (f"\n\nAs the model's config asks, only the largest 3D tumor component across the slices is kept: "
                 f"{summary['pixels_outside_largest_3d_component']:,} predicted pixels outside it were removed.")
    elif step != "off":
        text += f"\n\nThe model's largest-3D-component step was {step}."
    if "dice" in summary:
        text += (f"\n\n**Dice against the reference masks (whole volume, {summary['references']} slices): "
                 f"{summary['dice']:.3f}**")
    return text


# ---------------------------------------------------------------------------------------------
# Examples

@dataclass(frozen=True)
class Example:
    image: Path  # a PNG copy in the app's work folder (browsers cannot show TIFF)
    mask: Path | None  # reference mask PNG (0/255), if there is one
    caption: str
    synthetic: bool


def find_examples(folder: Path, limit: int = 6,
                  held_out: list[str] | None = None) -> tuple[list[tuple[Path, Path | None, str]], bool]:
    """(image, reference mask or None, 'tumor'|'healthy'|'') from a folder of images or a kaggle_3m folder,
    and whether they are all slices of the ``held_out`` patients (the model's test split).

    From a kaggle_3m folder: the slices `unet.data.example_slices` picks (as `unet.push` does), taken
    from the ``held_out`` patients where the folder has them, so the Dice shown on an example is not
    that of a slice the model learned.
    """
    root = find_kaggle_3m(folder)
    if any(root.glob("*/*_mask.tif")):
        df = scan_dataset(root, check_images=False)
        from_held_out = bool(held_out) and df["patient"].isin(held_out).any()
        if from_held_out:
            df = df[df["patient"].isin(held_out)]
        else:
            log.warning("none of the model's test patients are in %s: examples may be slices it trained on", root)
        chosen = example_slices(df, tumor=limit // 2, healthy=limit // 2)
        return [(Path(r.image_path), Path(r.mask_path), "tumor" if r.has_tumor else "healthy")
                for r in chosen.itertuples()], from_held_out
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.endswith("_mask"):
            continue
        mask = next((m for m in (path.with_name(f"{path.stem}_mask{s}") for s in IMAGE_SUFFIXES) if m.is_file()), None)
        kind = next((k for k in ("tumor", "healthy") if path.stem.lower().endswith(k)), "")
        found.append((path, mask, kind))
    picked = [f for f in found if f[2] == "tumor"][:limit // 2] + [f for f in found if f[2] == "healthy"][:limit // 2]
    picked += [f for f in found if f not in picked][:limit - len(picked)]
    # unet.push names its examples <PATIENT>_<n>_<kind>: which split they came from is read off the name.
    from_held_out = bool(held_out and picked) and all(path.stem.rsplit("_", 2)[0] in held_out for path, _, _ in picked)
    return sorted(picked, key=lambda item: {"tumor": 0, "healthy": 1}.get(item[2], 2)), from_held_out


def prepare_examples(folder: Path, out_dir: Path, synthetic: bool,
                     held_out: list[str] | None = None) -> tuple[list[Example], bool]:
    """Decode each example (TIFF included) once and write PNG copies the browser can show; and
    whether they are slices of the ``held_out`` patients."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, counts = [], {}
    found, from_held_out = find_examples(folder, held_out=held_out)
    for i, (path, mask_path, kind) in enumerate(found):
        try:
            sl = load_slice(path)
            mask = load_mask(read_upload(mask_path), mask_path.name) if mask_path else None
        except InputError as error:
            log.warning("skipping example: %s", error)
            continue
        if mask is not None and mask.shape != sl.image.shape[:2]:
            log.warning("skipping example %s: mask size differs", path)
            continue
        if not kind and mask is not None:
            kind = "tumor" if mask.any() else "healthy"
        (out_dir / str(i)).mkdir(exist_ok=True)
        image_out = out_dir / str(i) / f"{path.stem}.png"
        Image.fromarray(sl.image).save(image_out)
        mask_out = None
        if mask is not None:
            mask_out = out_dir / str(i) / f"{path.stem}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_out)
        counts[kind] = counts.get(kind, 0) + 1
        examples.append(Example(image_out, mask_out, f"{kind.capitalize() or 'Example'} {counts[kind]}", synthetic))
    return examples, from_held_out


def choose_examples(serving: ServingModel, examples_dir: str | Path | None) -> tuple[Path, str, bool]:
    """(folder, where it came from, synthetic): --examples, else the model's, else the project's."""
    if examples_dir:
        folder = Path(examples_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"examples folder not found: {folder}")
        return folder, f"from {folder.name}", False
    if serving.examples_dir is not None:
        return serving.examples_dir, "published with the model", False
    return PROJECT_EXAMPLES_DIR, "synthetic, not real MRI", True


def load_examples(serving: ServingModel, examples_dir: str | Path | None, out_dir: Path) -> tuple[list[Example], str]:
    """The gallery's examples, written to ``out_dir``, and a label that says where they come from."""
    folder, source, synthetic = choose_examples(serving, examples_dir)
    try:
        held_out = (recorded_metrics(serving.model_dir).get("splits") or {}).get("test")
    except DatasetError as error:  # the model still serves; only the choice of examples needs the record
        log.warning("%s: examples may be slices the model trained on", error)
        held_out = None
    examples, from_test_patients = prepare_examples(folder, out_dir, synthetic, held_out)
    if from_test_patients:
        source += " · slices of its test patients"
    if not examples and folder != PROJECT_EXAMPLES_DIR:
        log.warning("no usable examples in %s; using the project's synthetic examples", folder)
        source = "synthetic, not real MRI"
        examples, _ = prepare_examples(PROJECT_EXAMPLES_DIR, out_dir, True)
    log.info("%d examples %s", len(examples), source)
    return examples, source


def card_body(model_dir: Path) -> str:
    """The model card without its YAML header, or '' if there is none."""
    card = model_dir / "README.md"
    if not card.is_file():  # checked first: ModelCard.load takes a missing path for a repo id
        return ""
    try:
        return ModelCard.load(card, ignore_metadata_errors=True).text.strip()
    except Exception:  # noqa: BLE001 - a hand-edited card must not stop the app: show it as it is
        return card.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# The page

START_TEXT = "### Upload a slice or click an example to start\nThe result appears here in a second or two."
CSS = """
#title h1 { margin-bottom: 0.2em; }
#disclaimer { border-left: 4px solid #dc2626; padding: 0.4em 0.8em; background: rgba(220, 38, 38, 0.06); }
#summary h3 { margin-top: 0.2em; }
"""


def build_demo(serving: ServingModel, examples_dir: str | Path | None = None) -> gr.Blocks:
    """The Gradio app around one loaded model. Tests build it with a tiny model."""
    model = prepare_for_inference(serving.model)
    predict(model, np.zeros((model.image_size, model.image_size, 3), np.uint8))  # warm-up: first user waits less
    work = Path(tempfile.mkdtemp(prefix="brain-mri-app-"))
    atexit.register(shutil.rmtree, work, True)
    examples, source = load_examples(serving, examples_dir, work / "examples")
    default_threshold = round(float(model.threshold), 2)

    def write_file(name: str, write: Callable[[Path], None]) -> str:
        """A fresh file in the work folder for a download (Gradio copies it into its cache);
        downloads older than an hour are swept away so a long-running Space does not fill its disk."""
        for old in work.glob("download-*"):
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        path = work / f"download-{uuid.uuid4().hex}" / name
        path.parent.mkdir()
        write(path)
        return str(path)

    def save_png(name: str, array: np.ndarray) -> str:
        # Level 1 writes a slice in ~8 ms instead of ~27 ms (Pillow's default 6); the overlay grows by ~14%.
        return write_file(name, lambda p: Image.fromarray(array).save(p, compress_level=1))

    def show_single(state: dict, threshold: float) -> tuple:
        """(overlay, summary markdown, mask file) of the kept probabilities at a threshold."""
        mask = threshold_mask(model, state["prob"], threshold)
        summary = slice_summary(state["image"], state["prob"], mask, threshold, state["reference"])
        mask_file = save_png(f"{state['name']}_mask.png", mask.astype(np.uint8) * 255)
        return (save_png(f"{state['name']}_overlay.png", draw_overlay(state["image"], mask, state["reference"])),
                summary_markdown(summary, state["notes"], state["synthetic"], state["name"]),
                gr.DownloadButton(value=mask_file, interactive=True))

    def run_single(sl: Slice, name: str, threshold: float, reference: np.ndarray | None = None,
                   synthetic: bool = False) -> tuple:
        start = time.perf_counter()
        state = {"image": sl.image, "prob": predict(model, sl.image), "reference": reference, "name": name,
                 "notes": sl.notes, "synthetic": synthetic}
        log.info("segmented a %dx%d slice in %.2f s", sl.image.shape[1], sl.image.shape[0], time.perf_counter() - start)
        overlay, text, mask_file = show_single(state, threshold)
        # The upload box is emptied again, ready for the next file; the preview shows what is loaded.
        return (None, save_png(f"{name}.png", sl.image), overlay, save_png(f"{name}_probability.png",
                probability_image(state["prob"])), text, mask_file, state)

    def no_download() -> gr.DownloadButton:
        return gr.DownloadButton(value=None, interactive=False)

    def failed(message: str) -> tuple:
        gr.Warning(message)
        return None, None, None, None, f"### Could not use this file\n{message}", no_download(), None

    def on_upload(path: str | None, threshold: float) -> tuple:
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            return run_single(load_slice(path), Path(path).stem, threshold)
        except InputError as error:
            return failed(str(error))

    def on_example(threshold: float, evt: gr.SelectData) -> tuple:
        example = examples[evt.index]
        reference = binary_mask(np.asarray(Image.open(example.mask))) if example.mask else None
        return run_single(load_slice(example.image), example.image.stem, threshold, reference, example.synthetic)

    def on_threshold(state: dict | None, threshold: float) -> tuple:
        if state is None:
            return gr.skip(), gr.skip(), gr.skip()
        return show_single(state, threshold)

    def on_volume(paths: list[str] | None, threshold: float, progress: gr.Progress = gr.Progress()) -> tuple:
        if not paths:
            return None, "", None, None, None
        try:
            names, slices, references = read_volume(paths)
        except InputError as error:
            gr.Warning(str(error))
            return None, f"### Could not use these files\n{error}", None, None, None
        images = [s.image for s in slices]
        start = time.perf_counter()
        probs = predict_volume(model, images, lambda done: progress((done, len(images)), desc="segmenting slices"))
        log.info("segmented a volume of %d slices in %.2f s", len(images), time.perf_counter() - start)
        state = {"names": names, "images": images, "probs": probs, "references": references}
        return show_volume(state, threshold) + (state,)

    def show_volume(state: dict, threshold: float) -> tuple:
        gallery, masks, summary = volume_results(model, state["names"], state["images"], state["probs"],
                                                 state["references"], threshold)

        def write_zip(path: Path) -> None:
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, mask in zip(state["names"], masks):
                    buffer = io.BytesIO()
                    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
                    archive.writestr(f"{name}_mask.png", buffer.getvalue())

        labels = short_labels(state["names"])
        plot = pd.DataFrame({"slice": labels, "tumor pixels": [int(m.sum()) for m in masks]})
        names = state["names"]
        patient = (shared_prefix(names) if len(names) > 1 else names[0]).rstrip("_- ") or "volume"
        return gallery, volume_markdown(summary), gr.BarPlot(plot, sort=labels), write_file(f"{patient}_masks.zip", write_zip)

    def on_volume_threshold(state: dict | None, threshold: float) -> tuple:
        if state is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return show_volume(state, threshold)

    def api_segment(image: str, threshold: float | None) -> tuple[str, str, dict]:
        """Segment one MRI slice. image: a PNG, JPEG or TIFF file; threshold: 0..1 (model default if empty).
        Returns the overlay PNG, the mask PNG (0/255) and a summary (tumor_pixels, tumor_share_of_brain, ...)."""
        try:
            if not image:
                raise InputError("no image given")
            overlay, mask, summary = segment_image(model, image, None if threshold is None else float(threshold))
        except InputError as error:  # the client's mistake: one line in the log, not a server traceback
            log.info("/segment refused: %s", error)
            raise gr.Error(str(error), print_exception=False) from None
        # Files, not arrays: Gradio caches an array by rewriting a content-hashed path on every request,
        # so clients fetching identical outputs at once could read a half-written file; a file is copied
        # into the cache atomically.
        return save_png("overlay.png", overlay), save_png("mask.png", mask), summary

    model_line = f"**Model:** {serving.description}"
    if serving.notice:
        model_line += f"  \n⚠️ {serving.notice}"
    card = card_body(serving.model_dir)
    heavy = dict(concurrency_id="model", api_visibility="private")  # one queue with /segment, sized by --concurrency
    light = dict(api_visibility="private", show_progress="hidden", trigger_mode="always_last", concurrency_limit=4)
    with gr.Blocks(title="Brain MRI tumor segmentation", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Brain MRI tumor segmentation\n"
                    "Upload one axial slice of a brain MRI and a U-Net marks the lower-grade glioma "
                    "(the FLAIR abnormality) in red. Slices are expected as in the LGG dataset: "
                    "pre-contrast, FLAIR and post-contrast in the red, green and blue channels.",
                    elem_id="title")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        gr.Markdown(model_line, elem_id="model-info")
        with gr.Tab("One slice"):
            with gr.Row(equal_height=True):
                upload = gr.File(label="1. Upload an MRI slice (PNG, JPEG or TIFF)", elem_id="upload", height=190,
                                 scale=1, min_width=260)
                example_gallery = gr.Gallery(
                    value=[(str(e.image), e.caption) for e in examples], label=f"…or click an example ({source})",
                    columns=max(4, len(examples)), height=190, allow_preview=False, object_fit="contain", buttons=[],
                    elem_id="examples", scale=2, visible=bool(examples))
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    summary = gr.Markdown(START_TEXT, elem_id="summary",
                                          min_height=120)
                    threshold = gr.Slider(0.01, 0.99, value=default_threshold, step=0.01, label="2. Threshold",
                                          info="A pixel is tumor when its probability reaches this. "
                                               f"Lower finds more; the model's tuned value is {default_threshold:.2f}.",
                                          elem_id="threshold")
                    mask_file = gr.DownloadButton("3. Download the mask (PNG)", interactive=False, elem_id="mask-file")
                with gr.Column(scale=3):
                    with gr.Row():
                        preview = gr.Image(label="Your slice", format="png", interactive=False, height=320,
                                           elem_id="preview")
                        overlay = gr.Image(label="Prediction: tumor in red", format="png", interactive=False,
                                           height=320, elem_id="overlay")
                        prob_image = gr.Image(label="Tumor probability", format="png",
                                              interactive=False, height=320, elem_id="probability")
            single_state = gr.State(None, time_to_live=3600)
        with gr.Tab("Volume (several slices)"):
            gr.Markdown("Upload all slices of one patient, as several files or one zip, taken in the order of the "
                        "numbers in their names. Files named "
                        "`<slice>_mask.png` (or `.tif`) are taken as reference masks and scored with Dice."
                        + (" The model sees each slice with its neighbouring slices, so upload consecutive "
                           "slices." if model.context_slices else "")
                        + (" As the model's config asks, only the largest 3D tumor component across the slices is "
                           "kept, a step a single slice cannot take." if model.largest_3d_component else ""),
                        elem_id="volume-help")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    volume_upload = gr.File(label="Slices of one patient (images or a .zip)", file_count="multiple",
                                            elem_id="volume-upload", height=160)
                    volume_threshold = gr.Slider(0.01, 0.99, value=default_threshold, step=0.01, label="Threshold",
                                                 elem_id="volume-threshold")
                    volume_file = gr.File(label="Download all masks (zip)", interactive=False, height=80)
                    volume_plot = gr.BarPlot(x="slice", y="tumor pixels", label="Tumor area by slice", height=240,
                                              sort=None, x_label_angle=-45, y_axis_format="d")
                with gr.Column(scale=2):
                    volume_summary = gr.Markdown("", elem_id="volume-summary")
                    volume_gallery = gr.Gallery(label="Every slice (tumor in red); click to enlarge", columns=5,
                                                height=560, object_fit="contain", format="png",
                                                elem_id="volume-gallery")
            volume_state = gr.State(None, time_to_live=3600)
        with gr.Accordion("About the model and this demo", open=False):
            gr.Markdown(f"{model_line}\n\nExamples: {source}.\n\n{card}\n\n---\n{DISCLAIMER}")
        with gr.Column(visible=False):  # the /segment API endpoint: simple inputs and outputs
            api_image = gr.File(label="image", type="filepath")
            api_threshold = gr.Number(value=default_threshold, label="threshold")
            api_overlay = gr.Image(label="overlay", format="png")
            api_mask = gr.Image(label="mask", format="png", image_mode="L")
            api_summary = gr.JSON(label="summary")
            api_button = gr.Button("segment")

        single_outputs = [upload, preview, overlay, prob_image, summary, mask_file, single_state]
        upload.upload(on_upload, [upload, threshold], single_outputs, **heavy)
        example_gallery.select(on_example, [threshold], single_outputs, **heavy)
        threshold.change(on_threshold, [single_state, threshold], [overlay, summary, mask_file], **light)
        volume_outputs = [volume_gallery, volume_summary, volume_plot, volume_file]
        volume_upload.upload(on_volume, [volume_upload, volume_threshold], volume_outputs + [volume_state], **heavy)
        volume_upload.clear(lambda: (None, "", None, None, None), None, volume_outputs + [volume_state],
                            api_visibility="private")
        volume_threshold.change(on_volume_threshold, [volume_state, volume_threshold], volume_outputs, **light)
        api_button.click(api_segment, [api_image, api_threshold], [api_overlay, api_mask, api_summary],
                         api_name="segment", concurrency_id="model")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1,
           prevent_thread_lock: bool = False) -> None:
    """Queue (so concurrent users wait their turn, not fail) and serve, with bounded uploads."""
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{MAX_FILE_MB}mb", theme=gr.themes.Soft(),
                css=CSS, prevent_thread_lock=prevent_thread_lock, show_error=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_spaces = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MODEL_ID"),
                   help="model folder or Hub repo id (env MODEL_ID; default: the shipped models/brain-mri-unet)")
    p.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub branch, tag or commit (env MODEL_REVISION)")
    p.add_argument("--examples", default=None,
                   help="folder of example slices (with <name>_mask.png references) or a kaggle_3m folder "
                        "(default: the model's examples, else the project's synthetic ones)")
    p.add_argument("--host", default="0.0.0.0" if on_spaces else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default: %(default)s; 0.0.0.0 on Spaces)")
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    if not port.strip().isdigit():
        p.error(f"GRADIO_SERVER_PORT={port!r} is not a port number")
    p.add_argument("--port", type=int, default=int(port), help="(default: %(default)s, or GRADIO_SERVER_PORT)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests the model serves at once; more wait in the queue (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be from 1 to 65535, not {args.port}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, not {args.concurrency}: with none, every request waits forever")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.model and not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        log.error("no model to serve: %s is missing; pass --model FOLDER_OR_REPO_ID (or set MODEL_ID)",
                  SHIPPED_MODEL_DIR.relative_to(ROOT))
        return 2
    try:
        serving = load_for_serving(args.model, args.revision)
        demo = build_demo(serving, args.examples)
    except Exception as error:  # one line for the operator, not a traceback
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.error("cannot start the app with model %s: %s", args.model or SHIPPED_MODEL_DIR.name, first)
        return 2
    log.info("serving %s%s", serving.description, f" ({serving.notice})" if serving.notice else "")
    try:
        launch(demo, args.host, args.port, args.concurrency)
    except OSError as error:  # a port in use or an address this machine does not have
        log.error("cannot listen on %s:%d (%s): check --host and --port", args.host, args.port,
                  str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
