"""Solvers, one module per family; every solver registers itself in ``REGISTRY`` under its ``solver=`` name."""

from . import backends, exponential, fixed, ode, sde  # noqa: F401  (imports register the solvers)
from ._core import REGISTRY, EvalCounter, FiniteGuard, NonFiniteError, Solution, SolverSpec
from .grids import GRIDS, time_grid

__all__ = ["GRIDS", "REGISTRY", "EvalCounter", "FiniteGuard", "NonFiniteError", "Solution", "SolverSpec", "time_grid"]
