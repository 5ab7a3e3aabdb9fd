"""Stage 3, ``train``: a DFlash draft (and a classic draft baseline) trained on the filter output.

``run_train(store, cfg, target, filter_manifest)`` returns the committed ``train/<key>``
manifest, key = hash(config, target, filter, code). It lists:

    dflash-draft/{config.json,model.safetensors}   serving layout (best held-out tau_sim)
    last/dflash-draft/...                          only with ``export_last`` (last step)
    classic-draft/...                              AutoModelForCausalLM folder + tokenizer
    train_metrics.parquet                          table "train_metrics" (the DFlash draft)
    classic_metrics.parquet                        table "classic_train_metrics" (baseline)
    train_summary.json                             data mix, best checkpoints, throughput, ...

While it runs, ``checkpoints/<phase>/step-NNNNNNN/{weights,optim}.safetensors + state.json`` are
written into the same output folder every ``checkpoint_every`` steps (recorded parts: a run
killed with SIGKILL resumes from the newest complete one) and removed after the commit.
The loop itself lives in ``tasks/train_dist.py``; with ``nproc > 1`` it runs under torchrun
(DDP) and this process only commits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage import Manifest, StageOutput, Store
from storage.keys import normalise
from tasks.base import run_stage, stage_code
from tasks.train_features import DataSelection, FeaturesConfig

log = logging.getLogger("dflash")
STAGE = "train"
FINAL_FILES_KEY = "outputs"
EXECUTION_FIELDS = {"threads", "strategy", "nproc", "nnodes", "node_rank", "rdzv_endpoint",
                    "dist_timeout_s", "feature_cache_max_gb"}


class TrainConfig(BaseModel):
    """Defaults: the embedded default run on a 2-core CPU (SmolLM2 target, ~12 min of training).

    ``TrainConfig.tiny()`` is the seconds-long CI variant.
    """

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    # --- the DFlash draft
    draft_layers: int = Field(2, ge=1)
    block_size: int = Field(8, ge=2)
    gamma: float = Field(4.0, gt=0, description="loss weight w_k = exp(-(k-1)/gamma)")
    distill: float = Field(0.0, ge=0, le=1, description="share of the DFlash loss that is "
                           "cross-entropy against the target's own next-token distribution "
                           "(teacher-forced; a feature cache then also keeps the target's "
                           "final hidden states); the rest is against the labels")
    labels: Literal["tokens", "target"] = Field(
        "tokens", description="what block offset k learns: the sequence's own token, or the "
        "target's greedy token while the sequence still follows the target's greedy chain "
        "(exactly what greedy verification accepts; an original answer then teaches the "
        "target's choices, not another model's)")
    init_from_target: bool = Field(True, description="start the draft as a continuation of "
                                   "the target's last layers: their projections and norms, the "
                                   "final norm, fc passing the deepest fused layer through "
                                   "(false: a small random init)")
    num_feature_layers: int = Field(4, ge=1)
    target_layer_ids: list[int] | None = Field(None, description="default: spread 1..L-3")
    mask_token_id: int | None = Field(None, description="default: chosen from the tokenizer")
    draft_vocab_size: int | None = Field(None, ge=16, description="reduced draft LM head "
                                         "(EAGLE-3 style id map); None = full vocabulary")
    # --- data (see tasks/train_features.DataSelection)
    data: DataSelection = Field(default_factory=DataSelection)
    anchors_per_seq: int = Field(48, ge=1, description="blocks per training sequence")
    eval_anchors_per_seq: int = Field(32, ge=1)
    # --- target features
    features: Literal["online", "cached"] = "cached"
    feature_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    feature_shard_tokens: int = Field(16384, ge=1, description="tokens per feature shard: "
                                      "the unit a rank builds (ranks take every N-th shard)")
    feature_cache_max_gb: float | None = Field(None, gt=0, description="cached mode: fail "
                                               "before any work when the cache would be larger "
                                               "(the local store's free space is checked too)")
    feature_cpu_bf16: bool | Literal["auto"] = Field(
        False, description="the training examples' target pass (cached or online) under bf16 "
        "autocast on CPU, LM head in fp32: ~1.6x faster where the CPU has native bf16; the "
        "greedy labels agree with the exact pass on ~99% of tokens. Held-out tau_sim always "
        "uses the exact pass. auto = where the CPU has native bf16")
    # --- optimiser
    lr: float = Field(6e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_frac: float = Field(0.04, ge=0, le=1)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    batch_size: int = Field(4, ge=1, description="GLOBAL sequences per micro-batch, over all "
                            "processes: each takes batch_size / (nproc * nnodes), so the data "
                            "order and the loss per step do not depend on the world size")
    grad_accum: int = Field(1, ge=1)
    epochs: float = Field(6.0, gt=0, description="upper bound; the time budget usually binds")
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    time_budget_min: float | None = Field(9.0, gt=0, description="wall-clock budget of the "
                                          "DFlash phase: caps the step count, measured up front")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    cpu_bf16: bool | Literal["auto"] = Field(
        False, description="bf16 autocast on CPU too: ~2.3x faster matmuls on CPUs with native "
        "bf16 (AVX512-BF16, AMX), slower on others; auto = where /proc/cpuinfo has them")
    # --- bookkeeping
    eval_every: int = Field(50, ge=0, description="steps; 0 = only at the end")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    export_last: bool = Field(False, description="also export the last-step draft")
    export_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="the exported DFlash draft's weights; null: bfloat16 when trained on "
        "CUDA, float32 on CPU")
    # --- the classic baseline
    classic_layers: int = Field(2, ge=0, le=8, description="0 = no classic draft")
    classic_max_steps: int | None = Field(None, ge=1, description="default: as the DFlash draft")
    classic_lr: float = Field(6e-4, gt=0)
    classic_time_budget_min: float | None = Field(3.0, gt=0)
    distill_temperature: float = Field(1.0, gt=0)
    # --- execution (none of these enter the cache key: the same training at another world
    # size or strategy is the same output, and resumes from the other's checkpoints)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole draft and its AdamW state; fsdp: "
        "FSDP2 (fully_shard), each rank holds 1/N of them (bf16 params, fp32 reduce on CUDA); "
        "fsdp always runs under torchrun, also with one process")
    nproc: int = Field(1, ge=1, description="data-parallel processes per node (torchrun)")
    nnodes: int = Field(1, ge=1, description="nodes; each runs `dflash train --node-rank K`")
    node_rank: int = Field(0, ge=0, description="this node's rank (0 .. nnodes-1)")
    rdzv_endpoint: str | None = Field(None, description="host:port of torchrun's c10d "
                                      "rendezvous (node 0's address); needed when nnodes > 1")
    dist_timeout_s: float = Field(1800.0, gt=0, description="process-group timeout: a "
                                  "collective waiting longer on a dead rank fails")
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process "
                                "(not part of the cache key)")

    @classmethod
    def tiny(cls, **kw: Any) -> TrainConfig:
        """Seconds-long settings for tests and CI."""
        base: dict[str, Any] = dict(
            data=DataSelection(max_seq_len=96, eval_max_seqs=4), anchors_per_seq=8,
            eval_anchors_per_seq=8, batch_size=2, max_steps=8, eval_every=4,
            checkpoint_every=4, log_every=1, classic_max_steps=4, features="online",
            feature_dtype="float32", lr=2e-3, classic_lr=2e-3, warmup_frac=0.1, threads=1,
            time_budget_min=None, classic_time_budget_min=None)
        base.update(kw)
        return cls(**base)

    @model_validator(mode="after")
    def _one_seed(self) -> TrainConfig:
        if self.data.seed not in (0, self.seed):
            raise ValueError("set train.seed; train.data.seed follows it")
        return self

    @model_validator(mode="after")
    def _world_fits(self) -> TrainConfig:
        if self.batch_size % self.world != 0:
            raise ValueError(f"train.batch_size {self.batch_size} is global and must divide "
                             f"evenly over nproc x nnodes = {self.world} processes; set it to a "
                             f"multiple of {self.world}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank {self.node_rank} must be below train.nnodes "
                             f"{self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint (host:port of node 0)")
        return self

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def launched(self) -> bool:
        """Whether the loop runs under torchrun (else in this process, a world of one)."""
        return self.world > 1 or self.strategy == "fsdp"

    def selection(self) -> DataSelection:
        """The data selection, seeded by ``seed`` (one seed for init, order and data)."""
        return self.data.model_copy(update={"seed": self.seed})

    def key_config(self) -> dict[str, Any]:
        """What enters the cache key (the store's and Prefect's): everything but performance
        and placement knobs; ``batch_size`` is global, so the world size changes nothing."""
        return normalise(self.model_dump(mode="json", exclude=EXECUTION_FIELDS))


# ----------------------------------------------------------------------------- target inputs
@dataclass(frozen=True)
class FolderInput:
    """A target given as a plain folder: its digest is the content hash of its files."""

    folder: Path
    digest: str


_DIGESTS: dict[tuple[str, int, int], str] = {}


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            fh = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    fh.update(block)
            _DIGESTS[key] = fh.hexdigest()
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + _DIGESTS[key].encode())
    return h.hexdigest()


def resolve_target(target: Manifest | str | Path, store: Store | None = None
                   ) -> tuple[Path, Any]:
    """(local folder, input ref with a ``digest``) for a target manifest or a folder."""
    if isinstance(target, Manifest):
        from tasks.models import target_folder

        return Path(target_folder(target, store)), target
    folder = Path(target).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"target folder {folder} has no config.json")
    return folder, FolderInput(folder, folder_digest(folder))


def features_config(cfg: TrainConfig, layer_ids: list[int], train_cpu_bf16: bool
                    ) -> FeaturesConfig:
    """The features stage's config; ``train_cpu_bf16`` is ``feature_cpu_bf16`` resolved on the
    training device (the key records what was computed, not the request)."""
    return FeaturesConfig(layer_ids=layer_ids, dtype=cfg.feature_dtype,
                          train_cpu_bf16=train_cpu_bf16, keep_last=cfg.distill > 0,
                          selection=cfg.selection(), shard_tokens=cfg.feature_shard_tokens)


# ----------------------------------------------------------------------------- the stage
def run_train(store: Store, cfg: TrainConfig, target_manifest_or_folder: Manifest | str | Path,
              filter_manifest: Manifest, force: bool = False) -> Manifest:
    """Train (or resume, or find cached) the drafts for this target and filter output."""
    folder, target_ref = resolve_target(target_manifest_or_folder, store)
    inputs = {"target": target_ref, "filter": filter_manifest}
    code = stage_code("train", ("tasks/train_dist.py", "tasks/train_phases.py",
                                "tasks/train_features.py"))

    def build(out: StageOutput) -> Manifest:
        from tasks import train_dist

        job = _job(store, cfg, folder, inputs, out.prefix)
        if cfg.launched:
            _launch_torchrun(job, cfg, out)
            summary = json.loads(store.read_bytes(f"{out.prefix}/train_summary.json"))
        else:
            summary = train_dist.run_worker(job, store=store, writer=out.write_bytes)
            assert summary is not None
        manifest = out.commit(files=summary[FINAL_FILES_KEY], extra=_extra(summary))
        store.rm(f"{out.prefix}/checkpoints", recursive=True)  # resume state, now useless
        return manifest

    if cfg.node_rank > 0:
        return _follow(store, cfg, folder, inputs, code)
    return run_stage(store, STAGE, cfg.key_config(), inputs, code, build, force=force)


def _follow(store: Store, cfg: TrainConfig, folder: Path, inputs: dict[str, Any],
            code: str) -> Manifest:
    """Node K > 0: run this node's ranks into node 0's output folder (no writer lease: node 0
    holds it and commits), then wait for node 0's manifest."""
    from storage import read_manifest
    from tasks.base import key_for

    key = key_for(STAGE, cfg.key_config(), inputs, code)
    done = read_manifest(store, STAGE, key)
    if done is not None:
        return done

    class _Out:  # what `_launch_torchrun` needs of a StageOutput
        prefix = f"{STAGE}/{key}"

        def _heartbeat(self) -> None:
            pass

    job = _job(store, cfg, folder, inputs, _Out.prefix)
    _launch_torchrun(job, cfg, _Out())  # type: ignore[arg-type]
    deadline = time.monotonic() + 600
    while (m := read_manifest(store, STAGE, key)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"train node {cfg.node_rank}: node 0 did not commit "
                               f"{STAGE}/{key} within 10 minutes of the ranks' end")
        time.sleep(1.0)
    return m


def _job(store: Store, cfg: TrainConfig, folder: Path, inputs: dict[str, Any],
         prefix: str) -> Any:
    from tasks import train_dist

    return train_dist.Job(store_url=store.url, prefix=prefix, config=cfg.model_dump(),
                          target_folder=str(folder), filter_manifest=inputs["filter"].to_dict(),
                          target_digest=inputs["target"].digest)


def _extra(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("data_mix", "dflash", "classic", "feature_bytes_per_token", "features_mode",
            "features_key", "draft_vocab", "draft_config", "cpu_bf16", "feature_cpu_bf16",
            "resumed_from", "wall_s")
    return {k: summary[k] for k in keep if k in summary}


def torchrun_args(cfg: TrainConfig) -> list[str]:
    """torchrun's arguments: one node (``--standalone``) or a c10d rendezvous at
    ``rdzv_endpoint`` that every node's task joins with its own ``--node-rank``."""
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        return ["--standalone", f"--nproc-per-node={cfg.nproc}"]
    return [f"--nnodes={cfg.nnodes}", f"--nproc-per-node={cfg.nproc}",
            f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}", "--rdzv-id=dflash-train",
            "--max-restarts=0"]


def _launch_torchrun(job: Any, cfg: TrainConfig, out: StageOutput) -> None:
    """Run the loop under torchrun and wait, keeping the writer lease alive meanwhile.

    Rank 0 writes its files with ``storage.manifest.write_part`` into our output folder; this
    process commits them afterwards. The ranks watch this process (``DFLASH_TRAIN_PARENT``):
    torchrun starts them in their own sessions, so they would outlive a killed launcher.
    """
    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job.to_dict()))
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun) if torchrun.exists() else sys.executable, *(
            [] if torchrun.exists() else ["-m", "torch.distributed.run"]),
            *torchrun_args(cfg), "-m", "tasks.train_dist", str(job_path)]
        env = {**os.environ, "DFLASH_TRAIN_PARENT": str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(
                   [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
        log.info("train: %s", " ".join(cmd))
        # stderr goes to a file that we relay, not to a pipe: ranks outliving a killed launcher
        # must not die of a broken pipe before they notice (and say) it
        err_path = Path(tmp) / "torchrun.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, env=env, stderr=err)
        failed: dict[str, str] = {}
        reader = threading.Thread(target=_relay, args=(err_path, proc, failed), daemon=True)
        reader.start()
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(1.0)
            if time.monotonic() - last > 60:
                out._heartbeat()  # the lease's heartbeat: we are alive while the ranks work
                last = time.monotonic()
        reader.join(timeout=5)
        if proc.returncode != 0:
            who = (f"rank {failed['rank']} failed (exit code {failed.get('exitcode', '?')})"
                   if "rank" in failed else "a rank failed")
            raise RuntimeError(f"train: {who}; torchrun exited with {proc.returncode} (the "
                               "rank's error is above)")


_FAILURE = re.compile(r"^\s*(rank|exitcode)\s*:\s*(-?\d+)")


def _relay(path: Path, proc: subprocess.Popen, failed: dict[str, str]) -> None:
    """Copy torchrun's stderr file to our stderr as it grows, keeping the first failed rank of
    its summary (``Root Cause ... rank : 1 (local_rank: 1) ... exitcode : -9``)."""
    with open(path, errors="replace") as f:
        while True:
            line = f.readline()
            if not line:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
                continue
            sys.stderr.write(line)
            if "Root Cause" in line:  # the first failure; "Failures:" lists those it caused
                failed["root"] = "1"
            m = _FAILURE.match(line)
            if m and "root" in failed and m.group(1) not in failed:
                failed[m.group(1)] = m.group(2)
