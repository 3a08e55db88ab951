"""The regression benchmark in quick mode against the baseline measured before the solver redesign: no solver's
error at a given NFE or tolerance, and no NFE, may grow (benchmarks/regression.py)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_solver_got_worse_than_the_recorded_baseline(tmp_path):
    out = tmp_path / "now.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "regression.py"), "--quick", "--out", str(out),
           "--compare", str(ROOT / "benchmarks" / "results" / "regression_baseline_quick.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = json.loads(out.read_text())["entries"]
    assert len(entries) > 300
    assert entries["vp/unipc/nfe=10/error"] < 0.1 and entries["vp/dopri5/tol=1e-05/nfe_mean"] > 20
    assert "0 worse" in proc.stdout
