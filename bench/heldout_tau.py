"""Held-out tau_sim of trained DFlash drafts on original answers that no run trained on.

    .venv/bin/python bench/heldout_tau.py --store STORE [--config configs/default.yaml] \
        [--max-seqs 200] DRAFT [DRAFT ...]

A DRAFT is an exported draft folder or a train-stage key of ``--store``. `make run` keeps its
checkpoint on the eval split's few regenerated answers (~9 with the default), whose tau_sim
moves by +-0.03 between two drafts of equal quality: too few to tell two recipes apart. The
train split holds more ShareGPT answers than the default's token budget takes; the ones it cuts
never enter training. This script selects them exactly as ``--config`` selects its training data
(same seed, same budget), takes the target's features and greedy tokens from one exact fp32
pass, and scores every response anchor of every answer (tens of thousands of blocks): the
teacher-forced tau_sim of training's evaluation, with the target's greedy chain as labels.

It also splits the anchors by whether prompt lookup would draft the next token right ("copy":
the anchor's bigram occurred earlier in the sequence and was followed by the target's next
token), since that is where prompt lookup gains on MT-Bench.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_models.blocks import (  # noqa: E402
    IGNORE_INDEX,
    BlockStats,
    DFlashTrainModule,
    VocabHead,
    greedy_block_labels,
    make_dflash_batch,
    selected_hidden,
)
from dflash_models.draft import DFlashDraft  # noqa: E402
from dflash_models.features import (  # noqa: E402
    Example,
    FeatureRow,
    end_of_turn_id,
    length_batches,
    target_pass,
)
from storage import Store  # noqa: E402

BLOCK = 8


def held_out(store: Store, config: str, max_seqs: int, tokenizer: object,
             eos: int | None) -> list[Example]:
    """The train split's original answers that ``config``'s data selection leaves out."""
    from bench.train_recipe import newest
    from flows.config import load_config
    from tasks.train_features import DataSelection, load_split, select_data

    fm = newest(store, "filter")
    train, ev = load_split(store, fm, "train"), load_split(store, fm, "eval")
    sel = load_config(config).train.selection().model_dump()
    used = select_data(train, ev, tokenizer, eos, DataSelection(**sel)).train
    every = select_data(train, ev, tokenizer, eos,
                        DataSelection(**{**sel, "max_train_tokens": None})).train
    seen = {(e.source, e.row) for e in used}
    left = [e for e in every if e.source == "original" and (e.source, e.row) not in seen]
    if not left:
        raise SystemExit(f"{store.url}: the data selection of {config} uses every original "
                         "answer; nothing is held out (offer more originals in prompts.sources)")
    return left[:max_seqs]


def features(target: object, exs: list[Example], layer_ids: list[int]) -> list[FeatureRow]:
    rows: dict[int, FeatureRow] = {}
    for batch in length_batches(list(range(len(exs))), exs, 2048):
        got = target_pass(target, [exs[i].ids for i in batch], layer_ids,
                          starts=[exs[i].response_start for i in batch])
        rows.update(zip(batch, got, strict=True))
    return [rows[i] for i in range(len(exs))]


@torch.no_grad()
def score(draft: DFlashDraft, target: object, exs: list[Example],
          rows: list[FeatureRow]) -> dict[str, object]:
    """tau_sim and offset-1 accuracy over every response anchor, split copy / other."""
    module, head = DFlashTrainModule(draft), VocabHead(target, draft.draft_ids)
    stats = {k: BlockStats(BLOCK) for k in ("all", "copy", "other")}
    for ex, r in zip(exs, rows, strict=True):
        ids = r.ids
        anchors = torch.arange(max(ex.response_start, 1), int(ids.shape[0]) - 1)
        labels = greedy_block_labels(ids, r.greedy, anchors, BLOCK)
        b = make_dflash_batch([ids], [r.features.float()], [anchors], BLOCK,
                              draft.config.mask_token_id, 1.0, labels=[labels])
        sel = b.labels != IGNORE_INDEX
        logits = head.logits(selected_hidden(module, target.embed(b.block_ids), b, sel))
        pred = torch.full_like(b.labels, -1)
        pred[sel] = head.to_target(logits.argmax(-1))
        pred, lab = pred.reshape(-1, BLOCK), b.labels.reshape(-1, BLOCK)
        stats["all"].update(pred, lab)
        copy = torch.tensor([j is not None and int(ids[j + 1]) == int(lab[n, 1])
                             for n, j in enumerate(earlier_bigram_ends(ids, anchors))],
                            dtype=torch.bool)
        stats["copy"].update(pred[copy], lab[copy])
        stats["other"].update(pred[~copy], lab[~copy])
    out: dict[str, object] = {}
    for kind, st in stats.items():
        res = st.result()
        out[kind] = {"blocks": res["eval_blocks"], "acc1": round(res["acc"][0], 4),
                     "tau_sim": round(res["tau_sim"], 4)}
    return out


def earlier_bigram_ends(ids: torch.Tensor, anchors: torch.Tensor) -> list[int | None]:
    """For each anchor a, the latest j < a where the bigram (ids[a-1], ids[a]) also ended: prompt
    lookup would draft ids[j + 1] there."""
    last: dict[tuple[int, int], int] = {}
    out: list[int | None] = []
    seq = ids.tolist()
    first = int(anchors[0]) if anchors.numel() else len(seq)
    for p in range(1, len(seq)):
        bigram = (seq[p - 1], seq[p])
        if p >= first:
            out.append(last.get(bigram))
        last[bigram] = p
    return out[: anchors.numel()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--max-seqs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("drafts", nargs="+", help="draft folders or train-stage keys of --store")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dflash_models.packaged import packaged_model_dir
    from dflash_models.target import load_target

    store = Store(args.store)
    folders = [d if Path(d).is_dir() else f"{args.store}/train/{d}/dflash-draft"
               for d in args.drafts]
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(f"no draft folder {missing[0]}: give an exported draft folder or a "
                         f"train-stage key of {args.store}")
    target = load_target(packaged_model_dir())
    drafts = [DFlashDraft.load(f, device=target.device, dtype=target.dtype) for f in folders]
    layer_ids = list(drafts[0].config.target_layer_ids)
    exs = held_out(store, args.config, args.max_seqs, target.tokenizer, end_of_turn_id(target))
    rows = features(target, exs, layer_ids)
    print(json.dumps({"held_out_answers": len(exs),
                      "response_tokens": sum(e.response_tokens for e in exs)}))
    for folder, draft in zip(folders, drafts, strict=True):
        if list(draft.config.target_layer_ids) != layer_ids:
            raise SystemExit(f"{folder}: other target layers than {folders[0]}; score it alone")
        res = score(draft, target, exs, rows)
        print(json.dumps({"draft": folder, "layers": draft.config.num_layers,
                          "blocks": res["all"]["blocks"], "tau_sim": res["all"]["tau_sim"],
                          "copy": res["copy"], "other": res["other"]}))


if __name__ == "__main__":
    main()
