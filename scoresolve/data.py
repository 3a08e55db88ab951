"""Datasets that need no download: scikit-learn's handwritten digits and seeded 2-D toy distributions.

Digits
------
scikit-learn's ``load_digits`` holds 1797 gray images of 8x8 pixels with integer intensities v in {0, ..., 16}:
17 levels (``DIGITS_LEVELS``), not a power of two; `scoresolve.quantization` states its convention for any L:

    grid          x = lo + (hi - lo) v / (L - 1)           digits: x = 2 v / 16 - 1 in [-1, 1]
    dequantized   y = lo + (hi - lo) (v + u) / L,  u ~ U[0, 1)^D   (bins of width (hi - lo) / L tiling [lo, hi))
    bits/dim      -log p(y) / (D ln 2) + log2(L / (hi - lo))     (+log2(8.5) = 3.087 for digits in [-1, 1])

Level v's grid point lies in its own bin (the top level on the bin's upper edge), as for 8-bit data. The bits/dim
is an upper bound (Jensen) on -log2 P(v) / D of the discrete model that integrates the density over the bins; a
uniform density on [lo, hi]^D gives log2(L) = 4.087 bits/dim. [`digits`][scoresolve.data.digits] returns grid data;
models meant for likelihoods are trained on dequantized data
([`dequantize`][scoresolve.quantization.dequantize]``(x, DIGITS_LEVELS)``), see
`scoresolve.models.train`.

The split into train and test images is a fixed seeded permutation ([`digits`][scoresolve.data.digits]).

Toy sets
--------
``moons``, ``swissroll``, ``checkerboard`` and ``gmm`` are 2-D distributions of order-one scale drawn with an explicit
``torch.Generator`` (see `toy_sample`); ``gmm`` is an exact [`GaussianMixture`][scoresolve.GaussianMixture]
(`toy_mixture`), so its score is known at every t.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .analytic import GaussianMixture
from .quantization.levels import dequantize, from_levels

DIGITS_LEVELS = 17
DIGITS_RANGE = (-1.0, 1.0)
DIGITS_SHAPE = (1, 8, 8)
TOY_DATASETS = ("moons", "swissroll", "checkerboard", "gmm")
DATASETS = ("digits",) + TOY_DATASETS

Range = Sequence[float]


# --------------------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------------------
def _import_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or scoresolve[models])"
        ) from e
    return load_digits


def digits(
    split: str = "train",
    *,
    test_size: int = 297,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
):
    """scikit-learn's 8x8 handwritten digits as grid values x = 2 v / 16 - 1 in [-1, 1], shape ``[N, 1, 8, 8]``.

    Args:
        split: ``"train"`` (1500 images by default), ``"test"`` (297) or ``"all"`` (1797, in the original order).
        test_size: size of the held-out split: the last ``test_size`` entries of a permutation of the 1797 images
            drawn from ``torch.Generator().manual_seed(seed)``.
        return_labels: also return the ``[N]`` int64 class labels.
    The values are 17-level data (``num_levels=DIGITS_LEVELS``): see the module docstring for dequantization and
    bits/dim.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = _import_sklearn_digits()()
    v = torch.as_tensor(d.images, dtype=torch.int64).reshape(-1, *DIGITS_SHAPE)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    n = v.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size must lie in (0, {n}), got {test_size}")
    if split != "all":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        idx = perm[: n - test_size] if split == "train" else perm[n - test_size :]
        v, y = v[idx], y[idx]
    x = from_levels(v, DIGITS_LEVELS, DIGITS_RANGE, dtype=dtype)
    return (x, y) if return_labels else x


# --------------------------------------------------------------------------------------------------------------------
# 2-D toy sets
# --------------------------------------------------------------------------------------------------------------------
def toy_mixture() -> GaussianMixture:
    """The ``gmm`` toy set: 8 equal isotropic Gaussians (std 0.15) on a circle of radius 2, an exact model."""
    k = torch.arange(8, dtype=torch.float64)
    means = 2.0 * torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], 1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.15**2))


def _moons(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    # centre (0.5, 0.25) and scale to about unit standard deviation
    return (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) / torch.tensor([0.87, 0.5], dtype=torch.float64)


def _swissroll(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1) / 7.0
    return pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _checkerboard(n: int, g: torch.Generator, noise: float) -> torch.Tensor:
    # uniform on the 8 "black" unit squares of a 4x4 board on [-2, 2]^2
    cell = torch.randint(0, 8, (n,), generator=g)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    pts = torch.stack([col.double() + u[:, 0], row.double() + u[:, 1]], 1) - 2.0
    return pts / 1.15


def toy_sample(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    *,
    noise: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` samples ``[n, 2]`` of a 2-D toy set: ``moons``, ``swissroll``, ``checkerboard`` or ``gmm``.

    All randomness comes from ``generator`` (a fresh default-seeded one if None, so a call is reproducible).
    ``noise`` is the std of the Gaussian jitter of moons and swiss roll. Every set has a scale of order one.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if name == "moons":
        x = _moons(n, g, noise)
    elif name == "swissroll":
        x = _swissroll(n, g, noise)
    elif name == "checkerboard":
        x = _checkerboard(n, g, noise)
    elif name == "gmm":
        x = toy_mixture().sample(n, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {TOY_DATASETS}")
    return x.to(dtype)


def toy_dataset(name: str, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
    """A fixed toy dataset: ``toy_sample(name, n, torch.Generator().manual_seed(seed))``."""
    return toy_sample(name, n, torch.Generator().manual_seed(seed), **kwargs)


def batch_sampler(name: str, *, seed: int = 0) -> tuple[Callable[[int, torch.Generator], torch.Tensor], tuple]:
    """A training-batch sampler ``draw(n, generator) -> [n, *shape]`` for dataset ``name`` and the sample shape.

    Toy sets draw fresh samples every batch (infinite data); ``digits`` draws training images with replacement and
    dequantizes them (17 levels, see the module docstring), so a model learns the density that bits/dim measures.
    """
    if name in TOY_DATASETS:
        return (lambda n, g: toy_sample(name, n, g)), (2,)
    if name == "digits":
        train = digits("train", seed=seed)

        def draw(n: int, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, train.shape[0], (n,), generator=g)
            return dequantize(train[idx], DIGITS_LEVELS, DIGITS_RANGE, generator=g)

        return draw, DIGITS_SHAPE
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
