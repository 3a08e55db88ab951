"""Divergence of a score network: exact (D VJPs, chunked) or Hutchinson's estimator (one VJP per probe).

Hutchinson: div s = E[e^T (ds/dx) e] with E[e e^T] = I; Rademacher probes have variance 2 sum_{i != j} A_ij^2 (the
diagonal contributes nothing), Gaussian ones 2 ||A||_F^2. All probes share one network forward. The divergence of the
linear part of the PF-ODE drift is exact and lives in `scoresolve.reverse.ReverseProcess.linear_divergence`.

Orthogonal probes (``"orthogonal"``): K Rademacher probes that are mutually orthogonal, so that the K probes sample
the directions "without replacement". Each one alone is a uniform Rademacher vector (same variance as plain
probes); averaged over the random coordinate permutation the covariance of two of them is -Var/(D - 1), so the mean
of K has variance Var/K (D - K)/(D - 1): a real gain only when K is a sizeable fraction of D. Antithetic pairs
(e, -e) give nothing for a quadratic form (e^T A e is even in e). The variance lever is the control variate of
`scoresolve.control_variate`.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from ._utils import bcast, check_count

PROBES = ("rademacher", "gaussian", "orthogonal")


def draw_probes(x: torch.Tensor, k: int, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` Hutchinson probes like x, ``[k, batch, ...]``, E[e e^T] = I: Rademacher (+-1), Gaussian, or orthogonal.

    ``"orthogonal"``: per sample, e_j = s * w_{c_j}[pi] with s uniform random signs, pi a uniform random permutation
    of the D coordinates and w_c the Walsh function (-1)^popcount(i & c) of distinct codes c_j < 2^m (m: the
    smallest with 2^m >= the group size). Walsh functions of distinct codes are orthogonal over every block of 2^m
    consecutive indices, so the probes are orthogonal in groups of up to the largest power of two dividing D
    (all k when k <= it; groups are independent; for odd D every probe is a plain Rademacher one). Module docstring:
    what it gains.

    Args:
        x: data ``[batch, ...]`` whose shape, dtype and device the probes take.
        k: number of probes per sample.
        kind: ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"``.
        generator: the random generator (None: torch's global one).
    """
    shape = (k,) + tuple(x.shape)
    if kind == "rademacher":
        e = torch.randint(0, 2, shape, generator=generator, device=x.device, dtype=torch.int8)
        return (2 * e - 1).to(x.dtype)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    if kind == "orthogonal":
        return _orthogonal_probes(x, k, generator)
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")


def _orthogonal_probes(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``draw_probes(x, k, "orthogonal", generator)``: no loop over the batch; one over the code bits."""
    B, D = x.shape[0], math.prod(x.shape[1:])
    block = D & -D if D > 0 else 1  # the largest power of two dividing D
    group = min(k, block)
    m = max(group - 1, 0).bit_length()  # 2^m >= group
    n_groups = -(-k // group)
    dev = x.device
    # distinct codes within each group: a random permutation of [0, 2^m) per group, its first `group` entries
    codes = torch.argsort(torch.rand(n_groups, 1 << m, generator=generator, device=dev), dim=1)[:, :group]
    codes = codes.reshape(-1)[:k]  # [k]
    idx = torch.arange(D, device=dev)
    parity = torch.zeros(k, D, dtype=torch.int64, device=dev)
    for bit in range(m):
        parity ^= ((idx >> bit) & 1)[None] & ((codes >> bit) & 1)[:, None]
    walsh = 1 - 2 * parity  # [k, D], +-1
    perm = torch.argsort(torch.rand(B, D, generator=generator, device=dev), dim=1)  # [B, D]
    w = walsh[:, perm]  # [k, B, D]: w[j, b, i] = walsh[j, perm[b, i]]
    signs = 2 * torch.randint(0, 2, (n_groups, B, D), generator=generator, device=dev, dtype=torch.int8) - 1
    signs = signs.repeat_interleave(group, dim=0)[:k]  # independent signs per group: the groups are independent
    return (w * signs).to(x.dtype).reshape((k,) + tuple(x.shape))


_IN_PLACE = "leaf Variable that requires grad is being used in an in-place operation"


def _forward_for_grad(model: Callable, xg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(xg, t)`` on the leaf ``xg`` that the VJPs differentiate by; a model that changes its input in place
    gets a RuntimeError saying so (autograd's own message names neither the model nor the remedy)."""
    try:
        return model(xg, t)
    except RuntimeError as err:
        if _IN_PLACE not in str(err):
            raise
        raise RuntimeError(
            "the model changes its input in place (e.g. x.mul_(c), x += c), and the divergence differentiates the "
            "model with respect to that input; the solvers also pass it their own state: compute out of place "
            f"(x = x * c) or clone the input inside the model (autograd: {err})") from err


def exact_div_score(
    model: Callable, x: torch.Tensor, t: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """score and its exact divergence (trace of the Jacobian), D VJPs in chunks of ``chunk`` rows."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = _forward_for_grad(model, xg, t)
        D = math.prod(x.shape[1:])
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


def available_bytes(device: torch.device) -> int | None:
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


EXACT_MAX_DIMS = 16384  # the largest D for which divergence="exact" runs (D VJPs per evaluation); raise to allow more
PROBE_COPIES = 3  # K x B x D arrays a Hutchinson solve holds at once: the probes, their VJPs, the probes of a step


MAX_PROBES = EXACT_MAX_DIMS  # the most Hutchinson probes (VJPs per evaluation): the exact divergence's cap


def check_probe_work(x: torch.Tensor, k: int) -> None:
    """Refuse (ValueError, with the cost) more than `MAX_PROBES` Hutchinson probes: each is one VJP per evaluation,
    the work the exact divergence is refused above (`EXACT_MAX_DIMS`)."""
    D = math.prod(x.shape[1:])
    if int(k) > MAX_PROBES:
        hint = (f"divergence='exact' takes D={D} VJPs and has no variance" if D <= EXACT_MAX_DIMS else
                "fewer probes, or repeats of the solve")
        raise ValueError(
            f"probes={k} takes {k} VJPs per evaluation (~{100 * int(k):.2g} backward passes of the network for a "
            f"100-evaluation solve): refused above {MAX_PROBES} (scoresolve.divergence.MAX_PROBES); use {hint}"
        )


def check_probe_memory(x: torch.Tensor, k: int) -> None:
    """Raise MemoryError before Hutchinson's ``k`` probes per sample (and their VJPs) take more memory than the
    device has: an estimate of `PROBE_COPIES` arrays of ``k x batch x D`` values (and ValueError above `MAX_PROBES`
    probes, `check_probe_work`)."""
    B, D = x.shape[0], math.prod(x.shape[1:])
    need = PROBE_COPIES * int(k) * B * D * x.element_size()
    avail = available_bytes(x.device)
    if avail is None or need <= avail:
        check_probe_work(x, k)
        return
    fits = avail // (PROBE_COPIES * B * D * x.element_size())
    raise MemoryError(
        f"{k} Hutchinson probes for a batch of {B} x D={D} ({x.dtype}) need about {need / 2**30:.3g} GiB (probes and "
        f"their VJPs, {PROBE_COPIES} x {k} x {B} x {D} values), more than the {avail / 2**30:.3g} GiB available on "
        f"{x.device}: use at most {fits} probes, or a smaller batch"
    )


def check_exact_work(x: torch.Tensor) -> None:
    """Refuse (ValueError, with the cost) an exact divergence of more than `EXACT_MAX_DIMS` dimensions: it takes D
    VJPs per evaluation, D times Hutchinson's one-probe cost."""
    D = math.prod(x.shape[1:])
    if D > EXACT_MAX_DIMS:
        raise ValueError(
            f"divergence='exact' on D={D} dimensions takes {D} VJPs per evaluation ({D}x the cost of one Hutchinson "
            f"probe; ~{100 * D:.2g} backward passes of the network for a 100-evaluation solve): refused above "
            f"D={EXACT_MAX_DIMS} (scoresolve.divergence.EXACT_MAX_DIMS); use divergence='hutchinson'"
        )


def check_exact_memory(x: torch.Tensor, chunk: int) -> None:
    """Raise MemoryError before the exact divergence allocates more than the device has (and ValueError above
    `EXACT_MAX_DIMS` dimensions, `check_exact_work`).

    Each chunk of n VJPs materialises an n-row one-hot basis and its n VJPs, 2 n B D values (a lower bound: a
    network's batched backward also holds n copies of its activations).
    """
    B, D = x.shape[0], math.prod(x.shape[1:])
    n = min(int(chunk), D)
    per_row = 2 * B * D * x.element_size()
    need = n * per_row
    avail = available_bytes(x.device)
    if avail is None or need <= avail:
        check_exact_work(x)
        return
    fits = avail // per_row
    hint = (f"lower exact_chunk to at most {fits}" if fits >= 1 else "even one VJP row does not fit")
    raise MemoryError(
        f"divergence='exact' with exact_chunk={chunk} for a batch of {B} x D={D} ({x.dtype}) needs at least "
        f"{need} bytes ({need / 2**30:.3g} GiB) per chunk (one-hot basis + {n} VJPs), more than the {avail} bytes "
        f"({avail / 2**30:.3g} GiB) available on {x.device}; {hint}, or use divergence='hutchinson'"
    )


def hutchinson_div_score(model: Callable, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    """score and e^T (ds/dx) e for each of the K probes in ``eps`` [K, B, ...]: one forward, K VJPs."""
    K = eps.shape[0]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = _forward_for_grad(model, xg, t)
        ests = []
        for k in range(K):
            (vjp,) = torch.autograd.grad(s, xg, eps[k], retain_graph=k < K - 1)
            ests.append((vjp * eps[k]).flatten(1).sum(1))
    return s.detach(), torch.stack(ests, 1)  # [B, K]


# ----------------------------------------------------------------------------------------------------------------------
# estimators as objects: ``v, div = estimator(fn, x, t, *args)``
# ----------------------------------------------------------------------------------------------------------------------
class DivergenceEstimator:
    """``v, div = estimator(fn, x, t, *args)``: ``fn(x, t)`` and its divergence, ``div`` of shape ``[batch, columns]``.

    ``args`` are per-sample tensors the estimator keeps in the solver's state (Hutchinson's probes, ``[batch, K,
    ...]``): `init_args` draws them once per solve, `refresh` (if not None) redraws them after every accepted step.
    ``whole_drift``: the estimate is of the whole PF-ODE drift (else of the score alone, whose linear part the
    caller adds exactly). ``reuse_last_stage``: whether a Runge-Kutta step may reuse its last stage (FSAL).
    """

    columns: int = 1
    whole_drift: bool = False
    refresh: Callable | None = None
    reuse_last_stage: bool = True

    def init_args(self, x: torch.Tensor) -> tuple:
        """The per-sample tensors the solve carries (checked and drawn here, before any network call)."""
        return ()

    def __call__(self, fn: Callable, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor):
        raise NotImplementedError


class ExactDivergence(DivergenceEstimator):
    """The exact divergence: D VJPs per evaluation, ``chunk`` of them batched at a time (for small D)."""

    def __init__(self, chunk: int = 64) -> None:
        self.chunk = check_count(chunk, "exact_chunk")

    def init_args(self, x: torch.Tensor) -> tuple:
        check_exact_memory(x, self.chunk)
        return ()

    def __call__(self, fn: Callable, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor):
        v, div = exact_div_score(fn, x, t, self.chunk)
        return v, div[:, None]


class CallableDivergence(DivergenceEstimator):
    """A given ``div(x, t) -> [batch]``, the exact divergence of the whole PF-ODE drift (analytic models); run with
    grad enabled for it alone (it may use autograd), its result detached."""

    whole_drift = True

    def __init__(self, div: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.div = div

    def __call__(self, fn: Callable, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor):
        v = fn(x, t)
        with torch.enable_grad():
            return v, self.div(x, t).detach()[:, None]


class HutchinsonDivergence(DivergenceEstimator):
    """Hutchinson's estimator e^T (d fn/dx) e with ``probes`` probes of kind ``probe`` (`PROBES`), sharing one
    forward; drawn from ``generator`` once per solve (``per="solve"``, fixed along the trajectory) or after every
    accepted step (``per="step"``: no FSAL, +1 evaluation per step). ``correction(e [K, batch, ...], t) -> [batch, K]``
    is added to the estimates (a control variate, `scoresolve.GaussianControlVariate.correction`)."""

    def __init__(self, probes: int = 1, probe: str = "rademacher", per: str = "solve",
                 generator: torch.Generator | None = None,
                 correction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        if int(probes) < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
        if per not in ("solve", "step"):
            raise ValueError(f"probes_per must be 'solve' or 'step', got {per!r}")
        self.columns, self.probe, self.per = int(probes), probe, per
        self.generator, self.correction = generator, correction
        self.reuse_last_stage = per == "solve"
        self.refresh = self._refresh if per == "step" else None

    def init_args(self, x: torch.Tensor) -> tuple:
        return (draw_probes(x, self.columns, self.probe, self.generator).transpose(0, 1),)  # [B, K, ...]

    def _refresh(self, args: tuple, accepted: torch.Tensor) -> tuple:
        """New probes for the rows whose step was accepted (``args``: the working rows' probes, [rows, K, ...])."""
        (e,) = args
        new = draw_probes(e[:, 0], self.columns, self.probe, self.generator).transpose(0, 1)
        return (torch.where(bcast(accepted, new), new, e),)

    def __call__(self, fn: Callable, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor):
        e = args[0].transpose(0, 1)  # [K, B, ...]
        v, div = hutchinson_div_score(fn, x, t, e)
        if self.correction is not None:
            div = div + self.correction(e, t)
        return v, div
