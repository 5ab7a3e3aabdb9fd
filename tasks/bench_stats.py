"""Benchmark statistics: the lossless audit, per-sample rows and per-(method, dataset) summaries.

Definitions (dflash-method.md section 4; docs/benchmarks.md):
- tau: tokens emitted per target verification pass, bonus included, over every pass after the
  prefill (the prefill's first token is what TTFT times). 1 for `hf_generate` and `ar`.
- acceptance rate: accepted draft tokens / drafted tokens; per position j: of the passes that
  drafted at least j tokens, the share that accepted at least j.
- tokens/s: decode tokens (after the first emission) / decode seconds (after TTFT), summed over
  the group's generations; speedup divides it by `hf_generate` greedy on the same dataset.
- audit (T=0): each output against `hf_generate`'s greedy output for the same prompt.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.bench_methods import Prompt, Sample, divergence_margin

log = logging.getLogger("dflash")

HW_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("device", pa.string()), ("device_type", pa.string()), ("gpu_name", pa.string()),
    ("gpu_count", pa.int32()), ("gpu_mem_gb", pa.float64()), ("compute_capability", pa.string()),
    ("driver", pa.string()), ("cuda_runtime", pa.string()), ("cpu_model", pa.string()),
    ("cpu_count", pa.int32()), ("host_mem_gb", pa.float64()), ("python", pa.string()),
    ("torch", pa.string()), ("transformers", pa.string()), ("dtype", pa.string()),
    ("package_version", pa.string()), ("git_sha", pa.string()),
]
_IDS = [("hardware_fingerprint", pa.string()), ("hardware_tag", pa.string()),
        ("target", pa.string()), ("target_digest", pa.string()), ("draft", pa.string()),
        ("draft_digest", pa.string())]
_KEYS = [("run_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
         ("method", pa.string()), ("dataset", pa.string())]
# Which orchestrator run made the row (NULL outside a deployment / flow run).
RUN_COLUMNS = [("flow_run_id", pa.string()), ("deployment", pa.string())]
F64, I32, I64 = pa.float64(), pa.int32(), pa.int64()

SUMMARY_SCHEMA = pa.schema(_KEYS + [
    ("temperature", F64), ("block_size", I32), ("n_prompts", I32), ("n_samples", I32),
    ("max_new_tokens", I32), ("tokens", I64), ("tau", F64), ("acceptance_rate", F64),
    ("per_position_acceptance", pa.list_(F64)), ("accept_len_hist", pa.list_(I64)),
    ("tokens_per_s", F64), ("ttft_p50", F64), ("ttft_p95", F64), ("tpot_p50", F64),
    ("tpot_p95", F64), ("latency_p50", F64), ("latency_p95", F64), ("speedup", F64),
    ("exact_match_rate", F64), ("mean_first_divergence", F64), ("n_divergences", I32),
    ("n_suspect_divergences", I32), ("max_divergence_margin", F64), ("draft_pass_s", F64),
    ("verify_pass_s", F64), ("ar_step_s", F64), ("classic_k", I32),
    ("prompt_lookup_num_tokens", I32), ("threads", I32), ("engine_path", pa.string()),
    ("dflash_digest", pa.string()),
    ("classic_digest", pa.string()),
    ("draft_vocab", I32),  # dflash rows: K of a reduced draft vocabulary; NULL = full vocabulary
] + _IDS + HW_COLUMNS + RUN_COLUMNS)

SAMPLES_SCHEMA = pa.schema(_KEYS + [
    ("prompt_id", pa.string()), ("prompt_tokens", I32), ("temperature", F64),
    ("block_size", I32), ("repeat", I32), ("seed", I64), ("output_ids", pa.list_(I64)),
    ("tokens", I32), ("accepted_lengths", pa.list_(I32)), ("accepted_drafts", pa.list_(I32)),
    ("drafted", pa.list_(I32)), ("n_target_passes", I32), ("n_draft_passes", I32),
    ("ttft_s", F64), ("total_s", F64), ("tpot_s", F64), ("exact_match", pa.bool_()),
    ("first_divergence", I32), ("divergence_margin", F64), ("divergence_ref_token", I64),
    ("divergence_token", I64), ("divergence_suspect", pa.bool_()), ("draft_vocab", I32),
] + _IDS + RUN_COLUMNS)


@dataclass
class Run:
    """One timed generation and, at T=0, its audit against `hf_generate`."""

    dataset: str
    prompt: Prompt
    method: str
    block_size: int | None
    temperature: float
    repeat: int
    seed: int | None
    sample: Sample
    draft_vocab: int | None = None  # K when a reduced-vocabulary draft drafted over its K ids
    exact: bool | None = None
    first_div: int | None = None
    margin: float | None = None
    ref_token: int | None = None
    token: int | None = None
    suspect: bool | None = None


def audit(runs: list[Run], target: Any, near_tie: float) -> None:
    """T=0 lossless audit: compare each output with greedy `generate()` on the same prompt.

    At a divergence, the target's top-2 logit margin after prompt + reference prefix says whether
    two correct computations could disagree (a near-tie) or the method is wrong (a bug).
    """
    from dflash_models.engine import first_divergence

    refs = {(r.dataset, r.prompt.prompt_id): r.sample.output_ids for r in runs
            if r.method == "hf_generate" and r.temperature == 0.0 and r.repeat == 0}
    margins: dict[tuple[str, str, int], float] = {}
    for r in runs:
        ref = refs.get((r.dataset, r.prompt.prompt_id))
        if r.temperature != 0.0 or ref is None:
            continue
        out = r.sample.output_ids
        pos = first_divergence(ref, out)
        r.exact = pos is None
        if pos is None:
            continue
        k = (r.dataset, r.prompt.prompt_id, pos)
        if k not in margins:
            margins[k] = divergence_margin(target, r.prompt.ids, ref, pos)
        r.first_div, r.margin = pos, margins[k]
        r.ref_token = ref[pos] if pos < len(ref) else None
        r.token = out[pos] if pos < len(out) else None
        r.suspect = r.margin > near_tie
        (log.warning if r.suspect else log.info)(
            "bench audit: %s%s on %s diverges from generate() at token %d (%s vs %s), target "
            "top-2 margin %.4g%s", r.method, f" b{r.block_size}" if r.block_size else "",
            r.prompt.prompt_id, pos, r.token, r.ref_token, r.margin,
            " -- NOT a near-tie: a bug" if r.suspect else " (near-tie)")


def _draft_for(method: str, drafts: dict[str, Any]) -> Any:
    return drafts.get("dflash") if method == "dflash" else \
        drafts.get("classic") if method in ("classic", "hf_assisted") else None


def _ids(method: str, common: dict[str, Any], drafts: dict[str, Any]) -> dict[str, Any]:
    d = _draft_for(method, drafts)
    return {"hardware_fingerprint": common["hardware_fingerprint"],
            "hardware_tag": common["hardware_tag"], "target": common["target"],
            "target_digest": common["target_digest"], "draft": d.ref if d else None,
            "draft_digest": d.digest if d else None}


def sample_row(r: Run, common: dict[str, Any], drafts: dict[str, Any]) -> dict[str, Any]:
    s = r.sample
    return {
        "run_id": common["run_id"], "created_at": common["created_at"], "method": r.method,
        "dataset": r.dataset, "prompt_id": r.prompt.prompt_id, "prompt_tokens": len(r.prompt.ids),
        "temperature": r.temperature, "block_size": r.block_size, "repeat": r.repeat,
        "seed": r.seed, "output_ids": s.output_ids, "tokens": len(s.output_ids),
        "accepted_lengths": s.accepted_lengths, "accepted_drafts": s.accepted_drafts,
        "drafted": s.drafted, "n_target_passes": s.n_target_passes,
        "n_draft_passes": s.n_draft_passes, "ttft_s": s.ttft_s, "total_s": s.total_s,
        "tpot_s": s.decode_s / s.decode_tokens if s.decode_tokens else None,
        "exact_match": r.exact, "first_divergence": r.first_div, "divergence_margin": r.margin,
        "divergence_ref_token": r.ref_token, "divergence_token": r.token,
        "divergence_suspect": r.suspect, "draft_vocab": r.draft_vocab,
        **_ids(r.method, common, drafts),
    }


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _acceptance(samples: list[Sample]) -> tuple[float | None, list[float], list[int], float | None]:
    """(acceptance rate, per-position rates, accepted-length histogram, tau) of a group."""
    drafted = [d for s in samples for d in s.drafted]
    acc = [a for s in samples for a in s.accepted_drafts]
    rate = sum(acc) / sum(drafted) if sum(drafted) else None
    per_pos = []
    for j in range(1, max(drafted, default=0) + 1):
        den = sum(1 for d in drafted if d >= j)
        hits = sum(1 for a, d in zip(acc, drafted, strict=False) if d >= j and a >= j)
        per_pos.append(hits / den)
    lengths = [n for s in samples for n in s.accepted_lengths]
    hist = [sum(1 for n in lengths if n == k) for k in range(1, max(lengths, default=0) + 1)]
    tau = sum(lengths) / len(lengths) if lengths else None
    return rate, per_pos, hist, tau


def summary_rows(runs: list[Run], cfg: Any, common: dict[str, Any], drafts: dict[str, Any],
                 info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, dataset, temperature, block_size, draft_vocab) of this run."""
    groups: dict[tuple[str, str, float, int | None, int | None], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.dataset, r.temperature, r.block_size, r.draft_vocab)].append(r)

    def tps(rs: list[Run]) -> float | None:
        sec = sum(r.sample.decode_s for r in rs)
        return sum(r.sample.decode_tokens for r in rs) / sec if sec > 0 else None

    ref_tps = {ds: tps(rs) for (m, ds, t, _b, _k), rs in groups.items()
               if m == "hf_generate" and t == 0.0}
    ar_step: dict[tuple[str, float], float | None] = {
        (ds, t): _mean([x for r in rs for x in r.sample.verify_s])
        for (m, ds, t, _b, _k), rs in groups.items() if m == "ar"}
    hw = {"device": info.get("device_type"), **{k: info.get(k) for k, _ in HW_COLUMNS[1:]}}
    rows = []
    for (method, ds, temp, block, vocab), rs in groups.items():
        samples = [r.sample for r in rs]
        rate, per_pos, hist, tau = _acceptance(samples)
        speed, ref = tps(rs), ref_tps.get(ds)
        audited = [r for r in rs if r.exact is not None]
        divs = [r for r in audited if not r.exact]
        steps_draft = [x for s in samples for x in s.draft_s]
        steps_verify = [x for s in samples for x in s.verify_s]
        engine = method in ("ar", "dflash", "classic")
        rows.append({
            "run_id": common["run_id"], "created_at": common["created_at"], "method": method,
            "dataset": ds, "temperature": temp, "block_size": block,
            "n_prompts": len({r.prompt.prompt_id for r in rs}), "n_samples": len(rs),
            "max_new_tokens": cfg.max_new_tokens,
            "tokens": sum(len(s.output_ids) for s in samples), "tau": tau,
            "acceptance_rate": rate, "per_position_acceptance": per_pos, "accept_len_hist": hist,
            "tokens_per_s": speed,
            "ttft_p50": _pct([s.ttft_s for s in samples], 50),
            "ttft_p95": _pct([s.ttft_s for s in samples], 95),
            "tpot_p50": _pct(tpots := [s.decode_s / s.decode_tokens for s in samples
                                       if s.decode_tokens], 50),
            "tpot_p95": _pct(tpots, 95),
            "latency_p50": _pct([s.total_s for s in samples], 50),
            "latency_p95": _pct([s.total_s for s in samples], 95),
            "speedup": speed / ref if speed and ref else None,
            "exact_match_rate": (len(audited) - len(divs)) / len(audited) if audited else None,
            "mean_first_divergence": _mean([r.first_div for r in divs]),
            "n_divergences": len(divs) if audited else None,
            "n_suspect_divergences": sum(1 for r in divs if r.suspect) if audited else None,
            "max_divergence_margin": max((r.margin for r in divs), default=None),
            "draft_pass_s": (_mean(steps_draft) if steps_draft else 0.0) if engine else None,
            "verify_pass_s": _mean(steps_verify) if engine else None,
            "ar_step_s": ar_step.get((ds, temp), ar_step.get((ds, 0.0))),
            "classic_k": cfg.classic_k if method == "classic" else None,
            "prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens
            if method == "prompt_lookup" else None,
            "threads": info.get("threads"),
            "engine_path": info.get("engine_path") if engine else None,
            "dflash_digest": drafts["dflash"].digest if drafts.get("dflash") else None,
            "classic_digest": drafts["classic"].digest if drafts.get("classic") else None,
            "draft_vocab": vocab,
            **_ids(method, common, drafts), **hw,
        })
    order = {m: i for i, m in enumerate(("hf_generate", "ar", "dflash", "classic", "hf_assisted",
                                         "prompt_lookup"))}
    rows.sort(key=lambda r: (r["dataset"], r["temperature"], order.get(r["method"], 9),
                             r["block_size"] or 0, -(r["draft_vocab"] or 0)))
    return rows
