"""Adapters for Hugging Face diffusers: a ``UNet2DModel`` and its scheduler -> (ScoreModel, forward SDE).

A DDPM-family scheduler (DDPM, DDIM, DPMSolverMultistep, ...) fixes a discrete schedule ``alphas_cumprod`` of
length N and a prediction type; the network is called as ``unet(x, timestep).sample`` with the integer index
``timestep`` in 0..N-1 at which the noisy sample has ``alphas_cumprod[timestep]``. We turn that into

- ``DiscreteVPSDE(alphas_cumprod=...)``: index i sits at t = (i + 1)/N, log alpha is linear in t between knots and
  t = 0 is clean data (alpha = 1);
- ``ScoreModel(prediction=...)`` with epsilon -> ``"eps"``, v_prediction -> ``"v"``, sample -> ``"x0"`` (diffusers'
  v = sqrt(ac) eps - sqrt(1 - ac) x0 is ours, v = alpha eps - sigma x0), and the time convention
  `DDPMTimestep`: continuous t -> index N t - 1.

**Non-integer indices.** Between knots the index N t - 1 is fractional. It is passed to the network as a float
tensor: diffusers' sinusoidal embedding (``get_timestep_embedding``) takes fractional timesteps and casts them to
float32 itself, so a float that equals an integer gives exactly the embedding of that integer. With the default
``timestep_mode="snap"`` an index within a few float ulps of an integer is rounded to it, so the t = (i + 1)/N grid
points of [`timesteps_to_grid`][scoresolve.adapters.timesteps_to_grid] reach the network as exact integers even in
float32; ``"float"`` passes N t - 1 untouched; ``"round"`` passes ``round(N t - 1)`` as int64 (for networks with a
learned embedding table, at the cost of a piecewise-constant model that adaptive solvers dislike).

**Reproducing a scheduler's loop.** [`scheduler_grid`][scoresolve.adapters.scheduler_grid] returns the t grid (and
whether the scheduler ends with a jump to clean data) on which our solvers take exactly the steps of a configured
scheduler:

- ``DDIMScheduler`` steps from ``timesteps[k]`` to ``timesteps[k] - N // n``; the last step lands on
  ``final_alpha_cumprod``: ``set_alpha_to_one=True`` means alpha = 1, i.e. t = 0, which is not a grid point of ours
  (log-SNR is infinite there): the deterministic DDIM step to alpha = 1 returns the x0 prediction, which is
  ``sample(..., denoise=True)`` at the last grid time. ``set_alpha_to_one=False`` means ``alphas_cumprod[0]``, i.e.
  t = 1/N (the smallest knot, our natural end time t_eps): it is appended to the grid, or, when the last timestep
  is already 0, the final step goes from index 0 to index 0, is the identity, and is dropped (we then use one NFE
  fewer than diffusers for the same result). ``timestep_spacing="linspace"`` makes DDIM step to
  ``t - N // n``, which is not the next timestep it evaluates: that loop is no time discretisation of one grid
  and [`scheduler_grid`][scoresolve.adapters.scheduler_grid] refuses it.
- Sigma-based schedulers (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, Euler, ...) step from
  ``sigmas[k]`` to ``sigmas[k + 1]`` with diffusers' sigma = sqrt((1 - ac)/ac) = exp(-lambda); a final sigma of 0
  (``final_sigmas_type="zero"``) is again ``denoise=True``, ``"sigma_min"`` is t = 1/N.

Clipping and thresholding of x0 (``clip_sample``, ``thresholding``) are not part of the ODE; `scheduler_grid` ignores
them. [`diffusers_schedule`][scoresolve.adapters.diffusers_schedule] gives the whole mapping (grid, solver, options,
x0 processing, timestep rounding) for each supported scheduler and refuses the others.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Literal, Mapping

import torch

from .._utils import check_count
from ..score import ScoreModel
from ..sde import VESDE, DiscreteVPSDE, ForwardSDE

TimestepMode = Literal["snap", "float", "round"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_MIN_ALPHA_CUMPROD = 2.0**-24  # what diffusers' DPMSolverMultistepScheduler uses for a zero terminal SNR


def _require_diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - exercised by monkeypatching sys.modules
        raise ImportError(
            "this function needs Hugging Face diffusers (`pip install diffusers`); from_diffusers() and "
            "timesteps_to_grid() themselves work without it, on any module called as unet(x, timestep)"
        ) from err
    return diffusers


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
def _config(scheduler_or_config: Any) -> dict:
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            "expected a diffusers scheduler (with .config) or its config mapping, got "
            f"{type(scheduler_or_config).__name__}")
    return dict(cfg)


def _is_ve(scheduler_or_config: Any, cfg: dict) -> bool:
    name = cfg.get("_class_name") or type(scheduler_or_config).__name__
    return name == "ScoreSdeVeScheduler" or ("sigma_max" in cfg and "sigma_min" in cfg and "beta_schedule" not in cfg)


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of Nichol & Dhariwal's cosine alpha_bar (s = 0.008) at the N + 1 points i/N, capped at max_beta."""
    i = torch.arange(n + 1, dtype=torch.float64) / n
    abar = torch.cos((i + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it ends at 0 and keeps its start."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def _betas_from_config(cfg: dict) -> torch.Tensor:
    n = check_count(cfg.get("num_train_timesteps", 1000), "num_train_timesteps", minimum=2)
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).flatten()
        if betas.numel() != n and "num_train_timesteps" in cfg:
            raise ValueError(f"trained_betas has {betas.numel()} values but num_train_timesteps is {n}")
        return betas
    schedule = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise NotImplementedError(
            f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2 or trained_betas); "
            "pass a scheduler instance, whose alphas_cumprod is then used as is")
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _clamp_terminal(ac: torch.Tensor) -> torch.Tensor:
    """Make a zero-terminal-SNR schedule usable: the forward SDE needs 0 < alphas_cumprod, strictly decreasing.

    diffusers' DDIM leaves alphas_cumprod[-1] = 0 and DPMSolverMultistep sets it to 2**-24, which for the rescaled
    linear schedule lies above alphas_cumprod[-2] (4e-9); we use min(2**-24, alphas_cumprod[-2] / 2) for both.
    """
    last, prev = float(ac[-1]), float(ac[-2])
    if last <= 0 or last >= prev:
        ac = ac.clone()
        ac[-1] = min(_MIN_ALPHA_CUMPROD, prev / 2)
        warnings.warn(
            f"alphas_cumprod ends at (near) zero SNR (rescale_betas_zero_snr: last value {last:.3g}); it is set to "
            f"min(2**-24, alphas_cumprod[-2] / 2) = {float(ac[-1]):.3g}, since the forward SDE needs 0 < alpha(T) "
            "and a strictly decreasing alpha", stacklevel=3)
    return ac


def sde_from_scheduler(scheduler_or_config: Any) -> ForwardSDE:
    """The forward SDE of a diffusers scheduler or scheduler config.

    DDPM-family schedules give a [`DiscreteVPSDE`][scoresolve.DiscreteVPSDE]. A scheduler instance's own
    ``alphas_cumprod`` (float32 in diffusers) is used as is, so that solvers see the very numbers the scheduler uses; a
    config is evaluated in float64 from ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) or
    ``trained_betas``, with ``num_train_timesteps`` and ``rescale_betas_zero_snr`` (the two routes agree to float32
    rounding, ~1e-7 relative). A zero-terminal-SNR end (``rescale_betas_zero_snr``) is made positive and decreasing (see
    ``_clamp_terminal``). ``ScoreSdeVeScheduler`` gives ``VESDE(sigma_min, sigma_max)``.
    """
    cfg = _config(scheduler_or_config)
    if _is_ve(scheduler_or_config, cfg):
        return VESDE(sigma_min=float(cfg.get("sigma_min", 0.01)), sigma_max=float(cfg.get("sigma_max", 1348.0)))
    ac = getattr(scheduler_or_config, "alphas_cumprod", None)
    if torch.is_tensor(ac):
        ac = ac.detach().to("cpu", torch.float64)
    else:
        ac = torch.cumprod(1 - _betas_from_config(cfg), 0)
    return DiscreteVPSDE(alphas_cumprod=_clamp_terminal(ac))


# ---------------------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------------------
class DDPMTimestep:
    """Time convention of DDPM-indexed networks: continuous t -> index N t - 1 (see the module docstring).

    ``mode``: ``"snap"`` (default) rounds indices within 8 N ulps of t's dtype of an integer, ``"float"`` passes
    N t - 1 as is, ``"round"`` passes ``round(N t - 1)`` as int64.
    """

    def __init__(self, num_timesteps: int, mode: TimestepMode = "snap") -> None:
        if mode not in ("snap", "float", "round"):
            raise ValueError(f"timestep_mode must be 'snap', 'float' or 'round', got {mode!r}")
        self.num_timesteps = check_count(num_timesteps, "num_timesteps")
        self.mode = mode

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        idx = t * self.num_timesteps - 1
        if self.mode == "float":
            return idx
        r = torch.round(idx)
        if self.mode == "round":
            return r.long()
        tol = 8 * self.num_timesteps * torch.finfo(idx.dtype).eps
        return torch.where((idx - r).abs() <= tol, r, idx)

    def __repr__(self) -> str:
        return f"DDPMTimestep(num_timesteps={self.num_timesteps}, mode={self.mode!r})"


class DiffusersNet:
    """``unet(x, timestep, **kw)`` returning a tensor: unwraps ``.sample`` / tuple outputs of diffusers models.

    With ``learned_variance=True`` (or ``"auto"`` and an output with twice the input's channels, as for
    ``variance_type="learned_range"`` models), only the first half of the channels (the mean prediction) is kept.
    """

    def __init__(self, unet: Any, learned_variance: bool | Literal["auto"] = "auto") -> None:
        if not callable(unet):
            raise TypeError(f"unet must be callable as unet(x, timestep), got {type(unet).__name__}")
        self.unet = unet
        self.learned_variance = learned_variance

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.unet(x, timestep, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        split = self.learned_variance
        if split == "auto":
            split = (torch.is_tensor(out) and out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]
                     and out.shape[2:] == x.shape[2:])
        if split:
            out = out[:, : x.shape[1]]
        return out


def from_diffusers(
    unet: Any,
    scheduler_or_config: Any,
    *,
    timestep_mode: TimestepMode = "snap",
    learned_variance: bool | Literal["auto"] = "auto",
    net_kwargs: dict[str, Any] | None = None,
) -> tuple[ScoreModel, ForwardSDE]:
    """Wrap a diffusers ``UNet2DModel`` (or any ``unet(x, timestep)`` returning ``.sample``, a tuple or a tensor).

    Args:
        unet: the network; it is called with a ``[batch]`` float tensor of timesteps (int64 for ``"round"``).
        scheduler_or_config: a DDPM/DDIM/DPMSolverMultistep/... scheduler or its config (mapping), or a
            ``ScoreSdeVeScheduler`` (then the network takes sigma and returns the score: ``VESDE``, ``"sigma"``).
        timestep_mode: how the fractional index N t - 1 is passed (``"snap"``, ``"float"``, ``"round"``).
        learned_variance: drop the variance half of a 2C-channel output (``"auto"``: when it has 2C channels).
        net_kwargs: extra keyword arguments for every call (e.g. ``class_labels``, ``encoder_hidden_states``).

    Returns:
        ``(ScoreModel, DiscreteVPSDE)`` (or ``VESDE``): sample with ``scoresolve.sample(model, sde, x_T, ...)``, with
        ``t_eps >= 1/N`` (below the first knot the index N t - 1 is negative, outside the training range).
    """
    cfg = _config(scheduler_or_config)
    sde = sde_from_scheduler(scheduler_or_config)
    net = DiffusersNet(unet, learned_variance)
    if isinstance(sde, VESDE):
        return ScoreModel(net, sde, prediction="score", time="sigma", net_kwargs=net_kwargs), sde
    ptype = cfg.get("prediction_type", "epsilon")
    if ptype not in _PREDICTIONS:
        raise ValueError(f"prediction_type {ptype!r} is not supported; expected one of {sorted(_PREDICTIONS)}")
    time = DDPMTimestep(sde.num_timesteps, timestep_mode)
    model = ScoreModel(net, sde, prediction=_PREDICTIONS[ptype], time=time, num_timesteps=sde.num_timesteps,
                       net_kwargs=net_kwargs)
    return model, sde


def load_diffusers(
    path: str | os.PathLike,
    *,
    unet_subfolder: str | None = "unet",
    scheduler_subfolder: str | None = "scheduler",
    torch_dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> tuple[ScoreModel, ForwardSDE]:
    """Load a saved diffusers pipeline directory (``unet/`` + ``scheduler/``, e.g. a ``DDPMPipeline``) or hub id.

    The network is loaded with ``diffusers.AutoModel`` (``UNet2DModel`` on older diffusers); the scheduler is read
    from its ``scheduler_config.json`` only (no scheduler class is needed). Needs diffusers; set
    ``HF_HUB_OFFLINE=1`` to stay off the network.
    """
    diffusers = _require_diffusers()
    path = os.fspath(path)
    loader = getattr(diffusers, "AutoModel", None) or diffusers.UNet2DModel
    kw = dict(model_kwargs)
    if unet_subfolder:
        kw["subfolder"] = unet_subfolder
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    unet = loader.from_pretrained(path, **kw)
    unet.eval()
    local = os.path.join(path, scheduler_subfolder or "", "scheduler_config.json")
    if os.path.isfile(local):
        with open(local) as fh:
            cfg = json.load(fh)
    else:
        cfg = dict(diffusers.DDPMScheduler.load_config(path, subfolder=scheduler_subfolder))
    return from_diffusers(unet, cfg)


# ---------------------------------------------------------------------------------------------------------------
# time grids
# ---------------------------------------------------------------------------------------------------------------
def _num_timesteps(sde: ForwardSDE) -> int:
    if not isinstance(sde, DiscreteVPSDE):
        raise TypeError(f"DDPM timesteps need a DiscreteVPSDE, got {type(sde).__name__}")
    return sde.num_timesteps


def timesteps_to_grid(sde: DiscreteVPSDE, timesteps: Any, final: int | None = 0) -> torch.Tensor:
    """Our decreasing float64 t grid for a scheduler's integer timesteps: t = (i + 1)/N, plus the final point.

    Args:
        sde: the [`DiscreteVPSDE`][scoresolve.DiscreteVPSDE] of the model (``from_diffusers``).
        timesteps: decreasing indices in 0..N-1 (``scheduler.timesteps`` after ``set_timesteps(n)``).
        final: index of the point the last step lands on, appended as t = (final + 1)/N. The default 0
            (``alphas_cumprod[0]``, t = 1/N) is DDIM's ``set_alpha_to_one=False`` and DPM-Solver's
            ``final_sigmas_type="sigma_min"``; it is not appended again when it equals the last timestep (that
            final step is the identity). ``None`` appends nothing: use it when the scheduler's last step goes to
            alpha = 1 (t = 0; ``set_alpha_to_one=True``, ``final_sigmas_type="zero"``), and sample with
            ``denoise=True``, whose x0 prediction at the last grid time is exactly that step.

    The grid reproduces the scheduler only when each of its steps goes from one timestep to the next one; see
    [`scheduler_grid`][scoresolve.adapters.scheduler_grid], which also checks that.
    """
    N = _num_timesteps(sde)
    ts = torch.as_tensor(timesteps).detach().to("cpu").flatten()
    if ts.is_floating_point():
        if not bool((ts == ts.round()).all()):
            raise ValueError("timesteps must be integers (DDPM indices); for fractional ones use the scheduler's "
                             "sigmas with scheduler_grid()")
    idx = ts.to(torch.float64)
    if final is not None:
        final = int(final)
        if not 0 <= final < N:
            raise ValueError(f"final must be an index in [0, {N}), or None for alpha = 1; got {final}")
        if idx.numel() == 0 or float(idx[-1]) != final:
            idx = torch.cat([idx, torch.tensor([float(final)], dtype=torch.float64)])
    if idx.numel() < 2:
        raise ValueError("a grid needs at least two points (two timesteps, or one timestep and a final point)")
    if not (bool((idx >= 0).all()) and bool((idx <= N - 1).all())):
        raise ValueError(f"timesteps must lie in [0, {N - 1}], got {idx.tolist()[:6]}...")
    if not bool((idx[1:] < idx[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {idx.tolist()[:6]}...")
    return (idx + 1) / N


def scheduler_grid(scheduler: Any, sde: ForwardSDE | None = None,
                   drop_repeated_final: bool | None = None) -> tuple[torch.Tensor, bool]:
    """``(grid, denoise)`` reproducing the steps of a scheduler after ``set_timesteps(n)``.

    Sample with ``scoresolve.sample(model, sde, x_T, solver=..., grid=grid, denoise=denoise)``. For
    ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint) use ``solver="dpmpp_2m"`` with
    ``lower_order_final = euler_at_final or (lower_order_final and n < 15)`` when ``denoise`` is False, and
    ``lower_order_final=False`` when it is True (diffusers' first-order final step to sigma = 0 is our denoise).
    Sigma schedules that are not at integer timesteps (``use_karras_sigmas`` and friends) are mapped through the
    log-SNR exactly, but diffusers evaluates the network at rounded timesteps there while we evaluate it at the
    exact fractional index: a warning says so (`diffusers_schedule` checks the timesteps and rounds like diffusers).

    With ``final_sigmas_type="sigma_min"`` and a schedule whose last sigma already is sigma_min (Karras, Lu,
    exponential, beta sigmas; or a last timestep 0), the scheduler's last step goes from that sigma to itself. For
    DPM-Solver, DEIS and Euler that step is the identity and is dropped (``drop_repeated_final=None``, the default;
    diffusers' wasted evaluation there is not made). UniPC corrects there: the default refuses it (ValueError); with
    ``drop_repeated_final=True`` the point is dropped and ``unipc(final_corrector=True)`` reproduces it (see
    [`diffusers_schedule`][scoresolve.adapters.diffusers_schedule]).
    """
    timesteps = getattr(scheduler, "timesteps", None)
    if getattr(scheduler, "num_inference_steps", None) is None or timesteps is None:
        raise ValueError("call scheduler.set_timesteps(n) first")
    sde = sde_from_scheduler(scheduler) if sde is None else sde
    N = _num_timesteps(sde)
    ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).flatten()
    cfg = _config(scheduler)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM-style: step t -> t - N // n, last -> final alpha
        n = int(scheduler.num_inference_steps)
        prev = ts - cfg.get("num_train_timesteps", N) // n
        if not bool((prev[:-1] == ts[1:]).all()):
            raise ValueError(
                "this scheduler steps from each timestep t to t - N // n, which is not the next timestep it evaluates "
                f"({ts.tolist()[:4]}... -> {prev.tolist()[:4]}...; timestep_spacing="
                f"{cfg.get('timestep_spacing')!r}): its loop is no discretisation of one time grid. Use "
                "timestep_spacing 'leading' or 'trailing' with n dividing num_train_timesteps")
        if float(prev[-1]) >= 0:
            return timesteps_to_grid(sde, ts, final=int(prev[-1])), False
        if cfg.get("set_alpha_to_one", True):
            return timesteps_to_grid(sde, ts, final=None), True
        return timesteps_to_grid(sde, ts, final=0), False
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or torch.as_tensor(sigmas).numel() != ts.numel() + 1:
        raise TypeError(f"cannot read the steps of {type(scheduler).__name__}; use timesteps_to_grid(sde, "
                        "scheduler.timesteps, final=...) with the final point you need")
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    denoise = float(sig[-1]) == 0.0
    if denoise:
        sig = sig[:-1]
    t = sde.t_from_log_snr(-torch.log(sig))
    idx = t * N - 1
    # the scheduler's sigmas are float32: snap the times whose index is the scheduler's timestep (or an integer)
    ref = torch.cat([ts, idx[ts.numel():].round()])
    close = (idx - ref).abs() <= 1e-3
    t = torch.where(close, (ref + 1) / N, t)
    if not denoise and t.numel() >= 2 and float(t[-1]) == float(t[-2]):
        name = type(scheduler).__name__
        if drop_repeated_final is None:
            drop_repeated_final = name != "UniPCMultistepScheduler"
            if not drop_repeated_final:
                raise ValueError(
                    f"{name} with final_sigmas_type={cfg.get('final_sigmas_type')!r}: its last step goes from sigma "
                    f"{float(sig[-1]):.6g} to itself and applies UniPC's corrector there; use diffusers_schedule("
                    "scheduler) (unipc with final_corrector=True), or scheduler_grid(..., drop_repeated_final=True)")
        if not drop_repeated_final:
            raise ValueError(f"{name}: the last step goes from sigma {float(sig[-1]):.6g} to itself")
        t = t[:-1]
    if not bool(close[: ts.numel()].all()):
        warnings.warn(
            f"{type(scheduler).__name__}'s sigmas are not at its integer timesteps (e.g. use_karras_sigmas): the grid "
            "follows the sigmas exactly, but the network will see the fractional index N t - 1 where diffusers "
            "passes a rounded timestep, so results differ slightly", stacklevel=2)
    if t.numel() < 2:
        raise ValueError("a grid needs at least two points; with one step and a final sigma of 0 the whole solve "
                         "is sample(..., steps=..., denoise=True) from T")
    return t, denoise
