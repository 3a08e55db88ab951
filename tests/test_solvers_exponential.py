"""Exponential integrators in log-SNR: the claims of their papers, checked against exact and reference solutions."""

from __future__ import annotations

import math

import pytest
import torch
from _counts import uniform
from _kdiffusion import from_kd, k_diffusion_denoiser, kd_sigmas, load_k_diffusion_sampling, to_kd

import scoresolve as ss
from scoresolve.solvers import REGISTRY
from scoresolve.solvers import exponential as ex

OURS = ("ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde")
DETERMINISTIC = ("ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc")
SDES = {
    "vp": ss.VPSDE(),
    "subvp": ss.SubVPSDE(),
    "ve": ss.VESDE(),
    "cosine": ss.CosineVPSDE(),
    "discrete": ss.DiscreteVPSDE.linear(),
}


def _prior(sde, shape, seed=0, dtype=torch.float64):
    return sde.prior_sample(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------------------
# registry and the phi functions
# --------------------------------------------------------------------------------------------------------------
def test_registry_specs():
    expect = {"ddim": (1, 1), "dpm_solver_2": (2, 2), "dpm_solver_3": (3, 3), "dpmpp_2m": (1, 2),
              "dpmpp_3m": (1, 3), "unipc": (1, 3), "dpmpp_2m_sde": (1, 1)}
    for name, (evals, order) in expect.items():
        spec = REGISTRY[name]
        assert (spec.evals_per_step, spec.order) == (evals, order), name
        assert spec.default_grid in ss.solvers.GRIDS
        assert spec.stochastic == (name in ("ddim", "dpmpp_2m_sde"))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_phi_matches_closed_form_and_is_continuous(k):
    def closed(z):  # phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k
        return (math.exp(z) - sum(z**j / math.factorial(j) for j in range(k))) / z**k

    for z in (-3.0, -1.0, -0.6, 0.7, 2.0):
        assert ex.phi(k, z) == pytest.approx(closed(z), rel=1e-12)
    # both sides of the series/closed-form switch agree, and phi_k(0) = 1/k!
    assert ex.phi(k, -0.5 + 1e-12) == pytest.approx(ex.phi(k, -0.5 - 1e-12), rel=1e-10)
    assert ex.phi(k, 0.0) == pytest.approx(1 / math.factorial(k), rel=1e-15)
    assert ex.phi(k, -1e-9) == pytest.approx(1 / math.factorial(k) - 1e-9 / math.factorial(k + 1), rel=1e-15)


# --------------------------------------------------------------------------------------------------------------
# the log-SNR formulas hold for any alpha, sigma (alpha^2 + sigma^2 != 1 for sub-VP and VE)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_exact_for_point_mass_data_on_every_sde(sde_name, solver):
    """For data at one point mu, x0_hat = mu and eps_hat is constant along the exact flow: one step is exact."""
    sde = SDES[sde_name]
    mu = torch.tensor([[0.7, -1.3, 0.2]], dtype=torch.float64)
    gm = ss.GaussianMixture([1.0], mu, torch.zeros(1, 3))
    x = _prior(sde, (5, 3))
    exact = gm.pf_ode_flow(x, sde.T, 1e-2, sde)
    for steps in (1, 3):
        sol = ss.sample(gm.score_fn(sde), sde, x, solver=solver, steps=steps, t_eps=1e-2, grid="logsnr")
        assert _rel(sol.x, exact) < 1e-9, (steps, _rel(sol.x, exact))  # round-off of e^h factors
    # a generic ODE solver is not exact here: the test discriminates
    euler = ss.sample(gm.score_fn(sde), sde, x, solver="euler", steps=3, t_eps=1e-2, grid="logsnr")
    assert _rel(euler.x, exact) > 1e-3


@pytest.mark.parametrize("sde_name", list(SDES))
def test_gaussian_data_converges_to_exact_flow(sde_name):
    sde = SDES[sde_name]
    gm = ss.GaussianMixture.random(3, 1, seed=1)
    x = _prior(sde, (6, 3))
    exact = gm.pf_ode_flow(x, sde.T, 1e-3, sde)
    for solver in ("dpm_solver_3", "dpmpp_3m", "unipc"):
        sol = ss.sample(gm.score_fn(sde), sde, x, solver=solver, nfe=90, t_eps=1e-3)
        assert _rel(sol.x, exact) < 1e-4, (solver, _rel(sol.x, exact))


# --------------------------------------------------------------------------------------------------------------
# convergence orders (float64, smooth mixture problem, logsnr grid, error against an RK4 reference)
# --------------------------------------------------------------------------------------------------------------
# (solver, options, steps); steps chosen where the error is in the asymptotic regime
ORDER_CASES = [
    ("ddim", {}, (40, 80, 160), 1),
    ("dpm_solver_2", {}, (20, 40, 80), 2),
    ("dpm_solver_3", {}, (20, 40, 80), 3),
    ("dpmpp_2m", {"lower_order_final": False}, (20, 40, 80), 2),
    ("dpmpp_3m", {"lower_order_final": False}, (40, 80, 160), 3),
    ("unipc", {"order": 2, "lower_order_final": False}, (80, 160, 320), 3),  # UniP-2 + UniC-2: order 2 + 1
    ("euler", {}, (40, 80, 160), 1),
    ("heun", {}, (20, 40, 80), 2),
    ("rk4", {}, (20, 40, 80), 4),
]
_REFS: dict = {}


def _order_problem(sde_name):
    if sde_name not in _REFS:
        sde = SDES[sde_name]
        gm = ss.GaussianMixture.random(2, 3, seed=0, scale_range=(0.2, 0.5))
        x = _prior(sde, (6, 2))
        ref = ss.sample(gm.score_fn(sde), sde, x, solver="rk4", steps=600, grid="logsnr", t_eps=0.1).x
        _REFS[sde_name] = (sde, gm.score_fn(sde), x, ref)
    return _REFS[sde_name]


def _slope(steps, errs):
    lx, ly = torch.log(torch.tensor(steps, dtype=torch.float64)), torch.log(torch.tensor(errs))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(-(lx * ly).sum() / (lx * lx).sum())


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_observed_convergence_order(sde_name):
    sde, score, x, ref = _order_problem(sde_name)
    report = {}
    for solver, kw, steps, order in ORDER_CASES:
        errs = [_rel(ss.sample(score, sde, x, solver=solver, steps=n, grid="logsnr", t_eps=0.1, **kw).x, ref)
                for n in steps]
        report[solver + str(kw.get("order", ""))] = (_slope(steps, errs), order, errs)
    bad = {k: v for k, v in report.items() if abs(v[0] - v[1]) > 0.3}
    assert not bad, bad


def test_unipc3_beats_lower_orders_in_the_convergent_regime():
    """UniPC-3 has order 4 per step after warm-up; its first-order warm-up step leaves an O(h^3) term whose
    constant is tiny (x0_hat is nearly constant at T), so its observed slope lies between 3 and 5."""
    sde, score, x, ref = _order_problem("vp")
    steps = (80, 160, 320)
    errs = {o: [_rel(ss.sample(score, sde, x, solver="unipc", steps=n, grid="logsnr", t_eps=0.1, order=o,
                               lower_order_final=False).x, ref) for n in steps] for o in (2, 3)}
    assert 3.0 < _slope(steps, errs[3]) < 5.0
    assert all(e3 < 0.5 * e2 for e3, e2 in zip(errs[3], errs[2]))


# --------------------------------------------------------------------------------------------------------------
# stochastic samplers reproduce the exact marginal p_{t_eps}
# --------------------------------------------------------------------------------------------------------------
def _zscores(x, gm, sde, t):
    """|moment error| / Monte-Carlo standard error for the mean and every covariance entry."""
    n = x.shape[0]
    mean, cov = gm.mean(t, sde), gm.cov(t, sde)
    xc = x - mean
    z_mean = (x.mean(0) - mean).abs() / (x.std(0) / math.sqrt(n))
    prod = xc[:, :, None] * xc[:, None, :]  # unbiased for cov given the exact mean
    z_cov = (prod.mean(0) - cov).abs() / (prod.std(0) / math.sqrt(n))
    return float(z_mean.max()), float(z_cov.max())


@pytest.mark.parametrize("solver,kw,steps", [("ddim", {"eta": 1.0}, 150), ("dpmpp_2m_sde", {}, 50),
                                             ("dpmpp_2m_sde", {"eta": 0.5}, 50)])
def test_stochastic_samplers_match_exact_moments(solver, kw, steps):
    sde, t_eps = ss.VPSDE(), 1e-2
    gm = ss.GaussianMixture.random(2, 3, seed=3, scale_range=(0.1, 0.4))
    x = _prior(sde, (20000, 2), seed=1)

    def moments_z(steps):
        sol = ss.sample(gm.score_fn(sde), sde, x, solver=solver, steps=steps, t_eps=t_eps, grid="logsnr",
                        generator=torch.Generator().manual_seed(2), **kw)
        return _zscores(sol.x, gm, sde, t_eps)

    zm, zc = moments_z(steps)
    assert zm < 4.5 and zc < 4.5, (zm, zc)
    # the check has power: the discretisation bias of a coarse run is detected
    if solver == "ddim":
        assert max(moments_z(25)) > 6


def test_stochastic_options_and_reproducibility():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 3, seed=0)
    score, x = gm.score_fn(sde), _prior(sde, (16, 2))

    def run(solver, **kw):
        return ss.sample(score, sde, x, solver=solver, steps=12, generator=torch.Generator().manual_seed(5), **kw).x

    assert torch.equal(run("ddim", eta=1.0), run("ddim", eta=1.0))
    assert not torch.equal(run("ddim", eta=1.0), run("ddim", eta=0.0))
    assert torch.equal(run("ddim", eta=0.0), ss.sample(score, sde, x, solver="ddim", steps=12).x)
    # the process's constant diffusion scale c is the same as eta = c, in ddim and dpmpp_2m_sde alike
    assert torch.equal(run("ddim", diffusion=1.0), run("ddim", eta=1.0))
    assert torch.equal(run("dpmpp_2m_sde", diffusion=0.5), run("dpmpp_2m_sde", eta=0.5))
    assert not torch.equal(run("dpmpp_2m_sde", eta=0.5), run("dpmpp_2m_sde", eta=0.25))
    with pytest.raises(ValueError, match="contradicts"):
        run("ddim", diffusion=1.0, eta=0.3)
    with pytest.raises(ValueError, match="eta"):
        run("dpmpp_2m_sde", eta=-1.0)
    with pytest.raises(TypeError,
                       match=r"unknown option\(s\) \['lower_order_finl'\]; its options: afs, lower_order_final"):
        run("dpmpp_2m", lower_order_finl=False)
    # eta = 0 turns DPM-Solver++(2M) SDE into DPM-Solver++(2M)
    det = ss.sample(score, sde, x, solver="dpmpp_2m", steps=12, grid="logsnr", lower_order_final=False).x
    assert _rel(run("dpmpp_2m_sde", eta=0.0, grid="logsnr"), det) < 1e-14


@pytest.mark.parametrize("solver", DETERMINISTIC[1:])
def test_deterministic_solvers_refuse_stochastic_processes(solver):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m_sde"):
        ss.sample(gm.score_fn(sde), sde, _prior(sde, (4, 2)), solver=solver, steps=4, diffusion=1.0)


# --------------------------------------------------------------------------------------------------------------
# NFE accounting
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", OURS)
def test_nfe_is_exact(solver):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    calls = []

    def score(x, t):
        calls.append(1)
        return gm.score(x, t, sde)

    x = _prior(sde, (4, 2))
    for nfe in (6, 12):  # fits every method exactly (2 and 3 evaluations per step)
        calls.clear()
        sol = ss.sample(score, sde, x, solver=solver, nfe=nfe, generator=torch.Generator().manual_seed(0))
        assert len(calls) == uniform(sol.nfe) == nfe
        assert sol.steps == nfe // REGISTRY[solver].evals_per_step
    calls.clear()
    sol = ss.sample(score, sde, x, solver=solver, nfe=13, generator=torch.Generator().manual_seed(0))
    assert len(calls) == uniform(sol.nfe) == REGISTRY[solver].nfe_for_steps(REGISTRY[solver].steps_for_nfe(13)) <= 13
    calls.clear()
    sol = ss.sample(score, sde, x, solver=solver, steps=1, generator=torch.Generator().manual_seed(0))
    assert len(calls) == uniform(sol.nfe) == REGISTRY[solver].evals_per_step


# --------------------------------------------------------------------------------------------------------------
# shapes, dtypes, trajectory, callback, non-finite guard
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event_shape", [(4,), (1, 2, 2), (1, 2, 1, 2)])
@pytest.mark.parametrize("solver", OURS)
def test_shapes_and_dtypes(solver, event_shape):
    sde = ss.VPSDE()
    gm4 = ss.GaussianMixture.random(4, 3, seed=2, event_shape=event_shape)
    gm_flat = ss.GaussianMixture.random(4, 3, seed=2)
    x = _prior(sde, (5, *event_shape))
    kw = dict(steps=6, generator=torch.Generator().manual_seed(0))
    flat = ss.sample(gm_flat.score_fn(sde), sde, x.reshape(5, 4), solver=solver, **kw).x
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        kw["generator"] = torch.Generator().manual_seed(0)
        sol = ss.sample(gm4.score_fn(sde), sde, x.to(dtype), solver=solver, **kw)
        assert sol.x.dtype == dtype and sol.x.shape == x.shape
        if solver != "dpmpp_2m_sde":  # float32 draws different noise
            assert _rel(sol.x.reshape(5, 4).double(), flat) < tol
        elif dtype == torch.float64:
            assert _rel(sol.x.reshape(5, 4), flat) < tol


@pytest.mark.parametrize("solver", OURS)
def test_trajectory_and_callback(solver):
    sde = ss.VESDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    seen = []
    sol = ss.sample(gm.score_fn(sde), sde, _prior(sde, (3, 2)), solver=solver, steps=5, save_trajectory=True,
                    callback=lambda i, t, x: seen.append((i, float(t))), generator=torch.Generator().manual_seed(0))
    grid = sol.stats["grid"]
    assert sol.xs.shape == (6, 3, 2) and torch.equal(sol.xs[-1], sol.x)
    assert torch.allclose(sol.ts, grid) and torch.allclose(sol.t, grid[-1].expand(3))
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == pytest.approx(grid[1:].tolist())


def test_non_finite_is_reported():
    sde = ss.VPSDE()

    def score(x, t):
        out = -x
        return torch.where((t < 0.5)[:, None] & (torch.arange(x.shape[0]) == 1)[:, None], out * float("nan"), out)

    with pytest.raises(ss.NonFiniteError) as err:
        ss.sample(score, sde, _prior(sde, (3, 2)), solver="dpmpp_2m", steps=8)
    assert err.value.indices == [1]


# --------------------------------------------------------------------------------------------------------------
# agreement with k-diffusion (same grid, same x_T, converted to its variables x/alpha, sigma/alpha)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kd():
    module = load_k_diffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sde_name", ["vp", "ve", "subvp"])
def test_matches_k_diffusion(kd, sde_name, dtype, tol):
    """dpmpp_2m = sample_dpmpp_2m; ddim = sample_euler (Euler in sigma/alpha IS DDIM); dpm_solver_2/3 = DPMSolver
    steps; dpmpp_2m_sde = sample_dpmpp_2m_sde (midpoint) with the same normal draws. Grid ends at sigma_min > 0
    (k-diffusion would append sigma = 0 and finish with x = denoised)."""
    sde = SDES[sde_name]
    gm = ss.GaussianMixture.random(3, 4, seed=0)
    score = gm.score_fn(sde)
    x = _prior(sde, (8, 3), dtype=dtype)
    ts = ss.time_grid(sde, 12, "karras", 1e-3)
    sig = kd_sigmas(sde, ts).to(dtype)
    den = k_diffusion_denoiser(score, sde)
    xk = to_kd(x, sde, sde.T)

    def ours(solver, **kw):
        return ss.sample(score, sde, x, solver=solver, grid=ts, t_eps=1e-3, **kw).x

    def theirs(xk_end):
        return from_kd(xk_end, sde, 1e-3)

    assert _rel(ours("dpmpp_2m", lower_order_final=False), theirs(kd.sample_dpmpp_2m(den, xk, sig, disable=True))) < tol
    assert _rel(ours("ddim"), theirs(kd.sample_euler(den, xk, sig, disable=True))) < tol
    dpm = kd.DPMSolver(den)
    lam = -torch.log(sig)
    for solver, step in (("dpm_solver_2", dpm.dpm_solver_2_step), ("dpm_solver_3", dpm.dpm_solver_3_step)):
        y = xk
        for i in range(ts.numel() - 1):
            y = step(y, lam[i], lam[i + 1])[0]
        assert _rel(ours(solver), theirs(y)) < tol * 10, solver
    g = torch.Generator().manual_seed(7)
    replay = lambda s, s_next: torch.randn(x.shape, generator=g, dtype=dtype)  # noqa: E731
    kd_sde = kd.sample_dpmpp_2m_sde(den, xk, sig, eta=1.0, noise_sampler=replay, disable=True)
    our_sde = ours("dpmpp_2m_sde", generator=torch.Generator().manual_seed(7))
    assert _rel(our_sde, theirs(kd_sde)) < tol
