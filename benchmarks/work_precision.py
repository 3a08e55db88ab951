"""Work-precision of the ODE samplers against k-diffusion's, on the same probability-flow ODE and x_T.

``--model mixture`` (default): D-dimensional (``--dim``, 64), 8-component Gaussian mixture (correlated components);
``--model digits``: the shipped digits U-Net (float64 weights). VP SDE, t_eps = 1e-3, batch 256, float64.
Error: RMS over the batch of |x - x_ref|_2 / sqrt(D), x_ref from adaptive dopri5 at rtol = atol = 1e-10.
k-diffusion (PyPI 0.1.1.post1, loaded without its heavy dependencies) runs in its own variables x/alpha and
sigma/alpha = exp(-lambda) on its Karras grid and on the grid uniform in t, both ending at sigma(t_eps) (no final
step to sigma = 0), with euler, heun, dpm_2, lms, dpmpp_2m, dpmpp_3m_sde (eta 0) and dpm_fast and the
denoiser D = E[x0 | x_t] of the same mixture; its result is mapped back by x = alpha(t_eps) x_kd.
Ratios: k-diffusion's best error over ours at each NFE (higher is better for us; goal >= 2 at 5 and 10 NFE).

``--tuned``: also grids fitted by `scoresolve.tuning.tune_grid` for the ``--tune-top`` best (solver, afs) of ours at
each NFE of ``--tune-nfe``: tuned on ``--tune-train`` other x_T (generator seed ``seed + 1000``; the benchmark's x_T
use ``seed + 1``), the descent started from the best of GITS's grid (with the solver's own two-step cost,
``cost="solver"``) and the named grids, minimising the relative RMSE (the benchmark's metric up to a constant); then
evaluated on the benchmark's x_T against the same reference as every other row. The tuning cost (network evaluations
per tuning sample, seconds) is printed next to it.

    python benchmarks/work_precision.py [--model mixture|digits] [--dim 64] [--seed 0] [--batch 256] [--plot wp.png]
        [--nfe 5 10 20 50] [--tuned [--tune-nfe 5 10] [--tune-top 3] [--tune-train 512] [--candidates 128]
        [--substeps 4] [--sweeps 12]]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # not `tests.`: a PyPI
# package (flow_matching) installs a top-level `tests` package that would shadow ours

from _kdiffusion import k_diffusion_denoiser, load_k_diffusion_sampling  # noqa: E402

import scoresolve as ss  # noqa: E402
from scoresolve.compare import Run, format_table, plot_work_precision, reference_solve, rms_error, work_precision  # noqa: E402
from scoresolve.tuning import tune_grid  # noqa: E402

OURS = ["euler", "heun", "ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"]
AFS = ["dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"]  # also run with the analytical first step (afs=True)
TUNABLE = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"]  # cost="solver" in tune_grid
GRIDS = ["uniform", "quadratic", "logsnr", "karras"]
NFES = (5, 10, 20, 50)


def k_diffusion_runs(kd, score, sde, x_T, ref, t_eps: float, nfes=NFES) -> list[Run]:
    """k-diffusion's deterministic samplers at each NFE budget, on the Karras grid and the grid uniform in t."""
    alpha_T = float(sde.marginal(torch.tensor(sde.T, dtype=torch.float64))[0])
    alpha_e = float(sde.marginal(torch.tensor(t_eps, dtype=torch.float64))[0])
    lam = sde.log_snr(torch.tensor([sde.T, t_eps], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))
    x_kd = x_T / alpha_T

    def grids(n: int):
        yield "karras", kd.get_sigmas_karras(n + 1, smin, smax, rho=7.0, device=x_T.device)[:-1].to(x_T.dtype)
        ts = ss.time_grid(sde, n, "uniform", t_eps)
        yield "uniform-t", torch.exp(-sde.log_snr(ts)).to(dtype=x_T.dtype, device=x_T.device)

    runs = []
    samplers = (("euler", lambda n: n, {}), ("heun", lambda n: (n + 1) // 2, {}),
                ("dpm_2", lambda n: (n + 1) // 2, {}), ("lms", lambda n: n, {}), ("dpmpp_2m", lambda n: n, {}),
                ("dpmpp_3m_sde", lambda n: n, {"eta": 0.0}))
    for name, steps_for, kw in samplers:
        for nfe in nfes:
            n = steps_for(nfe)
            for gname, sig in grids(n):
                den, counter = k_diffusion_denoiser(score, sde, count=True)
                out = getattr(kd, f"sample_{name}")(den, x_kd, sig, disable=True, **kw)
                if counter.calls > nfe:  # heun/dpm_2 take one evaluation fewer on the last step only to sigma=0
                    continue
                runs.append(Run(f"k-diffusion {name}@{gname}", f"nfe={nfe}", counter.calls,
                                rms_error(out * alpha_e, ref), 0.0))
    for nfe in nfes:
        den, counter = k_diffusion_denoiser(score, sde, count=True)
        out = kd.sample_dpm_fast(den, x_kd, smin, smax, nfe, disable=True)
        runs.append(Run("k-diffusion dpm_fast", f"nfe={nfe}", counter.calls, rms_error(out * alpha_e, ref), 0.0))
    return runs


def tuned_runs(score, sde, x_T, ref, ours: list[Run], args, t_eps: float, shape) -> list[Run]:
    """Grids fitted on other x_T for the best few (solver, afs) of ours at each NFE, evaluated on the benchmark's
    x_T."""
    x_train = sde.prior_sample((args.tune_train, *shape[1:]), generator=torch.Generator().manual_seed(args.seed + 1000),
                               dtype=torch.float64)
    runs = []
    for nfe in args.tune_nfe:
        ranked, seen = sorted((r for r in ours if r.setting == f"nfe={nfe}" and math.isfinite(r.error)),
                              key=lambda r: r.error), []
        for r in ranked:
            base = r.solver.partition("@")[0]
            if base not in seen and base.split("+")[0] in TUNABLE:
                seen.append(base)
        for base in seen[:args.tune_top]:
            solver, afs = base.split("+")[0], base.endswith("+afs")
            opts = {"afs": True} if afs else {}
            tuned = tune_grid(score, sde, nfe, solver, x_T=x_train, t_eps=t_eps, objective="rmse", cost="solver",
                              starts=GRIDS, candidates=args.candidates, substeps=args.substeps,
                              max_sweeps=args.sweeps, **opts)
            t0 = time.perf_counter()
            sol = ss.sample(score, sde, x_T, solver=solver, grid=tuned.grid, **opts)
            run = Run(f"{base}@tuned", f"nfe={nfe}", float(sol.nfe.double().mean()), rms_error(sol.x, ref),
                      time.perf_counter() - t0, extra={"evaluations": tuned.evaluations, "seconds": tuned.seconds,
                                                       "start": tuned.start, "grid": tuned.grid, "options": opts})
            print(f"  tuned {base:<14} NFE {nfe:>2}: held-out error {run.error:.3e} (train {tuned.train_error:.3e}, "
                  f"start {tuned.start}); tuning {tuned.evaluations} evaluations per tuning sample x "
                  f"{args.tune_train}, {tuned.seconds:.0f} s; grid {[round(t, 4) for t in tuned.grid.tolist()]}",
                  flush=True)
            runs.append(run)
    return runs


def holdout_report(score, sde, shape, args, t_eps: float, tuned: list[Run], kd) -> None:
    """Every row at the --tune-nfe budgets again on ``--holdout`` further x_T: the best of ours (solver x grid, chosen
    on these x_T, as k-diffusion's best is), the tuned grids (fitted on the tuning x_T) and k-diffusion's best."""
    x_h = sde.prior_sample((args.holdout, *shape[1:]), generator=torch.Generator().manual_seed(args.seed + 2000),
                           dtype=torch.float64)
    ref = reference_solve(score, sde, x_h, t_eps)
    nfes = tuple(args.tune_nfe)
    ours = work_precision(score, sde, x_h, [f"{s}@{g}" for s in OURS for g in GRIDS], nfes=nfes, t_eps=t_eps,
                          reference=ref)
    afs_names = [f"{s}@{g}" for s in AFS for g in GRIDS]
    for r in work_precision(score, sde, x_h, afs_names, nfes=nfes, t_eps=t_eps, reference=ref,
                            solver_options={n: {"afs": True} for n in afs_names}):
        base, _, grid = r.solver.partition("@")
        r.solver = f"{base}+afs@{grid}"
        ours.append(r)
    theirs = k_diffusion_runs(kd, score, sde, x_h, ref, t_eps, nfes) if kd is not None else []
    print(f"\nheld out: {args.holdout} further x_T (seed {args.seed + 2000}), same ODE, span and metric:")
    for nfe in nfes:
        setting = f"nfe={nfe}"
        best = min((r for r in ours if r.setting == setting), key=lambda r: r.error)
        line = f"  NFE {nfe:>3}: best grid {best.solver:<22} {best.error:.3e}"
        tuned_here = []
        for r in tuned:
            if r.setting == setting:
                solver = r.solver.partition("@")[0].split("+")[0]
                sol = ss.sample(score, sde, x_h, solver=solver, grid=r.extra["grid"], **r.extra["options"])
                tuned_here.append((rms_error(sol.x, ref), r.solver))
        if tuned_here:
            e, name = min(tuned_here)
            line += f"   tuned {name:<20} {e:.3e}"
        if theirs:
            kbest = min((r for r in theirs if r.setting == setting), key=lambda r: r.error)
            line += f"   k-diffusion {kbest.solver[12:]:<22} {kbest.error:.3e}   ratio {kbest.error / best.error:.2f}x"
            if tuned_here:
                line += f" (tuned {kbest.error / e:.2f}x)"
        print(line)
        for e, name in sorted(tuned_here):
            print(f"    {name:<22} {e:.3e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", choices=["mixture", "digits"], default="mixture")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--plot", default="", help="write the work-precision plot to this PNG")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="NFE budgets")
    p.add_argument("--tuned", action="store_true", help="add rows with grids fitted by tune_grid on other x_T")
    p.add_argument("--tune-nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--tune-top", type=int, default=3, help="tune the best this many (solver, afs) at each NFE")
    p.add_argument("--tune-train", type=int, default=512, help="tuning x_T (not the benchmark's)")
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--substeps", type=int, default=4)
    p.add_argument("--sweeps", type=int, default=12)
    p.add_argument("--holdout", type=int, default=0,
                   help="also compare, at the --tune-nfe budgets, on this many further x_T (seed + 2000): every grid "
                        "of ours, the tuned grids and k-diffusion's runs (the benchmark batch is small and a few x_T "
                        "that end near another mode dominate its RMS error)")
    args = p.parse_args()
    nfes = tuple(args.nfe)
    torch.set_num_threads(1)
    t_eps, sde = 1e-3, ss.VPSDE()
    if args.model == "mixture":
        gm = ss.GaussianMixture.random(args.dim, args.components, seed=args.seed)
        score, shape, what = gm.score_fn(sde), (args.batch, args.dim), f"{args.components}-component mixture in " \
            f"{args.dim} dims (seed {args.seed})"
    else:
        from scoresolve.models import load_digits_model

        score, sde = load_digits_model()
        score.net = score.net.double()
        shape, what = (args.batch, 1, 8, 8), "the shipped digits U-Net"
    x_T = sde.prior_sample(shape, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    ref = reference_solve(score, sde, x_T, t_eps)
    ours = work_precision(score, sde, x_T, [f"{s}@{g}" for s in OURS for g in GRIDS], nfes=nfes, t_eps=t_eps,
                          reference=ref)
    afs_names = [f"{s}@{g}" for s in AFS for g in GRIDS]
    with_afs = work_precision(score, sde, x_T, afs_names, nfes=nfes, t_eps=t_eps, reference=ref,
                              solver_options={n: {"afs": True} for n in afs_names})
    for r in with_afs:  # the analytical first step: one more step for the same NFE
        base, _, grid = r.solver.partition("@")
        r.solver = f"{base}+afs@{grid}"
    ours += with_afs
    default = work_precision(score, sde, x_T, OURS, nfes=nfes, t_eps=t_eps, reference=ref)
    kd = load_k_diffusion_sampling()
    theirs = k_diffusion_runs(kd, score, sde, x_T, ref, t_eps, nfes) if kd is not None else []
    tuned = tuned_runs(score, sde, x_T, ref, ours, args, t_eps, shape) if args.tuned else []
    print(f"VP SDE, {what}, batch {args.batch}, "
          f"t_eps={t_eps}, float64; error = RMS |x - x_ref| / sqrt(D)\n")
    print("scoresolve, default grids:")
    print(format_table(default))
    print("\nk-diffusion (Karras grid to sigma(t_eps)):" if theirs else "\nk-diffusion not installed")
    if theirs:
        print(format_table(theirs))
    print("\nbest of each at each NFE (scoresolve over all solver x grid combinations):")
    for nfe in nfes:
        setting = f"nfe={nfe}"
        best = min((r for r in ours if r.setting == setting), key=lambda r: r.error)
        best_default = min((r for r in default if r.setting == setting), key=lambda r: r.error)
        line = (f"  NFE {nfe:>3}: scoresolve {best.solver:<22} {best.error:.3e}   "
                f"(default grids: {best_default.solver} {best_default.error:.3e})")
        if theirs:
            kbest = min((r for r in theirs if r.setting == setting), key=lambda r: r.error)
            line += f"   k-diffusion {kbest.solver[12:]:<22} {kbest.error:.3e}   ratio {kbest.error / best.error:6.1f}x"
            line += f" (default grids {kbest.error / best_default.error:.1f}x)"
        print(line)
        tuned_here = [r for r in tuned if r.setting == setting]
        if tuned_here:
            tb = min(tuned_here, key=lambda r: r.error)
            line = (f"  {'':8}tuned grid {tb.solver:<22} {tb.error:.3e}   (tuning {tb.extra['evaluations']} "
                    f"evaluations per tuning sample x {args.tune_train}, {tb.extra['seconds']:.0f} s)")
            if theirs:
                line += f"   ratio {kbest.error / tb.error:6.2f}x"
            print(line)
    print("\nall grids:")
    for s in OURS + [f"{a}+afs" for a in AFS]:
        cells = []
        for g in GRIDS:
            errs = [r.error for r in ours if r.solver == f"{s}@{g}"]
            cells.append(" ".join(f"{e:8.1e}" if not math.isnan(e) else "     -  " for e in errs))
        print(f"  {s:<13} " + " | ".join(f"{g}: {c}" for g, c in zip(GRIDS, cells)))
    if args.holdout:
        holdout_report(score, sde, shape, args, t_eps, tuned, kd)
    if args.plot:
        plot_work_precision(default + theirs + tuned, args.plot, title=f"VP, {what}, t_eps={t_eps}")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
