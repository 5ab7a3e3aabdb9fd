"""Training sequences and the target features the draft learns from: online or cached.

A training example is one token sequence ``prompt ++ response`` and the index where the response
starts. Two sources give responses:
- ``regenerated``: the target's own output (``response_token_ids`` of the generate stage), the
  reference recipe's data;
- ``original``: the prompt source's own answer (e.g. ShareGPT's), tokenized with the target's
  tokenizer. It costs one prefill pass instead of a generation: about 10x cheaper per token on
  CPU, which matters because data volume, not steps, is what lifts held-out acceptance.

For every example the target contributes, from ONE forward pass over the whole sequence:
- ``features`` [S, n*H]: hidden states of the chosen layers, concatenated (the draft's context);
- ``greedy`` [S]: the target's argmax next token after each prefix (``greedy[p]`` follows
  ids[:p]; ``greedy[0] = -1``, and -1 in the prompt where the response start is given: no
  label lives there), which makes tau_sim exact against the target's own choices;
- ``last`` [S, H], only for distillation: the final-normed hidden states, from which the target's
  next-token distributions come back through its (frozen) LM head at training time. Storing H
  values instead of a V-wide distribution keeps the cost at H*2 bytes per token in bf16.

Two ways to get them:
- ``OnlineFeatures``: run the frozen target inside the training loop; nothing is stored.
- cached: computed once, stored as safetensors shards (``pack_shard``) and read back with
  ``CachedFeatures``. Size: n*H*2 bytes per token in bf16 (n*H*4 in fp32) plus 8 bytes of ids;
  4 layers of SmolLM2 (H=576) cost 4.6 KB per token in bf16, 4 x 5 x 4096 x 2 = 40 KiB for
  Qwen3-8B-sized targets; ``last`` adds H*2 (1,152 B for SmolLM2). ``bytes_per_token`` computes
  it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from dflash_models.trainer import autocast_context

SOURCES = ("regenerated", "original")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Example:
    ids: Tensor  # int64 [S] prompt ++ response (truncated to the max length)
    response_start: int  # index of the first response token
    source: str  # "regenerated" | "original"
    row: int  # row of the split table it came from

    @property
    def response_tokens(self) -> int:
        return int(self.ids.shape[0]) - self.response_start


def make_example(prompt_ids: Sequence[int], response_ids: Sequence[int], source: str, row: int,
                 max_len: int, min_response: int = 2) -> Example | None:
    """prompt ++ response cut to ``max_len``; None when fewer than ``min_response`` response
    tokens survive (no anchor would have a label)."""
    ids = list(prompt_ids) + list(response_ids)
    ids = ids[:max_len]
    start = len(prompt_ids)
    if len(ids) - start < min_response:
        return None
    return Example(torch.tensor(ids, dtype=torch.long), start, source, row)


def original_response_ids(tokenizer: Any, text: str, eos_id: int | None) -> list[int]:
    """The source's answer as the target's tokens, closed by the end-of-turn token the target
    would emit (so the draft also learns where answers stop)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + ([int(eos_id)] if eos_id is not None else [])


def end_of_turn_id(target: Any) -> int | None:
    """The id that ends an assistant turn: the generation config's first eos, else the
    tokenizer's."""
    gen = getattr(target.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None and target.tokenizer is not None:
        eos = target.tokenizer.eos_token_id
    return None if eos is None else int(eos)


def bytes_per_token(num_feature_layers: int, hidden_size: int, dtype: str,
                    keep_last: bool = False) -> int:
    """Stored bytes per token of a feature cache: n*H*itemsize features + int32 id + greedy
    (+ H*itemsize of final hidden state where distillation keeps it)."""
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return (num_feature_layers + int(keep_last)) * hidden_size * item + 8


# ----------------------------------------------------------------------------- the target pass
@dataclass
class FeatureRow:
    ids: Tensor  # int64 [S]
    features: Tensor  # [S, n*H]
    greedy: Tensor | None  # int64 [S], -1 at 0; None where nothing needs it (online training)
    last: Tensor | None = None  # [S, H] final-normed hidden (for distillation targets)


@torch.no_grad()
def target_pass(target: Any, seqs: Sequence[Tensor], layer_ids: Sequence[int],
                dtype: torch.dtype | None = None, greedy: bool = True,
                keep_last: bool = False, cpu_bf16: bool = False,
                starts: Sequence[int] | None = None) -> list[FeatureRow]:
    """Features (and greedy next tokens) of right-padded sequences in one batched forward.

    Right padding keeps every real position's causal context identical to an unpadded pass
    (pads come after it and are masked), so the result per sequence does not depend on the
    batch it rode in, up to float rounding. ``greedy=False`` skips the LM head: training
    batches never read the greedy tokens, only tau_sim's held-out rows do. ``keep_last`` keeps
    the final hidden states, from which distillation takes the target's distributions.
    ``starts`` (the response starts) limits the greedy tokens to where labels can be, the
    response: from ``starts[i]`` on; the prompt's are -1.

    ``cpu_bf16`` runs the decoder layers of a CPU target under bf16 autocast (~1.6x faster on a
    CPU with native bf16) but the LM head in fp32, because bf16 logits turn near-ties into
    ties: on SmolLM2 the greedy tokens then agree with the exact pass on ~99% of positions
    (97.7% with a bf16 head) and the features differ by ~0.4% (they are stored in bf16 anyway).
    """
    lengths = [int(s.shape[0]) for s in seqs]
    L = max(lengths)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : lengths[i]] = s
        attn[i, : lengths[i]] = 1
    with autocast_context(target.device, False, cpu_bf16):  # CPU only: a CUDA target is bf16
        last, feats = target.hidden(ids.to(target.device), attn.to(target.device),
                                    list(layer_ids))
    last = last.to(target.dtype)
    feats = feats if dtype is None else feats.to(dtype)
    nxt = None  # [Bt, L]: the token at p + 1, only where it can be a label (the fp32 head is a
    # third of a bf16 pass on CPU; a prompt's positions and the pads never need it)
    if greedy:
        need = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, n in enumerate(lengths):  # position p predicts p + 1; the last one predicts nothing
            need[i, (max(starts[i] - 1, 0) if starts is not None else 0): n - 1] = True
        need = need.to(last.device)
        nxt = torch.full((len(seqs), L), -1, dtype=torch.long, device=last.device)
        # argmax is unchanged by soft-capping and scaling, but lm_head applies them anyway
        nxt[need] = target.lm_head(last[need]).argmax(-1)
    rows = []
    for i, n in enumerate(lengths):
        g = None if nxt is None else torch.cat(
            [torch.full((1,), -1, dtype=torch.long), nxt[i, : n - 1].cpu()])
        rows.append(FeatureRow(seqs[i].cpu(), feats[i, :n], g,
                               last[i, :n] if keep_last else None))
    return rows


class OnlineFeatures:
    """Frozen target forward inside the loop: no disk, one target pass per example visit."""

    mode = "online"

    def __init__(self, target: Any, layer_ids: Sequence[int], examples: Sequence[Example],
                 keep_last: bool = False, greedy: bool = False, cpu_bf16: bool = False) -> None:
        self.target, self.layer_ids, self.examples = target, list(layer_ids), examples
        self.keep_last, self.greedy, self.cpu_bf16 = keep_last, greedy, cpu_bf16

    def get(self, indices: Sequence[int]) -> list[FeatureRow]:
        exs = [self.examples[i] for i in indices]
        return target_pass(self.target, [e.ids for e in exs], self.layer_ids,
                           greedy=self.greedy, keep_last=self.keep_last,
                           cpu_bf16=self.cpu_bf16, starts=[e.response_start for e in exs])


class CachedFeatures:
    """Rows read back from feature shards, by example index (held in memory as stored)."""

    mode = "cached"

    def __init__(self, rows: dict[int, FeatureRow], examples: Sequence[Example],
                 device: torch.device | str = "cpu") -> None:
        missing = [i for i in range(len(examples)) if i not in rows]
        if missing:
            raise ValueError(f"feature cache lacks {len(missing)} examples (first: {missing[0]})")
        for i, ex in enumerate(examples):
            if not torch.equal(rows[i].ids, ex.ids):
                raise ValueError(f"feature cache example {i}: token ids differ from the data")
        self.rows, self.device = rows, torch.device(device)

    def get(self, indices: Sequence[int]) -> list[FeatureRow]:
        out = []
        for i in indices:
            r = self.rows[i]
            last = None if r.last is None else r.last.to(self.device, torch.float32)
            out.append(FeatureRow(r.ids, r.features.to(self.device, torch.float32), r.greedy,
                                  last))
        return out


# ----------------------------------------------------------------------------- shards
def pack_shard(indices: Sequence[int], rows: Sequence[FeatureRow], dtype: str) -> bytes:
    """One safetensors file: concatenated features/ids/greedy (and ``last`` where the rows carry
    it) plus offsets and example indices."""
    lengths = torch.tensor([int(r.ids.shape[0]) for r in rows], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tensors = {
        "features": torch.cat([r.features.cpu() for r in rows]).to(DTYPES[dtype]).contiguous(),
        "ids": torch.cat([r.ids.cpu() for r in rows]).to(torch.int32),
        "greedy": torch.cat([r.greedy.cpu() for r in rows]).to(torch.int32),
        "offsets": offsets,
        "index": torch.tensor(list(indices), dtype=torch.long),
    }
    if rows and rows[0].last is not None:
        tensors["last"] = torch.cat([r.last.cpu() for r in rows]).to(DTYPES[dtype]).contiguous()
    return st_save(tensors, metadata={"format": "dflash-features", "dtype": dtype})


def unpack_shard(data: bytes) -> dict[int, FeatureRow]:
    t = st_load(data)
    off = t["offsets"].tolist()
    last = t.get("last")
    out = {}
    for j, idx in enumerate(t["index"].tolist()):
        a, b = off[j], off[j + 1]
        out[int(idx)] = FeatureRow(t["ids"][a:b].long(), t["features"][a:b],
                                   t["greedy"][a:b].long(), None if last is None else last[a:b])
    return out


def plan_shards(examples: Sequence[Example], shard_tokens: int) -> list[list[int]]:
    """Consecutive example indices grouped into shards of about ``shard_tokens`` tokens."""
    shards: list[list[int]] = [[]]
    tokens = 0
    for i, ex in enumerate(examples):
        n = int(ex.ids.shape[0])
        if shards[-1] and tokens + n > shard_tokens:
            shards.append([])
            tokens = 0
        shards[-1].append(i)
        tokens += n
    return [s for s in shards if s]


def length_batches(indices: Sequence[int], examples: Sequence[Example],
                   batch_tokens: int) -> list[list[int]]:
    """Group indices by length (less padding) into batches of at most ``batch_tokens`` padded
    tokens: how a cache build feeds the target."""
    order = sorted(indices, key=lambda i: int(examples[i].ids.shape[0]))
    batches: list[list[int]] = []
    for i in order:
        n = int(examples[i].ids.shape[0])
        if batches and (len(batches[-1]) + 1) * n <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
