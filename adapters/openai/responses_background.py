"""Background responses (`"background": true`, OpenAI's background mode; vLLM's too): create answers at
once with the response in status `queued`, the turn runs on after the HTTP request has ended, and the
client polls GET /v1/responses/{id} (`queued` -> `in_progress` -> `completed` | `incomplete` | `failed`,
or `cancelled` by POST /v1/responses/{id}/cancel).

Every background response runs as a streamed one whose events are kept: a create with `stream: true`
follows them live, and GET /v1/responses/{id}?stream=true&starting_after=N replays them from sequence
number N + 1 (a client that lost its stream resumes it), then follows the rest. Leaving a stream never
cancels the response; only cancel (or DELETE, or the server's shutdown) does, and a cancelled turn is
rolled back like any other (its session given back).

A background response keeps the tenant's request slot the HTTP gate took for its create until its turn
ends, so `max_requests_per_tenant` bounds what a tenant has running in the background as well. A finished
job's record (its events, a failed or cancelled response's body) is kept for `KEEP_FINISHED_S`; a
completed one is retrieved from the responses store as any stored response.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any, AsyncIterator, Optional

from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.adapters.openai.responses_events import ResponseEvents, response_error_code
from agentserve.adapters.openai.responses_run import ResponseRun
from agentserve.service.tenants import HeldRequestSlot


logger = logging.getLogger(__name__)
KEEP_FINISHED_S = 3600.0  # how long a finished job's events and final status stay retrievable here
RUNNING = ("queued", "in_progress")


class BackgroundJob:
    """One background response: its turn's task, the SSE events it produced, its current body."""

    def __init__(self, run: ResponseRun, slot: Optional[HeldRequestSlot]) -> None:
        self.run = run
        self.slot = slot
        self.events: list[str] = []  # events[i] carries sequence_number i
        self.body: dict[str, Any] = run.body("queued")
        self.finished_at: Optional[float] = None
        self.task: Optional["asyncio.Task[None]"] = None
        self._changed = asyncio.Event()

    @property
    def response_id(self) -> str:
        return self.run.id

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def snapshot(self) -> dict[str, Any]:
        """What retrieve answers now: the final body, or the running response with its output so far."""
        writer = self.run.writer
        if self.finished or writer is None:
            return self.body
        return dict(writer.body, status="in_progress", output=copy.deepcopy(writer.output), usage=None)

    async def follow(self, starting_after: int) -> AsyncIterator[str]:
        """The events after sequence number `starting_after`, then each new one until the job ends."""
        at = starting_after + 1
        while True:
            changed = self._changed  # taken before the check: an event appended after it wakes us
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.finished:
                return
            await changed.wait()

    def task_ended(self, task: "asyncio.Task[None]") -> None:
        """The ended task is let go: a cancelled one's traceback holds the turn's frames, and with them the
        closed session, for as long as the record is kept (KEEP_FINISHED_S)."""
        if self.task is task:
            self.task = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def run_turn(self) -> None:
        try:
            try:
                sse = await self.run.stream(created_status="queued")
            except OpenAIError as e:  # what fails before the first event (a schema, a busy session)
                # A stream that follows the job still begins with response.created and ends in response.failed.
                writer = ResponseEvents(self.body)
                self.events.append(writer.created("queued"))
                self.events += writer.failed(e.message, response_error_code(e.status, e.code))
                self.body = writer.body
                return
            async for chunk in sse:
                self.events.append(chunk)
                self._notify()
            writer = self.run.writer
            assert writer is not None  # set by the stream's first event
            self.body = writer.body  # completed, incomplete or failed (the failure is the last event)
        except asyncio.CancelledError:
            writer = self.run.writer
            base = writer.body if writer is not None else self.body
            self.body = dict(base, status="cancelled", output=list(writer.output) if writer else [], usage=None)
            raise
        except Exception:  # noqa: BLE001 - a defect: the job must still end and give its slot back
            logger.exception("background response %s failed", self.response_id)
            self.body = dict(self.body, status="failed", error={"code": "server_error",
                                                                "message": "internal error"})
        finally:
            self.finished_at = time.monotonic()
            self._notify()
            if self.slot is not None:
                self.slot.release()


class BackgroundResponses:
    """The background jobs by response id. Touched only on the event loop."""

    def __init__(self) -> None:
        self._jobs: dict[str, BackgroundJob] = {}

    def start(self, run: ResponseRun, slot: Optional[HeldRequestSlot]) -> BackgroundJob:
        self._sweep()
        job = BackgroundJob(run, slot.keep() if slot is not None else None)
        job.task = asyncio.ensure_future(job.run_turn())
        job.task.add_done_callback(job.task_ended)
        self._jobs[job.response_id] = job
        return job

    def get(self, response_id: str, tenant: str) -> Optional[BackgroundJob]:
        job = self._jobs.get(response_id)
        return job if job is not None and job.run.tenant.name == tenant else None

    def check_not_running(self, response_id: str, tenant: str, param: str) -> None:
        job = self.get(response_id, tenant)
        if job is not None and not job.finished:
            raise OpenAIError(400, f"Response '{response_id}' is a background response still {job.snapshot()['status']}"
                                   ": wait until it has completed before continuing it.", param=param,
                              code="response_in_progress")

    async def cancel(self, job: BackgroundJob) -> dict[str, Any]:
        """Cancels a running job (its turn rolled back) and returns its body; cancelling twice returns
        the cancelled response again. A job that has already ended otherwise is a 400."""
        if job.finished:
            if job.body["status"] == "cancelled":
                return job.body
            raise OpenAIError(400, f"Cannot cancel a response that is already {job.body['status']}.",
                              param="response_id")
        assert job.task is not None
        job.task.cancel()
        await asyncio.wait((job.task,))  # its clean-up (the session given back) has run when this returns
        return job.body

    async def drop(self, job: BackgroundJob) -> None:
        """Forgets a job (DELETE), cancelling it first if it is still running."""
        if not job.finished:
            await self.cancel(job)
        self._jobs.pop(job.response_id, None)

    async def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            if not job.finished:
                await self.cancel(job)
        self._jobs.clear()

    def _sweep(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._jobs.values() if j.finished_at is not None
                    and now - j.finished_at > KEEP_FINISHED_S]:
            del self._jobs[job.response_id]
