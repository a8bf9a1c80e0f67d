"""Data pipeline speed: slices/s through LGGDataset + DataLoader with the training augmentation.

    python -m benchmarks.data [--data-dir ../shared/data/lgg_subset] [--patients 8] [--quick]

Uses the first patients of the real LGG subset where it is present, else generated phantoms.
Compared with the training step's slices/s (benchmarks/results/training.json, when there),
this says whether the loader can ever be the bottleneck.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import DEFAULT_DATA_DIR, machine, parse, parser, table, write_json
from unet.data import LGGDataset, find_kaggle_3m, scan_dataset, train_transforms
from unet.processing import Preprocessing
from unet.synthetic import make_synthetic_dataset

log = logging.getLogger("benchmarks.data")

FULL = {"size": 256, "batch": 8, "batches": 60, "patients": 8, "workers": (0, 2)}
QUICK = {"size": 64, "batch": 4, "batches": 4, "patients": 2, "workers": (0,)}


def subset_folder(data_dir: Path, patients: int, scratch: Path) -> Path:
    """A kaggle_3m folder of links to the first ``patients`` patients, so the scan reads only those."""
    source = find_kaggle_3m(data_dir)
    folder = scratch / "kaggle_3m"
    folder.mkdir(parents=True)
    for patient in sorted(p for p in source.iterdir() if p.is_dir())[:patients]:
        (folder / patient.name).symlink_to(patient.resolve(), target_is_directory=True)
    return folder


def time_loader(dataset: LGGDataset, batch: int, batches: int, workers: int) -> dict:
    """Slices/s over ``batches`` batches in random order, worker start-up included (as per epoch in train.py)."""
    sampler = torch.randint(len(dataset), (batch * batches,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers)
    first = None
    count = 0
    for images, _ in loader:
        count += len(images)
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "slices": count,
        "seconds": round(seconds, 3),
        "slices_per_s": round(count / seconds, 1),
        "first_batch_s": round(first or 0.0, 3),
    }


def run_benchmark(data_dir: Path, quick: bool, patients: int | None, training_json: Path | None) -> dict:
    settings = dict(QUICK if quick else FULL)
    if patients:
        settings["patients"] = patients
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if data_dir.is_dir():
            folder = subset_folder(data_dir, settings["patients"], scratch / "subset")
            source = f"real LGG slices, first {settings['patients']} patients of {data_dir}"
        else:
            log.warning("no data at %s: using generated phantoms", data_dir)
            folder = make_synthetic_dataset(
                scratch / "synthetic", patients=settings["patients"], slices=12, size=settings["size"]
            )
            source = f"synthetic phantoms ({settings['patients']} patients x 12 slices)"
        df = scan_dataset(folder, check_images=False)
        start = time.perf_counter()
        dataset = LGGDataset(df, train_transforms(settings["size"]), Preprocessing(image_size=settings["size"]))
        decode_s = time.perf_counter() - start
        log.info("%d slices decoded in %.1f s", len(dataset), decode_s)
        rows = []
        for workers in settings["workers"]:
            log.info("DataLoader, %d workers", workers)
            rows.append(time_loader(dataset, settings["batch"], settings["batches"], workers))

    result = {
        "benchmark": "data",
        "quick": quick,
        "machine": machine(),
        "source": source,
        "slices": len(dataset),
        "decode_s": round(decode_s, 2),
        "decode_slices_per_s": round(len(dataset) / decode_s, 1),
        "image_size": settings["size"],
        "batch_size": settings["batch"],
        "settings": settings,
        "rows": rows,
        "training_images_per_s": None,
        "headroom": None,
    }
    # The loader must outrun the training step it feeds: compare with training.json of the same run.
    if training_json and training_json.is_file():
        training = json.loads(training_json.read_text())
        ours = [r for r in training.get("rows", []) if r.get("loop_key") == "ours" and r.get("model_key") == "shipped"]
        if ours and "images_per_s" in ours[0]:
            result["training_images_per_s"] = ours[0]["images_per_s"]
            result["headroom"] = round(rows[0]["slices_per_s"] / ours[0]["images_per_s"], 1)
    return result


def markdown(result: dict) -> str:
    columns = [
        ("workers", "DataLoader workers"),
        ("slices_per_s", "slices/s"),
        ("first_batch_s", "first batch (s)"),
        ("slices", "slices timed"),
    ]
    lines = [
        f"Data: LGGDataset + DataLoader with `train_transforms` at {result['image_size']}x{result['image_size']}, "
        f"batch {result['batch_size']} ({result['source']}; {result['slices']} slices decoded once in "
        f"{result['decode_s']:.1f} s).",
        "",
        table(result["rows"], columns),
    ]
    if result.get("headroom"):
        lines += [
            "",
            f"- With no workers (train.py's default) the loader gives {result['headroom']:.1f}x the "
            f"{result['training_images_per_s']:.1f} slices/s that our training step consumes.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser("data", __doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="LGG subset (default: %(default)s)")
    p.add_argument("--patients", type=int, default=None, help="patients to load (default: 8, 2 with --quick)")
    p.add_argument(
        "--training-json",
        type=Path,
        default=None,
        help="training.json to compare with (default: training.json beside --out)",
    )
    args = parse(p, argv)
    result = run_benchmark(
        args.data_dir, args.quick, args.patients, args.training_json or args.out.parent / "training.json"
    )
    print(markdown(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
