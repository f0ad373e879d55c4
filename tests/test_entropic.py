"""Entropic-time schedules against closed forms, the exact mixture, and 1- vs 2-process statistics (docs/method.md §3)."""

import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train_utils import free_port

from evodiff_pl.schedules.entropic import KINDS, EntropicSchedule, edm_loss_weight, estimate_mmse
from evodiff_pl.schedules.tracker import SigmaBinnedLoss
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.toy import GaussianMixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _gaussian_schedule(c: float, kind: str) -> EntropicSchedule:
    sigmas = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 2049, dtype=torch.float64)
    # Gaussian data N(0, c^2 I): m = sigma^2 c^2 / (sigma^2 + c^2)  (docs/method.md §3)
    return EntropicSchedule.from_mmse(sigmas, sigmas**2 * c**2 / (sigmas**2 + c**2), kind=kind)


@pytest.mark.parametrize("c", [0.1, 0.5, 2.0, 5.0])
def test_rescaled_schedule_of_gaussian_data_is_closed_form(c):
    sched = _gaussian_schedule(c, "rescaled")
    assert sched.kind == "rescaled_entropic"
    a_max, a_min = math.atan(SIGMA_MAX / c), math.atan(SIGMA_MIN / c)
    for n in (1, 3, 10, 35):
        j = torch.arange(n + 1, dtype=torch.float64)
        # sigma_j = c tan(alpha_max + j/N (alpha_min - alpha_max))  (docs/method.md §3, N + 1 levels j = 0..N)
        expected = c * torch.tan(a_max + j / n * (a_min - a_max))
        got = sched.sigmas(n, SIGMA_MIN, SIGMA_MAX)
        assert got.dtype == torch.float64 and got.shape == (n + 1,)
        assert got[0].item() == SIGMA_MAX and got[-1].item() == SIGMA_MIN
        assert (got.log() - expected.log()).abs().max().item() < 1e-4


@pytest.mark.parametrize("c", [0.1, 0.5, 2.0, 5.0])
def test_entropic_schedule_of_gaussian_data_is_closed_form(c):
    sched = _gaussian_schedule(c, "entropic")

    def entropy(s: float) -> float:
        # H(sigma) = 1/2 ln(sigma^2 / (sigma^2 + c^2)) + const, the integral of c^2 / (sigma^2 + c^2) d ln sigma
        return -0.5 * math.log1p(c * c / (s * s))

    for n in (1, 3, 10, 35):
        tau = 1 - torch.arange(n + 1, dtype=torch.float64) / n
        h = entropy(SIGMA_MIN) + tau * (entropy(SIGMA_MAX) - entropy(SIGMA_MIN))
        expected = c / torch.expm1(-2 * h).sqrt()
        got = sched.sigmas(n, SIGMA_MIN, SIGMA_MAX)
        assert (got.log() - expected.log()).abs().max().item() < 1e-4


def test_schedule_is_recomputed_per_n_and_served_by_the_registry():
    sched = _gaussian_schedule(1.0, "rescaled_entropic")
    s10, s20 = sched.sigmas(10), sched.sigmas(20)
    assert (s10[1:] < s10[:-1]).all() and (s20[1:] < s20[:-1]).all()
    # Every second level of the 20-step grid lies on the 10-step grid here (uniform tau), to quadrature accuracy.
    assert (s20[::2].log() - s10.log()).abs().max().item() < 1e-6
    assert torch.equal(get_sigmas("rescaled_entropic", 10, SIGMA_MIN, SIGMA_MAX, schedule=sched), s10)
    with pytest.raises(ValueError, match="given schedule is 'rescaled_entropic'"):
        get_sigmas("entropic", 10, schedule=sched)
    tau = sched.tau(s10)
    assert (tau - torch.linspace(1, 0, 11, dtype=torch.float64)).abs().max().item() < 1e-12


def test_colliding_levels_are_nudged_by_single_ulps():
    from evodiff_pl.schedules.entropic import _strictly_decreasing

    s = torch.tensor([80.0, 1.0, 1.0, 1.0, 0.5, 0.002], dtype=torch.float64)
    out = _strictly_decreasing(s)
    assert (out[1:] < out[:-1]).all()
    assert (out - s).abs().max().item() <= 2 * torch.finfo(torch.float64).eps
    assert out[0].item() == 80.0 and out[-1].item() == 0.002


def _training_log(gm: GaussianMixture, n: int, batch: int, seed: int):
    """Per-sample (sigma, x0-space MSE, lambda) of the exact denoiser at EDM training sigmas."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n // batch):
        x0 = gm.sample(batch, generator=g)
        # ln sigma ~ N(P_mean = -1.2, P_std = 1.2)  (docs/method.md §1)
        sigma = (-1.2 + 1.2 * torch.randn(batch, generator=g, dtype=torch.float64)).exp()
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        mse = (gm.denoise(x0 + sigma[:, None] * noise, sigma) - x0).square().mean(1)
        yield sigma, mse, edm_loss_weight(sigma, 0.5)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.default(dim=64, n_components=8, seed=0)


def test_schedule_from_training_loss_matches_exact_mmse_schedule(mixture):
    sigmas = torch.logspace(math.log10(SIGMA_MIN), math.log10(SIGMA_MAX), 65, dtype=torch.float64)
    exact = mixture.mmse(sigmas, n_mc=4096, generator=torch.Generator().manual_seed(1))
    tracker = SigmaBinnedLoss(SIGMA_MIN, SIGMA_MAX, n_bins=64, sigma_data=0.5)
    for sigma, mse, weight in _training_log(mixture, n=131072, batch=8192, seed=2):
        tracker.update(sigma, mse, weight)
    tracker.sync()
    assert tracker.counts().sum().item() > 0.9999 * 131072
    for kind in KINDS:
        reference = EntropicSchedule.from_mmse(sigmas, exact, kind=kind)
        learned = EntropicSchedule.from_loss_stats(tracker, kind=kind)
        for n in (5, 10, 20):
            diff = (learned.sigmas(n).log() - reference.sigmas(n).log())[1:-1].abs().max().item()
            print(f"{kind} n_steps={n}: max |d ln sigma| over interior levels = {diff:.4f}")
            assert diff < 0.1


def test_tracker_bins_match_a_direct_computation():
    tracker = SigmaBinnedLoss(0.01, 10.0, n_bins=6, sigma_data=0.5)
    g = torch.Generator().manual_seed(3)
    sigma = torch.cat([(torch.rand(500, generator=g, dtype=torch.float64) * 11 - 6).exp(),
                       torch.tensor([0.01, 10.0, 0.0099, 10.01, math.nan], dtype=torch.float64)])
    mse = torch.rand(sigma.shape, generator=g, dtype=torch.float64)
    weight = edm_loss_weight(sigma)
    tracker.update(sigma.float(), mse.float(), weight.float())
    tracker.update(sigma, mse, weight)
    # Both updates in float64, the first from float32 inputs (float32(0.01) < 0.01 is dropped).
    log_sigma = torch.cat([sigma.float().double(), sigma]).log()
    q = torch.cat([weight.float().double() * mse.float().double(), weight * mse])
    edges = torch.linspace(math.log(0.01), math.log(10.0), 7, dtype=torch.float64)
    upper = torch.cat([edges[1:-1], torch.nextafter(edges[-1:], torch.tensor(math.inf, dtype=torch.float64))])
    inside = (log_sigma[:, None] >= edges[:-1]) & (log_sigma[:, None] < upper)  # (samples, bins)
    assert torch.equal(tracker.counts(), inside.sum(0).double())
    assert tracker.counts().sum().item() < 2 * sigma.numel() - 300
    expected_sums = torch.where(inside, q[:, None], 0.0).sum(0)
    assert (tracker.sums() - expected_sums).abs().max().item() < 1e-12 * expected_sums.max().item()
    assert (tracker.bin_centers().log() - 0.5 * (edges[1:] + edges[:-1])).abs().max().item() < 1e-15
    empty = SigmaBinnedLoss(n_bins=8)
    empty.update(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]))
    assert empty.mean_q().isnan().sum().item() == 7 and empty.mean_q().nansum().item() == 1.0
    assert empty.populated().sum().item() == 1
    empty.reset()
    assert empty.counts().sum().item() == 0.0 and empty.steps == 0


def _synthetic_log(steps: int = 12, batch: int = 64):
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        sigma = (-1.2 + 1.8 * torch.randn(batch, generator=g)).exp()
        yield sigma, torch.rand(batch, generator=g) * sigma.clamp(max=1), edm_loss_weight(sigma)


_TRACKERS = {"plain": None, "ema": 0.8}


def _feed(trackers: dict[str, SigmaBinnedLoss], rank: int, world: int) -> None:
    for step, (sigma, mse, weight) in enumerate(_synthetic_log()):
        for t in trackers.values():
            t.update(sigma[rank::world], mse[rank::world], weight[rank::world])
            if step % 5 == 4:
                t.sync()
    for t in trackers.values():
        t.sync()


def _estimate(mixture: GaussianMixture, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return estimate_mmse(mixture.denoise, mixture.sample, n_levels=6, n_pairs=101, batch_size=batch_size,
                         seed=4, progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trackers = {k: SigmaBinnedLoss(ema_decay=d) for k, d in _TRACKERS.items()}
        _feed(trackers, rank, world)
        result = {k: t.state_dict() for k, t in trackers.items()}
        for t in trackers.values():  # a checkpoint with pending sums: each rank resumes its own, unfolded
            t.update(*(x[rank::world] for x in next(iter(_synthetic_log()))))
        saved = {k: t.state_dict() for k, t in trackers.items()}
        result["pending_rows"] = [tuple(s["pending_sum"].shape) for s in saved.values()]
        restored = {k: SigmaBinnedLoss(ema_decay=d) for k, d in _TRACKERS.items()}
        for k in trackers:
            restored[k].load_state_dict(saved[k])
            trackers[k].sync()
            restored[k].sync()
        result["resumed_exactly"] = all(torch.equal(trackers[k].sums(), restored[k].sums()) for k in trackers)
        result["mmse"] = _estimate(GaussianMixture.default(), batch_size=16)[1]
        uneven = SigmaBinnedLoss()
        for _ in range(rank + 1):
            uneven.update(torch.ones(2), torch.ones(2), torch.ones(2))
        for name, call in (("sync", uneven.sync), ("state_dict", uneven.state_dict)):
            try:
                call()
            except RuntimeError as err:
                result[name] = str(err)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_give_the_statistics_of_one(mixture):
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = {k: SigmaBinnedLoss(ema_decay=d) for k, d in _TRACKERS.items()}
    _feed(single, 0, 1)
    for k, t in single.items():
        ref = t.state_dict()
        assert ref["steps"] == 12 and ranks[0][k]["steps"] == 12
        for r in range(2):
            for field in ("sum", "count"):
                err = (ranks[r][k][field] - ref[field]).abs().max().item()
                assert err <= 1e-12 * ref[field].abs().max().item(), (k, r, field, err)
    assert ranks[0]["ema"]["count"].sum().item() < 0.5 * ranks[0]["plain"]["count"].sum().item()
    for r in range(2):
        assert ranks[r]["pending_rows"] == [(2, 64)] * len(_TRACKERS) and ranks[r]["resumed_exactly"]
        assert "called 1 to 2 times per rank" in ranks[r]["sync"]
        assert "called 1 to 2 times per rank" in ranks[r]["state_dict"]
    ref_mmse = _estimate(mixture, batch_size=16)[1]
    for r in range(2):
        assert (ranks[r]["mmse"] / ref_mmse - 1).abs().max().item() < 1e-12


def test_tracker_checkpoint_restores_exactly():
    log = list(_synthetic_log(steps=10))
    tracker = SigmaBinnedLoss(ema_decay=0.9)
    for step in log[:5]:
        tracker.update(*step)
    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)
    restored = SigmaBinnedLoss(ema_decay=0.9)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for step in log[5:]:
        tracker.update(*step)
        restored.update(*step)
    assert torch.equal(tracker.sums(), restored.sums()) and torch.equal(tracker.counts(), restored.counts())
    assert tracker.steps == restored.steps == 10
    in_range = [((s >= SIGMA_MIN) & (s <= SIGMA_MAX)).sum().item() for s, _, _ in log]
    expected = sum(0.9 ** (9 - k) * n for k, n in enumerate(in_range))
    assert tracker.counts().sum().item() == pytest.approx(expected, rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="config mismatch"):
        SigmaBinnedLoss(ema_decay=0.99).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="not a SigmaBinnedLoss"):
        SigmaBinnedLoss().load_state_dict({"sum": torch.zeros(64)})


def test_schedule_json_round_trip_is_exact(tmp_path, mixture):
    tracker = SigmaBinnedLoss()
    for step in _training_log(mixture, n=8192, batch=4096, seed=6):
        tracker.update(*step)
    sched = EntropicSchedule.from_loss_stats(tracker, kind="entropic", dim=64, source={"images_seen": 8192})
    path = tmp_path / "schedule.json"
    sched.save(path)
    loaded = EntropicSchedule.load(path)
    assert torch.equal(loaded.log_sigma, sched.log_sigma) and torch.equal(loaded.q, sched.q)
    assert (loaded.kind, loaded.dim, loaded.sigma_data) == ("entropic", 64, 0.5)
    assert loaded.sigma_range == (SIGMA_MIN, SIGMA_MAX)
    assert loaded.source["images_seen"] == 8192 and loaded.source["effective_samples"] == tracker.counts().sum().item()
    assert torch.equal(loaded.sigmas(13), sched.sigmas(13))
    probe = torch.tensor([0.003, 0.3, 30.0], dtype=torch.float64)
    assert torch.equal(EntropicSchedule.from_dict(sched.to_dict()).rate(probe), sched.rate(probe))
    loaded.check_sigma_range(SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match=r"estimated on sigma in \[0.002, 80.0\]"):
        loaded.check_sigma_range(0.002, 160.0)
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"kind": "entropic"}), json.dumps({**sched.to_dict(), "version": 99})):
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.json"):
            EntropicSchedule.load(bad)


def test_estimate_mmse_reproduces_the_exact_mmse_and_ignores_batch_size(mixture):
    n_pairs = 2048
    data = mixture.sample(n_pairs, generator=torch.Generator().manual_seed(8))
    sigmas, m = estimate_mmse(mixture.denoise, data, n_levels=12, n_pairs=n_pairs, batch_size=512, seed=9,
                              progress=False)
    assert torch.equal(sigmas, get_sigmas("karras", 11, SIGMA_MIN, SIGMA_MAX))
    exact = mixture.mmse(sigmas, n_mc=8192, generator=torch.Generator().manual_seed(10))
    # Standard error of a mean of n_pairs per-sample squared errors, from an independent draw.
    g = torch.Generator().manual_seed(11)
    x0 = mixture.sample(n_pairs, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    se = torch.stack([(mixture.denoise(x0 + s * noise, s) - x0).square().mean(1).std() for s in sigmas.tolist()])
    z = ((m - exact).abs() / (se / math.sqrt(n_pairs))).max().item()
    print(f"estimate_mmse vs exact MMSE: max |z| = {z:.2f} over {sigmas.numel()} levels")
    assert z < 5.0
    for batch_size in (100, 2048):
        other = estimate_mmse(mixture.denoise, data, n_levels=12, n_pairs=n_pairs, batch_size=batch_size, seed=9,
                              progress=False)[1]
        assert (other / m - 1).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="needs n_pairs=4096"):
        estimate_mmse(mixture.denoise, data, n_pairs=4096, progress=False)


def test_estimate_mmse_with_labels_gives_the_exact_conditional_mmse(mixture):
    """Labels = mixture components: D(x, sigma, c) is component c's Gaussian posterior mean, and the MMSE given
    the class has the closed form sum_c w_c v_c sigma^2 / (v_c + sigma^2) per dimension."""
    w, mu, v = mixture.weights, mixture.means, mixture.variances

    def conditional(x, sigma, labels):
        s2 = sigma.to(torch.float64)[:, None] ** 2
        vc = v[labels][:, None]
        return mu[labels] + vc / (vc + s2) * (x - mu[labels])

    n_pairs = 4096
    data = mixture.sample(n_pairs, generator=torch.Generator().manual_seed(12), return_labels=True)
    sigmas, m = estimate_mmse(conditional, data, n_levels=10, n_pairs=n_pairs, batch_size=1000, seed=13,
                              progress=False)
    exact = (w[:, None] * v[:, None] * sigmas**2 / (v[:, None] + sigmas**2)).sum(0)
    rel = ((m - exact) / exact).abs().max().item()
    print(f"conditional estimate_mmse vs closed form: max relative error {rel:.4f}")
    assert rel < 0.03  # one noise draw per pair: ~1 / sqrt(n_pairs * dim) = 0.2 % per level, plus class mix
    unconditional = estimate_mmse(mixture.denoise, data[0], n_levels=10, n_pairs=n_pairs, seed=13, progress=False)[1]
    print("unconditional / conditional MMSE per level:", [round(r, 2) for r in (unconditional / m).tolist()])
    assert bool((unconditional >= m * (1 - 0.01)).all()) and (unconditional / m).max().item() > 2  # class info helps
    sampler = lambda n, g: mixture.sample(n, generator=g, return_labels=True)  # noqa: E731
    for batch_size in (333, 4096):
        other = estimate_mmse(conditional, sampler, n_levels=10, n_pairs=n_pairs, batch_size=batch_size, seed=13,
                              progress=False)[1]
        assert (other / estimate_mmse(conditional, sampler, n_levels=10, n_pairs=n_pairs, seed=13,
                                      progress=False)[1] - 1).abs().max().item() < 1e-12


def test_invalid_inputs_raise_clear_errors():
    sigmas = torch.logspace(-2, 1, 16, dtype=torch.float64)
    m = sigmas**2 / (sigmas**2 + 1)
    with pytest.raises(ValueError, match="unknown kind 'vp'"):
        EntropicSchedule.from_mmse(sigmas, m, kind="vp")
    with pytest.raises(ValueError, match="strictly monotone"):
        EntropicSchedule.from_mmse(sigmas[[0, 2, 1, 3]], m[[0, 2, 1, 3]])
    with pytest.raises(ValueError, match="finite and > 0"):
        EntropicSchedule.from_mmse(sigmas, torch.where(sigmas > 1, -m, m))
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        EntropicSchedule.from_mmse(sigmas, m).sigmas(0)
    tracker = SigmaBinnedLoss()
    sigma = torch.tensor([0.1, 0.2, 0.4] * 64)
    tracker.update(sigma, torch.full_like(sigma, 0.01), edm_loss_weight(sigma))
    with pytest.raises(ValueError, match="192 samples in 3 groups of >= 64; need at least 4 groups"):
        EntropicSchedule.from_loss_stats(tracker)
    assert EntropicSchedule.from_loss_stats(tracker, min_populated_bins=3).q.shape == (3,)
    tracker.update(torch.tensor([0.2]), torch.tensor([math.nan]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not finite and positive at sigma = 0.1899"):
        EntropicSchedule.from_loss_stats(tracker, min_populated_bins=3)
    with pytest.raises(ValueError, match="one value per sample"):
        tracker.update(torch.ones(3), torch.ones(2), torch.ones(3))
