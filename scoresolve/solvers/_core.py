"""What every solver shares: the Solution type, score-evaluation counting, the non-finite guard, the registry."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch

from .._utils import bcast, check_batched

Count = Union[int, torch.Tensor]


@dataclass
class Solution:
    """Result of a solve.

    Attributes:
        x: state at the final time (``[batch, ...]``), or the Tweedie-denoised estimate with ``denoise=True``.
        nfe: exact number of score-network evaluations per sample: an int, or a ``[batch]`` tensor for
            per-sample adaptive solvers.
        steps: accepted steps (int or ``[batch]``).
        rejected: rejected steps (int or ``[batch]``).
        t: final time per sample, ``[batch]``.
        ts: times of the saved trajectory (``[n]``, or ``[n, batch]`` for per-sample times), if requested.
        xs: saved states ``[n, batch, ...]``, if requested.
        solver: the solver's name.
        stats: anything else a solver reports (e.g. the time grid used).
    """

    x: torch.Tensor
    nfe: Count
    steps: Count
    rejected: Count = 0
    t: torch.Tensor | None = None
    ts: torch.Tensor | None = None
    xs: torch.Tensor | None = None
    solver: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


class EvalCounter:
    """Wraps a score function and counts its (batched) calls; ``calls`` is the NFE of every sample in it."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


class NonFiniteError(FloatingPointError):
    """A solver met NaN or Inf. ``indices`` are the affected samples, ``times`` the time each first went bad,
    ``last_finite`` the last finite state of the whole batch (finite rows for every sample)."""

    def __init__(self, solver: str, indices: list[int], times: list[float], last_finite: torch.Tensor) -> None:
        self.solver, self.indices, self.times, self.last_finite = solver, indices, times, last_finite
        shown = ", ".join(f"{i} (t={t:.6g})" for i, t in list(zip(indices, times))[:10])
        more = "" if len(indices) <= 10 else f" and {len(indices) - 10} more"
        super().__init__(
            f"solver {solver!r}: non-finite values (NaN/Inf) in {len(indices)} sample(s): {shown}{more}; "
            "the score network or the state became non-finite. The last finite state is on .last_finite"
        )


class FiniteGuard:
    """Tracks, without host-device synchronisation, when each sample first turns non-finite.

    Call `update` after each step with the new state and its time; `check` once at the end raises
    [`NonFiniteError`][scoresolve.NonFiniteError] if any sample went bad. ``last`` holds the last finite state of every
    sample.
    """

    def __init__(self, x: torch.Tensor, solver: str) -> None:
        self.solver = solver
        self.last = x.detach().clone()
        self.bad_t = torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)

    def ok(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x).flatten(1).all(1)

    def update(self, x: torch.Tensor, t: torch.Tensor | float) -> None:
        ok = self.ok(x)
        good_before = torch.isnan(self.bad_t)
        t = torch.as_tensor(t, dtype=self.bad_t.dtype, device=self.bad_t.device).expand_as(self.bad_t)
        self.bad_t = torch.where(good_before & ~ok, t, self.bad_t)
        keep = good_before & ok
        self.last = torch.where(bcast(keep, x), x.detach(), self.last)

    def check(self) -> None:
        bad = ~torch.isnan(self.bad_t)
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            raise NonFiniteError(self.solver, idx, self.bad_t[bad].tolist(), self.last)


# keyword arguments that sample() passes to a solver itself (they are not the caller's options)
SET_BY_SAMPLE = frozenset({"callback", "save_trajectory", "generator", "rtol", "atol"})


def check_options(name: str, unknown: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise one TypeError for the ``unknown`` options of solver ``name``, listing the ``accepted`` ones."""
    unknown = sorted(unknown)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise TypeError(f"solver {name!r} got unknown option(s) {unknown}; its options: {takes}")


@dataclass(frozen=True)
class SolverSpec:
    """Registry entry.

    kind: ``"grid"`` (runs on a decreasing time grid ``ts``: fixed-step, exponential and SDE samplers) or
    ``"adaptive"`` (chooses its own steps from rtol/atol). ``evals_per_step`` and ``extra_evals`` give the NFE
    of a grid solve: nfe = evals_per_step * steps + extra_evals (this is how an ``nfe`` budget becomes a step
    count). ``min_steps`` is the fewest steps the method accepts. ``default_grid`` names the grid used when the
    caller gives none. ``default_diffusion`` is the s(t)/g(t) that ``sample()`` uses when the caller gives none (1 for
    the SDE samplers). ``evals_per_step_fn(options)`` overrides ``evals_per_step`` where it depends on options.
    ``stochastic`` solvers take a ``generator``; if ``noise_option`` names an option (``eta``
    for ddim), they draw noise only when that option is > 0 (see `draws_noise`). ``options`` names the keyword
    options the solver takes beyond what ``sample()`` passes itself; None reads them from the keyword-only
    parameters of ``fn`` (see `accepted_options`).
    """

    name: str
    fn: Callable[..., Solution]
    kind: str = "grid"
    evals_per_step: int = 1
    extra_evals: int = 0
    min_steps: int = 1
    default_grid: str = "uniform"
    order: float = 1.0
    stochastic: bool = False
    description: str = ""
    noise_option: str | None = None
    default_diffusion: float = 0.0
    evals_per_step_fn: Callable[[dict[str, Any]], int] | None = None
    options: tuple[str, ...] | None = None

    def accepted_options(self) -> tuple[str, ...]:
        """The options ``sample(..., **options)`` may pass to this solver, sorted."""
        if self.options is not None:
            return tuple(sorted(self.options))
        params = inspect.signature(self.fn).parameters.values()
        return tuple(sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in SET_BY_SAMPLE))

    def check_options(self, options: Mapping[str, object]) -> None:
        """TypeError naming the options this solver does not take (and the ones it does)."""
        accepted = self.accepted_options()
        check_options(self.name, [k for k in options if k not in accepted], accepted)

    def evals(self, options: dict[str, Any] | None = None) -> int:
        """Score evaluations per step with these options (e.g. pc: 1 + corrector_steps)."""
        if self.evals_per_step_fn is not None:
            return int(self.evals_per_step_fn(options or {}))
        return self.evals_per_step

    def draws_noise(self, options: dict[str, Any]) -> bool:
        """Whether a run with these options is random (its result depends on the generator)."""
        if not self.stochastic:
            return False
        return self.noise_option is None or float(options.get(self.noise_option, 0.0)) > 0

    def steps_for_nfe(self, nfe: int, options: dict[str, Any] | None = None) -> int:
        per = self.evals(options)
        steps = (int(nfe) - self.extra_evals) // per
        if steps < self.min_steps:
            need = self.min_steps * per + self.extra_evals
            raise ValueError(f"solver {self.name!r} needs at least nfe={need}, got nfe={nfe}")
        return steps

    def nfe_for_steps(self, steps: int, options: dict[str, Any] | None = None) -> int:
        return self.evals(options) * steps + self.extra_evals


REGISTRY: dict[str, SolverSpec] = {}


def register(spec: SolverSpec) -> SolverSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"solver {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def check_grid(ts: torch.Tensor, T: float) -> torch.Tensor:
    """Validate a time grid: 1-D, at least 2 points, strictly decreasing, inside (0, T]."""
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"a time grid must be a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}")
    tc = ts.detach().cpu()
    if not bool(torch.isfinite(tc).all()):
        raise ValueError("the time grid contains non-finite values")
    if not bool((tc[1:] < tc[:-1]).all()):
        raise ValueError(f"the time grid must be strictly decreasing (from T towards t_eps), got {tc[:6].tolist()}...")
    if float(tc[-1]) <= 0 or float(tc[0]) > T * (1 + 1e-6):
        raise ValueError(f"the time grid must lie in (0, T] = (0, {T}], got [{float(tc[-1])}, {float(tc[0])}]")
    return ts


def counted_model(process: Any) -> tuple[Any, EvalCounter]:
    """A copy of the process's ScoreModel whose network calls are counted; returns (model, counter).

    Solvers call the network only through this model, so ``counter.calls`` is their exact NFE.
    """
    import copy

    from ..score import ScoreModel

    model = copy.copy(ScoreModel.wrap(process.score, process.sde))
    counter = EvalCounter(model.net)
    model.net = counter
    return model, counter


def with_score(process: Any, score: Any) -> Any:
    """The same member of the reverse family with another score callable."""
    from ..reverse import ReverseProcess

    return ReverseProcess(process.sde, score, process.diffusion_scale)


def batch_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar time as a ``[batch]`` tensor in x's dtype/device (no copy of data)."""
    return t.to(dtype=x.dtype, device=x.device).expand(x.shape[0])


class Trajectory:
    """Optional trajectory recorder used by grid solvers."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.ts: list[torch.Tensor] = []
        self.xs: list[torch.Tensor] = []

    def add(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if self.enabled:
            self.ts.append(t.detach().clone())
            self.xs.append(x.detach().clone())

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.enabled:
            return None, None
        return torch.stack(self.ts), torch.stack(self.xs)


class GridRun:
    """Bookkeeping every solver on a time grid shares: the counted model (and the process using it), one host
    float64 copy of the validated grid (``t``: Python floats, so step coefficients need no device sync), the
    network times ``ts``, the non-finite guard, the trajectory and the callback. Call `done` after step i and
    `solution` at the end."""

    def __init__(self, name: str, process: Any, x: torch.Tensor, ts: torch.Tensor,
                 callback: Callable | None = None, save_trajectory: bool = False) -> None:
        check_batched(x)
        self.name, self.process, self.sde, self.callback = name, process, process.sde, callback
        self.model, self.counter = counted_model(process)
        self.proc = with_score(process, self.model)
        self.t64 = check_grid(ts.detach().to("cpu", torch.float64), self.sde.T)  # the one host copy of the grid
        self.t = self.t64.tolist()
        self.steps = len(self.t) - 1
        self.ts = ts.to(dtype=x.dtype, device=x.device)  # network times
        self.guard, self.traj = FiniteGuard(x, name), Trajectory(save_trajectory)
        self.traj.add(self.ts[0], x)

    def time(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Grid time i as a ``[batch]`` tensor."""
        return batch_t(self.ts[i], x)

    def done(self, i: int, x: torch.Tensor) -> None:
        """Record the state after step i (from ts[i] to ts[i + 1])."""
        self.guard.update(x, self.ts[i + 1])
        self.traj.add(self.ts[i + 1], x)
        if self.callback is not None:
            self.callback(i, self.ts[i + 1], x)

    def solution(self, x: torch.Tensor, **stats: Any) -> Solution:
        self.guard.check()
        tr_ts, tr_xs = self.traj.result()
        return Solution(x=x, nfe=self.counter.calls, steps=self.steps, t=batch_t(self.ts[-1], x), ts=tr_ts,
                        xs=tr_xs, solver=self.name, stats=stats)
