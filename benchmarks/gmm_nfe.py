"""Score vs NFE on the 64-d Gaussian mixture: a trained MLP denoiser against the exact denoiser.

Both denoisers run every solver x schedule x NFE from the same x_T (seeds 0..N-1 through
`evodiff_pl.sampling.generate.generate`, x_T = 80 * noise; float64 for the exact denoiser, float32 for the MLP) and are
scored by the Fréchet distance of fitted Gaussians to fresh data (`evodiff_pl.evaluation.metrics.frechet_distance`) and
by the RMSE (mean over all entries, and the median of the per-sample RMSE) to the exact probability-flow ODE
endpoint from that x_T (`GaussianMixture.ode_solve`). Schedules (`EvalSpec.sigmas`):

    karras, logsnr                 fixed grids
    rescaled_entropic_train        learned while training the MLP (the checkpoint's = RUN/schedule.json), both denoisers
    rescaled_entropic_pass         the dedicated pass (`estimate_mmse`, K levels x M pairs) of each denoiser:
                                   for the MLP as `sample.py ckpt=RUN estimate_schedule=true`, for the exact
                                   denoiser on fresh mixture samples (~ the exact schedule)

Reference lines: heun/karras at --ref-nfe (80 = 40 Heun steps) for each denoiser, the FD of the exact ODE
endpoints (the best any solver can do with the exact denoiser) and of fresh data (N vs the fresh set).

    PYTHONPATH=. python benchmarks/gmm_nfe.py --run benchmarks/runs/gmm
    PYTHONPATH=. python benchmarks/gmm_nfe.py --quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nfe_report import append_row, key, pivot_markdown, plot_panels, read_rows  # noqa: E402

from evodiff_pl.sampling import cli as sampling  # noqa: E402
from evodiff_pl.io.checkpointing import locate_checkpoint  # noqa: E402
from evodiff_pl.io.denoiser import load_denoiser  # noqa: E402
from evodiff_pl.schedules.entropic import EntropicSchedule, estimate_mmse  # noqa: E402
from evodiff_pl.sampling.generate import EvalSpec, generate, initial_noise  # noqa: E402
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit  # noqa: E402

SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "evodiff", "evodiff_consistent"]
SCHEDULES = ["karras", "logsnr", "rescaled_entropic_train", "rescaled_entropic_pass"]
NFES = [5, 6, 8, 10, 12, 15, 20, 35]
FIELDS = ["denoiser", "solver", "schedule", "nfe", "steps", "fd", "rmse", "median_rmse", "seconds", "note"]
REPO = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> None:
    loaded = load_denoiser(args.run)
    meta = loaded.meta
    gm = sampling.checkpoint_data(loaded).mixture
    smin, smax = meta["sigma_min"], meta["sigma_max"]
    shape = tuple(meta["sample_shape"])
    indices = torch.arange(args.samples)
    noise, _ = initial_noise(indices, shape, seed=0)
    x_T = noise.to(torch.float64) * smax  # as in `generate` (seed 0, sample j from seed j)
    fresh_mu, fresh_cov = gaussian_fit(gm.sample(args.fresh, generator=torch.Generator().manual_seed(1)))
    t0 = time.perf_counter()
    exact = gm.ode_solve(x_T, smax, smin, n_steps=args.ode_steps)
    print(f"exact ODE endpoints ({args.ode_steps} RK4 steps): {time.perf_counter() - t0:.0f} s", flush=True)
    floors = {"exact ODE endpoint": frechet_distance(*gaussian_fit(exact), fresh_mu, fresh_cov),
              "fresh data": frechet_distance(*gaussian_fit(gm.sample(args.samples, generator=torch.Generator().manual_seed(2))),
                                             fresh_mu, fresh_cov)}
    print(f"floors: {floors}", flush=True)

    # Dedicated passes: the MLP through sample.py's code path, the exact denoiser through estimate_mmse.
    est_path = sampling.estimated_schedule_path(loaded.path)
    if not est_path.is_file():
        code = sampling.main([f"ckpt={args.run}", "estimate_schedule=true", f"levels={args.levels}",
                              f"pairs={args.pairs}", "progress=false"])
        if code:
            raise SystemExit("the MLP estimation pass failed")
    sig, m = estimate_mmse(gm.denoise, lambda n, g: gm.sample(n, generator=g), n_levels=args.levels,
                           n_pairs=args.pairs, sigma_min=smin, sigma_max=smax, progress=False)
    schedules = {
        "mlp": {"rescaled_entropic_train": loaded.schedule,
                "rescaled_entropic_pass": EntropicSchedule.load(est_path)},
        "exact": {"rescaled_entropic_train": loaded.schedule,
                  "rescaled_entropic_pass": EntropicSchedule.from_mmse(sig, m, kind="rescaled_entropic", dim=gm.dim)},
    }
    denoisers = {"mlp": (loaded.denoiser, torch.float32), "exact": (gm.denoise, torch.float64)}

    done = {(r["denoiser"], *key(r)) for r in read_rows(args.rows)}
    wanted = [(s, c, n) for s in args.solvers for c in args.schedules for n in args.nfe]
    if args.ref_nfe:
        wanted.append(("heun", "karras", args.ref_nfe))
    for name, (den, dtype) in denoisers.items():
        for solver, label, n in wanted:
            if (name, solver, label, n) in done:
                continue
            row = {"denoiser": name, "solver": solver, "schedule": label, "nfe": n}
            try:
                spec = EvalSpec(solver, "rescaled_entropic" if label.startswith("rescaled") else label, n)
            except ValueError as err:
                append_row(args.rows, {**row, "steps": "-", "note": f"skipped: {err}"}, FIELDS)
                continue
            t0 = time.perf_counter()
            sigmas = spec.sigmas(smin, smax, schedules[name].get(label))
            x = generate(den, indices, shape, solver=solver, sigmas=sigmas, seed=0, batch_size=args.samples,
                         dtype=dtype).to(torch.float64)
            per_sample = (x - exact).square().mean(1)
            row.update(steps=spec.n_steps, fd=frechet_distance(*gaussian_fit(x), fresh_mu, fresh_cov),
                       rmse=per_sample.mean().sqrt().item(), median_rmse=per_sample.sqrt().median().item(),
                       seconds=time.perf_counter() - t0)
            append_row(args.rows, row, FIELDS)
    report(args, floors)


def report(args: argparse.Namespace, floors: dict[str, float]) -> None:
    rows = read_rows(args.rows)
    ckpt = locate_checkpoint(args.run)
    text = ["# Gaussian mixture (64-d, 8 components): score vs NFE, trained MLP vs exact denoiser\n",
            f"MLP: `{ckpt}` (EMA weights). {args.samples} trajectories per setting from the same x_T (seeds "
            f"0-{args.samples - 1}); Fréchet distance (FD) of fitted Gaussians to {args.fresh} fresh samples; "
            f"RMSE to the exact ODE endpoint ({args.ode_steps} RK4 steps) from the same x_T.\n",
            f"Command: `{args.command}`\n",
            f"Floors: FD of the exact ODE endpoints {floors['exact ODE endpoint']:.4g}; FD of {args.samples} fresh "
            f"samples {floors['fresh data']:.4g}. Schedules: rescaled_entropic_train = learned while training the "
            f"MLP (used for both denoisers); rescaled_entropic_pass = each denoiser's own dedicated pass "
            f"({args.levels} levels x {args.pairs} pairs). Bold: best of the column. '-': cannot run (heun: even "
            f"NFE only).\n"]
    nfes = [n for n in args.nfe]
    plot_lines = {}
    for name in ("exact", "mlp"):
        mine = [r for r in rows if r["denoiser"] == name]
        ref = next((r for r in mine if key(r) == ("heun", "karras", args.ref_nfe)), None)
        sweep = [r for r in mine if int(r["nfe"]) in nfes]
        if ref is not None:
            text.append(f"**{name}**: reference heun/karras NFE {args.ref_nfe}: FD {float(ref['fd']):.4g}, "
                        f"RMSE {float(ref['rmse']):.3g}, median RMSE {float(ref['median_rmse']):.3g}.\n")
        for metric in ("fd", "rmse", "median_rmse"):
            text += [f"## {name} denoiser: {metric}\n",
                     pivot_markdown(sweep, metric, args.solvers, args.schedules, nfes, "{:.3g}")]
        for metric in ("fd", "rmse"):
            plot_lines[f"{name}_{metric}"] = ([(f"{name} heun/karras NFE {args.ref_nfe}", float(ref[metric]), "--")]
                                              if ref is not None else [])
    (Path(args.out) / "gmm_nfe.md").write_text("\n".join(text))
    # one figure: a row per denoiser and metric, a panel per solver (tag each row's metric with its denoiser)
    tagged = [{**r, f"{r['denoiser']}_fd": r["fd"], f"{r['denoiser']}_rmse": r["rmse"]}
              for r in rows if int(r["nfe"]) in nfes]
    for name in ("exact", "mlp"):
        plot_lines[f"{name}_fd"] += [("FD of exact ODE endpoints", floors["exact ODE endpoint"], ":"),
                                     (f"FD of {args.samples} fresh samples", floors["fresh data"], "-.")]
    panels = [("exact_fd", "exact denoiser: FD to data"), ("mlp_fd", "trained MLP: FD to data"),
              ("exact_rmse", "exact denoiser: RMSE to exact ODE endpoint"),
              ("mlp_rmse", "trained MLP: RMSE to exact ODE endpoint")]
    for r in tagged:
        for p, _ in panels:
            r.setdefault(p, "")
    plot = plot_panels(tagged, panels, args.solvers, args.schedules, args.plot,
                       title=f"64-d Gaussian mixture, {args.samples} samples", lines=plot_lines)
    print(f"wrote {Path(args.out) / 'gmm_nfe.md'} and {plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("benchmarks/runs/gmm"), help="train.py run dir (configs/gmm.yaml)")
    p.add_argument("--solvers", nargs="+", default=SOLVERS)
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    p.add_argument("--nfe", type=int, nargs="+", default=NFES)
    p.add_argument("--ref-nfe", type=int, default=80)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--fresh", type=int, default=65536, help="fresh data samples for the FD")
    p.add_argument("--ode-steps", type=int, default=2000, help="RK4 steps of the exact ODE endpoint")
    p.add_argument("--levels", type=int, default=128)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--rows", type=Path, default=Path("benchmarks/results/gmm_nfe.csv"))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--plot", default="docs/gmm_nfe.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny MLP run and sizes in a temporary folder")
    p.add_argument("--floors", type=float, nargs=2, default=None, metavar=("EXACT_ODE", "FRESH"),
                   help="report only: rebuild the table and plot from --rows with these floor values")
    args = p.parse_args()
    args.command = "PYTHONPATH=. python " + " ".join(sys.argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="gmm_nfe_quick_"))
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/gmm.yaml"),
                        f"run.dir={tmp / 'run'}", "train.total_images=51200", "logger.kind=csv",
                        "evaluation.enabled=false", "entropic.update_every_steps=10"], check=True, cwd=REPO)
        args.run, args.out, args.rows, args.plot = tmp / "run", tmp, tmp / "gmm_nfe.csv", tmp / "gmm_nfe.png"
        args.samples, args.fresh, args.ode_steps, args.levels, args.pairs = 256, 4096, 200, 16, 64
        args.nfe, args.solvers, args.ref_nfe = [5, 10], ["heun", "dpmpp_2m", "evodiff"], 20
    if args.floors:
        report(args, {"exact ODE endpoint": args.floors[0], "fresh data": args.floors[1]})
    else:
        run(args)


if __name__ == "__main__":
    main()
