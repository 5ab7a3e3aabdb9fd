"""FSDP2 training steps of the Qwen3-8B DFlash draft on one GPU: tokens/s and peak GPU memory.

    python bench/fsdp_gpu.py                 # H200-class GPU, about 90 s; one JSON line
    python bench/fsdp_gpu.py --tiny          # the same code path on CPU in seconds

The draft has the Qwen3-8B config's shape (5 layers, hidden 4096, block 16, 5 target layers)
and trains with the stage's own pieces: ``wrap_for_training(strategy="fsdp")`` (FSDP2
``fully_shard``, bf16 parameters, fp32 reduce), AdamW, ``train_step``, online features from a
random-weight bf16 target of Qwen3-8B's shape (36 layers, hidden 4096, vocab 151,936), one
3,072-token sequence with 512 anchors per step (the config's recipe). It imports only torch,
transformers, safetensors and ``dflash_models`` (the GPU machine has no Prefect, DuckDB or
storage dependencies) and starts its own process group of one (no torchrun). Random weights:
the loss means nothing, the time and memory do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_models.blocks import (  # noqa: E402
    DFlashTrainModule,
    VocabHead,
    dflash_loss_sum,
    make_dflash_batch,
)
from dflash_models.distributed import (  # noqa: E402
    all_reduce_sum,
    init_distributed,
    sharded_state,
    shutdown_distributed,
    wrap_for_training,
)
from dflash_models.draft import DFlashDraft, DFlashDraftConfig  # noqa: E402
from dflash_models.features import Example, OnlineFeatures  # noqa: E402
from dflash_models.target import Target  # noqa: E402
from dflash_models.trainer import (  # noqa: E402
    autocast_context,
    build_optimizer,
    build_scheduler,
    example_generator,
    train_step,
)
from dflash_models.training import IGNORE_INDEX, sample_anchors  # noqa: E402

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               max_position_embeddings=2048, rope_theta=100_000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=1024, rope_theta=10_000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False)


def own_process_group() -> None:
    """A world of one without torchrun: the env:// rendezvous on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                 ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)


def random_target(shape: dict, device: torch.device) -> Target:
    """A random-weight Qwen3 of ``shape``, built directly on ``device``: bf16 on CUDA, fp32 on
    CPU (where bf16 matmuls are emulated unless the CPU has AVX512-BF16/AMX)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config(**shape))
    finally:
        torch.set_default_dtype(saved)
    return Target.from_model(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a smoke run)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps at most")
    ap.add_argument("--seconds", type=float, default=50.0, help="timed-loop budget")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=3072)
    ap.add_argument("--anchors", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="GLOBAL sequences per step")
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--shape", choices=("qwen3-8b", "smollm2"), default="qwen3-8b",
                    help="the random target's shape (the draft follows it)")
    ap.add_argument("--draft-layers", type=int, default=5)
    args = ap.parse_args()
    if args.tiny:
        args.seq_len, args.anchors = min(args.seq_len, 256), min(args.anchors, 16)
        args.steps, args.seconds, args.warmup = min(args.steps, 6), min(args.seconds, 20), 1
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    own_process_group()
    info = init_distributed("cpu" if args.tiny or not torch.cuda.is_available() else "cuda",
                            timeout_s=600)
    dev = info.device
    torch.manual_seed(0)
    shape = TINY if args.tiny else {"qwen3-8b": QWEN3_8B, "smollm2": SMOLLM2}[args.shape]
    target = random_target(shape, dev)
    block = 16
    per_rank = args.batch // info.world
    if per_rank * info.world != args.batch:
        raise SystemExit(f"--batch {args.batch} does not divide over {info.world} processes")
    dcfg = DFlashDraftConfig.from_target(target, num_layers=args.draft_layers, block_size=block,
                                         num_feature_layers=5)
    draft = DFlashDraft(dcfg).to(dev)  # fp32 master weights, as the stage trains them
    module = DFlashTrainModule(draft)
    model = wrap_for_training(module, info, args.strategy, bf16=dev.type == "cuda")
    opt = build_optimizer(model, 6e-4, 0.01)
    total = args.warmup + args.steps
    sched = build_scheduler(opt, total, 1, 0.05)
    head = VocabHead(target)
    gen = torch.Generator().manual_seed(0)
    n_seq = 16
    start = args.seq_len // 4  # a 768-token prompt, then the response the anchors sit in
    examples = [Example(torch.randint(0, target.vocab_size - 2, (args.seq_len,), generator=gen),
                        start, "regenerated", i) for i in range(n_seq)]
    features = OnlineFeatures(target, dcfg.target_layer_ids, examples, greedy=False)

    def amp():  # noqa: ANN202
        return autocast_context(dev, True)

    def batch_at(step: int):  # noqa: ANN202
        first = step * args.batch + info.rank * per_rank  # this rank's share of the step
        idx = [(first + j) % n_seq for j in range(per_rank)]
        rows = features.get(idx)
        anchors = [sample_anchors(start, args.seq_len, args.anchors, block,
                                  example_generator(0, 0, step * 1000 + i)) for i in idx]
        b = make_dflash_batch([r.ids for r in rows], [r.features for r in rows], anchors, block,
                              dcfg.mask_token_id, 7.0, device=dev)
        b.weights *= head.labels(b.labels) != IGNORE_INDEX
        return b

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    losses, tokens, timed, t0 = [], 0, 0, 0.0
    for step in range(total):
        if step == args.warmup:
            sync()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        b = batch_at(step)
        (w,) = all_reduce_sum([float(b.weights.sum())], info)
        res = train_step(model, opt, sched, [b],
                         lambda mb: dflash_loss_sum(model, target, head, mb, amp), w,
                         info.world, 1.0)
        loss, late = all_reduce_sum([res.loss, float(time.perf_counter() - t0 > args.seconds)],
                                    info)  # the ranks stop together, or a collective hangs
        losses.append(loss)
        if step >= args.warmup:
            timed += 1
            tokens += args.batch * args.seq_len  # the whole step's, over all ranks
            if late:
                break
    sync()
    dt = time.perf_counter() - t0
    tensors, _ = sharded_state(model, opt)
    params = sum(t.numel() for k, t in tensors.items() if k.startswith("model."))
    state_bytes = sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local")
                      else t.numel() * t.element_size() for t in tensors.values())
    out = {
        "bench": "fsdp_gpu", "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                        else "cpu"), "tiny": args.tiny, "world": info.world,
        "rank": info.rank, "strategy": args.strategy, "torch": torch.__version__,
        "shape": "tiny" if args.tiny else args.shape,
        "draft": {"layers": dcfg.num_layers, "hidden": dcfg.hidden_size,
                  "params": params},
        "target_layers": target.num_layers, "seq_len": args.seq_len, "anchors": args.anchors,
        "batch": args.batch, "warmup_steps": args.warmup, "steps": timed,
        "step_s": dt / max(timed, 1), "tokens_per_s": tokens / dt,
        "draft_and_optimizer_state_gib": state_bytes / 2**30,
        "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30
                             if dev.type == "cuda" else None),
        "peak_gpu_reserved_gib": (torch.cuda.max_memory_reserved(dev) / 2**30
                                  if dev.type == "cuda" else None),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_first": losses[0], "loss_last": losses[-1], "wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(out), flush=True)
    shutdown_distributed(info)


if __name__ == "__main__":
    main()
