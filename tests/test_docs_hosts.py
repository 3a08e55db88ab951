"""The Python snippets of docs/hosts.md run as they are, in order, in one namespace (tiny networks built from configs,
no downloads); a snippet whose first line is ``# not run`` (a hub download, ComfyUI) is only compiled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "hosts.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_hosts_page_snippets_run(capsys):
    pytest.importorskip("diffusers")
    found = snippets()
    assert len(found) >= 8
    namespace: dict = {"__name__": "docs_hosts"}
    ran = 0
    for i, code in enumerate(found):
        compiled = compile(code, f"{DOC.name}[snippet {i}]", "exec")
        if code.lstrip().startswith("# not run"):
            continue
        exec(compiled, namespace)  # noqa: S102 - the documentation's own examples
        ran += 1
    assert ran >= 6
    out = capsys.readouterr().out
    assert "torch.Size([16, 4])" in out  # the k-diffusion sampler snippet printed its samples' shape
