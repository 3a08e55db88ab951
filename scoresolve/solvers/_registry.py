"""Solver names -> registry entries, the one options convention, and the one counting wrap of the score.

Every registered solver is called the same way, ``spec(process, x, ts, **keywords)``: ``ts`` is the decreasing time
grid of a `GridSolver`, or the span ``[t0, t1]`` of an `AdaptiveSolver`. A grid solver is one step function plus its
entry (`scoresolve.solvers._grid` runs the grid); an adaptive one is a run function around the one integrator
(`scoresolve.solvers.integrate`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..process import Process, check_capabilities
from ..reverse import ReverseProcess
from ._base import REGISTRY, EvalCounter, alpha0_solvers, check_start, counted, require_ode  # noqa: F401 (re-exported)
from ._grid import run_grid
from ._solution import Solution


def check_options(name: str, unknown: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise one TypeError for the ``unknown`` options of solver ``name``, listing the ``accepted`` ones."""
    unknown = sorted(unknown)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise TypeError(f"solver {name!r} got unknown option(s) {unknown}; its options: {takes}")


@dataclass(frozen=True)
class SolverSpec:
    """Registry entry of a solver: what every solver states. Two types: `GridSolver` (runs on a decreasing time grid)
    and `AdaptiveSolver` (chooses its own steps from rtol/atol); ``SolverSpec(name, step=...)`` builds the first,
    ``SolverSpec(name, run=...)`` the second.

    ``options`` maps the solver's options to their defaults; ``prepare(process, options, steps)`` checks their values
    and returns them resolved (e.g. an ``eta`` read from the process's diffusion scale). ``default_diffusion`` is the
    s(t)/g(t) that ``sample()`` uses when the caller gives none (1 for the SDE samplers). ``stochastic`` solvers take
    a ``generator`` or per-sample ``seeds``; if ``noise_option`` names an option (``eta`` for ddim) they draw noise
    only when it is > 0 (see `draws_noise`). ``starts_at_alpha0``: the method can start where alpha = 0 (log-SNR =
    -inf, t = 1 of rectified flow) from a model that predicts x0 there (flow, x0 or v; see `check_start`).
    ``required_options``: options without which the solver cannot run (the calibrated sampler's ``calibration``):
    generic runs over every solver (``scoresolve compare --best``) skip it. ``requires``: the process capabilities
    the method needs (`scoresolve.process.CAPABILITIES`, e.g.
    ``gaussian_kernel`` for the exponential integrators); ``requires_fn(options)`` adds those of options (the
    options are the caller's merged over the defaults). A run that draws noise (`draws_noise`) or has diffusion > 0
    also requires ``reverse_sde``; see `requirements`.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[ReverseProcess, dict, int], dict] | None = None
    order: float = 1.0
    stochastic: bool = False
    description: str = ""
    noise_option: str | None = None
    default_diffusion: float = 0.0
    starts_at_alpha0: bool = False
    requires: frozenset[str] = frozenset()
    requires_fn: Callable[[Mapping[str, Any]], Iterable[str]] | None = None
    required_options: tuple[str, ...] = ()

    def __new__(cls, *args: Any, **keywords: Any) -> SolverSpec:
        if cls is SolverSpec:  # the base names no run: the type follows from step= or run=
            if ("step" in keywords) == ("run" in keywords):
                raise TypeError("SolverSpec(...) needs exactly one of step= (a GridSolver) or run= (an AdaptiveSolver)")
            cls = GridSolver if "step" in keywords else AdaptiveSolver
        return super().__new__(cls)

    def __call__(self, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **keywords: Any) -> Solution:
        """Solve ``process`` from ``x`` over ``ts`` (the grid, or the span [t0, t1] of an adaptive solver)."""
        raise NotImplementedError

    @property
    def fn(self) -> Callable[..., Solution]:
        """The solver as a function ``fn(process, x, ts, **keywords)`` (the same as calling the entry)."""
        return functools.partial(type(self).__call__, self)

    def accepted_options(self) -> tuple[str, ...]:
        """The options ``sample(..., **options)`` may pass to this solver, sorted."""
        names = set(self.options) | ({"seeds"} if self.stochastic else set())
        return tuple(sorted(names))

    def check_options(self, options: Mapping[str, object]) -> None:
        """TypeError naming the options this solver does not take (and the ones it does), or a switch (an option
        whose default is True or False) given anything but a bool (a truthy string would turn it on unseen)."""
        accepted = self.accepted_options()
        check_options(self.name, [k for k in options if k not in accepted], accepted)
        for k, v in options.items():
            if isinstance(self.options.get(k), bool) and not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"option {k!r} of solver {self.name!r} must be True or False, got {v!r}")

    def resolve(self, process: ReverseProcess, options: Mapping[str, Any], steps: int = 0) -> dict:
        """The options with their defaults filled in, checked (unknown names: TypeError) and resolved."""
        self.check_options(options)
        opts = {**self.options, **{k: bool(v) if isinstance(v, np.bool_) else v for k, v in options.items()
                                   if k != "seeds"}}
        return self.prepare(process, opts, steps) if self.prepare is not None else opts

    def requirements(self, options: Mapping[str, Any] | None = None, diffusion: Any = None) -> frozenset[str]:
        """The process capabilities a run with these options and this s(t) (None: the solver's default diffusion;
        a float c for s = c g, or a callable) requires."""
        opts = {**self.options, **(options or {})}
        need = set(self.requires)
        if self.requires_fn is not None:
            need |= set(self.requires_fn(opts))
        diffusion = self.default_diffusion if diffusion is None else diffusion
        if callable(diffusion) or float(diffusion) != 0.0 or self.draws_noise(opts):
            need.add("reverse_sde")
        return frozenset(need)

    def check_process(self, sde: Process, options: Mapping[str, Any] | None = None, diffusion: Any = None) -> None:
        """`IncompatibleProcessError` naming the capability ``sde`` lacks for this run and the solvers that fit."""
        check_capabilities(f"solver {self.name!r}", sde, self.requirements(options, diffusion),
                           lambda: fitting_solvers(sde))

    def draws_noise(self, options: Mapping[str, Any]) -> bool:
        """Whether a run with these options is random (its result depends on the generator)."""
        if not self.stochastic:
            return False
        return self.noise_option is None or float(options.get(self.noise_option, 0.0) or 0.0) > 0


@dataclass(frozen=True)
class GridSolver(SolverSpec):
    """A solver on a decreasing time grid (fixed-step RK, exponential, multistep and SDE samplers): one step function
    ``step(run, x, i)`` (see `scoresolve.solvers._grid`, which runs the grid).

    ``evals_per_step`` and ``extra_evals`` give the NFE of a solve: nfe = evals_per_step * steps + extra_evals (this
    is how an ``nfe`` budget becomes a step count); ``evals_per_step_fn(options)`` overrides it where it depends on
    options. ``min_steps`` is the fewest steps the method accepts, ``default_grid`` the grid used when the caller
    gives none.
    """

    step: Callable[..., torch.Tensor] | None = None
    evals_per_step: int = 1
    extra_evals: int = 0
    min_steps: int = 1
    default_grid: str = "uniform"
    evals_per_step_fn: Callable[[Mapping[str, Any]], int] | None = None

    def __post_init__(self) -> None:
        if self.step is None:
            raise ValueError(f"grid solver {self.name!r} needs a step function (step=)")

    def __call__(self, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **keywords: Any) -> Solution:
        """Solve ``process`` from ``x`` at ts[0] over the decreasing grid ``ts``."""
        return run_grid(self, process, x, ts, **keywords)

    def evals(self, options: Mapping[str, Any] | None = None) -> int:
        """Score evaluations per step with these options (e.g. pc: 1 + corrector_steps)."""
        if self.evals_per_step_fn is not None:
            return int(self.evals_per_step_fn({**self.options, **(options or {})}))
        return self.evals_per_step

    def extra(self, options: Mapping[str, Any] | None = None) -> int:
        """Evaluations beyond evals_per_step * steps: ``extra_evals``, one fewer with the analytical first step."""
        return self.extra_evals - (1 if (options or {}).get("afs") else 0)

    def steps_for_nfe(self, nfe: int, options: Mapping[str, Any] | None = None) -> int:
        per, extra = self.evals(options), self.extra(options)
        steps = (int(nfe) - extra) // per
        if steps < self.min_steps:
            need = self.min_steps * per + extra
            raise ValueError(f"solver {self.name!r} needs at least nfe={need}, got nfe={nfe}")
        return steps

    def nfe_for_steps(self, steps: int, options: Mapping[str, Any] | None = None) -> int:
        return self.evals(options) * steps + self.extra(options)


@dataclass(frozen=True)
class AdaptiveSolver(SolverSpec):
    """A solver that chooses its own steps from rtol/atol (the adaptive PF-ODE solvers of `scoresolve.solvers.ode`,
    ``adaptive_sde``): ``run(spec, process, x, span, **keywords)`` solves over the span [t0, t1].
    ``evals_per_step`` is the score evaluations per attempted step (informational: the NFE is counted)."""

    run: Callable[..., Solution] | None = None
    evals_per_step: int = 1

    def __post_init__(self) -> None:
        if self.run is None:
            raise ValueError(f"adaptive solver {self.name!r} needs a run function (run=)")

    def __call__(self, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **keywords: Any) -> Solution:
        """Solve ``process`` from ``x`` over the span ``ts`` = [t0, t1]."""
        assert self.run is not None
        return self.run(self, process, x, ts, **keywords)


GAUSSIAN_KERNEL = frozenset({"gaussian_kernel"})
"""``requires`` of the solvers built on x_t = alpha x_0 + sigma z (eps / x0 predictions, log-SNR steps)."""



def register(spec: SolverSpec) -> SolverSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"solver {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def fitting_solvers(sde: Process) -> list[str]:
    """The registered solvers whose default run (default options and diffusion) ``sde`` has the capabilities for."""
    return sorted(name for name, spec in REGISTRY.items() if not sde.missing(spec.requirements()))


def __getattr__(name: str) -> Any:
    if name == "ALPHA0_SOLVERS":  # derived from the registry, so a newly registered solver is in it
        return alpha0_solvers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
