"""Diagnostic: how much a model's probability-flow velocity oscillates in t (what limits adaptive ODE steps).

Along a fixed noising path x_t = alpha(t) x0 + sigma(t) z (smooth in t), the velocity v(x_t, t) of the
probability-flow ODE is evaluated on a dense grid in short windows of t; a degree-8 Chebyshev fit per window
removes the smooth part. Printed per window: the residual's RMS relative to the velocity's RMS, and the angular
frequencies (rad per unit t) that carry most of the residual. A smooth model (the Gaussian-mixture control, exact
score) leaves only the fit's own error; a network with a sinusoidal embedding of 1000 t (DDPM, diffusers' UNets,
the shipped digits U-Nets) leaves an oscillation at omega ~ 1000 and its harmonics, which an adaptive solver
must resolve (its period is 2 pi / 1000 = 0.0063 in t) whatever its order or time variable.

    python benchmarks/time_oscillation.py [--models mixture digits digits_flow model.pt] [--points 2001]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import scoresolve as ss

WINDOWS = ((0.01, 0.06), (0.1, 0.15), (0.3, 0.35), (0.7, 0.75))


def oscillation(velocity, sde, x0: torch.Tensor, window: tuple[float, float], points: int = 2001, degree: int = 8,
                seed: int = 3) -> tuple[float, list[float]]:
    """(residual RMS / velocity RMS, the 3 angular frequencies with the largest mean |FFT| of the residual) of
    ``velocity(x, t)`` along x_t = alpha(t) x0 + sigma(t) z on ``points`` times in ``window``; x0 ``[1, ...]``."""
    t = torch.linspace(window[0], window[1], points, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    shape = (points,) + (1,) * (x0.dim() - 1)
    xt = sde.alpha(t).view(shape) * x0 + sde.sigma(t).view(shape) * z
    with torch.no_grad():
        v = torch.cat([velocity(xt[i : i + 256], t[i : i + 256]) for i in range(0, points, 256)])
    v = v.flatten(1).numpy()
    tt = t.numpy()
    basis = np.polynomial.chebyshev.chebvander(2 * (tt - tt[0]) / (tt[-1] - tt[0]) - 1, degree)
    coef, *_ = np.linalg.lstsq(basis, v, rcond=None)
    r = v - basis @ coef
    spectrum = np.abs(np.fft.rfft(r, axis=0)).mean(1)
    omega = np.fft.rfftfreq(points, d=tt[1] - tt[0]) * 2 * np.pi
    top = np.argsort(spectrum[1:])[-3:][::-1] + 1
    return float(np.sqrt((r**2).mean() / (v**2).mean())), [float(w) for w in omega[top]]


def model(name: str):
    """(velocity(x, t), sde, x0 [1, ...]) of a named model, in float64."""
    if name == "mixture":  # the control: exact score of a 16-D Gaussian mixture under the VP SDE
        sde = ss.VPSDE()
        gm = ss.GaussianMixture.random(16, 8, seed=0, scale_range=(0.1, 0.5), full=True)
        rev = ss.ReverseProcess(sde, gm.score_fn(sde), diffusion_scale=0.0)
        x0 = gm.sample(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return rev.drift_at, sde, x0
    from likelihood_cost import digits_problem  # a sibling script (benchmarks/ is on sys.path)

    from scoresolve.models import load_checkpoint, load_digits_flow_model, load_digits_model

    if name.endswith(".pt"):  # a digits network of `scoresolve train --data digits`
        m, sde, _ = load_checkpoint(name)
    else:
        m, sde = (load_digits_flow_model if name == "digits_flow" else load_digits_model)()
    sde, score, _, x0 = digits_problem(m, sde, sde.velocity_form, 1)
    return score.flow, sde, x0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["mixture", "digits", "digits_flow"],
                   help="mixture, digits, digits_flow, or the path of a digits network (a .pt file of "
                   "`scoresolve train --data digits`)")
    p.add_argument("--points", type=int, default=2001, help="times per window")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':<12} {'window of t':<14} {'residual/RMS':>12}  top omega (rad per unit t)")
    for name in args.models:
        velocity, sde, x0 = model(name)
        for w in WINDOWS:
            rel, top = oscillation(velocity, sde, x0, w, args.points)
            label = os.path.basename(name)[:24]
            print(f"{label:<12} [{w[0]:.2f}, {w[1]:.2f}]   {rel:>12.2e}  {', '.join(f'{o:.0f}' for o in top)}",
                  flush=True)


if __name__ == "__main__":
    main()
