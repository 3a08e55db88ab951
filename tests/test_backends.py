"""Bridges to torchdiffeq and torchsde: agreement with our own solvers, mixture moments, exact NFE, errors."""

from __future__ import annotations

import math

import pytest
import torch
from _counts import uniform

import scoresolve as ss
from scoresolve.solvers import REGISTRY
from scoresolve.solvers.backends import TORCHDIFFEQ_FIXED, TORCHSDE_METHODS, solve_with_backend
from scoresolve.solvers.time_grids import time_grid

T_EPS = 1e-3
GM = ss.GaussianMixture.random(2, 3, seed=1)
VP, VE = ss.VPSDE(), ss.VESDE()


class CountingScore:
    """The exact mixture score with an independent call counter and the range of times it was called at."""

    def __init__(self, sde):
        self.sde, self.calls, self.t_min, self.t_max = sde, 0, math.inf, -math.inf

    def __call__(self, x, t):
        self.calls += 1
        self.t_min, self.t_max = min(self.t_min, float(t.min())), max(self.t_max, float(t.max()))
        return GM.score(x, t, self.sde)


def start(sde, n, seed=0):
    return GM.sample_marginal(n, sde.T, sde, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def moment_z(x, sde):
    n = x.shape[0]
    mu = x.mean(0)
    d = x - mu
    C = d.T @ d / (n - 1)
    zm = (mu - GM.mean(T_EPS, sde)) / (torch.diag(C) / n).sqrt()
    zc = (C - GM.cov(T_EPS, sde)) / ((d[:, :, None] * d[:, None, :]).std(0) / math.sqrt(n))
    return zm.abs().max().item(), zc.abs().max().item()


def test_torchdiffeq_dopri5_matches_our_rk4():
    x = start(VP, 32)
    score = CountingScore(VP)
    sol = solve_with_backend("torchdiffeq:dopri5", VP.reverse(score, 0.0), x, VP.T, T_EPS, rtol=1e-10, atol=1e-10)
    ref = REGISTRY["rk4"].fn(VP.reverse(GM.score_fn(VP), 0.0), x, time_grid(VP, 1200, "logsnr", T_EPS))
    assert (sol.x - ref.x).abs().max() < 1e-7
    assert uniform(sol.nfe) == score.calls and sol.stats["network_calls"] == score.calls
    # dopri5 costs 6 evaluations per attempted step (+ its initial-step heuristic and first evaluation)
    assert 6 * (sol.steps + sol.rejected) <= uniform(sol.nfe) <= 6 * (sol.steps + sol.rejected) + 2
    # the solver never evaluated outside [t_eps, T] (it would otherwise step past t_eps and interpolate back)
    assert score.t_min >= T_EPS * (1 - 1e-12) and score.t_max <= VP.T


@pytest.mark.parametrize("method", sorted(TORCHDIFFEQ_FIXED))
def test_torchdiffeq_fixed_grid_nfe_budget(method):
    x = start(VP, 32)
    score = CountingScore(VP)
    sol = solve_with_backend(f"torchdiffeq:{method}", VP.reverse(score, 0.0), x, VP.T, T_EPS, nfe=24)
    per_step = TORCHDIFFEQ_FIXED[method]
    assert sol.steps == 24 // per_step and uniform(sol.nfe) == score.calls == per_step * sol.steps
    ours = {"euler": "euler", "heun2": "heun"}.get(method)  # (torchdiffeq's rk4 is the 3/8 rule)
    if ours:  # same grid, same method: same numbers
        ref = REGISTRY[ours].fn(VP.reverse(GM.score_fn(VP), 0.0), x, time_grid(VP, sol.steps, "uniform", T_EPS))
        torch.testing.assert_close(sol.x, ref.x, rtol=1e-10, atol=1e-10)


def test_torchdiffeq_grid_option_and_steps():
    x = start(VP, 32)
    sol = solve_with_backend("torchdiffeq:euler", VP.reverse(GM.score_fn(VP), 0.0), x, VP.T, T_EPS, steps=17,
                             grid="logsnr")
    ref = REGISTRY["euler"].fn(VP.reverse(GM.score_fn(VP), 0.0), x, time_grid(VP, 17, "logsnr", T_EPS))
    assert uniform(sol.nfe) == 17
    torch.testing.assert_close(sol.x, ref.x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde,method,steps", [(VP, "euler", 200), (VE, "srk", 100)])
def test_torchsde_reproduces_mixture_moments(sde, method, steps):
    x = start(sde, 6000)
    score = CountingScore(sde)
    sol = solve_with_backend(f"torchsde:{method}", sde.reverse(score, 1.0), x, sde.T, T_EPS, steps=steps,
                             generator=torch.Generator().manual_seed(3))
    assert sol.steps == steps and uniform(sol.nfe) == score.calls == TORCHSDE_METHODS[method][1] * steps
    assert score.t_min >= T_EPS * (1 - 1e-12)
    zm, zc = moment_z(sol.x, sde)
    assert zm < 4.5 and zc < 4.5, (zm, zc)
    assert max(moment_z(x, sde)) > 20  # the check has teeth: the starting point is far from p_{t_eps}


@pytest.mark.parametrize("method", sorted(TORCHSDE_METHODS))
def test_torchsde_nfe_exact_and_reproducible(method):
    x = start(VP, 16)
    score = CountingScore(VP)
    run = lambda seed: solve_with_backend(  # noqa: E731
        f"torchsde:{method}", VP.reverse(score, 0.5), x, VP.T, T_EPS, nfe=12,
        generator=torch.Generator().manual_seed(seed))
    a = run(0)
    assert uniform(a.nfe) == score.calls == 12 // TORCHSDE_METHODS[method][1] * TORCHSDE_METHODS[method][1]
    b, c = run(0), run(1)
    assert torch.equal(a.x, b.x) and (a.x - c.x).abs().max() > 1e-3
    assert torch.isfinite(a.x).all()


def test_sample_entry_point_uses_backends():
    x = start(VP, 16)
    sol = ss.sample(GM.score_fn(VP), VP, x, solver="torchdiffeq:dopri5", rtol=1e-6, atol=1e-6)
    assert sol.stats["backend"] == "torchdiffeq" and uniform(sol.nfe) > 0
    sol = ss.sample(GM.score_fn(VP), VP, x, solver="torchsde:euler", diffusion=1.0, steps=10,
                    generator=torch.Generator().manual_seed(0))
    assert uniform(sol.nfe) == 10 and sol.x.shape == x.shape


def test_image_shaped_states_are_flattened_for_torchsde():
    gm = ss.GaussianMixture.random(12, 2, seed=0, event_shape=(3, 2, 2))
    x = gm.sample_marginal(8, 1.0, VP, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = solve_with_backend("torchsde:heun", VP.reverse(gm.score_fn(VP), 1.0), x, VP.T, T_EPS, steps=5,
                             generator=torch.Generator().manual_seed(0))
    assert sol.x.shape == (8, 3, 2, 2) and uniform(sol.nfe) == 10
    sol = solve_with_backend("torchdiffeq:bosh3", VP.reverse(gm.score_fn(VP), 0.0), x, VP.T, T_EPS)
    assert sol.x.shape == (8, 3, 2, 2)


def test_errors():
    x = start(VP, 4)
    ode, sde_proc = VP.reverse(GM.score_fn(VP), 0.0), VP.reverse(GM.score_fn(VP), 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        solve_with_backend("diffrax:tsit5", ode, x, 1.0, T_EPS)
    with pytest.raises(ValueError, match="unknown torchdiffeq method"):
        solve_with_backend("torchdiffeq:rk45", ode, x, 1.0, T_EPS)
    with pytest.raises(ValueError, match="unknown torchsde method"):
        solve_with_backend("torchsde:rk4", sde_proc, x, 1.0, T_EPS)
    with pytest.raises(ValueError, match="diffusion=0"):
        solve_with_backend("torchsde:euler", ode, x, 1.0, T_EPS, steps=5)
    with pytest.raises(ValueError, match="probability-flow ODE"):
        solve_with_backend("torchdiffeq:dopri5", sde_proc, x, 1.0, T_EPS)
    with pytest.raises(ValueError, match="adaptive"):
        solve_with_backend("torchdiffeq:dopri5", ode, x, 1.0, T_EPS, nfe=20)
    with pytest.raises(ValueError, match="rtol/atol"):
        solve_with_backend("torchdiffeq:rk4", ode, x, 1.0, T_EPS, rtol=1e-3)
    with pytest.raises(ValueError, match="rtol/atol"):
        solve_with_backend("torchsde:euler", sde_proc, x, 1.0, T_EPS, rtol=1e-3)
    with pytest.raises(ValueError, match="at least nfe=4"):
        solve_with_backend("torchdiffeq:rk4", ode, x, 1.0, T_EPS, nfe=3)
    with pytest.raises(ValueError, match="give steps"):
        solve_with_backend("torchdiffeq:explicit_adams", ode, x, 1.0, T_EPS, nfe=30)
    with pytest.raises(ValueError, match="torchdiffeq:dopri5"):
        solve_with_backend("torchdiffeq", ode, x, 1.0, T_EPS)
    with pytest.raises(ss.NonFiniteError):
        solve_with_backend("torchsde:euler", VP.reverse(lambda x, t: x * math.nan, 1.0), x, 1.0, T_EPS, steps=3)
