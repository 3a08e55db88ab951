"""Time-grid optimisation: fit the time grid of a grid solver to a model and an NFE budget, then reuse it by name.

    from scoresolve.tuning import tune_grid, load_grid
    tuned = tune_grid(model, sde, nfe=5, solver="unipc", shape=(1, 8, 8), num_samples=32)
    tuned.save("digits-unipc-5")                   # JSON under ~/.cache/scoresolve/grids (or $SCORESOLVE_GRID_DIR)
    x = sample(model, sde, x_T, solver="unipc", grid=tuned.grid).x
    x = sample(model, sde, x_T, solver="unipc", nfe=5, grid="tuned:digits-unipc-5").x
    tuned = load_grid("digits-unipc-5")

How (GITS, Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", plus a refinement):

1. Reference trajectories. A fine fixed-grid solve (``reference_solver``, default dpmpp_3m) from the tuning x_T on
   ``candidates`` times uniform in log-SNR (uniform in t where the log-SNR is -inf at T), each interval split into
   ``substeps``; the states at the candidate times are the reference trajectory, its last state the reference end.
2. ``method="gits"``: the cost of one DDIM step (the first-order exponential integrator, data prediction) from the
   reference state at candidate time t_i to t_j is the RMS distance of its result to the reference state at t_j,
   averaged over the tuning samples (one network call per candidate time gives every pair). Dynamic programming
   picks the path of ``steps`` steps from T to t_eps with the least summed cost. GITS uses this one-step cost for
   multistep solvers too; ``cost="solver"`` uses the solver's own second-order two-step update instead (the step
   from t_i to t_j with the predictions at t_i and at the previous grid time t_k: DPM-Solver++(2M) for dpmpp_2m,
   dpmpp_3m and unipc, Adams-Bashforth-2 on eps for ipndm, DEIS's two-node Lagrange weights for deis), with the
   first step (and with ``lower_order_final`` the last) one-step; with ``afs=True`` the first prediction is the
   prior's. The DP then runs over pairs (t_k, t_i).
3. ``method="descent"`` (the default): GITS's grid, or the solver's default grid (or one of the named grids in
   ``starts``) if that is better on the tuning samples, refined by a compass search minimising the actual solver's
   end error (mean per-sample relative error against the reference end) on the tuning samples. The grid is
   parametrised monotonically: softmax increments of the log-SNR (of t where the log-SNR is -inf at T) between the
   fixed end points. The search stops after
   ``max_sweeps`` sweeps over the coordinates or when its step falls below ``min_step``.

The record (`TunedGrid`) carries the grid, the train error of the solver on it and on the default grid, and the cost of
tuning (network evaluations per tuning sample, batched network calls, seconds). Measured results:
``benchmarks/tune_grid.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .score import ScoreModel
from .sde import ForwardSDE
from .solvers import REGISTRY
from .solvers._grid import check_grid
from .solvers.grids import time_grid

METHODS = ("gits", "descent")
COSTS = ("ddim", "solver")
# solvers with a two-step form for ``cost="solver"`` (their second-order update from two predictions)
TWO_STEP = ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis")
GRID_DIR_ENV = "SCORESOLVE_GRID_DIR"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FORMAT = 1


@dataclass
class TunedGrid:
    """A fitted time grid and how it was obtained.

    Attributes:
        grid: the decreasing float64 times, ``steps + 1`` of them, from T to t_eps; use as ``sample(..., grid=grid)``.
        solver: the solver it was tuned for; ``nfe``/``steps`` its budget.
        method: ``"gits"`` or ``"descent"`` (see the module docstring); ``start``: the grid the descent started from
            (``"gits"`` or ``"default"``).
        train_error: the objective (mean per-sample relative error by default) of the solver's end point on this
            grid against the reference end, on the tuning samples; ``default_error`` and ``gits_error`` the same for
            the solver's default grid and for ``gits_grid``, GITS's grid (the DP's result).
        evaluations: network evaluations per tuning sample spent on tuning (reference solve, DP costs, default-grid and
            descent solves); ``calls`` the batched network calls; ``seconds`` wall time.
        num_samples: tuning samples; ``candidates``: candidate times of the DP; ``sde``: repr of the process.
    """

    grid: torch.Tensor
    solver: str
    nfe: int
    steps: int
    method: str
    t_eps: float
    T: float
    train_error: float
    default_error: float
    gits_error: float
    evaluations: int
    calls: int
    seconds: float
    num_samples: int
    candidates: int
    sde: str = ""
    start: str = "gits"
    default_grid: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    gits_grid: torch.Tensor | None = None
    name: str | None = None

    def __repr__(self) -> str:
        return (f"TunedGrid(solver={self.solver!r}, nfe={self.nfe}, method={self.method!r}, "
                f"train_error={self.train_error:.3e} (default grid {self.default_error:.3e}, "
                f"gits {self.gits_error:.3e}), evaluations={self.evaluations}, seconds={self.seconds:.1f}, "
                f"grid={[round(t, 5) for t in self.grid.tolist()]})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [float(t) for t in self.grid.tolist()]
        d["gits_grid"] = None if self.gits_grid is None else [float(t) for t in self.gits_grid.tolist()]
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TunedGrid":
        d = dict(d)
        d.pop("format", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fields in a saved grid: {unknown}")
        d["grid"] = grid = check_grid(torch.tensor(d["grid"], dtype=torch.float64), float(d["T"]))
        # the file must agree with itself: an edited grid, step count or end time is refused, never run as it is
        if len(grid) != int(d["steps"]) + 1:
            raise ValueError(f"its grid has {len(grid) - 1} steps, but it records steps={d['steps']}")
        ends = ((float(grid[0]), float(d["T"])), (float(grid[-1]), float(d["t_eps"])))
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in ends):
            raise ValueError(f"its grid runs from {float(grid[0])} to {float(grid[-1])}, but it records T={d['T']}, "
                             f"t_eps={d['t_eps']}")
        spec = REGISTRY.get(d["solver"])
        if spec is None:
            raise ValueError(f"it was tuned for the unknown solver {d['solver']!r}")
        if spec.nfe_for_steps(int(d["steps"]), d.get("options") or {}) != int(d["nfe"]):
            raise ValueError(f"{d['solver']} takes {spec.nfe_for_steps(int(d['steps']), d.get('options') or {})} "
                             f"evaluations for {d['steps']} steps, but it records nfe={d['nfe']}")
        if d.get("gits_grid") is not None:
            d["gits_grid"] = torch.tensor(d["gits_grid"], dtype=torch.float64)
        return cls(**d)

    def save(self, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
        """Write the record as JSON ``<directory>/<name>.json`` (see `grid_dir`); returns the path."""
        return save_grid(self, name, directory)


def grid_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where grids are saved: ``directory``, else ``$SCORESOLVE_GRID_DIR``, else ``$XDG_CACHE_HOME/scoresolve/grids``
    (``~/.cache/scoresolve/grids``)."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(GRID_DIR_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "scoresolve" / "grids"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a grid name must be 1-128 characters of letters, digits, '.', '_' or '-' (not starting "
                         f"with '.', '_' or '-'), got {name!r}")
    return name


def save_grid(tuned: TunedGrid, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Save ``tuned`` under ``name`` (default: its own ``name``) as JSON in `grid_dir`; overwrites; returns the path."""
    name = _check_name(name if name is not None else (tuned.name or ""))
    path = grid_dir(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tuned.name = name
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(tuned.to_dict(), indent=1))
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def load_grid(name: str, directory: str | os.PathLike | None = None) -> TunedGrid:
    """The grid saved under ``name`` (see `save_grid`); ``sample(..., grid="tuned:<name>")`` does the same lookup."""
    path = grid_dir(directory) / f"{_check_name(name)}.json"
    if not path.is_file():
        where = grid_dir(directory)
        have = sorted(p.stem for p in where.glob("*.json")) if where.is_dir() else []
        raise FileNotFoundError(f"no saved grid {name!r} in {where} (set {GRID_DIR_ENV} or pass directory=); "
                                f"saved: {have}")
    try:
        data = json.loads(path.read_text())
        tuned = TunedGrid.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid saved grid: {e}") from e
    tuned.name = name
    return tuned


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMSE ``||x - ref|| / ||ref||`` over the whole batch."""
    return float((x - ref).double().norm() / ref.double().norm())


def mean_rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of ``||x_i - ref_i|| / ||ref_i||`` (less dominated by a few outliers than `rel_rmse`)."""
    d = (x - ref).double().flatten(1).norm(dim=1) / ref.double().flatten(1).norm(dim=1)
    return float(d.mean())


class _Counter:
    """Counts per-sample network evaluations and batched calls of a score model."""

    def __init__(self) -> None:
        self.evaluations = 0
        self.calls = 0

    def add(self, sol_or_batch: Any) -> None:
        if isinstance(sol_or_batch, int):
            self.evaluations += 1
            self.calls += 1
            return
        self.evaluations += int(sol_or_batch.nfe.max())
        self.calls += int(sol_or_batch.calls)


def _coordinate(sde: ForwardSDE, ts: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The monotone coordinate the grid is laid out in: the log-SNR where finite at T, else t; and its inverse."""
    lam = sde.log_snr(ts.to(torch.float64))
    if bool(torch.isfinite(lam).all()):
        return lam, lambda u: sde.t_from_log_snr(u.to(torch.float64))
    return ts.to(torch.float64), lambda u: u


def tune_grid(
    model: Callable | ScoreModel,
    sde: ForwardSDE,
    nfe: int,
    solver: str = "unipc",
    *,
    x_T: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    num_samples: int = 32,
    generator: torch.Generator | None = None,
    t_eps: float = 1e-3,
    method: str = "descent",
    candidates: int = 128,
    substeps: int = 4,
    reference_solver: str = "dpmpp_3m",
    max_sweeps: int = 12,
    initial_step: float = 0.5,
    min_step: float = 0.03,
    objective: str = "mean",
    cost: str = "ddim",
    starts: Sequence[str] = (),
    name: str | None = None,
    **options: Any,
) -> TunedGrid:
    """Fit a decreasing time grid from T to ``t_eps`` for ``solver`` at ``nfe`` network evaluations on ``model``.

    Args:
        model: the score model (as for `scoresolve.sample`); the probability-flow ODE is solved.
        sde: the forward process.
        nfe: the budget; the grid has ``REGISTRY[solver].steps_for_nfe(nfe)`` steps.
        solver: a registered grid solver of the probability-flow ODE (e.g. unipc, dpmpp_2m, ipndm, deis, ddim).
        x_T: the tuning starting points ``[n, ...]``; or give ``shape`` (one sample's shape, without the batch) and
            ``num_samples`` (drawn from the prior with ``generator``). A handful (16-64) suffices.
        t_eps: the end time.
        method: ``"gits"`` (dynamic programming on the one-step DDIM cost) or ``"descent"`` (GITS, then a compass
            search on the solver's own end error); see the module docstring.
        candidates: candidate times of the DP (uniform in log-SNR), including T and t_eps.
        substeps: reference sub-steps per candidate interval (the reference solve takes
            ``(candidates - 1) * substeps`` steps of ``reference_solver``).
        max_sweeps: most sweeps of the compass search over the grid points.
        initial_step: its first step in the softmax logits of the increments.
        min_step: the step at which it stops.
        objective: what the descent minimises on the tuning samples: ``"mean"`` (default), the mean over samples of
            the relative error ``||x - ref|| / ||ref||``, or ``"rmse"``, the relative RMSE of the batch (dominated by
            the few samples that end near another mode, so it overfits them; measured in ``benchmarks/tune_grid.py``).
        cost: the local cost of GITS's dynamic programming: ``"ddim"`` (default, GITS's one-step DDIM cost for every
            solver) or ``"solver"`` (the two-step cost of the solver's own second-order update, for dpmpp_2m,
            dpmpp_3m, unipc, ipndm and deis; see the module docstring).
        starts: named grids (``"uniform"``, ``"logsnr"``, ``"karras"``, ...) also evaluated on the tuning samples as
            starting points of the descent; the best of GITS's, the default and these is refined.
        name: stored in the record (``save()`` uses it).
        options: solver options (e.g. ``order=2``), used while tuning and recorded.
    Returns:
        a `TunedGrid`; ``.grid`` goes to ``sample(..., grid=...)``.
    """
    from .sampling import default_grid, sample

    start_time = time.perf_counter()
    if objective not in ("mean", "rmse"):
        raise ValueError(f"objective must be 'mean' (mean per-sample relative error) or 'rmse' (relative RMSE of the "
                         f"batch), got {objective!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")
    if cost == "solver" and solver not in TWO_STEP + ("ddim",):
        raise ValueError(f"cost='solver' needs a solver with a two-step form ({', '.join(TWO_STEP)}) or ddim, "
                         f"got {solver!r}")
    starts = [str(k) for k in starts]
    if solver not in REGISTRY:
        raise ValueError(f"unknown solver {solver!r}; available: {sorted(REGISTRY)}")
    spec = REGISTRY[solver]
    if spec.kind != "grid":
        raise ValueError(f"solver {solver!r} is adaptive and chooses its own steps; tune_grid fits grid solvers")
    if spec.draws_noise(options) or spec.default_diffusion != 0:
        raise ValueError(f"tune_grid fits grids of deterministic ODE solvers; {solver!r} (with {options}) draws noise")
    if reference_solver not in REGISTRY or REGISTRY[reference_solver].kind != "grid":
        raise ValueError(f"reference_solver must be a registered grid solver, got {reference_solver!r}")
    spec.check_options(options)
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {nfe!r}")
    steps = spec.steps_for_nfe(nfe, options)  # raises when the budget is too small for the solver
    if not (0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}), got {t_eps}")
    if int(candidates) < steps + 1:
        raise ValueError(f"candidates must be at least steps + 1 = {steps + 1}, got {candidates}")
    if int(substeps) < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    if x_T is None:
        if shape is None:
            raise ValueError("give the tuning starting points x_T, or shape (one sample, no batch) and num_samples")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x_T = sde.prior_sample((int(num_samples), *shape), generator=generator, dtype=torch.float64)
    elif shape is not None:
        raise ValueError("give either x_T or shape, not both")
    if not torch.is_tensor(x_T) or x_T.ndim < 2:
        raise ValueError(f"x_T must be a [batch, ...] tensor, got {type(x_T).__name__} "
                         f"{tuple(x_T.shape) if torch.is_tensor(x_T) else ''}")
    model = ScoreModel.wrap(model, sde)
    count = _Counter()
    T = float(sde.T)

    # 1. reference trajectory on the candidate times
    kind = "logsnr" if math.isfinite(float(sde.log_snr(torch.tensor(T, dtype=torch.float64)))) else "uniform"
    n = int(candidates)
    fine = time_grid(sde, (n - 1) * int(substeps), kind, t_eps)
    ref_sol = sample(model, sde, x_T, solver=reference_solver, grid=fine, save_trajectory=True)
    count.add(ref_sol)
    ts = fine[:: int(substeps)]
    xs = ref_sol.xs[:: int(substeps)]  # [n, batch, ...]
    assert ts.numel() == n and xs.shape[0] == n
    x_ref = xs[-1]

    def end_error(grid: torch.Tensor) -> float:
        sol = sample(model, sde, x_T, solver=solver, grid=grid, **options)
        count.add(sol)
        err = rel_rmse(sol.x, x_ref) if objective == "rmse" else mean_rel_error(sol.x, x_ref)
        return err if math.isfinite(err) else math.inf

    # 2. GITS: one-step DDIM costs between all candidate pairs (or the solver's two-step costs), then dynamic
    #    programming
    alpha, sigma = sde.marginal(ts)
    a, s = alpha.tolist(), sigma.tolist()
    flat = xs.flatten(2).to(torch.float64)  # [n, batch, D]
    x0s = []
    cost1 = torch.full((n, n), math.inf, dtype=torch.float64)
    afs = bool(options.get("afs"))
    for i in range(n - 1):
        if i == 0 and afs and cost == "solver":
            x0 = torch.zeros_like(flat[0])  # the analytical first step's prediction
        else:
            x0 = model.x0(xs[i], torch.full((x_T.shape[0],), float(ts[i]), dtype=x_T.dtype)).flatten(1).double()
            count.add(1)
        x0s.append(x0)
        r = torch.tensor(s[i + 1:], dtype=torch.float64) / s[i]  # sigma_j / sigma_i
        b = torch.tensor(a[i + 1:], dtype=torch.float64) - a[i] * r  # alpha_j - alpha_i sigma_j / sigma_i
        pred = r[:, None, None] * flat[i] + b[:, None, None] * x0  # [n - i - 1, batch, D]
        err = (pred - flat[i + 1:]).pow(2).mean(2).sqrt().mean(1)
        cost1[i, i + 1:] = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    if cost == "solver" and steps > 1 and solver != "ddim" and options.get("order", 2) != 1:
        resolved = spec.resolve(sde.probability_flow(model), options, steps)
        path = _two_step_path(sde, solver, resolved, ts, flat, torch.stack(x0s), cost1, steps,
                              bool(resolved.get("lower_order_final")))
    else:
        path = _one_step_path(cost1, steps)
    gits = ts[path].clone()
    gits[0], gits[-1] = T, t_eps
    gits_error = end_error(gits)
    named = default_grid(spec.default_grid, sde)
    default = time_grid(sde, steps, named, t_eps)
    default_error = end_error(default)

    grid, err, start = gits, gits_error, "gits"
    if method == "descent":
        if default_error < gits_error:
            grid, err, start = default, default_error, "default"
        for kind in starts:
            g = time_grid(sde, steps, kind, t_eps)
            e = end_error(g)
            if e < err:
                grid, err, start = g, e, kind
        grid, err = _compass(grid, err, sde, end_error, max_sweeps, initial_step, min_step)
    grid = grid.clone()
    grid[0], grid[-1] = T, t_eps  # exact end points (the quadratic default grid ends a rounding error off t_eps)
    check_grid(grid, T)
    return TunedGrid(grid=grid, solver=solver, nfe=spec.nfe_for_steps(steps, options), steps=steps, method=method,
                     t_eps=float(t_eps), T=T, train_error=err, default_error=default_error, gits_error=gits_error,
                     evaluations=count.evaluations, calls=count.calls, seconds=time.perf_counter() - start_time,
                     num_samples=int(x_T.shape[0]), candidates=n, sde=repr(sde), start=start, default_grid=named,
                     options=dict(options), gits_grid=gits, name=name)


def _one_step_path(cost: torch.Tensor, steps: int) -> list[int]:
    """The candidate indices 0 = i_0 < ... < i_steps = n - 1 with the least summed one-step ``cost[i, j]``."""
    n = cost.shape[0]
    best = torch.full((n,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        total = best[:, None] + cost  # [from, to]
        best, arg = total.min(0)
        back.append(arg)
    if not math.isfinite(float(best[-1])):
        raise RuntimeError("no finite GITS path: the reference or the model is non-finite on the candidate times")
    path = [n - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    return path


def _two_step_coefficients(sde: ForwardSDE, solver: str, options: dict, ts: torch.Tensor,
                           i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The solver's second-order step from candidate i to every j > i with the predictions at i and every k < i:
    x_j = A[j] x_i + P[k, j] m_i + Q[k, j] m_k, m the data prediction (``eps=False``) or the noise prediction."""
    t = ts.to(torch.float64)
    lam = sde.log_snr(t)
    alpha, sigma = sde.marginal(t)
    k, j = slice(0, i), slice(i + 1, None)
    if solver in ("dpmpp_2m", "dpmpp_3m", "unipc"):  # DPM-Solver++(2M) (UniPC's predictor with one history point)
        h = lam[j] - lam[i]  # [J]
        r = (lam[i] - lam[k])[:, None] / h[None, :]  # [K, J]
        e = (alpha[j] * torch.expm1(-h))[None, :]
        return sigma[j] / sigma[i], -e * (1 + 1 / (2 * r)), e / (2 * r), False
    rho = sigma / alpha
    if solver == "ipndm":  # Adams-Bashforth-2 with the uniform-step weights
        d = (alpha[j] * (rho[j] - rho[i]))[None, :].expand(i, -1)
        return alpha[j] / alpha[i], 1.5 * d, -0.5 * d, True
    basis = options.get("basis", "t")  # deis: the Lagrange polynomial through (u_k, eps_k), (u_i, eps_i)
    if basis == "rho":  # int (v - rho_k) / (rho_i - rho_k) dv over [rho_i, rho_j], and the other basis function
        rk, ri, rj = rho[k][:, None], rho[i], rho[j][None, :]
        p = ((rj - rk) ** 2 - (ri - rk) ** 2) / (2 * (ri - rk))
        q = (rj - ri) ** 2 / (2 * (rk - ri))
    else:
        if basis == "log_rho":  # u = log rho: I0 = int e^u du, I1 = int u e^u du
            u = torch.log(rho)
            i0 = rho[j] - rho[i]
            i1 = (u[j] - 1) * rho[j] - (u[i] - 1) * rho[i]
        else:  # u = t: I0 = int rho' dt, I1 = int t rho' dt = [t rho] - int rho dt
            u, big_r = t, _rho_integral(sde, t)
            i0 = rho[j] - rho[i]
            i1 = t[j] * rho[j] - t[i] * rho[i] - (big_r[j] - big_r[i])
        uk, ui = u[k][:, None], u[i]
        p = (i1[None, :] - uk * i0[None, :]) / (ui - uk)
        q = (i1[None, :] - ui * i0[None, :]) / (uk - ui)
    return alpha[j] / alpha[i], alpha[j][None, :] * p, alpha[j][None, :] * q, True


def _rho_integral(sde: ForwardSDE, t: torch.Tensor) -> torch.Tensor:
    """int_{t_s}^{t_m} rho(u) du (rho = sigma / alpha) at the decreasing candidate times t_m, by 32-point
    Gauss-Legendre quadrature on each interval; t_s = t_0, or t_1 where rho is infinite at t_0 (alpha = 0: the
    solvers' history starts at t_1 there), and the value at t_0 is then nan (unused)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(32)
    x, w = torch.from_numpy(x), torch.from_numpy(w)
    start = 0 if bool(torch.isfinite(sde.log_snr(t[:1], check=False)).all()) else 1
    a, b = t[start:-1], t[start + 1:]
    pts = 0.5 * (b - a)[:, None] * x[None, :] + 0.5 * (a + b)[:, None]  # [m, 32]
    rho = torch.exp(-sde.log_snr(pts.reshape(-1), check=False)).reshape(pts.shape)
    out = torch.zeros_like(t)
    out[start + 1:] = torch.cumsum(0.5 * (b - a) * (rho * w[None, :]).sum(1), 0)
    if start:
        out[0] = math.nan
    return out


def _two_step_path(sde: ForwardSDE, solver: str, options: dict, ts: torch.Tensor, flat: torch.Tensor,
                   x0s: torch.Tensor, cost1: torch.Tensor, steps: int, lower_final: bool) -> list[int]:
    """DP over pairs (k, i) with the one-step cost on the first (and with ``lower_final`` the last) step and the
    solver's two-step cost c[k, i, j] on the others; ``flat`` the reference states, ``x0s`` the data predictions at
    the candidates (``[n, batch, D]``; the last candidate's is not needed)."""
    n = flat.shape[0]
    alpha, sigma = sde.marginal(ts.to(torch.float64))
    from_alpha0 = float(alpha[0]) == 0.0
    preds = {False: x0s}
    cost2 = torch.full((n, n, n), math.inf, dtype=torch.float64)  # [k, i, j]
    for i in range(1, n - 1):
        A, P, Q, eps = _two_step_coefficients(sde, solver, options, ts, i)
        if eps not in preds:
            preds[eps] = (flat[:-1] - alpha[:-1, None, None] * x0s) / sigma[:-1, None, None]
        m = preds[eps]
        base = A[:, None, None] * flat[i] - flat[i + 1:]  # [J, b, D]
        mi, mk = m[i], m[:i]  # [b, D], [K, b, D]
        # |base_j + P m_i + Q m_k|^2 per sample, expanded in inner products: [K, J, b]
        sq = ((base ** 2).sum(2)[None] + P[..., None] ** 2 * (mi ** 2).sum(1)
              + Q[..., None] ** 2 * (mk ** 2).sum(2)[:, None] + 2 * P[..., None] * (base * mi).sum(2)[None]
              + 2 * Q[..., None] * torch.einsum("jbd,kbd->kjb", base, mk)
              + 2 * (P * Q)[..., None] * (mk * mi).sum(2)[:, None])
        err = (sq.clamp_min(0) / flat.shape[2]).sqrt().mean(2)
        cost2[:i, i, i + 1:] = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
        if not from_alpha0:
            continue
        cost2[0, i, i + 1:] = cost1[i, i + 1:]  # after the first step from alpha = 0 the history starts: one step
    best = torch.full((n, n), math.inf, dtype=torch.float64)  # [k, i]: least cost of a path whose last step is k -> i
    best[0] = cost1[0]
    back = []
    for step in range(1, steps):
        c = cost1[None].expand(n, n, n) if (lower_final and step == steps - 1) else cost2
        total = best[:, :, None] + c  # [k, i, j]
        nb, arg = total.min(0)  # [i, j]
        best = nb
        back.append(arg)
    k_last = int(best[:, n - 1].argmin())
    if not math.isfinite(float(best[k_last, n - 1])):
        raise RuntimeError("no finite GITS path: the reference or the model is non-finite on the candidate times")
    path = [n - 1, k_last]
    for arg in reversed(back):
        path.append(int(arg[path[-1], path[-2]]))
    path.reverse()
    return path


def _compass(grid: torch.Tensor, err: float, sde: ForwardSDE, objective: Callable[[torch.Tensor], float],
             max_sweeps: int, step: float, min_step: float) -> tuple[torch.Tensor, float]:
    """Compass search over the softmax logits of the grid's increments in its monotone coordinate."""
    u, inverse = _coordinate(sde, grid)
    u0, u1 = float(u[0]), float(u[-1])
    inc = (u[1:] - u[:-1]) / (u1 - u0)
    z = torch.log(inc.clamp_min(1e-12))

    def build(z: torch.Tensor) -> torch.Tensor | None:
        w = torch.softmax(z, 0)
        uu = u0 + (u1 - u0) * torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
        g = inverse(uu).to(torch.float64)
        g[0], g[-1] = grid[0], grid[-1]
        if not bool((g[1:] < g[:-1]).all()):
            return None
        return g

    best_grid = grid
    for _ in range(int(max_sweeps)):
        improved = False
        for k in range(z.numel()):
            for sign in (1.0, -1.0):
                trial = z.clone()
                trial[k] += sign * step
                g = build(trial)
                if g is None:
                    continue
                e = objective(g)
                if e < err:
                    z, err, best_grid, improved = trial, e, g, True
                    break
        if not improved:
            step /= 2
            if step < min_step:
                break
    return best_grid, err
