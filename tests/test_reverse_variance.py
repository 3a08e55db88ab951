"""Reverse variances: DDPM's beta and beta-tilde, Analytic-DPM's optimum, its bounds, the moment estimate and its
store."""


import pytest
import torch

import scoresolve as ss
from scoresolve.reverse_variance import (
    MomentEstimate,
    analytic_variance,
    base_variance,
    cached_moments,
    estimate_moments,
    forward_variance,
    load_moments,
    moments_key,
    posterior_variance,
    reverse_variance,
    variance_bounds,
)

SDE = ss.DiscreteVPSDE.linear(1000)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)


def _abar(n):
    return torch.where(n == 0, torch.ones((), dtype=torch.float64), ABAR[(n - 1).clamp(min=0)])


def test_ddpm_variances_on_the_knots():
    n = torch.arange(1, 1001)
    t, s = n.double() / 1000, (n - 1).double() / 1000
    beta = forward_variance(SDE, t, s)
    tilde = posterior_variance(SDE, t, s)
    torch.testing.assert_close(beta, BETAS, rtol=1e-10, atol=0)
    ref = (1 - _abar(n - 1)) / (1 - _abar(n)) * BETAS
    torch.testing.assert_close(tilde, ref, rtol=1e-9, atol=1e-300)
    assert float(tilde[0]) == 0.0  # beta-tilde_1 = 0: x_0 is known given (x_1, x_0)


def test_skip_step_variances_match_the_reference_formulas():
    r, q = torch.tensor([1000, 500, 37]), torch.tensor([900, 100, 1])  # steps r -> q of a subsequence
    skip_alpha = _abar(r) / _abar(q)
    skip_beta = 1 - skip_alpha
    t, s = r.double() / 1000, q.double() / 1000
    torch.testing.assert_close(forward_variance(SDE, t, s), skip_beta, rtol=1e-9, atol=0)
    torch.testing.assert_close(posterior_variance(SDE, t, s),
                               skip_beta * (1 - _abar(q)) / (1 - _abar(r)), rtol=1e-9, atol=0)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_analytic_variance_is_the_papers_formula(eta):
    """sigma*^2 = lambda^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda^2))^2 (1 - Gamma_n)
    (shared/REFERENCES.md, Analytic-DPM), alpha_n = alpha_bar_n / alpha_bar_{n-1}: written independently here."""
    r, q = torch.tensor([1000, 500, 37, 2]), torch.tensor([900, 100, 1, 1])
    gamma = torch.tensor([0.999, 0.9, 0.5, 0.1], dtype=torch.float64)
    ab_r, ab_q = _abar(r), _abar(q)
    lam2 = eta**2 * (1 - ab_q) / (1 - ab_r) * (1 - ab_r / ab_q)
    ref = lam2 + (torch.sqrt((1 - ab_r) / (ab_r / ab_q)) - torch.sqrt(1 - ab_q - lam2)) ** 2 * (1 - gamma)
    got = analytic_variance(SDE, r.double() / 1000, q.double() / 1000, gamma, eta)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(base_variance(SDE, r.double() / 1000, q.double() / 1000, eta), lam2, rtol=1e-9, atol=0)


def test_bounds_and_clipping():
    t, s = torch.tensor([0.5, 0.9]), torch.tensor([0.3, 0.1])
    lo, hi = variance_bounds(SDE, t, s)
    torch.testing.assert_close(analytic_variance(SDE, t, s, torch.zeros(2)), hi)  # Gamma = 0: the upper bound
    torch.testing.assert_close(analytic_variance(SDE, t, s, torch.ones(2)), lo)   # Gamma = 1: lambda^2
    torch.testing.assert_close(analytic_variance(SDE, t, s, torch.full((2,), 1.3)), lo)   # clipped below
    torch.testing.assert_close(analytic_variance(SDE, t, s, torch.full((2,), -0.2)), hi)  # clipped above
    lo_r, hi_r = variance_bounds(SDE, t, s, data_range=(-1, 1))
    assert bool((hi_r < hi).all()) and torch.equal(lo_r, lo)  # [a, b] = [-1, 1] is tighter at these noise levels
    torch.testing.assert_close(analytic_variance(SDE, t, s, torch.zeros(2), data_range=(-1, 1)), hi_r)
    assert bool((lo < hi).all())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="earlier time"):
        forward_variance(SDE, 0.3, 0.5)
    with pytest.raises(ValueError, match="moments"):
        reverse_variance("analytic", SDE, 0.5, 0.4)
    with pytest.raises(ValueError, match="unknown variance"):
        reverse_variance("small", SDE, 0.5, 0.4)
    with pytest.raises(ValueError, match="finite"):
        analytic_variance(SDE, 0.5, 0.4, float("nan"))
    with pytest.raises(ValueError, match="data_range"):
        analytic_variance(SDE, 0.5, 0.4, 0.5, data_range=(1, -1))


def _gm():
    return ss.GaussianMixture.random(dim=3, num_components=3, seed=1, scale_range=(0.1, 0.5), full=False)


def test_moment_estimate_matches_the_exact_posterior():
    """Gamma = 1 - (alpha/sigma)^2 E tr Cov(x_0 | x_t) / d with the mixture's exact posterior covariance (a
    low-variance estimate of the same number), against estimate_moments with the exact eps network."""
    gm, sde = _gm(), ss.VPSDE()
    data = gm.sample(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = torch.tensor([0.05, 0.3, 0.7])
    est = estimate_moments(gm.model(sde, "eps"), sde, data, times, num_samples=3000, seed=3)
    assert est.num_samples == 3000 and est.evaluations == 9000
    x0 = gm.sample(20000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for i, t in enumerate(times.tolist()):
        xt = sde.perturb(x0, t, generator=torch.Generator().manual_seed(i))
        a, s = sde.marginal(torch.tensor(t, dtype=torch.float64))
        exact = 1 - (a / s) ** 2 * gm._posterior(xt, t, sde)[1].mean() / gm.dim
        assert abs(float(est.gamma[i]) - float(exact)) < 4 * float(est.std_error[i]) + 2e-3
    again = estimate_moments(gm.model(sde, "eps"), sde, data, times, num_samples=3000, seed=3)
    assert torch.equal(again.gamma, est.gamma)  # a pure function of the arguments


def test_moment_lookup_interpolates_and_refuses_outside():
    est = MomentEstimate(t=torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64),
                         gamma=torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64), num_samples=1, evaluations=3)
    torch.testing.assert_close(est.at(torch.tensor([0.1, 0.15, 0.3, 0.4])),
                               torch.tensor([0.2, 0.3, 0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="covers"):
        est.at(0.5)


class _EpsNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.9))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.scale * x


def test_moments_are_saved_and_reused(tmp_path):
    sde = ss.VPSDE()
    net = _EpsNet()
    model = ss.ScoreModel(net, sde, prediction="eps")
    data = torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(0))
    times = torch.linspace(0.1, 1.0, 10)
    est = cached_moments(model, sde, data, times, num_samples=4, directory=tmp_path)
    calls = net.calls
    assert calls > 0 and len(list(tmp_path.glob("*.json"))) == 1
    again = cached_moments(model, sde, data, times, num_samples=4, directory=tmp_path)
    assert net.calls == calls  # loaded, not recomputed
    torch.testing.assert_close(again.gamma, est.gamma)
    assert again.num_samples == 4 and again.evaluations == 40
    key = moments_key(model, sde, times, 4, data=data)
    assert again.name == key and load_moments(key, tmp_path).t.numel() == 10
    with torch.no_grad():
        net.scale.fill_(0.5)  # another network: another key
    assert moments_key(model, sde, times, 4, data=data) != key
    assert moments_key(model, sde, times, 10, data=data) != key
    # the same network read as x0 (or at another time scale) predicts another eps: another key
    key = moments_key(model, sde, times, 4, data=data)
    for other in (dict(prediction="x0"), dict(time="index")):
        assert moments_key(ss.ScoreModel(net, sde, **{"prediction": "eps", **other}), sde, times, 4, data=data) != key
    with pytest.raises(FileNotFoundError):
        load_moments("nothing-here", tmp_path)


def test_the_moment_store_names_its_records_alike_on_save_and_load(tmp_path):
    est = MomentEstimate(t=torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64),
                         gamma=torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64), num_samples=4, evaluations=12)
    messages = []
    for action in (lambda: est.save("-bad", tmp_path), lambda: load_moments("-bad", tmp_path)):
        with pytest.raises(ValueError, match="^a moment estimate name must be ") as info:
            action()
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    with pytest.raises(FileNotFoundError, match="no saved moment estimate 'absent'"):
        load_moments("absent", tmp_path)
