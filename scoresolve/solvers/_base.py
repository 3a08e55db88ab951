"""The bottom of the solvers package: the registry table, the one counting wrap of the score and the checks every
solve makes (probability-flow ODE only, the start where alpha = 0). It imports no solver machinery, so that the grid
run (`scoresolve.solvers._grid`) and the registry entries (`scoresolve.solvers._registry`) both build on it without
importing each other in a circle.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..reverse import ReverseProcess
from ..score import ScoreModel

if TYPE_CHECKING:
    from ._registry import SolverSpec

REGISTRY: dict[str, "SolverSpec"] = {}
"""Solver names -> registry entries (`scoresolve.solvers._registry.SolverSpec`); filled by `register`."""


class EvalCounter:
    """Wraps a score function and counts its (batched) calls; ``calls`` is the NFE of every sample in it."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


def counted(process: ReverseProcess) -> tuple[ReverseProcess, ScoreModel, EvalCounter]:
    """(process using a counted model, that model, its counter): the one place a solve wraps the score.

    The copy of the process's [`ScoreModel`][scoresolve.ScoreModel] calls its network through the counter, so
    ``counter.calls`` is the solve's exact NFE whatever prediction (score, eps, x0) a step asks for.
    """
    model = copy.copy(ScoreModel.wrap(process.score, process.sde))
    counter = EvalCounter(model.net)
    model.net = counter
    return process.with_score(model), model, counter


def require_ode(name: str, process: ReverseProcess) -> None:
    """ValueError unless ``process`` is the probability-flow ODE (s = 0)."""
    if not process.is_ode:
        raise ValueError(f"solver {name!r} integrates the probability-flow ODE (diffusion=0); for diffusion > 0 use "
                         "'ddim' with eta > 0, 'dpmpp_2m_sde', or an SDE sampler such as 'euler_maruyama'")


def alpha0_solvers() -> tuple[str, ...]:
    """The registered solvers that can start where alpha = 0 (``SolverSpec.starts_at_alpha0``), in registry order."""
    return tuple(name for name, spec in REGISTRY.items() if spec.starts_at_alpha0)


def check_start(name: str, can_start: bool, process: ReverseProcess, model: ScoreModel, t0: float) -> None:
    """ValueError where a solve would start at a time t0 with alpha(t0) = 0 (log-SNR = -inf) and cannot.

    Only the probability-flow ODE in t (RK, adaptive) and the data-prediction exponential integrators can start
    there; and only from a model whose prediction carries x0 at alpha = 0 (flow, x0, v): a score or eps model
    equals -x / sigma or x there, whatever the data.
    """
    sde = process.sde
    if not sde.gaussian_kernel:  # alpha = 0 is a fact of a Gaussian kernel; other processes state their own start
        return
    if float(sde.alpha(torch.tensor(t0, dtype=torch.float64), check=False)) > 0:
        return
    if not can_start:
        raise ValueError(
            f"solver {name!r} cannot start at t = {t0}, where alpha = 0 (log-SNR = -inf: {sde!r} at T); use one of "
            f"{', '.join(alpha0_solvers())} (probability-flow ODE), or start below T with an explicit grid")
    if model.prediction in ("score", "eps"):
        raise ValueError(
            f"solver {name!r} starts at t = {t0}, where alpha = 0: a {model.prediction!r}-prediction model carries no "
            "information about x0 there; use a model predicting 'flow', 'x0' or 'v', or start below T with an "
            "explicit grid")
