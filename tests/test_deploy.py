"""Scheduled deployments as a user runs them: `make deploy` on a real `prefect server`, a process
worker started OUTSIDE the checkout, and the pipeline deployment run with the CLI.

One module fixture does the expensive part once: two `make deploy` calls (the second with
NOTIFY=, showing it is idempotent), a worker, and four deployment runs (ci.yaml on a temporary
store seeded with the session's end-to-end outputs up to the draft, so the benchmark and the
report run and commit; the same again, which must be Cached; a bad config path, which must
fail with its one-line reason; and the weekly CPU benchmark deployment on the same store).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import Store
from storage.catalog import connect

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENTS = {"pipeline": "cpu", "pipeline-h100": "gpu-h100", "pipeline-h200": "gpu-h200",
               "bench-h100": "gpu-h100", "bench-h200": "gpu-h200", "bench-cpu": "cpu"}
HOOK = "http://127.0.0.1:9/dflash-hook"


def _env(tmp: Path, api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "PREFECT_LOGGING_LEVEL": "INFO"}


def _run_deployment(env: dict[str, str], *params: str,
                    name: str = "dflash-pipeline/pipeline") -> str:
    """`prefect deployment run <name> --param ...`: the new flow run's id."""
    cmd = [PREFECT, "deployment", "run", name]
    for p in params:
        cmd += ["--param", p]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout).group(1)


async def _wait(api: str, run_ids: list[str], timeout: float = 600) -> dict[str, Any]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        deadline = time.time() + timeout
        while True:
            runs = {i: await client.read_flow_run(i) for i in run_ids}
            if all(r.state and r.state.is_final() for r in runs.values()) or time.time() > deadline:
                return runs
            await asyncio.sleep(2)


async def _details(api: str, run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with PrefectClient(api) as client:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        tasks = await client.read_task_runs(flow_run_filter=runs)
        logs: list[Any] = []
        while page := await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), offset=len(logs)):
            logs += page
        artifacts = await client.read_artifacts(flow_run_filter=runs)
    return {"tasks": tasks, "logs": [x.message for x in logs],
            "artifacts": {a.key: a.data for a in artifacts if a.key}}


async def _server_objects(api: str) -> dict[str, Any]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        deployments = await client.read_deployments()
        automations = await client.read_automations()
    return {"deployments": {d.name: d for d in deployments}, "automations": automations}


@pytest.fixture(scope="module")
def deployed(prefect_server: str, resumed_run: dict, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deploy")
    api, env = prefect_server, _env(tmp, prefect_server)
    first = subprocess.run(["make", "deploy"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=400)
    again = subprocess.run(["make", "deploy", f"NOTIFY={HOOK}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
    elsewhere = tmp / "worker-dir"  # NOT the checkout: the pull step must put the run there
    elsewhere.mkdir()
    store = tmp / "store"  # the e2e run's outputs up to the draft: the benchmark runs anew
    src = Store(resumed_run["url"])
    for stage in ("targets", "prompts", "generations", "filter", "train"):
        src.fs.get(src.path(stage), str(store / stage), recursive=True)
    log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--limit", "4"],
                              cwd=elsewhere, env=env, stdout=log, stderr=log,
                              start_new_session=True)
    try:
        ci = "config_path=configs/ci.yaml"
        run1 = _run_deployment(env, ci, f"store={store}")
        bad = _run_deployment(env, "config_path=configs/nope.yaml", f"store={store}")
        states = asyncio.run(_wait(api, [run1, bad]))
        run2 = _run_deployment(env, ci, f"store={store}")
        states.update(asyncio.run(_wait(api, [run2])))
        bench = _run_deployment(env, ci, f"store={store}", name="dflash-benchmark-latest/bench-cpu")
        states.update(asyncio.run(_wait(api, [bench])))
        yield {"make": (first, again), "api": api, "store": str(store), "runs": states,
               "ids": {"first": run1, "bad": bad, "second": run2, "bench": bench}, "worker_log": tmp / "worker.log"}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        log.close()
        shutil.rmtree(store, ignore_errors=True)


def test_make_deploy_creates_pools_and_deployments_idempotently(deployed: dict) -> None:
    first, again = deployed["make"]
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    objs = asyncio.run(_server_objects(deployed["api"]))
    deps = objs["deployments"]
    assert {n: d.work_pool_name for n, d in deps.items()} == DEPLOYMENTS
    for name, d in deps.items():  # every deployment has its own parameters, not only schedules
        assert d.parameters["config_path"].startswith("configs/"), name
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                 {"directory": str(REPO)}}], name
        limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else None
        assert (limit == 1) == name.endswith(("h100", "h200")), name
    assert deps["bench-h200"].parameters == {"config_path": "configs/qwen3-8b.yaml", "rerun": True}
    alerts = [a for a in objs["automations"] if a.name == "dflash-failed-runs"]
    assert len(alerts) == 1 and alerts[0].enabled
    assert alerts[0].trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert [type(a).__name__ for a in alerts[0].actions] == ["SendNotification"]


def test_deployment_run_completes_and_links_history_and_logs(deployed: dict) -> None:
    run = deployed["runs"][deployed["ids"]["first"]]
    assert run.state.type.value == "COMPLETED", (run.state, deployed["worker_log"].read_text()[-3000:])
    con = connect(Store(deployed["store"]))
    for view in ("benchmarks", "benchmark_samples"):
        rows = con.execute(f"select distinct deployment from {view} where flow_run_id = ?",
                           [str(run.id)]).fetchall()
        assert rows == [("pipeline",)], view
    details = asyncio.run(_details(deployed["api"], str(run.id)))
    committed = [m for m in details["logs"] if ": committed " in m]
    assert any(m.startswith("bench_runs: committed") for m in committed), details["logs"]
    assert any(re.match(r"(targets|train): cached \(", m) for m in details["logs"])
    assert any(m.startswith("bench: run ") for m in details["logs"])  # INFO lines reach the run
    names = {t.name.rsplit("-", 1)[0] for t in details["tasks"]}
    assert {"prepare-target", "prompts", "generate-plan", "filter", "train", "benchmark",
            "report"} <= names
    keys = set(details["artifacts"])
    assert {"dflash-report-ci", "filter-stats-ci"} <= keys
    assert any(k.startswith("bench-") and k.endswith("-ci") for k in keys), keys
    assert details["artifacts"]["dflash-report-ci"].startswith("**Draft:** train/")


def test_second_deployment_run_is_cached(deployed: dict) -> None:
    run = deployed["runs"][deployed["ids"]["second"]]
    assert run.state.type.value == "COMPLETED", run.state
    tasks = asyncio.run(_details(deployed["api"], str(run.id)))["tasks"]
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}
    for stage in ("prepare-target", "prompts", "filter", "train", "benchmark"):
        assert states[stage] == "Cached", states


def test_benchmark_deployment_benchmarks_the_latest_draft_as_a_task(deployed: dict) -> None:
    """bench-cpu with its config overridden: a benchmark task (not Cached: rerun), its table."""
    run = deployed["runs"][deployed["ids"]["bench"]]
    assert run.state.type.value == "COMPLETED", run.state
    assert run.parameters["rerun"] is True  # the deployment's own parameter, kept
    details = asyncio.run(_details(deployed["api"], str(run.id)))
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in details["tasks"]}
    assert states["benchmark"] == "Completed" and states["report"] == "Completed", states
    assert any(k.startswith("bench-") and k.endswith("-ci") for k in details["artifacts"])
    con = connect(Store(deployed["store"]))
    assert con.execute("select distinct deployment from benchmarks where flow_run_id = ?",
                       [str(run.id)]).fetchall() == [("bench-cpu",)]


def test_bad_input_ends_failed_with_the_one_line_reason(deployed: dict) -> None:
    run = deployed["runs"][deployed["ids"]["bad"]]
    assert run.state.type.value == "FAILED", run.state
    assert re.fullmatch(r"config configs/nope\.yaml: file not found; pass --config PATH "
                        r"\(examples in .*/configs\)", run.state.message), run.state.message


def test_tasks_do_not_import_prefect() -> None:
    """Layering: flows/ injects progress, artifacts and run labels into tasks/."""
    offenders = [p.name for p in (REPO / "tasks").glob("*.py")
                 if re.search(r"^\s*(from|import) prefect", p.read_text(), re.M)]
    assert offenders == []


def test_retries_only_transient_failures() -> None:
    """Storage/network failures retry with backoff; a bad config never does."""
    import httpx
    from prefect.states import Failed

    from flows.pipeline import _transient, cached_stage, commit_task, shard_task
    from storage.errors import ConfigError, SchemaError, StoreError

    assert all(t.retries == 2 for t in (cached_stage, shard_task, commit_task))
    assert cached_stage.retry_delay_seconds == [10, 20]

    def retried(exc: BaseException) -> bool:
        return _transient(None, None, Failed(message=str(exc), data=exc))

    assert retried(StoreError("s3://b/x: connection reset")) and retried(ConnectionError("reset"))
    assert retried(httpx.ConnectError("refused"))
    assert not retried(ConfigError("config x: key 'a': bad")) and not retried(SchemaError("s"))
    assert not retried(ValueError("a bug"))
