"""Singlestep exponential integrators in log-SNR: DDIM (with eta), DPM-Solver-2 and DPM-Solver-3.

Every forward SDE here has x_t = alpha(t) x0 + sigma(t) eps and a drift linear in x, with f = d log alpha/dt and
g^2 = d sigma^2/dt - 2 f sigma^2. With lambda = log(alpha/sigma) and score = -eps/sigma the probability-flow ODE is

    dx/dlambda = (d log alpha/dlambda) x - sigma eps(x)        (noise prediction, DPM-Solver, Lu et al. 2022)
    dx/dlambda = (d log sigma/dlambda) x + alpha x0(x)          (data prediction, DPM-Solver++, Lu et al. 2022b)

whose linear parts are integrated exactly: from s to t (h = lambda_t - lambda_s > 0)

    x_t = (alpha_t/alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps dlambda
        = (sigma_t/sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0 dlambda.

Nothing assumes alpha^2 + sigma^2 = 1, so the same code serves VP, sub-VP, VE, EDM, cosine and discrete schedules.
The methods differ in how they approximate eps or x0 along lambda: from extra evaluations inside the step
(singlestep, here) or from earlier steps (multistep, `scoresolve.solvers.multistep`). With tau = lambda - lambda_s,

    int_0^h e^{-(h - tau)} tau^k / k! dtau = h^{k+1} phi_{k+1}(-h),    phi_1(z) = (e^z - 1)/z,
    phi_{k+1}(z) = (phi_k(z) - 1/k!)/z.

Step coefficients are Python floats from the float64 host grid (`scoresolve.solvers._grid.GridRun`), applied to x in
x's dtype: no host-device synchronisation inside the loop.

``eta`` means one thing in every stochastic sampler of the package: the constant c of s = c g, the member of the
reverse family (0: the probability-flow ODE, 1: the reverse SDE / ancestral sampling).
"""

from __future__ import annotations

import math

import torch

from ..reverse import ReverseProcess
from ._grid import GridRun
from ._registry import GAUSSIAN_KERNEL, GridSolver, register, require_ode


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j + k)!  (phi_0 = exp); the exponential-integrator weight functions."""
    if abs(z) < 0.5:  # series: the recursion below cancels catastrophically for small z
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while abs(term) > 1e-18 * max(abs(total), 1e-300):
            total += term
            j += 1
            term *= z / (j + k)
        return total
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def noise_level(name: str, process: ReverseProcess, eta: float | None, default: float) -> float:
    """The sampler's ``eta`` = c of s = c g: given, or read from the process's constant diffusion scale."""
    c = process.constant_scale
    if c is None:
        raise ValueError(f"solver {name!r} takes a constant noise level eta, not a time-dependent diffusion s(t); "
                         "use an SDE solver such as 'euler_maruyama' for that")
    if c == 0.0:
        eta = default if eta is None else float(eta)
    elif eta is None:
        eta = c
    elif not math.isclose(float(eta), c, rel_tol=1e-12):
        raise ValueError(f"solver {name!r}: eta={eta} contradicts the process's diffusion scale {c}; give one of them")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    return float(eta)


# ---------------------------------------------------------------------------------------------------------------
# DDIM = DPM-Solver-1 (with DDIM's eta); reverse_diffusion and DDPM ancestral sampling are this step too
# ---------------------------------------------------------------------------------------------------------------
def ddim_update(run: GridRun, x: torch.Tensor, x0: torch.Tensor, i: int, noise_frac: float,
                noise_std: float | None = None) -> torch.Tensor:
    """DDIM's step t = ts[i] -> s = ts[i + 1] given the data prediction x0 (Song et al. 2021a, eq. (12)/(16)):

        x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + noise_std z,     sigma_eta = noise_frac sigma_s,

    written in log-SNR form (rho = sqrt(1 - noise_frac^2), h = lambda_s - lambda_t):
    x_s = rho (sigma_s/sigma_t) x - alpha_s (e^{-h} rho - 1) x0 + noise_std z. ``noise_std`` defaults to sigma_eta.
    noise_frac = sqrt(1 - e^{-2h}) is the DDPM posterior q(x_s | x_t, x0) (eta = 1).
    """
    cx, c0 = ddim_weights(run, i, noise_frac)
    return _ddim_noise(run, x, torch.add(x * cx, x0, alpha=c0), i, noise_frac, noise_std)


def ddim_weights(run: GridRun, i: int, noise_frac: float) -> tuple[float, float]:
    """(cx, c0) of DDIM's mean x_s = cx x + c0 x0 (`ddim_update`)."""
    a, s, lam = run.alpha, run.sigma, run.lam
    h = lam[i + 1] - lam[i]
    log_rho = 0.5 * math.log1p(-noise_frac**2) if noise_frac < 1 else -math.inf
    return math.exp(log_rho) * s[i + 1] / s[i], -a[i + 1] * math.expm1(log_rho - h)


def _ddim_noise(run: GridRun, x: torch.Tensor, x_new: torch.Tensor, i: int, noise_frac: float,
                noise_std: float | None) -> torch.Tensor:
    std = noise_frac * run.sigma[i + 1] if noise_std is None else noise_std
    if std > 0:
        x_new = x_new.add_(run.normal(x, i), alpha=std)
    return x_new


def ddim_step_from(run: GridRun, x: torch.Tensor, i: int, noise_frac: float,
                   noise_std: float | None = None) -> torch.Tensor:
    """`ddim_update` with the data prediction at grid point i folded into the mean's weights (two kernels)."""
    cx, c0 = ddim_weights(run, i, noise_frac)
    return _ddim_noise(run, x, run.x0_combination(x, i, cx, c0), i, noise_frac, noise_std)


def posterior_fraction(run: GridRun, i: int) -> float:
    """sqrt(1 - e^{-2h}): std of the DDPM posterior over sigma_s (and of the forward transition over sigma_t)."""
    return math.sqrt(-math.expm1(-2 * (run.lam[i + 1] - run.lam[i])))


def ddim_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DDIM (Song et al. 2021a); with eta = 0 it is DPM-Solver-1 (Lu et al. 2022). Order 1, 1 NFE/step.

    eta > 0 adds DDIM's noise sigma_eta = eta sigma_t sqrt(1 - e^{-2h}) (capped at sigma_t), the std of the DDPM
    posterior q(x_t | x_s, x0) for eta = 1. A process with constant diffusion scale c means eta = c (eta = 1 is the
    ancestral DDPM sampler, which shares the reverse SDE's marginals).

    ``variance`` keeps DDIM(eta)'s mean and replaces its noise variance (`reverse_std`): ``"beta"``,
    ``"beta_tilde"`` or ``"analytic"`` (Analytic-DDIM / Analytic-DDPM of Bao et al. 2022, with ``moments``; with
    eta = 0 the mean is the deterministic DDIM step's and the analytic noise is still added).
    """
    eta = run.options["eta"]
    return ddim_step_from(run, x, i, min(eta * posterior_fraction(run, i), 1.0), reverse_std(run, i, eta))


REVERSE_VARIANCE_OPTIONS = {"variance": None, "moments": None, "data_range": None, "last_std": None}
"""Options of the samplers with a choice of reverse variance (ddim, reverse_diffusion): see `reverse_std`."""


def check_reverse_variance(name: str, options: dict, allowed: tuple) -> dict:
    """Validate the reverse-variance options of solver ``name`` (``variance`` one of ``allowed``)."""
    from ..reverse_variance import MomentEstimate, _check_range, load_moments

    kind = options["variance"]
    if kind not in allowed:
        raise ValueError(f"solver {name!r}: variance must be one of {allowed}, got {kind!r}")
    moments = options.get("moments")
    if isinstance(moments, str):  # a saved estimate by name, like grid="tuned:<name>"
        moments = options["moments"] = load_moments(moments)
    if kind == "analytic" and not isinstance(moments, MomentEstimate):
        raise ValueError(f"solver {name!r}: variance='analytic' needs moments= (a MomentEstimate, see "
                         f"scoresolve.estimate_moments), got {type(moments).__name__}")
    _check_range(options.get("data_range"))
    last = options.get("last_std")
    if last is not None and not (math.isfinite(float(last)) and float(last) >= 0):
        raise ValueError(f"last_std must be a finite number >= 0, got {last}")
    return options


def reverse_std(run: GridRun, i: int, eta: float) -> float | None:
    """The noise std of grid step i from the option ``variance`` (None: the sampler's own): ``"beta"`` (the forward
    transition's variance), ``"beta_tilde"`` (the posterior's), ``"analytic"`` (Analytic-DPM's optimum for the
    DDIM(eta) family, from the option ``moments`` at the step's start time and the optional ``data_range``
    bound; `scoresolve.reverse_variance`). ``last_std`` caps the std of the last step (Bao et al.'s clipping of
    the last noisy step for sampling). Computed once per solve on the host grid."""
    kind = run.options.get("variance")
    if kind is None:
        return None
    stds = run.memory.get("reverse_std")
    if stds is None:
        from ..reverse_variance import reverse_variance

        t, s = run.t64[:-1], run.t64[1:]
        v = reverse_variance(kind, run.sde, t, s, eta=eta, moments=run.options.get("moments"),
                             data_range=run.options.get("data_range"))
        stds = torch.sqrt(v).tolist()
        if run.options.get("last_std") is not None:
            stds[-1] = min(stds[-1], float(run.options["last_std"]))
        run.memory["reverse_std"] = stds
    return stds[i]


def _ddim_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    eta = noise_level("ddim", process, options["eta"], 0.0)
    check_reverse_variance("ddim", options, (None, "beta", "beta_tilde", "analytic"))
    return {**options, "eta": eta}


# ---------------------------------------------------------------------------------------------------------------
# singlestep DPM-Solver (noise prediction)
# ---------------------------------------------------------------------------------------------------------------
def dpm_solver_2_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Singlestep DPM-Solver-2 (Lu et al. 2022, Algorithm 1), noise prediction. Order 2, 2 NFE/step.

    The intermediate point sits at lambda_s + r1 h (default r1 = 1/2, the midpoint in log-SNR). Weights from
    `_dpm2_plan`: u1 and x_t are weighted sums of x and the two network outputs, three fused multiply-adds in all.
    """
    warn_coarse_singlestep(run, i)
    t1, ax, a0, wx, w0, w1 = _dpm2_plan(run)[i]
    o0 = run.eps(x, i) if i == 0 and run.options.get("afs") else run.predict_parts(x, i, "eps")[0]
    u1 = torch.add(x * ax, o0, alpha=a0)
    o1 = run.predict_parts(u1, None, "eps", t=t1)[0]
    return torch.add(x * wx, o0, alpha=w0).add_(o1, alpha=w1)


def _dpm2_plan(run: GridRun) -> list[tuple[float, ...]]:
    """Per step i, (t1, ax, a0, wx, w0, w1) of `dpm_solver_2_step`: u1 = ax x + a0 o0 and x_t = wx x + w0 o0 + w1 o1
    for the outputs o0, o1 of `GridRun.predict_parts` (noise prediction e = cx x + cp o), host floats kept per grid.

    Algorithm 1: u1 = (a_1/a_s) x - s_1 (e^{h1} - 1) e0 (DPM-Solver-1 to s1), x_t = (a_t/a_s) x - s_t (e^h - 1) e0
    - s_t/(2 r1) (e^h - 1) (e1 - e0), with e0 = cx0 x + cp0 o0 and e1 = cx1 u1 + cp1 o1 folded in.
    """
    plan = run.memory.get("dpm2_plan")
    if plan is not None:
        return plan
    r1, afs = run.options["r1"], bool(run.options.get("afs"))
    pts = inner_points(run, (r1,))[0]  # (prefetches the noise-prediction coefficients there)

    def build() -> list[tuple[float, ...]]:
        a, s, lam = run.alpha, run.sigma, run.lam
        grid = run.grid_coefficients("eps") if run.affine else None
        rows = []
        for i in range(run.steps):
            t1, a1, s1, l1 = pts[i]
            h, h1 = lam[i + 1] - lam[i], l1 - lam[i]
            cx0, cp0 = (0.0, 1.0) if grid is None or (i == 0 and afs) else grid[i]
            cx1, cp1 = run.coefficients_at("eps", t1) if grid is not None else (0.0, 1.0)
            k1 = s1 * math.expm1(h1)
            ax, a0 = a1 / a[i] - k1 * cx0, -k1 * cp0
            c = s[i + 1] * math.expm1(h)
            c1 = c * h / (2 * h1)
            wx = a[i + 1] / a[i] + (c1 - c) * cx0 - c1 * cx1 * ax
            w0 = (c1 - c) * cp0 - c1 * cx1 * a0
            rows.append((t1, ax, a0, wx, w0, -c1 * cp1))
        return rows

    plan = run.memory["dpm2_plan"] = run.per_grid(
        ("dpm2_plan", r1, afs, run.affine, run.model.prediction, run.model.sde, run.process.constant_scale,
         run.ts.dtype), build)
    return plan


def dpm_solver_3_step(run: GridRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Singlestep DPM-Solver-3 (Lu et al. 2022, Algorithm 2), noise prediction. Order 3, 3 NFE/step.

    Intermediate points at lambda_s + r1 h and lambda_s + r2 h (default 1/3, 2/3).
    """
    warn_coarse_singlestep(run, i)
    a, s, lam = run.alpha, run.sigma, run.lam
    r1, r2 = run.options["r1"], run.options["r2"]
    h = lam[i + 1] - lam[i]
    first, second = inner_points(run, (r1, r2))
    t1, a1, s1, l1 = first[i]
    t2, a2, s2, l2 = second[i]
    h1, h2 = l1 - lam[i], l2 - lam[i]
    e0 = run.eps(x, i)
    u1 = torch.add(x * (a1 / a[i]), e0, alpha=-s1 * math.expm1(h1))
    e1 = run.eps_at(u1, t1)
    # Algorithm 2: u2 = (a_2/a_s) x - s_2 (e^{r2 h} - 1) e0 - s_2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) D1, D1 = e1 - e0
    c1 = s2 * (h2 / h1) * (math.expm1(h2) / h2 - 1)
    u2 = torch.add(x * (a2 / a[i]), e0, alpha=c1 - s2 * math.expm1(h2)).add_(e1, alpha=-c1)
    e2 = run.eps_at(u2, t2)
    # x_t = (a_t/a_s) x - s_t (e^h - 1) e0 - (s_t/r2) ((e^h - 1)/h - 1) D2, D2 = e2 - e0
    c2 = s[i + 1] * (h / h2) * (math.expm1(h) / h - 1)
    return torch.add(x * (a[i + 1] / a[i]), e0, alpha=c2 - s[i + 1] * math.expm1(h)).add_(e2, alpha=-c2)


def inner_points(run: GridRun, rs: tuple[float, ...]) -> list[list[tuple[float, float, float, float]]]:
    """For each r in ``rs``, (t, alpha, sigma, lambda) at lambda_i + r h_i for every step i of the grid: computed
    once per grid on the host (`GridRun.per_grid`), with the noise-prediction coefficients there (`GridRun.prefetch`)
    on the first step of each solve."""
    pts = run.memory.get("inner")
    if pts is None:
        lam = run.lam

        def build() -> list[list[tuple[float, float, float, float]]]:
            return [run.at_lambdas([lam[k] + r * (lam[k + 1] - lam[k]) for k in range(run.steps)]) for r in rs]

        pts = run.memory["inner"] = run.per_grid(("inner_points", rs), build)
        run.prefetch("eps", [p[0] for row in pts for p in row], key=("inner_points", rs))
    return pts


COARSE_LOGSNR_STEP = 1.5
"""Largest log-SNR step of singlestep DPM-Solver-2/3 without a warning (see `warn_coarse_singlestep`)."""


def warn_coarse_singlestep(run: GridRun, i: int) -> None:
    """Warn once per solve (at step 0) when the grid has a log-SNR step h > `COARSE_LOGSNR_STEP`.

    Noise-prediction singlestep steps multiply the difference of two network evaluations by sigma_t (e^h - 1)/r:
    exact for an analytic score, but a trained network's error differences are amplified too. Measured on an
    eps-MLP trained on 2-D data (VP, t_eps = 1e-3; RMS error against the same model's dopri5 at rtol 1e-7,
    samples of scale 1): at 10 NFE on the default grid dpm_solver_2 4.5 and dpm_solver_3 22.6 (largest h 2.9
    and 4.0), while dpmpp_2m gave 0.08; dpm_solver_2 fell to 0.10 at h = 1.39 (30 NFE), dpm_solver_3 to 0.05 at
    h = 1.33 (50 NFE).
    """
    if i != 0 or run.steps < 1:
        return
    lam = run.lam[run.start:]
    h = max((b - a for a, b in zip(lam[:-1], lam[1:])), default=0.0)
    if h > COARSE_LOGSNR_STEP:
        import warnings

        warnings.warn(
            f"{run.name}: log-SNR steps up to {h:.2f} (> {COARSE_LOGSNR_STEP}); singlestep noise-prediction steps "
            "amplify a trained network's errors by ~e^h at this coarseness. Start with the default sampler (vab), "
            "dpmpp_2m or unipc, or give dpm_solver_2/3 more steps (nfe >= 30 / 50 on the default grid)", UserWarning,
            stacklevel=2)


def _dpm2_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    require_ode("dpm_solver_2", process)
    if not 0 < options["r1"] < 1:
        raise ValueError(f"r1 must lie in (0, 1), got {options['r1']}")
    return options


def _dpm3_prepare(process: ReverseProcess, options: dict, steps: int) -> dict:
    require_ode("dpm_solver_3", process)
    if not 0 < options["r1"] < options["r2"] < 1:
        raise ValueError(f"need 0 < r1 < r2 < 1, got r1={options['r1']}, r2={options['r2']}")
    return options


# Default grid "quadratic" (uniform in sqrt(t)): on VP with t_eps = 1e-3 (64-D, 8-component mixtures) it gave the
# lowest ODE error at 10 and 20 NFE for every exponential method (benchmarks/work_precision.py).
register(GridSolver("ddim", step=ddim_step, options={"eta": None, "afs": False, **REVERSE_VARIANCE_OPTIONS},
                    prepare=_ddim_prepare,
                    order=1,
                    default_grid="quadratic", stochastic=True, noise_option="eta", starts_at_alpha0=True,
                    requires=GAUSSIAN_KERNEL,
                    description="DDIM = DPM-Solver-1 (eta > 0: stochastic DDIM)"))
register(GridSolver("dpm_solver_2", step=dpm_solver_2_step, options={"r1": 0.5}, prepare=_dpm2_prepare,
                    evals_per_step=2, order=2, default_grid="quadratic", requires=GAUSSIAN_KERNEL,
                    description="singlestep DPM-Solver-2 (noise prediction)"))
register(GridSolver("dpm_solver_3", step=dpm_solver_3_step, options={"r1": 1 / 3, "r2": 2 / 3},
                    prepare=_dpm3_prepare, evals_per_step=3, order=3, default_grid="quadratic",
                    requires=GAUSSIAN_KERNEL,
                    description="singlestep DPM-Solver-3 (noise prediction)"))
