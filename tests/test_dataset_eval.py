import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
from _dataset_eval_worker import T_EPS, make_fn, make_problem

import scoresolve as ss
from scoresolve import dataset_eval as de
from scoresolve.dataset_eval import evaluate_dataset, read_records, record_path

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dataset_eval_worker.py")
pytestmark = pytest.mark.timeout(120)


def assert_same_records(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def lines_of(out_dir):
    n = 0
    for name in os.listdir(out_dir):
        if name.startswith("records-rank"):
            with open(os.path.join(out_dir, name), "rb") as f:
                n += f.read().count(b"\n")
    return n


def reference(tmp_path, n=40, repeats=2, batch_size=4, noise=0.01, name="ref"):
    gm, sde, x = make_problem(n)
    out = tmp_path / name
    evaluate_dataset(x, str(out), fn=make_fn(gm, sde, noise=noise), batch_size=batch_size, repeats=repeats,
                     progress=False)
    return read_records(str(out))


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# ----------------------------------------------------------------------------------------------------------------
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
        y = de.dequantized_samples(x, range(30), r, 0, bits, (lo, hi))
        torch.testing.assert_close(y[:, 0, 0].double(), rec["first"][rec["repeat"] == r], rtol=0, atol=0)
        pos = (y.double() - lo) / width
        assert bool((pos >= i).all()) and bool((pos <= i + 1).all())
    assert not torch.equal(rec["first"][:30], rec["first"][30:])  # fresh noise per repeat


def test_incompatible_resume_is_a_clear_error(tmp_path):
    gm, sde, x = make_problem(12)
    out = str(tmp_path / "run")
    fn = make_fn(gm, sde)
    evaluate_dataset(x, out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    for kwargs, key in [
        (dict(seed=4), "seed"),
        (dict(repeats=3), "repeats"),
        (dict(model_id="another model"), "model_id"),
    ]:
        args = dict(fn=fn, batch_size=4, repeats=2, seed=3, progress=False) | kwargs
        with pytest.raises(ValueError, match=rf"cannot resume(.|\n)*{key}: stored"):
            evaluate_dataset(x, out, **args)
    with pytest.raises(ValueError, match="num_samples: stored 12, now 11"):
        evaluate_dataset(x[:11], out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    with pytest.raises(ValueError, match="data_fingerprint"):
        evaluate_dataset(x + 1, out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    with pytest.raises(ValueError, match="sample_shape"):
        evaluate_dataset(x.reshape(12, 3, 1), out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    # a different batch size is compatible (with a warning); the exact fn gives the same numbers
    before = read_records(out)
    with pytest.warns(RuntimeWarning, match="batch_size 5"):
        evaluate_dataset(x, out, fn=fn, batch_size=5, repeats=2, seed=3, progress=False)
    assert_same_records(read_records(out), before)
    # k-bit data evaluated with dequantization cannot be resumed as continuous data
    xg = torch.randint(0, 256, (12, 3), generator=torch.Generator().manual_seed(0)) / 255 * 2 - 1
    evaluate_dataset(xg, str(tmp_path / "g"), fn=fn, bits=8, progress=False)
    with pytest.raises(ValueError, match=r"bits: stored 8, now None(.|\n)*data_range: stored \[-1.0, 1.0\], now None"):
        evaluate_dataset(xg, str(tmp_path / "g"), fn=fn, progress=False)
    # misuse of the default function
    with pytest.raises(ValueError, match="either fn, or score and sde"):
        evaluate_dataset(x, str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="give bits"):
        evaluate_dataset(torch.zeros(3, 2, dtype=torch.uint8), str(tmp_path / "x"), fn=fn, progress=False)
    with pytest.raises(ValueError, match="would be ignored"):
        evaluate_dataset(x, str(tmp_path / "x"), fn=fn, rtol=1e-3, progress=False)


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = reference(tmp_path)  # 40 samples x 2 repeats, batches of 4, generator noise in the values
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, WORKER, out, "--sleep", "0.25", "--noise", "0.01"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = record_path(out, 0)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(path) and lines_of(out) >= 12:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = lines_of(out)
    assert 12 <= written < 80, written  # really interrupted part-way
    partial = read_records(out)
    assert len(partial["index"]) == written
    # every record that survived the kill is already final
    def key(rec):
        return {(int(i), int(r)): float(v) for i, r, v in zip(rec["index"], rec["repeat"], rec["log_prob"])}

    ref_map = key(ref)
    assert all(ref_map[k] == v for k, v in key(partial).items())
    # restart (the same code, in this process): only the missing samples are computed
    gm, sde, x = make_problem(40)
    calls = []
    fn = make_fn(gm, sde, noise=0.01)

    def counted(xb, g):
        calls.append(xb.shape[0])
        return fn(xb, g)

    s = evaluate_dataset(x, out, fn=counted, batch_size=4, repeats=2, progress=False)
    assert sum(calls) == 80 - 4 * (written // 4)  # a batch with a missing record is recomputed whole
    assert lines_of(out) == 80  # no duplicates, nothing missing
    assert_same_records(read_records(out), ref)
    assert s.count == 40 and s.mean_log_prob == pytest.approx(float(ref["log_prob"].mean()), rel=1e-14)


def test_torn_and_corrupt_records_are_detected_and_recomputed(tmp_path):
    ref = reference(tmp_path, n=20, repeats=1, batch_size=4)
    gm, sde, x = make_problem(20)
    out = str(tmp_path / "run")
    fn = make_fn(gm, sde, noise=0.01)
    evaluate_dataset(x, out, fn=fn, batch_size=4, repeats=1, progress=False)
    path = record_path(out, 0)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    assert len(lines) == 20
    # flip one digit of the value in record 5 (its checksum no longer matches), add a garbage line, and tear the last
    i5 = lines[5].index(b'"log_prob":') + 13
    while not lines[5][i5 : i5 + 1].isdigit():
        i5 += 1
    flipped = b"%d" % ((int(lines[5][i5 : i5 + 1]) + 1) % 10)
    lines[5] = lines[5][:i5] + flipped + lines[5][i5 + 1 :]
    data = b"\n".join(lines[:19] + [b"not a record"]) + b"\n" + lines[19][:25]
    with open(path, "wb") as f:
        f.write(data)
    assert len(read_records(out)["index"]) == 18  # readers skip the bad lines

    calls = []

    def counted(xb, g):
        calls.append(xb.shape[0])
        return fn(xb, g)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        evaluate_dataset(x, out, fn=counted, batch_size=4, repeats=1, progress=False)
    msgs = [str(m.message) for m in w]
    assert len(msgs) == 1 and "2 corrupt record line(s) and a torn final line" in msgs[0], msgs
    assert calls == [4, 4]  # the batches holding records 5 and 19, nothing else
    assert_same_records(read_records(out), ref)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 21 and all(de.decode_record(ln + b"\n") for ln in lines[:-1])
    # a recomputed batch whose stored records disagree with the new values: warned, stored values kept
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-3])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        evaluate_dataset(x, out, fn=make_fn(gm, sde, noise=0.02), batch_size=4, repeats=1, progress=False)
    msgs = [str(m.message) for m in w]
    assert len(msgs) == 2 and "a torn final line" in msgs[0] and "not deterministic" in msgs[1], msgs
    rec = read_records(out)
    assert torch.equal(rec["log_prob"][:-1], ref["log_prob"][:-1]) and rec["log_prob"][-1] != ref["log_prob"][-1]
    # a checksummed line is never trusted without its newline, and a valid line of another file is kept
    good = de.encode_record({"i": 1, "r": 0, "log_prob": -1.5})
    assert de.decode_record(good) == {"i": 1, "r": 0, "log_prob": -1.5}
    assert de.decode_record(good[:-1]) is None
    assert de.decode_record(good.replace(b"-1.5", b"-1.6")) is None


def test_crash_then_resume_with_two_ranks_and_no_process_group(tmp_path):
    # rank / world_size given explicitly (no torch.distributed): two threads share out_dir; the world size changes
    # between the crashed run and the resume.
    ref = reference(tmp_path, n=30, repeats=2, batch_size=4)
    gm, sde, x = make_problem(30)
    fn = make_fn(gm, sde, noise=0.01)
    out = str(tmp_path / "run")
    n = [0]

    def crashing(xb, g):
        n[0] += 1
        if n[0] > 5:
            raise RuntimeError("simulated crash")
        return fn(xb, g)

    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_dataset(x, out, fn=crashing, batch_size=4, repeats=2, progress=False)
    assert lines_of(out) == 20
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = evaluate_dataset(x, out, fn=fn, batch_size=4, repeats=2, rank=rank, world_size=2,
                                             progress=False, poll_interval=0.05, wait_timeout=60)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert results[0] == results[1]
    assert lines_of(out) == 60
    assert_same_records(read_records(out), ref)
    # rank 1 computed exactly its units: (repeat, batch) numbers u = r * 8 + b with u odd
    with open(record_path(out, 1), "rb") as f:
        rank1 = [de.decode_record(ln + b"\n") for ln in f.read().split(b"\n")[:-1]]
    assert rank1 and all((r["r"] * 8 + r["i"] // 4) % 2 == 1 for r in rank1)


def test_torchrun_two_gloo_ranks_match_single_process(tmp_path):
    ref = reference(tmp_path)  # generator noise in the values: batches and seeds must line up exactly
    out = str(tmp_path / "dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, out,
           "--noise", "0.01"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = []
    for r in (0, 1):  # one file per rank (their stdout lines can interleave on the shared pipe)
        with open(f"{out}.summary-rank{r}.json") as fh:
            outs.append(json.load(fh))
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert outs[0]["summary"] == outs[1]["summary"]
    assert os.path.exists(record_path(out, 0)) and os.path.exists(record_path(out, 1))
    assert lines_of(out) == 80
    assert_same_records(read_records(out), ref)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["records"]["log_prob"] == ref["log_prob"].tolist()
    assert res["summary"]["mean_log_prob"] == pytest.approx(float(ref["log_prob"].mean()), rel=1e-14)


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FakeResult:  # the fields of scoresolve.likelihood.LikelihoodResult that matter here
    log_prob: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    nfe: torch.Tensor
    std_error: torch.Tensor | None = None


def test_default_fn_calls_log_likelihood_with_the_batch_generator(tmp_path, monkeypatch):
    gm, sde, x = make_problem(10)
    calls = []

    def fake_log_likelihood(score, xb, sde_, *, generator, rtol, t_eps=1e-5):
        calls.append((generator.initial_seed(), rtol))
        assert sde_ is sde and score is marker
        z = 2 * xb
        return FakeResult(gm.log_prob(xb, t_eps, sde), z, sde.prior_log_prob(z), torch.tensor(17))

    def marker(xb, t):  # the score model is only passed through
        raise AssertionError

    monkeypatch.setattr(de, "_import_log_likelihood", lambda: fake_log_likelihood)
    out = str(tmp_path / "a")
    s = evaluate_dataset(x, out, score=marker, sde=sde, batch_size=4, seed=9, rtol=1e-3, progress=False)
    assert calls == [(de.derive_seed("batch", 9, 0, a, min(a + 4, 10)), 1e-3) for a in (0, 4, 8)]
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


def cli_lines(out):
    return {ln.split(":")[0].strip(): ln for ln in out.splitlines()}


def test_cli_prints_exact_next_to_estimate(tmp_path, monkeypatch, capsys):
    # the CLI's own wiring, with log_likelihood replaced by a perfect solver: log p = log N(z) + exact change of
    # log-density to an arbitrary latent z, i.e. the exact value minus the prior mismatch at z
    def fake_log_likelihood(score, x, sde, *, generator=None, t_eps=1e-5, **kw):
        assert kw["divergence"] == "exact" and kw["probes"] == 2 and kw["rtol"] == 1e-4
        assert isinstance(generator, torch.Generator)
        gm = ss.GaussianMixture.random(x[0].numel(), 3, seed=0, event_shape=x.shape[1:])
        z = 3 * x.double() + 1
        lp = gm.log_prob(x.double(), t_eps, sde) - gm.log_prob(z, sde.T, sde) + sde.prior_log_prob(z)
        return FakeResult(lp, z, sde.prior_log_prob(z), torch.full((x.shape[0],), 42))

    monkeypatch.setattr(de, "_import_log_likelihood", lambda: fake_log_likelihood)
    parser = argparse.ArgumentParser()
    de.add_likelihood_args(parser)
    common = ["--components", "3", "--divergence", "exact", "--probes", "2", "--rtol", "1e-4", "--quiet", "--float64"]
    args = parser.parse_args(["--out-dir", str(tmp_path / "a"), "--n", "20", "--dim", "2", "--sde", "ve", *common])
    assert args.func(args) == 0
    lines = cli_lines(capsys.readouterr().out)
    assert any("mean NFE 42.0" in v for v in lines.values())
    assert "max |err| 0.00e+00" not in lines["error per sample"]  # the prior mismatch is visible ...
    solver = lines["error without it (solver + estimator)"]
    assert float(solver.split("max |err| ")[1]) < 1e-12  # ... and removed exactly
    rec = read_records(str(tmp_path / "a"))
    gm = ss.GaussianMixture.random(2, 3, seed=0)
    x = gm.sample(20, generator=torch.Generator().manual_seed(0), dtype=F64)
    gap = gm.log_prob(3 * x + 1, 1.0, ss.VESDE()) - ss.VESDE().prior_log_prob(3 * x + 1)
    torch.testing.assert_close(rec["prior_gap"], gap, rtol=0, atol=1e-12)
    # --data with k-bit data: the exact value is taken at the same dequantized inputs the solver saw
    data = torch.randint(0, 256, (9, 1, 2, 2), generator=torch.Generator().manual_seed(1)).float() / 255 * 2 - 1
    torch.save({"x": data}, tmp_path / "d.pt")
    args = parser.parse_args(["--out-dir", str(tmp_path / "b"), "--data", str(tmp_path / "d.pt"), "--bits", "8",
                              "--repeats", "2", "--batch-size", "4", *common])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "in 4 dims, 9 samples x 2 repeats" in out
    assert float(cli_lines(out)["error without it (solver + estimator)"].split("max |err| ")[1]) < 1e-12
    # resuming with other solver settings is refused
    args = parser.parse_args(["--out-dir", str(tmp_path / "a"), "--n", "20", "--dim", "2", "--sde", "ve",
                              *common[:-2], "--atol", "1e-3", "--quiet", "--float64"])
    with pytest.raises(ValueError, match="model_id"):
        args.func(args)


@pytest.mark.slow
def test_cli_with_the_real_log_likelihood(tmp_path, capsys):
    pytest.importorskip("scoresolve.likelihood")
    parser = argparse.ArgumentParser()
    de.add_likelihood_args(parser)
    args = parser.parse_args(["--out-dir", str(tmp_path / "a"), "--n", "8", "--dim", "2", "--components", "3",
                              "--divergence", "exact", "--rtol", "1e-6", "--atol", "1e-6", "--float64", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert float(cli_lines(out)["error without it (solver + estimator)"].split("max |err| ")[1]) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# L-level data: num_levels next to bits
# ----------------------------------------------------------------------------------------------------------------
def grid_data(n, shape, num_levels, lo=-1.0, hi=1.0, seed=0):
    """(float64 grid values lo + (hi - lo) v / (L - 1), int64 levels v) of random L-level data."""
    v = torch.randint(0, num_levels, (n, *shape), generator=torch.Generator().manual_seed(seed))
    return lo + (hi - lo) * v.double() / (num_levels - 1), v


def bin_constant_fn(logP, num_levels, lo, hi):
    """A density constant on every bin of width (hi - lo) / L (per-dimension categoricals logP [D, L]): its log p
    depends only on the bins the dequantized inputs fall in, so bits/dim is exact and independent of the noise."""
    width = (hi - lo) / num_levels

    def fn(y, generator):
        b = torch.floor((y.flatten(1).double() - lo) / width).long().clamp(0, num_levels - 1)
        return {"log_prob": (logP.gather(1, b.T).T - math.log(width)).sum(1), "nfe": torch.ones(y.shape[0])}

    return fn


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
        y = de.dequantized_samples(x, range(14), r, 5, k, (lo, hi))
        assert torch.equal(de.dequantized_samples(x, range(14), r, 5, data_range=(lo, hi), num_levels=2**k), y)
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


def test_num_levels_17_matches_the_digits_bits_per_dim(tmp_path, monkeypatch):
    from scoresolve import data as sd
    from scoresolve.models import evaluate as me

    L, D, N = sd.DIGITS_LEVELS, 4, 12
    x, v = grid_data(N, (1, 2, 2), L, *sd.DIGITS_RANGE, seed=1)
    gm = ss.GaussianMixture.random(D, 3, seed=0, event_shape=(1, 2, 2))
    sde = ss.VPSDE()
    out = str(tmp_path / "gm")
    s = evaluate_dataset(x, out, fn=lambda y, g: gm.log_prob(y.double(), T_EPS, sde), num_levels=L,
                         batch_size=5, repeats=2, progress=False)
    rec = read_records(out)
    for r in range(2):
        # the inputs: scoresolve.data.dequantize of the digits grid with this sample's noise u
        u = torch.stack([torch.rand((1, 2, 2), dtype=F64, generator=torch.Generator().manual_seed(
            de.derive_seed("dequant", 0, r, i))) for i in range(N)])
        y = de.dequantized_samples(x, range(N), r, 0, data_range=sd.DIGITS_RANGE, num_levels=L)
        assert torch.equal(y, sd.dequantize(x, L, sd.DIGITS_RANGE, noise=u))
        pos = (y + 1) / 2 * L  # each value in its own bin [v, v + 1] of width 2 / 17
        assert bool((pos >= v).all()) and bool((pos <= v + 1).all())
        lp = gm.log_prob(y, T_EPS, sde)
        sel = rec["repeat"] == r
        assert torch.equal(rec["log_prob"][sel], lp)
        # bits/dim exactly as the digits pipeline converts these log-densities
        assert torch.equal(rec["bpd"][sel], sd.bits_per_dim(lp, D, L, sd.DIGITS_RANGE))
    torch.testing.assert_close(rec["bpd"], -rec["log_prob"] / (D * math.log(2)) + math.log2(8.5), rtol=0, atol=1e-12)
    assert s.mean_bpd == pytest.approx(float(rec["bpd"].mean()), rel=1e-14)
    # a density constant on the 17 bins: the same bits/dim as scoresolve.models.evaluate.dequantized_bpd (its own
    # dequantization noise, the same bins), and as the exact -log2 P(v) / D of the discrete model
    logP = torch.log_softmax(torch.randn(D, L, generator=torch.Generator().manual_seed(4), dtype=F64), 1)
    fn = bin_constant_fn(logP, L, *sd.DIGITS_RANGE)
    evaluate_dataset(x, str(tmp_path / "bins"), fn=fn, num_levels=L, batch_size=5, progress=False)
    rec = read_records(str(tmp_path / "bins"))
    monkeypatch.setattr(me, "log_likelihood", lambda model, y, sde_, generator=None: argparse.Namespace(
        log_prob=fn(y, generator)["log_prob"], nfe=torch.ones(y.shape[0])))
    ref = me.dequantized_bpd(None, sde, x, batch_size=5)
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
        de.dequantized_samples(x, range(2), 0, 0)
    assert de.resolve_levels(None, None) is None
    assert de.resolve_levels(4, None) == de.resolve_levels(None, 16) == de.resolve_levels(4, 16) == 16


def test_resume_with_another_num_levels_is_refused(tmp_path):
    # integer levels 0..15 are valid data for 16 and for 17 levels: only the manifest can tell the runs apart
    v = torch.randint(0, 16, (10, 3), generator=torch.Generator().manual_seed(0))
    fn = lambda y, g: -y.double().pow(2).sum(1)  # noqa: E731
    out = str(tmp_path / "run")
    s = evaluate_dataset(v, out, fn=fn, num_levels=17, batch_size=4, progress=False)
    for kwargs, msg in [
        (dict(num_levels=16), r"cannot resume(.|\n)*num_levels: stored 17, now 16"),
        (dict(bits=4), r"bits: stored None, now 4(.|\n)*num_levels: stored 17, now 16"),
        (dict(num_levels=18), "num_levels: stored 17, now 18"),
        (dict(num_levels=17, data_range=(0.0, 1.0)), "data_range: stored"),
    ]:
        with pytest.raises(ValueError, match=msg):
            evaluate_dataset(v, out, fn=fn, batch_size=4, progress=False, **kwargs)
    assert evaluate_dataset(v, out, fn=fn, num_levels=17, batch_size=4, progress=False) == s
    # grid data on every L-level grid of [-1, 1] (only the end points): continuous evaluation is refused too
    xe = torch.tensor([[-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    evaluate_dataset(xe, str(tmp_path / "e"), fn=fn, num_levels=17, progress=False)
    with pytest.raises(ValueError, match="num_levels: stored 17, now None"):
        evaluate_dataset(xe, str(tmp_path / "e"), fn=fn, progress=False)
    # a run started before num_levels was recorded (manifest with bits only) resumes with its L = 2^bits
    old = str(tmp_path / "old")
    s = evaluate_dataset(v, old, fn=fn, bits=4, batch_size=4, progress=False)
    path = os.path.join(old, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    del m["num_levels"]
    with open(path, "w") as f:
        json.dump(m, f)
    assert evaluate_dataset(v, old, fn=fn, num_levels=16, batch_size=4, progress=False) == s
    assert evaluate_dataset(v, old, fn=fn, bits=4, batch_size=4, progress=False) == s
    with pytest.raises(ValueError, match="num_levels: stored 16, now 17"):
        evaluate_dataset(v, old, fn=fn, num_levels=17, batch_size=4, progress=False)


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
