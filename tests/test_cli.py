"""The scoresolve command: the main job (compare) and sample, at small sizes."""

import pytest

from scoresolve.cli import main


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
