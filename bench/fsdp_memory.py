"""Per-rank memory of the Qwen3-8B DFlash draft's trainable state under ddp and fsdp.

    .venv/bin/python bench/fsdp_memory.py [--world 8]

Computed, not guessed: the draft of ``configs/qwen3-8b.yaml`` (5 layers, hidden 4096, 5 target
layers) is built on the meta device, wrapped as the train stage wraps it
(``wrap_for_training``: FSDP2 ``fully_shard`` or a plain replica for DDP) inside a fake process
group that plays rank r of ``--world`` (``torch.testing``'s fake backend: no peers, no memory),
and the AdamW state is initialised the way Distributed Checkpoint does. The bytes are the
local shards of ``sharded_state`` (the very dict a checkpoint saves: weights + AdamW state),
plus one gradient per parameter shard. Prints a table and one JSON line. Rank r > 0 holds the
same as rank 0 up to FSDP2's padding of the last shard. fp32 throughout (the
master weights; on CUDA FSDP2 all-gathers bf16 copies for the forward, transiently).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_models.blocks import DFlashTrainModule  # noqa: E402
from dflash_models.distributed import DistInfo, sharded_state, wrap_for_training  # noqa: E402
from dflash_models.draft import DFlashDraft, DFlashDraftConfig  # noqa: E402
from dflash_models.trainer import build_optimizer  # noqa: E402

QWEN3_8B_DRAFT = DFlashDraftConfig(
    hidden_size=4096, intermediate_size=12288, num_layers=5, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, vocab_size=151936, block_size=16,
    mask_token_id=151669, target_layer_ids=[1, 9, 17, 25, 33], num_target_layers=36)


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(strategy: str, world: int, rank: int) -> dict[str, float]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with torch.device("meta"):
            module = DFlashTrainModule(DFlashDraft(QWEN3_8B_DRAFT))
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        if strategy == "ddp":  # DDP replicates: every rank holds the whole module
            model = module
        else:
            model = wrap_for_training(module, info, "fsdp")
        opt = build_optimizer(model, 6e-4, 0.01)
        tensors, _ = sharded_state(model, opt)
        weights = sum(local_bytes(v) for k, v in tensors.items() if k.startswith("model."))
        optim = sum(local_bytes(v) for k, v in tensors.items() if k.startswith("optim."))
        return {"weights": weights, "grads": weights, "adamw": optim,
                "total": 2 * weights + optim}
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=8)
    args = ap.parse_args()
    with torch.device("meta"):
        params = sum(p.numel() for p in DFlashDraft(QWEN3_8B_DRAFT).parameters())
    rows = {}
    for strategy in ("ddp", "fsdp"):
        for world in sorted({1, 2, args.world}):
            rows[f"{strategy}-{world}"] = measure(strategy, world, 0)
    gib = 2**30
    print(f"{'strategy':>8} {'world':>5} {'weights':>9} {'grads':>9} {'AdamW':>9} {'total GiB':>9}")
    for name, r in rows.items():
        s, w = name.split("-")
        print(f"{s:>8} {w:>5} {r['weights'] / gib:9.2f} {r['grads'] / gib:9.2f} "
              f"{r['adamw'] / gib:9.2f} {r['total'] / gib:9.2f}")
    print(f"draft parameters: {params / 1e9:.3f} B; under fsdp rank 0 also keeps a plain fp32 "
          f"replica for evaluation and export: +{4 * params / gib:.2f} GiB there")
    print(json.dumps({"bench": "fsdp_memory", "params": params, "per_rank_bytes": rows}))


if __name__ == "__main__":
    main()
