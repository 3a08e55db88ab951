"""Host-side coefficients that turn the network's raw output into what a grid step needs, in two fused kernels.

Every prediction a solver asks for (score, eps, x0, v, flow; `scoresolve.score.convert`) and the reverse process's
drift f x - (g^2 + s^2)/2 score are affine in the state x and the network's output ``out`` at a fixed time:

    want = cx(t) x + cp(t) out.

On a grid the times are known before the solve, so (cx, cp) are computed once per grid, on the host in float64, with
the same formulas as the tensor path (`convert` on 0-d basis values: x = 1, out = 0 gives cx; x = 0, out = 1 gives
cp), and applied per step as ``torch.add(x * cx, out, alpha=cp)``: no schedule evaluation, no [batch]-shaped
coefficient tensors and no host-device transfer inside the loop.
"""

from __future__ import annotations

import torch

from ..reverse import ReverseProcess
from ..score import ScoreModel, convert

DRIFT = "drift"
"""The pseudo-prediction ``kind`` of the reverse process's drift f x - (g^2 + s^2)/2 score."""


def supports_affine(process: ReverseProcess, model: ScoreModel) -> bool:
    """Whether ``process`` / ``model`` use the package's own conversions (so the host coefficients are exact): a
    plain `ReverseProcess` with a constant diffusion scale on a Gaussian-kernel process, and a `ScoreModel` that
    does not override how it predicts."""
    return (type(process) is ReverseProcess and process.constant_scale is not None
            and bool(getattr(process.sde, "gaussian_kernel", False))
            and type(model).predict_many is ScoreModel.predict_many and type(model).raw is ScoreModel.raw)


def affine_coefficients(process: ReverseProcess, model: ScoreModel, kind: str,
                        t: torch.Tensor) -> tuple[list[float], list[float]]:
    """(cx, cp), lists over the float64 host times ``t``, with ``kind`` = cx x + cp out (``kind`` a prediction or
    `DRIFT`; see the module docstring)."""
    sde, msde = process.sde, model.sde  # the process's drift; the model's own schedule for its conversions
    t = t.to(torch.float64)
    alpha, sigma = msde.marginal(t, check=False)
    need_flow = kind == "flow" or model.prediction == "flow" or (kind == DRIFT and sde.velocity_form)
    da = ds = None
    if need_flow:
        da, ds = msde.dalpha_dt(t, check=False), msde.dsigma_dt(t, check=False)
    one, zero = torch.ones_like(t), torch.zeros_like(t)

    def pair(dst: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (convert(zero, model.prediction, dst, one, alpha, sigma, da, ds),
                convert(one, model.prediction, dst, zero, alpha, sigma, da, ds))

    if kind != DRIFT:
        cx, cp = pair(kind)
    else:
        c2 = process.constant_scale ** 2  # s^2 = c^2 g^2
        if sde.velocity_form:  # f x - g^2/2 score is the flow (finite where alpha = 0), then - s^2/2 score
            cx, cp = pair("flow")
            if c2 != 0.0:
                sx, sp = pair("score")
                half_s2 = 0.5 * c2 * sde.g2(t, check=False)
                cx, cp = cx - half_s2 * sx, cp - half_s2 * sp
        else:
            sx, sp = pair("score")
            c = 0.5 * (1 + c2) * sde.g2(t, check=False)
            cx, cp = sde.f(t, check=False) - c * sx, -c * sp
    return cx.expand(t.shape).tolist(), cp.expand(t.shape).tolist()


def apply_affine(x: torch.Tensor, out: torch.Tensor, cx: float, cp: float) -> torch.Tensor:
    """cx x + cp out (the network's output itself where cx = 0 and cp = 1)."""
    if cx == 0.0:
        return out if cp == 1.0 else out * cp
    return torch.add(x * cx, out, alpha=cp)
