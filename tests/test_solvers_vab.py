"""vAB (Adams-Bashforth on the velocity in the rectified-flow time u), the ``flow:P`` grid and sample()'s default."""

import math

import pytest
import torch
from _exact import gaussian_3d as _gaussian
from _exact import rel_rms as _rel

import scoresolve as ss
from scoresolve.solvers.defaults import default_order

F64 = torch.float64




def test_first_order_is_ddim():
    """Order 1: y_{i+1} = y_i + (u_{i+1} - u_i) v_i is DDIM's step, whatever the process."""
    for sde in (ss.VPSDE(), ss.VESDE(), ss.SubVPSDE()):
        gm = ss.GaussianMixture.random(4, 3, seed=0)
        x_T = sde.prior_sample((8, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
        ddim = ss.sample(gm.score_fn(sde), sde, x_T, solver="ddim", steps=7, grid="quadratic").x
        out = ss.sample(gm.score_fn(sde), sde, x_T, solver="vab", steps=7, grid="quadratic", order=1).x
        torch.testing.assert_close(out, ddim, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.VESDE(), ss.EDMSDE(), ss.RectifiedFlow()],
                         ids=["vp", "ve", "edm", "rf"])
def test_convergence_orders(sde):
    """Observed orders on the exact PF-ODE flow of a Gaussian: without correction, an Euler first step limits every
    order to 2; with the warm-up corrected (the default) order 3 is third order; corrector=True adds one to the
    predictor's order (Adams-Moulton with the velocity the next step needs anyway)."""
    gm = _gaussian()
    t_eps = 0.002 if isinstance(sde, ss.EDMSDE) else 1e-3
    model = gm.model(sde, "x0")
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample((32, 3), generator=g, dtype=F64)
    exact = gm.pf_ode_flow(x_T, sde.T, t_eps, sde)

    def order(**opts):
        e = [_rel(ss.sample(model, sde, x_T, solver="vab", steps=n, t_eps=t_eps, grid="flow:2", **opts).x, exact)
             for n in (64, 128)]
        return math.log2(e[0] / e[1])

    assert 1.8 < order(order=2, corrector=False) < 2.4
    assert 1.8 < order(order=3, corrector=False) < 2.4  # the uncorrected Euler first step
    assert 2.6 < order(order=3) < 3.5
    assert order(order=4) > 2.6
    assert order(order=2, corrector=True) > 2.6


def test_starts_from_alpha0_without_a_special_step():
    """On rectified flow u = 1, y = x at t = 1: the same update runs from the start; a score model is refused."""
    sde = ss.RectifiedFlow()
    gm = _gaussian()
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = gm.pf_ode_flow(x_T, 1.0, 1e-3, sde)
    sol = ss.sample(gm.model(sde, "flow"), sde, x_T, solver="vab", nfe=20, grid="uniform")
    old = ss.sample(gm.model(sde, "flow"), sde, x_T, solver="dpmpp_2m", nfe=20, grid="uniform")  # exact first step
    assert int(sol.nfe.max()) == 20 and _rel(sol.x, exact) < 1e-3 and _rel(sol.x, exact) < _rel(old.x, exact) / 3
    with pytest.raises(ValueError, match="alpha = 0"):
        ss.sample(gm.model(sde, "score"), sde, x_T, solver="vab", nfe=10)


def test_refusals():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x_T = sde.prior_sample((4, 2), dtype=F64)
    with pytest.raises(ValueError, match="order"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="vab", nfe=10, order=5)
    with pytest.raises(ValueError, match="probability-flow"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="vab", nfe=10, diffusion=1.0)
    with pytest.raises(ValueError, match="corrector"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="vab", nfe=10, corrector="yes")
    with pytest.raises(ValueError, match="exponent"):
        ss.time_grid(sde, 5, "flow:-1")


@pytest.mark.parametrize("sde", [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.RectifiedFlow(), ss.CosineVPSDE(),
                                 ss.DiscreteVPSDE.linear()], ids=["vp", "subvp", "ve", "rf", "cosine", "discrete"])
def test_flow_grid(sde):
    """``flow:P``: u = sigma / (alpha + sigma) on the grid is (u_T^(1/P) + i/N (u_eps^(1/P) - u_T^(1/P)))^P, end
    points exact; on rectified flow (u = t) flow:1 is the uniform grid."""
    ts = ss.time_grid(sde, 9, "flow:1.5", 1e-3)
    assert float(ts[0]) == sde.T and float(ts[-1]) == 1e-3 and bool((ts[1:] < ts[:-1]).all())
    a, s = sde.alpha(ts), sde.sigma(ts)
    u = (s / (a + s)) ** (1 / 1.5)
    torch.testing.assert_close(u[1:] - u[:-1], (u[1:] - u[:-1]).mean().expand(9), rtol=1e-6, atol=1e-9)
    if isinstance(sde, ss.RectifiedFlow):
        torch.testing.assert_close(ss.time_grid(sde, 9, "flow:1", 1e-3), ss.time_grid(sde, 9, "uniform", 1e-3))


def test_sample_default_is_vab_on_the_flow_grid():
    """x0 / v / flow models: vAB on flow:1 / flow:1.5 with the order rule; eps / score models and plain score
    callables:
    dpmpp_2m on its own grid; diffusion > 0: euler_maruyama."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(4, 3, seed=2)
    x_T = sde.prior_sample((8, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    for nfe in (5, 10, 25):
        sol = ss.sample(gm.model(sde, "x0"), sde, x_T, nfe=nfe)
        same = ss.sample(gm.model(sde, "x0"), sde, x_T, solver="vab", order=default_order(nfe),
                         grid="flow:1" if nfe < 8 else "flow:1.5", nfe=nfe)
        assert sol.solver == "vab" and int(sol.nfe.max()) == nfe and sol.stats["order"] == default_order(nfe)
        torch.testing.assert_close(sol.x, same.x, rtol=0, atol=0)
    assert [default_order(n) for n in (5, 7, 8, 19, 20, 50)] == [2, 2, 3, 3, 4, 4]
    sol = ss.sample(gm.model(sde, "v"), sde, x_T, nfe=10, order=4, grid="quadratic")  # the caller's options win
    assert sol.solver == "vab" and sol.stats["order"] == 4
    torch.testing.assert_close(sol.stats["grid"], ss.time_grid(sde, 10, "quadratic", 1e-3))
    for model in (gm.model(sde, "eps"), gm.score_fn(sde)):
        sol = ss.sample(model, sde, x_T, nfe=10)
        assert sol.solver == "dpmpp_2m"
        torch.testing.assert_close(sol.stats["grid"], ss.time_grid(sde, 10, "quadratic", 1e-3))
    sde_sol = ss.sample(gm.score_fn(sde), sde, x_T, nfe=10, diffusion=1.0, generator=torch.Generator().manual_seed(0))
    assert sde_sol.solver == "euler_maruyama"


def test_default_beats_former_default_on_random_mixtures():
    """On mixtures not used to choose it (other seeds), the default has lower error than DPM-Solver++(2M) on the
    quadratic grid (the former default) at 10 and 30 NFE, on every process (float64, dopri5 reference at 1e-10)."""
    for seed, sde in ((11, ss.VPSDE()), (12, ss.SubVPSDE()), (13, ss.VESDE()), (14, ss.RectifiedFlow())):
        gm = ss.GaussianMixture.random(16, 6, seed=seed, spread=1.5)
        model = gm.model(sde, "x0")
        x_T = sde.prior_sample((64, 16), generator=torch.Generator().manual_seed(seed), dtype=F64)
        ref = ss.sample(model, sde, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, max_steps=100_000).x
        for nfe in (10, 30):
            ours = _rel(ss.sample(model, sde, x_T, nfe=nfe).x, ref)  # vAB: an x0 model
            old = _rel(ss.sample(model, sde, x_T, solver="dpmpp_2m", grid="quadratic", nfe=nfe).x, ref)
            assert ours < old, (sde, nfe, ours, old)


def test_poly_integrals_are_exact():
    """The host-side variable-step Adams weights integrate every polynomial of degree < q exactly (q <= 5), also for
    clustered nodes far from 0, and agree with the Gauss-Legendre quadrature of DEIS."""
    from scoresolve.solvers.adams import lagrange_integrals, poly_integrals

    g = torch.Generator().manual_seed(0)
    for q in range(1, 6):
        for lo, width in ((0.0, 1.0), (0.9, 1e-3)):
            nodes = (lo + width * torch.rand(q, generator=g, dtype=F64)).tolist()
            a, b = nodes[0], lo - 0.5 * width
            w = poly_integrals(nodes, a, b)
            for deg in range(q):
                exact = (b ** (deg + 1) - a ** (deg + 1)) / (deg + 1)
                assert math.isclose(sum(wi * n**deg for wi, n in zip(w, nodes)), exact, rel_tol=1e-7, abs_tol=1e-12)
            assert max(abs(x - y) for x, y in zip(w, lagrange_integrals(nodes, a, b))) < 1e-9
