"""``sample()``: the one entry point that runs any registered solver on a reverse process of a forward SDE."""

from __future__ import annotations

import contextlib
import numbers
from collections import OrderedDict
from typing import Any, Callable

import torch

from ._utils import check_batched, check_count, check_generator, check_t_eps
from .process import Process, check_capabilities, check_process
from .reverse import Diffusion
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers import REGISTRY, AdaptiveSolver, NonFiniteError, Solution, time_grid
from .solvers._grid import check_grid
from .solvers._registry import fitting_solvers
from .solvers.defaults import LOG_SNR_GRIDS, default_for_process


def sample(
    score: Callable | ScoreModel,
    sde: Process,
    x_T: torch.Tensor,
    *,
    solver: str | None = None,
    nfe: int | None = None,
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    t_eps: float = 1e-3,
    diffusion: Diffusion | None = None,
    denoise: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    grid: str | torch.Tensor | None = None,
    shift: float | None = None,
    save_trajectory: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    grad: bool = False,
    **options: Any,
) -> Solution:
    """Solve a reverse process of ``sde`` from ``x_T`` at time T down to ``t_eps``.

    Args:
        score: a callable ``score(x, t)`` (t of shape ``[batch]``) or a [`ScoreModel`][scoresolve.ScoreModel].
        sde: the forward SDE.
        x_T: initial state ``[batch, ...]`` (e.g. ``sde.prior_sample(...)``).
        solver: a name from ``scoresolve.solvers.REGISTRY`` (``scoresolve.list_solvers()``), or
            ``"torchdiffeq:<method>"`` / ``"torchsde:<method>"``. None (default): the measured best sampler for
            the budget and the model's prediction (`scoresolve.solvers.defaults`): for x0, v and flow models vAB on
            the grid flow:1 (uniform in u = sigma / (alpha + sigma)) below 8 NFE, flow:1.5 from 8 on, order
            2 / 3 / 4 below 8 / below 20 / from 20 NFE; for eps and score models (and plain score callables)
            ``dpmpp_2m`` on its grid; with ``diffusion`` > 0, ``euler_maruyama``.
        nfe: budget of score evaluations of the solver (an integer); grid solvers take the largest step count that
            fits. The final ``denoise`` evaluation is not part of it: ``nfe=9, denoise=True`` reports 10 NFE.
        steps: number of steps of a grid solver (overrides ``nfe``).
        rtol: relative tolerance of adaptive solvers.
        atol: absolute tolerance of adaptive solvers.
        t_eps: the time nearest the data (0 < t_eps < T): the solve runs between T and t_eps (here from T down
            to t_eps; `log_likelihood` integrates the same span upwards).
        diffusion: s(t) of the reverse family, as a multiple of g (0: probability-flow ODE, 1: reverse SDE)
            or a callable; None takes the solver's default (1 for the SDE samplers euler_maruyama,
            reverse_diffusion, pc, adaptive_sde and torchsde, 0 for the ODE solvers).
        denoise: return Tweedie's estimate E[x_0 | x_{t_eps}] (one extra score evaluation).
        generator: randomness of stochastic solvers.
        progress: show a progress bar.
        grid: a grid name (``uniform``, ``quadratic``, ``logsnr``, ``karras``) or an explicit decreasing tensor of
            times (then its last time is the end time and ``t_eps`` is not used). Default: the solver's default
            grid, or ``uniform`` on a process whose alpha(T) = 0 (rectified flow), where grids denser near t_eps
            waste steps.
        shift: SD3's timestep shift of a named grid (`scoresolve.sd3_shift`; Flux's: `scoresolve.flux_shift`),
            end points kept.
        save_trajectory: keep the states at every step in ``Solution.xs``.
        callback: ``callback(i, t, x)`` after step ``i`` of a grid solver, with ``t`` the time reached (0-d tensor)
            and ``x`` the state there; adaptive solvers call it at their periodic checks with the iteration count,
            the per-sample times and states. For monitoring: it must not modify ``x``.
        grad: differentiate through the solve. By default (False) the solve runs under ``torch.no_grad()``: no
            autograd graph is kept, whatever the network's parameters, and ``sol.x.requires_grad`` is False (memory
            stays flat in the NFE). ``grad=True`` runs in the caller's grad mode, so gradients flow from ``sol.x``
            to ``x_T`` and to the network's parameters (step sizes of adaptive solvers are treated as constants).
            ``torch.no_grad`` rather than ``torch.inference_mode``: the samples stay ordinary tensors that can be
            modified in place or fed to `log_likelihood` and to gradient guidance.
        options: passed to the solver (e.g. ``eta`` for ddim, ``snr`` for pc; for the adaptive ones ``max_steps``
            (most step attempts of any sample), ``controller`` (the step-size controller; default `PIController()`)
            and ``time_variable`` (None: the rule `log_likelihood` uses, `scoresolve.solvers.ode.choose_time_variable`)
            mean what `log_likelihood`'s arguments of the same names mean). ``calibration=cal`` (a
            `Calibration` from `scoresolve.calibrate`, or the name of a saved one) runs the calibrated sampler on
            its grid and budget (no solver, grid or another nfe needed; another process or model is refused).

    Raises:
        IncompatibleProcessError: the solver (with these options and this diffusion) requires a capability that
            ``sde`` does not declare (`scoresolve.Process`); the message lists the solvers that fit.
    """
    with contextlib.nullcontext() if grad else torch.no_grad():
        return _sample(score, sde, x_T, solver, nfe, steps, rtol, atol, t_eps, diffusion, denoise, generator,
                       progress, grid, shift, save_trajectory, callback, options)


def check_entry(sde: Any, x: torch.Tensor, name: str, nfe: Any, steps: Any, t_eps: Any
                ) -> tuple[int | None, int | None, float]:
    """The checks every sampling entry makes (`sample`, `compile_sampler`): a process, a finite batched start
    ``x`` (called ``name``), whole counts ``nfe`` / ``steps`` (None: not given; the solver names its own minimum) and
    t_eps in (0, T). Returns (nfe, steps, t_eps) as numbers."""
    check_process(sde)
    check_batched(x, name)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values")
    nfe = None if nfe is None else check_count(nfe, "nfe", minimum=None)
    steps = None if steps is None else check_count(steps, "steps", minimum=None)
    return nfe, steps, check_t_eps(t_eps, sde.T)


def _sample(score, sde, x_T, solver, nfe, steps, rtol, atol, t_eps, diffusion, denoise, generator, progress, grid,
            shift, save_trajectory, callback, options) -> Solution:
    nfe, steps, t_eps = check_entry(sde, x_T, "x_T", nfe, steps, t_eps)
    x_T = x_T.clone()  # the solvers write into their state; the caller's x_T stays as it was
    check_solve_arguments(solver, grid, diffusion, generator, callback)
    model = ScoreModel.wrap(score, sde)  # the one wrap; each solve counts its network calls on a copy
    solver, nfe, steps, grid, model, sde = _calibrated_sampler(solver, nfe, steps, grid, options, model, sde)
    if solver is None:
        solver, options, grid, model, sde = _default_sampler(nfe, steps, grid, diffusion, options, model, sde)
    keywords: dict[str, Any] = {"callback": callback, "save_trajectory": save_trajectory}
    if ":" in solver:
        from .solvers.backends import solve_with_backend

        if diffusion is None:
            diffusion = 1.0 if solver.startswith("torchsde:") else 0.0
        if callable(diffusion) or float(diffusion) != 0.0:
            check_capabilities(f"solver {solver!r} with diffusion > 0", sde, ("reverse_sde",),
                               lambda: fitting_solvers(sde))
        if grid is not None:
            options["grid"] = grid
        sol = solve_with_backend(solver, sde.reverse(model, diffusion), x_T, sde.T, t_eps, nfe=nfe, steps=steps,
                                 rtol=rtol, atol=atol, generator=generator, **options)
    else:
        if solver not in REGISTRY:
            raise ValueError(f"unknown solver {solver!r}; available: {sorted(REGISTRY)}")
        spec = REGISTRY[solver]
        spec.check_options(options)
        spec.check_process(sde, options, diffusion)
        process = sde.reverse(model, spec.default_diffusion if diffusion is None else diffusion)
        if spec.stochastic:
            check_generator(generator, like=x_T)  # its draws are on x_T's device: refused now, not at the first
            keywords["generator"] = generator
        if isinstance(spec, AdaptiveSolver):
            if nfe is not None or steps is not None:
                raise ValueError(f"solver {solver!r} is adaptive: give rtol/atol, not nfe/steps")
            if grid is not None or shift is not None:
                raise ValueError(f"solver {solver!r} is adaptive and chooses its own steps: grid and shift apply only "
                                 "to grid solvers")
            keywords.update({k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None})
            span = torch.tensor([sde.T, t_eps], dtype=torch.float64)
            sol = spec(process, x_T, span, progress=progress, **keywords, **options)
        else:
            if rtol is not None or atol is not None:
                raise ValueError(f"solver {solver!r} runs on a time grid: give nfe or steps, not rtol/atol")
            ts = grid_times(spec, sde, nfe, steps, grid, shift, t_eps, options)
            sol = spec(process, x_T, ts.to(device=x_T.device), progress=progress, **keywords, **options)
            sol.stats.setdefault("grid", ts)
    if denoise:
        # at the time the solve ended (a custom grid's last time, which need not be t_eps)
        if sol.t is not None:
            t_end = sol.t.to(dtype=x_T.dtype, device=x_T.device).expand(x_T.shape[0])
        else:
            t_end = torch.full((x_T.shape[0],), float(t_eps), dtype=x_T.dtype, device=x_T.device)
        x0 = model.x0(sol.x, t_end)
        ok = torch.isfinite(x0).flatten(1).all(1)
        if not bool(ok.all()):  # the solver's guard does not see this last evaluation
            idx = (~ok).nonzero().flatten().tolist()
            raise NonFiniteError(f"{solver} (denoise step)", idx, t_end[~ok].tolist(), sol.x)
        sol.x = x0
        sol.nfe = sol.nfe + 1
    return sol


def check_solve_arguments(solver: object, grid: object, diffusion: object, generator: object = None,
                          callback: object = None) -> None:
    """TypeError, naming the argument, for a solver name, grid, diffusion, generator or callback of the wrong kind."""
    if solver is not None and not isinstance(solver, str):
        raise TypeError(f"solver must be a solver name (a str, see scoresolve.list_solvers()) or None, got "
                        f"{type(solver).__name__}")
    if grid is not None and not isinstance(grid, str) and not torch.is_tensor(grid):
        raise TypeError(f"grid must be a grid name (a str) or a decreasing 1-D tensor of times, got "
                        f"{type(grid).__name__}")
    if diffusion is not None and not callable(diffusion) and not (
            (isinstance(diffusion, numbers.Real) and not isinstance(diffusion, bool))
            or (torch.is_tensor(diffusion) and diffusion.numel() == 1)):
        raise TypeError(f"diffusion must be a number >= 0 (a multiple of g) or a callable s(t), got "
                        f"{diffusion!r} ({type(diffusion).__name__})")
    check_generator(generator)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a callable callback(i, t, x) or None, got {type(callback).__name__}")


def grid_times(spec, sde: ForwardSDE, nfe: int | None, steps: int | None, grid: str | torch.Tensor | None,
               shift: float | None, t_eps: float, options: dict) -> torch.Tensor:
    """The float64 time grid of a grid solver's run, as `sample` chooses it from ``nfe`` / ``steps`` / ``grid``."""
    solver = spec.name
    if torch.is_tensor(grid):
        if shift is not None:
            raise ValueError("shift applies to a named grid, not to an explicit grid tensor")
        ts = check_grid(grid.to(torch.float64), sde.T)
        if steps is not None or nfe is not None:
            raise ValueError("give either an explicit grid tensor or steps/nfe, not both")
        return ts
    if steps is None:
        steps = spec.steps_for_nfe(nfe if nfe is not None else 20, options)
    elif steps < spec.min_steps:
        raise ValueError(f"solver {solver!r} needs at least {spec.min_steps} step(s), got {steps}")
    own = sde.default_time_grid(steps, t_eps) if grid is None and shift is None else None
    if own is not None:  # the process's own schedule (`Process.default_time_grid`)
        return check_grid(own.to(torch.float64), sde.T)
    kind = grid or default_grid(spec.default_grid, sde)
    if kind.split(":")[0] in LOG_SNR_GRIDS:
        check_capabilities(f"grid {kind!r}", sde, ("gaussian_kernel",))
    if kind.startswith("tuned"):  # read from the grid store: never cached
        return time_grid(sde, steps, kind, t_eps, shift=shift, solver=solver)
    key = (sde, steps, kind, float(t_eps), shift, solver)
    try:
        ts = _GRIDS.pop(key)
    except KeyError:
        ts = time_grid(sde, steps, kind, t_eps, shift=shift, solver=solver)
    except TypeError:  # an unhashable process
        return time_grid(sde, steps, kind, t_eps, shift=shift, solver=solver)
    _GRIDS[key] = ts
    while len(_GRIDS) > 64:
        _GRIDS.popitem(last=False)
    return ts.clone()


_GRIDS: OrderedDict = OrderedDict()
"""Named grids already built (an LRU of 64): repeated solves of the same process and budget skip the construction."""


def _calibrated_sampler(solver, nfe, steps, grid, options: dict, model: ScoreModel, sde):
    """(solver, nfe, steps, grid, model, process) of a solve: unchanged, or with ``calibration=`` in ``options`` (and
    no other solver named) the calibrated sampler on its calibration's grid, process and model
    (`scoresolve.solvers.calibrated.calibrated_setup`; ``options["calibration"]`` becomes the record)."""
    if options.get("calibration") is None or solver not in (None, "calibrated"):
        return solver, nfe, steps, grid, model, sde
    from .solvers.calibrated import calibrated_setup

    options["calibration"], grid, model, sde = calibrated_setup(options["calibration"], nfe, steps, grid, model, sde)
    return "calibrated", None, None, grid, model, sde


def _default_sampler(nfe, steps, grid, diffusion, options, model: ScoreModel, sde
                     ) -> tuple[str, dict, Any, ScoreModel, Any]:
    """The solver, options, grid, model and process when the caller names no solver
    (`scoresolve.solvers.defaults`): the process is ``sde`` or its `ode_view`, and then the model is a copy bound to
    the view."""
    if diffusion is not None and not (isinstance(diffusion, (int, float)) and float(diffusion) == 0.0):
        return "euler_maruyama", options, grid, model, sde
    budget = steps if steps is not None else (nfe if nfe is not None else 20)
    name, opts, default, process = default_for_process(int(budget), options, model.prediction, sde)
    if process is not sde:  # the default runs on the process's ode_view (`Process.ode_view`)
        model = model.on(process)
    return name, opts, default if grid is None else grid, model, process


def default_grid(solver_default: str, sde: ForwardSDE) -> str:
    """The grid a solver uses when the caller names none: its registered default, but ``uniform`` where alpha(T) = 0
    (interpolants such as rectified flow; the defaults denser near t_eps were chosen on VP)."""
    if sde.velocity_form and float(sde.alpha(sde.T)) == 0.0:
        return "uniform"
    return solver_default


def list_solvers() -> dict[str, str]:
    """Registered solver names with one-line descriptions."""
    return {name: spec.description for name, spec in sorted(REGISTRY.items())}
