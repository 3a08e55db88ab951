"""The benchmark scripts run end to end (tiny sizes, loose tolerances): a GPU session must not find them broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_likelihood_gpu_benchmark_smoke(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "likelihood_gpu.py"), "--tiny", "--batch", "2", "--tol", "1e-2",
           "--se-tol", "1e-1", "--variants", "plain", "compact", "as_b", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["(b) torchdiffeq dopri5, fused", "scoresolve [plain]", "(a) scipy RK45, host, separate calls",
                       "scoresolve [compact]", "scoresolve [as_b]"]
    rows = {r["method"]: r for r in res["rows"]}
    plain, compact = rows["scoresolve [plain]"], rows["scoresolve [compact]"]
    assert plain["calls"] == compact["calls"] and compact["rows"] <= plain["rows"] == 2 * plain["calls"]
    assert res["std_error_one_probe"] > 0 and res["floor_s"] > 0
    assert all(r["abs_diff_vs_b"] < 10 * res["std_error_one_probe"] for r in res["rows"])
    assert "speedup_vs_b" in plain and "/floor" in proc.stdout


def test_hutchinson_variance_benchmark_smoke(tmp_path):
    out = tmp_path / "hv.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hutchinson_variance.py"), "--n", "2", "--probes", "2", "--tol",
           "1e-2", "--models", "digits", "--methods", "rademacher", "cv", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["models"]["digits"]
    assert [r["method"] for r in rows] == ["rademacher", "cv"]
    assert rows[0]["cost_ratio"] == 1.0 and all(r["std_error"] > 0 and r["nfe"] > 0 for r in rows)
    assert "cost vs rad" in proc.stdout


def test_time_oscillation_finds_a_known_wiggle():
    """The diagnostic recovers a planted oscillation (amplitude and frequency) and sees none in an exact score."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from time_oscillation import model, oscillation
    finally:
        sys.path.pop(0)
    import math

    import torch

    import scoresolve as ss

    sde = ss.VPSDE()
    x0 = torch.ones(1, 4, dtype=torch.float64)

    def wiggly(x, t):  # smooth in t plus 0.02 sin(1000 t): the residual RMS is 0.02 / sqrt(2) of ~unit velocities
        return -x + 0.02 * torch.sin(1000 * t)[:, None]

    w = (0.3, 0.35)
    rel, top = oscillation(wiggly, sde, x0, w, points=1001)
    t = torch.linspace(*w, 1001, dtype=torch.float64)
    xt = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v_rms = float(xt.pow(2).mean().sqrt())
    assert rel == pytest.approx(0.02 / math.sqrt(2) / v_rms, rel=0.05)
    assert abs(top[0] - 1000) < 2 * math.pi / (w[1] - w[0])  # within one frequency bin
    velocity, sde_m, x0_m = model("mixture")
    assert oscillation(velocity, sde_m, x0_m, w, points=401)[0] < 1e-6


def test_likelihood_cost_on_a_checkpoint_with_the_baseline_curve(tmp_path):
    """likelihood_cost.py --checkpoint (a digits network of `scoresolve train`) with --baseline-tols and --plot."""
    pytest.importorskip("matplotlib")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    ckpt = tmp_path / "m.pt"
    train = [sys.executable, "-m", "scoresolve", "train", "--data", "digits", "--steps", "2", "--batch-size", "8",
             "--model-arg", "base_channels=8", "--model-arg", "time_max_freq=10", "--out", str(tmp_path / "run"),
             "--export", str(ckpt), "--quiet", "--threads", "1"]
    proc = subprocess.run(train, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, png = tmp_path / "lc.json", tmp_path / "lc.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "likelihood_cost.py"), "--batch", "2", "--checkpoint", str(ckpt),
           "--solvers", "dopri5:t", "--rtol", "1e-3", "--ref-tol", "1e-6", "--baseline-tols", "3e-3",
           "--ref-cache", str(tmp_path / "refs"), "--json", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    (name,) = res
    assert name == f"checkpoint:{ckpt}" and png.stat().st_size > 0 and any((tmp_path / "refs").iterdir())
    base = res[name]["baseline"]
    assert [p["tol"] for p in base["curve"]] == [1e-3, 3e-3] and base["curve"][0]["nfe"] == base["nfe"] > 0
    row = res[name]["dopri5 (t)"]
    assert [c["baseline_tol"] for c in row["curve"]] == [1e-3, 3e-3] and row["sweep"]
    for c in row["curve"]:  # a matched point is no worse than the baseline point it matches, in both errors
        if c["matched_tol"] is not None:
            s = next(p for p in row["sweep"] if p["tol"] == c["matched_tol"])
            b = next(p for p in base["curve"] if p["tol"] == c["baseline_tol"])
            assert s["max"] <= b["max"] and s["mean"] <= b["mean"] and c["ratio"] == pytest.approx(s["nfe"] / b["nfe"])


class _Planted:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_likelihood_cost_cache_never_unpickles_code(tmp_path):
    import pickle

    import torch

    mod = _likelihood_cost_module()
    x = torch.zeros(2, 3, dtype=torch.float64)
    cache = tmp_path / "cache"
    cache.mkdir()
    marker = tmp_path / "executed"
    torch.save(_Planted(str(marker)), cache / "p_B2_teps1e-05_tol1e-08.pt")
    with pytest.raises(pickle.UnpicklingError):
        mod.reference("p", None, None, x, 1e-5, 1e-8, str(cache))
    assert not marker.exists()
    # explicitly, not by torch's default (which was weights_only=False before torch 2.6)
    seen = {}
    real = torch.load

    def load(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    torch.save(torch.ones(2), cache / "q_B2_teps1e-05_tol1e-08.pt")
    mod.torch.load = load
    try:
        assert torch.equal(mod.reference("q", None, None, x, 1e-5, 1e-8, str(cache)), torch.ones(2))
    finally:
        mod.torch.load = real
    assert seen.get("weights_only") is True


def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--batch", "2", "--repeats", "1", "--only",
           "dpmpp_2m", "heun", "dopri5", "--compiled", "eager", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    pairs = [r["pair"] for r in res["rows"]]
    assert "dpmpp_2m | k-diffusion sample_dpmpp_2m" in pairs and "heun | k-diffusion sample_heun" in pairs
    assert any(p.startswith("dpmpp_2m compile_sampler(eager -> eager") for p in pairs)
    if any("torchdiffeq" in p for p in pairs):
        assert "dopri5 | torchdiffeq dopri5" in pairs
    assert all(r["ours_us"] > 0 and r["theirs_us"] > 0 and r["ratio"] > 0 for r in res["rows"])
    assert res["meta"]["clock"] == "process" and res["meta"]["nfe"] == 50


def _likelihood_cost_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("likelihood_cost", ROOT / "benchmarks" / "likelihood_cost.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


@pytest.mark.parametrize("name", ["16-D smooth RF", "2-D smooth"])
def test_flow_matching_baseline_solves_our_problem_with_our_conventions(name):
    """Meta's flow_matching (time reversed, grid [1, 0], its own probe draw and prior term) gives our log p: with
    its exact divergence the exact mixture log-density (rectified flow: the prior is exact), and with Hutchinson
    our log_likelihood's value for the same probe."""
    pytest.importorskip("flow_matching")
    import torch

    import scoresolve as ss

    mod = _likelihood_cost_module()
    sde, score, velocity, x = mod.make_problem(name, 3)
    eps = torch.randint(0, 2, (1,) + tuple(x.shape), generator=torch.Generator().manual_seed(2)).double() * 2 - 1
    ours = ss.log_likelihood(score, sde, x, rtol=1e-9, atol=1e-9, time_variable="t",
                             generator=torch.Generator().manual_seed(2))  # the same probe as eps
    dtype, randn_like = torch.get_default_dtype(), torch.randn_like
    lp, calls, sec = mod.flow_matching_baseline(velocity, sde, x, eps, 1e-5, 1e-9, 1e-9)
    assert torch.get_default_dtype() == dtype and torch.randn_like is randn_like  # the probe patch is undone
    assert calls > 20 and sec > 0 and lp.dtype == torch.float64
    torch.testing.assert_close(lp, ours.log_prob, rtol=0, atol=1e-5)  # measured <= 1.2e-6 (log p ~ -10)
    td, _, _ = mod.torchdiffeq_baseline(velocity, sde, x, eps, 1e-5, 1e-9, 1e-9)
    torch.testing.assert_close(td, ours.log_prob, rtol=0, atol=1e-5)
    if sde.velocity_form:
        dim, k, scale_range, full, _ = mod.PROBLEMS[name]
        gm = ss.GaussianMixture.random(dim, k, seed=0, scale_range=scale_range, full=full)
        exact, _, _ = mod.flow_matching_baseline(velocity, sde, x, eps, 1e-5, 1e-9, 1e-9, exact=True)
        torch.testing.assert_close(exact, gm.log_prob(x, 1e-5, sde), rtol=0, atol=1e-5)


def test_likelihood_matched_fit_reads_planted_power_laws():
    """The fitted matched-error reading recovers tol* and the work of exact power laws (no noise)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import likelihood_matched_fit as lmf

    tols = [1e-6 * 10 ** (k / 4) for k in range(9)]
    # the peer: max error 1e3 tol, mean 10 tol, calls 10 tol^-0.2; ours: max 100 tol, mean 2 tol (10x and 5x
    # smaller: the mean governs, tol* = 5 x 1e-5), NFE 5 tol^-0.2, calls 8 tol^-0.2
    peer = [(t, 10 * t ** -0.2, 1e3 * t, 10 * t) for t in tols]
    ours = [(t, 5 * t ** -0.2, 8 * t ** -0.2, 100 * t, 2 * t) for t in tols]
    m = lmf.matched(peer, ours, 1e-5)
    assert m["tol"] == pytest.approx(5e-5, rel=1e-9)
    assert m["peer_max"] == pytest.approx(1e-2) and m["peer_mean"] == pytest.approx(1e-4)
    assert m["nfe"] == pytest.approx(5 * 5e-5 ** -0.2) and m["calls"] == pytest.approx(8 * 5e-5 ** -0.2)
    assert m["peer_calls"] == pytest.approx(10 * 1e-5 ** -0.2)
    assert m["calls_ratio"] == pytest.approx(8 * 5e-5 ** -0.2 / (10 * 1e-5 ** -0.2))


def test_likelihood_matched_fit_smoke(tmp_path):
    out = tmp_path / "fit.json"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "likelihood_matched_fit.py"), "--problems", "2-D smooth",
           "--batch", "4", "--tols", "3e-5", "1e-4", "3e-4", "--ref-tol", "1e-7", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["2-D smooth"]
    assert set(res) == {"sample", "batch"}
    for m in res.values():
        assert m["tol"] > 0 and m["nfe"] > 0 and m["calls"] >= m["nfe"] * 0.99 and m["peer_calls"] > 0


def test_plot_peers_reads_the_stored_comparison(tmp_path):
    """plot_peers.py on a stored peers_few_step.py result: its printed medians and worst cases are the summary's."""
    import statistics

    src = ROOT / "benchmarks" / "results" / "peers_few_step_b64_calibrated.json"
    out = tmp_path / "p.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plot_peers.py"), str(src), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 10_000
    summary = json.loads(src.read_text())["summary_by_metric"]
    ratios = summary["median"]["calibrated"]["5"]["oracle"]
    assert f"median calibrated   5 NFE: median {statistics.median(ratios):.2f} worst {min(ratios):.2f}" in res.stdout
    assert f"{summary['rms']['default']['10']['oracle_median']:.2f}" in res.stdout


def test_peers_few_step_writes_after_every_problem_and_resumes(tmp_path):
    """peers_few_step.py --json is written after each problem; --resume keeps the finished ones as they are and runs
    the rest; a file of other settings is refused."""
    out = tmp_path / "r.json"
    base = [sys.executable, str(ROOT / "benchmarks" / "peers_few_step.py"), "--seed0", "3", "--batch", "4", "--nfe",
            "5", "--ref-tol", "1e-6", "--json", str(out)]
    res = subprocess.run(base + ["--problems", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    first = json.loads(out.read_text())
    assert first["complete"] and [p["name"] for p in first["problems"]] == ["mix3-rf"]
    res = subprocess.run(base + ["--problems", "2", "--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed 1 finished problems" in res.stdout
    both = json.loads(out.read_text())
    assert [p["name"] for p in both["problems"]] == ["mix3-rf", "mix4-vp"]
    assert both["problems"][0]["by_metric"] == first["problems"][0]["by_metric"]
    assert len(both["summary_by_metric"]["median"]["default"]["5"]["oracle"]) == 2
    res = subprocess.run(base[:5] + ["8"] + base[6:] + ["--problems", "2", "--resume"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0 and "other settings (batch)" in res.stderr


def test_flip_rates_smoke():
    """flip_rates.py on a small mixture: one line per configuration, the flips counted out of the draws."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flip_rates.py"), "--seed", "2", "--nfe", "5", "--batch", "16",
           "--no-calibrate", "--ours", "ddim"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "flips" in ln]
    assert len(lines) == 2 and all(ln.rstrip().endswith("of 16") for ln in lines)
