"""Solvers, one module per family; every solver registers itself in ``REGISTRY`` under its ``solver=`` name.

Layout: `_registry` (entries, options, the counting wrap), `_solution` (the result type), `_grid` (the one
fixed-grid run), `integrate` (the one adaptive loop), `tableaux` and `controllers` (methods and step-size rules as
data), `noise` (generators, per-sample seeds, Brownian memory), and the step functions: `fixed` (Euler, Heun, RK4),
`exponential` (DDIM, DPM-Solver), `multistep` (DPM-Solver++, UniPC), `stochastic` (EM, ancestral, PC, adaptive SDE),
`ode` (the one PF-ODE solve path, adaptive RK on the PF-ODE), `backends` (torchdiffeq, torchsde), `time_grids` (time
grids), `grid_store` (saved tuned grids).
"""

from . import adams, backends, exponential, fixed, multistep, ode, stochastic  # noqa: F401  (imports register the solvers)
from ._registry import REGISTRY, AdaptiveSolver, EvalCounter, GridSolver, SolverSpec
from ._solution import Solution
from .controllers import DOPRI5_GAINS, IController, PIController
from .errors import MaxStepsError, NonFiniteError, NonFiniteStepError, StepSizeUnderflowError
from .integrate import integrate
from .ode import odeint_adaptive
from .tableaux import TABLEAUX, ButcherTableau
from .time_grids import GRIDS, time_grid

__all__ = [
    "AdaptiveSolver", "DOPRI5_GAINS", "GRIDS", "GridSolver", "REGISTRY", "TABLEAUX", "ButcherTableau", "EvalCounter",
    "IController",
    "MaxStepsError", "NonFiniteError", "NonFiniteStepError", "PIController", "Solution", "SolverSpec",
    "StepSizeUnderflowError", "integrate", "odeint_adaptive", "time_grid",
]
