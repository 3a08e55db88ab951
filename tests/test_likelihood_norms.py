"""log_likelihood(..., norms="batch"): one step size for the whole batch (torchdiffeq's and flow_matching's rule)."""

import pytest
import torch

import scoresolve as ss
from scoresolve.likelihood import log_likelihood

F64 = torch.float64
T_EPS = 1e-5


def _problem(sde):
    gm = ss.GaussianMixture.random(3, 4, seed=2, scale_range=(0.02, 0.5))  # samples differ in difficulty
    x = gm.sample(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    x[:3] += 0.5  # some in the low-density gaps
    return gm, x


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.RectifiedFlow()], ids=["vp", "rf"])
@pytest.mark.parametrize("norms", ["sample", "batch"])
def test_both_modes_meet_the_tolerance_against_the_exact_log_density(sde, norms):
    gm = ss.GaussianMixture.random(3, 4, seed=2, scale_range=(0.1, 0.5))
    x = gm.sample(12, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = gm.model(sde, "flow" if sde.velocity_form else "x0")
    r = log_likelihood(model, sde, x, divergence="exact", rtol=1e-6, atol=1e-6, norms=norms)
    # exact log p_{t_eps}(x) - log p_T(z) + log prior(z): the ODE's part without the prior mismatch (none on RF)
    exact = gm.log_prob(x, T_EPS, sde) - gm.log_prob(r.latent, sde.T, sde) + sde.prior_log_prob(r.latent)
    err = (r.log_prob - exact).abs()
    assert err.max() < 2e-5, err  # measured 3-7e-6 (1e-3 at rtol 1e-4)


def test_batch_mode_takes_one_step_for_all_and_fewer_calls():
    sde = ss.VPSDE()
    gm, x = _problem(sde)
    kw = dict(divergence="exact", rtol=1e-5, atol=1e-5, time_variable="logsnr")  # uneven per-sample steps
    own = log_likelihood(gm.score_fn(sde), sde, x, **kw)
    shared = log_likelihood(gm.score_fn(sde), sde, x, norms="batch", **kw)
    assert own.steps.min() < own.steps.max()  # the samples need different steps on their own
    assert bool((shared.steps == shared.steps[0]).all()) and bool((shared.nfe == shared.nfe[0]).all())
    assert bool((shared.rejected == shared.rejected[0]).all())
    # every call evaluates every sample: the calls are the NFE up to the last termination check's lag (<= 1 attempt)
    assert shared.nfe[0] <= shared.calls <= shared.nfe[0] + 6
    assert shared.calls < own.calls
    # RMS over the batch: between the easiest and the hardest sample's own step counts
    assert own.steps.min() <= shared.steps[0] <= own.steps.max()
    torch.testing.assert_close(shared.log_prob, own.log_prob, rtol=0, atol=5e-3)


def test_batch_mode_rejects_bad_names_and_a_nonfinite_sample_rejects_the_batch_step():
    sde = ss.VPSDE()
    gm, x = _problem(sde)
    with pytest.raises(ValueError, match="norms must be 'sample' or 'batch'"):
        log_likelihood(gm.score_fn(sde), sde, x, norms="shared")
    from scoresolve.solvers.integrate import RKStepper, integrate
    from scoresolve.solvers.tableaux import DOPRI5

    def field(t, y):  # sample 0 blows up for t > 0.5: its candidates are NaN there
        out = -y
        return torch.where((t[:, None] > 0.5) & (torch.arange(y.shape[0])[:, None] == 0), torch.nan, out)

    with pytest.raises(ss.solvers.NonFiniteStepError):
        integrate(RKStepper(DOPRI5, 1e-6, 1e-6), field, torch.ones(3, 2, dtype=F64), 0.0, 1.0, norms="batch")
