"""The one per-sample adaptive integrator: ODE sampling, the adaptive SDE solver and log-likelihoods all run here.

Three pieces, each small (diffrax's separation at torchdiffeq's size):

* a **stepper** proposes a step and its scaled error: `RKStepper` for an embedded Runge-Kutta pair
  (`scoresolve.solvers.tableaux`), the stochastic improved-Euler pair of `scoresolve.solvers.stochastic` for SDEs;
* a **controller** (`scoresolve.solvers.controllers`) turns the error into the next step size;
* `integrate` runs the loop: every sample of the batch has its own time, step size, error and step counts; the
  vector field is called once per stage on the whole batch with a ``[batch]`` time vector, and samples that have
  finished are frozen (their step is 0, so their stage inputs are their own state). A sample's result therefore
  does not depend on which other samples share its batch.

The state may be one tensor ``[batch, ...]`` or a tuple of them (e.g. ``(x, delta_logp)`` for likelihoods). A
candidate with NaN/Inf has error = inf: it is rejected and the step shrinks. The last step lands exactly on t1 (a step
within 1% of the remaining span is stretched to it, as in DOPRI5).

No host-device synchronisation per step: coefficients are Python floats, accept/reject is ``torch.where``, and
whether every sample is done (and whether one is stuck) is read once every ``check_every`` steps (8 on an
accelerator; on the CPU, where a read is free, after every step), sooner when the slowest sample should finish before
then.

Stepper protocol (per-sample tensors batch first; ``carry`` is the stepper's own per-sample state, e.g. the FSAL
stage, which the integrator compacts with the rest):

    order: int                                  order of the local error estimate (the controller's k)
    start(t, y, evaluate) -> carry
    initial_step(t, y, carry, evaluate, direction, span) -> signed [batch] step
    attempt(t, h, t_new, y, carry, evaluate, active, attempts, first) -> (y_new, err, bad, trial)
    commit(accept, done, h, carry, trial) -> carry
    stats(carry) -> dict
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence, Tuple, Union

import torch

from .._utils import bcast, check_cadence, check_count
from ._solution import Solution, Trajectory
from .controllers import Controller, PIController
from .errors import MaxStepsError, NonFiniteStepError, StepSizeUnderflowError
from .tableaux import TABLEAUX, ButcherTableau

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
Parts = Tuple[torch.Tensor, ...]
VectorField = Callable[..., State]
Callback = Callable[[int, torch.Tensor, State], None]

CHECK_EVERY = 8
"""Most steps between the adaptive loop's termination checks on an accelerator (`integrate`'s ``check_every=None``)."""

MIN_STEP_REL = 1e-10
"""A rejected step smaller than this fraction of the time scale max(|t0|, |t1|, |t1 - t0|) is a step-size underflow."""


# ------------------------------------------------------------------------------------------------------------------
# norms and the embedded Runge-Kutta stepper
# ------------------------------------------------------------------------------------------------------------------
def as_parts(y: State, what: str) -> Tuple[Parts, bool]:
    """(the state as a tuple of tensors, whether it was a single tensor)."""
    single = torch.is_tensor(y)
    parts = (y,) if single else tuple(y)
    if not parts:
        raise ValueError(f"{what} must be a tensor or a non-empty tuple of tensors")
    for p in parts:
        if not torch.is_tensor(p):
            raise TypeError(f"{what} must be a tensor or a tuple of tensors, got an element {type(p).__name__}")
    return parts, single


def axpy(y: Parts, h: Parts, coeffs: Sequence[float], ks: Sequence[Parts]) -> Parts:
    """y + h * sum_j coeffs_j k_j for each part (h broadcast per sample); zero coefficients are skipped."""
    out = []
    for p, (yp, hp) in enumerate(zip(y, h)):
        acc = None
        for cj, kj in zip(coeffs, ks):
            if cj != 0.0:  # acc is a fresh tensor: accumulate in place, one fused multiply-add per stage
                acc = kj[p] * cj if acc is None else acc.add_(kj[p], alpha=cj)
        out.append(yp if acc is None else torch.addcmul(yp, hp, acc))
    return tuple(out)


def rms_norm(parts: Parts, scale_ref: Parts, rtol: float, atol: float, tdtype: torch.dtype) -> torch.Tensor:
    """Per-sample max over parts of RMS(v / (atol + rtol |ref|)), in ``tdtype``."""
    norms = []
    for v, r in zip(parts, scale_ref):
        q = v / (atol + rtol * r.abs())
        n = q.abs() if q.ndim == 1 else q.square().flatten(1).mean(1).sqrt()
        norms.append(n.to(tdtype))
    return torch.stack(norms).amax(0) if len(norms) > 1 else norms[0]


def error_norm(err: Parts, y0: Parts, y1: Parts, rtol: float, atol: float, tdtype: torch.dtype):
    """(error norm, candidate non-finite) per sample: the max over the parts of the state of the RMS of
    err / (atol + rtol max(|y0|, |y1|)) (so a scalar log-density next to a 3072-dimensional x is controlled as
    tightly as x; one RMS over the concatenation would weight it 1/3073); inf where the candidate is non-finite."""
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


def check_tolerance(value: Any, what: str, allow_zero: bool = False) -> float:
    """A tolerance as a float: finite and > 0 (>= 0 with ``allow_zero``), else ValueError."""
    try:
        v = float(value)
        ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


LOW_PRECISION_FLOOR = 10.0  # tolerances below this many ulps of a 16-bit state cannot be met: the error is noise


def clamp_tolerances(stepper: Any, dtype: torch.dtype, name: str) -> None:
    """Raise a stepper's rtol/atol to 10 eps of a float16/bfloat16 state, with a warning.

    Below the dtype's precision the embedded error estimate is rounding noise and the controller shrinks the steps
    until max_steps (measured: 6-25x the NFE of a float32 solve, for no accuracy); float32 and float64 are left alone.
    """
    if dtype not in (torch.float16, torch.bfloat16) or not hasattr(stepper, "rtol"):
        return
    floor = LOW_PRECISION_FLOOR * torch.finfo(dtype).eps
    if stepper.rtol < floor or stepper.atol < floor:
        warnings.warn(f"{name}: rtol={stepper.rtol:g}, atol={stepper.atol:g} lie below the precision of a {dtype} "
                      f"state; using {floor:g} (solve in float32 for tighter tolerances)", RuntimeWarning,
                      stacklevel=3)
        stepper.rtol, stepper.atol = max(stepper.rtol, floor), max(stepper.atol, floor)


def lean_stages(tableau: ButcherTableau) -> frozenset:
    """The stages of ``tableau`` whose derivative enters neither the solution nor the error estimate (b_j = b_hat_j
    = 0; stage 0 and an FSAL last stage never qualify): a part of the state that no stage reads (a quadrature, such as
    delta log p) needs no derivative there. Dormand-Prince 5(4): stage 2 (c = 1/5) of its 7; Tsitouras 5(4),
    Bogacki-Shampine 3(2): none."""
    last = tableau.stages - 1
    return frozenset(j for j in range(1, tableau.stages)
                     if tableau.b[j] == 0.0 and tableau.b_err[j] == 0.0 and not (tableau.fsal and j == last))


class RKStepper:
    """An embedded explicit Runge-Kutta pair (any `ButcherTableau` with ``b_hat``) with the error norm of
    `error_norm` and Hairer's starting step.

    ``quadrature``: the vector field reads only the first part of the state and the other parts are integrals of it
    (``(x, delta log p)`` in `scoresolve.log_likelihood`). Their stage values are then not formed (the field gets
    their value at the step's start), and at the `lean_stages` the field is called with ``lean=True`` and may return
    zeros for them (their derivative is weighted by 0 in the solution and the error; the first part's is still needed
    by the later stages): Hutchinson's VJP is skipped at one of dopri5's six new stages per step. The results are
    those of ``quadrature=False``.
    """

    def __init__(self, tableau: ButcherTableau, rtol: float, atol: float, reuse_last_stage: bool = True,
                 quadrature: bool = False) -> None:
        if not tableau.adaptive:
            raise ValueError(f"tableau {tableau.name!r} has no embedded method: it cannot choose its own steps")
        self.tab = tableau
        self.rtol, self.atol = check_tolerance(rtol, "rtol"), check_tolerance(atol, "atol")
        self.order = tableau.embedded_order + 1
        self.b_err = tableau.b_err
        # FSAL: the last stage of an accepted step is the next step's first; not when the vector field changes
        # between steps (Hutchinson probes redrawn after every accepted step): the first stage is then evaluated anew
        self.fsal = tableau.fsal and reuse_last_stage
        self.lean_stages = lean_stages(tableau) if quadrature else frozenset()
        self.quadrature = quadrature

    def start(self, t: torch.Tensor, y: Parts, evaluate) -> Parts:
        return evaluate(t, y, None)  # f0, the first stage (FSAL: handed on from step to step)

    def initial_step(self, t, y, carry, evaluate, direction: float, span: float) -> torch.Tensor:
        """Hairer, Norsett & Wanner I, II.4 ("starting step size"), per sample; one extra evaluation.

        d0 = ||y0||, d1 = ||f0||, h0 = 0.01 d0/d1 (1e-6 if either is < 1e-5); d2 = ||f(t0 + h0, y0 + h0 f0) - f0||
        / h0; h1 = (0.01 / max(d1, d2))^(1/(order+1)) (max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15);
        h = min(100 h0, h1, |t1-t0|). Norms are the solver's: per sample, max over tensors of the RMS scaled by
        atol + rtol |y0|.
        """
        f0, tdtype, rtol, atol = carry, t.dtype, self.rtol, self.atol
        d0 = rms_norm(y, y, rtol, atol, tdtype)
        d1 = rms_norm(f0, y, rtol, atol, tdtype)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = torch.nan_to_num(h0, nan=1e-6, posinf=1e-6).clamp(max=span)
        y1 = tuple(p + bcast((direction * h0).to(p.dtype), p) * fp for p, fp in zip(y, f0))
        f1 = evaluate(t + direction * h0, y1, None)
        d2 = rms_norm(tuple(a - b for a, b in zip(f1, f0)), y, rtol, atol, tdtype) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / dmax).pow(1.0 / (self.tab.order + 1)))
        h = torch.minimum(100 * h0, h1)
        h = torch.nan_to_num(h, nan=1e-6 * span, posinf=span).clamp(min=1e-6 * span, max=span)
        return (direction * h).detach()  # step sizes are constants, also when differentiating through a solve

    def attempt(self, t, h, t_new, y: Parts, carry: Parts, evaluate, active, attempts, first: bool):
        tab = self.tab
        hp = tuple(bcast(h.to(p.dtype), p) for p in y)
        f0 = carry if (self.fsal or first) else evaluate(t, y, active)
        ks = [f0]
        ys = y
        n = 1 if self.quadrature else len(y)  # the parts the stages read (quadratures: their value at t is passed)
        for s in range(1, tab.stages):
            ys = axpy(y[:n], hp[:n], tab.a[s - 1], ks) + y[n:]
            ts = t_new if tab.c[s] == 1.0 else t + tab.c[s] * h
            ks.append(evaluate(ts, ys, active, lean=s in self.lean_stages))
        y_new = ys if tab.fsal else axpy(y, hp, tab.b, ks)
        if tab.fsal and n < len(y):  # the quadratures' solution: the b-weighted sum (an FSAL pair's last a-row)
            y_new = ys[:n] + axpy(y[n:], hp[n:], tab.b, [k[n:] for k in ks])
        err_est = axpy(tuple(torch.zeros_like(p) for p in y), hp, self.b_err, ks)
        err, bad = error_norm(err_est, y, y_new, self.rtol, self.atol, t.dtype)
        return y_new, err, bad, ks[-1]

    def commit(self, accept, done, h, carry: Parts, trial: Parts) -> Parts:
        if not self.fsal:
            return carry
        return tuple(torch.where(bcast(accept, p), kn, p) for p, kn in zip(carry, trial))

    def stats(self, carry: Parts) -> dict:
        return {}


def tableau_by_name(method: str | ButcherTableau) -> ButcherTableau:
    tab = TABLEAUX.get(method) if isinstance(method, str) else method
    if not isinstance(tab, ButcherTableau):
        raise ValueError(f"unknown adaptive method {method!r}; available: {sorted(TABLEAUX)}")
    return tab


# ------------------------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------------------------
def span_progress(desc: str, u0: float, u1: float, batch: int, user: Callback | None):
    """(callback, bar): a tqdm bar of the slowest sample's share of the span, updated at the solver's checks."""
    from tqdm.auto import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", bar_format="{l_bar}{bar}| {n}% [{elapsed}{postfix}]")

    def callback(it: int, u: torch.Tensor, state: State) -> None:
        frac = ((u.double() - u0) / (u1 - u0)).clamp(0, 1)  # read at a check, where the solver has just synchronised
        share, done = torch.stack([frac.min(), (frac >= 1).double().sum()]).tolist()
        bar.n = int(100 * share)
        bar.set_postfix_str(f"{int(done)}/{batch} done, {it} step attempts", refresh=False)
        bar.refresh()
        if user is not None:
            user(it, u, state)

    return callback, bar


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def integrate(
    stepper: Any,
    func: VectorField,
    y0: State,
    t0: float,
    t1: float,
    *,
    controller: Controller | None = None,
    max_steps: int = 10_000,
    first_step: float | None = None,
    max_step: float | None = None,
    check_every: int | None = None,
    callback: Callback | None = None,
    save_trajectory: bool = False,
    progress: bool | str = False,
    name: str = "integrate",
    args: Sequence[torch.Tensor] = (),
    compact: bool = False,
    refresh: Callable[[Tuple[torch.Tensor, ...], torch.Tensor], Tuple[torch.Tensor, ...]] | None = None,
    norms: str = "sample",
) -> Solution:
    """Integrate dy/dt = func(t, y, *args) from t0 to t1 (either direction) with per-sample adaptive steps.

    Args:
        stepper: proposes steps and their errors (`RKStepper`, or the adaptive SDE solver's stepper).
        func: ``func(t, y, *args) -> dy/dt`` with ``t`` a ``[batch]`` tensor (each sample's own time, in the dtype of
            the first tensor of y) and ``y`` structured like ``y0``; it must return the same structure and shapes.
            Samples that have finished are still passed (at t1, with their final state); ignore their output.
        y0: initial state: a tensor ``[batch, ...]`` or a tuple of tensors that share the batch dimension.
        t0: start time (a float).
        t1: end time; t1 < t0 integrates backwards.
        controller: step-size controller (default `PIController()`).
        max_steps: most step attempts (accepted + rejected) of any sample; then `MaxStepsError`.
        first_step: initial |h| for every sample; None asks the stepper (Hairer's heuristic for Runge-Kutta: one
            extra evaluation, counted in ``nfe``).
        max_step: largest |h| (None: no limit).
        check_every: most steps between the (single) host-device synchronisations that test whether every sample is
            done or stuck; samples that finish in between are frozen at t1 (and no longer counted in ``nfe``, though
            the batched calls go on). None (default): `CHECK_EVERY` (8) on an accelerator, 1 on the CPU, where
            reading a flag costs microseconds and every step past the last sample's end costs a batched call per
            stage. A check comes sooner when, at its current step size, the slowest sample needs
            fewer steps to reach t1, so few calls are wasted after the last sample is done.
        callback: ``callback(i, t, y)`` at every such check with the iteration count, the ``[batch]`` times and the
            current state.
        save_trajectory: record every iteration's ``[batch]`` times and states in ``ts`` / ``xs``. Samples advance
            independently: entry n holds each sample's time after n step attempts (a rejected or finished sample
            repeats its previous time and state).
        progress: a tqdm bar of the slowest sample's share of the span, updated at the checks (a string: the bar's
            description; default the solver's name).
        name: the solver's name in errors and in the result.
        args: per-sample arguments of ``func``: tensors with the batch dimension first (e.g. Hutchinson probes,
            class labels). With ``compact`` they are cut down with the state.
        compact: drop finished samples from the batched calls. At each check, when the unfinished samples fit in a
            smaller size of the ladder B, ceil(B/2), ceil(B/4), ..., 1, the working batch shrinks to that size (the
            unfinished samples, padded with finished ones). A sample's arithmetic is unchanged, so the results are
            those of ``compact=False`` up to the network's own batch-size dependence; the work ``stats["rows"]``
            drops towards ``nfe.sum()``. The few fixed sizes keep ``torch.compile(dynamic=False)`` and CUDA graphs
            to at most log2(B) + 1 shapes.
        refresh: ``refresh(args, accepted) -> args``, called after every step attempt with the working rows of
            ``args`` and the ``[rows]`` mask of samples whose step was accepted; it returns new per-sample arguments
            (e.g. Hutchinson probes redrawn for the accepted rows). The vector field then changes from step to step:
            give a stepper that does not hand the last stage on (``RKStepper(..., reuse_last_stage=False)``).
        norms: ``"sample"`` (default): every sample has its own steps, as above. ``"batch"``: one step size for the
            whole batch (the naming of `pc`'s ``norms``): the error of a step is the RMS over the batch of the
            per-sample errors (torchdiffeq on a tuple state takes the max over the tuple's tensors of each one's RMS
            over the batch; on likelihoods the two take the same steps but for one here and there), the first step
            the smallest of the per-sample ones, so every sample takes the same steps and finishes at the same call
            (no compaction needed; a sample's result then depends on its batch-mates). Fewer batched calls when the
            per-call cost does not grow with the batch (small models, GPUs); per-sample steps take fewer rows.

    Returns a [`Solution`][scoresolve.Solution]: ``x`` the state at t1 (structured like ``y0``), ``nfe`` ``[batch]``
    evaluations in which each sample was active, ``steps`` / ``rejected`` per sample, ``t`` the final times, and
    ``stats``: ``calls`` (batched evaluations, >= nfe.max()), ``iterations``, ``rows`` (rows evaluated over all
    calls), ``compactions``, ``h`` (each sample's last step size), and the stepper's own.

    Raises:
        MaxStepsError: ``max_steps`` reached with samples unfinished.
        NonFiniteStepError: a sample's candidates stayed NaN/Inf until its step size underflowed (also a
            [`NonFiniteError`][scoresolve.NonFiniteError] and a `StepSizeUnderflowError`).
        StepSizeUnderflowError: a sample's step size underflowed for any other reason.
    """
    if controller is not None and not callable(getattr(controller, "factor", None)):
        raise TypeError(f"controller must be a step-size controller with a factor(...) method (e.g. PIController()) "
                        f"or None, got {type(controller).__name__}")
    ctrl = controller or PIController()
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"t0 and t1 must be finite, got {t0}, {t1}")
    max_steps = check_count(max_steps, "max_steps")  # an integer >= 1, never rounded
    check_every = None if check_every is None else check_count(check_every, "check_every")
    if norms not in ("sample", "batch"):
        raise ValueError(f"norms must be 'sample' or 'batch', got {norms!r}")
    shared = norms == "batch"
    for val, what in ((first_step, "first_step"), (max_step, "max_step")):
        if val is not None and not (math.isfinite(float(val)) and float(val) > 0):
            raise ValueError(f"{what} must be a finite number > 0 (its sign follows t1 - t0), got {val!r}")

    y, single = as_parts(y0, "y0")
    check_every = int(check_every) if check_every is not None else check_cadence(y[0], CHECK_EVERY)
    B = y[0].shape[0] if y[0].ndim else -1
    for p in y:
        if p.ndim < 1 or p.shape[0] != B:
            got = [tuple(q.shape) for q in y]
            raise ValueError(f"every tensor of y0 needs the same batch dimension first; got shapes {got}")
        if not p.is_floating_point():
            raise TypeError(f"y0 must be floating point, got {p.dtype}")
    args = tuple(args)
    if refresh is not None:
        if getattr(stepper, "fsal", False):
            raise ValueError("refresh changes the vector field between steps: the stepper must not reuse its last "
                             "stage (RKStepper(..., reuse_last_stage=False))")
    for a in args:
        if not torch.is_tensor(a) or a.ndim < 1 or a.shape[0] != B:
            got = tuple(a.shape) if torch.is_tensor(a) else type(a).__name__
            raise ValueError(f"every element of args must be a tensor with the batch dimension ({B}) first, got {got}")
    dev = y[0].device
    if not all(bool(torch.isfinite(p).all()) for p in y):
        raise ValueError("y0 contains non-finite values")
    tdtype = torch.float32 if dev.type == "mps" else torch.float64  # times and step sizes, per sample
    fdtype = y[0].dtype  # dtype of the time argument passed to func
    clamp_tolerances(stepper, min((p.dtype for p in y), key=lambda d: torch.finfo(d).bits), name)

    zeros_long = torch.zeros(B, dtype=torch.long, device=dev)
    nfe, steps, rejected = zeros_long.clone(), zeros_long.clone(), zeros_long.clone()
    t = torch.full((B,), t0, dtype=tdtype, device=dev)
    calls, rows_evaluated = 0, 0

    def pack(parts: Parts) -> State:
        return parts[0] if single else parts

    def evaluate(tt: torch.Tensor, yy: Parts, active: torch.Tensor | None, lean: bool = False) -> Parts:
        nonlocal calls, nfe, rows_evaluated
        # args: the working rows of the per-sample arguments; lean: a stage at which the stepper needs only the
        # derivative of the first part (`RKStepper`'s ``quadrature``)
        out = func(tt.to(fdtype), pack(yy), *args, lean=True) if lean else func(tt.to(fdtype), pack(yy), *args)
        calls += 1
        rows_evaluated += yy[0].shape[0]
        nfe = nfe + (1 if active is None else active.long())
        parts = (out,) if torch.is_tensor(out) else tuple(out)
        if len(parts) != len(yy) or any(not torch.is_tensor(o) or o.shape != p.shape for o, p in zip(parts, yy)):
            got = [tuple(o.shape) if torch.is_tensor(o) else type(o).__name__ for o in parts]
            raise ValueError(f"solver {name!r}: func returned {got}, expected {[tuple(p.shape) for p in yy]}")
        return tuple(o.to(p.dtype) for o, p in zip(parts, yy))

    traj = Trajectory(save_trajectory)
    traj.add(t.to(fdtype), pack(y))

    def result(stats: dict) -> Solution:
        tr_ts, tr_xs = traj.result()
        return Solution(x=pack(y), nfe=nfe, steps=steps, rejected=rejected, t=t.to(fdtype), ts=tr_ts, xs=tr_xs,
                        solver=name, stats={"calls": calls, **stats})

    if B == 0 or t0 == t1:
        return result({"iterations": 0, "rows": 0, "compactions": 0})

    bar = None
    if progress:
        callback, bar = span_progress(progress if isinstance(progress, str) else name, t0, t1, B, callback)
    try:
        direction = 1.0 if t1 > t0 else -1.0
        span = abs(t1 - t0)
        h_min = MIN_STEP_REL * max(abs(t0), abs(t1), span)
        carry = tuple(stepper.start(t, y, evaluate))
        if first_step is not None:
            h = torch.full((B,), direction * min(float(first_step), span), dtype=tdtype, device=dev)
        else:
            h = stepper.initial_step(t, y, carry, evaluate, direction, span)
        if max_step is not None:
            h = h.clamp(-float(max_step), float(max_step))
        if shared:  # one step for the batch: the smallest sample's
            h = torch.full_like(h, direction) * h.abs().amin()

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
        T_, DONE, STUCK, Y = 0, 2, 6, 10  # positions in working()

        def working() -> list:
            return [t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected, *y, *carry]

        def unpack(vals: Sequence[torch.Tensor]) -> None:
            nonlocal t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected, y, carry
            (t, h, done, err_prev, after_reject, nonfinite_recent, stuck, nfe, steps, rejected) = vals[:Y]
            y, carry = tuple(vals[Y : Y + n_y]), tuple(vals[Y + n_y :])

        def write_back() -> list:
            """The per-sample tensors of the whole batch, current (the working rows scattered into ``full``)."""
            if rows is None:
                return working()
            for dst, src in zip(full, working()):
                dst.index_copy_(0, rows, src)
            return full

        def whole(vec: torch.Tensor, k: int) -> torch.Tensor:
            """A copy of working tensor number k for the whole batch (for trajectories)."""
            return vec if rows is None else full[k].index_copy(0, rows, vec)

        # first check: as below, sooner if the initial steps would carry every sample to t1 within check_every steps
        n_est = float((span / h.abs()).amax())  # one synchronisation per solve
        it, next_check = 0, max(1, min(check_every, math.ceil(n_est) if math.isfinite(n_est) else check_every))
        while True:
            it += 1
            active = ~(done | stuck)  # stuck samples (step-size underflow) are frozen too and reported at the end
            remaining = t_end - t
            last = h.abs() * 1.01 >= remaining.abs()
            h_step = torch.where(active, torch.where(last, remaining, h), torch.zeros_like(h))
            t_new = torch.where(last, t_end, t + h_step)
            y_new, err, bad, trial = stepper.attempt(t, h_step, t_new, y, carry, evaluate, active, steps + rejected,
                                                     it == 1)
            err = err.detach()  # the controller's input: no graph through step sizes (and none read on the host)
            if shared:  # the RMS over the (active) batch; a non-finite candidate anywhere rejects the whole step
                n_act = active.sum().clamp_min(1).to(err.dtype)
                rms = (torch.where(active, err, torch.zeros_like(err)).square().sum() / n_act).sqrt()
                bad = (bad & active).any().expand_as(bad)
                err = torch.where(bad, torch.full_like(err, math.inf), rms.expand_as(err))
            accept = active & (err <= 1.0)
            reject = active & ~accept
            h_next = h_step * ctrl.factor(err, bad, err_prev, accept, after_reject, stepper.order)
            if max_step is not None:
                h_next = h_next.clamp(-float(max_step), float(max_step))
            h = torch.where(active, h_next, h)
            err_prev = torch.where(accept, err.clamp_min(getattr(ctrl, "err_floor", 0.0)), err_prev)
            after_reject = torch.where(active, reject, after_reject)
            nonfinite_recent = torch.where(reject, bad, nonfinite_recent)
            stuck = stuck | (reject & (h_step.abs() < h_min))
            y = tuple(torch.where(bcast(accept, p), pn, p) for p, pn in zip(y, y_new))
            t = torch.where(accept, t_new, t)
            steps = steps + accept.long()
            rejected = rejected + reject.long()
            done = done | (accept & last)
            carry = tuple(stepper.commit(accept, done, h_step, carry, trial))
            if refresh is not None:
                args = tuple(refresh(args, accept & ~done))
            if save_trajectory:
                traj.add(whole(t, T_).to(fdtype), pack(tuple(whole(p, Y + j) for j, p in enumerate(y))))

            if it >= next_check or it >= max_steps:
                # the one synchronisation: how many samples are unfinished, and how many steps the slowest one needs
                # at its current step size
                finished = done | stuck
                need = torch.where(finished, torch.zeros_like(h), (t_end - t).abs() / h.abs()).amax()
                n_active, n_est = torch.stack([(~finished).sum().to(tdtype), need]).tolist()
                n_active = int(n_active)
                # check again after at most check_every steps, sooner when every sample should finish before then
                # (steps grow, so the estimate of the steps left runs high: check after half of it)
                wait = math.ceil(n_est / 2) if math.isfinite(n_est) else check_every
                next_check = it + max(1, min(check_every, wait))
                if callback is not None:
                    cur = write_back()  # with compaction these are buffers that later checks overwrite: pass copies
                    callback(it, cur[T_].to(fdtype, copy=True), pack(tuple(p.clone() for p in cur[Y : Y + n_y])))
                if n_active == 0:
                    break
                if it >= max_steps:
                    cur = write_back()
                    unfinished = ~(cur[DONE] | cur[STUCK])
                    idx = unfinished.nonzero().flatten().tolist()
                    raise MaxStepsError(name, max_steps, idx, cur[T_][unfinished].tolist(),
                                        pack(tuple(cur[Y : Y + n_y])))
                size = next(s for s in sizes if s >= n_active)
                if compact and size < y[0].shape[0]:
                    # keep the unfinished rows (in their order) and as many finished ones as pad the set to `size`
                    keep = torch.argsort(finished.to(torch.int8), stable=True)[:size]
                    if refresh is not None:  # the working rows' current arguments, before the rows change
                        args_full = args if rows is None else \
                            tuple(a.index_copy(0, rows, w) for a, w in zip(args_full, args))
                    full = write_back()
                    rows = keep if rows is None else rows[keep]
                    unpack([v.index_select(0, rows) for v in full])
                    args = tuple(a.index_select(0, rows) for a in args_full)
                    t_end = t_end[:size]
                    compactions += 1

        unpack(write_back())
        if not bool(done.all()):  # some samples are stuck; the others finished (their final states are in .x)
            idx = stuck.nonzero().flatten().tolist()
            times = t[stuck].tolist()
            nonfinite = nonfinite_recent[stuck].tolist()
            if any(nonfinite):
                bad_idx = [i for i, nf in zip(idx, nonfinite) if nf]
                bad_t = [ti for ti, nf in zip(times, nonfinite) if nf]
                raise NonFiniteStepError(name, bad_idx, bad_t, pack(y))
            raise StepSizeUnderflowError(name, idx, times, pack(y), h_min)
        return result({"iterations": it, "rows": rows_evaluated, "compactions": compactions, "h": h.to(fdtype),
                       **stepper.stats(carry)})
    finally:
        if bar is not None:
            bar.close()
