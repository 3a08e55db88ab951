"""scoresolve.evaluation.distributed: shards over ranks (threads with explicit rank/world_size, torchrun with gloo)
give exactly the records of one process."""

import json
import os
import subprocess
import sys
import threading

import pytest
from _evaluation_helpers import WORKER, assert_same_records, lines_of, reference, subprocess_env
from _evaluation_worker import make_fn, make_problem

from scoresolve.evaluation import decode_record, evaluate_dataset, read_records, record_path

pytestmark = pytest.mark.timeout(120)


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
        rank1 = [decode_record(ln + b"\n") for ln in f.read().split(b"\n")[:-1]]
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
