"""NVlabs edm pickles: every network kind matches edm's recorded outputs; no code from a pickle ever runs; other
files are refused with one line naming what was found."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance, rel_error, rounding_depth
from PIL import Image

from evodiff_pl.sampling import cli as sampling
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.sampling.generate import EvalSpec, generate, initial_noise
from evodiff_pl.networks.unet_blocks import UNetBlock
from evodiff_pl.evaluation.metrics import FrechetScore, frechet_distance, gaussian_fit
from evodiff_pl.io.nvlabs import NVlabsPickleError, read_mu_sigma_npz, read_nvlabs_pickle

DATA = Path(__file__).parent / "data"
LABEL_DIMS = {"ddpmpp_edm_cond": 4, "ncsnpp_vp": 0, "songunet_skip_ve_cond": 3, "adm_edm_cond": 5, "adm_iddpm": 0}
KINDS = list(LABEL_DIMS)
REF = np.load(DATA / "nvlabs_outputs.npz")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_edm(kind: str) -> None:
    """Ours in float64 on edm's float32 weights and inputs: the difference is edm's own float32 rounding."""
    loaded = load_denoiser(DATA / "nvlabs" / f"{kind}.pkl")
    net = loaded.denoiser.double()
    tol = float32_tolerance(rounding_depth(net))
    x, sigma = torch.from_numpy(REF[f"{kind}_x"]).double(), torch.from_numpy(REF[f"{kind}_sigma"]).double()
    labels = torch.from_numpy(REF[f"{kind}_labels"]) if f"{kind}_labels" in REF else None
    with torch.no_grad():
        assert rel_error(net(x, sigma, labels), REF[f"{kind}_D"]) <= tol
        if labels is not None:  # no labels = edm's all-zero class label
            assert rel_error(net(x, sigma), REF[f"{kind}_D_nolabel"]) <= tol
        if f"{kind}_F_aug" in REF:
            f = net.backbone(x, torch.from_numpy(REF[f"{kind}_c_noise"]).double(), labels,
                             torch.from_numpy(REF[f"{kind}_aug"]).double())
            assert rel_error(f, REF[f"{kind}_F_aug"]) <= tol
    lo, hi = REF[f"{kind}_sigma_range"]
    assert loaded.meta["sigma_min"] == pytest.approx(max(0.002, lo), rel=1e-6)
    assert loaded.meta["sigma_max"] == pytest.approx(min(80.0, hi), rel=1e-6)
    assert loaded.meta["sample_shape"] == list(x.shape[1:]) and loaded.schedule is None
    assert loaded.meta["num_classes"] == LABEL_DIMS[kind]


def test_multi_head_block_matches_edm() -> None:
    blk = UNetBlock(8, 16, 12, down=True, attention=True, num_heads=2, skip_scale=0.7, eps=1e-5,
                    resample_filter=(1, 3, 3, 1), resample_proj=True, adaptive_scale=True).eval().double()
    state = {k[len("block_state."):]: torch.from_numpy(REF[k]) for k in REF.files if k.startswith("block_state.")}
    blk.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = blk(torch.from_numpy(REF["block_x"]).double(), torch.from_numpy(REF["block_emb"]).double())
    assert rel_error(out, REF["block_out"]) <= float32_tolerance(rounding_depth(blk))


# --- hand-made NVlabs-style pickles (persistence records around arbitrary source and class names) -----------

def test_embedded_source_never_runs(tmp_path: Path, fake_persistence: type) -> None:
    marker = tmp_path / "side_effect.txt"
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    kwargs = dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=4,
                  channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    record = fake_persistence("EDMPrecond", source, _init_args=(), _init_kwargs=kwargs,
                              _parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict())
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": record}))
    with pytest.raises(NVlabsPickleError, match="do not fit"):  # read (no weights), and nothing executed
        load_denoiser(path)
    assert not marker.exists()


def _songunet_pickle(tmp_path: Path, fake_persistence: type, weights: dict, **overrides: object) -> Path:
    """A hand-made edm pickle: EDMPrecond(SongUNet) with the recorded kwargs (small unless overridden) and
    `weights` as its backbone's parameters."""
    kwargs = {**dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=4,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0), **overrides}
    empty = dict(_buffers=OrderedDict(), _modules=OrderedDict())
    unet = fake_persistence("SongUNet", _init_args=(), _init_kwargs={}, _parameters=OrderedDict(weights), **empty)
    record = fake_persistence("EDMPrecond", _init_args=(), _init_kwargs=kwargs, _parameters=OrderedDict(),
                              _buffers=OrderedDict(), _modules=OrderedDict(model=unet))
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": record}))
    return path


def test_a_huge_recorded_network_is_refused_before_any_allocation(tmp_path: Path, fake_persistence: type,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = _songunet_pickle(tmp_path, fake_persistence, {}, model_channels=200000)  # ~10^12 parameters
    with pytest.raises(NVlabsPickleError, match=r"would have \S+ parameters, more than 2e\+10 \(set "
                                                r"EVODIFF_MAX_PARAMETERS") as err:
        load_denoiser(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))
    monkeypatch.setenv("EVODIFF_MAX_PARAMETERS", "100")
    with pytest.raises(NVlabsPickleError, match=r"more than 100 "):
        load_denoiser(_songunet_pickle(tmp_path, fake_persistence, {}))


def test_weights_that_do_not_fit_name_the_first_keys(tmp_path: Path, fake_persistence: type) -> None:
    from evodiff_pl.networks import build_network

    key = next(iter(build_network("songunet", img_resolution=8, in_channels=1, out_channels=1, model_channels=4,
                                  channel_mult=[1], num_blocks=1, attn_resolutions=[]).state_dict()))
    path = _songunet_pickle(tmp_path, fake_persistence, {key: torch.zeros(1), "extra": torch.zeros(2)})
    with pytest.raises(NVlabsPickleError) as err:
        load_denoiser(path)
    message = str(err.value)
    assert "\n" not in message and "do not fit the network of its recorded arguments (missing backbone." in message
    assert "unexpected backbone.extra" in message and f"shape (file vs network) backbone.{key} (1,) vs (" in message


def test_refuses_other_globals_naming_the_class(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("hello",))

    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"ema": Payload()}))
    with pytest.raises(NVlabsPickleError, match=r"refuses to load builtins\.print") as err:
        load_denoiser(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("what,content,match", [
    ("stylegan", "stylegan", r"'G', 'G_ema'.*StyleGAN.*expected an NVlabs edm or edm2 pickle"),
    ("other_precond", "other_precond", r"'ema' is an NVlabs 'EDM3Precond'; expected an NVlabs edm or edm2"),
    ("torch_zip", "zip", r"torch\.save zip archive"),
    ("legacy_torch", "legacy", r"legacy torch\.save"),
    ("truncated", "truncated", r"truncated or not a pickle"),
    ("no_ema", "plain", r"holds keys \['net'\]"),
])
def test_other_kinds_get_one_clear_line(tmp_path: Path, fake_persistence: type, what: str, content: str,
                                        match: str) -> None:
    path = tmp_path / f"{what}.pkl"
    if content == "stylegan":
        path.write_bytes(pickle.dumps({"G": fake_persistence("Generator"), "D": fake_persistence("Discriminator"),
                                       "G_ema": fake_persistence("Generator"), "training_set_kwargs": {}}))
    elif content == "other_precond":
        path.write_bytes(pickle.dumps({"ema": fake_persistence("EDM3Precond"), "loss_fn": fake_persistence("Loss")}))
    elif content == "zip":
        torch.save({"w": torch.zeros(2)}, path)
    elif content == "legacy":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif content == "truncated":
        path.write_bytes((DATA / "nvlabs" / "adm_iddpm.pkl").read_bytes()[:5000])
    else:
        path.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(NVlabsPickleError, match=match) as err:
        read_nvlabs_pickle(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# --- sampling NVlabs pickles -------------------------------------------------------------------------------

def test_edm_protocol_reproduces_generate_py(tmp_path: Path) -> None:
    """sample.py's protocol=edm (Heun, 18 Karras levels, Euler to 0: 35 NFE) gives edm generate.py's images."""
    ref = np.load(DATA / "edm_generate_ddpmpp_edm_cond.npz")
    pkl = DATA / "nvlabs" / "ddpmpp_edm_cond.pkl"
    assert sampling.main([f"ckpt={pkl}", "solver=heun", "schedule=karras", "nfe=35", "protocol=edm", "seeds=0-7",
                          "format=npz", f"outdir={tmp_path}", "device=cpu", "batch=3", "progress=false"]) == 0
    out = np.load(tmp_path / "heun_karras_nfe35_edm.npz")
    assert np.array_equal(out["seeds"], np.arange(8))
    edm_float = ref["x_float64"].transpose(0, 2, 3, 1) * 127.5 + 128
    near_boundary = np.abs(edm_float - np.round(edm_float)) < 1e-4  # float32 round-off can flip these by 1
    differ = out["images"] != ref["images_uint8"]
    assert not (differ & ~near_boundary).any() and differ.sum() <= 2
    loaded = load_denoiser(pkl)
    spec = EvalSpec.parse("heun/karras/35/edm")
    _, labels = initial_noise(torch.arange(8), (3, 8, 8), 0, 4)
    assert spec.n_steps == 17 and np.array_equal(labels.numpy(), ref["labels"])
    x = generate(loaded.denoiser, torch.arange(8), (3, 8, 8), solver="heun", seed=0, batch_size=8, num_classes=4,
                 sigmas=spec.sigmas(loaded.meta["sigma_min"], loaded.meta["sigma_max"]), **spec.generate_options)
    # both sides evaluate the network in float32, 35 times: the roundings of every evaluation add up
    assert x.dtype == torch.float64 and rel_error(x, ref["x_float64"]) <= float32_tolerance(
        35 * rounding_depth(loaded.denoiser), sides=2)


def test_estimate_schedule_on_a_pickle_needs_data_and_writes_to_outdir(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    pkl = DATA / "nvlabs" / "ncsnpp_vp.pkl"
    assert sampling.main([f"ckpt={pkl}", "estimate_schedule=true", "device=cpu", "progress=false"]) == 1
    assert "stores no dataset" in capsys.readouterr().err
    folder = tmp_path / "images"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert sampling.main([f"ckpt={pkl}", "estimate_schedule=true", "levels=4", "pairs=6", "batch=12", "device=cpu",
                          "progress=false", "data.name=image_folder", f"data.root={folder}", "data.resolution=8",
                          "data.batch_size=6",
                          f"outdir={out}"]) == 0
    schedule = EntropicSchedule.load(out / "ncsnpp_vp_schedule_estimated.json")
    assert schedule.kind == "rescaled_entropic"
    assert not (pkl.parent / "ncsnpp_vp_schedule_estimated.json").exists()


# --- (mu, sigma) reference statistics of edm's fid.py and pytorch-fid ---------------------------------------

class _Flat(torch.nn.Module):
    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(torch.float64)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])  # edm fid.py ref / pytorch-fid --save-stats
def test_mu_sigma_npz_gives_the_frechet_distance_to_those_moments(tmp_path: Path, save) -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma = a @ a.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64)
    save(tmp_path / "ref.npz", mu=mu.numpy(), sigma=sigma.numpy())
    samples = torch.randn(40, 6, generator=g, dtype=torch.float64)
    score = FrechetScore(_Flat(), num_samples=40, stats_dir=tmp_path)
    score.load_real(read_mu_sigma_npz(tmp_path / "ref.npz", 6))
    score.update(samples)
    expected = frechet_distance(*gaussian_fit(samples), mu, sigma)
    assert score.compute() == pytest.approx(expected, rel=1e-9)


def test_mu_sigma_npz_of_the_wrong_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "other.npz", mean=np.zeros(2048))
    ckpt = Path(__file__).parents[1] / "benchmarks" / "results" / "digits_640k_ema.ckpt"
    for name, message in [("small", "holds (64,)-d statistics (mu (64,), sigma (64, 64)); this score needs 2048-d"),
                          ("other", "holds ['mean'], not the arrays mu and sigma")]:
        args = [f"ckpt={ckpt}", "score=fid_inception", f"stats={tmp_path / name}.npz", f"outdir={tmp_path / 'o'}",
                "device=cpu", "progress=false"]
        assert sampling.main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_a_record_without_its_shape_is_refused(tmp_path: Path, fake_persistence: type) -> None:
    path = tmp_path / "noshape.pkl"
    path.write_bytes(pickle.dumps({"ema": fake_persistence("EDMPrecond", _init_kwargs={"label_dim": 0})}))
    with pytest.raises(NVlabsPickleError, match="records no img_resolution"):
        load_denoiser(path)
