"""Training tokens/s of the DFlash draft with online vs cached target features.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--threads 2] [--draft-vocab 8192]
        [--store DIR] [--force]

Data: ShareGPT first turns with their original answers (the packaged prompt set, no
generation needed), written as a filter-stage output. Both runs train the same draft on the
same batches (default config: SmolLM2 target, 2 layers, block 8, 48 anchors, batch 4,
max length 512); only where the target features come from differs. tokens/s counts the real
(unpadded) sequence tokens that the optimiser steps consumed, per second of step time (eval
excluded). The cached run's one-off cost (one prefill pass that writes the shards) is printed
separately: it is repaid once the data is seen more than about once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_scaling import sharegpt_filter  # noqa: E402

from storage import Store  # noqa: E402
from tasks.train import TrainConfig, run_train  # noqa: E402
from tasks.train_features import DataSelection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/dflash-bench-train", help="a scratch store")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=96, help="ShareGPT rows for training")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft-vocab", type=int, default=None, help="also time a reduced head")
    ap.add_argument("--force", action="store_true", help="re-measure cached train outputs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dflash_models.packaged import packaged_model_dir

    store = Store(args.store)
    target_dir = packaged_model_dir()
    fm = sharegpt_filter(store, target_dir, n_train=args.rows, n_eval=8, regenerated=None)
    base = TrainConfig(max_steps=args.steps, eval_every=0, checkpoint_every=10_000,
                       classic_layers=0, threads=args.threads, log_every=1,
                       time_budget_min=None,
                       data=DataSelection(mix_original=0.0, eval_max_seqs=8))
    variants = [("online", base.model_copy(update={"features": "online"})),
                ("cached", base.model_copy(update={"features": "cached"}))]
    if args.draft_vocab:
        variants.append((f"cached+vocab{args.draft_vocab}", base.model_copy(
            update={"features": "cached", "draft_vocab_size": args.draft_vocab})))
    results = {}
    for name, cfg in variants:
        t0 = time.perf_counter()
        m = run_train(store, cfg, target_dir, fm, force=args.force)
        wall = time.perf_counter() - t0
        d = m.extra["dflash"]
        results[name] = {"tokens_per_s": round(d["tokens_per_s"], 1),
                         "train_tokens": d["train_tokens"],
                         "train_time_s": round(d["train_time_s"], 1), "stage_wall_s": round(wall, 1)}
        if cfg.features == "cached":
            fx = json.loads(store.read_bytes(f"features/{m.extra['features_key']}/features.json"))
            results[name]["feature_bytes_per_token"] = fx["bytes_per_token"]
            results[name]["feature_store_mb"] = round(fx["bytes"] / 2**20, 1)
        if "draft_vocab" in m.extra:
            results[name]["draft_vocab"] = m.extra["draft_vocab"]
    print(json.dumps(results, indent=2))
    print(f"{'mode':24s} {'tokens/s':>9s} {'train s':>8s} {'stage wall s':>13s}")
    for name, r in results.items():
        print(f"{name:24s} {r['tokens_per_s']:9.1f} {r['train_time_s']:8.1f} "
              f"{r['stage_wall_s']:13.1f}")


if __name__ == "__main__":
    main()
