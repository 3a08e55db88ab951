"""Regression benchmark: every solver's error at a given NFE or tolerance, and its NFE, on VP, sub-VP and VE.

Written for the solver redesign (issue 13) and kept as the guard of later ones: the baseline was measured on the
code before it (``benchmarks/results/regression_baseline.json``), and ``--compare`` checks that no entry got worse.

Problems: 16-D, 4-component Gaussian mixtures (exact scores), float64, t_eps = 1e-3, batch 64, one x_T per SDE.
- grid ODE solvers at nfe 10, 20, 50 (default grid) and 20 (logsnr grid): RMS |x - x_ref| / sqrt(D) against dopri5
  at 1e-10 from the same x_T, and the NFE;
- adaptive ODE solvers at rtol = atol in 1e-3, 1e-5, 1e-7: error, mean and max NFE per sample;
- stochastic solvers (generator-seeded, batch 256): |E log p(samples) - E log p(exact samples)| under the exact
  density of p_{t_eps}, and the NFE (mean per sample for adaptive_sde);
- log_likelihood on 8-D mixtures (32 exact samples of p_{t_eps}, t_eps = 1e-5): exact divergence, dopri5 and tsit5,
  time variables t and logsnr, rtol 1e-3 and 1e-5: max |log p - exact| and mean NFE; Hutchinson (2 probes): mean NFE.

Every entry is a number where lower is better. An entry is worse when it exceeds the baseline by more than a relative
1e-6 (plus 1e-12). The stochastic entries are reproducible (same generator, same draws), so the same rule applies.
A grid solve that scoresolve now refuses as unstable (heun, rk4 on VE at 10-20 NFE: the baseline's errors of 10-370
there were silently wrong results; `scoresolve.solvers.fixed.check_stability`) is recorded as "refused", not worse.

    python benchmarks/regression.py --out benchmarks/results/regression_now.json
    python benchmarks/regression.py --compare benchmarks/results/regression_baseline.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import scoresolve as ss
from scoresolve.compare import reference_solve, rms_error

F64 = torch.float64
T_EPS = 1e-3
GRID = ["euler", "heun", "rk4", "ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc"]
ADAPTIVE = ["dopri5", "tsit5", "bosh3", "torchdiffeq:dopri5"]
STOCHASTIC = [("euler_maruyama", {}), ("reverse_diffusion", {}), ("reverse_diffusion", {"variance": "posterior"}),
              ("pc", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {}), ("torchsde:euler", {})]


REFUSED = "refused"  # the entry of a fixed-step solve that scoresolve refuses as unstable (solvers/fixed.py)


def sdes() -> dict:
    return {"vp": ss.VPSDE(), "subvp": ss.SubVPSDE(), "ve": ss.VESDE()}


def mean_nfe(nfe) -> float:
    return float(nfe.double().mean()) if torch.is_tensor(nfe) else float(nfe)


def max_nfe(nfe) -> float:
    return float(nfe.max()) if torch.is_tensor(nfe) else float(nfe)


def measure(quick: bool, log) -> dict:
    torch.set_num_threads(1)
    out: dict[str, float] = {}
    batch, sbatch = (16, 64) if quick else (64, 256)
    nfes = (10, 20) if quick else (10, 20, 50)
    for name, sde in sdes().items():
        gm = ss.GaussianMixture.random(16, 4, seed=1)
        score = gm.score_fn(sde)
        x_T = sde.prior_sample((batch, 16), generator=torch.Generator().manual_seed(2), dtype=F64)
        ref = reference_solve(score, sde, x_T, T_EPS)
        for solver in GRID + ["euler_maruyama@ode", "torchdiffeq:rk4"]:
            kw = {"diffusion": 0.0} if solver.endswith("@ode") else {}
            s = solver.split("@")[0]
            for nfe, grid in [(n, None) for n in nfes] + [(20, "logsnr")]:
                if s.startswith("torchdiffeq") and grid is not None:
                    continue
                key = f"{name}/{solver}/nfe={nfe}" + (f"/{grid}" if grid else "")
                try:
                    sol = ss.sample(score, sde, x_T, solver=s, nfe=nfe, t_eps=T_EPS, grid=grid, **kw)
                except ValueError as e:
                    if "unstable on this grid" not in str(e):
                        raise
                    out[key + "/error"] = out[key + "/nfe"] = REFUSED  # heun, rk4 on VE at 10-20 NFE
                    continue
                out[key + "/error"] = rms_error(sol.x, ref)
                out[key + "/nfe"] = mean_nfe(sol.nfe)
        log(f"{name}: grid solvers done")
        for solver in ADAPTIVE:
            for tol in (1e-3, 1e-5) if quick else (1e-3, 1e-5, 1e-7):
                sol = ss.sample(score, sde, x_T, solver=solver, rtol=tol, atol=tol, t_eps=T_EPS)
                key = f"{name}/{solver}/tol={tol:g}"
                out[key + "/error"] = rms_error(sol.x, ref)
                out[key + "/nfe_mean"] = mean_nfe(sol.nfe)
                out[key + "/nfe_max"] = max_nfe(sol.nfe)
        log(f"{name}: adaptive solvers done")
        x_S = sde.prior_sample((sbatch, 16), generator=torch.Generator().manual_seed(3), dtype=F64)
        exact = gm.sample_marginal(20 * sbatch, T_EPS, sde, generator=torch.Generator().manual_seed(4), dtype=F64)
        lp_exact = float(gm.log_prob(exact, T_EPS, sde).mean())
        runs = [(s, kw, {"nfe": n}) for s, kw in STOCHASTIC for n in ((50,) if quick else (50, 200))]
        runs += [("adaptive_sde", {}, {}), ("adaptive_sde", {"rtol": 0.02}, {})]
        for solver, kw, budget in runs:
            sol = ss.sample(score, sde, x_S, solver=solver, t_eps=T_EPS, generator=torch.Generator().manual_seed(5),
                            **budget, **kw)
            key = f"{name}/{solver}" + "".join(f"/{k}={v}" for k, v in {**kw, **budget}.items())
            out[key + "/logp_gap"] = abs(float(gm.log_prob(sol.x, T_EPS, sde).mean()) - lp_exact)
            out[key + "/nfe"] = mean_nfe(sol.nfe)
        log(f"{name}: stochastic solvers done")
        gm8 = ss.GaussianMixture.random(8, 3, seed=5)
        x = gm8.sample_marginal(8 if quick else 32, 1e-5, sde, generator=torch.Generator().manual_seed(6), dtype=F64)
        exact_lp = gm8.log_prob(x, 1e-5, sde)
        for solver in ("dopri5", "tsit5"):
            for tv in ("t", "logsnr"):
                for tol in (1e-3, 1e-5):
                    r = ss.log_likelihood(gm8.score_fn(sde), x=x, sde=sde, divergence="exact", rtol=tol, atol=tol,
                                          t_eps=1e-5, time_variable=tv, solver=solver)
                    key = f"{name}/log_likelihood/{solver}/{tv}/tol={tol:g}"
                    out[key + "/error_max"] = float((r.log_prob - exact_lp).abs().max())
                    out[key + "/nfe_mean"] = mean_nfe(r.nfe)
        # recorded with the log-SNR, log_likelihood's default until the default became t (better at matched error)
        r = ss.log_likelihood(gm8.score_fn(sde), x=x, sde=sde, probes=2, rtol=1e-5, atol=1e-5, t_eps=1e-5,
                              generator=torch.Generator().manual_seed(7), time_variable="logsnr")
        out[f"{name}/log_likelihood/hutchinson/nfe_mean"] = mean_nfe(r.nfe)
        out[f"{name}/log_likelihood/hutchinson/error_mean"] = float((r.log_prob - exact_lp).abs().mean())
        log(f"{name}: likelihood done")
    return out


def compare(base: dict, now: dict) -> int:
    worse = better = same = refused = 0
    rows = []
    for key in sorted(base["entries"]):
        b, n = base["entries"][key], now["entries"].get(key, math.nan)
        if n == REFUSED:  # a solve now refused as unstable (its baseline value was a silently wrong result)
            rows.append(f"  {key:<60} {b:12.5g} {'refused':>12}")
            refused += 1
            continue
        if not math.isfinite(n):
            verdict = "MISSING"
            worse += 1
        elif n > b * (1 + 1e-6) + 1e-12:
            verdict, worse = "WORSE", worse + 1
        elif n < b * (1 - 1e-6) - 1e-12:
            verdict, better = "better", better + 1
        else:
            verdict, same = "same", same + 1
        if verdict != "same":
            rows.append(f"  {key:<60} {b:12.5g} {n:12.5g} {n / b if b else math.inf:8.4f}  {verdict}")
    print(f"{'entry':<62} {'baseline':>12} {'now':>12} {'ratio':>8}")
    print("\n".join(rows) if rows else "  (every entry identical within 1e-6)")
    print(f"{len(base['entries'])} entries: {same} same, {better} better, {worse} worse, {refused} refused as "
          "unstable")
    return 1 if worse else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the measured entries to this JSON file")
    p.add_argument("--compare", help="baseline JSON to compare with (exit 1 if an entry got worse)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = p.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    res = {"mode": "quick" if args.quick else "full", "entries": measure(args.quick, log)}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as fh:
            base = json.load(fh)
        if base["mode"] != res["mode"]:
            raise SystemExit(f"cannot compare a {res['mode']} run with a {base['mode']} baseline")
        return compare(base, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
