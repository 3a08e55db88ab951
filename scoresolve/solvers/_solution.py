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
        nfe: exact number of score-network evaluations per sample, always a ``[batch]`` int64 tensor (grid solvers
            and backends give every sample the same count; adaptive solvers count each sample's own). Compare with
            ``(sol.nfe == n).all()`` or read ``int(sol.nfe.max())``; ``sol.calls`` is the batched count (an int).
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

    def __post_init__(self) -> None:
        self.nfe = per_sample(self.nfe, self.x)

    def __repr__(self) -> str:
        parts = [f"solver={self.solver!r}" if self.solver else None, f"x={describe(self.x)}",
                 f"nfe={count_stats(self.nfe)}", f"steps={count_stats(self.steps)}"]
        if torch.is_tensor(self.rejected) or self.rejected:
            parts.append(f"rejected={count_stats(self.rejected)}")
        if self.t is not None:
            parts.append(f"t={count_stats(self.t)}")
        if self.xs is not None:
            parts.append(f"xs={describe(self.xs)}")
        if "calls" in self.stats:
            parts.append(f"calls={self.stats['calls']}")
        return f"Solution({', '.join(p for p in parts if p)})"

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
        if "calls" in self.stats:
            return int(self.stats["calls"])
        return int(self.nfe.max()) if self.nfe.numel() else 0


def batch_size(x: Any) -> int:
    """The batch size of a state (a tensor, or a tuple of tensors sharing dimension 0)."""
    first = x if torch.is_tensor(x) else x[0]
    return int(first.shape[0]) if first.ndim else 1


def per_sample(count: Count, x: Any) -> torch.Tensor:
    """A count as a ``[batch]`` int64 tensor (an int or a 0-d tensor is given to every sample)."""
    if torch.is_tensor(count) and count.ndim == 1:
        return count.long() if count.dtype != torch.long else count
    first = x if torch.is_tensor(x) else x[0]
    return torch.full((batch_size(x),), int(count), dtype=torch.long, device=first.device)


def describe(x: Any) -> str:
    """``Tensor[16, 2] float32`` (a tuple of them for a tuple state)."""
    if torch.is_tensor(x):
        dt = str(x.dtype).replace("torch.", "")
        return f"Tensor[{', '.join(map(str, x.shape))}] {dt}" + ("" if x.device.type == "cpu" else f" {x.device}")
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(p) for p in x) + ")"
    return type(x).__name__


def count_stats(c: Any) -> str:
    """A per-sample count or time in a few characters: ``20`` when all equal, else ``mean 31.5 [24, 40]``."""
    if not torch.is_tensor(c):
        return repr(c)
    if c.numel() == 0:
        return "[]"
    v = c.detach().double().flatten()
    lo, hi = float(v.min()), float(v.max())
    fmt = (lambda z: f"{z:.0f}") if not c.is_floating_point() else (lambda z: f"{z:.4g}")
    if lo == hi:
        return fmt(lo)
    return f"mean {float(v.mean()):.4g} [{fmt(lo)}, {fmt(hi)}]"


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
