"""Exact test models: Gaussian mixtures with closed-form scores and log-densities at every noise level.

If x_0 ~ sum_k w_k N(mu_k, Sigma_k) then under any forward SDE here p_t = sum_k w_k N(alpha mu_k, C_k) with
C_k = alpha^2 Sigma_k + sigma^2 I. With v_k = -C_k^{-1}(x - alpha mu_k) and posterior weights r_k(x):
    score = sum_k r_k v_k,
    Laplacian log p_t = sum_k r_k (|v_k|^2 - tr C_k^{-1}) - |score|^2.
Each Sigma_k = U_k diag(lam_k) U_k^T is diagonalised once, so C_k^{-1} is cheap for per-sample times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from ._utils import Time, bcast, check_batched, check_count
from .pfgm import PFGMPP
from .sde import ForwardSDE

if TYPE_CHECKING:
    from .score import ScoreModel

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """A mixture sum_k w_k N(mu_k, Sigma_k) over events of shape ``event_shape`` (D = prod(event_shape)).

    Args:
        weights: ``[K]`` nonnegative (normalised here).
        means: ``[K, D]`` or ``[K, *event_shape]``.
        covs: ``[K, D, D]`` full, ``[K, D]`` diagonal, ``[K]`` isotropic variances, or None for identity.
        event_shape: shape of one sample (default ``(D,)``), e.g. ``(3, 32, 32)`` for image-shaped data.
    Parameters are stored in float64; computations follow x's dtype and device.
    """

    def __init__(
        self,
        weights: torch.Tensor | Sequence[float],
        means: torch.Tensor | Sequence[Sequence[float]],
        covs: torch.Tensor | Sequence | None = None,
        event_shape: Sequence[int] | None = None,
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        K = w.numel()
        if K < 1 or mu.numel() < 1:
            raise ValueError(f"a mixture needs at least one component of at least one dimension, got means of shape "
                             f"{tuple(mu.shape)}")
        if mu.shape[0] != K:
            raise ValueError(f"means has {mu.shape[0]} components but weights has {K}")
        mu = mu.reshape(K, -1)
        D = mu.shape[1]
        if not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError("weights must be nonnegative with a positive sum")
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold D = {D} values")
        self.weights = w / w.sum()
        self.means = mu
        if covs is None:
            covs = torch.ones(K, dtype=torch.float64)
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.shape == (K,):
            evals, evecs = c[:, None].expand(K, D).clone(), None
        elif c.shape == (K, D):
            evals, evecs = c.clone(), None
        elif c.shape == (K, D, D):
            if not torch.allclose(c, c.transpose(1, 2), atol=1e-10 * float(c.abs().max())):
                raise ValueError("covariance matrices must be symmetric")
            evals, evecs = torch.linalg.eigh(c)
        else:
            raise ValueError(f"covs must have shape [K], [K, D] or [K, D, D] with K={K}, D={D}; got {tuple(c.shape)}")
        if not bool((evals >= 0).all()):
            raise ValueError("covariance matrices must be positive semi-definite")
        self.evals = evals  # [K, D]
        self.evecs = evecs  # [K, D, D] or None (axis-aligned)
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    def _params(self, like: torch.Tensor):
        key = (like.dtype, like.device)
        if key not in self._cache:
            conv = lambda a: None if a is None else a.to(dtype=like.dtype, device=like.device)  # noqa: E731
            self._cache[key] = (conv(self.weights.log()), conv(self.means), conv(self.evals), conv(self.evecs))
        return self._cache[key]

    def _terms(self, x: torch.Tensor, t: Time, sde: ForwardSDE):
        """Per-component quantities in each component's eigenbasis: y = U^T(x - a mu), c = a^2 lam + s^2."""
        check_batched(x)
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x has event shape {tuple(x.shape[1:])}, the mixture has {self.event_shape}")
        a, s = sde.marginal(sde.as_time(t, like=x, batch=x.shape[0]))
        logw, mu, lam, U = self._params(x)
        xf = x.flatten(1)  # [B, D]
        a2 = a.reshape(-1, 1, 1) if a.ndim else a
        s2 = s.reshape(-1, 1, 1) if s.ndim else s
        diff = xf[:, None, :] - a2 * mu[None]  # [B, K, D]
        y = diff if U is None else torch.einsum("kde,bkd->bke", U, diff)
        c = a2**2 * lam[None] + s2**2  # [B, K, D] or [1, K, D]
        c = c.expand(y.shape)
        logN = -0.5 * (y.square() / c).sum(-1) - 0.5 * torch.log(c).sum(-1) - 0.5 * self.dim * _LOG_2PI
        logits = logw[None] + logN  # [B, K]
        return xf, y, c, U, logits

    def log_prob(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """log p_t(x), shape ``[batch]``."""
        return torch.logsumexp(self._terms(x, t, sde)[4], dim=1)

    def _score_flat(self, x: torch.Tensor, t: Time, sde: ForwardSDE):
        xf, y, c, U, logits = self._terms(x, t, sde)
        r = torch.softmax(logits, dim=1)  # [B, K]
        vy = -y / c  # v_k in eigenbasis
        v = vy if U is None else torch.einsum("kde,bke->bkd", U, vy)
        score = (r[..., None] * v).sum(1)
        return score, r, vy, c

    def score(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """grad_x log p_t(x), shape like x."""
        return self._score_flat(x, t, sde)[0].reshape(x.shape)

    def laplacian(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """Laplacian of log p_t at x (trace of the Hessian), shape ``[batch]``."""
        score, r, vy, c = self._score_flat(x, t, sde)
        per = vy.square().sum(-1) - (1 / c).sum(-1)  # [B, K]
        return (r * per).sum(1) - score.square().sum(1)

    def score_fn(self, sde: ForwardSDE):
        """A plain callable ``score(x, t)`` for solvers."""
        _check_gaussian(sde)

        def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.score(x, t, sde)

        return score

    def _posterior(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t = x] flattened ``[B, D]``, tr Cov[x0 | x_t = x] ``[B]``), finite where alpha = 0.

        Per component the posterior is Gaussian with mean mu + a Sigma C^{-1}(x - a mu) and covariance
        s^2 Sigma C^{-1} (eigenvalues lam s^2 / c); the mixture's is the r-weighted mixture of these.
        """
        xf, y, c, U, logits = self._terms(x, t, sde)
        a, s = sde.marginal(sde.as_time(t, like=x, batch=x.shape[0]))
        a2 = a.reshape(-1, 1, 1) if a.ndim else a
        s2 = s.reshape(-1, 1, 1) if s.ndim else s
        _, mu, lam, _ = self._params(x)
        r = torch.softmax(logits, dim=1)  # [B, K]
        shift_y = a2 * lam[None] * y / c  # Sigma C^{-1}(x - a mu) * a, eigenbasis
        shift = shift_y if U is None else torch.einsum("kde,bke->bkd", U, shift_y)
        m_k = mu[None] + shift  # [B, K, D]
        m = (r[..., None] * m_k).sum(1)
        second = (s2**2 * lam[None] / c).sum(-1) + m_k.square().sum(-1)  # tr Cov_k + |m_k|^2
        return m, (r * second).sum(1) - m.square().sum(1)

    def x0(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """E[x0 | x_t = x], the exact data prediction (Tweedie's denoiser), shape like x; finite at alpha = 0."""
        return self._posterior(x, t, sde)[0].reshape(x.shape)

    def flow(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """The exact probability-flow velocity f x - g^2/2 score = alpha' x0 + sigma' eps, shape like x.

        Taken from the score where alpha >= sigma and from the posterior mean elsewhere (the second form is finite at
        alpha = 0, the first has no cancellation as sigma -> 0); the branch not taken is evaluated at a safe time so
        that gradients through it stay finite.
        """
        tt = sde.as_time(t, like=x, batch=x.shape[0])
        a, s = sde.marginal(tt, check=False)
        low = a >= s  # low noise: the score form
        t_lo, t_hi = torch.where(low, tt, torch.zeros_like(tt)), torch.where(low, torch.full_like(tt, sde.T), tt)
        v_lo = bcast(sde.f(t_lo, check=False), x) * x - bcast(0.5 * sde.g2(t_lo, check=False), x) * self.score(
            x, t_lo.clamp(min=1e-300), sde)
        a_hi, s_hi = sde.marginal(t_hi, check=False)
        x0 = self.x0(x, t_hi, sde)
        eps = (x - bcast(a_hi, x) * x0) / bcast(s_hi, x)
        v_hi = bcast(sde.dalpha_dt(t_hi, check=False), x) * x0 + bcast(sde.dsigma_dt(t_hi, check=False), x) * eps
        return torch.where(bcast(low, x), v_lo, v_hi)

    def model(self, sde: ForwardSDE, prediction: str = "x0") -> "ScoreModel":
        """The exact model as a [`ScoreModel`][scoresolve.ScoreModel] predicting ``prediction`` (score, eps, x0, v or
        flow), finite wherever sigma > 0 (also at alpha = 0, for every prediction but score-derived x0 forms)."""
        from .score import PREDICTIONS, ScoreModel

        _check_gaussian(sde)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if prediction == "flow":
                return self.flow(x, t, sde)
            if prediction == "x0":
                return self.x0(x, t, sde)
            score = self.score(x, t, sde)
            if prediction == "score":
                return score
            a, s = (bcast(c, x) for c in sde.marginal(t, check=False))
            eps = -s * score
            return eps if prediction == "eps" else a * eps - s * self.x0(x, t, sde)  # v = alpha eps - sigma x0

        return ScoreModel(net, sde, prediction=prediction, time="t")  # type: ignore[arg-type]

    def pf_ode_divergence(self, x: torch.Tensor, t: Time, sde: ForwardSDE) -> torch.Tensor:
        """Exact divergence of the probability-flow drift: D f(t) - g(t)^2/2 * Laplacian log p_t; ``[batch]``.

        On a ``velocity_form`` process (f, g^2 may diverge at alpha = 0) the same quantity where alpha < sigma in a
        form finite at alpha = 0: with J = d E[x0|x]/dx = (a / s^2) Cov[x0|x] (second-order Tweedie),
        div v = a' tr J + s' (D - a tr J) / s.
        """
        tt = sde.as_time(t, like=x, batch=x.shape[0])
        if not sde.velocity_form:
            return self.dim * sde.f(tt) - 0.5 * sde.g2(tt) * self.laplacian(x, tt, sde)
        a, s = sde.marginal(tt, check=False)
        low = a >= s
        t_lo, t_hi = torch.where(low, tt, torch.zeros_like(tt)), torch.where(low, torch.full_like(tt, sde.T), tt)
        d_lo = self.dim * sde.f(t_lo, check=False) - 0.5 * sde.g2(t_lo, check=False) * self.laplacian(
            x, t_lo.clamp(min=1e-300), sde)
        a_hi, s_hi = sde.marginal(t_hi, check=False)
        trJ = a_hi * self._posterior(x, t_hi, sde)[1] / s_hi**2
        da, ds = sde.dalpha_dt(t_hi, check=False), sde.dsigma_dt(t_hi, check=False)
        d_hi = da * trJ + ds * (self.dim - a_hi * trJ) / s_hi
        return torch.where(low, d_lo, d_hi)

    def pf_ode_flow(self, x: torch.Tensor, t_from: float, t_to: float, sde: ForwardSDE) -> torch.Tensor:
        """Exact probability-flow ODE solution map x(t_from) -> x(t_to); single-component mixtures only.

        For Gaussian data the PF-ODE is linear: in each eigendirection of Sigma, y = x - alpha mu scales as
        sqrt(c(t)), c = alpha^2 lam + sigma^2 (because dc/dt = 2 f c + g^2 for every SDE here).
        """
        if self.num_components != 1:
            raise ValueError("pf_ode_flow is exact only for a single Gaussian (num_components == 1)")
        check_batched(x)
        _, mu, lam, U = self._params(x)
        tf = torch.tensor([float(t_from), float(t_to)], dtype=x.dtype, device=x.device)
        a, s = sde.marginal(tf)
        c = a[:, None] ** 2 * lam[0][None] + s[:, None] ** 2  # [2, D]
        y = x.flatten(1) - a[0] * mu[0]
        if U is not None:
            y = y @ U[0]
        y = y * torch.sqrt(c[1] / c[0])
        if U is not None:
            y = y @ U[0].T
        return (a[1] * mu[0] + y).reshape(x.shape)

    def mean(self, t: Time = 0.0, sde: ForwardSDE | None = None) -> torch.Tensor:
        """Exact mean of p_t (of the data when ``sde`` is None), float64, shape ``[D]``."""
        m = (self.weights[:, None] * self.means).sum(0)
        if sde is None:
            return m
        a, _ = sde.marginal(torch.as_tensor(float(t), dtype=torch.float64))
        return a * m

    def cov(self, t: Time = 0.0, sde: ForwardSDE | None = None) -> torch.Tensor:
        """Exact covariance of p_t (of the data when ``sde`` is None), float64, shape ``[D, D]``."""
        if self.evecs is None:
            covs = torch.diag_embed(self.evals)
        else:
            covs = self.evecs @ torch.diag_embed(self.evals) @ self.evecs.transpose(1, 2)
        m = self.mean()
        second = (self.weights[:, None, None] * (covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        C = second - m[:, None] * m[None, :]
        if sde is None:
            return C
        a, s = sde.marginal(torch.as_tensor(float(t), dtype=torch.float64))
        return a**2 * C + s**2 * torch.eye(self.dim, dtype=torch.float64)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw n samples of the data distribution, shape ``[n, *event_shape]``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        zs = z * self.evals[k].clamp(min=0).sqrt()
        if self.evecs is not None:
            zs = torch.einsum("nde,ne->nd", self.evecs[k], zs)
        x = self.means[k] + zs
        return x.reshape(n, *self.event_shape).to(dtype=dtype, device=device)

    def sample_marginal(
        self,
        n: int,
        t: float,
        sde: ForwardSDE,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw n samples of p_t (exact: x_t = alpha x_0 + sigma z)."""
        x0 = self.sample(n, generator, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return sde.perturb(x0, t, noise=noise).to(dtype=dtype, device=device)

    @classmethod
    def random(
        cls,
        dim: int,
        num_components: int = 4,
        *,
        spread: float = 2.0,
        scale_range: tuple[float, float] = (0.05, 0.5),
        full: bool = True,
        event_shape: Sequence[int] | None = None,
        seed: int = 0,
    ) -> "GaussianMixture":
        """A reproducible random mixture: means ~ N(0, spread^2 / dim), covariances with std in ``scale_range``.

        With ``full`` the covariances are random rotations of diagonal ones (correlated components); small
        scale_range lower bounds give near-degenerate components, like dequantized images near t = 0.
        """
        K, D = check_count(num_components, "num_components"), check_count(dim, "dim")
        g = torch.Generator().manual_seed(seed)
        w = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
        mu = torch.randn(K, D, generator=g, dtype=torch.float64) * spread / math.sqrt(max(D, 1)) * math.sqrt(min(D, 4))
        lo, hi = scale_range
        std = lo * (hi / lo) ** torch.rand(K, D, generator=g, dtype=torch.float64)
        if not full:
            return cls(w, mu, std**2, event_shape=event_shape)
        Q, R = torch.linalg.qr(torch.randn(K, D, D, generator=g, dtype=torch.float64))
        Q = Q * torch.sign(torch.diagonal(R, dim1=1, dim2=2))[:, None, :]
        covs = Q @ torch.diag_embed(std**2) @ Q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        return cls(w, mu, covs, event_shape=event_shape)


def _check_gaussian(sde: object) -> None:
    """The mixture's closed forms need a Gaussian kernel x_t = alpha x_0 + sigma z (a `ForwardSDE`)."""
    if not isinstance(sde, ForwardSDE):
        raise TypeError(f"the mixture's exact score needs a Gaussian-kernel process (a ForwardSDE such as VPSDE or "
                        f"RectifiedFlow), got {type(sde).__name__}"
                        + ("; for PFGM++ use scoresolve.PointCloud's exact denoiser" if isinstance(sde, PFGMPP)
                           else ""))
