"""The `dflash` CLI: commands listed, one-line errors with exit 2, query formats, ls and gc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from flows.cli import main
from storage import StageOutput, Store

REPO = Path(__file__).resolve().parent.parent


def _dflash(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env=env)


def test_help_lists_pipeline_commands() -> None:
    out = _dflash("--help")
    assert out.returncode == 0
    for cmd in ("run", "generate", "filter", "train", "bench", "report", "query", "hardware",
                "ls", "gc"):
        assert f"    {cmd} " in out.stdout


def test_hardware_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hardware"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device_type"] in ("cpu", "cuda") and info["cpu_count"] >= 1
    assert info["fingerprint"] and info["tag"] == info["tag"].lower()


def _store_with_table(tmp_path: Path) -> Store:
    store = Store(str(tmp_path / "store"))
    with StageOutput(store, "filter", "k1", config={}) as out:
        out.write_parquet("filter_stats.parquet",
                          pa.table({"step": [1, 2], "rule": ["dedupe", "error"],
                                    "rows_removed": [3, 0]}), table_name="filter_stats")
        out.commit()
    return store


def test_query_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store_with_table(tmp_path)
    sql = "select rule, rows_removed, now() as t from filter_stats order by step"
    assert main(["query", sql, "--store", store.url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # stdout holds only the JSON array
    assert [r["rule"] for r in rows] == ["dedupe", "error"] and "T" in rows[0]["t"]
    assert main(["query", "select rule from filter_stats", "--store", store.url,
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["rule", "dedupe", "error"]


def test_bad_store_url_is_one_line_exit_2() -> None:
    out = _dflash("query", "select 1", "--store", "ftp://nowhere/x")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unsupported scheme 'ftp'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_sql_names_the_views(tmp_path: Path) -> None:
    store = _store_with_table(tmp_path)
    out = _dflash("query", "select * from nope", "--store", store.url)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "filter_stats" in out.stderr and "nope" in out.stderr


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    out = _dflash("run", "--config", str(tmp_path / "missing.yaml"), "--store", str(tmp_path))
    assert out.returncode == 2 and "file not found" in out.stderr and "Traceback" not in out.stderr


def test_ls_and_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _store_with_table(tmp_path)
    with StageOutput(store, "train", "dead", config={}) as out:
        out.write_bytes("weights.bin", b"x" * 100)  # never committed
    store.write_bytes("filter/k1/orphan.parquet", b"junk")
    assert main(["ls", "--store", store.url]) == 0
    listing = capsys.readouterr().out
    assert "committed" in listing and "incomplete" in listing
    assert main(["gc", "--store", store.url]) == 0  # dry run
    dry = capsys.readouterr().out
    assert "would remove" in dry and "train/dead" in dry and "orphan.parquet" in dry
    assert store.exists("train/dead/weights.bin")
    assert main(["gc", "--store", store.url, "--yes"]) == 0
    assert not store.exists("train/dead/weights.bin") and not store.exists("filter/k1/orphan.parquet")
    assert store.exists("filter/k1/manifest.json") and store.exists("filter/k1/filter_stats.parquet")


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Every shipped config passes the pipeline's up-front checks (no model, no network)."""
    from flows.config import load_config
    from flows.pipeline import RunOptions, resolve

    cfg = load_config(path)
    assert cfg.name == path.stem
    resolved, _ = resolve(RunOptions(config_path=str(path), store="memory://configs-test"))
    assert resolved == cfg
