"""scoresolve.evaluation.records: the crash-safe record store (checksummed lines, torn and corrupt lines found
and recomputed, a SIGKILL mid-run loses nothing) and the per-rank lock against concurrent runs."""

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from _evaluation_helpers import WORKER, assert_same_records, lines_of, reference, subprocess_env
from _evaluation_worker import make_fn, make_problem

from scoresolve.evaluation import decode_record, encode_record, evaluate_dataset, read_records, record_path
from scoresolve.evaluation.records import RankLock

pytestmark = pytest.mark.timeout(120)


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
    assert lines[-1] == b"" and len(lines) == 21 and all(decode_record(ln + b"\n") for ln in lines[:-1])
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
    good = encode_record({"i": 1, "r": 0, "log_prob": -1.5})
    assert decode_record(good) == {"i": 1, "r": 0, "log_prob": -1.5}
    assert decode_record(good[:-1]) is None
    assert decode_record(good.replace(b"-1.5", b"-1.6")) is None


def test_a_second_run_of_the_same_rank_is_refused_while_the_first_one_runs(tmp_path):
    ref = reference(tmp_path)
    out = str(tmp_path / "busy")
    proc = subprocess.Popen([sys.executable, WORKER, out, "--sleep", "0.25", "--noise", "0.01"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gm, sde, x = make_problem(40)
    fn = make_fn(gm, sde, noise=0.01)
    calls = []

    def counted(xb, g):
        calls.append(xb.shape[0])
        return fn(xb, g)

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not (os.path.isdir(out) and lines_of(out) >= 8):
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        with pytest.raises(RuntimeError, match=rf"another run is evaluating rank 0 in (.|\n)*pid {proc.pid} on host"):
            evaluate_dataset(x, out, fn=counted, batch_size=4, repeats=2, progress=False)
        assert calls == []  # refused before computing anything
        proc.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    evaluate_dataset(x, out, fn=counted, batch_size=4, repeats=2, progress=False)
    assert 0 < sum(calls) < 80 and lines_of(out) == 80
    assert_same_records(read_records(out), ref)


def test_the_lock_is_per_rank_and_released_on_errors(tmp_path):
    gm, sde, x = make_problem(12)
    fn = make_fn(gm, sde)
    out = str(tmp_path / "run")
    os.makedirs(out)
    with RankLock(out, 0):
        with pytest.raises(RuntimeError, match="another run is evaluating rank 0"):
            evaluate_dataset(x, out, fn=fn, batch_size=4, progress=False)
        # another rank of the same directory is not blocked by rank 0's lock (it waits for rank 0's records)
        with pytest.raises(TimeoutError, match="waited 0.2 s for other ranks"):
            evaluate_dataset(x, out, fn=fn, batch_size=4, rank=1, world_size=2, progress=False, wait_timeout=0.2,
                             poll_interval=0.05)

    def crashing(xb, g):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_dataset(x, out, fn=crashing, batch_size=4, progress=False)
    s = evaluate_dataset(x, out, fn=fn, batch_size=4, progress=False)  # the crashed run released its lock
    assert s.count == 12 and lines_of(out) == 12
