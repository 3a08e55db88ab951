"""Test-wide settings: one intra-op thread per test process (tests use small tensors, where thread hand-offs cost
far more than they save; CI runs two pytest-xdist workers to use both cores)."""

import inspect
import types

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


class _Float64(types.ModuleType):
    """A module proxy whose ``float32`` is ``float64`` (for torch and numpy as seen by one diffusers module)."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str):
        return getattr(self._real, "float64" if name == "float32" else name)


@pytest.fixture
def diffusers_in_float64(monkeypatch):
    """``patch(cls)`` runs a diffusers scheduler class's own code with float64 wherever it says float32 (its sigmas,
    the state in ``step``), for parity tests at float64 precision (tests/test_adapters_*.py)."""

    def patch(cls):
        module = inspect.getmodule(cls)
        monkeypatch.setattr(module, "torch", _Float64(torch))
        monkeypatch.setattr(module, "np", _Float64(np))

    return patch
