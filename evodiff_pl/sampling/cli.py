"""The body of `sample.py`: generate and score from a checkpoint, sweep solver settings, estimate a schedule.

`main(argv)` parses `key=value` arguments into `SampleConfig` (`options`), `job.build` validates all of them
against the checkpoint (`plan` lays out the solver x schedule x NFE sweep) before any output is written,
`job.run` generates and scores every setting and writes the outputs (`outputs`), and `estimate.estimate`
runs the dedicated entropic-time pass instead. Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) a gloo
or NCCL process group is initialised from the environment and every rank takes part.

Outputs in `outdir` for each setting `<solver>_<schedule>_nfe<N>`: PNGs `<name>/[<folder>/]<seed:06d>.png`,
`<name>.npz` (`seeds` int64 and `images` uint8 (N, H, W, C), or `samples` float32 (N, D) for vector data),
and the table of all settings as `scores.csv` and `scores.md`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from evodiff_pl.utils.stop import STOP, Stopped, finish, raise_if_stopped
from evodiff_pl.sampling.options import SampleConfig, SampleError, parse_args, usage

_LAZY = {"SamplingJob": "job", "build": "job", "checkpoint_data": "job", "run": "job", "run_plan": "job",
         "estimate": "estimate", "estimated_schedule_path": "estimate", "training_samples": "estimate"}
"""Names re-exported from the modules that import the networks and metrics, loaded on first use (fast --help)."""

__all__ = ["SampleConfig", "SampleError", "main", "parse_args", "usage", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"evodiff_pl.sampling.{_LAZY[name]}"), name)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors reported as one line (no traceback) by `main`."""
    from evodiff_pl.data.image_files import DatasetNotFoundError
    from evodiff_pl.evaluation.metrics import InceptionWeightsError
    from evodiff_pl.io.checkpointing import CheckpointError
    return SampleError, CheckpointError, DatasetNotFoundError, InceptionWeightsError


def main(argv: Sequence[str] | None = None) -> int:
    """`python sample.py key=value ...` (see `usage()`); known errors print one line and return 1; a stop signal
    (SIGUSR1, SIGTERM) stops every rank between batches and returns 128 + the signal number (SIGUSR1 under SLURM
    requeues the job), writing nothing for the setting it interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    errors = user_errors()
    from evodiff_pl.sampling.estimate import estimate
    from evodiff_pl.sampling.job import build, resolve_device, run
    from evodiff_pl.utils.dist import process_group, world
    STOP.install()
    try:
        cfg = parse_args(argv)
        with process_group(resolve_device(cfg.device)):
            try:
                job = build(cfg)
                raise_if_stopped("set-up")
                if cfg.estimate_schedule:
                    estimate(job)
                else:
                    run(job)
            except Stopped as stop:
                return finish(stop, world()[0])
    except errors as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        STOP.uninstall()
    return 0
