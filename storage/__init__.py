"""The artifact store over fsspec (local, memory://, s3://), manifests, Parquet I/O and DuckDB.

Knows nothing about models.
"""

from storage.errors import ConfigError, DflashError, SchemaError, StoreError
from storage.keys import code_fingerprint, stage_key
from storage.manifest import FileEntry, Manifest, StageOutput, list_outputs, read_manifest
from storage.store import Store, default_store_url

__all__ = ["ConfigError", "DflashError", "FileEntry", "Manifest", "SchemaError", "StageOutput",
           "Store", "StoreError", "code_fingerprint", "default_store_url", "list_outputs",
           "read_manifest", "stage_key"]
