"""Stage 1 inputs: model references, the ``targets`` stage, prompt sources and bad input.

Real parts throughout: the packaged SmolLM2 (tokenizer and weights), the packaged ShareGPT /
MT-Bench / HumanEval files, real Parquet and JSONL files, and moto's S3 server. A tiny random
Llama (SmolLM2's tokenizer, a few MB of weights) stands in where weights are uploaded, so that
the upload test can run on every store backend in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import Store, read_manifest
from storage.catalog import connect
from storage.errors import ConfigError, DflashError, SchemaError
from tasks import models
from tasks.filter import normalise_prompt_text
from tasks.models import TargetConfig, resolve_model, run_prepare_target, target_folder
from tasks.prompts import (
    PromptsConfig,
    PromptSource,
    benchmark_prompts,
    contamination_prompts,
    load_mt_bench,
    load_sharegpt,
    load_source,
    run_prompts,
    validate_prompts,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer: small enough to upload anywhere."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, (n, text)


# ----------------------------------------------------------------------------- model refs
def test_model_refs_resolve_or_fail_in_one_line(smollm2_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("packaged:smollm2-135m-instruct") == smollm2_dir
    assert resolve_model(str(smollm2_dir)) == smollm2_dir.resolve()
    with pytest.raises(ConfigError) as e:
        resolve_model("packaged:gpt-17")
    _one_line(e.value, "packaged:gpt-17", "packaged:smollm2-135m-instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        resolve_model(str(tmp_path / "empty"))
    _one_line(e.value, "empty", "config.json")
    with pytest.raises(ConfigError) as e:
        resolve_model("not a model ref!")
    _one_line(e.value, "not a model ref!")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        resolve_model("some-org/some-model-that-is-not-cached")
    _one_line(e.value, "some-org/some-model-that-is-not-cached", "HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # now the real network attempt fails (no internet here)
    with pytest.raises(ConfigError) as e:
        resolve_model("some-org/some-model-that-is-not-cached")
    _one_line(e.value, "some-org/some-model-that-is-not-cached", "Hugging Face hub")


def test_prepare_packaged_target_records_files_without_upload(tmp_path: Path,
                                                              smollm2_dir: Path) -> None:
    store = Store(tmp_path / "store")
    m = run_prepare_target(store, TargetConfig())
    assert m.stage == "targets" and m.extra["source"] == "packaged:smollm2-135m-instruct"
    assert set(m.extra["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert len(m.extra["files"]["model.safetensors"]) == 64 and m.extra["weights"] is None
    assert m.extra["config"]["num_hidden_layers"] == 30
    assert not store.find("target_weights")  # nothing uploaded by default
    assert target_folder(m) == smollm2_dir
    again = run_prepare_target(store, TargetConfig())
    assert again.key == m.key and again.created_at == m.created_at  # cached


def test_weights_upload_once_and_download(store_url: str, tiny_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFLASH_MODEL_CACHE", str(tmp_path / "cache"))
    store = Store(store_url)
    first_copy = tmp_path / "a" / "model"
    shutil.copytree(tiny_dir, first_copy)
    m1 = run_prepare_target(store, TargetConfig(ref=str(first_copy), upload_weights=True))
    w = read_manifest(store, "target_weights", m1.extra["weights"]["key"])
    assert w is not None and {f.path: f.sha256 for f in w.files} == m1.extra["files"]

    uploads: list[str] = []
    real = models.write_part
    monkeypatch.setattr(models, "write_part",
                        lambda *a, **k: uploads.append(a[2]) or real(*a, **k))
    second_copy = tmp_path / "b" / "model"  # another ref, same weights: a new key, no upload
    shutil.copytree(tiny_dir, second_copy)
    m2 = run_prepare_target(store, TargetConfig(ref=str(second_copy), upload_weights=True,
                                                dtype="float32"))
    assert m2.key != m1.key and m2.extra["digest"] == m1.extra["digest"] and uploads == []

    shutil.rmtree(first_copy)  # a machine without the model: the store's copy is fetched
    folder = target_folder(m1, store)
    assert folder.parent == tmp_path / "cache"
    assert models.file_hashes(folder) == m1.extra["files"]

    m3 = run_prepare_target(store, TargetConfig(ref=str(second_copy)))  # no upload
    shutil.rmtree(second_copy)
    monkeypatch.setenv("DFLASH_MODEL_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(ConfigError) as e:
        target_folder(m3, store)
    _one_line(e.value, "upload_weights")


# ----------------------------------------------------------------------------- packaged prompts
def test_sharegpt_decodes_truncated_file_and_resolves_duplicates() -> None:
    records, stats = load_sharegpt()
    assert stats["objects"] == 17671 and stats["truncated_file"] == 1
    assert stats["repeated_ids"] == 123
    assert len({r.prompt_id for r in records}) == len(records) > 11000
    assert all(r.prompt_id.startswith("sharegpt:") for r in records[:50])
    assert sum(r.reference_response is not None for r in records) > 0.9 * len(records)
    src = PromptSource(kind="sharegpt", n=10)
    ten, st = load_source(src, seed=1)
    five, _ = load_source(PromptSource(kind="sharegpt", n=5), seed=1)
    assert len(ten) == 10 and st["selected"] == 10 and st["repeated_ids"] == 123
    assert {r.prompt_id for r in five} <= {r.prompt_id for r in ten}  # nested samples
    assert [r.prompt_id for r in load_source(src, seed=1)[0]] == [r.prompt_id for r in ten]
    assert {r.prompt_id for r in load_source(src, seed=2)[0]} != {r.prompt_id for r in ten}
    # originals: the next groups in the same order, marked, never one of the n, with answers
    both, st = load_source(PromptSource(kind="sharegpt", n=10, originals=40), seed=1)
    regen = [r for r in both if r.regenerate]
    assert [r.prompt_id for r in regen] == [r.prompt_id for r in ten]
    orig = [r for r in both if not r.regenerate]
    assert st["originals"] == len(orig) and 30 <= len(orig) <= 40  # some have no answer
    assert all(r.reference_response.strip() for r in orig)
    assert not {r.prompt_id for r in orig} & {r.prompt_id for r in ten}
    for bad, why in ((dict(kind="mt_bench", n=2, originals=3), "no original answers"),
                     (dict(kind="sharegpt", originals=3), "originals needs n")):
        with pytest.raises(ValueError, match=why):
            PromptSource(**bad)


def test_mt_bench_humaneval_and_contamination_guard() -> None:
    records, stats = load_mt_bench()
    assert stats["questions"] == 80 and len(records) == 160
    t2 = next(r for r in records if r.prompt_id == "mt_bench:81:2")
    assert t2.parent_prompt_id == "mt_bench:81" and [m["role"] for m in t2.messages] == [
        "user", "assistant", "user"] and t2.messages[1]["content"] == ""
    sampled, _ = load_source(PromptSource(kind="mt_bench", n=3), seed=0)
    assert len(sampled) == 6  # n questions, both turns each, turn 2 right after turn 1
    assert all(sampled[i + 1].parent_prompt_id == sampled[i].prompt_id for i in (0, 2, 4))
    first = benchmark_prompts("mt_bench")
    assert len(first) == 80 and all(r.parent_prompt_id is None for r in first)
    he = benchmark_prompts("humaneval")
    assert len(he) == 164 and he[0].prompt_id == "humaneval:HumanEval/0"
    assert len(benchmark_prompts("humaneval", n=7, seed=3)) == 7
    guard = contamination_prompts()
    assert len(guard["mt_bench"]) == 160 and len(guard["humaneval"]) == 164
    assert first[0].messages[0]["content"] in guard["mt_bench"]
    assert records[1].messages[0]["content"] + "\n" + records[1].messages[2]["content"] \
        in guard["mt_bench"]  # turn 2 as the filter sees it: its user turns joined
    assert normalise_prompt_text("  Hello \n\t WORLD ") == "hello world"
    with pytest.raises(ConfigError):
        benchmark_prompts("gsm8k")


# ----------------------------------------------------------------------------- user files
def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _user_folder(root: Path) -> Path:
    _write_jsonl(root / "a.jsonl", [
        {"id": 1, "prompt": "What is a monad?"},
        {"id": "two", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Name a prime."},
                                   {"role": "assistant", "content": "7"}]},
        {"id": 1, "prompt": "a duplicate id, resolved by keeping the first"},
    ])
    pq.write_table(pa.table({"id": ["p3"], "prompt": ["Explain TCP."],
                             "reference_response": ["TCP is ..."]}), root / "b.parquet")
    return root


def test_user_folder_local_and_s3(tmp_path: Path, s3_bucket: str) -> None:
    import fsspec

    folder = _user_folder(tmp_path / "mine")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(folder) + "/", f"{s3_bucket}/prompts/", recursive=True)
    for path in (str(folder), f"s3://{s3_bucket}/prompts"):
        records, stats = load_source(PromptSource(kind="file", path=path, name="mine"), seed=0)
        by_id = {r.prompt_id: r for r in records}
        assert set(by_id) == {"mine:1", "mine:two", "mine:p3"}, path
        assert stats["duplicates_dropped"] == 1 and stats["files"] == 2
        assert by_id["mine:1"].messages == [{"role": "user", "content": "What is a monad?"}]
        assert by_id["mine:two"].reference_response == "7"  # a trailing answer is the reference
        assert [m["role"] for m in by_id["mine:two"].messages] == ["system", "user"]
        assert by_id["mine:p3"].reference_response == "TCP is ..."
        checked = validate_prompts(PromptsConfig(path=path))
        assert checked["counts"] == {"file": 4} and len(checked["files"]) == 2


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, type, str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "blank.jsonl").write_text("\n\n")
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    (tmp / "text.parquet").write_text('{"id": 1, "prompt": "json in disguise"}\n')
    pq.write_table(pa.table({"id": [1], "text": ["no prompt column"]}), tmp / "nocol.parquet")
    pq.write_table(pa.table({"id": [1], "prompt": [42]}), tmp / "type.parquet")
    _write_jsonl(tmp / "badjson.jsonl", [{"id": 1, "prompt": "ok"}, "{not json", "[1,",
                                         {"id": 2, "prompt": "fine"}, "oops"])
    _write_jsonl(tmp / "noid.jsonl", [{"prompt": "who am I"}])
    _write_jsonl(tmp / "lastrole.jsonl", [{"id": 1, "messages": [
        {"role": "system", "content": "x"}]}])
    (tmp / "notes.txt").write_text("hello")
    return {
        "missing": (tmp / "nope.jsonl", ConfigError, "does not exist"),
        "empty": (tmp / "empty.jsonl", SchemaError, "empty"),
        "blank": (tmp / "blank.jsonl", SchemaError, "no records"),
        "corrupt": (tmp / "corrupt.parquet", SchemaError, "not a readable Parquet file"),
        "not_parquet": (tmp / "text.parquet", SchemaError, "not a readable Parquet file"),
        "missing_column": (tmp / "nocol.parquet", SchemaError, "missing column"),
        "wrong_type": (tmp / "type.parquet", SchemaError, "column 'prompt' has type int64"),
        "invalid_json": (tmp / "badjson.jsonl", SchemaError, "3 of 5 lines are not valid JSON"),
        "no_id": (tmp / "noid.jsonl", SchemaError, "missing 'id'"),
        "last_role": (tmp / "lastrole.jsonl", SchemaError, "user message"),
        "extension": (tmp / "notes.txt", ConfigError, "unsupported file type"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "corrupt", "not_parquet",
                                  "missing_column", "wrong_type", "invalid_json", "no_id",
                                  "last_role", "extension"])
def test_bad_prompt_files_fail_in_one_line_naming_the_path(tmp_path: Path, case: str) -> None:
    path, kind, needle = _bad_inputs(tmp_path / "bad")[case]
    with pytest.raises(kind) as e:
        validate_prompts(PromptsConfig(path=str(path)))
    _one_line(e.value, str(path), needle)
    assert isinstance(e.value, DflashError)


def test_invalid_json_lines_can_be_skipped_and_counted(tmp_path: Path) -> None:
    path, _, _ = _bad_inputs(tmp_path / "bad")["invalid_json"]
    records, stats = load_source(PromptSource(kind="file", path=str(path), skip_invalid=True), 0)
    assert [r.prompt_id for r in records] == ["file:1", "file:2"]
    assert stats["invalid_lines"] == 3 and stats["rows"] == 5


def test_config_rejects_ambiguous_sources() -> None:
    with pytest.raises(ValueError):
        PromptSource(kind="file")
    with pytest.raises(ValueError):
        PromptSource(kind="sharegpt", path="x.jsonl")
    with pytest.raises(ValueError):
        PromptsConfig(sources=[PromptSource(kind="file", path="a.jsonl"),
                               PromptSource(kind="file", path="b.jsonl")])


# ----------------------------------------------------------------------------- the stage
def test_run_prompts_writes_rendered_table(tmp_path: Path, smollm2_dir: Path) -> None:
    store = Store(tmp_path / "store")
    target = run_prepare_target(store, TargetConfig())
    user = _write_jsonl(tmp_path / "u.jsonl", [{"id": 1, "prompt": "Hi there"},
                                               {"id": 1, "prompt": "dup"}])
    cfg = PromptsConfig(seed=3, sources=[PromptSource(kind="sharegpt", n=4),
                                         PromptSource(kind="mt_bench", n=1),
                                         PromptSource(kind="file", path=str(user), name="u")])
    m = run_prompts(store, cfg, target)
    assert m.rows == {"prompts": 7} and m.extra["duplicates_dropped"] == 1
    assert m.extra["sources"]["sharegpt"]["repeated_ids"] == 123
    con = connect(store)
    rows = con.execute("SELECT prompt_id, source, prompt_text, n_prompt_tokens, messages, "
                   "parent_prompt_id, reference_response FROM prompts").fetchall()
    ids = [r[0] for r in rows]
    assert len(set(ids)) == 7 and "u:1" in ids
    assert all(r[2].startswith("<|im_start|>") and r[3] > 5 for r in rows)  # ChatML rendered
    assert sum(r[5] is not None for r in rows) == 1
    assert run_prompts(store, cfg, target).key == m.key  # cached
    user.write_text(json.dumps({"id": 1, "prompt": "edited"}) + "\n")
    assert run_prompts(store, cfg, target).key != m.key  # the file's content is in the key


def test_base_model_without_template_gets_plain_text(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from dflash_models.generation import encode_prompt, render_prompt

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = None
    assert render_prompt(tok, [{"role": "user", "content": "2+2="}]) == "2+2="
    text = render_prompt(tok, [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}])
    assert text.endswith("User: c\n\nAssistant:")
    assert encode_prompt(tok, "2+2=")[:1] == tok("2+2=")["input_ids"][:1]


def test_drop_long_removes_long_prompts_and_their_later_turns() -> None:
    from tasks.prompts import PROMPTS_SCHEMA, drop_long

    rows = [("a", 10, None, True), ("a:2", 12, "a", True), ("b", 99, None, True),
            ("b:2", 5, "b", True), ("c", 50, None, False), ("d", 51, None, False)]
    table = pa.table({"prompt_id": [r[0] for r in rows], "source": ["s"] * 6,
                      "messages": [[{"role": "user", "content": "x"}]] * 6,
                      "prompt_text": ["x"] * 6, "reference_response": [None] * 6,
                      "n_prompt_tokens": [r[1] for r in rows],
                      "parent_prompt_id": [r[2] for r in rows],
                      "regenerate": [r[3] for r in rows]}, schema=PROMPTS_SCHEMA)
    kept, counts = drop_long(table, 50)
    assert kept.column("prompt_id").to_pylist() == ["a", "a:2", "c"]
    assert counts == {"regenerated": 2, "originals": 1}


def _model_imports(path: Path) -> set[str]:
    """The ``dflash_models`` modules a source file imports (absolute, relative, or lazy)."""
    import ast

    found = set()
    inside = path.parent.name == "dflash_models"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and inside:  # from .x import y / from . import x
                found |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod.startswith("dflash_models."):
                found.add(mod.split(".")[1])
            elif mod == "dflash_models":
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("dflash_models.")}
    return found


def test_narrow_stage_fingerprints_cover_the_model_code_they_run() -> None:
    """prompts and generate hash only GENERATION_CODE of ``dflash_models/``, filter none of it,
    so a training-code edit keeps their outputs cached. That is only safe while those files and
    stages import nothing else from the package: an import added later fails here, not as a
    stale cache."""
    from tasks.base import GENERATION_CODE, stage_code

    repo = Path(__file__).resolve().parent.parent
    hashed = {Path(f).stem for f in GENERATION_CODE} - {"__init__"}
    users = [*GENERATION_CODE, "tasks/prompts.py", "tasks/generate.py", "tasks/backends.py"]
    for f in users:
        extra = _model_imports(repo / f) - hashed
        assert not extra, f"{f} imports dflash_models.{sorted(extra)} outside GENERATION_CODE"
    for f in ("tasks/filter.py", "tasks/filter_rules.py"):
        assert not _model_imports(repo / f), f"{f} now runs model code: hash it"
    # the narrowing is real: the whole package differs from the generation files alone
    assert stage_code("generate", models=GENERATION_CODE) != stage_code("generate")
