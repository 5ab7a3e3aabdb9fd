"""Side by side on this machine: tau and speedup of DFlash at blocks 4, 8 and 16, the classic draft,
prompt lookup and transformers' assisted generation, plus the engine's AR against `generate()`.

    python bench/compare_methods.py --train latest --store ./dflash-store    # the pipeline's drafts
    python bench/compare_methods.py --draft DFLASH_FOLDER [--classic CLASSIC_FOLDER]
    python bench/compare_methods.py                                            # random drafts

It runs the benchmark stage itself (tasks/benchmark.py) with rerun on, so the rows also land in the
store's history (a temporary local store unless --store is given). With no draft it builds RANDOM
drafts (DFlash at block 16, classic 2 layers): their tau is ~1, so the figures then only show what
each method's overhead costs on this machine, not what a trained draft gains.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _random_drafts(target_folder: Path, out: Path, block: int) -> tuple[Path, Path]:
    import torch

    from dflash_models.classic import build_classic_draft
    from dflash_models.draft import DFlashDraft, DFlashDraftConfig
    from dflash_models.target import load_target

    target = load_target(target_folder, device="cpu")
    torch.manual_seed(0)
    DFlashDraft(DFlashDraftConfig.from_target(target, num_layers=2, block_size=block)).export(
        out / "dflash")
    build_classic_draft(target, num_layers=2).save_pretrained(out / "classic")
    return out / "dflash", out / "classic"


def _train_manifest(store: Any, which: str) -> Any:
    from storage import read_manifest
    from storage.manifest import list_outputs

    if which != "latest":
        m = read_manifest(store, "train", which)
        if m is None:
            raise SystemExit(f"no committed train/{which} in {store.url}")
        return m
    done = [o["key"] for o in list_outputs(store, "train") if o["status"] == "committed"]
    manifests = [m for m in (read_manifest(store, "train", k) for k in done) if m is not None]
    if not manifests:
        raise SystemExit(f"no committed train output in {store.url}; run `dflash train` first")
    return max(manifests, key=lambda m: m.created_at)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--draft", help="exported DFlash draft folder")
    ap.add_argument("--classic", help="classic draft folder (AutoModelForCausalLM)")
    ap.add_argument("--train", help="a train output key in --store, or 'latest'")
    ap.add_argument("--store", help="store URL (default: a temporary local store)")
    ap.add_argument("--datasets", nargs="+", default=["mt_bench"])
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--classic-k", type=int, default=4)
    ap.add_argument("--prompt-lookup", type=int, default=10)
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0])
    ap.add_argument("--threads", type=int, help="torch threads (1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "filelock", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from storage import Store
    from tasks.benchmark import BenchConfig, resolve_ref, run_benchmark

    tmp = Path(tempfile.mkdtemp(prefix="compare-methods-"))
    store = Store(args.store or str(tmp / "store"))
    target = resolve_ref(args.target, "target")
    train = _train_manifest(store, args.train) if args.train else None
    draft, classic = args.draft, args.classic
    random_note = ""
    if train is None and draft is None and classic is None:
        draft, classic = _random_drafts(target, tmp, max(args.blocks))
        random_note = ("NOTE: no draft given, so these are RANDOM drafts (tau ~1): the table shows "
                       "each method's overhead on this machine, not what a trained draft gains.")
        print(random_note, file=sys.stderr)
    cfg = BenchConfig(datasets=args.datasets, n_prompts=args.n_prompts,
                      max_new_tokens=args.max_new_tokens, block_sizes=args.blocks,
                      repeats=args.repeats, classic_k=args.classic_k,
                      prompt_lookup_num_tokens=args.prompt_lookup, temperatures=args.temperature,
                      threads=args.threads, rerun=True)
    res = run_benchmark(store, cfg, target, train_manifest=train, draft_folder=draft,
                        classic_folder=classic, rerun=True, target_ref=args.target)

    head = ["method", "dataset", "T", "tau", "accept", "tok/s", "speedup", "exact", "verify s",
            "draft s", "ttft p50"]
    lines = [head]
    for r in res["rows"]:
        name = r["method"] + (f" b{r['block_size']}" if r["block_size"] else "")
        lines.append([name, r["dataset"], _fmt(r["temperature"], 1), _fmt(r["tau"], 2),
                      _fmt(r["acceptance_rate"], 2), _fmt(r["tokens_per_s"], 1),
                      _fmt(r["speedup"], 2), _fmt(r["exact_match_rate"], 2),
                      _fmt(r["verify_pass_s"], 4), _fmt(r["draft_pass_s"], 4),
                      _fmt(r["ttft_p50"], 3)])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    threads = args.threads or "default"
    print(f"\n{res['hardware_tag']}, target {args.target}, {cfg.n_prompts} prompts x "
          f"{cfg.max_new_tokens} new tokens, batch 1, torch threads: {threads}, "
          f"run {res['run_id']}")
    for row in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    for r in res["rows"]:
        if r["method"] == "ar":
            print(f"engine AR vs generate() on {r['dataset']} (T={r['temperature']}): "
                  f"{_fmt(r['speedup'], 3)}x decode tokens/s "
                  f"({'at least as fast' if (r['speedup'] or 0) >= 1 else 'SLOWER'})")
    for n in res["notes"]:
        print(f"note: {n}")
    if random_note:
        print(random_note)
    print(f"history: {res['summary_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
