"""Jobs: one generation at a time, and every way of ending one (Stop, a client's cancel, a closed
connection) really ends it.

A `Job` carries its own stop flag, so a Stop reaches that job and never a later one (a Stop while
idle changes nothing). The engine checks the flag before every decoding step.

Gradio runs a plain (sync) handler in a worker thread that a cancel cannot stop: the client sees
CANCELLED, the queue frees the slot, and the thread decodes and saves on, beside the next job.
`iterate_in_thread` runs the synchronous generation step by step in a worker thread under an async
generator instead, which Gradio *can* reach: a cancel (`gradio_client.Job.cancel()`, an event's
`cancels=`) arrives as `asyncio.CancelledError`, a closed connection as `GeneratorExit` when the
queue closes the iterator. Either way the job's stop flag is set, the step in flight finishes
(at most one decoding step), the generation is closed (its `finally` runs, nothing unfinished is
saved), and only then does the handler end and Gradio free the queue slot.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, TypeVar

T = TypeVar("T")
_END = object()


@dataclass(eq=False)
class Job:
    """One generation request, from the click (or API call) to its end."""

    stop_event: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()


def _step(iterator: Iterator[T]):
    return next(iterator, _END)


async def iterate_in_thread(iterator: Iterator[T], job: Job) -> AsyncIterator[T]:
    """Yield the items of a synchronous generator, each computed in a worker thread; a cancel or a
    close of this async generator stops `job` and returns only once `iterator` has ended."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = loop.run_in_executor(None, _step, iterator)
            item = await asyncio.shield(pending)
            pending = None
            if item is _END:
                return
            yield item
    except (asyncio.CancelledError, GeneratorExit):
        job.stop()
        raise
    finally:
        while pending is not None and not pending.done():  # the step in flight: at most one decoding step
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                job.stop()
            except Exception:
                break
        if pending is None or pending.done():
            iterator.close()  # runs the generation's `finally` (releases the one-job lock)


__all__ = ["Job", "iterate_in_thread"]
