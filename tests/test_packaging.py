"""The package metadata (pyproject.toml) against the source tree: every package listed, every import declared,
no upper caps, floors that the minimum-version CI job (.ci/run) installs."""

from __future__ import annotations

import ast
import re
import sys

import pytest
from train_utils import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the 3.10 minimum-version job skips this static check


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_lists_every_subpackage_and_declares_what_it_imports():
    project = _project()
    packages = set(project["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "evodiff_pl").rglob("__init__.py")}
    assert packages == on_disk | {"evodiff_pl.configs"}
    requirements = [*project["project"]["dependencies"], *sum(project["project"]["optional-dependencies"].values(), [])]
    declared = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in requirements}
    import_names = {"PIL": "pillow", "sklearn": "scikit-learn", "torch_fidelity": "torch-fidelity", "yaml": "pyyaml"}
    imported = set()
    for path in [*(ROOT / "evodiff_pl").rglob("*.py"), ROOT / "train.py", ROOT / "sample.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            imported |= {n.split(".")[0] for n in names}
    third_party = {n for n in imported if n not in sys.stdlib_module_names and n != "evodiff_pl"}
    assert {import_names.get(n, n).lower() for n in third_party} <= declared
    assert not any("<" in d for d in project["project"]["dependencies"])


def test_python_floor_is_the_one_ci_tests():
    project = _project()
    assert project["project"]["requires-python"] == ">=3.10"
    assert "python3.10" in (ROOT / ".ci" / "run").read_text()


def test_every_dependency_has_a_floor_that_ci_installs():
    deps = _project()["project"]["dependencies"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9][0-9.]*", d) for d in deps), deps
    floors = dict(d.split(">=") for d in deps)
    assert tuple(map(int, floors["torchmetrics"].split("."))) >= (1, 8)  # NoTrainInceptionV3(antialias=...) is new in torchmetrics 1.8.0
