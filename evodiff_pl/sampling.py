"""The body of `sample.py`: generate and score from a train.py checkpoint, sweep solver settings, estimate a schedule.

`main(argv)` parses `key=value` arguments into `SampleConfig`, `build` validates all of them (checkpoint,
solvers, schedules, NFE, schedule file, score and reference statistics) before any output is written, and
`run` generates through `evodiff_pl.generate.generate` (image j uses seed j, as in the validation
callback with base seed 0) and scores with `evodiff_pl.metrics.FrechetScore`; `estimate` runs the
dedicated entropic-time pass. Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) a gloo or NCCL process
group is initialised from the environment, seeds are dealt to ranks with `rank_indices` and every rank
takes part in the score and the estimation pass.

Outputs in `outdir` for each setting `<solver>_<schedule>_nfe<N>`: PNGs `<name>/[<folder>/]<seed:06d>.png`,
`<name>.npz` (`seeds` int64 and `images` uint8 (N, H, W, C), or `samples` float32 (N, D) for vector data),
and the table of all settings as `scores.csv` and `scores.md`.
"""

from __future__ import annotations

import ast
import csv
import inspect
import io
import itertools
import math
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from evodiff_pl.checkpointing import (
    CheckpointError, LoadedCheckpoint, atomic_write, atomic_write_text, load_denoiser, write_schedule,
)
from evodiff_pl.config import suggest
from evodiff_pl.data import DatasetNotFoundError, DiffusionDataModule, to_uint8
from evodiff_pl.entropic import EntropicSchedule, Samples, estimate_mmse
from evodiff_pl.generate import PROTOCOLS, EvalSpec, generate, needs_learned_schedule, rank_indices
from evodiff_pl.metrics import FrechetScore, InceptionFeatures
from evodiff_pl.nvlabs import read_mu_sigma_npz
from evodiff_pl.schedules import SCHEDULES
from evodiff_pl.solvers import SOLVERS
from evodiff_pl.training import build_data

SCORES = {"none": None, "fd_pixels": "pixels", "fid_inception": "inception"}
"""score= values and their feature extractors."""
FORMATS = ("auto", "png", "npz", "both", "none")
DEVICES = ("auto", "cpu", "cuda")
MAX_SCORED = 50_000
"""Default number of scored samples: one per reference sample, at most this many (FID-50k)."""


class SampleError(ValueError):
    """A sample.py argument is invalid or does not fit the checkpoint; the message names it."""


@dataclass
class SampleConfig:
    ckpt: Optional[str] = None
    """Required: a train.py run directory (its newest checkpoint), a .ckpt file or an NVlabs edm network pickle
    (.pkl: edm-*.pkl or network-snapshot-*.pkl; read without running its code)."""
    ema: bool = True
    """Sample the EMA weights; false: the raw trained weights."""
    solver: str = "evodiff"
    """Solver, or a comma-separated list for a sweep: euler, heun, dpmpp_2m, dpmpp_3m, evodiff."""
    schedule: str = "rescaled_entropic"
    """Schedule, or a comma-separated list: karras, logsnr, entropic, rescaled_entropic (the learned ones use
    the schedule stored in the checkpoint, or schedule_file)."""
    nfe: str = "10"
    """Denoiser calls per sample, or a comma-separated list (heun makes 2 per step: even values only)."""
    protocol: str = "default"
    """default, or edm: NVlabs edm's generate.py (final Euler step to sigma = 0 counted in nfe, float64 state
    around the float32 network, per-seed generators on the device): solver=heun schedule=karras nfe=35
    reproduces generate.py's images for the same seeds."""
    seeds: Optional[str] = None
    """Samples to make, e.g. 0-49999 or 0-7,100; image j uses seed j. Default: 0-63, or with a score one per
    reference sample (at most 50000)."""
    outdir: Optional[str] = None
    """Output folder; default <run dir>/samples."""
    format: str = "auto"
    """png, npz, both or none; auto: png for images, npz for vector data."""
    per_folder: int = 0
    """PNGs per subfolder (1000: <name>/000000/, <name>/001000/, ...); 0: all in <name>/."""
    batch: int = 256
    """Samples per denoiser call on each process (does not change any sample)."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    score: str = "none"
    """none, fd_pixels (Fréchet distance on pixels or raw vectors) or fid_inception (FID)."""
    stats: Optional[str] = None
    """Reference statistics file written by FrechetScore.prepare_real; default: the cached statistics of the
    checkpoint's dataset (computed and cached on first use)."""
    data: Optional[Dict[str, Any]] = None
    """The dataset, as train.py's data section (data.name=cifar10 data.root=... data.download=false), for a
    checkpoint that stores none (an NVlabs pickle): needed by estimate_schedule and by a score without stats."""
    stats_dir: Optional[str] = None
    """Cache of reference statistics; default $EVODIFF_STATS or ~/.cache/evodiff-pl/stats."""
    inception_weights: Optional[str] = None
    """Local InceptionV3 weights for fid_inception (needed offline); default: download once."""
    schedule_file: Optional[str] = None
    """Learned schedule JSON (schedule.json, or one written by estimate_schedule) instead of the stored one."""
    estimate_schedule: bool = False
    """Instead of sampling, run the dedicated entropic-time estimation pass and write
    <checkpoint stem>_schedule_estimated.json into outdir if given, else beside the checkpoint."""
    levels: int = 128
    """Estimation pass: noise levels K on the Karras grid."""
    pairs: int = 1024
    """Estimation pass: (training image, noise) pairs M per level."""
    progress: bool = True
    """Show progress bars (images/s)."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: inspect.cleandoc(b.value.value) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def usage() -> str:
    """The CLI reference: every key with its default and meaning."""
    docs = field_docs(SampleConfig)
    lines = ["usage: python sample.py ckpt=RUN_DIR_OR_FILE [key=value ...]", ""]
    for f in fields(SampleConfig):
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        lines.append(f"  {f.name}={default}")
        lines += [f"      {line}" for line in docs[f.name].splitlines()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> SampleConfig:
    """`key=value` arguments over the `SampleConfig` defaults; SampleError names an unknown key or a bad value."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SampleError(f"arguments must look like key=value (e.g. nfe=10), got {bad[0]!r}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SampleConfig), OmegaConf.from_dotlist(list(argv)))
    except ConfigKeyError as err:
        raise SampleError(f"unknown key {err.key}{suggest(str(err.key), [f.name for f in fields(SampleConfig)])}"
                          ) from None
    except OmegaConfBaseException as err:
        raise SampleError(f"invalid value for {err.full_key or err.key}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(cfg)


def parse_seeds(text: str) -> Tensor:
    """'0-7,12,20-23' -> int64 tensor in the given order; SampleError for bad syntax, negative or repeated seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise SampleError(f"seeds={text!r}: expected ranges and numbers >= 0 like 0-49999 or 0-7,12, got {part!r}")
        seeds.extend(range(int(lo), int(hi if sep else lo) + 1))
    if len(set(seeds)) != len(seeds):
        raise SampleError(f"seeds={text!r} names some seeds twice")
    return torch.tensor(seeds, dtype=torch.int64)


def check_choice(key: str, value: str, valid: Sequence[str]) -> None:
    """SampleError naming `key`, the valid values and the closest one, unless `value` is valid."""
    if value not in valid:
        hint = suggest(value, valid)
        raise SampleError(f"{key}={value!r} is not one of {', '.join(valid)}{hint if 'did you mean' in hint else ''}")


def _names(key: str, text: str, valid: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",")))
    for name in names:
        check_choice(key, name, valid)
    return names


def _nfes(text: str) -> list[int]:
    items = list(dict.fromkeys(s.strip() for s in text.split(",")))
    if not all(s.isdigit() and int(s) > 0 for s in items):
        raise SampleError(f"nfe={text!r}: expected positive integers, e.g. nfe=10 or nfe=5,10,20")
    return [int(s) for s in items]


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


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextmanager
def distributed(device: torch.device) -> Iterator[None]:
    """A process group from torchrun's environment when WORLD_SIZE > 1 (NCCL on CUDA, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def with_kind(schedule: EntropicSchedule, kind: str) -> EntropicSchedule:
    """The same learned curve as a schedule of `kind` (entropic or rescaled_entropic)."""
    return schedule if schedule.kind == kind else EntropicSchedule.from_dict({**schedule.to_dict(), "kind": kind})


def learned_schedule(cfg: SampleConfig, loaded: LoadedCheckpoint) -> EntropicSchedule | None:
    """`schedule_file` if given, else the checkpoint's schedule, checked against the checkpoint's sigma range."""
    if cfg.schedule_file is None:
        schedule = loaded.schedule
    elif not Path(cfg.schedule_file).is_file():
        raise SampleError(f"schedule_file {cfg.schedule_file} does not exist")
    else:
        try:
            schedule = EntropicSchedule.load(cfg.schedule_file)
        except ValueError as err:
            raise SampleError(f"schedule_file is not a schedule: {err}") from None
    if schedule is not None:
        try:
            schedule.check_sigma_range(loaded.meta["sigma_min"], loaded.meta["sigma_max"])
        except ValueError as err:
            source = cfg.schedule_file or f"the schedule stored in {loaded.path}"
            raise SampleError(f"{source} does not fit checkpoint {loaded.path}: {err}") from None
    return schedule


@dataclass
class Plan:
    """One row of the table: a setting to run (spec, sigmas) or the reason it cannot run."""

    solver: str
    schedule: str
    nfe: int
    spec: EvalSpec | None = None
    sigmas: Tensor | None = None
    reason: str = ""


def plan(solver: str, schedule: str, nfe: int, learned: EntropicSchedule | None, meta: dict[str, Any],
         protocol: str = "default") -> Plan:
    """The spec and sigma grid of one setting, or a Plan with the reason it is invalid."""
    try:
        spec = EvalSpec(solver, schedule, nfe, protocol)
        sched = with_kind(learned, schedule) if spec.needs_schedule else None
        return Plan(solver, schedule, nfe, spec, spec.sigmas(meta["sigma_min"], meta["sigma_max"], sched))
    except ValueError as err:
        return Plan(solver, schedule, nfe, reason=str(err))


def plans(cfg: SampleConfig, loaded: LoadedCheckpoint) -> list[Plan]:
    """Every solver x schedule x nfe; SampleError for an unknown name, a missing learned schedule, or when the
    only (or every) setting is invalid."""
    solvers = _names("solver", cfg.solver, list(SOLVERS))
    schedules = _names("schedule", cfg.schedule, list(SCHEDULES))
    nfes = _nfes(cfg.nfe)
    wanted = [s for s in schedules if needs_learned_schedule(s)]
    learned = learned_schedule(cfg, loaded) if wanted or cfg.schedule_file is not None else None
    if wanted and learned is None:
        raise SampleError(f"schedule={wanted[0]} needs a learned schedule but checkpoint {loaded.path} stores none "
                          "(trained too briefly?): pass schedule_file=... or make one with estimate_schedule=true")
    check_choice("protocol", cfg.protocol, PROTOCOLS)
    rows = [plan(*combo, learned, loaded.meta, cfg.protocol) for combo in itertools.product(solvers, schedules, nfes)]
    valid = [p for p in rows if p.spec is not None]
    if len(rows) == 1 and not valid:
        raise SampleError(rows[0].reason)
    if not valid:
        raise SampleError(f"no valid setting among solver={cfg.solver} schedule={cfg.schedule} nfe={cfg.nfe}: "
                          + "; ".join(p.reason for p in rows))
    return rows


def checkpoint_data(loaded: LoadedCheckpoint, data: dict[str, Any] | None = None) -> DiffusionDataModule:
    """The checkpoint's dataset, rebuilt from its stored training config, or from `data` (sample.py's data=)."""
    if data:
        return build_data(OmegaConf.create({"data": data, "run": {"seed": 0}}))
    if loaded.meta.get("config") is None:
        raise SampleError(f"{loaded.path} stores no dataset: give one as train.py's data section, e.g. "
                          "data.name=cifar10 data.root=/path data.download=false (or stats= for a score)")
    return build_data(OmegaConf.create(loaded.meta["config"]))


def reference_stats(path: str, feature: str) -> dict[str, Any]:
    """A statistics file of `FrechetScore.prepare_real`, checked to hold `feature` features; for fid_inception also
    an .npz of (mu, sigma) as edm's fid.py and pytorch-fid write (`evodiff_pl.nvlabs.read_mu_sigma_npz`)."""
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


def build_score(cfg: SampleConfig, loaded: LoadedCheckpoint, device: torch.device) -> tuple[FrechetScore | None, Tensor]:
    """The score with its reference statistics loaded (rank 0), and the seeds (by default one per reference
    sample, at most MAX_SCORED, when scoring; 0-63 otherwise)."""
    check_choice("score", cfg.score, list(SCORES))
    feature = SCORES[cfg.score]
    if feature is None:
        return None, parse_seeds("0-63" if cfg.seeds is None else cfg.seeds)
    shape = tuple(loaded.meta["sample_shape"])
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


def _formats(fmt: str, is_image: bool, scoring: bool) -> tuple[str, ...]:
    check_choice("format", fmt, FORMATS)
    if fmt == "auto":
        fmt = "png" if is_image else "npz"
    if fmt in ("png", "both") and not is_image:
        raise SampleError(f"format={fmt} writes images but the checkpoint makes vectors: use format=npz")
    if fmt == "none" and not scoring:
        raise SampleError("format=none with score=none: nothing to write or score")
    return {"png": ("png",), "npz": ("npz",), "both": ("png", "npz"), "none": ()}[fmt]


def default_outdir(ckpt: Path) -> Path:
    """<run dir>/samples for <run dir>/checkpoints/<file>.ckpt, else samples/ beside the file."""
    folder = ckpt.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "samples"


def build(cfg: SampleConfig) -> SamplingJob:
    """Check every argument against the checkpoint and prepare the score; writes no output (the reference
    statistics cache aside)."""
    if cfg.ckpt is None:
        raise SampleError("ckpt= is required: a train.py run directory or a .ckpt file")
    for key, low in (("batch", 1), ("per_folder", 0), ("levels", 2), ("pairs", 1)):
        if getattr(cfg, key) < low:
            raise SampleError(f"{key}={getattr(cfg, key)} must be >= {low}")
    device = resolve_device(cfg.device)
    loaded = load_denoiser(cfg.ckpt, ema=cfg.ema, map_location=device)
    if cfg.estimate_schedule:
        return SamplingJob(cfg, loaded, device)
    rows = plans(cfg, loaded)
    is_image = len(loaded.meta["sample_shape"]) == 3
    formats = _formats(cfg.format, is_image, cfg.score != "none")
    score, seeds = build_score(cfg, loaded, device)
    outdir = Path(cfg.outdir) if cfg.outdir is not None else default_outdir(loaded.path)
    return SamplingJob(cfg, loaded, device, rows, seeds, score, outdir, formats)


def png_path(folder: Path, seed: int, per_folder: int) -> Path:
    """<folder>/[<first seed of its subfolder:06d>/]<seed:06d>.png."""
    return (folder / f"{seed // per_folder * per_folder:06d}" if per_folder else folder) / f"{seed:06d}.png"


def write_pngs(images: Tensor, seeds: Tensor, folder: Path, per_folder: int) -> None:
    """uint8 images (N, C, H, W), one PNG per seed (grey or RGB)."""
    for img, seed in zip(images.permute(0, 2, 3, 1).numpy(), seeds.tolist()):
        path = png_path(folder, seed, per_folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)


def write_npz(path: Path, seeds: Tensor, samples: Tensor) -> None:
    """Atomically: seeds, and images uint8 (N, H, W, C) or samples float32 (N, D), in seed order of `seeds`."""
    arrays = {"seeds": seeds.numpy()}
    if samples.dtype == torch.uint8:
        arrays["images"] = samples.permute(0, 2, 3, 1).numpy()
    else:
        arrays["samples"] = samples.numpy()
    atomic_write(path, lambda f: np.savez(f, **arrays))


def gather_rows(seeds: Tensor, samples: Tensor, order: Tensor) -> tuple[Tensor, Tensor] | None:
    """All ranks' (seeds, samples) on rank 0 in the order of `order` (the full seed list); None on other ranks."""
    rank, world_size = world()
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object((seeds, samples), parts, dst=0)
        if rank != 0:
            return None
        seeds, samples = (torch.cat(t) for t in zip(*parts))
    position = {s: i for i, s in enumerate(seeds.tolist())}
    take = torch.tensor([position[s] for s in order.tolist()], dtype=torch.int64)
    return seeds[take], samples[take]


@dataclass
class Result:
    """One row of the output table."""

    plan: Plan
    value: float | None = None
    seconds: float = 0.0


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
            if job.score is not None:
                job.score.update(x)
            out = to_uint8(x).cpu() if len(shape) == 3 else x.float().cpu()
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


def table(results: Sequence[Result], score_name: str | None, n: int) -> list[dict[str, str]]:
    """The rows of the output table as strings: solver, schedule, nfe, steps, score, seconds, img/s, note."""
    rows = []
    for r in results:
        p = r.plan
        ok = p.spec is not None
        rows.append({
            "solver": p.solver, "schedule": p.schedule, "nfe": str(p.nfe),
            "steps": str(p.spec.n_steps) if ok else "-",
            score_name or "score": f"{r.value:.6g}" if r.value is not None else "-",
            "seconds": f"{r.seconds:.2f}" if ok else "-",
            "img/s": f"{n / r.seconds:.1f}" if ok and r.seconds > 0 else "-",
            "note": "" if ok else f"skipped: {p.reason}",
        })
    return rows


def to_markdown(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]) + "\n"


def to_csv(rows: Sequence[dict[str, str]]) -> str:
    """The table as CSV with a header line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run(job: SamplingJob) -> list[dict[str, str]]:
    """Every setting in turn; rank 0 prints the table and writes scores.csv and scores.md. Returns the rows."""
    results = [run_plan(job, p) if p.spec is not None else Result(p) for p in job.plans]
    rows = table(results, job.score.name if job.score is not None else None, len(job.seeds))
    if world()[0] == 0:
        text = to_markdown(rows)
        atomic_write_text(job.outdir / "scores.md", text)
        atomic_write_text(job.outdir / "scores.csv", to_csv(rows))
        print(f"{len(job.seeds)} samples per setting from {job.loaded.path} -> {job.outdir}\n{text}", flush=True)
    return rows


def training_samples(data: DiffusionDataModule, labels: bool = False) -> Callable[[int, torch.Generator], Samples]:
    """A sampler `draw(n, generator)` of un-augmented training samples (float, images in [-1, 1]) for
    `estimate_mmse`: a random permutation of the dataset, repeated if n exceeds it; with `labels`, (samples,
    their class labels) for a class-conditional denoiser."""
    view = data.view()

    def draw(n: int, generator: torch.Generator) -> Samples:
        order = torch.randperm(len(view), generator=generator).repeat(math.ceil(n / len(view)))[:n]
        items = [view[i] for i in order.tolist()]
        x = torch.stack([item[0] for item in items])
        return (x, torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)) if labels else x

    return draw


def estimated_schedule_path(ckpt: Path, outdir: str | None = None) -> Path:
    """<outdir or the checkpoint's folder>/<checkpoint stem>_schedule_estimated.json."""
    name = f"{ckpt.stem}_schedule_estimated.json"
    return Path(outdir) / name if outdir is not None else ckpt.with_name(name)


def estimate(job: SamplingJob) -> Path:
    """The dedicated estimation pass (levels x pairs, over all ranks) on the checkpoint's denoiser and dataset;
    rank 0 writes the schedule atomically into outdir, or beside the checkpoint. Returns its path."""
    cfg, loaded, meta = job.cfg, job.loaded, job.loaded.meta
    sigmas, mmse = estimate_mmse(
        loaded.denoiser, training_samples(checkpoint_data(loaded, cfg.data), labels=bool(meta["num_classes"])),
        n_levels=cfg.levels, n_pairs=cfg.pairs,
        sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"], batch_size=cfg.batch, device=job.device,
        progress=cfg.progress,
    )
    source = {"checkpoint": str(loaded.path), "global_step": meta.get("global_step"), "ema": cfg.ema,
              "n_pairs": cfg.pairs}
    kind = meta["config"]["entropic"]["kind"] if meta.get("config") else "rescaled_entropic"
    schedule = EntropicSchedule.from_mmse(sigmas, mmse, kind=kind,
                                          dim=math.prod(meta["sample_shape"]), sigma_data=meta["sigma_data"],
                                          source=source)
    path = estimated_schedule_path(loaded.path, cfg.outdir)
    if world()[0] == 0:
        write_schedule(schedule, path)
        print(f"estimated {schedule.kind} schedule ({cfg.levels} levels x {cfg.pairs} pairs) -> {path}", flush=True)
    return path


USER_ERRORS = (SampleError, CheckpointError, DatasetNotFoundError)
"""Errors reported as one line (no traceback) by `main`."""


def main(argv: Sequence[str] | None = None) -> int:
    """`python sample.py key=value ...` (see `usage()`); known errors print one line and return 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = parse_args(argv)
        with distributed(resolve_device(cfg.device)):
            job = build(cfg)
            if cfg.estimate_schedule:
                estimate(job)
            else:
                run(job)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
