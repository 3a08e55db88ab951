"""compile_sampler: the recorded grid solve equals sample(), traces to one flat graph for every deterministic grid
solver, falls back with a reason when recording fails, and keeps sample()'s checks (CPU-side logic; the CUDA graph
path itself needs a GPU: benchmarks/gpu_run.sh)."""

from __future__ import annotations

import math

import pytest
import torch
from _exact import gaussian_3d, rel_rms
from _sync import count_syncs, on_device

import scoresolve as ss
import scoresolve._utils as utils
from scoresolve.solvers import REGISTRY, GridSolver
from scoresolve.solvers.calibrated import Calibration

DETERMINISTIC = sorted(n for n, s in REGISTRY.items() if isinstance(s, GridSolver) and not s.stochastic) + ["ddim"]


_NET_STORAGE: set[int] = set()  # the weights of the networks `_mlp_model` made


def _mlp_model(sde, prediction="eps", D=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))
    net = net.double().requires_grad_(False)
    _NET_STORAGE.update(p.untyped_storage().data_ptr() for p in net.parameters())
    return ss.ScoreModel(lambda x, t: net(torch.cat([x, t[:, None]], 1)), sde, prediction=prediction)


def _x(sde, B=5, D=3):
    return sde.prior_sample((B, D), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_grid_solver_traces_to_one_graph_equal_to_sample(name):
    sde = ss.VPSDE()
    model, x = _mlp_model(sde), _x(sde)
    steps = 6 if REGISTRY[name].evals() == 1 else 3
    kw = {"steps": steps} if name != "calibrated" else {
        "calibration": Calibration.base(ss.time_grid(sde, steps, "logsnr"), afs=True)}
    ref = ss.sample(model, sde, x, solver=name, **kw)
    cs = ss.compile_sampler(model, sde, x, solver=name, mode="eager", **kw)
    sol = cs(x)
    assert cs.active == "eager" and cs.fallback_reason is None
    assert torch.equal(sol.x, ref.x) and torch.equal(sol.nfe, ref.nfe) and sol.steps == ref.steps
    gm = cs.trace()  # fails on any host read of a tensor inside the loop
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("local_scalar_dense" in str(op) for op in ops)
    # every tensor the loop reads but does not compute existed before the recording (the grid and its [batch] times,
    # the network's weights): no tensor made from host data inside the loop, a host-device copy a CUDA graph cannot
    # capture
    before = {t.untyped_storage().data_ptr() for t in (cs.run.ts, *cs.run._times.values())}
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    made = [tuple(c.shape) for c in consts if c.untyped_storage().data_ptr() not in before | _NET_STORAGE]
    assert consts and not made, made
    x2 = _x(sde, B=5) * 0.5
    out = gm(x2)
    assert torch.allclose(out, ss.sample(model, sde, x2, solver=name, **kw).x, rtol=1e-12, atol=1e-12)


def test_default_sampler_is_recorded_and_accurate_on_an_exact_gaussian():
    sde, mix = ss.VPSDE(), gaussian_3d()
    model = mix.model(sde, "x0")
    x = sde.prior_sample((64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cs = ss.compile_sampler(model, sde, x, nfe=10, mode="eager")
    sol, ref = cs(x), ss.sample(model, sde, x, nfe=10)
    assert torch.equal(sol.x, ref.x) and int(sol.nfe.max()) == 10 and sol.solver == ref.solver
    exact = mix.pf_ode_flow(x, 1.0, 1e-3, sde)
    assert rel_rms(sol.x, exact) < 0.05  # the default's 10-NFE accuracy, through the recorded run


def test_cuda_graph_mode_without_cuda_falls_back_with_the_reason():
    sde = ss.VPSDE()
    model, x = _mlp_model(sde), _x(sde)
    with pytest.warns(UserWarning, match="cuda_graph.*CUDA graphs need a CUDA input.*running eagerly"):
        cs = ss.compile_sampler(model, sde, x, solver="dpmpp_2m", steps=5, mode="cuda_graph")
    assert cs.active == "eager" and "CUDA" in cs.fallback_reason
    assert torch.equal(cs(x).x, ss.sample(model, sde, x, solver="dpmpp_2m", steps=5).x)


def test_auto_on_cpu_is_eager_and_a_network_that_reads_values_falls_back_from_compile():
    sde = ss.VPSDE()
    x = _x(sde)
    assert ss.compile_sampler(_mlp_model(sde), sde, x, solver="unipc", steps=5).active == "eager"

    def branching(x, t):  # data-dependent control flow: cannot be recorded
        return -x if bool(x.sum() > 0) else x * 0.5

    with pytest.warns(UserWarning, match="mode 'compile' failed"):
        cs = ss.compile_sampler(branching, sde, x, solver="dpmpp_2m", steps=4, mode="compile")
    assert cs.active == "eager" and cs.fallback_reason
    assert torch.equal(cs(x).x, ss.sample(branching, sde, x, solver="dpmpp_2m", steps=4).x)


def test_refusals_and_input_checks():
    sde = ss.VPSDE()
    model, x = _mlp_model(sde), _x(sde)
    with pytest.raises(ValueError, match="deterministic solves only"):
        ss.compile_sampler(model, sde, x, solver="euler_maruyama", steps=4)
    with pytest.raises(ValueError, match="deterministic solves only"):
        ss.compile_sampler(model, sde, x, solver="ddim", steps=4, eta=1.0)
    with pytest.raises(ValueError, match="records a grid solver"):
        ss.compile_sampler(model, sde, x, solver="dopri5")
    with pytest.raises(ValueError, match="mode must be one of"):
        ss.compile_sampler(model, sde, x, solver="dpmpp_2m", steps=4, mode="fast")
    for kw in ({"generator": torch.Generator()}, {"seeds": [0] * 5}, {"callback": print}, {"progress": True},
               {"save_trajectory": True}, {"denoise": True}, {"rtol": 1e-3}):
        (name,) = kw
        with pytest.raises(ValueError, match=f"{name} is sample\\(\\)'s only"):  # not "unknown option of dpmpp_2m"
            ss.compile_sampler(model, sde, x, solver="dpmpp_2m", steps=4, **kw)
    with pytest.raises(ValueError, match="deterministic solves only"):
        ss.compile_sampler(model, sde, x, solver="dpmpp_2m", steps=4, diffusion=1.0)
    cs = ss.compile_sampler(model, sde, x, solver="dpmpp_2m", steps=4, diffusion=0.0)
    assert torch.equal(cs(x).x, ss.sample(model, sde, x, solver="dpmpp_2m", steps=4, diffusion=0.0).x)
    with pytest.raises(ValueError, match="recorded for"):
        cs(x[:2])
    with pytest.raises(ValueError, match="non-finite"):
        cs(torch.full_like(x, float("nan")))


def test_a_solve_that_turns_non_finite_raises_the_full_error():
    sde = ss.VPSDE()
    x = _x(sde)

    def bad(x, t):  # infinite below t = 0.5
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("inf")), -x)

    cs = ss.compile_sampler(bad, sde, x, solver="dpmpp_2m", steps=6, mode="eager")
    with pytest.raises(ss.NonFiniteError) as err:
        cs(x)
    assert err.value.indices == list(range(5))


def test_a_network_that_writes_into_its_input_leaves_x_T_alone():
    sde = ss.VPSDE()
    x = _x(sde)

    def net(x, t):  # scales its input in place: it would corrupt the solver's state, so it is refused
        x.mul_(0.5)
        return -x

    keep = x.clone()
    with pytest.raises(RuntimeError, match="changed its input x in place"):
        ss.compile_sampler(net, sde, x, solver="dpmpp_2m", steps=4, mode="eager")
    with pytest.raises(RuntimeError, match="changed its input x in place"):
        ss.sample(net, sde, x, solver="dpmpp_2m", steps=4)
    assert torch.equal(x, keep)  # and neither touched the caller's tensor


def test_a_non_finite_default_solve_on_a_view_raises_the_full_error():
    # the default sampler of PFGM++ runs on its EDM view: the re-run for the error must take sample()'s own path
    # (it raised "solver 'vab' requires gaussian_kernel" when re-run with the resolved solver on the process)
    proc = ss.PFGMPP(D=128)
    cloud = ss.PointCloud(torch.randn(16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5)
    model = cloud.model(proc)
    bad = {"on": False}
    net = ss.ScoreModel(lambda x, t: model.net(x, t) * (math.inf if bad["on"] else 1.0), proc,
                        prediction=model.prediction, time=model.time)
    x_T = proc.prior_sample((16, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cs = ss.compile_sampler(net, proc, x_T, t_eps=proc.sigma_min, mode="eager", nfe=10)
    bad["on"] = True
    with pytest.raises(ss.NonFiniteError) as err:
        cs(x_T)
    assert err.value.indices == list(range(16)) and err.value.solver == "vab" and err.value.times[0] > 1


def test_a_recorded_solve_that_ends_non_finite_where_sample_does_not_raises():
    sde = ss.VPSDE()
    x = _x(sde)
    once = {"left": 0}

    def net(x, t):  # infinite in one call only
        once["left"] -= 1
        return x * math.inf if once["left"] == 0 else -x

    cs = ss.compile_sampler(net, sde, x, solver="dpmpp_2m", steps=4, mode="eager")
    once["left"] = 2  # the recorded call's second evaluation; sample()'s re-run is finite
    with pytest.raises(ss.NonFiniteError, match="recorded, eager") as err:
        cs(x)
    assert err.value.indices == list(range(5))


def test_a_recorded_call_synchronises_twice(monkeypatch):
    # the input check and the result check; the step loop makes none (as in tests/test_syncs.py)
    monkeypatch.setattr(utils, "on_host", lambda t: t.device.type == "cpu" and type(t) is torch.Tensor)
    sde = ss.VPSDE()
    model = _mlp_model(sde)
    x = on_device(_x(sde))
    for steps in (4, 12):
        cs = ss.compile_sampler(model, sde, x, solver="vab", steps=steps, mode="eager")
        with count_syncs() as log:
            cs(x)
        assert len(log) == 2, log


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dpmpp_2m", None])
def test_compile_mode_matches_sample(solver):
    # inductor on the CPU (a C++ compiler): the compiled solve is sample()'s to rounding, with its NFE
    sde = ss.VPSDE()
    model, x = _mlp_model(sde, "x0"), _x(sde)
    cs = ss.compile_sampler(model, sde, x, solver=solver, steps=5, mode="compile")
    assert cs.active == "compile", cs.fallback_reason
    for xx in (x, x * 0.5):
        ref, sol = ss.sample(model, sde, xx, solver=solver, steps=5), cs(xx)
        torch.testing.assert_close(sol.x, ref.x, rtol=1e-10, atol=1e-10)
        assert torch.equal(sol.nfe, ref.nfe) and sol.steps == ref.steps


def test_processes_beyond_the_gaussian_kernel_default_on_the_view_and_euler_on_their_own_drift():
    proc = ss.PFGMPP(D=128)
    cloud = ss.PointCloud(torch.randn(16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5)
    model = cloud.model(proc)
    x_T = proc.prior_sample((16, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kw in (dict(nfe=10), dict(solver="euler", nfe=10)):  # the default runs on the EDM view (Process.ode_view)
        cs = ss.compile_sampler(model, proc, x_T, t_eps=proc.sigma_min, mode="eager", **kw)
        ref = ss.sample(model, proc, x_T, t_eps=proc.sigma_min, **kw)
        torch.testing.assert_close(cs(x_T).x, ref.x, rtol=0, atol=0)
        assert int(cs(x_T).nfe.max()) == 10 and cs.spec.name == ref.solver
