"""The public API refuses bad arguments early, naming them (the hardening audit): arguments of the wrong kind
(a process given by name, a solver or grid that is not a str, a generator or callback that is not one), counts that
are not integers (never rounded), tolerances and steps that are not finite and positive, empty batches where nothing
can be measured, and networks whose NaN would otherwise give a silently NaN ELBO, bits/dim or moment estimate.
Each case used to end in a deep AttributeError / TypeError / ZeroDivisionError / IndexError, or in a silent result."""

import math

import pytest
import torch

import scoresolve as ss
from scoresolve import adapters, compare, tuning
from scoresolve.reverse_variance import estimate_moments

F64 = torch.float64
NAN = math.nan

SDE = ss.VPSDE()
GM = ss.GaussianMixture.random(dim=2, num_components=2, seed=0)
SCORE = GM.score_fn(SDE)
X = SDE.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
DSDE = ss.DiscreteVPSDE.linear(100)
EPS0 = ss.ScoreModel(lambda x, t: torch.zeros_like(x), DSDE, prediction="eps")
EPS_NAN = ss.ScoreModel(lambda x, t: x * NAN, DSDE, prediction="eps")
Z = torch.zeros(3, 2, dtype=F64)
GRID8 = torch.arange(4.0).reshape(2, 2) / 255 * 2 - 1  # on the 8-bit grid of [-1, 1]


def _sample(**kw):
    return lambda: ss.sample(SCORE, SDE, X, **kw)


def _calibrate(**kw):
    return lambda: ss.calibrate(GM.model(SDE, "x0"), SDE, **{"nfe": 3, "shape": (2,), "num_samples": 8, **kw})


def _tune(**kw):
    return lambda: tuning.tune_grid(SCORE, SDE, **{"nfe": 4, "solver": "dpmpp_2m", "shape": (2,), "num_samples": 4,
                                                   "method": "gits", "candidates": 16, "substeps": 1, **kw})


def _wp(**kw):
    return lambda: compare.work_precision(SCORE, SDE, X, **{"solvers": ["euler"], "nfes": (4,), **kw})


def _elbo(**kw):
    return lambda: ss.elbo(EPS0, DSDE, Z, **{"steps": 10, "variance": "beta", **kw})


def _ll(**kw):
    return lambda: ss.log_likelihood(SCORE, SDE, X, **{"rtol": 1e-3, "atol": 1e-3, **kw})


def _dbpd(fn=lambda y, g: torch.zeros(y.shape[0]), x=GRID8, **kw):
    return lambda: ss.dequantized_bpd(fn, x, **kw)


def _compiled(**kw):
    return lambda: ss.compile_sampler(SCORE, **{"sde": SDE, "example": X, "solver": "dpmpp_2m", "nfe": 4, **kw})


def _kd(x=None, sigmas=(10.0, 5.0, 1.0, 0.0), **kw):
    def run():
        xs = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) if x is None else x
        return adapters.k_diffusion_sampler("euler")(lambda y, s: y * 0, xs, torch.tensor(sigmas), **kw)
    return run


CASES = [
    # sample: arguments of the wrong kind (AttributeError / TypeError deep inside before)
    ("sample sde str", lambda: ss.sample(SCORE, "vp", X), TypeError, "sde must be a scoresolve process"),
    ("sample solver int", _sample(solver=3), TypeError, "solver must be a solver name"),
    ("sample grid int", _sample(solver="euler", grid=3), TypeError, "grid must be a grid name"),
    ("sample grid list", _sample(solver="euler", grid=[1.0, 0.5, 0.1]), TypeError, "grid must be a grid name"),
    ("sample grid flow:abc", _sample(solver="euler", grid="flow:abc"), ValueError,
     "grid 'flow:abc': the exponent must be a positive number"),
    ("sample t_eps str", _sample(t_eps="a"), TypeError, r"t_eps must be a number in \(0, T\)"),
    ("sample t_eps None", _sample(t_eps=None), TypeError, r"t_eps must be a number in \(0, T\)"),
    ("sample diffusion str", _sample(diffusion="a"), TypeError, "diffusion must be a number >= 0"),
    ("sample generator int", _sample(solver="euler_maruyama", generator=0), TypeError,
     "generator must be a torch.Generator"),
    ("sample callback int", _sample(solver="euler", callback=3), TypeError, "callback must be a callable"),
    # adaptive solvers: max_steps / check_every were truncated (2.5 ran as 2)
    ("sample max_steps 2.5", _sample(solver="dopri5", max_steps=2.5), ValueError,
     "max_steps must be a whole number, got 2.5"),
    ("sample max_steps 0", _sample(solver="dopri5", max_steps=0), ValueError, "max_steps must be >= 1, got 0"),
    ("ll check_every 2.5", _ll(check_every=2.5), ValueError, "check_every must be a whole number"),
    ("ll exact_chunk 2.5", _ll(divergence="exact", exact_chunk=2.5), ValueError, "exact_chunk must be a whole"),
    ("ll generator int", _ll(generator=1), TypeError, "generator must be a torch.Generator"),
    ("ll t_eps str", _ll(t_eps="a"), TypeError, "t_eps must be a number"),
    # solver options: a ZeroDivisionError, an AttributeError deep in the step loop, silent rounding, order=True
    ("pc corrector_steps -1", _sample(solver="pc", corrector_steps=-1, generator=torch.Generator()), ValueError,
     "corrector_steps must be an integer >= 0, got -1"),
    ("dopri5 controller int", _sample(solver="dopri5", controller=3), TypeError,
     "controller must be a step-size controller"),
    ("adaptive_sde controller int", _sample(solver="adaptive_sde", controller=3, rtol=1e-2, atol=1e-2,
                                            generator=torch.Generator()), TypeError, "controller must be a step-size"),
    ("adaptive_sde bridge_depth 2.5", _sample(solver="adaptive_sde", bridge_depth=2.5, rtol=1e-2, atol=1e-2,
                                              generator=torch.Generator()), ValueError,
     "bridge_depth must be a whole number"),
    ("deis order True", _sample(solver="deis", order=True), ValueError, "deis order must be 1, 2, 3 or 4, got True"),
    ("unipc order True", _sample(solver="unipc", order=True), ValueError, "unipc order must be 1, 2, 3 or 4"),
    # grids and shifts (ZeroDivisionError, a NaN grid, an integer grid before)
    ("time_grid karras rho 0", lambda: ss.time_grid(SDE, 10, "karras", rho=0.0), ValueError,
     "rho of the karras grid must be a finite number > 0"),
    ("time_grid karras rho nan", lambda: ss.time_grid(SDE, 10, "karras", rho=NAN), ValueError, "rho of the karras"),
    ("time_grid int dtype", lambda: ss.time_grid(SDE, 10, dtype=torch.long), TypeError,
     "dtype must be a floating-point dtype"),
    ("flux_shift base = max", lambda: ss.flux_shift(300, base_seq_len=256, max_seq_len=256), ValueError,
     "base_seq_len must be < max_seq_len"),
    # processes and mixtures
    ("Interpolant wrong dalpha sign", lambda: ss.Interpolant(lambda t: 1 - t, lambda t: t, torch.ones_like,
                                                            torch.ones_like), ValueError,
     r"dalpha is not the derivative of alpha: at t = 0.007812 dalpha gives 1, the difference quotient -1"),
    ("Interpolant dsigma missing a factor", lambda: ss.Interpolant(
        lambda t: torch.cos(t * math.pi / 2), lambda t: torch.sin(t * math.pi / 2),
        lambda t: -math.pi / 2 * torch.sin(t * math.pi / 2), lambda t: torch.cos(t * math.pi / 2)), ValueError,
     "dsigma is not the derivative of sigma"),
    ("Interpolant wrong t_from_log_snr", lambda: ss.Interpolant(lambda t: 1 - t, lambda t: t,
                                                               lambda t: -torch.ones_like(t), torch.ones_like,
                                                               t_from_log_snr=lambda lam: torch.sigmoid(lam)),
     ValueError, "t_from_log_snr does not invert the log-SNR"),
    ("Interpolant alpha not callable", lambda: ss.Interpolant(1, lambda t: t, torch.ones_like, torch.ones_like),
     TypeError, "alpha must be a callable of t"),
    ("GaussianMixture dim 0", lambda: ss.GaussianMixture.random(0), ValueError, "dim must be >= 1, got 0"),
    ("GaussianMixture 0 components", lambda: ss.GaussianMixture.random(2, 0), ValueError,
     "num_components must be >= 1"),
    ("GaussianMixture empty means", lambda: ss.GaussianMixture(torch.ones(0), torch.zeros(0, 2)), ValueError,
     "at least one component"),
    ("DiscreteVPSDE.linear 2.5", lambda: ss.DiscreteVPSDE.linear(2.5), ValueError,
     "num_timesteps must be a whole number"),
    ("DiscreteVPSDE 2-D betas", lambda: ss.DiscreteVPSDE(betas=[[0.1, 0.2]]), ValueError, "betas must be a 1-D"),
    ("DiscreteVPSDE 2-D alphas_cumprod", lambda: ss.DiscreteVPSDE(alphas_cumprod=[[0.9, 0.5]]), ValueError,
     "alphas_cumprod must be a 1-D"),
    # score models and guidance
    ("ScoreModel num_timesteps 0", lambda: ss.ScoreModel(lambda x, t: x, SDE, time="index", num_timesteps=0),
     ValueError, "num_timesteps must be >= 1"),
    ("ScoreModel net_kwargs int", lambda: ss.ScoreModel(lambda x, t: x, SDE, net_kwargs=3), TypeError,
     "net_kwargs must be a mapping"),
    ("ScoreModel net int", lambda: ss.ScoreModel(3, SDE), TypeError, "net must be callable"),
    ("ScoreModel sde str", lambda: ss.ScoreModel(lambda x, t: x, "vp"), TypeError,
     "sde must be a scoresolve process"),
    ("classifier_guidance scale nan", lambda: ss.classifier_guidance(SCORE, lambda x, t: x.sum(1), NAN), ValueError,
     "guidance scale must be finite"),
    ("classifier_free_guidance scale str", lambda: ss.classifier_free_guidance(SCORE, SCORE, "a"), TypeError,
     "guidance scale must be a finite number"),
    ("classifier_free_guidance cond int", lambda: ss.classifier_free_guidance(3, SCORE, 1.0), TypeError,
     "cond must be callable"),
    # calibrate: counts were rounded (nfe=2.5 fitted nfe=2, '3' taken as 3), shapes and dtypes failed deep inside
    ("calibrate nfe 2.5", _calibrate(nfe=2.5), ValueError, "nfe must be a whole number, got 2.5"),
    ("calibrate nfe '3'", _calibrate(nfe="3"), TypeError, "nfe must be an integer"),
    ("calibrate nfe [3, 2.5]", _calibrate(nfe=[3, 2.5]), ValueError, "nfe must be a whole number"),
    ("calibrate shape 2", _calibrate(shape=2), TypeError, "shape must be one sample's shape"),
    ("calibrate shape ()", _calibrate(shape=()), ValueError, "shape must hold at least one dimension"),
    ("calibrate shape (-1,)", _calibrate(shape=(-1,)), ValueError, "each entry of shape must be >= 1"),
    ("calibrate num_samples 2.5", _calibrate(num_samples=2.5), ValueError, "num_samples must be a whole number"),
    ("calibrate iters 2.5", _calibrate(iters=2.5), ValueError, "iters must be a whole number"),
    ("calibrate batch 2.5", _calibrate(batch=2.5), ValueError, "batch must be a whole number"),
    ("calibrate check_every 2.5", _calibrate(check_every=2.5), ValueError, "check_every must be a whole number"),
    ("calibrate fit_starts 0", _calibrate(fit_starts=0), ValueError, "fit_starts must be >= 1"),
    ("calibrate seed 2.5", _calibrate(seed=2.5), ValueError, "seed must be a whole number"),
    ("calibrate lr inf", _calibrate(lr=math.inf), ValueError, "lr must be a finite number > 0"),
    ("calibrate reference_tol 0", _calibrate(reference_tol=0.0), ValueError, "reference_tol must be a finite"),
    ("calibrate starts str", _calibrate(starts="logsnr"), TypeError, "starts must be a sequence of grid names"),
    ("calibrate starts unknown", _calibrate(starts=("foo",)), ValueError, "unknown grid 'foo'"),
    ("calibrate starts empty", _calibrate(starts=()), ValueError, "starts must name at least one grid"),
    ("calibrate dtype int", _calibrate(dtype=torch.long), TypeError, "dtype must be a floating-point"),
    ("calibrate process str", lambda: ss.calibrate(SCORE, "vp", 3, (2,)), TypeError,
     "process must be a scoresolve process"),
    # tune_grid
    ("tune_grid num_samples 2.5", _tune(num_samples=2.5), ValueError, "num_samples must be a whole number"),
    ("tune_grid empty x_T", _tune(shape=None, x_T=X[:0]), ValueError, "x_T holds no samples"),
    ("tune_grid min_step 0", _tune(method="descent", min_step=0.0), ValueError, "min_step must be a finite number"),
    ("tune_grid initial_step -1", _tune(method="descent", initial_step=-1.0), ValueError,
     "initial_step must be a finite number > 0"),
    ("tune_grid max_sweeps -1", _tune(method="descent", max_sweeps=-1), ValueError, "max_sweeps must be >= 0"),
    ("tune_grid starts str", _tune(method="descent", starts="logsnr"), TypeError, "starts must be a sequence"),
    ("tune_grid sde str", lambda: tuning.tune_grid(SCORE, "vp", 4), TypeError, "sde must be a scoresolve process"),
    # work_precision: bad budgets were silently skipped, a bad reference gave NaN errors or a broadcast error
    ("work_precision solvers str", _wp(solvers="euler"), TypeError, "solvers must be a sequence of solver names"),
    ("work_precision nfes 0", _wp(nfes=(0,)), ValueError, "each of nfes must be >= 1"),
    ("work_precision nfes -3", _wp(nfes=(-3,)), ValueError, "each of nfes must be >= 1"),
    ("work_precision tolerances 0", _wp(solvers=["dopri5"], tolerances=(0.0,)), ValueError,
     "each of tolerances must be a finite number > 0"),
    ("work_precision reference shape", _wp(reference=torch.zeros(3, 2, dtype=F64)), ValueError,
     r"reference must be a tensor of x_T's shape \(4, 2\), got \(3, 2\)"),
    ("work_precision reference nan", _wp(reference=torch.full((4, 2), NAN, dtype=F64)), ValueError,
     "reference contains non-finite values"),
    ("work_precision empty x_T", lambda: compare.work_precision(SCORE, SDE, X[:0], ["euler"], (4,)), ValueError,
     "x_T holds no samples"),
    # elbo: batch_size 0 / -1 / 2.5 ran, NaN data and NaN networks gave a NaN bound
    ("elbo batch_size 0", _elbo(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("elbo batch_size 2.5", _elbo(batch_size=2.5), ValueError, "batch_size must be a whole number"),
    ("elbo steps True", _elbo(steps=True), TypeError, "steps must be an integer"),
    ("elbo steps 2.5", _elbo(steps=2.5), ValueError, "steps must be a whole number"),
    ("elbo x nan", lambda: ss.elbo(EPS0, DSDE, Z + NAN, steps=10, variance="beta"), ValueError,
     "x contains non-finite values"),
    ("elbo network nan", lambda: ss.elbo(EPS_NAN, DSDE, Z, steps=10, variance="beta"), ss.NonFiniteError,
     r"solver 'elbo': non-finite values \(NaN/Inf\) in 3 sample\(s\): 0 \(t=0.01\)"),
    ("elbo sde str", lambda: ss.elbo(EPS0, "vp", Z, steps=10), TypeError, "sde must be a scoresolve process"),
    # estimate_moments
    ("estimate_moments batch_size 0", lambda: estimate_moments(EPS0, DSDE, Z, [0.5], num_samples=2, batch_size=0),
     ValueError, "batch_size must be >= 1"),
    ("estimate_moments empty data", lambda: estimate_moments(EPS0, DSDE, Z[:0], [0.5], num_samples=2), ValueError,
     "data must hold at least one sample"),
    ("estimate_moments network nan", lambda: estimate_moments(EPS_NAN, DSDE, Z, [0.5], num_samples=2),
     ValueError, r"estimate_moments: the network returned non-finite values \(NaN/Inf\) at 1 of the 1 times"),
    # evaluate_dataset: a negative timeout or a zero poll interval (a busy wait for the other ranks) were taken
    ("evaluate_dataset wait_timeout -1", lambda: ss.evaluate_dataset(GRID8, "unused", fn=lambda y, g: y.sum(1),
                                                                      bits=8, wait_timeout=-1.0, progress=False),
     ValueError, "wait_timeout must be None"),
    ("evaluate_dataset poll_interval 0", lambda: ss.evaluate_dataset(GRID8, "unused", fn=lambda y, g: y.sum(1),
                                                                      bits=8, poll_interval=0.0, progress=False),
     ValueError, "poll_interval must be a finite number of seconds > 0"),
    ("evaluate_dataset seed 2.5", lambda: ss.evaluate_dataset(GRID8, "unused", fn=lambda y, g: y.sum(1), bits=8,
                                                               seed=2.5, progress=False),
     ValueError, "seed must be a whole number"),
    # bits/dim
    ("bits_per_dim num_dims True", lambda: ss.bits_per_dim(torch.tensor([-3.0]), True), ValueError,
     "num_dims must be a positive integer"),
    ("dequantized_bpd empty x", _dbpd(x=GRID8[:0]), ValueError, "x holds no samples"),
    ("dequantized_bpd batch_size 1.5", _dbpd(batch_size=1.5), ValueError, "batch_size must be a whole number"),
    ("dequantized_bpd fn returns float", _dbpd(fn=lambda y, g: 0.0), TypeError,
     "log_likelihood_fn must return a tensor of log-probabilities"),
    ("dequantized_bpd fn returns nan", _dbpd(fn=lambda y, g: torch.full((y.shape[0],), NAN)), ValueError,
     r"log_likelihood_fn returned non-finite log-probabilities for 2 of 2 samples \(rows \[0, 1\]"),
    # compile_sampler: nfe=2.5 and nfe=True were recorded as 2 and 1 NFE, a NaN example was recorded
    ("compile_sampler nfe 2.5", _compiled(nfe=2.5), ValueError, "nfe must be a whole number"),
    ("compile_sampler nfe True", _compiled(nfe=True), TypeError, "nfe must be an integer"),
    ("compile_sampler example nan", _compiled(example=X + NAN), ValueError, "example contains non-finite values"),
    ("compile_sampler example list", _compiled(example=[[0.0, 1.0]]), TypeError, "example must be a torch.Tensor"),
    ("compile_sampler sde str", _compiled(sde="vp"), TypeError, "sde must be a scoresolve process"),
    ("compile_sampler grid list", _compiled(nfe=None, grid=[1.0, 0.5, 0.1]), TypeError, "grid must be a grid name"),
    ("compile_sampler call list", lambda: ss.compile_sampler(SCORE, SDE, X, nfe=4)([[0.0]]), TypeError,
     "x_T must be a torch.Tensor"),
    # k-diffusion samplers and sigmas
    ("k-diffusion 2-D sigmas", _kd(sigmas=[[10.0, 1.0, 0.0]]), ValueError, r"sigmas must be a 1-D tensor"),
    ("k-diffusion callback int", _kd(callback=3), TypeError, "callback must be callable"),
    ("k-diffusion extra_args int", _kd(extra_args=3), TypeError, "extra_args must be a mapping"),
    ("k-diffusion one step, x nan", _kd(x=torch.full((2, 3), NAN), sigmas=(5.0, 0.0)), ValueError,
     "x contains non-finite values"),
    ("k_diffusion_sigmas n 2.5", lambda: adapters.k_diffusion_sigmas("karras", 2.5, 0.002, 80.0), ValueError,
     "n must be a whole number"),
    ("k_diffusion_sigmas rho 0", lambda: adapters.k_diffusion_sigmas("karras", 10, 0.002, 80.0, rho=0.0), ValueError,
     "rho of the karras grid"),
    ("flow_scheduler_grid 2.5 steps", lambda: adapters.flow_scheduler_grid(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, 2.5),
     ValueError, "num_inference_steps must be a whole number"),
    ("RescaledDenoiser sde str", lambda: adapters.RescaledDenoiser(lambda x, s: x, "ve"), TypeError,
     "sde must be a ForwardSDE"),
    # adapters' time conventions and x0 processing
    ("DDPMTimestep 0", lambda: adapters.DDPMTimestep(0), ValueError, "num_timesteps must be >= 1"),
    ("FlowTimestep 0", lambda: adapters.FlowTimestep(0), ValueError, "num_timesteps must be >= 1"),
    ("ReversedIndex 1", lambda: adapters.ReversedIndex(1), ValueError, "num_scales must be >= 2"),
    ("from_score_sde num_scales 2.5", lambda: adapters.from_score_sde(lambda x, t: x, SDE, continuous=False,
                                                                      num_scales=2.5), ValueError,
     "num_scales must be a whole number"),
    ("X0Processing ratio 2", lambda: adapters.X0Processing(thresholding=True, ratio=2.0), ValueError,
     r"ratio .* must lie in \(0, 1\]"),
    ("X0Processing max_value 0", lambda: adapters.X0Processing(thresholding=True, max_value=0.0), ValueError,
     "max_value must be a finite number >= 1"),
    ("X0Processing clip -1", lambda: adapters.X0Processing(clip=-1.0), ValueError, "clip must be a number > 0"),
]


def _scheduler(n: int = 5, begin: int | None = None, **config):
    sc = adapters.ScoresolveScheduler(**config)
    sc.set_timesteps(n)
    if begin is not None:
        sc.set_begin_index(begin)
    return sc


def _step(sample=None, out=None):
    def run():
        sc = _scheduler()
        x = torch.zeros(2, 3) if sample is None else sample
        return sc.step(torch.zeros_like(x, dtype=torch.float32) if out is None else out, sc.timesteps[0], x)
    return run


CASES += [
    # the diffusers scheduler adapter (IndexError, silent rounding, a silent run from index -1, broadcasting errors)
    ("scheduler num_train_timesteps 0", lambda: adapters.ScoresolveScheduler(num_train_timesteps=0), ValueError,
     "num_train_timesteps must be >= 2, got 0"),
    ("scheduler num_train_timesteps 2.5", lambda: adapters.ScoresolveScheduler(num_train_timesteps=2.5), ValueError,
     "num_train_timesteps must be a whole number"),
    ("scheduler set_timesteps 2.5", lambda: _scheduler(n=2.5), ValueError, "num_inference_steps must be a whole"),
    ("scheduler set_begin_index -1", lambda: _scheduler(begin=-1), ValueError, "begin_index must be >= 0"),
    ("scheduler set_begin_index 99", lambda: _scheduler(begin=99), ValueError,
     "begin_index must be below the 5 timesteps"),
    ("scheduler step int sample", _step(sample=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     "sample must be a floating-point tensor"),
    ("scheduler add_noise timestep 5000", lambda: _scheduler().add_noise(torch.zeros(2, 3), torch.randn(2, 3),
                                                                          torch.tensor([5000, 20])),
     ValueError, r"timesteps must lie in this scheduler's range \[0, 999\]"),
    ("scheduler add_noise timestep -5", lambda: _scheduler().add_noise(torch.zeros(2, 3), torch.randn(2, 3),
                                                                        torch.tensor([-5, 20])),
     ValueError, "timesteps must lie in this scheduler's range"),
    ("scheduler add_noise 3 timesteps for 2", lambda: _scheduler().add_noise(torch.zeros(2, 3), torch.randn(2, 3),
                                                                              torch.tensor([10, 20, 30])),
     ValueError, r"timesteps must hold one value or one per sample \(2\), got 3"),
]


LEVELS17 = torch.arange(16.0).reshape(8, 2) / 16 * 2 - 1  # on the 17-level grid of [-1, 1]


def _train_dequantizer(**kw):
    def run():
        vd = ss.VariationalDequantizer(17, shape=(2,), hidden=4)
        return ss.train_dequantizer(vd, SCORE, kw.pop("data", LEVELS17), **{"sde": SDE, "steps": 2, **kw})
    return run


CASES += [
    # the mixture's closed forms need a Gaussian kernel (AttributeError 'as_time' deep inside before)
    ("GaussianMixture score_fn on PFGM++", lambda: ss.sample(GM.score_fn(ss.PFGMPP()), ss.PFGMPP(), X), TypeError,
     "the mixture's exact score needs a Gaussian-kernel process"),
    ("GaussianMixture model on a name", lambda: GM.model("vp"), TypeError, "needs a Gaussian-kernel process"),
    # prior draws (a torch error from randn before, or a 0-d / 1-D "batch")
    ("prior_sample shape ()", lambda: SDE.prior_sample(()), ValueError, "shape must be \\[batch, ...\\]"),
    ("prior_sample shape (-1, 2)", lambda: SDE.prior_sample((-1, 2)), ValueError, "each entry of shape must be >= 0"),
    ("prior_sample int dtype", lambda: SDE.prior_sample((2, 2), dtype=torch.long), TypeError,
     "dtype must be a floating-point torch.dtype"),
    ("prior_sample generator int", lambda: SDE.prior_sample((2, 2), generator=3), TypeError,
     "generator must be a torch.Generator"),
    ("PFGMPP prior_sample generator int", lambda: ss.PFGMPP().prior_sample((2, 2), generator=3), TypeError,
     "generator must be a torch.Generator"),
    # train_dequantizer: 2.5 steps ran 2, batch_size 0 gave NaN losses, an empty dataset an IndexError
    ("train_dequantizer steps 2.5", _train_dequantizer(steps=2.5), ValueError, "steps must be a whole number"),
    ("train_dequantizer batch_size 0", _train_dequantizer(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("train_dequantizer noise_std -1", _train_dequantizer(noise_std=-1.0), ValueError,
     "noise_std must be a finite number >= 0"),
    ("train_dequantizer noise_std 0 with sde", _train_dequantizer(noise_std=0.0), ValueError,
     "noise_std must be > 0 with a process"),
    ("train_dequantizer empty data", _train_dequantizer(data=LEVELS17[:0]), ValueError,
     "data must be a \\[N, \\*shape\\] tensor with N >= 1"),
    ("train_dequantizer lr nan", _train_dequantizer(lr=NAN), ValueError, "lr must be a finite number > 0"),
]


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t):
        return self.lin(x)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dopri5"])
def test_a_network_of_another_dtype_is_named(solver):
    """A float32 module fed a float64 x_T: torch's 'mat1 and mat2 must have the same dtype' from inside the network
    becomes a TypeError naming both dtypes (the original error chained); other network errors pass unchanged."""
    model = ss.ScoreModel(_Linear(), SDE, prediction="eps")
    with pytest.raises(TypeError, match=r"parameters are torch.float32 on cpu but the state is torch.float64") as info:
        ss.sample(model, SDE, X, solver=solver)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert ss.sample(model, SDE, X.float(), solver=solver).x.dtype == torch.float32  # the matching dtype runs

    def boom(x, t):
        raise RuntimeError("boom: expected scalar type")

    with pytest.raises(RuntimeError, match="boom"):  # not a module: left alone
        ss.sample(boom, SDE, X, solver=solver)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "euler_maruyama"])
def test_scheduler_loop_with_a_nan_network_ends_in_an_error(solver):
    """A pipeline whose network returns NaN for sample 1: the last step raises (one check per solve, none in the
    loop) instead of handing back NaN latents."""
    sc = _scheduler(solver=solver)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ss.NonFiniteError, match=rf"'ScoresolveScheduler\[{solver}\]'.* in 1 sample\(s\): 1 ") as info:
        for t in sc.timesteps:
            out = torch.zeros_like(x)
            out[1] = NAN
            x = sc.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert info.value.indices == [1]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_checks_leave_valid_calls_alone():
    """What the checks must still accept: whole floats and numpy integers as counts, a 0-d tensor t_eps, a tensor
    diffusion, karras rho given as a numpy float, X0Processing's thresholding settings ignored when it is off."""
    import numpy as np

    a = ss.sample(SCORE, SDE, X, solver="euler", nfe=np.int64(6), t_eps=torch.tensor(1e-3, dtype=F64))
    b = ss.sample(SCORE, SDE, X, solver="euler", nfe=6.0, t_eps=1e-3)
    assert torch.equal(a.x, b.x)
    c = ss.sample(SCORE, SDE, X, solver="euler_maruyama", nfe=6, diffusion=torch.tensor(1.0),
                  generator=torch.Generator().manual_seed(0))
    d = ss.sample(SCORE, SDE, X, solver="euler_maruyama", nfe=6, diffusion=1.0,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(c.x, d.x)
    assert torch.equal(ss.time_grid(SDE, 5, "karras", rho=np.float64(7.0)), ss.time_grid(SDE, 5, "karras"))
    adapters.X0Processing(thresholding=False, ratio=2.0, max_value=0.5)  # unused when thresholding is off
    e = ss.elbo(EPS0, DSDE, Z, steps=10.0, variance="beta")  # a whole float is the count
    f = ss.elbo(EPS0, DSDE, Z, steps=10, variance="beta")
    assert torch.equal(e.elbo, f.elbo)
    r = ss.dequantized_bpd(lambda y, g: {"log_prob": torch.zeros(y.shape[0])}, GRID8)  # a mapping is a result
    assert r.bpd.shape == (2,) and bool(torch.isfinite(r.bpd).all())


def test_a_generator_on_another_device_is_refused_before_the_solve():
    """Noise and Hutchinson probes are drawn on the state's device: a generator of another device type is refused
    at entry (torch refused it only at the first draw, mid-solve). Checked here on the meta device; the CUDA case
    below needs a GPU."""
    from scoresolve._utils import check_generator

    with pytest.raises(ValueError, match=r"generator draws on cpu but the state is on meta"):
        check_generator(torch.Generator(), like=torch.zeros(2, 2, device="meta"))
    check_generator(torch.Generator(), like=torch.zeros(2, 2))  # same device type: fine
    check_generator(None, like=torch.zeros(2, 2, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_generator_for_a_cuda_solve_is_refused():
    x = X.cuda()
    with pytest.raises(ValueError, match="generator draws on cpu but the state is on cuda"):
        ss.sample(SCORE, SDE, x, solver="euler_maruyama", generator=torch.Generator())
    with pytest.raises(ValueError, match="generator draws on cpu but the state is on cuda"):
        ss.log_likelihood(SCORE, SDE, x, generator=torch.Generator())
    ss.sample(SCORE, SDE, x, solver="dpmpp_2m", generator=torch.Generator())  # a deterministic solver ignores it


CLI_SAMPLE = ["sample", "--dim", "2", "--components", "2", "--batch", "4", "--quiet", "--threads", "1"]
CLI_COMPARE = ["compare", "--dim", "2", "--components", "2", "--batch", "4", "--quiet", "--threads", "1", "--out", ""]


@pytest.mark.parametrize("argv, match", [
    ([*CLI_SAMPLE, "--solver", "pc", "--nfe", "1"], "--nfe 1: solver 'pc' needs at least nfe=2, got nfe=1"),
    ([*CLI_SAMPLE, "--solver", "heun", "--nfe", "1"], "--nfe 1: solver 'heun' needs at least nfe=2"),
    ([*CLI_SAMPLE, "--solver", "calibrated"], "'calibrated' runs a Calibration from scoresolve.calibrate"),
    ([*CLI_COMPARE, "--solvers", "calibrated", "--nfe", "5"], "'calibrated' runs a Calibration"),
], ids=["sample-pc-nfe1", "sample-heun-nfe1", "sample-calibrated", "compare-calibrated"])
def test_cli_usage_errors_are_one_line(argv, match, capsys):
    """These ended in a ValueError traceback from inside sample() before; now exit status 2 with one line."""
    from scoresolve.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert match in err.strip().splitlines()[-1]


@pytest.mark.parametrize("solver,option", [("ddim", "afs"), ("unipc", "final_corrector"), ("deis", "lower_order_final"),
                                           ("dopri5", "compact")])
def test_a_switch_takes_only_true_or_false(solver, option):
    """An option whose default is True or False refuses a truthy string or number (it would switch on unseen);
    numpy's bool is a bool."""
    import numpy as np

    sde = ss.VPSDE()
    score = ss.GaussianMixture.random(2, 2, seed=0).score_fn(sde)
    x = torch.randn(2, 2, dtype=torch.float64)
    kw = {"nfe": 6} if solver != "dopri5" else {}
    for bad in ("yes", "False", 1, None):
        with pytest.raises(TypeError, match=f"option '{option}' of solver '{solver}' must be True or False"):
            ss.sample(score, sde, x, solver=solver, **{option: bad}, **kw)
    ss.sample(score, sde, x, solver=solver, **{option: np.bool_(False)}, **kw)


def test_non_finite_error_mentions_last_finite_only_when_it_has_one():
    from scoresolve.solvers.errors import NonFiniteError

    with_state = NonFiniteError("euler", [0], [0.5], torch.zeros(1, 2))
    without = NonFiniteError("scheduler", [0], [0.5], None)
    assert ".last_finite" in str(with_state) and ".last_finite" not in str(without)


def test_a_network_that_changes_its_input_in_place_is_stopped():
    """A network that modifies its input in place would corrupt the solver's state: the first call says so (the
    tensor's version counter, no device sync), in sample (grid and adaptive solvers) and under inference mode it runs
    unchecked-but-correct models as before."""
    sde = ss.VPSDE()
    score = ss.GaussianMixture.random(2, 2, seed=0).score_fn(sde)

    def in_place(x, t):
        x.mul_(1.0)
        return score(x, t)

    x = torch.randn(4, 2, dtype=torch.float64)
    for kw in ({"solver": "euler", "nfe": 5}, {"solver": "dopri5"}):
        with pytest.raises(RuntimeError, match="changed its input x in place"):
            ss.sample(in_place, sde, x, **kw)
    with torch.inference_mode():
        assert torch.isfinite(ss.sample(score, sde, x, nfe=5).x).all()
