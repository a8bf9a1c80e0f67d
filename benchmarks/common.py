"""Shared helpers: timing, peak memory, the machine's description, tables and JSON."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from unet.segmenter import Segmenter

log = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL_DIR = ROOT / "models" / "brain-mri-unet"
DEFAULT_DATA_DIR = Path(os.environ.get("LGG_DATA_DIR", ROOT.parent / "shared" / "data" / "lgg_subset"))


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flags every benchmark shares: --quick, --out, --verbose."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument(
        "--quick", action="store_true", help="toy sizes and a few iterations: checks the code, not the speed"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON result (default: benchmarks/results/{name}.json, or results/quick/ with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per core)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(benchmark_name=name)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, fill in the default --out and set up logging."""
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR) / f"{args.benchmark_name}.json"
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        log.warning("load average %.1f before the start: other work competes for the CPU, timings will be low", load)
    return args


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "httpcore", "gradio_client"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


def summarize_times(seconds: list[float]) -> dict:
    """Median, p95, mean and min of per-call times, in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {
        "runs": len(ms),
        "median_ms": round(float(np.median(ms)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "min_ms": round(float(ms.min()), 2),
    }


def measure(
    fn: Callable[[], object], warmup: int = 1, min_runs: int = 3, max_runs: int = 1000, budget_s: float = 5.0
) -> dict:
    """Time ``fn`` after ``warmup`` calls: at least ``min_runs`` calls, more until ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return summarize_times(times)


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A memory field of /proc/PID/status (VmHWM: peak resident, VmRSS: resident now) in MB;
    None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a process in MB."""
    return proc_status_mb("VmHWM", pid)


def rss_mb(pid: int | str = "self") -> float | None:
    """Current resident memory (VmRSS) in MB."""
    return proc_status_mb("VmRSS", pid)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide conv speed (AVX2, AVX-512, bf16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine() -> dict:
    from unet.device import cpu_supports_bf16

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX'}), "
        f"torch {m['torch']}, Python {m['python']}, {m['date']}"
    )


def load_benchmark_model(model_dir: str | Path | None) -> tuple[Segmenter, str, Path | None]:
    """The segmenter to time: a trained folder if there is one, else a fresh ``UNet()`` with the default processing.

    Returns (segmenter, a description, the folder or None). Speed does not depend on the weights, so a fresh model
    of the default configuration times the same network.
    """
    from unet.model import UNet
    from unet.segmenter import Segmenter

    path = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if (path / "model.safetensors").is_file():
        segmenter = Segmenter.from_pretrained(path)
        net = segmenter.network
        return segmenter, f"trained model {path.name} (width {net.width}, depth {net.depth}, {net.upsampling})", path
    log.warning("no trained model at %s: timing a freshly initialised UNet() of the default configuration", path)
    segmenter = Segmenter(UNet())
    net = segmenter.network
    return segmenter, f"fresh UNet() (width {net.width}, depth {net.depth}; no trained model at {path})", None


def flops_per_image(model: nn.Module, size: int, channels: int = 3) -> int:
    """Forward FLOPs (2 per multiply-add; convs and matmuls) for one ``size`` x ``size`` image.

    Counted on a meta-device copy, so nothing is computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, channels, size, size, device="meta"))
    return int(counter.get_total_flops())


def sample_slice(size: int = 256, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, str]:
    """One RGB uint8 brain slice with tumor: a real one where the LGG data is present, else a phantom."""
    from unet.synthetic import phantom_slice

    folder = data_dir / "kaggle_3m" if (data_dir / "kaggle_3m").is_dir() else data_dir
    if folder.is_dir():
        from unet.reader import read_image, read_mask

        for mask_path in sorted(folder.glob("*/*_mask.tif")):
            if read_mask(mask_path).sum() > 500:
                image = read_image(mask_path.with_name(mask_path.name.replace("_mask", "")))
                return image, f"real slice {mask_path.parent.name}/{mask_path.name.replace('_mask', '')}"
    image, _ = phantom_slice(np.random.default_rng(0), size, 1.0, tumor=True)
    return image, "synthetic phantom slice"


def fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 1) -> str:
    """A markdown table of ``rows`` (dicts) with (key, header) columns; readable in a terminal too."""
    cells = [[fmt(row.get(key), digits) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.info("wrote %s", path)
