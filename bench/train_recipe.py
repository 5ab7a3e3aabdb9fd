"""One training recipe on a pipeline store's data: its held-out tau_sim curve and step count.

    .venv/bin/python bench/train_recipe.py --store ./dflash-store \
        --set lr=0.003 --set batch_size=2 --set time_budget_min=4 --set features=cached

It takes the newest committed filter output and target of ``--store`` (what `make run` wrote),
starts from ``--config``'s train section, applies each ``--set key=value`` (JSON values; dotted
keys for nested fields, e.g. ``--set data.max_train_tokens=40000``), trains the DFlash draft only
(no classic draft) as a cached train-stage output, and prints one JSON line: steps, tokens/s, the
best checkpoint and the tau_sim curve. docs/training.md compares recipes with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import Manifest, Store, read_manifest  # noqa: E402
from storage.manifest import list_outputs  # noqa: E402


def newest(store: Store, stage: str) -> Manifest:
    done = [read_manifest(store, stage, o["key"]) for o in list_outputs(store, stage)
            if o["status"] == "committed"]
    if not done:
        raise SystemExit(f"{store.url}: no committed {stage} output; run the pipeline first")
    return max(done, key=lambda m: m.created_at)


def apply(base: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``key=value`` (JSON value, or a bare string) into a nested dict."""
    for a in assignments:
        key, _, raw = a.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = base
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from flows.config import load_config
    from storage.parquet import read_parquet
    from tasks.train import TrainConfig, run_train

    store = Store(args.store)
    base = load_config(args.config).train.model_dump()
    base.update(classic_layers=0, checkpoint_every=1000, log_every=5)
    cfg = TrainConfig(**apply(base, args.set))
    t0 = time.perf_counter()
    m = run_train(store, cfg, newest(store, "targets"), newest(store, "filter"))
    d = m.extra["dflash"]
    rows = read_parquet(store, f"{m.prefix}/train_metrics.parquet").to_pylist()
    curve = [(r["step"], round(r["wall_s"]), round(r["loss"], 3), round(r["tau_sim"], 3))
             for r in rows if r.get("tau_sim") is not None]
    print(json.dumps({"set": args.set, "steps": d["steps"], "tokens_per_s": d.get("tokens_per_s"),
                      "best": d["best"], "wall_s": round(time.perf_counter() - t0),
                      "curve": curve, "mix": m.extra.get("data_mix", {}).get("sources")},
                     default=str))


if __name__ == "__main__":
    main()
