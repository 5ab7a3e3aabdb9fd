"""Stage ``generations``: the target answers the prompt set, into resumable Parquet shards.

The API is shaped for a Prefect map over shards::

    plan = plan_generation(store, cfg, target_m, prompts_m)   # key, shards, shards already done
    for i in plan.pending(): generate_shard(store, plan, i)   # any worker, any order, idempotent
    manifest = commit_generation(store, plan)                 # checks the accounting, commits

``run_generate`` does all three under the stage's writer lease. Shard ``i`` is written as
``shard-0000i.parquet`` (table ``generations``) after ``errors-0000i.parquet`` (table
``generation_errors``); a shard counts as done once its shard file is recorded, so a run killed
with SIGKILL resumes at the first missing shard and never regenerates, duplicates or loses one.
Every prompt ends in exactly one of the two tables, and the commit checks it.

An ``originals`` prompt (``regenerate = false``, see tasks/prompts.py) is not sent to the target:
its row carries the rendered prompt's token ids, an empty response and ``finish_reason =
'reference'``, and training uses its ``reference_response``. Such rows sit after the regenerated
ones in the prompt table and fill shards of their own, ``ORIGINALS_SHARD_FACTOR`` times larger,
that load only the tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from dflash_models.generation import GenOutput, SamplingParams, encode_prompt, render_prompt
from storage import Manifest, Store, read_manifest
from storage.errors import StoreError
from storage.manifest import MANIFEST, PARTS, FileEntry, PartLease, StageOutput, write_part
from storage.parquet import read_parquet, to_parquet_bytes
from tasks.backends import (
    GenRow,
    OpenAIConfig,
    check_server,
    get_backend,
    render_thinking,
    too_long,
)
from tasks.base import GENERATION_CODE, key_for, run_stage, stage_code
from tasks.progress import Progress
from tasks.prompts import MESSAGES_TYPE

log = logging.getLogger("dflash")
STAGE = "generations"
GEN_TABLE, ERR_TABLE = "generations", "generation_errors"
GENERATIONS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("source", pa.string()), ("messages", MESSAGES_TYPE),
    ("prompt_token_ids", pa.list_(pa.int32())), ("response_token_ids", pa.list_(pa.int32())),
    ("response_text", pa.string()), ("finish_reason", pa.string()),
    ("n_prompt_tokens", pa.int32()), ("n_response_tokens", pa.int32()),
    ("target", pa.struct([("ref", pa.string()), ("digest", pa.string())])),
    ("temperature", pa.float64()), ("top_p", pa.float64()), ("max_new_tokens", pa.int32()),
    ("seed", pa.int64()), ("backend", pa.string()), ("latency_s", pa.float64()),
    ("reference_response", pa.string()), ("parent_prompt_id", pa.string()),
    # where the row came from: the server's base URL (NULL for hf and originals), whose token
    # ids these are (server | retokenized | hf | reference), our request id, requests sent
    ("server", pa.string()), ("token_ids_from", pa.string()), ("request_id", pa.string()),
    ("attempts", pa.int32()),
])
ERRORS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("reason", pa.string()),
                           ("backend", pa.string()), ("shard", pa.int32())])


class GenerateConfig(BaseModel):
    """Sampling, sharding and backend settings. ``token_budget``, ``max_batch_size``, ``threads``
    and the openai connection knobs are runtime-only: changing them resumes, not restarts."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["hf", "openai"] = "hf"
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    shard_size: int = Field(64, ge=1, description="prompts per shard (the unit of resume)")
    token_budget: int = Field(16384, ge=1, description="hf: padded tokens per batch")
    max_batch_size: int = Field(64, ge=1, description="hf: rows per batch at most")
    threads: int | None = Field(None, ge=1, description="hf on CPU: torch threads (default: all)")
    thinking: bool | None = Field(None, description="the chat template's thinking switch (on | "
                                  "off); null: the template's default. In the key")
    shards_in_flight: int | None = Field(None, ge=1, description="shards generated at once "
                                         "(default: hf 1, openai enough to fill the fleet)")
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)


class ShardSpec(BaseModel):
    index: int
    start: int  # row range [start, end) of the prompts table
    end: int


class GenerationPlan(BaseModel):
    """Everything a shard worker needs, small and JSON-able (Prefect passes it to each task)."""

    key: str
    prefix: str
    config: GenerateConfig
    stage_config: dict[str, Any]
    inputs: dict[str, str]
    code: str
    target_key: str
    target_ref: str
    target_digest: str
    dtype: str | None = None
    device: str | None = None
    prompts_key: str
    prompts_files: list[str]
    n_prompts: int
    shards: list[ShardSpec]
    done: list[int] = Field(default_factory=list)
    committed: dict[str, str] | None = None

    def pending(self) -> list[int]:
        done = set(self.done)
        return [s.index for s in self.shards if s.index not in done]


ORIGINALS_SHARD_FACTOR = 16  # an originals-only shard only tokenises its prompts


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def errors_name(i: int) -> str:
    return f"errors-{i:05d}.parquet"


# ----------------------------------------------------------------------------- planning
def _code() -> str:
    return stage_code("generate", ("tasks/backends.py", "tasks/fleet.py", "tasks/prompts.py"),
                      GENERATION_CODE)


def _stage_config(cfg: GenerateConfig, target_m: Manifest) -> dict[str, Any]:
    """What can change the generated bytes (the cache key); runtime knobs are left out."""
    out: dict[str, Any] = cfg.model_dump(mode="json", include={
        "backend", "max_new_tokens", "temperature", "top_p", "seed", "shard_size"})
    if cfg.thinking is not None:  # unset leaves older keys as they were
        out["thinking"] = cfg.thinking
    if cfg.backend == "openai":  # which servers answer, and how many at once, is not content
        out["openai"] = {"model": cfg.openai.model}
    else:
        out["runtime"] = _runtime(target_m)
    return out


def _runtime(target_m: Manifest) -> dict[str, str]:
    """Device type and dtype the hf backend will use here (bf16 on CUDA, fp32 on CPU)."""
    import torch

    device = target_m.extra.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = str(device).split(":")[0]
    dtype = target_m.extra.get("dtype") or ("bfloat16" if kind == "cuda" else "float32")
    return {"device_type": kind, "dtype": dtype}


def plan_generation(store: Store, cfg: GenerateConfig, target_m: Manifest, prompts_m: Manifest,
                    force: bool = False) -> GenerationPlan:
    """Key, shard layout and the shards already recorded (no model loads)."""
    stage_cfg, code = _stage_config(cfg, target_m), _code()
    inputs = {"target": target_m, "prompts": prompts_m}
    key = key_for(STAGE, stage_cfg, inputs, code)
    if force and store.exists(f"{STAGE}/{key}/{MANIFEST}"):  # even a corrupt one
        store.rm(f"{STAGE}/{key}", recursive=True)
    files = [f"{prompts_m.prefix}/{f.path}" for f in prompts_m.files_for("prompts")]
    table = _read_prompts(store, tuple(files), ("parent_prompt_id", "regenerate"))
    parents = table["parent_prompt_id"]
    shards = layout_shards(parents.to_pylist(), cfg.shard_size, table["regenerate"].to_pylist())
    prefix = f"{STAGE}/{key}"
    committed = read_manifest(store, STAGE, key)
    done = [s.index for s in shards if committed is not None
            or _is_recorded(store, prefix, shard_name(s.index))]
    if len(done) < len(shards):  # shards to send: every server answers, before any shard runs
        validate_generate(cfg)
    return GenerationPlan(
        key=key, prefix=prefix, config=cfg, stage_config=stage_cfg,
        inputs={k: m.digest for k, m in inputs.items()}, code=code, target_key=target_m.key,
        target_ref=str(target_m.extra.get("source")), target_digest=str(target_m.extra["digest"]),
        dtype=target_m.extra.get("dtype"), device=target_m.extra.get("device"),
        prompts_key=prompts_m.key, prompts_files=files, n_prompts=len(parents), shards=shards,
        done=done, committed=committed.ref(store) if committed is not None else None)


def layout_shards(parents: list[str | None], shard_size: int,
                  regenerate: list[bool] | None = None) -> list[ShardSpec]:
    """Row ranges of ``shard_size`` rows; a dependent turn never leaves its parent's shard.

    Originals (``regenerate`` False) start a new shard and fill shards ``ORIGINALS_SHARD_FACTOR``
    times larger: they cost a tokenisation, not a generation.
    """
    regenerate = regenerate or [True] * len(parents)
    shards, start = [], 0
    for i, parent in enumerate(parents):
        size = shard_size if regenerate[start] else shard_size * ORIGINALS_SHARD_FACTOR
        boundary = regenerate[i] != regenerate[start]
        if (i - start >= size or boundary) and parent is None:
            shards.append(ShardSpec(index=len(shards), start=start, end=i))
            start = i
    if start < len(parents):
        shards.append(ShardSpec(index=len(shards), start=start, end=len(parents)))
    return shards


def _is_recorded(store: Store, prefix: str, name: str) -> FileEntry | None:
    """The record of one finished file (one read, not a listing of all records)."""
    try:
        entry = FileEntry(**store.read_json(f"{prefix}/{PARTS}/{name}.json"))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return entry if store.exists(f"{prefix}/{name}") else None


_PROMPTS_CACHE: dict[tuple[str, tuple[str, ...], tuple[str, ...]], pa.Table] = {}
_PROMPTS_LOCK = threading.Lock()


def _read_prompts(store: Store, files: tuple[str, ...], columns: tuple[str, ...]) -> pa.Table:
    """The prompts table (cached per process: every shard of a run reads the same one; the
    paths are content-addressed, so a cached table can never be stale)."""
    key = (store.url, files, columns)
    with _PROMPTS_LOCK:
        if key not in _PROMPTS_CACHE:
            tables = [read_parquet(store, f, columns=columns) for f in files]
            if len(_PROMPTS_CACHE) >= 4:
                _PROMPTS_CACHE.clear()
            _PROMPTS_CACHE[key] = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return _PROMPTS_CACHE[key]


# ----------------------------------------------------------------------------- one shard
def generate_shard(store: Store, plan: GenerationPlan, shard_index: int,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Generate one shard and record it; a shard already recorded (or committed) is skipped.

    The shard's own lease (storage.manifest.PartLease) is held while it is written and kept
    until the commit, so ``dflash gc`` leaves a live generation alone and a concurrent run of the
    same key waits for this shard, then skips it: a shard file is written once."""
    spec = plan.shards[shard_index]
    found: list[FileEntry] = []

    def done() -> bool:
        rec = _is_recorded(store, plan.prefix, shard_name(spec.index))
        found[:] = [rec] if rec is not None else []
        return rec is not None or read_manifest(store, STAGE, plan.key) is not None

    lease = PartLease(store, plan.prefix, shard_name(spec.index))
    if plan.committed or not lease.acquire(done):
        return {"shard": spec.index, "skipped": True, "rows": found[0].rows if found else None}
    try:
        with lease.keep_alive():
            return _generate_shard(store, plan, spec, progress)
    except BaseException:
        lease.release()  # the next writer retries this shard; on success the lease stays
        raise


def _generate_shard(store: Store, plan: GenerationPlan, spec: ShardSpec,
                    progress: Progress | None) -> dict[str, Any]:
    cols = ("prompt_id", "source", "messages", "prompt_text", "reference_response",
            "parent_prompt_id", "regenerate")
    rows = _read_prompts(store, tuple(plan.prompts_files), cols).slice(
        spec.start, spec.end - spec.start).to_pylist()
    backend = _backend(store, plan) if any(r["regenerate"] for r in rows) else \
        _TokenizerOnly(store, plan)
    if progress is None:  # a worker of someone else's map: its own bar/artifact per shard
        with Progress(f"generate shard {spec.index}", total=len(rows), unit="rows") as own:
            results = _answer(backend, rows, plan, spec.index, own)
    else:
        results = _answer(backend, rows, plan, spec.index, progress)
    ok, errors = _tables(rows, results, plan, backend.name, spec.index)
    if ok.num_rows + errors.num_rows != len(rows):  # never write a shard that loses a row
        raise StoreError(f"{plan.prefix}: shard {spec.index} accounts for "
                         f"{ok.num_rows + errors.num_rows} of {len(rows)} prompts")
    write_part(store, plan.prefix, errors_name(spec.index),
               to_parquet_bytes(errors, ERRORS_SCHEMA), rows=errors.num_rows, table=ERR_TABLE)
    write_part(store, plan.prefix, shard_name(spec.index),
               to_parquet_bytes(ok, GENERATIONS_SCHEMA), rows=ok.num_rows, table=GEN_TABLE)
    tokens = sum(ok.column("n_response_tokens").to_pylist())
    return {"shard": spec.index, "skipped": False, "rows": ok.num_rows,
            "errors": errors.num_rows, "tokens": tokens}


def _target_dir(store: Store, plan: GenerationPlan) -> Any:
    """The local folder of the plan's target model (one line if its manifest vanished)."""
    from tasks.models import target_folder

    target_m = read_manifest(store, "targets", plan.target_key)
    if target_m is None:
        raise StoreError(f"store {store.url}: target targets/{plan.target_key} vanished; "
                         "rerun the pipeline")
    return target_folder(target_m, store)


def _backend(store: Store, plan: GenerationPlan) -> Any:
    cfg = plan.config
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return get_backend(cfg.backend, _target_dir(store, plan), dtype=plan.dtype,
                       device=plan.device, token_budget=cfg.token_budget,
                       max_batch_size=cfg.max_batch_size, openai=cfg.openai)


class _TokenizerOnly:
    """What a shard of originals needs from a backend: the target's tokenizer, no model."""

    def __init__(self, store: Store, plan: GenerationPlan) -> None:
        from transformers import AutoTokenizer

        self.name = plan.config.backend
        self.tokenizer = AutoTokenizer.from_pretrained(str(_target_dir(store, plan)))


def _answer(backend: Any, rows: list[dict[str, Any]], plan: GenerationPlan, shard: int,
            progress: Progress) -> dict[str, tuple[list[dict[str, str]], list[int], GenOutput]]:
    """Answer first turns, then turns that follow the target's own earlier answer."""
    cfg = plan.config
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                            seed=cfg.seed * 100_003 + shard)
    done: dict[str, tuple[list[dict[str, str]], list[int], GenOutput]] = {}
    for r in rows:  # originals: the rendered prompt's ids, no generation
        if not r["regenerate"]:
            ids = encode_prompt(backend.tokenizer, r["prompt_text"])
            done[r["prompt_id"]] = ([dict(m) for m in r["messages"]], ids,
                                    GenOutput([], "", "reference", 0.0))
            progress.advance(1)
    pending = [r for r in rows if r["regenerate"]]
    while pending:
        ready = [r for r in pending if r["parent_prompt_id"] is None
                 or r["parent_prompt_id"] in done]
        if not ready:  # a parent that is not in this shard: report, never drop
            for r in pending:
                done[r["prompt_id"]] = (r["messages"], [], GenOutput(
                    [], "", "error", 0.0, error=f"turn {r['parent_prompt_id']} is not in the "
                                                "prompt set"))
            break
        ready_ids = {r["prompt_id"] for r in ready}
        pending = [r for r in pending if r["prompt_id"] not in ready_ids]
        gen_rows = [_gen_row(backend, r, done, cfg.thinking) for r in ready]
        todo = [g for g in gen_rows if not isinstance(g[1], GenOutput)]
        outs = iter(backend.generate([g[1] for g in todo], params,
                                     on_done=lambda n, t: progress.advance(n, tokens=t)))
        for r, (messages, item) in zip(ready, gen_rows, strict=True):
            if isinstance(item, GenOutput):  # failed before reaching the backend
                progress.advance(1)
                done[r["prompt_id"]] = (messages, [], item)
            else:
                done[r["prompt_id"]] = (messages, item.prompt_token_ids, next(outs))
    return done


def _gen_row(backend: Any, row: dict[str, Any], done: dict[str, Any], thinking: bool | None
             ) -> tuple[list[dict[str, str]], GenRow | GenOutput]:
    """(messages, a backend row) or (messages, an error output) for one prompt."""
    messages = [dict(m) for m in row["messages"]]
    text = row["prompt_text"]
    parent = row["parent_prompt_id"]
    if parent is not None:
        _, _, prev = done[parent]
        if prev.finish_reason == "error":
            return messages, GenOutput([], "", "error", 0.0,
                                       error=f"turn {parent} failed: {prev.error}")
        messages[-2]["content"] = prev.text  # the placeholder takes the target's own answer
        text = render_prompt(backend.tokenizer, messages)
    if thinking is not None:  # the prompt stage renders with the template's default
        text = render_thinking(backend.tokenizer, messages, thinking)
    ids = encode_prompt(backend.tokenizer, text)
    reason = too_long(len(ids), backend.context)
    if reason:
        return messages, GenOutput([], "", "error", 0.0, error=reason)
    return messages, GenRow(row["prompt_id"], messages, text, ids)


def _tables(rows: list[dict[str, Any]], results: dict[str, Any], plan: GenerationPlan,
            backend: str, shard: int) -> tuple[pa.Table, pa.Table]:
    cfg, ok, err = plan.config, [], []
    for r in rows:
        messages, ids, out = results[r["prompt_id"]]
        if out.finish_reason == "error":
            err.append({"prompt_id": r["prompt_id"], "reason": out.error or "unknown error",
                        "backend": backend, "shard": shard})
            continue
        ok.append({
            "prompt_id": r["prompt_id"], "source": r["source"], "messages": messages,
            "prompt_token_ids": ids, "response_token_ids": out.token_ids,
            "response_text": out.text, "finish_reason": out.finish_reason,
            "n_prompt_tokens": len(ids), "n_response_tokens": len(out.token_ids),
            "target": {"ref": plan.target_ref, "digest": plan.target_digest},
            "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "backend": backend,
            "latency_s": out.latency_s, "reference_response": r["reference_response"],
            "parent_prompt_id": r["parent_prompt_id"], **_origin(out, backend)})
    return (pa.Table.from_pylist(ok, schema=GENERATIONS_SCHEMA),
            pa.Table.from_pylist(err, schema=ERRORS_SCHEMA))


def _origin(out: GenOutput, backend: str) -> dict[str, Any]:
    """The row's server, token-id source, request id and attempts (see GENERATIONS_SCHEMA)."""
    if out.finish_reason == "reference":
        return {"server": None, "token_ids_from": "reference", "request_id": None, "attempts": 0}
    if backend == "hf":
        return {"server": None, "token_ids_from": "hf", "request_id": None, "attempts": 1}
    return {"server": getattr(out, "server", None),
            "token_ids_from": getattr(out, "token_ids_from", "retokenized"),
            "request_id": getattr(out, "request_id", None), "attempts": getattr(out, "attempts", 1)}


# ----------------------------------------------------------------------------- commit
def commit_generation(store: Store, plan: GenerationPlan,
                      out: StageOutput | None = None) -> Manifest:
    """Check that every prompt is in exactly one shard's output, then write the manifest.

    Without ``out`` (a Prefect task after the map) it takes the stage's lease itself.
    """
    if out is None:
        with StageOutput(store, STAGE, plan.key, config=plan.stage_config, inputs=plan.inputs,
                         code_fingerprint=plan.code) as own:
            return own.manifest or commit_generation(store, plan, own)
    if out.manifest is not None:
        return out.manifest
    recorded = out.recorded()
    names = [n for s in plan.shards for n in (errors_name(s.index), shard_name(s.index))]
    missing = [shard_name(s.index) for s in plan.shards if shard_name(s.index) not in recorded
               or errors_name(s.index) not in recorded]
    if missing:
        raise StoreError(f"{plan.prefix}: cannot commit, {len(missing)} of {len(plan.shards)} "
                         f"shard(s) not generated (first: {missing[0]}); run generate again to "
                         "resume")
    extra = _accounting(store, plan, recorded)
    return out.commit(files=names, extra=extra)


def _accounting(store: Store, plan: GenerationPlan, recorded: dict[str, FileEntry]
                ) -> dict[str, Any]:
    """Success + errors = input count, per shard and by prompt id; summary figures."""
    want = _read_prompts(store, tuple(plan.prompts_files), ("prompt_id",))["prompt_id"]
    ok_ids, err_ids, finish, tokens, reasons = [], [], {}, 0, {}
    servers: dict[str, dict[str, int]] = {}
    id_sources: dict[str, int] = {}
    for s in plan.shards:
        g = read_parquet(store, f"{plan.prefix}/{shard_name(s.index)}",
                         columns=("prompt_id", "finish_reason", "n_response_tokens", "server",
                                  "token_ids_from", "attempts"))
        e = read_parquet(store, f"{plan.prefix}/{errors_name(s.index)}",
                         columns=("prompt_id", "reason"))
        if g.num_rows + e.num_rows != s.end - s.start:
            raise StoreError(f"{plan.prefix}: shard {s.index} holds {g.num_rows} + {e.num_rows} "
                             f"rows for {s.end - s.start} prompts; not committing")
        ok_ids += g["prompt_id"].to_pylist()
        err_ids += e["prompt_id"].to_pylist()
        tokens += sum(g["n_response_tokens"].to_pylist())
        for f in g["finish_reason"].to_pylist():
            finish[f] = finish.get(f, 0) + 1
        for src in g["token_ids_from"].to_pylist():
            id_sources[src] = id_sources.get(src, 0) + 1
        for url, n in zip(g["server"].to_pylist(), g["attempts"].to_pylist(), strict=True):
            if url is not None:  # rows answered, and the extra requests they took
                c = servers.setdefault(url, {"rows": 0, "retries": 0})
                c["rows"], c["retries"] = c["rows"] + 1, c["retries"] + n - 1
        for r in e["reason"].to_pylist():
            head = r.split(";")[0].split(" (")[0][:80]
            reasons[head] = reasons.get(head, 0) + 1
    got = ok_ids + err_ids
    if len(got) != len(set(got)) or set(got) != set(want.to_pylist()):
        raise StoreError(f"{plan.prefix}: generated prompt ids do not match the prompt set "
                         f"({len(got)} rows, {len(set(got))} distinct, {len(want)} prompts); "
                         "not committing")
    return {"n_prompts": len(want), "n_generated": len(ok_ids), "n_errors": len(err_ids),
            "finish_reasons": finish, "response_tokens": tokens, "error_reasons": reasons,
            "target": {"ref": plan.target_ref, "digest": plan.target_digest},
            "backend": plan.config.backend, "shards": len(plan.shards),
            "servers": servers, "token_ids_from": id_sources}


# ----------------------------------------------------------------------------- whole stage
def validate_generate(cfg: GenerateConfig) -> None:
    """Checks that need no model: the openai server answers (one line if not)."""
    if cfg.backend == "openai":
        check_server(cfg.openai)


def run_generate(store: Store, cfg: GenerateConfig, target_m: Manifest, prompts_m: Manifest,
                 map_fn: Callable[[Callable[[int], Any], list[int]], Iterable[Any]] | None = None,
                 force: bool = False) -> Manifest:
    """Plan, generate the missing shards (``map_fn``, default a loop) and commit, under the lease."""
    stage_cfg = _stage_config(cfg, target_m)
    inputs = {"target": target_m, "prompts": prompts_m}
    if force or read_manifest(store, STAGE, key_for(STAGE, stage_cfg, inputs, _code())) is None:
        validate_generate(cfg)

    def build(out: StageOutput) -> Manifest:
        plan = plan_generation(store, cfg, target_m, prompts_m)
        pending = plan.pending()
        log.info("generate: %d shard(s), %d already done", len(plan.shards), len(plan.done))
        with _Heartbeat(out):
            if map_fn is not None:
                list(map_fn(functools.partial(generate_shard, store, plan), pending))
            else:
                todo = sum(plan.shards[i].end - plan.shards[i].start for i in pending)
                with Progress("generate", total=todo, unit="rows") as progress:
                    run_shards(store, plan, pending, _LockedProgress(progress),
                               shards_in_flight(cfg))
        return commit_generation(store, plan, out)

    return run_stage(store, STAGE, stage_cfg, inputs, _code(), build, force=force)


def shards_in_flight(cfg: GenerateConfig) -> int:
    """Shards to generate at once: hf takes one model in turns (1); openai enough shards to fill
    every server's slots, plus one so a shard's slow tail leaves no slot idle. What a flow's
    task runner should use for its map over shards."""
    if cfg.shards_in_flight is not None:
        return cfg.shards_in_flight
    if cfg.backend == "hf":
        return 1
    total = cfg.openai.concurrency * len(cfg.openai.urls())
    return -(-total // cfg.shard_size) + 1


def run_shards(store: Store, plan: GenerationPlan, indices: list[int], progress: Any,
               workers: int) -> list[dict[str, Any]]:
    """Generate ``indices`` with ``workers`` shards in flight (threads: the work is HTTP or one
    locked model); the first failure cancels the shards not started and is raised."""
    if workers <= 1 or len(indices) <= 1:
        return [generate_shard(store, plan, i, progress) for i in indices]
    with ThreadPoolExecutor(max_workers=min(workers, len(indices))) as pool:
        futures = [pool.submit(generate_shard, store, plan, i, progress) for i in indices]
        try:
            return [f.result() for f in as_completed(futures)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


class _LockedProgress:
    """One progress bar advanced from several shard threads."""

    def __init__(self, progress: Progress) -> None:
        self._progress, self._lock = progress, threading.Lock()

    def advance(self, n: int = 1, tokens: int = 0, note: str = "") -> None:
        with self._lock:
            self._progress.advance(n, tokens=tokens, note=note)


class _Heartbeat:
    """Refresh the writer lease while shards run elsewhere, so no one takes a live run over."""

    def __init__(self, out: StageOutput, every_s: float = 60.0) -> None:
        self.out, self.every_s = out, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.out._heartbeat()
            except Exception as e:  # a missed heartbeat is not worth failing the stage
                log.warning("generate: lease heartbeat failed (%s)", e)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
