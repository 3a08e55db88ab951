"""The one result type of every solve (grid, adaptive, backends), and the trajectory recorder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

Count = Union[int, torch.Tensor]


@dataclass
class Solution:
    """Result of a solve.

    Attributes:
        x: state at the final time (``[batch, ...]``; a tuple of tensors for a tuple state, e.g. ``(x, delta_logp)``),
            or the Tweedie-denoised estimate with ``denoise=True``.
        nfe: exact number of score-network evaluations per sample: an int, or a ``[batch]`` tensor for
            per-sample adaptive solvers.
        steps: accepted steps (int or ``[batch]``).
        rejected: rejected steps (int or ``[batch]``).
        t: final time per sample, ``[batch]``.
        ts: times of the saved trajectory (``[n]``, or ``[n, batch]`` for per-sample times), if requested.
        xs: saved states ``[n, batch, ...]`` (a tuple of them for a tuple state), if requested.
        solver: the solver's name.
        stats: anything else a solver reports: ``grid`` (the time grid used), ``calls`` (batched evaluations of the
            vector field), ``network_calls``, ``iterations``, ``rows``, ``compactions``, ...
    """

    x: Any
    nfe: Count
    steps: Count
    rejected: Count = 0
    t: torch.Tensor | None = None
    ts: torch.Tensor | None = None
    xs: Any = None
    solver: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def y(self) -> Any:
        """The final state (the same as ``x``; the name ODE integrators use)."""
        return self.x

    @property
    def ys(self) -> Any:
        """The saved states (the same as ``xs``)."""
        return self.xs

    @property
    def calls(self) -> int:
        """Batched evaluations of the vector field (>= nfe.max(): finished samples ride along until a check)."""
        return int(self.stats.get("calls", self.nfe if isinstance(self.nfe, int) else int(self.nfe.max())))


class Trajectory:
    """Optional recorder of (time, state) pairs; states may be tensors or tuples of tensors."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.ts: list[torch.Tensor] = []
        self.xs: list[Any] = []

    def add(self, t: torch.Tensor, x: Any) -> None:
        if self.enabled:
            self.ts.append(t.detach().clone())
            self.xs.append(x.detach().clone() if torch.is_tensor(x) else tuple(p.detach().clone() for p in x))

    def result(self) -> tuple[torch.Tensor | None, Any]:
        if not self.enabled:
            return None, None
        if torch.is_tensor(self.xs[0]):
            return torch.stack(self.ts), torch.stack(self.xs)
        return torch.stack(self.ts), tuple(torch.stack(parts) for parts in zip(*self.xs))
