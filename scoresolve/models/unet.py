"""A small U-Net noise predictor for images (DDPM-style: GroupNorm, SiLU, time embedding added in every block)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .mlp import TimeEmbedding, batch_time


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """x -> skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))) + temb))); the second conv starts at zero."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """U-Net ``net(x, t) -> eps`` for images ``[batch, C, H, W]``, continuous t in [0, T].

    Args:
        in_channels: image channels C (any).
        base_channels: channels at full resolution; level l has ``base_channels * channel_mult[l]``.
        channel_mult: one entry per resolution (the default (1, 2): full and half resolution); H and W must be
            divisible by 2^(levels - 1).
        num_res_blocks: residual blocks per level on the way down (one more on the way up, as in DDPM).
        time_dim: width of the time embedding (defaults to 4 * base_channels).
        groups: GroupNorm groups (at most; reduced to a divisor of the channel count).
        dropout: dropout inside the residual blocks.
        T: end time of the forward SDE.
        time_embedding: ``"sinusoidal"`` or ``"fourier"`` (`TimeEmbedding`).
        time_max_freq: the sinusoidal embedding's highest frequency (1000: DDPM's; see `TimeEmbedding`).
    No attention: at 8x8 to 32x32 with two resolutions the receptive field already covers the image.
    The default (16 channels, (1, 2), 1 block) has 0.16 M parameters (0.63 M with 32 channels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        time_dim: int | None = None,
        groups: int = 8,
        dropout: float = 0.0,
        T: float = 1.0,
        time_embedding: str = "sinusoidal",
        time_max_freq: float = 1000.0,
    ) -> None:
        super().__init__()
        if not channel_mult:
            raise ValueError("channel_mult needs at least one level")
        self.in_channels = int(in_channels)
        self.levels = len(channel_mult)
        time_dim = int(time_dim or 4 * base_channels)
        self.time = TimeEmbedding(time_dim, T=T, kind=time_embedding, num_features=base_channels,
                                  max_freq=time_max_freq)
        chans = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base_channels]
        c = base_channels
        for level, cl in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, cl, time_dim, groups, dropout))
                c = cl
                skips.append(c)
            self.down.append(blocks)
            if level < self.levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, time_dim, groups, dropout), ResBlock(c, c, time_dim, groups, dropout)])

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(self.levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), chans[level], time_dim, groups, dropout))
                c = chans[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(c, groups), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [batch, {self.in_channels}, H, W], got {tuple(x.shape)}")
        f = 2 ** (self.levels - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"H and W must be divisible by {f} for {self.levels} resolutions, got {tuple(x.shape)}")
        out_dtype, dtype = x.dtype, self.conv_in.weight.dtype  # compute in the parameters' dtype, answer in x's
        temb = nn.functional.silu(self.time(batch_time(t, x).to(dtype)))
        h = self.conv_in(x.to(dtype))
        hs = [h]
        for level in range(self.levels):
            for block in self.down[level]:
                h = block(h, temb)
                hs.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, temb)
        for i in range(self.levels):
            for block in self.up[i]:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if i < self.levels - 1:
                h = self.upsample[i](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(nn.functional.silu(self.norm_out(h))).to(out_dtype)


def num_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


__all__ = ["ResBlock", "UNet", "num_parameters"]
