"""Parquet I/O with schema checks on both sides (pyarrow, zstd).

A stage declares the schema it writes and the columns it reads; a mismatch is a ``SchemaError``
that names the file and the column, never a silent cast.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import SchemaError
from storage.store import Store

COMPRESSION = "zstd"


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Every expected column must exist with the expected type (extra columns are allowed)."""
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            raise SchemaError(f"{where}: missing column {f.name!r} (expected {f.type}); "
                              f"found columns: {', '.join(actual.names) or 'none'}")
        got = actual.field(idx).type
        if not _compatible(got, f.type):
            raise SchemaError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got.equals(want):
        return True
    # string/large_string and list/large_list carry the same values
    if pa.types.is_string(want) or pa.types.is_large_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and _compatible(
            got.value_type, want.value_type)
    return False


def to_parquet_bytes(table: pa.Table, schema: pa.Schema | None = None, where: str = "table") -> bytes:
    if schema is not None:
        check_schema(table.schema, schema, where)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION)
    return buf.getvalue()


def read_parquet(store: Store, rel: str, *, schema: pa.Schema | None = None,
                 columns: Iterable[str] | None = None) -> pa.Table:
    """Read one Parquet file of the store, checking ``schema`` if given."""
    where = store.uri(rel)
    try:
        with store.open_input(rel) as f:
            pf = pq.ParquetFile(f)
            if schema is not None:
                check_schema(pf.schema_arrow, schema, where)
            return pf.read(columns=list(columns) if columns is not None else None)
    except FileNotFoundError:
        raise SchemaError(f"{where}: file does not exist") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{where}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def read_schema(store: Store, rel: str) -> pa.Schema:
    where = store.uri(rel)
    try:
        with store.open_input(rel) as f:
            return pq.ParquetFile(f).schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{where}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
