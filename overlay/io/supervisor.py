"""Supervised tasks: every background task of the agent is started here, so none can fail
unseen. A task that ends with an exception is logged with its traceback and reported to
``on_failure`` (the agent stops with that message: a dead watch or keepalive must not leave an
agent that looks alive); a task that is cancelled, or returns, just ends. Expected failures
(etcd away, a write still pending) are the task's own business and never reach here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("overlay.agent")


class Supervisor:
    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self.on_failure = on_failure
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task named ``name``; its failure stops the agent."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("task %s failed", task.get_name(), exc_info=error)
        self.on_failure(f"the {task.get_name()} task stopped: {error!r}")

    async def stop(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
