"""The engine's fast path (dflash_models/fast_target.py) against the general transformers path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from dflash_models.engine import GenerationConfig, generate_ar, generate_dflash, new_cache
from dflash_models.fast_target import FastLM, StaticKVCache, supports
from dflash_models.static_lm import StaticLM
from dflash_models.target import Target, load_target

LAYERS = [0, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str) -> torch.nn.Module:
    """Peaked random logits (large init): greedy paths never sit on a near-tie."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=256, initializer_range=0.3, eos_token_id=2)
    model = (LlamaForCausalLM(LlamaConfig(**common, attention_bias=True)) if family == "llama"
             else Qwen3ForCausalLM(Qwen3Config(**common)))
    model.generation_config.eos_token_id = None
    return model.eval()


def pair(model: torch.nn.Module, static: bool = False) -> tuple[Target, Target]:
    """(general, fast) Targets over the same weights; `static`: the fixed-shape CUDA fast path
    (static_lm.py), whose stale cache entries past the verified length must stay masked."""
    fast = StaticLM(model, 96, graph_tokens=(1, 5)) if static else FastLM(model)
    return Target.from_model(model), Target.from_model(fast)


@pytest.mark.parametrize("static", [False, True], ids=["fast", "static"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_passes_match_the_general_path(family: str, static: bool) -> None:
    general, fast = pair(tiny(family), static)
    prompt = torch.arange(3, 17)[None]
    a = general.forward(prompt, past_key_values=new_cache(general.model), layer_ids=LAYERS)
    b = fast.forward(prompt, past_key_values=new_cache(fast.model), layer_ids=LAYERS)
    assert isinstance(b.past_key_values, StaticKVCache)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.features, a.features, rtol=1e-5, atol=1e-5)
    block = torch.tensor([[5, 9, 11, 40, 7]])
    for kept in (15, 16):  # a verify pass keeping 1 of its 5 tokens, then another
        a2 = general.forward(block, past_key_values=a.past_key_values, layer_ids=LAYERS)
        b2 = fast.forward(block, past_key_values=b.past_key_values, layer_ids=LAYERS)
        torch.testing.assert_close(b2.logits, a2.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b2.features, a2.features, rtol=1e-5, atol=1e-5)
        a.past_key_values.crop(-4)
        b.past_key_values.crop(-4)
        assert b.past_key_values.get_seq_length() == a.past_key_values.get_seq_length() == kept
    assert not static or new_cache(fast.model) is b.past_key_values  # one cache, made once


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_outputs_are_identical(family: str) -> None:
    general, fast = pair(tiny(family))
    torch.manual_seed(1)
    draft = DFlashDraft(DFlashDraftConfig.from_target(general, num_layers=1, block_size=4,
                                                      num_feature_layers=2)).eval()
    prompt = list(range(3, 15))
    cfg = GenerationConfig(max_new_tokens=40)
    ar = generate_ar(general, prompt, cfg).output_ids
    assert generate_ar(fast, prompt, cfg).output_ids == ar
    assert generate_dflash(fast, draft, prompt, cfg).output_ids == ar
    sampled = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=7)
    assert generate_ar(fast, prompt, sampled).output_ids == \
        generate_ar(general, prompt, sampled).output_ids


def test_cache_grows_past_its_capacity() -> None:
    general, fast = pair(tiny("llama"))
    cache = StaticKVCache(4, 2, 8, torch.float32, torch.device("cpu"), capacity=4)
    ids = torch.arange(3, 13)[None]
    out = fast.forward(ids, past_key_values=cache)
    assert cache.length == 10 and cache.k.shape[3] >= 10
    torch.testing.assert_close(out.logits, general.forward(ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_families_say_why() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8))
    assert "gemma2" in (supports(gemma) or "")
    with pytest.raises(ValueError, match="general path"):
        FastLM(gemma)
    general, fast = pair(tiny("llama"))
    with pytest.raises(ValueError, match="batch 1"):
        fast.forward(torch.ones(2, 3, dtype=torch.long))


def test_smollm2_greedy_matches_generate(smollm2_dir) -> None:
    smol = load_target(smollm2_dir, dtype=torch.float32, device="cpu")
    fast = Target.from_model(FastLM(smol.model), smol.tokenizer)
    for text in ("Write a haiku about the sea.", "What is the capital of France?"):
        chat = smol.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=False)
        prompt = smol.tokenizer.encode(chat)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = smol.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=24)[0, len(prompt):].tolist()
        got = generate_ar(fast, prompt, GenerationConfig(max_new_tokens=24)).output_ids
        assert got == ref[: len(got)] and len(got) == len(ref)


def test_cropping_nothing_keeps_the_cache() -> None:
    """crop(0) is what the engine calls after a fully accepted block: it must remove nothing
    (it once emptied the cache, and every token after a whole accepted block was wrong)."""
    cache = StaticKVCache(1, 1, 4, torch.float32, torch.device("cpu"), capacity=8)
    cache.length = 6
    cache.crop(0)
    assert cache.length == 6
    cache.crop(-2)
    assert cache.length == 4
