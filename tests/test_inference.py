"""A user's own network end to end (issue 18): sampling keeps no autograd graph unless asked, short result reprs,
one NFE type, and safe defaults on a small trained network (errors against the same model's dopri5)."""

import math
import warnings

import pytest
import torch
from torch import nn

import scoresolve as ss

F64 = torch.float64


class TinyEps(nn.Module):
    """eps(x, t) for 2-D data: an MLP on x and sinusoidal features of t."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(200), 8)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None].to(x.dtype) * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, torch.sin(a), torch.cos(a)], 1))


def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """8 Gaussians (std 0.08) on the unit circle."""
    ang = torch.randint(0, 8, (n,), generator=g) * (2 * math.pi / 8)
    return torch.stack([torch.cos(ang), torch.sin(ang)], 1) + 0.08 * torch.randn(n, 2, generator=g)


def train_tiny(steps: int = 400, seed: int = 0) -> tuple[nn.Module, ss.VPSDE]:
    """Denoising score matching of TinyEps on `ring` under VP: deterministic, a few seconds on one CPU thread."""
    sde = ss.VPSDE()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyEps().to(F64)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        x0 = ring(256, g).to(F64)
        t = 1e-3 + (1 - 1e-3) * torch.rand(256, generator=g, dtype=F64)
        a, s = sde.marginal(t)
        e = torch.randn(x0.shape, generator=g, dtype=F64)
        loss = (net(a[:, None] * x0 + s[:, None] * e, t) - e).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, sde  # weights still require grad, as a user's freshly trained network's do


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, sde = train_tiny()
        model = ss.ScoreModel(net, sde, prediction="eps", time="t")
        x_T = sde.prior_sample((256, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
        ref = ss.sample(model, sde, x_T, solver="dopri5", rtol=1e-7, atol=1e-7).x
        yield model, sde, x_T, ref
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dopri5", "euler_maruyama"])
def test_sampling_a_grad_requiring_network_keeps_no_graph_and_does_not_warn(solver):
    net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))
    assert all(p.requires_grad for p in net.parameters())
    sde = ss.VPSDE()
    model = ss.ScoreModel(lambda x, t: net(torch.cat([x, t[:, None]], 1)), sde, prediction="eps")
    x_T = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = ss.sample(model, sde, x_T, solver=solver, generator=torch.Generator().manual_seed(0))
        assert not sol.x.requires_grad and sol.x.grad_fn is None
        res = ss.log_likelihood(model, sde, x_T[:4], rtol=1e-3, atol=1e-3)
        assert not res.log_prob.requires_grad and not res.latent.requires_grad
        for div in ("exact", lambda x, t: torch.zeros(x.shape[0])):  # the exact divergence and a callable one
            res = ss.log_likelihood(model, sde, x_T[:4], divergence=div, rtol=1e-3, atol=1e-3)
            assert not res.log_prob.requires_grad
        # opt in: gradients flow to the parameters (and dopri5's step sizes stay constants: still no warning)
        sol = ss.sample(model, sde, x_T, solver=solver, grad=True, generator=torch.Generator().manual_seed(0))
        assert sol.x.requires_grad
        sol.x.square().sum().backward()
        assert net[0].weight.grad is not None and bool(net[0].weight.grad.abs().sum() > 0)


def test_solution_and_likelihood_result_print_shortly_and_nfe_is_one_type():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(3, 2, seed=0)
    x = sde.prior_sample((500, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = ss.sample(gm.score_fn(sde), sde, x, solver="dpmpp_2m", nfe=10)
    adaptive = ss.sample(gm.score_fn(sde), sde, x, solver="dopri5", rtol=1e-3, atol=1e-3)
    for sol in (grid, adaptive):
        assert sol.nfe.dtype == torch.long and sol.nfe.shape == (500,)
        text = repr(sol)
        assert len(text) < 300 and "\n" not in text and "Tensor[500, 3] float64" in text, text
    assert repr(grid) == str(grid) and "nfe=10" in repr(grid) and grid.calls == 10
    assert "nfe=mean" in repr(adaptive) and adaptive.calls >= int(adaptive.nfe.max())
    res = ss.log_likelihood(gm.score_fn(sde), sde, x[:50], rtol=1e-3, atol=1e-3)
    assert len(repr(res)) < 300 and "log_prob mean" in repr(res)


# measured on this network (RMS error against dopri5 at rtol 1e-7; samples of scale 1): a bound ~1.5x above each
BOUNDS_10_NFE = {"dpmpp_2m": 0.079, "unipc": 0.067, "ddim": 0.137, "dpmpp_3m": 0.221, "heun": 0.077, "euler": 0.066}


@pytest.mark.parametrize("solver", sorted(BOUNDS_10_NFE))
def test_default_solvers_at_10_nfe_on_a_trained_network(trained, solver):
    model, sde, x_T, ref = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = ss.sample(model, sde, x_T, solver=solver, nfe=10)
    err = float((sol.x - ref).square().mean().sqrt())
    assert err < 1.5 * BOUNDS_10_NFE[solver], err
    assert not sol.x.requires_grad


@pytest.mark.parametrize("solver, nfe, bound", [("dpm_solver_2", 30, 0.15), ("dpm_solver_3", 51, 0.08)])
def test_singlestep_dpm_solver_warns_when_too_coarse_for_a_trained_network(trained, solver, nfe, bound):
    model, sde, x_T, ref = trained
    with pytest.warns(UserWarning, match="log-SNR steps up to"):
        coarse = ss.sample(model, sde, x_T, solver=solver, nfe=10)
    assert float((coarse.x - ref).square().mean().sqrt()) > 1.0  # what the warning is about (measured 4.5, 22.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fine enough: no warning, and an error like dpmpp_2m's at 10 NFE
        fine = ss.sample(model, sde, x_T, solver=solver, nfe=nfe)
    assert float((fine.x - ref).square().mean().sqrt()) < bound


def test_pc_warns_in_low_dimension_and_batch_norms_fix_it():
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(2, 4, seed=0)
    x = sde.prior_sample((512, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gm.log_prob(gm.sample_marginal(4096, 1e-3, sde, generator=torch.Generator().manual_seed(1), dtype=F64),
                        1e-3, sde).mean()
    with pytest.warns(UserWarning, match="norms='batch'"):
        default = ss.sample(gm.score_fn(sde), sde, x, solver="pc", nfe=100, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = ss.sample(gm.score_fn(sde), sde, x, solver="pc", nfe=100, norms="batch",
                          generator=torch.Generator().manual_seed(2))
    gap_default = float(exact - gm.log_prob(default.x, 1e-3, sde).mean())
    gap_batch = float(exact - gm.log_prob(batch.x, 1e-3, sde).mean())
    assert gap_default > 1.0 and gap_batch < 0.6, (gap_default, gap_batch)
