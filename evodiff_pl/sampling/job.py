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

from evodiff_pl.io.checkpointing import LoadedCheckpoint
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.data.datasets import DatasetNotFoundError, build_from_config
from evodiff_pl.data.stream import DiffusionDataModule
from evodiff_pl.utils.dist import all_reduce, world
from evodiff_pl.utils.fileio import atomic_write_text
from evodiff_pl.utils.downloads import is_url
from evodiff_pl.utils.stop import stoppable
from evodiff_pl.sampling.generate import generate, rank_indices
from evodiff_pl.sampling.guidance import guide_of, guided
from evodiff_pl.utils.images import from_uint8, to_uint8, write_pngs
from evodiff_pl.evaluation.dinov2 import DINOv2Features
from evodiff_pl.evaluation.kid import KIDScore
from evodiff_pl.evaluation.metrics import FrechetScore, InceptionFeatures
from evodiff_pl.io.nvlabs import StabilityVAEDecoder, VAEError, read_mu_sigma_npz
from evodiff_pl.sampling.options import (
    DEVICES, MAX_SCORED, SCORES, SampleConfig, SampleError, check_choice, parse_seeds,
)
from evodiff_pl.sampling.outputs import (
    Result, check_writable, default_outdir, gather_rows, output_formats, table, to_csv, to_markdown, write_npz,
)
from evodiff_pl.sampling.plan import Plan, plans
from evodiff_pl.sampling.sweep import KEY, Progress, scored_rows, setting_key, weights_key
from evodiff_pl.sampling.tune import check_tuning, tuned_grids


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


NPZ_FEATURES = {"inception": InceptionFeatures.num_features, "dinov2": DINOv2Features.num_features}
"""Features whose reference statistics may be an edm-style .npz (mu, sigma), and their width."""


def reference_stats(path: str, feature: str, kid: bool = False) -> dict[str, Any]:
    """A statistics file of `FrechetScore.prepare_real` (`KIDScore.prepare_real` if `kid`), checked to hold `feature`
    features; for Inception and DINOv2 Fréchet distances also an .npz of (mu, sigma) as edm's fid.py, pytorch-fid
    and `evodiff_pl.evaluation.fid` write (`evodiff_pl.io.nvlabs.read_mu_sigma_npz`)."""
    if not Path(path).is_file():
        raise SampleError(f"stats file {path} does not exist")
    if path.endswith(".npz") and feature in NPZ_FEATURES and not kid:
        try:
            return read_mu_sigma_npz(path, NPZ_FEATURES[feature])
        except ValueError as err:
            raise SampleError(f"score with {feature} features: {err}") from None
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's message advises weights_only=False over several lines: not for a stats file
        raise SampleError(f"stats file {path} is not a statistics file of this package ({type(err).__name__} in "
                          "torch.load(weights_only=True)): pass one that sample.py or train.py wrote (stats_dir), or "
                          "an .npz of mu and sigma for inception/dinov2 scores") from None
    keys = {"features"} if kid else {"sum", "outer_sum", "count"}
    if not isinstance(stats, dict) or not keys <= set(stats):
        raise SampleError(f"stats file {path} holds no reference statistics ({', '.join(sorted(keys))})")
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
    if feature != "pixels" and len(shape) != 3:
        raise SampleError(f"score={cfg.score} needs images; checkpoint {loaded.path} makes vectors of shape "
                          f"{shape} (use score=fd_pixels)")
    kid = cfg.score.startswith("kid_")
    stats = reference_stats(cfg.stats, feature, kid) if cfg.stats is not None else None
    data = None if stats is not None else checkpoint_data(loaded, cfg.data)
    if cfg.seeds is not None:
        seeds = parse_seeds(cfg.seeds)
    else:
        available = (len(stats["features"]) if kid else int(stats["count"])) if stats is not None else len(data.data)
        seeds = parse_seeds(f"0-{min(available, MAX_SCORED) - 1}")
    rank = world()[0]
    try:
        weights = cfg.dinov2_weights if feature == "dinov2" else cfg.inception_weights
        score = (KIDScore if kid else FrechetScore)(feature, num_samples=len(seeds), shape=shape, weights_path=weights,
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


def build_gnet(cfg: SampleConfig, loaded: LoadedCheckpoint, device: torch.device) -> LoadedCheckpoint | None:
    """The guiding network of gnet= (EMA weights), checked against the network together with class= and guidance=."""
    if cfg.gnet is not None and cfg.guidance == 1:
        raise SampleError(f"gnet={cfg.gnet} is given but guidance=1 (no guidance): set guidance=W, e.g. guidance=1.5")
    classes = loaded.meta["num_classes"]
    if cfg.class_label is not None and not 0 <= cfg.class_label < classes:
        raise SampleError(f"class={cfg.class_label}: {loaded.path} is unconditional" if not classes else
                          f"class={cfg.class_label} is not a class of {loaded.path} (0-{classes - 1})")
    gnet = load_denoiser(cfg.gnet, map_location=device) if cfg.gnet is not None else None
    for key in ("sample_shape", "latent"):
        if gnet is not None and gnet.meta.get(key) != loaded.meta.get(key):
            raise SampleError(f"gnet={cfg.gnet} has {key} {gnet.meta.get(key)}, the network {loaded.meta.get(key)}")
    try:
        guided(loaded.denoiser, cfg.guidance, classes, *guide_of(gnet))
    except ValueError as err:
        raise SampleError(str(err)) from None
    return gnet


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
    gnet: LoadedCheckpoint | None = None
    """The guiding network of gnet= (guidance != 1)."""


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
    gnet = build_gnet(cfg, loaded, device)
    shape = tuple(loaded.meta["sample_shape"])
    shape = decoder.image_shape(shape) if decoder is not None else shape
    formats = output_formats(cfg.format, len(shape) == 3, cfg.score != "none")
    tune = check_tuning(cfg)  # before the reference statistics, which may take minutes
    score, seeds = build_score(cfg, loaded, device, shape)
    rows = plans(cfg, loaded, tuned_grids(cfg, loaded, device, score if decoder is None else None) if tune else None)
    outdir = Path(cfg.outdir) if cfg.outdir is not None else default_outdir(loaded.path, is_url(cfg.ckpt))
    if world()[0] == 0:
        check_writable(outdir)
    return SamplingJob(cfg, loaded, device, rows, seeds, score, outdir, formats, decoder, gnet)


def run_plan(job: SamplingJob, p: Plan) -> Result:
    """Generate this rank's share of the seeds for one setting, write it and return the score (all ranks); a stop
    signal raises `evodiff_pl.utils.stop.Stopped` between batches, before the setting's npz or score is written."""
    cfg, meta = job.cfg, job.loaded.meta
    rank, world_size = world()
    share = job.seeds[rank_indices(len(job.seeds), rank, world_size)]
    shape = tuple(meta["sample_shape"])
    folder = job.outdir / p.spec.name
    denoiser = guided(job.loaded.denoiser, p.spec.guidance, meta["num_classes"], *guide_of(job.gnet))
    start = time.perf_counter()
    kept = []
    if job.score is not None:
        job.score.reset()
    bar = Progress(len(share), p.spec.name, cfg.progress and rank == 0)
    try:
        # an empty share is one empty chunk: every rank updates the score; a stop signal is acted on between chunks
        for chunk in stoppable(share.split(cfg.batch), f"setting {p.spec.name}"):
            x = generate(denoiser, chunk, shape, solver=p.spec.solver, sigmas=p.sigmas, seed=0,
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
    finally:
        bar.close()
    if "npz" in job.formats:
        gathered = gather_rows(share, torch.cat(kept), job.seeds)
        if gathered is not None:
            write_npz(job.outdir / f"{p.spec.name}.npz", *gathered)
    value = job.score.compute() if job.score is not None else None
    return Result(p, value, time.perf_counter() - start)


def _already_scored(key: str, previous: dict[str, dict[str, str]]) -> bool:
    """Rank 0's answer (from scores.csv), the same on every rank."""
    found = torch.tensor(float(world()[0] == 0 and key in previous))
    return bool(all_reduce(found) > 0) if world()[1] > 1 else bool(found)


def _shown(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without their key (scores.md and the printed table)."""
    return [{k: v for k, v in r.items() if k != KEY} for r in rows]


def run(job: SamplingJob) -> list[dict[str, str]]:
    """Every setting in turn; after each, rank 0 rewrites scores.csv and scores.md (atomically) with the rows so far.
    A setting whose score scores.csv already holds for the same weights, seeds, reference statistics and sigma grid
    (`evodiff_pl.sampling.sweep`) is not run again. Rank 0 prints the table at the end. Returns the rows."""
    cfg, rank = job.cfg, world()[0]
    name = job.score.name if job.score is not None else None
    csv_path = job.outdir / "scores.csv"
    previous = scored_rows(csv_path) if rank == 0 else {}
    weights = weights_key(job.loaded, cfg.ema)
    reference = job.score.reference_statistics() if job.score is not None else None
    rows: list[dict[str, str]] = []
    for p in job.plans:
        key = "" if p.spec is None else setting_key(weights, job.seeds, cfg.score, reference, p.spec.name,
                                                    {**p.spec.generate_options, "vae": cfg.vae}, p.sigmas)
        if p.spec is not None and _already_scored(key, previous):
            row = _shown([previous.get(key, {})])[0]
            if rank == 0:
                print(f"{p.spec.name}: skipped, {csv_path} already holds its score for this checkpoint, seeds and "
                      "reference statistics", flush=True)
        else:
            row = table([run_plan(job, p) if p.spec is not None else Result(p)], name, len(job.seeds))[0]
            if rank == 0 and p.spec is not None:
                print(f"{p.spec.name}: {name or 'done'} {row[name or 'score']} in {row['seconds']} s", flush=True)
        rows.append({**row, KEY: key})
        if rank == 0:
            atomic_write_text(job.outdir / "scores.md", to_markdown(_shown(rows)))
            atomic_write_text(csv_path, to_csv(rows))
    if rank == 0:
        print(f"{len(job.seeds)} samples per setting from {job.loaded.path} -> {job.outdir}\n"
              f"{to_markdown(_shown(rows))}", flush=True)
    return _shown(rows)
