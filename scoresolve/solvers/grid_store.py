"""The store of tuned time grids: `TunedGrid` (a fitted grid and how it was obtained), saved as JSON by name.

It lives with the grids (``sample(..., grid="tuned:<name>")`` reads it through
`scoresolve.solvers.time_grids.time_grid`); the optimiser that fits grids is `scoresolve.tuning`, which imports this
module, never the other way round.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._store import check_name, read_record, store_dir, write_json
from ._grid import check_grid

GRID_DIR_ENV = "SCORESOLVE_GRID_DIR"
_FORMAT = 1


@dataclass
class TunedGrid:
    """A fitted time grid and how it was obtained.

    Attributes:
        grid: the decreasing float64 times, ``steps + 1`` of them, from T to t_eps; use as ``sample(..., grid=grid)``.
        solver: the solver it was tuned for; ``nfe``/``steps`` its budget.
        method: ``"gits"`` or ``"descent"`` (see the module docstring); ``start``: the grid the descent started from
            (``"gits"`` or ``"default"``).
        train_error: the objective (mean per-sample relative error by default) of the solver's end point on this
            grid against the reference end, on the tuning samples; ``default_error`` and ``gits_error`` the same for
            the solver's default grid and for ``gits_grid``, GITS's grid (the DP's result).
        evaluations: network evaluations per tuning sample spent on tuning (reference solve, DP costs, default-grid and
            descent solves); ``calls`` the batched network calls; ``seconds`` wall time.
        num_samples: tuning samples; ``candidates``: candidate times of the DP; ``sde``: repr of the process.
    """

    grid: torch.Tensor
    solver: str
    nfe: int
    steps: int
    method: str
    t_eps: float
    T: float
    train_error: float
    default_error: float
    gits_error: float
    evaluations: int
    calls: int
    seconds: float
    num_samples: int
    candidates: int
    sde: str = ""
    start: str = "gits"
    default_grid: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    gits_grid: torch.Tensor | None = None
    name: str | None = None

    def __repr__(self) -> str:
        return (f"TunedGrid(solver={self.solver!r}, nfe={self.nfe}, method={self.method!r}, "
                f"train_error={self.train_error:.3e} (default grid {self.default_error:.3e}, "
                f"gits {self.gits_error:.3e}), evaluations={self.evaluations}, seconds={self.seconds:.1f}, "
                f"grid={[round(t, 5) for t in self.grid.tolist()]})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [float(t) for t in self.grid.tolist()]
        d["gits_grid"] = None if self.gits_grid is None else [float(t) for t in self.gits_grid.tolist()]
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TunedGrid":
        d = dict(d)
        d.pop("format", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fields in a saved grid: {unknown}")
        d["grid"] = grid = check_grid(torch.tensor(d["grid"], dtype=torch.float64), float(d["T"]))
        # the file must agree with itself: an edited grid, step count or end time is refused, never run as it is
        if len(grid) != int(d["steps"]) + 1:
            raise ValueError(f"its grid has {len(grid) - 1} steps, but it records steps={d['steps']}")
        ends = ((float(grid[0]), float(d["T"])), (float(grid[-1]), float(d["t_eps"])))
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in ends):
            raise ValueError(f"its grid runs from {float(grid[0])} to {float(grid[-1])}, but it records T={d['T']}, "
                             f"t_eps={d['t_eps']}")
        from ._registry import REGISTRY, GridSolver  # the solver modules register on import of the package

        spec = REGISTRY.get(d["solver"])
        if spec is None:
            raise ValueError(f"it was tuned for the unknown solver {d['solver']!r}")
        if not isinstance(spec, GridSolver):
            raise ValueError(f"it was tuned for {d['solver']!r}, which is not a grid solver")
        if spec.nfe_for_steps(int(d["steps"]), d.get("options") or {}) != int(d["nfe"]):
            raise ValueError(f"{d['solver']} takes {spec.nfe_for_steps(int(d['steps']), d.get('options') or {})} "
                             f"evaluations for {d['steps']} steps, but it records nfe={d['nfe']}")
        if d.get("gits_grid") is not None:
            d["gits_grid"] = torch.tensor(d["gits_grid"], dtype=torch.float64)
        return cls(**d)

    def save(self, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
        """Write the record as JSON ``<directory>/<name>.json`` (see `grid_dir`); returns the path."""
        return save_grid(self, name, directory)


def grid_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where grids are saved: ``directory``, else ``$SCORESOLVE_GRID_DIR``, else ``$XDG_CACHE_HOME/scoresolve/grids``
    (``~/.cache/scoresolve/grids``)."""
    return store_dir(directory, GRID_DIR_ENV, "grids")


def _check_name(name: str) -> str:
    return check_name(name, "grid")


def save_grid(tuned: TunedGrid, name: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Save ``tuned`` under ``name`` (default: its own ``name``) as JSON in `grid_dir`; overwrites; returns the path."""
    name = _check_name(name if name is not None else (tuned.name or ""))
    tuned.name = name
    return write_json(grid_dir(directory) / f"{name}.json", tuned.to_dict())


def load_grid(name: str, directory: str | os.PathLike | None = None) -> TunedGrid:
    """The grid saved under ``name`` (see `save_grid`); ``sample(..., grid="tuned:<name>")`` does the same lookup."""
    return read_record(grid_dir(directory), name, "grid", GRID_DIR_ENV, TunedGrid.from_dict)
