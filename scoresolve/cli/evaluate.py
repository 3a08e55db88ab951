"""``scoresolve evaluate`` (also ``python -m scoresolve evaluate``): bits/dim of a trained image model on held-out
digits and a PNG grid of its samples (`scoresolve.models.image_grid`); the model is a checkpoint, a user's
``--model-spec MODULE:FACTORY`` or a shipped ``--model digits`` / ``digits_flow`` / ``digits_pfgmpp``."""

from __future__ import annotations

import argparse

import torch

from ._args import (
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    UsageError,
    add_check,
    add_dequantization_choice_args,
    add_dequantizer_path_arg,
    add_network_args,
    add_threads_arg,
    apply_threads,
    check_model_source,
    load_dequantizer,
    network,
    output_file,
)


def add_dequantization_args(p: argparse.ArgumentParser) -> None:
    """The dequantizer options (``scoresolve.quantization.dequantizers``): ``--dequantization``, ``--truncnorm-scale``,
    ``--iw``, ``--dequantizer-path``, ``--save-dequantizer``, ``--dequantizer-steps``."""
    add_dequantization_choice_args(
        p, "variational (learned on the training digits, or loaded with --dequantizer-path)")
    p.add_argument("--iw", type=POSITIVE_INT, default=None, metavar="N",
                   help="N dequantization draws per image and the importance-weighted bound over them, next to the "
                   "one-draw bound (sets --repeats N)")
    add_dequantizer_path_arg(p, "a saved variational dequantizer to load instead of training one")
    p.add_argument("--save-dequantizer", type=output_file, default="", metavar="PATH",
                   help="save the trained variational dequantizer there")
    p.add_argument("--dequantizer-steps", type=POSITIVE_INT, default=300,
                   help="training steps (batches of 128 training digits, one score evaluation each) of the "
                   "variational dequantizer")


def check_dequantization_args(args: argparse.Namespace) -> None:
    """Cross-option rules of `add_dequantization_args` (raises UsageError)."""
    variational = args.dequantization == "variational"
    if (args.dequantizer_path or args.save_dequantizer) and not variational:
        raise UsageError("--dequantizer-path and --save-dequantizer go with --dequantization variational")
    if args.dequantizer_path and args.save_dequantizer:
        raise UsageError("--dequantizer-path loads a trained dequantizer: there is nothing to --save-dequantizer")
    if args.iw is not None and args.repeats not in (1, args.iw):
        raise UsageError(f"--iw {args.iw} sets the draws per image; it disagrees with --repeats {args.repeats}")


def build_dequantizer(args: argparse.Namespace, model, sde, train_data: torch.Tensor, num_levels: int,
                      data_range, shape):
    """The dequantizer the options ask for (a variational one loaded, or trained on ``train_data``)."""
    from ..quantization import (
        TruncatedNormalDequantizer,
        UniformDequantizer,
        VariationalDequantizer,
        train_dequantizer,
    )

    if args.dequantization == "uniform":
        return UniformDequantizer(num_levels, data_range)
    if args.dequantization == "truncnorm":
        return TruncatedNormalDequantizer(num_levels, data_range, scale=args.truncnorm_scale)
    if args.dequantizer_path:
        dq = load_dequantizer(args.dequantizer_path, num_levels, data_range, shape)  # UsageError: run_command
        print(f"variational dequantizer loaded from {args.dequantizer_path}")
        return dq
    dq = VariationalDequantizer(num_levels, data_range, shape)
    g = torch.Generator().manual_seed(args.seed)
    hist = train_dequantizer(dq, model, train_data, sde=sde, steps=args.dequantizer_steps, generator=g,
                             progress=True)
    tail = hist[-20:]
    print(f"variational dequantizer trained for {args.dequantizer_steps} steps on {train_data.shape[0]} training "
          f"images: E log q = {sum(tail) / len(tail):.4f} nats/dim (KL from uniform, last 20 steps)")
    if args.save_dequantizer:
        dq.save(args.save_dequantizer)
        print(f"variational dequantizer saved to {args.save_dequantizer}")
    return dq


def _check(args: argparse.Namespace) -> None:
    from ..data import DIGITS_SHAPE

    if not (args.model or args.checkpoint or args.model_spec):
        raise UsageError("give the model: --checkpoint PATH.pt, --model-spec MODULE:FACTORY or --model digits")
    if args.probes_per == "step" and args.divergence != "hutchinson":
        raise UsageError("--probes-per step needs --divergence hutchinson")
    net = check_model_source(args)
    shape_ = net.shape if net.shape is not None else DIGITS_SHAPE
    if tuple(shape_) != DIGITS_SHAPE:
        raise UsageError(f"evaluate scores digits models (samples [1, 8, 8]); {net.name} models samples of shape "
                         f"{tuple(shape_)}: use `scoresolve likelihood --data` and `scoresolve sample`")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve evaluate`` (sets ``func=cmd_evaluate``)."""
    add_network_args(p, ("digits", "digits_flow", "digits_pfgmpp"), with_shape=False, required=True,
                     model_help="a shipped digits model (else --checkpoint or --model-spec: a model of 8x8 digits)")
    p.add_argument("--bpd-n", type=NONNEGATIVE_INT, default=200, help="held-out images for bits/dim (0: skip)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=100, help="images per likelihood solve")
    p.add_argument("--probes", type=POSITIVE_INT, default=1, help="Hutchinson probes per image")
    p.add_argument("--probes-per", choices=["solve", "step"], default="solve",
                   help="draw the probes once per solve, or afresh after every accepted step (unbiased; 0.38x the "
                   "standard error at equal work on the digits VP U-Net)")
    p.add_argument("--divergence", choices=["hutchinson", "exact"], default="hutchinson",
                   help="divergence of the likelihood ODE: Hutchinson probes, or exact (D VJPs per step: costly, but "
                   "the importance-weighted bound of --iw is a bound only with it)")
    p.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5, help="relative tolerance of the likelihood ODE")
    p.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5, help="absolute tolerance of the likelihood ODE")
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="dequantization draws per image")
    p.add_argument("--grid", type=output_file, default="", help="PNG of 64 samples: dpmpp_2m (20 NFE) and dopri5")
    p.add_argument("--grid-rtol", type=POSITIVE_FLOAT, default=1e-4, help="rtol = atol of the grid's dopri5 samples")
    add_dequantization_args(p)
    p.add_argument("--seed", type=SEED, default=0, help="seed of the grid's noise, dequantization and probes")
    add_threads_arg(p)
    p.set_defaults(func=cmd_evaluate)
    add_check(p, _check)
    add_check(p, check_dequantization_args)


def _grid_sampling(model, sde) -> tuple[object, object, dict]:
    """(model, process, keywords) for the grid's dpmpp_2m: a Poisson flow (PFGM++) through its EDM view (the same
    ODE in the x0 prediction, `scoresolve.PFGMPP.edm_view`) on EDM's karras grid down to sigma_min, as the PFGM++
    reference samples; any other process as it is, on the solver's default grid."""
    if not hasattr(sde, "edm_view"):
        return model, sde, {}
    from ..score import ScoreModel

    view = sde.edm_view()
    return ScoreModel(model.net, view, prediction="x0", time="t"), view, {"grid": "karras", "t_eps": sde.sigma_min}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Write the sample grid (``--grid``) and print bits/dim on ``--bpd-n`` held-out digits."""
    from ..data import digits
    from ..likelihood import log_likelihood
    from ..models.image_grid import save_sample_grids
    from ..quantization import dequantized_bpd
    from ..sampling import sample

    apply_threads(args)
    net = network(args)
    model, sde = net.model, net.sde
    split_seed = getattr(net.config, "split_seed", 0)  # the shipped models and --model-spec: the default split
    if args.grid:
        x_T = sde.prior_sample((64, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
        model_a, sde_a, kw = _grid_sampling(model, sde)
        a = sample(model_a, sde_a, x_T, solver="dpmpp_2m", nfe=20, **kw)
        b = sample(model, sde, x_T, solver="dopri5", rtol=args.grid_rtol, atol=args.grid_rtol,
                   **({"t_eps": kw["t_eps"]} if "t_eps" in kw else {}))
        nfe_b = float(b.nfe.double().mean()) if torch.is_tensor(b.nfe) else float(b.nfe)
        test = digits("test", seed=split_seed)[:64]
        panels = [("held-out data", test), ("dpmpp_2m, 20 NFE", a.x)]
        panels.append((f"dopri5 rtol={args.grid_rtol:g}, NFE {nfe_b:.0f}", b.x))
        save_sample_grids(panels, args.grid)
        print(f"sample grid written to {args.grid}")
    if args.bpd_n > 0:
        from ..data import DIGITS_LEVELS, DIGITS_RANGE, DIGITS_SHAPE

        x = digits("test", seed=split_seed)[: args.bpd_n]
        dq = build_dequantizer(args, model, sde, digits("train", seed=split_seed), DIGITS_LEVELS, DIGITS_RANGE,
                               DIGITS_SHAPE)
        repeats = args.iw or args.repeats
        kw = dict(probes=args.probes, rtol=args.rtol, atol=args.atol, divergence=args.divergence,
                  **({"probes_per": "step"} if args.probes_per == "step" else {}))
        res = dequantized_bpd(lambda y, g: log_likelihood(model, sde, y, generator=g, **kw), x, repeats=repeats,
                              num_levels=DIGITS_LEVELS, data_range=DIGITS_RANGE, dequantizer=dq,
                              batch_size=args.batch_size, seed=args.seed)
        name = {"uniform": "uniform", "truncnorm": f"truncated-normal (scale {args.truncnorm_scale:g})",
                "variational": "variational"}[args.dequantization]
        probes = "exact divergence" if args.divergence == "exact" else \
            f"{args.probes} Hutchinson probe(s){' per step' if args.probes_per == 'step' else ''}"
        kl = "" if args.dequantization == "uniform" else f", E log q = {res.log_q_mean / x[0].numel():.4f} nats/dim"
        print(
            f"bits/dim on {x.shape[0]} held-out digits (17 levels, {name} dequantization, {repeats} draw(s), "
            f"{probes}, dopri5 rtol={args.rtol:g} atol={args.atol:g}): "
            f"{res.mean:.4f} +- {res.std_error:.4f}  (mean NFE {res.nfe_mean:.0f}, {res.seconds:.0f} s{kl})"
        )
        if res.iw_mean is not None:
            print(f"importance-weighted bound over the {repeats} draws per image: "
                  f"{res.iw_mean:.4f} +- {res.iw_std_error:.4f}")
            if args.divergence != "exact":
                print("  (each draw's log p carries Hutchinson noise, which the log-mean-exp turns into a spurious "
                      "gain: the importance-weighted figure is a bound only with --divergence exact)")
    return 0
