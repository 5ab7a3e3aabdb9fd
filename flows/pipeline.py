"""The ``dflash-pipeline`` Prefect flow: it only wires the stages of ``tasks/`` together.

Every stage is a Prefect task whose cache key is derived from the stage's config section and its
upstream manifests' digests (plus the code fingerprint), and whose result is the small manifest
ref ``{stage, key, digest, uri}``, never data. A Prefect cache hit is re-checked against the store
(an output removed by ``dflash gc`` or ``--force`` is rebuilt). Without a Prefect cache (a new
machine, a new Prefect home) the stage function itself finds the committed manifest and returns
without loading a model, so the store is the single source of truth.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.config import DOWNSTREAM, STAGES, PipelineConfig, load_config
from storage import Manifest, Store, read_manifest
from storage.errors import DflashError
from storage.hardware import hardware_fingerprint, hardware_tag, slug
from storage.keys import digest
from tasks.base import stage_code

log = logging.getLogger("dflash")
STAGE_MODULES = {"target": "models", "prompts": "prompts", "generate": "generate",
                 "filter": "filter", "train": "train", "benchmark": "benchmark"}


class RunOptions(BaseModel):
    """Flow parameters (the Prefect UI shows them as a form)."""

    config_path: str = Field("configs/default.yaml", description="pipeline YAML, repo-relative")
    store: str | None = Field(None, description="store URL; default: config, $DFLASH_STORE, ./dflash-store")
    prompts: str | None = Field(None, description="prompt file/folder overriding the config")
    force: list[str] = Field(default_factory=list, description="stages to rebuild (and downstream)")
    rerun: bool = Field(False, description="benchmark again even if this hardware has a result")
    until: str = Field("report", description="last stage to run")


# ----------------------------------------------------------------------------- helpers
def resolve(options: RunOptions) -> tuple[PipelineConfig, Store]:
    """Validate config, store and prompt inputs BEFORE any model loads or flow work."""
    from tasks.prompts import validate_prompts

    overrides = {"prompts.path": options.prompts} if options.prompts else None
    cfg = load_config(options.config_path, overrides)
    store = Store(options.store or os.environ.get("DFLASH_STORE") or cfg.store)
    unknown = [s for s in options.force if s not in STAGES]
    if unknown:
        raise DflashError(f"--force {unknown[0]}: unknown stage; choose from {', '.join(STAGES)}")
    if options.until not in STAGES:
        raise DflashError(f"until={options.until!r}: unknown stage; choose from {', '.join(STAGES)}")
    validate_prompts(cfg.prompts)
    return cfg, store


def forced(options: RunOptions) -> set[str]:
    return {d for s in options.force for d in DOWNSTREAM[s]}


def load_ref(store: Store, ref: dict[str, str]) -> Manifest:
    m = read_manifest(store, ref["stage"], ref["key"])
    if m is None:
        raise DflashError(f"{ref['uri']}: output vanished from the store; rerun the pipeline")
    return m


def _cache_key(ctx: Any, params: dict[str, Any]) -> str:
    return params["cache_key"]


def prefect_key(stage: str, section: Any, refs: dict[str, dict[str, str]], extra: Any = None) -> str:
    """Prefect's cache key: the stage, its config, its inputs' digests and its code."""
    code = stage_code(STAGE_MODULES[stage]) if stage in STAGE_MODULES else ""
    inputs = {k: r["digest"] for k, r in refs.items()}
    return f"{stage}-" + digest([stage, section, inputs, code, extra])[:24]


def run_cached(t: Any, stage: str, force: set[str], store: Store, **params: Any) -> dict[str, str]:
    """Call a stage task through Prefect's cache, rebuilding if the store lost its output."""
    refresh = stage in force
    ref = t.with_options(refresh_cache=refresh)(force=refresh, **params)
    if not refresh and read_manifest(store, ref["stage"], ref["key"]) is None:
        ref = t.with_options(refresh_cache=True)(force=False, **params)
    return ref


_TASK = dict(persist_result=True, result_serializer="json", cache_key_fn=_cache_key)


# ----------------------------------------------------------------------------- tasks
@task(name="prepare-target", **_TASK)
def prepare_target(cache_key: str, store_url: str, cfg: dict, force: bool = False) -> dict:
    from tasks.models import TargetConfig, run_prepare_target

    store = Store(store_url)
    return run_prepare_target(store, TargetConfig(**cfg), force=force).ref(store)


@task(name="prompts", **_TASK)
def build_prompts(cache_key: str, store_url: str, cfg: dict, target: dict,
                  force: bool = False) -> dict:
    from tasks.prompts import PromptsConfig, run_prompts

    store = Store(store_url)
    m = run_prompts(store, PromptsConfig(**cfg), load_ref(store, target), force=force)
    return m.ref(store)


@task(name="generate-plan", cache_policy=NO_CACHE)
def plan_generation(store_url: str, cfg: dict, target: dict, prompts: dict,
                    force: bool = False) -> Any:
    from tasks.generate import GenerateConfig
    from tasks.generate import plan_generation as plan

    store = Store(store_url)
    return plan(store, GenerateConfig(**cfg), load_ref(store, target), load_ref(store, prompts),
                force=force)


@task(name="generate-shard", cache_policy=NO_CACHE, retries=1)
def generate_shard(store_url: str, plan: Any, shard_index: int) -> dict:
    from tasks.generate import generate_shard as gen

    return gen(Store(store_url), plan, shard_index)


@task(name="generate-commit", cache_policy=NO_CACHE)
def commit_generation(store_url: str, plan: Any) -> dict:
    from tasks.generate import commit_generation as commit

    store = Store(store_url)
    return commit(store, plan).ref(store)


@task(name="filter", **_TASK)
def filter_data(cache_key: str, store_url: str, cfg: dict, generations: dict,
                force: bool = False) -> dict:
    from tasks.filter import FilterConfig, filter_stats_rows, run_filter
    from tasks.prompts import contamination_prompts

    store = Store(store_url)
    fcfg = FilterConfig(**cfg)
    m = run_filter(store, fcfg, load_ref(store, generations),
                   benchmark_prompts=contamination_prompts(fcfg), force=force)
    _table_artifact("filter-stats", filter_stats_rows(store, m), "Rows removed by each rule, in order")
    return m.ref(store)


@task(name="train", **_TASK)
def train_draft(cache_key: str, store_url: str, cfg: dict, target: dict, filtered: dict,
                force: bool = False) -> dict:
    from tasks.train import TrainConfig, run_train

    store = Store(store_url)
    m = run_train(store, TrainConfig(**cfg), load_ref(store, target), load_ref(store, filtered),
                  force=force)
    return m.ref(store)


@task(name="benchmark", **_TASK)
def benchmark(cache_key: str, store_url: str, cfg: dict, target: dict, trained: dict | None,
              filtered: dict | None, rerun: bool = False, force: bool = False) -> dict:
    from tasks.benchmark import BenchConfig, bench_table_rows, run_benchmark

    store = Store(store_url)
    result = run_benchmark(store, BenchConfig(**cfg), load_ref(store, target),
                           load_ref(store, trained) if trained else None,
                           load_ref(store, filtered) if filtered else None,
                           rerun=rerun or force)
    tgt = load_ref(store, target).config.get("ref", "target")
    _table_artifact(f"bench-{hardware_tag()}-{slug(str(tgt))}", bench_table_rows(store, result),
                    "Benchmark: tau, speedup and exact match per method and dataset")
    return result["ref"]


@task(name="report", cache_policy=NO_CACHE)
def report(store_url: str) -> dict:
    from reports.report import build_report

    store = Store(store_url)
    out = build_report(store)
    try:
        create_markdown_artifact(key="dflash-report", markdown=out["summary_markdown"],
                                 description="DFlash report")
    except Exception as e:  # an artifact is a view, never a reason to fail the run
        log.warning("cannot create the report artifact: %s", e)
    return {"uri": out["uri"]}


def _table_artifact(key: str, rows: list[dict[str, Any]], description: str) -> None:
    try:
        create_table_artifact(key=slug(key), table=rows, description=description)
    except Exception as e:
        log.warning("cannot create table artifact %s: %s", key, e)


# ----------------------------------------------------------------------------- flows
@flow(name="dflash-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def dflash_pipeline(options: RunOptions = RunOptions()) -> dict[str, Any]:  # noqa: B008
    """Prepare target, prompts, generate, filter, train, benchmark, report; each stage cached."""
    cfg, store = resolve(options)
    force, url, out = forced(options), store.url, {}
    logger = get_run_logger()
    stop = STAGES.index(options.until)

    sec = cfg.target.model_dump(mode="json")
    out["target"] = run_cached(prepare_target, "target", force, store, store_url=url, cfg=sec,
                               cache_key=prefect_key("target", sec, {}))
    if stop >= 1:
        sec, refs = cfg.prompts.model_dump(mode="json"), {"target": out["target"]}
        out["prompts"] = run_cached(build_prompts, "prompts", force, store, store_url=url, cfg=sec,
                                    target=out["target"], cache_key=prefect_key("prompts", sec, refs))
    if stop >= 2:
        sec = cfg.generate.model_dump(mode="json")
        plan = plan_generation(url, sec, out["target"], out["prompts"], force="generate" in force)
        if plan.committed is not None:
            out["generate"] = plan.committed
        else:
            logger.info("generating %d shard(s), %d already done", len(plan.shards), len(plan.done))
            futures = generate_shard.map(unmapped(url), unmapped(plan), plan.pending())
            futures.wait()
            for f in futures:
                f.result()  # raise the first shard failure
            out["generate"] = commit_generation(url, plan)
    if stop >= 3:
        sec, refs = cfg.filter.model_dump(mode="json"), {"generations": out["generate"]}
        out["filter"] = run_cached(filter_data, "filter", force, store, store_url=url, cfg=sec,
                                   generations=out["generate"],
                                   cache_key=prefect_key("filter", sec, refs))
    if stop >= 4:
        sec = cfg.train.model_dump(mode="json")
        refs = {"target": out["target"], "filter": out["filter"]}
        out["train"] = run_cached(train_draft, "train", force, store, store_url=url, cfg=sec,
                                  target=out["target"], filtered=out["filter"],
                                  cache_key=prefect_key("train", cfg.train.key_config(), refs))
    if stop >= 5:
        sec = cfg.benchmark.model_dump(mode="json")
        refs = {"target": out["target"], "train": out["train"], "filter": out["filter"]}
        key = prefect_key("benchmark", sec, refs, extra=hardware_fingerprint())
        out["benchmark"] = run_cached(
            benchmark, "benchmark", force, store, store_url=url, cfg=sec, target=out["target"],
            trained=out["train"], filtered=out["filter"], rerun=options.rerun,
            cache_key=key + ("-rerun-" + os.urandom(4).hex() if options.rerun else ""))
    if stop >= 6:
        out["report"] = report(url)
    return out


@flow(name="dflash-benchmark-latest")
def benchmark_latest(options: RunOptions = RunOptions(rerun=True)) -> dict[str, Any]:  # noqa: B008
    """Benchmark the latest committed draft in the store on this worker's hardware (always appends)."""
    from tasks.benchmark import BenchConfig, run_benchmark

    cfg, store = resolve(options)
    trained = _committed(store, "train")
    if not trained:
        raise DflashError(f"store {store.url}: no committed draft (train output) to benchmark; "
                          "run `dflash run` first")
    latest = max(trained, key=lambda m: m.created_at)
    target = _by_digest(store, "targets", set(latest.inputs.values()))
    filtered = _by_digest(store, "filter", set(latest.inputs.values()))
    if target is None:
        raise DflashError(f"store {store.url}: the target of draft {latest.key} is not in the store")
    result = run_benchmark(store, BenchConfig(**cfg.benchmark.model_dump()), target, latest,
                           filtered, rerun=True)
    return {"benchmark": result["ref"], "report": report(store.url)}


def _committed(store: Store, stage: str) -> list[Manifest]:
    found = []
    for key_dir in store.ls(stage):
        m = read_manifest(store, stage, key_dir.rsplit("/", 1)[-1])
        if m is not None:
            found.append(m)
    return found


def _by_digest(store: Store, stage: str, digests: set[str]) -> Manifest | None:
    return next((m for m in _committed(store, stage) if m.digest in digests), None)


# ----------------------------------------------------------------------------- CLI glue
def run_from_cli(command: str, args: argparse.Namespace) -> None:
    """``dflash run|generate|filter|train|bench|report``: validate, then run the flow."""
    until = {"run": "report", "generate": "generate", "filter": "filter", "train": "train",
             "bench": "benchmark", "report": "report"}[command]
    options = RunOptions(config_path=args.config or "configs/default.yaml", store=args.store,
                         prompts=getattr(args, "prompts", None), force=getattr(args, "force", []),
                         rerun=getattr(args, "rerun", False), until=until)
    if command == "bench" and getattr(args, "draft", None):
        from tasks.benchmark import BenchConfig, bench_any_draft

        cfg, store = resolve(options)
        bench_any_draft(store, BenchConfig(**cfg.benchmark.model_dump()), args.draft,
                        args.target or cfg.target.ref, rerun=options.rerun)
        return
    if command == "report":
        from reports.report import build_report

        _, store = resolve(options)
        print(build_report(store)["uri"])
        return
    cfg, _ = resolve(options)  # fail fast, one line, before Prefect starts
    _quiet_prefect(args.debug)
    flow_fn = dflash_pipeline
    if cfg.runner.dask_address:
        from prefect_dask import DaskTaskRunner

        flow_fn = flow_fn.with_options(task_runner=DaskTaskRunner(address=cfg.runner.dask_address))
    elif cfg.runner.max_workers > 1:
        flow_fn = flow_fn.with_options(
            task_runner=ThreadPoolTaskRunner(max_workers=cfg.runner.max_workers))
    state = flow_fn(options=options, return_state=True)
    if state.is_failed():
        try:
            state.result()
        except DflashError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DflashError(f"flow failed: {type(e).__name__}: {first}") from e


def _quiet_prefect(debug: bool) -> None:
    """Prefect logs failures with tracebacks; the CLI shows one line unless --debug."""
    if debug:
        return

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info = None
            record.exc_text = None
            return True

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTraceback())
