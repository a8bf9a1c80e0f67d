"""NIfTI volumes in and out: a FLAIR volume (optionally with pre- and post-contrast volumes and a reference mask)
-> the axial RGB uint8 slices the network reads, and its masks -> a ``.nii.gz`` label volume on the input's grid.

Orientation: every volume is reoriented to the closest canonical one (RAS+, `nib.as_closest_canonical`), so its
third axis runs inferior -> superior and each ``[:, :, k]`` is an axial slice; a slice is shown as the LGG
dataset's are (anterior up, the patient's right on the left, i.e. radiological). The mask is turned back into the
input's own axis order and written with the input's affine and header.

Intensities: the LGG slices are 8-bit with a black (0) background, and the network standardises each slice over
its non-zero pixels. So a uint8 volume is taken as it is (it is already in that range: re-windowing would only
clip it), and any other type is windowed per volume and channel: the 0.5th to 99.5th percentiles of its non-zero
voxels map linearly onto 1..255, clipped, while zero stays zero. Percentiles of the non-zero voxels ignore the
background that fills most of a volume and a few hot voxels, and keep the zero background the slice statistics
rely on.

Channels: one file is FLAIR; several are told apart by the last word of their name (``*_flair``, ``*_pre``,
``*_post``, ``*_mask``). A missing pre- or post-contrast channel is a copy of FLAIR, as the network was trained
with FLAIR-only copies. Every refusal is one line naming the file (a `ReadError`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from unet.reader import MAX_SIDE, ReadError
from unet.uploads import MAX_FILE_MB, MAX_REQUEST_MB, MAX_VOLUME_PIXELS, MAX_VOLUME_SLICES

log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii")
ROLES = {"flair": 1, "pre": 0, "t1": 0, "post": 2, "t1c": 2, "t1gd": 2, "t1ce": 2, "mask": "mask", "seg": "mask"}
WINDOW_PERCENTILES = (0.5, 99.5)


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def nifti_stem(name: str) -> str:
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class NiftiVolume:
    """An uploaded NIfTI volume as axial slices, with what is needed to write a mask back on its grid."""

    name: str  # the patient part of the file names
    images: list[np.ndarray]  # axial RGB uint8 slices, inferior to superior, as the LGG dataset shows them
    reference: np.ndarray | None  # (S, H, W) bool, where a *_mask volume came with it
    source: nib.Nifti1Image  # the FLAIR as uploaded: its shape, affine and header are the output's
    spacing: tuple[float, float, float]  # canonical voxel size in mm (x, y, z)
    notes: list[str] = field(default_factory=list)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def file_role(name: str, only_file: bool) -> int | str:
    """Channel index (0 pre, 1 FLAIR, 2 post) or 'mask' from the last word of a file's name."""
    word = re.split(r"[_\-. ]", nifti_stem(name).lower())[-1]
    if word in ROLES:
        return ROLES[word]
    if only_file:
        return 1
    raise ReadError(
        f"{name}: cannot tell which channel this is; end the names with _flair, _pre, _post (and _mask for a "
        "reference), e.g. patient_flair.nii.gz"
    )


def load_nifti(path: Path) -> nib.Nifti1Image:
    """One NIfTI file, its header checked (3D, sizes within the app's limits) before its voxels are read."""
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise ReadError(f"{path.name}: file not found")
    if size > MAX_FILE_MB * 2**20:
        raise ReadError(f"{path.name}: the file is {size / 2**20:.1f} MB; at most {MAX_FILE_MB} MB is accepted")
    try:
        image = nib.load(path)
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds; each is one line for the user
        detail = _first_line(error).replace(str(path.parent) + "/", "")  # never a server path
        raise ReadError(f"{path.name}: not a readable NIfTI file ({detail})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ReadError(f"{path.name}: not a NIfTI image")
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is 3D
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise ReadError(f"{path.name}: a 2D image ({'x'.join(map(str, image.shape))}); upload a 3D volume")
    if len(shape) > 3:
        raise ReadError(
            f"{path.name}: a {len(shape)}D image ({'x'.join(map(str, shape))}); upload one 3D volume a channel"
        )
    if max(shape) > MAX_SIDE or int(np.prod(shape)) > MAX_VOLUME_PIXELS:
        raise ReadError(f"{path.name}: {'x'.join(map(str, shape))} voxels is more than this app accepts")
    return image


def load_voxels(image: nib.Nifti1Image, name: str) -> np.ndarray:
    """The voxels of a canonical image as a 3D array (scaling applied); one line if the data is corrupt."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt gzip stream, a short file
        raise ReadError(f"{name}: the NIfTI data is corrupt or truncated ({_first_line(error)})") from None
    if data.dtype.kind not in "biuf":
        raise ReadError(f"{name}: voxels of type {data.dtype} cannot be read as intensities")
    data = data.reshape(data.shape[:3])
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data


def to_uint8(data: np.ndarray) -> np.ndarray:
    """A volume's intensities in the dataset's 8-bit range (see the module's docstring for why)."""
    if data.dtype == np.uint8:
        return data
    values = data.astype(np.float32)
    nonzero = values != 0
    out = np.zeros(values.shape, np.uint8)
    if not nonzero.any():
        return out
    low, high = np.percentile(values[nonzero], WINDOW_PERCENTILES)
    scaled = 1 + (values[nonzero] - low) / max(float(high - low), 1e-6) * 254
    out[nonzero] = np.clip(scaled, 1, 255).round().astype(np.uint8)
    return out


def to_axial_slices(volume: np.ndarray) -> np.ndarray:
    """Canonical (X right, Y anterior, Z superior) -> (Z, rows, columns) slices shown as the dataset shows them:
    anterior up and the patient's right on the image's left."""
    return np.ascontiguousarray(np.transpose(volume[::-1, ::-1, :], (2, 1, 0)))


def from_axial_slices(slices: np.ndarray) -> np.ndarray:
    """The inverse of `to_axial_slices`."""
    return np.ascontiguousarray(np.transpose(slices, (2, 1, 0))[::-1, ::-1, :])


def read_nifti_volume(paths: Sequence[str | Path]) -> NiftiVolume:
    """One patient's NIfTI files (FLAIR, optional pre/post-contrast and reference mask) -> `NiftiVolume`."""
    paths = [Path(p) for p in paths]
    if len(paths) > 4:
        raise ReadError(f"{len(paths)} NIfTI files; upload at most FLAIR, pre-contrast, post-contrast and a mask")
    roles: dict[int | str, Path] = {}
    for path in paths:
        role = file_role(path.name, len(paths) == 1)
        if role in roles:
            raise ReadError(f"{path.name} and {roles[role].name} are both the {_role_name(role)}; upload one")
        roles[role] = path
    if 1 not in roles:
        raise ReadError("no FLAIR volume among the NIfTI files: name it *_flair.nii.gz (or upload it alone)")
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > MAX_REQUEST_MB * 2**20:
        raise ReadError(f"the upload holds more than {MAX_REQUEST_MB} MB in all")
    images = {role: load_nifti(path) for role, path in roles.items()}
    flair = images[1]
    for role, image in images.items():
        if image.shape[:3] != flair.shape[:3] or not np.allclose(image.affine, flair.affine, atol=1e-3):
            raise ReadError(
                f"{roles[role].name}: its grid ({'x'.join(map(str, image.shape[:3]))}) is not the FLAIR's "
                f"({'x'.join(map(str, flair.shape[:3]))}, same affine needed); resample it first"
            )
    canonical = {role: nib.as_closest_canonical(image) for role, image in images.items()}
    channels = {role: to_axial_slices(load_voxels(image, roles[role].name)) for role, image in canonical.items()}
    if channels[1].shape[0] > MAX_VOLUME_SLICES:
        raise ReadError(
            f"{roles[1].name}: {channels[1].shape[0]} axial slices; at most {MAX_VOLUME_SLICES} are accepted"
        )
    notes = []
    missing = [name for index, name in ((0, "pre-contrast"), (2, "post-contrast")) if index not in channels]
    if missing:
        notes.append(f"no {' or '.join(missing)} volume: FLAIR stands in for it, as in training's FLAIR-only copies")
    rgb = np.stack([to_uint8(channels.get(index, channels[1])) for index in (0, 1, 2)], axis=-1)
    reference = channels["mask"] > 0 if "mask" in channels else None
    spacing = tuple(float(z) for z in canonical[1].header.get_zooms()[:3])
    name = re.sub(r"[_\-. ]+(flair|pre|post|t1|t1c|t1gd|t1ce|mask|seg)$", "", nifti_stem(roles[1].name), flags=re.I)
    log.info("NIfTI %s: %s voxels of %s mm, %s", name, flair.shape[:3], spacing, nib.aff2axcodes(flair.affine))
    return NiftiVolume(name or "volume", list(rgb), reference, flair, spacing, notes)


def mask_image(masks: np.ndarray, volume: NiftiVolume) -> nib.Nifti1Image:
    """(S, H, W) masks of `NiftiVolume.images` -> a uint8 label volume (1 = tumor) on the input's grid, with its
    affine and header."""
    canonical = from_axial_slices(np.asarray(masks, np.uint8))
    source = volume.source
    # From canonical (RAS) back to the input's own axis order and directions.
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(source.affine))
    data = apply_orientation(canonical, transform).astype(np.uint8)
    if data.shape != source.shape[:3]:
        raise ValueError(f"mask grid {data.shape} does not match the input's {source.shape[:3]}")
    header = source.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.uint8)
    out = type(source)(data, source.affine, header)
    out.header.set_slope_inter(1, 0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.header["descrip"] = b"brain-mri-unet tumor mask (1 = tumor)"
    out.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    return out


def write_mask(masks: np.ndarray, volume: NiftiVolume, path: str | Path) -> Path:
    path = Path(path)
    nib.save(mask_image(masks, volume), path)
    return path


def _role_name(role: int | str) -> str:
    return {0: "pre-contrast volume", 1: "FLAIR volume", 2: "post-contrast volume"}.get(role, "reference mask")


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())  # one line, whatever nibabel's message holds
    return text[:160] if text else type(error).__name__
