"""Shared helpers of the tests of scoresolve.evaluation (tests/test_evaluation_*.py and the CLI tests)."""

import math
import os
from dataclasses import dataclass

import torch
from _evaluation_worker import make_fn, make_problem

from scoresolve.evaluation import evaluate_dataset, read_records

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_evaluation_worker.py")


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
    # the manifest records torch's thread count (it changes a CPU solve's rounding): the worker takes this process's,
    # so that resuming its run here is the same run (pytest-xdist workers and a fresh process may differ)
    env["SCORESOLVE_TEST_THREADS"] = str(torch.get_num_threads())
    return env


@dataclass
class FakeResult:  # the fields of scoresolve.likelihood.LikelihoodResult that matter here
    log_prob: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    nfe: torch.Tensor
    std_error: torch.Tensor | None = None


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
