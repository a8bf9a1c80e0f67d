"""Hostile uploads against the real app (issue 26): `python app.py` as a subprocess with the shipped model, every
payload generated here (none committed).

Each class of input must get a one-line error (no traceback, no server path), leave the server serving a normal
slice, and keep the app process's peak resident memory (VmHWM, reset before each case through
/proc/PID/clear_refs) under `PEAK_BOUND_MB`. ``/segment`` is called through `gradio_client`; the page's events
(volume upload, threshold redraws) are private, which `gradio_client` refuses to call, so `Page` calls them the way
the browser does: upload, join the queue by event id, read the event stream. An attacker can do the same.

The load test sends 16 `gradio_client` clients at once at a queue of 4: every accepted request succeeds and every
refused one is a clean "queue full".
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

import app
from unet import uploads
from unet.serving import SHIPPED_MODEL_DIR
from unet.synthetic import phantom_slice

log = logging.getLogger(__name__)

PEAK_BOUND_MB = 1500  # the bound for the whole app process on the 2-core machine (about 500 MB at rest)
QUEUE_SIZE = 4  # the subprocess app's --max-queue: small, so that the load test fills it
SIDE = 4096  # the reader's MAX_SIDE: the largest image an upload may decode to


# ---------------------------------------------------------------------------------------------------------------
# The app process


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def status_kb(self, key: str) -> int:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))

    def reset_peak(self) -> None:
        """Start VmHWM afresh from the current resident size (Linux: write 5 to clear_refs)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    command = [sys.executable, "app.py", "--model", str(SHIPPED_MODEL_DIR), "--max-queue", str(QUEUE_SIZE)]
    with held_port() as port, open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=app.ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                break
            time.sleep(0.3)
    assert process.poll() is None, log_path.read_text()[-3000:]
    yield Server(process, url, log_path)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def held_port():
    """A free port held bound (not listening) until the server has started, as in test_app.py."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False, ssl_verify=False)


class Page:
    """The browser's side of the page's private events: upload files, join the queue by event id, read the stream.

    Inputs and outputs are named by their elem_id; an input not given takes its component's value on the page.
    """

    def __init__(self, url: str) -> None:
        self.api = url.rstrip("/") + "/gradio_api"
        self.session = uuid.uuid4().hex  # one browser tab
        config = httpx.get(url.rstrip("/") + "/config", timeout=30).json()
        self.components = {c["id"]: c for c in config["components"]}
        self.events = {
            (self.elem_id(target), trigger): dep for dep in config["dependencies"] for target, trigger in dep["targets"]
        }

    def elem_id(self, component: int) -> str:
        return self.components[component]["props"].get("elem_id") or str(component)

    def upload(self, paths: list[Path]) -> list[dict]:
        with contextlib.ExitStack() as stack:
            files = [("files", (p.name, stack.enter_context(p.open("rb")))) for p in paths]
            answer = httpx.post(self.api + "/upload", files=files, timeout=120)
        answer.raise_for_status()
        return [
            {"path": s, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}} for s, p in zip(answer.json(), paths)
        ]

    def call(self, elem_id: str, trigger: str, **given) -> dict:
        """The event's answer: {"success", "outputs" by elem_id or "error", "logs"}, or {"status", "text"} when the
        queue refused it."""
        dep = self.events[(elem_id, trigger)]
        data = []
        for component in dep["inputs"]:
            name, props = self.elem_id(component), self.components[component]["props"]
            data.append(given[name] if name in given else None if props.get("value") is None else props["value"])
        body = {"data": data, "event_data": None, "fn_index": dep["id"], "trigger_id": dep["targets"][0][0]}
        joined = httpx.post(self.api + "/queue/join", json={**body, "session_hash": self.session}, timeout=30)
        if joined.status_code != 200:
            return {"status": joined.status_code, "text": joined.text}
        event_id, logs = joined.json()["event_id"], []
        params = {"session_hash": self.session}
        with httpx.stream("GET", self.api + "/queue/data", params=params, timeout=300) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("event_id") != event_id:
                    continue
                if message.get("msg") == "log":
                    logs.append(message.get("log"))
                if message.get("msg") == "process_completed":
                    output = message["output"]
                    answer = {"success": message["success"], "logs": logs, "error": output.get("error")}
                    if "data" in output:
                        answer["outputs"] = dict(zip(map(self.elem_id, dep["outputs"]), output["data"]))
                    return answer
        raise AssertionError("the event stream ended without an answer")

    def volume(self, paths: list[Path], threshold: float = 0.5) -> dict:
        return self.call(
            "volume-upload", "upload", **{"volume-upload": self.upload(paths), "volume-threshold": threshold}
        )

    def redraw(self, threshold: float) -> dict:
        return self.call("volume-threshold", "change", **{"volume-threshold": threshold})


# ---------------------------------------------------------------------------------------------------------------
# Checks after every case


def assert_one_line(message: str, name: str = "") -> None:
    assert message and "\n" not in message.strip(), message
    assert "Traceback" not in message and 'File "' not in message, message
    for server_path in ("/tmp", "/work", "/root", str(app.ROOT)):
        assert server_path not in message, message
    if name:
        assert name in message, message


def volume_error(answer: dict) -> str:
    """The one-line error of a refused volume upload: the page's summary says it, and so does its warning."""
    assert answer.get("success"), answer
    summary = answer["outputs"]["volume-summary"]
    assert summary.startswith("### Could not use these files\n"), summary
    error = summary.split("\n", 1)[1]
    assert answer["logs"] == [error], answer["logs"]
    return error


def segment_error(client, path: Path) -> str:
    from gradio_client import handle_file

    with pytest.raises(Exception) as caught:
        client.predict(handle_file(str(path)), 0.5, api_name="/segment")
    return str(caught.value)


@pytest.fixture(scope="module")
def normal_slice(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("normal") / "slice.png"
    Image.fromarray(phantom_slice(np.random.default_rng(3), 256, 1.0, tumor=True)[0]).save(path)
    return path


@pytest.fixture
def check(server, client, normal_slice):
    """Reset the peak, run the case, then: the server serves a normal slice, and its peak stayed in bounds."""
    from gradio_client import handle_file

    peaks = {}

    @contextlib.contextmanager
    def measured(case: str):
        server.reset_peak()
        yield
        peaks[case] = server.peak_mb()
        log.warning("peak resident memory for %s: %.0f MB", case, peaks[case])
        summary = client.predict(handle_file(str(normal_slice)), 0.5, api_name="/segment")[2]
        assert summary["tumor_pixels"] > 0  # it still serves, and still finds the tumor
        assert server.process.poll() is None
        assert peaks[case] < PEAK_BOUND_MB, f"{case}: the app's peak resident memory was {peaks[case]:.0f} MB"

    yield measured
    MEASURED.update(peaks)


MEASURED: dict[str, float] = {}  # case -> peak MB, printed at the end of the module for docs/app.md


# ---------------------------------------------------------------------------------------------------------------
# Payloads, generated


def blocky_slice(side: int = SIDE) -> np.ndarray:
    """A phantom slice blown up with nearest-neighbour: it compresses well at any bit depth."""
    image = phantom_slice(np.random.default_rng(5), 256, 1.0, tumor=True)[0]
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST)


def lying_zip(path: Path, entry: str, inflated_mb: int, declared: int = 1000) -> Path:
    """A zip whose one entry inflates to ``inflated_mb`` MB while both its headers say ``declared`` bytes; written
    in 1 MB chunks, so neither this process nor the disk holds the inflated bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        info = zipfile.ZipInfo(entry)
        info.compress_type = zipfile.ZIP_DEFLATED  # a ZipInfo stores by default
        with archive.open(info, "w") as writer:
            chunk = bytes(2**20)
            for _ in range(inflated_mb):
                writer.write(chunk)
    data = bytearray(path.read_bytes())
    local, central = 0, data.rfind(b"PK\x01\x02")
    for at in (local + 22, central + 24):  # the uncompressed size field of the local and central headers
        data[at : at + 4] = declared.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def tiff_bytes(width: int, height: int, samples: int, bits: int, sample_format: int, strip: bytes) -> bytes:
    """A little-endian TIFF of one Deflate strip: any declared size, depth and sample format (3 = float)."""
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, bits),  # one value for every sample: readers accept it
        (259, 3, 1, 8),  # Deflate
        (262, 3, 1, 2 if samples == 3 else 1),
        (273, 4, 1, 0),  # strip offset, filled in below
        (277, 3, 1, samples),
        (278, 4, 1, height),
        (279, 4, 1, len(strip)),
        (284, 3, 1, 1),
        (339, 3, 1, sample_format),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    strip_at = 8 + ifd_size
    entries = b"".join(
        struct.pack("<HHI", tag, kind, count)
        + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", strip_at if tag == 273 else value))
        for tag, kind, count, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\x00" * 4 + strip


def png_bytes(width: int, height: int, idat: bytes, depth: int = 8, color: int = 0) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A gray PNG of ``side`` x ``side`` zero pixels, genuinely deflated (400 MB of rows in ~400 KB at 20000)."""
    packer, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(packer.compress(row))
    return png_bytes(side, side, b"".join(parts) + packer.flush())


def png_zip(path: Path, names: list[str], image: np.ndarray) -> Path:
    ok, encoded = cv2.imencode(".png", image[..., ::-1])
    assert ok
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for name in names:
            archive.writestr(name, encoded.tobytes())
    return path


@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("payloads")


@pytest.fixture(scope="module")
def gigabyte_liar(payloads) -> Path:
    """A ~1 MB zip whose one entry says 1000 bytes and inflates to 1 GB."""
    return lying_zip(payloads / "liar.zip", "P_1.png", inflated_mb=1024)


# ---------------------------------------------------------------------------------------------------------------
# Zips


def test_a_zip_entry_lying_about_its_size(server, client, check, gigabyte_liar):
    assert gigabyte_liar.stat().st_size < 8 * 2**20
    with check("zip entry lying about its size (1 GB in a ~1 MB zip)"):
        error = volume_error(Page(server.url).volume([gigabyte_liar]))
    assert_one_line(error, "liar.zip")
    assert error.startswith("liar.zip: not a valid zip file")
    assert_one_line(segment_error(client, gigabyte_liar), "liar.zip")  # /segment's reader takes images only


def test_a_dozen_lying_zips_at_once(server, check, gigabyte_liar, payloads):
    zips = [shutil.copy(gigabyte_liar, payloads / f"liar{k}.zip") for k in range(12)]
    with check("a dozen lying zips in one request"):
        error = volume_error(Page(server.url).volume(list(map(Path, zips))))
    assert_one_line(error, "liar0.zip")


def test_a_dozen_zips_under_the_entry_cap_meet_the_request_budget(server, check, payloads):
    # Each entry is honest and under the 50 MB cap of one file; together they pass the 200 MB of one request.
    zips = []
    for k in range(12):
        with zipfile.ZipFile(payloads / f"part{k}.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            archive.writestr(f"P_{k}.png", bytes(49 * 2**20))
        zips.append(payloads / f"part{k}.zip")
    with check("a dozen zips of one 49 MB entry each in one request"):
        error = volume_error(Page(server.url).volume(zips))
    assert error == "the upload holds more than 200 MB in all"


def test_a_long_name_inside_a_zip(server, check, payloads):
    path = png_zip(payloads / "long.zip", ["x" * 300 + ".png"], np.zeros((8, 8, 3), np.uint8))
    with check("a 304-character name inside a zip"):
        error = volume_error(Page(server.url).volume([path]))
    assert error == "long.zip: an entry's name is 304 characters long; at most 245 are accepted"


def test_path_traversal_names_inside_a_zip_stay_names(server, check, payloads):
    tag = uuid.uuid4().hex[:8]
    names = [f"../../../../tmp/escape_{tag}.png", f"/tmp/absolute_{tag}.png", f"..\\..\\windows_{tag}.png"]
    path = png_zip(payloads / "traversal.zip", names, np.full((64, 64, 3), 40, np.uint8))
    with check("path traversal names inside a zip"):
        answer = Page(server.url).volume([path])
    assert answer["success"] and not answer["logs"], answer
    assert re.search(r"\b3 slices\b", answer["outputs"]["volume-summary"]), answer["outputs"]["volume-summary"]
    shown = json.dumps(answer["outputs"])  # the slices are known by their base names only
    assert "../" not in shown and "..\\\\" not in shown and f"tmp/escape_{tag}" not in shown, shown[:2000]
    for escaped in (Path(f"/tmp/escape_{tag}.png"), Path(f"/tmp/absolute_{tag}.png"), app.ROOT.parent / "windows.png"):
        assert not escaped.exists()
    assert not list(Path("/").glob(f"*_{tag}*")) and not list(app.ROOT.parent.glob(f"*_{tag}*"))


# ---------------------------------------------------------------------------------------------------------------
# Images


def wide_image(kind: str) -> bytes:
    """A 4096 x 4096 slice at a wide bit depth, as its file's bytes."""
    image = blocky_slice()
    if kind == "gray16.png":
        return cv2.imencode(".png", image[..., 1].astype(np.uint16) * 257)[1].tobytes()
    if kind == "rgb16.png":
        return cv2.imencode(".png", image[..., ::-1].astype(np.uint16) * 257)[1].tobytes()
    if kind == "rgba16.png":
        alpha = np.full(image.shape[:2] + (1,), 65535, np.uint16)
        return cv2.imencode(".png", np.dstack([image[..., ::-1].astype(np.uint16) * 257, alpha]))[1].tobytes()
    if kind == "float32.tif":
        return cv2.imencode(".tif", image[..., ::-1].astype(np.float32) / 255, [cv2.IMWRITE_TIFF_COMPRESSION, 8])[
            1
        ].tobytes()
    if kind == "float64_gray.tif":
        pixels = image[..., 1].astype(np.float64) / 255
        return tiff_bytes(SIDE, SIDE, 1, 64, 3, zlib.compress(pixels.tobytes(), 6))
    assert kind == "float64_rgb.tif"
    pixels = image.astype(np.float64) / 255
    return tiff_bytes(SIDE, SIDE, 3, 64, 3, zlib.compress(pixels.tobytes(), 6))


WIDE = ["gray16.png", "rgb16.png", "rgba16.png", "float32.tif", "float64_gray.tif"]


@pytest.mark.parametrize("kind", WIDE)
def test_a_4096_pixel_image_at_a_wide_bit_depth(client, check, payloads, kind):
    from gradio_client import handle_file

    path = payloads / f"wide_{kind}"
    path.write_bytes(wide_image(kind))
    assert path.stat().st_size < 50 * 2**20
    with check(f"4096x4096 {kind} through /segment"):
        _, mask_path, summary = client.predict(handle_file(str(path)), 0.5, api_name="/segment")
    assert (summary["width"], summary["height"]) == (SIDE, SIDE) and summary["tumor_pixels"] > 0
    assert Image.open(mask_path).size == (SIDE, SIDE)


TOO_LARGE = "too large to decode safely|at most 4096x4096"


@pytest.fixture(scope="module")
def odd_files(payloads) -> dict[str, tuple[Path, str]]:
    """Files the reader must refuse, and what their one line says (made once for the module)."""
    folder = payloads
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"
    files = {
        "eps named .png": ("eps.png", eps, "not an image this app reads"),
        "PNG bomb (20000 x 20000 zero pixels in 400 KB)": ("bomb.png", png_bomb(20000), TOO_LARGE),
        "PNG declaring 100000 x 100000": ("declared.png", png_bytes(100000, 100000, zlib.compress(b"")), TOO_LARGE),
        "4096 x 4096 float64 colour TIFF (800 MB through OpenCV)": (
            "float64_rgb.tif",
            wide_image("float64_rgb.tif"),
            "4096x4096 pixels of 3 x 64-bit samples take more than 192 MB to decode",
        ),
        "float64 TIFF declaring 100000 x 100000": (
            "declared.tif",
            tiff_bytes(100000, 100000, 3, 64, 3, zlib.compress(bytes(4096))),
            TOO_LARGE,
        ),
    }
    out = {}
    for case, (name, data, message) in files.items():
        (folder / name).write_bytes(data)
        out[case] = (folder / name, message)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "eps named .png",
        "PNG bomb (20000 x 20000 zero pixels in 400 KB)",
        "PNG declaring 100000 x 100000",
        "float64 TIFF declaring 100000 x 100000",
        "4096 x 4096 float64 colour TIFF (800 MB through OpenCV)",
    ],
)
def test_an_odd_or_oversized_image_is_one_line(server, client, check, odd_files, case):
    path, message = odd_files[case]
    with check(case):
        through_api = segment_error(client, path)
        through_page = volume_error(Page(server.url).volume([path]))
    for error in (through_api, through_page):
        assert_one_line(error, path.name)
        assert re.search(message, error), error


# ---------------------------------------------------------------------------------------------------------------
# What sessions keep


def test_sessions_with_large_volumes_and_simultaneous_redraws(server, check, payloads):
    # A small zip of the largest volume accepted (two 4096 x 4096 slices) per session; four sessions, then four
    # redraws at once.
    volume = png_zip(payloads / "big_slices.zip", [f"P_{k}.png" for k in range(2)], blocky_slice())
    assert volume.stat().st_size < 8 * 2**20
    pages = [Page(server.url) for _ in range(4)]
    with check("four sessions of two 4096x4096 slices, then four redraws at once"):
        for page in pages:
            assert page.volume([volume])["success"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda page: page.redraw(0.3), pages))
    assert all(a["success"] and not a["error"] for a in answers), answers
    assert answers[-1]["outputs"]["volume-summary"], answers[-1]  # the last session used still redraws
    # the older ones were dropped to keep what sessions hold under uploads.MAX_KEPT_MB
    assert f"MB kept by idle sessions (over {uploads.MAX_KEPT_MB} MB)" in server.log_path.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Load


@pytest.mark.slow
def test_sixteen_clients_at_once_against_a_small_queue(server, client, check, normal_slice, tmp_path):
    from gradio_client import Client, handle_file

    clients = [
        Client(server.url, verbose=False, ssl_verify=False, download_files=str(tmp_path / f"c{i}")) for i in range(16)
    ]

    def ask(c):
        try:
            return "ok", c.predict(handle_file(str(normal_slice)), 0.5, api_name="/segment")[2]
        except Exception as error:  # noqa: BLE001 - what each client sees is the test's subject
            return "refused", f"{type(error).__name__}: {error}"

    with check("16 clients at once, queue of 4"), ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, clients))
    served = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind == "refused"]
    log.warning("load: %d served, %d refused: %s", len(served), len(refused), sorted(set(refused)))
    assert served and all(s["tumor_pixels"] > 0 for s in served)
    assert all(re.fullmatch(r"\w+: Queue is full! Please try again\.", r) for r in refused), refused


def test_the_server_log_has_no_traceback_from_the_app(server):
    print("\npeak resident memory of the app process, MB:")
    for case, peak in MEASURED.items():
        print(f"  {peak:6.0f}  {case}")
    # None at all, the app's or Gradio's: /segment's gr.File has no file_types, so a zip sent there reaches the
    # reader, whose refusal is one line in the log.
    tracebacks = server.log_path.read_text().split("Traceback (most recent call last):")[1:]
    assert not tracebacks, tracebacks[0][:4000]
