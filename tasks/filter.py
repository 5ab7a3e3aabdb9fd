"""Stage 2, ``filter``: generations -> a clean, deduplicated train/eval split, every rule counted.

``run_filter(store, cfg, generations_manifest, benchmark_prompts)`` returns the committed
``filter/<key>`` manifest (key = hash(config, benchmark prompt digest, generations digest, code)):

    train/part-*.parquet   table "train": the kept rows, as row references into the generation
                           shards (file, row_no; storage.refs) or, with split_copies, as copies
    eval/part-*.parquet    table "eval": the same, held out by hash of prompt_id
    filter_stats.parquet   table "filter_stats": step, rule, rows_in, rows_removed, rows_out, ...
    filter_overlap.parquet table "filter_overlap": benchmark prompts found in the generations

How it runs (docs/filtering.md has the rules and their order):

1. Before any work: the config, the user predicates (parsed and bound against the shard
   columns) and every shard's schema are checked; errors name the predicate, or shard and column.
2. One DuckDB scan over the shards in place (the store's filesystem is registered with DuckDB)
   reads only the small columns the rules need and yields one narrow row per generation: its
   position, dedupe key, tokens and the first rule that removes it. Contamination and dedupe are
   decided on that narrow table; nothing is pulled into pandas.
3. The split is written as row references (12 bytes a row before compression): readers resolve
   them through ``storage.refs`` (Python) or the catalog's views (SQL). Copying the kept rows
   costs more than all the rules together; with ``split_copies`` it is still done: each shard is
   streamed once more straight out of Parquet by pyarrow (half the decode cost of a DuckDB scan
   exported to Arrow), cut into train/eval by the per-row decisions, and written with pyarrow
   (zstd, byte-stream-split token ids), shards in parallel: DuckDB's own Parquet writer is ~4x
   slower on list columns, which are most bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage import Manifest, StageOutput, Store
from storage.catalog import connect
from storage.errors import ConfigError, DflashError, SchemaError
from storage.keys import digest
from storage.parquet import read_parquet
from storage.refs import refs_extra, refs_parquet_options, refs_table
from tasks.base import cached, run_stage, stage_code
from tasks.filter_rules import (  # noqa: F401  (GENERATIONS_SCHEMA etc. are re-exported)
    GENERATIONS_SCHEMA,
    MESSAGE,
    build_rules,
    check_generation_shards,
    check_generations_schema,
    contamination_sql,
    dedupe_sql,
    features_sql,
    split_sql,
    sql_lit,
    validate_predicates,
)

log = logging.getLogger("dflash")
STAGE = "filter"
CODE_FILES = ("tasks/filter_rules.py", "storage/refs.py")  # refs.py: the split's format
EXECUTION_FIELDS = {"memory_limit", "threads"}  # how it runs, not what it produces: not in key

STATS_SCHEMA = pa.schema([
    ("step", pa.int32()), ("rule", pa.string()), ("rows_in", pa.int64()),
    ("rows_removed", pa.int64()), ("rows_out", pa.int64()), ("tokens_out", pa.int64()),
    ("detail", pa.string()),
])
OVERLAP_SCHEMA = pa.schema([("benchmark_set", pa.string()), ("benchmark_prompt", pa.string()),
                            ("rows_matched", pa.int64())])

BATCH_ROWS = 8_192           # Arrow batch size out of DuckDB when writing
ROW_GROUP_ROWS = 65_536      # rows per written row group
PART_MAX_BYTES = 128 << 20   # a part file is cut here: bounded memory whatever the shard size
_TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids")
_DICT_COLUMNS = ("finish_reason", "target", "backend", "source")
_STATS_COLUMNS = ("prompt_id", "finish_reason", "n_prompt_tokens", "n_response_tokens", "seed",
                  "temperature")


def normalise_prompt_text(text: str) -> str:
    """Lowercase, collapse every whitespace run to one space, strip: what dedupe and the
    contamination guard compare. The SQL twin is ``tasks.filter_rules.norm_sql`` (same whitespace
    set as ``str.split``); for a multi-turn prompt apply it to ``"\\n".join(user turns)``."""
    return " ".join(text.lower().split())


def is_eval_prompt(prompt_id: str, eval_fraction: float, split_seed: int = 0) -> bool:
    """The split rule, reproducible outside DuckDB: the first 60 bits of md5("seed:prompt_id")
    below ``eval_fraction`` of 2**60 -> eval. Every sample of one prompt lands on one side."""
    bits = int(hashlib.md5(f"{split_seed}:{prompt_id}".encode()).hexdigest()[:15], 16)
    return bits < _eval_threshold(eval_fraction)


def _eval_threshold(eval_fraction: float) -> int:
    return int(eval_fraction * (1 << 60))


class FilterConfig(BaseModel):
    """Every rule of the filter stage (all fields but memory_limit/threads enter the cache key)."""

    model_config = ConfigDict(extra="forbid")
    drop_errors: bool = Field(True, description="drop finish_reason = 'error'")
    drop_truncated: bool = Field(False, description="drop finish_reason = 'length' (truncated)")
    drop_empty: bool = Field(True, description="drop empty or whitespace-only responses")
    min_prompt_tokens: int = Field(1, ge=0, description="drop prompts shorter than this")
    max_prompt_tokens: int | None = Field(None, ge=1, description="drop prompts longer than this")
    min_response_tokens: int = Field(1, ge=0, description="drop responses shorter than this")
    max_response_tokens: int | None = Field(None, ge=1, description="drop responses longer")
    ngram_size: int = Field(4, ge=1, le=16, description="n of the degenerate-response n-grams")
    max_repeated_ngram_share: float | None = Field(
        0.5, gt=0, lt=1, description="drop responses whose share of repeated n-grams exceeds "
        "this (loops); null turns the rule off")
    contamination: bool = Field(True, description="drop rows whose prompt is a benchmark prompt")
    contamination_sets: list[str] = Field(
        default_factory=lambda: ["mt_bench", "humaneval"],
        description="benchmark prompt sets to guard against (loaded by tasks.prompts)")
    contamination_prompts: list[str] = Field(
        default_factory=list, description="extra raw prompt texts to guard against")
    predicates: list[str] = Field(
        default_factory=list, description="SQL conditions over the generation columns that a "
        "row must satisfy, e.g. \"latency_s < 30\"; applied in order after the rules")
    dedupe: bool = Field(True, description="keep one row per normalised prompt text")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="share of prompt_ids held out")
    split_seed: int = Field(0, description="salt of the prompt_id hash that decides the split")
    split_copies: bool = Field(
        False, description="write the kept rows' columns into train/eval (a self-contained split "
        "that outlives the generations; about 5x the wall time) instead of row references into the "
        "generation shards")
    memory_limit: str = Field("1GB", description="DuckDB memory_limit")
    threads: int | None = Field(None, ge=1, description="DuckDB threads and writer threads "
                                "(default: all CPUs)")

    @field_validator("memory_limit")
    @classmethod
    def _memory(cls, v: str) -> str:
        """Checked by DuckDB itself now, not after the stage has taken its lease."""
        try:
            duckdb.connect(":memory:").execute(f"SET memory_limit = {sql_lit(v.strip())}")
        except duckdb.Error:
            raise ValueError(f"memory_limit {v!r}: not a size DuckDB understands; use e.g. "
                             "'1GB' or '512MB'") from None
        return v.strip()

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        for what in ("prompt", "response"):
            lo, hi = getattr(self, f"min_{what}_tokens"), getattr(self, f"max_{what}_tokens")
            if hi is not None and hi < lo:
                raise ValueError(f"max_{what}_tokens {hi} < min_{what}_tokens {lo}")
        return self


# ----------------------------------------------------------------------------- inputs
def _benchmark_sets(cfg: FilterConfig, prompts: Sequence[str] | Mapping[str, Sequence[str]] | None
                    ) -> dict[str, list[str]]:
    """Raw benchmark texts by set name; a plain list is named after cfg.contamination_sets."""
    sets: dict[str, list[str]] = {}
    if isinstance(prompts, Mapping):
        sets = {str(k): list(v) for k, v in prompts.items()}
    elif prompts is not None:
        if isinstance(prompts, str):
            raise ConfigError("benchmark_prompts: pass a list of prompt texts, not one string")
        sets = {"+".join(cfg.contamination_sets) or "benchmark": list(prompts)}
    if cfg.contamination_prompts:
        sets.setdefault("inline", []).extend(cfg.contamination_prompts)
    for name, texts in sets.items():
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"benchmark prompts of set {name!r}: {type(bad).__name__} found, "
                              "expected prompt texts (str)")
    return sets


# ----------------------------------------------------------------------------- the stage
def run_filter(store: Store, cfg: FilterConfig, generations_manifest: Manifest,
               benchmark_prompts: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
               force: bool = False) -> Manifest:
    """Filter and split the generations; return the committed (or cached) ``filter`` manifest.

    ``benchmark_prompts``: raw prompt texts the contamination guard removes (a list, or a mapping
    set name -> texts for a per-set overlap report); they are normalised here and their digest
    enters the cache key. Raises ConfigError / SchemaError before any work, DflashError (naming
    the rule) if the rules leave no rows; a failed filter commits nothing.
    """
    sets = _benchmark_sets(cfg, benchmark_prompts)
    norm_sets = {k: sorted({normalise_prompt_text(t) for t in v} - {""}) for k, v in sets.items()}
    if cfg.contamination and not any(norm_sets.values()):
        raise ConfigError("filter.contamination is on but no benchmark prompts were given: pass "
                          "benchmark_prompts (sets: " + (", ".join(cfg.contamination_sets) or
                                                         "none") + "), add "
                          "filter.contamination_prompts, or set filter.contamination: false")
    key_config = {"rules": cfg.model_dump(mode="json", exclude=EXECUTION_FIELDS),
                  "benchmark_prompts": digest(norm_sets) if cfg.contamination else None}
    inputs = {"generations": generations_manifest}
    code = stage_code(STAGE, CODE_FILES, models=())  # no model code
    _, done = cached(store, STAGE, key_config, inputs, code)
    if done is not None and not force:
        return done
    uris, schema = check_generation_shards(store, generations_manifest)
    validate_predicates(cfg.predicates, schema)
    refs = None if cfg.split_copies else refs_extra(
        generations_manifest, [store.relative(u) for u in uris], ("train", "eval"),
        {"reference_response": "VARCHAR"} if "reference_response" in schema.names else None)
    return run_stage(store, STAGE, key_config, inputs, code,
                     lambda out: _build(out, cfg, uris, sets, refs), force=force)


def _build(out: StageOutput, cfg: FilterConfig, uris: list[str], sets: dict[str, list[str]],
           refs: dict[str, Any] | None) -> Manifest:
    threads = cfg.threads or os.cpu_count() or 1
    con = connect(out.store, memory_limit=cfg.memory_limit, threads=threads, views=False)
    try:
        return _filter(out, con, cfg, uris, sets, threads, refs)
    finally:
        con.close()


def _filter(out: StageOutput, con: Any, cfg: FilterConfig, uris: list[str],
            sets: dict[str, list[str]], threads: int, refs: dict[str, Any] | None) -> Manifest:
    """Rules -> stats -> split -> parts -> manifest (the order of docs/filtering.md)."""
    t0, c0 = time.perf_counter(), time.process_time()
    con.execute("SET preserve_insertion_order = false")  # the per-row table needs no order
    rules = build_rules(cfg)
    steps = [r.name for r in rules] + (["dedupe"] if cfg.dedupe else [])
    sql = {"features": features_sql(uris, rules, cfg)}
    con.execute("CREATE TEMP TABLE per_row AS " + sql["features"])
    overlap = None
    if cfg.contamination:
        statements = contamination_sql(steps.index("contamination") + 1)
        sql["contamination"] = ";\n".join(statements)
        overlap = _contamination(con, sets, statements)
    if cfg.dedupe:
        sql["dedupe"] = dedupe_sql(len(steps))
        con.execute(sql["dedupe"])
    t_rules, c_rules = time.perf_counter(), time.process_time()
    stats = _stats(con, steps, rules, overlap)
    _check_not_empty(stats)
    sql["split"] = split_sql(cfg.split_seed, _eval_threshold(cfg.eval_fraction))
    codes = _decisions(con, sql["split"], len(uris))
    n_eval = int(sum((c == 2).sum() for c in codes))
    n_train = int(sum((c == 1).sum() for c in codes))
    if n_train == 0:
        raise DflashError(f"filter: the split put all {n_eval} remaining rows into eval "
                          f"(eval_fraction={cfg.eval_fraction}); lower filter.eval_fraction")
    if refs is None:
        names = _write_parts(out, [out.store.relative(u) for u in uris], codes, threads)
    else:
        names = _write_refs(out, codes)
    t_write, c_write = time.perf_counter(), time.process_time()
    out.write_parquet("filter_stats.parquet", pa.Table.from_pylist(stats, STATS_SCHEMA),
                      table_name="filter_stats", schema=STATS_SCHEMA)
    names.append("filter_stats.parquet")
    if overlap is not None:
        out.write_parquet("filter_overlap.parquet", overlap.pop("table"),
                          table_name="filter_overlap", schema=OVERLAP_SCHEMA)
        names.append("filter_overlap.parquet")
    extra = {"stats": stats, "split": {"train": n_train, "eval": n_eval,
                                       "eval_fraction": cfg.eval_fraction,
                                       "stored_as": "row references" if refs else "copies",
                                       "rule": "md5(f'{split_seed}:{prompt_id}')[:15] < "
                                               "eval_fraction * 2**60"},
             "contamination": overlap, "sql": sql,
             "timings_s": {"rules": round(t_rules - t0, 3), "write": round(t_write - t_rules, 3),
                           "rules_cpu": round(c_rules - c0, 3),
                           "write_cpu": round(c_write - c_rules, 3)}}
    if refs is not None:
        extra["row_refs"] = refs
    log.info("filter: %d rows in, %d train, %d eval (rules %.1fs, write %.1fs)",
             stats[0]["rows_in"], n_train, n_eval, t_rules - t0, t_write - t_rules)
    return out.commit(extra=extra, files=names)


def _contamination(con: Any, sets: dict[str, list[str]], statements: list[str]
                   ) -> dict[str, Any]:
    """Run the guard; return the overlap report (over ALL input rows, whatever removed them)."""
    raw = pa.table({"benchmark_set": [k for k, v in sets.items() for _ in v],
                    "prompt": [t for v in sets.values() for t in v]})
    con.register("bench_raw", raw)
    for statement in statements:
        con.execute(statement)
    table = con.sql("SELECT b.benchmark_set, b.benchmark_prompt, count(m.row_no)::BIGINT AS "
                    "rows_matched FROM bench b LEFT JOIN matches m USING (benchmark_set, "
                    "benchmark_prompt) GROUP BY ALL HAVING count(m.row_no) > 0 "
                    "ORDER BY rows_matched DESC, benchmark_set, benchmark_prompt").to_arrow_table()
    per_set = {}
    for name, n_prompts, n_matched, n_rows in con.execute(
            "SELECT b.benchmark_set, count(DISTINCT b.benchmark_prompt), "
            "count(DISTINCT m.benchmark_prompt), count(DISTINCT (m.file, m.row_no)) "
            "FROM bench b LEFT JOIN matches m USING (benchmark_set, benchmark_prompt) "
            "GROUP BY ALL ORDER BY 1").fetchall():
        per_set[name] = {"prompts": n_prompts, "matched_prompts": n_matched, "matched_rows": n_rows}
    rows_matched = con.execute("SELECT count(DISTINCT (file, row_no)) FROM matches").fetchone()[0]
    examples = [{"set": r["benchmark_set"], "prompt": r["benchmark_prompt"][:200],
                 "rows": r["rows_matched"]} for r in table.slice(0, 20).to_pylist()]
    return {"benchmark_prompts": sum(s["prompts"] for s in per_set.values()),
            "matched_rows": int(rows_matched), "sets": per_set, "examples": examples,
            "table": table.cast(OVERLAP_SCHEMA)}


def _stats(con: Any, steps: list[str], rules: list[Any],
           overlap: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows in, removed, out and tokens out per step, in order (step 0 = the input)."""
    by_step = {int(s): (int(n), int(t or 0)) for s, n, t in con.execute(
        "SELECT removed_by, count(*), sum(tokens) FROM per_row GROUP BY removed_by").fetchall()}
    rows = sum(n for n, _ in by_step.values())
    tokens = sum(t for _, t in by_step.values())
    details = {r.name: r.detail for r in rules}
    details["dedupe"] = ("keep the first row (by prompt_id) of each normalised prompt text "
                         "(all user turns joined, lowercased, whitespace collapsed)")
    if overlap is not None:
        details["contamination"] += (
            f"; overlap: {overlap['matched_rows']} input rows match "
            + ", ".join(f"{s['matched_prompts']}/{s['prompts']} {name} prompts"
                        for name, s in overlap["sets"].items()))
    out = [{"step": 0, "rule": "input", "rows_in": rows, "rows_removed": 0, "rows_out": rows,
            "tokens_out": tokens, "detail": f"{rows} generations"}]
    for i, name in enumerate(steps, start=1):
        n, t = by_step.get(i, (0, 0))
        rows_in, rows, tokens = rows, rows - n, tokens - t
        out.append({"step": i, "rule": name, "rows_in": rows_in, "rows_removed": n,
                    "rows_out": rows, "tokens_out": tokens, "detail": details[name]})
    return out


def _check_not_empty(stats: list[dict[str, Any]]) -> None:
    if stats[0]["rows_in"] == 0:
        raise DflashError("filter: the generations hold no rows; nothing to filter")
    if stats[-1]["rows_out"] > 0:
        return
    first = next(s for s in stats if s["rows_out"] == 0)
    raise DflashError(f"filter: rule {first['rule']!r} (step {first['step']}) removed all "
                      f"{first['rows_in']} remaining rows ({first['detail']}); nothing committed. "
                      "Loosen that rule in the filter config")


def _decisions(con: Any, split_sql: str, n_files: int) -> list[np.ndarray]:
    """Per shard, a code per row: 0 removed, 1 train, 2 eval (dense, indexed by row number)."""
    sizes = dict(con.execute("SELECT file, max(row_no) + 1 FROM per_row GROUP BY file").fetchall())
    codes = [np.zeros(int(sizes.get(i, 0)), np.uint8) for i in range(n_files)]
    got = con.execute(f"SELECT file, row_no, is_eval FROM ({split_sql})").fetchnumpy()
    file, row, ev = (np.asarray(got[c]) for c in ("file", "row_no", "is_eval"))
    for i in range(n_files):
        sel = file == i
        codes[i][row[sel]] = 1 + ev[sel].astype(np.uint8)
    return codes


# ----------------------------------------------------------------------------- writing
def _write_refs(out: StageOutput, codes: list[np.ndarray]) -> list[str]:
    """One part per table: the (file, row_no) of its rows, sorted (storage.refs resolves them)."""
    names = []
    for code, table in ((1, "train"), (2, "eval")):
        refs = refs_table([np.flatnonzero(c == code) for c in codes])
        sink = pa.BufferOutputStream()
        pq.write_table(refs, sink, **refs_parquet_options())
        name = f"{table}/part-00000.parquet"
        out.write_bytes(name, sink.getvalue().to_pybytes(), rows=refs.num_rows, table=table)
        names.append(name)
    return names


class _PartWriter:
    """Streams the batches of one shard into ``<table>/part-<shard>[-<n>].parquet`` files."""

    def __init__(self, out: StageOutput, table: str, shard: int) -> None:
        self.out, self.table, self.shard = out, table, shard
        self.names: list[str] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.BufferOutputStream | None = None
        self._rows = 0
        self.schema: pa.Schema | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self.schema = batch.schema
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._writer is None:
            self._sink = pa.BufferOutputStream()
            self._writer = pq.ParquetWriter(self._sink, table.schema, **_writer_options(
                table.schema))
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._rows += table.num_rows
        if self._sink is not None and self._sink.tell() >= PART_MAX_BYTES:
            self._close_part()

    def _close_part(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._writer.close()
        buf = self._sink.getvalue()
        n = len(self.names)
        name = f"{self.table}/part-{self.shard:05d}" + (f"-{n:03d}" if n else "") + ".parquet"
        data = buf.to_pybytes() if self.out.store.protocol == "s3" else memoryview(buf)
        self.out.write_bytes(name, data, rows=self._rows, table=self.table)
        self.names.append(name)
        self._writer, self._sink, self._rows = None, None, 0

    def close(self) -> list[str]:
        self._flush_group()
        if self._writer is not None:
            self._close_part()
        return self.names


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd-1; token ids byte-stream-split (half the size of plain, cheap to write); dictionaries
    and statistics only where they pay (low-cardinality strings, small columns)."""
    names = set(schema.names)
    tokens = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in _TOKEN_COLUMNS if c in names
              and pa.types.is_integer(schema.field(c).type.value_type)}
    dictionary = ["messages.list.element.role"] if "messages" in names else []
    for c in _DICT_COLUMNS:
        t = schema.field(c).type if c in names else None
        if t is not None and pa.types.is_struct(t):  # e.g. target {ref, digest}
            dictionary += [f"{c}.{f.name}" for f in t if pa.types.is_string(f.type)]
        elif t is not None and pa.types.is_string(t):
            dictionary.append(c)
    return {"compression": "zstd", "compression_level": 1, "use_dictionary": dictionary,
            "write_statistics": [c for c in _STATS_COLUMNS if c in names],
            "column_encoding": tokens or None}


def _write_shard(out: StageOutput, shard: int, rel: str, codes: np.ndarray
                 ) -> tuple[list[str], list[str], pa.Schema | None]:
    """Stream one shard straight out of Parquet (pyarrow) and cut each batch by the decisions.

    pyarrow decodes the shard into Arrow about twice as cheaply as a DuckDB scan exported to
    Arrow; rows arrive in file order, so a running offset gives each batch's row numbers. An
    all-null ``reference_response`` column (type null) is written as strings, so every part
    shares one schema. (Zero-copy slices between removed rows looked cheaper but are not: a
    batch with many gaps becomes thousands of chunks, and the Parquet writer pays per chunk.)"""
    train, evals = _PartWriter(out, "train", shard), _PartWriter(out, "eval", shard)
    schema, start = None, 0
    with out.store.open_input(rel) as f:
        for batch in pq.ParquetFile(f).iter_batches(BATCH_ROWS, use_threads=False):
            c = codes[start:start + batch.num_rows]
            start += batch.num_rows
            batch = _string_reference(batch)
            schema = batch.schema
            train.add(batch.filter(pa.array(c == 1)))
            evals.add(batch.filter(pa.array(c == 2)))
    return train.close(), evals.close(), schema


def _string_reference(batch: pa.RecordBatch) -> pa.RecordBatch:
    i = batch.schema.get_field_index("reference_response")
    if i < 0 or pa.types.is_string(batch.schema.field(i).type):
        return batch
    return batch.set_column(i, "reference_response", batch.column(i).cast(pa.string()))


def _write_parts(out: StageOutput, rels: list[str], codes: list[np.ndarray],
                 threads: int) -> list[str]:
    """Write train/eval parts, shards in parallel; an empty eval part keeps the table defined."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rels)))) as pool:
        results = list(pool.map(lambda i: _write_shard(out, i, rels[i], codes[i]),
                                range(len(rels))))
    train = [n for r in results for n in r[0]]
    evals = [n for r in results for n in r[1]]
    if not evals:
        schema = next(r[2] for r in results if r[2] is not None)
        sink = pa.BufferOutputStream()
        pq.write_table(schema.empty_table(), sink, **_writer_options(schema))
        out.write_bytes("eval/part-00000.parquet", sink.getvalue().to_pybytes(), rows=0,
                        table="eval")
        evals = ["eval/part-00000.parquet"]
    return train + evals


# ----------------------------------------------------------------------------- reading back
def filter_stats_rows(store: Store, manifest: Manifest) -> list[dict[str, Any]]:
    """The stats table as row dicts, in step order (for a Prefect table artifact or a report)."""
    entry = next((f for f in manifest.files if f.table == "filter_stats"), None)
    if entry is None:
        raise SchemaError(f"{manifest.stage}/{manifest.key}: no filter_stats table in manifest")
    table = read_parquet(store, f"{manifest.prefix}/{entry.path}", schema=STATS_SCHEMA)
    return sorted(table.to_pylist(), key=lambda r: r["step"])


filter_stats_table = filter_stats_rows
