"""What every stage shares: its cache key, its code fingerprint and how it commits.

A stage is a plain function ``run_<stage>(store, config, inputs...) -> Manifest`` that is cheap to
call when its output already exists: it computes its key first and returns the committed manifest
without loading any model. Prefect tasks (``flows/``) wrap these functions and pass manifests'
small refs, never data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from storage import Manifest, StageOutput, Store, code_fingerprint, read_manifest, stage_key
from storage.keys import normalise

log = logging.getLogger("dflash")


# The model code the prompts and generate stages run (tests/test_models_prompts.py checks that
# these files and those stages import nothing else from the package).
GENERATION_CODE = ("dflash_models/__init__.py", "dflash_models/generation.py",
                   "dflash_models/target.py")


def stage_code(module: str, extra_files: tuple[str, ...] = (),
               models: tuple[str, ...] | None = None) -> str:
    """Fingerprint of the code a stage runs: its task module, tasks/base.py, the storage format
    files (see storage/keys.py) and its model code: all of ``dflash_models/``, or only the files
    ``models`` names, so that a stage which runs little of it (generation, filtering) stays
    cached across edits to the training code. Reports, flows and the CLI do not count."""
    files = [f"tasks/{module}.py", "tasks/base.py", *extra_files]
    if models is None:
        return code_fingerprint(files)
    return code_fingerprint([*files, *models], packages=())


def key_for(stage: str, config: Any, inputs: Mapping[str, Manifest], code: str) -> str:
    return stage_key(stage, normalise(config), {k: m.digest for k, m in inputs.items()}, code)


def cached(store: Store, stage: str, config: Any, inputs: Mapping[str, Manifest],
           code: str) -> tuple[str, Manifest | None]:
    """(key, committed manifest or None) without doing any work."""
    key = key_for(stage, config, inputs, code)
    return key, read_manifest(store, stage, key)


def run_stage(store: Store, stage: str, config: Any, inputs: Mapping[str, Manifest], code: str,
              build: Callable[[StageOutput], Manifest], force: bool = False) -> Manifest:
    """Return the committed output of this stage, building it under the writer lease if needed.

    ``force`` rebuilds even when a manifest exists: the old output is removed first (a committed
    manifest is never overwritten in place).
    """
    key = key_for(stage, config, inputs, code)
    if force and read_manifest(store, stage, key) is not None:
        log.info("%s: --force, removing committed output %s", stage, key)
        store.rm(f"{stage}/{key}", recursive=True)
    with StageOutput(store, stage, key, config=normalise(config),
                     inputs={k: m.digest for k, m in inputs.items()}, code_fingerprint=code) as out:
        if out.manifest is not None:
            log.info("%s: cached (%s)", stage, key)
            return out.manifest
        manifest = build(out)
        log.info("%s: committed %s", stage, key)
        return manifest
