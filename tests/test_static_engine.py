"""The fixed-shape fast path (StaticLM + FastDraft) against the eager engine, and bench/gpu_check.

(Its single passes against the general path: tests/test_fast_target.py, `static` cases.)

CUDA graphs cannot run here; what makes them possible can: fixed shapes, a cache sized at start,
per-step values as tensors. Every pass below runs that code; `torch.compile(backend="eager",
fullgraph=True)` proves it traces as one graph (no `.item()`, no data-dependent Python), which is
what capture needs, at no compile cost.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from dflash_models.engine import GenerationConfig, generate_ar, generate_dflash, new_cache
from dflash_models.fast_draft import EagerDrafter, FastDraft
from dflash_models.static_lm import StaticLM
from dflash_models.target import Target

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, BLOCK, MAX_LEN = [0, 2], 4, 96


def tiny(family: str) -> torch.nn.Module:
    """Peaked random logits (large init): greedy paths never sit on a near-tie."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=256, initializer_range=0.3)
    model = (LlamaForCausalLM(LlamaConfig(**common, attention_bias=True)) if family == "llama"
             else Qwen3ForCausalLM(Qwen3Config(**common)))
    model.generation_config.eos_token_id = None
    return model.eval()


def tiny_draft(target: Target) -> DFlashDraft:
    torch.manual_seed(1)
    return DFlashDraft(DFlashDraftConfig.from_target(
        target, num_layers=2, block_size=BLOCK, target_layer_ids=LAYERS)).eval()


def oracle(drafter: EagerDrafter | FastDraft, full: list[int]) -> tuple[list[int], object]:
    """Wrap a drafter: its real pass runs, then the reference continuation is proposed with a
    wrong token in every third block, so accepts of every length (whole blocks too) happen.
    Returns (the real proposals seen, the wrapped drafter)."""
    seen: list[int] = []
    calls = [0]

    class Oracle:
        config, draft_ids = drafter.config, drafter.draft_ids

        def reset(self) -> None:
            drafter.reset()

        def propose(self, feats: torch.Tensor, start: int, ids: torch.Tensor) -> list[int]:
            seen.extend(drafter.propose(feats, start, ids))
            pos, calls[0] = start + feats.shape[1], calls[0] + 1
            toks = full[pos + 1: pos + ids.shape[1]]
            toks += [0] * (ids.shape[1] - 1 - len(toks))
            if calls[0] % 3 == 0:
                toks[calls[0] % len(toks)] = (toks[calls[0] % len(toks)] + 1) % 64
            return toks

    return seen, Oracle()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fast_engine_equals_the_eager_engine(family: str) -> None:
    """Same tokens, same acceptance lengths, same draft proposals: the fast path changes only
    the time a step takes."""
    model = tiny(family)
    general = Target.from_model(model)
    static = Target.from_model(StaticLM(model, MAX_LEN, graph_tokens=(1, BLOCK)))
    draft = tiny_draft(general)
    prompt, cfg = list(range(3, 15)), GenerationConfig(max_new_tokens=40)
    ref = generate_ar(general, prompt, cfg).output_ids
    assert generate_ar(static, prompt, cfg).output_ids == ref
    fast_draft = FastDraft(static, draft, MAX_LEN)
    runs = {}
    for name, target, drafter in (("eager", general, EagerDrafter(general, draft)),
                                  ("fast", static, fast_draft)):
        seen, wrapped = oracle(drafter, prompt + ref)
        res = generate_dflash(target, wrapped, prompt, cfg)
        assert res.output_ids == ref, name
        runs[name] = (res.accepted_lengths, seen)
        assert generate_dflash(target, drafter, prompt, cfg).output_ids == ref, name
    assert runs["fast"] == runs["eager"]
    assert BLOCK in runs["fast"][0] and max(runs["fast"][0]) > 1  # whole blocks were accepted


def test_passes_trace_as_one_graph() -> None:
    """The layer and the draft step compile with fullgraph=True (backend eager: no codegen)."""
    model = tiny("qwen3")
    general = Target.from_model(model)
    static = Target.from_model(StaticLM(model, MAX_LEN, graph_tokens=(1, BLOCK),
                                        compile="eager"))
    draft = tiny_draft(general)
    fast_draft = FastDraft(static, draft, MAX_LEN)
    fast_draft._step = torch.compile(fast_draft._step, backend="eager", fullgraph=True)
    prompt, cfg = list(range(3, 15)), GenerationConfig(max_new_tokens=24)
    ref = generate_ar(general, prompt, cfg).output_ids
    assert generate_ar(static, prompt, cfg).output_ids == ref
    assert generate_dflash(static, fast_draft, prompt, cfg).output_ids == ref


def test_a_full_static_cache_says_what_to_do() -> None:
    static = Target.from_model(StaticLM(tiny("llama"), 16))
    cache = new_cache(static.model)
    static.forward(torch.arange(3, 15)[None], past_key_values=cache)
    with pytest.raises(ValueError, match="max_len 16"):
        static.forward(torch.arange(3, 8)[None], past_key_values=cache)
    with pytest.raises(ValueError, match="own cache"):
        static.forward(torch.arange(3, 8)[None], past_key_values=object())


def test_gpu_check_tiny_runs_on_cpu(load_bench) -> None:
    """The device script's whole path at the tiny shape: one JSON record, lossless."""
    res = load_bench("gpu_check").main(["--tiny", "--repeats", "2", "--new-tokens", "24",
                                        "--prompt-tokens", "40", "--prompts", "2"])
    assert res["device"] == "cpu" and res["best_path"] == "fast" and not res["skipped"]
    assert res["hardware_tag"].startswith("cpu-") and res["hardware"]["device_type"] == "cpu"
    assert res["lossless"]["exact_match"] == 1.0
    oracle_taus = [r["tau"] for r in res["lossless"]["runs"] if r["method"] == "dflash_oracle"]
    assert len(oracle_taus) == 2 and min(oracle_taus) > 2
    for path in ("eager", "fast"):
        model = res[f"model_{path}"]
        assert res[f"decode_ms_{path}"] > 0 and set(model["predicted_speedup"]) == \
            {"2.0", "4.0", "6.5"}
    assert res["train_tokens_per_s"] > 0 and res["draft_params"] > 0
