"""A small time-conditioned MLP noise predictor for low-dimensional data, and the time embeddings shared with the U-Net.

Both networks take the solver's continuous time t in [0, T] (a ``[batch]`` tensor, or a scalar broadcast to the
batch) and predict eps by default: wrap them with ``ScoreModel(net, sde, prediction="eps", time="t")``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t as a ``[batch]`` tensor in x's dtype and device (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape [batch] = ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class TimeEmbedding(nn.Module):
    """Embedding of continuous t in [0, T]: features of s = t / T, then Linear-SiLU-Linear to ``dim``.

    ``kind="sinusoidal"``: [sin(w_i s), cos(w_i s)] with w_i = max_freq * 10000^(-i / (n/2)) (``max_freq`` = 1000:
    the DDPM embedding of 1000 s, geometric frequencies from 1000 down to 0.1; the network's output then oscillates
    in t at ~1000 rad per unit s, which adaptive ODE solvers must resolve: a smaller ``max_freq`` such as 10 keeps it
    smooth in t). ``kind="fourier"``: random Gaussian Fourier features
    [sin(2 pi w_i s), cos(2 pi w_i s)], w_i ~ N(0, scale^2), fixed at construction (a buffer; score_sde's NCSN++).
    """

    def __init__(self, dim: int, T: float = 1.0, kind: str = "sinusoidal", num_features: int | None = None,
                 scale: float = 16.0, max_freq: float = 1000.0) -> None:
        super().__init__()
        n = int(num_features or dim)
        if n % 2 or n < 2:
            raise ValueError(f"num_features must be a positive even number, got {n}")
        if not (math.isfinite(max_freq) and max_freq > 0):
            raise ValueError(f"max_freq must be a positive number, got {max_freq}")
        if kind == "sinusoidal":
            i = torch.arange(n // 2, dtype=torch.float64)
            freqs = float(max_freq) * torch.exp(-math.log(10000.0) * i / (n // 2))
        elif kind == "fourier":
            g = torch.Generator().manual_seed(0)
            freqs = 2 * math.pi * scale * torch.randn(n // 2, generator=g, dtype=torch.float64)
        else:
            raise ValueError(f"unknown time embedding {kind!r}; expected 'sinusoidal' or 'fourier'")
        self.T = float(T)
        self.kind = kind
        self.register_buffer("freqs", freqs.float())
        self.mlp = nn.Sequential(nn.Linear(n, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """The fixed sinusoidal features ``[batch, num_features]`` of t ``[batch]``."""
        arg = (t.to(self.freqs.dtype) / self.T)[:, None] * self.freqs[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))


class _ResidualMLPBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h))) + temb)); the last layer starts at zero (an identity block)."""

    def __init__(self, hidden: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb = nn.Linear(time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(nn.functional.silu(self.norm(h))) + self.temb(temb)
        return h + self.fc2(nn.functional.silu(z))


class MLPScoreNet(nn.Module):
    """Time-conditioned residual MLP ``net(x, t) -> eps`` for data of shape ``[batch, *shape]`` (flattened inside).

    Args:
        dim: number of values per sample (2 for the toy sets); ``shape`` may be given instead, e.g. ``(2,)``.
        hidden: width of the residual stream; depth: number of residual blocks.
        time_dim: width of the time embedding; time_embedding: ``"sinusoidal"`` or ``"fourier"``.
        time_max_freq: the sinusoidal embedding's highest frequency (`TimeEmbedding`'s ``max_freq``).
        T: end time of the forward SDE (t is divided by T before the embedding).
    The default (hidden 128, depth 3) has about 0.1 M parameters.
    """

    def __init__(
        self,
        dim: int | None = None,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 64,
        time_embedding: str = "sinusoidal",
        T: float = 1.0,
        shape: Sequence[int] | None = None,
        time_max_freq: float = 1000.0,
    ) -> None:
        super().__init__()
        if dim is None and shape is None:
            raise ValueError("give dim or shape")
        self.shape = tuple(shape) if shape is not None else (int(dim),)
        self.dim = math.prod(self.shape)
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"dim {dim} does not match shape {self.shape}")
        self.time = TimeEmbedding(time_dim, T=T, kind=time_embedding, max_freq=time_max_freq)
        self.inp = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(hidden, time_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.dim)
        nn.init.zeros_(self.out.weight)  # start as eps_hat = 0, like the U-Net
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            want = ", ".join(map(str, self.shape))
            raise ValueError(f"expected input of shape [batch, {want}], got {tuple(x.shape)}")
        dtype = self.inp.weight.dtype  # compute in the parameters' dtype, answer in x's
        temb = nn.functional.silu(self.time(batch_time(t, x).to(dtype)))
        h = self.inp(x.reshape(x.shape[0], self.dim).to(dtype))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(nn.functional.silu(self.out_norm(h))).reshape(x.shape).to(x.dtype)
