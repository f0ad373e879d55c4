"""NVlabs edm2 pickles: read without running their code into EDM2Precond (edm2's recorded outputs), sampled by
sample.py; latent models decoded as edm2's StabilityVAEEncoder does (a stand-in VAE: no download); bad input
gets one line."""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance, rel_error, rounding_depth

from evodiff_pl.sampling import cli as sampling
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.io.nvlabs import NVlabsPickleError, StabilityVAEDecoder

DATA = Path(__file__).parent / "data"
REF = np.load(DATA / "edm2_outputs.npz")
PIXEL, LATENT = DATA / "edm2" / "cond_attn.pkl", DATA / "edm2" / "latent_cond.pkl"


class FakeVAE:
    """Stands for diffusers' AutoencoderKL: the stand-in decoder the recorded `vae_pixels` were made with."""

    config = types.SimpleNamespace(block_out_channels=(1, 2, 3, 4))  # 3 upsamplings: 8x

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        img = torch.sigmoid(z[:, :3] * 1.5 - z[:, 3:] * 0.5)
        return {"sample": img.repeat_interleave(8, 2).repeat_interleave(8, 3) * 1.2 - 0.1}

    def eval(self) -> FakeVAE:
        return self

    def requires_grad_(self, flag: bool) -> FakeVAE:
        return self

    def to(self, device: object) -> FakeVAE:
        return self


@pytest.mark.parametrize("path,kind,latent", [(PIXEL, "cond_attn", False), (LATENT, "cond_filter", True)])
def test_pickles_load_and_match_edm2(path: Path, kind: str, latent: bool) -> None:
    loaded = load_denoiser(path)
    x, sigma, labels = (torch.from_numpy(REF[f"{kind}_{k}"]) for k in ("x", "sigma", "labels"))
    with torch.no_grad():
        d = loaded.denoiser.double()(x.double(), sigma.double(), labels)  # float64: only edm2's rounding differs
    assert rel_error(d, REF[f"{kind}_pkl_D"]) <= float32_tolerance(rounding_depth(loaded.denoiser))
    assert loaded.meta["sample_shape"] == list(x.shape[1:])
    assert loaded.meta["num_classes"] == {"cond_attn": 4, "cond_filter": 3}[kind]
    assert (loaded.meta["sigma_min"], loaded.meta["sigma_max"]) == (0.002, 80.0) and loaded.schedule is None
    assert (loaded.meta["latent"] is not None) == latent
    if latent:
        assert loaded.meta["latent"]["vae_name"] == "stabilityai/sd-vae-ft-mse"
        np.testing.assert_array_equal(np.float32(loaded.meta["latent"]["scale"]), REF["vae_scale"])
        np.testing.assert_array_equal(np.float32(loaded.meta["latent"]["bias"]), REF["vae_bias"])


def test_sample_py_samples_a_pixel_edm2_pickle(tmp_path: Path) -> None:
    args = [f"ckpt={PIXEL}", "solver=heun", "schedule=karras", "nfe=4", "seeds=0-3", "format=npz",
            f"outdir={tmp_path}", "device=cpu", "progress=false"]
    assert sampling.main(args) == 0
    out = np.load(tmp_path / "heun_karras_nfe4.npz")
    assert out["images"].shape == (4, 16, 16, 3) and out["images"].dtype == np.uint8


def test_decoding_is_edm2s() -> None:
    latent = load_denoiser(LATENT).meta["latent"]
    decoder = StabilityVAEDecoder(FakeVAE(), latent["scale"], latent["bias"], batch_size=2)
    pixels = decoder.decode(torch.from_numpy(REF["vae_latents"]))
    assert pixels.dtype == torch.uint8 and decoder.image_shape((4, 4, 4)) == (3, 32, 32)
    np.testing.assert_array_equal(pixels.numpy(), REF["vae_pixels"])


def test_sample_py_decodes_a_latent_pickle_with_the_given_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def from_pretrained(path: str, local_files_only: bool) -> FakeVAE:
        seen.append((path, local_files_only))
        return FakeVAE()

    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    vae = tmp_path / "vae"
    vae.mkdir()
    args = [f"ckpt={LATENT}", f"vae={vae}", "solver=euler", "schedule=karras", "nfe=2", "seeds=0-2", "format=npz",
            f"outdir={tmp_path / 'out'}", "device=cpu", "progress=false"]
    assert sampling.main(args) == 0
    assert seen == [(str(vae), True)]
    assert np.load(tmp_path / "out" / "euler_karras_nfe2.npz")["images"].shape == (3, 64, 64, 3)


@pytest.mark.parametrize("vae,diffusers,message", [
    (False, True, "is a latent EDM2 model (stabilityai/sd-vae-ft-mse latents): pass vae=PATH"),
    (True, False, "needs the diffusers package (pip install diffusers)"),
])
def test_latent_model_without_a_vae_gets_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture, vae: bool, diffusers: bool,
                                                  message: str) -> None:
    if not diffusers:
        monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails
    args = [f"ckpt={LATENT}", f"outdir={tmp_path}", "device=cpu", "progress=false", *([f"vae={tmp_path}"] * vae)]
    assert sampling.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def _record(fake_persistence: type, unet: str = "UNet", encoder: str | None = None, **kwargs: object) -> dict:
    init = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=4, channel_mult=[1, 2],
                attn_resolutions=[8], **kwargs)
    ema = fake_persistence("Precond", _init_args=(), _init_kwargs=init, _parameters=OrderedDict(),
                           _buffers=OrderedDict(), _modules=OrderedDict(unet=fake_persistence(unet)))
    return {"ema": ema, **({"encoder": fake_persistence(encoder)} if encoder else {})}


@pytest.mark.parametrize("change,match", [
    (dict(foo_bar=1, use_fp16=True), r"init kwargs \['foo_bar'\] that this reader does not know"),
    (dict(unet="DiT"), r"an NVlabs 'Precond' whose 'unet' is an NVlabs 'DiT', not edm2's 'UNet'"),
    (dict(encoder="FooEncoder"), r"'encoder' is an NVlabs 'FooEncoder', not one of StandardRGBEncoder"),
    (dict(), r"the weights of edm2's Precond\(UNet\) do not fit"),
])
def test_unknown_edm2_records_get_one_line(tmp_path: Path, fake_persistence: type, change: dict, match: str) -> None:
    path = tmp_path / "edm2.pkl"
    path.write_bytes(pickle.dumps(_record(fake_persistence, **change)))
    with pytest.raises(NVlabsPickleError, match=match) as err:
        load_denoiser(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
