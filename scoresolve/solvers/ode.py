"""Adaptive embedded Runge-Kutta ODE solvers with per-sample error control.

Three pieces, each small (diffrax's separation at torchdiffeq's size):

* `ButcherTableau` -- a method is data: ``dopri5`` (Dormand-Prince 5(4)), ``tsit5`` (Tsitouras 5(4)),
  ``bosh3`` (Bogacki-Shampine 3(2)); all three are FSAL.
* `PIController` -- the step-size controller (Hairer/Soederlind PI control, constants documented there).
* `odeint_adaptive` -- one generic stepper. Every sample of the batch has its own time, step size, error and
  step counts: the vector field is called once per stage on the whole batch with a ``[batch]`` time vector, and
  samples that have finished are frozen (their step size is 0, so their stage inputs are their own state). A
  sample's result therefore does not depend on which other samples share its batch.

The state may be one tensor ``[batch, ...]`` or a tuple of them (e.g. ``(x, delta_logp)`` for likelihoods). The
error of a sample is the *maximum* over the tensors of the state of the RMS of err / (atol + rtol max(|y0|, |y1|)),
so a scalar log-density next to a 3072-dimensional x is controlled as tightly as x (one RMS over the concatenation
would weight it 1/3073). A candidate with NaN/Inf has error = inf: it is rejected and the step shrinks.

The loop makes no host-device synchronisation per step: the tableaux are Python floats, accept/reject is
``torch.where``, and whether every sample is done (and whether one is stuck) is read once every ``check_every``
steps.

The registered solvers ``dopri5``, ``tsit5`` and ``bosh3`` integrate the probability-flow ODE of a
[`ReverseProcess`][scoresolve.ReverseProcess] with this stepper
(``scoresolve.sample(..., solver="tsit5", rtol=..., atol=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Tuple, Union

import torch

from .._utils import bcast, check_batched
from ..reverse import ReverseProcess
from ._core import NonFiniteError, Solution, SolverSpec, check_options, counted_model, register, with_score

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
Parts = Tuple[torch.Tensor, ...]
VectorField = Callable[[torch.Tensor, State], State]
Callback = Callable[[int, torch.Tensor, State], None]

# A rejected step smaller than this fraction of the time scale max(|t0|, |t1|, |t1 - t0|) is a step-size underflow.
MIN_STEP_REL = 1e-10


# ------------------------------------------------------------------------------------------------------------------
# Tableaux
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta pair with ``s`` stages, as Python floats.

    Attributes:
        name: the method's name.
        order: order of the propagated solution (weights ``b``).
        embedded_order: order of the embedded solution (weights ``b_hat``) used only for the error estimate.
        a: strictly lower-triangular rows: ``a[i]`` holds the ``i + 1`` coefficients of stage ``i + 1``
            (stage 0 is the vector field at the start of the step), so there are ``s - 1`` rows.
        b: ``s`` weights of the solution.
        b_hat: ``s`` weights of the embedded solution; the local error estimate is h sum_j (b_j - b_hat_j) k_j.
        c: ``s`` nodes (stage times t + c_i h); c_i = sum_j a_ij for every method here.
        fsal: first same as last: the last stage is evaluated at the new solution (last row of ``a`` equals
            ``b``, ``c[-1] == 1``, ``b[-1] == 0``), so an accepted step hands its last stage to the next step.
    """

    name: str
    order: int
    embedded_order: int
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    b_hat: Tuple[float, ...]
    c: Tuple[float, ...]
    fsal: bool

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.b_hat) != s or len(self.c) != s or len(self.a) != s - 1:
            raise ValueError(f"tableau {self.name!r}: need len(b) == len(b_hat) == len(c) == len(a) + 1")
        if any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: row i of a must have i + 1 entries")
        if self.c[0] != 0.0:
            raise ValueError(f"tableau {self.name!r}: c[0] must be 0 for an explicit method")
        if self.fsal and (tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0.0 or self.c[-1] != 1.0):
            raise ValueError(f"tableau {self.name!r}: FSAL needs a[-1] == b[:-1], b[-1] == 0 and c[-1] == 1")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def b_err(self) -> Tuple[float, ...]:
        """Error weights b - b_hat (the local error estimate is h sum_j b_err_j k_j)."""
        return tuple(bi - bh for bi, bh in zip(self.b, self.b_hat))


DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    embedded_order=4,
    a=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_hat=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    fsal=True,
)
"""Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner I, Table II.5.2): 7 stages, FSAL
(6 evaluations per step), 5th-order solution (local extrapolation), 4th-order embedded method of the original
paper (as in Hairer's DOPRI5 and scipy's RK45; torchdiffeq uses Shampine's alternative embedded weights)."""

DOPRI5_SHAMPINE = ButcherTableau(
    name="dopri5_shampine",
    order=5,
    embedded_order=4,
    a=DOPRI5.a,
    b=DOPRI5.b,
    b_hat=(1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60),
    c=DOPRI5.c,
    fsal=True,
)
"""Dormand-Prince 5(4) with Shampine's alternative 4th-order embedded weights (Shampine 1986, "Some practical
Runge-Kutta formulas", Math. Comp. 46; torchdiffeq's ``dopri5``): the same stages and solution as `DOPRI5`, error
weights b - b_hat exactly 2/3 of its ones, i.e. `DOPRI5` at 1.5x rtol and atol (steps ~8% longer)."""

BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    embedded_order=2,
    a=(
        (1 / 2,),
        (0.0, 3 / 4),
        (2 / 9, 1 / 3, 4 / 9),
    ),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_hat=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    fsal=True,
)
"""Bogacki-Shampine 3(2) (Bogacki & Shampine 1989; MATLAB's ode23, scipy's RK23): 4 stages, FSAL (3 evaluations
per step), 3rd-order solution, 2nd-order embedded method."""

TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    embedded_order=4,
    a=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774),
    ),
    b=(0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0),
    # b_hat = b - (b - b_hat), with the error weights of Tsitouras (2011), Table 1 (last line).
    b_hat=(
        0.09646076681806523 - 0.00178001105222577714,
        0.01 - 0.0008164344596567469,
        0.4798896504144996 + 0.007880878010261995,
        1.379008574103742 - 0.1447110071732629,
        -3.290069515436081 + 0.5823571654525552,
        2.324710524099774 - 0.45808210592918697,
        1 / 66,
    ),
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    fsal=True,
)
"""Tsitouras 5(4) (Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
assumption", Comput. Math. Appl. 62 (2011) 770-775): 7 stages, FSAL (6 evaluations per step), 5th-order solution,
4th-order embedded method; smaller error constants than Dopri5 at the same cost (the usual better default)."""

TABLEAUX = {tab.name: tab for tab in (DOPRI5, DOPRI5_SHAMPINE, TSIT5, BOSH3)}


# ------------------------------------------------------------------------------------------------------------------
# Step-size controller
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PIController:
    """PI step-size control (Gustafsson 1991; Hairer & Wanner II, IV.2, eq. (2.43c); Soederlind 2002).

    With k = embedded_order + 1 (the order of the local error estimate) and err <= 1 meaning "accept":

        accepted:  h_new = h * clamp(safety * err^(-beta1/k) * err_prev^(beta2/k), factor_min, factor_max)
        rejected:  h_new = h * clamp(safety * err^(-1/k), factor_min, 1)        (plain I control)

    err_prev is the error of the previous accepted step, floored at ``err_floor`` (1 before the first one), as
    in Hairer's DOPRI5. Right after a rejection the step is not allowed to grow (factor <= 1, also DOPRI5).
    Defaults: safety 0.9, beta1 = 0.7, beta2 = 0.4 (Hairer & Wanner's recommended PI gains 0.7/k, 0.4/k), factor
    in [0.2, 10], err_floor 1e-4. beta2 = 0 gives the classic I controller (torchdiffeq, scipy).
    `scoresolve.solvers.ode.DOPRI5_GAINS` are the gains of Hairer's DOPRI5 code.
    """

    safety: float = 0.9
    beta1: float = 0.7
    beta2: float = 0.4
    factor_min: float = 0.2
    factor_max: float = 10.0
    err_floor: float = 1e-4

    def __post_init__(self) -> None:
        if not (0 < self.safety <= 1):
            raise ValueError(f"safety must lie in (0, 1], got {self.safety}")
        if not (0 < self.factor_min < 1 < self.factor_max):
            raise ValueError(f"need 0 < factor_min < 1 < factor_max, got {self.factor_min}, {self.factor_max}")
        if self.beta1 <= 0 or self.beta2 < 0:
            raise ValueError(f"need beta1 > 0 and beta2 >= 0, got {self.beta1}, {self.beta2}")

    def factor(
        self, err: torch.Tensor, err_prev: torch.Tensor, accept: torch.Tensor, after_reject: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Per-sample factor h_new / h from the error of this step (``[batch]``, inf for a non-finite one)."""
        e = err.clamp_min(1e-10)
        acc = self.safety * e.pow(-self.beta1 / k) * err_prev.pow(self.beta2 / k)
        acc = acc.clamp(self.factor_min, self.factor_max)
        acc = torch.where(after_reject, acc.clamp_max(1.0), acc)
        rej = (self.safety * e.pow(-1.0 / k)).clamp(self.factor_min, 1.0)
        return torch.where(accept, acc, rej)


DOPRI5_GAINS = PIController(beta1=0.85, beta2=0.2)
"""The PI gains of Hairer's DOPRI5 code (its beta = 0.04): h_new = h 0.9 err^-0.17 err_prev^0.04 for k = 5.

The default gains (0.7, 0.4) settle at an error ratio err ~ 0.17 (0.9 err^-(0.7-0.4)/k = 1), these at ~0.45, i.e.
at steps ~20% longer. `log_likelihood` uses them by default: on the digits U-Net's likelihood (float32, rtol 1e-5)
the default gains cost 1.3x the NFE for no error that float32 resolves, and at matched error in float64 they are
no better (`python benchmarks/likelihood_cost.py --controllers PI DOPRI5`). At loose tolerances they let steps grow
faster: a 3-D Gaussian PF-ODE at rtol 1e-3 ends 63x the tolerance off in 4 steps, against 12x with the default."""


# ------------------------------------------------------------------------------------------------------------------
# Errors and result
# ------------------------------------------------------------------------------------------------------------------
def _describe(indices: Sequence[int], times: Sequence[float]) -> str:
    shown = ", ".join(f"{i} (t={t:.6g})" for i, t in list(zip(indices, times))[:10])
    return shown + ("" if len(indices) <= 10 else f" and {len(indices) - 10} more")


class MaxStepsError(RuntimeError):
    """``max_steps`` step attempts were made and some samples have not reached the end time.

    ``indices`` are the unfinished samples, ``times`` their current times, ``y`` the current state of the batch.
    """

    def __init__(self, method: str, max_steps: int, indices: list[int], times: list[float], y: State) -> None:
        self.method, self.max_steps, self.indices, self.times, self.y = method, max_steps, indices, times, y
        super().__init__(
            f"solver {method!r}: reached max_steps={max_steps} with {len(indices)} sample(s) unfinished: "
            f"{_describe(indices, times)}; loosen rtol/atol, raise max_steps, or check the vector field"
        )


class StepSizeUnderflowError(RuntimeError):
    """A sample kept rejecting steps until its step size fell below ``MIN_STEP_REL`` times the time scale.

    ``indices`` are the stuck samples, ``times`` their current times, ``y`` the current (accepted) state.
    """

    def __init__(self, method: str, indices: list[int], times: list[float], y: State, h_min: float) -> None:
        self.method, self.indices, self.times, self.y, self.h_min = method, indices, times, y, h_min
        super().__init__(
            f"solver {method!r}: step size underflow (|h| < {h_min:.3g}) in {len(indices)} sample(s): "
            f"{_describe(indices, times)}; the ODE is too stiff or singular there for these tolerances"
        )


class NonFiniteStepError(NonFiniteError, StepSizeUnderflowError):
    """Step-size underflow caused by non-finite (NaN/Inf) candidates: the vector field returns NaN/Inf near the
    samples' current times however small the step. Both a [`NonFiniteError`][scoresolve.NonFiniteError] (``indices``,
    ``times``, ``last_finite``: the last accepted state, finite for every sample) and a
    `StepSizeUnderflowError`."""

    def __init__(self, method: str, indices: list[int], times: list[float], y: State) -> None:
        NonFiniteError.__init__(self, method, indices, times, y)  # type: ignore[arg-type]
        self.method, self.y, self.h_min = method, y, float("nan")


@dataclass
class AdaptiveResult:
    """Result of `odeint_adaptive`.

    Attributes:
        y: state at the end time, same structure (tensor or tuple) as ``y0``.
        nfe: ``[batch]`` long, vector-field evaluations in which each sample was active (not yet finished),
            including the ones of the initial-step heuristic.
        calls: number of batched calls of the vector field (>= nfe.max()).
        stats: ``iterations`` (step attempts of the loop), ``rows`` (rows of the batch evaluated over all calls:
            ``calls * B`` without compaction) and ``compactions`` (times the working batch shrank).
        steps: ``[batch]`` long, accepted steps per sample.
        rejected: ``[batch]`` long, rejected steps per sample.
        t: ``[batch]`` final times (exactly t1), dtype of the first tensor of the state.
        ts: with ``save_trajectory``: one ``[batch]`` time vector per outer iteration (the first is t0). Samples
            advance independently, so entry n holds each sample's time after n step attempts; a sample whose
            attempt was rejected, or that had already finished, repeats its previous time and state.
        ys: with ``save_trajectory``: the states (same structure as ``y0``) matching ``ts``.
    """

    y: State
    nfe: torch.Tensor
    calls: int
    steps: torch.Tensor
    rejected: torch.Tensor
    t: torch.Tensor
    ts: list | None = None
    ys: list | None = None
    stats: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# State helpers (a state is handled internally as a tuple of tensors)
# ------------------------------------------------------------------------------------------------------------------
def _as_parts(y: State, what: str) -> Tuple[Parts, bool]:
    single = torch.is_tensor(y)
    parts = (y,) if single else tuple(y)
    if not parts:
        raise ValueError(f"{what} must be a tensor or a non-empty tuple of tensors")
    for p in parts:
        if not torch.is_tensor(p):
            raise TypeError(f"{what} must be a tensor or a tuple of tensors, got an element {type(p).__name__}")
    return parts, single


def _axpy(y: Parts, h: Parts, coeffs: Sequence[float], ks: Sequence[Parts]) -> Parts:
    """y + h * sum_j coeffs_j k_j for each part (h broadcast per sample); zero coefficients are skipped."""
    out = []
    for p, (yp, hp) in enumerate(zip(y, h)):
        acc = None
        for cj, kj in zip(coeffs, ks):
            if cj != 0.0:
                term = kj[p] * cj
                acc = term if acc is None else acc + term
        out.append(yp if acc is None else yp + hp * acc)
    return tuple(out)


def _rms_norm(parts: Parts, scale_ref: Parts, rtol: float, atol: float, tdtype: torch.dtype) -> torch.Tensor:
    """Per-sample max over parts of RMS(v / (atol + rtol |ref|)), in ``tdtype``."""
    norms = []
    for v, r in zip(parts, scale_ref):
        q = v / (atol + rtol * r.abs())
        n = q.abs() if q.ndim == 1 else q.square().flatten(1).mean(1).sqrt()
        norms.append(n.to(tdtype))
    return torch.stack(norms).amax(0) if len(norms) > 1 else norms[0]


def _error_norm(err: Parts, y0: Parts, y1: Parts, rtol: float, atol: float, tdtype: torch.dtype):
    """(error norm, candidate non-finite) per sample; the norm is inf where the candidate is non-finite."""
    norms, bad = [], None
    for e, a, b in zip(err, y0, y1):
        q = e / (atol + rtol * torch.maximum(a.abs(), b.abs()))
        n = q.abs() if q.ndim == 1 else q.square().flatten(1).mean(1).sqrt()
        ok = torch.isfinite(b) & torch.isfinite(e)
        ok = ok if ok.ndim == 1 else ok.flatten(1).all(1)
        bad = ~ok if bad is None else bad | ~ok
        norms.append(n.to(tdtype))
    norm = torch.stack(norms).amax(0) if len(norms) > 1 else norms[0]
    norm = torch.where(bad | torch.isnan(norm), torch.full_like(norm, math.inf), norm)
    return norm, bad


# ------------------------------------------------------------------------------------------------------------------
# The integrator
# ------------------------------------------------------------------------------------------------------------------
def odeint_adaptive(
    func: VectorField,
    y0: State,
    t0: float,
    t1: float,
    *,
    method: str | ButcherTableau = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    first_step: float | None = None,
    check_every: int = 8,
    callback: Callback | None = None,
    save_trajectory: bool = False,
    name: str | None = None,
    controller: PIController | None = None,
    args: Sequence[torch.Tensor] = (),
    compact: bool = False,
) -> AdaptiveResult:
    """Integrate dy/dt = func(t, y) from t0 to t1 (either direction) with per-sample adaptive steps.

    Args:
        func: ``func(t, y) -> dy/dt`` with ``t`` a ``[batch]`` tensor (each sample's own time, in the dtype of the
            first tensor of y) and ``y`` structured like ``y0``; it must return the same structure and shapes.
            Samples that have finished are still passed (at t1, with their final state); ignore their output.
        y0: initial state: a tensor ``[batch, ...]`` or a tuple of tensors that share the batch dimension
            (``[batch]`` tensors are fine, e.g. ``(x, delta_logp)``).
        t0, t1: start and end times (floats); t1 < t0 integrates backwards.
        method: ``"dopri5"``, ``"tsit5"``, ``"bosh3"`` or a `ButcherTableau`.
        rtol, atol: relative and absolute tolerances (> 0), applied to every tensor of the state.
        max_steps: most step attempts (accepted + rejected) of any sample; then `MaxStepsError`.
        first_step: initial |h| for every sample; None uses Hairer's heuristic per sample (one extra evaluation,
            counted in ``nfe``).
        check_every: most steps between the (single) host-device synchronisations that test whether every
            sample is done or stuck; samples that finish in between are frozen at t1 (and no longer counted in
            ``nfe``, though the batched calls go on). A check comes sooner when, at its current step size, the
            slowest sample needs fewer steps to reach t1, so few calls are wasted after the last sample is done.
        callback: ``callback(i, t, y)`` called at every such check with the iteration count, the ``[batch]``
            times and the current state.
        save_trajectory: record ``ts`` / ``ys`` (see `AdaptiveResult`).
        name: name used in error messages (default: the method's name).
        controller: step-size controller (default `PIController()`).
        args: per-sample arguments of ``func``: tensors with the batch dimension first, passed as
            ``func(t, y, *args)`` (e.g. Hutchinson probes, class labels). With ``compact`` they are cut down with
            the state, so ``func`` must take everything that differs between samples from ``y`` and ``args``.
        compact: drop finished samples from the batched calls. At each check (see ``check_every``), when the
            unfinished samples fit in a smaller size of the ladder B, ceil(B/2), ceil(B/4), ..., 1, the working
            batch shrinks to that size (the unfinished samples, padded with finished ones). A sample's arithmetic
            is unchanged, so the results are those of ``compact=False`` up to the network's own batch-size
            dependence; the work ``stats["rows"]`` (rows evaluated) drops towards ``nfe.sum()``. The few fixed
            sizes keep ``torch.compile(dynamic=False)`` and CUDA graphs to at most log2(B) + 1 shapes.

    Raises:
        MaxStepsError: ``max_steps`` reached with samples unfinished.
        NonFiniteStepError: a sample's candidates stayed NaN/Inf until its step size underflowed (also a
            [`NonFiniteError`][scoresolve.NonFiniteError] and a `StepSizeUnderflowError`).
        StepSizeUnderflowError: a sample's step size underflowed for any other reason.
    """
    tab = TABLEAUX.get(method) if isinstance(method, str) else method
    if not isinstance(tab, ButcherTableau):
        raise ValueError(f"unknown adaptive method {method!r}; available: {sorted(TABLEAUX)}")
    name = name or tab.name
    ctrl = controller or PIController()
    for val, what in ((rtol, "rtol"), (atol, "atol")):
        try:
            ok = math.isfinite(float(val)) and float(val) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{what} must be a finite number > 0, got {val!r}")
    rtol, atol = float(rtol), float(atol)
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"t0 and t1 must be finite, got {t0}, {t1}")
    if int(max_steps) < 1 or int(check_every) < 1:
        raise ValueError(f"max_steps and check_every must be >= 1, got {max_steps}, {check_every}")
    max_steps, check_every = int(max_steps), int(check_every)
    if first_step is not None and not (math.isfinite(float(first_step)) and float(first_step) > 0):
        raise ValueError(f"first_step must be a finite number > 0 (its sign follows t1 - t0), got {first_step!r}")

    y, single = _as_parts(y0, "y0")
    B = y[0].shape[0] if y[0].ndim else -1
    for p in y:
        if p.ndim < 1 or p.shape[0] != B:
            got = [tuple(q.shape) for q in y]
            raise ValueError(f"every tensor of y0 needs the same batch dimension first; got shapes {got}")
        if not p.is_floating_point():
            raise TypeError(f"y0 must be floating point, got {p.dtype}")
    args = tuple(args)
    for a in args:
        if not torch.is_tensor(a) or a.ndim < 1 or a.shape[0] != B:
            got = tuple(a.shape) if torch.is_tensor(a) else type(a).__name__
            raise ValueError(f"every element of args must be a tensor with the batch dimension ({B}) first, got {got}")
    dev = y[0].device
    if not all(bool(torch.isfinite(p).all()) for p in y):
        raise ValueError("y0 contains non-finite values")
    tdtype = torch.float32 if dev.type == "mps" else torch.float64  # times and step sizes, per sample
    fdtype = y[0].dtype  # dtype of the time argument passed to func

    zeros_long = torch.zeros(B, dtype=torch.long, device=dev)
    nfe, steps, rejected = zeros_long.clone(), zeros_long.clone(), zeros_long.clone()
    t = torch.full((B,), t0, dtype=tdtype, device=dev)
    calls, rows_evaluated = 0, 0

    def pack(parts: Parts) -> State:
        return parts[0] if single else parts

    def evaluate(tt: torch.Tensor, yy: Parts, active: torch.Tensor | None) -> Parts:
        nonlocal calls, nfe, rows_evaluated
        out = func(tt.to(fdtype), pack(yy), *args)  # args: the working rows of the per-sample arguments
        calls += 1
        rows_evaluated += yy[0].shape[0]
        nfe = nfe + (1 if active is None else active.long())
        parts = (out,) if torch.is_tensor(out) else tuple(out)
        if len(parts) != len(yy) or any(not torch.is_tensor(o) or o.shape != p.shape for o, p in zip(parts, yy)):
            got = [tuple(o.shape) if torch.is_tensor(o) else type(o).__name__ for o in parts]
            raise ValueError(f"solver {name!r}: func returned {got}, expected {[tuple(p.shape) for p in yy]}")
        return tuple(o.to(p.dtype) for o, p in zip(parts, yy))

    def hvec(h: torch.Tensor) -> Parts:
        return tuple(bcast(h.to(p.dtype), p) for p in y)

    traj_t: list | None = [t.to(fdtype).clone()] if save_trajectory else None
    traj_y: list | None = [pack(tuple(p.detach().clone() for p in y))] if save_trajectory else None

    if B == 0 or t0 == t1:
        return AdaptiveResult(pack(y), nfe, calls, steps, rejected, t.to(fdtype), traj_t, traj_y)

    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    h_min = MIN_STEP_REL * max(abs(t0), abs(t1), span)
    k_ctrl = tab.embedded_order + 1

    f0 = evaluate(t, y, None)
    if first_step is not None:
        h = torch.full((B,), direction * min(float(first_step), span), dtype=tdtype, device=dev)
    else:
        h = _initial_step(evaluate, t, y, f0, direction, span, tab.order, rtol, atol, tdtype, hvec)

    a_rows, b_err, c = tab.a, tab.b_err, tab.c
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    err_prev = torch.ones(B, dtype=tdtype, device=dev)
    after_reject = torch.zeros(B, dtype=torch.bool, device=dev)
    nonfinite_recent = torch.zeros(B, dtype=torch.bool, device=dev)
    stuck = torch.zeros(B, dtype=torch.bool, device=dev)
    t_end = torch.full((B,), t1, dtype=tdtype, device=dev)

    # Batch compaction. The loop works on the rows `rows` (original sample indices; None = all B) of `full`, the
    # per-sample tensors of the whole batch; a compaction writes the working rows back and keeps a smaller set.
    n_y = len(y)
    args_full = args
    full: list | None = None
    rows: torch.Tensor | None = None
    sizes = sorted({math.ceil(B / 2**k) for k in range(max(B, 1).bit_length() + 1)})  # B, B/2, ..., 1 (ceil)
    compactions = 0

    Y = 10  # position of the state's first tensor in working(); t, done and stuck sit at 0, 2 and 6

    def working() -> list:
        return [t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected, *y,
                *(f0 if tab.fsal else ())]

    def write_back() -> list:
        """The per-sample tensors of the whole batch, current (the working rows scattered into ``full``)."""
        if rows is None:
            return working()
        for dst, src in zip(full, working()):
            dst.index_copy_(0, rows, src)
        return full

    def whole(vec: torch.Tensor, k: int) -> torch.Tensor:
        """A copy of working tensor number k of ``working()`` for the whole batch (for trajectories)."""
        return vec if rows is None else full[k].index_copy(0, rows, vec)

    # first check: as below, sooner if the initial steps would carry every sample to t1 within check_every steps
    n_est = float((span / h.abs()).amax())  # one synchronisation per solve
    it, next_check = 0, max(1, min(check_every, math.ceil(n_est) if math.isfinite(n_est) else check_every))
    while True:
        it += 1
        active = ~(done | stuck)  # stuck samples (step-size underflow) are frozen too and reported at the end
        remaining = t_end - t
        # last step: land exactly on t1 (stretching up to 1% avoids a tiny final step, as in DOPRI5)
        last = h.abs() * 1.01 >= remaining.abs()
        h_step = torch.where(active, torch.where(last, remaining, h), torch.zeros_like(h))
        t_new = torch.where(last, t_end, t + h_step)
        hp = hvec(h_step)
        if it > 1 and not tab.fsal:
            f0 = evaluate(t, y, active)
        ks = [f0]
        for s in range(1, tab.stages):
            ys = _axpy(y, hp, a_rows[s - 1], ks)
            ts = t_new if c[s] == 1.0 else t + c[s] * h_step
            ks.append(evaluate(ts, ys, active))
        y_new = ys if tab.fsal else _axpy(y, hp, tab.b, ks)
        err_est = _axpy(tuple(torch.zeros_like(p) for p in y), hp, b_err, ks)
        err, bad = _error_norm(err_est, y, y_new, rtol, atol, tdtype)

        accept = active & (err <= 1.0)
        reject = active & ~accept
        fac = ctrl.factor(err, err_prev, accept, after_reject, k_ctrl)
        h = torch.where(active, h_step * fac, h)
        err_prev = torch.where(accept, err.clamp_min(ctrl.err_floor), err_prev)
        after_reject = torch.where(active, reject, after_reject)
        nonfinite_recent = torch.where(reject, bad, nonfinite_recent)
        stuck = stuck | (reject & (h_step.abs() < h_min))
        y = tuple(torch.where(bcast(accept, p), pn, p) for p, pn in zip(y, y_new))
        if tab.fsal:
            f0 = tuple(torch.where(bcast(accept, p), kn, p) for p, kn in zip(f0, ks[-1]))
        t = torch.where(accept, t_new, t)
        steps = steps + accept.long()
        rejected = rejected + reject.long()
        done = done | (accept & last)
        if save_trajectory:
            traj_t.append(whole(t, 0).to(fdtype).clone())
            traj_y.append(pack(tuple(whole(p, Y + j).detach().clone() for j, p in enumerate(y))))

        if it >= next_check or it >= max_steps:
            # the one synchronisation: how many samples are unfinished, and how many steps the slowest one needs at
            # its current step size
            finished = done | stuck
            need = torch.where(finished, torch.zeros_like(h), (t_end - t).abs() / h.abs()).amax()
            n_active, n_est = torch.stack([(~finished).sum().to(tdtype), need]).tolist()
            n_active = int(n_active)
            # check again after at most check_every steps, sooner when every sample should finish before then
            # (calls made after the last sample has finished are wasted evaluations of the vector field)
            # (steps grow, so the estimate of the steps left runs high: check after half of it)
            next_check = it + max(1, min(check_every, math.ceil(n_est / 2) if math.isfinite(n_est) else check_every))
            if callback is not None:
                cur = write_back()  # with compaction these are buffers that later checks overwrite: pass copies
                callback(it, cur[0].to(fdtype, copy=True), pack(tuple(p.clone() for p in cur[Y : Y + n_y])))
            if n_active == 0:
                break
            if it >= max_steps:
                cur = write_back()
                unfinished = ~(cur[2] | cur[6])
                idx = unfinished.nonzero().flatten().tolist()
                raise MaxStepsError(name, max_steps, idx, cur[0][unfinished].tolist(), pack(tuple(cur[Y : Y + n_y])))
            size = next(s for s in sizes if s >= n_active)
            if compact and size < y[0].shape[0]:
                # keep the unfinished rows (in their order) and as many finished ones as pad the set to `size`
                keep = torch.argsort(finished.to(torch.int8), stable=True)[:size]
                full = write_back()
                rows = keep if rows is None else rows[keep]
                (t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected, *rest) = (
                    v.index_select(0, rows) for v in full
                )
                y = tuple(rest[:n_y])
                if tab.fsal:
                    f0 = tuple(rest[n_y:])
                args = tuple(a.index_select(0, rows) for a in args_full)
                t_end = t_end[:size]
                compactions += 1

    (t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected, *rest) = write_back()
    y = tuple(rest[:n_y])
    if not bool(done.all()):  # some samples are stuck; the others finished (their final states are in .y)
        idx = stuck.nonzero().flatten().tolist()
        times = t[stuck].tolist()
        nonfinite = nonfinite_recent[stuck].tolist()
        if any(nonfinite):
            bad_idx = [i for i, nf in zip(idx, nonfinite) if nf]
            bad_t = [ti for ti, nf in zip(times, nonfinite) if nf]
            raise NonFiniteStepError(name, bad_idx, bad_t, pack(y))
        raise StepSizeUnderflowError(name, idx, times, pack(y), h_min)

    return AdaptiveResult(pack(y), nfe, calls, steps, rejected, t.to(fdtype), traj_t, traj_y,
                          stats={"iterations": it, "rows": rows_evaluated, "compactions": compactions})


def _initial_step(evaluate, t, y, f0, direction, span, order, rtol, atol, tdtype, hvec) -> torch.Tensor:
    """Hairer, Norsett & Wanner I, II.4 ("starting step size"), per sample; one extra evaluation.

    d0 = ||y0||, d1 = ||f0||, h0 = 0.01 d0/d1 (1e-6 if either is < 1e-5); d2 = ||f(t0 + h0, y0 + h0 f0) - f0|| / h0;
    h1 = (0.01 / max(d1, d2))^(1/(order+1)) (max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15); h = min(100 h0, h1, |t1-t0|).
    Norms are the solver's: per sample, max over tensors of the RMS scaled by atol + rtol |y0|.
    """
    d0 = _rms_norm(y, y, rtol, atol, tdtype)
    d1 = _rms_norm(f0, y, rtol, atol, tdtype)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.nan_to_num(h0, nan=1e-6, posinf=1e-6).clamp(max=span)
    y1 = tuple(p + hp * fp for p, hp, fp in zip(y, hvec(direction * h0), f0))
    f1 = evaluate(t + direction * h0, y1, None)
    d2 = _rms_norm(tuple(a - b for a, b in zip(f1, f0)), y, rtol, atol, tdtype) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax).pow(1.0 / (order + 1)))
    h = torch.minimum(100 * h0, h1)
    h = torch.nan_to_num(h, nan=1e-6 * span, posinf=span).clamp(min=1e-6 * span, max=span)
    return direction * h


# ------------------------------------------------------------------------------------------------------------------
# Registered solvers: the probability-flow ODE of a ReverseProcess
# ------------------------------------------------------------------------------------------------------------------
# the options of the registered adaptive ODE solvers (passed on to odeint_adaptive)
PF_ODE_OPTIONS = ("max_steps", "first_step", "check_every", "controller", "compact")


def _solve_pf_ode(
    name: str,
    process: ReverseProcess,
    x: torch.Tensor,
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    callback: Callback | None = None,
    save_trajectory: bool = False,
    max_steps: int = 10_000,
    **options,
) -> Solution:
    check_options(name, (k for k in options if k not in PF_ODE_OPTIONS), PF_ODE_OPTIONS)
    if not process.is_ode:
        raise ValueError(f"solver {name!r} integrates the probability-flow ODE (diffusion=0); "
                         "use 'euler_maruyama' or another SDE sampler for diffusion > 0")
    check_batched(x)
    model, counter = counted_model(process)
    proc = with_score(process, model)

    def drift(t: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return proc.drift_from_score(xt, t, model(xt, t))

    res = odeint_adaptive(drift, x, float(t0), float(t1), method=name, rtol=rtol, atol=atol, max_steps=max_steps,
                          callback=callback, save_trajectory=save_trajectory, name=name, **options)
    ts = torch.stack(res.ts) if save_trajectory else None
    xs = torch.stack(res.ys) if save_trajectory else None
    return Solution(x=res.y, nfe=res.nfe, steps=res.steps, rejected=res.rejected, t=res.t, ts=ts, xs=xs,
                    solver=name, stats={"calls": res.calls, "network_calls": counter.calls, **res.stats})


def dopri5(process: ReverseProcess, x: torch.Tensor, t0: float, t1: float, **kw) -> Solution:
    """Dormand-Prince 5(4) with per-sample PI step control on the probability-flow ODE (6 NFE per step)."""
    return _solve_pf_ode("dopri5", process, x, t0, t1, **kw)


def tsit5(process: ReverseProcess, x: torch.Tensor, t0: float, t1: float, **kw) -> Solution:
    """Tsitouras 5(4) with per-sample PI step control on the probability-flow ODE (6 NFE per step)."""
    return _solve_pf_ode("tsit5", process, x, t0, t1, **kw)


def bosh3(process: ReverseProcess, x: torch.Tensor, t0: float, t1: float, **kw) -> Solution:
    """Bogacki-Shampine 3(2) with per-sample PI step control on the probability-flow ODE (3 NFE per step)."""
    return _solve_pf_ode("bosh3", process, x, t0, t1, **kw)


register(SolverSpec("dopri5", dopri5, kind="adaptive", options=PF_ODE_OPTIONS, order=5,
                    description="Dormand-Prince 5(4), adaptive per-sample steps, on the PF-ODE"))
register(SolverSpec("tsit5", tsit5, kind="adaptive", options=PF_ODE_OPTIONS, order=5,
                    description="Tsitouras 5(4), adaptive per-sample steps, on the PF-ODE"))
register(SolverSpec("bosh3", bosh3, kind="adaptive", options=PF_ODE_OPTIONS, order=3,
                    description="Bogacki-Shampine 3(2), adaptive per-sample steps, on the PF-ODE"))
