"""Guidance and fixed classes: edm2's generate_images.py outputs (autoguidance, CFG with an unconditional gnet or the
null label, --class) reproduced by `generate`, sample.py and the evaluation callback; self-guidance changes nothing;
an image depends on its seed only; bad input gets one line."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance, rel_error, rounding_depth

from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.sampling import cli as sampling
from evodiff_pl.sampling.generate import EvalSpec, generate, initial_noise
from evodiff_pl.sampling.guidance import GuidedDenoiser, guide_of, guided

DATA = Path(__file__).parent / "data"
REF = np.load(DATA / "edm2_guidance.npz")
NET, GNET_COND, GNET_UNCOND = (DATA / "edm2" / f"{k}.pkl" for k in ("cond_attn", "cond_attn_gnet", "uncond_gnet"))
SHAPE, CLASSES, SEEDS = (3, 16, 16), 4, torch.arange(6)
CASES = {  # case: (gnet file, class) as recorded in tests/data/README.md
    "plain": (None, None), "class2": (None, 2), "autog": (GNET_COND, None), "cfg_uncond": (GNET_UNCOND, 1),
    "cfg_null": (None, None),
}
SPEC = "heun/karras/15/edm"  # edm2's edm_sampler with num_steps=8: 7 Heun steps and an Euler step to 0


def _spec(case: str) -> EvalSpec:
    options = {"guidance": float(REF[f"{case}_guidance"]), "class": CASES[case][1]}
    return EvalSpec.parse(SPEC + "".join(f"/{k}={v}" for k, v in options.items() if v is not None))


def _tol(net: torch.nn.Module) -> float:
    """Two float32 samplers (ours, edm2's) of 15 evaluations of the network and its guide: the roundings add up."""
    return float32_tolerance(2 * 15 * rounding_depth(net), sides=2)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return load_denoiser(NET).denoiser


@pytest.mark.parametrize("case", list(CASES))
def test_guided_sampler_reproduces_edm2(case: str, net: torch.nn.Module) -> None:
    spec = _spec(case)
    gnet = load_denoiser(CASES[case][0]) if CASES[case][0] else None
    denoiser = guided(net, spec.guidance, CLASSES, *guide_of(gnet))
    x = generate(denoiser, SEEDS, SHAPE, solver=spec.solver, sigmas=spec.sigmas(0.002, 80), seed=0, batch_size=4,
                 num_classes=CLASSES, **spec.generate_options)
    assert rel_error(x, REF[f"{case}_x"]) <= _tol(net)
    labels = initial_noise(SEEDS, SHAPE, 0, CLASSES)[1] if spec.class_label is None else torch.full((6,), spec.class_label)
    np.testing.assert_array_equal(labels.numpy(), REF[f"{case}_labels"])


@pytest.mark.parametrize("case, args", [("autog", [f"gnet={GNET_COND}", "guidance=1.7"]),
                                         ("cfg_uncond", [f"gnet={GNET_UNCOND}", "guidance=2", "class=1"])])
def test_sample_py_guidance_gives_edm2s_images(case: str, args: list[str], tmp_path: Path) -> None:
    assert sampling.main([f"ckpt={NET}", "solver=heun", "schedule=karras", "nfe=15", "protocol=edm", "seeds=0-5",
                          "batch=4", "format=npz", f"outdir={tmp_path}", "device=cpu", "progress=false", *args]) == 0
    out = np.load(tmp_path / f"{_spec(case).name}.npz")
    edm2_float = REF[f"{case}_x"].transpose(0, 2, 3, 1) * 127.5 + 128
    near_boundary = np.abs(edm2_float - np.round(edm2_float)) < 1e-3  # float32 round-off can flip these by 1
    differ = out["images"] != REF[f"{case}_images"]
    assert not (differ & ~near_boundary).any()


def test_guiding_a_network_by_itself_changes_nothing(net: torch.nn.Module, tmp_path: Path) -> None:
    x, sigma, labels = torch.randn(3, *SHAPE), torch.tensor([0.01, 1.0, 50.0]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        assert torch.equal(guided(net, 2.5, CLASSES, net, CLASSES)(x, sigma, labels), net(x, sigma, labels))
    assert guided(net, 1.0, CLASSES) is net
    common = [f"ckpt={NET}", "solver=euler", "schedule=karras", "nfe=4", "seeds=0-2", "format=npz", "device=cpu",
              "progress=false", "class=3"]
    assert sampling.main([*common, f"outdir={tmp_path}/a"]) == 0
    assert sampling.main([*common, f"outdir={tmp_path}/b", f"gnet={NET}", "guidance=3"]) == 0
    a = np.load(tmp_path / "a" / "euler_karras_nfe4_class3.npz")["images"]
    assert np.array_equal(a, np.load(tmp_path / "b" / "euler_karras_nfe4_guidance3_class3.npz")["images"])


def test_a_guided_image_depends_on_its_seed_only(net: torch.nn.Module) -> None:
    denoiser = guided(net, 1.8, CLASSES, load_denoiser(GNET_UNCOND).denoiser, 0)
    options = dict(solver="dpmpp_2m_sde", sigmas=EvalSpec.parse("euler/karras/3").sigmas(0.002, 80), seed=7,
                   num_classes=CLASSES)
    every = generate(denoiser, torch.arange(5), SHAPE, batch_size=5, **options)
    some = generate(denoiser, torch.tensor([4, 1]), SHAPE, batch_size=1, **options)
    assert rel_error(some, every[[4, 1]].numpy()) <= _tol(net)  # a batch of another size rounds differently, nothing more
    fixed = generate(denoiser, torch.arange(5), SHAPE, batch_size=2, class_label=2, **options)
    one = generate(denoiser, torch.tensor([3]), SHAPE, batch_size=2, class_label=2, **options)
    assert rel_error(one, fixed[[3]].numpy()) <= _tol(net) and rel_error(fixed, every.numpy()) > 1e-3


def test_cfg_with_the_null_label_calls_the_network_without_labels() -> None:
    calls = []

    def net(x, sigma, labels=None):
        calls.append(labels)
        return x * (2.0 if labels is None else 3.0)

    d = guided(net, 1.5, 4)
    assert isinstance(d, GuidedDenoiser) and calls == []
    assert torch.equal(d(torch.ones(2), torch.ones(2), torch.tensor([1, 2])), torch.full((2,), 2 + 1.5 * (3 - 2.0)))
    assert calls[0] is not None and calls[1] is None


def test_eval_spec_guidance_and_class() -> None:
    spec = EvalSpec.parse("heun/karras/35/edm/guidance=1.5/class=3")
    assert (spec.protocol, spec.guidance, spec.class_label) == ("edm", 1.5, 3)
    assert spec.name == "heun_karras_nfe35_edm_guidance1.5_class3"
    assert spec.generate_options["class_label"] == 3
    assert EvalSpec.parse({"solver": "euler", "schedule": "karras", "nfe": 4, "guidance": 2}).name \
        == "euler_karras_nfe4_guidance2"
    assert EvalSpec.parse("euler/karras/4/class=0").name == "euler_karras_nfe4_class0"
    for bad in ("euler/karras/4/guide=2", "euler/karras/4/guidance=x", "euler/karras/4/class=-1",
                "euler/karras/4/guidance=nan", "euler/karras/4/edm/default"):
        with pytest.raises(ValueError):
            EvalSpec.parse(bad)


@pytest.mark.parametrize("ckpt, args, match", [
    (GNET_UNCOND, ["guidance=2"], "unconditional network needs a guiding network"),
    (GNET_UNCOND, ["class=0"], "is unconditional"),
    (NET, ["class=4"], r"not a class of .* \(0-3\)"),
    (NET, [f"gnet={GNET_COND}"], "guidance=1"),
    (NET, [f"gnet={DATA / 'edm2' / 'latent_cond.pkl'}", "guidance=2"], "sample_shape"),
    (NET, ["guidance=inf"], "finite"),
])
def test_bad_guidance_is_one_line(ckpt: Path, args: list[str], match: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    assert sampling.main([f"ckpt={ckpt}", "nfe=4", "schedule=karras", "device=cpu", f"outdir={tmp_path}/o",
                          "progress=false", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(match, err)
    assert not (tmp_path / "o").exists()


def test_callback_samples_guided_specs(net: torch.nn.Module) -> None:
    cb = SampleQualityCallback([SPEC + "/guidance=1.7"], num_samples=6, batch_size=4, gnet=GNET_COND)
    module = SimpleNamespace(ema=net, sample_shape=SHAPE, num_classes=CLASSES, device=torch.device("cpu"))
    cb._check_guidance(module)
    spec = cb.specs[0]
    assert rel_error(cb._sample(module, spec, spec.sigmas(0.002, 80), SEEDS), REF["autog_x"]) <= _tol(net)
    with pytest.raises(ValueError, match="needs a guiding network"):
        SampleQualityCallback(["euler/karras/4/guidance=2"])._check_guidance(
            SimpleNamespace(ema=net, sample_shape=SHAPE, num_classes=0, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="class 5"):
        SampleQualityCallback(["euler/karras/4/class=5"])._check_guidance(module)
