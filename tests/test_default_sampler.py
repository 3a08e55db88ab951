"""`sample(..., nfe=N)` with no solver named: the default consults the process's capabilities
(`scoresolve.solvers.defaults.default_for_process`)."""

from __future__ import annotations

import pytest
import torch

import scoresolve as ss
from scoresolve.compare import rms_error
from scoresolve.solvers.defaults import default_for_process

F64 = torch.float64


def _cloud(K=16, N=4, seed=3):
    pts = torch.randn(K, N, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.5
    return ss.PointCloud(pts)


class _NoView(ss.PFGMPP):
    """PFGM++ without its EDM view: nothing Gaussian to fall back on."""

    def ode_view(self):
        return None


def test_gaussian_processes_keep_the_measured_default():
    for sde in (ss.VPSDE(), ss.RectifiedFlow()):
        name, opts, grid, proc = default_for_process(10, {}, "x0", sde)
        assert (name, opts["order"], grid, proc) == ("vab", 3, "flow:1.5", sde)
    name, _, grid, proc = default_for_process(10, {}, "eps", ss.VPSDE())
    assert (name, grid) == ("dpmpp_2m", None)


@pytest.mark.parametrize("nfe, bound", [(5, 0.01), (10, 0.2), (20, 0.6)])
def test_pfgm_default_runs_on_the_edm_view_and_beats_the_reference_sampler(nfe, bound):
    proc, cloud = ss.PFGMPP(D=128), _cloud()
    model = cloud.model(proc)
    x_T = proc.prior_sample((128, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    t_eps = proc.sigma_min  # where the reference's grid ends
    ref = ss.sample(model, proc, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=t_eps).x
    sol = ss.sample(model, proc, x_T, nfe=nfe, t_eps=t_eps)  # vab refuses PFGMPP itself (no gaussian_kernel)
    assert int(sol.nfe.max()) == nfe
    # the same as running the default by hand on the view
    view = proc.ode_view()
    denoiser = ss.ScoreModel(lambda x, t: model.x0(x, t), view, prediction="x0")  # the PFGM++ posterior mean
    by_hand = ss.sample(denoiser, view, x_T, nfe=nfe, t_eps=t_eps)
    torch.testing.assert_close(sol.x, by_hand.x, rtol=0, atol=0)
    # PFGM++'s own sampler (EDM's Heun on its rho = 7 grid) at the same budget: measured 0.001x / 0.10x / 0.51x here
    heun = ss.sample(model, proc, x_T, solver="heun", grid=proc.karras_grid(nfe // 2))
    assert int(heun.nfe.max()) <= nfe
    assert rms_error(sol.x, ref) < bound * rms_error(heun.x, ref)


def test_without_a_view_the_default_falls_back_to_a_solver_the_process_supports():
    proc = _NoView(D=128)
    model = _cloud().model(proc)
    x_T = proc.prior_sample((64, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    sol = ss.sample(model, proc, x_T, nfe=10)
    euler = ss.sample(model, proc, x_T, nfe=10, solver="euler")
    torch.testing.assert_close(sol.x, euler.x, rtol=0, atol=0)
    assert int(sol.nfe.max()) == 10
    # a model that does not predict x0 gets no view either (its eps / score would mean the Gaussian kernel's)
    assert default_for_process(10, {}, "score", ss.PFGMPP(D=8))[0] == "euler"


def test_the_sde_default_on_a_process_without_reverse_sde_is_refused_by_name():
    proc = ss.PFGMPP(D=8)
    x_T = proc.prior_sample((4, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ss.IncompatibleProcessError, match="reverse_sde"):
        ss.sample(_cloud().model(proc), proc, x_T, nfe=10, diffusion=1.0)


def test_eps_models_get_deis4_on_the_log_snr_grid_from_20_nfe():
    assert default_for_process(19, {}, "eps", ss.VPSDE())[:3] == ("dpmpp_2m", {}, None)
    assert default_for_process(20, {}, "score", ss.VESDE())[:3] == ("deis", {"order": 4, "basis": "log_rho"}, "logsnr")
    assert default_for_process(50, {}, "eps", ss.RectifiedFlow())[0] == "dpmpp_2m"  # log-SNR -inf at T
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(16, 6, spread=2.0, scale_range=(0.05, 0.3), seed=1)
    model = gm.model(sde, "eps")
    x_T = sde.prior_sample((128, 16), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = ss.sample(model, sde, x_T, solver="dopri5", rtol=1e-9, atol=1e-9).x
    sol = ss.sample(model, sde, x_T, nfe=20)
    by_hand = ss.sample(model, sde, x_T, solver="deis", order=4, basis="log_rho", grid="logsnr", nfe=20)
    torch.testing.assert_close(sol.x, by_hand.x, rtol=0, atol=0)
    assert int(sol.nfe.max()) == 20

    def median_error(x):
        return float((x - ref).norm(dim=1).median())

    former = ss.sample(model, sde, x_T, solver="dpmpp_2m", nfe=20).x  # the default below 20 NFE
    assert median_error(sol.x) < 0.5 * median_error(former)


def test_grid_solvers_on_pfgm_default_to_its_own_rho7_grid():
    proc, cloud = ss.PFGMPP(D=128), _cloud()
    model = cloud.model(proc)
    x_T = proc.prior_sample((128, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = ss.sample(model, proc, x_T, solver="dopri5", rtol=1e-10, atol=1e-10).x
    sol = ss.sample(model, proc, x_T, solver="heun", nfe=20)
    own = proc.default_time_grid(10, 1e-3)
    torch.testing.assert_close(sol.stats["grid"], own, rtol=0, atol=0)
    assert float(own[0]) == proc.T and float(own[-1]) == 1e-3
    ratios = own[1:-1] / own[:-2]  # rho = 7: sigma_(i+1)^(1/7) falls linearly
    assert bool((ratios < 1).all())
    quadratic = ss.sample(model, proc, x_T, solver="heun", nfe=20, grid="quadratic")  # the former default
    assert rms_error(sol.x, ref) < 0.2  # measured 0.099
    assert rms_error(quadratic.x, ref) > 10 * rms_error(sol.x, ref)  # measured 70
    # a named grid, an explicit grid and shift still win
    assert ss.sample(model, proc, x_T, solver="euler", nfe=10, grid="uniform").stats["grid"][1] > 60
