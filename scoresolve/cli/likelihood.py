"""``scoresolve likelihood``: log-likelihood / bits-per-dim of a dataset through the PF-ODE, resumable and sharded
(``scoresolve.evaluation``), next to the exact value of the built-in analytic Gaussian mixture, or under a network: a
shipped digits model (``--model digits`` / ``digits_flow``, on held-out digits by default), a trained checkpoint
(``--checkpoint``) or a user's own (``--model-spec MODULE:FACTORY``). Quantized data are dequantized uniformly, or
with a truncated-normal or saved variational q(u | i) (``--dequantization``, `scoresolve.quantization.dequantizers`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

import torch

from ._args import (
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    TRUNCNORM_SCALE,
    UsageError,
    add_check,
    add_dequantization_choice_args,
    add_dequantizer_path_arg,
    add_network_args,
    add_threads_arg,
    apply_threads,
    check_model_source,
    check_t_eps,
    device,
    exact_model,
    load_dequantizer,
    network,
    number,
    output_dir,
    tensor_file,
)

BITS = number(int, 1, 32, what="bits")
NUM_LEVELS = number(int, 2, what="the number of levels")


def adaptive_method(text: str) -> str:
    """An argparse type: an embedded Runge-Kutta pair of the likelihood ODE (``dopri5``, ``tsit5``, ...)."""
    from ..solvers.tableaux import TABLEAUX

    if text not in TABLEAUX:
        raise argparse.ArgumentTypeError(f"unknown adaptive method {text!r}; available: {', '.join(sorted(TABLEAUX))}")
    return text


class _LevelsAction(argparse.Action):
    """Stores ``--bits`` / ``--num-levels`` and rejects the pair (whatever their order) if 2^bits != num_levels."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        bits, levels_ = getattr(namespace, "bits", None), getattr(namespace, "num_levels", None)
        if bits is not None and levels_ is not None and 2**bits != levels_:
            parser.error(
                f"--bits {bits} (2^{bits} = {2**bits} levels) and --num-levels {levels_} disagree: give one of them"
            )


# the process each shipped model was trained under
_BUILTIN_SDE = {"digits": "vp", "digits_flow": "rf", "digits_pfgmpp": "pfgmpp"}


def _check(args: argparse.Namespace) -> None:
    lo, hi = args.data_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"--data-range needs finite LO < HI, got {lo:g} {hi:g}")
    if args.probes_per == "step" and args.divergence != "hutchinson":
        raise UsageError("--probes-per step needs --divergence hutchinson")
    if args.divergence == "exact" and args.data is not None and torch.is_tensor(args.data):
        from ..divergence import EXACT_MAX_DIMS

        D = math.prod(args.data.shape[1:])
        if D > EXACT_MAX_DIMS:
            raise UsageError(f"--divergence exact on D={D} dimensions takes {D} VJPs per evaluation: refused above "
                             f"D={EXACT_MAX_DIMS}; use --divergence hutchinson")
    if args.divergence == "hutchinson":
        from ..divergence import MAX_PROBES

        if args.probes > MAX_PROBES:
            raise UsageError(f"--probes {args.probes} takes {args.probes} VJPs per evaluation: refused above "
                             f"{MAX_PROBES}; use fewer probes, or --divergence exact on data of fewer dimensions")
    net = check_model_source(args)
    if getattr(args, "bound", "ode") == "elbo" and net is None:
        raise UsageError("--bound elbo evaluates a network (--model digits, --checkpoint, --model-spec)")
    if args.out_dir is None:  # one default directory per model: a run of another model never meets its records
        args.out_dir = default_out_dir(args, net)
    if net is None:
        check_t_eps(args.t_eps, args.sde)
        _check_dequantization(args, net)
        _check_data(args)
        return
    if args.float64:
        raise UsageError(f"{net.name} is a float32 network: drop --float64")
    if args.data is None:
        _default_data(args, net, check_only=True)
    elif net.shape is not None and tuple(args.data.shape[1:]) != tuple(net.shape):
        raise UsageError(f"--data holds samples of shape {tuple(args.data.shape[1:])}, but {net.name} models "
                         f"samples of shape {tuple(net.shape)}")
    _check_dequantization(args, net)
    _check_data(args)


DEFAULT_OUT_DIR = "likelihood_eval"


def default_out_dir(args: argparse.Namespace, net) -> str:
    """``likelihood_eval`` for the mixture, ``likelihood_eval_<model>`` for a network (a shipped model's name, a
    checkpoint's or a --model-spec module's file name)."""
    import re

    if net is None:
        return DEFAULT_OUT_DIR
    name = args.model or os.path.splitext(os.path.basename(net.name.rpartition(":")[0] or net.name))[0]
    if args.model_spec:
        name += "_" + net.name.rpartition(":")[2]
    return f"{DEFAULT_OUT_DIR}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"


def _check_data(args: argparse.Namespace) -> None:
    """Usage errors of ``--data``'s contents: non-finite values; with ``--bits`` / ``--num-levels``, values off the
    declared grid of ``--data-range``."""
    data = args.data
    if data is None or not torch.is_tensor(data):
        return
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data.flatten(1))).any(1).sum())
        raise UsageError(f"--data holds non-finite values (NaN or inf) in {bad} of its {len(data)} samples")
    num_levels = args.num_levels or (2**args.bits if args.bits is not None else None)
    if num_levels is not None:
        from ..quantization import grid_levels, grid_name

        try:
            grid_levels(data, num_levels, tuple(args.data_range), grid_name(num_levels))
        except ValueError as e:
            raise UsageError(f"--data with {num_levels} levels in --data-range {args.data_range[0]:g} "
                             f"{args.data_range[1]:g}: {e} (continuous data: drop --bits / --num-levels)") from None
    elif not data.is_floating_point():
        raise UsageError(f"--data holds {data.dtype} values: give --bits K or --num-levels L for integer levels")


def stored_threads(out_dir: str) -> int | None:
    """The thread count recorded in ``out_dir``'s manifest (a resume uses it unless --threads is given)."""
    import json

    from ..evaluation import MANIFEST

    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            n = json.load(f).get("threads")
    except (OSError, ValueError, AttributeError):
        return None
    return n if type(n) is int and n >= 1 else None


def _check_dequantization(args: argparse.Namespace, net) -> None:
    """Usage errors of ``--dequantization``, ``--truncnorm-scale`` and ``--dequantizer-path``; loads the saved q."""
    kind = args.dequantization
    if args.truncnorm_scale is not None and kind != "truncnorm":
        raise UsageError("--truncnorm-scale goes with --dequantization truncnorm")
    if args.dequantizer_path and kind != "variational":
        raise UsageError("--dequantizer-path goes with --dequantization variational")
    if kind == "uniform":
        return
    if kind == "variational" and not args.dequantizer_path:
        raise UsageError("--dequantization variational needs --dequantizer-path PATH, a dequantizer saved by "
                         "`scoresolve evaluate --save-dequantizer` or VariationalDequantizer.save: likelihood does "
                         "not train one")
    num_levels, shape_ = _levels_and_shape(args, net)
    if num_levels is None:
        raise UsageError(f"--dequantization {kind} needs quantized data: give --bits K or --num-levels L (without "
                         "them the data are evaluated as continuous, with no dequantization)")
    if kind == "variational":
        try:
            args._dequantizer = load_dequantizer(args.dequantizer_path, num_levels, tuple(args.data_range), shape_)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a file that does not load is the file's fault
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--dequantizer-path {args.dequantizer_path}: not a saved VariationalDequantizer "
                             f"({first})") from None


def _levels_and_shape(args: argparse.Namespace, net) -> tuple[int | None, tuple[int, ...]]:
    """(L or None for continuous data, the shape of one sample) of the data the options describe."""
    num_levels = args.num_levels  # --bits and --num-levels agree (_LevelsAction)
    if num_levels is None and args.bits is not None:
        num_levels = 2**args.bits
    if args.data is not None:
        return num_levels, tuple(args.data.shape[1:])
    if net is None:
        return num_levels, (args.dim,)
    name, shape_ = _default_source(net)
    if name == "digits" and num_levels is None:
        from ..data import DIGITS_LEVELS

        num_levels = DIGITS_LEVELS
    return num_levels, shape_


def _default_source(net) -> tuple[str, tuple[int, ...]]:
    """(name, sample shape) of a network's default dataset (held-out digits or a 2-D toy set); UsageError if none."""
    from ..data import DIGITS_SHAPE, TOY_DATASETS

    config = net.config
    name = "digits" if config is None and net.name in _BUILTIN_SDE else getattr(config, "data", None)
    shape_ = DIGITS_SHAPE if name == "digits" else (2,) if name in TOY_DATASETS else None
    if name is None or shape_ is None or (net.shape is not None and tuple(net.shape) != tuple(shape_)):
        raise UsageError(f"{net.name} has no default dataset: give --data FILE")
    return name, tuple(shape_)


def _default_data(args: argparse.Namespace, net, check_only: bool = False):
    """(data, num_levels) of a network without ``--data``: held-out digits (17 levels) for the shipped models and
    checkpoints trained on digits, fresh samples of the 2-D toy set of a checkpoint trained on one."""
    from ..data import DIGITS_LEVELS, digits, toy_dataset

    config = net.config
    name, _ = _default_source(net)
    if check_only:
        return None
    if name == "digits":
        return digits("test", seed=getattr(config, "split_seed", 0))[: args.n], DIGITS_LEVELS
    return toy_dataset(name, args.n, seed=10_000 + args.seed), None


def _dequantizer(args: argparse.Namespace, num_levels: int | None, shape_):
    """The ``--dequantization`` q for ``evaluate_dataset`` (None: uniform), for data of L = ``num_levels``."""
    kind = getattr(args, "dequantization", "uniform")
    if kind == "uniform":
        return None
    if num_levels is None:  # reached only through a parser without the checks (plain argparse)
        raise ValueError(f"--dequantization {kind} needs quantized data: give --bits K or --num-levels L")
    data_range = tuple(args.data_range)
    if kind == "truncnorm":
        from ..quantization import TruncatedNormalDequantizer

        scale = getattr(args, "truncnorm_scale", None) or TRUNCNORM_SCALE
        return TruncatedNormalDequantizer(num_levels, data_range, scale=scale)
    if "_dequantizer" in vars(args):
        return args._dequantizer
    if not args.dequantizer_path:
        raise ValueError("--dequantization variational needs --dequantizer-path PATH")
    return load_dequantizer(args.dequantizer_path, num_levels, data_range, shape_)


def _dequantizer_lines(args: argparse.Namespace, summary, dim: int) -> list[str]:
    """The report's lines about a non-uniform q: E log q, and the importance-weighted bound of several repeats."""
    kind = getattr(args, "dequantization", "uniform")
    if kind == "uniform" or summary.mean_log_q is None:
        return []
    name = {"truncnorm": "truncated-normal (scale "
            f"{TRUNCNORM_SCALE if args.truncnorm_scale is None else args.truncnorm_scale:g})",
            "variational": f"variational ({args.dequantizer_path})"}[kind]
    lines = [f"{name} dequantization: bits/dim is the bound E_q[-log p + log q] / (D ln 2) + offset, "
             f"E log q = {summary.mean_log_q / dim:.4f} nats/dim"]
    if summary.iw_bpd is not None:
        lines.append(f"importance-weighted bound over the {summary.repeats} repeats per sample: "
                     f"{summary.iw_bpd:.5f} +- {summary.iw_bpd_std_error:.5f}")
        if args.divergence != "exact":
            lines.append("  (Hutchinson noise in each log p biases it low: a bound only with --divergence exact)")
    return lines


def add_likelihood_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve likelihood`` (the model is the built-in analytic Gaussian mixture).

    The data's quantisation is ``--bits K`` (2^K levels) or ``--num-levels L`` (any L >= 2; both only if
    L = 2^K, otherwise an argparse error); with neither, the data are evaluated as continuous.
    """
    from ..sde import SDE_NAMES

    p.add_argument("--out-dir", type=output_dir, default=None,
                   help=f"records, manifest and results (resumable; default: {DEFAULT_OUT_DIR} for the mixture, "
                   f"{DEFAULT_OUT_DIR}_<model> for a network)")
    p.add_argument(
        "--data",
        type=tensor_file,
        default=None,
        metavar="FILE",
        help="a .pt file holding a tensor [N, ...] or a dict with key 'x', loaded with torch.load(weights_only=True) "
        "(default: mixture samples)",
    )
    p.add_argument(
        "--num-samples",
        "--n",
        dest="n",
        type=POSITIVE_INT,
        default=256,
        help="samples of the built-in mixture dataset (default: 256; under torchrun write --num-samples: "
        "torchrun rejects --n as an ambiguous abbreviation of its own options)",
    )
    add_network_args(p, ("mixture", *_BUILTIN_SDE), with_shape=False, model_help="the analytic Gaussian mixture "
                     "(exact reference), or a shipped digits U-Net: digits (VP SDE), digits_flow (rectified flow), "
                     "digits_pfgmpp (PFGM++, D = 128). "
                     "Networks (also --checkpoint, --model-spec) ignore --sde and evaluate --data; without it, the "
                     "shipped models and checkpoints trained on digits take the first --num-samples held-out digits "
                     "as 17-level data, checkpoints trained on a 2-D toy set fresh samples of it")
    p.add_argument("--sde", choices=sorted(SDE_NAMES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--dim", type=POSITIVE_INT, default=16,
                   help="dimension of the mixture (default: 16; --data sets it)")
    p.add_argument("--components", type=POSITIVE_INT, default=8, help="mixture components (default: 8)")
    p.add_argument("--diagonal", action="store_true", help="axis-aligned components instead of correlated ones")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="samples per likelihood solve")
    p.add_argument("--repeats", type=POSITIVE_INT, default=1, help="evaluations per sample (fresh noise each)")
    p.add_argument("--divergence", choices=["hutchinson", "exact"], default="hutchinson", help="divergence estimator")
    p.add_argument("--probes", type=POSITIVE_INT, default=1, help="Hutchinson probes per sample")
    p.add_argument("--probe", choices=["rademacher", "gaussian", "orthogonal"], default="rademacher",
                   help="probe distribution")
    p.add_argument("--probes-per", choices=["solve", "step"], default="solve",
                   help="draw the probes once per solve, or afresh after every accepted step (unbiased; several "
                   "times lower variance on trained networks for one more evaluation per step)")
    p.add_argument("--solver", type=adaptive_method, default="dopri5",
                   help="embedded Runge-Kutta pair of the likelihood ODE")
    p.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5, help="relative tolerance of the likelihood ODE")
    p.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5, help="absolute tolerance of the likelihood ODE")
    p.add_argument("--t-eps", type=POSITIVE_FLOAT, default=1e-5,
                   help="start time of the likelihood ODE (default: 1e-5)")
    p.add_argument(
        "--bits",
        type=BITS,
        default=None,
        action=_LevelsAction,
        help="k-bit data (2^k levels): dequantize them and add the bits/dim offset log2(2^k / (HI - LO))",
    )
    p.add_argument(
        "--num-levels",
        type=NUM_LEVELS,
        default=None,
        action=_LevelsAction,
        metavar="L",
        help="L-level data (any L >= 2, e.g. 17 for the digits), an alternative to --bits: dequantize them on "
        "their L levels and add the bits/dim offset log2(L / (HI - LO))",
    )
    p.add_argument("--data-range", type=number(float), nargs=2, default=(-1.0, 1.0), metavar=("LO", "HI"),
                   help="range [LO, HI] of the quantised data's levels")
    add_dequantization_choice_args(p, "variational (a saved one, loaded with --dequantizer-path)",
                                   scale_default=None)
    add_dequantizer_path_arg(p, "a variational dequantizer saved by `scoresolve evaluate --save-dequantizer` or "
                             "VariationalDequantizer.save (this command does not train one)")
    p.add_argument("--bound", choices=["ode", "elbo"], default="ode",
                   help="ode: the probability-flow ODE's log-likelihood; elbo: the discrete-time variational bound "
                   "of DDPM (networks of VP-type schedules; scoresolve.variational)")
    p.add_argument("--elbo-steps", type=POSITIVE_INT, default=1000,
                   help="K, steps of the bound on the even subsequence of the N-step chain (default: 1000)")
    p.add_argument("--num-timesteps", type=POSITIVE_INT, default=1000,
                   help="N, the chain a continuous schedule is discretised to for the bound (default: 1000)")
    p.add_argument("--variance", choices=["beta", "beta_tilde", "analytic"], default="analytic",
                   help="reverse variance of the bound (analytic: Analytic-DPM's, from a cached moment estimate)")
    p.add_argument("--moment-samples", type=POSITIVE_INT, default=10,
                   help="M, data samples per step of the analytic variance's moment estimate (default: 10)")
    p.add_argument("--moment-data", type=tensor_file, default=None, metavar="FILE",
                   help="training data for the moment estimate (default: the training digits for the digits "
                   "models, else the evaluated data), dequantized like them")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the mixture, its dataset, dequantization and probes")
    p.add_argument("--float64", action="store_true", help="evaluate in float64 (default float32)")
    p.add_argument("--device", type=device, default=None, help="device of the solve (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=cmd_likelihood)
    add_check(p, _check)


def cmd_likelihood(args: argparse.Namespace) -> int:
    """Evaluate log p_{t_eps} of a dataset under the analytic mixture with the real ODE likelihood, next to the
    exact value ``gm.log_prob(x, t_eps, sde)``; the error is split into the prior mismatch (exact, a property of
    the SDE's finite T, not of the solver) and the rest. Works under ``torchrun`` (each rank takes its shard).

    With ``--bits K`` or ``--num-levels L`` the data (``--data``: grid values in ``--data-range`` or integer
    levels) are dequantized on their L = 2^K or L levels, the exact value is taken at the same dequantized inputs,
    and bits/dim includes the offset log2(L / (HI - LO)). ``--dequantization truncnorm`` (``--truncnorm-scale S``)
    or ``variational`` (``--dequantizer-path PATH``) draws the position in each bin from that q(u | i) instead:
    bits/dim is then the bound with log q subtracted from log p, and with ``--repeats`` > 1 the importance-weighted
    bound over the repeats is printed too.

    Returns:
        0 (the exit status); the report is printed on rank 0.
    """
    from ..analytic import GaussianMixture
    from ..evaluation import dequantized_samples, evaluate_dataset, read_records
    from ..evaluation.distributed import is_secondary_rank, maybe_init_distributed
    from ..quantization import resolve_levels
    from ..sde import sde_from_name

    if args.out_dir is None:  # a parser without the checks (add_likelihood_args on a plain ArgumentParser)
        args.out_dir = default_out_dir(args, network(args))
    if getattr(args, "threads", None) is None:  # resuming: the run's own thread count (part of its identity)
        args.threads = stored_threads(args.out_dir)
    apply_threads(args)
    net = network(args)
    if net is not None:
        return _cmd_network(args, net)
    sde = sde_from_name(args.sde)
    num_levels = resolve_levels(args.bits, getattr(args, "num_levels", None), tuple(args.data_range))
    dtype = torch.float64 if args.float64 else torch.float32
    if args.data is not None:
        data = args.data if torch.is_tensor(args.data) else tensor_file(args.data)
        event_shape = tuple(data.shape[1:])
        data = data.to(dtype) if data.is_floating_point() else data
    else:
        event_shape = (args.dim,)
        data = None
    dim = math.prod(event_shape)
    full = not args.diagonal
    gm = GaussianMixture.random(dim, args.components, seed=args.seed, full=full, event_shape=event_shape)
    if data is None:
        data = gm.sample(args.n, generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    score = exact_model(gm, sde)
    dq = _dequantizer(args, num_levels, event_shape)
    kwargs = {k: getattr(args, k)
              for k in ("divergence", "probes", "probe", "probes_per", "solver", "rtol", "atol", "t_eps")}

    def fn(x: torch.Tensor, generator: torch.Generator) -> dict:
        # the real ODE likelihood, plus the exact prior gap log p_T - log N(0, prior_std^2 I) at its latent: the
        # estimate misses it by construction (p_T is not exactly the prior), so it separates solver error from it
        from ..likelihood import log_likelihood

        res = log_likelihood(score, sde, x, generator=generator, **kwargs)
        z = res.latent.to(torch.float64)
        out = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)} if dataclasses.is_dataclass(res) else {}
        out = {k: v for k, v in out.items() if torch.is_tensor(v) and v.shape == (x.shape[0],)}
        out.update(log_prob=res.log_prob, nfe=res.nfe, prior_gap=gm.log_prob(z, sde.T, sde) - sde.prior_log_prob(z))
        return out

    model_id = (
        f"GaussianMixture.random(dim={dim}, components={args.components}, seed={args.seed}, full={full}, "
        f"event_shape={event_shape}); {sde!r}; log_likelihood("
        + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        + ")"
    )
    we_initialised = maybe_init_distributed()
    try:
        summary = evaluate_dataset(
            data,
            args.out_dir,
            fn=fn,
            batch_size=args.batch_size,
            repeats=args.repeats,
            seed=args.seed,
            num_levels=num_levels,
            data_range=tuple(args.data_range),
            dtype=torch.float64 if args.float64 else None,  # integer levels are dequantized in float64 too
            device=args.device,
            model_id=model_id,
            progress=not args.quiet,
            dequantizer=dq,
        )
        if is_secondary_rank():
            return 0
        rec = read_records(args.out_dir)
        N = summary.count
        exact = []
        for r in range(summary.repeats):
            if num_levels is None:
                x = data
            else:
                x = dequantized_samples(data, range(N), r, args.seed, None, args.data_range, num_levels=num_levels,
                                        dequantizer=dq, dtype=torch.float64 if args.float64 else None)
            exact.append(gm.log_prob(x.to(torch.float64), args.t_eps, sde))
        exact = torch.cat(exact)
        _report(args, summary, rec, exact, dim, num_levels)
        return 0
    finally:
        if we_initialised:
            torch.distributed.destroy_process_group()


def _cmd_network(args: argparse.Namespace, net) -> int:
    """A network (``--model digits`` / ``digits_flow``, ``--checkpoint``, ``--model-spec``): its PF-ODE likelihood
    of ``--data`` or of its default dataset (`_default_data`); bits/dim and NFE (no exact reference)."""
    from ..evaluation import evaluate_dataset
    from ..evaluation.distributed import is_secondary_rank, maybe_init_distributed
    from ..quantization import resolve_levels

    model, sde = net.model, net.sde
    num_levels = resolve_levels(args.bits, getattr(args, "num_levels", None), tuple(args.data_range))
    if args.data is not None:
        data = args.data if torch.is_tensor(args.data) else tensor_file(args.data)
        data = data.float() if data.is_floating_point() else data
    else:
        data, default_levels = _default_data(args, net)
        num_levels = num_levels or default_levels
    dq = _dequantizer(args, num_levels, tuple(data.shape[1:]))
    kwargs = {k: getattr(args, k)
              for k in ("divergence", "probes", "probe", "probes_per", "solver", "rtol", "atol", "t_eps")}
    what = "log_likelihood(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    fn = None
    if getattr(args, "bound", "ode") == "elbo":
        fn, what, kwargs = _elbo_fn(args, net, data, num_levels), _elbo_id(args), {}
    we_initialised = maybe_init_distributed()
    try:
        summary = evaluate_dataset(
            data, args.out_dir, fn=fn, score=None if fn is not None else model, sde=None if fn is not None else sde,
            batch_size=args.batch_size, repeats=args.repeats,
            seed=args.seed, num_levels=num_levels, data_range=tuple(args.data_range), device=args.device,
            model_id=f"{net.model_id}; {sde!r}; {what}", progress=not args.quiet, dequantizer=dq, **kwargs,
        )
        if is_secondary_rank():
            return 0
        nfe = summary.mean_nfe
        if fn is not None:
            print(f"{net.name} ({sde!r}), {summary.count} samples x {summary.repeats} repeats, {what}")
        else:
            print(f"{net.name} ({sde!r}), {summary.count} samples x {summary.repeats} repeats, {args.divergence} "
                  f"divergence ({args.probes} probe(s)), {args.solver} rtol={args.rtol:g} atol={args.atol:g}, "
                  f"t_eps={args.t_eps:g}")
        quant = "" if num_levels is None else f" ({num_levels}-level data)"
        print(
            f"bits/dim {summary.mean_bpd:.5f} +- {summary.bpd_std_error:.5f}{quant}   "
            f"mean NFE {'n/a' if nfe is None else f'{nfe:.1f}'}   results: {summary.path}"
        )
        for line in _dequantizer_lines(args, summary, math.prod(data.shape[1:])):
            print(line)
        return 0
    finally:
        if we_initialised:
            torch.distributed.destroy_process_group()


def _elbo_id(args: argparse.Namespace) -> str:
    return (f"elbo(steps={args.elbo_steps}, num_timesteps={args.num_timesteps}, variance={args.variance!r}, "
            f"moment_samples={args.moment_samples})")


def _elbo_fn(args: argparse.Namespace, net, data: torch.Tensor, num_levels: int | None):
    """``--bound elbo``: the per-batch bound of `scoresolve.variational.elbo_fn`, with the analytic variance's moments
    estimated (or loaded: `scoresolve.cached_moments`) on the training data (``--moment-data``, the training digits
    for the digits models, else the evaluated data), dequantized with a fixed seed like the evaluated data."""
    from ..reverse_variance import cached_moments
    from ..variational import _check_chain, chain_times, elbo_fn

    model, sde = net.model, net.sde
    try:
        times, _ = chain_times(sde, args.elbo_steps, None if hasattr(sde, "num_timesteps") else args.num_timesteps)
        _check_chain(sde, times)
    except ValueError as e:
        raise UsageError(f"--bound elbo: {e}") from None
    moments = None
    if args.variance == "analytic":
        train = args.moment_data
        if train is None and net.name in _BUILTIN_SDE:
            from ..data import digits

            train = digits("train")
        train = data if train is None else train
        train = train.float() if train.is_floating_point() else train
        if num_levels is not None:
            from ..quantization import dequantize

            train = dequantize(train, num_levels, tuple(args.data_range),
                                      torch.Generator().manual_seed(args.seed))
        moments = cached_moments(model, sde, train, times[1:], args.moment_samples, seed=args.seed)
    return elbo_fn(model, sde, args.elbo_steps, args.variance, moments=moments, num_timesteps=args.num_timesteps
                   if not hasattr(sde, "num_timesteps") else None,
                   data_range=tuple(args.data_range) if num_levels is not None else None)


def _report(args: argparse.Namespace, summary, rec: dict, exact: torch.Tensor, dim: int, num_levels) -> None:
    err = rec["log_prob"] - exact
    solver_err = err + rec["prior_gap"]

    def stats(e: torch.Tensor) -> str:
        return (
            f"mean {float(e.mean()):+.2e}, mean |err| {float(e.abs().mean()):.2e}, "
            f"max |err| {float(e.abs().max()):.2e}"
        )

    print(
        f"{args.sde.upper()} SDE, {args.components}-component Gaussian mixture in {dim} dims, {summary.count} "
        f"samples x {summary.repeats} repeats, {args.divergence} divergence ({args.probes} probe(s)), {args.solver} "
        f"rtol={args.rtol:g} atol={args.atol:g}, t_eps={args.t_eps:g}"
    )
    print(
        f"log p_t_eps  estimate {summary.mean_log_prob:.5f} +- {summary.log_prob_std_error:.5f} nats, "
        f"exact {float(exact.mean()):.5f}"
    )
    print(f"  error per sample:                          {stats(err)}")
    print(f"  of which prior mismatch (exact, -prior_gap): mean {-float(rec['prior_gap'].mean()):+.2e}")
    print(f"  error without it (solver + estimator):     {stats(solver_err)}")
    nfe = summary.mean_nfe
    lo, hi = (float(v) for v in args.data_range)
    quant = "" if num_levels is None else f" ({num_levels}-level data in [{lo:g}, {hi:g}])"
    print(
        f"bits/dim {summary.mean_bpd:.5f} +- {summary.bpd_std_error:.5f}{quant}   "
        f"mean NFE {'n/a' if nfe is None else f'{nfe:.1f}'}   results: {summary.path}"
    )
    for line in _dequantizer_lines(args, summary, dim):
        print(line)
