"""Dequantizers beyond uniform (scoresolve.quantization.dequantizers): exact densities, exact bounds on bin-constant
densities, bounds below the exact discrete log-probability of a Gaussian mixture, the importance-weighted bound
approaching it, and a variational q that beats uniform."""

import math

import pytest
import torch

from scoresolve import VPSDE, GaussianMixture
from scoresolve.quantization import (
    TruncatedNormalDequantizer,
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
    dequantize,
    dequantized_bpd,
    importance_weighted_bits_per_dim,
    make_dequantizer,
    quantize,
    train_dequantizer,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grid(shape, L, data_range, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, L, shape, generator=g)
    lo, hi = data_range
    return i, (lo + (hi - lo) * i.to(F64) / (L - 1)).to(dtype)


def _perturbed_variational(L, data_range, shape, seed=0):
    dq = VariationalDequantizer(L, data_range, shape, hidden=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dq.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return dq


def _all_dequantizers(L, data_range, shape):
    return [
        UniformDequantizer(L, data_range),
        TruncatedNormalDequantizer(L, data_range, scale=0.2),
        TruncatedNormalDequantizer(L, data_range, scale=1.0),
        VariationalDequantizer(L, data_range, shape, hidden=8),  # untrained: exactly uniform
        _perturbed_variational(L, data_range, shape),
    ]


@pytest.mark.parametrize("L,data_range,shape", [(17, (-1.0, 1.0), (1, 8, 8)), (256, (0.0, 1.0), (3, 2, 2)),
                                                (5, (-3.0, 2.0), (7,))])
def test_uniform_is_bit_identical_to_dequantize(L, data_range, shape):
    _, x = grid((6, *shape), L, data_range)
    y_old = dequantize(x, L, data_range, generator=torch.Generator().manual_seed(4))
    y, log_q = UniformDequantizer(L, data_range).sample(x, torch.Generator().manual_seed(4))
    assert torch.equal(y, y_old) and y.dtype == x.dtype
    assert torch.equal(log_q, torch.zeros(6, dtype=F64))


def test_dequantized_bpd_uniform_path_is_bit_identical():
    """dequantized_bpd with the default (and with an explicit UniformDequantizer) gives the numbers of the code it
    replaced: dequantize, log_likelihood with the same generator, bits_per_dim."""
    from scoresolve import log_likelihood

    gm = GaussianMixture([1.0, 2.0], torch.tensor([[-0.5] * 4, [0.4] * 4]), torch.tensor([0.1, 0.2]),
                         event_shape=(1, 2, 2))
    sde = VPSDE()
    score = gm.score_fn(sde)
    _, x = grid((6, 1, 2, 2), 17, (-1.0, 1.0))
    kw = dict(rtol=1e-2, atol=1e-2, probes=1)
    old = []
    for r in range(2):
        row = []
        for b, start in enumerate(range(0, 6, 4)):
            g = torch.Generator().manual_seed(7 + 1000 * r + b)
            y = dequantize(x[start : start + 4], 17, (-1.0, 1.0), generator=g)
            res = log_likelihood(score, sde, y, generator=g, **kw)
            row.append(bits_per_dim(res.log_prob.double(), 4, None, (-1.0, 1.0), num_levels=17))
        old.append(torch.cat(row))
    old = torch.stack(old).mean(0)
    fn = lambda y, g: log_likelihood(score, sde, y, generator=g, **kw)  # noqa: E731
    for dq in (None, UniformDequantizer(17, (-1.0, 1.0))):
        new = dequantized_bpd(fn, x, repeats=2, num_levels=17, batch_size=4, seed=7, dequantizer=dq)
        assert torch.equal(new.bpd, old) and new.mean == float(old.mean()) and new.log_q_mean == 0.0
        assert bool((new.iw_bpd <= new.bpd + 1e-12).all())  # log-mean-exp >= mean
    with pytest.raises(ValueError, match="dequantizer is for 5 levels"):
        dequantized_bpd(fn, x, num_levels=17, dequantizer=UniformDequantizer(5))


def _truncnorm_cdf(u, s):
    a = torch.tensor(-0.5 / s, dtype=F64)
    pa = torch.special.ndtr(a)
    return (torch.special.ndtr((u - 0.5) / s) - pa) / (1 - 2 * pa)


@pytest.mark.parametrize("scale", [0.05, 0.2, 0.5, 3.0])
def test_truncated_normal_density_and_samples(scale):
    tn = TruncatedNormalDequantizer(3, scale=scale)
    # log q integrates to 1 over [0, 1] (composite Simpson, 20001 nodes), and E_q[log q] is kl_from_uniform
    n = 20001
    u = torch.linspace(0, 1, n, dtype=F64)
    lq = tn.log_prob_unit(torch.zeros(n, 1, dtype=torch.long), u[:, None])
    w = torch.ones(n, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    w /= 3 * (n - 1)
    assert float((w * lq.exp()).sum()) == pytest.approx(1.0, abs=1e-10)
    assert float((w * lq.exp() * lq).sum()) == pytest.approx(tn.kl_from_uniform(), abs=1e-9)
    assert tn.kl_from_uniform(64) == pytest.approx(64 * tn.kl_from_uniform())
    # samples follow the truncated-normal CDF: Kolmogorov-Smirnov statistic below its 99.9% point
    m = 40000
    lv = torch.randint(0, 3, (m // 4, 4), generator=torch.Generator().manual_seed(1))
    us, lqs = tn.sample_unit(lv, torch.Generator().manual_seed(2))
    assert float(us.min()) >= 0 and float(us.max()) <= 1
    torch.testing.assert_close(lqs, tn.log_prob_unit(lv, us), rtol=0, atol=1e-12)
    s = us.flatten().sort().values
    F = _truncnorm_cdf(s, scale)
    k = torch.arange(1, m + 1, dtype=F64)
    ks = float(torch.maximum(k / m - F, F - (k - 1) / m).max())
    assert ks < 1.95 / math.sqrt(m)


def test_truncated_normal_rejects_bad_scale():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be"):
            TruncatedNormalDequantizer(4, scale=bad)
    with pytest.raises(ValueError, match="unknown dequantization"):
        make_dequantizer("logistic", 4)


@pytest.mark.parametrize("L,data_range,shape", [(16, (-1.0, 1.0), (1, 4, 4)), (17, (0.0, 3.0), (5,))])
def test_bound_is_exact_for_a_bin_constant_density_up_to_kl(L, data_range, shape):
    """The uniform density on the cube, log p = -D log(hi - lo), is constant on bins: every bin has P = L^-D, i.e.
    log2 L bits/dim (k bits for L = 2^k). The bound of q is log2 L + log q / (D ln 2) per draw, exactly: uniform q is
    exact; any other is looser by KL(q || uniform) = E_q[log q] (the truncated normal's closed form)."""
    lo, hi = data_range
    D = math.prod(shape)
    _, x = grid((4000, *shape), L, data_range, seed=3)
    lp = torch.full((x.shape[0],), -D * math.log(hi - lo), dtype=F64)
    for dq in _all_dequantizers(L, data_range, shape):
        y, log_q = dq.sample(x, torch.Generator().manual_seed(5))
        assert bool(((y >= lo) & (y <= hi)).all())
        bpd = bits_per_dim(lp, D, None, data_range, num_levels=L, log_q=log_q)
        torch.testing.assert_close(bpd, math.log2(L) + log_q / (D * math.log(2)), rtol=0, atol=1e-12)
        if isinstance(dq, UniformDequantizer) or (isinstance(dq, VariationalDequantizer) and dq.bias.abs().max() == 0):
            assert float(log_q.abs().max()) < 1e-12 and float((bpd - math.log2(L)).abs().max()) < 1e-12
            if L == 16:
                assert float(bpd.mean()) == pytest.approx(4.0, abs=1e-12)  # k = 4 bits/dim
            continue
        kl, se = float(log_q.mean()), float(log_q.std()) / math.sqrt(log_q.numel())
        assert kl > 0  # looser
        if isinstance(dq, TruncatedNormalDequantizer):
            assert kl == pytest.approx(dq.kl_from_uniform(D), abs=4 * se)
        if kl < 10 * se:  # (the truncated normal of scale 1 is within 0.001 nats/dim of uniform)
            continue
        # the importance-weighted bound over 32 draws is tighter, and still above the exact log2 L
        lqs = torch.stack([dq.sample(x[:500], torch.Generator().manual_seed(10 + k))[1] for k in range(32)])
        iw = importance_weighted_bits_per_dim(lp[:500].expand(32, 500), lqs, D, L, data_range)
        one = bits_per_dim(lp[:500], D, None, data_range, num_levels=L, log_q=lqs).mean(0)
        assert bool((iw <= one + 1e-12).all()) and float(iw.mean()) > math.log2(L)
        assert float(iw.mean()) - math.log2(L) < 0.6 * (float(one.mean()) - math.log2(L))


def _mixture_2d():
    # axis-aligned components, so that the probability of a bin is a product of normal CDF differences
    means = torch.tensor([[-0.7, 0.3], [0.6, -0.4], [0.1, 0.9]], dtype=F64)
    var = torch.tensor([[0.12, 0.3], [0.2, 0.1], [0.15, 0.15]], dtype=F64) ** 2
    return GaussianMixture([0.3, 0.5, 0.2], means, var)


def _exact_log_prob_bins(gm, lv, L, data_range):
    lo, hi = data_range
    d = (hi - lo) / L
    a = lo + d * lv.to(F64)  # [B, 2]
    sd = gm.evals.sqrt()  # [K, 2]
    cdf = lambda v: torch.special.ndtr((v[:, None, :] - gm.means[None]) / sd[None])  # noqa: E731
    mass = (cdf(a + d) - cdf(a)).prod(-1)  # [B, K]
    return torch.log((mass * gm.weights[None]).sum(1))


def _bound(gm, dq, lv, draws, seed):
    """[draws, B] log p(y) and log q of ``draws`` dequantizations of levels lv (exact mixture density)."""
    sde = VPSDE()
    lps, lqs = [], []
    for k in range(draws):
        y, lq = dq.sample(lv, torch.Generator().manual_seed(seed + k))
        lps.append(gm.log_prob(y.to(F64), 0.0, sde))
        lqs.append(lq)
    return torch.stack(lps), torch.stack(lqs)


def test_bounds_on_a_mixture_lie_below_the_exact_discrete_log_probability_and_iw_approaches_it():
    """2-D mixture, 6 levels on [-1.5, 1.5] (bins 0.5 wide, components 0.1-0.3 wide): the exact -log2 P(i) / D of
    every bin (normal CDFs) is below every dequantizer's bound, and the importance-weighted bound falls toward it."""
    gm, L, rng, D = _mixture_2d(), 6, (-1.5, 1.5), 2
    lv = torch.cartesian_prod(torch.arange(L), torch.arange(L))  # every bin
    exact = -_exact_log_prob_bins(gm, lv, L, rng) / (D * math.log(2))  # -log2 P(i) / D: no offset
    keep = exact < 6  # bins with non-negligible mass (the bound needs log p finite in the whole bin)
    lv, exact = lv[keep], exact[keep]
    for dq in _all_dequantizers(L, rng, (2,)):
        lp, lq = _bound(gm, dq, lv, 400, seed=0)
        per_draw = bits_per_dim(lp, D, None, rng, num_levels=L, log_q=lq)  # [400, B]
        mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(400)
        assert bool((mean >= exact - 4 * se - 1e-9).all())
        assert float((mean - exact).mean()) > 0.01  # the mixture is far from constant on bins: a real gap
        if isinstance(dq, (UniformDequantizer, TruncatedNormalDequantizer)):
            gaps = []
            for n in (1, 4, 16, 100):
                iw = torch.stack([importance_weighted_bits_per_dim(lp[j : j + n], lq[j : j + n], D, L, rng)
                                  for j in range(0, 400, n)])  # [400 / n, B]
                gaps.append(float((iw.mean(0) - exact).mean()))
            assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -1e-3
            assert gaps[3] < 0.1 * gaps[0]


def test_variational_dequantizer_beats_uniform_on_a_mixture(tmp_path):
    """Trained with the exact score of the mixture at a small noise level (no likelihood solve), q(u | i) tightens
    the bound on held-out bins toward the exact value; saved and loaded it gives the same draws."""
    gm, L, rng, D = _mixture_2d(), 6, (-1.5, 1.5), 2
    sde = VPSDE()
    train = quantize(gm.sample(4000, torch.Generator().manual_seed(0), dtype=F64).clamp(-1.49, 1.49), L, rng)
    test = quantize(gm.sample(300, torch.Generator().manual_seed(1), dtype=F64).clamp(-1.49, 1.49), L, rng)
    dq = VariationalDequantizer(L, rng, (2,), hidden=32)
    hist = train_dequantizer(dq, gm.score_fn(sde), train, sde=sde, noise_std=0.01, steps=400, batch_size=256,
                             lr=1e-2, generator=torch.Generator().manual_seed(2))
    assert hist[0] == pytest.approx(0.0, abs=1e-12) and hist[-1] > 0.05  # left uniform
    lv = dq.levels(test)
    exact = -_exact_log_prob_bins(gm, lv, L, rng) / (D * math.log(2))  # -log2 P(i) / D: no offset
    res = {}
    for name, q in (("uniform", UniformDequantizer(L, rng)), ("variational", dq)):
        lp, lq = _bound(gm, q, lv, 64, seed=100)
        res[name] = float(bits_per_dim(lp, D, None, rng, num_levels=L, log_q=lq).mean()) - float(exact.mean())
    assert res["variational"] > -1e-3 and res["variational"] < 0.5 * res["uniform"]
    path = tmp_path / "dq.pt"
    dq.save(str(path))
    back = VariationalDequantizer.load(str(path))
    a, b = dq.sample(test, torch.Generator().manual_seed(3)), back.sample(test, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="models samples of shape"):
        dq.sample(torch.zeros(2, 3, dtype=torch.long))


def test_evaluate_command_dequantization_options(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from scoresolve.cli import main

    base = ["evaluate", "--model", "digits_flow", "--bpd-n", "2", "--batch-size", "2", "--rtol", "1e-2", "--atol",
            "1e-2", "--threads", "1"]
    assert main([*base, "--dequantization", "truncnorm", "--truncnorm-scale", "0.3", "--iw", "2"]) == 0
    out = capsys.readouterr().out
    assert "truncated-normal (scale 0.3) dequantization, 2 draw(s)" in out and "importance-weighted bound" in out
    path = tmp_path / "q.pt"
    assert main([*base, "--dequantization", "variational", "--dequantizer-steps", "2", "--save-dequantizer",
                 str(path)]) == 0
    assert "variational dequantization" in capsys.readouterr().out and path.exists()
    assert main([*base, "--dequantization", "variational", "--dequantizer-path", str(path)]) == 0
    assert "loaded from" in capsys.readouterr().out
    for bad, msg in ((["--dequantizer-path", str(path)], "go with --dequantization variational"),
                     (["--iw", "3", "--repeats", "2"], "disagrees with --repeats")):
        with pytest.raises(SystemExit):
            main([*base, *bad])
        assert msg in capsys.readouterr().err
