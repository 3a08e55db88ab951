"""Adapters for diffusers' flow-matching models: a flow transformer and its scheduler -> (ScoreModel, RectifiedFlow).

diffusers' flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``; ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` with ``use_flow_sigmas=True, prediction_type="flow_prediction"``) all use rectified flow
x_sigma = (1 - sigma) x0 + sigma eps, with a network that predicts the velocity u = eps - x0. Our time is their sigma:
`RectifiedFlow` (alpha = 1 - t, sigma = t) and ``ScoreModel(prediction="flow")``. The network's time input is the
scheduler's ``timestep``:

- ``FlowMatchEulerDiscreteScheduler``: timestep = sigma * N (a float; N = ``num_train_timesteps``), our
  ``time="scaled"``;
- the multistep schedulers: timestep = int(sigma * N) (truncated to an integer, though the solver steps to the exact
  sigma), our [`FlowTimestep`][scoresolve.adapters.FlowTimestep] with ``mode="floor"``;
- Flux pipelines pass ``timestep / 1000`` to the transformer: ``from_diffusers_flow(..., time_input="sigma")``.

**Reproducing a scheduler's loop.** [`flow_scheduler_grid`][scoresolve.adapters.flow_scheduler_grid] rebuilds the
scheduler's sigmas in float64 with diffusers' own formulas and returns the grid, the solver and its options for
``scoresolve.sample``. Every scheduler here ends with a step to sigma = 0, which returns the x0 prediction
x - sigma u at the last sigma: that is our ``denoise=True``, so the grid is the scheduler's sigmas without the final 0.

- FlowMatchEuler with n steps is our ``euler`` (x + (s - t) u) on the n sigmas plus the denoise step.
- DPMSolverMultistep (``dpmsolver++``, ``solver_order=2``, ``solver_type="midpoint"``) is ``dpmpp_2m`` with
  ``lower_order_final=False`` (diffusers' forced first-order last step to sigma = 0 is the denoise step);
  ``solver_order=1`` is ``ddim``.
- UniPC (``bh2``, data prediction) is ``unipc`` with ``order=solver_order`` and the ``lower_order_final`` whose
  order schedule equals diffusers' (checked step by step).

Whatever is not reproduced exactly is refused with a ValueError naming the option, never approximated (see
`flow_scheduler_grid`). diffusers computes its sigmas and, in ``step``, the state in float32, so a float64 solve
agrees with diffusers' own loop to float32 rounding (~1e-7 relative); with diffusers' arithmetic in float64 the two
loops agree to ~1e-15.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .._utils import check_count
from ..interpolant import RectifiedFlow
from ..score import ScoreModel
from ..solvers.multistep import multistep_order
from .diffusers import _betas_from_config, _config

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
TimeInput = Literal["timestep", "sigma"]


# ---------------------------------------------------------------------------------------------------------------
# the scheduler
# ---------------------------------------------------------------------------------------------------------------
def _flow_kind(scheduler_or_config: Any) -> tuple[str, dict]:
    """(class name, config) of a supported flow-matching scheduler; ValueError otherwise."""
    cfg = _config(scheduler_or_config)
    name = cfg.get("_class_name")
    if not name and not isinstance(scheduler_or_config, Mapping):
        name = type(scheduler_or_config).__name__
    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"unsupported scheduler {name!r} for a flow-matching model; expected one of {FLOW_SCHEDULERS} "
                         "(a config mapping needs its '_class_name'). DDPM-type schedulers: use from_diffusers")
    if name != "FlowMatchEulerDiscreteScheduler":
        if not cfg.get("use_flow_sigmas", False):
            raise ValueError(f"{name} needs use_flow_sigmas=True to run a flow-matching model")
        if cfg.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{name} needs prediction_type='flow_prediction' to run a flow-matching model, got "
                             f"{cfg.get('prediction_type')!r}")
    return name, cfg


def _refuse(name: str, cfg: dict, **supported: Any) -> None:
    """ValueError for the first option whose value differs from the one we reproduce (None and [] mean unset)."""
    for key, want in supported.items():
        got = cfg.get(key, want)
        if want is None:
            bad = got not in (None, [], ())
        elif isinstance(want, bool):
            bad = bool(got) != want
        else:
            bad = got != want
        if bad:
            raise ValueError(f"{name} with {key}={got!r} is not reproduced by scoresolve's solvers (supported: "
                             f"{key}={want!r})")


# ---------------------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------------------
class FlowTimestep:
    """Time convention of diffusers' flow networks: our t (= sigma) -> the network's timestep input.

    ``mode="float"``: sigma N (FlowMatchEulerDiscreteScheduler's float timesteps); ``"floor"``: int(sigma N), what
    DPMSolverMultistep / UniPC with ``use_flow_sigmas`` pass (computed in float64 from t; a float32 t within
    ~N 6e-8 of an integer step may truncate differently from diffusers' float64 sigma). ``divisor``: divide the
    result (Flux pipelines call the transformer with ``timestep / 1000``).
    """

    def __init__(self, num_timesteps: int, mode: Literal["float", "floor"] = "float",
                 divisor: float | None = None) -> None:
        if mode not in ("float", "floor"):
            raise ValueError(f"mode must be 'float' or 'floor', got {mode!r}")
        self.num_timesteps, self.mode, self.divisor = check_count(num_timesteps, "num_timesteps"), mode, divisor

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            out = t * self.num_timesteps
        else:
            out = torch.floor(t.double() * self.num_timesteps).to(t.dtype)
        return out if self.divisor is None else out / self.divisor

    def __repr__(self) -> str:
        return f"FlowTimestep(num_timesteps={self.num_timesteps}, mode={self.mode!r}, divisor={self.divisor})"


class FlowTransformerNet:
    """``transformer(x, timestep)`` returning a tensor: calls diffusers transformers by keyword
    (``hidden_states=, timestep=``, since their second positional argument is the text embedding), other callables
    positionally, and unwraps ``.sample`` / tuple outputs."""

    def __init__(self, transformer: Any) -> None:
        if not callable(transformer):
            raise TypeError(f"transformer must be callable, got {type(transformer).__name__}")
        self.transformer = transformer
        fn = getattr(transformer, "forward", transformer)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.by_keyword = "hidden_states" in params and "timestep" in params

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.by_keyword:
            out = self.transformer(hidden_states=x, timestep=timestep, **kwargs)
        else:
            out = self.transformer(x, timestep, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out


def from_diffusers_flow(
    transformer: Any,
    scheduler_or_config: Any,
    *,
    time_input: TimeInput = "timestep",
    net_kwargs: dict[str, Any] | None = None,
) -> tuple[ScoreModel, RectifiedFlow]:
    """Wrap a diffusers flow-matching network (SD3/Flux/... transformer, or any ``net(x, timestep)``) for its scheduler.

    Args:
        transformer: the network predicting the velocity u = eps - x0; called as ``transformer(hidden_states=x,
            timestep=...)`` when its forward has those parameters, else ``transformer(x, timestep)``; ``.sample`` and
            tuple outputs are unwrapped.
        scheduler_or_config: ``FlowMatchEulerDiscreteScheduler``, or ``DPMSolverMultistepScheduler`` /
            ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True, prediction_type="flow_prediction"`` (an instance
            or its config mapping with ``_class_name``).
        time_input: ``"timestep"`` (default): the network takes the scheduler's timestep (sigma N, truncated to an
            integer by the multistep schedulers), as SD3 pipelines pass it; ``"sigma"``: the timestep / 1000, as Flux
            pipelines pass it.
        net_kwargs: extra keyword arguments for every call (``encoder_hidden_states``, ``pooled_projections``,
            ``txt_ids``, ``img_ids``, ``guidance``, ...).

    Returns:
        ``(ScoreModel(prediction="flow"), RectifiedFlow())``; with FlowMatchEuler and ``time_input="timestep"`` the
        model's time is ``"scaled"`` (t N), otherwise a [`FlowTimestep`][scoresolve.adapters.FlowTimestep].
    """
    name, cfg = _flow_kind(scheduler_or_config)
    if time_input not in ("timestep", "sigma"):
        raise ValueError(f"time_input must be 'timestep' or 'sigma', got {time_input!r}")
    N = int(cfg.get("num_train_timesteps", 1000))
    mode = "float" if name == "FlowMatchEulerDiscreteScheduler" else "floor"
    time: Any = "scaled"
    if mode == "floor" or time_input == "sigma":
        time = FlowTimestep(N, mode, divisor=1000.0 if time_input == "sigma" else None)
    sde = RectifiedFlow()
    model = ScoreModel(FlowTransformerNet(transformer), sde, prediction="flow", time=time, num_timesteps=N,
                       net_kwargs=net_kwargs)
    return model, sde


# ---------------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowSchedule:
    """What ``scoresolve.sample`` needs to reproduce a flow scheduler's loop: ``sample(model, sde, x_T,
    **schedule.sample_kwargs())``.

    ``grid``: decreasing float64 times (t = diffusers' sigma), the scheduler's sigmas without their final 0;
    ``denoise``: the last step (to sigma = 0) is our denoise step; ``solver`` and ``options``: our solver and its
    options; ``timesteps``: the network inputs diffusers passes at the grid times (float64, informative).
    """

    grid: torch.Tensor
    denoise: bool
    solver: str
    options: dict = field(default_factory=dict)
    timesteps: torch.Tensor | None = None

    def sample_kwargs(self) -> dict:
        return {"solver": self.solver, "grid": self.grid, "denoise": self.denoise, **self.options}


def _time_shift(cfg: dict, mu: float, t: np.ndarray) -> np.ndarray:
    kind = cfg.get("time_shift_type", "exponential")
    if kind == "exponential":  # diffusers' _time_shift_exponential with sigma = 1
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    raise ValueError(f"time_shift_type={kind!r} is not reproduced (supported: 'exponential', 'linear')")


def _stretch_to_terminal(cfg: dict, t: np.ndarray) -> np.ndarray:
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - cfg["shift_terminal"])
    return 1 - (one_minus_z / scale_factor)


def _euler_sigmas(scheduler: Any, cfg: dict, n: int | None, mu: float | None, sigmas: Any) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler.set_timesteps's sigmas (without the final 0), in float64."""
    _refuse("FlowMatchEulerDiscreteScheduler", cfg, invert_sigmas=False, stochastic_sampling=False)
    N = int(cfg.get("num_train_timesteps", 1000))
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError("use_dynamic_shifting=True needs mu (diffusers' set_timesteps(..., mu=...); Flux: "
                         "mu = log(scoresolve.flux_shift(image_seq_len)))")
    shift = float(getattr(scheduler, "shift", cfg.get("shift", 1.0)))  # set_shift() changes the instance's
    if hasattr(scheduler, "sigma_min") and hasattr(scheduler, "sigma_max"):
        sigma_min, sigma_max = float(scheduler.sigma_min), float(scheduler.sigma_max)
    else:  # what __init__ computes (float32, shifted by the config's shift unless dynamic)
        s = torch.tensor([float(N), 1.0], dtype=torch.float32) / N
        if not dynamic:
            s0 = float(cfg.get("shift", 1.0))
            s = s0 * s / (1 + (s0 - 1) * s)
        sigma_max, sigma_min = s[0].item(), s[1].item()
    if sigmas is None:
        if n is None:
            raise ValueError("give num_inference_steps or sigmas")
        ts = np.linspace(sigma_max * N, sigma_min * N, int(n))
        sig = ts / N
    else:
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if n is not None and int(n) != sig.size:
            raise ValueError(f"sigmas has {sig.size} values but num_inference_steps is {n}")
        n = sig.size
    if dynamic:
        sig = _time_shift(cfg, float(mu), sig)  # type: ignore[arg-type]
    else:
        sig = shift * sig / (1 + (shift - 1) * sig)
    if cfg.get("shift_terminal"):
        sig = _stretch_to_terminal(cfg, sig)
    lo = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else sig[-1].item()
    hi = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else sig[0].item()
    if cfg.get("use_karras_sigmas", False):
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    elif cfg.get("use_exponential_sigmas", False):
        sig = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    elif cfg.get("use_beta_sigmas", False):
        import scipy.stats

        sig = np.array([lo + (ppf * (hi - lo)) for ppf in
                        [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]])
    return np.asarray(sig, dtype=np.float64)


def _dpm_sigmas(scheduler: Any, cfg: dict, n: int | None, mu: float | None) -> tuple[np.ndarray, float | None]:
    """DPMSolverMultistepScheduler.set_timesteps's flow sigmas (float64) and its final sigma (None for 0)."""
    name = "DPMSolverMultistepScheduler"
    _refuse(name, cfg, algorithm_type="dpmsolver++", thresholding=False, use_karras_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False)
    order = int(cfg.get("solver_order", 2))
    if order not in (1, 2):
        raise ValueError(f"{name} with solver_order={order} is not reproduced: diffusers' third-order multistep "
                         "update weights the second divided difference by h^3 phi_3(-h) where the exact integral of "
                         "the quadratic (scoresolve's dpmpp_3m) has 2 h^3 phi_3(-h), and its second-order warm-up "
                         "step is the midpoint rule (supported: solver_order=1 or 2)")
    if order == 2:
        _refuse(name, cfg, solver_type="midpoint")
    if n is None:
        raise ValueError("give num_inference_steps")
    N = int(cfg.get("num_train_timesteps", 1000))
    flow_shift = float(cfg.get("flow_shift", 1.0))
    if mu is not None:  # diffusers: assert use_dynamic_shifting and exponential, then flow_shift = exp(mu)
        if not cfg.get("use_dynamic_shifting", False) or cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{name} takes mu only with use_dynamic_shifting=True and time_shift_type='exponential'")
        flow_shift = float(np.exp(mu))
    alphas = np.linspace(1, 1 / N, int(n) + 1)
    sig = 1.0 - alphas
    sig = np.flip(flow_shift * sig / (1 + (flow_shift - 1) * sig))[:-1].copy()
    final = cfg.get("final_sigmas_type", "zero")
    if final == "zero":
        return sig, None
    if final == "sigma_min":  # diffusers' VP sigma of alphas_cumprod[0], also with flow sigmas
        ac = getattr(scheduler, "alphas_cumprod", None)
        a0 = float(ac[0]) if torch.is_tensor(ac) else float(1 - _betas_from_config(cfg)[0])
        return sig, ((1 - a0) / a0) ** 0.5
    raise ValueError(f"{name} with final_sigmas_type={final!r} is not reproduced (supported: 'zero', 'sigma_min')")


def _unipc_sigmas(cfg: dict, n: int | None, mu: float | None, sigmas: Any) -> np.ndarray:
    """UniPCMultistepScheduler.set_timesteps's flow sigmas (float64, without the final 0)."""
    name = "UniPCMultistepScheduler"
    _refuse(name, cfg, predict_x0=True, solver_type="bh2", thresholding=False, use_karras_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, final_sigmas_type="zero", disable_corrector=None,
            solver_p=None)
    if cfg.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("use_dynamic_shifting=True needs mu (diffusers' set_timesteps(..., mu=...))")
    N = int(cfg.get("num_train_timesteps", 1000))
    if sigmas is None:
        if n is None:
            raise ValueError("give num_inference_steps or sigmas")
        sig = np.linspace(1, 1 / N, int(n) + 1)[:-1]
    else:
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1).copy()
    if cfg.get("use_dynamic_shifting", False):
        sig = _time_shift(cfg, float(mu), sig)  # type: ignore[arg-type]
    else:
        fs = float(cfg.get("flow_shift", 1.0))
        sig = fs * sig / (1 + (fs - 1) * sig)
    if cfg.get("shift_terminal"):
        sig = _stretch_to_terminal(cfg, sig)
    sig = np.asarray(sig, dtype=np.float64)
    if np.fabs(sig[0] - 1) < 1e-6:  # diffusers: avoid log(alpha = 0) in its first steps
        sig[0] -= 1e-6
    return sig


def _dpm_orders(n: int, order: int, lof: bool, euler_at_final: bool, zero_final: bool) -> list[int]:
    """The order diffusers' DPMSolverMultistep uses at each of its n steps."""
    out = []
    for k in range(n):
        final = k == n - 1 and (euler_at_final or (lof and n < 15) or zero_final)
        second = k == n - 2 and lof and n < 15
        if order == 1 or k < 1 or final:
            out.append(1)
        elif order == 2 or k < 2 or second:
            out.append(2)
        else:
            out.append(3)
    return out


def _ours_orders(steps: int, order: int, lof: bool) -> list[int]:
    """scoresolve's multistep order schedule (`scoresolve.solvers.multistep.multistep_order`, start = 0)."""
    return [multistep_order(order, i, steps, lof) for i in range(steps)]


def _match_lof(name: str, want: list[int], steps: int, order: int) -> bool:
    """Our lower_order_final giving diffusers' order schedule ``want`` over our ``steps`` steps."""
    for lof in (False, True):
        if _ours_orders(steps, order, lof) == want[:steps]:
            return lof
    raise ValueError(f"{name}: the order schedule {want} of this configuration (solver_order={order}, "
                     "lower_order_final, num_inference_steps) has no equal in scoresolve's multistep solvers")


def flow_scheduler_grid(
    scheduler_or_config: Any,
    num_inference_steps: int | None = None,
    *,
    mu: float | None = None,
    sigmas: Any = None,
) -> FlowSchedule:
    """The grid, solver and options on which ``scoresolve.sample`` reproduces a flow scheduler's loop.

    The arguments are those of the scheduler's ``set_timesteps``: ``mu`` for ``use_dynamic_shifting`` (Flux:
    ``mu = log(scoresolve.flux_shift(image_seq_len))``, diffusers' ``calculate_shift``), custom ``sigmas`` for
    FlowMatchEuler and UniPC (Flux pipelines pass ``np.linspace(1, 1/n, n)``). A scheduler instance's own ``shift``
    (``set_shift``), ``sigma_min``/``sigma_max``, flow_shift and ``alphas_cumprod`` are used; the scheduler is not
    modified (diffusers' DPMSolverMultistep ``set_timesteps(mu=...)`` writes exp(mu) into its config's flow_shift).
    As in diffusers, FlowMatchEuler and UniPC ignore ``mu`` without ``use_dynamic_shifting``; DPMSolverMultistep
    refuses it. A config mapping needs its ``_class_name`` (saved configs have it).

    Reproduced (anything else raises a ValueError naming the option):

    - ``FlowMatchEulerDiscreteScheduler``: ``shift``, ``use_dynamic_shifting`` (``time_shift_type`` exponential or
      linear), ``shift_terminal``, ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``, custom
      sigmas -> ``euler``. Refused: ``invert_sigmas`` (the loop runs towards noise), ``stochastic_sampling`` (fresh
      noise from diffusers' generator at every step).
    - ``DPMSolverMultistepScheduler`` with flow sigmas, ``flow_shift``, ``mu``: ``dpmsolver++`` order 2 midpoint ->
      ``dpmpp_2m``, order 1 -> ``ddim``; ``final_sigmas_type`` zero (denoise) or sigma_min (diffusers' VP sigma of
      alphas_cumprod[0] as a last grid point). Refused: order 3, ``heun``, ``dpmsolver``, SDE variants,
      thresholding, Karras/exponential/beta/Lu sigmas.
    - ``UniPCMultistepScheduler`` with flow sigmas (bh2, predict_x0): ``unipc`` with ``order=solver_order`` (1-4),
      ``flow_shift``, dynamic shifting, ``shift_terminal``, custom sigmas. Refused: bh1, ``predict_x0=False``,
      ``disable_corrector``, ``solver_p``, ``final_sigmas_type="sigma_min"`` (its last step goes from the last sigma
      to itself), Karras/exponential/beta sigmas, and order schedules we cannot match (``lower_order_final=False``
      with solver_order >= 2: diffusers' last, higher-order step to sigma = 0 is not finite; ``solver_order >= 3``
      with ``lower_order_final=True`` and more than 3 steps: diffusers winds down one step later than we can).
    """
    name, cfg = _flow_kind(scheduler_or_config)
    sch = None if isinstance(scheduler_or_config, Mapping) else scheduler_or_config
    if num_inference_steps is not None:
        num_inference_steps = check_count(num_inference_steps, "num_inference_steps")  # an integer >= 1, not rounded
    N = int(cfg.get("num_train_timesteps", 1000))
    last: float | None = None
    options: dict[str, Any] = {}
    if name == "FlowMatchEulerDiscreteScheduler":
        sig = _euler_sigmas(sch, cfg, num_inference_steps, mu, sigmas)
        solver, timesteps = "euler", sig * N
    elif name == "DPMSolverMultistepScheduler":
        if sigmas is not None:
            raise ValueError("DPMSolverMultistepScheduler.set_timesteps takes no sigmas")
        sig, last = _dpm_sigmas(sch, cfg, num_inference_steps, mu)
        n, order = sig.size, int(cfg.get("solver_order", 2))
        want = _dpm_orders(n, order, bool(cfg.get("lower_order_final", True)), bool(cfg.get("euler_at_final", False)),
                           last is None)
        if order == 1:
            solver = "ddim"
        else:
            solver = "dpmpp_2m"
            options["lower_order_final"] = _match_lof(name, want, n if last is not None else n - 1, order)
        timesteps = np.floor(sig * N)
    else:
        sig = _unipc_sigmas(cfg, num_inference_steps, mu, sigmas)
        n, order = sig.size, int(cfg.get("solver_order", 2))
        if order not in (1, 2, 3, 4):
            raise ValueError(f"UniPCMultistepScheduler with solver_order={order} is not reproduced (supported: 1-4)")
        lof = bool(cfg.get("lower_order_final", True))
        want = [min(order, k + 1, n - k) if lof else min(order, k + 1) for k in range(n)]
        if want[-1] != 1:
            raise ValueError(f"UniPCMultistepScheduler with lower_order_final=False and solver_order={order}: its last "
                             "step to sigma = 0 is of order >= 2, which divides by a zero log-SNR ratio (diffusers' "
                             "own loop returns non-finite values); use lower_order_final=True")
        solver = "unipc"
        options.update(order=order, lower_order_final=_match_lof("UniPCMultistepScheduler", want, n - 1, order))
        timesteps = np.floor(sig * N)
    grid = torch.from_numpy(np.ascontiguousarray(sig, dtype=np.float64))
    if last is not None:
        grid = torch.cat([grid, torch.tensor([last], dtype=torch.float64)])
    if not bool(torch.isfinite(grid).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"{name}: the sigmas {grid.tolist()[:6]}... are not strictly decreasing and finite")
    if float(grid[-1]) <= 0 or float(grid[0]) > 1:
        raise ValueError(f"{name}: the sigmas must lie in (0, 1], got [{float(grid[-1])}, {float(grid[0])}]")
    if grid.numel() < 2:
        raise ValueError(f"{name} with a single step is one x0 prediction: model.x0(x_T, t) at t = {float(grid[0])} "
                         "(a grid needs at least two points)")
    return FlowSchedule(grid=grid, denoise=last is None, solver=solver, options=options,
                        timesteps=torch.as_tensor(np.asarray(timesteps, dtype=np.float64)))
