"""Progress for long loops: a terminal bar, throttled log lines, and an orchestrator's progress view.

``tasks/`` never imports Prefect: the orchestrator (``flows/``) installs ``RunHooks`` with
``set_run_hooks``. Inside a run the bar is replaced by the hooks' progress artifact (users complain
that bars flood run logs); outside, a rich bar on stderr. Log lines are throttled to one per
``log_every_s``. The hooks also give the run's identity (``labels``) for the benchmark history.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("dflash")


class RunHooks:
    """What a stage may ask of the orchestrator running it. The defaults: no orchestrator."""

    def in_run(self) -> bool:
        return False

    def progress_start(self, key: str | None, description: str) -> Any:
        """A handle for ``progress_update``, or None when there is nothing to show."""
        return None

    def progress_update(self, handle: Any, percent: float, description: str) -> None:
        return None

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        return None

    def labels(self) -> dict[str, str | None]:
        """The run's identity recorded next to results (``flow_run_id``, ``deployment``)."""
        return {"flow_run_id": None, "deployment": None}


_hooks = RunHooks()


def set_run_hooks(hooks: RunHooks) -> None:
    global _hooks
    _hooks = hooks


def run_hooks() -> RunHooks:
    return _hooks


class Progress:
    """``with Progress("generate", total=rows, unit="rows") as p: p.advance(n, tokens=t)``."""

    def __init__(self, name: str, total: int, unit: str = "items", log_every_s: float = 10.0,
                 artifact_key: str | None = None, enabled: bool = True) -> None:
        self.name, self.total, self.unit = name, max(int(total), 0), unit
        self.done, self.tokens = 0, 0
        self.log_every_s = log_every_s
        self.artifact_key = artifact_key
        self.enabled = enabled
        self._t0 = self._last_log = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        self._artifact_id: Any = None
        self._last_artifact = 0.0

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        if _hooks.in_run():
            self._start_artifact()
        elif sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[bold]{self.name}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.name, total=self.total, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._update_artifact(force=True)
        if self.enabled:
            log.info("%s: %s", self.name, self.status())

    def status(self) -> str:
        el = time.perf_counter() - self._t0
        s = f"{self.done}/{self.total} {self.unit} in {el:.0f}s"
        if self.tokens and el > 0:
            s += f", {self.tokens / el:.1f} tokens/s"
        if 0 < self.done < self.total and el > 0:
            s += f", ETA {(self.total - self.done) * el / self.done:.0f}s"
        return s

    def set_total(self, total: int) -> None:
        """A re-planned amount of work (e.g. a time-budgeted training phase)."""
        self.total = max(int(total), 0)
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def advance(self, n: int = 1, tokens: int = 0, note: str = "") -> None:
        self.done += n
        self.tokens += tokens
        if not self.enabled:
            return
        el = time.perf_counter() - self._t0
        if self._bar is not None:
            rate = f"{self.tokens / el:.1f} tok/s" if self.tokens and el > 0 else ""
            self._bar.update(self._task, advance=n, rate=rate + (f" {note}" if note else ""))
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("%s: %s%s", self.name, self.status(), f" ({note})" if note else "")
        self._update_artifact()

    def _start_artifact(self) -> None:
        try:
            self._artifact_id = _hooks.progress_start(self.artifact_key,
                                                      f"{self.name}: {self.status()}")
        except Exception as e:  # progress display must never fail a stage
            log.warning("%s: cannot create the progress artifact (%s)", self.name, e)

    def _update_artifact(self, force: bool = False) -> None:
        if self._artifact_id is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_artifact < 2.0:
            return
        self._last_artifact = now
        try:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            _hooks.progress_update(self._artifact_id, min(pct, 100.0),
                                   f"{self.name}: {self.status()}")
        except Exception as e:
            log.warning("%s: cannot update the progress artifact (%s)", self.name, e)
