"""What read-side verification costs: seconds per GB to check committed files against their
manifest (size + sha256, storage/verify.py), beside a plain read of the same bytes.

    .venv/bin/python bench/verify_cost.py [--mb 512] [--files 8] [--store PATH_OR_URL]

Writes one output of ``--files`` random files (``--mb`` in all) into a fresh store (a temporary
folder by default), then times, each best of ``--repeats``:
  read      every file read whole (what a reader pays anyway),
  verify    ``verify_entries`` (one stat + a streamed sha256 per file, the reader's check),
  store     ``verify_store`` (``dflash verify``: the same, plus listing and parsing manifests).
On a local store the files sit in the page cache after the first pass, so the figures are the
hashing cost; on S3 add the transfer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import StageOutput, Store  # noqa: E402
from storage.verify import _VERIFIED, verify_entries, verify_store  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _VERIFIED.clear()  # the per-process memo would make every pass after the first free
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.store is None else None
    store = Store(args.store or tmp.name)
    per = args.mb * (1 << 20) // args.files
    with StageOutput(store, "bench_verify", os.urandom(6).hex(), config={}, hardware={}) as out:
        for i in range(args.files):
            out.write_bytes(f"part-{i:03d}.bin", os.urandom(per))
        m = out.commit()
    gb = sum(e.size for e in m.files) / 1e9

    def read() -> None:
        for e in m.files:
            with store.open_input(f"{m.prefix}/{e.path}") as f:
                while f.read(8 << 20):
                    pass

    t_read = best(read, args.repeats)
    t_verify = best(lambda: verify_entries(store, m, m.files), args.repeats)
    t_store = best(lambda: verify_store(store, "bench_verify"), args.repeats)
    print(f"store {store.url} ({store.protocol}), {len(m.files)} files, {gb:.3f} GB, "
          f"best of {args.repeats}")
    print(f"{'pass':<8} {'seconds':>8} {'s/GB':>8} {'GB/s':>8}")
    for name, t in (("read", t_read), ("verify", t_verify), ("store", t_store)):
        print(f"{name:<8} {t:8.3f} {t / gb:8.3f} {gb / t:8.2f}")
    print(f"verification adds {t_verify / t_read:.2f}x a plain read's time (hashing included)")
    store.rm("bench_verify", recursive=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
