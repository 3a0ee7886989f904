"""`kill -USR1 <pid>` writes where every task and thread of the mount is, to diagnose a hang."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback

import trio

log = logging.getLogger(__name__)


def task_stacks() -> list[str]:
    """Where each trio task waits, indented by nursery."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        indent = "  " * depth
        lines.append(f"{indent}task {task.name}")
        for frame, lineno in task.iter_await_frames():
            lines.append(f"{indent}  {frame.f_code.co_filename}:{lineno} in "
                         f"{frame.f_code.co_name}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return lines


def thread_stacks() -> list[str]:
    names = {t.ident: t.name for t in threading.enumerate()}
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"thread {names.get(ident, ident)}")
        lines += ["  " + line.rstrip() for line in traceback.format_stack(frame)]
    return lines


async def dump_on_usr1() -> None:
    """Log every task's and thread's stack each time SIGUSR1 arrives (until cancelled)."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            log.warning("stacks on SIGUSR1:\n%s", "\n".join(task_stacks() + thread_stacks()))
