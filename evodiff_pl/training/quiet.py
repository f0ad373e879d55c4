"""Lightning's and torch's noise kept out of the training log (our own progress lines and scores untouched): the
"💡 Tip" adverts for Lightning's cloud products, torch's FutureWarning about the `LeafSpec` that Lightning's
`_pytree` still constructs, and the advice to `sync_dist=True` for epoch-level values, which our metrics
already reduce over the ranks themselves (`evodiff_pl.utils.dist`)."""

from __future__ import annotations

import logging
import warnings

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
"""The logger of Lightning's `rank_zero_info`, which prints the tips (and the messages we keep)."""


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


_NO_TIPS = _NoTips()


def quiet_lightning() -> None:
    """Drop the tips, the `LeafSpec` deprecation and the epoch-level `sync_dist` advice (idempotent; call before
    the Trainer is built)."""
    logging.getLogger(RANK_ZERO_LOGGER).addFilter(_NO_TIPS)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging "
                                              r"on epoch level")
