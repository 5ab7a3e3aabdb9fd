"""Benchmark stage on the real SmolLM2 with random drafts: rows, audit, history, views, skips.

One full run (every method, 2 MT-Bench prompts x 16 new tokens) is shared by the module; the other
tests use the cheapest config that still exercises their path (one prompt, a few tokens).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from storage import DflashError, Store
from storage.catalog import connect
from storage.manifest import StageOutput
from tasks import bench_methods as bm
from tasks import benchmark as bench
from tasks.benchmark import BenchConfig, bench_any_draft, run_benchmark

# slow, and on 1 torch thread (module-scoped fixtures too)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_module")]
CHEAP = dict(datasets=["mt_bench"], n_prompts=1, max_new_tokens=4, warmup_prompts=0)



@pytest.fixture(scope="module")
def target(smollm2_dir: Path) -> Any:
    """One loaded SmolLM2 for the cheap runs (run_benchmark accepts a loaded Target)."""
    from dflash_models.target import load_target

    return load_target(smollm2_dir)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory: pytest.TempPathFactory, target: Any) -> dict[str, Path]:
    """Random drafts exported through the real APIs: DFlash (block 4), classic, and a DFlash
    draft built for a different (tiny) target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dflash_models.classic import build_classic_draft
    from dflash_models.draft import DFlashDraft, DFlashDraftConfig
    from dflash_models.target import Target

    root = tmp_path_factory.mktemp("drafts")
    torch.manual_seed(0)
    DFlashDraft(DFlashDraftConfig.from_target(target, num_layers=1, block_size=4)).export(
        root / "dflash")
    build_classic_draft(target, num_layers=1, hidden_size=64).save_pretrained(root / "classic")
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2))
    other = Target.from_model(tiny)
    DFlashDraft(DFlashDraftConfig.from_target(other, num_layers=1, block_size=4)).export(
        root / "foreign")
    return {"dflash": root / "dflash", "classic": root / "classic", "foreign": root / "foreign"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path,
             drafts: dict[str, Path]) -> tuple[Store, dict[str, Any]]:
    store = Store(str(tmp_path_factory.mktemp("bench") / "store"))
    cfg = BenchConfig(datasets=["mt_bench"], n_prompts=2, max_new_tokens=16, block_sizes=[4, 8],
                      warmup_prompts=1, warmup_new_tokens=4, classic_k=2)
    res = run_benchmark(store, cfg, smollm2_dir, draft_folder=drafts["dflash"],
                        classic_folder=drafts["classic"])
    return store, res


def test_every_method_produces_rows(full_run: tuple[Store, dict[str, Any]]) -> None:
    _, res = full_run
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(bm.METHODS)
    assert any("block 8" in n for n in res["notes"])  # trained at 4: a larger block cannot run
    for m, r in rows.items():
        assert r["temperature"] == 0.0
        assert r["n_prompts"] == 2 and r["tokens"] > 0
        assert r["tau"] is not None and r["speedup"] is not None and r["tokens_per_s"] > 0
        assert r["block_size"] == (4 if m == "dflash" else None)
        assert r["device"] == r["device_type"] and r["hardware_fingerprint"] and r["cpu_model"]
        assert r["latency_p95"] >= r["latency_p50"] > 0
    assert rows["hf_generate"]["tau"] == 1.0 and rows["ar"]["tau"] == 1.0
    assert rows["hf_generate"]["speedup"] == 1.0 and rows["hf_generate"]["exact_match_rate"] == 1.0
    assert rows["ar"]["acceptance_rate"] is None and rows["ar"]["per_position_acceptance"] == []
    assert len(rows["dflash"]["per_position_acceptance"]) == 3  # block 4 = 3 drafted positions
    assert rows["dflash"]["draft_digest"] == bm.folder_digest(Path(rows["dflash"]["draft"]))
    for m in ("dflash", "classic"):
        assert sum(rows[m]["accept_len_hist"]) > 0 and rows[m]["acceptance_rate"] is not None


def test_lossless_audit(full_run: tuple[Store, dict[str, Any]]) -> None:
    """T=0: engine outputs equal generate()'s, or every divergence carries its margin."""
    store, res = full_run
    con = connect(store)
    rows = con.execute("SELECT method, exact_match, first_divergence, divergence_margin, "
                       "len(output_ids), tokens, n_target_passes, accepted_lengths "
                       "FROM benchmark_samples WHERE run_id = ?", [res["run_id"]]).fetchall()
    assert len(rows) == 2 * 6
    for method, exact, pos, margin, n_out, tokens, passes, acc in rows:
        assert n_out == tokens <= 16
        assert exact is not None
        if not exact:
            assert pos is not None and margin is not None and margin >= 0
        if method in ("hf_generate", "ar"):
            assert passes == tokens  # one pass per token, the prefill included
        if method in ("ar", "dflash", "classic"):
            assert sum(acc) == tokens - 1  # the first token comes from the prefill
    summary = {r["method"]: r for r in res["rows"]}
    for m in ("ar", "dflash", "classic"):
        divs = [r for r in rows if r[0] == m and not r[1]]
        assert summary[m]["exact_match_rate"] == 1.0 or all(r[3] is not None for r in divs)


def test_views_local(full_run: tuple[Store, dict[str, Any]]) -> None:
    store, res = full_run
    assert res["summary_path"].startswith(f"benchmarks/summary/hw={res['hardware_tag']}/date=")
    assert res["samples_path"].startswith(f"benchmarks/samples/hw={res['hardware_tag']}/date=")
    con = connect(store)
    got = con.execute("SELECT count(*), count(temperature), count(DISTINCT hw), "
                      "min(created_at) IS NOT NULL FROM benchmarks").fetchone()
    assert got == (6, 6, 1, True)
    nulls = con.execute("SELECT method FROM benchmarks WHERE block_size IS NOT NULL").fetchall()
    assert nulls == [("dflash",)]
    assert con.execute("SELECT count(*) FROM benchmark_samples").fetchone()[0] == 12


def _files(store: Store) -> dict[str, str]:
    return {p: hashlib.sha256(store.read_bytes(p)).hexdigest() for p in store.find("benchmarks")}


def test_static_engine_path_is_lossless(tmp_path: Path, target: Any,
                                        drafts: dict[str, Path]) -> None:
    """`engine: static` (the CUDA fast path's code, graphs off on a CPU) for every engine method:
    recorded as such, and every output equal to generate()'s."""
    store = Store(str(tmp_path / "store"))
    cfg = BenchConfig(**{**CHEAP, "max_new_tokens": 12}, methods=["ar", "dflash", "classic"],
                      engine="static", block_sizes=[4], classic_k=2)
    run_benchmark(store, cfg, target, draft_folder=drafts["dflash"],
                  classic_folder=drafts["classic"])
    rows = connect(store).execute(
        "SELECT method, engine_path, exact_match_rate FROM benchmarks ORDER BY method").fetchall()
    assert {r[0] for r in rows} == {"hf_generate", "ar", "dflash", "classic"}
    assert {r[1] for r in rows if r[0] != "hf_generate"} == {"static"}
    assert all(r[2] == 1.0 for r in rows)


def test_skip_rerun_and_append_only(tmp_path: Path, smollm2_dir: Path, target: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path / "store"))
    cfg = BenchConfig(methods=["ar"], **CHEAP)
    first = run_benchmark(store, cfg, smollm2_dir)
    before = _files(store)
    assert len(before) == 3 and not first["skipped"]  # samples, summary, run record

    again = run_benchmark(store, cfg, target)  # same draft, config, model and hardware
    assert again["skipped"] and again["run_id"] == first["run_id"]
    assert _files(store) == before

    rerun = run_benchmark(store, cfg, target, rerun=True)  # scheduled runs always append
    after = _files(store)
    assert not rerun["skipped"] and rerun["run_id"] != first["run_id"]
    assert len(after) == 6 and all(after[p] == h for p, h in before.items())  # never rewritten

    monkeypatch.setattr(bench, "hardware_fingerprint", lambda info=None: "another-gpu-class")
    other = run_benchmark(store, cfg, target)  # same draft on new hardware: new rows
    assert not other["skipped"] and len(_files(store)) == 9
    con = connect(store)
    assert con.execute("SELECT count(DISTINCT run_id) FROM benchmarks").fetchone()[0] == 3


def test_s3_views_and_sampling_rows(s3_bucket: str, target: Any,
                                    drafts: dict[str, Path]) -> None:
    store = Store(f"s3://{s3_bucket}/prefix")
    cfg = BenchConfig(methods=["ar", "dflash"], temperatures=[0.0, 0.7],
                      **{**CHEAP, "max_new_tokens": 6})
    res = run_benchmark(store, cfg, target, draft_folder=drafts["dflash"])
    con = connect(store)
    rows = con.execute("SELECT method, temperature, block_size, exact_match_rate, speedup, tau "
                       "FROM benchmarks ORDER BY temperature, method").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("ar", 0.0), ("dflash", 0.0), ("hf_generate", 0.0),
                                            ("ar", 0.7), ("dflash", 0.7)]
    for method, temp, block, exact, speedup, tau in rows:
        assert (exact is None) == (temp > 0) and speedup is not None and tau is not None
        assert (block == 4) == (method == "dflash")
    n = con.execute("SELECT count(*) FROM benchmark_samples WHERE run_id = ? AND seed IS NOT NULL",
                    [res["run_id"]]).fetchone()[0]
    assert n == 2  # the sampled generations record their seed


def test_mismatched_draft_fails_before_decoding(tmp_path: Path, smollm2_dir: Path,
                                                drafts: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded or run before the draft check")

    import dflash_models.target

    monkeypatch.setattr(dflash_models.target, "load_target", forbidden)
    monkeypatch.setattr(bm, "run_engine", forbidden)
    monkeypatch.setattr(bm, "run_hf", forbidden)
    store = Store(str(tmp_path / "store"))
    cfg = BenchConfig(**CHEAP)
    with pytest.raises(DflashError, match="trained for another target.*hidden_size 32 != target"):
        bench_any_draft(store, cfg, drafts["foreign"], str(smollm2_dir))

    bad_layers = tmp_path / "bad-layers"
    shutil.copytree(drafts["dflash"], bad_layers)
    conf = json.loads((bad_layers / "config.json").read_text())
    conf["dflash_config"]["target_layer_ids"] = [1, 45]
    (bad_layers / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DflashError, match=r"target_layer_ids \[45\] out of range"):
        bench_any_draft(store, cfg, bad_layers, str(smollm2_dir))

    bad_vocab = tmp_path / "bad-vocab"
    shutil.copytree(drafts["classic"], bad_vocab)
    conf = json.loads((bad_vocab / "config.json").read_text())
    conf["vocab_size"] = 1000
    (bad_vocab / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DflashError, match="vocab_size 1000 != target vocab_size 49152"):
        bench_any_draft(store, cfg, bad_vocab, str(smollm2_dir))
    assert store.find("benchmarks") == []


def test_train_manifest_drafts_are_found_and_fetched(drafts: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported folders of a train output (not its deeper checkpoints), from a remote store."""
    monkeypatch.setenv("DFLASH_MODEL_CACHE", str(tmp_path / "cache"))
    store = Store("memory://bench-train-test")
    with StageOutput(store, "train", "k1", config={}) as out:
        for kind, rel in (("dflash", "dflash-draft"), ("dflash", "last/dflash-draft"),
                          ("classic", "classic-draft")):
            for p in sorted(drafts[kind].iterdir()):
                out.write_bytes(f"{rel}/{p.name}", p.read_bytes())
        m = out.commit()
    found = bench._train_drafts(store, m)
    assert set(found) == {"dflash", "classic"}
    assert found["dflash"].ref.endswith("train/k1/dflash-draft")
    for kind in ("dflash", "classic"):
        assert found[kind].digest == bm.folder_digest(drafts[kind])
        local = found[kind].local()
        assert bm.folder_digest(local) == found[kind].digest
        assert bm.draft_kind(local) == kind


def test_config_and_display_helpers() -> None:
    for bad in (dict(temperatures=[-0.5]), dict(block_sizes=[1]), dict(methods=["vllm"]),
                dict(typo=1), dict(datasets=[])):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    cfg = BenchConfig(temperatures=[0.7, 0, 0.0], block_sizes=[16, 4, 8, 4])
    assert cfg.temperatures == [0.0, 0.7] and cfg.block_sizes == [4, 8, 16]
    assert "rerun" not in cfg.key_config()
    key = bench.bench_artifact_key("cpu-amd-epyc-2c", "packaged:smollm2-135m-instruct")
    assert key == "bench-cpu-amd-epyc-2c-packaged-smollm2-135m-instruct"
    table = bench.bench_table_rows([{"method": "dflash", "block_size": 8, "dataset": "mt_bench",
                                     "temperature": 0.0, "tau": 1.23456, "speedup": 0.5}])
    assert table[0]["method"] == "dflash b8" and table[0]["tau"] == 1.235


def test_eval_split_prompts_come_from_the_filter_manifest() -> None:
    import pyarrow as pa

    from storage.parquet import to_parquet_bytes

    store = Store("memory://bench-eval-split-test")
    table = pa.table({"prompt_id": [f"sharegpt:{i}" for i in range(5)],
                      "prompt_token_ids": [[1, 2, i] for i in range(5)]})
    with StageOutput(store, "filter", "k1", config={}) as out:
        out.write_bytes("eval/part-00000.parquet", to_parquet_bytes(table), rows=5, table="eval")
        out.write_bytes("train/part-00000.parquet", to_parquet_bytes(table), rows=5, table="train")
        m = out.commit()
    got = bm.load_prompts("eval_split", 3, 0, None, store, m)
    assert len(got) == 3 and len({p.prompt_id for p in got}) == 3
    assert all(p.ids[:2] == [1, 2] for p in got)
    assert [p.prompt_id for p in got] == [p.prompt_id for p in
                                          bm.load_prompts("eval_split", 3, 0, None, store, m)]
    assert bm.load_prompts("eval_split", 3, 0, None, store, None) == []
