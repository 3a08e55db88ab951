"""Reverse variances of a discrete-time diffusion: DDPM's beta and beta-tilde, and Analytic-DPM's optimal one.

One reverse step goes from the noisier time t (x_n) to an earlier time s < t (x_{n-1}) of any Gaussian schedule
x_t = alpha_t x_0 + sigma_t z (``alpha_bar_n = alpha_t^2``, ``beta_bar_n = sigma_t^2``; nothing assumes
alpha^2 + sigma^2 = 1, so VP, sub-VP, cosine and discrete DDPM schedules are all served). With h = lambda_s -
lambda_t > 0 the log-SNR step (lambda = log(alpha/sigma)):

    beta        = sigma_t^2 (1 - e^{-2h})     the forward transition's variance (DDPM's beta_n)
    beta-tilde  = sigma_s^2 (1 - e^{-2h})     the posterior q(x_s | x_t, x_0)'s (DDPM's beta-tilde_n)

The DDIM(eta) family of inference processes q_lambda(x_s | x_t, x_0) = N(mu, lambda^2 I) (Song et al. 2021a; Bao
et al. 2022, "Analytic-DPM") has lambda^2 = eta^2 beta-tilde (capped at sigma_s^2; eta = 1 is DDPM) and the mean
mu = alpha_s x_0 + sqrt(sigma_s^2 - lambda^2) (x_t - alpha_t x_0) / sigma_t. A reverse step p(x_s | x_t) =
N(mu(x_0 -> x0_hat(x_t)), v I) has the least expected KL to it (the largest variational bound) at

    v* = lambda^2 + c^2 E[tr Cov(x_0 | x_t)] / d,    c = alpha_s - sqrt(sigma_s^2 - lambda^2) alpha_t / sigma_t,
    E[tr Cov(x_0 | x_t)] / d = (sigma_t / alpha_t)^2 (1 - Gamma_t),   Gamma_t = E ||eps_theta(x_t, t)||^2 / d,

(Bao et al. 2022, Theorem 1 written with x_0's coefficient c in the mean; c^2 (sigma_t/alpha_t)^2 = (sqrt(beta_bar_n
/ alpha_n) - sqrt(beta_bar_{n-1} - lambda_n^2))^2 in the paper's notation). Gamma_t is estimated by Monte Carlo over
M data samples per time (`estimate_moments`; the paper finds M = 10 enough). The bounds of their Theorem 2 are
enforced by clipping the covariance estimate: 0 <= Cov <= (sigma_t/alpha_t)^2 (i.e. lambda^2 <= v* <= lambda^2 +
c^2 (sigma_t/alpha_t)^2), and for data in [a, b]^d also Cov <= ((b - a)/2)^2.

The moment estimate is saved and reused like a tuned grid (`MomentEstimate.save`, `load_moments`,
`cached_moments`: JSON under ``$SCORESOLVE_MOMENT_DIR`` or ``~/.cache/scoresolve/moments``).
"""

from __future__ import annotations

import hashlib
import math
import os
import time as _time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._store import check_name, read_record, store_dir, write_json
from ._utils import check_batched, check_count
from .process import check_process
from .sde import ForwardSDE

VARIANCES = ("beta", "beta_tilde", "analytic")
"""The reverse variances by name: DDPM's forward (beta) and posterior (beta-tilde) ones, Analytic-DPM's optimum."""

MOMENT_DIR_ENV = "SCORESOLVE_MOMENT_DIR"
_RECORD = "moment estimate"  # what the store's messages call a record, on save and on load alike
_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# the schedule of one reverse step t -> s (float64, elementwise over tensors of times)
# ---------------------------------------------------------------------------------------------------------------
def _f64(t: Any) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


def _step(sde: ForwardSDE, t: Any, s: Any) -> tuple[torch.Tensor, ...]:
    """(alpha_t, sigma_t, alpha_s, sigma_s, 1 - e^{-2h}) of the steps t -> s, float64; ValueError unless s < t."""
    t, s = torch.broadcast_tensors(_f64(t), _f64(s))
    if not bool((s < t).all()) or not bool((s >= 0).all()):
        raise ValueError("a reverse step goes from t to an earlier time 0 <= s < t")
    a_t, s_t = sde.marginal(t)
    a_s, s_s = sde.marginal(s)
    if not bool((a_t > 0).all()) or not bool((s_t > 0).all()):
        raise ValueError("reverse variances need alpha(t) > 0 and sigma(t) > 0 at the noisier time of every step")
    # 1 - e^{-2h} = 1 - (alpha_t sigma_s / (alpha_s sigma_t))^2, written without cancellation
    ratio = 2 * (torch.log(a_t) - torch.log(s_t) - torch.log(a_s) + torch.log(s_s))  # -2h (-inf where sigma_s = 0)
    return a_t, s_t, a_s, s_s, -torch.expm1(ratio)


def forward_variance(sde: ForwardSDE, t: Any, s: Any) -> torch.Tensor:
    """beta: the variance sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 of q(x_t | x_s) (DDPM's beta_n), float64."""
    _, s_t, _, _, frac = _step(sde, t, s)
    return s_t**2 * frac


def posterior_variance(sde: ForwardSDE, t: Any, s: Any) -> torch.Tensor:
    """beta-tilde: the variance sigma_s^2 (1 - e^{-2h}) of q(x_s | x_t, x_0) (DDPM's beta-tilde_n; 0 at s = 0)."""
    _, _, _, s_s, frac = _step(sde, t, s)
    return s_s**2 * frac


def base_variance(sde: ForwardSDE, t: Any, s: Any, eta: float = 1.0) -> torch.Tensor:
    """lambda^2 = eta^2 beta-tilde, capped at sigma_s^2: the variance of DDIM(eta)'s q_lambda(x_s | x_t, x_0)."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    _, _, _, s_s, frac = _step(sde, t, s)
    return torch.minimum(eta**2 * s_s**2 * frac, s_s**2)


def x0_coefficient(sde: ForwardSDE, t: Any, s: Any, eta: float = 1.0) -> torch.Tensor:
    """c = alpha_s - sqrt(sigma_s^2 - lambda^2) alpha_t / sigma_t: the weight of x_0 (or of x0_hat) in the mean of
    q_lambda(x_s | x_t, x_0) written in (x_t, x_0); the mean's error is c (x0_hat - x_0)."""
    a_t, s_t, a_s, s_s, _ = _step(sde, t, s)
    lam2 = base_variance(sde, t, s, eta)
    return a_s - torch.sqrt((s_s**2 - lam2).clamp(min=0)) * a_t / s_t


def _check_range(data_range: Sequence[float] | None) -> tuple[float, float] | None:
    if data_range is None:
        return None
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite with lo < hi, got {tuple(data_range)}")
    return lo, hi


def covariance_bound(sde: ForwardSDE, t: Any, data_range: Sequence[float] | None = None) -> torch.Tensor:
    """The largest per-dimension posterior covariance E tr Cov(x_0 | x_t)/d that Theorem 2 allows: (sigma_t /
    alpha_t)^2 (from Gamma >= 0), and ((b - a)/2)^2 too for data in ``data_range`` = [a, b]."""
    a_t, s_t = sde.marginal(_f64(t))
    bound = (s_t / a_t) ** 2
    rng = _check_range(data_range)
    if rng is not None:
        bound = bound.clamp(max=((rng[1] - rng[0]) / 2) ** 2)
    return bound


def analytic_variance(sde: ForwardSDE, t: Any, s: Any, gamma: Any, eta: float = 1.0,
                      data_range: Sequence[float] | None = None) -> torch.Tensor:
    """Analytic-DPM's optimal reverse variance v* = lambda^2 + c^2 clip((sigma_t/alpha_t)^2 (1 - Gamma), 0, bound)
    (module docstring) for the steps t -> s, given the moment ``gamma`` = E||eps_theta(x_t, t)||^2 / d; float64."""
    gamma = _f64(gamma)
    if not bool(torch.isfinite(gamma).all()):
        raise ValueError("the moment Gamma must be finite")
    a_t, s_t = sde.marginal(_f64(t))
    cov = ((s_t / a_t) ** 2 * (1 - gamma)).clamp(min=0)
    cov = torch.minimum(cov, covariance_bound(sde, t, data_range))
    return base_variance(sde, t, s, eta) + x0_coefficient(sde, t, s, eta) ** 2 * cov


def variance_bounds(sde: ForwardSDE, t: Any, s: Any, eta: float = 1.0,
                    data_range: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds of the optimal variance (Bao et al. 2022, Theorem 2): lambda^2 and lambda^2 + c^2 times
    `covariance_bound`."""
    lam2 = base_variance(sde, t, s, eta)
    return lam2, lam2 + x0_coefficient(sde, t, s, eta) ** 2 * covariance_bound(sde, t, data_range)


def reverse_variance(kind: str, sde: ForwardSDE, t: Any, s: Any, *, eta: float = 1.0,
                     moments: "MomentEstimate | None" = None,
                     data_range: Sequence[float] | None = None) -> torch.Tensor:
    """The reverse variance ``kind`` (``"beta"``, ``"beta_tilde"`` or ``"analytic"``) of the steps t -> s, float64.

    ``"analytic"`` needs ``moments`` (a `MomentEstimate` covering the times t) and uses ``eta``'s family and the
    optional ``data_range`` bound.
    """
    if kind == "beta":
        return forward_variance(sde, t, s)
    if kind == "beta_tilde":
        return posterior_variance(sde, t, s)
    if kind == "analytic":
        if moments is None:
            raise ValueError("variance='analytic' needs moments= (a MomentEstimate: see estimate_moments)")
        return analytic_variance(sde, t, s, moments.at(t), eta, data_range)
    raise ValueError(f"unknown variance {kind!r}; expected one of {VARIANCES}")


# ---------------------------------------------------------------------------------------------------------------
# the moment Gamma_t = E ||eps_theta(x_t, t)||^2 / d
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MomentEstimate:
    """Monte Carlo estimates of Gamma_t = E ||eps_theta(x_t, t)||^2 / d at the times ``t``.

    Attributes:
        t: the increasing float64 times (``[n]``); gamma: the estimates there (``[n]``, float64).
        num_samples: M, the data samples per time; evaluations: network evaluations spent (M n rows);
        std_error: the Monte Carlo standard error of each estimate (``[n]``); seconds: wall time.
        sde: repr of the process; model: fingerprint of the network (None for a plain callable); name: saved name.
    """

    t: torch.Tensor
    gamma: torch.Tensor
    num_samples: int
    evaluations: int
    std_error: torch.Tensor | None = None
    seconds: float = 0.0
    sde: str = ""
    model: str | None = None
    name: str | None = None

    def at(self, t: Any) -> torch.Tensor:
        """Gamma at times ``t`` (float64): the estimate at a stored time, linear interpolation in t between stored
        times; ValueError outside the stored range."""
        q = _f64(t)
        tk = self.t.to(torch.float64)
        lo, hi = float(tk[0]), float(tk[-1])
        tol = 1e-6 * max(abs(hi), 1.0)  # float32 times round within ~6e-8
        if bool((q < lo - tol).any()) or bool((q > hi + tol).any()):
            raise ValueError(f"the moment estimate covers t in [{lo:.6g}, {hi:.6g}]; asked for t in "
                             f"[{float(q.min()):.6g}, {float(q.max()):.6g}] (estimate it at these times)")
        q = q.clamp(lo, hi)
        if tk.numel() == 1:
            return self.gamma.to(torch.float64).expand(q.shape).clone()
        j = torch.clamp(torch.searchsorted(tk, q.contiguous(), right=True) - 1, 0, tk.numel() - 2)
        w = (q - tk[j]) / (tk[j + 1] - tk[j])
        g = self.gamma.to(torch.float64)
        return g[j] + w * (g[j + 1] - g[j])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["t"] = [float(v) for v in self.t.tolist()]
        d["gamma"] = [float(v) for v in self.gamma.tolist()]
        d["std_error"] = None if self.std_error is None else [float(v) for v in self.std_error.tolist()]
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MomentEstimate":
        d = dict(d)
        d.pop("format", None)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown fields in a saved moment estimate: {unknown}")
        for k in ("t", "gamma", "std_error"):
            if d.get(k) is not None:
                d[k] = torch.tensor(d[k], dtype=torch.float64)
        if d["t"].ndim != 1 or d["t"].shape != d["gamma"].shape or not bool((d["t"][1:] > d["t"][:-1]).all()):
            raise ValueError("a moment estimate needs increasing times t and one gamma per time")
        return cls(**d)

    def save(self, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
        """Write the estimate as JSON ``<directory>/<name>.json`` (see `moment_dir`); returns the path."""
        name = _check_name(name if name is not None else (self.name or ""))
        self.name = name
        return write_json(moment_dir(directory) / f"{name}.json", self.to_dict())


def moment_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where moment estimates are saved: ``directory``, else ``$SCORESOLVE_MOMENT_DIR``, else
    ``$XDG_CACHE_HOME/scoresolve/moments`` (``~/.cache/scoresolve/moments``)."""
    return store_dir(directory, MOMENT_DIR_ENV, "moments")


def _check_name(name: str) -> str:
    return check_name(name, _RECORD)


def load_moments(name: str, directory: str | os.PathLike | None = None) -> MomentEstimate:
    """The moment estimate saved under ``name`` (see `MomentEstimate.save`)."""
    return read_record(moment_dir(directory), name, _RECORD, MOMENT_DIR_ENV, MomentEstimate.from_dict)


def _model_id(model: Callable) -> str | None:
    from .fingerprint import model_fingerprint

    return model_fingerprint(model)


@torch.no_grad()
def estimate_moments(model: Callable, sde: ForwardSDE, data: torch.Tensor, times: Any, num_samples: int = 10, *,
                     seed: int = 0, batch_size: int = 2048) -> MomentEstimate:
    """Estimate Gamma_t = E ||eps_theta(x_t, t)||^2 / d at each of ``times`` from ``num_samples`` (M) data samples.

    Args:
        model: a [`ScoreModel`][scoresolve.ScoreModel] or a plain ``score(x, t)`` (then eps = -sigma score).
        data: ``[n, ...]`` training data (x_0); for each time, M of them are drawn with replacement.
        times: the times (any order; stored increasing), each in (0, T] with alpha > 0.
        seed: seeds the data indices and the noise (the estimate is a pure function of the arguments).
        batch_size: rows (time, sample) per network call; the rows of several times share a call.
    Cost: M evaluations per time (``evaluations`` = M len(times) rows).
    """
    from .score import ScoreModel

    check_process(sde)
    check_batched(data, "data")
    if data.shape[0] == 0 or not bool(torch.isfinite(data).all()):
        raise ValueError(f"data must hold at least one sample, all finite; got shape {tuple(data.shape)}"
                         + ("" if data.shape[0] == 0 else " with non-finite values"))
    M = check_count(num_samples, "num_samples")
    batch_size = check_count(batch_size, "batch_size")
    ts = torch.unique(_f64(times).flatten())
    if ts.numel() == 0:
        raise ValueError("times is empty")
    a, s = sde.marginal(ts)
    if not (bool((a > 0).all()) and bool((s > 0).all())):
        raise ValueError("estimate_moments needs times with alpha > 0 and sigma > 0")
    net = ScoreModel.wrap(model, sde)
    g = torch.Generator().manual_seed(int(seed))
    start = _time.perf_counter()
    n, D = ts.numel(), math.prod(data.shape[1:])
    idx = torch.randint(0, data.shape[0], (n * M,), generator=g)
    noise_g = torch.Generator().manual_seed(int(seed) + 1)
    row_t = ts.repeat_interleave(M)
    sq = torch.empty(n * M, dtype=torch.float64)
    for lo in range(0, n * M, int(batch_size)):
        hi = min(lo + int(batch_size), n * M)
        x0 = data[idx[lo:hi]]
        z = torch.randn(x0.shape, generator=noise_g, dtype=torch.float64).to(x0)
        tt = row_t[lo:hi].to(dtype=x0.dtype, device=x0.device)
        xt = sde.perturb(x0, tt, noise=z)
        eps = net.eps(xt, tt)
        sq[lo:hi] = eps.flatten(1).to(torch.float64).square().sum(1).cpu() / D
    bad = ~torch.isfinite(sq)
    if bool(bad.any()):  # the network returned NaN/Inf: Gamma_t (and every variance built on it) would be NaN
        times = sorted(set(row_t[bad].tolist()))
        raise ValueError(f"estimate_moments: the network returned non-finite values (NaN/Inf) at {len(times)} of the "
                         f"{n} times, first t={times[0]:.6g}, for {int(bad.sum())} of the {n * M} rows")
    per = sq.reshape(n, M)
    se = per.std(1) / math.sqrt(M) if M > 1 else torch.full((n,), math.nan, dtype=torch.float64)
    return MomentEstimate(t=ts, gamma=per.mean(1), num_samples=M, evaluations=n * M, std_error=se,
                          seconds=_time.perf_counter() - start, sde=repr(sde)[:200], model=_model_id(net))


def moments_key(model: Callable, sde: ForwardSDE, times: Any, num_samples: int, seed: int = 0,
                data: torch.Tensor | None = None) -> str | None:
    """The file name under which `cached_moments` keeps an estimate: the number of times, M, and a digest of the
    network's fingerprint, how the model reads it (prediction, time convention, process:
    [`model_config`][scoresolve.fingerprint.model_config]), the schedule at the times (alpha, sigma), the
    seed and the data; None for a model without torch modules (nothing identifies it)."""
    from .fingerprint import data_fingerprint, model_config
    from .score import ScoreModel

    wrapped = ScoreModel.wrap(model, sde)
    mid = _model_id(wrapped)
    if mid is None:
        return None
    mid += f"; {model_config(wrapped)}"
    ts = torch.unique(_f64(times).flatten())
    a, s = sde.marginal(ts)
    h = hashlib.blake2b(digest_size=10)
    h.update(mid.encode())
    for v in (ts, a, s):
        h.update(v.numpy().tobytes())
    h.update(f"M={int(num_samples)}:seed={int(seed)}".encode())
    if data is not None:
        h.update(data_fingerprint(data).encode())
    return f"moments-{ts.numel()}t-M{int(num_samples)}-{h.hexdigest()}"


def cached_moments(model: Callable, sde: ForwardSDE, data: torch.Tensor, times: Any, num_samples: int = 10, *,
                   seed: int = 0, directory: str | os.PathLike | None = None, batch_size: int = 2048
                   ) -> MomentEstimate:
    """`estimate_moments`, saved under `moments_key` and loaded instead of recomputed on the next call (a model
    without torch modules is never cached)."""
    key = moments_key(model, sde, times, num_samples, seed, data)
    if key is not None and (moment_dir(directory) / f"{key}.json").is_file():
        return load_moments(key, directory)
    est = estimate_moments(model, sde, data, times, num_samples, seed=seed, batch_size=batch_size)
    if key is not None:
        est.save(key, directory)
    return est
