"""Throughput of the filter stage over a synthetic 1,000,000-row generation set.

Writes realistic-size generations (prompt ~150 chars, response ~600 chars, token-id lists of
matching length: ~4 chars a token) as Parquet shards under a committed "generations" manifest,
then times ``run_filter`` end to end (schema checks, every rule, split, committed write): once
with the dedupe + finish + length rules, once with the n-gram rule on as well, and once with the
first rule set writing the split as copies (``split_copies``) instead of row references. With
``--read-back`` it then times reading the train split back the way training does (token ids and
reference responses), from the references and from the copies: the price a reference split moves
to its readers (its memory then counts in the printed peak).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import Manifest, StageOutput, Store, read_manifest  # noqa: E402
from storage.hardware import hardware_info  # noqa: E402
from storage.refs import read_table  # noqa: E402
from tasks.filter import FilterConfig, check_generations_schema, run_filter  # noqa: E402
from tasks.train_features import COLUMNS as TRAIN_COLUMNS  # noqa: E402

ROWS = 1_000_000
SHARDS = 8
VOCAB = 32_000
CHARS_PER_TOKEN = 4
# Shares of rows that the rules should catch (roughly; draws are random).
DUP_SHARE, ERROR_SHARE, LENGTH_SHARE, EMPTY_SHARE, LOOP_SHARE = 0.05, 0.01, 0.03, 0.005, 0.01
_LETTERS = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)


def _corpus(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random words of 1-9 letters between single spaces; 1 separator in 40 is a newline."""
    text = _LETTERS[rng.integers(0, len(_LETTERS), size=size)]
    gaps = rng.integers(2, 11, size=size // 2)
    seps = np.cumsum(gaps)
    seps = seps[seps < size]
    text[seps] = ord(" ")
    text[seps[rng.random(len(seps)) < 0.025]] = ord("\n")
    return text


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
    """Commit the synthetic set under ``generations/bench-<rows>-<shards>-<seed>`` (once).

    Shards are built one after another (numpy) and compressed two at a time (pyarrow releases
    the GIL), so memory stays at about two shards."""
    key = f"bench-{rows}-{shards}-{seed}"
    done = read_manifest(store, "generations", key)
    if done is not None:
        return done
    rng = np.random.default_rng(seed)
    corpus = _corpus(rng, (16 << 20) + 7)  # odd size: no aligned repeats between shards
    per = -(-rows // shards)
    with StageOutput(store, "generations", key, config={"synthetic": rows, "seed": seed}) as out:
        def write(s: int, table: pa.Table) -> None:
            check_generations_schema(table.schema, f"synthetic shard {s}")
            out.write_parquet(f"shard-{s:05d}.parquet", table, table_name="generations")

        with ThreadPoolExecutor(2) as pool:
            pending = []
            for s in range(shards):
                n = min(per, rows - s * per)
                pending.append(pool.submit(write, s, synthetic_shard(rng, corpus, s * per, n)))
                if len(pending) >= 2:
                    pending.pop(0).result()
            for f in pending:
                f.result()
        return out.commit()


def bench_configs(memory_limit: str, threads: int | None) -> dict[str, FilterConfig]:
    """The two measured rule sets: dedupe + finish + length rules, then the same + n-grams."""
    base = FilterConfig(
        dedupe=True, drop_errors=True, drop_truncated=True, drop_empty=False,
        min_prompt_tokens=1, max_prompt_tokens=44, min_response_tokens=16,
        max_response_tokens=180, max_repeated_ngram_share=None, contamination=False,
        eval_fraction=0.02, memory_limit=memory_limit, threads=threads)
    return {"dedupe+finish+length": base,
            "dedupe+finish+length+ngram": base.model_copy(
                update={"max_repeated_ngram_share": 0.5, "ngram_size": 4}),
            "dedupe+finish+length copies": base.model_copy(update={"split_copies": True})}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="/tmp/dflash-filter-bench", help="local store folder")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--shards", type=int, default=SHARDS)
    ap.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit")
    ap.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each rule set (best is shown)")
    ap.add_argument("--only", choices=["base", "ngram", "copies"], default=None)
    ap.add_argument("--read-back", action="store_true", help="also time reading the train split "
                    "back as training does (its memory then counts in the peak below)")
    args = ap.parse_args(argv)

    store = Store(args.store)
    t0 = time.perf_counter()
    gens = write_generations(store, args.rows, args.shards)
    size = sum(f.size for f in gens.files)
    print(f"generations: {gens.rows['generations']:,} rows, {len(gens.files)} shards, "
          f"{size / 1e6:.0f} MB at {store.uri(gens.prefix)} ({time.perf_counter() - t0:.1f}s)")
    # The manifest's hardware probe imports torch once per process (seconds); a pipeline process
    # has paid that before the filter stage runs, so the bench pays it before timing, too.
    hardware_info()
    splits = {}
    for name, cfg in bench_configs(args.memory_limit, args.threads).items():
        tag = "copies" if cfg.split_copies else "ngram" if cfg.max_repeated_ngram_share else "base"
        if args.only and args.only != tag:
            continue
        for _ in range(args.repeat):
            c0, t0 = _cpu_s(), time.perf_counter()
            m = run_filter(store, cfg, gens, force=True)  # force: rebuild, never the cache
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            rows_in = m.extra["stats"][0]["rows_in"]
            print(f"{name:28s} {rows_in / wall:>10,.0f} rows/s  wall {wall:6.2f}s  "
                  f"cpu {cpu:6.2f}s  train {m.rows['train']:,} eval {m.rows['eval']:,}  "
                  f"phases {m.extra['timings_s']}")
        splits.setdefault(m.extra["split"]["stored_as"], m)  # the first rule set of each kind
        for s in m.extra["stats"]:
            print(f"    {s['step']:>2} {s['rule']:<18} in {s['rows_in']:>9,} "
                  f"removed {s['rows_removed']:>8,} out {s['rows_out']:>9,} "
                  f"tokens {s['tokens_out']:>12,}")
    for stored_as, m in splits.items() if args.read_back else ():
        t0 = time.perf_counter()
        n = read_table(store, m, "train", TRAIN_COLUMNS).num_rows
        print(f"read back train split ({stored_as}, {', '.join(TRAIN_COLUMNS)}): {n:,} rows "
              f"in {time.perf_counter() - t0:.2f}s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:,.0f} MiB (this process; /usr/bin/time -v reports the same maximum)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
