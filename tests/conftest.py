"""Shared fixtures: the real packaged SmolLM2 folder and a real S3 endpoint (moto's server)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "ci.yaml"

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on 1 thread: small models run faster on one, and on a shared 2-core box two OpenMP
    threads spinning against other jobs can make a 25 s test take 10 minutes."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """`one_thread` for a whole module (its module-scoped fixtures run on 1 thread too)."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def load_bench() -> Callable[[str], ModuleType]:
    """Import a ``bench/`` script by its name (bench/ is a folder of scripts, not a package)."""
    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an fp32 HF folder (converted once per machine)."""
    from dflash_models.packaged import packaged_model_dir

    return packaged_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1 speaking the real S3 HTTP protocol.

    The standard AWS variables point every client (s3fs, boto3, subprocesses) at it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each of the three backends."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:10]}"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (a free port) for the session: its API URL.

    Telemetry off (offline machines log errors otherwise) and PREFECT_UI_API_URL set, as the
    README's deployment section says."""
    import httpx

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path_factory.mktemp("prefect-server")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 180 s: "
                        + (home / "server.log").read_text()[-2000:])
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


# ----------------------------------------------------------------------------- the e2e run
def pipeline_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def dflash_cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            start_new_session=True, **kw)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def resumed_run(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
                smollm2_dir: Path) -> dict:
    """ci.yaml on moto S3 behind a proxy failing 10% of requests with 503: SIGKILL during
    generation, then a rerun to completion (shared by tests/test_pipeline.py and
    tests/test_deploy.py)."""
    import boto3
    from s3_faults import FaultProxy

    from storage import Store

    tmp = tmp_path_factory.mktemp("e2e")
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/ci"
    proxy = FaultProxy(s3_endpoint, rate=0.10)  # the runs' S3: 10% of requests answer 503
    env = pipeline_env(tmp, AWS_ENDPOINT_URL=proxy.url)
    store = Store(url)
    log1 = open(tmp / "run1.log", "w")
    first = dflash_cli(["run", "--config", str(CI), "--store", url], env, stdout=log1, stderr=log1)
    deadline = time.time() + 600
    shard0 = None
    while time.time() < deadline and first.poll() is None:
        parts = [f for f in store.find("generations") if "/_parts/shard-00000" in f]
        if parts:
            shard0 = parts[0]
            break
        time.sleep(0.5)
    assert shard0 is not None, (tmp / "run1.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group, Prefect's server included
    first.wait()
    gen_prefix = shard0.split("/_parts/")[0]
    assert not store.exists(f"{gen_prefix}/manifest.json")
    info0 = store.fs.info(store.path(f"{gen_prefix}/shard-00000.parquet"), refresh=True)
    log2 = open(tmp / "run2.log", "w")
    second = dflash_cli(["run", "--config", str(CI), "--store", url], env, stdout=log2, stderr=log2)
    assert second.wait(timeout=900) == 0, (tmp / "run2.log").read_text()[-3000:]
    info1 = store.fs.info(store.path(f"{gen_prefix}/shard-00000.parquet"), refresh=True)
    return {"url": url, "gen_prefix": gen_prefix, "shard0_before": info0, "shard0_after": info1,
            "log": (tmp / "run2.log").read_text(), "tmp": tmp, "proxy": proxy}


