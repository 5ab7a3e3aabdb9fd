"""The DFlash draft: a few decoder layers conditioned on target features via KV injection.

Data flow of one draft pass (inference or training):

    target features [B, S, n*H] --fc--> [B, S, H] --hidden_norm--> context   (project_context)
    target.embed([anchor, mask, mask, ...]) = block_embeds [B, T, H]
    for each layer: queries from the block; keys/values = [context k/v ++ block k/v]
    final RMSNorm -> hidden [B, T, H]; the caller applies target.lm_head

The draft owns no embedding and no LM head: it borrows the target's frozen ones, which keeps it
small and keeps its output space exactly the target's vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .layers import DraftLayer, RMSNorm, RotaryEmbedding, take_rows
from .serving import SERVING_NAME, serving_md
from .target import Target, choose_mask_token_id, config_rope_theta, default_target_layer_ids

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "draft_vocab.safetensors"  # reduced vocabulary only: {"d2t": [K] long}
MODELING_NAME = "modeling_dflash.py"  # copied into the export: AutoModel(trust_remote_code=True)
HEAD_KEY = "lm_head.weight"  # a reduced draft's own head [K, H]: the target's rows (vLLM reads it)


@dataclass
class DFlashDraftConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int] = field(default_factory=list)
    num_target_layers: int = 0
    qk_norm: bool = True

    @classmethod
    def from_target(
        cls,
        target: Target,
        num_layers: int = 2,
        block_size: int = 8,
        num_feature_layers: int = 4,
        target_layer_ids: list[int] | None = None,
        mask_token_id: int | None = None,
        qk_norm: bool = True,
    ) -> DFlashDraftConfig:
        """Layer shapes copied from the target's config, so the draft is a thin slice of it.

        qk_norm defaults to True whatever the family: the published drafts are Qwen3-style
        stacks, and that is the layout serving engines load.
        """
        cfg = target.model.config.get_text_config()
        H = target.hidden_size
        num_heads = int(getattr(cfg, "num_attention_heads", None) or max(H // 64, 1))
        ids = target_layer_ids or default_target_layer_ids(target.num_layers, num_feature_layers)
        if mask_token_id is None:
            mask_token_id = choose_mask_token_id(target.tokenizer, target.vocab_size)
        return cls(
            hidden_size=H,
            intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * H),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
            head_dim=int(getattr(cfg, "head_dim", None) or H // num_heads),
            rms_norm_eps=float(
                getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-6
            ),
            rope_theta=config_rope_theta(cfg),
            vocab_size=target.vocab_size,
            block_size=block_size,
            mask_token_id=int(mask_token_id),
            target_layer_ids=list(ids),
            num_target_layers=target.num_layers,
            qk_norm=qk_norm,
        )

    def to_hf_dict(self, dtype: torch.dtype = torch.float32,
                   draft_vocab_size: int | None = None) -> dict[str, Any]:
        """The config.json serving engines read (HF naming), plus our own exact fields.

        model_type is "qwen3" (or "llama" without q/k norm) because that is the layer stack the
        weights follow, so `AutoConfig` can parse the file without remote code; ``auto_map``
        points `AutoModel(trust_remote_code=True)` at the modeling file shipped beside it.
        ``causal``/``use_swa`` are written although false is what vLLM assumes when they are
        absent: a reader's default can change, an explicit field cannot. ``draft_vocab_size``
        (vLLM's name) marks the reduced-vocabulary form: own ``lm_head`` + ``d2t`` offsets.
        """
        dtype_name = str(dtype).removeprefix("torch.")
        reduced = {"draft_vocab_size": int(draft_vocab_size)} if draft_vocab_size else {}
        return {
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": f"{MODELING_NAME.removesuffix('.py')}.DFlashDraftModel"},
            "model_type": "qwen3" if self.qk_norm else "llama",
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            **reduced,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "causal": False,
                "use_swa": False,
            },
            "layer_types": ["full_attention"] * self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "qk_norm": self.qk_norm,
            "dtype": dtype_name,
            "torch_dtype": dtype_name,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DFlashDraftConfig:
        """Our export, or a folder the reference class saved: like the reference, a field is
        read from ``dflash_config`` first, then the top level, then the reference's default
        (block 16, target layers spread over the target by its ``build_target_layer_ids``)."""
        dcfg = d.get("dflash_config") or {}

        def field_(name: str, default: Any = None) -> Any:
            return dcfg.get(name, d.get(name, default))

        n_target = int(d.get("num_target_layers") or 0)
        layer_ids = field_("target_layer_ids")
        if layer_ids is None:
            if not n_target:
                raise KeyError("dflash_config.target_layer_ids (or num_target_layers)")
            layer_ids = reference_target_layer_ids(n_target, int(d["num_hidden_layers"]))
        if field_("mask_token_id") is None:
            raise KeyError("dflash_config.mask_token_id")
        rope = d.get("rope_parameters") or {}
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0),
            vocab_size=d["vocab_size"],
            block_size=int(field_("block_size", 16)),
            mask_token_id=int(field_("mask_token_id")),
            target_layer_ids=[int(j) for j in layer_ids],
            num_target_layers=n_target,
            qk_norm=d.get("qk_norm", d.get("model_type") != "llama"),
        )


def reference_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's default feature layers (``dflash.model.build_target_layer_ids``), for a
    config that names none: one per draft layer, spread over 1..L-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, span = 1, num_target_layers - 4
    return [round(start + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


class DraftKVCache:
    """Per-layer context keys/values (rotary applied) for every context position seen so far.

    It never holds block keys/values: those depend on the block's (mask) tokens, which change
    every decoding step, while context keys/values depend only on verified tokens' features.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def __len__(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new context k/v [B, g, S_new, d] for `layer`; return all of that layer's."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def crop(self, n: int) -> None:
        """Keep only the first n context positions (drop features of rejected tokens)."""
        self.keys = [k[:, :, :n] for k in self.keys]
        self.values = [v[:, :, :n] for v in self.values]


def _batched(positions: Tensor, batch: int) -> Tensor:
    """Accept [T] or [B, T] positions; return [B, T]."""
    return positions.unsqueeze(0).expand(batch, -1) if positions.dim() == 1 else positions


class DFlashDraft(nn.Module):
    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        self.config = c = config
        n_feat = len(c.target_layer_ids)
        if n_feat == 0:
            raise ValueError("DFlashDraftConfig.target_layer_ids is empty")
        self.fc = nn.Linear(n_feat * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(
            DraftLayer(
                c.hidden_size,
                c.intermediate_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.rms_norm_eps,
                c.qk_norm,
            )
            for _ in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
        # A reduced draft vocabulary (EAGLE-3's draft-to-target map): the draft's logits cover
        # only these target ids. Not a parameter: it travels as its own file beside the weights.
        self.draft_ids: Tensor | None = None
        # A loaded vLLM-form draft's own head [K, H]: the engine uses the target's head rows,
        # so loaders check that these are the same (`head_matches`).
        self.head_rows: Tensor | None = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # HF-style small normal init: keeps the fresh draft's residual stream close to the
        # (target-scaled) block embeddings instead of swamping them.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def project_context(self, features: Tensor) -> Tensor:
        """Concatenated target features [B, S, n*H] -> context [B, S, H] (fc, then RMSNorm)."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def forward(
        self,
        block_embeds: Tensor,
        context: Tensor,
        block_positions: Tensor,
        context_positions: Tensor,
        attn_mask: Tensor | None = None,
        cache: DraftKVCache | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Denoise a block (or, in training, N concatenated blocks) in one pass.

        block_embeds [B, T, H]; context [B, S, H] projected features (only the NEW positions when
        a cache is given: they are appended to it, so afterwards the cache holds all context k/v);
        positions are absolute, [T]/[B, T] and [S]/[B, S]; attn_mask bool [B, 1, T, S_total + T]
        (True = may attend) or None for "see all context, bidirectional within the block".
        Returns final-normed hidden [B, T, H], or [B, M, H] for block rows ``rows`` [B, M].

        ``rows`` is for training, where the loss reads only the labelled block rows (~1 in 4 of
        them with the target's greedy chain as labels): earlier layers still run on every row
        (the next layer needs their keys and values), the last one only makes queries for these.
        """
        B = block_embeds.shape[0]
        dtype = self.fc.weight.dtype
        x = block_embeds.to(dtype)
        ctx = context.to(dtype)
        block_rope = self.rotary(_batched(block_positions.to(x.device), B))
        ctx_rope = self.rotary(_batched(context_positions.to(x.device), B))
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.context_kv(ctx, ctx_rope)
            if cache is not None:
                k, v = cache.update(i, k, v)
            last = i == len(self.layers) - 1
            x = layer(x, block_rope, k, v, attn_mask, rows if last else None)
        if rows is not None and not self.layers:
            x = take_rows(x, rows)
        return self.norm(x)

    def export(self, folder: str | Path, dtype: torch.dtype | None = None,
               lm_head: Tensor | None = None) -> Path:
        """Write the serving layout every DFlash loader reads (docs/serving.md).

        config.json + model.safetensors (no embedding; the reference's module names) +
        ``modeling_dflash.py`` for `AutoModel(trust_remote_code=True)` + SERVING.md. A reduced
        draft vocabulary is written in vLLM's form: ``lm_head`` [K, H] (``lm_head``: the target's
        head rows of ``draft_ids``) in model.safetensors, ``draft_vocab_size: K`` in the
        config and ``d2t`` OFFSETS (target id = i + d2t[i]) in draft_vocab.safetensors.
        ``dtype``: the weights' dtype on disk (default: as trained).
        """
        folder = Path(folder)
        ids = self.draft_ids
        if ids is not None and (lm_head is None or lm_head.shape[0] != ids.numel()):
            raise ValueError("a reduced-vocabulary draft exports its own head: pass lm_head, the "
                             f"target's head rows of its {ids.numel()} draft ids")
        dtype = dtype or self.fc.weight.dtype
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        if ids is not None:
            state[HEAD_KEY] = lm_head.detach().to(dtype).contiguous().cpu()
            offsets = ids.long().cpu() - torch.arange(ids.numel())
            save_file({"d2t": offsets.contiguous()}, str(folder / VOCAB_NAME))
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        hf = self.config.to_hf_dict(dtype, None if ids is None else int(ids.numel()))
        (folder / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
        (folder / MODELING_NAME).write_bytes((Path(__file__).parent / MODELING_NAME).read_bytes())
        (folder / SERVING_NAME).write_text(serving_md(hf))
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DFlashDraft:
        """Inverse of `export`; dtype defaults to the dtype the weights were saved in.

        Reads both vocabulary forms: vLLM's (``draft_vocab_size`` in the config, ``d2t`` =
        offsets, own ``lm_head``, kept as ``head_rows`` for `head_matches`: the engine drafts
        with the target's rows) and the first one (``d2t`` = absolute sorted target ids, no head). Also reads
        folders the reference class saved (same weight names; config fields per
        `DFlashDraftConfig.from_hf_dict`).
        """
        folder = Path(folder)
        raw = json.loads((folder / CONFIG_NAME).read_text())
        config = DFlashDraftConfig.from_hf_dict(raw)
        state = load_file(str(folder / WEIGHTS_NAME))
        head = state.pop(HEAD_KEY, None)
        model = cls(config)
        model.load_state_dict(state, strict=True)
        if (folder / VOCAB_NAME).is_file():
            d2t = load_file(str(folder / VOCAB_NAME))["d2t"].long()
            reduced = raw.get("draft_vocab_size") not in (None, raw.get("vocab_size"))
            model.draft_ids = d2t + torch.arange(d2t.numel()) if reduced else d2t
        model.head_rows = head
        dtype = dtype or next(iter(state.values())).dtype
        return model.to(device=device or "cpu", dtype=dtype).eval()


def init_from_target(draft: DFlashDraft, target: Target) -> list[str]:
    """Start the draft as a continuation of the target's last layers; return what was set.

    Why: on a CPU budget the draft gets a few thousand steps, and the target's deepest layers
    already map a near-final residual stream to next-token features. So:

    - draft layer i <- target layer L - n + i: linear projections copied where names and shapes
      match; norms take the target norm's *effective* per-channel scale (what it multiplies a
      unit-RMS vector by: w for Llama/Qwen, 1 + w for Gemma), so no family's convention is
      hard-coded;
    - the final norm <- the target decoder's final norm (same rule): the draft's output meets the
      target's LM head scaled the way the target's own last hidden state is;
    - context fusion: ``fc`` starts as the identity on the deepest fused layer's features (the
      random weights on the others scaled down), ``hidden_norm`` as the first copied layer's
      input norm. The injected keys/values then start as what that target layer computes from a
      near-final residual stream.
    """
    decoder = target.model.get_decoder() if hasattr(target.model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) < len(draft.layers):
        raise ValueError(f"init_from_target: {type(target.model).__name__} exposes no decoder "
                         "layers to copy; set train.init_from_target: false")
    H, done = draft.config.hidden_size, []
    start = len(layers) - len(draft.layers)
    with torch.no_grad():
        for i, layer in enumerate(draft.layers):
            src = dict(layers[start + i].named_modules())
            for name, mod in layer.named_modules():
                theirs = src.get(name)
                weight = getattr(theirs, "weight", None)
                if not isinstance(mod, nn.Linear | RMSNorm) or weight is None or \
                        weight.shape != mod.weight.shape:
                    continue
                mod.weight.copy_(weight if isinstance(mod, nn.Linear) else
                                 _effective_scale(theirs, mod.weight.numel()))
                done.append(f"layers.{i}.{name}")
        if getattr(decoder, "norm", None) is not None:
            draft.norm.weight.copy_(_effective_scale(decoder.norm, H))
            done.append("norm")
        first_norm = getattr(layers[start], "input_layernorm", None)
        if first_norm is not None:
            draft.hidden_norm.weight.copy_(_effective_scale(first_norm, H))
            done.append("hidden_norm")
        ids = draft.config.target_layer_ids
        j = max(range(len(ids)), key=ids.__getitem__)  # the deepest fused layer
        draft.fc.weight.mul_(0.1)
        draft.fc.weight[:, j * H:(j + 1) * H] += torch.eye(H, dtype=draft.fc.weight.dtype)
        done.append("fc")
    return done


def _effective_scale(norm: nn.Module, n: int) -> Tensor:
    """Per-channel factor a norm module applies to a unit-RMS input (an all-ones vector)."""
    p = next(norm.parameters())
    return norm(torch.ones(1, 1, n, dtype=p.dtype, device=p.device)).float().flatten()


def head_matches(draft: DFlashDraft, target: Target) -> bool:
    """Whether a loaded reduced draft's own ``lm_head`` is the target's head at its ids (the
    engine drafts with the target's rows; a different head would be silently ignored)."""
    if draft.head_rows is None or draft.draft_ids is None:
        return True
    rows = target.model.get_output_embeddings().weight.detach()[draft.draft_ids.to(
        target.device)]
    return rows.shape == draft.head_rows.shape and torch.allclose(
        rows.float().cpu(), draft.head_rows.float(), rtol=1e-2, atol=1e-2)


def check_compatible(config: DFlashDraftConfig, target: Target,
                     draft_ids: Tensor | None = None) -> None:
    """Fail fast, with one line naming the mismatch, before a draft meets the wrong target."""
    if draft_ids is not None and draft_ids.numel() and not (
            0 <= int(draft_ids.min()) and int(draft_ids.max()) < target.vocab_size):
        raise ValueError(f"draft vocabulary map holds ids outside the target vocab "
                         f"[0, {target.vocab_size})")
    if config.hidden_size != target.hidden_size:
        raise ValueError(
            f"draft hidden_size {config.hidden_size} != target hidden_size {target.hidden_size}"
        )
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"draft vocab_size {config.vocab_size} != target vocab_size {target.vocab_size}"
        )
    if config.num_target_layers and config.num_target_layers != target.num_layers:
        raise ValueError(
            f"draft was trained on a {config.num_target_layers}-layer target, "
            f"target has {target.num_layers} layers"
        )
    bad = [j for j in config.target_layer_ids if not 0 <= j < target.num_layers]
    if bad:
        raise ValueError(
            f"target_layer_ids {bad} out of range for a {target.num_layers}-layer target"
        )
    if not 0 <= config.mask_token_id < target.vocab_size:
        raise ValueError(
            f"mask_token_id {config.mask_token_id} outside target vocab [0, {target.vocab_size})"
        )


__all__ = [
    "DFlashDraft",
    "DFlashDraftConfig",
    "DraftKVCache",
    "check_compatible",
    "head_matches",
    "reference_target_layer_ids",
    "init_from_target",
]
