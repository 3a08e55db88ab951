"""Property tests (hypothesis): SDE identities for random valid schedules and times, the continuity equation on random
small Gaussian mixtures, and solver invariants (dtype, seeding, batch invariance) over every registered solver."""

from __future__ import annotations

import pytest
import torch
from _solver_kw import solve_kw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scoresolve as ss
from scoresolve.solvers import REGISTRY, AdaptiveSolver

F32, F64 = torch.float32, torch.float64
SOLVERS = sorted(ss.list_solvers())
STOCHASTIC = [n for n in SOLVERS if REGISTRY[n].stochastic]
ODE_ADAPTIVE = [n for n in SOLVERS if isinstance(REGISTRY[n], AdaptiveSolver) and not REGISTRY[n].stochastic]

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=30, **_COMMON)
FEW = settings(max_examples=6, **_COMMON)


# ------------------------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------------------------
@st.composite
def beta_range(draw, lo=0.0, hi=30.0):
    b0 = draw(st.floats(lo, 5.0))
    b1 = draw(st.floats(b0 + 0.5, hi))
    return b0, b1


@st.composite
def sigma_range(draw):
    smin = draw(st.floats(1e-3, 1.0))
    ratio = draw(st.floats(1.5, 1e4))
    return smin, smin * ratio


@st.composite
def sdes(draw, kinds=("vp", "subvp", "ve", "edm", "cosine", "discrete")):
    kind = draw(st.sampled_from(kinds))
    if kind == "vp":
        return ss.VPSDE(*draw(beta_range()))
    if kind == "subvp":
        return ss.SubVPSDE(*draw(beta_range()))
    if kind == "ve":
        return ss.VESDE(*draw(sigma_range()))
    if kind == "edm":
        return ss.EDMSDE(T=draw(st.floats(1.0, 100.0)))
    if kind == "cosine":
        return ss.CosineVPSDE(s=draw(st.floats(0.0, 0.05)))
    n = draw(st.integers(10, 1000))
    b_start = draw(st.floats(1e-5, 1e-3))
    b_end = draw(st.floats(5e-3, 0.05))
    return ss.DiscreteVPSDE.linear(n, b_start, b_end)


def _times(draw, sde, n_min=1, n_max=6, lo=1e-4):
    return torch.tensor(draw(st.lists(st.floats(lo, sde.T), min_size=n_min, max_size=n_max)), dtype=F64)


# ------------------------------------------------------------------------------------------------------------------
# SDE identities
# ------------------------------------------------------------------------------------------------------------------
@FAST
@given(data=st.data())
def test_variance_preserving_and_sub_vp_marginals(data):
    sde = data.draw(sdes(("vp", "subvp", "cosine", "discrete")))
    t = _times(data.draw, sde, lo=0.0)
    alpha, sigma = sde.marginal(t)
    if isinstance(sde, ss.SubVPSDE):
        torch.testing.assert_close(sigma, 1 - alpha**2, rtol=1e-12, atol=1e-15)
    else:
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=1e-12, atol=1e-12)
    assert bool(((alpha > 0) & (alpha <= 1) & (sigma >= 0) & (sigma < 1)).all())


@FAST
@given(data=st.data())
def test_log_snr_decreasing_and_inverse_round_trips(data):
    sde = data.draw(sdes())
    t = torch.sort(_times(data.draw, sde, n_min=2, n_max=8)).values
    lam = sde.log_snr(t)
    assert bool(torch.isfinite(lam).all())
    dl = torch.diff(lam)
    separated = torch.diff(t) >= 1e-6
    assert bool((dl <= 0).all()), (t, lam)
    assert bool((dl[separated] < 0).all()), (t, lam)
    back = sde.t_from_log_snr(lam)
    torch.testing.assert_close(back, t, rtol=1e-6, atol=0)


def _ddt(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elementwise dy/dt by autograd (zero where y does not depend on t, e.g. log alpha = 0 for VE)."""
    if not y.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), t, retain_graph=True)[0]


@FAST
@given(data=st.data())
def test_drift_and_variance_odes_hold(data):
    """d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2 (the Gaussian marginals solve the forward SDE)."""
    sde = data.draw(sdes())
    t = _times(data.draw, sde, lo=1e-3).requires_grad_(True)
    if t.numel() and isinstance(sde, ss.CosineVPSDE):
        t = t.detach().clamp(max=0.98).requires_grad_(True)  # beta -> inf at t -> 1
    alpha, sigma = sde.marginal(t)
    dlog_alpha, dvar = _ddt(torch.log(alpha), t), _ddt(sigma**2, t)
    with torch.no_grad():
        f, g2 = sde.drift_coef(t), sde.diffusion(t) ** 2
        s2 = sigma**2
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-9, atol=1e-12)
    rhs = 2 * f * s2 + g2
    torch.testing.assert_close(dvar, rhs, rtol=1e-8, atol=1e-10 * float(g2.abs().max() if g2.numel() else 1))


# ------------------------------------------------------------------------------------------------------------------
# The continuity equation of the probability-flow ODE on random small mixtures
# ------------------------------------------------------------------------------------------------------------------
@st.composite
def mixtures(draw):
    D = draw(st.integers(1, 3))
    K = draw(st.integers(1, 3))
    w = draw(st.lists(st.floats(0.1, 1.0), min_size=K, max_size=K))
    mu = draw(st.lists(st.floats(-2.0, 2.0), min_size=K * D, max_size=K * D))
    L = torch.tensor(draw(st.lists(st.floats(-1.0, 1.0), min_size=K * D * D, max_size=K * D * D)), dtype=F64)
    L = L.reshape(K, D, D)
    covs = L @ L.transpose(1, 2) + 0.05 * torch.eye(D, dtype=F64)
    gm = ss.GaussianMixture(w, torch.tensor(mu, dtype=F64).reshape(K, D), covs)
    x = torch.tensor(draw(st.lists(st.floats(-3.0, 3.0), min_size=2 * D, max_size=2 * D)), dtype=F64).reshape(2, D)
    return gm, x


@FAST
@given(mix=mixtures(), sde=sdes(("vp", "subvp", "ve", "edm")), t=st.floats(0.05, 0.95))
def test_continuity_equation_on_random_mixtures(mix, sde, t):
    """d/dt log p_t = -div v - v . grad log p_t with v the PF-ODE drift (finite differences in t, autograd div)."""
    gm, x = mix
    h = 1e-3  # 4th-order central difference: truncation ~ h^4, rounding ~ 1e-16 / h
    lp = [gm.log_prob(x, t + k * h, sde) for k in (-2, -1, 1, 2)]
    dt_logp = (lp[0] - 8 * lp[1] + 8 * lp[2] - lp[3]) / (12 * h)

    xg = x.clone().requires_grad_(True)
    v = sde.probability_flow(gm.score_fn(sde)).drift(xg, t)
    div = sum(torch.autograd.grad(v[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    (grad_logp,) = torch.autograd.grad(gm.log_prob(xg, t, sde).sum(), xg)
    transport = (v * grad_logp).sum(1)
    residual = dt_logp + div + transport
    scale = dt_logp.abs() + div.abs() + transport.abs()
    assert bool((residual.abs() <= 1e-4 * scale + 1e-9).all()), (residual, scale)


# ------------------------------------------------------------------------------------------------------------------
# Solver invariants
# ------------------------------------------------------------------------------------------------------------------
def _solve_kw(name: str, steps: int = 4, tol: float = 0.001, seed: int = 0) -> dict:
    return solve_kw(name, steps, tol, seed)


def _mixture_case(B=4, D=2, dtype=F64, seed=0, sde=None):
    sde = sde or ss.VPSDE()
    gm = ss.GaussianMixture.random(D, 2, seed=seed)
    x = sde.prior_sample((B, D), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return sde, gm, x


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_preserves_dtype(name, dtype):
    sde, gm, x = _mixture_case(B=3, dtype=dtype)
    sol = ss.sample(gm.score_fn(sde), sde, x, solver=name, t_eps=0.3, **_solve_kw(name))
    assert sol.x.dtype == dtype and sol.x.shape == x.shape
    assert sol.t is None or sol.t.dtype == dtype
    assert bool(torch.isfinite(sol.x).all())
    den = ss.sample(gm.score_fn(sde), sde, x, solver=name, t_eps=0.3, denoise=True, **_solve_kw(name))
    assert den.x.dtype == dtype


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_solvers_are_reproducible_from_a_seed(name):
    sde, gm, x = _mixture_case(B=3)
    runs = [ss.sample(gm.score_fn(sde), sde, x, solver=name, t_eps=0.3, **_solve_kw(name, seed=s)).x
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # and the seed matters


@pytest.mark.parametrize("name", ODE_ADAPTIVE)
@settings(max_examples=4, **_COMMON)
@given(split=st.integers(1, 4), seed=st.integers(0, 2**16), tol=st.sampled_from([1e-3, 1e-5]))
def test_adaptive_solvers_are_batch_invariant(name, split, seed, tol):
    sde, gm, x = _mixture_case(B=5, seed=seed % 7)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kw = {"rtol": tol, "atol": tol}
    whole = ss.sample(gm.score_fn(sde), sde, x, solver=name, **kw)
    parts = [ss.sample(gm.score_fn(sde), sde, p, solver=name, **kw) for p in (x[:split], x[split:])]
    torch.testing.assert_close(torch.cat([p.x for p in parts]), whole.x, rtol=1e-12, atol=1e-12)
    for attr in ("nfe", "steps", "rejected"):
        assert torch.equal(torch.cat([getattr(p, attr) for p in parts]), getattr(whole, attr)), attr


@FEW
@given(split=st.integers(1, 3), seed=st.integers(0, 2**16), time_variable=st.sampled_from(["t", "logsnr"]))
def test_log_likelihood_is_batch_invariant(split, seed, time_variable):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=seed % 5)
    y = gm.sample(4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kw = dict(divergence="exact", rtol=1e-4, atol=1e-4, t_eps=1e-3, time_variable=time_variable)
    whole = ss.log_likelihood(gm.score_fn(sde), sde, y, **kw)
    parts = [ss.log_likelihood(gm.score_fn(sde), sde, p, **kw) for p in (y[:split], y[split:])]
    torch.testing.assert_close(torch.cat([p.log_prob for p in parts]), whole.log_prob, rtol=1e-12, atol=1e-12)
    for attr in ("nfe", "steps", "rejected"):
        assert torch.equal(torch.cat([getattr(p, attr) for p in parts]), getattr(whole, attr)), attr


@pytest.mark.skipif("adaptive_sde" not in REGISTRY, reason="adaptive_sde not registered")
def test_adaptive_sde_with_per_sample_seeds_is_batch_invariant():
    sde, gm, x = _mixture_case(B=4, seed=1)
    seeds = [11, 12, 13, 14]
    kw = dict(solver="adaptive_sde", diffusion=1.0, t_eps=0.3, rtol=0.1, atol=0.02)
    whole = ss.sample(gm.score_fn(sde), sde, x, seeds=seeds, **kw)
    parts = [ss.sample(gm.score_fn(sde), sde, x[sl], seeds=seeds[sl], **kw) for sl in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(torch.cat([p.x for p in parts]), whole.x, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.cat([p.nfe for p in parts]), whole.nfe)

