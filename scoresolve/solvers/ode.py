"""Adaptive embedded Runge-Kutta ODE solvers with per-sample error control, on any vector field and on the
probability-flow ODE.

`odeint_adaptive` integrates any dy/dt = func(t, y) with the one integrator (`scoresolve.solvers.integrate`) and
an embedded pair from `scoresolve.solvers.tableaux`. The registered solvers ``dopri5``, ``tsit5``, ``bosh3``,
``dopri5_shampine``, and for tight tolerances ``vern6`` and ``vern7``, integrate the probability-flow ODE of a
[`ReverseProcess`][scoresolve.ReverseProcess] with it (``scoresolve.sample(..., solver="tsit5", rtol=...,
atol=...)``), in t or in the log-SNR (``time_variable``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from .._utils import bcast, check_batched
from ..process import Process
from ..reverse import TIME_VARIABLES, ReverseProcess, TimeVariable
from ..score import ScoreModel
from ._registry import AdaptiveSolver, SolverSpec, check_start, counted, register, require_ode
from ._solution import Solution
from .controllers import DOPRI5_GAINS, Controller, IController, PIController  # noqa: F401  (re-exported)
from .errors import MaxStepsError, NonFiniteStepError, StepSizeUnderflowError  # noqa: F401  (re-exported)
from .integrate import MIN_STEP_REL, Callback, RKStepper, State, VectorField, integrate, tableau_by_name  # noqa: F401
from .tableaux import BOSH3, DOPRI5, DOPRI5_SHAMPINE, TABLEAUX, TSIT5, VERN6, VERN7, ButcherTableau  # noqa: F401


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
    ``args``, ``compact``, ``norms``) is [`integrate`][scoresolve.solvers.integrate.integrate]'s. Returns a
    [`Solution`][scoresolve.Solution]
    (``.y`` / ``.x`` the final state, ``.nfe`` per sample, ``.calls`` batched calls).
    """
    tab = tableau_by_name(method)
    return integrate(RKStepper(tab, rtol, atol), func, y0, t0, t1, name=name or tab.name, **options)


# the options of the registered adaptive ODE solvers, with their defaults (time_variable None: `choose_time_variable`)
PF_ODE_OPTIONS = {"max_steps": 10_000, "first_step": None, "max_step": None, "check_every": None, "controller": None,
                  "compact": False, "time_variable": None}


def choose_time_variable(sde: Process, time_variable: str | None, t_max: float) -> str:
    """The one rule for the variable a PF-ODE solve steps in (`sample` with an adaptive solver and `log_likelihood`).

    None: ``"logsnr"`` where the schedule jumps in t (``sde.smooth_in_t`` False: a `DiscreteVPSDE`, whose beta(t)
    jumps at every knot 1/N and makes steps in t tiny) and the log-SNR is finite up to ``t_max``, else ``"t"``.
    An explicit ``"logsnr"`` needs the capability ``gaussian_kernel`` (checked by the caller's requirements) and a
    finite log-SNR at ``t_max`` (ValueError on a process with alpha = 0 there, e.g. rectified flow at T).
    """
    finite = sde.gaussian_kernel and math.isfinite(
        float(sde.log_snr(torch.tensor(float(t_max), dtype=torch.float64), check=False)))  # type: ignore[attr-defined]
    if time_variable is None:
        return "logsnr" if finite and not sde.smooth_in_t else "t"
    if time_variable == "logsnr" and not finite:
        raise ValueError(f"time_variable='logsnr' needs a finite log-SNR at T; {sde!r} has alpha(T) = 0: use 't'")
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"time_variable must be one of {TIME_VARIABLES} or None, got {time_variable!r}")
    return time_variable


def _time_variable_requirements(options: Mapping[str, Any]) -> tuple[str, ...]:
    return ("gaussian_kernel",) if options.get("time_variable") == "logsnr" else ()


def pf_ode_field(process: ReverseProcess, time: TimeVariable):
    """dx/du of the probability-flow ODE in the time variable u: dt/du * v(x, t(u)), v = f x - g^2/2 score."""

    def field(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = time.t(u)
        v = process.drift_at(x, t)
        return v if time.name == "t" else bcast(time.dt_du(t), x) * v

    return field


PFField = Callable[..., Any]
"""``field(t, y, *args) -> dy/dt`` for a state ``y`` (a tensor or a tuple of ``[batch, ...]`` tensors)."""


def solve_pf_ode(
    process: ReverseProcess,
    y0: State,
    t0: float,
    t1: float,
    *,
    stepper: RKStepper,
    name: str,
    time_variable: str | None = None,
    field: Callable[[ReverseProcess, ScoreModel], PFField] | None = None,
    callback: Callback | None = None,
    **options: Any,
) -> Solution:
    """The one PF-ODE solve path: `sample` with an adaptive ODE solver and `log_likelihood` both call it.

    Integrates the probability-flow ODE of ``process`` (s = 0) from ``t0`` to ``t1`` (either direction) with the one
    integrator (`scoresolve.solvers.integrate.integrate`): counts the network calls once (`counted`;
    ``stats["network_calls"]``), chooses the time variable by the one rule (`choose_time_variable`) and changes
    variables (dy/du = dt/du dy/dt for every tensor of the state), checks the start (`check_start`: alpha = 0 only
    in t and from a model that carries x0 there), and reports `MaxStepsError` / `StepSizeUnderflowError` and the
    solution's times in t. ``field(process, model)`` builds dy/dt from the counted process and model (an augmented
    field: `log_likelihood` returns (v, div)); None: dx/dt = ``process.drift_at(x, t)``. ``options``: integrate's.
    """
    require_ode(name, process)
    proc, model, counter = counted(process)
    time = TimeVariable(process.sde, choose_time_variable(process.sde, time_variable, max(t0, t1)),
                        t_min=0.5 * min(t0, t1))
    check_start(name, time.name == "t", process, model, max(t0, t1))
    f = field(proc, model) if field is not None else (lambda t, x: proc.drift_at(x, t))
    if time.name == "t":
        func, u0, u1, user_cb = f, t0, t1, callback
    else:
        def func(u: torch.Tensor, y: State, *args: Any, **kw: Any) -> State:
            t = time.t(u)
            dy = f(t, y, *args, **kw)
            dt_du = time.dt_du(t)
            if isinstance(dy, tuple):
                return tuple(bcast(dt_du, d) * d for d in dy)
            return bcast(dt_du, dy) * dy

        u0, u1 = time.u(t0), time.u(t1)
        user_cb = None if callback is None else (lambda i, u, y: callback(i, time.t(u), y))
    try:
        sol = integrate(stepper, func, y0, u0, u1, name=name, callback=user_cb, **options)
    except (MaxStepsError, StepSizeUnderflowError) as err:
        if time.name == "t":
            raise
        raise err.at_times(time.t_host(err.times)) from None
    if time.name != "t":
        dtype = (y0[0] if isinstance(y0, tuple) else y0).dtype
        sol.t = time.t(sol.t.double()).to(dtype)
        if sol.ts is not None:
            sol.ts = time.t(sol.ts.double()).to(dtype)
    sol.stats["network_calls"] = counter.calls
    sol.stats["time_variable"] = time.name
    return sol


def _solve_pf_ode(spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, *,
                  rtol: float = 1e-5, atol: float = 1e-5, callback: Callback | None = None,
                  save_trajectory: bool = False, progress: bool = False, **options: Any) -> Solution:
    opts = spec.resolve(process, options)
    check_batched(x)
    t0, t1 = (float(v) for v in ts.detach().cpu().tolist())
    return solve_pf_ode(process, x, t0, t1, stepper=RKStepper(TABLEAUX[spec.name], rtol, atol), name=spec.name,
                        callback=callback, save_trajectory=save_trajectory, progress=progress, **opts)


PF_ODE_SOLVERS: tuple[str, ...] = ()
"""The registered adaptive PF-ODE solvers (embedded Runge-Kutta pairs): `sample` and `log_likelihood` take them."""

for _tab, _what in ((DOPRI5, "Dormand-Prince 5(4)"), (TSIT5, "Tsitouras 5(4)"), (BOSH3, "Bogacki-Shampine 3(2)"),
                    (DOPRI5_SHAMPINE, "Dormand-Prince 5(4) with Shampine's error weights (torchdiffeq's dopri5)"),
                    (VERN6, "Verner 6(5), for tight tolerances"), (VERN7, "Verner 7(6), for very tight tolerances")):
    register(AdaptiveSolver(_tab.name, run=_solve_pf_ode, options=PF_ODE_OPTIONS, order=_tab.order,
                        starts_at_alpha0=True, requires_fn=_time_variable_requirements,
                        description=f"{_what}, adaptive per-sample steps, on the PF-ODE"))
    PF_ODE_SOLVERS += (_tab.name,)


def pf_ode_tableau(solver: str) -> ButcherTableau:
    """The Butcher tableau of the registered adaptive PF-ODE solver ``solver`` (ValueError naming them otherwise)."""
    if solver not in PF_ODE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: the PF-ODE is solved adaptively by {', '.join(PF_ODE_SOLVERS)}")
    return TABLEAUX[solver]
