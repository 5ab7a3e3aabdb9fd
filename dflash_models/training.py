"""Training math for DFlash drafts (no loop here: the loop lives with the pipeline).

One training sequence of S tokens with target features for every position becomes N blocks:
block n starts at anchor a_n (the "last verified token", known to the draft) and asks the draft
to fill positions a_n+1 .. a_n+B-1. All N blocks run in ONE draft forward whose keys are the S
context positions followed by the N*B block positions:

    keys:     [ ctx 0 .. ctx S-1 | block 0 (B) | block 1 (B) | ... ]
    block n:  ctx j for j < a_n  +  its own B positions (bidirectional), nothing else

Context j < a_n exactly mirrors inference: when the anchor is the newest verified token its
features do not exist yet (the target has not run on it), while everything before it has.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .draft import DFlashDraft
from .target import Target

IGNORE_INDEX = -100


def sample_anchors(
    response_start: int, seq_len: int, n: int, block_size: int, generator: torch.Generator
) -> Tensor:
    """Up to n sorted, distinct anchors a with response_start <= a and a + 1 < seq_len.

    The first response token is the earliest anchor: at serving time it comes from the target's
    prefill, and the first draft block starts from it. Blocks may run past the end of the
    sequence (their tail labels are ignored), so block_size does not restrict the range; it is
    only validated. Deterministic for a given generator state.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    lo, hi = max(response_start, 0), seq_len - 2  # inclusive range of legal anchors
    count = hi - lo + 1
    if count <= 0 or n <= 0:
        return torch.empty(0, dtype=torch.long)
    pick = torch.randperm(count, generator=generator)[: min(n, count)]
    return torch.sort(pick + lo).values


class TrainingBlocks(NamedTuple):
    block_ids: Tensor  # [N*B] anchor token then mask tokens
    block_positions: Tensor  # [N*B] absolute positions anchor + k
    labels: Tensor  # [N*B] ids[anchor + k] for k >= 1, IGNORE_INDEX at k == 0 / past the end
    weights: Tensor  # [N*B] float loss weight per position, 0 where the label is ignored


def position_weights(block_size: int, gamma: float) -> Tensor:
    """w_0 = 0 (the anchor is given), w_k = exp(-(k-1)/gamma) for k = 1..B-1.

    Early positions dominate because one miss ends the accepted prefix: a correct token at k=5
    is worthless if k=1 was wrong. gamma = inf gives uniform weights.
    """
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def build_training_batch(
    input_ids: Tensor,
    anchors: Tensor,
    block_size: int,
    mask_token_id: int,
    gamma: float = float("inf"),
) -> TrainingBlocks:
    """Blocks, positions, labels and loss weights for one sequence (input_ids [S], anchors [N]).

    A negative anchor marks a padding block (for batching sequences with fewer anchors): it is
    all masks, sees no context and has no labels.
    """
    S = input_ids.shape[0]
    anchors = anchors.to(torch.long).cpu()
    ids = input_ids.cpu()
    offsets = torch.arange(block_size)
    pad = anchors < 0
    pos = anchors.clamp_min(0)[:, None] + offsets  # [N, B]
    in_seq = (pos < S) & ~pad[:, None]
    tok = ids[pos.clamp_max(S - 1)]

    block_ids = torch.full_like(pos, mask_token_id)
    block_ids[:, 0] = torch.where(pad, mask_token_id, tok[:, 0])
    labels = torch.where(in_seq, tok, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    weights = position_weights(block_size, gamma)[None, :] * (labels != IGNORE_INDEX)
    return TrainingBlocks(
        block_ids.flatten(), pos.flatten(), labels.flatten(), weights.flatten().float()
    )


def block_attention_mask(context_len: int, anchors: Tensor, block_size: int) -> Tensor:
    """Bool [N*B, S + N*B]: block n sees context j < anchor_n and its own block only.

    Every row has its own block visible, so no row is all-False (which would NaN in SDPA).
    """
    anchors = anchors.to(torch.long)
    N = anchors.shape[0]
    block_of_row = torch.arange(N * block_size, device=anchors.device) // block_size  # [N*B]
    ctx = torch.arange(context_len, device=anchors.device)
    sees_ctx = ctx[None, :] < anchors[block_of_row][:, None]  # [N*B, S]
    block_of_col = torch.arange(N * block_size, device=anchors.device) // block_size
    sees_blk = block_of_row[:, None] == block_of_col[None, :]  # [N*B, N*B]
    return torch.cat([sees_ctx, sees_blk], dim=1)


def dflash_loss(logits: Tensor, labels: Tensor, block_size: int, gamma: float) -> Tensor:
    """Position-weighted cross-entropy over logits [..., N*B, V] and labels [..., N*B].

    loss = sum_i w_{k(i)} * CE_i / sum_i w_{k(i)} over valid labels i, with k(i) = i mod B, so
    the value is a weighted mean per token and comparable across batches with different counts.
    """
    V = logits.shape[-1]
    w = position_weights(block_size, gamma).to(logits.device)
    k = torch.arange(labels.shape[-1], device=labels.device) % block_size
    valid = labels != IGNORE_INDEX
    weights = w[k].expand_as(labels) * valid
    ce = F.cross_entropy(
        logits.float().reshape(-1, V), labels.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(labels)
    return (ce * weights).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


class BlockAccuracy(NamedTuple):
    per_position: Tensor  # [B-1] accuracy at block offsets 1..B-1 (nan where no labels)
    tau_sim: Tensor  # scalar: expected tokens per verification pass under greedy acceptance


@torch.no_grad()
def block_accuracy(logits: Tensor, labels: Tensor, block_size: int) -> BlockAccuracy:
    """Per-position argmax accuracy and the simulated acceptance length tau.

    With labels = the target's own greedy tokens, greedy verification accepts the draft's
    predictions up to the first mistake and then emits one target token, so per block
    tau = 1 + (length of the run of correct predictions starting at offset 1). An ignored label
    ends the run (nothing to accept past the end of the data). Blocks without any label
    (padding) are skipped.
    """
    pred = logits.argmax(-1).reshape(-1, block_size)
    lab = labels.reshape(-1, block_size)
    valid = lab != IGNORE_INDEX
    correct = (pred == lab) & valid
    per_position = correct[:, 1:].sum(0).float() / valid[:, 1:].sum(0).float()  # 0/0 -> nan
    real = valid[:, 1:].any(dim=1)
    run = torch.cumprod(correct[real, 1:].long(), dim=1).sum(dim=1)
    tau = 1.0 + run.float().mean() if real.any() else torch.tensor(float("nan"))
    return BlockAccuracy(per_position, tau)


def dflash_forward_train(
    draft: DFlashDraft,
    target: Target,
    input_ids: Tensor,
    features: Tensor,
    anchors: Tensor,
    return_hidden: bool = False,
) -> Tensor:
    """Draft logits [Bt, N*B, V] for all anchors of Bt sequences in one forward.

    input_ids [Bt, S] (or [S]); features [Bt, S, n*H] target hidden states of the same tokens;
    anchors [Bt, N] (or [N]); right-padded sequences work as long as every anchor lies inside
    its sequence (padding never becomes visible context), and rows with fewer anchors may be
    padded with -1. return_hidden skips the LM head (for chunked losses on big vocabularies).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if features.dim() == 2:
        features = features[None]
    if anchors.dim() == 1:
        anchors = anchors[None].expand(input_ids.shape[0], -1)
    c = draft.config
    Bt, S = input_ids.shape
    device = draft.fc.weight.device
    blocks = [
        build_training_batch(input_ids[b], anchors[b], c.block_size, c.mask_token_id)
        for b in range(Bt)
    ]
    block_ids = torch.stack([blk.block_ids for blk in blocks])
    block_positions = torch.stack([blk.block_positions for blk in blocks]).to(device)
    mask = torch.stack(
        [block_attention_mask(S, anchors[b].cpu(), c.block_size) for b in range(Bt)]
    )[:, None].to(device)  # [Bt, 1, N*B, S + N*B]
    with torch.no_grad():
        block_embeds = target.embed(block_ids.to(target.device))
    context = draft.project_context(features.to(device))
    hidden = draft(
        block_embeds.to(device),
        context,
        block_positions,
        torch.arange(S, device=device),
        attn_mask=mask,
    )
    return hidden if return_hidden else target.lm_head(hidden)
