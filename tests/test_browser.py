"""End to end in a real browser: Debian's chromium driven by playwright against the running app.

Never `playwright install` (it downloads a browser): CI installs chromium with apt
(.ci/install-browser.sh). Without /usr/bin/chromium the test is skipped locally, failed in CI.
"""

from __future__ import annotations

import os
import re
import socket
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import app
from unet.serving import SHIPPED_MODEL_DIR, load_for_serving
from unet.synthetic import phantom_slice

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"  # app.png is the README's
EXAMPLES = SHIPPED_MODEL_DIR / "examples"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def app_url():
    # The shipped model finds the phantoms' tumors, so the threshold visibly moves the area.
    demo = app.build_demo(load_for_serving(str(SHIPPED_MODEL_DIR), batch_size=1))
    with socket.socket() as held:  # held bound (not listening) until the server, binding with SO_REUSEADDR, has it
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install it with .ci/install-browser.sh (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app_url)
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def uploads(folder: Path) -> dict[str, Path]:
    """A generated tumor slice as TIFF (browsers cannot show TIFF), a text file, three volume slices."""
    rng = np.random.default_rng(11)
    image, _ = phantom_slice(rng, 256, 1.0, tumor=True)
    files = {"tiff": folder / "patient_slice.tif", "text": folder / "notes.txt"}
    Image.fromarray(image).save(files["tiff"])
    files["text"].write_text("this is not an image\n")
    with zipfile.ZipFile(folder / "volume.zip", "w") as archive:
        for n in (1, 2, 3):
            image, mask = phantom_slice(rng, 128, 1.0, tumor=n == 2)
            Image.fromarray(image).save(folder / f"P_{n}.png")
            Image.fromarray(mask).save(folder / f"P_{n}_mask.png")
            archive.write(folder / f"P_{n}.png", f"P_{n}.png")
            archive.write(folder / f"P_{n}_mask.png", f"P_{n}_mask.png")
    files["zip"] = folder / "volume.zip"
    return files


def set_threshold(page, value: float) -> None:
    page.locator("#threshold input[type=range]").fill(str(value))


def test_single_slice_flow(page, tmp_path):
    from playwright.sync_api import expect

    files = uploads(tmp_path)
    summary = page.locator("#summary")
    overlay = page.locator("#overlay img")
    expect(page.get_by_text("not for clinical use").first).to_be_visible()
    expect(page.locator("#model-info")).to_contain_text("Model:")

    # One click on the first (tumor) example, a real test-patient slice: overlay, probability map, Dice, legend.
    page.locator("#examples button.thumbnail-item").first.click()
    expect(overlay).to_be_visible()
    expect(page.locator("#probability img")).to_be_visible()
    expect(summary).to_contain_text("Dice against the reference mask")
    expect(summary).not_to_contain_text("synthetic")
    expect(page.locator("#legend")).to_contain_text("false positive")
    page.screenshot(path=str(SCREENSHOTS / "app.png"), full_page=True)

    # Your own slice with its mask, dropped together: paired by name and scored; the example is deselected.
    tumor = sorted(EXAMPLES.glob("*_tumor.png"))[0]
    page.locator("#upload input[type=file]").set_input_files(
        [str(tumor), str(tumor.with_name(f"{tumor.stem}_mask.png"))]
    )
    expect(summary).to_contain_text(tumor.stem)
    expect(summary).to_contain_text("Dice against the reference mask")
    expect(page.locator("#examples button.thumbnail-item.selected")).to_have_count(0)
    expect(page.locator("#upload")).to_contain_text(tumor.stem)  # the box keeps the file's name
    page.locator("#style label", has_text="Outline").click()
    expect(page.locator("#legend")).to_contain_text("outline")
    page.screenshot(path=str(SCREENSHOTS / "app-own-slice-with-mask.png"), full_page=True)

    # Upload a TIFF: it is previewed as PNG and segmented.
    page.locator("#upload input[type=file]").set_input_files(str(files["tiff"]))
    expect(summary).not_to_contain_text("Dice")
    expect(page.locator("#preview img")).to_have_attribute("src", re.compile(r"\.png"))
    expect(overlay).to_have_attribute("src", re.compile(r"\.png"))

    # Move the threshold: the area follows, without running the network again.
    set_threshold(page, 0.01)
    expect(summary).to_contain_text("at threshold 0.01")
    low_text, low_src = summary.inner_text(), overlay.get_attribute("src")
    low_area = re.search(r"Tumor found: [\d,]+ pixels", low_text).group(0)
    set_threshold(page, 0.99)
    expect(summary).to_contain_text("at threshold 0.99")
    expect(overlay).not_to_have_attribute("src", low_src)
    high_area = re.search(r"Tumor found: ([\d,]+) pixels", summary.inner_text()).group(1)
    assert int(high_area.replace(",", "")) < int(re.sub(r"\D", "", low_area))  # fewer pixels reach 0.99
    set_threshold(page, 0.01)
    expect(summary).to_contain_text(low_area)

    # The mask downloads as a PNG of the slice's size.
    with page.expect_download() as download:
        page.locator("#mask-file").click()
    mask_path = tmp_path / "downloaded_mask.png"
    download.value.save_as(mask_path)
    mask = Image.open(mask_path)
    assert mask.format == "PNG" and mask.size == (256, 256) and download.value.suggested_filename.endswith("_mask.png")

    # A text file: a one-line message in the page, and the app keeps working.
    page.locator("#upload input[type=file]").set_input_files(str(files["text"]))
    expect(summary).to_contain_text("not an image")
    expect(page.locator(".toast-body").first).to_contain_text("not an image")
    page.locator("#examples button.thumbnail-item").last.click()
    expect(summary).to_contain_text("Dice against the reference mask")
    expect(overlay).to_be_visible()


def test_volume_flow(page, tmp_path):
    from playwright.sync_api import expect

    files = uploads(tmp_path)
    page.get_by_role("tab", name=re.compile("Volume")).click()
    caption, summary = page.locator("#volume-caption"), page.locator("#volume-summary")
    # The example patient, one click away: it opens on the slice with the most tumor.
    flair = sorted((EXAMPLES / "volume").glob("*_flair.nii.gz"))[0]
    slices = nib.load(flair).shape[2]  # axial slices last, as unet.nifti writes them
    page.locator("#volume-example").click()
    expect(summary).to_contain_text("Dice against the reference masks")
    expect(caption).to_contain_text(re.compile(rf"Slice \d+ of {slices}"))
    expect(caption).not_to_contain_text(f"Slice 1 of {slices}")
    expect(page.locator("#volume-plot")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "app-volume-viewer.png"), full_page=True)
    # Scrub to the first slice: the view and its caption follow.
    page.locator("#volume-scrubber input[type=range]").fill("1")
    expect(caption).to_contain_text(f"Slice 1 of {slices}")

    # A NIfTI volume (FLAIR only) in, its mask out as .nii.gz on the same grid.
    page.locator("#volume-upload input[type=file]").set_input_files(str(flair))
    expect(summary).to_contain_text("mL")
    expect(summary).to_contain_text("FLAIR stands in")
    with page.expect_download() as download:
        page.locator("#volume-download a").first.click()
    assert download.value.suggested_filename.endswith("_mask.nii.gz")
    download.value.save_as(tmp_path / "mask.nii.gz")

    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(flair).shape
    page.screenshot(path=str(SCREENSHOTS / "app-nifti.png"), full_page=True)

    # Slices in a zip, with their masks.
    page.locator("#volume-upload input[type=file]").set_input_files(str(files["zip"]))
    expect(caption).to_contain_text("of 3")


def test_usable_at_420_px(browser, app_url):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 420, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    thumbnails = page.locator("#examples button.thumbnail-item")
    expect(thumbnails.first).to_be_visible()
    for index in range(thumbnails.count()):  # no example is cut off at the right edge
        box = thumbnails.nth(index).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 420 + 1
    page.screenshot(path=str(SCREENSHOTS / "app-420px.png"), full_page=True)
    context.close()
