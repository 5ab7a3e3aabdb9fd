"""The filter stage on real DuckDB and Parquet: rules, counts, split, contamination, bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from storage import ConfigError, DflashError, Manifest, SchemaError, StageOutput, Store
from storage.catalog import connect
from storage.manifest import read_manifest
from storage.parquet import read_parquet
from storage.refs import REFS_SCHEMA, read_table
from tasks.filter import (
    FilterConfig,
    filter_stats_rows,
    is_eval_prompt,
    normalise_prompt_text,
    run_filter,
)
from tasks.filter_rules import ngram_sorted_sql, norm_sql, repeated_share_sql

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


INT32 = pa.int32()


def _schema(tok: pa.DataType = INT32) -> pa.Schema:
    return pa.schema([
        ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)),
        ("prompt_token_ids", pa.list_(tok)), ("response_token_ids", pa.list_(tok)),
        ("response_text", pa.string()), ("finish_reason", pa.string()),
        ("n_prompt_tokens", pa.int64()), ("n_response_tokens", pa.int64()),
        ("target", pa.string()), ("temperature", pa.float64()), ("seed", pa.int64()),
        ("backend", pa.string()), ("latency_s", pa.float64()),
        ("reference_response", pa.string())])


def row(pid: str, prompt: str | list[str] | None = None, response: str = "a fine answer",
        finish: str = "stop", n_prompt: int | None = None, n_resp: int | None = None,
        tokens: list[int] | None = None, reference: str | None = None, target: str = "qwen",
        latency: float = 1.0, seed: int = 0) -> dict[str, Any]:
    turns = prompt if isinstance(prompt, list) else [prompt or f"question {pid}?"]
    messages = []
    for i, t in enumerate(turns):
        messages += [{"role": "user", "content": t}]
        if i < len(turns) - 1:
            messages += [{"role": "assistant", "content": f"reply {i}"}]
    toks = tokens if tokens is not None else [int(h, 16) for h in hashlib.md5(
        pid.encode()).hexdigest()[:24]] + list(range(100, 110))  # distinct n-grams
    n_resp = len(toks) if n_resp is None else n_resp
    return {"prompt_id": pid, "messages": [{"role": "system", "content": "be brief"}] + messages,
            "prompt_token_ids": list(range(n_prompt if n_prompt is not None else 5)),
            "response_token_ids": toks, "response_text": response, "finish_reason": finish,
            "n_prompt_tokens": n_prompt if n_prompt is not None else 5, "n_response_tokens": n_resp,
            "target": target, "temperature": 0.0, "seed": seed, "backend": "hf",
            "latency_s": latency, "reference_response": reference}


def write_generations(store: Store, shards: list[list[dict[str, Any]] | pa.Table],
                      key: str = "g1") -> Manifest:
    """Commit generation shards the way tasks/generate.py does (stage "generations")."""
    with StageOutput(store, "generations", key, config={"test": key}) as out:
        for i, rows in enumerate(shards):
            table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, _schema())
            out.write_parquet(f"shard-{i:05d}.parquet", table, table_name="generations")
        return out.commit()


def quiet(**kw: Any) -> FilterConfig:
    """Every rule off unless switched on by the test: each test sees only what it checks."""
    base = dict(drop_errors=False, drop_truncated=False, drop_empty=False, min_prompt_tokens=0,
                min_response_tokens=0, max_repeated_ngram_share=None, contamination=False,
                dedupe=False, eval_fraction=0.0, threads=2)
    return FilterConfig(**{**base, **kw})


def split_rows(store: Store, m: Manifest, table: str) -> list[dict[str, Any]]:
    return read_table(store, m, table).to_pylist()


BENCH = ["Write a Python function to reverse a string.", "Compose an engaging travel blog post "
         "about a recent trip to Hawaii."]


def test_rules_remove_and_count_in_order(store_url: str) -> None:
    store = Store(store_url)
    ok = [row(f"ok{i:02d}", reference=f"ref {i}" if i % 2 else None) for i in range(12)]
    shard0 = ok[:6] + [
        row("err", finish="error"),
        row("trunc", finish="length"),
        row("blank", response=" \n\t "),
        row("notok", n_resp=0),
        row("shortp", n_prompt=1),
        row("longr", n_resp=500),
    ]
    shard1 = ok[6:] + [
        row("loop", tokens=[1, 2, 3] * 20),
        row("errloop", finish="error", tokens=[1, 2, 3] * 20),  # counted once, by the 1st rule
        row("contam", prompt="  write a python FUNCTION\nto reverse a string. "),
        row("contam2", prompt=["hello there", BENCH[1]]),  # a later user turn matches
        row("othertarget", target="llama"),
        row("slow", latency=99.0),
        row("dupA", prompt="What is  the capital of France?"),
        row("dupB", prompt="what is the capital of france?"),
        row("dupErr", prompt="Name three primes.", finish="error"),  # the copy dedupe can't keep
        row("dupOk", prompt="name three PRIMES."),
    ]
    cfg = FilterConfig(drop_truncated=True, min_prompt_tokens=2, max_response_tokens=100,
                       max_repeated_ngram_share=0.5, contamination_sets=["mt_bench"],
                       predicates=["target = 'qwen'", "latency_s < 10"], eval_fraction=0.3,
                       threads=2)
    gens = write_generations(store, [shard0, shard1])
    m = run_filter(store, cfg, gens, benchmark_prompts=BENCH)

    stats = filter_stats_rows(store, m)
    assert [(s["rule"], s["rows_removed"]) for s in stats] == [
        ("input", 0), ("finish_error", 3), ("finish_length", 1), ("empty_response", 2),
        ("prompt_tokens", 1), ("response_tokens", 1), ("degenerate_ngram", 1),
        ("contamination", 2), ("predicate_1", 1), ("predicate_2", 1), ("dedupe", 1)]
    assert [s["step"] for s in stats] == list(range(11))
    for prev, s in zip(stats, stats[1:], strict=False):
        assert s["rows_in"] == prev["rows_out"] and s["rows_out"] == s["rows_in"] - s["rows_removed"]
    kept = {"dupA", "dupOk"} | {r["prompt_id"] for r in ok}
    train, evals = split_rows(store, m, "train"), split_rows(store, m, "eval")
    assert {r["prompt_id"] for r in train + evals} == kept and len(train + evals) == len(kept)
    assert stats[-1]["tokens_out"] == sum(r["n_prompt_tokens"] + r["n_response_tokens"]
                                          for r in train + evals)
    assert m.rows == {"train": len(train), "eval": len(evals), "filter_stats": 11,
                      "filter_overlap": 2}
    assert evals and train, "eval_fraction 0.3 of 14 prompt ids puts some on each side"
    # reference_response survives in both splits (and stays null where there was none)
    refs = {r["prompt_id"]: r["reference_response"] for r in train + evals}
    assert refs == {r["prompt_id"]: r["reference_response"] for r in ok} | {"dupA": None,
                                                                           "dupOk": None}
    # the rows themselves are unchanged
    src = {r["prompt_id"]: r for r in ok}
    assert all(r["response_token_ids"] == src[r["prompt_id"]]["response_token_ids"]
               for r in train + evals if r["prompt_id"] in src)
    # the stats are a DuckDB view of the store, like `dflash query` sees them
    con = connect(store)
    got = con.execute("select rule, rows_removed from filter_stats order by step").fetchall()
    assert got == [(s["rule"], s["rows_removed"]) for s in stats]
    assert con.execute("select count(*) from train").fetchone()[0] == len(train)
    assert m.extra["contamination"]["matched_rows"] == 2
    assert m.extra["stats"] == stats and "CASE" in m.extra["sql"]["features"]


def test_split_is_deterministic_by_prompt_id(tmp_path: Path) -> None:
    rows = [row(f"id{i:04d}", seed=s) for i in range(150) for s in (0, 1)]  # 2 samples a prompt
    int64 = pa.Table.from_pylist(rows[200:], _schema(pa.int64()))  # int64 token ids accepted too
    s1 = Store(tmp_path / "s1")
    gens = write_generations(s1, [rows[:120], rows[120:200], int64])
    m1 = run_filter(s1, quiet(eval_fraction=0.25, threads=1), gens)
    parts1 = [(f.path, f.sha256) for f in m1.files if f.table in ("train", "eval")]
    evals = [r["prompt_id"] for r in split_rows(s1, m1, "eval")]
    assert set(evals) == {f"id{i:04d}" for i in range(150)
                          if is_eval_prompt(f"id{i:04d}", 0.25, 0)}
    assert len(evals) == 2 * len(set(evals)), "both samples of a prompt go to the same side"
    assert 20 <= len(set(evals)) <= 60
    # rebuilt (force) with another thread count: the same key and byte-identical parts
    m2 = run_filter(s1, quiet(eval_fraction=0.25, threads=2), gens, force=True)
    assert m2.key == m1.key and m2.created_at >= m1.created_at
    assert [(f.path, f.sha256) for f in m2.files if f.table in ("train", "eval")] == parts1
    m1 = m2
    # cached: a second call commits nothing new
    assert run_filter(s1, quiet(eval_fraction=0.25, threads=2), read_manifest(
        s1, "generations", "g1")).digest == m1.digest
    # another seed: another split
    m3 = run_filter(s1, quiet(eval_fraction=0.25, split_seed=7), read_manifest(
        s1, "generations", "g1"))
    assert {r["prompt_id"] for r in split_rows(s1, m3, "eval")} != set(evals)


def test_row_references_and_copies_give_the_same_split(store_url: str) -> None:
    """The default split stores (file, row_no) references; split_copies stores the rows. Python
    readers and the SQL views see the same rows either way, every column, int64 widening and
    all-null reference_response included."""
    store = Store(store_url)
    rows = [row(f"r{i:03d}", reference=f"ref {i}" if i % 3 == 0 else None,
                finish="error" if i % 7 == 0 else "stop") for i in range(60)]
    int64 = pa.Table.from_pylist(rows[40:], _schema(pa.int64()))
    nulls = pa.Table.from_pylist(rows[20:40], _schema())
    nulls = nulls.set_column(nulls.schema.get_field_index("reference_response"),
                             "reference_response", pa.nulls(20))
    gens = write_generations(store, [rows[:20], nulls, int64])
    cfg = quiet(drop_errors=True, eval_fraction=0.3)
    refs = run_filter(store, cfg, gens)
    copies = run_filter(store, cfg.model_copy(update={"split_copies": True}), gens)
    assert refs.key != copies.key and refs.rows == copies.rows
    assert refs.extra["split"]["stored_as"] == "row references"
    assert copies.extra["split"]["stored_as"] == "copies" and "row_refs" not in copies.extra
    for table in ("train", "eval"):
        parts = refs.files_for(table)
        assert [read_parquet(store, f"{refs.prefix}/{f.path}").schema for f in parts] == [
            REFS_SCHEMA]
        assert sum(f.size for f in parts) < sum(f.size for f in copies.files_for(table))
        a = read_table(store, refs, table).sort_by("prompt_id")
        b = read_table(store, copies, table).sort_by("prompt_id")
        assert a.num_rows == refs.rows[table] > 0 and a.column_names == b.column_names
        assert a.to_pylist() == b.to_pylist()
        cols = ["prompt_id"]  # a narrow read of a reference split reads only those columns
        assert read_table(store, refs, table, cols).column_names == cols
        con = connect(store)
        views = [con.sql(f"SELECT * EXCLUDE (output_key, output_created_at) FROM {table} "
                             f"WHERE output_key = '{m.key}' ORDER BY prompt_id").to_arrow_table()
                 for m in (refs, copies)]
        assert views[0].to_pylist() == views[1].to_pylist() == b.to_pylist()
        assert con.execute(f"SELECT DISTINCT typeof(reference_response) FROM {table}"
                           ).fetchall() == [("VARCHAR",)]


def test_row_references_check_their_source(tmp_path: Path) -> None:
    """A reference split never reads rows of another output than the one it was made against:
    a removed or rewritten generations output is a clear error naming it and the fix."""
    store = Store(tmp_path / "store")
    gens = write_generations(store, [[row(f"x{i}") for i in range(8)]])
    m = run_filter(store, quiet(), gens)
    assert read_table(store, m, "train").num_rows == 8
    store.rm("generations/g1", recursive=True)  # what `--force` on the generate stage does first
    with pytest.raises(DflashError, match=r"references rows of generations/g1, which is no "
                                          r"longer in .*restore it.*--force"):
        read_table(store, m, "eval")
    write_generations(store, [[row(f"y{i}") for i in range(8)]])  # rebuilt: other rows
    with pytest.raises(DflashError, match=r"generations/g1, which was rewritten.*--force"):
        read_table(store, m, "train")
    # the rebuilt filter reads the new rows
    again = run_filter(store, quiet(), write_generations(store, [[row("z")]], key="g2"))
    assert [r["prompt_id"] for r in read_table(store, again, "train").to_pylist()] == ["z"]


def test_scaling_bench_copies_a_reference_split_between_stores(
        tmp_path: Path, load_bench: Callable[[str], ModuleType]) -> None:
    """bench/train_scaling.py --filter-from takes another store's split: its rows must come along
    (the references point at generation shards the new store does not have)."""
    bench = load_bench("train_scaling")
    src = Store(tmp_path / "src")
    m = run_filter(src, quiet(eval_fraction=0.5), write_generations(
        src, [[row(f"s{i}", reference=f"ref {i}") for i in range(10)]]))
    copied = bench.pipeline_filter(Store(tmp_path / "dst"), src)
    for table in ("train", "eval"):
        assert read_table(Store(tmp_path / "dst"), copied, table).to_pylist() == \
            read_table(src, m, table).to_pylist()


def test_originals_pass_response_rules_train_only_and_lose_dedupe(tmp_path: Path) -> None:
    """finish_reason = 'reference' rows (tasks/prompts.py originals): no generated response."""
    store = Store(tmp_path / "store")

    def orig(pid: str, ref: str | None, prompt: str | None = None) -> dict[str, Any]:
        return {**row(pid, prompt=prompt, response="", finish="reference", tokens=[]),
                "reference_response": ref}

    originals = [orig(f"o{i:03d}", f"an original answer {i}") for i in range(60)]
    gens = write_generations(store, [[
        row("g1", prompt="Same question?"), orig("a-first", "ref", prompt="same  QUESTION?"),
        orig("blank", " \n "), orig("none", None), row("short", n_resp=2)]] + [originals])
    cfg = quiet(drop_empty=True, min_response_tokens=5, max_repeated_ngram_share=0.5,
                dedupe=True, eval_fraction=0.5)
    m = run_filter(store, cfg, gens)
    removed = {s["rule"]: s["rows_removed"] for s in m.extra["stats"]}
    assert removed["empty_response"] == 2 and removed["response_tokens"] == 1
    assert removed["dedupe"] == 1 and removed["degenerate_ngram"] == 0
    train = {r["prompt_id"] for r in split_rows(store, m, "train")}
    evals = {r["prompt_id"] for r in split_rows(store, m, "eval")}
    assert {r["prompt_id"] for r in originals} <= train  # originals never go to eval
    assert "a-first" not in train | evals and "g1" in train | evals  # the generated copy wins
    assert evals == {"g1"} or not evals


def test_contamination_guard_reports_overlap(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    gens = write_generations(store, [[
        row("a", prompt=BENCH[0].upper()), row("b", prompt=BENCH[0]),
        row("c", prompt=BENCH[0], finish="error"),  # removed earlier, still part of the overlap
        row("d", prompt="Write a Python function to reverse a list."),  # near miss: kept
        row("e", prompt="Say hi"), row("f", prompt="\tSAY\u00a0\u3000hi\r\n")]])
    cfg = quiet(drop_errors=True, contamination=True,
                contamination_prompts=["say   HI "])
    m = run_filter(store, cfg, gens, benchmark_prompts={"humaneval": [BENCH[0]],
                                                        "mt_bench": [BENCH[1], "unrelated"]})
    assert {r["prompt_id"] for r in split_rows(store, m, "train")} == {"d"}
    stats = {s["rule"]: s for s in m.extra["stats"]}
    assert stats["contamination"]["rows_removed"] == 4 and "overlap: 5 input rows" in \
        stats["contamination"]["detail"]
    report = m.extra["contamination"]
    assert report["matched_rows"] == 5 and report["benchmark_prompts"] == 4
    assert report["sets"]["humaneval"] == {"prompts": 1, "matched_prompts": 1, "matched_rows": 3}
    assert report["sets"]["mt_bench"]["matched_prompts"] == 0
    assert report["sets"]["inline"]["matched_rows"] == 2
    overlap = connect(store).execute("select benchmark_set, benchmark_prompt, rows_matched "
                                     "from filter_overlap order by 1").fetchall()
    assert overlap == [("humaneval", normalise_prompt_text(BENCH[0]), 3),
                       ("inline", "say hi", 2)]
    # the guard on with nothing to guard against is a config error, not a silent no-op
    with pytest.raises(ConfigError, match="no benchmark prompts"):
        run_filter(store, quiet(contamination=True), gens)


@pytest.mark.parametrize("pred, why", [
    ("n_response_tokens >", "does not parse"),
    ("no_such_column > 3", "no_such_column"),
    ("count(*) > 1", "aggregate"),
    ("n_response_tokens + 1", "expected a boolean"),
    ("1 = 1; drop table x", "does not parse"),
])
def test_bad_predicate_is_a_config_error_before_any_work(tmp_path: Path, pred: str,
                                                         why: str) -> None:
    store = Store(tmp_path / "store")
    gens = write_generations(store, [[row("a")]])
    with pytest.raises(ConfigError) as e:
        run_filter(store, quiet(predicates=["latency_s < 5", pred]), gens)
    assert f"predicates[1] {pred!r}" in str(e.value) and why.lower() in str(e.value).lower()
    assert not store.find("filter")


def _drop(t: pa.Table, col: str) -> pa.Table:
    return t.drop_columns([col])


@pytest.mark.parametrize("change, column, says", [
    (lambda t: _drop(t, "finish_reason"), "finish_reason", "missing column"),
    (lambda t: t.rename_columns(["response" if c == "response_text" else c
                                 for c in t.column_names]), "response_text", "missing column"),
    (lambda t: t.set_column(t.schema.get_field_index("n_response_tokens"), "n_response_tokens",
                            pa.array(["12"] * t.num_rows)), "n_response_tokens", "has type string"),
    (lambda t: t.set_column(t.schema.get_field_index("response_token_ids"), "response_token_ids",
                            pa.array([["x"]] * t.num_rows)), "response_token_ids", "integer width"),
])
def test_bad_shard_schema_names_shard_and_column(tmp_path: Path, change: Any, column: str,
                                                 says: str) -> None:
    store = Store(tmp_path / "store")
    good = pa.Table.from_pylist([row("a"), row("b")], _schema())
    gens = write_generations(store, [good, change(good)])
    with pytest.raises(SchemaError) as e:
        run_filter(store, quiet(), gens)
    msg = str(e.value)
    assert "shard-00001.parquet" in msg and repr(column) in msg and says in msg
    assert not store.find("filter")


@pytest.mark.parametrize("cfg, rule", [
    (quiet(drop_errors=True), "finish_error"),
    (quiet(predicates=["target = 'nobody'"]), "predicate_1"),
])
def test_empty_result_names_the_rule_and_commits_nothing(tmp_path: Path, cfg: FilterConfig,
                                                         rule: str) -> None:
    store = Store(tmp_path / "store")
    gens = write_generations(store, [[row("a", finish="error"), row("b", finish="error")]])
    with pytest.raises(DflashError, match=f"rule '{rule}' .* removed all 2 remaining rows"):
        run_filter(store, cfg, gens)
    assert not [p for p in store.find("filter") if not p.endswith("/")], store.find("filter")
    assert not connect(store).execute("select count(*) from outputs where stage = 'filter'"
                                      ).fetchone()[0]


def test_memory_store_and_cached_rerun() -> None:
    store = Store("memory://filter-test-cached")
    gens = write_generations(store, [[row(f"x{i}") for i in range(20)]])
    m = run_filter(store, quiet(eval_fraction=0.5), gens)
    assert m.rows["train"] + m.rows["eval"] == 20 and m.rows["eval"] > 0
    assert run_filter(store, quiet(eval_fraction=0.5, threads=1), gens).key == m.key


def test_empty_eval_split_still_defines_the_table(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    m = run_filter(store, quiet(), write_generations(store, [[row("a"), row("b")]]))
    assert m.rows == {"train": 2, "eval": 0, "filter_stats": 1}
    assert connect(store).execute("select count(*) from eval").fetchone()[0] == 0


@pytest.mark.parametrize("tokens, n, share", [
    ([1, 2, 3, 4, 1, 2, 3, 4], 4, 1 / 5), ([7] * 10, 2, 8 / 9), ([1, 2, 3], 4, 0.0),
    (list(range(50)), 3, 0.0), ([5, 6] * 10, 1, 18 / 20),
])
def test_repeated_ngram_share_sql(tokens: list[int], n: int, share: float) -> None:
    got = duckdb.connect().execute(f"SELECT {repeated_share_sql('s')} FROM (SELECT "
                     f"{ngram_sorted_sql('r', n)} AS s FROM (SELECT {tokens}::INTEGER[] AS r))"
                     ).fetchone()[0]
    assert got == pytest.approx(share)


def test_prompt_normalisation_python_equals_sql() -> None:
    texts = ["  Hello\tWORLD \n\n again  ", "Ünïcödé\u00a0NBSP\u2003em\u3000ideo", "",
             " \n ", "a\x0bb\x1cc\u2028d", "already normal", "tabs\t\tand  spaces"]
    con = duckdb.connect()
    got = [con.execute(f"SELECT {norm_sql('?')}", [t]).fetchone()[0] for t in texts]
    assert got == [normalise_prompt_text(t) for t in texts]
    assert normalise_prompt_text("  Hello\tWORLD \n\n again  ") == "hello world again"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_response_tokens"):
        FilterConfig(min_response_tokens=10, max_response_tokens=5)
    with pytest.raises(ValueError):
        FilterConfig(eval_fraction=1.0)
    with pytest.raises(ValueError):
        FilterConfig(dedup=True)  # a typo is an error, not an ignored key
    with pytest.raises(ValueError, match="memory_limit"):
        FilterConfig(memory_limit="lots")


def test_accepted_schema_variants(tmp_path: Path) -> None:
    """int32 counts and token ids, strict message structs and an all-null reference_response
    (what pa.Table.from_pylist infers from Nones) all meet the contract."""
    store = Store(tmp_path / "store")
    strict = pa.struct([pa.field("role", pa.string(), nullable=False),
                        pa.field("content", pa.large_string(), nullable=False)])
    rows = [row("a"), row("b", reference=None)]
    t = pa.Table.from_pylist(rows, _schema())
    t = t.set_column(1, "messages", t.column("messages").cast(pa.list_(strict)))
    t = t.set_column(t.schema.get_field_index("n_response_tokens"), "n_response_tokens",
                     t.column("n_response_tokens").cast(pa.int32()))
    t = t.set_column(t.schema.get_field_index("reference_response"), "reference_response",
                     pa.nulls(2))
    m = run_filter(store, quiet(dedupe=True), write_generations(store, [t]))
    assert m.rows["train"] == 2
    assert connect(store).execute("select typeof(reference_response) from train limit 1"
                                  ).fetchone()[0] == "VARCHAR"


def test_bench_script_smoke(
        tmp_path: Path, load_bench: Callable[[str], ModuleType]) -> None:
    """The throughput script's synthetic set meets the contract and every rule finds rows."""
    bench = load_bench("filter_throughput")
    store = Store(tmp_path / "store")
    gens = bench.write_generations(store, rows=4000, shards=2)
    cfg = bench.bench_configs("256MB", 2)["dedupe+finish+length+ngram"]
    stats = run_filter(store, cfg, gens).extra["stats"]
    assert all(s["rows_removed"] > 0 for s in stats[1:]), stats


def test_reads_what_the_generate_stage_writes(tmp_path: Path) -> None:
    """The contract, checked against tasks/generate.py's own schema (extra columns and a
    {ref, digest} target included): the rows pass through unchanged."""
    from tasks.generate import GENERATIONS_SCHEMA as GEN

    rows = [{**row(f"g{i}", reference="ref" if i == 1 else None), "source": "sharegpt",
             "target": {"ref": "HuggingFaceTB/SmolLM2-135M-Instruct", "digest": "abc"},
             "top_p": 1.0, "max_new_tokens": 64, "parent_prompt_id": None} for i in range(6)]
    store = Store(tmp_path / "store")
    gens = write_generations(store, [pa.Table.from_pylist(rows, GEN)])
    m = run_filter(store, quiet(predicates=["target.ref LIKE '%SmolLM2%'", "source = 'sharegpt'"],
                                dedupe=True, eval_fraction=0.3), gens)
    out = split_rows(store, m, "train") + split_rows(store, m, "eval")
    assert sorted(r["prompt_id"] for r in out) == [f"g{i}" for i in range(6)]
    assert all(r["target"]["digest"] == "abc" and r["max_new_tokens"] == 64 for r in out)
    assert [r["reference_response"] for r in out if r["prompt_id"] == "g1"] == ["ref"]
