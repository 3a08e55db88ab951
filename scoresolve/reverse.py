"""The family of reverse-time processes that share the forward SDE's marginals (Fokker-Planck relation), and the
time variables their ODE member can be integrated in.

For any s(t) >= 0 the process run from T down to 0

    dx = [f(x, t) - (g(t)^2 + s(t)^2)/2 * score(x, t)] dt + s(t) dw_bar        (Song et al. 2021, App. D.1)

has marginals p_t. s = g is the reverse SDE (Anderson 1982), s = 0 the probability-flow ODE. ``drift`` and
``diffusion`` are the coefficients of this equation with dt < 0: an Euler-Maruyama step from t to t - h reads
x - h drift(x, t) + s(t) sqrt(h) z.

The drift is linear in x plus a multiple of the score, drift = f(t) x - c(t) score with c = (g^2 + s^2)/2, so the
divergence of the probability-flow drift v = f x - g^2/2 score is D f(t) - g^2/2 div score: the linear part is
exact (`ReverseProcess.linear_divergence`), only the score's divergence needs an estimator.

Time variables (`TimeVariable`): the ODE dx/dt = v may be integrated in another variable u(t), dx/du = v dt/du.
``"t"`` is t itself; ``"logsnr"`` is lambda = log(alpha/sigma), with dt/dlambda = -2 sigma^2 / g^2, which spreads
the steps evenly over the noise levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Union

import torch

from ._utils import Time, bcast, check_batched

if TYPE_CHECKING:  # typing only: sde.py imports this module, not the other way round
    from .sde import ForwardSDE

Diffusion = Union[float, Callable[[torch.Tensor], torch.Tensor]]
TimeName = Literal["t", "logsnr"]
TIME_VARIABLES = ("t", "logsnr")


@dataclass(frozen=True)
class ReverseProcess:
    """A member of the same-marginal reverse family of ``sde`` with score ``score(x, t)``.

    ``diffusion_scale`` sets s(t): a float c gives s = c g(t) (1: reverse SDE, 0: probability-flow ODE), a callable
    ``s(t)`` gives it directly (it must be >= 0). [`diffusion`][scoresolve.ReverseProcess.diffusion] is then s(t).
    """

    sde: "ForwardSDE"
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    diffusion_scale: Diffusion = 1.0

    def __post_init__(self) -> None:
        if not callable(self.diffusion_scale):
            c = float(self.diffusion_scale)
            if not c >= 0:
                raise ValueError(f"diffusion scale must be >= 0, got {c}")

    @property
    def is_ode(self) -> bool:
        """True for the probability-flow ODE (s = 0)."""
        return not callable(self.diffusion_scale) and float(self.diffusion_scale) == 0.0

    @property
    def constant_scale(self) -> float | None:
        """The constant c of s = c g, or None for a time-dependent s(t) given as a callable."""
        return None if callable(self.diffusion_scale) else float(self.diffusion_scale)

    def with_score(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "ReverseProcess":
        """The same member of the family with another score callable (e.g. a counted copy of the network)."""
        return ReverseProcess(self.sde, score, self.diffusion_scale)

    def s2(self, t: Time) -> torch.Tensor:
        """s(t)^2."""
        if callable(self.diffusion_scale):
            return self.diffusion_scale(self.sde.as_time(t)) ** 2
        return float(self.diffusion_scale) ** 2 * self.sde.g2(t)

    def diffusion(self, t: Time) -> torch.Tensor:
        """s(t), the noise coefficient of the reverse-time process."""
        return torch.sqrt(self.s2(t))

    def score_coef(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """c(t) = (g^2 + s^2)/2, the factor of the score in drift = f x - c score (``check``: t's range, for g^2)."""
        if not callable(self.diffusion_scale) and float(self.diffusion_scale) == 0.0:
            return 0.5 * self.sde.g2(t, check=check)  # the probability-flow ODE: s = 0 (one schedule evaluation less)
        return 0.5 * (self.sde.g2(t, check=check) + self.s2(t))

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """f(x, t) - (g^2 + s^2)/2 score(x, t); ``t`` a float, 0-d or ``[batch]`` tensor."""
        check_batched(x)
        t = self.sde.as_time(t, like=x, batch=x.shape[0])
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.drift_at(x, tb)

    def drift_at(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The drift at ``[batch]`` times ``t`` (x's dtype; unchecked, for solvers) with one score evaluation.

        On a process with ``velocity_form`` (interpolants, where f and g^2 diverge at alpha = 0) the probability-flow
        part f x - g^2/2 score is taken as the model's flow prediction alpha' x0 + sigma' eps, finite there:
        drift = flow - s^2/2 score.
        """
        predict_many = getattr(self.score, "predict_many", None)
        if not (self.sde.velocity_form and predict_many is not None):
            return self.drift_from_score(x, t, self.score(x, t))
        if self.is_ode:
            return predict_many(x, t, ("flow",))[0]
        flow, score = predict_many(x, t, ("flow", "score"))
        return flow - bcast(0.5 * self.s2(t), x) * score

    def drift_from_score(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The drift f(t) x - (g^2 + s^2)/2 score given an already evaluated score (``t`` a tensor in x's dtype)."""
        return bcast(self.sde.f(t), x) * x - bcast(self.score_coef(t), x) * score

    def linear_divergence(self, t: torch.Tensor, num_dims: int) -> torch.Tensor:
        """D f(t), the exact divergence of the linear part f(t) x of the drift (D = ``num_dims``)."""
        return num_dims * self.sde.f(t)


@dataclass(frozen=True)
class TimeVariable:
    """A variable u(t) to integrate the probability-flow ODE in: dx/du = v(x, t(u)) dt/du.

    ``name`` is ``"t"`` (u = t) or ``"logsnr"`` (u = lambda(t), decreasing in t). ``t_min`` clamps t(u) from below
    (the log-SNR inverse can round a hair outside the span).
    """

    sde: "ForwardSDE"
    name: TimeName = "t"
    t_min: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in TIME_VARIABLES:
            raise ValueError(f"time_variable must be one of {TIME_VARIABLES}, got {self.name!r}")

    def u(self, t: float) -> float:
        """u at the time t (a float, on the host)."""
        if self.name == "t":
            return float(t)
        return float(self.sde.log_snr(torch.tensor(float(t), dtype=torch.float64)))

    def t(self, u: torch.Tensor) -> torch.Tensor:
        """t at u (a tensor)."""
        if self.name == "t":
            return u
        return self.sde.t_from_log_snr(u).clamp(min=self.t_min, max=self.sde.T)

    def t_host(self, u: list[float]) -> list[float]:
        """t at host values of u (for error messages)."""
        if self.name == "t":
            return list(u)
        return self.sde.t_from_log_snr(torch.tensor(u, dtype=torch.float64)).tolist()

    def dt_du(self, t: torch.Tensor) -> torch.Tensor:
        """dt/du at t: 1, or 1/(dlambda/dt) = -2 sigma^2 / g^2."""
        if self.name == "t":
            return torch.ones_like(t)
        return -2 * self.sde.sigma(t) ** 2 / self.sde.g2(t)
