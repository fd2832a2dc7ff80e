"""Which CPUs a worker process's threads may run on (``pin_workers``).

A worker (workers.py) is one Python process: its threads run Python one at
a time, handing the GIL to each other. Spread over the CPUs, each hand-over
wakes a thread asleep on another CPU, an interrupt from one CPU to another
(in a virtual machine, a trip through the hypervisor); kept on one CPU, it
is a plain switch between threads. So while two sessions or more share a
worker, all its threads are kept on the worker's own CPU: with 50 busy SMTP
connections on a 2-CPU virtual machine, two workers kept so used a quarter
less CPU per message than two left to roam (docs/deploy.rst).

One session alone hands the GIL to no one. Left to the kernel, its thread
runs beside its client, or on the CPU that takes the disk's interrupts,
and waits less for both: one SMTP connection delivered 1.17 times as many
2 KB messages a second as when its worker was kept on its CPU (on the same
machine, scripts/bench.py's load, 9 rounds taken in turn, twice). So a
worker's threads are set free again when it is down to one session.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

# From this many sessions on, a worker's threads share its GIL often enough
# that keeping them on one CPU pays.
SESSIONS_TO_SHARE_A_CPU = 2
# sched_setaffinity(2): thread id 0 is the thread that calls it.
CALLING_THREAD = 0


class Placement:
    """Keeps one process's threads on ``cpu`` while it serves two sessions or more.

    Without a CPU (one process, or ``pin_workers = false``) it does nothing:
    the kernel places every thread.
    """

    def __init__(self) -> None:
        self.cpu: int | None = None
        self._everywhere: set[int] = set()
        self._sessions = 0
        self._lock = threading.Lock()

    def keep_to(self, cpu: int) -> None:
        """Give this worker its CPU, for when it is busy (workers.py calls it after fork)."""
        self.cpu = cpu
        self._everywhere = os.sched_getaffinity(0)

    def session_started(self) -> None:
        """In the session's own thread, as it begins."""
        if self.cpu is None:
            return
        with self._lock:
            self._sessions += 1
            if self._sessions == SESSIONS_TO_SHARE_A_CPU:
                self._place(_all_threads())
            else:
                # This thread took its CPUs from the accepting thread when it
                # was made, perhaps before the last move of all threads.
                self._place([CALLING_THREAD])

    def session_ended(self) -> None:
        """In the session's own thread, as it ends."""
        if self.cpu is None:
            return
        with self._lock:
            self._sessions -= 1
            if self._sessions == SESSIONS_TO_SHARE_A_CPU - 1:
                self._place(_all_threads())

    def _place(self, thread_ids: Iterable[int]) -> None:
        cpus = {self.cpu} if self._sessions >= SESSIONS_TO_SHARE_A_CPU else self._everywhere
        for thread_id in thread_ids:
            try:
                os.sched_setaffinity(thread_id, cpus)
            except OSError:
                pass  # it has just ended (ESRCH), or a cpuset took the CPU away: the kernel places it


def _all_threads() -> list[int]:
    """The kernel's ids of this process's threads.

    From /proc rather than ``threading``: after ``fork()``, Python 3.11 keeps
    the parent's id as the main thread's ``native_id``, and moving that
    would move the parent.
    """
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # no /proc here: only each session's thread is placed, as it starts
        return []
