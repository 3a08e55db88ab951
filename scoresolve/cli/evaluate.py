"""``scoresolve evaluate`` (also ``python -m scoresolve.models.evaluate``): bits/dim of a trained image model on
held-out digits and a PNG grid of its samples (`scoresolve.models.evaluate`); the model is a checkpoint, a user's
``--model-spec MODULE:FACTORY`` or a shipped ``--model digits`` / ``digits_flow``."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from ._args import (
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    UsageError,
    add_check,
    add_network_args,
    add_threads_arg,
    apply_threads,
    check_model_source,
    network,
    output_file,
    run_module,
)


def _check(args: argparse.Namespace) -> None:
    from ..data import DIGITS_SHAPE

    if not (args.model or args.checkpoint or args.model_spec):
        raise UsageError("give the model: --checkpoint PATH.pt, --model-spec MODULE:FACTORY or --model digits")
    net = check_model_source(args)
    shape_ = net.shape if net.shape is not None else DIGITS_SHAPE
    if tuple(shape_) != DIGITS_SHAPE:
        raise UsageError(f"evaluate scores digits models (samples [1, 8, 8]); {net.name} models samples of shape "
                         f"{tuple(shape_)}: use `scoresolve likelihood --data` and `scoresolve sample`")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve evaluate`` (sets ``func=cmd_evaluate``)."""
    add_network_args(p, ("digits", "digits_flow"), with_shape=False, required=True,
                     model_help="a shipped digits model (else --checkpoint or --model-spec: a model of 8x8 digits)")
    p.add_argument("--bpd-n", type=NONNEGATIVE_INT, default=200, help="held-out images for bits/dim (0: skip)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=100, help="images per likelihood solve")
    p.add_argument("--probes", type=POSITIVE_INT, default=1, help="Hutchinson probes per image")
    p.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5, help="relative tolerance of the likelihood ODE")
    p.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5, help="absolute tolerance of the likelihood ODE")
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="dequantization draws per image")
    p.add_argument("--grid", type=output_file, default="", help="PNG of 64 samples: dpmpp_2m (20 NFE) and dopri5")
    p.add_argument("--grid-rtol", type=POSITIVE_FLOAT, default=1e-4, help="rtol = atol of the grid's dopri5 samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the grid's noise, dequantization and probes")
    add_threads_arg(p)
    p.set_defaults(func=cmd_evaluate)
    add_check(p, _check)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Write the sample grid (``--grid``) and print bits/dim on ``--bpd-n`` held-out digits."""
    from ..data import digits
    from ..models.evaluate import dequantized_bpd, save_sample_grids
    from ..sampling import sample

    apply_threads(args)
    net = network(args)
    model, sde = net.model, net.sde
    split_seed = getattr(net.config, "split_seed", 0)  # the shipped models and --model-spec: the default split
    if args.grid:
        x_T = sde.prior_sample((64, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
        a = sample(model, sde, x_T, solver="dpmpp_2m", nfe=20)
        b = sample(model, sde, x_T, solver="dopri5", rtol=args.grid_rtol, atol=args.grid_rtol)
        nfe_b = float(b.nfe.double().mean()) if torch.is_tensor(b.nfe) else float(b.nfe)
        test = digits("test", seed=split_seed)[:64]
        panels = [("held-out data", test), ("dpmpp_2m, 20 NFE", a.x)]
        panels.append((f"dopri5 rtol={args.grid_rtol:g}, NFE {nfe_b:.0f}", b.x))
        save_sample_grids(panels, args.grid)
        print(f"sample grid written to {args.grid}")
    if args.bpd_n > 0:
        x = digits("test", seed=split_seed)[: args.bpd_n]
        res = dequantized_bpd(model, sde, x, repeats=args.repeats, batch_size=args.batch_size, seed=args.seed,
                              probes=args.probes, rtol=args.rtol, atol=args.atol)
        print(
            f"bits/dim on {x.shape[0]} held-out digits (17 levels, uniform dequantization, {args.repeats} draw(s), "
            f"{args.probes} Hutchinson probe(s), dopri5 rtol={args.rtol:g} atol={args.atol:g}): "
            f"{res.mean:.4f} +- {res.std_error:.4f}  (mean NFE {res.nfe_mean:.0f}, {res.seconds:.0f} s)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scoresolve.models.evaluate ...``: ``scoresolve evaluate`` as a stand-alone program."""
    return run_module("scoresolve.models.evaluate", add_evaluate_args, argv)
