"""Adapters (scoresolve.adapters): diffusers, k-diffusion/EDM and score_sde networks, checked against the originals.

- diffusers: our ddim / dpmpp_2m on scheduler_grid() reproduce DDIMScheduler / DPMSolverMultistepScheduler loops on a
  small random UNet2DModel (float64: to 1e-12 with float64 alphas_cumprod, ~1e-7 with diffusers' float32 ones).
- k-diffusion: heun on EDMSDE (t = sigma) is sample_heun to rounding; heun on VESDE (t ~ log sigma) is a different
  second-order discretisation of the same ODE, checked against a tight reference solve.
- exact Gaussian-mixture "networks" in every parametrization give the exact score and log-likelihood.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch

import scoresolve as ss
from scoresolve import EDMSDE, VESDE, VPSDE, DiscreteVPSDE, GaussianMixture, ScoreModel, SubVPSDE, time_grid
from scoresolve.adapters import (
    DDPMTimestep,
    ReversedIndex,
    from_diffusers,
    from_karras,
    from_score_sde,
    load_diffusers,
    scheduler_grid,
    sde_from_scheduler,
    timesteps_to_grid,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

sys.path.insert(0, os.path.dirname(__file__))
from _counts import uniform  # noqa: E402
from _kdiffusion import load_k_diffusion_sampling  # noqa: E402

N = 1000
# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array(tensor, copy=False) (numpy 2 deprecation)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small_unet(dtype=torch.float64, attention: bool = True) -> UNet2DModel:
    if attention:
        blocks = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    else:
        blocks = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, norm_num_groups=8, **blocks)
    return (unet.double() if dtype == torch.float64 else unet.float()).eval()


@pytest.fixture(scope="module")
def unet64() -> UNet2DModel:
    return small_unet(torch.float64)


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run_diffusers(unet, scheduler, x, **step_kw) -> torch.Tensor:
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    return x


# ---------------------------------------------------------------------------------------------------------------
# schedules and grids
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
    dict(beta_schedule="linear", num_train_timesteps=200, beta_start=1e-3, beta_end=0.05),
])
def test_schedule_from_config_matches_diffusers(cfg):
    sch = DDIMScheduler(**cfg)
    ref = sch.alphas_cumprod.double()
    from_cfg = sde_from_scheduler(sch.config)  # float64 evaluation of the formulas
    from_obj = sde_from_scheduler(sch)  # the scheduler's own float32 numbers
    n = ref.numel()
    t = (torch.arange(n, dtype=torch.float64) + 1) / n
    assert from_cfg.num_timesteps == from_obj.num_timesteps == n
    torch.testing.assert_close(from_obj.marginal(t)[0] ** 2, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(from_cfg.marginal(t)[0] ** 2, ref, rtol=2e-6, atol=1e-12)


def test_zero_terminal_snr_is_clamped_with_a_warning():
    ddim = DDIMScheduler(rescale_betas_zero_snr=True)  # alphas_cumprod[-1] = 0
    dpm = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)  # alphas_cumprod[-1] = 2**-24 > [-2]
    assert float(ddim.alphas_cumprod[-1]) == 0.0
    assert float(dpm.alphas_cumprod[-1]) > float(dpm.alphas_cumprod[-2])
    prev = float(ddim.alphas_cumprod[-2])
    for src in (ddim, ddim.config, dpm):
        with pytest.warns(UserWarning, match="zero SNR"):
            sde = sde_from_scheduler(src)
        a, _ = sde.marginal(torch.tensor(1.0, dtype=torch.float64))
        assert float(a) ** 2 == pytest.approx(min(2**-24, prev / 2), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sde_from_scheduler(DDIMScheduler(beta_schedule="squaredcos_cap_v2"))  # tiny but positive: left alone


def test_timesteps_to_grid():
    sde = DiscreteVPSDE.linear(N)
    g = timesteps_to_grid(sde, torch.tensor([999, 499, 99]))
    torch.testing.assert_close(g, torch.tensor([1.0, 0.5, 0.1, 0.001], dtype=torch.float64))
    assert g.dtype == torch.float64
    torch.testing.assert_close(sde.timestep(g), torch.tensor([999.0, 499, 99, 0], dtype=torch.float64))
    # final index equal to the last timestep is not repeated; None appends nothing; explicit final index
    assert timesteps_to_grid(sde, [900, 0]).tolist() == [0.901, 0.001]
    assert timesteps_to_grid(sde, [900, 100], final=None).tolist() == [0.901, 0.101]
    assert timesteps_to_grid(sde, [900, 100], final=49).tolist() == [0.901, 0.101, 0.05]
    for bad in ([100, 900], [1000, 5], [-1], [5.5, 1.0]):
        with pytest.raises(ValueError):
            timesteps_to_grid(sde, bad)
    with pytest.raises(TypeError):
        timesteps_to_grid(VPSDE(), [10, 0])


def test_ddpm_timestep_modes():
    sde = DiscreteVPSDE.linear(N)
    g32 = timesteps_to_grid(sde, torch.arange(999, -1, -1)).float()
    raw = g32 * N - 1
    assert not bool((raw == raw.round()).all())  # float32 times miss some integers (10 of 1000, by 3e-5) ...
    snapped = DDPMTimestep(N)(g32)
    assert bool((snapped == snapped.round()).all())  # ... and "snap" puts them back
    torch.testing.assert_close(snapped.double(), torch.arange(999, -1, -1, dtype=torch.float64), rtol=0, atol=0)
    mid = torch.tensor([0.5007, 0.25025], dtype=torch.float64)
    torch.testing.assert_close(DDPMTimestep(N)(mid), mid * N - 1)  # off-knot times stay fractional
    torch.testing.assert_close(DDPMTimestep(N, "float")(g32), raw)
    r = DDPMTimestep(N, "round")(mid)
    assert r.dtype == torch.int64 and r.tolist() == [500, 249]
    with pytest.raises(ValueError):
        DDPMTimestep(N, "nearest")


# ---------------------------------------------------------------------------------------------------------------
# DDIM and DPM-Solver++(2M) against diffusers' schedulers
# ---------------------------------------------------------------------------------------------------------------
DDIM_CASES = [  # (timestep_spacing, steps_offset, set_alpha_to_one, expected (last grid time, denoise, NFE))
    ("leading", 0, True, (0.001, True, 10)),  # last step to alpha = 1: x0 prediction at index 0
    ("leading", 0, False, (0.001, False, 9)),  # last step index 0 -> index 0 is the identity: dropped
    ("leading", 1, False, (0.001, False, 10)),  # index 1 -> alphas_cumprod[0]: appended t = 1/N
    ("trailing", 0, False, (0.001, False, 10)),
    ("trailing", 0, True, (0.1, True, 10)),  # index 99 -> alpha = 1
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset,alpha_one,expected", DDIM_CASES)
def test_ddim_reproduces_diffusers(unet64, x_T, prediction_type, spacing, offset, alpha_one, expected):
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=alpha_one, steps_offset=offset, timestep_spacing=spacing,
                        prediction_type=prediction_type)
    sch.set_timesteps(10)
    model, sde = from_diffusers(unet64, sch)
    grid, denoise = scheduler_grid(sch)
    assert (round(float(grid[-1]), 12), denoise) == expected[:2]
    with torch.no_grad():
        ours = ss.sample(model, sde, x_T, solver="ddim", grid=grid, denoise=denoise)
    assert uniform(ours.nfe) == expected[2]
    # diffusers' own float32 alphas_cumprod: agreement to float32 rounding of its coefficients
    ref32 = run_diffusers(unet64, sch, x_T, eta=0.0)
    assert rel(ours.x, ref32) < 1e-6
    # the same scheduler in float64: the two loops are the same arithmetic
    sch.alphas_cumprod = sch.alphas_cumprod.double()
    sch.final_alpha_cumprod = torch.as_tensor(sch.final_alpha_cumprod).double()
    ref64 = run_diffusers(unet64, sch, x_T, eta=0.0)
    assert rel(ours.x, ref64) < 1e-12
    # sanity: the end point matters (dropping denoise / the final point changes the result)
    with torch.no_grad():
        other = ss.sample(model, sde, x_T, solver="ddim", grid=grid, denoise=not denoise)
    assert rel(other.x, ref64) > 1e-6


def test_ddim_float32_model_reproduces_diffusers(x_T):
    """float32 network: our float32 grid times reach the UNet as the scheduler's exact integer timesteps."""
    unet = small_unet(torch.float32)
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sch.set_timesteps(8)
    x = x_T.float()
    model, sde = from_diffusers(unet, sch)
    seen = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
    grid, denoise = scheduler_grid(sch)
    with torch.no_grad():
        ours = ss.sample(model, sde, x, solver="ddim", grid=grid, denoise=denoise)
    hook.remove()
    assert [float(s[0]) for s in seen] == [float(t) for t in sch.timesteps]
    ref = run_diffusers(unet, sch, x, eta=0.0)
    assert rel(ours.x, ref) < 1e-5


def test_ddim_linspace_spacing_is_refused():
    # diffusers' DDIM steps to t - N // n, not to the next timestep it evaluates: no single grid reproduces it
    sch = DDIMScheduler(timestep_spacing="linspace")
    sch.set_timesteps(10)
    with pytest.raises(ValueError, match="not the next timestep"):
        scheduler_grid(sch)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler_grid(DDIMScheduler())


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps,lower_order_final", [(6, True), (6, False), (20, True)])
def test_dpmpp_2m_reproduces_diffusers(unet64, x_T, final_sigmas_type, steps, lower_order_final):
    sch = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type)
    sch.set_timesteps(steps)
    model, sde = from_diffusers(unet64, sch)
    grid, denoise = scheduler_grid(sch)
    assert denoise == (final_sigmas_type == "zero")
    assert grid.numel() == steps + (0 if denoise else 1)
    torch.testing.assert_close(grid[:steps], (sch.timesteps.double() + 1) / N)  # exact integer timesteps
    # diffusers' rule for a first-order last step; a last step to sigma = 0 is first order and is our denoise
    if denoise:
        lof = False
    else:
        lof = sch.config.euler_at_final or (lower_order_final and steps < 15)
    with torch.no_grad():
        ours = ss.sample(model, sde, x_T, solver="dpmpp_2m", grid=grid, denoise=denoise, lower_order_final=lof)
        wrong = ss.sample(model, sde, x_T, solver="dpmpp_2m", grid=grid, denoise=denoise, lower_order_final=not lof)
    ref = run_diffusers(unet64, sch, x_T)
    assert uniform(ours.nfe) == steps
    # diffusers casts the state to float32 inside every step: agreement to float32 rounding (~2e-7 here)
    assert rel(ours.x, ref) < 1e-5
    if steps < 15:  # the option is visible: the other choice of the last step's order does not match
        assert rel(wrong.x, ref) > 1e-5


def test_karras_sigma_schedules_follow_the_sigmas_with_a_warning():
    sch = DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    sch.set_timesteps(8)
    sde = sde_from_scheduler(sch)
    with pytest.warns(UserWarning, match="rounded timestep"):
        grid, denoise = scheduler_grid(sch)
    assert not denoise
    # the last sigma repeats sigma_min (a step from it to itself, the identity for DPM-Solver): dropped
    assert float(sch.sigmas[-1]) == float(sch.sigmas[-2])
    torch.testing.assert_close(torch.exp(-sde.log_snr(grid)), sch.sigmas[:-1].double(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# parametrizations and the network wrapper
# ---------------------------------------------------------------------------------------------------------------
def _alpha_sigma_at_index(ac: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' noise level at (possibly fractional) index idx: log sqrt(ac) linear between the integer indices,
    with ac = 1 at index -1 (an independent restatement of the DDPM convention, for fake networks)."""
    la = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * ac.double().log()])
    u = (idx.double() + 1).clamp(0, ac.numel())
    k = u.floor().long().clamp(max=ac.numel() - 1)
    w = u - k
    log_alpha = la[k] * (1 - w) + la[k + 1] * w
    return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()


class GMUNet:
    """A fake diffusers UNet: the exact eps / v / x0 prediction of a Gaussian mixture, from diffusers' formulas.

    The mixture's score at (alpha, sigma) is computed in the EDM variable, grad log p(x) = grad log q(x / alpha) /
    alpha with q the data convolved with N(0, (sigma / alpha)^2): nothing of DiscreteVPSDE is used.
    """

    edm = EDMSDE(T=1e6)

    def __init__(self, gm: GaussianMixture, scheduler, prediction_type: str) -> None:
        self.gm, self.sch, self.ptype = gm, scheduler, prediction_type

    def __call__(self, x, timestep):
        a, s = _alpha_sigma_at_index(self.sch.alphas_cumprod, torch.as_tensor(timestep).expand(x.shape[0]))
        shape = (-1,) + (1,) * (x.ndim - 1)
        a4, s4 = a.reshape(shape).to(x), s.reshape(shape).to(x)
        eps = -s4 * self.gm.score(x / a4, (s / a).to(x), self.edm) / a4
        x0 = (x - s4 * eps) / a4
        out = {"epsilon": eps, "sample": x0, "v_prediction": a4 * eps - s4 * x0}[self.ptype]
        return (out,)  # a return_dict=False style output


@pytest.fixture(scope="module")
def gm4() -> GaussianMixture:
    return GaussianMixture.random(4, 3, event_shape=(1, 2, 2), seed=1)


def test_prediction_types_give_the_same_score(gm4):
    sch = DDPMScheduler()
    x = gm4.sample(6, torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    models = {}
    for ptype in ("epsilon", "v_prediction", "sample"):
        sch_p = DDPMScheduler(prediction_type=ptype)
        models[ptype], sde = from_diffusers(GMUNet(gm4, sch_p, ptype), sch_p)
        assert models[ptype].prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[ptype]
    # at the knots: the exact score of the mixture under the scheduler's schedule
    idx = torch.tensor([0, 3, 99, 500, 900, 999])
    t = (idx.double() + 1) / N
    exact = gm4.score(x, t, sde)
    for ptype, model in models.items():
        torch.testing.assert_close(model(x, t), exact, rtol=1e-9, atol=1e-9, msg=ptype)
    # diffusers' own v (DDPMScheduler.get_velocity) is what the v-network returned
    eps = -sde.marginal(t)[1].reshape(-1, 1, 1, 1) * exact
    x0 = models["epsilon"].x0(x, t)
    torch.testing.assert_close(models["v_prediction"].raw(x, t), sch.get_velocity(x0, eps, idx), rtol=1e-6, atol=1e-9)
    # between knots (fractional indices): all parametrizations agree, and agree with the mixture
    t_off = torch.tensor([0.0013, 0.01234, 0.3333, 0.5005, 0.77777, 0.9995], dtype=torch.float64)
    exact = gm4.score(x, t_off, sde)
    for ptype, model in models.items():
        torch.testing.assert_close(model(x, t_off), exact, rtol=1e-9, atol=1e-9, msg=ptype)


def test_network_output_unwrapping_and_learned_variance(gm4):
    sch = DDPMScheduler(variance_type="learned_range")
    base = GMUNet(gm4, sch, "epsilon")
    x = gm4.sample(3, torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.full((3,), 0.3, dtype=torch.float64)
    expected = base(x, sde_from_scheduler(sch).timestep(t))[0]

    class TwoC:  # 2C channels (mean, variance) as a .sample attribute
        def __call__(self, x, timestep, scale=1.0):
            out = base(x, timestep)[0] * scale
            return type("Out", (), {"sample": torch.cat([out, torch.full_like(out, 7.0)], 1)})()

    model, sde = from_diffusers(TwoC(), sch, net_kwargs={"scale": 2.0})
    torch.testing.assert_close(model.raw(x, t), 2 * expected)
    model, _ = from_diffusers(lambda x, ts: base(x, ts)[0], sch)  # plain tensor output
    torch.testing.assert_close(model.raw(x, t), expected)
    model, _ = from_diffusers(TwoC(), sch, learned_variance=False)
    with pytest.raises(ValueError, match="shape"):
        model.raw(x, t)
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(base, DDPMScheduler(prediction_type="flow_prediction").config | {})
    with pytest.raises(TypeError):
        from_diffusers(base, 3)


def test_score_sde_ve_scheduler_gives_a_ve_model():
    sch = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)
    seen = []

    def net(x, sigma):  # UNet2DModel with Fourier embedding: takes sigma, returns the score
        seen.append(sigma)
        return -x / sigma.reshape(-1, 1) ** 2

    model, sde = from_diffusers(net, sch)
    assert isinstance(sde, VESDE) and (sde.sigma_min, sde.sigma_max) == (0.01, 50.0)
    x = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model(x, t), -x / torch.tensor([[1e-4], [2500.0]], dtype=torch.float64))
    torch.testing.assert_close(seen[-1], torch.tensor([0.01, 50.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# likelihood through the adapter
# ---------------------------------------------------------------------------------------------------------------
def test_likelihood_of_a_random_unet_is_finite():
    unet = small_unet(torch.float32, attention=False)
    model, sde = from_diffusers(unet, DDPMScheduler())
    seen = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach()))
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = ss.log_likelihood(model, sde, x, t_eps=1 / N, rtol=1e-2, atol=1e-2,
                            generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert bool(torch.isfinite(res.log_prob).all()) and int(res.nfe[0]) > 10
    idx = torch.cat(seen)
    assert float(idx.min()) >= -1e-3 and float(idx.max()) <= N - 1 + 1e-3  # only indices the network was trained on


def test_likelihood_of_an_exact_network_matches_the_mixture(gm4):
    sch = DDIMScheduler(prediction_type="v_prediction")
    model, sde = from_diffusers(GMUNet(gm4, sch, "v_prediction"), sch)
    x = gm4.sample(3, torch.Generator().manual_seed(0), dtype=torch.float64)
    t_eps = 1 / N
    res = ss.log_likelihood(model, sde, x, divergence="exact", t_eps=t_eps, rtol=1e-7, atol=1e-7)
    # the prior N(0, I) is not p_T exactly (alpha(1) = 6e-3): compare with the exact p_T of the latent
    exact_start = gm4.log_prob(res.latent, 1.0, sde)
    err = (exact_start + res.delta_log_prob - gm4.log_prob(x, t_eps, sde)).abs().max()
    assert float(err) < 1e-5
    assert float((res.log_prob - gm4.log_prob(x, t_eps, sde)).abs().max()) < 0.05  # the prior's own mismatch


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion / EDM denoisers
# ---------------------------------------------------------------------------------------------------------------
SMIN, SMAX = 0.002, 80.0


@pytest.fixture(scope="module")
def gm_edm():
    gm = GaussianMixture.random(4, 3, seed=3)
    edm = EDMSDE(T=1e6)  # any sigma the denoiser may be asked for (sigma / alpha exceeds 80 under VP)

    def denoiser(x, sigma):  # the exact EDM denoiser D(x, sigma) = x + sigma^2 score
        return x + sigma.reshape(-1, 1) ** 2 * gm.score(x, sigma, edm)

    return gm, denoiser


def test_edm_sde():
    sde = EDMSDE(T=SMAX)
    t = torch.tensor([SMIN, 0.5, 3.0, SMAX], dtype=torch.float64)
    a, s = sde.marginal(t)
    torch.testing.assert_close(s, t)
    assert bool((a == 1).all())
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t)
    # g^2 = d sigma^2 / dt (variance of x0 + sigma z), f = 0
    torch.testing.assert_close(sde.diffusion(t) ** 2, 2 * t)
    assert sde.prior_std == SMAX
    g = time_grid(sde, 5, "karras", t_eps=SMIN)
    assert float(g[0]) == SMAX and float(g[-1]) == SMIN
    with pytest.raises(ValueError):
        EDMSDE(T=-1.0)


def test_heun_in_sigma_reproduces_k_diffusion(gm_edm):
    K = load_k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion is not installed")
    _, D = gm_edm
    model, sde = from_karras(D, SMIN, SMAX, sde="edm")
    x_T = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SMAX
    for n in (10, 25):
        grid = time_grid(sde, n - 1, "karras", t_eps=SMIN)
        torch.testing.assert_close(grid.float(), K.get_sigmas_karras(n, SMIN, SMAX)[:-1], rtol=2e-6, atol=0)
        sigmas = torch.cat([grid, grid.new_zeros(1)])  # k-diffusion's last step is Euler to sigma = 0
        ref = K.sample_heun(D, x_T.clone(), sigmas, disable=True)
        ours = ss.sample(model, sde, x_T, solver="heun", grid=grid, t_eps=SMIN, denoise=True)
        assert uniform(ours.nfe) == 2 * (n - 1) + 1
        assert rel(ours.x, ref) < 1e-12


def test_heun_in_t_on_vesde_is_another_second_order_discretisation(gm_edm):
    """On VESDE, t is affine in log sigma: Heun in t is Heun in log sigma, not k-diffusion's Heun in sigma.

    Same sigma knots, same first derivative, different O(h^3) local error: both converge at order 2 to the exact
    PF-ODE solution, the two results differ, and here Heun in sigma is the more accurate one.
    """
    K = load_k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion is not installed")
    _, D = gm_edm
    m_edm, edm = from_karras(D, SMIN, SMAX, sde="edm")
    m_ve, ve = from_karras(D, SMIN, SMAX, sde="ve")
    t_eps_ve = 1e-12  # VESDE has sigma(0) = sigma_min; t_eps > 0 ends 1e-11 (relative) above it
    s_end = float(ve.marginal(torch.tensor(t_eps_ve, dtype=torch.float64))[1])
    x_T = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SMAX
    ref = ss.sample(m_edm, edm, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=s_end, denoise=True).x
    ref_ve = ss.sample(m_ve, ve, x_T, solver="dopri5", rtol=1e-10, atol=1e-10, t_eps=t_eps_ve, denoise=True).x
    assert rel(ref_ve, ref) < 1e-7  # the two adapters carry the same ODE
    errs = {}
    for n in (10, 20, 40):
        g_ve = time_grid(ve, n - 1, "karras", t_eps=t_eps_ve)
        g_edm = time_grid(edm, n - 1, "karras", t_eps=s_end)
        torch.testing.assert_close(ve.marginal(g_ve)[1], g_edm, rtol=1e-12, atol=0)  # the same sigma knots
        kd = K.sample_heun(D, x_T.clone(), torch.cat([g_edm, g_edm.new_zeros(1)]), disable=True)
        heun_ve = ss.sample(m_ve, ve, x_T, solver="heun", grid=g_ve, denoise=True).x
        errs[n] = (rel(kd, ref), rel(heun_ve, ref))
        assert rel(heun_ve, kd) > 1e-4  # genuinely different discretisations
    for coarse, fine in ((10, 20), (20, 40)):
        for j in (0, 1):  # second order: halving the steps divides the error by ~4 (>= 3 here)
            assert errs[coarse][j] / errs[fine][j] > 3.0, errs
    assert all(kd_err < ve_err for kd_err, ve_err in errs.values()), errs


def test_karras_denoiser_under_any_sde(gm_edm):
    gm, D = gm_edm
    x = gm.sample(4, torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.6, 0.95], dtype=torch.float64)
    for sde in (VPSDE(), SubVPSDE(), DiscreteVPSDE.linear(N), VESDE(0.01, 50.0)):
        model, same = from_karras(D, sde=sde)
        assert same is sde and model.prediction == "x0"
        torch.testing.assert_close(model(x, t), gm.score(x, t, sde), rtol=1e-9, atol=1e-9)
    model, ve = from_karras(D, 0.01, 50.0)  # default "ve": sigma passed straight to D
    assert isinstance(ve, VESDE) and model.time == "sigma"
    torch.testing.assert_close(model(x, t), gm.score(x, t, ve), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        from_karras(D, 1.0, 0.5)
    with pytest.raises(ValueError):
        from_karras(D, sde="vp")


# ---------------------------------------------------------------------------------------------------------------
# score_sde conventions (get_score_fn in score_sde_pytorch/models/utils.py, restated)
# ---------------------------------------------------------------------------------------------------------------
class Recorder:
    """A network returning a fixed function of x and recording the labels it gets."""

    def __init__(self):
        self.labels = []

    def __call__(self, x, labels):
        self.labels.append(labels)
        return torch.sin(3 * x) + 0.1 * x


def test_score_sde_continuous_vp_and_subvp():
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1e-3, 0.4, 1.0], dtype=torch.float64)
    for sde in (VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)):
        for continuous in (True, False) if isinstance(sde, SubVPSDE) else (True,):
            net = Recorder()
            model, out_sde = from_score_sde(net, sde, continuous=continuous)
            assert out_sde is sde
            score = model(x, t)
            torch.testing.assert_close(net.labels[-1], 999 * t)  # labels = t * 999
            std = sde.marginal(t)[1].reshape(-1, 1, 1, 1)
            torch.testing.assert_close(score, -net(x, 999 * t) / std)  # score = -model / std


def test_score_sde_discrete_vp_is_its_ddpm_schedule():
    net = Recorder()
    model, sde = from_score_sde(net, "vp", continuous=False, num_scales=N)
    assert isinstance(sde, DiscreteVPSDE)
    betas = torch.linspace(0.1 / N, 20.0 / N, N, dtype=torch.float64)  # score_sde's discrete_betas
    sqrt_1m_ac = torch.sqrt(1 - torch.cumprod(1 - betas, 0))
    i = torch.tensor([0, 10, 499, 999])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # score_sde at its t' = i / (N - 1): labels = t' (N - 1) = i, std = sqrt_1m_alphas_cumprod[i]
    score_sde = -net(x, i.double()) / sqrt_1m_ac[i].reshape(-1, 1)
    ours = model(x, (i.double() + 1) / N)
    torch.testing.assert_close(net.labels[-1], i.double())
    torch.testing.assert_close(ours, score_sde, rtol=1e-10, atol=1e-12)


def test_score_sde_ve_continuous_and_discrete():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sde = VESDE(0.01, 50.0)
    t = torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)
    net = Recorder()
    model, same = from_score_sde(net, sde)
    torch.testing.assert_close(model(x, t), net(x, sde.marginal(t)[1]))  # score = model(x, sigma(t))
    torch.testing.assert_close(net.labels[0], sde.marginal(t)[1])
    net = Recorder()
    model, _ = from_score_sde(net, sde, continuous=False, num_scales=1000)
    model(x, t)
    assert net.labels[0].dtype == torch.int64
    assert net.labels[0].tolist() == [999, 500, 0]  # round((T - t)(N - 1)); index 0 = sigma_max
    assert isinstance(model.time, ReversedIndex)
    # at t = 1 - i/(N-1) the VESDE's sigma is the i-th of score_sde's descending discrete sigmas
    sig = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 1000, dtype=torch.float64))
    ti = 1 - torch.tensor([0, 250, 999], dtype=torch.float64) / 999
    torch.testing.assert_close(sde.marginal(ti)[1], sig[[0, 250, 999]])


def test_score_sde_sde_lib_objects_are_read():
    VPSDE_, subVPSDE, VESDE_ = (type(n, (), {}) for n in ("VPSDE", "subVPSDE", "VESDE"))
    vp = VPSDE_()
    vp.beta_0, vp.beta_1, vp.N = 0.1, 20.0, 1000
    _, s = from_score_sde(Recorder(), vp)
    assert s == VPSDE(0.1, 20.0)
    _, s = from_score_sde(Recorder(), vp, continuous=False)
    assert isinstance(s, DiscreteVPSDE) and s.num_timesteps == 1000
    sub = subVPSDE()
    sub.beta_0, sub.beta_1, sub.N = 0.1, 20.0, 1000
    assert from_score_sde(Recorder(), sub)[1] == SubVPSDE(0.1, 20.0)
    ve = VESDE_()
    ve.sigma_min, ve.sigma_max, ve.N = 0.01, 348.0, 2000
    model, s = from_score_sde(Recorder(), ve, continuous=False)
    assert s == VESDE(0.01, 348.0) and model.time.num_scales == 2000
    with pytest.raises(TypeError):
        from_score_sde(Recorder(), object())
    with pytest.raises(TypeError):
        from_score_sde(Recorder(), DiscreteVPSDE.linear(10))
    with pytest.raises(ValueError):
        from_score_sde(Recorder(), "edm")


# ---------------------------------------------------------------------------------------------------------------
# loading and the optional dependency
# ---------------------------------------------------------------------------------------------------------------
def test_load_diffusers_from_a_saved_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = small_unet(torch.float32, attention=False)
    unet.save_pretrained(tmp_path / "unet")
    DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear").save_pretrained(tmp_path / "scheduler")
    model, sde = load_diffusers(tmp_path)
    assert model.prediction == "v"
    torch.testing.assert_close(sde.marginal(torch.tensor(1.0, dtype=torch.float64))[0] ** 2,
                               DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod[-1].double(), rtol=2e-6,
                               atol=0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(model.raw(x, t), unet(x, torch.tensor([249, 699])).sample)


def test_missing_diffusers_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_diffusers(tmp_path)
    # the adapter itself needs no diffusers
    model, sde = from_diffusers(lambda x, t: x, {"num_train_timesteps": 10, "beta_schedule": "linear",
                                                 "beta_start": 0.01, "beta_end": 0.2})
    assert isinstance(model, ScoreModel) and sde.num_timesteps == 10
