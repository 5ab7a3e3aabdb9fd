"""The training loop of the train stage: in-process (a world of one) or one rank under torchrun.

    torchrun --standalone --nproc_per_node 2 -m tasks.train_dist job.json

Every rank loads the target and the data, computes its share of each step (see
``dflash_models.trainer.plan_step``) and DDP averages gradients (gloo on CPU, nccl on GPU).
Only rank 0 evaluates, checkpoints and writes files, into the train stage's output folder with
``storage.manifest.write_part``; the process that launched torchrun commits the manifest.

Two phases run one after the other, each resumable from its own checkpoints:
``dflash`` (the DFlash draft) and ``classic`` (the autoregressive baseline, distilled).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from torch import nn

from dflash_models.blocks import VocabHead
from dflash_models.draft import DFlashDraft, DFlashDraftConfig, init_from_target
from dflash_models.features import (
    FeatureRow,
    OnlineFeatures,
    bytes_per_token,
    length_batches,
    target_pass,
)
from dflash_models.target import Target, default_target_layer_ids, load_target
from dflash_models.trainer import (
    STATE,
    DistInfo,
    all_reduce_sum,
    barrier,
    build_optimizer,
    build_scheduler,
    cpu_bf16_on,
    init_distributed,
    load_sharded,
    load_trainable_state,
    plan_step,
    restore_state,
    retarget_scheduler,
    save_sharded,
    shutdown_distributed,
    state_json,
    sync_replica,
    train_step,
    watch_parent,
    weights_bytes,
    wrap_for_training,
)
from storage import Manifest, Store
from storage.manifest import PARTS, recorded_parts, write_part
from storage.parquet import to_parquet_bytes
from tasks.progress import Progress
from tasks.train_features import (
    StreamedFeatures,
    check_cache_size,
    load_data,
    read_features,
    run_features,
)
from tasks.train_phases import (
    Ctx,
    Phase,
    Writer,
    choose_draft_vocab,
    classic_phase,
    dflash_phase,
)

log = logging.getLogger("dflash")


@dataclass
class Job:
    store_url: str
    prefix: str  # train/<key>
    config: dict[str, Any]
    target_folder: str
    filter_manifest: dict[str, Any]
    target_digest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Ref:
    digest: str


# ----------------------------------------------------------------------------- entry points
def run_worker(job: Job, store: Store | None = None, writer: Writer | None = None
               ) -> dict[str, Any] | None:
    """Train both phases; rank 0 returns the summary (the others return None)."""
    from tasks.train import TrainConfig

    cfg = TrainConfig.model_validate(job.config)
    store = store or Store(job.store_url)
    info = init_distributed(cfg.device, cfg.dist_timeout_s)
    if os.environ.get("DFLASH_TRAIN_PARENT"):
        watch_parent(int(os.environ["DFLASH_TRAIN_PARENT"]))
    threads = cfg.threads
    if threads is None and cfg.nproc > 1 and info.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    writer = writer or functools.partial(write_part, store, job.prefix)
    try:
        return _train(job, cfg, store, info, writer)
    finally:
        torch.set_num_threads(saved_threads)  # in-process runs must not leak the setting
        shutdown_distributed(info)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else
                        logging.WARNING, format="%(asctime)s %(message)s")
    job = Job(**json.loads(Path(argv[0]).read_text()))
    run_worker(job)


# ----------------------------------------------------------------------------- setup
def _train(job: Job, cfg: Any, store: Store, info: DistInfo, writer: Writer
           ) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    target = load_target(job.target_folder, device=str(info.device))
    filter_m = Manifest.from_dict(job.filter_manifest)
    data = load_data(store, filter_m, target, cfg.selection())
    global_batch = cfg.batch_size * cfg.grad_accum
    if len(data.train) < global_batch:
        raise ValueError(f"train: {len(data.train)} training sequences cannot fill one global "
                         f"batch of {global_batch}; lower batch_size or add data")
    layer_ids = cfg.target_layer_ids or default_target_layer_ids(target.num_layers,
                                                                 cfg.num_feature_layers)
    summary: dict[str, Any] = {"data_mix": data.mix, "features_mode": cfg.features,
                               "feature_bytes_per_token": bytes_per_token(
                                   len(layer_ids), target.hidden_size, cfg.feature_dtype)}
    summary["feature_cpu_bf16"] = feature_bf16 = cpu_bf16_on(info.device, cfg.feature_cpu_bf16)
    if cfg.features == "cached":
        from tasks.train import features_config

        fcfg = features_config(cfg, layer_ids, feature_bf16)
        inputs = {"target": _Ref(job.target_digest), "filter": filter_m}
        check_cache_size(store, fcfg, target.hidden_size, data, cfg.feature_cache_max_gb)
        # every rank builds its share of the shards, then streams them (never all in RAM)
        fm = run_features(store, fcfg, inputs, target, data, rank=info.rank, world=info.world,
                          barrier=functools.partial(barrier, info))
        source: Any = StreamedFeatures(store, fm, "train", data.train, info.device)
        eval_rows = read_features(store, fm, "eval") if info.main else {}
        summary["features_key"] = fm.key
        summary["feature_bytes_per_token"] = fm.extra["bytes_per_token"]  # `last` included
    else:
        source = OnlineFeatures(target, layer_ids, data.train, keep_last=cfg.distill > 0,
                                greedy=cfg.labels == "target", cpu_bf16=feature_bf16)
        eval_rows = _compute_rows(target, data.eval, layer_ids) if info.main else {}
    steps_per_epoch = len(data.train) // global_batch
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    ctx = Ctx(cfg, store, job.prefix, info, writer, len(data.train))

    torch.manual_seed(cfg.seed)
    dcfg = DFlashDraftConfig.from_target(
        target, num_layers=cfg.draft_layers, block_size=cfg.block_size,
        num_feature_layers=len(layer_ids), target_layer_ids=layer_ids,
        mask_token_id=cfg.mask_token_id)
    draft = DFlashDraft(dcfg)
    if cfg.init_from_target:
        summary["init_from_target"] = init_from_target(draft, target)
    draft = draft.to(info.device)
    draft_ids = None
    if cfg.draft_vocab_size:
        taught = None
        if cfg.labels == "target" and cfg.features == "cached":  # online: not known up front
            taught = [source.greedy(i)[ex.response_start + 1:]
                      for i, ex in enumerate(data.train)]
        draft_ids, summary["draft_vocab"] = choose_draft_vocab(data, cfg.draft_vocab_size,
                                                               target.vocab_size, taught)
    head = VocabHead(target, draft_ids)
    summary["draft_config"] = dcfg.to_hf_dict()
    summary["cpu_bf16"] = cpu_bf16_on(info.device, cfg.cpu_bf16)
    summary["dflash"] = run_phase(dflash_phase(ctx, target, draft, head, source, data,
                                                eval_rows, total, draft_ids), ctx)
    if cfg.classic_layers > 0:
        classic_total = cfg.classic_max_steps or total
        summary["classic"] = run_phase(classic_phase(ctx, target, data, eval_rows,
                                                      classic_total), ctx)
    result = _write_outputs(summary, writer, t0) if info.main else None
    barrier(info)  # on several nodes, node 0's launcher commits when ITS ranks end: wherever
    return result  # rank 0 runs, its files must be in the store by then


def _write_outputs(summary: dict[str, Any], writer: Writer, t0: float) -> dict[str, Any]:
    """Rank 0: the metrics tables and ``train_summary.json`` (written last)."""
    extra_files: list[str] = []
    tables = [("train_metrics", summary["dflash"].pop("metrics"))]
    if "classic" in summary:  # its own table: readers of train_metrics expect one curve
        tables.append(("classic_train_metrics", summary["classic"].pop("metrics")))
    for table, rows in tables:
        name = "train_metrics.parquet" if table == "train_metrics" else "classic_metrics.parquet"
        writer(name, to_parquet_bytes(_metrics_table(rows)), rows=len(rows), table=table)
        extra_files.append(name)
    summary["wall_s"] = time.perf_counter() - t0
    files = [f for ph in ("dflash", "classic") for f in (summary.get(ph) or {}).get("files", [])]
    summary["outputs"] = sorted(files + extra_files + ["train_summary.json"])
    writer("train_summary.json", json.dumps(summary, indent=2, default=float).encode())
    return summary


def _compute_rows(target: Target, examples: list[Any], layer_ids: list[int]
                  ) -> dict[int, FeatureRow]:
    rows: dict[int, FeatureRow] = {}
    for batch in length_batches(range(len(examples)), examples, 2048):
        rows.update(zip(batch, target_pass(target, [examples[i].ids for i in batch], layer_ids,
                                           starts=[examples[i].response_start for i in batch]),
                        strict=True))
    return rows


# ----------------------------------------------------------------------------- the loop
def run_phase(ph: Phase, ctx: Ctx) -> dict[str, Any]:
    """Train one phase to its end (or resume it, or return its recorded result)."""
    cfg, info, store, prefix = ctx.cfg, ctx.info, ctx.store, ctx.prefix
    ckdir = f"checkpoints/{ph.name}"
    recorded = set(recorded_parts(store, prefix))
    if f"{ckdir}/done.json" in recorded:  # finished before a kill: its files are recorded
        barrier(info)
        return json.loads(store.read_bytes(f"{prefix}/{ckdir}/done.json"))
    model = wrap_for_training(ph.module, info, cfg.strategy, bf16=cfg.bf16)
    planned, eval_s = _plan_total(ph, ctx, model, recorded)
    warmup = round(cfg.warmup_frac * planned)  # the first plan's, whatever a re-plan says
    state: dict[str, Any] = {"step": 0, "metrics": [], "best": None, "wall_s": 0.0,
                             "train_time_s": 0.0, "train_tokens": 0, "resumed_from": None,
                             "planned_steps": planned, "total_steps": planned,
                             "paced_from": [0, 0.0]}
    opt = build_optimizer(model, ph.lr, cfg.weight_decay)
    sched = build_scheduler(opt, planned, warmup, cfg.min_lr_ratio)
    last = _latest_checkpoint(recorded, ckdir)
    if last is not None:
        scalars, groups = restore_state(store.read_bytes(f"{prefix}/{last}/{STATE}"), sched)
        with _checkpoint_folder(ctx, last, write=False) as path:
            load_sharded(path, model, opt, groups)
        sync_replica(model, ph.module, info)
        state = {**state, **scalars}
        retarget_scheduler(sched, state["total_steps"])  # a re-plan before the kill holds
        state["resumed_from"] = state["step"]
        log.info("train %s: resumed from checkpoint at step %d of %d", ph.name, state["step"],
                 state["total_steps"])
    total = state["total_steps"]
    t0, wall0 = time.perf_counter(), state["wall_s"]
    n, world = ctx.n_train, info.world
    global_batch = cfg.batch_size * cfg.grad_accum
    row: dict[str, Any] = {}
    with Progress(f"train {ph.name}", total=total, unit="steps",
                  artifact_key=f"train-{ph.name}", enabled=info.main) as prog:
        prog.advance(state["step"])
        step = state["step"]
        # test hook: slower steps (kill tests, deadline and re-plan tests)
        throttle = float(os.environ.get("DFLASH_TRAIN_THROTTLE_S", "0") or 0)
        while step < total:
            ts = time.perf_counter()
            plan = plan_step(step, n, cfg.seed, cfg.batch_size // world, cfg.grad_accum, world)
            mbs = [ph.prepare(idx, plan.epoch) for idx in plan.for_rank(info.rank)]
            w, tok = all_reduce_sum([sum(ph.weight(b) for b in mbs),
                                     sum(ph.tokens(b) for b in mbs)], info)
            res = train_step(model, opt, sched, mbs, lambda b: ph.loss_sum(model, b), w, world,
                             cfg.grad_clip)
            if throttle:
                time.sleep(throttle)
            # the plan is made from forward/backward times and re-made at every checkpoint; a
            # box that slows between checkpoints could still overrun: the budget is a deadline
            late = bool(ph.budget_s) and wall0 + time.perf_counter() - t0 >= ph.budget_s
            loss, late_ranks = all_reduce_sum([res.loss, float(late)], info)
            dt = time.perf_counter() - ts
            s = step + 1
            state.update(step=s, train_time_s=state["train_time_s"] + dt,
                         train_tokens=state["train_tokens"] + int(tok))
            row = {"phase": ph.name, "step": s, "epoch": s * global_batch / n, "loss": loss,
                   "lr": res.lr, "grad_norm": res.grad_norm, "tokens_per_s": tok / dt,
                   "train_tokens": state["train_tokens"]}
            end = s == total or late_ranks > 0
            if end and s < total:
                log.info("train %s: time budget reached at step %d of %d", ph.name, s, total)
            if (cfg.eval_every and s % cfg.eval_every == 0) or end:
                sync_replica(model, ph.module, info)  # FSDP: gathered into rank 0's replica
                ev = ph.evaluate() if info.main else None
                if ev is not None:
                    row.update(ev)
                    _update_best(ph, ctx, state, ev, s)
            row["wall_s"] = wall0 + time.perf_counter() - t0
            if s % cfg.log_every == 0 or "tau_sim" in row or end:
                state["metrics"].append(row)
            if s % cfg.checkpoint_every == 0 and not end:
                if ph.budget_s:  # re-plan from the pace since the last checkpoint, so the
                    # cosine schedule ends at the budget instead of being cut by the deadline
                    total = _replan(ph, ctx, s, row["wall_s"], eval_s, state["paced_from"])
                    state.update(total_steps=total, paced_from=[s, row["wall_s"]])
                    retarget_scheduler(sched, total)
                    prog.set_total(total)
                state["wall_s"] = row["wall_s"]
                _write_checkpoint(ph, ctx, model, opt, sched, state, s)
            note = f"loss {loss:.3f}" + (f" tau {row['tau_sim']:.2f}" if "tau_sim" in row else "")
            prog.advance(1, tokens=int(tok), note=note)
            if end:
                break
            step = s
    state["wall_s"] = row.get("wall_s", state["wall_s"])
    sync_replica(model, ph.module, info)
    result = _finish_phase(ph, ctx, state) if info.main else {}
    barrier(info)
    return result


def _plan_total(ph: Phase, ctx: Ctx, model: nn.Module, recorded: set[str]) -> tuple[int, float]:
    """The phase's step count: from epochs/max_steps, cut to fit ``budget_s`` if one is set.

    A budget is turned into steps before the first optimiser step (and recorded, so that a
    resumed run keeps it): the mean forward/backward time of three batches spread over the
    first epoch, after one untimed warm-up pass, plus one timed evaluation. That underestimates
    a long run of a cheap (1-layer) draft, ~0.11 s planned against 0.12-0.15 s measured (the
    optimiser, checkpoints and a box that slows), so `run_phase` re-plans at every checkpoint
    (`_replan`) and also stops at the budget as a deadline. Returns (steps, evaluation s).
    """
    name = f"checkpoints/{ph.name}/plan.json"
    if not ph.budget_s:
        return ph.total_steps, 0.0
    if name in recorded:
        plan = json.loads(ctx.store.read_bytes(f"{ctx.prefix}/{name}"))
        return int(plan["total_steps"]), float(plan["eval_s"])
    cfg, info = ctx.cfg, ctx.info
    per_epoch = ctx.n_train // (cfg.batch_size * cfg.grad_accum)

    def timed_pass(step: int) -> float:
        sp = plan_step(step, ctx.n_train, cfg.seed, cfg.batch_size // info.world,
                       cfg.grad_accum, info.world)
        t = time.perf_counter()
        mbs = [ph.prepare(idx, sp.epoch) for idx in sp.for_rank(info.rank)]
        (w,) = all_reduce_sum([sum(ph.weight(b) for b in mbs)], info)
        for b in mbs:
            (ph.loss_sum(model, b) / max(w, 1e-12)).backward()
        return time.perf_counter() - t

    timed_pass(0)  # warm-up: first-touch allocations
    probes = [0, per_epoch // 3, 2 * per_epoch // 3]
    times = [timed_pass(s) for s in probes]
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    ev = ph.evaluate() if info.main else None
    eval_s = time.perf_counter() - t
    step_s, eval_s = all_reduce_sum([sum(times) / len(times) if info.main else 0.0,
                                     eval_s if info.main else 0.0], info)
    per_step = step_s + (eval_s / cfg.eval_every if cfg.eval_every else 0.0)
    fit = max(1, int((ph.budget_s - eval_s) / max(per_step, 1e-9)))
    plan = {"nominal_steps": ph.total_steps, "budget_s": ph.budget_s, "step_s": step_s,
            "eval_s": eval_s, "total_steps": min(ph.total_steps, fit),
            "initial_eval": ev}
    log.info("train %s: %.2f s/step, %.1f s/eval -> %d steps in %.0f s (nominal %d)", ph.name,
             step_s, eval_s, plan["total_steps"], ph.budget_s, ph.total_steps)
    if info.main:
        ctx.writer(name, json.dumps(plan, default=float).encode())
    return plan["total_steps"], eval_s


REPLAN_MARGIN = 0.97  # of the time left: steps keep slowing a little over a long run


def _replan(ph: Phase, ctx: Ctx, step: int, elapsed_s: float, eval_s: float,
            since: list[float]) -> int:
    """The phase's step count re-made at ``step`` from the pace since ``since`` (step, wall s).

    The up-front plan times forward/backward passes only; the real pace (optimiser, data,
    evaluations, a box that slows) was 10-30% slower for a 1-layer draft, and slowed further
    over a run, so the deadline used to cut the cosine schedule before its low-learning-rate
    end. Capped by the nominal count; rank 0's figure holds on every rank, and the checkpoint
    records it for a resume.
    """
    pace = (elapsed_s - since[1]) / max(step - since[0], 1)
    left = ph.budget_s - elapsed_s - eval_s  # the final evaluation
    fit = step + max(1, int(REPLAN_MARGIN * left / max(pace, 1e-9)))
    (total,) = all_reduce_sum([float(min(ph.total_steps, fit)) if ctx.info.main else 0.0],
                              ctx.info)
    log.info("train %s: %.3f s/step over steps %d-%d -> %d steps in all", ph.name, pace,
             since[0], step, int(total))
    return int(total)


def _latest_checkpoint(recorded: set[str], ckdir: str) -> str | None:
    """The newest committed checkpoint: its ``state.json`` record is written after every rank's
    shard (a folder without one is a killed save, never read)."""
    steps = [n.rsplit("/", 1)[0] for n in recorded
             if n.startswith(f"{ckdir}/step-") and n.endswith(f"/{STATE}")]
    return max(steps) if steps else None


def _update_best(ph: Phase, ctx: Ctx, state: dict[str, Any], ev: dict[str, Any], s: int) -> None:
    tau = ev.get("tau_sim")
    best = state["best"]
    # a tie goes to the later checkpoint: it has seen more data at a lower learning rate (the
    # held-out set is small, so ties are common: run7 kept step 3,500 of 5,869 on one)
    if tau is None or tau != tau or (best is not None and tau < best["tau_sim"]):
        return
    name = f"checkpoints/{ph.name}/best-{s:07d}.safetensors"
    ctx.writer(name, weights_bytes(ph.module))
    state["best"] = {"step": s, "tau_sim": tau, "acc": ev.get("acc"), "file": name}


def _write_checkpoint(ph: Phase, ctx: Ctx, model: nn.Module, opt: Any, sched: Any,
                      state: dict[str, Any], s: int) -> None:
    """All ranks write their shards (DCP), then rank 0 commits with ``state.json`` (recorded
    last) and drops the older checkpoints. A collective: every rank calls it."""
    d = f"checkpoints/{ph.name}/step-{s:07d}"
    if ctx.info.main:  # shards of a killed save of this step (maybe another world size)
        ctx.store.rm(f"{ctx.prefix}/{d}", recursive=True)
    barrier(ctx.info)
    with _checkpoint_folder(ctx, d, write=True) as path:
        groups = save_sharded(path, model, opt)
    barrier(ctx.info)  # every rank's shard is in the store
    if not ctx.info.main:
        return
    ctx.writer(f"{d}/{STATE}", state_json(sched, groups, state))
    log.info("train %s: checkpoint committed at step %d", ph.name, s)
    keep = {f"{d}/{STATE}", f"checkpoints/{ph.name}/plan.json"}
    keep |= {state["best"]["file"]} if state["best"] else set()
    for name in recorded_parts(ctx.store, ctx.prefix):
        if name.startswith(f"checkpoints/{ph.name}/") and name not in keep:
            _drop(ctx.store, ctx.prefix, name)


@contextlib.contextmanager
def _checkpoint_folder(ctx: Ctx, d: str, write: bool) -> Iterator[str]:
    """A local folder for DCP: the store's own on a local store; otherwise a staging folder
    whose shards this rank uploads after a save (each rank its own) or downloads before a load."""
    store, rel = ctx.store, f"{ctx.prefix}/{d}"
    if store.protocol == "file":
        Path(store.path(rel)).mkdir(parents=True, exist_ok=True)
        yield store.path(rel)
        return
    with tempfile.TemporaryDirectory(prefix="dflash-ckpt-") as tmp:
        if not write:
            for name in store.ls(rel):
                if name.endswith(".safetensors"):
                    (Path(tmp) / name.rsplit("/", 1)[-1]).write_bytes(store.read_bytes(name))
        yield tmp
        if write:
            for f in sorted(Path(tmp).glob("*.safetensors")):
                store.put_file(f, f"{rel}/{f.name}")


def _drop(store: Store, prefix: str, name: str) -> None:
    """Forget a recorded file: its record first, so a crash leaves only an untrusted orphan;
    a checkpoint's ``state.json`` takes its folder of shards with it."""
    store.rm(f"{prefix}/{PARTS}/{name.replace('/', '__')}.json")
    store.rm(f"{prefix}/{name}")
    if name.endswith(f"/{STATE}"):
        store.rm(f"{prefix}/{name.rsplit('/', 1)[0]}", recursive=True)


def _finish_phase(ph: Phase, ctx: Ctx, state: dict[str, Any]) -> dict[str, Any]:
    """Export the best (held-out tau_sim) weights, record the phase as done."""
    files: dict[str, bytes] = {}
    if ctx.cfg.export_last:
        files.update(ph.export(f"last/{ph.folder}"))  # deeper: readers take the shallowest
    best = state["best"]
    if best is not None:
        load_trainable_state(ph.module, st_load(ctx.store.read_bytes(
            f"{ctx.prefix}/{best['file']}")))
    files.update(ph.export(ph.folder))
    for name, data in files.items():
        ctx.writer(name, data)
    last = state["metrics"][-1] if state["metrics"] else {}
    result = {"steps": state["step"], "planned_steps": state["planned_steps"],
              "total_steps": state["total_steps"], "best": best,
              "last": {k: last.get(k) for k in ("step", "loss", "tau_sim", "acc", "eval_loss")},
              "tokens_per_s": state["train_tokens"] / max(state["train_time_s"], 1e-9),
              "train_tokens": state["train_tokens"], "train_time_s": state["train_time_s"],
              "wall_s": state["wall_s"], "resumed_from": state["resumed_from"],
              "files": sorted(files), "metrics": state["metrics"]}
    ctx.writer(f"checkpoints/{ph.name}/done.json",
               json.dumps(result, default=float).encode())
    return result


def _metrics_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema([("phase", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
                        ("loss", pa.float64()), ("lr", pa.float64()),
                        ("grad_norm", pa.float64()), ("tokens_per_s", pa.float64()),
                        ("wall_s", pa.float64()), ("train_tokens", pa.int64()),
                        ("eval_loss", pa.float64()), ("tau_sim", pa.float64()),
                        ("acc", pa.list_(pa.float64()))])
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.table(cols, schema=schema)


if __name__ == "__main__":
    main()
