import math

import pytest
import torch

import scoresolve as ss
from scoresolve.likelihood import log_likelihood

F64 = torch.float64
SDES = [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE()]
IDS = ["vp", "subvp", "ve"]
T_EPS = 1e-5


def exact_delta(gm, x, z, sde, t_eps=T_EPS):
    """log p_{t_eps}(x) - log p_T(z): what the ODE must produce before the prior replaces p_T."""
    return gm.log_prob(x, t_eps, sde) - gm.log_prob(z, sde.T, sde)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("time_variable", ["t", "logsnr"])
def test_exact_divergence_matches_closed_form(sde, time_variable):
    gm = ss.GaussianMixture.random(2, 3, seed=1)
    x = gm.sample(6, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", rtol=1e-9, atol=1e-9,
                       time_variable=time_variable)
    err = (r.delta_log_prob - exact_delta(gm, x, r.latent, sde)).abs().max()
    assert err <= 1e-4, err
    torch.testing.assert_close(r.log_prob, r.prior_log_prob + r.delta_log_prob)
    torch.testing.assert_close(r.prior_log_prob, sde.prior_log_prob(r.latent))
    # the latent is the PF-ODE image of x: solving back from it returns x
    back = ss.sample(gm.score_fn(sde), sde, r.latent, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=T_EPS)
    torch.testing.assert_close(back.x, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_high_dimension_with_analytic_divergence(sde):
    """D = 3072 (a 3x32x32 image shape): the ODE part is accurate to 1e-4 nats with the exact divergence."""
    gm = ss.GaussianMixture.random(3072, 2, seed=2, full=False, event_shape=(3, 32, 32))
    x = gm.sample(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    div = lambda xt, t: gm.pf_ode_divergence(xt, t, sde)  # noqa: E731
    r = log_likelihood(gm.score_fn(sde), sde, x, divergence=div, rtol=1e-8, atol=1e-8)
    err = (r.delta_log_prob - exact_delta(gm, x, r.latent, sde)).abs().max()
    assert err <= 1e-4, err
    assert r.latent.shape == x.shape


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_at_d3072(probe):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3072, 2, seed=3, full=False, scale_range=(0.05, 0.5))
    x = gm.sample(2, generator=torch.Generator().manual_seed(2), dtype=F64)
    r = log_likelihood(gm.score_fn(sde), sde, x, probes=24, probe=probe, rtol=1e-5, atol=1e-5,
                       generator=torch.Generator().manual_seed(3))
    ex = exact_delta(gm, x, r.latent, sde)
    z = (r.delta_log_prob - ex) / r.std_error
    assert torch.all(z.abs() < 4), (r.delta_log_prob, ex, r.std_error)
    assert torch.all(r.std_error > 0)
    # one probe per solve: the estimator is noisy but its error is of the size of its spread
    r1 = log_likelihood(gm.score_fn(sde), sde, x, probes=1, probe=probe, rtol=1e-5, atol=1e-5,
                        generator=torch.Generator().manual_seed(4))
    assert r1.std_error is None
    assert torch.all((r1.delta_log_prob - ex).abs() < 5 * r.std_error * math.sqrt(24))


def test_rademacher_has_lower_variance_than_gaussian():
    """Rademacher variance is 2 sum_{i != j} A_ij^2, Gaussian's 2 ||A||_F^2: on a diagonal-dominant Jacobian
    (axis-aligned mixture) Rademacher is much less noisy."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(64, 2, seed=4, full=False)
    x = gm.sample(2, generator=torch.Generator().manual_seed(0), dtype=F64)
    se = {}
    for probe in ("rademacher", "gaussian"):
        r = log_likelihood(gm.score_fn(sde), sde, x, probes=16, probe=probe, rtol=1e-5, atol=1e-5,
                           generator=torch.Generator().manual_seed(1))
        se[probe] = r.std_error
    assert torch.all(se["rademacher"] < 0.5 * se["gaussian"]), se


def test_batch_invariance_and_reproducibility():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 3, seed=5)
    x = gm.sample(5, generator=torch.Generator().manual_seed(0), dtype=F64)
    full = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", rtol=1e-6, atol=1e-6)
    for i in (0, 3):
        one = log_likelihood(gm.score_fn(sde), sde, x[i : i + 1], divergence="exact", rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(one.log_prob, full.log_prob[i : i + 1], rtol=1e-12, atol=1e-12)
        assert one.nfe.item() == full.nfe[i].item()
    a = log_likelihood(gm.score_fn(sde), sde, x, probes=2, generator=torch.Generator().manual_seed(9))
    b = log_likelihood(gm.score_fn(sde), sde, x, probes=2, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=0)


def test_one_forward_per_evaluation_and_exact_nfe():
    """Drift and divergence come from the same forward pass: the network runs once per ODE evaluation."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(4, 2, seed=6)
    calls = {"n": 0, "rows": 0}

    def score(x, t):
        calls["n"] += 1
        calls["rows"] += x.shape[0]
        return gm.score(x, t, sde)

    x = gm.sample(1, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = log_likelihood(score, sde, x, probes=3, rtol=1e-5, atol=1e-5)
    assert r.calls == calls["n"]  # every network call is counted
    assert calls["rows"] == calls["n"]  # three probes share one forward
    # a sample's own count stops when it is done; finished samples ride along until the next check
    assert r.nfe.item() <= calls["n"] <= r.nfe.item() + 2 * 7
    assert r.steps.item() > 5


def test_ve_matches_k_diffusion_log_likelihood():
    """k-diffusion's log_likelihood integrates the same VE ODE in sigma with one Rademacher probe; in one dimension
    that probe is exact (e^2 = 1), so both must agree to the solvers' tolerance."""
    kd = pytest.importorskip("_kdiffusion").load_k_diffusion_sampling()
    if kd is None:
        pytest.skip("k-diffusion is not installed")
    sde = ss.VESDE(sigma_min=0.01, sigma_max=20.0)
    gm = ss.GaussianMixture([0.3, 0.5, 0.2], [[-1.0], [0.5], [2.0]], [0.05, 0.2, 0.01])
    x = gm.sample(4, generator=torch.Generator().manual_seed(0), dtype=F64)

    def denoiser(xs, sigma):  # k-diffusion's D(x, sigma) = x + sigma^2 score for VE (alpha = 1)
        t = sde.t_from_log_snr(-torch.log(sigma)).clamp(0, 1)
        return xs + sigma.reshape(-1, 1) ** 2 * gm.score(xs, t, sde)

    ll_kd, info = kd.log_likelihood(denoiser, x, sde.sigma_min, sde.sigma_max, atol=1e-8, rtol=1e-8)
    r = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", rtol=1e-8, atol=1e-8, t_eps=1e-12)
    # k-diffusion starts at sigma_min exactly: our t_eps -> 0 has sigma(t_eps) -> sigma_min
    torch.testing.assert_close(r.log_prob, ll_kd.to(F64), rtol=1e-5, atol=1e-5)
    # and both equal the exact log-density up to the prior/p_T mismatch, which is exact here
    exact = gm.log_prob(x, 1e-12, sde) - gm.log_prob(r.latent, sde.T, sde) + r.prior_log_prob
    torch.testing.assert_close(r.log_prob, exact, rtol=1e-5, atol=1e-5)


def test_low_precision_network_inside_float32_solve():
    """A bf16 network inside a float32 solver runs; its effect on log p is small against the fp32 result."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(8, 2, seed=8)
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    score32 = gm.score_fn(sde)

    def score16(xs, t):
        return score32(xs.to(torch.bfloat16).float(), t).to(torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    r32 = log_likelihood(score32, sde, x, probes=4, generator=g, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    r16 = log_likelihood(score16, sde, x, probes=4, generator=g, rtol=1e-4, atol=1e-4, max_steps=20_000)
    assert r16.log_prob.dtype == torch.float32
    assert torch.all(torch.isfinite(r16.log_prob))
    assert torch.all((r16.log_prob - r32.log_prob).abs() < 0.5)


def test_bad_input_raises():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x = gm.sample(2, dtype=F64)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(gm.score_fn(sde), sde, x, probe="uniform")
    with pytest.raises(ValueError, match="probes"):
        log_likelihood(gm.score_fn(sde), sde, x, probes=0)
    with pytest.raises(ValueError, match="t_eps"):
        log_likelihood(gm.score_fn(sde), sde, x, t_eps=0.0)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(gm.score_fn(sde), sde, x, divergence="trace")
    with pytest.raises(ValueError, match="non-finite"):
        log_likelihood(gm.score_fn(sde), sde, torch.full((2, 2), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match=r"\[batch, \.\.\.\]"):
        log_likelihood(gm.score_fn(sde), sde, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_compaction_same_log_prob_less_work(divergence):
    """compact=True drops finished samples from the network calls; the Hutchinson probes follow their samples."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 4, seed=2, scale_range=(0.02, 0.5))  # samples differ in difficulty
    x = gm.sample(16, generator=torch.Generator().manual_seed(1), dtype=F64)
    x[:4] += 0.5  # some in the low-density gaps
    rows = []

    def score(xx, t):
        rows.append(xx.shape[0])
        return gm.score(xx, t, sde)

    kw = dict(divergence=divergence, probes=2, rtol=1e-6, atol=1e-6, time_variable="logsnr")  # uneven steps
    plain = log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(4), **kw)
    rows.clear()
    comp = log_likelihood(score, sde, x, generator=torch.Generator().manual_seed(4), compact=True, **kw)
    torch.testing.assert_close(comp.log_prob, plain.log_prob, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(comp.latent, plain.latent, rtol=1e-11, atol=1e-11)
    assert torch.equal(comp.nfe, plain.nfe) and comp.calls == plain.calls
    assert plain.rows == 16 * plain.calls and comp.rows == sum(rows) < 0.9 * plain.rows
    assert min(rows) < 16
    if divergence == "hutchinson":  # the probes are the same per sample: the per-probe estimates match too
        torch.testing.assert_close(comp.std_error, plain.std_error, rtol=1e-9, atol=1e-11)
    exact = gm.log_prob(x, T_EPS, sde) - gm.log_prob(comp.latent, sde.T, sde) + sde.prior_log_prob(comp.latent)
    if divergence == "exact":
        torch.testing.assert_close(comp.log_prob, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("compact", [False, True])
def test_progress_bar_reaches_the_end_and_changes_nothing(capsys, compact):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 3, seed=5)
    x = gm.sample(6, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(divergence="exact", rtol=1e-6, atol=1e-6, compact=compact)
    quiet = log_likelihood(gm.score_fn(sde), sde, x, **kw)
    capsys.readouterr()
    shown = log_likelihood(gm.score_fn(sde), sde, x, progress=True, **kw)
    err = capsys.readouterr().err
    torch.testing.assert_close(shown.log_prob, quiet.log_prob, rtol=0, atol=0)
    assert torch.equal(shown.nfe, quiet.nfe)
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("log_likelihood: 100%") and "6/6 done" in last, err[-500:]


def test_the_old_argument_order_is_refused_with_the_new_one_named():
    """The 0.1.0 shim log_likelihood(score, x, sde) is gone: a clear TypeError, never a silent swap."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x = gm.sample_marginal(4, 1e-3, sde, generator=torch.Generator().manual_seed(0), dtype=F64)
    new = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", t_eps=1e-3)
    assert bool(torch.isfinite(new.log_prob).all())
    with pytest.raises(TypeError, match=r"log_likelihood\(score, sde, x\)"):
        log_likelihood(gm.score_fn(sde), x, sde, divergence="exact", t_eps=1e-3)
    with pytest.raises(TypeError, match="forward process"):
        log_likelihood(gm.score_fn(sde), x, x)


def test_a_model_that_changes_its_input_in_place_is_told_so():
    """autograd refuses an in-place change of the leaf the divergence differentiates by ("a leaf Variable that
    requires grad is being used in an in-place operation"); the error names the model's in-place change and the
    remedy. Other errors of the model pass unchanged."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 3, seed=0)
    f = gm.score_fn(sde)
    x = gm.sample_marginal(3, 1e-3, sde, generator=torch.Generator().manual_seed(0), dtype=F64)

    def scales(x, t):
        x.mul_(1.0)
        return f(x, t)

    def shifts_a_view(x, t):
        x[:, 0] += 0.0
        return f(x, t)

    eps_net = gm.model(sde, "eps")

    def eps_in_place(x, t):
        x.mul_(1.0)
        return eps_net(x, t)

    models = (scales, shifts_a_view, ss.ScoreModel(eps_in_place, sde, prediction="eps"))
    for model in models:
        for divergence in ("exact", "hutchinson"):
            with pytest.raises(RuntimeError, match=r"the model changes its input in place .*clone the input inside "
                                                   r"the model \(autograd: a (view of a )?leaf Variable"):
                log_likelihood(model, sde, x, divergence=divergence)
    # the same models written out of place run, and give the likelihood of the model they copy
    ref = log_likelihood(f, sde, x, divergence="exact", rtol=1e-6, atol=1e-6)
    out = log_likelihood(lambda x, t: f(x * 1.0, t), sde, x, divergence="exact", rtol=1e-6, atol=1e-6)
    assert torch.equal(out.log_prob, ref.log_prob)

    def fails(x, t):
        raise RuntimeError("a network error")

    with pytest.raises(RuntimeError, match="^a network error$"):
        log_likelihood(fails, sde, x, divergence="exact")
