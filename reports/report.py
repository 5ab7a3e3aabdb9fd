"""The run report: one self-contained HTML page plus markdown, built from the store alone.

From the store alone because ``dflash report`` must rebuild it wherever the store can be read (a
laptop reading the S3 history of GPU runs), with no model, config or live run: every number comes
from DuckDB views over committed outputs and the append-only benchmark history. The report is a
stage output, ``reports/<key>/``, committed atomically; its key hashes the benchmark run, the
train/filter manifests and this package's code, so only a changed input rebuilds it. Anything
missing (no benchmark yet, older columns, no training) becomes a note, never an exception.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from reports import plots
from reports.plots import dataset_sort_key, mean, num, variant, variant_sort_key
from reports.speedup_model import cost_breakdown, explain_gap, implied_step_cost, pass_costs
from storage.catalog import committed_manifests, connect
from storage.errors import ConfigError
from storage.keys import KEY_LEN, digest
from storage.manifest import Manifest, StageOutput
from storage.store import Store

log = logging.getLogger("dflash")
STAGE = "reports"
HERE = Path(__file__).resolve().parent
REFERENCE_CSV = HERE / "data" / "reference_results.csv"
#: run method -> (published method it is compared with, how that comparison is labelled)
REFERENCE_FOR = {"dflash": ("dflash", "published DFlash"),
                 "classic": ("eagle3", "published EAGLE-3, nearest autoregressive-draft analogue")}
ESSENTIAL = ("run_id", "method", "dataset", "tau", "speedup", "created_at")


# ---------------------------------------------------------------------- reference data
def load_reference(path: Path = REFERENCE_CSV) -> list[dict[str, Any]]:
    """The published table (dflash-method.md section 3) with numeric columns as floats."""
    with open(path, newline="") as f:
        return [{**r, **{k: float(r[k]) for k in ("temperature", "speedup", "tau")}}
                for r in csv.DictReader(f)]


# ---------------------------------------------------------------------- document model
@dataclass
class Section:
    """A titled list of blocks that renders to both HTML and markdown."""

    id: str
    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def p(self, text: str, kind: str = "p") -> None:
        self.blocks.append((kind, text))

    def note(self, text: str) -> None:
        self.p(text, "note")

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", headers, [[_cell(c) for c in r] for r in rows]))

    def image(self, images: dict[str, bytes], name: str, png: bytes | None, alt: str,
              missing: str) -> None:
        if png is None:
            return self.note(missing)
        images[name] = png
        self.blocks.append(("img", name, alt))


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def _pct(v: Any) -> str:
    f = num(v)
    return "–" if f is None else f"{100 * f:.1f}%"


# ---------------------------------------------------------------------- queries
def _columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: tuple[Any, ...] = ()) -> list[dict]:
    cur = con.execute(sql, list(params))
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@dataclass
class Data:
    """Everything the report shows, read once; ``notes`` says what is missing and why."""

    run_id: str | None = None
    run: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    filters: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _latest_run(con: duckdb.DuckDBPyConnection, views: set[str],
                run_id: str | None) -> tuple[str | None, int]:
    """(the run to report, default the newest; how many runs the history holds)."""
    if "benchmarks" not in views:
        if run_id:
            raise ConfigError(f"run {run_id}: this store has no benchmark history")
        return None, 0
    order = "max(created_at)" if "created_at" in _columns(con, "benchmarks") else "max(run_id)"
    runs = [str(r[0]) for r in con.execute(f"SELECT run_id FROM benchmarks GROUP BY run_id "
                                           f"ORDER BY {order} DESC, run_id DESC").fetchall()]
    if run_id is not None and run_id not in runs:
        raise ConfigError(f"run {run_id} is not in the benchmark history; recent runs: "
                          f"{', '.join(runs[:5]) or 'none'}")
    return run_id or (runs[0] if runs else None), len(runs)


def _gather(con: duckdb.DuckDBPyConnection, views: set[str], run_id: str | None,
            train_m: Manifest | None, filter_m: Manifest | None) -> Data:
    d = Data(run_id=run_id)
    if run_id is None:
        d.notes.append("No benchmark results in this store yet (benchmarks/summary is empty): "
                       "run `dflash bench`. Benchmark, reference and hardware sections are empty.")
    else:
        cols = _columns(con, "benchmarks")
        lost = [c for c in ESSENTIAL if c not in cols]
        if lost:
            d.notes.append(f"The benchmark history lacks columns {', '.join(lost)}: figures that "
                           "need them are left out.")
        d.history = _rows(con, "SELECT * FROM benchmarks")  # rows are read with .get: any
        for r in d.history:  # column may be missing. hw: the hive tag, else what names the machine
            r["hw"] = next((str(r[k]) for k in ("hw", "gpu_name", "cpu_model",
                                                "hardware_fingerprint") if r.get(k)), "unknown")
            r["temperature"] = num(r.get("temperature")) or 0.0
        d.run = [r for r in d.history if str(r.get("run_id")) == run_id]
        d.samples = _samples(con, views, run_id, d.notes)
    for table, m, attr in (("train_metrics", train_m, "train"),
                           ("filter_stats", filter_m, "filters")):
        if m is None or table not in views:
            d.notes.append(f"No committed `{table}` table in this store: that section is empty.")
            continue
        try:
            order = "ORDER BY step" if "step" in _columns(con, table) else ""
            setattr(d, attr, _rows(con, f"SELECT * FROM {table} WHERE output_key = ? {order}",
                                   (m.key,)))
        except duckdb.Error as e:
            d.notes.append(f"`{table}` could not be read: {str(e).splitlines()[0]}")
    return d


def _samples(con: duckdb.DuckDBPyConnection, views: set[str], run_id: str,
             notes: list[str]) -> list[dict[str, Any]]:
    """Per-sample cross-check of tau: mean accepted length per step, from the raw generations."""
    if "benchmark_samples" not in views:
        notes.append("No per-sample rows (benchmarks/samples) for this store.")
        return []
    try:
        return _rows(con, "SELECT method, dataset, temperature, block_size, count(*) AS samples, "
                          "avg(len(output_ids)) AS mean_new_tokens, sum(list_sum(accepted_lengths))"
                          " / nullif(sum(len(accepted_lengths)), 0) AS mean_accepted_per_step "
                          "FROM benchmark_samples WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
                     (run_id,))
    except duckdb.Error as e:  # an older or partial samples schema: say so, keep the report
        notes.append(f"benchmark_samples could not be summarised: {str(e).splitlines()[0]}")
        return []


# ---------------------------------------------------------------------- sections
def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (dataset_sort_key(str(r.get("dataset"))),
                                       variant_sort_key(variant(r))))


def _results_section(d: Data, images: dict[str, bytes]) -> Section:
    s = Section("results", "Results: methods × datasets")
    if not d.run:
        s.note("No benchmark run to show.")
        return s
    s.table(["method", "dataset", "prompts", "tau", "accept rate", "speedup", "tokens/s",
             "TTFT p50", "TPOT p50", "latency p50", "latency p95", "exact match", "1st div."],
            [[variant(r), r.get("dataset"), r.get("n_prompts"), num(r.get("tau")),
              _pct(r.get("acceptance_rate")), num(r.get("speedup")), num(r.get("tokens_per_s")),
              num(r.get("ttft_p50")), num(r.get("tpot_p50")), num(r.get("latency_p50")),
              num(r.get("latency_p95")), _pct(r.get("exact_match_rate")),
              num(r.get("mean_first_divergence"))] for r in _ordered(d.run)])
    for r in d.run:  # the lossless audit at T=0: every divergence deserves a look
        em = num(r.get("exact_match_rate"))
        if r["temperature"] or em is None or em >= 1.0:
            continue
        s.note(f"Lossless audit: {variant(r)} on {r.get('dataset')} matches greedy `generate()` "
               f"on {_pct(r.get('exact_match_rate'))} of prompts ({r.get('n_divergences') or '?'} "
               "divergences); see each divergence's logit margin in the benchmark log.")
    s.p("tau = tokens emitted per target verification pass, bonus token included (1 for plain "
        "decoding). Speedup = decode tokens/s over transformers' greedy `generate()` on the same "
        "prompts, same run, same hardware, batch 1.")
    s.image(images, "tau_by_dataset.png", plots.tau_by_dataset(d.run), "tau by dataset and method",
            "No tau values to plot.")
    s.image(images, "speedup_by_method.png", plots.speedup_by_method(d.run), "speedup by method",
            "No speedup values to plot.")
    pp = [r for r in d.run if not r["temperature"]] or d.run
    s.image(images, "per_position_acceptance.png", plots.per_position_acceptance(pp),
            "DFlash per-position acceptance", "No DFlash per-position acceptance in this run.")
    if d.samples:
        s.p("Per-sample check (benchmark_samples): mean accepted length per step should match tau.")
        s.table(list(d.samples[0]), [list(r.values()) for r in d.samples])
    return s


def _reference_section(d: Data, ref: list[dict[str, Any]]) -> tuple[Section, list[str]]:
    s = Section("reference", "Beside the published DFlash and EAGLE-3 numbers")
    datasets = sorted({r["dataset"] for r in ref}, key=dataset_sort_key)
    pivot: dict[tuple[str, float], dict[str, str]] = defaultdict(dict)
    for r in ref:
        cell = f"{r['speedup']:.2f}x / {r['tau']:.2f}"
        pivot[(r["method"], r["temperature"])][r["dataset"]] = cell
    s.p(f"Published (speedup / tau), {ref[0]['target']} on {ref[0]['hardware']}, "
        f"{ref[0]['source'].split(':')[0]}; transformers backend, batch 1.")
    s.table(["draft", "T", *datasets], [[m, t, *(cells.get(ds, "–") for ds in datasets)]
                                        for (m, t), cells in pivot.items()])
    gaps, bullets = [], []
    for r in _ordered(d.run):
        m = REFERENCE_FOR.get(str(r.get("method")))
        match = [x for x in ref if m and x["method"] == m[0] and x["dataset"] == r.get("dataset")
                 and abs(x["temperature"] - r["temperature"]) < 1e-6]
        if not match:
            continue
        g = explain_gap(r, match[0], label=f"{m[1]}, {match[0]['hardware']}")
        if g is not None:
            gaps.append((r, g))
    if not gaps:
        s.note("No row of this run has a published counterpart (same method family, dataset and "
               "temperature; published datasets: " + ", ".join(datasets) + ").")
        return s, bullets
    target = d.run[0].get("target") or "this target"
    s.p(f"This run: {target} on {d.run[0]['hw']}. The targets and hardware differ, so raw "
        "speedups are not comparable; the speedup model splits each gap into acceptance "
        "(tau: the draft) and step cost (tau/speedup in baseline steps: the hardware).")
    s.table(["method", "dataset", "T", "tau", "ref tau", "speedup", "ref speedup", "step cost",
             "ref step cost", "tau factor", "cost factor", "cause"],
            [[variant(r), r.get("dataset"), r["temperature"], g.tau, g.ref_tau, g.speedup,
              g.ref_speedup, g.step_cost, g.ref_step_cost, g.tau_factor, g.cost_factor, g.verdict]
             for r, g in gaps])
    for r, g in gaps:
        s.p(f"**{variant(r)} / {r.get('dataset')}**: {g.text}")
        bullets.append(f"- {variant(r)} / {r.get('dataset')}: {g.speedup:.2f}x vs "
                       f"{g.ref_speedup:.2f}x ({g.label}) — cause: {g.verdict} (tau {g.tau:.2f} "
                       f"vs {g.ref_tau:.2f})")
    return s, bullets


def _model_section(d: Data) -> Section:
    s = Section("speedup-model", "Speedup model: acceptance or hardware?")
    s.p("speedup ≈ tau × t_ar_step / (t_draft + t_verify) = tau / (1 + c_draft + c_verify_extra): "
        "a step emits tau tokens for one draft pass and one verify pass. The step cost in plain "
        "steps is also the tau needed to break even. Classic drafts: E = (1 − a^(k+1)) / (1 − a) "
        "tokens per pass and speedup E / (k·c + 1) (Leviathan et al. 2023).")
    rows = [r for r in _ordered(d.run) if r.get("method") not in ("hf_generate", "ar")]
    if not rows:
        s.note("No speculative rows in this run to model.")
        return s
    if not any(pass_costs(r) for r in rows):
        if any(r.get("verify_pass_s") is not None for r in rows):
            s.note("This run has no `ar` row, so no plain step time (ar_step_s) to measure pass "
                   "costs against; the model uses only the implied step cost tau/speedup. Add "
                   "`ar` to the benchmark's methods to split the cost into draft and verify.")
        else:
            s.note("This benchmark recorded no measured pass costs (draft_pass_s, verify_pass_s, "
                   "ar_step_s), so the model uses only the implied step cost tau/speedup; rerun "
                   "the benchmark with pass timing to split the cost into draft and verify.")
    ar = {(r.get("dataset"), r["temperature"]): num(r.get("speedup")) for r in d.run
          if r.get("method") == "ar"}
    cbs = [(r, cost_breakdown(r, ar.get((r.get("dataset"), r["temperature"])))) for r in rows]
    s.table(["method", "dataset", "tau", "speedup", "step cost (tau/speedup)", "c_draft",
             "c_verify", "break-even tau", "model vs AR", "measured vs AR", "measured/model"],
            [[variant(r), r.get("dataset"), num(r.get("tau")), num(r.get("speedup")),
              implied_step_cost(r), *cb.values()] for r, cb in cbs])
    return s


def _hardware_section(d: Data, images: dict[str, bytes]) -> Section:
    s = Section("hardware", "This store's history on other hardware")
    if not d.run:
        s.note("No benchmark history.")
        return s
    hw = d.run[0]["hw"]
    run_cells = {(variant(r), r.get("dataset")): r for r in d.run
                 if r.get("method") not in ("hf_generate", "ar")}  # baselines: tau 1 everywhere
    latest: dict[str, tuple[Any, str]] = {}  # other hw -> (created_at, run_id) of its newest run
    for r in d.history:
        if r["hw"] != hw and (variant(r), r.get("dataset")) in run_cells:
            key = (str(r.get("created_at")), str(r.get("run_id")))
            if r["hw"] not in latest or key > latest[r["hw"]]:
                latest[r["hw"]] = key
    others = [r for r in d.history if r["hw"] in latest
              and str(r.get("run_id")) == latest[r["hw"]][1]
              and (variant(r), r.get("dataset")) in run_cells]
    if not others:
        s.note(f"Only {hw} appears in this store's history for these methods: benchmark the same "
               "draft on another machine (the benchmark-only deployment) to compare.")
    else:
        table = []
        for o in _ordered(others):
            r = run_cells[(variant(o), o.get("dataset"))]
            g = explain_gap(r, o, label=f"{o['hw']}")
            table.append([variant(o), o.get("dataset"), o["hw"], num(o.get("tau")),
                          num(r.get("tau")), num(o.get("speedup")), num(r.get("speedup")),
                          *((g.tau_factor, g.cost_factor, g.verdict) if g else (None, None, "–"))])
        s.p(f"Latest run of each other hardware tag beside this run ({hw}). The same draft should "
            "reach about the same tau everywhere; a speedup difference with equal tau is the "
            "hardware's pass cost. Factors: tau there/here and step cost here/there.")
        s.table(["method", "dataset", "hardware", "tau there", "tau here", "speedup there",
                 "speedup here", "tau factor", "cost factor", "cause of the gap here"], table)
    s.image(images, "cross_hardware.png", plots.cross_hardware(
        [*(r for r in d.run if (variant(r), r.get("dataset")) in run_cells), *others]),
            "tau and speedup by hardware", "Nothing to compare across hardware.")
    if len({r.get("run_id") for r in d.history}) < 2:
        s.note("One run in the history so far: the speedup trend needs at least two.")
    s.image(images, "speedup_trend.png", plots.speedup_trend(d.history), "speedup over time",
            "No dated speedup rows for a trend.")
    return s


def _training_section(d: Data, images: dict[str, bytes]) -> Section:
    s = Section("training", "Training")
    if not d.train:
        s.note("No training metrics in this store.")
        return s
    t = d.train
    losses = [r for r in t if num(r.get("loss")) is not None]
    evals = [r for r in t if num(r.get("eval_loss")) is not None]
    taus = [r for r in t if num(r.get("tau_sim")) is not None]
    best = max(taus, key=lambda r: num(r["tau_sim"])) if taus else None
    acc_col = next((k for k, v in t[-1].items() if "acc" in k and isinstance(v, list)), None)
    acc = next((r.get(acc_col) for r in reversed(taus) if acc_col and r.get(acc_col)), None)
    s.table(["output", "steps", "epochs", "final loss", "best eval loss", "final tau_sim",
             "best tau_sim (step)", "tokens/s", "per-position acc (last eval)"],
            [[t[-1].get("output_key"), t[-1].get("step"), t[-1].get("epoch"),
              num(losses[-1]["loss"]) if losses else None,
              min(num(r["eval_loss"]) for r in evals) if evals else None,
              num(taus[-1]["tau_sim"]) if taus else None,
              f"{num(best['tau_sim']):.2f} ({best.get('step')})" if best else None,
              mean(num(r.get("tokens_per_s")) for r in t),
              " ".join(f"{a:.2f}" for a in acc) if acc else None]])
    s.image(images, "training_curves.png", plots.training_curves(t), "training curves",
            "No loss or tau_sim values to plot.")
    return s


def _filter_section(d: Data) -> Section:
    s = Section("filter", "Data filtering")
    if not d.filters:
        s.note("No filter statistics in this store.")
        return s
    cols = [c for c in ("step", "rule", "rows_in", "rows_removed", "rows_out", "tokens_out")
            if c in d.filters[0]]
    s.p(f"Rules in order (output {d.filters[0].get('output_key')}): rows in, removed by each "
        "rule, rows and tokens left.")
    s.table(cols, [[r.get(c) for c in cols] for r in d.filters])
    return s


# ---------------------------------------------------------------------- rendering
CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:.8em 0;font-size:.85em}td,th{border:1px solid #ccc;"
       "padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child"
       "{text-align:left}.note{background:#fff6d6;padding:.5em}img{max-width:100%;margin:.8em 0}")


def _html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    for s in sections:
        out.append(f"<section id='{s.id}'><h2>{e(s.title)}</h2>")
        for b in s.blocks:
            if b[0] in ("p", "note"):
                out.append(f"<p class='{b[0]}'>{e(b[1]).replace('**', '')}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                               for row in b[2])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            elif b[0] == "img":
                data = base64.b64encode(images[b[1]]).decode()
                out.append(f"<img alt='{e(b[2])}' src='data:image/png;base64,{data}'>")
        out.append("</section>")
    return "".join(out) + "</body></html>\n"


def _md(blocks: list[tuple[Any, ...]]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if b[0] == "table":
            out += [_md_row(b[1]), _md_row(["---"] * len(b[1])), *map(_md_row, b[2]), ""]
        else:
            fmt = {"p": "{}", "note": "> **Note:** {}", "img": "![{1}]({0})"}[b[0]]
            out += [fmt.format(*b[1:]), ""]
    return out


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _summary_section(d: Data, bullets: list[str]) -> Section:
    """The run in one table, its gaps to the published numbers, and what is missing."""
    s = Section("summary", "Summary")
    if d.run:
        r0 = d.run[0]
        s.p(f"Run {d.run_id} on {r0['hw']}: target {r0.get('target') or '?'}, draft "
            f"{str(r0.get('dflash_digest') or r0.get('draft_digest') or 'none')[:12]}, "
            f"{len(d.run)} result rows.")
        s.table(["method", "dataset", "tau", "speedup", "tokens/s", "exact match"],
                [[variant(r), r.get("dataset"), num(r.get("tau")), num(r.get("speedup")),
                  num(r.get("tokens_per_s")), _pct(r.get("exact_match_rate"))]
                 for r in _ordered(d.run) if r.get("method") != "hf_generate"])
    for b in bullets:
        s.p(b)
    for n in d.notes:
        s.note(n)
    return s


# ---------------------------------------------------------------------- entry point
def report_code() -> str:
    """Fingerprint of the report's own code and reference data: a changed report is rebuilt."""
    h = hashlib.sha256()
    for p in sorted([*HERE.glob("*.py"), REFERENCE_CSV]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def build_report(store: Store | str, run_id: str | None = None, *,
                 force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the report for ``run_id`` (default: the latest benchmark run).

    Returns ``{"uri", "markdown_uri", "key", "run_id", "summary_markdown", "images", "notes",
    "cached"}``; ``uri`` is the HTML page in the store."""
    store = store if isinstance(store, Store) else Store(store)
    con = connect(store)
    try:
        views = {r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        run_id, n_runs = _latest_run(con, views, run_id)
        manifests = committed_manifests(store)
        train_m, filter_m = (max((m for m in manifests if m.files_for(t)), default=None,
                                 key=lambda m: m.created_at)
                             for t in ("train_metrics", "filter_stats"))
        code = report_code()
        inputs = {"benchmark_run": run_id or "none", "history_runs": str(n_runs),  # new history
                  "train": train_m.digest if train_m else "none",  # on other hardware counts
                  "filter": filter_m.digest if filter_m else "none"}
        key = digest({"stage": STAGE, "inputs": inputs, "code": code})[:KEY_LEN]
        if force:
            store.rm(f"{STAGE}/{key}", recursive=True)
        with StageOutput(store, STAGE, key, config={"run_id": run_id}, inputs=inputs,
                         code_fingerprint=code,
                         hardware={"device_type": "none", "note": "built from the store"}) as out:
            cached = out.manifest is not None
            if out.manifest is None:
                d = _gather(con, views, run_id, train_m, filter_m)
                _write(store, out, d, key)
            manifest = out.manifest
            assert manifest is not None
    finally:
        con.close()
    extra = manifest.extra
    log.info("report: %s %s", "cached" if cached else "built", store.uri(f"{STAGE}/{key}"))
    return {"uri": store.uri(f"{STAGE}/{key}/report.html"),
            "markdown_uri": store.uri(f"{STAGE}/{key}/report.md"), "key": key,
            "run_id": extra.get("run_id"), "summary_markdown": extra.get("summary_markdown", ""),
            "images": extra.get("images", []), "notes": extra.get("notes", []), "cached": cached}


def _write(store: Store, out: StageOutput, d: Data, key: str) -> None:
    images: dict[str, bytes] = {}
    ref_section, bullets = _reference_section(d, load_reference())
    sections = [_results_section(d, images), ref_section, _model_section(d),
                _hardware_section(d, images), _training_section(d, images), _filter_section(d)]
    title = f"DFlash report: run {d.run_id}" if d.run_id else "DFlash report: no benchmark yet"
    summary_section = _summary_section(d, bullets)
    sections.insert(0, summary_section)
    summary = "\n".join([f"### {title}", "", *_md(summary_section.blocks),
                         f"Full report: {store.uri(f'{STAGE}/{key}/report.html')}", ""])
    for name, png in images.items():
        out.write_bytes(name, png)
    md = [f"# {title}", "", *(x for s in sections for x in (f"## {s.title}", "", *_md(s.blocks)))]
    out.write_bytes("report.md", "\n".join(md).encode())
    out.write_bytes("summary.md", summary.encode())
    out.write_bytes("report.html", _html(title, sections, images).encode())
    out.commit(extra={"run_id": d.run_id, "summary_markdown": summary, "notes": d.notes,
                      "images": sorted(images)})
