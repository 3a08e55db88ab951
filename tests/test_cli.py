"""The scoresolve command (scoresolve.cli): every sub-command at small sizes, and its usage errors."""

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from _evaluation_helpers import FakeResult

import scoresolve as ss
import scoresolve.likelihood
from scoresolve import EDMSDE, SubVPSDE
from scoresolve.cli import build_parser, main
from scoresolve.cli.likelihood import add_likelihood_args
from scoresolve.cli.train import add_train_args, cmd_train
from scoresolve.evaluation import dequantized_samples, read_records
from scoresolve.models import DIGITS_CHECKPOINT, load_checkpoint
from scoresolve.quantization import bits_per_dim, from_levels

F64 = torch.float64


def test_compare_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    out = tmp_path / "wp.png"
    rc = main(["compare", "--dim", "4", "--components", "2", "--batch", "64", "--nfe", "6", "12",
               "--tol", "1e-3", "--solvers", "euler", "unipc", "dopri5", "euler_maruyama", "--out", str(out),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith(("euler", "unipc", "dopri5"))]
    assert len(rows) == 2 + 2 + 1 + 2  # solver x setting
    err = {(r[0], r[1]): float(r[3]) for r in rows if r[3] != "-"}
    assert err[("unipc", "nfe=12")] < err[("euler", "nfe=12")]  # a higher-order method wins at equal NFE
    assert ("euler_maruyama", "nfe=6") not in err  # a stochastic run has no path-wise error
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sde", ["edm", "cosine"])
def test_compare_runs_on_every_named_sde(sde, capsys):
    assert main(["compare", "--sde", sde, "--dim", "4", "--components", "2", "--batch", "32", "--nfe", "12",
                 "--tol", "1e-3", "--solvers", "euler", "unipc", "dopri5", "--out", "", "--quiet", "--float64"]) == 0
    # float64: in float32 one of the 32 samples (EDM, sigma up to 80) ended at the other component at rtol 1e-3 on
    # one CPU and not on another (rounding decides a sample on the decision boundary)
    text = capsys.readouterr().out
    assert text.startswith(f"{sde.upper()} SDE")
    err = {r[0]: float(r[3]) for r in (line.split() for line in text.splitlines()) if r and r[0] in
           ("euler", "unipc", "dopri5")}
    assert err["dopri5"] < 0.02 and err["unipc"] < err["euler"]


def test_sample_digits_writes_a_png_grid(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.png"
    assert main(["sample", "--model", "digits", "--batch", "4", "--nfe", "6", "--quiet", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NFE 7" in capsys.readouterr().out  # 6 solver evaluations + the denoising step


def test_sample_and_likelihood_of_the_shipped_flow_model(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "flow.png"
    assert main(["sample", "--model", "digits_flow", "--solver", "euler", "--batch", "4", "--nfe", "6", "--quiet",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NFE 7" in capsys.readouterr().out  # 6 Euler steps from t = 1 + the denoising step
    assert main(["likelihood", "--model", "digits_flow", "--num-samples", "2", "--batch-size", "2", "--rtol", "1e-2",
                 "--atol", "1e-2", "--out-dir", str(tmp_path / "ll"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("digits_flow (RectifiedFlow(T=1.0)), 2 samples") and "(17-level data)" in text
    bpd = float(text.split("bits/dim ")[1].split()[0])
    assert 0.5 < bpd < 4.087  # better than the uniform density on the 17 levels
    with pytest.raises(SystemExit):
        main(["likelihood", "--model", "digits_flow", "--float64", "--out-dir", str(tmp_path / "x")])


def test_sample_mixture_scores_samples_exactly(capsys):
    assert main(["sample", "--dim", "2", "--components", "3", "--batch", "256", "--nfe", "20", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "NFE 20" in text and "sliced W2" in text


@dataclass
class _FakeLikelihood:  # the fields of scoresolve.likelihood.LikelihoodResult that the CLI reads
    log_prob: torch.Tensor
    latent: torch.Tensor
    nfe: torch.Tensor


def test_likelihood_with_num_levels_dequantizes_on_17_levels(tmp_path, monkeypatch, capsys):
    # log_likelihood replaced by the exact log-density of the CLI's own mixture, so the run is fast and every
    # number is known: inputs, log p and bits/dim of 17-level data in [-1, 1] (the digits convention)
    seen = []

    def exact_log_likelihood(score, sde, x, *, generator=None, t_eps=1e-5, **kw):
        seen.append(x.clone())
        gm = ss.GaussianMixture.random(4, 2, seed=0, event_shape=x.shape[1:])
        return _FakeLikelihood(gm.log_prob(x.double(), t_eps, sde), x.double(), torch.full((x.shape[0],), 7))

    monkeypatch.setattr(scoresolve.likelihood, "log_likelihood", exact_log_likelihood)
    v = torch.randint(0, 17, (6, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    x = from_levels(v, 17, (-1.0, 1.0), dtype=torch.float64)
    torch.save({"x": x}, tmp_path / "d.pt")
    out = tmp_path / "run"
    common = ["likelihood", "--data", str(tmp_path / "d.pt"), "--components", "2", "--batch-size", "4", "--quiet",
              "--float64"]
    assert main([*common, "--out-dir", str(out), "--num-levels", "17", "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "(17-level data in [-1, 1])" in text and "max |err| 0.00e+00" in text
    rec = read_records(str(out))
    fed = torch.cat(seen)  # batches of repeat 0, then repeat 1
    ref = torch.cat([dequantized_samples(x, range(6), r, 0, num_levels=17) for r in range(2)])
    assert torch.equal(fed, ref)
    pos = (fed + 1) / 2 * 17  # dequantized (off the grid) into each level's own bin of width 2 / 17
    assert bool((pos >= v.repeat(2, 1, 1, 1)).all()) and bool((pos <= v.repeat(2, 1, 1, 1) + 1).all())
    assert not torch.equal(fed[:6], x)
    gm = ss.GaussianMixture.random(4, 2, seed=0, event_shape=(1, 2, 2))
    lp = gm.log_prob(ref, 1e-5, ss.VPSDE())
    assert torch.equal(rec["log_prob"], lp)
    assert torch.equal(rec["bpd"], bits_per_dim(lp, 4, data_range=(-1.0, 1.0), num_levels=17))
    assert float((rec["bpd"] + lp / (4 * math.log(2)) - math.log2(8.5)).abs().max()) < 1e-12
    with open(out / "manifest.json") as f:
        m = json.load(f)
    assert (m["num_levels"], m["bits"], m["data_range"]) == (17, None, [-1.0, 1.0])
    # resuming with another quantisation is refused (a usage error: exit status 2, one line, no traceback)
    assert "not on the 4-bit grid" in usage_error([*common, "--out-dir", str(out), "--bits", "4", "--repeats", "2"],
                                                  capsys)
    ints = tmp_path / "v.pt"
    torch.save(v.clamp(max=15), ints)  # integer levels 0..15: valid data for 16 and 17 levels
    main(["likelihood", "--data", str(ints), "--out-dir", str(tmp_path / "v"), "--num-levels", "17", "--quiet"])
    capsys.readouterr()
    assert "num_levels: stored 17, now 16" in usage_error(
        ["likelihood", "--data", str(ints), "--out-dir", str(tmp_path / "v"), "--num-levels", "16", "--quiet"], capsys)


def test_likelihood_num_levels_and_bits_are_checked_by_argparse(capsys):
    parse = build_parser().parse_args
    assert parse(["likelihood", "--num-levels", "17"]).num_levels == 17
    args = parse(["likelihood", "--num-levels", "16", "--bits", "4"])  # agreeing: accepted
    assert (args.bits, args.num_levels) == (4, 16)
    assert parse(["likelihood"]).num_levels is None and parse(["likelihood"]).bits is None
    for argv, msg in [
        (["--bits", "4", "--num-levels", "17"], "--bits 4 (2^4 = 16 levels) and --num-levels 17 disagree"),
        (["--num-levels", "17", "--bits", "4"], "--bits 4 (2^4 = 16 levels) and --num-levels 17 disagree"),
        (["--num-levels", "1"], "at least 2"),
        (["--num-levels", "x"], "expected an integer"),
        (["--bits", "0"], "bits must lie in [1, 32]"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["likelihood", *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# likelihood (moved from the tests of the former scoresolve.dataset_eval)
# ----------------------------------------------------------------------------------------------------------------
def cli_lines(out):
    return {ln.split(":")[0].strip(): ln for ln in out.splitlines()}


def test_cli_prints_exact_next_to_estimate(tmp_path, monkeypatch, capsys):
    # the CLI's own wiring, with log_likelihood replaced by a perfect solver: log p = log N(z) + exact change of
    # log-density to an arbitrary latent z, i.e. the exact value minus the prior mismatch at z
    def fake_log_likelihood(score, sde, x, *, generator=None, t_eps=1e-5, **kw):
        assert kw["divergence"] == "exact" and kw["probes"] == 2 and kw["rtol"] == 1e-4
        assert isinstance(generator, torch.Generator)
        gm = ss.GaussianMixture.random(x[0].numel(), 3, seed=0, event_shape=x.shape[1:])
        z = 3 * x.double() + 1
        lp = gm.log_prob(x.double(), t_eps, sde) - gm.log_prob(z, sde.T, sde) + sde.prior_log_prob(z)
        return FakeResult(lp, z, sde.prior_log_prob(z), torch.full((x.shape[0],), 42))

    monkeypatch.setattr(scoresolve.likelihood, "log_likelihood", fake_log_likelihood)
    parser = argparse.ArgumentParser()
    add_likelihood_args(parser)
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


def test_likelihood_probes_per_step_reaches_log_likelihood(tmp_path, monkeypatch, capsys):
    import scoresolve.likelihood as lk

    seen = {}
    real = lk.log_likelihood

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lk, "log_likelihood", spy)
    parser = argparse.ArgumentParser()
    add_likelihood_args(parser)
    args = parser.parse_args(["--out-dir", str(tmp_path / "a"), "--n", "4", "--dim", "2", "--probes", "2",
                              "--probes-per", "step", "--probe", "orthogonal", "--rtol", "1e-3", "--atol", "1e-3",
                              "--quiet"])
    assert args.func(args) == 0
    assert seen["probes_per"] == "step" and seen["probe"] == "orthogonal"


@pytest.mark.slow
def test_cli_with_the_real_log_likelihood(tmp_path, capsys):
    pytest.importorskip("scoresolve.likelihood")
    parser = argparse.ArgumentParser()
    add_likelihood_args(parser)
    args = parser.parse_args(["--out-dir", str(tmp_path / "a"), "--n", "8", "--dim", "2", "--components", "3",
                              "--divergence", "exact", "--rtol", "1e-6", "--atol", "1e-6", "--float64", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert float(cli_lines(out)["error without it (solver + estimator)"].split("max |err| ")[1]) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# train (moved from tests/test_models.py)
# ----------------------------------------------------------------------------------------------------------------
def test_cmd_train(tmp_path, capsys):
    parser = add_train_args(argparse.ArgumentParser())
    out = str(tmp_path / "run")
    argv = ["--data", "swissroll", "--sde", "subvp", "--steps", "4", "--batch-size", "16", "--out", out, "--quiet",
            "--model-arg", "hidden=16", "--model-arg", "depth=1", "--weighting", "likelihood", "--importance-sampling"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "4 steps" in capsys.readouterr().out
    assert cmd_train(parser.parse_args(argv)) == 2  # an existing run is not overwritten without --resume
    args = parser.parse_args([*argv, "--resume", "--steps", "6", "--export", str(tmp_path / "m.pt")])
    assert cmd_train(args) == 0
    model, sde, config = load_checkpoint(str(tmp_path / "m.pt"))
    assert isinstance(sde, SubVPSDE) and config.steps == 6 and config.weighting == "likelihood"
    assert model(torch.randn(3, 2), torch.rand(3)).shape == (3, 2)


def test_cmd_train_on_the_edm_sde(tmp_path, capsys):
    parser = add_train_args(argparse.ArgumentParser())
    out = str(tmp_path / "run")
    argv = ["--data", "swissroll", "--sde", "edm", "--sde-arg", "T=20", "--steps", "3", "--batch-size", "16",
            "--out", out, "--quiet", "--model-arg", "hidden=16", "--model-arg", "depth=1", "--weighting", "likelihood",
            "--importance-sampling", "--export", str(tmp_path / "m.pt")]
    assert cmd_train(parser.parse_args(argv)) == 0
    model, sde, config = load_checkpoint(str(tmp_path / "m.pt"))
    assert isinstance(sde, EDMSDE) and sde.T == 20.0 and config.sde == "edm"
    x = torch.randn(5, 2)
    assert torch.isfinite(model(x, torch.full((5,), 0.01))).all()


# ----------------------------------------------------------------------------------------------------------------
# usage errors: bad numbers, bad values, missing inputs and unusable outputs end in exit status 2, before any work
# ----------------------------------------------------------------------------------------------------------------
def usage_error(argv, capsys):
    """The stderr of ``scoresolve ARGV``, which must be an argparse usage error (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "usage: scoresolve" in err, err
    return err


EVALUATE = ["evaluate", "--checkpoint", DIGITS_CHECKPOINT]
NUMBERS = [  # (command line, the bad option and value, what the message says)
    *[(["sample"], [opt, v], msg) for opt in ("--nfe", "--batch", "--dim", "--components")
      for v, msg in (("0", "at least 1, got 0"), ("-3", "at least 1, got -3"), ("2.5", "expected an integer"))],
    (["sample"], ["--t-eps", "0"], "greater than 0"),
    (["sample"], ["--t-eps", "nan"], "expected a finite number"),
    (["sample"], ["--diffusion", "-1"], "at least 0"),
    *[(["compare"], [opt, "0"], msg) for opt, msg in (("--nfe", "at least 1"), ("--tol", "greater than 0"),
                                                     ("--batch", "at least 1"))],
    (["compare"], ["--nfe", "10", "-5"], "at least 1, got -5"),
    (["compare"], ["--tol", "1e-3", "inf"], "expected a finite number"),
    *[(["likelihood"], [opt, "0"], "at least 1, got 0") for opt in
      ("--num-samples", "--dim", "--components", "--batch-size", "--repeats", "--probes")],
    *[(["likelihood"], [opt, v], msg) for opt in ("--rtol", "--atol", "--t-eps")
      for v, msg in (("0", "greater than 0"), ("-0.5", "greater than 0"), ("x", "expected a number"))],
    (["likelihood"], ["--bits", "33"], "bits must lie in [1, 32], got 33"),
    (["likelihood"], ["--data-range", "-1", "inf"], "expected a finite number"),
    *[(["train"], [opt, "0"], "at least 1, got 0") for opt in ("--steps", "--batch-size", "--checkpoint-every",
                                                                "--threads")],
    *[(["train"], [opt, "-1"], "at least 0, got -1") for opt in ("--warmup", "--grad-clip")],
    (["train"], ["--lr", "0"], "greater than 0"),
    (["train"], ["--t-eps", "-1"], "greater than 0"),
    (["train"], ["--ema-decay", "1"], "lie in [0, 1), got 1"),
    *[(EVALUATE, [opt, "0"], "at least 1, got 0") for opt in ("--batch-size", "--probes", "--repeats", "--threads")],
    *[(EVALUATE, [opt, "0"], "greater than 0") for opt in ("--rtol", "--atol", "--grid-rtol")],
    (EVALUATE, ["--bpd-n", "-1"], "at least 0, got -1"),
]


@pytest.mark.parametrize("command, option, msg", NUMBERS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_out_of_range_numbers_are_usage_errors(command, option, msg, capsys):
    err = usage_error([*command, *option], capsys)
    assert f"argument {option[0]}" in err and msg in err, err


def test_zero_is_accepted_where_it_means_something():
    parse = build_parser().parse_args
    assert parse([*EVALUATE, "--bpd-n", "0"]).bpd_n == 0  # 0: skip bits/dim
    args = parse(["train", "--warmup", "0", "--grad-clip", "0", "--ema-decay", "0"])  # no warm-up, no clipping
    assert (args.warmup, args.grad_clip, args.ema_decay) == (0, 0.0, 0.0)
    assert parse(["sample", "--diffusion", "0"]).diffusion == 0.0  # the probability-flow ODE


def test_bad_values_are_usage_errors(tmp_path, capsys):
    for argv, msg in [
        (["sample", "--solver", "nope"], "unknown solver 'nope'"),
        (["sample", "--solver", "scipy:rk45"], "backend solvers look like"),
        (["sample", "--solver", "dopri5", "--nfe", "10"], "adaptive and chooses its own steps: drop --nfe"),
        (["sample", "--t-eps", "1.5"], "--t-eps must lie in (0, T) = (0, 1)"),
        (["compare", "--sde", "vp", "--t-eps", "2"], "--t-eps must lie in (0, T) = (0, 1)"),
        (["likelihood", "--data-range", "1", "-1"], "--data-range needs finite LO < HI, got 1 -1"),
        (["likelihood", "--divergence", "approximate"], "invalid choice: 'approximate'"),
        (["likelihood", "--probe", "uniform"], "invalid choice: 'uniform'"),
        (["likelihood", "--divergence", "exact", "--probes-per", "step"], "--probes-per step needs --divergence"),
        ([*EVALUATE, "--divergence", "exact", "--probes-per", "step"], "--probes-per step needs --divergence"),
        (["likelihood", "--solver", "euler"], "unknown adaptive method 'euler'"),
        (["likelihood", "--device", "gpu0"], "not a device: 'gpu0'"),
        (["likelihood", "--t-eps", "1"], "--t-eps must lie in (0, T) = (0, 1)"),
        (["train", "--sde-arg", "T"], "expected KEY=VALUE, got 'T'"),
        (["train", "--sde-arg", "bogus=1"], "--sde vp with --sde-arg {'bogus': 1}"),
        (["train", "--sde", "edm", "--sde-arg", "T=20", "--t-eps", "30"], "(0, T) = (0, 20)"),
        (["train", "--model-arg", "channel_mult=1,x"], "expected a comma-separated list of integers"),
    ]:
        err = usage_error(argv, capsys)
        assert msg in err, (argv, err)


def test_missing_inputs_and_unusable_outputs_are_usage_errors_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the command started although its arguments are bad")

    for name in ("work_precision", "sliced_wasserstein"):
        monkeypatch.setattr(f"scoresolve.compare.{name}", no_work)
    monkeypatch.setattr("scoresolve.sampling.sample", no_work)
    monkeypatch.setattr("scoresolve.evaluation.evaluate_dataset", no_work)
    monkeypatch.setattr("scoresolve.models.train.train", no_work)
    monkeypatch.setattr("scoresolve.models.train.load_checkpoint", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    missing = str(tmp_path / "missing" / "x.png")
    under_file = str(a_file / "sub")
    for argv, msg in [
        (["compare", "--out", missing], "its directory"),
        (["compare", "--out", str(tmp_path)], "is a directory, expected a file path"),
        (["sample", "--out", under_file + ".pt"], "does not exist"),
        (["likelihood", "--data", str(tmp_path / "nope.pt")], "nope.pt': no such file"),
        (["likelihood", "--out-dir", str(a_file)], "exists and is not a directory"),
        (["likelihood", "--out-dir", under_file], "is not a directory"),
        (["train", "--out", str(a_file)], "exists and is not a directory"),
        (["train", "--export", os.path.join(under_file, "m.pt")], "is not a directory"),
        (["evaluate", "--checkpoint", str(tmp_path / "nope.pt")], "no such file"),
        ([*EVALUATE, "--grid", missing], "its directory"),
    ]:
        err = usage_error(argv, capsys)
        assert msg in err, (argv, err)
    assert not os.path.exists(os.path.dirname(missing))


class _RunsCode:
    """Unpickling this (torch.load without weights_only) opens, i.e. creates, the file at ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_likelihood_data_is_loaded_as_tensors_only(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(4, 2), "payload": _RunsCode(str(marker))}, evil)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    err = usage_error(["likelihood", "--data", str(evil), "--out-dir", str(tmp_path / "run")], capsys)
    assert "weights_only=True" in err and "evil.pt" in err, err
    assert calls == [True] and not marker.exists()
    # files holding tensors but not a dataset [N, ...]
    torch.save({"y": torch.zeros(4, 2)}, tmp_path / "no_x.pt")
    torch.save(torch.zeros(4), tmp_path / "flat.pt")
    for name in ("no_x.pt", "flat.pt"):
        err = usage_error(["likelihood", "--data", str(tmp_path / name)], capsys)
        assert "expected a tensor [N, ...] (or a dict with key 'x')" in err
    # a plain tensor and a dict of tensors load
    torch.save(torch.zeros(4, 2), tmp_path / "t.pt")
    assert torch.equal(build_parser().parse_args(["likelihood", "--data", str(tmp_path / "t.pt")]).data,
                       torch.zeros(4, 2))


@pytest.mark.parametrize("argv, msg", [
    (["train", "--steps", "0"], "at least 1, got 0"),
    (["evaluate", "--checkpoint", "no_such_checkpoint.pt"], "no such file"),
])
def test_module_entry_point_runs_the_cli(argv, msg, tmp_path):
    """``python -m scoresolve CMD`` is the command (the 0.1.0 ``python -m scoresolve.models.*`` shims are gone: they
    made models/ and cli/ import each other)."""
    proc = subprocess.run([sys.executable, "-m", "scoresolve", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"usage: scoresolve {argv[0]}" in proc.stderr and msg in proc.stderr, proc.stderr


def test_no_argparse_code_outside_the_cli_package():
    root = os.path.dirname(os.path.abspath(ss.__file__))
    offenders = []
    for dirpath, _, names in os.walk(root):
        if os.path.join(root, "cli") in (dirpath, os.path.dirname(dirpath)):
            continue
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    if "argparse" in f.read():
                        offenders.append(os.path.relpath(os.path.join(dirpath, name), root))
    assert offenders == [], offenders
    # the 0.1.0 aliases of the command in scoresolve.models are gone (models/ does not import cli/)
    import scoresolve.models as models

    assert not hasattr(models, "add_train_args") and not hasattr(models, "cmd_train")


def test_evaluate_command_on_the_shipped_digits_model(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main([*EVALUATE, "--bpd-n", "2", "--batch-size", "2", "--rtol", "1e-2", "--atol", "1e-2"]) == 0
    assert "bits/dim on 2 held-out digits" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# any model: a trained checkpoint and a user's own network (--model-spec MODULE:FACTORY), on every command
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The commands set torch's thread count (--threads): give the other tests back theirs."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


USER_MODULE = '''
import torch
import scoresolve as ss


class Net(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        return 0.1 * self.f(torch.cat([x.flatten(1), t[:, None]], 1)).view_as(x)


def make(dim=2, hidden=16):
    torch.manual_seed(0)
    sde = ss.VPSDE()
    return ss.ScoreModel(Net(dim, hidden), sde, prediction="eps"), sde


def make_image():
    return make(dim=16)[0]  # a ScoreModel alone: its sde is the process


def make_wrong():
    return "not a model"
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``cli_user_net`` on sys.path with factories ``make(dim, hidden)`` -> (ScoreModel, VPSDE), ``make_image``
    (a ScoreModel alone) and ``make_wrong``."""
    (tmp_path / "cli_user_net.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_user_net", raising=False)
    return tmp_path / "cli_user_net.py"


def _table(text):
    rows = (line.split() for line in text.splitlines())
    return {(r[0], r[1]): r for r in rows if len(r) >= 5 and r[1].startswith(("nfe=", "rtol="))}


def test_every_command_runs_on_a_trained_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "run" / "model.pt")
    assert main(["train", "--data", "moons", "--steps", "3", "--batch-size", "16", "--model-arg", "hidden=16",
                 "--model-arg", "depth=1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    # sample: the recorded shape [2]
    out = tmp_path / "s.pt"
    assert main(["sample", "--checkpoint", ckpt, "--batch", "16", "--nfe", "6", "--quiet", "--out", str(out)]) == 0
    assert f"{ckpt} (VPSDE" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["x"].shape == (16, 2) and torch.isfinite(saved["x"]).all()
    # likelihood: default data are fresh samples of its toy set
    assert main(["likelihood", "--checkpoint", ckpt, "--num-samples", "8", "--batch-size", "8", "--rtol", "1e-3",
                 "--atol", "1e-3", "--out-dir", str(tmp_path / "ll"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{ckpt} (VPSDE") and "8 samples" in text
    assert math.isfinite(float(text.split("bits/dim ")[1].split()[0]))
    # compare: errors against a float64 dopri5 solve of the same network; no SWD / log p; stochastic runs skipped
    png = tmp_path / "wp.png"
    assert main(["compare", "--checkpoint", ckpt, "--batch", "16", "--nfe", "6", "12", "--tol", "1e-4",
                 "--ref-tol", "1e-8", "--solvers", "euler", "dpmpp_2m", "dopri5", "euler_maruyama", "--out", str(png),
                 "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "reference: dopri5 float64 rtol=atol=1e-08" in cap.out and "SWD" not in cap.out
    assert "skipping stochastic solvers" in cap.err and "euler_maruyama" in cap.err
    rows = _table(cap.out)
    assert set(rows) == {("euler", "nfe=6"), ("euler", "nfe=12"), ("dpmpp_2m", "nfe=6"), ("dpmpp_2m", "nfe=12"),
                         ("dopri5", "rtol=0.0001")}
    err = {k: float(r[3]) for k, r in rows.items()}
    assert err[("dopri5", "rtol=0.0001")] < err[("dpmpp_2m", "nfe=12")] < err[("euler", "nfe=12")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # evaluate scores digits models only; the checkpoint's process fixes --t-eps's range
    assert "evaluate scores digits models" in usage_error(["evaluate", "--checkpoint", ckpt], capsys)
    assert "give the model" in usage_error(["evaluate"], capsys)
    assert "(0, T) = (0, 1) for" in usage_error(["sample", "--checkpoint", ckpt, "--t-eps", "1.5"], capsys)
    assert "not a scoresolve checkpoint" in usage_error(["sample", "--checkpoint", str(out)], capsys)


def test_every_command_runs_on_a_user_module(user_module, tmp_path, capsys):
    spec = ["--model-spec", "cli_user_net:make", "--model-arg", "hidden=8"]
    out = tmp_path / "s.pt"
    assert main(["sample", *spec, "--shape", "2", "--batch", "16", "--nfe", "6", "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("cli_user_net:make (VPSDE")
    x = torch.load(out, weights_only=True)["x"]
    assert x.shape == (16, 2)
    data = tmp_path / "data.pt"
    torch.save(x[:8], data)
    assert main(["likelihood", *spec, "--data", str(data), "--batch-size", "8", "--rtol", "1e-3", "--atol", "1e-3",
                 "--out-dir", str(tmp_path / "ll"), "--quiet"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main(["compare", *spec, "--shape", "2", "--batch", "8", "--nfe", "8", "--tol", "1e-3", "--solvers",
                 "euler", "dopri5", "--out", "", "--quiet", "--float64"]) == 0
    text = capsys.readouterr().out
    assert "reference: dopri5 float64" in text and set(_table(text)) == {("euler", "nfe=8"), ("dopri5", "rtol=0.001")}
    # a .py file works too, and a factory may return a ScoreModel alone
    assert main(["sample", "--model-spec", f"{user_module}:make_image", "--shape", "1,4,4", "--batch", "4", "--nfe",
                 "4", "--quiet", "--out", str(tmp_path / "img.png")]) == 0
    assert (tmp_path / "img.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the contract is checked before any work
    for argv, msg in [
        (["sample", "--model-spec", "cli_user_net:make"], "unknown: give --shape"),
        (["sample", "--model-spec", "no_such_module_xyz:make", "--shape", "2"], "cannot import 'no_such_module_xyz'"),
        (["sample", "--model-spec", "cli_user_net:nope", "--shape", "2"], "has no function 'nope'"),
        (["sample", "--model-spec", "cli_user_net", "--shape", "2"], "expected MODULE:FACTORY"),
        (["sample", "--model-spec", "cli_user_net:make_wrong", "--shape", "2"], "must return (model, sde)"),
        (["sample", *spec[:2], "--model-arg", "bogus=1", "--shape", "2"], "unexpected keyword argument 'bogus'"),
        (["sample", "--model-arg", "hidden=8"], "--model-arg goes with --model-spec"),
        (["sample", *spec[:2], "--model", "digits"], "give one of --model, --checkpoint, --model-spec"),
        (["sample", *spec, "--shape", "2", "--out", str(tmp_path / "x.png")], "a PNG grid needs image samples"),
        (["likelihood", *spec], "has no default dataset: give --data"),
        (["likelihood", *spec, "--float64", "--data", str(data)], "float32 network: drop --float64"),
    ]:
        assert msg in usage_error(argv, capsys), argv


def test_a_user_module_on_pythonpath_runs_in_a_fresh_process(user_module, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(
        os.path.abspath(ss.__file__)))])}
    proc = subprocess.run([sys.executable, "-m", "scoresolve", "sample", "--model-spec", "cli_user_net:make",
                           "--shape", "2", "--batch", "8", "--nfe", "4", "--quiet", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path / "..", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cli_user_net:make (VPSDE") and "NFE 5" in proc.stdout  # 4 + denoising


def test_sample_grid_is_square_and_capped(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from scoresolve.cli.sample import GRID_MAX, grid_layout
    from scoresolve.models import image_grid as me

    assert GRID_MAX == 256 and grid_layout(512) == (256, 16) and grid_layout(10) == (10, 4) and grid_layout(4) == (4, 2)
    calls = []
    real = me.save_sample_grids

    def spy(panels, path, nrow=8):
        calls.append((panels[0][1].shape[0], nrow, me.image_grid(panels[0][1], nrow).shape))
        return real(panels, path, nrow=nrow)

    monkeypatch.setattr(me, "save_sample_grids", spy)
    out = tmp_path / "d.png"
    assert main(["sample", "--model", "digits", "--batch", "300", "--solver", "euler", "--nfe", "1", "--quiet",
                 "--out", str(out)]) == 0
    assert "first 256 of 300" in capsys.readouterr().out
    assert calls == [(256, 16, (145, 145))]  # 16 x 16 digits of 8 px, 1 px apart: square
    assert "at most 256 drawn" in " ".join(_help("sample").split())


def _help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return sub.format_help()


@pytest.mark.parametrize("command", ["compare", "sample", "likelihood", "train", "evaluate"])
def test_help_explains_every_option_with_its_default(command, capsys):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if action.default is not None and action.default is not False:
            assert "default" in formatter._get_help_string(action), (command, action.option_strings[0])
    text = " ".join(_help(command).split())
    assert "--threads" in text and "--model" in text or command == "train"
    if command == "sample":
        for expected in ("--seed SEED seed of", "(default: 0)", "(default: sample()'s measured few-step default",
                         "(default: the solver's own",
                         "--checkpoint", "--model-spec MODULE:FACTORY"):
            assert expected in text, expected
    if command == "compare":
        assert "(default: 10 20 50)" in text and "(default: work_precision.png)" in text


def test_threads_option_and_default(capsys):
    from scoresolve.cli._args import default_threads

    parser = build_parser()
    for command in ("compare", "sample", "likelihood", "train", "evaluate"):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert any("--threads" in a.option_strings for a in sub._actions), command
    argv = ["sample", "--dim", "2", "--components", "2", "--batch", "8", "--nfe", "4", "--quiet"]
    torch.set_num_threads(1)
    assert main([*argv, "--threads", "3"]) == 0 and torch.get_num_threads() == 3
    assert main(argv) == 0 and torch.get_num_threads() == default_threads()
    assert 1 <= default_threads() <= min(os.cpu_count(), 4)
    assert "at least 1, got 0" in usage_error([*argv, "--threads", "0"], capsys)


def test_compare_plot_draws_the_noise_floor_as_a_labelled_band(tmp_path, monkeypatch):
    import matplotlib.axes

    from scoresolve.compare import Run, plot_work_precision

    spans, lines = [], []
    real_span = matplotlib.axes.Axes.axhspan
    monkeypatch.setattr(matplotlib.axes.Axes, "axhspan",
                        lambda self, *a, **k: spans.append((a, k)) or real_span(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, *a, **k: lines.append((a, k)))
    runs = [Run("euler", f"nfe={n}", n, 1.0 / n, 0.0, swd=0.5 / n, logp=-1.0) for n in (10, 20, 50)]
    runs.append(Run("exact samples", "-", 0.0, 0.0, 0.0, swd=0.03, logp=-1.0))
    plot_work_precision(runs, str(tmp_path / "p.png"))
    assert lines == [] and len(spans) == 1
    (bottom, top), kw = spans[0]
    assert top == 0.03 and bottom < 0.01 and "noise floor" in kw["label"] and "two exact samples" in kw["label"]


@pytest.mark.parametrize("sde", ["vp", "rf"])
def test_compare_best_picks_the_lowest_error_solver_and_grid(sde, capsys):
    from scoresolve.cli.compare import best_candidates

    names = best_candidates(ss.sde_from_name(sde))
    assert "ipndm@karras" in names if sde == "vp" else "unipc@uniform" in names and "ipndm@uniform" in names
    assert "dpm_solver_2@uniform" in names if sde == "vp" else "dpm_solver_2@uniform" not in names
    assert not any(n.startswith(("euler_maruyama", "pc@", "dpmpp_2m_sde", "dopri5")) for n in names)
    assert main(["compare", "--sde", sde, "--best", "--dim", "3", "--components", "2", "--batch", "16", "--nfe", "6",
                 "--out", "", "--quiet"]) == 0
    out = capsys.readouterr().out
    best = [line for line in out.splitlines() if line.startswith("best at nfe=6:")]
    assert len(best) == 1
    solver, grid = best[0].split("solver=")[1].split()[0], best[0].split("grid=")[1].split()[0]
    err = float(best[0].split("error=")[1])
    rows = [line.split() for line in out.splitlines() if "nfe=6" in line and "@" in line]
    assert err == pytest.approx(min(float(r[3]) for r in rows if float(r[2]) <= 6), rel=1e-3)
    assert any(r[0] == f"{solver}@{grid}" for r in rows)
