"""The engine's fast path: a lean batch-1 decoder for the common Llama-family layout.

At batch 1 a decode step should cost about the time to read the weights once (on the 2-core dev
box: ~26 ms for SmolLM2-135M in fp32), and a verify pass of 8 tokens not much more. transformers'
generic forward adds a fixed cost on top: a mask builder, a growing `DynamicCache` (a `torch.cat`
per layer and step), three q/k/v and two gate/up projections per layer. This module runs the
same weights with:

- fused projections: one q|k|v and one gate|up matrix per layer (copies made once at load);
- a preallocated KV cache that crops by moving its length (`StaticKVCache.crop`);
- the model's own rotary-embedding module, so every rope-scaling variant stays exact;
- the LM head only on the positions the caller keeps (`logits_to_keep`).

It is a drop-in for the HF model inside `Target` (same forward keywords, same output fields, same
`hidden_states` indexing), for the families whose decoder layer is exactly pre-norm RMSNorm ->
attention (optional q/k RMSNorm, optional q/k/v bias) -> RMSNorm -> SwiGLU: `SUPPORTED`. Gemma
(1 + w norms, soft-capping, sliding windows) and others keep the general path. Greedy outputs
match the general path token for token (tests/test_engine.py); logits agree to float rounding,
not bit for bit, because a fused matmul may sum in another order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# transformers 5.2x renamed the output's `past_key_values` field to `cache` (5.17 has the old name)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else \
    "past_key_values"


def lm_output(logits: Tensor, cache: Any, hidden: tuple[Tensor, ...] | None
              ) -> CausalLMOutputWithPast:
    """The model output transformers' own forward returns, under this version's field names."""
    return CausalLMOutputWithPast(logits=logits, hidden_states=hidden, **{_CACHE_FIELD: cache})


def supports(model: nn.Module) -> str | None:
    """None when `FastLM` can run `model`, else why not (one line)."""
    cfg = model.config.get_text_config()
    if cfg.model_type not in SUPPORTED:
        return f"model_type {cfg.model_type!r} is not one of {sorted(SUPPORTED)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the fast path is SwiGLU only)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.model_type != "qwen3":
        return "sliding-window attention"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    return None


class StaticKVCache:
    """Keys/values of every layer in one preallocated tensor each; `length` says what is valid.

    Cropping after a rejected draft is O(1): the stale tail is simply overwritten next time.
    Capacity doubles when a pass would overflow it.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 1024) -> None:
        shape = (layers, 1, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def reserve(self, extra: int) -> None:
        need = self.length + extra
        if need > self.k.shape[3]:
            cap = max(need, 2 * self.k.shape[3])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:3], cap, old.shape[4]))
                new[:, :, :, : self.length] = old[:, :, :, : self.length]
                setattr(self, name, new)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """transformers' semantics: a negative value removes that many positions from the end,
        0 removes nothing (the engine crops by 0 after a fully accepted block), a positive one
        is the length to keep."""
        self.length = self.length + max_length if max_length <= 0 else min(max_length, self.length)


def check_batch1(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    """The fast paths decode one unpadded sequence; say so instead of computing garbage."""
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        raise ValueError("fast path: batch 1 without padding only; use the general path")


@dataclass
class _Layer:
    """One decoder layer's weights, fused where it saves a matmul."""

    in_norm: Tensor
    post_norm: Tensor
    wqkv: Tensor  # [(h + 2 kv) * d, H]: q | k | v rows
    bqkv: Tensor | None
    wo: Tensor
    w13: Tensor  # [2 I, H]: gate | up rows
    w2: Tensor
    q_norm: Tensor | None  # Qwen3: RMSNorm over head_dim before rope
    k_norm: Tensor | None


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # as transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class FastLM(nn.Module):
    """A supported HF causal LM's weights behind a lean forward (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        why = supports(model)
        if why:
            raise ValueError(f"fast path: {why}; use the general path")
        cfg = model.config.get_text_config()
        base = model.get_decoder()
        self.hf = model  # keeps embeddings, final norm, LM head, rotary module and config
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.layers = [self._fuse(layer) for layer in base.layers[: cfg.num_hidden_layers]]

    @staticmethod
    @torch.no_grad()
    def _fuse(layer: nn.Module) -> _Layer:
        a, m = layer.self_attn, layer.mlp
        biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
        return _Layer(
            in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            bqkv=None if biases[0] is None else torch.cat(biases),
            wo=a.o_proj.weight, w13=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
            w2=m.down_proj.weight,
            q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
            k_norm=getattr(getattr(a, "k_norm", None), "weight", None))

    # what Target and the engine read from a model
    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.hf.get_decoder()

    def new_cache(self) -> StaticKVCache:
        p = self.layers[0].wqkv
        return StaticKVCache(len(self.layers), self.n_kv, self.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, past_key_values: StaticKVCache | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                use_cache: bool = True, output_hidden_states: bool = False,
                logits_to_keep: int = 0, **_: Any) -> CausalLMOutputWithPast:
        """Batch 1; `hidden_states[j + 1]` is layer j's output, the last entry is final-normed."""
        check_batch1(input_ids, attention_mask)
        cache = past_key_values if past_key_values is not None else self.new_cache()
        T, start = input_ids.shape[1], cache.length
        cache.reserve(T)
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]
        x = self.hf.get_input_embeddings()(input_ids)
        cos, sin = self.get_decoder().rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, T, d]: broadcast over heads
        # new token i (at start + i) sees cache positions <= start + i
        mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool,
                                              device=x.device).tril(start)
        hidden = [x] if output_hidden_states else None
        nq, nk, d = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w.in_norm, self.eps)
            q, k, v = F.linear(h, w.wqkv, w.bqkv).split([nq, nk, nk], dim=-1)
            q = q.view(1, T, self.n_heads, d).transpose(1, 2)  # [1, h, T, d]
            k = k.view(1, T, self.n_kv, d).transpose(1, 2)
            v = v.view(1, T, self.n_kv, d).transpose(1, 2)
            if w.q_norm is not None:
                q, k = _rms_norm(q, w.q_norm, self.eps), _rms_norm(k, w.k_norm, self.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[i, :, :, start: start + T] = k
            cache.v[i, :, :, start: start + T] = v
            att = F.scaled_dot_product_attention(
                q, cache.k[i, :, :, : start + T], cache.v[i, :, :, : start + T],
                attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
            x = x + F.linear(att.transpose(1, 2).reshape(1, T, nq), w.wo)
            gate, up = F.linear(_rms_norm(x, w.post_norm, self.eps), w.w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.w2)
            if hidden is not None:
                hidden.append(x)
        cache.length = start + T
        x = self.get_decoder().norm(x)
        if hidden is not None:
            hidden[-1] = x  # as transformers: the last entry is after the final norm
        keep = x[:, -logits_to_keep:] if logits_to_keep else x
        return lm_output(self.hf.get_output_embeddings()(keep), cache,
                         tuple(hidden) if hidden else None)
