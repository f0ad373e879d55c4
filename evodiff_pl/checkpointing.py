"""Deprecated path of `evodiff_pl.io.checkpointing`."""

from evodiff_pl._moved import alias

alias(__name__, "evodiff_pl.io.checkpointing")
