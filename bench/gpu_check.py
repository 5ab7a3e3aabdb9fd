"""One prepared GPU check: the engine at a real target's shape against the weight-read limit.

    python bench/gpu_check.py [--shape qwen3-8b] [--budget-s 240] [--tiny] [--no-compile]

Builds a target of a real config's shape with random bf16 weights (Qwen3-8B by default; nothing
is downloaded) and a DFlash draft of the reference shape (5 layers, block 16), then prints ONE
JSON line with:

- the device's measured bandwidth (a device-to-device copy) and, from it, the weight-read limit
  of a decode step, a verify pass and a draft pass (the bytes each must read once);
- decode step, verify-16 and draft-pass times: transformers' eager forward, the fast path with
  CUDA graphs (`StaticLM` + `FastDraft`) and, on CUDA, the fast path with inductor-compiled
  layers inside the graphs; each with its ratio to the limit;
- the speed-up model ``tau * t_decode / (t_draft + t_verify)`` at tau 2, 4 and 6.5;
- DFlash training at this shape with online features from the target: tokens/s, peak memory;
- the lossless check: greedy `ar` and `dflash` on the fast path against eager `generate()` for a
  few prompts, with the first divergence and the reference's top-2 logit margin there (the
  benchmark audit calls a divergence under 0.5 in 16-bit dtypes a numeric near-tie);
- the hardware tags the benchmark history would record (storage/hardware.py).

It imports only torch, transformers, safetensors, dflash_models and storage.hardware, so it runs
on a bare GPU machine from a source tree. ``--tiny`` runs the same steps at a small shape on the
CPU (the test suite does this); there the "fast path" is the fixed-shape code without graphs.
Sections that no longer fit the budget are skipped and named in ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare source tree

from dflash_models import engine  # noqa: E402
from dflash_models.blocks import DFlashTrainModule, VocabHead, dflash_loss_sum, make_dflash_batch  # noqa: E402
from dflash_models.draft import DFlashDraft, DFlashDraftConfig  # noqa: E402
from dflash_models.engine import GenerationConfig, generate_ar, generate_dflash  # noqa: E402
from dflash_models.fast_draft import EagerDrafter, FastDraft  # noqa: E402
from dflash_models.features import target_pass  # noqa: E402
from dflash_models.sampling import first_divergence, margin_top2  # noqa: E402
from dflash_models.static_lm import StaticLM  # noqa: E402
from dflash_models.target import Target, default_target_layer_ids  # noqa: E402
from dflash_models.trainer import build_optimizer  # noqa: E402
from dflash_models.training import sample_anchors  # noqa: E402
from storage.hardware import hardware_fingerprint, hardware_info, hardware_tag  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=False, rope_theta=1e6),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, rope_theta=1e6),
    # peaked random logits (large init): the CPU check never sits on a near-tie
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=False, rope_theta=1e6, initializer_range=0.3),
}
TAUS = (2.0, 4.0, 6.5)
NEAR_TIE = {"float32": 0.01}  # else 0.5: the benchmark audit's default rule


class Clock:
    """Wall time against the budget; every section asks it first."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget = time.perf_counter(), budget_s
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def allows(self, name: str, need_s: float) -> bool:
        if self.left() >= need_s:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}", file=sys.stderr, flush=True)
            return True
        self.skipped.append(f"{name} (needs ~{need_s:.0f} s, {self.left():.0f} s left)")
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `repeats` calls, each synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy: bytes read + bytes written per second (what a weight read gets)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / (ms / 1e3) / 1e9


def build_target(shape: str, device: torch.device, dtype: torch.dtype, seed: int,
                 logit_scale: float = 1.0) -> Target:
    spec = dict(SHAPES[shape])
    theta = spec.pop("rope_theta")
    cfg = Qwen3Config(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta},
                      max_position_embeddings=8192)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: no stop token, fixed lengths
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    return Target.from_model(model.eval())


def read_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the weights a pass reads once (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def pass_times(t: Target, drafter: EagerDrafter | FastDraft, prompt: torch.Tensor, block: int,
               repeats: int) -> dict[str, float]:
    """Decode, verify-block and draft-pass ms on caches holding `prompt`; every timed pass is
    cropped back after, so all repeats see the same cache length."""
    dev, layer_ids = t.device, list(drafter.config.target_layer_ids)
    one, blk = prompt[:, -1:], prompt[:, -block:]
    cache = engine.new_cache(t.model)
    pre = t.forward(prompt, past_key_values=cache, layer_ids=layer_ids)
    start = prompt.shape[1] - block  # the draft's cached context; its last block is re-fed
    feats = pre.features[:, start:]
    ids = torch.full((1, block), drafter.config.mask_token_id, device=dev)
    drafter.reset()
    drafter.propose(pre.features[:, :start], 0, ids)

    def decode() -> None:
        engine._lm_logits(t.model, one, cache, 1).argmax(-1)
        cache.crop(-1)

    def verify() -> None:
        t.forward(blk, past_key_values=cache, layer_ids=layer_ids).logits.argmax(-1)
        cache.crop(-block)

    def draft() -> None:
        drafter.propose(feats, start, ids)
        drafter.crop(start)

    return {"decode_ms": time_ms(decode, dev, repeats),
            f"verify{block}_ms": time_ms(verify, dev, repeats),
            "draft_ms": time_ms(draft, dev, repeats)}


class OracleDrafter:
    """The real drafter's pass, whose proposals are then replaced by the reference continuation
    with one wrong token in every third block: a random draft is never accepted, this one is,
    so the check also covers multi-token accepts and the crops after them."""

    def __init__(self, inner: EagerDrafter | FastDraft, full: list[int], vocab: int) -> None:
        self.inner, self.full, self.vocab, self.calls = inner, full, vocab, 0
        self.config, self.draft_ids = inner.config, inner.draft_ids

    def reset(self) -> None:
        self.inner.reset()
        self.calls = 0

    def propose(self, new_features: torch.Tensor, ctx_start: int, block_ids: torch.Tensor
                ) -> list[int]:
        self.inner.propose(new_features, ctx_start, block_ids)
        anchor = ctx_start + new_features.shape[1]  # the anchor's position in prompt + output
        n = block_ids.shape[1] - 1
        toks = [self.full[i] if i < len(self.full) else 0 for i in range(anchor + 1, anchor + 1 + n)]
        self.calls += 1
        if self.calls % 3 == 0 and toks:
            j = self.calls % len(toks)
            toks[j] = (toks[j] + 1) % self.vocab
        return toks


def kernel_profile(t: Target, drafter: EagerDrafter | FastDraft, prompt: torch.Tensor,
                   steps: int = 5, top: int = 8) -> list[dict[str, Any]]:
    """Where a decode step's GPU time goes: the top kernels over `steps` steps (us per step)."""
    from torch.profiler import ProfilerActivity, profile

    cache = engine.new_cache(t.model)
    with torch.inference_mode():
        t.forward(prompt, past_key_values=cache)
        one = prompt[:, -1:]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine._lm_logits(t.model, one, cache, 1)
                cache.crop(-1)
            torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows)
    out = [{"kernel": e.key[:80], "calls_per_step": e.count / steps,
            "us_per_step": round(e.device_time_total / steps, 1)} for e in rows[:top]]
    return [{"kernel": "ALL", "calls_per_step": sum(e.count for e in rows) / steps,
             "us_per_step": round(total / steps, 1)}, *out]


def lossless(target: Target, fast: Target, fast_draft: EagerDrafter | FastDraft,
             prompts: list[list[int]], max_new: int, tie: float) -> dict[str, Any]:
    """Greedy ar, dflash and dflash with oracle proposals on the fast path against eager
    generate(), prompt by prompt."""
    cfg = GenerationConfig(max_new_tokens=max_new, stop_token_ids=set())
    model, dev = target.model, target.device
    rows, exact, n = [], 0, 0
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=dev)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new)[0, len(p):].tolist()
        oracle = OracleDrafter(fast_draft, p + ref, target.vocab_size)
        got = {"ar": generate_ar(fast, p, cfg), "dflash": generate_dflash(fast, fast_draft, p, cfg),
               "dflash_oracle": generate_dflash(fast, oracle, p, cfg)}
        for method, res in got.items():
            n += 1
            div = first_divergence(ref, res.output_ids)
            row: dict[str, Any] = {"prompt": i, "method": method, "diverges_at": div}
            if method != "ar":
                row["tau"] = round(res.tau, 3)
            if div is None:
                exact += 1
            else:  # the reference's own margin where the two part ways
                prefix = torch.tensor([p + ref[:div]], device=dev)
                margin = margin_top2(model(prefix).logits[0, -1])
                row.update(margin=round(margin, 4), near_tie=margin < tie)
            rows.append(row)
    return {"exact_match": exact / max(n, 1), "runs": rows}


def lossless_float32(args: argparse.Namespace, shape: str, dev: torch.device,
                     draft_cfg: DFlashDraftConfig, max_len: int, prompts: list[list[int]],
                     path: str, block: int, scale: float) -> dict[str, Any]:
    """The lossless check again with a float32 target and draft on the same fast path."""
    target = build_target(shape, dev, torch.float32, args.seed, scale)
    torch.manual_seed(args.seed + 1)
    with torch.device(dev):
        draft = DFlashDraft(draft_cfg).eval()
    fast = Target.from_model(StaticLM(target.model, max_len, graph_tokens=(1, block),
                                      compile="inductor" if path == "compiled" else None))
    with torch.inference_mode():
        out = lossless(target, fast, FastDraft(fast, draft, max_len), prompts, args.new_tokens,
                       NEAR_TIE["float32"])
    out["path"] = path
    return out


def train_tokens_per_s(target: Target, draft_cfg: DFlashDraftConfig, seq_len: int, seqs: int,
                       anchors: int, steps: int, seed: int) -> dict[str, Any]:
    """DFlash training steps with online features (the target's forward inside the step)."""
    dev = target.device
    torch.manual_seed(seed)
    with torch.device(dev):
        draft = DFlashDraft(draft_cfg)  # fp32 master weights; bf16 autocast on CUDA
    module = DFlashTrainModule(draft)
    opt = build_optimizer(module, lr=6e-4, weight_decay=0.0)
    head = VocabHead(target)
    gen = torch.Generator().manual_seed(seed)
    layer_ids = list(draft_cfg.target_layer_ids)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" \
        else nullcontext
    start = seq_len // 8  # a prompt, then the response that anchors sit in
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        ids = [torch.randint(0, target.vocab_size, (seq_len,), generator=gen)
               for _ in range(seqs)]
        rows = target_pass(target, ids, layer_ids, greedy=False)
        anc = [sample_anchors(start, seq_len, anchors, draft_cfg.block_size, gen) for _ in ids]
        batch = make_dflash_batch(ids, [r.features for r in rows], anc, draft_cfg.block_size,
                                  draft_cfg.mask_token_id, gamma=7.0, device=dev)
        opt.zero_grad(set_to_none=True)
        loss = dflash_loss_sum(module, target, head, batch, amp)
        (loss / batch.weights.sum()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()

    ms = time_ms(step, dev, repeats=steps, warmup=1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"train_tokens_per_s": round(seqs * seq_len / (ms / 1e3), 1),
            "train_step_ms": round(ms, 2), "train_seqs": seqs, "train_seq_len": seq_len,
            "train_anchors_per_seq": anchors, "train_peak_gpu_gb": peak and round(peak, 2),
            "draft_params": sum(p.numel() for p in draft.parameters())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="the tiny shape on this device (CPU ok)")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip the inductor variant")
    ap.add_argument("--logit-scale", type=float, default=None,
                    help="LM-head scale. Random init gives logits of std ~1.3, where bf16 "
                    "rounding flips near-tied argmaxes within a few tokens; a trained model's "
                    "spread is several times larger. Default: 8 at real shapes, 1 for --tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    clock = Clock(args.budget_s)
    shape = "tiny" if args.tiny else args.shape
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    block, draft_layers = 16, 5
    info = hardware_info(dtype_name)
    res: dict[str, Any] = {"shape": shape, "device": dev.type, "dtype": dtype_name,
                           "hardware_tag": hardware_tag(info),
                           "hardware_fingerprint": hardware_fingerprint(info), "hardware": info}

    clock.allows("bandwidth, target and draft", 0)
    bw = bandwidth_gbs(dev, 2**30 if dev.type == "cuda" else 2**26)
    scale = args.logit_scale if args.logit_scale is not None else (1.0 if args.tiny else 8.0)
    target = build_target(shape, dev, dtype, args.seed, scale)
    L = target.num_layers
    draft_cfg = DFlashDraftConfig.from_target(target, num_layers=draft_layers, block_size=block,
                                              num_feature_layers=5)
    draft_cfg.target_layer_ids = default_target_layer_ids(L, 5)
    torch.manual_seed(args.seed + 1)
    with torch.device(dev):
        draft = DFlashDraft(draft_cfg).to(dtype=dtype).eval()
    model = target.model
    head = model.get_output_embeddings()
    t_bytes = read_bytes([model.get_decoder().layers, model.get_decoder().norm, head])
    d_bytes = read_bytes([draft, head])
    res.update(bandwidth_gbs=round(bw, 1), target_weight_gb=round(t_bytes / 1e9, 3),
               draft_weight_gb=round(d_bytes / 1e9, 3),
               decode_limit_ms=round(t_bytes / bw / 1e6, 3),
               draft_limit_ms=round(d_bytes / bw / 1e6, 3), block_size=block,
               draft_layers=draft_layers, target_layer_ids=draft_cfg.target_layer_ids)

    g = torch.Generator().manual_seed(args.seed)
    probe = torch.randint(0, target.vocab_size, (1, 32), generator=g).to(dev)
    with torch.inference_mode():
        res.update(logit_scale=scale, logit_std=round(float(model(probe).logits[0, -1].float().std()), 3))
    prompts = [torch.randint(0, target.vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.prompts)]
    max_len = args.prompt_tokens + args.new_tokens + 2 * block
    prompt = torch.tensor([prompts[0]], device=dev)
    paths: dict[str, tuple[Target, EagerDrafter | FastDraft]] = {
        "eager": (target, EagerDrafter(target, draft))}
    variants = [("fast", None)]
    if dev.type == "cuda" and not args.no_compile:
        variants.append(("compiled", "inductor"))
    for name, backend in variants:
        if not clock.allows(f"{name} path", 40 if backend else 10):
            continue
        t_setup = time.perf_counter()
        try:
            fast = Target.from_model(StaticLM(model, max_len, graph_tokens=(1, block),
                                              compile=backend))
            paths[name] = (fast, FastDraft(fast, draft, max_len))
            with torch.inference_mode():  # first calls capture the graphs (and compile)
                pass_times(*paths[name], prompt, block, repeats=1)
        except Exception as e:  # noqa: BLE001 - a failed variant is a finding, not a crash
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            paths.pop(name, None)
        res[f"{name}_setup_s"] = round(time.perf_counter() - t_setup, 1)
    with torch.inference_mode():
        for name, (t, drafter) in paths.items():
            for k, v in pass_times(t, drafter, prompt, block, args.repeats).items():
                res[f"{k}_{name}"] = round(v, 3)
    best = min((n for n in paths if n != "eager"), default="eager",
               key=lambda n: res[f"decode_ms_{n}"] + res[f"verify{block}_ms_{n}"])
    for name in paths:
        dec, ver, drf = (res[f"{k}_{name}"] for k in ("decode_ms", f"verify{block}_ms",
                                                       "draft_ms"))
        res[f"model_{name}"] = {
            "decode_over_limit": round(dec / res["decode_limit_ms"], 3),
            "verify_over_limit": round(ver / res["decode_limit_ms"], 3),
            "verify_over_decode": round(ver / dec, 3), "draft_over_decode": round(drf / dec, 3),
            "draft_over_limit": round(drf / res["draft_limit_ms"], 3),
            "predicted_speedup": {str(tau): round(tau * dec / (drf + ver), 3) for tau in TAUS}}
    res["best_path"] = best
    if dev.type == "cuda" and best != "eager":
        try:
            res[f"decode_kernels_{best}"] = kernel_profile(*paths[best], prompt)
        except Exception as e:  # noqa: BLE001
            res["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    if best != "eager" and clock.allows("lossless check", 20):
        tie = NEAR_TIE.get(dtype_name, 0.5)
        try:
            with torch.inference_mode():
                res["lossless"] = lossless(target, *paths[best], prompts, args.new_tokens, tie)
        except Exception as e:  # noqa: BLE001 - report it beside the figures already taken
            res["lossless_error"] = f"{type(e).__name__}: {e}"[:300]
        res["near_tie_margin"] = tie
    paths.clear()
    if dev.type == "cuda":
        res["engine_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if dtype != torch.float32 and best != "eager" and clock.allows("float32 lossless check", 60):
        # bf16 kernels that differ (fused or not, split-K or not) round differently, and a
        # random target's argmax flips on that noise; in float32 a divergence is a bug.
        try:
            res["lossless_float32"] = lossless_float32(args, shape, dev, draft_cfg, max_len,
                                                       prompts, best, block, scale)
        except Exception as e:  # noqa: BLE001 - report it beside the figures already taken
            res["lossless_float32_error"] = f"{type(e).__name__}: {e}"[:300]
    if clock.allows("training", 25):
        seq_len, seqs, anchors = (1024, 4, 128) if dev.type == "cuda" else (64, 2, 8)
        try:
            res.update(train_tokens_per_s(target, draft_cfg, seq_len, seqs, anchors,
                                          steps=5 if dev.type == "cuda" else 2, seed=args.seed))
        except Exception as e:  # noqa: BLE001 - report it beside the figures already taken
            res["train_error"] = f"{type(e).__name__}: {e}"[:300]
    res["skipped"] = clock.skipped
    res["wall_s"] = round(time.perf_counter() - clock.t0, 1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
