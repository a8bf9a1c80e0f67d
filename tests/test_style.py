"""The house style holds: ruff's lint and formatter (settings in pyproject.toml) pass on the whole repository."""

import ast
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


def unet_imports() -> dict[str, set[str]]:
    """Each module of the package with the package modules it imports (anywhere in its file)."""
    graph = {}
    for path in (ROOT / "unet").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "unet":
                imported |= {f"unet.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unet."):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("unet.")}
        graph[f"unet.{path.stem}"] = imported
    return graph


def test_the_package_has_no_import_cycles():
    graph = unet_imports()
    assert graph["unet.segmenter"] >= {"unet.model", "unet.processing"}  # the graph is read, not empty
    finished, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(module) :], module])}")
        if module in finished:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        finished.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_model_and_the_processing_know_nothing_of_each_other():
    graph = unet_imports()
    assert not graph["unet.model"] & {"unet.processing", "unet.segmenter", "unet.reader", "unet.hub"}
    assert not graph["unet.processing"] & {"unet.model", "unet.segmenter", "unet.hub"}
