"""Test helpers shared by the solver tests: a small exact Gaussian and the relative RMS error."""

import torch

import scoresolve as ss


def gaussian_3d() -> ss.GaussianMixture:
    """One anisotropic 3-D Gaussian (std 0.55, 0.22, 1.22): its PF-ODE flow is exact (`pf_ode_flow`)."""
    return ss.GaussianMixture([1.0], [[1.0, -2.0, 0.5]], torch.tensor([[0.3, 0.05, 1.5]], dtype=torch.float64))


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of x - ref relative to the RMS of ref."""
    return float((x - ref).square().mean().sqrt() / ref.square().mean().sqrt())
