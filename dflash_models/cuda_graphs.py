"""CUDA-graph capture and replay, once per input shape, for the engine's fixed-shape passes.

At batch 1 a decode step of an 8B model reads ~16 GB of weights (~3.4 ms on an H200) but launches
~1,500 kernels; from Python each launch costs several microseconds, so an eager step measures the
interpreter, not the GPU. A CUDA graph records the launches of one call and replays them with a
single launch. That needs what `StaticLM` and `FastDraft` provide: every tensor a pass touches
(weights, KV caches, rotary tables) lives at a fixed address, the pass's shapes depend only on
the graph key, and every per-step value (token ids, positions, lengths) arrives as a tensor.

`GraphRunner` is the whole mechanism: for a key seen for the first time it warms the function up
on a side stream (cuBLAS workspaces, inductor compilation and autotuning happen there), captures
one call into a graph, and from then on copies the new inputs into the captured input buffers and
replays. Its outputs are the graph's own buffers: the next replay of that key overwrites them, so
callers read (or copy) what they need before the next call, as the engine does.

The function must be idempotent in its side effects for equal inputs (writing the same keys and
values at the same cache positions), because warm-up and capture run it with the real inputs
before the first replay.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor


def graphs_available(device: torch.device | str) -> bool:
    """CUDA graphs need a CUDA device; everywhere else the runner calls the function eagerly."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class GraphRunner:
    """Calls ``fn(*inputs)`` eagerly, or replays a graph captured once per ``key`` (see module).

    All graphs of one runner share one memory pool, so the outputs of, say, the decode and the
    verify graphs do not each hold a private allocation for the life of the process.
    """

    def __init__(self, enabled: bool, warmup: int = 2) -> None:
        self.enabled = enabled
        self.warmup = warmup
        self._graphs: dict[Hashable, tuple[tuple[Tensor, ...], Any, torch.cuda.CUDAGraph]] = {}
        self._pool: Any = None

    def __call__(self, key: Hashable, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
        if not self.enabled:
            return fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, inputs)
        static_inputs, outputs, graph = entry
        for buf, x in zip(static_inputs, inputs, strict=True):
            buf.copy_(x, non_blocking=True)
        graph.replay()
        return outputs

    def _capture(self, fn: Callable[..., Any], inputs: tuple[Tensor, ...]
                 ) -> tuple[tuple[Tensor, ...], Any, torch.cuda.CUDAGraph]:
        static_inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*static_inputs)
        self._pool = graph.pool()
        return static_inputs, outputs, graph
