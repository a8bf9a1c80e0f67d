"""The LGG data: scan and validate ``kaggle_3m`` folders, split by patient, read and augment for training.

Slices are read by `unet.reader` (RGB = the file's order: pre-contrast, FLAIR, post-contrast) and turned into the
network's input by the model's `unet.processing.Preprocessing`, the same road inference takes.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from torch.utils.data import Dataset

from unet.processing import Preprocessing
from unet.reader import ReadError, read_image, read_mask

log = logging.getLogger(__name__)

SLICE_RE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tif$")


class DatasetError(ValueError):
    """Bad data on disk: the message is one line and names the file or folder."""


def find_kaggle_3m(root: str | Path) -> Path:
    """Accept the ``kaggle_3m`` folder itself or a folder that contains it."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    return root / "kaggle_3m" if (root / "kaggle_3m").is_dir() else root


def scan_dataset(roots: str | Path | Sequence[str | Path], check_images: bool = True) -> pd.DataFrame:
    """One row per slice of one or more ``kaggle_3m`` folders, read as one set: patient, slice, image_path,
    mask_path, has_tumor, tumor_pixels.

    Reads every mask (for has_tumor) and, with ``check_images``, every image, so a missing mask, an unreadable
    file or a size mismatch is found here, named, before training starts. A patient in two folders is an error
    naming both.
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not roots:
        raise DatasetError("no data folder given")
    frames = [scan_folder(root, check_images) for root in roots]
    found_in: dict[str, str] = {}
    for root, frame in zip(roots, frames):
        for patient in frame["patient"].unique():
            if patient in found_in:
                raise DatasetError(f"patient {patient} is in two data folders: {found_in[patient]} and {root}")
            found_in[patient] = str(root)
    return pd.concat(frames, ignore_index=True).sort_values(["patient", "slice"], ignore_index=True)


def scan_folder(root: str | Path, check_images: bool = True) -> pd.DataFrame:
    """`scan_dataset` of one folder."""
    folder = find_kaggle_3m(root)
    rows = []
    for patient_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image_path in sorted(patient_dir.glob("*.tif")):
            match = SLICE_RE.match(image_path.name)
            if image_path.name.endswith("_mask.tif"):
                if not image_path.with_name(image_path.name[: -len("_mask.tif")] + ".tif").is_file():
                    raise DatasetError(f"mask without its image: {image_path}")
                continue
            if match is None:
                continue
            mask_path = image_path.with_name(image_path.stem + "_mask.tif")
            if not mask_path.is_file():
                raise DatasetError(f"missing mask for {image_path} (expected {mask_path.name})")
            mask = read_mask(mask_path, str(mask_path))
            if check_images:
                image = read_image(image_path, str(image_path))
                if image.shape[:2] != mask.shape:
                    raise DatasetError(
                        f"size mismatch: image {image.shape[1]}x{image.shape[0]} but mask "
                        f"{mask.shape[1]}x{mask.shape[0]}: {image_path}"
                    )
            rows.append(
                {
                    "patient": patient_dir.name,
                    "slice": int(match["n"]),
                    "image_path": str(image_path),
                    "mask_path": str(mask_path),
                    "tumor_pixels": int(mask.sum()),
                }
            )
    if not rows:
        raise DatasetError(f"no slices found in {folder} (expected <PATIENT>/<PATIENT>_<n>.tif)")
    df = pd.DataFrame(rows).sort_values(["patient", "slice"], ignore_index=True)
    twins = df[df.duplicated(["patient", "slice"], keep=False)]
    if len(twins):  # e.g. _5.tif and _05.tif: the volume's order would be a guess
        raise DatasetError(
            f"two images of slice {twins['slice'].iloc[0]}: {twins['image_path'].iloc[0]} and "
            f"{twins['image_path'].iloc[1]}"
        )
    df["has_tumor"] = df["tumor_pixels"] > 0
    return df


def institution(patient: str) -> str:
    """TCGA_CS_4941_19960909 -> CS: the acquiring institution, i.e. the scanner."""
    parts = patient.split("_")
    return parts[1] if len(parts) > 2 else "?"


def split_patients(
    df: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    folds: int = 0,
    fold: int = 0,
) -> dict[str, list[str]]:
    """Split patients (never slices) into train / val / test.

    Stratified by whether a patient has any tumor and by institution, falling back to
    coarser strata when a stratum is too small to be split, and saying so. The 70/15/15 split
    of a folder in which an institution has a single patient (EZ, in the 60-patient subset)
    is thus stratified by tumor presence alone, which is random by patient where every
    patient has tumor. With ``folds`` > 1 the test patients are fold ``fold`` of a k-fold
    split instead of ``test_fraction``, so the runs of folds 0..k-1 test every patient once.
    """
    patients = df.groupby("patient")["has_tumor"].any().reset_index()
    strata_options = {
        "tumor presence and institution": patients["has_tumor"].astype(str)
        + "_"
        + patients["patient"].map(institution),
        "tumor presence": patients["has_tumor"].astype(str),
        "nothing": None,
    }

    def split(frame: pd.DataFrame, fraction: float, name: str, given: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        if fraction <= 0:
            return frame, frame.iloc[:0]
        for by, strata in strata_options.items():
            try:
                parts = train_test_split(
                    frame,
                    test_size=fraction,
                    random_state=seed,
                    stratify=None if strata is None else strata.loc[frame.index],
                )
            except ValueError:  # a stratum too small for the fraction
                continue
            if by != "tumor presence and institution":
                log.info(
                    "%s patients split off stratified by %s only: the finer strata have too few patients", name, by
                )
            return parts
        raise DatasetError(
            f"too few patients ({len(frame)}) to split off {name} patients ({given}): use a folder with more patients"
        )

    if folds:
        if folds < 2 or not 0 <= fold < folds:
            raise DatasetError(f"fold {fold} of {folds}: need at least 2 folds and 0 <= fold < folds")
        if folds > len(patients):
            raise DatasetError(f"cannot make {folds} folds of {len(patients)} patients")
        for strata in strata_options.values():
            if strata is None or strata.value_counts().max() >= folds:
                break
        splitter = (
            KFold(folds, shuffle=True, random_state=seed)
            if strata is None
            else StratifiedKFold(folds, shuffle=True, random_state=seed)
        )
        with (
            warnings.catch_warnings()
        ):  # an institution with fewer patients than folds is fine: it lands in fewer folds
            warnings.filterwarnings("ignore", message="The least populated class")
            rest_index, test_index = list(splitter.split(patients, None if strata is None else strata))[fold]
        rest, test = patients.iloc[rest_index], patients.iloc[test_index]
        test_fraction = 1 / folds
    else:
        rest, test = split(patients, test_fraction, "test", f"test_fraction {test_fraction}")
    rest_val_fraction = val_fraction / (1 - test_fraction) if test_fraction < 1 else 0
    train, val = split(rest, rest_val_fraction, "validation", f"val_fraction {val_fraction}")
    return {name: sorted(part["patient"]) for name, part in (("train", train), ("val", val), ("test", test))}


def volume_rows(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each patient's row positions in a `scan_dataset` frame, in slice-number order: the order in which its
    volume is stacked for context slices and cut to its largest 3D component."""
    slices = df["slice"].to_numpy()
    return {
        patient: rows[np.argsort(slices[rows], kind="stable")]
        for patient, rows in df.groupby("patient", sort=False).indices.items()
    }


def flair_only(image: np.ndarray, **_: object) -> np.ndarray:
    """All three channels become FLAIR, as the dataset stores a patient missing a sequence."""
    return np.repeat(image[..., 1:2], 3, axis=2)


def train_transforms(image_size: int = 256, flair_only_p: float = 0.2) -> A.Compose:
    """Flips, a mild affine and intensity jitter; the mask follows every geometric change.

    ``flair_only_p`` replaces the pre- and post-contrast channels by FLAIR that often: some patients (and every
    grayscale upload) come that way, and a model that never saw it finds nothing on them.
    """
    return A.Compose(
        [
            A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA),  # as Preprocessing resizes
            A.Lambda(image=flair_only, p=flair_only_p),
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-15, 15),
                border_mode=cv2.BORDER_CONSTANT,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        ]
    )


def seed_augmentation(transform: A.Compose, seed: int | tuple[int, ...]) -> None:
    """Seed a pipeline with one generator that all its transforms draw from in turn.

    albumentations ignores global seeds, and its ``set_random_seed`` hands every transform its
    own generator of the same seed, so their draws repeat one another (a flip with every affine).
    """
    generator = np.random.default_rng(seed)
    transform.set_random_state(generator, random.Random(int(generator.integers(2**63))))


class LGGDataset(Dataset):
    """Slices of the rows of a `scan_dataset` frame as (image 3xSxS float, mask 1xSxS float): augmented, then
    preprocessed exactly as inference preprocesses.

    The slices are decoded once and held in memory (80 patients take about 0.8 GB), since decoding deflate TIFFs
    every epoch would cost more than the augmentation.
    """

    def __init__(self, df: pd.DataFrame, transform: A.Compose, preprocessing: Preprocessing) -> None:
        self.df = df.reset_index(drop=True)
        self.transform = transform
        self.preprocessing = preprocessing
        self.images = [read_image(p, str(p)) for p in self.df["image_path"]]
        self.masks = [read_mask(p, str(p)).astype(np.uint8) for p in self.df["mask_path"]]

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, item: int | tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``item``: a row, or (row, augmentation seed). A seeded item is augmented the same way in any
        DataLoader worker and at any point of a run, so training replays exactly, resumed or not."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            seed_augmentation(self.transform, seed)
        out = self.transform(image=self.images[index], mask=self.masks[index])
        mask = torch.from_numpy((out["mask"] > 0).astype(np.float32))[None]
        return self.preprocessing(out["image"]), mask


def example_slices(frame: pd.DataFrame, tumor: int = 3, healthy: int = 2) -> pd.DataFrame:
    """A few slices to show in the app: the largest tumor of each of ``tumor`` patients, and
    ``healthy`` tumor-free slices from mid-brain (the ends of a stack are nearly empty).

    Different patients first; deterministic for a given frame.
    """

    def spread(rows: pd.DataFrame, n: int) -> pd.DataFrame:
        firsts = rows.drop_duplicates("patient")
        return pd.concat([firsts, rows.drop(firsts.index)]).head(n)

    tumors = frame[frame["has_tumor"]].sort_values(["tumor_pixels", "patient", "slice"], ascending=[False, True, True])
    middle = frame.groupby("patient")["slice"].transform("median")
    healthy_rows = frame[~frame["has_tumor"]].assign(offset=(frame["slice"] - middle).abs())
    healthy_rows = healthy_rows.sort_values(["offset", "patient", "slice"]).drop(columns="offset")
    return pd.concat([spread(tumors, tumor), spread(healthy_rows, healthy)])


def channel_stats(df: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the slices in [0, 1], for the model's config."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in df["image_path"]:
        x = read_image(path, str(path)).reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x**2).sum(0)
        count += len(x)
    mean = total / count
    return mean.round(4).tolist(), np.sqrt(total_sq / count - mean**2).round(4).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description="Scan and validate a kaggle_3m folder.")
    parser.add_argument("data_dir", help="the kaggle_3m folder, or a folder that contains it")
    parser.add_argument("--stats", action="store_true", help="print per-channel mean/std of the training split")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        df = scan_dataset(args.data_dir)
        per_patient = df.groupby("patient")["has_tumor"]
        log.info("%d patients, %d slices, %d with tumor", per_patient.ngroups, len(df), int(df["has_tumor"].sum()))
        splits = split_patients(df, seed=args.seed)
    except (DatasetError, ReadError) as error:
        log.error("error: %s", error)
        return 2
    for name, patients in splits.items():
        part = df[df["patient"].isin(patients)]
        log.info(
            "%-5s %3d patients %5d slices %4d with tumor", name, len(patients), len(part), int(part["has_tumor"].sum())
        )
    if args.stats:
        mean, std = channel_stats(df[df["patient"].isin(splits["train"])])
        log.info("mean=%s std=%s", mean, std)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
