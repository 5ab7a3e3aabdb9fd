"""Plain transformers generation for the target: prompt rendering and a batched generator.

Kept free of storage and Prefect so the same code serves the ``generate`` stage, the benchmark
script and tests. Throughput on small hardware comes from batching (a 2-core CPU runs
SmolLM2-135M at ~28 tokens/s alone and ~3x that in batches), so prompts are sorted by length,
left-padded and grouped into batches whose padded size fits a token budget. Long prompts are
prefilled one by one and only their decoding is batched (`HFGenerator._prefill_cache`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dflash")
PREFILL_TOKENS = 256  # prompts this long are prefilled alone and only decode in batches


# ----------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer: Any) -> bool:
    """Base models ship no template; they get plain text instead of a chat rendering."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """The exact text the target sees before its answer.

    With a chat template: the template with the generation prompt appended. Without one (a base
    model): a single user message is its bare content; a longer conversation becomes a plain
    ``User: ... / Assistant: ...`` transcript ending in ``Assistant:``.
    """
    msgs = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
    return "\n\n".join(lines) + "\n\nAssistant:"


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt.

    A chat template already contains the BOS token where the family wants one, so special tokens
    are added only for plain text (base models), as their own pretraining did.
    """
    add = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def context_length(config: Any) -> int | None:
    """The model's maximum sequence length from its config, or None when it does not say."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the generation config's (often a list) plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


# ----------------------------------------------------------------------------- batching
def plan_batches(lengths: Sequence[int], max_new_tokens: int, token_budget: int,
                 max_batch_size: int = 64, pad_frac: float = 0.25, pad_slack: int = 64,
                 prefill_tokens: int = 256) -> list[list[int]]:
    """Group prompt indices into batches, longest first.

    A batch takes rows while ``rows * (longest + max_new_tokens) <= token_budget`` (at least one
    row, so a single prompt over the budget still runs alone). Short prompts are left-padded
    into one prefill, so a row's padding must also stay under ``max(pad_slack, pad_frac *
    longest)`` tokens: one 2,000-token prompt must not make seven short ones pay for a
    2,000-token prefill. Prompts of ``prefill_tokens`` or more are prefilled one by one (see
    `HFGenerator`) and only decode together, so padding costs them nothing but cache reads and
    only the budget binds. Longest first surfaces out-of-memory at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        fits = bool(current) and len(current) < max_batch_size \
            and (len(current) + 1) * (longest + max_new_tokens) <= token_budget \
            and (lengths[i] >= prefill_tokens if longest >= prefill_tokens else
                 longest - lengths[i] <= max(pad_slack, pad_frac * longest))
        if fits:
            current.append(i)
            continue
        if current:
            batches.append(current)
        current, longest = [i], lengths[i]
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenOutput:
    """One generated answer; ``token_ids`` include the EOS token when it stopped on one."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error" | "reference" (an original: not generated)
    latency_s: float
    error: str | None = None


class HFGenerator:
    """A loaded target that answers batches of token-id prompts with ``model.generate``."""

    def __init__(self, folder: str | Path, dtype: str | None = None,
                 device: str | None = None) -> None:
        import torch

        from dflash_models.target import load_target

        torch_dtype = getattr(torch, dtype) if dtype else None
        target = load_target(folder, dtype=torch_dtype, device=device)
        self.model, self.tokenizer = target.model, target.tokenizer
        self.device, self.dtype = target.device, target.dtype
        self.context = context_length(self.model.config)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 token_budget: int = 16384, max_batch_size: int = 64,
                 on_batch: Callable[[int, int], None] | None = None) -> list[GenOutput]:
        """Answer every prompt; ``on_batch(rows, new_tokens)`` is called after each batch.

        A prompt with no room left in the context becomes an ``error`` output, not an exception.
        """
        results: list[GenOutput | None] = [None] * len(prompts)
        runnable = []
        for i, p in enumerate(prompts):
            if self.context is not None and len(p) >= self.context:
                results[i] = GenOutput([], "", "error", 0.0, error=(
                    f"prompt has {len(p)} tokens; the target's context is {self.context} tokens"))
            else:
                runnable.append(i)
        lengths = [len(prompts[i]) for i in runnable]
        for n, batch in enumerate(plan_batches(lengths, params.max_new_tokens, token_budget,
                                               max_batch_size, prefill_tokens=PREFILL_TOKENS)):
            idx = [runnable[b] for b in batch]
            outs = self._generate_safe([prompts[i] for i in idx], params, seed_offset=n)
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
            if on_batch is not None:
                on_batch(len(idx), sum(len(o.token_ids) for o in outs))
        return [r for r in results if r is not None]

    def _generate_safe(self, batch: list[Sequence[int]], params: SamplingParams,
                       seed_offset: int) -> list[GenOutput]:
        """Run one batch; on out-of-memory split it in halves, down to a single-row error."""
        import torch

        try:
            if len(batch) > 1 and min(len(p) for p in batch) >= PREFILL_TOKENS:
                return self._generate_batch(batch, params, seed_offset, prefilled=True)
            return self._generate_batch(batch, params, seed_offset)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [GenOutput([], "", "error", 0.0, error="out of memory on one prompt")]
            half = len(batch) // 2
            log.warning("generate: out of memory on a batch of %d; splitting it", len(batch))
            return (self._generate_safe(batch[:half], params, seed_offset)
                    + self._generate_safe(batch[half:], params, seed_offset + 100_003))

    def _prefill_cache(self, batch: list[Sequence[int]], width: int, max_new: int) -> Any | None:
        """Each prompt but its last token through the model alone (no padding), the caches then
        left-padded to ``width - 1`` and written into one preallocated ``StaticCache`` with room
        for ``max_new`` more tokens: ``generate`` continues from there with one token per row.

        Static, because long rows make decoding memory-bound on the cache: a dynamic cache
        re-concatenates every layer's keys and values at every step (a full copy), a static one
        writes the new token in place (7 rows at ~2K tokens: ~300 -> ~200 ms a step here).
        None where a cache has other than plain per-layer keys/values (e.g. sliding windows),
        which left padding would break.
        """
        import torch
        import torch.nn.functional as F
        from transformers import StaticCache
        from transformers.cache_utils import DynamicLayer, StaticLayer

        static = StaticCache(config=self.model.config, max_cache_len=width + max_new)
        if not all(type(layer) is StaticLayer for layer in static.layers):
            return None  # known before any prefill work
        per_row = []
        with torch.inference_mode():
            for p in batch:
                out = self.model(input_ids=torch.tensor([list(p[:-1])], device=self.device),
                                 use_cache=True, logits_to_keep=1)
                cache = out.cache
                if not all(type(layer) is DynamicLayer for layer in cache.layers):
                    return None
                per_row.append([(layer.keys, layer.values) for layer in cache.layers])
        if len(static.layers) != len(per_row[0]):
            return None

        def left_pad(t: Any) -> Any:  # [1, heads, S, d] -> [1, heads, width - 1, d]
            return F.pad(t, (0, 0, width - 1 - t.shape[2], 0))

        with torch.inference_mode():
            for layer, kvs in zip(static.layers, zip(*per_row, strict=True), strict=True):
                layer.update(torch.cat([left_pad(k) for k, _ in kvs]),
                             torch.cat([left_pad(v) for _, v in kvs]))
        return static

    def _generate_batch(self, batch: list[Sequence[int]], params: SamplingParams,
                        seed_offset: int, prefilled: bool = False) -> list[GenOutput]:
        """One ``generate`` call over left-padded rows. ``prefilled``: the prompts' caches are
        built one by one first (`_prefill_cache`), so long prompts of different lengths decode
        together without paying for a padded prefill."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):  # left padding: every row's last prompt token lines up
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        max_new = params.max_new_tokens
        if self.context is not None:
            max_new = max(1, min(max_new, self.context - width))
        sample = params.temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new, do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None, top_k=None,
            eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id)
        if sample:  # reproducible per (seed, batch) on the same hardware and batching
            torch.manual_seed(params.seed * 1_000_003 + seed_offset)
        t0 = time.perf_counter()
        extra = {}
        if prefilled and (cache := self._prefill_cache(batch, width, max_new)) is not None:
            extra["cache"] = cache
        elif prefilled:  # no plain cache to pad: the rows run alone
            return [o for i, p in enumerate(batch)
                    for o in self._generate_batch([p], params, seed_offset + 7_919 * i)]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=gen_cfg, **extra)
        latency = time.perf_counter() - t0
        new = out[:, width:].tolist()
        return [self._finish(row, latency) for row in new]

    def _finish(self, row: list[int], latency: float) -> GenOutput:
        """Cut a generated row at its first EOS (kept: the draft must learn to stop)."""
        eos = set(self.eos_ids)
        for k, tok in enumerate(row):
            if tok in eos:
                kept = row[:k + 1]
                return GenOutput(kept, self._decode(kept), "stop", latency)
        return GenOutput(row, self._decode(row), "length", latency)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
