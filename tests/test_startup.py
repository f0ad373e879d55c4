"""Fast start: the command lines answer --help, --print-config and a finished run without importing Lightning, and
sample.py never imports it (benchmarks/startup.py measures the times)."""

from __future__ import annotations

import os
import subprocess
import sys

from train_utils import GMM, ROOT, tiny_gmm, train_in_process

PROBE = "import sys, runpy; sys.argv = {argv!r}; code = 0\ntry:\n    runpy.run_path({script!r}, run_name='__main__')\n" \
        "except SystemExit as e:\n    code = e.code or 0\nprint('LIGHTNING' if 'lightning' in sys.modules else 'NONE', code)"


def _modules_after(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    code = PROBE.format(argv=[script, *args], script=str(ROOT / script))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.splitlines()[-1]


def test_importing_the_sampling_cli_does_not_import_lightning():
    code = "import sys, evodiff_pl.sampling.cli, evodiff_pl.sampling.job, evodiff_pl.sampling.estimate; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_help_and_print_config_do_not_import_lightning():
    assert _modules_after("train.py", "--help") == "NONE 0"
    assert _modules_after("train.py", "--print-config") == "NONE 0"
    assert _modules_after("sample.py", "--help") == "NONE 0"


def test_a_finished_run_answers_without_lightning_or_its_config(tmp_path):
    overrides = tiny_gmm(tmp_path / "run", "train.total_images=128")
    train_in_process(GMM, overrides)
    assert _modules_after("train.py", "--config", str(GMM), *overrides) == "NONE 0"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "train.py", "--config", str(GMM), *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("nothing to do") and "model:" not in out.stdout


def test_sample_help_lists_every_schedule():
    from evodiff_pl.sampling.options import usage
    from evodiff_pl.schedules.grids import SCHEDULES

    assert all(name in usage() for name in SCHEDULES)


def test_console_scripts_take_the_stop_signals_like_the_entry_scripts():
    import importlib
    import re

    text = (ROOT / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(evodiff-[\w-]+) = "([\w.:]+)"$', text.split("[project.scripts]")[1], re.M))
    assert scripts["evodiff-train"] == "evodiff_pl.entry:train"
    assert scripts["evodiff-sample"] == "evodiff_pl.entry:sample"
    assert {"evodiff-phema", "evodiff-export", "evodiff-fid"} <= set(scripts)
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
    for script in ("train.py", "sample.py"):
        assert "from evodiff_pl.entry import" in (ROOT / script).read_text()
