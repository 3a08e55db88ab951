"""Poisson flow generative models (PFGM, PFGM++) as a `scoresolve.Process`: not a Gaussian forward SDE.

Data y has N elements per sample (any event shape), augmented by D extra dimensions. At noise level sigma (the time
variable, t = sigma as in EDM, T = sigma_max) the radius is r = sigma sqrt(D) and the perturbation kernel is

    p_r(x | y) = Gamma((N + D)/2) / (pi^(N/2) Gamma(D/2)) r^D (|x - y|^2 + r^2)^(-(N+D)/2),

a multivariate Student-t with D degrees of freedom and scale sigma; D -> inf gives N(y, sigma^2 I) (EDM / VE),
D = 1 is the original PFGM. The kernel is a scale family, x = y + sigma u with u of a fixed law, so the
probability-flow ODE in sigma is EDM's, written with the posterior mean (denoiser) x0_hat(x, sigma) = E[y | x, sigma]:

    dx/dsigma = (x - x0_hat(x, sigma)) / sigma.

References: Xu et al., "PFGM++" (ICML 2023, code Newbeeer/pfgmpp) and "Poisson Flow Generative Models" (NeurIPS
2022, code Newbeeer/Poisson_flow); the facts used here are in the team's REFERENCES.md, "Poisson flow".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ._utils import Time, bcast, check_batched, check_prior_arguments
from .process import Process
from .reverse import ReverseProcess
from .sde import EDMSDE, register_process

_X0_PREDICTIONS = ("x0", "score")  # "score": a plain callable wrapped by ScoreModel.wrap, taken as the denoiser here


def _standard_gamma(shape: Sequence[int], a: float, generator: torch.Generator | None, device: Any) -> torch.Tensor:
    """Gamma(a, 1) draws in float64 from ``generator`` (Marsaglia & Tsang's rejection; a < 1 by the boost
    Gamma(a) = Gamma(a + 1) U^(1/a)). torch's own gamma sampler takes no generator."""
    boost = a < 1.0
    b = a + 1.0 if boost else a
    d = b - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        m = todo.numel()
        z = torch.randn(m, generator=generator, dtype=torch.float64, device=device)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=device)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        out = out * u ** (1.0 / a)
    return out.reshape(tuple(shape))


@dataclass(frozen=True)
class PFGMFlow(ReverseProcess):
    """The probability-flow ODE of a `PFGMPP` process: ``drift_at(x, t) = (x - x0_hat(x, t)) / t`` (t = sigma).

    ``score`` is the denoiser x0_hat(x, sigma): a plain callable ``net(x, sigma)`` or a `scoresolve.ScoreModel`
    with ``prediction="x0"`` (its raw output is used; other predictions have no meaning under this kernel).
    """

    def drift_at(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = getattr(self.score, "prediction", "x0")
        if prediction not in _X0_PREDICTIONS:
            raise ValueError(f"a Poisson-flow process takes an x0 (denoiser) prediction, got a {prediction!r} model; "
                             "wrap the network as ScoreModel(net, process, prediction='x0')")
        raw = self.score.raw if hasattr(self.score, "raw") else self.score
        t = t.to(dtype=x.dtype)
        return (x - raw(x, t)) / bcast(t, x)

    def with_score(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "PFGMFlow":
        return PFGMFlow(self.sde, score, self.diffusion_scale)


class PFGMPP(Process):
    """PFGM++ with D augmented dimensions: t = sigma in [0, sigma_max], r = sigma sqrt(D) (module docstring).

    Args:
        D: augmented dimensions (> 0; any real D is a valid Student-t). D = 1 is PFGM; D -> inf is EDM / VE.
        sigma_min: the smallest noise level, where solves should stop (``sample(..., t_eps=process.sigma_min)``).
        sigma_max: T, the noise level of the prior.
        N: elements per sample; None (default) takes it from the data at each call (``x[0].numel()``); given, data
            of another size is an error.

    PFGM (D = 1) in its own z-plane coordinates: the data lives at z = 0 of an (N + 1)-dimensional space and the
    samples move in the hyperplane coordinate x and the height z > 0. With D = 1 the radius is r = z, i.e.
    z = sigma: the kernel above is then the Poisson kernel of the half-space, the flux through the plane at height
    z of the field of a unit charge at (y, 0) (B ~ Beta(N/2, 1/2)); the field of the data has
    E_x / E_z = (x - E[y | x, z]) / z, so the original ODE dx/dz = E_x / E_z (integrated in log z from z_max, e.g.
    40 on CIFAR-10, to z_min) is the ODE in sigma here with z = sigma. The original's z_max, z_min are this process's
    sigma_max, sigma_min for D = 1.

    Capabilities: no reverse SDE, no Gaussian kernel (so no eps / score meanings, log-SNR, exponential
    integrators or Gaussian control variate, and ``finite_log_snr_at_T`` is False: there is no log-SNR to be
    finite; `edm_view`'s, lambda(T) = -log sigma_max, is); smooth in t. The solvers that need only the ODE run on it
    (euler, heun, rk4, the adaptive RK pairs) and so does `scoresolve.log_likelihood` with the exact prior
    log-density.
    The ODE is EDM's in the x0 prediction: `edm_view` lets the deterministic (alpha, sigma) integrators (ddim with
    eta = 0, dpmpp_2m / 3m, unipc, deis, ipndm) and EDM's named grids run on it.
    """

    reverse_sde = False
    gaussian_kernel = False
    velocity_form = False
    smooth_in_t = True

    def __init__(self, D: float = 128.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 N: int | None = None) -> None:
        D = float(D)
        if not (math.isfinite(D) and D > 0):
            raise ValueError(f"D (augmented dimensions) must be a positive finite number, got {D}")
        if not (math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if N is not None and (int(N) != N or N < 1):
            raise ValueError(f"N (elements per sample) must be a positive integer or None, got {N}")
        self.D, self.sigma_min, self.sigma_max = D, float(sigma_min), float(sigma_max)
        self.N = None if N is None else int(N)
        self.T = self.sigma_max

    def __repr__(self) -> str:
        n = "" if self.N is None else f", N={self.N}"
        return f"PFGMPP(D={self.D:g}, sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}{n})"

    # -- schedule -------------------------------------------------------------------------------------------------

    def sigma(self, t: Time, *, check: bool = True) -> torch.Tensor:
        """sigma(t) = t."""
        t = torch.as_tensor(t)
        if check and bool(((t < 0) | (t > self.T * (1 + 1e-6))).any()):
            raise ValueError(f"t must lie in [0, T] = [0, {self.T}]")
        return t

    def marginal(self, t: Time, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Not defined: the kernel is no Gaussian x = alpha y + sigma z, so eps / score / v have no meaning here (a
        ValueError saying so, where a conversion from the model's prediction is attempted, e.g. ``denoise=True`` with
        a plain callable)."""
        raise ValueError(f"{self!r} has no Gaussian marginal (alpha, sigma): give the denoiser as "
                         "ScoreModel(net, process, prediction='x0') (its x0 is used as is), or use edm_view()")

    def radius(self, sigma: Time) -> torch.Tensor:
        """r = sigma sqrt(D), the radius of the (N + D)-dimensional kernel."""
        return torch.as_tensor(sigma) * math.sqrt(self.D)

    def karras_grid(self, steps: int, rho: float = 7.0, dtype: torch.dtype = torch.float64,
                    sigma_end: float | None = None) -> torch.Tensor:
        """EDM's grid of ``steps`` steps from sigma_max to ``sigma_end`` (default sigma_min; ``steps + 1``
        decreasing times), as the PFGM++ reference samples; pass it as ``sample(..., grid=process.karras_grid(n))``."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        end = self.sigma_min if sigma_end is None else float(sigma_end)
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        a, b = self.sigma_max ** (1 / rho), end ** (1 / rho)
        return ((a + i * (b - a)) ** rho).to(dtype)

    def elements(self, x: torch.Tensor) -> int:
        """N for data ``x`` ``[batch, ...]`` (checked against the constructor's N)."""
        n = math.prod(x.shape[1:])
        if self.N is not None and n != self.N:
            raise ValueError(f"{self!r} is for N = {self.N} elements per sample, got data of shape {tuple(x.shape)}")
        return n

    # -- kernel ---------------------------------------------------------------------------------------------------

    def log_norm(self, N: int) -> float:
        """log Gamma((N + D)/2) - log Gamma(D/2) - (N/2) log pi (the kernel's constant without r^D)."""
        return math.lgamma((N + self.D) / 2) - math.lgamma(self.D / 2) - 0.5 * N * math.log(math.pi)

    def log_kernel_sq(self, sq_dist: torch.Tensor, sigma: torch.Tensor, N: int) -> torch.Tensor:
        """log p_r(x | y) from |x - y|^2 (``sq_dist``) and sigma (broadcasting), N elements:
        log_norm(N) - N log r - (N + D)/2 log1p(|x - y|^2 / r^2) (stable for D up to 1e7 and beyond)."""
        r2 = sigma * sigma * self.D
        return self.log_norm(N) - 0.5 * N * torch.log(r2) - 0.5 * (N + self.D) * torch.log1p(sq_dist / r2)

    def kernel_log_prob(self, x: torch.Tensor, y: torch.Tensor, sigma: Time) -> torch.Tensor:
        """log p_r(x | y) at r = sigma sqrt(D): ``x`` ``[batch, ...]``, ``y`` broadcastable to it, sigma scalar or
        ``[batch]``; returns ``[batch]``."""
        check_batched(x)
        N = self.elements(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if bool((sigma <= 0).any()):
            raise ValueError("sigma must be > 0 for the kernel's density")
        sq = (x - y).flatten(1).square().sum(1) if (x - y).ndim > 1 else (x - y).square()
        return self.log_kernel_sq(sq, sigma, N)

    def perturb(self, y: torch.Tensor, sigma: Time, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of x ~ p_r(. | y) for each sample of ``y`` ``[batch, ...]`` (sigma scalar or ``[batch]``).

        The reference's construction: B ~ Beta(N/2, D/2), radius R = r sqrt(B / (1 - B)), direction uniform on the
        sphere. Here B = G_N / (G_N + G_D) with G_N = |z|^2 / 2 ~ Gamma(N/2) from the Gaussian z that also gives the
        direction z / |z| and G_D ~ Gamma(D/2): x = y + r z / sqrt(2 G_D) (the same law; no clipping of B).
        """
        check_batched(y, "y")
        self.elements(y)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=y.device)
        if bool((sigma < 0).any()):
            raise ValueError("sigma must be >= 0")
        z = torch.randn(y.shape, generator=generator, dtype=torch.float64, device=y.device)
        g = _standard_gamma((y.shape[0],), self.D / 2, generator, y.device)
        scale = bcast(sigma, z) * math.sqrt(self.D) / bcast(torch.sqrt(2 * g), z)
        x = (y.to(torch.float64) + scale * z).to(y.dtype)
        if not bool(torch.isfinite(x).all()):  # radii beyond the dtype's range: D tiny (heavy tails) or sigma huge
            raise ValueError(f"a kernel sample of {self!r} overflowed {y.dtype} (D too small or sigma too large)")
        return x

    # -- prior ----------------------------------------------------------------------------------------------------

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """x_T ~ p_{r_max}(. | 0), the kernel around the origin at sigma_max; ``shape`` includes the batch."""
        check_prior_arguments(shape, generator, dtype)
        y = torch.zeros(tuple(shape), dtype=dtype or torch.get_default_dtype(), device=device)
        return self.perturb(y, self.sigma_max, generator)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p_{r_max}(z | 0) in closed form, ``[batch]``."""
        return self.kernel_log_prob(z, torch.zeros((), dtype=z.dtype, device=z.device), self.sigma_max)

    def edm_view(self) -> PFGMEDMView:
        """This process as EDM's schedule for the deterministic (alpha, sigma) solvers (ddim with eta = 0,
        dpmpp_2m / 3m, unipc, deis, ipndm, named grids such as ``karras``): see `PFGMEDMView`."""
        return PFGMEDMView(T=self.sigma_max, D=self.D)

    def default_time_grid(self, steps: int, t_eps: float) -> torch.Tensor:
        """EDM's rho = 7 grid from sigma_max down to ``t_eps`` (`Process.default_time_grid`): the grid solvers'
        default here. On the quadratic grid in t, Heun's last step at 10 NFE went from sigma 3.3 to 1e-3 and its
        corrector multiplied the denoiser's error by ~3000 (RMS error 310 on a point cloud of scale 1; 1.4 on this
        grid, 0.099 at 20 NFE)."""
        ts = self.karras_grid(int(steps), sigma_end=t_eps)
        ts[0], ts[-1] = self.T, float(t_eps)  # exact end points
        return ts

    def ode_view(self) -> PFGMEDMView:
        """The PF-ODE in x0 is EDM's (`edm_view`): `sample`'s default sampler runs there (`Process.ode_view`)."""
        return self.edm_view()

    # -- ODE ------------------------------------------------------------------------------------------------------

    def probability_flow(self, score: Callable) -> PFGMFlow:
        """dx/dsigma = (x - x0_hat(x, sigma)) / sigma with the denoiser ``score`` (see `PFGMFlow`)."""
        return PFGMFlow(self, score, 0.0)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PFGMEDMView(EDMSDE):
    """A `PFGMPP` process seen as EDM's schedule (alpha = 1, sigma = t, lambda = -log t, T = sigma_max) for the
    deterministic solvers written in (alpha, sigma): `PFGMPP.edm_view`.

    The PF-ODE of PFGM++ in an x0 (denoiser) prediction, dx/dsigma = (x - x0_hat) / sigma, is exactly EDM's, so
    ddim (eta = 0), dpmpp_2m / 3m, unipc, deis, ipndm and the RK solvers integrate it as they integrate EDM's, exact in
    the linear part. Give it the denoiser as ``ScoreModel(net, view, prediction="x0")``: the eps / score this view
    derives from it are the ODE's velocity (x - x0_hat) / sigma and (x0_hat - x) / sigma^2, not the Student-t
    kernel's score. The prior (sample and log-density) is PFGM++'s; no reverse SDE is declared (the SDE samplers,
    eta > 0 and diffusion > 0 are refused: EDM's reverse SDE has Gaussian marginals, not these).
    """

    D: float = 128.0
    reverse_sde = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.D) and self.D > 0):
            raise ValueError(f"D must be a positive finite number, got {self.D}")

    @property
    def pfgm(self) -> PFGMPP:
        """The process this view is of (its prior)."""
        return PFGMPP(D=self.D, sigma_min=min(0.002, self.T / 2), sigma_max=self.T)

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        return self.pfgm.prior_sample(shape, generator, dtype, device)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.pfgm.prior_log_prob(z)


def PFGM(sigma_min: float = 1e-3, sigma_max: float = 40.0, N: int | None = None) -> PFGMPP:
    """The original PFGM: `PFGMPP` with D = 1 (z = sigma; z_min, z_max of the paper's CIFAR-10 setting)."""
    return PFGMPP(D=1.0, sigma_min=sigma_min, sigma_max=sigma_max, N=N)


register_process("pfgmpp", PFGMPP)  # sde_from_name("pfgmpp", D=128); not a CLI --sde name until training takes it
register_process("pfgm", PFGM)
