"""Stage outputs: files written atomically, then a ``manifest.json`` that commits them.

Layout of one output ``<stage>/<key>/``::

    manifest.json        written LAST, never overwritten: the only proof the output is complete
    _lease.json          held by the one live writer of this key (removed on commit)
    _parts/<file>.json   a record per finished file (size, sha256, rows): what a resume trusts
    <files...>           data files, each written atomically

A reader trusts only files that a committed manifest lists, so orphans of a killed writer are
never read. Two writers of one key: the second waits on the first's lease and then returns the
committed manifest; a lease whose writer died (same host, dead pid, or a stale heartbeat) is taken
over, keeping the finished files it recorded, which is how a stage resumes after SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.errors import IntegrityError, StoreError
from storage.keys import digest
from storage.store import Store

MANIFEST = "manifest.json"
LEASE = "_lease.json"
PARTS = "_parts"
PART_LEASES = "_leases"  # one lease per file that fanned-out workers write (generation shards)
LEASE_TTL_S = 1800.0  # a writer that has not written anything for this long is presumed dead


@dataclass
class FileEntry:
    """One committed file; ``path`` is relative to the output folder."""

    path: str
    size: int
    sha256: str
    rows: int | None = None
    table: str | None = None  # the logical table this file belongs to (DuckDB view name)


@dataclass
class Manifest:
    stage: str
    key: str
    files: list[FileEntry]
    config: Any
    inputs: dict[str, str]
    code_fingerprint: str
    created_at: str
    hardware: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def digest(self) -> str:
        """Content digest of the manifest: what downstream keys depend on."""
        return digest(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        files = [FileEntry(**f) for f in d["files"]]
        return cls(**{**d, "files": files})

    def files_for(self, table: str) -> list[FileEntry]:
        return [f for f in self.files if f.table == table]

    def ref(self, store: Store) -> dict[str, str]:
        """The small, JSON-able handle tasks pass around: never the data itself."""
        return {"stage": self.stage, "key": self.key, "digest": self.digest,
                "uri": store.uri(f"{self.prefix}/{MANIFEST}")}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_part(store: Store, prefix: str, name: str, data: bytes, *, rows: int | None = None,
               table: str | None = None) -> FileEntry:
    """Write one file of the output at ``prefix`` atomically, then its ``_parts`` record.

    The lease holder calls this through ``StageOutput.write_bytes``; workers that the holder fans
    out to (a Prefect map over shards, possibly on Dask) call it directly for their own files.
    """
    if name in (MANIFEST, LEASE) or name.startswith(PARTS):
        raise ValueError(f"{name} is a reserved name in a stage output")
    store.write_bytes(f"{prefix}/{name}", data)
    entry = FileEntry(path=name, size=len(data), sha256=sha256_bytes(data), rows=rows, table=table)
    store.write_json(f"{prefix}/{PARTS}/{name.replace('/', '__')}.json", asdict(entry))
    return entry


def recorded_parts(store: Store, prefix: str) -> dict[str, FileEntry]:
    """Files of the output at ``prefix`` whose write finished (a record exists), by name."""
    out = {}
    for name in store.ls(f"{prefix}/{PARTS}"):
        try:
            entry = FileEntry(**store.read_json(name))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            continue  # a record is written atomically; anything else is not ours
        if store.exists(f"{prefix}/{entry.path}"):
            out[entry.path] = entry
    return out


def read_manifest(store: Store, stage: str, key: str) -> Manifest | None:
    """The committed manifest of ``<stage>/<key>``, or None while the output is incomplete."""
    rel = f"{stage}/{key}/{MANIFEST}"
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    return parse_manifest(store, rel, data)


def parse_manifest(store: Store, rel: str, data: bytes) -> Manifest:
    """A manifest from its bytes; one line naming the file if it does not parse."""
    try:
        return Manifest.from_dict(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise IntegrityError(f"{store.uri(rel)}: corrupt manifest ({why}); remove the output with "
                             "`dflash gc --yes`, then rerun to rebuild it") from None


def list_outputs(store: Store, stage: str | None = None) -> list[dict[str, Any]]:
    """Every ``<stage>/<key>`` folder with its status: committed or incomplete."""
    stages = [stage] if stage else [s for s in store.ls("") if not s.rsplit("/", 1)[-1].startswith(".")]
    out = []
    for st in stages:
        st = st.rsplit("/", 1)[-1]
        if st == "benchmarks":  # append-only history, not <stage>/<key> outputs
            continue
        for entry in store.ls(st, detail=True):
            if entry.get("type") != "directory":
                continue
            key = entry["name"].rsplit("/", 1)[-1]
            files = store.find(f"{st}/{key}")
            status = "incomplete"
            if f"{st}/{key}/{MANIFEST}" in files:
                try:
                    read_manifest(store, st, key)
                    status = "committed"
                except IntegrityError:
                    status = "corrupt"
            size = sum(store.size(f) for f in files)
            out.append({"stage": st, "key": key, "status": status, "files": len(files),
                        "bytes": size})
    return out


class StageOutput:
    """Write one stage output and commit it. Use as a context manager::

        with StageOutput(store, "filter", key, config=cfg, inputs=ins, code_fingerprint=fp) as out:
            if out.manifest:            # already committed (cached, or by a concurrent writer)
                return out.manifest
            out.write_bytes("stats.json", data)
            return out.commit()
    """

    def __init__(self, store: Store, stage: str, key: str, *, config: Any,
                 inputs: dict[str, str] | None = None, code_fingerprint: str = "",
                 hardware: dict[str, Any] | None = None, lease_ttl_s: float = LEASE_TTL_S,
                 wait_poll_s: float = 0.5) -> None:
        self.store, self.stage, self.key = store, stage, key
        self.prefix = f"{stage}/{key}"
        self.config, self.inputs, self.code_fingerprint = config, dict(inputs or {}), code_fingerprint
        self.hardware = hardware
        self.lease_ttl_s, self.wait_poll_s = lease_ttl_s, wait_poll_s
        self.writer_id = uuid.uuid4().hex
        self.manifest: Manifest | None = None
        self._holding = False

    # ---------------------------------------------------------------- lease
    def __enter__(self) -> StageOutput:
        self.manifest = read_manifest(self.store, self.stage, self.key)
        while self.manifest is None and not self._acquire():
            time.sleep(self.wait_poll_s)
            self.manifest = read_manifest(self.store, self.stage, self.key)
        if self._holding:  # a writer may have committed between our read and our lease
            self.manifest = read_manifest(self.store, self.stage, self.key)
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()  # on error the recorded parts stay: the next writer resumes from them

    def _lease_body(self) -> bytes:
        return json.dumps({"writer": self.writer_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def _acquire(self) -> bool:
        rel = f"{self.prefix}/{LEASE}"
        if self.store.create_exclusive(rel, self._lease_body()):
            self._holding = True
            return True
        try:
            lease = self.store.read_json(rel)
        except (FileNotFoundError, json.JSONDecodeError):
            return False  # released (or being written) right now: poll again
        if _lease_is_stale(lease, self.lease_ttl_s):
            self.store.rm(rel)
        return False

    def _heartbeat(self) -> None:
        if self._holding:
            self.store.write_bytes(f"{self.prefix}/{LEASE}", self._lease_body())

    def _release(self) -> None:
        if self._holding:
            self.store.rm(f"{self.prefix}/{LEASE}")
            self._holding = False

    @contextmanager
    def keep_alive(self, every_s: float = 60.0) -> Iterator[None]:
        """Refresh the lease while a long step (a benchmark, a mapped generation) runs, so no
        other host presumes this writer dead after ``lease_ttl_s``."""
        with _beating(self._heartbeat, every_s):
            yield

    # ---------------------------------------------------------------- files
    def recorded(self) -> dict[str, FileEntry]:
        """Files finished by this or an earlier (killed) writer of this key, by name."""
        return recorded_parts(self.store, self.prefix)

    def write_bytes(self, name: str, data: bytes, *, rows: int | None = None,
                    table: str | None = None) -> FileEntry:
        """Write one file atomically, then record it (the record is what a resume trusts)."""
        if not self._holding:
            raise StoreError(f"{self.prefix}: write outside the writer's lease")
        entry = write_part(self.store, self.prefix, name, data, rows=rows, table=table)
        self._heartbeat()
        return entry

    def write_json(self, name: str, obj: Any, *, table: str | None = None) -> FileEntry:
        return self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True).encode(), table=table)

    def write_parquet(self, name: str, table: Any, *, table_name: str | None = None,
                      schema: Any = None) -> FileEntry:
        from storage.parquet import to_parquet_bytes

        data = to_parquet_bytes(table, schema=schema, where=f"{self.prefix}/{name}")
        return self.write_bytes(name, data, rows=table.num_rows, table=table_name)

    def put_file(self, name: str, local_path: str | os.PathLike[str], *,
                 table: str | None = None) -> FileEntry:
        with open(local_path, "rb") as f:
            return self.write_bytes(name, f.read(), table=table)

    # ---------------------------------------------------------------- commit
    def commit(self, *, extra: dict[str, Any] | None = None,
               files: list[str] | None = None) -> Manifest:
        """Write the manifest last. ``files`` restricts it to those names (default: all recorded)."""
        from storage.hardware import hardware_info

        if self.manifest is not None:
            return self.manifest
        recorded = self.recorded()
        names = files if files is not None else sorted(recorded)
        missing = [n for n in names if n not in recorded]
        if missing:
            raise StoreError(f"{self.prefix}: cannot commit, files not written: {', '.join(missing)}")
        entries = [recorded[n] for n in names]
        rows: dict[str, int] = {}
        for e in entries:
            if e.table and e.rows is not None:
                rows[e.table] = rows.get(e.table, 0) + e.rows
        manifest = Manifest(
            stage=self.stage, key=self.key, files=entries, config=self.config, inputs=self.inputs,
            code_fingerprint=self.code_fingerprint,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            hardware=self.hardware if self.hardware is not None else hardware_info(),
            rows=rows, extra=dict(extra or {}))
        body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode()
        if not self.store.create_exclusive(f"{self.prefix}/{MANIFEST}", body):
            # Another writer committed first (it had taken over our lease): theirs stands.
            committed = read_manifest(self.store, self.stage, self.key)
            assert committed is not None
            manifest = committed
        self.store.rm(f"{self.prefix}/{PARTS}", recursive=True)
        self.store.rm(f"{self.prefix}/{PART_LEASES}", recursive=True)
        self._release()
        self.manifest = manifest
        return manifest


def _lease_is_stale(lease: dict[str, Any], ttl_s: float) -> bool:
    if time.time() - float(lease.get("heartbeat", 0)) > ttl_s:
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


def live_lease(store: Store, prefix: str, files: list[str], ttl_s: float = LEASE_TTL_S) -> bool:
    """Whether a live writer holds the output's lease or one of its part leases (gc keeps it)."""
    for f in files:
        if f != f"{prefix}/{LEASE}" and not f.startswith(f"{prefix}/{PART_LEASES}/"):
            continue
        try:
            lease = store.read_json(f)
        except (FileNotFoundError, ValueError):
            return True  # being written right now: a writer is alive
        if not _lease_is_stale(lease, ttl_s):
            return True
    return False


class PartLease:
    """The lease on one file of an output that fanned-out workers write (a generation shard).

    Why: the output's own lease is held by whoever commits, but a Prefect map (threads, Dask)
    writes the shards from other tasks. Each shard worker holds ``_leases/<file>.json`` while it
    writes, and keeps it after success as the claim that protects the output from ``dflash gc``
    until the commit removes the ``_leases`` folder. A second run waits for a held shard and then
    skips it: a file is written once, never rewritten.
    """

    def __init__(self, store: Store, prefix: str, name: str, *, ttl_s: float = LEASE_TTL_S,
                 poll_s: float = 0.5) -> None:
        self.store, self.rel = store, f"{prefix}/{PART_LEASES}/{name.replace('/', '__')}.json"
        self.ttl_s, self.poll_s = ttl_s, poll_s
        self.writer_id = uuid.uuid4().hex
        self.holding = False

    def _body(self) -> bytes:
        return json.dumps({"writer": self.writer_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def acquire(self, done: Callable[[], bool]) -> bool:
        """Hold the lease (True), or return False once ``done()`` says the file exists."""
        while not done():
            if self.store.create_exclusive(self.rel, self._body()):
                self.holding = True
                if done():  # finished by another writer between our check and our lease
                    self.release()
                    return False
                return True
            try:
                lease = self.store.read_json(self.rel)
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(self.poll_s)
                continue
            if _lease_is_stale(lease, self.ttl_s):
                self.store.rm(self.rel)
            else:
                time.sleep(self.poll_s)
        return False

    def heartbeat(self) -> None:
        if self.holding:
            self.store.write_bytes(self.rel, self._body())

    def release(self) -> None:
        if self.holding:
            self.store.rm(self.rel)
            self.holding = False

    @contextmanager
    def keep_alive(self, every_s: float = 60.0) -> Iterator[None]:
        with _beating(self.heartbeat, every_s):
            yield


@contextmanager
def _beating(beat: Callable[[], None], every_s: float) -> Iterator[None]:
    """Call ``beat`` every ``every_s`` seconds in a daemon thread while the block runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            try:
                beat()
            except Exception:  # a missed heartbeat is not worth failing the writer; the next
                pass           # one (or the TTL's 30 minutes) covers it

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
