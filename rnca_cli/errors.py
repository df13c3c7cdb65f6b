"""The one exception family of rnca.

Library code raises these with a message that names the file (when there is one), what was
expected and what was found. Only ``rnca_cli.cli`` catches them, in one place: it prints the
message on one line to stderr and exits with status 2 for a :class:`UsageError` and 1 for the
others (the README's exit-code table). Python users catch :class:`RncaError`.
"""

from __future__ import annotations


class RncaError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong option)."""


class InputError(RncaError):
    """An input file or folder is missing, unreadable, or holds data rnca cannot use."""


class OutputError(RncaError):
    """An output cannot be written (exists without --overwrite, folder not writable)."""


class CheckpointError(RncaError):
    """A model file is missing, is not an rnca checkpoint, or cannot be rebuilt."""


class UsageError(InputError, ValueError):
    """An option value that cannot work (out of range, an unknown device, engine or metric): the
    command line is wrong, not the data. The CLI exits with status 2 for these. The option
    dataclasses raise it, so it is also a ``ValueError`` for code that validates values."""


class DeviceError(UsageError):
    """The requested compute device is not available."""


class TrainingError(RncaError):
    """Training cannot go on (the loss became NaN or infinite)."""
