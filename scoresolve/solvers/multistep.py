"""Multistep exponential integrators (data prediction): DPM-Solver++(2M)/(3M), UniPC, DPM-Solver++(2M) SDE.

The derivation and notation are those of `scoresolve.solvers.exponential`: x_t = (sigma_t/sigma_s) x_s +
sigma_t int e^{lambda} x0 dlambda, with x0 along lambda extrapolated from the predictions of earlier steps (kept in
``run.memory``). Every step costs one network evaluation.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..reverse import ReverseProcess
from ._grid import GridRun
from ._registry import GAUSSIAN_KERNEL, GridSolver, register, require_ode
from .exponential import noise_level, phi


def lower_order_final(option: bool | None, steps: int) -> bool:
    """Default: wind the order down over the last steps when steps < 100.

    The final log-SNR steps of the default quadratic grid are long (h ~ 1.9 at 10 steps on VP with t_eps = 1e-3) and
    extrapolating x0 over them costs more than a low-order step: on our 64-D mixture benchmark it cuts the error
    1.5-3x at 10-50 NFE, while at 100 steps it no longer helps. (Lu et al. 2022b and Zhao et al. 2023 use it below
    15 and 10 steps.)
    """
    return steps < 100 if option is None else bool(option)


def multistep_order(order: int, i: int, steps: int, lower_final: bool, start: int = 0) -> int:
    """Order of multistep step i: warm up with the i + 1 - start evaluations available (``start``: see
    `GridRun.start`), optionally wind down at the end."""
    q = max(1, min(order, i + 1 - start))
    return min(q, steps - i) if lower_final else q


def _prepare(name: str):
    def prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
        require_ode(name, process)
        return {**options, "lower_order_final": lower_order_final(options["lower_order_final"], steps)}

    return prepare


def dpmpp_2m_weights(r):
    """(w0, w1) of DPM-Solver++(2M)'s D = w0 m0 - w1 m1 (Lu et al. 2022b, Algorithm 2), r = h_prev / h: floats or
    tensors (`scoresolve.tuning` uses them for its two-step cost)."""
    return 1 + 1 / (2 * r), 1 / (2 * r)


def dpmpp_2m_coefficients(alpha_t, sigma_s, sigma_t, h, r):
    """(A, P, Q) of DPM-Solver++(2M)'s step from s to t as x_t = A x_s + P m0 + Q m1 (m0 the data prediction at s,
    m1 at the previous grid time; h = lambda_t - lambda_s, r = h_prev / h), on tensors that broadcast."""
    w0, w1 = dpmpp_2m_weights(r)
    e = alpha_t * torch.expm1(-h)
    return sigma_t / sigma_s, -e * w0, e * w1


def dpmpp_2m_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction. Order 2, 1 NFE/step.

    The first step is DPM-Solver++(1); ``lower_order_final`` (default: when steps < 100) makes the last step first
    order too, which is steadier when the last log-SNR steps are long.
    """
    a, s, lam = run.alpha, run.sigma, run.lam
    h = lam[i + 1] - lam[i]
    m = run.x0(x, i)
    e = a[i + 1] * math.expm1(-h)
    # x_t = (s_t/s_s) x + a_t (1 - e^{-h}) D, D = (1 + 1/(2r)) m0 - 1/(2r) m1 (Algorithm 2): one fused chain
    if multistep_order(2, i, run.steps, run.options["lower_order_final"], run.start) == 1:
        x_new = torch.add(x * (s[i + 1] / s[i]), m, alpha=-e)
    else:
        w0, w1 = dpmpp_2m_weights((lam[i] - lam[i - 1]) / h)
        x_new = torch.add(x * (s[i + 1] / s[i]), m, alpha=-e * w0).add_(run.memory["m"], alpha=e * w1)
    run.memory["m"] = m
    return x_new


def dpmpp_3m_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep third order), data prediction. Order 3, 1 NFE/step.

    x0 along lambda is replaced by the quadratic p through the last three predictions (Newton form) and
    int e^{-(h - tau)} p(tau) dtau is taken exactly:
        x_t = (s_t/s_s) x + a_t [h phi_1 m0 + h^2 phi_2 p' + 2 h^3 phi_3 p2],
    phi_k = phi_k(-h), p' = p'(lambda_s), p2 = p''/2. Warm-up: orders 1, 2 on the first two steps (the first-order
    step leaves an O(h^2) term, negligible in practice since x0_hat hardly moves near T); ``lower_order_final``
    (default: steps < 100) uses orders 2, 1 on the last two steps.

    Note: k-diffusion's ``sample_dpmpp_3m_sde`` (and, as far as we know, the reference DPM-Solver code it follows)
    weights p2 by h^3 phi_3 instead of 2 h^3 phi_3; with eta = 0 it converges at order 2, not 3.
    """
    a, s, lam = run.alpha, run.sigma, run.lam
    h = lam[i + 1] - lam[i]
    ms = run.memory["ms"] = (run.memory.get("ms", []) + [run.x0(x, i)])[-3:]
    q = multistep_order(3, i, run.steps, run.options["lower_order_final"], run.start)
    c0 = -a[i + 1] * math.expm1(-h)
    # d0 = (m0 - m1) / h0 (first divided difference), p2 = (d0 - (m1 - m2) / h1) / (h0 + h1) (second: p''/2),
    # slope = d0 + h0 p2 (p'(lambda_s) of the Newton quadratic); x_t = ... + c2 slope + c3 p2, expanded into
    # weights on m0, m1, m2 and applied as one chain of fused multiply-adds
    weights = [c0]
    if q >= 2:
        h0 = lam[i] - lam[i - 1]
        c2 = a[i + 1] * h**2 * phi(2, -h)
        if q == 2:
            weights = [c0 + c2 / h0, -c2 / h0]
        else:
            h1 = lam[i - 1] - lam[i - 2]
            P = (c2 * h0 + 2 * a[i + 1] * h**3 * phi(3, -h)) / (h0 + h1)  # the factor of p2 = (d0 - d1)/(h0 + h1)
            weights = [c0 + (c2 + P) / h0, -(c2 + P) / h0 - P / h1, P / h1]
    out = torch.add(x * (s[i + 1] / s[i]), ms[-1], alpha=weights[0])
    for w, m in zip(weights[1:], ms[-2::-1]):
        out.add_(m, alpha=w)
    return out


# ---------------------------------------------------------------------------------------------------------------
# UniPC (data prediction, B(h) = 1 - e^{-h}: "bh2")
# ---------------------------------------------------------------------------------------------------------------
def unipc_weights(rs: list[float], h: float) -> list[float]:
    """a_m with sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h), k = 1..len(rs) (Zhao et al. 2023, R_p a = g/B).

    With one unknown UniPC-bh2 uses a = 1/2 (this makes UniP-2 exactly DPM-Solver++(2M)).
    """
    return list(_unipc_weights(tuple(rs), h))


@lru_cache(maxsize=4096)
def _unipc_weights(rs: tuple[float, ...], h: float) -> tuple[float, ...]:
    """`unipc_weights`, cached: every solve on the same grid reuses them (host float64 solve)."""
    if len(rs) == 1:
        return (0.5,)
    B = -math.expm1(-h)
    K = len(rs)
    R = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, K + 1)], dtype=torch.float64)
    g = torch.tensor([math.factorial(k) * h * phi(k + 1, -h) / B for k in range(1, K + 1)], dtype=torch.float64)
    return tuple(torch.linalg.solve(R, g).tolist())


def unipc_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023): UniP-p predictor + UniC-p corrector, bh2, data prediction. 1 NFE/step.

    With D_m = (m_m - m0)/r_m, r_m = (lambda_m - lambda_s)/h:
        x_t = (s_t/s_s) x + a_t B(h) m0 + a_t B(h) sum_m a_m D_m,      B(h) = 1 - e^{-h}.
    The predictor uses the p - 1 previous predictions (order p); the corrector adds the prediction at the
    predicted point (r = 1), which the next step needs anyway, so it costs no evaluation and raises the per-step
    order to p + 1. The last step has no corrector. ``order`` is p (default 3); the first steps warm up with the
    predictions available and ``lower_order_final`` (default: steps < 100) winds down over the last p - 1 steps.
    The registered order is 3: the first (order-2) step leaves an O(h^3) term whose constant is tiny because x0_hat
    hardly moves near T, so in practice the error falls like h^4 until it is very small.

    ``final_corrector=True`` corrects the last step too, at the cost of one more evaluation (at the end point): this
    is what diffusers' ``UniPCMultistepScheduler`` does with ``final_sigmas_type="sigma_min"`` (it evaluates the
    network at its last sigma, corrects, and then steps from that sigma to itself).

    The step is `unipc_start` (at i = 0), `unipc_predict`, one evaluation at the predicted point, `unipc_correct`:
    a scheduler that gets one evaluation per call (`scoresolve.adapters.ScoresolveScheduler`) runs the same pieces.
    """
    if i == 0:
        unipc_start(run, run.x0(x, 0))
    x_pred = unipc_predict(run, x, i)
    if i == run.steps - 1 and not run.options["final_corrector"]:
        return x_pred
    return unipc_correct(run, i, run.x0(x_pred, i + 1))


def unipc_start(run: GridRun, m0: torch.Tensor) -> None:
    """Start UniPC's history with the x0 prediction ``m0`` at grid point 0."""
    run.memory["hist"] = [(run.lam[0], m0)]  # (lambda, x0 prediction), newest last


def unipc_predict(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """UniP-p from grid point i to i + 1 (no evaluation); keeps what `unipc_correct` needs in ``run.memory``."""
    a, s, lam, order = run.alpha, run.sigma, run.lam, run.options["order"]
    hist = run.memory["hist"]
    h = lam[i + 1] - lam[i]
    p = multistep_order(order, i, run.steps, run.options["lower_order_final"], run.start)
    l0, m0 = hist[-1]
    prev = hist[-p:-1]
    rs = [(lm - l0) / h for lm, _ in prev]
    aB = -a[i + 1] * math.expm1(-h)  # a_t B(h)
    ratio = s[i + 1] / s[i]
    run.memory["unic"] = (x, ratio, aB, rs, [m for _, m in prev], m0)
    return _unipc_combine(x, ratio, aB, unipc_weights(rs, h) if rs else [], rs, [m for _, m in prev], m0)


def _unipc_combine(x: torch.Tensor, ratio: float, aB: float, ws: list[float], rs: list[float],
                   ms: list[torch.Tensor], m0: torch.Tensor) -> torch.Tensor:
    """ratio x + aB m0 + aB sum_m w_m (m_m - m0) / r_m, expanded as one chain of fused multiply-adds:
    ratio x + aB (1 - sum_m w_m / r_m) m0 + sum_m (aB w_m / r_m) m_m."""
    cs = [aB * w / r for w, r in zip(ws, rs)]
    out = torch.add(x * ratio, m0, alpha=aB - sum(cs))
    for c, m in zip(cs, ms):
        out.add_(m, alpha=c)
    return out


def unipc_correct(run: GridRun, i: int, m_new: torch.Tensor) -> torch.Tensor:
    """UniC-p of step i (after `unipc_predict`) with ``m_new``, the x0 prediction at the predicted point: the same
    update with the new prediction appended at r = 1; ``m_new`` joins the history."""
    lam, order = run.lam, run.options["order"]
    x, ratio, aB, rs, ms, m0 = run.memory.pop("unic")
    if i < run.start:  # a step from lambda = -inf: no corrector (its weights assume a finite h)
        run.memory["hist"] = [(lam[i + 1], m_new)]
        return torch.add(x * ratio, m0, alpha=aB)  # the predictor from lambda = -inf has no history
    ws = unipc_weights(rs + [1.0], lam[i + 1] - lam[i])
    run.memory["hist"] = (run.memory["hist"] + [(lam[i + 1], m_new)])[-order:]
    return _unipc_combine(x, ratio, aB, ws, rs + [1.0], ms + [m_new], m0)


def _unipc_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    if isinstance(options["order"], bool) or options["order"] not in (1, 2, 3, 4):
        raise ValueError(f"unipc order must be 1, 2, 3 or 4, got {options['order']}")
    if not isinstance(options["final_corrector"], bool):
        raise ValueError(f"unipc final_corrector must be True or False, got {options['final_corrector']!r}")
    return _prepare("unipc")(process, options, steps)


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) SDE
# ---------------------------------------------------------------------------------------------------------------
def dpmpp_2m_sde_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b), data prediction, noise from ``generator`` or ``seeds``. 1 NFE/step.

    Discretises the same-marginal reverse process s = eta g (eta = 1: the reverse SDE, the default; eta = 0: exactly
    dpmpp_2m without its lower-order final step), integrating its linear part exactly; with e = eta^2:
        x_t = (s_t/s_s) e^{-e h} x + a_t (1 - e^{-(1+e) h}) D + s_t sqrt(1 - e^{-2 e h}) z,
    D = m0 + (1/(2r)) (m0 - m1) (midpoint second-order term, as in the paper). k-diffusion's
    ``sample_dpmpp_2m_sde(eta=e)`` is ours with eta = sqrt(e) (its eta is our eta^2; ours is DDIM's).
    """
    a, s, lam = run.alpha, run.sigma, run.lam
    e = run.options["eta"] ** 2
    h = lam[i + 1] - lam[i]
    m = run.x0(x, i)
    m_prev = run.memory.get("m")
    c = -a[i + 1] * math.expm1(-(1 + e) * h)
    x_new = x * (s[i + 1] / s[i] * math.exp(-e * h))
    if m_prev is None:
        x = x_new.add_(m, alpha=c)
    else:  # D = m + (m - m_prev) h / (2 h_prev), expanded into one chain of fused multiply-adds
        w = h / (2 * (lam[i] - lam[i - 1]))
        x = x_new.add_(m, alpha=c * (1 + w)).add_(m_prev, alpha=-c * w)
    run.memory["m"] = m
    if e > 0:
        x = x.add_(run.normal(x, i), alpha=s[i + 1] * math.sqrt(-math.expm1(-2 * e * h)))
    return x


def _sde_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    return {**options, "eta": noise_level("dpmpp_2m_sde", process, options["eta"], 1.0)}


_LOF = {"lower_order_final": None, "afs": False}
register(GridSolver("dpmpp_2m", step=dpmpp_2m_step, options=_LOF, prepare=_prepare("dpmpp_2m"), order=2,
                    default_grid="quadratic", starts_at_alpha0=True, requires=GAUSSIAN_KERNEL,
                    description="multistep DPM-Solver++(2M) (data prediction)"))
register(GridSolver("dpmpp_3m", step=dpmpp_3m_step, options=_LOF, prepare=_prepare("dpmpp_3m"), order=3,
                    default_grid="quadratic", starts_at_alpha0=True, requires=GAUSSIAN_KERNEL,
                    description="multistep DPM-Solver++(3M) (data prediction)"))
register(GridSolver("unipc", step=unipc_step, options={"order": 3, "final_corrector": False, **_LOF},
                    prepare=_unipc_prepare, order=3,
                    default_grid="quadratic", starts_at_alpha0=True, requires=GAUSSIAN_KERNEL,
                    description="UniPC-3 bh2: UniP predictor + free UniC corrector (data prediction)"))
register(GridSolver("dpmpp_2m_sde", step=dpmpp_2m_sde_step, options={"eta": None}, prepare=_sde_prepare, order=1,
                    default_grid="quadratic", stochastic=True, starts_at_alpha0=True, requires=GAUSSIAN_KERNEL,
                    description="DPM-Solver++(2M) SDE (data prediction, eta=1: reverse SDE)"))
