"""Every usage error of the scoresolve command ends with exit status 2 and a one-line message, never a traceback,
including those found while a command runs (issue 29); Ctrl-C exits with 130 and one line; a resumable run's
identity covers --model-arg and the thread count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import scoresolve as ss
from scoresolve.cli import main
from scoresolve.evaluation.records import RankLock

pytestmark = pytest.mark.timeout(300)

USER_MODULE = '''
import torch
import scoresolve as ss


def make(scale=1.0, hidden=4):
    """A plain function (no torch module, so no weights fingerprint) whose scale changes its output."""
    sde = ss.VPSDE()
    return (lambda x, t: -scale * x), sde


def make_nan():
    """A network whose output is NaN everywhere."""
    return (lambda x, t: x * float("nan")), ss.VPSDE()


def make_net(dim=2):
    torch.manual_seed(0)
    net = torch.nn.Linear(dim, dim)
    sde = ss.VPSDE()
    return ss.ScoreModel(lambda x, t: net(x), sde, prediction="eps"), sde
'''


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with data files and the module ``cli_err_net`` on sys.path."""
    (tmp_path / "cli_err_net.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_err_net", raising=False)
    monkeypatch.chdir(tmp_path)
    torch.save(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 3, tmp_path / "cont.pt")
    torch.save(torch.full((4, 2), float("nan")), tmp_path / "nan.pt")
    torch.save(torch.zeros(1, 3, 256, 256), tmp_path / "big.pt")
    torch.save(torch.empty(0, 2), tmp_path / "empty.pt")
    torch.save(torch.full((4, 2), 1e30), tmp_path / "huge.pt")
    torch.save(torch.arange(8.0).reshape(4, 2) / 7 * 2 - 1, tmp_path / "grid8.pt")  # 8 levels in [-1, 1]
    return tmp_path


LL = ["likelihood", "--dim", "2", "--components", "2", "--num-samples", "4", "--batch-size", "4", "--rtol", "1e-2",
      "--atol", "1e-2", "--quiet", "--threads", "1"]
SAMPLE = ["sample", "--dim", "2", "--components", "2", "--batch", "4", "--quiet", "--threads", "1"]


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``scoresolve ARGV`` in this process."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_usage_error(argv, capsys, match):
    rc, _, err = run(argv, capsys)
    assert rc == 2, (argv, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: scoresolve"), err
    msg = [ln for ln in lines if ": error: " in ln]
    assert len(msg) == 1 and lines[-1] == msg[0], err  # one line of message, last
    assert match in msg[0], (match, msg[0])


# every usage error listed in issue 29 (and its neighbours): (command line, what the message says)
TABLE = [
    (["sample", "--solver", "torchdiffeq:foo"], "unknown torchdiffeq method 'foo'; available: adaptive_heun"),
    (["sample", "--solver", "torchsde:foo"], "unknown torchsde method 'foo'"),
    ([*SAMPLE, "--solver", "dpmpp_2m", "--diffusion", "1"], "integrates the probability-flow ODE: drop --diffusion"),
    ([*SAMPLE, "--solver", "torchdiffeq:rk4", "--diffusion", "0.5"], "probability-flow ODE"),
    ([*SAMPLE, "--solver", "torchsde:euler", "--diffusion", "0"], "integrates an SDE: --diffusion must be > 0"),
    ([*SAMPLE, "--seed", str(2**70)], "a seed must lie in [0, "),
    ([*SAMPLE, "--seed", "-1"], "a seed must lie in [0, "),
    ([*SAMPLE, "--out", "/dev/full"], "/dev/full: No space left on device"),
    ([*SAMPLE, "--out", "x.png"], "a PNG grid needs image samples"),
    ([*SAMPLE, "--out", "grid.jpg"], "not as another image format"),
    ([*SAMPLE, "--solver", "euler", "--nfe", "1000000000"], "a grid of 1000000000 steps needs about 238 GiB"),
    ([*SAMPLE, "--device", "cuda"] if not torch.cuda.is_available() else [*SAMPLE, "--device", "cuda:99"],
     "--device"),
    ([*LL, "--device", "cuda"] if not torch.cuda.is_available() else [*LL, "--device", "cuda:99"], "CUDA"),
    ([*LL, "--data", "cont.pt", "--bits", "8"], "data lie outside the declared data_range"),
    ([*LL, "--data", "cont.pt", "--num-levels", "8", "--data-range", "-20", "20"], "not on the"),
    ([*LL, "--data", "nan.pt"], "--data holds non-finite values (NaN or inf) in 4 of its 4 samples"),
    ([*LL, "--data", "cont.pt", "--probes", "100000"], "--probes 100000 takes 100000 VJPs per evaluation"),
    ([*LL, "--data", "empty.pt"], "'empty.pt' holds no samples (a tensor of shape [0, 2])"),
    ([*LL, "--data", "big.pt", "--divergence", "exact"], "--divergence exact on D=196608 dimensions"),
    ([*LL, "--model-spec", "cli_err_net:make", "--model-arg", "bogus=1", "--data", "cont.pt"],
     "unexpected keyword argument 'bogus'"),
    (["train", "--data", "moons", "--steps", "30", "--batch-size", "16", "--lr", "1e9", "--out", "tr", "--quiet",
      "--threads", "1"], "training diverged with --lr 1e+09"),
    (["train", "--data", "moons", "--model-arg", "bogus=1", "--out", "tr2"], "unexpected keyword argument 'bogus'"),
    (["compare", "--solvers", "dpmpp_2m@foo"], "unknown grid 'foo' in 'dpmpp_2m@foo'"),
    (["compare", "--solvers", "nosuch"], "unknown solver 'nosuch'"),
    (["compare", "--solvers", "torchdiffeq:nosuch"], "unknown torchdiffeq method 'nosuch'"),
]


@pytest.mark.parametrize("argv, match", TABLE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in TABLE])
def test_usage_error_is_one_line_with_status_2(work, capsys, argv, match):
    assert_usage_error(argv, capsys, match)


def test_resume_refusals_and_the_lock_are_usage_errors(work, capsys):
    out = ["--out-dir", "run"]
    assert run([*LL, *out], capsys)[0] == 0
    # every resume mismatch: settings, seed, data, the model and its factory arguments, the thread count
    for extra, match in [
        (["--rtol", "1e-3"], "cannot resume in 'run': its manifest does not match"),
        (["--seed", "1"], "seed: stored 0, now 1"),
        (["--data", "cont.pt"], "num_samples: stored 4, now 6"),
        (["--threads", "2"], "threads: stored 1, now 2"),
    ]:
        assert_usage_error([*LL, *out, *extra], capsys, match)
    # the concurrent-run lock
    with RankLock("run", 0):
        assert_usage_error([*LL, *out], capsys, "another run is evaluating rank 0 in 'run'")
    # a corrupt or null manifest
    for content, match in [("{oops", "is not valid JSON"), ("null", "holds NoneType, not a manifest")]:
        with open("run/manifest.json", "w") as f:
            f.write(content)
        assert_usage_error([*LL, *out], capsys, match)
    # records of another run under a deleted manifest
    os.remove("run/manifest.json")
    assert_usage_error([*LL, *out, "--rtol", "1e-3"], capsys, "records were computed by another run")


def test_model_arg_is_part_of_the_runs_identity(work, capsys):
    spec = [*LL, "--model-spec", "cli_err_net:make", "--data", "cont.pt", "--out-dir", "spec"]
    assert run([*spec, "--model-arg", "scale=1"], capsys)[0] == 0
    assert run([*spec, "--model-arg", "scale=1"], capsys)[0] == 0  # the same run resumes
    assert_usage_error([*spec, "--model-arg", "scale=2"], capsys,
                       'settings: model_id: stored "cli_err_net:make(scale=1)')
    with open("spec/manifest.json") as f:
        assert json.load(f)["model_id"].startswith("cli_err_net:make(scale=1); VPSDE(")


def test_resume_takes_the_runs_thread_count(work, capsys):
    assert run([*LL, "--out-dir", "t", "--threads", "1"], capsys)[0] == 0
    argv = [a for a in LL if a not in ("--threads",)]
    argv.remove("1")  # drop "--threads 1": the resume takes the stored count
    rc, out, err = run([*argv, "--out-dir", "t"], capsys)
    assert rc == 0, err
    assert torch.get_num_threads() == 1
    with open("t/manifest.json") as f:
        assert json.load(f)["threads"] == 1


def test_each_network_has_its_own_default_out_dir(work, capsys):
    assert run(LL, capsys)[0] == 0
    assert os.path.isfile("likelihood_eval/manifest.json")
    rc, _, err = run([*LL, "--model-spec", "cli_err_net:make_net", "--data", "cont.pt"], capsys)
    assert rc == 0, err
    assert os.path.isfile("likelihood_eval_cli_err_net_make_net/manifest.json")


def test_sample_png_of_images_is_a_real_png(work, capsys):
    img = work / "img.py"
    img.write_text("import scoresolve as ss\n\ndef make():\n    sde = ss.VPSDE()\n"
                   "    return (lambda x, t: -x), sde\n")
    rc, _, err = run(["sample", "--model-spec", f"{img}:make", "--shape", "1,4,4", "--batch", "4", "--nfe", "3",
                      "--quiet", "--out", "g.png", "--threads", "1"], capsys)
    assert rc == 0, err
    assert (work / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_spec_help_says_it_runs_code(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs MODULE's code with your permissions" in text and "only code you trust" in text


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(ss.__file__)))}
    out = tmp_path / "ll"
    proc = subprocess.Popen([sys.executable, "-m", "scoresolve", "likelihood", "--num-samples", "4000", "--dim", "16",
                             "--batch-size", "8", "--rtol", "1e-7", "--atol", "1e-7", "--out-dir", str(out),
                             "--quiet", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 120
        while not list(out.glob("records-rank*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "scoresolve likelihood: interrupted (run it again to resume)"]


def test_compare_on_a_network_announces_its_reference(work, capsys):
    rc, out, err = run(["compare", "--model-spec", "cli_err_net:make_net", "--shape", "2", "--nfe", "4", "--tol",
                        "1e-2", "--solvers", "euler", "dopri5", "--out", "", "--quiet", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "reference: dopri5 at rtol=atol=1e-06 of 32 samples" in err and "--ref-tol loosens it" in err
    assert ", batch 32, " in out and "rtol=atol=1e-06 (mean NFE" in out
    rc, out, err = run(["compare", "--model-spec", "cli_err_net:make_net", "--shape", "2", "--nfe", "4", "--tol",
                        "1e-2", "--solvers", "euler", "--out", "", "--quiet", "--threads", "1", "--ref-tol", "1e-3",
                        "--batch", "8"], capsys)
    assert rc == 0 and "rtol=atol=0.001" in out and ", batch 8, " in out


def test_a_missing_optional_dependency_is_one_line(work, capsys, monkeypatch):
    from scoresolve import data

    def missing():
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn (or scoresolve[models])")

    monkeypatch.setattr(data, "_import_sklearn_digits", missing)
    assert_usage_error(["likelihood", "--model", "digits", "--num-samples", "2", "--quiet"], capsys,
                       "needs scikit-learn: pip install scikit-learn")


def test_compare_reports_an_unstable_solve_as_refused(work, capsys):
    rc, out, err = run(["compare", "--sde", "ve", "--dim", "2", "--components", "2", "--batch", "8", "--nfe", "10",
                        "50", "--tol", "1e-3", "--solvers", "heun", "dpmpp_2m", "--out", "plot.png", "--quiet",
                        "--threads", "1"], capsys)
    assert rc == 0, err
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith(("heun", "dpmpp_2m"))}
    assert "refused: unstable on this grid" in rows[("heun", "nfe=10")]
    assert "refused" not in rows[("heun", "nfe=50")] and "refused" not in rows[("dpmpp_2m", "nfe=10")]
    assert (work / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [
    [*LL, "--data", "huge.pt"],  # finite data far beyond any scale: the solve overflows
    [*SAMPLE, "--model-spec", "cli_err_net:make_nan", "--shape", "2", "--nfe", "3"],
    [*SAMPLE, "--solver", "dopri5", "--model-spec", "cli_err_net:make_nan", "--shape", "2"],
], ids=["likelihood-huge-data", "sample-nan-net", "sample-adaptive-nan-net"])
def test_a_failed_solve_is_one_line_with_status_1(work, capsys, argv):
    rc, _, err = run(argv, capsys)
    assert rc == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scoresolve {argv[0]}: error: the solve failed: "), err
    assert "non-finite values" in lines[0], err
