"""checkpoint.best_spec keeps checkpoints/best.ckpt at the lowest tracked score of one evaluation spec, across
resumes; a spec that is not tracked is one ConfigError."""

from __future__ import annotations

import csv
import json

import pytest
from train_utils import GMM, load, tiny_gmm, train_in_process

from evodiff_pl.config.schema import ConfigError, load_config
from evodiff_pl.training.run import build

SPEC = "dpmpp_2m/logsnr/4"
METRIC = "val/fd_pixels_64/dpmpp_2m_logsnr_nfe4"


def _overrides(run_dir, total_images: int) -> list[str]:
    return tiny_gmm(run_dir, "evaluation.enabled=true", f"evaluation.specs=[{SPEC}]", "evaluation.num_samples=64",
                    "evaluation.grid_size=0", "trainer.val_every_steps=1", "logger.kind=csv",
                    f"train.total_images={total_images}", f"checkpoint.best_spec={SPEC}")


def _scores(run_dir) -> list[tuple[int, float]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r[METRIC])) for r in csv.DictReader(f) if r.get(METRIC)]


def test_best_ckpt_holds_the_lowest_score_and_survives_a_resume(tmp_path):
    train_in_process(GMM, _overrides(tmp_path, 256))  # 4 steps, scored after each
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    scores = _scores(tmp_path)
    assert len(scores) == 4 and best["metric"] == METRIC
    assert best["score"] == pytest.approx(min(s for _, s in scores), rel=1e-6)
    ckpt = load(tmp_path / "checkpoints" / "best.ckpt")
    assert ckpt["global_step"] == best["step"] and ckpt["evodiff"]["images_seen"] == best["images_seen"]
    # a best.ckpt newer than the resumed checkpoint: the resumed run must not replace it by a worse one
    (tmp_path / "checkpoints" / "best.json").write_text(json.dumps({**best, "score": 0.0}))
    train_in_process(GMM, _overrides(tmp_path, 384))  # resume: 2 more steps
    assert len(_scores(tmp_path)) == 6
    assert load(tmp_path / "checkpoints" / "best.ckpt")["global_step"] == best["step"]
    state = load(tmp_path / "checkpoints" / "last.ckpt")["callbacks"]["BestCheckpoint{'spec': 'dpmpp_2m_logsnr_nfe4'}"]
    assert state == {"best": 0.0, "step": best["step"]}


def test_a_best_spec_that_is_not_evaluated_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.best_spec=euler/karras/4 is not tracked: add it to evaluation.specs$"):
        build(load_config(GMM, [*_overrides(tmp_path, 256), "checkpoint.best_spec=euler/karras/4"]))
