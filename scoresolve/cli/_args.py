"""Argument types and checks shared by the commands: every bad value, missing input file and unusable output path
is an argparse usage error (exit status 2) found before a command starts its work."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Mapping, Sequence

import torch

Check = Callable[[argparse.Namespace], None]


class UsageError(Exception):
    """Raised by a check: the parser turns it into a usage error."""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that runs its checks (cross-option rules, see `add_check`) after parsing, as usage errors.

    Sub-parsers made by ``add_subparsers`` are CommandParsers too, so each command checks its own options.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[Check] = []

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            try:
                check(namespace)
            except UsageError as e:
                self.error(str(e))
        return namespace, extras


def run_module(module: str, add_args: Callable[[argparse.ArgumentParser], Any], argv: Sequence[str] | None) -> int:
    """``python -m MODULE ARGV``: parse with a stand-alone parser of one command (described by the first line of
    the module's docstring) and run it."""
    import importlib

    doc = importlib.import_module(module).__doc__ or ""
    parser = CommandParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def add_check(parser: argparse.ArgumentParser, check: Check) -> None:
    """Register a check of the parsed options (it raises UsageError); plain ArgumentParsers do not run checks."""
    if isinstance(parser, CommandParser):
        parser.checks.append(check)


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, what: str | None = None) -> Callable[[str], Any]:
    """An argparse type: an int or a finite float in [low, high] (an end is excluded with ``low_open`` /
    ``high_open``). ``what`` names the value in messages (default: ``an integer``, ``a number``)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if too_low or too_high:
            name = what or "the value"
            if high is None:
                rule = f"{'greater than' if low_open else 'at least'} {low:g}"
            else:
                rule = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{name} must {'be ' if high is None else ''}{rule}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
NONNEGATIVE_FLOAT = number(float, 0)


def output_file(path: str) -> str:
    """An argparse type: a file path that can be written (its directory exists and is writable; '' passes)."""
    if path == "":
        return path
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, expected a file path")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: its directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: permission denied")
    return path


def output_file_in_new_dir(path: str) -> str:
    """An argparse type: a file path that can be written, creating its directory if needed."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, expected a file path")
    output_dir(os.path.dirname(full))
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: permission denied")
    return path


def output_dir(path: str) -> str:
    """An argparse type: a directory that exists and is writable, or that can be created (its nearest existing
    ancestor is a writable directory)."""
    if path == "":
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise argparse.ArgumentTypeError(f"{path!r} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write in {path!r}: permission denied")
        return path
    ancestor = os.path.dirname(full)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise argparse.ArgumentTypeError(f"cannot create {path!r}: {ancestor!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {path!r}: {ancestor!r} is not writable")
    return path


def input_file(path: str) -> str:
    """An argparse type: an existing, readable file."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path!r}: permission denied")
    return path


def tensor_file(path: str) -> torch.Tensor:
    """An argparse type: a .pt file holding a tensor ``[N, ...]`` or a dict with key ``'x'``, loaded with
    ``torch.load(weights_only=True)``: a file holding anything else (arbitrary pickled objects) is refused, never
    executed."""
    input_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise argparse.ArgumentTypeError(
            f"cannot load {path!r} as tensors (loaded with weights_only=True, which refuses files holding other "
            f"objects): {first}"
        ) from None
    data = obj.get("x") if isinstance(obj, Mapping) else obj
    if not torch.is_tensor(data) or data.ndim < 2:
        raise argparse.ArgumentTypeError(f"{path!r}: expected a tensor [N, ...] (or a dict with key 'x')")
    return data


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``KEY=VALUE`` with VALUE an int, a float, a comma-separated list of ints, or a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    if "," in value:
        try:
            return key, [int(v) for v in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {value!r}") from None
    return key, value


def device(text: str) -> str:
    """An argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({e})") from None
    return text


def check_t_eps(t_eps: float, sde_name: str) -> None:
    """UsageError unless 0 < t_eps < T of the named SDE."""
    from ..sde import sde_from_name

    T = sde_from_name(sde_name).T
    if not 0 < t_eps < T:
        raise UsageError(f"--t-eps must lie in (0, T) = (0, {T:g}) for the {sde_name} SDE, got {t_eps:g}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The analytic Gaussian-mixture model of ``compare`` and ``sample``."""
    from ..sde import SDE_NAMES

    p.add_argument("--sde", choices=sorted(SDE_NAMES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--dim", type=POSITIVE_INT, default=16, help="dimension of the Gaussian-mixture model (default: 16)")
    p.add_argument("--components", type=POSITIVE_INT, default=8, help="mixture components (default: 8)")
    p.add_argument("--diagonal", action="store_true", help="axis-aligned components instead of correlated ones")
    p.add_argument("--batch", type=POSITIVE_INT, default=512, help="samples per run (default: 512)")
    p.add_argument("--t-eps", type=POSITIVE_FLOAT, default=1e-3, help="final time (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true", help="solve in float64 (default float32)")


def mixture(args: argparse.Namespace):
    """The Gaussian mixture of ``add_model_args``'s options."""
    from ..analytic import GaussianMixture

    return GaussianMixture.random(args.dim, args.components, seed=args.seed, full=not args.diagonal)
