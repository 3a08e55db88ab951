"""Work-precision comparison of solvers: NFE against error, as a table and a log-log plot.

Path-wise error: every deterministic solver is compared with a high-accuracy float64 reference solve of the same
probability-flow ODE from the same x_T; the error of a run is RMS over the batch of |x - x_ref|_2 / sqrt(D).
Distribution-level error (with an analytic [`GaussianMixture`][scoresolve.GaussianMixture]): the sliced Wasserstein-2
distance of the generated samples to exact samples of p_{t_eps}, and the mean exact log-density of the samples
(``logp``) next to that of exact samples. Stochastic solvers have no path-wise reference; only the distribution
columns apply to them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ._utils import check_batched, check_count, check_positive
from .analytic import GaussianMixture
from .sampling import sample
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers import REGISTRY, AdaptiveSolver, GridSolver, Solution


@dataclass
class Run:
    """One solver run in a work-precision study."""

    solver: str
    setting: str  # "nfe=10" or "rtol=1e-05"
    nfe: float  # mean NFE per sample
    error: float  # RMS path-wise error against the reference (nan for stochastic solvers)
    seconds: float
    swd: float = math.nan  # sliced Wasserstein-2 to exact samples (analytic mixtures only)
    logp: float = math.nan  # mean exact log p_{t_eps} of the samples (analytic mixtures only)
    extra: dict = field(default_factory=dict)


def rms_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS over the batch of the per-sample L2 error divided by sqrt(D)."""
    d = (x.double() - ref.double()).flatten(1)
    return float(torch.sqrt(d.square().sum(1).mean() / d.shape[1]))


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance between two equally sized samples (``[n, ...]``)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs samples of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.cpu() @ dirs, dim=0)
    py, _ = torch.sort(y.cpu() @ dirs, dim=0)
    return float(torch.sqrt((px - py).square().mean()))


def reference_solve(
    score: Callable, sde: ForwardSDE, x_T: torch.Tensor, t_eps: float, tol: float = 1e-10
) -> torch.Tensor:
    """High-accuracy float64 solve of the probability-flow ODE (adaptive dopri5 at rtol = atol = ``tol``)."""
    sol = sample(score, sde, x_T.double(), solver="dopri5", rtol=tol, atol=tol, t_eps=t_eps, max_steps=100_000)
    return sol.x


def float64_model(model: Callable):
    """A float64 copy of a network ``model`` (a [`ScoreModel`][scoresolve.ScoreModel] whose net is a torch module, or
    a torch module), or None when it cannot be converted (a plain callable, or a network failing in float64)."""
    import copy

    net = model.net if isinstance(model, ScoreModel) else model
    if not isinstance(net, torch.nn.Module):
        return None
    try:
        net64 = copy.deepcopy(net).double()
    except Exception:  # noqa: BLE001 - a module that cannot be copied stays in its precision
        return None
    if isinstance(model, ScoreModel):
        out = copy.copy(model)
        out.net = net64
        return out
    return net64


def network_reference(
    model: Callable, sde: ForwardSDE, x_T: torch.Tensor, t_eps: float, tol64: float = 1e-8, tol32: float = 1e-6,
    progress: bool = False,
) -> tuple[torch.Tensor, str]:
    """The reference of a network without an exact one: a tight dopri5 solve of the same model's probability-flow
    ODE from ``x_T``, in float64 where the model converts (`float64_model`, rtol = atol = ``tol64``), else in its
    own precision (``tol32``); ``progress``: a progress bar of the solve. Returns (x_ref, a description of the
    reference)."""
    sol, how = network_reference_solve(model, sde, x_T, t_eps, tol64, tol32, progress)
    return sol.x, how


def network_reference_solve(
    model: Callable, sde: ForwardSDE, x_T: torch.Tensor, t_eps: float, tol64: float = 1e-8, tol32: float = 1e-6,
    progress: bool = False,
) -> tuple[Solution, str]:
    """`network_reference` with the whole `Solution` (its ``nfe`` included) instead of the end points."""
    model64 = float64_model(model)
    if model64 is not None:
        try:
            ref = sample(model64, sde, x_T.double(), solver="dopri5", rtol=tol64, atol=tol64, t_eps=t_eps,
                         max_steps=100_000, progress=progress)
            return ref, f"dopri5 float64 rtol=atol={tol64:g} (mean NFE {_mean(ref.nfe):.0f})"
        except (RuntimeError, TypeError):  # a network that does not run in float64
            pass
    ref = sample(model, sde, x_T, solver="dopri5", rtol=tol32, atol=tol32, t_eps=t_eps, max_steps=100_000,
                 progress=progress)
    return ref, f"dopri5 {str(x_T.dtype).replace('torch.', '')} rtol=atol={tol32:g} (mean NFE {_mean(ref.nfe):.0f})"


def _mean(v: int | torch.Tensor) -> float:
    return float(v.double().mean()) if torch.is_tensor(v) else float(v)


def work_precision(
    score: Callable,
    sde: ForwardSDE,
    x_T: torch.Tensor,
    solvers: Sequence[str],
    nfes: Sequence[int] = (10, 20, 50),
    tolerances: Sequence[float] = (1e-2, 1e-3, 1e-4),
    *,
    t_eps: float = 1e-3,
    reference: torch.Tensor | None = None,
    mixture: GaussianMixture | None = None,
    generator_seed: int = 0,
    solver_options: dict[str, dict] | None = None,
    progress: bool = False,
) -> list[Run]:
    """Run each solver at each NFE budget (grid solvers) or tolerance (adaptive ones) and measure its error.

    ``x_T`` is the shared initial batch; the reference is computed once in float64 unless given. Solver names may
    carry a grid, ``"dpmpp_2m@karras"``. Returns one [`Run`][scoresolve.compare.Run] per (solver, setting).
    """
    check_batched(x_T, "x_T")
    if x_T.shape[0] == 0:
        raise ValueError(f"x_T holds no samples (shape {tuple(x_T.shape)}): there is no error to measure")
    if isinstance(solvers, str):
        raise TypeError(f"solvers must be a sequence of solver names, got the str {solvers!r} (write [{solvers!r}])")
    for n in nfes:
        check_count(n, "each of nfes")
    for tol in tolerances:
        check_positive(tol, "each of tolerances")
    if reference is None:
        reference = reference_solve(score, sde, x_T, t_eps)
    elif not torch.is_tensor(reference) or reference.shape != x_T.shape:
        raise ValueError(f"reference must be a tensor of x_T's shape {tuple(x_T.shape)}, got "
                         f"{tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__}")
    elif not bool(torch.isfinite(reference).all()):
        raise ValueError("reference contains non-finite values")
    exact = None
    if mixture is not None:
        g = torch.Generator().manual_seed(generator_seed + 12345)
        exact = mixture.sample_marginal(x_T.shape[0], t_eps, sde, generator=g, dtype=torch.float64)
    solver_options = solver_options or {}
    jobs: list[tuple[str, str | None, str, dict]] = []
    for name in solvers:
        base, _, grid = name.partition("@")
        if base not in REGISTRY and ":" not in base:
            raise ValueError(f"unknown solver {base!r}; available: {sorted(REGISTRY)}")
        spec = REGISTRY.get(base)
        opts = dict(solver_options.get(name, solver_options.get(base, {})))
        if isinstance(spec, AdaptiveSolver):
            for tol in tolerances:
                jobs.append((name, grid or None, f"rtol={tol:g}", {"rtol": tol, "atol": tol, **opts}))
        else:
            for n in nfes:
                if isinstance(spec, GridSolver) and n < spec.nfe_for_steps(spec.min_steps, opts):
                    continue
                jobs.append((name, grid or None, f"nfe={n}", {"nfe": n, **opts}))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="work-precision", unit="run")
    runs: list[Run] = []
    for name, grid, setting, kw in jobs:
        base = name.partition("@")[0]
        spec = REGISTRY.get(base)
        stochastic = _is_random(base, spec, kw)
        gen = torch.Generator(device=x_T.device).manual_seed(generator_seed)
        if spec is not None and spec.stochastic:
            kw.setdefault("generator", gen)
        t0 = time.perf_counter()
        try:
            sol = sample(score, sde, x_T, solver=base, t_eps=t_eps, grid=grid, **kw)
        except ValueError as e:  # a fixed-step solver refusing a grid where it is unstable (solvers/fixed.py)
            if "unstable on this grid" not in str(e):
                raise
            runs.append(Run(name, setting, math.nan, math.nan, 0.0, extra={"refused": str(e)}))
            if bar is not None:
                bar.update(1)
            continue
        if x_T.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        run = Run(name, setting, _mean(sol.nfe), math.nan if stochastic else rms_error(sol.x, reference), seconds)
        if mixture is not None and exact is not None:
            run.swd = sliced_wasserstein(sol.x, exact)
            run.logp = float(mixture.log_prob(sol.x.double(), t_eps, sde).mean())
        runs.append(run)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return runs


def _is_random(base: str, spec, options: dict) -> bool:
    """Whether a run draws noise (then it has no path-wise reference)."""
    if base.startswith("torchsde:"):
        return True
    if spec is None:
        return False
    diffusion = options.get("diffusion", spec.default_diffusion)
    nonzero = callable(diffusion) or float(diffusion) != 0
    if spec.default_diffusion > 0:  # an SDE sampler: random exactly when s(t) is not zero
        return nonzero
    return nonzero or spec.draws_noise(options)


def exact_baseline(mixture: GaussianMixture, sde: ForwardSDE, n: int, t_eps: float, seed: int = 0) -> Run:
    """The noise floor of the distribution metrics: a second exact sample against the first."""
    g1 = torch.Generator().manual_seed(seed + 12345)
    g2 = torch.Generator().manual_seed(seed + 999)
    a = mixture.sample_marginal(n, t_eps, sde, generator=g1, dtype=torch.float64)
    b = mixture.sample_marginal(n, t_eps, sde, generator=g2, dtype=torch.float64)
    return Run(
        "exact samples", "-", 0.0, 0.0, 0.0, sliced_wasserstein(b, a), float(mixture.log_prob(b, t_eps, sde).mean())
    )


def format_table(runs: Sequence[Run]) -> str:
    """A fixed-width text table of the runs."""
    has_dist = any(not math.isnan(r.swd) for r in runs)
    head = f"{'solver':<22} {'setting':<12} {'NFE':>8} {'error':>10} {'seconds':>8}"
    if has_dist:
        head += f" {'SWD':>9} {'mean logp':>10}"
    lines = [head, "-" * len(head)]
    for r in runs:
        if "refused" in r.extra:
            lines.append(f"{r.solver:<22} {r.setting:<12} refused: unstable on this grid (more steps, or an "
                         "exponential integrator)")
            continue
        err = "-" if math.isnan(r.error) else f"{r.error:.3e}"
        line = f"{r.solver:<22} {r.setting:<12} {r.nfe:>8.1f} {err:>10} {r.seconds:>8.3f}"
        if has_dist:
            line += f" {r.swd:>9.4f} {r.logp:>10.4f}"
        lines.append(line)
    return "\n".join(lines)


def plot_work_precision(runs: Sequence[Run], path: str, title: str = "work-precision") -> None:
    """Log-log plot of error against NFE, one line per solver; a second panel shows the sliced Wasserstein
    distance when the runs have it (analytic mixtures; the only metric for stochastic solvers), with the noise floor
    of `exact_baseline` (a run with NFE 0: the distance between two exact samples of the same size) as a shaded,
    labelled band: solvers inside it are indistinguishable from exact sampling at this batch size. Solvers from peer
    libraries (names with a space or a colon, e.g. ``k-diffusion heun``) are drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_solver: dict[str, list[Run]] = {}
    for r in runs:
        if r.nfe > 0:
            by_solver.setdefault(r.solver, []).append(r)
    has_dist = any(not math.isnan(r.swd) for r in runs if r.nfe > 0)
    fig, axes = plt.subplots(1, 2 if has_dist else 1, figsize=(12 if has_dist else 7, 4.8), squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20").colors
    for k, (name, rs) in enumerate(by_solver.items()):
        rs = sorted(rs, key=lambda r: r.nfe)
        style = dict(color=colors[k % len(colors)], marker="os^vD<>"[k % 7],
                     linestyle="--" if (" " in name or ":" in name) else "-", label=name)
        pts = [(r.nfe, r.error) for r in rs if not math.isnan(r.error) and r.error > 0]
        if pts:
            axes[0].plot(*zip(*pts), **style)
        pts = [(r.nfe, r.swd) for r in rs if not math.isnan(r.swd)]
        if pts and has_dist:
            axes[1].plot(*zip(*pts), **style)
    axes[0].set(xscale="log", yscale="log", xlabel="NFE (score evaluations per sample)",
                ylabel="RMS error vs reference ODE solve", title=title)
    if has_dist:
        axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced Wasserstein-2 to exact samples",
                    title="distribution error")
        floor = [r.swd for r in runs if r.nfe == 0 and not math.isnan(r.swd)]
        if floor:  # SWD between two exact samples of the batch size: below it solvers cannot be told apart
            swds = [r.swd for r in runs if r.nfe > 0 and not math.isnan(r.swd) and r.swd > 0]
            bottom = min([*swds, floor[0]]) / 1.5
            axes[1].axhspan(bottom, floor[0], color="0.5", alpha=0.2, zorder=0, linewidth=0,
                            label=f"noise floor: SWD of two exact samples ({floor[0]:.3g}); below it, solvers are "
                            "within sampling noise")
            axes[1].set_ylim(bottom=bottom)
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
