"""The end-to-end pipeline on configs/ci.yaml: resume after SIGKILL, full caching, Prefect.

One real run is shared by the whole session (the fixture below): started against a moto S3
store through a proxy that fails 10% of requests with 503 (tests/s3_faults.py), killed with
SIGKILL during generation, and resumed to completion.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import CI, dflash_cli, pipeline_env

from storage import Store
from storage.catalog import connect
from storage.manifest import list_outputs

STAGES = ("targets", "prompts", "generations", "filter", "train", "bench_runs")


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

    from flows.pipeline import dflash_pipeline

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
        out = dflash_pipeline(config_path=str(CI), store=resumed_run["url"])
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
    from flows.pipeline import dflash_pipeline

    cfg = yaml.safe_load(CI.read_text())
    cfg["benchmark"]["methods"] = ["hf_generate", "dflash"]
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = Store(resumed_run["url"])
    before = {(o["stage"], o["key"]) for o in list_outputs(store)}
    dflash_pipeline(config_path=str(path), store=resumed_run["url"])
    new = {(o["stage"], o["key"]) for o in list_outputs(store)} - before
    assert {s for s, _ in new} <= {"bench_runs", "reports"} and any(s == "bench_runs" for s, _ in new)


def test_generation_shards_on_a_local_dask_cluster(prefect_harness: None, tmp_path: Path,
                                                   smollm2_dir: Path) -> None:
    """The config's `runner.dask_address` picks the task runner the shards fan out on."""
    from distributed import LocalCluster

    from flows.pipeline import dflash_pipeline

    cfg = yaml.safe_load(CI.read_text())
    cfg["prompts"]["sources"] = [{"kind": "sharegpt", "n": 4}]
    cfg["generate"].update(shard_size=2, max_new_tokens=6)
    store_dir = tmp_path / "store"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        cfg["runner"] = {"dask_address": cluster.scheduler_address}
        path = tmp_path / "dask.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = dflash_pipeline(config_path=str(path), store=str(store_dir), until="generate")
        on_dask = [n for n in cluster.scheduler.task_prefixes if "shard" in n]
    m = Store(str(store_dir)).read_json(out["generate"]["uri"].split(str(store_dir) + "/")[1])
    assert sorted(f["path"] for f in m["files"] if f["table"] == "generations") == \
        ["shard-00000.parquet", "shard-00001.parquet"]
    assert on_dask, list(cluster.scheduler.task_prefixes)  # the shards ran on the cluster


def test_real_prefect_server_records_runs_and_artifacts(resumed_run: dict, prefect_server: str,
                                                       tmp_path: Path) -> None:
    """A CLI run against the session's `prefect server`; checked through the client."""
    import asyncio

    api = prefect_server
    env = pipeline_env(tmp_path)
    run = dflash_cli(["run", "--config", str(CI), "--store", resumed_run["url"],
                   "--force", "report"], {**env, "PREFECT_API_URL": api},
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    runs, tasks, artifacts = asyncio.run(_query_server(api))
    runs = [r for r in runs if r.parameters.get("store") == resumed_run["url"]]
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    names = {t.name.split("-")[0] for t in tasks if t.flow_run_id == runs[0].id}
    assert {"prepare", "prompts", "filter", "train", "benchmark", "report"} <= names
    assert "dflash-report-ci" in {a.key for a in artifacts}


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
