"""DuckDB over the store: each stage's tables as views, read straight from the store's files.

The store's fsspec filesystem is registered with DuckDB (the httpfs extension cannot be installed
offline), so ``read_parquet`` works on ``s3://`` and ``memory://`` URLs as on local paths. Views
list only files named by committed manifests; the benchmark history is append-only and its views
list only the files of runs with a commit record (storage/history.py). A corrupt manifest hides
its own output only (logged), so queries over the other stages still work; a reference table
whose source output changed raises the reader's one-line error when its view is queried.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import duckdb
import pyarrow as pa

from storage import history
from storage.errors import DflashError, IntegrityError
from storage.manifest import MANIFEST, Manifest, parse_manifest
from storage.refs import check_source, ref_info
from storage.store import Store

log = logging.getLogger("dflash")

BENCH_TABLES = {"benchmarks": "benchmarks/summary", "benchmark_samples": "benchmarks/samples"}


def connect(store: Store, memory_limit: str | None = None, threads: int | None = None,
            views: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read the store, with one view per table found in it."""
    con = duckdb.connect(":memory:")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if store.protocol != "file":
        con.register_filesystem(store.fs)
    if views:
        create_views(con, store)
    return con


def committed_manifests(store: Store) -> list[Manifest]:
    """All committed outputs in the store (stage folders only; the benchmark history excluded).
    A manifest that does not parse is skipped with a warning naming it (``dflash verify`` and
    ``dflash ls`` report it): one damaged output must not hide every other one."""
    out = []
    for stage in store.ls(""):
        stage = stage.rsplit("/", 1)[-1]
        if stage.startswith((".", "_")) or stage == "benchmarks":
            continue
        for key in store.ls(stage):
            rel = f"{key}/{MANIFEST}"
            try:
                out.append(parse_manifest(store, rel, store.read_bytes(rel)))
            except FileNotFoundError:
                continue
            except IntegrityError as e:
                log.warning("%s", e)
    return out


def create_views(con: duckdb.DuckDBPyConnection, store: Store) -> list[str]:
    """Create (or replace) the views; return their names."""
    by_table: dict[str, list[tuple[Manifest, list[str]]]] = defaultdict(list)
    manifests = committed_manifests(store)
    for m in manifests:
        tables = sorted({f.table for f in m.files if f.table and f.path.endswith(".parquet")})
        for t in tables:
            uris = [store.uri(f"{m.prefix}/{f.path}") for f in m.files_for(t)]
            by_table[t].append((m, uris))
    names = []
    for table, parts in sorted(by_table.items()):
        selects = [
            f"SELECT *, {_lit(m.key)} AS output_key, {_lit(m.created_at)} AS output_created_at "
            f"FROM {_source(store, m, table, uris)}"
            for m, uris in sorted(parts, key=lambda p: p[0].created_at)
        ]
        con.execute(f"CREATE OR REPLACE VIEW {table} AS " + " UNION ALL BY NAME ".join(selects))
        names.append(table)
    for view, folder in BENCH_TABLES.items():
        files = history.committed_files(store, folder)  # runs with their commit record only
        if files:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet("
                        f"{_list([store.uri(f) for f in files])}, hive_partitioning = true, "
                        "union_by_name = true)")
            names.append(view)
    con.register("_outputs_arrow", _outputs_table(manifests))
    con.execute("CREATE OR REPLACE VIEW outputs AS SELECT * FROM _outputs_arrow")
    names.append("outputs")
    return names


def _source(store: Store, m: Manifest, table: str, uris: list[str]) -> str:
    """The FROM item of one output's table: its files, or the rows they reference."""
    info = ref_info(m, table)
    if info is not None:
        try:
            check_source(store, m, info)  # the Python reader's check: same source, same digest
        except DflashError as e:
            # raised when the view is queried (any query: the filter runs for count(*) too)
            return f"(SELECT NULL AS integrity_error WHERE error({_lit(str(e))}) IS NULL)"
        return f"({_refs_sql(store, m, table, uris)})"
    return f"read_parquet({_list(uris)}, union_by_name = true)"


def _refs_sql(store: Store, m: Manifest, table: str, ref_uris: list[str]) -> str:
    """The rows a reference table (storage.refs) points at, every source column: the references
    joined with the source files on DuckDB's ``file_row_number``."""
    info = ref_info(m, table)
    assert info is not None
    src = _list([store.uri(f) for f in info["files"]])
    casts = ", ".join(f"CAST(g.{c} AS {t}) AS {c}" for c, t in info.get("view_casts", {}).items())
    return (f"SELECT g.* EXCLUDE (file, row_no){f' REPLACE ({casts})' if casts else ''} "
            f"FROM read_parquet({_list(ref_uris)}) r JOIN ("
            f"SELECT list_position({src}, filename)::INTEGER - 1 AS file, "
            f"file_row_number AS row_no, * EXCLUDE (filename, file_row_number) "
            f"FROM read_parquet({src}, filename = true, file_row_number = true, "
            f"union_by_name = true)) g USING (file, row_no)")


def _outputs_table(manifests: list[Manifest]) -> pa.Table:
    rows: list[dict[str, Any]] = [
        {"stage": m.stage, "key": m.key, "digest": m.digest, "created_at": m.created_at,
         "files": len(m.files), "bytes": sum(f.size for f in m.files),
         "rows": sum(m.rows.values()), "code_fingerprint": m.code_fingerprint[:16]}
        for m in manifests
    ]
    schema = pa.schema([("stage", pa.string()), ("key", pa.string()), ("digest", pa.string()),
                        ("created_at", pa.string()), ("files", pa.int64()), ("bytes", pa.int64()),
                        ("rows", pa.int64()), ("code_fingerprint", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _list(items: list[str]) -> str:
    return "[" + ", ".join(_lit(i) for i in items) + "]"
