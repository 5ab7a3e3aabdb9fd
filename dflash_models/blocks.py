"""DFlash training batches, the (optionally reduced) LM head, losses and held-out metrics.

A micro-batch holds whole sequences with their anchor blocks (``make_dflash_batch``); the draft's
whole training forward is ``DFlashTrainModule.forward`` so DDP sees every parameter use; losses
are returned as weighted SUMS so the caller can normalise by the weight of a whole step (see
``trainer.train_step``); ``BlockStats`` accumulates per-position accuracy and tau_sim exactly
across batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draft import DFlashDraft
from .training import IGNORE_INDEX, block_attention_mask, build_training_batch, position_weights


# ----------------------------------------------------------------------------- DFlash batches
@dataclass
class DFlashBatch:
    """A right-padded micro-batch of sequences with their anchor blocks (all on one device)."""

    features: Tensor  # [Bt, S, n*H]
    block_ids: Tensor  # [Bt, N*B]
    block_positions: Tensor  # [Bt, N*B]
    mask: Tensor  # [Bt, 1, N*B, S + N*B] bool
    labels: Tensor  # [Bt, N*B] (IGNORE_INDEX where nothing is learnt)
    weights: Tensor  # [Bt, N*B] loss weights w_k (0 where ignored)
    tokens: int  # real (unpadded) sequence tokens in the batch
    soft: Tensor | None = None  # [n, V'] teacher probabilities at the rows where weights > 0
    distill: float = 0.0  # share of the loss against `soft`


def pad_stack(rows: Sequence[Tensor], value: float | int) -> Tensor:
    """Right-pad tensors [L_i, ...] to [len(rows), max L, ...]."""
    L = max(int(r.shape[0]) for r in rows)
    out = rows[0].new_full((len(rows), L, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def make_dflash_batch(ids: Sequence[Tensor], features: Sequence[Tensor],
                      anchors: Sequence[Tensor], block_size: int, mask_token_id: int,
                      gamma: float, labels: Sequence[Tensor] | None = None,
                      device: torch.device | str = "cpu") -> DFlashBatch:
    """Blocks for sequences of different lengths (anchor lists padded with -1 blocks).

    ``labels`` optionally replaces the sequence's own tokens as block labels ([N, B] each, e.g.
    the target's greedy tokens for tau_sim); by default block offset k of anchor a learns
    ids[a + k], so only response tokens (a >= response start) are ever labels.
    """
    n_blocks = max(max(int(a.numel()) for a in anchors), 1)
    rows = []
    for i, (seq, anc) in enumerate(zip(ids, anchors, strict=True)):
        anc = torch.cat([anc.long(), anc.new_full((n_blocks - anc.numel(),), -1).long()])
        blk = build_training_batch(seq, anc, block_size, mask_token_id, gamma)
        lab = blk.labels
        if labels is not None:
            lab = torch.full_like(lab, IGNORE_INDEX)
            given = labels[i].reshape(-1)
            lab[: given.numel()] = given
        w = position_weights(block_size, gamma).repeat(n_blocks) * (lab != IGNORE_INDEX)
        rows.append((blk.block_ids, blk.block_positions, lab, w, anc))
    S = max(int(s.shape[0]) for s in ids)
    mask = torch.stack([block_attention_mask(S, r[4], block_size) for r in rows])[:, None]
    return DFlashBatch(
        features=pad_stack(list(features), 0.0).to(device),
        block_ids=torch.stack([r[0] for r in rows]).to(device),
        block_positions=torch.stack([r[1] for r in rows]).to(device),
        mask=mask.to(device),
        labels=torch.stack([r[2] for r in rows]).to(device),
        weights=torch.stack([r[3] for r in rows]).float().to(device),
        tokens=sum(int(s.shape[0]) for s in ids),
    )


class DFlashTrainModule(nn.Module):
    """The draft's whole training forward as one ``forward``, so DDP sees every parameter use.

    (DDP only syncs gradients correctly for computation that runs inside the wrapped module's
    forward; ``project_context`` is a separate method of the draft.) The frozen target is not a
    submodule: its embeddings arrive as an input, so DDP never touches its weights.
    """

    def __init__(self, draft: DFlashDraft) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, block_embeds: Tensor, features: Tensor, block_positions: Tensor,
                mask: Tensor, rows: Tensor | None = None) -> Tensor:
        S = features.shape[1]
        context = self.draft.project_context(features)
        ctx_pos = torch.arange(S, device=features.device)
        return self.draft(block_embeds, context, block_positions, ctx_pos, attn_mask=mask,
                          rows=rows)


def selected_rows(sel: Tensor) -> tuple[Tensor, Tensor]:
    """Bool [B, T] -> (rows [B, M], valid [B, M]) with M the most rows any sequence selects.

    Row b lists its selected indices in increasing order, padded by repeating unselected ones,
    so ``hidden[valid]`` for ``hidden`` [B, M, H] is ordered exactly like ``full[sel]``.
    """
    counts = sel.sum(1)
    M = max(int(counts.max()), 1) if sel.numel() else 1
    rows = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :M]
    valid = torch.arange(M, device=sel.device)[None, :] < counts[:, None]
    return rows, valid


def selected_hidden(module: nn.Module, embeds: Tensor, batch: DFlashBatch, sel: Tensor) -> Tensor:
    """The draft's final hidden states [n, H] at the block rows ``sel`` [Bt, N*B] (row-major),
    with queries made only for those rows in the last layer (the same values as
    ``module(...)[sel]``, for a fraction of the cost when few rows are labelled)."""
    rows, valid = selected_rows(sel)
    hidden = module(embeds, batch.features, batch.block_positions, batch.mask, rows)
    return hidden[valid]


def weighted_ce_sum(logits: Tensor, labels: Tensor, weights: Tensor, soft: Tensor | None = None,
                    distill: float = 0.0) -> Tensor:
    """sum_i w_i * CE_i over rows; labels outside the head count as ignored.

    With teacher probabilities ``soft`` [n, V], CE_i = (1 - distill) * CE(logits_i, label_i)
    + distill * CE(logits_i, soft_i): the second term is the KL to the teacher plus its
    (constant) entropy, a dense signal over the whole vocabulary instead of one token.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    if soft is not None and distill:
        ce = (1 - distill) * ce + distill * F.cross_entropy(logits, soft, reduction="none")
    return (ce * weights).sum()


@torch.no_grad()
def teacher_probs(head: VocabHead, last: Sequence[Tensor], positions: Tensor,
                  sel: Tensor) -> Tensor:
    """The target's next-token distributions for the selected block rows [n, V'].

    Row (i, j) labels the token at absolute position p = positions[i, j]; the target predicted it
    from the hidden state at p - 1 (teacher forcing over the sequence's own prefix).
    """
    i, j = sel.nonzero(as_tuple=True)  # row-major: the order of hidden[sel] in the loss
    hid = pad_stack(list(last), 0.0).to(positions.device)[i, positions[i, j] - 1]
    return torch.softmax(head.logits(hid).float(), dim=-1)


class VocabHead:
    """The target's frozen LM head, optionally restricted to a reduced draft vocabulary.

    With ``draft_ids`` (sorted target ids, EAGLE-3's draft-to-target map) logits cover only
    those rows of the head: on CPU the full-vocabulary head dominates the draft's cost. A label
    outside the draft vocabulary can never be drafted, so it carries no loss and counts as a
    miss in accuracy and tau_sim.
    """

    def __init__(self, target: Any, draft_ids: Tensor | None = None) -> None:
        self.target = target
        self.draft_ids = None if draft_ids is None else draft_ids.long().to(target.device)
        if self.draft_ids is not None:
            head = target.model.get_output_embeddings()
            self.weight = head.weight.detach()[self.draft_ids]
            bias = getattr(head, "bias", None)
            self.bias = None if bias is None else bias.detach()[self.draft_ids]
            t2d = torch.full((target.vocab_size,), IGNORE_INDEX, dtype=torch.long)
            t2d[self.draft_ids.cpu()] = torch.arange(self.draft_ids.numel())
            self.t2d = t2d.to(target.device)

    @property
    def size(self) -> int:
        return self.target.vocab_size if self.draft_ids is None else int(self.draft_ids.numel())

    def logits(self, hidden: Tensor) -> Tensor:
        if self.draft_ids is None:
            return self.target.lm_head(hidden)
        t = self.target
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if t.logit_multiplier != 1.0:
            logits = logits * t.logit_multiplier
        if t.final_logit_softcapping:
            logits = torch.tanh(logits / t.final_logit_softcapping) * t.final_logit_softcapping
        return logits

    def labels(self, target_labels: Tensor) -> Tensor:
        """Target ids -> head indices (IGNORE_INDEX stays, out-of-vocabulary becomes it)."""
        if self.draft_ids is None:
            return target_labels
        t2d = self.t2d.to(target_labels.device)
        return torch.where(target_labels < 0, IGNORE_INDEX, t2d[target_labels.clamp_min(0)])

    def to_target(self, index: Tensor) -> Tensor:
        return index if self.draft_ids is None else self.draft_ids.to(index.device)[index]


def dflash_loss_sum(module: nn.Module, target: Any, head: VocabHead, batch: DFlashBatch,
                    amp: Callable[[], Any] = nullcontext) -> Tensor:
    """sum_i w_i * CE_i of one micro-batch. Only the rows with a label cost their share of the
    last draft layer's queries and MLP and of the LM head (`selected_hidden`): at most 7 of 8
    block positions, ~1 in 4 with the target's greedy chain as labels."""
    with torch.no_grad():
        embeds = target.embed(batch.block_ids)
    sel = batch.weights > 0
    with amp():
        logits = head.logits(selected_hidden(module, embeds, batch, sel))
    return weighted_ce_sum(logits, head.labels(batch.labels[sel]), batch.weights[sel],
                           batch.soft, batch.distill)


@torch.no_grad()
def eval_dflash_batch(module: nn.Module, target: Any, head: VocabHead, batch: DFlashBatch,
                      stats: BlockStats, amp: Callable[[], Any] = nullcontext) -> None:
    """Accumulate eval loss, per-position accuracy and tau_sim of one batch into ``stats``."""
    embeds = target.embed(batch.block_ids)
    sel = batch.labels != IGNORE_INDEX
    with amp():
        logits = head.logits(selected_hidden(module, embeds, batch, sel)).float()
    lab = head.labels(batch.labels[sel])
    w = batch.weights[sel] * (lab != IGNORE_INDEX)
    stats.add_loss(float(weighted_ce_sum(logits, lab, w)), float(w.sum()))
    pred = torch.full_like(batch.labels, -1)
    pred[sel] = head.to_target(logits.argmax(-1))
    stats.update(pred, batch.labels)


# ----------------------------------------------------------------------------- metrics
class BlockStats:
    """Accumulates per-position accuracy and tau_sim over many batches, exactly.

    A block is a row [B] of predictions and labels, offset 0 being the anchor. Greedy
    verification accepts predictions up to the first miss, then the target adds one token, so
    tau = 1 + (run of correct predictions from offset 1); an ignored label ends the run. This
    matches ``training.block_accuracy`` but sums counts across batches instead of averaging
    batch means.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.correct = torch.zeros(block_size - 1, dtype=torch.float64)
        self.valid = torch.zeros(block_size - 1, dtype=torch.float64)
        self.run_sum = 0.0
        self.blocks = 0
        self.loss_sum = 0.0
        self.weight_sum = 0.0

    def update(self, pred: Tensor, labels: Tensor) -> None:
        pred = pred.reshape(-1, self.block_size).cpu()
        lab = labels.reshape(-1, self.block_size).cpu()
        valid = lab[:, 1:] != IGNORE_INDEX
        correct = (pred[:, 1:] == lab[:, 1:]) & valid
        self.correct += correct.sum(0).double()
        self.valid += valid.sum(0).double()
        real = valid.any(dim=1)
        self.run_sum += float(torch.cumprod(correct[real].long(), dim=1).sum())
        self.blocks += int(real.sum())

    def add_loss(self, loss_sum: float, weight_sum: float) -> None:
        self.loss_sum += loss_sum
        self.weight_sum += weight_sum

    def result(self) -> dict[str, Any]:
        acc = (self.correct / self.valid.clamp_min(1)).tolist()
        acc = [a if v > 0 else float("nan") for a, v in zip(acc, self.valid.tolist(), strict=True)]
        tau = 1.0 + self.run_sum / self.blocks if self.blocks else float("nan")
        loss = self.loss_sum / self.weight_sum if self.weight_sum else float("nan")
        return {"tau_sim": tau, "acc": acc, "eval_loss": loss, "eval_blocks": self.blocks}


def greedy_block_labels(ids: Tensor, greedy: Tensor, anchors: Tensor, block_size: int) -> Tensor:
    """Block labels [N, B] for tau_sim: the target's own greedy tokens.

    ``greedy[p]`` is the target's argmax after ids[:p]. From anchor a the target would emit
    greedy[a+1], then greedy[a+2] only if ids[a+1] is that same token (else the teacher-forced
    pass says nothing about the target's continuation): offset k is labelled while the sequence
    agrees with the greedy chain on offsets 1..k-1. On the target's own greedy outputs every
    offset is labelled and the label is the sequence token.
    """
    S = ids.shape[0]
    pos = anchors.long()[:, None] + torch.arange(block_size)  # [N, B]
    inside = pos < S
    p = pos.clamp_max(S - 1)
    g, s = greedy.long()[p], ids.long()[p]
    agree = (g == s) | ~inside
    # offset k needs agreement on offsets 1..k-1: shift the cumulative product by one
    chain = torch.cumprod(agree[:, 1:].long(), dim=1)
    ok = torch.ones_like(inside)
    ok[:, 2:] = chain[:, :-1].bool()
    labels = torch.where(inside & ok, g, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return labels
