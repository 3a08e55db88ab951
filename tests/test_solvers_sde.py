"""SDE samplers: exact moments of Gaussian mixtures, exact NFE, reproducible and batch-independent noise,
Brownian-bridge rejections, and the adaptive solver's NFE advantage over Euler-Maruyama."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _counts import uniform

import scoresolve as ss
from scoresolve.solvers import REGISTRY, MaxStepsError, NonFiniteError
from scoresolve.solvers.noise import BrownianMemory as _BrownianMemory
from scoresolve.solvers.noise import Noise, seeded_normal
from scoresolve.solvers.stochastic import (
    adaptive_sde,
    euler_maruyama,
    pc,
    reverse_diffusion,
)
from scoresolve.solvers.time_grids import time_grid

T_EPS = 1e-3


def span(sde):
    """The [t0, t1] span of an adaptive solve from T to T_EPS."""
    return torch.tensor([sde.T, T_EPS], dtype=torch.float64)
N = 8000  # Monte-Carlo batch of the moment tests (2-D)
GM = ss.GaussianMixture.random(2, 3, seed=1)  # component stds in [0.05, 0.5], correlated, well separated
SDES = {"vp": ss.VPSDE(), "ve": ss.VESDE(), "subvp": ss.SubVPSDE()}


class CountingScore:
    """The exact mixture score with an independent counter of calls and of per-sample evaluations."""

    def __init__(self, gm: ss.GaussianMixture, sde: ss.ForwardSDE) -> None:
        self.gm, self.sde, self.calls, self.times = gm, sde, 0, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.times.append(t.detach().clone())
        return self.gm.score(x, t, self.sde)


@functools.cache
def prior(name: str, n: int = N, seed: int = 0) -> torch.Tensor:
    """Exact samples of p_T (not the Gaussian approximation of the prior)."""
    sde = SDES[name]
    return GM.sample_marginal(n, sde.T, sde, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moment_z(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Largest |z|-scores of the sample mean and covariance entries against exact values (empirical SEs)."""
    x = x.double()
    n = x.shape[0]
    mu = x.mean(0)
    d = x - mu
    C = d.T @ d / (n - 1)
    zm = (mu - mean) / (torch.diag(C) / n).sqrt()
    prods = d[:, :, None] * d[:, None, :]
    zc = (C - cov) / (prods.std(0) / math.sqrt(n))
    return zm.abs().max().item(), zc.abs().max().item()


def assert_moments(x: torch.Tensor, sde: ss.ForwardSDE, z_max: float = 4.5, gm: ss.GaussianMixture = GM) -> None:
    zm, zc = moment_z(x, gm.mean(T_EPS, sde), gm.cov(T_EPS, sde))
    assert zm < z_max and zc < z_max, f"moment z-scores: mean {zm:.2f}, cov {zc:.2f} (limit {z_max})"


# ----------------------------------------------------------------------------------------------------------------
# moments of the mixture at t_eps
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_euler_maruyama_moments(name, scale):
    sde = SDES[name]
    sol = euler_maruyama(sde.reverse(GM.score_fn(sde), scale), prior(name), time_grid(sde, 200, "uniform", T_EPS),
                         generator=gen(1))
    assert uniform(sol.nfe) == 200 and sol.steps == 200
    assert_moments(sol.x, sde)


def test_callable_member_and_the_moment_check_has_teeth():
    sde = SDES["vp"]
    proc = sde.reverse(GM.score_fn(sde), lambda t: 0.8 * sde.diffusion(t))  # s(t) = 0.8 g(t) as a callable
    sol = euler_maruyama(proc, prior("vp"), time_grid(sde, 200, "uniform", T_EPS), generator=gen(1))
    assert_moments(sol.x, sde)
    # 2% too much spread is far outside the check's tolerance
    zm, zc = moment_z(GM.mean(T_EPS, sde) + 1.02 * (sol.x - GM.mean(T_EPS, sde)), GM.mean(T_EPS, sde),
                      GM.cov(T_EPS, sde))
    assert zc > 6


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_reverse_diffusion_moments(name):
    sde = SDES[name]
    sol = reverse_diffusion(sde.reverse(GM.score_fn(sde), 1.0), prior(name), time_grid(sde, 200, "uniform", T_EPS),
                            generator=gen(2))
    assert uniform(sol.nfe) == 200
    assert_moments(sol.x, sde)


def test_reverse_diffusion_is_exact_for_unit_variance_data_under_vp():
    # data N(mu, I): every p_t is N(alpha mu, I), the Tweedie mean is exact and so is the "forward" variance
    # sigma_{t|s}^2 = beta, so 3 huge steps are exact in distribution; the "posterior" variance is not.
    sde, n = SDES["vp"], 20000
    gm = ss.GaussianMixture([1.0], [[1.5, -0.5]])
    x = gm.sample_marginal(n, 1.0, sde, generator=gen(0), dtype=torch.float64)
    ts = torch.tensor([1.0, 0.5, 0.1, T_EPS], dtype=torch.float64)
    sol = reverse_diffusion(sde.reverse(gm.score_fn(sde), 1.0), x, ts, generator=gen(1))
    assert_moments(sol.x, sde, z_max=4.0, gm=gm)
    post = reverse_diffusion(sde.reverse(gm.score_fn(sde), 1.0), x, ts, generator=gen(1), variance="posterior")
    zm, zc = moment_z(post.x, gm.mean(T_EPS, sde), gm.cov(T_EPS, sde))
    assert zm < 4.0 and zc > 20  # the mean stays exact, the variance does not


def test_reverse_diffusion_reduces_to_ddpm_ancestral():
    sde = ss.DiscreteVPSDE.linear(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    i = 500  # DDPM step i (0-based) goes from knot t = (i + 1)/N to t = i/N
    x = torch.randn(16, 3, generator=gen(0), dtype=torch.float64)
    score = lambda x, t: -x * 0.7 + 0.1  # noqa: E731
    ts = torch.tensor([(i + 1) / 1000, i / 1000], dtype=torch.float64)
    sol = reverse_diffusion(sde.reverse(score, 1.0), x, ts, generator=gen(3))
    z = torch.randn(x.shape, generator=gen(3), dtype=torch.float64)
    b = betas[i]
    ddpm = (x + b * score(x, None)) / torch.sqrt(1 - b) + torch.sqrt(b) * z  # Ho et al. 2020 with sigma^2 = beta
    torch.testing.assert_close(sol.x, ddpm, rtol=1e-10, atol=1e-12)
    post = reverse_diffusion(sde.reverse(score, 1.0), x, ts, generator=gen(3), variance="posterior")
    ac = torch.cumprod(1 - betas, 0)
    beta_tilde = (1 - ac[i - 1]) / (1 - ac[i]) * b  # DDPM's posterior variance
    torch.testing.assert_close(post.x, ddpm + (beta_tilde.sqrt() - b.sqrt()) * z, rtol=1e-10, atol=1e-12)


def test_reverse_diffusion_reduces_to_smld():
    sde = SDES["ve"]
    x = torch.randn(16, 2, generator=gen(0), dtype=torch.float64) * 5
    score = lambda x, t: -x / 25.0  # noqa: E731
    ts = torch.tensor([0.6, 0.55], dtype=torch.float64)
    sol = reverse_diffusion(sde.reverse(score, 1.0), x, ts, generator=gen(4))
    s_t, s_s = (0.01 * 5000**0.6), (0.01 * 5000**0.55)
    z = torch.randn(x.shape, generator=gen(4), dtype=torch.float64)
    d = s_t**2 - s_s**2
    torch.testing.assert_close(sol.x, x + d * score(x, None) + math.sqrt(d) * z, rtol=1e-10, atol=1e-12)


def test_noise_drawn_at_a_std_is_the_scaled_standard_draw():
    # the std= draw (one kernel: torch.normal) takes the generator's numbers of randn and leaves it in the same state
    for shape in ((5, 2), (64, 3)):
        x = torch.zeros(shape, dtype=torch.float64)
        a, b = Noise(x, gen(3), None), Noise(x, gen(3), None)
        torch.testing.assert_close(a(shape, std=0.3), 0.3 * b(shape), rtol=1e-15, atol=0)
        assert torch.equal(a(shape), b(shape))
        s1, s2 = Noise(x, None, list(range(shape[0]))), Noise(x, None, list(range(shape[0])))
        torch.testing.assert_close(s1(shape, 4, 1, std=0.3), 0.3 * s2(shape, 4, 1), rtol=1e-15, atol=0)


@pytest.mark.filterwarnings("ignore:pc with norms='sample'")
@pytest.mark.parametrize("prediction", ["score", "x0"])
@pytest.mark.parametrize("norms", ["sample", "batch"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_pc_one_step_closed_form(name, norms, prediction):
    # one reverse-diffusion step t -> s then two Langevin steps at s, written out by hand (pc_step's docstring) for
    # the exact score of N(0, v I) data; with a score model one sample's score is exactly 0 (the corrector skips it)
    sde, v, snr = SDES[name], 0.3, 0.2
    t, s = 0.6, 0.55
    x = torch.randn(5, 3, 2, generator=gen(0), dtype=torch.float64) * 2
    mask = torch.ones(5, 1, 1, dtype=torch.float64)
    if prediction == "score":
        mask[2] = 0.0

    def score(xx, tt):
        a, sg = sde.marginal(torch.as_tensor(tt, dtype=torch.float64).reshape(-1)[:1])
        return -xx / (a**2 * v + sg**2) * mask

    def x0(xx, tt):  # the same model as a data prediction
        a, sg = sde.marginal(tt)
        return (xx + sg[:, None, None] ** 2 * score(xx, tt[:1])) / a[:, None, None]

    model = ss.ScoreModel(score if prediction == "score" else x0, sde, prediction=prediction)
    sol = pc(sde.reverse(model, 1.0), x, torch.tensor([t, s], dtype=torch.float64), generator=gen(4), snr=snr,
             corrector_steps=2, norms=norms)
    assert uniform(sol.nfe) == 3
    g = gen(4)
    (a_t,), (s_t,) = sde.marginal(torch.tensor([t], dtype=torch.float64))
    (a_s,), (s_s,) = sde.marginal(torch.tensor([s], dtype=torch.float64))
    ar = a_t / a_s
    d = s_t**2 - ar**2 * s_s**2
    y = (x + d * score(x, t)) / ar + d.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    c = 2 * ar**2 * snr**2
    for _ in range(2):
        sc, z = score(y, s), torch.randn(x.shape, generator=g, dtype=torch.float64)
        n2 = sc.square().sum((1, 2))
        if norms == "sample":
            eps = torch.where(n2 > 0, c * 6 / n2, 0.0)
        else:
            eps = (c * z.square().sum((1, 2)).sqrt().mean() ** 2 / n2.sqrt().mean() ** 2).expand(5)
        y = y + eps[:, None, None] * sc + (2 * eps[:, None, None]).sqrt() * z
    torch.testing.assert_close(sol.x, y, rtol=1e-11, atol=1e-12)
    if prediction == "score" and norms == "sample":  # the zero-score sample got the predictor's move only
        z0 = torch.randn(x.shape, generator=gen(4), dtype=torch.float64)
        torch.testing.assert_close(sol.x[2], (x[2] / ar + d.sqrt() * z0[2]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
def test_pc_moments_batch_norms(name):
    # score_sde's batch-mean norms (the right rule in 2-D); score_sde itself fails on sub-VP
    sde = SDES[name]
    sol = pc(sde.reverse(GM.score_fn(sde), 1.0), prior(name), time_grid(sde, 100, "uniform", T_EPS),
             generator=gen(3), norms="batch")
    assert uniform(sol.nfe) == 200
    assert_moments(sol.x, sde)


class IsoMixture:
    """Exact score of sum_k w_k N(mu_k, v I) (matmuls only: cheap in high dimension)."""

    def __init__(self, w, mu, v, sde):
        self.logw, self.mu, self.v, self.sde = torch.log(torch.as_tensor(w, dtype=torch.float64)), mu, v, sde

    def __call__(self, x, t):
        a, s = self.sde.marginal(t)
        a, c = a[:, None], (a**2 * self.v + s**2)[:, None]
        am = a * (x @ self.mu.T) - 0.5 * a**2 * (self.mu**2).sum(1)[None]  # <x, a mu_k> - |a mu_k|^2/2
        r = torch.softmax(self.logw[None] + am / c, dim=1)
        return (a * (r @ self.mu) - x) / c


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_pc_moments_per_sample_norms_high_dim(name):
    # the default per-sample rule is meant for high-dimensional data (its bias is ~2/D, see pc's docstring)
    sde, D, n = SDES[name], 128, 2000
    mu = torch.randn(2, D, generator=gen(4), dtype=torch.float64) * 0.5
    gm = ss.GaussianMixture([0.4, 0.6], mu, [0.09, 0.09])
    x = gm.sample_marginal(n, sde.T, sde, generator=gen(0), dtype=torch.float64)
    sol = pc(sde.reverse(IsoMixture([0.4, 0.6], mu, 0.09, sde), 1.0), x, time_grid(sde, 100, "uniform", T_EPS),
             generator=gen(1))
    assert sol.stats["norms"] == "sample" and uniform(sol.nfe) == 200
    m, C = gm.mean(T_EPS, sde), gm.cov(T_EPS, sde)
    d = sol.x - sol.x.mean(0)
    var = d.square().sum(0) / (n - 1)
    zm = (sol.x.mean(0) - m) / (var / n).sqrt()
    zv = (var - torch.diag(C)) / (d.square().std(0) / math.sqrt(n))
    u = (mu[1] - mu[0]) / (mu[1] - mu[0]).norm()  # the axis joining the components (their weights)
    pu = d @ u
    zu = (pu.square().mean() - u @ C @ u) / (pu.square().std() / math.sqrt(n))
    assert zm.abs().max() < 4.5 and zv.abs().max() < 4.5 and zu.abs() < 4.0, (zm.abs().max(), zv.abs().max(), zu)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_adaptive_sde_moments(name):
    sde = SDES[name]
    score = CountingScore(GM, sde)
    x = prior(name)[:5000]
    sol = adaptive_sde(sde.reverse(score, 1.0), x, span(sde), generator=gen(5))
    assert_moments(sol.x, sde)
    assert torch.equal(sol.t, torch.full((len(x),), T_EPS, dtype=torch.float64))
    # rejections do happen (so the bridge is exercised) and are counted per sample
    assert sol.rejected.double().mean() > 5 and sol.steps.min() > 20
    assert torch.equal(sol.nfe, 2 * (sol.steps + sol.rejected))
    assert score.calls == sol.stats["network_calls"] == 2 * sol.stats["iterations"]


# ----------------------------------------------------------------------------------------------------------------
# NFE
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corrector_steps", [0, 1, 3])
def test_pc_nfe_exact(corrector_steps):
    sde = SDES["vp"]
    score = CountingScore(GM, sde)
    sol = pc(sde.reverse(score, 1.0), prior("vp")[:50], time_grid(sde, 7, "uniform", T_EPS), generator=gen(0),
             corrector_steps=corrector_steps)
    assert uniform(sol.nfe) == score.calls == 7 * (1 + corrector_steps)


def test_grid_solvers_nfe_exact():
    sde = SDES["vp"]
    for fn in (euler_maruyama, reverse_diffusion):
        score = CountingScore(GM, sde)
        sol = fn(sde.reverse(score, 1.0), prior("vp")[:50], time_grid(sde, 9, "uniform", T_EPS), generator=gen(0))
        assert uniform(sol.nfe) == score.calls == 9


def test_adaptive_nfe_exact_per_sample():
    sde = SDES["ve"]
    score = CountingScore(GM, sde)
    x = prior("ve")[:64]
    sol = adaptive_sde(sde.reverse(score, 1.0), x, span(sde), generator=gen(6))
    # calls alternate: EM stage at each sample's own t, then the improved-Euler stage; a sample is attempting a
    # step exactly when its first-stage time is still above t_eps (finished samples sit at t_eps)
    first = torch.stack(score.times[0::2])
    attempts = (first > T_EPS * (1 + 1e-9)).sum(0)
    assert torch.equal(sol.nfe, 2 * attempts)
    assert score.calls == 2 * first.shape[0] == sol.stats["network_calls"]
    assert len(set(sol.nfe.tolist())) > 5  # really per sample
    assert int(sol.nfe.max()) <= score.calls


# ----------------------------------------------------------------------------------------------------------------
# adaptive_sde: quality per NFE against Euler-Maruyama
# ----------------------------------------------------------------------------------------------------------------
SHARP = ss.GaussianMixture.random(2, 4, seed=3, scale_range=(0.01, 0.1))  # fine structure near t_eps


@functools.cache
def _sharp_reference() -> float:
    ref = SHARP.sample_marginal(100_000, T_EPS, SDES["vp"], generator=gen(5), dtype=torch.float64)
    return SHARP.log_prob(ref, T_EPS, SDES["vp"]).mean().item()


def _quality(x: torch.Tensor) -> tuple[float, float]:
    """(E_q[log p] - E_p[log p], its standard error): 0 for exact samples, < 0 too dispersed, > 0 too peaked."""
    lp = SHARP.log_prob(x, T_EPS, SDES["vp"])
    return lp.mean().item() - _sharp_reference(), lp.std().item() / math.sqrt(len(lp))


def test_adaptive_beats_euler_maruyama_with_half_the_nfe():
    # VP, uniform-in-t EM (the paper's baseline) against adaptive_sde at rtol=0.02: EM given twice adaptive's mean
    # NFE is still clearly worse (measured with n=5000: adaptive 349 NFE, dlogp +0.054; EM needs ~2740 NFE for that,
    # a ratio of 7.9: see test_adaptive_nfe_ratio_ladder).
    sde, n = SDES["vp"], 3000
    x = SHARP.sample_marginal(n, sde.T, sde, generator=gen(0), dtype=torch.float64)
    proc = sde.reverse(SHARP.score_fn(sde), 1.0)
    ad = adaptive_sde(proc, x, span(sde), rtol=0.02, generator=gen(1))
    nfe_ad = ad.nfe.double().mean().item()
    steps_em = 2 * math.ceil(nfe_ad)
    em = euler_maruyama(proc, x, time_grid(sde, steps_em, "uniform", T_EPS), generator=gen(1))
    (q_ad, se_ad), (q_em, se_em) = _quality(ad.x), _quality(em.x)
    margin = abs(q_em) - abs(q_ad)
    assert margin > 4 * math.hypot(se_ad, se_em), (nfe_ad, q_ad, se_ad, steps_em, q_em, se_em)


@pytest.mark.slow
def test_adaptive_nfe_ratio_ladder():
    """Report the NFE ratio at equal quality (run with -s to see it); the fast test above covers the claim."""
    sde, n = SDES["vp"], 5000
    x = SHARP.sample_marginal(n, sde.T, sde, generator=gen(0), dtype=torch.float64)
    proc = sde.reverse(SHARP.score_fn(sde), 1.0)
    ladder = [200, 400, 800, 1600, 3200]
    em = {N: abs(_quality(euler_maruyama(proc, x, time_grid(sde, N, "uniform", T_EPS), generator=gen(1)).x)[0])
          for N in ladder}
    ad = adaptive_sde(proc, x, span(sde), rtol=0.02, generator=gen(1))
    nfe_ad, q_ad = ad.nfe.double().mean().item(), abs(_quality(ad.x)[0])
    eq = None  # EM NFE at adaptive's |dlogp|, log-log interpolation
    for (n0, e0), (n1, e1) in zip(list(em.items()), list(em.items())[1:]):
        if e0 >= q_ad >= e1:
            eq = n0 * (n1 / n0) ** (math.log(e0 / q_ad) / math.log(e0 / e1))
    eq = eq if eq is not None else (math.inf if q_ad < min(em.values()) else 0.0)
    print(f"\nEM |dlogp| by NFE: {em}; adaptive: NFE {nfe_ad:.0f}, |dlogp| {q_ad:.4f}; "
          f"EM NFE at equal quality {eq:.0f}; ratio {eq / nfe_ad:.2f}")
    assert eq / nfe_ad > 2


# ----------------------------------------------------------------------------------------------------------------
# Brownian bridge on rejection
# ----------------------------------------------------------------------------------------------------------------
def test_bridge_memory_answers_consistently():
    x = torch.zeros(1, 3, dtype=torch.float64)
    mem = _BrownianMemory(x, 8, torch.float64)
    on, off = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)

    def inc(h, seed):
        return mem.increment(torch.tensor([h], dtype=torch.float64), on, torch.randn(1, 3, generator=gen(seed),
                             dtype=torch.float64), torch.randn(1, 3, generator=gen(seed + 100), dtype=torch.float64))

    def h(v):
        return torch.tensor([v], dtype=torch.float64)

    w3 = inc(0.3, 1)
    mem.advance(h(0.3), off, off)  # rejected
    torch.testing.assert_close(inc(0.3, 2), w3, rtol=0, atol=0)  # the same point is not redrawn
    mem.advance(h(0.3), off, off)
    w1 = inc(0.1, 3)  # bridged inside [0, 0.3]
    mem.advance(h(0.1), on, off)  # accepted: now at 0.1
    torch.testing.assert_close(inc(0.2, 4), w3 - w1, rtol=1e-15, atol=1e-15)  # the rest of the drawn increment


def _adversarial_run(memory: bool, B: int = 10000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Steps over [0, 1] rejected whenever |dW| > 1.5 sqrt(h) (a decision that looks at the noise, like the
    solver's error estimate), new step sizes random. Returns the summed accepted increments (W(1) ~ N(0, 1) if the
    increments come from one Brownian path) and the mean number of rejections per sample."""
    g = gen(seed)
    x = torch.zeros(B, 1, dtype=torch.float64)
    mem = _BrownianMemory(x, 32, torch.float64)
    t, h = torch.zeros(B, dtype=torch.float64), torch.full((B,), 0.3, dtype=torch.float64)
    W, done, rejections = torch.zeros(B, 1, dtype=torch.float64), torch.zeros(B, dtype=torch.bool), 0
    for _ in range(3000):
        active = ~done
        last = h >= 1 - t
        hs = torch.where(active, torch.where(last, 1 - t, h), 0.0)
        f, b = torch.randn(B, 1, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)
        dW = mem.increment(hs, active, f, b) if memory else hs.sqrt()[:, None] * f
        rej = active & (dW[:, 0].abs() > 1.5 * hs.sqrt()) & (hs > 1e-3)
        acc = active & ~rej
        rejections += int(rej.sum())
        W = torch.where(acc[:, None], W + dW, W)
        t = torch.where(acc, torch.where(last, 1.0, t + hs), t)
        done = done | (acc & last)
        if memory:
            mem.advance(hs, acc, done)
        u = torch.rand(B, generator=g, dtype=torch.float64)
        h = torch.where(rej, hs * (0.2 + 0.6 * u), torch.where(acc, 0.05 + 0.4 * u, h))
        if bool(done.all()):
            break
    assert bool(done.all())
    return W[:, 0], rejections / B


def test_bridge_keeps_the_brownian_path_unbiased_under_noise_dependent_rejections():
    W, rej = _adversarial_run(memory=True)
    se = math.sqrt(2 / len(W))
    assert rej > 2
    assert abs(W.var().item() - 1) < 4 * se, W.var()
    assert abs(W.mean().item()) < 4 / math.sqrt(len(W))
    assert abs((W**4).mean().item() / W.var().item() ** 2 - 3) < 0.25  # Gaussian kurtosis
    # redrawing the noise after a rejection keeps only the small draws: grossly biased
    W_redraw, _ = _adversarial_run(memory=False)
    assert W_redraw.var().item() < 0.7


def test_adaptive_tight_tolerance_many_rejections_moments():
    # rtol 0.01 on a sharper mixture: ~40% of the attempts are rejected and bridged, marginals still right
    sde = SDES["vp"]
    gm = ss.GaussianMixture.random(2, 2, seed=7, scale_range=(0.1, 0.3))
    x = gm.sample_marginal(4000, sde.T, sde, generator=gen(0), dtype=torch.float64)
    sol = adaptive_sde(sde.reverse(gm.score_fn(sde), 1.0), x, span(sde), rtol=0.01, generator=gen(1))
    assert (sol.rejected.double() / (sol.nfe.double() / 2)).mean() > 0.15
    assert_moments(sol.x, sde, gm=gm)


# ----------------------------------------------------------------------------------------------------------------
# reproducibility and per-sample seeds
# ----------------------------------------------------------------------------------------------------------------
def test_same_generator_same_result():
    sde = SDES["vp"]
    x = prior("vp")[:200]
    proc = sde.reverse(GM.score_fn(sde), 1.0)
    ts = time_grid(sde, 20, "uniform", T_EPS)
    for run in (lambda g: euler_maruyama(proc, x, ts, generator=g), lambda g: pc(proc, x, ts, generator=g),
                lambda g: adaptive_sde(proc, x, span(sde), generator=g)):
        a, b, c = run(gen(11)), run(gen(11)), run(gen(12))
        assert torch.equal(a.x, b.x) and torch.equal(torch.as_tensor(a.nfe), torch.as_tensor(b.nfe))
        assert (a.x - c.x).abs().max() > 1e-3


def test_seeded_noise_is_batch_independent():
    sde = SDES["vp"]
    x = prior("vp")[:6]
    proc = sde.reverse(GM.score_fn(sde), 1.0)
    ts = time_grid(sde, 30, "uniform", T_EPS)
    seeds, rows = [101, 102, 103, 104, 105, 2**40 + 7], [1, 3, 5]
    for run in (lambda xx, s: euler_maruyama(proc, xx, ts, seeds=s), lambda xx, s: pc(proc, xx, ts, seeds=s),
                lambda xx, s: reverse_diffusion(proc, xx, ts, seeds=s),
                lambda xx, s: adaptive_sde(proc, xx, span(sde), seeds=s)):
        full = run(x, seeds)
        sub = run(x[rows], [seeds[i] for i in rows])
        torch.testing.assert_close(sub.x, full.x[rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(sub.nfe, full.nfe[rows])  # per-sample counts for every solver
        if torch.is_tensor(full.rejected):  # adaptive: the same steps too
            assert torch.equal(sub.rejected, full.rejected[rows])
    other = euler_maruyama(proc, x[rows], ts, seeds=[7, 8, 9])
    assert (other.x - sub.x).abs().max() > 1e-3


def test_seeded_normal_statistics():
    z = seeded_normal(torch.arange(20000), 0, 0, (20000, 50), torch.float64)
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 4 * math.sqrt(96 / n)
    assert abs((z**3).mean().item()) < 4 * math.sqrt(15 / n)
    lim = 4 / math.sqrt(n)
    for other in (seeded_normal(torch.arange(20000), 1, 0, (20000, 50), torch.float64),  # next counter
                  seeded_normal(torch.arange(20000), 0, 1, (20000, 50), torch.float64)):  # other stream
        assert abs((z * other).mean().item()) < lim
    assert abs((z[:, 1:] * z[:, :-1]).mean().item()) < lim and abs((z[1:] * z[:-1]).mean().item()) < lim
    # a row depends only on (seed, counter, stream)
    a = seeded_normal(torch.tensor([5, 7, 9]), torch.tensor([3, 4, 5]), 2, (3, 4), torch.float64)
    b = seeded_normal(torch.tensor([7]), torch.tensor([4]), 2, (1, 4), torch.float64)
    assert torch.equal(a[1], b[0])


def test_seeded_sampler_moments():
    sde = SDES["vp"]
    sol = euler_maruyama(sde.reverse(GM.score_fn(sde), 1.0), prior("vp"), time_grid(sde, 100, "uniform", T_EPS),
                         seeds=list(range(N)))
    assert_moments(sol.x, sde)


# ----------------------------------------------------------------------------------------------------------------
# errors, trajectories, the sample() entry point
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_adaptive_max_steps_error():
    sde = SDES["vp"]
    with pytest.raises(MaxStepsError, match="max_steps=5"):
        adaptive_sde(sde.reverse(GM.score_fn(sde), 1.0), prior("vp")[:10], span(sde), generator=gen(0),
                     max_steps=5)


@pytest.mark.timeout(60)
def test_adaptive_non_finite_score_is_reported():
    sde = SDES["vp"]

    def score(x, t):
        s = GM.score(x, t, sde)
        return torch.where((t < 0.5)[:, None] & (torch.arange(len(x)) == 2)[:, None], math.nan, s)

    with pytest.raises(NonFiniteError) as info:
        adaptive_sde(sde.reverse(score, 1.0), prior("vp")[:5], span(sde), generator=gen(0))
    assert info.value.indices == [2] and 0.45 < info.value.times[0] < 0.55


def test_grid_non_finite_score_is_reported():
    sde = SDES["vp"]
    score = lambda x, t: torch.where(t[:, None] < 0.3, math.nan, GM.score(x, t, sde))  # noqa: E731
    with pytest.raises(NonFiniteError):
        euler_maruyama(sde.reverse(score, 1.0), prior("vp")[:5], time_grid(sde, 10, "uniform", T_EPS),
                       generator=gen(0))


def test_argument_errors():
    sde = SDES["vp"]
    x, ts = prior("vp")[:4], time_grid(sde, 5, "uniform", T_EPS)
    with pytest.raises(ValueError, match="diffusion=1"):
        reverse_diffusion(sde.reverse(GM.score_fn(sde), 0.5), x, ts)
    with pytest.raises(ValueError, match="diffusion=1"):
        pc(sde.reverse(GM.score_fn(sde), 0.0), x, ts)
    pc(sde.reverse(GM.score_fn(sde), 0.5), x, ts, predictor="euler_maruyama", generator=gen(0))  # fine
    with pytest.raises(ValueError, match="diffusion > 0"):
        adaptive_sde(sde.reverse(GM.score_fn(sde), 0.0), x, span(sde))
    with pytest.raises(ValueError, match="not both"):
        euler_maruyama(sde.reverse(GM.score_fn(sde), 1.0), x, ts, generator=gen(0), seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="one integer per sample"):
        euler_maruyama(sde.reverse(GM.score_fn(sde), 1.0), x, ts, seeds=[1, 2])
    with pytest.raises(TypeError):
        euler_maruyama(sde.reverse(GM.score_fn(sde), 1.0), x, ts, snr=0.1)  # a typo'd option is not swallowed
    with pytest.raises(ValueError, match="predictor"):
        pc(sde.reverse(GM.score_fn(sde), 1.0), x, ts, predictor="ddim")


def test_euler_maruyama_zero_diffusion_is_euler():
    sde = SDES["vp"]
    x, ts = prior("vp")[:32], time_grid(sde, 12, "logsnr", T_EPS)
    em = euler_maruyama(sde.reverse(GM.score_fn(sde), 0.0), x, ts, generator=gen(0))
    eu = REGISTRY["euler"].fn(sde.reverse(GM.score_fn(sde), 0.0), x, ts)
    torch.testing.assert_close(em.x, eu.x, rtol=1e-12, atol=1e-12)


def test_trajectories_and_callbacks():
    sde = SDES["vp"]
    x = prior("vp")[:16]
    seen = []
    sol = pc(sde.reverse(GM.score_fn(sde), 1.0), x, time_grid(sde, 6, "uniform", T_EPS), generator=gen(0),
             save_trajectory=True, callback=lambda i, t, xx: seen.append(i))
    assert sol.xs.shape == (7, 16, 2) and sol.ts.shape == (7,) and seen == list(range(6))
    assert torch.equal(sol.xs[-1], sol.x) and torch.equal(sol.xs[0], x)
    ad = adaptive_sde(sde.reverse(GM.score_fn(sde), 1.0), x, span(sde), generator=gen(0), save_trajectory=True)
    n_it = ad.stats["iterations"]
    assert ad.ts.shape == (n_it + 1, 16) and ad.xs.shape == (n_it + 1, 16, 2)
    assert torch.equal(ad.xs[-1], ad.x) and bool((ad.ts[1:] <= ad.ts[:-1]).all())


def test_sample_entry_point():
    sde = SDES["vp"]
    x = prior("vp")[:32]
    score = CountingScore(GM, sde)
    sol = ss.sample(score, sde, x, solver="pc", nfe=20, diffusion=1.0, generator=gen(0))
    assert uniform(sol.nfe) == score.calls == 20 and sol.steps == 10
    sol = ss.sample(GM.score_fn(sde), sde, x, solver="euler_maruyama", steps=15, diffusion=0.5, generator=gen(0))
    assert uniform(sol.nfe) == 15
    sol = ss.sample(GM.score_fn(sde), sde, x, solver="adaptive_sde", diffusion=1.0, rtol=0.05, generator=gen(3))
    assert sol.nfe.shape == (32,) and torch.equal(sol.t, torch.full((32,), T_EPS, dtype=torch.float64))
    again = ss.sample(GM.score_fn(sde), sde, x, solver="adaptive_sde", diffusion=1.0, rtol=0.05, generator=gen(3))
    assert torch.equal(sol.x, again.x)  # sample() hands the generator to the adaptive SDE solver
    seeded = ss.sample(GM.score_fn(sde), sde, x, solver="adaptive_sde", diffusion=1.0, seeds=list(range(32)))
    assert torch.equal(seeded.x, adaptive_sde(sde.reverse(GM.score_fn(sde), 1.0), x, span(sde),
                                              seeds=list(range(32))).x)
