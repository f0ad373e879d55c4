"""The package layout (docs/architecture.md): module size, no import cycles, and the deprecated paths of 0.1."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evodiff_pl"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this package that `name` imports anywhere in its source (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found & known if m != name and not name.startswith(m + ".") and not m.startswith(name + ".")}


def test_every_module_has_at_most_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert len(sizes) > 50  # the walk found the package


def test_no_two_modules_import_each_other():
    mods = _modules()
    edges = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert edges["evodiff_pl.training.module"] >= {"evodiff_pl.training.losses"}  # the walk sees imports
    assert sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges[b]) == []


def test_the_maths_import_nothing_from_the_lightning_side():
    mods = _modules()
    upper = ("evodiff_pl.training", "evodiff_pl.evaluation.callback", "evodiff_pl.sampling", "evodiff_pl.data")
    for name in [n for n in mods if n.startswith(("evodiff_pl.solvers", "evodiff_pl.schedules"))] + ["evodiff_pl.toy"]:
        assert not {m for m in _imports(name, mods[name], set(mods)) if m.startswith(upper)}, name


@pytest.mark.parametrize("old, new, name", [
    ("evodiff_pl.entropic", "evodiff_pl.schedules.entropic", "EntropicSchedule"),
    ("evodiff_pl.entropic", "evodiff_pl.schedules.tracker", "SigmaBinnedLoss"),
    ("evodiff_pl.checkpointing", "evodiff_pl.io.checkpointing", "export_weights"),
    ("evodiff_pl.phema", "evodiff_pl.training.phema", "reconstruct"),
])
def test_paths_shown_by_the_0_1_readme_still_import_with_a_deprecation_warning(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to "):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_python_m_of_the_old_phema_path_runs_the_command():
    run = subprocess.run([sys.executable, "-m", "evodiff_pl.phema", "run.dir=/nonexistent/run", "std=0.05"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no power-EMA snapshots in /nonexistent/run/phema" in run.stderr
