"""The openai backend's fleet against real servers on 127.0.0.1.

Two ``transformers serve`` processes on the packaged SmolLM2 (as shipped: text prompts only, no
token ids back) are shared by the module; the kill test is the last to use them: it kills one.
A small server of our own (``IdServer``: the same SmolLM2 in this process) stands in only where
``transformers serve`` cannot: token-id prompts with token ids back, and 503s on demand.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dflash_models.generation import HFGenerator, SamplingParams
from storage import Store, read_manifest
from storage.catalog import connect
from storage.errors import ConfigError
from tasks.backends import _BACKENDS, GenRow, OpenAIBackend, OpenAIConfig
from tasks.base import key_for
from tasks.fleet import FleetDown
from tasks.generate import (
    STAGE,
    GenerateConfig,
    _code,
    _stage_config,
    plan_generation,
    run_generate,
)
from tasks.models import TargetConfig, run_prepare_target
from tasks.prompts import PromptsConfig, PromptSource, run_prompts

QUESTIONS = ["What is the capital of France?", "Say only the word yes.",
             "Write a haiku about autumn.", "Name three prime numbers.",
             "What colour is the sky?", "Count from one to five.",
             "hello " * 9000]  # over SmolLM2's context: an error row, never sent
NEW = 6  # new tokens per row: enough to differ, cheap on 2 cores

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve",
                                 str(folder), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def serves(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """Two ``transformers serve`` processes, started together; yields (process, base URL /v1)."""
    import httpx

    logs = tmp_path_factory.mktemp("serve")
    procs = [_start_serve(smollm2_dir, logs / f"serve{i}.log") for i in range(2)]
    try:
        deadline = time.time() + 120
        for i, (proc, url) in enumerate(procs):
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("transformers serve did not start: "
                                + (logs / f"serve{i}.log").read_text()[-1500:])
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
        yield [(p, u + "/v1") for p, u in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """A store folder with the target and a six-question prompt set (stage outputs reused)."""
    root = tmp_path_factory.mktemp("fleet")
    path = root / "q.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": q}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    store = Store(root / "base")
    target = run_prepare_target(store, TargetConfig())
    prompts = run_prompts(store, PromptsConfig(
        sources=[PromptSource(kind="file", path=str(path), name="q")]), target)
    return root, target, prompts


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path, one_thread_module: None) -> HFGenerator:
    return HFGenerator(smollm2_dir)


def _store(prepared: tuple[Path, Any, Any], name: str) -> Store:
    """A fresh store holding copies of the shared target and prompts outputs."""
    import shutil

    root = prepared[0]
    shutil.copytree(root / "base", root / name)
    return Store(root / name)


def _rows(store: Store) -> list[tuple]:
    """The generated rows (the over-long prompt q:6 must be the one error)."""
    con = connect(store)
    errors = con.execute("SELECT prompt_id, reason FROM generation_errors").fetchall()
    assert len(errors) == 1 and errors[0][0] == "q:6" and "context is 8192 tokens" in errors[0][1]
    return con.execute(
        "SELECT prompt_id, prompt_token_ids, response_token_ids, server, token_ids_from, "
        "request_id, attempts, finish_reason, n_response_tokens, backend FROM generations "
        "ORDER BY prompt_id").fetchall()


def _assert_greedy(rows: list[tuple], hf: HFGenerator) -> None:
    """Every row's response equals the HF target's greedy answer to the same prompt ids."""
    want = hf.generate([list(r[1]) for r in rows], SamplingParams(max_new_tokens=NEW))
    for r, w in zip(rows, want, strict=True):
        assert list(r[2]) == w.token_ids, (r[0], r[3])
        assert (r[7], r[8], r[9]) == (w.finish_reason, len(w.token_ids), "openai")


# ----------------------------------------------------------------------------- our own server
class IdServer:
    """``/v1/models`` and ``/v1/completions`` taking token-id prompts and answering with the
    token ids (vLLM's ``return_token_ids``); its first ``fail_first`` generation requests get
    503. Generation is the real SmolLM2, greedy."""

    def __init__(self, hf: HFGenerator, fail_first: int = 0) -> None:
        self.hf, self.fail_left, self.lock = hf, fail_first, threading.Lock()
        self.prompts: list[list[int]] = []
        self.answered_503 = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"data": [{"id": "smol"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*owner.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def complete(self, body: dict) -> tuple[int, dict]:
        prompt = body["prompt"]
        if not isinstance(prompt, list):
            return 400, {"detail": "this server takes token ids"}
        with self.lock:
            if body["max_tokens"] > 1 and self.fail_left > 0:  # the probe is never refused
                self.fail_left -= 1
                self.answered_503 += 1
                return 503, {"detail": "overloaded"}
            out = self.hf.generate([prompt], SamplingParams(max_new_tokens=body["max_tokens"]))[0]
            if body["max_tokens"] > 1:
                self.prompts.append(prompt)
        choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason}
        if body.get("return_token_ids"):
            choice["token_ids"] = out.token_ids
        return 200, {"id": "x", "choices": [choice]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- tests
def test_config_forms_and_what_is_in_the_key(prepared: tuple, serves: list) -> None:
    with pytest.raises(ValidationError, match="not both"):
        OpenAIConfig(base_url="http://a/v1", base_urls=["http://b/v1"])
    store, (_, target, prompts) = Store(prepared[0] / "base"), prepared

    def key(**kw: Any) -> str:  # the plan's key, without the plan's check that servers answer
        cfg = GenerateConfig(backend="openai", **kw)
        return key_for(STAGE, _stage_config(cfg, target), {"target": target, "prompts": prompts},
                       _code())

    one = key(openai=OpenAIConfig(base_url="http://x:1/v1", concurrency=2))
    fleet = key(openai=OpenAIConfig(base_urls=["http://y:1/v1", "http://z:1/v1"],
                                    concurrency=64, max_retries=9))
    assert one == fleet  # where and how fast it runs is not content
    assert key(thinking=True) != key(thinking=False) != one
    assert key(openai=OpenAIConfig(model="other")) != one
    # bad input: one dead URL in the list fails before any shard, one line naming it
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    bad = GenerateConfig(backend="openai", openai=OpenAIConfig(
        base_urls=[serves[0][1], dead], timeout=3))
    for call in (run_generate, plan_generation):  # the flow's first generate task is the plan
        with pytest.raises(ConfigError) as e:
            call(store, bad, target, prompts)
        assert dead in str(e.value) and "\n" not in str(e.value)
    assert not store.find("generations")


def test_fleet_of_two_transformers_serve_splits_rows_and_matches_hf(
        prepared: tuple, serves: list, hf: HFGenerator, smollm2_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    store = _store(prepared, "two")
    urls = [u for _, u in serves]
    cfg = GenerateConfig(backend="openai", max_new_tokens=NEW, shard_size=2, openai=OpenAIConfig(
        base_urls=urls, concurrency=1, check_tokens=NEW))
    with caplog.at_level(logging.WARNING, logger="dflash"):
        m = run_generate(store, cfg, prepared[1], prepared[2])
    assert not [r for r in caplog.records if "disagree" in r.getMessage()]
    rows = _rows(store)
    assert [r[0] for r in rows] == [f"q:{i}" for i in range(6)]
    assert {r[3] for r in rows} == set(urls)  # both servers answered
    assert {r[4] for r in rows} == {"retokenized"}  # transformers serve returns text only
    assert len({r[5] for r in rows}) == 6 and all(r[6] == 1 for r in rows)
    assert {u: c["rows"] for u, c in m.extra["servers"].items()} == {
        u: sum(r[3] == u for r in rows) for u in urls}
    assert m.extra["token_ids_from"] == {"retokenized": 6}
    assert m.rows == {"generations": 6, "generation_errors": 1}
    _assert_greedy(rows, hf)
    # the start check catches a server that sees other prompt tokens than the target: here the
    # text goes to the server while the HF target gets another prompt's ids
    backend = next(b for b in _BACKENDS.values() if getattr(b, "cfg", None) == cfg.openai)
    tok = backend.tokenizer
    other = tok.apply_chat_template([{"role": "user", "content": "Write a long poem."}],
                                    tokenize=False, add_generation_prompt=True)
    backend.check_prompt = (backend.check_prompt[0], tok(other)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="dflash"):
        first = backend.check_against_hf(smollm2_dir, NEW)
    assert first is not None and f"from token {first}" in caplog.text


def test_token_id_prompts_and_ids_back_with_503s_retried(prepared: tuple, hf: HFGenerator,
                                                         smollm2_dir: Path) -> None:
    server = IdServer(hf, fail_first=3)
    try:
        store = _store(prepared, "ids")
        cfg = GenerateConfig(backend="openai", max_new_tokens=NEW, shard_size=3, openai=OpenAIConfig(
            base_url=server.url, concurrency=2, backoff_s=0.01, check_tokens=0))
        m = run_generate(store, cfg, prepared[1], prepared[2])
        backend = OpenAIBackend(cfg.openai, smollm2_dir)  # probed while the server is up
    finally:
        server.close()
    rows = _rows(store)
    assert len(rows) == 6 and m.rows == {"generations": 6, "generation_errors": 1}
    assert {r[4] for r in rows} == {"server"}
    assert sorted(server.prompts) == sorted(list(r[1]) for r in rows)  # our ids, as sent
    assert server.answered_503 == 3 and sum(r[6] - 1 for r in rows) == 3
    assert m.extra["servers"] == {server.url: {"rows": 6, "retries": 3}}
    _assert_greedy(rows, hf)
    # the only server gone: an outage is an exception (the shard is not written), not error rows
    with pytest.raises(FleetDown, match=server.url):
        backend.generate([GenRow("x", [], "hi", list(rows[0][1]))], SamplingParams(2))


def test_server_killed_mid_stage_the_other_finishes(prepared: tuple, serves: list,
                                                    hf: HFGenerator) -> None:
    """Runs last in the module: it kills the second ``transformers serve``."""
    store = _store(prepared, "kill")
    (_, keep), (victim, gone) = serves
    cfg = GenerateConfig(backend="openai", max_new_tokens=NEW, shard_size=2, shards_in_flight=1,
                         openai=OpenAIConfig(base_urls=[keep, gone], concurrency=1,
                                             backoff_s=0.01, check_tokens=0))

    class KillAfterFirstRow:
        """Kill the victim when shard 1's first row is done: its other row is in flight."""

        done = 0

        def advance(self, n: int = 1, tokens: int = 0, note: str = "") -> None:
            self.done += n
            if self.done == 1 and victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait(timeout=10)

    def map_fn(shard: Any, indices: list[int]) -> list[Any]:
        out = [shard(indices[0])]
        return out + [shard(i, KillAfterFirstRow()) for i in indices[1:]]

    m = run_generate(store, cfg, prepared[1], prepared[2], map_fn=map_fn)
    rows = _rows(store)
    assert [r[0] for r in rows] == [f"q:{i}" for i in range(6)]  # none lost, none twice
    assert m.rows == {"generations": 6, "generation_errors": 1}
    assert victim.poll() is not None
    fleet = next(b.fleet for b in _BACKENDS.values() if getattr(b, "cfg", None) == cfg.openai)
    stats = fleet.stats()
    assert stats[gone]["dropped"] and stats[gone]["conn_errors"] >= 1
    assert stats[keep]["dropped"] is None
    assert {r[3] for r in rows[:2]} == {keep, gone}  # shard 0 used both
    assert {r[3] for r in rows[4:]} == {keep}  # the shard after the kill: only the survivor
    assert read_manifest(store, "generations", m.key) is not None
    _assert_greedy(rows, hf)


def test_thinking_switch_reaches_the_chat_template(smollm2_dir: Path) -> None:
    """``generate.thinking`` renders with ``enable_thinking`` (Qwen3's switch); null leaves the
    prompt stage's rendering. SmolLM2's template ignores it, so a Qwen3-like one stands in."""
    from transformers import AutoTokenizer

    from tasks.backends import render_thinking

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    msgs = [{"role": "user", "content": "hi"}]
    plain = render_thinking(tok, msgs, None)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                         "<think></think>{% endif %}")
    assert render_thinking(tok, msgs, False) == "<user>hi<assistant><think></think>"
    assert render_thinking(tok, msgs, True) == "<user>hi<assistant>"
    assert "<|im_start|>assistant" in plain
