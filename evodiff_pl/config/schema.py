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

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from evodiff_pl.config.checks import check_values
from evodiff_pl.config.keys import (ConfigError, check_kwargs, constructor_keys, key_docs, signature_params,
                             suggest)


def config_dir() -> Path:
    """The shipped YAML configs: `evodiff_pl/configs` of an installed package, else the checkout's `configs/`."""
    package = Path(__file__).resolve().parents[1]
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


DEFAULT_CONFIG = config_dir() / "digits.yaml"


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
    """Preconditioning of the backbone (`evodiff_pl.networks.precond.PRECONDS`): edm, vp, ve or iddpm (EDM Table 1; the
    VP/VE/iDDPM constants are NVlabs edm's defaults). The loss is EDM's for every choice."""
    sigma_data: float = 0.5
    """σ_d of the EDM preconditioning and loss weight."""
    sigma_min: float = 0.002
    """Lower end of the noise range (tracker bins, schedules, sampling)."""
    sigma_max: float = 80.0
    """Upper end of the noise range."""
    init: Optional[str] = None
    """Start from this network file's weights and EMA (a train.py checkpoint or run directory, an exported checkpoint,
    an NVlabs edm/edm2 .pkl, or its http(s) URL; `evodiff_pl.training.transfer`): fresh optimizer, tracker and image
    count, our checkpoints' schedule as the starting one. The network settings must build the file's architecture.
    Read only when the run starts; a resumed run continues from its own checkpoint."""


@dataclass
class LossConfig:
    kind: str = "edm"
    """edm: EDM's λ-weighted MSE; edm2: EDM2's learned-uncertainty loss (needs a network with a log-variance head,
    model.precond=edm2), whose head u(σ) gives the head_* schedules."""
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
    schedule: str = "edm"
    """edm: constant after the warm-up; edm2: divided by √(images seen / ref_images) once past ref_images (EDM2)."""
    ref_images: int = 0
    """optim.schedule=edm2: images after which the inverse square-root decay starts (EDM2's ref_batches x batch
    size); 0: no decay."""


@dataclass
class EMAConfig:
    halflife_images: float = 500_000
    """EMA half-life in images seen."""
    rampup_ratio: Optional[float] = 0.05
    """Early in training the half-life is at most this fraction of the images seen; null disables."""
    kind: str = "edm"
    """edm: one EMA with the half-life above; power: EDM2's power-function EMA profiles, one per ema.stds (the first
    is the EMA that is evaluated, sampled and exported as `ema.*`; halflife_images and rampup_ratio are unused)."""
    stds: List[float] = field(default_factory=lambda: [0.05, 0.10])
    """ema.kind=power: relative standard deviations of the tracked profiles, each in (0, 0.2887)."""
    snapshot_every_images: int = 0
    """ema.kind=power: write every profile to RUN/phema/ each time the images seen pass a multiple of this (for the
    post-hoc EMA, `python -m evodiff_pl.training.phema`); 0: no snapshots."""


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
    """Per-update decay of the tracker's sums, in (0, 1]. null: follow the model, the decay whose half-life is the
    EMA weights' (`ema.halflife_images`); 1: plain running sums over all of training."""
    source: str = "ema_eval"
    """Whose loss the tracker records: ema_eval, the EMA network in eval mode (no dropout) on the un-augmented
    batch, i.e. the network that samples (a no-grad pass on `eval_fraction` of each batch); train_loss, the
    training loss of the raw network (free, but biased by dropout, augmentation and the missing EMA)."""
    eval_fraction: float = 0.125
    """source=ema_eval: the share of each global batch (its first positions, the same on any number of
    processes) that the EMA network also denoises, with the step's noise at σ spread evenly in ln σ."""
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
    best_spec: Optional[str] = None
    """Keep checkpoints/best.ckpt (and best.json) at the lowest score of this evaluation spec, one of
    evaluation.specs (e.g. evodiff_consistent/rescaled_entropic/10); kept across resumes. None: no best.ckpt."""


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    """wandb, csv, tensorboard (event files in <run.dir>/tensorboard; `pip install tensorboard`) or none."""
    mode: str = "auto"
    """W&B mode: auto (online if an API key is configured, else offline), online, offline, disabled."""
    project: str = "evodiff-pl"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); default: the account's default."""
    log_every_steps: int = 50
    """Send scalar metrics to the logger (and print the progress line when stdout is not a terminal) every this
    many steps; the step's loss and gradient norm are read from the device only then."""
    tags: List[str] = field(default_factory=list)
    """W&B run tags, e.g. [cifar10, bf16]."""
    group: Optional[str] = None
    """W&B run group (runs of one group can be shown together); default: none."""


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
    """Show progress: a TQDM bar on a terminal; otherwise (SLURM logs) a plain line every logger.log_every_steps
    steps with step, images, img/s, loss and ETA."""


@dataclass
class PerfConfig:
    tf32: bool = False
    """Allow TF32 in CUDA matmuls and convolutions (faster on Ampere+ GPUs; changes the numbers)."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its convolution algorithms for each shape (faster; may change the numbers)."""
    channels_last: bool = False
    """Keep the image network's weights and inputs in channels-last memory format (faster convolutions on GPU)."""
    compile: bool = False
    """torch.compile the trained network (the first steps are slow while it compiles)."""
    sync_free_step: bool = False
    """Decide the non-finite-step skip on the device (fused Adam's found_inf, masked EMA and tracker updates), so
    the host waits for the device only at logging steps; the skip is still the same on every rank, but a run of
    skipped steps is reported (and stops the run) only at the next logging step, and a skipped batch counts as a
    trainer step (the run ends after exactly ceil(train.total_images / data.batch_size) batches). Fused Adam rounds
    differently from the default Adam (float tolerance); not with trainer.precision=16-mixed."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "digits", "batch_size": 128, "num_workers": 0})
    """`name` (a dataset in `evodiff_pl.data.datasets.DATASETS`) and its constructor's keyword arguments;
    `batch_size` is the global batch (all processes together); `num_workers` and `pin_memory` set the loader."""
    entropic: EntropicConfig = field(default_factory=EntropicConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    evaluation: Dict[str, Any] = field(default_factory=lambda: {"enabled": True})
    """`enabled` and the keyword arguments of `evodiff_pl.evaluation.settings.EvaluationSettings` (out_dir
    defaults to run.dir)."""


def _raise_from_omegaconf(err: OmegaConfBaseException, source: str) -> typing.NoReturn:
    first_line = str(err).splitlines()[0]
    key = err.full_key or err.key
    if isinstance(err, ConfigKeyError) and err.key is not None:
        parent = err.full_key.rsplit(".", 1)[0] if "." in (err.full_key or "") else ""
        node = OmegaConf.structured(Config)
        valid = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        raise ConfigError(f"unknown key {key} in {source}{suggest(str(err.key), valid)}") from None
    raise ConfigError(f"invalid value for {key} in {source}: {first_line}") from None


def check_forwarded(cfg: DictConfig) -> None:
    """Validate the sections forwarded to constructors (network, datamodule, evaluation callback)."""
    from evodiff_pl.data.datasets import DATASETS
    from evodiff_pl.evaluation.settings import EvaluationSettings
    from evodiff_pl.networks import NETWORKS
    from evodiff_pl.networks.precond import PRECONDS

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
    augment = data.get("augment", 0.0)
    if not 0 <= augment <= 1:
        raise ConfigError(f"data.augment={augment} must be in [0, 1] (the augmentation probability; 0 = off)")
    if augment and not DATASETS[name].is_image:
        raise ConfigError(f"data.augment={augment}: augmentation needs images, data.name={name} holds vectors; "
                          "set data.augment=0")
    if augment and "augment_dim" not in signature_params(NETWORKS[cfg.model.network]):
        raise ConfigError(f"data.augment={augment} needs a network with an augmentation input (augment_dim); "
                          f"model.network={cfg.model.network} has none: use songunet or dhariwalunet, or "
                          "data.augment=0")
    evaluation = OmegaConf.to_container(cfg.evaluation)
    enabled = evaluation.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"evaluation.enabled={enabled!r} must be true or false")
    check_kwargs("evaluation", EvaluationSettings, evaluation)


def usage() -> str:
    """train.py's key reference: every key of the schema with its default and documentation."""
    from evodiff_pl.data.datasets import DATASETS
    from evodiff_pl.evaluation.settings import EvaluationSettings
    from evodiff_pl.networks import NETWORKS

    derived = ("img_resolution", "in_channels", "out_channels", "dim", "label_dim", "seed")
    sections = [("keys (override as key=value; the defaults of the schema, which the YAML file may change)",
                 key_docs(Config))]
    sections += [(f"model.net.* for model.network={name}", constructor_keys("model.net", net, derived))
                 for name, net in NETWORKS.items()]
    sections += [(f"data.* for data.name={name}", constructor_keys("data", dm, derived)) for name, dm in DATASETS.items()]
    sections.append(("evaluation.* (evaluation.enabled=true turns it on)",
                     constructor_keys("evaluation", EvaluationSettings)))
    lines: list[str] = []
    for title, rows in sections:
        lines += ["", title + ":"]
        for key, default, doc in rows:
            lines += [f"  {key}={default}", f"      {doc}"]
    return "\n".join(lines[1:])


def _config_file(path: str | Path) -> Path:
    path = Path(path)
    shipped = config_dir() / path.name
    if not path.is_file() and path.parent in (Path("."), Path("configs")) and shipped.is_file():
        path = shipped  # `configs/cifar10.yaml` or `cifar10.yaml` outside a checkout: the copy in the package
    if not path.is_file():
        names = ", ".join(sorted(p.name for p in config_dir().glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist (shipped configs: {names})")
    return path


def load_config(path: str | Path | typing.Sequence[str | Path] | None = None,
                overrides: typing.Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file(s) (default configs/digits.yaml; several: each over the previous) <- `key=value`
    overrides, validated."""
    paths = [DEFAULT_CONFIG] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    cfg = OmegaConf.structured(Config)
    for file in map(_config_file, paths):
        try:
            loaded = OmegaConf.load(file)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {file} is not YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {file} is not a YAML mapping of sections (run:, model:, ...)")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            _raise_from_omegaconf(err, str(file))
    bad = [o for o in overrides if "=" not in o or o.startswith("+")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. data.batch_size=64), got {bad[0]!r}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        _raise_from_omegaconf(err, "the command line")
    check_values(cfg)
    check_forwarded(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (stored in checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)
