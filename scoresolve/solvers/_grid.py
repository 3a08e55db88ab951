"""The one fixed-grid run: every grid solver (fixed-step RK, exponential integrators, SDE samplers) is a step function
``step(run, x, i) -> x_next`` from grid time ``run.t[i]`` to ``run.t[i + 1]``, and `run_grid` does the rest.

`GridRun` holds what steps share: the counted model (the one wrap of the score, see
`scoresolve.solvers._registry.counted`) and the process using it, one host float64 copy of the validated grid (so
step coefficients are Python floats and need no device sync), the schedule on the grid (alpha, sigma, lambda, s),
the resolved options, seeded per-sample noise, a scratch ``memory`` for multistep histories, the non-finite guard,
the trajectory, the callback and the progress bar.

The analytical first step (option ``afs`` of the exponential and Adams solvers; Dockhorn et al. 2022, Zhou et al.
2024): at T the data are almost forgotten, so the first prediction is taken from the prior instead of the network,
E[x0 | x_T] ~ 0 (zero-mean data) and eps = x_T / sigma_T, saving one evaluation: ``nfe`` buys one more step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import torch

from .._utils import bcast, check_batched
from ..reverse import ReverseProcess
from ._affine import DRIFT, affine_coefficients, apply_affine, supports_affine
from ._base import check_start, counted
from ._solution import Solution, Trajectory
from .errors import NonFiniteError
from .noise import Noise, Seeds

if TYPE_CHECKING:
    from ._registry import SolverSpec

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def check_grid(ts: torch.Tensor, T: float) -> torch.Tensor:
    """Validate a time grid: 1-D, at least 2 points, strictly decreasing, inside (0, T]."""
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"a time grid must be a 1-D tensor of at least 2 times, got shape {tuple(ts.shape)}")
    tc = ts.detach().cpu()
    if not bool(torch.isfinite(tc).all()):
        raise ValueError("the time grid contains non-finite values")
    if not bool((tc[1:] < tc[:-1]).all()):
        raise ValueError(f"the time grid must be strictly decreasing (from T towards t_eps), got {tc[:6].tolist()}...")
    if float(tc[-1]) <= 0 or float(tc[0]) > T * (1 + 1e-6):
        raise ValueError(f"the time grid must lie in (0, T] = (0, {T}], got [{float(tc[-1])}, {float(tc[0])}]")
    return ts


def batch_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A time (a 0-d tensor or a Python float) as a ``[batch]`` tensor in x's dtype/device."""
    if torch.is_tensor(t):
        return t.to(dtype=x.dtype, device=x.device).expand(x.shape[0])
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


class FiniteGuard:
    """Finds, without host-device synchronisation inside the loop, the samples that turned non-finite.

    `update` after each step with the new state and its time; `check` once at the end raises
    [`NonFiniteError`][scoresolve.NonFiniteError] if any sample went bad. A grid step combines x linearly with
    nonzero weight (x_new = c x + ..., c > 0, plus predictions and noise), so a NaN or Inf in a sample's state stays
    non-finite to the end: the common path tests the final state only (one reduction per solve, no per-step cost).
    With ``keep_last`` (the grid run turns it on only to replay a solve that failed, see `run_grid`) it tests every
    step, one reduction and one select per step, and the error carries the time each sample first went bad and
    ``last``, the last finite state of every sample.
    """

    def __init__(self, x: torch.Tensor, solver: str, keep_last: bool = False) -> None:
        self.solver = solver
        self.keep_last = keep_last
        self.oks: list[torch.Tensor] = []
        self.times: list[torch.Tensor | float] = []
        self.final: tuple[torch.Tensor, torch.Tensor | float] | None = None
        self.last = x.detach().clone() if keep_last else None
        self.good = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if keep_last else None
        # accumulate the per-sample sums in at least float32 (a float16 sum of finite values can overflow)
        self._acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None

    def _finite(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x.detach().flatten(1).sum(1, dtype=self._acc))  # a NaN or Inf makes the sum non-finite

    def update(self, x: torch.Tensor, t: torch.Tensor | float) -> None:
        if not self.keep_last:
            self.final = (x, t)
            return
        ok = self._finite(x)
        self.oks.append(ok)
        self.times.append(t)
        self.good = self.good & ok
        self.last = torch.where(bcast(self.good, x), x.detach(), self.last)

    def check(self) -> None:
        if not self.keep_last:
            if self.final is None:
                return
            x, t = self.final
            ok = self._finite(x)
            if not bool(ok.all()):
                idx = (~ok).nonzero().flatten().tolist()
                raise NonFiniteError(self.solver, idx, [float(t)] * len(idx), None)
            return
        if not self.oks:
            return
        oks = torch.stack(self.oks)  # [steps, batch]
        bad = ~oks.all(0)
        if not bool(bad.any()):
            return
        idx = bad.nonzero().flatten().tolist()
        first = (~oks[:, bad]).to(torch.uint8).argmax(0).tolist()
        raise NonFiniteError(self.solver, idx, [float(self.times[k]) for k in first], self.last)


GRID_CACHE_SIZE = 64
"""Most entries `GridRun.per_grid` keeps (least recently used dropped first)."""
_GRID_CACHE: OrderedDict = OrderedDict()


class GridRun:
    """The state of one grid solve shared by its steps (see the module docstring). ``t`` are the grid's host
    float64 times, ``ts`` the network times (x's dtype and device), ``options`` the solver's resolved options,
    ``stats`` what the solution will report."""

    def __init__(self, spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor,
                 options: dict, *, generator: torch.Generator | None = None, seeds: Seeds | None = None,
                 callback: Callback | None = None, save_trajectory: bool = False, progress: bool = False,
                 keep_last: bool = False) -> None:
        check_batched(x)
        self.name, self.process, self.sde, self.callback = spec.name, process, process.sde, callback
        self.proc, self.model, self.counter = counted(process)
        self.t64 = check_grid(ts.detach().to("cpu", torch.float64), self.sde.T)  # the one host copy of the grid
        self.t = self.t64.tolist()
        self.steps = len(self.t) - 1
        self.ts = ts.to(dtype=x.dtype, device=x.device)  # network times
        check_start(spec.name, spec.starts_at_alpha0, process, self.model, self.t[0])
        self.options = options
        self.noise = Noise(x, generator, seeds)
        self.memory: dict[str, Any] = {}
        self._coefs: dict[Any, Any] = {}  # prediction kind -> per-grid-point (cx, cp); (kind, t) -> off the grid
        self._times: dict[float, torch.Tensor] = {}  # off-grid host time -> its [batch] tensor
        self._tb: tuple[torch.Tensor, ...] | None = None  # grid times as [batch] tensors (`time`)
        self.stats: dict[str, Any] = dict(options)  # the resolved options, reported with the solution
        self.guard, self.traj = FiniteGuard(x, spec.name, keep_last), Trajectory(save_trajectory)
        self.traj.add(self.ts[0], x)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, desc="sampling", unit="step")

    def reset(self, x: torch.Tensor) -> None:
        """Forget one solve's device state (histories, guard, trajectory, count) but keep what was computed on the host
        (the schedule, coefficients, weights: everything in ``memory`` that holds no tensor), so that a solve can be
        recorded (`scoresolve.compiled`) with no host computation left inside the step loop."""
        self.memory = {k: v for k, v in self.memory.items() if not _holds_tensor(v)}
        self.guard, self.traj = FiniteGuard(x, self.name), Trajectory(False)
        self.counter.calls = 0

    # --- the schedule on the grid, as Python floats (computed once, on the host) ------------------------------
    @cached_property
    def alpha(self) -> list[float]:
        return self.sde.alpha(self.t64).tolist()

    @cached_property
    def sigma(self) -> list[float]:
        return self.sde.sigma(self.t64).tolist()

    @cached_property
    def log_alpha(self) -> list[float]:
        return self.sde.log_alpha(self.t64).tolist()

    @cached_property
    def lam(self) -> list[float]:
        return self.sde.log_snr(self.t64).tolist()

    @cached_property
    def start(self) -> int:
        """Index of the first grid time with a finite log-SNR: 1 when the grid starts where alpha = 0 (rectified flow
        at t = 1), else 0. Multistep methods build their history from there (a step from lambda = -inf is exact in
        the data prediction, but lambda differences to that point carry no information)."""
        return 1 if self.lam[0] == -math.inf else 0

    @cached_property
    def s(self) -> list[float]:
        """s(t), the reverse process's noise coefficient, on the grid."""
        return self.process.diffusion(self.t64).to(torch.float64).expand(self.t64.shape).tolist()

    def at_lambda(self, lam: float) -> tuple[float, float, float, float]:
        """(t, alpha, sigma, lambda) at the time whose log-SNR is ``lam`` (lambda recomputed at that t)."""
        return self.at_lambdas([lam])[0]

    def at_lambdas(self, lams: list[float]) -> list[tuple[float, float, float, float]]:
        """`at_lambda` at several log-SNRs at once (one host evaluation of the schedule)."""
        t = self.sde.t_from_log_snr(torch.tensor(lams, dtype=torch.float64))
        cols = (t, self.sde.alpha(t), self.sde.sigma(t), self.sde.log_snr(t))
        return list(zip(*(c.expand(t.shape).tolist() for c in cols)))

    # --- evaluations ------------------------------------------------------------------------------------------
    # With the package's own process and model (`supports_affine`), a prediction at a known time is the network's
    # output and x combined with host coefficients computed once per grid (`scoresolve.solvers._affine`): two
    # kernels, no schedule evaluation per step. Otherwise the model's and the process's own methods are called.
    def time(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Grid time i as a ``[batch]`` tensor (views of ``ts``, made once per solve)."""
        tb = self._tb
        if tb is None or tb[0].shape[0] != x.shape[0]:
            tb = self._tb = self.ts[:, None].expand(-1, x.shape[0]).unbind(0)
        return tb[i]

    def raw(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The network's own output at grid point i (one counted evaluation)."""
        return self.model.raw(x, self.time(i, x))

    @cached_property
    def affine(self) -> bool:
        """Whether predictions use the per-grid host coefficients (see above)."""
        return supports_affine(self.process, self.model)

    def per_grid(self, name: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per (``name``, forward process, grid) and kept for later solves on the same grid
        (the batches of a data set; an LRU of `GRID_CACHE_SIZE` entries). ``name`` must hold everything else the
        result depends on (options, prediction, dtype). Host-side values only (floats, lists). Processes are keyed
        by their hash and equality (the frozen dataclasses of the package: by value); a process changed in place
        after a solve would need a new object."""
        key = (name, self.sde, tuple(self.t))
        try:
            value = _GRID_CACHE.pop(key)
        except KeyError:
            value = build()
        except TypeError:  # an unhashable process: no cache
            return build()
        _GRID_CACHE[key] = value
        while len(_GRID_CACHE) > GRID_CACHE_SIZE:
            _GRID_CACHE.popitem(last=False)
        return value

    def grid_coefficients(self, kind: str) -> list[tuple[float, float]]:
        """(cx, cp) at every grid point with prediction ``kind`` = cx x + cp out (`affine` grids only; host floats,
        kept per grid): for steps that fold the conversion into their own per-grid weights."""
        coefs = self._coefs.get(kind)
        if coefs is None:  # at the grid times as the network sees them (rounded to x's dtype)
            def build() -> list[tuple[float, float]]:
                cx, cp = affine_coefficients(self.process, self.model, kind, self.t64.to(self.ts.dtype))
                return list(zip(cx, cp))

            coefs = self._coefs[kind] = self.per_grid(
                ("affine", kind, self.model.prediction, self.model.sde, self.process.constant_scale, self.ts.dtype),
                build)
        return coefs

    def prefetch(self, kind: str, times: list[float], key: tuple | None = None) -> None:
        """Compute the coefficients of ``kind`` at the off-grid host times ``times`` at once (e.g. every stage time of
        a Runge-Kutta solve), for `predict_at`. With ``key`` (naming how ``times`` follow from the grid) they are
        kept for later solves on the same grid (`per_grid`)."""
        if not self.affine:
            return

        def build() -> dict:
            new = sorted(set(times))
            cx, cp = affine_coefficients(self.process, self.model, kind,
                                         torch.tensor(new, dtype=torch.float64).to(self.ts.dtype))
            return {(kind, t): (a, b) for t, a, b in zip(new, cx, cp)}

        if key is None:
            if any((kind, t) not in self._coefs for t in times):
                self._coefs.update(build())
            return
        self._coefs.update(self.per_grid(("affine_at", key, kind, self.model.prediction, self.model.sde,
                                          self.process.constant_scale, self.ts.dtype), build))

    def coefficients_at(self, kind: str, t: float) -> tuple[float, float]:
        """(cx, cp) of prediction ``kind`` = cx x + cp out at the off-grid host time t (`affine` grids only)."""
        if (kind, t) not in self._coefs:
            self.prefetch(kind, [t])
        return self._coefs[(kind, t)]

    def predict(self, x: torch.Tensor, i: int, kind: str) -> torch.Tensor:
        """Prediction ``kind`` (score, eps, x0, v, flow, or ``"drift"``: the reverse process's) at grid point i."""
        if not self.affine:
            return self.proc.drift_at(x, self.time(i, x)) if kind == DRIFT else self.model.predict(x, self.time(i, x),
                                                                                                      kind)
        cx, cp = self.grid_coefficients(kind)[i]
        return apply_affine(x, self.model.raw(x, self.time(i, x)), cx, cp)

    def predict_at(self, x: torch.Tensor, t: float, kind: str) -> torch.Tensor:
        """Prediction ``kind`` (as `predict`) at an off-grid time t (a Python float: no host-device transfer)."""
        tb = self._times.get(t)
        if tb is None or tb.shape[0] != x.shape[0]:
            tb = self._times[t] = batch_t(t, x)
        if not self.affine:
            return self.proc.drift_at(x, tb) if kind == DRIFT else self.model.predict(x, tb, kind)
        cx, cp = self.coefficients_at(kind, t)
        return apply_affine(x, self.model.raw(x, tb), cx, cp)

    def predict_parts(self, x: torch.Tensor, i: int | None, kind: str,
                      t: float | None = None) -> tuple[torch.Tensor, float, float]:
        """(out, cx, cp) with prediction ``kind`` = cx x + cp out at grid point i (or the off-grid time t when i is
        None): a step that combines predictions linearly folds cx, cp into its own weights and saves the kernels of
        the conversion. Without host coefficients (`affine`) out is the prediction itself (cx = 0, cp = 1)."""
        if not self.affine:
            return (self.predict(x, i, kind) if i is not None else self.predict_at(x, float(t), kind)), 0.0, 1.0
        if i is not None:
            cx, cp = self.grid_coefficients(kind)[i]
            return self.model.raw(x, self.time(i, x)), cx, cp
        t = float(t)
        tb = self._times.get(t)
        if tb is None or tb.shape[0] != x.shape[0]:
            tb = self._times[t] = batch_t(t, x)
        cx, cp = self.coefficients_at(kind, t)
        return self.model.raw(x, tb), cx, cp

    def score(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.predict(x, i, "score")

    def x0(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Data prediction at grid point i (with ``afs``, analytic and free at i = 0)."""
        if i == 0 and self.options.get("afs"):
            return torch.zeros_like(x)
        return self.predict(x, i, "x0")

    def x0_combination(self, x: torch.Tensor, i: int, a: float, b: float) -> torch.Tensor:
        """a x + b x0(x, i) (e.g. a velocity), folded into the prediction's coefficients: two kernels."""
        if (i == 0 and self.options.get("afs")) or not self.affine:
            return self.x0(x, i).mul(b).add_(x, alpha=a)
        cx, cp = self.grid_coefficients("x0")[i]
        return torch.add(x * (a + b * cx), self.model.raw(x, self.time(i, x)), alpha=b * cp)

    def eps(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Noise prediction at grid point i (with ``afs``, analytic and free at i = 0)."""
        if i == 0 and self.options.get("afs"):
            return x / self.sigma[0]
        return self.predict(x, i, "eps")

    def eps_at(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Noise prediction at an off-grid time t (a Python float: no host-device transfer)."""
        return self.predict_at(x, t, "eps")

    def drift_at(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The reverse process's drift at the time t: ``[batch]`` times, or a host float (then as `predict_at`)."""
        if not torch.is_tensor(t):
            return self.predict_at(x, float(t), DRIFT)
        return self.proc.drift_at(x, t)

    def drift(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.predict(x, i, DRIFT)

    def normal(self, x: torch.Tensor, i: int, stream: int = 0, std: float = 1.0) -> torch.Tensor:
        """N(0, std^2 I) like x for step i (with seeds: a function of each sample's seed, i and ``stream`` only)."""
        return self.noise(x.shape, i, stream, std=std)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def done(self, i: int, x: torch.Tensor) -> None:
        """Record the state after step i (from ts[i] to ts[i + 1])."""
        self.guard.update(x, self.ts[i + 1])
        self.traj.add(self.ts[i + 1], x)
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(i, self.ts[i + 1], x)

    def solution(self, x: torch.Tensor) -> Solution:
        if self.bar is not None:
            self.bar.close()
        self.guard.check()
        tr_ts, tr_xs = self.traj.result()
        return Solution(x=x, nfe=self.counter.calls, steps=self.steps, t=batch_t(self.ts[-1], x), ts=tr_ts,
                        xs=tr_xs, solver=self.name, stats=dict(self.stats))


def _holds_tensor(value: Any) -> bool:
    if torch.is_tensor(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def run_grid(spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, *,
             generator: torch.Generator | None = None, seeds: Seeds | None = None, callback: Callback | None = None,
             save_trajectory: bool = False, progress: bool = False, **options: Any) -> Solution:
    """Run grid solver ``spec`` on ``process`` from ``x`` at ts[0] over the decreasing grid ``ts``.

    A solve that ends with non-finite samples is replayed once (same generator state, same seeds; no callback or
    progress bar) keeping the last finite state of every sample, which the
    [`NonFiniteError`][scoresolve.NonFiniteError] then carries: the common, finite path pays no per-step copy.
    """
    opts = spec.resolve(process, options, max(int(ts.numel()) - 1, 0))
    state = generator.get_state() if generator is not None else None
    try:
        return _run(spec, process, x, ts, opts, generator, seeds, callback, save_trajectory, progress, False)
    except NonFiniteError as err:
        if generator is not None:
            generator.set_state(state)
        try:
            _run(spec, process, x, ts, opts, generator, seeds, None, False, False, True)
        except NonFiniteError as replayed:
            raise replayed from None
        raise err from None  # the replay ended finite (a non-deterministic network): no last state to give


def _run(spec: SolverSpec, process: ReverseProcess, x: torch.Tensor, ts: torch.Tensor, opts: dict,
         generator: torch.Generator | None, seeds: Seeds | None, callback: Callback | None, save_trajectory: bool,
         progress: bool, keep_last: bool) -> Solution:
    run = GridRun(spec, process, x, ts, opts, generator=generator, seeds=seeds, callback=callback,
                  save_trajectory=save_trajectory, progress=progress, keep_last=keep_last)
    assert spec.step is not None
    try:
        for i in range(run.steps):
            x = spec.step(run, x, i)
            run.done(i, x)
    finally:
        if run.bar is not None:
            run.bar.close()
    return run.solution(x)
