"""Exceptions the command line turns into one ``error: …`` line (kept free of heavy imports)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A federation that trained nothing (every round skipped, a non-finite loss) or was told to stop.

    Raised by the ServerApp after summary.json records ``"status": "failed"`` and the reason, so
    Flower marks the run failed and ``smartfed run`` exits 2 with the reason on one line.
    """


# What a user can cause and fix (bad values, files, folders, keys): one line, exit 2.
# Anything else is a bug and keeps its traceback (without local variables).
ANTICIPATED: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, RunFailed)


def one_line(err: BaseException) -> str:
    """The error's message on one line; a bare KeyError ('x') gets its type so it reads as a missing key."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if isinstance(err, KeyError) or not message else message
