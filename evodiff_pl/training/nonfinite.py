"""What a non-finite training step reports: the warning of a skipped step and the error that stops a run."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def skipped_step(step: int, batch: int, n_bad: float, loss_sum: float, grad_norm: float, streak: int,
                 batch_sigmas: Tensor) -> str:
    """The warning for one skipped step, with (the first 32 of) the batch's noise levels."""
    shown = ", ".join(f"{s:.4g}" for s in batch_sigmas.tolist()[:32])
    more = f", ... ({batch_sigmas.numel()} in all)" if batch_sigmas.numel() > 32 else ""
    return (f"step {step} (batch {batch}): non-finite training step skipped ({int(n_bad)} non-finite per-sample "
            f"losses, loss sum {loss_sum:.4g}, gradient norm {grad_norm:.4g}); no optimizer, EMA or tracker update "
            f"({streak} in a row). Sigmas of the batch: [{shown}{more}]")


def skipped_since_logging(step: int, batch: int, skipped: int, streak: int) -> str:
    """perf.sync_free_step's warning: the skipped steps since the last logging step."""
    return (f"step {step} (batch {batch}): {skipped} non-finite training step(s) skipped since the last logging step "
            f"({streak} in a row now); no optimizer, EMA or tracker update for them")


def too_many(streak: int, limit: int, step: int, batch: int, weights_finite: bool,
             saved: Path | None) -> NonFiniteTrainingError:
    """The error that ends a run after more than `limit` skipped steps in a row (`saved`: where the weights went)."""
    where = (f"{streak} consecutive training steps had a non-finite loss or gradient (more than "
             f"train.max_nonfinite_steps={limit}), at step {step} (batch {batch})")
    if not weights_finite:
        return NonFiniteTrainingError(
            f"{where}, and the weights themselves are not finite: they were so before this run's steps (a damaged or "
            "diverged checkpoint?). Nothing was saved; resume from an earlier checkpoint with run.resume=PATH")
    return NonFiniteTrainingError(
        f"{where}; the weights are those of the last finite step" + (f" and were saved to {saved}" if saved else "")
        + ". Lower optim.lr, use trainer.precision=32-true, or check the data.")
