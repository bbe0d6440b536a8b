"""A tiny job runner for work too slow for one request (a patching sweep): one background
thread runs the jobs in order, since they are CPU-bound and would only slow each other down,
while the page polls each job's state and progress.

A failed job's error is shown to the user only when it is a message written for them (a
ValueError or KeyError from the library, which names what was wrong); anything else becomes
"internal error" with the traceback in the server log, never on the page.

A job is cancelled through its progress callback: once the runner is shutting down the next
report raises :class:`Cancelled`, so a sweep (which reports after every forward pass) stops
within one pass instead of running to its end while the server waits.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

logger = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed"]
Progress = Callable[[float], None]
Work = Callable[[Progress], Any]  # given a progress callback (fraction in [0, 1]), returns the result
INTERNAL_ERROR = "internal error (see the server log)"
CANCELLED = "cancelled"
KEEP_FINISHED = 100  # finished jobs remembered for polling; older ones are forgotten


@dataclass(frozen=True)
class Job:
    """A snapshot of one job: where it is, how far along, and what it produced."""

    id: str
    state: State = "queued"
    progress: float = 0.0
    result: Any = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


class Cancelled(Exception):
    """Raised inside a job's progress callback once the runner is shutting down."""


def user_message(error: BaseException) -> str:
    """What the page may show about a failure: the library's own message, or a generic line."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])  # str(KeyError) would wrap the message in quotes
    if isinstance(error, (ValueError, KeyError)):
        return str(error) or type(error).__name__
    return INTERNAL_ERROR


class JobRunner:
    """Runs submitted work on one background thread, first come first served."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechscope-job")
        self._stopping = threading.Event()

    def submit(self, work: Work) -> str:
        """Queue ``work`` and return the new job's id at once."""
        job = Job(id=uuid.uuid4().hex)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        self._executor.submit(self._run, job.id, work)
        return job.id

    def get(self, id: str) -> Job:
        """The job's current snapshot, or KeyError naming the id."""
        with self._lock:
            if id not in self._jobs:
                raise KeyError(f"no job with id {id!r} (finished jobs are forgotten after {KEEP_FINISHED} more)")
            return self._jobs[id]

    def running(self) -> Job | None:
        """The job running now, if any."""
        with self._lock:
            return next((job for job in self._jobs.values() if job.state == "running"), None)

    def shutdown(self) -> None:
        """Cancel the running job at its next progress report, drop queued ones, and wait for
        the thread to end (blocking: call it off the event loop)."""
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for id, job in self._jobs.items():
                if not job.finished:
                    self._jobs[id] = replace(job, state="failed", error=CANCELLED)

    def _run(self, id: str, work: Work) -> None:
        self._update(id, state="running")
        try:
            result = work(lambda fraction: self._report(id, fraction))
        except Cancelled:
            self._update(id, state="failed", error=CANCELLED)
        except Exception as error:
            if user_message(error) == INTERNAL_ERROR:
                logger.exception("job %s failed", id)
            self._update(id, state="failed", error=user_message(error))
        else:
            self._update(id, state="done", progress=1.0, result=result)

    def _report(self, id: str, fraction: float) -> None:
        """Record progress, kept within [0, 1] and never moving backwards; stop the job here
        once the runner is shutting down."""
        if self._stopping.is_set():
            raise Cancelled(f"job {id} cancelled: the server is stopping")
        fraction = min(max(float(fraction), 0.0), 1.0)
        with self._lock:
            job = self._jobs.get(id)
            if job is not None and job.state == "running" and fraction > job.progress:
                self._jobs[id] = replace(job, progress=fraction)

    def _update(self, id: str, **changes: Any) -> None:
        with self._lock:
            if id in self._jobs:
                self._jobs[id] = replace(self._jobs[id], **changes)

    def _forget_old(self) -> None:
        finished = [id for id, job in self._jobs.items() if job.finished]
        for id in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
            del self._jobs[id]
