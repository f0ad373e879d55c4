"""The one generation code path: per-index seeds, strided rank shares, evaluation specs.

Sample j of a run with base seed s draws its initial noise, its class label and then the noise of a
stochastic solver from a `torch.Generator` seeded with s + j, so an image depends only on (j, s): never on the
batch size, the number of processes or the device (the generators are on the CPU unless a protocol says
otherwise). The validation callback (`evodiff_pl.evaluation.callback`) and `sample.py` both generate through `generate`.

Protocols (`PROTOCOLS`, the fourth field of a spec "solver/schedule/nfe/protocol"): `default` as above;
`edm` is NVlabs edm's generate.py: the grid ends with a plain Euler step to σ = 0 (`denoise_to_zero`, +1 NFE:
heun/karras/35 is EDM's 18-level Heun), the state is float64 while the network runs in float32, and the
per-seed generators live on the sampling device, so the images equal generate.py's for the same seeds
(on the same device).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from evodiff_pl.schedules.grids import SCHEDULES, LearnedSchedule, get_sigmas
from evodiff_pl.solvers import SOLVERS, STOCHASTIC, nfe, per_sample_noise, solve


def rank_indices(num_samples: int, rank: int, world_size: int) -> Tensor:
    """Sample indices of process `rank`: j with j % world_size == rank (every rank gets a near-equal share)."""
    if num_samples < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need num_samples >= 0 and 0 <= rank < world_size, got {num_samples}, {rank}, {world_size}")
    return torch.arange(num_samples, dtype=torch.int64)[rank::world_size]


PROTOCOLS = ("default", "edm")
"""Generation protocols; see the module docstring."""


def initial_noise(
    indices: Tensor, shape: tuple[int, ...], seed: int, num_classes: int = 0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """Unit-variance float32 noise (len(indices), *shape) and int64 labels (None if num_classes == 0) on `device`.

    Sample j draws its noise, then its label, from a generator on `device` seeded with (seed + j) mod 2^32
    (edm's StackedRandomGenerator); on the CPU this does not depend on the machine.
    """
    noise, labels, _ = _draw_initial(indices, shape, seed, num_classes, device)
    return noise, labels


def _draw_initial(
    indices: Tensor, shape: tuple[int, ...], seed: int, num_classes: int, device: torch.device | str = "cpu",
    class_label: int | None = None,
) -> tuple[Tensor, Tensor | None, list[torch.Generator]]:
    """`initial_noise`, plus each sample's generator, left where a stochastic solver continues drawing; a
    `class_label` replaces every drawn label (drawn all the same, as edm2's --class, so the draws that follow stay)."""
    device = torch.device(device)
    noise = torch.empty(len(indices), *shape, device=device)
    labels = torch.empty(len(indices), dtype=torch.int64, device=device) if num_classes > 0 else None
    generators = []
    for row, j in enumerate(indices.tolist()):
        g = torch.Generator(device).manual_seed((seed + j) % (1 << 32))
        noise[row] = torch.randn(shape, generator=g, device=device)
        if labels is not None:
            labels[row] = torch.randint(num_classes, (), generator=g, device=device)
        generators.append(g)
    if labels is not None and class_label is not None:
        labels.fill_(class_label)
    return noise, labels, generators


def _bind(denoiser: Callable[..., Tensor], labels: Tensor | None,
          net_dtype: torch.dtype | None) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x, sigma) with the labels bound, evaluated in `net_dtype` (if given) and returned in x's dtype."""
    extra = () if labels is None else (labels,)
    if net_dtype is None:
        return lambda x, sigma: denoiser(x, sigma, *extra)
    return lambda x, sigma: denoiser(x.to(net_dtype), sigma.to(net_dtype), *extra).to(x.dtype)


def generate(
    denoiser: Callable[..., Tensor],
    indices: Tensor,
    shape: tuple[int, ...],
    *,
    solver: str,
    sigmas: Tensor,
    seed: int,
    batch_size: int,
    num_classes: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    net_dtype: torch.dtype | None = None,
    noise_on_device: bool = False,
    class_label: int | None = None,
    progress: bool = False,
    **solver_options,
) -> Tensor:
    """Samples x_N of the probability-flow ODE for the given sample indices, (len(indices), *shape) on `device`.

    Args:
        denoiser: D(x, sigma) with sigma of shape (B,); called as D(x, sigma, labels) when num_classes > 0.
        indices: 1-D int64 sample indices (e.g. `rank_indices(...)`); sample j uses seed + j.
        shape: shape of one sample, e.g. (C, H, W) or (D,).
        solver: a name of `evodiff_pl.solvers.SOLVERS`.
        sigmas: float64 decreasing grid from sigma_max to sigma_min; x_T = sigmas[0] * noise.
        seed: base seed.
        batch_size: samples per denoiser call; does not change any sample.
        num_classes: > 0 draws one class label per sample (from its own generator) and passes it to D.
        device: where to run; default the CPU.
        dtype: dtype of the state x (float32 for networks, float64 for exact testbeds).
        net_dtype: dtype the denoiser is called in, if not x's (edm: a float64 state around a float32 network).
        noise_on_device: draw noise and labels with generators on `device` (edm's generate.py) instead of the CPU.
        class_label: the class of every sample (0 <= class_label < num_classes); None: each sample's drawn class.
        progress: show a tqdm bar with images/s.
        **solver_options: passed to the solver (e.g. lower_order_final, denoise_to_zero). A stochastic
            solver (`STOCHASTIC`) gets noise= from each sample's generator, after its initial draws.
    """
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(f"class {class_label} is not a class of this network (it has {num_classes}: 0-"
                         f"{num_classes - 1})" if num_classes else f"class {class_label} given to an unconditional network")
    if "noise" in solver_options:
        raise ValueError("generate draws a stochastic solver's noise from each sample's seed; do not pass noise=")
    stochastic = solver in STOCHASTIC
    device = torch.device("cpu") if device is None else torch.device(device)
    sigma_max = float(sigmas[0])
    out = []
    with torch.no_grad(), tqdm(total=len(indices), unit="img", disable=not progress, desc=solver) as bar:
        for chunk in indices.split(batch_size) if len(indices) else ():
            noise, labels, generators = _draw_initial(chunk, shape, seed, num_classes,
                                                      device if noise_on_device else "cpu", class_label)
            x = noise.to(device=device, dtype=dtype) * sigma_max
            fn = _bind(denoiser, None if labels is None else labels.to(device), net_dtype)
            extra = {"noise": per_sample_noise(generators)} if stochastic else {}
            out.append(solve(solver, fn, x, sigmas, **solver_options, **extra))
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.empty(0, *shape, device=device, dtype=dtype)


def steps_for_nfe(solver: str, target_nfe: int, **solver_options) -> int:
    """The number of steps at which `solver` makes exactly `target_nfe` denoiser calls, else ValueError."""
    if not isinstance(target_nfe, int) or target_nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {target_nfe!r}")
    counts = {}
    for n_steps in range(1, target_nfe + 2):
        try:
            counts[n_steps] = nfe(solver, n_steps, **solver_options)
        except ValueError:
            continue
        if counts[n_steps] == target_nfe:
            return n_steps
    below = max((c for c in counts.values() if c < target_nfe), default=None)
    above = min((c for c in counts.values() if c > target_nfe), default=None)
    nearest = " or ".join(str(c) for c in (below, above) if c is not None)
    raise ValueError(
        f"solver {solver!r} cannot make exactly {target_nfe} denoiser calls (NFE); nearest valid: {nearest}"
    )


def needs_learned_schedule(schedule: str) -> bool:
    """Whether schedule `schedule` needs a learned schedule object (`get_sigmas(..., schedule=...)`)."""
    return "schedule" in inspect.signature(SCHEDULES[schedule]).parameters


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation setting: a solver on a schedule at a total number of denoiser calls (NFE), optionally guided
    (`evodiff_pl.sampling.guidance`) and with one class for every sample.

    Validated on construction: unknown solver or schedule, an NFE the solver cannot make (e.g. odd for heun, 2 per
    step), a guidance weight that is not finite or a negative class raise ValueError.
    """

    solver: str
    """A name of `evodiff_pl.solvers.SOLVERS`."""
    schedule: str
    """A name of `evodiff_pl.schedules.grids.SCHEDULES`."""
    nfe: int
    """Total denoiser calls per sample; the number of steps follows from the solver's `nfe()`."""
    protocol: str = "default"
    """A name of `PROTOCOLS`: `edm` adds EDM's final Euler step to σ = 0 (counted in nfe) and its seeding."""
    guidance: float = 1.0
    """Guidance weight w (1: none): D = gnet + w·(net − gnet), see `evodiff_pl.sampling.guidance.guided`."""
    class_label: int | None = None
    """The class of every sample; None: each sample's own random class (conditional networks)."""

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance={self.guidance} must be a finite number (1: no guidance)")
        if self.class_label is not None and self.class_label < 0:
            raise ValueError(f"class={self.class_label} must be >= 0")
        steps_for_nfe(self.solver, self.nfe, **self.solver_options)

    @classmethod
    def parse(cls, spec: "EvalSpec | str | Mapping") -> "EvalSpec":
        """From an EvalSpec, a "solver/schedule/nfe[/protocol][/guidance=W][/class=K]" string or a mapping with
        those keys (solver, schedule, nfe, protocol, guidance, class)."""
        if isinstance(spec, EvalSpec):
            return spec
        if isinstance(spec, str):
            parts = spec.split("/")
            options = dict(part.split("=", 1) for part in parts[3:] if "=" in part)
            rest = [part for part in parts[3:] if "=" not in part]
            if len(parts) < 3 or not parts[2].isdigit() or len(rest) > 1 or set(options) - {"guidance", "class"}:
                raise ValueError("expected 'solver/schedule/nfe[/protocol][/guidance=W][/class=K]' (e.g. "
                                 f"'evodiff/rescaled_entropic/10', 'heun/karras/35/edm/guidance=1.5'), got {spec!r}")
            spec = {"solver": parts[0], "schedule": parts[1], "nfe": parts[2], "protocol": rest[0] if rest else
                    "default", **options}
        try:
            guidance = float(spec.get("guidance", 1.0))
            label = None if spec.get("class") is None else int(spec["class"])
        except ValueError:
            raise ValueError(f"guidance must be a number and class an integer, got {spec.get('guidance')!r} and "
                             f"{spec.get('class')!r}") from None
        return cls(spec["solver"], spec["schedule"], int(spec["nfe"]), spec.get("protocol", "default"), guidance, label)

    @property
    def name(self) -> str:
        """E.g. evodiff_rescaled_entropic_nfe10, heun_karras_nfe35_edm, heun_karras_nfe35_edm_guidance1.5_class3."""
        suffix = "" if self.protocol == "default" else f"_{self.protocol}"
        suffix += "" if self.guidance == 1 else f"_guidance{self.guidance:g}"
        suffix += "" if self.class_label is None else f"_class{self.class_label}"
        return f"{self.solver}_{self.schedule}_nfe{self.nfe}{suffix}"

    @property
    def solver_options(self) -> dict[str, bool]:
        """Options of the solver call: EDM's protocol ends with a plain Euler step to σ = 0 (D(x, σ_min))."""
        return {"denoise_to_zero": True} if self.protocol == "edm" else {}

    @property
    def generate_options(self) -> dict[str, object]:
        """Keyword arguments of `generate` for this spec's protocol and class (solver options included)."""
        options: dict[str, object] = {} if self.class_label is None else {"class_label": self.class_label}
        if self.protocol == "edm":
            options.update(dtype=torch.float64, net_dtype=torch.float32, noise_on_device=True)
        return {**options, **self.solver_options}

    @property
    def n_steps(self) -> int:
        return steps_for_nfe(self.solver, self.nfe, **self.solver_options)

    @property
    def needs_schedule(self) -> bool:
        return needs_learned_schedule(self.schedule)

    def sigmas(self, sigma_min: float, sigma_max: float, schedule: LearnedSchedule | None = None) -> Tensor:
        """The n_steps + 1 levels; `schedule` (the learned schedule) is used only by learned schedules."""
        options = {"schedule": schedule} if self.needs_schedule else {}
        return get_sigmas(self.schedule, self.n_steps, sigma_min=sigma_min, sigma_max=sigma_max, **options)
