"""Generic Llama/Qwen3-style decoder pieces for the DFlash draft.

The draft is deliberately family-agnostic: whatever the target (Llama, Qwen3, Gemma, ...), its
own layers are plain pre-norm blocks (RMSNorm, rotary attention, SwiGLU MLP). What makes them
DFlash layers is "KV injection" in `InjectedAttention`: the queries come from the block tokens
only, while keys/values are the target's context features (projected with this layer's own k/v
projections) followed by the block tokens' keys/values.

Shapes used throughout: B batch, T block tokens, S context positions, H hidden size,
h query heads, g key/value heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 for stability (bf16 squares overflow early)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Standard (non-scaled) RoPE over explicit absolute positions.

    Positions are passed explicitly rather than derived from sequence length because a DFlash
    block sits at positions anchor..anchor+T-1 while its context sits at 0..S-1, and in training
    many blocks with different anchors share one forward pass.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, d] in float32."""
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # HF "rotate_half" layout: halves, not pairs
        return emb.cos(), emb.sin()


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Gather rows [B, M] (indices along dim 1) of x [B, T, ...] -> [B, M, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], rows]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, d] by cos/sin [B, T, d]; math in float32, result in x's dtype."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InjectedAttention(nn.Module):
    """Block attention whose keys/values are [context ++ block] and whose queries are the block.

    The context keys/values depend only on the (fixed) projected context features and this layer's
    weights, never on the block, so they can be computed once and cached across decoding steps
    (`context_kv`), while the block's own keys/values are recomputed every call.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not divisible by num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        # Qwen3-style per-head norms on q and k (before rotary); identity for Llama-style drafts.
        self.q_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else nn.Identity()

    def _kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, L, H] -> k, v [B, g, L, d], rotary applied to k."""
        B, L, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        return k, v.transpose(1, 2)

    def context_kv(self, context: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Project context features [B, S, H] to this layer's keys/values [B, g, S, d]."""
        return self._kv(context, *rope)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        ctx_k: Tensor,
        ctx_v: Tensor,
        attn_mask: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, H] block states; ctx_k/ctx_v [B, g, S, d]; mask bool [B, 1, T, S+T] or None.

        With no mask every block token attends to every context position and bidirectionally to
        the whole block (the inference case, where the context is exactly the verified prefix).
        ``rows`` [B, M] asks for the outputs of those block rows only: every row still gives its
        key and value, but only M rows make queries, so the output is [B, M, H].
        """
        B, T, _ = x.shape
        cos, sin = rope
        k_blk, v_blk = self._kv(x, cos, sin)
        if rows is not None:  # queries from the chosen rows only (their rotary and mask rows too)
            x, cos, sin = take_rows(x, rows), take_rows(cos, rows), take_rows(sin, rows)
            if attn_mask is not None:
                attn_mask = take_rows(attn_mask[:, 0], rows)[:, None]
            T = x.shape[1]
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, h, T, d]
        k = torch.cat([ctx_k, k_blk], dim=2)  # [B, g, S+T, d]
        v = torch.cat([ctx_v, v_blk], dim=2)
        # GQA: each kv head serves num_heads // num_kv_heads query heads.
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DraftLayer(nn.Module):
    """Pre-norm residual block. The context is NOT normed here: it was normed once by the draft's
    `hidden_norm` right after the feature projection (as in the reference implementation)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.self_attn = InjectedAttention(
            hidden_size, num_heads, num_kv_heads, head_dim, rms_norm_eps, qk_norm
        )
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        ctx_k: Tensor,
        ctx_v: Tensor,
        attn_mask: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, H] -> [B, T, H], or [B, M, H] for the block rows ``rows`` [B, M] only.

        Every row's key and value enter the attention either way, so the chosen rows' outputs
        equal those of the full pass; the other rows skip their query, attention, output
        projection and MLP. In a draft's last layer that is exact and saves most of the layer
        wherever the loss reads few rows (`DFlashDraft.forward`).
        """
        attn = self.self_attn(self.input_layernorm(x), rope, ctx_k, ctx_v, attn_mask, rows)
        x = (x if rows is None else take_rows(x, rows)) + attn
        return x + self.mlp(self.post_attention_layernorm(x))
