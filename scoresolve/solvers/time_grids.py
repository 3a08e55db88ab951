"""Time grids for fixed-step samplers: decreasing from T to t_eps, ``steps + 1`` points.

- ``uniform``:   uniform in t.
- ``quadratic``: uniform in sqrt(t) (DPM-Solver's "time_quadratic"), denser near t_eps.
- ``logsnr``:    uniform in lambda = log(alpha/sigma) (DPM-Solver's "logSNR").
- ``karras``:    EDM's rho-schedule (Karras et al. 2022, eq. 5) in sigma_edm = sigma/alpha = exp(-lambda), rho = 7.
- ``flow`` / ``flow:P``: the same rho-schedule with exponent P (default 2) in the rectified-flow time
  u = sigma / (alpha + sigma) = 1 / (1 + e^lambda), u_i = (u_T^(1/P) + i/N (u_eps^(1/P) - u_T^(1/P)))^P. u depends on
  the log-SNR alone, so the grid is the same ODE discretisation on every process with the same log-SNR range, and it
  stays finite where alpha(T) = 0 (u = 1). P = 1 is uniform in u (uniform in t on rectified flow); larger P is
  denser near the data.
- ``tuned:<name>``: a grid fitted by `scoresolve.tuning.tune_grid` and saved under ``<name>``
  (`scoresolve.solvers.grid_store.load_grid`); its step
  count, T and t_eps must match the request (e.g. ``sample(..., nfe=5, grid="tuned:digits-unipc-5")``).

``shift`` s applies SD3's timestep shift t/T -> s u/(1 + (s - 1) u) (`scoresolve.sd3_shift`; Flux: s =
`scoresolve.flux_shift`) to the grid, keeping both end points: the named grid is laid between T and the pre-image of
t_eps, then shifted (a uniform grid then matches diffusers' FlowMatchEulerDiscreteScheduler with ``shift=s``).
"""

from __future__ import annotations

import math

import torch

from .._utils import check_count, check_positive, check_t_eps
from ..sde import ForwardSDE
from .grid_store import load_grid

GRIDS = ("uniform", "quadratic", "logsnr", "karras", "flow")


def check_grid_name(kind: object) -> str:
    """``kind`` if it names a grid (one of `GRIDS`, ``flow:P`` with P > 0, ``tuned:NAME``), whether or not a given
    process supports it; else TypeError (not a str) or ValueError listing the names."""
    if not isinstance(kind, str):
        raise TypeError(f"a grid name must be a str, got {type(kind).__name__}")
    if kind in GRIDS or kind.startswith("tuned:"):
        return kind
    if kind.startswith("flow:"):
        try:
            p = float(kind[5:])
        except ValueError:
            p = math.nan
        if math.isfinite(p) and p > 0:
            return kind
        raise ValueError(f"grid {kind!r}: the exponent must be a positive number")
    raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}, 'flow:P' or 'tuned:NAME'")


def time_grid(
    sde: ForwardSDE,
    steps: int,
    kind: str = "uniform",
    t_eps: float = 1e-3,
    T: float | None = None,
    *,
    rho: float = 7.0,
    shift: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    solver: str | None = None,
) -> torch.Tensor:
    """A decreasing grid of ``steps + 1`` times from T to t_eps (both included); ``shift``: see the module
    docstring. ``solver``: the solver that will run on it (a tuned grid must have been tuned for it).

    Raises MemoryError, with the estimate, for a step count whose grid and per-step schedule would not fit in the
    host memory (`grid_bytes`)."""
    T = sde.T if T is None else float(T)
    steps = check_count(steps, "steps")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype (the grid's times), got {dtype}")
    if kind == "karras":
        check_positive(rho, "rho of the karras grid")
    check_grid_memory(steps)
    t_eps = check_t_eps(t_eps, T)
    if T > sde.T * (1 + 1e-9):
        raise ValueError(f"T = {T} exceeds the SDE's T = {sde.T}")
    if isinstance(kind, str) and kind.startswith("tuned:"):
        return _tuned_grid(kind, steps, t_eps, T, shift, sde, solver).to(dtype=dtype, device=device)
    if shift is not None:
        from ..interpolant import sd3_shift

        if kind in ("logsnr", "karras"):
            raise ValueError(f"shift applies to the grids in t (uniform, quadratic), not to {kind!r}")
        s = float(shift)
        sd3_shift(torch.zeros(()), s)  # validates s
        pre = lambda t: t / (s - (s - 1) * t)  # noqa: E731  (inverse of the shift, on t/T)
        base = time_grid(sde, steps, kind, t_eps=pre(t_eps / T) * T, T=T, rho=rho)
        ts = sd3_shift(base / T, s) * T
        ts[0], ts[-1] = T, t_eps
        return ts.to(dtype=dtype, device=device)
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        ts = T + (t_eps - T) * u
    elif kind == "quadratic":
        ts = (T**0.5 + (t_eps**0.5 - T**0.5) * u) ** 2
    elif kind == "flow" or (isinstance(kind, str) and kind.startswith("flow:")):
        try:
            p = float(kind[5:]) if kind.startswith("flow:") else 2.0
        except ValueError:
            p = math.nan
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"grid {kind!r}: the exponent must be a positive number")
        end = torch.tensor([T, t_eps], dtype=torch.float64)
        lam_T, lam_eps = sde.log_snr(end).tolist()
        u_T, u_eps = 1 / (1 + math.exp(lam_T)), 1 / (1 + math.exp(lam_eps))  # u = sigma / (alpha + sigma)
        u_grid = (u_T ** (1 / p) + (u_eps ** (1 / p) - u_T ** (1 / p)) * u) ** p
        ts = sde.t_from_log_snr(torch.log1p(-u_grid) - torch.log(u_grid))  # lambda = log((1 - u) / u)
        ts[0], ts[-1] = T, t_eps  # exact end points (and t = T where u = 1, lambda = -inf)
    elif kind in ("logsnr", "karras"):
        end = torch.tensor([T, t_eps], dtype=torch.float64)
        lam_T, lam_eps = sde.log_snr(end).tolist()
        if not math.isfinite(lam_T):
            raise ValueError(f"grid {kind!r} is laid out in the log-SNR, which is -inf at T = {T} for {sde!r} "
                             "(alpha(T) = 0); use 'uniform' or 'quadratic' (with shift=), or a T below the SDE's")
        if kind == "logsnr":
            lam = lam_T + (lam_eps - lam_T) * u
        else:
            smax, smin = torch.exp(torch.tensor(-lam_T)), torch.exp(torch.tensor(-lam_eps))
            sig = (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lam = -torch.log(sig)
        ts = sde.t_from_log_snr(lam.to(torch.float64))
        ts[0], ts[-1] = T, t_eps  # exact end points
    else:
        raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}, 'flow:P' or 'tuned:NAME'")
    return ts.to(dtype=dtype, device=device)


GRID_BYTES_PER_STEP = 256  # host memory of one grid step: its time and the schedule's Python floats (measured ~200)


def grid_bytes(steps: int) -> int:
    """Estimated host memory of a fixed-grid run of ``steps`` steps (the grid and its per-step schedule lists)."""
    return (int(steps) + 1) * GRID_BYTES_PER_STEP


def check_grid_memory(steps: int) -> None:
    """MemoryError, with the estimate, when a grid of ``steps`` steps would take more than half the host's
    available memory (``nfe=1e9`` used to grow until the machine killed the process)."""
    from ..divergence import available_bytes

    need = grid_bytes(steps)
    if need < 2**26:  # 64 MiB: no need to ask
        return
    avail = available_bytes(torch.device("cpu"))
    if avail is not None and need > avail // 2:
        raise MemoryError(f"a grid of {steps} steps needs about {need / 2**30:.3g} GiB of host memory for its times "
                          f"and schedule, more than half the {avail / 2**30:.3g} GiB available (and {steps} network "
                          f"evaluations per sample): ask for fewer steps / a smaller nfe")


def _tuned_grid(kind: str, steps: int, t_eps: float, T: float, shift: float | None, sde: ForwardSDE,
                solver: str | None) -> torch.Tensor:
    tuned = load_grid(kind[len("tuned:"):])
    if shift is not None:
        raise ValueError(f"shift does not apply to a tuned grid ({kind!r})")
    if solver is not None and tuned.solver != solver:
        raise ValueError(f"grid {kind!r} was tuned for solver {tuned.solver!r}, not {solver!r}")
    if tuned.sde and tuned.sde != repr(sde):
        raise ValueError(f"grid {kind!r} was tuned on {tuned.sde}, not on {sde!r}")
    if tuned.steps != steps:
        raise ValueError(f"grid {kind!r} has {tuned.steps} steps (tuned for {tuned.solver} at nfe={tuned.nfe}), but "
                         f"{steps} were asked: pass nfe={tuned.nfe} (sample's default is nfe=20)")
    if not math.isclose(tuned.t_eps, t_eps, rel_tol=1e-9) or not math.isclose(tuned.T, T, rel_tol=1e-9):
        raise ValueError(f"grid {kind!r} runs from T={tuned.T} to t_eps={tuned.t_eps}, but T={T}, t_eps={t_eps} "
                         "were asked")
    return tuned.grid.clone()
