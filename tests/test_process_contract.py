"""The process contract (scoresolve.process): declared capabilities, what solvers require, one refusal type; and the
one PF-ODE solve path that `sample` (adaptive solvers) and `log_likelihood` share (same time-variable rule)."""

import math
from dataclasses import dataclass

import pytest
import torch

import scoresolve as ss
from scoresolve.divergence import ExactDivergence, HutchinsonDivergence
from scoresolve.solvers import REGISTRY, AdaptiveSolver, GridSolver, SolverSpec
from scoresolve.solvers._registry import alpha0_solvers, fitting_solvers, register

F64 = torch.float64


@dataclass(frozen=True)
class NoReverseSDE(ss.VPSDE):
    """VP marginals, but the process declares no reverse SDE (a toy for the refusals)."""

    reverse_sde = False


@dataclass(frozen=True)
class NonGaussianKernel(ss.VPSDE):
    """VP marginals, but the process declares no Gaussian kernel: only PF-ODE solvers that need nothing of it fit."""

    gaussian_kernel = False


def _problem(sde, batch=6, dim=3):
    gm = ss.GaussianMixture.random(dim, 2, seed=0)
    x_T = sde.prior_sample((batch, dim), generator=torch.Generator().manual_seed(1), dtype=F64)
    return gm, x_T


def test_capabilities_are_declared():
    assert ss.VPSDE().capabilities() == {"reverse_sde", "gaussian_kernel", "smooth_in_t"}
    assert ss.DiscreteVPSDE.linear(50).capabilities() == {"reverse_sde", "gaussian_kernel"}
    assert ss.RectifiedFlow().capabilities() == {"reverse_sde", "gaussian_kernel", "velocity_form", "smooth_in_t"}
    assert NonGaussianKernel().capabilities() == {"reverse_sde", "smooth_in_t"}
    assert isinstance(ss.VPSDE(), ss.Process) and isinstance(ss.RectifiedFlow(), ss.Process)
    assert issubclass(ss.IncompatibleProcessError, ValueError)
    with pytest.raises(ValueError, match="unknown capabilities"):
        ss.VPSDE().missing(["gaussian"])


def _every_process():
    """One instance of every process class: the named SDEs and interpolants, the discrete schedule, Poisson flows
    and their EDM view, a general interpolant, and the toys of this file."""
    from scoresolve.sde import PROCESS_NAMES, SDE_NAMES

    named = [ss.sde_from_name(n) for n in (*SDE_NAMES, *PROCESS_NAMES)]
    cos = lambda t: torch.cos(t * (math.pi / 2))  # noqa: E731  (alpha(1) = 6e-17 > 0 in float64, not 0)
    general = ss.Interpolant(cos, lambda t: torch.sin(t * (math.pi / 2)), lambda t: -(math.pi / 2) * torch.sin(
        t * (math.pi / 2)), lambda t: (math.pi / 2) * cos(t), T=0.9, name="Quarter")
    return named + [ss.DiscreteVPSDE.linear(), ss.PFGMPP().edm_view(), general, NoReverseSDE(), NonGaussianKernel(),
                    ToyX0Process()]


def test_every_process_says_whether_its_log_snr_is_finite_at_T():
    """``finite_log_snr_at_T``: lambda(T) is finite (alpha(T) > 0); False where alpha(T) = 0 and where there is no
    Gaussian kernel (no log-SNR: Poisson flows, the toys without one), whatever their schedule would give."""
    expect = {"VPSDE": True, "SubVPSDE": True, "VESDE": True, "EDMSDE": True, "CosineVPSDE": True,
              "RectifiedFlow": False, "TrigonometricInterpolant": False, "PFGMPP": False, "DiscreteVPSDE": True,
              "PFGMEDMView": True, "Interpolant": True, "NoReverseSDE": True, "NonGaussianKernel": False,
              "ToyX0Process": False}
    seen = set()
    for proc in _every_process():
        name = type(proc).__name__
        seen.add(name)
        assert proc.finite_log_snr_at_T is expect[name], proc
        if proc.gaussian_kernel:  # the value is lambda(T)'s, in float64 and float32 alike
            for dtype in (torch.float64, torch.float32):
                lam_T = float(proc.log_snr(torch.tensor(float(proc.T), dtype=dtype)))
                assert math.isfinite(lam_T) is expect[name], (proc, dtype)
    assert seen == set(expect)
    assert not ss.PFGMPP().finite_log_snr_at_T and ss.PFGMPP().ode_view().finite_log_snr_at_T
    assert "finite_log_snr_at_T" not in ss.CAPABILITIES  # a property of the schedule, required by no solver


def test_a_process_without_a_reverse_sde_is_refused_by_name_and_told_what_fits():
    sde = NoReverseSDE()
    gm, x_T = _problem(sde)
    for solver, kw in (("euler_maruyama", {"nfe": 10}), ("pc", {"nfe": 10}), ("adaptive_sde", {"rtol": 1e-2}),
                       ("ddim", {"nfe": 10, "eta": 1.0}), ("dpmpp_2m_sde", {"nfe": 10}),
                       ("euler", {"nfe": 10, "diffusion": 1.0}), ("torchsde:euler", {"nfe": 10})):
        with pytest.raises(ss.IncompatibleProcessError, match="'reverse_sde'") as info:
            ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, **kw)
        msg = str(info.value)
        assert "solvers that fit it: " in msg
        fits = msg.split("solvers that fit it: ")[1].split(", ")
        assert {"ddim", "dpmpp_2m", "dopri5", "euler", "unipc"} <= set(fits)
        assert not {"euler_maruyama", "pc", "adaptive_sde", "reverse_diffusion", "dpmpp_2m_sde"} & set(fits)
        assert info.value.missing == ("reverse_sde",)
    # a solver that fits runs, and gives exactly what it gives on the VP SDE the toy copies
    out = ss.sample(gm.score_fn(sde), sde, x_T, solver="ddim", nfe=10)
    ref = ss.sample(gm.score_fn(ss.VPSDE()), ss.VPSDE(), x_T, solver="ddim", nfe=10)
    assert torch.equal(out.x, ref.x)


def test_a_process_without_a_gaussian_kernel_keeps_only_the_solvers_that_need_none():
    sde = NonGaussianKernel()
    gm, x_T = _problem(sde)
    for solver in ("ddim", "dpmpp_2m", "unipc", "deis", "dpm_solver_2", "reverse_diffusion"):
        with pytest.raises(ss.IncompatibleProcessError, match=f"solver '{solver}' requires the capability "
                                                              "'gaussian_kernel'"):
            ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, nfe=12)
    # options that require more: the log-SNR as time variable, grids built from the log-SNR
    with pytest.raises(ss.IncompatibleProcessError, match="grid 'logsnr' requires the capability 'gaussian_kernel'"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="euler", nfe=12, grid="logsnr")
    with pytest.raises(ss.IncompatibleProcessError, match="'gaussian_kernel'"):
        ss.sample(gm.score_fn(sde), sde, x_T, solver="dopri5", rtol=1e-4, atol=1e-4, time_variable="logsnr")
    assert set(fitting_solvers(sde)) == {"euler", "heun", "rk4", "euler_maruyama", "adaptive_sde", "dopri5",
                                         "dopri5_shampine", "tsit5", "bosh3", "vern6", "vern7"}
    vp = ss.VPSDE()
    for solver, kw in (("heun", {"nfe": 20}), ("dopri5", {"rtol": 1e-6, "atol": 1e-6})):
        out = ss.sample(gm.score_fn(sde), sde, x_T, solver=solver, **kw)
        ref = ss.sample(gm.score_fn(vp), vp, x_T, solver=solver, **kw)
        # the same solve to rounding: grid solvers fold a Gaussian process's conversions into per-grid host
        # coefficients (`solvers/_affine.py`), which the toy does not have (heun: 1e-15 apart, samples of scale 5)
        torch.testing.assert_close(out.x, ref.x, rtol=1e-13, atol=1e-13)
        assert torch.equal(out.nfe, ref.nfe)
    # log_likelihood: the control variate needs the Gaussian kernel; the likelihood itself does not (the divergence of
    # the whole drift is estimated, not D f + the score's part) and agrees with the VP SDE's split computation
    x = gm.sample_marginal(4, 1e-3, vp, generator=torch.Generator().manual_seed(2), dtype=F64)
    cv = ss.GaussianControlVariate.from_data(x)
    with pytest.raises(ss.IncompatibleProcessError, match="control_variate requires the capability 'gaussian_kernel'"):
        ss.log_likelihood(gm.score_fn(sde), sde, x, control_variate=cv)
    kw = dict(divergence="exact", rtol=1e-8, atol=1e-8, t_eps=1e-3)
    res = ss.log_likelihood(gm.score_fn(sde), sde, x, **kw)
    ref = ss.log_likelihood(gm.score_fn(vp), vp, x, **kw)
    torch.testing.assert_close(res.log_prob, ref.log_prob, rtol=0, atol=1e-7)
    torch.testing.assert_close(res.log_prob, gm.log_prob(x, 1e-3, vp), rtol=0, atol=0.1)  # the prior's gap at T


def test_alpha0_solvers_come_from_the_registry():
    assert set(alpha0_solvers()) == {n for n, s in REGISTRY.items() if s.starts_at_alpha0}
    assert {"euler", "ddim", "dpmpp_2m", "dopri5", "tsit5"} <= set(alpha0_solvers())
    assert not {"dpm_solver_2", "euler_maruyama", "adaptive_sde"} & set(alpha0_solvers())
    from scoresolve.solvers import _registry

    toy = SolverSpec("toy_alpha0_solver", step=REGISTRY["euler"].step, starts_at_alpha0=True)
    register(toy)
    try:
        assert "toy_alpha0_solver" in _registry.ALPHA0_SOLVERS
        sde = ss.RectifiedFlow()
        gm, x_T = _problem(sde)
        with pytest.raises(ValueError, match="cannot start .* alpha = 0.*toy_alpha0_solver"):
            ss.sample(gm.model(sde, "flow"), sde, x_T, solver="dpm_solver_2", nfe=12)
    finally:
        del REGISTRY["toy_alpha0_solver"]


def test_grid_and_adaptive_solvers_are_two_types():
    """The type of a registry entry says how it runs (no kind string): grid solvers have a step function and an NFE
    rule, adaptive ones a run function; SolverSpec(step=...) / SolverSpec(run=...) build the one or the other."""
    grid = {n for n, s in REGISTRY.items() if isinstance(s, GridSolver)}
    adaptive = {n for n, s in REGISTRY.items() if isinstance(s, AdaptiveSolver)}
    assert grid | adaptive == set(REGISTRY) and not grid & adaptive
    assert {"euler", "ddim", "dpmpp_2m", "pc", "ipndm"} <= grid
    assert {"dopri5", "dopri5_shampine", "tsit5", "bosh3", "vern6", "vern7", "adaptive_sde"} <= adaptive
    assert not hasattr(REGISTRY["dopri5"], "steps_for_nfe") and not hasattr(REGISTRY["euler"], "kind")
    assert REGISTRY["pc"].nfe_for_steps(10) == 20 and REGISTRY["dpm_solver_2"].steps_for_nfe(12) == 6
    assert type(SolverSpec("toy", step=REGISTRY["euler"].step)) is GridSolver
    assert type(SolverSpec("toy", run=REGISTRY["dopri5"].run)) is AdaptiveSolver
    with pytest.raises(TypeError, match="exactly one of step= .* or run="):
        SolverSpec("toy")
    with pytest.raises(ValueError, match="needs a step function"):
        GridSolver("toy")
    with pytest.raises(ValueError, match="needs a run function"):
        AdaptiveSolver("toy")


def test_a_solver_registered_in_its_family_file_is_everywhere():
    """Adding a grid solver touches one file, its family file: the entry registered there is all the registry-driven
    places need (sample, list_solvers, the refusals' lists of fitting solvers, the alpha = 0 list, the command line's
    --solver, work-precision runs)."""
    from scoresolve.cli.sample import solver_name
    from scoresolve.compare import work_precision
    from scoresolve.solvers import _registry
    from scoresolve.solvers.multistep import dpmpp_2m_step

    toy = GridSolver("toy_family_solver", step=dpmpp_2m_step, options=dict(REGISTRY["dpmpp_2m"].options),
                     prepare=REGISTRY["dpmpp_2m"].prepare, order=2, requires=frozenset({"gaussian_kernel"}),
                     starts_at_alpha0=True, description="a copy of dpmpp_2m, registered as a family file would")
    register(toy)
    try:
        vp = ss.VPSDE()
        gm, x_T = _problem(vp)
        out = ss.sample(gm.score_fn(vp), vp, x_T, solver="toy_family_solver", nfe=10, grid="logsnr")
        ref = ss.sample(gm.score_fn(vp), vp, x_T, solver="dpmpp_2m", nfe=10, grid="logsnr")
        assert torch.equal(out.x, ref.x) and bool((torch.as_tensor(out.nfe) == 10).all())
        assert ss.list_solvers()["toy_family_solver"].startswith("a copy of dpmpp_2m")
        assert "toy_family_solver" in fitting_solvers(vp) and "toy_family_solver" not in fitting_solvers(
            NonGaussianKernel())
        assert "toy_family_solver" in _registry.ALPHA0_SOLVERS and solver_name("toy_family_solver")
        runs = work_precision(gm.score_fn(vp), vp, x_T, ["toy_family_solver@logsnr"], nfes=[10], reference=ref.x)
        assert len(runs) == 1 and runs[0].error == 0.0
    finally:
        del REGISTRY["toy_family_solver"]


def test_sample_and_log_likelihood_choose_the_same_time_variable_by_the_same_rule():
    """The log-SNR where the schedule jumps in t (DiscreteVPSDE), t elsewhere: in sampling and in likelihood alike.
    (Before the one solve path, sample(solver="dopri5") integrated a DiscreteVPSDE in t: 127 NFE against 100.)"""
    gm = ss.GaussianMixture.random(8, 4, seed=0)
    for sde, expect in ((ss.DiscreteVPSDE.linear(), "logsnr"), (ss.VPSDE(), "t")):
        x_T = sde.prior_sample((8, 8), generator=torch.Generator().manual_seed(0), dtype=F64)
        kw = dict(solver="dopri5", rtol=1e-5, atol=1e-5)
        sol = {tv: ss.sample(gm.score_fn(sde), sde, x_T, time_variable=tv, **kw) for tv in (None, "t", "logsnr")}
        assert sol[None].stats["time_variable"] == expect
        assert torch.equal(sol[None].x, sol[expect].x) and torch.equal(sol[None].nfe, sol[expect].nfe)
        x = gm.sample_marginal(4, 1e-3, sde, generator=torch.Generator().manual_seed(1), dtype=F64)
        lkw = dict(divergence="exact", rtol=1e-4, atol=1e-4, t_eps=1e-3)
        ll = {tv: ss.log_likelihood(gm.score_fn(sde), sde, x, time_variable=tv, **lkw) for tv in (None, "t", "logsnr")}
        assert torch.equal(ll[None].log_prob, ll[expect].log_prob) and torch.equal(ll[None].nfe, ll[expect].nfe)
        other = "t" if expect == "logsnr" else "logsnr"
        assert not torch.equal(sol[None].nfe, sol[other].nfe) and not torch.equal(ll[None].nfe, ll[other].nfe)


def test_discrete_schedule_sampling_is_cheaper_in_the_log_snr():
    sde = ss.DiscreteVPSDE.linear()
    gm = ss.GaussianMixture.random(8, 4, seed=0)
    x_T = sde.prior_sample((8, 8), generator=torch.Generator().manual_seed(0), dtype=F64)
    default = ss.sample(gm.score_fn(sde), sde, x_T, solver="dopri5", rtol=1e-5, atol=1e-5)
    in_t = ss.sample(gm.score_fn(sde), sde, x_T, solver="dopri5", rtol=1e-5, atol=1e-5, time_variable="t")
    assert float(default.nfe.double().mean()) < 0.9 * float(in_t.nfe.double().mean())


def test_sample_takes_its_options_by_keyword_only():
    sde = ss.VPSDE()
    gm, x_T = _problem(sde)
    with pytest.raises(TypeError):
        ss.sample(gm.score_fn(sde), sde, x_T, "ddim")  # type: ignore[misc]


def test_divergence_estimator_objects_give_the_results_of_the_named_ones():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(4, 2, seed=3)
    x = gm.sample_marginal(5, 1e-3, sde, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(rtol=1e-5, atol=1e-5, t_eps=1e-3)
    a = ss.log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", exact_chunk=3, **kw)
    b = ss.log_likelihood(gm.score_fn(sde), sde, x, divergence=ExactDivergence(3), **kw)
    assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.nfe, b.nfe)
    for per in ("solve", "step"):
        a = ss.log_likelihood(gm.score_fn(sde), sde, x, probes=3, probe="gaussian", probes_per=per,
                              generator=torch.Generator().manual_seed(4), **kw)
        est = HutchinsonDivergence(3, "gaussian", per, torch.Generator().manual_seed(4))
        b = ss.log_likelihood(gm.score_fn(sde), sde, x, divergence=est, **kw)
        assert torch.equal(a.log_prob, b.log_prob) and torch.equal(a.std_error, b.std_error)
    with pytest.raises(ValueError, match="probes must be >= 1"):
        HutchinsonDivergence(0)
    with pytest.raises(ValueError, match="exact_chunk"):
        ExactDivergence(0)


def test_log_likelihood_takes_registry_solver_names():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 2, seed=0)
    x = gm.sample_marginal(3, 1e-3, sde, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match="unknown solver 'ddim'.*dopri5"):
        ss.log_likelihood(gm.score_fn(sde), sde, x, solver="ddim")
    with pytest.raises(ValueError, match="unknown solver 'adaptive_sde'"):
        ss.log_likelihood(gm.score_fn(sde), sde, x, solver="adaptive_sde")


class _X0Flow(ss.ReverseProcess):
    """dx/dt = (x - x0_hat(x, t)) / t: the PF-ODE of x_t = x_0 + t z written with an x0 prediction (the form of a
    Poisson-flow ODE in sigma), from the network's raw output."""

    def drift_at(self, x, t):
        return (x - self.score.raw(x, t)) / t[:, None]

    def with_score(self, score):
        return _X0Flow(self.sde, score, self.diffusion_scale)


class ToyX0Process(ss.Process):
    """Not a ForwardSDE: its own schedule sigma(t) = t on [0, T], its own prior N(0, (s0^2 + T^2) I) (exact for data
    N(0, s0^2 I)), a PF-ODE in the x0 prediction, and no Gaussian-kernel or reverse-SDE machinery declared."""

    reverse_sde = False
    gaussian_kernel = False

    def __init__(self, s0: float = 0.5, T: float = 2.0) -> None:
        self.s0, self.T = s0, T

    def __repr__(self) -> str:
        return f"ToyX0Process(s0={self.s0}, T={self.T})"

    def sigma(self, t, *, check=True):
        return torch.as_tensor(t)

    def prior_sample(self, shape, generator=None, dtype=None, device=None):
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return z * (self.s0**2 + self.T**2) ** 0.5

    def prior_log_prob(self, z):
        var = self.s0**2 + self.T**2
        D = z[0].numel()
        return -0.5 * z.flatten(1).square().sum(1) / var - 0.5 * D * math.log(2 * math.pi * var)

    def probability_flow(self, score):
        return _X0Flow(self, score, 0.0)

    def x0_net(self, x, t):  # E[x_0 | x_t] for data N(0, s0^2 I)
        return (self.s0**2 / (self.s0**2 + t**2))[:, None] * x


def test_a_process_that_is_no_forward_sde_runs_the_solvers_that_need_nothing_of_it():
    """The contract lets in a process with another ODE and prior (as Poisson flows will be) without touching solvers:
    euler, heun and dopri5 sample it, log_likelihood integrates it, the others are refused by capability."""
    proc = ToyX0Process()
    x_T = proc.prior_sample((5, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    t_eps = 1e-2
    exact = x_T * math.sqrt((proc.s0**2 + t_eps**2) / (proc.s0**2 + proc.T**2))  # x_t grows like sqrt(s0^2 + t^2)
    for solver, kw, tol in (("heun", {"nfe": 199}, 5e-4), ("dopri5", {"rtol": 1e-8, "atol": 1e-8}, 1e-6)):
        out = ss.sample(proc.x0_net, proc, x_T, solver=solver, t_eps=t_eps, **kw)
        assert float((out.x - exact).abs().max()) < tol, solver
    for solver in ("ddim", "dpmpp_2m", "euler_maruyama"):
        with pytest.raises(ss.IncompatibleProcessError, match="solver '" + solver + "' requires"):
            ss.sample(proc.x0_net, proc, x_T, solver=solver, nfe=10, t_eps=t_eps)
    with pytest.raises(ss.IncompatibleProcessError, match="'reverse_sde'"):
        ss.sample(proc.x0_net, proc, x_T, solver="euler", nfe=10, t_eps=t_eps, diffusion=1.0)
    # log p_{t_eps}(x) = log N(x; 0, (s0^2 + t_eps^2) I), exact (the prior is exact too)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.7
    var = proc.s0**2 + t_eps**2
    ref = -0.5 * x.square().sum(1) / var - 1.5 * math.log(2 * math.pi * var)
    for div in ("exact", "hutchinson"):
        res = ss.log_likelihood(proc.x0_net, proc, x, divergence=div, probes=1, rtol=1e-8, atol=1e-8, t_eps=t_eps,
                                generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(res.log_prob, ref, rtol=0, atol=1e-6)  # the Jacobian is a multiple of I


NOISY_RUNS = (("dpmpp_2m_sde", {}, None), ("euler_maruyama", {}, None), ("ddim", {"eta": 1.0}, None),
              ("euler", {}, 1.0))
"""(solver, options, diffusion) of runs that draw noise: they require a reverse SDE."""


def test_the_diffusers_scheduler_checks_the_process_like_sample(monkeypatch):
    """ScoresolveScheduler runs a grid solver's steps itself (not through sample()): it makes the same check."""
    pytest.importorskip("diffusers")
    from scoresolve.adapters import scheduler as sch

    ok = sch.ScoresolveScheduler(solver="dpmpp_2m_sde")  # the DDPM schedule has every capability
    assert ok.sde.capabilities() >= {"reverse_sde", "gaussian_kernel"}
    monkeypatch.setattr(sch, "sde_from_scheduler", lambda config: NoReverseSDE())
    for solver, options, diffusion in NOISY_RUNS:
        with pytest.raises(ss.IncompatibleProcessError, match=f"solver '{solver}' requires the capability "
                                                              "'reverse_sde'.*solvers that fit it: .*dpmpp_2m"):
            sch.ScoresolveScheduler(solver=solver, solver_options=options, diffusion=diffusion)
    sch.ScoresolveScheduler(solver="dpmpp_2m")  # a solver that fits is taken
    monkeypatch.setattr(sch, "sde_from_scheduler", lambda config: NonGaussianKernel())
    with pytest.raises(ss.IncompatibleProcessError, match="solver 'dpmpp_2m' requires the capability 'gaussian_ke"):
        sch.ScoresolveScheduler(solver="dpmpp_2m")


def test_the_k_diffusion_sampler_checks_the_process_like_sample(monkeypatch):
    from scoresolve.adapters import k_diffusion as kd

    kd.k_diffusion_sampler("dpmpp_2m_sde")  # EDM's process has every capability
    monkeypatch.setattr(kd, "_process", lambda kind, sigma_max: NoReverseSDE())
    for solver, options, diffusion in NOISY_RUNS:
        with pytest.raises(ss.IncompatibleProcessError, match=f"solver '{solver}' requires the capability "
                                                              "'reverse_sde'.*solvers that fit it: .*dpmpp_2m"):
            kd.k_diffusion_sampler(solver, diffusion=diffusion, **options)
    kd.k_diffusion_sampler("dpmpp_2m")
    monkeypatch.setattr(kd, "_process", lambda kind, sigma_max: NonGaussianKernel())
    with pytest.raises(ss.IncompatibleProcessError, match="solver 'unipc' requires the capability 'gaussian_kernel'"):
        kd.k_diffusion_sampler("unipc", sde="flow")
