"""The train stage past one process: FSDP2 under torchrun (gloo), sharded DCP checkpoints that
resume at another world size, SIGKILL of one rank, two "nodes" through a c10d rendezvous.

One uninterrupted in-process run (a world of one) is the reference every torchrun run is held
to: the same global batch gives the same loss per step and the same final weights. Launches
are shared across assertions (each costs seconds of interpreter start-up per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from storage import Store, read_manifest
from storage.catalog import connect
from storage.manifest import recorded_parts
from tasks.train import TrainConfig, run_train
from tests.test_train import tiny_rows, tiny_store, tiny_target_dir  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
RUN_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    from storage import Store, read_manifest
    from tasks.train import TrainConfig, run_train
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store_path, folder, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = Store(store_path)
    m = run_train(store, TrainConfig(**cfg), Path(folder),
                  read_manifest(store, "filter", "test-filter"))
    print("KEY", m.key)
""")


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def base_cfg(**kw) -> TrainConfig:
    return TrainConfig.tiny(batch_size=4, max_steps=STEPS, eval_every=5, checkpoint_every=5,
                            classic_layers=0, export_last=True, **kw)


def losses(store: Store) -> list[float]:
    rows = connect(store).sql("SELECT loss FROM train_metrics WHERE phase = 'dflash' "
                              "ORDER BY step").fetchall()
    return [r[0] for r in rows]


def weights(store: Store, m, folder: str = "last/dflash-draft") -> dict[str, torch.Tensor]:
    return load(store.read_bytes(f"{m.prefix}/{folder}/model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def store_like(ref_store: Store, folder: Path) -> tuple[Store, object]:
    """A fresh store holding the reference's filter output (same digest, so the same key)."""
    shutil.copytree(Path(ref_store.path("filter")), folder / "store/filter")
    store = Store(folder / "store")
    return store, read_manifest(store, "filter", "test-filter")


def spawn(store_dir: Path, target: Path, cfg: TrainConfig, throttle: float = 0.0
          ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "DFLASH_TRAIN_THROTTLE_S": str(throttle)}
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(store_dir), str(target),
                             cfg.model_dump_json()], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_target_dir: Path,  # noqa: F811
              tiny_rows: list[dict]):  # noqa: F811
    """The uninterrupted world-of-one run, online features (in-process, no torchrun)."""
    store, fm = tiny_store(tmp_path_factory.mktemp("ref"), tiny_rows)
    torch.set_num_threads(1)
    m = run_train(store, base_cfg(), tiny_target_dir, fm)
    return store, m


def test_fsdp_two_processes_match_one(tmp_path: Path, tiny_target_dir: Path,  # noqa: F811
                                      tiny_rows: list[dict], reference) -> None:  # noqa: F811
    """FSDP2 over 2 ranks: the same key, loss per step (1e-4) and final weights as 1 process."""
    ref_store, ref = reference
    cfg = base_cfg(strategy="fsdp", nproc=2)
    store, fm = store_like(ref_store, tmp_path)
    m = run_train(store, cfg, tiny_target_dir, fm)
    assert m.key == ref.key  # strategy and world size are not part of the output's identity
    one, two = losses(ref_store), losses(store)
    assert len(one) == STEPS and len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-4)
    assert one[0] != pytest.approx(one[-1], rel=1e-3)  # it did train
    assert_same_weights(weights(ref_store, ref), weights(store, m))
    assert m.extra["dflash"]["best"]["step"] == ref.extra["dflash"]["best"]["step"]
    assert not store.find(f"{m.prefix}/checkpoints")
