import pytest
import torch

import scoresolve as ss
from scoresolve.score import PREDICTIONS

F64 = torch.float64


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5, 5), (4, 2, 3, 2, 2)])
def test_parametrization_round_trips_exact(sde, shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor([0.01, 0.3, 0.6, 1.0], dtype=F64)
    a, s = sde.marginal(t)
    da, ds = sde.dalpha_dt(t), sde.dsigma_dt(t)
    xt = sde.perturb(x0, t, noise=eps)
    shp = (-1,) + (1,) * (len(shape) - 1)
    truth = {
        "eps": eps,
        "x0": x0,
        "score": -eps / s.reshape(shp),
        "v": a.reshape(shp) * eps - s.reshape(shp) * x0,
        "flow": da.reshape(shp) * x0 + ds.reshape(shp) * eps,
    }
    for src in PREDICTIONS:
        for dst in PREDICTIONS:
            out = ss.convert(truth[src], src, dst, xt, a, s, da, ds)
            torch.testing.assert_close(out, truth[dst], rtol=1e-11, atol=1e-12)
            back = ss.convert(out, dst, src, xt, a, s, da, ds)
            torch.testing.assert_close(back, truth[src], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_score_model_wraps_any_prediction(pred):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 2, seed=1)

    def net(x, t_in):  # a "network" trained to predict `pred`, with continuous time
        a, s = sde.marginal(t_in)
        da, ds = sde.dalpha_dt(t_in), sde.dsigma_dt(t_in)
        return ss.convert(gm.score(x, t_in, sde), "score", pred, x, a, s, da, ds)

    model = ss.ScoreModel(net, sde, prediction=pred)
    x = torch.randn(5, 3, dtype=F64)
    t = torch.linspace(0.05, 0.95, 5, dtype=F64)
    torch.testing.assert_close(model(x, t), gm.score(x, t, sde), rtol=1e-10, atol=1e-12)
    a, s = sde.marginal(t)
    torch.testing.assert_close(model.eps(x, t), -s[:, None] * gm.score(x, t, sde), rtol=1e-10, atol=1e-12)
    x0 = (x + s[:, None] ** 2 * gm.score(x, t, sde)) / a[:, None]  # Tweedie
    torch.testing.assert_close(model.x0(x, t), x0, rtol=1e-10, atol=1e-10)


def test_time_conventions():
    seen = {}

    def net(x, t_in):
        seen["t"] = t_in
        return torch.zeros_like(x)

    t = torch.tensor([0.25, 0.5], dtype=F64)
    x = torch.zeros(2, 1, dtype=F64)
    vp, ve, disc = ss.VPSDE(), ss.VESDE(), ss.DiscreteVPSDE.linear()
    ss.ScoreModel(net, vp, time="index")(x, t)
    torch.testing.assert_close(seen["t"], t * 999)
    ss.ScoreModel(net, ve, time="sigma")(x, t)
    torch.testing.assert_close(seen["t"], ve.marginal(t)[1])
    ss.ScoreModel(net, ve, time="log_sigma")(x, t)
    torch.testing.assert_close(seen["t"], torch.log(ve.marginal(t)[1]))
    ss.ScoreModel(net, disc, time="discrete")(x, t)
    torch.testing.assert_close(seen["t"], t * 1000 - 1)
    ss.ScoreModel(net, vp, time=lambda t: 2 * t)(x, t)
    torch.testing.assert_close(seen["t"], 2 * t)
    ss.ScoreModel(net, vp)(x, 0.5)  # a float time is broadcast to [batch]
    assert seen["t"].shape == (2,)
    with pytest.raises(ValueError, match="DiscreteVPSDE"):
        ss.ScoreModel(net, vp, time="discrete")
    with pytest.raises(ValueError, match="unknown prediction"):
        ss.ScoreModel(net, vp, prediction="noise")


def test_network_output_checked_and_cast():
    sde = ss.VPSDE()
    x = torch.randn(3, 4)
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="returned shape"):
        ss.ScoreModel(lambda x, t: x[:, :2], sde)(x, t)
    with pytest.raises(ValueError, match="batch size mismatch"):
        ss.ScoreModel(lambda x, t: x, sde)(x, torch.full((2,), 0.5))
    bf16 = ss.ScoreModel(lambda x, t: x.to(torch.bfloat16), sde, prediction="eps")(x, t)
    assert bf16.dtype == torch.float32  # a low-precision network inside a float32 solver
    with pytest.raises(TypeError, match="callable"):
        ss.ScoreModel.wrap(3.0, sde)


def test_classifier_free_guidance_is_parametrization_invariant():
    sde = ss.VPSDE()
    g1, g2 = ss.GaussianMixture.random(2, 2, seed=1), ss.GaussianMixture.random(2, 2, seed=2)
    cond, uncond = g1.score_fn(sde), g2.score_fn(sde)
    x = torch.randn(8, 2, dtype=F64)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    a, s = sde.marginal(t)
    w = 2.5
    mixed = ss.classifier_free_guidance(cond, uncond, w)(x, t)
    torch.testing.assert_close(mixed, (1 + w) * cond(x, t) - w * uncond(x, t))
    # mixing x0 predictions then converting gives the same score
    x0c, x0u = (ss.convert(f(x, t), "score", "x0", x, a, s) for f in (cond, uncond))
    torch.testing.assert_close(ss.convert((1 + w) * x0c - w * x0u, "x0", "score", x, a, s), mixed)
    torch.testing.assert_close(ss.classifier_free_guidance(cond, uncond, 0.0)(x, t), cond(x, t))


def test_classifier_guidance_gives_tilted_score():
    """Data N(m, S) and log p(y | x_t) = w.x_t + c: the guided score is the score of p_t(x) exp(gamma w.x),
    the Gaussian N(a m + gamma C w, C) with C = a^2 S + s^2 I."""
    sde = ss.VPSDE()
    m, S = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 0.8], dtype=F64)
    gm = ss.GaussianMixture([1.0], m[None], S[None])
    w, gamma = torch.tensor([1.5, -0.7], dtype=F64), 2.0
    guided = ss.classifier_guidance(gm.score_fn(sde), lambda x, t: x @ w + 3.0, gamma)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    x = torch.randn(3, 2, dtype=F64)
    a, s = sde.marginal(t)
    C = a[:, None] ** 2 * S + s[:, None] ** 2
    expected = -(x - a[:, None] * m - gamma * C * w) / C
    torch.testing.assert_close(guided(x, t), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "dopri5", "euler_maruyama"])
def test_guided_sampling_reaches_the_tilted_distribution(solver):
    """Data N(m, S) (diagonal) tilted by p(y | x0) ~ exp(w.x0) is N(m + S w, S). The exact noisy classifier
    log p(y | x_t) = log E[exp(w.x0) | x_t] is linear in x_t with gradient alpha S w / (alpha^2 S + sigma^2), and
    score + that gradient is the score of the tilted marginal; so every sampler driven by the guided score must end
    at N(alpha (m + S w), alpha^2 S + sigma^2)."""
    sde = ss.VPSDE()
    m, S = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 0.8], dtype=F64)
    w = torch.tensor([1.0, -0.5], dtype=F64)
    gm = ss.GaussianMixture([1.0], m[None], S[None])

    def log_p_y(x, t):
        alpha, sigma = sde.marginal(t)
        C = alpha[:, None] ** 2 * S + sigma[:, None] ** 2
        return (x * (alpha[:, None] * S * w / C)).sum(1)

    guided = ss.classifier_guidance(gm.score_fn(sde), log_p_y, 1.0)
    tilted = ss.GaussianMixture([1.0], (m + S * w)[None], S[None])
    n, t_eps = 4000, 1e-3
    x_T = tilted.sample_marginal(n, sde.T, sde, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = {"rtol": 1e-5, "atol": 1e-5} if solver == "dopri5" else {"nfe": 200 if solver == "euler_maruyama" else 20}
    sol = ss.sample(guided, sde, x_T, solver=solver, t_eps=t_eps, generator=torch.Generator().manual_seed(1), **kw)
    mean, var = tilted.mean(t_eps, sde), torch.diagonal(tilted.cov(t_eps, sde))
    assert torch.all((sol.x.mean(0) - mean).abs() < 4 * torch.sqrt(var / n) + 0.01), (sol.x.mean(0), mean)
    assert torch.all((sol.x.var(0) / var - 1).abs() < 0.1), (sol.x.var(0), var)
    unguided = gm.mean(t_eps, sde)
    assert torch.all((mean - unguided).abs() > 0.2)  # the tilt is large enough for the test to tell them apart
