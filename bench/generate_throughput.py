"""Generation tokens/s of the hf backend: batch 1 against the batched backend, same prompts.

    .venv/bin/python bench/generate_throughput.py [--n 64] [--max-new-tokens 64] [--threads 2]

Target: the packaged SmolLM2-135M-Instruct (fp32 on CPU, bf16 on CUDA). Prompts: the same --n
ShareGPT first turns (seeded sample of the packaged file), rendered with the chat template; both
runs use greedy decoding, the same EOS and max_new_tokens, and the same code path
(``dflash_models.generation.HFGenerator``); batch 1 is the batched backend with a token budget of
one row. tokens/s counts generated tokens (EOS included, padding excluded) per second of wall
time, after one untimed warm-up call. The issue's bar: batched >= 2.5x batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_models.generation import (  # noqa: E402
    HFGenerator,
    SamplingParams,
    encode_prompt,
    plan_batches,
    render_prompt,
)
from dflash_models.packaged import packaged_model_dir  # noqa: E402
from tasks.prompts import PromptSource, load_source  # noqa: E402


def timed(gen: HFGenerator, prompts: list[list[int]], params: SamplingParams, budget: int,
          max_batch: int) -> tuple[float, int, list[list[int]]]:
    """(seconds, generated tokens, outputs) of one full pass over the prompts."""
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    outs = gen.generate(prompts, params, token_budget=budget, max_batch_size=max_batch,
                        on_batch=lambda rows, _: marks.append((rows, time.perf_counter())))
    elapsed = time.perf_counter() - t0
    if max_batch > 1:  # where the batched run's time goes: (rows, seconds) per batch
        prev, per = t0, []
        for rows, t in marks:
            per.append(f"{rows}:{t - prev:.1f}")
            prev = t
        print("batches (rows:seconds): " + " ".join(per))
    return elapsed, sum(len(o.token_ids) for o in outs), [o.token_ids for o in outs]


def prefill_seconds(gen: HFGenerator, prompts: list[list[int]]) -> float:
    """Seconds for one forward pass over each prompt alone: the prefill work both runs share.

    Prefill is compute-bound, so batching cannot shrink it; the ratio batch-1 time / this is
    the ceiling of any batched speed-up on these prompts (Amdahl), however cheap decoding gets.
    """
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            gen.model(input_ids=torch.tensor([p], device=gen.device), logits_to_keep=1)
    return time.perf_counter() - t0


def pick_prompts(tokenizer: object, records: list, n: int, seed: int,
                 max_tokens: int | None) -> list[list[int]]:
    """n rendered prompts in the prompt stage's seeded hash order, optionally among those of at
    most ``max_tokens`` tokens (still n prompts: the cap changes which, not how many)."""
    import hashlib

    order = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.group}".encode()).digest())
    out: list[list[int]] = []
    for r in order:
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, r.messages))
        if max_tokens is None or len(ids) <= max_tokens:
            out.append(ids)
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="ShareGPT prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=16384, help="batched: padded tokens/batch")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="sample the n prompts among those this short (default: any length)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = HFGenerator(packaged_model_dir())
    records, _ = load_source(PromptSource(kind="sharegpt"), seed=args.seed)
    prompts = pick_prompts(gen.tokenizer, records, args.n, args.seed, args.max_prompt_tokens)
    lengths = [len(p) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    batches = plan_batches(lengths, args.max_new_tokens, args.token_budget, args.max_batch_size)
    print(f"device {gen.device}, dtype {gen.dtype}, torch threads {torch.get_num_threads()}")
    print(f"{len(prompts)} ShareGPT prompts: tokens min {min(lengths)}, median "
          f"{statistics.median(lengths):.0f}, max {max(lengths)}, total {sum(lengths)}; "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    print(f"batched plan: {len(batches)} batches, sizes {[len(b) for b in batches]}")
    gen.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up, untimed

    t1, n1, out1 = timed(gen, prompts, params, budget=1, max_batch=1)
    print(f"batch 1 : {n1} tokens in {t1:.1f} s = {n1 / t1:.1f} tokens/s", flush=True)
    tb, nb, outb = timed(gen, prompts, params, args.token_budget, args.max_batch_size)
    print(f"batched : {nb} tokens in {tb:.1f} s = {nb / tb:.1f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(out1, outb, strict=True))
    ratio = (nb / tb) / (n1 / t1)
    print(f"speed-up: {ratio:.2f}x (bar: >= 2.5x) -> {'PASS' if ratio >= 2.5 else 'FAIL'}; "
          f"identical greedy outputs: {same}/{len(prompts)}")
    tp = prefill_seconds(gen, prompts)
    print(f"prefill : {sum(lengths)} prompt tokens in {tp:.1f} s ({tp / t1:.0%} of batch 1); "
          f"ceiling for any batched speed-up on these prompts: {t1 / tp:.2f}x")


if __name__ == "__main__":
    main()
