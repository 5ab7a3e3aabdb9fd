"""User-facing errors: each carries one line that names the thing and says what to do.

The CLI prints ``str(err)`` and exits 2 for any ``DflashError``; everything else is a bug and
keeps its traceback (with ``--debug``).
"""

import re


class DflashError(Exception):
    """An error caused by input or environment, reported as one line without a traceback."""


class StoreError(DflashError):
    """The artifact store cannot be reached, is malformed or refused an operation."""


class SchemaError(DflashError):
    """A Parquet file does not have the columns or types a stage expects."""


class ConfigError(DflashError):
    """A config file or option is invalid."""


class IntegrityError(StoreError):
    """A stored file (or manifest) is not what its committed record says it is."""


# The CLI stage name that rebuilds each store folder (``dflash run --force STAGE``).
FORCE_STAGE = {"targets": "target", "prompts": "prompts", "generations": "generate",
               "filter": "filter", "features": "train", "train": "train",
               "bench_runs": "benchmark"}


def rebuild_hint(stage_folder: str) -> str:
    """How to replace a damaged output of ``stage_folder``: rebuild it (gc keeps committed ones)."""
    return f"rebuild it with `dflash run --force {FORCE_STAGE.get(stage_folder, stage_folder)}`"


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def mask_url(text: str) -> str:
    """``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``: a secret never reaches a message."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)


def one_line(e: BaseException) -> str:
    """The cause of ``e`` as one line: a traceback's last line, never "Traceback (...)"."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback (most recent call last)"):
        lines = [lines[-1]]
    return mask_url(lines[0]) if lines else type(e).__name__
