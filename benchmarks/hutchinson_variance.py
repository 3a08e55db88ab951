"""CPU benchmark: the standard error of Hutchinson log-likelihoods, and the work a target standard error needs.

On the shipped digits U-Nets (VP SDE score model `load_digits_model` and the rectified-flow velocity model
`load_digits_flow_model`; 17-level dequantized held-out digits, float32), each method solves the PF-ODE of the same
``--n`` test images with ``--probes`` probes (drawn once per solve, fixed along the trajectory):

- ``rademacher``: plain Rademacher probes (the default of `log_likelihood`; the baseline);
- ``gaussian``: Gaussian probes;
- ``orthogonal``: Rademacher probes mutually orthogonal (``probe="orthogonal"``);
- ``cv``: Rademacher probes (the same draws as ``rademacher``) with the `GaussianControlVariate` fitted to the
  dequantized TRAINING digits, full rank (D = 64);
- ``cv_r<rank>``: the same, truncated to the top ``--rank`` eigenpairs (the others replaced by their mean);
- ``step``: Rademacher probes drawn afresh after every accepted step (``probes_per="step"``): each step's integral
  gets independent probes; the first stage of every step is then evaluated anew (counted in the NFE).

The per-probe standard deviation of log p is estimated per sample from the spread over the probes
(``std_error * sqrt(K)``) and pooled over the samples (root mean square); the standard error with K probes is that
over sqrt(K). One probe costs one VJP per network evaluation (the forward is shared), so the work of a solve is
about NFE x (1 forward + K VJPs); the work that reaches a target standard error is NFE x K_needed with
K_needed = (std / target)^2, and the cost ratio against plain Rademacher (equal standard error) is
(std / std_rademacher)^2 x NFE / NFE_rademacher. For ``orthogonal`` the spread over the probes overstates the error of
their mean (the probes are negatively correlated): its true variance is the printed one times (D - K)/(D - 1) on
average over the random permutations (0.89 for K = 8 in D = 64), which the last column applies.

    python benchmarks/hutchinson_variance.py [--n 16] [--probes 8] [--tol 1e-4] [--rank 8] [--target-bpd 0.01]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import scoresolve as ss
from scoresolve.data import DIGITS_LEVELS, digits
from scoresolve.models import load_digits_flow_model, load_digits_model
from scoresolve.quantization import dequantize

METHODS = ("rademacher", "gaussian", "orthogonal", "cv", "cv_r", "step")


def measure(model, sde, x, method: str, cv_full, cv_low, args) -> dict:
    probe = method if method in ("gaussian", "orthogonal") else "rademacher"
    cv = cv_full if method == "cv" else cv_low if method == "cv_r" else None
    t0 = time.perf_counter()
    r = ss.log_likelihood(model, sde, x, probes=args.probes, probe=probe, control_variate=cv, rtol=args.tol,
                          atol=args.tol, generator=torch.Generator().manual_seed(args.seed),
                          probes_per="step" if method == "step" else "solve")
    sec = time.perf_counter() - t0
    K, D = args.probes, math.prod(x.shape[1:])
    per_probe = r.std_error.double() * math.sqrt(K)  # [n] per-sample per-probe std (nats)
    std = float(per_probe.square().mean().sqrt())
    factor = (D - K) / (D - 1) if method == "orthogonal" else 1.0
    return {"method": method if method != "cv_r" else f"cv_r{args.rank}", "std_per_probe": std,
            "std_error": std / math.sqrt(K), "std_error_bpd": std / math.sqrt(K) / (D * math.log(2)),
            "nfe": float(r.nfe.double().mean()), "seconds": sec, "log_prob": r.log_prob.double().tolist(),
            "var_factor": factor}


def table(name: str, rows: list[dict], args, D: int) -> list[str]:
    target = args.target_bpd * D * math.log(2)  # nats
    base = rows[0]
    base_work = base["nfe"] * base["std_per_probe"] ** 2 * base["var_factor"]  # NFE x variance: cost at equal SE
    out = [f"{name}: n = {args.n} test digits, K = {args.probes} probes, rtol = atol = {args.tol:g}, "
           f"target standard error {args.target_bpd:g} bits/dim = {target:.3f} nats",
           f"{'method':<12} {'std/probe':>10} {'SE(K) nats':>11} {'SE(K) b/d':>10} {'NFE':>6} {'s':>6} "
           f"{'K for target':>12} {'NFExK':>8} {'cost vs rad':>11} {'SE vs rad':>10}"]
    out.append("-" * len(out[1]))
    for r in rows:
        var = r["std_per_probe"] ** 2 * r["var_factor"]
        k_need = var / target**2
        cost = r["nfe"] * k_need
        ratio = r["nfe"] * var / base_work  # in the base row's own order of operations: exactly 1 there
        r.update(k_needed=k_need, cost=cost, cost_ratio=ratio, se_ratio_equal_cost=math.sqrt(ratio))
        out.append(f"{r['method']:<12} {r['std_per_probe']:>10.4f} {r['std_error']:>11.4f} {r['std_error_bpd']:>10.5f} "
                   f"{r['nfe']:>6.0f} {r['seconds']:>6.1f} {k_need:>12.2f} {cost:>8.0f} {ratio:>11.4f} "
                   f"{math.sqrt(ratio):>10.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16, help="held-out test images")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-4, help="rtol = atol")
    p.add_argument("--rank", type=int, default=8, help="rank of the truncated control variate")
    p.add_argument("--target-bpd", type=float, default=0.01, help="target standard error in bits/dim")
    p.add_argument("--models", nargs="+", default=["digits", "digits_flow"], choices=["digits", "digits_flow"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["rademacher"] + [m for m in args.methods if m != "rademacher"]
    train = dequantize(digits("train"), DIGITS_LEVELS, generator=torch.Generator().manual_seed(10))
    cv_full = ss.GaussianControlVariate.from_data(train)
    cv_low = ss.GaussianControlVariate.from_data(train, rank=args.rank)
    x = dequantize(digits("test")[: args.n], DIGITS_LEVELS, generator=torch.Generator().manual_seed(11))
    D = math.prod(x.shape[1:])
    result = {"args": vars(args), "models": {}}
    loaders = {"digits": load_digits_model, "digits_flow": load_digits_flow_model}
    for name in args.models:
        model, sde = loaders[name]()
        rows = [measure(model, sde, x, m, cv_full, cv_low, args) for m in methods]
        lines = table(f"{name} ({type(sde).__name__})", rows, args, D)
        print("\n".join(lines) + "\n", flush=True)
        result["models"][name] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
