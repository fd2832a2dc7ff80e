"""Stop signals: Ctrl-C, SIGTERM or a closed terminal asking a process to stop.

The server's main process and its workers (workers.py) and ``classroom
setup`` take them as a request, looked at between two pieces of work,
rather than as an end in the middle of one.
"""

from __future__ import annotations

import signal
import time

# How often a waiting process looks whether a stop signal came (StopRequest).
STOP_POLL_SECONDS = 0.1
# SIGHUP too: the server runs in the foreground, and a closed terminal or
# SSH session sends it. Its default would end the server at once, without
# the 421 each client is owed (RFC 5321 §3.8).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """A STOP_SIGNALS signal asked this process to stop: a flag, and a wait that looks at it.

    A signal handler runs between two bytecodes of the main thread, which
    may hold any lock just then - a ``threading.Event``'s, say, whose
    ``set()`` would then wait for ever - so the handler only sets a flag.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = {number: signal.signal(number, self._note) for number in STOP_SIGNALS}

    def restore(self) -> None:
        """Give the signals back the handlers they had before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, signal_number: int, frame: object) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less once a stop is requested; whether one is."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(max(0.0, min(STOP_POLL_SECONDS, deadline - time.monotonic())))
        return self.requested
