"""Per-call overhead of the samplers outside the network, against k-diffusion, diffusers and torchdiffeq.

The network is nearly free (a 2-D state, the exact x0 = 0 prediction, i.e. ``torch.zeros_like``), so the wall time
per network call is the sampler's own cost: coefficients, history, bookkeeping, guards. Each pair runs interleaved
(``--repeats`` rounds, median) in the same process; the ratio is ours / theirs (at or below 1: no more overhead).

- grid samplers, 50 NFE: ``sample(solver="dpmpp_2m")`` / ``"unipc"`` / the default (vAB) against k-diffusion's
  ``sample_dpmpp_2m`` on Karras sigmas and diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler loops
  (``scale_model_input`` + ``step``);
- adaptive: ``sample(solver="dopri5")`` at rtol = atol = 1e-5 against ``torchdiffeq.odeint(method="dopri5")`` on
  the same probability-flow ODE, per network call.

    python benchmarks/overhead.py [--batch 1 1024] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _kdiffusion import load_k_diffusion_sampling  # noqa: E402

import scoresolve as ss  # noqa: E402

NFE = 50


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    calls = fn()
    return time.perf_counter() - t0, calls


def pairs(batch: int):
    sde = ss.VPSDE()
    x_T = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    model = ss.ScoreModel(lambda x, t: torch.zeros_like(x), sde, prediction="x0")
    lam = sde.log_snr(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))

    def ours(solver, **kw):
        def run():
            return int(ss.sample(model, sde, x_T, solver=solver, nfe=NFE, **kw).nfe.max())
        return run

    out = {}
    kd = load_k_diffusion_sampling()
    if kd is not None:
        sig = kd.get_sigmas_karras(NFE, smin, smax)

        def kd_run():
            n = [0]

            def den(x, s):
                n[0] += 1
                return torch.zeros_like(x)
            kd.sample_dpmpp_2m(den, x_T, sig, disable=True)
            return n[0]
        out["dpmpp_2m vs k-diffusion sample_dpmpp_2m"] = (ours("dpmpp_2m"), kd_run)
        out["default (vab) vs k-diffusion sample_dpmpp_2m"] = (ours(None), kd_run)
    try:
        import diffusers

        def diffusers_run(cls):
            def run():
                sched = cls(num_train_timesteps=1000, prediction_type="sample")
                sched.set_timesteps(NFE)
                x = x_T * sched.init_noise_sigma
                for t in sched.timesteps:
                    xin = sched.scale_model_input(x, t)
                    x = sched.step(torch.zeros_like(xin), t, x, return_dict=False)[0]
                return len(sched.timesteps)
            return run
        out["dpmpp_2m vs diffusers DPMSolverMultistep"] = (ours("dpmpp_2m"),
                                                           diffusers_run(diffusers.DPMSolverMultistepScheduler))
        out["unipc vs diffusers UniPCMultistep"] = (ours("unipc"), diffusers_run(diffusers.UniPCMultistepScheduler))
    except ImportError:
        pass
    try:
        import torchdiffeq

        pf = sde.probability_flow(model)

        def td_run():
            n = [0]

            def f(t, x):
                n[0] += 1
                return pf.drift(x, t.clamp(1e-5, 1.0).to(x.dtype).expand(x.shape[0]))  # its first trial step overshoots
            torchdiffeq.odeint(f, x_T, torch.tensor([1.0, 1e-3]), method="dopri5", rtol=1e-5, atol=1e-5)
            return n[0]

        def ours_dopri5():
            return int(ss.sample(model, sde, x_T, solver="dopri5", rtol=1e-5, atol=1e-5).calls)
        out["dopri5 vs torchdiffeq dopri5"] = (ours_dopri5, td_run)
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'pair':<46} {'batch':>6} {'ours us/call':>13} {'theirs us/call':>15} {'ratio':>6}")
    for batch in args.batch:
        for name, (a, b) in pairs(batch).items():
            a(), b()  # warm-up
            ta, tb = [], []
            for _ in range(args.repeats):
                t, n = _timed(a)
                ta.append(t / n)
                t, n = _timed(b)
                tb.append(t / n)
            ma, mb = statistics.median(ta) * 1e6, statistics.median(tb) * 1e6
            print(f"{name:<46} {batch:>6} {ma:>13.0f} {mb:>15.0f} {ma / mb:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
