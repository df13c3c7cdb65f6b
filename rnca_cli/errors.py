"""The one exception family of rnca.

Library code raises these with a message that names the file (when there is one), what was
expected and what was found. Only ``rnca_cli.cli`` catches them: it prints the message on one
line to stderr and exits with status 1. Python users catch :class:`RncaError`.
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


class UsageError(RncaError):
    """An option value that cannot work (an unknown device or engine, a bad precision): the
    command line is wrong, not the data. The CLI exits with status 2 for these."""


class DeviceError(UsageError):
    """The requested compute device is not available."""


class TrainingError(RncaError):
    """Training cannot go on (the loss became NaN or infinite)."""
