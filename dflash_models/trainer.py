"""The training loop's pure-torch pieces, shared by the DFlash draft and the classic baseline.

Nothing here knows about Prefect or the store: checkpoints are local folders of safetensors
shards plus JSON bytes (never pickles) and the caller decides where they go.

Three choices that make resume and data-parallel runs reproducible:
- The data position is a pure function of the step: epoch ``e`` visits the examples in
  ``randperm(n, seed, e)`` order and the anchors of example ``i`` come from a generator seeded by
  ``(seed, e, i)``. A resumed or multi-process run therefore sees exactly the same batches.
- The loss of a step is ``sum_i w_i * CE_i / W_step`` where ``W_step`` is the total loss weight of
  the WHOLE step (all micro-batches, all ranks), known before any forward. Gradient accumulation
  and DDP's gradient averaging (times the world size) then give the same gradient as one
  process holding the whole batch, whatever the split.
- Checkpoints hold only trainable parameters (frozen target pieces are never stored): their
  tensors as a sharded Distributed Checkpoint (``dflash_models.distributed``), their scalars as
  JSON (``state_json``).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from dflash_models.distributed import (  # noqa: F401  (re-exported: the loop's one import)
    DistInfo,
    all_reduce_sum,
    barrier,
    full_norm,
    init_distributed,
    load_sharded,
    no_sync,
    save_sharded,
    shutdown_distributed,
    sync_replica,
    watch_parent,
    wrap_for_training,
)

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


def retarget_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Move a ``build_scheduler`` schedule's end to ``total_steps`` from the next step on (the
    warm-up is kept): a time-budgeted run re-plans once its real pace is known."""
    scheduler.lr_lambdas = [functools.partial(f.func, **{**f.keywords, "total_steps": total_steps})
                            for f in scheduler.lr_lambdas]


# ----------------------------------------------------------------------------- checkpoints
STATE = "state.json"


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


def state_json(scheduler: torch.optim.lr_scheduler.LRScheduler, groups: list[dict[str, Any]],
               state: dict[str, Any]) -> bytes:
    """The JSON half of a checkpoint (the tensors are a sharded DCP save, see
    ``dflash_models.distributed.save_sharded``): the caller's scalars (step, metrics, best),
    the optimiser's param groups, the scheduler and the RNG states. Written LAST: it commits."""
    py_state = random.getstate()
    full = {**state, "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
            "python_random": [py_state[0], list(py_state[1]), py_state[2]],
            "torch_rng": torch.get_rng_state().tolist()}
    return json.dumps(full, indent=1, sort_keys=True).encode()


def restore_state(blob: bytes, scheduler: torch.optim.lr_scheduler.LRScheduler
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inverse of ``state_json``: restores scheduler and RNGs, returns (scalars, param groups)."""
    state = json.loads(blob)
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    v, internal, gauss = state.pop("python_random")
    random.setstate((v, tuple(internal), gauss))
    return state, state.pop("optimizer_groups")


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
    total weight (over all ranks) and multiplying by ``world`` (DDP and FSDP2 average gradients)
    yields the gradient of the global weighted mean. Gradient sync only on the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    scale = world / max(total_weight, 1e-12)
    loss_acc = 0.0
    for i, mb in enumerate(micro_batches):
        with no_sync(model, last=i == len(micro_batches) - 1):
            loss_sum = loss_sum_fn(mb)
            (loss_sum * scale).backward()
        loss_acc += float(loss_sum.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    norm = full_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else 0.0
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    return StepResult(loss_acc / max(total_weight, 1e-12), norm, lr)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_on(device: torch.device, cpu_bf16: bool | str) -> bool:
    """Whether training on ``device`` autocasts to bf16 on CPU (``"auto"``: where the CPU has
    native bf16)."""
    return device.type == "cpu" and (cpu_bf16 is True or cpu_bf16 == "auto" and
                                     cpu_has_native_bf16())


def autocast_context(device: torch.device, bf16: bool, cpu_bf16: bool | str = False) -> Any:
    """bf16 autocast (weights and optimiser stay fp32): on CUDA with ``bf16``; on CPU only with
    ``cpu_bf16`` (see `cpu_bf16_on`), because it pays only where the CPU multiplies bf16
    natively (~2.3x fp32 on this project's Zen 4 box) and costs time where it emulates it."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_bf16_on(device, cpu_bf16):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()
