"""An empty batch is not an error: every solver, the backends and log_likelihood return empty results."""

import pytest
import torch

import scoresolve as ss
from scoresolve.solvers import REGISTRY, AdaptiveSolver

SOLVERS = sorted(REGISTRY) + ["torchdiffeq:dopri5", "torchdiffeq:euler", "torchsde:euler"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_returns_an_empty_result(solver):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    spec = REGISTRY.get(solver)
    if isinstance(spec, AdaptiveSolver) or solver == "torchdiffeq:dopri5":
        kw = {"rtol": 1e-3, "atol": 1e-3}
    elif solver == "calibrated":  # runs on its calibration's grid
        kw = {"calibration": ss.Calibration.base(ss.time_grid(sde, 6, "logsnr"))}
    else:
        kw = {"steps": 6}
    sol = ss.sample(gm.score_fn(sde), sde, torch.zeros(0, 2), solver=solver, **kw)
    assert sol.x.shape == (0, 2) and sol.nfe.shape == (0,)
    assert "Solution(" in repr(sol)


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_log_likelihood_of_an_empty_batch(divergence):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    res = ss.log_likelihood(gm.score_fn(sde), sde, torch.zeros(0, 2), divergence=divergence, probes=2)
    assert res.log_prob.shape == (0,) and res.latent.shape == (0, 2) and res.calls == 0
    assert "log_prob []" in repr(res)
