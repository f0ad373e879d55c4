"""Planning a sweep: every solver x schedule x NFE with its sigma grid, or the reason it cannot run."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from evodiff_pl.io.checkpointing import LoadedCheckpoint
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.sampling.generate import PROTOCOLS, EvalSpec, needs_learned_schedule
from evodiff_pl.sampling.options import SampleConfig, SampleError, check_choice, names, nfes
from evodiff_pl.schedules.head import head_schedule_of_checkpoint
from evodiff_pl.schedules.grids import SCHEDULES, from_head, learned_kind
from evodiff_pl.solvers import SOLVERS


def with_kind(schedule: EntropicSchedule, kind: str) -> EntropicSchedule:
    """The same learned curve as a schedule of `kind` (entropic or rescaled_entropic)."""
    return schedule if schedule.kind == kind else EntropicSchedule.from_dict({**schedule.to_dict(), "kind": kind})


def learned_schedule(cfg: SampleConfig, loaded: LoadedCheckpoint) -> EntropicSchedule | None:
    """`schedule_file` if given, else the checkpoint's schedule, checked against the checkpoint's sigma range."""
    if cfg.schedule_file is None:
        schedule = loaded.schedule
    elif not Path(cfg.schedule_file).is_file():
        raise SampleError(f"schedule_file {cfg.schedule_file} does not exist")
    else:
        try:
            schedule = EntropicSchedule.load(cfg.schedule_file)
        except ValueError as err:
            raise SampleError(f"schedule_file is not a schedule: {err}") from None
    if schedule is not None:
        try:
            schedule.check_sigma_range(loaded.meta["sigma_min"], loaded.meta["sigma_max"])
        except ValueError as err:
            source = cfg.schedule_file or f"the schedule stored in {loaded.path}"
            raise SampleError(f"{source} does not fit checkpoint {loaded.path}: {err}") from None
    return schedule


@dataclass
class Plan:
    """One row of the table: a setting to run (spec, sigmas) or the reason it cannot run."""

    solver: str
    schedule: str
    nfe: int
    spec: EvalSpec | None = None
    sigmas: Tensor | None = None
    reason: str = ""


def head_schedule(loaded: LoadedCheckpoint) -> EntropicSchedule:
    """The schedule of the checkpoint's log-variance head (schedules head_*); SampleError if it has no head."""
    try:
        return head_schedule_of_checkpoint(loaded.denoiser, loaded.meta, "rescaled_entropic")
    except (ValueError, KeyError) as err:
        raise SampleError(f"checkpoint {loaded.path}: {err}") from None


def plan(solver: str, schedule: str, nfe: int, learned: EntropicSchedule | None, meta: dict[str, Any],
         protocol: str = "default", head: EntropicSchedule | None = None, guidance: float = 1.0,
         class_label: int | None = None, tuned: Any = None) -> Plan:
    """The spec and sigma grid of one setting, or a Plan with the reason it is invalid; `head` is the schedule of
    the network's log-variance head, used by the head_* schedules; `tuned` the TunedGrids of schedule tuned."""
    try:
        spec = EvalSpec(solver, schedule, nfe, protocol, guidance, class_label)
        if schedule == "tuned":
            sched = None if tuned is None else tuned.for_solver(solver)
        else:
            source = head if from_head(schedule) else learned
            sched = with_kind(source, learned_kind(schedule)) if spec.needs_schedule else None
        return Plan(solver, schedule, nfe, spec, spec.sigmas(meta["sigma_min"], meta["sigma_max"], sched))
    except ValueError as err:
        return Plan(solver, schedule, nfe, reason=str(err))


def plans(cfg: SampleConfig, loaded: LoadedCheckpoint, tuned: Any = None) -> list[Plan]:
    """Every solver x schedule x nfe (`tuned`: the TunedGrids of schedule tuned); SampleError for an unknown name,
    a missing learned schedule, or when the only (or every) setting is invalid."""
    solvers = names("solver", cfg.solver, list(SOLVERS))
    schedules = names("schedule", cfg.schedule, list(SCHEDULES))
    counts = nfes(cfg.nfe)
    wanted = [s for s in schedules if needs_learned_schedule(s) and not from_head(s) and s != "tuned"]
    head = head_schedule(loaded) if any(from_head(s) for s in schedules) else None
    learned = learned_schedule(cfg, loaded) if wanted or cfg.schedule_file is not None else None
    if wanted and learned is None:
        raise SampleError(f"schedule={wanted[0]} needs a learned schedule but checkpoint {loaded.path} stores none "
                          "(trained too briefly?): pass schedule_file=... or make one with estimate_schedule=true")
    check_choice("protocol", cfg.protocol, PROTOCOLS)
    rows = [plan(*combo, learned, loaded.meta, cfg.protocol, head, cfg.guidance, cfg.class_label, tuned)
            for combo in itertools.product(solvers, schedules, counts)]
    valid = [p for p in rows if p.spec is not None]
    if len(rows) == 1 and not valid:
        raise SampleError(rows[0].reason)
    if not valid:
        raise SampleError(f"no valid setting among solver={cfg.solver} schedule={cfg.schedule} nfe={cfg.nfe}: "
                          + "; ".join(p.reason for p in rows))
    return rows
