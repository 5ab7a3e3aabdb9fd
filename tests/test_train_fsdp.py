"""The train stage past one process: FSDP2 under torchrun (gloo), sharded DCP checkpoints that
resume at another world size, SIGKILL of one rank, two "nodes" through a c10d rendezvous.

One uninterrupted in-process run (a world of one) is the reference every torchrun run is held
to: the same global batch gives the same loss per step and the same final weights. Launches
are shared across assertions (each costs seconds of interpreter start-up per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from storage import Store, read_manifest
from storage.catalog import connect
from storage.manifest import recorded_parts
from tasks.train import TrainConfig, run_train
from tests.test_train import tiny_rows, tiny_store, tiny_target_dir  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
RUN_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    from storage import Store, read_manifest
    from tasks.train import TrainConfig, run_train
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store_path, folder, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = Store(store_path)
    m = run_train(store, TrainConfig(**cfg), Path(folder),
                  read_manifest(store, "filter", "test-filter"))
    print("KEY", m.key)
""")


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def base_cfg(**kw) -> TrainConfig:
    return TrainConfig.tiny(batch_size=4, max_steps=STEPS, eval_every=5, checkpoint_every=5,
                            classic_layers=0, export_last=True, **kw)


def losses(store: Store) -> list[float]:
    rows = connect(store).sql("SELECT loss FROM train_metrics WHERE phase = 'dflash' "
                              "ORDER BY step").fetchall()
    return [r[0] for r in rows]


def weights(store: Store, m, folder: str = "last/dflash-draft") -> dict[str, torch.Tensor]:
    return load(store.read_bytes(f"{m.prefix}/{folder}/model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def store_like(ref_store: Store, folder: Path) -> tuple[Store, object]:
    """A fresh store holding the reference's filter output (same digest, so the same key)."""
    shutil.copytree(Path(ref_store.path("filter")), folder / "store/filter")
    store = Store(folder / "store")
    return store, read_manifest(store, "filter", "test-filter")


def spawn(store_dir: Path, target: Path, cfg: TrainConfig, throttle: float = 0.0
          ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "DFLASH_TRAIN_THROTTLE_S": str(throttle)}
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(store_dir), str(target),
                             cfg.model_dump_json()], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_target_dir: Path,  # noqa: F811
              tiny_rows: list[dict]):  # noqa: F811
    """The uninterrupted world-of-one run, online features (in-process, no torchrun)."""
    store, fm = tiny_store(tmp_path_factory.mktemp("ref"), tiny_rows)
    torch.set_num_threads(1)
    m = run_train(store, base_cfg(), tiny_target_dir, fm)
    return store, m


def test_fsdp_two_processes_match_one(tmp_path: Path, tiny_target_dir: Path,  # noqa: F811
                                      tiny_rows: list[dict], reference) -> None:  # noqa: F811
    """FSDP2 over 2 ranks: the same key, loss per step (1e-4) and final weights as 1 process."""
    ref_store, ref = reference
    cfg = base_cfg(strategy="fsdp", nproc=2)
    store, fm = store_like(ref_store, tmp_path)
    m = run_train(store, cfg, tiny_target_dir, fm)
    assert m.key == ref.key  # strategy and world size are not part of the output's identity
    one, two = losses(ref_store), losses(store)
    assert len(one) == STEPS and len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-4)
    assert one[0] != pytest.approx(one[-1], rel=1e-3)  # it did train
    assert_same_weights(weights(ref_store, ref), weights(store, m))
    assert m.extra["dflash"]["best"]["step"] == ref.extra["dflash"]["best"]["step"]
    assert not store.find(f"{m.prefix}/checkpoints")


def rank_pids(launcher: int) -> dict[int, int]:
    """The ranks (RANK -> pid) torchrun started for the launcher process ``launcher``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"DFLASH_TRAIN_PARENT={launcher}".encode() in env:
            for e in env:
                if e.startswith(b"RANK="):
                    out[int(e[5:])] = int(d.name)
    return out


def wait_for_checkpoint(store_dir: Path, proc: subprocess.Popen, step: int) -> Path:
    """The train output folder, once checkpoint ``step`` is committed (its state.json record)."""
    marker = f"checkpoints__dflash__step-{step:07d}__state.json.json"
    deadline = time.monotonic() + 120
    while not (hits := list((store_dir / "train").glob(f"*/_parts/{marker}"))):
        assert proc.poll() is None, "training ended before its checkpoint:\n" + \
            (proc.stdout.read() if proc.stdout else "")
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    return hits[0].parent.parent


def committed_checkpoints(store: Store, out: Path) -> list[int]:
    prefix = f"train/{out.name}"
    return sorted(int(n.split("/step-")[1].split("/")[0]) for n in recorded_parts(store, prefix)
                  if n.startswith("checkpoints/dflash/step-") and n.endswith("/state.json"))


def wait_gone(launcher: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while rank_pids(launcher):
        assert time.monotonic() < deadline, f"ranks still running {within_s} s later"
        time.sleep(0.2)


def test_kills_then_resume_across_world_sizes(tmp_path: Path, tiny_target_dir: Path,  # noqa: F811
                                               reference) -> None:
    """One chain of runs of the same training (FSDP2 unless said), each held to the
    uninterrupted reference:

    1. a world of one under torchrun; SIGKILL of its launcher after checkpoint 5: the rank
       (in its own session) exits within 30 s;
    2. rerun on 2 ranks: resumes from the 1-rank checkpoint (1 -> 2); SIGKILL of rank 1 after
       checkpoint 10: the job ends within 60 s with an error, not a hang, and exactly one
       committed checkpoint is visible;
    3. that folder resumed on 2 ranks, and (a copy) on 1 process (2 -> 1, DDP world of one):
       both end with the uninterrupted run's losses and weights.
    """
    ref_store, ref = reference
    store, fm = store_like(ref_store, tmp_path / "a")
    store_dir = tmp_path / "a/store"
    proc = spawn(store_dir, tiny_target_dir, base_cfg(strategy="fsdp"), throttle=0.15)
    out = wait_for_checkpoint(store_dir, proc, 5)
    assert set(rank_pids(proc.pid)) == {0}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_gone(proc.pid, 30)
    # it stopped, not finished: 15 more steps at >= 0.15 s would have recorded the phase's end
    assert "checkpoints/dflash/done.json" not in recorded_parts(store, f"train/{out.name}")

    cfg = base_cfg(strategy="fsdp", nproc=2)
    proc = spawn(store_dir, tiny_target_dir, cfg, throttle=0.15)
    wait_for_checkpoint(store_dir, proc, 10)
    pids = rank_pids(proc.pid)
    assert set(pids) == {0, 1}
    t = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - t < 60
    assert "resumed from checkpoint at step 5" in log
    assert "train: rank 1 failed (exit code -9); torchrun exited" in log
    assert not rank_pids(proc.pid)  # rank 0 is gone too
    steps = committed_checkpoints(store, out)
    assert len(steps) == 1 and steps[0] in (10, 15)  # the newest only, no half-written one
    shutil.copytree(store_dir, tmp_path / "b/store")

    m2 = run_train(store, cfg, tiny_target_dir, fm)
    store1 = Store(tmp_path / "b/store")
    m1 = run_train(store1, base_cfg(), tiny_target_dir, read_manifest(store1, "filter",
                                                                        "test-filter"))
    for s, m in ((store, m2), (store1, m1)):
        assert m.key == ref.key and m.extra["dflash"]["resumed_from"] == steps[0]
        assert_same_weights(weights(ref_store, ref), weights(s, m))
        assert losses(s) == pytest.approx(losses(ref_store), rel=1e-4)


def test_two_nodes_cached_features_match_one_process(tmp_path: Path, tiny_target_dir: Path,  # noqa: F811
                                                     reference) -> None:
    """Two "nodes" of one process each join through a c10d rendezvous on 127.0.0.1 (FSDP2,
    cached features): each rank writes its share of the feature shards, byte-identical to a
    single builder's; losses and weights equal one process's (the reference's online features
    are the same fp32 numbers); node 1 returns node 0's commit."""
    from dflash_models.target import default_target_layer_ids, load_target
    from tasks.train import features_config, resolve_target
    from tasks.train_features import load_data, run_features

    ref_store, one = reference
    kw = dict(features="cached", feature_shard_tokens=400)
    store, fm = store_like(ref_store, tmp_path / "two")
    endpoint = f"127.0.0.1:{free_port()}"
    cfg = base_cfg(strategy="fsdp", nnodes=2, rdzv_endpoint=endpoint, **kw)
    node1 = spawn(tmp_path / "two/store", tiny_target_dir,
                  cfg.model_copy(update={"node_rank": 1}))
    two = run_train(store, cfg, tiny_target_dir, fm)
    log, _ = node1.communicate(timeout=120)
    assert node1.returncode == 0, log
    assert f"KEY {two.key}" in log
    assert losses(store) == pytest.approx(losses(ref_store), rel=1e-4)
    assert_same_weights(weights(ref_store, one), weights(store, two))
    # the same features built by one process, into another store
    store1, fm1 = store_like(ref_store, tmp_path / "one")
    target = load_target(tiny_target_dir, device="cpu")
    cfg1 = base_cfg(**kw)
    layers = default_target_layer_ids(target.num_layers, cfg1.num_feature_layers)
    f1 = run_features(store1, features_config(cfg1, layers, False),
                      {"target": resolve_target(tiny_target_dir)[1], "filter": fm1}, target,
                      load_data(store1, fm1, target, cfg1.selection()))
    assert f1.key == two.extra["features_key"]
    a, b = shard_contents(store1, f1.key), shard_contents(store, two.extra["features_key"])
    assert len([p for p in a if p.startswith("train-")]) >= 4  # both ranks had shards
    assert a == b


def shard_contents(store: Store, key: str) -> dict[str, tuple[dict, bytes]]:
    """Each feature shard as (parsed header, tensor bytes): safetensors writes its metadata
    from a hash map, so the header's key order varies between processes, not its content."""
    import struct

    out = {}
    for f in read_manifest(store, "features", key).files:
        if f.path.endswith(".safetensors"):
            raw = store.read_bytes(f"features/{key}/{f.path}")
            n = struct.unpack("<Q", raw[:8])[0]
            out[f.path] = (json.loads(raw[8:8 + n]), raw[8 + n:])
    return out


def test_s3_store_checkpoints_and_streamed_features_resume(
        s3_bucket: str, tiny_target_dir: Path, tiny_rows: list[dict],  # noqa: F811
        reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 (moto's server) a rank stages its checkpoint shard locally and uploads it, a resume
    downloads it, and cached features stream from local copies: a run that fails at step 13
    resumes from step 10 and ends with the uninterrupted (online, local) run's losses."""
    import tasks.train_dist as td
    from tests.test_train import write_filter

    ref_store, _ = reference
    store = Store(f"s3://{s3_bucket}/prefix")
    fm = write_filter(store, tiny_rows, n_eval=4)
    real, calls = td.train_step, {"n": 0}

    def failing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 13:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(td, "train_step", failing_step)
    cfg = base_cfg(features="cached", feature_shard_tokens=400)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_train(store, cfg, tiny_target_dir, fm)
    m = run_train(store, cfg, tiny_target_dir, fm)
    assert m.extra["dflash"]["resumed_from"] == 10
    assert losses(store) == pytest.approx(losses(ref_store), rel=1e-4)
    assert not store.find(f"{m.prefix}/checkpoints")


def test_world_and_cache_size_errors_come_before_any_work(tmp_path: Path) -> None:
    """One clear line each: a global batch that does not divide over the world, a multi-node
    config without a rendezvous, a feature cache over its limit or over the store's free space."""
    from pydantic import ValidationError

    from dflash_models.features import Example
    from tasks.train import features_config
    from tasks.train_features import TrainData, check_cache_size

    with pytest.raises(ValidationError, match="batch_size 6 is global and must divide evenly "
                                              "over nproc x nnodes = 4"):
        TrainConfig(batch_size=6, nproc=2, nnodes=2, rdzv_endpoint="h:1")
    with pytest.raises(ValidationError, match="needs train.rdzv_endpoint"):
        TrainConfig(nnodes=2)
    assert TrainConfig(batch_size=8, nproc=4, strategy="fsdp").key_config() == \
        TrainConfig(batch_size=8).key_config()
    cfg = features_config(TrainConfig(feature_dtype="bfloat16"), [1, 2, 3, 4], False)
    data = TrainData([Example(torch.zeros(1000, dtype=torch.long), 10, "regenerated", 0)] * 100,
                     [], {})
    store = Store(tmp_path / "store")
    need = check_cache_size(store, cfg, 4096, data, max_gb=10)
    assert need == 100 * 1000 * (4 * 4096 * 2 + 8)  # features + ids/greedy per token
    with pytest.raises(ValueError, match=r"would take 3\.3 GB, over train.feature_cache_max_gb"):
        check_cache_size(store, cfg, 4096, data, max_gb=1)
    with pytest.raises(ValueError, match="GB free under"):
        check_cache_size(store, cfg, 4096 * 10**5, data, max_gb=None)
