"""`ScoresolveScheduler`: scoresolve's grid solvers as a diffusers scheduler, inside any diffusers pipeline.

A diffusers pipeline evaluates the network once per entry of ``scheduler.timesteps`` and hands the output to
``scheduler.step(model_output, timestep, sample)``. This scheduler keeps one `scoresolve.solvers._grid.GridRun` for
the loop and takes the registered solver's own step function (one formula in one place): the run's model is a
*replay* of the pipeline's output, converted by [`ScoreModel`][scoresolve.ScoreModel] from the scheduler's prediction
type (epsilon, v_prediction, sample, flow) to what the step asks for. Multistep history lives in the run's memory,
so in the scheduler. The result is the very solve ``scoresolve.sample(model, sde, x_T, solver=..., grid=
scheduler.grid, denoise=scheduler.denoise, **options)`` would make with the pipeline's network (classifier-free
guidance included: the pipeline mixes the outputs before ``step``).

Evaluations and grid points: with ``denoise=True`` (default) the pipeline's ``n`` evaluations sit on the ``n`` grid
points and the last one is the jump to the x0 prediction (diffusers' final sigma 0); with ``denoise=False`` the grid
has ``n + 1`` points and the solve ends at the last one (t_eps). UniPC's corrector needs the evaluation at the
predicted point, which is the pipeline's next evaluation: its step is split (`unipc_predict` / `unipc_correct`) so
that every ``step`` call is one evaluation; `vab` applies its corrector in the step after the evaluation (folded
into that step's weights), so it needs no split. Solvers with several evaluations per step (heun, rk4,
dpm_solver_2/3, pc, ...), the analytical first step (the pipeline evaluates the network at T anyway) and
``final_corrector`` are refused by name.

The process: a DDPM-family config (``beta_schedule``, ``trained_betas``, ``num_train_timesteps``,
``rescale_betas_zero_snr``) gives [`DiscreteVPSDE`][scoresolve.DiscreteVPSDE] with the network time index N t - 1
(`DDPMTimestep`); ``prediction_type="flow"`` (or a flow-matching scheduler's config) gives
[`RectifiedFlow`][scoresolve.RectifiedFlow] with timestep = t N, SD3's ``shift`` applied to the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .._utils import bcast, check_count
from ..interpolant import RectifiedFlow, sd3_shift
from ..score import ScoreModel
from ..sde import ForwardSDE
from ..solvers.errors import NonFiniteError
from .diffusers import DDPMTimestep, sde_from_scheduler

__all__ = ["ScoresolveScheduler", "ScoresolveSchedulerOutput"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow", "flow_prediction": "flow"}
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# grid solvers whose step i evaluates the network once, at grid point i (unipc: its corrector's evaluation at the
# predicted point is the next step's, see `step`; vab applies its corrector in the next step, after that
# evaluation); tests/test_adapters_scheduler.py checks each against sample()
SCHEDULER_SOLVERS = ("ddim", "euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "vab", "dpmpp_2m_sde",
                     "euler_maruyama", "reverse_diffusion")


@dataclass
class ScoresolveSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next evaluation (the solve's result after the last one);
    ``pred_original_sample``: the x0 prediction of this evaluation."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _Replay:
    """The network of the scheduler's run: returns the output the pipeline handed to ``step``."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            raise RuntimeError("the solver asked for a network evaluation outside ScoresolveScheduler.step")
        return self.out


class ScoresolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler backed by a scoresolve grid solver (see the module docstring).

    Create it from another scheduler's config, ``ScoresolveScheduler.from_config(pipe.scheduler.config,
    solver="unipc", solver_options={"order": 3}, grid="logsnr")``, and set ``pipe.scheduler`` to it.

    ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas`` and
    ``rescale_betas_zero_snr`` are the DDPM-family schedule (diffusers' meanings; for flow matching only N is used).

    Args:
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"`` (rectified flow,
            u = eps - x0; ``"flow_prediction"`` is accepted).
        solver: a registered grid solver with one evaluation per step (``scoresolve.list_solvers()``), or
            ``"default"``: what ``scoresolve.sample(..., nfe=n)`` runs for this prediction type and the pipeline's
            ``n = num_inference_steps`` (`scoresolve.solvers.defaults.default_sampler`: vAB on a ``flow:P`` grid for
            v, sample and flow models; DPM-Solver++(2M) below 20 steps and DEIS-4 on the log-SNR grid from 20 for
            epsilon models), chosen in `set_timesteps` (``scheduler.solver`` names it then).
        solver_options: its options (e.g. ``{"order": 3}``, ``{"lower_order_final": False}``, ``{"eta": 1.0}``);
            with "default", they override the default's.
        grid: ``"uniform"``, ``"quadratic"``, ``"logsnr"``, ``"karras"``, ``"flow:P"``, ``"tuned:<name>"``; None:
            with solver="default" the default sampler's grid, else the solver's default (uniform for flow matching).
        t_eps: the last grid time; None: 1/N (the first DDPM knot, index 0), or for flow matching
            FlowMatchEulerDiscreteScheduler's last sigma (1/N shifted twice: it lays a linspace down to its shifted
            sigma_min and shifts the result).
        shift: SD3's time shift of the grid (flow matching; a flow scheduler's ``shift`` / ``flow_shift``).
        denoise: end with the jump to the x0 prediction at the last grid time (diffusers' final sigma 0).
        diffusion: s = c g of the reverse process (``sample(diffusion=)``); None: the solver's default.
        timestep_mode: how fractional DDPM indices reach the network (`DDPMTimestep`: snap, float, round).
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        solver: str = "default",
        solver_options: dict | None = None,
        grid: str | None = None,
        t_eps: float | None = None,
        shift: float | None = None,
        denoise: bool = True,
        diffusion: float | None = None,
        timestep_mode: str = "snap",
    ) -> None:
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of "
                             f"{sorted(_PREDICTIONS)}")
        self.flow = _PREDICTIONS[prediction_type] == "flow"
        N = int(num_train_timesteps)
        if self.flow:
            self.sde: ForwardSDE = RectifiedFlow()
            self.time_input: Any = "scaled"
        else:
            self.sde = sde_from_scheduler(dict(self.config))
            self.time_input = DDPMTimestep(N, timestep_mode)
        if shift is not None and not self.flow:
            raise ValueError("shift (SD3's time shift) applies to flow matching (prediction_type='flow')")
        self.replay = _Replay()
        self.model = ScoreModel(self.replay, self.sde, prediction=_PREDICTIONS[prediction_type],
                                time=self.time_input, num_timesteps=N)
        self.solver: str | None = None  # the solver running (solver="default": chosen in set_timesteps)
        if solver == "default":
            if solver_options and solver_options.get("afs"):
                raise ValueError("afs=True: the analytical first step saves the network evaluation at T, but a "
                                 "pipeline makes it anyway; use afs=False in a scheduler")
        else:
            self._use_solver(solver, dict(solver_options or {}))
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.grid: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._reset()

    def _use_solver(self, solver: str, options: dict) -> None:
        """Check that ``solver`` with ``options`` runs as a scheduler on this process and set it up."""
        from ..solvers import REGISTRY, GridSolver

        if solver not in REGISTRY:
            raise ValueError(f"unknown solver {solver!r}; available: {sorted(REGISTRY)} or 'default'")
        spec = REGISTRY[solver]
        spec.check_options(options)
        if not isinstance(spec, GridSolver):
            raise ValueError(f"solver {solver!r} is adaptive: a scheduler takes the pipeline's fixed timesteps; use a "
                             "grid solver")
        if options.get("afs"):
            raise ValueError(f"solver {solver!r} with afs=True: the analytical first step saves the network "
                             "evaluation at T, but a pipeline makes it anyway; use afs=False in a scheduler")
        if options.get("final_corrector"):
            raise ValueError("unipc with final_corrector=True needs one more evaluation after the last step, which a "
                             "pipeline's loop does not make")
        if spec.evals(options) != 1 or spec.extra(options) != 0:
            raise ValueError(
                f"solver {solver!r} makes {spec.evals(options)} network evaluations per step at points of its own: "
                f"ScoresolveScheduler runs solvers with one evaluation per step ({', '.join(SCHEDULER_SOLVERS)})")
        if solver not in SCHEDULER_SOLVERS:
            raise ValueError(f"solver {solver!r} is not verified to take one evaluation per step at the pipeline's "
                             f"points; ScoresolveScheduler runs {', '.join(SCHEDULER_SOLVERS)}")
        diffusion = self.config.diffusion
        spec.check_process(self.sde, options, diffusion)  # the process contract, checked as sample() checks it
        self.spec, self.options, self.solver = spec, options, solver
        self.process = self.sde.reverse(self.model, spec.default_diffusion if diffusion is None else diffusion)

    def _default_solver(self, nfe: int) -> str | None:
        """With solver="default": set up `sample`'s default sampler for ``nfe`` evaluations and this model's
        prediction (`scoresolve.solvers.defaults.default_sampler`); returns its grid (None: the solver's own)."""
        from ..solvers.defaults import default_sampler

        name, opts, grid = default_sampler(nfe, dict(self.config.solver_options or {}), self.model.prediction,
                                           self.sde.finite_log_snr_at_T)
        self._use_solver(name, opts)
        return grid

    # --- creation from other schedulers' configs ----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``; a flow-matching scheduler's config (FlowMatchEulerDiscrete, or
        ``use_flow_sigmas=True``) gives ``prediction_type="flow"`` and its ``shift`` / ``flow_shift``."""
        cfg = dict(config or {})
        name = cfg.get("_class_name", "")
        flow_like = (name in _FLOW_CLASSES or cfg.get("use_flow_sigmas")
                     or cfg.get("prediction_type") == "flow_prediction"
                     or ("beta_schedule" not in cfg and "shift" in cfg and "use_dynamic_shifting" in cfg))
        if flow_like:
            for key in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "stochastic_sampling",
                        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg.get(key) not in (None, False):
                    raise ValueError(f"a flow-matching config with {key}={cfg[key]!r} is not supported (Flux-type "
                                     "dynamic shifting is set by the pipeline through mu: pass a fixed shift=; "
                                     "other sigma schedules: grid= or set_timesteps(sigmas=))")
            cfg["prediction_type"] = "flow"
            if "flow_shift" in cfg and "shift" not in cfg:
                cfg["shift"] = cfg["flow_shift"]
            cfg["shift"] = float(cfg.get("shift", 1.0))
        ignored = [k for k in ("clip_sample", "thresholding") if cfg.get(k)]
        if ignored:
            import warnings

            warnings.warn("ScoresolveScheduler does not clip or threshold the x0 prediction "
                          f"({', '.join(ignored)}=True in the source config is ignored): the solvers integrate "
                          "the probability-flow ODE of the network itself", stacklevel=2)
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- the schedule -----------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._run: Any = None
        self._first = 0

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index, set by the pipeline with `set_begin_index` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img: the solve runs over the rest of the grid)."""
        begin_index = check_count(begin_index, "begin_index", minimum=0)
        if self.num_inference_steps is not None and begin_index >= self.num_inference_steps:
            raise ValueError(f"begin_index must be below the {self.num_inference_steps} timesteps set_timesteps laid "
                             f"out, got {begin_index}")
        self._begin_index = begin_index

    @property
    def denoise(self) -> bool:
        """Whether the last evaluation is the jump to the x0 prediction (for this schedule)."""
        return self._denoise

    def _t_eps(self) -> float:
        if self.config.t_eps is not None:
            return float(self.config.t_eps)
        N = int(self.config.num_train_timesteps)
        if self.flow:  # FlowMatchEulerDiscreteScheduler: linspace down to its shifted sigma_min, shifted again
            s = float(self.config.shift or 1.0)
            return float(sd3_shift(sd3_shift(torch.tensor(1.0 / N, dtype=torch.float64), s), s))
        return 1.0 / N

    def t_from_timestep(self, timestep: Any) -> torch.Tensor:
        """Our float64 time t of network timesteps: the exact grid time of one of ``timesteps``, else
        (timestep + 1)/N (DDPM index) or timestep/N (flow)."""
        ts = torch.as_tensor(timestep).detach().to("cpu", torch.float64)
        N = int(self.config.num_train_timesteps)
        t = ts / N if self.flow else (ts + 1) / N
        if self.timesteps is not None and self.grid is not None:  # the float32 timesteps -> their float64 times
            mine = self.timesteps.detach().to("cpu", torch.float64)
            hit = ts.reshape(-1, 1) == mine.reshape(1, -1)
            exact = self.grid[: mine.numel()][hit.float().argmax(1)].reshape(ts.shape)
            t = torch.where(hit.any(1).reshape(ts.shape), exact, t)
        return t

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | torch.Tensor | None = None,
                      sigmas: Sequence[float] | torch.Tensor | None = None) -> None:
        """Lay out ``num_inference_steps`` network evaluations on the configured grid, or at custom ``timesteps``
        (network timesteps, decreasing) or ``sigmas`` (diffusers' sigma: sqrt((1 - ac)/ac) for DDPM schedules, t
        for flow matching; a trailing 0 means the last evaluation is the jump to x0).

        Sets ``timesteps`` (the network's time inputs, float32), ``sigmas``, ``grid`` (our float64 times) and
        ``num_inference_steps``.
        """
        from ..sampling import default_grid
        from ..solvers import time_grid
        from ..solvers._grid import check_grid

        if sum(a is not None for a in (timesteps, sigmas)) > 1:
            raise ValueError("give at most one of timesteps and sigmas")
        denoise = bool(self.config.denoise)
        custom = None
        if timesteps is not None:
            custom = self.t_from_timestep(timesteps).flatten()
        elif sigmas is not None:
            sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
            if sig.numel() >= 2 and float(sig[-1]) == 0.0:
                sig, denoise = sig[:-1], True
            if not bool((sig > 0).all()):
                raise ValueError(f"sigmas must be positive (except a final 0), got {sig.tolist()[:8]}...")
            custom = sig if self.flow else self.sde.t_from_log_snr(-torch.log(sig))
        if num_inference_steps is not None:
            num_inference_steps = check_count(num_inference_steps, "num_inference_steps", minimum=None)
        if custom is not None:
            if num_inference_steps is not None and int(num_inference_steps) != custom.numel():
                raise ValueError(f"num_inference_steps={num_inference_steps} but {custom.numel()} custom values")
            if self.config.solver == "default":
                self._default_solver(int(custom.numel()))
            grid = custom if denoise else torch.cat([custom, torch.tensor([self._t_eps()], dtype=torch.float64)])
            if grid.numel() >= 2:
                check_grid(grid, self.sde.T)
        else:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps, timesteps or sigmas")
            n = int(num_inference_steps)
            steps = n - 1 if denoise else n
            if steps < 1:
                raise ValueError(f"num_inference_steps must be >= {2 if denoise else 1}, got {n}")
            chosen = self._default_solver(n) if self.config.solver == "default" else None
            kind = self.config.grid or chosen or default_grid(self.spec.default_grid, self.sde)
            grid = time_grid(self.sde, steps, kind, t_eps=self._t_eps(), shift=self.config.shift)
        evals = grid if denoise else grid[:-1]
        self.spec.resolve(self.process, self.options, max(grid.numel() - 1, 0))  # option errors now, not mid-loop
        self.grid, self._denoise = grid, denoise
        self.num_inference_steps = int(evals.numel())
        self.timesteps = self.model.network_time(evals).to(device=device, dtype=torch.float32)
        sig = evals if self.flow else torch.exp(-self.sde.log_snr(evals))
        if denoise:
            sig = torch.cat([sig, sig.new_zeros(1)])
        self.sigmas = sig.to(device=device, dtype=torch.float32)
        self._reset()

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # --- the loop ---------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network sees the state itself (VP and flow processes): returns ``sample``."""
        return sample

    def _index_of(self, timestep: Any) -> int:
        assert self.timesteps is not None
        t = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device).flatten()[:1]
        hits = (self.timesteps == t).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"timestep {float(t)} is not one of this scheduler's timesteps; call set_begin_index "
                             "for a loop that starts inside the schedule")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True
             ) -> ScoresolveSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One evaluation of the pipeline's loop: ``model_output`` is the network's prediction (of the configured
        type, guidance applied) at ``sample`` and ``timestep``. Returns the state at the next timestep (or the
        solve's result after the last one) and this evaluation's x0 prediction, in ``sample``'s dtype (float16 and
        bfloat16 states are stepped in float32). ``generator``: the noise of stochastic solvers (the one given at the
        first step is used for the whole loop)."""
        from ..solvers._grid import GridRun
        from ..solvers.multistep import unipc_correct, unipc_predict, unipc_start

        if self.timesteps is None or self.grid is None:
            raise ValueError("call set_timesteps first")
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not (torch.is_tensor(value) and value.is_floating_point()):
                raise TypeError(f"{name} must be a floating-point tensor, got "
                                f"{value.dtype if torch.is_tensor(value) else type(value).__name__}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, sample {tuple(sample.shape)}")
        dtype = sample.dtype
        if dtype not in (torch.float32, torch.float64):  # half precision: the solve runs in float32, like diffusers'
            sample, model_output = sample.float(), model_output.float()
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_of(timestep)
        k = self._step_index
        if k >= self.num_inference_steps:
            raise ValueError(f"step called {k + 1} times, but set_timesteps laid out {self.num_inference_steps}")
        if self._run is None:  # the solve over the rest of the grid, from this evaluation on
            self._first = k
            run_grid = self.grid[k:]
            if run_grid.numel() >= 2:
                opts = self.spec.resolve(self.process, self.options, run_grid.numel() - 1)
                self._run = GridRun(self.spec, self.process, sample, run_grid.to(sample.device), opts,
                                    generator=generator)
            else:
                self._run = False  # only the jump to x0 is left
        run, i = self._run, k - self._first
        t = torch.full((sample.shape[0],), float(self.grid[k]), dtype=sample.dtype, device=sample.device)
        self.replay.out = model_output
        try:
            x0 = self.model.x0(sample, t)
            if not run or i == run.steps:  # the last evaluation with denoise: its x0 prediction is the result
                prev = x0
            else:
                before = run.counter.calls
                if self.spec.name == "unipc":
                    if i == 0:
                        unipc_start(run, run.x0(sample, 0))
                        x = sample
                    else:
                        x = unipc_correct(run, i - 1, run.x0(sample, i))
                    prev = unipc_predict(run, x, i)
                else:
                    prev = self.spec.step(run, sample, i)
                if run.counter.calls != before + 1:
                    raise RuntimeError(f"solver {self.spec.name!r} made {run.counter.calls - before} evaluations in "
                                       "one scheduler step; it cannot run as a scheduler")
        finally:
            self.replay.out = None
        self._step_index = k + 1
        if k + 1 == self.num_inference_steps:  # the solve's end: one check, as sample() makes (none in the loop)
            ok = torch.isfinite(prev.detach().flatten(1).sum(1, dtype=torch.float32 if prev.dtype != torch.float64
                                                               else None))
            if not bool(ok.all()):
                idx = (~ok).nonzero().flatten().tolist()
                raise NonFiniteError(f"ScoresolveScheduler[{self.spec.name}]", idx,
                                     [float(self.grid[-1])] * len(idx), None)
        prev, x0 = prev.to(dtype), x0.to(dtype)
        if not return_dict:
            return prev, x0
        return ScoresolveSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # --- img2img ----------------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise at the network ``timesteps`` (one per sample, or one for all)."""
        t = self.t_from_timestep(timesteps).flatten()  # on the host
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"timesteps must hold one value or one per sample ({original_samples.shape[0]}), got "
                             f"{t.numel()}")
        raw, N = torch.as_tensor(timesteps).detach().to("cpu", torch.float64), int(self.config.num_train_timesteps)
        if not bool(((raw >= 0) & (raw <= (N if self.flow else N - 1))).all()):
            raise ValueError(f"timesteps must lie in this scheduler's range [0, {N if self.flow else N - 1}], got "
                             f"{raw.flatten()[:8].tolist()}")
        alpha, sigma = self.sde.marginal(t, check=False)
        if alpha.numel() == 1:
            alpha, sigma = alpha.expand(original_samples.shape[0]), sigma.expand(original_samples.shape[0])
        x = original_samples
        a = bcast(alpha.to(device=x.device, dtype=x.dtype), x)
        s = bcast(sigma.to(device=x.device, dtype=x.dtype), x)
        return a * x + s * noise.to(x.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching pipelines' name of `add_noise` (``scale_noise(x0, timestep, noise)``)."""
        if noise is None:
            raise ValueError("scale_noise needs noise")
        return self.add_noise(sample, noise, timestep)
