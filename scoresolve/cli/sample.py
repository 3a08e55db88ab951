"""``scoresolve sample``: sample the analytic mixture (scored exactly) or a shipped digits model."""

from __future__ import annotations

import argparse

import torch

from ._args import (
    NONNEGATIVE_FLOAT,
    POSITIVE_INT,
    UsageError,
    add_check,
    add_model_args,
    check_t_eps,
    mixture,
    output_file,
)

_BACKENDS = ("torchdiffeq", "torchsde")


def solver_name(text: str) -> str:
    """An argparse type: a registered solver, or a backend's ``torchdiffeq:METHOD`` / ``torchsde:METHOD``."""
    from ..solvers import REGISTRY

    backend, sep, method = text.partition(":")
    if sep:
        if backend in _BACKENDS and method:
            return text
        raise argparse.ArgumentTypeError(f"backend solvers look like 'torchdiffeq:dopri5' or 'torchsde:euler', "
                                         f"got {text!r}")
    if text not in REGISTRY:
        raise argparse.ArgumentTypeError(f"unknown solver {text!r}; available: {', '.join(sorted(REGISTRY))}")
    return text


def _check(args: argparse.Namespace) -> None:
    from ..solvers import REGISTRY

    # the shipped models fix their process: digits is a VP model, digits_flow a rectified flow
    check_t_eps(args.t_eps, {"digits": "vp", "digits_flow": "rf"}.get(args.model, args.sde))
    spec = REGISTRY.get(args.solver)
    if args.nfe is not None and spec is not None and spec.kind == "adaptive":
        raise UsageError(f"--solver {args.solver} is adaptive and chooses its own steps: drop --nfe")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve sample`` (sets ``func=cmd_sample``)."""
    add_model_args(p)
    p.add_argument("--model", choices=["mixture", "digits", "digits_flow"], default="mixture",
                   help="the analytic Gaussian mixture (scored exactly) or a shipped digits U-Net (PNG grid): digits "
                   "(VP SDE), digits_flow (rectified flow); these ignore --sde")
    p.add_argument("--solver", type=solver_name, default="dpmpp_2m")
    p.add_argument("--nfe", type=POSITIVE_INT, default=None, help="score evaluations of a grid solver")
    p.add_argument("--diffusion", type=NONNEGATIVE_FLOAT, default=None,
                   help="s(t)/g(t) of the reverse family (default: 1 for SDE samplers, 0 for ODE solvers)")
    p.add_argument("--out", type=output_file, default="",
                   help="output: .pt file of samples, or .png grid (digits; default samples.png)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)
    add_check(p, _check)


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample, report NFE and (mixture) exact log p and sliced W2 to exact samples; save the samples."""
    from ..sampling import sample

    g = torch.Generator().manual_seed(args.seed)
    dtype = torch.float64 if args.float64 else torch.float32
    kw = {"nfe": args.nfe} if args.nfe else {}
    if args.model != "mixture":  # a shipped U-Net trained on scikit-learn's digits
        from ..models import BUILTIN_MODELS
        from ..models.evaluate import save_sample_grids

        model, sde = BUILTIN_MODELS[args.model]()
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
    from ..compare import sliced_wasserstein
    from ..sde import sde_from_name

    sde = sde_from_name(args.sde)
    gm = mixture(args)
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
