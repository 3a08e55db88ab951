"""Adams-Bashforth samplers: iPNDM and DEIS (tAB / rhoAB) on the noise prediction, vAB on the velocity.

In the variables y = x / alpha and rho = sigma / alpha = e^{-lambda} (EDM's x and sigma) the probability-flow ODE of
every process here is

    dy / drho = eps(x, t)                                   (Zhang & Chen 2022, DEIS, eq. (11); Karras et al. 2022)

so a step from t_i to t_{i+1} is y_{i+1} = y_i + int_{rho_i}^{rho_{i+1}} eps drho, with eps along the step
extrapolated from the predictions of the last q grid points (one network evaluation per step):

- ``ipndm`` (improved PNDM, Zhang & Chen 2022; the EDM-style sampler of Zhou et al. 2024): the fixed
  Adams-Bashforth weights of uniform steps, order q <= 4, whatever the step sizes:
  y_{i+1} = y_i + (rho_{i+1} - rho_i) sum_j w_j eps_{i-j},  w = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24.
- ``deis`` (Zhang & Chen 2022, Algorithm 1): the Lagrange polynomial through (t_{i-j}, eps_{i-j}) integrated exactly
  against drho: y_{i+1} = y_i + sum_j C_ij eps_{i-j}, C_ij = int_{t_i}^{t_{i+1}} l_j(t) rho'(t) dt ("tAB", the
  polynomial in t; Gauss-Legendre quadrature on the host, exact to float64 for these smooth schedules), or with
  ``basis="rho"`` the polynomial in rho itself ("rhoAB": the variable-step Adams-Bashforth of iPNDM), or with
  ``basis="log_rho"`` the polynomial in log rho = -lambda (diffusers' ``DEISMultistepScheduler``, "logrho").

In the rectified-flow variables y = x / (alpha + sigma) and u = sigma / (alpha + sigma) of any Gaussian process,
y = (1 - u) x0 + u eps, and the probability-flow ODE is

    dy / du = eps(x, t) - x0(x, t) = v                       (the velocity of rectified flow)

- ``vab``: variable-step Adams-Bashforth on v in u (the polynomial through (u_{i-j}, v_{i-j}) integrated exactly;
  azula's ``vABSampler``). Unlike y = x / alpha, y and u stay bounded on every process (u in [0, 1]), so the same
  update runs from alpha = 0 (rectified flow at t = 1: u = 1, y = x) without a special first step.

Where the grid starts at alpha = 0 (rectified flow and the trigonometric interpolant at t = 1; log-SNR -inf, rho and
y infinite) the first step is the exact DDIM step in the data prediction, x_1 = (sigma_1 / sigma_0) x_0 + alpha_1 x0
(as for dpmpp_2m and unipc, see `GridRun.start`), from a model that predicts x0 there (flow, x0 or v); the noise
prediction history, and the warm-up of the order, start at the first grid point with alpha > 0. The weights are
Python floats from the host grid: no host-device synchronisation in the loop.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..reverse import ReverseProcess
from ._grid import GridRun
from ._registry import GAUSSIAN_KERNEL, SolverSpec, register, require_ode
from .multistep import multistep_order

if TYPE_CHECKING:
    from ..sde import ForwardSDE

# Adams-Bashforth weights of uniform steps, newest prediction first (iPNDM)
AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_QUAD_NODES = 32


@cache
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def lagrange_integrals(nodes: list[float], a: float, b: float, weight: np.ndarray | None = None,
                       points: np.ndarray | None = None) -> list[float]:
    """int_a^b l_j(s) w(s) ds for the Lagrange basis l_j of ``nodes``, by Gauss-Legendre quadrature.

    ``points`` are the quadrature points in [a, b] at which ``weight`` w was evaluated (default w = 1, exact for
    polynomials).
    """
    x, wq = _gauss_legendre(_QUAD_NODES)
    if points is None:
        points = 0.5 * (b - a) * x + 0.5 * (a + b)
    w = np.ones_like(points) if weight is None else weight
    out = []
    for j, nj in enumerate(nodes):
        lj = np.ones_like(points)
        for k, nk in enumerate(nodes):
            if k != j:
                lj = lj * (points - nk) / (nj - nk)
        out.append(float(0.5 * (b - a) * np.sum(wq * lj * w)))
    return out


def poly_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """int_a^b l_j(s) ds for the Lagrange basis l_j of ``nodes``, exactly, in Python floats (the variable-step
    Adams weights; no quadrature and no tensors: cheap enough to compute per step on the host). The polynomials are
    expanded in s - a, so the weights stay accurate when the nodes are close to each other but far from 0."""
    h, shifted = b - a, [n - a for n in nodes]
    out = []
    for j, nj in enumerate(shifted):
        coef = [1.0]  # l_j(s) as coefficients of (s - a)^m, lowest first
        for k, nk in enumerate(shifted):
            if k != j:
                d = nj - nk
                coef = [(coef[m - 1] if m > 0 else 0.0) / d - (coef[m] * nk / d if m < len(coef) else 0.0)
                        for m in range(len(coef) + 1)]
        out.append(sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(coef)))
    return out


@lru_cache(maxsize=4096)
def _ab_weights(nodes: tuple[float, ...], a: float, b: float) -> tuple[float, ...]:
    """`poly_integrals`, cached: repeated solves on the same grid (batches of a data set) reuse the weights."""
    return tuple(poly_integrals(list(nodes), a, b))


def _combine(x: torch.Tensor, scale: float, weights, terms) -> torch.Tensor:
    """scale * x + sum_j w_j terms_j, one kernel per term (no temporaries for the products)."""
    out = x * scale
    for w, t in zip(weights, terms):
        out.add_(t, alpha=w)
    return out


def _rho(run: GridRun) -> list[float]:
    if "rho" not in run.memory:  # rho = inf where alpha = 0 (only at a grid start: see first_step_from_alpha0)
        run.memory["rho"] = [s / a if a > 0 else math.inf for a, s in zip(run.alpha, run.sigma)]
    return run.memory["rho"]


def first_step_from_alpha0(run: GridRun, x: torch.Tensor) -> torch.Tensor:
    """The exact first step from alpha_0 = 0 (log-SNR -inf): DDIM in the data prediction,
    x_1 = (sigma_1 / sigma_0) x_0 + alpha_1 x0_hat (x0_hat the prior's 0 with ``afs``)."""
    s = run.sigma
    return (s[1] / s[0]) * x + run.alpha[1] * run.x0(x, 0)


def _push_eps(run: GridRun, x: torch.Tensor, i: int, keep: int) -> list[torch.Tensor]:
    """The noise predictions of the last ``keep`` grid points, newest first (evaluates at grid point i)."""
    hist = run.memory["eps"] = ([run.eps(x, i)] + run.memory.get("eps", []))[:keep]
    return hist


def ipndm_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2022): Adams-Bashforth with the uniform-step weights on dy/drho = eps; order ``order``
    (default 4) after a warm-up of lower orders, 1 NFE/step."""
    if i < run.start:
        return first_step_from_alpha0(run, x)
    rho, a = _rho(run), run.alpha
    order = run.options["order"]
    hist = _push_eps(run, x, i, order)
    q = multistep_order(order, i, run.steps, run.options["lower_order_final"], run.start)
    c = a[i + 1] * (rho[i + 1] - rho[i])
    return _combine(x, a[i + 1] / a[i], [c * w for w in AB_WEIGHTS[q]], hist)


def deis_weights(run: GridRun, i: int, q: int) -> list[float]:
    """C_ij = int_{t_i}^{t_{i+1}} l_j rho' dt over the nodes t_i, t_{i-1}, ... (tAB), or int l_j drho (rhoAB)."""
    rho, t = _rho(run), run.t
    if run.options["basis"] == "rho":
        return lagrange_integrals([rho[i - j] for j in range(q)], rho[i], rho[i + 1])
    if run.options["basis"] == "log_rho":  # int l_j(u) e^u du over u = log rho
        u = [math.log(rho[i - j]) for j in range(q)]
        x, _ = _gauss_legendre(_QUAD_NODES)
        pts = 0.5 * (math.log(rho[i + 1]) - u[0]) * x + 0.5 * (u[0] + math.log(rho[i + 1]))
        return lagrange_integrals(u, u[0], math.log(rho[i + 1]), weight=np.exp(pts), points=pts)
    x, _ = _gauss_legendre(_QUAD_NODES)
    a_, b_ = t[i], t[i + 1]
    pts = 0.5 * (b_ - a_) * x + 0.5 * (a_ + b_)
    tp = torch.from_numpy(pts)
    drho = (-run.sde.dlog_snr_dt(tp, check=False) * torch.exp(-run.sde.log_snr(tp, check=False))).numpy()
    return lagrange_integrals([t[i - j] for j in range(q)], a_, b_, weight=drho, points=pts)


def adams_coefficients(alpha_s, alpha_t, rho_s, rho_t, order: int):
    """(A, [c_0, ...]) of iPNDM's step x_t = A x_s + sum_j c_j eps_j (newest first) with the Adams-Bashforth weights
    of uniform steps, on floats or tensors (`scoresolve.tuning` uses them for its two-step cost)."""
    d = alpha_t * (rho_t - rho_s)
    return alpha_t / alpha_s, [w * d for w in AB_WEIGHTS[order]]


def deis_two_node_weights(sde: ForwardSDE, basis: str, t: torch.Tensor, rho: torch.Tensor,
                          i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The second-order DEIS weights in closed form on a whole candidate set: for decreasing float64 times ``t``
    (``rho`` = sigma / alpha there),
    (p[k, j], q[k, j]) with int over [t_i, t_j] of l_i w and l_k w for every k < i < j (the Lagrange basis of the
    nodes u_i, u_k in the ``basis`` variable; `deis_weights` takes the same integrals by quadrature, one step at a
    time). The step is x_j = (alpha_j / alpha_i) x_i + alpha_j (p eps_i + q eps_k)."""
    k, j = slice(0, i), slice(i + 1, None)
    if basis == "rho":  # int (v - rho_k) / (rho_i - rho_k) dv over [rho_i, rho_j], and the other basis function
        rk, ri, rj = rho[k][:, None], rho[i], rho[j][None, :]
        return ((rj - rk) ** 2 - (ri - rk) ** 2) / (2 * (ri - rk)), (rj - ri) ** 2 / (2 * (rk - ri))
    if basis == "log_rho":  # u = log rho: I0 = int e^u du, I1 = int u e^u du
        u = torch.log(rho)
        i0 = rho[j] - rho[i]
        i1 = (u[j] - 1) * rho[j] - (u[i] - 1) * rho[i]
    else:  # u = t: I0 = int rho' dt, I1 = int t rho' dt = [t rho] - int rho dt
        u, big_r = t, rho_integral(sde, t)
        i0 = rho[j] - rho[i]
        i1 = t[j] * rho[j] - t[i] * rho[i] - (big_r[j] - big_r[i])
    uk, ui = u[k][:, None], u[i]
    return (i1[None, :] - uk * i0[None, :]) / (ui - uk), (i1[None, :] - ui * i0[None, :]) / (uk - ui)


def rho_integral(sde: ForwardSDE, t: torch.Tensor) -> torch.Tensor:
    """int_{t_s}^{t_m} rho(u) du (rho = sigma / alpha) at the decreasing times t_m, by Gauss-Legendre quadrature
    (`_QUAD_NODES` points) on each interval; t_s = t_0, or t_1 where rho is infinite at t_0 (alpha = 0: the
    solvers' history starts at t_1 there), and the value at t_0 is then nan (unused)."""
    x, w = (torch.from_numpy(a) for a in _gauss_legendre(_QUAD_NODES))
    start = 0 if bool(torch.isfinite(sde.log_snr(t[:1], check=False)).all()) else 1
    a, b = t[start:-1], t[start + 1:]
    pts = 0.5 * (b - a)[:, None] * x[None, :] + 0.5 * (a + b)[:, None]  # [m, nodes]
    rho = torch.exp(-sde.log_snr(pts.reshape(-1), check=False)).reshape(pts.shape)
    out = torch.zeros_like(t)
    out[start + 1:] = torch.cumsum(0.5 * (b - a) * (rho * w[None, :]).sum(1), 0)
    if start:
        out[0] = math.nan
    return out


def deis_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DEIS (Zhang & Chen 2022), exponential Adams-Bashforth on the noise prediction; order ``order`` (1-4, default
    3; order 1 is DDIM) after a warm-up, 1 NFE/step; ``basis`` "t" (tAB, default), "rho" (rhoAB) or "log_rho"
    (the polynomial in log rho = -lambda: diffusers' DEISMultistepScheduler)."""
    if i < run.start:
        return first_step_from_alpha0(run, x)
    a = run.alpha
    order = run.options["order"]
    hist = _push_eps(run, x, i, order)
    cs = _deis_grid_weights(run)[i]
    return _combine(x, a[i + 1] / a[i], [a[i + 1] * c for c in cs], hist)


def _deis_grid_weights(run: GridRun) -> list[list[float] | None]:
    """`deis_weights` of every step of the grid (None before ``run.start``), computed once per grid."""
    ws = run.memory.get("deis_weights")
    if ws is None:
        o = run.options

        def build() -> list[list[float] | None]:
            return [deis_weights(run, k, multistep_order(o["order"], k, run.steps, o["lower_order_final"], run.start))
                    if k >= run.start else None for k in range(run.steps)]

        ws = run.memory["deis_weights"] = run.per_grid(("deis", o["basis"], o["order"], o["lower_order_final"]), build)
    return ws


def _flow_vars(run: GridRun) -> list[float]:
    """u = sigma / (alpha + sigma) on the grid (the rectified-flow time of the process)."""
    if "u" not in run.memory:
        run.memory["u"] = [s / (a + s) for a, s in zip(run.alpha, run.sigma)]
    return run.memory["u"]


def vab_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """vAB: Adams-Bashforth on dy/du = v = eps - x0 in the rectified-flow variables (module docstring); order
    ``order`` (1-4, default 3) after a warm-up, variable-step weights int_{u_i}^{u_{i+1}} l_j(u) du, 1 NFE/step.
    Order 1 is DDIM.

    ``corrector`` (Adams-Moulton, UniPC's trick): the velocity at the predicted point, which the next step needs
    anyway, also corrects this step (the polynomial through it and the last velocities), raising the step's order
    by one at no extra evaluation; the last step is not corrected. ``"start"`` (default) corrects only the warm-up
    steps, whose lower order otherwise limits the global order (an Euler first step leaves an O(h^2) error): on
    random mixtures (benchmarks/peers_few_step.py, seeds 1000-1011) 1.15-1.6x lower error at 5-10 NFE and 1.3-1.9x
    at 20-40 than no correction; ``True`` corrects every step (steadier at many steps, worse at few).

    The correction of step i - 1 is applied in step i, after its evaluation: the corrected state
    x_i^c = x_i + S_i sum_J gamma_J v_{i-J} (gamma: the Adams-Moulton weights of step i - 1 less its Adams-Bashforth
    ones; S = alpha + sigma) enters only (S_{i+1} / S_i) x_i^c, so it folds into step i's weights on the velocities.
    Every step thus evaluates the network once, at its own input x_i (the predicted point), which a scheduler's
    loop provides (`scoresolve.adapters.ScoresolveScheduler`); the result is the corrected method's."""
    a, s = run.alpha, run.sigma
    u = _flow_vars(run)
    order, corr, lof = run.options["order"], run.options["corrector"], run.options["lower_order_final"]
    hist = run.memory["v"] = ([_velocity(run, x, i)] + run.memory.get("v", []))[:order + 1]
    q = multistep_order(order, i, run.steps, lof)
    ws = list(_ab_weights(tuple(u[i - j] for j in range(q)), u[i], u[i + 1]))
    if i > 0 and bool(corr) and (corr is True or i - 1 < order - 1):  # step i - 1 is corrected at x_i
        qp = multistep_order(order, i - 1, run.steps, lof)  # its order; its corrector's polynomial has qp + 1 nodes
        am = _ab_weights((u[i], *(u[i - 1 - j] for j in range(qp))), u[i - 1], u[i])
        ab = _ab_weights(tuple(u[i - 1 - j] for j in range(qp)), u[i - 1], u[i])
        ws = fold_corrector(ws, am, ab)
    c_i, c_n = a[i] + s[i], a[i + 1] + s[i + 1]
    return _combine(x, c_n / c_i, [c_n * w for w in ws], hist)  # x = (alpha + sigma) y, y += sum_j w_j v_{i-j}


def fold_corrector(ws: Sequence, am: Sequence, ab: Sequence) -> list:
    """Step i's weights ``ws`` on the velocities (v_i, v_{i-1}, ...) with step i - 1's corrector folded in: ``am``,
    its Adams-Moulton weights on (v_i, v_{i-1}, ..., v_{i-q}), less ``ab``, its Adams-Bashforth weights on
    (v_{i-1}, ..., v_{i-q}) (`vab_step`; the calibrated vAB base). Floats or tensors alike."""
    n = len(am)
    ws = list(ws) + [0.0] * (n - len(ws))
    return [ws[0] + am[0]] + [ws[j] + am[j] - ab[j - 1] for j in range(1, n)] + ws[n:]


def _velocity(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """v = eps - x0 at grid point i from the data prediction (eps = (x - alpha x0) / sigma)."""
    a, s = run.alpha[i], run.sigma[i]
    return run.x0_combination(x, i, 1 / s, -(1 + a / s))  # x / s - (1 + a / s) x0, two kernels


def _prepare(name: str):
    def prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
        require_ode(name, process)
        if isinstance(options["order"], bool) or options["order"] not in (1, 2, 3, 4):
            raise ValueError(f"{name} order must be 1, 2, 3 or 4, got {options['order']}")
        if name == "vab" and options["corrector"] not in (True, False, "start"):
            raise ValueError(f"vab corrector must be True, False or 'start', got {options['corrector']!r}")
        if name == "deis" and options["basis"] not in ("t", "rho", "log_rho"):
            raise ValueError(f"deis basis must be 't' (tAB), 'rho' (rhoAB) or 'log_rho', got {options['basis']!r}")
        if not isinstance(options["lower_order_final"], bool):
            raise ValueError(f"lower_order_final must be True or False, got {options['lower_order_final']!r}")
        return options

    return prepare


assert math.isclose(sum(AB_WEIGHTS[4]), 1.0)
register(SolverSpec("ipndm", step=ipndm_step, options={"order": 4, "lower_order_final": False,
                                                        "afs": False},
                    prepare=_prepare("ipndm"), order=4, default_grid="quadratic", starts_at_alpha0=True,
                    requires=GAUSSIAN_KERNEL,
                    description="iPNDM: Adams-Bashforth (uniform-step weights) on the noise prediction"))
register(SolverSpec("deis", step=deis_step, options={"order": 3, "basis": "t",
                                                      "lower_order_final": False, "afs": False},
                    prepare=_prepare("deis"), order=3, default_grid="quadratic", starts_at_alpha0=True,
                    requires=GAUSSIAN_KERNEL,
                    description="DEIS tAB (rhoAB with basis='rho'): exponential Adams-Bashforth, noise prediction"))
register(SolverSpec("vab", step=vab_step, options={"order": 3, "lower_order_final": False, "corrector": "start",
                                                    "afs": False},
                    prepare=_prepare("vab"), order=3, default_grid="quadratic", starts_at_alpha0=True,
                    requires=GAUSSIAN_KERNEL,
                    description="vAB: Adams-Bashforth on the velocity eps - x0 in the rectified-flow time "
                                "u = sigma / (alpha + sigma)"))
