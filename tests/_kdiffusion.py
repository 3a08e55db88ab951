"""Load k-diffusion's samplers (PyPI ``k-diffusion==0.1.1.post1``) without importing the package, for comparisons.

``import k_diffusion`` imports its models, CLIP and torchvision; the samplers need none of that. We load only
``k_diffusion/sampling.py`` and ``utils.py`` from the installed package directory under a private package name,
with throw-away stand-ins for the imports of ``utils.py`` that are missing here (they are only used by functions
the samplers never call), so nothing is left in ``sys.modules`` under the real names.

k-diffusion works in EDM's variables: x_kd = x / alpha, sigma_kd = sigma / alpha = exp(-lambda), with a denoiser
D(x_kd, sigma_kd) = E[x0 | x_t] at the time t whose log-SNR is -log sigma_kd. :func:`k_diffusion_denoiser` builds it
from a score callable and a forward SDE; :func:`to_kd` / :func:`from_kd` / :func:`kd_sigmas` convert states and
grids. Install with ``pip install --no-deps k-diffusion==0.1.1.post1``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Callable

import torch

from scoresolve.score import ScoreModel
from scoresolve.solvers import EvalCounter

_PKG = "_scoresolve_kdiffusion"  # private name: never shadows a real ``k_diffusion`` import
_STUBS = ("PIL", "PIL.Image", "safetensors", "torchvision", "torchvision.transforms",
          "torchvision.transforms.functional")


@contextlib.contextmanager
def _stand_ins_for_missing(names: tuple[str, ...]):
    """Temporarily put empty modules in sys.modules for those of ``names`` that cannot be imported."""
    added = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            mod = types.ModuleType(name)
            mod.Image = types.SimpleNamespace()  # ``from PIL import Image``
            mod.functional = mod  # ``from torchvision.transforms import functional``
            sys.modules[name] = mod
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _load(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{_PKG}.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def load_k_diffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's ``sampling`` module, or None if k-diffusion is not installed (or cannot be loaded)."""
    if f"{_PKG}.sampling" in sys.modules:
        return sys.modules[f"{_PKG}.sampling"]
    try:
        spec = importlib.util.find_spec("k_diffusion")  # locates the package without executing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [pkg_dir]
    sys.modules[_PKG] = pkg
    try:
        with _stand_ins_for_missing(_STUBS):
            pkg.utils = _load("utils", f"{pkg_dir}/utils.py")
        pkg.sampling = _load("sampling", f"{pkg_dir}/sampling.py")
    except Exception:
        for key in [k for k in sys.modules if k == _PKG or k.startswith(_PKG + ".")]:
            sys.modules.pop(key, None)
        return None
    return pkg.sampling


def kd_sigmas(sde, ts: torch.Tensor) -> torch.Tensor:
    """k-diffusion's sigma grid for our times: sigma_kd = sigma/alpha = exp(-lambda(t)) (float64)."""
    return torch.exp(-sde.log_snr(ts.to(torch.float64)))


def to_kd(x: torch.Tensor, sde, t: float) -> torch.Tensor:
    """Our state at time t in k-diffusion's variable x / alpha(t)."""
    alpha, _ = sde.marginal(torch.tensor(float(t), dtype=torch.float64))
    return x / float(alpha)


def from_kd(x_kd: torch.Tensor, sde, t: float) -> torch.Tensor:
    """k-diffusion's state at sigma_kd(t) back in our variable alpha(t) x_kd."""
    alpha, _ = sde.marginal(torch.tensor(float(t), dtype=torch.float64))
    return x_kd * float(alpha)


def k_diffusion_denoiser(score: Callable, sde, count: bool = False):
    """A k-diffusion denoiser D(x_kd, sigma_kd) = x0_hat(alpha x_kd, t(sigma_kd)) from a score and a forward SDE.

    With ``count=True`` returns (denoiser, counter) where ``counter.calls`` counts the denoiser's evaluations.
    """
    model = ScoreModel.wrap(score, sde)

    def denoiser(x_kd: torch.Tensor, sigma_kd: torch.Tensor) -> torch.Tensor:
        sigma_kd = torch.as_tensor(sigma_kd).to(torch.float64).expand(x_kd.shape[0])
        t = sde.t_from_log_snr(-torch.log(sigma_kd))
        alpha = torch.exp(sde._log_alpha(t)).to(x_kd.dtype).reshape((-1,) + (1,) * (x_kd.ndim - 1))
        return model.x0(alpha * x_kd, t.to(x_kd.dtype))

    if not count:
        return denoiser
    counter = EvalCounter(denoiser)
    return counter, counter
