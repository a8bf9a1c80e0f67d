"""App speed: /segment request latency through gradio_client, 1 and 8 concurrent clients.

    python -m benchmarks.app [--model models/brain-mri-unet] [--clients 8] [--quick]

Starts ``app.py --model DIR --host 127.0.0.1 --port FREE`` in a subprocess, calls the
``/segment`` API (an image file in; overlay, mask and summary out) from one client in turn
(with gradio_client's defaults, then with ``ssl_verify=False``), then from 8 at once, and
reports p50/p95 latency as a client sees it (upload, queue, inference, download), failed
requests, and the app's peak memory (VmHWM of its process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2

from benchmarks.common import (
    DEFAULT_MODEL_DIR,
    ROOT,
    machine,
    parse,
    parser,
    peak_rss_mb,
    sample_slice,
    summarize_times,
    table,
    write_json,
)

if TYPE_CHECKING:  # imported where used: the benchmark's other parts need no gradio_client
    from gradio_client import Client

log = logging.getLogger("benchmarks.app")

FULL = {"warmup": 3, "sequential": 30, "per_client": 5, "clients": 8}
QUICK = {"warmup": 1, "sequential": 3, "per_client": 1, "clients": 8}


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A free port held bound (not listening) while the app starts: no other process can take it meanwhile, and the
    app's server, binding with SO_REUSEADDR as uvicorn does, still can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def model_folder(model: str | None, scratch: Path) -> tuple[Path, str]:
    """The folder to serve: --model, else the shipped model, else a fresh UNet() saved to scratch."""
    path = Path(model) if model else DEFAULT_MODEL_DIR
    if (path / "model.safetensors").is_file():
        return path, f"model {path}"
    if model:
        raise SystemExit(f"error: no model.safetensors in {path}")
    from unet.model import UNet

    log.warning("no trained model at %s: serving a freshly initialised UNet() (same speed, meaningless masks)", path)
    UNet().save_pretrained(scratch / "fresh-unet")
    return scratch / "fresh-unet", f"fresh UNet() (default config; no trained model at {path})"


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with code {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"app.py did not answer at {url} within {timeout_s:.0f} s")


def timed_requests(
    client: Client,
    image_path: Path,
    count: int,
    latencies: list,
    errors: list,
    barrier: threading.Barrier | None = None,
) -> None:
    from gradio_client import handle_file

    if barrier is not None:
        barrier.wait()
    for _ in range(count):
        start = time.perf_counter()
        try:
            overlay, mask, summary = client.predict(handle_file(str(image_path)), api_name="/segment")
            if not isinstance(summary, dict) or "tumor_pixels" not in summary:
                raise ValueError(f"unexpected summary: {summary!r:.200}")
            latencies.append(time.perf_counter() - start)
        except Exception as error:  # counted, not raised: failures are a result here
            errors.append(f"{type(error).__name__}: {first_line(error)[:200]}")


def run_benchmark(app_path: Path, model: str | None, quick: bool, clients: int, threads: int | None) -> dict:
    settings = dict(QUICK if quick else FULL, clients=clients)
    result = {
        "benchmark": "app",
        "quick": quick,
        "machine": machine(),
        "settings": settings,
        "rows": [],
        "peak_rss_mb": None,
        "startup_s": None,
        "skipped": None,
    }
    if not app_path.is_file():
        result["skipped"] = f"{app_path} not found: nothing to serve"
        log.warning(result["skipped"])
        return result
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder, result["model"] = model_folder(model, scratch)
        image, source = sample_slice(256)
        image_path = scratch / "slice.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        result["input"] = f"{source}, {image.shape[1]}x{image.shape[0]} PNG"
        log_path = scratch / "app.log"
        try:
            with running_app(app_path, folder, threads, log_path) as (process, url, startup_s):
                result["startup_s"] = round(startup_s, 1)
                log.info("app ready at %s after %.1f s", url, startup_s)
                result["rows"] = measure(url, image_path, settings, scratch / "downloads")
                result["peak_rss_mb"] = peak_rss_mb(process.pid)
        except Exception as error:  # noqa: BLE001 - reported in the result, with the app's log
            result["skipped"] = f"failed: {type(error).__name__}: {first_line(error)[:300]}"
            log.warning("%s\napp log:\n%s", result["skipped"], log_path.read_text()[-3000:])
    return result


@contextlib.contextmanager
def running_app(
    app_path: Path, folder: Path, threads: int | None, log_path: Path
) -> Iterator[tuple[subprocess.Popen, str, float]]:
    """``app.py --model FOLDER`` on a free local port: (its process, its URL, seconds until it answered)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with held_port() as port, open(log_path, "w") as log_file:
        url = f"http://127.0.0.1:{port}/"
        process = subprocess.Popen(
            [sys.executable, str(app_path), "--model", str(folder), "--host", "127.0.0.1", "--port", str(port)],
            cwd=app_path.parent,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            startup_s = wait_ready(url, process, timeout_s=180)
        except BaseException:
            stop(process)
            raise
    try:
        yield process, url, startup_s
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(url: str, image_path: Path, settings: dict, downloads: Path) -> list[dict]:
    """The rows: one client in turn (gradio_client's defaults, then ssl_verify=False), then N clients at once."""
    from gradio_client import Client

    clients = settings["clients"]
    # One download folder per client: clients sharing one would overwrite each other's files.
    pool = [
        Client(url, verbose=False, download_files=str(downloads / str(i)), analytics_enabled=False)
        for i in range(max(1, clients))
    ]
    # gradio_client's defaults load the CA bundle again for every HTTP call it makes (5 a request, ~25 ms each
    # here); on an http:// URL there is no certificate to check, so a local client can skip that with
    # ssl_verify=False. Both are timed.
    plain_http = Client(
        url, verbose=False, download_files=str(downloads / "plain-http"), analytics_enabled=False, ssl_verify=False
    )
    rows = []
    for client, setting in ((pool[0], "defaults"), (plain_http, "ssl_verify=False")):
        timed_requests(client, image_path, settings["warmup"], [], [])
        log.info("1 client (%s), %d requests in turn", setting, settings["sequential"])
        latencies, errors = [], []
        start = time.perf_counter()
        timed_requests(client, image_path, settings["sequential"], latencies, errors)
        rows.append(row(1, settings["sequential"], latencies, errors, time.perf_counter() - start, setting))

    log.info("%d clients at once, %d requests each", clients, settings["per_client"])
    latencies, errors = [], []
    barrier = threading.Barrier(clients)
    workers = [
        threading.Thread(
            target=timed_requests, args=(c, image_path, settings["per_client"], latencies, errors, barrier)
        )
        for c in pool[:clients]
    ]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rows.append(
        row(clients, clients * settings["per_client"], latencies, errors, time.perf_counter() - start, "defaults")
    )
    return rows


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def row(clients: int, requests: int, latencies: list[float], errors: list[str], wall_s: float, setting: str) -> dict:
    stats = summarize_times(latencies) if latencies else {}
    return {
        "clients": clients,
        "client_setting": setting,
        "requests": requests,
        "ok": len(latencies),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "p50_ms": stats.get("median_ms"),
        "p95_ms": stats.get("p95_ms"),
        "mean_ms": stats.get("mean_ms"),
        "requests_per_s": round(len(latencies) / wall_s, 2) if wall_s else None,
    }


def markdown(result: dict) -> str:
    if result.get("skipped"):
        return f"App: skipped ({result['skipped']})."
    columns = [
        ("clients", "concurrent clients"),
        ("client_setting", "gradio_client"),
        ("requests", "requests"),
        ("failed", "failed"),
        ("p50_ms", "p50 (ms)"),
        ("p95_ms", "p95 (ms)"),
        ("requests_per_s", "requests/s"),
    ]
    return "\n".join(
        [
            f"App: `/segment` through gradio_client ({result['input']}; {result['model']}), "
            "latency as the client sees it: upload, queue, inference, download.",
            "",
            table(result["rows"], columns),
            "",
            f"- Peak memory of the app process: {result['peak_rss_mb']} MB; "
            f"start-up to first answer {result['startup_s']} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = parser("app", __doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help="model folder to serve (default: models/brain-mri-unet, else a fresh UNet())"
    )
    p.add_argument("--app", type=Path, default=ROOT / "app.py", help="the app script (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the second run (default: %(default)s)")
    args = parse(p, argv)
    result = run_benchmark(args.app, args.model, args.quick, args.clients, args.threads)
    print(markdown(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
