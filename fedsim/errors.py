"""Errors that the command line turns into one clear line.

`ConfigError` is a usage error (bad option, bad value, missing data file): exit code 2.
`NodeError` is a failure inside a simulated node; it names the node and the round.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class FedsimError(Exception):
    """Base class of errors fedsim reports as one line instead of a traceback."""

    exit_code = 1


class ConfigError(FedsimError):
    """The user asked for something that cannot work; the message says how to fix it."""

    exit_code = 2


class DataUnavailable(ConfigError):
    """A dataset's files are not on this machine (and were not downloaded)."""


class NodeError(FedsimError):
    """A simulated node raised while running its client update."""

    def __init__(self, node_id: int, round_: int, cause: str) -> None:
        super().__init__(f"node {node_id} failed in round {round_}: {cause}")
        self.node_id = node_id
        self.round = round_
        self.cause = cause

    def __reduce__(self):  # survives pickling across Ray processes
        return (NodeError, (self.node_id, self.round, self.cause))


class Stopped(FedsimError):
    """The run stopped before its end at a step boundary (the last complete state can be
    checkpointed and resumed)."""


class Interrupted(Stopped):
    """SIGINT or SIGTERM: stop at the next step boundary; exit 130 or 143 (128 + the signal)."""

    def __init__(self, signum: int, round_: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {round_}")
        self.exit_code = 128 + int(signum)
        self.signum = signum


class Diverged(Stopped):
    """The model or the training loss became non-finite or exploded."""


class WorkersLost(Stopped):
    """Ray workers kept dying: too many failures in a row."""


class NothingLearned(FedsimError):
    """The run ended, but its model never changed: every aggregation was skipped (too few rows
    for the rule). Its files are complete; the exit code (3) says that the result is void."""

    exit_code = 3


def exit_with(message: str, code: int = 2) -> NoReturn:
    """Stop the command with one line on stderr (``fedsim: error: ...``) and ``code``."""
    print(f"fedsim: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
