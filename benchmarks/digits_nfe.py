"""Score vs NFE on the digits model: every solver x schedule x NFE, in two feature spaces.

Reuses `sample.py`'s code path (`evodiff_pl.sampling.build` + `run_plan`: checkpoint loading, plans, seed-indexed
generation, `FrechetScore`) and its dedicated entropic-time pass (`sample.py ... estimate_schedule=true`).
Each setting generates seeds 0..1796 (one per digit) once and scores them twice: the Fréchet distance on
pixels (fd_pixels, as `sample.py score=fd_pixels`) and on the 128-d penultimate features of a small CNN trained
on the digits' training split (`evodiff_pl.evaluation.classifier`, fd_digits_cnn). Schedules:

    karras, logsnr                     fixed grids
    rescaled_entropic_train            learned during training (stored in the checkpoint, = RUN/schedule.json)
    rescaled_entropic_pass             the dedicated pass (K levels x M pairs), written beside the checkpoint
    head_rescaled_entropic             read off the log-variance head of an EDM2 model (configs/digits_edm2.yaml);
                                       not in the default list (EDM models have no head)

Also: the converged reference heun/karras at --ref-nfe (default 80 = 40 Heun steps, 2 NFE each, no final
Euler step; EDM's "NFE 79" is 40 steps whose last step is a plain Euler step to sigma = 0) and the data floor
(FD between the two halves of the 1,797 digits, even vs odd index, 898 vs 899 images: its finite-sample bias
is about twice that of 1,797 generated vs 1,797 real, so half of it is quoted as the comparable floor).
Rows are appended to --rows (CSV) as they finish; a rerun skips the rows already there.

    PYTHONPATH=. python benchmarks/digits_nfe.py --run benchmarks/runs/digits_long            # full sweep
    PYTHONPATH=. python benchmarks/digits_nfe.py --run RUN --solvers euler heun --nfe 5 10 20  # a share of it
    PYTHONPATH=. python benchmarks/digits_nfe.py --run RUN --report-only                       # table + plot
    PYTHONPATH=. python benchmarks/digits_nfe.py --quick                                       # smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nfe_report import append_row, key, pivot_markdown, plot_panels, read_rows, winners_markdown  # noqa: E402

from evodiff_pl.sampling import cli as sampling  # noqa: E402
from evodiff_pl.io.checkpointing import locate_checkpoint  # noqa: E402
from evodiff_pl.io.denoiser import load_denoiser  # noqa: E402
from evodiff_pl.evaluation.classifier import load_or_train  # noqa: E402
from evodiff_pl.evaluation.metrics import FrechetScore, frechet_distance, gaussian_fit  # noqa: E402

SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "evodiff", "evodiff_consistent", "unipc", "ipndm",
           "edm_stochastic", "dpmpp_2m_sde"]
SCHEDULES = ["karras", "logsnr", "rescaled_entropic_train", "rescaled_entropic_pass"]
HEAD_SCHEDULES = ["head_rescaled_entropic", "head_entropic"]
NFES = [5, 6, 8, 10, 12, 15, 20, 35]
FIELDS = ["solver", "schedule", "nfe", "steps", "fd_pixels", "fd_digits_cnn", "seconds", "note"]
REPO = Path(__file__).resolve().parent.parent


class BothScores:
    """Duck-types the `FrechetScore` interface `sampling.run_plan` uses (reset, update, compute) over two scores;
    compute() returns the first and keeps the second in `last_second`."""

    def __init__(self, first: FrechetScore, second: FrechetScore) -> None:
        self.first, self.second, self.last_second = first, second, None
        self.name = first.name

    def reset(self) -> None:
        self.first.reset()
        self.second.reset()

    def update(self, x: torch.Tensor) -> None:
        self.first.update(x)
        self.second.update(x)

    def compute(self) -> float:
        self.last_second = self.second.compute()
        return self.first.compute()


def schedule_args(label: str, estimated: Path | None) -> tuple[str, str | None]:
    """(sample.py schedule name, schedule_file) of a schedule label; the training schedule is the checkpoint's."""
    if label == "rescaled_entropic_train":
        return "rescaled_entropic", None
    if label == "rescaled_entropic_pass":
        return "rescaled_entropic", str(estimated)
    return label, None


def dedicated_pass(run: Path, levels: int, pairs: int, batch: int) -> Path:
    """`python sample.py ckpt=RUN estimate_schedule=true levels=K pairs=M` unless its output exists."""
    path = sampling.estimated_schedule_path(locate_checkpoint(run))
    if not path.is_file():
        t0 = time.perf_counter()
        code = sampling.main([f"ckpt={run}", "estimate_schedule=true", f"levels={levels}", f"pairs={pairs}",
                              f"batch={batch}", "progress=false"])
        if code:
            raise SystemExit(f"the estimation pass failed (exit {code})")
        print(f"dedicated pass {levels} levels x {pairs} pairs: {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def sweep(args: argparse.Namespace, features, wanted: list[tuple[str, str, int]]) -> None:
    """Run every (solver, schedule label, nfe) of `wanted` not yet in the rows file, appending each row."""
    done = {key(r) for r in read_rows(args.rows)}
    estimated = dedicated_pass(args.run, args.levels, args.pairs, args.batch) \
        if any(c == "rescaled_entropic_pass" for _, c, _ in wanted) else None
    for label in dict.fromkeys(c for _, c, _ in wanted):
        todo = [(s, n) for s, c, n in wanted if c == label and (s, c, n) not in done]
        if not todo:
            continue
        schedule, schedule_file = schedule_args(label, estimated)
        solvers = ",".join(dict.fromkeys(s for s, _ in todo))
        nfes = ",".join(str(n) for n in sorted({n for _, n in todo}))
        cfg = sampling.SampleConfig(ckpt=str(args.run), solver=solvers, schedule=schedule, nfe=nfes,
                                    schedule_file=schedule_file, score="fd_pixels", format="none",
                                    seeds=f"0-{args.samples - 1}", batch=args.batch, progress=False)
        job = sampling.build(cfg)
        second = FrechetScore(features, num_samples=len(job.seeds))
        second.prepare_real(sampling.checkpoint_data(job.loaded))
        job.score = BothScores(job.score, second)
        for p in job.plans:
            if (p.solver, p.nfe) not in todo:
                continue
            row = {"solver": p.solver, "schedule": label, "nfe": p.nfe}
            if p.spec is None:
                row.update(steps="-", note=f"skipped: {p.reason}")
            else:
                result = sampling.run_plan(job, p)
                row.update(steps=p.spec.n_steps, fd_pixels=result.value, fd_digits_cnn=job.score.last_second,
                           seconds=result.seconds)
                print(f"{p.solver:9s} {label:24s} NFE {p.nfe:3d}: fd_pixels {result.value:9.3f}  "
                      f"fd_digits_cnn {job.score.last_second:8.4f}  ({result.seconds:.1f} s)", flush=True)
            append_row(args.rows, row, FIELDS)


def data_floor(args: argparse.Namespace, features, draws: int = 20) -> dict[str, float]:
    """Two floors in both feature spaces: `<metric>` = FD between the even- and odd-indexed halves of the digits
    (898 vs 899), and `<metric>_copy` (± `<metric>_copy_sd`) = mean FD of `draws` sets of 1,797 digits drawn with
    replacement against all 1,797: the score of a sampler of the training set itself."""
    loaded = load_denoiser(args.run)
    real = sampling.checkpoint_data(loaded).real_images()
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, f in (("fd_pixels", lambda x: x.reshape(len(x), -1).double()), ("fd_digits_cnn", features)):
        with torch.no_grad():
            feats = f(real)
        out[name] = frechet_distance(*gaussian_fit(feats[0::2]), *gaussian_fit(feats[1::2]))
        full = gaussian_fit(feats)
        copies = torch.tensor([frechet_distance(*gaussian_fit(feats[torch.randint(len(feats), (len(feats),),
                                                                                    generator=g)]), *full)
                               for _ in range(draws)])
        out[f"{name}_copy"], out[f"{name}_copy_sd"] = copies.mean().item(), copies.std().item()
    return out


def memorization(args: argparse.Namespace) -> dict[str, float]:
    """How close samples of the reference setting are to training images (pixels, uint8 scale).

    For each sample: d1, d2 = distances to its nearest and second-nearest training digit; "near-copy" when
    d1 < d2 / 3 (the criterion of Yoon et al. 2023 and Gu et al. 2023). The data's own rate (each digit against
    the other 1,796) is the baseline: a generalising model sits near it, a memorising one far above.
    """
    out = Path(tempfile.mkdtemp(prefix="digits_memo_"))
    code = sampling.main([f"ckpt={args.run}", "solver=heun", "schedule=karras", f"nfe={args.ref_nfe}",
                          f"seeds=0-{args.samples - 1}", f"batch={args.batch}", "format=npz", f"outdir={out}",
                          "progress=false"])
    if code:
        raise SystemExit(f"sampling for the memorization check failed (exit {code})")
    with np.load(next(out.rglob("*.npz"))) as f:
        samples = torch.from_numpy(f["images"]).double().reshape(len(f["images"]), -1)
    real = sampling.checkpoint_data(load_denoiser(args.run)).real_images().double().flatten(1)

    def rate(x: torch.Tensor, drop_self: bool) -> tuple[float, float]:
        d = torch.cdist(x, real)
        if drop_self:
            d.fill_diagonal_(float("inf"))
        d1, d2 = d.topk(2, dim=1, largest=False).values.unbind(1)
        return (d1 < d2 / 3).double().mean().item(), d1.median().item()

    (copies, median), (data_copies, data_median) = rate(samples, False), rate(real, True)
    return {"copies": copies, "median": median, "data_copies": data_copies, "data_median": data_median}


def report(args: argparse.Namespace, features, accuracy: float) -> None:
    rows = read_rows(args.rows)
    ref = {m: next((float(r[m]) for r in rows if (r["solver"], r["schedule"], int(r["nfe"])) ==
                    ("heun", "karras", args.ref_nfe) and r[m]), float("nan")) for m in ("fd_pixels", "fd_digits_cnn")}
    floor = data_floor(args, features)
    memo = memorization(args)
    sweep_rows = [r for r in rows if int(r["nfe"]) in args.nfe]
    nfes = sorted({int(r["nfe"]) for r in sweep_rows})
    skipped = sorted({(r["solver"], r["schedule"], int(r["nfe"])) for r in sweep_rows if r["note"]})
    total = sum(float(r["seconds"]) for r in rows if r["seconds"])
    ckpt = locate_checkpoint(args.run)
    text = [
        "# Digits: score vs NFE\n",
        f"Model: `{ckpt}` (EMA weights), {args.samples} samples per setting (seeds 0-{args.samples - 1}), "
        f"each scored against all 1,797 digits. Sampling time of all rows: {total / 60:.1f} min on 1 CPU thread.\n",
        f"Command: `{args.command}` (the sweep commands that made the rows: benchmarks/README.md)\n",
        "- fd_pixels: Fréchet distance on the 64 uint8 pixel values (`sample.py score=fd_pixels`).",
        f"- fd_digits_cnn: Fréchet distance on the 128-d penultimate features of `evodiff_pl.evaluation.classifier.DigitsCNN` "
        f"(trained on 1,347 digits, test accuracy {accuracy:.2%} on the other 450).",
        f"- reference: heun / karras at NFE {args.ref_nfe} ({args.ref_nfe // 2} Heun steps, no final Euler step; "
        f"EDM's 'NFE 79' is 40 steps with a plain Euler last step): fd_pixels {ref['fd_pixels']:.4g}, "
        f"fd_digits_cnn {ref['fd_digits_cnn']:.4g}.",
        f"- data floors (the reference set is the training set): FD between the even- and odd-indexed halves of "
        f"the digits (898 vs 899): fd_pixels {floor['fd_pixels']:.4g}, fd_digits_cnn {floor['fd_digits_cnn']:.4g} "
        f"(about twice the finite-sample bias of a model of the digits' population scored with 1,797 samples: "
        f"{floor['fd_pixels'] / 2:.4g} / {floor['fd_digits_cnn'] / 2:.4g}); 1,797 training digits drawn with "
        f"replacement, i.e. a perfect sampler of the training set: {floor['fd_pixels_copy']:.4g} ± "
        f"{floor['fd_pixels_copy_sd']:.3g} / {floor['fd_digits_cnn_copy']:.4g} ± {floor['fd_digits_cnn_copy_sd']:.3g}.",
        f"- memorization (reference setting, pixels): {memo['copies']:.1%} of the samples are near-copies of a "
        f"training digit (nearest < 1/3 of the second nearest; the digits against each other: "
        f"{memo['data_copies']:.1%}); median distance to the nearest training digit {memo['median']:.4g} "
        f"(each digit to its nearest other digit: {memo['data_median']:.4g}).",
        "- schedules: rescaled_entropic_train = learned from the training loss (the checkpoint's, = the run's "
        "`schedule.json`); "
        f"rescaled_entropic_pass = dedicated pass (`sample.py estimate_schedule=true levels={args.levels} "
        f"pairs={args.pairs}`).",
        "- bold: best value of the column. '-': cannot run (heun makes 2 NFE per step: even NFE only) or not run.\n",
    ]
    for metric, title in (("fd_pixels", "fd_pixels"), ("fd_digits_cnn", "fd_digits_cnn")):
        text += [f"## {title}\n", pivot_markdown(sweep_rows, metric, args.solvers, args.schedules, nfes, "{:.4g}"),
                 winners_markdown(sweep_rows, metric, nfes, "{:.4g}")]
    if skipped:
        text.append("Skipped settings: " + ", ".join(f"{s}/{c}/{n}" for s, c, n in skipped) + ".\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    lines = {m: [(f"heun/karras NFE {args.ref_nfe} (reference)", ref[m], "--"),
                 ("data floor: split-half FD", floor[m], ":"),
                 ("½ split-half FD (floor, model of the population)", floor[m] / 2, "-."),
                 ("training digits resampled (floor, sampler of the training set)", floor[f"{m}_copy"],
                  (0, (1, 4)))] for m in ref}
    plot = plot_panels(sweep_rows, [("fd_pixels", f"FD on pixels ({args.samples} samples)"),
                                    ("fd_digits_cnn", f"FD on DigitsCNN features ({args.samples} samples)")],
                       args.solvers, args.schedules, args.plot, title=f"digits, {ckpt}", lines=lines)
    print(f"wrote {out} and {plot}")


def quick_setup(args: argparse.Namespace) -> None:
    """Train a tiny digits model in a temporary folder and shrink every size."""
    tmp = Path(tempfile.mkdtemp(prefix="digits_nfe_quick_"))
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/digits.yaml"),
                    f"run.dir={tmp / 'run'}", "train.total_images=2560", "logger.kind=csv",
                    "evaluation.enabled=false", "entropic.update_every_steps=5"], check=True, cwd=REPO)
    args.run, args.out, args.rows = tmp / "run", tmp / "digits_nfe.md", tmp / "digits_nfe.csv"
    args.plot = tmp / "digits_nfe.png"
    args.samples, args.levels, args.pairs, args.ref_nfe = 64, 8, 32, 20
    args.nfe, args.solvers = [5, 6], ["heun", "evodiff"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("benchmarks/runs/digits_long"),
                   help="train.py run directory or checkpoint file (e.g. an export_weights copy)")
    p.add_argument("--solvers", nargs="+", default=SOLVERS)
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES + HEAD_SCHEDULES)
    p.add_argument("--nfe", type=int, nargs="+", default=NFES)
    p.add_argument("--ref-nfe", type=int, default=80, help="NFE of the converged heun/karras reference (0: none)")
    p.add_argument("--samples", type=int, default=1797, help="samples per setting (seeds 0..N-1)")
    p.add_argument("--levels", type=int, default=128, help="dedicated pass: noise levels")
    p.add_argument("--pairs", type=int, default=1024, help="dedicated pass: (image, noise) pairs per level")
    p.add_argument("--batch", type=int, default=1797, help="samples per denoiser call")
    p.add_argument("--classifier", default="benchmarks/results/digits_classifier.pt",
                   help="DigitsCNN weights (trained and saved here if absent)")
    p.add_argument("--rows", type=Path, default=Path("benchmarks/results/digits_nfe.csv"), help="row file")
    p.add_argument("--out", default="benchmarks/results/digits_nfe.md", help="markdown report")
    p.add_argument("--plot", default="docs/digits_nfe.png")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from --rows")
    p.add_argument("--no-report", action="store_true", help="only run the sweep (for parallel shares)")
    p.add_argument("--quick", action="store_true", help="smoke test on a tiny model in a temporary folder")
    args = p.parse_args()
    args.command = "PYTHONPATH=. python " + " ".join(sys.argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        quick_setup(args)
    features, accuracy = load_or_train(args.classifier)
    print(f"DigitsCNN features: test accuracy {accuracy:.2%}", flush=True)
    if not args.report_only:
        wanted = [(s, c, n) for c in args.schedules for s in args.solvers for n in args.nfe]
        if args.ref_nfe and "heun" in args.solvers:
            wanted.append(("heun", "karras", args.ref_nfe))
        t0 = time.perf_counter()
        sweep(args, features, wanted)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_report:
        report(args, features, accuracy)


if __name__ == "__main__":
    main()
