"""A family-agnostic view of a Hugging Face causal LM as a DFlash target.

The draft needs four things from the target and nothing else: its token embedding (to embed the
block), its LM head (to turn draft states into logits), its hidden states at a few layers (the
context features) and its logits + KV cache (to verify). `Target` exposes exactly those, hiding
the per-family quirks (Gemma's embedding scale, Gemma2's final logit soft-capping, ...), so the
rest of the code never branches on the model family.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def default_target_layer_ids(num_layers: int, n: int) -> list[int]:
    """Reference rule for which target layers feed the draft.

    n == 1 takes the middle layer; otherwise n layers spread evenly from layer 1 to layer L-3
    (skipping the embedding-like first layer and the output-specialised last ones):
    round(1 + i * (L - 4) / (n - 1)) for i = 0..n-1. Qwen3-8B (L=36, n=5) -> [1, 9, 17, 25, 33].
    """
    if n < 1 or num_layers < 1:
        raise ValueError(f"need n >= 1 and num_layers >= 1, got n={n}, num_layers={num_layers}")
    if n == 1:
        return [num_layers // 2]
    ids = [round(1 + i * (num_layers - 4) / (n - 1)) for i in range(n)]
    return [min(max(j, 0), num_layers - 1) for j in ids]  # clamp for very shallow (test) targets


def config_rope_theta(cfg: Any) -> float:
    """rope_theta from a transformers config: v4 keeps it top-level, v5 in `rope_parameters`
    (Gemma3 nests one dict per attention type; the full-attention one is the global one)."""
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        if "rope_theta" in params:
            theta = params["rope_theta"]
        else:
            nested = params.get("full_attention") or next(iter(params.values()), {})
            theta = nested.get("rope_theta") if isinstance(nested, dict) else None
    return float(theta or 10000.0)


_RESERVED = re.compile(r"unused|reserved", re.IGNORECASE)


def _chat_template_text(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        return "\n".join(str(t) for t in tpl.values())
    return tpl or ""


def choose_mask_token_id(tokenizer: Any, vocab_size: int) -> int:
    """Pick the draft's mask token: an id the target never sees as ordinary text. Deterministic.

    Order of preference:
    1. the lowest-id added token whose name says it is unused/reserved (Gemma `<unused0>`,
       Llama-3 `<|reserved_special_token_0|>`): it exists for exactly this kind of purpose;
    2. the first spare embedding row past `len(tokenizer)` (Qwen-style padded vocabularies; the
       reference Qwen3 drafts do this): no text can ever tokenize to it;
    3. otherwise the HIGHEST-id special token that is not bos/eos/pad/unk and whose text does not
       occur in the chat template (for SmolLM2 that is `<empty_output>`, a code-pretraining marker
       that chat prompts do not contain). Highest id because families append their rarest markers
       last;
    4. as a last resort (tokenizers without spare special tokens, e.g. test toys): vocab_size - 1.
    """
    n_tok = len(tokenizer) if tokenizer is not None else vocab_size
    added: dict[int, Any] = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})

    reserved = sorted(i for i, t in added.items() if i < vocab_size and _RESERVED.search(str(t)))
    if reserved:
        return reserved[0]
    if vocab_size > n_tok:
        return n_tok
    if tokenizer is None:
        return vocab_size - 1

    excluded = {
        getattr(tokenizer, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    template = _chat_template_text(tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", None) or [])
    specials |= {i for i, t in added.items() if getattr(t, "special", False)}

    def usable(i: int) -> bool:
        text = tokenizer.convert_ids_to_tokens(i)
        return i < vocab_size and i not in excluded and bool(text) and text not in template

    candidates = sorted(i for i in specials if usable(i))
    if candidates:
        return candidates[-1]
    return vocab_size - 1


@dataclass
class TargetOutput:
    logits: Tensor  # [B, T, V] float32
    features: Tensor | None  # [B, T, n*H] concatenated target hidden states, or None
    past_key_values: Any  # the transformers cache object, updated in place


def _embed_scale(model: PreTrainedModel) -> float:
    """Factor the family's model forward applies to the embedding output, beyond the module.

    transformers >= 4.5x moved Gemma's sqrt(H) "normalizer" into a scaled embedding module (it
    has an `embed_scale` buffer), so we only multiply when the module does not already do it.
    Granite multiplies by `embedding_multiplier` inside its model forward.
    """
    cfg = model.config.get_text_config()
    emb = model.get_input_embeddings()
    if str(getattr(cfg, "model_type", "")).startswith("gemma") and not hasattr(emb, "embed_scale"):
        return math.sqrt(cfg.hidden_size)
    return float(getattr(cfg, "embedding_multiplier", None) or 1.0)


@dataclass(eq=False)
class Target:
    """A frozen causal LM seen through the narrow interface DFlash needs."""

    model: PreTrainedModel = field(repr=False)
    tokenizer: Any = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    hidden_size: int
    vocab_size: int
    embed_scale: float = field(init=False)
    final_logit_softcapping: float | None = field(init=False)
    logit_multiplier: float = field(init=False)
    cache_kwarg: str = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.model.config.get_text_config()
        # transformers 5.2x renamed the forward's `past_key_values` to `cache` (old name warns,
        # to be removed in 5.40); use whichever this version's forward declares.
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.embed_scale = _embed_scale(self.model)
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)
        # Cohere multiplies logits by `logit_scale`, Granite divides by `logits_scaling`.
        mult = float(getattr(cfg, "logit_scale", None) or 1.0)
        self.logit_multiplier = mult / float(getattr(cfg, "logits_scaling", None) or 1.0)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: Any = None) -> Target:
        """Wrap an in-memory model (frozen, eval mode); sizes are read from its config/weights."""
        model.eval().requires_grad_(False)
        cfg = model.config.get_text_config()
        param = next(model.parameters())
        return cls(
            model=model,
            tokenizer=tokenizer,
            device=param.device,
            dtype=param.dtype,
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        )

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings exactly as the target's first decoder layer sees them."""
        x = self.model.get_input_embeddings()(ids.to(self.device))
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [.., H] -> logits [.., V] as the target's own forward computes them.

        Gemma2/3 soft-cap: logits = cap * tanh(logits / cap).
        """
        head = self.model.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype))
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        ids: Tensor,
        past_key_values: Any = None,
        layer_ids: list[int] | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> TargetOutput:
        """One cached target pass; optionally also the concatenated features of `layer_ids`.

        `hidden_states[0]` is the embedding output, so target layer j is entry j + 1. (The last
        entry is after the final norm in transformers; the default layer ids never use it.)
        """
        out, features = self._run(
            self.model, ids, layer_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, **{self.cache_kwarg: past_key_values})
        cache = out.get("cache", None)
        if cache is None:
            cache = out.get("past_key_values", None)
        return TargetOutput(out.logits.float(), features, cache)

    __call__ = forward

    def hidden(self, ids: Tensor, attention_mask: Tensor | None = None,
               layer_ids: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
        """(final-normed last hidden [B, S, H], features of `layer_ids` or None): a training pass.

        Unlike `forward` it skips the LM head over every position and the KV cache: for feature
        extraction the head is ~20% of a small target's FLOPs and its float logits dominate
        memory. Apply `lm_head` to the positions that need logits.
        """
        out, features = self._run(self.model.get_decoder(), ids, layer_ids,
                                  attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, features

    def _run(self, module: nn.Module, ids: Tensor, layer_ids: list[int] | None,
             **kwargs: Any) -> tuple[Any, Tensor | None]:
        """module(ids) with hidden states when `layer_ids` asks for them; (output, features)."""
        out = module(input_ids=ids.to(self.device), output_hidden_states=layer_ids is not None,
                     **kwargs)
        features = None
        if layer_ids is not None:
            features = torch.cat([out.hidden_states[j + 1] for j in layer_ids], dim=-1)
        return out, features


def load_target(
    folder: str | Path, dtype: torch.dtype | None = None, device: str | None = None
) -> Target:
    """Load a local HF causal-LM folder as a frozen Target (bf16 on CUDA, fp32 on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return Target.from_model(model, tokenizer)
