"""Lossless speculative decoding, batch 1: plain AR, DFlash (block draft) and classic (AR draft).

All three loops drive the models through their own transformers forward with a `DynamicCache`
that is cropped back to the verified length after every verification pass, so any causal LM
family transformers supports (Llama, Qwen3, Gemma2/3 with sliding-window layers, ...) works.

Shared invariants of the speculative loops (P = prompt length):
- The "anchor" is the newest emitted token. It is NOT yet in the target's KV cache: the target
  cache always holds exactly the tokens before it (`t_len`), so the anchor's position is t_len.
- A verify pass feeds [anchor, d_1..d_n] and gets the target's choice after each of them.
  Accepting a draft tokens emits d_1..d_a plus the target's own choice at index a (the bonus),
  and the cache is cropped to t_len + 1 + a (anchor and accepted drafts; the bonus is the next
  anchor). Every verify pass therefore emits between 1 and n + 1 tokens.
- The emitted run is cut at the first stop token and at the max_new_tokens budget.

Greedy (T=0) output equals the target's own greedy decoding; at T>0 the output distribution is
the target's (see `sampling.accept_deterministic` and `sampling.rejection_sample`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from .draft import DFlashDraft, check_compatible
from .fast_draft import Drafter, EagerDrafter
from .sampling import (
    accept_deterministic,
    first_divergence,
    logits_to_probs,
    make_generator,
    margin_top2,
    rejection_sample,
    sample,
    select_tokens,
    truncate_emitted,
)
from .target import Target

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "default_stop_token_ids",
    "first_divergence",
    "generate_ar",
    "generate_classic",
    "generate_dflash",
    "margin_top2",
    "new_cache",
]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    stop_token_ids: set[int] | None = None  # None: tokenizer eos + generation_config eos ids
    seed: int | None = None  # seeds the sampling generator (T > 0); None = torch's global RNG
    block_size: int | None = None  # DFlash block (anchor + masks); None: the draft's own
    k: int = 4  # classic: draft tokens proposed per verification pass


@dataclass
class GenerationResult:
    """What one generation did. ttft_s and total_s are wall-clock seconds from the call's start.

    `accepted_lengths` has one entry per verification pass (the prefill is not one): tokens
    emitted by that pass, bonus included, after the stop/budget cut; so
    sum(accepted_lengths) == len(output_ids) - 1 (the first token comes from the prefill).
    `accepted_drafts` / `drafted` count draft tokens matched / proposed per pass BEFORE the
    cut: they give acceptance rates that do not depend on where the output happened to end.
    """

    output_ids: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)
    accepted_drafts: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    n_target_passes: int = 0
    n_draft_passes: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # per verification pass, draft included
    draft_s: list[float] = field(default_factory=list)  # draft share of each step
    verify_s: list[float] = field(default_factory=list)  # target verify share of each step

    def record_step(self, emitted: int, n_acc: int, drafted: int, ts: float, tv: float) -> None:
        """Book one verification pass: started at ts, verify from tv, ends now."""
        te = time.perf_counter()
        self.accepted_lengths.append(emitted)
        self.accepted_drafts.append(n_acc)
        self.drafted.append(drafted)
        self.step_s.append(te - ts)
        self.draft_s.append(tv - ts)
        self.verify_s.append(te - tv)

    @property
    def tau(self) -> float:
        """Mean tokens per verification pass, bonus included (nan if there was none)."""
        n = len(self.accepted_lengths)
        return sum(self.accepted_lengths) / n if n else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (nan if nothing was drafted)."""
        n = sum(self.drafted)
        return sum(self.accepted_drafts) / n if n else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one per second of decoding (the prefill excluded)."""
        dt = self.total_s - self.ttft_s
        return (len(self.output_ids) - 1) / dt if dt > 0 and len(self.output_ids) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# transformers plumbing
# ---------------------------------------------------------------------------------------------

_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward's cache argument: `cache` since transformers 5.2x, else the old one.

    Resolved once per model class; passing the wrong name would be silently swallowed by
    **kwargs and decode without a cache.
    """
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty cache for the model: its own (the fast path's static cache) or a DynamicCache
    shaped for it (sliding-window layers where it has them)."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    return DynamicCache(config=model.config)


def _allow_rollback(cache: DynamicCache) -> None:
    """Make sliding-window layers keep enough past to be cropped after a rejected draft.

    Called after the prefill, as transformers' own assisted decoding does: before it, the
    prefill would keep the whole prompt in sliding layers for nothing.
    """
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()


def _crop(cache: DynamicCache, current_len: int, keep_len: int) -> None:
    """Drop the last current_len - keep_len positions (a negative count = tokens to remove).

    Called even when nothing is removed: crop(0) trims sliding-window layers back to their
    window, which past recording lets grow during a verify pass.
    """
    cache.crop(-(current_len - keep_len))


def _lm_logits(
    model: torch.nn.Module, ids: Tensor, cache: DynamicCache, n_logits: int
) -> Tensor:
    """Cached forward of `ids` [1, T]; logits [n_logits, V] of the LAST n_logits positions only.

    logits_to_keep skips the LM head for the positions nobody reads (all but one in a prefill).
    """
    kwargs = {_cache_kwarg(model): cache}
    return model(input_ids=ids, use_cache=True, logits_to_keep=n_logits, **kwargs).logits[0]


def default_stop_token_ids(target: Target) -> set[int]:
    """Tokenizer eos plus every eos id of the model's generation_config (chat models add
    their end-of-turn token there), which is what `model.generate` stops on."""
    ids: set[int] = set()
    gen_cfg = getattr(target.model, "generation_config", None)
    for value in (getattr(target.tokenizer, "eos_token_id", None),
                  getattr(gen_cfg, "eos_token_id", None)):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else value)
    return ids


def _prompt_tensor(prompt_ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("empty prompt: speculative decoding needs at least one prompt token")
    return ids


def _stop_ids(cfg: GenerationConfig, target: Target) -> set[int]:
    if cfg.stop_token_ids is None:
        return default_stop_token_ids(target)
    return set(cfg.stop_token_ids)


class _Emitter:
    """Appends tokens to a result under the stop-token / max_new_tokens rules."""

    def __init__(self, result: GenerationResult, cfg: GenerationConfig, stop: Iterable[int]):
        self.result = result
        self.max_new = cfg.max_new_tokens
        self.stop = set(stop)
        self.done = self.max_new <= 0

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.result.output_ids)

    def emit(self, tokens: list[int]) -> int:
        """Emit what the rules allow of `tokens`; returns how many were emitted."""
        kept, self.done = truncate_emitted(tokens, self.stop, self.remaining)
        self.result.output_ids.extend(kept)
        return len(kept)


# ---------------------------------------------------------------------------------------------
# Plain autoregressive decoding
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_ar(
    target: Target, prompt_ids: Sequence[int] | Tensor, cfg: GenerationConfig
) -> GenerationResult:
    """Prefill, then one target pass per token: the reference every other method must match.

    Kept lean on purpose (it is the speedup baseline): LM head on the last position only, no
    hidden states, the sampled token tensor fed straight back as the next input.
    """
    t0 = time.perf_counter()
    model = target.model
    res = GenerationResult()
    out = _Emitter(res, cfg, _stop_ids(cfg, target))
    if out.done:
        return res
    gen = make_generator(cfg.seed, target.device)
    cache = new_cache(model)
    logits = _lm_logits(model, _prompt_tensor(prompt_ids, target.device), cache, 1)
    tok = select_tokens(logits, cfg.temperature, gen)  # [1]
    res.n_target_passes = 1
    out.emit([int(tok)])
    res.ttft_s = time.perf_counter() - t0
    while not out.done:
        ts = time.perf_counter()
        logits = _lm_logits(model, tok.view(1, 1), cache, 1)
        tok = select_tokens(logits, cfg.temperature, gen)
        res.n_target_passes += 1
        res.accepted_lengths.append(out.emit([int(tok)]))
        dt = time.perf_counter() - ts
        res.step_s.append(dt)
        res.verify_s.append(dt)
    res.total_s = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# DFlash: one block-diffusion draft pass proposes block_size - 1 tokens
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_dflash(
    target: Target,
    draft: DFlashDraft | Drafter,
    prompt_ids: Sequence[int] | Tensor,
    cfg: GenerationConfig,
) -> GenerationResult:
    """DFlash decoding (dflash-method.md section 2, inference loop), batch 1.

    ``draft`` is a DFlashDraft (run eagerly) or a drafter (fast_draft.py: `FastDraft` is the
    fixed-shape, CUDA-graph pass that pairs with a `StaticLM` target).
    """
    check_compatible(draft.config, target, draft.draft_ids)
    drafter = EagerDrafter(target, draft) if isinstance(draft, DFlashDraft) else draft
    t0 = time.perf_counter()
    res = GenerationResult()
    out = _Emitter(res, cfg, _stop_ids(cfg, target))
    if out.done:
        return res
    block_size = cfg.block_size or drafter.config.block_size
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    layer_ids = list(drafter.config.target_layer_ids)
    temperature = cfg.temperature
    gen = make_generator(cfg.seed, target.device)

    # 1. Target prefill with features; the first token comes from the prefill logits.
    ids = _prompt_tensor(prompt_ids, target.device)
    cache = new_cache(target.model)
    pre = target.forward(ids, past_key_values=cache, layer_ids=layer_ids)
    _allow_rollback(cache)
    anchor = int(select_tokens(pre.logits[0, -1:], temperature, gen))
    res.n_target_passes = 1
    out.emit([anchor])
    res.ttft_s = time.perf_counter() - t0

    t_len = ids.shape[1]  # tokens in the target cache; the anchor sits at position t_len
    pending, ctx_start = pre.features, 0  # features the draft has not cached yet, and where
    drafter.reset()
    block_ids = torch.full((1, block_size), drafter.config.mask_token_id, device=target.device)
    while not out.done:
        ts = time.perf_counter()
        # 2. Draft pass over the uncached context + [anchor, masks]. Never draft past the
        # budget: b - 1 drafts + 1 bonus = b tokens at most.
        b = min(block_size, out.remaining)
        drafts: list[int] = []
        if b > 1:
            block_ids[0, 0] = anchor
            drafts = drafter.propose(pending, ctx_start, block_ids[:, :b])
            res.n_draft_passes += 1
            ctx_start += pending.shape[1]
            pending = pending[:, :0]
        tv = time.perf_counter()

        # 3. Verify [anchor, drafts] in one pass; the target's choice at every position.
        verify_ids = torch.tensor([[anchor, *drafts]], device=target.device)
        ver = target.forward(verify_ids, past_key_values=cache, layer_ids=layer_ids)
        choices = select_tokens(ver.logits[0], temperature, gen).tolist()
        n_acc = accept_deterministic(drafts, choices)
        res.n_target_passes += 1

        # 4. Keep anchor + accepted drafts in the target cache; their features are the next
        # context. When the draft was skipped, the anchor's feature joins what is pending.
        _crop(cache, t_len + len(verify_ids[0]), t_len + 1 + n_acc)
        t_len += 1 + n_acc
        pending = torch.cat([pending, ver.features[:, : 1 + n_acc]], dim=1)
        anchor = choices[n_acc]
        res.record_step(out.emit([*drafts[:n_acc], anchor]), n_acc, len(drafts), ts, tv)
    res.total_s = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# Classic speculative decoding: a small AR draft proposes k tokens one by one
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_classic(
    target: Target,
    draft_lm: torch.nn.Module,
    prompt_ids: Sequence[int] | Tensor,
    cfg: GenerationConfig,
) -> GenerationResult:
    """Classic speculative decoding (Leviathan et al. 2023) with an AR draft LM, batch 1.

    T=0: draft argmax, accept while the target's argmax agrees. T>0: draft samples from q,
    speculative rejection sampling against p (`sampling.rejection_sample`).
    """
    t0 = time.perf_counter()
    res = GenerationResult()
    out = _Emitter(res, cfg, _stop_ids(cfg, target))
    if out.done:
        return res
    if cfg.k < 0:
        raise ValueError(f"k must be >= 0, got {cfg.k}")
    temperature = cfg.temperature
    sampling = temperature > 0.0
    gen = make_generator(cfg.seed, target.device)
    device = target.device

    ids = _prompt_tensor(prompt_ids, device)
    tcache, dcache = new_cache(target.model), new_cache(draft_lm)
    logits = _lm_logits(target.model, ids, tcache, 1)
    _allow_rollback(tcache)
    _allow_rollback(dcache)
    tokens = ids[0].tolist()  # prompt + emitted tokens; tokens[-1] is the anchor
    tokens.append(int(select_tokens(logits, temperature, gen)))
    res.n_target_passes = 1
    out.emit(tokens[-1:])
    res.ttft_s = time.perf_counter() - t0

    t_len = len(tokens) - 1  # target cache length (everything before the anchor)
    d_len = 0  # draft cache length; the draft prefills lazily in its first pass
    while not out.done:
        ts = time.perf_counter()
        k = min(cfg.k, out.remaining - 1)
        drafts: list[int] = []
        q_rows: list[Tensor] = []
        feed = tokens[d_len:]  # what the draft has not seen: prompt on step 1, else 1-2 tokens
        for _ in range(k):
            d_logits = _lm_logits(draft_lm, torch.tensor([feed], device=device), dcache, 1)
            d_len += len(feed)
            if sampling:
                q = logits_to_probs(d_logits, temperature)  # [1, V]
                x = int(sample(q, gen))
                q_rows.append(q)
            else:
                x = int(d_logits.argmax(dim=-1))
            drafts.append(x)
            feed = [x]
        res.n_draft_passes += k
        tv = time.perf_counter()

        verify_ids = torch.tensor([[tokens[-1], *drafts]], device=device)
        v_logits = _lm_logits(target.model, verify_ids, tcache, k + 1)  # [k+1, V]
        res.n_target_passes += 1
        if sampling:
            p = logits_to_probs(v_logits, temperature)
            q = torch.cat(q_rows) if q_rows else p[:0]
            if q.shape[-1] != p.shape[-1]:
                raise ValueError(f"draft vocab {q.shape[-1]} != target vocab {p.shape[-1]}")
            n_acc, nxt = rejection_sample(p, q, drafts, gen)
        else:
            choices = v_logits.argmax(dim=-1).tolist()
            n_acc = accept_deterministic(drafts, choices)
            nxt = choices[n_acc]

        _crop(tcache, t_len + k + 1, t_len + 1 + n_acc)
        t_len += 1 + n_acc
        # The draft cached [.., anchor, d_1..d_{k-1}]; keep what is still on the accepted path.
        new_d_len = min(d_len, t_len)
        if d_len:
            _crop(dcache, d_len, new_d_len)
        d_len = new_d_len
        new_tokens = [*drafts[:n_acc], nxt]
        tokens.extend(new_tokens)
        res.record_step(out.emit(new_tokens), n_acc, k, ts, tv)
    res.total_s = time.perf_counter() - t0
    return res
