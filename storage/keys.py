"""Cache keys: a stage output lives at ``<stage>/<key>/`` with key = hash(stage, config, inputs, code).

The key changes exactly when the output could change: the stage's normalised config, the digests
of the manifests it reads, or the source code it runs. Code fingerprints hash the files of the
stage's own task module, the whole ``dflash_models/`` package and the storage *format* code
(``storage/manifest.py``, ``storage/parquet.py``, ``storage/keys.py``): not reports, flows or CLI,
which cannot change a stage's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY_LEN = 20  # hex chars of sha256 kept in paths: 80 bits, plenty for a content cache
FORMAT_FILES = ("storage/manifest.py", "storage/parquet.py", "storage/keys.py")


def normalise(value: Any) -> Any:
    """Canonical JSON-able form: sorted dicts, tuples as lists, paths as strings, floats stable."""
    if isinstance(value, Mapping):
        return {str(k): normalise(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(normalise(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)  # 1.0 and 1 name the same config
        return value
    if hasattr(value, "model_dump"):  # pydantic models
        return normalise(value.model_dump(mode="json"))
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def code_fingerprint(files: Iterable[str | Path], packages: Iterable[str] = ("dflash_models",)) -> str:
    """Hash the named source files, every ``*.py`` under ``packages`` and the storage format files.

    Paths are relative to the repository root and are hashed together with their contents, so a
    rename counts as a change. Missing files raise: a fingerprint must never silently shrink.
    """
    paths: set[Path] = {REPO_ROOT / f for f in (*files, *FORMAT_FILES)}
    for pkg in packages:
        paths.update((REPO_ROOT / pkg).rglob("*.py"))
    h = hashlib.sha256()
    for p in sorted(paths):
        rel = p.relative_to(REPO_ROOT).as_posix()
        if not p.is_file():
            raise FileNotFoundError(f"code fingerprint: source file {rel} does not exist")
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def stage_key(stage: str, config: Any, inputs: Mapping[str, str] | None, code: str) -> str:
    """The content address of a stage output.

    ``inputs`` maps an input's name to its manifest digest (``Manifest.digest``).
    """
    payload = {"stage": stage, "config": config, "inputs": dict(inputs or {}), "code": code}
    return digest(payload)[:KEY_LEN]
