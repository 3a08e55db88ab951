"""Inputs that used to give silently wrong results or unbounded work (issue 29): counts that are not integers, the
torchdiffeq / torchsde bridges' checks, tuned-grid files that do not match the request, fixed-step RK on a grid where
it is unstable (VE with a large sigma_max), memory and work estimated before a solve, a model writing into its
input."""

import json
import math
import warnings

import pytest
import torch

import scoresolve as ss
from scoresolve import divergence
from scoresolve.solvers import time_grids as grids
from scoresolve.tuning import GRID_DIR_ENV, TunedGrid, save_grid

F64 = torch.float64


@pytest.fixture(scope="module")
def vp():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
    x_T = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    return sde, gm.score_fn(sde), x_T, gm


# ---------------------------------------------------------------------------------------------------------------
# 7. counts are integers: never rounded
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(nfe=2.5), ValueError, "nfe must be a whole number, got 2.5"),
    (dict(nfe=True), TypeError, "nfe must be an integer, got True"),
    (dict(nfe="10"), TypeError, "nfe must be an integer"),
    (dict(nfe=0), ValueError, "needs at least nfe=1, got nfe=0"),
    (dict(steps=2.7), ValueError, "steps must be a whole number"),
    (dict(steps=False), TypeError, "steps must be an integer"),
    (dict(solver="torchdiffeq:rk4", nfe=8.5), ValueError, "nfe must be a whole number"),
])
def test_sample_refuses_non_integer_counts(vp, kwargs, error, match):
    sde, score, x_T, _ = vp
    with pytest.raises(error, match=match):
        ss.sample(score, sde, x_T, **kwargs)


def test_whole_float_counts_are_the_integer(vp):
    sde, score, x_T, _ = vp
    a = ss.sample(score, sde, x_T, nfe=10.0)
    b = ss.sample(score, sde, x_T, nfe=10)
    assert torch.equal(a.x, b.x) and int(a.nfe.max()) == int(b.nfe.max()) == 10


@pytest.mark.parametrize("probes, error", [(2.7, ValueError), (True, TypeError), (0, ValueError)])
def test_log_likelihood_refuses_non_integer_probes(vp, probes, error):
    sde, score, _, gm = vp
    x = gm.sample(4, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(error, match="probes must be"):
        ss.log_likelihood(score, sde, x, probes=probes)


# ---------------------------------------------------------------------------------------------------------------
# 5. the bridges check what the built-in solvers check
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(solver="torchdiffeq:dopri5", rtol=-1e-3), ValueError, "rtol must be a finite number > 0"),
    (dict(solver="torchdiffeq:dopri5", atol=float("nan")), ValueError, "atol must be a finite number > 0"),
    (dict(solver="torchdiffeq:dopri5", bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
    (dict(solver="torchdiffeq:rk4", first_step=0.1), TypeError, r"unknown option\(s\) \['first_step'\]"),
    (dict(solver="torchsde:euler", foo=2), TypeError, r"unknown option\(s\) \['foo'\]"),
    (dict(solver="torchsde:srk", grad_free=True), TypeError, "unknown option"),
])
def test_bridges_check_their_inputs(vp, kwargs, error, match):
    sde, score, x_T, _ = vp
    with pytest.raises(error, match=match):
        ss.sample(score, sde, x_T, **kwargs)


def test_bridges_accept_their_own_options_and_refuse_bad_starts(vp):
    sde, score, x_T, _ = vp
    sol = ss.sample(score, sde, x_T, solver="torchdiffeq:dopri5", rtol=1e-4, atol=1e-4, first_step=0.01)
    ref = ss.sample(score, sde, x_T, solver="dopri5", rtol=1e-8, atol=1e-8)
    assert (sol.x - ref.x).abs().max() < 1e-2
    ss.sample(score, sde, x_T, solver="torchsde:milstein", nfe=4, grad_free=True,
              generator=torch.Generator().manual_seed(0))
    bad = x_T.clone()
    bad[3, 1] = float("inf")
    for solver in ("torchdiffeq:dopri5", "torchsde:euler"):
        with pytest.raises(ValueError, match="x_T contains non-finite values"):
            ss.sample(score, sde, bad, solver=solver)
    # alpha(T) = 0: an eps model carries no x0 there, and the SDE bridge cannot start there at all
    rf = ss.RectifiedFlow()
    gm = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
    eps_model = ss.ScoreModel(lambda x, t: x, rf, prediction="eps")
    z = rf.prior_sample((4, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="alpha = 0"):
        ss.sample(eps_model, rf, z, solver="torchdiffeq:dopri5")
    with pytest.raises(ValueError, match="alpha = 0"):
        ss.sample(gm.model(rf, "flow"), rf, z, solver="torchsde:euler")
    sol = ss.sample(gm.model(rf, "flow"), rf, z.double(), solver="torchdiffeq:dopri5")  # a flow model can
    assert torch.isfinite(sol.x).all()


def test_torchdiffeq_raises_float16_tolerances_as_the_builtin_solvers_do(vp):
    sde, score, x_T, _ = vp
    with pytest.warns(RuntimeWarning, match="below the precision of a torch.bfloat16 state"):
        sol = ss.sample(score, sde, x_T.to(torch.bfloat16), solver="torchdiffeq:bosh3", rtol=1e-6, atol=1e-6)
    assert sol.x.dtype == torch.bfloat16 and torch.isfinite(sol.x.float()).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 tolerances are left alone
        ss.sample(score, sde, x_T.float(), solver="torchdiffeq:bosh3", rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 6. a tuned-grid file must match the request and agree with itself
# ---------------------------------------------------------------------------------------------------------------
def _tuned(sde, solver="unipc", nfe=6, t_eps=1e-3):
    spec = ss.solvers.REGISTRY[solver]
    steps = spec.steps_for_nfe(nfe)
    grid = ss.solvers.time_grid(sde, steps, "quadratic", t_eps)
    return TunedGrid(grid=grid, solver=solver, nfe=nfe, steps=steps, method="gits", t_eps=t_eps, T=sde.T,
                     train_error=0.1, default_error=0.2, gits_error=0.1, evaluations=1, calls=1, seconds=0.0,
                     num_samples=1, candidates=10, sde=repr(sde))


def test_tuned_grid_must_match_the_request(vp, tmp_path, monkeypatch):
    sde, score, x_T, _ = vp
    monkeypatch.setenv(GRID_DIR_ENV, str(tmp_path))
    path = save_grid(_tuned(sde), "g")
    sol = ss.sample(score, sde, x_T, solver="unipc", nfe=6, grid="tuned:g")  # as tuned: runs
    assert torch.equal(sol.stats["grid"], _tuned(sde).grid)
    with pytest.raises(ValueError, match="tuned for solver 'unipc', not 'dpmpp_2m'"):
        ss.sample(score, sde, x_T, solver="dpmpp_2m", nfe=6, grid="tuned:g")
    with pytest.raises(ValueError, match=r"was tuned on VPSDE\(.*not on SubVPSDE"):
        ss.sample(score, ss.SubVPSDE(), x_T, solver="unipc", nfe=6, grid="tuned:g")
    with pytest.raises(ValueError, match="has 6 steps"):
        ss.sample(score, sde, x_T, solver="unipc", nfe=10, grid="tuned:g")
    # hand-edited files: a grid that stops at 0.5, a 3-step grid under a record of 6 steps, a wrong nfe
    d = json.loads(path.read_text())
    for edit, match in [
        (dict(grid=torch.linspace(1, 0.5, 7).tolist()), "runs from 1.0 to 0.5, but it records T=1.0, t_eps=0.001"),
        (dict(grid=d["grid"][:3] + [d["grid"][-1]]), "its grid has 3 steps, but it records steps=6"),
        (dict(nfe=10), "unipc takes 6 evaluations for 6 steps, but it records nfe=10"),
        (dict(solver="nosuch"), "unknown solver 'nosuch'"),
        (dict(solver="dopri5"), "tuned for 'dopri5', which is not a grid solver"),
    ]:
        (tmp_path / "e.json").write_text(json.dumps({**d, **edit}))
        with pytest.raises(ValueError, match=match):
            ss.sample(score, sde, x_T, solver="unipc", nfe=6, grid="tuned:e")


# ---------------------------------------------------------------------------------------------------------------
# 4. fixed-step RK where its steps amplify the noise: VE with a large sigma_max
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_max", [1e4, 1e8])
def test_heun_rk4_refuse_unstable_grids_on_ve(sigma_max):
    sde = ss.VESDE(sigma_max=sigma_max)
    gm = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
    score = gm.score_fn(sde)
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    for solver in ("heun", "rk4"):  # their default grid at the default budget: off by 1e6-1e9 before
        with pytest.raises(ValueError, match=f"{solver} is unstable on this grid: step 0"):
            ss.sample(score, sde, x_T, solver=solver)
    ref = ss.sample(score, sde, x_T, solver="dopri5", rtol=1e-9, atol=1e-9).x
    err = lambda sol: float((sol.x - ref).abs().max())  # noqa: E731
    assert err(ss.sample(score, sde, x_T, solver="dpmpp_2m")) < 0.1  # exact in the linear part
    assert err(ss.sample(score, sde, x_T, solver="heun", nfe=400)) < 0.1  # enough steps: stable and accurate


def test_stability_check_leaves_the_usual_processes_alone():
    gm = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
    for sde in (ss.VPSDE(), ss.SubVPSDE(), ss.CosineVPSDE(), ss.EDMSDE(), ss.VESDE()):
        x_T = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
        for solver, nfe in (("euler", 8), ("heun", 20), ("rk4", 40)):
            for grid in ("uniform", "quadratic", "logsnr", "karras"):
                ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, nfe=nfe, grid=grid)


def test_stability_function_is_the_methods_polynomial():
    from scoresolve.solvers.fixed import stability_function
    from scoresolve.solvers.tableaux import EULER, HEUN, RK4

    for z in (-0.5, -2.0, -2.9):
        assert math.isclose(stability_function(EULER, z), 1 + z)
        assert math.isclose(stability_function(HEUN, z), 1 + z + z**2 / 2)
        assert math.isclose(stability_function(RK4, z), sum(z**k / math.factorial(k) for k in range(5)))


# ---------------------------------------------------------------------------------------------------------------
# unbounded work: estimated and refused first
# ---------------------------------------------------------------------------------------------------------------
def test_huge_nfe_is_refused_with_an_estimate(vp, monkeypatch):
    sde, score, x_T, _ = vp
    monkeypatch.setattr(divergence, "available_bytes", lambda device: 8 * 2**30)
    with pytest.raises(MemoryError, match=r"a grid of 1000000000 steps needs about 238 GiB .* 8 GiB available"):
        ss.sample(score, sde, x_T, solver="euler", nfe=10**9)
    assert grids.grid_bytes(10**6) < 2**28  # a million steps: a quarter GiB, allowed


def test_hutchinson_probes_beyond_memory_are_refused(vp, monkeypatch):
    sde, score, _, gm = vp
    x = torch.zeros(2, 3, 64, 64)  # 12288 dims
    monkeypatch.setattr(divergence, "available_bytes", lambda device: 2**30)
    with pytest.raises(MemoryError, match=r"100000 Hutchinson probes .* need about 27.5 GiB.*at most 3640 probes"):
        ss.log_likelihood(lambda y, t: -y, sde, x, probes=100_000)


def test_hutchinson_probes_beyond_the_work_cap_are_refused(vp):
    """probes=1e5 on 2 dimensions fits in memory but takes 1e5 VJPs per evaluation (it ran past 5 minutes): refused
    before any evaluation, with the cost and the exact divergence named; the cap itself runs."""
    sde = vp[0]
    calls = []
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"probes=100000 takes 100000 VJPs per evaluation.*divergence='exact'"):
        ss.log_likelihood(lambda y, t: calls.append(1) or -y, sde, x, probes=100_000)
    assert calls == []
    assert divergence.MAX_PROBES == divergence.EXACT_MAX_DIMS
    divergence.check_probe_work(x, divergence.MAX_PROBES)  # at the cap: allowed


def test_exact_divergence_on_huge_dims_is_refused():
    sde = ss.VPSDE()
    calls = []
    x = torch.zeros(1, 3, 256, 256)  # 196608 dims
    with pytest.raises(ValueError, match="divergence='exact' on D=196608 dimensions takes 196608 VJPs"):
        ss.log_likelihood(lambda y, t: calls.append(1) or -y, sde, x, divergence="exact")
    assert not calls  # refused before any work


# ---------------------------------------------------------------------------------------------------------------
# a model that writes into its input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dopri5", "euler_maruyama", "torchdiffeq:rk4"])
def test_a_model_modifying_its_input_does_not_change_x_T(vp, solver):
    sde, score, x_T, _ = vp

    def rude(x, t):
        s = score(x, t)
        x.mul_(0.0)  # writes into the tensor it was given
        return s

    before = x_T.clone()
    with pytest.raises(RuntimeError, match="changed its input x in place"):  # it would corrupt the solver's state
        ss.sample(rude, sde, x_T, solver=solver, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_T, before)  # and the caller's x_T is untouched


def test_discrete_sde_repr_is_short_and_identifies_the_schedule():
    a, b = ss.DiscreteVPSDE.linear(), ss.DiscreteVPSDE.linear(beta_end=0.021)
    assert len(repr(a)) < 120 and repr(a).startswith("DiscreteVPSDE(N=1000, alphas_cumprod=0.9999..")
    assert repr(a) != repr(b) and repr(a) == repr(ss.DiscreteVPSDE.linear())
