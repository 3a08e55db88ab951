"""``scoresolve compare`` (the default command): a work-precision study of solvers on an analytic Gaussian mixture,
a shipped model, a trained checkpoint or a user's own network."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ._args import (
    POSITIVE_FLOAT,
    POSITIVE_INT,
    UsageError,
    add_check,
    add_model_args,
    add_network_args,
    add_threads_arg,
    apply_threads,
    check_model_source,
    check_t_eps,
    exact_model,
    mixture,
    network,
    output_file,
)

DEFAULT_SOLVERS = [
    "euler",
    "heun",
    "ddim",
    "dpm_solver_2",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "vab",
    "dopri5",
    "tsit5",
    "euler_maruyama",
]


NETWORK_BATCH = 32  # a network's default batch: its reference solve costs ~1000 evaluations per sample
NETWORK_REF_TOL = 1e-6


def _check(args: argparse.Namespace) -> None:
    net = check_model_source(args, need_shape=True)
    if net is None:
        check_t_eps(args.t_eps, args.sde)
    if args.batch is None:
        args.batch = 512 if net is None else NETWORK_BATCH


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve compare`` (sets ``func=cmd_compare``)."""
    add_model_args(p)
    p.set_defaults(batch=None)
    p._option_string_actions["--batch"].help = (f"samples per run (default: 512 for the mixture, {NETWORK_BATCH} for "
                                                "a network)")
    add_network_args(p, model_help="the analytic Gaussian mixture (errors against a float64 reference solve, sliced "
                     "W2 and exact log p against exact samples), or a shipped digits U-Net; for a network (also "
                     "--checkpoint, --model-spec) the error is against a tight dopri5 solve of the same model "
                     "(float64 where it converts), stochastic solvers are skipped and there are no SWD / log p "
                     "columns; networks ignore --sde, --dim, --components and --diagonal")
    from .sample import solver_at_grid

    p.add_argument("--solvers", nargs="+", type=solver_at_grid, default=DEFAULT_SOLVERS,
                   help="solver names, optionally with a grid: dpmpp_2m@karras")
    p.add_argument("--nfe", nargs="+", type=POSITIVE_INT, default=[10, 20, 50], help="NFE budgets of grid solvers")
    p.add_argument("--tol", nargs="+", type=POSITIVE_FLOAT, default=[1e-2, 1e-3, 1e-4],
                   help="tolerances (rtol = atol) of adaptive solvers")
    p.add_argument("--best", action="store_true",
                   help="pick the best (solver, grid) for the model at each --nfe budget: runs every deterministic "
                        "grid solver on every grid the process allows (ignores --solvers and --tol) and prints the "
                        "winner per budget after the table")
    p.add_argument("--ref-tol", type=POSITIVE_FLOAT, default=NETWORK_REF_TOL,
                   help="rtol = atol of a network's reference solve (dopri5, float64 where the network converts); "
                   "its cost is printed before it runs: loosen it for a quicker, rougher study")
    p.add_argument("--out", type=output_file, default="work_precision.png", help="PNG path for the plot ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=cmd_compare)
    add_check(p, _check)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every solver at every NFE budget / tolerance, print the table, write the plot."""
    from ..compare import exact_baseline, work_precision
    from ..sde import sde_from_name
    from ..solvers import REGISTRY

    apply_threads(args)
    dtype = torch.float64 if args.float64 else torch.float32
    solvers = [s for s in args.solvers if s.partition("@")[0] in REGISTRY or ":" in s]
    missing = sorted(set(args.solvers) - set(solvers))
    if missing:
        print(f"skipping unknown solvers: {missing}", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    net = network(args)
    if args.best:
        solvers = best_candidates(net.sde if net is not None else sde_from_name(args.sde))
        args.tol = []
    if net is not None:
        return _compare_network(args, net, solvers, dtype, g)
    sde = sde_from_name(args.sde)
    gm = mixture(args)
    x_T = sde.prior_sample((args.batch, args.dim), generator=g, dtype=dtype)
    print(
        f"{args.sde.upper()} SDE, {args.components}-component Gaussian mixture in {args.dim} dims, "
        f"batch {args.batch}, t_eps={args.t_eps}, {str(dtype).replace('torch.', '')}"
    )
    t0 = time.perf_counter()
    runs = work_precision(
        exact_model(gm, sde),
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
    return _report(args, runs, f"{args.sde.upper()} SDE, {args.dim}-D mixture", t0)


def _report(args: argparse.Namespace, runs: list, title: str, t0: float) -> int:
    """The table, the best run per budget (``--best``), the plot and the total time of a compare run."""
    from ..compare import format_table, plot_work_precision

    print(format_table(runs))
    if args.best:
        print_best(runs)
    if args.out:
        plot_work_precision(runs, args.out, title=title)
        print(f"work-precision plot written to {args.out}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _compare_network(args: argparse.Namespace, net, solvers: list[str], dtype: torch.dtype,
                     g: torch.Generator) -> int:
    """A network has no exact reference: path-wise errors against a tight dopri5 solve of the same model, no
    distribution columns; stochastic solvers (no path-wise reference) are skipped."""
    from ..compare import (
        _is_random,
        float64_model,
        network_reference,
        work_precision,
    )
    from ..solvers import REGISTRY

    random = [s for s in solvers if _is_random(s.partition("@")[0], REGISTRY.get(s.partition("@")[0]), {})]
    if random:
        print(f"skipping stochastic solvers (a network has no exact samples to compare them with): {random}",
              file=sys.stderr)
    solvers = [s for s in solvers if s not in random]
    model = net.model
    if args.float64:
        model = float64_model(model)
        if model is None:
            raise UsageError(f"{net.name} cannot run in float64: drop --float64")
    x_T = net.sde.prior_sample((args.batch, *net.shape), generator=g, dtype=dtype)
    t0 = time.perf_counter()
    print(f"reference: dopri5 at rtol=atol={args.ref_tol:g} of {args.batch} samples (float64 where the network "
          "converts; typically several hundred to a few thousand evaluations per sample; --ref-tol loosens it)",
          file=sys.stderr, flush=True)
    reference, how = network_reference(model, net.sde, x_T, args.t_eps, tol64=args.ref_tol, tol32=args.ref_tol,
                                       progress=not args.quiet)
    print(f"{net.name} ({net.sde!r}), samples of shape {tuple(net.shape)}, batch {args.batch}, t_eps={args.t_eps}, "
          f"{str(dtype).replace('torch.', '')}; reference: {how}, {time.perf_counter() - t0:.1f} s")
    runs = work_precision(model, net.sde, x_T, solvers, nfes=args.nfe, tolerances=args.tol, t_eps=args.t_eps,
                          reference=reference, progress=not args.quiet)
    return _report(args, runs, f"{os.path.basename(net.name)}: error vs dopri5 of the same model", t0)


def best_candidates(sde) -> list[str]:
    """Every deterministic grid solver on every grid the process allows, as ``solver@grid`` names."""
    from ..solvers import GRIDS, REGISTRY, GridSolver

    alpha_T = float(sde.alpha(sde.T))
    grids = [g for g in GRIDS if alpha_T > 0 or g in ("uniform", "quadratic")]
    names = []
    for name, spec in sorted(REGISTRY.items()):
        if not isinstance(spec, GridSolver) or spec.stochastic and spec.noise_option is None or spec.default_diffusion:
            continue
        if alpha_T == 0 and not spec.starts_at_alpha0 or spec.required_options:
            continue
        names += [f"{name}@{g}" for g in grids]
    return names


def print_best(runs) -> None:
    """The lowest-error run at each NFE budget (within its budget)."""
    import math

    settings = sorted({r.setting for r in runs if r.setting.startswith("nfe=")}, key=lambda s: int(s[4:]))
    for setting in settings:
        budget = int(setting[4:])
        ok = [r for r in runs if r.setting == setting and r.nfe <= budget and not math.isnan(r.error)]
        if ok:
            b = min(ok, key=lambda r: r.error)
            solver, _, grid = b.solver.partition("@")
            print(f"best at {setting}: solver={solver} grid={grid or 'default'} error={b.error:.3e}")
