"""The ``dflash`` command line: ``dflash <command> [options]``.

Every command validates its inputs before loading a model or starting a flow. Errors caused by
input or environment (``DflashError``) print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from storage.errors import DflashError, mask_url, one_line

COMMANDS = ("run", "generate", "filter", "train", "bench", "report", "query", "hardware", "ls", "gc",
            "verify")
log = logging.getLogger("dflash")


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", default=None,
                       help="pipeline YAML (default: configs/default.yaml)")
        p.add_argument("--prompts", default=None,
                       help="prompt file or folder (JSONL/Parquet, local or s3://) overriding the config")
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rebuild STAGE and what depends on it (repeatable)")
    p.add_argument("--store", default=None,
                   help="artifact store URL: a folder, memory:// or s3://bucket/prefix "
                        "(default: $DFLASH_STORE or ./dflash-store)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash", description="Train and benchmark DFlash speculative-decoding drafts with a "
        "cached, resumable Prefect pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    helps = {
        "run": "run the whole pipeline (prepare target, prompts, generate, filter, train, bench, report)",
        "generate": "stage 1: regenerate responses with the target into Parquet shards",
        "filter": "stage 2: DuckDB filtering and the train/eval split",
        "train": "stage 3: train the DFlash draft (and the classic baseline)",
        "bench": "stage 4: benchmark drafts and append hardware-tagged rows to the history",
        "report": "rebuild the HTML/markdown report from the store",
        "query": "run SQL over the store's tables (DuckDB views)",
        "hardware": "print this machine's hardware tags as JSON",
        "ls": "list stage outputs with size and status",
        "gc": "remove incomplete outputs and orphan files (dry run unless --yes)",
        "verify": "re-hash every committed file of the store against its manifest",
    }
    ps = {name: sub.add_parser(name, help=h, description=h) for name, h in helps.items()}
    for name in ("run", "generate", "filter", "train", "bench", "report"):
        _common(ps[name])
    ps["bench"].add_argument("--draft", default=None,
                             help="benchmark this draft instead: our export, a folder saved by "
                                  "the DFlash reference class, or a hub id / hub layout")
    ps["bench"].add_argument("--target", default=None, help="target model ref for --draft")
    ps["bench"].add_argument("--rerun", action="store_true",
                             help="benchmark again even if this hardware has a result")
    ps["query"].add_argument("sql", help='e.g. "select * from benchmarks"')
    ps["query"].add_argument("--format", choices=("table", "csv", "json"), default="table")
    _common(ps["query"], config=False)
    _common(ps["hardware"], config=False)
    _common(ps["ls"], config=False)
    _common(ps["gc"], config=False)
    ps["gc"].add_argument("--yes", action="store_true", help="really delete")
    ps["gc"].add_argument("--adopt-history", action="store_true",
                          help="once, for a history written before run records: commit every "
                               "run that has both its samples and summary files")
    _common(ps["verify"], config=False)
    ps["verify"].add_argument("--stage", default=None,
                              help="only this stage (generate, filter, ..., or a store folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    handler = HANDLERS[args.command]
    try:
        handler(args)
    except DflashError as e:
        if args.debug:
            raise
        msg = mask_url(str(e))
        if "Traceback (most recent call last)" in msg and e.__cause__ is not None:
            msg = msg.split("Traceback", 1)[0] + one_line(e.__cause__)  # a task's remote error
        print(f"dflash {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dflash {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line by default, the traceback with --debug
        if args.debug:
            raise
        if _environment_error(e):  # a damaged file or a failing store: the cause, one line
            print(f"dflash {args.command}: failed: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"dflash {args.command}: failed: {type(e).__name__}: {one_line(e)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def _environment_error(e: BaseException) -> bool:
    """Errors of the environment rather than of the code: an unreadable safetensors file, an S3
    or network failure that outlived the retries."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"SafetensorError", "ClientError", "BotoCoreError", "ConnectionError",
                         "TimeoutError"}) or (isinstance(e, OSError) and "s3" in repr(e).lower())


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "botocore", "s3fs", "urllib3", "aiobotocore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Prefect's ephemeral server gets 20 s to start by default: too little on a loaded 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines


# ---------------------------------------------------------------------------- commands
def _store(args: argparse.Namespace):
    from storage import Store

    return Store(args.store)


def cmd_hardware(args: argparse.Namespace) -> None:
    from storage.hardware import hardware_fingerprint, hardware_info, hardware_tag

    info = dict(hardware_info())
    info["tag"] = hardware_tag(info)
    info["fingerprint"] = hardware_fingerprint(info)
    print(json.dumps(info, indent=2))


def cmd_query(args: argparse.Namespace) -> None:
    import duckdb

    from storage.catalog import connect

    store = _store(args)
    con = connect(store)
    try:
        rel = con.execute(args.sql)
    except duckdb.Error as e:
        views = [r[0] for r in con.execute(
            "select view_name from duckdb_views() where not internal and view_name not like '\_%' escape '\\' order by 1").fetchall()]
        first = str(e).strip().splitlines()[0]
        raise DflashError(f"query failed: {first} (views in {store.url}: "
                          f"{', '.join(views) or 'none yet'})") from None
    cols = [d[0] for d in rel.description] if rel.description else []
    rows = rel.fetchall()
    emit_rows(cols, rows, args.format)


def emit_rows(cols: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    """Print rows as a table, CSV, or a JSON array of objects (stdout holds only the data)."""
    if fmt == "json":
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=_json_default))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(*cols, show_lines=False)
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        Console(width=max(120, min(300, 40 * len(cols)))).print(t)
        print(f"{len(rows)} row(s)", file=sys.stderr)


def _json_default(v: Any) -> Any:
    import datetime
    import decimal

    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    return str(v)


def cmd_ls(args: argparse.Namespace) -> None:
    from storage.manifest import list_outputs

    rows = [(o["stage"], o["key"], o["status"], o["files"], _human(o["bytes"]))
            for o in list_outputs(_store(args))]
    emit_rows(["stage", "key", "status", "files", "size"], rows, "table")


def cmd_gc(args: argparse.Namespace) -> None:
    from storage.gc import collect

    store = _store(args)
    if args.adopt_history:
        from storage.history import adopt_legacy

        adopted = adopt_legacy(store)
        print(f"adopted {len(adopted)} benchmark run(s) written before run records",
              file=sys.stderr)
    victims = collect(store, delete=args.yes)
    verb = "removed" if args.yes else "would remove"
    for v in victims:
        did = ("moved aside" if args.yes else "would move aside") if v.get("aside") else verb
        print(f"{did} {store.uri(v['path'])} ({v['reason']}, {_human(v['bytes'])})")
    total = sum(v["bytes"] for v in victims)
    tail = "" if args.yes or not victims else "; rerun with --yes to delete"
    print(f"{verb} {len(victims)} item(s), {_human(total)}{tail}", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> None:
    """One line per bad file; exit 2 (via DflashError) if any file does not match."""
    from storage.errors import FORCE_STAGE
    from storage.history import leftovers
    from storage.verify import verify_store

    stage = args.stage
    by_cli = {v: k for k, v in FORCE_STAGE.items() if k != "features"}
    known = sorted({*FORCE_STAGE, *by_cli, "benchmarks"})
    if stage and stage not in known:
        raise DflashError(f"verify --stage {stage}: unknown stage; choose from {', '.join(known)}")
    store = _store(args)
    folder = by_cli.get(stage, stage) if stage else None
    problems, n_files, n_bytes = verify_store(store, folder)
    for p in problems:
        print(p.line())
    if folder in (None, "benchmarks", "bench_runs"):
        for rel in leftovers(store):
            print(f"{store.uri(rel)}: uncommitted benchmark run file (not read; `dflash gc --yes` "
                  "moves it aside)", file=sys.stderr)
    if problems:
        raise DflashError(f"verify: {len(problems)} bad file(s) of {n_files} in {store.url}; "
                          "rebuild the named stage with `dflash run --force STAGE` (a corrupt "
                          "manifest: `dflash gc --yes`, then rerun)")
    print(f"verify: {n_files} file(s), {_human(n_bytes)}: all match their manifests",
          file=sys.stderr)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pipeline(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from flows.pipeline import run_from_cli

        run_from_cli(stage, args)

    return run


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "hardware": cmd_hardware, "query": cmd_query, "ls": cmd_ls, "gc": cmd_gc, "verify": cmd_verify,
    "run": _pipeline("run"), "generate": _pipeline("generate"), "filter": _pipeline("filter"),
    "train": _pipeline("train"), "bench": _pipeline("bench"), "report": _pipeline("report"),
}

if __name__ == "__main__":
    sys.exit(main())
