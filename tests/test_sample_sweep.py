"""Resumable sample.py sweeps: scores written as each setting is measured, settings scored before skipped for the
same checkpoint, seeds and reference statistics; plain progress lines outside a terminal."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from train_utils import GMM, tiny_gmm, train_in_process

from evodiff_pl.sampling import job as sampling_job
from evodiff_pl.sampling import sweep
from evodiff_pl.sampling.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sweep")
    train_in_process(GMM, tiny_gmm(run_dir, "train.total_images=128", "checkpoint.every_steps=1000"))
    return run_dir


def _sweep(run_dir: Path, out: Path, *args: str) -> int:
    return main([f"ckpt={run_dir}", f"outdir={out}", "solver=euler,dpmpp_2m", "schedule=karras", "nfe=4",
                 "score=fd_pixels", "seeds=0-15", f"stats_dir={out.parent / 'stats'}", "format=none",
                 "progress=false", "device=cpu", *args])


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_each_score_is_written_when_measured_and_a_rerun_skips_it(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = sampling_job.run_plan
    measured = []

    def killed_after_first(job, plan):
        if measured:
            raise KeyboardInterrupt  # the time limit, after the first setting
        measured.append(plan.spec.name)
        return real(job, plan)

    monkeypatch.setattr(sampling_job, "run_plan", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        _sweep(run_dir, out)
    first = _rows(out)
    assert [r["solver"] for r in first] == ["euler"] and float(first[0]["fd_pixels_16"]) > 0
    assert "| euler | karras | 4 |" in (out / "scores.md").read_text() and "key" not in (out / "scores.md").read_text()
    monkeypatch.setattr(sampling_job, "run_plan", real)
    capsys.readouterr()
    assert _sweep(run_dir, out) == 0
    text = capsys.readouterr().out
    assert "euler_karras_nfe4: skipped" in text and "dpmpp_2m_karras_nfe4: skipped" not in text
    rows = _rows(out)
    assert [r["solver"] for r in rows] == ["euler", "dpmpp_2m"]
    assert rows[0] == first[0]  # carried over exactly
    assert _sweep(run_dir, out) == 0 and "dpmpp_2m_karras_nfe4: skipped" in capsys.readouterr().out


def test_other_seeds_or_weights_are_measured_again(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sweep(run_dir, out) == 0
    capsys.readouterr()
    assert _sweep(run_dir, out, "seeds=0-14") == 0
    assert "skipped" not in capsys.readouterr().out
    assert _sweep(run_dir, out, "seeds=0-14", "ema=false") == 0
    assert "skipped" not in capsys.readouterr().out


def test_plain_progress_prints_a_line_per_setting_and_at_most_one_a_minute(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 59.0, 61.0, 100.0, 130.0, 200.0])
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: next(clock))
    bar = sweep.Progress(100, "heun_karras_nfe10", enabled=True, terminal=False)
    for _ in range(5):
        bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["heun_karras_nfe10: 30/100 img, 0.5 img/s", "heun_karras_nfe10: 50/100 img, 0.4 img/s",
                     "heun_karras_nfe10: 50/100 img, 0.2 img/s"]  # at 61 s, 130 s (not 100 s) and the end
