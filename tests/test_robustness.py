"""Robustness: bad input gets a clear error, NaN/Inf from the network is caught (solver, time and samples named, last
finite state kept), impossible solver settings fail fast instead of looping, low-precision networks work.

Solver loops run over ``scoresolve.list_solvers()``, so every newly registered solver is covered automatically.
"""

from __future__ import annotations

import math

import pytest
import torch
from _counts import uniform
from _solver_kw import solve_kw

import scoresolve as ss
from scoresolve.solvers import REGISTRY, AdaptiveSolver, GridSolver, MaxStepsError, StepSizeUnderflowError

F32, F64 = torch.float32, torch.float64
SOLVERS = sorted(ss.list_solvers())
GRID_SOLVERS = [n for n in SOLVERS if isinstance(REGISTRY[n], GridSolver)]
ADAPTIVE_SOLVERS = [n for n in SOLVERS if isinstance(REGISTRY[n], AdaptiveSolver)]
ODE_ADAPTIVE = [n for n in ADAPTIVE_SOLVERS if not REGISTRY[n].stochastic]
T_BAD = 0.3  # the broken networks below return NaN/Inf for t < T_BAD


def _solve_kw(name: str, steps: int = 10, tol: float = 0.0001, seed: int = 0) -> dict:
    return solve_kw(name, steps, tol, seed)


def _case(D=2, B=4, K=2, dtype=F64, seed=0, sde=None):
    sde = sde or ss.VPSDE()
    gm = ss.GaussianMixture.random(D, K, seed=seed)
    x = sde.prior_sample((B, D), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return sde, gm, gm.score_fn(sde), x


# ------------------------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------------------------
def test_score_output_of_another_shape_is_an_error():
    sde, gm, good, x = _case(B=3)
    for name in SOLVERS:
        with pytest.raises(ValueError, match=r"returned shape \(3, 1\) for input of shape \(3, 2\)"):
            ss.sample(lambda xs, t: good(xs, t)[:, :1], sde, x, solver=name, **_solve_kw(name))
    # same number of elements, other layout: still an error, not a silent reshape
    with pytest.raises(ValueError, match=r"returned shape \(6,\)"):
        ss.sample(lambda xs, t: good(xs, t).flatten(), sde, x, solver="dpmpp_2m", steps=4)
    with pytest.raises(ValueError, match="returned shape"):
        ss.log_likelihood(lambda xs, t: good(xs, t)[:, :1], sde, x, divergence="exact")
    with pytest.raises(TypeError, match="returned tuple"):
        ss.sample(lambda xs, t: (good(xs, t),), sde, x, solver="euler", steps=2)


def test_time_vector_of_another_batch_size_is_an_error():
    sde, gm, good, x = _case(B=4)
    t3 = torch.full((3,), 0.5, dtype=F64)
    msg = "batch size mismatch"
    with pytest.raises(ValueError, match=msg):
        sde.drift(x, t3)
    with pytest.raises(ValueError, match=msg):
        sde.perturb(x, t3)
    with pytest.raises(ValueError, match=msg):
        sde.probability_flow(good).drift(x, t3)
    with pytest.raises(ValueError, match=msg):
        sde.reverse(good).drift(x, t3)
    with pytest.raises(ValueError, match=msg):
        ss.ScoreModel(lambda xs, t: xs, sde)(x, t3)
    with pytest.raises(ValueError, match=msg):
        ss.ScoreModel(lambda xs, t: xs, sde, prediction="eps").x0(x, t3)
    with pytest.raises(ValueError, match=msg):
        gm.score(x, t3, sde)
    with pytest.raises(ValueError, match=r"scalar or a \[batch\] tensor"):
        sde.drift(x, torch.full((4, 1), 0.5, dtype=F64))


def test_one_dimensional_x_is_an_error():
    sde, gm, good, _ = _case()
    x1 = torch.zeros(4, dtype=F64)
    msg = r"\[batch, \.\.\.\] with at least 2 dims, got shape \(4,\)"
    for name in ("euler", "dpmpp_2m", "dopri5"):
        with pytest.raises(ValueError, match=msg):
            ss.sample(good, sde, x1, solver=name)
    with pytest.raises(ValueError, match=msg):
        ss.log_likelihood(good, sde, x1)
    with pytest.raises(ValueError, match=msg):
        sde.prior_log_prob(x1)
    with pytest.raises(ValueError, match=msg):
        sde.probability_flow(good).drift(x1, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        ss.sample(good, sde, torch.zeros(4, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------------
# dtype and device of the network's output
# ------------------------------------------------------------------------------------------------------------------
def test_float64_network_output_is_converted_not_promoted():
    sde, gm, good, x = _case(dtype=F32, B=3)
    seen = []

    def net64(xs, t):
        seen.append(xs.dtype)
        return good(xs.double(), t.double())  # float64 out for float32 in

    for name in SOLVERS:
        sol = ss.sample(net64, sde, x, solver=name, t_eps=0.3, **_solve_kw(name, steps=4, tol=1e-3))
        assert sol.x.dtype == F32, name
        assert bool(torch.isfinite(sol.x).all()), name
    assert set(seen) == {F32}  # the solvers never promoted their state to float64
    r = ss.log_likelihood(net64, sde, x, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    assert r.log_prob.dtype == r.latent.dtype == F32
    eps16 = ss.ScoreModel(lambda xs, t: xs.to(torch.float16), sde, prediction="eps")
    assert eps16(x, torch.full((3,), 0.5)).dtype == F32


def test_network_on_another_device_is_an_error():
    sde, gm, good, x = _case(B=3)

    def on_meta(xs, t):
        return torch.empty(xs.shape, dtype=xs.dtype, device="meta")

    for name in ("euler", "dpmpp_2m", "dopri5"):
        with pytest.raises(ValueError, match="returned a tensor on meta for input on cpu"):
            ss.sample(on_meta, sde, x, solver=name)
    with pytest.raises(ValueError, match="returned a tensor on meta"):
        ss.log_likelihood(on_meta, sde, x)


# ------------------------------------------------------------------------------------------------------------------
# Time arguments
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sde",
    [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.CosineVPSDE(), ss.DiscreteVPSDE.linear(100)],
    ids=["vp", "subvp", "ve", "cosine", "discrete"],
)
def test_time_outside_0_T_is_an_error(sde):
    x = torch.zeros(2, 3, dtype=F64)
    msg = r"t must lie in \[0, T\]"
    for t in (-1e-3, sde.T * 1.01, 2.0, float("nan")):
        with pytest.raises(ValueError, match=msg):
            sde.marginal(t)
        with pytest.raises(ValueError, match=msg):
            sde.log_snr(torch.tensor([0.5, t], dtype=F64))
        with pytest.raises(ValueError, match=msg):
            sde.diffusion(t)
        with pytest.raises(ValueError, match=msg):
            sde.drift(x, torch.tensor([0.5, t], dtype=F64))
        with pytest.raises(ValueError, match=msg):
            sde.probability_flow(lambda xs, tt: -xs).drift(x, t)
    sde.marginal(0.0), sde.marginal(sde.T)  # the ends are fine


@pytest.mark.parametrize(
    "sde",
    [ss.VPSDE(), ss.SubVPSDE(), ss.VESDE(), ss.CosineVPSDE(), ss.CosineVPSDE(s=0.017578125),
     ss.DiscreteVPSDE.linear(10)],
    ids=["vp", "subvp", "ve", "cosine", "cosine-s0.0176", "discrete"],
)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_schedules_are_well_defined_at_both_ends(sde, dtype):
    # (cosine: rounding left log alpha(0) a few ulps above 0 for some s, and sigma(0) was NaN)
    t = torch.tensor([0.0, sde.T], dtype=dtype)
    alpha, sigma = sde.marginal(t)
    assert bool(torch.isfinite(alpha).all() & torch.isfinite(sigma).all() & (sigma >= 0).all()), (alpha, sigma)
    assert not bool(torch.isnan(sde.log_snr(t)).any())


@pytest.mark.parametrize("t_eps", [0.0, -1e-3, 1.0, 1.5, float("nan")])
def test_t_eps_outside_0_T_is_an_error(t_eps):
    sde, gm, good, x = _case(B=2)
    msg = r"t_eps must lie in \(0, T\)"
    for name in ("euler", "dpmpp_2m", "dopri5"):
        with pytest.raises(ValueError, match=msg):
            ss.sample(good, sde, x, solver=name, t_eps=t_eps)
    with pytest.raises(ValueError, match=msg):
        ss.log_likelihood(good, sde, x, t_eps=t_eps)
    cos = ss.CosineVPSDE()  # T = 0.9946: t_eps = 0.995 is beyond it
    with pytest.raises(ValueError, match=msg):
        ss.sample(good, cos, x, t_eps=0.995)
    with pytest.raises(ValueError, match=msg):
        ss.log_likelihood(good, cos, x, t_eps=0.995)


def test_bad_custom_grid_is_an_error():
    sde, gm, good, x = _case(B=2)
    bad = {
        "strictly decreasing": [
            torch.tensor([1.0, 0.5, 0.7, 0.1]),  # not monotone
            torch.tensor([0.1, 0.5, 1.0]),  # increasing
            torch.tensor([1.0, 0.5, 0.5, 0.1]),  # repeated time
        ],
        r"\(0, T\]": [torch.tensor([1.5, 0.5, 0.1]), torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.5, -0.1])],
        "non-finite": [torch.tensor([1.0, float("nan"), 0.1])],
        "1-D tensor of at least 2": [torch.tensor([[1.0, 0.1]]), torch.tensor([1.0])],
    }
    for name in GRID_SOLVERS:
        for msg, grids in bad.items():
            for grid in grids:  # the calibrated solver runs on its calibration's grid and refuses any other
                with pytest.raises(ValueError, match="calibration's grid" if name == "calibrated" else msg):
                    ss.sample(good, sde, x, solver=name, grid=grid.to(F64), **_solve_kw(name))
    for name in ODE_ADAPTIVE:  # an adaptive solver would silently ignore a grid
        with pytest.raises(ValueError, match="adaptive.*grid"):
            ss.sample(good, sde, x, solver=name, grid=torch.tensor([1.0, 0.5, 0.7, 0.1], dtype=F64))
        with pytest.raises(ValueError, match="adaptive.*grid"):
            ss.sample(good, sde, x, solver=name, grid="karras")
    with pytest.raises(ValueError, match="unknown grid"):
        ss.sample(good, sde, x, solver="euler", grid="cubic")
    with pytest.raises(ValueError, match="not both"):  # a grid tensor fixes the steps: a conflicting budget is an error
        ss.sample(good, sde, x, solver="euler", grid=torch.tensor([1.0, 0.5, 0.1], dtype=F64), steps=5)


def test_denoising_after_a_custom_grid_uses_the_grids_last_time():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 1, seed=0)
    x = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = ss.time_grid(sde, 10, "logsnr", 0.2)  # ends at 0.2, while sample()'s default t_eps is 1e-3
    sol = ss.sample(gm.score_fn(sde), sde, x, solver="dpmpp_2m", grid=ts)
    den = ss.sample(gm.score_fn(sde), sde, x, solver="dpmpp_2m", grid=ts, denoise=True)
    assert torch.equal(sol.t, torch.full((3,), 0.2, dtype=F64))
    torch.testing.assert_close(den.x, ss.ScoreModel.wrap(gm.score_fn(sde), sde).x0(sol.x, sol.t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------------------------
def test_non_finite_x_T_is_an_error():
    sde, gm, good, x = _case()
    for value in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[2, 1] = value
        for name in ("euler", "dpmpp_2m", "dopri5"):
            with pytest.raises(ValueError, match="x_T contains non-finite values"):
                ss.sample(good, sde, xb, solver=name)
        with pytest.raises(ValueError, match="x contains non-finite values"):
            ss.log_likelihood(good, sde, xb)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["late", "rows", "always"])
@pytest.mark.parametrize("name", SOLVERS)
def test_non_finite_network_output_names_solver_time_and_samples(name, case):
    """case "late": NaN for every sample once t < 0.3; "rows": Inf for samples 1 and 3 once t < 0.3; "always": NaN
    from the first evaluation. The error names the solver, each bad sample with the time it went bad, and keeps
    the last finite state; samples that stayed finite end exactly where a clean solve ends."""
    spec = REGISTRY[name]
    sde, gm, good, x = _case(B=4)
    rows = torch.tensor([False, True, False, True]) if case == "rows" else torch.ones(4, dtype=torch.bool)
    value = math.inf if case == "rows" else math.nan

    def broken(xs, t):
        s = good(xs, t)
        when = torch.ones_like(t, dtype=torch.bool) if case == "always" else t < T_BAD
        return torch.where((when & rows)[:, None], torch.full_like(s, value), s)

    with pytest.raises(ss.NonFiniteError) as info:
        ss.sample(broken, sde, x, solver=name, **_solve_kw(name))
    err = info.value
    bad = rows.nonzero().flatten().tolist()
    msg = str(err)
    assert err.solver == name and repr(name) in msg and "non-finite" in msg
    assert err.indices == bad, (err.indices, bad)
    assert len(err.times) == len(bad)
    for i, t in zip(err.indices, err.times):
        assert f"{i} (t={t:.6g})" in msg
    last = err.last_finite
    assert last.shape == x.shape and last.dtype == x.dtype and bool(torch.isfinite(last).all())

    if case == "always":
        assert torch.equal(last, x)  # nothing was ever finite beyond x_T
        if isinstance(spec, GridSolver):
            grid = ss.sample(good, sde, x, solver=name, **_solve_kw(name)).stats["grid"]
            assert all(t == pytest.approx(float(grid[1]), rel=1e-12) for t in err.times)
        else:
            assert all(t == pytest.approx(sde.T, rel=1e-12) for t in err.times)
        return

    clean = ss.sample(good, sde, x, solver=name, save_trajectory=isinstance(spec, GridSolver), **_solve_kw(name))
    if isinstance(spec, GridSolver):
        grid = clean.stats["grid"].tolist()
        below = [j for j, t in enumerate(grid) if t < T_BAD]
        for i, t in zip(err.indices, err.times):
            # a state turns bad at the end of the first step that evaluates the network below T_BAD
            j = min(range(len(grid)), key=lambda k: abs(grid[k] - t))
            assert grid[j] == pytest.approx(t, rel=1e-12) and j in below[:2], (t, grid)
            torch.testing.assert_close(last[i], clean.xs[j - 1][i], rtol=0, atol=0)
    else:
        assert all(T_BAD <= t < T_BAD + 1e-6 for t in err.times), err.times
    ok = (~rows).nonzero().flatten()
    torch.testing.assert_close(last[ok], clean.x[ok], rtol=1e-12, atol=1e-12)


def test_non_finite_denoising_step_is_reported():
    # only the final Tweedie step evaluates the network at t_eps for these solvers; it is NaN there
    sde, gm, good, x = _case(B=3)

    def broken(xs, t):
        s = good(xs, t)
        return torch.where((t < 2e-3)[:, None], torch.full_like(s, math.nan), s)

    for name in ("euler", "dpmpp_2m"):
        sol = ss.sample(broken, sde, x, solver=name, steps=5, t_eps=1e-3)
        assert bool(torch.isfinite(sol.x).all())
        with pytest.raises(ss.NonFiniteError, match=rf"'{name} \(denoise step\)'.*0 \(t=0\.001\)") as info:
            ss.sample(broken, sde, x, solver=name, steps=5, t_eps=1e-3, denoise=True)
        assert info.value.indices == [0, 1, 2]
        torch.testing.assert_close(info.value.last_finite, sol.x, rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("time_variable", ["t", "logsnr"])
def test_non_finite_network_in_log_likelihood_is_reported_in_t(time_variable):
    sde, gm, good, x = _case(B=3)

    def broken(xs, t):  # the likelihood solve runs t_eps -> T: NaN for samples 0 and 2 once t > 0.5
        s = good(xs, t)
        rows = torch.tensor([True, False, True])[:, None]
        return torch.where((t > 0.5)[:, None] & rows, torch.full_like(s, math.nan), s)

    with pytest.raises(ss.NonFiniteError, match=r"log_likelihood\[dopri5\]") as info:
        ss.log_likelihood(broken, sde, x, time_variable=time_variable, rtol=1e-4, atol=1e-4)
    err = info.value
    assert err.indices == [0, 2] and all(abs(t - 0.5) < 1e-6 for t in err.times), err.times  # times in t
    assert all(bool(torch.isfinite(p).all()) for p in err.last_finite)  # the state (x, delta log p)
    with pytest.raises(MaxStepsError, match="max_steps=2") as info:
        ss.log_likelihood(good, sde, x, time_variable=time_variable, max_steps=2)
    assert all(1e-5 < t < sde.T for t in info.value.times)


# ------------------------------------------------------------------------------------------------------------------
# Solver settings
# ------------------------------------------------------------------------------------------------------------------
def test_bad_tolerances_are_errors():
    sde, gm, good, x = _case(B=2)
    for name in ADAPTIVE_SOLVERS:
        kw = {"diffusion": 1.0} if REGISTRY[name].stochastic else {}
        bad = [(-1.0, 1e-3, "rtol"), (float("nan"), 1e-3, "rtol"), (1e-3, 0.0, "atol"), (1e-3, -1e-3, "atol"),
               (1e-3, float("inf"), "atol")]
        if not REGISTRY[name].stochastic:
            bad.append((0.0, 1e-3, "rtol"))  # adaptive_sde documents rtol = 0 as pure absolute control
        for rtol, atol, what in bad:
            with pytest.raises(ValueError, match=f"{what} must be"):
                ss.sample(good, sde, x, solver=name, rtol=rtol, atol=atol, **kw)
    for rtol, atol, what in ((0.0, 1e-3, "rtol"), (1e-3, -1.0, "atol")):
        with pytest.raises(ValueError, match=f"{what} must be"):
            ss.log_likelihood(good, sde, x, rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="adaptive: give rtol/atol, not nfe/steps"):
        ss.sample(good, sde, x, solver="dopri5", nfe=20)
    with pytest.raises(ValueError, match="give nfe or steps, not rtol/atol"):
        ss.sample(good, sde, x, solver="dpmpp_2m", rtol=1e-3)


@pytest.mark.parametrize("name", SOLVERS)
def test_unknown_option_is_an_error_naming_the_solvers_options(name):
    sde, gm, good, x = _case(B=2)
    accepted = REGISTRY[name].accepted_options()
    takes = ", ".join(accepted) or "none"
    with pytest.raises(TypeError, match=rf"solver '{name}' got unknown option\(s\) \['bogus'\]; its options: {takes}$"):
        ss.sample(good, sde, x, solver=name, bogus=1, **_solve_kw(name))
    # the listed options are real: each one is taken (at its default value) by the solver
    spec = REGISTRY[name]
    for opt in accepted:
        value = list(range(len(x))) if opt == "seeds" else spec.options[opt]
        kw = _solve_kw(name)
        if opt in kw:  # a required option (the calibrated solver's calibration) is taken with the value given
            continue
        if opt == "seeds":
            kw.pop("generator", None)
        ss.sample(good, sde, x, solver=name, **{opt: value}, **kw)
    if isinstance(REGISTRY[name], AdaptiveSolver):
        assert "max_steps" in accepted


def test_nfe_below_a_solvers_minimum_names_the_minimum():
    sde, gm, good, x = _case(B=2)
    for name in GRID_SOLVERS:
        if name == "calibrated":  # its budget is its calibration's (tests/test_calibration.py)
            continue
        spec = REGISTRY[name]
        kw = _solve_kw(name)
        kw.pop("steps")
        need = spec.nfe_for_steps(spec.min_steps)
        for nfe in (need - 1, 0, -5):
            with pytest.raises(ValueError, match=rf"{name}'? needs at least nfe={need}, got nfe={nfe}"):
                ss.sample(good, sde, x, solver=name, nfe=nfe, **kw)
        with pytest.raises(ValueError, match=rf"needs at least {spec.min_steps} step\(s\), got 0"):
            ss.sample(good, sde, x, solver=name, steps=0, **kw)
        sol = ss.sample(good, sde, x, solver=name, nfe=need, **kw)  # the minimum itself works
        assert uniform(sol.nfe) == need


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ODE_ADAPTIVE)
def test_step_size_underflow_is_an_error_not_a_hang(name):
    # score ~ 1/(t - 0.5)^2: the solution blows up like 1/(t - 0.5) as the solve approaches t = 0.5
    sde = ss.VPSDE()
    x = torch.zeros(2, 2, dtype=F64)

    def singular(xs, t):
        return torch.ones_like(xs) / ((t - 0.5) ** 2)[:, None]

    with pytest.raises(StepSizeUnderflowError, match=rf"'{name}': step size underflow") as info:
        ss.sample(singular, sde, x, solver=name, rtol=1e-3, atol=1e-3)
    assert info.value.indices == [0, 1] and all(abs(t - 0.5) < 1e-6 for t in info.value.times)


@pytest.mark.timeout(60)
def test_max_steps_is_an_error_not_a_hang():
    sde, gm, good, x = _case(B=3)
    for name in ADAPTIVE_SOLVERS:
        kw = {"diffusion": 1.0, "rtol": 1e-4, "atol": 1e-4} if REGISTRY[name].stochastic else {"rtol": 1e-8,
                                                                                                  "atol": 1e-8}
        with pytest.raises(MaxStepsError, match=rf"'{name}': reached max_steps=3 with 3 sample\(s\) unfinished"):
            ss.sample(good, sde, x, solver=name, max_steps=3, **kw)
    with pytest.raises(MaxStepsError, match=r"log_likelihood\[dopri5\].*max_steps=3"):
        ss.log_likelihood(good, sde, x, divergence="exact", max_steps=3)


# ------------------------------------------------------------------------------------------------------------------
# Likelihood and bits/dim
# ------------------------------------------------------------------------------------------------------------------
def test_exact_divergence_estimates_memory_before_allocating():
    sde = ss.VPSDE()
    calls = []

    def score(xs, t):
        calls.append(1)
        return -xs

    x = torch.zeros(1, 10**6)  # D = 1e6; one chunk of 1e6 VJPs = 2 * 1e12 float32 values = 8e12 bytes
    with pytest.raises(MemoryError, match=r"exact_chunk=1000000 .*D=1000000.* 8000000000000 bytes .*hutchinson"):
        ss.log_likelihood(score, sde, x, divergence="exact", exact_chunk=10**6)
    assert not calls  # raised before any network evaluation (and before any allocation)
    with pytest.raises(ValueError, match="exact_chunk must be >= 1"):
        ss.log_likelihood(score, sde, x[:, :4], divergence="exact", exact_chunk=0)
    # a chunk that fits goes ahead and chunking does not change the result
    gm = ss.GaussianMixture.random(3, 2, seed=1)
    y = gm.sample(2, generator=torch.Generator().manual_seed(0), dtype=F64)
    r1 = ss.log_likelihood(gm.score_fn(sde), sde, y, divergence="exact", exact_chunk=1, rtol=1e-6, atol=1e-6)
    r3 = ss.log_likelihood(gm.score_fn(sde), sde, y, divergence="exact", exact_chunk=10**6, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r1.log_prob, r3.log_prob, rtol=1e-12, atol=1e-12)


def test_bits_per_dim_data_outside_declared_range_is_an_error():
    x = torch.tensor([[-1.0, 0.0, 1.0], [1.5, 0.0, -1.0]])  # 1.5 is outside [-1, 1]
    with pytest.raises(ValueError, match=r"outside the declared data_range \(-1\.0, 1\.0\).*max 1\.5"):
        ss.uniform_dequantize(x, bits=8, data_range=(-1.0, 1.0))
    calls = []
    with pytest.raises(ValueError, match="outside the declared data_range"):
        ss.dequantized_bpd(lambda y, g: calls.append(1) or torch.zeros(2), x, bits=8)
    assert not calls  # checked before any likelihood evaluation
    with pytest.raises(ValueError, match="outside the declared data_range"):
        ss.uniform_dequantize(x.clamp(-1, 1), bits=8, data_range=(0.0, 1.0))  # [-1, 1] data declared as [0, 1]
    with pytest.raises(ValueError, match=r"8-bit levels in \[0, 255\]"):
        ss.uniform_dequantize(torch.tensor([[0, 256]]), bits=8)
    with pytest.raises(ValueError, match="non-finite"):
        ss.uniform_dequantize(torch.tensor([[0.0, float("nan")]]), bits=8)
    with pytest.raises(ValueError, match="data_range must be finite with lo < hi"):
        ss.uniform_dequantize(x, bits=8, data_range=(1.0, -1.0))


# ------------------------------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------------------------------
def test_bf16_network_inside_float32_solver():
    sde, gm, s32, x = _case(D=4, B=4, dtype=F32, seed=3)

    def s16(xs, t):
        return s32(xs.to(torch.bfloat16).float(), t).to(torch.bfloat16)

    for name, kw in (("dpmpp_2m", {"steps": 10}), ("dopri5", {"rtol": 1e-3, "atol": 1e-3})):
        lo = ss.sample(s16, sde, x, solver=name, **kw)
        ref = ss.sample(s32, sde, x, solver=name, **kw)
        assert lo.x.dtype == F32 and bool(torch.isfinite(lo.x).all())
        assert float((lo.x - ref.x).abs().max()) < 0.1, name
    y = gm.sample(4, generator=torch.Generator().manual_seed(1))
    r16 = ss.log_likelihood(s16, sde, y, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    r32 = ss.log_likelihood(s32, sde, y, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    assert r16.log_prob.dtype == F32 and bool(torch.isfinite(r16.log_prob).all())
    assert float((r16.log_prob - r32.log_prob).abs().max()) < 0.5


def test_float64_end_to_end_reference_solve():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 1, seed=2)  # one Gaussian: the PF-ODE flow is known exactly
    x = sde.prior_sample((3, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    sol = ss.sample(gm.score_fn(sde), sde, x, solver="dopri5", rtol=1e-10, atol=1e-10)
    assert sol.x.dtype == sol.t.dtype == F64
    exact = gm.pf_ode_flow(x, sde.T, 1e-3, sde)
    torch.testing.assert_close(sol.x, exact, rtol=1e-8, atol=1e-8)
    y = gm.sample(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    r = ss.log_likelihood(gm.score_fn(sde), sde, y, divergence="exact", rtol=1e-8, atol=1e-8, t_eps=1e-3)
    assert r.log_prob.dtype == F64
    # with the exact p_T in place of the N(0, I) prior, log p_T(z) + delta is exactly log p_{t_eps}(y)
    exact_lp = gm.log_prob(r.latent, sde.T, sde) + r.delta_log_prob
    torch.testing.assert_close(exact_lp, gm.log_prob(y, 1e-3, sde), rtol=1e-7, atol=1e-7)
