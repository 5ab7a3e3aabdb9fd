"""Row references: a table whose rows are rows of another committed output's Parquet files.

Why: a stage that only *selects* rows (the filter's train/eval split) need not copy them. Copying
re-encodes every kept byte (token-id lists are most of them), which costs more than the
selection itself; a reference is 12 bytes a row. Outputs are immutable once committed, so a
reference stays valid for as long as its source output is kept, and the reader checks that the
source is still the one referenced (its manifest digest) before it reads a row.

A reference table is Parquet with two columns, ``file`` (int32: index into the source files listed
in the referencing manifest's ``extra["row_refs"]``) and ``row_no`` (int64: row number within that
file, the same number DuckDB's ``file_row_number`` gives). Readers see the source rows instead:

* ``read_table(store, manifest, table, columns)`` in Python (pyarrow), and
* the DuckDB views of ``storage.catalog`` (``_refs_sql``), so ``dflash query "select * from
  train"`` shows the generation columns whatever way the split was stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import DflashError, SchemaError
from storage.manifest import Manifest, read_manifest
from storage.parquet import read_parquet, read_schema
from storage.store import Store

REFS_SCHEMA = pa.schema([("file", pa.int32()), ("row_no", pa.int64())])
EXTRA_KEY = "row_refs"


def refs_table(per_file_rows: Sequence[np.ndarray]) -> pa.Table:
    """A reference table from, per source file (in the order of ``files``), its row numbers."""
    file = np.concatenate([np.full(len(r), i, np.int32) for i, r in enumerate(per_file_rows)]
                          or [np.zeros(0, np.int32)])
    rows = np.concatenate([np.asarray(r, np.int64) for r in per_file_rows]
                          or [np.zeros(0, np.int64)])
    return pa.table([pa.array(file), pa.array(rows)], schema=REFS_SCHEMA)


def refs_parquet_options() -> dict[str, Any]:
    """Sorted row numbers delta-encode to about a byte each; the file index run-length encodes."""
    return {"compression": "zstd", "compression_level": 1, "use_dictionary": ["file"],
            "column_encoding": {"row_no": "DELTA_BINARY_PACKED"}}


def refs_extra(source: Manifest, files: Sequence[str], tables: Sequence[str],
               view_casts: dict[str, str] | None = None) -> dict[str, Any]:
    """What the referencing manifest records under ``extra["row_refs"]``.

    ``files``: the source files' store-relative paths (the ``file`` index points into this list);
    ``view_casts``: column -> DuckDB type for the catalog view, where a source column's stored type
    is looser than the contract (e.g. an all-null column stored with Arrow type null)."""
    return {"source": source.prefix, "source_digest": source.digest, "files": list(files),
            "tables": list(tables), "view_casts": dict(view_casts or {})}


def ref_info(manifest: Manifest, table: str) -> dict[str, Any] | None:
    """The manifest's row-reference record if ``table`` is a reference table, else None."""
    info = manifest.extra.get(EXTRA_KEY)
    return info if info and table in info.get("tables", ()) else None


def check_source(store: Store, manifest: Manifest, info: dict[str, Any]) -> Manifest:
    """The referenced output must still be the committed one the references were made against."""
    stage, key = info["source"].split("/", 1)
    source = read_manifest(store, stage, key)
    where = f"{manifest.prefix} references rows of {info['source']}"
    if source is None:
        raise DflashError(f"{where}, which is no longer in {store.uri('')}; restore it, or re-run "
                          f"the {manifest.stage} stage with --force")
    if source.digest != info["source_digest"]:
        raise DflashError(f"{where}, which was rewritten since (digest {source.digest[:12]} != "
                          f"{info['source_digest'][:12]}); re-run the {manifest.stage} stage "
                          "with --force")
    return source


def read_table(store: Store, manifest: Manifest, table: str,
               columns: Iterable[str] | None = None) -> pa.Table:
    """A logical table of a committed output, copies or references alike.

    ``columns``: the wanted columns; those a file lacks are left out (the caller decides whether
    that is an error). Parts are concatenated with permissive type promotion: an all-null column
    takes the others' type, int32 token ids widen to int64 where another part has int64.

    Every file read is first checked against its committed entry (size and sha256,
    storage/verify.py): a swapped or edited file stops the reader with one line."""
    from storage.verify import verify_entries

    wanted = list(columns) if columns is not None else None
    info = ref_info(manifest, table)
    verify_entries(store, manifest, manifest.files_for(table))
    if info is None:
        parts = [_read(store, f"{manifest.prefix}/{f.path}", wanted)
                 for f in manifest.files_for(table)]
    else:
        source = check_source(store, manifest, info)
        used = {rel.split("/", 2)[-1] for rel in info["files"]}
        verify_entries(store, source, [f for f in source.files if f.path in used])
        parts = _resolve(store, manifest, table, info, wanted)
    if not parts:
        return pa.table({})
    return pa.concat_tables(parts, promote_options="permissive")


def _read(store: Store, rel: str, wanted: list[str] | None) -> pa.Table:
    """The wanted columns the file has (all columns for None)."""
    if wanted is not None:
        names = set(read_schema(store, rel).names)  # a footer read: cheap beside the data
        wanted = [c for c in wanted if c in names]
    return read_parquet(store, rel, columns=wanted)


def _resolve(store: Store, manifest: Manifest, table: str, info: dict[str, Any],
             wanted: list[str] | None) -> list[pa.Table]:
    """The referenced rows, in reference order: each source file is read once (only the wanted
    columns, files in parallel) and its rows selected."""
    refs = pa.concat_tables([_read(store, f"{manifest.prefix}/{f.path}", None).cast(REFS_SCHEMA)
                             for f in manifest.files_for(table)] or [REFS_SCHEMA.empty_table()])
    file = refs.column("file").to_numpy()
    rows = refs.column("row_no").to_numpy()
    files = info["files"]
    # runs of one file, in reference order (a split is written sorted by file, then row)
    starts = list(np.flatnonzero(np.r_[True, file[1:] != file[:-1]])) if len(file) else []
    runs = list(zip(starts, [*starts[1:], len(file)], strict=True))
    bad = next((int(file[s]) for s, _ in runs if not 0 <= file[s] < len(files)), None)
    if bad is not None:
        raise SchemaError(f"{store.uri(manifest.prefix)}: {table} references file {bad}, but "
                          f"row_refs lists {len(files)} files")

    def select(run: tuple[int, int]) -> pa.Table:
        rel, take = files[int(file[run[0]])], rows[run[0]:run[1]]
        source = _read(store, rel, wanted)
        if take.min() < 0 or take.max() >= source.num_rows:
            raise SchemaError(f"{store.uri(rel)}: {manifest.prefix}/{table} references row "
                              f"{int(take.max())}, but the file has {source.num_rows} rows")
        if len(take) > 1 and np.all(take[1:] > take[:-1]):  # sorted and unique: a mask is
            mask = np.zeros(source.num_rows, bool)           # ~3x cheaper than a gather
            mask[take] = True
            return source.filter(pa.array(mask))
        return source.take(pa.array(take))

    with ThreadPoolExecutor(max_workers=min(len(runs), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(select, runs))
