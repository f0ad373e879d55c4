"""evodiff-pl: EDM training with learned entropic-time schedules and the EVODiff sampler."""

__version__ = "0.1.0"
