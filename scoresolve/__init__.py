"""scoresolve: numerical SDE/ODE solvers for score-based generative models.

A forward SDE is the single source of truth; reverse processes (reverse SDE, probability-flow ODE and the whole
same-marginal family between them) are derived from it, and generic solvers integrate them.
"""

from . import adapters  # noqa: F401  (scoresolve.adapters: diffusers, k-diffusion, score_sde models)
from .analytic import GaussianMixture
from .calibration import calibrate
from .compiled import CompiledSampler, compile_sampler
from .control_variate import GaussianControlVariate
from .evaluation import EvalSummary, evaluate_dataset
from .interpolant import Interpolant, RectifiedFlow, TrigonometricInterpolant, flux_shift, sd3_shift
from .likelihood import LikelihoodResult, log_likelihood
from .pfgm import PFGM, PFGMPP, PFGMEDMView
from .pointcloud import PointCloud
from .process import CAPABILITIES, IncompatibleProcessError, Process
from .quantization import (
    TruncatedNormalDequantizer,
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
    dequantized_bpd,
    train_dequantizer,
    uniform_dequantize,
)
from .reverse import ReverseProcess
from .reverse_variance import MomentEstimate, cached_moments, estimate_moments, load_moments
from .sampling import list_solvers, sample
from .score import ScoreModel, classifier_free_guidance, classifier_guidance, convert
from .sde import EDMSDE, SDE_NAMES, VESDE, VPSDE, CosineVPSDE, DiscreteVPSDE, ForwardSDE, SubVPSDE, sde_from_name
from .solvers import NonFiniteError, Solution, time_grid
from .solvers.calibrated import Calibration, load_calibration
from .variational import ElboResult, elbo

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "calibrate",
    "load_calibration",
    "CompiledSampler",
    "compile_sampler",
    "CosineVPSDE",
    "DiscreteVPSDE",
    "EDMSDE",
    "ElboResult",
    "EvalSummary",
    "MomentEstimate",
    "ForwardSDE",
    "CAPABILITIES",
    "IncompatibleProcessError",
    "Process",
    "NonFiniteError",
    "Solution",
    "GaussianMixture",
    "PFGM",
    "PFGMPP",
    "PFGMEDMView",
    "PointCloud",
    "Interpolant",
    "RectifiedFlow",
    "TrigonometricInterpolant",
    "flux_shift",
    "sd3_shift",
    "LikelihoodResult",
    "ReverseProcess",
    "SDE_NAMES",
    "ScoreModel",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "classifier_free_guidance",
    "classifier_guidance",
    "bits_per_dim",
    "convert",
    "dequantized_bpd",
    "elbo",
    "estimate_moments",
    "cached_moments",
    "load_moments",
    "evaluate_dataset",
    "list_solvers",
    "log_likelihood",
    "sample",
    "sde_from_name",
    "time_grid",
    "uniform_dequantize",
    "GaussianControlVariate",
    "UniformDequantizer",
    "TruncatedNormalDequantizer",
    "VariationalDequantizer",
    "train_dequantizer",
]
