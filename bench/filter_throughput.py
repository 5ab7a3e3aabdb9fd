"""Throughput of the filter stage over a synthetic 1,000,000-row generation set.

Writes realistic-size generations (prompt ~150 chars, response ~600 chars, token-id lists of
matching length: ~4 chars a token) as Parquet shards under a committed "generations" manifest,
then times ``run_filter`` end to end (schema checks, every rule, split, committed write): once
with the dedupe + finish + length rules, once with the n-gram rule on as well.

The bar (docs/filtering.md): >= 500,000 rows/s on a 2-core machine, peak RSS < 2 GiB. Measure the
peak with ``/usr/bin/time -v .venv/bin/python bench/filter_throughput.py`` ("Maximum resident set
size"). Generation is vectorised (numpy + pyarrow, one shard at a time) so that it neither takes
minutes nor dominates the peak.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import Manifest, StageOutput, Store, read_manifest  # noqa: E402
from tasks.filter import GENERATIONS_SCHEMA, FilterConfig, run_filter  # noqa: E402

ROWS = 1_000_000
SHARDS = 8
VOCAB = 32_000
CHARS_PER_TOKEN = 4
# Shares of rows that the rules should catch (roughly; draws are random).
DUP_SHARE, ERROR_SHARE, LENGTH_SHARE, EMPTY_SHARE, LOOP_SHARE = 0.05, 0.01, 0.03, 0.005, 0.01
_ALPHABET = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz      ,.", dtype=np.uint8)


def _text(rng: np.random.Generator, corpus: np.ndarray, lengths: np.ndarray) -> pa.StringArray:
    """Consecutive pieces of the (tiled) random corpus, from a random place: distinct texts."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    start = int(rng.integers(0, len(corpus)))
    reps = -(-(start + int(offsets[-1])) // len(corpus))
    data = np.tile(corpus, reps)[start:start + int(offsets[-1])]
    return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(data))


def _token_lists(rng: np.random.Generator, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, VOCAB, size=int(offsets[-1]), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def synthetic_shard(rng: np.random.Generator, corpus: np.ndarray, start: int, n: int) -> pa.Table:
    """``n`` generation rows (ids ``start``..) with duplicates, errors, truncations and loops."""
    ids = np.arange(start, start + n)
    prompt_chars = rng.integers(120, 181, size=n)
    resp_chars = rng.integers(450, 751, size=n)
    prompt_text = _text(rng, corpus, prompt_chars)
    # duplicates: a share of prompts repeat an earlier row's text, upper-cased (normalisation)
    dup = rng.random(n) < DUP_SHARE
    src = np.where(dup, rng.integers(0, n, size=n), np.arange(n))
    prompt_text = prompt_text.take(pa.array(src))
    prompt_text = pc.if_else(pa.array(dup), pc.utf8_upper(prompt_text), prompt_text)
    response_text = _text(rng, corpus, resp_chars)
    u = rng.random(n)
    finish_code = (u < ERROR_SHARE + LENGTH_SHARE).astype(np.int8) + (u < ERROR_SHARE)
    finish = pa.array(["stop", "length", "error"]).take(pa.array(finish_code))
    empty = (u >= 0.5) & (u < 0.5 + EMPTY_SHARE)
    response_text = pc.if_else(pa.array(empty), "", response_text)
    n_prompt = prompt_chars // CHARS_PER_TOKEN
    n_resp = np.where(empty, 0, resp_chars // CHARS_PER_TOKEN)
    resp_tokens = _token_lists(rng, n_resp)
    loops = (u >= 0.6) & (u < 0.6 + LOOP_SHARE)
    if loops.any():  # degenerate responses: one 3-token phrase over and over
        flat = resp_tokens.values.to_numpy().copy()
        offs = resp_tokens.offsets.to_numpy()
        rows = np.flatnonzero(loops)
        lens = offs[rows + 1] - offs[rows]
        first = np.repeat(offs[rows], lens)
        at = first + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        flat[at] = flat[first + (at - first) % 3]
        resp_tokens = pa.ListArray.from_arrays(resp_tokens.offsets, pa.array(flat))
    roles = pa.repeat("user", n)
    msg_struct = pa.StructArray.from_arrays([roles, prompt_text], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), msg_struct)
    cols = {
        "prompt_id": pc.binary_join_element_wise(
            "p", pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 8, "0"), ""),
        "messages": messages,
        "prompt_token_ids": _token_lists(rng, n_prompt),
        "response_token_ids": resp_tokens,
        "response_text": response_text,
        "finish_reason": finish,
        "n_prompt_tokens": pa.array(n_prompt, pa.int64()),
        "n_response_tokens": pa.array(n_resp, pa.int64()),
        "target": pa.repeat("Qwen/Qwen3-8B", n),
        "temperature": pa.array(np.zeros(n), pa.float64()),
        "seed": pa.array(np.zeros(n, dtype=np.int64), pa.int64()),
        "backend": pa.repeat("vllm", n),
        "latency_s": pa.array(rng.random(n) * 3, pa.float64()),
        "reference_response": pa.nulls(n, pa.string()),
    }
    return pa.table(cols)


def write_generations(store: Store, rows: int, shards: int, seed: int = 0) -> Manifest:
    """Commit the synthetic set under ``generations/bench-<rows>-<seed>`` (once; then cached)."""
    key = f"bench-{rows}-{shards}-{seed}"
    done = read_manifest(store, "generations", key)
    if done is not None:
        return done
    rng = np.random.default_rng(seed)
    corpus = _ALPHABET[rng.integers(0, len(_ALPHABET), size=(16 << 20) + 7)]  # odd size: no aligned repeats
    per = -(-rows // shards)
    with StageOutput(store, "generations", key, config={"synthetic": rows, "seed": seed}) as out:
        for s in range(shards):
            n = min(per, rows - s * per)
            table = synthetic_shard(rng, corpus, s * per, n)
            out.write_parquet(f"shard-{s:05d}.parquet", table, table_name="generations",
                              schema=GENERATIONS_SCHEMA)
            del table
        return out.commit()
