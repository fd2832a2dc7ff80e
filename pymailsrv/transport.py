"""The transport: the only code that touches a socket.

``SessionHandler`` is a ``socketserver`` request handler (one thread per
connection). It makes the protocol session, then loops: read one line, hand
it to the session, send the reply the session returns. It knows nothing of
POP3 or SMTP; everything protocol-shaped comes from the session.

``Connection`` is the choke point for the wire:

* ``read_line(limit)`` reads one line, line end included, never holding more
  than ``limit`` octets of it in memory. A longer line is read through to its
  end and thrown away, and reported as too long, so the session can refuse
  it and stay in step with the client.
* ``send(reply)`` queues the reply's lines. Output is flushed whenever the
  input buffer holds no complete line, that is, before we would block
  waiting for the client: pipelined commands (RFC 2920 §3.2, RFC 2449 §6.6)
  get their replies in one write, in order, and a client waiting for an
  answer always has it. Then, while the client reads them, the session
  does the work it put off until they were sent (``Session.later``).
* ``start_tls()`` turns the connection into a TLS one after a STARTTLS or
  STLS reply, or at once on an implicit-TLS port (RFC 8314). Plaintext the
  client sent after the command is never run: what is already in our
  buffer is thrown away, and what is still in the kernel's makes the
  handshake fail. Running it would let a man in the middle inject commands
  into the protected session (CVE-2011-0411). RFC 3207 §4 and RFC 2595 §4
  have the client send nothing more before the handshake, so it is no
  pipeline that RFC 2920 §3.2 protects; and after it, RFC 3207 §4.2 has
  the server forget what the client said before.
* Every line read or written goes to the trace (``trace.py``).
"""

from __future__ import annotations

import logging
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from typing import TYPE_CHECKING

from pymailsrv.limits import RECV_CHUNK, TLS_CLOSE_NOTIFY_SECONDS
from pymailsrv.replies import CRLF, END_OF_MULTILINE, After, Reply, counted
from pymailsrv.trace import SENT_BEFORE_TLS, TEXT_BEFORE_354

if TYPE_CHECKING:
    from pymailsrv.session import Session
    from pymailsrv.trace import Tracer

log = logging.getLogger("pymailsrv.transport")

# Flush the output buffer once it holds this much, even mid-reply (a RETR).
OUTPUT_FLUSH_THRESHOLD = 256 * 1024
# A line's deadline shortens the socket's timeout only once it is this much
# nearer than the full timeout: the first read of each line (nearly always
# the only one) costs no settimeout() system call.
DEADLINE_SLACK_SECONDS = 1.0

# Replies after which the connection ends (the last two only by injected faults).
_ENDINGS = (After.CLOSE, After.DROP, After.DROP_MID)
# One line of a reply body as sent: up to its CRLF, or the unfinished rest
# of a body that a drop-mid fault cut off.
_WIRE_LINE = re.compile(rb".*?\r\n|.+", re.DOTALL)


class ConnectionClosed(Exception):
    """The client went away."""


class Connection:
    def __init__(self, sock: socket.socket, session: Session, tracer: Tracer,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.sock = sock
        self.session = session
        self.tracer = tracer
        self.tls_context = tls_context
        self._input = bytearray()
        self._output = bytearray()
        self.octets_in = 0
        self.octets_out = 0
        # Whether the line read last was pipelined: sent before our reply to
        # the line before it - or our greeting - went out. Transcripts record
        # it, and ``pymailsrv grade`` judges clients by it.
        self.line_pipelined = False
        self.stopping = False  # set by stop_reading(), from another thread
        # Set with it: a reply's delay (a failed login's, an injected fault's)
        # ends at once when the server stops, which waits for no sleeper.
        self._stopped = threading.Event()
        # When the line being read must be in (see read_line); None: no limit.
        self._line_deadline: float | None = None
        self._output_failed = False  # a send timed out or failed: say no goodbye
        self._readable: select.poll | None = None  # made at the first _input_waiting

    # --- input -----------------------------------------------------------------

    def _receive(self) -> bytes:
        self.flush()  # never block for input while the client waits for replies
        self.session.run_put_off_work()  # the client's turn now: work meanwhile
        if self._line_deadline is not None:
            remaining = self._line_deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if remaining < self.sock.gettimeout() - DEADLINE_SLACK_SECONDS:
                self.sock.settimeout(remaining)  # serve() sets it back once the line is in
        chunk = self.sock.recv(RECV_CHUNK)
        if not chunk:
            raise ConnectionClosed
        self.octets_in += len(chunk)
        return chunk

    def _client_is_ahead(self) -> bool:
        """Has the client sent what we have not taken yet, in our buffer or the kernel's?"""
        return bool(self._input) or self._input_waiting()

    def _input_waiting(self) -> bool:
        """Has the client sent octets we have not read yet? Never blocks."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        # poll(), not select(): select() takes no descriptor past 1023, and
        # the server raises its open-files limit beyond that (limits.py). The
        # descriptor stays the same through start_tls.
        if self._readable is None:
            self._readable = select.poll()
            self._readable.register(self.sock, select.POLLIN)
        return bool(self._readable.poll(0))

    def read_line(self, limit: int) -> tuple[bytes, bool]:
        """One line with its line end, and whether it was longer than ``limit``.

        A line that runs past ``limit`` is consumed up to its LF; its first
        ``limit`` octets come back with its own line end (CRLF or LF) and True,
        so the session still knows how the line ended.
        """
        # The timeout is for the whole line, not for each read: a client
        # that sends an octet now and then must not hold the connection for
        # ever. RFC 5321 §4.5.3.2.7 times "awaiting the next command", and
        # RFC 1939 §3 has "the receipt of any command" reset the autologout
        # timer; timing whole lines is our choice, against slow drips.
        timeout = self.sock.gettimeout()
        self._line_deadline = None if timeout is None else time.monotonic() + timeout
        # Replies not yet sent while the next line is already here, in our
        # buffer or the kernel's: the client did not wait for them. Only a
        # trace records it, so without one we spare the poll() call.
        self.line_pipelined = self.tracer.active and bool(self._output) and self._client_is_ahead()
        while True:
            end = self._input.find(b"\n", 0, limit)
            if end >= 0:
                line = bytes(self._input[: end + 1])
                del self._input[: end + 1]
                return line, False
            if len(self._input) >= limit:
                head = bytes(self._input[:limit])
                return head + self._skip_rest_of_line(), True
            self._input += self._receive()

    def read_text(self, limit: int) -> tuple[bytes, bool]:
        """Message text: every whole line buffered now, at least one (waiting for it).

        Handing the session many lines at once lets it store plain text in
        one piece rather than a line at a time (scripts/bench.py measured
        the difference on 100 KB messages). Only the first line is held to
        ``limit``: one over it comes alone, cut short, as from read_line.
        The lines after it are as long as they came, within what the reads
        brought (RECV_CHUNK at a time); the session checks their length.
        """
        line, too_long = self.read_line(limit)
        end = self._input.rfind(b"\n")
        if too_long or end < 0:
            return line, too_long
        block = line + self._input[: end + 1]
        del self._input[: end + 1]
        return bytes(block), False

    def _skip_rest_of_line(self) -> bytes:
        """Throw input away up to the next LF; return that line's end, CRLF or LF."""
        previous = b""
        while True:
            end = self._input.find(b"\n")
            if end >= 0:
                before = bytes(self._input[end - 1:end]) if end else previous
                del self._input[: end + 1]
                return b"\r\n" if before == b"\r" else b"\n"
            previous = bytes(self._input[-1:])
            self._input.clear()
            self._input += self._receive()

    # --- output ----------------------------------------------------------------

    def send(self, reply: Reply) -> None:
        if reply.after is After.DROP:
            # An injected fault: hang up without a word. The replies owed
            # before it still go: the trace has shown them sent.
            self.flush()
            return
        if reply.delay:
            self.flush()
            self._stopped.wait(reply.delay)
        for line in reply.head():
            self._output += line.encode("utf-8", "replace") + CRLF
        tracing = self.tracer.active  # if not, RETR's text goes out unlooked at
        if tracing:
            self.tracer.server_reply(self.session, reply)
        summarised = tracing and reply.message_text and not self.tracer.bodies
        body_lines = body_octets = 0
        last_block = b""
        for wire_block in reply.body():
            self._output += wire_block
            if summarised:
                body_lines += wire_block.count(b"\n")
                body_octets += len(wire_block)
                last_block = wire_block
            elif tracing:
                for wire_line in _WIRE_LINE.findall(wire_block):
                    self.tracer.server_body_line(self.session, wire_line)
            if len(self._output) >= OUTPUT_FLUSH_THRESHOLD:
                self.flush()
        if summarised:
            # The lone dot that ends it is shown as a line of its own, as the
            # SMTP text's is (Reply.body gives it a block of its own).
            ended = last_block == END_OF_MULTILINE
            self.tracer.server_text(self.session, body_lines - ended, body_octets - ended * len(END_OF_MULTILINE),
                                    ended)
        if reply.then is not None:
            self.send(reply.then)
        if reply.after in (After.CLOSE, After.DROP_MID):
            self.flush()

    def flush(self) -> None:
        if self._output:
            try:
                self.sock.sendall(self._output)
                self.octets_out += len(self._output)
            except OSError:  # a timeout too: part of it may have gone, so none of it goes again
                self._output_failed = True
                raise
            finally:
                self._output.clear()

    def start_tls(self) -> None:
        """Handshake now; then the session forgets what came before it (RFC 3207 §4.2)."""
        self.flush()
        if self._input:  # plaintext pipelined after STARTTLS/STLS: never run; the trace says so, not what
            lines, octets = self._input.count(b"\n"), len(self._input)
            self.tracer.event(self.session, f"{counted(lines, 'line')} ({counted(octets, 'octet')}) {SENT_BEFORE_TLS}")
            self._input.clear()
        # The handshake runs on the wrapped socket, once it is self.sock: the
        # plain one has handed it its descriptor, and stop() must reach it.
        self.sock = self.tls_context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock.do_handshake()
        self.tracer.event(self.session, f"TLS established: {self.sock.version()} {self.sock.cipher()[0]}")
        self.session.tls_started()

    def stop_reading(self) -> None:
        """From another thread: end the session once the command in hand is answered.

        serve() looks at ``stopping`` before it reads each command, and
        shutting the reading half wakes it if it is waiting for one. A reply
        being made (a 250 after DATA, whose message is already on disk)
        still goes out, then the client hears shutting_down(). Answered 250,
        it will not send the message a second time (RFC 5321 §6.1).
        """
        self.stopping = True
        self._stopped.set()
        self._shut(socket.SHUT_RD)

    def shutdown(self) -> None:
        """Cut the connection from another thread (a stopping server's last resort)."""
        self._shut(socket.SHUT_RDWR)

    def _shut(self, how: int) -> None:
        # socket.socket's own shutdown, on the descriptor: SSLSocket's would
        # drop the TLS state under the thread that is using it.
        try:
            socket.socket.shutdown(self.sock, how)
        except OSError:
            pass  # already closed by its own thread

    def close_tls(self) -> None:
        """Say TLS's close_notify, then close (TLS_CLOSE_NOTIFY_SECONDS)."""
        try:
            self.sock.settimeout(TLS_CLOSE_NOTIFY_SECONDS)
            self.sock.unwrap()
        except (OSError, ValueError):
            pass  # the client went first, the server is stopping, or the handshake never ended
        self.sock.close()

    # --- the session loop --------------------------------------------------------

    def serve(self, implicit_tls: bool = False) -> str:
        """Greet, then read lines and answer them until one side closes.

        Returns how the session ended: "closed: ..." (a closing reply to a
        command the client sent, as QUIT or an error limit), "fault: ..." (an
        injected fault), "timeout", or "server stopping"; a client that
        simply goes away raises ConnectionClosed instead.
        """
        session = self.session
        session.client_is_ahead = self._client_is_ahead
        self._use_timeout(session.timeout)
        if implicit_tls:
            self.start_tls()
        reply: Reply | None = session.greeting()
        self.send(reply)
        while reply is None or reply.after not in _ENDINGS:
            # Stopping: the command in hand is answered; take no other. A
            # message's text is read on while it is already here (its end
            # too: then the client hears 250); what the client has not yet
            # sent is cut off by stop_reading, and a text cut short is never
            # stored: the client hears 421 and sends it again later.
            if self.stopping and not session.collecting_text:
                return self._say_shutting_down()
            try:
                if session.collecting_text:
                    reply = self._answer_text(*self.read_text(session.line_limit))
                else:
                    reply = self._answer(*self.read_line(session.line_limit))
            except TimeoutError:
                if not self._output_failed:  # a client that reads nothing gets no goodbye either
                    self.send(session.timed_out())
                return "timeout"
            except ConnectionClosed:
                if self._input and not session.collecting_text:
                    # A last line the client never ended: the trace shows it, as "no line end".
                    self.tracer.client_line(session, bytes(self._input))
                if not self.stopping:
                    raise
                return self._say_shutting_down()
            # The state's timeout, for the reply and the next line: the read
            # may have cut it to what was left of the line's deadline.
            self._use_timeout(session.timeout)
            if reply is not None:
                self.send(reply)
                if reply.after is After.START_TLS:
                    self.start_tls()
        if reply.after is not After.CLOSE:
            return f"fault: {reply.after.value}"
        return "closed: " + reply.summary

    def _use_timeout(self, seconds: float) -> None:
        if self.sock.gettimeout() != seconds:  # each settimeout is a system call
            self.sock.settimeout(seconds)

    def _say_shutting_down(self) -> str:
        self.send(self.session.shutting_down())  # RFC 5321 §3.8: a 421 before going
        return "server stopping"

    def _answer(self, line: bytes, too_long: bool) -> Reply:
        self.tracer.client_line(self.session, line, pipelined=self.line_pipelined)
        return self.session.handle_line(line, too_long)

    def _answer_text(self, block: bytes, too_long: bool) -> Reply | None:
        if self.line_pipelined:  # only a 354 can still be unsent as text is read: it is the first block
            self.tracer.event(self.session, TEXT_BEFORE_354)
        # With --trace-bodies a line at a time, so each shows before what it
        # causes; else the session traces a summary when the text ends.
        pieces = [line + b"\n" for line in block.split(b"\n")[:-1]] if self.tracer.bodies else [block]
        for index, piece in enumerate(pieces):
            if self.tracer.bodies:
                self.tracer.client_text_line(self.session, piece)
            reply, rest = self.session.handle_text(piece, too_long)
            if reply is not None:
                # What came after the end of the text: pipelined commands.
                self._input[:0] = rest + b"".join(pieces[index + 1:])
                return reply
        return None


class SessionHandler(socketserver.BaseRequestHandler):
    """One connection: a session of the listener's protocol, served to the end."""

    def handle(self) -> None:
        listener = self.server
        context = listener.context
        session = listener.session_class(context, self.client_address)
        connection = Connection(self.request, session, context.tracer, context.tls)
        listener.track(connection)
        context.tracer.session_started(session)
        started = time.monotonic()
        outcome = "server error"  # kept only if serve() raises what none of these catch: a bug of ours
        try:
            outcome = connection.serve(implicit_tls=listener.implicit_tls)
        except ConnectionClosed:
            outcome = "dropped by client"
        except ssl.SSLError as error:
            outcome = f"TLS failed: {error.reason or error}"
        except OSError as error:
            outcome = f"network error: {error.strerror or error}"
        finally:
            try:
                session.run_put_off_work()
                try:
                    session.close()
                except Exception:  # a bug: the session's end is still traced and logged
                    log.exception("%s session %d: closing it failed", session.protocol, session.session_id)
                context.tracer.session_ended(session, outcome)
                # One line per session end, never a password or message text.
                log.info("%s session %d ended: client=%s user=%s commands=%d in=%d out=%d "
                         "duration=%.1fs outcome=%s", session.protocol, session.session_id,
                         self.client_address[0], session.user or "-", session.commands_run,
                         connection.octets_in, connection.octets_out, time.monotonic() - started, outcome)
            finally:
                try:
                    if connection.sock is not self.request:
                        # socketserver closes only the socket it accepted; the
                        # TLS one that took over its descriptor is ours to close,
                        # once the session holds nothing: it may wait a moment
                        # for the client's close_notify.
                        connection.close_tls()
                finally:
                    # Last, whatever failed above: a stopping server waits for
                    # this, and by now the session holds nothing (its spool
                    # file, its maildrop lock).
                    listener.untrack(connection)
