"""The filter stage's rules as SQL: one readable predicate per rule, assembled in a fixed order.

Every rule is a ``Rule``: a name, the SQL predicate that REMOVES a row, and a one-line detail for
the stats table. ``features_sql`` evaluates all row-wise rules in one scan of the shards and
records, per row, the first rule that removes it (``removed_by``), so rows removed by each rule
are counted in order from a single pass. Dedupe is not row-wise (it depends on which rows are
left) and runs last, over the narrow per-row table, never over the shards.

The SQL is kept as plain text on purpose: the manifest records it, so a user can read exactly
what ran. DuckDB >= 1.3 is needed for the ``lambda x: ...`` syntax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from storage import Manifest, Store
from storage.errors import ConfigError, DflashError, SchemaError
from storage.manifest import FileEntry
from storage.parquet import check_schema, read_schema
from storage.verify import verify_entries

if TYPE_CHECKING:
    from tasks.filter import FilterConfig

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# The contract with tasks/generate.py. Integer columns may be any integer width (token ids are
# often int32); floats any width; reference_response may be all-null; target may be the
# {ref, digest} struct that tasks/generate.py writes (see _canonical).
GENERATIONS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)),
    ("prompt_token_ids", pa.list_(pa.int64())), ("response_token_ids", pa.list_(pa.int64())),
    ("response_text", pa.string()), ("finish_reason", pa.string()),
    ("n_prompt_tokens", pa.int64()), ("n_response_tokens", pa.int64()), ("target", pa.string()),
    ("temperature", pa.float64()), ("seed", pa.int64()), ("backend", pa.string()),
    ("latency_s", pa.float64()), ("reference_response", pa.string()),
])

# What Python's str.split() / str.isspace() treat as whitespace, so that the SQL normaliser and
# tasks.filter.normalise_prompt_text agree character for character.
_WS_CODEPOINTS = (0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                  *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
_WS = "".join(f"\\x{{{c:x}}}" for c in _WS_CODEPOINTS)  # RE2 class body
_OTHER_WS = "".join(f"\\x{{{c:x}}}" for c in _WS_CODEPOINTS if c != 0x20)
# Only runs that need rewriting match (any non-space whitespace, or 2+ spaces): ordinary text
# with single spaces has no match, so the regex costs one scan, not one replacement per word.
_COLLAPSE = f"[{_WS}]*[{_OTHER_WS}][{_WS}]*| {{2,}}"
_NEEDS_COLLAPSE = f"[{_OTHER_WS}]|  "


# An ``originals`` row (tasks/prompts.py): not generated; training uses its reference_response.
ORIGINAL = "coalesce(finish_reason = 'reference', false)"


def sql_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def norm_sql(expr: str) -> str:
    """SQL twin of ``normalise_prompt_text``: lowercase, whitespace runs -> one space, strip."""
    return f"trim(regexp_replace(lower({expr}), {sql_lit(_COLLAPSE)}, ' ', 'g'))"


@dataclass(frozen=True)
class Rule:
    """One filter step: rows for which ``drops`` is TRUE are removed (NULL counts as keep)."""

    name: str
    drops: str  # SQL boolean over the generation columns (and the derived columns below)
    detail: str
    columns: tuple[str, ...] = ()  # the shard columns it reads (projection pushdown)


def ngram_sorted_sql(col: str, n: int) -> str:
    """Hashes of the n-grams of a token list, sorted so that repeated n-grams are adjacent."""
    grams = ", ".join(f"r[i + {k}]" for k in range(n))
    return (f"list_sort(list_transform(range(1, len(r) - {n - 1} + 1), lambda i: hash({grams})))"
            .replace("r[", f"{col}[").replace("len(r)", f"len({col})"))


def repeated_share_sql(sorted_col: str) -> str:
    """Share of n-gram positions whose n-gram already occurred: 1 - distinct / total (0 if none)."""
    s = sorted_col
    return (f"CASE WHEN len({s}) = 0 THEN 0.0 ELSE len(list_filter(range(2, len({s}) + 1), "
            f"lambda i: {s}[i] = {s}[i - 1])) / len({s}) END")


def build_rules(cfg: FilterConfig) -> list[Rule]:
    """The enabled row-wise rules, in the documented order (docs/filtering.md).

    Cheap rules on small columns come first; the n-gram rule is computed only for rows still left;
    the contamination guard and user predicates follow. Dedupe is appended by the caller, last,
    so that the copy it keeps of a duplicated prompt is one that passed every other rule.
    """
    rules: list[Rule] = []
    if cfg.drop_errors:
        rules.append(Rule("finish_error", "finish_reason = 'error'",
                          "finish_reason = 'error': the target produced no usable response",
                          ("finish_reason",)))
    if cfg.drop_truncated:
        rules.append(Rule("finish_length", "finish_reason = 'length'",
                          "finish_reason = 'length': truncated at the token limit",
                          ("finish_reason",)))
    if cfg.drop_empty:
        text = sql_lit(f'[^{_WS}]')
        rules.append(Rule(
            "empty_response",
            f"CASE WHEN {ORIGINAL} THEN reference_response IS NULL "
            f"OR NOT regexp_matches(reference_response, {text}) "
            f"ELSE coalesce(n_response_tokens, 0) = 0 OR response_text IS NULL "
            f"OR NOT regexp_matches(response_text, {text}) END",
            "no response tokens, or a response text that is empty or all whitespace (an "
            "original: an empty reference_response)",
            ("n_response_tokens", "response_text", "finish_reason", "reference_response")))
    for what, lo, hi in (("prompt", cfg.min_prompt_tokens, cfg.max_prompt_tokens),
                         ("response", cfg.min_response_tokens, cfg.max_response_tokens)):
        col = f"n_{what}_tokens"
        conds = []
        if lo:
            conds.append(f"coalesce({col}, 0) < {int(lo)}")
        if hi is not None:
            conds.append(f"coalesce({col}, 0) > {int(hi)}")
        if conds:
            bounds = f"[{lo or 0}, {hi if hi is not None else 'inf'}]"
            drops, detail, cols = " OR ".join(conds), f"{col} outside {bounds}", (col,)
            if what == "response":  # an original has no generated response to count
                drops, cols = f"NOT {ORIGINAL} AND ({drops})", (col, "finish_reason")
                detail += " (originals exempt)"
            rules.append(Rule(f"{what}_tokens", drops, detail, cols))
    if cfg.max_repeated_ngram_share is not None:
        rules.append(Rule(
            "degenerate_ngram", f"ngram_repeated_share > {float(cfg.max_repeated_ngram_share)!r}",
            f"share of repeated {cfg.ngram_size}-grams of response_token_ids > "
            f"{cfg.max_repeated_ngram_share}", ("response_token_ids",)))
    if cfg.contamination:
        rules.append(Rule("contamination", "contaminated",
                          "a user turn (or all user turns joined) equals a normalised benchmark "
                          "prompt: " + ", ".join(cfg.contamination_sets + (
                              ["inline"] if cfg.contamination_prompts else []))))
    for i, pred in enumerate(cfg.predicates):
        rules.append(Rule(f"predicate_{i + 1}", f"({pred}) IS NOT TRUE", f"keep only: {pred}"))
    return rules


def _canonical(schema: pa.Schema) -> pa.Schema:
    """Map accepted variants (any int/float width, message structs with extra or non-nullable
    fields, an all-null reference_response) to GENERATIONS_SCHEMA's types; leave the rest as is,
    so that check_schema reports the real type of a wrong column."""
    fields = []
    for f in schema:
        want = GENERATIONS_SCHEMA.field(f.name).type if f.name in GENERATIONS_SCHEMA.names else None
        t = f.type
        if want is not None:
            if pa.types.is_integer(want) and pa.types.is_integer(t):
                t = want
            elif pa.types.is_floating(want) and pa.types.is_floating(t):
                t = want
            elif f.name == "reference_response" and pa.types.is_null(t):
                t = want
            elif f.name == "target" and pa.types.is_struct(t) and t.get_field_index("ref") >= 0 \
                    and _is_string(t.field("ref").type):
                t = want  # tasks/generate.py records the target as {ref, digest}
            elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_list(want):
                v = t.value_type
                if pa.types.is_integer(v) and pa.types.is_integer(want.value_type):
                    t = want
                elif f.name == "messages" and pa.types.is_struct(v) and all(
                        v.get_field_index(n) >= 0 and _is_string(v.field(n).type)
                        for n in ("role", "content")):
                    t = want
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_generations_schema(schema: pa.Schema, where: str) -> None:
    """SchemaError naming ``where`` and the column unless ``schema`` meets the contract."""
    try:
        check_schema(_canonical(schema), GENERATIONS_SCHEMA, where)
    except SchemaError as e:
        col = next((f for f in GENERATIONS_SCHEMA if f"'{f.name}'" in str(e)), None)
        t = col.type if col is not None else None
        if t is not None and (pa.types.is_integer(t) or (pa.types.is_list(t) and pa.types.is_integer(
                t.value_type))):
            raise SchemaError(f"{e} (any integer width is accepted)") from None
        raise


def check_generation_shards(store: Store, manifest: Manifest) -> tuple[list[str], pa.Schema]:
    """URIs of the manifest's generation shards, each schema-checked (footer only), and the
    columns all shards share (what user predicates may name)."""
    entries: list[FileEntry] = manifest.files_for("generations")
    if not entries:
        raise DflashError(f"{manifest.stage}/{manifest.key}: the manifest lists no 'generations' "
                          "shards; run the generate stage first")
    verify_entries(store, manifest, entries)  # size + sha256: DuckDB reads these shards whole
    uris, common = [], None
    for f in entries:
        rel = f"{manifest.prefix}/{f.path}"
        schema = read_schema(store, rel)
        check_generations_schema(schema, f"generation shard {store.uri(rel)}")
        common = schema if common is None else pa.schema(
            [c for c in common if c.name in schema.names])
        uris.append(store.uri(rel))
    assert common is not None
    return uris, common


def validate_predicates(predicates: Sequence[str], schema: pa.Schema) -> None:
    """Parse and bind every user predicate against the shard columns, before any work.

    A predicate must be one boolean SQL expression over the generation columns, usable in a
    WHERE clause (no aggregates, no statements). The error names the predicate and says why.
    """
    con = duckdb.connect(":memory:")
    try:
        con.register("generations", pa.Table.from_batches([], schema))
        for i, pred in enumerate(predicates):
            where = f"filter.predicates[{i}] {pred!r}"
            if not pred or not pred.strip():
                raise ConfigError(f"{where}: empty predicate; remove it or write a SQL condition")
            try:
                duckdb.SQLExpression(pred)
            except duckdb.Error as e:
                raise ConfigError(f"{where}: does not parse as one SQL expression "
                                  f"({_first_line(e)})") from None
            try:
                cols = con.execute(f"DESCRIBE SELECT ({pred}) AS keep FROM generations "
                                   f"WHERE ({pred})").fetchall()
            except duckdb.Error as e:
                raise ConfigError(f"{where}: {_first_line(e)}; columns are: "
                                  f"{', '.join(schema.names)}") from None
            if cols[0][1] != "BOOLEAN":
                raise ConfigError(f"{where}: is of type {cols[0][1]}, expected a boolean "
                                  "condition (e.g. n_response_tokens >= 16)")
    finally:
        con.close()


def features_sql(files: Sequence[str], rules: Sequence[Rule], cfg: FilterConfig) -> str:
    """One scan of the shards -> one narrow row per generation: where it is, its dedupe key, its
    tokens and the first row-wise rule that removes it (0 = none). Only referenced columns are
    read. The contamination rule keeps its step number but is decided afterwards by a join with
    the benchmark hashes (``match_hashes``): see tasks.filter._contamination_sql."""
    file_list = "[" + ", ".join(sql_lit(f) for f in files) + "]"
    names = [r.name for r in rules]
    ngram_at = names.index("degenerate_ngram") if "degenerate_ngram" in names else None
    if ngram_at is not None:
        guard = " OR ".join(f"coalesce({r.drops}, false)" for r in rules[:ngram_at]) or "false"
        ngram = (f"CASE WHEN NOT ({guard}) THEN "
                 f"{ngram_sorted_sql('response_token_ids', cfg.ngram_size)} END")
        share = repeated_share_sql("ngram_hashes")
    else:
        ngram, share = "NULL::UBIGINT[]", "NULL::DOUBLE"
    cases = "\n".join(f"        -- {i + 1}. {r.name}: {r.detail}\n"
                      f"        WHEN coalesce({r.drops}, false) THEN {i + 1}"
                      for i, r in enumerate(rules) if r.name != "contamination")
    removed_by = (f"CASE  -- the first rule that removes the row, in order\n{cases}\n"
                  "        ELSE 0\n       END" if cases else "0")
    # contamination keys: the whole prompt, and each user turn of a multi-turn prompt
    match = (f"list_append(CASE WHEN len(user_turns) > 1 THEN list_transform(user_turns, "
             f"lambda t: hash({norm_sql('t')})) ELSE [] END, hash(prompt_norm))"
             if cfg.contamination else "NULL::UBIGINT[]")
    return f"""
WITH src AS (  -- the shards in place; DuckDB reads only the columns used below
    SELECT list_position({file_list}, filename) - 1 AS file, file_row_number AS row_no, *
    FROM read_parquet({file_list}, filename = true, file_row_number = true)
), turns AS (  -- the user turns' texts (system and assistant messages are not the prompt)
    SELECT *, list_transform(list_filter(messages, lambda m: m.role = 'user'),
                             lambda m: m.content) AS user_turns
    FROM src
), lowered AS (  -- the prompt: user turns joined by newlines, lowercased, newlines -> spaces
    SELECT *, replace(lower(array_to_string(user_turns, chr(10))), chr(10), ' ') AS p_lower
    FROM turns
), collapsed AS (  -- whitespace runs -> one space (the regex only runs where a run needs it)
    SELECT *, CASE WHEN regexp_matches(p_lower, {sql_lit(_NEEDS_COLLAPSE)})
                   THEN regexp_replace(p_lower, {sql_lit(_COLLAPSE)}, ' ', 'g')
                   ELSE p_lower END AS p_collapsed
    FROM lowered
), prompts AS (  -- stripped: prompt_norm == normalise_prompt_text('\\n'.join(user turns))
    SELECT *, CASE WHEN starts_with(p_collapsed, ' ') OR ends_with(p_collapsed, ' ')
                   THEN trim(p_collapsed) ELSE p_collapsed END AS prompt_norm
    FROM collapsed
), ngrams AS (  -- sorted n-gram hashes of the response, only for rows still left at that rule
    SELECT *, {ngram} AS ngram_hashes
    FROM prompts
), derived AS (  -- share of n-gram positions that repeat an earlier n-gram
    SELECT *, {share} AS ngram_repeated_share
    FROM ngrams
)
SELECT file::INTEGER AS file, row_no::BIGINT AS row_no, prompt_id,
       (coalesce(n_prompt_tokens, 0) + coalesce(n_response_tokens, 0))::BIGINT AS tokens,
       hash(prompt_norm) AS prompt_hash,
       {ORIGINAL} AS original,
       {match} AS match_hashes,
       {removed_by}::INTEGER AS removed_by
FROM derived
"""


def contamination_sql(step: int) -> list[str]:
    """Statements over ``per_row`` and the registered ``bench_raw(benchmark_set, prompt)``."""
    norm = norm_sql("prompt")
    return [
        f"""CREATE TEMP TABLE bench AS  -- benchmark prompts, normalised like the generations'
    SELECT DISTINCT benchmark_set, {norm} AS benchmark_prompt, hash({norm}) AS h
    FROM bench_raw WHERE {norm} <> ''""",
        """CREATE TEMP TABLE matches AS  -- generations whose prompt or one user turn is one
    SELECT DISTINCT r.file, r.row_no, b.benchmark_set, b.benchmark_prompt
    FROM (SELECT file, row_no, unnest(match_hashes) AS h FROM per_row) r JOIN bench b USING (h)""",
        f"""-- contamination: removes a matching row unless an earlier rule already did
UPDATE per_row SET removed_by = {step} FROM (SELECT DISTINCT file, row_no FROM matches) m
WHERE per_row.file = m.file AND per_row.row_no = m.row_no
  AND (per_row.removed_by = 0 OR per_row.removed_by > {step})"""]


def dedupe_sql(step: int) -> str:
    """Of the rows every rule kept, keep the first (a generated row before an original, then by
    prompt_id, shard and row) of each normalised prompt; the others are removed by this, the
    last step."""
    return f"""-- dedupe: all but the first copy of each normalised prompt text
UPDATE per_row SET removed_by = {step} FROM (
    SELECT file, row_no FROM (
        SELECT file, row_no, row_number() OVER (
            PARTITION BY prompt_hash ORDER BY original, prompt_id, file, row_no) AS copy_no
        FROM per_row WHERE removed_by = 0)
    WHERE copy_no > 1) AS dup
WHERE per_row.file = dup.file AND per_row.row_no = dup.row_no"""


def split_sql(split_seed: int, threshold: int) -> str:
    """Eval when the first 60 bits of md5("seed:prompt_id") are below ``threshold`` (see
    tasks.filter.is_eval_prompt): reproducible outside DuckDB, stable across versions.
    Originals always train: the eval split measures the target's own answers."""
    return (f"-- split: by prompt_id only, so all samples of a prompt land on one side\n"
            f"SELECT file, row_no, ('0x' || md5({sql_lit(f'{split_seed}:')} || prompt_id)[1:15])"
            f"::UBIGINT < {int(threshold)} AND NOT original AS is_eval\n"
            f"FROM per_row WHERE removed_by = 0")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
