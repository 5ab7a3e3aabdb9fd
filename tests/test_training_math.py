"""DFlash training math on hand-checkable cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from dflash_models.target import Target
from dflash_models.training import (
    IGNORE_INDEX,
    block_accuracy,
    block_attention_mask,
    build_training_batch,
    dflash_forward_train,
    dflash_loss,
    position_weights,
    sample_anchors,
)


def test_position_weights() -> None:
    w = position_weights(4, 2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, math.exp(-0.5), math.exp(-1.0)]))
    torch.testing.assert_close(position_weights(3, float("inf")), torch.tensor([0.0, 1.0, 1.0]))


def test_build_training_batch() -> None:
    ids = torch.arange(10) + 100
    blocks = build_training_batch(ids, torch.tensor([2, 8, -1]), 4, mask_token_id=5, gamma=2.0)
    M, X = 5, IGNORE_INDEX
    assert blocks.block_ids.tolist() == [102, M, M, M, 108, M, M, M, M, M, M, M]
    assert blocks.block_positions.tolist()[:8] == [2, 3, 4, 5, 8, 9, 10, 11]
    assert blocks.labels.tolist() == [X, 103, 104, 105, X, 109, X, X, X, X, X, X]
    w1, w2 = math.exp(-0.5), math.exp(-1.0)
    expected = [0, 1, w1, w2, 0, 1, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(blocks.weights, torch.tensor(expected, dtype=torch.float32))


def test_dflash_loss_hand_computed() -> None:
    torch.manual_seed(0)
    B, gamma = 3, 1.0
    logits = torch.randn(1, 6, 5)
    labels = torch.tensor([[IGNORE_INDEX, 2, 4, IGNORE_INDEX, 1, IGNORE_INDEX]])
    ce = lambda i: F.cross_entropy(logits[0, i][None], labels[0, i][None])  # noqa: E731
    w1, w2 = 1.0, math.exp(-1.0)  # offsets 1 and 2
    expected = (w1 * ce(1) + w2 * ce(2) + w1 * ce(4)) / (w1 + w2 + w1)
    torch.testing.assert_close(dflash_loss(logits, labels, B, gamma), expected)
    # ignored positions do not matter
    noisy = logits.clone()
    noisy[0, [0, 3, 5]] += 100 * torch.randn(3, 5)
    torch.testing.assert_close(dflash_loss(noisy, labels, B, gamma), expected)
    # nothing to learn -> 0, not nan
    empty = torch.full_like(labels, IGNORE_INDEX)
    assert dflash_loss(logits, empty, B, gamma).item() == 0.0


def test_block_attention_mask_exact() -> None:
    S, B = 6, 3
    anchors = torch.tensor([2, 4])
    mask = block_attention_mask(S, anchors, B)
    assert mask.shape == (2 * B, S + 2 * B) and mask.dtype == torch.bool
    for row in range(2 * B):
        n = row // B
        seen = set(mask[row].nonzero().flatten().tolist())
        expected = set(range(int(anchors[n]))) | {S + n * B + k for k in range(B)}
        assert seen == expected, (row, seen, expected)


def test_block_accuracy_and_tau_sim() -> None:
    B, V, X = 4, 10, IGNORE_INDEX
    labels = torch.tensor([X, 1, 2, 3, X, 4, 5, 6, X, 7, X, X])
    preds = torch.tensor([0, 1, 2, 9, 0, 9, 5, 6, 0, 7, 0, 0])
    # block 0: run 2 (miss at 3); block 1: run 0 (miss at 1); block 2: run 1 (labels end)
    logits = F.one_hot(preds, V).float()[None]
    acc = block_accuracy(logits, labels[None], B)
    torch.testing.assert_close(acc.per_position, torch.tensor([2 / 3, 1.0, 0.5]))
    torch.testing.assert_close(acc.tau_sim, torch.tensor(1.0 + (2 + 0 + 1) / 3))


def test_sample_anchors() -> None:
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = sample_anchors(response_start=10, seq_len=50, n=8, block_size=4, generator=g(0))
    assert len(a) == 8 and a.dtype == torch.long
    assert torch.all(a >= 10) and torch.all(a + 1 < 50)
    assert torch.equal(a, torch.sort(a).values) and len(set(a.tolist())) == 8
    assert torch.equal(a, sample_anchors(10, 50, 8, 4, g(0)))
    assert not torch.equal(a, sample_anchors(10, 50, 8, 4, g(1)))
    # fewer candidates than n: all of them
    assert sample_anchors(10, 14, 8, 4, g(0)).tolist() == [10, 11, 12]
    assert sample_anchors(10, 11, 8, 4, g(0)).numel() == 0


def _tiny_pair() -> tuple[Target, DFlashDraft]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # logits of a realistic scale through the frozen LM head
    )
    target = Target.from_model(LlamaForCausalLM(cfg))
    draft = DFlashDraft(DFlashDraftConfig.from_target(target, 1, block_size=4, mask_token_id=47))
    return target, draft


def test_batched_forward_matches_single_and_padding() -> None:
    target, draft = _tiny_pair()
    ids = torch.randint(0, 40, (2, 12))
    feats = torch.randn(2, 12, 4 * 32)
    anchors = torch.tensor([[2, 6, 9], [4, 8, -1]])
    with torch.no_grad():
        both = dflash_forward_train(draft, target, ids, feats, anchors)
        first = dflash_forward_train(draft, target, ids[0], feats[0], anchors[0])
        second = dflash_forward_train(draft, target, ids[1:], feats[1:], anchors[1, :2])
    assert both.shape == (2, 12, 48)
    torch.testing.assert_close(both[:1], first)
    torch.testing.assert_close(both[1:, :8], second)


def _one_sequence() -> tuple:
    """A tiny target/draft pair and one 24-token sequence: features, 8 anchors, block-4 labels."""
    target, draft = _tiny_pair()
    ids = torch.randint(0, 40, (1, 24))
    with torch.no_grad():
        feats = target.forward(ids, layer_ids=draft.config.target_layer_ids).features
    anchors = sample_anchors(4, 24, 8, 4, torch.Generator().manual_seed(0))
    labels = build_training_batch(ids[0], anchors, 4, 47).labels[None]
    return target, draft, ids, feats, anchors, labels


def test_training_step_learns() -> None:
    """A few AdamW steps on one sequence lower the loss and raise tau: gradients flow."""
    target, draft, ids, feats, anchors, labels = _one_sequence()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = dflash_forward_train(draft, target, ids, feats, anchors)
        loss = dflash_loss(logits, labels, 4, gamma=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in target.model.parameters())
    assert losses[-1] < 0.5 * losses[0]
    assert block_accuracy(logits, labels, 4).tau_sim > 1.5


def test_distillation_targets_and_loss() -> None:
    """Teacher rows are the target's distribution at position p - 1 for a label at p, in the
    order the loss reads them; one-hot teachers reproduce the hard loss."""
    from dflash_models.blocks import VocabHead, teacher_probs, weighted_ce_sum

    target, _ = _tiny_pair()
    last = [torch.randn(9, 32), torch.randn(6, 32)]
    positions = torch.tensor([[3, 4, 5, 6], [2, 3, 4, 5]])
    sel = torch.tensor([[False, True, True, False], [False, True, False, True]])
    got = teacher_probs(VocabHead(target), last, positions, sel)
    want = [(0, 4), (0, 5), (1, 3), (1, 5)]  # (sequence, labelled position), row-major
    for row, (i, p) in zip(got, want, strict=True):
        torch.testing.assert_close(row, torch.softmax(target.lm_head(last[i][p - 1]), -1))
    logits, labels = torch.randn(4, 48), torch.tensor([1, 5, 7, 2])
    w = torch.tensor([1.0, 0.5, 0.25, 1.0])
    hard = weighted_ce_sum(logits, labels, w)
    onehot = F.one_hot(labels, 48).float()
    torch.testing.assert_close(weighted_ce_sum(logits, labels, w, onehot, 0.7), hard)
    soft = weighted_ce_sum(logits, labels, w, got, 1.0)
    manual = sum(wi * -(pi * F.log_softmax(li, -1)).sum() for wi, pi, li in zip(w, got, logits,
                                                                                strict=True))
    torch.testing.assert_close(soft, manual)


def test_cpu_bf16_autocast_trains_in_bf16_with_fp32_weights() -> None:
    """``cpu_bf16``: the draft's matmuls run in bf16 (weights and grads stay fp32) and the loss
    stays within bf16 rounding of the fp32 loss; off, the context changes nothing."""
    from dflash_models.trainer import autocast_context, cpu_bf16_on, cpu_has_native_bf16

    target, draft, ids, feats, anchors, labels = _one_sequence()
    cpu = torch.device("cpu")
    losses = {}
    for on in (False, True):
        with autocast_context(cpu, bf16=True, cpu_bf16=on):
            logits = dflash_forward_train(draft, target, ids, feats, anchors)
            loss = dflash_loss(logits.float(), labels, 4, gamma=4.0)
        assert logits.dtype == (torch.bfloat16 if on else torch.float32)
        draft.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in draft.parameters() if p.grad is not None)
        losses[on] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[True] != losses[False]
    native = cpu_has_native_bf16()
    assert isinstance(autocast_context(cpu, False, "auto"), torch.autocast) == native
    assert cpu_bf16_on(cpu, "auto") == native and not cpu_bf16_on(cpu, False)


@pytest.mark.parametrize("layers", [1, 2])
def test_selected_rows_give_the_full_pass_values_and_gradients(layers: int) -> None:
    """Queries for the labelled rows only (`selected_hidden`) change nothing but the cost: the
    same hidden states, in ``full[sel]`` order, and the same gradients, with sequences that
    select different numbers of rows (one selects none)."""
    from dflash_models.blocks import DFlashTrainModule, make_dflash_batch, selected_hidden

    target, _ = _tiny_pair()
    torch.manual_seed(1)
    draft = DFlashDraft(DFlashDraftConfig.from_target(target, layers, block_size=4,
                                                      mask_token_id=47))
    module = DFlashTrainModule(draft)
    ids = [torch.randint(0, 40, (12,)), torch.randint(0, 40, (9,)), torch.randint(0, 40, (10,))]
    feats = [torch.randn(len(s), 4 * 32) for s in ids]
    anchors = [torch.tensor([2, 6, 9]), torch.tensor([3, 5]), torch.tensor([4])]
    batch = make_dflash_batch(ids, feats, anchors, 4, 47, gamma=2.0)
    sel = batch.labels != IGNORE_INDEX
    sel[0, 1:3] = False  # uneven counts, holes inside a block
    sel[2] = False  # a sequence with nothing to learn
    embeds = target.embed(batch.block_ids)
    results = []
    for fast in (False, True):
        draft.zero_grad()
        if fast:
            hidden = selected_hidden(module, embeds, batch, sel)
        else:
            hidden = module(embeds, batch.features, batch.block_positions, batch.mask)[sel]
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        results.append((hidden.detach(), [p.grad.clone() for p in draft.parameters()]))
    (full, full_grads), (fast, fast_grads) = results
    assert fast.shape == (int(sel.sum()), 32)
    torch.testing.assert_close(fast, full)
    for a, b in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)
