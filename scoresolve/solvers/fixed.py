"""Fixed-step ODE solvers on a time grid for the probability-flow ODE: Euler, Heun (EDM's 2nd order), RK4.

Each integrates dx/dt = drift(x, t) of a ReverseProcess from ts[0] = T down to ts[-1] = t_eps. They are generic
over the process (any drift), and need s = 0 (use the SDE samplers for s > 0).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..reverse import ReverseProcess
from ._core import GridRun, Solution, SolverSpec, batch_t, check_options, register

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]

# Butcher tableaux of the explicit methods (a_lower rows, b weights, c nodes)
_TABLEAUX = {
    "euler": ((), (1.0,), (0.0,)),
    "heun": (((1.0,),), (0.5, 0.5), (0.0, 1.0)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0)),
}


def _explicit_rk(
    name: str,
    process: ReverseProcess,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    callback: Callback | None = None,
    save_trajectory: bool = False,
    **options: object,
) -> Solution:
    check_options(name, options, ())
    if not process.is_ode:
        raise ValueError(f"solver {name!r} integrates the probability-flow ODE (diffusion=0); "
                         "use 'euler_maruyama' or another SDE sampler for diffusion > 0")
    a, b, c = _TABLEAUX[name]
    run = GridRun(name, process, x, ts, callback, save_trajectory)
    for i in range(run.steps):
        t0, h = run.ts[i], run.ts[i + 1] - run.ts[i]  # h < 0: integrating backwards in time
        k: list[torch.Tensor] = []
        for s in range(len(b)):
            xs = x
            for j, aij in enumerate(a[s - 1] if s else ()):
                if aij:
                    xs = xs + (h * aij) * k[j]
            ti = batch_t(t0 + c[s] * h, x)
            k.append(run.proc.drift_from_score(xs, ti, run.model(xs, ti)))
        x = x + h * sum(bs * ks for bs, ks in zip(b, k))
        run.done(i, x)
    return run.solution(x)


def euler(process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **kw) -> Solution:
    """Explicit Euler on the probability-flow ODE; order 1, 1 NFE per step."""
    return _explicit_rk("euler", process, x, ts, **kw)


def heun(process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **kw) -> Solution:
    """Heun's method (explicit trapezoid; EDM's 2nd-order sampler without churn); order 2, 2 NFE per step."""
    return _explicit_rk("heun", process, x, ts, **kw)


def rk4(process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **kw) -> Solution:
    """Classical 4th-order Runge-Kutta; order 4, 4 NFE per step."""
    return _explicit_rk("rk4", process, x, ts, **kw)


# default grids from benchmarks/work_precision.py (64-D mixture, VP): the lowest error at 10-50 NFE
register(SolverSpec("euler", euler, options=(), evals_per_step=1, order=1, default_grid="uniform",
                    description="Euler on the PF-ODE"))
register(SolverSpec("heun", heun, options=(), evals_per_step=2, order=2, default_grid="quadratic",
                    description="Heun (EDM) on the PF-ODE"))
register(SolverSpec("rk4", rk4, options=(), evals_per_step=4, order=4, default_grid="quadratic",
                    description="classical RK4 on the PF-ODE"))
