"""Deprecated path of `evodiff_pl.schedules.entropic` (and `.tracker`)."""

from evodiff_pl._moved import alias

alias(__name__, "evodiff_pl.schedules.entropic")
