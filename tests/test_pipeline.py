"""The end-to-end pipeline on configs/ci.yaml: resume after SIGKILL, full caching, Prefect.

One real run is shared by the whole session (the fixture below): started against a moto S3
store through a proxy that fails 10% of requests with 503 (tests/s3_faults.py), killed with
SIGKILL during generation, and resumed to completion.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from s3_faults import FaultProxy

from storage import Store
from storage.catalog import connect
from storage.manifest import list_outputs

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "ci.yaml"
STAGES = ("targets", "prompts", "generations", "filter", "train", "bench_runs")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _dflash(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            start_new_session=True, **kw)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def resumed_run(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
                smollm2_dir: Path) -> dict:
    """ci.yaml on moto S3: SIGKILL during generation, then a rerun to completion."""
    import boto3

    tmp = tmp_path_factory.mktemp("e2e")
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/ci"
    proxy = FaultProxy(s3_endpoint, rate=0.10)  # the runs' S3: 10% of requests answer 503
    env = _env(tmp, AWS_ENDPOINT_URL=proxy.url)
    store = Store(url)
    log1 = open(tmp / "run1.log", "w")
    first = _dflash(["run", "--config", str(CI), "--store", url], env, stdout=log1, stderr=log1)
    deadline = time.time() + 600
    shard0 = None
    while time.time() < deadline and first.poll() is None:
        parts = [f for f in store.find("generations") if "/_parts/shard-00000" in f]
        if parts:
            shard0 = parts[0]
            break
        time.sleep(0.5)
    assert shard0 is not None, (tmp / "run1.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group, Prefect's server included
    first.wait()
    gen_prefix = shard0.split("/_parts/")[0]
    assert not store.exists(f"{gen_prefix}/manifest.json")
    info0 = store.fs.info(store.path(f"{gen_prefix}/shard-00000.parquet"), refresh=True)
    log2 = open(tmp / "run2.log", "w")
    second = _dflash(["run", "--config", str(CI), "--store", url], env, stdout=log2, stderr=log2)
    assert second.wait(timeout=900) == 0, (tmp / "run2.log").read_text()[-3000:]
    info1 = store.fs.info(store.path(f"{gen_prefix}/shard-00000.parquet"), refresh=True)
    return {"url": url, "gen_prefix": gen_prefix, "shard0_before": info0, "shard0_after": info1,
            "log": (tmp / "run2.log").read_text(), "tmp": tmp, "proxy": proxy}


def test_runs_survived_s3_faults_and_verify_passes(resumed_run: dict) -> None:
    from flows.cli import main

    assert resumed_run["proxy"].faults > 0  # 503s were sent, and retried through
    assert main(["verify", "--store", resumed_run["url"]]) == 0


def test_resume_did_not_regenerate_finished_shards(resumed_run: dict) -> None:
    assert resumed_run["shard0_before"]["ETag"] == resumed_run["shard0_after"]["ETag"]
    store = Store(resumed_run["url"])
    m = store.read_json(f"{resumed_run['gen_prefix']}/manifest.json")
    shards = sorted(f["path"] for f in m["files"] if f["table"] == "generations")
    assert shards == sorted(set(shards)) and len(shards) == 3  # 12 prompts / 4 per shard
    n_rows = sum(f["rows"] for f in m["files"] if f["table"] in ("generations", "generation_errors"))
    assert n_rows == 12  # success + errors = input count: none lost, none duplicated


def test_every_stage_output_exactly_once(resumed_run: dict) -> None:
    outputs = list_outputs(Store(resumed_run["url"]))
    for stage in STAGES:
        mine = [o for o in outputs if o["stage"] == stage]
        assert [o["status"] for o in mine] == ["committed"], (stage, mine)


def test_every_view_has_rows(resumed_run: dict) -> None:
    con = connect(Store(resumed_run["url"]))
    for view in ("generations", "filter_stats", "train_metrics", "benchmarks", "benchmark_samples"):
        assert con.execute(f"select count(*) from {view}").fetchone()[0] > 0, view
    methods = {r[0] for r in con.execute("select distinct method from benchmarks").fetchall()}
    assert methods == {"hf_generate", "ar", "dflash", "classic", "hf_assisted", "prompt_lookup"}
    assert con.execute("select count(*) from benchmarks where temperature is null "
                       "or tau is null or speedup is null").fetchone()[0] == 0


def test_third_run_is_fully_cached(resumed_run: dict, prefect_harness: None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No model load and no forward pass when every stage is cached in the store."""
    import torch
    import transformers

    from flows.pipeline import RunOptions, dflash_pipeline

    counts = {"loads": 0, "forwards": 0}
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def counting_from_pretrained(cls, *a, **kw):
        counts["loads"] += 1
        return original(cls, *a, **kw)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(counting_from_pretrained))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: counts.__setitem__("forwards", counts["forwards"] + 1))
    before = list_outputs(Store(resumed_run["url"]))
    try:
        out = dflash_pipeline(options=RunOptions(config_path=str(CI), store=resumed_run["url"]))
    finally:
        handle.remove()
    assert counts == {"loads": 0, "forwards": 0}
    after = list_outputs(Store(resumed_run["url"]))
    assert [(o["stage"], o["key"]) for o in after if o["stage"] != "reports"] == \
        [(o["stage"], o["key"]) for o in before if o["stage"] != "reports"]
    assert out["report"]["uri"].endswith("report.html")


def test_config_change_reruns_only_downstream(resumed_run: dict, prefect_harness: None,
                                              tmp_path: Path) -> None:
    """A benchmark-only change reruns the benchmark (and report), nothing upstream."""
    from flows.pipeline import RunOptions, dflash_pipeline

    cfg = yaml.safe_load(CI.read_text())
    cfg["benchmark"]["methods"] = ["hf_generate", "dflash"]
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = Store(resumed_run["url"])
    before = {(o["stage"], o["key"]) for o in list_outputs(store)}
    dflash_pipeline(options=RunOptions(config_path=str(path), store=resumed_run["url"]))
    new = {(o["stage"], o["key"]) for o in list_outputs(store)} - before
    assert {s for s, _ in new} <= {"bench_runs", "reports"} and any(s == "bench_runs" for s, _ in new)


def test_generation_shards_on_a_local_dask_cluster(prefect_harness: None, tmp_path: Path,
                                                   smollm2_dir: Path) -> None:
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import RunOptions, dflash_pipeline

    cfg = yaml.safe_load(CI.read_text())
    cfg["prompts"]["sources"] = [{"kind": "sharegpt", "n": 4}]
    cfg["generate"].update(shard_size=2, max_new_tokens=6)
    path = tmp_path / "dask.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store_dir = tmp_path / "store"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        flow = dflash_pipeline.with_options(
            task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        out = flow(options=RunOptions(config_path=str(path), store=str(store_dir),
                                      until="generate"))
    m = Store(str(store_dir)).read_json(out["generate"]["uri"].split(str(store_dir) + "/")[1])
    assert sorted(f["path"] for f in m["files"] if f["table"] == "generations") == \
        ["shard-00000.parquet", "shard-00001.parquet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_prefect_server_records_runs_and_artifacts(resumed_run: dict, tmp_path: Path) -> None:
    """`prefect server start` on 127.0.0.1; a CLI run against it; checked through the client."""
    import asyncio

    import httpx

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path)
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 180 s")
        run = _dflash(["run", "--config", str(CI), "--store", resumed_run["url"],
                       "--force", "report"], {**env, "PREFECT_API_URL": api},
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
        runs, tasks, artifacts = asyncio.run(_query_server(api))
        assert [r.state.type.value for r in runs] == ["COMPLETED"]
        names = {t.name.split("-")[0] for t in tasks}
        assert {"prepare", "prompts", "filter", "train", "benchmark", "report"} <= names
        assert "dflash-report" in {a.key for a in artifacts}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


async def _query_server(api: str):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with PrefectClient(api) as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dflash-pipeline"])))
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
        tasks = await client.read_task_runs(flow_run_filter=run_filter)
        artifacts = await client.read_artifacts(flow_run_filter=run_filter)
    return runs, tasks, artifacts
