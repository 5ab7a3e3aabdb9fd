"""Time the engine's decode step and verify pass on the real SmolLM2 (fp32, CPU) against
transformers' own forward and against this CPU's limits.

    .venv/bin/python bench/engine_step.py [--prompt-tokens 72] [--repeats 30] [--threads N]

Every timed pass runs on a KV cache holding the prompt (~72 tokens) and is cropped back after,
so each repeat sees the same cache length. Passes are timed round-robin (one of each per round)
so that load from other processes hits all of them alike; the table shows the minimum (the
figure least disturbed by a shared CPU) and the median.

Limits: a pass cannot beat reading every weight once (bytes / 21 GB/s) nor the matrix products
(2 * params * tokens / 200 GFLOP/s); the larger of the two is the floor, their sum the figure
with no overlap at all. The script also measures what this machine delivers right now (one big
GEMV for bandwidth, one GEMM for compute), because a shared CPU can fall far below its nominal
figures, and reports the ratios against both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from dflash_models import engine
from dflash_models.engine import GenerationConfig, generate_ar, new_cache
from dflash_models.fast_target import FastLM
from dflash_models.packaged import packaged_model_dir
from dflash_models.target import Target, load_target

NOMINAL_BW, NOMINAL_FLOPS = 21e9, 200e9
TEXT = (
    "You are a careful assistant. Explain, step by step and in plain words, how a speculative "
    "decoding engine keeps the output of a large language model unchanged while it lets a "
    "small draft model propose several tokens that the large model then checks in one pass."
)


def round_robin_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
                   ) -> dict[str, tuple[float, float]]:
    """{name: (min ms, median ms)}, calling each fn once per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {n: (min(ts) * 1e3, statistics.median(ts) * 1e3) for n, ts in times.items()}


def machine_limits(repeats: int) -> tuple[float, float]:
    """(bytes/s of a weight-streaming GEMV, FLOP/s of a GEMM) measured now."""
    w = torch.randn(49152, 576)  # the size of SmolLM2's LM head
    x = torch.randn(1, 576)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = round_robin_ms({"gemv": lambda: x @ w.T, "gemm": lambda: a @ b}, repeats)
    return w.numel() * 4 / (best["gemv"][0] / 1e3), 2 * 1024**3 / (best["gemm"][0] / 1e3)


def prompt_ids(target: Target, n: int) -> list[int]:
    msgs = [{"role": "user", "content": TEXT}]
    text = target.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = target.tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < n:
        ids = ids + ids
    return ids[-n:]


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers kwarg renames
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=72)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--verify-tokens", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    target = load_target(packaged_model_dir(), dtype=torch.float32, device="cpu")
    model = target.model
    params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.tensor([prompt_ids(target, args.prompt_tokens)])
    p_len, n_ver = prompt.shape[1], args.verify_tokens
    layer_ids = [1, 10, 18, 27]  # what a 4-feature DFlash draft of SmolLM2 reads
    kw = engine._cache_kwarg(model)

    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=prompt, use_cache=True, **{kw: cache})
        engine._allow_rollback(cache)
        one = torch.tensor([[42]])
        block = torch.tensor([list(range(100, 100 + n_ver))])

        def with_crop(fn: Callable[[], None], n: int) -> Callable[[], None]:
            def run() -> None:
                fn()
                engine._crop(cache, p_len + n, p_len)

            return run

        # the fast path (dflash_models/fast_target.py): same weights, its own static cache
        fast = Target.from_model(FastLM(model), target.tokenizer)
        fcache = new_cache(fast.model)
        fast.model(input_ids=prompt, past_key_values=fcache)

        def fast_crop(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                fn()
                fcache.crop(p_len)

            return run

        rows = {
            "decode 1 tok: fast path (logits_to_keep=1 + argmax)": (1, fast_crop(
                lambda: engine._lm_logits(fast.model, one, fcache, 1).argmax(-1))),
            f"verify {n_ver} tok: fast path DFlash (+{len(layer_ids)} feature layers)": (
                n_ver, fast_crop(lambda: fast.forward(block, past_key_values=fcache,
                                                      layer_ids=layer_ids))),
            "decode 1 tok: engine step (logits_to_keep=1 + argmax)": (1, with_crop(
                lambda: engine._lm_logits(model, one, cache, 1).argmax(-1), 1)),
            "decode 1 tok: transformers forward (full logits)": (1, with_crop(
                lambda: model(input_ids=one, use_cache=True, **{kw: cache}), 1)),
            f"verify {n_ver} tok: engine classic (logits only)": (n_ver, with_crop(
                lambda: engine._lm_logits(model, block, cache, n_ver).argmax(-1), n_ver)),
            f"verify {n_ver} tok: engine DFlash (+{len(layer_ids)} feature layers)": (
                n_ver, with_crop(lambda: target.forward(block, past_key_values=cache,
                                                         layer_ids=layer_ids), n_ver)),
            f"verify {n_ver} tok: transformers forward (full logits)": (n_ver, with_crop(
                lambda: model(input_ids=block, use_cache=True, **{kw: cache}), n_ver)),
        }
        timed = round_robin_ms({name: fn for name, (_, fn) in rows.items()}, args.repeats)

        # Whole greedy generations, alternated: the engine's AR loop vs model.generate.
        cfg = GenerationConfig(max_new_tokens=args.gen_tokens, stop_token_ids=set())
        gen = round_robin_ms({
            "engine": lambda: generate_ar(target, prompt[0], cfg),
            "fast": lambda: generate_ar(fast, prompt[0], cfg),
            "transformers": lambda: model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens),
        }, repeats=3, warmup=1)

    bw, flops = machine_limits(args.repeats)

    def floor_ms(n_tokens: int, bw_: float, flops_: float) -> float:
        return max(weight_bytes / bw_, 2 * params * n_tokens / flops_) * 1e3

    print(f"SmolLM2-135M fp32 on CPU: {params / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB of "
          f"weights, {torch.get_num_threads()} threads, load average at start {load0:.2f}, "
          f"cache = {p_len}-token prompt, {args.repeats} rounds")
    print(f"nominal limits: {NOMINAL_BW / 1e9:.0f} GB/s, {NOMINAL_FLOPS / 1e9:.0f} GFLOP/s; "
          f"measured now: {bw / 1e9:.1f} GB/s (GEMV), {flops / 1e9:.0f} GFLOP/s (GEMM)")
    print("floor = max(weights read, compute): perfect overlap; serial = their sum")
    print(f"{'pass':56s} {'min ms':>7s} {'med ms':>7s} | {'weights':>7s} {'compute':>7s} "
          f"{'x floor':>7s} {'x serial':>8s} | measured: {'floor':>5s} {'x floor':>7s}")
    for name, (n, _) in rows.items():
        best, med = timed[name]
        w_ms, c_ms = weight_bytes / NOMINAL_BW * 1e3, 2 * params * n / NOMINAL_FLOPS * 1e3
        meas = floor_ms(n, bw, flops)
        print(f"{name:56s} {best:7.1f} {med:7.1f} | {w_ms:7.1f} {c_ms:7.1f} "
              f"{best / max(w_ms, c_ms):7.2f} {best / (w_ms + c_ms):8.2f} | "
              f"{meas:15.1f} {best / meas:7.2f}")
    eng, fst, hf = (gen[k][0] / 1e3 for k in ("engine", "fast", "transformers"))
    print(f"greedy {args.gen_tokens} new tokens, best of 3 alternated runs: engine generate_ar "
          f"{args.gen_tokens / eng:.1f} tok/s general path ({hf / eng:.2f}x generate), "
          f"{args.gen_tokens / fst:.1f} tok/s fast path ({hf / fst:.2f}x), transformers "
          f"generate {args.gen_tokens / hf:.1f} tok/s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
