import math

import pytest
import torch

from scoresolve.quantization import (
    bin_offset,
    bits_per_dim,
    dequantized_bpd,
    grid_levels,
    uniform_dequantize,
)

F64 = torch.float64
RANGES = [(8, (-1.0, 1.0)), (8, (0.0, 1.0)), (8, (0.0, 255.0)), (5, (-3.0, 2.0))]


def grid_data(shape, bits, data_range, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, 2**bits, shape, generator=g)
    lo, hi = data_range
    return i, (lo + (hi - lo) * i.to(F64) / (2**bits - 1)).to(dtype)


def test_matches_score_sde_formula():
    # score_sde: img = i / 255 in [0, 1]; dequantized (U + 255 img) / 256; centred by 2 img - 1
    i, x = grid_data((64, 3, 4, 4), 8, (-1.0, 1.0), dtype=torch.float32)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    img = i.float() / 255.0
    ref = 2 * ((u + img * 255.0) / 256.0) - 1
    torch.testing.assert_close(uniform_dequantize(x, noise=u), ref, rtol=0, atol=2e-7)
    # integer levels are accepted directly and give the same values
    torch.testing.assert_close(uniform_dequantize(i.to(torch.uint8), noise=u), ref, rtol=0, atol=2e-7)


@pytest.mark.parametrize("bits,data_range", RANGES)
def test_dequantized_values_fill_their_own_bin(bits, data_range):
    i, x = grid_data((2000, 3), bits, data_range)
    y = uniform_dequantize(x, bits, data_range, torch.Generator().manual_seed(3))
    lo, hi = data_range
    width = (hi - lo) / 2**bits
    pos = (y - lo) / width  # in [i, i + 1)
    assert bool((pos >= i - 1e-9).all()) and bool((pos < i + 1 + 1e-9).all())
    frac = (pos - i).flatten()
    # uniform within the bin: mean 1/2, variance 1/12
    assert abs(float(frac.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / frac.numel())
    assert abs(float(frac.var()) - 1 / 12) < 0.01
    torch.testing.assert_close(grid_levels(x, 2**bits, data_range), i)


def test_out_of_range_is_a_clear_error():
    x = torch.tensor([[-1.0, 0.0], [1.5, 1.0]])
    with pytest.raises(ValueError, match=r"outside the declared data_range.*min -1, max 1\.5"):
        uniform_dequantize(x, 8, (-1.0, 1.0))
    with pytest.raises(ValueError, match=r"min -0\.2, max 1"):
        uniform_dequantize(torch.tensor([[-0.2, 1.0]]), 8, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"min 0, max 300"):
        uniform_dequantize(torch.tensor([[0, 300]]), 8)
    # data in [0, 255] declared as [-1, 1]: the usual mistake
    _, x = grid_data((4, 2), 8, (0.0, 255.0))
    with pytest.raises(ValueError, match="outside the declared"):
        uniform_dequantize(x, 8, (-1.0, 1.0))


def test_off_grid_data_are_rejected():
    _, x = grid_data((16, 5), 8, (-1.0, 1.0))
    y = uniform_dequantize(x, generator=torch.Generator().manual_seed(0))  # already dequantized
    with pytest.raises(ValueError, match="not on the 8-bit grid"):
        uniform_dequantize(y)
    # float32 rounding of grid values is tolerated, even for 16-bit data
    _, x16 = grid_data((16, 5), 16, (-1.0, 1.0), dtype=torch.float32)
    assert uniform_dequantize(x16, 16).dtype == torch.float32


def test_bpd_offset_values():
    assert bin_offset(8, (-1, 1)) == 7.0
    assert bin_offset(8, (0, 1)) == 8.0
    assert bin_offset(8, (0, 255)) == pytest.approx(8 - math.log2(255))
    assert bin_offset(None) == 0.0
    D = 3 * 32 * 32
    lp = torch.tensor([-D * math.log(2) * 3.0, 0.0], dtype=F64)
    torch.testing.assert_close(bits_per_dim(lp, D), torch.tensor([10.0, 7.0], dtype=F64))
    torch.testing.assert_close(bits_per_dim(lp, D, 8, (0, 1)), torch.tensor([11.0, 8.0], dtype=F64))
    assert bits_per_dim(-D * math.log(2), D, None) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bits"):
        bits_per_dim(lp, D, 0)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(lp, D, 8, (1, 1))


@pytest.mark.parametrize("bits,data_range", RANGES)
def test_uniform_density_on_the_cube_gives_exactly_k_bits(bits, data_range):
    lo, hi = data_range
    _, x = grid_data((10, 2, 3), bits, data_range)
    D = 6

    def uniform_log_prob(y, generator):
        assert bool(((y >= lo) & (y <= hi)).all())
        return torch.full((y.shape[0],), -D * math.log(hi - lo), dtype=F64)

    res = dequantized_bpd(uniform_log_prob, x, repeats=3, bits=bits, data_range=data_range)
    torch.testing.assert_close(res.bpd, torch.full((10,), float(bits), dtype=F64), rtol=0, atol=1e-12)
    assert res.mean == pytest.approx(bits, abs=1e-12)
    assert res.std_error == pytest.approx(0.0, abs=1e-12)


def test_bin_constant_density_gives_the_discrete_probability_exactly():
    # A density constant on every bin: p(y) = prod_d P_d(bin_d(y)) / width. Jensen is tight, so every
    # dequantization draw gives exactly -sum_d log2 P_d(i_d) / D bits/dim. A wrong bin convention breaks this.
    bits, (lo, hi) = 4, (-1.0, 1.0)
    D, L = 5, 2**bits
    width = (hi - lo) / L
    logP = torch.log_softmax(torch.randn(D, L, generator=torch.Generator().manual_seed(0), dtype=F64), dim=1)
    i, x = grid_data((50, D), bits, (lo, hi), seed=1)

    def hist_log_prob(y, generator):
        b = torch.floor((y - lo) / width).long().clamp(0, L - 1)
        return (logP.gather(1, b.T).T - math.log(width)).sum(1)

    res = dequantized_bpd(hist_log_prob, x, repeats=4, bits=bits, data_range=(lo, hi),
                          generator=torch.Generator().manual_seed(5))
    exact = -logP.gather(1, i.T).T.sum(1) / (D * math.log(2))
    torch.testing.assert_close(res.bpd_repeats, exact.expand(4, -1), rtol=0, atol=1e-12)
    assert res.mean == pytest.approx(float(exact.mean()), abs=1e-12)
    assert res.std_error == pytest.approx(float(exact.std()) / math.sqrt(50), rel=1e-9)


def test_repeat_averaging_is_reproducible_and_converges():
    # log p(y) = -c * |y - bin centre|^2: its mean over the dequantization noise is -c D width^2 / 12.
    bits, (lo, hi), c = 3, (0.0, 1.0), 50.0
    width = (hi - lo) / 2**bits
    i, x = grid_data((4, 2), bits, (lo, hi), seed=2)
    centre = lo + (i.to(F64) + 0.5) * width

    def quad(y, generator):
        return -c * (y - centre).square().sum(1)

    res = dequantized_bpd(quad, x, repeats=400, bits=bits, data_range=(lo, hi),
                          generator=torch.Generator().manual_seed(11))
    # same generator sequence by hand: repeat r draws its noise from the generator, in order
    g = torch.Generator().manual_seed(11)
    manual = torch.stack([
        bits_per_dim(quad(uniform_dequantize(x, bits, (lo, hi), g), g), 2, bits, (lo, hi)) for _ in range(400)
    ])
    torch.testing.assert_close(res.bpd_repeats, manual, rtol=0, atol=0)
    torch.testing.assert_close(res.bpd, manual.mean(0))
    torch.testing.assert_close(res.sample_std_error, manual.std(0) / 20)
    assert res.std_error == pytest.approx(float(manual.mean(0).std()) / 2)
    expected = bits_per_dim(torch.tensor(-c * 2 * width**2 / 12), 2, bits, (lo, hi))
    assert bool(((res.bpd - expected).abs() < 5 * res.sample_std_error).all())
    # the per-sample noise matters: one repeat is far noisier than 400
    assert float(res.sample_std_error.max()) < float(res.bpd_repeats.std(0).min()) / 10


def test_dequantized_bpd_accepts_result_objects_and_checks_shapes():
    from types import SimpleNamespace

    _, x = grid_data((3, 2), 8, (-1.0, 1.0))
    out = dequantized_bpd(lambda y, g: SimpleNamespace(log_prob=torch.zeros(3)), x)
    torch.testing.assert_close(out.bpd, torch.full((3,), 7.0, dtype=F64))
    assert out.sample_std_error is None
    out = dequantized_bpd(lambda y, g: {"log_prob": torch.zeros(3), "nfe": 1}, x)
    assert out.mean == 7.0
    with pytest.raises(ValueError, match="returned 2 values"):
        dequantized_bpd(lambda y, g: torch.zeros(2), x)
    with pytest.raises(ValueError, match="repeats"):
        dequantized_bpd(lambda y, g: torch.zeros(3), x, repeats=0)


def test_one_bits_per_dim_for_k_bit_l_level_and_continuous_data_and_a_dequantizer():
    lp = torch.tensor([-3.0, 0.0], dtype=F64) * 4 * math.log(2)  # 3 and 0 bits/dim of the density, D = 4
    torch.testing.assert_close(bits_per_dim(lp, 4), torch.tensor([10.0, 7.0], dtype=F64))  # 8 bits: +7
    # num_levels replaces the default bits; L = 2^k gives the k-bit numbers exactly
    assert torch.equal(bits_per_dim(lp, 4, num_levels=16), bits_per_dim(lp, 4, 4))
    torch.testing.assert_close(bits_per_dim(lp, 4, num_levels=17), torch.tensor([3.0, 0.0], dtype=F64)
                               + math.log2(8.5), rtol=0, atol=1e-12)
    assert bits_per_dim(-4 * math.log(2), 4, None) == pytest.approx(1.0)  # continuous: no offset
    # a dequantizer's log q is subtracted from log p (the variational bound)
    lq = torch.tensor([0.5, -0.25], dtype=F64)
    assert torch.equal(bits_per_dim(lp, 4, num_levels=17, log_q=lq), bits_per_dim(lp - lq, 4, num_levels=17))
    with pytest.raises(ValueError, match="disagree"):
        bits_per_dim(lp, 4, 8, num_levels=17)  # an explicit bits that contradicts num_levels
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        bits_per_dim(lp, 4, num_levels=1)


def test_dequantized_bpd_seeds_per_batch_and_reports_nfe():
    """``seed``: repeat r, batch b dequantizes and calls fn with a generator seeded seed + 1000 r + b (the numbers
    `scoresolve evaluate` prints); ``generator``: one generator for everything, the whole batch at once."""
    _, x = grid_data((5, 3), 4, (-1.0, 1.0), dtype=torch.float32)
    fn = lambda y, g: {"log_prob": -y.double().pow(2).sum(1) + torch.rand(y.shape[0], generator=g, dtype=F64),  # noqa: E731
                       "nfe": torch.full((y.shape[0],), 3.0)}
    res = dequantized_bpd(fn, x, repeats=2, bits=4, batch_size=2, seed=5)
    rows = []
    for r in range(2):
        row = []
        for b, start in enumerate(range(0, 5, 2)):
            g = torch.Generator().manual_seed(5 + 1000 * r + b)
            row.append(fn(uniform_dequantize(x[start : start + 2], 4, generator=g), g)["log_prob"])
        rows.append(bits_per_dim(torch.cat(row), 3, 4))
    assert torch.equal(res.bpd, torch.stack(rows).mean(0)) and res.nfe_mean == 3.0
    assert res.iw_bpd is not None and bool((res.iw_bpd <= res.bpd + 1e-12).all()) and res.log_q_mean == 0.0
    g = torch.Generator().manual_seed(9)
    one = dequantized_bpd(fn, x, bits=4, generator=g)
    g = torch.Generator().manual_seed(9)
    y = uniform_dequantize(x, 4, generator=g)
    assert torch.equal(one.bpd, bits_per_dim(fn(y, g)["log_prob"], 3, 4)) and one.iw_bpd is None
    with pytest.raises(ValueError, match="generator or seed"):
        dequantized_bpd(fn, x, bits=4, generator=g, seed=0)
    with pytest.raises(ValueError, match="needs the data's quantisation"):
        dequantized_bpd(fn, x, bits=None)


def test_bits_per_dim_and_dequantized_bpd_have_one_home():
    """One definition of each in the package (they were in dequantization.py, data.py, dequantizers.py and
    models/evaluate.py), re-exported at the top level."""
    import ast
    from pathlib import Path

    import scoresolve

    root = Path(scoresolve.__file__).parent
    defs: dict[str, list[str]] = {}
    for p in root.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and ("bits_per_dim" in node.name or "bpd" in node.name):
                defs.setdefault(node.name, []).append(str(p.relative_to(root)))
    assert defs["bits_per_dim"] == ["quantization/bpd.py"] and defs["dequantized_bpd"] == ["quantization/bpd.py"]
    assert set(defs) == {"bits_per_dim", "dequantized_bpd", "importance_weighted_bits_per_dim"}, defs
    assert scoresolve.bits_per_dim is bits_per_dim and scoresolve.dequantized_bpd is dequantized_bpd
