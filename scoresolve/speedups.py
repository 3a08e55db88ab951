"""Opt-in speed-ups of the network evaluation itself (the solvers are unchanged).

``accelerate(net, ...)`` returns a callable with the same ``net(x, t)`` signature:
- ``channels_last``: convert the module and 4-D inputs to channels-last memory format (convolutions on tensor cores);
- ``autocast``: run the network under ``torch.autocast`` in bf16/fp16 inside a float32 solver (the output is cast
  back to x's dtype by [`ScoreModel`][scoresolve.ScoreModel]);
- ``compile``: ``torch.compile`` the module (``dynamic=False``: each batch size compiles once);
- ``tf32``: allow TF32 matmuls/convolutions (global PyTorch flags, set when the wrapper is built).
Each changes the floating-point result slightly; ``benchmarks/likelihood_gpu.py`` reports the effect on log p.
"""

from __future__ import annotations

from typing import Callable

import torch


class AcceleratedNet(torch.nn.Module):
    """A wrapper applying the chosen speed-ups around ``net(x, t, **kwargs)``."""

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        channels_last: bool = False,
        autocast: torch.dtype | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast}")
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.channels_last = channels_last
        self.autocast = autocast
        self._call: Callable = torch.compile(net, dynamic=False, mode=compile_mode) if compile else net

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                out = self._call(x, t, **kwargs)
        else:
            out = self._call(x, t, **kwargs)
        if self.channels_last and torch.is_tensor(out) and out.ndim == 4:  # (a model may return an output object)
            out = out.contiguous()
        return out


def accelerate(
    net: torch.nn.Module,
    *,
    channels_last: bool = False,
    autocast: torch.dtype | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    tf32: bool = False,
) -> AcceleratedNet:
    """Wrap ``net`` with opt-in speed-ups (see the module docstring)."""
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return AcceleratedNet(net, channels_last=channels_last, autocast=autocast, compile=compile,
                          compile_mode=compile_mode)
