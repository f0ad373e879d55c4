"""The schedule `tuned` (evodiff_pl.schedules.tuned): the container, tuning on ranks, in training and in sample.py."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_utils import GMM, free_port, load, tiny_gmm, train_in_process

from evodiff_pl.sampling.cli import main
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.sampling.grid_tuning import TUNE_SEED, tune_grids, tuning_noise
from evodiff_pl.schedules.tuned import TunedGrids, tuned_grids_path
from evodiff_pl.toy import GaussianMixture
from evodiff_pl.utils.stop import STOP, Stopped

GRID = [80.0, 3.0, 1.0, 0.4, 0.1, 0.002]


def test_round_trip_and_lookup_are_exact(tmp_path):
    grids = TunedGrids({"dpmpp_2m/5": GRID, "ipndm/4": [80.0, 2.0, 0.5, 0.05, 0.002]}, objective="rmse")
    grids.save(tmp_path / "g.json")
    back = TunedGrids.load(tmp_path / "g.json")
    assert back.to_dict() == grids.to_dict() and back.objective == "rmse"
    assert get_sigmas("tuned", 5, schedule=back.for_solver("dpmpp_2m")).tolist() == GRID
    assert get_sigmas("tuned", 4, schedule=back.for_solver("ipndm")).tolist()[1] == 2.0


@pytest.mark.parametrize("make, message", [
    (lambda: TunedGrids({"dpmpp_2m/5": GRID[::-1]}), "strictly decreasing"),
    (lambda: TunedGrids({"dpmpp_2m/6": GRID}), "not NFE 6"),
    (lambda: TunedGrids({"dpmpp_2m": GRID}), "keyed 'solver/nfe'"),
    (lambda: TunedGrids.from_dict({"format": "other"}), "not tuned grids"),
    (lambda: get_sigmas("tuned", 5), "needs a solver's tuned grids"),
    (lambda: get_sigmas("tuned", 6, schedule=TunedGrids({"dpmpp_2m/5": GRID}).for_solver("dpmpp_2m")),
     "no tuned grid for dpmpp_2m at NFE 6"),
    (lambda: get_sigmas("tuned", 5, 0.01, schedule=TunedGrids({"dpmpp_2m/5": GRID}).for_solver("dpmpp_2m")),
     "spans"),
    (lambda: tune_grids([("dpmpp_2m", 5)], None, torch.zeros(2, 1), None, objective="lpips"), "unknown tuning"),
])
def test_bad_input_is_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _tune(previous: TunedGrids | None = None) -> TunedGrids:
    gm = GaussianMixture.default()
    x_T, _ = tuning_noise(12, (gm.dim,), 80.0)
    return tune_grids([("dpmpp_2m", 5), ("unipc", 4)], gm, x_T.double(),
                      lambda s, n: get_sigmas("logsnr", n), previous=previous, objective="rmse", max_evals=12,
                      reference_steps=20)


def test_a_stop_signal_abandons_the_grid_being_tuned_at_the_next_denoiser_call(monkeypatch):
    gm, calls = GaussianMixture.default(), []

    def denoiser(x, sigma):
        calls.append(1)
        if len(calls) == 30:
            monkeypatch.setattr(STOP, "received", signal.SIGUSR1)  # what the handler records
        return gm(x, sigma)

    x_T, _ = tuning_noise(12, (gm.dim,), 80.0)
    with pytest.raises(Stopped, match="during the schedule tuning"):
        tune_grids([("dpmpp_2m", 5), ("unipc", 4)], denoiser, x_T.double(), lambda s, n: get_sigmas("logsnr", n),
                   objective="rmse", max_evals=12, reference_steps=20)
    assert len(calls) == 30  # not one more network call after the signal


def test_tuning_is_deterministic_and_warm_starts():
    a, b = _tune(), _tune()
    assert a.to_dict() == b.to_dict()
    start = get_sigmas("logsnr", 5)
    grid = a.get("dpmpp_2m", 5)
    assert grid[[0, -1]].tolist() == start[[0, -1]].tolist() and not torch.equal(grid, start)
    warm = _tune(previous=a)  # starts from a's grids: never worse than them, so not the cold result again
    assert warm.get("unipc", 4) is not None and set(warm.grids) == set(a.grids)
    x = tuning_noise(3, (4,), 80.0)[0]
    assert torch.equal(x, 80.0 * torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(TUNE_SEED + j))
                                              for j in range(3)]))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_tune().to_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_end_with_the_grids_of_one():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["grids"] == _tune().to_dict()["grids"]


TUNED_EVAL = ("evaluation.enabled=true", "evaluation.specs=[dpmpp_2m/tuned/5,dpmpp_2m/logsnr/5]",
              "evaluation.num_samples=32", "evaluation.grid_size=0", "evaluation.tune_samples=16",
              "evaluation.tune_evals=8", "evaluation.tune_reference_steps=10", "trainer.val_every_steps=4",
              "checkpoint.every_steps=4", "model.net.dropout=0.1", "data.batch_size=128", "train.total_images=1024")


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory):
    """An 8-step run tuning at steps 4 and 8, and the same run stopped at step 4 and resumed (slow: 3 runs)."""
    full = tmp_path_factory.mktemp("full")
    train_in_process(GMM, tiny_gmm(full, *TUNED_EVAL))
    split = tmp_path_factory.mktemp("split")
    train_in_process(GMM, tiny_gmm(split, *TUNED_EVAL, "train.total_images=512"))
    half = load(split / "checkpoints" / "last.ckpt")["evodiff"]["tuned"]
    resumed = train_in_process(GMM, tiny_gmm(split, *TUNED_EVAL))
    return full, split, half, resumed


@pytest.mark.slow
def test_tuned_grids_survive_checkpoint_and_resume_exactly(tuned_runs):
    full, split, half, resumed = tuned_runs
    a, b = load(full / "checkpoints" / "last.ckpt")["evodiff"], load(split / "checkpoints" / "last.ckpt")["evodiff"]
    assert half is not None and half["source"]["images_seen"] == 512
    assert a["tuned"] == b["tuned"] and a["tuned"]["source"]["images_seen"] == 1024
    assert resumed.module.tuned_grids.to_dict() == b["tuned"]
    assert json.loads((full / "schedule_tuned.json").read_text()) == a["tuned"]
    assert (full / "plots" / "schedule_tuned.png").is_file()


@pytest.mark.slow
def test_sample_tune_writes_the_grids_and_schedule_tuned_reads_them(tuned_runs, tmp_path, capsys):
    full = tuned_runs[0]
    ckpt = full / "checkpoints" / "last.ckpt"
    common = ["progress=false", f"ckpt={ckpt}", "solver=dpmpp_2m", "schedule=tuned", "nfe=4", "seeds=0-3",
              "format=npz", "tune_samples=8", "tune_evals=6"]
    assert main([*common, f"outdir={tmp_path / 'a'}", "tune=true"]) == 0
    path = tuned_grids_path(ckpt, str(tmp_path / "a"))
    written = TunedGrids.load(path)
    assert set(written.grids) == {"dpmpp_2m/4", "dpmpp_2m/5"}  # the new NFE, and the checkpoint's grid kept
    assert "tuned dpmpp_2m/4" in capsys.readouterr().out
    assert main([*common, f"outdir={tmp_path / 'a'}"]) == 0  # reads the file: tunes nothing
    assert "tuned dpmpp_2m" not in capsys.readouterr().out
    assert TunedGrids.load(path).to_dict() == written.to_dict()
    assert main([*common, "schedule=karras", "tune=true", f"outdir={tmp_path / 'b'}"]) == 1
    assert "add tuned to schedule=" in capsys.readouterr().err
    assert main([*common, "tune_objective=lpips", f"outdir={tmp_path / 'c'}"]) == 1
    assert "tune_objective" in capsys.readouterr().err


def test_sample_tune_on_a_class_conditional_nvlabs_pickle(tmp_path):
    """An NVlabs edm pickle has no learned schedule: the grid is tuned from karras (its labels bound) and written."""
    pkl = Path(__file__).parent / "data" / "nvlabs" / "ddpmpp_edm_cond.pkl"
    assert main(["progress=false", f"ckpt={pkl}", "solver=dpmpp_2m", "schedule=tuned", "nfe=3", "seeds=0-1",
                 "format=npz", "device=cpu", f"outdir={tmp_path}", "tune=true", "tune_samples=2", "tune_evals=3"]) == 0
    grids = TunedGrids.load(tuned_grids_path(pkl, str(tmp_path)))
    assert grids.get("dpmpp_2m", 3)[[0, -1]].tolist() == [80.0, 0.002]
    assert (tmp_path / "dpmpp_2m_tuned_nfe3.npz").is_file()


def test_sample_tune_fd_data_needs_a_frechet_score_of_the_samples(tmp_path, capsys):
    """tune_objective=fd_data tunes against a score's reference statistics: without score= it is one clear error."""
    pkl = Path(__file__).parent / "data" / "nvlabs" / "ddpmpp_edm_cond.pkl"
    assert main(["progress=false", f"ckpt={pkl}", "solver=dpmpp_2m", "schedule=tuned", "nfe=3", "seeds=0-1",
                 "format=npz", "device=cpu", f"outdir={tmp_path}", "tune=true", "tune_objective=fd_data"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tune_objective=fd_data tunes against") and err.count("\n") == 1, err
    assert not tuned_grids_path(pkl, str(tmp_path)).exists()


def test_validation_tunes_against_the_scores_reference_statistics_with_fd_data(tmp_path):
    """evaluation.tune_objective=fd_data: the callback hands the score's moments to the tuner; no reference solution."""
    train_in_process(GMM, tiny_gmm(tmp_path, *TUNED_EVAL, "evaluation.tune_objective=fd_data",
                                   "model.net.dropout=0.0", "train.total_images=512"))
    tuned = TunedGrids.from_dict(load(tmp_path / "checkpoints" / "last.ckpt")["evodiff"]["tuned"])
    grid = tuned.get("dpmpp_2m", 5)
    assert tuned.objective == "fd_data" and tuned.source["reference_steps"] == 0
    assert grid[[0, -1]].tolist() == [80.0, 0.002] and (grid[1:] < grid[:-1]).all() and grid.numel() == 6
