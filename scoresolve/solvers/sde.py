"""SDE samplers for the reverse family (see `scoresolve.reverse`), run from T down to t_eps:

    dx = [f(x, t) - (g(t)^2 + s(t)^2)/2 score(x, t)] dt + s(t) dw_bar

* `euler_maruyama` -- Euler-Maruyama on a time grid, any member s(t) (s = 0: Euler on the PF-ODE).
* `reverse_diffusion` -- ancestral sampling: the reverse of the forward Gaussian transition, written with
  alpha(t) and sigma(t) so that one formula serves every forward SDE (DDPM ancestral for VP, SMLD's for VE).
* `pc` -- predictor-corrector (Song et al. 2021, Algorithm 2): reverse-diffusion or EM predictor, then
  Langevin corrector steps with the signal-to-noise step-size rule, computed per sample.
* `adaptive_sde` -- the adaptive solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast"): an EM /
  stochastic improved-Euler pair, per-sample step sizes, and rejected Brownian increments split with a Brownian
  bridge instead of being redrawn.

Noise. Every sampler takes ``generator`` (a ``torch.Generator``: reproducible, but the numbers a sample receives
depend on its position in the batch and on the batch size) or ``seeds`` (one integer per sample: counter-based
noise, see `seeded_normal`, so that a sample's path depends only on its own seed and start point, never on
its batch-mates). With neither, torch's global generator is used.

Conventions: ``ts`` is a strictly decreasing grid from T to t_eps; a step goes from t = ts[i] to s = ts[i + 1] < t.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from .._utils import bcast, check_batched
from ..reverse import ReverseProcess
from ._core import FiniteGuard, GridRun, Solution, SolverSpec, Trajectory, counted_model, register, with_score
from .ode import MaxStepsError, NonFiniteStepError, StepSizeUnderflowError

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Seeds = Union[Sequence[int], torch.Tensor]


# ------------------------------------------------------------------------------------------------------------------
# Noise: a torch.Generator, or counter-based per-sample streams
# ------------------------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for int64 ``x`` in [0, 2^32) without int64 overflow (m split into 16-bit halves)."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply, the constants of the "lowbias32" mixer)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _lane(seed_lo: torch.Tensor, seed_hi: torch.Tensor, counter: torch.Tensor, stream: int, salt: int) -> torch.Tensor:
    h = _mix32(seed_lo ^ salt)
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ counter)
    return _mix32(h ^ (stream & _MASK32))


def seeded_normal(
    seeds: torch.Tensor,
    counter: int | torch.Tensor,
    stream: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal numbers that are a pure function of (seed, counter, stream, element index).

    ``seeds`` is a ``[batch]`` int64 tensor (any 64-bit values), ``counter`` an int or a ``[batch]`` tensor (e.g.
    the step index of each sample), ``stream`` an int that separates independent uses within a step; ``shape`` is
    the full shape ``[batch, ...]``. Row i depends only on (seeds[i], counter[i], stream): this is what makes a
    sample's noise independent of its batch-mates and of the batch size. No Python loop over the batch.

    Construction: two independent 32-bit lanes, each a chain of a bijective 32-bit integer hash over the seed's
    two halves, the counter and the stream, then hashed twice more with the element index; the lanes give two
    uniforms u1, u2 in (0, 1) (resolution 2^-32) and z = sqrt(-2 log u1) cos(2 pi u2) (Box-Muller). Two noise
    vectors coincide only if both 32-bit lanes collide.
    """
    dev = seeds.device if device is None else torch.device(device)
    seeds = seeds.to(device=dev, dtype=torch.int64)
    B = seeds.shape[0]
    n = math.prod(shape[1:])
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    if torch.is_tensor(counter):
        c = counter.to(device=dev, dtype=torch.int64).expand(B) & _MASK32
    else:
        c = torch.full((B,), int(counter) & _MASK32, dtype=torch.int64, device=dev)
    e = torch.arange(n, dtype=torch.int64, device=dev)
    bits = []
    for salt, esalt in ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344)):  # digits of pi as salts
        k = _lane(lo, hi, c, stream, salt)  # [B]
        eh = _mix32(e ^ esalt)  # [n]
        bits.append(_mix32(_mix32(k[:, None] ^ eh[None, :]) ^ esalt))  # [B, n]
    fdtype = torch.float32 if dev.type == "mps" else torch.float64
    u1 = (bits[0].to(fdtype) + 0.5) * 2.0**-32
    u2 = (bits[1].to(fdtype) + 0.5) * 2.0**-32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(tuple(shape)).to(dtype)


class _Noise:
    """Standard normal draws shaped like ``x`` from a generator, or per-sample counter-based streams (seeds)."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None, seeds: Seeds | None) -> None:
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.generator = generator
        self.seeds: torch.Tensor | None = None
        if seeds is not None:
            if generator is not None:
                raise ValueError("give either generator or seeds, not both")
            vals = seeds.tolist() if torch.is_tensor(seeds) else list(seeds)
            if len(vals) != x.shape[0]:
                raise ValueError(f"seeds must hold one integer per sample: got {len(vals)} for batch size {x.shape[0]}")
            ints = []
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"seeds must be integers, got {type(v).__name__}")
                ints.append(((v & 0xFFFFFFFFFFFFFFFF) ^ 0x8000000000000000) - 0x8000000000000000)  # as signed 64-bit
            self.seeds = torch.tensor(ints, dtype=torch.int64, device=x.device)

    def __call__(self, counter: int | torch.Tensor = 0, stream: int = 0) -> torch.Tensor:
        if self.seeds is None:
            return torch.randn(self.shape, generator=self.generator, dtype=self.dtype, device=self.device)
        return seeded_normal(self.seeds, counter, stream, self.shape, self.dtype, self.device)


# ------------------------------------------------------------------------------------------------------------------
# Grid samplers: shared plumbing
# ------------------------------------------------------------------------------------------------------------------
class _Run(GridRun):
    """What a grid sampler needs: counted score, grid coefficients (Python floats, one sync on entry), noise,
    non-finite guard, trajectory and callback."""

    def __init__(self, name: str, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor,
                 generator: torch.Generator | None, seeds: Seeds | None, callback: Callback | None,
                 save_trajectory: bool) -> None:
        super().__init__(name, process, x, ts, callback, save_trajectory)
        self.noise = _Noise(x, generator, seeds)
        t64 = self.t64
        alpha, sigma = self.sde.marginal(t64)
        self.log_alpha = torch.log(alpha).tolist()
        self.sigma = sigma.tolist()
        self.lam = self.sde.log_snr(t64).tolist()
        self.s = process.diffusion(t64).to(torch.float64).expand(t64.shape).tolist()  # s(t) on the grid

    def score(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.model(x, self.time(i, x))

    def drift(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = self.time(i, x)
        return self.proc.drift_from_score(x, t, self.model(x, t))



def _require_reverse_sde(name: str, process: ReverseProcess) -> None:
    c = process.diffusion_scale
    if callable(c) or float(c) != 1.0:
        raise ValueError(
            f"solver {name!r} discretises the reverse SDE (diffusion=1), got diffusion={c!r}; use "
            "'euler_maruyama' (or pc with predictor='euler_maruyama') for other members of the reverse family"
        )


def _em_step(run: _Run, x: torch.Tensor, i: int, stream: int = 0) -> torch.Tensor:
    """x_s = x_t + (s - t) drift(x_t, t) + s(t) sqrt(t - s) z  (s < t, so (s - t) drift moves against the drift)."""
    h = run.t[i + 1] - run.t[i]
    x_new = x + h * run.drift(x, i)
    if not run.process.is_ode:
        x_new = x_new + (run.s[i] * math.sqrt(-h)) * run.noise(i, stream)
    return x_new


def _rd_coefficients(run: _Run, i: int, variance: str) -> tuple[float, float, float]:
    """(a, sigma_{t|s}^2, noise variance) of the reverse-diffusion step t = ts[i] -> s = ts[i + 1]."""
    a = math.exp(run.log_alpha[i] - run.log_alpha[i + 1])  # alpha_t / alpha_s
    # sigma_t^2 - a^2 sigma_s^2 = sigma_t^2 (1 - e^{2 (lambda_t - lambda_s)}), without cancellation
    var_ts = -run.sigma[i] ** 2 * math.expm1(2 * (run.lam[i] - run.lam[i + 1]))
    if variance == "forward":
        var = var_ts
    else:  # posterior: Var(x_s | x_t, x_0)
        var = var_ts * (run.sigma[i + 1] / run.sigma[i]) ** 2
    return a, var_ts, var


def _rd_step(run: _Run, x: torch.Tensor, i: int, variance: str, stream: int = 0) -> torch.Tensor:
    a, var_ts, var = _rd_coefficients(run, i, variance)
    x_new = (x + var_ts * run.score(x, i)) / a
    return x_new + math.sqrt(var) * run.noise(i, stream)


# ------------------------------------------------------------------------------------------------------------------
# Euler-Maruyama
# ------------------------------------------------------------------------------------------------------------------
def euler_maruyama(
    process: ReverseProcess,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    seeds: Seeds | None = None,
    callback: Callback | None = None,
    save_trajectory: bool = False,
) -> Solution:
    """Euler-Maruyama on the member s(t) of the reverse family (any ``diffusion``; 1 NFE per step).

    For a step t = ts[i] -> s = ts[i + 1] < t:

        x_s = x_t - (t - s) [f(x_t, t) - (g(t)^2 + s(t)^2)/2 score(x_t, t)] + s(t) sqrt(t - s) z,   z ~ N(0, I).

    With diffusion = 0 this is Euler on the probability-flow ODE and no noise is drawn. Strong and weak order 1
    (the noise is additive: s depends on t only).
    """
    run = _Run("euler_maruyama", process, x, ts, generator, seeds, callback, save_trajectory)
    for i in range(run.steps):
        x = _em_step(run, x, i)
        run.done(i, x)
    return run.solution(x)


# ------------------------------------------------------------------------------------------------------------------
# Reverse diffusion (ancestral sampling)
# ------------------------------------------------------------------------------------------------------------------
def reverse_diffusion(
    process: ReverseProcess,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    variance: str = "forward",
    generator: torch.Generator | None = None,
    seeds: Seeds | None = None,
    callback: Callback | None = None,
    save_trajectory: bool = False,
) -> Solution:
    """Ancestral sampling ("reverse diffusion") for any forward SDE of the package; 1 NFE per step.

    For a step t -> s < t the forward transition is x_t = a x_s + sigma_{t|s} z with a = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - a^2 sigma_s^2. Tweedie's formula for this Gaussian transition gives the exact
    conditional mean E[a x_s | x_t] = x_t + sigma_{t|s}^2 grad log p_t(x_t), and the step is

        x_s = (x_t + sigma_{t|s}^2 score(x_t, t)) / a + sqrt(v) z,     z ~ N(0, I),

    with v = sigma_{t|s}^2 (``variance="forward"``, default) or v = sigma_s^2 sigma_{t|s}^2 / sigma_t^2
    (``"posterior"``: the variance of x_s given x_t and x_0). Special cases:

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
    _require_reverse_sde("reverse_diffusion", process)
    if variance not in ("forward", "posterior"):
        raise ValueError(f"variance must be 'forward' or 'posterior', got {variance!r}")
    run = _Run("reverse_diffusion", process, x, ts, generator, seeds, callback, save_trajectory)
    for i in range(run.steps):
        x = _rd_step(run, x, i, variance)
        run.done(i, x)
    return run.solution(x, variance=variance)


# ------------------------------------------------------------------------------------------------------------------
# Predictor-corrector
# ------------------------------------------------------------------------------------------------------------------
def _langevin(x: torch.Tensor, score: torch.Tensor, z: torch.Tensor, c: float, norms: str) -> torch.Tensor:
    """One Langevin step x + eps score + sqrt(2 eps) z with eps = c ||z||^2 / ||score||^2 (see `pc`)."""
    s2 = score.flatten(1).square().sum(1)
    if norms == "sample":
        eps = torch.where(s2 > 0, (c * z[0].numel()) / torch.where(s2 > 0, s2, 1.0), 0.0)
    else:  # score_sde: squared batch means of the norms (one step size for the whole batch)
        zn, sn = z.flatten(1).norm(dim=1).mean(), s2.sqrt().mean()
        eps = torch.where(sn > 0, c * zn.square() / torch.where(sn > 0, sn, 1.0).square(), 0.0).expand(s2.shape)
    return x + bcast(eps, x) * score + bcast(torch.sqrt(2 * eps), x) * z


def pc(
    process: ReverseProcess,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    predictor: str = "reverse_diffusion",
    snr: float = 0.16,
    corrector_steps: int = 1,
    norms: str = "sample",
    variance: str = "forward",
    generator: torch.Generator | None = None,
    seeds: Seeds | None = None,
    callback: Callback | None = None,
    save_trajectory: bool = False,
) -> Solution:
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
    """
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler_maruyama', got {predictor!r}")
    if predictor == "reverse_diffusion":
        _require_reverse_sde("pc (predictor='reverse_diffusion')", process)
    if variance not in ("forward", "posterior"):
        raise ValueError(f"variance must be 'forward' or 'posterior', got {variance!r}")
    if norms not in ("sample", "batch"):
        raise ValueError(f"norms must be 'sample' or 'batch', got {norms!r}")
    snr = float(snr)
    if not (math.isfinite(snr) and snr >= 0):
        raise ValueError(f"snr must be a finite number >= 0, got {snr}")
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    corrector_steps = int(corrector_steps)
    run = _Run("pc", process, x, ts, generator, seeds, callback, save_trajectory)
    for i in range(run.steps):
        if predictor == "reverse_diffusion":
            x = _rd_step(run, x, i, variance)
        else:
            x = _em_step(run, x, i)
        a = math.exp(2 * (run.log_alpha[i] - run.log_alpha[i + 1]))
        for j in range(corrector_steps):
            score = run.score(x, i + 1)
            z = run.noise(i, 1 + j)
            x = _langevin(x, score, z, 2 * a * snr**2, norms)
        run.done(i, x)
    return run.solution(x, predictor=predictor, snr=snr, corrector_steps=corrector_steps, norms=norms)


# ------------------------------------------------------------------------------------------------------------------
# Adaptive SDE solver (Gotta Go Fast)
# ------------------------------------------------------------------------------------------------------------------
class _BrownianMemory:
    """Per-sample memory of the Brownian path ahead of each sample's current time.

    Sample b remembers up to ``depth`` points of its Brownian path beyond its current time: the distance
    U[b, k] > 0 from the current time and the value W[b, k] relative to the current point, in unordered slots
    (``valid`` marks the used ones). These are values of one fixed Brownian path that an earlier, rejected attempt
    has already looked at, so later queries must agree with them (Rackauckas & Nie 2017, "rejection sampling
    with memory"). ``increment(h)`` returns W(h), the increment over the next h:

    * if a remembered point lies at h, its value;
    * else, if one lies beyond h, a Brownian-bridge sample between the nearest remembered points a < h < b
      (a = the current point if none is nearer): W(h) = W_a + (h - U_a)/(U_b - U_a) (W_b - W_a)
      + sqrt((h - U_a)(U_b - h)/(U_b - U_a)) xi;
    * else a fresh increment from the farthest remembered point: W(h) = W_a + sqrt(h - U_a) xi;

    and remembers the new point. ``advance()`` moves accepted samples to their new time (distances shrink by h,
    values are re-referenced to W(h), points now behind are forgotten); after a rejection everything stays, so
    the shorter retry is bridged inside the increment that was drawn, and a step accepted later sees the same
    path. Every query is answered by one Brownian path, so the accepted steps are driven by a genuine Brownian
    motion whatever the accept/reject decisions (which depend on that path); redrawing after a rejection (the
    reference code) keeps only the draws that led to small errors and biases the noise. When all ``depth`` slots
    are full the new point is not remembered (``overflows`` counts this per sample; it takes about ``depth``
    rejections in a row): the retry after it re-bridges inside (a, b), a small-scale loss that keeps the far
    points, which carry the large-scale path, exact.
    """

    def __init__(self, x: torch.Tensor, depth: int, tdtype: torch.dtype) -> None:
        B = x.shape[0]
        self.U = torch.zeros(B, depth, dtype=tdtype, device=x.device)
        self.valid = torch.zeros(B, depth, dtype=torch.bool, device=x.device)
        self.W = torch.zeros((B, depth) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        self.k = torch.arange(depth, device=x.device)[None, :]
        self.rel = 1e-9 if tdtype == torch.float64 else 1e-5
        self.overflows = torch.zeros(B, dtype=torch.long, device=x.device)
        self._dw: torch.Tensor | None = None

    def _at(self, idx: torch.Tensor) -> torch.Tensor:
        """W[b, idx[b]] for each sample, shape like x."""
        W = self.W
        return W.gather(1, bcast(idx[:, None], W).expand((W.shape[0], 1) + W.shape[2:]))[:, 0]

    def increment(self, h: torch.Tensor, active: torch.Tensor, fresh: torch.Tensor, bridge: torch.Tensor):
        """W over the next ``h`` (``[batch]``; 0 for inactive samples); ``fresh``, ``bridge``: N(0, I) like x."""
        U, V = self.U, self.valid
        inf = torch.full_like(U, math.inf)
        beyond = V & (U >= (h * (1 - self.rel))[:, None])
        Ub, ib = torch.where(beyond, U, inf).min(1)
        Ua, ia = torch.where(V & ~beyond, U, -inf).max(1)
        has_b, has_a = torch.isfinite(Ub), torch.isfinite(Ua)
        Ua = torch.where(has_a, Ua, 0.0)
        Wa = torch.where(bcast(has_a, fresh), self._at(ia), 0.0)
        Wb = self._at(ib)
        on_b = has_b & (Ub <= h * (1 + self.rel))
        inside = has_b & ~on_b
        Ub_safe = torch.where(inside, Ub, Ua + 1.0)
        frac = torch.where(inside, (h - Ua) / (Ub_safe - Ua), 0.0)
        var = torch.where(inside, (h - Ua) * (Ub_safe - h) / (Ub_safe - Ua), (h - Ua)).clamp(min=0)
        noise = torch.where(bcast(inside, fresh), bridge, fresh)
        dw = Wa + bcast(frac.to(fresh.dtype), fresh) * (Wb - Wa) + bcast(var.sqrt().to(fresh.dtype), fresh) * noise
        dw = torch.where(bcast(on_b, dw), Wb, dw)
        dw = torch.where(bcast(active, dw), dw, 0.0)
        # remember the new point in a free slot; when all are taken it is not remembered (so the far points,
        # which carry the large-scale path, are kept and the loss is confined inside the bracket (a, b))
        free = ~V
        new = active & ~on_b
        self.overflows = self.overflows + (new & ~free.any(1)).long()
        put = (self.k == free.long().argmax(1)[:, None]) & (new & free.any(1))[:, None]
        self.U = torch.where(put, h[:, None], U)
        self.valid = V | put
        self.W = torch.where(bcast(put, self.W), dw[:, None], self.W)
        self._dw = dw
        return dw

    def advance(self, h: torch.Tensor, accepted: torch.Tensor, finished: torch.Tensor) -> None:
        """Move accepted samples forward by ``h`` (the step just tried); forget everything of finished ones."""
        assert self._dw is not None
        h = h.to(self.U.dtype)
        U = torch.where(accepted[:, None], self.U - h[:, None], self.U)
        self.valid = self.valid & ~finished[:, None] & (U > (h * self.rel)[:, None])
        self.U = U
        self.W = torch.where(bcast(accepted, self.W), self.W - self._dw[:, None], self.W)


def adaptive_sde(
    process: ReverseProcess,
    x: torch.Tensor,
    t0: float,
    t1: float,
    *,
    rtol: float = 0.05,
    atol: float = 0.0078,
    generator: torch.Generator | None = None,
    seeds: Seeds | None = None,
    callback: Callback | None = None,
    save_trajectory: bool = False,
    max_steps: int = 10_000,
    h_init: float = 0.01,
    h_max: float | None = None,
    safety: float = 0.9,
    exponent: float = 0.9,
    check_every: int = 8,
    bridge_depth: int = 8,
) -> Solution:
    """Adaptive SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast"), per sample; 2 NFE per attempt.

    From time t with step h (the reverse process runs towards t1 < t), with the Brownian increment dW ~ N(0, h):

        x'  = x - h drift(x, t) + s(t) dW                                   (Euler-Maruyama)
        x'' = x - h (drift(x, t) + drift(x', t - h))/2 + (s(t) + s(t - h))/2 dW   (stochastic improved Euler)
        E   = RMS over the sample's dims of (x'' - x') / max(atol, rtol max(|x'|, |x'_prev|))

    where x'_prev is the EM proposal of the sample's last accepted step (x_T at first), as in the paper. The step
    is accepted when E <= 1 and the state becomes x'' (the paper's "extrapolation"); either way
    h <- min(h_max, safety h E^-exponent) (a non-finite candidate has E = inf and h shrinks tenfold). The last step
    lands exactly on t1 (a step within 1% of the remaining time is stretched to it).

    Every sample has its own t, h and error; the network is called with a ``[batch]`` time vector, and samples that
    are done are frozen at t1 (they still ride along in the batched calls). Whether all are done is read once every
    ``check_every`` iterations or sooner when the slowest sample should finish earlier (no host sync per step).

    Brownian increments: after a rejection the drawn increment is kept and the shorter retry is bridged inside it;
    see `_BrownianMemory` (at most ``bridge_depth`` remembered points per sample).

    Defaults: rtol = 0.05 and h_init = 0.01 as in the paper (it also runs rtol 0.01 and 0.02 for higher
    quality); atol = 0.0078 ~ 2/256, one 8-bit level of data scaled to [-1, 1] (the paper's VP setting; it uses
    0.0039 = 1/256 for data in [0, 1]). atol is in data units: for data of another scale use about range/256.
    rtol = 0 is pure absolute control. The error is relative to |x|, not to the data's fine structure: features
    much finer than rtol |x| are resolved only with a tighter rtol. h_max defaults to t0 - t1 (no limit).

    Returns a [`Solution`][scoresolve.Solution] with per-sample ``nfe`` (= 2 x attempted steps of that sample),
    ``steps`` (accepted) and ``rejected``; ``stats["network_calls"]`` is the number of batched network calls (2 per
    iteration, including frozen samples). Raises `MaxStepsError` when a sample has made ``max_steps`` attempts without
    reaching t1, and a step-size-underflow error (a [`NonFiniteError`][scoresolve.NonFiniteError] when caused by
    NaN/Inf) when a sample's step size collapses below 1e-10 of the time scale; such samples are frozen while the others
    finish, and the error comes at the end (naming every stuck sample with its time; the state of the others is their
    final one).
    """
    name = "adaptive_sde"
    check_batched(x)
    if process.is_ode:
        raise ValueError("adaptive_sde integrates an SDE (diffusion > 0); for diffusion=0 use an ODE solver "
                         "such as 'dopri5' or 'tsit5'")
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1) and 0 < t1 < t0 <= process.sde.T * (1 + 1e-9)):
        raise ValueError(f"need 0 < t1 < t0 <= T = {process.sde.T}, got t0={t0}, t1={t1}")
    for val, what, lo in ((rtol, "rtol", 0.0), (atol, "atol", 0.0)):
        if not (math.isfinite(float(val)) and float(val) >= lo):
            raise ValueError(f"{what} must be a finite number >= 0, got {val!r}")
    rtol, atol = float(rtol), float(atol)
    if atol <= 0:
        raise ValueError(f"atol must be > 0 (it floors the error scale), got {atol}")
    span = t0 - t1
    h_max = span if h_max is None else float(h_max)
    for val, what in ((h_init, "h_init"), (h_max, "h_max")):
        if not (math.isfinite(float(val)) and float(val) > 0):
            raise ValueError(f"{what} must be a finite number > 0, got {val!r}")
    if not (0 < safety <= 1) or not exponent > 0:
        raise ValueError(f"need 0 < safety <= 1 and exponent > 0, got {safety}, {exponent}")
    if int(max_steps) < 1 or int(check_every) < 1 or int(bridge_depth) < 1:
        raise ValueError(f"need max_steps >= 1, check_every >= 1, bridge_depth >= 1; "
                         f"got {max_steps}, {check_every}, {bridge_depth}")
    max_steps, check_every = int(max_steps), int(check_every)

    model, counter = counted_model(process)
    proc = with_score(process, model)
    noise = _Noise(x, generator, seeds)
    B, dev = x.shape[0], x.device
    tdtype = torch.float32 if dev.type == "mps" else torch.float64
    h_min = 1e-10 * max(t0, span)
    t = torch.full((B,), t0, dtype=tdtype, device=dev)
    t_end = torch.full((B,), t1, dtype=tdtype, device=dev)
    h = torch.full((B,), min(float(h_init), h_max, span), dtype=tdtype, device=dev)
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    attempts, steps, rejected = zeros.clone(), zeros.clone(), zeros.clone()
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stuck = torch.zeros(B, dtype=torch.bool, device=dev)
    nonfinite_recent = torch.zeros(B, dtype=torch.bool, device=dev)
    x_prev = x
    memory = _BrownianMemory(x, int(bridge_depth), tdtype)
    guard, traj = FiniteGuard(x, name), Trajectory(save_trajectory)
    traj.add(t.to(x.dtype), x)

    def drift(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        tx = tt.to(x.dtype)
        return proc.drift_from_score(xx, tx, model(xx, tx))

    it, next_check = 0, 1
    while True:
        it += 1
        active = ~(done | stuck)  # stuck samples (step-size underflow) are frozen too and reported at the end
        remaining = t - t_end
        last = h * 1.01 >= remaining
        hs = torch.where(active, torch.where(last, remaining, h), torch.zeros_like(h))
        t_new = torch.where(last, t_end, t - hs)
        dW = memory.increment(hs, active, noise(attempts, 0), noise(attempts, 1))
        hx = bcast(hs.to(x.dtype), x)
        s0 = bcast(process.diffusion(t).to(x.dtype), x)
        s1 = bcast(process.diffusion(torch.where(active, t_new, t)).to(x.dtype), x)
        d0 = drift(x, t)
        x_em = x - hx * d0 + s0 * dW
        d1 = drift(x_em, torch.where(active, t_new, t))
        x_new = x - hx * (0.5 * (d0 + d1)) + (0.5 * (s0 + s1)) * dW
        scale = torch.clamp(rtol * torch.maximum(x_em.abs(), x_prev.abs()), min=atol)
        err = ((x_new - x_em) / scale).square().flatten(1).mean(1).sqrt().to(tdtype)
        bad = ~(torch.isfinite(x_new).flatten(1).all(1) & torch.isfinite(err))
        err = torch.where(bad, torch.full_like(err, math.inf), err)

        accept = active & (err <= 1.0)
        reject = active & ~accept
        fac = torch.where(bad, torch.full_like(err, 0.1), safety * err.clamp(min=1e-10).pow(-exponent))
        h = torch.where(active, torch.clamp(hs * fac, max=h_max), h)
        x = torch.where(bcast(accept, x), x_new, x)
        x_prev = torch.where(bcast(accept, x), x_em, x_prev)
        t = torch.where(accept, t_new, t)
        attempts = attempts + active.long()
        steps = steps + accept.long()
        rejected = rejected + reject.long()
        done = done | (accept & last)
        memory.advance(hs, accept, done)
        nonfinite_recent = torch.where(reject, bad, nonfinite_recent)
        stuck = stuck | (reject & (hs < h_min))
        guard.update(x, t)
        traj.add(t.to(x.dtype), x)

        if it >= next_check or it >= max_steps:
            # the one host-device synchronisation: all finished? how many steps the slowest sample still needs
            finished = done | stuck
            need = torch.where(finished, torch.zeros_like(h), (t - t_end) / h).amax()
            all_finished, n_est = torch.stack([finished.all().to(tdtype), need]).tolist()
            next_check = it + max(1, min(check_every, math.ceil(n_est) if math.isfinite(n_est) else check_every))
            if callback is not None:
                callback(it, t.to(x.dtype), x)
            if all_finished:
                break
            if it >= max_steps:
                idx = (~finished).nonzero().flatten().tolist()
                raise MaxStepsError(name, max_steps, idx, t[~finished].tolist(), x)

    if not bool(done.all()):  # some samples are stuck; the others finished (their final states are in x)
        idx = stuck.nonzero().flatten().tolist()
        times = t[stuck].tolist()
        nonfinite = nonfinite_recent[stuck].tolist()
        if any(nonfinite):
            raise NonFiniteStepError(name, [i for i, nf in zip(idx, nonfinite) if nf],
                                     [ti for ti, nf in zip(times, nonfinite) if nf], x)
        raise StepSizeUnderflowError(name, idx, times, x, h_min)
    guard.check()
    tr_ts, tr_xs = traj.result()
    return Solution(x=x, nfe=2 * attempts, steps=steps, rejected=rejected, t=t.to(x.dtype), ts=tr_ts, xs=tr_xs,
                    solver=name, stats={"calls": counter.calls, "network_calls": counter.calls, "iterations": it,
                                        "h": h.to(x.dtype), "bridge_overflows": memory.overflows})


# ------------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------------
register(SolverSpec("euler_maruyama", euler_maruyama, evals_per_step=1, order=1.0, default_grid="uniform",
                    stochastic=True, default_diffusion=1.0,
                    description="Euler-Maruyama on the reverse family (diffusion=0: Euler)"))
register(SolverSpec("reverse_diffusion", reverse_diffusion, evals_per_step=1, order=1.0, default_grid="uniform",
                    stochastic=True, default_diffusion=1.0,
                    description="ancestral sampling (DDPM for VP, SMLD for VE), reverse SDE"))
register(SolverSpec("pc", pc, evals_per_step=2, order=1.0, default_grid="uniform", stochastic=True,
                    default_diffusion=1.0, evals_per_step_fn=lambda o: 1 + int(o.get("corrector_steps", 1)),
                    description="predictor-corrector: reverse diffusion + per-sample Langevin (snr rule)"))
register(SolverSpec("adaptive_sde", adaptive_sde, kind="adaptive", evals_per_step=2, order=1.0, stochastic=True,
                    default_diffusion=1.0,
                    description="adaptive EM/improved-Euler SDE solver (Gotta Go Fast), per-sample steps"))
