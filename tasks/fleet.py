"""The openai backend's fleet: N OpenAI-compatible servers, probed once, shared by every shard.

Why a fleet: at the paper's data size (500K+ responses) generation runs on one serving engine
per GPU or node; one URL and one shard at a time leaves most of them idle. Every request takes a
slot on the least-loaded live server (``concurrency`` slots each), so concurrent shards share
the servers' capacity instead of each opening its own.

Why a probe: the project templates each prompt itself and wants the server to see exactly those
token ids. vLLM and SGLang accept token-id prompts on ``/v1/completions``; ``transformers serve``
answers 400 ("prompt must be a string") and 422 to unknown fields. One small request per variant
at the start finds what each server accepts, so no row ever pays for a refused request (a 4xx
is never retried per row).

Failover: a connection error (refused, reset; not a read timeout: a busy server is not a gone
one) counts against a server; ``drop_after`` in a row drop it for the rest of the run and its
requests go elsewhere without spending their retries. When every server is gone the shard fails
unwritten (``FleetDown``): a rerun resumes it, nothing is recorded as a row error for an outage.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from storage.errors import ConfigError

log = logging.getLogger("dflash")
RETRY_STATUS = {408, 409, 425, 429}
ID_FIELD = "return_token_ids"  # vLLM >= 0.10.2: the response's choices carry ``token_ids``


class FleetDown(RuntimeError):
    """Every server of the fleet was dropped; the shard must not be written."""


def retryable(status: int) -> bool:
    """Worth sending again (maybe elsewhere): overload, timeouts, server errors."""
    return status >= 500 or status in RETRY_STATUS


def backoff_s(first: float, retry: int) -> float:
    """Exponential backoff with a little jitter, capped at a minute."""
    return min(first * 2 ** (retry - 1) * (1 + random.random() / 4), 60.0)


@dataclass
class Server:
    """One endpoint: what it accepts (from the probe), its load and its counts."""

    url: str
    model: str
    client: Any  # httpx.Client
    concurrency: int
    token_prompts: bool = False  # accepts ``prompt: [ids]``
    returns_ids: bool = False  # answers ``return_token_ids`` with the response's token ids
    inflight: int = 0
    failures: int = 0  # consecutive connection failures
    dropped: str | None = None  # why it was dropped
    counts: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "answered": 0, "retryable": 0, "refused": 0, "conn_errors": 0})


def make_client(url: str, concurrency: int, timeout: float, api_key_env: str) -> Any:
    import httpx

    key = os.environ.get(api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                        limits=httpx.Limits(max_connections=concurrency))


def list_model(url: str, model: str | None, timeout: float, api_key_env: str) -> str:
    """The model name to send to ``url``; one line naming the URL if it does not answer."""
    import httpx

    models = url.rstrip("/") + "/models"
    key = os.environ.get(api_key_env)
    try:
        resp = httpx.get(models, timeout=min(timeout, 10.0),
                         headers={"Authorization": f"Bearer {key}"} if key else {})
        resp.raise_for_status()
        served = [m["id"] for m in resp.json().get("data", [])]
    except Exception as e:
        raise ConfigError(f"generate.openai: server {url} does not answer (cannot list models at "
                          f"{models}: {type(e).__name__}); start it or remove it from the "
                          "list") from None
    if model:
        return model
    if len(served) != 1:
        raise ConfigError(f"generate.openai.model is not set and {url} serves {len(served)} "
                          f"models ({', '.join(served[:5])}); set it")
    return served[0]


def server_token_ids(choice: dict[str, Any]) -> list[int] | None:
    """The response's token ids when the server sent them (vLLM ``token_ids``, or logprobs
    tokens written as ``token_id:N`` by ``--return-tokens-as-token-ids``), else None."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        return list(ids)
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if isinstance(tokens, list) and tokens and all(
            isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.split(":", 1)[1]) for t in tokens]
    return None


def probe(server: Server, prompt_ids: list[int], prompt_text: str, max_retries: int,
          backoff: float) -> None:
    """Find what ``server`` accepts, preferring token-id prompts and returned token ids.

    Four variants at most, each a one-token T=0 completion with the same fields real requests
    carry; a 4xx moves to the next variant, overload is retried, silence is one line.
    """
    variants = ((True, True), (True, False), (False, True), (False, False))
    last = ""
    for ids_prompt, want_ids in variants:
        body: dict[str, Any] = {"model": server.model, "max_tokens": 1, "temperature": 0.0,
                                "top_p": 1.0, "seed": 0,
                                "prompt": prompt_ids if ids_prompt else prompt_text}
        if want_ids:
            body[ID_FIELD] = True
        for retry in range(max_retries + 1):
            if retry:
                time.sleep(backoff_s(backoff, retry))
            try:
                resp = server.client.post("/completions", json=body)
            except Exception as e:
                raise ConfigError(f"generate.openai: server {server.url} stopped answering while "
                                  f"probed ({type(e).__name__}); check it or remove it from the "
                                  "list") from None
            if not retryable(resp.status_code):
                break
        last = f"HTTP {resp.status_code}: {resp.text.strip()[:160]}"
        if resp.status_code == 200:
            server.token_prompts = ids_prompt
            try:
                choice = resp.json()["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ConfigError(f"generate.openai: server {server.url} answered /completions "
                                  "without choices; is it OpenAI-compatible?") from None
            server.returns_ids = want_ids and server_token_ids(choice) is not None
            return
        if retryable(resp.status_code):
            break
    raise ConfigError(f"generate.openai: server {server.url} refuses /v1/completions ({last}); "
                      "check the server and generate.openai.model")


class Fleet:
    """Slots on live servers: ``acquire`` blocks until one is free, ``release`` hands it back."""

    def __init__(self, servers: list[Server], drop_after: int) -> None:
        self.servers, self.drop_after = servers, drop_after
        self.peak = 0  # most requests in flight at once: did the shards fill the slots?
        self._cond = threading.Condition()

    def acquire(self, avoid: Server | None = None) -> Server:
        """The free live server with the lowest load (another than ``avoid`` if one is free)."""
        with self._cond:
            while True:
                live = [s for s in self.servers if s.dropped is None]
                if not live:
                    why = "; ".join(f"{s.url}: {s.dropped}" for s in self.servers)
                    raise FleetDown(f"generate.openai: every server stopped answering ({why}); "
                                    "restart them and run generate again to resume")
                free = [s for s in live if s.inflight < s.concurrency]
                if avoid is not None and len(free) > 1:
                    free = [s for s in free if s is not avoid]
                if free:
                    s = min(free, key=lambda s: (s.inflight / s.concurrency, s.counts["requests"]))
                    s.inflight += 1
                    s.counts["requests"] += 1
                    self.peak = max(self.peak, sum(x.inflight for x in self.servers))
                    return s
                self._cond.wait(timeout=1.0)

    def release(self, server: Server, outcome: str, why: str = "") -> None:
        """``outcome``: answered | retryable | refused | conn_errors (counted per server)."""
        with self._cond:
            server.inflight -= 1
            server.counts[outcome] += 1
            if outcome == "conn_errors":
                server.failures += 1
                if server.failures >= self.drop_after and server.dropped is None:
                    server.dropped = why or "connection failures"
                    log.warning("generate.openai: dropping %s after %d connection failure(s) "
                                "(%s); its requests go to the other servers", server.url,
                                server.failures, server.dropped)
            else:
                server.failures = 0
            self._cond.notify_all()

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {s.url: {**s.counts, "dropped": s.dropped, "token_prompts": s.token_prompts,
                            "returns_ids": s.returns_ids} for s in self.servers}
