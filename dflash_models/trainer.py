"""The training loop's pure-torch pieces, shared by the DFlash draft and the classic baseline.

Nothing here knows about Prefect or the store: checkpoints are returned as ``{name: bytes}``
(safetensors for tensors, JSON for scalars; never pickles) and the caller decides where they go.

Three choices that make resume and data-parallel runs reproducible:
- The data position is a pure function of the step: epoch ``e`` visits the examples in
  ``randperm(n, seed, e)`` order and the anchors of example ``i`` come from a generator seeded by
  ``(seed, e, i)``. A resumed or multi-process run therefore sees exactly the same batches.
- The loss of a step is ``sum_i w_i * CE_i / W_step`` where ``W_step`` is the total loss weight of
  the WHOLE step (all micro-batches, all ranks), known before any forward. Gradient accumulation
  and DDP's gradient averaging (times the world size) then give the same gradient as one
  process holding the whole batch, whatever the split.
- Checkpoints hold only trainable parameters (frozen target pieces are never stored).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .draft import DFlashDraft
from .training import IGNORE_INDEX, block_attention_mask, build_training_batch, position_weights

# ----------------------------------------------------------------------------- optimiser


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over trainable parameters; norms and other 1-d weights get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    # foreach=False: the per-tensor loop is bit-identical however the state was restored.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, foreach=False)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over a ``functools.partial``: its state_dict is plain JSON."""
    fn = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                           min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------- checkpoints
WEIGHTS, OPTIM, STATE = "weights.safetensors", "optim.safetensors", "state.json"


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters only, CPU, contiguous: the draft's own weights, not the target's."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(f"checkpoint parameters do not match the model: missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected "
                         f"{sorted(set(state) - expected)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def weights_bytes(model: nn.Module) -> bytes:
    return st_save(trainable_state(model), metadata={"format": "pt"})


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                          meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_tensors(tensors: dict[str, Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def checkpoint_blobs(model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     state: dict[str, Any]) -> dict[str, bytes]:
    """Everything a resume needs, as files: weights, optimiser + RNG tensors, JSON scalars.

    ``state`` carries the caller's scalars (step, data position, metrics so far, best so far).
    Write ``state.json`` LAST: its presence is what makes the checkpoint complete.
    """
    opt_tensors, opt_meta = _optimizer_state(optimizer)
    py_state = random.getstate()
    full_state = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                  "python_random": [py_state[0], list(py_state[1]), py_state[2]]}
    return {
        WEIGHTS: weights_bytes(model),
        OPTIM: st_save({**opt_tensors, **rng_tensors()}, metadata={"format": "pt"}),
        STATE: json.dumps(full_state, indent=1, sort_keys=True).encode(),
    }


def restore_checkpoint(blobs: dict[str, bytes], model: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Inverse of ``checkpoint_blobs``; returns the caller's scalars."""
    state = json.loads(blobs[STATE])
    load_trainable_state(model, st_load(blobs[WEIGHTS]))
    tensors = st_load(blobs[OPTIM])
    _load_optimizer_state(optimizer, tensors, state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_tensors(tensors)
    v, internal, gauss = state.pop("python_random")
    random.setstate((v, tuple(internal), gauss))
    return state


# ----------------------------------------------------------------------------- data position
def _mix(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & ((1 << 63) - 1)
    return h


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits ``n`` examples (same on every rank and resume)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 1))
    return torch.randperm(n, generator=g).tolist()


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Generator for the anchors of one example in one epoch."""
    return torch.Generator().manual_seed(_mix(seed, epoch, index, 2))


@dataclass(frozen=True)
class StepPlan:
    """Which examples a step uses: ``micro[r][m]`` is rank r's m-th micro-batch."""

    step: int
    epoch: int
    offset: int  # position of the step's first example in the epoch order
    micro: list[list[list[int]]]

    def for_rank(self, rank: int) -> list[list[int]]:
        return self.micro[rank]

    @property
    def examples(self) -> list[int]:
        return [i for rank in self.micro for mb in rank for i in mb]


def plan_step(step: int, n: int, seed: int, batch_size: int, grad_accum: int,
              world: int) -> StepPlan:
    """Data position of ``step``: epochs hold floor(n / global batch) steps (drop-last, so every
    rank always has the same number of micro-batches and no collective can hang)."""
    global_batch = batch_size * grad_accum * world
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n} training examples cannot fill one global batch of {global_batch} "
                         "(batch_size x grad_accum x processes)")
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    chunk = order[k * global_batch:(k + 1) * global_batch]
    micro = [[chunk[(m * world + r) * batch_size:(m * world + r + 1) * batch_size]
              for m in range(grad_accum)] for r in range(world)]
    return StepPlan(step, epoch, k * global_batch, micro)


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
                mask: Tensor) -> Tensor:
        S = features.shape[1]
        context = self.draft.project_context(features)
        ctx_pos = torch.arange(S, device=features.device)
        return self.draft(block_embeds, context, block_positions, ctx_pos, attn_mask=mask)


def weighted_ce_sum(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i * CE(logits_i, labels_i) over rows; labels outside the head count as ignored."""
    ce = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
    return (ce * weights).sum()


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
    """sum_i w_i * CE_i of one micro-batch; the head runs only where a label exists (7/8 of the
    block positions at most), which saves that share of the dominant LM-head cost."""
    with torch.no_grad():
        embeds = target.embed(batch.block_ids)
    with amp():
        hidden = module(embeds, batch.features, batch.block_positions, batch.mask)
        sel = batch.weights > 0
        logits = head.logits(hidden[sel])
    return weighted_ce_sum(logits, head.labels(batch.labels[sel]), batch.weights[sel])


@torch.no_grad()
def eval_dflash_batch(module: nn.Module, target: Any, head: VocabHead, batch: DFlashBatch,
                      stats: BlockStats, amp: Callable[[], Any] = nullcontext) -> None:
    """Accumulate eval loss, per-position accuracy and tau_sim of one batch into ``stats``."""
    embeds = target.embed(batch.block_ids)
    with amp():
        hidden = module(embeds, batch.features, batch.block_positions, batch.mask)
        sel = batch.labels != IGNORE_INDEX
        logits = head.logits(hidden[sel]).float()
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


# ----------------------------------------------------------------------------- train step
@dataclass
class StepResult:
    loss: float  # this rank's weighted CE sum / the step's total weight
    grad_norm: float
    lr: float


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, micro_batches: Sequence[Any],
               loss_sum_fn: Callable[[Any], Tensor], total_weight: float, world: int,
               grad_clip: float) -> StepResult:
    """One optimiser step over this rank's micro-batches (gradient accumulation).

    ``loss_sum_fn(mb)`` returns sum_i w_i * loss_i for one micro-batch; dividing by the step's
    total weight (over all ranks) and multiplying by ``world`` (DDP averages gradients) yields
    the gradient of the global weighted mean. DDP gradient sync only on the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    scale = world / max(total_weight, 1e-12)
    loss_acc = 0.0
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if is_ddp and not last else nullcontext():
            loss_sum = loss_sum_fn(mb)
            (loss_sum * scale).backward()
        loss_acc += float(loss_sum.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else 0.0
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    return StepResult(loss_acc / max(total_weight, 1e-12), norm, lr)


def autocast_context(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on CUDA (weights and optimiser stay fp32); a no-op on CPU, where bf16
    matmuls are slower than fp32 on the machines this project targets."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- DDP helpers
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1).

    nccl on CUDA, gloo on CPU. Without torchrun: a world of one on ``device`` (default: CUDA if
    available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(want)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, dev)


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Sum small float lists across ranks (a no-op for a world of one)."""
    if info.world == 1:
        return [float(v) for v in values]
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        torch.distributed.barrier()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    if info.world == 1:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shutdown_distributed(info: DistInfo) -> None:
    if info.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
