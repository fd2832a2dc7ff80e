"""The protocol trace: every line on the wire, in the RFCs' ``C:``/``S:`` notation.

With ``--trace`` the transport reports each line it reads and writes here,
and the sessions report their state changes. A line looks like::

    01:02:03.456 pop3 #7 127.0.0.1 AUTHORIZATION C: USER alice
    01:02:03.457 pop3 #7 127.0.0.1 AUTHORIZATION S: +OK send PASS
    01:02:03.458 pop3 #7 127.0.0.1 AUTHORIZATION C: PASS ****
    01:02:03.470 pop3 #7 127.0.0.1 -- AUTHORIZATION -> TRANSACTION

Credentials never reach the trace: the session masks its secret arguments
(``Session.mask``) before a client line is written. Message text (a RETR
body, SMTP DATA) is summarised as ``[N lines, M octets]``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import enum

    from pymailsrv.session import Session


class Tracer:
    def __init__(self, enabled: bool = False, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream
        self._lock = threading.Lock()

    def _emit(self, session: Session, text: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        line = f"{stamp} {session.protocol} #{session.session_id} {session.peer[0]} {text}"
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def client_line(self, session: Session, line: bytes) -> None:
        if self.enabled:
            shown = session.mask(line.rstrip(b"\r\n")).decode("utf-8", "backslashreplace")
            self._emit(session, f"{session.state.name} C: {shown}")

    def client_text(self, session: Session, lines: int, octets: int) -> None:
        if self.enabled:
            self._emit(session, f"{session.state.name} C: [{lines} lines, {octets} octets]")

    def server_lines(self, session: Session, head: list[str], body_lines: int, body_octets: int) -> None:
        if self.enabled:
            for line in head:
                self._emit(session, f"{session.state.name} S: {line}")
            if body_lines:
                self._emit(session, f"{session.state.name} S: [{body_lines} lines, {body_octets} octets]")

    def event(self, session: Session, text: str) -> None:
        """Something that is not a protocol line: a TLS handshake, say."""
        if self.enabled:
            self._emit(session, f"-- {text}")

    def state_change(self, session: Session, old: enum.Enum, new: enum.Enum) -> None:
        if self.enabled:
            self._emit(session, f"-- {old.name} -> {new.name}")
