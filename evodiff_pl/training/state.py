"""What a run checkpoint holds beyond Lightning's own (weights, optimizer, loop counters): the images and batches
seen, the non-finite streak, the per-σ loss tracker, the learned schedule and every rank's RNG state."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from evodiff_pl.io.checkpointing import FORMAT, VERSION
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules.tuned import TunedGrids
from evodiff_pl.utils.dist import world
from evodiff_pl.utils.seeding import rng_state, set_rng_state

LOSS_SCALE = "sum_over_elements"
"""Checkpoints record the gradient scale of their Adam moments; those without it predate EDM's loss scale."""


def gather_rng_states() -> list[dict[str, Any]]:
    """The RNG states of every rank, in rank order (call on every rank)."""
    state = rng_state()
    if world()[1] == 1:
        return [state]
    states: list[Any] = [None] * world()[1]
    dist.all_gather_object(states, state)
    return states


def training_state(module: Any) -> dict[str, Any]:
    """The state `module` (an `EDMModule`) adds to a checkpoint (call on every rank; rank 0 writes it). The tracker
    is stored unfolded (every rank's pending sums apart), so a checkpoint changes none of the run's numbers."""
    if module.sync_free:
        module.nonfinite_streak = int(module._streak)
    schedule = module.entropic_schedule
    return {
        "format": FORMAT,
        "version": VERSION,
        **module.meta,
        "images_seen": module.images_seen,
        "batches_seen": module.batches_seen,
        "global_step": module.global_step,
        "nonfinite_streak": module.nonfinite_streak,
        "tracker": module.tracker.state_dict(),
        "schedule": schedule.to_dict() if schedule is not None else None,
        "schedule_version": module.schedule_version,
        "tuned": module.tuned_grids.to_dict() if getattr(module, "tuned_grids", None) is not None else None,
        "rng": gather_rng_states(),
        "loss_scale": LOSS_SCALE,
    }


def scale_adam_moments(checkpoint: dict[str, Any], n: int) -> None:
    """A checkpoint from before EDM's loss scale holds Adam's moments of per-element-mean gradients: scale them
    by n and n² (n elements per sample), so that the resumed steps see moments of their own scale."""
    for optimizer in checkpoint.get("optimizer_states", []):
        for moments in optimizer["state"].values():
            moments["exp_avg"].mul_(n)
            moments["exp_avg_sq"].mul_(n * n)
    rank_zero_warn(f"the checkpoint predates EDM's loss scale (gradients summed over a sample's {n} elements): "
                   f"Adam's moments were scaled by {n} and {n}² to match; its earlier steps used the old scale")


def restore_training_state(module: Any, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
    """Load `training_state`'s `state` (from `checkpoint`) into `module`, this rank's RNG included."""
    if state.get("loss_scale") != LOSS_SCALE:
        scale_adam_moments(checkpoint, module.elements_per_sample)
    module.images_seen = int(state["images_seen"])
    module.batches_seen = int(state["batches_seen"])
    module.nonfinite_streak = int(state["nonfinite_streak"])
    module._streak = torch.tensor(module.nonfinite_streak)
    # the decay follows ema.halflife_images and data.batch_size when derived; both may change on resume
    module.tracker.load_state_dict({**state["tracker"], "ema_decay": module.tracker.ema_decay})
    schedule = state["schedule"]
    module.entropic_schedule = EntropicSchedule.from_dict(schedule) if schedule is not None else None
    module.schedule_version = int(state["schedule_version"])
    module.tuned_grids = TunedGrids.from_dict(state["tuned"]) if state.get("tuned") else None
    rank, _ = world()
    rng = state["rng"]  # the training step draws nothing from these (evodiff_pl.training.streams)
    set_rng_state(rng[rank % len(rng)])
