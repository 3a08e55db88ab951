"""The grid run's host coefficients (`scoresolve.solvers._affine`) give the same predictions and drifts as the
model's and the process's own conversions, for every prediction kind, process and step family."""

from __future__ import annotations

import pytest
import torch

import scoresolve as ss
from scoresolve.solvers import _grid
from scoresolve.solvers._affine import DRIFT, affine_coefficients, apply_affine, supports_affine

PREDICTIONS = ["score", "eps", "x0", "v", "flow"]


def _model(sde, prediction):
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    return ss.ScoreModel(lambda x, t: torch.tanh(torch.cat([x, t[:, None]], 1) @ W), sde, prediction=prediction)


def _own(monkeypatch):
    """Make grid runs use the model's and the process's own methods (the reference path)."""
    monkeypatch.setattr(_grid.GridRun, "affine", property(lambda self: False))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(), ss.SubVPSDE(), ss.RectifiedFlow()],
                         ids=["vp", "ve", "subvp", "rf"])
def test_coefficients_reproduce_the_conversions_and_the_drift(sde, prediction):
    model = _model(sde, prediction)
    t = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = model.raw(x, t)
    for scale in (0.0, 1.0):
        proc = sde.reverse(model, scale)
        assert supports_affine(proc, model)
        for kind in PREDICTIONS + [DRIFT]:
            cx, cp = affine_coefficients(proc, model, kind, t)
            got = torch.stack([apply_affine(x[k:k + 1], out[k:k + 1], cx[k], cp[k])[0] for k in range(4)])
            want = proc.drift_at(x, t) if kind == DRIFT else model.predict(x, t, kind)
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (kind, scale)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "heun", "rk4", "dpm_solver_2", "dpm_solver_3", "vab", "ipndm",
                                  "deis", "ddim", "euler"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_grid_solves_equal_the_model_conversion_path_even_with_the_models_own_schedule(name, prediction, monkeypatch):
    # the model carries another schedule than the process: conversions must use the model's, the drift the process's
    sde = ss.VPSDE()
    model = _model(ss.VPSDE(beta_max=10.0), prediction)
    x = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = ss.sample(model, sde, x, solver=name, steps=5)
    _own(monkeypatch)
    ref = ss.sample(model, sde, x, solver=name, steps=5)
    assert torch.allclose(fast.x, ref.x, rtol=1e-12, atol=1e-12)


def test_models_that_override_their_predictions_use_their_own_path():
    from scoresolve.adapters.diffusers_schedule import ProcessedX0Model

    sde = ss.VPSDE()
    assert not supports_affine(sde.reverse(_model(sde, "eps"), lambda t: 0.0 * t), _model(sde, "eps"))
    assert ProcessedX0Model.predict_many is not ss.ScoreModel.predict_many
