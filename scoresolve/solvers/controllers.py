"""Step-size controllers as data: each maps a step's per-sample error to the factor h_new / h.

The integrator (`scoresolve.solvers.integrate`) calls ``controller.factor(err, bad, err_prev, accept, after_reject,
k)`` with ``[batch]`` tensors: the scaled error norm (accept when <= 1; inf for a non-finite candidate), whether the
candidate was non-finite, the error of the sample's previous accepted step, the accept mask, whether the previous
attempt was rejected, and k, the order of the local error estimate.

* `PIController`: PI control (Hairer & Wanner's gains by default; ``DOPRI5_GAINS`` those of Hairer's DOPRI5 code).
* `IController`: plain integral control h E^-exponent (Gotta Go Fast's rule for the adaptive SDE solver).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class PIController:
    """PI step-size control (Gustafsson 1991; Hairer & Wanner II, IV.2, eq. (2.43c); Soederlind 2002).

    With k = embedded_order + 1 (the order of the local error estimate) and err <= 1 meaning "accept":

        accepted:  h_new = h * clamp(safety * err^(-beta1/k) * err_prev^(beta2/k), factor_min, factor_max)
        rejected:  h_new = h * clamp(safety * err^(-1/k), factor_min, 1)        (plain I control)

    err_prev is the error of the previous accepted step, floored at ``err_floor`` (1 before the first one), as
    in Hairer's DOPRI5. Right after a rejection the step is not allowed to grow (factor <= 1, also DOPRI5).
    Defaults: safety 0.9, beta1 = 0.7, beta2 = 0.4 (Hairer & Wanner's recommended PI gains 0.7/k, 0.4/k), factor
    in [0.2, 10], err_floor 1e-4. beta2 = 0 gives the classic I controller (torchdiffeq, scipy).
    `scoresolve.solvers.ode.DOPRI5_GAINS` are the gains of Hairer's DOPRI5 code.
    """

    safety: float = 0.9
    beta1: float = 0.7
    beta2: float = 0.4
    factor_min: float = 0.2
    factor_max: float = 10.0
    err_floor: float = 1e-4

    def __post_init__(self) -> None:
        if not (0 < self.safety <= 1):
            raise ValueError(f"safety must lie in (0, 1], got {self.safety}")
        if not (0 < self.factor_min < 1 < self.factor_max):
            raise ValueError(f"need 0 < factor_min < 1 < factor_max, got {self.factor_min}, {self.factor_max}")
        if self.beta1 <= 0 or self.beta2 < 0:
            raise ValueError(f"need beta1 > 0 and beta2 >= 0, got {self.beta1}, {self.beta2}")

    def factor(self, err: torch.Tensor, bad: torch.Tensor, err_prev: torch.Tensor, accept: torch.Tensor,
               after_reject: torch.Tensor, k: int) -> torch.Tensor:
        """Per-sample factor h_new / h from the error of this step (``[batch]``, inf for a non-finite one)."""
        e = err.clamp_min(1e-10)
        acc = self.safety * e.pow(-self.beta1 / k) * err_prev.pow(self.beta2 / k)
        acc = acc.clamp(self.factor_min, self.factor_max)
        acc = torch.where(after_reject, acc.clamp_max(1.0), acc)
        rej = (self.safety * e.pow(-1.0 / k)).clamp(self.factor_min, 1.0)
        return torch.where(accept, acc, rej)


DOPRI5_GAINS = PIController(beta1=0.85, beta2=0.2)
"""The PI gains of Hairer's DOPRI5 code (its beta = 0.04): h_new = h 0.9 err^-0.17 err_prev^0.04 for k = 5.

The default gains (0.7, 0.4) settle at an error ratio err ~ 0.17 (0.9 err^-(0.7-0.4)/k = 1), these at ~0.45, i.e.
at steps ~20% longer. `log_likelihood` uses them by default: on the digits U-Net's likelihood (float32, rtol 1e-5)
the default gains cost 1.3x the NFE for no error that float32 resolves, and at matched error in float64 they are
no better (`python benchmarks/likelihood_cost.py --controllers PI DOPRI5`). At loose tolerances they let steps grow
faster: a 3-D Gaussian PF-ODE at rtol 1e-3 ends 63x the tolerance off in 4 steps, against 12x with the default."""


@dataclass(frozen=True)
class IController:
    """Integral control without clamps: h_new = h * safety * err^(-exponent), and h / ``nonfinite_shrink`` after a
    non-finite candidate. Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast") use safety 0.9, exponent 0.9 for their
    adaptive SDE solver (`scoresolve.solvers.stochastic.adaptive_sde`'s default). ``exponent=None`` takes 1/k."""

    safety: float = 0.9
    exponent: float | None = 0.9
    nonfinite_shrink: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.safety <= 1) or not (self.exponent is None or self.exponent > 0):
            raise ValueError(f"need 0 < safety <= 1 and exponent > 0, got {self.safety}, {self.exponent}")
        if not self.nonfinite_shrink > 1:
            raise ValueError(f"nonfinite_shrink must be > 1, got {self.nonfinite_shrink}")

    def factor(self, err: torch.Tensor, bad: torch.Tensor, err_prev: torch.Tensor, accept: torch.Tensor,
               after_reject: torch.Tensor, k: int) -> torch.Tensor:
        """Per-sample factor h_new / h."""
        p = 1.0 / k if self.exponent is None else self.exponent
        fac = self.safety * err.clamp(min=1e-10).pow(-p)
        return torch.where(bad, torch.full_like(err, 1.0 / self.nonfinite_shrink), fac)


Controller = Union[PIController, IController]
