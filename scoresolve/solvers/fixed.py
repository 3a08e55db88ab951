"""Fixed-step Runge-Kutta on a time grid for the probability-flow ODE: Euler, Heun (EDM's 2nd order), RK4.

Each integrates dx/dt = drift(x, t) of a ReverseProcess from ts[0] = T down to ts[-1] = t_eps with the tableau of
`scoresolve.solvers.tableaux`; they are generic over the process (any drift) and need s = 0 (the SDE samplers take
s > 0; ``euler_maruyama`` is `rk_step` with ``EULER`` plus the noise).
"""

from __future__ import annotations

import torch

from ._grid import GridRun, batch_t
from ._registry import GridSolver, ReverseProcess, register, require_ode
from .tableaux import EULER, HEUN, RK4, ButcherTableau


def rk_step(tab: ButcherTableau, run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """One explicit RK step of ``tab`` from t = run.t[i] to run.t[i + 1] (h < 0: backwards in time)."""
    t0, h = run.t[i], run.t[i + 1] - run.t[i]  # host floats: no device sync, float64 coefficients
    k: list[torch.Tensor] = []
    for s in range(tab.stages):
        xs = x
        for j, aij in enumerate(tab.a[s - 1] if s else ()):
            if aij:
                xs = xs + (h * aij) * k[j]
        k.append(run.drift_at(xs, run.time(i, x) if s == 0 else batch_t(t0 + tab.c[s] * h, x)))
    return x + h * sum(bs * ks for bs, ks in zip(tab.b, k))


NOISY = 10.0  # sigma / alpha above which the data's own spread (scale ~1) is negligible next to the noise


def stability_function(tab: ButcherTableau, z: float) -> float:
    """R(z) of an explicit RK method: one step of y' = lambda y multiplies y by R(h lambda) = 1 + z b^T (I - z A)^-1 1,
    a polynomial of degree ``stages`` (Euler 1 + z; Heun 1 + z + z^2/2; RK4 the degree-4 Taylor polynomial)."""
    s = tab.stages
    A = [[(tab.a[i - 1][j] if i and j < i else 0.0) for j in range(s)] for i in range(s)]
    v, total = [1.0] * s, 1.0  # v = (z A)^(k-1) 1
    for _ in range(s):
        total += z * sum(b * vi for b, vi in zip(tab.b, v))
        v = [z * sum(A[i][j] * v[j] for j in range(s)) for i in range(s)]
    return total


def check_stability(tab: ButcherTableau, run: GridRun) -> None:
    """Refuse (ValueError) a grid on which ``tab`` amplifies the noise where it dominates.

    On the steps that start where sigma / alpha >= `NOISY` the score is -(x - alpha E[x0]) / sigma^2 up to the
    data's spread, so the PF-ODE's drift is linear, dx/dt = J x + ..., with J = f + g^2 / (2 sigma^2) in every
    direction (in t, d log sigma / dt on VE: log(sigma_max / sigma_min) per unit t), whose flow multiplies x by
    sigma(t1) / sigma(t0) over a step. A step h of ``tab`` multiplies it by R(h J(t0)) (`stability_function`)
    instead; where |R| > 1 the step amplifies what it should damp (heun and rk4 on VE with sigma_max >= 1e4 at their
    default grids returned samples off by 1e6 - 1e9). The exponential integrators (ddim, dpmpp_2m, unipc, ...)
    solve this part exactly.
    """
    sde = run.sde
    if sde.velocity_form or not sde.gaussian_kernel:  # f, g^2 diverge at alpha = 0 / no (alpha, sigma) to check
        return

    def rate(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64)
        return float(sde.f(tt) + sde.g2(tt) / (2 * sde.sigma(tt) ** 2))

    for i in range(run.steps):
        if not run.sigma[i] >= NOISY * run.alpha[i]:
            break  # the noisy part of the grid is its start
        t0, h = run.t[i], run.t[i + 1] - run.t[i]
        j0 = rate(t0)
        amp = stability_function(tab, h * j0)  # R(h J(t0)): J at the noisy start (VE: J is constant)
        if not abs(amp) <= 1.0:
            raise ValueError(
                f"{tab.name} is unstable on this grid: step {i} (t {t0:.4g} -> {run.t[i + 1]:.4g}, sigma/alpha "
                f"{run.sigma[i] / run.alpha[i]:.3g}) multiplies the noise by {amp:.3g} where the PF-ODE multiplies it "
                f"by sigma ratio {run.sigma[i + 1] / run.sigma[i]:.3g} (its linear part, rate J = f + g^2/(2 sigma^2) "
                f"= {rate(t0):.3g} for {sde!r}, h*J = {h * rate(t0):.3g}): the step amplifies what it should damp. "
                "Use more steps, a grid with shorter steps at high noise, or an exponential integrator (ddim, "
                "dpmpp_2m, unipc: exact in the linear part)"
            )


def _checked_step(tab: ButcherTableau, run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    if i == 0:
        check_stability(tab, run)  # before the first network evaluation
    return rk_step(tab, run, x, i)


def _ode_only(process: ReverseProcess, options: dict, steps: int, name: str) -> dict:
    require_ode(name, process)
    return options


for _tab, _grid, _what in ((EULER, "uniform", "Euler"), (HEUN, "quadratic", "Heun (EDM)"),
                           (RK4, "quadratic", "classical RK4")):
    # default grids from benchmarks/work_precision.py (64-D mixture, VP): the lowest error at 10-50 NFE
    register(GridSolver(
        _tab.name, step=lambda run, x, i, _t=_tab: _checked_step(_t, run, x, i),
        prepare=lambda p, o, n, _n=_tab.name: _ode_only(p, o, n, _n), evals_per_step=_tab.stages, order=_tab.order,
        default_grid=_grid, starts_at_alpha0=True, description=f"{_what} on the PF-ODE"))
