"""Inference: any image in, a mask out, with the model's own pre- and post-processing.

The model's config (see `unet.model.UNet`) fixes channel order, normalisation, input size,
threshold, small-component removal, hole filling and flip test-time augmentation, so evaluate, the app
and the benchmarks all produce the same mask from the same slice. Two things use a patient's other
slices where whole volumes are segmented (evaluate, the app's volume tab): a context model's
neighbouring input slices (``volume=True``; a lone slice stands in for its own neighbours), and the
largest 3D component, `keep_largest_volume_component`, never applied by `segment`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from scipy import ndimage

from unet.data import context_indices, normalize
from unet.model import UNet


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())


def pick_device(name: str = "auto") -> torch.device:
    """A device by name; auto takes CUDA, then Apple's MPS, then the CPU. ValueError for one not here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: no MPS device on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device and a --precision choice; None means plain fp32.

    auto: bf16 on CUDA and on a CPU with bf16 units. A GPU older than Ampere only emulates bf16,
    slowly, so it gets fp16 (which training pairs with loss scaling).
    """
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast to `autocast_dtype`, or plain fp32."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded image array -> HxWx3 uint8 in RGB (file) order.

    Grayscale is repeated into three channels, alpha is dropped, and 16-bit or float data is
    rescaled by its own range, since such files carry no fixed 0-255 scale.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected a grayscale, RGB or RGBA image, got an array of shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        low, high = float(image.min()), float(image.max())
        image = np.zeros(image.shape, np.uint8) if high <= low else ((image - low) * (255.0 / (high - low))).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def model_input(model: UNet, image: np.ndarray) -> torch.Tensor:
    """One image -> the (3, S, S) tensor of one slice as the model takes it: RGB, resized, normalised."""
    image = to_rgb_uint8(image)
    if model.channel_order == "BGR":
        image = image[..., ::-1]
    size = model.image_size
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return normalize(image, model.mean, model.std, model.normalization)


def context_batch(model: UNet, images: np.ndarray | list[np.ndarray], start: int, stop: int,
                  volume: bool = False) -> torch.Tensor:
    """The model's input for ``images[start:stop]``, (N, 3(2K+1), S, S): each slice's `model_input` with its
    K context slices on each side stacked along channels in slice order, from the list with ``volume``
    (the list's end slice standing in past an end), else the slice itself."""
    k = model.context_slices
    if not k:  # the one-slice path, kept as cheap as before context slices existed
        return torch.stack([model_input(model, images[i]) for i in range(start, stop)])
    # with a volume, the first and last slices need up to k slices beyond the range
    first, last = (max(start - k, 0), min(stop + k, len(images))) if volume else (start, stop)
    slices = {i: model_input(model, images[i]) for i in range(first, last)}
    return torch.stack([
        torch.cat([slices[j] for j in (context_indices(i, len(images), k) if volume else [i] * (2 * k + 1))])
        for i in range(start, stop)
    ])


def predict_proba(model: UNet, images: np.ndarray | list[np.ndarray], batch_size: int = 8,
                  precision: str = "auto", volume: bool = False) -> list[np.ndarray]:
    """RGB uint8 images (H, W, 3) -> tumor probabilities (H, W) float32, one per image.

    Images are resized to the model's input size and the probabilities back to each image's
    own size, so odd-sized uploads work. A model with context slices sees each image with its
    neighbours: with ``volume`` the images are one patient's consecutive slices in slice order and
    the neighbours come from the list; without it each image is its own neighbour on every side.
    """
    return list(iter_proba(model, images, batch_size, precision, volume))


def iter_proba(model: UNet, images: np.ndarray | list[np.ndarray], batch_size: int = 8,
               precision: str = "auto", volume: bool = False) -> Iterator[np.ndarray]:
    """`predict_proba`, yielding each probability map as its batch is done (for a progress bar)."""
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        batch = context_batch(model, images, start, stop, volume).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_for(device, precision):
            logits = model(batch).float()
            if model.tta_flips:
                logits = (logits + model(batch.flip(-1)).float().flip(-1)) / 2
            prob = torch.sigmoid(logits)[:, 0].cpu().numpy()
        for p, i in zip(prob, range(start, stop)):
            shape = np.shape(images[i])[:2]
            yield p if p.shape == shape else cv2.resize(p, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def postprocess(prob: np.ndarray, threshold: float, min_component_area: int = 0,
                area_size: int | None = None, fill_holes: bool = False) -> np.ndarray:
    """Probability map (H, W) -> binary mask, dropping connected components under the area, then
    (``fill_holes``) filling the holes of those kept: the reference masks outline whole tumors, so an
    unsure patch inside a predicted tumor is a miss, never healthy tissue.

    With ``area_size`` (the model's input size), the area counts pixels of an ``area_size`` square
    image and is scaled to the map's own size, so a slice uploaded at twice the resolution loses the
    same blobs; without it, pixels of the map as given.
    """
    mask = (prob >= threshold).astype(np.uint8)
    if area_size:
        min_component_area = round(min_component_area * prob.size / area_size**2)
    if min_component_area > 0 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_component_area
        mask = keep[labels].astype(np.uint8)
    if fill_holes and mask.any():
        return fill_mask_holes(mask.astype(bool))
    return mask.astype(bool)


def fill_mask_holes(mask: np.ndarray) -> np.ndarray:
    """A 2D mask with every background region that does not reach the border set, as
    `scipy.ndimage.binary_fill_holes` does; a flood fill from outside is 10x faster on a 256x256 slice."""
    outside = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(outside, None, (0, 0), 1)
    return mask | (outside[1:-1, 1:-1] == 0)


def keep_largest_volume_component(masks: np.ndarray) -> np.ndarray:
    """(S, H, W) masks of one patient's slices, in slice order -> only the largest 3D connected component.

    Whole-volume post-processing, as Buda et al.'s reference code does: a stray blob that touches no other
    slice's tumor is far more often a false positive than a second lesion. It needs the patient's
    neighbouring slices, so evaluation can apply it and the single-slice app cannot.
    """
    labels, count = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return masks.astype(bool)
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def segment(model: UNet, images: np.ndarray | list[np.ndarray], threshold: float | None = None,
            batch_size: int = 8, precision: str = "auto",
            volume: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images -> (boolean masks, probabilities), with the model's threshold unless one is given;
    ``volume`` as for `predict_proba`."""
    probs = predict_proba(model, images, batch_size=batch_size, precision=precision, volume=volume)
    t = model.threshold if threshold is None else threshold
    return [postprocess(p, t, model.min_component_area, model.image_size, model.fill_holes) for p in probs], probs


def prepare_for_inference(model: UNet) -> UNet:
    """eval mode and channels_last: the layout oneDNN's convolutions run fastest in."""
    return model.eval().to(memory_format=torch.channels_last)
