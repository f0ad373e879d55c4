"""Power-function EMA: σ_rel ↔ γ, per-step decay and post-hoc coefficients against NVlabs edm2's numbers, the
tracked EMA and its post-hoc reconstruction against closed forms on a scalar trajectory, and the command's
one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evodiff_pl.training.clock import lr_edm2
from evodiff_pl.training.phema import (gamma_to_std, list_snapshots, main, power_beta, reconstruct, save_snapshot,
                              solve_coefficients, std_to_gamma)
from evodiff_pl.training.ema import update_ema

REF = np.load(Path(__file__).parent / "data" / "edm2_phema_reference.npz")


def test_std_gamma_and_beta_match_edm2():
    gammas = [std_to_gamma(float(s)) for s in REF["stds"]]
    np.testing.assert_allclose(gammas, REF["gammas"], rtol=1e-10)
    np.testing.assert_allclose([gamma_to_std(g) for g in gammas], REF["stds"], rtol=1e-10)
    betas = [power_beta(g, int(REF["beta_t_next"]), int(REF["beta_t_delta"])) for g in gammas]
    np.testing.assert_allclose(betas, REF["beta"], rtol=1e-10)
    assert power_beta(std_to_gamma(0.05), 512, 512) == 0.0  # the first step copies the weights
    with pytest.raises(ValueError, match="0 < std < 0.2887"):
        std_to_gamma(0.3)


def test_posthoc_coefficients_match_edm2():
    for j, std in enumerate(REF["out_std"]):
        rec = solve_coefficients(REF["in_nimg"], REF["in_std"], float(REF["out_nimg"]), float(std))
        np.testing.assert_allclose(rec.coefficients, REF["coefs"][:, j], rtol=1e-6, atol=1e-9)


def test_lr_schedule_matches_edm2():
    # edm2-img64-xs: ref_lr 0.012, ref_batches 35000 of 2048 images, 10 M images of warm-up
    lrs = [lr_edm2(int(n), 0.012, 10_000_000, 35_000 * 2048) for n in REF["lr_nimg"]]
    np.testing.assert_allclose(lrs, REF["lr"], rtol=1e-12)
    assert lr_edm2(4 * 71_680_000, 0.012, 10_000_000, 71_680_000) == pytest.approx(0.006)  # 1/√4 by hand
    assert lr_edm2(4 * 71_680_000, 0.012, 10_000_000, 0) == 0.012  # no decay


def theta(t: np.ndarray | float, t_end: float) -> np.ndarray:
    """The scalar 'weights' of the synthetic run: 1 − 2 (t/T) + 3 (t/T)³."""
    x = np.asarray(t, dtype=np.float64) / t_end
    return 1 - 2 * x + 3 * x**3


def continuous_phema(gamma: float, t: float, t_end: float) -> float:
    """∫ (γ+1) τ^γ / t^(γ+1) θ(τ) dτ for θ above: a term c τ^k averages to c (γ+1)/(γ+k+1) t^k."""
    x = t / t_end
    return 1 - 2 * (gamma + 1) / (gamma + 2) * x + 3 * (gamma + 1) / (gamma + 4) * x**3


def run_profiles(stds, steps, batch, every, folder=None):
    """Track power-function EMAs of the scalar trajectory with the training code's update; snapshots (if `folder`)."""
    net = nn.Linear(1, 1, bias=False).double()
    emas = [nn.Linear(1, 1, bias=False).double().requires_grad_(False) for _ in stds]
    gammas = [std_to_gamma(s) for s in stds]
    t_end = steps * batch
    for n in range(1, steps + 1):
        with torch.no_grad():
            net.weight.fill_(float(theta(n * batch, t_end)))
        for ema, g in zip(emas, gammas):
            update_ema(ema, net, power_beta(g, n * batch, batch))
        if folder is not None and (n * batch) % every == 0:
            for s, ema in zip(stds, emas):
                save_snapshot(folder, n * batch, s, ema, {"toy": True})
    return [float(e.weight) for e in emas], gammas, t_end


def test_tracked_profile_is_the_discrete_closed_form():
    steps, batch = 400, 16
    values, gammas, t_end = run_profiles([0.05, 0.10], steps, batch, every=0)
    n = np.arange(1, steps + 1)
    for v, g in zip(values, gammas):
        # β_n = ((n−1)/n)^(γ+1) unrolls to weights (n^(γ+1) − (n−1)^(γ+1)) / N^(γ+1) on θ(n Δ)
        w = (n ** (g + 1) - (n - 1) ** (g + 1)) / steps ** (g + 1)
        assert v == pytest.approx(float(w @ theta(n * batch, t_end)), rel=1e-12)
        assert v == pytest.approx(continuous_phema(g, t_end, t_end), abs=2e-2)


def test_reconstruction_of_an_unseen_std_matches_the_closed_form(tmp_path):
    steps, batch, every = 4000, 8, 1000
    run_profiles([0.05, 0.10], steps, batch, every, folder=tmp_path)
    assert len(list_snapshots(tmp_path)) == 2 * steps * batch // every
    for std in (0.03, 0.07, 0.15):
        state, meta, rec = reconstruct(tmp_path, std)
        exact = continuous_phema(std_to_gamma(std), steps * batch, steps * batch)
        assert meta == {"toy": True} and rec.residual < 0.05
        assert float(state["weight"]) == pytest.approx(exact, abs=1.5e-3)  # measured <= 9e-4: the O(Δt/t) of the steps
    # an earlier snapshot time, from the snapshots up to it
    state, _, rec = reconstruct(tmp_path, 0.08, images=16000)
    assert float(state["weight"]) == pytest.approx(continuous_phema(std_to_gamma(0.08), 16000, steps * batch), abs=3e-3)


def test_command_refuses_a_length_it_cannot_reconstruct(tmp_path, capsys):
    run_profiles([0.05, 0.10], 64, 8, 128, folder=tmp_path)
    assert main([f"run.dir={tmp_path}", "std=0.005"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "std=0.005 cannot be reconstructed" in err and "reconstructable stds" in err
    assert main([f"run.dir={tmp_path}", "std=0.3"]) == 2
    assert "0 < std < 0.2887" in capsys.readouterr().err
    assert main([f"run.dir={tmp_path / 'none'}", "std=0.1"]) == 2
    assert "no power-EMA snapshots" in capsys.readouterr().err
    assert main([f"run.dir={tmp_path}", "std=0.1", "images=100"]) == 2
    assert "not a snapshot time" in capsys.readouterr().err


def test_command_help_lists_its_keys_and_a_missing_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(k in out for k in ("run.dir", "std", "out", "images", "tol"))
    assert main(["std=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing run.dir=" in err
