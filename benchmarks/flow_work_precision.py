"""Work-precision of every ODE solver on rectified-flow models, next to diffusers' FlowMatchEulerDiscreteScheduler.

Problem: x_t = (1 - t) x0 + t eps (`scoresolve.RectifiedFlow`), the velocity u = eps - x0 of
  - ``--model mixture`` (default): a D-dimensional 8-component Gaussian mixture, exact velocity (float64), or
  - ``--model digits_flow``: the shipped flow-matching U-Net on 8x8 digits (float64 weights).
Every method starts from the same x_T ~ N(0, I) at t = 1 and returns x at t = 0, as flow-matching samplers do:
ours run their grid from 1 to t_eps = 1e-3 and take the final jump x0 = x - t u (``denoise=True``, counted in the
NFE); diffusers' FlowMatchEuler takes n Euler steps on sigmas linspace(1, 1/1000, n) (after its shift) and 0.
Error: RMS over the batch of |x - x_ref|_2 / sqrt(D), x_ref from adaptive dopri5 at rtol = atol = 1e-10 to
t = 1e-6 and the same final jump
(1e-8 for the network). Ratio: diffusers' best error over our best at each NFE (higher is better for us).

    python benchmarks/flow_work_precision.py [--model mixture|digits_flow] [--dim 16] [--batch 256]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import scoresolve as ss  # noqa: E402
from scoresolve.compare import Run, format_table, rms_error  # noqa: E402

OURS = ["euler", "heun", "rk4", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"]
SHIFTS = (None, 3.0)
NFES = (5, 10, 20)


def problem(name: str, dim: int, batch: int, seed: int):
    sde = ss.RectifiedFlow()
    g = torch.Generator().manual_seed(seed)
    if name == "mixture":
        gm = ss.GaussianMixture.random(dim=dim, num_components=8, seed=seed)
        model = gm.model(sde, "flow")
        shape = (batch, dim)
    else:
        from scoresolve.models import load_digits_flow_model

        model, sde = load_digits_flow_model()
        model.net = model.net.double()
        shape = (batch, 1, 8, 8)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    return model, sde, x_T


def diffusers_flow_euler(model: ss.ScoreModel, x_T: torch.Tensor, nfe: int, shift: float) -> tuple[torch.Tensor, int]:
    """diffusers' own FlowMatchEuler loop with our velocity model (timestep = sigma * 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(nfe)
    x, calls = x_T.clone(), 0
    for tau in sched.timesteps:
        t = (tau / 1000).to(x.dtype).expand(x.shape[0])
        u = model.flow(x, t)
        calls += 1
        x = sched.step(u, tau, x).prev_sample.to(x.dtype)
    return x, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mixture", "digits_flow"], default="mixture")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-eps", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, sde, x_T = problem(args.model, args.dim, args.batch, args.seed)
    tol = 1e-10 if args.model == "mixture" else 1e-8  # the network: float64 round-off of the U-Net sets the floor
    ref = ss.sample(model, sde, x_T, solver="dopri5", rtol=tol, atol=tol, t_eps=1e-6, denoise=True,
                    max_steps=100_000)
    print(f"problem: {args.model}, D = {x_T[0].numel()}, batch {args.batch}; reference NFE "
          f"{float(ref.nfe.double().mean()):.0f}")
    runs: list[Run] = []
    for nfe in NFES:
        for solver in OURS:
            for shift in SHIFTS:
                t0 = time.perf_counter()
                try:
                    sol = ss.sample(model, sde, x_T, solver=solver, nfe=nfe - 1, t_eps=args.t_eps, grid="uniform",
                                    shift=shift, denoise=True)
                except ValueError:  # fewer NFE than the method's smallest step
                    continue
                n = float(torch.as_tensor(sol.nfe, dtype=torch.float64).mean())
                runs.append(Run(f"{solver}@uniform" + (f"+shift{shift:g}" if shift else ""), f"nfe={nfe}", n,
                                rms_error(sol.x, ref.x), time.perf_counter() - t0))
        for shift in (1.0, 3.0):
            t0 = time.perf_counter()
            x, calls = diffusers_flow_euler(model, x_T, nfe, shift)
            runs.append(Run(f"diffusers FMEuler s={shift:g}", f"nfe={nfe}", calls, rms_error(x, ref.x),
                            time.perf_counter() - t0))
    print(format_table(runs))
    print()
    print("NFE | our best (solver)                        | diffusers FlowMatchEuler best | ratio")
    for nfe in NFES:
        ours = [r for r in runs if r.setting == f"nfe={nfe}" and not r.solver.startswith("diffusers")
                and r.nfe <= nfe]
        theirs = [r for r in runs if r.setting == f"nfe={nfe}" and r.solver.startswith("diffusers")]
        if not ours or not theirs:
            continue
        b, d = min(ours, key=lambda r: r.error), min(theirs, key=lambda r: r.error)
        ratio = d.error / b.error if b.error > 0 else math.inf
        print(f"{nfe:>3} | {b.error:.3e} ({b.solver:<28}) | {d.error:.3e} ({d.solver:<18}) | {ratio:.2f}x")


if __name__ == "__main__":
    main()
