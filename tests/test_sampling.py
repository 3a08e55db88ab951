"""The sample() entry point: defaults, NFE budgets, denoising, progress, dispatch."""

import pytest
import torch
from _counts import uniform

import scoresolve as ss
from scoresolve.solvers import REGISTRY

F64 = torch.float64


def setup(n=64, seed=0):
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 3, seed=seed)
    calls = {"n": 0}

    def score(x, t):
        calls["n"] += 1
        return gm.score(x, t, sde)

    x = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sde, gm, score, x, calls


def test_sde_samplers_default_to_the_reverse_sde_and_ode_solvers_to_the_pf_ode():
    sde, gm, score, x, _ = setup()
    a = ss.sample(score, sde, x, solver="euler_maruyama", steps=20, generator=torch.Generator().manual_seed(1))
    b = ss.sample(score, sde, x, solver="euler_maruyama", steps=20, generator=torch.Generator().manual_seed(2))
    assert (a.x - b.x).abs().max() > 1e-3  # noise was drawn: diffusion defaulted to 1
    c = ss.sample(score, sde, x, solver="euler_maruyama", steps=20, diffusion=0.0)
    d = ss.sample(score, sde, x, solver="euler", steps=20, grid="uniform")
    torch.testing.assert_close(c.x, d.x, rtol=1e-12, atol=1e-12)  # diffusion 0 is Euler on the PF-ODE
    e = ss.sample(score, sde, x, solver="ddim", steps=20, generator=torch.Generator().manual_seed(1))
    f = ss.sample(score, sde, x, solver="ddim", steps=20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(e.x, f.x, rtol=0, atol=0)  # ddim defaults to eta = 0: deterministic


@pytest.mark.parametrize("corrector_steps", [1, 2, 3])
def test_pc_budget_counts_corrector_steps(corrector_steps):
    sde, gm, score, x, calls = setup(n=4)
    sol = ss.sample(score, sde, x, solver="pc", nfe=24, corrector_steps=corrector_steps,
                    generator=torch.Generator().manual_seed(0))
    per = 1 + corrector_steps
    assert uniform(sol.nfe) == calls["n"] == (24 // per) * per
    assert uniform(sol.nfe) <= 24


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "unipc"])
def test_nfe_budget_is_respected_exactly(solver):
    sde, gm, score, x, calls = setup(n=4)
    spec = REGISTRY[solver]
    for budget in (7, 12, 25):
        calls["n"] = 0
        sol = ss.sample(score, sde, x, solver=solver, nfe=budget)
        assert uniform(sol.nfe) == calls["n"] <= budget
        assert budget - uniform(sol.nfe) < spec.evals_per_step  # the largest step count that fits


def test_denoise_is_tweedie_and_costs_one_evaluation():
    sde, gm, score, x, calls = setup()
    plain = ss.sample(score, sde, x, solver="dpmpp_2m", nfe=10)
    calls["n"] = 0
    den = ss.sample(score, sde, x, solver="dpmpp_2m", nfe=10, denoise=True)
    assert uniform(den.nfe) == uniform(plain.nfe) + 1 == calls["n"]
    t = torch.full((x.shape[0],), 1e-3, dtype=F64)
    a, s = sde.marginal(t)
    torch.testing.assert_close(den.x, (plain.x + s[:, None] ** 2 * gm.score(plain.x, t, sde)) / a[:, None])


def test_progress_bar_and_callback_and_trajectory(capsys):
    sde, gm, score, x, _ = setup(n=3)
    seen = []
    sol = ss.sample(score, sde, x, solver="heun", steps=5, progress=True, save_trajectory=True,
                    callback=lambda i, t, xx: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]
    assert sol.xs.shape == (6, 3, 2) and sol.ts.shape == (6,)
    torch.testing.assert_close(sol.xs[-1], sol.x)
    assert "sampling" in capsys.readouterr().err


def test_backend_grid_passthrough_and_dispatch_errors():
    sde, gm, score, x, calls = setup(n=4)
    a = ss.sample(score, sde, x, solver="torchdiffeq:euler", steps=30, grid="quadratic")
    b = ss.sample(score, sde, x, solver="euler", steps=30, grid="quadratic")
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)
    assert uniform(a.nfe) == 30
    with pytest.raises(ValueError, match="unknown solver"):
        ss.sample(score, sde, x, solver="dpm++")
    with pytest.raises(ValueError, match="adaptive"):
        ss.sample(score, sde, x, solver="dopri5", nfe=10)
    with pytest.raises(ValueError, match="time grid"):
        ss.sample(score, sde, x, solver="euler", rtol=1e-3)
    assert set(ss.list_solvers()) >= {"ddim", "dpmpp_2m", "unipc", "dopri5", "pc", "adaptive_sde"}
