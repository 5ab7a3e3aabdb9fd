"""``make deploy``: create the work pools ``prefect.yaml`` names, then ``prefect deploy --all``.

Idempotent: existing pools are kept, deployments are updated in place, and the optional failure
notification (``--notify URL``: a webhook block and an automation on Failed or Crashed flow runs)
replaces the one a previous call made. Needs ``PREFECT_API_URL`` (a running ``prefect server``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTIFY_BLOCK = "dflash-failed-runs"
AUTOMATION = "dflash-failed-runs"


def pools_in(spec_path: Path = REPO / "prefect.yaml") -> list[str]:
    spec = yaml.safe_load(spec_path.read_text())
    return sorted({d["work_pool"]["name"] for d in spec["deployments"]})


async def ensure_pools(names: list[str]) -> list[str]:
    """Create the missing ones as process pools; return the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    async with get_client() as client:
        for name in names:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                await client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                             base_job_template=template))
                created.append(name)
    return created


async def ensure_notification(url: str) -> str:
    """A webhook block posting to ``url`` and an automation that fires on Failed/Crashed runs."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block = CustomWebhookNotificationBlock(
        name="dflash", url=url, method="POST",
        json_data={"text": "{{subject}}\n{{body}}"})
    block_id = await block.save(NOTIFY_BLOCK, overwrite=True)
    async with get_client() as client:
        for old in await client.read_automations_by_name(AUTOMATION):
            await client.delete_automation(old.id)
    automation = Automation(
        name=AUTOMATION, description="Notify the webhook when a flow run fails or crashes",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(
            block_document_id=block_id, subject="dflash: flow run {{ flow_run.name }} "
            "{{ flow_run.state.name }}",
            body="{{ flow.name }}/{{ flow_run.name }}: {{ flow_run.state.message }}")])
    created = await automation.acreate()
    return str(created.id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make deploy", description=__doc__.splitlines()[0])
    p.add_argument("--notify", default=None, help="webhook URL notified of failed runs")
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("make deploy: error: PREFECT_API_URL is not set; start `prefect server start` and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api (README)", file=sys.stderr)
        return 2
    created = asyncio.run(ensure_pools(pools_in()))
    for name in created:
        print(f"created work pool {name!r} (process)")
    env = {**os.environ, "DFLASH_CHECKOUT": os.environ.get("DFLASH_CHECKOUT") or str(REPO)}
    prefect = Path(sys.executable).parent / "prefect"
    rc = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=REPO,
                        env=env).returncode
    if rc != 0:
        return rc
    if args.notify:
        print(f"automation {AUTOMATION!r}: {asyncio.run(ensure_notification(args.notify))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
