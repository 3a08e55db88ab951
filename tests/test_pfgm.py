"""PFGM / PFGM++ (scoresolve.pfgm) on the exact point-cloud model (scoresolve.pointcloud): the kernel and its
sampling, the closed-form prior, sampling through the ODE, log_likelihood against the closed-form log-density, the
D -> inf limit against EDM, and the refusals of the solvers that need a Gaussian kernel or a reverse SDE."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import scoresolve as ss

F64 = torch.float64


def _cloud(N=4, K=3, seed=0, event=None):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(K, N, generator=g, dtype=F64) * 1.5
    w = torch.tensor([0.5, 0.3, 0.2][:K] + [0.1] * max(0, K - 3), dtype=F64)
    if event is not None:
        pts = pts.reshape(K, *event)
    return ss.PointCloud(pts, w)


def test_construction_names_and_errors():
    p = ss.sde_from_name("pfgmpp", D=8)
    assert isinstance(p, ss.PFGMPP) and isinstance(p, ss.Process) and p.D == 8 and p.T == 80.0
    assert ss.sde_from_name("pfgm").D == 1.0 and ss.PFGM().T == 40.0
    # not in SDE_NAMES (ForwardSDEs only): `scoresolve train --sde pfgmpp` takes it from models.train.PROCESSES
    assert "pfgmpp" not in ss.SDE_NAMES and "pfgm" not in ss.SDE_NAMES
    with pytest.raises(ValueError, match="unknown sde 'pfgm3'.*pfgmpp"):
        ss.sde_from_name("pfgm3")
    assert p.capabilities() == {"smooth_in_t"}
    for bad in (dict(D=0), dict(D=float("inf")), dict(sigma_min=1.0, sigma_max=0.5), dict(N=0)):
        with pytest.raises(ValueError):
            ss.PFGMPP(**bad)
    with pytest.raises(ValueError, match="N = 5"):
        ss.PFGMPP(D=8, N=5).prior_log_prob(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="overflowed"):  # D = 0.01: radii beyond float32, an error and not inf
        ss.PFGMPP(D=0.01).perturb(torch.zeros(20000, 2), 1.0, torch.Generator().manual_seed(0))
    grid = p.karras_grid(18)
    assert grid.shape == (19,) and float(grid[0]) == pytest.approx(80) and float(grid[-1]) == pytest.approx(0.002)


@pytest.mark.parametrize("D", [1.0, 3.0, 8.0, 128.0, 1e7])
def test_kernel_sampling_matches_the_kernel(D):
    """B = R^2 / (R^2 + r^2) ~ Beta(N/2, D/2) (KS test), uniform direction, E|x - y|^2 = N r^2 / (D - 2)."""
    p = ss.PFGMPP(D=D)
    g = torch.Generator().manual_seed(1)
    event, n = (2, 3), 4000
    N = 6
    y = torch.randn(n, *event, generator=g, dtype=F64)
    sigma = torch.rand(n, generator=g, dtype=F64) + 0.5  # per-sample sigma
    x = p.perturb(y, sigma, g)
    assert x.shape == y.shape
    R2 = (x - y).flatten(1).square().sum(1)
    r2 = (sigma**2) * D
    B = (R2 / (R2 + r2)).numpy()
    assert stats.kstest(B, stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3
    u = ((x - y).flatten(1) / R2.sqrt()[:, None]).mean(0)
    assert float(u.abs().max()) < 4 / math.sqrt(N * n) * 1.5
    if D > 4:  # finite variance of |x - y|^2 as well: a mean test on R^2 / sigma^2 = N D / (D - 2)
        ratio = R2 / sigma**2
        se = float(ratio.std()) / math.sqrt(n)
        assert abs(float(ratio.mean()) - N * D / (D - 2)) < 4 * se


@pytest.mark.parametrize("D", [1.0, 2.5, 8.0, 128.0, 2048.0])
def test_prior_log_prob_is_the_multivariate_t_and_normalised(D):
    """The kernel at sigma is scipy's multivariate t with D degrees of freedom and scale sigma^2 I."""
    p = ss.PFGMPP(D=D, sigma_max=3.0)
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    ref = stats.multivariate_t(loc=np.zeros(5), shape=9.0 * np.eye(5), df=D).logpdf(z.numpy())
    torch.testing.assert_close(p.prior_log_prob(z), torch.from_numpy(ref), rtol=0, atol=1e-10)
    # normalised: 1-D quadrature (D = 1: up to the Cauchy tail beyond |x| = 4e4, 2 r / (pi 4e4) = 4.8e-5)
    xs = torch.linspace(-4e4, 4e4, 4_000_001, dtype=F64)
    mass = float(torch.trapezoid(p.prior_log_prob(xs[:, None]).exp(), xs))
    assert abs(mass - 1) < (1e-4 if D == 1.0 else 1e-8)


def test_prior_sample_has_the_prior_law_and_any_shape():
    p = ss.PFGMPP(D=8, sigma_max=80.0)
    z = p.prior_sample((3000, 2, 2, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert z.shape == (3000, 2, 2, 2) and z.dtype == F64
    r2 = z.flatten(1).square().sum(1)
    B = (r2 / (r2 + 80.0**2 * 8)).numpy()
    assert stats.kstest(B, stats.beta(4, 4).cdf).pvalue > 1e-3
    z2 = p.prior_sample((3000, 2, 2, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(z, z2)  # the generator alone decides


@pytest.mark.parametrize("D", [1.0, 8.0, 2048.0])
def test_point_cloud_score_is_the_gradient_of_its_log_density(D):
    p = ss.PFGMPP(D=D)
    cloud = _cloud(N=4, event=(2, 2))
    x = torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64, requires_grad=True)
    for s in (0.01, 0.5, 30.0):
        (grad,) = torch.autograd.grad(cloud.log_prob(x, s, p).sum(), x)
        torch.testing.assert_close(cloud.score(x, s, p), grad, rtol=1e-10, atol=1e-12)
    x = x.detach()
    # the posterior mean is the nearest point where x is within << 1 of it at small sigma (the kernel's tails are
    # polynomial: elsewhere it does not concentrate), and tends to the weighted mean at large sigma
    near = cloud.points[torch.arange(6) % 3]
    xn = near + 1e-3 * torch.randn(near.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(cloud.x0(xn, 1e-6, p), near, rtol=0, atol=1e-8)
    mean = (cloud.weights[:, None, None] * cloud.points).sum(0)
    assert float((cloud.x0(x, 1e5, p) - mean).abs().max()) < 1e-3


def test_the_gaussian_limit_is_edm():
    """D = 1e7: kernel, log-density, posterior mean and score agree with the Gaussian (EDM / VE) ones."""
    p, edm = ss.PFGMPP(D=1e7), ss.EDMSDE()
    cloud = _cloud(N=6)
    for s in (0.05, 0.7, 5.0, 60.0):  # x typical at s: the log-densities differ by O((|x - y|^2 / s^2)^2 / D)
        x = cloud.sample_marginal(20, s, edm, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(cloud.log_prob(x, s, p), cloud.log_prob(x, s, edm), rtol=0, atol=1e-4)
        torch.testing.assert_close(cloud.x0(x, s, p), cloud.x0(x, s, edm), rtol=0, atol=1e-5)
        torch.testing.assert_close(cloud.score(x, s, p), cloud.score(x, s, edm), rtol=1e-4, atol=1e-6)


def _check_law_at_t_eps(cloud, p, x, t_eps):
    """x ~ p_{t_eps}: the mass per point (nearest point) within 4 standard errors of the weights, and the distance
    to the nearest point has the kernel's law at t_eps (KS test on B = R^2 / (R^2 + r^2) ~ Beta(N/2, D/2); the
    points lie ~1 apart, far beyond r), so the fraction farther than 0.05 is the kernel's tail (4% for D = 1, N = 2:
    the samples converge to the points only in the kernel's sense)."""
    batch, N = x.shape[0], cloud.dim
    idx = cloud.nearest(x)
    R2 = (x - cloud.points[idx]).flatten(1).square().sum(1)
    r2 = t_eps**2 * p.D
    law = stats.beta(N / 2, p.D / 2)
    assert stats.kstest((R2 / (R2 + r2)).numpy(), law.cdf).pvalue > 1e-3
    tail = law.sf(0.0025 / (0.0025 + r2))
    far = float((R2 > 0.0025).double().mean())
    assert abs(far - tail) < 4 * math.sqrt(tail * (1 - tail) / batch) + 1e-9, (far, tail)
    counts = torch.bincount(idx, minlength=cloud.points.shape[0]).double() / batch
    se = (cloud.weights * (1 - cloud.weights) / batch).sqrt()
    assert bool(((counts - cloud.weights).abs() < 4 * se).all()), (counts, cloud.weights)


@pytest.mark.parametrize("D", [1.0, 8.0, 128.0])
@pytest.mark.parametrize("N", [2, 8])
def test_ode_sampling_converges_to_the_exact_law(D, N):
    p = ss.PFGMPP(D=D)
    cloud = _cloud(N=N, seed=N)
    x_T = p.prior_sample((500, N), generator=torch.Generator().manual_seed(5), dtype=F64)
    model = cloud.model(p)
    runs = (("euler", dict(grid=p.karras_grid(150))), ("heun", dict(grid=p.karras_grid(30))),
            ("dopri5", dict(rtol=1e-5, atol=1e-5, t_eps=p.sigma_min)))
    for solver, kw in runs:
        out = ss.sample(model, p, x_T, solver=solver, **kw)
        assert torch.isfinite(out.x).all()
        _check_law_at_t_eps(cloud, p, out.x, p.sigma_min)
    assert float(out.nfe.double().mean()) < 300  # dopri5


@pytest.mark.parametrize("D", [1.0, 8.0, 128.0, 2048.0])
def test_log_likelihood_agrees_with_the_closed_form(D):
    """log p_{t_eps}(x) = log p_T(z) + int div: with the exact p_T of the cloud in place of the prior, the ODE's
    log-density agrees with the closed form within 1e-4 nats (float64, exact divergence)."""
    p = ss.PFGMPP(D=D, sigma_max=20.0)
    cloud = _cloud(N=4)
    t_eps = 0.05
    x = cloud.sample_marginal(6, t_eps, p, generator=torch.Generator().manual_seed(7))
    res = ss.log_likelihood(cloud.model(p), p, x, divergence="exact", rtol=1e-9, atol=1e-9, t_eps=t_eps)
    torch.testing.assert_close(res.prior_log_prob, p.prior_log_prob(res.latent), rtol=0, atol=1e-12)
    exact_T = cloud.log_prob(res.latent, p.T, p)
    got = exact_T + res.delta_log_prob
    torch.testing.assert_close(got, cloud.log_prob(x, t_eps, p), rtol=0, atol=1e-4)
    h = ss.log_likelihood(cloud.model(p), p, x, divergence="hutchinson", probes=8, rtol=1e-6, atol=1e-6,
                          t_eps=t_eps, generator=torch.Generator().manual_seed(0))
    assert bool(((h.log_prob - res.log_prob).abs() < 5 * h.std_error + 1e-6).all())


def test_large_D_agrees_with_edm_in_samples_and_log_likelihood():
    p, edm = ss.PFGMPP(D=1e7), ss.EDMSDE()
    cloud = _cloud(N=5)
    x_T = edm.prior_sample((50, 5), generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = p.karras_grid(25)
    a = ss.sample(cloud.model(p), p, x_T, solver="heun", grid=grid)
    b = ss.sample(cloud.model(edm), edm, x_T, solver="heun", grid=grid)
    assert float((a.x - b.x).abs().max()) < 1e-4
    x = cloud.sample_marginal(4, 0.05, edm, generator=torch.Generator().manual_seed(1))
    kw = dict(divergence="exact", rtol=1e-8, atol=1e-8, t_eps=0.05)
    la = ss.log_likelihood(cloud.model(p), p, x, **kw)
    lb = ss.log_likelihood(cloud.model(edm), edm, x, **kw)
    torch.testing.assert_close(la.log_prob, lb.log_prob, rtol=0, atol=1e-4)
    torch.testing.assert_close(la.prior_log_prob, edm.prior_log_prob(la.latent), rtol=0, atol=1e-4)


def test_gaussian_and_reverse_sde_solvers_are_refused_by_capability():
    p = ss.PFGMPP(D=8)
    cloud = _cloud(N=3)
    x_T = p.prior_sample((4, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    model = cloud.model(p)
    for solver, kw, cap in (("dpmpp_2m", {"nfe": 10}, "gaussian_kernel"), ("ddim", {"nfe": 10}, "gaussian_kernel"),
                            ("ddim", {"nfe": 10, "eta": 1.0}, "reverse_sde"),
                            ("euler_maruyama", {"nfe": 10}, "reverse_sde"), ("unipc", {"nfe": 10}, "gaussian_kernel"),
                            ("euler", {"nfe": 10, "diffusion": 1.0}, "reverse_sde")):
        with pytest.raises(ss.IncompatibleProcessError, match=f"'{cap}'") as info:
            ss.sample(model, p, x_T, solver=solver, t_eps=0.01, **kw)
        assert "heun" in info.value.fitting
    with pytest.raises(ss.IncompatibleProcessError, match="grid 'karras' requires the capability 'gaussian_kernel'"):
        ss.sample(model, p, x_T, solver="heun", nfe=10, grid="karras", t_eps=0.01)
    cv = ss.GaussianControlVariate.from_data(torch.randn(8, 3, dtype=F64))
    with pytest.raises(ss.IncompatibleProcessError, match="control_variate"):
        ss.log_likelihood(model, p, x_T, control_variate=cv)
    # a model of another prediction has no meaning under this kernel: a clear error, not a wrong answer
    eps_model = ss.ScoreModel(lambda x, t: x, p, prediction="eps")
    with pytest.raises(ValueError, match="x0 \\(denoiser\\) prediction"):
        ss.sample(eps_model, p, x_T, solver="euler", nfe=5, t_eps=0.01)
    # denoise: the x0 model's own prediction at the end; a plain callable (no stated prediction) is told what to do
    grid = p.karras_grid(8)
    out = ss.sample(model, p, x_T, solver="heun", grid=grid, denoise=True)
    torch.testing.assert_close(out.x, cloud.x0(ss.sample(model, p, x_T, solver="heun", grid=grid).x, grid[-1], p))
    with pytest.raises(ValueError, match="no Gaussian marginal"):
        ss.sample(lambda x, t: cloud.x0(x, t, p), p, x_T, solver="heun", grid=grid, denoise=True)


def test_edm_view_integrators_are_exact_in_the_linear_part():
    """One point: x0_hat = y for every x, sigma, so the ODE's solution is y + (s / t)(x_t - y); the (alpha, sigma)
    integrators on the EDM view give it to rounding, in any number of steps."""
    p = ss.PFGMPP(D=8)
    view = p.edm_view()
    y = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64)
    cloud = ss.PointCloud(y)
    x_T = view.prior_sample((5, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = y + (p.sigma_min / p.sigma_max) * (x_T - y)
    model = ss.ScoreModel(lambda x, t: cloud.x0(x, t, p), view, prediction="x0")
    for solver in ("ddim", "dpmpp_2m", "unipc", "deis"):
        out = ss.sample(model, view, x_T, solver=solver, nfe=3, grid="karras", t_eps=p.sigma_min)
        torch.testing.assert_close(out.x, exact, rtol=0, atol=1e-10)


def test_edm_view_solvers_converge_to_the_pfgm_ode_and_keep_its_prior():
    p = ss.PFGMPP(D=8)
    view = p.edm_view()
    assert view.T == p.T and view.capabilities() == {"gaussian_kernel", "smooth_in_t"}
    cloud = _cloud(N=4, seed=4)
    x_T = p.prior_sample((400, 4), generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(view.prior_log_prob(x_T), p.prior_log_prob(x_T), rtol=0, atol=0)
    ref = ss.sample(cloud.model(p), p, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=p.sigma_min).x
    model = ss.ScoreModel(lambda x, t: cloud.x0(x, t, p), view, prediction="x0")
    for solver, tol40 in (("unipc", 1e-5), ("dpmpp_2m", 1e-4), ("ddim", 1e-3)):
        med = []
        for nfe in (10, 20, 40):
            out = ss.sample(model, view, x_T, solver=solver, nfe=nfe, grid="karras", t_eps=p.sigma_min)
            med.append(float((out.x - ref).norm(dim=1).median()))  # (a few samples near basin boundaries switch)
        assert med[0] > med[1] > med[2] and med[2] < tol40, (solver, med)
    _check_law_at_t_eps(cloud, p, out.x, p.sigma_min)
    # no reverse SDE: the stochastic samplers are refused by capability
    for solver, kw in (("euler_maruyama", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {})):
        with pytest.raises(ss.IncompatibleProcessError, match="'reverse_sde'"):
            ss.sample(model, view, x_T, solver=solver, nfe=10, t_eps=p.sigma_min, **kw)
    # log_likelihood on the view (the Gaussian split of the divergence) is PFGM++'s, prior included
    x = cloud.sample_marginal(4, 0.05, p, generator=torch.Generator().manual_seed(1))
    kw = dict(divergence="exact", rtol=1e-9, atol=1e-9, t_eps=0.05)
    torch.testing.assert_close(ss.log_likelihood(model, view, x, **kw).log_prob,
                               ss.log_likelihood(cloud.model(p), p, x, **kw).log_prob, rtol=0, atol=1e-6)


@pytest.mark.parametrize("D", [1.0, 128.0])
def test_64_dims_sampling_law_and_log_likelihood(D):
    p = ss.PFGMPP(D=D, sigma_max=20.0)
    cloud = _cloud(N=64, seed=64)
    x_T = p.prior_sample((400, 64), generator=torch.Generator().manual_seed(5), dtype=F64)
    out = ss.sample(cloud.model(p), p, x_T, solver="heun", grid=p.karras_grid(30))
    _check_law_at_t_eps(cloud, p, out.x, p.sigma_min)
    x = cloud.sample_marginal(2, 0.05, p, generator=torch.Generator().manual_seed(7))
    res = ss.log_likelihood(cloud.model(p), p, x, divergence="exact", rtol=1e-9, atol=1e-9, t_eps=0.05)
    got = cloud.log_prob(res.latent, p.T, p) + res.delta_log_prob
    torch.testing.assert_close(got, cloud.log_prob(x, 0.05, p), rtol=0, atol=1e-4)
