"""Log-likelihoods through the probability-flow ODE (instantaneous change of variables).

With v(x, t) = f(t) x - g(t)^2/2 score(x, t) the PF-ODE drift,

    log p_{t_eps}(x) = log p_T(x(T)) + int_{t_eps}^T div v(x(t), t) dt           (Chen et al. 2018; Song et al. 2021)

and p_T is replaced by the prior. div v = D f(t) - g^2/2 div score: the linear part is exact, only the network part
is estimated, by Hutchinson's estimator div s = E[e^T (ds/dx) e] (one VJP per probe, probes fixed along the
trajectory, all probes sharing one network forward) or exactly (D VJPs, chunked).

The ODE may be integrated in t or in the log-SNR lambda (``time_variable="logsnr"``): dlambda/dt = -g^2/(2 sigma^2),
so dx/dlambda = v * (-2 sigma^2 / g^2), which spreads the steps evenly over the noise levels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ._utils import bcast, check_batched
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers._core import EvalCounter
from .solvers.ode import (
    DOPRI5_GAINS,
    MaxStepsError,
    NonFiniteStepError,
    PIController,
    StepSizeUnderflowError,
    odeint_adaptive,
)

Divergence = Literal["hutchinson", "exact"]


@dataclass
class LikelihoodResult:
    """Result of [`log_likelihood`][scoresolve.log_likelihood] (all ``[batch]`` unless stated).

    Attributes:
        log_prob: log p_{t_eps}(x) in nats (prior log-density of the latent + delta_log_prob).
        latent: z = x(T), shape like x.
        prior_log_prob: log prior(z).
        delta_log_prob: int_{t_eps}^T div v dt (the mean over probes for Hutchinson).
        nfe: network evaluations in which each sample was active (each one forward + one VJP per probe).
        calls: batched network calls of the whole solve (>= nfe.max(): finished samples ride along until the
            solver's next termination check).
        std_error: standard error of log_prob over the probes (``probes > 1``), else None.
        steps: accepted steps per sample.
        rejected: rejected steps per sample.
        rows: rows of the batch the network evaluated over the whole solve (``calls * batch`` without
            ``compact``; less with it): the work, in single-sample evaluations.
    """

    log_prob: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: torch.Tensor
    std_error: torch.Tensor | None
    steps: torch.Tensor
    rejected: torch.Tensor
    calls: int = 0
    rows: int = 0


def _probes(x: torch.Tensor, k: int, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    shape = (k,) + tuple(x.shape)
    if kind == "rademacher":
        e = torch.randint(0, 2, shape, generator=generator, device=x.device, dtype=torch.int8)
        return (2 * e - 1).to(x.dtype)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown probe {kind!r}; expected 'rademacher' or 'gaussian'")


def _exact_div_score(
    model: Callable, x: torch.Tensor, t: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """score and its exact divergence (trace of the Jacobian), D VJPs in chunks of ``chunk`` rows."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = model(xg, t)
        D = x[0].numel()
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        eye_idx = torch.arange(D, device=x.device)
        for start in range(0, D, chunk):
            idx = eye_idx[start : start + chunk]
            n = idx.numel()
            basis = torch.zeros(n, *x.shape, dtype=x.dtype, device=x.device)
            basis.view(n, x.shape[0], D)[torch.arange(n), :, idx] = 1.0
            last = start + chunk >= D
            try:
                (g,) = torch.autograd.grad(s, xg, basis, retain_graph=not last, is_grads_batched=True)
            except RuntimeError:  # a network that vmap cannot batch over: one VJP per basis vector
                g = torch.stack(
                    [torch.autograd.grad(s, xg, basis[j], retain_graph=not (last and j == n - 1))[0] for j in range(n)]
                )
            div = div + g.view(n, x.shape[0], D)[torch.arange(n), :, idx].sum(0)
    return s.detach(), div


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: free + cached by PyTorch; CPU: MemAvailable), None if unknown."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            try:
                with open("/proc/meminfo") as fh:
                    for line in fh:
                        if line.startswith("MemAvailable:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def _check_exact_memory(x: torch.Tensor, chunk: int) -> None:
    """Raise MemoryError before the exact divergence allocates more than the device has.

    Each chunk of n VJPs materialises an n-row one-hot basis and its n VJPs, 2 n B D values (a lower bound: a
    network's batched backward also holds n copies of its activations).
    """
    B, D = x.shape[0], x[0].numel()
    n = min(int(chunk), D)
    per_row = 2 * B * D * x.element_size()
    need = n * per_row
    avail = _available_bytes(x.device)
    if avail is None or need <= avail:
        return
    fits = avail // per_row
    hint = (f"lower exact_chunk to at most {fits}" if fits >= 1 else "even one VJP row does not fit")
    raise MemoryError(
        f"divergence='exact' with exact_chunk={chunk} for a batch of {B} x D={D} ({x.dtype}) needs at least "
        f"{need} bytes ({need / 2**30:.3g} GiB) per chunk (one-hot basis + {n} VJPs), more than the {avail} bytes "
        f"({avail / 2**30:.3g} GiB) available on {x.device}; {hint}, or use divergence='hutchinson'"
    )


def _in_t(err: Exception, sde: ForwardSDE) -> Exception:
    """The solver's error with the samples' times given in t instead of the log-SNR the solve ran in."""
    times = sde.t_from_log_snr(torch.tensor(err.times, dtype=torch.float64)).tolist()
    if isinstance(err, NonFiniteStepError):
        return NonFiniteStepError(err.method, err.indices, times, err.y)
    if isinstance(err, MaxStepsError):
        return MaxStepsError(err.method, err.max_steps, err.indices, times, err.y)
    return StepSizeUnderflowError(err.method, err.indices, times, err.y, err.h_min)


def _hutchinson_div_score(model: Callable, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    """score and e^T (ds/dx) e for each of the K probes in ``eps`` [K, B, ...]: one forward, K VJPs."""
    K = eps.shape[0]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = model(xg, t)
        ests = []
        for k in range(K):
            (vjp,) = torch.autograd.grad(s, xg, eps[k], retain_graph=k < K - 1)
            ests.append((vjp * eps[k]).flatten(1).sum(1))
    return s.detach(), torch.stack(ests, 1)  # [B, K]


def _progress_bar(enabled: bool, u0: float, u1: float, batch: int):
    """A tqdm bar of the slowest sample's share of the integration span, updated at the solver's checks."""
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=100, desc="log_likelihood", unit="%", bar_format="{l_bar}{bar}| {n}% [{elapsed}{postfix}]")

    def callback(it: int, u: torch.Tensor, state) -> None:
        frac = ((u.double() - u0) / (u1 - u0)).clamp(0, 1)  # read at a check, where the solver has just synchronised
        share, done = torch.stack([frac.min(), (frac >= 1).double().sum()]).tolist()
        bar.n = int(100 * share)
        bar.set_postfix_str(f"{int(done)}/{batch} done, {it} step attempts", refresh=False)
        bar.refresh()

    return callback, bar


def log_likelihood(
    score: Callable | ScoreModel,
    x: torch.Tensor,
    sde: ForwardSDE,
    *,
    divergence: Divergence | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "hutchinson",
    probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float = 1e-5,
    time_variable: Literal["t", "logsnr"] = "logsnr",
    generator: torch.Generator | None = None,
    exact_chunk: int = 64,
    max_steps: int = 10_000,
    compact: bool = False,
    controller: PIController | None = None,
    progress: bool = False,
) -> LikelihoodResult:
    """log p_{t_eps}(x) through the probability-flow ODE of ``sde`` with score ``score``.

    Args:
        score: callable ``score(x, t)`` or a [`ScoreModel`][scoresolve.ScoreModel] (any prediction type).
        x: data ``[batch, ...]``.
        divergence: ``"hutchinson"`` (unbiased, ``probes`` probes), ``"exact"`` (D VJPs per evaluation, for small
            D; ``exact_chunk`` VJPs are batched at a time), or a callable ``div(x, t) -> [batch]`` returning the
            exact divergence of the whole PF-ODE drift (analytic models).
        probes: number of Hutchinson probes, drawn once per solve from ``generator`` and fixed along the
            trajectory; all share one network forward per evaluation.
        probe: their kind, ``"rademacher"`` or ``"gaussian"``.
        solver: adaptive tableau (``dopri5``, ``tsit5``, ``bosh3``, or ``dopri5_shampine``: torchdiffeq's dopri5,
            whose error estimate is 2/3 of Hairer's, i.e. ``dopri5`` at 1.5x the tolerances).
        rtol: relative tolerance, applied to x and to the accumulated divergence separately (per sample).
        atol: absolute tolerance, likewise.
        t_eps: start time (score_sde uses 1e-5); the result is log p_{t_eps}.
        time_variable: integrate in the log-SNR ``"logsnr"`` (default) or in ``"t"``. At equal error, log-SNR
            needs 0.55-0.63x the NFE of dopri5 in t on Gaussian mixtures with near-degenerate components and
            more on smooth low-dimensional ones, where ``"t"`` is better (``benchmarks/likelihood_cost.py``); on
            the trained digits U-Net and a random-weight diffusers UNet ``"t"`` did as well or better (about half
            the error at the same NFE on the digits). On a DiscreteVPSDE use log-SNR: beta(t) jumps at every knot
            1/N, which makes steps in t tiny (~70x the NFE).
        compact: drop samples that have reached T from the batched network calls (see
            `odeint_adaptive`); same results, less work when the samples need
            different numbers of steps. ``score`` must then be a function of (x, t) alone: per-sample conditioning
            captured in a closure (class labels, say) would no longer line up with the rows of x.
        controller: the step-size controller; default: the gains of Hairer's DOPRI5 code,
            `scoresolve.solvers.ode.DOPRI5_GAINS` (0.78x the NFE of `PIController()` on the digits
            U-Net at rtol 1e-5, at an error float32 cannot resolve; no worse at matched error in float64).
    Every sample has its own adaptive steps, so its result does not depend on its batch-mates.
    """
    check_batched(x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    if not (0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}), got {t_eps}")
    if int(probes) < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if time_variable not in ("t", "logsnr"):
        raise ValueError(f"time_variable must be 't' or 'logsnr', got {time_variable!r}")
    model = ScoreModel.wrap(score, sde)
    counter = EvalCounter(model)
    B, D = x.shape[0], x[0].numel()
    eps = None
    if callable(divergence):
        div_fn, K = divergence, 1
    elif divergence == "exact":
        K = 1
        if exact_chunk < 1:
            raise ValueError(f"exact_chunk must be >= 1, got {exact_chunk}")
        _check_exact_memory(x, exact_chunk)
    elif divergence == "hutchinson":
        K = int(probes)
        eps = _probes(x, K, probe, generator)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected 'hutchinson', 'exact' or a callable")

    def v_and_div(xt: torch.Tensor, t: torch.Tensor, *probe) -> tuple[torch.Tensor, torch.Tensor]:
        """PF-ODE drift and its divergence ([B, K]) at (x, t) with one network forward; ``probe``: the
        Hutchinson probes of these rows, [B, K, ...]."""
        f, g2 = sde._f(t), sde._g2(t)
        if callable(divergence):
            s = counter(xt, t)
            div = div_fn(xt, t)[:, None]
            return bcast(f, xt) * xt - bcast(0.5 * g2, xt) * s, div
        if divergence == "exact":
            s, ds = _exact_div_score(counter, xt, t, exact_chunk)
            ds = ds[:, None]
        else:
            s, ds = _hutchinson_div_score(counter, xt, t, probe[0].transpose(0, 1))
        v = bcast(f, xt) * xt - bcast(0.5 * g2, xt) * s
        return v, (D * f)[:, None] - (0.5 * g2)[:, None] * ds  # div v = D f - g^2/2 div s

    if time_variable == "t":
        u0, u1 = float(t_eps), float(sde.T)

        def func(u: torch.Tensor, state, *probe):
            xt, _ = state
            v, div = v_and_div(xt, u, *probe)
            return v, div

    else:
        lam = sde.log_snr(torch.tensor([t_eps, sde.T], dtype=torch.float64)).tolist()
        u0, u1 = lam[0], lam[1]

        def func(u: torch.Tensor, state, *probe):
            xt, _ = state
            t = sde._t_from_log_snr(u).clamp(min=t_eps * 0.5, max=sde.T)
            v, div = v_and_div(xt, t, *probe)
            dt_du = -2 * sde._sigma(t) ** 2 / sde._g2(t)  # 1 / (dlambda/dt)
            return bcast(dt_du, xt) * v, dt_du[:, None] * div

    delta0 = torch.zeros(B, K, dtype=x.dtype, device=x.device)
    callback, bar = _progress_bar(progress, u0, u1, B)
    try:
        res = odeint_adaptive(
            func,
            (x.detach(), delta0),
            u0,
            u1,
            method=solver,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            name=f"log_likelihood[{solver}]",
            args=() if eps is None else (eps.transpose(0, 1),),  # probes per sample [B, K, ...]
            compact=compact,
            controller=DOPRI5_GAINS if controller is None else controller,
            callback=callback,
        )
    except (MaxStepsError, StepSizeUnderflowError) as err:
        if time_variable == "t":
            raise
        raise _in_t(err, sde) from None
    finally:
        if bar is not None:
            bar.close()
    z, delta = res.y
    prior = sde.prior_log_prob(z)
    log_probs = prior[:, None] + delta  # [B, K]
    std_error = log_probs.std(1) / math.sqrt(K) if K > 1 else None
    return LikelihoodResult(
        log_prob=log_probs.mean(1),
        latent=z,
        prior_log_prob=prior,
        delta_log_prob=delta.mean(1),
        nfe=res.nfe,
        std_error=std_error,
        steps=res.steps,
        rejected=res.rejected,
        calls=counter.calls,
        rows=res.stats.get("rows", 0),
    )
