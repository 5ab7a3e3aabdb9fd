"""The two things the train stage trains, as ``Phase`` objects for the generic loop.

A phase says how to turn example indices into a micro-batch, how to compute its weighted loss
sum, how to evaluate on the held-out split and how to export: ``dflash_phase`` (the DFlash
draft over target features) and ``classic_phase`` (an autoregressive draft distilled from the
target's next-token distributions). ``tasks/train_dist.py`` runs them.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dflash_models.blocks import (
    BlockStats,
    DFlashTrainModule,
    VocabHead,
    dflash_loss_sum,
    eval_dflash_batch,
    greedy_block_labels,
    make_dflash_batch,
    pad_stack,
    teacher_probs,
)
from dflash_models.classic import build_classic_draft, distill_loss
from dflash_models.draft import DFlashDraft
from dflash_models.features import FeatureRow
from dflash_models.target import Target
from dflash_models.trainer import DistInfo, autocast_context, example_generator
from dflash_models.training import IGNORE_INDEX, sample_anchors
from storage import Store
from tasks.train_features import TrainData

Writer = Callable[..., Any]  # (name, data, *, rows=None, table=None)
EVAL_ANCHOR_EPOCH = -1  # anchors of eval examples come from generators of this pseudo-epoch


@dataclass
class Phase:
    """What the generic loop needs to know about one model being trained."""

    name: str
    module: nn.Module  # its trainable parameters are what checkpoints hold
    lr: float
    total_steps: int
    prepare: Callable[[list[int], int], Any]  # (example indices, epoch) -> micro-batch
    loss_sum: Callable[[nn.Module, Any], Tensor]  # (possibly DDP) module, micro-batch
    weight: Callable[[Any], float]
    tokens: Callable[[Any], int]
    evaluate: Callable[[], dict[str, Any] | None]
    export: Callable[[str], dict[str, bytes]]  # folder name -> {relative name: bytes}
    folder: str
    budget_s: float | None = None  # wall-clock budget, turned into a step count up front


@dataclass
class Ctx:
    cfg: Any
    store: Store
    prefix: str
    info: DistInfo
    writer: Writer
    n_train: int


def choose_draft_vocab(data: TrainData, size: int, vocab: int,
                       taught: Sequence[Tensor] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """The ``size`` most frequent tokens the draft is taught (ties by id): the training
    response tokens, or ``taught`` (per train example, e.g. the target's greedy tokens when it
    learns those), and their coverage of them and of the held-out response tokens, which are
    the target's own output: a token outside the set can never be drafted."""
    taught = taught or [ex.ids[ex.response_start:] for ex in data.train]
    counts = torch.zeros(vocab, dtype=torch.long)
    for toks in taught:
        counts += torch.bincount(toks.long(), minlength=vocab)
    order = torch.sort(counts, descending=True, stable=True).indices[: min(size, vocab)]
    ids = order.sort().values  # ties broken by the lower id (stable sort)
    inside = torch.zeros(vocab, dtype=torch.bool)
    inside[ids] = True

    def coverage(seqs: list[Tensor]) -> float:
        toks = torch.cat(seqs) if seqs else torch.zeros(0)
        return float(inside[toks.long()].float().mean()) if toks.numel() else float("nan")

    return ids, {"size": int(ids.numel()), "train_coverage": coverage(list(taught)),
                 "eval_coverage": coverage([e.ids[e.response_start:] for e in data.eval])}


# ----------------------------------------------------------------------------- phases
def eval_anchors(cfg: Any, data: TrainData, block_size: int) -> list[Tensor]:
    return [sample_anchors(ex.response_start, int(ex.ids.shape[0]), cfg.eval_anchors_per_seq,
                           block_size, example_generator(cfg.seed, EVAL_ANCHOR_EPOCH, i))
            for i, ex in enumerate(data.eval)]


def dflash_phase(ctx: Ctx, target: Target, draft: DFlashDraft, head: VocabHead, source: Any,
                 data: TrainData, eval_rows: dict[int, FeatureRow], total: int,
                 draft_ids: Tensor | None) -> Phase:
    """The DFlash draft over target features (``source``: online or cached rows)."""
    cfg, dev = ctx.cfg, ctx.info.device
    module = DFlashTrainModule(draft)
    mask_id, B = draft.config.mask_token_id, draft.config.block_size  # one source, as served
    amp = functools.partial(autocast_context, dev, cfg.bf16, cfg.cpu_bf16)

    def prepare(idxs: list[int], epoch: int) -> Any:
        rows = source.get(idxs)
        anchors = [sample_anchors(data.train[i].response_start, int(r.ids.shape[0]),
                                  cfg.anchors_per_seq, B, example_generator(cfg.seed, epoch, i))
                   for i, r in zip(idxs, rows, strict=True)]
        labels = None
        if cfg.labels == "target":  # the target's greedy chain (docs/training.md)
            labels = [greedy_block_labels(r.ids, r.greedy, a, B)
                      for r, a in zip(rows, anchors, strict=True)]
        batch = make_dflash_batch([r.ids for r in rows], [r.features for r in rows], anchors, B,
                                  mask_id, cfg.gamma, labels=labels, device=dev)
        batch.weights *= head.labels(batch.labels) != IGNORE_INDEX
        if cfg.distill:
            batch.soft = teacher_probs(head, [r.last for r in rows], batch.block_positions,
                                       batch.weights > 0)
            batch.distill = cfg.distill
        return batch

    eval_batches = []
    if eval_rows:
        anchors = eval_anchors(cfg, data, B)
        for chunk in range(0, len(data.eval), 4):
            idx = list(range(chunk, min(chunk + 4, len(data.eval))))
            rows = [eval_rows[i] for i in idx]
            labels = [greedy_block_labels(r.ids, r.greedy, anchors[i], B)
                      for i, r in zip(idx, rows, strict=True)]
            eval_batches.append(make_dflash_batch(
                [r.ids for r in rows], [r.features.float() for r in rows],
                [anchors[i] for i in idx], B, mask_id, cfg.gamma, labels=labels, device=dev))

    def evaluate() -> dict[str, Any] | None:
        if not eval_batches:
            return None
        stats = BlockStats(B)
        for b in eval_batches:
            eval_dflash_batch(module, target, head, b, stats, amp)
        return stats.result()

    draft.draft_ids = draft_ids  # exported beside the weights (draft_vocab.safetensors)

    dtype = export_dtype(cfg.export_dtype, dev)
    rows = head.weight if draft_ids is not None else None  # a reduced draft ships its head rows

    def export(folder: str) -> dict[str, bytes]:
        files = _folder_bytes(lambda p: draft.export(p, dtype=dtype, lm_head=rows))
        return {f"{folder}/{k}": v for k, v in files.items()}

    return Phase("dflash", module, cfg.lr, total, prepare,
                 lambda m, b: dflash_loss_sum(m, target, head, b, amp),
                 lambda b: float(b.weights.sum()), lambda b: b.tokens, evaluate, export,
                 "dflash-draft", _minutes(cfg.time_budget_min))


class ClassicTrainModule(nn.Module):
    """Student logits only where the loss needs them (the LM head is the dominant cost)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor, attn: Tensor, sel: Tensor) -> Tensor:
        hidden = self.lm.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return self.lm.lm_head(hidden[sel])


def classic_phase(ctx: Ctx, target: Target, data: TrainData,
                  eval_rows: dict[int, FeatureRow], total: int) -> Phase:
    """The classic draft, distilled from the target's next-token distributions (teacher
    forcing, response positions only); its held-out tau_sim uses the DFlash anchors."""
    cfg, dev = ctx.cfg, ctx.info.device
    torch.manual_seed(cfg.seed + 1)
    lm = build_classic_draft(target, num_layers=cfg.classic_layers).to(dev, torch.float32)
    lm.get_input_embeddings().weight.requires_grad_(False)  # the target's, as DFlash's are
    lm.get_output_embeddings().weight.requires_grad_(False)
    lm.train()
    module = ClassicTrainModule(lm)
    amp = functools.partial(autocast_context, dev, cfg.bf16, cfg.cpu_bf16)
    T = cfg.distill_temperature

    def padded(exs: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
        ids = pad_stack([e.ids for e in exs], 0).to(dev)
        attn = pad_stack([torch.ones_like(e.ids) for e in exs], 0).to(dev)
        sel = torch.zeros_like(ids, dtype=torch.bool)  # position p predicts response token p+1
        for i, e in enumerate(exs):
            sel[i, e.response_start - 1: int(e.ids.shape[0]) - 1] = True
        return ids, attn, sel

    def prepare(idxs: list[int], epoch: int) -> Any:
        ids, attn, sel = padded([data.train[i] for i in idxs])
        with torch.no_grad():
            last, _ = target.hidden(ids, attn)
            teacher = target.lm_head(last[sel]).float()  # the head on response positions only
        return ids, attn, sel, teacher, int(attn.sum())

    def loss_sum(m: nn.Module, b: Any) -> Tensor:
        ids, attn, sel, teacher, _ = b
        with amp():
            student = m(ids, attn, sel)
        n = teacher.shape[0]
        return distill_loss(student, teacher, torch.ones(n, dtype=torch.bool, device=dev), T) * n

    anchors = eval_anchors(cfg, data, cfg.block_size)  # the DFlash draft's (no draft config here)

    @torch.no_grad()
    def evaluate() -> dict[str, Any] | None:
        if not eval_rows:
            return None
        stats, B = BlockStats(cfg.block_size), cfg.block_size
        for chunk in range(0, len(data.eval), 4):
            idx = list(range(chunk, min(chunk + 4, len(data.eval))))
            ids, attn, _ = padded([data.eval[i] for i in idx])
            with amp():
                logits = lm(input_ids=ids, attention_mask=attn).logits.float()
            pred = torch.cat([torch.full_like(ids[:, :1], -1), logits.argmax(-1)[:, :-1]], 1)
            for j, i in enumerate(idx):
                r, a = eval_rows[i], anchors[i]
                labels = greedy_block_labels(r.ids, r.greedy, a, B)
                pos = (a[:, None] + torch.arange(B)).clamp_max(int(r.ids.shape[0]) - 1)
                stats.update(pred[j].cpu()[pos], labels)
                start, n = data.eval[i].response_start, int(r.ids.shape[0])
                ce = torch.nn.functional.cross_entropy(
                    logits[j, start - 1: n - 1], r.greedy[start:n].to(dev), reduction="sum")
                stats.add_loss(float(ce), n - start)
        return stats.result()

    def export(folder: str) -> dict[str, bytes]:
        def save(p: str) -> None:
            lm.save_pretrained(p)
            if target.tokenizer is not None:
                target.tokenizer.save_pretrained(p)
        return {f"{folder}/{k}": v for k, v in _folder_bytes(save).items()}

    return Phase("classic", module, cfg.classic_lr, total, prepare, loss_sum,
                 lambda b: float(b[2].sum()), lambda b: b[4], evaluate, export, "classic-draft",
                 _minutes(cfg.classic_time_budget_min))


def export_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """``train.export_dtype``; null: bf16 for a CUDA-trained draft (what GPU engines serve),
    fp32 on CPU (where bf16 matmuls may be slower than fp32)."""
    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def _minutes(m: float | None) -> float | None:
    return None if m is None else 60.0 * m


def _folder_bytes(save: Callable[[str], Any]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
