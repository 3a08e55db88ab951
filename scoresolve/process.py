"""The process contract: what every forward process states, and the capabilities solvers may require of it.

A forward process (`scoresolve.ForwardSDE` and its subclasses, the interpolants of `scoresolve.interpolant`, and
processes with other perturbation kernels, e.g. Poisson flows) is a `Process`:

- its schedule on [0, T]: ``T`` and the noise level ``sigma(t)`` (a Gaussian process adds alpha, the log-SNR, f, g);
- its prior at T: ``prior_sample(shape)`` and ``prior_log_prob(z)`` (``[batch]``, summed over the other dims);
- its probability-flow ODE: ``probability_flow(score)``, an object whose ``drift_at(x, t)`` is dx/dt (a
  `scoresolve.ReverseProcess` with diffusion 0, or a subclass overriding ``drift_at``: the solvers that require
  nothing of the process, e.g. euler, heun, dopri5 and `log_likelihood`, use only that);
- its declared capabilities, boolean class attributes named in `CAPABILITIES`:

  ``reverse_sde``      a reverse-time SDE with the same marginals exists (stochastic samplers, ``eta > 0``,
                       ``diffusion > 0``);
  ``gaussian_kernel``  x_t = alpha(t) x_0 + sigma(t) z with z ~ N(0, I): the eps / x0 / v meanings of a prediction,
                       the log-SNR (time variable, grids), the exponential integrators, the analytical first step,
                       the Gaussian control variate;
  ``velocity_form``    the PF-ODE drift is the model's velocity (flow) prediction (f and g^2 may diverge at
                       alpha = 0, as on rectified flow);
  ``smooth_in_t``      the schedule is smooth in t (False for a discrete DDPM schedule, whose beta jumps at every
                       knot: adaptive solves then step in the log-SNR, `scoresolve.solvers.ode.choose_time_variable`).

- ``finite_log_snr_at_T``: whether the log-SNR lambda(T) is finite (alpha(T) > 0), a property of the schedule, not a
  capability a solver requires: it picks defaults (the default sampler's family, the calibration's grid coordinate).
  False where alpha(T) = 0 (rectified flow) and for a process without a Gaussian kernel (no log-SNR: Poisson flows).

A solver declares what it requires (``SolverSpec.requires``, and ``SolverSpec.requires_fn(options)`` for options
such as ``eta > 0`` or ``afs=True``); `sample` and `log_likelihood` check once, before any work, and raise
`IncompatibleProcessError` naming the missing capability and the solvers that fit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Sequence

import torch

from ._utils import Time

CAPABILITIES: tuple[str, ...] = ("reverse_sde", "gaussian_kernel", "velocity_form", "smooth_in_t")
"""The capability flags a process declares (boolean class attributes of `Process`)."""


class IncompatibleProcessError(ValueError):
    """A solver (or a `log_likelihood` option) needs a capability the process does not declare.

    ``missing`` names the capabilities, ``fitting`` the registered solvers that fit the process.
    """

    def __init__(self, what: str, process: Any, missing: Iterable[str], fitting: Sequence[str] = ()) -> None:
        self.what, self.missing, self.fitting = what, tuple(sorted(missing)), tuple(fitting)
        need = ", ".join(repr(m) for m in self.missing)
        fit = f"; solvers that fit it: {', '.join(self.fitting)}" if self.fitting else ""
        super().__init__(f"{what} requires the capability {need}, which {process!r} does not declare{fit}")


class Process(ABC):
    """Base of every forward process: the schedule, the prior and the declared capabilities (module docstring)."""

    T: float = 1.0
    reverse_sde: bool = True
    """A reverse-time SDE with the same marginals exists."""
    gaussian_kernel: bool = True
    """x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I): eps / x0 / v meanings, log-SNR, exponential integrators."""
    velocity_form: bool = False
    """The PF-ODE drift is the model's velocity prediction (f, g^2 may diverge at alpha = 0)."""
    smooth_in_t: bool = True
    """The schedule is smooth in t; False (a discrete DDPM schedule): adaptive solves step in the log-SNR."""

    @property
    def finite_log_snr_at_T(self) -> bool:
        """The log-SNR lambda(T) = log(alpha(T) / sigma(T)) is finite (alpha(T) > 0), so log-SNR grids and
        coordinates reach T. Here False: a process without a Gaussian kernel has no log-SNR (a Poisson flow; its
        `ode_view` may have one); `scoresolve.ForwardSDE` evaluates lambda(T)."""
        return False

    @abstractmethod
    def sigma(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """The noise level sigma(t); shapes follow t."""

    @abstractmethod
    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw x_T from the prior; ``shape`` includes the batch dimension."""

    @abstractmethod
    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log-density of the prior at ``z`` ``[batch, ...]``, summed over the non-batch dims: ``[batch]``."""

    @abstractmethod
    def probability_flow(self, score: Callable) -> Any:
        """The probability-flow ODE of this process with model ``score``: an object with ``drift_at(x, t)``."""

    def reverse(self, score: Callable, diffusion: Any = 1.0) -> Any:
        """The reverse-time process with noise s(t) (a float c: s = c g; 0: the probability-flow ODE). Here: only
        the probability-flow ODE; a process with ``reverse_sde`` overrides this (`scoresolve.ForwardSDE.reverse`)."""
        if callable(diffusion) or float(diffusion) != 0.0:
            check_capabilities("a reverse process with diffusion > 0", self, ("reverse_sde",))
            raise NotImplementedError(f"{type(self).__name__} declares reverse_sde but does not implement reverse()")
        return self.probability_flow(score)

    def default_time_grid(self, steps: int, t_eps: float) -> torch.Tensor | None:
        """The process's own grid of ``steps`` steps from T to ``t_eps`` (``steps + 1`` decreasing times, float64)
        for a grid solver when the caller names no grid; None (the default): the solver's registered default grid.
        `PFGMPP` returns EDM's rho = 7 grid, the reference's."""
        return None

    def ode_view(self) -> "Process | None":
        """A process declaring ``gaussian_kernel``, on the same time variable, whose probability-flow ODE written
        with the data prediction x0(x, t) is this process's; None (the default) if there is none. `sample` runs its
        default sampler on the view when this process lacks what that sampler needs and the model predicts x0
        (`PFGMPP` returns EDM's schedule, `PFGMPP.edm_view`)."""
        return None

    def capabilities(self) -> frozenset[str]:
        """The names in `CAPABILITIES` this process declares."""
        return frozenset(c for c in CAPABILITIES if getattr(self, c))

    def missing(self, required: Iterable[str]) -> frozenset[str]:
        """The capabilities of ``required`` this process does not declare."""
        unknown = set(required) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {CAPABILITIES}")
        return frozenset(required) - self.capabilities()


def check_capabilities(what: str, process: Process, required: Iterable[str],
                       fitting: Callable[[], Sequence[str]] | None = None) -> None:
    """`IncompatibleProcessError` if ``process`` lacks one of ``required``; ``fitting()`` lists the solvers that fit
    (called only on a refusal)."""
    missing = process.missing(required)
    if missing:
        raise IncompatibleProcessError(what, process, missing, fitting() if fitting is not None else ())


def check_process(process: object, name: str = "sde") -> None:
    """Raise TypeError unless ``process`` is a `scoresolve.Process` (an SDE, an interpolant, PFGM++, ...)."""
    if not isinstance(process, Process):
        raise TypeError(f"{name} must be a scoresolve process (e.g. scoresolve.VPSDE()), got {type(process).__name__}"
                        + (f" {process!r}; scoresolve.sde_from_name builds one from a name"
                           if isinstance(process, str) else ""))
