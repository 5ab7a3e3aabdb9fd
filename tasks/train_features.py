"""Training data selection and the cached target-features stage ``features/<key>``.

The train stage's data is a deterministic function of the filter output, the target's tokenizer
and a few knobs (``DataSelection``): which sources (regenerated responses and/or the prompt
sources' original answers, each a fraction of the rows), a response-token budget, a max length.
The same function runs in the features stage and in every training process, so a cached feature
shard and an online batch always describe the same examples.

``features/<key>`` (key = target + filter manifests + layer ids + dtype + selection) holds
safetensors shards ``train-NNNNN.safetensors`` / ``eval-NNNNN.safetensors`` (see
``dflash_models.features.pack_shard``) and ``features.json``. Each shard is recorded as it is
written, so a killed build resumes at the first missing shard.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage import Manifest, StageOutput, Store, read_manifest
from storage.errors import SchemaError
from storage.keys import code_fingerprint, normalise
from storage.manifest import recorded_parts, write_part
from storage.refs import read_table
from tasks.base import key_for, run_stage
from tasks.progress import Progress

if TYPE_CHECKING:  # torch is imported lazily: the CLI validates configs without loading it
    from dflash_models.features import Example, FeatureRow

log = logging.getLogger("dflash")
STAGE = "features"
COLUMNS = ("prompt_token_ids", "response_token_ids", "reference_response")


class DataSelection(BaseModel):
    """Which examples a training run uses (all fields enter the cache keys)."""

    model_config = ConfigDict(extra="forbid")
    mix_regenerated: float = Field(1.0, ge=0, le=1, description="share of generated train rows "
                                   "used with their regenerated response")
    mix_original: float = Field(1.0, ge=0, le=1, description="share of train rows (that have one) "
                                "used with the source's original answer")
    max_train_tokens: int | None = Field(None, ge=1, description="cap on training response tokens")
    max_seq_len: int = Field(512, ge=8, description="prompt + response truncated to this")
    eval_max_seqs: int = Field(32, ge=0, description="held-out sequences for tau_sim")
    seed: int = Field(0, description="follows train.seed")


@dataclass
class TrainData:
    train: list[Example]
    eval: list[Example]
    mix: dict[str, Any]  # what was used, recorded in the manifest


def _seeded_order(n: int, seed: int, salt: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.randperm(n, generator=g).tolist()


def load_split(store: Store, manifest: Manifest, table: str) -> pa.Table:
    """The split's rows (only the columns training needs; reference_response may be absent)."""
    t = read_table(store, manifest, table, COLUMNS)  # copies or row references alike
    cols = {c: t.column(c) for c in COLUMNS if c in t.column_names}
    if "reference_response" not in cols:
        cols["reference_response"] = pa.nulls(t.num_rows, pa.string())
    for c in ("prompt_token_ids", "response_token_ids"):
        if c not in cols and t.num_rows:
            raise SchemaError(f"{manifest.prefix}: table {table!r} has no column {c!r}; it is "
                              "not a filter split (re-run the filter stage)")
        cols.setdefault(c, pa.array([], pa.list_(pa.int64())))
    return pa.table(cols).cast(pa.schema([("prompt_token_ids", pa.list_(pa.int64())),
                                          ("response_token_ids", pa.list_(pa.int64())),
                                          ("reference_response", pa.string())]))


def select_data(train: pa.Table, eval_: pa.Table, tokenizer: Any, eos_id: int | None,
                sel: DataSelection) -> TrainData:
    """Deterministic example selection: seeded row orders per source, then the token budget
    filled with regenerated examples first, then originals (each in a seeded order)."""
    from dflash_models.features import SOURCES, make_example, original_response_ids

    prompts = train.column("prompt_token_ids").to_pylist()
    responses = train.column("response_token_ids").to_pylist()
    refs = train.column("reference_response").to_pylist()
    n = len(prompts)
    cands: list[Example] = []
    generated = [r for r in range(n) if responses[r]]  # originals-only rows have no response
    if sel.mix_regenerated > 0 and generated:
        order = [generated[i] for i in _seeded_order(len(generated), sel.seed, 1)]
        for r in sorted(order[: math.ceil(sel.mix_regenerated * len(generated))]):
            ex = make_example(prompts[r], responses[r], "regenerated", r, sel.max_seq_len)
            if ex is not None:
                cands.append(ex)
    has_ref = [r for r in range(n) if refs[r] and refs[r].strip()]
    if sel.mix_original > 0 and has_ref:
        order = [has_ref[i] for i in _seeded_order(len(has_ref), sel.seed, 2)]
        for r in sorted(order[: math.ceil(sel.mix_original * len(has_ref))]):
            resp = original_response_ids(tokenizer, refs[r], eos_id)
            ex = make_example(prompts[r], resp, "original", r, sel.max_seq_len)
            if ex is not None:
                cands.append(ex)
    # The budget cuts originals before regenerated answers: those cost a generation each, were
    # asked for one by one, and alone teach whole greedy chains (an original mostly teaches
    # offset 1). Within a source the order is seeded, so a smaller budget is a prefix.
    chosen, tokens = [], 0
    for src in SOURCES:
        pool = [e for e in cands if e.source == src]
        for i in _seeded_order(len(pool), sel.seed, 3):
            if sel.max_train_tokens is not None and tokens >= sel.max_train_tokens:
                break
            chosen.append(pool[i])
            tokens += pool[i].response_tokens
    ev_p = eval_.column("prompt_token_ids").to_pylist()
    ev_r = eval_.column("response_token_ids").to_pylist()
    evals = []
    for r in _seeded_order(len(ev_p), sel.seed, 4):
        if len(evals) >= sel.eval_max_seqs:
            break
        ex = make_example(ev_p[r], ev_r[r], "regenerated", r, sel.max_seq_len)
        if ex is not None:
            evals.append(ex)
    mix: dict[str, Any] = {"selection": sel.model_dump(), "train_rows": n,
                           "rows_generated": len(generated), "rows_with_original": len(has_ref),
                           "sources": {}}
    for src in ("regenerated", "original"):
        exs = [e for e in chosen if e.source == src]
        mix["sources"][src] = {"sequences": len(exs),
                               "response_tokens": sum(e.response_tokens for e in exs),
                               "tokens": sum(int(e.ids.shape[0]) for e in exs)}
    mix["response_tokens"] = sum(e.response_tokens for e in chosen)
    mix["tokens"] = sum(int(e.ids.shape[0]) for e in chosen)
    mix["eval_sequences"] = len(evals)
    mix["eval_response_tokens"] = sum(e.response_tokens for e in evals)
    return TrainData(chosen, evals, mix)


def load_data(store: Store, filter_manifest: Manifest, target: Any,
              sel: DataSelection) -> TrainData:
    from dflash_models.features import end_of_turn_id

    return select_data(load_split(store, filter_manifest, "train"),
                       load_split(store, filter_manifest, "eval"),
                       target.tokenizer, end_of_turn_id(target), sel)


# ----------------------------------------------------------------------------- the stage
class FeaturesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_ids: list[int]
    dtype: str = "bfloat16"
    train_cpu_bf16: bool = False  # train split from a bf16-autocast target pass (eval: exact)
    keep_last: bool = False  # train split also keeps the final hidden states (distillation)
    selection: DataSelection
    shard_tokens: int = 16384  # ~75 MB of bf16 features for a 4-layer H=576 target
    batch_tokens: int = 2048  # padded tokens per target forward while building


def features_code() -> str:
    """Only what can change the shards: this module, the feature and target code."""
    return code_fingerprint(["tasks/train_features.py", "tasks/base.py",
                             "dflash_models/features.py", "dflash_models/target.py"], packages=())


def run_features(store: Store, cfg: FeaturesConfig, inputs: dict[str, Any], target: Any,
                 data: TrainData, force: bool = False, rank: int = 0, world: int = 1,
                 barrier: Any = None) -> Manifest:
    """Compute (or find) the cached features of ``data`` (``inputs``: target and filter refs).

    With ``world`` > 1 every rank calls this: rank ``r`` builds shards ``r, r + world, ...``
    (whole shards, each made of the same length-batches as a single builder's, so the bytes do
    not depend on the world size) and records them itself; rank 0 holds the writer lease and
    commits after ``barrier()`` (a collective over the ranks)."""
    if world == 1:
        m = run_stage(store, STAGE, cfg, inputs, features_code(),
                      lambda out: _commit(out, _build(out.store, out.prefix, cfg, target, data)),
                      force=force)
        gc.collect()
        return m
    key = key_for(STAGE, cfg, inputs, features_code())
    if (m := read_manifest(store, STAGE, key)) is not None:
        return m
    out = None
    if rank == 0:  # the lease, as run_stage takes it
        out = StageOutput(store, STAGE, key, config=normalise(cfg),
                          inputs={k: v.digest for k, v in inputs.items()},
                          code_fingerprint=features_code()).__enter__()
    try:
        barrier()
        if read_manifest(store, STAGE, key) is None:  # not committed by another writer meanwhile
            summary = _build(store, f"{STAGE}/{key}", cfg, target, data, rank, world)
            barrier()  # every rank's shards are recorded
            if out is not None:
                _commit(out, summary)
            barrier()
    finally:
        if out is not None:
            out.__exit__(None, None, None)
    m = read_manifest(store, STAGE, key)
    assert m is not None
    gc.collect()
    return m


def _commit(out: StageOutput, summary: dict[str, Any]) -> Manifest:
    out.write_bytes("features.json", json.dumps(summary, indent=2).encode())
    return out.commit(extra=summary)


def _build(store: Store, prefix: str, cfg: FeaturesConfig, target: Any, data: TrainData,
           rank: int = 0, world: int = 1) -> dict[str, Any]:
    """This rank's shards (those not recorded yet); returns the output's summary."""
    from dflash_models.features import (
        bytes_per_token,
        length_batches,
        pack_shard,
        plan_shards,
        target_pass,
    )

    tgt = target
    done = recorded_parts(store, prefix)
    summary: dict[str, Any] = {"layer_ids": cfg.layer_ids, "dtype": cfg.dtype,
                               "train_cpu_bf16": cfg.train_cpu_bf16,
                               "keep_last": cfg.keep_last,
                               "bytes_per_token": bytes_per_token(
                                   len(cfg.layer_ids), tgt.hidden_size, cfg.dtype,
                                   cfg.keep_last),
                               "splits": {}, "bytes": 0}
    for split, exs in (("train", data.train), ("eval", data.eval)):
        shards = plan_shards(exs, cfg.shard_tokens)
        mine = [j for j in range(len(shards)) if j % world == rank]
        todo = [j for j in mine if f"{split}-{j:05d}.safetensors" not in done]
        tokens = sum(int(e.ids.shape[0]) for e in exs)
        summary["splits"][split] = {"sequences": len(exs), "tokens": tokens,
                                    "shards": len(shards)}
        keep_last = cfg.keep_last and split == "train"  # held-out rows never need `last`
        summary["bytes"] += tokens * bytes_per_token(len(cfg.layer_ids), tgt.hidden_size,
                                                     cfg.dtype, keep_last)
        with Progress(f"features {split}", total=len(mine), unit="shards",
                      artifact_key=f"features-{split}", enabled=rank == 0) as prog:
            prog.advance(len(mine) - len(todo))
            for j in todo:
                rows: dict[int, FeatureRow] = {}
                for batch in length_batches(shards[j], exs, cfg.batch_tokens):
                    got = target_pass(tgt, [exs[i].ids for i in batch], cfg.layer_ids,
                                      cpu_bf16=cfg.train_cpu_bf16 and split == "train",
                                      keep_last=keep_last,
                                      starts=[exs[i].response_start for i in batch])
                    rows.update(zip(batch, got, strict=True))
                idx = shards[j]
                data_bytes = pack_shard(idx, [rows[i] for i in idx], cfg.dtype)
                write_part(store, prefix, f"{split}-{j:05d}.safetensors", data_bytes,
                           rows=len(idx))
                prog.advance(1, tokens=sum(int(exs[i].ids.shape[0]) for i in idx))
    return summary


def check_cache_size(store: Store, cfg: FeaturesConfig, hidden_size: int, data: TrainData,
                     max_gb: float | None) -> int:
    """The cache's bytes, or one clear error before any work when it would not fit the limit
    (``train.feature_cache_max_gb``) or a local store's free space."""
    import shutil

    from dflash_models.features import bytes_per_token

    tokens = {s: sum(int(e.ids.shape[0]) for e in exs)
              for s, exs in (("train", data.train), ("eval", data.eval))}
    need = sum(n * bytes_per_token(len(cfg.layer_ids), hidden_size, cfg.dtype,
                                   cfg.keep_last and s == "train") for s, n in tokens.items())
    if max_gb is not None and need > max_gb * 1e9:
        raise ValueError(f"train: the feature cache would take {need / 1e9:.1f} GB, over "
                         f"train.feature_cache_max_gb = {max_gb}; use train.features: online "
                         "or raise the limit")
    if store.protocol == "file":
        where = Path(store.path())
        while not where.exists() and where != where.parent:  # a new store: its first write
            where = where.parent  # creates the folder on the filesystem of its nearest parent
        free = shutil.disk_usage(where).free
        if need > free:
            raise ValueError(f"train: the feature cache would take {need / 1e9:.1f} GB, more "
                             f"than the {free / 1e9:.1f} GB free under {store.path()}; use "
                             "train.features: online or free space")
    return need


def read_features(store: Store, manifest: Manifest, split: str) -> dict[int, FeatureRow]:
    """All rows of one split of a committed features output, by example index."""
    from dflash_models.features import unpack_shard
    from storage.verify import verified_bytes

    rows: dict[int, FeatureRow] = {}
    for f in manifest.files:
        if f.path.startswith(f"{split}-") and f.path.endswith(".safetensors"):
            rows.update(unpack_shard(verified_bytes(store, manifest, f)))  # size + sha256
    return rows


class StreamedFeatures:
    """The training rows of a committed features output, read example by example from
    memory-mapped safetensors shards (``safe_open`` slices): the cache is never held in RAM,
    whatever its size. A remote store's shards are first copied to a local temporary folder
    (disk, one shard at a time). Same ``get`` as ``dflash_models.features.CachedFeatures``."""

    mode = "cached"

    def __init__(self, store: Store, manifest: Manifest, split: str, examples: list[Example],
                 device: Any = "cpu") -> None:
        import tempfile

        import torch
        from safetensors import safe_open

        self.device = torch.device(device)
        self._tmp = None if store.protocol == "file" else tempfile.TemporaryDirectory(
            prefix="dflash-features-")
        self._handles: dict[str, Any] = {}
        self._where: dict[int, tuple[str, int, int]] = {}
        for f in manifest.files:
            if not (f.path.startswith(f"{split}-") and f.path.endswith(".safetensors")):
                continue
            local = self._local(store, f"{manifest.prefix}/{f.path}")
            with safe_open(local, framework="pt") as h:
                off = h.get_tensor("offsets").tolist()
                ids = h.get_tensor("ids")
                for j, i in enumerate(h.get_tensor("index").tolist()):
                    a, b = off[j], off[j + 1]
                    if i >= len(examples) or not torch.equal(ids[a:b].long(), examples[i].ids):
                        raise ValueError(f"feature cache example {i}: token ids differ from "
                                         "the data")
                    self._where[int(i)] = (local, a, b)
        missing = [i for i in range(len(examples)) if i not in self._where]
        if missing:
            raise ValueError(f"feature cache lacks {len(missing)} examples (first: {missing[0]})")

    def _local(self, store: Store, rel: str) -> str:
        if self._tmp is None:
            return store.path(rel)
        from pathlib import Path

        dst = Path(self._tmp.name) / rel.replace("/", "__")
        with store.open_input(rel) as src, open(dst, "wb") as out:
            while block := src.read(1 << 24):
                out.write(block)
        return str(dst)

    def _handle(self, path: str) -> Any:
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def greedy(self, i: int) -> Any:
        path, a, b = self._where[i]
        return self._handle(path).get_slice("greedy")[a:b].long()

    def get(self, indices: list[int]) -> list[FeatureRow]:
        import torch

        from dflash_models.features import FeatureRow

        out = []
        for i in indices:
            path, a, b = self._where[i]
            h = self._handle(path)
            last = (h.get_slice("last")[a:b].to(self.device, torch.float32)
                    if "last" in h.keys() else None)
            out.append(FeatureRow(h.get_slice("ids")[a:b].long(),
                                  h.get_slice("features")[a:b].to(self.device, torch.float32),
                                  h.get_slice("greedy")[a:b].long(), last))
        return out
