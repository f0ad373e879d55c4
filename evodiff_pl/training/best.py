"""`checkpoint.best_spec`: keep `checkpoints/best.ckpt` at the best tracked score of one evaluation spec.

After each validation whose evaluation scored the spec (`val/<score>/<spec name>`, logged by
`evodiff_pl.evaluation.callback.SampleQualityCallback`), a score lower than the best so far (Fréchet distances:
lower is better) writes `best.ckpt` through the trainer (every rank takes part, rank 0 writes atomically) and then
`best.json` (score, metric, step, images seen). The best score is kept in the callback's state, so in every later
checkpoint, and read back from `best.json` when a run resumes from a checkpoint written before it: a resumed run
never replaces a better `best.ckpt`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from evodiff_pl.utils.fileio import atomic_write_json


class BestCheckpoint(L.Callback):
    """Writes `ckpt_dir/best.ckpt` (and `best.json`) whenever the score of the spec named `spec_name` improves."""

    def __init__(self, ckpt_dir: str | Path, spec_name: str) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.spec_name = spec_name
        self.best = math.inf
        self.best_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(spec=self.spec_name)

    @property
    def path(self) -> Path:
        return self.ckpt_dir / "best.ckpt"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = float(state_dict["best"]), int(state_dict["step"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A best.ckpt written after the checkpoint this run resumed from keeps its place."""
        record = self.ckpt_dir / "best.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("spec") == self.spec_name and saved["score"] < self.best:
                self.best, self.best_step = float(saved["score"]), int(saved["step"])

    def _score(self, trainer: L.Trainer) -> tuple[str, float] | None:
        """(metric, value) of the spec in this validation's metrics, or None if it was not scored."""
        found = [(k, float(v)) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") and k.endswith(f"/{self.spec_name}")]
        return found[0] if found else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scored = self._score(trainer)
        if trainer.sanity_checking or scored is None or not scored[1] < self.best:  # a stale value is never < best
            return
        metric, self.best = scored
        self.best_step = trainer.global_step
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            atomic_write_json(self.ckpt_dir / "best.json", {
                "spec": self.spec_name, "metric": metric, "score": self.best, "step": self.best_step,
                "images_seen": int(pl_module.images_seen)})
        rank_zero_info(f"{metric} = {self.best:.6g}: new best, wrote {self.path}")
