"""Hutchinson probes redrawn after every accepted step (``probes_per="step"``) and the integrator's refresh hook."""

import pytest
import torch

import scoresolve as ss
from scoresolve.likelihood import log_likelihood
from scoresolve.solvers.integrate import RKStepper, integrate, tableau_by_name

F64 = torch.float64


def exact_delta(gm, x, z, sde, t_eps=1e-5):
    return gm.log_prob(x, t_eps, sde) - gm.log_prob(z, sde.T, sde)


@pytest.mark.parametrize("compact", [False, True])
def test_refresh_is_called_once_per_accepted_step_also_under_compaction(compact):
    """refresh counts each sample's accepted steps (but the last) in an argument; the rate argument names the rows
    refresh sees, so each sample's last count is read back whatever rows the compactions moved around: it must equal
    steps - 1. A wrong write-back at a compaction would also give rows the wrong rate, and x the wrong value."""
    rates = torch.tensor([1.0, 30.0, 3.0, 300.0, 10.0], dtype=F64)
    last = {}

    def func(t, y, rate, counter):
        return -rate[:, None] * y  # stiffer rows need more steps and finish later

    def refresh(args, accepted):
        rate, c = args
        c = c + accepted.to(c.dtype)
        last.update(zip(rate.tolist(), c.tolist()))
        return rate, c

    counter = torch.zeros(5, dtype=F64)
    res = integrate(RKStepper(tableau_by_name("dopri5"), 1e-6, 1e-6, reuse_last_stage=False), func,
                    torch.ones(5, 1, dtype=F64), 0.0, 1.0, args=(rates, counter), refresh=refresh, compact=compact,
                    check_every=2)
    assert torch.equal(counter, torch.zeros(5, dtype=F64))  # the caller's tensor is not written into
    torch.testing.assert_close(res.x[:, 0], torch.exp(-rates), rtol=1e-4, atol=1e-6)
    assert res.stats["compactions"] >= (1 if compact else 0)
    assert [last[r] for r in rates.tolist()] == (res.steps - 1).tolist()


def test_refresh_needs_a_stepper_without_fsal():
    with pytest.raises(ValueError, match="reuse_last_stage"):
        integrate(RKStepper(tableau_by_name("dopri5"), 1e-6, 1e-6), lambda t, y, a: -y, torch.ones(2, 1), 0.0, 1.0,
                  args=(torch.zeros(2),), refresh=lambda args, acc: args)


def test_no_fsal_costs_one_evaluation_more_per_step():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(3, 2, dtype=F64)
    a = integrate(RKStepper(tableau_by_name("dopri5"), 1e-8, 1e-8), f, y0, 0.0, 1.0)
    b = integrate(RKStepper(tableau_by_name("dopri5"), 1e-8, 1e-8, reuse_last_stage=False), f, y0, 0.0, 1.0)
    torch.testing.assert_close(a.x, b.x)  # the re-evaluated first stage is the same value
    assert torch.equal(b.nfe - a.nfe, a.steps + a.rejected - 1)


def test_per_step_probes_are_unbiased_and_less_noisy():
    """32 probes on a 16-D correlated mixture: both estimators agree with the exact delta log p within 4 standard
    errors, and per-step probes have well under the standard error of fixed ones (measured 0.50x)."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(16, 4, seed=0, scale_range=(0.05, 0.5), full=True)
    x = gm.sample(6, generator=torch.Generator().manual_seed(1), dtype=F64)
    se = {}
    for per in ("solve", "step"):
        r = log_likelihood(gm.score_fn(sde), sde, x, probes=32, rtol=1e-5, atol=1e-5, probes_per=per,
                           generator=torch.Generator().manual_seed(3))
        ex = exact_delta(gm, x, r.latent, sde)
        z = (r.delta_log_prob - ex) / r.std_error
        assert torch.all(z.abs() < 4), (per, z)
        se[per] = r.std_error
    ratio = float((se["step"].square().mean() / se["solve"].square().mean()).sqrt())
    assert ratio < 0.7, ratio


def test_per_step_probes_work_on_interpolants_and_with_compaction():
    sde = ss.RectifiedFlow()
    gm = ss.GaussianMixture.random(8, 3, seed=2, scale_range=(0.1, 0.5), full=True)
    x = gm.sample(5, generator=torch.Generator().manual_seed(4), dtype=F64)
    flow = ss.ScoreModel(lambda xt, t: gm.flow(xt, t, sde), sde, prediction="flow")
    r = log_likelihood(flow, sde, x, probes=16, rtol=1e-5, atol=1e-5, probes_per="step", compact=True,
                       generator=torch.Generator().manual_seed(5))
    ex = exact_delta(gm, x, r.latent, sde)
    assert torch.all(((r.delta_log_prob - ex) / r.std_error).abs() < 4)


def test_per_step_probes_bad_input():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=1)
    x = gm.sample(2, dtype=F64)
    with pytest.raises(ValueError, match="probes_per"):
        log_likelihood(gm.score_fn(sde), sde, x, probes_per="sample")
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", probes_per="step")
