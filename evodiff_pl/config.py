"""The training configuration: a dataclass schema, YAML files and command-line dotlist overrides.

`load_config(path, overrides)` merges the schema defaults, the YAML file and `key=value` overrides
(OmegaConf), then validates every key, including the free-form sections that are forwarded to a
constructor (`model.net` -> the network, `data` -> the datamodule, `evaluation` -> the validation
callback) against that constructor's signature and annotations. Every problem raises `ConfigError`
naming the key and, for an unknown key, the closest valid one.

Sizes and schedules are counted in images seen (EDM), so they do not change with the batch size or
the number of processes; `data.batch_size` is the GLOBAL batch, split evenly over the processes.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value; the message names it."""


@dataclass
class RunConfig:
    dir: str = "runs/digits"
    """Run directory: checkpoints/, config.yaml, schedule.json, grids/, plots/, logs; resume looks here."""
    seed: int = 0
    """Seeds the initial weights, the data order and every training noise draw."""
    resume: str = "auto"
    """auto: newest complete checkpoint in run.dir (last.ckpt; hpc_ckpt_N.ckpt of older versions) if any;
    never: start fresh (refuses a run.dir that already has checkpoints); or the path of a .ckpt (e.g. a
    checkpoints/step-N.ckpt archive) to continue from."""
    name: Optional[str] = None
    """Display name of the W&B run; default: the run directory's name."""


@dataclass
class ModelConfig:
    network: str = "songunet"
    """Backbone name in `evodiff_pl.networks.NETWORKS`."""
    net: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the backbone's constructor; shape and label arguments (img_resolution,
    in_channels, out_channels, dim, label_dim) are filled in from the data."""
    precond: str = "edm"
    """Preconditioning of the backbone (`evodiff_pl.precond.PRECONDS`): edm, vp, ve or iddpm (EDM Table 1; the
    VP/VE/iDDPM constants are NVlabs edm's defaults). The loss is EDM's for every choice."""
    sigma_data: float = 0.5
    """σ_d of the EDM preconditioning and loss weight."""
    sigma_min: float = 0.002
    """Lower end of the noise range (tracker bins, schedules, sampling)."""
    sigma_max: float = 80.0
    """Upper end of the noise range."""


@dataclass
class LossConfig:
    P_mean: float = -1.2
    """Mean of ln σ in training (EDM)."""
    P_std: float = 1.2
    """Standard deviation of ln σ in training (EDM)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Adam learning rate after warm-up."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam β1, β2."""
    eps: float = 1e-8
    """Adam ε."""
    lr_rampup_images: int = 10_000_000
    """Linear learning-rate warm-up length, in images seen."""


@dataclass
class EMAConfig:
    halflife_images: float = 500_000
    """EMA half-life in images seen."""
    rampup_ratio: Optional[float] = 0.05
    """Early in training the half-life is at most this fraction of the images seen; null disables."""


@dataclass
class TrainConfig:
    total_images: int = 200_000_000
    """Training length in images seen (optimizer steps = ceil(total_images / data.batch_size))."""
    max_nonfinite_steps: int = 10
    """Stop (with a checkpoint) after more than this many consecutive steps with a non-finite loss or gradient."""
    nan_loss_steps: List[int] = field(default_factory=list)
    """Testing aid: the loss of these training batches (0-based batch index) is replaced by NaN."""


@dataclass
class EntropicConfig:
    n_bins: int = 64
    """Bins in ln σ over [sigma_min, sigma_max] of the per-noise-level loss tracker."""
    ema_decay: Optional[float] = None
    """Per-update decay of the tracker's sums (follows the model as it trains); null: plain running sums."""
    kind: str = "rescaled_entropic"
    """Schedule built from the tracked loss: rescaled_entropic or entropic."""
    update_every_steps: int = 100
    """Rebuild the schedule (and write schedule.json and the plots) every this many training batches."""
    plot_nfe: int = 10
    """Steps marked on the schedule plot."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Write checkpoints/last.ckpt every this many optimizer steps (and always at the end)."""
    keep_every_steps: int = 0
    """Also keep checkpoints/step-N.ckpt every this many steps; 0 keeps none."""


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    """wandb, csv or none."""
    mode: str = "auto"
    """W&B mode: auto (online if an API key is configured, else offline), online, offline, disabled."""
    project: str = "evodiff-pl"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); default: the account's default."""
    log_every_steps: int = 50
    """Send scalar metrics to the logger every this many steps."""


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, cuda, mps."""
    devices: Any = "auto"
    """Processes per node: an int, a list of device ids, or auto."""
    num_nodes: int = 1
    """Nodes (multi-node DDP, e.g. under SLURM)."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ddp_spawn, ..."""
    precision: str = "32-true"
    """32-true, bf16-mixed, 16-mixed or 64-true (the preconditioning always runs in fp32 or wider)."""
    val_every_steps: int = 500
    """Run validation (the evaluation callback) every this many training batches and at the end."""
    progress_bar: bool = True
    """Show the TQDM progress bar (with images/s)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "digits", "batch_size": 128, "num_workers": 0})
    """`name` (a dataset in `evodiff_pl.data.DATASETS`) and its constructor's keyword arguments;
    `batch_size` is the global batch (all processes together)."""
    entropic: EntropicConfig = field(default_factory=EntropicConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: Dict[str, Any] = field(default_factory=lambda: {"enabled": True})
    """`enabled` and the keyword arguments of `evodiff_pl.evaluation.SampleQualityCallback` (out_dir
    defaults to run.dir)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "run.resume": ("auto", "never"),
    "entropic.kind": ("rescaled_entropic", "entropic"),
    "logger.kind": ("wandb", "csv", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "trainer.precision": ("32-true", "bf16-mixed", "16-mixed", "64-true"),
}
"""Keys restricted to a set of values (run.resume also accepts a checkpoint path)."""

POSITIVE: tuple[str, ...] = (
    "model.sigma_data", "model.sigma_min", "model.sigma_max", "loss.P_std", "optim.lr", "ema.halflife_images",
    "train.total_images", "entropic.n_bins", "entropic.update_every_steps", "entropic.plot_nfe",
    "checkpoint.every_steps", "logger.log_every_steps", "trainer.num_nodes", "trainer.val_every_steps",
)
"""Keys that must be > 0."""


def did_you_mean(value: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `valid` (in the order given), or '' when none is close."""
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or the list of valid keys when none is close."""
    valid = sorted(valid)
    return did_you_mean(key, valid) or f" (valid keys: {', '.join(valid)})"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a constructor annotation (ints pass as floats; unknown hints pass)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if isinstance(hint, type) and issubclass(hint, Path):
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, typing.Sequence):
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def signature_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of `cls.__init__`, following `**kwargs` up the base classes."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        hints = typing.get_type_hints(init)
        forwards = False
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and name not in params:
                params[name] = p.replace(annotation=hints.get(name, p.annotation))
        if not forwards:
            break
    return params


def check_kwargs(section: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ConfigError for a key of `kwargs` that `target`'s constructor does not take or a value of the wrong type."""
    params = signature_params(target)
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"unknown key {section}.{key} for {target.__name__}{suggest(key, params)}")
        hint = params[key].annotation
        if not matches_type(value, hint):
            raise ConfigError(
                f"{section}.{key}={value!r} has type {type(value).__name__}, {target.__name__} expects {_type_name(hint)}"
            )


def _raise_from_omegaconf(err: OmegaConfBaseException, source: str) -> typing.NoReturn:
    first_line = str(err).splitlines()[0]
    key = err.full_key or err.key
    if isinstance(err, ConfigKeyError) and err.key is not None:
        parent = err.full_key.rsplit(".", 1)[0] if "." in (err.full_key or "") else ""
        node = OmegaConf.structured(Config)
        valid = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        raise ConfigError(f"unknown key {key} in {source}{suggest(str(err.key), valid)}") from None
    raise ConfigError(f"invalid value for {key} in {source}: {first_line}") from None


def _check_values(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "run.resume" and value not in allowed:
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{did_you_mean(str(value), allowed)}")
    for key in POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {OmegaConf.select(cfg, key)}")
    if not cfg.model.sigma_min < cfg.model.sigma_max:
        raise ConfigError(f"model.sigma_min={cfg.model.sigma_min} must be < model.sigma_max={cfg.model.sigma_max}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have 2 values, got {list(cfg.optim.betas)}")
    if cfg.train.max_nonfinite_steps < 0 or cfg.checkpoint.keep_every_steps < 0:
        raise ConfigError("train.max_nonfinite_steps and checkpoint.keep_every_steps must be >= 0")
    devices = cfg.trainer.devices
    if not (devices == "auto" or isinstance(devices, int) and devices != 0 or OmegaConf.is_list(devices)):
        raise ConfigError(f"trainer.devices={devices!r} must be auto, a nonzero int or a list of device ids")


def check_forwarded(cfg: DictConfig) -> None:
    """Validate the sections forwarded to constructors (network, datamodule, evaluation callback)."""
    from evodiff_pl.data import DATASETS
    from evodiff_pl.evaluation import SampleQualityCallback
    from evodiff_pl.networks import NETWORKS
    from evodiff_pl.precond import PRECONDS

    if cfg.model.precond not in PRECONDS:
        raise ConfigError(f"model.precond={cfg.model.precond!r} is not a preconditioning"
                          f"{suggest(cfg.model.precond, PRECONDS)}")
    if cfg.model.network not in NETWORKS:
        raise ConfigError(f"model.network={cfg.model.network!r} is not a network{suggest(cfg.model.network, NETWORKS)}")
    check_kwargs("model.net", NETWORKS[cfg.model.network], OmegaConf.to_container(cfg.model.net))
    data = OmegaConf.to_container(cfg.data)
    name = data.pop("name", None)
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset{suggest(str(name), DATASETS)}")
    check_kwargs("data", DATASETS[name], data)
    if not data.get("batch_size", 1) > 0:
        raise ConfigError(f"data.batch_size must be > 0, got {data['batch_size']}")
    evaluation = OmegaConf.to_container(cfg.evaluation)
    enabled = evaluation.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"evaluation.enabled={enabled!r} must be true or false")
    check_kwargs("evaluation", SampleQualityCallback, evaluation)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file (default configs/digits.yaml) <- `key=value` overrides, validated."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    cfg = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        _raise_from_omegaconf(err, str(path))
    bad = [o for o in overrides if "=" not in o or o.startswith("+")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. data.batch_size=64), got {bad[0]!r}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        _raise_from_omegaconf(err, "the command line")
    _check_values(cfg)
    check_forwarded(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (stored in checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)
