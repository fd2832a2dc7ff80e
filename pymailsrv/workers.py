"""Serving from more than one process: ``pymailsrv start --processes N``.

One Python process runs one thread at a time (the GIL): with ten busy
connections, their threads mostly wait for each other. Like Postfix's
master and Dovecot's, the main process here binds the listening sockets and
then forks N workers and watches them. Each worker is the whole server of
``server.py`` - a thread per connection - over the sockets it inherited; the
kernel wakes every worker waiting for a new connection, and one of them
gets it. A worker serving more connections than another lets that one try
first (``Listener.get_request``), so they stay even.

A worker that serves two sessions or more keeps its threads on a CPU of
its own (``pin_workers``, on by default), as nginx's ``worker_cpu_affinity
auto`` does; with one session it leaves them to the kernel
(placement.py says why both). A lone process (``processes = 1``) is
always left to the kernel: it may share its machine with anything, and a
server run inside a test must not pin the test.

What the workers share, and how:

* the listening sockets, inherited across ``fork()``;
* the connection caps, the failed-login throttle and the session numbers:
  ``ConnectionLimits``, ``FailureThrottle`` and ``SharedCounter`` keep
  their tables in shared memory (shared.py);
* the Maildirs and the queue, on disk, with their locks (flock, and
  rename as the commit of every file).

What each worker keeps to itself: the POP3 sessions per user and address
(the maildrop lock already lets one session per user in), and injected
faults, which count per process and are therefore refused with
``processes > 1``.
Only the first worker runs the relay (relay.py); mail queued by another
reaches it at its next look into the queue (``relay.queue_scan_interval``).

The main process forks before it starts any thread, then only waits: a
thread's locks, or a thread pool's threads, do not cross ``fork()``. A
worker that dies is reaped, its connections no longer count against the
caps, and a new one takes its place at the next look (once a second). A
worker whose main process is gone stops by itself.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections import deque

from pymailsrv.config import ConfigError
from pymailsrv.replies import counted
from pymailsrv.server import MailServer
from pymailsrv.stopping import STOP_SIGNALS, StopRequest

log = logging.getLogger("pymailsrv.workers")

# How often the main process looks for dead workers, and a worker for its main process.
WATCH_INTERVAL_SECONDS = 1.0
# How long the main process waits for its workers to stop before it kills them.
WORKER_STOP_SECONDS = 10.0
# A worker that keeps dying (it cannot open what it needs, say) is not
# replaced for ever: after this many deaths within a minute the server
# stops with status 1, and its supervisor (systemd's Restart=) takes over.
MAX_WORKER_DEATHS_PER_MINUTE = 5

class WorkersFailing(Exception):
    """Workers die as fast as they are started; the message says how often."""


class Workers:
    """The worker processes of one bound ``MailServer``."""

    def __init__(self, server: MailServer, count: int) -> None:
        if server.settings.faults:
            raise ConfigError("injected faults count per process: run them with processes = 1")
        self.server = server
        self.count = count
        self._main_pid = os.getpid()
        self._workers: dict[int, int] = {}  # pid -> worker number, 1..count
        # The CPUs we may run on (a container's cpuset may allow only some);
        # worker N gets the Nth, round the list again if there are more workers.
        pinning = server.settings.pin_workers and hasattr(os, "sched_setaffinity")
        self._cpus = sorted(os.sched_getaffinity(0)) if pinning else []
        self._deaths: deque[float] = deque()  # when workers died, within the last minute

    def start(self) -> None:
        running = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
        if running:  # a bug of ours, not a user's mistake
            raise RuntimeError(f"workers must be forked before any thread starts; running: {running}")
        # What exists now stays shared with the workers: without this the
        # collector would write to (and so copy) every object it looks at.
        gc.freeze()
        for number in range(1, self.count + 1):
            self._fork(number)

    def _fork(self, number: int) -> None:
        # A stop signal waits until the new worker has its own handler (and,
        # here, until fork() is done): it must reach one of ours, not the
        # main process's handler in the worker's copy.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        cpu = self._cpus[(number - 1) % len(self._cpus)] if self._cpus else None
        try:
            pid = os.fork()
        except OSError:  # EAGAIN at a process limit, ENOMEM: the stop signals must work all the same
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:  # the worker: serve, and never return into the main process's code
            status = 1
            try:
                if cpu is not None:
                    self.server.context.placement.keep_to(cpu)
                self._serve(number, mask)
                status = 0
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._workers[pid] = number
        log.info("worker %d started (pid %d%s)", number, pid,
                 "" if cpu is None else f", on CPU {cpu} while it serves two sessions or more")

    def _serve(self, number: int, mask: set[signal.Signals]) -> None:
        stop = StopRequest()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.server.serve(relay=number == 1)
        try:
            while not stop.wait(WATCH_INTERVAL_SECONDS):
                if os.getppid() != self._main_pid:
                    log.warning("worker %d: the main process is gone; stopping", number)
                    break
        finally:
            self.server.stop()

    def watch(self, stop: StopRequest) -> None:
        """Replace workers that die, until a stop is requested; WorkersFailing if they keep dying."""
        missing: list[int] = []  # numbers of workers that died and are not replaced yet
        while not stop.wait(WATCH_INTERVAL_SECONDS):
            for number in self._reap():
                if stop.requested:
                    break  # they end because we are stopping (SIGINT reaches the whole group)
                self._count_death()
                missing.append(number)
            while missing and not stop.requested:
                try:
                    self._fork(missing[0])
                except OSError as error:
                    # The others serve meanwhile; a process limit may lift
                    # (Postfix's master, too, waits and forks again).
                    log.error("cannot start a process in place of worker %d: %s; trying again in %g s",
                              missing[0], error.strerror or error, WATCH_INTERVAL_SECONDS)
                    break
                missing.pop(0)

    def _count_death(self) -> None:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths[0] <= now - 60:
            self._deaths.popleft()
        if len(self._deaths) > MAX_WORKER_DEATHS_PER_MINUTE:
            raise WorkersFailing(f"{len(self._deaths)} worker processes died within a minute; "
                                 f"stopping (see the log above for why)")

    def _reap(self) -> list[int]:
        """The numbers of the workers that ended since the last look, each logged and its connections freed."""
        ended = []
        while self._workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            number = self._workers.pop(pid, None)
            if number is None:
                continue
            freed = self.server.context.connections.release_all_of(pid)
            self.server.context.throttle.forget_checks()  # those it had begun will never end
            log.error("worker %d (pid %d) ended unexpectedly (%s, with %s); starting another",
                      number, pid, _how_it_ended(status), counted(freed, "open connection"))
            ended.append(number)
        return ended

    def stop(self) -> None:
        """SIGTERM every worker, wait for them, SIGKILL what is left; then close the sockets."""
        for pid in self._workers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        while self._workers and time.monotonic() < deadline:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.05)
            else:
                self._workers.pop(pid, None)
        for pid in self._workers:
            log.warning("worker pid %d did not stop in %gs; killing it", pid, WORKER_STOP_SECONDS)
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self._workers.clear()
        self.server.stop()


def _signal(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass  # it has just ended: the wait will tell


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
