"""A validated sample.py invocation (`build`) and running it (`run`): generate every planned setting and score it.

`build` checks every argument against the checkpoint (solvers, schedules, NFE, schedule file, score and
reference statistics) before any output is written; `run` generates through `evodiff_pl.sampling.generate.generate`
(image j uses seed j, as in the validation callback with base seed 0) and scores with
`evodiff_pl.evaluation.metrics.FrechetScore`, every rank taking part, seeds dealt to ranks with `rank_indices`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from evodiff_pl.io.checkpointing import LoadedCheckpoint
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.data.datasets import DatasetNotFoundError, build_from_config
from evodiff_pl.data.stream import DiffusionDataModule
from evodiff_pl.utils.dist import world
from evodiff_pl.utils.fileio import atomic_write_text
from evodiff_pl.sampling.generate import generate, rank_indices
from evodiff_pl.utils.images import from_uint8, to_uint8, write_pngs
from evodiff_pl.evaluation.metrics import FrechetScore, InceptionFeatures
from evodiff_pl.io.nvlabs import StabilityVAEDecoder, VAEError, read_mu_sigma_npz
from evodiff_pl.sampling.options import (
    DEVICES, MAX_SCORED, SCORES, SampleConfig, SampleError, check_choice, parse_seeds,
)
from evodiff_pl.sampling.outputs import (
    Result, check_writable, default_outdir, gather_rows, output_formats, table, to_csv, to_markdown, write_npz,
)
from evodiff_pl.sampling.plan import Plan, plans
from evodiff_pl.sampling.tune import tuned_grids


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda; under torchrun cuda means cuda:LOCAL_RANK."""
    check_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise SampleError("device=cuda but no CUDA device is available (use device=cpu or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def checkpoint_data(loaded: LoadedCheckpoint, data: dict[str, Any] | None = None) -> DiffusionDataModule:
    """The checkpoint's dataset, rebuilt from its stored training config, or from `data` (sample.py's data=)."""
    if data:
        return build_from_config(data, 0)
    config = loaded.meta.get("config")
    if config is None:
        raise SampleError(f"{loaded.path} stores no dataset: give one as train.py's data section, e.g. "
                          "data.name=cifar10 data.root=/path data.download=false (or stats= for a score)")
    return build_from_config(config["data"], config["run"]["seed"])


def reference_stats(path: str, feature: str) -> dict[str, Any]:
    """A statistics file of `FrechetScore.prepare_real`, checked to hold `feature` features; for fid_inception also
    an .npz of (mu, sigma) as edm's fid.py and pytorch-fid write (`evodiff_pl.io.nvlabs.read_mu_sigma_npz`)."""
    if not Path(path).is_file():
        raise SampleError(f"stats file {path} does not exist")
    if path.endswith(".npz") and feature == "inception":
        try:
            return read_mu_sigma_npz(path, InceptionFeatures.num_features)
        except ValueError as err:
            raise SampleError(f"score=fid_inception: {err} (InceptionV3 pool features)") from None
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SampleError(f"stats file {path} is unreadable: {type(err).__name__}: {err}") from None
    if not isinstance(stats, dict) or not {"sum", "outer_sum", "count"} <= set(stats):
        raise SampleError(f"stats file {path} holds no reference statistics (sum, outer_sum, count)")
    if stats.get("feature") != feature:
        raise SampleError(f"stats file {path} holds {stats.get('feature')!r} features, not {feature!r}")
    return stats


def build_decoder(cfg: SampleConfig, loaded: LoadedCheckpoint, device: torch.device) -> StabilityVAEDecoder | None:
    """The VAE decoder of a latent EDM2 pickle (from `vae=`), None for a model of pixels."""
    latent = loaded.meta.get("latent")
    if latent is None:
        return None
    if cfg.vae is None:
        raise SampleError(f"{loaded.path} is a latent EDM2 model ({latent['vae_name']} latents): pass vae=PATH, a "
                          "local folder of that diffusers AutoencoderKL, to decode its samples")
    try:
        return StabilityVAEDecoder.load(latent, cfg.vae, device)
    except VAEError as err:
        raise SampleError(f"vae={cfg.vae}: {err}") from None


def build_score(cfg: SampleConfig, loaded: LoadedCheckpoint, device: torch.device,
                shape: tuple[int, ...]) -> tuple[FrechetScore | None, Tensor]:
    """The score of samples of `shape` with its reference statistics loaded (rank 0), and the seeds (by default
    one per reference sample, at most MAX_SCORED, when scoring; 0-63 otherwise)."""
    check_choice("score", cfg.score, list(SCORES))
    feature = SCORES[cfg.score]
    if feature is None:
        return None, parse_seeds("0-63" if cfg.seeds is None else cfg.seeds)
    if feature == "inception" and len(shape) != 3:
        raise SampleError(f"score=fid_inception needs images; checkpoint {loaded.path} makes vectors of shape "
                          f"{shape} (use score=fd_pixels)")
    stats = reference_stats(cfg.stats, feature) if cfg.stats is not None else None
    data = None if stats is not None else checkpoint_data(loaded, cfg.data)
    if cfg.seeds is not None:
        seeds = parse_seeds(cfg.seeds)
    else:
        available = int(stats["count"]) if stats is not None else len(data.data)
        seeds = parse_seeds(f"0-{min(available, MAX_SCORED) - 1}")
    rank = world()[0]
    try:
        score = FrechetScore(feature, num_samples=len(seeds), shape=shape, weights_path=cfg.inception_weights,
                             stats_dir=cfg.stats_dir).to(device)
        if stats is not None:
            score.load_real(stats, rank=rank)
        else:
            score.prepare_real(data, rank=rank)
    except DatasetNotFoundError:
        raise
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise SampleError(f"score={cfg.score}: {err}") from None
    return score, seeds


@dataclass
class SamplingJob:
    """A validated sample.py invocation: everything `run` or `estimate` needs."""

    cfg: SampleConfig
    loaded: LoadedCheckpoint
    device: torch.device
    plans: list[Plan] = field(default_factory=list)
    seeds: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    score: FrechetScore | None = None
    outdir: Path | None = None
    formats: tuple[str, ...] = ()
    """The outputs to write: a subset of (png, npz)."""
    decoder: StabilityVAEDecoder | None = None
    """Latent models: turns the generated latents into uint8 images."""


def build(cfg: SampleConfig) -> SamplingJob:
    """Check every argument against the checkpoint and prepare the score; creates the output folder (and checks
    that it is writable) only when everything else is valid, and writes nothing else (the reference statistics
    cache aside)."""
    if cfg.ckpt is None:
        raise SampleError("ckpt= is required: a train.py run directory or a .ckpt file")
    for key, low in (("batch", 1), ("per_folder", 0), ("levels", 2), ("pairs", 1)):
        if getattr(cfg, key) < low:
            raise SampleError(f"{key}={getattr(cfg, key)} must be >= {low}")
    device = resolve_device(cfg.device)
    loaded = load_denoiser(cfg.ckpt, ema=cfg.ema, map_location=device)
    if cfg.estimate_schedule:
        if loaded.meta.get("latent") is not None:
            raise SampleError(f"estimate_schedule=true on {loaded.path}: a latent EDM2 model needs its data as "
                              "latents, which sample.py does not make")
        return SamplingJob(cfg, loaded, device)
    decoder = build_decoder(cfg, loaded, device)
    rows = plans(cfg, loaded, tuned_grids(cfg, loaded, device))
    shape = tuple(loaded.meta["sample_shape"])
    shape = decoder.image_shape(shape) if decoder is not None else shape
    formats = output_formats(cfg.format, len(shape) == 3, cfg.score != "none")
    score, seeds = build_score(cfg, loaded, device, shape)
    outdir = Path(cfg.outdir) if cfg.outdir is not None else default_outdir(loaded.path)
    if world()[0] == 0:
        check_writable(outdir)
    return SamplingJob(cfg, loaded, device, rows, seeds, score, outdir, formats, decoder)


def run_plan(job: SamplingJob, p: Plan) -> Result:
    """Generate this rank's share of the seeds for one setting, write it and return the score (all ranks)."""
    cfg, meta = job.cfg, job.loaded.meta
    rank, world_size = world()
    share = job.seeds[rank_indices(len(job.seeds), rank, world_size)]
    shape = tuple(meta["sample_shape"])
    folder = job.outdir / p.spec.name
    start = time.perf_counter()
    kept = []
    if job.score is not None:
        job.score.reset()
    with tqdm(total=len(share), unit="img", desc=p.spec.name, disable=not cfg.progress or rank != 0) as bar:
        for chunk in share.split(cfg.batch):  # an empty share is one empty chunk: every rank updates the score
            x = generate(job.loaded.denoiser, chunk, shape, solver=p.spec.solver, sigmas=p.sigmas, seed=0,
                         batch_size=cfg.batch, num_classes=meta["num_classes"], device=job.device,
                         **p.spec.generate_options)
            if job.decoder is not None:  # latents -> uint8 pixels, scored as [-1, 1] images
                x = from_uint8(job.decoder.decode(x))
            if job.score is not None:
                job.score.update(x)
            out = to_uint8(x).cpu() if x.ndim == 4 else x.float().cpu()
            if "png" in job.formats:
                write_pngs(out, chunk, folder, cfg.per_folder)
            if "npz" in job.formats:
                kept.append(out)
            bar.update(len(chunk))
    if "npz" in job.formats:
        gathered = gather_rows(share, torch.cat(kept), job.seeds)
        if gathered is not None:
            write_npz(job.outdir / f"{p.spec.name}.npz", *gathered)
    value = job.score.compute() if job.score is not None else None
    return Result(p, value, time.perf_counter() - start)


def run(job: SamplingJob) -> list[dict[str, str]]:
    """Every setting in turn; rank 0 prints the table, then writes scores.csv and scores.md. Returns the rows."""
    results = [run_plan(job, p) if p.spec is not None else Result(p) for p in job.plans]
    rows = table(results, job.score.name if job.score is not None else None, len(job.seeds))
    if world()[0] == 0:
        text = to_markdown(rows)
        print(f"{len(job.seeds)} samples per setting from {job.loaded.path} -> {job.outdir}\n{text}", flush=True)
        atomic_write_text(job.outdir / "scores.md", text)
        atomic_write_text(job.outdir / "scores.csv", to_csv(rows))
    return rows
