"""Stage 4: benchmark decoding methods at batch 1 and append hardware-tagged rows to a SQL history.

Every method x dataset x temperature (x block size for `dflash`) runs on the same prompts in one
process, interleaved prompt by prompt so that machine noise hits all methods alike; warm-up calls
are not timed. Results go to an append-only history, one file per run, never rewritten:

    benchmarks/summary/hw=<hardware_tag>/date=<YYYY-MM-DD>/run-<run_id>.parquet   (benchmarks)
    benchmarks/samples/hw=<hardware_tag>/date=<YYYY-MM-DD>/run-<run_id>.parquet   (samples view)

A run's samples and summary are one commit: both files, then ``benchmarks/runs/run-<id>.json``
(storage/history.py); the views read only recorded runs. Beside the history, a committed stage
output ``bench_runs/<key>/`` marks that a result exists for this draft, config, target and
hardware fingerprint. Its lease is taken BEFORE measuring, so a concurrent run of the same key
waits and returns the first one's result, and ``result.json`` is recorded before the history is
appended, so a writer killed after the history's commit is resumed without measuring again: a
draft is in the history once unless ``rerun`` is on (scheduled deployments always rerun).
Names, metrics and schemas: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import DflashError, Manifest, StageOutput, Store, history
from storage.hardware import hardware_fingerprint, hardware_info, hardware_tag, slug
from storage.keys import REPO_ROOT, digest
from storage.parquet import to_parquet_bytes
from storage.verify import verified_bytes, verify_entries
from tasks import bench_methods as bm
from tasks.base import cached, run_stage, stage_code
from tasks.bench_stats import (
    SAMPLES_SCHEMA,
    SUMMARY_SCHEMA,
    Run,
    audit,
    sample_row,
    summary_rows,
)
from tasks.progress import Progress, run_hooks

log = logging.getLogger("dflash")

STAGE = "bench_runs"
SUMMARY_DIR, SAMPLES_DIR = "benchmarks/summary", "benchmarks/samples"
Method = Literal["hf_generate", "ar", "dflash", "classic", "hf_assisted", "prompt_lookup"]
Dataset = Literal["mt_bench", "humaneval", "eval_split"]


class BenchConfig(BaseModel):
    """What to benchmark. Everything except `rerun` is part of the skip key."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[Dataset] = Field(default_factory=lambda: list(bm.DATASETS))
    n_prompts: int = Field(8, ge=1, description="prompts per dataset")
    max_new_tokens: int = Field(64, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [0.0], description="0.0 = greedy")
    block_sizes: list[int] = Field(
        default_factory=list,
        description="dflash blocks; [] = the draft's own. Only sizes <= the trained block run.")
    methods: list[Method] = Field(default_factory=lambda: list(bm.METHODS))
    repeats: int = Field(1, ge=1, description="timed generations per prompt and method")
    warmup_prompts: int = Field(1, ge=0, description="untimed calls per method before timing")
    warmup_new_tokens: int = Field(8, ge=1)
    prompt_lookup_num_tokens: int = Field(10, ge=1)
    classic_k: int = Field(4, ge=1, description="draft tokens per step of the engine's classic")
    near_tie_margin: float | None = Field(
        None, ge=0, description="logit margin below which a T=0 divergence is numeric noise; "
        "None: 0.01 in float32, 0.5 in 16-bit dtypes")
    engine: Literal["auto", "static", "fast", "general"] = Field(
        "auto", description="the engine methods' target path: static (dflash_models/static_lm.py: "
        "fixed shapes, CUDA graphs on CUDA), fast (fast_target.py), both for Llama/Mistral/Qwen2/"
        "Qwen3 layouts; general (transformers' forward, any causal LM); auto: static on CUDA, "
        "fast elsewhere, where the family is supported")
    compile: bool = Field(True, description="static path on CUDA: compile each decoder layer with "
                          "inductor inside the CUDA graphs (~20 s per pass shape at 8B)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's "
                                "default. 1 is steadier on a machine shared with other jobs")
    rerun: bool = False
    seed: int = 0

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if not v or any(t < 0 for t in v):
            raise ValueError("temperatures must be a non-empty list of values >= 0 (0.0 = greedy)")
        return sorted({float(t) for t in v})

    @field_validator("block_sizes")
    @classmethod
    def _blocks(cls, v: list[int]) -> list[int]:
        if any(b < 2 for b in v):
            raise ValueError("block sizes must be >= 2 (anchor + at least one mask)")
        return sorted(set(v))

    @field_validator("datasets", "methods")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must not be empty")
        return list(dict.fromkeys(v))

    def key_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"rerun"})

    def tie_margin(self, dtype: str) -> float:
        if self.near_tie_margin is not None:
            return self.near_tie_margin
        return 0.01 if dtype == "float32" else 0.5


# ------------------------------------------------------------------------------- inputs
@dataclass
class TargetSource:
    """A target known by name and digest before any weights are read."""

    ref: str
    digest: str
    manifest: Manifest | None = None
    folder: Path | None = None
    loaded: Any = None  # a dflash_models.target.Target handed in by a caller
    store: Store | None = None  # where a manifest's uploaded weights can be fetched from

    def local(self) -> Path:
        if self.folder is None and self.manifest is not None:
            from tasks.models import target_folder

            self.folder = Path(target_folder(self.manifest, self.store))
        assert self.folder is not None
        return self.folder


@dataclass
class DraftSource:
    kind: str  # "dflash" | "classic"
    ref: str
    digest: str
    folder: Path | None = None
    fetch: Any = None  # () -> Path, for drafts that live in a remote store
    verify: Any = None  # () -> None: a stored draft's files against its manifest, before loading

    def local(self) -> Path:
        if self.verify is not None:
            self.verify()
            self.verify = None
        if self.folder is None:
            self.folder = self.fetch()
        return self.folder


def resolve_ref(ref: str | Path, what: str) -> Path:
    """A model reference -> local folder: a path, `packaged:NAME` or a hub id (if reachable)."""
    from tasks.models import resolve_model

    try:
        return resolve_model(str(ref))
    except DflashError as e:
        raise DflashError(f"{what}: {e}") from None


def _target_source(target: Any, ref: str | None, store: Store) -> TargetSource:
    if isinstance(target, Manifest):  # the targets stage's manifest: source + model digest
        extra = target.extra or {}
        return TargetSource(str(ref or extra.get("source") or target.prefix),
                            str(extra.get("digest") or target.digest), manifest=target, store=store)
    if hasattr(target, "model") and hasattr(target, "tokenizer"):
        folder = Path(str(getattr(target.model, "name_or_path", "") or "."))
        dig = bm.folder_digest(folder) if folder.is_dir() and folder != Path(".") else \
            digest(target.model.config.to_dict())
        return TargetSource(ref or folder.name, dig, folder=folder, loaded=target)
    folder = resolve_ref(target, "target")
    return TargetSource(ref or _folder_label(folder), bm.folder_digest(folder), folder=folder)


def _folder_label(folder: Path) -> str:
    marker = folder / ".complete.json"  # packaged models record where they came from
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("source") or folder.name)
        except (json.JSONDecodeError, OSError):
            pass
    return folder.name


def _train_drafts(store: Store, m: Manifest) -> dict[str, DraftSource]:
    """The exported drafts a train manifest lists: every folder with a config.json, by kind.

    The shallowest folder of each kind wins (checkpoints deeper in the tree are not the export).
    """
    out: dict[str, DraftSource] = {}
    configs = sorted((f for f in m.files if f.path.rsplit("/", 1)[-1] == "config.json"),
                     key=lambda f: (f.path.count("/"), f.path))
    for f in configs:
        rel = f.path.rsplit("/", 1)[0] if "/" in f.path else ""
        arch = json.loads(store.read_bytes(f"{m.prefix}/{f.path}")).get("architectures") or []
        kind = "dflash" if bm.DFLASH_ARCH in arch else "classic"
        if kind in out or not arch:
            continue
        entries = [e for e in m.files if not rel or e.path.startswith(rel + "/")]
        # the same digest as folder_digest() of the exported folder: name -> sha256
        dig = digest({e.path[len(rel):].lstrip("/"): e.sha256 for e in entries})
        prefix = f"{m.prefix}/{rel}".rstrip("/")
        folder = Path(store.path(prefix)) if store.protocol == "file" else None
        out[kind] = DraftSource(kind, f"{m.prefix}/{rel}", dig, folder=folder,
                                fetch=lambda p=prefix, es=entries, r=rel, d=dig:
                                _download(store, m, es, r, d),
                                verify=(lambda es=entries: verify_entries(store, m, es))
                                if folder is not None else None)
    return out


def _download(store: Store, m: Manifest, entries: list, rel: str, dig: str) -> Path:
    """Copy a draft folder out of a remote store once, into the machine's model cache (each
    file checked against the train manifest's size and sha256 on the way)."""
    import os
    import shutil

    from dflash_models.packaged import model_cache_dir

    out = model_cache_dir() / "drafts" / dig[:20]
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    for e in entries:
        dest = tmp / e.path[len(rel):].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(verified_bytes(store, m, e))
    (tmp / ".complete").write_text(dig)
    try:  # never replace a complete copy: another run may be loading it right now
        os.rename(tmp, out)
    except OSError:
        if not (out / ".complete").exists():  # a partial copy of older code: replace it
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _code() -> str:
    extra = ["tasks/bench_methods.py", "tasks/bench_stats.py"]
    if (REPO_ROOT / "tasks" / "prompts.py").is_file():
        extra.append("tasks/prompts.py")
    return stage_code("benchmark", tuple(extra))


def _dtype_name(cfg: BenchConfig, tgt: TargetSource) -> str:
    if tgt.loaded is not None:
        return str(tgt.loaded.dtype).removeprefix("torch.")
    if cfg.dtype:
        return cfg.dtype
    import torch

    on_gpu = torch.cuda.is_available() and not str(cfg.device or "").startswith("cpu")
    return "bfloat16" if on_gpu else "float32"


# ------------------------------------------------------------------------------- the stage
def run_benchmark(store: Store, cfg: BenchConfig, target: Any,
                  train_manifest: Manifest | None = None, eval_manifest: Manifest | None = None,
                  draft_folder: str | Path | None = None, classic_folder: str | Path | None = None,
                  rerun: bool = False, target_ref: str | None = None) -> dict[str, Any]:
    """Benchmark, append to the history, mark the result; return a small JSON-able summary ref.

    `target` is a model folder or ref, the model stage's manifest, or a loaded Target. Drafts come
    from `train_manifest` (its exported folders) or the explicit folders, which win. A method whose
    draft is missing is skipped with a note. Returns ``skipped: True`` without loading any model
    when this draft, config, target and hardware already have a result and rerun is off.
    """
    rerun = rerun or cfg.rerun
    tgt = _target_source(target, target_ref, store)
    drafts = _train_drafts(store, train_manifest) if train_manifest is not None else {}
    for kind, folder in (("dflash", draft_folder), ("classic", classic_folder)):
        if folder is not None:
            p = resolve_ref(folder, "draft")
            drafts[kind] = DraftSource(kind, str(folder), bm.folder_digest(p), folder=p)
    dtype = _dtype_name(cfg, tgt)
    info = dict(hardware_info(dtype))
    fp = hardware_fingerprint(info)
    inputs = {k: m for k, m in (("target", tgt.manifest), ("train", train_manifest),
                                ("eval", eval_manifest)) if m is not None}
    key_cfg = {"bench": cfg.key_config(), "hardware_fingerprint": fp, "target": tgt.digest,
               "drafts": {k: d.digest for k, d in sorted(drafts.items())}}
    code = _code()
    key, marker = cached(store, STAGE, key_cfg, inputs, code)
    if marker is not None and not rerun:
        return _skipped(store, marker)

    shape = bm.target_shape(tgt.local()) if tgt.loaded is None else tgt.loaded
    bm.check_drafts_shape(shape, drafts["dflash"].local() if "dflash" in drafts else None,
                          drafts["classic"].local() if "classic" in drafts else None)
    if marker is not None:  # rerun: one more history run; the marker keeps the first result
        result = _execute(store, cfg, tgt, drafts, eval_manifest, info, dtype)
        _append(store, result)
        return {**result, "key": key, "ref": marker.ref(store)}
    measured: list[dict[str, Any]] = []

    def build(out: StageOutput) -> Manifest:  # under the marker's lease, before measuring
        result = _resumed(store, out)  # a killed writer whose run reached the history
        if result is None:
            with out.keep_alive():
                result = {**_execute(store, cfg, tgt, drafts, eval_manifest, info, dtype),
                          "key": key}
            files = result.pop(_PENDING)
            out.write_json("result.json", result)  # recorded first: a resume finds the run id
            history.append_run(store, result["run_id"], files)
        measured.append(result)
        return out.commit(extra={"run_id": result["run_id"], "summary": result["summary_path"]})

    m = run_stage(store, STAGE, key_cfg, inputs, code, build)
    if not measured:  # a concurrent run of this key committed while we waited for its lease
        return _skipped(store, m)
    return {**measured[0], "ref": m.ref(store)}


_PENDING = "_history_files"  # the run's files, written by the caller of _write under the lease


def _skipped(store: Store, marker: Manifest) -> dict[str, Any]:
    log.info("bench: a result for this draft, config and hardware exists (%s); skipped "
             "(pass rerun to measure again)", marker.key)
    return {**store.read_json(f"{marker.prefix}/result.json"), "skipped": True, "key": marker.key,
            "ref": marker.ref(store)}


def _resumed(store: Store, out: StageOutput) -> dict[str, Any] | None:
    """The result a killed writer of this marker recorded, if its history run was committed."""
    if "result.json" not in out.recorded():
        return None
    result = store.read_json(f"{out.prefix}/result.json")
    runs, _ = history.committed_runs(store)
    if result.get("run_id") not in runs:
        return None  # killed before the history's commit: its files are gc's leftovers
    log.info("bench: resuming %s: run %s is in the history already", out.key, result["run_id"])
    return result


def _append(store: Store, result: dict[str, Any]) -> None:
    history.append_run(store, result["run_id"], result.pop(_PENDING))


def _execute(store: Store, cfg: BenchConfig, tgt: TargetSource, drafts: dict[str, DraftSource],
             eval_manifest: Manifest | None, info: dict[str, Any], dtype: str) -> dict[str, Any]:
    import torch

    notes: list[str] = []
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _measure(store, cfg, tgt, drafts, eval_manifest, info, dtype, notes)
    finally:
        torch.set_num_threads(threads)


def _measure(store: Store, cfg: BenchConfig, tgt: TargetSource, drafts: dict[str, DraftSource],
             eval_manifest: Manifest | None, info: dict[str, Any], dtype: str, notes: list[str]
             ) -> dict[str, Any]:
    import torch

    from dflash_models.engine import default_stop_token_ids
    from dflash_models.target import load_target

    target = tgt.loaded or load_target(tgt.local(), dtype=getattr(torch, dtype), device=cfg.device)
    dflash = bm.load_dflash(drafts["dflash"].local(), target) \
        if "dflash" in drafts and "dflash" in cfg.methods else None
    classic = bm.load_classic(drafts["classic"].local(), target) \
        if "classic" in drafts and {"classic", "hf_assisted"} & set(cfg.methods) else None
    variants = _variants(cfg, dflash, classic, notes)
    # A reduced-vocabulary draft also runs over the full vocabulary: what engines without
    # reduced-vocabulary support (SGLang, the reference) will draft. `full` marks those cells.
    full_vocab = bm.full_vocab_view(dflash)
    ref = ("hf_generate", None, 0.0, False)  # always measured: the reference of speedup, audit
    cells = [ref] + [(m, b, t, full) for t in cfg.temperatures for m, b in variants
                     for full in ((False, True) if m == "dflash" and full_vocab else (False,))
                     if (m, b, t, full) != ref]
    prompts: dict[str, list[bm.Prompt]] = {}
    for ds in cfg.datasets:
        got = bm.load_prompts(ds, cfg.n_prompts, cfg.seed, target.tokenizer, store, eval_manifest)
        if got:
            prompts[ds] = got
        else:
            notes.append(f"{ds}: no prompts (no filter manifest given, or its eval split is "
                         "empty); skipped")
    if not prompts:
        raise DflashError("bench: no dataset has prompts; check the config's datasets")
    for n in notes:
        log.info("bench: %s", n)
    stop = default_stop_token_ids(target)
    # pass lengths the engine will run: decode, each DFlash block, the classic verify
    passes = {1, *(b for m, b in variants if m == "dflash"),
              *([cfg.classic_k + 1] if classic is not None else [])}
    longest = max(len(p.ids) for ps in prompts.values() for p in ps)
    engine_target, path = _engine_target(cfg, target, longest + cfg.max_new_tokens
                                         + 2 * max(passes), sorted(passes))
    info = {**info, "threads": torch.get_num_threads(),  # recorded on every summary row
            "engine_path": path}
    drafter = {full: bm.engine_drafter(engine_target, d, longest + cfg.max_new_tokens,
                                       max(passes))
               for full, d in ((False, dflash), (True, full_vocab)) if d is not None}

    def one(method: str, block: int | None, temp: float, full: bool, ids: list[int],
            seed: int | None, max_new: int) -> bm.Sample:
        if method in bm.ENGINE_METHODS:
            from dflash_models.engine import GenerationConfig

            g = GenerationConfig(max_new_tokens=max_new, temperature=temp, stop_token_ids=stop,
                                 seed=seed, block_size=block, k=cfg.classic_k)
            return bm.run_engine(method, engine_target, ids, g, draft=drafter.get(full),
                                 classic_lm=classic)
        return bm.run_hf(target, ids, temperature=temp, max_new_tokens=max_new, stop=stop,
                         seed=seed, assistant=classic if method == "hf_assisted" else None,
                         prompt_lookup_num_tokens=cfg.prompt_lookup_num_tokens
                         if method == "prompt_lookup" else None)

    warm = [p for ps in prompts.values() for p in ps][: cfg.warmup_prompts]
    for method, block, temp, full in cells:  # untimed: first calls pay allocation and setup
        for p in warm:
            one(method, block, temp, full, p.ids, cfg.seed,
                min(cfg.warmup_new_tokens, cfg.max_new_tokens))
    runs: list[Run] = []
    total = sum(len(ps) for ps in prompts.values()) * len(cells) * cfg.repeats
    with Progress("bench", total=total, unit="generations") as prog:
        for ds, ps in prompts.items():
            for i, p in enumerate(ps):
                for method, block, temp, full in cells:  # interleaved: drift hits all alike
                    vocab = bm.draft_vocab(dflash) if method == "dflash" and not full else None
                    for rep in range(cfg.repeats):
                        seed = (cfg.seed * 1_000_003 + i * 1009 + rep) if temp > 0 else None
                        s = one(method, block, temp, full, p.ids, seed, cfg.max_new_tokens)
                        runs.append(Run(ds, p, method, block, temp, rep, seed, s,
                                        draft_vocab=vocab))
                        prog.advance(1, tokens=len(s.output_ids), note=f"{ds} {method}")
    audit(runs, target, cfg.tie_margin(dtype))
    return _write(store, cfg, runs, tgt, drafts, info, notes)


def _engine_target(cfg: BenchConfig, target: Any, max_len: int, passes: list[int]
                   ) -> tuple[Any, str]:
    """(the Target the engine methods run on, its path's name). The fast paths share the
    weights (plus fused q|k|v and gate|up copies); the static one also holds a KV cache of
    ``max_len`` positions and, on CUDA, one graph per pass length in ``passes``.
    transformers' methods keep the general target."""
    from dflash_models.fast_target import FastLM, supports
    from dflash_models.static_lm import StaticLM
    from dflash_models.target import Target

    why = supports(target.model) if cfg.engine != "general" else "engine: general"
    if why is not None:
        if cfg.engine in ("fast", "static"):
            raise DflashError(f"benchmark.engine: {cfg.engine}: {why}; use engine: auto or general")
        return target, "general"
    cuda = target.device.type == "cuda"
    if cfg.engine == "static" or (cfg.engine == "auto" and cuda):
        model = StaticLM(target.model, max_len, graph_tokens=tuple(passes),
                         compile="inductor" if cuda and cfg.compile else None)
        return Target.from_model(model, target.tokenizer), "static"
    return Target.from_model(FastLM(target.model), target.tokenizer), "fast"


def _variants(cfg: BenchConfig, dflash: Any, classic: Any, notes: list[str]
              ) -> list[tuple[str, int | None]]:
    """(method, block_size) pairs that can run; the reason for each one that cannot."""
    out: list[tuple[str, int | None]] = []
    for m in cfg.methods:
        if m == "dflash":
            if dflash is None:
                notes.append("dflash: no DFlash draft given; skipped")
                continue
            trained = int(dflash.config.block_size)
            for b in cfg.block_sizes or [trained]:
                if b > trained:
                    notes.append(f"dflash block {b}: the draft was trained at block {trained}; a "
                                 "larger block needs retraining; skipped")
                else:
                    out.append(("dflash", b))
        elif m in ("classic", "hf_assisted") and classic is None:
            notes.append(f"{m}: no classic draft given; skipped")
        else:
            out.append((m, None))
    return out


def _write(store: Store, cfg: BenchConfig, runs: list[Run], tgt: TargetSource,
           drafts: dict[str, DraftSource], info: dict[str, Any], notes: list[str]
           ) -> dict[str, Any]:
    """The run's result and its two history files (samples, then summary), not yet written:
    the caller records the result under the marker's lease, then appends (storage/history.py)."""
    now = datetime.now(UTC)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    tag = hardware_tag(info)
    common = {"run_id": run_id, "created_at": now, "target": tgt.ref, "target_digest": tgt.digest,
              "hardware_fingerprint": hardware_fingerprint(info), "hardware_tag": tag}
    draft_cols = {"dflash": drafts.get("dflash"), "classic": drafts.get("classic")}
    samples = [sample_row(r, common, draft_cols) for r in runs]
    rows = summary_rows(runs, cfg, common, draft_cols, info)
    labels = run_hooks().labels()  # flow_run_id, deployment: NULL outside an orchestrated run
    samples, rows = [{**r, **labels} for r in samples], [{**r, **labels} for r in rows]
    part = f"hw={tag}/date={now:%Y-%m-%d}/run-{run_id}.parquet"
    paths, files = {}, {}
    for folder, table_rows, schema in ((SAMPLES_DIR, samples, SAMPLES_SCHEMA),
                                       (SUMMARY_DIR, rows, SUMMARY_SCHEMA)):
        rel = f"{folder}/{part}"
        data = to_parquet_bytes(pa.Table.from_pylist(table_rows, schema=schema), schema, rel)
        files[rel] = (data, len(table_rows))
        paths[folder] = rel
    log.info("bench: run %s: %d summary and %d sample rows for %s", run_id, len(rows),
             len(samples), store.uri(f"{SUMMARY_DIR}/hw={tag}"))
    return {"run_id": run_id, "skipped": False, "created_at": now.isoformat(timespec="seconds"),
            "hardware_tag": tag, "hardware_fingerprint": common["hardware_fingerprint"],
            "target": tgt.ref, "summary_path": paths[SUMMARY_DIR],
            "samples_path": paths[SAMPLES_DIR], "summary_uri": store.uri(paths[SUMMARY_DIR]),
            "samples_uri": store.uri(paths[SAMPLES_DIR]), "notes": notes,
            "rows": [_jsonable(r) for r in rows], _PENDING: files}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


# ------------------------------------------------------------------------------- any draft
def bench_any_draft(store: Store, cfg: BenchConfig, draft_ref: str | Path,
                    target_ref: str | Path, rerun: bool = False) -> dict[str, Any]:
    """`dflash bench --draft PATH --target REF`: benchmark an existing exported draft.

    The draft is our serving-layout DFlash folder or any classic causal-LM folder. Its config is
    checked against the target's config before anything loads, so a draft trained for another
    target fails with one line naming the mismatch.
    """
    draft_dir = resolve_ref(draft_ref, "draft")
    target_dir = resolve_ref(target_ref, "target")
    kind = bm.draft_kind(draft_dir)
    bm.check_drafts_shape(bm.target_shape(target_dir), draft_dir if kind == "dflash" else None,
                          draft_dir if kind == "classic" else None)
    needs = {"dflash": {"dflash"}, "classic": {"classic", "hf_assisted"}}
    other = needs["classic" if kind == "dflash" else "dflash"]
    methods = [m for m in cfg.methods if m not in other] or ["hf_generate"]
    datasets = [d for d in cfg.datasets if d != "eval_split"] or ["mt_bench"]
    run_cfg = cfg.model_copy(update={"methods": methods, "datasets": datasets})
    return run_benchmark(store, run_cfg, target_dir, rerun=rerun or cfg.rerun,
                         target_ref=str(target_ref),
                         draft_folder=draft_dir if kind == "dflash" else None,
                         classic_folder=draft_dir if kind == "classic" else None)


# ------------------------------------------------------------------------------- display
def variant(row: dict[str, Any]) -> str:
    b, k = row.get("block_size"), row.get("draft_vocab")
    name = f"{row['method']} b{b}" if b is not None else str(row["method"])
    return f"{name} V{k}" if k is not None else name


def bench_table_rows(*args: Any) -> list[dict[str, Any]]:
    """A compact table (list of dicts) of one run, for a Prefect table artifact or a terminal.

    Takes `run_benchmark`'s result (or its rows), optionally after the store:
    ``bench_table_rows(result)`` or ``bench_table_rows(store, result)``.
    """
    summary = args[-1]
    rows = summary["rows"] if isinstance(summary, dict) else summary

    def r3(v: Any) -> Any:
        return round(v, 3) if isinstance(v, float) else v

    return [{"method": variant(r), "dataset": r["dataset"], "T": r["temperature"],
             "tau": r3(r.get("tau")), "accept": r3(r.get("acceptance_rate")),
             "tokens/s": r3(r.get("tokens_per_s")), "speedup": r3(r.get("speedup")),
             "exact match": r3(r.get("exact_match_rate")), "ttft p50 s": r3(r.get("ttft_p50")),
             "latency p50 s": r3(r.get("latency_p50"))} for r in rows]


def bench_artifact_key(hardware_tag_: str, target_ref: str) -> str:
    """`bench-<hardware_tag>-<target slug>`: lowercase letters, digits and dashes (Prefect)."""
    return f"bench-{slug(hardware_tag_, 60)}-{slug(target_ref, 40)}"

