"""float16/bfloat16 states: adaptive tolerances below the dtype's precision are raised to it, with a warning."""

import warnings

import pytest
import torch

import scoresolve as ss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerances_are_clamped_with_a_warning(dtype):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(8, 3, seed=0)
    x32 = gm.sample(16, torch.Generator().manual_seed(0), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32: no warning
        ref = ss.log_likelihood(gm.score_fn(sde), sde, x32, divergence="exact")
    with pytest.warns(RuntimeWarning, match="below the precision"):
        low = ss.log_likelihood(gm.score_fn(sde), sde, x32.to(dtype), divergence="exact")
    # no step-size collapse: fewer evaluations than the float32 solve, a result within the dtype's reach
    assert float(low.nfe.float().mean()) < float(ref.nfe.float().mean())
    bound = 0.5 if dtype == torch.float16 else 2.5  # bfloat16 keeps 8 bits: log p ~ -10 accumulates ~1 nat
    assert float((low.log_prob.float() - ref.log_prob).abs().mean()) < bound
    x_T = sde.prior_sample((16, 8), dtype=dtype, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="below the precision"):
        sol = ss.sample(gm.score_fn(sde), sde, x_T, solver="dopri5")
    assert sol.x.dtype == dtype and bool(torch.isfinite(sol.x).all())
