"""Generation backends for the ``generate`` stage: ``hf`` (in-process) and ``openai`` (a server).

Both take rendered prompts and return one result per prompt, in order; a prompt that cannot be
answered (longer than the context, a server error after retries) comes back as an ``error``
result with its reason, never as an exception, so the stage can account for every row.

``openai`` speaks to any OpenAI-compatible server (vLLM, SGLang, ``transformers serve``) so that
users can generate at scale on a serving engine. The API returns text, not token ids: response
ids are the text re-tokenised with the target's tokenizer (plus EOS when the server stopped on
it), which matches the server's own ids for ordinary text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dflash_models.generation import GenOutput, SamplingParams, context_length
from storage.errors import ConfigError

log = logging.getLogger("dflash")
RETRY_STATUS = {408, 409, 425, 429}
OnDone = Callable[[int, int], None]  # (rows, new tokens) finished


class OpenAIConfig(BaseModel):
    """Where the OpenAI-compatible server is and how hard to push it."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="server URL up to /v1")
    model: str | None = Field(None, description="served model name; default: the only one served")
    api_key_env: str = Field("OPENAI_API_KEY", description="env variable holding the API key")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(4, ge=0, description="retries of a failed request")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    timeout: float = Field(300.0, gt=0, description="seconds per request")


@dataclass
class GenRow:
    """One prompt as a backend sees it."""

    prompt_id: str
    messages: list[dict[str, str]]
    prompt_text: str
    prompt_token_ids: list[int]


def too_long(n_tokens: int, context: int | None) -> str | None:
    """The error reason for a prompt that leaves no room to answer, else None."""
    if context is not None and n_tokens >= context:
        return f"prompt has {n_tokens} tokens; the target's context is {context} tokens"
    return None


def _row_seed(seed: int, prompt_id: str) -> int:
    """A per-row seed that does not depend on batching or request order."""
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- hf
class HFBackend:
    """transformers ``generate`` in this process: length-sorted, left-padded, budgeted batches."""

    name = "hf"

    def __init__(self, folder: str | Path, dtype: str | None = None, device: str | None = None,
                 token_budget: int = 16384, max_batch_size: int = 64) -> None:
        from dflash_models.generation import HFGenerator

        self.gen = HFGenerator(folder, dtype=dtype, device=device)
        self.tokenizer, self.context = self.gen.tokenizer, self.gen.context
        self.eos_ids = self.gen.eos_ids
        self.token_budget, self.max_batch_size = token_budget, max_batch_size
        self._lock = threading.Lock()  # one model, one device: threads take turns

    def generate(self, rows: list[GenRow], params: SamplingParams,
                 on_done: OnDone | None = None) -> list[GenOutput]:
        with self._lock:
            return self.gen.generate([r.prompt_token_ids for r in rows], params,
                                     token_budget=self.token_budget,
                                     max_batch_size=self.max_batch_size, on_batch=on_done)


# ----------------------------------------------------------------------------- openai
class OpenAIBackend:
    """Chat completions (or plain completions for a model without a chat template) over HTTP."""

    name = "openai"

    def __init__(self, cfg: OpenAIConfig, folder: str | Path) -> None:
        import httpx
        from transformers import AutoConfig, AutoTokenizer

        from dflash_models.generation import has_chat_template

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.context = context_length(AutoConfig.from_pretrained(str(folder)))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = [int(eos)] if eos is not None else []
        self.chat = has_chat_template(self.tokenizer)
        key = os.environ.get(cfg.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers,
                                   timeout=cfg.timeout,
                                   limits=httpx.Limits(max_connections=cfg.concurrency))
        self.model = cfg.model or check_server(cfg)

    def generate(self, rows: list[GenRow], params: SamplingParams,
                 on_done: OnDone | None = None) -> list[GenOutput]:
        results: list[GenOutput | None] = [None] * len(rows)
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self._one, r, params): i for i, r in enumerate(rows)}
            for fut in as_completed(futures):
                out = fut.result()
                results[futures[fut]] = out
                if on_done is not None:
                    on_done(1, len(out.token_ids))
        return [r for r in results if r is not None]

    def _one(self, row: GenRow, params: SamplingParams) -> GenOutput:
        reason = too_long(len(row.prompt_token_ids), self.context)
        if reason:  # servers often accept it and answer garbage past the context
            return GenOutput([], "", "error", 0.0, error=reason)
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p,
                                "seed": _row_seed(params.seed, row.prompt_id)}
        if self.chat:
            path, body["messages"] = "/chat/completions", row.messages
        else:
            path, body["prompt"] = "/completions", row.prompt_text
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                delay = self.cfg.backoff_s * 2 ** (attempt - 1)
                time.sleep(min(delay * (1 + random.random() / 4), 60.0))
            t0 = time.perf_counter()
            try:
                resp = self.client.post(path, json=body)
            except Exception as e:  # connection refused/reset, timeouts: worth a retry
                last = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                continue
            if resp.status_code == 200:
                try:
                    return self._parse(resp.json(), time.perf_counter() - t0)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    last = f"malformed response ({type(e).__name__}: {e})"
                    continue
            last = f"HTTP {resp.status_code}: {resp.text.strip()[:200]}"
            if resp.status_code < 500 and resp.status_code not in RETRY_STATUS:
                return GenOutput([], "", "error", 0.0, error=f"openai {last}")
        return GenOutput([], "", "error", 0.0,
                         error=f"openai: {last} (after {self.cfg.max_retries} retries)")

    def _parse(self, data: dict[str, Any], latency: float) -> GenOutput:
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.chat else choice["text"]
        text = text or ""
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if finish == "stop" and self.eos_ids:
            ids.append(self.eos_ids[0])
        return GenOutput(ids, text, finish, latency)


def check_server(cfg: OpenAIConfig) -> str:
    """Fail fast with one line if the server is unreachable; return the model name to use."""
    import httpx

    url = cfg.base_url.rstrip("/") + "/models"
    key = os.environ.get(cfg.api_key_env)
    try:
        resp = httpx.get(url, timeout=min(cfg.timeout, 10.0),
                         headers={"Authorization": f"Bearer {key}"} if key else {})
        resp.raise_for_status()
        served = [m["id"] for m in resp.json().get("data", [])]
    except Exception as e:
        raise ConfigError(f"generate.openai.base_url {cfg.base_url}: cannot list models at {url} "
                          f"({type(e).__name__}); start the server or fix the URL") from None
    if cfg.model:
        return cfg.model
    if len(served) != 1:
        raise ConfigError(f"generate.openai.model is not set and {cfg.base_url} serves "
                          f"{len(served)} models ({', '.join(served[:5])}); set it")
    return served[0]


# ----------------------------------------------------------------------------- cache
_BACKENDS: dict[tuple[Any, ...], Any] = {}
_BACKENDS_LOCK = threading.Lock()


def get_backend(kind: str, folder: str | Path, *, dtype: str | None = None,
                device: str | None = None, token_budget: int = 16384, max_batch_size: int = 64,
                openai: OpenAIConfig | None = None) -> HFBackend | OpenAIBackend:
    """One backend per process and settings: a map over shards loads the model once."""
    key = (kind, str(folder), dtype, device, token_budget, max_batch_size,
           openai.model_dump_json() if openai else None)
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            if kind == "hf":
                _BACKENDS[key] = HFBackend(folder, dtype, device, token_budget, max_batch_size)
            else:
                _BACKENDS[key] = OpenAIBackend(openai or OpenAIConfig(), folder)
        return _BACKENDS[key]
