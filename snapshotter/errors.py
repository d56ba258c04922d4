"""The snapshotter's error hierarchy: one exception type per failure a caller handles.

Each maps to exactly one gRPC status code (see ``service.py``), mirroring containerd's errdefs so
that containerd's client turns our answers back into the errors its own snapshotters return.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class of every error the snapshotter reports to containerd."""


class NotFoundError(SnapshotError):
    """The snapshot, or its parent, does not exist (errdefs.ErrNotFound)."""


class AlreadyExistsError(SnapshotError):
    """A snapshot with that key or name exists already (errdefs.ErrAlreadyExists)."""


class FailedPreconditionError(SnapshotError):
    """The snapshot is in the wrong state for the call (errdefs.ErrFailedPrecondition)."""


class InvalidArgumentError(SnapshotError):
    """The request itself is malformed (errdefs.ErrInvalidArgument)."""


class UnavailableError(SnapshotError):
    """A resource the snapshot needs cannot be reached right now (errdefs.ErrUnavailable)."""


class ConfigError(Exception):
    """The configuration file or a command-line option is invalid; the message names the key."""
