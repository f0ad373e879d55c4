"""train.py's command line: `--help`, `--print-config` and the rerun of a finished run answer before Lightning and
the training code are imported (`evodiff_pl.training.run`, which `main` imports only to train)."""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evodiff_pl.config.schema import DEFAULT_CONFIG, ConfigError, load_config, to_dict, usage


def completed_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint of a run that already finished training and its final evaluation with this very config (no
    setting changed), so that rerunning it has nothing to do; None otherwise (also when the rules of
    `resume_checkpoint` refuse it: the training path reports that)."""
    from evodiff_pl.io.checkpointing import CheckpointError
    from evodiff_pl.training.resume_point import resume_checkpoint

    if cfg.run.resume == "never":
        return None
    try:
        point = resume_checkpoint(cfg.run.resume, Path(cfg.run.dir) / "checkpoints", to_dict(cfg))
    except CheckpointError:
        return None
    max_steps = math.ceil(cfg.train.total_images / cfg.data.batch_size)
    if point is None or point.changes or not point.meta.get("completed"):
        return None
    return point.path if int(point.meta["global_step"]) >= max_steps else None


def _train(cfg: DictConfig) -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from evodiff_pl.training.run import USER_ERRORS, _one_line, run
    from evodiff_pl.utils.stop import Stopped, finish

    try:
        run(cfg)
    except Stopped as stop:
        return finish(stop, rank_zero_only.rank)
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device writing {err.filename or 'a file'}: free space there or set "
              "run.dir to another disk, then rerun the same command to resume", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python train.py [--config FILE ...] [--print-config] [key=value ...]`; known errors print one line and return
    1, a pre-empted run (SIGUSR1, SIGTERM) returns 128 + the signal number after its checkpoint."""
    parser = argparse.ArgumentParser(description="Train an EDM diffusion model with a learned entropic-time schedule.",
                                     epilog=usage(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help=f"YAML config (default: {DEFAULT_CONFIG.name}); repeat it to layer several files in "
                             "order, each over the previous")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.devices=8 data.batch_size=64")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        done = completed_checkpoint(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    if done is not None:
        print(f"{done} is complete (training and final evaluation): nothing to do", flush=True)
        return 0
    return _train(cfg)
