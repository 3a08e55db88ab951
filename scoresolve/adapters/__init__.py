"""Adapters: plug trained networks from other code bases into scoresolve's solvers.

Each ``from_*`` function returns ``(ScoreModel, forward SDE)`` with the network's prediction type and time convention:

- :func:`from_diffusers`: Hugging Face diffusers UNets + DDPM-family schedulers (``DiscreteVPSDE``), or
  ``ScoreSdeVeScheduler`` (``VESDE``); :func:`scheduler_grid` / :func:`timesteps_to_grid` give the time grid that
  reproduces a scheduler's own loop.
- :func:`from_karras`: EDM / k-diffusion denoisers D(x, sigma) (``VESDE``, :class:`EDMSDE` with t = sigma, or any SDE).
- :func:`from_score_sde`: score_sde / score_sde_pytorch networks (VP, sub-VP, VE; continuous or discrete).

diffusers itself is imported only by :func:`load_diffusers`.
"""

from .diffusers import (
    DDPMTimestep,
    DiffusersNet,
    from_diffusers,
    load_diffusers,
    scheduler_grid,
    sde_from_scheduler,
    timesteps_to_grid,
)
from .karras import EDMSDE, RescaledDenoiser, from_karras
from .score_sde import ReversedIndex, from_score_sde

__all__ = [
    "DDPMTimestep",
    "DiffusersNet",
    "EDMSDE",
    "RescaledDenoiser",
    "ReversedIndex",
    "from_diffusers",
    "from_karras",
    "from_score_sde",
    "load_diffusers",
    "scheduler_grid",
    "sde_from_scheduler",
    "timesteps_to_grid",
]
