"""The app's example slices: from ``--examples``, else the model's own, else the project's synthetic phantoms.

From a kaggle_3m folder the slices `unet.data.example_slices` picks (as `unet.push` does) are taken from the
model's test patients where the folder has them, so the Dice shown on an example is not that of a slice the
model learned. Each example is decoded once by `unet.reader` and copied as PNG, which every browser shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unet.data import DatasetError, example_slices, find_kaggle_3m, scan_dataset
from unet.evaluation import recorded_metrics
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
    ``held_out`` patients (the model's test split)."""
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
        log.warning("none of the model's test patients are in %s: examples may be slices it trained on", root)
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


def choose_examples(serving: ServingModel, examples_dir: str | Path | None) -> tuple[Path, str, bool]:
    """(folder, where it came from, synthetic): --examples, else the model's, else the project's."""
    if examples_dir:
        folder = Path(examples_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"examples folder not found: {folder}")
        return folder, f"from {folder.name}", False
    if serving.examples_dir is not None:
        return serving.examples_dir, "published with the model", False
    return PROJECT_EXAMPLES_DIR, SYNTHETIC_SOURCE, True


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
        source = SYNTHETIC_SOURCE
        examples, _ = prepare_examples(PROJECT_EXAMPLES_DIR, out_dir, True)
    log.info("%d examples %s", len(examples), source)
    return examples, source
