"""The benchmark history's commit: a run's files count only once its run record exists.

Layout (append-only, never rewritten)::

    benchmarks/samples/hw=<tag>/date=<YYYY-MM-DD>/run-<run_id>.parquet
    benchmarks/summary/hw=<tag>/date=<YYYY-MM-DD>/run-<run_id>.parquet
    benchmarks/runs/run-<run_id>.json     the commit record, written LAST (size + sha256 of each)

Why: a run writes two files; a kill between them left samples without a summary, visible in the
samples view for good. With a record per run the two files are one commit, like a stage output's
manifest: the catalog's views read only recorded runs, ``dflash gc`` reports (and with ``--yes``
moves aside) files of runs without one, and ``dflash verify`` re-hashes recorded files.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from storage.errors import StoreError
from storage.store import Store

ROOT = "benchmarks"
RUNS = f"{ROOT}/runs"
ASIDE = f"{ROOT}/_uncommitted"  # where gc --yes moves a killed run's files (kept, not read)


def run_id_of(path: str) -> str | None:
    """``.../run-<id>.parquet`` -> ``<id>`` (None for anything else, e.g. temp files)."""
    name = path.rsplit("/", 1)[-1]
    if not name.startswith("run-") or not name.endswith((".parquet", ".json")) or ".tmp-" in name:
        return None
    return name[len("run-"):].rsplit(".", 1)[0]


def append_run(store: Store, run_id: str, files: dict[str, tuple[bytes, int]]) -> dict[str, Any]:
    """Write a run's files (``rel -> (bytes, rows)``, each created once), then its record."""
    entries = {}
    for rel, (data, rows) in files.items():
        if run_id_of(rel) != run_id:
            raise ValueError(f"{rel} is not a file of run {run_id}")
        if not store.create_exclusive(rel, data):
            raise StoreError(f"{store.uri(rel)} already exists; benchmark history files are never "
                             "rewritten")
        entries[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": rows}
    record = {"run_id": run_id, "files": entries,
              "committed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if not store.create_exclusive(f"{RUNS}/run-{run_id}.json",
                                  json.dumps(record, indent=2, sort_keys=True).encode()):
        raise StoreError(f"{store.uri(RUNS)}/run-{run_id}.json already exists; run ids are unique")
    return record


def committed_runs(store: Store, strict: bool = False
                   ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """(run id -> record, [(record path, why unreadable)]); unreadable records count as absent."""
    runs, bad = {}, []
    for rel in store.find(RUNS):
        run_id = run_id_of(rel)
        if run_id is None:
            continue
        try:
            record = json.loads(store.read_bytes(rel))
            files = record["files"]
            assert isinstance(files, dict)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            bad.append((rel, f"not a run record: {type(e).__name__}"))
            continue
        runs[run_id] = record
    return runs, bad


def committed_files(store: Store, folder: str) -> list[str]:
    """History files under ``folder`` (e.g. ``benchmarks/summary``) of committed runs only."""
    runs, _ = committed_runs(store)
    return sorted(rel for r in runs.values() for rel in r["files"] if rel.startswith(folder + "/"))


def leftovers(store: Store) -> list[str]:
    """History files no run record lists: a run killed before its commit (never read)."""
    runs, _ = committed_runs(store)
    listed = {rel for r in runs.values() for rel in r["files"]}
    out = []
    for rel in store.find(ROOT):
        if rel.startswith((RUNS + "/", ASIDE + "/")) or rel in listed:
            continue
        out.append(rel)
    return out


def move_aside(store: Store, rel: str) -> str:
    """Move a leftover under ``benchmarks/_uncommitted/`` (kept for a post-mortem, never read)."""
    dest = f"{ASIDE}/{rel[len(ROOT) + 1:]}"
    store.write_bytes(dest, store.read_bytes(rel))
    store.rm(rel)
    return dest


def adopt_legacy(store: Store) -> list[str]:
    """Write the record of every run that has both files but no record; return their run ids.

    A one-time migration (``dflash gc --adopt-history``) for histories written before run
    records: that code wrote the samples first and the summary last, so a run with both files
    was complete. Not automatic: after this change, a run with both files and no record is one
    killed before its commit.
    """
    runs, _ = committed_runs(store)
    by_run: dict[str, list[str]] = {}
    for rel in leftovers(store):
        run_id = run_id_of(rel)
        if run_id is not None and rel.endswith(".parquet") and run_id not in runs:
            by_run.setdefault(run_id, []).append(rel)
    adopted = []
    for run_id, rels in sorted(by_run.items()):
        kinds = {rel.split("/")[1] for rel in rels}
        if kinds != {"samples", "summary"} or len(rels) != 2:
            continue
        entries = {}
        for rel in sorted(rels):
            data = store.read_bytes(rel)
            entries[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "rows": _rows(data)}
        record = {"run_id": run_id, "files": entries, "adopted": True,
                  "committed_at": datetime.now(UTC).isoformat(timespec="seconds")}
        if store.create_exclusive(f"{RUNS}/run-{run_id}.json",
                                  json.dumps(record, indent=2, sort_keys=True).encode()):
            adopted.append(run_id)
    return adopted


def _rows(data: bytes) -> int:
    import io

    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
