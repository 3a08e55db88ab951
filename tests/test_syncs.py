"""No host-device synchronisation inside the solvers' step loops, checked on CPU.

The input is tagged as a device tensor (tests/_sync.py); every read of a tagged tensor's values on the host is
counted. Grid solvers make a fixed number (the checks on entry and the final non-finite check), whatever the number
of steps; adaptive solvers add one per termination check (at most one every ``check_every`` steps).
"""

from __future__ import annotations

import math

import pytest
import torch
from _solver_kw import solve_kw
from _sync import OnDevice, count_syncs, on_device

import scoresolve as ss
import scoresolve._utils as utils
from scoresolve.solvers import REGISTRY, AdaptiveSolver, GridSolver

SOLVERS = sorted(ss.list_solvers())
GRID = [n for n in SOLVERS if isinstance(REGISTRY[n], GridSolver)]
ADAPTIVE = [n for n in SOLVERS if isinstance(REGISTRY[n], AdaptiveSolver)]


@pytest.fixture(autouse=True)
def _device_semantics(monkeypatch):
    # on an accelerator the per-call range check of time tensors is skipped (it would synchronise); make tagged
    # tensors take that path here too
    monkeypatch.setattr(utils, "on_host", lambda t: not isinstance(t, OnDevice) and t.device.type == "cpu")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _case(B=4, D=2):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, D))
    net = net.double().requires_grad_(False)

    def score(x, t):
        return net(torch.cat([x, t[:, None].to(x.dtype)], 1))

    sde = ss.VPSDE()
    x = sde.prior_sample((B, D), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sde, score, on_device(x)


def test_the_counter_sees_host_reads_of_tagged_tensors_only():
    x = on_device(torch.randn(5))
    y = torch.randn(5)
    with count_syncs() as log:
        z = torch.where(x > 0, x, 2 * x).exp()  # stays on the device
        bool(y.sum() > 0), float(y[0]), y.tolist()  # host tensors: free
        assert isinstance(z, OnDevice) and not log
        bool(z.sum() > 0), float(z[0]), z.tolist(), z[z > 1], z.nonzero(), z.max().item()
    assert log == ["__bool__", "__float__", "tolist", "__getitem__[mask]", "nonzero", "item"]


@pytest.mark.parametrize("name", GRID)
def test_grid_solvers_sync_a_fixed_number_of_times(name):
    sde, score, x = _case()
    counts = []
    for steps in (4, 16):
        with count_syncs() as log:
            sol = ss.sample(score, sde, x, solver=name, **solve_kw(name, steps=steps))
        counts.append(len(log))
    assert torch.isfinite(sol.x).all()
    assert counts[0] == counts[1] <= 3, (name, counts)


def _bound(iterations: int, check_every: int = 8) -> int:
    # a few on entry and exit, and one per termination check: every check_every steps, or after half the steps the
    # slowest sample still needs (so at most ~log2 of the steps more near the end)
    return 6 + math.ceil(iterations / check_every) + 2 * math.ceil(math.log2(iterations + 1))


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solvers_sync_once_per_check(name):
    sde, score, x = _case()
    kw = solve_kw(name, tol=1e-8)
    if REGISTRY[name].stochastic:
        kw.update(rtol=1e-3, atol=1e-3)
    with count_syncs() as log:
        sol = ss.sample(score, sde, x, solver=name, **kw)
    iterations = int((sol.steps + sol.rejected).max())
    assert iterations > _bound(iterations)  # long enough that one sync per step could not hide under the bound
    assert len(log) <= _bound(iterations), (name, len(log), iterations, log)


@pytest.mark.parametrize("kw", [dict(), dict(compact=True), dict(divergence="exact"), dict(probes=3),
                                dict(time_variable="t")], ids=["hutchinson", "compact", "exact", "probes", "in_t"])
def test_log_likelihood_syncs_once_per_check(kw):
    sde, score, x = _case(B=6)
    with count_syncs() as log:
        r = ss.log_likelihood(score, sde, x, rtol=1e-8, atol=1e-8, generator=torch.Generator().manual_seed(0), **kw)
    iterations = int((r.steps + r.rejected).max())
    assert iterations > _bound(iterations) and torch.isfinite(r.log_prob).all()
    assert len(log) <= _bound(iterations), (len(log), iterations, log)
