"""Run every benchmark and write benchmarks/results/summary.md, the README's Performance table.

    python -m benchmarks                       # the full suite, under 10 minutes on a 2-core CPU
    python -m benchmarks --quick               # toy sizes: checks every path in well under a minute
    python -m benchmarks --only inference app  # some of them

Each benchmark runs in its own interpreter (so memory and torch.compile state do not leak
between them) and writes RESULTS_DIR/<name>.json; a failed one is reported and the rest go on.
Run it on an otherwise idle machine: anything else using the cores makes every number low.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT, machine, machine_line, setup_logging

log = logging.getLogger("benchmarks")

# training before data: the data benchmark compares the loader with training's slices/s.
BENCHMARKS = ("inference", "training", "data", "app")
TAKES_MODEL = ("inference", "training", "app")


def summary_markdown(results_dir: Path, names: tuple[str, ...], command: str, durations: dict[str, float]) -> str:
    first = None
    sections = []
    for name in names:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            sections.append(f"### {name}\n\nNo result ({path.name} missing: the benchmark failed).")
            continue
        result = json.loads(path.read_text())
        first = first or result.get("machine")
        module = importlib.import_module(f"benchmarks.{name}")
        sections.append(f"### {name.capitalize()}\n\n{module.markdown(result)}")
    m = first or machine()
    quick = " **(--quick: toy sizes, not a measurement)**" if "--quick" in command else ""
    total = sum(durations.values())
    head = [
        f"Measured on {machine_line(m)}, with `{command}`{quick} ({total / 60:.1f} min for {', '.join(durations)})."
    ]
    if m.get("load_avg_1m") and m["load_avg_1m"] > 0.5:
        head.append(f"\n**Warning:** the load average was {m['load_avg_1m']} at the start: other work shared the CPU.")
    return "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="toy sizes, a few iterations (the smoke test)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="run only these")
    p.add_argument("--model", default=None, help="trained model folder (default: models/brain-mri-unet)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the JSON and summary.md go (default: benchmarks/results, results/quick with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the inference benchmark")
    args = p.parse_args(argv)
    setup_logging()
    results_dir = args.results_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    names = tuple(n for n in BENCHMARKS if n in args.only)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")

    failed = []
    durations: dict[str, float] = {}
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(results_dir / f"{name}.json")]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--model", args.model] if args.model and name in TAKES_MODEL else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--no-compile"] if args.no_compile and name == "inference" else []
        log.info("=== %s: %s", name, " ".join(cmd[1:]))
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT).returncode
        durations[name] = time.perf_counter() - start
        log.info("=== %s: %s in %.0f s", name, "done" if code == 0 else f"FAILED (exit {code})", durations[name])
        if code != 0:
            failed.append(name)
            (results_dir / f"{name}.json").unlink(missing_ok=True)  # no stale result in the summary

    summary = results_dir / "summary.md"
    summary.write_text(summary_markdown(results_dir, names, command, durations))
    log.info(
        "wrote %s (%.1f min in all)%s",
        summary,
        sum(durations.values()) / 60,
        f"; failed: {', '.join(failed)}" if failed else "",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
