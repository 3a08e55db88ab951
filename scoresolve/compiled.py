"""An opt-in recorded fixed-grid solve: the step loop captured once and replayed (`compile_sampler`).

On a fixed grid every step coefficient is a host float known before the solve (`scoresolve.solvers._grid`), the
histories are tensors of fixed shapes and the loop makes no host-device synchronisation (tests/test_syncs.py), so
for a given input shape the whole solve, network included, is one static program. `compile_sampler` builds the run
once, runs it eagerly once (filling every host cache: schedule, coefficients, weights), forgets the device state
(`scoresolve.solvers._grid.GridRun.reset`) and records the loop:

- ``mode="cuda_graph"`` (on CUDA): `torch.cuda.graph` captures the loop; a call copies x_T into the static input,
  replays the graph and clones the static output. Not yet measured on a GPU (benchmarks/gpu_run.sh measures it).
- ``mode="compile"``: `make_fx` traces the loop into one flat graph of tensor operations (the host floats become
  constants) and `torch.compile` (inductor) compiles it; on CUDA ``compile_mode="reduce-overhead"`` adds CUDA graphs.
- ``mode="eager"``: the same recorded run, replayed as Python (the reference the other modes are tested against).
- ``mode="auto"``: ``cuda_graph`` on CUDA, ``eager`` elsewhere (``compile`` unrolls the whole solve, network
  included, into one graph: its compile time grows with the NFE and the network's size; ask for it explicitly).

A capture or compile that fails (a network that synchronises, data-dependent shapes, a backend error) falls back to
``eager`` with a warning naming the reason. Every call checks the result for non-finite samples (one
synchronisation); a solve that ends non-finite is re-run by `sample` with the same arguments to raise its
[`NonFiniteError`][scoresolve.NonFiniteError] with the details. Only deterministic solves are recorded (no noise:
a generator's state would be frozen into the recording), without callback, progress bar or trajectory; `sample`'s
keywords for those (and for adaptive solvers) are refused by name. The step loop reads no tensor on the host and
makes no tensor from host data (tests/test_compiled.py checks both on its trace): what a CUDA graph cannot capture.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .sampling import _calibrated_sampler, _default_sampler, check_entry, check_solve_arguments, grid_times, sample
from .score import ScoreModel
from .sde import ForwardSDE
from .solvers import REGISTRY, GridSolver, NonFiniteError, Solution
from .solvers._grid import GridRun

MODES = ("auto", "cuda_graph", "compile", "eager")
NOT_RECORDED = ("generator", "seeds", "callback", "save_trajectory", "progress", "denoise", "rtol", "atol", "grad")
"""`sample`'s keywords that a recorded solve does not take (noise, per-step Python, adaptive solvers, autograd)."""


class CompiledSampler:
    """A recorded grid solve for inputs shaped like ``example`` (see the module docstring); call it with x_T.

    ``mode`` is the mode asked for, ``active`` the one in use (after any fallback), ``fallback_reason`` why it fell
    back (None if it did not), ``nfe`` the network evaluations per sample of one call, ``ts`` the float64 grid.
    """

    def __init__(self, score: Callable | ScoreModel, sde: ForwardSDE, example: torch.Tensor, *,
                 solver: str | None = None, nfe: int | None = None, steps: int | None = None,
                 grid: str | torch.Tensor | None = None, shift: float | None = None, t_eps: float = 1e-3,
                 diffusion: float | None = None, mode: str = "auto", compile_mode: str | None = None,
                 **options: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        refused = sorted(k for k in options if k in NOT_RECORDED)
        if refused:
            raise ValueError(f"compile_sampler records a deterministic grid solve without per-step Python: "
                             f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} sample()'s only; use "
                             "sample()")
        nfe, steps, t_eps = check_entry(sde, example, "example", nfe, steps, t_eps)
        check_solve_arguments(solver, grid, diffusion)
        self.score, self.sde = score, sde
        # sample()'s arguments for the same solve: a call that ends non-finite re-runs it for the full error
        self._sample_kw = dict(solver=solver, nfe=nfe, steps=steps, grid=grid, shift=shift, t_eps=t_eps,
                               diffusion=diffusion, **options)
        model = ScoreModel.wrap(score, sde)
        options = dict(options)
        solver, nfe, steps, grid, model, sde = _calibrated_sampler(solver, nfe, steps, grid, options, model, sde)
        if solver is None:
            solver, options, grid, model, sde = _default_sampler(nfe, steps, grid, diffusion, dict(options), model,
                                                                 sde)
        if solver not in REGISTRY or not isinstance(REGISTRY[solver], GridSolver):
            grid_solvers = sorted(n for n, s in REGISTRY.items() if isinstance(s, GridSolver))
            raise ValueError(f"compile_sampler records a grid solver, got {solver!r}; grid solvers: {grid_solvers}")
        spec = self.spec = REGISTRY[solver]
        spec.check_options(options)
        spec.check_process(sde, options, diffusion)
        process = sde.reverse(model, spec.default_diffusion if diffusion is None else diffusion)
        if not process.is_ode or spec.draws_noise({**spec.options, **options}):
            raise ValueError(f"compile_sampler records deterministic solves only; solver {solver!r} draws noise "
                             "(its generator state would be frozen into the recording): use sample()")
        self.ts = grid_times(spec, sde, nfe, steps, grid, shift, t_eps, options)
        self.options = spec.resolve(process, options, int(self.ts.numel()) - 1)
        self.shape, self.dtype, self.device = example.shape, example.dtype, example.device
        self.mode, self.compile_mode, self.fallback_reason = mode, compile_mode, None
        with torch.no_grad():
            x = example.detach().clone()
            self.run = GridRun(spec, process, x, self.ts.to(device=x.device), self.options)
            self._loop(x)  # eager: fills the host caches (and warms the network up)
            self.nfe = self.run.counter.calls
            active = ("cuda_graph" if self.device.type == "cuda" else "eager") if mode == "auto" else mode
            self.active = self._record(active, x)

    # --- recording ------------------------------------------------------------------------------------------
    def _loop(self, x: torch.Tensor) -> torch.Tensor:
        """The step loop on ``self.run`` (after `GridRun.reset`): the final state (a sample that went non-finite on
        the way stays non-finite, see `FiniteGuard`)."""
        run, step = self.run, self.spec.step
        assert step is not None
        run.reset(x)
        for i in range(run.steps):
            x = step(run, x, i)
            run.done(i, x)
        return x

    def _record(self, mode: str, x: torch.Tensor) -> str:
        try:
            if mode == "cuda_graph":
                self._capture_graph(x)
            elif mode == "compile":
                self._compile(x)
            else:
                self._fn = self._eager
            return mode
        except Exception as err:  # any failure of capture or compilation: run eagerly, and say why
            self.fallback_reason = f"{type(err).__name__}: {err}"
            warnings.warn(f"compile_sampler: mode {mode!r} failed ({self.fallback_reason}); running eagerly",
                          UserWarning, stacklevel=3)
            self._fn = self._eager
            return "eager"

    def _eager(self, x_T: torch.Tensor) -> torch.Tensor:
        return self._loop(x_T.clone())  # as sample(): a network that writes into its input leaves x_T alone

    def _capture_graph(self, x: torch.Tensor) -> None:
        if x.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA input, got one on {x.device}")
        self._static_in = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graph capture requires
            for _ in range(2):
                self._loop(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._loop(self._static_in)
        self._graph = graph

        def replay(x_T: torch.Tensor) -> torch.Tensor:
            self._static_in.copy_(x_T)
            self._graph.replay()
            return self._static_out.clone()

        self._fn = replay

    def trace(self, x: torch.Tensor | None = None) -> torch.fx.GraphModule:
        """The recorded solve as one flat FX graph ``x_T -> x`` of tensor operations (`make_fx`; the
        network inside, every host coefficient a constant): what ``compile`` compiles and what a CUDA graph
        captures. Raises where the loop reads a tensor's value on the host (a data-dependent step or network)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        x = torch.zeros(self.shape, dtype=self.dtype, device=self.device) if x is None else x
        with torch.no_grad():
            return make_fx(lambda x_in: self._loop(x_in))(x)

    def _compile(self, x: torch.Tensor) -> None:
        traced = self.trace(x)
        compiled = torch.compile(traced, dynamic=False, mode=self.compile_mode)
        compiled(x.clone())  # compile now, so that a failure falls back here and not in the first call
        self._fn = lambda x_T: compiled(x_T.clone())  # the trace may write into its input (as _eager)

    # --- calls ----------------------------------------------------------------------------------------------
    def __call__(self, x_T: torch.Tensor) -> Solution:
        """Solve from ``x_T`` (the example's shape, dtype and device)."""
        if not torch.is_tensor(x_T):
            raise TypeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
        if x_T.shape != self.shape or x_T.dtype != self.dtype or x_T.device != self.device:
            raise ValueError(f"compile_sampler was recorded for {tuple(self.shape)} {self.dtype} on {self.device}, "
                             f"got {tuple(x_T.shape)} {x_T.dtype} on {x_T.device}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T contains non-finite values")
        with torch.no_grad():
            x = self._fn(x_T)
        t_end = self.run.ts[-1].expand(x.shape[0])
        ok = torch.isfinite(x.flatten(1)).all(1)
        if not bool(ok.all()):  # re-run by sample() for the full error (times, last finite state)
            sample(self.score, self.sde, x_T, **self._sample_kw)
            idx = (~ok).nonzero().flatten().tolist()  # sample() ended finite: the recording differs from it
            raise NonFiniteError(f"{self.spec.name} (recorded, {self.active})", idx, [float(t_end[0])] * len(idx),
                                 None)
        return Solution(x=x, nfe=self.nfe, steps=self.run.steps, t=t_end, solver=self.spec.name,
                        stats={**self.options, "grid": self.ts, "mode": self.active})


def compile_sampler(score: Callable | ScoreModel, sde: ForwardSDE, example: torch.Tensor, *,
                    solver: str | None = None, nfe: int | None = None, steps: int | None = None,
                    grid: str | torch.Tensor | None = None, shift: float | None = None, t_eps: float = 1e-3,
                    diffusion: float | None = None, mode: str = "auto", compile_mode: str | None = None,
                    **options: Any) -> CompiledSampler:
    """A recorded `sample` for inputs shaped like ``example``: ``sampler = compile_sampler(model, sde, x_T, nfe=10)``
    then ``sampler(x_T).x`` per batch. The arguments mean what `sample`'s do (a grid solver; the default sampler
    when ``solver`` is None; ``diffusion`` None or 0: a solve that draws noise is refused); ``mode`` is ``"auto"``,
    ``"cuda_graph"``, ``"compile"`` or ``"eager"`` (module docstring), ``compile_mode`` is passed to
    `torch.compile`. `sample`'s ``generator``, ``seeds``, ``callback``, ``save_trajectory``, ``progress``,
    ``denoise``, ``rtol``, ``atol`` and ``grad`` are refused (ValueError)."""
    return CompiledSampler(score, sde, example, solver=solver, nfe=nfe, steps=steps, grid=grid, shift=shift,
                           t_eps=t_eps, diffusion=diffusion, mode=mode, compile_mode=compile_mode, **options)
