"""CPU benchmark: PF-ODE log-likelihood cost at matched error against torchdiffeq dopri5 in t and flow_matching.

The baseline is what k-diffusion does: torchdiffeq's dopri5 on the augmented state (x, delta_logp) in time t, one
shared step for the whole batch, drift and Hutchinson divergence from one fused forward + VJP, at rtol = atol =
1e-5. Both sides use the same Rademacher probe, so the error columns measure ODE error only: |log p - log p_ref| (the
prior term included) with log p_ref from a float64 solve at a tight tolerance (``--ref-tol``) with that probe; "max"
and "mean" are over the batch. NFE: network evaluations per sample (mean); "calls" are batched network calls (the
cost when finished samples are not dropped from the batch, ``compact=False``). Ratios are against the baseline
measured in the same run.

Two readings: (1) the same nominal tolerance on both sides (our per-sample control holds every sample to it,
torchdiffeq one RMS over the batch); (2) matched error: the loosest of our tolerances in TOLS (8 per decade) whose
max AND mean errors are both no worse than the baseline's, its NFE and the ratio ("matched" columns).

A second baseline is Meta's flow_matching (``ODESolver.compute_likelihood``: torchdiffeq's dopri5 inside, its own
fused forward + VJP of the whole velocity), given the same ODE in its reversed time and the same probe
(`flow_matching_baseline`). ``--repeats N`` times both peers and ours at matched error against each (interleaved
rounds, one thread, medians of wall and CPU seconds; ours with ``compact=True``, or ``norms="batch"`` for a
``SOLVER:TIME:batch`` variant).

Problems: Gaussian mixtures (smooth, and with near-degenerate components that behave like dequantized images near
t = 0; under VP, and two of them under rectified flow), and on request the shipped digits U-Nets, trained networks
on dequantized 17-level 1x8x8 digits (``--problems "digits U-Net" "digits_flow U-Net"``; the flow model under
rectified flow, in t, its divergence the velocity's), or any digits network trained with ``scoresolve train
--data digits`` (``--checkpoint PATH``). A U-Net reference costs ~4000 NFE: ``--ref-cache DIR`` keeps it between
runs.

    python benchmarks/likelihood_cost.py [--batch 32] [--quick] [--problems "digits U-Net"]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import re
import statistics
import time

import torch
from torchdiffeq import odeint

import scoresolve as ss
from scoresolve._utils import bcast
from scoresolve.divergence import hutchinson_div_score
from scoresolve.likelihood import log_likelihood
from scoresolve.solvers import DOPRI5_GAINS, PIController

PROBLEMS = {
    # name: (dim, components, scale_range, full covariances[, process: "vp" (default) or "rf" (rectified flow)])
    "2-D smooth": (2, 4, (0.2, 0.8), True),
    "16-D smooth": (16, 8, (0.1, 0.5), True),
    "64-D near-degenerate": (64, 8, (1e-3, 0.5), True),
    "256-D near-degenerate": (256, 4, (1e-3, 0.3), False),
    # the same mixtures under rectified flow (the exact flow prediction: flow_matching's setting)
    "16-D smooth RF": (16, 8, (0.1, 0.5), True, "rf"),
    "64-D near-degenerate RF": (64, 8, (1e-3, 0.5), True, "rf"),
    # the shipped U-Nets trained on the digits (real networks on dequantized 17-level data, 1x8x8), in float64
    "digits U-Net": None,
    "digits_flow U-Net": None,
}


def digits_problem(model, sde, flow: bool, batch: int):
    """(sde, score, baseline field, x) of a digits network (a ScoreModel) on the held-out digits, in float64."""
    from scoresolve.data import DIGITS_LEVELS, digits
    from scoresolve.quantization import dequantize

    net = model.net.double()
    conv = dict(prediction=model.prediction, time=model.time, num_timesteps=model.num_timesteps,
                net_kwargs=model.net_kwargs)
    score = ss.ScoreModel(net, sde, **conv)
    score_ext = score if flow else ss.ScoreModel(net, ss.VPSDE(T=1.5), **conv)
    x = dequantize(digits("test")[:batch], DIGITS_LEVELS, generator=torch.Generator().manual_seed(1)).double()
    return sde, score, baseline_field(score_ext, flow), x


def checkpoint_problem(path: str, batch: int):
    """`digits_problem` of a network trained on the digits (``scoresolve train --data digits``, default VP or
    rectified flow)."""
    from scoresolve.models import load_checkpoint

    model, sde, config = load_checkpoint(path)
    if config.data != "digits" or config.sde not in ("vp", "rf") or config.sde_kwargs:
        raise SystemExit(f"{path}: --checkpoint takes a digits model of the default VP SDE or rectified flow")
    return digits_problem(model, sde, config.sde == "rf", batch)


def make_problem(name: str, batch: int):
    """(sde, score, baseline vector field pieces, x) of a benchmark problem, in float64.

    The baseline's ``velocity(x, t) -> (v, div of the network part, linear divergence)`` is evaluated at any t >= 0:
    torchdiffeq steps past T and interpolates back, so the VP schedule is extended beyond T = 1 and the flow model
    is held at t = 1 there.
    """
    if name.startswith("checkpoint:"):
        return checkpoint_problem(name[len("checkpoint:"):], batch)
    if PROBLEMS[name] is None:
        from scoresolve.models import load_digits_flow_model, load_digits_model

        flow = name.startswith("digits_flow")
        return digits_problem(*(load_digits_flow_model if flow else load_digits_model)(), flow, batch)
    dim, k, scale_range, full, *process = PROBLEMS[name]
    gm = ss.GaussianMixture.random(dim, k, seed=0, scale_range=scale_range, full=full)
    x = gm.sample(batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if process == ["rf"]:
        sde = ss.RectifiedFlow()
        model = gm.model(sde, "flow")
        return sde, model, baseline_field(model, True), x
    sde = ss.VPSDE()
    return sde, gm.score_fn(sde), baseline_field(gm.score_fn(ss.VPSDE(T=1.5)), False), x


def baseline_field(score, flow: bool):
    """The baseline's vector field pieces at any t >= 0 (see `make_problem`); ``velocity.drift(x, t)`` is the drift
    alone (for flow_matching, which differentiates it itself)."""
    ext = ss.VPSDE(T=1.5)

    def drift(xt: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        if flow:
            return score.flow(xt, tb.clamp(max=1.0))
        return bcast(ext.f(tb), xt) * xt - bcast(0.5 * ext.g2(tb), xt) * score(xt, tb)

    def velocity(xt: torch.Tensor, tb: torch.Tensor, eps: torch.Tensor):
        if flow:  # the model's velocity and its divergence (f diverges at alpha = 0)
            v, ds = hutchinson_div_score(score.flow, xt, tb.clamp(max=1.0), eps)
            return v, ds
        s, ds = hutchinson_div_score(score, xt, tb, eps)
        f, g2 = ext.f(tb), ext.g2(tb)
        v = bcast(f, xt) * xt - bcast(0.5 * g2, xt) * s
        return v, (xt[0].numel() * f)[:, None] - (0.5 * g2)[:, None] * ds

    velocity.drift = drift
    return velocity


def torchdiffeq_baseline(velocity, sde, x, eps, t_eps, rtol, atol):
    """k-diffusion's algorithm: dopri5 in t, fused forward + VJP, batch-shared steps. Returns (log p, calls, s)."""
    calls = {"n": 0}

    def func(t, state):
        calls["n"] += 1
        return velocity(state[0], t.expand(state[0].shape[0]).to(state[0].dtype), eps)

    ts = torch.tensor([t_eps, sde.T], dtype=x.dtype)
    delta0 = torch.zeros(x.shape[0], 1, dtype=x.dtype)
    t0 = time.perf_counter()
    xs, deltas = odeint(func, (x, delta0), ts, method="dopri5", rtol=rtol, atol=atol)
    sec = time.perf_counter() - t0
    return sde.prior_log_prob(xs[-1]) + deltas[-1, :, 0], calls["n"], sec


@contextlib.contextmanager
def _flow_matching_probe(eps: torch.Tensor):
    """flow_matching draws its Rademacher probe as (randn_like(x) < 0) * 2.0 - 1.0 from torch's global generator: hand
    it -eps[0] there, so that its probe is eps[0], the probe of every other solve here. That expression has torch's
    default dtype (float32 for float64 data, which its einsum refuses): the default is eps's dtype meanwhile."""
    randn_like, dtype = torch.randn_like, torch.get_default_dtype()
    torch.randn_like = lambda *a, **k: -eps[0]
    torch.set_default_dtype(eps.dtype)
    try:
        yield
    finally:
        torch.randn_like = randn_like
        torch.set_default_dtype(dtype)


def flow_matching_baseline(velocity, sde, x, eps, t_eps, rtol, atol, exact: bool = False):
    """Meta's flow_matching: ``ODESolver.compute_likelihood`` (torchdiffeq dopri5 inside, batch-shared steps, its
    own fused forward + VJP of the whole drift). Returns (log p, calls, s).

    Its time s runs from noise (s = 0) to data (s = 1) and its grid must be [1, 0]; our span [t_eps, T] maps onto it
    by t = t_eps + (T - t_eps)(1 - s) (t = 1 - s but for the t_eps offset, so that both sides solve the same ODE), the
    velocity it sees being dx/ds = -(T - t_eps) v(x, t). Its ``log_p0`` is our prior's log-density (the prior term is
    included on its side as on ours). ``exact``: its exact divergence (a loop of D gradients) instead of Hutchinson.
    """
    from flow_matching.solver import ODESolver

    calls = {"n": 0}
    span = sde.T - t_eps

    def u(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        tb = (t_eps + span * (1 - t)).to(x.dtype).expand(x.shape[0])
        return -span * velocity.drift(x, tb)

    solver = ODESolver(velocity_model=u)
    grid = torch.tensor([1.0, 0.0], dtype=x.dtype)
    t0 = time.perf_counter()
    with _flow_matching_probe(eps):
        _, log_p = solver.compute_likelihood(x, sde.prior_log_prob, step_size=None, method="dopri5", atol=atol,
                                             rtol=rtol, time_grid=grid, exact_divergence=exact)
    sec = time.perf_counter() - t0
    return log_p, calls["n"], sec


TOLS = tuple(1e-5 * 10 ** (k / 8) for k in range(-16, 17))  # 1e-7 ... 1e-3, 8 per decade


CONTROLLERS = {
    "DOPRI5": DOPRI5_GAINS,  # log_likelihood's default: Hairer's DOPRI5 gains, err^-0.17 err_prev^0.04
    "PI": PIController(),  # odeint_adaptive's default: Hairer & Wanner's textbook PI gains (0.7, 0.4)
    "I": PIController(beta1=1.0, beta2=0.0),  # plain I control (torchdiffeq, scipy)
}


def reference(name: str, score, sde, x, t_eps: float, ref_tol: float, cache: str | None) -> torch.Tensor:
    """log p_ref at rtol = atol = ref_tol (float64, the benchmark's probe), cached in ``cache`` if given."""
    path = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", name)  # a checkpoint's problem name holds its path
        path = os.path.join(cache, f"{stem}_B{x.shape[0]}_teps{t_eps:g}_tol{ref_tol:g}.pt")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=True)  # a tensor: never unpickle code
    ref = log_likelihood(score, sde, x, rtol=ref_tol, atol=ref_tol, t_eps=t_eps, max_steps=200_000,
                         time_variable="t", generator=torch.Generator().manual_seed(2)).log_prob
    if path:
        torch.save(ref, path)
    return ref


def errors(log_p: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |log p - log p_ref| over the batch."""
    e = (log_p.double() - ref).abs()
    return float(e.max()), float(e.mean())


def sweep(score, sde, x, ref, t_eps: float, rtol: float, solver: str, tv: str, options: dict, base_max: float,
          base_mean: float, results: dict | None = None) -> dict:
    """{tol: (NFE, calls, max err, mean err, s per call)}: from rtol looser until both errors are worse than the
    baseline's (looser tolerances only get worse); tighter than rtol only if none of those is no worse in both.
    ``results`` (updated in place) holds solves already made, which are not repeated."""
    results = {} if results is None else results

    def solve(tol: float) -> bool:
        if tol in results:
            return results[tol][2] <= base_max and results[tol][3] <= base_mean
        t0 = time.perf_counter()
        r = log_likelihood(score, sde, x, rtol=tol, atol=tol, t_eps=t_eps, solver=solver, time_variable=tv,
                           generator=torch.Generator().manual_seed(2), **options)
        sec = time.perf_counter() - t0
        e_max, e_mean = errors(r.log_prob, ref)
        results[tol] = (float(r.nfe.double().mean()), r.calls, e_max, e_mean, sec / r.calls)
        return e_max <= base_max and e_mean <= base_mean

    passed = False
    for tol in (t for t in TOLS if t >= rtol):
        passed = solve(tol) or passed
        if tol > rtol and results[tol][2] > base_max and results[tol][3] > base_mean:
            break
    for tol in (t for t in reversed(TOLS) if t < rtol):
        if passed:
            break
        passed = solve(tol)
    return results


def curve(score, sde, x, ref, t_eps: float, solver: str, tv: str, options: dict, base_curve: dict,
          results: dict) -> list[dict]:
    """The matched-error ratio at every point of the baseline's curve: for each baseline tolerance, the loosest of
    our TOLS no worse in max and mean error (sweeping on from that tolerance as `sweep` does, reusing ``results``)."""
    rows = []
    for tol, (nfe_b, max_b, mean_b) in sorted(base_curve.items()):
        sweep(score, sde, x, ref, t_eps, min(TOLS, key=lambda v: abs(math.log(v / tol))), solver, tv, options,
              max_b, mean_b, results)
        ok = [k for k, v in results.items() if v[2] <= max_b and v[3] <= mean_b]
        m = results[max(ok)] if ok else None
        rows.append({"baseline_tol": tol, "baseline_nfe": nfe_b, "matched_tol": max(ok) if ok else None,
                     "nfe": m[0] if m else None, "ratio": m[0] / nfe_b if m else None})
        print(f"{'':<22} {'  vs baseline ' + f'{tol:.3g}':<24} {nfe_b:>6d} " +
              (f"matched tol {max(ok):.2e}: {m[0]:.1f} NFE, ratio {m[0] / nfe_b:.2f}" if m else "no match"),
              flush=True)
    return rows


def plot_curves(out: dict, path: str) -> None:
    """Max and mean |log p error| against NFE: the baseline's curve and every solve of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [n for n, v in out.items() if "curve" in v["baseline"]]
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        series = {"torchdiffeq dopri5 (t)": out[name]["baseline"]["curve"]}
        series.update({k: v["sweep"] for k, v in out[name].items() if k != "baseline" and "sweep" in v})
        for ax, err in zip(row, ("max", "mean")):
            for label, pts in series.items():
                pts = sorted(pts, key=lambda p: p["nfe"])
                ax.loglog([p["nfe"] for p in pts], [p[err] for p in pts], "o-" if "torchdiffeq" in label else ".-",
                          label=label, ms=4)
            ax.set(xlabel="NFE per sample", ylabel=f"{err} |log p - log p_ref| (nats)", title=f"{name}: {err}")
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([20, 50, 100, 200, 300, 500, 1000, 2000, 5000]))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def run(batch: int, rtol: float, t_eps: float, problems: list[str], variants: list[tuple[str, str, str]],
        ref_tol: float | None = None, cache: str | None = None, baseline_tols: tuple[float, ...] = (),
        flow_matching: bool = True, repeats: int = 0) -> dict:
    torch.set_num_threads(1)
    print(f"batch {batch}, baseline rtol = atol = {rtol:g}, t_eps = {t_eps:g}, float64 (ODE error, not rounding), "
          "1 probe; errors |log p - log p_ref| (max / mean over the batch); ratios against torchdiffeq dopri5 in t")
    head = (f"{'problem':<22} {'method':<24} {'NFE':>6} {'calls':>5} {'max err':>8} {'mean err':>8} "
            f"{'NFE ratio':>9} {'s/NFE ratio':>11} | {'matched tol':>11} {'NFE':>6} {'max err':>8} {'mean err':>8} "
            f"{'ratio':>6}")
    print(head)
    print("-" * len(head))
    out = {}
    for name in problems:
        sde, score, velocity, x = make_problem(name, batch)
        tv_default = "t" if sde.velocity_form else "logsnr"
        eps = torch.randint(0, 2, (1,) + tuple(x.shape), generator=torch.Generator().manual_seed(2)).double() * 2 - 1
        tight = ref_tol if ref_tol is not None else (1e-8 if PROBLEMS.get(name) is None else 1e-10)
        ref = reference(name, score, sde, x, t_eps, tight, cache)
        # the probe drawn inside log_likelihood from seed 2 equals eps (same generator sequence)
        base_lp, base_calls, base_sec = torchdiffeq_baseline(velocity, sde, x, eps, t_eps, rtol, rtol)
        base_max, base_mean = errors(base_lp, ref)
        base_spn = base_sec / base_calls
        print(f"{name:<22} {'torchdiffeq dopri5 (t)':<24} {base_calls:>6.1f} {base_calls:>5d} {base_max:>8.2e} "
              f"{base_mean:>8.2e} {1:>9.2f} {1:>11.2f} |")
        out[name] = {"baseline": {"nfe": base_calls, "max": base_max, "mean": base_mean}}
        peers = {"torchdiffeq": (rtol, base_calls, base_max, base_mean)}
        if flow_matching:
            fm_lp, fm_calls, _ = flow_matching_baseline(velocity, sde, x, eps, t_eps, rtol, rtol)
            fm_max, fm_mean = errors(fm_lp, ref)
            peers["flow_matching"] = (rtol, fm_calls, fm_max, fm_mean)
            out[name]["flow_matching"] = {"nfe": fm_calls, "max": fm_max, "mean": fm_mean}
            print(f"{'':<22} {'flow_matching dopri5':<24} {fm_calls:>6.1f} {fm_calls:>5d} {fm_max:>8.2e} "
                  f"{fm_mean:>8.2e} {fm_calls / base_calls:>9.2f} {'':>11} |", flush=True)
        base_curve = {}
        for tol in sorted(set(baseline_tols) - {rtol}):  # the baseline's own error-NFE curve
            lp, calls, _ = torchdiffeq_baseline(velocity, sde, x, eps, t_eps, tol, tol)
            base_curve[tol] = (calls, *errors(lp, ref))
            print(f"{'':<22} {'  at rtol ' + f'{tol:.3g}':<24} {calls:>6.1f} {calls:>5d} {base_curve[tol][1]:>8.2e} "
                  f"{base_curve[tol][2]:>8.2e}", flush=True)
        if base_curve:
            base_curve[rtol] = (base_calls, base_max, base_mean)
            out[name]["baseline"]["curve"] = [{"tol": k, "nfe": v[0], "max": v[1], "mean": v[2]}
                                              for k, v in sorted(base_curve.items())]
        for solver, tv, ctrl, norms in variants:
            opts = {"controller": CONTROLLERS[ctrl], "norms": norms}
            tv = tv_default if tv == "default" else tv
            if tv == "logsnr" and sde.velocity_form:
                continue  # alpha(T) = 0: the log-SNR is infinite at T
            results = sweep(score, sde, x, ref, t_eps, rtol, solver, tv, opts, base_max, base_mean)
            curve_rows = curve(score, sde, x, ref, t_eps, solver, tv, opts, base_curve, results)
            nfe, calls, e_max, e_mean, spn = results[rtol]
            ok = [tol for tol, v in results.items() if v[2] <= base_max and v[3] <= base_mean]
            matched = ""
            label = f"{solver} ({tv})" + ("" if ctrl == "DOPRI5" else f" {ctrl}") + \
                ("" if norms == "sample" else f" norms={norms}")
            row = {"tol": rtol, "nfe": nfe, "max": e_max, "mean": e_mean}
            if ok:
                m = results[max(ok)]
                matched = f"{max(ok):>11.2e} {m[0]:>6.1f} {m[2]:>8.2e} {m[3]:>8.2e} {m[0] / base_calls:>6.2f}"
                row["matched"] = {"tol": max(ok), "nfe": m[0], "max": m[2], "mean": m[3], "ratio": m[0] / base_calls}
            if curve_rows:
                row["curve"] = curve_rows
                row["sweep"] = [{"tol": k, "nfe": v[0], "max": v[2], "mean": v[3]} for k, v in sorted(results.items())]
            out[name][label] = row
            print(f"{'':<22} {label:<24} {nfe:>6.1f} {calls:>5d} {e_max:>8.2e} {e_mean:>8.2e} "
                  f"{nfe / base_calls:>9.2f} {spn / base_spn:>11.2f} | {matched}", flush=True)
            if repeats:
                row["wall"] = wall_at_matched_error(score, sde, x, ref, t_eps, solver, tv, opts, results,
                                                    velocity, eps, peers, repeats)
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``: on a shared machine the CPU time of a one-thread
    solve is the steadier measure of its cost, the wall time the one asked for; both are reported."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _ours(*args, **kwargs):
    """`log_likelihood` with the benchmark's probe (drawn from a fresh generator of seed 2 on every call)."""
    return log_likelihood(*args, generator=torch.Generator().manual_seed(2), **kwargs)


def wall_at_matched_error(score, sde, x, ref, t_eps, solver, tv, options, results, velocity, eps, peers: dict,
                          repeats: int) -> dict:
    """Seconds at matched error against each peer: for each peer (tolerance, calls, max and mean error), our loosest
    tolerance no worse in both errors (`sweep`, reusing ``results``); then ``repeats`` interleaved rounds of every
    peer's solve and ours at each matched tolerance (``compact=True``), medians of wall and CPU seconds."""
    jobs = {"torchdiffeq": lambda tol: torchdiffeq_baseline(velocity, sde, x, eps, t_eps, tol, tol),
            "flow_matching": lambda tol: flow_matching_baseline(velocity, sde, x, eps, t_eps, tol, tol)}
    matched = {}
    for peer, (tol, _, e_max, e_mean) in peers.items():
        sweep(score, sde, x, ref, t_eps, tol, solver, tv, options, e_max, e_mean, results)
        ok = [k for k, v in results.items() if v[2] <= e_max and v[3] <= e_mean]
        matched[peer] = max(ok) if ok else None
    mine = {}
    for tol in sorted({v for v in matched.values() if v is not None}):
        mine[tol] = functools.partial(_ours, score, sde, x, rtol=tol, atol=tol, t_eps=t_eps, solver=solver,
                                      time_variable=tv, compact=options.get("norms") != "batch", **options)
    runs = {peer: functools.partial(jobs[peer], peers[peer][0]) for peer in peers}
    runs.update({f"ours@{tol:.3g}": fn for tol, fn in mine.items()})
    times = {k: [] for k in runs}
    rows = {}
    for _ in range(repeats):  # interleaved: each round runs every solve once
        for k, fn in runs.items():
            if k.startswith("ours"):
                w, c = time.perf_counter(), time.process_time()
                r = fn()
                times[k].append((time.perf_counter() - w, time.process_time() - c))
                rows[k] = (r.calls, r.rows)
            else:
                times[k].append(timed(fn))
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in times.items()}
    out = {}
    for peer, (tol, calls, _, _) in peers.items():
        entry = {"peer_tol": tol, "peer_nfe": calls, "peer_calls": calls, "peer_rows": calls * x.shape[0],
                 "peer_wall": med[peer][0], "peer_cpu": med[peer][1], "matched_tol": matched[peer]}
        if matched[peer] is not None:
            key = f"ours@{matched[peer]:.3g}"
            m = results[matched[peer]]
            entry.update(nfe=m[0], max=m[2], mean=m[3], calls=rows[key][0], rows=rows[key][1], wall=med[key][0],
                         cpu=med[key][1], wall_ratio=med[key][0] / med[peer][0], cpu_ratio=med[key][1] / med[peer][1],
                         nfe_ratio=m[0] / calls)
            print(f"{'':<22} {'  seconds vs ' + peer:<24} peer {calls} calls {med[peer][0]:.3g} s wall "
                  f"{med[peer][1]:.3g} s CPU; ours tol {matched[peer]:.2e}: NFE {m[0]:.1f}, {rows[key][0]} calls, "
                  f"{rows[key][1]} rows (peer {calls * x.shape[0]}), {med[key][0]:.3g} s wall {med[key][1]:.3g} s "
                  f"CPU: ratio wall {entry['wall_ratio']:.2f}, CPU {entry['cpu_ratio']:.2f}", flush=True)
        out[peer] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--t-eps", type=float, default=1e-5)
    p.add_argument("--quick", action="store_true", help="two problems, fewer variants")
    p.add_argument("--problems", nargs="*", default=None, choices=list(PROBLEMS))
    p.add_argument("--checkpoint", nargs="*", default=[], metavar="PATH",
                   help="also digits networks of `scoresolve train --data digits` (default VP or rectified flow)")
    p.add_argument("--controllers", nargs="*", default=["DOPRI5"], choices=list(CONTROLLERS),
                   help="step-size controllers to compare (each with every solver and time variable)")
    p.add_argument("--solvers", nargs="*", default=None,
                   help="SOLVER:TIME[:NORMS] (TIME t, logsnr or default; NORMS sample, the default, or batch: one "
                   "step size for the batch), e.g. dopri5:t dopri5_shampine:t dopri5:t:batch")
    p.add_argument("--ref-tol", type=float, default=None,
                   help="tolerance of the reference solve (default 1e-10 on mixtures, 1e-8 on the U-Nets)")
    p.add_argument("--ref-cache", default=None, help="directory to keep reference solves in between runs")
    p.add_argument("--baseline-tols", nargs="*", type=float, default=(),
                   help="also run the baseline at these tolerances (its error-NFE curve) and give the matched-error "
                   "ratio at each of them")
    p.add_argument("--plot", default=None, help="with --baseline-tols: save error against NFE to this image")
    p.add_argument("--no-flow-matching", action="store_true", help="leave out Meta's flow_matching baseline")
    p.add_argument("--repeats", type=int, default=0,
                   help="time every peer and ours at matched error against it (compact=True), interleaved over this "
                   "many rounds, one thread (medians of wall and CPU seconds); 0: NFE only")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args()
    mixtures = [k for k, v in PROBLEMS.items() if v is not None]  # the digit U-Nets (~15 min each) only on request
    problems = args.problems or ([] if args.checkpoint else mixtures[:2] if args.quick else mixtures)
    problems = problems + [f"checkpoint:{path}" for path in args.checkpoint]
    # dopri5_shampine is the baseline's own error estimate (2/3 of Hairer's): per-sample control at its semantics
    pairs = [("dopri5", "t"), ("tsit5", "t"), ("dopri5", "logsnr"), ("tsit5", "logsnr"), ("dopri5_shampine", "t"),
             ("dopri5_shampine", "logsnr")]
    if args.quick:
        pairs = pairs[:2]
    if args.solvers:
        pairs = [tuple(v.split(":")) for v in args.solvers]
    # SOLVER:TIME[:NORMS]: norms "sample" (per-sample steps, the default) or "batch" (one step for the batch)
    variants = [(p[0], p[1], c, p[2] if len(p) > 2 else "sample") for c in args.controllers for p in pairs]
    out = run(args.batch, args.rtol, args.t_eps, problems, variants, args.ref_tol, args.ref_cache,
              tuple(args.baseline_tols), not args.no_flow_matching, args.repeats)
    if args.plot and args.baseline_tols:
        plot_curves(out, args.plot)
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
