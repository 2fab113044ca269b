"""Exceptions whose message names the bad value and the fix; the CLI prints them without a traceback."""


class Conv2dLstmError(Exception):
    """Base class: a user-facing error. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(Conv2dLstmError):
    """The configuration is invalid (unknown key, wrong type, out of range, inconsistent values)."""


class DownloadError(Conv2dLstmError):
    """A source could not be fetched or fetched content is corrupt (message names the URL)."""


class DataError(Conv2dLstmError):
    """Input data does not have the expected structure (dimensions, variables, coverage)."""


class DiskFullError(Conv2dLstmError):
    """A write failed because the disk is full (or the quota used up); the message names the output,
    the free space, the space needed (at least what the output had taken of the disk) and the fix.
    Not an ``OSError``, so that no caller mistakes it for a network or read error."""


class TrackingError(Conv2dLstmError):
    """The MLflow tracking store cannot be reached or used."""
