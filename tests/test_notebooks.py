"""The example notebooks in notebooks/: committed without outputs, and each one runs top to bottom.

Execution needs nbclient, nbformat and ipykernel (skipped otherwise). The notebooks run in small mode
(``SCORESOLVE_NB_SMALL=1``) with one intra-op thread, each in its own temporary working directory; the last cell of
each prints a ``RESULT name=value`` line that is checked here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]

# name -> (result key, check of the printed value)
EXPECTED = {
    # PF-ODE log-likelihood (exact divergence, prior term swapped for the exact p_T) vs the mixture's log-density
    "quickstart": ("max_abs_logp_error", lambda v: 0.0 <= float(v) < 2e-3),
    # the best DPM-Solver++(2M) run is accurate to a few hundredths against the float64 reference
    "solver_comparison": ("dpmpp_2m_best_error", lambda v: 0.0 < float(v) < 0.5),
    # the shipped digits model beats a uniform density (log2(17) = 4.09 bits/dim) by a wide margin
    "digits_bpd": ("mean_bpd", lambda v: 0.5 < float(v) < 3.5),
    "diffusers_plugin": ("finite_logp", lambda v: v == "True"),
}


def test_notebooks_found():
    assert set(NAMES) == set(EXPECTED), f"notebooks/ holds {NAMES}; update EXPECTED in {__file__}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_has_no_outputs(path: Path):
    """Notebooks are committed stripped: no outputs, no execution counts (plain JSON, no nbformat needed)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: code cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution_count"


def _stream_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out.get("text", ""))
    return "".join(parts)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    if path.stem == "digits_bpd":
        pytest.importorskip("sklearn")
    if path.stem == "diffusers_plugin":
        pytest.importorskip("diffusers")

    # the kernel inherits the environment: small sizes, one thread, a headless matplotlib, no network
    monkeypatch.setenv("SCORESOLVE_NB_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = _stream_text(nb)
    key, check = EXPECTED[path.stem]
    m = re.search(rf"^RESULT {re.escape(key)}=(\S+)\s*$", text, flags=re.MULTILINE)
    assert m is not None, f"{path.name} printed no 'RESULT {key}=...' line; stdout was:\n{text}"
    assert check(m.group(1)), f"{path.name}: {key} = {m.group(1)} is out of the expected range"
    # nothing written outside the temporary working directory (solver_comparison writes its figure there)
    if path.stem == "solver_comparison":
        assert (tmp_path / "work_precision.png").exists()
