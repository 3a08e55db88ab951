"""Deprecated alias of [`scoresolve.evaluation`][scoresolve.evaluation] (the package that replaced this module).

Import from ``scoresolve.evaluation`` (or ``scoresolve``); the command-line functions live in
``scoresolve.cli.likelihood``. This module only re-exports names; the on-disk format it named is unchanged.
"""

import warnings

from .cli.likelihood import add_likelihood_args, cmd_likelihood  # noqa: F401
from .evaluation import *  # noqa: F401,F403
from .evaluation import __all__ as _all

__all__ = [*_all, "add_likelihood_args", "cmd_likelihood"]

warnings.warn(
    "scoresolve.dataset_eval is deprecated: import from scoresolve.evaluation",
    DeprecationWarning,
    stacklevel=2,
)
