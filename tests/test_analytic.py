import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

import scoresolve as ss

F64 = torch.float64


def torch_mixture(gm, t, sde):
    a, s = sde.marginal(torch.tensor(t, dtype=F64))
    if gm.evecs is None:
        covs = torch.diag_embed(gm.evals)
    else:
        covs = gm.evecs @ torch.diag_embed(gm.evals) @ gm.evecs.transpose(1, 2)
    C = a**2 * covs + s**2 * torch.eye(gm.dim, dtype=F64)
    return MixtureSameFamily(Categorical(gm.weights), MultivariateNormal(a * gm.means, C))


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("full", [True, False])
def test_log_prob_and_score_match_torch_distributions(sde, full):
    gm = ss.GaussianMixture.random(4, 3, seed=5, full=full)
    torch.manual_seed(0)
    for t in (0.0, 1e-3, 0.3, 1.0):
        ref = torch_mixture(gm, t, sde)
        x = ref.sample((64,)).requires_grad_(True)
        lp_ref = ref.log_prob(x)
        (score_ref,) = torch.autograd.grad(lp_ref.sum(), x)
        torch.testing.assert_close(gm.log_prob(x.detach(), t, sde), lp_ref.detach(), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(gm.score(x.detach(), t, sde), score_ref, rtol=1e-8, atol=1e-8)


def test_laplacian_matches_autograd_hessian_trace():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 3, seed=2)
    x = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9], dtype=F64)
    lap = gm.laplacian(x, t, sde)
    for i in range(5):
        ti = t[i : i + 1]
        H = torch.autograd.functional.hessian(lambda y, ti=ti: gm.log_prob(y[None], ti, sde).sum(), x[i])
        assert lap[i].item() == pytest.approx(torch.trace(H).item(), rel=1e-8, abs=1e-8)
    # and the exact PF-ODE divergence built from it
    pf = sde.probability_flow(gm.score_fn(sde))
    xg = x.clone().requires_grad_(True)
    v = pf.drift(xg, t)
    div = sum(torch.autograd.grad(v[:, j].sum(), xg, retain_graph=True)[0][:, j] for j in range(3))
    torch.testing.assert_close(gm.pf_ode_divergence(x, t, sde), div, rtol=1e-9, atol=1e-9)


def test_sampling_moments_and_image_event_shape():
    gm = ss.GaussianMixture.random(6, 3, seed=4, event_shape=(1, 2, 3))
    x = gm.sample(100000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert x.shape == (100000, 1, 2, 3)
    xf = x.flatten(1)
    C = gm.cov()
    se = torch.sqrt(torch.diagonal(C) / x.shape[0])
    assert torch.all((xf.mean(0) - gm.mean()).abs() < 4.5 * se)
    assert torch.allclose(torch.cov(xf.T), C, atol=0.03)
    sde = ss.VPSDE()
    xt = gm.sample_marginal(100000, 0.4, sde, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.allclose(torch.cov(xt.flatten(1).T), gm.cov(0.4, sde), atol=0.03)
    assert gm.score(xt[:4], 0.4, sde).shape == (4, 1, 2, 3)


def test_pf_ode_flow_is_exact():
    """For one Gaussian the flow map is linear; check it against a fine fixed-step solve and its inverse."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 1, seed=3)
    x = torch.randn(4, 3, dtype=F64)
    y = gm.pf_ode_flow(x, 1.0, 0.01, sde)
    torch.testing.assert_close(gm.pf_ode_flow(y, 0.01, 1.0, sde), x, rtol=1e-12, atol=1e-12)
    sol = ss.sample(gm.score_fn(sde), sde, x, solver="rk4", steps=1000, grid="logsnr", t_eps=0.01)
    torch.testing.assert_close(sol.x, y, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="single Gaussian"):
        ss.GaussianMixture.random(3, 2).pf_ode_flow(x, 1.0, 0.01, sde)


def test_bad_mixtures_raise():
    with pytest.raises(ValueError, match="components"):
        ss.GaussianMixture([0.5, 0.5], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="symmetric"):
        ss.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="semi-definite"):
        ss.GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, -1.0]])
    with pytest.raises(ValueError, match="event_shape"):
        ss.GaussianMixture([1.0], [[0.0, 0.0]], event_shape=(3,))
    gm = ss.GaussianMixture([1.0], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="event shape"):
        gm.log_prob(torch.zeros(2, 3), 0.5, ss.VPSDE())
