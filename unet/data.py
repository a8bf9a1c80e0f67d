"""The LGG data: scan and validate a ``kaggle_3m`` folder, split by patient, read and augment.

Channel order, written down once: images are handled in the file's own order, which the
dataset calls RGB and which is (pre-contrast, FLAIR, post-contrast). OpenCV decodes to BGR,
so `read_image` flips it back; Pillow and browsers already give RGB. The model's config
records ``channel_order="RGB"`` and every consumer (training, evaluation, app) goes through
`read_image` or `unet.inference.to_rgb_uint8`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from torch.utils.data import Dataset

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


@contextlib.contextmanager
def _opencv_silenced() -> Iterator[None]:
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def imread_quietly(path: str | Path) -> np.ndarray | None:
    """cv2.imread without OpenCV's own log lines for a damaged file: the caller raises one line naming it."""
    with _opencv_silenced():
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def imdecode_quietly(data: bytes) -> np.ndarray | None:
    """`imread_quietly` for the bytes of a file (OpenCV's channel order: BGR)."""
    with _opencv_silenced():
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A mask image, 0/255 or 0 and any other one value (0/1, 0/100), gray or colour (alpha ignored) -> HxW bool.

    Half of 255 separates a 0/255 mask saved lossily (JPEG) from its noise; a mask whose values all
    lie under it is read as zero against the rest.
    """
    gray = mask[..., :3].max(axis=2) if mask.ndim == 3 else mask
    return gray > (127 if gray.max() > 127 else 0)


def read_image(path: str | Path) -> np.ndarray:
    """Read a slice as HxWx3 uint8 in file (RGB) order."""
    image = imread_quietly(path)
    if image is None:
        raise DatasetError(f"cannot read image (missing or corrupt): {path}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"expected an 8-bit 3-channel image, got {image.dtype} {image.shape}: {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as HxW uint8 with values 0 and 1."""
    mask = imread_quietly(path)
    if mask is None:
        raise DatasetError(f"cannot read mask (missing or corrupt): {path}")
    return binary_mask(mask).astype(np.uint8)


def scan_dataset(root: str | Path, check_images: bool = True) -> pd.DataFrame:
    """One row per slice: patient, slice, image_path, mask_path, has_tumor, tumor_pixels.

    Reads every mask (for has_tumor) and, with ``check_images``, every image, so a missing
    mask, an unreadable file or a size mismatch is found here, named, before training starts.
    """
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
            mask = read_mask(mask_path)
            if check_images:
                image = read_image(image_path)
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
        raise DatasetError(f"two images of slice {twins['slice'].iloc[0]}: {twins['image_path'].iloc[0]} and "
                           f"{twins['image_path'].iloc[1]}")
    df["has_tumor"] = df["tumor_pixels"] > 0
    return df


def institution(patient: str) -> str:
    """TCGA_CS_4941_19960909 -> CS: the acquiring institution, i.e. the scanner."""
    parts = patient.split("_")
    return parts[1] if len(parts) > 2 else "?"


def split_patients(
    df: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42,
    folds: int = 0, fold: int = 0,
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
        "tumor presence and institution": patients["has_tumor"].astype(str) + "_" + patients["patient"].map(institution),
        "tumor presence": patients["has_tumor"].astype(str),
        "nothing": None,
    }

    def split(frame: pd.DataFrame, fraction: float, name: str, given: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        if fraction <= 0:
            return frame, frame.iloc[:0]
        for by, strata in strata_options.items():
            try:
                parts = train_test_split(
                    frame, test_size=fraction, random_state=seed,
                    stratify=None if strata is None else strata.loc[frame.index],
                )
            except ValueError:  # a stratum too small for the fraction
                continue
            if by != "tumor presence and institution":
                log.info("%s patients split off stratified by %s only: the finer strata have too few patients",
                         name, by)
            return parts
        raise DatasetError(f"too few patients ({len(frame)}) to split off {name} patients ({given}): "
                           "use a folder with more patients")

    if folds:
        if folds < 2 or not 0 <= fold < folds:
            raise DatasetError(f"fold {fold} of {folds}: need at least 2 folds and 0 <= fold < folds")
        if folds > len(patients):
            raise DatasetError(f"cannot make {folds} folds of {len(patients)} patients")
        for strata in strata_options.values():
            if strata is None or strata.value_counts().max() >= folds:
                break
        splitter = KFold(folds, shuffle=True, random_state=seed) if strata is None else \
            StratifiedKFold(folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # an institution with fewer patients than folds is fine: it lands in fewer folds
            warnings.filterwarnings("ignore", message="The least populated class")
            rest_index, test_index = list(splitter.split(patients, None if strata is None else strata))[fold]
        rest, test = patients.iloc[rest_index], patients.iloc[test_index]
        test_fraction = 1 / folds
    else:
        rest, test = split(patients, test_fraction, "test", f"test_fraction {test_fraction}")
    rest_val_fraction = val_fraction / (1 - test_fraction) if test_fraction < 1 else 0
    train, val = split(rest, rest_val_fraction, "validation", f"val_fraction {val_fraction}")
    return {name: sorted(part["patient"]) for name, part in (("train", train), ("val", val), ("test", test))}


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
              mode: str = "dataset") -> torch.Tensor:
    """HxWxC uint8 -> CxHxW float32 scaled to [0, 1], then standardised per channel.

    ``mode="dataset"`` uses the fixed ``mean``/``std`` of the training set; ``mode="slice"``
    uses the slice's own statistics over its non-background pixels, which removes the
    scanner-to-scanner intensity differences between institutions.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    # The float copy leaves read-only arrays (Pillow's, Gradio's) and the caller's own untouched.
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)
    if mode == "slice":
        mean, std = slice_stats(image)
    return x.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)).div_(
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def slice_stats(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of a uint8 HxWxC slice over its non-background pixels, all of
    them where fewer than 64 are non-zero, scaled to [0, 1]. Taken from 256-bin histograms: a third of the
    cost of reducing the float pixels, which made this the data loader's and the app's slowest step."""
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


def normalize_stack(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                    mode: str = "dataset") -> torch.Tensor:
    """`normalize` for slices stacked along channels (HxWx3S): each 3-channel slice on its own, as inference does."""
    slices = [normalize(image[..., c:c + 3], mean, std, mode) for c in range(0, image.shape[2], 3)]
    return slices[0] if len(slices) == 1 else torch.cat(slices)


def volume_rows(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each patient's row positions in a `scan_dataset` frame, in slice-number order: the order in which its
    volume is stacked for context slices and cut to its largest 3D component."""
    slices = df["slice"].to_numpy()
    return {patient: rows[np.argsort(slices[rows], kind="stable")]
            for patient, rows in df.groupby("patient", sort=False).indices.items()}


def context_indices(index: int, count: int, k: int) -> list[int]:
    """Positions of slice ``index`` and its ``k`` neighbours on each side in a volume of ``count`` slices, in
    slice order; past an end of the volume, the end slice stands in. Training and inference both stack these."""
    return [min(max(index + offset, 0), count - 1) for offset in range(-k, k + 1)]


def flair_only(image: np.ndarray, **_: object) -> np.ndarray:
    """All three channels of each slice become its FLAIR, as the dataset stores a patient missing a sequence."""
    return np.repeat(image[..., 1::3], 3, axis=2)


def train_transforms(image_size: int = 256, flair_only_p: float = 0.0, gamma_p: float = 0.0,
                     strong: bool = False) -> A.Compose:
    """Flips, a mild affine and intensity jitter; the mask follows every geometric change.

    ``flair_only_p`` replaces the pre- and post-contrast channels by FLAIR that often: some
    patients (and every grayscale upload) come that way, and a model that never saw it finds
    nothing on them. ``gamma_p`` applies a random gamma (0.7 to 1.5) that often: per-slice
    normalisation undoes a brightness or contrast change wherever it clips nothing, while a gamma
    changes how far a faint tumor stands out from the brain around it. ``strong`` widens the affine
    (scale 0.8-1.25, rotation 30 degrees, shift 10%) and bends a fifth of the slices with a smooth
    elastic field (about 3 px RMS, on a 12 px scale), for a training set of a few dozen patients.
    """
    intensity = [A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5)]
    if gamma_p > 0:  # only when asked, so runs without it draw the same random numbers as before it existed
        intensity.append(A.RandomGamma(gamma_limit=(70, 150), p=gamma_p))
    scale, shift, degrees, p = ((0.8, 1.25), 0.1, 30, 0.8) if strong else ((0.9, 1.1), 0.0625, 15, 0.7)
    geometric = [A.Affine(scale=scale, translate_percent=(-shift, shift), rotate=(-degrees, degrees),
                          border_mode=cv2.BORDER_CONSTANT, p=p)]
    if strong:
        geometric.append(A.ElasticTransform(alpha=150, sigma=12, border_mode=cv2.BORDER_CONSTANT, p=0.2))
    return A.Compose(
        [
            A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA),  # as unet.inference resizes
            A.Lambda(image=flair_only, p=flair_only_p),
            A.HorizontalFlip(p=0.5),
            *geometric,
            *intensity,
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
    """Slices of the rows of a `scan_dataset` frame as (image CxHxW float, mask 1xHxW float).

    With ``context_slices`` K, each slice comes with its K neighbours on each side in the same patient, in
    slice-number order (a missing number is skipped; past an end, the end slice stands in), C = 3(2K+1), and
    ``context_dropout`` is the probability that the neighbours are all the centre slice instead, as when
    a single slice is uploaded.

    The slices are decoded once and held in memory (60 patients take about 0.6 GB), since
    decoding deflate TIFFs every epoch would cost more than the augmentation.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        transform: A.Compose,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        normalization: str = "dataset",
        context_slices: int = 0,
        context_dropout: float = 0.0,
    ) -> None:
        self.df = df.reset_index(drop=True)
        self.transform = transform
        self.mean, self.std, self.normalization = mean, std, normalization
        self.context_dropout = context_dropout
        self.images = [read_image(p) for p in self.df["image_path"]]
        self.masks = [read_mask(p) for p in self.df["mask_path"]]
        # The rows stacked for each row, centre in the middle.
        self.neighbours = np.arange(len(self.df))[:, None]
        if context_slices:
            self.neighbours = np.repeat(self.neighbours, 2 * context_slices + 1, axis=1)
            for patient, rows in volume_rows(self.df).items():
                if len({self.images[r].shape for r in rows}) > 1:  # they are stacked along channels
                    raise DatasetError(f"the slices of patient {patient} differ in size")
                for position, row in enumerate(rows):
                    self.neighbours[row] = rows[context_indices(position, len(rows), context_slices)]

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, item: int | tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``item``: a row, or (row, augmentation seed). A seeded item is augmented the same way in any
        DataLoader worker and at any point of a run, so training replays exactly, resumed or not."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            seed_augmentation(self.transform, seed)
        rows = self.neighbours[index]
        if self.context_dropout and len(rows) > 1:
            # A generator of its own, derived from the item's seed: the draw replays on resume, and albumentations'
            # draws stay those of a run without context.
            if np.random.default_rng(None if seed is None else (*seed, 1)).random() < self.context_dropout:
                rows = np.full_like(rows, index)
        # Stacked before the transform, so that every slice gets the same flip and affine as the mask.
        image = self.images[index] if len(rows) == 1 else np.concatenate([self.images[r] for r in rows], axis=2)
        out = self.transform(image=image, mask=self.masks[index])
        mask = torch.from_numpy((out["mask"] > 0).astype(np.float32))[None]
        return normalize_stack(out["image"], self.mean, self.std, self.normalization), mask


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
        x = read_image(path).reshape(-1, 3).astype(np.float64) / 255.0
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
    except DatasetError as error:
        log.error("error: %s", error)
        return 2
    for name, patients in splits.items():
        part = df[df["patient"].isin(patients)]
        log.info("%-5s %3d patients %5d slices %4d with tumor", name, len(patients), len(part), int(part["has_tumor"].sum()))
    if args.stats:
        mean, std = channel_stats(df[df["patient"].isin(splits["train"])])
        log.info("mean=%s std=%s", mean, std)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
