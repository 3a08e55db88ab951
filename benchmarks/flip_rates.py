"""How often a few-step solve ends at another mixture component than the exact probability-flow ODE ("flips"),
on many prior draws: the default, the calibrated sampler and named configurations, on one of
`peers_few_step.py`'s random mixtures. At the benchmark's batch of 64 the RMS error is carried by 0-2 such samples,
so the RMS ratio against the best of ~450 peer runs on each problem mostly says which run was lucky; this measures
the rates behind it.

    python benchmarks/flip_rates.py --seed 2006 --nfe 10 --batch 1024 \
        --ours "deis:basis=\"log_rho\",order=3@logsnr"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_few_step import PROCESSES, T_EPS, make_sde, parse_config, random_mixture  # noqa: E402

import scoresolve as ss  # noqa: E402
from scoresolve.compare import reference_solve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, required=True, help="the mixture's seed (its process: PROCESSES[seed % 4])")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1024, help="prior draws (not the benchmark's: seed 777)")
    ap.add_argument("--ref-tol", type=float, default=1e-9)
    ap.add_argument("--threshold", type=float, default=0.05,
                    help="a flip: a per-sample error |x - x_ref| / sqrt(D) above this")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--ours", nargs="*", default=[], help="more configurations (peers_few_step.py's syntax)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gm, desc = random_mixture(args.seed)
    sde = make_sde(PROCESSES[args.seed % 4])
    model = gm.model(sde, "x0")
    x_T = sde.prior_sample((args.batch, gm.dim), generator=torch.Generator().manual_seed(777), dtype=torch.float64)
    t0 = time.perf_counter()
    ref = reference_solve(model, sde, x_T, T_EPS, tol=args.ref_tol)
    print(f"mix{args.seed}-{PROCESSES[args.seed % 4]} {desc}; reference {time.perf_counter() - t0:.0f} s", flush=True)
    runs = [("default", {"nfe": args.nfe})]
    if not args.no_calibrate:  # calibrate's defaults on draws of its own, as peers_few_step.py --calibrate
        cal = ss.calibrate(model, sde, args.nfe, (gm.dim,), seed=10_000 + args.seed, t_eps=T_EPS)
        runs.append(("calibrated", {"calibration": cal}))
    runs += [(cfg, {"nfe": args.nfe, **parse_config(cfg)}) for cfg in args.ours]
    for name, kw in runs:
        sol = ss.sample(model, sde, x_T, **kw)
        e = (sol.x - ref).flatten(1).norm(dim=1) / gm.dim ** 0.5
        print(f"  {name:<34} rms {float(e.pow(2).mean().sqrt()):.3e}  median {float(e.median()):.3e}  "
              f"flips (> {args.threshold:g}) {int((e > args.threshold).sum())} of {args.batch}", flush=True)


if __name__ == "__main__":
    main()
