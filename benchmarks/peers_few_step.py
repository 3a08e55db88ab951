"""Few-step sampling against every peer, on problems nobody tuned on.

Problems: Gaussian mixtures drawn at random (`random_mixture`: dimension 8-256 log-uniform, 2-32 components, spread,
component scales and Dirichlet weights at random, full or diagonal covariances) under VP, sub-VP, VE and rectified
flow in turn, with the exact data prediction; optionally the shipped digits U-Nets (``--digits``). The problem seeds
of a run are ``--seed0 .. --seed0 + --problems - 1``; the defaults of ``sample(..., nfe=)`` were chosen on seeds
1000-1023 (``--seed0 1000``), so the seeds reported (0-...) are held out.

Peers, on the same probability-flow ODE, span [T, t_eps], x_T and metric:
- azula (PyPI): every ODE sampler (DDIM, Euler, Heun, zAB, vAB, zEAB, xEAB, REAB at orders 1-4) on its own grid
  (linear in t) and on each of ours (quadratic, logsnr, karras);
- k-diffusion (PyPI 0.1.1.post1): euler, heun, dpm_2, lms, dpmpp_2m, dpmpp_3m_sde (eta 0), dpm_fast on its Karras
  grid and on the grid uniform in t (not on rectified flow: k-diffusion's sigma = sigma/alpha is infinite at t = 1);
- diffusers (PyPI): DPMSolverMultistep (dpmsolver++ 2M/3M), UniPC (bh2, order 2/3), DEIS (order 3) stepped through
  their own `step` with our sigmas (Karras and uniform-t grids) via `scoresolve`'s DDPM-free sigma interface.
Each peer run counts its network calls; a run is kept only within the budget. "best peer" is the smallest error of
any peer run at that budget, chosen per problem (an oracle: each problem gets the peer configuration best on it).

Ours: ``sample(model, sde, x_T, nfe=N)`` with default arguments, nothing else.

Error: RMS over the batch of |x - x_ref|_2 / sqrt(D), x_ref from adaptive dopri5 at rtol = atol = ``--ref-tol``
(float64); or with ``--metric median`` the median over samples of the same per-sample error. The table gives, per
budget, the median and the worst over problems of best-peer error / our error (above 1: we are better).

The RMS is dominated by the few samples that end at another mixture component than the reference ("mode flips"):
on mix3-rf (8 NFE, the default sampler) the RMS of 16 disjoint batches of 32 from 512 samples ranged 1.5e-2 to
7.3e-1 (median 4.6e-1) while the median sample's error was 1.4e-2. At batch 32 the RMS ratio of two configurations
is mostly the luck of which one flips a sample, and the oracle (the best of ~450 peer runs per problem) picks the
luckiest: use a large ``--batch`` (256 for the tables in the guide) and read both metrics.

    python benchmarks/peers_few_step.py [--problems 24] [--seed0 0] [--batch 128] [--nfe 5 8 10 20]
        [--digits] [--json results/peers_few_step.json] [--ours SOLVER[@GRID][+afs] ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # not `tests.`: a PyPI
# package (flow_matching) installs a top-level `tests` package that would shadow ours

from _kdiffusion import k_diffusion_denoiser, load_k_diffusion_sampling  # noqa: E402

import scoresolve as ss  # noqa: E402
from scoresolve.compare import reference_solve  # noqa: E402

NFES = (5, 8, 10, 20)
PROCESSES = ("vp", "subvp", "ve", "rf")
T_EPS = 1e-3


def make_sde(process: str) -> ss.ForwardSDE:
    return {"vp": ss.VPSDE, "subvp": ss.SubVPSDE, "ve": ss.VESDE, "rf": ss.RectifiedFlow}[process]()


def random_mixture(seed: int) -> tuple[ss.GaussianMixture, str]:
    """A Gaussian mixture with every shape parameter drawn at random from ``seed``."""
    rng = np.random.default_rng(seed)
    dim = int(round(math.exp(rng.uniform(math.log(8), math.log(256)))))
    k = int(rng.integers(2, 33))
    spread = float(rng.uniform(0.5, 4.0))
    lo = float(10 ** rng.uniform(-2.0, -0.5))
    hi = float(min(1.5, lo * 10 ** rng.uniform(0.3, 1.5)))
    full = bool(dim <= 96 and rng.random() < 0.6)
    conc = float(rng.uniform(0.3, 3.0))
    base = ss.GaussianMixture.random(dim, k, spread=spread, scale_range=(lo, hi), full=full,
                                     seed=int(rng.integers(2**31)))
    w = torch.from_numpy(rng.dirichlet([conc] * k))
    covs = (base.evecs @ torch.diag_embed(base.evals) @ base.evecs.transpose(1, 2)) if full else base.evals
    gm = ss.GaussianMixture(w.clamp_min(1e-4), base.means, covs)
    desc = f"D={dim} K={k} spread={spread:.2f} std=[{lo:.3f},{hi:.3f}] {'full' if full else 'diag'} w~Dir({conc:.2f})"
    return gm, desc


@dataclass
class Problem:
    name: str
    sde: ss.ForwardSDE
    model: ss.ScoreModel
    x_T: torch.Tensor
    ref: torch.Tensor
    desc: str = ""
    runs: dict = field(default_factory=dict)


def mixture_problem(seed: int, process: str, batch: int, ref_tol: float) -> Problem:
    gm, desc = random_mixture(seed)
    sde = make_sde(process)
    model = gm.model(sde, "x0")
    x_T = sde.prior_sample((batch, gm.dim), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = reference_solve(model, sde, x_T, T_EPS, tol=ref_tol)
    return Problem(f"mix{seed}-{process}", sde, model, x_T, ref, desc)


def digits_problem(kind: str, batch: int, ref_tol: float) -> Problem:
    from scoresolve.models import load_digits_flow_model, load_digits_model

    model, sde = load_digits_model() if kind == "vp" else load_digits_flow_model()
    model.net = model.net.double()
    x_T = sde.prior_sample((batch, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_solve(model, sde, x_T, T_EPS, tol=ref_tol)
    return Problem(f"digits-{kind}", sde, model, x_T, ref, "shipped digits U-Net")


class Counted:
    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


METRICS = ("rms", "median")
METRIC = "rms"  # set by --metric: the error the tables rank by


class Err(float):
    """A run's error under ``METRIC``, carrying both metrics (``.rms``, ``.median``) so one run reports both."""

    rms: float
    median: float


def _finite_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The error of a run: ``rms`` (RMS over the batch of |x - x_ref|_2 / sqrt(D)) or ``median`` (the median over
    samples of |x - x_ref|_2 / sqrt(D)), as an `Err` carrying both."""
    d = x[0].numel()
    per = (x - ref).flatten(1).double().norm(dim=1) / math.sqrt(d)
    rms, med = float(per.pow(2).mean().sqrt()), float(per.median())
    if not (math.isfinite(rms) and math.isfinite(med)):
        return math.inf
    e = Err(med if METRIC == "median" else rms)
    e.rms, e.median = rms, med
    return e


def other_metric(runs: dict, metric: str) -> dict:
    """{config: {nfe: error}} under ``metric`` from runs recorded as `Err` (inf stays inf)."""
    return {k: {n: getattr(e, metric, math.inf) for n, e in r.items()} for k, r in runs.items()}


def parse_config(cfg: str) -> dict:
    """"default" -> {} (sample's defaults); "SOLVER[:k=v,...][@GRID][+afs]" -> sample's keywords."""
    if cfg == "default":
        return {}
    kw: dict = {}
    if cfg.endswith("+afs"):
        cfg, kw["afs"] = cfg[:-4], True
    head, _, grid = cfg.partition("@")
    name, _, opts = head.partition(":")
    kw["solver"] = name
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        kw[k] = json.loads(v)
    if grid:
        kw["grid"] = grid
    return kw


# --- ours --------------------------------------------------------------------------------------------------------
def ours_runs(p: Problem, nfes, configs: list[str]) -> dict[str, dict[int, float]]:
    """{config: {nfe: error}}; config "default" is sample(..., nfe=N) with nothing else; "SOLVER[@GRID][+afs]"."""
    out = {}
    for cfg in configs:
        out[cfg] = {}
        for n in nfes:
            kw = parse_config(cfg)
            try:
                sol = ss.sample(p.model, p.sde, p.x_T, nfe=n, **kw)
                out[cfg][n] = _finite_error(sol.x, p.ref) if int(sol.nfe.max()) <= n else math.inf
            except (ValueError, ss.NonFiniteError):
                out[cfg][n] = math.inf
    return out


def calibrated_runs(p: Problem, nfes, seed: int, num_samples: int, iters: int, starts: int | None = None
                    ) -> tuple[dict, dict]:
    """({nfe: error}, {nfe: cost}) of the sampler calibrated to the problem's model (`scoresolve.calibrate`) on
    ``num_samples`` prior draws of its own (``seed``: never the benchmark's x_T), run on the benchmark's x_T."""
    out, cost = {}, {}
    for n in nfes:
        kw = {} if starts is None else {"fit_starts": starts}
        cal = ss.calibrate(p.model, p.sde, n, tuple(p.x_T.shape[1:]), num_samples=num_samples, iters=iters,
                           seed=seed, t_eps=T_EPS, **kw)
        sol = ss.sample(p.model, p.sde, p.x_T, calibration=cal)
        out[n] = _finite_error(sol.x, p.ref) if int(sol.nfe.max()) <= n else math.inf
        cost[n] = {"evaluations_per_sample": cal.evaluations / num_samples, "seconds": cal.seconds,
                   "start": cal.start, "method": f"{cal.method}{cal.order}", "train_error": cal.train_error,
                   "start_error": cal.start_error,
                   "val_error": cal.val_error, "val_start_error": cal.val_start_error}
    return out, cost


def stored_runs(prob: dict, section: str) -> dict[str, dict[int, float]]:
    """{config: {nfe: Err}} of one problem of a written JSON, ``section`` "peers" or "ours"."""
    rms, med = prob["by_metric"]["rms"][section], prob["by_metric"]["median"][section]
    runs: dict = {}
    for k, r in rms.items():
        runs[k] = {}
        for n, e in r.items():
            v = med[k][n]
            if not (math.isfinite(e) and math.isfinite(v)):
                runs[k][int(n)] = math.inf
                continue
            err = Err(v if METRIC == "median" else e)
            err.rms, err.median = e, v
            runs[k][int(n)] = err
    return runs


def stored_peers(path: str) -> dict[str, dict[str, dict[int, float]]]:
    """{problem: {peer config: {nfe: Err}}} from an earlier run's JSON (the peers are deterministic: the same
    problem seeds, batch and reference tolerance give the same x_T, reference and peer errors)."""
    with open(path) as f:
        data = json.load(f)
    return {prob["name"]: stored_runs(prob, "peers") for prob in data["problems"]}


RESUME_ARGS = ("seed0", "batch", "nfe", "ref_tol", "ours", "calibrate", "cal_samples", "cal_iters", "cal_starts",
               "digit_models", "peers_from", "no_peers")


def resumed_problems(path: str, args: argparse.Namespace) -> list[Problem]:
    """The problems finished by an earlier run of the same settings that wrote ``path`` (written after every
    problem), to be kept as they are; SystemExit if its settings differ."""
    with open(path) as f:
        data = json.load(f)
    old, new = data["args"], vars(args)
    diff = [k for k in RESUME_ARGS if old.get(k) != new.get(k)]
    if diff:
        raise SystemExit(f"--resume: {path} was written with other settings ({', '.join(diff)})")
    out = []
    for prob in data["problems"]:
        runs = {"ours": stored_runs(prob, "ours"), "peers": stored_runs(prob, "peers")}
        if prob.get("calibration") is not None:
            runs["calibration"] = {int(n): c for n, c in prob["calibration"].items()}
        out.append(Problem(prob["name"], None, None, None, None, prob["desc"], runs))
    return out


# --- azula -------------------------------------------------------------------------------------------------------
def azula_runs(p: Problem, nfes) -> dict[str, dict[int, float]]:
    try:
        import azula.sample as az
        from azula.denoise import Denoiser, DiracPosterior
    except ImportError:
        return {}
    sde, model = p.sde, p.model

    class Den(Denoiser):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def schedule(self, t):  # noqa: D102
            t = torch.as_tensor(t, dtype=torch.float64)
            return sde.alpha(t, check=False).to(p.x_T.dtype), sde.sigma(t, check=False).to(p.x_T.dtype)

        def forward(self, x_t, t, **kw):  # noqa: D102
            self.calls += 1
            tb = torch.as_tensor(t, dtype=x_t.dtype).expand(x_t.shape[0])
            return DiracPosterior(mean=model.x0(x_t, tb))

    samplers = [("ddim", az.DDIMSampler, {}, 1), ("euler", az.EulerSampler, {}, 1), ("heun", az.HeunSampler, {}, 2)]
    for o in (1, 2, 3, 4):
        for nm in ("zAB", "vAB", "zEAB", "xEAB", "REAB"):
            samplers.append((f"{nm}{o}", getattr(az, f"{nm}Sampler"), {"order": o}, 1))
    out: dict[str, dict[int, float]] = {}
    for gname in ("linear", "quadratic", "logsnr", "karras"):
        for nm, cls, kw, per in samplers:
            key = f"azula {nm}@{gname}"
            out[key] = {}
            for n in nfes:
                steps = n // per
                try:
                    grid = (torch.linspace(sde.T, T_EPS, steps + 1, dtype=torch.float64) if gname == "linear"
                            else ss.time_grid(sde, steps, gname, T_EPS))
                except ValueError:
                    out[key][n] = math.inf
                    continue
                sub = type("G", (cls,), {"timesteps": property(lambda self, g=grid: g)})
                den = Den()
                with torch.no_grad(), np.errstate(all="ignore"):
                    try:
                        x = sub(den, steps=steps, silent=True, **kw)(p.x_T)
                    except Exception:  # noqa: BLE001 (a peer failing on a process counts as no result)
                        out[key][n] = math.inf
                        continue
                out[key][n] = _finite_error(x, p.ref) if den.calls <= n else math.inf
    return out


# --- k-diffusion -------------------------------------------------------------------------------------------------
def kdiffusion_runs(p: Problem, nfes, kd) -> dict[str, dict[int, float]]:
    sde = p.sde
    alpha_T = float(sde.alpha(torch.tensor(sde.T, dtype=torch.float64)))
    if kd is None or alpha_T == 0.0:
        return {}
    alpha_e = float(sde.alpha(torch.tensor(T_EPS, dtype=torch.float64)))
    lam = sde.log_snr(torch.tensor([sde.T, T_EPS], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))
    x_kd = p.x_T / alpha_T
    out: dict[str, dict[int, float]] = {}

    def grids(n: int):
        yield "karras", kd.get_sigmas_karras(n + 1, smin, smax, rho=7.0)[:-1].to(torch.float64)
        yield "uniform-t", torch.exp(-sde.log_snr(ss.time_grid(sde, n, "uniform", T_EPS)))

    samplers = (("euler", lambda n: n, {}), ("heun", lambda n: (n + 1) // 2, {}), ("dpm_2", lambda n: (n + 1) // 2, {}),
                ("lms", lambda n: n, {}), ("dpmpp_2m", lambda n: n, {}), ("dpmpp_3m_sde", lambda n: n, {"eta": 0.0}))
    for name, steps_for, kw in samplers:
        for n in nfes:
            for gname, sig in grids(steps_for(n)):
                key = f"k-diffusion {name}@{gname}"
                den, counter = k_diffusion_denoiser(p.model, sde, count=True)
                x = getattr(kd, f"sample_{name}")(den, x_kd, sig, disable=True, **kw)
                out.setdefault(key, {})[n] = _finite_error(x * alpha_e, p.ref) if counter.calls <= n else math.inf
    for n in nfes:
        den, counter = k_diffusion_denoiser(p.model, sde, count=True)
        x = kd.sample_dpm_fast(den, x_kd, smin, smax, n, disable=True)
        out.setdefault("k-diffusion dpm_fast", {})[n] = (_finite_error(x * alpha_e, p.ref) if counter.calls <= n
                                                        else math.inf)
    return out


# --- diffusers ---------------------------------------------------------------------------------------------------
def diffusers_runs(p: Problem, nfes) -> dict[str, dict[int, float]]:
    """diffusers' multistep schedulers stepped by hand in the x / alpha, sigma/alpha variables (their
    Karras-sigma mode: a VE-form ODE whose `step` formulas are the schedulers' own), with our sigmas set through
    `set_timesteps(sigmas=...)` where the scheduler takes them, else the scheduler's Karras sigmas."""
    try:
        import diffusers
    except ImportError:
        return {}
    sde = p.sde
    alpha_T = float(sde.alpha(torch.tensor(sde.T, dtype=torch.float64)))
    if alpha_T == 0.0:
        return {}
    out: dict[str, dict[int, float]] = {}
    lam = sde.log_snr(torch.tensor([sde.T, T_EPS], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))
    alpha_e = float(sde.alpha(torch.tensor(T_EPS, dtype=torch.float64)))
    kinds = (("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}),
             ("dpmpp_3m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}),
             ("unipc_2", diffusers.UniPCMultistepScheduler, {"solver_order": 2}),
             ("unipc_3", diffusers.UniPCMultistepScheduler, {"solver_order": 3}),
             ("deis_3", diffusers.DEISMultistepScheduler, {"solver_order": 3}))
    for name, cls, kw in kinds:
        for n in nfes:
            key = f"diffusers {name}"
            try:
                x = _diffusers_loop(cls, kw, p, n, smin, smax)
            except Exception:  # noqa: BLE001
                out.setdefault(key, {})[n] = math.inf
                continue
            out.setdefault(key, {})[n] = _finite_error(x * alpha_e, p.ref) if x is not None else math.inf
    return out


def _diffusers_loop(cls, kw, p: Problem, n: int, smin: float, smax: float):
    """One diffusers scheduler on the VE-form ODE of the problem (x_kd = x / alpha, sigma_kd = sigma / alpha) with
    Karras sigmas from smax to smin: the scheduler built with use_karras_sigmas on a DDPM beta schedule whose
    sigmas span our range is not reproducible exactly, so the Karras sigmas are imposed after set_timesteps."""
    sched = cls(num_train_timesteps=1000, use_karras_sigmas=True, prediction_type="sample", **kw)
    sched.set_timesteps(n)
    rho = 7.0
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sched.sigmas = sig  # n steps from smax to smin, one evaluation each
    sched.timesteps = torch.arange(n)
    sde, model = p.sde, p.model
    calls = 0
    # the schedulers' internal sigma -> (alpha_t, sigma_t) conversion assumes VP (alpha = 1/sqrt(1 + s^2)); our
    # process may be VE or sub-VP, but the ODE in (x / alpha, sigma / alpha) is the same for all of them
    x = (p.x_T / float(sde.alpha(torch.tensor(sde.T, dtype=torch.float64)))) / (1 + smax**2) ** 0.5
    sched._step_index = None
    for i in range(n):
        s_kd = float(sig[i])
        a_vp = 1 / (1 + s_kd**2) ** 0.5
        t = sde.t_from_log_snr(torch.tensor([-math.log(s_kd)], dtype=torch.float64))
        x_ours = x / a_vp * float(sde.alpha(t))
        x0 = model.x0(x_ours, t.to(x.dtype).expand(x.shape[0]))
        calls += 1
        x = sched.step(x0, sched.timesteps[i], x).prev_sample
    if calls > n:
        return None
    return x * (1 + smin**2) ** 0.5


# --- report ------------------------------------------------------------------------------------------------------
def best(runs: dict[str, dict[int, float]], n: int) -> tuple[float, str]:
    cand = [(r[n], k) for k, r in runs.items() if n in r and math.isfinite(r[n])]
    return min(cand) if cand else (math.inf, "-")


def best_fixed(problems: list[Problem], n: int) -> dict[str, str]:
    """The best single peer configuration per process at budget n: the one with the lowest geometric mean of
    error / our error over that process's problems (a peer user picks one sampler for their process, in hindsight
    here). {process: key}"""
    out = {}
    for proc in {p.name.rsplit("-", 1)[1] for p in problems}:
        group = [p for p in problems if p.name.rsplit("-", 1)[1] == proc]
        keys = set.intersection(*(set(p.runs["peers"]) for p in group))
        scored = []
        for k in keys:
            errs = [p.runs["peers"][k].get(n, math.inf) for p in group]
            if all(math.isfinite(e) and e > 0 for e in errs):
                scored.append((sum(math.log(e / p.runs["ours"]["default"][n]) for e, p in zip(errs, group)), k))
        out[proc] = min(scored)[1] if scored else "-"
    return out


def summarise(problems: list[Problem], nfes, ours_key: str = "default") -> dict:
    """Per budget: best-peer error / our error, median and worst over problems, for the per-problem best peer
    ("oracle") and for the best fixed peer configuration per process ("fixed")."""
    table = {}
    for n in nfes:
        fixed = best_fixed(problems, n)
        oracle, fix = [], []
        for p in problems:
            ours = p.runs["ours"][ours_key][n]
            oracle.append(best(p.runs["peers"], n)[0] / ours)
            key = fixed[p.name.rsplit("-", 1)[1]]
            fix.append(p.runs["peers"][key][n] / ours if key != "-" else math.inf)
        table[n] = {"oracle_median": statistics.median(oracle), "oracle_worst": min(oracle),
                    "fixed_median": statistics.median(fix), "fixed_worst": min(fix), "fixed": fixed,
                    "oracle": oracle, "fixed_ratios": fix}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--ref-tol", type=float, default=1e-10)
    ap.add_argument("--digits", action="store_true", help="add the shipped digits U-Nets (VP and rectified flow)")
    ap.add_argument("--only-digits", action="store_true")
    ap.add_argument("--ours", nargs="*", default=[], help="extra configurations of ours to report")
    ap.add_argument("--no-peers", action="store_true", help="skip the peers (for exploring our configurations)")
    ap.add_argument("--json", default="", help="write the results here (after every problem; complete at the end)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the problems an earlier run with the same settings wrote to --json and run the rest")
    ap.add_argument("--metric", choices=METRICS, default="rms",
                    help="rms: RMS over the batch (flip-dominated); median: the median sample's error")
    ap.add_argument("--calibrate", action="store_true",
                    help="add ours 'calibrated': scoresolve.calibrate per problem and budget, on x_T of its own")
    ap.add_argument("--cal-samples", type=int, default=512)
    ap.add_argument("--cal-iters", type=int, default=300)
    ap.add_argument("--cal-starts", type=int, default=None, help="calibrate's fit_starts (default: its own)")
    ap.add_argument("--digit-models", nargs="*", default=["vp", "rf"], choices=["vp", "rf"],
                    help="which shipped U-Nets --digits / --only-digits run")
    ap.add_argument("--peers-from", default="",
                    help="take the peers' errors from this earlier JSON (same --seed0/--batch/--ref-tol) instead of "
                         "running them again")
    args = ap.parse_args()
    global METRIC
    METRIC = args.metric
    torch.set_num_threads(1)
    nfes = tuple(args.nfe)
    kd = load_k_diffusion_sampling()
    specs = [] if args.only_digits else [(args.seed0 + i, PROCESSES[(args.seed0 + i) % 4])
                                         for i in range(args.problems)]
    if args.resume and not args.json:
        raise SystemExit("--resume continues the file given by --json")
    problems = resumed_problems(args.json, args) if args.resume and os.path.isfile(args.json) else []
    if problems:
        print(f"resumed {len(problems)} finished problems from {args.json}: {', '.join(p.name for p in problems)}")
    done = {p.name for p in problems}
    stored = stored_peers(args.peers_from) if args.peers_from else None
    t0 = time.perf_counter()
    digits = [("digits", kind) for kind in args.digit_models] if args.digits or args.only_digits else []
    keys = ["default", *args.ours, *(["calibrated"] if args.calibrate else [])]
    for seed, proc in specs + digits:
        if (f"digits-{proc}" if seed == "digits" else f"mix{seed}-{proc}") in done:
            continue
        p = (digits_problem(proc, args.batch, args.ref_tol) if seed == "digits"
             else mixture_problem(seed, proc, args.batch, args.ref_tol))
        p.runs["ours"] = ours_runs(p, nfes, ["default", *args.ours])
        if args.calibrate:
            p.runs["ours"]["calibrated"], p.runs["calibration"] = calibrated_runs(
                p, nfes, 10_000 + (seed if isinstance(seed, int) else 0), args.cal_samples, args.cal_iters,
                args.cal_starts)
        peers: dict = {}
        if stored is not None:
            if p.name not in stored:
                raise SystemExit(f"{args.peers_from} has no problem {p.name}")
            peers.update(stored[p.name])
        elif not args.no_peers:
            peers.update(azula_runs(p, nfes))
            peers.update(kdiffusion_runs(p, nfes, kd))
            peers.update(diffusers_runs(p, nfes))
        p.runs["peers"] = peers
        problems.append(p)
        line = f"{p.name:<14} {p.desc:<58}"
        for n in nfes:
            e_peer, who = best(peers, n)
            e = p.runs["ours"]["calibrated" if args.calibrate else "default"][n]
            line += f" | {n}: {e:.1e} vs {e_peer:.1e} {who.split(' ', 1)[-1] if who != '-' else '-':<14}"
        print(line + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.json and not args.no_peers:  # after every problem: a killed run keeps what it finished
            write_results(args.json, args, problems, nfes, keys, complete=False)
        if args.no_peers:
            for k in args.ours:
                r = p.runs["ours"][k]
                print(f"    {k:<40}" + "".join(f" | {n}: {getattr(r[n], 'rms', math.inf):.2e} "
                                              f"{getattr(r[n], 'median', math.inf):.2e}" for n in nfes), flush=True)
    if args.no_peers:
        return
    print(f"\nbest peer error / our error, {len(problems)} problems (above 1: ours is better); oracle = the peer run "
          "best on each problem, fixed = the peer configuration best over each process's problems:")
    summary, by_metric = summaries(problems, nfes, keys)
    for metric in METRICS:
        print(f"\n[{metric}]")
        for k in keys:
            for n in nfes:
                r = by_metric[metric][k][n]
                print(f"  {k:<22} {n:>3} NFE: oracle median {r['oracle_median']:.2f} worst {r['oracle_worst']:.2f}   "
                      f"fixed median {r['fixed_median']:.2f} worst {r['fixed_worst']:.2f}")
    for k in keys:
        for n in nfes:
            r = summary[k][n]
            print(f"  {k:<22} {n:>3} NFE: oracle median {r['oracle_median']:.2f} worst {r['oracle_worst']:.2f}   "
                  f"fixed median {r['fixed_median']:.2f} worst {r['fixed_worst']:.2f}   "
                  f"({', '.join(f'{pr}: {c}' for pr, c in sorted(r['fixed'].items()))})")
    if args.json:
        write_results(args.json, args, problems, nfes, keys, complete=True, tables=(summary, by_metric))
        print(f"written {args.json}")


def summaries(problems: list[Problem], nfes, keys: list[str]) -> tuple[dict, dict]:
    """(summary under ``METRIC``, {metric: summary}) of the problems for each of our ``keys``; fills each problem's
    runs under every metric."""
    summary = {k: summarise(problems, nfes, k) for k in keys}
    for metric in METRICS:  # the same runs read under each metric
        for p in problems:
            p.runs[metric] = {"ours": other_metric(p.runs["ours"], metric),
                              "peers": other_metric(p.runs["peers"], metric)}
    by_metric = {}
    for metric in METRICS:
        view = [Problem(p.name, p.sde, p.model, p.x_T, p.ref, p.desc, p.runs[metric]) for p in problems]
        by_metric[metric] = {k: summarise(view, nfes, k) for k in keys}
    return summary, by_metric


def write_results(path: str, args: argparse.Namespace, problems: list[Problem], nfes, keys: list[str],
                  complete: bool, tables: tuple[dict, dict] | None = None) -> None:
    """The JSON of the run so far (through a temporary file: a reader never sees half of it); ``complete``: every
    problem is in (a partial file is what ``--resume`` continues from); ``tables``: `summaries` of the problems,
    if the caller has them."""
    summary, by_metric = tables if tables is not None else summaries(problems, nfes, keys)
    res = {"args": vars(args), "complete": complete,
           "summary": {k: {str(n): {kk: vv for kk, vv in v.items()} for n, v in s.items()}
                       for k, s in summary.items()},
           "summary_by_metric": {m: {k: {str(n): dict(v) for n, v in s.items()} for k, s in t.items()}
                                 for m, t in by_metric.items()},
           "problems": [{"name": p.name, "desc": p.desc, "ours": p.runs["ours"],
                         "best_peer": {str(n): best(p.runs["peers"], n) for n in nfes},
                         "peers": p.runs["peers"], "calibration": p.runs.get("calibration"),
                         "by_metric": {m: {"ours": p.runs[m]["ours"], "peers": p.runs[m]["peers"],
                                           "best_peer": {str(n): best(p.runs[m]["peers"], n) for n in nfes}}
                                       for m in METRICS}} for p in problems]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
