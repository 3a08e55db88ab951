"""Solver names -> registry entries, the one options convention, and the one counting wrap of the score.

Every registered solver is called the same way, ``spec(process, x, ts, **keywords)``: ``ts`` is the decreasing time
grid of a grid solver, or the span ``[t0, t1]`` of an adaptive one. A grid solver is one step function plus its
entry (`scoresolve.solvers._grid` runs the grid); an adaptive one is a stepper for the one integrator
(`scoresolve.solvers.integrate`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

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


SOLVER_KINDS = ("grid", "adaptive")


@dataclass(frozen=True)
class SolverSpec:
    """Registry entry of a solver.

    kind: ``"grid"`` (runs on a decreasing time grid: fixed-step, exponential and SDE samplers; ``step`` is its
    step function, see `scoresolve.solvers._grid`) or ``"adaptive"`` (chooses its own steps from rtol/atol; ``run``
    solves). ``options`` maps the solver's options to their defaults; ``prepare(process, options, steps)`` checks
    their values and returns them resolved (e.g. an ``eta`` read from the process's diffusion scale).
    ``evals_per_step`` and ``extra_evals`` give the NFE of a grid solve: nfe = evals_per_step * steps + extra_evals
    (this is how an ``nfe`` budget becomes a step count); ``evals_per_step_fn(options)`` overrides it where it
    depends on options. ``min_steps`` is the fewest steps the method accepts, ``default_grid`` the grid used when the
    caller gives none, ``default_diffusion`` the s(t)/g(t) that ``sample()`` uses when the caller gives none (1 for
    the SDE samplers). ``stochastic`` solvers take a ``generator`` or per-sample ``seeds``; if ``noise_option``
    names an option (``eta`` for ddim) they draw noise only when it is > 0 (see `draws_noise`).
    ``starts_at_alpha0``: the method can start where alpha = 0 (log-SNR = -inf, t = 1 of rectified flow) from
    a model that predicts x0 there (flow, x0 or v; see `check_start`).
    ``requires``: the process capabilities the method needs (`scoresolve.process.CAPABILITIES`, e.g.
    ``gaussian_kernel`` for the exponential integrators); ``requires_fn(options)`` adds those of options (the
    options are the caller's merged over the defaults). A run that draws noise (`draws_noise`) or has diffusion > 0
    also requires ``reverse_sde``; see `requirements`.
    """

    name: str
    kind: str = "grid"
    step: Callable[..., torch.Tensor] | None = None
    run: Callable[..., Solution] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[ReverseProcess, dict, int], dict] | None = None
    evals_per_step: int = 1
    extra_evals: int = 0
    min_steps: int = 1
    default_grid: str = "uniform"
    order: float = 1.0
    stochastic: bool = False
    description: str = ""
    noise_option: str | None = None
    default_diffusion: float = 0.0
    evals_per_step_fn: Callable[[Mapping[str, Any]], int] | None = None
    starts_at_alpha0: bool = False
    requires: frozenset[str] = frozenset()
    requires_fn: Callable[[Mapping[str, Any]], Iterable[str]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOLVER_KINDS:
            raise ValueError(f"solver {self.name!r}: kind must be one of {SOLVER_KINDS}, got {self.kind!r}")
        if (self.step if self.kind == "grid" else self.run) is None:
            need = "a step function (step=)" if self.kind == "grid" else "a run function (run=)"
            raise ValueError(f"solver {self.name!r} of kind {self.kind!r} needs {need}")

    def __call__(self, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, **keywords: Any) -> Solution:
        """Solve ``process`` from ``x`` over ``ts`` (the grid, or the span [t0, t1] of an adaptive solver)."""
        if self.kind == "grid":
            return run_grid(self, process, x, ts, **keywords)
        assert self.run is not None
        return self.run(self, process, x, ts, **keywords)

    @property
    def fn(self) -> Callable[..., Solution]:
        """The solver as a function ``fn(process, x, ts, **keywords)`` (the same as calling the entry)."""
        return functools.partial(SolverSpec.__call__, self)

    def accepted_options(self) -> tuple[str, ...]:
        """The options ``sample(..., **options)`` may pass to this solver, sorted."""
        names = set(self.options) | ({"seeds"} if self.stochastic else set())
        return tuple(sorted(names))

    def check_options(self, options: Mapping[str, object]) -> None:
        """TypeError naming the options this solver does not take (and the ones it does)."""
        accepted = self.accepted_options()
        check_options(self.name, [k for k in options if k not in accepted], accepted)

    def resolve(self, process: ReverseProcess, options: Mapping[str, Any], steps: int = 0) -> dict:
        """The options with their defaults filled in, checked (unknown names: TypeError) and resolved."""
        self.check_options(options)
        opts = {**self.options, **{k: v for k, v in options.items() if k != "seeds"}}
        return self.prepare(process, opts, steps) if self.prepare is not None else opts

    def evals(self, options: Mapping[str, Any] | None = None) -> int:
        """Score evaluations per step with these options (e.g. pc: 1 + corrector_steps)."""
        if self.evals_per_step_fn is not None:
            return int(self.evals_per_step_fn({**self.options, **(options or {})}))
        return self.evals_per_step

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
