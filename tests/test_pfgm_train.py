"""Training PFGM++ denoisers (scoresolve.models.train with sde="pfgmpp"): EDM's preconditioning, the loss, a 2-D
point-cloud toy whose learned denoiser is checked against the cloud's exact posterior mean, and the checkpoint
round trip (load_checkpoint rebuilds PFGMPP(D) and an x0 model that sample / log_likelihood take)."""

import pytest
import torch

import scoresolve as ss
from scoresolve.models.precond import EDMPrecond
from scoresolve.models.train import TrainConfig, edm_denoiser_loss, export_model, load_checkpoint, train

D_TOY = 4.0  # heavy tails: the Student-t posterior mean differs clearly from the Gaussian (EDM) one


def _cloud():
    pts = torch.tensor([[1.0, 0.0], [-0.8, 0.6], [0.0, -1.0]], dtype=torch.float64)
    return ss.PointCloud(pts, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def _toy_config(steps, D=D_TOY, **kw):
    return TrainConfig(data="toy", sde="pfgmpp", sde_kwargs={"D": D}, model="mlp",
                       model_kwargs={"hidden": 64, "depth": 2, "time_dim": 32, "time_max_freq": 10.0},
                       steps=steps, batch_size=256, lr=3e-3, warmup=20, ema_decay=0.99, seed=0, **kw)


def _toy_data():
    cloud = _cloud()

    def draw(n, g):
        return cloud.sample(n, g)[0].float()

    return cloud, draw


def test_precond_coefficients_and_weight():
    """c_skip, c_out, c_in at sigma: EDM's formulas; a zero network gives D = c_skip x; lambda c_out^2 = 1."""
    net = EDMPrecond(lambda x, c: torch.zeros_like(x), sigma_data=0.5)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    assert torch.allclose(c_skip, 0.25 / (sigma**2 + 0.25))
    assert torch.allclose(c_out * c_out * (sigma**2 + 0.25) / (sigma * 0.5) ** 2, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(c_in, (sigma**2 + 0.25) ** -0.5) and torch.allclose(c_noise, sigma.log() / 4)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    assert torch.allclose(net(x, sigma), c_skip[:, None, None] * x)
    with pytest.raises(ValueError, match="sigma > 0"):
        net(x, 0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(net, sigma_data=0.0)


def test_loss_of_the_exact_denoiser_is_the_posterior_variance():
    """With D_theta = the cloud's exact posterior mean the loss is E[lambda Var(y | x)] (no bias): it is below the
    loss of the Gaussian-kernel posterior mean (the wrong kernel for D = 4) and of the data mean."""
    cloud = _cloud()
    proc = ss.PFGMPP(D=D_TOY)
    g = torch.Generator().manual_seed(0)
    y = cloud.sample(20000, g)[0]
    edm = ss.EDMSDE(T=80.0)

    def loss(fn):
        return float(edm_denoiser_loss(fn, proc, y, torch.Generator().manual_seed(1)))

    exact = loss(lambda x, s: cloud.x0(x, s, proc))
    gaussian = loss(lambda x, s: cloud.x0(x, s, edm))
    mean = loss(lambda x, s: (cloud.weights[:, None] * cloud.points).sum(0).expand_as(x))
    # the same draws for all three (paired): over seeds the Gaussian one is 5-7% higher
    assert exact < 0.98 * gaussian and exact < 0.5 * mean


def test_tiny_run_loss_decreases_and_config_checks():
    _, draw = _toy_data()
    res = train(_toy_config(150), data=draw, progress=False)
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < 0.6 * first
    assert isinstance(res.sde, ss.PFGMPP) and res.sde.D == D_TOY
    assert res.score_model().prediction == "x0"
    with pytest.raises(ValueError, match="EDM's denoiser loss"):
        TrainConfig(sde="pfgmpp", weighting="likelihood")
    with pytest.raises(ValueError, match="p_std"):
        TrainConfig(sde="pfgmpp", p_std=0.0)


@pytest.fixture(scope="module")
def toy_run():
    _, draw = _toy_data()
    return train(_toy_config(1500), data=draw, progress=False)


def test_toy_denoiser_matches_the_exact_posterior_mean(toy_run):
    """On x ~ p_sigma (the PFGM++ marginal of the cloud, D = 4), the learned x0 is closer to the exact posterior mean
    than the trivial predictors (x itself, the data mean) and than the Gaussian-kernel posterior mean."""
    cloud = _cloud()
    proc = ss.PFGMPP(D=D_TOY)
    model = toy_run.score_model()
    edm = ss.EDMSDE(T=80.0)
    g = torch.Generator().manual_seed(5)
    mean = (cloud.weights[:, None] * cloud.points).sum(0)
    for sigma in (0.3, 0.7, 1.5):
        x = cloud.sample_marginal(4000, sigma, proc, g)
        exact = cloud.x0(x, sigma, proc)
        with torch.no_grad():
            learned = model.raw(x.float(), torch.full((x.shape[0],), sigma)).double()

        def mse(pred, exact=exact):
            return float((pred - exact).square().sum(1).mean())

        err = mse(learned)
        baselines = {"identity": mse(x), "data mean": mse(mean.expand_as(x)),
                     "gaussian posterior": mse(cloud.x0(x, sigma, edm))}
        assert err < 0.5 * min(baselines.values()), (sigma, err, baselines)


def test_checkpoint_round_trip_samples_and_likelihood(toy_run, tmp_path):
    path = str(tmp_path / "toy.pt")
    export_model(toy_run, path)
    model, sde, config = load_checkpoint(path)
    assert isinstance(sde, ss.PFGMPP) and sde.D == D_TOY and model.prediction == "x0"
    assert config.sde == "pfgmpp" and config.sde_kwargs == {"D": D_TOY}
    x = torch.randn(8, 2)
    s = torch.rand(8) + 0.1
    with torch.no_grad():
        assert torch.allclose(model.raw(x, s), toy_run.ema(x, s), atol=1e-6)
    x_T = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0))
    out = ss.sample(model, sde, x_T, solver="heun", grid=sde.karras_grid(18).float(), t_eps=sde.sigma_min).x
    # samples land near the cloud's points (the toy denoiser is good: most within 0.25 of a point)
    d = (out.double()[:, None] - _cloud().points[None]).norm(dim=-1).min(1).values
    assert float((d < 0.25).double().mean()) > 0.8
    ll = ss.log_likelihood(model, sde, out[:4], t_eps=sde.sigma_min, divergence="exact")
    assert torch.isfinite(ll.log_prob).all()


def test_cli_trains_a_pfgmpp_checkpoint_that_the_commands_take(tmp_path, capsys):
    from scoresolve.cli import main

    ckpt = str(tmp_path / "run" / "model.pt")
    assert main(["train", "--data", "moons", "--sde", "pfgmpp", "--sde-arg", "D=8", "--steps", "3", "--batch-size",
                 "16", "--model-arg", "hidden=16", "--model-arg", "depth=1", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    model, sde, config = load_checkpoint(ckpt)
    assert isinstance(sde, ss.PFGMPP) and sde.D == 8 and model.prediction == "x0" and config.p_mean == -1.2
    capsys.readouterr()
    out = tmp_path / "s.pt"
    assert main(["sample", "--checkpoint", ckpt, "--solver", "heun", "--nfe", "7", "--batch", "8", "--quiet",
                 "--out", str(out)]) == 0
    assert f"{ckpt} (PFGMPP(D=8" in capsys.readouterr().out
    assert torch.isfinite(torch.load(out, weights_only=True)["x"]).all()
    assert main(["likelihood", "--checkpoint", ckpt, "--num-samples", "4", "--batch-size", "4", "--rtol", "1e-3",
                 "--atol", "1e-3", "--out-dir", str(tmp_path / "ll"), "--quiet"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    for bad in (["--weighting", "likelihood"], ["--t-sampling", "logit_normal"]):
        with pytest.raises(SystemExit) as e:
            main(["train", "--sde", "pfgmpp", *bad, "--steps", "1", "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and "EDM's denoiser loss" in capsys.readouterr().err


def test_the_shipped_digits_pfgmpp_model(tmp_path, capsys):
    """The shipped checkpoint loads as PFGMPP(D=128) with an x0 model; the commands take --model digits_pfgmpp and
    its bits/dim on two held-out digits (loose tolerances) beats the uniform density on the 17 levels."""
    pytest.importorskip("sklearn")
    from scoresolve.cli import main
    from scoresolve.models import BUILTIN_MODELS, load_digits_pfgmpp_model

    model, sde = load_digits_pfgmpp_model()
    assert BUILTIN_MODELS["digits_pfgmpp"] is load_digits_pfgmpp_model
    assert isinstance(sde, ss.PFGMPP) and sde.D == 128 and sde.sigma_max == 80 and model.prediction == "x0"
    assert main(["sample", "--model", "digits_pfgmpp", "--solver", "heun", "--batch", "4", "--nfe", "7", "--quiet",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "digits_pfgmpp (PFGMPP(D=128" in capsys.readouterr().out
    # no --solver: the default sampler runs on the process's EDM view (`Process.ode_view`)
    assert main(["sample", "--model", "digits_pfgmpp", "--batch", "2", "--nfe", "5", "--quiet",
                 "--out", str(tmp_path / "d.pt")]) == 0
    capsys.readouterr()
    for solver, says in ((["--solver", "dpmpp_2m"], "'gaussian_kernel'"),
                         (["--solver", "euler_maruyama"], "'reverse_sde'")):  # usage errors, not tracebacks
        with pytest.raises(SystemExit) as e:
            main(["sample", "--model", "digits_pfgmpp", *solver, "--batch", "2", "--quiet"])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert main(["evaluate", "--model", "digits_pfgmpp", "--bpd-n", "2", "--batch-size", "2", "--rtol", "1e-2",
                 "--atol", "1e-2"]) == 0
    bpd = float(capsys.readouterr().out.split("digits (17 levels")[1].split("): ")[1].split()[0])
    assert 0.5 < bpd < 4.087
