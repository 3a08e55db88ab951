"""The errors a solve can end with: non-finite values, too many steps, a step size that underflowed."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def describe(indices: Sequence[int], times: Sequence[float]) -> str:
    """``"3 (t=0.5), 7 (t=0.25) and 2 more"``: the first ten samples with their times."""
    shown = ", ".join(f"{i} (t={t:.6g})" for i, t in list(zip(indices, times))[:10])
    return shown + ("" if len(indices) <= 10 else f" and {len(indices) - 10} more")


class NonFiniteError(FloatingPointError):
    """A solver met NaN or Inf. ``indices`` are the affected samples, ``times`` the time each first went bad,
    ``last_finite`` the last finite state of the whole batch (finite rows for every sample)."""

    def __init__(self, solver: str, indices: list[int], times: list[float], last_finite: Any) -> None:
        self.solver, self.indices, self.times, self.last_finite = solver, indices, times, last_finite
        super().__init__(
            f"solver {solver!r}: non-finite values (NaN/Inf) in {len(indices)} sample(s): {describe(indices, times)}; "
            "the score network or the state became non-finite."
            + (" The last finite state is on .last_finite" if last_finite is not None else "")
        )


class MaxStepsError(RuntimeError):
    """``max_steps`` step attempts were made and some samples have not reached the end time.

    ``indices`` are the unfinished samples, ``times`` their current times, ``y`` the current state of the batch.
    """

    def __init__(self, method: str, max_steps: int, indices: list[int], times: list[float], y: Any) -> None:
        self.method, self.max_steps, self.indices, self.times, self.y = method, max_steps, indices, times, y
        super().__init__(
            f"solver {method!r}: reached max_steps={max_steps} with {len(indices)} sample(s) unfinished: "
            f"{describe(indices, times)}; loosen rtol/atol, raise max_steps, or check the vector field"
        )

    def at_times(self, times: list[float]) -> "MaxStepsError":
        """The same error with the samples' times given in another variable (e.g. t instead of log-SNR)."""
        return MaxStepsError(self.method, self.max_steps, self.indices, times, self.y)


class StepSizeUnderflowError(RuntimeError):
    """A sample kept rejecting steps until its step size fell below 1e-10 times the time scale.

    ``indices`` are the stuck samples, ``times`` their current times, ``y`` the current (accepted) state.
    """

    def __init__(self, method: str, indices: list[int], times: list[float], y: Any, h_min: float) -> None:
        self.method, self.indices, self.times, self.y, self.h_min = method, indices, times, y, h_min
        super().__init__(
            f"solver {method!r}: step size underflow (|h| < {h_min:.3g}) in {len(indices)} sample(s): "
            f"{describe(indices, times)}; the ODE is too stiff or singular there for these tolerances"
        )

    def at_times(self, times: list[float]) -> "StepSizeUnderflowError":
        """The same error with the samples' times given in another variable."""
        return StepSizeUnderflowError(self.method, self.indices, times, self.y, self.h_min)


class NonFiniteStepError(NonFiniteError, StepSizeUnderflowError):
    """Step-size underflow caused by non-finite (NaN/Inf) candidates: the vector field returns NaN/Inf near the
    samples' current times however small the step. Both a [`NonFiniteError`][scoresolve.NonFiniteError] (``indices``,
    ``times``, ``last_finite``: the last accepted state, finite for every sample) and a
    `StepSizeUnderflowError`."""

    def __init__(self, method: str, indices: list[int], times: list[float], y: Any) -> None:
        NonFiniteError.__init__(self, method, indices, times, y)
        self.method, self.y, self.h_min = method, y, float("nan")

    def at_times(self, times: list[float]) -> "NonFiniteStepError":
        return NonFiniteStepError(self.method, self.indices, times, self.y)


def first_bad(x: torch.Tensor) -> torch.Tensor:
    """``[batch]`` bool: the rows of ``x`` holding a NaN or Inf."""
    return ~torch.isfinite(x).flatten(1).all(1)
