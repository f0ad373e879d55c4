"""Value checks of the schema's own sections (`evodiff_pl.config.schema.Config`): allowed choices, positive and
finite numbers, ranges; each refusal is one `ConfigError` line naming the key."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from evodiff_pl.config.keys import ConfigError, did_you_mean

MAX_SEED = 2**32 - 1
"""Largest run.seed (NumPy's seed range, which Lightning's seed_everything enforces)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "run.resume": ("auto", "never"),
    "entropic.kind": ("rescaled_entropic", "entropic"),
    "entropic.source": ("ema_eval", "train_loss"),
    "loss.kind": ("edm", "edm2"),
    "optim.schedule": ("edm", "edm2"),
    "ema.kind": ("edm", "power"),
    "logger.kind": ("wandb", "csv", "tensorboard", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "trainer.precision": ("32-true", "bf16-mixed", "16-mixed", "64-true"),
}
"""Keys restricted to a set of values (run.resume also accepts a checkpoint path)."""

POSITIVE: tuple[str, ...] = (
    "model.sigma_data", "model.sigma_min", "model.sigma_max", "loss.P_std", "optim.lr", "ema.halflife_images",
    "train.total_images", "entropic.n_bins", "entropic.update_every_steps", "entropic.plot_nfe",
    "checkpoint.every_steps", "logger.log_every_steps", "trainer.num_nodes", "trainer.val_every_steps",
)
"""Keys that must be finite and > 0."""


def check_values(cfg: DictConfig) -> None:
    """Refuse, in one line, a value of the schema's own sections that would fail (or run wrong) later."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "run.resume" and value not in allowed:
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{did_you_mean(str(value), allowed)}")
    for key in POSITIVE:
        if not 0 < OmegaConf.select(cfg, key) < math.inf:
            raise ConfigError(f"{key} must be finite and > 0, got {OmegaConf.select(cfg, key)}")
    if cfg.entropic.n_bins < 2:
        raise ConfigError(f"entropic.n_bins must be >= 2 (bins in ln sigma of the loss tracker), got "
                          f"{cfg.entropic.n_bins}")
    if not 0 <= cfg.run.seed <= MAX_SEED:
        raise ConfigError(f"run.seed must be in [0, {MAX_SEED}], got {cfg.run.seed}")
    if not cfg.model.sigma_min < cfg.model.sigma_max:
        raise ConfigError(f"model.sigma_min={cfg.model.sigma_min} must be < model.sigma_max={cfg.model.sigma_max}")
    for key in ("entropic.ema_decay", "entropic.eval_fraction"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {value}")
    if cfg.optim.ref_images < 0 or cfg.ema.snapshot_every_images < 0:
        raise ConfigError("optim.ref_images and ema.snapshot_every_images must be >= 0")
    if cfg.ema.kind == "power":
        from evodiff_pl.training.phema import MAX_STD

        bad = [s for s in cfg.ema.stds if not 0 < s < MAX_STD]
        if not cfg.ema.stds or bad:
            raise ConfigError(f"ema.stds={list(cfg.ema.stds)} must be a non-empty list of values in (0, {MAX_STD:.4f})")
    elif cfg.ema.snapshot_every_images:
        raise ConfigError("ema.snapshot_every_images needs ema.kind=power (snapshots of the power-function profiles)")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be 2 values in [0, 1) (Adam's beta1, beta2), got {list(cfg.optim.betas)}")
    if not 0 <= cfg.optim.eps < math.inf:
        raise ConfigError(f"optim.eps must be finite and >= 0 (Adam's epsilon), got {cfg.optim.eps}")
    if cfg.train.max_nonfinite_steps < 0 or cfg.checkpoint.keep_every_steps < 0:
        raise ConfigError("train.max_nonfinite_steps and checkpoint.keep_every_steps must be >= 0")
    devices = cfg.trainer.devices
    if not (devices == "auto" or isinstance(devices, int) and devices != 0 or OmegaConf.is_list(devices)):
        raise ConfigError(f"trainer.devices={devices!r} must be auto, a nonzero int or a list of device ids")
