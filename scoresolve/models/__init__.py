"""Small reference score networks, denoising-score-matching and flow-matching training, and shipped digits models.

    from scoresolve.models import UNet, MLPScoreNet, TrainConfig, load_checkpoint, load_digits_model
    from scoresolve.models.train import train

    model, sde = load_digits_model()          # U-Net trained on 8x8 digits under the VP SDE (eps prediction)
    x = scoresolve.sample(model, sde, sde.prior_sample((16, 1, 8, 8)), solver="dpmpp_2m", nfe=20).x
    model, sde = load_digits_flow_model()     # the same U-Net trained by flow matching (RectifiedFlow, flow prediction)
    model, sde = load_digits_pfgmpp_model()   # the same U-Net as a PFGM++ denoiser (PFGMPP(D=128), x0 prediction)

Networks take continuous t in [0, T] and predict eps (the velocity under an interpolant such as rectified flow); wrap
them with ``ScoreModel(net, sde, prediction="eps", time="t")`` (``prediction="flow"``), as `load_checkpoint` does.
Training and checkpoint formats: `scoresolve.models.train`.
"""

from __future__ import annotations

import os

from .mlp import MLPScoreNet, TimeEmbedding
from .precond import EDMPrecond
from .unet import UNet, num_parameters

# training names load on first use, so that ``scoresolve.models.train`` stays the module (the function is
# ``scoresolve.models.train.train``) and importing the networks does not import the trainer
_TRAIN_NAMES = (
    "TrainConfig",
    "TrainResult",
    "build_network",
    "build_sde",
    "dsm_loss",
    "edm_denoiser_loss",
    "export_model",
    "flow_matching_loss",
    "load_checkpoint",
)


def __getattr__(name: str):
    if name in _TRAIN_NAMES:
        from . import train as _train

        return getattr(_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
DIGITS_CHECKPOINT = os.path.join(CHECKPOINT_DIR, "digits_vp.pt")
DIGITS_FLOW_CHECKPOINT = os.path.join(CHECKPOINT_DIR, "digits_flow.pt")
DIGITS_PFGMPP_CHECKPOINT = os.path.join(CHECKPOINT_DIR, "digits_pfgmpp.pt")


def load_digits_model(device: str = "cpu"):
    """(ScoreModel, sde) of the shipped U-Net trained on scikit-learn's digits under the VP SDE.

    The model was trained on uniformly dequantized digits scaled to [-1, 1] (17 levels, see
    [`scoresolve.data`][scoresolve.data]), shape ``[batch, 1, 8, 8]``; ``checkpoints/README.md`` records how and what it
    scores.
    """
    if not os.path.exists(DIGITS_CHECKPOINT):
        raise FileNotFoundError(f"the shipped digits checkpoint is missing: {DIGITS_CHECKPOINT}")
    from .train import load_checkpoint

    model, sde, _ = load_checkpoint(DIGITS_CHECKPOINT, device=device)
    return model, sde


def load_digits_flow_model(device: str = "cpu"):
    """(ScoreModel, RectifiedFlow()) of the shipped U-Net trained on scikit-learn's digits by flow matching.

    Same data, network and training settings as `load_digits_model`'s; x_t = (1 - t) x0 + t eps on [0, 1] and the
    network predicts the velocity u = eps - x0 (``prediction="flow"``). Sample from t = 1 (the prior N(0, I) is
    exact there); ``checkpoints/README.md`` records how it was trained and what it scores.
    """
    if not os.path.exists(DIGITS_FLOW_CHECKPOINT):
        raise FileNotFoundError(f"the shipped digits flow checkpoint is missing: {DIGITS_FLOW_CHECKPOINT}")
    from .train import load_checkpoint

    model, sde, _ = load_checkpoint(DIGITS_FLOW_CHECKPOINT, device=device)
    return model, sde


def load_digits_pfgmpp_model(device: str = "cpu"):
    """(ScoreModel, PFGMPP(D=128)) of the shipped U-Net trained on scikit-learn's digits as a PFGM++ denoiser.

    Same data and U-Net as `load_digits_model`'s, wrapped in EDM's preconditioning
    (`scoresolve.models.precond.EDMPrecond`) and trained with the PFGM++ reference's loss; the ScoreModel predicts
    x0 with time t = sigma. Sample from the prior at sigma_max = 80 down to ``sde.sigma_min`` (e.g.
    ``grid=sde.karras_grid(18)`` with heun, or through ``sde.edm_view()`` for dpmpp_2m / unipc);
    ``checkpoints/README.md`` records how it was trained and what it scores.
    """
    if not os.path.exists(DIGITS_PFGMPP_CHECKPOINT):
        raise FileNotFoundError(f"the shipped digits PFGM++ checkpoint is missing: {DIGITS_PFGMPP_CHECKPOINT}")
    from .train import load_checkpoint

    model, sde, _ = load_checkpoint(DIGITS_PFGMPP_CHECKPOINT, device=device)
    return model, sde


BUILTIN_MODELS = {"digits": load_digits_model, "digits_flow": load_digits_flow_model,
                  "digits_pfgmpp": load_digits_pfgmpp_model}
"""The shipped models by the name the commands' ``--model`` takes: name -> loader returning (ScoreModel, sde)."""


__all__ = [
    "CHECKPOINT_DIR",
    "BUILTIN_MODELS",
    "DIGITS_CHECKPOINT",
    "DIGITS_FLOW_CHECKPOINT",
    "DIGITS_PFGMPP_CHECKPOINT",
    "EDMPrecond",
    "MLPScoreNet",
    "TimeEmbedding",
    "TrainConfig",
    "TrainResult",
    "UNet",
    "add_train_args",
    "build_network",
    "build_sde",
    "cmd_train",
    "dsm_loss",
    "edm_denoiser_loss",
    "export_model",
    "flow_matching_loss",
    "load_checkpoint",
    "load_digits_flow_model",
    "load_digits_pfgmpp_model",
    "load_digits_model",
    "num_parameters",
]
