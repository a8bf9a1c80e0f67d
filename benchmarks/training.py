"""Training speed: our training step against a tutorial-style loop, on the same models and data.

    python -m benchmarks.training [--model models/brain-mri-unet] [--quick]

Four configurations, each in its own process so its peak memory (VmHWM) is its own:
{our loop, tutorial loop} x {the shipped architecture, the classic U-Net}, at batch 8 of
256x256 slices (synthetic phantoms: the loader is timed by benchmarks.data).

- our loop: train.py's own ``train_step`` (channels_last, bf16 autocast where the CPU has bf16
  units, logits into BCEDiceLoss, AdamW, one loss.item()) and the LR schedule step.
- tutorial loop: fp32, the model's output through a sigmoid into nn.BCELoss, Adam, and the
  Dice metric computed on CPU numpy copies of prediction and target every step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from benchmarks.common import (
    ROOT,
    load_benchmark_model,
    machine,
    measure,
    parse,
    parser,
    peak_rss_mb,
    rss_mb,
    table,
    write_json,
)

log = logging.getLogger("benchmarks.training")

FULL = {"size": 256, "batch": 8, "warmup": 1, "min_runs": 2, "budget_s": 10.0}
QUICK = {"size": 32, "batch": 2, "warmup": 1, "min_runs": 1, "budget_s": 0.0}
CLASSIC = {"width": 64, "depth": 3, "upsampling": "bilinear"}


def synthetic_batches(batch: int, size: int, count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of phantom slices, standardised with fixed channel statistics (the cost is the same
    as per-slice standardisation's, which happens in the loader, outside the timed step)."""
    from unet.processing import LGG_MEAN, LGG_STD, normalize
    from unet.synthetic import phantom_slice

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        pairs = [phantom_slice(rng, size, 1.0, tumor=bool(i % 2 == 0)) for i in range(batch)]
        images = torch.stack([normalize(image, LGG_MEAN, LGG_STD, "dataset") for image, _ in pairs])
        masks = torch.stack([torch.from_numpy((mask > 0).astype(np.float32))[None] for _, mask in pairs])
        batches.append((images, masks))
    return batches


CPU = torch.device("cpu")


def our_step(model: nn.Module, batches: list, device: torch.device = CPU) -> Callable[[], float]:
    """The trainer's set-up (unet.training), then its ``train_step`` and the scheduler step, as in its epoch loop."""
    from unet.device import cpu_supports_bf16
    from unet.losses import BCEDiceLoss
    from unet.training import lr_factor, train_step

    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 100, 10_000))
    loss_fn = BCEDiceLoss()
    precision = "auto"
    if device.type == "cpu" and not cpu_supports_bf16():
        precision = "fp32"
    scaler = torch.amp.GradScaler(
        device.type, enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported() and precision != "fp32"
    )
    source = itertools.cycle(batches)

    def step() -> float:
        images, masks = next(source)
        loss = train_step(model, images, masks, loss_fn, optimizer, scaler, precision)
        scheduler.step()
        return loss

    return step


def numpy_dice(pred: np.ndarray, target: np.ndarray, smooth: float = 1.0) -> float:
    pred, target = pred.astype(bool), target.astype(bool)
    return float((2 * (pred & target).sum() + smooth) / (pred.sum() + target.sum() + smooth))


def tutorial_step(model: nn.Module, batches: list) -> Callable[[], float]:
    """The loop of the classic tutorials: fp32, sigmoid + BCELoss, metric on CPU numpy copies."""
    net = nn.Sequential(model, nn.Sigmoid()).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    criterion = nn.BCELoss()
    source = itertools.cycle(batches)
    history: list[tuple[float, float]] = []

    def step() -> float:
        images, masks = next(source)
        optimizer.zero_grad()
        outputs = net(images)
        loss = criterion(outputs, masks)
        loss.backward()
        optimizer.step()
        pred = outputs.detach().cpu().numpy()
        target = masks.cpu().numpy()
        dice = np.mean([numpy_dice(p > 0.5, t > 0.5) for p, t in zip(pred, target)])
        history.append((loss.item(), float(dice)))
        return history[-1][0]

    return step


def reset_peak_rss() -> None:
    """Start a new VmHWM peak (Linux: "5" into /proc/self/clear_refs); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(config: dict) -> dict:
    """One configuration, in this process: build, warm up, time; report images/s and peak RSS."""
    from unet.model import UNet

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    reset_peak_rss()
    model = UNet(**config["arch"])
    batches = synthetic_batches(config["batch"], config["size"])
    rss_before = rss_mb()
    step = our_step(model, batches) if config["loop"] == "ours" else tutorial_step(model, batches)
    stats = measure(step, warmup=config["warmup"], min_runs=config["min_runs"], budget_s=config["budget_s"])
    return {
        "step_ms": stats["median_ms"],
        "step_p95_ms": stats["p95_ms"],
        "steps": stats["runs"],
        "images_per_s": round(config["batch"] / (stats["median_ms"] / 1000), 2),
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_configs(configs: list[dict]) -> list[dict]:
    """``worker`` for each configuration in one fresh interpreter, so peak memory is theirs alone.

    The full run gives every configuration its own process; --quick shares one to save start-ups.
    """
    command = [sys.executable, "-m", "benchmarks.training", "--worker", json.dumps(configs)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("configurations %s failed:\n%s", configs, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else ""
        return [{"skipped": f"failed (exit {done.returncode}): {last}"} for _ in configs]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(model_dir: str | None, quick: bool, threads: int | None) -> dict:
    from unet.device import cpu_supports_bf16

    settings = QUICK if quick else FULL
    segmenter, description, _ = load_benchmark_model(model_dir)
    shipped = segmenter.network
    models = {
        "shipped": (
            {"width": shipped.width, "depth": shipped.depth, "upsampling": shipped.upsampling},
            f"shipped (w{shipped.width}, {shipped.depth} pools, {shipped.upsampling})",
        ),
        "classic": (CLASSIC, "classic U-Net (w64, 3 pools, bilinear)"),
    }
    loops = {
        "ours": f"ours (unet.training: channels_last, {'bf16' if cpu_supports_bf16() else 'fp32'}, BCE+Dice on logits, "
        "AdamW)",
        "tutorial": "tutorial (fp32, sigmoid + BCELoss, Adam, Dice on CPU numpy every step)",
    }
    rows, configs = [], []
    for model_key, (arch, model_label) in models.items():
        for loop_key, loop_label in loops.items():
            rows.append({"model": model_label, "model_key": model_key, "loop": loop_label, "loop_key": loop_key})
            configs.append(
                {
                    "loop": loop_key,
                    "arch": arch,
                    "threads": threads,
                    **{k: settings[k] for k in ("size", "batch", "warmup", "min_runs", "budget_s")},
                }
            )
    if quick:
        results = run_configs(configs)
    else:
        results = []
        for row, config in zip(rows, configs):
            log.info("%s model, %s loop", row["model_key"], row["loop_key"])
            results += run_configs([config])
    for row, measured in zip(rows, results):
        row.update(measured)
    reference = next(r for r in rows if r["model_key"] == "classic" and r["loop_key"] == "tutorial")
    for row in rows:
        if "images_per_s" in row and "images_per_s" in reference:
            row["speedup_vs_tutorial_classic"] = round(row["images_per_s"] / reference["images_per_s"], 2)
        same_model = next(r for r in rows if r["model_key"] == row["model_key"] and r["loop_key"] == "tutorial")
        if "images_per_s" in row and "images_per_s" in same_model:
            row["speedup_vs_tutorial_same_model"] = round(row["images_per_s"] / same_model["images_per_s"], 2)
    return {
        "benchmark": "training",
        "quick": quick,
        "machine": machine(),
        "image_size": settings["size"],
        "batch_size": settings["batch"],
        "settings": settings,
        "model": description,
        "rows": rows,
        "data": "synthetic phantom slices, pre-built (loader speed: benchmarks.data)",
    }


def markdown(result: dict) -> str:
    columns = [
        ("model", "model"),
        ("loop", "training loop"),
        ("images_per_s", "slices/s"),
        ("step_ms", "step (ms)"),
        ("peak_rss_mb", "peak RSS (MB)"),
        ("speedup_same", "vs tutorial, same model"),
        ("speedup_classic", "vs tutorial, classic model"),
        ("note", "note"),
    ]
    rows = [
        {
            **r,
            "speedup_same": f"{r['speedup_vs_tutorial_same_model']:.2f}x"
            if "speedup_vs_tutorial_same_model" in r
            else None,
            "speedup_classic": f"{r['speedup_vs_tutorial_classic']:.2f}x"
            if "speedup_vs_tutorial_classic" in r
            else None,
            "note": r.get("skipped", ""),
        }
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"Training step, batch {result['batch_size']} of {result['image_size']}x{result['image_size']} "
            f"slices ({result['data']}); peak RSS of a process per row, interpreter and torch included.",
            "",
            table(rows, columns),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps([worker(config) for config in json.loads(sys.argv[2])]))
        return 0
    p = parser("training", __doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=None,
        help="trained model folder whose architecture to time (default: models/brain-mri-unet, else UNet() defaults)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = parse(p, argv)
    result = run_benchmark(args.model, args.quick, args.threads)
    print(markdown(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
