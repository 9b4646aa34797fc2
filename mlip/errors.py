"""Errors a user can cause, with messages that name the file, key, frame or atom.

The CLI prints these as one clean line instead of a stack trace.
"""


class MLIPError(Exception):
    """Base class of every error caused by user input (config, data, run directory)."""


class DataError(MLIPError):
    """A data file or frame cannot be used: missing key, NaN label, unknown element."""


class ConfigError(MLIPError):
    """A YAML config or command-line override is invalid."""


class CheckpointError(MLIPError):
    """A run directory or checkpoint is missing, incompatible or corrupt."""
