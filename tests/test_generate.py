"""Stage 1 generation: batching, the hf backend on the real SmolLM2, resumable shards (a real
SIGKILL of a subprocess), row accounting, and the openai backend against a real
``transformers serve`` on 127.0.0.1. Few prompts and few new tokens keep it fast on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dflash_models.generation import SamplingParams, encode_prompt, plan_batches, render_prompt
from storage import Store, read_manifest
from storage.catalog import connect
from storage.errors import StoreError
from tasks.backends import GenRow, get_backend
from tasks.generate import (
    GenerateConfig,
    commit_generation,
    generate_shard,
    layout_shards,
    plan_generation,
    run_generate,
    shard_name,
)
from tasks.models import TargetConfig, run_prepare_target
from tasks.prompts import PromptsConfig, PromptSource, run_prompts

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "Say only the word yes.",
             "Write a haiku about autumn.", "Name three prime numbers.",
             "What colour is the sky?", "Count from one to five."]


pytestmark = pytest.mark.usefixtures("one_thread")


def _prepared(store: Store, tmp_path: Path, questions: list[str], q_n: int | None = None,
              q_originals: int = 0, **src: object):
    """Target + prompt manifests for a small user file (sampled by q_n, with q_originals) and
    optionally one more source (``src``)."""
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": q, "reference_response": f"ref {i}"})
                            + "\n" for i, q in enumerate(questions)))
    sources = [PromptSource(kind="file", path=str(path), name="q", n=q_n, originals=q_originals)]
    if src:
        sources.append(PromptSource(**src))
    target = run_prepare_target(store, TargetConfig())
    return target, run_prompts(store, PromptsConfig(sources=sources), target)


# ----------------------------------------------------------------------------- units
def test_plan_batches_sorts_by_length_and_respects_the_budget() -> None:
    lengths = [5, 50, 10, 48, 7, 300]
    batches = plan_batches(lengths, max_new_tokens=10, token_budget=200, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [5]  # longest first, alone: over budget but never dropped
    for b in batches:
        width = max(lengths[i] for i in b) + 10
        assert len(b) == 1 or len(b) * width <= 200
        assert len(b) <= 3
    assert plan_batches([3, 3, 3], 1, 1) == [[0], [1], [2]]  # batch size 1
    # long prompts are prefilled one by one, so only the budget groups them; short ones pad
    assert plan_batches([2000, 300, 40, 30], 8, 10**6) == [[0, 1], [2, 3]]
    assert plan_batches([2000, 300, 40, 30], 8, 4000) == [[0], [1], [2, 3]]
    assert plan_batches([250, 40], 8, 10**6) == [[0], [1]]  # 210 pad tokens: too many


@contextmanager
def batch_one(backend: Any) -> Iterator[None]:
    """The hf backend as a batch-1 generator for the duration (the bench's baseline)."""
    budget, size = backend.token_budget, backend.max_batch_size
    backend.token_budget, backend.max_batch_size = 1, 1
    try:
        yield
    finally:
        backend.token_budget, backend.max_batch_size = budget, size


def test_long_prompts_prefilled_alone_then_decoded_together_match_batch_one(smollm2_dir: Path
                                                                            ) -> None:
    """Prompts of different lengths over PREFILL_TOKENS share one decode over a left-padded
    cache built from unpadded prefills; greedy outputs equal batch 1's."""
    from dflash_models.generation import PREFILL_TOKENS

    backend = get_backend("hf", smollm2_dir)
    tok = backend.tokenizer
    filler = "The harbour town woke slowly; gulls argued over the nets while the tide turned. "
    ids = [encode_prompt(tok, render_prompt(tok, [{"role": "user", "content": filler * n + q}]))
           for n, q in ((18, "Summarise the story."), (30, "What did the gulls do?"))]
    assert min(len(p) for p in ids) >= PREFILL_TOKENS and len({len(p) for p in ids}) == 2
    assert plan_batches([len(p) for p in ids], 6, 16384) == [[1, 0]]
    cache = backend.gen._prefill_cache(ids, max(len(p) for p in ids), 6)  # the path, no fallback
    assert cache is not None and cache.get_seq_length() == max(len(p) for p in ids) - 1
    rows = [GenRow(str(i), [], "", p) for i, p in enumerate(ids)]
    params = SamplingParams(max_new_tokens=6)
    together = backend.generate(rows, params)
    with batch_one(backend):
        alone = backend.generate(rows, params)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) > 0 for o in together)


def test_layout_keeps_dependent_turns_with_their_parent() -> None:
    parents = [None, None, "a", None, None, "d", None]
    shards = layout_shards(parents, shard_size=2)
    assert [(s.start, s.end) for s in shards] == [(0, 3), (3, 6), (6, 7)]
    assert [(s.start, s.end) for s in layout_shards([None] * 5, 2)] == [(0, 2), (2, 4), (4, 5)]
    # originals start their own shards, ORIGINALS_SHARD_FACTOR (16) times larger
    regen = [True] * 3 + [False] * 40
    got = [(s.start, s.end) for s in layout_shards([None] * 43, 2, regen)]
    assert got == [(0, 2), (2, 3), (3, 35), (35, 43)]


def test_originals_are_tokenised_not_generated(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    target, prompts = _prepared(store, tmp_path, QUESTIONS[:4], q_n=2, q_originals=2)
    cfg = GenerateConfig(max_new_tokens=3, shard_size=1)
    m = run_generate(store, cfg, target, prompts)
    assert m.extra["finish_reasons"] == {"length": 2, "reference": 2}
    assert m.extra["shards"] == 3  # two generated shards of 1 row, one shard of both originals
    con = connect(store)
    rows = con.execute("SELECT g.prompt_id, g.finish_reason, g.response_token_ids, "
                       "g.n_response_tokens, g.response_text, g.reference_response, "
                       "g.prompt_token_ids, p.n_prompt_tokens, g.latency_s FROM generations g "
                       "JOIN prompts p USING (prompt_id) ORDER BY g.finish_reason").fetchall()
    generated, originals = rows[:2], rows[2:]
    assert all(r[1] == "length" and r[3] == 3 and r[5].startswith("ref ") for r in generated)
    for pid, _, resp, n_resp, text, ref, ids, n_prompt, latency in originals:
        assert (resp, n_resp, text, latency) == ([], 0, "", 0.0)
        assert ref == f"ref {pid.split(':')[1]}" and len(ids) == n_prompt > 5
    assert {r[0] for r in rows} == {f"q:{i}" for i in range(4)}


def test_hf_backend_batched_greedy_matches_batch_one_and_honours_eos(smollm2_dir: Path) -> None:
    backend = get_backend("hf", smollm2_dir)
    tok = backend.tokenizer
    ids = [encode_prompt(tok, render_prompt(tok, [{"role": "user", "content": q}]))
           for q in QUESTIONS[:3]]
    rows = [GenRow(str(i), [], "", p) for i, p in enumerate(ids)]
    params = SamplingParams(max_new_tokens=8)
    batched = backend.generate(rows, params)
    with batch_one(backend):
        single = backend.generate(rows, params)
        sample = SamplingParams(max_new_tokens=4, temperature=0.9, seed=7)
        s1, s2 = backend.generate(rows[:2], sample), backend.generate(rows[:2], sample)
        s3 = backend.generate(rows[:2], SamplingParams(max_new_tokens=4, temperature=0.9, seed=8))
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    yes = batched[1]  # "Say only the word yes." stops on EOS well before 8 tokens
    assert yes.finish_reason == "stop" and yes.token_ids[-1] in backend.eos_ids
    assert "yes" in yes.text.lower() and len(yes.token_ids) < 8
    assert batched[2].finish_reason == "length" and len(batched[2].token_ids) == 8
    assert [o.token_ids for o in s1] == [o.token_ids for o in s2]  # seeded sampling
    assert [o.token_ids for o in s1] != [o.token_ids for o in s3]


# ----------------------------------------------------------------------------- the stage
def test_generate_stage_accounts_for_every_row(store_url: str, tmp_path: Path) -> None:
    store = Store(store_url)
    long_prompt = "hello " * 9000  # > SmolLM2's 8,192-token context: an errors row, no crash
    target, prompts = _prepared(store, tmp_path, [QUESTIONS[0], long_prompt, QUESTIONS[1]])
    cfg = GenerateConfig(max_new_tokens=4, shard_size=2)
    m = run_generate(store, cfg, target, prompts)
    assert m.rows == {"generations": 2, "generation_errors": 1}
    assert m.extra["n_prompts"] == 3 and m.extra["n_errors"] == 1
    assert sorted(f.path for f in m.files) == ["errors-00000.parquet", "errors-00001.parquet",
                                              "shard-00000.parquet", "shard-00001.parquet"]
    con = connect(store)
    err = con.execute("SELECT prompt_id, reason FROM generation_errors").fetchall()
    assert err[0][0] == "q:1" and "context is 8192 tokens" in err[0][1]
    row = con.execute("SELECT * FROM generations WHERE prompt_id = 'q:0'").fetchone()
    cols = [d[0] for d in con.execute("SELECT * FROM generations LIMIT 0").description]
    rec = dict(zip(cols, row, strict=True))
    assert rec["finish_reason"] == "length" and rec["n_response_tokens"] == 4
    assert rec["n_prompt_tokens"] == len(rec["prompt_token_ids"]) > 5
    assert rec["target"]["ref"] == "packaged:smollm2-135m-instruct"
    assert rec["target"]["digest"] == target.extra["digest"] and rec["backend"] == "hf"
    assert rec["temperature"] == 0 and rec["seed"] == 0 and rec["latency_s"] > 0
    assert rec["messages"] == [{"role": "user", "content": QUESTIONS[0]}]
    again = run_generate(store, cfg, target, prompts)
    assert again.key == m.key and again.created_at == m.created_at  # cached: nothing reruns


def test_mt_bench_turn_two_follows_the_targets_own_answer(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    target, prompts = _prepared(store, tmp_path, [QUESTIONS[1]], kind="mt_bench", n=1)
    m = run_generate(store, GenerateConfig(max_new_tokens=3, shard_size=1), target, prompts)
    assert m.rows["generations"] == 3 and len(m.files) == 4  # turns 1 and 2 share a shard
    con = connect(store)
    t1, t2 = con.execute("SELECT response_text, messages FROM generations WHERE source = 'mt_bench' "
                     "ORDER BY prompt_id").fetchall()
    assert t2[1][1] == {"role": "assistant", "content": t1[0]}


def test_commit_refuses_missing_shards(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    target, prompts = _prepared(store, tmp_path, QUESTIONS[:2])
    cfg = GenerateConfig(max_new_tokens=2, shard_size=1)
    plan = plan_generation(store, cfg, target, prompts)
    assert plan.pending() == [0, 1] and plan.committed is None
    first = generate_shard(store, plan, 0)
    assert first["rows"] == 1 and not first["skipped"]
    assert generate_shard(store, plan, 0)["skipped"]  # idempotent
    with pytest.raises(StoreError) as e:
        commit_generation(store, plan)
    assert "shard-00001.parquet" in str(e.value) and "\n" not in str(e.value)
    assert read_manifest(store, "generations", plan.key) is None
    generate_shard(store, plan, 1)
    m = commit_generation(store, plan)
    assert m.rows == {"generations": 2, "generation_errors": 0}
    assert plan_generation(store, cfg, target, prompts).committed["key"] == m.key


_KILL_SCRIPT = r"""
import json, sys, time
from storage import Store, read_manifest
from tasks.generate import GenerateConfig, run_generate
store = Store(sys.argv[1])
target = read_manifest(store, "targets", sys.argv[2])
prompts = read_manifest(store, "prompts", sys.argv[3])
def slow_map(fn, shards):  # a pause after each shard gives the test time to kill mid-stage
    for i in shards:
        fn(i)
        time.sleep(30)
run_generate(store, GenerateConfig(**json.loads(sys.argv[4])), target, prompts, map_fn=slow_map)
"""


def test_sigkill_mid_stage_resumes_at_the_first_missing_shard(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    target, prompts = _prepared(store, tmp_path, QUESTIONS)
    cfg = GenerateConfig(max_new_tokens=3, shard_size=2)
    plan = plan_generation(store, cfg, target, prompts)
    part0 = Path(store.path(f"{plan.prefix}/_parts/{shard_name(0)}.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, store.url, target.key,
                             prompts.key, cfg.model_dump_json()], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not part0.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert part0.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    shard0 = Path(store.path(f"{plan.prefix}/{shard_name(0)}"))
    mtime = shard0.stat().st_mtime_ns
    assert read_manifest(store, "generations", plan.key) is None
    assert plan_generation(store, cfg, target, prompts).pending() == [1, 2]

    ran: list[int] = []
    m = run_generate(store, cfg, target, prompts,
                     map_fn=lambda fn, shards: [ran.append(i) or fn(i) for i in shards])
    assert ran == [1, 2]  # resumed at the first missing shard; shard 0 not regenerated
    assert shard0.stat().st_mtime_ns == mtime
    assert m.rows == {"generations": 6, "generation_errors": 0}
    ids = connect(store).execute("SELECT prompt_id FROM generations").fetchall()
    assert sorted(i for (i,) in ids) == [f"q:{i}" for i in range(6)]  # none lost or duplicated


# The openai backend (a fleet of real servers) is tested in tests/test_fleet.py.
