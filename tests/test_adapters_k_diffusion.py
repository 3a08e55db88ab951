"""k-diffusion-signature samplers (scoresolve.adapters.k_diffusion_sampler) and k-diffusion sigmas of our grids,
checked against k-diffusion's own samplers and schedules on an exact Gaussian-mixture denoiser (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from _kdiffusion import load_k_diffusion_sampling  # noqa: E402

import scoresolve as ss
from scoresolve import EDMSDE, DiscreteVPSDE, GaussianMixture
from scoresolve.adapters import k_diffusion_sampler, k_diffusion_sigmas

kd = load_k_diffusion_sampling()
needs_kd = pytest.mark.skipif(kd is None, reason="k-diffusion is not installed")

GM = GaussianMixture.random(dim=6, num_components=3, seed=3)
EDM = EDMSDE(T=80.0)


def denoiser(counter: list | None = None):
    """The exact D(x, sigma) = E[x0 | x0 + sigma z = x] of the mixture (k-diffusion's model signature)."""

    def D(x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        if counter is not None:
            counter.append((float(sigma[0]), dict(kwargs)))
        return GM.x0(x, sigma, EDM)

    return D


def x_T(sigma_max: float = 80.0, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_kd
@pytest.mark.parametrize("steps", [5, 12])
def test_dpmpp_2m_equals_k_diffusion(steps):
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0, device="cpu").to(torch.float64)
    x = x_T()
    ref = kd.sample_dpmpp_2m(denoiser(), x, sigmas, disable=True)
    calls: list = []
    ours = k_diffusion_sampler("dpmpp_2m", lower_order_final=False)(denoiser(calls), x, sigmas, disable=True)
    assert rel(ours, ref) < 1e-12
    assert len(calls) == steps  # one evaluation per sigma, the last step to 0 being the x0 prediction
    # the solver's own default (first-order last step when steps < 100) is another method: it must differ
    other = k_diffusion_sampler("dpmpp_2m")(denoiser(), x, sigmas)
    assert rel(other, ref) > 1e-6


@needs_kd
@pytest.mark.parametrize("name,kd_name", [("euler", "sample_euler"), ("heun", "sample_heun")])
def test_euler_heun_equal_k_diffusion(name, kd_name):
    sigmas = kd.get_sigmas_karras(6, 0.002, 80.0, device="cpu").to(torch.float64)
    x = x_T()
    ref = getattr(kd, kd_name)(denoiser(), x, sigmas, disable=True)
    ours = k_diffusion_sampler(name)(denoiser(), x, sigmas)
    assert rel(ours, ref) < 1e-12


@needs_kd
def test_sigmas_without_final_zero_and_extra_args_and_callback():
    sigmas = kd.get_sigmas_exponential(6, 0.05, 20.0, device="cpu").to(torch.float64)[:-1]  # ends at 0.05
    x = x_T(20.0)
    ref = kd.sample_dpmpp_2m(denoiser(), x, torch.cat([sigmas, sigmas.new_zeros(1)]), disable=True)
    seen: list = []
    ref_seen: list = []
    kd.sample_dpmpp_2m(denoiser(), x, sigmas, callback=ref_seen.append, disable=True)
    calls: list = []
    ours = k_diffusion_sampler("dpmpp_2m", lower_order_final=False)(
        denoiser(calls), x, sigmas, extra_args={"cond": "c"}, callback=seen.append)
    assert all(kw == {"cond": "c"} for _, kw in calls)
    assert [d["i"] for d in seen] == [d["i"] for d in ref_seen] == list(range(5))
    for a, b in zip(seen, ref_seen):
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-12)
        assert rel(a["denoised"], b["denoised"]) < 1e-12
        assert rel(a["x"], b["x"]) < 1e-12
    # no final 0: ours stops at sigma = 0.05 like k-diffusion (not the x0 prediction there)
    assert rel(ours, ref) > 1e-3
    assert rel(ours, kd.sample_dpmpp_2m(denoiser(), x, sigmas, disable=True)) < 1e-12


def test_samplers_converge_to_the_exact_flow():
    """unipc / ipndm / deis / dpmpp_3m through the k-diffusion signature converge to the PF-ODE solution from
    sigma_max to sigma_min (reference: adaptive dopri5 at 1e-10 on the exact mixture denoiser)."""
    x = x_T(80.0, 16)
    model = ss.ScoreModel(denoiser(), EDM, prediction="x0", time="sigma")
    exact = ss.sample(model, EDM, x, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=0.002).x
    for name in ("unipc", "ipndm", "deis", "dpmpp_3m"):
        errs = []
        for n in (10, 40):
            sig = k_diffusion_sigmas("karras", n + 1, 0.002, 80.0)[:-1]  # stop at sigma_min
            errs.append(rel(k_diffusion_sampler(name)(denoiser(), x, sig), exact))
        assert errs[1] < errs[0] / 8, (name, errs)
        assert errs[1] < 1e-2, (name, errs)


@needs_kd
def test_sigmas_match_k_diffusion_schedules():
    ours = k_diffusion_sigmas("karras", 7, 0.03, 14.6)
    ref = kd.get_sigmas_karras(7, 0.03, 14.6, rho=7.0, device="cpu").to(torch.float64)
    assert ours.shape == (8,) and float(ours[-1]) == 0.0
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)  # k-diffusion computes in float32
    ref = kd.get_sigmas_exponential(7, 0.03, 14.6, device="cpu").to(torch.float64)
    assert torch.allclose(k_diffusion_sigmas("logsnr", 7, 0.03, 14.6), ref, rtol=1e-6, atol=0)
    # in the time variable of a VP schedule: sigma = exp(-lambda(t)) of our grid in t
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    vp = DiscreteVPSDE(alphas_cumprod=ac)
    smin, smax = (math.exp(-float(vp.log_snr(torch.tensor(t, dtype=torch.float64)))) for t in (1e-3, 1.0))
    sig = k_diffusion_sigmas("uniform", 5, smin, smax, sde=vp)
    ts = vp.t_from_log_snr(-torch.log(sig[:-1]))
    assert torch.allclose(ts, torch.linspace(1.0, 1e-3, 5, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_tuned_grid_as_sigmas(tmp_path):
    from scoresolve.tuning import TunedGrid

    vp = ss.VPSDE()
    grid = torch.tensor([1.0, 0.4, 0.1, 0.01, 1e-3], dtype=torch.float64)
    tuned = TunedGrid(grid=grid, solver="unipc", nfe=4, steps=4, method="gits", t_eps=1e-3, T=1.0, train_error=0.0,
                      default_error=0.0, gits_error=0.0, evaluations=0, calls=0, seconds=0.0, num_samples=1,
                      candidates=1)
    sig = k_diffusion_sigmas(tuned, 5, sde=vp)
    assert torch.allclose(sig[:-1], torch.exp(-vp.log_snr(grid)), rtol=1e-12) and float(sig[-1]) == 0
    with pytest.raises(ValueError, match="4 steps"):
        k_diffusion_sigmas(tuned, 4, sde=vp)
    with pytest.raises(ValueError, match="tuned on"):
        k_diffusion_sigmas(tuned, 5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="adaptive"):
        k_diffusion_sampler("dopri5")
    with pytest.raises(ValueError, match="unknown solver"):
        k_diffusion_sampler("nope")
    with pytest.raises(TypeError, match="unknown option"):
        k_diffusion_sampler("dpmpp_2m", ordr=2)
    fn = k_diffusion_sampler("dpmpp_2m")
    x = x_T()
    with pytest.raises(ValueError, match="decreasing"):
        fn(denoiser(), x, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        fn(denoiser(), x, torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        k_diffusion_sigmas("karras", 5, 2.0, 1.0)


@needs_kd
def test_flow_state_euler_equals_k_diffusion_and_unipc_equals_sample():
    """sde="flow": x = (1 - sigma) x0 + sigma z (ComfyUI's CONST sampling). k-diffusion's Euler on the x0 denoiser is
    then rectified flow's Euler, ours too; unipc there is scoresolve.sample on RectifiedFlow."""
    rf = ss.RectifiedFlow()

    def D(x, sigma, **kwargs):
        return GM.x0(x, sigma, rf)

    sigmas = k_diffusion_sigmas("uniform", 8, 0.02, 1.0, sde="flow", shift=3.0)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and float(sigmas[-2]) == pytest.approx(0.02)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = kd.sample_euler(D, x, sigmas, disable=True)
    ours = k_diffusion_sampler("euler", sde="flow")(D, x, sigmas)
    assert rel(ours, ref) < 1e-12
    assert rel(k_diffusion_sampler("euler")(D, x, sigmas[1:]), kd.sample_euler(D, x, sigmas[1:])) < 1e-12  # VE too
    model = ss.ScoreModel(D, rf, prediction="x0", time="t")
    sol = ss.sample(model, rf, x, solver="unipc", grid=sigmas[:-1], denoise=True)
    assert rel(k_diffusion_sampler("unipc", sde="flow")(D, x, sigmas), sol.x) < 1e-12
    assert rel(k_diffusion_sampler("unipc")(D, x, sigmas[1:]), sol.x) > 1e-3  # the VE state is another process
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        k_diffusion_sampler("unipc", sde="flow")(D, x * 5, sigmas * 5)


@pytest.mark.parametrize("sde_kind", ["ve", "flow"])
def test_the_default_sampler_is_samples_default_on_the_hosts_sigmas(sde_kind):
    """k_diffusion_sampler("default"): sample()'s default for a denoiser at the budget the sigmas ask for (vAB, order
    2 below 8 evaluations, 3 below 20), on those sigmas; options override it."""
    flow = sde_kind == "flow"
    proc = ss.RectifiedFlow() if flow else None

    def D(x, sigma, **kwargs):
        return GM.x0(x, sigma, proc) if flow else denoiser()(x, sigma)

    for n, order in ((6, 2), (10, 3)):
        sigmas = (k_diffusion_sigmas("uniform", n, 0.02, 1.0, sde="flow") if flow
                  else k_diffusion_sigmas("karras", n, 0.02, 80.0))
        x = x_T(float(sigmas[0]), 8)
        ours = k_diffusion_sampler("default", sde=sde_kind)(D, x, sigmas)
        named = k_diffusion_sampler("vab", sde=sde_kind, order=order)(D, x, sigmas)
        assert torch.equal(ours, named)
        assert rel(k_diffusion_sampler("vab", sde=sde_kind, order=1)(D, x, sigmas), named) > 1e-4  # order matters
        low = k_diffusion_sampler("default", sde=sde_kind, order=1)(D, x, sigmas)
        assert torch.equal(low, k_diffusion_sampler("vab", sde=sde_kind, order=1)(D, x, sigmas))
