"""sample.py's outputs: the output folder and formats, NPZ files gathered over ranks, and the table of scores."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from evodiff_pl.utils.dist import world
from evodiff_pl.utils.fileio import atomic_write
from evodiff_pl.sampling.options import FORMATS, SampleError, check_choice
from evodiff_pl.sampling.plan import Plan


def output_formats(fmt: str, is_image: bool, scoring: bool) -> tuple[str, ...]:
    check_choice("format", fmt, FORMATS)
    if fmt == "auto":
        fmt = "png" if is_image else "npz"
    if fmt in ("png", "both") and not is_image:
        raise SampleError(f"format={fmt} writes images but the checkpoint makes vectors: use format=npz")
    if fmt == "none" and not scoring:
        raise SampleError("format=none with score=none: nothing to write or score")
    return {"png": ("png",), "npz": ("npz",), "both": ("png", "npz"), "none": ()}[fmt]


def check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file in it; SampleError naming it if that fails (before any sampling)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SampleError(f"outdir {folder} is not writable ({err.strerror or err}): choose another outdir=") from None


def default_outdir(ckpt: Path, downloaded: bool = False) -> Path:
    """<run dir>/samples for <run dir>/checkpoints/<file>.ckpt, samples/<file name> in the working folder for a file
    downloaded from a URL, else samples/ beside the file."""
    if downloaded:
        return Path("samples") / ckpt.stem
    folder = ckpt.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "samples"


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
