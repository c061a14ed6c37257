"""One thread owns the pipeline: it loads it, warms it up, then runs queued jobs one at a time.

The event loop never touches the pipeline. Requests become :class:`Job` objects in a bounded
queue; the handler awaits ``job.future``. A job cancelled while queued is removed and never
runs; a job abandoned while running finishes and its result is dropped (a diffusion step
cannot be interrupted safely), so no work leaks and the worker never dies with a client.

    >>> worker = GenerationWorker(run=lambda params: [b"png"], max_queue=4, metrics=Metrics())
    >>> worker.start(prepare=lambda: None)
    >>> worker.submit(Job(params, asyncio.get_running_loop()))   # raises QueueFull when full
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .jsonlog import LOGGER
from .metrics import Metrics

logger = logging.getLogger(LOGGER)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines the images; the same params give the same bytes."""

    prompt: str
    n: int
    width: int
    height: int
    seed: int
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    task: str = "generate"  # "generate", "edit" (image to image) or "inpaint"
    image: Any = None  # edits: the PIL image to start from, already at width x height
    mask: Any = None  # inpainting: an L image, white where the pipeline repaints
    strength: float | None = None
    output_format: str = "png"
    output_compression: int | None = None


class QueueFull(Exception):
    """``max_queue`` jobs wait behind a running one already; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request's generation. ``state``: queued -> running -> done, or cancelled / abandoned."""

    def __init__(self, params: GenerationParams, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.loop = loop
        self.future: asyncio.Future[list[bytes]] = loop.create_future()
        self.state = "queued"
        self.enqueued_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @property
    def queue_seconds(self) -> float | None:
        end = self.started_at or self.finished_at
        return None if end is None else end - self.enqueued_at

    @property
    def run_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class GenerationWorker:
    """A single worker thread and its bounded queue."""

    def __init__(self, run: Callable[[GenerationParams], list[bytes]], max_queue: int, metrics: Metrics):
        self._run = run
        self.max_queue = max_queue
        self._metrics = metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False  # a job is running; False between jobs, while the next is being handed over
        self._thread: threading.Thread | None = None
        self._mean_run_s: float | None = None  # running mean, for Retry-After

    def start(self, prepare: Callable[[], Any]) -> None:
        """Start the thread: ``prepare()`` (load, warm up) runs on it first, then the job loop."""
        self._thread = threading.Thread(target=self._main, args=(prepare,), name="smash-generation", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the jobs ahead times the mean run time, at least 1."""
        per_job = self._mean_run_s or 1.0
        return max(1, math.ceil(per_job * (self.depth + 1)))

    def submit(self, job: Job) -> None:
        """Queue ``job``. Admission counts the worker's slot: ``max_queue`` jobs may wait behind a
        running one, and when none runs, the job about to be handed to the worker is not "waiting"
        (so ``max_queue + 1`` clients that each await their answer never see :class:`QueueFull`)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the worker is stopping")
            if len(self._queue) >= self.max_queue + (0 if self._busy else 1):
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def cancel(self, job: Job) -> str:
        """Withdraw ``job``. Returns ``"cancelled"`` (it will never run), ``"abandoned"`` (it is
        running; its result will be dropped) or ``"done"`` (its result is already on the way)."""
        with self._cond:
            if job.state == "queued":
                self._queue.remove(job)
                self._metrics.queue_depth.set(len(self._queue))
                job.state = "cancelled"
                self._metrics.jobs.labels("cancelled").inc()
                return "cancelled"
            if job.state == "running":
                job.state = "abandoned"
                return "abandoned"
            return job.state

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end once the queue is empty; True if it ended within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self, prepare: Callable[[], Any]) -> None:
        try:
            prepare()
        except BaseException:  # prepare reports its own failure; the worker just never serves
            return
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._metrics.queue_depth.set(len(self._queue))
                self._busy = True
                job.state = "running"
                job.started_at = time.perf_counter()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        self._metrics.in_progress.set(1)
        result: list[bytes] | None = None
        error: BaseException | None = None
        try:
            result = self._run(job.params)
        except Exception as exc:  # a failed generation fails its request, never the worker
            error = exc
            logger.exception("generation failed")
        finally:
            self._metrics.in_progress.set(0)
        job.finished_at = time.perf_counter()
        elapsed = job.finished_at - job.started_at
        self._metrics.generation.observe(elapsed)
        self._mean_run_s = elapsed if self._mean_run_s is None else 0.8 * self._mean_run_s + 0.2 * elapsed
        if result is not None:
            self._metrics.images.inc(len(result))
        with self._cond:
            abandoned = job.state == "abandoned"
            job.state = "done"
            # Before the answer goes out: the client's next request must find the slot free.
            self._busy = False
        if abandoned:
            self._metrics.jobs.labels("discarded").inc()
            return
        self._metrics.jobs.labels("failed" if error else "completed").inc()
        _settle(job, result, error)


def _settle(job: Job, result: list[bytes] | None, error: BaseException | None) -> None:
    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the event loop is closed: the request is gone with it
        pass
