"""What the per-batch function of a dataset evaluation is fed: dataset items and batches, seeds derived from the
run's seed, and each sample's own dequantization noise (independent of batch size, sharding and restarts)."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from ..dequantization import dequantize_levels, grid_name, resolve_levels


def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed from a tag and integers: blake2b-64 of ``"tag:p0:p1:..."``, little-endian, top bit cleared."""
    text = ":".join([tag, *(str(int(p)) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def item(data: Any, i: int) -> torch.Tensor:
    """Sample ``i`` of a tensor or a map-style dataset (of a tuple item, its first element) as a tensor."""
    it = data[i]
    if isinstance(it, (tuple, list)):
        if not it:
            raise ValueError(f"dataset item {i} is empty")
        it = it[0]
    return torch.as_tensor(it)


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
    return dequantize_levels(x.to(dtype) if x.is_floating_point() else x, num_levels, data_range, noise=noise,
                             what=grid_name(num_levels))


def dequantized_samples(
    data: Any,
    indices: Sequence[int],
    repeat: int,
    seed: int,
    bits: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    *,
    num_levels: int | None = None,
) -> torch.Tensor:
    """The exact dequantized inputs that :func:`evaluate_dataset` fed to the per-batch function for these samples.

    Args:
        data: the dataset given to :func:`evaluate_dataset`.
        indices: sample indices.
        repeat: the repeat r.
        seed: the run's seed.
        bits: k of k-bit data (L = 2^k levels), or None when ``num_levels`` is given.
        data_range: (lo, hi) of the data.
        num_levels: L, the number of levels (an alternative to ``bits``; exactly one of them determines L).
    Returns:
        ``[len(indices), *sample_shape]``: each sample's level i mapped to lo + (hi - lo) (i + u) / L, u ~ U[0, 1).
    """
    L = resolve_levels(bits, num_levels, data_range)
    if L is None:
        raise ValueError("give bits or num_levels: dequantized_samples needs the data's quantisation")
    x = torch.stack([item(data, i) for i in indices])
    return dequantized(x, list(indices), repeat, seed, L, data_range)
