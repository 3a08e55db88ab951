"""``scoresolve evaluate`` (also ``python -m scoresolve.models.evaluate``): bits/dim of a trained image model on
held-out digits and a PNG grid of its samples (`scoresolve.models.evaluate`)."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from ._args import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, input_file, output_file, run_module


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve evaluate`` (sets ``func=cmd_evaluate``)."""
    p.add_argument("--checkpoint", type=input_file, required=True, help="training state or exported model (.pt)")
    p.add_argument("--bpd-n", type=NONNEGATIVE_INT, default=200, help="held-out images for bits/dim (0: skip)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=100)
    p.add_argument("--probes", type=POSITIVE_INT, default=1)
    p.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5)
    p.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5)
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="dequantization draws per image")
    p.add_argument("--grid", type=output_file, default="", help="PNG of 64 samples: dpmpp_2m (20 NFE) and dopri5")
    p.add_argument("--grid-rtol", type=POSITIVE_FLOAT, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=None)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Write the sample grid (``--grid``) and print bits/dim on ``--bpd-n`` held-out digits."""
    from ..data import digits
    from ..models.evaluate import dequantized_bpd, save_sample_grids
    from ..models.train import load_checkpoint
    from ..sampling import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    model, sde, config = load_checkpoint(args.checkpoint)
    if args.grid:
        x_T = sde.prior_sample((64, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
        a = sample(model, sde, x_T, solver="dpmpp_2m", nfe=20)
        b = sample(model, sde, x_T, solver="dopri5", rtol=args.grid_rtol, atol=args.grid_rtol)
        nfe_b = float(b.nfe.double().mean()) if torch.is_tensor(b.nfe) else float(b.nfe)
        test = digits("test", seed=config.split_seed)[:64]
        panels = [("held-out data", test), ("dpmpp_2m, 20 NFE", a.x)]
        panels.append((f"dopri5 rtol={args.grid_rtol:g}, NFE {nfe_b:.0f}", b.x))
        save_sample_grids(panels, args.grid)
        print(f"sample grid written to {args.grid}")
    if args.bpd_n > 0:
        x = digits("test", seed=config.split_seed)[: args.bpd_n]
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
