import math

import pytest
import torch

import scoresolve as ss

F64 = torch.float64
ALL_SDES = [
    ss.VPSDE(),
    ss.SubVPSDE(),
    ss.VESDE(),
    ss.CosineVPSDE(),
    ss.DiscreteVPSDE.linear(),
    ss.VPSDE(beta_min=0.0, beta_max=5.0, T=2.0),
    ss.EDMSDE(),
]
IDS = ["vp", "subvp", "ve", "cosine", "discrete", "vp-b0-0", "edm"]


def grid(sde, n=50, lo=1e-5):
    return torch.linspace(lo, sde.T, n, dtype=F64)


def test_vp_closed_forms():
    sde = ss.VPSDE()
    t = grid(sde)
    log_alpha = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    a, s = sde.marginal(t)
    torch.testing.assert_close(a, torch.exp(log_alpha), rtol=1e-14, atol=0)
    torch.testing.assert_close(s, torch.sqrt(1 - torch.exp(2 * log_alpha)), rtol=1e-10, atol=0)
    torch.testing.assert_close(sde.diffusion(t), torch.sqrt(0.1 + t * 19.9), rtol=1e-14, atol=0)
    x = torch.randn(len(t), 3, dtype=F64)
    torch.testing.assert_close(sde.drift(x, t), -0.5 * (0.1 + t * 19.9)[:, None] * x)
    # defaults of Song et al. 2021
    assert (sde.beta_min, sde.beta_max, sde.T) == (0.1, 20.0, 1.0)


def test_subvp_closed_forms():
    sde = ss.SubVPSDE()
    t = grid(sde)
    a_vp, _ = ss.VPSDE().marginal(t)
    a, s = sde.marginal(t)
    torch.testing.assert_close(a, a_vp, rtol=1e-14, atol=0)
    torch.testing.assert_close(s, 1 - a_vp**2, rtol=1e-10, atol=0)  # no square root
    g2 = (0.1 + t * 19.9) * (1 - torch.exp(-2 * 0.1 * t - 19.9 * t**2))
    torch.testing.assert_close(sde.diffusion(t) ** 2, g2, rtol=1e-10, atol=0)


def test_ve_closed_forms():
    sde = ss.VESDE()
    t = grid(sde)
    a, s = sde.marginal(t)
    assert torch.all(a == 1)
    torch.testing.assert_close(s, 0.01 * (50 / 0.01) ** t, rtol=1e-13, atol=0)
    torch.testing.assert_close(sde.diffusion(t), s * math.sqrt(2 * math.log(5000)), rtol=1e-13, atol=0)
    x = torch.randn(len(t), 2, dtype=F64)
    assert torch.all(sde.drift(x, t) == 0)
    assert sde.marginal(0.0)[1].item() == pytest.approx(0.01)  # score_sde's convention sigma(0+) = sigma_min


def test_cosine_schedule_closed_form():
    sde = ss.CosineVPSDE()
    t = grid(sde)
    s = 0.008
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    a, sig = sde.marginal(t)
    torch.testing.assert_close(a**2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(sig**2, 1 - abar, rtol=1e-9, atol=1e-15)


def test_discrete_schedule_matches_ddpm_knots():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    ac = torch.cumprod(1 - betas, 0)
    for sde in (ss.DiscreteVPSDE(betas=betas), ss.DiscreteVPSDE(alphas_cumprod=ac), ss.DiscreteVPSDE.linear()):
        t_knots = torch.arange(1, 1001, dtype=F64) / 1000
        a, _ = sde.marginal(t_knots)
        torch.testing.assert_close(a**2, ac, rtol=1e-12, atol=0)
        torch.testing.assert_close(sde.timestep(t_knots), torch.arange(1000, dtype=F64), rtol=0, atol=1e-9)
    # the continuous VP (0.1, 20) is the N -> infinity limit of linear DDPM
    t = torch.linspace(0.01, 1, 30, dtype=F64)
    a_d, _ = ss.DiscreteVPSDE.linear().marginal(t)
    a_c, _ = ss.VPSDE().marginal(t)
    assert torch.max(torch.abs(a_d / a_c - 1)) < 0.05
    assert torch.max(torch.abs(torch.log(a_d) - torch.log(a_c))) < 0.02 + 0.01 * 10


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_log_snr_inverse_round_trip(sde):
    t = torch.cat([torch.logspace(-5, -1, 20, dtype=F64), torch.linspace(0.1, 1, 40, dtype=F64)[1:]]) * sde.T
    lam = sde.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    back = sde.t_from_log_snr(lam)
    assert torch.max(torch.abs(back / t - 1)) <= 1e-6
    # float32 round trip, a looser relative tolerance where lambda is large
    t32 = t.float()[t > 1e-3]
    back32 = sde.t_from_log_snr(sde.log_snr(t32))
    assert torch.max(torch.abs(back32 / t32 - 1)) <= 2e-3


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_marginals_consistent_with_drift_and_diffusion(sde):
    """d log alpha / dt = f(t) and d sigma^2 / dt = 2 f sigma^2 + g^2 (the moment ODEs of the linear SDE)."""
    t = torch.linspace(0.02, sde.T * 0.98, 37, dtype=F64)
    if isinstance(sde, ss.DiscreteVPSDE):
        t = (torch.floor(t * 1000) + 0.5) / 1000  # inside segments, where beta is constant
    t.requires_grad_(True)
    a, s = sde.marginal(t)
    if a.requires_grad:
        (dloga,) = torch.autograd.grad(torch.log(a).sum(), t, retain_graph=True)
    else:  # alpha is constant (VE)
        dloga = torch.zeros_like(t)
    (ds2,) = torch.autograd.grad((s**2).sum(), t)
    t = t.detach()
    f, g = sde.drift_coef(t), sde.diffusion(t)
    torch.testing.assert_close(dloga, f, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ds2, 2 * f * s.detach() ** 2 + g**2, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.EDMSDE()], ids=["vp", "subvp", "ve", "edm"])
def test_marginal_matches_euler_maruyama_simulation(sde):
    """Simulate the forward SDE with fine EM steps; mean and variance match alpha, sigma within MC error."""
    g = torch.Generator().manual_seed(0)
    n, steps, t_end = 40000, 2000, 0.6
    x0 = torch.tensor([1.5, -0.5], dtype=F64).expand(n, 2).clone()
    if isinstance(sde, ss.VESDE):
        x = x0 + sde.sigma_min * torch.randn(n, 2, generator=g, dtype=F64)  # the VE convention (REFERENCES.md)
    else:
        x = x0.clone()
    dt = t_end / steps
    for i in range(steps):
        t = torch.tensor(i * dt, dtype=F64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t) * math.sqrt(dt) * torch.randn(n, 2, generator=g, dtype=F64)
    a, s = sde.marginal(t_end)
    mean_err = (x.mean(0) - a * x0[0]).abs()
    se = s / math.sqrt(n)
    assert torch.all(mean_err < 4 * se + 2e-3 * a), (mean_err, se)
    var = x.var(0)
    assert torch.all((var / s**2 - 1).abs() < 4 * math.sqrt(2 / n) + 3e-3), var / s**2


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4, 4), (5, 2, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_time_forms(sde, shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    tb = torch.linspace(0.1, 0.9, shape[0], dtype=dtype) * sde.T
    for t in (0.5 * sde.T, torch.tensor(0.5 * sde.T), tb):
        d = sde.drift(x, t)
        assert d.shape == x.shape and d.dtype == dtype
        xt = sde.perturb(x, t)
        assert xt.shape == x.shape and xt.dtype == dtype
    # per-sample times: row i uses its own alpha, sigma
    noise = torch.randn(shape, dtype=dtype)
    xt = sde.perturb(x, tb, noise=noise)
    a, s = sde.marginal(tb)
    for i in (0, shape[0] - 1):
        torch.testing.assert_close(xt[i], a[i] * x[i] + s[i] * noise[i])
    z = sde.prior_sample(shape, dtype=dtype)
    lp = sde.prior_log_prob(z)
    assert lp.shape == (shape[0],) and lp.dtype == dtype


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(sigma_max=7.0), ss.EDMSDE(T=7.0)], ids=["vp", "ve", "edm"])
def test_prior_log_prob_is_exact(sde):
    z = sde.prior_sample((1000, 2, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    std = torch.tensor(sde.prior_std, dtype=F64)
    ref = torch.distributions.Normal(torch.zeros((), dtype=F64), std).log_prob(z).sum((1, 2))
    torch.testing.assert_close(sde.prior_log_prob(z), ref, rtol=1e-12, atol=1e-10)
    assert z.std().item() == pytest.approx(sde.prior_std, rel=0.03)


def test_prior_matches_marginal_at_T():
    for sde in (ss.VPSDE(), ss.VESDE(), ss.EDMSDE()):
        a, s = sde.marginal(sde.T)
        assert a.item() < 0.01 or isinstance(sde, (ss.VESDE, ss.EDMSDE))  # VE processes keep alpha = 1
        assert s.item() == pytest.approx(sde.prior_std, rel=1e-3)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="beta_min must be < beta_max"):
        ss.VPSDE(beta_min=20, beta_max=0.1)
    with pytest.raises(ValueError, match="beta_min must be < beta_max"):
        ss.SubVPSDE(beta_min=1.0, beta_max=1.0)
    with pytest.raises(ValueError, match="beta_min must be >= 0"):
        ss.VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_min must be > 0"):
        ss.VESDE(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max must be > sigma_min"):
        ss.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="T must be"):
        ss.VPSDE(T=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        ss.DiscreteVPSDE()
    with pytest.raises(ValueError, match="strictly decreasing"):
        ss.DiscreteVPSDE(alphas_cumprod=[0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ss.DiscreteVPSDE(betas=[0.1, 1.5])


def test_bad_time_and_shapes_raise():
    sde = ss.VPSDE()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T\]"):
        sde.marginal(1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T\]"):
        sde.drift(x, torch.tensor([0.1, 0.2, -0.3, 0.4]))
    with pytest.raises(ValueError, match="batch size mismatch"):
        sde.drift(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="batch size mismatch"):
        sde.perturb(x, torch.full((5,), 0.5))
    with pytest.raises(ValueError, match=r"\[batch, \.\.\.\]"):
        sde.drift(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match="noise shape"):
        sde.perturb(x, 0.5, noise=torch.randn(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        sde.drift(torch.ones(4, 3, dtype=torch.long), 0.5)
