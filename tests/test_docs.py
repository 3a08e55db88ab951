"""The documentation site builds with ``mkdocs build --strict`` (every warning, e.g. a broken mkdocstrings
reference or a docstring griffe cannot parse, is an error). Skipped without mkdocs and mkdocstrings[python]."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mkdocs_build_strict(tmp_path: Path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("scoresolve.sample", "scoresolve.log_likelihood", "scoresolve.ScoreModel", "scoresolve.VPSDE",
                 "scoresolve.adapters.from_diffusers", "scoresolve.compare.work_precision"):
        assert f'id="{name}"' in api, f"{name} is missing from the API page"
    assert (site / "guide" / "index.html").exists()
