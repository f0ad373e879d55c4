import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train_utils import free_port

from evodiff_pl.io.checkpointing import CHECKPOINT_KEY, write_checkpoint
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.config.schema import load_config
from evodiff_pl.utils.images import to_uint8
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.sampling.generate import EvalSpec, generate
from evodiff_pl.sampling.cli import checkpoint_data, main, training_samples
from evodiff_pl.training.run import run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["logger.kind=none", "trainer.progress_bar=false", "evaluation.enabled=false", "checkpoint.every_steps=1000",
        "entropic.eval_fraction=1"]
"""A few optimizer steps, no logger or evaluation: enough for a checkpoint with a learned schedule."""


def _train(run_dir: Path, config: str, overrides: list[str]) -> Path:
    run(load_config(ROOT / "configs" / config, [f"run.dir={run_dir}", *TINY, *overrides]))
    return run_dir


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """8x8 digits, a 10k-parameter U-Net, 4 steps of 128 images."""
    return _train(tmp_path_factory.mktemp("digits"), "digits.yaml",
                  ["train.total_images=512", "model.net.model_channels=8", "model.net.channel_mult=[1]"])


@pytest.fixture(scope="session")
def gmm_run(tmp_path_factory) -> Path:
    """The 16-d mixture, a small MLP, 4 steps of 256 vectors."""
    return _train(tmp_path_factory.mktemp("gmm"), "gmm.yaml",
                  ["train.total_images=1024", "data.batch_size=256", "data.dim=16", "data.num_train=1024",
                   "model.net.hidden=32", "model.net.depth=1"])


@pytest.fixture(scope="session")
def stats_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stats")


def _sample(*args: str) -> int:
    return main(["progress=false", *args])


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def _rows(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


NAME = "evodiff_consistent_rescaled_entropic_nfe10"


def test_images_depend_only_on_their_seed(digits_run, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert _sample(f"ckpt={digits_run}", "seeds=0-15", f"outdir={whole}", "format=both", "batch=5") == 0
    for seeds in ("8-15", "0-7"):
        assert _sample(f"ckpt={digits_run}/checkpoints/last.ckpt", f"seeds={seeds}", f"outdir={halves}/{seeds}",
                       "format=both", "batch=16", "per_folder=4") == 0
    ref = _npz(whole / f"{NAME}.npz")
    assert ref["images"].dtype == np.uint8 and ref["images"].shape == (16, 8, 8, 1)
    assert ref["seeds"].tolist() == list(range(16))
    parts = [_npz(halves / s / f"{NAME}.npz") for s in ("0-7", "8-15")]
    assert np.array_equal(np.concatenate([p["images"] for p in parts]), ref["images"])
    assert np.concatenate([p["seeds"] for p in parts]).tolist() == list(range(16))
    for seed in range(16):
        png = np.asarray(Image.open(whole / NAME / f"{seed:06d}.png"))
        half = "0-7" if seed < 8 else "8-15"
        split = np.asarray(Image.open(halves / half / NAME / f"{seed // 4 * 4:06d}" / f"{seed:06d}.png"))
        assert png.shape == (8, 8) and np.array_equal(png, ref["images"][seed, ..., 0]) and np.array_equal(png, split)
    # the validation callback's code path with base seed 0 gives the same images
    loaded = load_denoiser(digits_run)
    sigmas = EvalSpec("evodiff_consistent", "rescaled_entropic", 10).sigmas(0.002, 80.0, loaded.schedule)
    x = generate(loaded.denoiser, torch.arange(16), (1, 8, 8), solver="evodiff_consistent", sigmas=sigmas, seed=0,
                 batch_size=7)
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), ref["images"])
    raw = tmp_path / "raw"
    assert _sample(f"ckpt={digits_run}", "seeds=0-15", f"outdir={raw}", "format=npz", "ema=false") == 0
    assert not np.array_equal(_npz(raw / f"{NAME}.npz")["images"], ref["images"])


def test_sweep_prints_and_writes_every_row(digits_run, stats_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sample(f"ckpt={digits_run}", "solver=evodiff,heun", "schedule=karras,logsnr,rescaled_entropic",
                   "nfe=3,4", "seeds=0-15", "score=fd_pixels", f"stats_dir={stats_dir}", "format=none",
                   f"outdir={out}") == 0
    rows = _rows(out)
    combos = [(r["solver"], r["schedule"], r["nfe"]) for r in rows]
    assert combos == [(s, k, n) for s in ("evodiff", "heun") for k in ("karras", "logsnr", "rescaled_entropic")
                      for n in ("3", "4")]
    for r in rows:
        if r["solver"] == "heun" and r["nfe"] == "3":
            assert r["fd_pixels_16"] == "-" and "cannot make exactly 3" in r["note"]
        else:
            assert float(r["fd_pixels_16"]) > 0 and r["note"] == ""
    assert [r["steps"] for r in rows if r["solver"] == "heun" and r["nfe"] == "4"] == ["2"] * 3
    printed = capsys.readouterr().out
    assert printed.count("| heun |") == 6 and (out / "scores.md").read_text() in printed
    assert sorted(p.name for p in out.iterdir()) == ["scores.csv", "scores.md"]


def test_score_defaults_to_one_sample_per_reference_image(digits_run, stats_dir, tmp_path):
    out = tmp_path / "fd"
    args = [f"ckpt={digits_run}", "solver=euler", "schedule=karras", "nfe=2", "score=fd_pixels",
            f"stats_dir={stats_dir}", "format=npz", "batch=1024"]
    assert _sample(*args, f"outdir={out}") == 0
    (row,) = _rows(out)
    assert len(_npz(out / "euler_karras_nfe2.npz")["seeds"]) == 1797
    stats = next(stats_dir.glob("digits-8px-pixels-*-nall.pt"))
    again = tmp_path / "fd_stats"
    assert _sample(*args, f"stats={stats}", f"outdir={again}") == 0
    assert _rows(again)[0]["fd_pixels_1797"] == row["fd_pixels_1797"]


def test_estimate_schedule_writes_a_usable_schedule(digits_run, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(digits_run / "checkpoints" / "last.ckpt", ckpt)
    assert _sample(f"ckpt={ckpt}", "estimate_schedule=true", "levels=12", "pairs=48", "batch=20") == 0
    path = tmp_path / "model_schedule_estimated.json"
    schedule = EntropicSchedule.load(path)
    assert schedule.kind == "rescaled_entropic" and schedule.sigma_range == (0.002, 80.0)
    assert schedule.source["method"] == "mmse" and schedule.source["n_levels"] == 12
    assert schedule.dim == 64 and len(schedule.q) == 12
    sigmas = schedule.sigmas(10)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0.002 and bool((sigmas.diff() < 0).all())
    assert not torch.allclose(sigmas, load_denoiser(ckpt).schedule.sigmas(10))
    for kind in ("rescaled_entropic", "entropic"):
        out = tmp_path / kind
        assert _sample(f"ckpt={ckpt}", f"schedule={kind}", f"schedule_file={path}", "seeds=0-3",
                       f"outdir={out}", "format=npz") == 0
        assert _npz(out / f"evodiff_consistent_{kind}_nfe10.npz")["images"].shape == (4, 8, 8, 1)


def test_estimate_schedule_on_a_class_conditional_checkpoint_passes_the_labels(tmp_path, monkeypatch):
    run_dir = _train(tmp_path / "cond", "digits.yaml", ["train.total_images=256", "model.net.model_channels=8",
                                                        "model.net.channel_mult=[1]", "data.conditional=true"])
    calls = []
    denoiser_type = type(load_denoiser(run_dir).denoiser)
    forward = denoiser_type.forward

    def spy(self, x, sigma, labels=None):
        calls.append(labels)
        return forward(self, x, sigma, labels)

    monkeypatch.setattr(denoiser_type, "forward", spy)
    assert _sample(f"ckpt={run_dir}", "estimate_schedule=true", "levels=4", "pairs=30", "batch=30") == 0
    assert len(calls) == 4 and all(c is not None and c.shape == (30,) and c.dtype == torch.int64 for c in calls)
    assert len(set(calls[0].tolist())) > 3  # the digits' own classes, not a constant
    data = checkpoint_data(load_denoiser(run_dir))
    x, y = training_samples(data, labels=True)(50, torch.Generator().manual_seed(0))
    images, labels = data.data.tensors
    rows = [int(torch.nonzero((images == xi).flatten(1).all(1))[0]) for xi in x]
    assert torch.equal(y, labels[rows])  # each image with its own label
    schedule = EntropicSchedule.load(run_dir / "checkpoints" / "last_schedule_estimated.json")
    assert schedule.source["n_levels"] == 4 and len(schedule.q) == 4


def test_vector_data_gives_an_npz_of_floats(gmm_run, stats_dir, tmp_path, capsys):
    out = tmp_path / "gmm"
    assert _sample(f"ckpt={gmm_run}", "score=fd_pixels", f"stats_dir={stats_dir}", f"outdir={out}",
                   "solver=dpmpp_2m", "schedule=logsnr") == 0
    f = _npz(out / "dpmpp_2m_logsnr_nfe10.npz")
    assert f["samples"].dtype == np.float32 and f["samples"].shape == (1024, 16) and "images" not in f
    assert float(_rows(out)[0]["fd_pixels_1024"]) > 0
    for args, message in ((["format=png"], "use format=npz"), (["score=fid_inception"], "needs images")):
        assert _sample(f"ckpt={gmm_run}", f"outdir={tmp_path / 'bad'}", *args) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def bad_files(digits_run, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    ckpt = torch.load(digits_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt[CHECKPOINT_KEY]["schedule"] = None
    write_checkpoint(folder / "no_schedule.ckpt", ckpt)
    (folder / "corrupt.ckpt").write_bytes((digits_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    schedule = load_denoiser(digits_run).schedule.to_dict()
    EntropicSchedule.from_dict({**schedule, "sigma_range": [0.01, 50.0]}).save(folder / "other_range.json")
    torch.save({"sum": torch.zeros(64), "outer_sum": torch.zeros(64, 64), "count": torch.tensor(2),
                "feature": "pixels"}, folder / "pixels.pt")
    return {"no_schedule": folder / "no_schedule.ckpt", "corrupt": folder / "corrupt.ckpt",
            "other_range": folder / "other_range.json", "missing": folder / "missing.ckpt",
            "pixel_stats": folder / "pixels.pt"}


BAD = {
    "missing checkpoint": (["ckpt={missing}"], "missing.ckpt does not exist"),
    "corrupt checkpoint": (["ckpt={corrupt}"], "corrupt.ckpt is unreadable"),
    "no ckpt": ([], "ckpt= is required"),
    "unknown solver": (["solver=evodiff,evodif"], "solver='evodif' is not one of euler, heun"),
    "unknown schedule": (["schedule=karas"], "did you mean 'karras'?"),
    "impossible nfe": (["solver=heun", "nfe=5"], "'heun' cannot make exactly 5 denoiser calls"),
    "no valid setting": (["solver=heun", "nfe=3,5"], "no valid setting"),
    "bad nfe": (["nfe=ten"], "expected positive integers"),
    "schedule range": (["schedule_file={other_range}"], "was estimated on sigma in [0.01, 50.0]"),
    "missing schedule file": (["schedule_file={missing}"], "schedule_file"),
    "no stored schedule": (["ckpt={no_schedule}", "schedule=karras,rescaled_entropic"], "stores none"),
    "unknown key": (["sedes=0-7"], "unknown key sedes (did you mean 'seeds'?)"),
    "wrong type": (["batch=many"], "invalid value for batch"),
    "bad seeds": (["seeds=7-3"], "seeds='7-3'"),
    "repeated seeds": (["seeds=0-3,2"], "names some seeds twice"),
    "not key=value": (["nfe"], "must look like key=value"),
    "unknown score": (["score=fid"], "score='fid' is not one of"),
    "nothing to do": (["format=none"], "nothing to write or score"),
    "missing inception weights": (["score=fid_inception", "inception_weights={missing}"], "does not exist"),
    "stats of another feature": (["score=fid_inception", "stats={pixel_stats}"], "holds 'pixels' features"),
    "stats not ours": (["score=fd_pixels", "stats={corrupt}"], "corrupt.ckpt is not a statistics file of this package"),
    "stats not a torch file": (["score=fd_pixels", "stats={other_range}"], "(UnpicklingError in torch.load"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_any_output(case, digits_run, bad_files, tmp_path, capsys):
    args, message = BAD[case]
    ckpt = [] if case == "no ckpt" or any(a.startswith("ckpt=") for a in args) else [f"ckpt={digits_run}"]
    out = tmp_path / "out"
    assert _sample(*ckpt, *(a.format(**bad_files) for a in args), f"outdir={out}") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.ddp
@pytest.mark.parametrize("nproc,n", [(2, 21), (3, 2)])
def test_torchrun_matches_one_process(nproc, n, digits_run, stats_dir, tmp_path):
    args = [f"ckpt={digits_run}", f"seeds=0-{n - 1}", "nfe=4,5", "solver=dpmpp_2m", "schedule=logsnr",
            "score=fd_pixels", f"stats_dir={stats_dir}", "format=both", "batch=4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"]
    proc = subprocess.run([*torchrun, str(ROOT / "sample.py"), "progress=false", *args, f"outdir={tmp_path / 'many'}"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"{n} samples per setting") == 1
    assert _sample(*args, f"outdir={tmp_path / 'one'}") == 0
    for name in ("dpmpp_2m_logsnr_nfe4", "dpmpp_2m_logsnr_nfe5"):
        one, many = _npz(tmp_path / "one" / f"{name}.npz"), _npz(tmp_path / "many" / f"{name}.npz")
        assert np.array_equal(one["images"], many["images"]) and one["seeds"].tolist() == many["seeds"].tolist()
        assert len(list((tmp_path / "many" / name).glob("*.png"))) == n
    scores = [[float(r[f"fd_pixels_{n}"]) for r in _rows(tmp_path / d)] for d in ("one", "many")]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={tmp_path / 'nothing'}", "nfe=10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: checkpoint {tmp_path / 'nothing'} does not exist\n"


def test_help_lists_every_key_with_its_default(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for key, default in (("ckpt", "null"), ("ema", "true"), ("solver", "evodiff_consistent"), ("nfe", "10"),
                         ("per_folder", "0"), ("levels", "128"), ("pairs", "1024"), ("progress", "true")):
        assert f"\n  {key}={default}\n      " in text


def test_unwritable_outdir_stops_before_sampling(gmm_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert _sample(f"ckpt={gmm_run}", f"outdir={blocker / 'out'}", "solver=dpmpp_2m", "schedule=logsnr") == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: outdir {blocker / 'out'} is not writable")
    assert "samples per setting" not in captured.out  # nothing was sampled


def test_each_score_is_printed_before_the_files_are_written(gmm_run, tmp_path, capsys, monkeypatch):
    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("evodiff_pl.sampling.job.atomic_write_text", disk_full)
    with pytest.raises(OSError):
        _sample(f"ckpt={gmm_run}", f"outdir={tmp_path / 'out'}", "solver=dpmpp_2m", "schedule=logsnr", "seeds=0-7",
                "format=none", "score=fd_pixels", f"stats_dir={tmp_path / 'stats'}")
    assert re.search(r"^dpmpp_2m_logsnr_nfe10: fd_pixels_8 [0-9.]+ in", capsys.readouterr().out, re.M)
