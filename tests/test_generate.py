import numpy as np
import pytest
import torch
from PIL import Image

from evodiff_pl.sampling.generate import EvalSpec, generate, initial_noise, rank_indices, steps_for_nfe
from evodiff_pl.utils.images import save_grid
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.solvers import per_sample_noise, solve
from evodiff_pl.toy import GaussianMixture

SHAPE = (8,)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.default(dim=SHAPE[0], n_components=4, seed=1)


def _conditional(mixture):
    """A class-conditional denoiser whose output depends on the label (so label draws are exercised)."""
    return lambda x, sigma, labels: mixture.denoise(x, sigma) + 0.01 * labels[:, None].to(x.dtype)


@pytest.mark.parametrize("solver", ["evodiff", "heun", "edm_stochastic", "dpmpp_2m_sde"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_sample_depends_only_on_index_and_seed(mixture, solver, num_classes):
    denoiser = mixture.denoise if num_classes == 0 else _conditional(mixture)
    opts = dict(solver=solver, sigmas=get_sigmas("logsnr", 6, 0.002, 80.0), seed=11, num_classes=num_classes,
                dtype=torch.float64)
    n = 20
    idx = torch.arange(n)
    ref = generate(denoiser, idx, SHAPE, batch_size=4, **opts)
    assert ref.shape == (n, *SHAPE) and ref.dtype == torch.float64
    assert torch.equal(generate(denoiser, idx, SHAPE, batch_size=16, **opts), ref)
    assert torch.equal(generate(denoiser, torch.tensor([7]), SHAPE, batch_size=1, **opts), ref[7:8])
    assert torch.equal(generate(denoiser, torch.tensor([13, 2, 7]), SHAPE, batch_size=2, **opts), ref[[13, 2, 7]])
    for world_size in (1, 2, 3):
        out = torch.empty_like(ref)
        for rank in range(world_size):
            share = rank_indices(n, rank, world_size)
            out[share] = generate(denoiser, share, SHAPE, batch_size=3, **opts)
        assert torch.equal(out, ref)
    # sample j of base seed s is sample 0 of base seed s + j
    shifted = generate(denoiser, torch.tensor([0]), SHAPE, batch_size=1, **{**opts, "seed": 11 + 5})
    assert torch.equal(shifted[0], ref[5])
    assert not torch.equal(ref[0], ref[1])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_stochastic_solver_noise_continues_each_samples_generator(mixture, num_classes):
    """Sample j draws x_T, then its label, then the solver's noise from one generator seeded with seed + j."""
    denoiser = mixture.denoise if num_classes == 0 else _conditional(mixture)
    sigmas, idx = get_sigmas("karras", 5, 0.002, 80.0), torch.tensor([4, 1, 9])
    out = generate(denoiser, idx, SHAPE, solver="dpmpp_2m_sde", sigmas=sigmas, seed=3, batch_size=2,
                   num_classes=num_classes, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(3 + j) for j in idx.tolist()]
    x_T = torch.stack([torch.randn(SHAPE, generator=g) for g in generators]).double() * 80.0
    labels = torch.stack([torch.randint(3, (), generator=g) for g in generators]) if num_classes else None
    fn = denoiser if labels is None else (lambda x, s: denoiser(x, s, labels))
    expected = solve("dpmpp_2m_sde", fn, x_T, sigmas, noise=per_sample_noise(generators))
    assert torch.equal(out, expected)


def test_generate_rejects_a_noise_option(mixture):
    with pytest.raises(ValueError, match="each sample's seed"):
        generate(mixture.denoise, torch.arange(2), SHAPE, solver="edm_stochastic",
                 sigmas=get_sigmas("karras", 3, 0.002, 80.0), seed=0, batch_size=2, noise=lambda x: x)


@pytest.mark.parametrize(
    "spec, n_steps",
    [("unipc/karras/10", 10), ("ipndm/logsnr/5", 5), ("edm_stochastic/karras/20", 10), ("dpmpp_2m_sde/logsnr/8", 8)],
)
def test_eval_spec_accepts_the_extra_solvers(spec, n_steps):
    assert EvalSpec.parse(spec).n_steps == n_steps


def test_eval_spec_rejects_an_nfe_the_extra_solvers_cannot_make():
    with pytest.raises(ValueError, match="nearest valid: 4 or 6"):
        EvalSpec("edm_stochastic", "karras", 5)
    with pytest.raises(ValueError, match="cannot make exactly 1"):
        EvalSpec("unipc", "karras", 1)


def test_initial_noise_is_per_index_and_labels_follow_the_noise():
    noise, labels = initial_noise(torch.tensor([3, 0]), (2, 3), seed=5, num_classes=10)
    g = torch.Generator().manual_seed(8)
    assert torch.equal(noise[0], torch.randn(2, 3, generator=g))
    assert labels[0] == torch.randint(10, (), generator=g)
    assert labels.dtype == torch.int64 and labels.shape == (2,)
    assert initial_noise(torch.tensor([1]), (4,), seed=0)[1] is None


def test_generate_scales_noise_by_sigma_max_and_passes_labels(mixture):
    seen = {}

    def denoiser(x, sigma, labels):
        seen.setdefault("x", x.clone())
        seen.setdefault("labels", labels.clone())
        return torch.zeros_like(x)

    sigmas = get_sigmas("karras", 3, 0.002, 80.0)
    generate(denoiser, torch.arange(4), SHAPE, solver="euler", sigmas=sigmas, seed=2, batch_size=4, num_classes=5)
    noise, labels = initial_noise(torch.arange(4), SHAPE, seed=2, num_classes=5)
    assert torch.equal(seen["x"], noise * 80.0)
    assert torch.equal(seen["labels"], labels)


def test_generate_empty_and_progress(mixture, capsys):
    sigmas = get_sigmas("logsnr", 4, 0.002, 80.0)
    empty = generate(mixture.denoise, torch.arange(0), SHAPE, solver="dpmpp_2m", sigmas=sigmas, seed=0, batch_size=2)
    assert empty.shape == (0, *SHAPE)
    generate(mixture.denoise, torch.arange(3), SHAPE, solver="dpmpp_2m", sigmas=sigmas, seed=0, batch_size=2,
             progress=True)
    assert "img/s" in capsys.readouterr().err


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (7, 2), (2, 4)])
def test_rank_indices_partition(n, world_size):
    shares = [rank_indices(n, r, world_size) for r in range(world_size)]
    assert torch.equal(torch.cat(shares).sort().values, torch.arange(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(bool((s % world_size == r).all()) for r, s in enumerate(shares))
    with pytest.raises(ValueError):
        rank_indices(n, world_size, world_size)


def test_steps_for_nfe():
    assert steps_for_nfe("heun", 36) == 18
    assert steps_for_nfe("evodiff", 10) == 10
    assert steps_for_nfe("dpmpp_3m", 5) == 5
    assert steps_for_nfe("evodiff", 10, denoise_to_zero=True) == 9
    with pytest.raises(ValueError, match="heun.*35.*nearest valid: 34 or 36"):
        steps_for_nfe("heun", 35)
    with pytest.raises(ValueError, match="evodiff"):
        steps_for_nfe("evodiff", 1)


class _FakeLearned:
    kind = "rescaled_entropic"

    def sigmas(self, n_steps, sigma_min, sigma_max):
        return get_sigmas("logsnr", n_steps, sigma_min, sigma_max)


def test_eval_spec():
    spec = EvalSpec("evodiff", "rescaled_entropic", 10)
    assert spec.name == "evodiff_rescaled_entropic_nfe10"
    assert spec.needs_schedule and not EvalSpec("heun", "karras", 36).needs_schedule
    assert EvalSpec.parse("heun/karras/36") == EvalSpec("heun", "karras", 36)
    assert EvalSpec.parse({"solver": "dpmpp_2m", "schedule": "logsnr", "nfe": 10}).name == "dpmpp_2m_logsnr_nfe10"
    heun = EvalSpec("heun", "karras", 36).sigmas(0.002, 80.0)
    assert len(heun) == 19 and heun.dtype == torch.float64
    assert torch.equal(heun, get_sigmas("karras", 18, 0.002, 80.0))
    assert torch.equal(spec.sigmas(0.002, 80.0, schedule=_FakeLearned()), get_sigmas("logsnr", 10, 0.002, 80.0))
    with pytest.raises(ValueError, match="learned schedule"):
        spec.sigmas(0.002, 80.0)
    for bad, match in [(("heun", "karras", 35), "34 or 36"), (("rk4", "karras", 10), "unknown solver"),
                       (("euler", "cosine", 10), "unknown schedule"), (("euler", "karras", 0), "positive")]:
        with pytest.raises(ValueError, match=match):
            EvalSpec(*bad)
    with pytest.raises(ValueError, match="solver/schedule/nfe"):
        EvalSpec.parse("heun-karras-36")


@pytest.mark.parametrize("channels,scale", [(1, 1), (3, 1), (1, 2)])
def test_save_grid_writes_the_uint8_values(tmp_path, channels, scale):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, channels, 4 // scale, 6 // scale), dtype=torch.uint8, generator=g)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, scale=scale)
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    pad = 2  # torchvision's default padding
    assert grid.shape == (3, 2 * (4 + pad) + pad, 3 * (6 + pad) + pad)
    for k in range(5):
        r, c = divmod(k, 3)
        tile = grid[:, pad + r * (4 + pad):pad + r * (4 + pad) + 4, pad + c * (6 + pad):pad + c * (6 + pad) + 6]
        assert torch.equal(tile, images[k].expand(3, -1, -1))
    with pytest.raises(ValueError, match="uint8"):
        save_grid(images.float(), tmp_path / "x.png")
