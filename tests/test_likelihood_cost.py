"""What a likelihood solve costs: the divergences a step does not use are not computed (`RKStepper`'s quadrature),
and on the CPU no batched call runs past the last sample's end (``check_every=None``)."""

import pytest
import torch

import scoresolve as ss
import scoresolve.likelihood as lik
from scoresolve.likelihood import log_likelihood
from scoresolve.solvers.integrate import RKStepper, lean_stages
from scoresolve.solvers.tableaux import BOSH3, DOPRI5, DOPRI5_SHAMPINE, TABLEAUX, TSIT5

F64 = torch.float64
T_EPS = 1e-5
PROCESSES = [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.RectifiedFlow()]
IDS = ["vp", "subvp", "ve", "rf"]


def test_lean_stages_are_those_weighted_zero_in_the_solution_and_the_error():
    assert lean_stages(DOPRI5) == lean_stages(DOPRI5_SHAMPINE) == {1}  # c = 1/5: b_2 = b_hat_2 = 0
    assert lean_stages(TSIT5) == lean_stages(BOSH3) == frozenset()
    for tab in TABLEAUX.values():
        if not tab.adaptive:
            continue
        for j in lean_stages(tab):
            assert 0 < j < tab.stages and tab.b[j] == 0.0 and tab.b_err[j] == 0.0
            assert not (tab.fsal and j == tab.stages - 1)  # the FSAL stage is the next step's first


def _counting(model: ss.ScoreModel):
    """The model, recording for each call whether autograd was on (a divergence) or off (a forward alone)."""
    log = []

    def net(x, t):
        log.append(torch.is_grad_enabled())
        return model.net(x, t)

    return ss.ScoreModel(net, model.sde, prediction=model.prediction, time="t"), log


@pytest.mark.parametrize("sde", PROCESSES, ids=IDS)
@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_skipped_divergences_change_nothing_and_the_log_density_is_exact(sde, divergence, monkeypatch):
    gm = ss.GaussianMixture.random(3, 3, seed=4, scale_range=(0.05, 0.5))
    x = gm.sample(5, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = gm.model(sde, "flow" if sde.velocity_form else "x0")
    kw = dict(divergence=divergence, rtol=1e-8, atol=1e-8, generator=torch.Generator().manual_seed(3))
    fn, log = _counting(model)
    lean = log_likelihood(fn, sde, x, **kw)
    n_lean, grads = len(log), sum(log)
    # without the lean stages (every stage's divergence computed) the arithmetic of the result is the same
    monkeypatch.setattr(lik, "RKStepper", lambda *a, **k: RKStepper(*a, **{**k, "quadrature": False}))
    log.clear()
    kw["generator"] = torch.Generator().manual_seed(3)
    full = log_likelihood(fn, sde, x, **kw)
    assert torch.equal(full.log_prob, lean.log_prob) and torch.equal(full.latent, lean.latent)
    assert torch.equal(full.nfe, lean.nfe) and full.calls == lean.calls == n_lean == len(log)
    assert all(log)  # every call of the full solve differentiates
    # the lean solve runs one call per step attempt (dopri5's stage 2) without autograd: no divergence there
    attempts = int((lean.steps + lean.rejected).max())
    assert n_lean - grads == attempts > 20
    if divergence == "exact":  # against the closed form: log p_{t_eps}(x) - log p_T(z) + log prior(z)
        exact = gm.log_prob(x, T_EPS, sde) - gm.log_prob(lean.latent, sde.T, sde) + sde.prior_log_prob(lean.latent)
        err = (lean.log_prob - exact).abs().max()
        assert err < 1e-5, err


@pytest.mark.parametrize("norms", ["sample", "batch"])
def test_no_batched_call_after_the_last_sample_is_done_on_the_cpu(norms):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 4, seed=2, scale_range=(0.02, 0.5))  # samples differ in difficulty
    x = gm.sample(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    x[:3] += 0.5
    kw = dict(divergence="exact", rtol=1e-5, atol=1e-5, norms=norms, time_variable="logsnr")
    every = log_likelihood(gm.score_fn(sde), sde, x, **kw)  # check_every=None: after every step on the CPU
    assert every.calls == int(every.nfe.max())  # the slowest sample is active in every call, and the last
    if norms == "sample":
        assert every.nfe.min() < every.nfe.max()
    lagged = log_likelihood(gm.score_fn(sde), sde, x, check_every=8, **kw)
    assert torch.equal(lagged.log_prob, every.log_prob) and torch.equal(lagged.nfe, every.nfe)
    assert lagged.calls >= every.calls
    exact = gm.log_prob(x, T_EPS, sde) - gm.log_prob(every.latent, sde.T, sde) + sde.prior_log_prob(every.latent)
    assert ((every.log_prob - exact).abs() / (1 + exact.abs())).max() < 2e-4  # measured 6.5e-5, 1.0e-4 (batch)
