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

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ._utils import bcast, check_batched, check_count, check_generator, check_t_eps
from .control_variate import GaussianControlVariate
from .divergence import (
    CallableDivergence,
    DivergenceEstimator,
    ExactDivergence,
    HutchinsonDivergence,
    check_exact_memory,
    check_probe_memory,
)
from .process import Process, check_capabilities
from .score import ScoreModel
from .solvers.controllers import DOPRI5_GAINS, Controller
from .solvers.integrate import RKStepper
from .solvers.ode import pf_ode_tableau, solve_pf_ode

Divergence = Literal["hutchinson", "exact"]


@dataclass
class LikelihoodResult:
    """Result of [`log_likelihood`][scoresolve.log_likelihood] (all ``[batch]`` unless stated).

    Attributes:
        log_prob: log p_{t_eps}(x) in nats (prior log-density of the latent + delta_log_prob).
        latent: z = x(T), shape like x.
        prior_log_prob: log prior(z).
        delta_log_prob: int_{t_eps}^T div v dt (the mean over probes for Hutchinson).
        nfe: network evaluations in which each sample was active (each one forward, and one VJP per probe except at
            the stages whose divergence the step does not use: one of dopri5's six per step, `RKStepper`'s
            ``quadrature``).
        calls: batched network calls of the whole solve (>= nfe.max(): finished samples ride along until the
            solver's next termination check, which on the CPU comes after every step: there = nfe.max()).
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
    sde: Process,
    x: torch.Tensor,
    *,
    divergence: Divergence | DivergenceEstimator | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "hutchinson",
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
    check_every: int | None = None,
    compact: bool = False,
    controller: Controller | None = None,
    progress: bool = False,
    control_variate: GaussianControlVariate | None = None,
    probes_per: Literal["solve", "step"] = "solve",
    norms: Literal["sample", "batch"] = "sample",
) -> LikelihoodResult:
    """log p_{t_eps}(x) through the probability-flow ODE of ``sde`` with score ``score``.

    Args:
        score: callable ``score(x, t)`` or a [`ScoreModel`][scoresolve.ScoreModel] (any prediction type).
        sde: the forward process (the argument order of [`sample`][scoresolve.sample]).
        x: data ``[batch, ...]``.
        divergence: ``"hutchinson"`` (unbiased, ``probes`` probes), ``"exact"`` (D VJPs per evaluation, for small
            D; ``exact_chunk`` VJPs are batched at a time), or a callable ``div(x, t) -> [batch]`` returning the
            exact divergence of the whole PF-ODE drift (analytic models), or an estimator object of
            `scoresolve.divergence` (`ExactDivergence`, `HutchinsonDivergence`, `CallableDivergence`; the next
            five arguments then do not apply).
        probes: number of Hutchinson probes, drawn once per solve from ``generator`` and fixed along the
            trajectory; all share one network forward per evaluation.
        probe: their kind, ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"`` (Rademacher probes mutually
            orthogonal, `scoresolve.divergence.draw_probes`; ``std_error`` treats probes as independent, which
            overstates the error of orthogonal ones, by sqrt((D - 1)/(D - K)) on average).
        solver: the adaptive PF-ODE solver, a registry name as in `sample` (``dopri5``, ``tsit5``, ``bosh3``,
            ``vern6`` / ``vern7`` (Verner's 6(5) and 7(6) pairs, for tight tolerances), or
            ``dopri5_shampine``: torchdiffeq's dopri5, whose error estimate is 2/3 of Hairer's, i.e. ``dopri5`` at
            1.5x the tolerances).
        rtol: relative tolerance, applied to x and to the accumulated divergence separately (per sample).
        atol: absolute tolerance, likewise.
        t_eps: the time nearest the data, as in `sample`: the solve runs between t_eps and T (here from t_eps up to
            T; score_sde uses 1e-5); the result is log p_{t_eps}.
        time_variable: integrate in ``"t"`` or in the log-SNR ``"logsnr"``; None (default): the one rule of
            `scoresolve.solvers.ode.choose_time_variable`, shared with `sample`: t, or the log-SNR on a schedule that
            jumps in t (``sde.smooth_in_t`` False: a `DiscreteVPSDE`, whose beta(t) jumps at every knot 1/N and makes
            steps in t tiny: 967 NFE in t against 113 in the log-SNR on an 8-D mixture at rtol 1e-5). At matched
            error in log p (the prior term included; ``benchmarks/likelihood_cost.py``), t needed 1.02x
            torchdiffeq's NFE on the trained digits U-Net (log-SNR 1.08x), 0.77-0.86x on smooth 2-16-D Gaussian
            mixtures (log-SNR 1.3-1.6x) and 0.92-0.97x on near-degenerate 64-256-D ones (log-SNR 0.84-0.90x). On
            interpolants with alpha(T) = 0 (rectified flow) only t exists: the drift and divergence are then the
            model's flow prediction and its divergence.
        max_steps: most step attempts of any sample (then `MaxStepsError`), as in `sample`.
        first_step: initial step in the time variable (None: Hairer's heuristic, one extra evaluation).
        max_step: largest step in the time variable (None: no limit).
        check_every: most steps between the solver's termination checks (its only host-device synchronisations);
            None: 8 on an accelerator, 1 on the CPU (`scoresolve.solvers.integrate.integrate`).
        compact: drop samples that have reached T from the batched network calls (see
            `scoresolve.solvers.integrate.integrate`); same results, less work when the samples need
            different numbers of steps. ``score`` must then be a function of (x, t) alone: per-sample conditioning
            captured in a closure (class labels, say) would no longer line up with the rows of x.
        controller: the step-size controller, as in `sample` (where the default is `PIController()`); default
            here: the gains of Hairer's DOPRI5 code,
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
        norms: ``"sample"`` (default): every sample has its own adaptive steps, so its result does not depend on its
            batch-mates. ``"batch"``: one step size for the whole batch, its error the RMS over the batch of the
            per-sample errors (torchdiffeq's and flow_matching's batch-shared steps; `scoresolve.solvers.integrate`):
            the batched calls equal the NFE of every sample, which is cheaper where a call costs the same whatever
            the batch (small networks, GPUs), dearer where its cost grows with the rows (``compact`` then evaluates
            fewer); docs/guide.md section 5 has the measured trade-off.
    """
    if not isinstance(sde, Process):
        raise TypeError(f"sde must be a forward process (a scoresolve.Process, e.g. a ForwardSDE), got "
                        f"{type(sde).__name__}; the argument order is log_likelihood(score, sde, x)")
    check_batched(x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    t_eps = check_t_eps(t_eps, sde.T)
    check_generator(generator, like=x if divergence == "hutchinson" else None)  # the probes are drawn on x's device
    probes = check_count(probes, "probes")
    need = set()
    if control_variate is not None or time_variable == "logsnr":
        need.add("gaussian_kernel")
    check_capabilities("log_likelihood" + (" with control_variate" if control_variate is not None else
                                           " with time_variable='logsnr'"), sde, need)
    tableau = pf_ode_tableau(solver)  # an unknown solver fails before any work
    velocity = sde.velocity_form
    estimator = _estimator(divergence, probes, probe, probes_per, exact_chunk, generator, control_variate, sde, x,
                           velocity)
    args = estimator.init_args(x)
    gaussian = sde.gaussian_kernel and not velocity and not estimator.whole_drift
    B, D = x.shape[0], math.prod(x.shape[1:])

    def field(process, model):
        """(dx/dt, d delta/dt) at t with one network forward: ``v, div = estimator(fn, x, t, *probes)``."""
        whole = model.flow if velocity else process.drift_at  # v whole (f diverges at alpha = 0 on velocity_form)

        def f(t: torch.Tensor, state, *probe, lean: bool = False):
            xt, delta = state
            # lean: a stage whose divergence the step does not use (`RKStepper`'s quadrature): the forward alone
            if not gaussian:
                return (whole(xt, t), torch.zeros_like(delta)) if lean else estimator(whole, xt, t, *probe)
            # the score's divergence; the linear part's is exact
            s, ds = (model(xt, t), None) if lean else estimator(model, xt, t, *probe)
            # once per evaluation, unchecked: the integrator's times lie in [t_eps, T] (a check reads t on the host)
            f_t, c_t = process.sde.f(t, check=False), process.score_coef(t, check=False)
            if lean:
                return bcast(f_t, xt) * xt - bcast(c_t, xt) * s, torch.zeros_like(delta)
            div = (D * f_t)[:, None] - c_t[:, None] * ds  # linear_divergence(t, D) - c div score
            return bcast(f_t, xt) * xt - bcast(c_t, xt) * s, div  # drift_from_score(xt, t, s)

        return f

    # no autograd graph outside the divergence's own VJPs (which enable grad locally): nothing is kept across steps
    with torch.no_grad():
        delta0 = torch.zeros(B, estimator.columns, dtype=x.dtype, device=x.device)
        process = sde.probability_flow(ScoreModel.wrap(score, sde))
        res = solve_pf_ode(
            process, (x.detach(), delta0), t_eps, sde.T,
            stepper=RKStepper(tableau, rtol, atol, reuse_last_stage=estimator.reuse_last_stage, quadrature=True),
            name=f"log_likelihood[{solver}]", time_variable=time_variable, field=field,
            controller=DOPRI5_GAINS if controller is None else controller, max_steps=max_steps,
            first_step=first_step, max_step=max_step, check_every=check_every,
            progress="log_likelihood" if progress else False, args=args, compact=compact, refresh=estimator.refresh,
            norms=norms,
        )
        z, delta = res.x
        prior = sde.prior_log_prob(z)
        log_probs = prior[:, None] + delta  # [B, K]
        K = estimator.columns
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
        calls=res.stats["network_calls"],
        rows=res.stats.get("rows", 0),
    )


def _estimator(divergence, probes, probe, probes_per, exact_chunk, generator, cv, sde, x,
               velocity) -> DivergenceEstimator:
    """The divergence estimator `log_likelihood`'s arguments name (module `scoresolve.divergence`)."""
    if isinstance(divergence, DivergenceEstimator):
        est = divergence
    elif callable(divergence):
        est = CallableDivergence(divergence)
    elif divergence == "exact":
        est = ExactDivergence(exact_chunk)
        check_exact_memory(x, est.chunk)
    elif divergence == "hutchinson":
        check_probe_memory(x, probes)  # before the probes are drawn: refuse what the device cannot hold
        correction = None
        if cv is not None:
            if not isinstance(cv, GaussianControlVariate):
                raise TypeError(f"control_variate must be a GaussianControlVariate, got {type(cv).__name__}")
            if tuple(x.shape[1:]) != cv.event_shape:
                raise ValueError(f"control_variate has event shape {cv.event_shape}, x has {tuple(x.shape[1:])}")
            correction = functools.partial(cv.correction, sde=sde, velocity=velocity)
        return HutchinsonDivergence(probes, probe, probes_per, generator, correction)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected 'hutchinson', 'exact' or a callable")
    if probes_per not in ("solve", "step"):
        raise ValueError(f"probes_per must be 'solve' or 'step', got {probes_per!r}")
    if probes_per == "step":
        raise ValueError("probes_per='step' needs divergence='hutchinson'")
    if cv is not None:
        raise ValueError("control_variate needs divergence='hutchinson' (a HutchinsonDivergence object takes its "
                         "own correction=)")
    return est
