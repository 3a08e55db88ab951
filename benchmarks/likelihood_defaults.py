"""CPU benchmark: `log_likelihood` with its defaults (per-sample steps, ``compact=False``) and with ``compact=True``
against torchdiffeq's and flow_matching's dopri5 at rtol = atol = 1e-5, at one given tolerance of ours (the matched
one that ``benchmarks/likelihood_cost.py --repeats`` reports), in interleaved rounds, one thread, medians of CPU
seconds. The problems and the peers are `likelihood_cost.py`'s (same probe, float64).

    python benchmarks/likelihood_defaults.py --problem "digits_flow U-Net" --tol 3.1622776601683795e-05 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import likelihood_cost as lc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problem", default="digits_flow U-Net", choices=list(lc.PROBLEMS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tol", type=float, required=True, help="our rtol = atol (the matched tolerance)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    sde, score, velocity, x = lc.make_problem(args.problem, args.batch)
    eps = torch.randint(0, 2, (1,) + tuple(x.shape), generator=torch.Generator().manual_seed(2)).double() * 2 - 1
    ours = functools.partial(lc._ours, score, sde, x, rtol=args.tol, atol=args.tol, t_eps=1e-5)
    runs = {
        "torchdiffeq": lambda: lc.torchdiffeq_baseline(velocity, sde, x, eps, 1e-5, 1e-5, 1e-5),
        "flow_matching": lambda: lc.flow_matching_baseline(velocity, sde, x, eps, 1e-5, 1e-5, 1e-5),
        "ours default": ours,
        "ours compact": functools.partial(ours, compact=True),
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved: each round runs every solve once
        for k, fn in runs.items():
            cpu[k].append(lc.timed(fn)[1])
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{args.problem}, batch {args.batch}, ours at tol {args.tol:.3g}; CPU seconds, median of {args.repeats}")
    for k in runs:
        print(f"{k:<14} CPU {med[k]:.2f} s  / torchdiffeq {med[k] / med['torchdiffeq']:.2f}  "
              f"/ flow_matching {med[k] / med['flow_matching']:.2f}")


if __name__ == "__main__":
    main()
