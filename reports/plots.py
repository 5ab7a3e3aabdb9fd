"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, safe in workers).

Each function takes plain row dicts (as DuckDB returns them through Arrow) and returns the PNG, or
None when there is nothing to draw, so the report can put a note in the figure's place instead of
an empty axis. Functions never query the store: the report decides which rows a figure shows.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Row = Mapping[str, Any]
METHOD_ORDER = ("hf_generate", "ar", "dflash", "classic", "hf_assisted", "prompt_lookup")
DATASET_ORDER = ("mt_bench", "humaneval", "eval_split")
DPI = 100


def num(v: Any) -> float | None:
    """A finite float or None: NULLs, NaNs and strings never reach a plot or a table."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def variant(row: Row) -> str:
    """One name per comparable configuration: ``dflash b8``, ``classic T=1``, ``ar``."""
    name = str(row.get("method") or "?")
    block = num(row.get("block_size"))
    if block is not None:
        name += f" b{int(block)}"
    vocab = num(row.get("draft_vocab"))  # a reduced draft vocabulary; its full-vocab row has none
    if vocab is not None:
        name += f" V{int(vocab)}"
    t = num(row.get("temperature"))
    if t:
        name += f" T={t:g}"
    return name


def variant_sort_key(name: str) -> tuple[int, str]:
    method = name.split(" ", 1)[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    block = name.split(" b", 1)[1].split(" ", 1)[0] if " b" in name else ""
    return rank, f"{block:>6}{name}"


def dataset_sort_key(name: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def as_datetime(v: Any) -> datetime | None:
    """created_at arrives as a timestamp, a date or an ISO string depending on the writer."""
    if isinstance(v, datetime):
        return v.replace(tzinfo=None)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    if isinstance(v, str) and v:
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).replace(tzinfo=None)
        except ValueError:
            return None
    return None


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Sequence[str],
                  value: Mapping[tuple[str, str], float | None]) -> None:
    """Bars at x = group, one colour per series; missing cells are left out, not drawn as 0."""
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        xs, ys = [], []
        for g_i, g in enumerate(groups):
            v = value.get((g, s))
            if v is not None:
                xs.append(g_i - 0.4 + width * (i + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width=width, label=s)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 4 else 0)
    if series:
        ax.legend(fontsize=8, ncol=2 if len(series) > 4 else 1)


# ---------------------------------------------------------------------- figures
def per_position_acceptance(rows: Sequence[Row]) -> bytes | None:
    """DFlash acceptance at each block position, one line per block size (mean over datasets).

    Early positions matter most: a miss at position k ends the accepted prefix, so this shows
    where in the block the draft loses the target."""
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for r in rows:
        accs = r.get("per_position_acceptance")
        if r.get("method") != "dflash" or not accs:
            continue
        curves[variant(r)].append([num(a) or 0.0 for a in accs])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted(curves, key=variant_sort_key):
        lists = curves[name]
        n = max(len(c) for c in lists)
        ys = [mean(c[i] if i < len(c) else None for c in lists) or 0.0 for i in range(n)]
        ax.plot(range(1, n + 1), ys, marker="o", label=name)
    ax.set(xlabel="position in block (drafted token)", ylabel="acceptance rate", ylim=(0, 1.05),
           title="DFlash per-position acceptance (mean over datasets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def tau_by_dataset(rows: Sequence[Row]) -> bytes | None:
    """tau (tokens per target pass, bonus included) per dataset, one bar per method variant."""
    return _metric_by_dataset(rows, "tau", "tau (tokens per target pass)",
                              "Acceptance length by dataset and method", baseline=1.0)


def speedup_by_method(rows: Sequence[Row]) -> bytes | None:
    """Speedup over ``generate()`` per method variant, one bar per dataset; 1.0 is break-even."""
    value: dict[tuple[str, str], float | None] = {}
    for r in rows:
        value[(variant(r), str(r.get("dataset")))] = num(r.get("speedup"))
    value = {k: v for k, v in value.items() if v is not None}
    if not value:
        return None
    groups = sorted({k[0] for k in value}, key=variant_sort_key)
    series = sorted({k[1] for k in value}, key=dataset_sort_key)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(groups)), 4))
    _grouped_bars(ax, groups, series, value)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set(ylabel="speedup vs generate()", title="Speedup by method (per dataset)")
    return _png(fig)


def _metric_by_dataset(rows: Sequence[Row], metric: str, ylabel: str, title: str,
                       baseline: float | None = None) -> bytes | None:
    value = {(str(r.get("dataset")), variant(r)): num(r.get(metric)) for r in rows}
    value = {k: v for k, v in value.items() if v is not None}
    if not value:
        return None
    groups = sorted({k[0] for k in value}, key=dataset_sort_key)
    series = sorted({k[1] for k in value}, key=variant_sort_key)
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(groups) * len(series)), 4))
    _grouped_bars(ax, groups, series, value)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=0.8, ls="--")
    ax.set(ylabel=ylabel, title=title)
    return _png(fig)


def training_curves(rows: Sequence[Row]) -> bytes | None:
    """Loss (train and eval) and tau_sim against step: tau_sim, not loss, picks the checkpoint."""
    pts = sorted((r for r in rows if num(r.get("step")) is not None), key=lambda r: num(r["step"]))
    series = {n: [(num(r["step"]), num(r.get(n))) for r in pts if num(r.get(n)) is not None]
              for n in ("loss", "eval_loss", "tau_sim")}
    if not any(series.values()):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in (("loss", "-"), ("eval_loss", "o-")):
        if series[name]:
            ax1.plot(*zip(*series[name], strict=True), style, label=name, ms=4)
    ax1.set(xlabel="step", ylabel="loss", title="Training loss")
    ax1.grid(alpha=0.3)
    if series["loss"] or series["eval_loss"]:
        ax1.legend(fontsize=8)
    if series["tau_sim"]:
        ax2.plot(*zip(*series["tau_sim"], strict=True), "o-", color="tab:green", ms=4)
    else:
        ax2.text(0.5, 0.5, "no tau_sim logged", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(xlabel="step", ylabel="tau_sim", title="Simulated acceptance length (eval)")
    ax2.grid(alpha=0.3)
    return _png(fig)


def cross_hardware(rows: Sequence[Row]) -> bytes | None:
    """tau and speedup per hardware tag for the same method variants (mean over datasets).

    Rows are the latest run per hardware tag. The same draft should reach about the same tau
    everywhere; speedup differs with what each pass costs on each device."""
    acc: dict[tuple[str, str], dict[str, list[float | None]]] = defaultdict(
        lambda: {"tau": [], "speedup": []})
    for r in rows:
        cell = acc[(variant(r), str(r.get("hw") or "?"))]
        cell["tau"].append(num(r.get("tau")))
        cell["speedup"].append(num(r.get("speedup")))
    if not acc:
        return None
    groups = sorted({k[0] for k in acc}, key=variant_sort_key)
    series = sorted({k[1] for k in acc})
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(groups)), 4))
    for ax, metric, base in ((axes[0], "tau", 1.0), (axes[1], "speedup", 1.0)):
        value = {k: mean(v[metric]) for k, v in acc.items()}
        _grouped_bars(ax, groups, series, value)
        ax.axhline(base, color="black", lw=0.8, ls="--")
        ax.set(ylabel=metric, title=f"{metric} by hardware (latest run per tag)")
    return _png(fig)


def speedup_trend(rows: Sequence[Row]) -> bytes | None:
    """Speedup per run over time, one line per (method variant, hardware tag).

    Rows: the benchmark history (``run_id``, ``created_at``, ``hw``, ``speedup``); each run's
    speedup is its mean over datasets. ``hf_generate`` (1.0 by definition) is left out."""
    runs: dict[tuple[str, str], dict[str, list[Any]]] = defaultdict(lambda: {"t": [], "sp": []})
    for r in rows:
        if r.get("method") != "hf_generate":
            cell = runs[(f"{variant(r)} @ {r.get('hw') or '?'}", str(r.get("run_id")))]
            cell["t"].append(as_datetime(r.get("created_at")))
            cell["sp"].append(num(r.get("speedup")))
    lines: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for (name, _run), cell in runs.items():
        t, sp = max((t for t in cell["t"] if t), default=None), mean(cell["sp"])
        if t is not None and sp is not None:
            lines[name].append((t, sp))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in sorted(lines):
        pts = sorted(lines[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, ms=4)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set(ylabel="speedup vs generate()", title="Speedup over time (this store's history)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _png(fig)
