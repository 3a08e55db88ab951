"""Bridges to torchdiffeq and torchsde: ``solver="torchdiffeq:<method>"`` and ``solver="torchsde:<method>"``.

* torchdiffeq integrates the probability-flow ODE dx/dt = f(x, t) - g(t)^2/2 score(x, t) from T to t_eps
  (torchdiffeq accepts a decreasing time interval). Adaptive methods (dopri5, dopri8, bosh3, fehlberg2,
  adaptive_heun, scipy_solver) take rtol/atol; fixed-grid methods (euler, midpoint, heun2, heun3, rk4, and the
  Adams methods) run on a time grid of ``steps`` steps (or the most steps an ``nfe`` budget allows).
* torchsde integrates the SDE member of the reverse family, dx = [f - (g^2 + s^2)/2 score] dt + s(t) dw_bar, with
  fixed steps. torchsde integrates forward in time and wants 2-D states, so with tau = -t (increasing from -T to
  -t_eps) it solves dy = -drift(y, -tau) dtau + s(-tau) dW_tau on y = x.reshape(batch, -1). The noise is
  additive (the noise matrix s(t) I does not depend on the state), declared as torchsde's ``"additive"`` noise
  type with a diffusion-vector product ``g_prod = s(t) v`` (never a D x D matrix); so ``srk`` is the
  strong-order-1.5 SRA1 scheme, and Ito and Stratonovich coincide, which makes the Stratonovich methods valid
  too. The Brownian motion is a ``torchsde.BrownianInterval`` whose entropy is drawn from ``generator``.

Both batch-couple the samples: torchdiffeq takes one error norm over the whole batch (all samples share a step),
and torchsde's Brownian interval is one object for the batch. NFE is counted exactly by wrapping the score model.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch

from .._utils import check_batched, check_count
from ..reverse import ReverseProcess
from ..score import ScoreModel
from ._registry import check_options, check_start, counted
from ._solution import Solution
from .errors import NonFiniteError
from .integrate import LOW_PRECISION_FLOOR, check_tolerance
from .time_grids import GRIDS, time_grid

# evaluations of the vector field per step, for turning an nfe budget into a step count
TORCHDIFFEQ_FIXED = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
TORCHDIFFEQ_FIXED_OTHER = ("explicit_adams", "implicit_adams", "fixed_adams")  # give ``steps``
TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")

# torchsde methods -> (sde_type, drift evaluations per step); reversible_heun needs the full noise matrix and
# log_ode a Levy-area approximation: left out.
TORCHSDE_METHODS = {
    "euler": ("ito", 1),
    "milstein": ("ito", 1),
    "srk": ("ito", 2),
    "heun": ("stratonovich", 2),
    "midpoint": ("stratonovich", 2),
    "euler_heun": ("stratonovich", 1),
}

DEFAULT_NFE = 20
DEFAULT_TOL = 1e-5


def _steps(solver: str, per_step: int | None, nfe: int | None, steps: int | None) -> int:
    if steps is not None:
        return check_count(steps, f"{solver}: steps")
    if per_step is None:
        raise ValueError(f"{solver}: give steps (an nfe budget cannot be converted for this method)")
    budget = DEFAULT_NFE if nfe is None else check_count(nfe, f"{solver}: nfe")
    n = budget // per_step
    if n < 1:
        raise ValueError(f"{solver} needs at least nfe={per_step}, got nfe={budget}")
    return n


def solve_with_backend(
    solver: str,
    process: ReverseProcess,
    x_T: torch.Tensor,
    T: float,
    t_eps: float,
    nfe: int | None = None,
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Solution:
    """Run ``process`` from ``x_T`` at time T down to ``t_eps`` with an external library.

    Args:
        solver: ``"torchdiffeq:<method>"`` or ``"torchsde:<method>"``.
        nfe, steps: step count of fixed-step methods (``steps`` wins; default nfe 20).
        rtol, atol: tolerances of torchdiffeq's adaptive methods (default 1e-5 each).
        generator: seeds torchsde's Brownian motion (ignored by torchdiffeq).
        options: ``grid`` (a grid name, torchdiffeq fixed-grid methods only; default ``"uniform"``); every other
            option is passed on: to torchdiffeq as its ``options`` dict (e.g. ``first_step``, ``max_num_steps``,
            ``solver`` for scipy_solver), to torchsde's ``sdeint(options=...)``.

    Returns a [`Solution`][scoresolve.Solution] with the exact NFE (``int``; the whole batch shares the steps), the
    accepted and rejected step counts, and ``stats`` naming the backend and method.
    """
    backend, sep, method = solver.partition(":")
    if not sep or not method:
        raise ValueError(f"backend solver strings look like 'torchdiffeq:dopri5' or 'torchsde:euler', got {solver!r}")
    check_batched(x_T, "x_T")
    T, t_eps = float(T), float(t_eps)
    if not (0 < t_eps < T):
        raise ValueError(f"need 0 < t_eps < T, got t_eps={t_eps}, T={T}")
    # the checks the registered solvers make, before any work
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T contains non-finite values")
    rtol = None if rtol is None else check_tolerance(rtol, f"{solver}: rtol")
    atol = None if atol is None else check_tolerance(atol, f"{solver}: atol")
    known = backend_options(backend, method)
    if known is not None:
        check_options(solver, set(options) - set(known) - {"grid"}, sorted(set(known) | {"grid"}))
    check_start(solver, backend == "torchdiffeq", process, ScoreModel.wrap(process.score, process.sde), T)
    if x_T.shape[0] == 0:  # an empty batch: nothing to integrate, as for the registered solvers
        return Solution(x=x_T.clone(), nfe=0, steps=0, rejected=0,
                        t=torch.full((0,), t_eps, dtype=x_T.dtype, device=x_T.device), solver=solver,
                        stats={"backend": backend, "method": method, "calls": 0})
    if backend == "torchdiffeq":
        return _torchdiffeq(solver, method, process, x_T, T, t_eps, nfe, steps, rtol, atol, options)
    if backend == "torchsde":
        return _torchsde(solver, method, process, x_T, T, t_eps, nfe, steps, rtol, atol, generator, options)
    raise ValueError(f"unknown backend {backend!r} in solver {solver!r}; expected 'torchdiffeq' or 'torchsde'")


_OURS = ("self", "func", "y0", "rtol", "atol")  # torchdiffeq arguments that solve_with_backend sets itself


def backend_options(backend: str, method: str) -> tuple[str, ...] | None:
    """The ``options`` a backend method reads (None for an unknown backend or method: its own error follows).

    torchdiffeq: the named arguments of the method's solver class (and its bases), read from torchdiffeq itself;
    torchsde: ``grad_free`` for milstein, nothing else (sdeint would ignore any other key)."""
    if backend == "torchdiffeq":
        from torchdiffeq._impl.odeint import SOLVERS

        cls = SOLVERS.get(method)
        if cls is None:
            return None
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names |= {p.name for p in inspect.signature(init).parameters.values()
                          if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return tuple(sorted(names - set(_OURS)))
    if backend == "torchsde":
        return ("grad_free",) if method == "milstein" else () if method in TORCHSDE_METHODS else None
    return None


def _check_finite(solver: str, out: torch.Tensor, x_T: torch.Tensor) -> None:
    """Raise NonFiniteError for samples that ended non-finite (the backends do not say when; ``last_finite`` is x_T)."""
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise NonFiniteError(solver, idx, [math.nan] * len(idx), x_T)


# ------------------------------------------------------------------------------------------------------------------
# torchdiffeq
# ------------------------------------------------------------------------------------------------------------------
class _ODEFunc:
    """dx/dt of the probability-flow ODE with torchdiffeq's step callbacks (to count steps)."""

    def __init__(self, process: ReverseProcess, x: torch.Tensor, adaptive: bool) -> None:
        self.proc, self.model, self.counter = counted(process)
        self.B = x.shape[0]
        self.steps = 0
        self.rejected = 0
        if adaptive:
            self.callback_accept_step = self._accept
            self.callback_reject_step = self._reject
        else:
            self.callback_step = self._accept

    def _accept(self, t0: Any, y0: Any, dt: Any) -> None:
        self.steps += 1

    def _reject(self, t0: Any, y0: Any, dt: Any) -> None:
        self.rejected += 1

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tb = torch.as_tensor(t, dtype=y.dtype, device=y.device).expand(self.B)
        return self.proc.drift_at(y, tb)


def _torchdiffeq(solver, method, process, x, T, t_eps, nfe, steps, rtol, atol, options) -> Solution:
    import torchdiffeq

    known = tuple(TORCHDIFFEQ_FIXED) + TORCHDIFFEQ_FIXED_OTHER + TORCHDIFFEQ_ADAPTIVE
    if method not in known:
        raise ValueError(f"unknown torchdiffeq method {method!r}; available: {sorted(known)}")
    if not process.is_ode:
        raise ValueError(f"{solver} integrates the probability-flow ODE (diffusion=0); for diffusion > 0 use "
                         "'torchsde:<method>' or an SDE sampler such as 'euler_maruyama'")
    options = dict(options)
    grid = options.pop("grid", None)
    adaptive = method in TORCHDIFFEQ_ADAPTIVE
    func = _ODEFunc(process, x, adaptive)
    tdtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # 16-bit times: steps stall
    if adaptive:
        if nfe is not None or steps is not None:
            raise ValueError(f"{solver} is adaptive: give rtol/atol, not nfe/steps")
        if grid is not None:
            raise ValueError(f"{solver} is adaptive: a grid applies to fixed-grid methods only")
        rtol = DEFAULT_TOL if rtol is None else rtol
        atol = DEFAULT_TOL if atol is None else atol
        if x.dtype in (torch.float16, torch.bfloat16):  # as the built-in adaptive solvers (clamp_tolerances)
            floor = LOW_PRECISION_FLOOR * torch.finfo(x.dtype).eps
            if rtol < floor or atol < floor:
                warnings.warn(f"{solver}: rtol={rtol:g}, atol={atol:g} lie below the precision of a {x.dtype} state; "
                              f"using {floor:g} (solve in float32 for tighter tolerances)", RuntimeWarning,
                              stacklevel=4)
                rtol, atol = max(rtol, floor), max(atol, floor)
        t = torch.tensor([T, t_eps], dtype=tdtype, device=x.device)
        # without it the RK solvers step past t_eps (even below t = 0) and interpolate back
        options.setdefault("step_t", torch.tensor([t_eps], dtype=torch.float64))
        ys = torchdiffeq.odeint(func, x, t, rtol=rtol, atol=atol, method=method, options=options or None)
        n_steps = func.steps
    else:
        if rtol is not None or atol is not None:
            raise ValueError(f"{solver} runs fixed steps: give nfe or steps, not rtol/atol")
        n_steps = _steps(solver, TORCHDIFFEQ_FIXED.get(method), nfe, steps)
        if torch.is_tensor(grid):
            raise ValueError("pass a grid name; for an explicit grid use scoresolve's own fixed-step solvers")
        kind = grid or "uniform"
        if kind not in GRIDS:
            raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}")
        t = time_grid(process.sde, n_steps, kind, t_eps, T, dtype=tdtype, device=x.device)
        ys = torchdiffeq.odeint(func, x, t, method=method, options=options or None)
    out = ys[-1]
    _check_finite(solver, out, x)
    return Solution(x=out, nfe=func.counter.calls, steps=n_steps, rejected=func.rejected,
                    t=torch.full((x.shape[0],), t_eps, dtype=x.dtype, device=x.device), solver=solver,
                    stats={"backend": "torchdiffeq", "method": method, "network_calls": func.counter.calls})


# ------------------------------------------------------------------------------------------------------------------
# torchsde
# ------------------------------------------------------------------------------------------------------------------
class _ReverseSDE(torch.nn.Module):
    """The reverse-family member in torchsde's form: time tau = -t, 2-D state, additive noise s(t) I.

    torchsde calls ``f`` once on (tau_0, y0) to check shapes before its first step, which calls ``f`` on the same
    arguments; the last result is cached so that this check costs no network evaluation.
    """

    noise_type = "additive"

    def __init__(self, process: ReverseProcess, x: torch.Tensor, sde_type: str) -> None:
        super().__init__()
        self.sde_type = sde_type
        self.proc, self.model, self.counter = counted(process)
        self.process = process
        self.shape = tuple(x.shape)
        self._cache: tuple | None = None

    def _time(self, tau: Any, y: torch.Tensor) -> torch.Tensor:
        return (-torch.as_tensor(tau, dtype=y.dtype, device=y.device)).expand(y.shape[0])

    def f(self, tau: Any, y: torch.Tensor) -> torch.Tensor:
        key = (float(tau), y.data_ptr(), y._version, y.shape)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        t = self._time(tau, y)
        xb = y.reshape(self.shape)
        out = -self.proc.drift_at(xb, t).reshape(y.shape)
        self._cache = (key, out)
        return out

    def g_prod(self, tau: Any, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """s(t) v: the noise matrix is s(t) I (additive noise), applied without forming it."""
        t = self._time(tau, y)[:1]
        return self.process.diffusion(t).to(y.dtype) * v


def _torchsde(solver, method, process, x, T, t_eps, nfe, steps, rtol, atol, generator, options) -> Solution:
    import torchsde

    if method not in TORCHSDE_METHODS:
        raise ValueError(f"unknown torchsde method {method!r}; available: {sorted(TORCHSDE_METHODS)}")
    if process.is_ode:
        raise ValueError(f"{solver} integrates an SDE but diffusion=0 (the probability-flow ODE); pass diffusion > 0 "
                         "(1 = the reverse SDE), or use 'torchdiffeq:<method>' for the ODE")
    if rtol is not None or atol is not None:
        raise ValueError(f"{solver} runs fixed steps here: give nfe or steps, not rtol/atol")
    options = dict(options)
    if options.pop("grid", None) not in (None, "uniform"):
        raise ValueError(f"{solver} steps uniformly in t; other grids are not supported")
    sde_type, per_step = TORCHSDE_METHODS[method]
    n_steps = _steps(solver, per_step, nfe, steps)
    B = x.shape[0]
    y0 = x.reshape(B, -1)
    sde = _ReverseSDE(process, x, sde_type)
    if generator is not None:
        entropy = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    else:
        entropy = int(torch.randint(0, 2**62, ()))
    ts = torch.tensor([-T, -t_eps], dtype=x.dtype, device=x.device)
    levy = "space-time" if method == "srk" else "none"
    bm = torchsde.BrownianInterval(t0=-T, t1=-t_eps, size=y0.shape, dtype=x.dtype, device=x.device,
                                   entropy=entropy, levy_area_approximation=levy)
    # a hair above (T - t_eps)/steps so that rounding never adds a tiny extra step; the last one is clipped
    dt = (T - t_eps) / n_steps * (1 + 1e-9)
    with torch.no_grad():
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=dt, options=options or None)
    out = ys[-1].reshape(x.shape)
    _check_finite(solver, out, x)
    return Solution(x=out, nfe=sde.counter.calls, steps=n_steps, t=torch.full((B,), t_eps, dtype=x.dtype,
                    device=x.device), solver=solver,
                    stats={"backend": "torchsde", "method": method, "sde_type": sde_type, "entropy": entropy,
                           "network_calls": sde.counter.calls})
