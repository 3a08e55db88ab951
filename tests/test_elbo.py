"""The discrete-time variational bound: its terms in closed form on Gaussian data, the optimal variance's claims on an
exact Gaussian mixture (Monte Carlo, differences resolved by their standard errors), decoders, batch independence."""

import math

import pytest
import torch

import scoresolve as ss
from scoresolve.reverse_variance import MomentEstimate
from scoresolve.variational import ElboStatistics, bound, chain_times, elbo, elbo_statistics, optimal_steps

SDE = ss.DiscreteVPSDE.linear(1000)
KS = (2, 5, 10, 100, 1000)


# ----------------------------------------------------------------------------------------------------------------
# Gaussian data N(m, diag(c)): E ||eps - E[eps | x_t]||^2 = (alpha/sigma)^2 sum_i c_i sigma^2 / (alpha^2 c_i + sigma^2)
# is exact, so the *expected* bound of the exact model is a closed form: no Monte Carlo noise at all.
# ----------------------------------------------------------------------------------------------------------------
C = torch.tensor([0.01, 0.04, 0.25, 1.0], dtype=torch.float64)
M = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
LOGP = float(-0.5 * 4 * math.log(2 * math.pi) - 0.5 * torch.log(C).sum() - 0.5 * 4)  # E log N(x; m, diag c)


def _expected_stats(sde, K, num_timesteps=None):
    times, counters = chain_times(sde, K, num_timesteps)
    a, s = sde.marginal(times[1:])
    err2 = (a / s) ** 2 * (C[None] * s[:, None] ** 2 / (a[:, None] ** 2 * C[None] + s[:, None] ** 2)).sum(1)
    x0 = torch.zeros(1, 4, dtype=torch.float64)
    x0[0, 0] = (M.square().sum() + C.sum()).sqrt()  # the prior term needs E ||x_0||^2 only
    stats = ElboStatistics(times, counters, x0, err2[None], x0, K)
    return stats, MomentEstimate(t=times[1:], gamma=1 - err2 / 4, num_samples=0, evaluations=0)


@pytest.mark.parametrize("sde", [SDE, ss.VPSDE(), ss.SubVPSDE(), ss.CosineVPSDE()], ids=["ddpm", "vp", "subvp", "cos"])
def test_expected_bound_on_gaussian_data(sde):
    """Closed form at every K: the optimal variance beats beta and beta-tilde, is the maximiser (x0.8 and x1.25 lose
    exactly sum_k d/2 (log f + 1/f - 1) when the decoder variance is optimal too), stays below E log p (Gibbs), and
    the bound tightens as K grows."""
    prev = -math.inf
    for K in KS:
        stats, mom = _expected_stats(sde, K)
        ddpm = {v: float(bound(stats, sde, v, moments=mom).elbo) for v in ("beta", "beta_tilde", "analytic")}
        assert ddpm["analytic"] >= ddpm["beta"] - 1e-12 and ddpm["analytic"] >= ddpm["beta_tilde"] - 1e-12
        opt = bound(stats, sde, "analytic", moments=mom, decoder_variance="analytic")
        assert float(opt.elbo) >= ddpm["analytic"]
        for f in (0.8, 1.25):
            loss = float(opt.elbo - bound(stats, sde, opt.variances * f).elbo)
            assert loss == pytest.approx(K * 4 / 2 * (math.log(f) + 1 / f - 1), rel=1e-9)
        assert float(opt.elbo) < LOGP
        assert float(opt.elbo) > prev
        prev = float(opt.elbo)
    assert LOGP - prev < 0.05  # K = N = 1000: nearly tight (0.0125 nats on the DDPM schedule)


def test_expected_bound_matches_the_published_ordering():
    """beta-tilde is catastrophic at few steps and beta at many; their gap to the optimum shrinks with K."""
    gaps = []
    for K in (10, 1000):
        stats, mom = _expected_stats(SDE, K)
        b = {v: float(bound(stats, SDE, v, moments=mom).elbo) for v in ("beta", "beta_tilde", "analytic")}
        gaps.append((b["analytic"] - b["beta"], b["analytic"] - b["beta_tilde"]))
    assert gaps[0][1] > 100 * gaps[0][0] > 0  # K = 10: beta-tilde far worse than beta
    assert gaps[1][0] < gaps[0][0] and gaps[1][1] < gaps[0][1]


# ----------------------------------------------------------------------------------------------------------------
# A Gaussian mixture with its exact eps network: the Monte Carlo bound and its claims, resolved by standard errors.
# ----------------------------------------------------------------------------------------------------------------
GM = ss.GaussianMixture.random(dim=4, num_components=3, seed=0, scale_range=(0.1, 0.5), full=False)
B = 1000


def _exact_moments(times, m=200):
    """Gamma_t from the mixture's exact posterior covariance, averaged over m draws of x_t per time."""
    x0 = GM.sample(m * times.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tr = times.repeat_interleave(m)
    xt = SDE.perturb(x0, tr, generator=torch.Generator().manual_seed(6))
    a, s = SDE.marginal(times)
    cov = GM._posterior(xt, tr, SDE)[1].reshape(times.numel(), m).mean(1)
    return MomentEstimate(t=times, gamma=1 - (a / s) ** 2 * cov / GM.dim, num_samples=m, evaluations=0)


@pytest.fixture(scope="module")
def mixture_bounds():
    x = GM.sample(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = GM.model(SDE, "eps")
    out = {}
    for K in (2, 5, 10, 100):
        stats = elbo_statistics(model, SDE, x, K)
        mom = _exact_moments(stats.times[1:])
        res = {v: bound(stats, SDE, v, moments=mom) for v in ("beta", "beta_tilde", "analytic")}
        res["opt"] = bound(stats, SDE, "analytic", moments=mom, decoder_variance="analytic")
        for f in (0.8, 1.25):
            res[f] = bound(stats, SDE, res["opt"].variances * f)
        out[K] = res
    return GM.log_prob(x, 0.0, SDE), out


def _paired(a, b):
    d = a - b
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def test_optimal_variance_on_a_mixture(mixture_bounds):
    """Mean bound (nats) with the optimal variance >= with beta and beta-tilde at every K, and x0.8 / x1.25 lower it
    by a difference of at least 3 standard errors (paired: the same x_0 and x_k draws for every variance)."""
    _, out = mixture_bounds
    for K, res in out.items():
        for other in ("beta", "beta_tilde"):
            diff, se = _paired(res["analytic"].elbo, res[other].elbo)
            assert diff > 3 * se, (K, other, diff, se)
        for f in (0.8, 1.25):
            diff, se = _paired(res["opt"].elbo, res[f].elbo)
            assert diff > 3 * se, (K, f, diff, se)


def test_gibbs_on_a_mixture(mixture_bounds):
    """The mean bound stays below the mean exact log-density (ELBO <= log p_theta, and E log p_theta <= E log p by
    Gibbs). Resolved where the gap exceeds the noise (K <= 10); within 3 standard errors at K = 100, where the
    closed-form Gaussian test above puts the true gap near 0.1 nats, below this noise."""
    logp, out = mixture_bounds
    for K, res in out.items():
        diff, se = _paired(res["opt"].elbo, logp)
        if K <= 10:
            assert diff < -3 * se, (K, diff, se)
        else:
            assert diff < 3 * se, (K, diff, se)


def test_monte_carlo_statistics_match_their_expectation():
    """The drawn ||eps - eps_hat||^2 of single-Gaussian data averages to the closed form of the tests above."""
    gm = ss.GaussianMixture([1.0], M[None], C[None])
    x = gm.sample(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stats = elbo_statistics(gm.model(SDE, "eps"), SDE, x, 5)
    exact, _ = _expected_stats(SDE, 5)
    se = stats.err2.std(0) / math.sqrt(x.shape[0])
    assert bool(((stats.err2.mean(0) - exact.err2[0]).abs() < 4 * se).all())


def test_parts_and_units():
    gm = ss.GaussianMixture([1.0], M[None], C[None])
    x = gm.sample(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = elbo(gm.model(SDE, "eps"), SDE, x, 10, variance="beta")
    assert r.terms.shape == (8, 9) and r.variances.shape == (10,) and r.nfe == 10
    torch.testing.assert_close(r.nll, r.prior + r.terms.sum(1) + r.decoder)
    torch.testing.assert_close(r.elbo, -r.nll)
    torch.testing.assert_close(r.bits_per_dim, r.nll / (4 * math.log(2)))
    r17 = elbo(gm.model(SDE, "eps"), SDE, x, 10, variance="beta", num_levels=17, data_range=(-1, 1))
    torch.testing.assert_close(r17.bits_per_dim, r.bits_per_dim + math.log2(17 / 2))  # dequantized data offset


def test_batch_independent():
    x = GM.sample(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = GM.model(SDE, "eps")
    full = elbo(model, SDE, x, 20, variance="beta", seeds=torch.arange(100, 112))
    part = elbo(model, SDE, x[5:9], 20, variance="beta", seeds=torch.arange(105, 109), batch_size=7)
    torch.testing.assert_close(part.elbo, full.elbo[5:9], rtol=1e-12, atol=1e-12)


def test_subsequences_share_the_chains_draws():
    x = GM.sample(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = GM.model(SDE, "eps")
    whole = elbo_statistics(model, SDE, x, 1000)
    times, _ = chain_times(SDE, 25)
    torch.testing.assert_close(whole.subset(times).err2, elbo_statistics(model, SDE, x, 25).err2)


def test_the_function_and_its_module_have_their_own_names():
    """``scoresolve.elbo`` is the function; its module is ``scoresolve.variational`` (a module named ``elbo`` was
    shadowed by the function: ``scoresolve.elbo.bound`` raised AttributeError)."""
    import pkgutil
    import types

    import scoresolve.variational as var

    assert ss.elbo is var.elbo and ss.ElboResult is var.ElboResult and ss.variational is var
    assert var.bound is bound and var.chain_times is chain_times and var.ElboStatistics is ElboStatistics
    # no name of the package is both a submodule and something else
    submodules = {m.name for m in pkgutil.iter_modules(ss.__path__)}
    assert "elbo" not in submodules and "variational" in submodules
    shadowed = {n for n in submodules & set(dir(ss)) if not isinstance(getattr(ss, n), types.ModuleType)}
    assert not shadowed


def test_chain_times():
    times, n = chain_times(SDE, 10)
    assert n.tolist() == [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]  # Bao et al.'s even trajectory
    torch.testing.assert_close(times[1:], n.double() / 1000)
    assert float(times[0]) == 0.0
    assert chain_times(SDE, 1000)[1].tolist() == list(range(1, 1001))
    cos = ss.CosineVPSDE()
    t, n = chain_times(cos, 4, num_timesteps=100)
    torch.testing.assert_close(t, torch.tensor([0, 1, 34, 67, 100], dtype=torch.float64) * cos.T / 100)
    t, n = chain_times(SDE, torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64))
    assert t.tolist() == [0.0, 0.1, 0.5, 1.0] and n.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="steps must lie"):
        chain_times(SDE, 1001)
    with pytest.raises(ValueError, match="contradicts"):
        chain_times(SDE, 10, num_timesteps=500)
    with pytest.raises(ValueError, match="increase"):
        chain_times(SDE, torch.tensor([0.5, 0.1]))


def test_discretized_decoder():
    """Ho et al.'s decoder: bin probabilities of the Gaussian (edge bins to +-inf) sum to 1 over the levels and
    match the normal CDF; data off the grid is refused."""
    from scoresolve.variational import _log_bin_prob

    L, rng = 5, (-1.0, 1.0)
    grid = torch.linspace(-1, 1, L, dtype=torch.float64)
    mean = torch.full((L,), 0.3, dtype=torch.float64)
    std = torch.tensor(0.4, dtype=torch.float64)
    p = _log_bin_prob(grid, mean, std, L, rng).exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    N = torch.distributions.Normal(torch.tensor(0.3, dtype=torch.float64), std)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert float(p[2]) == pytest.approx(float(N.cdf(f64(0.25)) - N.cdf(f64(-0.25))), rel=1e-6)
    assert float(p[0]) == pytest.approx(float(N.cdf(f64(-0.75))), rel=1e-6)
    far = _log_bin_prob(torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-30.0, 0.0]), std, L, rng)
    assert bool(torch.isfinite(far).all()) and float(far[0]) < -1000  # deep tail, no -inf
    with pytest.raises(ValueError, match="grid"):
        _log_bin_prob(torch.tensor([0.1], dtype=torch.float64), mean[:1], std, L, rng)
    x = grid[torch.tensor([0, 1, 2, 3, 4, 4, 2, 1])].reshape(2, 4)
    r = elbo(GM.model(SDE, "eps"), SDE, x, 10, variance="beta", decoder="discretized", num_levels=L, data_range=rng)
    assert bool(torch.isfinite(r.elbo).all())
    torch.testing.assert_close(r.bits_per_dim, r.nll / (4 * math.log(2)))  # a probability: no offset


def test_bad_input_is_refused():
    x = torch.zeros(2, 4, dtype=torch.float64)
    model = GM.model(SDE, "eps")
    with pytest.raises(ValueError, match="sigma\\(0\\) = 0"):
        elbo(GM.model(ss.VESDE(), "eps"), ss.VESDE(), x, 5)
    with pytest.raises(ValueError, match="eta > 0"):
        elbo(model, SDE, x, 5, variance="beta", eta=0.0)
    with pytest.raises(ValueError, match="moments"):
        elbo(model, SDE, x, 5, variance="analytic")
    with pytest.raises(ValueError, match="num_levels"):
        elbo(model, SDE, x, 5, variance="beta", decoder="discretized")
    with pytest.raises(ValueError, match="one value per step"):
        elbo(model, SDE, x, 5, variance=torch.ones(3))
    with pytest.raises(ValueError, match="seeds"):
        elbo(model, SDE, x, 5, variance="beta", seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="> 0"):
        elbo(model, SDE, x, 5, variance=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------------------------------------------
# Sampling with these variances. For isotropic Gaussian data N(m, c I) the reverse kernel q(x_s | x_t) of the
# DDIM(eta) family is Gaussian with exactly the family's mean and the analytic variance, so ancestral sampling from
# x_T ~ p_T with the analytic variance (exact Gamma) has the exact marginal at every grid time, for any step count.
# ----------------------------------------------------------------------------------------------------------------
def _gaussian_problem(grid):
    c, m = 0.09, torch.tensor([0.8, -0.5], dtype=torch.float64)
    gm = ss.GaussianMixture([1.0], m[None], torch.tensor([c], dtype=torch.float64))
    sde = ss.VPSDE()
    a, s = sde.marginal(grid)
    mom = MomentEstimate(t=grid.flip(0), gamma=(s**2 / (a**2 * c + s**2)).flip(0), num_samples=0, evaluations=0)
    x_T = gm.sample_marginal(20000, float(grid[0]), sde, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    return gm, sde, mom, x_T, c, m


@pytest.mark.parametrize("solver,eta", [("reverse_diffusion", None), ("ddim", 1.0), ("ddim", 0.0)])
def test_analytic_variance_sampling_is_exact_on_gaussian_data(solver, eta):
    grid = torch.tensor([0.8, 0.3, 0.05, 0.01], dtype=torch.float64)  # 3 coarse steps
    gm, sde, mom, x_T, c, m = _gaussian_problem(grid)
    kw = {} if eta is None else {"eta": eta}
    a, s = (float(v) for v in sde.marginal(grid[-1]))
    want = a**2 * c + s**2
    seeds = torch.arange(x_T.shape[0])
    out = {}
    wrong = ("beta", "beta_tilde") if eta != 0.0 else (None, "beta")  # DDIM(0)'s own: no noise at all
    for variance in ("analytic",) + wrong:
        sol = ss.sample(gm.model(sde, "eps"), sde, x_T, solver=solver, grid=grid, variance=variance, moments=mom,
                        seeds=seeds, **kw)
        out[variance] = sol.x.var(0).mean().item()
        if variance == "analytic":
            torch.testing.assert_close(sol.x.mean(0), a * m, atol=4 * math.sqrt(want / 20000), rtol=0)
    se = want * math.sqrt(2 / 40000)  # std of a variance estimate from 2 x 20000 values
    assert abs(out["analytic"] - want) < 4 * se
    for variance in wrong:  # 0.024 (beta-tilde), 0.39 (beta), 0.037 (DDIM) against 0.092
        assert abs(out[variance] - want) > 10 * se, variance


def test_variance_names_and_options():
    gm = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
    sde = ss.VPSDE()
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0))
    model = gm.model(sde, "eps")
    seeds = torch.arange(16)
    kw = dict(steps=6, seeds=seeds)
    for new, old in (("beta", "forward"), ("beta_tilde", "posterior")):
        a = ss.sample(model, sde, x_T, solver="reverse_diffusion", variance=new, **kw).x
        b = ss.sample(model, sde, x_T, solver="reverse_diffusion", variance=old, **kw).x
        assert torch.equal(a, b)
    a = ss.sample(model, sde, x_T, solver="ddim", eta=1.0, variance="beta_tilde", **kw).x
    b = ss.sample(model, sde, x_T, solver="ddim", eta=1.0, **kw).x
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # DDPM's posterior variance is DDIM's eta = 1
    capped = ss.sample(model, sde, x_T, solver="reverse_diffusion", last_std=0.0, **kw).x
    mean_only = ss.sample(model, sde, x_T, solver="reverse_diffusion", steps=6, seeds=seeds, save_trajectory=True)
    assert not torch.equal(capped, mean_only.x)  # the last step's noise is gone
    with pytest.raises(ValueError, match="moments"):
        ss.sample(model, sde, x_T, solver="ddim", eta=0.5, variance="analytic", **kw)
    with pytest.raises(ValueError, match="variance must be one of"):
        ss.sample(model, sde, x_T, solver="ddim", variance="forward", **kw)
    mom = MomentEstimate(t=torch.tensor([0.5, 1.0], dtype=torch.float64), gamma=torch.tensor([0.5, 0.9]),
                         num_samples=1, evaluations=2)
    with pytest.raises(ValueError, match="covers"):
        ss.sample(model, sde, x_T, solver="ddim", variance="analytic", moments=mom, **kw)


def test_benchmark_smoke(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "elbo.py"), "--num", "2", "--chain", "20", "--ks", "5", "20",
           "--moment-samples", "2", "--samples", "6", "--sample-ks", "4", "--no-ode", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(root), "SCORESOLVE_MOMENT_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 20 |" in proc.stdout and "Analytic-DDIM (eta = 0)" in proc.stdout
    assert len(list(tmp_path.glob("moments-*.json"))) == 1  # the moment estimate was saved


def test_cli_bound_elbo(tmp_path, monkeypatch, capsys):
    """`scoresolve likelihood --bound elbo` on the shipped digits model: the bound through the resumable dataset
    evaluation (a rerun resumes: same records, no new network work), the moment estimate cached; a mixture is a
    usage error."""
    import json

    from scoresolve.cli import main

    monkeypatch.setenv("SCORESOLVE_MOMENT_DIR", str(tmp_path / "moments"))
    args = ["likelihood", "--model", "digits", "--bound", "elbo", "--elbo-steps", "4", "--num-timesteps", "8",
            "--moment-samples", "2", "--num-samples", "3", "--batch-size", "2", "--out-dir", str(tmp_path / "run"),
            "--quiet", "--threads", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "elbo(steps=4" in first and "mean NFE 4.0" in first
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(list((tmp_path / "moments").glob("*.json"))) == 1
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == res
    with pytest.raises(SystemExit) as e:
        main(["likelihood", "--bound", "elbo", "--out-dir", str(tmp_path / "mix")])
    assert e.value.code == 2


def test_optimal_trajectory():
    """The DP's subsequence is the brute-force optimum of the summed log(v*/lambda^2) on a small chain, and on
    Gaussian data (closed form) its expected bound beats the even subsequence's."""
    import itertools

    from scoresolve.reverse_variance import analytic_variance, base_variance

    sde, N = ss.VPSDE(), 8
    ts = chain_times(sde, N, num_timesteps=N)[0][1:]
    mom = MomentEstimate(t=ts, gamma=torch.linspace(0.3, 0.999, N, dtype=torch.float64), num_samples=0,
                         evaluations=0)

    def cost(path):
        return float(torch.log(analytic_variance(sde, path[1:], path[:-1], mom.at(path[1:]))
                               / base_variance(sde, path[1:], path[:-1])).sum())

    for K in (2, 3, 5):
        brute = min(cost(ts[[0, *c, N - 1]]) for c in itertools.combinations(range(1, N - 1), K - 2))
        dp = optimal_steps(sde, mom, K, num_timesteps=N)
        assert dp.numel() == K and float(dp[0]) == float(ts[0]) and float(dp[-1]) == float(ts[-1])
        assert cost(dp) == pytest.approx(brute, rel=1e-12)
    assert torch.equal(optimal_steps(sde, mom, N, num_timesteps=N), ts)
    full, mom = _expected_stats(sde, 200, 200)
    even, _ = _expected_stats(sde, 10, 200)
    path = optimal_steps(sde, mom, 10, num_timesteps=200)
    sub = full.subset(torch.cat([torch.zeros(1, dtype=torch.float64), path]))
    b_dp, b_even = (float(bound(st, sde, "analytic", moments=mom).elbo) for st in (sub, even))
    assert b_dp > b_even + 0.1, (b_dp, b_even)


def test_optimal_trajectory_leaves_a_noisy_tail_to_even_steps():
    """A Monte Carlo Gamma > 1 near T would make a one-step jump from T look free; that tail is spaced evenly."""
    from scoresolve.reverse_variance import analytic_variance, base_variance

    sde, N = ss.VPSDE(), 100
    ts = chain_times(sde, N, num_timesteps=N)[0][1:]
    g = torch.linspace(0.3, 0.999, N, dtype=torch.float64)
    g[90] = 1.001  # position 90 = n 91: the tail is n > 100 - 2 * 10 = 80
    mom = MomentEstimate(t=ts, gamma=g, num_samples=0, evaluations=0)
    path = optimal_steps(sde, mom, 10, num_timesteps=N)
    n = (path * N).round().long()
    assert n.numel() == 10 and int(n[0]) == 1 and int(n[-1]) == N and bool((n[1:] > n[:-1]).all())
    assert int((n > 80).sum()) >= 1 and int((n <= 80).sum()) >= 2
    tail = n[n > 80]
    assert tail.tolist() == sorted({round(N - (N - 80) / tail.numel() * k) for k in range(tail.numel())})
    # without the guard the DP's summed cost would count the jump from n = 91 as free:
    assert float(analytic_variance(sde, ts[90], ts[10], g[90])) == float(base_variance(sde, ts[90], ts[10]))


def test_saved_moments_by_name(tmp_path, monkeypatch):
    """A saved moment estimate is found by name by the bound and by the samplers (like grid='tuned:<name>')."""
    monkeypatch.setenv("SCORESOLVE_MOMENT_DIR", str(tmp_path))
    grid = torch.tensor([0.8, 0.3, 0.05, 0.01], dtype=torch.float64)
    gm, sde, mom, x_T, _, _ = _gaussian_problem(grid)
    mom.save("gauss")
    x_T, model, seeds = x_T[:64], gm.model(sde, "eps"), torch.arange(64)
    a = ss.sample(model, sde, x_T, solver="ddim", grid=grid, variance="analytic", moments=mom, seeds=seeds).x
    b = ss.sample(model, sde, x_T, solver="ddim", grid=grid, variance="analytic", moments="gauss", seeds=seeds).x
    assert torch.equal(a, b)
    x = gm.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = grid.flip(0)
    e1 = elbo(model, sde, x, steps, "analytic", moments=mom)
    e2 = elbo(model, sde, x, steps, "analytic", moments="gauss")
    assert torch.equal(e1.elbo, e2.elbo)
