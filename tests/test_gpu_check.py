"""benchmarks/gpu_check.py runs end to end on the CPU (--quick: a small network, few steps and samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_utils import ROOT


@pytest.mark.slow
def test_gpu_check_quick_cpu_run_reports_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                             "--no-compile", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {(r["loop"], r["precision"]) for r in report["training"]} == {
        (loop, p) for loop in ("lightning", "lightning sync_free", "plain", "edm") for p in ("fp32", "bf16")}
    assert all(r["img_per_s"] > 0 for r in report["training"] + report["sampling"])
    assert {r["solver"] for r in report["sampling"]} == {"euler", "heun", "dpmpp_2m", "dpmpp_3m", "evodiff"}
    fid = report["fid"]
    assert fid["inception_weights"] == "random" and "RANDOM Inception weights" in result.stdout
    assert fid["total_s"] >= fid["denoiser_s"] + fid["inception_s"] > 0
