"""Adapters: plug trained networks from other code bases into scoresolve's solvers.

Each ``from_*`` function returns ``(ScoreModel, forward SDE)`` with the network's prediction type and time convention:

- [`from_diffusers`][scoresolve.adapters.from_diffusers]: Hugging Face diffusers UNets + DDPM-family schedulers
  (``DiscreteVPSDE``), or ``ScoreSdeVeScheduler`` (``VESDE``); [`scheduler_grid`][scoresolve.adapters.scheduler_grid] /
  [`timesteps_to_grid`][scoresolve.adapters.timesteps_to_grid] give the time grid that reproduces a scheduler's own
  loop; [`diffusers_schedule`][scoresolve.adapters.diffusers_schedule] the whole solve (solver, options, x0
  clipping/thresholding, timestep rounding) for each supported scheduler, refusing the others.
- [`from_diffusers_flow`][scoresolve.adapters.from_diffusers_flow]: diffusers flow-matching transformers (SD3,
  Flux, ...) with ``FlowMatchEulerDiscreteScheduler`` or DPMSolverMultistep / UniPC with flow sigmas
  (``RectifiedFlow``); [`flow_scheduler_grid`][scoresolve.adapters.flow_scheduler_grid] gives the grid, solver and
  options that reproduce the scheduler's loop.
- [`from_karras`][scoresolve.adapters.from_karras]: EDM / k-diffusion denoisers D(x, sigma) (``VESDE``,
  [`EDMSDE`][scoresolve.EDMSDE] with t = sigma, or any SDE).
- [`from_score_sde`][scoresolve.adapters.from_score_sde]: score_sde / score_sde_pytorch networks (VP, sub-VP, VE;
  continuous or discrete).

And the other way round, scoresolve's solvers where people sample:

- [`ScoresolveScheduler`][scoresolve.adapters.scheduler.ScoresolveScheduler]: a diffusers scheduler
  (``SchedulerMixin`` + ``ConfigMixin``) that runs a grid solver inside any diffusers pipeline (imported on first
  use: needs diffusers).
- [`k_diffusion_sampler`][scoresolve.adapters.k_diffusion_sampler]: a grid solver with k-diffusion's sampler
  signature (ComfyUI's ``KSAMPLER``); [`k_diffusion_sigmas`][scoresolve.adapters.k_diffusion_sigmas] our named and
  tuned grids as k-diffusion sigmas.

diffusers itself is imported only by [`load_diffusers`][scoresolve.adapters.load_diffusers] and by
``scoresolve.adapters.ScoresolveScheduler`` (a lazy attribute).
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
from .diffusers_flow import (
    FlowSchedule,
    FlowTimestep,
    FlowTransformerNet,
    flow_scheduler_grid,
    from_diffusers_flow,
)
from .diffusers_schedule import DiffusersSchedule, X0Processing, diffusers_schedule
from .k_diffusion import KDiffusionSampler, k_diffusion_sampler, k_diffusion_sigmas
from .karras import RescaledDenoiser, from_karras
from .score_sde import ReversedIndex, from_score_sde

__all__ = [
    "DDPMTimestep",
    "DiffusersNet",
    "DiffusersSchedule",
    "ScoresolveScheduler",
    "ScoresolveSchedulerOutput",
    "FlowSchedule",
    "FlowTimestep",
    "FlowTransformerNet",
    "KDiffusionSampler",
    "RescaledDenoiser",
    "X0Processing",
    "ReversedIndex",
    "diffusers_schedule",
    "flow_scheduler_grid",
    "from_diffusers",
    "from_diffusers_flow",
    "from_karras",
    "from_score_sde",
    "k_diffusion_sampler",
    "k_diffusion_sigmas",
    "load_diffusers",
    "scheduler_grid",
    "sde_from_scheduler",
    "timesteps_to_grid",
]


def __getattr__(name: str):
    """``ScoresolveScheduler`` subclasses diffusers' classes: imported on first use (diffusers stays optional)."""
    if name in ("ScoresolveScheduler", "ScoresolveSchedulerOutput"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
