"""Adaptive embedded Runge-Kutta ODE solvers with per-sample error control, on any vector field and on the
probability-flow ODE.

`odeint_adaptive` integrates any dy/dt = func(t, y) with the one integrator (`scoresolve.solvers.integrate`) and
an embedded pair from `scoresolve.solvers.tableaux`. The registered solvers ``dopri5``, ``tsit5``, ``bosh3``,
``dopri5_shampine``, and for tight tolerances ``vern6`` and ``vern7``, integrate the probability-flow ODE of a
[`ReverseProcess`][scoresolve.ReverseProcess] with it (``scoresolve.sample(..., solver="tsit5", rtol=...,
atol=...)``), in t or in the log-SNR (``time_variable``).
"""

from __future__ import annotations

from typing import Any

import torch

from .._utils import bcast, check_batched
from ..reverse import ReverseProcess, TimeVariable
from ._registry import SolverSpec, check_start, counted, register, require_ode
from ._solution import Solution
from .controllers import DOPRI5_GAINS, Controller, IController, PIController  # noqa: F401  (re-exported)
from .errors import MaxStepsError, NonFiniteStepError, StepSizeUnderflowError  # noqa: F401  (re-exported)
from .integrate import MIN_STEP_REL, Callback, RKStepper, State, VectorField, integrate, tableau_by_name  # noqa: F401
from .tableaux import BOSH3, DOPRI5, DOPRI5_SHAMPINE, TABLEAUX, TSIT5, VERN6, VERN7, ButcherTableau  # noqa: F401

AdaptiveResult = Solution  # the old name of the integrator's result: it is the one Solution type now


def odeint_adaptive(
    func: VectorField,
    y0: State,
    t0: float,
    t1: float,
    *,
    method: str | ButcherTableau = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    name: str | None = None,
    **options: Any,
) -> Solution:
    """Integrate dy/dt = func(t, y) from t0 to t1 (either direction) with per-sample adaptive steps.

    ``method`` is ``"dopri5"``, ``"tsit5"``, ``"bosh3"``, ``"dopri5_shampine"``, ``"vern6"``, ``"vern7"`` or a
    `ButcherTableau` with an embedded pair; ``rtol`` / ``atol`` (> 0) apply to every tensor of the state (the error
    of a sample is the max over the tensors of their scaled RMS errors). Every other option (``controller``,
    ``max_steps``, ``first_step``, ``max_step``, ``check_every``, ``callback``, ``save_trajectory``, ``progress``,
    ``args``, ``compact``) is [`integrate`][scoresolve.solvers.integrate.integrate]'s. Returns a
    [`Solution`][scoresolve.Solution]
    (``.y`` / ``.x`` the final state, ``.nfe`` per sample, ``.calls`` batched calls).
    """
    tab = tableau_by_name(method)
    return integrate(RKStepper(tab, rtol, atol), func, y0, t0, t1, name=name or tab.name, **options)


# the options of the registered adaptive ODE solvers, with their defaults
PF_ODE_OPTIONS = {"max_steps": 10_000, "first_step": None, "max_step": None, "check_every": 8, "controller": None,
                  "compact": False, "time_variable": "t"}


def pf_ode_field(process: ReverseProcess, time: TimeVariable):
    """dx/du of the probability-flow ODE in the time variable u: dt/du * v(x, t(u)), v = f x - g^2/2 score."""

    def field(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = time.t(u)
        v = process.drift_at(x, t)
        return v if time.name == "t" else bcast(time.dt_du(t), x) * v

    return field


def _solve_pf_ode(spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, *,
                  rtol: float = 1e-5, atol: float = 1e-5, callback: Callback | None = None,
                  save_trajectory: bool = False, progress: bool = False, **options: Any) -> Solution:
    opts = spec.resolve(process, options)
    require_ode(spec.name, process)
    check_batched(x)
    t0, t1 = (float(v) for v in ts.detach().cpu().tolist())
    proc, model, counter = counted(process)
    time = TimeVariable(process.sde, opts.pop("time_variable"), t_min=0.5 * min(t0, t1))
    check_start(spec.name, time.name == "t", process, model, max(t0, t1))
    if time.name == "t":
        u0, u1, user_cb = t0, t1, callback
    else:
        u0, u1 = time.u(t0), time.u(t1)
        user_cb = None if callback is None else (lambda i, u, y: callback(i, time.t(u), y))
    try:
        sol = integrate(RKStepper(TABLEAUX[spec.name], rtol, atol), pf_ode_field(proc, time), x, u0, u1,
                        name=spec.name, callback=user_cb, save_trajectory=save_trajectory, progress=progress, **opts)
    except (MaxStepsError, StepSizeUnderflowError) as err:
        if time.name == "t":
            raise
        raise err.at_times(time.t_host(err.times)) from None
    if time.name != "t":
        sol.t = time.t(sol.t.double()).to(x.dtype)
        if sol.ts is not None:
            sol.ts = time.t(sol.ts.double()).to(x.dtype)
    sol.stats["network_calls"] = counter.calls
    return sol


for _tab, _what in ((DOPRI5, "Dormand-Prince 5(4)"), (TSIT5, "Tsitouras 5(4)"), (BOSH3, "Bogacki-Shampine 3(2)"),
                    (DOPRI5_SHAMPINE, "Dormand-Prince 5(4) with Shampine's error weights (torchdiffeq's dopri5)"),
                    (VERN6, "Verner 6(5), for tight tolerances"), (VERN7, "Verner 7(6), for very tight tolerances")):
    register(SolverSpec(_tab.name, kind="adaptive", run=_solve_pf_ode, options=PF_ODE_OPTIONS, order=_tab.order,
                        description=f"{_what}, adaptive per-sample steps, on the PF-ODE"))

