"""iPNDM and DEIS (Adams-Bashforth on the noise prediction): exactness, weights, convergence orders, every process."""

import math

import pytest
import torch
from _exact import gaussian_3d as _gaussian
from _exact import rel_rms as _rel

import scoresolve as ss
from scoresolve.solvers.adams import AB_WEIGHTS, lagrange_integrals

F64 = torch.float64




def test_first_order_is_ddim():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(4, 3, seed=0)
    x_T = sde.prior_sample((8, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    ddim = ss.sample(gm.score_fn(sde), sde, x_T, solver="ddim", steps=7, grid="logsnr").x
    for solver in ("ipndm", "deis"):
        out = ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, steps=7, grid="logsnr", order=1).x
        torch.testing.assert_close(out, ddim, rtol=1e-12, atol=1e-12)


def test_weights():
    for q, w in AB_WEIGHTS.items():
        assert math.isclose(sum(w), 1.0)
        # Adams-Bashforth weights integrate polynomials of degree < q exactly on a uniform grid
        nodes = [-float(j) for j in range(q)]
        torch.testing.assert_close(torch.tensor(lagrange_integrals(nodes, 0.0, 1.0), dtype=F64),
                                   torch.tensor(w, dtype=F64), rtol=1e-13, atol=1e-13)


def test_deis_weights_sum_to_the_step_in_rho():
    """sum_j C_ij = rho_{i+1} - rho_i (the Lagrange basis sums to 1): the quadrature of rho' is exact to float64."""
    from scoresolve.solvers._grid import GridRun
    from scoresolve.solvers._registry import REGISTRY
    from scoresolve.solvers.adams import _rho, deis_weights

    for sde in (ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.CosineVPSDE()):
        spec = REGISTRY["deis"]
        x = torch.zeros(2, 3, dtype=F64)
        ts = ss.time_grid(sde, 12, "quadratic", 1e-3)
        run = GridRun(spec, sde.probability_flow(lambda x, t: x), x, ts, spec.resolve(sde.probability_flow(
            lambda x, t: x), {}, 12))
        rho = _rho(run)
        for i in range(2, 12):
            cs = deis_weights(run, i, 3)
            assert math.isclose(sum(cs), rho[i + 1] - rho[i], rel_tol=1e-11, abs_tol=1e-13), (sde, i)


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(), ss.EDMSDE()], ids=["vp", "ve", "edm"])
def test_convergence_orders(sde):
    """Observed orders on the exact PF-ODE flow of a Gaussian (log-SNR grid): DEIS tAB q tends to q; iPNDM's fixed
    uniform-step weights make it second order on the (geometric in rho) grid; rhoAB-3 tends to 3."""
    gm = _gaussian()
    t_eps = 0.002 if isinstance(sde, ss.EDMSDE) else 1e-3
    x_T = sde.prior_sample((32, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gm.pf_ode_flow(x_T, sde.T, t_eps, sde)

    def order(solver, **opts):
        e = [_rel(ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, steps=n, t_eps=t_eps, grid="logsnr",
                            **opts).x, exact) for n in (40, 80)]
        return math.log2(e[0] / e[1])

    assert order("deis") > 2.5
    assert order("deis", order=4) > 3.3
    assert order("deis", basis="rho") > 2.5
    assert 1.8 < order("ipndm") < 2.5


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.CosineVPSDE(), ss.DiscreteVPSDE.linear()],
                         ids=["vp", "subvp", "ve", "cosine", "discrete"])
def test_every_process_converges(sde):
    gm = ss.GaussianMixture.random(4, 3, seed=1)
    x_T = sde.prior_sample((16, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = ss.sample(gm.score_fn(sde), sde, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, time_variable="logsnr").x
    for solver in ("ipndm", "deis"):
        e10 = _rel(ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, nfe=10).x, ref)
        e40 = _rel(ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, nfe=40).x, ref)
        assert e10 < 0.2 and e40 < e10 / 6, (solver, e10, e40)


def test_refusals():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x_T = sde.prior_sample((4, 2), dtype=F64)
    with pytest.raises(ValueError, match="order"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="deis", nfe=10, order=5)
    with pytest.raises(ValueError, match="basis"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="deis", nfe=10, basis="lambda")
    with pytest.raises(ValueError, match="probability-flow"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="ipndm", nfe=10, diffusion=1.0)
    rf = ss.RectifiedFlow()
    for solver in ("ipndm", "deis"):  # a score model carries no x0 at alpha = 0
        with pytest.raises(ValueError, match="alpha = 0"):
            ss.sample(gm.model(rf, "score"), rf, x_T, solver=solver, nfe=10)


@pytest.mark.parametrize("sde", [ss.RectifiedFlow(), ss.TrigonometricInterpolant()], ids=["rf", "trig"])
def test_interpolants_from_t1(sde):
    """From alpha = 0 (t = 1): an exact DDIM first step in the data prediction, then the eps history. On the exact
    velocity of a Gaussian, on the grid uniform in t (no log-SNR), finite and second order (the one-step start limits
    the order, as for dpmpp_2m and unipc); measured 2.0-2.8."""
    gm = _gaussian()
    model = gm.model(sde, "flow")
    x_T = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gm.pf_ode_flow(x_T, sde.T, 1e-3, sde)
    for solver, opts in (("ipndm", {}), ("deis", {}), ("deis", {"basis": "rho"}), ("deis", {"basis": "log_rho"}),
                         ("ipndm", {"afs": True})):
        e = [_rel(ss.sample(model, sde, x_T, solver=solver, steps=n, t_eps=1e-3, grid="uniform", **opts).x, exact)
             for n in (40, 80)]
        assert all(math.isfinite(v) for v in e) and e[0] < 0.02, (solver, opts, e)
        if not opts.get("afs"):
            assert math.log2(e[0] / e[1]) > 1.6, (solver, opts, e)
    sol = ss.sample(model, sde, x_T, solver="deis", nfe=5, denoise=True)
    assert bool(torch.isfinite(sol.x).all()) and int(sol.nfe.max()) == 6
