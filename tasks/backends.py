"""Generation backends for the ``generate`` stage: ``hf`` (in-process) and ``openai`` (servers).

Both take rendered prompts and return one result per prompt, in order; a prompt that cannot be
answered (longer than the context, a server error after retries) comes back as an ``error``
result with its reason, never as an exception, so the stage can account for every row. The one
exception is an outage of every server (``tasks.fleet.FleetDown``): nothing of the shard is
written and a rerun resumes it.

``openai`` speaks to a fleet of OpenAI-compatible servers (vLLM, SGLang, ``transformers serve``)
through ``/v1/completions`` with the project's own rendering of the prompt (token ids where the
server takes them), so the server and training see the same prompt tokens. Response token ids
come from the server when it returns them, else from re-tokenising the text (each row says
which: ``token_ids_from``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dflash_models.generation import (
    GenOutput,
    SamplingParams,
    context_length,
    encode_prompt,
    has_chat_template,
    render_prompt,
)
from storage.errors import ConfigError
from tasks.fleet import (
    ID_FIELD,
    Fleet,
    Server,
    backoff_s,
    list_model,
    make_client,
    probe,
    retryable,
    server_token_ids,
)

log = logging.getLogger("dflash")
DEFAULT_URL = "http://127.0.0.1:8000/v1"
OnDone = Callable[[int, int], None]  # (rows, new tokens) finished


class OpenAIConfig(BaseModel):
    """Where the OpenAI-compatible servers are and how hard to push them. Only ``model`` changes
    what is generated (it is in the cache key); URLs, concurrency and retries are how it runs."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="one server URL up to /v1")
    base_urls: list[str] | None = Field(None, description="a fleet: one URL per server")
    model: str | None = Field(None, description="served model name; default: the only one served")
    api_key_env: str = Field("OPENAI_API_KEY", description="env variable holding the API key")
    concurrency: int = Field(8, ge=1, description="requests in flight per server")
    max_retries: int = Field(4, ge=0, description="retries of a row on 429/5xx or timeouts")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    timeout: float = Field(300.0, gt=0, description="seconds per request")
    drop_after: int = Field(2, ge=1, description="connection failures in a row that drop a server")
    check_tokens: int = Field(8, ge=0, description="T=0 tokens compared with the HF target at "
                              "the start when its folder is at hand; 0: no check")

    @model_validator(mode="after")
    def _one_form(self) -> OpenAIConfig:
        if self.base_url is not None and self.base_urls is not None:
            raise ValueError("set base_url (one server) or base_urls (a fleet), not both")
        if self.base_urls is not None and not self.base_urls:
            raise ValueError("base_urls is empty; list at least one server URL")
        if len(set(self.urls())) != len(self.urls()):
            raise ValueError("base_urls lists a URL twice")
        return self

    def urls(self) -> list[str]:
        """The servers, in the order given (default: one at 127.0.0.1:8000)."""
        if self.base_urls is not None:
            return [u.rstrip("/") for u in self.base_urls]
        return [(self.base_url or DEFAULT_URL).rstrip("/")]


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


def render_thinking(tokenizer: Any, messages: list[dict[str, Any]], thinking: bool | None) -> str:
    """The prompt with the chat template's thinking switch (``enable_thinking``, Qwen3 and
    kin) set; ``None`` leaves the template's default (and the prompt stage's rendering)."""
    if thinking is None or not has_chat_template(tokenizer):
        return render_prompt(tokenizer, messages)
    msgs = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)


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
@dataclass
class ServedOutput(GenOutput):
    """A server's answer with where it came from (the ``generations`` row columns)."""

    server: str | None = None
    token_ids_from: str = "retokenized"  # "server" when the response carried its token ids
    request_id: str | None = None
    attempts: int = 1


class OpenAIBackend:
    """``/v1/completions`` over a fleet of OpenAI-compatible servers (see tasks/fleet.py).

    The prompt is the project's own rendering: token ids where the server accepts them, else the
    same text (which the server re-tokenises). A server's reasoning parser never applies to
    ``/completions``, so reasoning text stays in the response.
    """

    name = "openai"

    def __init__(self, cfg: OpenAIConfig, folder: str | Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.context = context_length(AutoConfig.from_pretrained(str(folder)))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = [int(eos)] if eos is not None else []
        text = render_prompt(self.tokenizer, [{"role": "user", "content": "Hi"}])
        ids = encode_prompt(self.tokenizer, text)
        servers = []
        for url in cfg.urls():  # every server answers now, or one line names it
            model = list_model(url, cfg.model, cfg.timeout, cfg.api_key_env)
            server = Server(url, model, make_client(url, cfg.concurrency, cfg.timeout,
                                                    cfg.api_key_env), cfg.concurrency)
            probe(server, ids, text, cfg.max_retries, cfg.backoff_s)
            log.info("generate.openai: %s serves %s (token-id prompts: %s, token ids back: %s)",
                     url, model, server.token_prompts, server.returns_ids)
            servers.append(server)
        self.fleet = Fleet(servers, cfg.drop_after)
        self.check_prompt = (text, ids)

    @property
    def concurrency(self) -> int:
        return self.cfg.concurrency * len(self.fleet.servers)

    def generate(self, rows: list[GenRow], params: SamplingParams,
                 on_done: OnDone | None = None) -> list[GenOutput]:
        """Every row, in order; a row's failure is an ``error`` output, an outage is FleetDown.
        Threads wait for a fleet slot, so concurrent shards share the servers' capacity."""
        results: list[GenOutput | None] = [None] * len(rows)
        if not rows:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows))) as pool:
            futures = {pool.submit(self._one, r, params): i for i, r in enumerate(rows)}
            for fut in as_completed(futures):
                out = fut.result()  # FleetDown propagates: the shard is not written
                results[futures[fut]] = out
                if on_done is not None:
                    on_done(1, len(out.token_ids))
        return [r for r in results if r is not None]

    def _body(self, server: Server, row: GenRow, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": server.model, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "seed": _row_seed(params.seed, row.prompt_id),
            "prompt": row.prompt_token_ids if server.token_prompts else row.prompt_text}
        if server.returns_ids:
            body[ID_FIELD] = True
        return body

    def _one(self, row: GenRow, params: SamplingParams) -> GenOutput:
        """One row: failover on a dropped server is free, 429/5xx retries with backoff, another
        4xx fails the row at once (the same request would be refused again)."""
        import httpx

        reason = too_long(len(row.prompt_token_ids), self.context)
        if reason:  # servers often accept it and answer garbage past the context
            return GenOutput([], "", "error", 0.0, error=reason)
        retries, attempts, last, avoid = 0, 0, "", None
        while True:
            server = self.fleet.acquire(avoid)
            attempts += 1
            rid = uuid.uuid4().hex
            t0 = time.perf_counter()
            try:
                resp = server.client.post("/completions", json=self._body(server, row, params),
                                          headers={"X-Request-Id": rid})
            except Exception as e:
                last = f"{server.url}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                avoid = server
                if isinstance(e, httpx.ReadTimeout):  # busy, not gone: retry, maybe elsewhere
                    self.fleet.release(server, "retryable")
                else:  # refused, reset: count it against the server
                    self.fleet.release(server, "conn_errors", last)
                    if server.dropped is not None:
                        continue  # failover: another server takes it, no retry spent
            else:
                if resp.status_code == 200:
                    try:
                        out = self._parse(resp.json(), time.perf_counter() - t0)
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        self.fleet.release(server, "retryable")
                        last = f"{server.url}: malformed response ({type(e).__name__}: {e})"
                    else:
                        self.fleet.release(server, "answered")
                        out.server, out.request_id, out.attempts = server.url, rid, attempts
                        return out
                else:
                    last = f"{server.url}: HTTP {resp.status_code}: {resp.text.strip()[:160]}"
                    if not retryable(resp.status_code):
                        self.fleet.release(server, "refused")
                        return GenOutput([], "", "error", 0.0, error=f"openai {last}")
                    self.fleet.release(server, "retryable")
                    avoid = server
            retries += 1
            if retries > self.cfg.max_retries:
                return GenOutput([], "", "error", 0.0,
                                 error=f"openai {last} (after {self.cfg.max_retries} retries)")
            time.sleep(backoff_s(self.cfg.backoff_s, retries))

    def _parse(self, data: dict[str, Any], latency: float) -> ServedOutput:
        choice = data["choices"][0]
        text = choice["text"] or ""
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        ids = server_token_ids(choice)
        if ids is not None:
            return ServedOutput(ids, text, finish, latency, token_ids_from="server")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if finish == "stop" and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ServedOutput(ids, text, finish, latency, token_ids_from="retokenized")

    def check_against_hf(self, folder: str | Path, n_tokens: int, dtype: str | None = None,
                         device: str | None = None) -> int | None:
        """Compare one T=0 completion of the first live server with the HF target on the same
        prompt ids; warn with the first differing token. Returns its index (None: they agree).

        Why: a server whose chat template, tokenizer or weights differ from the target's trains
        a draft on tokens the served target never emits (low acceptance, silently).
        """
        from dflash_models.generation import HFGenerator

        text, ids = self.check_prompt
        params = SamplingParams(max_new_tokens=n_tokens)
        served = self._one(GenRow("check", [], text, ids), params)
        if served.finish_reason == "error":
            raise ConfigError(f"generate.openai: the start check failed ({served.error})")
        ref = HFGenerator(folder, dtype=dtype, device=device).generate([ids], params)[0]
        n = min(len(served.token_ids), len(ref.token_ids))
        first = next((i for i in range(n) if served.token_ids[i] != ref.token_ids[i]), None)
        if first is None and len(served.token_ids) != len(ref.token_ids):
            first = n
        if first is not None:
            def tok(seq: list[int]) -> str:
                return repr(self.tokenizer.decode(seq[first:first + 1])) if first < len(seq) \
                    else "<end>"

            log.warning("generate.openai: %s and the HF target disagree at T=0 from token %d "
                        "(server %s, hf %s; token ids from: %s); check the server's model, chat "
                        "template and dtype", getattr(served, "server", "?"), first,
                        tok(served.token_ids), tok(ref.token_ids),
                        getattr(served, "token_ids_from", "?"))
        return first


def check_server(cfg: OpenAIConfig) -> str:
    """Fail fast with one line naming the first URL that does not answer; return the model name
    of the first server."""
    models = [list_model(url, cfg.model, cfg.timeout, cfg.api_key_env) for url in cfg.urls()]
    return models[0]


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
                cfg = openai or OpenAIConfig()
                backend = OpenAIBackend(cfg, folder)
                if cfg.check_tokens:
                    backend.check_against_hf(folder, cfg.check_tokens, dtype, device)
                _BACKENDS[key] = backend
        return _BACKENDS[key]
