"""Helper process for the tests of scoresolve.evaluation (tests/test_evaluation_*.py): evaluate an analytic
Gaussian-mixture dataset with an exact per-batch function (optionally slowed down, optionally with generator noise),
as a plain process or under torchrun.

Run: python tests/_evaluation_worker.py OUT_DIR [--n N] [--repeats R] [--batch-size B] [--sleep S] [--noise E]
Under torchrun (WORLD_SIZE > 1 in the environment) it joins a gloo process group through env://.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import scoresolve as ss
from scoresolve.evaluation import evaluate_dataset

T_EPS = 1e-5
if os.environ.get("SCORESOLVE_TEST_THREADS"):  # the parent test's thread count (see subprocess_env)
    torch.set_num_threads(int(os.environ["SCORESOLVE_TEST_THREADS"]))


def make_problem(n: int, dim: int = 3, seed: int = 0):
    """(mixture, sde, data [n, dim] float64): a small exact model and samples of it."""
    sde = ss.VPSDE()
    gm = ss.GaussianMixture.random(dim, 3, seed=seed)
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return gm, sde, x


def make_fn(gm, sde, sleep: float = 0.0, noise: float = 0.0):
    """Exact log p_{t_eps}(x) plus ``noise`` * N(0, 1) drawn from the batch generator (standing in for Hutchinson
    probes, so that results depend on the generator's seeding), and a per-sample 'nfe'."""

    def fn(x: torch.Tensor, generator: torch.Generator) -> dict:
        if sleep:
            time.sleep(sleep)
        lp = gm.log_prob(x, T_EPS, sde)
        if noise:
            lp = lp + noise * torch.randn(lp.shape, generator=generator, dtype=lp.dtype)
        nfe = 20 + torch.round(10 * x.abs().flatten(1).sum(1))
        return {"log_prob": lp, "nfe": nfe}

    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    initialised = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo", init_method="env://")
        initialised = True
    try:
        gm, sde, x = make_problem(args.n)
        s = evaluate_dataset(
            x,
            args.out_dir,
            fn=make_fn(gm, sde, args.sleep, args.noise),
            batch_size=args.batch_size,
            repeats=args.repeats,
            seed=args.seed,
            progress=False,
        )
        rank = torch.distributed.get_rank() if initialised else 0
        line = json.dumps({"rank": rank, "summary": s.to_dict()})
        print(line, flush=True)
        # ranks share one stdout pipe, where their lines can interleave: each also writes its own file (atomically,
        # beside the run directory so the evaluator never scans it)
        path = f"{args.out_dir.rstrip(os.sep)}.summary-rank{rank}.json"
        with open(path + ".tmp", "w") as fh:
            fh.write(line)
        os.replace(path + ".tmp", path)
    finally:
        if initialised:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
