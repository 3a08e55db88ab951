"""Forward SDEs dx = f(t) x dt + g(t) dw with Gaussian marginals x_t = alpha(t) x_0 + sigma(t) z.

Every forward process here has a drift that is linear in x, so each class is described by the scalar functions
f(t) (``drift_coef``), g(t) (``diffusion``), alpha(t) and sigma(t) (``marginal``). All schedule mathematics lives
in this module; solvers only ever see these functions. References: Song et al. 2021 (VP, sub-VP, VE),
Ho et al. 2020 (discrete DDPM), Nichol & Dhariwal 2021 (cosine), Lu et al. 2022 (log-SNR, discrete interpolation),
Karras et al. 2022 (EDM).

Conventions: T is the end of the forward process; ``t`` may be a Python float, a 0-d tensor or a ``[batch]``
tensor; ``x`` has shape ``[batch, ...]``; coefficients follow t's dtype (x's dtype where x is given).
lambda(t) = log(alpha / sigma) is the (half) log-SNR of DPM-Solver.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ._utils import Time, as_time, bcast, check_batched, check_count, check_prior_arguments
from .process import Process
from .reverse import ReverseProcess

_LOG_2PI = math.log(2 * math.pi)


class ForwardSDE(Process):
    """Base class of forward diffusions dx = f(t) x dt + g(t) dw on [0, T], Gaussian marginals.

    A [`Process`][scoresolve.Process] with the capabilities ``reverse_sde`` and ``gaussian_kernel``;
    ``velocity_form``: True where f and g^2 may diverge (alpha = 0 at T, flow matching): reverse processes then take
    their drift from the model's velocity ("flow") prediction, which stays finite (`scoresolve.interpolant`);
    ``smooth_in_t``: False where f(t) and g(t) jump (a discrete DDPM schedule): adaptive solves then step in the
    log-SNR.
    """

    T: float = 1.0
    reverse_sde: ClassVar[bool] = True
    gaussian_kernel: ClassVar[bool] = True

    # --- schedule functions (subclasses implement these on tensors, with no range checking) ---------------
    @abstractmethod
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _f(self, t: torch.Tensor) -> torch.Tensor:
        """Scalar drift coefficient f(t) with f(x, t) = f(t) x."""

    @abstractmethod
    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion g(t)^2."""

    @abstractmethod
    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior N(0, prior_std^2 I) at t = T."""

    def _log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha(t) - torch.log(self._sigma(t))

    # --- public schedule API: every other module uses these (floats, 0-d or [batch] tensors) -----------
    def as_time(self, t: Time, like: torch.Tensor | None = None, batch: int | None = None, *,
                check: bool = True) -> torch.Tensor:
        """``t`` as a tensor (x's dtype/device with ``like``; a ``[batch]`` one must match ``batch``), checked to lie
        in [0, T] (on the host only: on an accelerator the check would synchronise; ``check=False`` skips it, for
        times an outside solver may have stepped a little past T)."""
        return as_time(t, self.T, like=like, batch=batch, check=check)

    def log_alpha(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """log alpha(t), the log mean coefficient of x_t = alpha x_0 + sigma z."""
        return self._log_alpha(self.as_time(t, check=check))

    def alpha(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """alpha(t), the mean coefficient of x_t = alpha x_0 + sigma z."""
        return torch.exp(self.log_alpha(t, check=check))

    def sigma(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """sigma(t), the marginal standard deviation of x_t = alpha x_0 + sigma z."""
        return self._sigma(self.as_time(t, check=check))

    def marginal(self, t: Time, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) with x_t = alpha x_0 + sigma z; shapes follow t (0-d or ``[batch]``)."""
        t = self.as_time(t, check=check)
        return torch.exp(self._log_alpha(t)), self._sigma(t)

    def log_snr(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """lambda(t) = log alpha(t) - log sigma(t) (half the log signal-to-noise ratio), decreasing in t."""
        return self._log_snr(self.as_time(t, check=check))

    @property
    def finite_log_snr_at_T(self) -> bool:
        """lambda(T) is finite in float64 (`Process.finite_log_snr_at_T`): False where alpha(T) = 0 (rectified
        flow, the trigonometric interpolant) or where the process does not declare ``gaussian_kernel``."""
        if not self.gaussian_kernel:
            return False
        return math.isfinite(float(self.log_snr(torch.tensor(float(self.T), dtype=torch.float64), check=False)))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        """Inverse of [`log_snr`][scoresolve.ForwardSDE.log_snr]."""
        lam = lam if torch.is_tensor(lam) else torch.tensor(float(lam), dtype=torch.get_default_dtype())
        return self._t_from_log_snr(lam)

    def f(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """f(t), the scalar with drift f(x, t) = f(t) x; f = d log alpha / dt."""
        return self._f(self.as_time(t, check=check))

    def drift_coef(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """f(t), the scalar with drift f(x, t) = f(t) x (the same as [`f`][scoresolve.ForwardSDE.f])."""
        return self.f(t, check=check)

    def g2(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """g(t)^2, the squared diffusion coefficient; g^2 = d sigma^2/dt - 2 f sigma^2."""
        return self._g2(self.as_time(t, check=check))

    def diffusion(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """g(t), the scalar diffusion coefficient of the forward SDE."""
        return torch.sqrt(self.g2(t, check=check))

    def dalpha_dt(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """d alpha / dt = f alpha."""
        t = self.as_time(t, check=check)
        return self._f(t) * torch.exp(self._log_alpha(t))

    def dsigma_dt(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """d sigma / dt = (g^2 + 2 f sigma^2) / (2 sigma)."""
        t = self.as_time(t, check=check)
        s = self._sigma(t)
        return (self._g2(t) + 2 * self._f(t) * s**2) / (2 * s)

    def dlog_snr_dt(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """d lambda / dt = f - (d sigma/dt)/sigma = -g^2 / (2 sigma^2) (< 0: lambda decreases in t)."""
        t = self.as_time(t, check=check)
        return -self._g2(t) / (2 * self._sigma(t) ** 2)

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """f(x, t) = f(t) x; ``x`` of shape ``[batch, ...]``."""
        check_batched(x)
        t = self.as_time(t, like=x, batch=x.shape[0])
        return bcast(self._f(t), x) * x

    def perturb(
        self,
        x0: torch.Tensor,
        t: Time,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample x_t = alpha(t) x0 + sigma(t) noise from the transition kernel p(x_t | x_0)."""
        check_batched(x0, "x0")
        t = self.as_time(t, like=x0, batch=x0.shape[0])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        alpha, sigma = torch.exp(self._log_alpha(t)), self._sigma(t)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

    def prior_sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw x_T from the prior N(0, prior_std^2 I); ``shape`` includes the batch dimension."""
        check_prior_arguments(shape, generator, dtype)
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return z * self.prior_std

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the Gaussian prior, summed over all non-batch dims; shape ``[batch]``."""
        check_batched(z, "z")
        D = math.prod(z.shape[1:])
        s = self.prior_std
        sq = z.flatten(1).square().sum(1)
        return -0.5 * sq / s**2 - 0.5 * D * (_LOG_2PI + 2 * math.log(s))

    def reverse(self, score: Callable, diffusion: float | Callable = 1.0) -> ReverseProcess:
        """The reverse-time process with the same marginals: dx = [f - (g^2 + s^2)/2 score] dt + s dw_bar.

        ``diffusion`` is s(t): a float multiplies g(t) (1 = reverse SDE, 0 = probability-flow ODE), a callable
        ``s(t) -> tensor`` gives it directly.
        """
        return ReverseProcess(self, score, diffusion)

    def probability_flow(self, score: Callable) -> ReverseProcess:
        """The probability-flow ODE dx/dt = f - g^2/2 score: the s = 0 member of
        [`reverse`][scoresolve.ForwardSDE.reverse]."""
        return self.reverse(score, 0.0)


def _check_beta(beta_min: float, beta_max: float) -> None:
    if not (math.isfinite(beta_min) and math.isfinite(beta_max)):
        raise ValueError(f"beta_min and beta_max must be finite, got {beta_min}, {beta_max}")
    if beta_min < 0:
        raise ValueError(f"beta_min must be >= 0, got {beta_min}")
    if beta_min >= beta_max:
        raise ValueError(f"beta_min must be < beta_max, got beta_min={beta_min}, beta_max={beta_max}")


@dataclass(frozen=True)
class _LinearBetaSDE(ForwardSDE):
    """beta(t) = b0 + t (b1 - b0); log alpha(t) = -t^2 (b1 - b0)/4 - t b0/2 (Song et al. 2021, eq. 29)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def __post_init__(self) -> None:
        _check_beta(self.beta_min, self.beta_max)
        _check_T(self.T)

    def beta(self, t: Time) -> torch.Tensor:
        return self._beta(self.as_time(t))  # type: ignore[attr-defined]

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._beta(t)

    def _t_from_neg_log_alpha(self, L: torch.Tensor) -> torch.Tensor:
        # root of (b1-b0)/4 t^2 + b0/2 t - L = 0, written without cancellation
        b0, d = self.beta_min, self.beta_max - self.beta_min
        return 2 * L / (0.5 * b0 + torch.sqrt(0.25 * b0**2 + d * L))


@dataclass(frozen=True)
class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE: f = -beta(t) x / 2, g = sqrt(beta(t)), sigma = sqrt(1 - alpha^2); prior N(0, I)."""

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return self._beta(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  -log alpha = softplus(-2 lambda) / 2
        return self._t_from_neg_log_alpha(0.5 * torch.nn.functional.softplus(-2 * lam))

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclass(frozen=True)
class SubVPSDE(_LinearBetaSDE):
    """sub-VP SDE: VP drift, g^2 = beta(t)(1 - alpha^4), sigma = 1 - alpha^2 (no square root); prior N(0, I)."""

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(2 * self._log_alpha(t))

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - exp(-2 b0 t - (b1 - b0) t^2) = 1 - alpha^4
        return self._beta(t) * -torch.expm1(4 * self._log_alpha(t))

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        # u = sigma = 1 - alpha^2 solves u^2 / (1 - u) = exp(-2 lambda): u = 2 / (1 + sqrt(1 + 4 exp(2 lambda)))
        s = 0.5 * torch.logaddexp(torch.zeros_like(lam), 2 * lam + 2 * math.log(2.0))  # log sqrt(1 + 4 e^{2 lam})
        u = 2 * torch.exp(-torch.nn.functional.softplus(s))
        L_small_u = -0.5 * torch.log1p(-u.clamp(max=0.5))
        # log alpha^2 = log(1 - u) = 2 lam + 2 log 2 - 2 log(1 + sqrt(1 + 4 e^{2 lam})), accurate when u -> 1
        L_large_u = -0.5 * (2 * lam + 2 * math.log(2.0) - 2 * torch.nn.functional.softplus(s))
        L = torch.where(u < 0.5, L_small_u, L_large_u)
        return self._t_from_neg_log_alpha(L)

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclass(frozen=True)
class VESDE(ForwardSDE):
    """Variance-exploding SDE: f = 0, sigma(t) = smin (smax/smin)^t, g = sigma(t) sqrt(2 log(smax/smin)).

    Convention of score_sde: the marginal std is sigma(t) on [eps, 1], i.e. sigma(0+) = sigma_min
    (the SDE started exactly at t = 0 would give variance sigma(t)^2 - sigma_min^2). Prior N(0, smax^2 I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)):
            raise ValueError("sigma_min and sigma_max must be finite")
        if self.sigma_min <= 0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got {self.sigma_max} <= {self.sigma_min}")
        _check_T(self.T)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.log(self.sigma_min) + t / self.T * self._log_ratio

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_sigma(t))

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        # d sigma^2 / dt = 2 sigma^2 log(smax/smin) / T
        return self._sigma(t) ** 2 * (2 * self._log_ratio / self.T)

    def _log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return -self._log_sigma(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return (-lam - math.log(self.sigma_min)) / self._log_ratio * self.T

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@dataclass(frozen=True)
class EDMSDE(ForwardSDE):
    """The VE diffusion of Karras et al. (2022) in its own time variable: sigma(t) = t, alpha = 1, on [0, sigma_max].

    f = 0, g(t)^2 = d sigma^2/dt = 2 t; prior N(0, sigma_max^2 I) at T = sigma_max; lambda = -log t. t = 0 is clean
    data. Solvers stop at ``t_eps`` = the denoiser's sigma_min (``sample(..., t_eps=sigma_min)``). This is the SDE
    of [`from_karras`][scoresolve.adapters.from_karras] with ``sde="edm"``; it is also importable as
    ``scoresolve.adapters.EDMSDE``.
    """

    T: float = 80.0

    def __post_init__(self) -> None:
        _check_T(self.T)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam)

    @property
    def prior_std(self) -> float:
        return self.T


@dataclass(frozen=True)
class CosineVPSDE(ForwardSDE):
    """VP SDE with the cosine schedule of Nichol & Dhariwal 2021.

    alpha_bar(t) = cos^2(((t + s)/(1 + s)) pi/2) / cos^2((s/(1 + s)) pi/2), alpha = sqrt(alpha_bar),
    beta(t) = -d log alpha_bar / dt. beta diverges at t = 1, so T defaults to 0.9946 as in DPM-Solver.
    """

    s: float = 0.008
    T: float = 0.9946

    def __post_init__(self) -> None:
        if not (0 <= self.s < 1):
            raise ValueError(f"s must lie in [0, 1), got {self.s}")
        if not (0 < self.T < 1):
            raise ValueError(f"T must lie in (0, 1) for the cosine schedule (beta diverges at 1), got {self.T}")

    def _theta(self, t: torch.Tensor) -> torch.Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    @property
    def _log_cos0(self) -> float:
        return math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.cos(self._theta(t))) - self._log_cos0

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        # near t = 0 rounding can leave log alpha a few ulps above 0 (alpha = 1): clamp, or sigma(0) is NaN
        return torch.sqrt((-torch.expm1(2 * self._log_alpha(t))).clamp(min=0))

    def beta(self, t: Time) -> torch.Tensor:
        return self._beta(self.as_time(t))

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tan(self._theta(t)) * (math.pi / (1 + self.s))

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._beta(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return self._beta(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        theta = torch.arccos(torch.exp(log_alpha + self._log_cos0))
        return theta * (2 * (1 + self.s) / math.pi) - self.s

    @property
    def prior_std(self) -> float:
        return 1.0


@dataclass(frozen=True, eq=False)
class DiscreteVPSDE(ForwardSDE):
    """VP SDE from a discrete DDPM schedule (``betas`` or ``alphas_cumprod``, length N).

    As in DPM-Solver's discrete noise schedule, step i (0-based) sits at t_i = (i + 1)/N and log alpha is linearly
    interpolated in t between the knots; we add the knot (t=0, log alpha=0) so that t = 0 is clean data.
    beta(t) = -2 d log alpha / dt is piecewise constant. A network's timestep index for time t is
    ``timestep(t) = N t - 1`` (DPM-Solver's convention, continuous-valued between knots).
    """

    betas: torch.Tensor | Sequence[float] | None = None
    alphas_cumprod: torch.Tensor | Sequence[float] | None = None
    T: float = 1.0
    smooth_in_t: ClassVar[bool] = False  # beta(t) jumps at every knot
    _t_knots: torch.Tensor = field(init=False, repr=False)
    _log_alpha_knots: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.betas is None) == (self.alphas_cumprod is None):
            raise ValueError("give exactly one of betas or alphas_cumprod")
        if self.betas is not None:
            betas = torch.as_tensor(self.betas, dtype=torch.float64)
            if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
            log_ac = torch.cumsum(torch.log1p(-betas), 0)
        else:
            ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
            if ac.ndim != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
                raise ValueError("alphas_cumprod must be a 1-D array of at least 2 values in (0, 1)")
            if not bool((ac[1:] < ac[:-1]).all()):
                raise ValueError("alphas_cumprod must be strictly decreasing")
            log_ac = torch.log(ac)
        if self.T != 1.0:
            raise ValueError("DiscreteVPSDE uses T = 1 (knots at t = (i + 1)/N)")
        N = log_ac.numel()
        t_knots = torch.arange(0, N + 1, dtype=torch.float64) / N
        log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * log_ac])
        object.__setattr__(self, "_t_knots", t_knots)
        object.__setattr__(self, "_log_alpha_knots", log_alpha)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVPSDE":
        """The linear DDPM schedule of Ho et al. 2020 (defaults: 1e-4 -> 0.02 over 1000 steps)."""
        num_timesteps = check_count(num_timesteps, "num_timesteps", minimum=2)
        return cls(betas=torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @property
    def num_timesteps(self) -> int:
        return self._t_knots.numel() - 1

    def __repr__(self) -> str:
        """Short (never the N numbers): N, the first and last alphas_cumprod, and a hash of the whole schedule, so
        that two schedules never share a repr (manifests and tuned grids record the process by its repr)."""
        import hashlib

        la = self._log_alpha_knots
        digest = hashlib.blake2b(la.numpy().tobytes(), digest_size=6).hexdigest()
        ac = torch.exp(2 * la[1:])
        return (f"DiscreteVPSDE(N={self.num_timesteps}, alphas_cumprod={float(ac[0]):.6g}..{float(ac[-1]):.6g}, "
                f"schedule={digest})")

    def timestep(self, t: Time) -> torch.Tensor:
        """Continuous DDPM timestep index N t - 1 for time t (index i <-> t = (i + 1)/N)."""
        return self.as_time(t) * self.num_timesteps - 1

    def _knots(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._t_knots.to(like), self._log_alpha_knots.to(like)

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tk, la = self._knots(t)
        i = torch.clamp(torch.searchsorted(tk, t.detach().contiguous(), right=True) - 1, 0, tk.numel() - 2)
        slope = (la[i + 1] - la[i]) / (tk[i + 1] - tk[i])
        return i, slope, la[i] + slope * (t - tk[i])

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._segment(t)[2]

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def beta(self, t: Time) -> torch.Tensor:
        return self._beta(self.as_time(t))

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        return -2 * self._segment(t)[1]

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._beta(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return self._beta(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        L = -0.5 * torch.nn.functional.softplus(-2 * lam)  # log alpha
        tk, la = self._knots(L)
        neg = -la  # increasing
        j = torch.clamp(torch.searchsorted(neg, (-L).detach().contiguous(), right=True) - 1, 0, tk.numel() - 2)
        w = (L - la[j]) / (la[j + 1] - la[j])
        return tk[j] + w * (tk[j + 1] - tk[j])

    @property
    def prior_std(self) -> float:
        return 1.0


SDE_NAMES: dict[str, type[ForwardSDE]] = {
    "vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDMSDE, "cosine": CosineVPSDE,
}
"""The forward SDEs by the names that command lines and training configs use (DiscreteVPSDE needs its betas)."""


def register_sde(name: str, cls: type[ForwardSDE]) -> None:
    """Add ``cls`` to `SDE_NAMES` under ``name`` (the interpolants of `scoresolve.interpolant` register here)."""
    if SDE_NAMES.get(name, cls) is not cls:
        raise ValueError(f"sde name {name!r} is taken by {SDE_NAMES[name].__name__}")
    SDE_NAMES[name] = cls


PROCESS_NAMES: dict[str, Callable[..., Any]] = {}
"""Processes that are not Gaussian forward SDEs (`scoresolve.Process`: ``pfgmpp``, ``pfgm``), by name, for
`sde_from_name`. Not in `SDE_NAMES`, whose names the command lines and training take (they need a ForwardSDE)."""


def register_process(name: str, factory: Callable[..., Any]) -> None:
    """Add a non-Gaussian process ``factory(**kwargs)`` to `PROCESS_NAMES` under ``name``."""
    if name in SDE_NAMES or PROCESS_NAMES.get(name, factory) is not factory:
        raise ValueError(f"process name {name!r} is taken")
    PROCESS_NAMES[name] = factory


def sde_from_name(name: str, **kwargs: Any) -> ForwardSDE:
    """The process called ``name`` in `SDE_NAMES` (``vp``, ``subvp``, ``ve``, ``edm``, ``cosine``, and the
    interpolants ``rf`` (rectified flow) and ``trig``) or `PROCESS_NAMES` (``pfgmpp``, ``pfgm``: Poisson flows, not
    ForwardSDEs), built with ``kwargs`` (e.g. ``sigma_max=80.0``, ``D=128``)."""
    if name in PROCESS_NAMES:
        return PROCESS_NAMES[name](**kwargs)
    if name not in SDE_NAMES:
        raise ValueError(f"unknown sde {name!r}; expected one of {sorted(SDE_NAMES) + sorted(PROCESS_NAMES)}")
    return SDE_NAMES[name](**kwargs)


def _check_T(T: float) -> None:
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a positive finite number, got {T}")
