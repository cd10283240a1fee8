"""Errors a user causes, and how the command line shows them.

`UserError` is a mistake in what the user gave us (bad data, bad config, wrong checkpoint), not a
bug. It subclasses ValueError so code that already catches ValueError keeps working. The command
line (`instructgpt_jax.main`) prints such an error as one line `error: <message>` on stderr and
exits with status 2; `--debug` (or INSTRUCTGPT_DEBUG=1) shows the traceback instead.

Which exceptions the command line treats as the user's (`USER_ERRORS`):
  - while running a stage: UserError, ValueError (modules not yet converted raise it for bad
    input) and FileNotFoundError (a path the user named does not exist), plus absl's
    app.UsageError (inconsistent multi-host flags);
  - while reading the config and its overrides: those, plus KeyError and unknown config keys, and
    absl flag errors (unknown flag, unparsable value).
Anything else (TypeError, AttributeError, IndexError, ...) is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

EXIT_STATUS = 2  # what the command line exits with on a user error (1 stays "crashed")

DEBUG_ENV = "INSTRUCTGPT_DEBUG"


class UserError(ValueError):
    """A mistake a user made (bad data, config or checkpoint). The message says what is wrong and
    where (file:line, field or config key, valid choices), on one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or that should have been built) does not exist; both a
    UserError and a FileNotFoundError, so either `except` catches it."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError)
CONFIG_ERRORS = USER_ERRORS + (KeyError,)


def one_line(exc: BaseException) -> str:
    """The exception's message on a single line (KeyError's repr quotes dropped)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]
    else:
        msg = str(exc)
    msg = " ".join(part.strip() for part in msg.splitlines() if part.strip())
    return msg or type(exc).__name__


def debug_requested(argv) -> bool:
    """--debug / INSTRUCTGPT_DEBUG=1, read from argv (flag parsing may be what failed): a command shows the
    traceback of a user error instead of one line."""
    if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
        return True
    debug = False
    for arg in argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in ("debug", "nodebug"):
            debug = name == "debug" and value.lower() not in ("false", "0", "f")
    return debug


def exit_user_error(message: str):
    """What every command does with a user error: `error: <message>` on stderr, exit status 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(EXIT_STATUS)
