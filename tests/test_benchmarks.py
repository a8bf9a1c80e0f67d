"""The benchmarks run and report what they promise. Timings are never asserted: they gate nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baselines import BudaUNet, classic_unet
from benchmarks.common import flops_per_image, measure, table

ROOT = Path(__file__).resolve().parents[1]


def test_buda_baseline_is_the_four_pool_width_32_unet():
    model = BudaUNet().eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.76e6, rel=0.01)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1, 32, 32)
    assert 0 <= out.min() and out.max() <= 1  # ends in a sigmoid
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules()) == 4


def test_flop_count_of_the_classic_unet():
    # 3x3 convs dominate: about 85 GFLOP per 256x256 slice, counted without computing anything.
    assert flops_per_image(classic_unet(), 256) / 1e9 == pytest.approx(84.8, rel=0.01)


def test_measure_and_table():
    stats = measure(lambda: None, warmup=1, min_runs=5, budget_s=0)
    assert stats["runs"] == 5
    text = table([{"a": 1.25, "b": None}], [("a", "A"), ("b", "B")])
    assert text.splitlines()[0].startswith("| A") and "1.2" in text and "-" in text.splitlines()[2]


@pytest.mark.slow
def test_quick_suite_writes_every_result(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    inference = json.loads((tmp_path / "inference.json").read_text())
    assert set(inference["matmul_gflops"]) == {"fp32", "bf16"} and inference["matmul_gflops"]["fp32"] > 0
    modes = {(r["key"], r["mode"]) for r in inference["rows"]}
    assert {
        ("classic", "fp32 eager"),
        ("buda", "fp32 eager"),
        ("shipped", "fp32 eager"),
        ("shipped", "fp32 channels_last"),
        ("shipped", "bf16 autocast + channels_last"),
        ("shipped", "torch.compile"),
    } == modes
    for row in inference["rows"]:
        assert row["gflop_per_image"] > 0
        if "skipped" not in row:
            assert {
                "median_ms",
                "p95_ms",
                "images_per_s_b8",
                "images_per_s_b32",
                "speedup_latency",
                "speedup_b32",
                "achieved_gflops",
                "peak_fraction",
            } <= set(row)
    assert all("skipped" not in r for r in inference["rows"] if r["mode"] in ("fp32 eager", "fp32 channels_last"))
    assert {"median_ms", "p95_ms", "input"} <= set(inference["end_to_end"])
    # the shipped model's quality beside its speed: its recipe's cross-validation, slice by slice as timed
    cross_validation = ROOT / "models" / "brain-mri-unet" / "cross_validation.json"
    if cross_validation.is_file():
        quality = inference["model"]["held_out_metrics"]
        expected = json.loads(cross_validation.read_text())["per_slice"]["patient_dice_mean"]
        assert quality["source"] == "its recipe's cross-validation" and quality["patient_dice_mean"] == expected

    training = json.loads((tmp_path / "training.json").read_text())
    assert {(r["model_key"], r["loop_key"]) for r in training["rows"]} == {
        ("shipped", "ours"),
        ("shipped", "tutorial"),
        ("classic", "ours"),
        ("classic", "tutorial"),
    }
    for row in training["rows"]:
        assert "skipped" not in row, row
        assert {"images_per_s", "step_ms", "peak_rss_mb", "speedup_vs_tutorial_classic"} <= set(row)

    data = json.loads((tmp_path / "data.json").read_text())
    assert data["rows"] and all(r["slices_per_s"] > 0 for r in data["rows"])
    assert data["headroom"] is not None  # compared with training.json of the same run

    app = json.loads((tmp_path / "app.json").read_text())
    if (ROOT / "app.py").is_file():
        assert app["skipped"] is None, app["skipped"]
        assert [(r["clients"], r["client_setting"]) for r in app["rows"]] == [
            (1, "defaults"),
            (1, "ssl_verify=False"),
            (8, "defaults"),
        ]
        for row in app["rows"]:
            assert row["failed"] == 0, row["errors"]
            assert row["ok"] == row["requests"] and row["p50_ms"] is not None
        assert app["peak_rss_mb"] and app["peak_rss_mb"] > 0
    else:
        assert app["skipped"]

    summary = (tmp_path / "summary.md").read_text()
    for section in ("### Inference", "### Training", "### Data", "### App", "cores"):
        assert section in summary
