"""The house style holds: ruff's lint and formatter (settings in pyproject.toml) pass on the whole repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(command):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -r requirements-dev.txt"
    done = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-4000:])
    assert done.returncode == 0, f"ruff {' '.join(command)} found problems:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
