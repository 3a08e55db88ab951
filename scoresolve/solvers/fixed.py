"""Fixed-step Runge-Kutta on a time grid for the probability-flow ODE: Euler, Heun (EDM's 2nd order), RK4.

Each integrates dx/dt = drift(x, t) of a ReverseProcess from ts[0] = T down to ts[-1] = t_eps with the tableau of
`scoresolve.solvers.tableaux`; they are generic over the process (any drift) and need s = 0 (the SDE samplers take
s > 0; ``euler_maruyama`` is `rk_step` with ``EULER`` plus the noise).
"""

from __future__ import annotations

import torch

from ._grid import GridRun
from ._registry import GridSolver, ReverseProcess, register, require_ode
from .tableaux import EULER, HEUN, RK4, ButcherTableau


def rk_step(tab: ButcherTableau, run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """One explicit RK step of ``tab`` from t = run.t[i] to run.t[i + 1] (h < 0: backwards in time)."""
    if tab.stages <= 2:
        return _rk_step_folded(tab, run, x, i)
    h = run.t[i + 1] - run.t[i]  # host floats: no device sync, float64 coefficients
    k: list[torch.Tensor] = []
    for s in range(tab.stages):
        xs = x
        for j, aij in enumerate(tab.a[s - 1] if s else ()):
            if aij:
                xs = xs.add(k[j], alpha=h * aij) if xs is not x else torch.add(x, k[j], alpha=h * aij)
        if s == 0 or tab.c[s] == 1.0:  # stages at grid times use the per-grid coefficients
            k.append(run.drift(xs, i if s == 0 else i + 1))
        else:
            k.append(run.drift_at(xs, stage_time(tab, run, i, s)))
    out = x
    for bs, ks in zip(tab.b, k):
        if bs:
            out = torch.add(out, ks, alpha=h * bs) if out is x else out.add_(ks, alpha=h * bs)
    return out


def _rk_step_folded(tab: ButcherTableau, run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """`rk_step` for one- and two-stage tableaux (Euler, Heun) with the drifts' host coefficients folded into the
    stage weights (drift = cx x + cp out, `GridRun.predict_parts`): one kernel less per stage."""
    h = run.t[i + 1] - run.t[i]
    o0, cx0, cp0 = run.predict_parts(x, i, "drift")
    b0 = tab.b[0]
    if tab.stages == 1:  # x + h b0 (cx0 x + cp0 o0)
        return torch.add(x * (1 + h * b0 * cx0), o0, alpha=h * b0 * cp0)
    a10, b1 = tab.a[0][0], tab.b[1]
    xs = torch.add(x * (1 + h * a10 * cx0), o0, alpha=h * a10 * cp0)  # x + h a10 k0
    if tab.c[1] == 1.0:
        o1, cx1, cp1 = run.predict_parts(xs, i + 1, "drift")
    else:
        o1, cx1, cp1 = run.predict_parts(xs, None, "drift", t=stage_time(tab, run, i, 1))
    # x + h (b0 k0 + b1 k1), k1 = cx1 xs + cp1 o1
    return torch.add(x * (1 + h * b0 * cx0), o0, alpha=h * b0 * cp0).add_(xs, alpha=h * b1 * cx1).add_(
        o1, alpha=h * b1 * cp1)


def stage_time(tab: ButcherTableau, run: GridRun, i: int, s: int) -> float:
    """The host time of stage s > 0 of step i (off the grid: 0 < c_s < 1)."""
    return run.t[i] + tab.c[s] * (run.t[i + 1] - run.t[i])


def prefetch_stages(tab: ButcherTableau, run: GridRun) -> None:
    """The drift coefficients at every off-grid stage time of the solve, computed at once on the host."""
    run.prefetch("drift", [stage_time(tab, run, i, s) for i in range(run.steps) for s in range(1, tab.stages)
                           if tab.c[s] != 1.0], key=("rk_stages", tab.name))


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
    found = run.per_grid(("stability", tab.name), lambda: _first_unstable(tab, run))
    if found is not None:
        i, amp, j0 = found
        t0, h = run.t[i], run.t[i + 1] - run.t[i]
        raise ValueError(
            f"{tab.name} is unstable on this grid: step {i} (t {t0:.4g} -> {run.t[i + 1]:.4g}, sigma/alpha "
            f"{run.sigma[i] / run.alpha[i]:.3g}) multiplies the noise by {amp:.3g} where the PF-ODE multiplies it "
            f"by sigma ratio {run.sigma[i + 1] / run.sigma[i]:.3g} (its linear part, rate J = f + g^2/(2 sigma^2) "
            f"= {j0:.3g} for {sde!r}, h*J = {h * j0:.3g}): the step amplifies what it should damp. "
            "Use more steps, a grid with shorter steps at high noise, or an exponential integrator (ddim, "
            "dpmpp_2m, unipc: exact in the linear part)"
        )


def _first_unstable(tab: ButcherTableau, run: GridRun) -> tuple[int, float, float] | None:
    """(step, R(h J), J) of the first noisy step where |R(h J(t0))| > 1, or None; J on every noisy step at once."""
    noisy = 0
    while noisy < run.steps and run.sigma[noisy] >= NOISY * run.alpha[noisy]:
        noisy += 1  # the noisy part of the grid is its start
    if noisy == 0:
        return None
    sde, t0 = run.sde, run.t64[:noisy]
    rates = (sde.f(t0) + sde.g2(t0) / (2 * sde.sigma(t0) ** 2)).expand(t0.shape).tolist()
    for i, j0 in enumerate(rates):
        amp = stability_function(tab, (run.t[i + 1] - run.t[i]) * j0)  # R(h J(t0)): J at the noisy start
        if not abs(amp) <= 1.0:
            return i, amp, j0
    return None


def _checked_step(tab: ButcherTableau, run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    if i == 0:
        check_stability(tab, run)  # before the first network evaluation
        prefetch_stages(tab, run)
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
