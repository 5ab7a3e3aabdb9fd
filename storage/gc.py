"""Garbage collection: incomplete outputs and orphan files.

An *incomplete* output is a ``<stage>/<key>/`` folder without a manifest whose writer is not
alive (a live lease protects a running stage). An *orphan* is a file inside a committed output
that its manifest does not list (left by a killed writer before a retry committed), or a stray
temp file. The benchmark history is append-only: only stray temp files are collected there.
"""

from __future__ import annotations

from typing import Any

from storage.manifest import LEASE, LEASE_TTL_S, MANIFEST, _lease_is_stale, read_manifest
from storage.store import Store


def collect(store: Store, delete: bool = False) -> list[dict[str, Any]]:
    victims: list[dict[str, Any]] = []
    for stage in store.ls(""):
        stage = stage.rsplit("/", 1)[-1]
        if stage.startswith("."):
            continue
        if stage == "benchmarks":
            victims += [{"path": f, "reason": "temp file", "bytes": store.size(f)}
                        for f in store.find(stage) if ".tmp-" in f.rsplit("/", 1)[-1]]
            continue
        for key_dir in store.ls(stage):
            key = key_dir.rsplit("/", 1)[-1]
            files = store.find(key_dir)
            manifest = read_manifest(store, stage, key)
            if manifest is None:
                if f"{key_dir}/{LEASE}" in files:
                    try:
                        lease = store.read_json(f"{key_dir}/{LEASE}")
                    except (FileNotFoundError, ValueError):
                        lease = {}
                    if lease and not _lease_is_stale(lease, LEASE_TTL_S):
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
            store.rm(v["path"], recursive=bool(v.get("recursive")))
    return victims
