"""A Gaussian control variate for Hutchinson's divergence estimator (variance reduction of likelihood estimates).

If the data were Gaussian, x_0 ~ N(mu, Sigma) with Sigma = U diag(lam) U^T, then under any forward process
x_t = alpha x_0 + sigma z the marginal is N(alpha mu, C), C = alpha^2 Sigma + sigma^2 I, and both the score and the
probability-flow velocity are linear in x with the Jacobians (same eigenvectors U)

    J_score = -C^{-1}                    = U diag(-1 / (alpha^2 lam + sigma^2)) U^T,
    J_flow  = alpha' alpha Sigma C^{-1} + sigma' sigma C^{-1}
            = U diag((alpha' alpha lam + sigma' sigma) / (alpha^2 lam + sigma^2)) U^T,

(alpha' = d alpha/dt, sigma' = d sigma/dt); J_flow is finite where alpha = 0 (rectified flow at t = 1). Their traces
are exact and cheap. For a network whose Jacobian J is close to the Gaussian one J_G, the estimator

    e^T J e - e^T J_G e + tr J_G                                            (E[e e^T] = I)

is unbiased for tr J and its variance is that of the residual J - J_G instead of J (for Rademacher probes
2 sum_{i != j} of its squared off-diagonal entries: pixels of images are strongly correlated, so most of the
off-diagonal mass of J is the Gaussian part). With probes fixed along the PF-ODE trajectory the same holds for
the integrated matrices, the quantity whose variance the standard error of log p measures. Measured
(`benchmarks/hutchinson_variance.py`, docs/guide.md): exact on Gaussian data, 3x lower standard error on a mixture
sharing one correlated covariance, but only 0.91x on the digits VP U-Net and 1.0x on the digits flow U-Net, whose
Jacobians at mid noise levels are far from the Gaussian's.

``rank=r`` keeps the top r eigenpairs of the fitted covariance and replaces the other D - r eigenvalues by their
mean (one number), so memory is O(D r) for images: J_G e costs one [D, r] projection and back.

Antithetic probe pairs (e, -e) do nothing for a quadratic form: e^T J e = (-e)^T J (-e), the pair is one probe
counted twice. Orthogonal probes (``probe="orthogonal"`` of `scoresolve.log_likelihood`,
`scoresolve.divergence.draw_probes`) are the antithetic idea that does work, but only by a factor
(D - K)/(D - 1) of the variance for K probes in D dimensions: little when K << D.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .sde import ForwardSDE

__all__ = ["GaussianControlVariate"]


class GaussianControlVariate:
    """The Jacobians of the exact score and velocity of Gaussian data N(mu, U diag(lam) U^T) + the residual subspace.

    Args:
        mean: the data mean, ``[D]`` or of shape ``event_shape`` (only stored: the Jacobians do not depend on it).
        evecs: ``[D, r]`` orthonormal eigenvectors U of the covariance (r <= D).
        evals: ``[r]`` their eigenvalues lam (>= 0).
        residual: the one eigenvalue of the D - r directions orthogonal to U (their mean eigenvalue for a truncated
            fit; ignored when r = D).
        event_shape: shape of one sample (default ``(D,)``), e.g. ``(1, 8, 8)`` for the digits.
    Build it from data with [`from_data`][scoresolve.GaussianControlVariate.from_data] and pass it to
    [`log_likelihood`][scoresolve.log_likelihood] as ``control_variate=`` (Hutchinson divergence only).
    Parameters are stored in float64; results follow the probes' dtype and device.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        evecs: torch.Tensor,
        evals: torch.Tensor,
        residual: float = 0.0,
        event_shape: Sequence[int] | None = None,
    ) -> None:
        U = torch.as_tensor(evecs).detach().to(torch.float64)
        lam = torch.as_tensor(evals).detach().to(torch.float64).flatten()
        if U.ndim != 2:
            raise ValueError(f"evecs must be [D, r], got shape {tuple(U.shape)}")
        D, r = U.shape
        if not 1 <= r <= D:
            raise ValueError(f"evecs must be [D, r] with 1 <= r <= D, got shape {tuple(U.shape)}")
        if lam.numel() != r:
            raise ValueError(f"evals has {lam.numel()} entries for {r} eigenvectors")
        mu = torch.as_tensor(mean).detach().to(torch.float64)
        if mu.numel() != D:
            raise ValueError(f"mean has {mu.numel()} entries, the eigenvectors D = {D}")
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold D = {D} values")
        if not (bool(torch.isfinite(U).all()) and bool(torch.isfinite(lam).all()) and math.isfinite(residual)):
            raise ValueError("evecs, evals and residual must be finite")
        if bool((lam < 0).any()) or residual < 0:
            raise ValueError("eigenvalues must be >= 0")
        self.mean = mu.reshape(self.event_shape)
        self.evecs = U
        self.evals = lam
        self.residual = float(residual) if r < D else 0.0
        self._cache: dict = {}

    @classmethod
    def from_data(cls, x: torch.Tensor, rank: int | None = None) -> "GaussianControlVariate":
        """Fit mean and covariance to data ``x`` ``[n, ...]`` (in float64) and keep the top ``rank`` eigenpairs.

        Args:
            x: samples ``[n, ...]`` (n >= 2), e.g. dequantized training images; the event shape is ``x.shape[1:]``.
            rank: eigenpairs kept (None: all D); the other D - rank eigenvalues are replaced by their mean. For large
                D the top eigenpairs come from the n x n Gram matrix when n < D, so D x D is never formed then.
        """
        if not torch.is_tensor(x) or x.ndim < 2 or x.shape[0] < 2:
            raise ValueError("x must be a tensor of at least 2 samples, [n, ...]")
        xf = x.detach().flatten(1).to(torch.float64)
        n, D = xf.shape
        if not bool(torch.isfinite(xf).all()):
            raise ValueError("x contains non-finite values")
        r = D if rank is None else int(rank)
        if not 1 <= r <= D:
            raise ValueError(f"rank must lie in [1, D] = [1, {D}], got {rank}")
        mu = xf.mean(0)
        xc = xf - mu
        if n < D:  # thin SVD of the centred data: rank <= n - 1, the rest of the spectrum is 0
            _, s, Vh = torch.linalg.svd(xc, full_matrices=False)
            lam_all = torch.cat([s**2 / (n - 1), s.new_zeros(D - s.numel())])
            U_all = Vh.T
        else:
            lam_all, U_all = torch.linalg.eigh(xc.T @ xc / (n - 1))
            lam_all, U_all = lam_all.flip(0), U_all.flip(1)
        lam_all = lam_all.clamp(min=0)
        k = min(r, U_all.shape[1])
        residual = float(lam_all[k:].mean()) if k < D else 0.0
        return cls(mu, U_all[:, :k], lam_all[:k], residual, event_shape=x.shape[1:])

    @property
    def dim(self) -> int:
        """D, the number of values of one sample."""
        return self.evecs.shape[0]

    @property
    def rank(self) -> int:
        """r, the number of eigenpairs kept."""
        return self.evecs.shape[1]

    def __repr__(self) -> str:
        return (f"GaussianControlVariate(event_shape={self.event_shape}, rank={self.rank}, "
                f"evals=[{float(self.evals.min()):.3g}, {float(self.evals.max()):.3g}], residual={self.residual:.3g})")

    # --- internals -------------------------------------------------------------------------------------------------
    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = (self.evecs.to(dtype=like.dtype, device=like.device),
                                self.evals.to(dtype=like.dtype, device=like.device))
        return self._cache[key]

    def _lead(self, e: torch.Tensor) -> tuple[int, ...]:
        """The leading shape of ``e`` ([batch] or [K, batch], ...), checking its event shape."""
        n = len(self.event_shape)
        if e.ndim <= n or tuple(e.shape[e.ndim - n:]) != self.event_shape:
            raise ValueError(f"e must have shape [..., batch, *{self.event_shape}], got {tuple(e.shape)}")
        return tuple(e.shape[: e.ndim - n])

    def _coefs(self, kind: str, t: torch.Tensor, sde: "ForwardSDE", like: torch.Tensor):
        """Eigenvalues of J_G at ``t`` ``[batch]``: ([batch, r] on U, [batch] on the residual subspace)."""
        _, lam = self._params(like)
        t = t.to(dtype=like.dtype, device=like.device)
        a, s = sde.marginal(t, check=False)
        a, s = a[..., None], s[..., None]  # [batch, 1]
        lam_all = torch.cat([lam, lam.new_full((1,), self.residual)])  # [r + 1]: the last is the residual's
        c = a * a * lam_all + s * s
        if kind == "score":
            d = -1 / c
        else:
            da = sde.dalpha_dt(t, check=False)[..., None]
            ds = sde.dsigma_dt(t, check=False)[..., None]
            d = (da * a * lam_all + ds * s) / c
        return d[..., :-1], d[..., -1]

    def _jvp(self, kind: str, e: torch.Tensor, t: torch.Tensor, sde: "ForwardSDE") -> torch.Tensor:
        lead = self._lead(e)
        U, _ = self._params(e)
        d, d_res = self._coefs(kind, t, sde, e)  # [batch, r], [batch]
        ef = e.reshape(*lead, self.dim)
        y = ef @ U  # [..., batch, r]
        out = d_res[..., None] * ef + ((d - d_res[..., None]) * y) @ U.T
        return out.reshape(e.shape)

    def _trace(self, kind: str, t: torch.Tensor, sde: "ForwardSDE", like: torch.Tensor) -> torch.Tensor:
        d, d_res = self._coefs(kind, t, sde, like)
        return d.sum(-1) + (self.dim - self.rank) * d_res

    # --- the public Jacobian products and traces -------------------------------------------------------------------
    def score_jvp(self, e: torch.Tensor, t: torch.Tensor, sde: "ForwardSDE") -> torch.Tensor:
        """J_score e = -C^{-1} e, the Gaussian score's Jacobian (symmetric) times ``e``.

        Args:
            e: vectors ``[batch, ...]`` or ``[K, batch, ...]`` (the Hutchinson probes), event shape as fitted.
            t: times ``[batch]`` (one per sample, in [0, T]).
            sde: the forward process giving alpha(t), sigma(t).
        """
        return self._jvp("score", e, t, sde)

    def score_trace(self, t: torch.Tensor, sde: "ForwardSDE", like: torch.Tensor | None = None) -> torch.Tensor:
        """tr J_score = -sum_i 1/(alpha^2 lam_i + sigma^2), ``[batch]``.

        Args:
            t: times ``[batch]``.
            sde: the forward process.
            like: a tensor whose dtype and device the result takes (default: t's).
        """
        return self._trace("score", t, sde, t if like is None else like)

    def flow_jvp(self, e: torch.Tensor, t: torch.Tensor, sde: "ForwardSDE") -> torch.Tensor:
        """J_flow e, the Gaussian probability-flow velocity's Jacobian (symmetric, finite at alpha = 0) times ``e``.

        Args:
            e: vectors ``[batch, ...]`` or ``[K, batch, ...]``, event shape as fitted.
            t: times ``[batch]``.
            sde: the forward process giving alpha, sigma and their derivatives ``dalpha_dt``, ``dsigma_dt``.
        """
        return self._jvp("flow", e, t, sde)

    def flow_trace(self, t: torch.Tensor, sde: "ForwardSDE", like: torch.Tensor | None = None) -> torch.Tensor:
        """tr J_flow = sum_i (alpha' alpha lam_i + sigma' sigma)/(alpha^2 lam_i + sigma^2), ``[batch]``.

        Args:
            t: times ``[batch]``.
            sde: the forward process.
            like: a tensor whose dtype and device the result takes (default: t's).
        """
        return self._trace("flow", t, sde, t if like is None else like)

    def correction(self, e: torch.Tensor, t: torch.Tensor, sde: "ForwardSDE", velocity: bool = False) -> torch.Tensor:
        """tr J_G - e^T J_G e for each probe, ``[batch, K]``: add it to the Hutchinson estimates e^T J e.

        Args:
            e: the probes ``[K, batch, ...]``.
            t: times ``[batch]``.
            sde: the forward process.
            velocity: the velocity (flow) Jacobian instead of the score's.
        """
        kind = "flow" if velocity else "score"
        quad = (self._jvp(kind, e, t, sde) * e).flatten(2).sum(-1)  # [K, batch]
        return (self._trace(kind, t, sde, e)[None] - quad).transpose(0, 1)
