"""Exceptions shared by the library and the command line.

``UserError`` marks a mistake in what the user asked for (a bad flag, config key, value or path); the CLI
prints its message as one line on stderr and exits with status 2 (see :mod:`rnnkit.cli.common`).
``TrainingError`` marks a run that cannot go on (e.g. too many non-finite steps in a row); the CLI prints
one line and exits with status 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input: the message names the argument, the value received and what was expected."""


class TrainingError(RuntimeError):
    """A training run stopped because it cannot continue (divergence, no usable checkpoint, ...)."""


__all__ = ["UserError", "TrainingError"]
