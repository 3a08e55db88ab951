"""What the per-batch function of a dataset evaluation is fed: dataset items and batches, seeds derived from the
run's seed, and each sample's own dequantization noise (independent of batch size, sharding and restarts), uniform
or drawn from a [`Dequantizer`][scoresolve.quantization.Dequantizer]."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..fingerprint import item
from ..quantization.levels import dequantize, grid_name, resolve_levels

if TYPE_CHECKING:
    from ..quantization.dequantizers import Dequantizer


def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed from a tag and integers: blake2b-64 of ``"tag:p0:p1:..."``, little-endian, top bit cleared."""
    text = ":".join([tag, *(str(int(p)) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def batch(data: Any, start: int, stop: int) -> torch.Tensor:
    """Samples ``start:stop`` stacked into one tensor."""
    if torch.is_tensor(data):
        return data[start:stop]
    return torch.stack([item(data, i) for i in range(start, stop)])


def dequantized(
    x: torch.Tensor, indices: Sequence[int], repeat: int, seed: int, num_levels: int, data_range: Any,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize the L-level batch ``x`` of samples ``indices``: sample i of repeat r takes the noise
    ``torch.rand(sample_shape)`` of a CPU generator seeded with ``derive_seed("dequant", seed, r, i)``."""
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    noise = torch.stack(
        [
            torch.rand(
                x.shape[1:],
                generator=torch.Generator().manual_seed(derive_seed("dequant", seed, repeat, i)),
                dtype=dtype,
            )
            for i in indices
        ]
    )
    return dequantize(x.to(dtype) if x.is_floating_point() else x, num_levels, data_range, noise=noise,
                             what=grid_name(num_levels))


def dequantized_with(
    dequantizer: "Dequantizer", x: torch.Tensor, indices: Sequence[int], repeat: int, seed: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the batch ``x`` of samples ``indices`` with q(u | i): sample i of repeat r draws u from a CPU
    generator seeded with ``derive_seed("dequant", seed, r, i)``, one sample at a time (so its u and log q do not
    depend on its batch-mates).

    Returns:
        (y in ``dtype`` (default: x's if floating, else ``torch.get_default_dtype()``), ``[B]`` float64 log q(u | i)
        in u-space); y = lo + Delta (i + u) is computed in float64, then rounded to ``dtype``.
    """
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    lv = dequantizer.levels(x)
    ys, lqs = [], []
    with torch.no_grad():
        for j, i in enumerate(indices):
            g = torch.Generator().manual_seed(derive_seed("dequant", seed, repeat, i))
            u, lq = dequantizer.sample_unit(lv[j : j + 1], g)
            ys.append(dequantizer.to_data(lv[j : j + 1], u.cpu(), dtype))
            lqs.append(lq.detach().to("cpu", torch.float64).reshape(1))
    return torch.cat(ys), torch.cat(lqs)


def dequantized_samples(
    data: Any,
    indices: Sequence[int],
    repeat: int,
    seed: int,
    bits: int | None = None,
    data_range: Sequence[float] | None = None,
    *,
    num_levels: int | None = None,
    dequantizer: "Dequantizer | None" = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The exact dequantized inputs that :func:`evaluate_dataset` fed to the per-batch function for these samples.

    Args:
        data: the dataset given to :func:`evaluate_dataset`.
        indices: sample indices.
        repeat: the repeat r.
        seed: the run's seed.
        bits: k of k-bit data (L = 2^k levels), or None when ``num_levels`` (or ``dequantizer``) is given.
        data_range: (lo, hi) of the data (default: the dequantizer's, else (-1, 1)).
        num_levels: L, the number of levels (an alternative to ``bits``; exactly one of them determines L).
        dequantizer: the run's dequantizer (None or a `UniformDequantizer`: uniform noise); it fixes L and
            data_range, which ``bits`` / ``num_levels`` / ``data_range``, if given, must match.
        dtype: the run's ``dtype`` (default: the data's if floating, else ``torch.get_default_dtype()``).
    Returns:
        ``[len(indices), *sample_shape]``: each sample's level i mapped to lo + (hi - lo) (i + u) / L, u ~ U[0, 1)
        or u ~ q(u | i).
    """
    if dequantizer is not None:
        data_range = dequantizer.data_range if data_range is None else data_range
        L = resolve_levels(bits, num_levels, data_range) or dequantizer.num_levels
        dequantizer = effective_dequantizer(dequantizer, L, data_range)
    else:
        data_range = (-1.0, 1.0) if data_range is None else data_range
        L = resolve_levels(bits, num_levels, data_range)
    if L is None:
        raise ValueError("give bits or num_levels: dequantized_samples needs the data's quantisation")
    x = torch.stack([item(data, i) for i in indices])
    if dequantizer is not None:
        return dequantized_with(dequantizer, x, list(indices), repeat, seed, dtype)[0]
    return dequantized(x, list(indices), repeat, seed, L, data_range, dtype)


def effective_dequantizer(
    dequantizer: "Dequantizer | None", num_levels: int | None, data_range: Sequence[float]
) -> "Dequantizer | None":
    """The dequantizer a run uses: None for uniform noise (None or a plain `UniformDequantizer`, which draws exactly
    the default's numbers), else ``dequantizer`` after checking that it is for the data's L levels in data_range.

    Raises:
        ValueError: not a Dequantizer, continuous data (``num_levels`` None), or another L or data_range.
    """
    from ..quantization.dequantizers import Dequantizer, UniformDequantizer

    if dequantizer is None:
        return None
    if not isinstance(dequantizer, Dequantizer):
        raise TypeError(f"dequantizer must be a scoresolve.quantization.Dequantizer, got {type(dequantizer).__name__}")
    if num_levels is None:
        raise ValueError(
            f"a dequantizer needs quantized data: give bits or num_levels (the {type(dequantizer).__name__} is for "
            f"{dequantizer.num_levels} levels in {tuple(dequantizer.data_range)})"
        )
    lo, hi = (float(v) for v in data_range)
    if dequantizer.num_levels != int(num_levels) or tuple(dequantizer.data_range) != (lo, hi):
        raise ValueError(
            f"the {type(dequantizer).__name__} is for {dequantizer.num_levels} levels in "
            f"{tuple(dequantizer.data_range)}, the data have {int(num_levels)} levels in {(lo, hi)}"
        )
    if type(dequantizer) is UniformDequantizer:
        return None
    if any(t.device.type != "cpu" for t in [*dequantizer.parameters(), *dequantizer.buffers()]):
        raise ValueError("the dequantizer must be on the CPU: dequantization runs there, before batches move to "
                         "their device")
    return dequantizer
