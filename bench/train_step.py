"""DFlash training step time: queries for the labelled rows only, against the full pass.

    .venv/bin/python bench/train_step.py [--steps 40] [--threads 2] [--layers 1] [--seqs 32]

The loss reads only the block rows that carry a label: offset 1 of every block and offset k > 1
only while the sequence follows the target's greedy chain (`labels: target`). The draft's last
layer can skip the query, attention output and MLP of every other row (their keys and values
still enter the attention). This times one forward + backward of the default recipe's step
(packaged SmolLM2 target, ``--layers`` draft layers started from the target's last ones, block 8,
32 anchors, batch 2, an 8K head, bf16 autocast where the CPU has native bf16) on ShareGPT first
turns with their original answers, both ways, alternating step by step on the same batches so
the ratio holds on a noisy box. It also checks that both ways give the same loss.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_models.blocks import (  # noqa: E402
    DFlashTrainModule,
    VocabHead,
    dflash_loss_sum,
    greedy_block_labels,
    make_dflash_batch,
    weighted_ce_sum,
)
from dflash_models.draft import DFlashDraft, DFlashDraftConfig, init_from_target  # noqa: E402
from dflash_models.features import (  # noqa: E402
    end_of_turn_id,
    make_example,
    original_response_ids,
    target_pass,
)
from dflash_models.packaged import packaged_model_dir  # noqa: E402
from dflash_models.target import load_target  # noqa: E402
from dflash_models.trainer import autocast_context  # noqa: E402
from dflash_models.training import IGNORE_INDEX, sample_anchors  # noqa: E402
from tasks.prompts import load_sharegpt  # noqa: E402


def full_pass_loss(module, target, head, batch, amp):  # noqa: ANN001, ANN201
    """The previous step: every block row through the last layer, then the labelled ones."""
    with torch.no_grad():
        embeds = target.embed(batch.block_ids)
    with amp():
        hidden = module(embeds, batch.features, batch.block_positions, batch.mask)
        sel = batch.weights > 0
        logits = head.logits(hidden[sel])
    return weighted_ce_sum(logits, head.labels(batch.labels[sel]), batch.weights[sel])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per way")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seqs", type=int, default=32, help="ShareGPT answers to draw batches from")
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)

    target = load_target(packaged_model_dir(), device="cpu")
    tok, eos = target.tokenizer, end_of_turn_id(target)
    records = [r for r in load_sharegpt()[0] if r.reference_response]
    examples = []
    for r in rng.sample(records, 4 * args.seqs):
        text = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        if len(prompt) > 192:
            continue
        ex = make_example(prompt, original_response_ids(tok, r.reference_response, eos),
                          "sharegpt", 0, max_len=320)
        if ex is not None and len(examples) < args.seqs:
            examples.append(ex)
    draft_cfg = DFlashDraftConfig.from_target(target, args.layers, block_size=8)
    rows = []
    for i in range(0, len(examples), 8):
        chunk = examples[i:i + 8]
        rows += target_pass(target, [e.ids for e in chunk], draft_cfg.target_layer_ids,
                            dtype=torch.bfloat16, starts=[e.response_start for e in chunk])
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for e in examples:
        counts += torch.bincount(e.ids[e.response_start:], minlength=target.vocab_size)
    head = VocabHead(target, torch.sort(counts, descending=True).indices[:args.draft_vocab].sort()
                     .values)

    draft = DFlashDraft(draft_cfg)
    init_from_target(draft, target)
    module = DFlashTrainModule(draft)
    amp = lambda: autocast_context(torch.device("cpu"), False, "auto")  # noqa: E731

    def batch_at(step: int):  # noqa: ANN202
        idx = [(step * args.batch + j) % len(rows) for j in range(args.batch)]
        gen = torch.Generator().manual_seed(step)
        anchors = [sample_anchors(examples[i].response_start, len(rows[i].ids), args.anchors, 8,
                                  gen) for i in idx]
        labels = [greedy_block_labels(rows[i].ids, rows[i].greedy, a, 8)
                  for i, a in zip(idx, anchors, strict=True)]
        b = make_dflash_batch([rows[i].ids for i in idx], [rows[i].features for i in idx],
                              anchors, 8, draft_cfg.mask_token_id, 2.0, labels=labels)
        b.weights *= head.labels(b.labels) != IGNORE_INDEX
        return b

    ways = {"full pass": full_pass_loss, "labelled rows": dflash_loss_sum}
    times: dict[str, list[float]] = {k: [] for k in ways}
    labelled = all_rows = tokens = 0
    for step in range(args.steps + 3):
        batch = batch_at(step)
        losses = {}
        for name, fn in (ways.items() if step % 2 else reversed(ways.items())):
            draft.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = fn(module, target, head, batch, amp)
            loss.backward()
            dt = time.perf_counter() - t0
            losses[name] = float(loss.detach())
            if step >= 3:  # warm-up steps untimed
                times[name].append(dt)
        a, b = losses.values()
        if abs(a - b) > 1e-3 * max(abs(a), 1.0):
            raise SystemExit(f"step {step}: the two ways disagree ({a} vs {b})")
        if step >= 3:
            labelled += int((batch.weights > 0).sum())
            all_rows += batch.block_positions.numel()
            tokens += batch.tokens

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(examples)} ShareGPT answers, {args.layers}-layer draft, batch {args.batch} x "
          f"{args.anchors} anchors x block 8, {args.draft_vocab} head, {args.threads} threads")
    print(f"labelled block rows: {labelled / all_rows:.1%} ({labelled / args.steps:.0f} of "
          f"{all_rows / args.steps:.0f} per step)")
    for k, v in med.items():
        print(f"{k:>14}: {1000 * v:7.1f} ms/step (median of {args.steps}), "
              f"{tokens / args.steps / v:,.0f} tokens/s")
    print(f"speed-up of the step: {med['full pass'] / med['labelled rows']:.2f}x")


if __name__ == "__main__":
    main()
