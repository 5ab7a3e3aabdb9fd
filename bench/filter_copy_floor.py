"""The floor under the filter stage's write: what merely copying the generation shards costs.

    .venv/bin/python bench/filter_copy_floor.py [--store DIR] [--rows N]

Over the same synthetic 1,000,000-row set as ``bench/filter_throughput.py``, with 2 threads
(one shard each at a time) and no rules, no split, no DuckDB, it times (1) reading every batch
with pyarrow, (2) reading and writing each shard back with the stage's own writer options and
(3) the same with an uncompressed, plain-encoded writer. A filter that copies its kept rows can
go no faster than (2); the issue's bar of 500,000 rows/s allows 2 s per 10^6 rows end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from filter_throughput import write_generations  # noqa: E402

from storage import Store  # noqa: E402
from tasks.filter import BATCH_ROWS, _writer_options  # noqa: E402

PLAIN = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def _copy(store: Store, rel: str, options: Callable[[pa.Schema], dict] | None) -> int:
    """Read one shard batch by batch; with ``options``, write it back (to memory). -> rows."""
    rows, writer, sink = 0, None, pa.BufferOutputStream()
    with store.open_input(rel) as f:
        for b in pq.ParquetFile(f).iter_batches(BATCH_ROWS, use_threads=False):
            rows += b.num_rows
            if options is None:
                continue
            if writer is None:
                writer = pq.ParquetWriter(sink, b.schema, **options(b.schema))
            writer.write_batch(b)
    if writer is not None:
        writer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="/tmp/dflash-filter-floor", help="local store folder")
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    store = Store(args.store)
    m = write_generations(store, args.rows, 8)
    files = [f"{m.prefix}/{f.path}" for f in m.files if f.path.endswith(".parquet")]
    cases = [("read only", None), ("read + write, the stage's options", _writer_options),
             ("read + write, uncompressed plain", lambda _: PLAIN)]
    for name, options in cases:
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            rows = sum(pool.map(lambda rel, o=options: _copy(store, rel, o), files))
        dt = time.perf_counter() - t
        print(f"{name}: {dt:.2f} s for {rows:,} rows -> {rows / dt:,.0f} rows/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
