"""DFlash draft for `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

This file is copied verbatim into every exported draft folder (``config.json`` names it in
``auto_map``), so it imports torch and transformers only, never this project. It computes what
``dflash_models/draft.py`` computes, with the module names of z-lab's reference
(``DFlashDraftModel``: ``layers``, ``fc``, ``hidden_norm``, ``norm``) and its call signature:

    hidden = model(position_ids=[B, S+T] (context, then block), noise_embedding=[B, T, H]
                   (target embeddings of [anchor, mask, ...]), target_hidden=[B, S, n*H]
                   (target features), past_key_values=optional DynamicCache)
    logits = model.compute_logits(hidden, target_lm_head)   # [B, T, V] over TARGET ids

The draft owns no embedding. With a reduced draft vocabulary (config ``draft_vocab_size`` K)
it owns ``lm_head`` [K, H] (the target's rows) and ``d2t`` offsets (draft index i drafts target
id i + d2t[i], vLLM's EAGLE-3 convention, read from ``draft_vocab.safetensors``);
``compute_logits`` then puts the K logits at their target ids and -inf elsewhere, so an argmax
is a target id either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen3Config

VOCAB_FILE = "draft_vocab.safetensors"


def _dflash(config: object, name: str, default: object = None) -> object:
    """A field from ``dflash_config``, else the top level (the reference reads both)."""
    return (getattr(config, "dflash_config", None) or {}).get(
        name, getattr(config, name, default))


def _rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


class DFlashRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, d], cos/sin [B, L, d] float32; math in float32, result in x's dtype."""
    xf = x.float()
    return (xf * cos[:, None] + _rotate_half(xf) * sin[:, None]).to(x.dtype)


class DFlashAttention(nn.Module):
    """Queries from the block; keys/values from [context ++ block], no mask (bidirectional)."""

    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or H // self.heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(H, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, H, bias=bias)
        qk = getattr(config, "qk_norm", True)
        eps = config.rms_norm_eps
        self.q_norm = DFlashRMSNorm(self.head_dim, eps) if qk else nn.Identity()
        self.k_norm = DFlashRMSNorm(self.head_dim, eps) if qk else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: object = None) -> torch.Tensor:
        B, T, _ = x.shape
        S = ctx.shape[1]
        both = torch.cat([ctx, x], dim=1)
        k = self.k_norm(self.k_proj(both).view(B, S + T, self.kv_heads, self.head_dim))
        v = self.v_proj(both).view(B, S + T, self.kv_heads, self.head_dim).transpose(1, 2)
        k = _rotary(k.transpose(1, 2), cos, sin)
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        q = _rotary(q.transpose(1, 2), cos[:, S:], sin[:, S:])
        if cache is not None:  # a transformers Cache: earlier context k/v, rotary applied
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class DFlashMLP(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        H, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = DFlashRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config, layer_idx)
        self.post_attention_layernorm = DFlashRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DFlashMLP(config)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: object = None) -> torch.Tensor:
        # The context is not normed here: hidden_norm normed it once, after fc.
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(PreTrainedModel):
    config_class = Qwen3Config
    base_model_prefix = "dflash"
    _no_split_modules = ["DFlashDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"^d2t$", r"^t2d$"]

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        H = config.hidden_size
        self.target_layer_ids = list(_dflash(config, "target_layer_ids"))
        self.mask_token_id = _dflash(config, "mask_token_id")
        self.block_size = int(_dflash(config, "block_size", 16))
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(self.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = DFlashRMSNorm(H, config.rms_norm_eps)
        self.norm = DFlashRMSNorm(H, config.rms_norm_eps)
        self.head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
        k = getattr(config, "draft_vocab_size", None)
        self.draft_vocab_size = int(k) if k and int(k) != config.vocab_size else None
        self.lm_head = nn.Linear(H, self.draft_vocab_size, bias=False) \
            if self.draft_vocab_size else None
        # draft index -> target id offset, from draft_vocab.safetensors (`from_pretrained`).
        # Not a buffer: from_pretrained builds modules on the meta device.
        self.d2t: torch.Tensor | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, DFlashRMSNorm):
            nn.init.ones_(module.weight)

    @classmethod
    def from_pretrained(cls, path: str, *args: object, **kwargs: object) -> DFlashDraftModel:
        model = super().from_pretrained(path, *args, **kwargs)
        if model.draft_vocab_size:
            from safetensors.torch import load_file
            from transformers.utils import cached_file

            file = cached_file(path, VOCAB_FILE, _raise_exceptions_for_missing_entries=False)
            if file is None:
                raise ValueError(f"{path}: draft_vocab_size is set but {VOCAB_FILE} is missing")
            d2t = load_file(file)["d2t"].long()
            if d2t.shape != (model.draft_vocab_size,):
                raise ValueError(f"{path}: d2t has shape {tuple(d2t.shape)}, draft_vocab_size "
                                 f"is {model.draft_vocab_size}")
            model.d2t = d2t
        return model

    def forward(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                noise_embedding: torch.Tensor | None = None,
                target_hidden: torch.Tensor | None = None, past_key_values: object = None,
                use_cache: bool = False, **kwargs: object) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] of the block ``noise_embedding``.

        ``attention_mask`` must be None: a DFlash block sees all context and itself.
        """
        if attention_mask is not None:
            raise ValueError("DFlashDraftModel attends bidirectionally; pass attention_mask=None")
        dtype = self.fc.weight.dtype
        x = noise_embedding.to(dtype)
        ctx = self.hidden_norm(self.fc(target_hidden.to(dtype)))
        pos = position_ids.to(x.device)
        if pos.dim() == 1:
            pos = pos[None].expand(x.shape[0], -1)
        # rotary computed here, not kept as a buffer (meta-device init would leave it empty)
        d = self.head_dim
        inv_freq = 1.0 / (_rope_theta(self.config) ** (
            torch.arange(0, d, 2, device=x.device).float() / d))
        freqs = pos.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        cache = past_key_values if use_cache or past_key_values is not None else None
        for layer in self.layers:
            x = layer(x, ctx, cos, sin, cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, output_head: nn.Module) -> torch.Tensor:
        """Logits over the target vocabulary: the target head's, or the reduced head's at their
        target ids (i + d2t[i]) with -inf elsewhere."""
        if self.lm_head is None:
            logits = output_head(hidden)
        else:
            small = self.lm_head(hidden.to(self.lm_head.weight.dtype))
            logits = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
            ids = torch.arange(small.shape[-1], device=small.device) + self.d2t.to(small.device)
            logits[..., ids] = small
        logits = logits * float(_dflash(self.config, "output_multiplier", 1.0))
        cap = _dflash(self.config, "final_logit_softcapping")
        if cap:
            logits = torch.tanh(logits / float(cap)) * float(cap)
        return logits
