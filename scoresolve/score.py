"""Score models: wrap a network predicting score, eps, x0 or v, and convert between the four predictions.

With x_t = alpha x0 + sigma eps (alpha, sigma from the forward SDE):
    score = -eps / sigma,   x0 = (x_t - sigma eps) / alpha,   v = alpha eps - sigma x0   (Salimans & Ho 2022).
Inverting v for eps in general (alpha^2 + sigma^2 need not be 1, e.g. VE or sub-VP):
    eps = (alpha v + sigma x_t) / (alpha^2 + sigma^2).
Guidance lives here too, as transforms of a score callable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Union

import torch

from ._utils import bcast

if TYPE_CHECKING:
    from .sde import ForwardSDE

Prediction = Literal["score", "eps", "x0", "v"]
TimeConvention = Union[Literal["t", "index", "discrete", "sigma", "log_sigma"], Callable[[torch.Tensor], torch.Tensor]]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTIONS = ("score", "eps", "x0", "v")


def to_eps(
    pred: torch.Tensor, kind: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Convert a prediction of ``kind`` at (x, alpha, sigma) to the noise prediction eps."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if kind == "eps":
        return pred
    if kind == "score":
        return -s * pred
    if kind == "x0":
        return (x - a * pred) / s
    if kind == "v":
        return (a * pred + s * x) / (a * a + s * s)
    raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")


def from_eps(
    eps: torch.Tensor, kind: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Convert the noise prediction eps at (x, alpha, sigma) to a prediction of ``kind``."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / s
    if kind == "x0":
        return (x - s * eps) / a
    if kind == "v":
        return a * eps - s * (x - s * eps) / a
    raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")


def convert(
    pred: torch.Tensor, src: Prediction, dst: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Convert a prediction between any two of ``score``, ``eps``, ``x0``, ``v``."""
    if src == dst:
        if src not in PREDICTIONS:
            raise ValueError(f"unknown prediction {src!r}; expected one of {PREDICTIONS}")
        return pred
    return from_eps(to_eps(pred, src, x, alpha, sigma), dst, x, alpha, sigma)


class ScoreModel:
    """A network ``net(x, t_in, **net_kwargs)`` predicting ``prediction`` with time convention ``time``.

    ``time`` maps the solver's continuous t (shape ``[batch]``) to the network's input:
    ``"t"`` t itself; ``"index"`` t (N - 1) (score_sde's continuous VP models, N = ``num_timesteps``);
    ``"discrete"`` the DDPM index N t - 1 of [`DiscreteVPSDE`][scoresolve.DiscreteVPSDE]; ``"sigma"`` / ``"log_sigma"``
    the marginal std sigma(t) or its log (VE models); or any callable ``t -> t_in``.
    Calling the model returns the score; [`eps`][scoresolve.ScoreModel.eps], [`x0`][scoresolve.ScoreModel.x0],
    [`v`][scoresolve.ScoreModel.v] and [`predict`][scoresolve.ScoreModel.predict] give the others. The network's output
    is cast to x's dtype (a bf16 network inside a float32 solver works); a network output of another shape or device is
    an error.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        sde: "ForwardSDE",
        prediction: Prediction = "eps",
        time: TimeConvention = "t",
        num_timesteps: int = 1000,
        net_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if not callable(time) and time not in ("t", "index", "discrete", "sigma", "log_sigma"):
            raise ValueError(f"unknown time convention {time!r}")
        if time == "discrete" and not hasattr(sde, "timestep"):
            raise ValueError("time='discrete' needs a DiscreteVPSDE (an SDE with a timestep(t) method)")
        self.net = net
        self.sde = sde
        self.prediction = prediction
        self.time = time
        self.num_timesteps = int(num_timesteps)
        self.net_kwargs = dict(net_kwargs or {})

    @classmethod
    def wrap(cls, score: "ScoreFn | ScoreModel", sde: "ForwardSDE") -> "ScoreModel":
        """Return ``score`` if it is a ScoreModel, else wrap a plain callable ``score(x, t)`` (continuous t)."""
        if isinstance(score, ScoreModel):
            return score
        if not callable(score):
            raise TypeError(f"score must be callable score(x, t), got {type(score).__name__}")
        return cls(score, sde, prediction="score", time="t")

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for continuous times ``t``."""
        if callable(self.time):
            return self.time(t)
        if self.time == "t":
            return t
        if self.time == "index":
            return t * (self.num_timesteps - 1)
        if self.time == "discrete":
            return self.sde.timestep(t)  # type: ignore[attr-defined]
        sigma = self.sde.sigma(t, check=False)
        return sigma if self.time == "sigma" else torch.log(sigma)

    def raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's own prediction at (x, t), validated and cast to x's dtype."""
        t = _batch_time(t, x)
        out = self.net(x, self.network_time(t), **self.net_kwargs)
        if not torch.is_tensor(out):
            raise TypeError(f"the score network returned {type(out).__name__}, expected a tensor")
        if out.shape != x.shape:
            raise ValueError(f"the score network returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        if out.device != x.device:
            raise ValueError(f"the score network returned a tensor on {out.device} for input on {x.device}")
        return out.to(x.dtype)

    def predict(self, x: torch.Tensor, t: torch.Tensor, kind: Prediction = "score") -> torch.Tensor:
        """Prediction of ``kind`` (score, eps, x0 or v) at (x, t)."""
        t = _batch_time(t, x)
        out = self.raw(x, t)
        if kind == self.prediction:
            return out
        alpha, sigma = self.sde.marginal(t, check=False)  # times come from solvers, some outside ours
        return convert(out, self.prediction, kind, x, alpha, sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x, t, "score")

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps at (x, t), i.e. ``predict(x, t, "eps")``."""
        return self.predict(x, t, "eps")

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-data prediction x0 at (x, t), i.e. ``predict(x, t, "x0")``."""
        return self.predict(x, t, "x0")

    def v(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity v = alpha eps - sigma x0 at (x, t), i.e. ``predict(x, t, "v")``."""
        return self.predict(x, t, "v")


def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
    t = t.to(dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"batch size mismatch: t has shape {tuple(t.shape)} but x has batch size {x.shape[0]}")
    return t


def classifier_guidance(
    score: ScoreFn, log_prob_y: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float = 1.0
) -> ScoreFn:
    """Classifier guidance: score(x, t) + scale * grad_x log p(y | x, t).

    ``log_prob_y(x, t)`` returns the classifier's log-probability of the wanted class, shape ``[batch]``;
    its gradient is taken by autograd. scale = 1 gives the score of p_t(x | y); other scales tilt it to
    p_t(x) p_t(y | x)^scale.
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = log_prob_y(xg, t)
            if lp.shape != (x.shape[0],):
                raise ValueError(f"log_prob_y must return shape [batch] = ({x.shape[0]},), got {tuple(lp.shape)}")
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        return score(x, t) + scale * grad

    return guided


def classifier_free_guidance(cond: ScoreFn, uncond: ScoreFn, scale: float) -> ScoreFn:
    """Classifier-free guidance: (1 + scale) cond(x, t) - scale uncond(x, t) (Ho & Salimans 2022).

    The weights sum to one, so mixing scores, eps, x0 or v predictions gives the same result: the conversions
    between them are affine in the prediction with the same (x, t). scale = 0 is the conditional model.
    """
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = cond(x, t)
        if scale == 0:
            return c
        return (1 + scale) * c - scale * uncond(x, t)

    return guided
