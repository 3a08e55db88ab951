"""An exact test model for any perturbation kernel: a weighted point cloud.

Data y = y_k with probability w_k (K points, any event shape, N elements each). Under a kernel p_t(x | y) the
marginal is p_t(x) = sum_k w_k p_t(x | y_k); with posterior weights pi_k(x) = w_k p_t(x | y_k) / p_t(x):

    E[y | x, t] = sum_k pi_k y_k,          grad log p_t(x) = sum_k pi_k grad_x log p_t(x | y_k).

Kernels: a `scoresolve.PFGMPP` process (Student-t, grad log p = -(N + D)(x - y) / (|x - y|^2 + r^2)) at every sigma
and D, and any Gaussian `scoresolve.ForwardSDE` (x = alpha y + sigma z: the D -> inf limit on `scoresolve.EDMSDE`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._utils import Time, check_batched
from .pfgm import PFGMPP
from .process import Process

if TYPE_CHECKING:
    from .score import ScoreModel


class PointCloud:
    """Points ``[K, *event_shape]`` with weights ``[K]`` (nonnegative, normalised here; None: uniform)."""

    def __init__(self, points: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if not torch.is_tensor(points) or points.ndim < 2 or points.shape[0] < 1:
            raise ValueError("points must be a tensor [K, *event_shape] with K >= 1")
        if not bool(torch.isfinite(points).all()):
            raise ValueError("points contain non-finite values")
        K = points.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=points.dtype) if weights is None else torch.as_tensor(weights)
        if w.shape != (K,) or not bool((w >= 0).all()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be [K] = [{K}] nonnegative with a positive sum")
        self.points = points
        self.weights = (w / w.sum()).to(points.dtype)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.points.shape[1:])

    @property
    def dim(self) -> int:
        """N, the elements per sample."""
        return math.prod(self.event_shape)

    def _prep(self, x: torch.Tensor, t: Time) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        check_batched(x)
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x has event shape {tuple(x.shape[1:])}, the point cloud {self.event_shape}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        Y = self.points.to(dtype=x.dtype, device=x.device).flatten(1)
        logw = torch.log(self.weights.to(dtype=x.dtype, device=x.device))
        return x.flatten(1), t, Y, logw

    def _log_kernel(self, x: torch.Tensor, t: Time, process: Process):
        """(log p_t(x | y_k) ``[B, K]``, flat x, flat Y scaled by alpha, t, and the kernel's score factor)."""
        xf, t, Y, logw = self._prep(x, t)
        N = xf.shape[1]
        if isinstance(process, PFGMPP):
            process.elements(x)
            s = t[:, None]
            d2 = (xf[:, None, :] - Y[None]).square().sum(-1)
            lk = process.log_kernel_sq(d2, s, N)
            factor = -(N + process.D) / (d2 + s * s * process.D)  # grad log p(x | y_k) = factor_k (x - y_k)
            return lk + logw, xf, Y, factor
        if not getattr(process, "gaussian_kernel", False):
            raise TypeError(f"PointCloud knows the PFGMPP and Gaussian kernels, not {process!r}")
        alpha, sigma = process.marginal(t, check=False)  # type: ignore[attr-defined]
        aY = alpha[:, None, None] * Y[None]
        d2 = (xf[:, None, :] - aY).square().sum(-1)
        s2 = (sigma * sigma)[:, None]
        lk = -0.5 * d2 / s2 - 0.5 * N * torch.log(2 * math.pi * s2)
        return lk + logw, xf, aY, (-1 / s2).expand_as(d2)

    def log_prob(self, x: torch.Tensor, t: Time, process: Process) -> torch.Tensor:
        """log p_t(x) ``[batch]`` (exact)."""
        lj, *_ = self._log_kernel(x, t, process)
        return torch.logsumexp(lj, dim=1)

    def posterior(self, x: torch.Tensor, t: Time, process: Process) -> torch.Tensor:
        """pi_k(x) ``[batch, K]``."""
        lj, *_ = self._log_kernel(x, t, process)
        return torch.softmax(lj, dim=1)

    def x0(self, x: torch.Tensor, t: Time, process: Process) -> torch.Tensor:
        """E[y | x, t] = sum_k pi_k y_k, shaped like x."""
        lj, xf, _, _ = self._log_kernel(x, t, process)
        Y = self.points.to(dtype=x.dtype, device=x.device).flatten(1)
        return (torch.softmax(lj, dim=1) @ Y).reshape(x.shape)

    def score(self, x: torch.Tensor, t: Time, process: Process) -> torch.Tensor:
        """grad log p_t(x), shaped like x."""
        lj, xf, Yk, factor = self._log_kernel(x, t, process)
        diff = xf[:, None, :] - (Yk if Yk.ndim == 3 else Yk[None])
        return (torch.softmax(lj, dim=1)[..., None] * factor[..., None] * diff).sum(1).reshape(x.shape)

    def model(self, process: Process) -> "ScoreModel":
        """The exact denoiser x0_hat(x, t) as a `scoresolve.ScoreModel` (prediction ``"x0"``, time t), the model the
        solvers and `scoresolve.log_likelihood` take on ``process``."""
        from .score import ScoreModel

        return ScoreModel(lambda x, t: self.x0(x, t, process), process, prediction="x0", time="t")  # type: ignore

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n points drawn by weight ``[n, *event_shape]``, their indices ``[n]``)."""
        idx = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        return self.points[idx], idx

    def sample_marginal(self, n: int, t: Time, process: Process,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x_t: a point, then the process's kernel (``PFGMPP.perturb`` or alpha y + sigma z)."""
        y, _ = self.sample(n, generator)
        if isinstance(process, PFGMPP):
            return process.perturb(y, t, generator)
        tt = torch.as_tensor(t, dtype=y.dtype).expand(n)
        alpha, sigma = process.marginal(tt, check=False)  # type: ignore[attr-defined]
        z = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        return alpha.reshape(-1, *[1] * (y.ndim - 1)) * y + sigma.reshape(-1, *[1] * (y.ndim - 1)) * z

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest point to each sample ``[batch]``."""
        xf = x.flatten(1)
        Y = self.points.to(dtype=x.dtype, device=x.device).flatten(1)
        return (xf[:, None, :] - Y[None]).square().sum(-1).argmin(1)
