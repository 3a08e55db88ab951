"""Every shell command of README.md runs as written (issue 29): each shell block's commands in order, in a fresh
directory, with ``scoresolve`` this interpreter's package. The two marked commands (``<!-- ci: main-job -->``,
``<!-- ci: tests -->``: they install packages) are run by .ci/run, which extracts them with tests/_readme.py."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _readme import README, ROOT, marked_command, shell_blocks, strip_comment

# The only changes to the README's commands: a command that takes minutes at its defaults gets these options appended.
OVERRIDES = {
    # 256 held-out digits at rtol 1e-5: ~100 CPU-seconds (~4.5 min on a loaded 2-core machine)
    "scoresolve likelihood --model digits": ["--num-samples", "8"],
}
# Files a block needs besides the README's commands: mynets.py is the user guide's `--model-spec` example (the
# README's sample command names it); it is taken from docs/guide.md's block that starts with "# mynets.py".
GUIDE = ROOT / "docs" / "guide.md"
# What each command must leave behind (its output file, or a line of its report): exit status 0 alone is not enough.
EXPECT = {
    "scoresolve train --data moons --out runs/moons": ("file", "runs/moons/model.pt"),
    "scoresolve compare --checkpoint runs/moons/model.pt": ("stdout", r"(?m)^dopri5 +rtol=0\.001 "),
    "scoresolve sample --model-spec mynets:make --shape 2 --nfe 10 --out x.pt": ("file", "x.pt"),
    "scoresolve likelihood --model digits": ("stdout", r"bits/dim \d\.\d+ \+- "),
}
MARKED = {"main-job", "tests"}

BLOCKS = [b for b in shell_blocks(README) if b.marker is None]


def _guide_block(first_line: str) -> str:
    text = GUIDE.read_text(encoding="utf-8")
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        if m.group(1).startswith(first_line):
            return m.group(1)
    raise AssertionError(f"docs/guide.md has no python block starting {first_line!r}")


def test_readme_commands_are_found_and_overrides_are_current():
    every = shell_blocks(README)
    assert {b.marker for b in every} - {None} == MARKED
    assert marked_command("tests") == "bash .ci/run"
    main_job = marked_command("main-job")
    assert main_job.startswith("pip install ") and main_job.endswith("&& scoresolve compare")
    commands = [strip_comment(c) for b in BLOCKS for c in b.commands]
    assert len(commands) >= 4 and all(c.startswith("scoresolve ") for c in commands)
    # no stale entry: every override and expectation names a README command, and every command is checked
    assert set(OVERRIDES) <= set(commands) and set(EXPECT) == set(commands)


def test_marker_extraction_for_ci(tmp_path):
    """.ci/run's extraction: prints the marked command, refuses a missing or ambiguous marker with status 1."""
    ok = subprocess.run([sys.executable, str(ROOT / "tests" / "_readme.py"), "main-job"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == marked_command("main-job")
    bad = subprocess.run([sys.executable, str(ROOT / "tests" / "_readme.py"), "nosuch"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "<!-- ci: nosuch -->" in bad.stderr and not bad.stdout
    doc = tmp_path / "x.md"
    doc.write_text("<!-- ci: a -->\n```bash\necho 1 \\\n  2   # two\n\n```\n\n"
                   "<!-- ci: a -->\n```console\n$ ls\nout\n```\n```sh\n# only a comment\nfalse\n```\n")
    blocks = shell_blocks(doc)
    assert [(b.marker, b.commands) for b in blocks] == [("a", ("echo 1   2   # two",)), ("a", ("ls",)),
                                                        (None, ("false",))]
    with pytest.raises(ValueError, match="exactly one shell block"):
        marked_command("a", doc)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_command_runs_as_written(block, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "scoresolve"  # `scoresolve` is this interpreter's package, wherever pip put the script
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m scoresolve \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mynets.py").write_text(_guide_block("# mynets.py"))
    pkg = str(Path(__import__("scoresolve").__file__).resolve().parent.parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(p for p in (pkg, os.environ.get("PYTHONPATH")) if p),
           "MPLBACKEND": "Agg"}
    for command in block.commands:
        key = strip_comment(command)
        run = key + "".join(f" {a}" for a in OVERRIDES.get(key, ()))
        proc = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True, timeout=840)
        assert proc.returncode == 0, f"{run}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
        kind, what = EXPECT[key]
        if kind == "file":
            assert (work / what).is_file() and (work / what).stat().st_size > 0, f"{run} wrote no {what}"
        else:
            assert re.search(what, proc.stdout), f"{run}: no {what!r} in\n{proc.stdout[-2000:]}"
