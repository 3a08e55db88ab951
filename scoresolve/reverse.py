"""The family of reverse-time processes that share the forward SDE's marginals (Fokker-Planck relation).

For any s(t) >= 0 the process run from T down to 0

    dx = [f(x, t) - (g(t)^2 + s(t)^2)/2 * score(x, t)] dt + s(t) dw_bar        (Song et al. 2021, App. D.1)

has marginals p_t. s = g is the reverse SDE (Anderson 1982), s = 0 the probability-flow ODE.
``drift`` and ``diffusion`` are the coefficients of this equation with dt < 0: an Euler-Maruyama step from t to
t - h reads x - h drift(x, t) + s(t) sqrt(h) z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import torch

from ._utils import Time, bcast, check_batched

if TYPE_CHECKING:
    from .sde import ForwardSDE

Diffusion = Union[float, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class ReverseProcess:
    """A member of the same-marginal reverse family of ``sde`` with score ``score(x, t)``.

    ``diffusion`` is s(t): a float c gives s = c g(t) (1: reverse SDE, 0: probability-flow ODE), a callable
    ``s(t)`` gives it directly (it must be >= 0).
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

    def _s2(self, t: torch.Tensor) -> torch.Tensor:
        if callable(self.diffusion_scale):
            return self.diffusion_scale(t) ** 2
        return float(self.diffusion_scale) ** 2 * self.sde._g2(t)

    def diffusion(self, t: Time) -> torch.Tensor:
        """s(t), the noise coefficient of the reverse-time process."""
        return torch.sqrt(self._s2(self.sde._t(t)))

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """f(x, t) - (g^2 + s^2)/2 score(x, t); ``t`` a float, 0-d or ``[batch]`` tensor."""
        check_batched(x)
        t = self.sde._t(t, like=x, batch=x.shape[0])
        tb = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.drift_from_score(x, tb, self.score(x, tb))

    def drift_from_score(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The drift given an already evaluated score (no range checks; ``t`` a tensor like x's dtype)."""
        sde = self.sde
        coef = 0.5 * (sde._g2(t) + self._s2(t))
        return bcast(sde._f(t), x) * x - bcast(coef, x) * score
