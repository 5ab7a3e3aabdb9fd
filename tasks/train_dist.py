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

import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from torch import Tensor, nn

from dflash_models.classic import build_classic_draft, distill_loss
from dflash_models.draft import DFlashDraft, DFlashDraftConfig
from dflash_models.features import (
    CachedFeatures,
    FeatureRow,
    OnlineFeatures,
    bytes_per_token,
    length_batches,
    target_pass,
)
from dflash_models.target import Target, default_target_layer_ids, load_target
from dflash_models.trainer import (
    IGNORE_INDEX,
    OPTIM,
    STATE,
    WEIGHTS,
    BlockStats,
    DFlashTrainModule,
    DistInfo,
    VocabHead,
    all_reduce_sum,
    autocast_context,
    barrier,
    build_optimizer,
    build_scheduler,
    checkpoint_blobs,
    dflash_loss_sum,
    eval_dflash_batch,
    example_generator,
    greedy_block_labels,
    init_distributed,
    load_trainable_state,
    make_dflash_batch,
    pad_stack,
    plan_step,
    restore_checkpoint,
    shutdown_distributed,
    train_step,
    weights_bytes,
    wrap_ddp,
)
from dflash_models.training import sample_anchors
from storage import Manifest, Store
from storage.manifest import PARTS, recorded_parts, write_part
from storage.parquet import to_parquet_bytes
from tasks.progress import Progress
from tasks.train_features import TrainData, load_data, read_features, run_features

log = logging.getLogger("dflash")
Writer = Callable[..., Any]  # (name, data, *, rows=None, table=None)
EVAL_ANCHOR_EPOCH = -1  # anchors of eval examples come from generators of this pseudo-epoch


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


@dataclass
class Phase:
    """What the generic loop needs to know about one model being trained."""

    name: str
    module: nn.Module  # its trainable parameters are what checkpoints hold
    lr: float
    total_steps: int
    prepare: Callable[[list[int], int], Any]  # (example indices, epoch) -> micro-batch
    loss_sum: Callable[[nn.Module, Any], Tensor]  # (possibly DDP) module, micro-batch
    weight: Callable[[Any], float]
    tokens: Callable[[Any], int]
    evaluate: Callable[[], dict[str, Any] | None]
    export: Callable[[str], dict[str, bytes]]  # folder name -> {relative name: bytes}
    folder: str


@dataclass
class Ctx:
    cfg: Any
    store: Store
    prefix: str
    info: DistInfo
    writer: Writer
    n_train: int


# ----------------------------------------------------------------------------- entry points
def run_worker(job: Job, store: Store | None = None, writer: Writer | None = None
               ) -> dict[str, Any] | None:
    """Train both phases; rank 0 returns the summary (the others return None)."""
    from tasks.train import TrainConfig

    cfg = TrainConfig.model_validate(job.config)
    store = store or Store(job.store_url)
    info = init_distributed(cfg.device)
    threads = cfg.threads
    if threads is None and info.world > 1 and info.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // info.world)
    if threads:
        torch.set_num_threads(threads)
    writer = writer or functools.partial(write_part, store, job.prefix)
    try:
        return _train(job, cfg, store, info, writer)
    finally:
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
    global_batch = cfg.batch_size * cfg.grad_accum * info.world
    if len(data.train) < global_batch:
        raise ValueError(f"train: {len(data.train)} training sequences cannot fill one global "
                         f"batch of {global_batch}; lower batch_size or add data")
    layer_ids = cfg.target_layer_ids or default_target_layer_ids(target.num_layers,
                                                                 cfg.num_feature_layers)
    summary: dict[str, Any] = {"data_mix": data.mix, "features_mode": cfg.features,
                               "feature_bytes_per_token": bytes_per_token(
                                   len(layer_ids), target.hidden_size, cfg.feature_dtype)}
    if cfg.features == "cached":
        from tasks.train import features_config

        fcfg = features_config(cfg, layer_ids)
        inputs = {"target": _Ref(job.target_digest), "filter": filter_m}
        if info.main:  # one builder; the other ranks then find it committed
            run_features(store, fcfg, inputs, target, data)
        barrier(info)
        fm = run_features(store, fcfg, inputs, target, data)
        source: Any = CachedFeatures(read_features(store, fm, "train"), data.train, info.device)
        eval_rows = read_features(store, fm, "eval") if info.main else {}
        summary["features_key"] = fm.key
    else:
        source = OnlineFeatures(target, layer_ids, data.train)
        eval_rows = _compute_rows(target, data.eval, layer_ids) if info.main else {}
    steps_per_epoch = len(data.train) // global_batch
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    ctx = Ctx(cfg, store, job.prefix, info, writer, len(data.train))

    torch.manual_seed(cfg.seed)
    dcfg = DFlashDraftConfig.from_target(
        target, num_layers=cfg.draft_layers, block_size=cfg.block_size,
        num_feature_layers=len(layer_ids), target_layer_ids=layer_ids,
        mask_token_id=cfg.mask_token_id)
    draft = DFlashDraft(dcfg).to(info.device)
    draft_ids = None
    if cfg.draft_vocab_size:
        draft_ids, summary["draft_vocab"] = choose_draft_vocab(data, cfg.draft_vocab_size,
                                                               target.vocab_size)
    head = VocabHead(target, draft_ids)
    summary["draft_config"] = dcfg.to_hf_dict()
    summary["dflash"] = run_phase(_dflash_phase(ctx, target, draft, head, source, data,
                                                eval_rows, total, draft_ids), ctx)
    if cfg.classic_layers > 0:
        classic_total = cfg.classic_max_steps or total
        summary["classic"] = run_phase(_classic_phase(ctx, target, data, eval_rows,
                                                      classic_total), ctx)
    if not info.main:
        return None
    rows = summary["dflash"].pop("metrics") + (summary.get("classic") or {}).pop("metrics", [])
    writer("train_metrics.parquet", to_parquet_bytes(_metrics_table(rows)), rows=len(rows),
           table="train_metrics")
    summary["wall_s"] = time.perf_counter() - t0
    files = [f for ph in ("dflash", "classic") for f in (summary.get(ph) or {}).get("files", [])]
    summary["outputs"] = sorted(files + ["train_metrics.parquet", "train_summary.json"])
    writer("train_summary.json", json.dumps(summary, indent=2, default=float).encode())
    return summary


def _compute_rows(target: Target, examples: list[Any], layer_ids: list[int]
                  ) -> dict[int, FeatureRow]:
    rows: dict[int, FeatureRow] = {}
    for batch in length_batches(range(len(examples)), examples, 2048):
        rows.update(zip(batch, target_pass(target, [examples[i].ids for i in batch], layer_ids),
                        strict=True))
    return rows


def choose_draft_vocab(data: TrainData, size: int, vocab: int) -> tuple[Tensor, dict[str, Any]]:
    """The ``size`` most frequent training response tokens (ties by id), and their coverage of
    training and held-out response tokens: a token outside the set can never be drafted."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for ex in data.train:
        counts += torch.bincount(ex.ids[ex.response_start:], minlength=vocab)
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))[: min(size, vocab)]
    ids = torch.tensor(sorted(order), dtype=torch.long)
    inside = torch.zeros(vocab, dtype=torch.bool)
    inside[ids] = True

    def coverage(exs: list[Any]) -> float:
        toks = torch.cat([e.ids[e.response_start:] for e in exs]) if exs else torch.zeros(0)
        return float(inside[toks.long()].float().mean()) if toks.numel() else float("nan")

    return ids, {"size": int(ids.numel()), "train_coverage": coverage(data.train),
                 "eval_coverage": coverage(data.eval)}


# ----------------------------------------------------------------------------- phases
def _eval_anchors(cfg: Any, data: TrainData) -> list[Tensor]:
    return [sample_anchors(ex.response_start, int(ex.ids.shape[0]), cfg.eval_anchors_per_seq,
                           cfg.block_size, example_generator(cfg.seed, EVAL_ANCHOR_EPOCH, i))
            for i, ex in enumerate(data.eval)]


def _dflash_phase(ctx: Ctx, target: Target, draft: DFlashDraft, head: VocabHead, source: Any,
                  data: TrainData, eval_rows: dict[int, FeatureRow], total: int,
                  draft_ids: Tensor | None) -> Phase:
    cfg, dev = ctx.cfg, ctx.info.device
    module = DFlashTrainModule(draft)
    mask_id, B = draft.config.mask_token_id, cfg.block_size
    amp = functools.partial(autocast_context, dev, cfg.bf16)

    def prepare(idxs: list[int], epoch: int) -> Any:
        rows = source.get(idxs)
        anchors = [sample_anchors(data.train[i].response_start, int(r.ids.shape[0]),
                                  cfg.anchors_per_seq, B, example_generator(cfg.seed, epoch, i))
                   for i, r in zip(idxs, rows, strict=True)]
        batch = make_dflash_batch([r.ids for r in rows], [r.features for r in rows], anchors, B,
                                  mask_id, cfg.gamma, device=dev)
        batch.weights *= head.labels(batch.labels) != IGNORE_INDEX
        return batch

    eval_batches = []
    if eval_rows:
        anchors = _eval_anchors(cfg, data)
        for chunk in range(0, len(data.eval), 4):
            idx = list(range(chunk, min(chunk + 4, len(data.eval))))
            rows = [eval_rows[i] for i in idx]
            labels = [greedy_block_labels(r.ids, r.greedy, anchors[i], B)
                      for i, r in zip(idx, rows, strict=True)]
            eval_batches.append(make_dflash_batch(
                [r.ids for r in rows], [r.features.float() for r in rows],
                [anchors[i] for i in idx], B, mask_id, cfg.gamma, labels=labels, device=dev))

    def evaluate() -> dict[str, Any] | None:
        if not eval_batches:
            return None
        stats = BlockStats(B)
        for b in eval_batches:
            eval_dflash_batch(module, target, head, b, stats, amp)
        return stats.result()

    def export(folder: str) -> dict[str, bytes]:
        files = _folder_bytes(lambda p: draft.export(p))
        if draft_ids is not None:
            from safetensors.torch import save

            files["draft_vocab.safetensors"] = save({"d2t": draft_ids.cpu()})
        return {f"{folder}/{k}": v for k, v in files.items()}

    return Phase("dflash", module, cfg.lr, total, prepare,
                 lambda m, b: dflash_loss_sum(m, target, head, b, amp),
                 lambda b: float(b.weights.sum()), lambda b: b.tokens, evaluate, export,
                 "dflash-draft")


class ClassicTrainModule(nn.Module):
    """Student logits only where the loss needs them (the LM head is the dominant cost)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor, attn: Tensor, sel: Tensor) -> Tensor:
        hidden = self.lm.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return self.lm.lm_head(hidden[sel])


def _classic_phase(ctx: Ctx, target: Target, data: TrainData,
                   eval_rows: dict[int, FeatureRow], total: int) -> Phase:
    cfg, dev = ctx.cfg, ctx.info.device
    torch.manual_seed(cfg.seed + 1)
    lm = build_classic_draft(target, num_layers=cfg.classic_layers).to(dev, torch.float32)
    lm.get_input_embeddings().weight.requires_grad_(False)  # the target's, as DFlash's are
    lm.get_output_embeddings().weight.requires_grad_(False)
    lm.train()
    module = ClassicTrainModule(lm)
    amp = functools.partial(autocast_context, dev, cfg.bf16)
    T = cfg.distill_temperature

    def padded(exs: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
        ids = pad_stack([e.ids for e in exs], 0).to(dev)
        attn = pad_stack([torch.ones_like(e.ids) for e in exs], 0).to(dev)
        sel = torch.zeros_like(ids, dtype=torch.bool)  # position p predicts response token p+1
        for i, e in enumerate(exs):
            sel[i, e.response_start - 1: int(e.ids.shape[0]) - 1] = True
        return ids, attn, sel

    def prepare(idxs: list[int], epoch: int) -> Any:
        ids, attn, sel = padded([data.train[i] for i in idxs])
        with torch.no_grad():
            teacher = target.forward(ids, attention_mask=attn).logits[sel]
        return ids, attn, sel, teacher, int(attn.sum())

    def loss_sum(m: nn.Module, b: Any) -> Tensor:
        ids, attn, sel, teacher, _ = b
        with amp():
            student = m(ids, attn, sel)
        n = teacher.shape[0]
        return distill_loss(student, teacher, torch.ones(n, dtype=torch.bool, device=dev), T) * n

    anchors = _eval_anchors(cfg, data)

    @torch.no_grad()
    def evaluate() -> dict[str, Any] | None:
        if not eval_rows:
            return None
        stats, B = BlockStats(cfg.block_size), cfg.block_size
        for chunk in range(0, len(data.eval), 4):
            idx = list(range(chunk, min(chunk + 4, len(data.eval))))
            ids, attn, _ = padded([data.eval[i] for i in idx])
            with amp():
                logits = lm(input_ids=ids, attention_mask=attn).logits.float()
            pred = torch.cat([torch.full_like(ids[:, :1], -1), logits.argmax(-1)[:, :-1]], 1)
            for j, i in enumerate(idx):
                r, a = eval_rows[i], anchors[i]
                labels = greedy_block_labels(r.ids, r.greedy, a, B)
                pos = (a[:, None] + torch.arange(B)).clamp_max(int(r.ids.shape[0]) - 1)
                stats.update(pred[j].cpu()[pos], labels)
                start, n = data.eval[i].response_start, int(r.ids.shape[0])
                ce = torch.nn.functional.cross_entropy(
                    logits[j, start - 1: n - 1], r.greedy[start:n].to(dev), reduction="sum")
                stats.add_loss(float(ce), n - start)
        return stats.result()

    def export(folder: str) -> dict[str, bytes]:
        def save(p: str) -> None:
            lm.save_pretrained(p)
            if target.tokenizer is not None:
                target.tokenizer.save_pretrained(p)
        return {f"{folder}/{k}": v for k, v in _folder_bytes(save).items()}

    return Phase("classic", module, cfg.classic_lr, total, prepare, loss_sum,
                 lambda b: float(b[2].sum()), lambda b: b[4], evaluate, export, "classic-draft")


def _folder_bytes(save: Callable[[str], Any]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the loop
def run_phase(ph: Phase, ctx: Ctx) -> dict[str, Any]:
    """Train one phase to its end (or resume it, or return its recorded result)."""
    cfg, info, store, prefix = ctx.cfg, ctx.info, ctx.store, ctx.prefix
    ckdir = f"checkpoints/{ph.name}"
    recorded = set(recorded_parts(store, prefix))
    if f"{ckdir}/done.json" in recorded:  # finished before a kill: its files are recorded
        barrier(info)
        return json.loads(store.read_bytes(f"{prefix}/{ckdir}/done.json"))
    opt = build_optimizer(ph.module, ph.lr, cfg.weight_decay)
    sched = build_scheduler(opt, ph.total_steps, round(cfg.warmup_frac * ph.total_steps),
                            cfg.min_lr_ratio)
    state: dict[str, Any] = {"step": 0, "metrics": [], "best": None, "wall_s": 0.0,
                             "train_time_s": 0.0, "train_tokens": 0, "resumed_from": None}
    last = _latest_checkpoint(recorded, ckdir)
    if last is not None:
        blobs = {n: store.read_bytes(f"{prefix}/{last}/{n}") for n in (WEIGHTS, OPTIM, STATE)}
        state = restore_checkpoint(blobs, ph.module, opt, sched)
        state["resumed_from"] = state["step"]
        log.info("train %s: resuming from step %d", ph.name, state["step"])
    model = wrap_ddp(ph.module, info)
    t0, wall0 = time.perf_counter(), state["wall_s"]
    n, world = ctx.n_train, info.world
    global_batch = cfg.batch_size * cfg.grad_accum * world
    row: dict[str, Any] = {}
    with Progress(f"train {ph.name}", total=ph.total_steps, unit="steps",
                  artifact_key=f"train-{ph.name}", enabled=info.main) as prog:
        prog.advance(state["step"])
        for step in range(state["step"], ph.total_steps):
            ts = time.perf_counter()
            plan = plan_step(step, n, cfg.seed, cfg.batch_size, cfg.grad_accum, world)
            mbs = [ph.prepare(idx, plan.epoch) for idx in plan.for_rank(info.rank)]
            w, tok = all_reduce_sum([sum(ph.weight(b) for b in mbs),
                                     sum(ph.tokens(b) for b in mbs)], info)
            res = train_step(model, opt, sched, mbs, lambda b: ph.loss_sum(model, b), w, world,
                             cfg.grad_clip)
            (loss,) = all_reduce_sum([res.loss], info)
            dt = time.perf_counter() - ts
            s = step + 1
            state.update(step=s, train_time_s=state["train_time_s"] + dt,
                         train_tokens=state["train_tokens"] + int(tok))
            row = {"phase": ph.name, "step": s, "epoch": s * global_batch / n, "loss": loss,
                   "lr": res.lr, "grad_norm": res.grad_norm, "tokens_per_s": tok / dt,
                   "train_tokens": state["train_tokens"]}
            over = bool(cfg.time_limit_min) and (wall0 + time.perf_counter() - t0
                                                 > 60 * cfg.time_limit_min)
            (stop,) = all_reduce_sum([float(over and info.main)], info)
            end = s == ph.total_steps or stop > 0
            if info.main and ((cfg.eval_every and s % cfg.eval_every == 0) or end):
                ev = ph.evaluate()
                if ev is not None:
                    row.update(ev)
                    _update_best(ph, ctx, state, ev, s)
            row["wall_s"] = wall0 + time.perf_counter() - t0
            if s % cfg.log_every == 0 or "tau_sim" in row or end:
                state["metrics"].append(row)
            if info.main and s % cfg.checkpoint_every == 0 and not end:
                state["wall_s"] = row["wall_s"]
                _write_checkpoint(ph, ctx, opt, sched, state, s)
            note = f"loss {loss:.3f}" + (f" tau {row['tau_sim']:.2f}" if "tau_sim" in row else "")
            prog.advance(1, tokens=int(tok), note=note)
            throttle = float(os.environ.get("DFLASH_TRAIN_THROTTLE_S", "0") or 0)
            if throttle:  # test hook: slows steps so a kill test can land between checkpoints
                time.sleep(throttle)
            if end:
                break
    state["wall_s"] = row.get("wall_s", state["wall_s"])
    result = _finish_phase(ph, ctx, state) if info.main else {}
    barrier(info)
    return result


def _latest_checkpoint(recorded: set[str], ckdir: str) -> str | None:
    steps = [n.rsplit("/", 1)[0] for n in recorded
             if n.startswith(f"{ckdir}/step-") and n.endswith(f"/{STATE}")]
    complete = [d for d in steps if f"{d}/{WEIGHTS}" in recorded and f"{d}/{OPTIM}" in recorded]
    return max(complete) if complete else None


def _update_best(ph: Phase, ctx: Ctx, state: dict[str, Any], ev: dict[str, Any], s: int) -> None:
    tau = ev.get("tau_sim")
    best = state["best"]
    if tau is None or tau != tau or (best is not None and tau <= best["tau_sim"]):
        return
    name = f"checkpoints/{ph.name}/best-{s:07d}.safetensors"
    ctx.writer(name, weights_bytes(ph.module))
    state["best"] = {"step": s, "tau_sim": tau, "acc": ev.get("acc"), "file": name}


def _write_checkpoint(ph: Phase, ctx: Ctx, opt: Any, sched: Any, state: dict[str, Any],
                      s: int) -> None:
    d = f"checkpoints/{ph.name}/step-{s:07d}"
    blobs = checkpoint_blobs(ph.module, opt, sched, state)
    for name in (WEIGHTS, OPTIM, STATE):  # state.json last: it completes the checkpoint
        ctx.writer(f"{d}/{name}", blobs[name])
    keep = {f"{d}/{n}" for n in blobs} | ({state["best"]["file"]} if state["best"] else set())
    for name in recorded_parts(ctx.store, ctx.prefix):
        if name.startswith(f"checkpoints/{ph.name}/") and name not in keep:
            _drop(ctx.store, ctx.prefix, name)


def _drop(store: Store, prefix: str, name: str) -> None:
    """Forget a recorded file: its record first, so a crash leaves only an untrusted orphan."""
    store.rm(f"{prefix}/{PARTS}/{name.replace('/', '__')}.json")
    store.rm(f"{prefix}/{name}")


def _finish_phase(ph: Phase, ctx: Ctx, state: dict[str, Any]) -> dict[str, Any]:
    """Export the best (held-out tau_sim) weights, record the phase as done."""
    files: dict[str, bytes] = {}
    if ctx.cfg.export_last:
        files.update(ph.export(f"{ph.folder}-last"))
    best = state["best"]
    if best is not None:
        load_trainable_state(ph.module, st_load(ctx.store.read_bytes(
            f"{ctx.prefix}/{best['file']}")))
    files.update(ph.export(ph.folder))
    for name, data in files.items():
        ctx.writer(name, data)
    last = state["metrics"][-1] if state["metrics"] else {}
    result = {"steps": state["step"], "total_steps": ph.total_steps, "best": best,
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
