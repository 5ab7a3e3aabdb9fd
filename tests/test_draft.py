"""DFlash draft, target wrapper and classic draft on tiny random models (+ one real-model check)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dflash_models.classic import build_classic_draft, distill_loss
from dflash_models.draft import (
    DFlashDraft,
    DFlashDraftConfig,
    DraftKVCache,
    check_compatible,
    init_from_target,
)
from dflash_models.target import (
    Target,
    choose_mask_token_id,
    default_target_layer_ids,
    load_target,
)
from dflash_models.training import dflash_forward_train

VOCAB, HIDDEN, LAYERS = 96, 32, 6  # vocab unlike any layer width
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<tool>", "<extra>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def tiny_tokenizer(extra_specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level toy tokenizer: 40 words, then bos/eos/pad/chat markers and spare specials."""
    names = [f"w{i}" for i in range(40)] + SPECIALS + list(extra_specials)
    tk = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:] + list(extra_specials),
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=41,
        eos_token_id=42,
        pad_token_id=43,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, tie_word_embeddings=True))
    if family == "gemma":
        return GemmaForCausalLM(GemmaConfig(**common, head_dim=8))
    if family == "gemma2":
        return Gemma2ForCausalLM(
            Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0, sliding_window=16)
        )
    if family == "gemma3":
        return Gemma3ForCausalLM(
            Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=3.0, sliding_window=4)
        )
    raise ValueError(family)


def tiny_target(family: str = "llama") -> Target:
    return Target.from_model(tiny_model(family).float(), tiny_tokenizer())


def tiny_draft(target: Target, block_size: int = 4, seed: int = 0) -> DFlashDraft:
    torch.manual_seed(seed)
    cfg = DFlashDraftConfig.from_target(target, num_layers=2, block_size=block_size)
    return DFlashDraft(cfg).eval()


# --------------------------------------------------------------------------- target wrapper


def test_default_target_layer_ids_follow_reference_rule() -> None:
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(30, 4) == [1, 10, 18, 27]  # 1 + i * 26/3, rounded
    assert default_target_layer_ids(30, 1) == [15]
    assert default_target_layer_ids(28, 2) == [1, 25]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gemma2", "gemma3"])
def test_target_embed_head_and_features_match_model(family: str) -> None:
    target = tiny_target(family)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = target.model(ids, output_hidden_states=True)
        tout = target.forward(ids, layer_ids=[0, 2, 4])
        # Embedding incl. family scale (Gemma: sqrt(H)) = what the first decoder layer sees.
        torch.testing.assert_close(target.embed(ids), out.hidden_states[0])
        # LM head incl. soft-capping (Gemma2) on the final-normed state = the model's logits.
        torch.testing.assert_close(target.lm_head(out.hidden_states[-1]), out.logits)
    if family.startswith("gemma"):
        raw = target.model.get_input_embeddings().weight[ids]
        assert not torch.allclose(out.hidden_states[0], raw)  # the scale really is applied
    assert tout.logits.dtype == torch.float32 and tout.logits.shape == (2, 7, VOCAB)
    expected = torch.cat([out.hidden_states[j + 1] for j in [0, 2, 4]], dim=-1)
    torch.testing.assert_close(tout.features, expected)
    assert tout.past_key_values is not None
    assert target.forward(ids).features is None


def test_mask_token_id_preferences() -> None:
    tok = tiny_tokenizer()
    forbidden = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    # 1. spare embedding rows past the tokenizer: the first one.
    assert choose_mask_token_id(tok, len(tok) + 16) == len(tok)
    # 2. a reserved/unused special token wins over spare rows.
    tok_r = tiny_tokenizer(("<unused0>", "<unused1>"))
    assert tok_r.convert_ids_to_tokens(choose_mask_token_id(tok_r, VOCAB)) == "<unused0>"
    # 3. no spare rows: a special that is not bos/eos/pad/unk nor in the chat template.
    m = choose_mask_token_id(tok, len(tok))
    assert m not in forbidden | {tok.unk_token_id}
    assert tok.convert_ids_to_tokens(m) in {"<tool>", "<extra>"}
    assert tok.convert_ids_to_tokens(m) not in TEMPLATE
    assert choose_mask_token_id(tok, len(tok)) == m  # deterministic


# --------------------------------------------------------------------------- DFlash draft


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_draft_shapes(family: str) -> None:
    target = tiny_target(family)
    draft = tiny_draft(target, block_size=4)
    cfg = draft.config
    assert cfg.target_layer_ids == default_target_layer_ids(LAYERS, 4)
    assert cfg.mask_token_id == 48  # first spare embedding row past the toy tokenizer
    ids = torch.randint(0, 40, (1, 9))
    feats = target.forward(ids, layer_ids=cfg.target_layer_ids).features
    assert feats.shape == (1, 9, 4 * HIDDEN)
    context = draft.project_context(feats)
    assert context.shape == (1, 9, HIDDEN)
    block = torch.tensor([[int(ids[0, -1])] + [cfg.mask_token_id] * 3])
    hidden = draft(target.embed(block), context, torch.arange(9, 13), torch.arange(9))
    assert hidden.shape == (1, 4, HIDDEN)
    assert target.lm_head(hidden).shape == (1, 4, VOCAB)
    # no embedding / LM head of its own
    assert all(p.shape[0] != VOCAB for p in draft.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_init_from_target_continues_the_last_layers(family: str) -> None:
    target = tiny_target(family)
    decoder = target.model.get_decoder()
    with torch.no_grad():  # non-trivial norm weights, so the effective scale is visible
        for n in [decoder.norm] + [m for m in decoder.modules() if "Norm" in type(m).__name__]:
            n.weight.uniform_(0.5, 1.5)
    draft = tiny_draft(target)  # 2 layers <- target layers L-2, L-1
    done = init_from_target(draft, target)
    linear = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {f"layers.{i}.{n}" for i in range(2) for n in linear} <= set(done)
    assert {"norm", "hidden_norm", "fc", "layers.1.input_layernorm"} <= set(done)
    assert ("layers.0.self_attn.q_norm" in done) == (family == "qwen3")  # only Qwen3 has them
    src = decoder.layers
    for i, n in ((0, "mlp.down_proj"), (1, "self_attn.k_proj")):
        assert torch.equal(draft.layers[i].get_submodule(n).weight,
                           src[LAYERS - 2 + i].get_submodule(n).weight)
    # a norm's effective scale, whatever the family's convention (Gemma: 1 + w)
    w = src[LAYERS - 1].input_layernorm.weight
    want = 1 + w if family == "gemma" else w
    assert torch.allclose(draft.layers[1].input_layernorm.weight, want, atol=1e-4)
    x = torch.randn(3, HIDDEN)
    assert torch.allclose(draft.norm(x), decoder.norm(x), atol=1e-4)
    # fc passes the deepest fused layer's features through
    ids = draft.config.target_layer_ids
    j = ids.index(max(ids))
    assert torch.allclose(draft.fc.weight[:, j * HIDDEN:(j + 1) * HIDDEN],
                          torch.eye(HIDDEN), atol=0.02)


def test_no_leakage_from_features_at_or_after_anchor() -> None:
    target = tiny_target("qwen3")
    draft = tiny_draft(target, block_size=4)
    S, B = 14, 4
    ids = torch.randint(0, 40, (1, S))
    feats = torch.randn(1, S, 4 * HIDDEN)
    anchors = torch.tensor([3, 7, 10])
    with torch.no_grad():
        base = dflash_forward_train(draft, target, ids, feats, anchors)
        later = feats.clone()
        later[:, 7:] += torch.randn_like(later[:, 7:])  # positions >= anchor 7
        out = dflash_forward_train(draft, target, ids, later, anchors)
        # future tokens (the labels) must not leak either: only anchor tokens enter the blocks
        ids2 = ids.clone()
        ids2[0, 8:10] = (ids2[0, 8:10] + 1) % 40
        out_ids = dflash_forward_train(draft, target, ids2, feats, anchors)
        earlier = feats.clone()
        earlier[:, 5] += 1.0  # position < anchor 7
        out_early = dflash_forward_train(draft, target, ids, earlier, anchors)
    blk = lambda x, n: x[:, n * B : (n + 1) * B]  # noqa: E731
    torch.testing.assert_close(blk(out, 0), blk(base, 0))
    torch.testing.assert_close(blk(out, 1), blk(base, 1))
    assert not torch.allclose(blk(out, 2), blk(base, 2))
    torch.testing.assert_close(blk(out_ids, 0), blk(base, 0))
    torch.testing.assert_close(blk(out_ids, 1), blk(base, 1))
    torch.testing.assert_close(blk(out_early, 0), blk(base, 0))
    assert not torch.allclose(blk(out_early, 1), blk(base, 1))


def test_incremental_cache_matches_full_forward() -> None:
    target = tiny_target("llama")
    draft = tiny_draft(target, block_size=4)
    feats = torch.randn(1, 12, 4 * HIDDEN)
    block = target.embed(torch.tensor([[5, 50, 50, 50]]))
    ctx = draft.project_context(feats)
    with torch.no_grad():
        full = draft(block, ctx, torch.arange(12, 16), torch.arange(12))
        cache = DraftKVCache()
        draft(block, ctx[:, :7], torch.arange(7, 11), torch.arange(7), cache=cache)
        assert len(cache) == 7  # context only, never block k/v
        step = draft(block, ctx[:, 7:], torch.arange(12, 16), torch.arange(7, 12), cache=cache)
        assert len(cache) == 12
        torch.testing.assert_close(step, full)
        # rejection: drop the last 3 context positions and feed them again
        cache.crop(9)
        assert len(cache) == 9
        again = draft(block, ctx[:, 9:], torch.arange(12, 16), torch.arange(9, 12), cache=cache)
    torch.testing.assert_close(again, full)


def test_export_load_roundtrip(tmp_path) -> None:
    target = tiny_target("qwen3")
    draft = tiny_draft(target, block_size=4, seed=3)
    draft.export(tmp_path / "draft")
    loaded = DFlashDraft.load(tmp_path / "draft")
    feats = torch.randn(1, 6, 4 * HIDDEN)
    block = target.embed(torch.tensor([[5, 50, 50, 50]]))
    with torch.no_grad():
        a = draft(block, draft.project_context(feats), torch.arange(6, 10), torch.arange(6))
        b = loaded(block, loaded.project_context(feats), torch.arange(6, 10), torch.arange(6))
    assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == LAYERS
    assert cfg["dflash_config"] == {
        "mask_token_id": draft.config.mask_token_id,
        "target_layer_ids": draft.config.target_layer_ids,
        "causal": False,
        "use_swa": False,
    }
    layer_keys = "hidden_size intermediate_size num_hidden_layers num_attention_heads "
    layer_keys += "num_key_value_heads head_dim rms_norm_eps rope_theta vocab_size"
    assert set(layer_keys.split()) <= set(cfg)
    weights = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert "fc.weight" in weights and "norm.weight" in weights
    assert not any("embed" in k or "lm_head" in k for k in weights)
    assert all(VOCAB not in t.shape for t in weights.values())
    assert loaded.config == draft.config


def test_check_compatible() -> None:
    target = tiny_target("llama")
    cfg = DFlashDraftConfig.from_target(target, num_layers=1, block_size=4)
    check_compatible(cfg, target)  # passes
    wide = DFlashDraftConfig(**{**vars(cfg), "hidden_size": HIDDEN * 2})
    with pytest.raises(ValueError, match="hidden_size"):
        check_compatible(wide, target)
    with pytest.raises(ValueError, match="vocab"):
        check_compatible(DFlashDraftConfig(**{**vars(cfg), "vocab_size": VOCAB + 1}), target)
    with pytest.raises(ValueError, match="out of range"):
        check_compatible(DFlashDraftConfig(**{**vars(cfg), "target_layer_ids": [1, 99]}), target)


def test_real_smollm2_target(smollm2_dir) -> None:
    """The packaged SmolLM2: sizes, layer rule, mask token and a draft that fits it."""
    target = load_target(smollm2_dir, device="cpu")
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (30, 576, 49152)
    tok = target.tokenizer
    cfg = DFlashDraftConfig.from_target(target, num_layers=1, block_size=8)
    assert cfg.target_layer_ids == [1, 10, 18, 27]
    assert cfg.mask_token_id not in {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert tok.convert_ids_to_tokens(cfg.mask_token_id) not in tok.chat_template
    assert cfg.mask_token_id not in tok("Hello, how are you? <|im_end|>")["input_ids"]
    check_compatible(cfg, target)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = target.forward(ids, layer_ids=cfg.target_layer_ids)
        hs = target.model(ids, output_hidden_states=True).hidden_states
    assert out.features.shape == (1, ids.shape[1], 4 * 576)
    torch.testing.assert_close(target.embed(ids), hs[0])


# --------------------------------------------------------------------------- classic draft


def test_classic_draft_roundtrip_and_assistant_generate(tmp_path) -> None:
    target = tiny_target("llama")
    draft = build_classic_draft(target, num_layers=1)
    assert draft.config.vocab_size == VOCAB
    ids = torch.randint(0, 40, (1, 6))
    torch.testing.assert_close(draft.get_input_embeddings()(ids), target.embed(ids))
    draft.save_pretrained(tmp_path / "classic")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "classic").eval()
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, reloaded(ids).logits)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=43)
        plain = target.model.generate(ids, **kw)
        assisted = target.model.generate(ids, assistant_model=reloaded, **kw)
    assert torch.equal(plain, assisted)  # greedy assisted decoding is lossless


def test_classic_draft_narrow_and_gemma_scale() -> None:
    gemma = tiny_target("gemma")
    draft = build_classic_draft(gemma, num_layers=1)
    ids = torch.randint(0, 40, (1, 5))
    # Llama applies no embedding scale, so the copied rows carry Gemma's sqrt(H).
    torch.testing.assert_close(draft.get_input_embeddings()(ids), gemma.embed(ids))
    narrow = build_classic_draft(tiny_target("llama"), num_layers=1, hidden_size=16)
    assert narrow.config.hidden_size == 16
    assert narrow(ids).logits.shape == (1, 5, VOCAB)


def test_distill_loss() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5)
    student = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    assert distill_loss(teacher, teacher, mask).abs() < 1e-6
    p, q = teacher.softmax(-1), student.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(distill_loss(student, teacher, mask), kl[mask].mean())
    student2 = student.clone()
    student2[0, 2] += 10.0  # masked-out position does not matter
    torch.testing.assert_close(distill_loss(student2, teacher, mask), kl[mask].mean())
