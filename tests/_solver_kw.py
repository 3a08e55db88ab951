"""Arguments that make any registered solver run, shared by the robustness and property tests."""

import torch

from scoresolve.solvers import REGISTRY, GridSolver
from scoresolve.solvers.calibrated import Calibration


def solve_kw(name: str, steps: int = 10, tol: float = 1e-4, seed: int = 0) -> dict:
    """Steps for grid solvers, tolerances for adaptive ones, the reverse SDE and a seeded generator for stochastic
    ones (the adaptive SDE solver gets loose tolerances: these tests are not about accuracy)."""
    spec = REGISTRY[name]
    kw: dict = {}
    if spec.stochastic:
        kw.update(diffusion=1.0, generator=torch.Generator().manual_seed(seed))
    if name == "calibrated":  # runs on its calibration's grid: the base (uncalibrated) one on a uniform grid in t
        kw["calibration"] = Calibration.base(torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64), afs=False)
    elif isinstance(spec, GridSolver):
        kw["steps"] = steps
    elif not spec.stochastic:
        kw.update(rtol=tol, atol=tol)
    else:
        kw.update(rtol=0.1, atol=0.02)
    return kw
