"""NIfTI in and out: one real patient as NIfTI gives the masks of its TIFF slices, on the input's grid, in any
orientation; bad volumes are refused in one line."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from unet import nifti, render
from unet.data import scan_dataset
from unet.metrics import dice, pixel_counts
from unet.reader import ReadError, read_image, read_mask
from unet.segmenter import Segmenter
from unet.serving import SHIPPED_MODEL_DIR

PATIENT = "TCGA_CS_6665_20010817"  # an lgg_subset patient (the shipped model trained on it), 24 slices, tumor on 11
SPACING = (0.9, 0.9, 3.3)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained(SHIPPED_MODEL_DIR, batch_size=8)


def write_channels(folder: Path, stack: np.ndarray, affine: np.ndarray, dtype=np.uint8, codes=None) -> list[Path]:
    """(S, H, W, 3) dataset slices -> *_pre, *_flair, *_post .nii.gz in canonical order, or reoriented to
    ``codes`` with the matching affine."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, role in ((0, "pre"), (1, "flair"), (2, "post")):
        image = nib.Nifti1Image(nifti.from_axial_slices(stack[..., index]).astype(dtype), affine)
        if codes is not None:
            image = image.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes)))
        nib.save(image, folder / f"{PATIENT}_{role}.nii.gz")
        paths.append(folder / f"{PATIENT}_{role}.nii.gz")
    return paths


@pytest.fixture(scope="module")
def patient(real_data_dir):
    df = scan_dataset(real_data_dir, check_images=False)
    rows = df[df["patient"] == PATIENT].sort_values("slice")
    images = np.stack([read_image(p) for p in rows["image_path"]])
    masks = np.stack([read_mask(p) for p in rows["mask_path"]])
    return images, masks


def volume_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(dice(*pixel_counts(a.reshape(1, -1), b.reshape(1, -1))[0]))


@pytest.mark.real_data
@pytest.mark.parametrize("codes", [None, ("P", "L", "I")], ids=["canonical", "reoriented"])
def test_a_real_patient_as_nifti_gives_the_masks_of_its_tiff_slices(segmenter, patient, tmp_path, codes):
    images, _ = patient
    tiff_masks = segmenter.volume_masks(segmenter.probabilities(list(images)))
    assert tiff_masks.any()
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-100, -120, -40)
    paths = write_channels(tmp_path, images, affine, codes=codes)
    loaded = render.load_volume(paths)
    assert len(loaded.images) == len(images) and loaded.nifti.spacing == pytest.approx(SPACING)
    masks = segmenter.volume_masks(segmenter.probabilities(loaded.images))
    assert volume_dice(masks, tiff_masks) >= 0.99
    out = nifti.write_mask(masks, loaded.nifti, tmp_path / "mask.nii.gz")
    written, given = nib.load(out), nib.load(paths[1])
    assert np.array_equal(written.affine, given.affine) and written.shape == given.shape
    assert written.get_data_dtype() == np.uint8 and set(np.unique(written.dataobj)) <= {0, 1}
    # Read back the way any viewer would: the same voxels as the slices' masks.
    back = nifti.to_axial_slices(np.asanyarray(nib.as_closest_canonical(written).dataobj))
    assert np.array_equal(back.astype(bool), masks)


@pytest.mark.real_data
def test_a_float_volume_is_windowed_to_the_datasets_range(segmenter, patient, tmp_path):
    """Scanner units (here 7.3x the 8-bit values, float32) map back to 8 bits: nearly the same masks."""
    images, _ = patient
    tiff_masks = segmenter.volume_masks(segmenter.probabilities(list(images)))
    flair = nifti.from_axial_slices(images[..., 1]).astype(np.float32) * 7.3
    path = tmp_path / "scanner_flair.nii.gz"
    nib.save(nib.Nifti1Image(flair, np.diag([*SPACING, 1.0])), path)
    loaded = render.load_volume([path])
    assert loaded.notes and "FLAIR stands in" in loaded.notes[0]
    assert all(image.dtype == np.uint8 and image[..., 0].max() == 255 for image in loaded.images[5:6])
    flair_only = [np.repeat(image[..., 1:2], 3, axis=2) for image in images]
    expected = segmenter.volume_masks(segmenter.probabilities(flair_only))
    masks = segmenter.volume_masks(segmenter.probabilities(loaded.images))
    assert volume_dice(masks, expected) >= 0.95
    assert volume_dice(expected, tiff_masks) > 0.5  # FLAIR alone still finds this tumor


def test_summary_gives_millilitres_from_the_voxel_spacing(tmp_path):
    volume = np.zeros((16, 16, 4), np.float32)
    volume[4:12, 4:12, :] = 100.0
    path = tmp_path / "p_flair.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 0.5, 4.0, 1.0])), path)
    loaded = render.load_volume([path])
    summary = render.add_volume_units({"tumor_pixels": 250}, loaded.nifti)
    assert summary["tumor_volume_ml"] == pytest.approx(250 * 2 * 0.5 * 4 / 1000)
    assert summary["tumor_voxels"] == 250 and summary["voxel_size_mm"] == [2.0, 0.5, 4.0]


def test_uint8_is_kept_and_other_types_are_windowed_keeping_zero():
    assert np.array_equal(nifti.to_uint8(np.arange(256, dtype=np.uint8)), np.arange(256, dtype=np.uint8))
    values = np.concatenate([np.zeros(100), np.linspace(10, 1000, 1000), [1e6]]).astype(np.float32)
    mapped = nifti.to_uint8(values)
    assert (mapped[:100] == 0).all() and (mapped[100:] >= 1).all()
    assert mapped[-1] == 255 and mapped[100] == 1  # the hot voxel is clipped, the darkest tissue stays non-zero


def test_axial_slices_round_trip():
    volume = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    slices = nifti.to_axial_slices(volume)
    assert slices.shape == (3, 7, 5)
    assert np.array_equal(nifti.from_axial_slices(slices), volume)


def bad_volumes(folder: Path) -> dict[str, list[Path]]:
    affine = np.eye(4)
    cases = {}
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), affine), folder / "flat.nii.gz")
    cases["2D"] = [folder / "flat.nii.gz"]
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 3), np.float32), affine), folder / "series.nii.gz")
    cases["4D"] = [folder / "series.nii.gz"]
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), affine), folder / "a_flair.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 5), np.float32), affine), folder / "a_pre.nii.gz")
    cases["not the FLAIR's"] = [folder / "a_flair.nii.gz", folder / "a_pre.nii.gz"]
    shifted = affine.copy()
    shifted[0, 3] = 5
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), shifted), folder / "b_post.nii.gz")
    cases["same affine needed"] = [folder / "a_flair.nii.gz", folder / "b_post.nii.gz"]
    (folder / "junk.nii.gz").write_bytes(b"not a nifti at all")
    cases["not a readable NIfTI"] = [folder / "junk.nii.gz"]
    whole = gzip.compress(
        (folder / "a_flair.nii.gz").read_bytes()
        and nib.Nifti1Image(np.ones((64, 64, 32), np.float32), affine).to_bytes()
    )
    (folder / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    cases["corrupt or truncated"] = [folder / "cut.nii.gz"]
    cases["cannot tell which channel"] = [folder / "a_flair.nii.gz", folder / "junk.nii.gz"]
    return cases


@pytest.mark.parametrize(
    "message",
    [
        "2D",
        "4D",
        "not the FLAIR's",
        "same affine needed",
        "not a readable NIfTI",
        "corrupt or truncated",
        "cannot tell which channel",
    ],
)
def test_bad_volumes_are_one_line_naming_the_file(tmp_path, message):
    paths = bad_volumes(tmp_path)[message]
    with pytest.raises(ReadError, match=message) as error:
        render.load_volume(paths)
    assert "\n" not in str(error.value) and str(tmp_path) not in str(error.value)


def test_nifti_and_slices_together_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), tmp_path / "v.nii")
    (tmp_path / "s.png").write_bytes(b"")
    with pytest.raises(ReadError, match="one kind"):
        render.load_volume([tmp_path / "v.nii", tmp_path / "s.png"])
