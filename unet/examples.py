"""The app's example slices: from ``--examples``, else the model's own, else the project's synthetic phantoms.

From a kaggle_3m folder the slices `unet.data.example_slices` picks (as `unet.push` does) are taken from the
model's held-out patients (its test split, else its validation split) where the folder has them, so the Dice shown
on an example is not that of a slice the model learned. Each example is decoded once by `unet.reader` and copied
as PNG, which every browser shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unet.data import DatasetError, example_slices, find_kaggle_3m, scan_dataset
from unet.evaluation import SPLIT_NAMES, held_out_split, recorded_metrics
from unet.reader import SUFFIXES, ReadError, read_mask, read_slice
from unet.serving import ServingModel
from unet.uploads import is_mask_name, natural_key

log = logging.getLogger(__name__)

PROJECT_EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"  # written by examples/make_examples.py
SYNTHETIC_SOURCE = "synthetic, not real MRI"


@dataclass(frozen=True)
class Example:
    image: Path  # a PNG copy in the app's work folder (browsers cannot show TIFF)
    mask: Path | None  # reference mask PNG (0/255), if there is one
    caption: str
    synthetic: bool


Found = tuple[Path, Path | None, str]  # (image, reference mask or None, 'tumor' | 'healthy' | '')


def find_examples(folder: Path, limit: int = 6, held_out: list[str] | None = None) -> tuple[list[Found], bool]:
    """The examples of a folder of images or a kaggle_3m folder, and whether they are all slices of the
    ``held_out`` patients (the model's `held_out_split`)."""
    root = find_kaggle_3m(folder)
    if any(root.glob("*/*_mask.tif")):
        return _kaggle_examples(root, limit, held_out)
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.suffix.lower() not in SUFFIXES or is_mask_name(path.name):
            continue
        mask = next((m for m in (path.with_name(f"{path.stem}_mask{s}") for s in SUFFIXES) if m.is_file()), None)
        kind = next((k for k in ("tumor", "healthy") if path.stem.lower().endswith(k)), "")
        found.append((path, mask, kind))
    picked = [f for f in found if f[2] == "tumor"][: limit // 2] + [f for f in found if f[2] == "healthy"][: limit // 2]
    picked += [f for f in found if f not in picked][: limit - len(picked)]
    # unet.push names its examples <PATIENT>_<n>_<kind>: which split they came from is read off the name.
    from_held_out = bool(held_out and picked) and all(path.stem.rsplit("_", 2)[0] in held_out for path, _, _ in picked)
    return sorted(picked, key=lambda item: {"tumor": 0, "healthy": 1}.get(item[2], 2)), from_held_out


def _kaggle_examples(root: Path, limit: int, held_out: list[str] | None) -> tuple[list[Found], bool]:
    df = scan_dataset(root, check_images=False)
    from_held_out = bool(held_out) and df["patient"].isin(held_out).any()
    if from_held_out:
        df = df[df["patient"].isin(held_out)]
    else:
        log.warning("none of the model's held-out patients are in %s: examples may be slices it trained on", root)
    chosen = example_slices(df, tumor=limit // 2, healthy=limit // 2)
    kinds = ["tumor" if tumor else "healthy" for tumor in chosen["has_tumor"]]
    return list(zip(map(Path, chosen["image_path"]), map(Path, chosen["mask_path"]), kinds)), bool(from_held_out)


def prepare_examples(
    folder: Path, out_dir: Path, synthetic: bool, held_out: list[str] | None = None
) -> tuple[list[Example], bool]:
    """Each example decoded once and written as PNG copies the browser can show; and whether they are slices
    of the ``held_out`` patients."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, counts = [], {}
    found, from_held_out = find_examples(folder, held_out=held_out)
    for i, (path, mask_path, kind) in enumerate(found):
        try:
            image = read_slice(path).image
            mask = read_mask(mask_path) if mask_path else None
        except ReadError as error:
            log.warning("skipping example: %s", error)
            continue
        if mask is not None and mask.shape != image.shape[:2]:
            log.warning("skipping example %s: mask size differs", path.name)
            continue
        kind = kind or ("" if mask is None else "tumor" if mask.any() else "healthy")
        (out_dir / str(i)).mkdir(exist_ok=True)
        image_out = out_dir / str(i) / f"{path.stem}.png"
        Image.fromarray(image).save(image_out)
        mask_out = None
        if mask is not None:
            mask_out = out_dir / str(i) / f"{path.stem}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_out)
        counts[kind] = counts.get(kind, 0) + 1
        examples.append(Example(image_out, mask_out, f"{kind.capitalize() or 'Example'} {counts[kind]}", synthetic))
    return examples, from_held_out


def choose_examples(
    serving: ServingModel, examples_dir: str | Path | None, synthetic: bool = False
) -> tuple[Path, str, bool]:
    """(folder, where it came from, synthetic): --synthetic, else --examples, else the model's, else the project's."""
    if synthetic:
        return PROJECT_EXAMPLES_DIR, SYNTHETIC_SOURCE, True
    if examples_dir:
        folder = Path(examples_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"examples folder not found: {folder}")
        return folder, f"from {folder.name}", False
    if serving.examples_dir is not None:
        return serving.examples_dir, "published with the model", False
    return PROJECT_EXAMPLES_DIR, SYNTHETIC_SOURCE, True


def load_examples(
    serving: ServingModel, examples_dir: str | Path | None, out_dir: Path, synthetic: bool = False
) -> tuple[list[Example], str]:
    """The gallery's examples, written to ``out_dir``, and a label that says where they come from."""
    folder, source, synthetic = choose_examples(serving, examples_dir, synthetic)
    try:
        metrics = recorded_metrics(serving.model_dir)
    except DatasetError as error:  # the model still serves; only the choice of examples needs the record
        log.warning("%s: examples may be slices the model trained on", error)
        metrics = {}
    split = held_out_split(metrics)
    examples, from_held_out = prepare_examples(folder, out_dir, synthetic, (metrics.get("splits") or {}).get(split))
    if from_held_out:
        source += f" · slices of its {SPLIT_NAMES[split]} patients"
    if not examples and folder != PROJECT_EXAMPLES_DIR:
        log.warning("no usable examples in %s; using the project's synthetic examples", folder)
        source = SYNTHETIC_SOURCE
        examples, _ = prepare_examples(PROJECT_EXAMPLES_DIR, out_dir, True)
    log.info("%d examples %s", len(examples), source)
    return examples, source


def example_volume(model_dir: Path) -> list[Path]:
    """The example patient's NIfTI files shipped in ``<model>/examples/volume/`` (FLAIR, pre- and post-contrast
    and the reference mask), or [] where the model has none."""
    folder = Path(model_dir) / "examples" / "volume"
    return sorted(folder.glob("*.nii.gz")) if folder.is_dir() else []


NOTICE_TEXT = """Example data: the slices and the volume in this folder come from the LGG MRI Segmentation dataset
(Buda et al., "Association of genomic subtypes of lower-grade gliomas with shape features automatically
extracted by a deep learning algorithm", Computers in Biology and Medicine, 2019;
https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation), built from TCGA-LGG images of The Cancer
Imaging Archive (TCIA). They are slices of patients in this model's {split} split ({patients}), which it
never trained on: {count} PNG slices (RGB = pre-contrast, FLAIR, post-contrast, as in the dataset) with their
reference masks (_mask.png, 0/255), and patient {volume_patient} as NIfTI volumes (volume/*_flair, _pre, _post,
_mask .nii.gz; the dataset gives no voxel spacing, so the volumes carry a nominal 1 mm grid and their mL are
nominal too).

License: as distributed, CC BY-NC-SA 4.0 per the dataset's Kaggle page (not confirmed by the authors here). The
TCIA Data Usage Policy applies to the underlying images (cite the dataset and TCIA). Non-commercial research and
demonstration use only; not for clinical use.

Written by unet.examples.write_model_examples from the kaggle_3m folder.
"""


def write_model_examples(data_dir: Path, model_dir: Path, volume_patient: str | None = None) -> list[Path]:
    """Ship examples with a model: `example_slices` of its held-out patients (as `unet.push.write_examples` writes
    them), one whole held-out patient as NIfTI (the smallest with tumor unless named), and a NOTICE."""
    import nibabel as nib

    from unet.nifti import from_axial_slices
    from unet.push import write_examples
    from unet.reader import read_image

    metrics = recorded_metrics(model_dir)
    split = held_out_split(metrics)
    df = scan_dataset(data_dir, check_images=False)
    df = df[df["patient"].isin((metrics.get("splits") or {}).get(split) or [])]
    if df.empty:
        raise DatasetError(f"none of the model's {SPLIT_NAMES[split]} patients are in {data_dir}")
    folder = model_dir / "examples"
    stems = write_examples(example_slices(df), folder)
    if volume_patient is None:
        sizes = df[df.groupby("patient")["has_tumor"].transform("any")].groupby("patient").size()
        volume_patient = str(sizes.idxmin())
    rows = df[df["patient"] == volume_patient].sort_values("slice")
    images = np.stack([read_image(p) for p in rows["image_path"]])
    masks = np.stack([read_mask(p) for p in rows["mask_path"]]).astype(np.uint8)
    (folder / "volume").mkdir(exist_ok=True)
    for role, stack in (("pre", images[..., 0]), ("flair", images[..., 1]), ("post", images[..., 2]), ("mask", masks)):
        nib.save(
            nib.Nifti1Image(from_axial_slices(stack), np.eye(4)), folder / "volume" / f"{volume_patient}_{role}.nii.gz"
        )
    patients = sorted({stem.rsplit("_", 2)[0] for stem in stems} | {volume_patient})
    notice = NOTICE_TEXT.format(
        split=SPLIT_NAMES[split], patients=", ".join(patients), count=len(stems), volume_patient=volume_patient
    )
    (folder / "NOTICE").write_text(notice)
    return sorted(p for p in folder.rglob("*") if p.is_file())
