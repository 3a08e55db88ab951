"""Calibrate a few-step sampler to one model: fit the time grid and the per-step weights of the calibrated multistep
sampler (`scoresolve.solvers.calibrated`) so that its end points match reference solves of the probability-flow ODE.

    cal = ss.calibrate(model, sde, nfe=5, shape=(1, 8, 8))     # once per model, process and budget
    cal.save("digits-5")                                       # JSON under ~/.cache/scoresolve/calibrations
    x = ss.sample(model, sde, x_T, calibration=cal).x          # or calibration="digits-5"

How:

1. ``num_samples`` draws x_T from the prior; their reference ends x_ref come from a tight dopri5 solve (float64
   where the network converts), of which ``holdout`` are kept aside to check the fit.
2. The starts: the base method (by default the family of the model's default sampler at this budget: vAB for x0,
   v and flow models, DPM-Solver++(2M) or, from 20 NFE, the exponential Adams-Bashforth of order 4 for eps and
   score models; with the analytical first step ``afs``) on each named grid in ``starts`` the process supports,
   ranked by the median sample's error; the ``fit_starts`` best are fitted and the best fit kept.
3. Adam on the objective (learning rates decayed to a tenth on a cosine; the corrections' scaled to the start's
   error, see ``lr``), through the whole few-step
   solve (the network is differentiated in x and t): the corrections of every step and the grid (softmax
   increments of the log-SNR between the fixed ends, of t where the log-SNR is -inf at T, so it stays monotone).
   The objective is the mean per-sample RMS error of the end point over the best ``1 - trim`` of the samples: the
   few samples that end near another mode than their reference (their error is of the size of the data, and a
   small change of the solver moves them either way) would otherwise steer the fit. Every ``check_every``
   iterations the objective on all fitting samples is measured and the best parameters kept, so the fit never
   ends worse than its start on them; parameters whose untrimmed mean error exceeds 1.25x the start's are never
   kept (the fit must not buy a lower trimmed objective by giving up samples).

Cost: the reference solves (a few hundred evaluations per sample) plus ``fit_starts * iters * batch * nfe`` evaluations
with their backward passes. The network must be differentiable (the gradient to the grid also needs it in t; without it
only the weights and the schedule's part of the grid are fitted).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ._store import write_json
from ._utils import check_count, check_positive, check_t_eps
from .compare import network_reference_solve
from .fingerprint import model_fingerprint
from .process import check_capabilities, check_process
from .score import ScoreModel
from .solvers.calibrated import Calibration, check_method, step_weights
from .solvers.defaults import calibration_method, default_order
from .solvers.time_grids import check_grid_name, time_grid

STARTS = ("logsnr", "quadratic", "karras", "uniform", "flow:1", "flow:1.5")
"""The named grids `calibrate` tries as the start of the fit."""
GRID_LR = 1e-2
"""`calibrate`'s default learning rate of the grid's logits."""
LR_SCALE = 0.2
"""`calibrate`'s default learning rate of the corrections: this times the median error of the start relative to the RMS
of the reference ends (the median: the mean of a start is often several times larger, carried by a few samples)."""
MEAN_GUARD = 1.25
"""A checked fit is kept only if its untrimmed mean error over all fitting samples is at most this times the start's."""


def calibrate(
    model: Callable | ScoreModel,
    process: Any,
    nfe: int | Sequence[int],
    shape: Sequence[int],
    *,
    num_samples: int = 512,
    holdout: float = 0.2,
    iters: int = 300,
    batch: int = 128,
    lr: float | None = None,
    method: str | None = None,
    order: int | None = None,
    history: int | None = None,
    corrector: bool | None = None,
    afs: bool = True,
    starts: Sequence[str] = STARTS,
    fit_grid: bool = True,
    fit_starts: int = 3,
    trim: float = 0.1,
    check_every: int = 25,
    t_eps: float = 1e-3,
    reference_tol: float = 1e-7,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> Calibration | list[Calibration]:
    """Fit the calibrated sampler (`scoresolve.solvers.calibrated`) to ``model`` on ``process`` for ``nfe``
    evaluations per sample (module docstring).

    Args:
        model: the score model (a `ScoreModel` or a plain score callable); differentiable.
        process: the forward process (one with a Gaussian kernel, or one whose `ode_view` has one for an x0 model).
        nfe: the budget of the calibrated solves (>= 2), or a sequence of budgets: one calibration each, all on the
            same prior draws and one reference solve (its evaluations and seconds are in every record).
        shape: the shape of one sample (without the batch dimension).
        num_samples: prior draws of the fit, of which the fraction ``holdout`` is held out to check it.
        iters: Adam iterations (per fitted start).
        batch: samples per iteration.
        lr: the learning rate at the start (decayed to lr / 10), of the corrections and the grid alike; default: the
            grid's `GRID_LR`, the corrections' `LR_SCALE` times the start's median error relative to the RMS of the
            reference ends, within [1e-5, 1e-2] (Adam moves every parameter by about lr per iteration: a rate fit for a
            start 2e-2 off at 5 NFE left a 20-NFE start 1.4e-3 off where it was; 3e-4 took it to 1.4e-4).
        method: the base of the update (`scoresolve.solvers.calibrated.METHODS`: "dpmpp_2m", "vab" or "zeab");
            default: the family of ``sample``'s default sampler for this model and budget
            (`scoresolve.solvers.defaults.calibration_method`).
        order: the base's order (dpmpp_2m: 2; vab, zeab: 1-4); default: that family's order at the budget.
        history: the past states and predictions each step combines (>= max(2, order); default max(2, order)).
        corrector: vab's warm-up corrector in the base (vab only; default: on for vab, as `sample`'s `vab`), so
            that the fit starts from the default sampler itself.
        afs: the analytical first step (x0 = 0 at T, no evaluation): the budget buys one more step.
        starts: named grids to start from; the ``fit_starts`` best of them (by the median sample's error of the base
            solver) are fitted, the best fit kept. fit_grid: fit the grid too (else only the weights).
        trim: the fraction of the worst samples the objective leaves out (0 <= trim < 1).
        check_every: iterations between the checks on all fitting samples (the best parameters are kept).
        t_eps: the end time; reference_tol: rtol = atol of the reference dopri5 solves.
        seed: the seed of the prior draws and of the minibatches; dtype, device: of the fit.
        progress: show a progress bar.
        checkpoint: a directory where the reference solve and each finished budget are written as soon as they
            exist; a call with the same arguments resumes from them (a killed run loses at most the budget being
            fitted). Files written with other arguments, or for another model, are refused (ValueError), never
            overwritten; a model without a fingerprint (no torch module) resumes unchecked, with a warning.

    Returns:
        the `Calibration` (``sample(..., calibration=cal)`` runs it; ``cal.save(name)`` keeps it), or a list of them
        in the order of the budgets; each is the one a call for its budget alone gives.
    """
    check_process(process, "process")
    several = isinstance(nfe, (list, tuple, range)) or getattr(nfe, "ndim", 0) == 1
    # integers, never rounded (the range is checked below)
    budgets = [check_count(n, "nfe", minimum=None) for n in (nfe if several else [nfe])]
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be one sample's shape (a sequence of ints, without the batch), got {shape!r}")
    if len(tuple(shape)) == 0:
        raise ValueError("shape must hold at least one dimension (for scalar data: shape=(1,))")
    for size in shape:
        check_count(size, "each entry of shape")
    for value, what, least in ((num_samples, "num_samples", None), (iters, "iters", 0), (batch, "batch", 1),
                               (check_every, "check_every", 1), (fit_starts, "fit_starts", 1), (seed, "seed", None)):
        check_count(value, what, minimum=least)
    if lr is not None:
        check_positive(lr, "lr")
    check_positive(reference_tol, "reference_tol")
    check_t_eps(t_eps, process.T)
    if isinstance(starts, str):
        raise TypeError(f"starts must be a sequence of grid names, got the str {starts!r} (write ({starts!r},))")
    if not [check_grid_name(name) for name in starts]:
        raise ValueError("starts must name at least one grid, e.g. ('logsnr', 'flow:1')")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not budgets or min(budgets) < 2:
        raise ValueError(f"calibrate needs nfe >= 2, got {nfe}")
    if not 0 <= trim < 1:
        raise ValueError(f"trim must lie in [0, 1), got {trim}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must lie in [0, 1), got {holdout}")
    n_val = int(round(num_samples * holdout))
    if num_samples - n_val < 2:
        raise ValueError(f"num_samples={num_samples} with holdout={holdout} leaves fewer than 2 fitting samples")
    start_time = time.perf_counter()
    model = ScoreModel.wrap(model, process)
    if process.missing(("gaussian_kernel",)):  # as the default sampler does: the process's ODE view for x0 models
        view = process.ode_view()
        if view is not None and model.prediction == "x0" and not view.missing(("gaussian_kernel",)):
            model, process = model.on(view), view
    check_capabilities("calibrate", process, ("gaussian_kernel",))
    finite = process.finite_log_snr_at_T
    bases = [_base(n, model.prediction, finite, method, order, history, corrector, process) for n in budgets]
    options = {"iters": iters, "batch": batch, "lr": lr, "trim": trim, "holdout": holdout, "fit_grid": fit_grid,
               "fit_starts": fit_starts, "seed": seed}
    ckpt = None if checkpoint is None else _Checkpoint(
        checkpoint, model, {"process": repr(process), "shape": [int(v) for v in shape], "num_samples": num_samples,
                            "seed": int(seed), "t_eps": float(t_eps), "reference_tol": float(reference_tol),
                            "dtype": str(dtype)},
        {**options, "afs": bool(afs), "starts": list(starts), "check_every": check_every})
    gen = torch.Generator().manual_seed(int(seed))
    x_T = process.prior_sample((num_samples, *shape), generator=gen, dtype=dtype).to(device)
    checked = _check_differentiable(model, process, x_T[:2])
    saved = None if ckpt is None else ckpt.reference()
    if saved is None:
        ref, ref_nfe, ref_desc = _reference(model, process, x_T, t_eps, reference_tol)
        if ckpt is not None:
            ckpt.save_reference(ref, ref_nfe, ref_desc, time.perf_counter() - start_time)
    else:
        ref, ref_nfe, ref_desc, ref_seconds_saved = saved
        ref, start_time = ref.to(device=x_T.device, dtype=x_T.dtype), start_time - ref_seconds_saved
    if several:
        ref_desc += f"; shared by the budgets {tuple(budgets)}"
    data = (x_T[n_val:], ref[n_val:], x_T[:n_val], ref[:n_val])
    after_draws, ref_seconds = gen.get_state(), time.perf_counter() - start_time
    out = []
    for n, base in zip(budgets, bases):
        done = None if ckpt is None else ckpt.budget(n, base)
        if done is not None:
            out.append(done)
            continue
        gen.set_state(after_draws)  # each budget fits as a call for it alone would
        record = {"evaluations": ref_nfe + checked, "seconds": ref_seconds, "num_samples": int(num_samples),
                  "reference": ref_desc, "options": dict(options), "model": model_fingerprint(model) or "",
                  "shape": [int(s) for s in shape]}
        cal = _fit_budget(model, process, n, base, afs, data, starts, fit_starts, trim, iters, batch, lr, fit_grid,
                          check_every, t_eps, gen, progress, record)
        if ckpt is not None:
            ckpt.save_budget(cal, base)
        out.append(cal)
    return out if several else out[0]


def _check_differentiable(model: ScoreModel, process: Any, x: torch.Tensor) -> int:
    """ValueError unless the model's x0 prediction is differentiable in x (the fit backpropagates through the whole
    solve; a network run under no_grad, or detaching its output, would leave the fit with a partial gradient).
    Returns the network evaluations spent (one per sample of ``x``)."""
    xg = x.detach().requires_grad_(True)
    t = torch.full((x.shape[0],), 0.5 * float(process.T), dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        out = model.x0(xg, t)
    if not out.requires_grad:
        raise ValueError("calibrate differentiates through the network, but the model's prediction does not depend "
                         "differentiably on x (is it run under torch.no_grad or inference_mode, or detached?)")
    return int(x.shape[0])


class _Checkpoint:
    """`calibrate`'s checkpoint directory: ``reference.pt`` (the reference ends, keyed by what determines them) and
    ``nfe<N>.json`` per finished budget (the record and the key of the whole call)."""

    def __init__(self, directory: str | os.PathLike, model: ScoreModel, draws: dict, fit: dict) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"checkpoint {str(self.dir)!r} exists and is not a directory")
        fp = model_fingerprint(model)
        self.draws = {**draws, "model": fp}
        self.fit = {**self.draws, **fit}
        self.unchecked = fp is None

    def _check(self, path: Path, saved: dict, want: dict) -> None:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        if diff:
            raise ValueError(f"checkpoint {path} was written by a calibration with other settings ({', '.join(diff)}"
                             f"; saved {[saved.get(k) for k in diff]}, now {[want.get(k) for k in diff]}): use "
                             "another checkpoint directory or remove it")
        if self.unchecked:  # once per call
            self.unchecked = False
            warnings.warn(f"resuming from {path} without checking the model (it has no fingerprint: no torch module)",
                          stacklevel=3)

    def reference(self) -> tuple[torch.Tensor, int, str, float] | None:
        path = self.dir / "reference.pt"
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True)
        self._check(path, json.loads(saved["key"]), json.loads(json.dumps(self.draws)))
        return saved["ref"], int(saved["nfe"]), str(saved["desc"]), float(saved["seconds"])

    def save_reference(self, ref: torch.Tensor, nfe: int, desc: str, seconds: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path, tmp = self.dir / "reference.pt", self.dir / f"reference.pt.tmp{os.getpid()}"
        torch.save({"key": json.dumps(self.draws), "ref": ref.detach().cpu(), "nfe": int(nfe), "desc": desc,
                    "seconds": float(seconds)}, tmp)
        os.replace(tmp, path)

    def _key(self, base: tuple) -> dict:
        method, order, history, corrector = base
        return json.loads(json.dumps({**self.fit, "method": method, "order": order, "history": history,
                                      "corrector": corrector}))

    def budget(self, nfe: int, base: tuple) -> Calibration | None:
        path = self.dir / f"nfe{nfe}.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        self._check(path, saved["key"], self._key(base))
        return Calibration.from_dict(saved["calibration"])

    def save_budget(self, cal: Calibration, base: tuple) -> None:
        write_json(self.dir / f"nfe{cal.nfe}.json", {"key": self._key(base), "calibration": cal.to_dict()})


def _base(nfe: int, prediction: str, finite: bool, method: str | None, order: int | None, history: int | None,
          corrector: bool | None, process: Any) -> tuple[str, int, int, bool]:
    """(method, order, history, corrector) of the update for a budget: the caller's, else `calibration_method`'s
    (and vab's warm-up corrector)."""
    if method is None:
        method, default = calibration_method(nfe, prediction, finite)
        order = default if order is None else order
    order = (2 if method == "dpmpp_2m" else default_order(nfe)) if order is None else int(order)
    history = max(2, order) if history is None else int(history)
    corrector = (method == "vab") if corrector is None else bool(corrector)
    check_method(method, order, history, corrector)
    if method == "zeab" and not finite:
        raise ValueError(f"method 'zeab' needs a finite log-SNR at T, which {process!r} does not have")
    return method, order, history, corrector


def _fit_budget(model: ScoreModel, process: Any, nfe: int, base: tuple[str, int, int, bool], afs: bool, data: tuple,
                starts: Sequence[str], fit_starts: int, trim: float, iters: int, batch: int, lr: float | None,
                fit_grid: bool, check_every: int, t_eps: float, gen: torch.Generator, progress: bool,
                record: dict) -> Calibration:
    """The calibration for one budget on the shared (fit_x, fit_ref, val_x, val_ref) (`calibrate`, steps 2-3);
    ``record``: the fields shared by the budgets (the reference's evaluations and seconds, to which this budget's
    are added)."""
    budget_start = time.perf_counter()
    method, order, history, corrector = base
    fit_x, fit_ref, val_x, val_ref = data
    n_val, evaluations = len(val_x), 0
    steps = nfe + int(bool(afs))

    def objective(err: torch.Tensor) -> torch.Tensor:
        k = max(1, int(math.ceil((1 - trim) * err.numel())))
        return err.sort().values[:k].mean()

    def per_sample(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (x - r).flatten(1).pow(2).mean(1).sqrt()

    candidates: list[tuple[float, str, _Fit, torch.Tensor]] = []
    for name in starts:
        try:
            grid = time_grid(process, steps, name, t_eps)
        except (ValueError, NotImplementedError):
            continue  # a grid this process does not support (e.g. logsnr where the log-SNR is -inf at T)
        f = _Fit(process, grid, history, afs, method, order, corrector)
        with torch.no_grad():
            err = per_sample(f.rollout(model, fit_x), fit_ref)
        evaluations += nfe * len(fit_x)
        if bool(torch.isfinite(err).all()):
            candidates.append((float(err.median()), name, f, err))  # ranked by the typical sample (flips aside)
    if not candidates:
        raise ValueError(f"none of the start grids {tuple(starts)} gives a finite end point on {process!r}")
    candidates.sort(key=lambda c: c[0])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters * min(fit_starts, len(candidates)), desc=f"calibrating {nfe} NFE", unit="iter")
    fits = []
    scale = float(fit_ref.flatten(1).pow(2).mean().sqrt())
    for _, name, fit, err0 in candidates[: max(1, fit_starts)]:
        rate = lr if lr is not None else min(1e-2, max(1e-5, LR_SCALE * float(err0.median()) / scale))
        best, evals = _descend(fit, model, fit_x, fit_ref, objective, per_sample, float(objective(err0)),
                               float(err0.mean()), fit_grid, iters, batch, rate, GRID_LR if lr is None else lr,
                               check_every, gen, bar)
        evaluations += evals
        fits.append((best, name, float(objective(err0)), fit))
    if bar is not None:
        bar.close()
    best, start, start_error, fit = min(fits, key=lambda f: f[0])
    start_fit = _Fit(process, time_grid(process, steps, start, t_eps), history, afs, method, order, corrector)
    with torch.no_grad():
        val_error = float(objective(per_sample(fit.rollout(model, val_x), val_ref))) if n_val else math.nan
        val_start = float(objective(per_sample(start_fit.rollout(model, val_x), val_ref))) if n_val else math.nan
        grid = fit.grid().detach().to("cpu", torch.float64)
    evaluations += 2 * nfe * n_val
    return Calibration(
        grid=grid, coefficients=fit.coef.detach().to("cpu", torch.float64).clone(), afs=bool(afs), nfe=nfe,
        t_eps=float(t_eps), T=float(process.T), start=start, train_error=best, start_error=start_error,
        val_error=val_error, val_start_error=val_start, process=repr(process), prediction=model.prediction,
        method=method, order=order, corrector=corrector,
        **{**record, "evaluations": int(record["evaluations"] + evaluations),
           "seconds": record["seconds"] + time.perf_counter() - budget_start})


def _descend(fit: "_Fit", model: ScoreModel, x: torch.Tensor, ref: torch.Tensor, objective: Callable,
             per_sample: Callable, start: float, start_mean: float, fit_grid: bool, iters: int, batch: int,
             lr: float, grid_lr: float, check_every: int, gen: torch.Generator, bar: Any) -> tuple[float, int]:
    """Adam on ``objective`` from the fit's current parameters (cosine-decayed learning rate, to lr / 10), keeping
    the best checked parameters: those with the lowest objective on all of ``x`` whose untrimmed mean error stays
    within 1.25x the start's (a fit must not buy a lower trimmed objective by giving up some samples). Returns
    (the best objective, network evaluations spent); the fit ends at the best parameters."""
    fit.logits.requires_grad_(bool(fit_grid))
    groups = [{"params": [fit.coef], "lr": lr}]
    if fit_grid:
        groups.append({"params": [fit.logits], "lr": grid_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * k / max(iters, 1))))
    best, best_state, evaluations, nfe = start, fit.state(), 0, fit.steps - int(fit.afs)
    for it in range(iters):
        idx = torch.randperm(len(x), generator=gen)[:batch].to(x.device)
        loss = objective(per_sample(fit.rollout(model, x[idx]), ref[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        evaluations += 2 * nfe * len(idx)  # forward and backward through the network
        if (it + 1) % check_every == 0 or it + 1 == iters:
            with torch.no_grad():
                err = per_sample(fit.rollout(model, x), ref)
            evaluations += nfe * len(x)
            e = float(objective(err))
            if e < best and float(err.mean()) <= MEAN_GUARD * start_mean:
                best, best_state = e, fit.state()
            if bar is not None:
                bar.set_postfix(objective=f"{best:.3e}")
        if bar is not None:
            bar.update()
    fit.load(best_state)
    return best, evaluations


def _reference(model: ScoreModel, process: Any, x_T: torch.Tensor, t_eps: float, tol: float
               ) -> tuple[torch.Tensor, int, str]:
    """(reference ends, network evaluations, description): `scoresolve.compare.network_reference_solve` at
    rtol = atol = ``tol`` (float64 where the network converts)."""
    sol, how = network_reference_solve(model, process, x_T, t_eps, tol64=tol, tol32=tol)
    return sol.x.to(x_T.dtype), int(sol.nfe.sum()), how


class _Fit:
    """The parameters of a fit (grid logits, corrections) and the differentiable few-step solve they define."""

    def __init__(self, process: Any, grid: torch.Tensor, history: int, afs: bool, method: str, order: int,
                 corrector: bool = False) -> None:
        self.process, self.afs, self.method, self.order, self.corrector = process, bool(afs), method, order, corrector
        self.T, self.t_eps = float(grid[0]), float(grid[-1])
        grid = grid.to(torch.float64)
        # the grid's coordinate: the log-SNR where it is finite at T, else t (rectified flow: alpha(T) = 0)
        self.log_snr = process.finite_log_snr_at_T
        s = self._coord(grid)
        self.s0, self.s1 = float(s[0]), float(s[-1])
        inc = (s[1:] - s[:-1]) / (self.s1 - self.s0)  # positive fractions summing to 1
        self.logits = inc.clamp_min(1e-12).log().requires_grad_(True)
        self.coef = torch.zeros(len(grid) - 1, 2 * int(history), dtype=torch.float64, requires_grad=True)
        self.steps = len(grid) - 1

    def _coord(self, t: torch.Tensor) -> torch.Tensor:
        return self.process.log_snr(t, check=False) if self.log_snr else t

    def grid(self) -> torch.Tensor:
        """The grid (float64, differentiable in the logits), ends pinned at T and t_eps."""
        s = self.s0 + torch.cumsum(torch.softmax(self.logits, 0), 0) * (self.s1 - self.s0)
        t = self.process.t_from_log_snr(s) if self.log_snr else s
        one = torch.ones(1, dtype=torch.float64)
        return torch.cat([one * self.T, t[:-1], one * self.t_eps])

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits.detach().clone(), self.coef.detach().clone()

    def load(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            self.logits.copy_(state[0])
            self.coef.copy_(state[1])

    def rollout(self, model: ScoreModel, x: torch.Tensor) -> torch.Tensor:
        """The calibrated few-step solve from ``x`` (the arithmetic of `scoresolve.solvers.calibrated`)."""
        ts = self.grid()
        alpha, sigma = self.process.marginal(ts, check=False)
        lam = torch.log(alpha) - torch.log(sigma)
        ts_x = ts.to(dtype=x.dtype, device=x.device)
        a, s, lm = (v.to(dtype=x.dtype, device=x.device) for v in (alpha, sigma, lam))
        coef = self.coef.to(dtype=x.dtype, device=x.device)
        history = coef.shape[1] // 2
        xs: list[torch.Tensor] = []  # the last states and predictions, newest first
        ds: list[torch.Tensor] = []
        for i in range(len(ts) - 1):
            d = torch.zeros_like(x) if (self.afs and i == 0) else model.x0(x, ts_x[i].expand(x.shape[0]))
            xs, ds = [x, *xs][:history], [d, *ds][:history]
            wx, wd = step_weights(a, s, lm, i, coef[i], self.afs, self.method, self.order, self.corrector)
            x = sum(wx[j] * xs[j] + wd[j] * ds[j] for j in range(len(wx)))
        return x
