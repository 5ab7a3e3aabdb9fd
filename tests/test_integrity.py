"""Store integrity under concurrency, kills and corruption (issue 21).

One module-scoped local store holds two concurrent runs of the ci pipeline (the stage functions
in the flow's order, generation through the mapped-shard API); the other tests damage it one way
at a time, check the reader's one-line error and ``dflash verify``, and put it back. The ci run
on S3 with 10% of requests failing (503) is the end-to-end run of tests/test_pipeline.py, which
goes through the same fault proxy (tests/s3_faults.py) and ends with ``dflash verify``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_faults import FaultProxy

from flows.cli import main
from storage import Store, history
from storage.catalog import committed_manifests
from storage.errors import IntegrityError
from storage.gc import collect
from storage.manifest import list_outputs, read_manifest

CI = Path(__file__).resolve().parent.parent / "configs" / "ci.yaml"
# ci.yaml with a shorter benchmark (two methods, 8 tokens: 4 s instead of 13 s here): what is
# under test is who measures and who waits, not the methods.
FAST = {"generate.max_new_tokens": 8, "benchmark.methods": ["hf_generate", "dflash"],
        "benchmark.max_new_tokens": 8}


# ------------------------------------------------------------------------ two concurrent runs
def _pipeline(url: str, hook: Any = None) -> dict[str, Any]:
    """The flow's stages in its order, called directly; generation through plan/shard/commit
    (what the flow maps), so the shard workers hold no stage lease of their own."""
    from flows.config import load_config
    from tasks.benchmark import run_benchmark
    from tasks.filter import run_filter
    from tasks.generate import commit_generation, generate_shard, plan_generation
    from tasks.models import run_prepare_target
    from tasks.prompts import contamination_prompts, run_prompts
    from tasks.train import run_train

    cfg, store = load_config(CI, FAST), Store(url)
    target = run_prepare_target(store, cfg.target)
    prompts = run_prompts(store, cfg.prompts, target)
    plan = plan_generation(store, cfg.generate, target, prompts)
    shards = []
    for i in plan.pending():
        shards.append(generate_shard(store, plan, i))
        if hook is not None and len(shards) == 1:
            hook()  # while this run's generation is live (not committed)
    gen = commit_generation(store, plan)
    filt = run_filter(store, cfg.filter, gen, benchmark_prompts=contamination_prompts(cfg.filter))
    train = run_train(store, cfg.train, target, filt)
    bench = run_benchmark(store, cfg.benchmark, target, train, filt)
    return {"shards": shards, "bench": bench,
            "digests": [m.digest for m in (target, prompts, gen, filt, train)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, one_thread_module: None,
         smollm2_dir: Path) -> dict[str, Any]:
    url = str(tmp_path_factory.mktemp("integrity") / "store")
    out: dict[str, Any] = {"url": url}
    errors: list[BaseException] = []

    def gc_now() -> None:
        store = Store(url)
        out["gc_victims"] = [v["path"] for v in collect(store, delete=True)]
        out["gen_files_at_gc"] = [f for f in store.find("generations") if "_leases" not in f]

    def one(name: str, hook: Any) -> None:
        try:
            out[name] = _pipeline(url, hook)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=("a", gc_now)),
               threading.Thread(target=one, args=("b", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    store = Store(url)
    out["committed_sha"] = {f"{m.prefix}/{e.path}": e.sha256
                            for m in committed_manifests(store) for e in m.files}
    return out


def test_two_concurrent_runs_share_one_output(runs: dict[str, Any]) -> None:
    store = Store(runs["url"])
    assert runs["a"]["digests"] == runs["b"]["digests"]  # the same committed outputs
    gens = [o for o in list_outputs(store, "generations")]
    assert [o["status"] for o in gens] == ["committed"]
    made = [s["shard"] for r in ("a", "b") for s in runs[r]["shards"] if not s["skipped"]]
    m = read_manifest(store, "generations", gens[0]["key"])
    assert m is not None and sorted(made) == list(range(m.extra["shards"]))  # each shard once
    assert not [f for f in store.find("generations") if "/_parts/" in f or "/_leases/" in f]
    committed, bad = history.committed_runs(store)
    assert len(committed) == 1 and not bad and not history.leftovers(store)
    assert sorted(r["bench"].get("skipped", False) for r in (runs["a"], runs["b"])) == [False, True]
    assert runs["a"]["bench"]["run_id"] == runs["b"]["bench"]["run_id"]


def test_gc_during_live_generation_removes_nothing(runs: dict[str, Any]) -> None:
    assert not [v for v in runs["gc_victims"] if v.startswith("generations")]
    assert any(f.endswith(".parquet") for f in runs["gen_files_at_gc"])  # it was live, with shards


def test_verify_passes_and_no_committed_file_rewritten(runs: dict[str, Any],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--store", runs["url"]]) == 0
    err = capsys.readouterr().err
    assert "all match their manifests" in err
    store = Store(runs["url"])
    now = {f"{m.prefix}/{e.path}": e.sha256 for m in committed_manifests(store) for e in m.files}
    assert now == runs["committed_sha"]


# ------------------------------------------------------------------------ corruption
def _damaged(store: Store, rel: str, data: bytes) -> Any:
    """Context: ``rel`` holds ``data`` inside the block, its original bytes after it."""
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        orig = store.read_bytes(rel)
        store.write_bytes(rel, data)
        try:
            yield
        finally:
            store.write_bytes(rel, orig)
    return ctx()


def _verdicts(err: str, command: str) -> list[str]:
    """The CLI's own error lines (stderr also carries library logs): exactly one."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"dflash {command}:")]
    assert len(lines) == 1, err[-2000:]
    return lines


def _verify_names(url: str, name: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["verify", "--store", url]) == 2
    cap = capsys.readouterr()
    assert name in cap.out and "Traceback" not in cap.out
    assert "Traceback" not in _verdicts(cap.err, "verify")[0]
    return cap.out


def _gen_and_filter(store: Store) -> tuple[Any, Any]:
    ms = committed_manifests(store)
    return (next(m for m in ms if m.stage == "generations"),
            next(m for m in ms if m.stage == "filter"))


def test_swapped_shard_is_detected(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from storage.refs import read_table
    from storage.verify import _VERIFIED
    from tasks.filter_rules import check_generation_shards

    store = Store(runs["url"])
    gen, filt = _gen_and_filter(store)
    s0, s1 = (f"{gen.prefix}/shard-0000{i}.parquet" for i in (0, 1))
    _VERIFIED.clear()
    with _damaged(store, s0, store.read_bytes(s1)):
        for read in (lambda: check_generation_shards(store, gen),
                     lambda: read_table(store, filt, "train")):
            with pytest.raises(IntegrityError, match="shard-00000.parquet: (size|sha256) mismatch"
                               r".*dflash run --force generate") as e:
                read()
            assert len(str(e.value).splitlines()) == 1
        _verify_names(runs["url"], "shard-00000.parquet", capsys)
    _VERIFIED.clear()


def test_manifest_with_wrong_sha256_and_rows(runs: dict[str, Any],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from storage.verify import _VERIFIED
    from tasks.filter_rules import check_generation_shards

    store = Store(runs["url"])
    gen, _ = _gen_and_filter(store)
    d = gen.to_dict()
    entry = next(f for f in d["files"] if f["path"] == "shard-00001.parquet")
    entry.update(sha256="0" * 64, rows=48)
    _VERIFIED.clear()
    with _damaged(store, f"{gen.prefix}/manifest.json", json.dumps(d).encode()):
        edited = read_manifest(store, "generations", gen.key)
        with pytest.raises(IntegrityError, match="shard-00001.parquet: sha256 mismatch"):
            check_generation_shards(store, edited)
        _verify_names(runs["url"], "shard-00001.parquet", capsys)
        assert main(["query", "select count(*) from train", "--store", runs["url"]]) == 2
        err = _verdicts(capsys.readouterr().err, "query")[0]
        assert "rewritten since" in err  # the view checks the source digest
    _VERIFIED.clear()


def test_truncated_safetensors_is_detected(runs: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dflash_models import packaged
    from tasks.benchmark import _train_drafts

    monkeypatch.setattr(packaged, "model_cache_dir", lambda: tmp_path)  # no earlier download

    store = Store(runs["url"])
    train = next(m for m in committed_manifests(store) if m.stage == "train")
    weights = next(f for f in train.files if f.path.endswith("model.safetensors")
                   and "checkpoints" not in f.path)
    rel = f"{train.prefix}/{weights.path}"
    with _damaged(store, rel, store.read_bytes(rel)[:-1000]):
        draft = next(iter(_train_drafts(store, train).values()))
        with pytest.raises(IntegrityError, match=r"model\.safetensors: size mismatch.*--force train"):
            draft.local()  # before anything loads it
        _verify_names(runs["url"], "model.safetensors", capsys)


def test_malformed_manifest_is_reported_and_contained(runs: dict[str, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url, store = runs["url"], Store(runs["url"])
    rel = "features/broken0000/manifest.json"
    store.write_bytes(rel, b'{"stage": "features", "files": [')
    assert main(["query", "select count(*) as n from generations", "--format", "json",
                 "--store", url]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] > 0  # other stages still query
    assert main(["ls", "--store", url]) == 0
    assert "corrupt" in capsys.readouterr().out
    out = _verify_names(url, "broken0000/manifest.json", capsys)
    assert "corrupt manifest" in out
    assert main(["gc", "--yes", "--store", url]) == 0
    assert "corrupt manifest" in capsys.readouterr().out and not store.find("features")


# ------------------------------------------------------------------------ kills
_KILL = """
import os, signal, sys
from storage import Store, history
from storage.store import Store as S
url, run_id, kill_at = sys.argv[1:4]
files = {k: (bytes.fromhex(v), 1) for k, v in __import__("json").loads(sys.stdin.read()).items()}
orig = S.create_exclusive
def create(self, rel, data):
    if kill_at in rel:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, rel, data)
S.create_exclusive = create
history.append_run(Store(url), run_id, files)
"""


def test_kill_between_history_files(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    """SIGKILL after the samples file, and after both files (before the record): the views show
    only the committed run, gc reports the leftovers and moves them aside."""
    from storage.catalog import connect

    url, store = runs["url"], Store(runs["url"])
    (record,) = history.committed_runs(store)[0].values()
    for kill_at, n_left in (("benchmarks/summary/", 1), ("benchmarks/runs/", 2)):
        run_id = f"killed{n_left}"
        files = {rel.replace(record["run_id"], run_id): store.read_bytes(rel).hex()
                 for rel in sorted(record["files"], key=lambda r: "summary" in r)}
        proc = subprocess.run([sys.executable, "-c", _KILL, url, run_id, kill_at],
                              input=json.dumps(files), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert len([f for f in history.leftovers(store) if run_id in f]) == n_left
    con = connect(store)
    for view in ("benchmarks", "benchmark_samples"):
        assert con.execute(f"select count(distinct run_id) from {view}").fetchone()[0] == 1
    assert main(["gc", "--store", url]) == 0
    assert capsys.readouterr().out.count("uncommitted benchmark run") == 3
    assert main(["gc", "--yes", "--store", url]) == 0
    capsys.readouterr()
    assert not history.leftovers(store) and len(store.find(history.ASIDE)) == 3
    assert main(["verify", "--store", url]) == 0


def test_benchmark_killed_after_history_commit_resumes_without_measuring(
        runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed after the history's commit and before the marker's: the next run takes
    the dead writer's lease over and commits its recorded result, measuring nothing."""
    from flows.config import load_config
    from storage.manifest import FileEntry, sha256_bytes
    from tasks import benchmark

    store = Store(runs["url"])
    ms = committed_manifests(store)
    marker = next(m for m in ms if m.stage == "bench_runs")
    result = store.read_json(f"{marker.prefix}/result.json")
    store.rm(f"{marker.prefix}/manifest.json")  # as if the kill came before the marker's commit
    lease = {"writer": "dead", "host": __import__("socket").gethostname(), "pid": _dead_pid(),
             "heartbeat": __import__("time").time()}
    store.write_json(f"{marker.prefix}/_lease.json", lease)
    data = store.read_bytes(f"{marker.prefix}/result.json")  # recorded before the history
    store.write_json(f"{marker.prefix}/_parts/result.json.json",
                     FileEntry("result.json", len(data), sha256_bytes(data)).__dict__)

    def forbidden(*a: Any, **k: Any) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(benchmark, "_execute", forbidden)
    cfg = load_config(CI, FAST)
    by = {m.stage: m for m in ms}
    out = benchmark.run_benchmark(store, cfg.benchmark, by["targets"], by["train"], by["filter"])
    assert out["run_id"] == result["run_id"] and not out.get("skipped")
    assert len(history.committed_runs(store)[0]) == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv", [
    ["run", "--config", "missing.yaml"],
    ["run", "--config", str(CI), "--force", "nope"],
    ["run", "--config", str(CI), "--prompts", "/nonexistent/prompts.jsonl"],
    ["bench", "--config", str(CI), "--draft", "/nonexistent/draft"],
    ["query", "select * from nope"],
    ["verify", "--stage", "nope"],
    ["run", "--config", str(CI), "--store", "s3://AKIAKEY:s3cr3t@bucket/x"],
    ["ls", "--store", "ftp://user:s3cr3t@host/x"],
], ids=["config", "force", "prompts", "draft", "sql", "verify-stage", "s3-creds", "scheme-creds"])
def test_bad_input_is_one_line_and_creates_nothing(argv: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    args = argv if "--store" in argv else [*argv, "--store", str(store)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "s3cr3t" not in err, err
    assert not store.exists()


def test_s3_failure_beyond_retries_is_one_line(s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import os

    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"], rate=1.0)  # every request: 503
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        assert main(["ls", "--store", f"s3://{s3_bucket}/x"]) == 2
    finally:
        proxy.close()
    err = _verdicts(capsys.readouterr().err, "ls")
    assert "Traceback" not in err[0] and f"s3://{s3_bucket}/x" in err[0] and proxy.faults > 0


def _raise_flow_failure(args: Any) -> None:
    """What run_from_cli raises when a Prefect task died of an S3 error in another thread."""
    try:
        raise RuntimeError("Traceback (most recent call last):\n  File \"s3fs/core.py\", line 1\n"
                           "OSError: [Errno 5] An error occurred (SlowDown) when calling the "
                           "PutObject operation (s3://KEY:s3cr3t@bucket)")
    except RuntimeError as e:
        from storage.errors import DflashError

        raise DflashError("flow failed: RuntimeError: Traceback (most recent call last):") from e


def _raise_safetensors(args: Any) -> None:
    from safetensors import SafetensorError

    raise SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")


@pytest.mark.parametrize("handler, cause", [(_raise_flow_failure, "SlowDown"),
                                            (_raise_safetensors, "MetadataIncompleteBuffer")])
def test_task_and_safetensors_faults_are_one_line(handler: Any, cause: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from flows import cli

    monkeypatch.setitem(cli.HANDLERS, "ls", handler)
    assert main(["ls", "--store", str(tmp_path)]) == 2
    (line,) = _verdicts(capsys.readouterr().err, "ls")
    assert cause in line and "Traceback" not in line and "s3cr3t" not in line, line


def test_adopt_history_written_before_run_records(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The one-time migration: a legacy run with both files is committed, a samples-only one
    (killed in the legacy layout) stays a leftover."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.catalog import connect

    store = Store(str(tmp_path / "store"))
    buf = io.BytesIO()
    pq.write_table(pa.table({"run_id": ["old"], "tau": [1.5]}), buf)
    for rel in ("samples/hw=cpu/date=2026-01-01/run-old.parquet",
                "summary/hw=cpu/date=2026-01-01/run-old.parquet",
                "samples/hw=cpu/date=2026-01-01/run-cut.parquet"):
        store.write_bytes(f"benchmarks/{rel}", buf.getvalue())
    assert "benchmarks" not in [r[0] for r in connect(store).execute("show tables").fetchall()]
    assert main(["gc", "--adopt-history", "--store", store.url]) == 0
    cap = capsys.readouterr()
    assert "adopted 1 benchmark run(s)" in cap.err and "run-cut.parquet" in cap.out
    assert connect(store).execute("select run_id, tau from benchmarks").fetchall() == [("old", 1.5)]
