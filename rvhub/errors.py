"""The few exceptions rvhub raises on purpose.

Every user-facing failure is an :class:`RvhubError`; the CLI prints its message as one line
and exits with its ``exit_code``. Anything else reaching the CLI is a bug.
"""

from __future__ import annotations


class RvhubError(Exception):
    """A failure the user can act on; the message names the problem and, where known, the fix."""

    exit_code: int = 1


class InputError(RvhubError):
    """Bad user input: a missing path, an unknown id, an option out of range, a corrupt file."""

    exit_code = 2


class CompatibilityError(RvhubError):
    """Two checkpoints, or a vector and a model, do not fit together."""

    exit_code = 3


class IntegrityError(RvhubError):
    """An artifact failed verification: a hash mismatch, a hostile manifest, non-finite values."""

    exit_code = 4


class HubError(RvhubError):
    """The Hub (or the network) refused or failed a request."""

    exit_code = 5
