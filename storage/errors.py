"""User-facing errors: each carries one line that names the thing and says what to do.

The CLI prints ``str(err)`` and exits 2 for any ``DflashError``; everything else is a bug and
keeps its traceback (with ``--debug``).
"""


class DflashError(Exception):
    """An error caused by input or environment, reported as one line without a traceback."""


class StoreError(DflashError):
    """The artifact store cannot be reached, is malformed or refused an operation."""


class SchemaError(DflashError):
    """A Parquet file does not have the columns or types a stage expects."""


class ConfigError(DflashError):
    """A config file or option is invalid."""
