"""``scoresolve sample``: sample the analytic mixture (scored exactly), a shipped digits model, a trained checkpoint
or a user's own network (``--model-spec MODULE:FACTORY``)."""

from __future__ import annotations

import argparse
import math

import torch

from ._args import (
    NONNEGATIVE_FLOAT,
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
    save_tensors,
)

_BACKENDS = ("torchdiffeq", "torchsde")


def solver_name(text: str) -> str:
    """An argparse type: a registered solver, or a backend's ``torchdiffeq:METHOD`` / ``torchsde:METHOD``."""
    from ..solvers import REGISTRY

    backend, sep, method = text.partition(":")
    if sep:
        if backend not in _BACKENDS or not method:
            raise argparse.ArgumentTypeError(f"backend solvers look like 'torchdiffeq:dopri5' or 'torchsde:euler', "
                                             f"got {text!r}")
        methods = backend_methods(backend)
        if method not in methods:
            raise argparse.ArgumentTypeError(f"unknown {backend} method {method!r}; available: {', '.join(methods)}")
        return text
    if text not in REGISTRY:
        raise argparse.ArgumentTypeError(f"unknown solver {text!r}; available: {', '.join(sorted(REGISTRY))}")
    if text == "calibrated":
        raise argparse.ArgumentTypeError("'calibrated' runs a Calibration from scoresolve.calibrate, which the command "
                                         "line cannot pass: use the Python API, sample(..., calibration=...)")
    return text


def backend_methods(backend: str) -> list[str]:
    """The methods of a bridge (``scoresolve.solvers.backends``): torchdiffeq's or torchsde's."""
    from ..solvers import backends as b

    if backend == "torchdiffeq":
        return sorted((*b.TORCHDIFFEQ_FIXED, *b.TORCHDIFFEQ_FIXED_OTHER, *b.TORCHDIFFEQ_ADAPTIVE))
    return sorted(b.TORCHSDE_METHODS)


def solver_at_grid(text: str) -> str:
    """An argparse type: a solver (`solver_name`) optionally with a grid, ``dpmpp_2m@karras``."""
    from ..solvers import GRIDS

    name, at, grid = text.partition("@")
    solver_name(name)
    if at and grid not in GRIDS and not grid.startswith("tuned:"):
        raise argparse.ArgumentTypeError(f"unknown grid {grid!r} in {text!r}; expected one of {', '.join(GRIDS)} or "
                                         "tuned:NAME")
    return text


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".svg", ".pdf", ".eps")
GRID_MAX = 256  # images drawn in a PNG grid


def grid_layout(n: int, cap: int = GRID_MAX) -> tuple[int, int]:
    """(images drawn, images per row) of a PNG grid of ``n`` samples: at most ``cap``, in a square grid."""
    shown = min(n, cap)
    return shown, max(1, math.ceil(math.sqrt(shown)))


def _is_image(shape_: tuple[int, ...] | None) -> bool:
    return shape_ is not None and len(shape_) == 3 and shape_[0] in (1, 3)


def _check(args: argparse.Namespace) -> None:
    from ..solvers import REGISTRY, AdaptiveSolver

    net = check_model_source(args, need_shape=True)
    out = args.out.lower()
    if out.endswith(IMAGE_SUFFIXES):
        raise UsageError(f"--out {args.out}: samples are written as a .png grid (image samples) or a .pt file of "
                         "tensors, not as another image format")
    if net is None:
        check_t_eps(args.t_eps, args.sde)
        if out.endswith(".png"):
            raise UsageError(f"a PNG grid needs image samples [C, H, W] with 1 or 3 channels, but the mixture makes "
                             f"samples of shape ({args.dim},): write a .pt file")
    elif out.endswith(".png") and not _is_image(net.shape):
        raise UsageError(f"a PNG grid needs image samples [C, H, W] with 1 or 3 channels, but {net.name} makes "
                         f"samples of shape {net.shape}: write a .pt file")
    spec = REGISTRY.get(args.solver)
    if args.diffusion is not None:
        ode_only = (args.solver or "").startswith("torchdiffeq:") or (spec is not None and not spec.stochastic)
        if args.diffusion > 0 and ode_only:
            raise UsageError(f"--solver {args.solver} integrates the probability-flow ODE: drop --diffusion "
                             f"{args.diffusion:g}, or use an SDE sampler (euler_maruyama, pc, adaptive_sde, ddim, "
                             "dpmpp_2m_sde, torchsde:METHOD)")
        if args.diffusion == 0 and (args.solver or "").startswith("torchsde:"):
            raise UsageError(f"--solver {args.solver} integrates an SDE: --diffusion must be > 0 (default 1)")
    if args.nfe is not None and isinstance(spec, AdaptiveSolver):
        raise UsageError(f"--solver {args.solver} is adaptive and chooses its own steps: drop --nfe")
    if args.nfe is not None and spec is not None and not isinstance(spec, AdaptiveSolver):
        try:
            spec.steps_for_nfe(args.nfe)  # a budget below the solver's minimum, now rather than after loading
        except ValueError as e:
            raise UsageError(f"--nfe {args.nfe}: {e}") from None
    if net is not None and not getattr(net.sde, "gaussian_kernel", True):  # a Poisson flow (PFGM++)
        from ..process import IncompatibleProcessError

        if spec is not None:  # (the default sampler runs on the process's ode_view: `Process.ode_view`)
            try:
                spec.check_process(net.sde, {}, args.diffusion)
            except IncompatibleProcessError as e:
                raise UsageError(str(e)) from None


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve sample`` (sets ``func=cmd_sample``)."""
    add_model_args(p)
    add_network_args(p, model_help="the analytic Gaussian mixture (scored exactly: exact log p and sliced W2 to exact "
                     "samples), or a shipped digits U-Net: digits (VP SDE), digits_flow (rectified flow), "
                     "digits_pfgmpp (PFGM++, D = 128: the ODE solvers euler, heun, rk4, dopri5, ...); networks "
                     "ignore --sde, --dim, --components and --diagonal")
    p.add_argument("--solver", type=solver_name, default=None,
                   help="a solver of scoresolve.list_solvers(), or torchdiffeq:METHOD / torchsde:METHOD (default: "
                   "sample()'s measured few-step default, vAB on the grid uniform in sigma / (alpha + sigma))")
    p.add_argument("--nfe", type=POSITIVE_INT, default=None,
                   help="score evaluations of a grid solver (default: the solver's own budget; adaptive solvers "
                   "choose their steps)")
    p.add_argument("--diffusion", type=NONNEGATIVE_FLOAT, default=None,
                   help="s(t)/g(t) of the reverse family (default: 1 for SDE samplers, 0 for ODE solvers)")
    p.add_argument("--out", type=output_file, default="",
                   help=f"output: .pt file of samples, or .png grid of image samples (at most {GRID_MAX} drawn, "
                   "in a square grid); default: samples.png for image models, none otherwise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=cmd_sample)
    add_check(p, _check)


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample, report NFE and (mixture) exact log p and sliced W2 to exact samples; save the samples."""
    from ..sampling import sample

    apply_threads(args)
    g = torch.Generator().manual_seed(args.seed)
    dtype = torch.float64 if args.float64 else torch.float32
    kw = {"nfe": args.nfe} if args.nfe else {}
    net = network(args)
    if net is not None:  # a network: shipped, trained checkpoint or the user's own
        if net.shape is None:
            raise UsageError(f"the sample shape of {net.name} is unknown: give --shape")
        model, sde = net.model, net.sde
        if args.float64:
            from ..compare import float64_model

            model = float64_model(model)
            if model is None:
                raise UsageError(f"{net.name} cannot run in float64: drop --float64")
        x_T = sde.prior_sample((args.batch, *net.shape), generator=g, dtype=dtype)
        sol = sample(model, sde, x_T, solver=args.solver, t_eps=args.t_eps, progress=not args.quiet,
                     diffusion=args.diffusion, generator=g, denoise=True, **kw)
        nfe = sol.nfe.double().mean().item()
        x = sol.x.double().flatten(1)
        print(f"{net.name} ({sde!r}), solver {sol.solver}: {args.batch} samples of shape {tuple(net.shape)}, "
              f"NFE {nfe:g}; sample mean {x.mean():.4f}, std {x.std():.4f}")
        out = args.out or ("samples.png" if _is_image(net.shape) else "")
        if out.endswith(".png"):
            from ..models.image_grid import save_sample_grids

            shown, nrow = grid_layout(args.batch)
            save_sample_grids([(f"{sol.solver}, NFE {nfe:g}", sol.x[:shown].clamp(-1, 1))], out, nrow=nrow)
            if shown < args.batch:
                print(f"the grid shows the first {shown} of {args.batch} samples")
        elif out:
            save_tensors({"x": sol.x, "nfe": sol.nfe}, out)
        if out:
            print(f"samples written to {out}")
        return 0
    from ..compare import sliced_wasserstein
    from ..sde import sde_from_name

    sde = sde_from_name(args.sde)
    gm = mixture(args)
    x_T = sde.prior_sample((args.batch, args.dim), generator=g, dtype=dtype)
    sol = sample(exact_model(gm, sde), sde, x_T, solver=args.solver, t_eps=args.t_eps, progress=not args.quiet,
                 diffusion=args.diffusion, generator=g, **kw)
    exact = gm.sample_marginal(args.batch, args.t_eps, sde, generator=g, dtype=torch.float64)
    nfe = sol.nfe.double().mean().item() if torch.is_tensor(sol.nfe) else sol.nfe
    logp = gm.log_prob(sol.x.double(), args.t_eps, sde).mean()
    print(f"solver {sol.solver}: NFE {nfe:g}, mean exact log p {logp:.4f}"
          f" (exact samples {gm.log_prob(exact, args.t_eps, sde).mean():.4f}), "
          f"sliced W2 to exact samples {sliced_wasserstein(sol.x, exact):.4f}")
    if args.out:
        save_tensors({"x": sol.x, "nfe": sol.nfe}, args.out)
        print(f"samples written to {args.out}")
    return 0
