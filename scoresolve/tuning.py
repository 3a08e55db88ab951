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

import math
import time
from typing import Any, Callable, Sequence

import torch

from ._utils import check_count, check_generator, check_positive, check_t_eps
from .process import check_process
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers import REGISTRY, GridSolver
from .solvers._grid import check_grid
from .solvers.adams import adams_coefficients, deis_two_node_weights
from .solvers.grid_store import GRID_DIR_ENV, TunedGrid, grid_dir, load_grid, save_grid  # noqa: F401  (documented path)
from .solvers.multistep import dpmpp_2m_coefficients
from .solvers.time_grids import time_grid

METHODS = ("gits", "descent")
COSTS = ("ddim", "solver")
# solvers with a two-step form for ``cost="solver"`` (their second-order update from two predictions)
TWO_STEP = ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis")


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
    check_process(sde)
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
    if isinstance(starts, str):
        raise TypeError(f"starts must be a sequence of grid names, got the str {starts!r} (write ({starts!r},))")
    starts = [str(k) for k in starts]
    if solver not in REGISTRY:
        raise ValueError(f"unknown solver {solver!r}; available: {sorted(REGISTRY)}")
    spec = REGISTRY[solver]
    if not isinstance(spec, GridSolver):
        raise ValueError(f"solver {solver!r} is adaptive and chooses its own steps; tune_grid fits grid solvers")
    if spec.draws_noise(options) or spec.default_diffusion != 0:
        raise ValueError(f"tune_grid fits grids of deterministic ODE solvers; {solver!r} (with {options}) draws noise")
    if reference_solver not in REGISTRY or not isinstance(REGISTRY[reference_solver], GridSolver):
        raise ValueError(f"reference_solver must be a registered grid solver, got {reference_solver!r}")
    spec.check_options(options)
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {nfe!r}")
    steps = spec.steps_for_nfe(nfe, options)  # raises when the budget is too small for the solver
    t_eps = check_t_eps(t_eps, sde.T)
    candidates, substeps = check_count(candidates, "candidates"), check_count(substeps, "substeps")
    max_sweeps = check_count(max_sweeps, "max_sweeps", minimum=0)
    check_positive(min_step, "min_step")
    if check_positive(initial_step, "initial_step") < min_step:
        raise ValueError(f"initial_step must be >= min_step = {min_step}, got {initial_step}")
    check_generator(generator)
    if int(candidates) < steps + 1:
        raise ValueError(f"candidates must be at least steps + 1 = {steps + 1}, got {candidates}")
    if int(substeps) < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    if x_T is None:
        if shape is None:
            raise ValueError("give the tuning starting points x_T, or shape (one sample, no batch) and num_samples")
        num_samples = check_count(num_samples, "num_samples")
        x_T = sde.prior_sample((int(num_samples), *shape), generator=generator, dtype=torch.float64)
    elif shape is not None:
        raise ValueError("give either x_T or shape, not both")
    if not torch.is_tensor(x_T) or x_T.ndim < 2:
        raise ValueError(f"x_T must be a [batch, ...] tensor, got {type(x_T).__name__} "
                         f"{tuple(x_T.shape) if torch.is_tensor(x_T) else ''}")
    if x_T.shape[0] == 0:
        raise ValueError(f"x_T holds no samples (shape {tuple(x_T.shape)}): there is no error to tune the grid on")
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
        A, P, Q = dpmpp_2m_coefficients(alpha[j][None, :], sigma[i], sigma[j], h[None, :], r)
        return A, P, Q, False
    rho = sigma / alpha
    if solver == "ipndm":  # Adams-Bashforth-2 with the uniform-step weights
        A, (P, Q) = adams_coefficients(alpha[i], alpha[j], rho[i], rho[j], 2)
        return A, P[None, :].expand(i, -1), Q[None, :].expand(i, -1), True
    p, q = deis_two_node_weights(sde, options.get("basis", "t"), t, rho, i)  # deis: the two-node Lagrange weights
    return alpha[j] / alpha[i], alpha[j][None, :] * p, alpha[j][None, :] * q, True


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
