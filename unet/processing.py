"""How an image becomes the network's input, and its probabilities a mask: settings saved beside the weights.

Two frozen records, each with one home for its defaults and a file of its own in the model folder, as
transformers keeps ``preprocessor_config.json`` beside ``config.json`` and nnU-Net saves the post-processing
its own step chose:

- `Preprocessing` (``preprocessor_config.json``): channel order, input size, normalisation, mean/std;
- `Postprocessing` (``postprocessor_config.json``): threshold, minimum component area, hole filling,
  flip test-time augmentation, largest 3D component. Chosen on validation by `unet.tuning`.

Channel order, written down once: slices are handled in the file's own order, which the dataset calls RGB and
which is (pre-contrast, FLAIR, post-contrast); `unet.reader` gives every image in that order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
POSTPROCESSOR_FILE = "postprocessor_config.json"

# Per-channel statistics of the LGG training slices scaled to [0, 1] (pre-contrast, FLAIR, post-contrast), measured
# on the 42 training patients of the 60-patient subset's default split: used by normalization="dataset" only.
LGG_MEAN = (0.1018, 0.0848, 0.0890)
LGG_STD = (0.1432, 0.1256, 0.1315)
VOLUME_COMPONENT_MEASURES = ("voxels", "probability")  # what the largest 3D component is measured by


@dataclass(frozen=True)
class Preprocessing:
    """RGB uint8 slice -> the network's (3, S, S) float input."""

    channel_order: str = "RGB"  # the order the network reads; "BGR" flips the file's order
    image_size: int = 256
    normalization: str = "slice"  # "slice": each slice's own statistics; "dataset": the fixed mean/std below
    mean: tuple[float, ...] = LGG_MEAN
    std: tuple[float, ...] = LGG_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.normalization not in ("dataset", "slice"):
            raise ValueError(f"normalization must be 'dataset' or 'slice', got {self.normalization!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive whole number, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not min(self.std) > 0:
            raise ValueError(
                f"mean and std must hold three values (one per channel) and std be above 0, got "
                f"{list(self.mean)} and {list(self.std)}"
            )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """One RGB uint8 slice of any size -> (3, S, S) float32: channel order, resized, normalised."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 RGB slice (see unet.reader), got {image.dtype} {image.shape}")
        if self.channel_order == "BGR":
            image = image[..., ::-1]
        if image.shape[:2] != (self.image_size, self.image_size):
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return normalize(image, self.mean, self.std, self.normalization)


@dataclass(frozen=True)
class Postprocessing:
    """Probabilities -> masks; the defaults are the untuned ones, `unet.tuning` chooses on validation."""

    threshold: float = 0.5  # a pixel is tumor when its probability reaches this
    min_component_area: int = 0  # connected components under this many pixels (at the input size) are dropped
    fill_holes: bool = False  # fill the holes of the components kept
    tta_flips: bool = False  # average the logits of the slice and its left-right mirror
    largest_3d_component: bool = False  # whole volumes: keep only each patient's largest 3D component
    # what "largest" measures: "voxels" (Buda et al.'s reference code) or "probability", the sum of the network's
    # probabilities over the component, so a wide faint blob cannot outweigh a smaller tumor the network is sure of
    largest_3d_component_by: str = "voxels"

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:  # NaN fails too
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if not isinstance(self.min_component_area, int) or self.min_component_area < 0:
            raise ValueError(f"min_component_area must be a whole number from 0, got {self.min_component_area!r}")
        for name in ("fill_holes", "tta_flips", "largest_3d_component"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.largest_3d_component_by not in VOLUME_COMPONENT_MEASURES:
            raise ValueError(
                f"largest_3d_component_by must be {' or '.join(VOLUME_COMPONENT_MEASURES)}, "
                f"got {self.largest_3d_component_by!r}"
            )

    @property
    def volume_step(self) -> str:
        """The whole-volume step in words: "off", or what the largest 3D component is measured by."""
        return f"largest 3D component by {self.largest_3d_component_by}" if self.largest_3d_component else "off"

    def slice_mask(self, prob: np.ndarray, area_size: int | None = None) -> np.ndarray:
        """Probability map (H, W) -> bool mask: threshold, drop small components, fill the holes of the rest.

        The reference masks outline whole tumors, so an unsure patch inside a predicted tumor is a miss, never
        healthy tissue. With ``area_size`` (the input size), the area counts pixels of an ``area_size`` square and
        is scaled to the map's own size, so a slice uploaded at twice the resolution loses the same blobs.
        """
        mask = (prob >= self.threshold).astype(np.uint8)
        min_area = self.min_component_area
        if area_size:
            min_area = round(min_area * prob.size / area_size**2)
        if min_area > 0 and mask.any():
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            keep = np.zeros(n, bool)
            keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
            mask = keep[labels].astype(np.uint8)
        if self.fill_holes and mask.any():
            return fill_mask_holes(mask.astype(bool))
        return mask.astype(bool)

    def volume_masks(self, masks: np.ndarray, probs: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(S, H, W) slice masks of one patient in slice order -> the same, after the whole-volume step.

        ``probs``, the slices' probability maps, are needed where the largest component is measured by probability.
        """
        if not self.largest_3d_component:
            return masks.astype(bool)
        if self.largest_3d_component_by == "voxels":
            return keep_largest_volume_component(masks)
        if probs is None or len(probs) != len(masks):
            raise ValueError("the largest 3D component by probability needs each slice's probability map")
        return keep_largest_volume_component(masks, probs)


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "slice") -> torch.Tensor:
    """HxWxC uint8 -> CxHxW float32 scaled to [0, 1], then standardised per channel.

    ``mode="dataset"`` uses the fixed ``mean``/``std`` of the training set; ``mode="slice"`` uses the slice's own
    statistics over its non-background pixels, which removes the scanner-to-scanner intensity differences between
    institutions.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    # The float copy leaves read-only arrays (Pillow's, Gradio's) and the caller's own untouched.
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)
    if mode == "slice":
        mean, std = slice_stats(image)
    return x.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)).div_(
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    )


def slice_stats(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of a uint8 HxWxC slice over its non-background pixels, all of them where
    fewer than 64 are non-zero, scaled to [0, 1]. Taken from 256-bin histograms: a third of the cost of reducing the
    float pixels, which made this the data loader's and the app's slowest step."""
    foreground = image[..., 0] > 0
    for channel in range(1, image.shape[2]):  # numpy's reductions over a short last axis are 10x slower
        foreground |= image[..., channel] > 0
    if np.count_nonzero(foreground) < 64:
        foreground = np.ones(foreground.shape, bool)
    levels = np.arange(256) / 255.0
    means, stds = [], []
    for channel in range(image.shape[2]):
        counts = np.bincount(image[..., channel][foreground], minlength=256)
        n = counts.sum()
        m = counts @ levels / n
        means.append(float(m))
        stds.append(max(float(np.sqrt(counts @ (levels - m) ** 2 / max(n - 1, 1))), 1e-3))
    return means, stds


def fill_mask_holes(mask: np.ndarray) -> np.ndarray:
    """A 2D mask with every background region that does not reach the border set, as
    `scipy.ndimage.binary_fill_holes` does; a flood fill from outside is 10x faster on a 256x256 slice."""
    outside = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(outside, None, (0, 0), 1)
    return mask | (outside[1:-1, 1:-1] == 0)


def label_volume_components(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """(S, H, W) masks -> (labels, count) of their 3D components, 26-connected: what the 3D step ranks."""
    return ndimage.label(masks, structure=np.ones((3, 3, 3), bool))


def keep_largest_volume_component(masks: np.ndarray, probs: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(S, H, W) masks of one patient's slices, in slice order -> only the largest 3D connected component: the one
    with the most voxels, or with ``probs`` (each slice's probability map) the greatest sum of probabilities.

    As Buda et al.'s reference code does: a stray blob that touches no other slice's tumor is far more often a false
    positive than a second lesion. It needs the patient's neighbouring slices, so one slice alone never gets it.
    Where the network misses most of a tumor, what it kept of it can have fewer voxels than a faint false blob
    (issue 28: DU_5852, 576 against 582); summed probability still ranks the tumor first.
    """
    labels, count = label_volume_components(masks)
    if count <= 1:
        return masks.astype(bool)
    if probs is None:
        sizes = np.bincount(labels.ravel())[1:]
    else:  # slice by slice, over the marked pixels only: no float64 copy of a whole volume
        sizes = np.zeros(count + 1)
        for slice_labels, prob in zip(labels, probs):
            marked = slice_labels > 0
            sizes += np.bincount(slice_labels[marked], weights=np.asarray(prob)[marked], minlength=count + 1)
        sizes = sizes[1:]
    return labels == 1 + int(np.argmax(sizes))


# ---------------------------------------------------------------------------------------------------------------
# On disk


def save_processing(folder: str | Path, preprocessing: Preprocessing, postprocessing: Postprocessing) -> None:
    folder = Path(folder)
    for name, settings in ((PREPROCESSOR_FILE, preprocessing), (POSTPROCESSOR_FILE, postprocessing)):
        (folder / name).write_text(json.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True) + "\n")


def load_processing(folder: str | Path, config: dict) -> tuple[Preprocessing, Postprocessing]:
    """The model folder's processing files; for a model saved before they existed, the settings its flat
    ``config.json`` held (with that code's defaults for any it lacks)."""
    folder = Path(folder)
    legacy = {key: value for key, value in config.items() if key in LEGACY_DEFAULTS}
    if legacy and not (folder / PREPROCESSOR_FILE).is_file():
        return _from_legacy_config(folder / "config.json", legacy)
    return (
        _read_settings(folder / PREPROCESSOR_FILE, Preprocessing),
        _read_settings(folder / POSTPROCESSOR_FILE, Postprocessing),
    )


def read_settings_file(path: Path) -> dict:
    """A model folder's JSON settings file as a dict, or ValueError naming the file."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} holds a JSON {type(settings).__name__}, not the model's settings")
    return settings


def _read_settings(path: Path, kind: type) -> Preprocessing | Postprocessing:
    """A settings file as ``kind``, or ValueError naming the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in model folder {path.parent}")
    settings = read_settings_file(path)
    known = [field.name for field in dataclasses.fields(kind)]
    unknown = sorted(settings.keys() - set(known))
    if unknown:  # a misspelt key would silently fall back to its default: another model than the one scored
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}; {path.name} takes {', '.join(known)}")
    _warn_missing(path, [name for name in known if name not in settings])
    try:
        return kind(**settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _warn_missing(path: Path, missing: list[str]) -> None:
    """A file written before a setting existed loads with its default, but says so: a misspelt or dropped key
    would otherwise change the model silently."""
    if missing:
        log.warning("%s lacks %s: the defaults are used", path, ", ".join(missing))


# The flat config.json of models saved before the processing files existed, with that code's constructor
# defaults: a setting such a file lacks was the default then, not the default now.
LEGACY_DEFAULTS = {
    "context_slices": 0,
    "image_size": 256,
    "channel_order": "RGB",
    "mean": LGG_MEAN,
    "std": LGG_STD,
    "normalization": "dataset",
    "threshold": 0.5,
    "min_component_area": 0,
    "fill_holes": False,
    "tta_flips": False,
    "largest_3d_component": False,
    "largest_3d_component_by": "voxels",
}
# settings that came after the flat config.json: no flat file ever had them, so their absence is no news
NEWER_THAN_LEGACY = ("context_slices", "largest_3d_component_by")


def _from_legacy_config(path: Path, legacy: dict) -> tuple[Preprocessing, Postprocessing]:
    if legacy.get("context_slices"):
        raise ValueError(
            f"{path}: a 2.5D model (context_slices {legacy['context_slices']}); 2.5D input was removed "
            "in brain-mri-unet 0.3 (EXPERIMENTS.md names the commit that still reads it)"
        )
    settings = LEGACY_DEFAULTS | legacy
    # a one-slice model never wrote context_slices
    _warn_missing(path, [key for key in LEGACY_DEFAULTS if key not in legacy and key not in NEWER_THAN_LEGACY])
    log.info("%s is a flat config of an earlier brain-mri-unet: its processing settings are read from it", path)
    try:
        pre = Preprocessing(**{f.name: settings[f.name] for f in dataclasses.fields(Preprocessing)})
        post = Postprocessing(**{f.name: settings[f.name] for f in dataclasses.fields(Postprocessing)})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    return pre, post
