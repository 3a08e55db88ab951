"""The sampler ``sample(score, sde, x_T, nfe=N)`` runs when the caller names none: chosen by measurement.

``benchmarks/peers_few_step.py`` draws Gaussian mixtures at random (dimension 8-256, 2-32 components, random
spreads, scales and weights) under VP, sub-VP, VE and rectified flow and compares every configuration of ours with
every sampler of azula, k-diffusion and diffusers on the same ODE. On the problems the choice was made on (seeds
1000-1023, none of the reported ones), the best fixed configuration at 5-20 NFE was vAB (Adams-Bashforth on the
velocity eps - x0 in u = sigma / (alpha + sigma), `scoresolve.solvers.adams`, its warm-up steps corrected) on a
``flow:P`` grid in u (`default_grid`), of order 2 below 8 NFE, 3 below 20, 4 from 20 on; at 30-100 NFE order 4 on
these grids has up to 360x lower error than the former default (DPM-Solver++(2M) on the quadratic grid). The grid
depends on the log-SNR alone, so the choice carries over to any process with a Gaussian kernel (discrete DDPM,
cosine, EDM, interpolants).

That holds for models whose prediction carries the data or the velocity (``x0``, ``v``, ``flow``: the mixtures'
exact x0, the digits flow U-Net, where vAB has 1.0-2.1x lower error than DPM-Solver++(2M) at 5-50 NFE). A network
predicting the noise (``eps``, or a ``score``) gives x0 = (x - sigma eps) / alpha, whose error is the network's
times sigma / alpha (about 150 at T on VP): the velocity eps - x0 carries it with weight 1, and the Adams-Bashforth
history spreads it over the next steps, while the data-prediction exponential integrators weigh x0 by alpha. On the
digits VP U-Net (eps) vAB had 3-100x the error of DPM-Solver++(2M) on its quadratic grid at 5-50 NFE, so eps and
score models keep that (the former default) below 20 NFE, and from 20 on get DEIS-4 on the noise prediction
(`eps_sampler`: 2-9x lower error there).

A process that lacks what this choice needs (`scoresolve.Process` capabilities: vAB, DPM-Solver++ and the ``flow:P``
grids need ``gaussian_kernel``)
gets it on its `ode_view` when it has one and the model predicts x0 (`PFGMPP`: the PF-ODE in x0 is EDM's; on a
16-point cloud in 4-D under PFGM++ D = 128, two clouds, 128 and 256 samples, vAB there had 0.001x / 0.03-0.10x /
0.08-0.51x the RMS error of the reference's sampler, Heun on its rho = 7 grid, at 5 / 10 / 20 NFE), else Euler
(`FALLBACK`) on its default grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..process import Process

DEFAULT_SOLVER = "vab"
EPS_SOLVER = "dpmpp_2m"
EPS_HIGH_NFE = 20
"""From this budget on, eps and score models get DEIS's exponential Adams-Bashforth on the noise prediction in
log(sigma / alpha) (`deis`, ``basis="log_rho"``, order 4; azula's zEAB4) on the log-SNR grid (`eps_sampler`)."""
FALLBACK = ("euler",)
"""Solvers needing nothing but the ODE, in order of preference, for a process the default does not fit and that has no
`ode_view` (on the PFGM++ point cloud above, without the view, on PFGM++'s own rho = 7 grid: Euler 0.18 / 0.12 /
0.092 RMS error at 10 / 20 / 40 NFE, Heun 1.4 / 0.099 / 0.067, RK4 76 / 0.19 / 0.066)."""
LOG_SNR_GRIDS = ("logsnr", "karras", "flow")
"""Named grids built from the log-SNR (``flow:P`` included): they require the capability ``gaussian_kernel``."""


def default_grid(nfe: int) -> str:
    """The flow:P grid for a budget: uniform in u below 8 NFE, P = 1.5 (denser near the data) from 8 on (on 24
    random mixtures, seeds 1000-1023, the geometric-mean error of P = 1.5 relative to P = 1 was 1.7 at 5 NFE and
    0.83, 0.76, 0.93 at 8, 10, 20; per process the preference scattered with the problems drawn, so one rule serves
    every process)."""
    return "flow:1" if nfe < 8 else "flow:1.5"


def default_order(nfe: int) -> int:
    """vAB's order for a budget of ``nfe`` evaluations (see the module docstring)."""
    return 2 if nfe < 8 else (3 if nfe < 20 else 4)


def eps_sampler(nfe: int, options: dict[str, Any], finite_log_snr: bool) -> tuple[str, dict[str, Any], str | None]:
    """The default for eps and score models: DPM-Solver++(2M) on its default grid below `EPS_HIGH_NFE`, DEIS-4
    (log rho basis) on the log-SNR grid from there on where the log-SNR is finite at T (not on rectified flow).

    Measured (`benchmarks/peers_few_step.py --no-peers`, errors against dopri5 at 1e-8 / 1e-9): on the digits VP
    U-Net (eps, 16 samples, RMS), DEIS-4 on the log-SNR grid had 0.45x / 0.63x / 0.49x the error of DPM-Solver++(2M)
    at 20 / 30 / 50 NFE, but 1.1-2.0x at 5-15; on 9 random mixtures under VP, sub-VP and VE (seeds 1000-1011, three
    per process, 64 samples), 2.5-9x lower geometric-mean median-sample error at 15-30 NFE (RMS: 1.0-13x)."""
    if nfe >= EPS_HIGH_NFE and finite_log_snr:
        return "deis", {"order": 4, "basis": "log_rho", **options}, "logsnr"
    return EPS_SOLVER, dict(options), None


def default_sampler(nfe: int, options: dict[str, Any], prediction: str, finite_log_snr: bool = True
                    ) -> tuple[str, dict[str, Any], str | None]:
    """(solver, options, grid) of ``sample`` when no solver is named, for a model with this ``prediction``; the
    caller's options win; grid None: the solver's default grid. ``finite_log_snr``: the process's log-SNR is finite
    at T (alpha(T) > 0)."""
    if prediction in ("eps", "score"):
        return eps_sampler(nfe, options, finite_log_snr)
    return DEFAULT_SOLVER, {"order": default_order(nfe), **options}, default_grid(nfe)


def calibration_method(nfe: int, prediction: str, finite_log_snr: bool = True) -> tuple[str, int]:
    """(method, order) of the calibrated update's base (`scoresolve.solvers.calibrated.METHODS`) that `calibrate`
    starts from: the family of `default_sampler` at this budget (vAB for x0, v and flow models; DPM-Solver++(2M), and
    from `EPS_HIGH_NFE` on the exponential Adams-Bashforth of order 4 on the noise, for eps and score models)."""
    name, opts, _ = default_sampler(nfe, {}, prediction, finite_log_snr)
    if name == "deis":  # the exponential AB on the noise in log rho: the calibrated update's zEAB
        return "zeab", opts["order"]
    return name, opts.get("order", 2)


def requirements(solver: str, options: dict[str, Any], grid: Any) -> frozenset[str]:
    """The capabilities a deterministic run of ``solver`` with ``options`` on ``grid`` needs of the process."""
    from ._registry import REGISTRY

    need = set(REGISTRY[solver].requirements(options, 0.0))
    if isinstance(grid, str) and grid.split(":")[0] in LOG_SNR_GRIDS:
        need.add("gaussian_kernel")
    return frozenset(need)


def default_for_process(nfe: int, options: dict[str, Any], prediction: str, process: "Process"
                        ) -> tuple[str, dict[str, Any], str | None, "Process"]:
    """`default_sampler` on ``process``: (solver, options, grid, the process to solve on), that process being
    ``process`` itself or its `ode_view` (module docstring). The caller's options win; an option the fallback does
    not take is the caller's error, raised by the solver's own check."""
    finite = process.finite_log_snr_at_T
    name, opts, grid = default_sampler(nfe, options, prediction, finite)
    if not process.missing(requirements(name, opts, grid)):
        return name, opts, grid, process
    view = process.ode_view()
    if view is not None and prediction == "x0" and not view.missing(requirements(name, opts, grid)):
        return name, opts, grid, view
    for name in FALLBACK:
        if not process.missing(requirements(name, options, None)):
            return name, dict(options), None, process
    return DEFAULT_SOLVER, opts, grid, process  # nothing fits: the solver's check names what is missing
