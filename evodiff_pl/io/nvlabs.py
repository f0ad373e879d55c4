"""Files from NVlabs edm and its ecosystem: network pickles (`edm-*.pkl`, training snapshots
`network-snapshot-*.pkl`, and edm2's `edm2-img*.pkl`) read without running their code, and (mu, sigma) reference
statistics (edm's `fid.py ref`, pytorch-fid's `--save-stats`).

Such a pickle is a dict whose `ema` entry is the network. NVlabs' loader re-executes the Python source that
each of their "persistent" objects carries; this reader never does. A restricted unpickler admits only
their persistence records (kept as `PersistentRecord`: class name, state and init arguments; the embedded
source is ignored), torch tensors and storages (through `torch.load(weights_only=True)`), numpy scalars and
arrays and plain containers, and refuses every other global with a one-line error naming it. The network is then rebuilt
from the recorded class names and init kwargs with this package's own classes (`evodiff_pl.networks.precond`,
`evodiff_pl.networks`: the same parameter layout) and loaded with the recorded weights. An edm2 pickle's
`encoder` record says how its samples become pixels: [-1, 1] pixels (StandardRGBEncoder) or Stable Diffusion VAE
latents (StabilityVAEEncoder), decoded by `StabilityVAEDecoder` with a local copy of that VAE (diffusers).
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _np_scalar

from evodiff_pl.io.checkpointing import CheckpointError, LoadedCheckpoint
from evodiff_pl.io.fit import build_checked
from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import build_precond

PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
"""NVlabs edm preconditioner class -> `evodiff_pl.networks.precond.PRECONDS` name."""
NETWORKS = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}
"""NVlabs edm backbone class -> `evodiff_pl.networks.NETWORKS` name."""
DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                 "iDDPMPrecond": "DhariwalUNet"}
"""edm's default `model_type` of each preconditioner."""
PRECOND_KWARGS = {"EDMPrecond": ("sigma_data",), "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
                  "VEPrecond": ("sigma_min", "sigma_max"), "iDDPMPrecond": ("C_1", "C_2", "M")}
"""Init kwargs of each preconditioner that this package's class takes too; the others go to the backbone."""
SAMPLING_RANGE = (0.002, 80.0)
"""edm's generate.py default σ range, clipped to the network's own (its sigma_min/sigma_max); edm2's generate_images.py
uses the same."""
EDM2_PRECOND = "Precond"
"""edm2's preconditioner class (training/networks_edm2.py), around its `UNet` (our `EDM2UNet`)."""
EDM2_KWARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
               "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head",
               "dropout", "res_balance", "attn_balance", "clip_act")
"""edm2 Precond init kwargs that go to its UNet (and Block); this package's EDM2UNet takes them under the same names."""
EDM2_ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")
ACCEPTED = "an NVlabs edm or edm2 pickle: a dict whose 'ema' is one of " + ", ".join([*PRECONDS, EDM2_PRECOND])
TORCH_ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


class NVlabsPickleError(CheckpointError):
    """An NVlabs pickle is unreadable, of another kind, or holds something this reader refuses."""


@dataclass
class PersistentRecord:
    """One NVlabs persistent object as pickled: its class name, init arguments and state (the module source
    it also carries is dropped unread)."""

    class_name: str
    state: dict[str, Any]
    init_args: tuple = ()
    init_kwargs: dict[str, Any] = field(default_factory=dict)


class _ModuleState:
    """Stands for a plain torch container module (ModuleDict, ModuleList, Sequential): keeps its pickled state."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _PlainDict(dict):
    """Stands for dnnlib.EasyDict (a dict)."""


def _persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise NVlabsPickleError(f"an NVlabs persistence record of an unknown kind: {type(meta).__name__}")
    state = dict(meta.get("state") or {})
    return PersistentRecord(meta["class_name"], state, tuple(state.get("_init_args") or ()),
                            dict(state.get("_init_kwargs") or {}))


def _storage_from_bytes(data: bytes) -> Any:
    """A tensor storage pickled by torch (a legacy torch.save payload), read with weights_only=True."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _empty_array(cls: type, shape: tuple, dtype: Any) -> np.ndarray:
    """numpy's pickled-array constructor, for plain arrays only (their data follows as state)."""
    if cls is not np.ndarray:
        raise NVlabsPickleError(f"holds a numpy array of type {getattr(cls, '__name__', cls)!r}")
    return np.ndarray(shape, dtype=np.dtype(dtype))


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy", "ndarray"): np.ndarray,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleState,
    ("torch.nn.modules.container", "ModuleList"): _ModuleState,
    ("torch.nn.modules.container", "Sequential"): _ModuleState,
}
"""The only globals an NVlabs pickle may name, and what each is resolved to."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in ALLOWED and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED.get((module, name))
        if target is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            target = getattr(torch, name)
        if target is None:
            raise NVlabsPickleError(f"refuses to load {module}.{name}: not an NVlabs persistence record, tensor or "
                                    "plain container (this reader never runs code from a pickle)")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise NVlabsPickleError(f"holds a persistent id ({str(pid)[:40]!r}): a legacy torch.save file, not "
                                f"{ACCEPTED}")


def read_nvlabs_pickle(path: str | Path) -> dict[str, Any]:
    """The pickle's top-level dict, persistent objects as PersistentRecord; NVlabsPickleError (one line naming
    what was found and what is accepted) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise NVlabsPickleError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == TORCH_ZIP_MAGIC:
            raise NVlabsPickleError(f"{path} is a torch.save zip archive (a torch or evodiff-pl checkpoint), not "
                                    f"{ACCEPTED}; evodiff-pl checkpoints end in .ckpt")
        try:
            data = RestrictedUnpickler(f).load()
        except NVlabsPickleError as err:
            raise NVlabsPickleError(f"{path}: {err}") from None
        except Exception as err:
            raise NVlabsPickleError(f"{path} is truncated or not a pickle ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}); expected {ACCEPTED}") from None
    if isinstance(data, int) and data == LEGACY_TORCH_MAGIC:
        raise NVlabsPickleError(f"{path} is a legacy torch.save file, not {ACCEPTED}")
    if not isinstance(data, dict):
        raise NVlabsPickleError(f"{path} holds a {type(data).__name__}, not {ACCEPTED}")
    ema = data.get("ema")
    if not isinstance(ema, PersistentRecord) or ema.class_name not in (*PRECONDS, EDM2_PRECOND):
        found = f"'ema' is {_describe(ema)}" if "ema" in data else f"keys {sorted(map(str, data))[:6]}"
        raise NVlabsPickleError(f"{path} holds {found}{_guess(data)}; expected {ACCEPTED}")
    return data


def _describe(obj: Any) -> str:
    return f"an NVlabs {obj.class_name!r}" if isinstance(obj, PersistentRecord) else f"a {type(obj).__name__}"


def _guess(data: dict[str, Any]) -> str:
    if {"G", "D", "G_ema"} & set(data):
        return " (a StyleGAN-style GAN pickle)"
    return ""


def _flat_state(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Parameters and persistent buffers of a pickled module tree, by dotted name, as a state_dict has them."""
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, (PersistentRecord, _ModuleState)):
            _flat_state(child, f"{prefix}{name}.", out)
        elif child is not None:
            raise NVlabsPickleError(f"module {prefix}{name} is a {type(child).__name__}")


def _weights(record: PersistentRecord, backbone: str) -> dict[str, torch.Tensor]:
    """The record's weights by our names: NVlabs' backbone attribute (`model.`, `unet.`) read as `backbone.`."""
    state: dict[str, torch.Tensor] = {}
    _flat_state(record, "", state)
    return {("backbone." + k[len(backbone):] if k.startswith(backbone) else k): v for k, v in state.items()}


def build_from_record(record: PersistentRecord) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our denoiser for an NVlabs preconditioner record (weights loaded, eval mode) and its metadata."""
    cls = record.class_name
    if record.init_args:
        raise NVlabsPickleError(f"{cls} was built with positional arguments; only keyword arguments are read")
    kwargs = dict(record.init_kwargs)
    if "img_resolution" not in kwargs or "img_channels" not in kwargs:
        raise NVlabsPickleError(f"{cls} records no img_resolution/img_channels (init kwargs {sorted(kwargs)})")
    res, channels = kwargs.pop("img_resolution"), kwargs.pop("img_channels")
    label_dim = int(kwargs.pop("label_dim", 0))
    kwargs.pop("use_fp16", None)
    model_type = kwargs.pop("model_type", DEFAULT_MODEL[cls])
    if model_type not in NETWORKS:
        raise NVlabsPickleError(f"backbone {model_type!r} is not one of {sorted(NETWORKS)}")
    sigma_range = (kwargs.pop("sigma_min", 0.0), kwargs.pop("sigma_max", float("inf"))) if cls == "EDMPrecond" else None
    precond_kwargs = {k: kwargs.pop(k) for k in PRECOND_KWARGS[cls] if k in kwargs}
    out_channels = channels * (2 if cls == "iDDPMPrecond" else 1)
    net_kwargs = dict(img_resolution=res, in_channels=channels, out_channels=out_channels, label_dim=label_dim,
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    try:
        denoiser = build_checked(lambda: build_network(NETWORKS[model_type], **net_kwargs),
                                 lambda net: build_precond(PRECONDS[cls], net, **precond_kwargs),
                                 _weights(record, "model."), f"{cls}({model_type})")
    except (TypeError, ValueError) as err:
        raise NVlabsPickleError(f"{cls}({model_type}) with init kwargs {sorted(record.init_kwargs)}: {err}") from None
    lo, hi = sigma_range if sigma_range is not None else (denoiser.sigma_min, denoiser.sigma_max)
    meta = {
        "format": "nvlabs-edm-pickle",
        "network": {"name": NETWORKS[model_type], "kwargs": net_kwargs},
        "precond": {"name": PRECONDS[cls], "kwargs": precond_kwargs},
        "sigma_data": denoiser.sigma_data,
        "sigma_min": max(SAMPLING_RANGE[0], float(lo)), "sigma_max": min(SAMPLING_RANGE[1], float(hi)),
        "sample_shape": [channels, res, res], "num_classes": label_dim,
        "config": None, "data": None, "schedule": None,
    }
    return denoiser.eval().requires_grad_(False), meta


def _latent(encoder: Any) -> dict[str, Any] | None:
    """How edm2's samples become pixels, from the pickle's `encoder` record: None for [-1, 1] pixels
    (StandardRGBEncoder, or no encoder: generate_images.py's default), else the VAE latents' name and per-channel
    scale and bias (StabilityVAEEncoder: final latent = raw latent·scale + bias)."""
    if encoder is None:
        return None
    if not isinstance(encoder, PersistentRecord) or encoder.class_name not in EDM2_ENCODERS:
        raise NVlabsPickleError(f"'encoder' is {_describe(encoder)}, not one of {', '.join(EDM2_ENCODERS)}")
    if encoder.class_name == "StandardRGBEncoder":
        return None
    state = encoder.state
    if not {"vae_name", "scale", "bias"} <= set(state):
        raise NVlabsPickleError(f"StabilityVAEEncoder records no vae_name/scale/bias (state {sorted(state)})")
    scale, bias = (np.asarray(state[k], dtype=np.float32).reshape(-1) for k in ("scale", "bias"))
    return {"vae_name": str(state["vae_name"]), "scale": scale.tolist(), "bias": bias.tolist()}


def build_edm2(record: PersistentRecord, encoder: Any = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our EDM2Precond(EDM2UNet) for an edm2 `Precond` record (weights loaded, eval mode) and its metadata; the
    pickle's `encoder` record gives `meta['latent']` (see `_latent`)."""
    unet = (record.state.get("_modules") or {}).get("unet")
    if not isinstance(unet, PersistentRecord) or unet.class_name != "UNet":
        raise NVlabsPickleError(f"an NVlabs 'Precond' whose 'unet' is {_describe(unet)}, not edm2's 'UNet'")
    if record.init_args:
        raise NVlabsPickleError("edm2's Precond was built with positional arguments; only keyword arguments are read")
    kwargs = dict(record.init_kwargs)
    if not {"img_resolution", "img_channels"} <= set(kwargs):
        raise NVlabsPickleError(f"edm2's Precond records no img_resolution/img_channels (init kwargs {sorted(kwargs)})")
    res, channels = kwargs.pop("img_resolution"), kwargs.pop("img_channels")
    label_dim = int(kwargs.pop("label_dim", 0))
    kwargs.pop("use_fp16", None)
    precond_kwargs = {k: kwargs.pop(k) for k in ("sigma_data", "logvar_channels") if k in kwargs}
    unknown = sorted(set(kwargs) - set(EDM2_KWARGS))
    if unknown:
        raise NVlabsPickleError(f"edm2's Precond has init kwargs {unknown} that this reader does not know "
                                f"(known: img_resolution, img_channels, label_dim, use_fp16, sigma_data, "
                                f"logvar_channels, {', '.join(EDM2_KWARGS)})")
    latent = _latent(encoder)
    net_kwargs = dict(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim,
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    try:
        denoiser = build_checked(lambda: build_network("edm2unet", **net_kwargs),
                                 lambda net: build_precond("edm2", net, **precond_kwargs),
                                 _weights(record, "unet."), "edm2's Precond(UNet)")
    except (TypeError, ValueError) as err:
        raise NVlabsPickleError(f"edm2's Precond with init kwargs {sorted(record.init_kwargs)}: {err}") from None
    meta = {
        "format": "nvlabs-edm2-pickle",
        "network": {"name": "edm2unet", "kwargs": net_kwargs},
        "precond": {"name": "edm2", "kwargs": precond_kwargs},
        "sigma_data": denoiser.sigma_data, "sigma_min": SAMPLING_RANGE[0], "sigma_max": SAMPLING_RANGE[1],
        "sample_shape": [channels, res, res], "num_classes": label_dim, "latent": latent,
        "config": None, "data": None, "schedule": None,
    }
    return denoiser.eval().requires_grad_(False), meta


def load_nvlabs_pickle(path: str | Path, *, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """`load_denoiser` for an NVlabs edm or edm2 pickle: its `ema` network as our denoiser D(x, sigma, labels)
    (integer class ids or None), sample shape, class count, the σ range edm's generate.py samples it on, no
    schedule; for edm2 also `meta['latent']` (None: pixels; else how to decode the latents)."""
    path = Path(path)
    data = read_nvlabs_pickle(path)
    record = data["ema"]
    try:
        if record.class_name == EDM2_PRECOND:
            denoiser, meta = build_edm2(record, data.get("encoder"))
        else:
            denoiser, meta = build_from_record(record)
    except CheckpointError as err:  # NVlabsPickleError, or build_checked's refusal
        raise NVlabsPickleError(f"{path}: {err}") from None
    return LoadedCheckpoint(denoiser.to(map_location), None, meta, path)


class VAEError(RuntimeError):
    """The VAE that decodes a latent model's samples cannot be loaded."""


class StabilityVAEDecoder:
    """edm2's StabilityVAEEncoder.decode: final latents z -> raw latents (z − bias)/scale per channel -> the
    Stable Diffusion VAE's decoder (diffusers AutoencoderKL, fed [0, 1] images by edm2) -> clamp to [0, 1] ->
    uint8 pixels (N, 3, H, W); run `batch_size` latents at a time."""

    def __init__(self, vae: Any, scale: Sequence[float], bias: Sequence[float], batch_size: int = 4) -> None:
        self.vae = vae
        self.scale = torch.tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.bias = torch.tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, latent: dict[str, Any], path: str | Path, device: torch.device | str = "cpu") -> StabilityVAEDecoder:
        """The decoder of `meta['latent']` with the VAE read from a local diffusers folder (no download)."""
        try:
            import diffusers
        except ImportError:
            raise VAEError(f"decoding {latent['vae_name']} latents needs the diffusers package (pip install "
                           "diffusers)") from None
        if not Path(path).is_dir():
            raise VAEError(f"{path} is not a folder holding a diffusers AutoencoderKL (config.json and weights of "
                           f"{latent['vae_name']})")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise VAEError(f"{path}: not a diffusers AutoencoderKL ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
        return cls(vae.eval().requires_grad_(False).to(device), latent["scale"], latent["bias"])

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(3, H, W) of the images decoded from latents of `latent_shape` (C, h, w): the VAE upsamples by 2 per
        level after the first (diffusers' vae_scale_factor)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 3, latent_shape[-2] * factor, latent_shape[-1] * factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        x = (z.to(torch.float32) - self.bias.to(z.device)) / self.scale.to(z.device)
        x = torch.cat([self.vae.decode(batch)["sample"] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)


NOMINAL_COUNT = 50_000
"""Sample count given to (mu, sigma) statistics, which store none (FID-50k); the covariance does not depend on it."""


def read_mu_sigma_npz(path: str | Path, num_features: int) -> dict[str, torch.Tensor]:
    """(mu, sigma) statistics in an .npz (edm's `fid.py ref`, pytorch-fid) as running sums (`sum`, `outer_sum`,
    `count` = NOMINAL_COUNT) from which the unbiased covariance gives back sigma; ValueError for another
    feature size or content."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:
        raise ValueError(f"stats file {path} is not a readable .npz: {type(err).__name__}: {err}") from None
    if not {"mu", "sigma"} <= set(arrays):
        raise ValueError(f"stats file {path} holds {sorted(arrays)}, not the arrays mu and sigma")
    mu = torch.from_numpy(arrays["mu"]).to(torch.float64)
    sigma = torch.from_numpy(arrays["sigma"]).to(torch.float64)
    if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
        raise ValueError(f"stats file {path} holds {tuple(mu.shape)}-d statistics (mu {tuple(mu.shape)}, sigma "
                         f"{tuple(sigma.shape)}); this score needs {num_features}-d features")
    n = NOMINAL_COUNT
    # sum = n·mu, outer_sum = (n − 1)·sigma + n·mu muᵀ, so that (outer_sum − n·mu muᵀ)/(n − 1) = sigma
    return {"sum": n * mu, "outer_sum": (n - 1) * sigma + n * torch.outer(mu, mu), "count": torch.tensor(n)}
