"""The on-disk stores of named records (tuned grids, moment estimates): where they live, which names are allowed,
and the atomic JSON write. One place, so that every store behaves alike."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def store_dir(directory: str | os.PathLike | None, env: str, sub: str) -> Path:
    """``directory``, else ``$env``, else ``$XDG_CACHE_HOME/scoresolve/<sub>`` (``~/.cache/scoresolve/<sub>``)."""
    if directory is not None:
        return Path(directory)
    value = os.environ.get(env)
    if value:
        return Path(value)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "scoresolve" / sub


def check_name(name: str, what: str) -> str:
    """``name`` if it is a valid record name (1-128 letters, digits, '.', '_', '-', not starting with the last three),
    else ValueError naming ``what`` the record is."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a {what} name must be 1-128 characters of letters, digits, '.', '_' or '-' (not starting "
                         f"with '.', '_' or '-'), got {name!r}")
    return name


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` (parents created) through a temporary file: readers never see a
    half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def read_record(where: Path, name: str, what: str, env: str, from_dict: Callable[[dict], Any]) -> Any:
    """The record saved as ``<where>/<name>.json``, read through ``from_dict`` and named ``name``: FileNotFoundError
    listing the saved names (``env`` is the variable that moves the store), ValueError naming an invalid file."""
    path = where / f"{check_name(name, what)}.json"
    if not path.is_file():
        have = sorted(p.stem for p in where.glob("*.json")) if where.is_dir() else []
        raise FileNotFoundError(f"no saved {what} {name!r} in {where} (set {env} or pass directory=); saved: {have}")
    try:
        record = from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid saved {what}: {e}") from e
    record.name = name
    return record
