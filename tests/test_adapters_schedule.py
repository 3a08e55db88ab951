"""diffusers' DDPM-family schedulers reproduced by scoresolve solves (scoresolve.adapters.diffusers_schedule).

Each supported configuration runs diffusers' own loop (set_timesteps; for t in timesteps: x = step(model(
scale_model_input(x, t), t), t, x)) on a small nonlinear eps/v/x0 network and compares it with ``scoresolve.sample``
on `diffusers_schedule`: against diffusers as shipped (float32 sigmas and state) to float32 rounding, and against the
same diffusers code with its float32 dtypes replaced by float64 to < 1e-12 relative (the same arithmetic). Stochastic
schedulers share one CPU torch.Generator seed with our solve. Unsupported configurations raise a ValueError naming the
option.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

import scoresolve as ss
from scoresolve import VPSDE, GaussianMixture
from scoresolve.adapters import X0Processing, diffusers_schedule, from_diffusers, scheduler_grid

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
D = 48


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Net:
    """A fixed random nonlinear prediction net(x, timestep) (timestep 0-d or [batch], int or float), as a tuple."""

    def __init__(self, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.scale = scale
        self.seen: list[float] = []

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        t = torch.as_tensor(timestep).to(x.dtype).reshape(-1)
        self.seen.append(float(t[0]))
        tt = (t / 1000).reshape(-1, 1)
        xf = x.flatten(1)
        A, b = self.A.to(x.dtype), self.b.to(x.dtype)
        out = torch.tanh(xf @ A.T) * (1 + tt) + b * torch.cos(3 * tt) + 0.3 * xf
        return ((self.scale * out).reshape(x.shape),)


@pytest.fixture
def x_T() -> torch.Tensor:
    return torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run_diffusers(net, sch, latents, seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    kw = {"generator": gen} if "generator" in inspect.signature(sch.step).parameters else {}
    x = latents
    with torch.no_grad():
        for t in sch.timesteps:
            out = net(sch.scale_model_input(x, t), t)[0]
            x = sch.step(out, t, x, **kw).prev_sample
    return x


def ours(net, sch, x_T, seed=None):
    schedule = diffusers_schedule(sch)
    base, sde = from_diffusers(net, sch)
    model = schedule.model(base)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    net.seen.clear()
    with torch.no_grad():
        sol = ss.sample(model, sde, x_T, generator=gen, **schedule.sample_kwargs())
    return schedule, sol, list(net.seen)


THRESH = dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
KARRAS = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")
LEAD = dict(timestep_spacing="leading")
# (class, config, n, expected solver, options checked)
CASES = [
    (DDIMScheduler, dict(clip_sample=False), 10, "ddim", {}),
    (DDIMScheduler, dict(clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False,
                         timestep_spacing="trailing"), 10, "ddim", {}),
    (DDPMScheduler, dict(clip_sample=False), 10, "ddim", {"eta": 1.0}),
    (DDPMScheduler, dict(), 10, "ddim", {"eta": 1.0}),  # clip_sample=True: clipped x0
    (DDPMScheduler, dict(THRESH), 10, "ddim", {"eta": 1.0}),
    (DDPMScheduler, dict(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction"), 8, "ddim",
     {"eta": 1.0}),
    (DDPMScheduler, dict(clip_sample=False, timestep_spacing="trailing"), 8, "ddim", {"eta": 1.0}),
    (DDPMScheduler, dict(clip_sample=False, prediction_type="v_prediction"), 8, "ddim", {"eta": 1.0}),
    (EulerDiscreteScheduler, dict(LEAD), 10, "ddim", {}),
    (EulerDiscreteScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction"), 10, "ddim", {}),
    (EulerDiscreteScheduler, dict(), 10, "ddim", {}),  # linspace: 999/9 = 111, integer timesteps
    (EulerAncestralDiscreteScheduler, dict(LEAD), 10, "ddim", {"eta": 1.0}),
    (EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing"), 12, "ddim", {"eta": 1.0}),
    (DPMSolverMultistepScheduler, dict(), 10, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(THRESH), 10, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(KARRAS), 10, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(KARRAS, lower_order_final=False), 10, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min"), 10, "dpmpp_2m", {"lower_order_final": True}),
    (DPMSolverMultistepScheduler, dict(KARRAS), 20, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True, final_sigmas_type="sigma_min"), 10, "dpmpp_2m",
     {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), 10, "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver", solver_order=1, final_sigmas_type="sigma_min"), 10,
     "ddim", {}),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), 10, "dpmpp_2m_sde", {"eta": 1.0}),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=1), 10, "ddim", {"eta": 1.0}),
    (UniPCMultistepScheduler, dict(), 10, "unipc", {"order": 2, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(THRESH), 10, "unipc", {"order": 2, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(KARRAS), 10, "unipc",
     {"order": 2, "lower_order_final": False, "final_corrector": True}),
    (UniPCMultistepScheduler, dict(KARRAS, solver_order=3), 3, "unipc", {"order": 3, "final_corrector": True}),
    (UniPCMultistepScheduler, dict(solver_order=3), 3, "unipc", {"order": 3}),
    (UniPCMultistepScheduler, dict(final_sigmas_type="sigma_min", solver_order=1), 10, "unipc", {"order": 1}),
    (UniPCMultistepScheduler, dict(final_sigmas_type="sigma_min", solver_order=2), 10, "unipc", {"order": 2}),
    (DEISMultistepScheduler, dict(), 10, "deis", {"order": 2, "basis": "log_rho", "lower_order_final": True}),
    (DEISMultistepScheduler, dict(solver_order=3), 10, "deis", {"order": 3, "basis": "log_rho"}),
    (DEISMultistepScheduler, dict(solver_order=3), 20, "deis", {"order": 3, "lower_order_final": False}),
    (DEISMultistepScheduler, dict(THRESH, use_karras_sigmas=True), 10, "deis",
     {"order": 2, "lower_order_final": False}),
]


def _id(c):
    return f"{c[0].__name__[:-9]}-{c[1]}-n{c[2]}"


@pytest.mark.parametrize("cls,cfg,n,solver,options", CASES, ids=[_id(c) for c in CASES])
def test_schedulers_reproduced(x_T, diffusers_in_float64, cls, cfg, n, solver, options):
    net = Net()
    seed = 7
    sch = cls(**cfg)
    sch.set_timesteps(n)
    schedule, sol, _ = ours(net, sch, x_T, seed)
    assert schedule.solver == solver
    assert {k: schedule.options.get(k) for k in options} == options
    stoch = seed if schedule.stochastic else None
    if schedule.stochastic and cls is DPMSolverMultistepScheduler:  # its noise is drawn in float32
        schedule, sol, _ = ours(net, sch, x_T.float(), seed)
        sch.set_timesteps(n)
    ref32 = run_diffusers(net, sch, (x_T / schedule.input_scale).to(sol.x.dtype), stoch)
    assert rel(sol.x.double(), ref32.double()) < 2e-5

    diffusers_in_float64(cls)
    sch64 = cls(**cfg)
    sch64.set_timesteps(n)
    schedule, sol, seen_ours = ours(net, sch64, x_T, seed)
    net.seen.clear()
    ref64 = run_diffusers(net, sch64, x_T / schedule.input_scale, stoch)
    err = rel(sol.x, ref64)
    # DDPM "trailing" starts at alphas_cumprod[999] = 4e-5: diffusers' and our (equal) formulas round differently
    # and 1/alpha^2 ~ 2.5e4 amplifies it
    tol = 1e-10 if cls is DDPMScheduler and cfg.get("timestep_spacing") == "trailing" else 1e-12
    assert err < tol, err
    # the network saw diffusers' very timesteps (diffusers may make one more, wasted, evaluation at the end)
    assert seen_ours == net.seen[: len(seen_ours)] and len(net.seen) - len(seen_ours) in (0, 1)


REFUSED = [
    (DDIMScheduler, dict(), "clip_sample=True"),
    (DDIMScheduler, dict(clip_sample=False, thresholding=True), "thresholding"),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="linspace"), "not the next timestep"),
    (DDPMScheduler, dict(variance_type="fixed_large"), "variance_type"),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True), "fractional timesteps"),
    (EulerDiscreteScheduler, dict(LEAD, final_sigmas_type="sigma_min"), "final_sigmas_type"),
    (DPMSolverMultistepScheduler, dict(solver_order=3), "solver_order=3"),
    (DPMSolverMultistepScheduler, dict(solver_type="heun"), "solver_type='heun'"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type='dpmsolver' and solver_order=2"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type='sde-dpmsolver'"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"),
     "order schedule"),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "timesteps"),
    (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "flow_scheduler_grid"),
    (UniPCMultistepScheduler, dict(solver_type="bh1"), "solver_type='bh1'"),
    (UniPCMultistepScheduler, dict(predict_x0=False), "predict_x0"),
    (UniPCMultistepScheduler, dict(disable_corrector=[0]), "disable_corrector"),
    (UniPCMultistepScheduler, dict(solver_order=3), "order schedule"),
    (UniPCMultistepScheduler, dict(lower_order_final=False), "lower_order_final=False"),
    (DEISMultistepScheduler, dict(solver_order=3, use_karras_sigmas=True), "order schedule"),
    (HeunDiscreteScheduler, dict(), "HeunDiscreteScheduler is not reproduced"),
    (KDPM2DiscreteScheduler, dict(), "KDPM2DiscreteScheduler is not reproduced"),
    (LMSDiscreteScheduler, dict(), "LMSDiscreteScheduler is not reproduced"),
    (PNDMScheduler, dict(), "PNDMScheduler is not reproduced"),
    (DPMSolverSinglestepScheduler, dict(), "DPMSolverSinglestepScheduler is not reproduced"),
]


@pytest.mark.parametrize("cls,cfg,match", REFUSED, ids=[f"{c[0].__name__[:-9]}-{c[2]}" for c in REFUSED])
def test_refusals(cls, cfg, match):
    sch = cls(**cfg)
    sch.set_timesteps(10)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        diffusers_schedule(sch)


def test_refused_configs_do_differ(x_T):
    """DDIM's clip_sample is refused for a reason: clipping x0 in our data-prediction ddim differs from diffusers."""
    sch = DDIMScheduler()  # clip_sample=True
    sch.set_timesteps(10)
    ref = run_diffusers(Net(scale=4.0), sch, x_T)
    model, sde = from_diffusers(Net(scale=4.0), sch)
    clipped = diffusers_schedule.__globals__["ProcessedX0Model"](model, X0Processing(clip=1.0))
    grid, denoise = scheduler_grid(sch)
    assert rel(ss.sample(clipped, sde, x_T, solver="ddim", grid=grid, denoise=denoise).x, ref) > 1e-4


def test_scheduler_grid_repeated_final_sigma():
    sch = DPMSolverMultistepScheduler(**KARRAS)
    sch.set_timesteps(8)
    with pytest.warns(UserWarning, match="rounded timestep"):
        grid, denoise = scheduler_grid(sch)
    assert not denoise and grid.numel() == 8 and bool((grid[1:] < grid[:-1]).all())
    sch = UniPCMultistepScheduler(**KARRAS)
    sch.set_timesteps(8)
    with pytest.raises(ValueError, match="final_corrector"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler_grid(sch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert scheduler_grid(sch, drop_repeated_final=True)[0].numel() == 8


def test_x0_processing_is_diffusers_threshold():
    sch = DPMSolverMultistepScheduler(**THRESH)
    x0 = 3 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proc = X0Processing(True, 0.9, 1.5)
    torch.testing.assert_close(proc(x0), sch._threshold_sample(x0.clone()), rtol=0, atol=0)
    assert X0Processing(clip=2.0)(x0).abs().max() == 2.0


def _dpmpp_3m_order(monkeypatch, coefficient: float) -> float:
    """Observed order of DPM-Solver++(3M) on the exact PF-ODE flow of a Gaussian, with the third-order term weighted
    by coefficient * h^3 phi_3(-h) (ours: 2; diffusers and k-diffusion: 1)."""
    from scoresolve.solvers import multistep

    real_phi = multistep.phi
    monkeypatch.setattr(multistep, "phi", lambda k, z: real_phi(k, z) * (coefficient / 2 if k == 3 else 1.0))
    sde = VPSDE()
    gm = GaussianMixture([1.0], [[1.0, -2.0, 0.5]], torch.tensor([[0.3, 0.05, 1.5]], dtype=torch.float64))
    x_T = sde.prior_sample((32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gm.pf_ode_flow(x_T, sde.T, 1e-3, sde)
    e = [rel(ss.sample(gm.score_fn(sde), sde, x_T, solver="dpmpp_3m", steps=n, grid="logsnr",
                       lower_order_final=False).x, exact) for n in (40, 80, 160)]
    monkeypatch.setattr(multistep, "phi", real_phi)
    return math.log2(e[1] / e[2])


def test_dpmpp_3m_coefficient_is_third_order(monkeypatch):
    """The exact integral of the Newton quadratic gives 2 h^3 phi_3 p2 (scoresolve's dpmpp_3m): order 3. diffusers'
    DPMSolverMultistep(solver_order=3) and k-diffusion's sample_dpmpp_3m_sde(eta=0) use h^3 phi_3 p2 (their
    ``(phi_2 - 1/2) D2`` term): with it the method is only second order, which is why solver_order=3 is refused."""
    ours = _dpmpp_3m_order(monkeypatch, 2.0)
    theirs = _dpmpp_3m_order(monkeypatch, 1.0)
    assert ours > 2.7, ours
    assert 1.7 < theirs < 2.3, theirs
