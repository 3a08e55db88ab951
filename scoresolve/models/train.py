"""Denoising score matching in continuous time for any [`ForwardSDE`][scoresolve.ForwardSDE], with EMA and resumable
checkpoints.

Objective (Song et al. 2021, eq. 7, written for a noise predictor eps_hat = -sigma * score):

    L = E_{t, x0, eps} [ w(t) * mean_d (eps_hat(x_t, t) - eps)^2 ],   x_t = alpha(t) x0 + sigma(t) eps,

with t ~ U(t_eps, T). The score-matching weighting lambda(t) of the score error becomes w(t) = lambda(t) / sigma^2:

* ``"eps"``: w = 1, DDPM's L_simple.
* ``"score"``: lambda = sigma^2, the standard weighting of score_sde. It gives w = 1 too: with an eps network the
  two are the same objective (kept as a name so that configs can say which convention they mean).
* ``"likelihood"``: lambda = g^2 (Song, Durkan, Murray & Ermon 2021), w = g^2 / sigma^2; then L / 2 integrated over
  t is the KL bound that makes the PF-ODE likelihood a target. w grows like 1/t near t = 0 (VP), so the estimate
  is noisy; ``importance_sampling=True`` draws t from q(t) proportional to g^2 / sigma^2 instead and weighs by
  w / q, a constant. Because g^2 = d sigma^2/dt - 2 f sigma^2 for every SDE here, g^2 / sigma^2 = -2 d lambda/dt
  (lambda the half log-SNR), so q is uniform in log-SNR: lam ~ U(lam(T), lam(t_eps)), t = t(lam), and
  w / q = 2 (lam(t_eps) - lam(T)).

Flow matching: on a process with ``velocity_form`` (an interpolant, e.g. ``--sde rf``, `RectifiedFlow`) the network
predicts the velocity instead, with the conditional flow-matching loss (Lipman et al. 2023; Liu et al. 2023)

    L = E_{t, x0, eps} [ mean_d (u_hat(x_t, t) - u)^2 ],   u = alpha'(t) x0 + sigma'(t) eps   (eps - x0 for rf),

t ~ U(t_eps, T) or, with ``t_sampling="logit_normal"``, t = t_eps + (T - t_eps) sigmoid(m + s n), n ~ N(0, 1)
(SD3's logit-normal sampling, Esser et al. 2024, m = ``logit_mean``, s = ``logit_std``); the weighting must be
"eps" (no weight) and importance sampling does not apply. Its checkpoints record ``prediction="flow"``.

PFGM++ (``sde="pfgmpp"``, `scoresolve.PFGMPP`, D from ``sde_kwargs``): the network is a denoiser (x0 prediction)
with EDM's preconditioning (`scoresolve.models.precond.EDMPrecond`, ``sigma_data``), trained as the PFGM++ reference
trains (Newbeeer/pfgmpp, ``training/loss.py`` ``EDMLoss`` with ``pfgmpp=True``):

    L = E_{sigma, y, x} [ lambda(sigma) mean_d (D_theta(x, sigma) - y)^2 ],   x ~ p_r(. | y), r = sigma sqrt(D),

log sigma ~ N(p_mean, p_std^2) (EDM's -1.2, 1.2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
and x drawn by `PFGMPP.perturb` (the reference clips its Beta draw to [1e-3, 1 - 1e-3]; here it is exact). The
reference sums over elements where this takes the mean (a constant factor N). Checkpoints record
``prediction="x0"`` and the process's D, so `load_checkpoint` rebuilds ``PFGMPP(D=...)``.

Training state (`train`): Adam, linear learning-rate warm-up, gradient-norm clipping, an EMA of the weights
(decay ``min(ema_decay, (1 + step) / (10 + step))``), one ``torch.Generator`` seeded with ``seed`` for every random
draw (batches, dequantization, t, noise) and the network initialised under ``torch.manual_seed(seed)``.
Checkpoints hold the weights, EMA, optimizer, generator state, step, loss history and config, so a resumed run
continues bit-identically on the same machine. `export_model` writes the EMA weights and config only
(float32 or float16) and `load_checkpoint` reads either kind back as a [`ScoreModel`][scoresolve.ScoreModel].
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._utils import bcast
from ..pfgm import PFGMPP
from ..score import ScoreModel
from ..sde import SDE_NAMES, ForwardSDE, sde_from_name
from .mlp import MLPScoreNet
from .precond import EDMPrecond
from .unet import UNet

SDES = SDE_NAMES  # the Gaussian forward SDEs and interpolants --sde and TrainConfig.sde take
PROCESSES = ("pfgmpp",)  # and the non-Gaussian processes (PFGM++: D via sde_kwargs, e.g. --sde-arg D=128)
WEIGHTINGS = ("eps", "score", "likelihood")
T_SAMPLINGS = ("uniform", "logit_normal")
STATE_FORMAT = "scoresolve.train_state/1"
MODEL_FORMAT = "scoresolve.model/1"
STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"

# config fields that a resumed run may change (everything else must match the checkpoint)
_RESUMABLE_CHANGES = ("steps", "checkpoint_every")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    ``model="auto"`` picks the U-Net for image data ``[C, H, W]`` and the MLP otherwise; ``model_kwargs`` go to
    the network's constructor, ``sde_kwargs`` to the SDE's. ``split_seed`` fixes the digits train/test split.
    ``t_sampling`` is ``"uniform"`` (t ~ U(t_eps, T)) or ``"logit_normal"`` (``logit_mean``, ``logit_std``; module
    docstring). ``p_mean``, ``p_std`` (log-normal sigma) and ``sigma_data`` (EDM's preconditioning) apply to
    ``sde="pfgmpp"`` only (module docstring).
    """

    data: str = "moons"
    sde: str = "vp"
    sde_kwargs: dict = field(default_factory=dict)
    model: str = "auto"
    model_kwargs: dict = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weighting: str = "eps"
    importance_sampling: bool = False
    t_eps: float = 1e-5
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    split_seed: int = 0
    checkpoint_every: int = 500
    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.sde not in SDES and self.sde not in PROCESSES:
            raise ValueError(f"unknown sde {self.sde!r}; expected one of {sorted(SDES) + list(PROCESSES)}")
        if not (math.isfinite(self.p_mean) and math.isfinite(self.p_std) and self.p_std > 0):
            raise ValueError("need a finite p_mean and p_std > 0")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive number, got {self.sigma_data}")
        if self.sde in PROCESSES and (self.weighting != "eps" or self.importance_sampling
                                      or self.t_sampling != "uniform"):
            raise ValueError(f"{self.sde} trains with EDM's denoiser loss (log-normal sigma: p_mean, p_std; weight "
                             "lambda(sigma)): leave weighting, importance_sampling and t_sampling at their defaults")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {self.t_sampling!r}; expected one of {T_SAMPLINGS}")
        if self.t_sampling != "uniform" and self.importance_sampling:
            raise ValueError("importance_sampling draws its own t: use it with t_sampling='uniform'")
        if not (math.isfinite(self.logit_mean) and math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError("need a finite logit_mean and logit_std > 0")
        if self.model not in ("auto", "mlp", "unet"):
            raise ValueError(f"unknown model {self.model!r}; expected 'auto', 'mlp' or 'unet'")
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps must be >= 0, batch_size and checkpoint_every >= 1")
        if not (self.lr > 0 and 0 <= self.ema_decay < 1 and self.grad_clip >= 0 and self.warmup >= 0):
            raise ValueError("need lr > 0, 0 <= ema_decay < 1, grad_clip >= 0 (0: off), warmup >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """What `train` returns: the trained network, its EMA copy, the SDE and the loss of every step."""

    net: nn.Module
    ema: nn.Module
    sde: ForwardSDE
    config: TrainConfig
    step: int
    losses: list
    shape: tuple
    seconds: float = 0.0

    def score_model(self, use_ema: bool = True) -> ScoreModel:
        """The (EMA) network as a ScoreModel predicting eps (flow on a ``velocity_form`` process, x0 on PFGM++) with
        time t."""
        return ScoreModel(self.ema if use_ema else self.net, self.sde, prediction=prediction_of(self.sde), time="t")


# --------------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------------
def build_sde(name: str, **kwargs: Any) -> ForwardSDE:
    """The SDE named ``name`` (``vp``, ``subvp``, ``ve``, ``edm``, ``cosine``, ``rf``, ``trig``; or the process
    ``pfgmpp``) with constructor keyword arguments."""
    return sde_from_name(name, **kwargs)


def build_network(model: str, shape: Sequence[int], T: float = 1.0, **kwargs: Any) -> nn.Module:
    """An eps network for samples of ``shape``: ``unet`` (``[C, H, W]``), ``mlp`` (any), ``auto``."""
    shape = tuple(int(s) for s in shape)
    if model == "auto":
        model = "unet" if len(shape) == 3 else "mlp"
    if model == "unet":
        if len(shape) != 3:
            raise ValueError(f"the U-Net needs image samples [C, H, W], got shape {shape}")
        return UNet(in_channels=shape[0], T=T, **kwargs)
    if model == "mlp":
        return MLPScoreNet(shape=shape, T=T, **kwargs)
    raise ValueError(f"unknown model {model!r}; expected 'auto', 'mlp' or 'unet'")


def _resolved_model(config: TrainConfig, shape: Sequence[int]) -> str:
    return config.model if config.model != "auto" else ("unet" if len(shape) == 3 else "mlp")


def prediction_of(sde: ForwardSDE) -> str:
    """What a network trained here predicts under ``sde``: ``"x0"`` on PFGM++ (a preconditioned denoiser),
    ``"flow"`` on a ``velocity_form`` process (flow matching), ``"eps"`` otherwise (denoising score matching)."""
    if isinstance(sde, PFGMPP):
        return "x0"
    return "flow" if getattr(sde, "velocity_form", False) else "eps"


def _model_for(arch: str, shape: Sequence[int], sde: Any, config: TrainConfig) -> nn.Module:
    """The network a run trains: ``build_network``'s, wrapped in EDM's preconditioning on PFGM++ (its raw network
    then takes c_noise = log(sigma) / 4 as time, so it is built with T = 1)."""
    if isinstance(sde, PFGMPP):
        return EDMPrecond(build_network(arch, shape, T=1.0, **config.model_kwargs), config.sigma_data)
    return build_network(arch, shape, T=sde.T, **config.model_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------------------------------
def loss_weight(sde: ForwardSDE, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) = lambda(t) / sigma(t)^2 of the eps objective (module docstring), shape like t."""
    if weighting in ("eps", "score"):
        return torch.ones_like(t)
    if weighting == "likelihood":
        return sde.g2(t) / sde.sigma(t) ** 2
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def sample_time(
    sde: ForwardSDE,
    n: int,
    t_eps: float,
    generator: torch.Generator | None = None,
    importance_sampling: bool = False,
    dtype: torch.dtype = torch.float32,
    logit_normal: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training times ``[n]``: t ~ U(t_eps, T), or with importance sampling t ~ q ∝ g^2/sigma^2 (uniform in log-SNR),
    or with ``logit_normal=(m, s)`` t = t_eps + (T - t_eps) sigmoid(m + s n), n ~ N(0, 1) (SD3).

    Returns (t, is_weight): ``is_weight`` is None for uniform or logit-normal t, else the constant w(t) / q(t)
    ``[n]`` that replaces the likelihood weight (module docstring).
    """
    if logit_normal is not None:
        if importance_sampling:
            raise ValueError("importance_sampling and logit_normal exclude each other")
        m, s = logit_normal
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (t_eps + (sde.T - t_eps) * torch.sigmoid(m + s * z)).to(dtype), None
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if not importance_sampling:
        return (t_eps + (sde.T - t_eps) * u).to(dtype), None
    lam = sde.log_snr(torch.tensor([t_eps, sde.T], dtype=torch.float64))
    lam_hi, lam_lo = float(lam[0]), float(lam[1])
    t = sde.t_from_log_snr(lam_lo + (lam_hi - lam_lo) * u).clamp(t_eps, sde.T)
    return t.to(dtype), torch.full((n,), 2 * (lam_hi - lam_lo), dtype=dtype)


def dsm_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sde: ForwardSDE,
    x0: torch.Tensor,
    weighting: str = "eps",
    t_eps: float = 1e-5,
    generator: torch.Generator | None = None,
    importance_sampling: bool = False,
    logit_normal: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Monte-Carlo estimate of the weighted denoising score-matching loss on a batch x0 (one t per sample;
    ``logit_normal=(m, s)``: logit-normal t, see `sample_time`)."""
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling applies to weighting='likelihood' only")
    t, is_w = sample_time(sde, x0.shape[0], t_eps, generator, importance_sampling, dtype=x0.dtype,
                          logit_normal=logit_normal)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    xt = sde.perturb(x0, t, noise=noise)
    per_sample = (net(xt, t) - noise).square().flatten(1).mean(1)
    w = is_w.to(x0.device) if is_w is not None else loss_weight(sde, t, weighting)
    return (w * per_sample).mean()


def edm_denoiser_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: PFGMPP,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Monte-Carlo estimate of PFGM++'s denoiser loss mean_b lambda(sigma) mean_d (D(x, sigma) - y)^2 on a batch
    ``x0`` (module docstring): one log-normal sigma per sample, then x ~ p_r(. | y) by ``process.perturb``, all from
    ``generator``. ``net(x, sigma)`` is the denoiser."""
    n = x0.shape[0]
    sigma = torch.exp(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64))
    x = process.perturb(x0.cpu(), sigma, generator).to(x0.device)
    sigma = sigma.to(dtype=x0.dtype, device=x0.device)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * (net(x, sigma) - x0).square().flatten(1).mean(1)).mean()


def flow_matching_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sde: ForwardSDE,
    x0: torch.Tensor,
    t_eps: float = 1e-5,
    generator: torch.Generator | None = None,
    logit_normal: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Monte-Carlo estimate of the conditional flow-matching loss mean |u_hat(x_t, t) - u|^2 on a batch x0 (one t
    per sample; u = alpha'(t) x0 + sigma'(t) eps, module docstring). t then eps are drawn from ``generator``."""
    t, _ = sample_time(sde, x0.shape[0], t_eps, generator, dtype=x0.dtype, logit_normal=logit_normal)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    a, s = sde.marginal(t)
    da, ds = sde.dalpha_dt(t), sde.dsigma_dt(t)
    xt = bcast(a, x0) * x0 + bcast(s, x0) * noise
    target = bcast(da, x0) * x0 + bcast(ds, x0) * noise
    return (net(xt, t) - target).square().flatten(1).mean(1).mean()


# --------------------------------------------------------------------------------------------------------------------
# EMA, checkpoints
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net (parameters; buffers are copied)."""
    ep, np_ = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(ep, np_, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_resume_config(saved: dict, config: TrainConfig) -> None:
    new = config.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}  # states written before a field existed hold its default
    diff = {k: (saved.get(k), v) for k, v in new.items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume: the run's settings differ from the checkpoint's ({lines})")


def export_model(result: TrainResult, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Write the EMA weights (in ``dtype``) and the config, enough for `load_checkpoint` (no optimizer)."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in result.ema.state_dict().items()}
    obj = {
        "format": MODEL_FORMAT,
        "config": result.config.to_dict(),
        "shape": list(result.shape),
        "arch": _resolved_model(result.config, result.shape),
        "step": result.step,
        "seed": result.config.seed,
        "prediction": prediction_of(result.sde),
        "ema": state,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_save(obj, path)


def load_checkpoint(
    path: str, device: torch.device | str = "cpu", use_ema: bool = True
) -> tuple[ScoreModel, ForwardSDE, TrainConfig]:
    """(ScoreModel, sde, config) from a training state (``train_state.pt``) or an exported model file.

    The ScoreModel predicts what the checkpoint records (``"eps"``, ``"flow"`` for flow matching on an
    interpolant, ``"x0"`` for PFGM++: the sde is then ``PFGMPP(D=...)``; files without the record: what
    `prediction_of` gives for their SDE).

    The network is in eval mode, float32, with parameters that do not require gradients (gradients with respect
    to x, as the likelihood needs, still work). ``use_ema=False`` takes the raw weights of a training state.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    fmt = obj.get("format")
    if fmt not in (STATE_FORMAT, MODEL_FORMAT):
        raise ValueError(f"{path} is not a scoresolve checkpoint (format {fmt!r})")
    config = TrainConfig.from_dict(obj["config"])
    sde = build_sde(config.sde, **config.sde_kwargs)
    net = _model_for(obj["arch"], obj["shape"], sde, config)
    key = "ema" if (use_ema or fmt == MODEL_FORMAT) else "model"
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in obj[key].items()})
    net = net.to(device).eval().requires_grad_(False)
    prediction = obj.get("prediction", prediction_of(sde))
    return ScoreModel(net, sde, prediction=prediction, time="t"), sde, config


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------
def _data_source(config: TrainConfig, data: Any) -> tuple[Callable[[int, torch.Generator], torch.Tensor], tuple]:
    if data is None:
        from ..data import batch_sampler

        return batch_sampler(config.data, seed=config.split_seed)
    if torch.is_tensor(data):
        if data.ndim < 2:
            raise ValueError(f"data must have shape [N, ...], got {tuple(data.shape)}")
        fixed = data

        def draw(n: int, g: torch.Generator) -> torch.Tensor:
            return fixed[torch.randint(0, fixed.shape[0], (n,), generator=g)]

        return draw, tuple(fixed.shape[1:])
    if callable(data):
        probe = data(1, torch.Generator().manual_seed(0))
        return data, tuple(probe.shape[1:])
    raise TypeError("data must be None (use config.data), a tensor [N, ...] or a callable (n, generator) -> batch")


def train(
    config: TrainConfig,
    *,
    data: Any = None,
    out_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train an eps network by denoising score matching, a velocity network by flow matching on a
    ``velocity_form`` process, or a preconditioned denoiser on PFGM++ (module docstring), and return it with its
    EMA copy.

    Args:
        config: the run's settings.
        data: None (the dataset named by ``config.data``, see `scoresolve.data.batch_sampler`), a tensor
            ``[N, ...]`` (batches drawn with replacement) or a callable ``draw(n, generator) -> [n, ...]``.
        out_dir: directory for ``train_state.pt``, written every ``config.checkpoint_every`` steps and at the end.
        resume: continue from ``out_dir/train_state.pt`` if it exists (settings other than ``steps`` and
            ``checkpoint_every`` must match).
        progress: show a tqdm progress bar.
    """
    draw, shape = _data_source(config, data)
    sde = build_sde(config.sde, **config.sde_kwargs)
    flow = prediction_of(sde) == "flow"
    if flow and (config.weighting != "eps" or config.importance_sampling):
        raise ValueError(f"flow matching ({config.sde}) has no weighting: use weighting='eps' without "
                         "importance_sampling")
    logit_normal = (config.logit_mean, config.logit_std) if config.t_sampling == "logit_normal" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = _model_for(config.model, shape, sde, config)
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []
    state_path = os.path.join(out_dir, STATE_FILE) if out_dir else None
    if resume:
        if state_path is None:
            raise ValueError("resume needs out_dir")
        if os.path.exists(state_path):
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            if st.get("format") != STATE_FORMAT:
                raise ValueError(f"{state_path} is not a training state")
            _check_resume_config(st["config"], config)
            net.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["optimizer"])
            gen.set_state(st["rng"])
            step, losses = int(st["step"]), list(st["losses"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    def save() -> None:
        if state_path is None:
            return
        _atomic_save(
            {
                "format": STATE_FORMAT,
                "config": config.to_dict(),
                "shape": list(shape),
                "arch": _resolved_model(config, shape),
                "step": step,
                "seed": config.seed,
                "prediction": prediction_of(sde),
                "model": net.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": gen.get_state(),
                "losses": losses,
            },
            state_path,
        )

    bar = None
    if progress and step < config.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.data}/{config.sde}", unit="step")
    net.train()
    t0 = time.perf_counter()
    running = None
    while step < config.steps:
        lr = config.lr * min(1.0, (step + 1) / config.warmup) if config.warmup else config.lr
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = draw(config.batch_size, gen).to(device)
        if isinstance(sde, PFGMPP):
            loss = edm_denoiser_loss(net, sde, x0, gen, config.p_mean, config.p_std, config.sigma_data)
        elif flow:
            loss = flow_matching_loss(net, sde, x0, config.t_eps, gen, logit_normal)
        else:
            loss = dsm_loss(net, sde, x0, config.weighting, config.t_eps, gen, config.importance_sampling,
                            logit_normal=logit_normal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        ema_update(ema, net, min(config.ema_decay, (1 + step) / (10 + step)))
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step}")
        losses.append(value)
        running = value if running is None else 0.98 * running + 0.02 * value
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save()
    if bar is not None:
        bar.close()
    net.eval()
    ema.eval()
    return TrainResult(net, ema, sde, config, step, losses, shape, time.perf_counter() - t0)
