"""The train stage: loss/anchor plumbing, online == cached, SIGKILL resume, DDP, a real run.

Most tests use a tiny random Llama target that shares SmolLM2's real tokenizer (so "original"
answers are tokenized as in production) and runs in seconds; one test trains on the real
packaged SmolLM2 with its own greedy continuations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from dflash_models.features import OnlineFeatures, bytes_per_token, target_pass
from dflash_models.target import load_target
from dflash_models.trainer import (
    IGNORE_INDEX,
    BlockStats,
    DFlashTrainModule,
    VocabHead,
    build_optimizer,
    build_scheduler,
    checkpoint_blobs,
    dflash_loss_sum,
    example_generator,
    greedy_block_labels,
    lr_factor,
    make_dflash_batch,
    plan_step,
    restore_checkpoint,
)
from dflash_models.training import block_accuracy, sample_anchors
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
                      num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
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


def test_plan_step_splits_global_batch_across_ranks() -> None:
    one = plan_step(3, 20, 0, batch_size=4, grad_accum=1, world=1)
    two = plan_step(3, 20, 0, batch_size=2, grad_accum=1, world=2)
    acc = plan_step(3, 20, 0, batch_size=1, grad_accum=2, world=2)
    assert sorted(one.examples) == sorted(two.examples) == sorted(acc.examples)
    assert one.epoch == 0 and plan_step(5, 20, 0, 4, 1, 1).epoch == 1
    assert two.for_rank(0) != two.for_rank(1)


def test_checkpoint_roundtrip_has_no_pickles() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-2, 0.1)
    sched = build_scheduler(opt, 10, 2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    blobs = checkpoint_blobs(model, opt, sched, {"step": 3})
    assert set(blobs) == {"weights.safetensors", "optim.safetensors", "state.json"}
    assert all(not b.startswith(b"\x80") for b in blobs.values())  # no pickle protocol header
    expected_rand = torch.rand(3)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt2 = build_optimizer(model2, 1e-2, 0.1)
    sched2 = build_scheduler(opt2, 10, 2)
    torch.manual_seed(123)
    state = restore_checkpoint(blobs, model2, opt2, sched2)
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
