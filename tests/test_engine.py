"""Speculative decoding engine: exactness at T=0, distribution at T>0, stop/budget rules.

Real-model checks run on the packaged SmolLM2 (loaded once); the family checks (Qwen3, Gemma2/3
with sliding-window layers smaller than the sequence) and the statistical checks run on tiny
random models, single-threaded (tiny matmuls only lose from OpenMP hand-offs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dflash_models import engine
from dflash_models.classic import build_classic_draft
from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from dflash_models.engine import (
    GenerationConfig,
    GenerationResult,
    default_stop_token_ids,
    generate_ar,
    generate_classic,
    generate_dflash,
)
from dflash_models.fast_draft import EagerDrafter
from dflash_models.sampling import (
    accept_deterministic,
    first_divergence,
    margin_top2,
    rejection_sample,
    truncate_emitted,
)
from dflash_models.target import Target, load_target

# The last one ends with <|im_end|> well before N_NEW tokens: stopping must match generate's.
CHAT_PROMPTS = ["Write a haiku about the sea.", "Give me three tips for learning to code.",
                "What is the capital of France?"]
N_NEW = 32

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tiny_model(family: str, vocab: int = 64, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """Random model with large init, so its logits are peaked and greedy output is varied.

    Gemma sliding windows (8) are shorter than prompt + output: cache rollback must then cut
    into a window-limited layer.
    """
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        initializer_range=0.3, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, sliding_window=8))
    elif family == "gemma3":
        types = ["sliding_attention", "full_attention"] * (layers // 2)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=8, layer_types=types))
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = None  # references run the full length
    return model.eval()


def tiny_draft(target: Target, block_size: int = 4, seed: int = 0) -> DFlashDraft:
    torch.manual_seed(seed)
    cfg = DFlashDraftConfig.from_target(target, num_layers=1, block_size=block_size,
                                        num_feature_layers=2)
    return DFlashDraft(cfg).eval()


def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """Same architecture and weights plus Gaussian noise: a draft that is often, not always,
    right."""
    draft = type(model)(model.config).eval()
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return draft


def hf_greedy(target: Target, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding: the reference output."""
    ids = torch.tensor([prompt], device=target.device)
    with torch.inference_mode():
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def chat_ids(target: Target, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    rendered = target.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                    tokenize=False)
    return target.tokenizer(rendered, add_special_tokens=False).input_ids


def patch_draft(monkeypatch: pytest.MonkeyPatch, propose: Callable[[int, int], list[int]],
                check: Callable[..., None] | None = None) -> list[int]:
    """Run the real DFlash draft pass, then replace its tokens by `propose(position, n)`.

    position = absolute position of the block's anchor. Lets a test control acceptance (and
    so exercise multi-token accepts, crops and stop/budget cuts inside an accepted run) while
    the real draft, its cache and the context bookkeeping still run. Returns the list of
    block anchor positions seen.
    """
    real = EagerDrafter.propose
    seen: list[int] = []

    def fake(self, new_features, ctx_start, block_ids):
        assert len(self.cache) == ctx_start, "draft cache must hold exactly the context before"
        real(self, new_features, ctx_start, block_ids)
        pos = ctx_start + new_features.shape[1]
        assert len(self.cache) == pos, "draft cache must hold context only, never block k/v"
        if check is not None:
            check(self.target, new_features, ctx_start, block_ids)
        seen.append(pos)
        return propose(pos, block_ids.shape[1] - 1)

    monkeypatch.setattr(EagerDrafter, "propose", fake)
    return seen


def oracle(full: list[int], wrong_every: int = 3) -> Callable[[int, int], list[int]]:
    """Propose the reference continuation `full` (prompt + output), with one wrong token in
    every `wrong_every`-th block, so accepts of every length happen."""
    calls = [0]

    def propose(pos: int, n: int) -> list[int]:
        toks = [full[i] if i < len(full) else 0 for i in range(pos + 1, pos + 1 + n)]
        calls[0] += 1
        if calls[0] % wrong_every == 0 and toks:
            j = calls[0] % len(toks)
            toks[j] = (toks[j] + 1) % 64
        return toks

    return propose


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def test_small_helpers() -> None:
    assert margin_top2(torch.tensor([1.0, 4.0, 2.5])) == pytest.approx(1.5)
    assert margin_top2(torch.tensor([[3.0, 3.0]])) == 0.0
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None
    assert accept_deterministic([5, 6, 7], [5, 6, 9, 1]) == 2
    assert accept_deterministic([], [4]) == 0
    assert truncate_emitted([4, 2, 5], {2}, 10) == ([4, 2], True)
    assert truncate_emitted([4, 3, 5], {2}, 2) == ([4, 3], True)
    assert truncate_emitted([4, 3], {2}, 5) == ([4, 3], False)


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.0902 is the normal 0.999 quantile,
    so a correct sampler fails with probability ~1e-3 (and the seeds are fixed)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_stat(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic of observed counts vs exact probabilities, bins with expected < 5
    merged into one 'rest' bin (merged into the smallest kept bin if still below 5)."""
    bins = [(n * p, counts.get(key, 0)) for key, p in probs.items()]
    bins.sort(reverse=True)
    kept = [b for b in bins if b[0] >= 5]
    rest = (sum(b[0] for b in bins if b[0] < 5), sum(b[1] for b in bins if b[0] < 5))
    rest = (rest[0], rest[1] + sum(c for k, c in counts.items() if k not in probs))
    if rest[0] >= 5 or not kept:
        kept.append(rest)
    else:
        e, o = kept.pop()
        kept.append((e + rest[0], o + rest[1]))
    stat = sum((o - e) ** 2 / e for e, o in kept)
    return stat, len(kept) - 1


def test_chi2_critical_matches_tables() -> None:
    # chi2.ppf(0.999, df) from standard tables
    for df, table in [(5, 20.515), (10, 29.588), (30, 59.703), (100, 149.449)]:
        assert chi2_critical(df) == pytest.approx(table, rel=0.02)


def test_rejection_sample_emits_target_distribution() -> None:
    """Two positions whose target p does not depend on the prefix: the emitted pair must follow
    p0 x p1 whatever the draft q, including tokens q never proposes."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.3, 0.3, 0.2],
                      [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.6, 0.0, 0.1, 0.2], [0.1, 0.1, 0.3, 0.3, 0.2]])
    n = 6000
    counts: Counter = Counter()
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        n_acc, nxt = rejection_sample(p, q, drafts, gen)
        emitted = [*drafts[:n_acc], nxt]
        if len(emitted) < 2:  # second token comes from a fresh target draw at position 1
            emitted.append(int(torch.multinomial(p[1], 1, generator=gen)))
        counts[tuple(emitted[:2])] += 1
    probs = {(a, b): float(p[0, a] * p[1, b]) for a in range(5) for b in range(5)}
    stat, df = chi2_stat(counts, probs, n)
    assert stat < chi2_critical(df), (stat, df)
    assert counts.get((4, 0), 0) == 0  # p0(4) = 0: never emitted although q proposes it


# ---------------------------------------------------------------------------------------------
# greedy exactness on the real SmolLM2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> Target:
    return load_target(smollm2_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def smol_refs(smol: Target) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers greedy output) per chat prompt."""
    refs = []
    for text in CHAT_PROMPTS:
        prompt = chat_ids(smol, text)
        refs.append((prompt, hf_greedy(smol, prompt, N_NEW)))
    assert len(refs[-1][1]) < N_NEW and refs[-1][1][-1] in default_stop_token_ids(smol)
    return refs


def test_smollm2_default_stop_ids(smol: Target) -> None:
    im_end = smol.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in default_stop_token_ids(smol)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ar", "dflash", "classic"])
def test_greedy_equals_transformers_generate_smollm2(smol, smol_refs, method) -> None:
    """Random drafts (acceptance near 0) must still give the target's exact greedy output."""
    cfg = GenerationConfig(max_new_tokens=N_NEW, block_size=4, k=3)
    dflash_draft = tiny_draft(smol, block_size=4)
    classic_draft = build_classic_draft(smol, num_layers=2)
    for prompt, ref in smol_refs:
        if method == "ar":
            res = generate_ar(smol, prompt, cfg)
        elif method == "dflash":
            res = generate_dflash(smol, dflash_draft, prompt, cfg)
        else:
            res = generate_classic(smol, classic_draft, prompt, cfg)
        assert first_divergence(res.output_ids, ref) is None, (method, res.output_ids, ref)
        _check_bookkeeping(res)


def _check_bookkeeping(res: GenerationResult) -> None:
    assert sum(res.accepted_lengths) == len(res.output_ids) - 1
    assert res.n_target_passes == len(res.accepted_lengths) + 1
    assert len(res.step_s) == len(res.accepted_lengths)
    if res.drafted:  # AR drafts nothing
        assert len(res.drafted) == len(res.accepted_lengths)
    assert all(a <= d for a, d in zip(res.accepted_drafts, res.drafted, strict=True))
    assert 0 < res.ttft_s <= res.total_s


@pytest.mark.slow
def test_dflash_multi_token_accepts_stay_exact_smollm2(smol, smol_refs, monkeypatch) -> None:
    """Oracle proposals (mostly right) drive long accepts, crops and budget cuts on the real
    model; the output is still exactly transformers' greedy output, in far fewer passes."""
    prompt, ref = smol_refs[0]
    patch_draft(monkeypatch, oracle(prompt + ref))
    res = generate_dflash(smol, tiny_draft(smol, block_size=8), prompt,
                          GenerationConfig(max_new_tokens=N_NEW))
    assert res.output_ids == ref
    assert res.tau > 3.0
    _check_bookkeeping(res)


# ---------------------------------------------------------------------------------------------
# model families (tiny random models)
# ---------------------------------------------------------------------------------------------

FAMILIES = ["llama", "qwen3", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_greedy_exact(family, one_thread, monkeypatch) -> None:
    """Every method equals transformers' greedy output, with real acceptances: the classic
    draft is a noisy copy of the target, the DFlash proposals an oracle with errors. The
    features handed to the draft must be the target's features of exactly the verified
    positions (anchor + accepted), as a from-scratch forward computes them."""
    model = tiny_model(family)
    target = Target.from_model(model)
    prompt = torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_greedy(target, prompt, 40)
    cfg = GenerationConfig(max_new_tokens=40, k=3, stop_token_ids=set())
    assert generate_ar(target, prompt, cfg).output_ids == ref

    res = generate_classic(target, noisy_copy(model, 0.3), prompt, cfg)
    assert res.output_ids == ref
    assert 0 < res.acceptance_rate < 1, res.acceptance_rate  # both paths exercised
    _check_bookkeeping(res)

    draft = tiny_draft(target, block_size=5)
    layer_ids = draft.config.target_layer_ids
    full = prompt + ref

    def check_features(target, new_features, ctx_start, block_ids) -> None:
        end = ctx_start + new_features.shape[1]
        assert int(block_ids[0, 0]) == full[end]  # the anchor is the next token
        with torch.inference_mode():
            scratch = target.forward(torch.tensor([full[:end]]), layer_ids=layer_ids)
        expected = scratch.features[:, ctx_start:end]
        torch.testing.assert_close(new_features, expected, atol=1e-4, rtol=1e-4)

    patch_draft(monkeypatch, oracle(full), check_features)
    res = generate_dflash(target, draft, prompt, cfg)
    assert res.output_ids == ref
    assert res.tau > 2.0
    _check_bookkeeping(res)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_random_dflash_draft_exact(family, one_thread) -> None:
    target = Target.from_model(tiny_model(family))
    prompt = list(range(3, 15))
    ref = hf_greedy(target, prompt, 24)
    res = generate_dflash(target, tiny_draft(target), prompt, GenerationConfig(max_new_tokens=24))
    assert res.output_ids == ref
    assert res.n_draft_passes >= 1


def test_reduced_draft_vocabulary_drafts_only_its_ids_and_stays_exact(
        tmp_path, one_thread, monkeypatch) -> None:
    """A draft with a draft-to-target id map (EAGLE-3 style) proposes only mapped ids, round-trips
    through export/load, and verification keeps the output exact."""
    target = Target.from_model(tiny_model("qwen3"))
    prompt = list(range(3, 15))
    ref = hf_greedy(target, prompt, 24)
    draft = tiny_draft(target)
    draft.draft_ids = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23])
    rows = target.model.get_output_embeddings().weight[draft.draft_ids]
    loaded = DFlashDraft.load(draft.export(tmp_path / "d", lm_head=rows))
    assert torch.equal(loaded.draft_ids, draft.draft_ids)
    proposed: list[int] = []
    real = EagerDrafter.propose

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        proposed.extend(got)
        return got

    monkeypatch.setattr(EagerDrafter, "propose", spy)
    res = generate_dflash(target, loaded, prompt, GenerationConfig(max_new_tokens=24))
    assert res.output_ids == ref
    assert proposed and set(proposed) <= {3, 5, 7, 11, 13, 17, 19, 23}
    loaded.draft_ids = torch.tensor([1, 64])  # an id past the target's 64-token vocabulary
    with pytest.raises(ValueError, match="vocabulary map"):
        generate_dflash(target, loaded, prompt, GenerationConfig(max_new_tokens=4))


def test_check_compatible_is_enforced(one_thread) -> None:
    target = Target.from_model(tiny_model("llama"))
    other = Target.from_model(tiny_model("llama", layers=6))
    with pytest.raises(ValueError):
        generate_dflash(target, tiny_draft(other), [3, 4, 5], GenerationConfig(max_new_tokens=4))


# ---------------------------------------------------------------------------------------------
# stop tokens and max_new_tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ar", "dflash", "classic"])
def test_stop_token_and_budget(method, one_thread, monkeypatch) -> None:
    """Nothing after the first stop token, never more than max_new_tokens, even when the cut
    falls inside a multi-token accepted run (self-draft / oracle: everything is accepted)."""
    model = tiny_model("qwen3")
    target = Target.from_model(model)
    prompt = list(range(3, 15))
    ref = hf_greedy(target, prompt, 30)
    draft = tiny_draft(target, block_size=6)
    if method == "dflash":
        patch_draft(monkeypatch, oracle(prompt + ref, wrong_every=10**9))

    def run(cfg: GenerationConfig) -> GenerationResult:
        if method == "ar":
            return generate_ar(target, prompt, cfg)
        if method == "dflash":
            return generate_dflash(target, draft, prompt, cfg)
        return generate_classic(target, model, prompt, cfg)  # target as its own draft

    for n in [0, 1, 2, 5, 7, 13]:
        res = run(GenerationConfig(max_new_tokens=n, k=4, stop_token_ids=set()))
        assert res.output_ids == ref[:n]
    for stop_at in [0, 3, 8]:  # stop token = the reference token at this index
        stop = ref[stop_at]
        first = ref.index(stop)
        res = run(GenerationConfig(max_new_tokens=30, k=4, stop_token_ids={stop}))
        assert res.output_ids == ref[: first + 1]
        assert sum(res.accepted_lengths) == len(res.output_ids) - 1


# ---------------------------------------------------------------------------------------------
# T > 0: the output distribution is the target's
# ---------------------------------------------------------------------------------------------

STAT_V, STAT_PROMPT, STAT_TOKENS, STAT_T = 16, [3, 5, 7, 9], 4, 1.0


def exact_joint(model: torch.nn.Module, prompt: list[int], n: int, t: float) -> dict:
    """P(first n tokens) under softmax(logits / t), by enumerating every prefix."""
    seqs, probs = [tuple()], torch.ones(1)
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor([prompt + list(s) for s in seqs])
            nxt = torch.softmax(model(ids).logits[:, -1].double() / t, dim=-1)
            probs = (probs[:, None] * nxt).reshape(-1)
            seqs = [s + (v,) for s in seqs for v in range(nxt.shape[-1])]
    return {s: float(p) for s, p in zip(seqs, probs, strict=True)}


@pytest.fixture(scope="module")
def stat_setup():
    model = tiny_model("llama", vocab=STAT_V, seed=3, layers=2)
    target = Target.from_model(model)
    with torch.inference_mode():
        probs = exact_joint(model, STAT_PROMPT, STAT_TOKENS, STAT_T)
    return model, target, probs


def _sample_counts(fn, n: int) -> tuple[Counter, int]:
    counts: Counter = Counter()
    accepted = 0
    for seed in range(n):
        cfg = GenerationConfig(max_new_tokens=STAT_TOKENS, temperature=STAT_T, seed=seed,
                               stop_token_ids=set(), k=2, block_size=4)
        res = fn(cfg)
        counts[tuple(res.output_ids)] += 1
        accepted += sum(res.accepted_drafts)
    return counts, accepted


@pytest.mark.parametrize("method", ["ar", "dflash", "classic"])
def test_sampling_is_lossless(method, stat_setup, one_thread, monkeypatch) -> None:
    """Chi-square goodness of fit of the first 4 sampled tokens against the target's exact
    joint distribution. DFlash proposes the two most likely first tokens (deterministic,
    often accepted, often not); classic samples from a noisy copy of the target."""
    model, target, probs = stat_setup
    n = 600 if method == "ar" else 1000  # AR is the control; spend the samples on the drafts
    if method == "ar":
        counts, _ = _sample_counts(lambda c: generate_ar(target, STAT_PROMPT, c), n)
    elif method == "dflash":
        first = Counter()
        for seq, p in probs.items():
            first[seq[0]] += p
        top = [tok for tok, _ in first.most_common(2)]
        patch_draft(monkeypatch, lambda pos, k: [top[i % 2] for i in range(k)])
        draft = tiny_draft(target)
        counts, accepted = _sample_counts(
            lambda c: generate_dflash(target, draft, STAT_PROMPT, c), n)
        assert accepted > n // 4  # the accept path was exercised
    else:
        draft_lm = noisy_copy(model, 0.5)
        counts, accepted = _sample_counts(
            lambda c: generate_classic(target, draft_lm, STAT_PROMPT, c), n)
        assert accepted > n // 4
    stat, df = chi2_stat(counts, probs, n)
    assert df >= 10
    assert stat < chi2_critical(df), (method, stat, df)


def test_sampling_test_has_power(stat_setup, one_thread, monkeypatch) -> None:
    """The same check flags a lossy rule: accepting every DFlash proposal. (Checked on the
    first two tokens, where 300 samples leave enough bins.)"""
    model, target, probs = stat_setup
    monkeypatch.setattr(engine, "accept_deterministic", lambda draft, choices: len(draft))
    patch_draft(monkeypatch, lambda pos, k: [0] * k)
    draft = tiny_draft(target)
    n = 300
    counts, _ = _sample_counts(lambda c: generate_dflash(target, draft, STAT_PROMPT, c), n)
    pairs: Counter = Counter()
    for seq, c in counts.items():
        pairs[seq[:2]] += c
    pair_probs: dict = Counter()
    for seq, p in probs.items():
        pair_probs[seq[:2]] += p
    stat, df = chi2_stat(pairs, pair_probs, n)
    assert df >= 3
    assert stat > chi2_critical(df)


def test_seeded_sampling_is_reproducible(stat_setup, one_thread) -> None:
    _, target, _ = stat_setup
    draft = tiny_draft(target)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=7, stop_token_ids=set())
    a = generate_dflash(target, draft, STAT_PROMPT, cfg).output_ids
    assert a == generate_dflash(target, draft, STAT_PROMPT, cfg).output_ids
    assert len(a) == 12
