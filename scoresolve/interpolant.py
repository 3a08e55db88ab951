"""Interpolants: any pair (alpha(t), sigma(t)) as a forward process, with flow matching / rectified flow built in.

A flow-matching model (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3; Flux) is trained on
x_t = alpha(t) x0 + sigma(t) eps and predicts the velocity u = d x_t/dt = alpha'(t) x0 + sigma'(t) eps. It is the
same mathematics as a diffusion with another (alpha, sigma): the forward SDE dx = f x dt + g dw with

    f = alpha'/alpha = d log alpha/dt,    g^2 = d sigma^2/dt - 2 f sigma^2 = 2 sigma (alpha sigma' - alpha' sigma)/alpha

has these marginals, so the whole reverse family, the PF-ODE and the likelihood follow (`scoresolve.reverse`). Its
probability-flow drift f x - g^2/2 score is exactly the interpolant's velocity alpha' E[x0|x] + sigma' E[eps|x]
(the "flow" prediction of `scoresolve.ScoreModel`), which stays finite where alpha = 0 (rectified flow at t = 1,
log-SNR = -inf) although f and g^2 diverge there: processes of this module set ``velocity_form`` and the reverse
processes evaluate their drift from the flow prediction.

- `RectifiedFlow`: alpha = 1 - t, sigma = t (SD3, Flux, diffusers' FlowMatchEulerDiscreteScheduler), u = eps - x0.
- `TrigonometricInterpolant`: alpha = cos(pi t/2), sigma = sin(pi t/2) (variance preserving at every t).
- `Interpolant`: any pair of callables with their derivatives.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .sde import ForwardSDE, register_sde

TensorFn = Callable[[torch.Tensor], torch.Tensor]


class Interpolant(ForwardSDE):
    """x_t = alpha(t) x0 + sigma(t) eps on [0, T] from callables on tensors, with their derivatives.

    Args:
        alpha: alpha(t), decreasing, > 0 on [0, T) (alpha(T) = 0 is allowed: the prior is then exact).
        sigma: sigma(t), increasing, > 0 on (0, T].
        dalpha: d alpha/dt.
        dsigma: d sigma/dt.
        T: end time.
        t_from_log_snr: the inverse of lambda(t) = log(alpha/sigma), if known in closed form (default: bisection
            on [0, T], 60 halvings, vectorised).
        name: used in repr.
    The prior is N(0, sigma(T)^2 I) (exact when alpha(T) = 0). f = alpha'/alpha and g^2 are derived (module docstring).
    """

    velocity_form = True

    def __init__(self, alpha: TensorFn, sigma: TensorFn, dalpha: TensorFn, dsigma: TensorFn, T: float = 1.0,
                 t_from_log_snr: TensorFn | None = None, name: str = "Interpolant") -> None:
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a positive finite number, got {T}")
        for fname, fn in (("alpha", alpha), ("sigma", sigma), ("dalpha", dalpha), ("dsigma", dsigma)):
            if not callable(fn):
                raise TypeError(f"{fname} must be a callable of t (a tensor), got {type(fn).__name__}")
        self.T = float(T)
        self._alpha_fn, self._sigma_fn, self._dalpha_fn, self._dsigma_fn = alpha, sigma, dalpha, dsigma
        self._inverse = t_from_log_snr
        self.name = name
        self._validate()

    def _validate(self) -> None:
        t = torch.linspace(0, self.T, 65, dtype=torch.float64)
        a, s = self._alpha(t), self._sigma(t)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(s).all())):
            raise ValueError(f"{self.name}: alpha and sigma must be finite on [0, T]")
        if not (bool((a[:-1] > 0).all()) and bool((a >= 0).all()) and bool((s[1:] > 0).all())):
            raise ValueError(f"{self.name}: need alpha > 0 on [0, T), alpha(T) >= 0 and sigma > 0 on (0, T]")
        lam = torch.log(a[1:-1]) - torch.log(s[1:-1])
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError(f"{self.name}: the log-SNR log(alpha/sigma) must decrease in t")
        # the derivatives against central differences at the midpoints of the same 64 intervals (a wrong sign or
        # factor in dalpha / dsigma would otherwise give silently wrong drifts and flows)
        tm = (torch.arange(64, dtype=torch.float64) + 0.5) / 64 * self.T
        h = 1e-6 * self.T
        for name, f, df in (("alpha", self._alpha, self._dalpha), ("sigma", self._sigma, self._dsigma)):
            d = torch.as_tensor(df(tm), dtype=torch.float64).expand(tm.shape)
            fd = (f(tm + h) - f(tm - h)) / (2 * h)
            bad = ~((d - fd).abs() <= 1e-4 * float(fd.abs().max()) + 1e-3 * fd.abs() + 1e-9)
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                raise ValueError(f"{self.name}: d{name} is not the derivative of {name}: at t = {float(tm[k]):.4g} "
                                 f"d{name} gives {float(d[k]):.6g}, the difference quotient {float(fd[k]):.6g}")
        if self._inverse is not None:  # t_from_log_snr must invert the log-SNR (the grids are laid out with it)
            back = torch.as_tensor(self._inverse(lam), dtype=torch.float64).expand(lam.shape)
            off = ~((back - t[1:-1]).abs() <= 1e-6 * self.T)
            if bool(off.any()):
                k = int(off.nonzero()[0])
                raise ValueError(f"{self.name}: t_from_log_snr does not invert the log-SNR: at t = "
                                 f"{float(t[1 + k]):.6g} (log-SNR {float(lam[k]):.6g}) it gives {float(back[k]):.6g}")

    def __repr__(self) -> str:
        return f"{self.name}(T={self.T})"

    # --- the pair and its derivatives -------------------------------------------------------------------------
    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._alpha_fn(t)

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._dalpha_fn(t)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._sigma_fn(t)

    def _dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._dsigma_fn(t)

    # --- ForwardSDE's schedule, derived ------------------------------------------------------------------------
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(self._alpha(t))

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return self._dalpha(t) / self._alpha(t)  # f = d log alpha/dt (-inf where alpha = 0)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self._alpha(t), self._sigma(t)
        return 2 * s * (a * self._dsigma(t) - self._dalpha(t) * s) / a  # d sigma^2/dt - 2 f sigma^2

    def dalpha_dt(self, t, *, check: bool = True) -> torch.Tensor:
        return self._dalpha(self.as_time(t, check=check))

    def dsigma_dt(self, t, *, check: bool = True) -> torch.Tensor:
        return self._dsigma(self.as_time(t, check=check))

    def dlog_snr_dt(self, t, *, check: bool = True) -> torch.Tensor:
        t = self.as_time(t, check=check)
        return self._dalpha(t) / self._alpha(t) - self._dsigma(t) / self._sigma(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        if self._inverse is not None:
            return self._inverse(lam)
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, self.T)  # lambda decreases: lambda(lo) >= lam
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self._log_snr(mid) > lam
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    @property
    def prior_std(self) -> float:
        return float(self._sigma(torch.tensor(self.T, dtype=torch.float64)))


def _named_eq(self: Interpolant, other: object) -> bool:
    return type(other) is type(self) and other.T == self.T  # type: ignore[attr-defined]


class RectifiedFlow(Interpolant):
    """Rectified flow / flow matching with the linear path x_t = (1 - t) x0 + t eps on [0, 1] (Liu et al. 2023;
    Lipman et al. 2023's OT path with sigma_min = 0; SD3 and Flux; diffusers' flow-match schedulers with
    sigma = t).

    f = -1/(1 - t), g^2 = 2t/(1 - t), lambda = log((1 - t)/t), t = sigmoid(-lambda); the velocity is
    u = eps - x0 (``prediction="flow"``). A diffusers flow transformer takes the timestep sigma * 1000
    (``ScoreModel(..., time="scaled", num_timesteps=1000)``).
    """

    def __init__(self) -> None:
        super().__init__(_rf_alpha, _identity, _minus_one, _one, T=1.0,
                         t_from_log_snr=lambda lam: torch.sigmoid(-lam), name="RectifiedFlow")

    __eq__ = _named_eq
    __hash__ = object.__hash__

    def _log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t) - torch.log(t)


class TrigonometricInterpolant(Interpolant):
    """The trigonometric interpolant x_t = cos(pi t/2) x0 + sin(pi t/2) eps on [0, 1] (alpha^2 + sigma^2 = 1;
    the cosine path of Albergo & Vanden-Eijnden 2023 and of TrigFlow). lambda = -log tan(pi t/2)."""

    def __init__(self) -> None:
        super().__init__(_cos, _sin, _dcos, _dsin, T=1.0,
                         t_from_log_snr=lambda lam: torch.atan(torch.exp(-lam)) * (2 / math.pi),
                         name="TrigonometricInterpolant")

    __eq__ = _named_eq
    __hash__ = object.__hash__

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t >= 1, torch.zeros_like(t), torch.cos(t * (math.pi / 2)))  # cos(pi/2) = 6e-17, not 0


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _rf_alpha(t: torch.Tensor) -> torch.Tensor:
    return 1 - t


def _one(t: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(t)


def _minus_one(t: torch.Tensor) -> torch.Tensor:
    return -torch.ones_like(t)


def _cos(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t * (math.pi / 2))


def _sin(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(t * (math.pi / 2))


def _dcos(t: torch.Tensor) -> torch.Tensor:
    return -(math.pi / 2) * torch.sin(t * (math.pi / 2))


def _dsin(t: torch.Tensor) -> torch.Tensor:
    return (math.pi / 2) * torch.cos(t * (math.pi / 2))


def sd3_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23), t in [0, 1]; s > 1 moves the
    grid towards t = 1 (more steps at high noise). Flux's resolution-dependent shift is this with s = e^mu
    (`flux_shift`)."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift s = e^mu, mu linear in the image token count from ``base_shift`` at
    ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift`` defaults; for Flux's
    ``time_shift`` with exponent 1, e^mu / (e^mu + 1/t - 1) = `sd3_shift` (t, e^mu)). Pass it as ``shift=``."""
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    if not base_seq_len < max_seq_len:
        raise ValueError(f"base_seq_len must be < max_seq_len (mu is interpolated between them), got "
                         f"{base_seq_len} and {max_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(image_seq_len * m + base_shift - m * base_seq_len)


register_sde("rf", RectifiedFlow)
register_sde("trig", TrigonometricInterpolant)
