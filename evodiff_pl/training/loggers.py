"""Experiment logging: W&B (or CSV) logger set-up, and the learned-schedule artifacts (schedule.json, plots).

W&B mode `auto` is online when an API key is configured (WANDB_API_KEY, or a ~/.netrc entry for the
W&B host) and the server answers, and offline otherwise; an explicit `online` without a key or without a
reachable server falls back to offline with a warning, so neither a missing login nor an offline compute
node stops a run. WANDB_MODE in the environment wins over `auto`. The W&B
run id is kept in `<run.dir>/wandb_run_id`, so a resumed run continues the same W&B run. Every W&B metric is
plotted against `train/kimg` (thousands of images seen, as EDM), so runs with different batch sizes line up.

Progress: a TQDM bar on a terminal (`StepProgressBar`), else a plain line every few steps (`PlainProgress`).
"""

from __future__ import annotations

import csv
import importlib.util
import netrc
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
import torch
from torch import Tensor

from evodiff_pl.config.keys import ConfigError
from evodiff_pl.training.charts import curve_tables, grid_scalars, plot_loss_curve, plot_losses, plot_schedule
from evodiff_pl.utils.fileio import atomic_write_text
from evodiff_pl.sampling.grid_tuning import learned_start
from evodiff_pl.schedules.tuned import write_tuned

RUN_ID_FILE = "wandb_run_id"
STEP_METRIC = "train/kimg"
"""The x axis of every W&B chart: thousands of images seen."""


def cpu_scalars(values: dict[str, float]) -> dict[str, Tensor]:
    """Numbers as float64 CPU tensors: Lightning keeps a logged tensor on its device, so reading these back for the
    logger or the progress bar never waits for the GPU (a logged Python float becomes a tensor on the GPU)."""
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in values.items()}


def wandb_base_url() -> str:
    """The W&B server wandb will use: $WANDB_BASE_URL, else wandb's own default for this version."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    import wandb

    return str(wandb.Settings().base_url)


def wandb_api_key_configured() -> bool:
    """True if WANDB_API_KEY is set or ~/.netrc (or $NETRC) has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(wandb_base_url()).hostname) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the W&B server opens within `timeout` seconds (compute nodes are often
    offline: wandb itself would wait ~90 s and then stop the run)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """online | offline | disabled for a configured mode (auto | online | offline | disabled). Online needs an API
    key and a reachable server; without either the run logs offline (upload later with `wandb sync`)."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if env:
            mode = {"dryrun": "offline", "run": "online"}.get(env, env)
        else:
            mode = "online" if wandb_api_key_configured() else "offline"
    elif mode == "online" and not wandb_api_key_configured():
        rank_zero_warn("logger.mode=online but no W&B API key is configured (WANDB_API_KEY or ~/.netrc): "
                       "logging offline instead; upload later with `wandb sync`")
        return "offline"
    if mode == "online" and not wandb_reachable(url := wandb_base_url()):
        rank_zero_warn(f"the W&B server {url} is unreachable from this machine: logging offline instead (under "
                       "<run.dir>/wandb); upload later with `wandb sync`")
        return "offline"
    return mode


def wandb_run_id(run_dir: Path, write: bool) -> str:
    """The W&B run id stored in the run directory, created (and written if `write`) on first use."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    if write:
        atomic_write_text(path, run_id + "\n")
    return run_id


def _wandb(cfg: Any, run_dir: Path, name: str, is_rank_zero: bool) -> Logger:
    mode = resolve_wandb_mode(cfg.mode)
    return WandbLogger(name=name, save_dir=str(run_dir), project=cfg.project, entity=cfg.entity,
                       id=wandb_run_id(run_dir, write=is_rank_zero and mode != "disabled"), mode=mode,
                       tags=list(cfg.tags) or None, group=cfg.group)


class RunCSVLogger(Logger):
    """`<run.dir>/csv/metrics.csv`, one file for the whole run: a resumed run appends to it, and every logged row is
    on disk at once (Lightning's CSVLogger starts a new version folder per launch and writes rows in batches).
    A key seen for the first time rewrites the file with the wider header, keeping every row."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = Path(run_dir) / "csv" / "metrics.csv"
        self._keys: list[str] | None = None

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file():
            return [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else ""
        if self._keys is None:
            self._keys = self._read()[0]
        new = sorted(set(row) - set(self._keys))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new:
            self._keys, old_rows = sorted(set(self._keys) | set(new)), self._read()[1]
            with self.path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._keys)
                writer.writeheader()
                writer.writerows(old_rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._keys).writerow(row)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The config is in `<run.dir>/config.yaml` and in every checkpoint."""


def _csv(cfg: Any, run_dir: Path, name: str, is_rank_zero: bool) -> Logger:
    return RunCSVLogger(run_dir)


def _tensorboard(cfg: Any, run_dir: Path, name: str, is_rank_zero: bool) -> Logger:
    """Lightning's TensorBoardLogger in <run.dir>/tensorboard (one folder for the whole run, resumed runs append)."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("logger.kind=tensorboard needs the tensorboard package: pip install tensorboard (or "
                          "pip install 'evodiff-pl[tensorboard]'), or use logger.kind=wandb or csv")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)


LOGGERS: dict[str, Callable[[Any, Path, str, bool], Logger | None]] = {
    "wandb": _wandb,
    "csv": _csv,
    "tensorboard": _tensorboard,
    "none": lambda cfg, run_dir, name, is_rank_zero: None,
}


def build_logger(cfg: Any, run_dir: Path, name: str, is_rank_zero: bool) -> Logger | None:
    """The logger of `logger.kind` (a LoggerConfig-like object) writing under `run_dir`."""
    return LOGGERS[cfg.kind](cfg, run_dir, name, is_rank_zero)


def use_kimg_axis(loggers: list[Logger]) -> None:
    """Plot every metric of the W&B loggers against `train/kimg` (W&B fills in its last value where a call to
    `log` leaves it out). Call on every rank: on the others the logger's experiment is a no-op."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.define_metric(STEP_METRIC)
            logger.experiment.define_metric("*", step_metric=STEP_METRIC)


def finish_wandb(exit_code: int) -> None:
    """End this process's W&B run, if any (marks it failed for exit_code != 0; a later run starts its own)."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


class ScheduleArtifacts(L.Callback):
    """Rank 0 writes `schedule.json` atomically after each schedule rebuild and logs its `plot_nfe`-step grid as
    scalars (`schedule/nfe10/sigma_1..9`, `schedule_head/...` for an EDM2 head; `evodiff_pl.training.charts`); the
    loss-per-σ, schedule and loss plots (PNG in `<run_dir>/plots/`, and to W&B) are redrawn after each validation and
    at the end of training, since drawing them costs about a second."""

    def __init__(self, run_dir: str | Path, plot_nfe: int = 10) -> None:
        self.run_dir = Path(run_dir)
        self.plot_nfe = plot_nfe
        self._written = self._plotted = -1
        self.losses: list[tuple[float, str, float]] = []
        """(kimg, metric, value) of the training loss at logging steps and of the EMA validation loss."""
        self._tuned = None

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [tuple(row) for row in state_dict.get("losses", [])]

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, metric: str) -> None:
        value = trainer.callback_metrics.get(metric)
        if value is not None:
            self.losses.append((pl_module.images_seen / 1000, metric, float(value)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._record(trainer, pl_module, "train/loss_per_elem")
        version = pl_module.schedule_version
        if version == self._written or pl_module.entropic_schedule is None:
            return
        self._written = version
        if not trainer.is_global_zero:
            return
        pl_module.entropic_schedule.save(self.run_dir / "schedule.json")
        scalars = grid_scalars("schedule", pl_module.entropic_schedule, self.plot_nfe, pl_module.sigma_min,
                               pl_module.sigma_max)
        if getattr(pl_module, "head_schedule", None) is not None:
            pl_module.head_schedule.save(self.run_dir / "schedule_head.json")
            scalars.update(grid_scalars("schedule_head", pl_module.head_schedule, self.plot_nfe, pl_module.sigma_min,
                                        pl_module.sigma_max))
        for logger in trainer.loggers:
            logger.log_metrics({**scalars, STEP_METRIC: pl_module.images_seen / 1000}, step=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val/loss_ema_per_elem")
            self.plot(trainer, pl_module)
        tuned, learned = getattr(pl_module, "tuned_grids", None), pl_module.entropic_schedule
        if tuned is not None and tuned is not self._tuned and trainer.is_global_zero:  # schedule_tuned.json + plot
            self._tuned = tuned
            start = learned and learned_start(learned, pl_module.sigma_min, pl_module.sigma_max)
            write_tuned(tuned, self.run_dir, start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plot(trainer, pl_module)

    def plot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        version, schedule = pl_module.schedule_version, pl_module.entropic_schedule
        if version == self._plotted or schedule is None:
            return
        self._plotted = version
        if not trainer.is_global_zero:
            return
        plots = self.run_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        lo, hi, density = pl_module.sigma_min, pl_module.sigma_max, (pl_module.loss_fn.P_mean, pl_module.loss_fn.P_std)
        figures = {
            "entropic/loss_per_sigma": plot_loss_curve(pl_module.tracker, pl_module.tracker_source, *density),
            "entropic/schedule": plot_schedule(schedule, lo, hi, self.plot_nfe, *density),
            "train/losses": plot_losses(self.losses),
        }
        if getattr(pl_module, "head_schedule", None) is not None:
            figures["entropic/schedule_head"] = plot_schedule(pl_module.head_schedule, lo, hi, self.plot_nfe, *density)
        for key, fig in figures.items():
            fig.savefig(plots / f"{key.split('/')[-1]}.png", dpi=100)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            kimg = pl_module.images_seen / 1000
            entries: dict[str, Any] = {key: wandb.Image(fig) for key, fig in figures.items()}
            for key, (columns, rows) in curve_tables(pl_module.tracker, schedule, lo, hi).items():
                table = wandb.Table(columns=[*columns, "kimg"], data=[[*row, kimg] for row in rows])
                entries[f"{key}_table"] = table
                entries[f"{key}_line"] = wandb.plot.line(table, columns[0], columns[1], title=f"{key} at {kimg:g} kimg")
            for logger in wandb_loggers:
                logger.experiment.log({**entries, "trainer/global_step": trainer.global_step, STEP_METRIC: kimg})


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps out of `max_steps`, starting at the resumed step, so its rate and
    ETA are true. (Lightning's own bar shows "?" for the endless training stream and, after a resume, divides the
    resumed step count by the new run's seconds.)"""

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # not called when a run resumes inside its (endless) epoch, hence on_train_start too
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("Training")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the parent shows batch_idx + 1; a skipped non-finite step advances batch_idx but not global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)


def is_terminal() -> bool:
    """Whether the progress bar's stream (stderr) is a terminal; SLURM logs are not."""
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class PlainProgress(ProgressBar):
    """Progress for logs that are not terminals: every `every` batches (and at the end) rank 0 prints one line,
    `step 1200/390625 | 614.4 kimg | 2310 img/s | loss 0.0312 | ETA 46h58m`, with the training rate and ETA of this
    launch (the time spent in validation excluded). The loss is the last logged one (`logger.log_every_steps`)."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self._enabled = True
        self._start: tuple[float, int, int] | None = None
        self._validation = (0.0, 0.0)
        """(seconds spent in validation so far, start of the one running)."""

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step, int(pl_module.images_seen))
        self._validation = (0.0, 0.0)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation = (self._validation[0], time.perf_counter())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        spent, start = self._validation
        self._validation = (spent + time.perf_counter() - start, 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, last = trainer.global_step, trainer.global_step >= trainer.max_steps
        if not (self._enabled and trainer.is_global_zero and self._start) or (pl_module.batches_seen % self.every
                                                                              and not last):
            return
        elapsed = max(time.perf_counter() - self._start[0] - self._validation[0], 1e-9)
        steps_per_s = (step - self._start[1]) / elapsed
        parts = [f"step {step}/{trainer.max_steps}", f"{pl_module.images_seen / 1000:.1f} kimg",
                 f"{(pl_module.images_seen - self._start[2]) / elapsed:.0f} img/s"]
        loss = trainer.progress_bar_metrics.get("train/loss_per_elem")
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        if steps_per_s > 0:
            parts.append(f"ETA {_duration((trainer.max_steps - step) / steps_per_s)}")
        print(" | ".join(parts), flush=True)
