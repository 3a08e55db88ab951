"""The scoresolve command: the main job (compare) and sample, at small sizes."""

import json
import math
from dataclasses import dataclass

import pytest
import torch

import scoresolve as ss
from scoresolve import data as sd
from scoresolve import dataset_eval as de
from scoresolve.cli import build_parser, main


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
                 "--tol", "1e-3", "--solvers", "euler", "unipc", "dopri5", "--out", "", "--quiet"]) == 0
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

    def exact_log_likelihood(score, x, sde, *, generator=None, t_eps=1e-5, **kw):
        seen.append(x.clone())
        gm = ss.GaussianMixture.random(4, 2, seed=0, event_shape=x.shape[1:])
        return _FakeLikelihood(gm.log_prob(x.double(), t_eps, sde), x.double(), torch.full((x.shape[0],), 7))

    monkeypatch.setattr(de, "_import_log_likelihood", lambda: exact_log_likelihood)
    v = torch.randint(0, 17, (6, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    x = sd.from_levels(v, 17, (-1.0, 1.0), dtype=torch.float64)
    torch.save({"x": x}, tmp_path / "d.pt")
    out = tmp_path / "run"
    common = ["likelihood", "--data", str(tmp_path / "d.pt"), "--components", "2", "--batch-size", "4", "--quiet",
              "--float64"]
    assert main([*common, "--out-dir", str(out), "--num-levels", "17", "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "(17-level data in [-1, 1])" in text and "max |err| 0.00e+00" in text
    rec = de.read_records(str(out))
    fed = torch.cat(seen)  # batches of repeat 0, then repeat 1
    ref = torch.cat([de.dequantized_samples(x, range(6), r, 0, num_levels=17) for r in range(2)])
    assert torch.equal(fed, ref)
    pos = (fed + 1) / 2 * 17  # dequantized (off the grid) into each level's own bin of width 2 / 17
    assert bool((pos >= v.repeat(2, 1, 1, 1)).all()) and bool((pos <= v.repeat(2, 1, 1, 1) + 1).all())
    assert not torch.equal(fed[:6], x)
    gm = ss.GaussianMixture.random(4, 2, seed=0, event_shape=(1, 2, 2))
    lp = gm.log_prob(ref, 1e-5, ss.VPSDE())
    assert torch.equal(rec["log_prob"], lp)
    assert torch.equal(rec["bpd"], sd.bits_per_dim(lp, 4, 17, (-1.0, 1.0)))
    assert float((rec["bpd"] + lp / (4 * math.log(2)) - math.log2(8.5)).abs().max()) < 1e-12
    with open(out / "manifest.json") as f:
        m = json.load(f)
    assert (m["num_levels"], m["bits"], m["data_range"]) == (17, None, [-1.0, 1.0])
    # resuming with another quantisation is refused
    with pytest.raises(ValueError, match="not on the 4-bit grid"):
        main([*common, "--out-dir", str(out), "--bits", "4", "--repeats", "2"])
    ints = tmp_path / "v.pt"
    torch.save(v.clamp(max=15), ints)  # integer levels 0..15: valid data for 16 and 17 levels
    main(["likelihood", "--data", str(ints), "--out-dir", str(tmp_path / "v"), "--num-levels", "17", "--quiet"])
    with pytest.raises(ValueError, match="num_levels: stored 17, now 16"):
        main(["likelihood", "--data", str(ints), "--out-dir", str(tmp_path / "v"), "--num-levels", "16", "--quiet"])


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
