"""Deprecated path of `evodiff_pl.training.phema` (`python -m evodiff_pl.phema` still runs its command)."""

import sys

from evodiff_pl._moved import alias

if __name__ == "__main__":
    from evodiff_pl.training.phema import main

    sys.exit(main())
alias(__name__, "evodiff_pl.training.phema")
