"""Score models: wrap a network predicting score, eps, x0, v or a flow velocity, and convert between the predictions.

With x_t = alpha x0 + sigma eps (alpha, sigma from the forward process):
    score = -eps / sigma,   x0 = (x_t - sigma eps) / alpha,   v = alpha eps - sigma x0   (Salimans & Ho 2022),
    flow  = alpha' x0 + sigma' eps = d x_t/dt   (flow matching; u = eps - x0 for rectified flow, alpha = 1 - t).
Inverting v for eps in general (alpha^2 + sigma^2 need not be 1, e.g. VE or sub-VP):
    eps = (alpha v + sigma x_t) / (alpha^2 + sigma^2).
Inverting the flow with W = alpha sigma' - alpha' sigma (= 1 for rectified flow):
    eps = (alpha u - alpha' x_t) / W,   x0 = (sigma' x_t - sigma u) / W,
finite where alpha = 0. The flow of any forward process is its probability-flow drift f x - g^2/2 score.
Guidance lives here too, as transforms of a score callable.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, Union

import torch

from ._utils import bcast, check_count
from .process import check_process

if TYPE_CHECKING:
    from .sde import ForwardSDE

Prediction = Literal["score", "eps", "x0", "v", "flow"]
TimeConvention = Union[Literal["t", "index", "discrete", "sigma", "log_sigma", "scaled"],
                       Callable[[torch.Tensor], torch.Tensor]]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTIONS = ("score", "eps", "x0", "v", "flow")
TIME_CONVENTIONS = ("t", "index", "discrete", "sigma", "log_sigma", "scaled")


def _check_kind(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")


def _need_derivatives(dalpha: torch.Tensor | None, dsigma: torch.Tensor | None) -> None:
    if dalpha is None or dsigma is None:
        raise ValueError("the 'flow' prediction needs dalpha = alpha'(t) and dsigma = sigma'(t)")


def to_eps(
    pred: torch.Tensor, kind: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
    dalpha: torch.Tensor | None = None, dsigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert a prediction of ``kind`` at (x, alpha, sigma) to the noise prediction eps (``flow`` also needs the
    derivatives alpha', sigma')."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if kind == "eps":
        return pred
    if kind == "score":
        return -s * pred
    if kind == "x0":
        return (x - a * pred) / s
    if kind == "v":
        return (a * pred + s * x) / (a * a + s * s)
    if kind == "flow":
        _need_derivatives(dalpha, dsigma)
        da, ds = bcast(dalpha, x), bcast(dsigma, x)
        return (a * pred - da * x) / (a * ds - da * s)
    _check_kind(kind)
    raise AssertionError


def from_eps(
    eps: torch.Tensor, kind: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
    dalpha: torch.Tensor | None = None, dsigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert the noise prediction eps at (x, alpha, sigma) to a prediction of ``kind`` (``flow`` also needs the
    derivatives alpha', sigma')."""
    a, s = bcast(alpha, x), bcast(sigma, x)
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / s
    if kind == "x0":
        return (x - s * eps) / a
    if kind == "v":
        return a * eps - s * (x - s * eps) / a
    if kind == "flow":
        _need_derivatives(dalpha, dsigma)
        da, ds = bcast(dalpha, x), bcast(dsigma, x)
        return da * ((x - s * eps) / a) + ds * eps
    _check_kind(kind)
    raise AssertionError


def _flow_to_x0(pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, da: torch.Tensor,
                ds: torch.Tensor) -> torch.Tensor:
    return (ds * x - s * pred) / (a * ds - da * s)


def _x0_to_flow(x0: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, da: torch.Tensor,
                ds: torch.Tensor) -> torch.Tensor:
    return da * x0 + ds * ((x - a * x0) / s)


def convert(
    pred: torch.Tensor, src: Prediction, dst: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
    dalpha: torch.Tensor | None = None, dsigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert a prediction between any two of ``score``, ``eps``, ``x0``, ``v``, ``flow``.

    ``dalpha``, ``dsigma`` (alpha'(t), sigma'(t)) are needed when either side is ``flow``. Conversions that involve
    the flow go through x0 where alpha may vanish (flow <-> x0 and flow <-> v stay finite at alpha = 0).
    """
    _check_kind(src)
    _check_kind(dst)
    if src == dst:
        return pred
    if {src, dst} == {"x0", "v"}:  # directly: finite at alpha = 0
        a, s = bcast(alpha, x), bcast(sigma, x)
        if src == "x0":
            return a * ((x - a * pred) / s) - s * pred
        return (a * x - s * pred) / (a * a + s * s)
    if "flow" in (src, dst):
        _need_derivatives(dalpha, dsigma)
        a, s, da, ds = (bcast(c, x) for c in (alpha, sigma, dalpha, dsigma))  # type: ignore[arg-type]
        if src == "flow":
            x0 = _flow_to_x0(pred, x, a, s, da, ds)
            if dst == "x0":
                return x0
            if dst == "v":  # v = alpha eps - sigma x0 with eps = (x - alpha x0)/sigma, finite at alpha = 0
                return (a * x - x0 * (a * a + s * s)) / s
            return from_eps(to_eps(pred, "flow", x, alpha, sigma, dalpha, dsigma), dst, x, alpha, sigma)
        if src in ("x0", "v"):
            x0 = pred if src == "x0" else (a * x - s * pred) / (a * a + s * s)
            return _x0_to_flow(x0, x, a, s, da, ds)
    return from_eps(to_eps(pred, src, x, alpha, sigma, dalpha, dsigma), dst, x, alpha, sigma, dalpha, dsigma)


class ScoreModel:
    """A network ``net(x, t_in, **net_kwargs)`` predicting ``prediction`` with time convention ``time``.

    ``prediction`` is ``"score"``, ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"`` (the velocity d x_t/dt =
    alpha' x0 + sigma' eps of flow matching: u = eps - x0 under `RectifiedFlow`).
    ``time`` maps the solver's continuous t (shape ``[batch]``) to the network's input:
    ``"t"`` t itself; ``"index"`` t (N - 1) (score_sde's continuous VP models, N = ``num_timesteps``);
    ``"scaled"`` t N (diffusers' flow-matching transformers: timestep = sigma * 1000 with sigma = t);
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
        _check_kind(prediction)
        if not callable(net):
            raise TypeError(f"net must be callable net(x, t), got {type(net).__name__}")
        check_process(sde)
        if net_kwargs is not None and not isinstance(net_kwargs, Mapping):
            raise TypeError(f"net_kwargs must be a mapping of keyword arguments or None, got "
                            f"{type(net_kwargs).__name__}")
        num_timesteps = check_count(num_timesteps, "num_timesteps")
        if not callable(time) and time not in TIME_CONVENTIONS:
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

    def on(self, sde: "ForwardSDE") -> "ScoreModel":
        """A copy of this model that reads its network under the process ``sde`` (e.g. a process's `ode_view`): the
        same network, prediction and time convention."""
        out = copy.copy(self)
        out.sde = sde
        return out

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for continuous times ``t``."""
        if callable(self.time):
            return self.time(t)
        if self.time == "t":
            return t
        if self.time == "index":
            return t * (self.num_timesteps - 1)
        if self.time == "scaled":
            return t * self.num_timesteps
        if self.time == "discrete":
            return self.sde.timestep(t)  # type: ignore[attr-defined]
        sigma = self.sde.sigma(t, check=False)
        return sigma if self.time == "sigma" else torch.log(sigma)

    def raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's own prediction at (x, t), validated and cast to x's dtype."""
        t = _batch_time(t, x)
        version = _version(x)
        try:
            out = self.net(x, self.network_time(t), **self.net_kwargs)
        except RuntimeError as e:  # a torch module fed a state of another dtype or device: say which
            hint = _mismatch_hint(self.net, x, str(e))
            if hint is None:
                raise
            raise TypeError(hint) from e
        if version is not None and _version(x) != version:  # a host-side counter: no device sync
            raise RuntimeError("the score network changed its input x in place (x.mul_(...), x += ..., x[...] = ...), "
                               "which corrupts the solver's state: work on a copy (x = x.clone()) or out of place")
        if not torch.is_tensor(out):
            raise TypeError(f"the score network returned {type(out).__name__}, expected a tensor")
        if out.shape != x.shape:
            raise ValueError(f"the score network returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        if out.device != x.device:
            raise ValueError(f"the score network returned a tensor on {out.device} for input on {x.device}")
        return out.to(x.dtype)

    def predict(self, x: torch.Tensor, t: torch.Tensor, kind: Prediction = "score") -> torch.Tensor:
        """Prediction of ``kind`` (score, eps, x0, v or flow) at (x, t)."""
        return self.predict_many(x, t, (kind,))[0]

    def predict_many(self, x: torch.Tensor, t: torch.Tensor, kinds: Sequence[Prediction]) -> list[torch.Tensor]:
        """Several predictions at (x, t) from one network evaluation."""
        for kind in kinds:
            _check_kind(kind)
        t = _batch_time(t, x)
        out = self.raw(x, t)
        if all(kind == self.prediction for kind in kinds):
            return [out for _ in kinds]
        alpha, sigma = self.sde.marginal(t, check=False)  # times come from solvers, some outside ours
        da = ds = None
        if "flow" in kinds or self.prediction == "flow":
            da, ds = self.sde.dalpha_dt(t, check=False), self.sde.dsigma_dt(t, check=False)
        return [convert(out, self.prediction, kind, x, alpha, sigma, da, ds) for kind in kinds]

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

    def flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity alpha' x0 + sigma' eps at (x, t) (the probability-flow drift), i.e.
        ``predict(x, t, "flow")``."""
        return self.predict(x, t, "flow")


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
    _check_guidance(scale, score=score, log_prob_y=log_prob_y)

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
    _check_guidance(scale, cond=cond, uncond=uncond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = cond(x, t)
        if scale == 0:
            return c
        return (1 + scale) * c - scale * uncond(x, t)

    return guided


def _check_guidance(scale: Any, **functions: Any) -> None:
    """A guidance scale must be a finite number and every function callable (TypeError / ValueError naming it)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"guidance scale must be a finite number, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(f"{name} must be callable {name}(x, t), got {type(fn).__name__}")


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None where torch keeps none: inference tensors, tracing)."""
    try:
        return None if x.is_inference() else int(x._version)
    except (RuntimeError, AttributeError, TypeError):
        return None


def _mismatch_hint(net: Any, x: torch.Tensor, error: str) -> str | None:
    """Why a ``torch.nn.Module`` network failed on ``x`` with the RuntimeError ``error``, if that error is torch's
    dtype or device mismatch and the parameters have another dtype or device than ``x`` (else None: the error is
    re-raised as it is)."""
    if not any(k in error for k in ("dtype", "scalar type", "same device", "should be the same", "device type")):
        return None
    while not isinstance(net, torch.nn.Module) and hasattr(net, "fn"):  # through the solvers' call counters
        net = net.fn
    if not isinstance(net, torch.nn.Module):
        return None
    p = next((p for p in net.parameters() if p.is_floating_point()), None)
    if p is None or (p.dtype == x.dtype and p.device == x.device):
        return None
    return (f"the network's parameters are {p.dtype} on {p.device} but the state is {x.dtype} on {x.device} (the "
            f"dtype and device of the tensor given: x_T, or x for log_likelihood): give it as .to({p.dtype}) on "
            f"{p.device}, or move the network with net.to(...) ({error.splitlines()[0]})")
