"""The ``scoresolve`` command: ``compare`` (the default), ``sample``, ``likelihood``, ``train`` and ``evaluate``.

Every command lives in its own module here (``add_<command>_args`` and ``cmd_<command>``); library modules hold no
argparse code. The commands run on any model (``--model``, ``--checkpoint``, ``--model-spec MODULE:FACTORY``: see
``_args.add_network_args``), state every option's default in ``--help`` and set torch's thread count
(``--threads``). Bad option values, missing input files and unusable output paths are usage errors (exit status 2),
found before a command starts its work.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ._args import CommandParser, run_command
from .compare import DEFAULT_SOLVERS, add_compare_args, cmd_compare
from .evaluate import add_evaluate_args, cmd_evaluate
from .likelihood import add_likelihood_args, cmd_likelihood
from .sample import add_sample_args, cmd_sample
from .train import add_train_args, cmd_train

COMMANDS = {
    "compare": (add_compare_args, "work-precision study of solvers on the analytic Gaussian mixture or any model "
                "(default command)"),
    "sample": (add_sample_args, "sample the analytic mixture (scored exactly), a shipped model, a checkpoint or "
               "--model-spec MODULE:FACTORY"),
    "likelihood": (add_likelihood_args, "log-likelihood / bits-per-dim of a dataset via the PF-ODE"),
    "train": (add_train_args, "train a reference score network by denoising score matching"),
    "evaluate": (add_evaluate_args, "bits/dim and a sample grid of a digits model (shipped, checkpoint or your own)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``scoresolve`` parser: one sub-command per entry of ``COMMANDS``."""
    parser = CommandParser(prog="scoresolve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    for name, (add_args, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``scoresolve ARGV`` (no command: ``compare``); returns the exit status (`run_command`: errors found
    while a command runs are one-line usage errors, Ctrl-C exits with 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the main job: a work-precision study on the built-in default model
        args = parser.parse_args(["compare", *(argv or [])])
    return run_command(args, args._parser)


__all__ = [
    "COMMANDS",
    "DEFAULT_SOLVERS",
    "build_parser",
    "cmd_compare",
    "cmd_evaluate",
    "cmd_likelihood",
    "cmd_sample",
    "cmd_train",
    "main",
]
