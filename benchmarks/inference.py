"""Inference speed: the shipped model in each execution mode against two fp32 baselines.

    python -m benchmarks.inference [--model models/brain-mri-unet] [--no-compile] [--quick]

Per model and mode: latency of one slice (median, p95 after warm-up), throughput at batch 8
and 32, speed-up over the classic U-Net in fp32 eager, FLOPs per slice and the share of the
machine's measured matmul throughput (fp32 or bf16, timed in the same run) that this is.
Also the end-to-end latency of `Segmenter.segment_slice` on one uint8 RGB slice.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.baselines import BudaUNet, classic_unet
from benchmarks.common import (
    flops_per_image,
    fmt,
    load_benchmark_model,
    machine,
    measure,
    parse,
    parser,
    sample_slice,
    table,
    write_json,
)
from unet.card import recorded_cross_validation
from unet.device import cpu_supports_bf16
from unet.evaluation import SPLIT_NAMES, held_out_split, recorded_metrics

log = logging.getLogger("benchmarks.inference")

MODES = ("fp32 eager", "fp32 channels_last", "bf16 autocast + channels_last", "torch.compile")

FULL = {
    "size": 256,
    "batches": (8, 32),
    "matmul_n": 2048,
    "latency": {"warmup": 3, "min_runs": 10, "budget_s": 6.0},
    "throughput": {"warmup": 0, "min_runs": 1, "budget_s": 4.0},
    "end_to_end": {"warmup": 3, "min_runs": 10, "budget_s": 5.0},
}
QUICK = {
    "size": 32,
    "batches": (8, 32),
    "matmul_n": 256,
    "latency": {"warmup": 1, "min_runs": 2, "budget_s": 0.0},
    "throughput": {"warmup": 0, "min_runs": 1, "budget_s": 0.0},
    "end_to_end": {"warmup": 1, "min_runs": 2, "budget_s": 0.0},
}


def held_out_scores(model_dir: Path) -> dict | None:
    """The model's Dice on patients it did not learn from, slice by slice as the timed path segments: its recipe's
    pooled cross-validation where it carries one (the shipped model), else its test (or validation) split."""
    recorded = recorded_metrics(model_dir)
    if not recorded:
        return None
    cross_validation = recorded_cross_validation(model_dir)
    if cross_validation:
        source, scores = "its recipe's cross-validation", cross_validation.get("per_slice")
    else:
        split = held_out_split(recorded)
        source, scores = f"its {SPLIT_NAMES[split]} patients", recorded.get(f"{split}_per_slice") or recorded.get(split)
    scores = scores or {}
    return {
        "source": source,
        **{k: scores.get(k) for k in ("patient_dice_mean", "tumor_slice_dice_mean", "healthy_fp_rate")},
    }


def matmul_gflops(n: int, dtype: torch.dtype, settings: dict) -> float:
    """Throughput of an n x n x n ``torch.matmul``: the practical ceiling for convs in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    stats = measure(
        lambda: torch.matmul(a, b), warmup=2, min_runs=max(3, settings["min_runs"]), budget_s=settings["budget_s"] / 2
    )
    return round(2 * n**3 / (stats["median_ms"] / 1000) / 1e9, 1)


def forward_fn(model: nn.Module, mode: str, bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of ``model`` set up for ``mode``, as a function of a contiguous fp32 batch.

    torch.compile runs in the best eager setting (channels_last, bf16 where supported), with
    inductor's weight freezing, which CPU inference needs to prepack oneDNN weights.
    """
    channels_last = mode != "fp32 eager"
    autocast = mode.startswith("bf16") or (mode == "torch.compile" and bf16)
    net = copy.deepcopy(model).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if mode == "torch.compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        net = torch.compile(net, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return net(x)

    return run


def time_model(
    run: Callable[[torch.Tensor], torch.Tensor], size: int, batches: tuple[int, ...], settings: dict
) -> dict:
    """Latency at batch 1 and images/s at each batch; the first call of each shape timed apart."""
    row: dict = {}
    first_calls = {}
    for batch in (1, *batches):
        x = torch.randn(batch, 3, size, size)
        start = time.perf_counter()
        run(x)
        first_calls[str(batch)] = round(time.perf_counter() - start, 3)
        if batch == 1:
            stats = measure(lambda x=x: run(x), **settings["latency"])
            row.update(median_ms=stats["median_ms"], p95_ms=stats["p95_ms"], runs=stats["runs"])
        else:
            stats = measure(lambda x=x: run(x), **settings["throughput"])
            row[f"images_per_s_b{batch}"] = round(batch / (stats["median_ms"] / 1000), 2)
        log.debug("batch %d: first call %.3f s, %s", batch, first_calls[str(batch)], stats)
    row["first_call_s"] = first_calls
    return row


def run_benchmark(model_dir: str | None, quick: bool, compile_: bool | None) -> dict:
    settings = QUICK if quick else FULL
    size, batches = settings["size"], settings["batches"]
    bf16 = cpu_supports_bf16()
    compile_ = (not quick) if compile_ is None else compile_
    segmenter, description, path = load_benchmark_model(model_dir)
    shipped = segmenter.network
    notes = [] if path else ["no trained model: the speed is that of the architecture, and there is no Dice to report"]

    log.info("matmul throughput (n=%d)", settings["matmul_n"])
    peak = {
        "fp32": matmul_gflops(settings["matmul_n"], torch.float32, settings["latency"]),
        "bf16": matmul_gflops(settings["matmul_n"], torch.bfloat16, settings["latency"]) if bf16 else None,
    }
    log.info("matmul: fp32 %.0f GFLOP/s, bf16 %s GFLOP/s", peak["fp32"], peak["bf16"])

    candidates: list[tuple[str, str, nn.Module, str]] = [
        ("classic U-Net (w64, 3 pools, bilinear)", "classic", classic_unet().eval(), "fp32 eager"),
        ("brain-segmentation-pytorch (w32, 4 pools)", "buda", BudaUNet().eval(), "fp32 eager"),
    ]
    for mode in MODES:
        candidates.append(
            (f"shipped (w{shipped.width}, {shipped.depth} pools, {shipped.upsampling})", "shipped", shipped, mode)
        )

    rows = []
    for label, key, model, mode in candidates:
        precision = "bf16" if (mode.startswith("bf16") or (mode == "torch.compile" and bf16)) else "fp32"
        row = {
            "model": label,
            "key": key,
            "mode": mode,
            "precision": precision,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "gflop_per_image": round(flops_per_image(model, size) / 1e9, 3),
        }
        if mode.startswith("bf16") and not bf16:
            row["skipped"] = "this CPU has no bf16 units (AVX512-BF16 or AMX)"
        elif mode == "torch.compile" and not compile_:
            row["skipped"] = "torch.compile not run (--quick or --no-compile)"
        else:
            log.info("%s, %s", label, mode)
            try:
                row.update(time_model(forward_fn(model, mode, bf16), size, batches, settings))
            except Exception as error:  # compile needs a C++ toolchain; report, don't stop the suite
                log.warning("%s %s failed: %s", label, mode, error)
                row["skipped"] = (
                    f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                )
        if mode == "torch.compile" and "first_call_s" in row:  # one compilation per batch shape
            row["compile_s"] = round(sum(row["first_call_s"].values()), 1)
        # The mode Segmenter (app, evaluate) runs in: channels_last, bf16 where supported.
        row["serving"] = key == "shipped" and mode == (
            "bf16 autocast + channels_last" if bf16 else "fp32 channels_last"
        )
        rows.append(row)

    reference = next(r for r in rows if r["key"] == "classic")
    for row in rows:
        if "median_ms" not in row or "median_ms" not in reference:
            continue
        row["speedup_latency"] = round(reference["median_ms"] / row["median_ms"], 2)
        for batch in batches:
            row[f"speedup_b{batch}"] = round(row[f"images_per_s_b{batch}"] / reference[f"images_per_s_b{batch}"], 2)
        best = max(row[f"images_per_s_b{b}"] for b in batches)
        row["achieved_gflops"] = round(row["gflop_per_image"] * best, 1)
        row["peak_fraction"] = (
            round(row["achieved_gflops"] / peak[row["precision"]], 3) if peak[row["precision"]] else None
        )

    log.info("end-to-end segment()")
    image, image_source = sample_slice(256)
    served = segmenter.with_postprocessing()  # its own batch size and precision, the network shared
    served.batch_size = 1
    e2e = measure(lambda: served.segment_slice(image), **settings["end_to_end"])
    e2e.update(
        input=f"{image_source}, {image.shape[1]}x{image.shape[0]} uint8 RGB",
        precision="bf16" if bf16 else "fp32",
        model_input_size=served.preprocessing.image_size,
    )

    metrics = held_out_scores(path) if path else None
    return {
        "benchmark": "inference",
        "quick": quick,
        "machine": machine(),
        "image_size": size,
        "settings": {k: v for k, v in settings.items()},
        "model": {"description": description, "dir": str(path) if path else None, "held_out_metrics": metrics},
        "matmul_gflops": peak,
        "rows": rows,
        "end_to_end": e2e,
        "notes": notes,
    }


def markdown(result: dict) -> str:
    batches = result["settings"]["batches"]
    columns = [
        ("model", "model"),
        ("mode", "mode"),
        ("params_m", "params (M)"),
        ("gflop_per_image", "GFLOP/slice"),
        ("median_ms", "latency median (ms)"),
        ("p95_ms", "p95 (ms)"),
    ]
    columns += [(f"images_per_s_b{b}", f"slices/s @{b}") for b in batches]
    columns += [
        ("speedup_latency", "speed-up (latency)"),
        (f"speedup_b{batches[-1]}", f"speed-up @{batches[-1]}"),
        ("peak_fraction_pct", "% of matmul peak"),
        ("note", "note"),
    ]
    rows = []
    for r in result["rows"]:
        rows.append(
            {
                **r,
                "peak_fraction_pct": None if r.get("peak_fraction") is None else round(100 * r["peak_fraction"], 1),
                "speedup_latency": None if "speedup_latency" not in r else f"{r['speedup_latency']:.2f}x",
                f"speedup_b{batches[-1]}": None
                if f"speedup_b{batches[-1]}" not in r
                else f"{r[f'speedup_b{batches[-1]}']:.2f}x",
                "note": r.get("skipped")
                or ("the serving path" if r.get("serving") else "")
                + (f"compile {r['compile_s']:.0f} s ({len(r['first_call_s'])} shapes)" if "compile_s" in r else ""),
            }
        )
    peak = result["matmul_gflops"]
    e2e = result["end_to_end"]
    lines = [
        f"Inference, one {result['image_size']}x{result['image_size']} slice; speed-ups against the classic "
        "U-Net in fp32 eager, timed in the same run.",
        "",
        table(rows, columns, digits=1),
        "",
        f"- Matmul ceiling measured in the same run: fp32 {fmt(peak['fp32'], 0)} GFLOP/s, "
        f"bf16 {fmt(peak['bf16'], 0)} GFLOP/s.",
        f"- End to end (`Segmenter.segment_slice`: preprocessing + {e2e['precision']} net + post-processing, "
        f"{e2e['input']}): "
        f"median {e2e['median_ms']:.1f} ms, p95 {e2e['p95_ms']:.1f} ms.",
        f"- Model: {result['model']['description']}.",
    ]
    metrics = result["model"].get("held_out_metrics")
    if metrics:
        lines.append(
            f"- Dice of {metrics['source']}, slice by slice as this path segments: "
            f"patient {fmt(metrics.get('patient_dice_mean'), 3)}, "
            f"tumor-slice {fmt(metrics.get('tumor_slice_dice_mean'), 3)}."
        )
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser("inference", __doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help="trained model folder (default: models/brain-mri-unet, else a fresh UNet())"
    )
    p.add_argument(
        "--compile",
        dest="compile_",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile too (default: yes, except with --quick)",
    )
    args = parse(p, argv)
    torch.manual_seed(0)
    result = run_benchmark(args.model, args.quick, args.compile_)
    print(markdown(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
