"""Tuned time grids (scoresolve.tuning.tune_grid) against each solver's default grid, on held-out x_T.

For each model, solver and NFE: tune on ``--train`` x_T (GITS dynamic programming, then the compass-search descent
on the solver's own end error), then solve from ``--test`` other x_T on the default grid, GITS's grid and the
descent's grid.
Errors against a dopri5 reference from the same x_T (rtol = atol = ``--ref-rtol``): ``rel`` = relative RMSE of the
batch ||x - ref|| / ||ref|| (dominated by the few samples that end near another mode than the reference), ``mean`` and
``med`` = mean / median over samples of ||x_i - ref_i|| / ||ref_i||. Tuning cost: network evaluations per tuning sample
and seconds (CPU).

    python benchmarks/tune_grid.py --model mixture
    python benchmarks/tune_grid.py --model digits --train 16 --test 32 --candidates 48 --substeps 2 --sweeps 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scoresolve as ss  # noqa: E402
from scoresolve.tuning import rel_rmse, tune_grid  # noqa: E402

SOLVERS = ["dpmpp_2m", "unipc", "ipndm", "deis"]


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    per = (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    return rel_rmse(x, ref), float(per.mean()), float(per.median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mixture", "digits"], default="mixture")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--solvers", nargs="+", default=SOLVERS)
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--substeps", type=int, default=4)
    p.add_argument("--sweeps", type=int, default=12)
    p.add_argument("--ref-rtol", type=float, default=1e-8)
    p.add_argument("--t-eps", type=float, default=1e-3)
    args = p.parse_args()

    torch.manual_seed(0)
    if args.model == "digits":
        from scoresolve.models import load_digits_model

        model, sde = load_digits_model()
        model.net = model.net.double()
        shape, label = (1, 8, 8), "digits U-Net (float64)"
    else:
        sde = ss.VPSDE()
        gm = ss.GaussianMixture.random(args.dim, args.components, seed=args.seed)
        model, shape = gm.score_fn(sde), (args.dim,)
        label = f"{args.dim}-D {args.components}-component Gaussian mixture (seed {args.seed})"
    gen_train = torch.Generator().manual_seed(1000 + args.seed)
    x_train = sde.prior_sample((args.train, *shape), generator=gen_train, dtype=torch.float64)
    x_test = sde.prior_sample((args.test, *shape), generator=torch.Generator().manual_seed(2000 + args.seed),
                              dtype=torch.float64)
    t0 = time.perf_counter()
    ref = ss.sample(model, sde, x_test, solver="dopri5", rtol=args.ref_rtol, atol=args.ref_rtol, t_eps=args.t_eps).x
    print(f"{label}, VP, PF-ODE T -> t_eps={args.t_eps}; tuned on {args.train} x_T, tested on {args.test} others; "
          f"reference dopri5 rtol=atol={args.ref_rtol} ({time.perf_counter() - t0:.0f}s); "
          f"candidates {args.candidates} x substeps {args.substeps}, sweeps <= {args.sweeps}")
    print(f"{'solver':<9} {'NFE':>3} | {'default grid rel/mean/med':<27} | {'GITS rel/mean/med':<27} | "
          f"{'descent rel/mean/med':<27} | {'med x':>5} | start   | tune evals   s")
    for nfe in args.nfe:
        for solver in args.solvers:
            tuned = tune_grid(model, sde, nfe, solver, x_T=x_train, t_eps=args.t_eps, candidates=args.candidates,
                              substeps=args.substeps, max_sweeps=args.sweeps)
            d = errors(ss.sample(model, sde, x_test, solver=solver, nfe=nfe, t_eps=args.t_eps).x, ref)
            g = errors(ss.sample(model, sde, x_test, solver=solver, grid=tuned.gits_grid).x, ref)
            o = errors(ss.sample(model, sde, x_test, solver=solver, grid=tuned.grid).x, ref)
            fmt = lambda e: f"{e[0]:.2e} {e[1]:.2e} {e[2]:.2e}"  # noqa: E731
            print(f"{solver:<9} {nfe:>3} | {fmt(d):<27} | {fmt(g):<27} | {fmt(o):<27} | {d[2] / o[2]:5.2f} | "
                  f"{tuned.start:<7} | {tuned.evaluations:>10} {tuned.seconds:4.0f}", flush=True)
            print(f"{'':14} grid {[round(t, 4) for t in tuned.grid.tolist()]}", flush=True)


if __name__ == "__main__":
    main()
