"""diffusers' flow-matching schedulers reproduced by scoresolve's solvers (scoresolve.adapters.diffusers_flow).

Each supported configuration runs diffusers' own loop (set_timesteps; for t in timesteps: x = step(model(x, t), t, x))
on a small nonlinear velocity model and compares it with ``scoresolve.sample`` on `flow_scheduler_grid`:

- against diffusers as shipped (float32 sigmas, float32 state inside ``step``): to float32 rounding (< 5e-6
  relative; ~1e-7 typically);
- against the same diffusers code with its float32 dtypes replaced by float64 (`diffusers_in_float64`): the two loops
  are the same arithmetic, to < 1e-13 relative (0 to 6e-16 observed).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import scoresolve as ss
from scoresolve.adapters import (
    FlowTimestep,
    FlowTransformerNet,
    flow_scheduler_grid,
    from_diffusers_flow,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver.*:FutureWarning")]

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
D = 48


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class VelocityNet:
    """A fixed random nonlinear velocity u(x, timestep) (timestep: 0-d or [batch], float or int), returning a tuple."""

    def __init__(self, dtype: torch.dtype = torch.float64, scale: float = 1000.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.A = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
        self.b = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
        self.scale = scale
        self.seen: list[float] = []

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        t = torch.as_tensor(timestep).to(x.dtype).reshape(-1)
        self.seen.append(float(t[0]))
        tt = (t / self.scale).reshape(-1, 1)
        xf = x.flatten(1)
        u = torch.tanh(xf @ self.A.T) * (1 + tt) + self.b * torch.cos(3 * tt) - 0.5 * xf
        return (u.reshape(x.shape),)


@pytest.fixture
def x_T() -> torch.Tensor:
    return torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run_diffusers(net, scheduler, x, n=None, time_scale=1.0, **set_kw):
    scheduler.set_timesteps(n, **set_kw)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, t * time_scale if time_scale != 1.0 else t)[0]
            x = scheduler.step(out, t, x).prev_sample
    return x


# (scheduler class, config, set_timesteps kwargs, expected solver, expected options)
MU = math.log(ss.flux_shift(1024))
CASES = [
    (FlowMatchEulerDiscreteScheduler, {}, dict(n=10), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), dict(n=10), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0), dict(n=2), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), dict(n=12, mu=MU), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(n=12, mu=0.8),
     "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True),
     dict(sigmas=np.linspace(1.0, 1 / 12, 12), mu=MU), "euler", {}),  # FluxPipeline's call
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0, shift_terminal=0.1), dict(n=10), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0, use_karras_sigmas=True), dict(n=10), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0, use_exponential_sigmas=True), dict(n=10), "euler", {}),
    (FlowMatchEulerDiscreteScheduler, dict(shift=3.0, use_beta_sigmas=True), dict(n=10), "euler", {}),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0), dict(n=10), "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0), dict(n=20), "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0, solver_order=1), dict(n=10), "ddim", {}),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0, final_sigmas_type="sigma_min"), dict(n=10),
     "dpmpp_2m", {"lower_order_final": True}),
    (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0, final_sigmas_type="sigma_min", lower_order_final=False),
     dict(n=10), "dpmpp_2m", {"lower_order_final": False}),
    (DPMSolverMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), dict(n=10, mu=MU), "dpmpp_2m",
     {"lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0), dict(n=10), "unipc",
     {"order": 2, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0, solver_order=1), dict(n=10), "unipc",
     {"order": 1, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0, solver_order=3), dict(n=3), "unipc",
     {"order": 3, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), dict(n=10, mu=MU), "unipc",
     {"order": 2, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0, shift_terminal=0.05), dict(n=10), "unipc",
     {"order": 2, "lower_order_final": False}),
    (UniPCMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), dict(sigmas=np.linspace(1.0, 1 / 8, 8), mu=MU),
     "unipc", {"order": 2, "lower_order_final": False}),
]


def _ids(case):
    cls, cfg, kw = case[:3]
    extra = {k: v for k, v in cfg.items() if k not in FLOW}
    return f"{cls.__name__[:-9]}-{extra}-{ {k: (v if k != 'sigmas' else 'custom') for k, v in kw.items()} }"


@pytest.mark.parametrize("cls,cfg,kw,solver,options", CASES, ids=[_ids(c) for c in CASES])
def test_flow_schedulers_reproduced(x_T, diffusers_in_float64, cls, cfg, kw, solver, options):
    kw = dict(kw)
    n = kw.pop("n", None)
    net = VelocityNet()

    def ours(scheduler):
        schedule = flow_scheduler_grid(scheduler, n, **kw)
        model, sde = from_diffusers_flow(net, scheduler)
        assert isinstance(sde, ss.RectifiedFlow) and model.prediction == "flow"
        net.seen.clear()
        with torch.no_grad():
            sol = ss.sample(model, sde, x_T, **schedule.sample_kwargs())
        assert int(torch.as_tensor(sol.nfe).max()) == len(net.seen)
        return schedule, model, sde, sol, list(net.seen)

    # diffusers as shipped: float32 sigmas and a float32 state inside step()
    sch = cls(**cfg)
    schedule, _, _, sol, _ = ours(sch)
    assert (schedule.solver, schedule.options, schedule.denoise) == (solver, options,
                                                                      cfg.get("final_sigmas_type") != "sigma_min")
    net.seen.clear()
    ref32 = run_diffusers(net, sch, x_T, n, **kw)
    assert len(sch.timesteps) == len(net.seen)
    assert rel(sol.x, ref32) < 5e-6
    torch.testing.assert_close(schedule.grid, sch.sigmas.double()[: schedule.grid.numel()], rtol=1e-6, atol=0)

    # the same diffusers code in float64: the same arithmetic as ours
    diffusers_in_float64(cls)
    sch64 = cls(**cfg)
    schedule, model, sde, sol, ours_times = ours(sch64)
    net.seen.clear()
    ref64 = run_diffusers(net, sch64, x_T, n, **kw)
    assert rel(sol.x, ref64) < 1e-13
    assert sch64.sigmas.dtype == torch.float64
    torch.testing.assert_close(schedule.grid, sch64.sigmas[: schedule.grid.numel()], rtol=1e-15, atol=0)
    assert net.seen == ours_times  # the network saw diffusers' very timesteps
    assert ours_times == schedule.timesteps.tolist()

    # sanity: the last step matters (without the denoise step, or with the final point dropped, the result differs)
    other = dict(schedule.sample_kwargs())
    if schedule.denoise:
        other["denoise"] = False
    else:
        other["grid"] = schedule.grid[:-1]
    with torch.no_grad():
        assert rel(ss.sample(model, sde, x_T, **other).x, ref64) > 1e-4


def test_float32_network_sees_diffusers_timesteps(x_T):
    x = x_T.float()
    for cls, cfg in ((FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
                     (DPMSolverMultistepScheduler, dict(FLOW, flow_shift=3.0)),
                     (UniPCMultistepScheduler, dict(FLOW, flow_shift=3.0))):
        net = VelocityNet(torch.float32)
        sch = cls(**cfg)
        ref = run_diffusers(net, sch, x, 10)
        theirs = list(net.seen)
        net.seen.clear()
        model, sde = from_diffusers_flow(net, sch)
        ours = ss.sample(model, sde, x, **flow_scheduler_grid(sch, 10).sample_kwargs())
        assert net.seen == theirs, cls.__name__
        assert rel(ours.x.double(), ref.double()) < 1e-5, cls.__name__


def test_flux_pipeline_convention(x_T):
    """FluxPipeline: sigmas = linspace(1, 1/n, n), mu = calculate_shift(seq_len), transformer(timestep=t / 1000)."""
    n, L = 8, 4096
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    kw = dict(sigmas=np.linspace(1.0, 1 / n, n), mu=math.log(ss.flux_shift(L)))
    net = VelocityNet(scale=1.0)  # Flux transformers take sigma (the pipeline divides the timestep by 1000)
    ref = run_diffusers(net, sch, x_T, time_scale=1 / 1000, **kw)
    model, sde = from_diffusers_flow(net, sch, time_input="sigma")
    ours = ss.sample(model, sde, x_T, **flow_scheduler_grid(sch, **kw).sample_kwargs())
    assert rel(ours.x, ref) < 5e-6


def _calculate_shift():
    """diffusers' Flux calculate_shift (imported, or read from its source when transformers is missing)."""
    try:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return calculate_shift
    except ImportError:
        path = Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
        tree = ast.parse(path.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
        scope: dict = {}
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
        return scope["calculate_shift"]


def test_flux_shift_is_calculate_shift():
    calculate_shift = _calculate_shift()
    for L in (1, 256, 1024, 777, 4096, 8192):
        assert math.log(ss.flux_shift(L)) == pytest.approx(calculate_shift(L), rel=1e-14, abs=1e-15)
    assert math.log(ss.flux_shift(1000, 128, 2048, 0.3, 1.3)) == pytest.approx(
        calculate_shift(1000, 128, 2048, 0.3, 1.3), rel=1e-14)
    # mu = log(flux_shift): the exponential time shift is sd3_shift with s = e^mu
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    s = ss.flux_shift(1024)
    torch.testing.assert_close(ss.sd3_shift(t, s), s / (s + (1 / t - 1)), rtol=1e-14, atol=0)


def test_grid_from_config_and_scheduler_untouched():
    for cls, cfg, kw in ((FlowMatchEulerDiscreteScheduler, dict(shift=3.0), {}),
                         (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), dict(mu=0.7)),
                         (DPMSolverMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), dict(mu=0.7)),
                         (UniPCMultistepScheduler, dict(FLOW, flow_shift=5.0), {})):
        sch = cls(**cfg)
        before = dict(sch.config)
        a = flow_scheduler_grid(sch, 9, **kw)
        b = flow_scheduler_grid({**sch.config, "_class_name": cls.__name__}, 9, **kw)  # as saved
        assert dict(sch.config) == before  # diffusers' DPM set_timesteps(mu=) would write flow_shift = e^mu
        torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)
        assert a.sample_kwargs().keys() == b.sample_kwargs().keys()
    # set_shift() on an instance is honoured (as diffusers' set_timesteps does)
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_shift(2.0)
    sch.set_timesteps(6)
    torch.testing.assert_close(flow_scheduler_grid(sch, 6).grid, sch.sigmas[:-1].double(), rtol=1e-6, atol=0)


REFUSED = [
    (FlowMatchEulerDiscreteScheduler, dict(invert_sigmas=True), dict(n=10), "invert_sigmas"),
    (FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), dict(n=10), "stochastic_sampling"),
    (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), dict(n=10), "needs mu"),
    (FlowMatchEulerDiscreteScheduler, {}, dict(n=1), "single step"),
    (DPMSolverMultistepScheduler, dict(FLOW, solver_order=3), dict(n=10), "solver_order=3"),
    (DPMSolverMultistepScheduler, dict(FLOW, solver_type="heun"), dict(n=10), "solver_type='heun'"),
    (DPMSolverMultistepScheduler, dict(FLOW, algorithm_type="sde-dpmsolver++"), dict(n=10), "algorithm_type"),
    (DPMSolverMultistepScheduler, dict(FLOW, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), dict(n=10),
     "algorithm_type='dpmsolver'"),
    (DPMSolverMultistepScheduler, dict(FLOW, thresholding=True), dict(n=10), "thresholding"),
    (DPMSolverMultistepScheduler, dict(FLOW, use_karras_sigmas=True), dict(n=10), "use_karras_sigmas"),
    (DPMSolverMultistepScheduler, dict(FLOW, use_lu_lambdas=True), dict(n=10), "use_lu_lambdas"),
    (DPMSolverMultistepScheduler, dict(FLOW), dict(n=10, mu=0.5), "use_dynamic_shifting"),
    (DPMSolverMultistepScheduler, dict(FLOW, final_sigmas_type="sigma_min"), dict(n=200), "strictly decreasing"),
    (UniPCMultistepScheduler, dict(FLOW, solver_type="bh1"), dict(n=10), "solver_type='bh1'"),
    (UniPCMultistepScheduler, dict(FLOW, predict_x0=False), dict(n=10), "predict_x0"),
    (UniPCMultistepScheduler, dict(FLOW, disable_corrector=[0]), dict(n=10), "disable_corrector"),
    (UniPCMultistepScheduler, dict(FLOW, final_sigmas_type="sigma_min"), dict(n=10), "final_sigmas_type"),
    (UniPCMultistepScheduler, dict(FLOW, use_exponential_sigmas=True), dict(n=10), "use_exponential_sigmas"),
    (UniPCMultistepScheduler, dict(FLOW, lower_order_final=False), dict(n=10), "lower_order_final=False"),
    (UniPCMultistepScheduler, dict(FLOW, solver_order=3), dict(n=10), "order schedule"),
    (UniPCMultistepScheduler, dict(FLOW, solver_order=5), dict(n=10), "solver_order=5"),
    (UniPCMultistepScheduler, dict(FLOW, use_dynamic_shifting=True), dict(n=10), "needs mu"),
    (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction"), dict(n=10), "use_flow_sigmas"),
    (UniPCMultistepScheduler, dict(use_flow_sigmas=True), dict(n=10), "flow_prediction"),
    (DDIMScheduler, {}, dict(n=10), "unsupported scheduler"),
]


@pytest.mark.parametrize("cls,cfg,kw,match", REFUSED, ids=[f"{c[0].__name__[:-9]}-{c[3]}" for c in REFUSED])
def test_refusals(cls, cfg, kw, match):
    kw = dict(kw)
    n = kw.pop("n")
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        flow_scheduler_grid(cls(**cfg), n, **kw)


def test_refused_configs_do_differ(x_T, diffusers_in_float64):
    """The refusals are real: the nearest scoresolve solve differs from diffusers' loop."""
    diffusers_in_float64(DPMSolverMultistepScheduler)
    diffusers_in_float64(UniPCMultistepScheduler)
    net = VelocityNet()
    base = flow_scheduler_grid(DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), 12)
    model, sde = from_diffusers_flow(net, DPMSolverMultistepScheduler(**FLOW))
    for cfg, solver in ((dict(solver_order=3, lower_order_final=False), "dpmpp_3m"),
                        (dict(solver_type="heun"), "dpmpp_2m")):
        ref = run_diffusers(net, DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0, **cfg), x_T, 12)
        for lof in (False, True):
            ours = ss.sample(model, sde, x_T, solver=solver, grid=base.grid, denoise=True, lower_order_final=lof)
            assert rel(ours.x, ref) > 1e-5
    base = flow_scheduler_grid(UniPCMultistepScheduler(**FLOW, flow_shift=3.0), 12)
    ref = run_diffusers(net, UniPCMultistepScheduler(**FLOW, flow_shift=3.0, solver_order=3), x_T, 12)
    for lof in (False, True):
        ours = ss.sample(model, sde, x_T, solver="unipc", order=3, grid=base.grid, denoise=True, lower_order_final=lof)
        assert rel(ours.x, ref) > 1e-4
    ref = run_diffusers(net, UniPCMultistepScheduler(**FLOW, flow_shift=3.0, lower_order_final=False), x_T, 12)
    assert not bool(torch.isfinite(ref).all())  # diffusers' own loop: a second-order step to sigma = 0


def test_model_conventions():
    euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500)
    model, _ = from_diffusers_flow(VelocityNet(), euler)
    assert model.time == "scaled" and model.num_timesteps == 500
    t = torch.tensor([0.5, 0.12345], dtype=torch.float64)
    torch.testing.assert_close(model.network_time(t), t * 500)
    model, _ = from_diffusers_flow(VelocityNet(), euler, time_input="sigma")
    torch.testing.assert_close(model.network_time(t), t * 500 / 1000)
    model, _ = from_diffusers_flow(VelocityNet(), UniPCMultistepScheduler(**FLOW))
    assert isinstance(model.time, FlowTimestep)
    assert model.network_time(t).tolist() == [500.0, 123.0]
    assert FlowTimestep(1000, "floor", divisor=1000.0)(t).tolist() == [0.5, 0.123]
    with pytest.raises(ValueError, match="time_input"):
        from_diffusers_flow(VelocityNet(), euler, time_input="index")
    with pytest.raises(ValueError, match="mode"):
        FlowTimestep(1000, "round")
    # a config mapping works too (with its _class_name)
    cfg = {**DPMSolverMultistepScheduler(**FLOW).config, "_class_name": "DPMSolverMultistepScheduler"}
    model, sde = from_diffusers_flow(VelocityNet(), cfg)
    assert isinstance(model.time, FlowTimestep) and isinstance(sde, ss.RectifiedFlow)
    with pytest.raises(ValueError, match="_class_name"):
        from_diffusers_flow(VelocityNet(), dict(FlowMatchEulerDiscreteScheduler().config))


def test_transformer_call_and_output_unwrapping():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    class Transformer(torch.nn.Module):  # diffusers' signature: the text embedding comes second
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict=True):
            assert encoder_hidden_states == "text"
            out = hidden_states * timestep.reshape(-1, 1)
            return Out(out) if return_dict else (out,)

    x = torch.randn(2, 5, dtype=torch.float64)
    t = torch.tensor([3.0, 4.0], dtype=torch.float64)
    net = FlowTransformerNet(Transformer())
    assert net.by_keyword
    torch.testing.assert_close(net(x, t, encoder_hidden_states="text"), x * t[:, None])
    torch.testing.assert_close(net(x, t, encoder_hidden_states="text", return_dict=False), x * t[:, None])
    plain = FlowTransformerNet(lambda a, b: [a * 2])
    assert not plain.by_keyword
    torch.testing.assert_close(plain(x, t), x * 2)
    with pytest.raises(TypeError):
        FlowTransformerNet(3)
    model, sde = from_diffusers_flow(Transformer(), FlowMatchEulerDiscreteScheduler(),
                                     net_kwargs={"encoder_hidden_states": "text"})
    u = model.flow(x, torch.full((2,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(u, x * 250)
