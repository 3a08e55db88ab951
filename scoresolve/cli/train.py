"""``scoresolve train`` (also ``python -m scoresolve train``): train a reference score network by denoising
score matching (flow matching with ``--sde rf`` / ``trig``, EDM's denoiser loss with ``--sde pfgmpp``;
`scoresolve.models.train`), checkpoint it and export its EMA weights."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from ._args import (
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    UsageError,
    add_check,
    add_threads_arg,
    apply_threads,
    key_value,
    number,
    output_dir,
    output_file_in_new_dir,
)


def _check(args: argparse.Namespace) -> None:
    from ..models.train import build_sde

    try:
        sde = build_sde(args.sde, **dict(args.sde_arg or []))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--sde {args.sde} with --sde-arg {dict(args.sde_arg or [])}: {e}") from None
    if not args.t_eps < sde.T:
        raise UsageError(f"--t-eps must lie in (0, T) = (0, {sde.T:g}) for this SDE, got {args.t_eps:g}")
    from ..models.train import PROCESSES

    if args.sde in PROCESSES and (args.weighting != "eps" or args.importance_sampling or args.t_sampling != "uniform"):
        raise UsageError(f"--sde {args.sde} trains with EDM's denoiser loss (log-normal sigma: --p-mean, --p-std): "
                         "drop --weighting, --importance-sampling and --t-sampling")
    if getattr(sde, "velocity_form", False) and (args.weighting != "eps" or args.importance_sampling):
        raise UsageError(f"--sde {args.sde} trains by flow matching, which has no weighting: drop --weighting "
                         "and --importance-sampling")
    from ..data import DIGITS_SHAPE
    from ..models.train import build_network

    try:  # the network's options (--model-arg), checked by building it (small, CPU)
        build_network(args.model, DIGITS_SHAPE if args.data == "digits" else (2,), T=sde.T,
                      **dict(args.model_arg or []))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model {args.model} with --model-arg {dict(args.model_arg or [])}: {e}") from None
    if args.importance_sampling and args.t_sampling != "uniform":
        raise UsageError("--importance-sampling draws its own times: drop --t-sampling")


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``scoresolve train`` (sets ``func=cmd_train``)."""
    from ..data import DATASETS
    from ..models.train import PROCESSES, SDES, T_SAMPLINGS, WEIGHTINGS, TrainConfig

    d = TrainConfig()
    p = parser
    p.add_argument("--data", choices=DATASETS, default="moons", help="dataset (default: moons)")
    p.add_argument("--sde", choices=sorted(SDES) + list(PROCESSES), default="vp",
                   help="forward SDE, or pfgmpp (PFGM++: a preconditioned denoiser; D by --sde-arg D=128) "
                   "(default: vp)")
    p.add_argument("--sde-arg", type=key_value, action="append", metavar="KEY=VALUE",
                   help="SDE constructor argument, repeatable (e.g. D=128, sigma_max=80 for pfgmpp)")
    p.add_argument("--model", choices=["auto", "mlp", "unet"], default="auto",
                   help="network (default: auto = unet for images, mlp otherwise)")
    p.add_argument("--model-arg", type=key_value, action="append", metavar="KEY=VALUE",
                   help="network constructor argument, repeatable (e.g. base_channels=16, channel_mult=1,2)")
    p.add_argument("--steps", type=POSITIVE_INT, default=d.steps, help=f"total optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size,
                   help=f"samples per optimizer step (default: {d.batch_size})")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--warmup", type=NONNEGATIVE_INT, default=d.warmup,
                   help=f"linear lr warm-up steps (default: {d.warmup})")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="eps", help="DSM weighting (default: eps)")
    p.add_argument("--importance-sampling", action="store_true",
                   help="with --weighting likelihood: draw t uniformly in log-SNR")
    p.add_argument("--t-eps", type=POSITIVE_FLOAT, default=d.t_eps, help=f"smallest training time (default: {d.t_eps})")
    p.add_argument("--t-sampling", choices=T_SAMPLINGS, default=d.t_sampling,
                   help="training times: uniform on (t_eps, T), or logit_normal as in SD3 (default: uniform)")
    p.add_argument("--logit-mean", type=number(float), default=d.logit_mean,
                   help=f"mean m of logit-normal t (default: {d.logit_mean})")
    p.add_argument("--logit-std", type=POSITIVE_FLOAT, default=d.logit_std,
                   help=f"std s of logit-normal t (default: {d.logit_std})")
    p.add_argument("--p-mean", type=number(float), default=d.p_mean,
                   help=f"pfgmpp: mean of log sigma, EDM's log-normal (default: {d.p_mean})")
    p.add_argument("--p-std", type=POSITIVE_FLOAT, default=d.p_std,
                   help=f"pfgmpp: std of log sigma (default: {d.p_std})")
    p.add_argument("--sigma-data", type=POSITIVE_FLOAT, default=d.sigma_data,
                   help=f"pfgmpp: sigma_data of EDM's preconditioning and weighting (default: {d.sigma_data})")
    p.add_argument("--ema-decay", type=number(float, 0, 1, high_open=True), default=d.ema_decay,
                   help=f"in [0, 1) (default: {d.ema_decay})")
    p.add_argument("--grad-clip", type=NONNEGATIVE_FLOAT, default=d.grad_clip,
                   help="max gradient norm, 0: off")
    p.add_argument("--seed", type=SEED, default=d.seed, help="seed of initialisation and every random draw")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=d.checkpoint_every,
                   help="steps between checkpoints")
    p.add_argument("--out", type=output_dir, default=None, help="run directory for train_state.pt and model.pt "
                   "(default: runs/<data>_<sde>)")
    p.add_argument("--export", type=output_file_in_new_dir, default=None,
                   help="path of the exported EMA model (default: <out>/model.pt)")
    p.add_argument("--export-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the exported weights")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt if it exists")
    add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    add_check(p, _check)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    """``scoresolve train``: train, checkpoint to ``--out``, export the EMA model, print a summary."""
    from ..models.train import MODEL_FILE, STATE_FILE, TrainConfig, export_model, train

    apply_threads(args)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(**options, sde_kwargs=dict(args.sde_arg or []), model_kwargs=dict(args.model_arg or []))
    out = args.out or os.path.join("runs", f"{args.data}_{args.sde}")
    state = os.path.join(out, STATE_FILE)
    if os.path.exists(state) and not args.resume:
        print(f"{state} exists: pass --resume to continue it, or choose another --out", file=sys.stderr)
        return 2
    try:
        res = train(config, out_dir=out, resume=args.resume, progress=not args.quiet)
    except FloatingPointError as e:  # the loss diverged: a setting to change, not a bug to trace
        raise UsageError(f"{e}: training diverged with --lr {args.lr:g}; lower --lr, or set --grad-clip "
                         f"(now {args.grad_clip:g})") from None
    export = args.export or os.path.join(out, MODEL_FILE)
    export_model(res, export, dtype=getattr(torch, args.export_dtype))
    n_par = sum(p.numel() for p in res.net.parameters())
    tail = res.losses[-100:]
    mean_tail = sum(tail) / max(len(tail), 1)
    print(
        f"{config.data}/{config.sde}: {res.step} steps ({res.seconds:.1f} s this run), {n_par} parameters, "
        f"mean loss of the last {len(tail)} steps {mean_tail:.4f}\n"
        f"training state: {state}\nEMA model ({args.export_dtype}, {os.path.getsize(export) / 1e6:.2f} MB): {export}"
    )
    return 0

