"""`python -m evodiff_pl.io.export SRC DST [--raw]` (console script `evodiff-export`): a sampling-only copy of a
train.py checkpoint (`evodiff_pl.io.checkpointing.export_weights`), about a quarter of its size."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    p = argparse.ArgumentParser(prog="evodiff-export", description="Write a sampling-only copy of a train.py "
                                "checkpoint: the EMA (or raw) weights and the metadata, no optimizer state.")
    p.add_argument("src", help="a train.py checkpoint file, or its run directory (its newest checkpoint)")
    p.add_argument("dst", help="the file to write (`sample.py ckpt=DST` reads it; it cannot resume training)")
    p.add_argument("--raw", action="store_true", help="keep the raw trained weights instead of the EMA")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the copy and print its path; a bad source prints one line and returns 1."""
    args = parser().parse_args(argv)
    from evodiff_pl.io.checkpointing import CheckpointError, export_weights

    try:
        dst = export_weights(args.src, args.dst, ema=not args.raw)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {dst} ({'raw' if args.raw else 'EMA'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
