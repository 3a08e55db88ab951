"""The calibrated sampler: a multistep data-prediction solver whose time grid and per-step weights were fitted to one
model (`scoresolve.calibration.calibrate`), its record (`Calibration`) and the store of saved records.

The update of step i (grid time t_i to t_{i+1}, data predictions D_j = x0(x_j, t_j)) is linear in the last
``history`` states and predictions,

    x_{i+1} = sum_j wx_j x_{i-j} + wd_j D_{i-j},

its weights those of a base method (`METHODS`: DPM-Solver++(2M), Lu et al. 2022b, Alg. 2, with a DDIM first step,
and with ``afs`` a DDIM second step; vAB or zEAB of order 1-4, each a linear multistep method in (x, D)) plus the
fitted corrections c_i = (a_0, b_0, a_1, b_1, ...): a_j sigma_{i+1} / sigma_{i-j} on x_{i-j} and b_j alpha_{i+1} on
D_{i-j} (dimensionless, zero = the base method). The fit (end-to-end, against reference solves of the
probability-flow ODE) is in `scoresolve.calibration`; the same `step_weights` serves the fit and this solver, so
a calibrated solve reproduces the fitted one to rounding. In the spirit of learned-step and learned-coefficient
samplers (LD3, Tong et al. 2025; S4S, Frankel et al. 2025; Bespoke solvers, Shaul et al. 2024).

``sample(model, process, x_T, calibration=cal)`` runs it (``cal`` a `Calibration` or the name of a saved one): the
grid and the NFE are the calibration's, and a process or model other than the calibrated ones is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .._store import check_name, read_record, store_dir, write_json
from ._grid import GridRun, check_grid
from ._registry import GAUSSIAN_KERNEL, GridSolver, register, require_ode
from .adams import _gauss_legendre, fold_corrector

CALIBRATION_DIR_ENV = "SCORESOLVE_CALIBRATION_DIR"
_FORMAT = 1


METHODS = ("dpmpp_2m", "vab", "zeab")
"""The base methods of the calibrated update (the fit's start; zero corrections run them as they are):
``dpmpp_2m``, DPM-Solver++(2M) in the data prediction (order 2); ``vab``, Adams-Bashforth on the velocity
eps - x0 in the rectified-flow variables y = x / (alpha + sigma), u = sigma / (alpha + sigma) (azula's vAB; with
`vab`'s warm-up corrector folded into the weights, or without it), order 1-4; ``zeab``, the exponential
Adams-Bashforth on the noise prediction in log(sigma / alpha) (DEIS with the log-rho basis, azula's zEAB), order
1-4, on processes whose log-SNR is finite."""

# Gauss-Legendre on [-1, 1]: 3 nodes (exact for the cubic Lagrange basis of order 4) and 12 (the exponential weight)
_GL3 = ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9))
_GL12 = tuple(zip(*(a.tolist() for a in _gauss_legendre(12))))


def _lagrange_integrals(nodes: Sequence, a: Any, b: Any, exponential: bool) -> list:
    """int_a^b l_j(s) w(s) ds for the Lagrange basis l_j of ``nodes``, w = 1 or e^s, by Gauss-Legendre quadrature
    (exact for w = 1; for e^s, 12 points: relative error below 1e-12 for |b - a| <= 10), on floats or tensors alike
    (`adams.lagrange_integrals` and `adams.poly_integrals` take floats only: the fit differentiates these)."""
    half, mid = (b - a) / 2, (a + b) / 2
    out = [0.0] * len(nodes)
    for x, w in (_GL12 if exponential else _GL3):
        p = mid + half * x
        wp = w * half * (torch.exp(p) if torch.is_tensor(p) else math.exp(p)) if exponential else w * half
        for j, nj in enumerate(nodes):
            lj = wp
            for k, nk in enumerate(nodes):
                if k != j:
                    lj = lj * (p - nk) / (nj - nk)
            out[j] = out[j] + lj
    return out


def step_weights(alpha: Sequence, sigma: Sequence, lam: Sequence, i: int, coef: Sequence, afs: bool,
                 method: str = "dpmpp_2m", order: int = 2, corrector: bool = False) -> tuple[list, list]:
    """The weights (wx, wd) of step i: x_{i+1} = sum_j wx[j] x_{i-j} + wd[j] D_{i-j}, j < len(wx).

    ``alpha``, ``sigma``, ``lam`` (log-SNR) on the grid and ``coef`` (the 2 * history fitted corrections of step i)
    as Python floats (the solver) or tensors (the fit, differentiable); the same arithmetic for both. ``method``
    and ``order``: the base (`METHODS`); ``history`` >= ``order``. ``corrector`` (vab only): `vab`'s warm-up
    corrector, folded into the next step's weights (the states x_j are then the predicted points, where the
    network is evaluated; the corrected states are never formed)."""
    history = len(coef) // 2
    m = min(history, i + 1)
    r = sigma[i + 1] / sigma[i]
    wx = [r] + [0.0] * (m - 1)
    d = alpha[i + 1] - alpha[i] * r  # DDIM: x_{i+1} = r x_i + (alpha_{i+1} - alpha_i r) D_i
    wd = [d] + [0.0] * (m - 1)
    q = min(order, m)  # the Adams bases' order at step i (a warm-up of lower orders)
    if method == "dpmpp_2m":
        if i >= (2 if afs else 1) and m >= 2 and _finite(lam[i - 1]):
            c = (lam[i + 1] - lam[i]) / (2 * (lam[i] - lam[i - 1]))  # DPM-Solver++(2M): D_i + (D_i - D_{i-1}) / (2 r)
            wd[0], wd[1] = d * (1 + c), -d * c
    elif method == "vab" and q > 1:
        # y = x / S, S = alpha + sigma, u = sigma / S; dy/du = v = x / sigma - (S / sigma) D:
        # x_{i+1} = S_{i+1} (x_i / S_i + sum_j beta_j v_{i-j}), beta_j = int_{u_i}^{u_{i+1}} l_j(u) du
        S = [alpha[i + 1 - k] + sigma[i + 1 - k] for k in range(q + 1)]  # S[0] = S_{i+1}, S[1 + j] = S_{i-j}
        u = [sigma[i + 1 - k] / S[k] for k in range(q + 1)]
        beta = _lagrange_integrals(u[1:], u[1], u[0], exponential=False)
        if corrector and i < order:  # step i - 1 was a warm-up step, corrected at x_i (`vab`, corrector="start"):
            # x_i^c = x_i + S_i sum_J gamma_J v_{i-J}, the Adams-Moulton weights on (u_i, u_{i-1}, ...) less the
            # Adams-Bashforth ones of step i - 1; x_{i+1} = (S_{i+1} / S_i) x_i^c + ... adds S_{i+1} gamma_J v_{i-J}
            qk = min(order, m - 1)
            uk = [sigma[i - k] / (alpha[i - k] + sigma[i - k]) for k in range(qk + 1)]  # u_i, u_{i-1}, ...
            am = _lagrange_integrals(uk, uk[1], uk[0], exponential=False)
            ab = _lagrange_integrals(uk[1:], uk[1], uk[0], exponential=False)
            beta = fold_corrector(beta, am, ab)
            S = S + [alpha[i + 1 - k] + sigma[i + 1 - k] for k in range(len(S), qk + 2)]
        wx[0] = S[0] / S[1]
        for j in range(len(beta)):
            wx[j] = wx[j] + S[0] * beta[j] / sigma[i - j]
            wd[j] = -S[0] * beta[j] * S[1 + j] / sigma[i - j]
    elif method == "zeab" and q > 1:
        # y = x / alpha, s = log(sigma / alpha) = -lambda; dy/ds = e^s eps, eps = (x - alpha D) / sigma (DEIS):
        # x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_j beta_j eps_{i-j}), beta_j = int_{s_i}^{s_{i+1}} l_j(s) e^s ds
        s = [-lam[i + 1 - k] for k in range(q + 1)]
        beta = _lagrange_integrals(s[1:], s[1], s[0], exponential=True)
        wx[0] = alpha[i + 1] / alpha[i]
        for j in range(q):
            wx[j] = wx[j] + alpha[i + 1] * beta[j] / sigma[i - j]
            wd[j] = -alpha[i + 1] * beta[j] * alpha[i - j] / sigma[i - j]
    for j in range(m):
        wx[j] = wx[j] + coef[2 * j] * sigma[i + 1] / sigma[i - j]
        wd[j] = wd[j] + coef[2 * j + 1] * alpha[i + 1]
    return wx, wd


def check_method(method: str, order: int, history: int, corrector: bool = False) -> None:
    """ValueError unless ``method`` is one of `METHODS` with an order it has and a history that holds it (and the
    warm-up ``corrector`` only on vab)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    if corrector and method != "vab":
        raise ValueError(f"the warm-up corrector is vab's; method {method!r} has none")
    top = 2 if method == "dpmpp_2m" else 4
    if not (1 <= int(order) <= top) or (method == "dpmpp_2m" and int(order) != 2):
        raise ValueError(f"method {method!r} takes order {'2' if top == 2 else '1-4'}, got {order}")
    if int(history) < max(2, int(order)):
        raise ValueError(f"history must be >= max(2, order) = {max(2, int(order))}, got {history}")


def _finite(v: Any) -> bool:
    return math.isfinite(float(v.detach() if torch.is_tensor(v) else v))


@dataclass
class Calibration:
    """A calibrated sampler for one model, process and NFE: the fitted grid and weights, and how they were obtained.

    Attributes:
        grid: the decreasing float64 times (``steps + 1``) from T to t_eps.
        coefficients: ``[steps, 2 * history]`` float64, the fitted corrections of each step (module docstring).
        afs: the first prediction is the prior's (x0 = 0, no evaluation): ``nfe = steps - 1``; else ``nfe = steps``.
        nfe: network evaluations per sample of a calibrated solve.
        start: the named grid the fit started from.
        train_error / start_error: the objective (mean per-sample RMS error against the reference end, over the best
            ``1 - trim`` of the samples) after the fit and of the base solver on the start grid, on the fitting
            samples; ``val_error`` / ``val_start_error`` the same on held-out samples (the check of the fit).
        evaluations: network evaluations spent on the calibration (reference solves included); ``seconds``.
        process: repr of the process it was fitted on ("" for `base`: any process); ``model``: the model's
            fingerprint ("" if it has none or for `base`);
            ``prediction``: the model's parametrisation; ``shape``: the per-sample shape.
        reference: how the reference ends were computed.
        method, order: the base method of the update (`METHODS`) and its order; corrector: with `vab`'s warm-up
            corrector (vab only; records saved before it existed load without).
    """

    grid: torch.Tensor
    coefficients: torch.Tensor
    afs: bool
    nfe: int
    t_eps: float
    T: float
    start: str
    train_error: float
    start_error: float
    val_error: float
    val_start_error: float
    evaluations: int
    seconds: float
    num_samples: int
    process: str
    model: str = ""
    prediction: str = ""
    shape: list[int] = field(default_factory=list)
    reference: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    method: str = "dpmpp_2m"
    order: int = 2
    corrector: bool = False

    @classmethod
    def base(cls, grid: torch.Tensor, afs: bool = True, history: int | None = None, method: str = "dpmpp_2m",
             order: int = 2, corrector: bool | None = None) -> "Calibration":
        """The base method on ``grid`` (float64 times from T down to t_eps) as a calibration with zero corrections,
        bound to no process and no model (default: DPM-Solver++(2M) with the DDIM first step(s)): the start of
        `calibrate`'s fit, and a way to run that base with the calibrated solver. ``history`` defaults to
        max(2, order); ``corrector`` to True for vab (as `vab`'s default, corrector="start")."""
        history = max(2, int(order)) if history is None else int(history)
        corrector = (method == "vab") if corrector is None else bool(corrector)
        check_method(method, order, history, corrector)
        grid = check_grid(torch.as_tensor(grid, dtype=torch.float64).detach().cpu(), float(grid[0]))
        steps = len(grid) - 1
        if steps < 1 + int(bool(afs)):
            raise ValueError(f"a base calibration needs at least {1 + int(bool(afs))} steps")
        return cls(grid=grid, coefficients=torch.zeros(steps, 2 * history, dtype=torch.float64), afs=bool(afs),
                   nfe=steps - int(bool(afs)), t_eps=float(grid[-1]), T=float(grid[0]), start="base",
                   train_error=math.nan, start_error=math.nan, val_error=math.nan, val_start_error=math.nan,
                   evaluations=0, seconds=0.0, num_samples=0, process="", method=method, order=int(order),
                   corrector=corrector)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    @property
    def history(self) -> int:
        return self.coefficients.shape[1] // 2

    def __repr__(self) -> str:
        return (f"Calibration(nfe={self.nfe}, method={self.method!r}, order={self.order}, afs={self.afs}, "
                f"start={self.start!r}, train_error={self.train_error:.3e} "
                f"(start {self.start_error:.3e}), val_error={self.val_error:.3e} (start {self.val_start_error:.3e}), "
                f"evaluations={self.evaluations}, seconds={self.seconds:.1f}, process={self.process})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [float(t) for t in self.grid.tolist()]
        d["coefficients"] = [[float(c) for c in row] for row in self.coefficients.tolist()]
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        d = dict(d)
        if d.pop("format", _FORMAT) != _FORMAT:
            raise ValueError("a calibration saved in another format")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown fields in a saved calibration: {unknown}")
        d["grid"] = check_grid(torch.tensor(d["grid"], dtype=torch.float64), float(d["T"]))
        d["coefficients"] = torch.tensor(d["coefficients"], dtype=torch.float64)
        cal = cls(**d)
        cal.check()
        return cal

    def check(self) -> None:
        """ValueError if the record disagrees with itself (an edited file is refused, never run as it is)."""
        c = self.coefficients
        if c.ndim != 2 or c.shape[0] != self.steps or c.shape[1] < 2 or c.shape[1] % 2:
            raise ValueError(f"coefficients of shape {tuple(c.shape)} do not fit {self.steps} steps "
                             "(expected [steps, 2 * history])")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("the coefficients contain non-finite values")
        check_method(self.method, self.order, self.history, self.corrector)
        if self.nfe != self.steps - int(bool(self.afs)):
            raise ValueError(f"{self.steps} steps{' with afs' if self.afs else ''} take "
                             f"{self.steps - int(bool(self.afs))} evaluations, but it records nfe={self.nfe}")
        ends = ((float(self.grid[0]), self.T), (float(self.grid[-1]), self.t_eps))
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in ends):
            raise ValueError(f"its grid runs from {float(self.grid[0])} to {float(self.grid[-1])}, but it records "
                             f"T={self.T}, t_eps={self.t_eps}")

    def save(self, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
        """Write the record as JSON ``<directory>/<name>.json`` (see `calibration_dir`); returns the path."""
        return save_calibration(self, name, directory)


def calibration_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where calibrations are saved: ``directory``, else ``$SCORESOLVE_CALIBRATION_DIR``, else
    ``$XDG_CACHE_HOME/scoresolve/calibrations``."""
    return store_dir(directory, CALIBRATION_DIR_ENV, "calibrations")


def save_calibration(cal: Calibration, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Save ``cal`` under ``name`` (default: its own ``name``) as JSON in `calibration_dir`; returns the path."""
    name = check_name(name if name is not None else (cal.name or ""), "calibration")
    cal.name = name
    return write_json(calibration_dir(directory) / f"{name}.json", cal.to_dict())


def load_calibration(name: str, directory: str | os.PathLike | None = None) -> Calibration:
    """The calibration saved under ``name``; ``sample(..., calibration=name)`` does the same lookup."""
    return read_record(calibration_dir(directory), name, "calibration", CALIBRATION_DIR_ENV, Calibration.from_dict)


def resolve_calibration(cal: Any) -> Calibration:
    """A `Calibration` from a record or the name of a saved one; TypeError for anything else."""
    if isinstance(cal, str):
        return load_calibration(cal)
    if not isinstance(cal, Calibration):
        raise TypeError(f"calibration must be a Calibration (scoresolve.calibrate) or the name of a saved one, got "
                        f"{type(cal).__name__}")
    return cal


def calibrated_setup(cal: Any, nfe: int | None, steps: int | None, grid: Any, model: Any, sde: Any
                     ) -> tuple[Calibration, torch.Tensor, Any, Any]:
    """What `sample` runs for ``calibration=cal``: (the record, its grid, the model, the process), the process being
    ``sde`` or its `ode_view` (then the model is a copy bound to it), as the calibration was fitted. Refuses another
    budget, grid, process or model."""
    from ..fingerprint import model_fingerprint

    cal = resolve_calibration(cal)
    if grid is not None and not (torch.is_tensor(grid) and grid.shape == cal.grid.shape
                                 and torch.equal(grid.detach().to("cpu", torch.float64), cal.grid)):
        raise ValueError("a calibrated solve runs on its calibration's grid: pass no other grid=")
    if nfe is not None and int(nfe) != cal.nfe:
        raise ValueError(f"the calibration was fitted for nfe={cal.nfe}, got nfe={nfe} (calibrate for this budget)")
    if steps is not None and int(steps) != cal.steps:
        raise ValueError(f"the calibration has {cal.steps} steps, got steps={steps}")
    if cal.grid[0] > sde.T * (1 + 1e-9):
        raise ValueError(f"the calibration's grid starts at {float(cal.grid[0])}, after the process's T = {sde.T}")
    if cal.process and repr(sde) != cal.process:  # "": a base calibration, bound to no process
        view = sde.ode_view() if hasattr(sde, "ode_view") else None
        if view is None or repr(view) != cal.process or model.prediction != "x0":
            raise ValueError(f"the calibration was fitted on {cal.process}, not on {sde!r}")
        model, sde = model.on(view), view
    if cal.model:
        fp = model_fingerprint(model)
        if fp is not None and fp != cal.model:
            raise ValueError("the calibration was fitted to another model (its fingerprint differs): calibrate this "
                             "model (scoresolve.calibrate)")
    return cal, cal.grid.clone(), model, sde


def _prepare(process: Any, options: dict, steps: int) -> dict:
    require_ode("calibrated", process)
    cal = options["calibration"]
    if cal is None:
        raise ValueError("solver 'calibrated' needs calibration= (a Calibration from scoresolve.calibrate, or the "
                         "name of a saved one)")
    cal = options["calibration"] = resolve_calibration(cal)
    if options["afs"] is not None and bool(options["afs"]) != cal.afs:
        raise ValueError(f"the calibration was fitted with afs={cal.afs}")
    options["afs"] = cal.afs
    if steps != cal.steps:
        raise ValueError(f"the calibration has {cal.steps} steps, the grid {steps}")
    if cal.method == "zeab" and not math.isfinite(float(process.sde.log_snr(torch.tensor(float(cal.grid[0])),
                                                                            check=False))):
        raise ValueError("method 'zeab' needs a finite log-SNR at the grid's start (alpha > 0)")
    options["rows"] = tuple(tuple(float(c) for c in row) for row in cal.coefficients.tolist())
    options["method"] = (cal.method, cal.order, cal.corrector)
    return options


def calibrated_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """One step of the calibrated sampler (module docstring): 1 NFE (none at i = 0 with afs)."""
    rows, afs, (method, order, corrector) = run.options["rows"], run.options["afs"], run.options["method"]
    hist_x = run.memory["x"] = ([x] + run.memory.get("x", []))[: len(rows[0]) // 2]
    hist_d = run.memory["d"] = ([run.x0(x, i)] + run.memory.get("d", []))[: len(hist_x)]
    wx, wd = run.per_grid(("calibrated", rows, afs, method, order, corrector), lambda: [
        step_weights(run.alpha, run.sigma, run.lam, j, rows[j], afs, method, order, corrector)
        for j in range(run.steps)])[i]
    out = hist_x[0] * wx[0]
    for j in range(len(wx)):
        if j:
            out.add_(hist_x[j], alpha=wx[j])
        out.add_(hist_d[j], alpha=wd[j])
    return out


register(GridSolver("calibrated", step=calibrated_step, options={"calibration": None, "afs": None},
                    required_options=("calibration",), prepare=_prepare, order=2, default_grid="logsnr",
                    starts_at_alpha0=True, requires=GAUSSIAN_KERNEL,
                    description="a multistep data-prediction sampler with grid and weights fitted to one model "
                                "(scoresolve.calibrate)"))
