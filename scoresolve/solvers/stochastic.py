"""SDE samplers for the reverse family (see `scoresolve.reverse`), run from T down to t_eps:

    dx = [f(x, t) - (g(t)^2 + s(t)^2)/2 score(x, t)] dt + s(t) dw_bar

* `euler_maruyama` -- Euler-Maruyama on a time grid, any member s(t) (s = 0: the ``euler`` step, no noise).
* `reverse_diffusion` -- ancestral sampling: the reverse of the forward Gaussian transition, written with alpha(t)
  and sigma(t) so that one formula serves every forward SDE (DDPM ancestral for VP, SMLD's for VE); its mean is DDIM's
  eta = 1 step (`scoresolve.solvers.exponential.ddim_update`), its variance the forward or the posterior one.
* `pc` -- predictor-corrector (Song et al. 2021, Algorithm 2): reverse-diffusion or EM predictor, then Langevin
  corrector steps with the signal-to-noise step-size rule, computed per sample.
* `adaptive_sde` -- the adaptive solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast"): an EM / stochastic
  improved-Euler pair (`StochasticHeunStepper`) run by the one per-sample integrator, with rejected Brownian
  increments split with a Brownian bridge instead of being redrawn.

Noise: ``generator`` or per-sample ``seeds`` (`scoresolve.solvers.noise`). Conventions: ``ts`` is a strictly
decreasing grid from T to t_eps; a step goes from t = ts[i] to s = ts[i + 1] < t.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._utils import bcast, check_batched, check_count
from ..reverse import ReverseProcess
from ._grid import GridRun
from ._registry import GAUSSIAN_KERNEL, AdaptiveSolver, GridSolver, SolverSpec, check_start, counted, register
from ._solution import Solution
from .controllers import IController
from .exponential import (
    REVERSE_VARIANCE_OPTIONS,
    check_reverse_variance,
    ddim_weights,
    posterior_fraction,
    reverse_std,
)
from .fixed import rk_step
from .integrate import check_tolerance, integrate
from .noise import BrownianMemory, Noise
from .tableaux import EULER


def _require_reverse_sde(name: str, process: ReverseProcess) -> None:
    if process.constant_scale != 1.0:
        raise ValueError(
            f"solver {name!r} discretises the reverse SDE (diffusion=1), got diffusion={process.diffusion_scale!r}; "
            "use 'euler_maruyama' (or pc with predictor='euler_maruyama') for other members of the reverse family"
        )


# ------------------------------------------------------------------------------------------------------------------
# Euler-Maruyama and reverse diffusion
# ------------------------------------------------------------------------------------------------------------------
def em_step(run: GridRun, x: torch.Tensor, i: int, stream: int = 0) -> torch.Tensor:
    """x_s = x_t + (s - t) drift(x_t, t) + s(t) sqrt(t - s) z  (s < t, so (s - t) drift moves against the drift)."""
    x_new = rk_step(EULER, run, x, i)  # a new tensor (one fused multiply-add): the noise is added in place
    if not run.process.is_ode:
        x_new = x_new.add_(run.normal(x, i, stream), alpha=run.s[i] * math.sqrt(run.t[i] - run.t[i + 1]))
    return x_new


def euler_maruyama_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Euler-Maruyama on the member s(t) of the reverse family (any ``diffusion``; 1 NFE per step).

    For a step t = ts[i] -> s = ts[i + 1] < t:

        x_s = x_t - (t - s) [f(x_t, t) - (g(t)^2 + s(t)^2)/2 score(x_t, t)] + s(t) sqrt(t - s) z,   z ~ N(0, I).

    With diffusion = 0 this is Euler on the probability-flow ODE and no noise is drawn. Strong and weak order 1
    (the noise is additive: s depends on t only).
    """
    return em_step(run, x, i)


def rd_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """One reverse-diffusion step: DDIM's eta = 1 mean, the forward (sigma_t) or posterior (sigma_s) noise std, or
    another reverse variance (`scoresolve.solvers.exponential.reverse_std`); weights from `_rd_plan`."""
    a, b, std = _rd_plan(run)[i]
    if not run.affine:  # the model's own conversion to x0: a x + b x0, then the noise
        x_new = run.x0_combination(x, i, a, b)
        return x_new.add_(run.normal(x, i), alpha=std) if std > 0 else x_new
    out = run.raw(x, i)  # x_s = a x + b out + std z = a (x + (b / a) out) + std z: two kernels besides the draw
    if a == 0.0:
        x_new = out * b
    else:
        x_new = torch.add(x, out, alpha=b / a)
        if std <= 0:
            return x_new.mul_(a)
        return torch.add(run.normal(x, i, std=std), x_new, alpha=a)
    return x_new.add_(run.normal(x, i), alpha=std) if std > 0 else x_new


def _rd_plan(run: GridRun) -> list[tuple[float, float, float]]:
    """Per step i of the grid, (a, b, std) of the reverse-diffusion step x_s = a x + b y + std z, with y the
    network's raw output at t_i where the grid has host coefficients (`GridRun.affine`: DDIM's eta = 1 weights
    with the conversion to x0 folded in), else y = x0. Host floats, computed once per grid and kept (`per_grid`)."""
    plan = run.memory.get("rd_plan")
    if plan is not None:
        return plan
    kind, last = run.options["variance"], run.options.get("last_std")

    def build() -> list[tuple[float, float, float]]:
        rows = []
        x0 = run.grid_coefficients("x0") if run.affine else None
        for i in range(run.steps):
            frac = posterior_fraction(run, i)
            if kind in ("forward", "posterior"):
                std = frac * (run.sigma[i] if kind == "forward" else run.sigma[i + 1])
                if last is not None and i == run.steps - 1:
                    std = min(std, float(last))
            else:
                std = reverse_std(run, i, 1.0)
            cx, c0 = ddim_weights(run, i, frac)
            if x0 is not None:
                cx, c0 = cx + c0 * x0[i][0], c0 * x0[i][1]
            rows.append((cx, c0, std))
        return rows

    if kind in ("forward", "posterior"):  # a function of the grid and these keys only
        plan = run.per_grid(("rd_plan", kind, last, run.affine, run.model.prediction, run.model.sde,
                             run.process.constant_scale, run.ts.dtype), build)
    else:
        plan = build()
    run.memory["rd_plan"] = plan
    return plan


def reverse_diffusion_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Ancestral sampling ("reverse diffusion") for any forward SDE of the package; 1 NFE per step.

    For a step t -> s < t the forward transition is x_t = a x_s + sigma_{t|s} z with a = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - a^2 sigma_s^2. Tweedie's formula for this Gaussian transition gives the exact
    conditional mean E[a x_s | x_t] = x_t + sigma_{t|s}^2 grad log p_t(x_t), and the step is

        x_s = (x_t + sigma_{t|s}^2 score(x_t, t)) / a + sqrt(v) z,     z ~ N(0, I),

    with v = sigma_{t|s}^2 (``variance="forward"``, default) or v = sigma_s^2 sigma_{t|s}^2 / sigma_t^2
    (``"posterior"``: the variance of x_s given x_t and x_0); ``"beta"`` and ``"beta_tilde"`` are the same two by
    DDPM's names, and ``"analytic"`` is Analytic-DDPM's optimal variance (Bao et al. 2022; needs ``moments``, a
    [`MomentEstimate`][scoresolve.MomentEstimate]; ``data_range`` bounds it; ``last_std`` caps the last step's
    std). Special cases:

    * VP (and DDPM): a^2 = 1 - beta_i, sigma_{t|s}^2 = beta_i:  x_s = (x_t + beta_i score) / sqrt(1 - beta_i)
      + sqrt(beta_i) z, DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2 with sigma_t^2 = beta_t);
      ``"posterior"`` is DDPM's other choice, sigma_t^2 = beta-tilde_t.
    * VE: a = 1, sigma_{t|s}^2 = sigma_t^2 - sigma_s^2: x_s = x_t + (sigma_t^2 - sigma_s^2) score
      + sqrt(sigma_t^2 - sigma_s^2) z, SMLD's reverse-diffusion sampler (score_sde's ReverseDiffusionPredictor);
      ``"posterior"`` gives the ancestral sampler Song et al. 2021 derive for SMLD models.

    The mean is exact for any data; the variance is exact for Gaussian data of variance c_s with
    c_s sigma_{t|s}^2 / c_t (e.g. "forward" is exact for unit-variance data under VP, "posterior" for a point
    mass), and both tend to the reverse SDE as the steps shrink. Needs the reverse SDE itself (diffusion=1).
    """
    return rd_step(run, x, i)


def _check_variance(variance: str) -> None:
    if variance not in ("forward", "posterior"):
        raise ValueError(f"variance must be 'forward' or 'posterior', got {variance!r}")


def _rd_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    _require_reverse_sde("reverse_diffusion", process)
    opts = dict(options)
    check_reverse_variance("reverse_diffusion", opts, ("forward", "posterior", "beta", "beta_tilde", "analytic"))
    opts["variance"] = {"beta": "forward", "beta_tilde": "posterior"}.get(opts["variance"], opts["variance"])
    return opts


# ------------------------------------------------------------------------------------------------------------------
# Predictor-corrector
# ------------------------------------------------------------------------------------------------------------------
def _langevin(run: GridRun, x: torch.Tensor, i: int, j: int, row: tuple, dims: tuple[int, ...]) -> torch.Tensor:
    """Corrector j of step i: one Langevin step at grid point i + 1, x + eps score + sqrt(2 eps) z (see `pc_step`).

    With score = c u (u = x + q y for the network's output y, or y itself, or the score when the grid has no host
    coefficients; ``row`` = (q, v1, v2) from `_pc_plan`) and sqrt(eps) = sqrt(k) r / |c|, where r = 1 / ||u_b|| per
    sample (k = 2 a snr^2 D) or r = mean_b ||z_b|| / mean_b ||u_b|| for the batch (k = 2 a snr^2), the step is

        x + r v2 (z + v1 r u),     v1 = sign(c) sqrt(k / 2),  v2 = sqrt(2 k) / |c|,

    two fused kernels besides the norm; r = 0 (no move) where ||u|| is 0 or not finite.
    """
    q, v1, v2 = row
    if q is None:
        u = run.score(x, i + 1)
    elif q == 0.0:
        u = run.raw(x, i + 1)
    else:
        u = torch.add(x, run.raw(x, i + 1), alpha=q)
    z = run.normal(x, i, 1 + j)
    if v2 == 0.0:  # snr = 0: no move (the evaluation and the draw still happen)
        return x
    if run.options["norms"] == "sample":
        r = torch.linalg.vector_norm(u, dim=dims, keepdim=True).reciprocal_()
    else:  # score_sde: one step size for the whole batch
        r = torch.linalg.vector_norm(z, dim=dims).mean() / torch.linalg.vector_norm(u, dim=dims).mean()
    r = r.nan_to_num_(nan=0.0, posinf=0.0)
    return torch.addcmul(x, r, torch.addcmul(z, r, u, value=v1), value=v2)


def _pc_plan(run: GridRun, D: int) -> list[tuple]:
    """Per step i, (q, v1, v2) of its Langevin correctors at grid point i + 1 (see `_langevin`), q = None where the
    grid has no host coefficients (u = the score, c = 1) and q = 0 where u = the network's output (score = c y).
    The score's coefficients (cx, cp) give c = cx, q = cp / cx, or c = cp where cx = 0. Host floats, kept per grid."""
    plan = run.memory.get("pc_plan")
    if plan is not None:
        return plan
    o = run.options

    def build() -> list[tuple]:
        coefs = run.grid_coefficients("score") if run.affine else None
        rows = []
        for i in range(run.steps):
            a = math.exp(2 * (run.log_alpha[i] - run.log_alpha[i + 1]))
            k = 2 * a * o["snr"] ** 2 * (D if o["norms"] == "sample" else 1)
            if coefs is None:
                q, c = None, 1.0
            else:
                cx, cp = coefs[i + 1]
                q, c = (cp / cx, cx) if cx != 0.0 else (0.0, cp)
            if c == 0.0 or k == 0.0:
                rows.append((q, 0.0, 0.0))
            else:
                rows.append((q, math.copysign(math.sqrt(k / 2), c), math.sqrt(2 * k) / abs(c)))
        return rows

    plan = run.memory["pc_plan"] = run.per_grid(
        ("pc_plan", o["snr"], o["norms"], D, run.affine, run.model.prediction, run.model.sde,
         run.process.constant_scale, run.ts.dtype), build)
    return plan


def pc_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2, 4, 5); 1 + ``corrector_steps`` NFE per step.

    Each step t = ts[i] -> s = ts[i + 1] is a predictor step (``"reverse_diffusion"``, see
    `reverse_diffusion`, or ``"euler_maruyama"``) followed, at the new time s, by ``corrector_steps``
    Langevin steps targeting p_s, z ~ N(0, I):

        x <- x + eps score(x, s) + sqrt(2 eps) z,      eps = 2 a (snr ||z|| / ||score(x, s)||)^2.

    a = alpha_t^2 / alpha_s^2 in (0, 1] is the squared alpha ratio of the predictor step that arrived at s: score_sde's
    ``alpha`` written with alpha(t), so that it is defined for every SDE here (VP, sub-VP, VE, cosine, discrete;
    score_sde reads ``sde.alphas`` and fails on sub-VP). For DDPM's grid it is alphas[i] = 1 - beta_i, for VE 1.

    Norms (``norms``):

    * ``"sample"`` (default): per sample, so that a sample never depends on its batch-mates:
      eps_b = 2 a snr^2 D / ||score_b||^2, where D = E||z||^2 is the sample's dimension. The sample's own ||z||
      is not used: a step size that grows with the very noise it scales makes the injected variance
      E[2 eps z z^T] too large by (D + 2)/D (twice too large in 2-D). Note that any per-sample rule makes eps
      depend on the position x, and Langevin dynamics with a position-dependent step eps(x) samples p / eps, not p
      (eps proportional to 1/||score||^2 favours points far from the modes): a bias of relative size ~2/D per
      corrector, negligible for images (D in the thousands), large for low-dimensional toy data.
    * ``"batch"``: score_sde's rule, eps = 2 a (snr mean_b ||z_b|| / mean_b ||score_b||)^2, one step size for
      the whole batch (which couples the samples); the right choice for low-dimensional data.

    A sample whose score is exactly zero is not moved by the corrector. The predictor comes first, as in the
    paper's Algorithm 2 (score_sde's code corrects before predicting), so the last corrector acts at t_eps.
    ``snr`` defaults to 0.16, score_sde's CIFAR-10 setting for VP and VE alike (it uses 0.075 for its
    high-resolution VE models). The reverse-diffusion predictor needs diffusion=1; EM accepts any member.

    Per step, with the package's own model and process (`GridRun.affine`), the predictor is two kernels and a draw
    (`rd_step`) and each corrector five and a draw (`_langevin`); every weight is a host float from `_pc_plan`.
    """
    o = run.options
    D = math.prod(x.shape[1:])
    if i == 0 and o["norms"] == "sample" and o["corrector_steps"] > 0 and D < PC_MIN_DIM:
        warnings.warn(
            f"pc with norms='sample' on {D}-dimensional samples: the per-sample Langevin step size biases "
            f"the result by ~2/D per corrector step (exact 2-D mixture, 100/500 NFE: mean log p -2.13/-3.31 vs "
            f"-0.59 exact); for D < {PC_MIN_DIM} use norms='batch' (-1.00/-0.56 there) or corrector_steps=0",
            UserWarning, stacklevel=2)
    x = rd_step(run, x, i) if o["predictor"] == "reverse_diffusion" else em_step(run, x, i)
    if o["corrector_steps"]:
        row, dims = _pc_plan(run, D)[i], tuple(range(1, x.ndim))
        for j in range(o["corrector_steps"]):
            x = _langevin(run, x, i, j, row, dims)
    return x


PC_MIN_DIM = 64
"""Below this sample dimension ``pc`` with per-sample norms warns (its ~2/D bias per corrector; see `pc_step`)."""


def _pc_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    predictor, norms, cs = options["predictor"], options["norms"], options["corrector_steps"]
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler_maruyama', got {predictor!r}")
    if predictor == "reverse_diffusion":
        _require_reverse_sde("pc (predictor='reverse_diffusion')", process)
    _check_variance(options["variance"])
    if norms not in ("sample", "batch"):
        raise ValueError(f"norms must be 'sample' or 'batch', got {norms!r}")
    snr = float(options["snr"])
    if not (math.isfinite(snr) and snr >= 0):
        raise ValueError(f"snr must be a finite number >= 0, got {snr}")
    return {**options, "snr": snr, "corrector_steps": _corrector_steps(cs)}


def _corrector_steps(cs: Any) -> int:
    """pc's ``corrector_steps`` as an int >= 0 (checked before a budget is turned into steps: -1 divided by zero)."""
    if isinstance(cs, bool) or not isinstance(cs, (int, float)) or int(cs) != cs or cs < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {cs!r}")
    return int(cs)


# ------------------------------------------------------------------------------------------------------------------
# Adaptive SDE solver (Gotta Go Fast): a stochastic stepper for the one integrator
# ------------------------------------------------------------------------------------------------------------------
class StochasticHeunStepper:
    """The Euler-Maruyama / stochastic improved-Euler pair of `adaptive_sde` as a stepper of
    `scoresolve.solvers.integrate.integrate`. Its carry (compacted with the batch) is the EM proposal of the last
    accepted step, the Brownian memory and the per-sample seeds; noise counter = the sample's attempt index."""

    order = 2

    def __init__(self, process: ReverseProcess, noise: Noise, rtol: float, atol: float, depth: int) -> None:
        self.process, self.noise, self.rtol, self.atol, self.depth = process, noise, rtol, atol, depth
        self.mem: BrownianMemory | None = None

    def start(self, t: torch.Tensor, y: tuple, evaluate) -> tuple:
        (x,) = y
        self.mem = BrownianMemory(x, self.depth, t.dtype)
        seeds = () if self.noise.seeds is None else (self.noise.seeds,)
        return (x, *self.mem.tensors(), *seeds)

    def initial_step(self, *args: Any) -> torch.Tensor:
        raise AssertionError("adaptive_sde starts from first_step")

    def attempt(self, t, h, t_new, y, carry, evaluate, active, attempts, first):
        (x,), x_prev = y, carry[0]
        seeds = carry[5] if len(carry) > 5 else None
        mem = self.mem
        mem.load(carry[1:5])
        hs = -h  # h < 0: the reverse process runs towards t1 < t
        fresh, bridge = self.noise(x.shape, attempts, 0, seeds), self.noise(x.shape, attempts, 1, seeds)
        dW = mem.increment(hs, active, fresh, bridge)
        hx = bcast(hs.to(x.dtype), x)
        t_1 = torch.where(active, t_new, t)
        s0 = bcast(self.process.diffusion(t).to(x.dtype), x)
        s1 = bcast(self.process.diffusion(t_1).to(x.dtype), x)
        (d0,) = evaluate(t, (x,), active)
        x_em = x - hx * d0 + s0 * dW
        (d1,) = evaluate(t_1, (x_em,), active)
        x_new = x - hx * (0.5 * (d0 + d1)) + (0.5 * (s0 + s1)) * dW
        scale = torch.clamp(self.rtol * torch.maximum(x_em.abs(), x_prev.abs()), min=self.atol)
        err = ((x_new - x_em) / scale).square().flatten(1).mean(1).sqrt().to(t.dtype)
        bad = ~(torch.isfinite(x_new).flatten(1).all(1) & torch.isfinite(err))
        err = torch.where(bad, torch.full_like(err, math.inf), err)
        return (x_new,), err, bad, (x_em, mem.tensors(), dW)

    def commit(self, accept, done, h, carry, trial):
        x_em, mem_tensors, dW = trial
        x_prev = torch.where(bcast(accept, x_em), x_em, carry[0])
        mem = self.mem
        mem.load(mem_tensors)
        mem._dw = dW
        mem.advance(-h, accept, done)
        return (x_prev, *mem.tensors(), *carry[5:])

    def stats(self, carry: tuple) -> dict:
        return {"bridge_overflows": carry[4]}


ADAPTIVE_SDE_OPTIONS = {"max_steps": 10_000, "first_step": 0.01, "max_step": None, "controller": None,
                        "safety": 0.9, "exponent": 0.9, "check_every": 8, "bridge_depth": 8, "compact": False}


def _solve_sde(spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, *,
               rtol: float = 0.05, atol: float = 0.0078, generator: torch.Generator | None = None,
               seeds: Any = None, callback: Any = None, save_trajectory: bool = False, progress: bool = False,
               **options: Any) -> Solution:
    """Adaptive SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast"), per sample; 2 NFE per attempt.

    From time t with step h (the reverse process runs towards t1 < t), with the Brownian increment dW ~ N(0, h):

        x'  = x - h drift(x, t) + s(t) dW                                   (Euler-Maruyama)
        x'' = x - h (drift(x, t) + drift(x', t - h))/2 + (s(t) + s(t - h))/2 dW   (stochastic improved Euler)
        E   = RMS over the sample's dims of (x'' - x') / max(atol, rtol max(|x'|, |x'_prev|))

    where x'_prev is the EM proposal of the sample's last accepted step (x_T at first), as in the paper. The step
    is accepted when E <= 1 and the state becomes x'' (the paper's "extrapolation"); either way
    h <- min(max_step, safety h E^-exponent) (a non-finite candidate has E = inf and h shrinks tenfold). The last step
    lands exactly on t1 (a step within 1% of the remaining time is stretched to it).

    Every sample has its own t, h and error; the network is called with a ``[batch]`` time vector, and samples that
    are done are frozen at t1 (they still ride along in the batched calls). Whether all are done is read once every
    ``check_every`` iterations or sooner when the slowest sample should finish earlier (no host sync per step).

    Brownian increments: after a rejection the drawn increment is kept and the shorter retry is bridged inside it;
    see `scoresolve.solvers.noise.BrownianMemory` (at most ``bridge_depth`` remembered points per sample).

    Defaults: rtol = 0.05 and first_step = 0.01 as in the paper (it also runs rtol 0.01 and 0.02 for higher
    quality); atol = 0.0078 ~ 2/256, one 8-bit level of data scaled to [-1, 1] (the paper's VP setting; it uses
    0.0039 = 1/256 for data in [0, 1]). atol is in data units: for data of another scale use about range/256.
    rtol = 0 is pure absolute control. The error is relative to |x|, not to the data's fine structure: features
    much finer than rtol |x| are resolved only with a tighter rtol. max_step defaults to t0 - t1 (no limit).
    ``controller`` defaults to the paper's `IController(safety, exponent)`; ``max_steps``, ``check_every``,
    ``compact`` and ``progress`` are the integrator's (`scoresolve.solvers.integrate.integrate`): this solver is
    its stochastic stepper.

    Returns a [`Solution`][scoresolve.Solution] with per-sample ``nfe`` (= 2 x attempted steps of that sample),
    ``steps`` (accepted) and ``rejected``; ``stats["network_calls"]`` is the number of batched network calls (2 per
    iteration, including frozen samples). Raises `MaxStepsError` when a sample has made ``max_steps`` attempts without
    reaching t1, and a step-size-underflow error (a [`NonFiniteError`][scoresolve.NonFiniteError] when caused by
    NaN/Inf) when a sample's step size collapses below 1e-10 of the time scale; such samples are frozen while the others
    finish, and the error comes at the end (naming every stuck sample with its time; the state of the others is their
    final one).
    """
    o = spec.resolve(process, options)
    check_batched(x)
    if process.is_ode:
        raise ValueError("adaptive_sde integrates an SDE (diffusion > 0); for diffusion=0 use an ODE solver "
                         "such as 'dopri5' or 'tsit5'")
    t0, t1 = (float(v) for v in ts.detach().cpu().tolist())
    if not (math.isfinite(t0) and math.isfinite(t1) and 0 < t1 < t0 <= process.sde.T * (1 + 1e-9)):
        raise ValueError(f"need 0 < t1 < t0 <= T = {process.sde.T}, got t0={t0}, t1={t1}")
    rtol = check_tolerance(rtol, "rtol", allow_zero=True)
    atol = check_tolerance(atol, "atol")
    check_count(o["bridge_depth"], "bridge_depth")  # an integer >= 1, not rounded
    controller = o["controller"] or IController(o["safety"], o["exponent"])
    proc, model, counter = counted(process)
    check_start("adaptive_sde", False, process, model, max(t0, t1))
    stepper = StochasticHeunStepper(process, Noise(x, generator, seeds), rtol, atol, int(o["bridge_depth"]))

    def drift(t: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return proc.drift_at(xx, t)

    sol = integrate(stepper, drift, x, t0, t1, controller=controller, max_steps=o["max_steps"],
                    first_step=min(float(o["first_step"]), t0 - t1),
                    max_step=t0 - t1 if o["max_step"] is None else float(o["max_step"]),
                    check_every=o["check_every"], callback=callback, save_trajectory=save_trajectory,
                    progress=progress, name=spec.name, compact=o["compact"])
    sol.stats["network_calls"] = counter.calls
    return sol


# ------------------------------------------------------------------------------------------------------------------
# registry; the module-level functions are the entries themselves: fn(process, x, ts, **keywords)
# ------------------------------------------------------------------------------------------------------------------
_RD = {**REVERSE_VARIANCE_OPTIONS, "variance": "forward"}
_PC = {"predictor": "reverse_diffusion", "snr": 0.16, "corrector_steps": 1, "norms": "sample", "variance": "forward"}
euler_maruyama = register(GridSolver(
    "euler_maruyama", step=euler_maruyama_step, order=1.0, default_grid="uniform", stochastic=True,
    default_diffusion=1.0, description="Euler-Maruyama on the reverse family (diffusion=0: Euler)"))
reverse_diffusion = register(GridSolver(
    "reverse_diffusion", step=reverse_diffusion_step, options=_RD, prepare=_rd_prepare, order=1.0,
    default_grid="uniform", stochastic=True, default_diffusion=1.0, requires=GAUSSIAN_KERNEL,
    description="ancestral sampling (DDPM for VP, SMLD for VE), reverse SDE"))
pc = register(GridSolver(
    "pc", step=pc_step, options=_PC, prepare=_pc_prepare, evals_per_step=2, order=1.0, default_grid="uniform",
    stochastic=True, default_diffusion=1.0, requires=GAUSSIAN_KERNEL,
    evals_per_step_fn=lambda o: 1 + _corrector_steps(o.get("corrector_steps", 1)),
    description="predictor-corrector: reverse diffusion + per-sample Langevin (snr rule)"))
adaptive_sde = register(AdaptiveSolver(
    "adaptive_sde", run=_solve_sde, options=ADAPTIVE_SDE_OPTIONS, evals_per_step=2, order=1.0,
    stochastic=True, default_diffusion=1.0,
    description="adaptive EM/improved-Euler SDE solver (Gotta Go Fast), per-sample steps"))
