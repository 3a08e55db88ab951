"""Work-precision of the ODE samplers against k-diffusion's, on the same probability-flow ODE and x_T.

64-dimensional, 8-component Gaussian mixture (correlated components), VP SDE, t_eps = 1e-3, batch 256, float64.
Error: RMS over the batch of |x - x_ref|_2 / sqrt(D), x_ref from adaptive dopri5 at rtol = atol = 1e-10.
k-diffusion (PyPI 0.1.1.post1, loaded without its heavy dependencies) runs in its own variables x/alpha and
sigma/alpha = exp(-lambda) on its Karras grid ending at sigma(t_eps) (no final step to sigma = 0), with the
denoiser D = E[x0 | x_t] of the same mixture; its result is mapped back by x = alpha(t_eps) x_kd.
Ratios: k-diffusion's best error over ours at each NFE (higher is better for us; goal >= 2 at 10 and 20 NFE).

    python benchmarks/work_precision.py [--seed 0] [--batch 256] [--plot wp.png]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import scoresolve as ss  # noqa: E402
from scoresolve.compare import Run, format_table, plot_work_precision, reference_solve, rms_error, work_precision  # noqa: E402
from tests._kdiffusion import k_diffusion_denoiser, load_k_diffusion_sampling  # noqa: E402

OURS = ["euler", "heun", "ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc"]
GRIDS = ["uniform", "quadratic", "logsnr", "karras"]
NFES = (10, 20, 50)


def k_diffusion_runs(kd, score, sde, x_T, ref, t_eps: float) -> list[Run]:
    """k-diffusion's euler, heun, lms, dpmpp_2m and dpm_fast at each NFE budget."""
    alpha_T = float(sde.marginal(torch.tensor(sde.T, dtype=torch.float64))[0])
    alpha_e = float(sde.marginal(torch.tensor(t_eps, dtype=torch.float64))[0])
    lam = sde.log_snr(torch.tensor([sde.T, t_eps], dtype=torch.float64))
    smax, smin = float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))
    x_kd = x_T / alpha_T
    runs = []
    for name, steps_for in (("euler", lambda n: n), ("heun", lambda n: n // 2), ("lms", lambda n: n),
                            ("dpmpp_2m", lambda n: n)):
        for nfe in NFES:
            n = steps_for(nfe)
            sig = kd.get_sigmas_karras(n + 1, smin, smax, rho=7.0, device=x_T.device)[:-1].to(x_T.dtype)  # no 0
            den, counter = k_diffusion_denoiser(score, sde, count=True)
            out = getattr(kd, f"sample_{name}")(den, x_kd, sig, disable=True)
            runs.append(Run(f"k-diffusion {name}", f"nfe={nfe}", counter.calls, rms_error(out * alpha_e, ref), 0.0))
    for nfe in NFES:
        den, counter = k_diffusion_denoiser(score, sde, count=True)
        out = kd.sample_dpm_fast(den, x_kd, smin, smax, nfe, disable=True)
        runs.append(Run("k-diffusion dpm_fast", f"nfe={nfe}", counter.calls, rms_error(out * alpha_e, ref), 0.0))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--plot", default="", help="write the work-precision plot to this PNG")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_eps, sde = 1e-3, ss.VPSDE()
    gm = ss.GaussianMixture.random(args.dim, args.components, seed=args.seed)
    score = gm.score_fn(sde)
    x_T = sde.prior_sample((args.batch, args.dim), generator=torch.Generator().manual_seed(args.seed + 1),
                           dtype=torch.float64)
    ref = reference_solve(score, sde, x_T, t_eps)
    ours = work_precision(score, sde, x_T, [f"{s}@{g}" for s in OURS for g in GRIDS], nfes=NFES, t_eps=t_eps,
                          reference=ref)
    default = work_precision(score, sde, x_T, OURS, nfes=NFES, t_eps=t_eps, reference=ref)
    kd = load_k_diffusion_sampling()
    theirs = k_diffusion_runs(kd, score, sde, x_T, ref, t_eps) if kd is not None else []
    print(f"VP SDE, {args.components}-component mixture in {args.dim} dims (seed {args.seed}), batch {args.batch}, "
          f"t_eps={t_eps}, float64; error = RMS |x - x_ref| / sqrt(D)\n")
    print("scoresolve, default grids:")
    print(format_table(default))
    print("\nk-diffusion (Karras grid to sigma(t_eps)):" if theirs else "\nk-diffusion not installed")
    if theirs:
        print(format_table(theirs))
    print("\nbest of each at each NFE (scoresolve over all solver x grid combinations):")
    for nfe in NFES:
        setting = f"nfe={nfe}"
        best = min((r for r in ours if r.setting == setting), key=lambda r: r.error)
        best_default = min((r for r in default if r.setting == setting), key=lambda r: r.error)
        line = (f"  NFE {nfe:>3}: scoresolve {best.solver:<22} {best.error:.3e}   "
                f"(default grids: {best_default.solver} {best_default.error:.3e})")
        if theirs:
            kbest = min((r for r in theirs if r.setting == setting), key=lambda r: r.error)
            line += f"   k-diffusion {kbest.solver[12:]:<9} {kbest.error:.3e}   ratio {kbest.error / best.error:6.1f}x"
            line += f" (default grids {kbest.error / best_default.error:.1f}x)"
        print(line)
    print("\nall grids:")
    for s in OURS:
        cells = []
        for g in GRIDS:
            errs = [r.error for r in ours if r.solver == f"{s}@{g}"]
            cells.append(" ".join(f"{e:8.1e}" if not math.isnan(e) else "     -  " for e in errs))
        print(f"  {s:<13} " + " | ".join(f"{g}: {c}" for g, c in zip(GRIDS, cells)))
    if args.plot:
        plot_work_precision(default + theirs, args.plot, title=f"VP, {args.dim}-D mixture, t_eps={t_eps}")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
