"""A finished background response's record keeps its events and body for KEEP_FINISHED_S, not its task: a
cancelled task's traceback holds the turn's frames (the pending turn, the closed session) as long as the
record lives."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from agentserve.adapters.openai.responses_background import BackgroundResponses


class _Held:
    """Something the turn's frames hold (as a turn holds its session)."""


class _Run:
    id = "resp_1"
    writer = None

    def body(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "status": status, "output": []}

    async def stream(self, created_status: str) -> Any:
        held = _Held()  # lives in this frame until the task's traceback is dropped
        await asyncio.sleep(3600)
        return held


def test_an_ended_jobs_task_is_let_go() -> None:
    async def main() -> None:
        jobs = BackgroundResponses()
        job = jobs.start(_Run(), None)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        body = await jobs.cancel(job)
        await asyncio.sleep(0)  # the done callback
        assert body["status"] == "cancelled" and job.finished and job.task is None
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, _Held)]

    asyncio.run(main())
