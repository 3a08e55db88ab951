"""Adapter for networks trained with score_sde / score_sde_pytorch (Song et al. 2021).

score_sde's ``get_score_fn`` (models/utils.py) defines what its networks mean:

- VP, ``continuous=True`` (DDPM++ cont., NCSN++ cont. VP) and every sub-VP model: ``labels = 999 t``,
  ``score = -net(x, labels) / std(t)`` with the SDE's marginal std: the network predicts eps, with time ``"index"``
  (t (N - 1), N = 1000: the 999 is hard-coded whatever the SDE's N).
- VP, ``continuous=False`` (the DDPM checkpoints): ``labels = t (N - 1)``, std from the discrete table
  ``sqrt(1 - alphas_cumprod[labels.long()])`` of betas ``linspace(beta_min/N, beta_max/N, N)``: the network
  predicts eps at DDPM index i for noise level ``alphas_cumprod[i]``. We return that discrete schedule as
  ``DiscreteVPSDE`` (index i at t = (i + 1)/N) rather than score_sde's mix of the continuous VP drift with a
  truncated discrete std: the network is evaluated at the noise level it was trained for at every grid knot.
- VE, ``continuous=True`` (NCSN++ cont.): ``labels = sigma(t)``, ``score = net(x, labels)``: the network returns
  the score itself (NCSN++ divides by sigma inside, ``scale_by_sigma``), time ``"sigma"``.
- VE, ``continuous=False`` (NCSN/NCSNv2-style discrete sigmas, sigma_max first): ``labels = round((T - t)(N - 1))``,
  the index into sigma_max (sigma_min/sigma_max)^(i/(N-1)), which is sigma(t) at t = 1 - i/(N - 1).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from .._utils import check_count
from ..score import ScoreModel
from ..sde import VESDE, VPSDE, DiscreteVPSDE, ForwardSDE, SubVPSDE
from .diffusers import DDPMTimestep

SDELike = Union[ForwardSDE, str, Any]


class ReversedIndex:
    """score_sde's discrete VE labels: round((T - t)(N - 1)) as int64 (index 0 = sigma_max)."""

    def __init__(self, num_scales: int, T: float = 1.0) -> None:
        self.num_scales, self.T = check_count(num_scales, "num_scales", minimum=2), float(T)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round((self.T - t) * (self.num_scales - 1)).long()

    def __repr__(self) -> str:
        return f"ReversedIndex(num_scales={self.num_scales})"


def _convert_sde(sde: SDELike) -> tuple[ForwardSDE, int | None]:
    """Our SDE for one of ours, a name, or a score_sde ``sde_lib`` object (read by class name and attributes)."""
    if isinstance(sde, (VPSDE, SubVPSDE, VESDE)):
        return sde, None
    if isinstance(sde, ForwardSDE):
        raise TypeError(f"score_sde models are VP, sub-VP or VE; got {type(sde).__name__}")
    if isinstance(sde, str):
        table = {"vp": VPSDE, "vpsde": VPSDE, "subvp": SubVPSDE, "subvpsde": SubVPSDE, "ve": VESDE, "vesde": VESDE}
        key = sde.lower().replace("-", "").replace("_", "")
        if key not in table:
            raise ValueError(f"unknown SDE name {sde!r}; expected 'vp', 'subvp' or 've'")
        return table[key](), None
    name = type(sde).__name__
    N = getattr(sde, "N", None)
    N = int(N) if N is not None else None
    if name in ("VPSDE", "subVPSDE") and hasattr(sde, "beta_0") and hasattr(sde, "beta_1"):
        cls = VPSDE if name == "VPSDE" else SubVPSDE
        return cls(beta_min=float(sde.beta_0), beta_max=float(sde.beta_1)), N
    if name == "VESDE" and hasattr(sde, "sigma_min") and hasattr(sde, "sigma_max"):
        return VESDE(sigma_min=float(sde.sigma_min), sigma_max=float(sde.sigma_max)), N
    raise TypeError(f"cannot read a score_sde SDE from {name}; pass scoresolve.VPSDE/SubVPSDE/VESDE or a name")


def from_score_sde(
    net: Callable[..., torch.Tensor],
    sde: SDELike,
    *,
    continuous: bool = True,
    num_scales: int | None = None,
    net_kwargs: dict[str, Any] | None = None,
) -> tuple[ScoreModel, ForwardSDE]:
    """Wrap a score_sde network ``net(x, labels)`` with the conventions of score_sde's ``get_score_fn``.

    Args:
        net: the network (e.g. a score_sde ``NCSNpp``/``DDPM`` module, in eval mode).
        sde: ``scoresolve.VPSDE`` / ``SubVPSDE`` / ``VESDE``, a name (``"vp"``, ``"subvp"``, ``"ve"``, default
            parameters), or score_sde's own ``sde_lib.VPSDE`` / ``subVPSDE`` / ``VESDE`` object.
        continuous: the checkpoint's ``config.training.continuous`` (sub-VP models are always continuous).
        num_scales: N of a discrete model (``config.model.num_scales``; default: the sde_lib object's N, else 1000).

    Returns:
        ``(ScoreModel, forward SDE)``; for a discrete VP model the SDE is the ``DiscreteVPSDE`` of its training
        schedule (sample with ``t_eps >= 1/N``).
    """
    fwd, N_sde = _convert_sde(sde)
    N = check_count(num_scales, "num_scales", minimum=None) if num_scales is not None else (N_sde or 1000)
    if N < 2:
        raise ValueError(f"num_scales must be >= 2, got {N}")
    if isinstance(fwd, VESDE):
        time = "sigma" if continuous else ReversedIndex(N, fwd.T)
        return ScoreModel(net, fwd, prediction="score", time=time, net_kwargs=net_kwargs), fwd
    if continuous or isinstance(fwd, SubVPSDE):
        return ScoreModel(net, fwd, prediction="eps", time="index", num_timesteps=1000, net_kwargs=net_kwargs), fwd
    disc = DiscreteVPSDE.linear(N, fwd.beta_min / N, fwd.beta_max / N)
    return ScoreModel(net, disc, prediction="eps", time=DDPMTimestep(N), num_timesteps=N,
                      net_kwargs=net_kwargs), disc
