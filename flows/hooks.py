"""Prefect's side of what ``tasks/`` may ask of a run: artifacts, run identity and logs.

``tasks/`` never imports Prefect (layering); importing ``flows.pipeline`` installs these hooks with
``tasks.progress.set_run_hooks`` in every process that runs a stage (a Dask worker imports the
task's module too). Artifact keys are prefixed with the run's scope (the config name), so runs
of different configs do not overwrite each other's "latest" artifact.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from prefect.logging.handlers import APILogHandler

from storage.hardware import slug
from tasks.progress import RunHooks, set_run_hooks

log = logging.getLogger("dflash")
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("dflash_scope", default="")


def _run_context() -> Any:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() or FlowRunContext.get()


def artifact_key(*parts: str) -> str:
    """``<scope>-<parts>``: lowercase letters, digits and dashes, as Prefect requires."""
    scope = _scope.get()
    return slug("-".join(p for p in (*parts, scope) if p), 100)


@contextlib.contextmanager
def scoped(name: str) -> Iterator[None]:
    """Artifacts created inside are keyed by ``name`` (the config name)."""
    token = _scope.set(name)
    try:
        yield
    finally:
        _scope.reset(token)


class PrefectHooks(RunHooks):
    def in_run(self) -> bool:
        return _run_context() is not None

    def progress_start(self, key: str | None, description: str) -> Any:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(0.0, key=artifact_key(key) if key else None,
                                        description=description)

    def progress_update(self, handle: Any, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(handle, percent, description=description)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        if not self.in_run():
            return
        from prefect.artifacts import create_table_artifact

        try:  # an artifact is a view, never a reason to fail the run
            create_table_artifact(key=artifact_key(key), table=rows, description=description)
        except Exception as e:
            log.warning("cannot create table artifact %s: %s", key, e)

    def labels(self) -> dict[str, str | None]:
        if not self.in_run():
            return {"flow_run_id": None, "deployment": None}
        from prefect.runtime import deployment, flow_run

        run_id = flow_run.id
        return {"flow_run_id": str(run_id) if run_id else None,
                "deployment": deployment.name or None}


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler that stays silent outside a flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        if _run_context() is not None:
            super().emit(record)


def send_dflash_logs_to_prefect() -> None:
    """The ``dflash`` logger's records go to the Prefect run's logs (once per process).

    A worker's flow process configures logging from Prefect's defaults, where the root level is
    WARNING: the stage lines (progress, committed keys, tau) are INFO, so the level is set here."""
    if not any(isinstance(h, _RunLogHandler) for h in log.handlers):
        log.addHandler(_RunLogHandler())
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def install() -> None:
    set_run_hooks(PrefectHooks())
    send_dflash_logs_to_prefect()
