"""The one reader (unet.reader): any decoded array or file -> RGB uint8 in the file's channel order."""

import io

import numpy as np
import pytest
from PIL import Image

from unet.reader import ReadError, read_image, read_mask, read_slice, to_rgb_uint8


def test_to_rgb_uint8_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(gray).shape == (3, 4, 3) and (to_rgb_uint8(gray)[..., 2] == gray).all()
    rgba = np.dstack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3, 255)])
    assert to_rgb_uint8(rgba)[0, 0].tolist() == [1, 2, 3]
    deep = np.array([[0, 1000], [2000, 4000]], np.uint16)
    assert to_rgb_uint8(deep)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert to_rgb_uint8(np.full((2, 2), 7, np.uint16)).max() == 0
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_file_and_its_bytes_read_the_same_in_the_files_channel_order(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "slice.png"
    path.write_bytes(png_bytes(image))
    np.testing.assert_array_equal(read_image(path), image)  # channel 0 stays channel 0: no BGR flip
    np.testing.assert_array_equal(read_image(path.read_bytes(), "upload.png"), image)
    gray = read_slice(png_bytes(image[..., 1]), "gray.png")
    assert gray.image.shape == (20, 30, 3) and any("grayscale" in note for note in gray.notes)


def test_a_mask_reads_as_bool_whatever_its_scale(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    for scale in (255, 1):
        read = read_mask(png_bytes(mask // 255 * scale), "mask.png")
        assert read.dtype == bool and read.sum() == 9 and read[2:5, 3:6].all()


NOISE_PNG = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_an_unreadable_file_is_one_line_naming_it():
    for data, says in (
        (b"", "the file is empty"),
        (b"not an image at all", "not an image this app reads"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], "corrupt or truncated"),
    ):
        with pytest.raises(ReadError) as caught:
            read_image(data, "scan_07.png")
        message = str(caught.value)
        assert message.startswith("scan_07.png: ") and says in message and "\n" not in message
