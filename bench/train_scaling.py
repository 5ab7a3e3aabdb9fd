"""The data-scaling curve: held-out tau_sim against training tokens, regenerated vs original.

    .venv/bin/python bench/train_scaling.py --minutes 60 [--gen-rows 320] [--store DIR]

1. Data (cached in the store, resumable): ShareGPT first turns through the pipeline's own
   target / prompts / generations stages (greedy SmolLM2 answers, ``--max-new-tokens``), split
   into a held-out eval set (the target's own greedy answers: tau_sim's ground truth) and a
   train set that carries both the regenerated answer and ShareGPT's original one. Extra
   ShareGPT rows (``--orig-rows``) come without generation: only their original answers are
   used, which costs one prefill pass per token instead of generation.
2. Points: per source, ``--points`` training-token budgets doubling up to the largest that the
   ``--minutes`` training budget allows (split evenly between sources, calibrated on measured
   tokens/s); each point trains ``--epochs`` epochs with cached features and keeps its best
   held-out tau_sim (the checkpoint rule of the train stage). ``--tokens SOURCE=N,N,...`` fixes
   a source's budgets instead; ``--top SOURCE=MINUTES`` trains its largest point for MINUTES
   minutes (the cosine spans them) and also reads that run's best held-out figure at
   ``--epochs`` epochs, the curve's own footing, off its evaluations.
3. Output: a table on stdout, ``scaling.json`` and ``scaling.png`` in ``--out``.

Every point is a cached train-stage output: rerunning the script only computes missing points.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import Manifest, StageOutput, Store, read_manifest  # noqa: E402
from storage.parquet import read_parquet  # noqa: E402

log = logging.getLogger("dflash")


# ----------------------------------------------------------------------------- data
def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({
        "prompt_id": [r["prompt_id"] for r in rows],
        "prompt_token_ids": pa.array([r["prompt_token_ids"] for r in rows], pa.list_(pa.int32())),
        "response_token_ids": pa.array([r["response_token_ids"] for r in rows],
                                       pa.list_(pa.int32())),
        "reference_response": pa.array([r.get("reference_response") for r in rows], pa.string()),
    })


def sharegpt_filter(store: Store, target_dir: Path, n_train: int, n_eval: int,
                    regenerated: str | None = "generate", max_new_tokens: int = 256,
                    orig_rows: int = 0, seed: int = 0) -> Manifest:
    """A filter-stage-shaped output (tables train/eval) built from packaged ShareGPT.

    ``regenerated="generate"``: responses are the target's greedy answers (pipeline stages);
    ``None``: the original answers stand in for them (throughput runs only). ``orig_rows`` more
    rows carry only an original answer (empty regenerated response: never used as such).
    """
    from transformers import AutoTokenizer

    from dflash_models.generation import encode_prompt
    from tasks.models import TargetConfig, run_prepare_target
    from tasks.prompts import PromptsConfig, PromptSource, run_prompts

    target_m = run_prepare_target(store, TargetConfig(ref=str(target_dir)))
    n_gen = n_train + n_eval
    prompts_m = run_prompts(store, PromptsConfig(
        sources=[PromptSource(kind="sharegpt", n=n_gen + orig_rows)], seed=seed), target_m)
    prompts = _read(store, prompts_m, "prompts")
    rows = [r for r in prompts if r.get("reference_response")]
    gen_rows, extra_rows = rows[:n_gen], rows[n_gen:]
    if regenerated == "generate":
        from tasks.generate import GenerateConfig, run_generate

        sub = _subset_prompts(store, prompts_m, {r["prompt_id"] for r in gen_rows})
        gen_m = run_generate(store, GenerateConfig(max_new_tokens=max_new_tokens), target_m, sub)
        done = {r["prompt_id"]: r for r in _read(store, gen_m, "generations")}
        gen_rows = [{**r, **done[r["prompt_id"]]} for r in gen_rows if r["prompt_id"] in done]
    else:
        tok = AutoTokenizer.from_pretrained(target_dir)
        for r in gen_rows:
            ids = tok(r["reference_response"], add_special_tokens=False)["input_ids"]
            r["response_token_ids"] = ids[:max_new_tokens]
    tok = AutoTokenizer.from_pretrained(target_dir)
    for r in gen_rows + extra_rows:
        r.setdefault("prompt_token_ids", encode_prompt(tok, r["prompt_text"]))
    for r in extra_rows:
        r["response_token_ids"] = []
    key = f"bench-{n_train}-{n_eval}-{orig_rows}-{regenerated}-{max_new_tokens}-{seed}"
    with StageOutput(store, "filter", key, config={"bench": key},
                     inputs={"prompts": prompts_m.digest}) as out:
        if out.manifest:
            return out.manifest
        out.write_parquet("eval.parquet", _table(gen_rows[:n_eval]), table_name="eval")
        out.write_parquet("train.parquet", _table(gen_rows[n_eval:] + extra_rows),
                          table_name="train")
        return out.commit()


def pipeline_filter(store: Store, source: Store) -> Manifest:
    """The newest committed filter output of ``source``, its split copied into ``store`` (same
    key): as rows, because a reference split points at generation shards ``store`` lacks."""
    from storage.manifest import list_outputs
    from storage.refs import read_table

    done = [o for o in list_outputs(source, "filter") if o["status"] == "committed"]
    if not done:
        raise SystemExit(f"{source.url}: no committed filter output; run the pipeline first")
    newest = max((read_manifest(source, "filter", o["key"]) for o in done),
                 key=lambda m: m.created_at)
    with StageOutput(store, "filter", newest.key, config={"copied_from": source.url},
                     inputs={"filter": newest.digest}) as out:
        if out.manifest:
            return out.manifest
        for table in ("train", "eval"):
            out.write_parquet(f"{table}.parquet", read_table(source, newest, table),
                              table_name=table)
        return out.commit()


def _read(store: Store, m: Manifest, table: str) -> list[dict[str, Any]]:
    parts = [read_parquet(store, f"{m.prefix}/{f.path}") for f in m.files_for(table)]
    return pa.concat_tables(parts).to_pylist() if parts else []


def _subset_prompts(store: Store, prompts_m: Manifest, ids: set[str]) -> Manifest:
    """A prompts output holding only ``ids`` (generation is the expensive part)."""
    t = pa.concat_tables([read_parquet(store, f"{prompts_m.prefix}/{f.path}")
                          for f in prompts_m.files_for("prompts")])
    keep = pa.array([p in ids for p in t.column("prompt_id").to_pylist()])
    key = f"subset-{prompts_m.key}-{len(ids)}"
    with StageOutput(store, "prompts", key, config={"subset_of": prompts_m.key, "n": len(ids)},
                     inputs={"prompts": prompts_m.digest}) as out:
        if out.manifest:
            return out.manifest
        out.write_parquet("prompts.parquet", t.filter(keep), table_name="prompts")
        return out.commit(extra=prompts_m.extra)


# ----------------------------------------------------------------------------- the curve
def budgets(available: int, cap: int, points: int) -> list[int]:
    """``points`` doubling response-token budgets ending at min(available, cap)."""
    top = max(min(available, cap), 2 ** points)
    return [max(1, top >> (points - 1 - i)) for i in range(points)]


def _per_source(specs: list[str], flag: str, form: str, parse: Any) -> dict[str, Any]:
    """``SOURCE=VALUE`` specs of one flag -> ``{source: parse(VALUE)}``; a bad spec exits."""
    out: dict[str, Any] = {}
    for spec in specs:
        src, _, value = spec.partition("=")
        try:
            out[src] = parse(value) if src in ("regenerated", "original") else None
        except ValueError:
            out[src] = None
        if out[src] is None:
            raise SystemExit(f"{flag} {spec!r}: write SOURCE={form} with SOURCE regenerated or "
                             "original")
    return out


def _explicit_budgets(specs: list[str]) -> dict[str, list[int]]:
    """``["original=45000,90000"]`` -> ``{"original": [45000, 90000]}`` (sorted)."""
    return _per_source(specs, "--tokens", "N,N,... (whole numbers)",
                       lambda v: sorted(int(n) for n in v.split(",")))


def _top_minutes(specs: list[str]) -> dict[str, float]:
    """``["original=60"]`` -> ``{"original": 60.0}``."""
    def minutes(v: str) -> float | None:
        return float(v) if float(v) > 0 else None

    return _per_source(specs, "--top", "MINUTES (MINUTES > 0)", minutes)


def _best_until(store: Store, m: Manifest, epochs: float) -> dict[str, Any] | None:
    """The best held-out evaluation of a run among those at or before ``epochs`` epochs."""
    rows = _read(store, m, "train_metrics")
    evals = [r for r in rows if r["tau_sim"] is not None and r["epoch"] <= epochs + 1e-9]
    if not evals:
        return None
    best = max(evals, key=lambda r: r["tau_sim"])
    return {"tau_sim": best["tau_sim"], "step": best["step"], "epoch": best["epoch"],
            "wall_s": best["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/dflash-bench-train")
    ap.add_argument("--out", default="/tmp/dflash-bench-train/scaling")
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget, all points")
    ap.add_argument("--gen-rows", type=int, default=320, help="ShareGPT rows to regenerate")
    ap.add_argument("--orig-rows", type=int, default=1200, help="extra original-only rows")
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--tokens-per-s", type=float, default=None,
                    help="training tokens/s for planning (default: measured by a short run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", action="append", default=[], metavar="SOURCE=N,N,...",
                    help="explicit response-token budgets of a source (e.g. "
                         "original=45000,90000,180000,360000) instead of the planned doubling")
    ap.add_argument("--top", action="append", default=[], metavar="SOURCE=MINUTES",
                    help="the largest point of SOURCE trains MINUTES minutes (not --epochs "
                         "epochs), evaluating every --top-eval-every steps; its figure at "
                         "--epochs epochs is read off the same run")
    ap.add_argument("--top-eval-every", type=int, default=1000)
    ap.add_argument("--filter-from", default=None, metavar="STORE",
                    help="use the newest committed filter output of a pipeline store (e.g. the "
                         "one `make run` wrote) instead of building data here")
    ap.add_argument("--config", default="configs/default.yaml",
                    help="the train recipe of every point (its train: section)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw scaling.png from the scaling.json in --out")
    args = ap.parse_args()
    explicit, top_minutes = _explicit_budgets(args.tokens), _top_minutes(args.top)  # fail early
    if args.replot:
        done = Path(args.out) / "scaling.json"
        if not done.is_file():
            raise SystemExit(f"--replot: {done} not found; run the curve first (same --out)")
        _plot(json.loads(done.read_text()), Path(args.out) / "scaling.png")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:  # generation too: on a shared box OpenMP spin-waits make 2 threads slow
        import torch

        torch.set_num_threads(args.threads)
    from dflash_models.features import end_of_turn_id
    from dflash_models.packaged import packaged_model_dir
    from dflash_models.target import load_target
    from tasks.train import TrainConfig, run_train
    from tasks.train_features import load_split, select_data

    store, out = Store(args.store), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target_dir = packaged_model_dir()
    t0 = time.perf_counter()
    fm = pipeline_filter(store, Store(args.filter_from)) if args.filter_from else \
        sharegpt_filter(store, target_dir, args.gen_rows - args.eval_rows, args.eval_rows,
                        "generate", args.max_new_tokens, args.orig_rows)
    log.info("data ready in %.0f s", time.perf_counter() - t0)
    from flows.config import load_config

    recipe = load_config(args.config).train

    def cfg_for(source: str, tokens: int | None, steps: int | None = None) -> TrainConfig:
        sel = recipe.data.model_copy(update={
            "mix_regenerated": float(source == "regenerated"),
            "mix_original": float(source == "original"), "max_train_tokens": tokens,
            "eval_max_seqs": args.eval_rows})
        return recipe.model_copy(update={
            "data": sel, "epochs": args.epochs, "max_steps": steps, "classic_layers": 0,
            "features": "cached", "eval_every": 0, "checkpoint_every": 1000,
            "threads": args.threads, "time_budget_min": None})

    rate = args.tokens_per_s
    if rate is None:  # calibrate: a few steps on a small slice (cached features)
        m = run_train(store, cfg_for("regenerated", 4000, steps=6), target_dir, fm)
        rate = m.extra["dflash"]["tokens_per_s"]
    tgt = load_target(target_dir, device="cpu")
    splits = load_split(store, fm, "train"), load_split(store, fm, "eval")

    def selected(src: str, budget: int | None) -> Any:
        sel = cfg_for(src, budget).selection()
        return select_data(*splits, tgt.tokenizer, end_of_turn_id(tgt), sel).mix

    plan: dict[str, list[int]] = {}
    per_source_s = args.minutes * 60 / 2  # training seconds per source, all its points
    for src in ("regenerated", "original"):
        mix = selected(src, None)
        ratio = mix["tokens"] / max(mix["response_tokens"], 1)  # sequence / response tokens
        # a point costs epochs * ratio * budget / rate seconds; doubling points sum to ~2x the top
        cap = int(per_source_s * rate / (args.epochs * ratio * 1.9))
        plan[src] = budgets(mix["response_tokens"], cap, args.points)
        if explicit.get(src):
            plan[src] = sorted({min(b, mix["response_tokens"]) for b in explicit[src]})
        log.info("%s: %d response tokens available, budgets %s", src, mix["response_tokens"],
                 plan[src])
    results = []
    for src, pts in plan.items():
        for b in pts:
            mix = selected(src, b)
            steps = max(1, round(args.epochs * mix["sources"][src]["sequences"]
                                 / recipe.batch_size))
            cfg = cfg_for(src, b).model_copy(update={"eval_every": max(1, steps // 4)})
            top = src in top_minutes and b == pts[-1]
            if top:  # a time budget; the cosine schedule spans it (docs/training.md)
                cfg = cfg.model_copy(update={"epochs": 10_000.0, "max_steps": None,
                                             "time_budget_min": top_minutes[src],
                                             "eval_every": args.top_eval_every})
            t1 = time.perf_counter()
            m = run_train(store, cfg, target_dir, fm)
            d, mix = m.extra["dflash"], m.extra["data_mix"]
            results.append({"source": src, "budget": b, "response_tokens": mix["response_tokens"],
                            "sequences": mix["sources"][src]["sequences"], "steps": d["steps"],
                            "best_tau_sim": d["best"]["tau_sim"] if d["best"] else None,
                            "best_step": d["best"]["step"] if d["best"] else None,
                            "last_tau_sim": d["last"]["tau_sim"], "train_time_s": d["train_time_s"],
                            "stage_wall_s": time.perf_counter() - t1, "key": m.key,
                            "time_budget_min": cfg.time_budget_min})
            if top:
                results[-1]["at_epochs"] = _best_until(store, m, args.epochs)
            log.info("point %s", results[-1])
    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    print(f"{'source':12s} {'resp tokens':>11s} {'seqs':>5s} {'steps':>6s} {'best tau':>9s} "
          f"{'last tau':>9s} {'train s':>8s}")
    for r in results:
        print(f"{r['source']:12s} {r['response_tokens']:11d} {r['sequences']:5d} {r['steps']:6d} "
              f"{r['best_tau_sim']:9.3f} {r['last_tau_sim']:9.3f} {r['train_time_s']:8.0f}")
        if r.get("at_epochs"):
            a = r["at_epochs"]
            print(f"{'':12s} {'':11s} {'':5s} {a['step']:6d} {a['tau_sim']:9.3f} "
                  f"{'':9s} {a['wall_s']:8.0f}   (best at <= {args.epochs:g} epochs, same run)")
    _plot(results, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for src, style in (("regenerated", "o-"), ("original", "s--")):
        rows = [r for r in results if r["source"] == src and r["best_tau_sim"] is not None]
        # the curve at equal epochs: a timed top point contributes its figure at --epochs
        pts = sorted((r["response_tokens"],
                      r["at_epochs"]["tau_sim"] if r.get("at_epochs") else r["best_tau_sim"])
                     for r in rows)
        if pts:
            line, = ax.plot(*zip(*pts, strict=True), style, label=src)
        for r in rows:
            if r.get("at_epochs"):  # the same run's best over its whole time budget
                ax.plot(r["response_tokens"], r["best_tau_sim"], "*", ms=12,
                        color=line.get_color())
                # its equal-epochs figure came mid-schedule (higher LR): an open marker
                ax.plot(r["response_tokens"], r["at_epochs"]["tau_sim"], style[0], ms=7,
                        color=line.get_color(), markerfacecolor="white")
                ax.annotate(f"{r['time_budget_min']:g} min", (r["response_tokens"],
                            r["best_tau_sim"]), textcoords="offset points", xytext=(-40, 4))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="training response tokens", ylabel="held-out tau_sim (best checkpoint)",
           title="DFlash draft: data scaling (SmolLM2-135M, block 8)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
