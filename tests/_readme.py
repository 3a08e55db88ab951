"""The shell commands of a Markdown file (README.md): every line of its ```bash / ```sh blocks and every ``$ `` line
of its ```console blocks, in order, with the ``<!-- ci: NAME -->`` marker a block may carry on the line before it.

The README's two commands are marked (``main-job``, ``tests``): CI runs them as written, extracting them with
``python3 tests/_readme.py NAME`` (standard library only: it runs before anything is installed); the tests run every
other command (tests/test_readme_commands.py).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL = ("bash", "sh", "shell", "console")
_MARKER = re.compile(r"^<!--\s*ci:\s*([\w-]+)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced shell block: ``line`` (1-based, of its first command line), ``commands`` as written (comments
    included, continuation lines joined), ``marker`` (the NAME of a ``<!-- ci: NAME -->`` line before it, or
    None)."""

    path: Path
    line: int
    commands: tuple[str, ...]
    marker: str | None


def _commands(lang: str, body: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in body:
        ln = raw.rstrip()
        if lang == "console":
            if ln.startswith("$ "):
                ln = ln[2:]
            elif ln.startswith("> ") and pending:
                ln = ln[2:]
            else:
                continue  # output shown after a command
        if not pending and (not ln.strip() or ln.lstrip().startswith("#")):
            continue
        if ln.endswith("\\"):
            pending += ln[:-1]
            continue
        out.append((pending + ln).strip())
        pending = ""
    if pending:
        raise ValueError(f"a command ends with a line continuation: {pending!r}")
    return out


def shell_blocks(path: Path = README) -> list[Block]:
    """Every fenced shell block of ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence[3:].strip() in SHELL:
            lang, start, body = fence[3:].strip(), i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((ln.strip() for ln in reversed(lines[: start - 1]) if ln.strip()), "")
            m = _MARKER.match(prev)
            blocks.append(Block(path, start + 1, tuple(_commands(lang, body)), m.group(1) if m else None))
        i += 1
    return blocks


def marked_command(name: str, path: Path = README) -> str:
    """The one command of the block marked ``<!-- ci: NAME -->`` (ValueError unless exactly one block with exactly
    one command carries it)."""
    found = [b for b in shell_blocks(path) if b.marker == name]
    if len(found) != 1 or len(found[0].commands) != 1:
        raise ValueError(f"{path.name} needs exactly one shell block of one command marked <!-- ci: {name} -->, "
                         f"found {[b.commands for b in found]}")
    return found[0].commands[0]


def strip_comment(command: str) -> str:
    """The command without a trailing ``# comment`` (the README's commands quote no ``#``)."""
    return re.sub(r"\s+#.*$", "", command).strip()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/_readme.py MARKER   (prints the README command marked <!-- ci: MARKER -->)")
    try:
        print(marked_command(sys.argv[1]))
    except ValueError as e:
        sys.exit(f"tests/_readme.py: {e}")
