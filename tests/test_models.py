"""Reference networks, datasets, denoising score matching and the shipped digits model: shapes, exactness of the
dequantization conventions, convergence of DSM to an exact score, bit-identical resume, and sample statistics."""

import math
from collections import Counter

import pytest
import torch

import scoresolve
from scoresolve import EDMSDE, VESDE, VPSDE, GaussianMixture, ScoreModel, SubVPSDE
from scoresolve import data as sdata
from scoresolve import quantization as q
from scoresolve.models import MLPScoreNet, TrainConfig, UNet, export_model, load_checkpoint, num_parameters
from scoresolve.models.train import dsm_loss, sample_time, train

try:
    import sklearn  # noqa: F401

    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="the digits dataset needs scikit-learn")


def _randomize_zero_params(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh net the zero map; give them random values for shape tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


# ----------------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "net, shape",
    [
        (MLPScoreNet(2), (2,)),
        (MLPScoreNet(shape=(3, 4)), (3, 4)),
        (UNet(in_channels=1), (1, 8, 8)),
        (UNet(in_channels=3), (3, 32, 32)),
    ],
    ids=["mlp-2d", "mlp-3x4", "unet-1x8x8", "unet-3x32x32"],
)
def test_network_shapes_dtypes_and_per_sample_time(net, shape):
    net = _randomize_zero_params(net).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, *shape, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    with torch.no_grad():
        out = net(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # per-sample t: each row is what the network gives that sample alone
        rows = torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(5)])
        torch.testing.assert_close(out, rows, rtol=1e-4, atol=1e-5)
        # the time input matters, and a scalar t is broadcast over the batch
        assert (net(x, torch.full((5,), 0.2)) - net(x, torch.full((5,), 0.8))).abs().max() > 1e-3
        torch.testing.assert_close(net(x, 0.3), net(x, torch.full((5,), 0.3)))
        # float64 input to a float32 net answers in float64; a float64 net works end to end
        assert net(x.double(), t.double()).dtype == torch.float64
        net64 = net.double()
        torch.testing.assert_close(net64(x.double(), t.double()), out.double(), rtol=1e-4, atol=1e-5)
        net.float()
    score = ScoreModel(net, VPSDE(), prediction="eps", time="t")(x, t.clamp(min=1e-3))  # sigma(0) = 0
    assert score.shape == x.shape and torch.isfinite(score).all()


def test_network_sizes_and_errors():
    assert num_parameters(UNet(1)) < 300_000  # "a few hundred k parameters at most by default"
    assert num_parameters(UNet(3)) < 300_000
    assert num_parameters(MLPScoreNet(2)) < 200_000
    with pytest.raises(ValueError, match="divisible"):
        UNet(1)(torch.zeros(2, 1, 7, 7), torch.zeros(2))
    with pytest.raises(ValueError, match="images"):
        UNet(3)(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="batch"):
        MLPScoreNet(2)(torch.zeros(3, 2), torch.zeros(2))


def test_fresh_networks_predict_zero_noise():
    # zero-initialised last layers: an untrained model predicts eps_hat = 0 (score 0), a neutral start
    x = torch.randn(4, 1, 8, 8)
    assert UNet(1)(x, torch.rand(4)).abs().max() == 0
    assert MLPScoreNet(2)(torch.randn(4, 2), torch.rand(4)).abs().max() == 0


# ----------------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------------
@needs_sklearn
def test_digits_split_is_fixed_disjoint_and_on_the_17_level_grid():
    train_x, train_y = sdata.digits("train", return_labels=True)
    test_x = sdata.digits("test")
    all_x = sdata.digits("all")
    assert train_x.shape == (1500, 1, 8, 8) and test_x.shape == (297, 1, 8, 8) and all_x.shape == (1797, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_y.shape == (1500,)
    assert set(train_y.tolist()) == set(range(10))
    key = lambda x: Counter(tuple(r.tolist()) for r in x.flatten(1))  # noqa: E731
    assert key(train_x) + key(test_x) == key(all_x)  # a partition of the dataset
    torch.testing.assert_close(sdata.digits("test"), test_x, rtol=0, atol=0)  # fixed
    assert not torch.equal(sdata.digits("test", seed=1), test_x)
    lv = q.grid_levels(all_x, sdata.DIGITS_LEVELS, sdata.DIGITS_RANGE)
    assert lv.min() == 0 and lv.max() == 16 and lv.unique().numel() == 17
    torch.testing.assert_close(all_x, 2 * lv.float() / 16 - 1, rtol=0, atol=1e-7)


@needs_sklearn
def test_dequantization_of_L_level_data():
    x = sdata.digits("test")[:50]
    g = torch.Generator().manual_seed(0)
    y = q.dequantize(x, 17, generator=g)
    assert y.min() >= -1 and y.max() < 1 and not torch.equal(y, x)
    torch.testing.assert_close(q.quantize(y, 17), x, rtol=0, atol=1e-6)  # every value stays in its own bin
    # bin of level v is [-1 + 2 v / 17, -1 + 2 (v + 1) / 17)
    v = q.grid_levels(x, 17, (-1, 1)).double()
    assert ((y.double() + 1) * 17 / 2 - v).min() >= 0 and ((y.double() + 1) * 17 / 2 - v).max() < 1
    with pytest.raises(ValueError, match="grid"):
        q.grid_levels(y, 17, (-1, 1))
    # with L = 2^k the convention is exactly the k-bit one
    lv = torch.randint(0, 16, (6, 3, 4, 4), generator=g)
    x4 = q.from_levels(lv, 16)
    u = torch.rand(x4.shape, generator=g)
    torch.testing.assert_close(q.dequantize(x4, 16, noise=u), scoresolve.uniform_dequantize(x4, 4, noise=u))
    assert q.levels_offset(16) == pytest.approx(q.bin_offset(4))
    # offset log2(17 / 2); the uniform density on [-1, 1]^D is worth log2(17) bits/dim
    assert q.levels_offset(sdata.DIGITS_LEVELS, sdata.DIGITS_RANGE) == pytest.approx(math.log2(8.5))
    assert scoresolve.bits_per_dim(-64 * math.log(2.0), 64, num_levels=17) == pytest.approx(math.log2(17))


@pytest.mark.parametrize("name", sdata.TOY_DATASETS)
def test_toy_sets_are_seeded_2d_and_order_one(name):
    a = sdata.toy_dataset(name, 4000, seed=0)
    assert a.shape == (4000, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(sdata.toy_dataset(name, 4000, seed=0), a, rtol=0, atol=0)
    assert not torch.equal(sdata.toy_dataset(name, 4000, seed=1), a)
    assert (a.mean(0).abs() < 0.4).all() and ((a.std(0) > 0.7) & (a.std(0) < 1.6)).all()


def test_checkerboard_and_gmm_structure():
    pts = sdata.toy_dataset("checkerboard", 4000, dtype=torch.float64) * 1.15 + 2  # back to [0, 4]^2
    cells = pts.floor().long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only the squares of one colour are occupied
    assert len({tuple(c) for c in cells.tolist()}) == 8
    gm = sdata.toy_mixture()
    x = sdata.toy_dataset("gmm", 20000)
    torch.testing.assert_close(x.double().mean(0), gm.mean(), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.double().T), gm.cov(), atol=0.08, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# the objective and training
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), EDMSDE(), scoresolve.CosineVPSDE()],
                         ids=["vp", "subvp", "ve", "edm", "cosine"])
def test_likelihood_importance_sampling_weight_is_exact(sde):
    # g^2 / sigma^2 = -2 dlambda/dt, so int_{t_eps}^T g^2/sigma^2 dt = 2 (lambda(t_eps) - lambda(T)) = the IS weight
    t_eps = 1e-5
    u = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    t = t_eps * (sde.T / t_eps) ** u  # log-spaced quadrature nodes
    w = sde._g2(t) / sde._sigma(t) ** 2
    integral = torch.trapezoid(w * t * math.log(sde.T / t_eps), u)
    ts, is_w = sample_time(sde, 20_000, t_eps, torch.Generator().manual_seed(0), importance_sampling=True)
    assert float(is_w[0]) == pytest.approx(float(integral), rel=1e-5)
    assert ts.min() >= t_eps and ts.max() <= sde.T
    # the times are uniform in log-SNR: their lambda has the mean and std of U(lambda(T), lambda(t_eps))
    lam = sde.log_snr(ts.double())
    lo, hi = (float(v) for v in sde.log_snr(torch.tensor([sde.T, t_eps], dtype=torch.float64)))
    assert float(lam.mean()) == pytest.approx((lo + hi) / 2, abs=0.02 * (hi - lo))
    assert float(lam.std()) == pytest.approx((hi - lo) / math.sqrt(12), rel=0.02)


def test_dsm_loss_of_the_exact_score_is_the_irreducible_minimum():
    # with the exact eps of a Gaussian-mixture data set the DSM loss is smaller than with any perturbed one
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.3**2, 0.2**2])
    sde = VPSDE()

    def exact_eps(x, t):
        return -sde._sigma(t)[:, None] * gm.score(x, t, sde).to(x.dtype)

    x0 = gm.sample(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = []
    for scale in (1.0, 0.8, 1.2):
        g = torch.Generator().manual_seed(1)
        losses.append(float(dsm_loss(lambda x, t, s=scale: s * exact_eps(x, t), sde, x0, generator=g, t_eps=1e-3)))
    assert losses[0] < losses[1] and losses[0] < losses[2]
    with pytest.raises(ValueError, match="importance"):
        dsm_loss(exact_eps, sde, x0[:4], weighting="eps", importance_sampling=True)


def test_dsm_training_learns_the_exact_gaussian_mixture_score():
    gm = GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.3**2, 0.2**2])
    cfg = TrainConfig(data="gmm", steps=300, batch_size=256, lr=3e-3, model_kwargs={"hidden": 64, "depth": 2})
    res = train(cfg, data=lambda n, g: gm.sample(n, generator=g), progress=False)
    first, last = sum(res.losses[:50]) / 50, sum(res.losses[-50:]) / 50
    assert last < 0.5 * first, (first, last)
    sde, model = res.sde, res.score_model()
    errs = {}
    for t in (0.1, 0.5):
        x = gm.sample_marginal(2000, t, sde, generator=torch.Generator().manual_seed(123))
        exact = gm.score(x, t, sde).float()
        with torch.no_grad():
            errs[t] = float((model(x, torch.full((2000,), t)) - exact).norm() / exact.norm())
    # measured 0.04-0.05 at t = 0.5 and 0.12-0.15 at t = 0.1 (seeds 0-2); an untrained net (eps_hat = 0) has error 1
    assert errs[0.5] < 0.2, errs
    assert errs[0.1] < 0.4, errs


def test_checkpoint_round_trip_and_bit_identical_resume(tmp_path):
    kw = dict(data="moons", steps=12, batch_size=32, lr=1e-3, warmup=4, checkpoint_every=6,
              model_kwargs={"hidden": 32, "depth": 1})
    straight = train(TrainConfig(**kw), out_dir=str(tmp_path / "a"), progress=False)
    # interrupted after 6 steps, then resumed to 12 with the same settings
    train(TrainConfig(**{**kw, "steps": 6}), out_dir=str(tmp_path / "b"), progress=False)
    resumed = train(TrainConfig(**kw), out_dir=str(tmp_path / "b"), resume=True, progress=False)
    assert resumed.step == straight.step == 12
    assert resumed.losses == straight.losses
    for m1, m2 in ((straight.net, resumed.net), (straight.ema, resumed.ema)):
        for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(**{**kw, "lr": 2e-3}), out_dir=str(tmp_path / "b"), resume=True, progress=False)

    x, t = torch.randn(16, 2), torch.rand(16)
    expect = straight.score_model()(x, t)
    model, sde, config = load_checkpoint(str(tmp_path / "a" / "train_state.pt"))
    assert isinstance(sde, VPSDE) and config.steps == 12 and config.model_kwargs == {"hidden": 32, "depth": 1}
    torch.testing.assert_close(model(x, t), expect, rtol=0, atol=0)
    raw, _, _ = load_checkpoint(str(tmp_path / "a" / "train_state.pt"), use_ema=False)
    torch.testing.assert_close(raw(x, t), straight.score_model(use_ema=False)(x, t), rtol=0, atol=0)
    export_model(straight, str(tmp_path / "m32.pt"))
    export_model(straight, str(tmp_path / "m16.pt"), dtype=torch.float16)
    torch.testing.assert_close(load_checkpoint(str(tmp_path / "m32.pt"))[0](x, t), expect, rtol=0, atol=0)
    torch.testing.assert_close(load_checkpoint(str(tmp_path / "m16.pt"))[0](x, t), expect, rtol=1e-2, atol=1e-2)
    assert (tmp_path / "m16.pt").stat().st_size < (tmp_path / "m32.pt").stat().st_size


# ----------------------------------------------------------------------------------------------------------------
# the shipped digits model
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    from scoresolve.models import load_digits_model

    return load_digits_model()


@needs_sklearn
def test_shipped_digits_model_loads_and_scores_are_finite(digits_model):
    model, sde = digits_model
    assert isinstance(sde, VPSDE) and model.prediction == "eps" and model.time == "t"
    y = q.dequantize(sdata.digits("test")[:8], 17, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (1e-5, 1e-3, 0.5, 1.0):
            s = model(sde.perturb(y, t, generator=torch.Generator().manual_seed(1)), torch.full((8,), t))
            assert s.shape == y.shape and torch.isfinite(s).all()


@needs_sklearn
def test_shipped_digits_model_samples_match_pixel_statistics(digits_model):
    model, sde = digits_model
    x_T = sde.prior_sample((16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = scoresolve.sample(model, sde, x_T, solver="dpmpp_2m", nfe=10).x
    assert torch.isfinite(x).all()
    ref = q.dequantize(sdata.digits("test"), 17, generator=torch.Generator().manual_seed(0))
    m_s, m_d = x.mean(0).flatten(), ref.mean(0).flatten()
    # per-pixel means: same spatial layout (dark border, bright strokes) and level; overall contrast alike.
    # Measured over x_T seeds 0-4: corr 0.96-0.98, mean |diff| 0.08-0.11, std ratios 0.97-1.08;
    # prior noise in place of samples: corr -0.01, mean |diff| 0.56, std ratios 1.45 and 2.28.
    corr = torch.corrcoef(torch.stack([m_s, m_d]))[0, 1]
    assert corr > 0.8, corr
    assert (m_s - m_d).abs().mean() < 0.2
    assert 0.7 < float(x.std() / ref.std()) < 1.3
    assert 0.7 < float(x.std(0).mean() / ref.std(0).mean()) < 1.4


def test_time_embedding_max_freq_sets_the_top_frequency_and_smoothness(tmp_path):
    """``time_max_freq`` scales the sinusoidal embedding's geometric frequencies (1000: DDPM's), round-trips through
    a checkpoint, and a small one makes the features smooth in t (no oscillation at 1000 rad per unit t)."""
    from scoresolve.models.mlp import TimeEmbedding

    ref, low = TimeEmbedding(32, num_features=8), TimeEmbedding(32, num_features=8, max_freq=10.0)
    assert ref.freqs[0] == 1000.0 and low.freqs[0] == 10.0
    torch.testing.assert_close(low.freqs, ref.freqs / 100)
    t = torch.linspace(0.3, 0.31, 101)
    # the largest second difference of the features over steps of 1e-4 in t: ~(1e-4 w)^2 for the top frequency w
    assert ref.features(t).diff(2, dim=0).abs().max() > 0.5 * (1e-4 * 1000) ** 2
    assert low.features(t).diff(2, dim=0).abs().max() < 2 * (1e-4 * 10) ** 2
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="max_freq"):
            TimeEmbedding(32, max_freq=bad)
    assert UNet(time_max_freq=10.0).time.freqs[0] == 10.0 and MLPScoreNet(2, time_max_freq=5.0).time.freqs[0] == 5.0
    res = train(TrainConfig(data="moons", steps=2, batch_size=8, model_kwargs={"hidden": 16, "depth": 1,
                                                                               "time_max_freq": 10.0}),
                out_dir=str(tmp_path), progress=False)
    model, _, config = load_checkpoint(str(tmp_path / "train_state.pt"))
    assert config.model_kwargs["time_max_freq"] == 10.0 and model.net.time.freqs[0] == 10.0
    x, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(model(x, t), res.score_model()(x, t), rtol=0, atol=0)
