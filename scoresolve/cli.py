"""The ``scoresolve`` command: ``compare`` (the default), ``sample``, ``likelihood`` and ``train``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch

from .analytic import GaussianMixture
from .sde import SDE_NAMES, ForwardSDE, sde_from_name

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


def _mixture(args: argparse.Namespace) -> GaussianMixture:
    return GaussianMixture.random(args.dim, args.components, seed=args.seed, full=not args.diagonal)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sde", choices=sorted(SDE_NAMES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--dim", type=int, default=16, help="dimension of the Gaussian-mixture model (default: 16)")
    p.add_argument("--components", type=int, default=8, help="mixture components (default: 8)")
    p.add_argument("--diagonal", action="store_true", help="axis-aligned components instead of correlated ones")
    p.add_argument("--batch", type=int, default=512, help="samples per run (default: 512)")
    p.add_argument("--t-eps", type=float, default=1e-3, help="final time (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true", help="solve in float64 (default float32)")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import exact_baseline, format_table, plot_work_precision, work_precision
    from .solvers import REGISTRY

    sde: ForwardSDE = sde_from_name(args.sde)
    gm = _mixture(args)
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


def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import sample

    g = torch.Generator().manual_seed(args.seed)
    dtype = torch.float64 if args.float64 else torch.float32
    kw = {"nfe": args.nfe} if args.nfe else {}
    if args.model == "digits":  # the shipped U-Net trained on scikit-learn's digits
        from .models import load_digits_model
        from .models.evaluate import save_sample_grids

        model, sde = load_digits_model()
        x_T = sde.prior_sample((args.batch, 1, 8, 8), generator=g, dtype=dtype)
        sol = sample(model, sde, x_T, solver=args.solver, t_eps=args.t_eps, progress=not args.quiet,
                     diffusion=args.diffusion, generator=g, denoise=True, **kw)
        nfe = sol.nfe.double().mean().item() if torch.is_tensor(sol.nfe) else sol.nfe
        print(f"solver {args.solver}: {args.batch} digits, NFE {nfe:g}")
        out = args.out or "samples.png"
        if out.endswith(".png"):
            save_sample_grids([(f"{args.solver}, NFE {nfe:g}", sol.x.clamp(-1, 1))], out)
        else:
            torch.save({"x": sol.x, "nfe": sol.nfe}, out)
        print(f"samples written to {out}")
        return 0
    from .compare import sliced_wasserstein

    sde = sde_from_name(args.sde)
    gm = _mixture(args)
    x_T = sde.prior_sample((args.batch, args.dim), generator=g, dtype=dtype)
    sol = sample(gm.score_fn(sde), sde, x_T, solver=args.solver, t_eps=args.t_eps, progress=not args.quiet,
                 diffusion=args.diffusion, generator=g, **kw)
    exact = gm.sample_marginal(args.batch, args.t_eps, sde, generator=g, dtype=torch.float64)
    nfe = sol.nfe.double().mean().item() if torch.is_tensor(sol.nfe) else sol.nfe
    logp = gm.log_prob(sol.x.double(), args.t_eps, sde).mean()
    print(f"solver {args.solver}: NFE {nfe:g}, mean exact log p {logp:.4f}"
          f" (exact samples {gm.log_prob(exact, args.t_eps, sde).mean():.4f}), "
          f"sliced W2 to exact samples {sliced_wasserstein(sol.x, exact):.4f}")
    if args.out:
        torch.save({"x": sol.x, "nfe": sol.nfe}, args.out)
        print(f"samples written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scoresolve", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("compare", help="work-precision study of solvers on an analytic Gaussian mixture (default)")
    _add_model_args(p)
    p.add_argument(
        "--solvers", nargs="+", default=DEFAULT_SOLVERS, help="solver names, optionally with a grid: dpmpp_2m@karras"
    )
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 20, 50], help="NFE budgets of grid solvers")
    p.add_argument("--tol", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4], help="tolerances of adaptive ones")
    p.add_argument("--out", default="work_precision.png", help="PNG path for the plot ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("sample", help="sample the analytic mixture (scored exactly) or the shipped digits model")
    _add_model_args(p)
    p.add_argument("--model", choices=["mixture", "digits"], default="mixture",
                   help="the analytic Gaussian mixture (scored exactly) or the shipped digits U-Net (PNG grid)")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfe", type=int, default=None)
    p.add_argument("--diffusion", type=float, default=None,
                   help="s(t)/g(t) of the reverse family (default: 1 for SDE samplers, 0 for ODE solvers)")
    p.add_argument("--out", default="", help="output: .pt file of samples, or .png grid (digits; default samples.png)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)
    from .dataset_eval import add_likelihood_args

    add_likelihood_args(sub.add_parser("likelihood", help="log-likelihood / bits-per-dim of a dataset via the PF-ODE"))
    from .models.train import add_train_args

    add_train_args(sub.add_parser("train", help="train a reference score network by denoising score matching"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: a work-precision study on the built-in default model
        args = parser.parse_args(["compare", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
