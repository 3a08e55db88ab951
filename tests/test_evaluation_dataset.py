"""scoresolve.evaluation.dataset (evaluate_dataset, read_records, EvalSummary) and scoresolve.evaluation.inputs
(per-sample dequantization on L levels, derived seeds)."""

import dataclasses
import json
import math
import os

import pytest
import torch
from _evaluation_helpers import FakeResult, assert_same_records, bin_constant_fn, grid_data
from _evaluation_worker import T_EPS, make_fn, make_problem

import scoresolve as ss
import scoresolve.likelihood
from scoresolve.evaluation import dequantized_samples, derive_seed, evaluate_dataset, read_records
from scoresolve.quantization import bits_per_dim, dequantize, dequantized_bpd, resolve_levels

F64 = torch.float64
pytestmark = pytest.mark.timeout(120)


def test_exact_fn_gives_exact_log_prob_and_summary(tmp_path):
    gm, sde, x = make_problem(37)
    labels = torch.arange(37)
    s = evaluate_dataset(x, str(tmp_path / "a"), fn=make_fn(gm, sde), batch_size=8, progress=False)
    rec = read_records(str(tmp_path / "a"))
    exact = gm.log_prob(x, T_EPS, sde)
    assert torch.equal(rec["index"], torch.arange(37)) and torch.equal(rec["repeat"], torch.zeros(37, dtype=torch.long))
    assert torch.equal(rec["log_prob"], exact)  # bit-identical through the JSON round trip
    bpd = -exact / (3 * math.log(2))
    torch.testing.assert_close(rec["bpd"], bpd, rtol=0, atol=1e-15)
    torch.testing.assert_close(rec["nfe"], 20 + torch.round(10 * x.abs().sum(1)))
    assert s.count == 37 and s.repeats == 1 and s.num_dims == 3
    assert s.mean_log_prob == pytest.approx(float(exact.mean()), rel=1e-14)
    assert s.mean_bpd == pytest.approx(float(bpd.mean()), rel=1e-14)
    assert s.bpd_std_error == pytest.approx(float(bpd.std()) / math.sqrt(37), rel=1e-12)
    assert s.mean_nfe == pytest.approx(float(rec["nfe"].mean()))
    with open(s.path) as f:
        res = json.load(f)
    assert res["summary"]["mean_log_prob"] == s.mean_log_prob
    assert res["records"]["log_prob"] == exact.tolist() and res["records"]["index"] == list(range(37))
    # a Dataset of (tensor, label) tuples gives the same records, and counts as the same data for resuming
    ds = torch.utils.data.TensorDataset(x, labels)
    evaluate_dataset(ds, str(tmp_path / "b"), fn=make_fn(gm, sde), batch_size=5, progress=False)
    assert_same_records(read_records(str(tmp_path / "b")), rec)
    s2 = evaluate_dataset(ds, str(tmp_path / "a"), fn=make_fn(gm, sde), batch_size=8, progress=False)
    assert s2 == s


def test_results_do_not_depend_on_batching_or_shards_and_dequantization_is_per_sample(tmp_path):
    # 8-bit data in [-1, 1]; the model is a density constant on every bin, so each record's bpd is exactly
    # -sum_d log2 P_d(i_d) / D, whatever the noise -- and the noise itself is checked through the x fed to fn.
    bits, lo, hi, D, L = 8, -1.0, 1.0, 6, 256
    width = (hi - lo) / L
    g = torch.Generator().manual_seed(0)
    logP = torch.log_softmax(torch.randn(D, L, generator=g, dtype=F64), 1)
    i = torch.randint(0, L, (30, 2, 3), generator=g)
    x = (i.float() / 255) * 2 - 1

    def fn(y, generator):
        b = torch.floor((y.flatten(1).double() - lo) / width).long().clamp(0, L - 1)
        return {"log_prob": (logP.gather(1, b.T).T - math.log(width)).sum(1), "nfe": torch.ones(y.shape[0]),
                "first": y.flatten(1)[:, 0].double()}

    runs = {}
    for bs in (4, 7, 30):
        out = str(tmp_path / f"bs{bs}")
        evaluate_dataset(x, out, fn=fn, batch_size=bs, repeats=2, bits=bits, data_range=(lo, hi), progress=False)
        runs[bs] = read_records(out)
    assert_same_records(runs[4], runs[7])
    assert_same_records(runs[4], runs[30])
    rec = runs[4]
    exact = -logP.gather(1, i.flatten(1).T).T.sum(1) / (D * math.log(2))
    torch.testing.assert_close(rec["bpd"], exact.repeat(2), rtol=0, atol=1e-12)
    # the dequantized inputs are reproducible from (seed, index, repeat) alone and lie in their own bins
    for r in range(2):
        y = dequantized_samples(x, range(30), r, 0, bits, (lo, hi))
        torch.testing.assert_close(y[:, 0, 0].double(), rec["first"][rec["repeat"] == r], rtol=0, atol=0)
        pos = (y.double() - lo) / width
        assert bool((pos >= i).all()) and bool((pos <= i + 1).all())
    assert not torch.equal(rec["first"][:30], rec["first"][30:])  # fresh noise per repeat


def test_default_fn_calls_log_likelihood_with_the_batch_generator(tmp_path, monkeypatch):
    gm, sde, x = make_problem(10)
    calls = []

    def fake_log_likelihood(score, sde_, xb, *, generator, rtol, t_eps=1e-5):
        calls.append((generator.initial_seed(), rtol))
        assert sde_ is sde and score is marker
        z = 2 * xb
        return FakeResult(gm.log_prob(xb, t_eps, sde), z, sde.prior_log_prob(z), torch.tensor(17))

    def marker(xb, t):  # the score model is only passed through
        raise AssertionError

    monkeypatch.setattr(scoresolve.likelihood, "log_likelihood", fake_log_likelihood)
    out = str(tmp_path / "a")
    s = evaluate_dataset(x, out, score=marker, sde=sde, batch_size=4, seed=9, rtol=1e-3, progress=False)
    assert calls == [(derive_seed("batch", 9, 0, a, min(a + 4, 10)), 1e-3) for a in (0, 4, 8)]
    rec = read_records(out)
    assert sorted(rec) == ["bpd", "index", "log_prob", "nfe", "prior_log_prob", "repeat"]  # no latent, no None
    assert torch.equal(rec["log_prob"], gm.log_prob(x, T_EPS, sde))
    assert torch.equal(rec["prior_log_prob"], sde.prior_log_prob(2 * x)) and s.mean_nfe == 17
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["likelihood"]["kwargs"] == {"rtol": "0.001"} and m["likelihood"]["sde"] == repr(sde)
    with pytest.raises(ValueError, match=r"likelihood: stored"):
        evaluate_dataset(x, out, score=marker, sde=sde, batch_size=4, seed=9, rtol=1e-4, progress=False)
    with pytest.raises(ValueError, match="generator is supplied per batch"):
        evaluate_dataset(x, str(tmp_path / "b"), score=marker, sde=sde, generator=torch.Generator())


def test_num_levels_power_of_two_gives_exactly_the_records_of_bits(tmp_path):
    # range (0, 3): log2(8 / 3) and 3 - log2(3) differ in the last bit, so a differently written offset would show
    k, lo, hi = 3, 0.0, 3.0
    gm = ss.GaussianMixture.random(4, 3, seed=2, event_shape=(2, 2))
    sde = ss.VPSDE()
    x, _ = grid_data(14, (2, 2), 2**k, lo, hi, seed=3)

    def fn(y, generator):  # depends on the dequantized inputs and on the batch generator
        lp = gm.log_prob(y.double(), T_EPS, sde) + 0.01 * torch.randn(y.shape[0], generator=generator, dtype=F64)
        return {"log_prob": lp, "first": y.flatten(1)[:, 0].double()}

    kw = dict(fn=fn, batch_size=4, repeats=2, seed=5, data_range=(lo, hi), progress=False)
    s_bits = evaluate_dataset(x, str(tmp_path / "bits"), bits=k, **kw)
    s_lev = evaluate_dataset(x, str(tmp_path / "levels"), num_levels=2**k, **kw)
    s_both = evaluate_dataset(x, str(tmp_path / "both"), bits=k, num_levels=2**k, **kw)  # agreeing: allowed
    rec = read_records(str(tmp_path / "bits"))
    assert_same_records(read_records(str(tmp_path / "levels")), rec)
    assert_same_records(read_records(str(tmp_path / "both")), rec)
    assert dataclasses.replace(s_lev, path=s_bits.path) == s_bits == dataclasses.replace(s_both, path=s_bits.path)
    # the numbers themselves: the k-bit helpers' dequantization and offset k - log2(hi - lo)
    for r in range(2):
        y = dequantized_samples(x, range(14), r, 5, k, (lo, hi))
        assert torch.equal(dequantized_samples(x, range(14), r, 5, data_range=(lo, hi), num_levels=2**k), y)
        assert torch.equal(y[:, 0, 0], rec["first"][rec["repeat"] == r])
    assert torch.equal(rec["bpd"], ss.bits_per_dim(rec["log_prob"], 4, k, (lo, hi)))
    for name in ("bits", "levels"):
        with open(tmp_path / name / "manifest.json") as f:
            m = json.load(f)
        assert (m["bits"], m["num_levels"], m["data_range"]) == (3, 8, [0.0, 3.0])
    # the same run: resuming a bits=k run with num_levels=2^k is accepted and recomputes nothing
    calls = []
    s = evaluate_dataset(x, str(tmp_path / "bits"), num_levels=8,
                         **(kw | dict(fn=lambda y, g: calls.append(1) or fn(y, g))))
    assert calls == [] and s == s_bits


def test_num_levels_17_matches_the_digits_bits_per_dim(tmp_path):
    from scoresolve import data as sd

    L, D, N = sd.DIGITS_LEVELS, 4, 12
    x, v = grid_data(N, (1, 2, 2), L, *sd.DIGITS_RANGE, seed=1)
    gm = ss.GaussianMixture.random(D, 3, seed=0, event_shape=(1, 2, 2))
    sde = ss.VPSDE()
    out = str(tmp_path / "gm")
    s = evaluate_dataset(x, out, fn=lambda y, g: gm.log_prob(y.double(), T_EPS, sde), num_levels=L,
                         batch_size=5, repeats=2, progress=False)
    rec = read_records(out)
    for r in range(2):
        # the inputs: scoresolve.quantization.dequantize of the digits grid with this sample's noise u
        u = torch.stack([torch.rand((1, 2, 2), dtype=F64, generator=torch.Generator().manual_seed(
            derive_seed("dequant", 0, r, i))) for i in range(N)])
        y = dequantized_samples(x, range(N), r, 0, data_range=sd.DIGITS_RANGE, num_levels=L)
        assert torch.equal(y, dequantize(x, L, sd.DIGITS_RANGE, noise=u))
        pos = (y + 1) / 2 * L  # each value in its own bin [v, v + 1] of width 2 / 17
        assert bool((pos >= v).all()) and bool((pos <= v + 1).all())
        lp = gm.log_prob(y, T_EPS, sde)
        sel = rec["repeat"] == r
        assert torch.equal(rec["log_prob"][sel], lp)
        # bits/dim exactly as the digits pipeline converts these log-densities
        assert torch.equal(rec["bpd"][sel], bits_per_dim(lp, D, data_range=sd.DIGITS_RANGE, num_levels=L))
    torch.testing.assert_close(rec["bpd"], -rec["log_prob"] / (D * math.log(2)) + math.log2(8.5), rtol=0, atol=1e-12)
    assert s.mean_bpd == pytest.approx(float(rec["bpd"].mean()), rel=1e-14)
    # a density constant on the 17 bins: the same bits/dim as scoresolve.quantization.dequantized_bpd (its own
    # dequantization noise, the same bins), and as the exact -log2 P(v) / D of the discrete model
    logP = torch.log_softmax(torch.randn(D, L, generator=torch.Generator().manual_seed(4), dtype=F64), 1)
    fn = bin_constant_fn(logP, L, *sd.DIGITS_RANGE)
    evaluate_dataset(x, str(tmp_path / "bins"), fn=fn, num_levels=L, batch_size=5, progress=False)
    rec = read_records(str(tmp_path / "bins"))
    ref = dequantized_bpd(fn, x, num_levels=L, data_range=sd.DIGITS_RANGE, batch_size=5, seed=0)
    assert torch.equal(rec["bpd"], ref.bpd)
    exact = -logP.gather(1, v.flatten(1).T).T.sum(1) / (D * math.log(2))
    torch.testing.assert_close(rec["bpd"], exact, rtol=0, atol=1e-12)


def test_conflicting_or_invalid_levels_are_refused(tmp_path):
    x, _ = grid_data(6, (3,), 16)
    fn = lambda y, g: -y.double().pow(2).sum(1)  # noqa: E731
    out = tmp_path / "x"
    for kwargs, msg in [
        (dict(bits=4, num_levels=17), r"bits=4 \(2\^4 = 16 levels\) and num_levels=17 disagree"),
        (dict(bits=5, num_levels=16), "disagree"),
        (dict(num_levels=1), "num_levels must be an integer >= 2"),
        (dict(num_levels=0), "num_levels must be an integer >= 2"),
        (dict(num_levels=16.5), "num_levels must be an integer >= 2"),
        (dict(num_levels=True), "num_levels must be an integer >= 2"),
        (dict(bits=0), r"bits must be an integer in \[1, 32\]"),
        (dict(num_levels=16, data_range=(1.0, -1.0)), "lo < hi"),
        (dict(num_levels=17), "not on the 17-level grid"),  # 16-level data
        (dict(num_levels=32), "not on the 5-bit grid"),
    ]:
        with pytest.raises(ValueError, match=msg):
            evaluate_dataset(x, str(out), fn=fn, progress=False, **kwargs)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="give bits or num_levels"):
        evaluate_dataset(torch.zeros(3, 2, dtype=torch.long), str(out), fn=fn, progress=False)
    with pytest.raises(ValueError, match="give bits or num_levels"):
        dequantized_samples(x, range(2), 0, 0)
    assert resolve_levels(None, None) is None
    assert resolve_levels(4, None) == resolve_levels(None, 16) == resolve_levels(4, 16) == 16


def test_dtype_sets_the_precision_of_dequantized_integer_levels(tmp_path):
    _, v = grid_data(6, (3,), 17, seed=4)  # int64 levels
    seen = []

    def fn(y, generator):
        seen.append(y.clone())
        return {"log_prob": y.double().sum(1)}

    kw = dict(fn=fn, batch_size=6, num_levels=17, progress=False)
    evaluate_dataset(v, str(tmp_path / "f32"), **kw)
    y32 = seen.pop()
    evaluate_dataset(v, str(tmp_path / "f64"), dtype=F64, **kw)
    y64 = seen.pop()
    assert (y32.dtype, y64.dtype) == (torch.float32, F64)
    # both dequantize into each level's own bin; the float64 values carry float64 noise (not float32 numbers)
    for y in (y32, y64):
        u = (y.double() + 1) * 17 / 2 - v
        assert bool(((u >= -1e-5) & (u <= 1 + 1e-5)).all()) and float(u.std()) > 0.1
    assert bool((y64 != y64.float().double()).all())
    with open(tmp_path / "f64" / "manifest.json") as f:
        assert json.load(f)["dtype"] == "torch.float64"
    # floating data are cast to dtype; a resume with another dtype is refused
    x, _ = grid_data(6, (3,), 17, seed=4)
    evaluate_dataset(x.float(), str(tmp_path / "cast"), dtype=F64, **kw)
    assert seen.pop().dtype == F64
    with pytest.raises(ValueError, match="dtype: stored 'torch.float64', now 'torch.float32'"):
        evaluate_dataset(x.float(), str(tmp_path / "cast"), dtype=torch.float32, **kw)
