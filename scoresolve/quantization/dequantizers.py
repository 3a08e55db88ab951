"""Dequantizers beyond uniform: a density q(u | i) for the position of a dequantized value inside its bin.

Setting (the convention of `scoresolve.quantization.levels`)
-----------------------------------------------------------
Level i of L-level data in ``data_range = (lo, hi)`` owns the bin [lo + Delta i, lo + Delta (i + 1)) of width
Delta = (hi - lo) / L. A dequantizer draws the position u in [0, 1]^D inside the bin from a density q(u | i) on the
unit cube and returns

    y = lo + Delta (i + u),      log q(u | i)     (the log-density in **u-space**, nats, one value per sample).

In y-space the density is q_y(y) = q(u | i) / Delta^D on bin i. A continuous density p gives the discrete model
P(i) = integral of p over bin i = E_q[p(y) / q_y(y)], hence (Jensen) the variational bound

    log P(i)  >=  E_q[ log p(y) - log q(u | i) ] + D log Delta,

i.e. in bits/dim

    -log2 P(i) / D  <=  E_q[ -log p(y) + log q(u | i) ] / (D ln 2) + log2(L / (hi - lo)).

Uniform q has log q = 0; any q gives the bound with ``log_prob - log_q`` in place of ``log_prob``
([`bits_per_dim`][scoresolve.quantization.bits_per_dim]``(..., log_q=)``). The gap of the bound is
KL(q(. | i) || p(. | i)), with p(u | i) the model's density restricted to the bin and normalised: it vanishes for
q = p(. | i). For a density that is constant on every bin, p(u | i) is uniform and the gap is KL(q || uniform) =
E_q[log q(u | i)] (zero for uniform q): a non-uniform q is then looser by exactly that.

With n draws u_1..u_n per image the importance-weighted bound (Burda et al. 2016; Flow++, Ho et al. 2019)

    log P(i)  >=  E[ log (1/n) sum_k exp(log p(y_k) - log q(u_k | i)) ] + D log Delta

is tighter than the one-draw bound and tends to log P(i) as n grows ([`importance_weighted_bits_per_dim`]
[scoresolve.quantization.importance_weighted_bits_per_dim]). It is a bound only for exact log p: a noisy estimate
(Hutchinson probes) makes the log-mean-exp reward the noise; on the shipped digits model one probe per draw lowers
it by about 0.1 bits/dim with no dequantization change at all, so compute it with exact divergences.

Dequantizers
------------
- [`UniformDequantizer`][scoresolve.quantization.UniformDequantizer]: u ~ U[0, 1)^D, log q = 0; draws exactly the
  numbers of [`scoresolve.quantization.dequantize`][scoresolve.quantization.dequantize] (bit-identical).
- [`TruncatedNormalDequantizer`][scoresolve.quantization.TruncatedNormalDequantizer]: each u_d ~ N(1/2, scale^2)
  truncated to [0, 1]; exact log q, sampling by the inverse CDF in float64.
- [`VariationalDequantizer`][scoresolve.quantization.VariationalDequantizer]: a learned q(u | i). Per dimension
  logit(u_d) = mu_d + exp(s_d) e_d with e_d standard logistic, so (mu, s) = (0, 0) is exactly the uniform
  dequantizer (its initial state); mu and s come from a small network of the whole level image (convolutional for
  ``[C, H, W]`` samples, an MLP otherwise) plus a learned per-position bias. It is trained by
  [`train_dequantizer`][scoresolve.quantization.train_dequantizer] to maximise the ELBO E_q[log p(y) - log q] with
  the reparameterised gradient, where grad_y log p(y) is the model's score at a small noise level: one score
  evaluation per sample, no ODE solve. The reported bits/dim still come from the PF-ODE likelihood
  ([`scoresolve.log_likelihood`][scoresolve.log_likelihood]) on held-out data, with log q subtracted.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .._utils import check_count, check_generator, check_positive
from .levels import check_levels_range, dequantize, grid_levels, grid_name

Range = Sequence[float]
DEQUANTIZATIONS = ("uniform", "truncnorm", "variational")


class Dequantizer(torch.nn.Module):
    """A density q(u | i) on the unit cube for L-level data in ``data_range`` (see the module docstring).

    Args:
        num_levels: L, the number of levels (an integer >= 2).
        data_range: (lo, hi) of the data: level i sits on lo + (hi - lo) i / (L - 1) and owns the bin
            [lo + Delta i, lo + Delta (i + 1)), Delta = (hi - lo) / L.
    Subclasses implement ``sample_unit`` (and ``log_prob_unit``); ``sample`` maps data to (y, log q).
    """

    def __init__(self, num_levels: int, data_range: Range = (-1.0, 1.0)) -> None:
        super().__init__()
        lo, hi = check_levels_range(num_levels, data_range)
        self.num_levels = int(num_levels)
        self.data_range = (lo, hi)

    @property
    def bin_width(self) -> float:
        """Delta = (hi - lo) / L."""
        lo, hi = self.data_range
        return (hi - lo) / self.num_levels

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels (int64) of grid data ``x`` (integer tensors are taken as levels; checked).

        Args:
            x: ``[B, ...]`` grid values or integer levels.
        """
        return grid_levels(x, self.num_levels, self.data_range, grid_name(self.num_levels))

    def sample_unit(
        self, lv: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw u ~ q(u | i): (u in [0, 1] (float64, shaped like lv), ``[B]`` log q(u | i) in u-space (float64)).

        Args:
            lv: ``[B, ...]`` integer levels i.
            generator: the source of the draws.
        """
        raise NotImplementedError

    def log_prob_unit(self, lv: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[B]`` log q(u | i) (u-space, nats, float64).

        Args:
            lv: ``[B, ...]`` integer levels i.
            u: positions in (0, 1), shaped like lv.
        """
        raise NotImplementedError

    def to_data(self, lv: torch.Tensor, u: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """y = lo + Delta (i + u), computed in float64 and cast to ``dtype``.

        Args:
            lv: integer levels i.
            u: positions in the bins, shaped like lv.
            dtype: the result's dtype (default: u's).
        """
        lo, hi = self.data_range
        y = lo + (hi - lo) * ((lv.to(torch.float64) + u.to(torch.float64)) / self.num_levels)
        return y.to(dtype or u.dtype)

    def describe(self) -> dict[str, Any]:
        """What identifies this q, as JSON-ready values: ``kind`` (the class name), ``num_levels``, ``data_range``, the
        subclass's settings and, for a q with parameters or buffers, ``state``: a hash of its ``state_dict``
        (stored in the manifest of [`evaluate_dataset`][scoresolve.evaluate_dataset] and compared on resume).
        """
        out: dict[str, Any] = {"kind": type(self).__qualname__, "num_levels": self.num_levels,
                               "data_range": [float(v) for v in self.data_range]}
        state = self.state_dict()
        if state:
            h = hashlib.blake2b(digest_size=16)
            for k, v in sorted(state.items()):
                t = v.detach().cpu().contiguous()
                h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            out["state"] = f"blake2b:{h.hexdigest()}"
        return out

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]`` log q(u | i) (u-space, nats, float64) of dequantized values ``y`` of the data ``x``:
        u = (y - lo) / Delta - i, computed in float64 (so it matches the log q of ``sample`` up to y's rounding).

        Args:
            x: ``[B, ...]`` grid values or integer levels i.
            y: the dequantized values, shaped like x.
        """
        lv = self.levels(x)
        lo, _ = self.data_range
        u = (y.detach().to(torch.float64).cpu() - lo) / self.bin_width - lv.to(torch.float64).cpu()
        with torch.no_grad():
            return self.log_prob_unit(lv, u.to(lv.device)).detach()

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize L-level data.

        Args:
            x: ``[B, ...]`` grid values lo + (hi - lo) i / (L - 1) or integer levels i.
            generator: the source of the draws.
        Returns:
            (y, log_q): y shaped like x (x's dtype if floating, else ``torch.get_default_dtype()``) and ``[B]``
            log q(u | i) in u-space (float64, nats); the bits/dim bound is
            [`bits_per_dim`][scoresolve.quantization.bits_per_dim]``(log p(y), D, num_levels=L, log_q=log_q)``.
        """
        if x.ndim < 1:
            raise ValueError("x must have a batch dimension")
        lv = self.levels(x)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        with torch.no_grad():
            u, log_q = self.sample_unit(lv, generator)
        return self.to_data(lv, u, dtype), log_q.detach()


class UniformDequantizer(Dequantizer):
    """u ~ U[0, 1)^D, log q = 0: the dequantization of
    [`scoresolve.quantization.dequantize`][scoresolve.quantization.dequantize] (``sample(x, g)`` returns exactly
    ``dequantize(x, L, data_range, generator=g)``, drawing the same numbers).

    Args:
        num_levels: L.
        data_range: (lo, hi) of the data.
    """

    def sample_unit(self, lv, generator=None):
        u = torch.rand(lv.shape, generator=generator, dtype=torch.float64, device=lv.device)
        return u, torch.zeros(lv.shape[0], dtype=torch.float64, device=lv.device)

    def log_prob_unit(self, lv, u):
        return torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)

    def sample(self, x, generator=None):
        y = dequantize(x, self.num_levels, self.data_range, generator, what=grid_name(self.num_levels))
        return y, torch.zeros(x.shape[0], dtype=torch.float64)


def _ndtr(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z)


class TruncatedNormalDequantizer(Dequantizer):
    """Each u_d ~ N(1/2, scale^2) truncated to [0, 1], independently (the same q for every level).

    log q(u) = sum_d [-(u_d - 1/2)^2 / (2 scale^2)] - D log(scale sqrt(2 pi) Z), Z = erf(1 / (2 sqrt(2) scale)).
    Sampling inverts the CDF in float64: u = 1/2 + scale Phi^-1(Phi(a) + v (Phi(b) - Phi(a))), v ~ U(0, 1),
    a = -b = -1 / (2 scale). Large scales approach uniform dequantization; small ones concentrate u on the bin centre.

    Args:
        num_levels: L.
        data_range: (lo, hi) of the data.
        scale: the standard deviation (in bin widths) of the untruncated normal, > 0.
    """

    def __init__(self, num_levels: int, data_range: Range = (-1.0, 1.0), scale: float = 0.5) -> None:
        super().__init__(num_levels, data_range)
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = scale
        b = 0.5 / scale
        self._z = math.erf(b / math.sqrt(2))  # Phi(b) - Phi(-b)
        self._log_norm = math.log(scale * math.sqrt(2 * math.pi) * self._z)

    def log_prob_unit(self, lv, u):
        w = (u.to(torch.float64) - 0.5) / self.scale
        inside = ((u >= 0) & (u <= 1)).flatten(1).all(1)
        lq = (-0.5 * w.square() - self._log_norm).flatten(1).sum(1)
        return torch.where(inside, lq, torch.full_like(lq, -math.inf))

    def sample_unit(self, lv, generator=None):
        v = torch.rand(lv.shape, generator=generator, dtype=torch.float64, device=lv.device)
        b = 0.5 / self.scale
        pa = _ndtr(torch.tensor(-b, dtype=torch.float64))
        # by symmetry, invert in the lower half so that Phi^-1 never sees values close to 1 (accuracy)
        p = pa + v * self._z
        lower = p <= 0.5
        p_sym = torch.where(lower, p, 1 - p)
        z = torch.special.ndtri(p_sym)
        z = torch.where(lower, z, -z)
        u = (0.5 + self.scale * z).clamp(0.0, 1.0)
        return u, self.log_prob_unit(lv, u)

    def describe(self) -> dict[str, Any]:
        """The base description plus ``scale``."""
        return {**super().describe(), "scale": self.scale}

    def kl_from_uniform(self, num_dims: int = 1) -> float:
        """KL(q || uniform) = E_q[log q] in nats for ``num_dims`` dimensions (minus the truncated normal's entropy):
        the exact amount by which this q loosens the bound for a density that is constant on every bin.

        Args:
            num_dims: D.
        """
        b = 0.5 / self.scale
        phi_b = math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
        entropy = 0.5 * math.log(2 * math.pi * math.e) + math.log(self.scale * self._z) - b * phi_b / self._z
        return -int(num_dims) * entropy


class _ConvNet(torch.nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.b = torch.nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = torch.nn.Conv2d(hidden, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.a(x))
        h = F.silu(self.b(h)) + h
        return self.out(h)


class _MLP(torch.nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(dim, hidden)
        self.b = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.a(x.flatten(1)))
        h = F.silu(self.b(h)) + h
        return self.out(h)


class VariationalDequantizer(Dequantizer):
    """A learned q(u | i): per dimension logit(u_d) = mu_d(i) + exp(s_d(i)) e_d, e_d ~ standard logistic.

    log q(u | i) = sum_d [-s_d + log sigma(e_d) + log sigma(-e_d) - log sigma(z_d) - log sigma(-z_d)] with
    z = logit(u), e = (z - mu) exp(-s), sigma the logistic sigmoid. (mu, s) = (0, 0) gives u = sigma(e) ~ U(0, 1):
    a new dequantizer is exactly uniform (its output layer and biases start at zero). mu and s are a learned
    per-position bias plus a small network of the level image rescaled to [-1, 1]: two 3x3 convolutions for samples
    of shape ``[C, H, W]``, a two-layer MLP otherwise; s is soft-limited to (-6, 6). Train it with
    [`train_dequantizer`][scoresolve.quantization.train_dequantizer]; ``save`` / ``load`` keep it.

    Args:
        num_levels: L.
        data_range: (lo, hi) of the data.
        shape: the shape of one sample, e.g. ``(1, 8, 8)`` for the digits or ``(2,)``.
        hidden: channels (convolutional) or units (MLP) of the hidden layers.
    """

    def __init__(
        self, num_levels: int, data_range: Range = (-1.0, 1.0), shape: Sequence[int] = (1, 8, 8), hidden: int = 32
    ) -> None:
        super().__init__(num_levels, data_range)
        self.shape = tuple(int(s) for s in shape)
        self.hidden = int(hidden)
        if not self.shape or min(self.shape) < 1 or self.hidden < 1:
            raise ValueError(f"shape must be non-empty with positive sizes and hidden >= 1, got {shape}, {hidden}")
        if len(self.shape) == 3:
            self.net: torch.nn.Module = _ConvNet(self.shape[0], self.hidden)
        else:
            self.net = _MLP(math.prod(self.shape), self.hidden)
        torch.nn.init.zeros_(self.net.out.weight)
        torch.nn.init.zeros_(self.net.out.bias)
        self.bias = torch.nn.Parameter(torch.zeros(2, *self.shape))

    def params(self, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, s): the location and log-scale of logit(u), float64, each shaped like lv.

        Args:
            lv: ``[B, *shape]`` integer levels i.
        """
        if tuple(lv.shape[1:]) != self.shape:
            raise ValueError(f"this dequantizer models samples of shape {self.shape}, got {tuple(lv.shape[1:])}")
        w = self.bias
        x = (2.0 * lv.to(w.dtype) / (self.num_levels - 1) - 1.0).to(w.device)
        out = self.net(x).reshape(lv.shape[0], 2, *self.shape) + w
        mu, s = out[:, 0], out[:, 1]
        s = 6.0 * torch.tanh(s / 6.0)
        return mu.to(torch.float64), s.to(torch.float64)

    @staticmethod
    def _log_q(mu, s, e, z):
        per = -s + F.logsigmoid(e) + F.logsigmoid(-e) - F.logsigmoid(z) - F.logsigmoid(-z)
        return per.flatten(1).sum(1)

    def log_prob_unit(self, lv, u):
        mu, s = self.params(lv)
        u = u.to(torch.float64).to(mu.device)
        z = torch.log(u) - torch.log1p(-u)
        return self._log_q(mu, s, (z - mu) * torch.exp(-s), z)

    def sample_unit(self, lv, generator=None):
        """Draw u ~ q(u | i), reparameterised: differentiable in the parameters (``sample`` runs without gradients).

        Args:
            lv: ``[B, *shape]`` integer levels i.
            generator: the source of the draws.
        """
        mu, s = self.params(lv)
        v = torch.rand(lv.shape, generator=generator, dtype=torch.float64).to(mu.device)
        v = v.clamp(1e-300, 1.0 - 2**-53)
        e = torch.log(v) - torch.log1p(-v)
        z = mu + torch.exp(s) * e
        return torch.sigmoid(z), self._log_q(mu, s, e, z)

    def describe(self) -> dict[str, Any]:
        """The base description (with the hash of the weights) plus ``shape`` and ``hidden``."""
        return {**super().describe(), "shape": list(self.shape), "hidden": self.hidden}

    def save(self, path: str) -> None:
        """Save the configuration and weights to ``path`` (a ``torch.save`` file).

        Args:
            path: the file to write.
        """
        config = {"num_levels": self.num_levels, "data_range": self.data_range, "shape": self.shape,
                  "hidden": self.hidden}
        torch.save({"kind": "VariationalDequantizer", "config": config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, map_location: Any = "cpu") -> "VariationalDequantizer":
        """A dequantizer saved with ``save`` (read with ``torch.load(weights_only=True)``).

        Args:
            path: the file.
            map_location: where the weights go.
        """
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("kind") != "VariationalDequantizer":
            raise ValueError(f"{path} does not hold a saved VariationalDequantizer")
        c = blob["config"]
        dq = cls(c["num_levels"], tuple(c["data_range"]), tuple(c["shape"]), c["hidden"])
        dq.load_state_dict(blob["state_dict"])
        return dq


def make_dequantizer(
    name: str, num_levels: int, data_range: Range = (-1.0, 1.0), **kwargs: Any
) -> Dequantizer:
    """A dequantizer by name: ``"uniform"``, ``"truncnorm"`` (keyword ``scale``) or ``"variational"`` (``shape``,
    ``hidden``; untrained, i.e. uniform, until [`train_dequantizer`][scoresolve.quantization.train_dequantizer]).

    Args:
        name: one of ``DEQUANTIZATIONS``.
        num_levels: L.
        data_range: (lo, hi) of the data.
        **kwargs: the class's own options.
    """
    if name == "uniform":
        return UniformDequantizer(num_levels, data_range, **kwargs)
    if name == "truncnorm":
        return TruncatedNormalDequantizer(num_levels, data_range, **kwargs)
    if name == "variational":
        return VariationalDequantizer(num_levels, data_range, **kwargs)
    raise ValueError(f"unknown dequantization {name!r}; expected one of {DEQUANTIZATIONS}")


def train_dequantizer(
    dequantizer: VariationalDequantizer,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    *,
    sde: Any = None,
    noise_std: float = 0.01,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[float]:
    """Fit q(u | i) by maximising the ELBO E_q[log p(y) - log q(u | i)] of the training data ``data``.

    The reparameterised gradient of E_q[log p(y)] is E[grad_y log p(y) . dy/dtheta]; grad_y log p(y) is taken as the
    score s(y, t) at the time t where the noise-to-signal ratio sigma(t) / alpha(t) equals ``noise_std`` (the exact
    gradient of the noised density p_t): one score evaluation per sample and step, no ODE solve and no gradient
    through the score network. Each step draws a batch of training images (with replacement) and fresh u.

    Args:
        dequantizer: the q to train (in place).
        score: ``score(y, t)`` with ``t`` a ``[B]`` tensor: a [`scoresolve.ScoreModel`][scoresolve.ScoreModel] or a
            plain score function (then give ``sde``, or a ``noise_std`` of 0 and a score that ignores t).
        data: ``[N, *shape]`` training data on the L-level grid (or integer levels).
        sde: the forward process of the score (default: ``score.sde`` of a ScoreModel).
        noise_std: sigma / alpha of the noise level whose score stands in for grad log p (data units).
        steps: optimisation steps (Adam).
        batch_size: images per step.
        lr: Adam's learning rate.
        generator: the source of batches and draws (default: seeded with 0).
        progress: show a tqdm progress bar.
    Returns:
        The per-step mean of log q(u | i) / D (nats/dim): how far q moved from uniform (0 at the start).
    """
    steps, batch_size = check_count(steps, "steps", minimum=0), check_count(batch_size, "batch_size")
    check_positive(lr, "lr")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    check_generator(generator)
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must be a [N, *shape] tensor with N >= 1, got "
                         f"{tuple(data.shape) if torch.is_tensor(data) else type(data).__name__}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sde = sde if sde is not None else getattr(score, "sde", None)
    if sde is not None and noise_std == 0:
        raise ValueError("noise_std must be > 0 with a process (the score is read where sigma / alpha = noise_std); "
                         "noise_std=0 is for a score that ignores t, without sde")
    lv_all = dequantizer.levels(data)
    n, D = lv_all.shape[0], lv_all[0].numel()
    if sde is not None:
        t_value = float(sde.t_from_log_snr(torch.tensor(-math.log(noise_std), dtype=torch.float64)))
    else:
        t_value = 0.0
    param = next(iter(dequantizer.parameters()))
    net_dtype = data.dtype if data.is_floating_point() else torch.get_default_dtype()
    opt = torch.optim.Adam(dequantizer.parameters(), lr=lr)
    history: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(steps), desc="train dequantizer", unit="step")
    try:
        for _ in range(int(steps)):
            idx = torch.randint(0, n, (int(batch_size),), generator=g)
            lv = lv_all[idx].to(param.device)
            u, log_q = dequantizer.sample_unit(lv, g)
            y = dequantizer.to_data(lv, u, torch.float64)
            with torch.no_grad():
                y_in = y.detach().to(net_dtype)
                t = torch.full((y_in.shape[0],), t_value, dtype=net_dtype, device=y_in.device)
                s = score(y_in, t).to(torch.float64)
            # surrogate whose gradient is the ELBO's: d/dtheta [s . y - log q]
            elbo_surrogate = (s * y).flatten(1).sum(1) - log_q
            loss = -elbo_surrogate.mean() / D
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(log_q.detach().mean()) / D)
            if bar is not None:
                bar.set_postfix(log_q_per_dim=f"{history[-1]:.4f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return history
