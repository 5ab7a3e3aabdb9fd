"""Garbage collection: incomplete outputs, orphan files and uncommitted benchmark runs.

An *incomplete* output is a ``<stage>/<key>/`` folder without a manifest whose writers are not
alive: a live lease (the output's ``_lease.json`` or a shard's ``_leases/<file>.json``) protects a
running stage. An *orphan* is a file inside a committed output that its manifest does not list
(left by a killed writer before a retry committed), or a stray temp file. In the benchmark
history, files of a run without its run record (storage/history.py) are reported and, with
``--yes``, moved aside to ``benchmarks/_uncommitted/`` (temp files are removed). Committed outputs
are never removed; an output whose manifest does not parse is not committed (nothing can read it)
and is removed like an incomplete one, so the next run rebuilds it.
"""

from __future__ import annotations

from typing import Any

from storage import history
from storage.errors import IntegrityError
from storage.manifest import MANIFEST, live_lease, read_manifest
from storage.store import Store


def collect(store: Store, delete: bool = False) -> list[dict[str, Any]]:
    victims: list[dict[str, Any]] = []
    for stage in store.ls(""):
        stage = stage.rsplit("/", 1)[-1]
        if stage.startswith("."):
            continue
        if stage == history.ROOT:
            for f in history.leftovers(store):
                temp = ".tmp-" in f.rsplit("/", 1)[-1]
                victims.append({"path": f, "bytes": store.size(f), "aside": not temp,
                                "reason": "temp file" if temp else "uncommitted benchmark run"})
            continue
        for key_dir in store.ls(stage):
            key = key_dir.rsplit("/", 1)[-1]
            files = store.find(key_dir)
            try:
                manifest = read_manifest(store, stage, key)
            except IntegrityError:  # unreadable, so unusable: a rerun rebuilds it
                victims.append({"path": key_dir, "reason": "corrupt manifest", "recursive": True,
                                "bytes": sum(store.size(f) for f in files)})
                continue
            if manifest is None:
                if live_lease(store, key_dir, files):
                    continue  # a live writer is working here
                size = sum(store.size(f) for f in files)
                victims.append({"path": key_dir, "reason": "incomplete output", "bytes": size,
                                "recursive": True})
                continue
            listed = {f"{key_dir}/{f.path}" for f in manifest.files} | {f"{key_dir}/{MANIFEST}"}
            victims += [{"path": f, "reason": "orphan file", "bytes": store.size(f)}
                        for f in files if f not in listed]
    if delete:
        for v in victims:
            if v.get("aside"):
                v["moved_to"] = history.move_aside(store, v["path"])
            else:
                store.rm(v["path"], recursive=bool(v.get("recursive")))
    return victims
