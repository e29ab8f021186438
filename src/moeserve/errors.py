"""Errors moeserve raises for problems a user can fix (bad files, bad options, bad input).

Internal invariants use ``assert``; anything caused by what a user passed raises one of these,
with a message that names the file, option or value and says what is wrong.
"""

from __future__ import annotations


class MoeserveError(Exception):
    """Base class for every user-facing moeserve error."""


class CheckpointError(MoeserveError):
    """A model folder or one of its files cannot be used (missing, corrupt, mismatched, unsupported)."""


class TraceError(MoeserveError):
    """A routing trace file is missing, malformed or inconsistent."""
