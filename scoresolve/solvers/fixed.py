"""Fixed-step Runge-Kutta on a time grid for the probability-flow ODE: Euler, Heun (EDM's 2nd order), RK4.

Each integrates dx/dt = drift(x, t) of a ReverseProcess from ts[0] = T down to ts[-1] = t_eps with the tableau of
`scoresolve.solvers.tableaux`; they are generic over the process (any drift) and need s = 0 (the SDE samplers take
s > 0; ``euler_maruyama`` is `rk_step` with ``EULER`` plus the noise).
"""

from __future__ import annotations

import torch

from ._grid import GridRun, batch_t
from ._registry import ReverseProcess, SolverSpec, register, require_ode
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


def _ode_only(process: ReverseProcess, options: dict, steps: int, name: str) -> dict:
    require_ode(name, process)
    return options


for _tab, _grid, _what in ((EULER, "uniform", "Euler"), (HEUN, "quadratic", "Heun (EDM)"),
                           (RK4, "quadratic", "classical RK4")):
    # default grids from benchmarks/work_precision.py (64-D mixture, VP): the lowest error at 10-50 NFE
    register(SolverSpec(
        _tab.name, step=lambda run, x, i, _t=_tab: rk_step(_t, run, x, i),
        prepare=lambda p, o, n, _n=_tab.name: _ode_only(p, o, n, _n), evals_per_step=_tab.stages, order=_tab.order,
        default_grid=_grid, starts_at_alpha0=True, description=f"{_what} on the PF-ODE"))
