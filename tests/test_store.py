"""The artifact store on its three backends: local folder, memory:// and real S3 (moto server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage import SchemaError, StageOutput, Store, StoreError, read_manifest
from storage.catalog import connect
from storage.keys import code_fingerprint, stage_key
from storage.manifest import MANIFEST, list_outputs
from storage.parquet import read_parquet

REPO = Path(__file__).resolve().parent.parent
SCHEMA = pa.schema([("prompt_id", pa.string()), ("n", pa.int64())])


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(start, start + n)],
                     "n": list(range(start, start + n))}, schema=SCHEMA)


def test_round_trip_and_manifest(store_url: str) -> None:
    store = Store(store_url)
    with StageOutput(store, "gen", "k1", config={"a": 1}, code_fingerprint="c0") as out:
        assert out.manifest is None
        out.write_parquet("shard-00000.parquet", _table(3), table_name="generations", schema=SCHEMA)
        out.write_parquet("shard-00001.parquet", _table(2, 3), table_name="generations")
        out.write_json("meta.json", {"hello": "world"})
        m = out.commit(extra={"note": "x"})
    again = read_manifest(store, "gen", "k1")
    assert again is not None and again.digest == m.digest
    assert m.rows == {"generations": 5}
    assert {f.path for f in m.files} == {"shard-00000.parquet", "shard-00001.parquet", "meta.json"}
    assert all(len(f.sha256) == 64 and f.size > 0 for f in m.files)
    assert m.hardware["cpu_count"] >= 1 and m.created_at
    assert read_parquet(store, "gen/k1/shard-00001.parquet", schema=SCHEMA).num_rows == 2
    assert store.read_json("gen/k1/meta.json") == {"hello": "world"}
    # no lease or part records are left behind by a commit
    assert sorted(store.find("gen/k1")) == sorted(
        ["gen/k1/manifest.json", "gen/k1/shard-00000.parquet", "gen/k1/shard-00001.parquet",
         "gen/k1/meta.json"])
    # a second writer of a committed key does nothing and gets the committed manifest
    with StageOutput(store, "gen", "k1", config={"a": 1}) as out:
        assert out.manifest is not None and out.manifest.digest == m.digest


def test_duckdb_reads_committed_files_only(store_url: str) -> None:
    store = Store(store_url)
    with StageOutput(store, "gen", "done", config={}) as out:
        out.write_parquet("shard-00000.parquet", _table(4), table_name="generations")
        out.commit()
    # a killed writer: a recorded shard and an orphan file, but no manifest
    with StageOutput(store, "gen", "killed", config={}) as out:
        out.write_parquet("shard-00000.parquet", _table(100), table_name="generations")
    store.write_bytes("gen/done/orphan.parquet", store.read_bytes("gen/killed/shard-00000.parquet"))
    con = connect(store)
    assert con.execute("select count(*), sum(n) from generations").fetchone() == (4, 6)
    status = {(o["key"], o["status"]) for o in list_outputs(store)}
    assert status == {("done", "committed"), ("killed", "incomplete")}


def test_committed_manifest_is_never_overwritten(store_url: str) -> None:
    store = Store(store_url)
    assert store.create_exclusive("x/manifest.json", b"first")
    assert not store.create_exclusive("x/manifest.json", b"second")
    assert store.read_bytes("x/manifest.json") == b"first"


def test_interrupted_writer_leaves_no_committed_output(store_url: str) -> None:
    store = Store(store_url)
    with pytest.raises(RuntimeError):
        with StageOutput(store, "train", "k", config={}) as out:
            out.write_bytes("weights.bin", b"\0" * 10)
            raise RuntimeError("killed mid-stage")
    assert read_manifest(store, "train", "k") is None
    # a resume sees the finished file and commits it
    with StageOutput(store, "train", "k", config={}) as out:
        assert set(out.recorded()) == {"weights.bin"}
        m = out.commit()
    assert [f.path for f in m.files] == ["weights.bin"]


def test_concurrent_writers_leave_one_valid_output(store_url: str) -> None:
    store = Store(store_url)
    results: list[str] = []

    def writer(tag: int) -> None:
        with StageOutput(store, "gen", "same", config={}, wait_poll_s=0.05) as out:
            if out.manifest is None:
                for i in range(3):
                    out.write_parquet(f"shard-{i}.parquet", _table(5, 100 * tag),
                                      table_name="generations")
                out.commit(extra={"writer": tag})
            results.append(out.manifest.extra["writer"])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    m = read_manifest(store, "gen", "same")
    assert m is not None and len(set(results)) == 1 and results[0] == m.extra["writer"]
    for f in m.files:  # every listed file holds exactly what the manifest says
        import hashlib

        assert hashlib.sha256(store.read_bytes(f"gen/same/{f.path}")).hexdigest() == f.sha256


def test_sigkilled_writer_is_taken_over(tmp_path: Path) -> None:
    """A real SIGKILL leaves a lease of a dead pid; the next writer resumes from its parts."""
    store_dir = tmp_path / "store"
    script = textwrap.dedent(f"""
        import time, pyarrow as pa
        from storage import Store, StageOutput
        store = Store({str(store_dir)!r})
        with StageOutput(store, "gen", "k", config={{}}) as out:
            out.write_parquet("shard-0.parquet", pa.table({{"n": [1, 2]}}), table_name="g")
            print("written", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(str(store_dir))
    assert store.exists("gen/k/_lease.json") and not store.exists(f"gen/k/{MANIFEST}")
    with StageOutput(store, "gen", "k", config={}) as out:
        assert set(out.recorded()) == {"shard-0.parquet"}
        m = out.commit()
    assert m.rows == {"g": 2}


def test_keys_change_with_config_inputs_and_code() -> None:
    base = stage_key("filter", {"a": 1, "b": [1, 2]}, {"gen": "d1"}, "c1")
    assert base == stage_key("filter", {"b": [1, 2], "a": 1.0}, {"gen": "d1"}, "c1")
    assert base != stage_key("filter", {"a": 2, "b": [1, 2]}, {"gen": "d1"}, "c1")
    assert base != stage_key("filter", {"a": 1, "b": [1, 2]}, {"gen": "d2"}, "c1")
    assert base != stage_key("filter", {"a": 1, "b": [1, 2]}, {"gen": "d1"}, "c2")
    assert base != stage_key("train", {"a": 1, "b": [1, 2]}, {"gen": "d1"}, "c1")
    fp = code_fingerprint(["tasks/base.py"])
    assert fp == code_fingerprint(["tasks/base.py"]) and fp != code_fingerprint(["tasks/progress.py"])
    with pytest.raises(FileNotFoundError):
        code_fingerprint(["tasks/does_not_exist.py"])


def test_schema_checked_on_write_and_read(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    bad = pa.table({"prompt_id": ["a"], "count": [1]})
    with StageOutput(store, "gen", "k", config={}) as out:
        with pytest.raises(SchemaError, match="missing column 'n'"):
            out.write_parquet("s.parquet", bad, schema=SCHEMA)
        out.write_parquet("s.parquet", bad)
    with pytest.raises(SchemaError, match=r"s\.parquet: missing column 'n'"):
        read_parquet(store, "gen/k/s.parquet", schema=SCHEMA)
    store.write_bytes("junk.parquet", b"not parquet at all")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_parquet(store, "junk.parquet")
    wrong = pa.schema([("prompt_id", pa.string()), ("n", pa.string())])
    with pytest.raises(SchemaError, match="column 'n' has type string, expected int64"):
        _write_read(store, pa.table({"prompt_id": ["a"], "n": ["x"]}, schema=wrong))


def _write_read(store: Store, table: pa.Table) -> None:
    from storage.parquet import to_parquet_bytes

    store.write_bytes("w.parquet", to_parquet_bytes(table))
    read_parquet(store, "w.parquet", schema=SCHEMA)


@pytest.mark.parametrize("url, match", [
    ("ftp://host/x", "unsupported scheme 'ftp'"),
    ("s3://AB", "not a valid bucket name"),
    ("", "store URL is empty"),
])
def test_malformed_store_urls(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        Store(url)


def test_s3_missing_bucket_and_credentials(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/prefix")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StoreError, match="no AWS credentials found"):
        Store("s3://any-bucket/prefix")


def test_s3_unreachable_endpoint(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StoreError, match=r"cannot reach http://127\.0\.0\.1:9"):
        Store("s3://bucket/prefix")


def test_local_write_is_atomic_no_temp_files(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_bytes("a/b.json", json.dumps({"x": 1}).encode())
    store.write_bytes("a/b.json", json.dumps({"x": 2}).encode())
    assert store.read_json("a/b.json") == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_wait_for_live_lease_then_return_committed(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    first = StageOutput(store, "gen", "k", config={}).__enter__()
    first.write_bytes("f.bin", b"1")
    done = threading.Event()

    def second() -> None:
        with StageOutput(store, "gen", "k", config={}, wait_poll_s=0.02) as out:
            assert out.manifest is not None  # waited for the live writer, did not write
        done.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)  # let the second writer reach its wait loop (not a timing assert)
    assert not done.is_set()
    first.commit()
    t.join(timeout=30)
    assert done.is_set()
