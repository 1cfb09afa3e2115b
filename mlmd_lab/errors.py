"""Exceptions with one-line messages that name the problem and the fix.

Every expected failure (bad file, unreachable server, wrong units) raises a subclass of
:class:`MLMDError`; the CLI prints its message on one line instead of a traceback.
"""

from __future__ import annotations


class MLMDError(Exception):
    """Base class of all expected mlmd_lab failures; ``str(err)`` is a complete, actionable sentence."""


class InputFileError(MLMDError):
    """A file cannot be read as the data it claims to be (corrupt, truncated, wrong format, no forces)."""

    def __init__(self, path: str, problem: str, fix: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class UnitsError(MLMDError):
    """A unit name is unknown or missing where the data carry no units."""


class DatabaseError(MLMDError):
    """The database cannot be reached, the URI is malformed, or the embedded server failed."""


class SCFNotConvergedError(MLMDError):
    """A DFT code's self-consistent field did not converge, after the recipe's own retries. The setup ran; the
    structure is the usual cause (a hot or distorted cell whose gap closes cannot converge with fixed occupations).
    Loops that label many structures leave such a structure out and count it (see ``learn`` and ``autobuild``)."""


class MixedSettingsError(MLMDError):
    """Frames of settings signatures whose energy zeros may differ were to be used as one training set."""
