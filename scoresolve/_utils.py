"""Small shared helpers: broadcasting per-sample coefficients and validating time/shape arguments."""

from __future__ import annotations

import math
from typing import Union

import torch

Time = Union[float, int, torch.Tensor]


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or ``[batch]`` coefficient so that it broadcasts against ``x`` of shape ``[batch, ...]``."""
    if not torch.is_tensor(c):
        return torch.as_tensor(c, dtype=x.dtype, device=x.device)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def check_batched(x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a floating tensor of shape ``[batch, ...]`` with at least 2 dims."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape [batch, ...] with at least 2 dims, got shape {tuple(x.shape)}; "
            "for scalar data use shape [batch, 1]"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_t_eps(t_eps: object, T: float) -> float:
    """``t_eps`` as a float in (0, T): TypeError for a non-number, ValueError outside the interval."""
    import numbers

    if torch.is_tensor(t_eps) and t_eps.numel() == 1 and t_eps.is_floating_point():
        t_eps = float(t_eps)
    if isinstance(t_eps, bool) or not isinstance(t_eps, numbers.Real):
        raise TypeError(f"t_eps must be a number in (0, T) = (0, {T}), got {t_eps!r} ({type(t_eps).__name__})")
    if not (0 < t_eps < T):
        raise ValueError(f"t_eps must lie in (0, T) = (0, {T}), got {t_eps}")
    return float(t_eps)


def check_generator(generator: object, name: str = "generator", like: torch.Tensor | None = None) -> None:
    """Raise TypeError unless ``generator`` is None or a ``torch.Generator``; with ``like``, ValueError unless it draws
    on ``like``'s device type (torch refuses a CPU generator for CUDA draws, and the first draw is mid-solve)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and like is not None and generator.device.type != like.device.type:
        raise ValueError(f"{name} draws on {generator.device} but the state is on {like.device}: create it as "
                         f"torch.Generator(device={str(like.device)!r})")


def check_prior_arguments(shape: object, generator: object, dtype: object) -> None:
    """A prior draw's ``shape`` (a sequence of ints >= 0, the batch first, at least 2 of them), ``generator`` (None
    or a torch.Generator) and ``dtype`` (None or a floating-point dtype), else TypeError / ValueError naming it."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints [batch, ...], got {shape!r}")
    dims = tuple(shape)
    if len(dims) < 2:
        raise ValueError(f"shape must be [batch, ...] with at least 2 dims, got {dims}; for scalar data use "
                         "(batch, 1)")
    for d in dims:
        check_count(d, "each entry of shape", minimum=0)
    check_generator(generator)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def check_positive(value: object, name: str) -> float:
    """``value`` as a finite float > 0: TypeError for a non-number (or a bool), ValueError otherwise."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_finite_float(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no host-device synchronisation (a CPU tensor)."""
    return t.device.type == "cpu"


def check_cadence(t: torch.Tensor, accelerator: int) -> int:
    """Steps between an adaptive loop's termination checks: 1 where reading ``t`` costs nothing (`on_host`: a read
    takes microseconds, a step past the end a batched call per stage), else ``accelerator``."""
    return 1 if on_host(t) else accelerator


def as_time(
    t: Time,
    T: float,
    *,
    like: torch.Tensor | None = None,
    batch: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Convert ``t`` (float, 0-d tensor or ``[batch]`` tensor) to a tensor and validate it.

    With ``like`` the result takes its dtype and device; with ``batch`` a ``[batch]`` tensor must match it.
    Range checking (``0 <= t <= T``) happens for Python numbers and CPU tensors; for accelerator tensors it is
    skipped to avoid a host-device synchronisation (solvers validate their grids once on entry).
    """
    if torch.is_tensor(t):
        if like is not None:
            t = t.to(dtype=like.dtype, device=like.device)
        elif not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
    else:
        if like is not None:
            t = torch.tensor(float(t), dtype=like.dtype, device=like.device)
        else:
            t = torch.tensor(float(t), dtype=torch.get_default_dtype())
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or a [batch] tensor, got shape {tuple(t.shape)}")
    if batch is not None and t.ndim == 1 and t.shape[0] != batch:
        raise ValueError(f"batch size mismatch: t has {t.shape[0]} entries but x has batch size {batch}")
    if check and on_host(t):
        bad = ~((t >= 0) & (t <= T * (1 + 1e-6)))
        if bool(bad.any()):
            vals = t[bad] if t.ndim else t
            raise ValueError(f"t must lie in [0, T] = [0, {T}], got {vals.flatten()[:5].tolist()}")
    return t


def check_count(value: object, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int >= ``minimum`` (None: any): an integer (a float only if it is a whole number, e.g. ``20.0``).

    Raises TypeError for a bool or a non-number, ValueError for a fractional or too small value; never rounds
    (``nfe=2.5`` or ``nfe=True`` are errors, not 2 and 1)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(float(value)) and float(value).is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    n = int(value)
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return n
