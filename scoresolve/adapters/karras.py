"""Adapters for EDM / k-diffusion denoisers D(x, sigma) = E[x0 | x0 + sigma z = x] (Karras et al. 2022).

A k-diffusion denoiser works in the variance-exploding variable: x = x0 + sigma z, sigma in [sigma_min, sigma_max],
and predicts x0. Any forward SDE of ours has x_t = alpha x0 + sigma_t z, i.e. x_t / alpha is that VE variable at
noise level sigma_t / alpha = exp(-lambda(t)); so one denoiser serves every schedule:

    x0_hat(x_t, t) = D(x_t / alpha(t), sigma(t) / alpha(t)).

[`from_karras`][scoresolve.adapters.from_karras] returns the pair (ScoreModel, forward SDE) for three choices of the
time variable:

- ``sde="ve"`` (default): ``VESDE(sigma_min, sigma_max)``, sigma(t) = sigma_min (sigma_max/sigma_min)^t, T = 1:
  t is affine in log sigma.
- ``sde="edm"``: [`EDMSDE`][scoresolve.EDMSDE], sigma(t) = t, T = sigma_max: t IS sigma. Sample with
  ``t_eps=sigma_min``.
- any [`ForwardSDE`][scoresolve.ForwardSDE] instance (VP, cosine, ...): the rescaling above.

All three have the same probability-flow ODE up to a change of variables, but a fixed-step solver discretises it
in its own time variable. Heun's method in t on ``EDMSDE`` is exactly k-diffusion's ``sample_heun`` (Heun in sigma):
for alpha = 1, dx/dt = -g^2/2 score = (x - D(x, sigma))/sigma * dsigma/dt, and dsigma/dt = 1. On ``VESDE`` the same
grid of sigmas gives Heun in log sigma instead (dx/dlog sigma = x - D): another second-order method, with different
O(h^3) local errors. k-diffusion's last step to sigma = 0 is an Euler step, x + (0 - sigma)(x - D)/sigma = D(x, sigma):
``sample(..., denoise=True)``.

k-diffusion's VP wrappers (``DiscreteEpsDDPMDenoiser``, ``VDenoiser``, ``OpenAIDenoiser``) are themselves such
denoisers (they feed ``x / sqrt(sigma^2 + 1)`` to the inner VP network), so they plug in here too; an inner VP
network on its own is better wrapped directly: a DDPM eps-network with
[`from_diffusers`][scoresolve.adapters.from_diffusers] (or ``ScoreModel(net, DiscreteVPSDE(...), "eps", time)``), a
v-diffusion network with ``ScoreModel(net, CosineVPSDE(s=0), "v", "t")`` (k-diffusion's VDenoiser has
alpha = cos(pi t/2), sigma = sin(pi t/2)). Note that k-diffusion's ``DiscreteSchedule`` interpolates the index linearly
in log sigma between knots, while ``DiscreteVPSDE`` interpolates log alpha linearly in t: the two agree at the knots
only.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch

from .._utils import bcast
from ..score import ScoreModel
from ..sde import EDMSDE, VESDE, ForwardSDE

Denoiser = Callable[..., torch.Tensor]


class RescaledDenoiser:
    """x0_hat(x, t) = D(x / alpha(t), sigma(t) / alpha(t)): an EDM denoiser as an x0-network of any forward SDE."""

    def __init__(self, denoiser: Denoiser, sde: ForwardSDE) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable denoiser(x, sigma), got {type(denoiser).__name__}")
        if not isinstance(sde, ForwardSDE):
            raise TypeError(f"sde must be a ForwardSDE (e.g. scoresolve.VPSDE()), got {type(sde).__name__}")
        self.denoiser, self.sde = denoiser, sde

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        log_alpha = self.sde.log_alpha(t)
        sigma_edm = self.sde.sigma(t) * torch.exp(-log_alpha)
        return self.denoiser(x * bcast(torch.exp(-log_alpha), x), sigma_edm, **kwargs)


def from_karras(
    denoiser: Denoiser,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    sde: Literal["ve", "edm"] | ForwardSDE = "ve",
    net_kwargs: dict[str, Any] | None = None,
) -> tuple[ScoreModel, ForwardSDE]:
    """Wrap an EDM / k-diffusion denoiser ``D(x, sigma, **net_kwargs)`` (sigma of shape ``[batch]``).

    Args:
        denoiser: predicts x0 from x = x0 + sigma z.
        sigma_min: the lowest noise level (EDM's default 0.002); used by ``"ve"`` and ``"edm"``.
        sigma_max: the highest noise level (EDM's default 80); used by ``"ve"`` and ``"edm"``.
        sde: ``"ve"`` -> ``VESDE(sigma_min, sigma_max)`` (T = 1); ``"edm"`` -> [`EDMSDE`][scoresolve.EDMSDE]
            (t = sigma, T = sigma_max); or a forward SDE instance, on which D is called at (x / alpha, sigma / alpha).
        net_kwargs: extra keyword arguments for every call (conditioning).

    Returns:
        ``(ScoreModel with prediction "x0", the forward SDE)``. For the EDM/k-diffusion Heun sampler use
        ``sde="edm"``, ``grid=time_grid(sde, steps, "karras", t_eps=sigma_min)``, ``solver="heun"``,
        ``t_eps=sigma_min`` and ``denoise=True``. On ``"ve"``, sigma(t_eps) = sigma_min (sigma_max/sigma_min)^t_eps:
        the default t_eps = 1e-3 ends 1.1% above EDM's sigma_min; pass a tiny t_eps (e.g. 1e-9) to end at it.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as D(x, sigma), got {type(denoiser).__name__}")
    if isinstance(sde, ForwardSDE):
        return ScoreModel(RescaledDenoiser(denoiser, sde), sde, prediction="x0", time="t",
                          net_kwargs=net_kwargs), sde
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if sde == "ve":
        fwd: ForwardSDE = VESDE(sigma_min=float(sigma_min), sigma_max=float(sigma_max))
    elif sde == "edm":
        fwd = EDMSDE(T=float(sigma_max))
    else:
        raise ValueError(f"sde must be 've', 'edm' or a ForwardSDE instance, got {sde!r}")
    return ScoreModel(denoiser, fwd, prediction="x0", time="sigma", net_kwargs=net_kwargs), fwd
