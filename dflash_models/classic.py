"""A classic autoregressive draft: the baseline DFlash is compared against.

A small Llama-architecture causal LM on the target's vocabulary, trained by distillation
(teacher forcing on target logits). It is an ordinary `LlamaForCausalLM`, so `save_pretrained`
gives a normal HF folder and transformers' `generate(..., assistant_model=draft)` runs it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from .target import Target, config_rope_theta


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest d <= limit with n % d == 0 (>= 1)."""
    for d in range(max(min(limit, n), 1), 0, -1):
        if n % d == 0:
            return d
    return 1


def _attention_shape(target: Target, hidden: int) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim): the target's when the width matches, else a scaled copy
    keeping the target's head_dim and query/kv ratio as closely as divisibility allows."""
    cfg = target.model.config.get_text_config()
    t_heads = int(cfg.num_attention_heads)
    t_kv = int(getattr(cfg, "num_key_value_heads", None) or t_heads)
    t_head_dim = int(getattr(cfg, "head_dim", None) or target.hidden_size // t_heads)
    if hidden == target.hidden_size and t_heads * t_head_dim == hidden:
        return t_heads, t_kv, t_head_dim
    heads = _largest_divisor_at_most(hidden, max(round(hidden / t_head_dim), 1))
    kv = _largest_divisor_at_most(heads, max(round(heads * t_kv / t_heads), 1))
    return heads, kv, hidden // heads


def build_classic_draft(
    target: Target, num_layers: int = 2, hidden_size: int | None = None
) -> LlamaForCausalLM:
    """A small Llama causal LM sharing the target's tokenizer, vocabulary and special ids.

    When the width matches the target, the embedding (as the target's layers see it, i.e. times
    any family scale, since Llama applies none) and the LM head start as copies of the target's:
    the draft then begins in the target's token space and only has to learn the layers. The two
    are tied only if they are still identical after scaling. Logit soft-capping (Gemma2) is not
    reproduced: distillation absorbs it.
    """
    cfg = target.model.config.get_text_config()
    H = hidden_size or target.hidden_size
    heads, kv, head_dim = _attention_shape(target, H)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * target.hidden_size)
    inter = max(int(round(inter * H / target.hidden_size)), 1)
    same_width = H == target.hidden_size
    rows = head = None
    tie = False
    if same_width:
        with torch.no_grad():  # embedded rows include any family scale (module or forward)
            rows = target.embed(torch.arange(target.vocab_size, device=target.device)).float()
            head = target.model.get_output_embeddings().weight.float()
        tie = bool(getattr(cfg, "tie_word_embeddings", False)) and torch.equal(rows, head)
    gen = target.model.generation_config
    config = LlamaConfig(
        vocab_size=target.vocab_size,
        hidden_size=H,
        intermediate_size=inter,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", None) or 4096),
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", None) or 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": config_rope_theta(cfg)},
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None),
        pad_token_id=getattr(cfg, "pad_token_id", None),
        tie_word_embeddings=tie,
    )
    draft = LlamaForCausalLM(config)
    if rows is not None and head is not None:
        with torch.no_grad():
            draft.get_input_embeddings().weight.copy_(rows)
            if not tie:
                draft.get_output_embeddings().weight.copy_(head)
    if gen is not None:
        draft.generation_config = copy.deepcopy(gen)
    return draft.to(device=target.device, dtype=target.dtype).eval()


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Mean over masked positions of KL(teacher || student) on temperature-softened logits.

    KL(p || q) = sum_v p_v (log p_v - log q_v), computed from log-probabilities for stability.
    Multiplied by T^2 (Hinton et al.) so gradient size does not depend on the temperature; at
    T = 1 it is exactly the mean KL. Logits [..., V]; mask [...] bool (True = train here).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # [...]
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * (t * t)


__all__ = ["build_classic_draft", "distill_loss"]
