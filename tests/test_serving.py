"""Exported drafts load and run as trained wherever a DFlash draft is loaded.

Checked against z-lab's reference class (`dflash==0.1.0`, installed apart by `make install` into
.venv/reference, put first on sys.path here) and through `AutoModel(trust_remote_code=True)`
with the modeling file shipped in the folder; vLLM's reduced-vocabulary form (own `lm_head`,
`d2t` offsets) is replayed by hand. Random drafts shaped for the packaged SmolLM2 target.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dflash_models.blocks import VocabHead
from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from tasks import bench_methods as bm

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / ".venv" / "reference"
BLOCK, K = 4, 256
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_module")]


@pytest.fixture(scope="module")
def Ref() -> Any:
    """The reference class, imported from .venv/reference (never from the project's venv)."""
    if not (REFERENCE / "dflash" / "model.py").is_file():
        pytest.fail(f"{REFERENCE} has no dflash package: run `make install`")
    sys.path.insert(0, str(REFERENCE))
    try:
        from dflash.model import DFlashDraftModel
    finally:
        sys.path.remove(str(REFERENCE))
    assert Path(sys.modules["dflash.model"].__file__).is_relative_to(REFERENCE)
    return DFlashDraftModel


@pytest.fixture(scope="module")
def target(smollm2_dir: Path) -> Any:
    from dflash_models.target import load_target

    return load_target(smollm2_dir, device="cpu")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, target: Any) -> dict[str, Any]:
    """A full-vocabulary and a reduced-vocabulary (K ids) random 1-layer draft, exported."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    draft = DFlashDraft(DFlashDraftConfig.from_target(target, num_layers=1, block_size=BLOCK))
    draft.export(root / "full")
    ids = torch.randperm(target.vocab_size)[:K].sort().values
    draft.draft_ids = ids
    draft.export(root / "reduced", lm_head=VocabHead(target, ids).weight)
    draft.draft_ids = None
    return {"draft": draft.eval(), "ids": ids, "full": root / "full", "reduced": root / "reduced"}


def _inputs(target: Any, layer_ids: list[int], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target features of a real prompt and a block [anchor, mask, ...] right after it."""
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = torch.tensor([target.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        feats = target.forward(ids, layer_ids=layer_ids).features
    block = torch.full((1, BLOCK), mask_id)
    block[0, 0] = int(ids[0, -1])
    return feats, block


@torch.no_grad()
def _project_hidden(draft: DFlashDraft, target: Any, feats: torch.Tensor,
                    block: torch.Tensor) -> torch.Tensor:
    S, T = feats.shape[1], block.shape[1]
    return draft(target.embed(block), draft.project_context(feats), torch.arange(S, S + T)[None],
                 torch.arange(S)[None])[:, 1:]


@torch.no_grad()
def _reference_hidden(model: Any, target: Any, feats: torch.Tensor,
                      block: torch.Tensor) -> torch.Tensor:
    """The reference's call: positions cover context then block; hidden of the mask rows."""
    pos = torch.arange(feats.shape[1] + block.shape[1])[None]
    return model(position_ids=pos, noise_embedding=target.embed(block),
                 target_hidden=feats)[:, 1:]


def test_export_carries_the_fields_engines_read(exports: dict[str, Any], target: Any) -> None:
    full = json.loads((exports["full"] / "config.json").read_text())
    assert full["auto_map"] == {"AutoModel": "modeling_dflash.DFlashDraftModel"}
    assert full["dflash_config"]["causal"] is False and full["dflash_config"]["use_swa"] is False
    assert full["layer_types"] == ["full_attention"]
    assert full["block_size"] == BLOCK and full["num_target_layers"] == target.num_layers
    assert "draft_vocab_size" not in full and not (exports["full"] / "draft_vocab.safetensors"
                                                   ).exists()
    serving = (exports["full"] / "SERVING.md").read_text()
    assert f'"num_speculative_tokens": {BLOCK - 1}' in serving
    assert f"--speculative-num-draft-tokens {BLOCK}" in serving
    # vLLM's reduced form: draft_vocab_size, own head = the target's rows, d2t = offsets
    red = json.loads((exports["reduced"] / "config.json").read_text())
    assert red["draft_vocab_size"] == K and red["vocab_size"] == target.vocab_size
    weights = load_file(str(exports["reduced"] / "model.safetensors"))
    d2t = load_file(str(exports["reduced"] / "draft_vocab.safetensors"))["d2t"]
    assert torch.equal(torch.arange(K) + d2t, exports["ids"])
    head = target.model.get_output_embeddings().weight
    assert torch.equal(weights["lm_head.weight"], head[torch.arange(K) + d2t])
    assert "Which tau to expect" in (exports["reduced"] / "SERVING.md").read_text()


def test_export_dtype(exports: dict[str, Any], tmp_path: Path) -> None:
    """`train.export_dtype`: the weights on disk and the config's dtype follow it."""
    folder = exports["draft"].export(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(folder / "model.safetensors")).values()} == {
        torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert DFlashDraft.load(folder).fc.weight.dtype == torch.bfloat16
    assert exports["draft"].fc.weight.dtype == torch.float32  # exporting does not cast the draft


@pytest.mark.parametrize("form", ["full", "reduced"])
def test_reference_class_and_automodel_give_the_projects_logits(
        exports: dict[str, Any], target: Any, Ref: Any, form: str) -> None:
    from transformers import AutoModel

    draft = exports["draft"]
    folder = exports[form]
    feats, block = _inputs(target, draft.config.target_layer_ids, draft.config.mask_token_id)
    ours = _project_hidden(draft, target, feats, block)
    full_logits = target.lm_head(ours)
    head = target.model.get_output_embeddings()

    ref, info = Ref.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) <= ({"lm_head.weight"} if form == "reduced" else set())
    # the reference ignores the reduced head: it drafts over the full vocabulary
    ref_logits = ref.eval().compute_logits(_reference_hidden(ref, target, feats, block), head)
    torch.testing.assert_close(ref_logits, full_logits, rtol=0, atol=1e-5)
    assert torch.equal(ref_logits.argmax(-1), full_logits.argmax(-1))

    auto = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(auto).__name__ == "DFlashDraftModel" and type(auto).__module__.endswith(
        "modeling_dflash")
    assert {n for n, _ in auto.named_children()} >= {"layers", "fc", "hidden_norm", "norm"}
    auto_logits = auto.compute_logits(_reference_hidden(auto, target, feats, block), head)
    if form == "full":
        torch.testing.assert_close(auto_logits, full_logits, rtol=0, atol=1e-5)
        return
    # vLLM's form (own lm_head, target id = i + d2t[i]) reproduces the reduced proposals
    ids = exports["ids"]
    vocab_head = VocabHead(target, ids)
    reduced = vocab_head.logits(ours)
    torch.testing.assert_close(auto_logits[..., ids], reduced, rtol=0, atol=1e-5)
    assert bool(torch.isinf(auto_logits).sum(-1).eq(target.vocab_size - K).all())
    proposals = vocab_head.to_target(reduced.argmax(-1))
    assert torch.equal(auto_logits.argmax(-1), proposals)
    d2t = load_file(str(folder / "draft_vocab.safetensors"))["d2t"]
    small = torch.nn.functional.linear(ours, load_file(str(folder / "model.safetensors"))[
        "lm_head.weight"])
    assert torch.equal(small.argmax(-1) + d2t[small.argmax(-1)], proposals)


def test_automodel_cache_path_equals_one_pass(exports: dict[str, Any], target: Any) -> None:
    """The reference loop's use of a draft cache (context k/v kept, block k/v cropped away)
    gives what one uncached pass over the whole context gives."""
    from transformers import AutoModel, DynamicCache

    auto = AutoModel.from_pretrained(exports["full"], trust_remote_code=True).eval()
    feats, block = _inputs(target, auto.target_layer_ids, auto.mask_token_id)
    emb, S, s1 = target.embed(block), feats.shape[1], feats.shape[1] // 2
    with torch.no_grad():
        whole = auto(position_ids=torch.arange(S + BLOCK)[None], noise_embedding=emb,
                     target_hidden=feats)
        cache = DynamicCache(config=auto.config)
        auto(position_ids=torch.arange(s1 + BLOCK)[None], noise_embedding=emb,
             target_hidden=feats[:, :s1], past_key_values=cache, use_cache=True)
        cache.crop(-BLOCK)  # drop the block's k/v: only verified context stays
        assert cache.get_seq_length() == s1
        split = auto(position_ids=torch.arange(s1, S + BLOCK)[None], noise_embedding=emb,
                     target_hidden=feats[:, s1:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_old_form_folder_loads_with_the_same_draft(exports: dict[str, Any], tmp_path: Path,
                                                   target: Any) -> None:
    """The first reduced form (d2t = absolute ids, no head, no draft_vocab_size) still loads."""
    old = tmp_path / "old"
    shutil.copytree(exports["reduced"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["draft_vocab_size"]
    (old / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(old / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(old / "model.safetensors"))
    save_file({"d2t": exports["ids"].clone()}, str(old / "draft_vocab.safetensors"))
    got_old, got_new = DFlashDraft.load(old), bm.load_dflash(exports["reduced"], target)
    assert torch.equal(got_old.draft_ids, exports["ids"])
    assert torch.equal(got_new.draft_ids, exports["ids"]) and got_old.head_rows is None
    for a, b in zip(got_old.state_dict().values(), got_new.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a head of its own that is not the target's rows would be silently ignored: refused
    other = tmp_path / "other-head"
    shutil.copytree(exports["reduced"], other)
    weights = load_file(str(other / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    save_file(weights, str(other / "model.safetensors"))
    from storage import DflashError

    with pytest.raises(DflashError, match="lm_head is not the target's head"):
        bm.load_dflash(other, target)


def _reference_saved(Ref: Any, target: Any, folder: Path, seed: int, hub: bool) -> Path:
    """A random draft saved by the reference class: plain, or the hub layout (auto_map +
    dflash.py, and no target_layer_ids: the reference's default spread is used)."""
    from transformers import Qwen3Config

    c = DFlashDraftConfig.from_target(target, num_layers=1, block_size=BLOCK)
    dflash = {"mask_token_id": c.mask_token_id}
    if not hub:
        dflash["target_layer_ids"] = c.target_layer_ids
    config = Qwen3Config(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=1,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size, num_target_layers=c.num_target_layers,
        block_size=BLOCK, dflash_config=dflash, architectures=["DFlashDraftModel"],
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    torch.manual_seed(seed)
    Ref(config).save_pretrained(folder)
    if hub:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoModel": "dflash.DFlashDraftModel"}
        (folder / "config.json").write_text(json.dumps(cfg))
        shutil.copy(REFERENCE / "dflash" / "model.py", folder / "dflash.py")
    return folder


def test_reference_saved_folders_bench_lossless_with_the_references_proposals(
        tmp_path: Path, target: Any, Ref: Any, smollm2_dir: Path) -> None:
    from flows.cli import main

    head = target.model.get_output_embeddings()
    for hub in (False, True):
        folder = _reference_saved(Ref, target, tmp_path / f"ref-{hub}", seed=1 + hub, hub=hub)
        ours = bm.load_dflash(folder, target)
        ref = Ref.from_pretrained(folder).eval()
        assert ours.config.target_layer_ids == list(ref.target_layer_ids)
        feats, block = _inputs(target, ours.config.target_layer_ids, ours.config.mask_token_id)
        want = ref.compute_logits(_reference_hidden(ref, target, feats, block), head).argmax(-1)
        assert torch.equal(target.lm_head(_project_hidden(ours, target, feats, block)).argmax(-1),
                           want)
    # `dflash bench --draft` on the hub layout (the plain folder loads through the same path)
    cfg = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    cfg["benchmark"].update(methods=["hf_generate", "dflash"], max_new_tokens=12,
                            warmup_prompts=0, block_sizes=[])
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    assert main(["bench", "--draft", str(folder), "--target", str(smollm2_dir),
                 "--config", str(cfg_path), "--store", str(store)]) == 0
    rows = pq.read_table(next((store / "benchmarks" / "summary").rglob("*.parquet"))).to_pylist()
    dflash = [r for r in rows if r["method"] == "dflash"]
    assert len(dflash) == 1 and dflash[0]["block_size"] == BLOCK
    assert dflash[0]["exact_match_rate"] == 1.0 and dflash[0]["draft_vocab"] is None


def test_reduced_draft_is_benchmarked_over_both_vocabularies(
        exports: dict[str, Any], target: Any, tmp_path: Path) -> None:
    from storage import Store
    from tasks.benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(datasets=["mt_bench"], n_prompts=1, max_new_tokens=12, warmup_prompts=0,
                      methods=["hf_generate", "dflash"])
    res = run_benchmark(Store(str(tmp_path / "store")), cfg, target,
                        draft_folder=exports["reduced"])
    dflash = {r["draft_vocab"]: r for r in res["rows"] if r["method"] == "dflash"}
    assert set(dflash) == {K, None}
    assert all(r["exact_match_rate"] == 1.0 and r["tau"] >= 1.0 for r in dflash.values())
    samples = pq.read_table(str(tmp_path / "store" / res["samples_path"])).to_pylist()
    assert {s["draft_vocab"] for s in samples if s["method"] == "dflash"} == {K, None}
