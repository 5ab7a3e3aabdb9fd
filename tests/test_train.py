"""The train stage: loss/anchor plumbing, online == cached, SIGKILL resume, DDP, a real run.

Most tests use a tiny random Llama target that shares SmolLM2's real tokenizer (so "original"
answers are tokenized as in production) and runs in seconds; one test trains on the real
packaged SmolLM2 with its own greedy continuations.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load, load_file

from dflash_models.blocks import (
    BlockStats,
    DFlashTrainModule,
    VocabHead,
    dflash_loss_sum,
    greedy_block_labels,
    make_dflash_batch,
)
from dflash_models.features import OnlineFeatures, bytes_per_token, target_pass
from dflash_models.target import load_target
from dflash_models.trainer import (
    build_optimizer,
    build_scheduler,
    example_generator,
    load_sharded,
    lr_factor,
    plan_step,
    restore_state,
    retarget_scheduler,
    save_sharded,
    state_json,
)
from dflash_models.training import IGNORE_INDEX, block_accuracy, sample_anchors
from storage import StageOutput, Store, read_manifest
from storage.catalog import connect
from tasks.train import TrainConfig, features_config, resolve_target, run_train
from tasks.train_features import DataSelection, load_data, read_features, run_features

REPO = Path(__file__).resolve().parent.parent
QA = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("Name three primary colors.", "Red, yellow and blue are the three primary colors."),
    ("How many legs does a spider have?", "A spider has eight legs, unlike insects with six."),
    ("What does a thermometer measure?", "A thermometer measures temperature in degrees."),
    ("Give me a synonym for happy.", "A good synonym for happy is joyful, or cheerful."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules and blue light scatters most."),
    ("What is two plus two?", "Two plus two equals four. It is simple arithmetic."),
    ("Write a haiku about rain.", "Soft rain on the roof, quiet drums for sleeping towns, "
                                  "puddles hold the sky."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon "
                                "dioxide into sugar and oxygen."),
    ("Translate hello to Spanish.", "Hello in Spanish is hola. It is used all day long."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest and deepest ocean."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare around 1600."),
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core box OpenMP spin-waits
    make 2 threads 10-100x slower; the stage itself takes ``threads`` from its config."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def write_filter(store: Store, rows: list[dict], n_eval: int, key: str = "test-filter"):
    """A committed "filter" output with train/eval tables as the filter stage writes them."""
    def table(rs: list[dict]) -> pa.Table:
        return pa.table({
            "prompt_id": [r["prompt_id"] for r in rs],
            "prompt_token_ids": pa.array([r["prompt"] for r in rs], pa.list_(pa.int32())),
            "response_token_ids": pa.array([r["response"] for r in rs], pa.list_(pa.int32())),
            "reference_response": pa.array([r.get("reference") for r in rs], pa.string()),
            "n_response_tokens": [len(r["response"]) for r in rs],
        })
    with StageOutput(store, "filter", key, config={"test": key}) as out:
        if out.manifest:
            return out.manifest
        out.write_parquet("train.parquet", table(rows[n_eval:]), table_name="train")
        out.write_parquet("eval.parquet", table(rows[:n_eval]), table_name="eval")
        return out.commit()


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 4-layer, 64-wide random Llama with SmolLM2's tokenizer and vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-target")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_rows(tiny_target_dir: Path) -> list[dict]:
    """Prompts with 'regenerated' responses (answer tokens) and the original answers reversed
    word by word, so both sources are distinguishable."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    rows = []
    for i, (q, a) in enumerate(QA * 2):
        resp = list(tok(a, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        rows.append({"prompt_id": f"p{i}", "prompt": chat_ids(tok, q), "response": resp,
                     "reference": " ".join(reversed(a.split()))})
    return rows


def tiny_store(tmp_path: Path, rows: list[dict]) -> tuple[Store, object]:
    store = Store(tmp_path / "store")
    return store, write_filter(store, rows, n_eval=4)


# ----------------------------------------------------------------------------- unit pieces
def test_schedule_warmup_and_cosine() -> None:
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    # a re-plan moves the end of the cosine, keeps the warm-up and what was already stepped
    opt = build_optimizer(torch.nn.Linear(2, 2), 1.0, 0.0)
    sched = build_scheduler(opt, 100, 10, 0.1)
    for _ in range(20):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(lr_factor(20, 100, 10, 0.1))
    retarget_scheduler(sched, 40)
    for _ in range(20):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # the end: min_ratio at step 40


def test_plan_step_splits_global_batch_across_ranks() -> None:
    one = plan_step(3, 20, 0, batch_size=4, grad_accum=1, world=1)
    two = plan_step(3, 20, 0, batch_size=2, grad_accum=1, world=2)
    acc = plan_step(3, 20, 0, batch_size=1, grad_accum=2, world=2)
    assert sorted(one.examples) == sorted(two.examples) == sorted(acc.examples)
    assert one.epoch == 0 and plan_step(5, 20, 0, 4, 1, 1).epoch == 1
    assert two.for_rank(0) != two.for_rank(1)


def test_checkpoint_roundtrip_has_no_pickles(tmp_path: Path) -> None:
    """A world of one (no process group): DCP shards in safetensors + state.json, no pickle."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-2, 0.1)
    sched = build_scheduler(opt, 10, 2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    groups = save_sharded(str(tmp_path), model, opt)
    blob = state_json(sched, groups, {"step": 3})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and all(f.endswith(".safetensors") for f in files), files
    assert all(not (tmp_path / f).read_bytes().startswith(b"\x80") for f in files)  # no pickle
    expected_rand = torch.rand(3)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt2 = build_optimizer(model2, 1e-2, 0.1)
    sched2 = build_scheduler(opt2, 10, 2)
    torch.manual_seed(123)
    state, groups2 = restore_state(blob, sched2)
    load_sharded(str(tmp_path), model2, opt2, groups2)
    assert state["step"] == 3
    # the RNG came back too: the same draw as right after the checkpoint
    torch.testing.assert_close(torch.rand(3), expected_rand)
    x = torch.randn(2, 4)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_block_stats_match_block_accuracy() -> None:
    torch.manual_seed(0)
    B = 4
    logits = torch.randn(6 * B, 5)
    labels = torch.randint(0, 5, (6 * B,))
    labels[::B] = IGNORE_INDEX
    labels[5] = IGNORE_INDEX
    ref = block_accuracy(logits, labels, B)
    stats = BlockStats(B)
    pred = logits.argmax(-1)
    stats.update(pred[:3 * B], labels[:3 * B])  # two batches accumulate to the whole
    stats.update(pred[3 * B:], labels[3 * B:])
    res = stats.result()
    assert res["tau_sim"] == pytest.approx(float(ref.tau_sim))
    torch.testing.assert_close(torch.tensor(res["acc"]), ref.per_position)


def test_greedy_block_labels_follow_the_target_chain() -> None:
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    greedy = torch.tensor([-1, 6, 7, 0, 9, 10])  # the target disagrees at position 3
    labels = greedy_block_labels(ids, greedy, torch.tensor([1, 3]), 4)
    X = IGNORE_INDEX
    # anchor 1: offsets 1 (pos 2, agree), 2 (pos 3: label = target's 0), 3 (pos 4: chain broken)
    assert labels.tolist() == [[X, 7, 0, X], [X, 9, 10, X]]


def test_feature_bytes_per_token() -> None:
    assert bytes_per_token(4, 576, "bfloat16") == 4 * 576 * 2 + 8
    assert bytes_per_token(5, 4096, "float32") == 5 * 4096 * 4 + 8
    assert bytes_per_token(4, 576, "bfloat16", keep_last=True) == 5 * 576 * 2 + 8


# ----------------------------------------------------------------------------- features
def test_online_and_cached_features_give_the_same_loss(tmp_path: Path, tiny_target_dir: Path,
                                                       tiny_rows: list[dict]) -> None:
    from dflash_models.draft import DFlashDraft, DFlashDraftConfig
    from dflash_models.features import CachedFeatures

    store, fm = tiny_store(tmp_path, tiny_rows)
    target = load_target(tiny_target_dir, device="cpu")
    folder, ref = resolve_target(tiny_target_dir)
    layer_ids = [1, 3, 5]
    torch.manual_seed(0)
    draft = DFlashDraft(DFlashDraftConfig.from_target(target, num_layers=1, block_size=4,
                                                      target_layer_ids=layer_ids))
    module, head = DFlashTrainModule(draft), VocabHead(target)
    idx = [0, 3, 7]

    def loss(source, data) -> torch.Tensor:
        rows = source.get(idx)
        anchors = [sample_anchors(data.train[i].response_start, len(r.ids), 6, 4,
                                  example_generator(0, 0, i))
                   for i, r in zip(idx, rows, strict=True)]
        batch = make_dflash_batch([r.ids for r in rows], [r.features for r in rows], anchors,
                                  4, draft.config.mask_token_id, 4.0)
        return dflash_loss_sum(module, target, head, batch) / batch.weights.sum()

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig.tiny(features="cached", feature_dtype=dtype, target_layer_ids=layer_ids)
        data = load_data(store, fm, target, cfg.selection())
        fman = run_features(store, features_config(cfg, layer_ids, False),
                            {"target": ref, "filter": fm}, target, data)
        assert fman.extra["bytes_per_token"] == bytes_per_token(3, 64, dtype)
        stored = sum(f.size for f in fman.files if f.path.endswith(".safetensors"))
        tokens = sum(s["tokens"] for s in fman.extra["splits"].values())
        assert stored == pytest.approx(tokens * fman.extra["bytes_per_token"], rel=0.1)
        losses[dtype] = loss(CachedFeatures(read_features(store, fman, "train"), data.train),
                             data)
    losses["online"] = loss(OnlineFeatures(target, layer_ids, data.train), data)
    torch.testing.assert_close(losses["online"], losses["float32"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["online"], losses["bfloat16"], rtol=2e-2, atol=1e-3)
    # a batch's features do not depend on what else rides in the batch (right padding)
    alone = target_pass(target, [data.train[3].ids], layer_ids)[0]
    torch.testing.assert_close(OnlineFeatures(target, layer_ids, data.train).get(idx)[1].features,
                               alone.features, rtol=1e-4, atol=1e-5)
    # with the response start given, the head runs only where a label can be: the same greedy
    # tokens over the response, -1 in the prompt
    ex = data.train[3]
    cut = target_pass(target, [ex.ids], layer_ids, starts=[ex.response_start])[0].greedy
    assert torch.equal(cut[ex.response_start:], alone.greedy[ex.response_start:])
    assert (cut[: ex.response_start] == -1).all() and (alone.greedy[1:] >= 0).all()


def test_bf16_feature_pass_is_close_and_only_for_the_train_split(
        tmp_path: Path, tiny_target_dir: Path, tiny_rows: list[dict]) -> None:
    """``feature_cpu_bf16``: the train split's features come from a bf16-autocast pass (close to
    the exact one, not equal), the held-out split's are exact, and the key tells them apart."""
    store, fm = tiny_store(tmp_path, tiny_rows)
    target = load_target(tiny_target_dir, device="cpu")
    _, ref = resolve_target(tiny_target_dir)
    layer_ids = [1, 3, 5]
    cfg = TrainConfig.tiny(features="cached", target_layer_ids=layer_ids)
    data = load_data(store, fm, target, cfg.selection())
    exact, fast = (run_features(store, features_config(cfg, layer_ids, bf16),
                                {"target": ref, "filter": fm}, target, data)
                   for bf16 in (False, True))
    assert exact.key != fast.key and fast.extra["train_cpu_bf16"] is True
    for split in ("train", "eval"):
        a, b = read_features(store, exact, split), read_features(store, fast, split)
        assert a.keys() == b.keys() and a
        fa = torch.cat([a[i].features.float() for i in sorted(a)])
        fb = torch.cat([b[i].features.float() for i in sorted(b)])
        if split == "eval":
            assert torch.equal(fa, fb)
        else:
            assert not torch.equal(fa, fb)
            assert (fa - fb).norm() / fa.norm() < 0.05


def test_padded_batch_blocks_see_only_context_before_their_anchor(tiny_target_dir: Path
                                                                   ) -> None:
    """Sequences of different lengths in one right-padded batch (with -1 padding blocks): a
    block's hidden states ignore features at or after its anchor and do not depend on the
    other sequences in the batch."""
    from dflash_models.draft import DFlashDraft, DFlashDraftConfig

    target = load_target(tiny_target_dir, device="cpu")
    torch.manual_seed(0)
    draft = DFlashDraft(DFlashDraftConfig.from_target(target, num_layers=2, block_size=4,
                                                      target_layer_ids=[1, 3]))
    module = DFlashTrainModule(draft).eval()
    ids = [torch.randint(0, 1000, (20,)), torch.randint(0, 1000, (13,))]
    feats = [torch.randn(20, 128), torch.randn(13, 128)]
    anchors = [torch.tensor([5, 9, 17]), torch.tensor([4, 11])]

    def hidden(ids_, feats_, anchors_):
        b = make_dflash_batch(ids_, feats_, anchors_, 4, draft.config.mask_token_id, 4.0)
        with torch.no_grad():
            return module(target.embed(b.block_ids), b.features, b.block_positions, b.mask)

    base = hidden(ids, feats, anchors)
    for n, a in enumerate(anchors[1].tolist()):
        noisy = feats[1].clone()
        noisy[a:] += 10 * torch.randn_like(noisy[a:])
        out = hidden(ids, [feats[0], noisy], anchors)
        blk = slice(4 * n, 4 * n + 4)
        torch.testing.assert_close(out[1, blk], base[1, blk], rtol=1e-5, atol=1e-5)
        if n == 0:  # the perturbation reaches the later block's context: it does change
            assert not torch.allclose(out[1, 4 * (n + 1):8], base[1, 4 * (n + 1):8])
    alone = hidden([ids[1]], [feats[1]], [anchors[1]])
    torch.testing.assert_close(alone[0], base[1, :8], rtol=1e-4, atol=1e-5)


def test_time_budget_is_also_a_deadline(tmp_path: Path, tiny_target_dir: Path,
                                        tiny_rows: list[dict], monkeypatch: Any) -> None:
    """Steps that turn out slower than the up-front plan (here: a throttle the calibration does
    not see) stop at the budget, not at the planned step count, and still export a draft."""
    store, fm = tiny_store(tmp_path, tiny_rows)
    monkeypatch.setenv("DFLASH_TRAIN_THROTTLE_S", "0.5")
    m = run_train(store, TrainConfig.tiny(max_steps=200, eval_every=0, checkpoint_every=1000,
                                          classic_layers=0, time_budget_min=0.05),
                  tiny_target_dir, fm)
    steps = m.extra["dflash"]["steps"]
    assert 1 <= steps <= 3 / 0.5 + 2  # 3 s of budget at >= 0.5 s a step, not the ~100+ planned
    assert any(f.path.startswith("dflash-draft/") for f in m.files)


def test_time_budget_replans_at_every_checkpoint(tmp_path: Path, tiny_target_dir: Path,
                                                     tiny_rows: list[dict],
                                                     monkeypatch: Any) -> None:
    """The up-front plan misses what its calibration cannot see (here: a throttle); every
    checkpoint re-plans from the pace since the last, so the schedule ends at the budget rather
    than being cut, and each checkpoint records its step count for a resume."""
    import tasks.train_dist as td

    store, fm = tiny_store(tmp_path, tiny_rows)
    monkeypatch.setenv("DFLASH_TRAIN_THROTTLE_S", "0.25")
    recorded: list[tuple[int, int]] = []  # (step, total_steps) of every checkpoint written
    real = td._write_checkpoint

    def spy(ph, ctx, model, opt, sched, state, s):
        recorded.append((s, state["total_steps"]))
        real(ph, ctx, model, opt, sched, state, s)

    monkeypatch.setattr(td, "_write_checkpoint", spy)
    m = run_train(store, TrainConfig.tiny(max_steps=400, eval_every=0, checkpoint_every=2,
                                          classic_layers=0, time_budget_min=0.1),
                  tiny_target_dir, fm)
    d = m.extra["dflash"]
    assert d["planned_steps"] > 60  # the calibration timed unthrottled passes
    assert 2 < d["total_steps"] <= 6 / 0.25 + 2  # 6 s at >= 0.25 s a step
    assert d["steps"] <= d["total_steps"]
    assert recorded and recorded[0][0] == 2 and recorded[0][1] < d["planned_steps"]
    assert recorded[-1][1] == d["total_steps"]  # each checkpoint carries the plan it made


def test_data_mix_is_configurable_and_recorded(tmp_path: Path, tiny_target_dir: Path,
                                               tiny_rows: list[dict]) -> None:
    store, fm = tiny_store(tmp_path, tiny_rows)
    target = load_target(tiny_target_dir, device="cpu")
    both = load_data(store, fm, target, DataSelection(max_seq_len=96))
    orig = load_data(store, fm, target, DataSelection(mix_regenerated=0.0, max_seq_len=96))
    half = load_data(store, fm, target, DataSelection(mix_original=0.5, max_train_tokens=150,
                                                      max_seq_len=96))
    assert {e.source for e in both.train} == {"regenerated", "original"}
    assert {e.source for e in orig.train} == {"original"}
    assert both.mix["sources"]["original"]["sequences"] == len(tiny_rows) - 4
    assert 150 <= half.mix["response_tokens"] < 150 + 40
    # the budget cuts originals first: exactly the regenerated tokens' worth keeps them all
    regen = both.mix["sources"]["regenerated"]
    cut = load_data(store, fm, target, DataSelection(max_train_tokens=regen["response_tokens"],
                                                     max_seq_len=96))
    assert cut.mix["sources"]["regenerated"] == regen
    assert cut.mix["sources"]["original"]["sequences"] == 0
    # an original answer is the source text in the target's tokens, closed by end-of-turn
    ex = orig.train[0]
    text = target.tokenizer.decode(ex.ids[ex.response_start:-1])
    assert text == tiny_rows[4 + ex.row]["reference"]
    assert int(ex.ids[-1]) == target.tokenizer.eos_token_id
    # held-out sequences are always the eval split's regenerated responses
    assert all(e.source == "regenerated" for e in both.eval) and len(both.eval) == 4


def test_reduced_draft_vocab_head_and_coverage(tmp_path: Path, tiny_target_dir: Path,
                                                tiny_rows: list[dict]) -> None:
    """EAGLE-3-style reduced head: its logits are the full head's rows, out-of-vocabulary labels
    carry no loss, and the run records coverage and exports the id map."""
    target = load_target(tiny_target_dir, device="cpu")
    ids = torch.tensor([3, 17, 400, 2])
    head, full = VocabHead(target, ids), VocabHead(target)
    h = torch.randn(5, 64)
    torch.testing.assert_close(head.logits(h), full.logits(h)[:, ids])
    labels = torch.tensor([17, 5, IGNORE_INDEX, 2])
    assert head.labels(labels).tolist() == [1, IGNORE_INDEX, IGNORE_INDEX, 3]
    assert head.to_target(torch.tensor([0, 3])).tolist() == [3, 2]

    store, fm = tiny_store(tmp_path, tiny_rows)
    m = run_train(store, TrainConfig.tiny(draft_vocab_size=64, max_steps=3, classic_layers=0,
                                          time_budget_min=1e-4), tiny_target_dir, fm)
    assert m.extra["dflash"]["steps"] == 1  # a budget far below one step still takes one
    info = m.extra["draft_vocab"]
    assert info["size"] == 64 and 0.5 < info["train_coverage"] <= 1.0
    assert 0.0 <= info["eval_coverage"] <= 1.0
    d2t = load(store.read_bytes(f"{m.prefix}/dflash-draft/draft_vocab.safetensors"))["d2t"]
    ids = d2t + torch.arange(64)  # vLLM's form: offsets (target id = i + d2t[i])
    assert d2t.shape == (64,) and torch.equal(ids, ids.sort().values) and int(d2t.min()) >= 0
    # the exported draft carries its id map: the engine drafts only those ids
    from dflash_models.draft import DFlashDraft

    with tempfile.TemporaryDirectory() as tmp:
        for f in m.files:
            if f.path.startswith("dflash-draft/"):
                (Path(tmp) / f.path.split("/", 1)[1]).write_bytes(
                    store.read_bytes(f"{m.prefix}/{f.path}"))
        assert torch.equal(DFlashDraft.load(tmp).draft_ids, ids)


def test_distillation_online_and_cached_give_the_same_loss(tmp_path: Path, tiny_target_dir: Path,
                                                           tiny_rows: list[dict]) -> None:
    """The cache keeps the target's final hidden states for distillation (train split only), and
    the teacher's distributions rebuilt from them give the online loss."""
    from dflash_models.features import unpack_shard

    store, fm = tiny_store(tmp_path, tiny_rows)
    plain = run_train(store, TrainConfig.tiny(max_steps=3, classic_layers=0), tiny_target_dir, fm)
    last = {}
    for features in ("online", "cached"):
        m = run_train(store, TrainConfig.tiny(distill=0.5, features=features, max_steps=3,
                                              classic_layers=0), tiny_target_dir, fm)
        assert m.key != plain.key
        last[features] = m.extra["dflash"]["last"]["loss"]
        assert math.isfinite(last[features])
    assert last["online"] == pytest.approx(last["cached"], rel=1e-4)
    # the teacher's entropy enters the loss: same batches, a different value
    assert last["cached"] != pytest.approx(plain.extra["dflash"]["last"]["loss"], rel=1e-3)
    fman = read_manifest(store, "features", m.extra["features_key"])
    assert fman.extra["keep_last"] and fman.extra["bytes_per_token"] == bytes_per_token(
        len(fman.extra["layer_ids"]), 64, fman.extra["dtype"], keep_last=True)
    for f in fman.files:
        if f.path.endswith(".safetensors"):
            rows = unpack_shard(store.read_bytes(f"{fman.prefix}/{f.path}"))
            for r in rows.values():
                if f.path.startswith("train-"):
                    assert r.last is not None and r.last.shape == (r.ids.shape[0], 64)
                else:
                    assert r.last is None


def test_target_labels_teach_the_greedy_chain_online_and_cached(tmp_path: Path,
                                                                 tiny_target_dir: Path,
                                                                 tiny_rows: list[dict]) -> None:
    """labels="target" trains on what greedy verification accepts (the random tiny target's
    argmax differs from the answers): the same loss from both feature modes, not the tokens'."""
    store, fm = tiny_store(tmp_path, tiny_rows)
    last = {}
    for labels, features in (("tokens", "cached"), ("target", "cached"), ("target", "online")):
        m = run_train(store, TrainConfig.tiny(labels=labels, features=features, max_steps=2,
                                              classic_layers=0), tiny_target_dir, fm)
        last[labels, features] = m.extra["dflash"]["last"]["loss"]
    assert last["target", "online"] == pytest.approx(last["target", "cached"], rel=1e-4)
    assert last["target", "cached"] != pytest.approx(last["tokens", "cached"], rel=1e-2)
    # a reduced head is then chosen from the tokens it is taught: the target's greedy ones
    maps = {}
    for labels in ("tokens", "target"):
        m = run_train(store, TrainConfig.tiny(labels=labels, features="cached", max_steps=1,
                                              draft_vocab_size=32, classic_layers=0),
                      tiny_target_dir, fm)
        maps[labels] = load(store.read_bytes(f"{m.prefix}/dflash-draft/draft_vocab.safetensors"))
        assert m.extra["draft_vocab"]["train_coverage"] > 0.3
    assert not torch.equal(maps["tokens"]["d2t"], maps["target"]["d2t"])


# ----------------------------------------------------------------------------- resume, DDP
KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from storage import Store, read_manifest
    from tasks.train import TrainConfig, run_train
    store_path, folder, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = Store(store_path)
    run_train(store, TrainConfig(**cfg), Path(folder), read_manifest(store, "filter", "test-filter"))
""")


def _draft_state(store: Store, manifest, folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(store.read_bytes(f"{manifest.prefix}/{folder}/model.safetensors"))


def test_sigkill_resume_reaches_the_same_weights(tmp_path: Path, tiny_target_dir: Path,
                                                 tiny_rows: list[dict]) -> None:
    cfg = TrainConfig.tiny(max_steps=12, checkpoint_every=3, eval_every=3, classic_layers=0,
                           export_last=True)
    ref_store, fm = tiny_store(tmp_path / "ref", tiny_rows)
    ref = run_train(ref_store, cfg, tiny_target_dir, fm)

    import shutil

    shutil.copytree(tmp_path / "ref/store/filter", tmp_path / "killed/store/filter")
    store = Store(tmp_path / "killed/store")  # same filter output, same key, fresh train folder
    env = {**os.environ, "DFLASH_TRAIN_THROTTLE_S": "0.4", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "killed/store"),
                             str(tiny_target_dir), cfg.model_dump_json()], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = "checkpoints__dflash__step-0000006__state.json.json"
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed/store/train").glob(f"*/_parts/{marker}")):
        assert proc.poll() is None, "training subprocess ended before its checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(store, "train", ref.key) is None  # killed before committing

    resumed = run_train(store, cfg, tiny_target_dir, fm)
    assert resumed.key == ref.key
    summary = json.loads(store.read_bytes(f"{resumed.prefix}/train_summary.json"))
    assert summary["dflash"]["resumed_from"] in (6, 9)  # the newest complete checkpoint
    for folder in ("last/dflash-draft", "dflash-draft"):
        a, b = _draft_state(ref_store, ref, folder), _draft_state(store, resumed, folder)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.extra["dflash"]["best"]["step"] == ref.extra["dflash"]["best"]["step"]
    con_ref, con = connect(ref_store), connect(store)
    q = "SELECT step, loss, tau_sim FROM train_metrics ORDER BY step"
    for (s1, l1, t1), (s2, l2, t2) in zip(con_ref.sql(q).fetchall(), con.sql(q).fetchall(),
                                          strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
        assert (t1 is None and t2 is None) or t1 == pytest.approx(t2, rel=1e-6)
    assert not store.find(f"{resumed.prefix}/checkpoints")  # resume state is cleaned up


def test_ddp_two_processes_match_one(tmp_path: Path, tiny_target_dir: Path,
                                     tiny_rows: list[dict]) -> None:
    """torchrun --nproc_per_node 2 (gloo): per-step losses equal a single process's with the
    same global batch."""
    one = TrainConfig.tiny(batch_size=4, max_steps=3, eval_every=0, classic_layers=0)
    two = one.model_copy(update={"nproc": 2})  # batch_size is global
    assert two.key_config() == one.key_config()
    losses = []
    for name, cfg in (("one", one), ("two", two)):
        store, fm = tiny_store(tmp_path / name, tiny_rows)
        m = run_train(store, cfg, tiny_target_dir, fm)
        rows = connect(store).sql("SELECT step, loss FROM train_metrics WHERE phase = 'dflash' "
                                  "ORDER BY step").fetchall()
        losses.append([loss for _, loss in rows])
        assert m.extra["dflash"]["steps"] == 3
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0][0] != pytest.approx(losses[0][2], rel=1e-4)  # it did train


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_smollm2_training_loss_falls_and_exports_reload(tmp_path: Path, smollm2_dir: Path
                                                        ) -> None:
    """Real SmolLM2 target and its own greedy continuations: the DFlash loss falls, the
    exported draft reloads and reproduces the recorded held-out tau_sim, and the classic
    draft works as transformers' assistant model (lossless)."""
    from transformers import AutoModelForCausalLM

    from dflash_models.blocks import eval_dflash_batch
    from dflash_models.draft import DFlashDraft, check_compatible
    from dflash_models.features import CachedFeatures  # noqa: F401  (documented path)
    from tasks.train_phases import eval_anchors

    target = load_target(smollm2_dir, device="cpu")
    tok = target.tokenizer
    tok.padding_side = "left"
    qa = QA[:8]
    enc = tok([tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q, _ in qa],
              return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        gen = target.model.generate(**enc, max_new_tokens=24, do_sample=False)
    rows = []
    for i, (q, a) in enumerate(qa):
        prompt = chat_ids(tok, q)
        resp = [t for t in gen[i, enc["input_ids"].shape[1]:].tolist() if t != tok.pad_token_id]
        rows.append({"prompt_id": f"q{i}", "prompt": prompt, "response": resp, "reference": a})
    store = Store(tmp_path / "store")
    fm = write_filter(store, rows, n_eval=2)
    cfg = TrainConfig.tiny(features="cached", feature_dtype="bfloat16", max_steps=24,
                           anchors_per_seq=12, lr=1e-3, eval_every=12, checkpoint_every=12,
                           classic_max_steps=4,
                           data=DataSelection(max_seq_len=128, eval_max_seqs=2))
    m = run_train(store, cfg, smollm2_dir, fm)

    con = connect(store)
    losses = [r[0] for r in con.sql("SELECT loss FROM train_metrics WHERE phase = 'dflash' "
                                    "ORDER BY step").fetchall()]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0], losses
    taus = con.sql("SELECT phase, step, tau_sim, acc FROM (SELECT * FROM train_metrics UNION ALL "
                   "SELECT * FROM classic_train_metrics) WHERE tau_sim IS NOT NULL "
                   "ORDER BY phase, step").fetchall()
    assert [(p, s) for p, s, _, _ in taus] == [("classic", 4), ("dflash", 12), ("dflash", 24)]
    assert all(1.0 <= t <= cfg.block_size and len(acc) == cfg.block_size - 1
               for _, _, t, acc in taus)
    extra = m.extra
    assert extra["data_mix"]["sources"]["original"]["sequences"] == 6
    assert extra["feature_bytes_per_token"] == 4 * 576 * 2 + 8
    best = extra["dflash"]["best"]
    assert best["tau_sim"] == max(t for p, _, t, _ in taus if p == "dflash")

    # export -> reload: the serving layout loads and reproduces the recorded held-out tau_sim
    out = tmp_path / "export"
    for f in m.files:
        dest = out / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read_bytes(f"{m.prefix}/{f.path}"))
    hf = json.loads((out / "dflash-draft/config.json").read_text())
    assert hf["architectures"] == ["DFlashDraftModel"] and hf["block_size"] == 8
    assert set(hf["dflash_config"]) == {"mask_token_id", "target_layer_ids", "causal", "use_swa"}
    assert not any("embed" in k or "lm_head" in k
                   for k in load_file(out / "dflash-draft/model.safetensors"))
    draft = DFlashDraft.load(out / "dflash-draft")
    check_compatible(draft.config, target)
    data = load_data(store, fm, target, cfg.selection())
    feats = read_features(store, read_manifest(store, "features", extra["features_key"]), "eval")
    stats = BlockStats(cfg.block_size)
    anchors = eval_anchors(cfg, data, draft.config.block_size)
    rows_ = [feats[i] for i in range(len(data.eval))]
    labels = [greedy_block_labels(r.ids, r.greedy, anchors[i], 8) for i, r in enumerate(rows_)]
    batch = make_dflash_batch([r.ids for r in rows_], [r.features.float() for r in rows_],
                              anchors, 8, draft.config.mask_token_id, cfg.gamma, labels=labels)
    eval_dflash_batch(DFlashTrainModule(draft), target, VocabHead(target), batch, stats)
    assert stats.result()["tau_sim"] == pytest.approx(best["tau_sim"], abs=1e-9)

    # the classic draft is a plain AutoModelForCausalLM that assisted generation accepts
    classic = AutoModelForCausalLM.from_pretrained(out / "classic-draft")
    ids = torch.tensor([chat_ids(tok, QA[9][0])])
    plain = target.model.generate(ids, max_new_tokens=10, do_sample=False)
    assisted = target.model.generate(ids, max_new_tokens=10, do_sample=False,
                                     assistant_model=classic)
    assert torch.equal(plain, assisted)


def test_scaling_bench_reads_a_timed_point_at_equal_epochs(
        tmp_path: Path, load_bench: Callable[[str], ModuleType]) -> None:
    """bench/train_scaling.py --top: a timed run's figure on the curve is its best evaluation at
    or before --epochs epochs, read off its train_metrics; its overall best stays separate."""
    bench = load_bench("train_scaling")
    store = Store(tmp_path / "store")
    evals = [(100, 2.0, 1.20), (200, 4.0, 1.31), (300, 8.0, 1.29), (400, 8.5, 1.40),
             (500, 12.0, 1.38)]
    rows = [{"step": s, "epoch": e, "wall_s": s / 10, "tau_sim": t} for s, e, t in evals]
    rows.insert(1, {"step": 150, "epoch": 3.0, "wall_s": 15.0, "tau_sim": None})  # a train row
    with StageOutput(store, "train", "k", config={}, inputs={}) as out:
        out.write_parquet("train_metrics.parquet", pa.Table.from_pylist(rows),
                          table_name="train_metrics")
        m = out.commit()
    assert bench._best_until(store, m, 8.0) == {"tau_sim": 1.31, "step": 200, "epoch": 4.0,
                                                "wall_s": 20.0}
    assert bench._best_until(store, m, 12.0)["step"] == 400
    assert bench._best_until(store, m, 1.0) is None
    assert bench._explicit_budgets(["original=80,40"]) == {"original": [40, 80]}
    assert bench._top_minutes(["original=60"]) == {"original": 60.0}
    for bad in (["orig=60"], ["original=soon"], ["original=0"]):
        with pytest.raises(SystemExit, match="--top"):
            bench._top_minutes(bad)
    with pytest.raises(SystemExit, match="--tokens"):
        bench._explicit_budgets(["original=1e5"])
    results = [{"source": "original", "response_tokens": n, "best_tau_sim": t, "at_epochs": a,
                "time_budget_min": 60.0 if a else None}
               for n, t, a in ((40, 1.2, None), (80, 1.4, {"tau_sim": 1.3}))]
    bench._plot(results, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
