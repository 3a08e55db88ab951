"""Log-likelihoods through the probability-flow ODE (instantaneous change of variables).

With v(x, t) = f(t) x - g(t)^2/2 score(x, t) the PF-ODE drift (`scoresolve.reverse.ReverseProcess` with s = 0),

    log p_{t_eps}(x) = log p_T(x(T)) + int_{t_eps}^T div v(x(t), t) dt           (Chen et al. 2018; Song et al. 2021)

and p_T is replaced by the prior. div v = D f(t) - g^2/2 div score: the linear part is exact
(`ReverseProcess.linear_divergence`), only the network part is estimated (`scoresolve.divergence`: Hutchinson's
estimator, probes fixed along the trajectory and sharing one network forward, or exactly). The augmented state
(x, delta log p) is integrated by the one per-sample adaptive integrator (`scoresolve.solvers.integrate`), in t or in
the log-SNR (`scoresolve.reverse.TimeVariable`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ._utils import bcast, check_batched, check_count
from .control_variate import GaussianControlVariate
from .divergence import (
    PROBES,
    check_exact_memory,
    check_probe_memory,
    draw_probes,
    exact_div_score,
    hutchinson_div_score,
)
from .reverse import TimeVariable
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers._registry import counted
from .solvers.controllers import DOPRI5_GAINS, Controller
from .solvers.errors import MaxStepsError, StepSizeUnderflowError
from .solvers.integrate import RKStepper, integrate, tableau_by_name

Divergence = Literal["hutchinson", "exact"]


def _user_divergence(divergence: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A callable divergence ``div(x, t) -> [batch]`` as ``[batch, 1]``, with grad enabled for it alone (it may use
    autograd) and its result detached."""
    with torch.enable_grad():
        return divergence(x, t).detach()[:, None]


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

    def __repr__(self) -> str:
        from .solvers._solution import count_stats, describe

        lp = self.log_prob.detach().double()
        se = "" if self.std_error is None or not lp.numel() else \
            f", std_error mean {float(self.std_error.double().mean()):.4g}"
        logp = (f"log_prob mean {float(lp.mean()):.6g} [{float(lp.min()):.6g}, {float(lp.max()):.6g}]"
                if lp.numel() else "log_prob []")
        return (f"LikelihoodResult({logp}{se}, latent={describe(self.latent)}, nfe={count_stats(self.nfe)}, "
                f"steps={count_stats(self.steps)}, rejected={count_stats(self.rejected)}, calls={self.calls})")


def log_likelihood(
    score: Callable | ScoreModel,
    sde: ForwardSDE,
    x: torch.Tensor,
    *,
    divergence: Divergence | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "hutchinson",
    probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float = 1e-5,
    time_variable: Literal["t", "logsnr"] | None = None,
    generator: torch.Generator | None = None,
    exact_chunk: int = 64,
    max_steps: int = 10_000,
    first_step: float | None = None,
    max_step: float | None = None,
    check_every: int = 8,
    compact: bool = False,
    controller: Controller | None = None,
    progress: bool = False,
    control_variate: GaussianControlVariate | None = None,
    probes_per: Literal["solve", "step"] = "solve",
) -> LikelihoodResult:
    """log p_{t_eps}(x) through the probability-flow ODE of ``sde`` with score ``score``.

    Args:
        score: callable ``score(x, t)`` or a [`ScoreModel`][scoresolve.ScoreModel] (any prediction type).
        sde: the forward SDE (the argument order of [`sample`][scoresolve.sample]; the old order
            ``log_likelihood(score, x, sde)`` still works, with a DeprecationWarning).
        x: data ``[batch, ...]``.
        divergence: ``"hutchinson"`` (unbiased, ``probes`` probes), ``"exact"`` (D VJPs per evaluation, for small
            D; ``exact_chunk`` VJPs are batched at a time), or a callable ``div(x, t) -> [batch]`` returning the
            exact divergence of the whole PF-ODE drift (analytic models).
        probes: number of Hutchinson probes, drawn once per solve from ``generator`` and fixed along the
            trajectory; all share one network forward per evaluation.
        probe: their kind, ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"`` (Rademacher probes mutually
            orthogonal, `scoresolve.divergence.draw_probes`; ``std_error`` treats probes as independent, which
            overstates the error of orthogonal ones, by sqrt((D - 1)/(D - K)) on average).
        solver: adaptive tableau (``dopri5``, ``tsit5``, ``bosh3``, ``vern6`` / ``vern7`` (Verner's 6(5) and 7(6)
            pairs, for tight tolerances), or ``dopri5_shampine``: torchdiffeq's dopri5,
            whose error estimate is 2/3 of Hairer's, i.e. ``dopri5`` at 1.5x the tolerances).
        rtol: relative tolerance, applied to x and to the accumulated divergence separately (per sample).
        atol: absolute tolerance, likewise.
        t_eps: start time (score_sde uses 1e-5); the result is log p_{t_eps}.
        time_variable: integrate in ``"t"`` or in the log-SNR ``"logsnr"``; None (default): t, or the log-SNR on
            a schedule that jumps in t (``sde.smooth_in_t`` False: a `DiscreteVPSDE`, whose beta(t) jumps at every
            knot 1/N and makes steps in t tiny, ~70x the NFE). At matched error in log p (the prior term
            included; ``benchmarks/likelihood_cost.py``), t needed 1.02x torchdiffeq's NFE on the trained digits
            U-Net (log-SNR 1.08x), 0.77-0.86x on smooth 2-16-D Gaussian mixtures (log-SNR 1.3-1.6x) and 0.92-0.97x
            on near-degenerate 64-256-D ones (log-SNR 0.84-0.90x). On interpolants with alpha(T) = 0 (rectified
            flow) only t exists: the drift and divergence are then the model's flow prediction and its divergence.
        max_steps: most step attempts of any sample (then `MaxStepsError`).
        first_step: initial step in the time variable (None: Hairer's heuristic, one extra evaluation).
        max_step: largest step in the time variable (None: no limit).
        check_every: most steps between the solver's termination checks (its only host-device synchronisations).
        compact: drop samples that have reached T from the batched network calls (see
            `scoresolve.solvers.integrate.integrate`); same results, less work when the samples need
            different numbers of steps. ``score`` must then be a function of (x, t) alone: per-sample conditioning
            captured in a closure (class labels, say) would no longer line up with the rows of x.
        controller: the step-size controller; default: the gains of Hairer's DOPRI5 code,
            `scoresolve.solvers.controllers.DOPRI5_GAINS` (0.78x the NFE of `PIController()` on the digits
            U-Net at rtol 1e-5, at an error float32 cannot resolve; no worse at matched error in float64).
        progress: a tqdm bar of the slowest sample's share of the span.
        control_variate: a [`GaussianControlVariate`][scoresolve.GaussianControlVariate] (Hutchinson only): each
            probe's e^T J e becomes e^T J e - e^T J_G e + tr J_G with J_G the Jacobian of the Gaussian's score (of its
            velocity on ``velocity_form`` processes), still unbiased, with far less variance when J is near J_G.
        probes_per: ``"solve"``: the Hutchinson probes are drawn once and fixed along the trajectory (delta log p
            = e^T (int J dt) e); ``"step"``: drawn afresh after every accepted step, so each step's integral has its
            own independent probes (still unbiased: a step's probes are drawn before it starts and held through its
            stages and retries). The variance then adds up step by step instead of through the integrated Jacobian's
            off-diagonal entries, which on the digits U-Nets is several times smaller; the first stage of each step
            is evaluated anew (no FSAL), +1 evaluation per step (~17% for dopri5). A sample's probes then depend on
            how many steps its batch-mates took from the shared generator.
    Every sample has its own adaptive steps, so its result does not depend on its batch-mates.
    """
    if torch.is_tensor(sde) and isinstance(x, ForwardSDE):
        warnings.warn("log_likelihood(score, x, sde) is deprecated: the order is now log_likelihood(score, sde, x), "
                      "as in sample(score, sde, x_T)", DeprecationWarning, stacklevel=2)
        sde, x = x, sde
    if not isinstance(sde, ForwardSDE):
        raise TypeError(f"sde must be a ForwardSDE, got {type(sde).__name__}")
    check_batched(x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    if not (0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}), got {t_eps}")
    probes = check_count(probes, "probes")
    finite_T = math.isfinite(float(sde.log_snr(torch.tensor(sde.T, dtype=torch.float64))))
    if time_variable is None:  # t, unless the schedule jumps in t (a discrete DDPM schedule): then the log-SNR
        time_variable = "logsnr" if (finite_T and not sde.smooth_in_t) else "t"
    elif time_variable == "logsnr" and not finite_T:
        raise ValueError(f"time_variable='logsnr' needs a finite log-SNR at T; {sde!r} has alpha(T) = 0: use 't'")
    time = TimeVariable(sde, time_variable, t_min=0.5 * t_eps)
    velocity = sde.velocity_form
    tableau = tableau_by_name(solver)  # an unknown solver fails before any work
    process, model, counter = counted(sde.probability_flow(ScoreModel.wrap(score, sde)))
    B, D = x.shape[0], math.prod(x.shape[1:])
    eps = None
    if callable(divergence):
        K = 1
    elif divergence == "exact":
        K = 1
        if exact_chunk < 1:
            raise ValueError(f"exact_chunk must be >= 1, got {exact_chunk}")
        check_exact_memory(x, exact_chunk)
    elif divergence == "hutchinson":
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
        K = int(probes)
        check_probe_memory(x, K)  # before the probes are drawn: refuse what the device cannot hold
        eps = draw_probes(x, K, probe, generator)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected 'hutchinson', 'exact' or a callable")
    if probes_per not in ("solve", "step"):
        raise ValueError(f"probes_per must be 'solve' or 'step', got {probes_per!r}")
    redraw = probes_per == "step"
    if redraw and eps is None:
        raise ValueError("probes_per='step' needs divergence='hutchinson'")
    stepper = RKStepper(tableau, rtol, atol, reuse_last_stage=not redraw)

    def refresh(args: tuple, accepted: torch.Tensor) -> tuple:
        """New probes for the rows whose step was accepted (``args``: the working rows' probes, [rows, K, ...])."""
        (e,) = args
        new = draw_probes(e[:, 0], K, probe, generator).transpose(0, 1)
        return (torch.where(bcast(accepted, new), new, e),)

    cv = control_variate
    if cv is not None:
        if not isinstance(cv, GaussianControlVariate):
            raise TypeError(f"control_variate must be a GaussianControlVariate, got {type(cv).__name__}")
        if eps is None:
            raise ValueError("control_variate needs divergence='hutchinson'")
        if tuple(x.shape[1:]) != cv.event_shape:
            raise ValueError(f"control_variate has event shape {cv.event_shape}, x has {tuple(x.shape[1:])}")

    def func(u: torch.Tensor, state, *probe):
        """(dx/du, d delta/du) at u with one network forward; ``probe``: the Hutchinson probes of these rows,
        [B, K, ...]."""
        xt, _ = state
        t = time.t(u)
        if velocity:  # v is the model's flow prediction; its divergence is estimated whole (f diverges at alpha = 0)
            if callable(divergence):
                v, div = model.flow(xt, t), _user_divergence(divergence, xt, t)
            elif divergence == "exact":
                v, div = exact_div_score(model.flow, xt, t, exact_chunk)
                div = div[:, None]
            else:
                v, div = hutchinson_div_score(model.flow, xt, t, probe[0].transpose(0, 1))
                if cv is not None:
                    div = div + cv.correction(probe[0].transpose(0, 1), t, sde, velocity=True)
        else:
            if callable(divergence):
                s, div = model(xt, t), _user_divergence(divergence, xt, t)  # the whole drift's divergence
            else:
                if divergence == "exact":
                    s, ds = exact_div_score(model, xt, t, exact_chunk)
                    ds = ds[:, None]
                else:
                    s, ds = hutchinson_div_score(model, xt, t, probe[0].transpose(0, 1))
                    if cv is not None:
                        ds = ds + cv.correction(probe[0].transpose(0, 1), t, sde)
                div = process.linear_divergence(t, D)[:, None] - process.score_coef(t)[:, None] * ds
            v = process.drift_from_score(xt, t, s)
        if time.name == "t":
            return v, div
        dt_du = time.dt_du(t)
        return bcast(dt_du, xt) * v, dt_du[:, None] * div

    # no autograd graph outside the divergence's own VJPs (which enable grad locally): nothing is kept across steps
    with torch.no_grad():
        delta0 = torch.zeros(B, K, dtype=x.dtype, device=x.device)
        try:
            res = integrate(
                stepper, func, (x.detach(), delta0), time.u(t_eps), time.u(sde.T),
                controller=DOPRI5_GAINS if controller is None else controller, max_steps=max_steps,
                first_step=first_step, max_step=max_step, check_every=check_every,
                progress="log_likelihood" if progress else False,
                name=f"log_likelihood[{solver}]", args=() if eps is None else (eps.transpose(0, 1),),  # [B, K, ...]
                compact=compact, refresh=refresh if redraw else None,
            )
        except (MaxStepsError, StepSizeUnderflowError) as err:
            if time.name == "t":
                raise
            raise err.at_times(time.t_host(err.times)) from None
        z, delta = res.x
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
