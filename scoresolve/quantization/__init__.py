"""Quantized data, dequantization and bits per dimension: the one home.

- `levels`: the grid of L levels in (lo, hi) (k-bit data: L = 2^k), levels and grid values, `quantize`, uniform
  `dequantize` (`uniform_dequantize` for k-bit data), the bits/dim offset log2(L / (hi - lo)).
- `bpd`: the one [`bits_per_dim`][scoresolve.quantization.bits_per_dim] (k-bit or L-level data, continuous data,
  a dequantizer's log q), the importance-weighted bound, and the one dequantized bits/dim of a likelihood function
  over repeated dequantizations, [`dequantized_bpd`][scoresolve.quantization.dequantized_bpd].
- `dequantizers`: q(u | i) beyond uniform (truncated normal, variational) and their training.

    from scoresolve.quantization import bits_per_dim, dequantize, dequantized_bpd
    y = dequantize(x, num_levels=17, generator=g)                    # the digits: 17 levels in [-1, 1]
    bpd = bits_per_dim(log_likelihood(score, sde, y).log_prob, 64, num_levels=17)
"""

from .bpd import DEFAULT_BITS, DequantizedBPD, bits_per_dim, dequantized_bpd, importance_weighted_bits_per_dim
from .dequantizers import (
    DEQUANTIZATIONS,
    Dequantizer,
    TruncatedNormalDequantizer,
    UniformDequantizer,
    VariationalDequantizer,
    make_dequantizer,
    train_dequantizer,
)
from .levels import (
    bin_offset,
    check_levels_range,
    dequantize,
    from_levels,
    grid_levels,
    grid_name,
    levels_offset,
    pow2_bits,
    quantize,
    resolve_levels,
    uniform_dequantize,
)

__all__ = [
    "DEFAULT_BITS", "DEQUANTIZATIONS", "DequantizedBPD", "Dequantizer", "TruncatedNormalDequantizer",
    "UniformDequantizer", "VariationalDequantizer", "bin_offset", "bits_per_dim", "check_levels_range", "dequantize",
    "dequantized_bpd", "from_levels", "grid_levels", "grid_name", "importance_weighted_bits_per_dim",
    "levels_offset", "make_dequantizer", "pow2_bits", "quantize", "resolve_levels", "train_dequantizer",
    "uniform_dequantize",
]
