"""How the engine gets a DFlash draft's proposals: eagerly, or with fixed shapes and CUDA graphs.

A drafter has two methods the decoding loop calls (engine.generate_dflash):

- ``reset()`` before a generation: forget the cached context;
- ``propose(new_features, ctx_start, block_ids)``: append the target features of positions
  ctx_start.. to the context, denoise ``block_ids`` = [anchor, mask, ...] placed right after them,
  and return the argmax proposals for the mask positions as target ids.

`EagerDrafter` is the reference: `DraftKVCache` grows by concatenation and every pass has the
shapes of its inputs. `FastDraft` computes the same thing with fixed shapes: a context cache of
``max_len + block_size`` positions allocated once, new context padded to the block's length b (a
verify pass of b tokens hands over at most b features; the padding rows are written past the
valid length, masked, and overwritten by the next pass), attention over the whole cache under a
``key position < context length`` mask, rotary tables indexed by position tensors. A pass is
captured once per block length b as a CUDA graph on CUDA; the first pass (the whole prompt's
features, longer than a block) runs the same code eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import VocabHead
from .cuda_graphs import GraphRunner, graphs_available
from .draft import DFlashDraft, DraftKVCache
from .target import Target


class EagerDrafter:
    """The draft pass as written in draft.py: exact input shapes, a growing context cache."""

    def __init__(self, target: Target, draft: DFlashDraft) -> None:
        self.target, self.draft = target, draft
        self.config, self.draft_ids = draft.config, draft.draft_ids
        self.head = VocabHead(target, draft.draft_ids)
        self.cache = DraftKVCache()

    def reset(self) -> None:
        self.cache = DraftKVCache()

    def crop(self, n: int) -> None:
        """Keep the first n context positions."""
        self.cache.crop(n)

    def propose(self, new_features: Tensor, ctx_start: int, block_ids: Tensor) -> list[int]:
        device = block_ids.device
        s_new, b = new_features.shape[1], block_ids.shape[1]
        ctx_pos = torch.arange(ctx_start, ctx_start + s_new, device=device)[None]
        block_pos = torch.arange(ctx_start + s_new, ctx_start + s_new + b, device=device)[None]
        hidden = self.draft(self.target.embed(block_ids),
                            self.draft.project_context(new_features),
                            block_pos, ctx_pos, cache=self.cache)
        # Deterministic (argmax) even at T > 0: a point-mass q keeps verification lossless with
        # the "target sample equals draft token" rule. A reduced vocabulary maps back to target ids.
        return self.head.to_target(self.head.logits(hidden[:, 1:]).argmax(dim=-1))[0].tolist()


class FastDraft:
    """`EagerDrafter`'s pass with fixed shapes per block size (see the module docstring).

    Build it once per (target, draft) pair and reuse it across prompts: its graphs and cache are
    allocated once. ``max_len`` bounds the context (prompt + generated tokens), ``max_block``
    the block length (default: the draft's own).
    """

    def __init__(self, target: Target, draft: DFlashDraft, max_len: int,
                 cuda_graphs: bool | None = None, max_block: int | None = None) -> None:
        self.target, self.draft = target, draft
        c = self.config = draft.config
        self.draft_ids = draft.draft_ids
        self.head = VocabHead(target, draft.draft_ids)
        p = draft.fc.weight
        block = max_block or c.block_size
        self.capacity = int(max_len) + block  # room for a padded last context
        shape = (len(draft.layers), 1, c.num_kv_heads, self.capacity, c.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.length = 0
        # positions up to capacity + block: a block sits right after the (padded) context
        self.positions = torch.arange(self.capacity + block, device=p.device)
        with torch.no_grad():
            self.cos, self.sin = draft.rotary(self.positions[None])  # [1, N, d] float32
        enabled = graphs_available(p.device) if cuda_graphs is None else cuda_graphs
        self.graphs = GraphRunner(enabled)

    def reset(self) -> None:
        self.length = 0

    def crop(self, n: int) -> None:
        """Keep the first n context positions (what lies past them is masked, then overwritten)."""
        self.length = min(self.length, n)

    def propose(self, new_features: Tensor, ctx_start: int, block_ids: Tensor) -> list[int]:
        if ctx_start != self.length:
            raise ValueError(f"FastDraft: context starts at {ctx_start}, cache holds {self.length}")
        s_new, b = new_features.shape[1], block_ids.shape[1]
        rows = max(s_new, b)  # a verify pass hands over at most b features: pad them to b
        if ctx_start + rows > self.capacity:
            raise ValueError(f"FastDraft: context of {ctx_start + rows} positions > capacity "
                             f"{self.capacity}; build it with a larger max_len")
        if rows > s_new:
            new_features = torch.nn.functional.pad(new_features, (0, 0, 0, rows - s_new))
        ctx_pos = self.positions[ctx_start: ctx_start + rows]
        valid = self.positions[ctx_start + s_new: ctx_start + s_new + 1]  # [1]: context length
        block_pos = self.positions[ctx_start + s_new: ctx_start + s_new + b]
        inputs = (new_features, ctx_pos, valid, block_ids, block_pos)
        if rows == b:
            drafts = self.graphs(("draft", b), self._step, inputs)
        else:
            drafts = self._step(*inputs)
        self.length = ctx_start + s_new
        return drafts[0].tolist()

    def _step(self, feats: Tensor, ctx_pos: Tensor, ctx_len: Tensor, block_ids: Tensor,
              block_pos: Tensor) -> Tensor:
        """Proposals [1, b - 1] (target ids); writes the context k/v of ``ctx_pos``."""
        d = self.draft
        ctx = d.project_context(feats)
        x = self.target.embed(block_ids).to(ctx.dtype)
        ctx_rope = (self.cos[:, ctx_pos], self.sin[:, ctx_pos])
        blk_rope = (self.cos[:, block_pos], self.sin[:, block_pos])
        # [1, 1, 1, capacity + b]: the valid context, then the whole block (bidirectional)
        mask = torch.cat([self.positions[: self.capacity] < ctx_len,
                          torch.ones_like(block_pos, dtype=torch.bool)])[None, None, None]
        for i, layer in enumerate(d.layers):
            k, v = layer.self_attn.context_kv(ctx, ctx_rope)
            self.k[i].index_copy_(2, ctx_pos, k)
            self.v[i].index_copy_(2, ctx_pos, v)
            x = layer(x, blk_rope, self.k[i], self.v[i], mask)
        hidden = d.norm(x)
        return self.head.to_target(self.head.logits(hidden[:, 1:]).argmax(dim=-1))


Drafter = EagerDrafter | FastDraft
