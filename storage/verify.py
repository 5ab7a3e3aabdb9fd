"""Read-side verification: a committed file is used only if it is the file its manifest lists.

Why: a commit records each file's size and sha256, but nothing re-checked them, so a shard
replaced by a copy of another, or a manifest edited by hand, was read silently. Readers now check
the size always (one stat) and the sha256 where they read the file whole anyway (Parquet shards,
safetensors), and stop with one line naming the file, both digests and the fix. A file verified
once is remembered per process (by path, size and expected digest), so a stage that reads the same
split twice hashes it once. ``verify_store`` is ``dflash verify``: every committed file of a store.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from storage.errors import IntegrityError, rebuild_hint
from storage.manifest import MANIFEST, FileEntry, Manifest, parse_manifest
from storage.store import Store

_VERIFIED: set[tuple[str, str, int, str]] = set()
_LOCK = threading.Lock()
CHUNK = 8 << 20


@dataclass
class Problem:
    """One bad file: what ``dflash verify`` prints, one line each."""

    path: str  # store URI
    what: str  # "corrupt manifest", "size mismatch", "sha256 mismatch", "missing", ...
    detail: str

    def line(self) -> str:
        return f"{self.path}: {self.what} ({self.detail})"


def _fail(store: Store, m: Manifest, e: FileEntry, what: str, detail: str) -> IntegrityError:
    return IntegrityError(f"{store.uri(f'{m.prefix}/{e.path}')}: {what} ({detail}); the file is "
                          f"not the one {m.prefix}/{MANIFEST} committed: {rebuild_hint(m.stage)}")


def check_size(store: Store, m: Manifest, e: FileEntry) -> None:
    """The file exists with the committed size (a truncated or swapped file rarely keeps it)."""
    rel = f"{m.prefix}/{e.path}"
    try:
        size = store.size(rel)
    except FileNotFoundError:
        raise _fail(store, m, e, "missing", f"expected {e.size} bytes") from None
    if size != e.size:
        raise _fail(store, m, e, "size mismatch", f"expected {e.size} bytes, found {size}")


def file_sha256(store: Store, rel: str) -> str:
    """sha256 of a stored file, streamed in 8 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with store.open_input(rel) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_entries(store: Store, m: Manifest, entries: Iterable[FileEntry],
                   sha256: bool = True) -> None:
    """Size (and sha256 unless told not) of each entry; raises the first mismatch as one line."""
    for e in entries:
        key = (store.url, f"{m.prefix}/{e.path}", e.size, e.sha256 if sha256 else "")
        with _LOCK:
            if key in _VERIFIED or (key[:3] + (e.sha256,)) in _VERIFIED:
                continue
        check_size(store, m, e)
        if sha256:
            found = file_sha256(store, f"{m.prefix}/{e.path}")
            if found != e.sha256:
                raise _fail(store, m, e, "sha256 mismatch",
                            f"expected {e.sha256[:16]}, found {found[:16]}")
        with _LOCK:
            _VERIFIED.add(key)


def verified_bytes(store: Store, m: Manifest, e: FileEntry) -> bytes:
    """A committed file read whole and checked against its entry (size and sha256)."""
    data = store.read_bytes(f"{m.prefix}/{e.path}")
    if len(data) != e.size:
        raise _fail(store, m, e, "size mismatch", f"expected {e.size} bytes, found {len(data)}")
    found = hashlib.sha256(data).hexdigest()
    if found != e.sha256:
        raise _fail(store, m, e, "sha256 mismatch", f"expected {e.sha256[:16]}, found {found[:16]}")
    return data


# ------------------------------------------------------------------------ a whole store
def verify_store(store: Store, stage: str | None = None) -> tuple[list[Problem], int, int]:
    """Every committed output (of ``stage`` if given) and the benchmark history, re-hashed.

    Returns (problems, files checked, bytes read). Incomplete outputs are not checked: nothing
    reads them, and ``dflash gc`` lists them.
    """
    from storage import history

    problems: list[Problem] = []
    n_files = n_bytes = 0
    stages = [stage] if stage else [s.rsplit("/", 1)[-1] for s in store.ls("")]
    for st in stages:
        if st.startswith((".", "_")) or st == "benchmarks":
            continue
        for key_dir in store.ls(st):
            rel = f"{key_dir}/{MANIFEST}"
            try:
                data = store.read_bytes(rel)
            except FileNotFoundError:
                continue
            try:
                m = parse_manifest(store, rel, data)
            except IntegrityError as e:
                why = str(e).split(": corrupt manifest (", 1)[-1].rsplit(");", 1)[0]
                problems.append(Problem(store.uri(rel), "corrupt manifest", why))
                continue
            for e in m.files:
                n_files += 1
                n_bytes += e.size
                problems += _check_file(store, m.prefix, e.path, e.size, e.sha256, e.rows)
    if stage in (None, "benchmarks", "benchmark", "bench_runs"):
        runs, bad = history.committed_runs(store, strict=False)
        problems += [Problem(store.uri(r), "corrupt history record", why) for r, why in bad]
        for record in runs.values():
            for rel, f in record["files"].items():
                n_files += 1
                n_bytes += f["size"]
                problems += _check_file(store, "", rel, f["size"], f["sha256"], f.get("rows"))
    return problems, n_files, n_bytes


def _check_file(store: Store, prefix: str, path: str, size: int, sha: str,
                rows: int | None) -> list[Problem]:
    rel = f"{prefix}/{path}" if prefix else path
    uri = store.uri(rel)
    try:
        found_size = store.size(rel)
    except FileNotFoundError:
        return [Problem(uri, "missing", f"expected {size} bytes")]
    if found_size != size:
        return [Problem(uri, "size mismatch", f"expected {size} bytes, found {found_size}")]
    found = file_sha256(store, rel)
    if found != sha:
        return [Problem(uri, "sha256 mismatch", f"expected {sha[:16]}, found {found[:16]}")]
    if rows is not None and path.endswith(".parquet"):
        got = _parquet_rows(store, rel)
        if got is not None and got != rows:
            return [Problem(uri, "row count mismatch", f"manifest says {rows}, file has {got}")]
    return []


def _parquet_rows(store: Store, rel: str) -> int | None:
    import pyarrow.parquet as pq

    try:
        with store.open_input(rel) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:  # an unreadable footer with the right sha256 was committed that way
        return None
