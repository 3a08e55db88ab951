"""The discrete-time variational bound of a diffusion model read as a hierarchical VAE (Ho et al. 2020; Bao et al.
2022 for other reverse variances and step subsequences).

For a chain of times 0 = t_0 < t_1 < ... < t_K (x_k = x_{t_k}; DDPM's x_n at t = n/N) and the DDIM(eta) inference
process q (eta = 1: DDPM's Markov chain; see `scoresolve.reverse_variance`), the negative bound on log p(x_0) is

    -ELBO = L_T + sum_{k=2}^{K} L_{k-1} + L_0,
    L_T     = KL(q(x_K | x_0) || N(0, prior_std^2 I))                             the prior term
    L_{k-1} = E_{x_k ~ q(x_k | x_0)} KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k))   the step terms
            = E [ d/2 (log(v_k / lambda_k^2) + lambda_k^2 / v_k - 1) + c_k^2 ||x_0 - x0_hat(x_k)||^2 / (2 v_k) ]
    L_0     = E_{x_1 ~ q(x_1 | x_0)} [-log p(x_0 | x_1)]                             the decoder term

with the reverse step p(x_{k-1} | x_k) = N(mean of q with x_0 -> x0_hat(x_k), v_k I). Each expectation is estimated
with one draw of x_k per sample and per step (one network evaluation per step: K NFE per sample). The draws are
counter-based per-sample noise (``seeds``), so a sample's bound never depends on its batch-mates, and a step n of
the N-step chain gets the same draw whatever subsequence it belongs to (bounds for several K share their noise).

The decoder: ``"gaussian"`` (a density on continuous data, -log N(x_0; x0_hat, v_1 I)) or ``"discretized"`` (Ho et
al.'s: the Gaussian integrated over the bin of each value of L-level data in [lo, hi], bins of width (hi - lo)/(L -
1) centred on the grid lo + (hi - lo) i / (L - 1), the edge bins extended to -inf / +inf; a probability, so its
bits/dim need no dequantization offset). Its variance v_1 (``decoder_variance``): ``"ddpm"`` (Ho et al.'s and Bao
et al.'s choice: beta-tilde of the step 2 t_1 -> t_1, i.e. beta-tilde_2 of the N-step chain), ``"analytic"``
((sigma_1/alpha_1)^2 (1 - Gamma_1), the optimal one, clipped to the data range), or a number.

Schedules: `DiscreteVPSDE` (steps on its own N knots), and continuous VP, sub-VP and cosine schedules discretised
to N = ``num_timesteps`` steps t_n = n T / N. Any schedule with sigma(0) = 0 and alpha > 0 on the chain works.

``scoresolve.elbo`` is this module's `elbo` function (with `ElboResult`, re-exported); the module is
``scoresolve.variational`` (it was ``scoresolve/elbo.py``, whose name the function shadowed: ``scoresolve.elbo.bound``
and ``import scoresolve.elbo as m`` reached the function, not the module).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ._utils import check_batched, check_count
from .process import check_process
from .reverse_variance import (
    VARIANCES,
    MomentEstimate,
    analytic_variance,
    base_variance,
    posterior_variance,
    reverse_variance,
    x0_coefficient,
)
from .sde import ForwardSDE
from .solvers.errors import NonFiniteError
from .solvers.noise import seeded_normal

DECODERS = ("gaussian", "discretized")
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class ElboStatistics:
    """What the network contributes to the bound, for one chain of times; every variance choice reuses it.

    Attributes:
        times: ``[K + 1]`` float64, t_0 = 0 first; counters: ``[K]`` the noise counter of each step (its index n
            in the N-step chain); x0: the data ``[B, ...]``; err2: ``[B, K]`` float64 ||eps - eps_theta(x_k, t_k)||^2
            per sample and step; x0_hat: ``[B, ...]`` the data prediction at t_1 (for the decoder); nfe: network
            evaluations per sample (K).
    """

    times: torch.Tensor
    counters: torch.Tensor
    x0: torch.Tensor
    err2: torch.Tensor
    x0_hat: torch.Tensor
    nfe: int

    def subset(self, times: torch.Tensor) -> "ElboStatistics":
        """The statistics of a subsequence of this chain (same t_1, its times among this chain's)."""
        times = torch.as_tensor(times, dtype=torch.float64).cpu()
        pos = torch.searchsorted(self.times, times)
        pos = pos.clamp(max=self.times.numel() - 1)
        if not torch.allclose(self.times[pos], times, rtol=1e-12, atol=1e-15) or int(pos[0]) != 0:
            raise ValueError("the subsequence's times must be times of this chain, starting at t_0 = 0")
        if int(pos[1]) != 1:
            raise ValueError("a subsequence must keep the chain's t_1 (the decoder's x0_hat is stored there)")
        cols = pos[1:] - 1
        return ElboStatistics(times, self.counters[cols], self.x0, self.err2[:, cols], self.x0_hat,
                              int(cols.numel()))


@dataclass
class ElboResult:
    """The variational bound of each sample and its parts (all nats, ``[B]`` unless noted).

    elbo: the lower bound on log p(x_0); nll: -elbo; bits_per_dim: nll / (D ln 2), plus the dequantization offset
    log2(L / (hi - lo)) for the Gaussian decoder on dequantized L-level data (``num_levels`` given); prior: L_T;
    terms: ``[B, K - 1]`` the step terms L_1 .. L_{K-1} (by increasing time); decoder: L_0; times: ``[K + 1]``;
    variances: ``[K]`` v_1 (the decoder's) .. v_K; nfe: network evaluations per sample.
    """

    elbo: torch.Tensor
    nll: torch.Tensor
    bits_per_dim: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor
    decoder: torch.Tensor
    times: torch.Tensor
    variances: torch.Tensor
    nfe: int
    stats: dict = field(default_factory=dict)


def chain_times(sde: ForwardSDE, steps: int | Sequence[float] | torch.Tensor,
                num_timesteps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(times ``[K + 1]`` from t_0 = 0, noise counters ``[K]``) of the bound's chain.

    ``steps`` = K: K steps of the N-step chain t_n = n T / N (N = the `DiscreteVPSDE`'s own number of steps, else
    ``num_timesteps``, default 1000), Bao et al.'s even trajectory n_k = round(1 + (k - 1)(N - 1)/(K - 1)),
    k = 1..K (n_1 = 1, n_K = N; K = N is the whole chain); counters are the n_k. A 1-D tensor of increasing times in
    (0, T] gives t_1..t_K directly (counters 1..K).
    """
    T = float(sde.T)
    if isinstance(steps, numbers.Real) and not torch.is_tensor(steps):  # a count K (20.0 is 20; 2.5, True refused)
        steps = check_count(steps, "steps", minimum=None)
    if isinstance(steps, int):
        N = getattr(sde, "num_timesteps", None) or (1000 if num_timesteps is None else int(num_timesteps))
        if num_timesteps is not None and hasattr(sde, "num_timesteps") and int(num_timesteps) != N:
            raise ValueError(f"num_timesteps={num_timesteps} contradicts the discrete schedule's {N} steps")
        K = int(steps)
        if not 1 <= K <= N:
            raise ValueError(f"steps must lie in [1, N = {N}], got {steps}")
        if K == 1:
            n = [N]
        else:
            n = [round(1 + k * (N - 1) / (K - 1)) for k in range(K)]
        counters = torch.tensor(n, dtype=torch.int64)
        times = torch.cat([torch.zeros(1, dtype=torch.float64), counters.to(torch.float64) * (T / N)])
        return times, counters
    ts = torch.as_tensor(steps, dtype=torch.float64).detach().cpu().flatten()
    if ts.numel() < 1 or not bool(torch.isfinite(ts).all()):
        raise ValueError("steps must be an int K or a non-empty 1-D tensor of finite times")
    if not bool((ts[1:] > ts[:-1]).all()) or float(ts[0]) <= 0 or float(ts[-1]) > T * (1 + 1e-12):
        raise ValueError(f"the bound's times must increase inside (0, T] = (0, {T}], got {ts[:6].tolist()}...")
    return torch.cat([torch.zeros(1, dtype=torch.float64), ts]), torch.arange(1, ts.numel() + 1)


def _check_chain(sde: ForwardSDE, times: torch.Tensor) -> None:
    a, s = sde.marginal(times)
    if float(s[0]) > 1e-12 or abs(float(a[0]) - 1) > 1e-12:
        raise ValueError(f"the variational bound needs a schedule with x_0 the data (alpha(0) = 1, sigma(0) = 0); "
                         f"{type(sde).__name__} has alpha(0) = {float(a[0]):.4g}, sigma(0) = {float(s[0]):.4g}")
    if not bool((a[1:] > 0).all()):
        raise ValueError("the variational bound needs alpha > 0 at every time of its chain (an eps-model carries no "
                         "information about x_0 where alpha = 0); end the chain below T")


@torch.no_grad()
def elbo_statistics(model: Callable, sde: ForwardSDE, x: torch.Tensor,
                    steps: int | Sequence[float] | torch.Tensor = 1000, *, num_timesteps: int | None = None,
                    seeds: Sequence[int] | torch.Tensor | None = None, batch_size: int = 4096) -> ElboStatistics:
    """Draw x_k ~ q(x_k | x_0) for every step of the chain (`chain_times`) and evaluate the network there.

    ``seeds``: one integer per sample (default ``0..B-1``); the draw of step n is a function of (seed, n) only.
    ``batch_size``: rows per network call (the rows of several steps share a call). Cost: K NFE per sample.
    """
    from .score import ScoreModel

    check_process(sde)
    check_batched(x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    batch_size = check_count(batch_size, "batch_size")
    times, counters = chain_times(sde, steps, num_timesteps)
    _check_chain(sde, times)
    B = x.shape[0]
    seeds_t = torch.arange(B) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64).flatten()
    if seeds_t.numel() != B:
        raise ValueError(f"seeds must hold one integer per sample ({B}), got {seeds_t.numel()}")
    net = ScoreModel.wrap(model, sde)
    K = counters.numel()
    a, s = sde.marginal(times[1:])
    err2 = torch.empty(B, K, dtype=torch.float64)
    x0_hat = torch.empty_like(x)
    per_call = max(1, int(batch_size) // max(B, 1))
    for k0 in range(0, K, per_call):
        ks = list(range(k0, min(K, k0 + per_call)))
        m = len(ks)
        c = counters[ks].repeat_interleave(B)  # [m B]: step-major rows
        sd = seeds_t.repeat(m)
        xr = x.repeat(m, *([1] * (x.ndim - 1)))
        z = seeded_normal(sd, c, 0, tuple(xr.shape), dtype=x.dtype, device=x.device)
        ar = a[ks].repeat_interleave(B).to(dtype=x.dtype, device=x.device)
        sr = s[ks].repeat_interleave(B).to(dtype=x.dtype, device=x.device)
        tr = times[1:][ks].repeat_interleave(B).to(dtype=x.dtype, device=x.device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        xt = ar.reshape(shape) * xr + sr.reshape(shape) * z
        eps = net.eps(xt, tr)
        e2 = (eps - z).flatten(1).to(torch.float64).square().sum(1).cpu().reshape(m, B)
        err2[:, ks] = e2.T
        if ks[0] == 0:
            x0_hat = ((xt[:B] - sr[:B].reshape(shape) * eps[:B]) / ar[:B].reshape(shape)).detach()
    bad = ~torch.isfinite(err2)
    rows = bad.any(1).nonzero().flatten()
    if rows.numel():  # the network returned NaN/Inf: the bound would be silently NaN
        first = bad[rows].to(torch.int64).argmax(1)
        raise NonFiniteError("elbo", rows.tolist(), times[1:][first].tolist(), None)
    return ElboStatistics(times, counters, x, err2, x0_hat, K)


def _log_bin_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, num_levels: int,
                  data_range: tuple[float, float]) -> torch.Tensor:
    """log P(bin of x) under N(mean, std^2), per element, float64 (edge bins to -inf / +inf)."""
    lo, hi = data_range
    half = (hi - lo) / (2 * (num_levels - 1))
    x, mean = x.to(torch.float64), mean.to(torch.float64)
    i = torch.round((x - lo) / (2 * half))
    if bool(((x - (lo + 2 * half * i)).abs() > 1e-3 * half).any()) or bool(((i < 0) | (i > num_levels - 1)).any()):
        raise ValueError(f"decoder='discretized' needs data on the grid lo + (hi - lo) i / (L - 1) of {num_levels} "
                         f"levels in {data_range}")
    upper = torch.where(i >= num_levels - 1, math.inf, (x + half - mean) / std)
    lower = torch.where(i <= 0, -math.inf, (x - half - mean) / std)
    flip = (upper + lower) > 0  # both in the upper tail: use P = Phi(-lower) - Phi(-upper), no cancellation
    b = torch.where(flip, -lower, upper)
    a_ = torch.where(flip, -upper, lower)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a_)
    return lb + torch.log1p(-torch.exp(la - lb))


def bound(stats: ElboStatistics, sde: ForwardSDE, variance: str | torch.Tensor = "analytic", *, eta: float = 1.0,
          moments: MomentEstimate | str | None = None, decoder: str = "gaussian", decoder_variance: Any = "ddpm",
          num_levels: int | None = None, bits: int | None = None,
          data_range: Sequence[float] | None = None) -> ElboResult:
    """The bound from `elbo_statistics` for one choice of variances (no network evaluation): see `elbo`."""
    if isinstance(moments, str):  # a saved estimate by name
        from .reverse_variance import load_moments

        moments = load_moments(moments)
    times, x0 = stats.times, stats.x0
    K, D, B = stats.nfe, math.prod(x0.shape[1:]), x0.shape[0]
    rng = None if data_range is None else tuple(float(v) for v in data_range)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    levels = _levels(num_levels, bits)
    if decoder == "discretized" and (levels is None or rng is None):
        raise ValueError("decoder='discretized' needs num_levels (or bits) and data_range")
    variances = reverse_variances(sde, times, variance, eta=eta, moments=moments, data_range=rng,
                                  decoder_variance=decoder_variance)
    if not bool((variances > 0).all()) or not bool(torch.isfinite(variances).all()):
        raise ValueError(f"every reverse variance must be finite and > 0, got {variances.tolist()[:8]}...")
    a, s = sde.marginal(times)
    # prior term: KL(N(alpha_K x0, sigma_K^2 I) || N(0, p^2 I))
    p2 = float(sde.prior_std) ** 2
    sq0 = x0.flatten(1).to(torch.float64).square().sum(1).cpu()
    prior = 0.5 * (a[-1] ** 2 * sq0 / p2 + D * (s[-1] ** 2 / p2 - 1 - torch.log(s[-1] ** 2 / p2)))
    # step terms k = 2..K
    if K >= 2:
        t, sp = times[2:], times[1:-1]
        lam2 = base_variance(sde, t, sp, eta)
        if not bool((lam2 > 0).all()):
            raise ValueError("the bound needs eta > 0 (lambda^2 > 0 at every step; DDIM's eta = 0 is deterministic)")
        c2 = x0_coefficient(sde, t, sp, eta) ** 2 * (s[2:] / a[2:]) ** 2  # weight of ||eps - eps_hat||^2
        v = variances[1:]
        terms = 0.5 * D * (torch.log(v / lam2) + lam2 / v - 1) + c2 * stats.err2[:, 1:] / (2 * v)
    else:
        terms = torch.zeros(B, 0, dtype=torch.float64)
    # decoder term
    v1 = variances[0]
    if decoder == "gaussian":
        dec = 0.5 * (s[1] / a[1]) ** 2 * stats.err2[:, 0] / v1 + 0.5 * D * (_LOG_2PI + torch.log(v1))
    else:
        assert levels is not None and rng is not None
        lp = _log_bin_prob(x0, stats.x0_hat, torch.sqrt(v1).to(x0.device), levels, rng)  # type: ignore[arg-type]
        dec = -lp.flatten(1).sum(1).cpu()
    nll = prior + terms.sum(1) + dec
    bpd = nll / (D * math.log(2))
    if decoder == "gaussian" and levels is not None:
        from .quantization.levels import levels_offset

        bpd = bpd + levels_offset(levels, rng if rng is not None else (-1.0, 1.0))
    return ElboResult(elbo=-nll, nll=nll, bits_per_dim=bpd, prior=prior, terms=terms, decoder=dec, times=times,
                      variances=variances, nfe=K,
                      stats={"variance": variance if isinstance(variance, str) else "given", "eta": eta,
                             "decoder": decoder, "decoder_variance": decoder_variance if isinstance(
                                 decoder_variance, str) else float(decoder_variance)})


def _levels(num_levels: int | None, bits: int | None) -> int | None:
    if num_levels is not None and bits is not None:
        raise ValueError("give num_levels or bits, not both")
    if bits is not None:
        if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 32:
            raise ValueError(f"bits must be an integer in [1, 32], got {bits!r}")
        return 2 ** int(bits)
    if num_levels is not None and (isinstance(num_levels, bool) or int(num_levels) != num_levels
                                   or num_levels < 2):
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    return None if num_levels is None else int(num_levels)


def reverse_variances(sde: ForwardSDE, times: torch.Tensor, variance: str | torch.Tensor = "analytic", *,
                      eta: float = 1.0, moments: MomentEstimate | None = None,
                      data_range: Sequence[float] | None = None, decoder_variance: Any = "ddpm") -> torch.Tensor:
    """The ``[K]`` reverse variances v_1..v_K of the chain ``times`` (t_0 = 0 first): v_1 the decoder's
    (``decoder_variance``), v_k for k >= 2 the step t_k -> t_{k-1}'s of kind ``variance`` (``"beta"``,
    ``"beta_tilde"``, ``"analytic"``), or ``variance`` itself (a ``[K]`` tensor, used as given)."""
    times = torch.as_tensor(times, dtype=torch.float64).cpu()
    K = times.numel() - 1
    if torch.is_tensor(variance) or not isinstance(variance, str):
        v = torch.as_tensor(variance, dtype=torch.float64).flatten().cpu()
        if v.numel() != K:
            raise ValueError(f"a given variance needs one value per step ({K}), got {v.numel()}")
        return v
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES} or a [K] tensor")
    steps = (reverse_variance(variance, sde, times[2:], times[1:-1], eta=eta, moments=moments, data_range=data_range)
             if K >= 2 else torch.zeros(0, dtype=torch.float64))
    t1 = times[1:2]
    if isinstance(decoder_variance, str):
        if decoder_variance == "ddpm":
            v1 = posterior_variance(sde, torch.clamp(2 * t1, max=float(sde.T)), t1)
        elif decoder_variance == "analytic":
            if moments is None:
                raise ValueError("decoder_variance='analytic' needs moments= (a MomentEstimate covering t_1)")
            v1 = analytic_variance(sde, t1, torch.zeros(1, dtype=torch.float64), moments.at(t1), 1.0, data_range)
        else:
            raise ValueError(f"decoder_variance must be 'ddpm', 'analytic' or a number, got {decoder_variance!r}")
    else:
        v1 = torch.tensor([float(decoder_variance)], dtype=torch.float64)
    return torch.cat([v1, steps])


def elbo(model: Callable, sde: ForwardSDE, x: torch.Tensor, steps: int | Sequence[float] | torch.Tensor = 1000,
         variance: str | torch.Tensor = "analytic", *, eta: float = 1.0, moments: MomentEstimate | str | None = None,
         decoder: str = "gaussian", decoder_variance: Any = "ddpm", num_levels: int | None = None,
         bits: int | None = None, data_range: Sequence[float] | None = None, num_timesteps: int | None = None,
         seeds: Sequence[int] | torch.Tensor | None = None, batch_size: int = 4096) -> ElboResult:
    """The discrete-time variational bound on log p(x) of each sample, in nats and bits/dim, with its parts.

    Args:
        model: a [`ScoreModel`][scoresolve.ScoreModel] (any prediction) or a plain ``score(x, t)``.
        sde: the schedule: `DiscreteVPSDE`, or a continuous VP / sub-VP / cosine one discretised to
            ``num_timesteps`` steps (default 1000).
        x: ``[B, ...]`` data x_0.
        steps: K (Bao et al.'s even subsequence of the N-step chain, `chain_times`) or the increasing times
            t_1..t_K.
        variance: ``"beta"``, ``"beta_tilde"``, ``"analytic"`` (needs ``moments``: a `MomentEstimate` from
            `estimate_moments` at the chain's times, or the name of a saved one) or a ``[K]`` tensor v_1..v_K (v_1
            the decoder's).
        eta: the DDIM(eta) inference process (1: DDPM); must be > 0.
        decoder: ``"gaussian"`` (continuous data) or ``"discretized"`` (L-level data on the grid of ``data_range``,
            ``num_levels`` = L or ``bits`` = log2 L); decoder_variance: ``"ddpm"``, ``"analytic"`` or a number.
        data_range: [a, b] of the data: the analytic variance's tighter bound and the discretized decoder's grid
            (None: no bound).
        seeds: one integer per sample for the x_k draws (default 0..B-1): batch-independent bounds.
    Returns an `ElboResult` (K network evaluations per sample).
    """
    stats = elbo_statistics(model, sde, x, steps, num_timesteps=num_timesteps, seeds=seeds, batch_size=batch_size)
    return bound(stats, sde, variance, eta=eta, moments=moments, decoder=decoder, decoder_variance=decoder_variance,
                 num_levels=num_levels, bits=bits, data_range=data_range)


def elbo_fn(model: Callable, sde: ForwardSDE, steps: int | Sequence[float] | torch.Tensor = 1000,
            variance: str | torch.Tensor = "analytic", **elbo_kwargs: Any) -> Callable:
    """A per-batch function ``fn(x, generator)`` for [`evaluate_dataset`][scoresolve.evaluate_dataset]: the bound
    as ``log_prob`` (so the dataset's bits/dim is the bound's, with the dequantization offset of L-level data), with
    ``nfe``, ``prior``, ``steps_kl`` (the summed step terms) and ``decoder`` per sample. The x_k draws are seeded
    per sample from the batch's generator. ``elbo_kwargs`` go to `elbo` (not ``seeds``)."""
    if "seeds" in elbo_kwargs:
        raise ValueError("the seeds come from the batch's generator; do not pass them")

    def fn(x: torch.Tensor, generator: torch.Generator) -> dict:
        seeds = torch.randint(0, 2**62, (x.shape[0],), generator=generator, device=generator.device).cpu()
        r = elbo(model, sde, x, steps, variance, seeds=seeds, **elbo_kwargs)
        return {"log_prob": r.elbo, "nfe": torch.full((x.shape[0],), float(r.nfe), dtype=torch.float64),
                "prior": r.prior, "steps_kl": r.terms.sum(1), "decoder": r.decoder}

    return fn


def optimal_steps(sde: ForwardSDE, moments: MomentEstimate, steps: int, *, num_timesteps: int | None = None,
                  eta: float = 1.0, data_range: Sequence[float] | None = None) -> torch.Tensor:
    """The K-step subsequence of the N-step chain that maximises the expected bound with the analytic variance
    (Bao et al. 2022, Section 4: dynamic programming), as times t_1..t_K (n_1 = 1, n_K = N; use as ``steps=``).

    With the optimal variance a step's expected term is d/2 log(v*/lambda^2), so the DP minimises the sum of
    log(v*(t_r -> t_s) / lambda^2(t_r -> t_s)) over the chain's steps s < r, with v* from ``moments`` (which must
    cover all N times) and the ``data_range`` bound; O(K N^2) work on the host, no network evaluation.

    A Monte Carlo Gamma above 1 (impossible for the exact eps: noise, near T) makes a step from there look free
    (v* clipped to lambda^2), and the DP would jump from T in one step. As Bao et al. do, the chain's tail from twice
    that far below N is then left out of the DP and covered by evenly spaced steps (a share of K that grows with the
    tail's length: K_2 = K - ceil((1 - 0.8 tail/N) K), at least 1).
    """
    times, _ = chain_times(sde, int(getattr(sde, "num_timesteps", 0) or num_timesteps or 1000), num_timesteps)
    N, K = times.numel() - 1, int(steps)
    if not 2 <= K <= N:
        raise ValueError(f"steps must lie in [2, N = {N}], got {steps}")
    if K == N:
        return times[1:].clone()
    ts = times[1:]  # t_1 .. t_N
    above = (moments.at(ts) > 1).nonzero().flatten()
    tail = 0 if above.numel() == 0 else 2 * (N - int(above[0]))  # positions from N - tail on are left to even steps
    N1, K2 = N - tail, 0
    if tail > 0:
        K1 = min(math.ceil((1 - 0.8 * tail / N) * K), N1)
        K2 = min(max(K - K1, 1), tail)
        if N1 < 2 or K - K2 < 2:
            return chain_times(sde, K, N)[0][1:]  # too little reliable chain for a DP: the even trajectory
    head = _dp_path(sde, moments, ts[:N1], K - K2, eta, data_range)
    if K2 == 0:
        return head
    frac = (N - N1) / K2
    rest = torch.tensor([round(N - frac * k) for k in range(K2)][::-1], dtype=torch.int64) - 1
    return torch.cat([head, ts[rest]])


def _dp_path(sde: ForwardSDE, moments: MomentEstimate, ts: torch.Tensor, K: int, eta: float,
             data_range: Sequence[float] | None) -> torch.Tensor:
    """The K of the times ``ts`` (first and last included) with the least summed log(v*/lambda^2)."""
    N = ts.numel()
    s, r = torch.triu_indices(N, N, offset=1)  # steps t_r -> t_s, s < r (0-based positions)
    t_r, t_s = ts[r], ts[s]
    v = analytic_variance(sde, t_r, t_s, moments.at(t_r), eta, data_range)
    lam2 = base_variance(sde, t_r, t_s, eta)
    cost = torch.full((N, N), math.inf, dtype=torch.float64)
    cost[s, r] = torch.log(v / lam2)
    best = torch.full((N,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # the path starts at ts[0]
    back = []
    for _ in range(K - 1):
        total = best[:, None] + cost  # [from s, to r]
        best, arg = total.min(0)
        back.append(arg)
    path = [N - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    if path[0] != 0 or not math.isfinite(float(best[N - 1])):
        raise RuntimeError("no finite path through the chain (non-finite moments?)")
    return ts[torch.tensor(path)]
