"""How each benchmarked method is run and measured at batch 1, and what it is run on.

Every method goes through one function that returns a `Sample` with the same fields, so the
summary code never branches on the method:

- engine methods (`ar`, `dflash`, `classic`) report their own passes and accepted lengths;
- transformers' methods (`hf_generate`, `hf_assisted`, `prompt_lookup`) are observed from the
  outside: a forward pre-hook on the target model counts target passes (and their input length,
  hence the drafted tokens per pass), and a streamer records when tokens arrive and how many each
  pass emitted. The same hook runs around the engine methods as a cross-check of their counts.

Drafts are checked against the target from their config.json alone, before any model loads, so a
draft trained for another target fails in a second with one line, never mid-decoding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from storage.errors import DflashError

log = logging.getLogger("dflash")

METHODS = ("hf_generate", "ar", "dflash", "classic", "hf_assisted", "prompt_lookup")
ENGINE_METHODS = ("ar", "dflash", "classic")
DATASETS = ("mt_bench", "humaneval", "eval_split")
DFLASH_ARCH = "DFlashDraftModel"


@dataclass
class Sample:
    """One generation, measured the same way whatever produced it.

    `pass_tokens[i]` is the number of tokens target pass i emitted (pass 0 is the prefill, which
    emits the first token; for transformers' assisted methods it also verifies drafts).
    `accepted_drafts` / `drafted` are per pass that proposed anything, for acceptance rates.
    """

    output_ids: list[int]
    pass_tokens: list[int]
    accepted_drafts: list[int]
    drafted: list[int]
    n_target_passes: int
    n_draft_passes: int | None
    ttft_s: float
    total_s: float
    accepted_lengths: list[int] = field(default_factory=list)  # per verify pass, after the prefill
    draft_s: list[float] = field(default_factory=list)  # engine only: draft share of each step
    verify_s: list[float] = field(default_factory=list)  # engine only: target pass of each step

    @property
    def decode_tokens(self) -> int:
        """Tokens after the first emission (the first emission is what TTFT times)."""
        return max(len(self.output_ids) - (self.pass_tokens[0] if self.pass_tokens else 0), 0)

    @property
    def decode_s(self) -> float:
        return max(self.total_s - self.ttft_s, 0.0)


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work and not its launch."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    """Keep tokens up to and including the first stop token (nothing is ever past EOS)."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + 1]
    return ids


class PassCounter:
    """Counts forward calls of one module and records each call's input length."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.lengths: list[int] = []
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.lengths.append(int(ids.shape[1]) if ids is not None else 0)

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    @property
    def calls(self) -> int:
        return len(self.lengths)


class TimingStreamer(BaseStreamer):
    """Records the arrival time of the first new tokens and the size of every later put.

    `generate()` puts the prompt first, then the tokens of each step (one token per pass for
    plain decoding, the accepted run plus bonus per pass for assisted decoding).
    """

    def __init__(self, t0: float, device: torch.device | str) -> None:
        self.t0, self.device = t0, device
        self.seen_prompt = False
        self.puts: list[int] = []
        self.ttft_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        if self.ttft_s is None:
            sync(self.device)
            self.ttft_s = time.perf_counter() - self.t0
        self.puts.append(int(value.numel()))

    def end(self) -> None:
        pass


def run_hf(target: Any, prompt_ids: Sequence[int], *, temperature: float, max_new_tokens: int,
           stop: set[int], seed: int | None, assistant: torch.nn.Module | None = None,
           prompt_lookup_num_tokens: int | None = None) -> Sample:
    """transformers' `generate()`: plain, with an assistant model, or with prompt lookup.

    A fresh GenerationConfig is used so no checkpoint default (top_k=50, repetition penalty)
    changes what is sampled: greedy is `do_sample=False`, sampling is softmax(logits / T) over the
    whole vocabulary, exactly the distribution the engine samples from.
    """
    from transformers import GenerationConfig

    model = target.model
    device = target.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(stop),
                              pad_token_id=_pad_id(target, stop))
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    if prompt_lookup_num_tokens:
        kw.update(prompt_lookup_num_tokens=prompt_lookup_num_tokens)
    gen_cfg = GenerationConfig(**kw)
    if temperature > 0 and seed is not None:
        torch.manual_seed(seed)
    extra: dict[str, Any] = {"assistant_model": assistant} if assistant is not None else {}
    draft_counter = PassCounter(assistant) if assistant is not None else None
    sync(device)
    t0 = time.perf_counter()
    streamer = TimingStreamer(t0, device)
    with PassCounter(model) as counter:
        if draft_counter is not None:
            draft_counter.__enter__()
        try:
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gen_cfg, streamer=streamer, **extra)
        finally:
            if draft_counter is not None:
                draft_counter.__exit__()
    sync(device)
    total = time.perf_counter() - t0
    new = cut_at_stop(out[0, ids.shape[1]:].tolist(), stop)
    puts = streamer.puts
    if sum(puts) != len(new) or len(puts) != counter.calls:
        log.debug("generate: %d puts / %d tokens / %d passes do not line up", len(puts), len(new),
                  counter.calls)
    drafted = [n - (len(prompt_ids) if i == 0 else 1) for i, n in enumerate(counter.lengths)]
    has_drafts = any(d > 0 for d in drafted) or assistant is not None or prompt_lookup_num_tokens
    lined_up = len(puts) == len(drafted)
    return Sample(
        output_ids=new,
        pass_tokens=list(puts) if puts else [len(new)],
        accepted_drafts=[p - 1 for p in puts] if has_drafts and lined_up else [],
        drafted=drafted if has_drafts and lined_up else [],
        n_target_passes=counter.calls,
        n_draft_passes=(draft_counter.calls if draft_counter is not None
                        else 0 if prompt_lookup_num_tokens or assistant is None else None),
        ttft_s=streamer.ttft_s if streamer.ttft_s is not None else total,
        total_s=total,
        accepted_lengths=list(puts[1:]),
    )


def _pad_id(target: Any, stop: set[int]) -> int:
    pad = getattr(target.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else min(stop) if stop else 0


def run_engine(method: str, target: Any, prompt_ids: Sequence[int], gen_cfg: Any, *,
               draft: Any = None, classic_lm: Any = None) -> Sample:
    """This project's engine: `generate_ar`, `generate_dflash` or `generate_classic`."""
    from dflash_models import engine

    sync(target.device)
    t0 = time.perf_counter()
    with PassCounter(target.model) as counter:
        if method == "ar":
            res = engine.generate_ar(target, prompt_ids, gen_cfg)
        elif method == "dflash":
            res = engine.generate_dflash(target, draft, prompt_ids, gen_cfg)
        elif method == "classic":
            res = engine.generate_classic(target, classic_lm, prompt_ids, gen_cfg)
        else:
            raise ValueError(f"not an engine method: {method}")
    sync(target.device)
    total = time.perf_counter() - t0
    if counter.calls != res.n_target_passes:
        log.warning("%s: engine counted %d target passes, the forward hook %d", method,
                    res.n_target_passes, counter.calls)
    first = len(res.output_ids) - sum(res.accepted_lengths)
    return Sample(
        output_ids=list(res.output_ids),
        pass_tokens=[first, *res.accepted_lengths] if res.output_ids else [],
        accepted_drafts=list(res.accepted_drafts),
        drafted=list(res.drafted),
        n_target_passes=res.n_target_passes,
        n_draft_passes=res.n_draft_passes,
        ttft_s=res.ttft_s,
        total_s=total,
        accepted_lengths=list(res.accepted_lengths),
        draft_s=list(res.draft_s),
        verify_s=list(res.verify_s),
    )


@torch.inference_mode()
def divergence_margin(target: Any, prompt_ids: Sequence[int], ref_ids: Sequence[int],
                      pos: int) -> float:
    """Target's top-1 minus top-2 logit where the reference chose token `pos`.

    One uncached forward over prompt + reference[:pos]: the logits at its last position are the
    ones the reference decoding argmaxed over. A tiny margin means two correct computations could
    round to different argmaxes; a large one means the method under test is wrong.
    """
    from dflash_models.engine import margin_top2

    ids = torch.tensor([[*prompt_ids, *ref_ids[:pos]]], dtype=torch.long, device=target.device)
    logits = target.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
    return margin_top2(logits)


# ---------------------------------------------------------------------------------- drafts
def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DflashError(f"{folder}: no config.json; a draft must be an exported HF folder "
                          "(config.json + model.safetensors)") from None
    except json.JSONDecodeError as e:
        raise DflashError(f"{path}: not valid JSON ({e.msg})") from None


def draft_kind(folder: str | Path) -> str:
    """'dflash' for our serving layout (architectures DFlashDraftModel), else 'classic'."""
    arch = read_config(folder).get("architectures") or []
    return "dflash" if DFLASH_ARCH in arch else "classic"


def target_shape(folder: str | Path) -> SimpleNamespace:
    """hidden size, vocab and layer count of a target from its config alone (no weights)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(folder)).get_text_config()
    except (OSError, ValueError) as e:
        raise DflashError(f"target {folder}: cannot read its config ({str(e).splitlines()[0]})"
                          ) from None
    return SimpleNamespace(hidden_size=int(cfg.hidden_size), vocab_size=int(cfg.vocab_size),
                           num_layers=int(cfg.num_hidden_layers))


def check_drafts_shape(shape: Any, dflash_folder: str | Path | None,
                       classic_folder: str | Path | None) -> None:
    """Raise a one-line DflashError if a draft was built for another target. Reads configs only.

    `shape` has hidden_size, vocab_size and num_layers: `target_shape(folder)` or a Target.
    """
    from dflash_models.draft import DFlashDraftConfig, check_compatible

    if dflash_folder is not None:
        raw = read_config(dflash_folder)
        try:
            dcfg = DFlashDraftConfig.from_hf_dict(raw)
        except (KeyError, TypeError) as e:
            raise DflashError(f"draft {dflash_folder}: config.json is not a DFlash serving-layout "
                              f"config (missing {e})") from None
        try:
            check_compatible(dcfg, shape)  # duck-typed: only the three sizes are read
        except ValueError as e:
            raise DflashError(f"draft {dflash_folder} was trained for another target: {e}; "
                              f"benchmark it against its own target (--target)") from None
    if classic_folder is not None:
        vocab = read_config(classic_folder).get("vocab_size")
        if vocab is not None and int(vocab) != shape.vocab_size:
            raise DflashError(f"draft {classic_folder} was trained for another target: draft "
                              f"vocab_size {vocab} != target vocab_size {shape.vocab_size}; "
                              "benchmark it against its own target (--target)")


def load_dflash(folder: str | Path, target: Any) -> Any:
    """Our export (either vocabulary form) or a folder the reference class saved (plain or with
    the hub's ``auto_map``/``dflash.py``: the weights and config fields are the same)."""
    from dflash_models.draft import DFlashDraft, check_compatible, head_matches

    try:
        draft = DFlashDraft.load(folder, device=target.device, dtype=target.dtype)
    except (RuntimeError, KeyError, OSError) as e:
        raise DflashError(f"draft {folder}: cannot load its weights "
                          f"({str(e).strip().splitlines()[0]})") from None
    try:
        check_compatible(draft.config, target, draft.draft_ids)
    except ValueError as e:
        raise DflashError(f"draft {folder} was trained for another target: {e}") from None
    if not head_matches(draft, target):
        raise DflashError(f"draft {folder}: its lm_head is not the target's head at its d2t ids; "
                          "this engine drafts with the target's head, so the draft would not "
                          "run as trained")
    return draft


def draft_vocab(draft: Any) -> int | None:
    """K for a reduced-vocabulary draft, None for one over the target's full vocabulary."""
    ids = getattr(draft, "draft_ids", None)
    return None if ids is None else int(ids.numel())


def engine_drafter(target: Any, draft: Any, max_len: int, max_block: int) -> Any:
    """What the engine drafts with on ``target``: the fixed-shape `FastDraft` beside a static
    target (its graphs and cache made once, reused for every prompt), else the draft itself."""
    from dflash_models.fast_draft import FastDraft
    from dflash_models.static_lm import StaticLM

    if isinstance(target.model, StaticLM):
        return FastDraft(target, draft, max_len, max_block=max_block)
    return draft


def full_vocab_view(draft: Any) -> Any:
    """The same draft (shared weights) drafting over the full vocabulary, or None when it
    already does: what an engine that ignores ``d2t`` runs (SGLang, the reference)."""
    if draft is None or draft_vocab(draft) is None:
        return None
    view = copy.copy(draft)  # shallow: parameters are shared, only the attribute differs
    view.draft_ids = None
    return view


def load_classic(folder: str | Path, target: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=target.dtype)
    except (OSError, ValueError) as e:
        raise DflashError(f"draft {folder}: cannot load it as a causal LM "
                          f"({str(e).strip().splitlines()[0]})") from None
    rows = lm.get_input_embeddings().weight.shape[0]
    if rows != target.vocab_size:
        raise DflashError(f"draft {folder} was trained for another target: draft vocab {rows} != "
                          f"target vocab {target.vocab_size}")
    return lm.to(target.device).eval().requires_grad_(False)


def folder_digest(folder: str | Path) -> str:
    """What a model folder *is*: the targets stage's digest of its files' names and contents."""
    from tasks.models import file_hashes, model_digest

    return model_digest(file_hashes(Path(folder)))


# ---------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    prompt_id: str
    ids: list[int]


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat messages -> prompt ids exactly as the generation stage renders them."""
    from dflash_models.generation import encode_prompt, render_prompt

    return encode_prompt(tokenizer, render_prompt(tokenizer, messages))


def _pick(ids: list[str], n: int, seed: int) -> list[str]:
    """n ids chosen deterministically by seed (hash order), independent of file order."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())[:n]


def load_prompts(dataset: str, n: int, seed: int, tokenizer: Any, store: Any = None,
                 eval_manifest: Any = None) -> list[Prompt]:
    """n prompts of a benchmark dataset, rendered for the target.

    `eval_split` reads the filter stage's eval table (copies or row references) and uses its
    `prompt_token_ids` (exactly what the target saw when generating) or renders `messages`.
    """
    if dataset in ("mt_bench", "humaneval"):
        from tasks.prompts import benchmark_prompts  # MT-Bench: first turns only

        return [Prompt(r.prompt_id, render(tokenizer, r.messages))
                for r in benchmark_prompts(dataset, n, seed)]
    if dataset != "eval_split":
        raise DflashError(f"unknown benchmark dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if eval_manifest is None:
        return []
    from storage.refs import read_table

    if not eval_manifest.files_for("eval"):
        raise DflashError(f"eval manifest {eval_manifest.prefix} has no eval table")
    table = read_table(store, eval_manifest, "eval",  # copies or row references alike
                       ("prompt_id", "prompt_token_ids", "messages", "prompt"))
    if table.num_rows and ("prompt_id" not in table.column_names
                           or len(table.column_names) < 2):
        raise DflashError(f"{eval_manifest.prefix}: an eval split needs prompt_id and one of "
                          "prompt_token_ids, messages or prompt")
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    out = []
    for pid in _pick(list(rows), n, seed):
        r = rows[pid]
        if r.get("prompt_token_ids"):
            ids = list(r["prompt_token_ids"])
        elif r.get("messages"):
            msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
            while len(msgs) > 1 and msgs[-1]["role"] == "assistant":
                msgs.pop()  # the prompt is what precedes the response being generated
            ids = render(tokenizer, msgs)
        else:
            ids = render(tokenizer, [{"role": "user", "content": r["prompt"]}])
        out.append(Prompt(str(pid), ids))
    return out
