"""The one road from images to probabilities to masks: a network with its pre- and post-processing.

    segmenter = Segmenter.from_pretrained("models/brain-mri-unet")   # a folder or a Hub repo id
    mask, prob = segmenter.segment_slice(image)                        # one RGB uint8 slice
    masks, probs = segmenter.segment_volume(images)                    # a patient's slices, in slice order

Evaluation, tuning, the app, the benchmarks and the Hub examples all go through this class, so a mask is made
one way wherever it is made. A slice on its own gets the per-slice post-processing; a volume also gets the
whole-volume step (the largest 3D component, by voxels or by summed probability) where the post-processing asks
for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors

from unet.device import autocast_for
from unet.hub import resolve_model_dir
from unet.model import ARCHITECTURE_KEYS, UNet
from unet.processing import (
    LEGACY_DEFAULTS,
    Postprocessing,
    Preprocessing,
    load_processing,
    read_settings_file,
    save_processing,
)


class Segmenter:
    """A network with the processing it was trained and tuned with, ready for inference."""

    def __init__(
        self,
        network: UNet,
        preprocessing: Preprocessing | None = None,
        postprocessing: Postprocessing | None = None,
        precision: str = "auto",
        batch_size: int = 16,
    ) -> None:
        self.preprocessing = preprocessing or Preprocessing()
        self.postprocessing = postprocessing or Postprocessing()
        if self.preprocessing.image_size % 2**network.depth:
            raise ValueError(
                f"image_size {self.preprocessing.image_size} must be a multiple of 2**depth = {2**network.depth}"
            )
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        # eval mode and channels_last: the layout oneDNN's convolutions run fastest in
        self.network = network.eval().to(memory_format=torch.channels_last)
        self.precision, self.batch_size = precision, batch_size

    @classmethod
    def from_pretrained(
        cls, source: str | Path, revision: str | None = None, device: str | torch.device = "cpu", **options: object
    ) -> Segmenter:
        """A model folder or Hub repo id: weights from safetensors only, loaded strictly; ``options`` as for
        the constructor (precision, batch_size)."""
        model_dir = resolve_model_dir(str(source), revision=revision)
        config = read_config(model_dir / "config.json")
        preprocessing, postprocessing = load_processing(model_dir, config)
        network = load_network(model_dir, {key: config[key] for key in ARCHITECTURE_KEYS if key in config}, device)
        return cls(network, preprocessing, postprocessing, **options)

    def save_pretrained(self, folder: str | Path) -> Path:
        """The Hub layout: config.json and model.safetensors (the network), and the two processing files."""
        folder = Path(folder)
        self.network.save_pretrained(folder)
        save_processing(folder, self.preprocessing, self.postprocessing)
        return folder

    def with_postprocessing(self, postprocessing: Postprocessing | None = None, **changes: object) -> Segmenter:
        """The same network with other post-processing (``changes`` to the current one): the app's threshold
        slider, tuning's candidates, an evaluation override."""
        post = dataclasses.replace(postprocessing or self.postprocessing, **changes)
        return Segmenter(self.network, self.preprocessing, post, self.precision, self.batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def iter_probabilities(self, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """RGB uint8 slices (H, W, 3) of any size -> tumor probabilities (H, W) float32 at each slice's own size,
        yielded as each batch is done (for a progress bar)."""
        device = self.device
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([self.preprocessing(image) for image in chunk])
            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_for(device, self.precision):
                logits = self.network(batch).float()
                if self.postprocessing.tta_flips:
                    logits = (logits + self.network(batch.flip(-1)).float().flip(-1)) / 2
                probs = torch.sigmoid(logits)[:, 0].cpu().numpy()
            for prob, image in zip(probs, chunk):
                height, width = np.shape(image)[:2]
                yield (
                    prob
                    if prob.shape == (height, width)
                    else cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
                )

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(self.iter_probabilities(images))

    def slice_mask(self, prob: np.ndarray) -> np.ndarray:
        """One probability map -> its mask with the per-slice post-processing."""
        return self.postprocessing.slice_mask(prob, self.preprocessing.image_size)

    def volume_masks(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        """One patient's probability maps in slice order (all one size) -> (S, H, W) masks, whole-volume step
        included where the post-processing asks for it."""
        if len({np.shape(p) for p in probs}) > 1:
            raise ValueError("the slices of a volume must all have one size")
        return self.postprocessing.volume_masks(np.stack([self.slice_mask(p) for p in probs]), probs)

    def segment_slice(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One slice -> (mask, probabilities)."""
        prob = self.probabilities([image])[0]
        return self.slice_mask(prob), prob

    def segment_volume(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One patient's slices in slice order -> ((S, H, W) masks, probabilities)."""
        probs = self.probabilities(images)
        return self.volume_masks(probs), probs


def read_config(path: Path) -> dict:
    """config.json as a dict of known settings, or ValueError naming the file."""
    config = read_settings_file(path)
    unknown = sorted(config.keys() - set(ARCHITECTURE_KEYS) - set(LEGACY_DEFAULTS))
    if unknown:  # a misspelt key would silently fall back to its default: another model than the one scored
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}; config.json takes {', '.join(ARCHITECTURE_KEYS)}")
    return config


def load_network(model_dir: Path, architecture: dict, device: str | torch.device = "cpu") -> UNet:
    """The UNet that ``architecture`` describes with the folder's weights: a missing or unexpected weight is an
    error, never a silently random layer."""
    config, weights = model_dir / "config.json", model_dir / "model.safetensors"
    try:
        network = UNet(**architecture)
    except (TypeError, ValueError) as error:  # a setting of the wrong type or value, e.g. "width": null
        raise ValueError(f"{config} does not describe a UNet ({error})") from None
    try:
        load_safetensors(network, weights, strict=True, device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from None
    except RuntimeError as error:  # the weights are not those of the net config.json describes
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"{weights} does not fit {config}: {detail}") from None
    return network.to(device)
