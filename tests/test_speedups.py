"""Opt-in network speed-ups (scoresolve/speedups.py): each keeps the net(x, t) contract and changes the numbers only
by its own rounding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import scoresolve as ss
from scoresolve.speedups import accelerate


class ConvNet(torch.nn.Module):
    """A small conv eps-network on [B, C, H, W]; ``wrapped`` returns an output object like diffusers' UNets."""

    def __init__(self, wrapped: bool = False) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.c1 = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.c1(x) + t[:, None, None, None])
        out = self.c2(h)
        return SimpleNamespace(sample=out) if self.wrapped else out


def _net(wrapped=False):
    torch.manual_seed(0)
    return ConvNet(wrapped).double().eval()


def test_channels_last_same_numbers_and_output_objects():
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.rand(3, dtype=torch.float64)
    plain = _net()(x, t)
    fast = accelerate(_net(), channels_last=True)(x, t)
    assert fast.is_contiguous()  # handed back in the default layout
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    out = accelerate(_net(wrapped=True), channels_last=True)(x, t)  # a non-tensor output passes through
    torch.testing.assert_close(out.sample, plain, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_inside_a_float32_likelihood():
    sde = ss.VPSDE()
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    net = _net().float()
    kw = dict(rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(3))
    ref = ss.log_likelihood(ss.ScoreModel(net, sde, prediction="eps"), sde, x, **kw)
    model = ss.ScoreModel(accelerate(net, autocast=torch.bfloat16), sde, prediction="eps")
    eps_out = model.net(x, torch.full((4,), 0.5))
    assert eps_out.dtype == torch.bfloat16  # the network really ran in bf16 ...
    r = ss.log_likelihood(model, sde, x, **kw)
    assert r.log_prob.dtype == torch.float32  # ... inside a float32 solve
    D = x[0].numel()
    # bf16 keeps 8 bits: log p moves (0.27 nats/dim for this random network near t_eps, where sigma is small)
    assert float((r.log_prob - ref.log_prob).abs().max()) < 0.5 * D
    assert float((r.log_prob - ref.log_prob).abs().max()) > 0  # and it did change something


def test_bad_autocast_dtype():
    with pytest.raises(ValueError, match="autocast"):
        accelerate(_net(), autocast=torch.float64)


@pytest.mark.slow
def test_compile_matches_eager():
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(accelerate(_net(), compile=True)(x, t), _net()(x, t), rtol=1e-10, atol=1e-10)
