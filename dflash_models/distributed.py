"""Data-parallel training on PyTorch's own engine: torchrun process groups, DDP or FSDP2, and
sharded checkpoints with Distributed Checkpoint (DCP). Pure torch: paths in, tensors out.

- ``wrap_for_training`` returns the module the loop trains: the module itself (a world of one
  under ``ddp``), DDP around it, or an FSDP2 (``fully_shard``) copy whose parameters, gradients
  and AdamW state are split 1/N per rank. The caller's module stays a plain replica that
  ``sync_replica`` refreshes (rank 0 only) before an evaluation or an export, so evaluation and
  export code never see DTensors.
- Checkpoints are DCP saves in safetensors files (``HuggingFaceStorageWriter`` with
  ``save_distributed``: every rank writes its own shard, no pickled metadata); a load reshards,
  so a checkpoint written by 2 ranks resumes on 1 and the other way round, under either strategy.
- The FSDP unit is the whole draft (one ``fully_shard`` at its root): ``DFlashDraft.forward``
  calls ``layer.self_attn.context_kv`` before ``layer(...)``, outside a per-layer unit's hooks.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

log = logging.getLogger("dflash")
Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (``RANK`` set), even a world of
    one (FSDP2 needs a device mesh). nccl on CUDA, gloo on CPU; ``timeout_s`` bounds every
    collective, so a rank stuck on a dead peer errors out instead of hanging. Without torchrun:
    a world of one on ``device`` (default: CUDA if available) and no process group."""
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and launched:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(want)
    if launched and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
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


def shutdown_distributed(info: DistInfo) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def watch_parent(pid: int, poll_s: float = 1.0) -> None:
    """Exit this process when ``pid`` (the process that launched torchrun) is gone.

    torchrun starts ranks in their own sessions, so a launcher killed with SIGKILL would leave
    them training (and holding GPUs) for hours; a daemon thread polls and ends the rank."""
    def loop() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.error("train: launcher process %d is gone; rank %s exits", pid,
                          os.environ.get("RANK", "?"))
                os._exit(3)
            except PermissionError:
                pass  # alive, owned by someone else
            time.sleep(poll_s)

    threading.Thread(target=loop, name="dflash-parent-watch", daemon=True).start()


# ----------------------------------------------------------------------------- wrapping
def wrap_for_training(module: nn.Module, info: DistInfo, strategy: Strategy,
                      bf16: bool = False) -> nn.Module:
    """The module the loop trains (see the module docstring). ``bf16``: FSDP2 mixed precision,
    bf16 parameters in forward/backward and fp32 gradient reduction (CUDA only)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not torch.distributed.is_initialized():
            raise RuntimeError("strategy fsdp needs a process group: launch under torchrun")
        sharded = copy.deepcopy(module)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and info.device.type == "cuda" else MixedPrecisionPolicy())
        fully_shard(sharded, mp_policy=mp)
        if not info.main:  # only rank 0 evaluates and exports: drop the others' replicas
            for p in module.parameters():
                if p.requires_grad:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return sharded
    if info.world == 1:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sync_replica(model: nn.Module, replica: nn.Module, info: DistInfo) -> None:
    """Copy the trained (sharded) weights into rank 0's plain replica. A collective under FSDP:
    every rank calls it at the same point; a no-op when ``model`` shares the replica's weights."""
    if not is_fsdp(model):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if info.main:
        params = dict(replica.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                if p.requires_grad:
                    p.copy_(full[n])


def no_sync(model: nn.Module, last: bool) -> Any:
    """Gradient accumulation: skip the gradient all-reduce / reduce-scatter until the last
    micro-batch (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
    from contextlib import nullcontext

    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(last)  # type: ignore[operator]
    return nullcontext()


def full_norm(norm: Tensor) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# ----------------------------------------------------------------------------- checkpoints
def _trainable_fqns(model: nn.Module) -> set[str]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n for n, p in inner.named_parameters() if p.requires_grad}


def sharded_state(model: nn.Module, opt: torch.optim.Optimizer
                  ) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """(this rank's tensors, optimiser param groups as JSON): trainable weights ``model.<fqn>``
    and AdamW state ``optim.<fqn>.<name>``, DTensor shards under FSDP. Names do not depend on
    the strategy or world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    keep = _trainable_fqns(model)
    tensors = {f"model.{k}": v for k, v in msd.items() if k in keep}
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {fqn}.{name} is not a tensor")
            tensors[f"optim.{fqn}.{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in osd["param_groups"]]
    return tensors, groups


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns when it runs without a process group; a world of one in-process is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer
                 ) -> list[dict[str, Any]]:
    """Every rank writes its shard of the weights and optimiser state into the local folder
    ``path`` (``shard-<rank+1>-model-00001-of-00001.safetensors``); returns the param groups."""
    import torch.distributed.checkpoint as dcp

    tensors, groups = sharded_state(model, opt)
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(path,
                                                                      save_distributed=True))
    return groups


def load_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer,
                 groups: list[dict[str, Any]]) -> None:
    """Inverse of ``save_sharded`` at any world size and strategy (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors, _ = sharded_state(model, opt)
    with _quiet_single_process():
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(path))
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            fqn, name = k[len("optim."):].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = v
    pg = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    set_state_dict(model, opt, model_state_dict=msd,
                   optim_state_dict={"state": state, "param_groups": pg},
                   options=StateDictOptions(strict=False))
