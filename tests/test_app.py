"""The app: prediction on generated slices, input handling, errors, hostile uploads, and the /segment API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import app
from unet import examples as app_examples
from unet import render, uploads, viewer
from unet.evaluation import frame_masks
from unet.model import UNet
from unet.processing import Postprocessing, Preprocessing
from unet.reader import ReadError, read_mask, read_slice
from unet.segmenter import Segmenter
from unet.serving import SHIPPED_MODEL_DIR, load_for_serving
from unet.synthetic import phantom_slice

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "postprocessor_config.json")


@pytest.fixture(scope="module")
def serving():
    # The shipped model finds the phantoms' tumors (Dice near 1), so thresholds and Dice below compare real masks.
    return load_for_serving(str(SHIPPED_MODEL_DIR), batch_size=1)


@pytest.fixture(scope="module")
def segmenter(serving):
    return serving.segmenter


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A generated tumor slice saved as PNG, its reference mask PNG, and the image array."""
    folder = tmp_path_factory.mktemp("phantom")
    image, mask = phantom_slice(np.random.default_rng(3), 256, 1.0, tumor=True)
    Image.fromarray(image).save(folder / "slice.png")
    Image.fromarray(mask).save(folder / "slice_mask.png")
    return folder / "slice.png", folder / "slice_mask.png", image


@contextlib.contextmanager
def held_port():
    """A free port held bound (not listening) until the server has started: no other process can take it
    meanwhile, and the server, binding with SO_REUSEADDR as uvicorn does, still can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def load_slice(path: Path):
    return read_slice(uploads.read_upload(path), path.name)


# --- the prediction function ---------------------------------------------------------------


def test_segment_image_outputs(segmenter, phantom):
    path, _, image = phantom
    overlay, mask, summary = render.segment_image(segmenter, path)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert summary["threshold"] == pytest.approx(segmenter.postprocessing.threshold, abs=1e-4)
    assert summary["tumor_pixels"] == int((mask > 0).sum())
    assert summary["tumor_found"] == (summary["tumor_pixels"] > 0)
    assert 0 < summary["brain_pixels"] < image.shape[0] * image.shape[1]  # the black background is not brain
    assert summary["tumor_share_of_brain"] == pytest.approx(summary["tumor_pixels"] / summary["brain_pixels"], abs=1e-6)
    assert "dice" not in summary
    json.dumps(summary)  # the API returns it as JSON


def test_threshold_changes_area_monotonically(segmenter, phantom):
    prob = segmenter.probabilities([phantom[2]])[0]
    thresholds = np.linspace(0.01, 0.99, 25)
    areas = [int(segmenter.with_postprocessing(threshold=t).slice_mask(prob).sum()) for t in thresholds]
    assert all(a >= b for a, b in zip(areas, areas[1:])) and areas[0] > areas[-1]
    # The same through the public function: a lower threshold never finds less, and here finds more.
    low = render.segment_image(segmenter, phantom[0], 0.01)[2]["tumor_pixels"]
    high = render.segment_image(segmenter, phantom[0], 0.99)[2]["tumor_pixels"]
    assert low > high


def test_slice_masks_are_the_ones_evaluate_scores_whatever_the_input_size():
    # A model trained at 128 px keeps components of at least 100 px at 128 px: 400 px on a 256 px slice,
    # 1600 px on a 512 px upload. The app and evaluate both take the mask from the segmenter.
    segmenter = Segmenter(UNet(width=4, depth=1), Preprocessing(image_size=128), Postprocessing(min_component_area=100))
    prob = np.zeros((256, 256), np.float32)
    prob[10:31, 10:31] = 0.9  # 441 px: kept
    prob[100:115, 100:115] = 0.9  # 225 px, over 100 but under 400: removed
    at = app.Events(segmenter, uploads.WorkFolder(), []).at(0.5)  # what the page's threshold gives
    mask = at.slice_mask(prob)
    assert int(mask.sum()) == 441
    scored = frame_masks(segmenter, [prob], pd.DataFrame({"patient": ["P"], "slice": [1]}))
    assert np.array_equal(scored[0], mask)  # evaluate's mask is this one
    twice = cv2.resize(prob, (512, 512), interpolation=cv2.INTER_NEAREST)
    assert int(at.slice_mask(twice).sum()) == 4 * 441  # the same blob survives at 512 px


def test_summary_and_overlay_on_a_known_mask():
    image, ref = phantom_slice(np.random.default_rng(5), 128, 1.0, tumor=True)
    ref = ref > 0
    prob = ref.astype(np.float32) * 0.9
    mask = prob >= 0.5
    summary = render.slice_summary(image, prob, mask, 0.5, reference=ref)
    assert summary["tumor_pixels"] == int(ref.sum()) and summary["dice"] == 1.0
    assert summary["brain_pixels"] == int(((image.max(axis=2) > render.BACKGROUND_LEVEL) | ref).sum())
    overlay = render.draw_overlay(image, mask, ref)
    assert overlay.shape == image.shape and not np.array_equal(overlay[ref], image[ref])  # tumor drawn
    assert np.array_equal(overlay[:5, :5], image[:5, :5])  # background untouched
    assert "Tumor found" in render.summary_markdown(summary) and "Dice" in render.summary_markdown(summary)
    empty = render.slice_summary(image, prob * 0, mask & False, 0.5)
    assert not empty["tumor_found"] and "No tumor found" in render.summary_markdown(empty)


def test_dice_against_reference(segmenter, phantom, tmp_path):
    path, ref_path, image = phantom
    _, mask, summary = render.segment_image(segmenter, path, 0.3, reference_path=ref_path)
    assert mask.any()  # else every Dice below would be the empty-vs-empty 1.0
    ref = np.asarray(Image.open(ref_path)) > 127
    inter = int(((mask > 0) & ref).sum())
    expected = 2 * inter / ((mask > 0).sum() + ref.sum())
    assert summary["dice"] == pytest.approx(expected, abs=1e-4) and summary["dice"] > 0.8  # it finds the tumor
    # The prediction scored against itself is perfect.
    Image.fromarray(mask).save(tmp_path / "own_mask.png")
    assert render.segment_image(segmenter, path, 0.3, reference_path=tmp_path / "own_mask.png")[2]["dice"] == 1.0
    red = np.zeros((*mask.shape, 3), np.uint8)
    red[..., 0] = mask  # a mask drawn in red in an image editor: the same mask
    Image.fromarray(red).save(tmp_path / "red_mask.png")
    assert render.segment_image(segmenter, path, 0.3, reference_path=tmp_path / "red_mask.png")[2]["dice"] == 1.0
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    with pytest.raises(ReadError, match="reference mask is 10x10"):
        render.segment_image(segmenter, path, reference_path=tmp_path / "small_mask.png")


@pytest.mark.parametrize("bad", [0.0, 0.0099, 0.9901, 1.5, 1e-300, float("nan")])
def test_a_threshold_outside_the_sliders_range_is_one_line(segmenter, phantom, bad):
    with pytest.raises(ReadError, match=r"^threshold \S+: choose a probability cut from 0.01 to 0.99$"):
        render.segment_image(segmenter, phantom[0], bad)


def test_the_threshold_range_includes_its_ends(segmenter, phantom):
    for edge in render.THRESHOLD_RANGE:
        assert render.segment_image(segmenter, phantom[0], edge)[2]["threshold"] == edge


# --- input handling ------------------------------------------------------------------------

RGB = (10, 100, 200)  # distinct channel values: a swapped channel order would show


def write_inputs(folder: Path) -> dict[str, Path]:
    """The same kind of content in every format an upload may come in."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10:30, 20:40] = RGB
    files = {}
    Image.fromarray(rgb).save(files.setdefault("png", folder / "rgb.png"))
    Image.fromarray(rgb).save(files.setdefault("tiff", folder / "rgb.tif"))
    Image.fromarray(rgb).save(files.setdefault("jpeg", folder / "rgb.jpg"), quality=100)
    rgba = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(files.setdefault("rgba", folder / "rgba.png"))
    Image.fromarray(rgb[..., 1]).save(files.setdefault("gray", folder / "gray.png"))
    gray16 = rgb[..., 1].astype(np.uint16) * 40
    cv2.imwrite(str(files.setdefault("gray16_png", folder / "gray16.png")), gray16)
    cv2.imwrite(str(files.setdefault("gray16_tiff", folder / "gray16.tif")), gray16)
    # OpenCV writes its BGR arrays as RGB files: flip so the file holds RGB * 40.
    cv2.imwrite(str(files.setdefault("rgb16_tiff", folder / "rgb16.tif")), (rgb.astype(np.uint16) * 40)[..., ::-1])
    cv2.imwrite(str(files.setdefault("rgb16_png", folder / "rgb16.png")), (rgb.astype(np.uint16) * 40)[..., ::-1])
    # Pillow cannot open a float colour TIFF; OpenCV can
    cv2.imwrite(str(files.setdefault("rgb_float_tiff", folder / "rgbf.tif")), (rgb / 255).astype(np.float32)[..., ::-1])
    return files


@pytest.mark.parametrize(
    "kind",
    ["png", "tiff", "jpeg", "rgba", "gray", "gray16_png", "gray16_tiff", "rgb16_tiff", "rgb16_png", "rgb_float_tiff"],
)
def test_inputs_are_converted_as_trained(tmp_path, kind):
    path = write_inputs(tmp_path)[kind]
    sl = load_slice(path)
    assert sl.image.shape == (40, 60, 3) and sl.image.dtype == np.uint8
    pixel = sl.image[20, 30].astype(int)
    if kind.startswith("gray"):
        assert pixel[0] == pixel[1] == pixel[2] > 0 and any("grayscale" in n for n in sl.notes)
    elif kind.startswith("rgb16"):
        assert pixel[0] < pixel[1] < pixel[2] and pixel[2] == 255  # file order kept, rescaled by its range
        assert any("16-bit" in n for n in sl.notes)
    elif kind == "rgb_float_tiff":
        assert pixel[0] < pixel[1] < pixel[2] and pixel[2] == 255
        assert any("high bit-depth" in n for n in sl.notes)
    else:
        assert np.abs(pixel - RGB).max() <= 2  # RGB file order kept (JPEG: within rounding)
    if kind == "gray16_png":
        assert pixel[0] == 255 and any("16-bit" in n for n in sl.notes)
    assert sl.image[0, 0].max() == 0  # background stays black (RGBA flattened onto black)


def test_an_image_only_opencv_reads_is_bounded_like_the_rest():
    wide = np.zeros((8, 5000, 3), np.float32)  # a float colour TIFF, which Pillow cannot open
    ok, encoded = cv2.imencode(".tif", wide)
    assert ok
    with pytest.raises(ReadError, match="^wide.tif: the image is 5000x8 pixels; at most 4096x4096 is accepted$"):
        read_slice(encoded.tobytes(), "wide.tif")


def test_transparent_pixels_flatten_to_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent
    rgba[2:4, 2:4] = (10, 100, 200, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    sl = load_slice(tmp_path / "t.png")
    assert sl.image[0, 0].max() == 0 and tuple(sl.image[2, 2]) == RGB
    rgba16 = rgba.astype(np.uint16) * 257  # the same picture at 16 bits (alpha 255 -> 65535)
    cv2.imwrite(str(tmp_path / "t16.png"), rgba16[..., [2, 1, 0, 3]])  # OpenCV takes BGRA
    sl = load_slice(tmp_path / "t16.png")
    # RGB, rescaled by its range: 100 * 257 of 200 * 257 is 127.5 of 255, which the reader's float32 scaling rounds up
    assert sl.image[0, 0].max() == 0 and tuple(sl.image[2, 2]) == (13, 128, 255)
    assert "transparency flattened onto black" in sl.notes


def test_odd_sized_image_is_segmented_at_its_own_size(segmenter, tmp_path):
    image, _ = phantom_slice(np.random.default_rng(1), 256, 1.0, tumor=True)
    odd = cv2.resize(image, (301, 177), interpolation=cv2.INTER_AREA)
    Image.fromarray(odd).save(tmp_path / "odd.tif")
    overlay, mask, summary = render.segment_image(segmenter, tmp_path / "odd.tif")
    assert overlay.shape == (177, 301, 3) and mask.shape == (177, 301)
    assert (summary["width"], summary["height"]) == (301, 177)


def test_grayscale_upload_is_segmented(segmenter, tmp_path):
    image, _ = phantom_slice(np.random.default_rng(2), 256, 1.0, tumor=True)
    Image.fromarray(image[..., 1]).save(tmp_path / "flair.png")
    overlay, mask, summary = render.segment_image(segmenter, tmp_path / "flair.png")
    assert overlay.shape == (256, 256, 3) and any("grayscale" in n for n in summary["notes"])


def bad_files(folder: Path) -> dict[str, Path]:
    files = {
        "text": folder / "notes.txt",
        "empty": folder / "empty.png",
        "corrupt": folder / "corrupt.png",
        "huge": folder / "huge.png",
        "fake": folder / "fake.png",
        "truncated_tiff": folder / "truncated.tif",
    }
    files["text"].write_text("this is not an image\n")
    files["empty"].write_bytes(b"")
    image, _ = phantom_slice(np.random.default_rng(0), 256)
    Image.fromarray(image).save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    files["corrupt"].write_bytes(data[: len(data) // 2])
    Image.new("L", (5000, 8)).save(files["huge"])  # tiny file, too many pixels per side
    files["fake"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    Image.fromarray(image).save(folder / "good.tif", compression="tiff_deflate")
    files["truncated_tiff"].write_bytes((folder / "good.tif").read_bytes()[:3000])  # its directory is cut off
    return files


@pytest.mark.parametrize(
    "kind,message",
    [
        ("text", "not an image"),
        ("empty", "the file is empty"),
        ("corrupt", "corrupt or truncated"),
        ("huge", "at most 4096x4096"),
        ("fake", "not an image|corrupt"),
        ("truncated_tiff", "corrupt or truncated"),
    ],
)
def test_bad_files_give_one_line_messages(segmenter, tmp_path, kind, message):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(ReadError, match=message) as info:
        render.segment_image(segmenter, path)
    assert "\n" not in str(info.value) and str(info.value).startswith(path.name)


def test_file_size_is_bounded(segmenter, tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_FILE_MB", 0.01)
    image, _ = phantom_slice(np.random.default_rng(0), 256)
    Image.fromarray(image).save(tmp_path / "big.png")
    with pytest.raises(ReadError, match="at most"):
        render.segment_image(segmenter, tmp_path / "big.png")


# --- volumes and examples ------------------------------------------------------------------


def test_volume_from_files_and_zip(segmenter, tmp_path):
    rng = np.random.default_rng(4)
    names = ["P_1", "P_2", "P_10"]
    with zipfile.ZipFile(tmp_path / "patient.zip", "w") as archive:
        for name in reversed(names):  # stored out of order: the app sorts naturally
            image, mask = phantom_slice(rng, 128, 1.0, tumor=True)
            Image.fromarray(image).save(tmp_path / f"{name}.tif")
            Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
            archive.write(tmp_path / f"{name}.tif", f"patient/{name}.tif")
            archive.write(tmp_path / f"{name}_mask.png", f"patient/{name}_mask.png")
        archive.writestr("__MACOSX/._P_1.tif", b"junk")
    volume = uploads.read_volume([tmp_path / "patient.zip"])
    assert volume.names == names and set(volume.references) == set(names)
    probs = segmenter.probabilities(volume.images)
    result = render.volume_result(
        segmenter.with_postprocessing(threshold=0.3), volume.names, volume.images, probs, volume.references
    )
    gallery, masks, summary = result.gallery, result.masks, result.summary
    assert len(gallery) == 3 and gallery[0][1].startswith("1:") and gallery[2][1].startswith("10:")
    assert render.short_labels(["P_10", "P_11"]) == ["10", "11"] and render.short_labels(["a"]) == ["a"]
    assert render.shared_prefix([f"P_{k}" for k in range(10, 20)]) == "P_"  # P_masks.zip, not P_1_masks.zip
    assert render.volume_name([f"P_{k}" for k in range(10, 20)]) == "P"
    assert summary["slices"] == 3 and summary["references"] == 3
    overlap = sum(int(((m > 0) & volume.references[n]).sum()) for m, n in zip(masks, names))
    total = sum(int((m > 0).sum() + volume.references[n].sum()) for m, n in zip(masks, names))
    assert total and summary["dice"] == pytest.approx(2 * overlap / total, abs=1e-4)  # pooled over the volume
    assert summary["dice"] > 0.5  # the model finds the phantoms' tumors
    assert summary["tumor_pixels"] == sum(summary["per_slice_pixels"].values()) == sum(int(m.sum()) for m in masks)
    assert "of 3 slices" in render.volume_markdown(summary) or "any of the 3 slices" in render.volume_markdown(summary)
    # Loose files work the same, masks optional.
    loose = uploads.read_volume([tmp_path / "P_10.tif", tmp_path / "P_2.tif"])
    assert loose.names == ["P_2", "P_10"] and loose.references == {}
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(ReadError, match="not a valid zip"):
        uploads.read_volume([tmp_path / "bad.zip"])
    with pytest.raises(ReadError, match="not an image"):
        uploads.read_volume([tmp_path / "P_1.tif", bad_files(tmp_path)["text"]])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "P_2_mask.png")  # half the slice's 128 px
    with pytest.raises(ReadError, match="^P_2_mask: mask size differs from its slice$"):
        uploads.read_volume([tmp_path / "P_2.tif", tmp_path / "P_2_mask.png"])
    with pytest.raises(ReadError, match="^no image slices found among the uploaded files$"):
        uploads.read_volume([tmp_path / "P_2_mask.png"])


def test_a_missing_upload_or_an_unreadable_mask_is_one_line_naming_it(tmp_path):
    with pytest.raises(ReadError, match="^gone.png: file not found$"):
        uploads.read_upload(tmp_path / "gone.png")
    with pytest.raises(ReadError, match="^P_1_mask.png: the mask is not a readable image$"):
        read_mask(b"\x89PNG\r\n\x1a\n not really", "P_1_mask.png")


def test_volume_limits_hold_before_the_slices_are_decoded(tmp_path, monkeypatch):
    decoded = []
    real_read = uploads.read_slice
    monkeypatch.setattr(uploads, "read_slice", lambda data, name: decoded.append(name) or real_read(data, name))
    monkeypatch.setattr(uploads, "MAX_VOLUME_SLICES", 3)
    monkeypatch.setattr(uploads, "MAX_VOLUME_PIXELS", 2 * 64 * 64)
    blank = np.zeros((64, 64, 3), np.uint8)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as archive:
        for k in range(4):  # small files that decode to many more bytes than they hold
            Image.fromarray(blank).save(tmp_path / f"P_{k}.png")
            archive.write(tmp_path / f"P_{k}.png", f"P_{k}.png")
    with pytest.raises(ReadError, match="^4 slices and 0 masks; at most 3 of each are accepted$"):
        uploads.read_volume([tmp_path / "many.zip"])
    assert decoded == []
    with pytest.raises(ReadError, match="^the slices hold more than 0 megapixels in all$"):
        uploads.read_volume([tmp_path / f"P_{k}.png" for k in range(3)])
    assert decoded == ["P_0.png", "P_1.png", "P_2.png"]  # stopped at the first slice past the limit
    Image.new("L", (5000, 8)).save(tmp_path / "P_0_mask.png")
    with pytest.raises(ReadError, match="^P_0_mask.png: the image is 5000x8 pixels; at most 4096x4096"):
        uploads.read_volume([tmp_path / "P_0.png", tmp_path / "P_0_mask.png"])


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("flags", 0x1, "encrypted, password required"),  # a zip with a password
        ("method", 9, "compression method is not supported"),  # Deflate64, which zipfile cannot unpack
    ],
)
def test_a_zip_that_cannot_be_unpacked_is_one_line(tmp_path, field, value, reason):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "P_1.png")
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as archive:
        archive.write(tmp_path / "P_1.png", "P_1.png")
    data = bytearray((tmp_path / "ok.zip").read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    for at in (local + 6, central + 8) if field == "flags" else (local + 8, central + 10):
        data[at : at + 2] = value.to_bytes(2, "little")  # the same field of the entry's two headers
    (tmp_path / "odd.zip").write_bytes(bytes(data))
    with pytest.raises(ReadError) as caught:
        uploads.read_volume([tmp_path / "odd.zip"])
    message = str(caught.value)
    assert message.startswith("odd.zip: cannot unpack (") and reason in message and "\n" not in message


def test_the_volume_tab_gives_each_slice_the_one_slice_tabs_map(serving):
    # A loaded segmenter may batch 16 slices; the app's runs one at a time, so a volume's maps are bitwise the
    # one-slice tab's.
    segmenter = app.one_slice_at_a_time(Segmenter(serving.segmenter.network, serving.segmenter.preprocessing))
    assert segmenter.batch_size == 1
    rng = np.random.default_rng(1)
    images = [phantom_slice(rng, 64, tumor=True)[0] for _ in range(3)]
    volume = list(segmenter.iter_probabilities(images))
    assert all(np.array_equal(p, segmenter.probabilities([im])[0]) for p, im in zip(volume, images))


def test_volume_applies_the_models_largest_3d_component(segmenter):
    # a 300-voxel tumor through slices 1-3, and a blob bigger than any of its slices alone on slice 5
    probs = [np.zeros((64, 64), np.float32) for _ in range(6)]
    for k in (1, 2, 3):
        probs[k][10:20, 10:20] = 0.9
    probs[5][40:55, 40:55] = 0.9
    names = [f"P_{k + 1}" for k in range(6)]
    images = [np.full((64, 64, 3), 60, np.uint8)] * 6
    plain = segmenter.with_postprocessing(
        threshold=0.5, min_component_area=0, fill_holes=False, largest_3d_component=False
    )
    summary = render.volume_result(plain, names, images, probs, {}).summary
    assert summary["tumor_pixels"] == 300 + 225 and summary["largest_3d_component"] == "off"
    step = plain.with_postprocessing(largest_3d_component=True)
    result = render.volume_result(step, names, images, probs, {})
    masks, summary = result.masks, result.summary
    assert summary["tumor_pixels"] == 300 and not masks[5].any() and masks[2][15, 15]
    assert summary["largest_3d_component"] == "on" and summary["pixels_outside_largest_3d_component"] == 225
    assert result.gallery[5][1] == "6: no tumor"
    assert "225 predicted pixels outside it" in render.volume_markdown(summary)
    # the same from probabilities kept as float16 (a session's compact copy)
    assert render.volume_result(step, names, images, [p.astype(np.float16) for p in probs], {}).summary == summary
    # by summed probability, a fainter tumor (300 x 0.6 = 180) loses to the surer blob (225 x 0.9 = 202.5)
    faint = [p * (0.6 / 0.9) if k in (1, 2, 3) else p for k, p in enumerate(probs)]
    by_probability = step.with_postprocessing(largest_3d_component_by="probability")
    for kept in (faint, [p.astype(np.float16) for p in faint]):
        result = render.volume_result(by_probability, names, images, kept, {})
        assert result.summary["tumor_pixels"] == 225 and result.masks[5][40:55, 40:55].all()
        assert not result.masks[2].any()
    assert render.volume_result(step, names, images, faint, {}).summary["tumor_pixels"] == 300  # by voxels
    # the volume's Dice pools the pixels of every slice with a reference: 2 * 150 / (200 + 200) on slices 2-3
    references = {"P_2": np.zeros((64, 64), bool), "P_3": np.zeros((64, 64), bool)}
    references["P_2"][10:20, 10:15] = references["P_2"][30:40, 30:35] = True  # 50 of the 100 predicted, 50 elsewhere
    references["P_3"][10:20, 10:20] = True  # exactly the 100 predicted
    result = render.volume_result(step, names, images, probs, references)
    assert result.summary["references"] == 2 and result.summary["dice"] == pytest.approx(2 * 150 / (200 + 200))
    assert result.gallery[1][1].endswith("Dice 0.50") and result.gallery[2][1].endswith("Dice 1.00")
    # slices of different sizes cannot be stacked: the step is skipped, and the page says so
    summary = render.volume_result(
        step, names[:2], [images[0], np.zeros((32, 32, 3), np.uint8)], [probs[1], np.zeros((32, 32), np.float32)], {}
    ).summary
    assert summary["largest_3d_component"].startswith("skipped") and "skipped" in render.volume_markdown(summary)


def model_with_test_split(folder: Path, patients: list[str]) -> Path:
    """The shipped model's files with a metrics.json naming ``patients`` as its test split."""
    folder.mkdir()
    for name in MODEL_FILES:
        shutil.copy(SHIPPED_MODEL_DIR / name, folder / name)
    (folder / "metrics.json").write_text(json.dumps({"splits": {"test": patients}}))
    return folder


def test_gallery_label_says_where_the_examples_come_from(serving, synthetic_dir, tmp_path):
    def gallery_label(serving, examples_dir, synthetic=False) -> str:
        demo = app.build_demo(serving, examples_dir, synthetic)
        label = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "examples-label")
        return label.replace("**", "")

    patients = sorted(p.name for p in synthetic_dir.iterdir() if p.is_dir())[:3]
    tested = load_for_serving(str(model_with_test_split(tmp_path / "model", patients)))
    expected = f"…or click an example (from {synthetic_dir.parent.name} · slices of its test patients)"
    assert gallery_label(tested, synthetic_dir.parent) == expected
    # the shipped model has no test split (its estimate is the cross-validation): its examples are validation slices
    shipped = "…or click an example (published with the model · slices of its validation patients)"
    assert gallery_label(serving, None) == shipped
    assert gallery_label(serving, None, synthetic=True) == "…or click an example (synthetic, not real MRI)"


def test_volume_tab_says_when_the_model_keeps_the_largest_3d_component(serving, monkeypatch):
    def help_text() -> str:
        demo = app.build_demo(serving)
        return next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "volume-help")

    segmenter = serving.segmenter
    monkeypatch.setattr(serving, "segmenter", segmenter.with_postprocessing(largest_3d_component=False))
    assert "3D" not in help_text()
    monkeypatch.setattr(serving, "segmenter", segmenter.with_postprocessing(largest_3d_component=True))
    assert "only the largest 3D tumor component" in help_text()


def test_examples_from_the_project_are_synthetic(serving, tmp_path):
    folder, source, synthetic = app_examples.choose_examples(serving, None, synthetic=True)
    assert folder == app_examples.PROJECT_EXAMPLES_DIR and synthetic and "synthetic" in source
    examples, from_test_patients = app_examples.prepare_examples(folder, tmp_path, synthetic)
    assert [e.caption for e in examples] == ["Tumor 1", "Tumor 2", "Healthy 1", "Healthy 2"] and not from_test_patients
    for e in examples:
        assert e.image.suffix == ".png" and e.mask is not None and e.synthetic
        assert Image.open(e.image).mode == "RGB"


def test_examples_from_a_kaggle_folder(serving, synthetic_dir, tmp_path):
    folder, _, synthetic = app_examples.choose_examples(serving, synthetic_dir.parent)
    assert not synthetic
    found, _ = app_examples.find_examples(folder)
    kinds = [kind for _, _, kind in found]
    assert kinds == ["tumor"] * 3 + ["healthy"] * 3
    assert all(mask is not None and mask.is_file() for _, mask, _ in found)
    examples, _ = app_examples.prepare_examples(folder, tmp_path, synthetic)  # TIFF slices become PNG copies
    assert len(examples) == 6 and all(e.image.suffix == ".png" for e in examples)
    tumor_mask = np.asarray(Image.open(examples[0].mask))
    assert tumor_mask.any() and not np.asarray(Image.open(examples[-1].mask)).any()
    with pytest.raises(FileNotFoundError):
        app_examples.choose_examples(serving, tmp_path / "missing")


def test_kaggle_examples_come_from_the_models_test_patients(serving, synthetic_dir):
    folder, _, _ = app_examples.choose_examples(serving, synthetic_dir.parent)
    patients = sorted(p.name for p in synthetic_dir.iterdir() if p.is_dir())
    held_out = patients[:3]  # 3 patients with tumor and healthy slices
    found, from_test_patients = app_examples.find_examples(folder, held_out=held_out)
    assert from_test_patients and {path.parent.name for path, _, _ in found} <= set(held_out)
    assert [kind for _, _, kind in found] == ["tumor"] * 3 + ["healthy"] * 3  # the same rule as unet.push
    found, from_test_patients = app_examples.find_examples(folder)
    assert not from_test_patients and {path.parent.name for path, _, _ in found} - set(held_out)  # any patient
    # a folder without any of them falls back to all patients (and logs a warning)
    found, from_test_patients = app_examples.find_examples(folder, held_out=["NOT_HERE"])
    assert len(found) == 6 and not from_test_patients


def test_published_examples_are_called_test_patients_only_when_they_are(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    for stem in ("TCGA_AA_0001_20000101_7_tumor", "TCGA_BB_0002_20000101_3_healthy"):  # as unet.push names them
        Image.fromarray(image).save(tmp_path / f"{stem}.png")
        Image.fromarray(image[..., 0]).save(tmp_path / f"{stem}_mask.png")
    both = ["TCGA_AA_0001_20000101", "TCGA_BB_0002_20000101"]
    found, from_test_patients = app_examples.find_examples(tmp_path, held_out=both)
    assert len(found) == 2 and from_test_patients
    _, from_test_patients = app_examples.find_examples(tmp_path, held_out=both[:1])  # one is not a test patient
    assert not from_test_patients
    assert not app_examples.find_examples(tmp_path)[1]


# --- hostile uploads (issue 26): every byte bounded before it is held ----------------------


def zip_with(path: Path, entries: dict[str, bytes], declared_size: int | None = None) -> Path:
    """A zip of ``entries``; with ``declared_size``, both headers of its one entry lie about its unpacked size."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    if declared_size is not None:
        data = bytearray(path.read_bytes())
        local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
        for at in (local + 22, central + 24):  # the uncompressed size field of the local and central headers
            data[at : at + 4] = declared_size.to_bytes(4, "little")
        path.write_bytes(bytes(data))
    return path


def peak_python_mb(read) -> tuple[BaseException | None, float]:
    """What ``read()`` raises and the peak of Python's allocations while it ran (bytes objects included)."""
    tracemalloc.start()
    try:
        read()
        error = None
    except ReadError as caught:
        error = caught
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return error, peak


def test_a_zip_entry_that_lies_about_its_size_is_never_inflated(tmp_path):
    # 200 MB of zeros pack into ~200 KB; the headers say 1 KB. Reading the whole entry at once held all 200 MB.
    bomb = zip_with(tmp_path / "bomb.zip", {"P_1.png": bytes(200 * 2**20)}, declared_size=1000)
    assert bomb.stat().st_size < 2**20
    error, peak = peak_python_mb(lambda: uploads.read_volume([bomb]))
    assert str(error).startswith("bomb.zip: not a valid zip file") and "\n" not in str(error)
    assert peak < 16, f"reading a lying entry held {peak:.0f} MB"


def test_a_zip_entry_past_the_file_cap_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_FILE_MB", 2)
    big = zip_with(tmp_path / "big.zip", {"P_1.png": bytes(64 * 2**20)})  # honest headers, 64 MB unpacked
    error, peak = peak_python_mb(lambda: uploads.read_volume([big]))
    assert str(error) == "big.zip: P_1.png: unpacks to more than 2 MB; at most 2 MB is accepted"
    assert peak < 8, f"an entry over a 2 MB cap held {peak:.0f} MB"


def test_one_byte_budget_covers_every_file_and_zip_of_a_request(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_FILE_MB", 2)
    monkeypatch.setattr(uploads, "MAX_REQUEST_MB", 5)
    zips = [zip_with(tmp_path / f"part{k}.zip", {f"P_{k}.png": bytes(int(1.5 * 2**20))}) for k in range(12)]
    error, peak = peak_python_mb(lambda: uploads.read_volume(zips))
    assert str(error) == "the upload holds more than 5 MB in all"
    assert peak < 12, f"a dozen zips under the per-file cap held {peak:.0f} MB"
    loose = tmp_path / "loose.png"
    loose.write_bytes(bytes(int(1.5 * 2**20)))
    with pytest.raises(ReadError, match="^the upload holds more than 5 MB in all$"):  # loose files count too
        uploads.read_volume([*zips[:3], loose])


def test_one_base_name_twice_in_a_zip_is_refused_in_one_line(tmp_path):
    twice = zip_with(tmp_path / "twice.zip", {"a/P_1.png": b"", "b/P_1.png": b""})  # refused before decoding
    with pytest.raises(
        ReadError,
        match=r"^twice.zip: two entries are named P_1.png \(a/P_1.png and b/P_1.png\); "
        "each slice needs its own name$",
    ):
        uploads.read_volume([twice])


def test_a_long_name_inside_a_zip_is_one_line_without_a_server_path(tmp_path):
    long_zip = zip_with(tmp_path / "long.zip", {"x" * 300 + ".png": b"\x89PNG"})
    with pytest.raises(ReadError) as caught:
        uploads.read_volume([long_zip])
    message = str(caught.value)
    assert message == "long.zip: an entry's name is 304 characters long; at most 245 are accepted"
    # and a download named after long slice names is shortened to a name a file system takes
    work = uploads.WorkFolder()
    path = Path(work.png("y" * 300 + "_mask.png", np.zeros((4, 4), np.uint8)))
    assert path.is_file() and len(path.name) <= uploads.MAX_NAME_CHARS and path.name.endswith(".png")
    work.remove()


def test_a_session_keeps_large_maps_as_float16_and_small_ones_exactly(segmenter):
    events = app.Events(segmenter, uploads.WorkFolder(), [])
    rng = np.random.default_rng(8)
    small, _ = phantom_slice(rng, 256, 1.0, tumor=True)
    large = cv2.resize(small, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    for image, kept in ((small, np.float32), (large, np.float16)):
        outputs = events.run_single(read_slice(cv2.imencode(".png", image)[1].tobytes(), "s.png"), "s", 0.5)
        session = outputs[-1]
        assert session.prob.dtype == kept and session.prob.shape == image.shape[:2]
        # the slider's redraw from what the session keeps says what the first answer said
        assert events.show_single(session, 0.5)[2] == outputs[3]
    events.work.remove()


@pytest.fixture(scope="module")
def demo(serving):
    return app.build_demo(serving)


def test_every_redraw_waits_in_one_small_concurrency_group(demo):
    # Simultaneous redraws of large sessions add up (issue 26's bound): they share one group of at most 2.
    light = {"on_threshold", "on_reference", "on_volume_threshold", "on_scrub"}
    redraws = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") in light]
    assert {f.fn.__name__ for f in redraws} == light and len(redraws) == 2 + 4 + 1 + 2
    assert {(f.concurrency_id, f.concurrency_limit) for f in redraws} == {("redraw", app.REDRAWS_AT_ONCE)}
    assert 1 <= app.REDRAWS_AT_ONCE <= 2


def test_the_one_slice_tab_compares_the_slice_with_the_prediction(segmenter, phantom, demo):
    sliders = [b for b in demo.blocks.values() if isinstance(b, app.gr.ImageSlider)]
    assert [s.elem_id for s in sliders] == ["comparison"]
    path, _, _ = phantom
    events = app.Events(segmenter, uploads.WorkFolder(), [])
    outputs = events.on_upload([str(path)], None, None, 0.5, "Pre-contrast", "Filled", 0.45)
    before, after = outputs[-2]
    assert after == outputs[4]  # the overlay on show
    shown, image = np.asarray(Image.open(before)), load_slice(path).image
    assert np.array_equal(shown, np.repeat(image[..., :1], 3, axis=2))  # the channel on show, without the prediction
    assert not np.array_equal(np.asarray(Image.open(after)), shown)
    assert events.on_threshold(outputs[-1], 0.9, "FLAIR", "Outline", 0.45)[-1][1].endswith("_overlay.png")
    events.work.remove()


def test_the_area_charts_legend_names_the_two_lines(demo):
    chart = viewer.area_frame(["1", "2"], [5, 0], [3, 4])
    plot = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "volume-plot")
    assert plot.color == "series" and set(chart[plot.color]) == {"predicted", "reference"}
    assert plot.color_title == ""  # no "series" title above the names
    assert plot.color_map == viewer.AREA_COLORS and set(plot.color_map) == set(chart[plot.color])
    assert plot.height is None  # at a fixed height Gradio 6.31 clips the legend's names
    value = plot.postprocess(chart)
    column = value.columns.index("series")
    assert [row[column] for row in value.data] == ["predicted", "predicted", "reference", "reference"]


def test_the_api_page_samples_an_image_for_the_image_endpoint(demo):
    parameter = demo.get_api_info()["named_endpoints"]["/segment"]["parameters"][0]
    assert parameter["parameter_name"] == "image" and parameter["example_input"]["path"].endswith(".png")


def test_the_work_folder_keeps_at_most_its_cap_of_downloads_oldest_removed_first():
    work = uploads.WorkFolder(max_mb=1)
    assert uploads.MAX_DOWNLOADS_MB == 256 and uploads.WorkFolder().max_bytes == 256 * 2**20
    noise = np.random.default_rng(0).integers(0, 256, (400, 600), np.uint8)  # ~235 KB as PNG: it hardly compresses
    paths = [Path(work.png(f"d{k}.png", noise)) for k in range(6)]
    kept = [p for p in paths if p.exists()]
    assert kept == paths[-4:]  # the two oldest went when the fifth and sixth passed 1 MB
    assert sum(p.stat().st_size for p in kept) <= 2**20 == work.max_bytes and work.kept_bytes <= 2**20
    assert not paths[0].parent.exists()  # the download's folder goes with it
    huge = Path(work.png("huge.png", np.random.default_rng(1).integers(0, 256, (1200, 1200), np.uint8)))
    assert huge.exists() and not any(p.exists() for p in kept)  # the newest stays, even alone past the cap
    work.remove()


def test_the_work_folder_still_sweeps_downloads_by_age():
    work = uploads.WorkFolder(keep_s=0)
    first = Path(work.png("a.png", np.zeros((4, 4), np.uint8)))
    time.sleep(0.01)
    second = Path(work.png("b.png", np.zeros((4, 4), np.uint8)))
    assert second.exists() and not first.exists()
    work.remove()


def test_what_a_session_keeps_expires_after_ten_minutes(serving):
    demo = app.build_demo(serving)
    states = [b for b in demo.blocks.values() if isinstance(b, app.gr.State)]
    assert len(states) == 2 and all(s.time_to_live == app.SESSION_TTL_S == 600 for s in states)


# --- flags and startup ---------------------------------------------------------------------


def test_flags_and_environment(monkeypatch):
    for key in ("SPACE_ID", "MODEL_ID", "MODEL_REVISION", "GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(key, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.model, args.revision) == ("127.0.0.1", 7860, None, None)
    monkeypatch.setenv("SPACE_ID", "user/space")
    monkeypatch.setenv("MODEL_ID", "user/brain-mri-unet")
    monkeypatch.setenv("MODEL_REVISION", "v1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    args = app.parse_args([])
    assert (args.host, args.port, args.model, args.revision) == ("0.0.0.0", 7000, "user/brain-mri-unet", "v1")
    assert app.parse_args(["--model", "m", "--host", "127.0.0.2"]).model == "m"


def test_importing_the_app_turns_gradios_analytics_off_whatever_the_environment():
    # In a fresh process: this one's conftest already set the variable before app was imported.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "True"}
    seen = subprocess.run(
        [sys.executable, "-c", "import app, gradio.analytics as a; print(a.analytics_enabled())"],
        cwd=app.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert seen.returncode == 0, seen.stderr[-2000:]
    assert seen.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "0"], "--concurrency must be at least 1, not 0"),
        (["--port", "99999"], "--port must be from 1 to 65535, not 99999"),
    ],
)
def test_flags_that_cannot_work_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(flags)
    assert message in capsys.readouterr().err


def test_a_port_setting_that_is_no_number_is_refused_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "80a")
    with pytest.raises(SystemExit):
        app.parse_args([])
    assert "GRADIO_SERVER_PORT='80a' is not a port number" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["5s", "0", "nan"])
def test_a_hub_timeout_that_is_no_duration_is_one_line_naming_it(monkeypatch, tmp_path, caplog, value, dead_endpoint):
    monkeypatch.setenv("HUB_CONNECT_TIMEOUT", value)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint)  # should a request go out, it fails
    with caplog.at_level(logging.ERROR, logger="app"):
        assert app.main(["--model", "user/brain-mri-unet"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"HUB_CONNECT_TIMEOUT={value!r} is not a number of seconds above 0" in errors[0]


def test_missing_shipped_model_is_one_line_error(monkeypatch, caplog):
    monkeypatch.delenv("MODEL_ID", raising=False)
    monkeypatch.setattr(app, "SHIPPED_MODEL_DIR", app.ROOT / "models" / "no-such-model")
    with caplog.at_level(logging.ERROR, logger="app"):
        assert app.main([]) == 2
    assert "no model to serve" in caplog.text and "--model" in caplog.text


def test_bad_model_is_one_line_error(tmp_path, caplog):
    (tmp_path / "empty-model").mkdir()
    with caplog.at_level(logging.ERROR, logger="app"):
        assert app.main(["--model", str(tmp_path / "empty-model")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "cannot start" in errors[0]


def test_a_port_in_use_is_one_line_naming_it(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="app"):
            assert app.main(["--model", str(SHIPPED_MODEL_DIR), "--port", str(port)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "app" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"cannot listen on 127.0.0.1:{port} (")
    assert errors[0].endswith("): check --host and --port")


def test_sigterm_removes_the_work_folder_and_exits(tmp_path):
    # Spaces stop a container with SIGTERM; atexit does not run then, the app's handler must clean up.
    log_path = tmp_path / "app.log"
    with held_port() as port, open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(SHIPPED_MODEL_DIR), "--port", str(port)],
            cwd=app.ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
                time.sleep(0.5)
            text = log_path.read_text()
            work = Path(text.split("work folder ", 1)[1].split()[0])
            assert work.is_dir() and any(work.iterdir()), text[-2000:]  # the examples' PNG copies
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 128 + signal.SIGTERM, log_path.read_text()[-2000:]
    assert not work.exists()


# --- the API, through gradio_client --------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(serving):
    demo = app.build_demo(serving)
    with held_port() as port:
        app.launch(demo, "127.0.0.1", port, concurrency=1, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_segment_endpoint_with_gradio_client(app_url, serving, phantom, tmp_path, capfd, caplog):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    # The API is exactly /segment: the page's own events are private.
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
        "/segment",
        "/segment_volume",
    ]
    path, _, image = phantom
    overlay_path, mask_path, summary = client.predict(handle_file(str(path)), 0.3, api_name="/segment")
    overlay, mask = Image.open(overlay_path), Image.open(mask_path)
    assert overlay.format == "PNG" and mask.format == "PNG"  # lossless, not WebP
    assert overlay.size == (256, 256) and mask.size == (256, 256)
    assert set(np.unique(np.asarray(mask.convert("L")))) <= {0, 255}
    assert summary["threshold"] == 0.3 and summary["tumor_pixels"] == int((np.asarray(mask.convert("L")) > 0).sum())
    assert summary["tumor_pixels"] > 0
    # The threshold may be left out: the model's own is used.
    default = round(serving.segmenter.postprocessing.threshold, 2)
    assert client.predict(handle_file(str(path)), api_name="/segment")[2]["threshold"] == default

    # A bad file or threshold is a one-line error, and the server keeps serving.
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="app"), pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(text)), 0.5, api_name="/segment")
    with caplog.at_level(logging.INFO, logger="app"), pytest.raises(Exception, match="from 0.01 to 0.99"):
        client.predict(handle_file(str(path)), 1e-300, api_name="/segment")
    assert "Traceback" not in capfd.readouterr().err  # the server logs one line, not a traceback
    assert "/segment refused: notes.txt: not an image" in caplog.text
    assert "/segment refused: threshold 1e-300: choose a probability cut from 0.01 to 0.99" in caplog.text

    # Concurrent users all get answers (the queue serves them in turn).
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda t: client.predict(handle_file(str(path)), t, api_name="/segment")[2], [0.2, 0.4, 0.6, 0.8])
        )
    areas = [r["tumor_pixels"] for r in results]
    assert areas == sorted(areas, reverse=True) and areas[0] > areas[-1]  # each answer used its own threshold

    # Eight users sending the identical slice at once all get complete, identical outputs
    # (identical outputs once raced for one file in Gradio's cache).
    clients = [Client(client.src, download_files=str(tmp_path / f"client{i}"), verbose=False) for i in range(8)]

    def three_masks(c):
        return [np.array(Image.open(c.predict(handle_file(str(path)), 0.5, api_name="/segment")[1])) for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        masks = list(pool.map(three_masks, clients))
    assert all(np.array_equal(m, masks[0][0]) for per_client in masks for m in per_client)


# --- the reader's view, Dice for your own slice, the volume viewer (issue 27) -------------------------------


def test_the_view_shows_flair_in_grayscale_and_colours_agreement():
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 120, 200
    mask, reference = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    mask[4:12, 4:20], reference[4:12, 12:28] = True, True  # hits at columns 12-19, FP 4-11, misses 20-27
    plain = viewer.draw_view(image, np.zeros_like(mask))
    assert (plain == 120).all()  # FLAIR, gray, untouched where nothing is predicted
    assert (viewer.draw_view(image, np.zeros_like(mask), channel="Composite (R, G, B)") == image).all()
    view = viewer.draw_view(image, mask, reference, opacity=1.0)
    assert tuple(view[8, 15]) == viewer.HIT and tuple(view[8, 7]) == viewer.FALSE_POSITIVE
    assert tuple(view[8, 24]) == viewer.MISS and tuple(view[20, 20]) == (120, 120, 120)
    half = viewer.draw_view(image, mask, None, opacity=0.5)
    assert tuple(half[8, 8]) == tuple(round(120 * 0.5 + c * 0.5) for c in viewer.PREDICTION)
    outline = viewer.draw_view(image, mask, reference, style="Outline")
    assert tuple(outline[8, 8]) == (120, 120, 120) and tuple(outline[4, 8]) == viewer.PREDICTION
    assert "miss" in viewer.legend_html(True) and "miss" not in viewer.legend_html(False)


def test_the_probability_map_has_a_colour_bar_with_the_threshold():
    prob = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    picture = viewer.probability_with_colorbar(prob, 0.5)
    assert picture.shape == (64, 64 + viewer.BAR_WIDTH, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[:, :64], viewer.probability_image(prob))
    bar = picture[:, 64 + 6 : 64 + 20]
    assert bar[8, 5].sum() > bar[-8, 5].sum()  # bright (1) at the top, dark (0) at the bottom


def test_a_slice_dropped_with_its_mask_is_paired_by_name():
    assert viewer.pair_slice_and_mask(["/u/X.tif", "/u/X_mask.tif"]) == ("/u/X.tif", "/u/X_mask.tif")
    assert viewer.pair_slice_and_mask(["/u/X.tif"]) == ("/u/X.tif", None)
    assert viewer.pair_slice_and_mask(["/u/X.tif", "/u/X_mask.tif"], "/r/ref.png")[1] == "/r/ref.png"
    with pytest.raises(ReadError, match="not the mask of X.tif"):
        viewer.pair_slice_and_mask(["/u/X.tif", "/u/Y_mask.tif"])
    with pytest.raises(ReadError, match="drop one slice"):
        viewer.pair_slice_and_mask(["/u/X.tif", "/u/Y.tif"])


def test_your_own_slice_gets_dice_from_its_mask(segmenter, phantom):
    path, mask_path, _ = phantom
    events = app.Events(segmenter, uploads.WorkFolder(), [])
    outputs = events.on_upload([str(path), str(mask_path)], None, None, 0.5, "FLAIR", "Filled", 0.45)
    summary, legend, session = outputs[6], outputs[7], outputs[-1]
    assert "Dice against the reference mask" in summary and "miss" in legend and session.reference is not None
    assert outputs[0] == [str(path), str(mask_path)]  # the upload box keeps its files, and their names
    dice_value = float(re.search(r"Dice against the reference mask: ([\d.]+)", summary).group(1))
    assert dice_value > 0.7
    # a reference added afterwards, then removed
    # a new drop adds to what the box shows: only the new file is read
    other = path.with_name("other.png")
    shutil.copy(path, other)
    alone = events.on_upload([str(path), str(mask_path), str(other)], None, session, 0.5, "FLAIR", "Filled", 0.45)
    assert alone[0] == [str(other)] and "other" in alone[6]
    assert "Dice" not in alone[6]
    added = events.on_reference(alone[-1], str(mask_path), 0.5, "FLAIR", "Filled", 0.45)
    assert f"{dice_value:.3f}" in added[2] and added[-1].reference is not None
    assert "Dice" not in events.on_reference(added[-1], None, 0.5, "FLAIR", "Filled", 0.45)[2]
    events.work.remove()


def test_the_volume_viewer_opens_on_the_slice_with_most_tumor(segmenter, tmp_path):
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 4):
        image, mask = phantom_slice(rng, 128, 1.0 + (n == 3), tumor=n in (2, 3))
        Image.fromarray(image).save(tmp_path / f"P_{n}.png")
        Image.fromarray(mask).save(tmp_path / f"P_{n}_mask.png")
    events = app.Events(segmenter, uploads.WorkFolder(), [])
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    box, summary, chart, download, scrubber, axial, caption, coronal, sagittal, session = events.on_volume(
        paths, 0.5, "FLAIR", progress=lambda *a, **k: None
    )
    assert box == paths and session.files == paths
    areas = [int(m.sum()) for m in session.masks]
    assert scrubber.value == int(np.argmax(areas)) + 1 and scrubber.maximum == 4
    assert caption.startswith(f"Slice {scrubber.value} of 4 (") and "Dice" in caption
    assert set(chart["series"]) == {"predicted", "reference"} and len(chart) == 8
    assert Image.open(coronal).size[0] == 128 and Image.open(axial).size == (128, 128)
    assert download.endswith("_masks.zip")
    moved = events.on_scrub(session, 1, "Composite (R, G, B)")
    assert moved[1].startswith("Slice 1 of 4 (1): ")
    again = events.on_volume_threshold(session, 0.9, "FLAIR", 1)
    assert again[5].startswith("Slice 1 of 4")  # a new threshold keeps the scrubber where it is
    events.work.remove()


def test_the_area_chart_stays_a_line_at_200_slices():
    chart = viewer.area_frame([str(k) for k in range(200)], list(range(200)), [0] * 200)
    assert len(chart) == 400 and chart["slice"].max() == 200 and chart["slice"].dtype.kind == "i"


def test_segment_volume_endpoint_function_returns_a_nifti_on_the_inputs_grid(segmenter, tmp_path):
    import nibabel as nib

    volume = np.zeros((64, 64, 6), np.float32)
    volume[16:48, 16:48, :] = 300.0
    volume[28:36, 28:36, 2:4] = 900.0
    affine = np.diag([-1.5, 1.5, 4.0, 1.0])  # LAS, as many scanners write
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "case.nii.gz")
    events = app.Events(segmenter, uploads.WorkFolder(), [])
    mask_path, summary = events.api_segment_volume([str(tmp_path / "case.nii.gz")], 0.5)
    written = nib.load(mask_path)
    assert mask_path.endswith("case_mask.nii.gz") and np.array_equal(written.affine, affine)
    assert written.shape == volume.shape and summary["voxel_size_mm"] == [1.5, 1.5, 4.0]
    assert summary["tumor_volume_ml"] == pytest.approx(summary["tumor_voxels"] * 9.0 / 1000, abs=1e-3)
    with pytest.raises(app.gr.Error, match="2D"):
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), affine), tmp_path / "flat.nii")
        events.api_segment_volume([str(tmp_path / "flat.nii")], None)
    events.work.remove()
