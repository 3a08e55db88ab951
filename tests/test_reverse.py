import math

import pytest
import torch

import scoresolve as ss

F64 = torch.float64
SDES = [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE()]
IDS = ["vp", "subvp", "ve"]


def mixture(dim=3, seed=0):
    return ss.GaussianMixture.random(dim, 3, seed=seed, scale_range=(0.2, 0.8))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_probability_flow_satisfies_continuity_equation(sde):
    """d/dt log p_t(x) = -div v(x, t) - v . grad log p_t(x) for the derived PF-ODE drift v (fixed x)."""
    gm = mixture()
    pf = sde.probability_flow(gm.score_fn(sde))
    g = torch.Generator().manual_seed(3)
    for t0 in (0.05, 0.3, 0.7):
        x = gm.sample_marginal(16, t0, sde, generator=g, dtype=F64)
        t = torch.full((16,), t0, dtype=F64)
        h = 1e-5
        dlogp_dt = (gm.log_prob(x, t + h, sde) - gm.log_prob(x, t - h, sde)) / (2 * h)
        xg = x.clone().requires_grad_(True)
        v = pf.drift(xg, t)
        div = sum(torch.autograd.grad(v[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
        rhs = -div - (v * gm.score(x, t, sde)).sum(1)
        rel = (dlogp_dt - rhs.detach()).abs() / (dlogp_dt.abs() + rhs.detach().abs() + 1e-3)
        assert rel.max() <= 1e-4, rel.max()


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_reverse_family_drift_and_diffusion(sde):
    gm = mixture(2)
    score = gm.score_fn(sde)
    x = torch.randn(6, 2, dtype=F64)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    f, g2 = sde.drift(x, t), sde.diffusion(t) ** 2
    sc = score(x, t)
    for c in (0.0, 0.5, 1.0, 2.0):
        proc = sde.reverse(score, c)
        torch.testing.assert_close(proc.drift(x, t), f - 0.5 * (1 + c**2) * g2[:, None] * sc)
        torch.testing.assert_close(proc.diffusion(t), c * g2.sqrt())
        assert proc.is_ode == (c == 0)
    # s(t) as a callable
    proc = sde.reverse(score, lambda t: 0.3 * torch.ones_like(t))
    torch.testing.assert_close(proc.drift(x, t), f - 0.5 * (g2 + 0.09)[:, None] * sc)
    assert not proc.is_ode
    with pytest.raises(ValueError, match=">= 0"):
        sde.reverse(score, -1.0)


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(sigma_max=20.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_reverse_sde_reproduces_data_moments(sde, scale):
    """From exact p_T, many small EM steps of the s = scale * g member reach p_{t_eps}'s mean and covariance."""
    gm = ss.GaussianMixture([0.3, 0.7], [[1.0, -1.0], [-0.5, 0.8]], [[0.3, 0.1], [0.2, 0.4]])
    proc = sde.reverse(gm.score_fn(sde), scale)
    g = torch.Generator().manual_seed(7)
    n, t_eps, steps = 20000, 1e-3, 1000
    x = gm.sample_marginal(n, sde.T, sde, generator=g, dtype=F64)
    # uniform grid in log-SNR keeps the steps small where the score varies fast
    ts = ss.time_grid(sde, steps, "logsnr", t_eps)
    for i in range(steps):
        t, h = ts[i], ts[i] - ts[i + 1]
        tb = t.expand(n)
        x = x - h * proc.drift(x, tb) + proc.diffusion(t) * h.sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
    m, C = gm.mean(t_eps, sde), gm.cov(t_eps, sde)
    se = torch.sqrt(torch.diagonal(C) / n)
    assert torch.all((x.mean(0) - m).abs() < 4 * se + 0.01), (x.mean(0), m)
    Ce = torch.cov(x.T)
    tol = 4 * math.sqrt(2 / n) * torch.sqrt(torch.outer(torch.diagonal(C), torch.diagonal(C))) + 0.02
    assert torch.all((Ce - C).abs() < tol), (Ce, C)
