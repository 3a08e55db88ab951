"""Which scoresolve solve reproduces a configured diffusers scheduler (DDPM-family noise schedules).

[`diffusers_schedule`][scoresolve.adapters.diffusers_schedule] maps a scheduler after ``set_timesteps(n)`` to a
[`DiffusersSchedule`][scoresolve.adapters.DiffusersSchedule]: the grid, solver, options and ``denoise`` flag on which
``scoresolve.sample`` takes exactly the steps of diffusers' own loop, plus what the model needs (diffusers' rounding
of fractional timesteps, its clipping or dynamic thresholding of x0). A configuration that is not reproduced exactly
raises a ValueError naming the option; nothing is approximated. With diffusers' float32 arithmetic the two loops
agree to float32 rounding; with diffusers' dtypes patched to float64 they agree to ~1e-15
(tests/test_adapters_schedule.py).

    sch.set_timesteps(n)
    model, sde = from_diffusers(unet, sch)
    schedule = diffusers_schedule(sch)
    x = sample(schedule.model(model), sde, latents * schedule.input_scale, generator=g, **schedule.sample_kwargs())

Reproduced (see docs/diffusers.md for the table):

- ``DDIMScheduler`` (``step(eta=0)``, ``clip_sample=False``) -> ``ddim``;
- ``DDPMScheduler`` (``variance_type="fixed_small"``, clip_sample / thresholding) -> ``ddim`` with ``eta=1`` and the
  same ``torch.Generator`` (diffusers draws the same numbers in the same order);
- ``EulerDiscreteScheduler`` -> ``ddim``; ``EulerAncestralDiscreteScheduler`` -> ``ddim(eta=1)`` (same generator);
  both at integer timesteps (``timestep_spacing`` "leading"/"trailing", or "linspace" when it lands on integers);
  start from ``latents * input_scale`` (their loop runs on x / alpha);
- ``DPMSolverMultistepScheduler``: ``dpmsolver++`` order 2 midpoint -> ``dpmpp_2m``, order 1 -> ``ddim``,
  ``sde-dpmsolver++`` order 2 -> ``dpmpp_2m_sde`` (order 1: ``ddim(eta=1)``), ``dpmsolver`` order 1 -> ``ddim``;
  thresholding; Karras / Lu / exponential / beta sigmas (the network then sees diffusers' rounded timesteps);
  ``final_sigmas_type`` zero (denoise) or sigma_min (a last step from a sigma to itself is the identity: dropped);
- ``UniPCMultistepScheduler`` (bh2, predict_x0) -> ``unipc(order=solver_order)`` with the ``lower_order_final`` whose
  order schedule equals diffusers', thresholding, Karras & co, sigma_min (its last step from a sigma to itself
  corrects: ``final_corrector=True``);
- ``DEISMultistepScheduler`` -> ``deis(basis="log_rho", order=solver_order)`` (Lagrange polynomial in log rho),
  thresholding.

Refused: DDIM with clip_sample / thresholding (diffusers clips x0 but keeps the network's eps in the update, which
is no data-prediction step), DPM-Solver order 3 (its third-order coefficient, see `dpmpp_3m_step`), ``solver_type
"heun"``, ``dpmsolver`` / ``sde-dpmsolver`` order 2 (noise-prediction multistep), UniPC bh1 / predict_x0=False /
disable_corrector / solver_p, order schedules without an equal, HeunDiscrete, KDPM2 (+Ancestral), LMSDiscrete,
PNDM, DPMSolverSinglestep, DPMSolverSDE, and fractional timesteps where diffusers passes them to the network as
floats (Euler with Karras sigmas, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..score import Prediction, ScoreModel, convert
from ..sde import DiscreteVPSDE
from .diffusers import DDPMTimestep, _config, scheduler_grid, sde_from_scheduler, timesteps_to_grid
from .diffusers_flow import _dpm_orders, _match_lof, _refuse

__all__ = ["DiffusersSchedule", "X0Processing", "diffusers_schedule"]

REFUSED_SCHEDULERS = {
    "HeunDiscreteScheduler": "Heun's method in sigma, with its second evaluation at timesteps interpolated in log "
                             "sigma and passed to the network as floats (its sigmas come twice)",
    "KDPM2DiscreteScheduler": "DPM-Solver-2 in sigma with evaluations at interpolated fractional timesteps",
    "KDPM2AncestralDiscreteScheduler": "DPM-Solver-2 in sigma with evaluations at interpolated fractional timesteps",
    "LMSDiscreteScheduler": "its last Adams step integrates the Lagrange polynomial in sigma down to sigma = 0, which "
                            "no grid of ours reaches (nearest: deis with basis='rho' and denoise=True)",
    "PNDMScheduler": "PLMS repeats a timestep to average two noise predictions (and PRK steps at half timesteps); "
                     "nearest: ipndm",
    "DPMSolverSinglestepScheduler": "its singlestep updates use earlier grid points as intermediate stages, with an "
                                    "r1 that changes from step to step; nearest: dpm_solver_2 / dpm_solver_3",
    "DPMSolverSDEScheduler": "it draws Brownian-tree noise from torchsde",
}


# ---------------------------------------------------------------------------------------------------------------
# x0 processing: clip_sample and dynamic thresholding
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class X0Processing:
    """diffusers' processing of the x0 prediction: dynamic thresholding (Saharia et al. 2022: per sample, s = the
    ``ratio`` quantile of |x0| clamped to [1, ``max_value``], x0 -> clamp(x0, -s, s) / s), else clipping to
    [-``clip``, ``clip``]."""

    thresholding: bool = False
    ratio: float = 0.995
    max_value: float = 1.0
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.thresholding and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio (the quantile of |x0| that thresholds) must lie in (0, 1], got {self.ratio!r}")
        if self.thresholding and not (isinstance(self.max_value, (int, float)) and math.isfinite(self.max_value)
                                     and self.max_value >= 1):
            raise ValueError(f"max_value must be a finite number >= 1 (s is clamped to [1, max_value]), got "
                             f"{self.max_value!r}")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"clip must be a number > 0 or None, got {self.clip!r}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.thresholding:
            flat = x0.flatten(1)
            work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            s = torch.quantile(work.abs(), self.ratio, dim=1).clamp(min=1, max=self.max_value).unsqueeze(1)
            return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)
        if self.clip is not None:
            return x0.clamp(-self.clip, self.clip)
        return x0


class ProcessedX0Model(ScoreModel):
    """A ScoreModel whose x0 prediction is processed (`X0Processing`); every other prediction is derived from the
    processed x0, so data-prediction solvers see what diffusers' schedulers use."""

    def __init__(self, base: ScoreModel, processing: X0Processing, time: Any = None) -> None:
        super().__init__(base.net, base.sde, prediction=base.prediction, time=base.time if time is None else time,
                         num_timesteps=base.num_timesteps, net_kwargs=base.net_kwargs)
        self.processing = processing

    def predict_many(self, x: torch.Tensor, t: torch.Tensor, kinds: Sequence[Prediction]) -> list[torch.Tensor]:
        from ..score import _batch_time, _check_kind

        for kind in kinds:
            _check_kind(kind)
        t = _batch_time(t, x)
        out = self.raw(x, t)
        alpha, sigma = self.sde.marginal(t, check=False)
        da = ds = None
        if "flow" in kinds or self.prediction == "flow":
            da, ds = self.sde.dalpha_dt(t, check=False), self.sde.dsigma_dt(t, check=False)
        x0 = self.processing(convert(out, self.prediction, "x0", x, alpha, sigma, da, ds))
        return [convert(x0, "x0", kind, x, alpha, sigma, da, ds) for kind in kinds]


# ---------------------------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersSchedule:
    """What ``scoresolve.sample`` needs to take a diffusers scheduler's steps.

    ``grid`` (decreasing float64 t), ``denoise``, ``solver``, ``options``: pass ``**sample_kwargs()``;
    ``timestep_mode``: how the network must see the times ("snap": diffusers' integer timesteps are grid points;
    "round": diffusers rounds fractional timesteps); ``x0_processing``: clipping / thresholding of x0, or None;
    ``input_scale``: our x_T is diffusers' initial latents times this (1 for VP-type loops; 1/sqrt(1 + sigma_max^2)
    for Euler-type loops, which run on x / alpha); ``stochastic``: pass the ``generator`` diffusers' ``step`` gets
    (a CPU ``torch.Generator`` in the same state gives the same noise where both draw in the same dtype:
    DDPM / EulerAncestral draw in the model output's dtype, DPMSolverMultistep always in float32, so an
    sde-dpmsolver++ loop shares its noise with a float32 solve only).
    """

    grid: torch.Tensor
    denoise: bool
    solver: str
    options: dict = field(default_factory=dict)
    timestep_mode: str = "snap"
    x0_processing: X0Processing | None = None
    input_scale: float = 1.0
    stochastic: bool = False

    def sample_kwargs(self) -> dict:
        return {"solver": self.solver, "grid": self.grid, "denoise": self.denoise, **self.options}

    def model(self, model: ScoreModel) -> ScoreModel:
        """``model`` (from `from_diffusers`) with diffusers' timestep rounding and x0 processing, if any."""
        time = model.time
        if isinstance(time, DDPMTimestep) and time.mode != self.timestep_mode and self.timestep_mode == "round":
            time = DDPMTimestep(time.num_timesteps, "round")
        elif self.timestep_mode == "round" and not isinstance(time, DDPMTimestep):
            raise ValueError("this schedule needs the network to see rounded timesteps: build the model with "
                             "from_diffusers(..., timestep_mode='round')")
        if self.x0_processing is not None:
            return ProcessedX0Model(model, self.x0_processing, time)
        if time is model.time:
            return model
        out = ScoreModel(model.net, model.sde, prediction=model.prediction, time=time,
                         num_timesteps=model.num_timesteps, net_kwargs=model.net_kwargs)
        return out


def _name(scheduler: Any, cfg: dict) -> str:
    return cfg.get("_class_name") or type(scheduler).__name__


def _x0_processing(name: str, cfg: dict, clip_ok: bool) -> X0Processing | None:
    if cfg.get("thresholding", False):
        return X0Processing(True, float(cfg.get("dynamic_thresholding_ratio", 0.995)),
                            float(cfg.get("sample_max_value", 1.0)))
    if cfg.get("clip_sample", False):
        if not clip_ok:
            raise ValueError(f"{name} with clip_sample=True is not reproduced")
        return X0Processing(clip=float(cfg.get("clip_sample_range", 1.0)))
    return None


def _ddpm_grid(scheduler: Any, sde: DiscreteVPSDE) -> tuple[torch.Tensor, bool]:
    """DDPMScheduler steps from t to previous_timestep(t) (t - N // n); below 0 it lands on alpha = 1."""
    ts = [int(t) for t in scheduler.timesteps]
    prev = [int(scheduler.previous_timestep(torch.tensor(t))) for t in ts]
    if prev[:-1] != ts[1:]:
        raise ValueError(f"DDPMScheduler steps from each timestep to {prev[:4]}..., not to the next timestep it "
                         f"evaluates ({ts[1:5]}...; timestep_spacing={_config(scheduler).get('timestep_spacing')!r}): "
                         "use 'leading' or 'trailing' with n dividing num_train_timesteps")
    if prev[-1] < 0:
        return timesteps_to_grid(sde, ts, final=None), True
    return timesteps_to_grid(sde, ts, final=prev[-1]), False


def _sigma_grid(scheduler: Any, sde: DiscreteVPSDE) -> tuple[torch.Tensor, bool, bool]:
    """(grid, denoise, dropped): scheduler_grid, with a last step from a sigma to itself removed (``dropped``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fractional timesteps: checked below against the scheduler's
        grid, denoise = scheduler_grid(scheduler, sde, drop_repeated_final=True)
    sig = torch.as_tensor(scheduler.sigmas).double()
    dropped = (not denoise) and sig.numel() >= 2 and float(sig[-1]) == float(sig[-2])
    return grid, denoise, dropped


def _check_times(name: str, grid: torch.Tensor, sde: DiscreteVPSDE, timesteps: Any, sigmas: Any) -> str:
    """The timestep mode under which our network sees diffusers' timesteps at the grid points; ValueError if none."""
    N = sde.num_timesteps
    ts = torch.as_tensor(timesteps).detach().double().flatten()
    k = min(ts.numel(), grid.numel())
    if sigmas is not None:
        sig = torch.as_tensor(sigmas).detach().double().flatten()[: grid.numel()]
        ours = torch.exp(-sde.log_snr(grid))[: sig.numel()]  # diffusers' sigma = e^{-lambda}
        if not torch.allclose(ours, sig, rtol=1e-5, atol=0):
            raise ValueError(f"{name}: its sigmas {sig.tolist()[:3]}... are not those of its alphas_cumprod (e.g. "
                             "rescale_betas_zero_snr sets a last alpha we clamp): not reproduced")
    if bool((DDPMTimestep(N, "snap")(grid[:k]) == ts[:k]).all()):
        return "snap"
    if bool((DDPMTimestep(N, "round")(grid[:k]).double() == ts[:k]).all()):
        if not bool((ts == ts.round()).all()):
            raise ValueError(f"{name} passes fractional timesteps {ts.tolist()[:3]}... to the network (interpolated "
                             "in sigma, not in log alpha as ours): not reproduced; use integer timesteps "
                             "(timestep_spacing 'leading' or 'trailing', no Karras/exponential/beta sigmas)")
        return "round"
    raise ValueError(f"{name}: diffusers evaluates the network at timesteps {ts.tolist()[:4]}... which our grid does "
                     "not reproduce (fractional timesteps, or a rounding that differs from ours)")


def diffusers_schedule(scheduler: Any, sde: DiscreteVPSDE | None = None) -> DiffusersSchedule:
    """The scoresolve solve that reproduces a configured scheduler's loop (after ``scheduler.set_timesteps(n)``).

    See the module docstring for what is reproduced; anything else raises a ValueError naming the option.
    Flow-matching schedulers (``use_flow_sigmas``): use
    [`flow_scheduler_grid`][scoresolve.adapters.flow_scheduler_grid].
    """
    cfg = _config(scheduler)
    name = _name(scheduler, cfg)
    if name in REFUSED_SCHEDULERS:
        raise ValueError(f"{name} is not reproduced by scoresolve's solvers: {REFUSED_SCHEDULERS[name]}")
    if cfg.get("use_flow_sigmas", False):
        raise ValueError(f"{name} with use_flow_sigmas=True: use scoresolve.adapters.flow_scheduler_grid")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(n) first")
    sde = sde_from_scheduler(scheduler) if sde is None else sde
    if not isinstance(sde, DiscreteVPSDE):
        raise ValueError(f"{name}: only DDPM-family (DiscreteVPSDE) schedules are mapped here")
    sigmas = getattr(scheduler, "sigmas", None)
    opts: dict[str, Any] = {}
    proc = None
    scale, stochastic = 1.0, False
    if name == "DDIMScheduler":
        _refuse(name, cfg, thresholding=False)
        if cfg.get("clip_sample", True):
            raise ValueError("DDIMScheduler with clip_sample=True is not reproduced: diffusers clips the x0 prediction "
                             "but keeps the network's eps in its update, which is no data-prediction step (set "
                             "clip_sample=False)")
        grid, denoise = scheduler_grid(scheduler, sde)
        solver, sigmas = "ddim", None
    elif name == "DDPMScheduler":
        var = cfg.get("variance_type", "fixed_small")
        if var != "fixed_small":
            raise ValueError(f"DDPMScheduler with variance_type={var!r} is not reproduced (supported: 'fixed_small')")
        proc = _x0_processing(name, cfg, clip_ok=True)
        grid, denoise = _ddpm_grid(scheduler, sde)
        solver, opts, stochastic = "ddim", {"eta": 1.0}, True
    elif name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        if cfg.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"{name} with timestep_type={cfg.get('timestep_type')!r} is not reproduced (supported: "
                             "'discrete')")
        grid, denoise, _ = _sigma_grid(scheduler, sde)
        solver = "ddim"
        if name == "EulerAncestralDiscreteScheduler":
            opts, stochastic = {"eta": 1.0}, True
        if not denoise:
            raise ValueError(f"{name} with final_sigmas_type={cfg.get('final_sigmas_type')!r} is not reproduced: its "
                             "loop ends on x / alpha at sigma_min, not on x (supported: final_sigmas_type='zero')")
        scale = float(1 / (1 + float(torch.as_tensor(scheduler.sigmas)[0]) ** 2) ** 0.5)
    elif name == "DPMSolverMultistepScheduler":
        algo, order = cfg.get("algorithm_type", "dpmsolver++"), int(cfg.get("solver_order", 2))
        if algo not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"):
            raise ValueError(f"{name} with algorithm_type={algo!r} is not reproduced (supported: 'dpmsolver++', "
                             "'sde-dpmsolver++', and 'dpmsolver' with solver_order=1)")
        if order == 3:
            raise ValueError(f"{name} with solver_order=3 is not reproduced: diffusers' third-order update weights "
                             "the second divided difference by h^3 phi_3 where the exact integral of the quadratic "
                             "(scoresolve's dpmpp_3m) has 2 h^3 phi_3, which makes diffusers' method second order "
                             "(supported: solver_order=1 or 2)")
        if order != 1:
            if order != 2:
                raise ValueError(f"{name} with solver_order={order} is not reproduced (supported: 1, 2)")
            if algo == "dpmsolver":
                raise ValueError(f"{name} with algorithm_type='dpmsolver' and solver_order=2 (multistep DPM-Solver "
                                 "on the noise prediction) is not reproduced (supported: 'dpmsolver++')")
            _refuse(name, cfg, solver_type="midpoint")
        proc = _x0_processing(name, cfg, clip_ok=False)
        grid, denoise, _ = _sigma_grid(scheduler, sde)
        n = int(scheduler.num_inference_steps)
        want = _dpm_orders(n, order, bool(cfg.get("lower_order_final", True)), bool(cfg.get("euler_at_final", False)),
                           denoise)
        steps = grid.numel() - 1
        if algo == "sde-dpmsolver++":
            stochastic = True
            if order == 1:
                solver, opts = "ddim", {"eta": 1.0}
            else:
                solver, opts = "dpmpp_2m_sde", {"eta": 1.0}
                if want[:steps] != [1] + [2] * (steps - 1):
                    raise ValueError(f"{name} (sde-dpmsolver++): its order schedule {want} (lower_order_final, "
                                     "euler_at_final) has no equal in dpmpp_2m_sde (orders 1, 2, 2, ...)")
        elif order == 1:
            solver = "ddim"
        else:
            solver = "dpmpp_2m"
            opts = {"lower_order_final": _match_lof(name, want, steps, 2)}
    elif name == "UniPCMultistepScheduler":
        _refuse(name, cfg, predict_x0=True, solver_type="bh2", disable_corrector=None, solver_p=None)
        order = int(cfg.get("solver_order", 2))
        if order not in (1, 2, 3, 4):
            raise ValueError(f"{name} with solver_order={order} is not reproduced (supported: 1-4)")
        proc = _x0_processing(name, cfg, clip_ok=False)
        grid, denoise, dropped = _sigma_grid(scheduler, sde)
        n = int(scheduler.num_inference_steps)
        lof = bool(cfg.get("lower_order_final", True))
        want = [min(order, k + 1, n - k) if lof else min(order, k + 1) for k in range(n)]
        if denoise and want[-1] != 1:
            raise ValueError(f"{name} with lower_order_final=False and solver_order={order}: its last step to sigma "
                             "= 0 is of order >= 2, which divides by a zero log-SNR ratio; use lower_order_final=True")
        steps = grid.numel() - 1
        solver = "unipc"
        opts = {"order": order, "lower_order_final": _match_lof(name, want, steps, order)}
        if dropped:
            opts["final_corrector"] = True
    elif name == "DEISMultistepScheduler":
        _refuse(name, cfg, algorithm_type="deis", solver_type="logrho")
        order = int(cfg.get("solver_order", 2))
        if order not in (1, 2, 3):
            raise ValueError(f"{name} with solver_order={order} is not reproduced (supported: 1-3)")
        proc = _x0_processing(name, cfg, clip_ok=False)
        grid, denoise, _ = _sigma_grid(scheduler, sde)
        n = int(scheduler.num_inference_steps)
        want = _dpm_orders(n, order, bool(cfg.get("lower_order_final", True)), False, denoise)
        steps = grid.numel() - 1
        solver = "deis"
        opts = {"order": order, "basis": "log_rho", "lower_order_final": _match_lof(name, want, steps, order)}
    else:
        raise ValueError(f"{name} is not reproduced by scoresolve's solvers (supported: DDIM, DDPM, EulerDiscrete, "
                         "EulerAncestralDiscrete, DPMSolverMultistep, UniPCMultistep, DEISMultistep)")
    mode = _check_times(name, grid, sde, scheduler.timesteps, sigmas)
    if grid.numel() < 2:
        raise ValueError(f"{name}: a grid needs at least two points (one step to sigma = 0 is model.x0 at T)")
    return DiffusersSchedule(grid=grid, denoise=denoise, solver=solver, options=opts, timestep_mode=mode,
                             x0_processing=proc, input_scale=scale, stochastic=stochastic)

