"""Non-uniform dequantization in scoresolve.evaluation (evaluate_dataset(dequantizer=...), dequantized_samples) and
in the ``scoresolve likelihood`` command (--dequantization, --truncnorm-scale, --dequantizer-path)."""

import dataclasses
import json
import math

import pytest
import torch
from _evaluation_helpers import assert_same_records, bin_constant_fn, grid_data
from _evaluation_worker import T_EPS

import scoresolve as ss
import scoresolve.likelihood
from scoresolve.cli import main
from scoresolve.evaluation import dequantized_samples, derive_seed, evaluate_dataset, read_records
from scoresolve.quantization import (
    TruncatedNormalDequantizer,
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
    importance_weighted_bits_per_dim,
)

torch.set_num_threads(1)
F64 = torch.float64
L, D = 17, 3
pytestmark = pytest.mark.timeout(120)


def problem(n=13, seed=1):
    """(mixture, sde, float64 17-level grid data [n, 3], their int64 levels)."""
    gm = ss.GaussianMixture.random(D, 3, seed=0)
    x, v = grid_data(n, (D,), L, seed=seed)
    return gm, ss.VPSDE(), x, v


def exact_fn(gm, sde, seen=None):
    """Exact log p_{t_eps} of the (dequantized) inputs; keeps the inputs in ``seen``; its result does not depend on
    the batch or the generator."""

    def fn(y, generator):
        if seen is not None:
            seen.append(y.clone())
        return {"log_prob": gm.log_prob(y.double(), T_EPS, sde), "nfe": torch.full((y.shape[0],), 5.0)}

    return fn


def manifest_of(out):
    with open(out / "manifest.json") as f:
        return json.load(f)


def test_explicit_uniform_dequantizer_is_the_default_run(tmp_path):
    gm, sde, x, v = problem()
    kw = dict(fn=exact_fn(gm, sde), num_levels=L, batch_size=4, repeats=2, progress=False)
    s0 = evaluate_dataset(x, str(tmp_path / "none"), **kw)
    s1 = evaluate_dataset(x, str(tmp_path / "uni"), dequantizer=UniformDequantizer(L), **kw)
    rec = read_records(str(tmp_path / "none"))
    assert_same_records(read_records(str(tmp_path / "uni")), rec)
    assert "log_q" not in rec
    assert dataclasses.replace(s1, path=s0.path) == s0 and s0.mean_log_q is None and s0.iw_bpd is None
    assert manifest_of(tmp_path / "none") == manifest_of(tmp_path / "uni") and "dequantizer" not in manifest_of(
        tmp_path / "uni")
    with open(s0.path) as f:
        assert set(json.load(f)["summary"]) == {f.name for f in dataclasses.fields(s0)} - {
            "mean_log_q", "iw_bpd", "iw_bpd_std_error"}
    # the same run: a default run resumes with the explicit uniform dequantizer, recomputing nothing
    calls = []
    s2 = evaluate_dataset(x, str(tmp_path / "none"), **{**kw, "fn": lambda y, g: calls.append(1)},
                          dequantizer=UniformDequantizer(L))
    assert calls == [] and s2 == s0
    # integer levels dequantized in float64: still the same numbers as the default
    kw64 = dict(kw, dtype=F64)
    evaluate_dataset(v, str(tmp_path / "v0"), **kw64)
    evaluate_dataset(v, str(tmp_path / "v1"), dequantizer=UniformDequantizer(L), **kw64)
    assert_same_records(read_records(str(tmp_path / "v0")), read_records(str(tmp_path / "v1")))
    y = dequantized_samples(v, range(13), 1, 0, dequantizer=UniformDequantizer(L), dtype=F64)
    assert y.dtype == F64 and torch.equal(y, dequantized_samples(v, range(13), 1, 0, num_levels=L, dtype=F64))


def test_truncnorm_records_log_q_and_the_bound(tmp_path):
    gm, sde, x, v = problem()
    dq = TruncatedNormalDequantizer(L, scale=0.3)
    seen = []
    out = tmp_path / "tn"
    s = evaluate_dataset(x, str(out), fn=exact_fn(gm, sde, seen), num_levels=L, batch_size=4, repeats=3,
                         dequantizer=dq, seed=7, progress=False)
    rec = read_records(str(out))
    fed = torch.cat(seen)  # repeat 0, 1, 2, each by index
    y = torch.cat([dequantized_samples(x, range(13), r, 7, dequantizer=dq) for r in range(3)])
    assert torch.equal(fed, y)
    # the inputs lie in their own bins, but are not the uniform draws of the same seeds
    pos = (y + 1) / 2 * L
    assert bool((pos >= v.repeat(3, 1)).all()) and bool((pos <= v.repeat(3, 1) + 1).all())
    assert not torch.equal(y[:13], dequantized_samples(x, range(13), 0, 7, num_levels=L))
    # sample 4 of repeat 2, by hand: its own generator drives the dequantizer on that one sample
    g = torch.Generator().manual_seed(derive_seed("dequant", 7, 2, 4))
    u, lq = dq.sample_unit(v[4:5], g)
    assert torch.equal(dq.to_data(v[4:5], u, F64)[0], y[26 + 4])
    assert rec["log_q"][26 + 4] == float(lq)
    # log q is the dequantizer's density of the recorded inputs; log p the model's; bpd the bound from both
    torch.testing.assert_close(rec["log_q"], dq.log_prob(x.repeat(3, 1), y), rtol=0, atol=1e-9)
    assert float(rec["log_q"].std()) > 0.1  # not a constant: u near the bin centre is likelier
    lp = gm.log_prob(y, T_EPS, sde)
    assert torch.equal(rec["log_prob"], lp)
    assert torch.equal(rec["bpd"], bits_per_dim(lp, D, data_range=(-1.0, 1.0), num_levels=L, log_q=rec["log_q"]))
    torch.testing.assert_close(rec["bpd"], (rec["log_q"] - lp) / (D * math.log(2)) + math.log2(L / 2), rtol=0,
                               atol=1e-12)
    # the summary: means, E log q, and the importance-weighted bound over the 3 repeats of each sample
    assert s.mean_bpd == pytest.approx(float(rec["bpd"].mean()), rel=1e-14)
    assert s.mean_log_q == pytest.approx(float(rec["log_q"].mean()), rel=1e-14)
    iw = importance_weighted_bits_per_dim(lp.reshape(3, 13), rec["log_q"].reshape(3, 13), D, L)
    assert s.iw_bpd == pytest.approx(float(iw.mean()), rel=1e-14)
    assert s.iw_bpd_std_error == pytest.approx(float(iw.std()) / math.sqrt(13), rel=1e-12)
    assert s.iw_bpd < s.mean_bpd
    m = manifest_of(out)
    assert m["dequantizer"] == {"kind": "TruncatedNormalDequantizer", "num_levels": 17, "data_range": [-1.0, 1.0],
                                "scale": 0.3}
    with open(s.path) as f:
        assert json.load(f)["summary"]["iw_bpd"] == s.iw_bpd
    # one repeat: no importance-weighted value
    s1 = evaluate_dataset(x, str(tmp_path / "one"), fn=exact_fn(gm, sde), num_levels=L, dequantizer=dq,
                          progress=False)
    assert s1.iw_bpd is None and s1.mean_log_q is not None


def test_a_density_constant_on_bins_pays_exactly_log_q(tmp_path):
    # p constant on every bin: log p(y) depends on the bin only, so each record's bound is the exact bits/dim of
    # the bin plus log q / (D ln 2); E log q is truncnorm's KL from uniform (sampled)
    g = torch.Generator().manual_seed(3)
    logP = torch.log_softmax(torch.randn(D, L, generator=g, dtype=F64), 1)
    x, v = grid_data(200, (D,), L, seed=5)
    dq = TruncatedNormalDequantizer(L, scale=0.25)
    s = evaluate_dataset(x, str(tmp_path / "b"), fn=bin_constant_fn(logP, L, -1.0, 1.0), num_levels=L,
                         batch_size=64, dequantizer=dq, progress=False)
    rec = read_records(str(tmp_path / "b"))
    exact = -logP.gather(1, v.T).T.sum(1) / (D * math.log(2))
    torch.testing.assert_close(rec["bpd"], exact + rec["log_q"] / (D * math.log(2)), rtol=0, atol=1e-12)
    kl = dq.kl_from_uniform(D)
    assert abs(s.mean_log_q - kl) < 4 * float(rec["log_q"].std()) / math.sqrt(200)


def test_results_do_not_depend_on_batch_size_shards_or_restarts(tmp_path):
    gm, sde, x, _ = problem(n=23)
    dq = TruncatedNormalDequantizer(L, scale=0.4)
    kw = dict(num_levels=L, repeats=2, dequantizer=dq, progress=False)
    evaluate_dataset(x, str(tmp_path / "ref"), fn=exact_fn(gm, sde), batch_size=4, **kw)
    ref = read_records(str(tmp_path / "ref"))
    for bs in (1, 7, 23):
        evaluate_dataset(x, str(tmp_path / f"bs{bs}"), fn=exact_fn(gm, sde), batch_size=bs, **kw)
        assert_same_records(read_records(str(tmp_path / f"bs{bs}")), ref)
    # interrupted after three batches, then resumed (another batch size: allowed, with a warning)
    calls = []
    good = exact_fn(gm, sde)

    def dies(y, g):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return good(y, g)

    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(x, str(tmp_path / "cut"), fn=dies, batch_size=4, **kw)
    assert len(read_records(str(tmp_path / "cut"), 23, 2)["index"]) == 12
    with pytest.warns(RuntimeWarning, match="resuming with batch_size 5"):
        evaluate_dataset(x, str(tmp_path / "cut"), fn=good, batch_size=5, **kw)
    assert_same_records(read_records(str(tmp_path / "cut")), ref)
    # two shards, run one after the other (rank 1 times out waiting for rank 0, its records kept)
    out = str(tmp_path / "shards")
    with pytest.raises(TimeoutError):
        evaluate_dataset(x, out, fn=good, batch_size=4, rank=1, world_size=2, wait_timeout=0.05, **kw)
    evaluate_dataset(x, out, fn=good, batch_size=4, rank=0, world_size=2, **kw)
    assert_same_records(read_records(out), ref)


def test_resuming_with_another_dequantizer_is_refused(tmp_path):
    gm, sde, x, _ = problem()
    kw = dict(fn=exact_fn(gm, sde), num_levels=L, batch_size=4, progress=False)
    out = str(tmp_path / "tn")
    s = evaluate_dataset(x, out, dequantizer=TruncatedNormalDequantizer(L, scale=0.3), **kw)
    calls = []
    again = evaluate_dataset(x, out, dequantizer=TruncatedNormalDequantizer(L, scale=0.3),
                             **{**kw, "fn": lambda y, g: calls.append(1) or {"log_prob": gm.log_prob(y, T_EPS, sde)}})
    assert again == s and calls == []  # the same q: nothing is recomputed
    with pytest.raises(ValueError, match=r"another dequantizer(.|\n)*\"scale\": 0.3(.|\n)*\"scale\": 0.5"):
        evaluate_dataset(x, out, dequantizer=TruncatedNormalDequantizer(L, scale=0.5), **kw)
    with pytest.raises(ValueError, match=r"another dequantizer(.|\n)*this run's: +uniform"):
        evaluate_dataset(x, out, **kw)
    evaluate_dataset(x, str(tmp_path / "uni"), **kw)
    with pytest.raises(ValueError, match=r"stored dequantizer: uniform"):
        evaluate_dataset(x, str(tmp_path / "uni"), dequantizer=TruncatedNormalDequantizer(L, scale=0.3), **kw)
    # a variational q is told apart by its weights
    q = VariationalDequantizer(L, shape=(D,), hidden=4)
    evaluate_dataset(x, str(tmp_path / "var"), dequantizer=q, **kw)
    assert manifest_of(tmp_path / "var")["dequantizer"]["state"].startswith("blake2b:")
    with torch.no_grad():
        q.bias.add_(0.1)
    with pytest.raises(ValueError, match="another dequantizer"):
        evaluate_dataset(x, str(tmp_path / "var"), dequantizer=q, **kw)


def test_invalid_dequantizer_settings(tmp_path):
    gm, sde, x, _ = problem()
    fn = exact_fn(gm, sde)
    kw = dict(fn=fn, batch_size=4, progress=False)
    cases = [
        (dict(dequantizer=TruncatedNormalDequantizer(L)), "a dequantizer needs quantized data"),
        (dict(num_levels=L, dequantizer=TruncatedNormalDequantizer(16)), "is for 16 levels"),
        (dict(num_levels=L, dequantizer=TruncatedNormalDequantizer(L, (0.0, 1.0))), r"in \(0.0, 1.0\)"),
        (dict(num_levels=L, dequantizer=VariationalDequantizer(L, shape=(2,), hidden=4)), "samples of shape"),
    ]
    for extra, msg in cases:
        with pytest.raises(ValueError, match=msg):
            evaluate_dataset(x, str(tmp_path / "bad"), **kw, **extra)
    with pytest.raises(TypeError, match="must be a scoresolve.quantization.Dequantizer"):
        evaluate_dataset(x, str(tmp_path / "bad"), num_levels=L, dequantizer="truncnorm", **kw)
    with pytest.raises(ValueError, match="returned 'log_q'"):
        evaluate_dataset(x, str(tmp_path / "lq"), fn=lambda y, g: {"log_prob": fn(y, g)["log_prob"],
                                                                    "log_q": torch.zeros(y.shape[0])},
                         num_levels=L, dequantizer=TruncatedNormalDequantizer(L), progress=False)
    with pytest.raises(ValueError, match="is for 17 levels"):
        dequantized_samples(x, range(3), 0, 0, num_levels=16, dequantizer=TruncatedNormalDequantizer(L))


# ----------------------------------------------------------------------------------------------------------------
# scoresolve likelihood --dequantization ...
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FakeLikelihood:  # the fields of scoresolve.likelihood.LikelihoodResult that the CLI reads
    log_prob: torch.Tensor
    latent: torch.Tensor
    nfe: torch.Tensor


@pytest.fixture
def exact_cli(monkeypatch):
    """log_likelihood replaced by the exact log-density of the CLI's own mixture (2 components, seed 0)."""
    seen = []

    def exact_log_likelihood(score, sde, x, *, generator=None, t_eps=1e-5, **kw):
        seen.append(x.clone())
        gm = ss.GaussianMixture.random(x[0].numel(), 2, seed=0, event_shape=x.shape[1:])
        return _FakeLikelihood(gm.log_prob(x.double(), t_eps, sde), x.double(), torch.full((x.shape[0],), 7))

    monkeypatch.setattr(scoresolve.likelihood, "log_likelihood", exact_log_likelihood)
    return seen


def test_cli_truncnorm_end_to_end(tmp_path, exact_cli, capsys):
    _, v = grid_data(6, (D,), L, seed=2)
    torch.save(v, tmp_path / "v.pt")  # integer levels
    out = tmp_path / "run"
    argv = ["likelihood", "--data", str(tmp_path / "v.pt"), "--num-levels", "17", "--components", "2",
            "--batch-size", "4", "--repeats", "2", "--float64", "--quiet", "--out-dir", str(out),
            "--dequantization", "truncnorm", "--truncnorm-scale", "0.3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "max |err| 0.00e+00" in text  # the exact reference sees the same (truncnorm) inputs as the solver
    assert "truncated-normal (scale 0.3) dequantization" in text
    dq = TruncatedNormalDequantizer(L, scale=0.3)
    y = torch.cat([dequantized_samples(v, range(6), r, 0, dequantizer=dq, dtype=F64) for r in range(2)])
    assert torch.equal(torch.cat(exact_cli), y)
    rec = read_records(str(out))
    torch.testing.assert_close(rec["log_q"], dq.log_prob(v.repeat(2, 1), y), rtol=0, atol=1e-9)
    gm = ss.GaussianMixture.random(D, 2, seed=0)
    lp = gm.log_prob(y, 1e-5, ss.VPSDE())
    assert torch.equal(rec["bpd"], bits_per_dim(lp, D, num_levels=L, log_q=rec["log_q"]))
    bpd = float(text.split("bits/dim ")[1].split()[0])
    assert bpd == pytest.approx(float(rec["bpd"].mean()), abs=1e-5)
    iw = importance_weighted_bits_per_dim(lp.reshape(2, 6), rec["log_q"].reshape(2, 6), D, L)
    iw_line = next(ln for ln in text.splitlines() if ln.startswith("importance-weighted bound"))
    assert float(iw_line.split(": ")[1].split()[0]) == pytest.approx(float(iw.mean()), abs=1e-5)
    assert "a bound only with --divergence exact" in text  # the default is Hutchinson
    assert manifest_of(out)["dequantizer"]["scale"] == 0.3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # resuming with the default scale: a usage error (one line, status 2)
        main(argv[:-2])
    assert e.value.code == 2 and "another dequantizer" in capsys.readouterr().err


def test_cli_variational_from_a_saved_dequantizer(tmp_path, exact_cli, capsys):
    _, v = grid_data(5, (D,), L, seed=3)
    torch.save(v, tmp_path / "v.pt")
    q = VariationalDequantizer(L, shape=(D,), hidden=4)
    with torch.no_grad():
        q.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    q.save(str(tmp_path / "q.pt"))
    out = tmp_path / "run"
    assert main(["likelihood", "--data", str(tmp_path / "v.pt"), "--num-levels", "17", "--components", "2",
                 "--divergence", "exact", "--float64", "--quiet", "--out-dir", str(out), "--dequantization",
                 "variational", "--dequantizer-path", str(tmp_path / "q.pt")]) == 0
    text = capsys.readouterr().out
    assert "variational (" in text and "importance-weighted" not in text
    rec = read_records(str(out))
    y = dequantized_samples(v, range(5), 0, 0, dequantizer=q, dtype=F64)
    assert torch.equal(torch.cat(exact_cli), y)
    torch.testing.assert_close(rec["log_q"], q.log_prob(v, y), rtol=0, atol=1e-8)
    with torch.no_grad():
        u, lq = q.sample_unit(v[3:4], torch.Generator().manual_seed(derive_seed("dequant", 0, 0, 3)))
    assert rec["log_q"][3] == float(lq) and torch.equal(q.to_data(v[3:4], u, F64)[0], y[3])
    assert float(rec["log_q"].abs().min()) > 0
    assert manifest_of(out)["dequantizer"] == q.describe()


def test_cli_dequantization_usage_errors(tmp_path, capsys):
    _, v = grid_data(4, (D,), L, seed=2)
    torch.save(v, tmp_path / "v.pt")
    torch.save(v.float(), tmp_path / "cont.pt")
    VariationalDequantizer(L, shape=(2,), hidden=4).save(str(tmp_path / "q2.pt"))
    data = ["--data", str(tmp_path / "v.pt"), "--out-dir", str(tmp_path / "run")]
    cases = [
        (data + ["--dequantization", "truncnorm"], "--dequantization truncnorm needs quantized data"),
        (["--dequantization", "truncnorm", "--out-dir", str(tmp_path / "run")], "needs quantized data"),
        (data + ["--num-levels", "17", "--truncnorm-scale", "0.2"], "--truncnorm-scale goes with --dequantization "
         "truncnorm"),
        (data + ["--num-levels", "17", "--dequantization", "variational"], "needs --dequantizer-path PATH"),
        (data + ["--num-levels", "17", "--dequantizer-path", str(tmp_path / "v.pt")], "--dequantizer-path goes "
         "with --dequantization variational"),
        (data + ["--num-levels", "17", "--dequantization", "variational", "--dequantizer-path",
                 str(tmp_path / "v.pt")], "not a saved VariationalDequantizer"),
        (data + ["--num-levels", "17", "--dequantization", "variational", "--dequantizer-path",
                 str(tmp_path / "q2.pt")], "for samples (2,), the data have 17 levels in (-1.0, 1.0), samples (3,)"),
        (data + ["--bits", "4", "--dequantization", "variational", "--dequantizer-path",
                 str(tmp_path / "q2.pt")], "holds a dequantizer of 17 levels"),
        (data + ["--num-levels", "17", "--dequantization", "variational", "--dequantizer-path",
                 str(tmp_path / "nope.pt")], "no such file"),
        (data + ["--num-levels", "17", "--dequantization", "truncnorm", "--truncnorm-scale", "0"], "greater than 0"),
        (data + ["--dequantization", "logistic"], "invalid choice: 'logistic'"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["likelihood", *argv])
        assert e.value.code == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert not (tmp_path / "run").exists()
