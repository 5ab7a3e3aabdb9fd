"""The pipeline as a table: each stage's name, the function doing its work and what it reads.

A stage function takes ``(store, section, inputs, ctx)``: its config section (a dict, as stored in
Prefect's cache key), the committed manifests of its inputs by stage name, and the run's options;
it returns the manifest's small ref. Adding a stage is one function and one ``Stage(...)`` line.
Generate fans out (``FanOut``): a plan, one task per pending shard, then a commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.hooks import artifact_key
from storage import Manifest, Store
from tasks.progress import run_hooks

log = logging.getLogger("dflash")


@dataclass(frozen=True)
class StageContext:
    """Run options every stage function may read."""

    force: bool = False
    rerun: bool = False
    scope: str = "default"  # the config name: artifact keys


StageFn = Callable[[Store, dict, dict[str, Manifest], StageContext], dict]


@dataclass(frozen=True)
class FanOut:
    """plan(store, section, inputs, force) -> plan; shard(store, plan, i); commit(store, plan)."""

    plan: Callable[..., Any]
    shard: Callable[..., Any]
    commit: Callable[..., Manifest]
    workers: Callable[[dict], int] = lambda section: 1  # shards in flight the section needs


@dataclass(frozen=True)
class Stage:
    name: str  # a flows.config.STAGES entry: the config section and the CLI/UI choice
    task_name: str  # the Prefect task's name in the UI
    inputs: tuple[str, ...]  # stages whose committed manifests it reads
    run: StageFn | None = None
    code_module: str | None = None  # tasks/<module>.py: part of Prefect's cache key; None: no cache
    fan_out: FanOut | None = None
    per_hardware: bool = False  # the cache key includes this machine's hardware fingerprint


# ----------------------------------------------------------------------------- stage functions
def _target(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from tasks.models import TargetConfig, run_prepare_target

    return run_prepare_target(store, TargetConfig(**sec), force=ctx.force).ref(store)


def _prompts(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from tasks.prompts import PromptsConfig, run_prompts

    return run_prompts(store, PromptsConfig(**sec), inputs["target"], force=ctx.force).ref(store)


def _plan(store: Store, sec: dict, inputs: dict[str, Manifest], force: bool) -> Any:
    from tasks.generate import GenerateConfig, plan_generation

    return plan_generation(store, GenerateConfig(**sec), inputs["target"], inputs["prompts"],
                           force=force)


def _shard(store: Store, plan: Any, shard_index: int) -> dict:
    from tasks.generate import generate_shard

    return generate_shard(store, plan, shard_index)


def _commit(store: Store, plan: Any) -> Manifest:
    from tasks.generate import commit_generation

    return commit_generation(store, plan)


def _shards_in_flight(sec: dict) -> int:
    from tasks.generate import GenerateConfig, shards_in_flight

    return shards_in_flight(GenerateConfig(**sec))


def _filter(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from tasks.filter import FilterConfig, filter_stats_rows, run_filter
    from tasks.prompts import contamination_prompts

    cfg = FilterConfig(**sec)
    m = run_filter(store, cfg, inputs["generate"], benchmark_prompts=contamination_prompts(cfg),
                   force=ctx.force)
    run_hooks().table("filter-stats", filter_stats_rows(store, m),
                      "Rows removed by each rule, in order")
    return m.ref(store)


def _train(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from tasks.train import TrainConfig, run_train

    return run_train(store, TrainConfig(**sec), inputs["target"], inputs["filter"],
                     force=ctx.force).ref(store)


def _benchmark(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from storage.hardware import hardware_tag
    from tasks.benchmark import BenchConfig, bench_artifact_key, bench_table_rows, run_benchmark

    result = run_benchmark(store, BenchConfig(**sec), inputs["target"], inputs.get("train"),
                           inputs.get("filter"), rerun=ctx.rerun or ctx.force)
    tgt = str(inputs["target"].config.get("ref", "target"))
    run_hooks().table(bench_artifact_key(hardware_tag(), tgt), bench_table_rows(result),
                      "Benchmark: tau, speedup and exact match per method and dataset")
    return result["ref"]


def _report(store: Store, sec: dict, inputs: dict[str, Manifest], ctx: StageContext) -> dict:
    from reports.report import build_report

    out = build_report(store)
    draft = inputs.get("train")
    report_artifact(out["uri"], out["summary_markdown"], draft.key if draft else None)
    return {"uri": out["uri"]}


def report_artifact(uri: str, summary: str, draft: str | None) -> None:
    """The report summary (naming the draft) plus a link to the page in the store."""
    if not run_hooks().in_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    head = f"**Draft:** train/{draft}\n\n" if draft else ""
    try:
        create_markdown_artifact(key=artifact_key("dflash-report"), markdown=head + summary,
                                 description=f"DFlash report: {uri}")
        if uri.startswith(("http://", "https://", "s3://")):
            create_link_artifact(link=uri, link_text="report.html",
                                 key=artifact_key("dflash-report-link"),
                                 description="The full report in the store")
    except Exception as e:  # an artifact is a view, never a reason to fail the run
        log.warning("cannot create the report artifact: %s", e)


# ----------------------------------------------------------------------------- the table
PIPELINE: tuple[Stage, ...] = (
    Stage("target", "prepare-target", (), _target, "models"),
    Stage("prompts", "prompts", ("target",), _prompts, "prompts"),
    Stage("generate", "generate", ("target", "prompts"), code_module="generate",
          fan_out=FanOut(_plan, _shard, _commit, _shards_in_flight)),
    Stage("filter", "filter", ("generate",), _filter, "filter"),
    Stage("train", "train", ("target", "filter"), _train, "train"),
    Stage("benchmark", "benchmark", ("target", "train", "filter"), _benchmark, "benchmark",
          per_hardware=True),
    Stage("report", "report", ("train",), _report),
)
BY_NAME = {s.name: s for s in PIPELINE}
