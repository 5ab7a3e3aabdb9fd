"""SERVING.md: how to serve an exported DFlash draft, written beside its weights.

The text is generated from the folder's own config.json, so the block size, the vocabulary form
and the flags always match the files they sit next to. What each engine reads was checked by
reading its loader (docs/serving.md says which were run and which only read).
"""

from __future__ import annotations

from typing import Any

SERVING_NAME = "SERVING.md"


def serving_md(hf: dict[str, Any]) -> str:
    """The guide for one exported draft (``hf`` is its config.json)."""
    B = int(hf["block_size"])
    dc = hf.get("dflash_config") or {}
    K = hf.get("draft_vocab_size")
    reduced = K is not None and K != hf.get("vocab_size")
    vocab = (f"a reduced draft vocabulary of {K} tokens (vLLM's form: own `lm_head` [{K}, "
             f"{hf['hidden_size']}] in model.safetensors, `d2t` offsets in "
             "draft_vocab.safetensors: target id = i + d2t[i])") if reduced else \
        f"the target's full vocabulary ({hf.get('vocab_size')} tokens, no head of its own)"
    spec = ('{"method": "dflash", "model": "DRAFT_DIR", '
            f'"num_speculative_tokens": {B - 1}}}')
    lines = [
        "# Serving this DFlash draft",
        "",
        f"A {hf['num_hidden_layers']}-layer DFlash draft, block size {B}, drafting over {vocab}.",
        f"It needs the target it was trained on: {hf.get('num_target_layers')} layers, hidden "
        f"size {hf['hidden_size']}, features of target layers {dc.get('target_layer_ids')}, "
        f"mask token id {dc.get('mask_token_id')}. `DRAFT_DIR` is this folder, `TARGET` the "
        "target model.",
        "",
        "## vLLM (`method: dflash`)",
        "",
        "```bash",
        f"vllm serve TARGET --speculative-config '{spec}'",
        "```",
        "",
        f"`num_speculative_tokens` = block_size - 1 = {B - 1}. vLLM reads `architectures` "
        "(DFlashDraftModel), `dflash_config` (`mask_token_id`, `target_layer_ids`, `causal`, "
        "`use_swa`), `layer_types`, `rope_parameters`, and `draft_vocab_size` + `lm_head.weight` "
        "+ `d2t` (offsets, as for EAGLE-3) for a reduced vocabulary.",
        "",
        "## SGLang (`--speculative-algorithm DFLASH`)",
        "",
        "```bash",
        "python -m sglang.launch_server --model-path TARGET \\",
        "    --speculative-algorithm DFLASH --speculative-draft-model-path DRAFT_DIR \\",
        f"    --speculative-num-draft-tokens {B} --trust-remote-code",
        "```",
        "",
        f"`--speculative-num-draft-tokens` = block_size = {B}. SGLang reads `dflash_config` "
        "(`mask_token_id`, `target_layer_ids`), top-level `block_size`, `num_target_layers` "
        "and `rope_theta`; its early DFlash model file derived the target layers from "
        "`num_target_layers` alone. It ignores `d2t`: a reduced draft drafts over the full "
        "vocabulary there.",
        "",
        "## transformers (z-lab's reference API)",
        "",
        "```python",
        "from transformers import AutoModel",
        "draft = AutoModel.from_pretrained(DRAFT_DIR, trust_remote_code=True)  # modeling_dflash.py",
        "hidden = draft(position_ids=pos, noise_embedding=emb, target_hidden=features)",
        "logits = draft.compute_logits(hidden, target.lm_head)  # over target ids",
        "```",
        "",
        "The reference package (`pip install dflash==0.1.0`, `dflash.DFlashDraftModel`) loads "
        "the same folder (a reduced draft's `lm_head.weight` is then unexpected and ignored, "
        "and it drafts over the full vocabulary).",
    ]
    if reduced:
        lines += [
            "",
            "## Which tau to expect",
            "",
            "Engines without reduced-vocabulary support (SGLang, the reference) draft over the "
            "full vocabulary with this draft's hidden states. The benchmark measures both: "
            f"rows with `draft_vocab = {K}` (vLLM, this project's engine) and rows with "
            "`draft_vocab` NULL (full vocabulary).",
        ]
    return "\n".join(lines) + "\n"
