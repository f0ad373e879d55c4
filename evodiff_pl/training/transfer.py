"""`model.init=PATH`: start a run from the weights of another network (edm's `--transfer`, diffusers'
`from_pretrained`): a train.py checkpoint or run directory, an exported checkpoint, or an NVlabs edm/edm2 pickle.

The trained network takes the file's raw weights and the EMA its EMA weights (every power-EMA profile alike); a file
with one set (an NVlabs pickle's `ema`, an `export_weights` copy) gives that set to both, as edm's `--transfer`.
Optimizer, tracker, images seen and the learning-rate warm-up start afresh; the entropic schedule of one of our
checkpoints is kept as the starting point until the new tracker rebuilds it. The configured network must have the
file's architecture: keys and shapes are compared first, and a mismatch is one error naming the first keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evodiff_pl.io.checkpointing import CHECKPOINT_KEY, CheckpointError, locate_checkpoint, read_checkpoint
from evodiff_pl.io.denoiser import local_file
from evodiff_pl.io.fit import fit_problems
from evodiff_pl.io.nvlabs import load_nvlabs_pickle
from evodiff_pl.networks.songunet import upgrade_v1_songunet
from evodiff_pl.schedules.entropic import EntropicSchedule


def read_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(raw weights, EMA weights, metadata) of a network file (or its http(s) URL), keys as in
    `EDMPrecond.state_dict()`."""
    path = local_file(path)
    if Path(path).suffix == ".pkl":
        loaded = load_nvlabs_pickle(path)
        state = loaded.denoiser.state_dict()
        return state, state, loaded.meta
    ckpt = read_checkpoint(locate_checkpoint(path))
    sets = {prefix: {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            for prefix in ("net.", "ema.")}
    net, ema = sets["net."] or sets["ema."], sets["ema."] or sets["net."]
    if not net:
        raise CheckpointError(f"model.init={path} holds no network weights (no 'net.' or 'ema.' entries)")
    return net, ema, ckpt[CHECKPOINT_KEY]


def check_fits(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], path: str | Path,
               meta: dict[str, Any]) -> None:
    """CheckpointError naming the first missing, unexpected and differently shaped keys of `source` vs `target`."""
    parts = fit_problems(target, source)
    if not parts:
        return
    network = meta.get("network") or {}
    raise CheckpointError(f"model.init={path} does not fit the configured network ({'; '.join(parts)}); the file's "
                          f"network: model.network={network.get('name')} model.net={network.get('kwargs')}")


@torch.no_grad()
def init_from(module: Any, path: str | Path) -> None:
    """Load `path`'s weights into `module.net` and its EMA (every power-EMA profile) and its schedule, if any."""
    net, ema, meta = read_init(path)
    if meta.get("version") == 1 and (meta.get("network") or {}).get("name") == "songunet":  # the older U-Net layout
        net, ema = (upgrade_v1_songunet(state, module.net.backbone, prefix="backbone.") for state in (net, ema))
    check_fits(module.net.state_dict(), net, path, meta)
    module.net.load_state_dict(net)
    for profile in module.power_ema.profiles if module.power_ema is not None else [module.ema]:
        profile.load_state_dict(ema)
    if meta.get("schedule"):
        module.entropic_schedule = EntropicSchedule.from_dict(meta["schedule"])
