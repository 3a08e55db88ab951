"""scoresolve's grid solvers with k-diffusion's sampler signature, and its grids as k-diffusion sigmas.

k-diffusion (and every UI built on it: ComfyUI's ``KSAMPLER``, A1111-style UIs) calls a sampler as

    sampler(model, x, sigmas, extra_args=None, callback=None, disable=None)

with x in the variance-exploding variable (x = x0 + sigma z, our [`EDMSDE`][scoresolve.EDMSDE] with t = sigma),
``model(x, sigma * s_in, **extra_args)`` the denoiser D(x, sigma) = E[x0 | x] (sigma of shape ``[batch]``) and
``sigmas`` a decreasing 1-D tensor that usually ends with 0.
[`k_diffusion_sampler`][scoresolve.adapters.k_diffusion_sampler] returns such a function for any registered grid
solver: it runs ``scoresolve.sample`` on the grid ``sigmas`` (without a final 0, which is the jump to the x0
prediction at the last sigma: ``denoise=True``, exactly what k-diffusion's last step to sigma = 0 does). Every
exponential integrator, Adams method and RK method is invariant
under the change to the VE variable (alpha = 1, lambda = -log sigma), so ``dpmpp_2m`` here is k-diffusion's
``sample_dpmpp_2m`` when its options match (``lower_order_final=False``: k-diffusion keeps the second order up to
its last step to a nonzero sigma), ``euler`` / ``heun`` are k-diffusion's Euler and Heun in sigma.

``sde="flow"`` takes the state of flow-matching models instead (ComfyUI's ``CONST`` sampling of SD3 / Flux):
x = (1 - sigma) x0 + sigma z, sigma in (0, 1], our [`RectifiedFlow`][scoresolve.RectifiedFlow] with t = sigma and
the same x0 denoiser; k-diffusion's Euler there is rectified flow's Euler, and so is ours.

[`k_diffusion_sigmas`][scoresolve.adapters.k_diffusion_sigmas] lays our named grids (uniform, quadratic, logsnr,
karras) or a tuned grid between sigma_max and sigma_min and returns k-diffusion's sigmas (with the final 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from .._utils import check_batched, check_count
from ..interpolant import RectifiedFlow
from ..score import ScoreModel
from ..sde import EDMSDE, ForwardSDE

__all__ = ["KDiffusionSampler", "k_diffusion_sampler", "k_diffusion_sigmas"]

Denoiser = Callable[..., torch.Tensor]


def _grid_spec(name: str):
    from ..solvers import REGISTRY, GridSolver

    if name not in REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available grid solvers: "
                         f"{sorted(n for n, s in REGISTRY.items() if isinstance(s, GridSolver))}")
    spec = REGISTRY[name]
    if not isinstance(spec, GridSolver):
        raise ValueError(f"solver {name!r} is adaptive (it chooses its own steps); a k-diffusion sampler runs on the "
                         "sigmas it is given: use a grid solver")
    return spec


def _process(kind: str, sigma_max: float) -> ForwardSDE:
    """The forward process of a k-diffusion sampler: EDM's x = x0 + sigma z up to ``sigma_max`` (``"ve"``), or
    rectified flow x = (1 - sigma) x0 + sigma z (``"flow"``); t is sigma in both."""
    return RectifiedFlow() if kind == "flow" else EDMSDE(T=sigma_max)


class KDiffusionSampler:
    """A scoresolve grid solver as a k-diffusion sampler (see the module docstring); build with
    [`k_diffusion_sampler`][scoresolve.adapters.k_diffusion_sampler].

    ``solver``: the registered name; ``sde``: ``"ve"`` (k-diffusion's x = x0 + sigma z, default) or ``"flow"``
    (rectified flow x = (1 - sigma) x0 + sigma z, sigma in (0, 1]: ComfyUI's ``CONST`` model sampling of SD3 /
    Flux, whose denoiser also returns x0); ``options``: the solver's options (``sample(..., **options)``), plus
    ``generator`` / ``seeds`` for the stochastic ones and ``diffusion`` (s = c g; default the solver's own).
    """

    def __init__(self, solver: str, *, sde: str = "ve", **options: Any) -> None:
        if sde not in ("ve", "flow"):
            raise ValueError(f"sde must be 've' (x = x0 + sigma z) or 'flow' (x = (1 - sigma) x0 + sigma z), "
                             f"got {sde!r}")
        self.solver, self.sde = solver, sde
        self.generator = options.pop("generator", None)
        self.diffusion = options.pop("diffusion", None)
        self.spec = None if solver == "default" else _grid_spec(solver)  # "default": chosen per call (the budget)
        if self.spec is not None:
            self.spec.check_options(options)
            # the process contract, checked as sample() checks it (the T of the process does not change it)
            self.spec.check_process(_process(sde, 1.0), options, self.diffusion)
        self.options = options
        self.__name__ = f"sample_scoresolve_{solver}"

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"k_diffusion_sampler({self.solver!r}{', ' if opts else ''}{opts})"

    def __call__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable[[dict], None] | None = None, disable: bool | None = None,
                 **extra_options: Any) -> torch.Tensor:
        """Sample from ``x`` at ``sigmas[0]`` (x = x0 + sigma z) down the decreasing ``sigmas``; returns x at the last
        sigma (the x0 prediction at the last nonzero sigma when ``sigmas`` ends with 0).

        ``callback`` gets, after each network evaluation at a grid sigma, ``{"x", "i", "sigma", "sigma_hat",
        "denoised"}`` (x the input the network saw, i the index of its sigma in ``sigmas``); ``extra_options``
        (ComfyUI's ``KSAMPLER(fn, extra_options)``) override the solver's options.
        """
        from ..sampling import sample

        check_batched(x, "x")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains non-finite values")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable callback(dict) or None, got {type(callback).__name__}")
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise TypeError(f"extra_args must be a mapping of the model's keyword arguments or None, got "
                            f"{type(extra_args).__name__}")
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        if sig.ndim > 1:
            raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sig.shape)}")
        sig = sig.flatten()
        if sig.numel() < 2:
            raise ValueError(f"sigmas must hold at least 2 values, got {sig.tolist()}")
        if not bool(torch.isfinite(sig).all()):
            raise ValueError("sigmas contain non-finite values")
        denoise = float(sig[-1]) == 0.0
        grid = sig[:-1] if denoise else sig
        if grid.numel() == 0 or not bool((grid > 0).all()):
            raise ValueError(f"sigmas must be positive except for a final 0, got {sig.tolist()[:8]}...")
        if grid.numel() >= 2 and not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError(f"sigmas must be strictly decreasing, got {sig.tolist()[:8]}...")
        if self.sde == "flow" and float(grid[0]) > 1.0:
            raise ValueError(f"flow sigmas lie in (0, 1], got sigma_max = {float(grid[0])}")
        sde = _process(self.sde, float(grid[0]))
        model_sm = ScoreModel(_Reporting(model, sig, callback) if callback is not None else model, sde,
                              prediction="x0", time="t", net_kwargs=dict(extra_args or {}))  # t is sigma in both
        options = {**self.options, **extra_options}
        solver, spec = self.solver, self.spec
        if spec is None:  # sample()'s default for a denoiser (x0) and this many evaluations; the host's sigmas
            from ..solvers.defaults import default_sampler

            solver, options, _ = default_sampler(int(grid.numel()), options, "x0", sde.finite_log_snr_at_T)
            spec = _grid_spec(solver)
        if grid.numel() == 1:  # one step to sigma = 0: the x0 prediction
            t = torch.full((x.shape[0],), float(grid[0]), dtype=x.dtype, device=x.device)
            with torch.no_grad():
                return model_sm.x0(x, t)
        kw: dict[str, Any] = {}
        if spec.stochastic:
            kw["generator"] = self.generator
        sol = sample(model_sm, sde, x, solver=solver, grid=grid, denoise=denoise, diffusion=self.diffusion,
                     progress=disable is False, **kw, **options)
        return sol.x


class _Reporting:
    """Calls the denoiser and k-diffusion's ``callback`` after each evaluation at one of the ``sigmas``."""

    def __init__(self, model: Denoiser, sigmas: torch.Tensor, callback: Callable[[dict], None]) -> None:
        self.model, self.callback = model, callback
        self.sigmas = sigmas.tolist()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        denoised = self.model(x, sigma, **kwargs)
        s = float(sigma.flatten()[0])  # one host read per evaluation, only with a callback
        for i, si in enumerate(self.sigmas):
            if si > 0 and math.isclose(s, si, rel_tol=1e-6):
                self.callback({"x": x, "i": i, "sigma": sigma.flatten()[0], "sigma_hat": sigma.flatten()[0],
                               "denoised": denoised})
                break
        return denoised


def k_diffusion_sampler(name: str, *, sde: str = "ve", **options: Any) -> KDiffusionSampler:
    """The registered grid solver ``name`` as a k-diffusion sampler ``fn(model, x, sigmas, extra_args=None,
    callback=None, disable=None)``; ``options`` are the solver's (``scoresolve.list_solvers()``; e.g. ``order``,
    ``afs``, ``lower_order_final``), plus ``generator`` and ``diffusion`` for stochastic ones. ``name="default"``:
    what ``scoresolve.sample(..., nfe=n)`` runs for a denoiser (x0) with the ``n`` evaluations the sigmas ask for
    (vAB at its order for n; on the host's sigmas), chosen at each call; ``options`` override it. ``sde="flow"``: the
    state is rectified flow's x = (1 - sigma) x0 + sigma z (ComfyUI's SD3 / Flux models) instead of x0 + sigma z.

    Unknown options raise the solver's TypeError here, adaptive solvers a ValueError. In ComfyUI::

        comfy.samplers.KSAMPLER(k_diffusion_sampler("unipc", order=3))
    """
    return KDiffusionSampler(name, sde=sde, **options)


def k_diffusion_sigmas(grid: Any, n: int, sigma_min: float | None = None, sigma_max: float | None = None, *,
                       sde: ForwardSDE | str = "edm", rho: float = 7.0, shift: float | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """k-diffusion's decreasing sigmas (``n + 1`` values, the last one 0) for our grid ``grid``.

    As with k-diffusion's ``get_sigmas_karras(n, ...)``, ``n`` counts the sampler's steps including the last one to
    sigma = 0 (the x0 prediction): the ``n`` nonzero sigmas are our grid with ``n - 1`` steps from sigma_max to
    sigma_min.

    Args:
        grid: ``"uniform"``, ``"quadratic"``, ``"logsnr"``, ``"karras"`` (rho-schedule in sigma), or a tuned grid
            (``"tuned:<name>"`` or a `scoresolve.tuning.TunedGrid`) tuned for ``n - 1`` steps on ``sde``.
        n: number of steps, the final one to 0 included (>= 2).
        sigma_min: the last nonzero sigma (k-diffusion's sigma = sigma / alpha of ``sde``); None for a tuned grid
            (its own end points).
        sigma_max: the first sigma; None for a tuned grid.
        sde: the time variable in which the grid is laid out: ``"edm"`` (t = sigma, as k-diffusion's
            ``get_sigmas_karras``), ``"flow"`` (rectified flow's t = sigma in (0, 1], the sigmas of
            ``k_diffusion_sampler(..., sde="flow")``; from sigma_max = 1 only the grids in t, uniform and
            quadratic, with ``shift``), or a forward SDE (e.g. the model's ``DiscreteVPSDE``: a uniform grid is then
            uniform in its t, a tuned grid is in its t), mapped to sigma = exp(-lambda(t)).
        rho: the karras grid's rho.
        shift: SD3's shift of the grids in t.
        device: of the result (float64, like the grids).
    """
    from ..solvers import time_grid
    from ..solvers.grid_store import TunedGrid, load_grid

    if check_count(n, "n", minimum=None) < 2:
        raise ValueError(f"n must be >= 2 (at least one step between sigma_max and sigma_min, then the step to 0), "
                         f"got {n}")
    tuned = None
    if isinstance(grid, TunedGrid):
        tuned = grid
    elif isinstance(grid, str) and grid.startswith("tuned:"):
        tuned = load_grid(grid[len("tuned:"):])
    if isinstance(sde, str):
        if sde not in ("edm", "flow"):
            raise ValueError(f"sde must be 'edm', 'flow' or a ForwardSDE instance, got {sde!r}")
        if tuned is not None:
            raise ValueError("a tuned grid lives in the time variable of the SDE it was tuned on: pass that SDE "
                             "as sde=")
    if tuned is not None:
        if tuned.steps != int(n) - 1:
            raise ValueError(f"the tuned grid has {tuned.steps} steps (tuned for {tuned.solver} at nfe={tuned.nfe}): "
                             f"n={tuned.steps + 1} with the step to 0, but n={n} was asked")
        ts = tuned.grid.to(torch.float64)
        if sigma_min is not None or sigma_max is not None:
            lam = sde.log_snr(ts[[0, -1]]).tolist()
            have = (math.exp(-lam[1]), math.exp(-lam[0]))
            want = (sigma_min, sigma_max)
            if any(w is not None and not math.isclose(w, h, rel_tol=1e-6) for w, h in zip(want, have)):
                raise ValueError(f"the tuned grid runs from sigma_max={have[1]:.6g} to sigma_min={have[0]:.6g}, "
                                 f"not {sigma_max} to {sigma_min}")
    else:
        if sigma_min is None or sigma_max is None:
            raise ValueError("sigma_min and sigma_max are needed for a named grid")
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if sde == "flow" and sigma_max > 1.0:
            raise ValueError(f"flow sigmas lie in (0, 1], got sigma_max = {sigma_max}")
        if isinstance(sde, str):
            fwd: ForwardSDE = EDMSDE(T=sigma_max) if sde == "edm" else RectifiedFlow()
            T, t_eps = sigma_max, sigma_min
        else:
            fwd = sde
            ends = fwd.t_from_log_snr(-torch.log(torch.tensor([sigma_max, sigma_min], dtype=torch.float64)))
            T, t_eps = (float(v) for v in ends)
            if T > fwd.T and math.isclose(T, fwd.T, rel_tol=1e-6):  # sigma_max read off the SDE's own end
                T = fwd.T
        ts = time_grid(fwd, int(n) - 1, grid, t_eps=t_eps, T=T, rho=rho, shift=shift)
        if isinstance(sde, str):
            return torch.cat([ts, ts.new_zeros(1)]).to(device=device)
        sde = fwd
    sig = torch.exp(-sde.log_snr(ts))
    if tuned is None:
        sig[0], sig[-1] = sigma_max, sigma_min  # exact end points
    return torch.cat([sig, sig.new_zeros(1)]).to(device=device)
