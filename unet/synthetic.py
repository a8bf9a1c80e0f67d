"""Synthetic brain-like slices in the `kaggle_3m` layout, for tests and smoke runs.

Each patient is a stack of axial slices: a skull ring, a textured brain whose size follows
the slice position, and (for tumor patients, on the middle slices) a bright FLAIR blob. The
tumor is visible mainly in channel 1 (FLAIR), as in the real data, so a model must read the
channels in the right order to find it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


def phantom_slice(
    rng: np.random.Generator, size: int = 256, brain_scale: float = 1.0, tumor: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8 RGB, mask HxW uint8 0/255) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size * 0.02, 2)
    ry, rx = size * 0.38 * brain_scale, size * 0.31 * brain_scale
    r = np.sqrt(((yy - cy) / max(ry, 1)) ** 2 + ((xx - cx) / max(rx, 1)) ** 2)
    brain = r < 1.0
    skull = (r >= 1.0) & (r < 1.12)

    # Low-frequency texture: white noise blurred to a few pixels' correlation.
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 4)
    texture /= texture.std() + 1e-6
    image = np.zeros((size, size, 3), np.float32)
    for c, (level, skull_level) in enumerate(((70, 150), (90, 60), (80, 170))):
        image[..., c] = np.where(brain, level + 12 * texture, 0) + np.where(skull, skull_level, 0)

    mask = np.zeros((size, size), np.uint8)
    if tumor and brain_scale > 0.3:
        ty = cy + rng.uniform(-0.5, 0.5) * ry
        tx = cx + rng.uniform(-0.5, 0.5) * rx
        a, b = rng.uniform(0.08, 0.2, 2) * size * brain_scale
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - ty, xx - tx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
        blob = (u**2 + v**2 + 0.3 * texture) < 1.0
        blob &= brain
        mask[blob] = 255
        image[..., 1] += np.where(blob, 80, 0)  # FLAIR hyperintensity
        image[..., 0] += np.where(blob, 10, 0)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(
    root: str | Path, patients: int = 6, slices: int = 12, size: int = 256, healthy_patients: int = 0, seed: int = 0
) -> Path:
    """Write ``root/kaggle_3m/<PATIENT>/<PATIENT>_<n>(_mask).tif`` and return the kaggle_3m path.

    Patient ids follow the TCGA pattern (``SYN_<site>_<id>_<date>``) with five sites, so
    the institution-stratified split works on them as on the real data.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "kaggle_3m"
    sites = ["AA", "BB", "CC", "DD", "EE"]
    for p in range(patients):
        patient = f"SYN_{sites[p % len(sites)]}_{1000 + p}_20000101"
        (folder / patient).mkdir(parents=True, exist_ok=True)
        has_tumor = p >= healthy_patients
        for n in range(1, slices + 1):
            position = (n - 0.5) / slices  # 0..1 through the head
            scale = float(np.sqrt(max(1 - (2 * position - 1) ** 2, 0.05)))
            tumor = has_tumor and 0.3 < position < 0.75
            image, mask = phantom_slice(rng, size, scale, tumor)
            # cv2 writes BGR arrays as RGB files: flip so the file holds RGB like the dataset.
            cv2.imwrite(str(folder / patient / f"{patient}_{n}.tif"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(folder / patient / f"{patient}_{n}_mask.tif"), mask)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic kaggle_3m-style dataset.")
    parser.add_argument("out_dir", help="folder to create; the slices go to OUT_DIR/kaggle_3m")
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--healthy-patients", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = make_synthetic_dataset(
        args.out_dir, args.patients, args.slices, args.size, args.healthy_patients, args.seed
    )
    log.info("wrote %d patients x %d slices to %s", args.patients, args.slices, folder)


if __name__ == "__main__":
    main()
