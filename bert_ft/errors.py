"""Errors that reach the user as one clear message (no traceback unless --debug)."""

from __future__ import annotations


class BertFtError(Exception):
    """Base class: the message is complete and is printed as it is."""


class UsageError(BertFtError):
    """A bad flag, a contradictory combination, or an unusable path."""


class DataError(BertFtError):
    """Bad input data; the message names the file, the line or example, what is wrong and how to fix it."""

    def __init__(self, path: str, line: int | None, problem: str, fix: str = "") -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        message = f"{where}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)
        self.path, self.line, self.problem, self.fix = path, line, problem, fix

    def __reduce__(self):  # picklable, so an error raised in a data worker process reaches the user intact
        return DataError, (self.path, self.line, self.problem, self.fix)


class TrainingDiverged(BertFtError):
    """A NaN/inf loss; the last good checkpoint was kept."""
