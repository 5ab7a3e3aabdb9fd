"""The engine's CUDA fast path: fixed-shape target passes over a cache sized at start.

`FastLM` (fast_target.py) already runs a supported target with fused projections and a
preallocated cache, but its passes slice the cache to the current length and build a fresh mask,
so every step has new shapes: fine on a CPU, fatal for CUDA graphs. `StaticLM` is the same
weights and the same math with every shape fixed per number of new tokens T (gpt-fast's recipe):

- one KV cache of ``max_len`` positions, allocated once and reused by every generation
  (`new_cache` resets its length); new keys/values are written at their positions with
  ``index_copy_``;
- attention always reads the whole cache under a mask ``key position <= query position``
  computed from the positions tensor, so stale entries past the verified length (left by a
  rejected draft) and never-written slots are invisible;
- rotary cos/sin come from a table built once with the model's own rotary module, indexed by
  the positions tensor;
- grouped-query attention runs as ``[1, kv_heads, rep * T, d]`` queries against the unexpanded
  cache, so no pass copies the cache ``rep`` times.

Passes of T in ``graph_tokens`` (the decode step, T = 1, and the verify pass, T = block size) are
captured once as CUDA graphs on CUDA (`cuda_graphs.GraphRunner`) and, with ``compile`` set, run
each decoder layer through ``torch.compile`` (inductor fuses the norms, rotary and SwiGLU into a
few kernels; the CPU tests use ``backend="eager"``, which only proves the layer traces as one
graph). Other T (the prefill, a last partial block) run the same code eagerly. Greedy outputs
equal the general path's token for token (tests/test_static_engine.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cuda_graphs import GraphRunner, graphs_available
from .fast_target import (
    FastLM,
    StaticKVCache,
    _rms_norm,
    _rotate_half,
    check_batch1,
    lm_output,
)


def _layer(x: Tensor, in_norm: Tensor, post_norm: Tensor, wqkv: Tensor, bqkv: Tensor | None,
           wo: Tensor, w13: Tensor, w2: Tensor, q_norm: Tensor | None, k_norm: Tensor | None,
           k_cache: Tensor, v_cache: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
           mask: Tensor, eps: float, n_heads: int, n_kv: int, d: int) -> Tensor:
    """One decoder layer over T new tokens at positions ``pos`` [T]; writes their k/v.

    x [1, T, H]; caches [1, g, max_len, d]; cos/sin [1, 1, T, d]; mask [rep * T, max_len].
    """
    T, rep = x.shape[1], n_heads // n_kv
    h = _rms_norm(x, in_norm, eps)
    q, k, v = F.linear(h, wqkv, bqkv).split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q = q.view(1, T, n_heads, d).transpose(1, 2)  # [1, h, T, d]
    k = k.view(1, T, n_kv, d).transpose(1, 2)
    v = v.view(1, T, n_kv, d).transpose(1, 2)
    if q_norm is not None:
        q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    # query head j * rep + r uses kv head j (transformers' repeat_kv order): group the rep query
    # heads of each kv head as rep * T query rows, row r * T + t being token t.
    att = F.scaled_dot_product_attention(q.reshape(1, n_kv, rep * T, d), k_cache, v_cache,
                                         attn_mask=mask)
    x = x + F.linear(att.reshape(1, n_heads, T, d).transpose(1, 2).reshape(1, T, n_heads * d), wo)
    gate, up = F.linear(_rms_norm(x, post_norm, eps), w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w2)


class StaticLM(FastLM):
    """A supported HF causal LM behind fixed-shape passes (see the module docstring).

    ``max_len`` bounds prompt + generated tokens + one block (a pass past it raises);
    ``cuda_graphs`` defaults to "on CUDA"; ``compile`` is a torch.compile backend name
    ("inductor" on a GPU, "eager" in CPU tests) or None.
    """

    def __init__(self, model: nn.Module, max_len: int, graph_tokens: tuple[int, ...] = (1,),
                 cuda_graphs: bool | None = None, compile: str | None = None) -> None:
        super().__init__(model)
        p = self.layers[0].wqkv
        self.max_len = int(max_len)
        self.graph_tokens = frozenset(int(t) for t in graph_tokens)
        self.cache = StaticKVCache(len(self.layers), self.n_kv, self.head_dim, p.dtype,
                                   p.device, capacity=self.max_len)
        self.positions = torch.arange(self.max_len, device=p.device)
        with torch.no_grad():  # the model's own rotary module, once, for every position
            dummy = torch.zeros(1, dtype=p.dtype, device=p.device)
            cos, sin = self.get_decoder().rotary_emb(dummy, self.positions[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, d]
        enabled = graphs_available(p.device) if cuda_graphs is None else cuda_graphs
        self.graphs = GraphRunner(enabled)
        self._compiled = (torch.compile(_layer, backend=compile, fullgraph=True, dynamic=False)
                          if compile else _layer)

    def new_cache(self) -> StaticKVCache:
        """The one preallocated cache, emptied: graphs captured on it stay valid."""
        self.cache.length = 0
        return self.cache

    @torch.no_grad()
    def forward(self, input_ids: Tensor, past_key_values: StaticKVCache | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                use_cache: bool = True, output_hidden_states: bool = False,
                logits_to_keep: int = 0, **_: Any) -> Any:
        """Batch 1; `hidden_states[j + 1]` is layer j's output, the last entry is final-normed."""
        check_batch1(input_ids, attention_mask)
        if past_key_values is not None and past_key_values is not self.cache:
            raise ValueError("StaticLM runs on its own cache: pass model.new_cache()")
        if position_ids is not None:
            raise ValueError("StaticLM derives positions from its cache; pass no position_ids")
        T, start = input_ids.shape[1], self.cache.length
        if start + T > self.max_len:
            raise ValueError(f"static cache full: {start + T} positions > max_len {self.max_len}; "
                             "build the StaticLM with a larger max_len")
        pos = self.positions[start: start + T]
        key = (T, bool(output_hidden_states), int(logits_to_keep))

        def step(ids: Tensor, pos: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
            return self._step(ids, pos, key[1], key[2])

        if T in self.graph_tokens:
            logits, hidden = self.graphs(key, step, (input_ids, pos))
        else:
            logits, hidden = step(input_ids, pos)
        self.cache.length = start + T
        return lm_output(logits, self.cache, hidden)

    def _step(self, ids: Tensor, pos: Tensor, output_hidden: bool, keep: int
              ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        T = ids.shape[1]
        layer = self._compiled if T in self.graph_tokens else _layer
        x = self.hf.get_input_embeddings()(ids)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, T, d]
        rep = self.n_heads // self.n_kv
        mask = (self.positions[None, :] <= pos[:, None]).repeat(rep, 1)  # [rep * T, max_len]
        hidden = [x] if output_hidden else None
        for i, w in enumerate(self.layers):
            x = layer(x, w.in_norm, w.post_norm, w.wqkv, w.bqkv, w.wo, w.w13, w.w2, w.q_norm,
                      w.k_norm, self.cache.k[i], self.cache.v[i], pos, cos, sin, mask,
                      self.eps, self.n_heads, self.n_kv, self.head_dim)
            if hidden is not None:
                hidden.append(x)
        x = self.get_decoder().norm(x)
        if hidden is not None:
            hidden[-1] = x  # as transformers: the last entry is after the final norm
        logits = self.hf.get_output_embeddings()(x[:, -keep:] if keep else x)
        return logits, tuple(hidden) if hidden is not None else None
