"""Interpolants (rectified flow, trigonometric, any (alpha, sigma) pair) as forward processes: schedule identities,
the flow prediction, sampling from alpha = 0 and exact likelihoods on Gaussian mixtures."""

import math

import pytest
import torch
from _exact import rel_rms as _rel

import scoresolve as ss
from scoresolve.score import PREDICTIONS

F64 = torch.float64
INTERPOLANTS = [ss.RectifiedFlow(), ss.TrigonometricInterpolant()]
IDS = ["rf", "trig"]


def _custom() -> ss.Interpolant:
    """alpha = 1 - t^2, sigma = t: no closed-form inverse of the log-SNR (bisection)."""
    return ss.Interpolant(lambda t: 1 - t**2, lambda t: t, lambda t: -2 * t, torch.ones_like, name="Quadratic")



@pytest.mark.parametrize("sde", INTERPOLANTS + [_custom()], ids=IDS + ["custom"])
def test_schedule_identities(sde):
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    h = 1e-6
    a, s = sde.marginal(t)
    # f = d log alpha / dt, g^2 = d sigma^2/dt - 2 f sigma^2, d alpha/dt, d sigma/dt: against central differences
    dlog_a = (sde.log_alpha(t + h) - sde.log_alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sde.f(t), dlog_a, rtol=1e-7, atol=1e-7)
    dsig2 = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sde.g2(t), dsig2 - 2 * sde.f(t) * s**2, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(sde.dalpha_dt(t), (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(sde.dsigma_dt(t), (sde.sigma(t + h) - sde.sigma(t - h)) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(sde.dlog_snr_dt(t), (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-12, atol=1e-12)
    # alpha(T) = 0: the prior is exact, the log-SNR is -inf and f, g^2 diverge while the flow stays finite
    T = torch.tensor(1.0, dtype=F64)
    assert float(sde.alpha(T)) == 0.0 and float(sde.log_snr(T)) == -math.inf
    assert sde.prior_std == pytest.approx(1.0) and sde.velocity_form


def test_named_interpolants_closed_forms():
    rf, trig = ss.RectifiedFlow(), ss.TrigonometricInterpolant()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(rf.f(t), -1 / (1 - t))
    torch.testing.assert_close(rf.g2(t), 2 * t / (1 - t))
    torch.testing.assert_close(rf.log_snr(t), torch.log((1 - t) / t))
    torch.testing.assert_close(trig.alpha(t) ** 2 + trig.sigma(t) ** 2, torch.ones_like(t))
    assert ss.sde_from_name("rf") == rf and ss.sde_from_name("trig") == trig
    assert "rf" in ss.SDE_NAMES and "trig" in ss.SDE_NAMES


def test_interpolant_validation():
    with pytest.raises(ValueError, match="log-SNR"):
        ss.Interpolant(lambda t: t + 0.1, lambda t: 1 + 0 * t, torch.ones_like, torch.zeros_like)
    with pytest.raises(ValueError, match="alpha > 0"):
        ss.Interpolant(lambda t: 0.5 - t, lambda t: t, lambda t: -torch.ones_like(t), torch.ones_like)


@pytest.mark.parametrize("sde", INTERPOLANTS, ids=IDS)
def test_flow_prediction_round_trips_up_to_alpha_zero(sde):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.3, 0.6, 0.99, 1.0], dtype=F64)
    a, s = sde.marginal(t)
    da, ds = sde.dalpha_dt(t), sde.dsigma_dt(t)
    xt = sde.perturb(x0, t, noise=eps)
    truth = {"x0": x0, "eps": eps, "score": -eps / s[:, None], "v": a[:, None] * eps - s[:, None] * x0,
             "flow": da[:, None] * x0 + ds[:, None] * eps}
    if isinstance(sde, ss.RectifiedFlow):
        torch.testing.assert_close(truth["flow"], eps - x0)  # u = eps - x0 (SD3 / Flux)
    for src in ("flow", "x0", "v"):  # the predictions that carry x0 at alpha = 0
        for dst in PREDICTIONS:
            out = ss.convert(truth[src], src, dst, xt, a, s, da, ds)
            torch.testing.assert_close(out, truth[dst], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="dalpha"):
        ss.convert(truth["flow"], "flow", "eps", xt, a, s)


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(), ss.SubVPSDE()] + INTERPOLANTS,
                         ids=["vp", "ve", "subvp"] + IDS)
def test_flow_is_the_probability_flow_drift(sde):
    gm = ss.GaussianMixture.random(3, 3, seed=2)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.05, 0.95, 6, dtype=F64)
    drift = sde.f(t)[:, None] * x - 0.5 * sde.g2(t)[:, None] * gm.score(x, t, sde)
    for pred in PREDICTIONS:
        torch.testing.assert_close(gm.model(sde, pred).flow(x, t), drift, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.flow(x, t, sde), drift, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.probability_flow(gm.model(sde, "eps")).drift(x, t), drift, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde", INTERPOLANTS, ids=IDS)
def test_mixture_divergence_matches_autograd_up_to_alpha_zero(sde):
    from scoresolve.divergence import exact_div_score

    gm = ss.GaussianMixture.random(4, 3, seed=0)
    x0 = gm.sample(16, torch.Generator().manual_seed(1), dtype=F64)
    for tv in (1e-5, 1e-3, 0.3, 0.7, 0.999, 1.0):
        t = torch.full((16,), tv, dtype=F64)
        xt = sde.perturb(x0, t, generator=torch.Generator().manual_seed(2))
        _, div = exact_div_score(gm.model(sde, "flow").flow, xt, t, 8)
        torch.testing.assert_close(gm.pf_ode_divergence(xt, t, sde), div, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sde", INTERPOLANTS, ids=IDS)
def test_pf_ode_from_alpha_zero_matches_the_exact_flow(sde):
    """A single Gaussian has an exact PF-ODE solution map; every solver that can start at t = 1 converges to it."""
    gm = ss.GaussianMixture([1.0], [[1.0, -2.0, 0.5]], torch.tensor([[0.3, 0.05, 1.5]], dtype=F64))
    x_T = sde.prior_sample((32, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gm.pf_ode_flow(x_T, 1.0, 1e-3, sde)
    model = gm.model(sde, "flow")
    ref = ss.sample(model, sde, x_T, solver="dopri5", rtol=1e-10, atol=1e-10)
    assert _rel(ref.x, exact) < 1e-8
    for solver, coarse in (("euler", 0.1), ("heun", 0.02), ("rk4", 1e-2), ("ddim", 0.1), ("dpmpp_2m", 0.03),
                           ("dpmpp_3m", 0.03), ("unipc", 0.03)):
        e10 = _rel(ss.sample(model, sde, x_T, solver=solver, nfe=12).x, exact)
        e40 = _rel(ss.sample(model, sde, x_T, solver=solver, nfe=48).x, exact)
        assert e10 < coarse, (solver, e10)
        assert e40 < e10 / 3, (solver, e10, e40)  # at least first order from the alpha = 0 start


def test_x0_and_v_models_start_at_alpha_zero_too():
    sde = ss.RectifiedFlow()
    gm = ss.GaussianMixture.random(4, 3, seed=3)
    x_T = sde.prior_sample((16, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = ss.sample(gm.model(sde, "flow"), sde, x_T, solver="unipc", nfe=20).x
    for pred in ("x0", "v"):
        out = ss.sample(gm.model(sde, pred), sde, x_T, solver="unipc", nfe=20).x
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_alpha_zero_refusals_are_clear():
    sde = ss.RectifiedFlow()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x_T = sde.prior_sample((4, 2), dtype=F64)
    for solver in ("dpm_solver_2", "dpm_solver_3", "euler_maruyama", "pc", "adaptive_sde"):
        kw = {"rtol": 1e-3} if solver == "adaptive_sde" else {"nfe": 12}
        with pytest.raises(ValueError, match="cannot start .* alpha = 0"):
            ss.sample(gm.model(sde, "flow"), sde, x_T, solver=solver, **kw)
    for pred in ("score", "eps"):
        with pytest.raises(ValueError, match="no information about x0"):
            ss.sample(gm.model(sde, pred), sde, x_T, solver="euler", nfe=10)
    with pytest.raises(ValueError, match="log-SNR"):
        ss.time_grid(sde, 10, "karras")
    with pytest.raises(ValueError, match="logsnr"):
        ss.log_likelihood(gm.model(sde, "flow"), sde, x_T, time_variable="logsnr")
    # a score model works from an explicit grid that starts below T, and singlestep DPM-Solver too
    ts = ss.time_grid(sde, 10, "uniform", T=0.99)
    out = ss.sample(gm.model(sde, "score"), sde, x_T, solver="dpm_solver_2", grid=ts)
    assert bool(torch.isfinite(out.x).all())


@pytest.mark.parametrize("sde", INTERPOLANTS, ids=IDS)
def test_log_likelihood_matches_the_exact_density(sde):
    """float64, exact divergence: within 1e-4 nats of the closed-form log p_{t_eps} under the interpolant."""
    gm = ss.GaussianMixture.random(3, 4, seed=5)
    x = gm.sample(24, torch.Generator().manual_seed(0), dtype=F64)
    model = gm.model(sde, "flow")
    res = ss.log_likelihood(model, sde, x, divergence="exact", rtol=1e-7, atol=1e-7)
    exact = gm.log_prob(x, 1e-5, sde)
    assert float((res.log_prob - exact).abs().max()) < 1e-4
    # the closed-form divergence callable gives the same
    res2 = ss.log_likelihood(model, sde, x, divergence=lambda xx, t: gm.pf_ode_divergence(xx, t, sde), rtol=1e-7,
                             atol=1e-7)
    assert float((res2.log_prob - exact).abs().max()) < 1e-4
    # Hutchinson is unbiased: the mean over many probes lies within 4 standard errors
    res3 = ss.log_likelihood(model, sde, x[:4], probes=64, generator=torch.Generator().manual_seed(1), rtol=1e-6,
                             atol=1e-6)
    assert bool(((res3.log_prob - exact[:4]).abs() < 4 * res3.std_error + 1e-3).all())


def test_shifted_grids_match_sd3_and_flux():
    sde = ss.RectifiedFlow()
    base = torch.linspace(1, 1e-3, 11, dtype=F64)
    shifted = 3.0 * base / (1 + 2.0 * base)  # SD3, shift 3 (diffusers' FlowMatchEulerDiscreteScheduler)
    ts = ss.time_grid(sde, 10, "uniform", t_eps=float(shifted[-1]), shift=3.0)
    torch.testing.assert_close(ts, shifted, rtol=1e-13, atol=1e-15)
    # Flux: mu linear in the image token count, 0.5 at 256 and 1.15 at 4096; shift = e^mu
    assert ss.flux_shift(256) == pytest.approx(math.exp(0.5))
    assert ss.flux_shift(4096) == pytest.approx(math.exp(1.15))
    mu = math.log(ss.flux_shift(1024))
    t = torch.tensor([0.2, 0.7], dtype=F64)
    torch.testing.assert_close(ss.sd3_shift(t, math.exp(mu)), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    # sample() takes shift= for named grids only
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x_T = sde.prior_sample((4, 2), dtype=F64)
    sol = ss.sample(gm.model(sde, "flow"), sde, x_T, solver="euler", nfe=10, shift=3.0)
    torch.testing.assert_close(sol.stats["grid"], ss.time_grid(sde, 10, "uniform", 1e-3, shift=3.0))
    with pytest.raises(ValueError, match="shift"):
        ss.sample(gm.model(sde, "flow"), sde, x_T, solver="euler", grid=ts, shift=3.0)
    with pytest.raises(ValueError, match="shift"):
        ss.time_grid(sde, 10, "uniform", shift=-1.0)
