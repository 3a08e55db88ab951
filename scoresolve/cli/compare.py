"""``scoresolve compare`` (the default command): a work-precision study of solvers on an analytic Gaussian mixture."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ._args import POSITIVE_FLOAT, POSITIVE_INT, add_check, add_model_args, check_t_eps, mixture, output_file

DEFAULT_SOLVERS = [
    "euler",
    "heun",
    "ddim",
    "dpm_solver_2",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "dopri5",
    "tsit5",
    "euler_maruyama",
]


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve compare`` (sets ``func=cmd_compare``)."""
    add_model_args(p)
    p.add_argument(
        "--solvers", nargs="+", default=DEFAULT_SOLVERS, help="solver names, optionally with a grid: dpmpp_2m@karras"
    )
    p.add_argument("--nfe", nargs="+", type=POSITIVE_INT, default=[10, 20, 50], help="NFE budgets of grid solvers")
    p.add_argument("--tol", nargs="+", type=POSITIVE_FLOAT, default=[1e-2, 1e-3, 1e-4],
                   help="tolerances of adaptive ones")
    p.add_argument("--out", type=output_file, default="work_precision.png", help="PNG path for the plot ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
    add_check(p, lambda args: check_t_eps(args.t_eps, args.sde))


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every solver at every NFE budget / tolerance, print the table, write the plot."""
    from ..compare import exact_baseline, format_table, plot_work_precision, work_precision
    from ..sde import sde_from_name
    from ..solvers import REGISTRY

    sde = sde_from_name(args.sde)
    gm = mixture(args)
    dtype = torch.float64 if args.float64 else torch.float32
    x_T = sde.prior_sample((args.batch, args.dim), generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    solvers = [s for s in args.solvers if s.partition("@")[0] in REGISTRY or ":" in s]
    missing = sorted(set(args.solvers) - set(solvers))
    if missing:
        print(f"skipping unknown solvers: {missing}", file=sys.stderr)
    print(
        f"{args.sde.upper()} SDE, {args.components}-component Gaussian mixture in {args.dim} dims, "
        f"batch {args.batch}, t_eps={args.t_eps}, {str(dtype).replace('torch.', '')}"
    )
    t0 = time.perf_counter()
    runs = work_precision(
        gm.score_fn(sde),
        sde,
        x_T,
        solvers,
        nfes=args.nfe,
        tolerances=args.tol,
        t_eps=args.t_eps,
        mixture=gm,
        progress=not args.quiet,
    )
    runs.append(exact_baseline(gm, sde, args.batch, args.t_eps, args.seed))
    print(format_table(runs))
    if args.out:
        plot_work_precision(runs, args.out, title=f"{args.sde.upper()} SDE, {args.dim}-D mixture")
        print(f"work-precision plot written to {args.out}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
