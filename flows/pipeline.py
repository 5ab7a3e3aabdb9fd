"""The ``dflash-pipeline`` Prefect flows: one generic stage task driven by ``flows.stages.PIPELINE``.

Every stage is a Prefect task whose cache key is derived from the stage's config section and its
upstream manifests' digests (plus the code fingerprint), and whose result is the small manifest
ref ``{stage, key, digest, uri}``, never data. A Prefect cache hit is re-checked against the store
(an output removed by ``dflash gc`` or ``--force`` is rebuilt). Without a Prefect cache (a new
machine, a new Prefect home) the stage function itself finds the committed manifest and returns
without loading a model, so the store is the single source of truth.

Flow parameters are flat and typed (the Prefect UI's Run form shows them; stage names are a
``Literal`` so the form offers choices). Bad input ends the run Failed with the one-line reason as
its state message. Generation shards fan out on the task runner the config's ``runner`` section
names, for CLI and deployment runs alike.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Literal, get_args

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from flows import hooks
from flows.config import DOWNSTREAM, STAGES, PipelineConfig, RunnerConfig, load_config
from flows.stages import BY_NAME, PIPELINE, Stage, StageContext
from storage import Manifest, Store, read_manifest
from storage.errors import ConfigError, DflashError, SchemaError, StoreError
from storage.hardware import hardware_fingerprint
from storage.keys import digest
from tasks.base import stage_code

log = logging.getLogger("dflash")
hooks.install()

StageName = Literal["target", "prompts", "generate", "filter", "train", "benchmark", "report"]
assert get_args(StageName) == STAGES == tuple(s.name for s in PIPELINE)


class RunOptions(BaseModel):
    """The flows' parameters as one object (the CLI builds it; ``resolve`` checks it)."""

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


def prefect_key(st: Stage, section: Any, refs: dict[str, dict[str, str]], rerun: bool) -> str:
    """Prefect's cache key: the stage, its config, its inputs' digests and its code (and this
    machine's hardware for a benchmark; a rerun benchmark gets a fresh key, so it always runs)."""
    code = stage_code(st.code_module) if st.code_module else ""
    inputs = {k: r["digest"] for k, r in refs.items()}
    extra = hardware_fingerprint() if st.per_hardware else None
    key = f"{st.name}-" + digest([st.name, section, inputs, code, extra])[:24]
    return key + ("-rerun-" + os.urandom(4).hex() if rerun and st.per_hardware else "")


def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry storage and network failures; never a deterministic one (bad config, bad data)."""
    import httpx

    try:
        state.result()
    except (ConfigError, SchemaError):
        return False
    except (StoreError, OSError, httpx.TransportError):
        return True
    except Exception:
        return False
    return False


def _cache_key(ctx: Any, params: dict[str, Any]) -> str:
    return params["cache_key"]


_RETRY = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
              retry_condition_fn=_transient)


# ----------------------------------------------------------------------------- the stage tasks
def _execute(stage: str, store_url: str, section: dict, refs: dict[str, dict[str, str]],
             ctx: dict[str, Any]) -> dict:
    store, c = Store(store_url), StageContext(**ctx)
    with hooks.scoped(c.scope):
        return BY_NAME[stage].run(store, section, {k: load_ref(store, r) for k, r in refs.items()}, c)


@task(name="stage", persist_result=True, result_serializer="json", cache_key_fn=_cache_key, **_RETRY)
def cached_stage(cache_key: str, stage: str, store_url: str, section: dict,
                 refs: dict[str, dict[str, str]], ctx: dict[str, Any]) -> dict:
    """A stage whose result Prefect caches by ``cache_key`` (the UI shows it as Cached)."""
    return _execute(stage, store_url, section, refs, ctx)


@task(name="stage", cache_policy=NO_CACHE, **_RETRY)
def uncached_stage(stage: str, store_url: str, section: dict, refs: dict[str, dict[str, str]],
                   ctx: dict[str, Any]) -> dict:
    return _execute(stage, store_url, section, refs, ctx)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(stage: str, store_url: str, section: dict, refs: dict[str, dict[str, str]],
              force: bool = False) -> Any:
    store = Store(store_url)
    inputs = {k: load_ref(store, r) for k, r in refs.items()}
    return BY_NAME[stage].fan_out.plan(store, section, inputs, force)


@task(name="shard", cache_policy=NO_CACHE, **_RETRY)
def shard_task(stage: str, store_url: str, plan: Any, shard_index: int) -> dict:
    return BY_NAME[stage].fan_out.shard(Store(store_url), plan, shard_index)


@task(name="commit", cache_policy=NO_CACHE, **_RETRY)
def commit_task(stage: str, store_url: str, plan: Any) -> dict:
    store = Store(store_url)
    return BY_NAME[stage].fan_out.commit(store, plan).ref(store)


@contextlib.contextmanager
def task_runner(cfg: RunnerConfig, workers: int = 1) -> Iterator[Any]:
    """The config's runner for fan-out: a Dask cluster when an address is set, else threads
    (``runner.max_workers``, or the ``workers`` the stage needs when that is unset)."""
    if cfg.dask_address:
        from prefect_dask import DaskTaskRunner

        runner: Any = DaskTaskRunner(address=cfg.dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=cfg.max_workers or workers)
    with runner:
        yield runner


def run_stage(st: Stage, cfg: PipelineConfig, store: Store, refs: dict[str, dict[str, str]],
              options: RunOptions) -> dict:
    """One row of the table: through Prefect's cache, rebuilt if the store lost its output."""
    sec = getattr(cfg, st.name, None)
    section = sec.model_dump(mode="json") if sec is not None else {}
    # what the output depends on: a section may leave out how it runs (train: world size)
    key_section = sec.key_config() if hasattr(sec, "key_config") else section
    force = st.name in forced(options)
    ctx = StageContext(force=force, rerun=options.rerun, scope=cfg.name)
    if st.fan_out is not None:
        return _fan_out(st, cfg, store, section, refs, ctx)
    params = dict(stage=st.name, store_url=store.url, section=section, refs=refs, ctx=asdict(ctx))
    if st.code_module is None:
        return uncached_stage.with_options(name=st.task_name)(**params)
    key = prefect_key(st, key_section, refs, options.rerun)
    ref = cached_stage.with_options(name=st.task_name, refresh_cache=force)(cache_key=key, **params)
    if not force and read_manifest(store, ref["stage"], ref["key"]) is None:
        params["ctx"] = asdict(StageContext(force=False, rerun=options.rerun, scope=cfg.name))
        ref = cached_stage.with_options(name=st.task_name, refresh_cache=True)(cache_key=key,
                                                                               **params)
    return ref


def _fan_out(st: Stage, cfg: PipelineConfig, store: Store, section: dict,
             refs: dict[str, dict[str, str]], ctx: StageContext) -> dict:
    """plan -> one task per pending shard on the config's runner -> commit."""
    name = st.task_name
    plan = plan_task.with_options(name=f"{name}-plan")(st.name, store.url, section, refs,
                                                       force=ctx.force)
    if plan.committed is not None:
        return plan.committed
    log.info("%s: %d shard(s), %d already done", st.name, len(plan.shards), len(plan.done))
    with task_runner(cfg.runner, st.fan_out.workers(section)) as runner:
        futures = runner.map(shard_task.with_options(name=f"{name}-shard"),
                             {"stage": unmapped(st.name), "store_url": unmapped(store.url),
                              "plan": unmapped(plan), "shard_index": plan.pending()})
        futures.wait()
        for f in futures:
            f.result()  # raise the first shard failure
    return commit_task.with_options(name=f"{name}-commit")(st.name, store.url, plan)


def _failed(e: DflashError) -> State:
    """The run ends Failed with the one-line reason as its message (shown in the UI)."""
    log.error("%s", e)
    return Failed(message=str(e), data=e)


# ----------------------------------------------------------------------------- flows
@flow(name="dflash-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def dflash_pipeline(config_path: str = "configs/default.yaml", store: str | None = None,
                    prompts: str | None = None, force: list[StageName] | None = None,
                    rerun: bool = False, until: StageName = "report") -> Any:
    """Prepare target, prompts, generate, filter, train, benchmark, report; each stage cached.

    ``config_path``: pipeline YAML (relative to the checkout); ``store``: store URL (default: the
    config's, $DFLASH_STORE, ./dflash-store); ``prompts``: prompt file/folder overriding the
    config; ``force``: stages to rebuild (with what depends on them); ``rerun``: benchmark again
    even if this hardware has a result; ``until``: the last stage to run."""
    options = RunOptions(config_path=config_path, store=store, prompts=prompts,
                         force=list(force or []), rerun=rerun, until=until)
    try:
        cfg, st = resolve(options)
        out: dict[str, Any] = {}
        for stage in PIPELINE[: STAGES.index(options.until) + 1]:
            out[stage.name] = run_stage(stage, cfg, st, {k: out[k] for k in stage.inputs}, options)
        return out
    except DflashError as e:
        return _failed(e)


@flow(name="dflash-benchmark-latest")
def benchmark_latest(config_path: str = "configs/default.yaml", store: str | None = None,
                     rerun: bool = True) -> Any:
    """Benchmark the latest committed draft in the store on this worker's hardware (``rerun``:
    always measure and append), then rebuild the report."""
    options = RunOptions(config_path=config_path, store=store, rerun=rerun, until="benchmark")
    try:
        cfg, st = resolve(options)
        refs = latest_draft_refs(st)
        out = {"benchmark": run_stage(BY_NAME["benchmark"], cfg, st, refs, options)}
        out["report"] = run_stage(BY_NAME["report"], cfg, st, {"train": refs["train"]}, options)
        return out
    except DflashError as e:
        return _failed(e)


def latest_draft_refs(store: Store) -> dict[str, dict[str, str]]:
    """Refs of the newest committed draft and the target and filter outputs it was trained on."""
    trained = _committed(store, "train")
    if not trained:
        raise DflashError(f"store {store.url}: no committed draft (train output) to benchmark; "
                          "run `dflash run` first")
    latest = max(trained, key=lambda m: m.created_at)
    target = _by_digest(store, "targets", set(latest.inputs.values()))
    filtered = _by_digest(store, "filter", set(latest.inputs.values()))
    if target is None:
        raise DflashError(f"store {store.url}: the target of draft {latest.key} is not in the store")
    refs = {"target": target.ref(store), "train": latest.ref(store)}
    if filtered is not None:
        refs["filter"] = filtered.ref(store)
    return refs


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
    resolve(options)  # fail fast, one line, before Prefect starts
    _quiet_prefect(args.debug)
    state = dflash_pipeline(**options.model_dump(), return_state=True)
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
