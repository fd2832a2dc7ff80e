"""The other end, for tests: a tiny DNS server, an SMTP sink, a server that drips.

All listen on 127.0.0.1, port 0 (a free port), and are stopped by the
fixtures in ``test_relay.py`` (and ``dripping_server``'s own exit)
whatever the test's result.

``FakeDns`` answers from a dict, with ``dnslib`` building the packets: a
name it does not know is NXDOMAIN, a known name without the asked type is
an empty answer (NOERROR, no records), as a real server says "no MX here".

``Sink`` is an ``aiosmtpd`` server that keeps what it receives and can be
told to misbehave: a reply per recipient (``rcpt_replies``), replies for
the next DATA commands (``data_replies``), STARTTLS with a given context,
one whose handshake always fails (``failing_tls_context``), or STARTTLS
offered and then refused (``starttls_reply``), DATA answered without
354 (``data_command_reply``), or EHLO refused (``ehlo_replies``).

``dripping_server`` sends its reply a piece at a time, each in good time:
every read gets something, so only a deadline on the whole reply ends the
client's wait (the probe's, the relay's).
"""

from __future__ import annotations

import asyncio
import contextlib
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, syntax
from dnslib import QTYPE, RCODE, RR, A, DNSRecord, MX

POLL_SECONDS = 0.05  # how often the DNS thread checks for shutdown()


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        request = DNSRecord.parse(data)
        reply = request.reply()
        # Answered under the name as asked, octets and all (a name rebuilt
        # from its text would lose octets dnslib writes as \DDD).
        qname = request.q.qname
        name = str(qname).rstrip(".").lower()
        kind = QTYPE[request.q.qtype]
        zone = self.server.zone
        if name not in zone:
            reply.header.rcode = RCODE.NXDOMAIN
        for value in zone.get(name, {}).get(kind, []):
            if kind == "MX":
                preference, exchange = value
                reply.add_answer(RR(qname, QTYPE.MX, rdata=MX(exchange, preference), ttl=60))
            elif kind == "A":
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(value), ttl=60))
        sock.sendto(reply.pack(), self.client_address)


class FakeDns:
    """zone: {"example.net": {"MX": [(10, "mx1.example.net")]}, "mx1.example.net": {"A": ["127.0.0.1"]}}."""

    def __init__(self, zone: dict[str, dict[str, list]]) -> None:
        self.server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _DnsHandler)
        self.server.zone = zone
        self.address = "127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(POLL_SECONDS,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    mail_options: list[str]  # the MAIL parameters, e.g. ["SIZE=300", "BODY=8BITMIME"]


class SinkHandler:
    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: list[str] = []
        self.mail_replies: list[str] = []  # for the next MAIL commands, then 250
        self.max_recipients: int | None = None  # per message; RCPTs past it get 452 4.5.3
        self.data_reply_delay = 0.0  # seconds before the reply to the final dot

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from, envelope.mail_options = address, list(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.max_recipients is not None and len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 too many recipients"
        reply = self.rcpt_replies.get(address, "250 2.1.5 OK")
        if reply.startswith("2"):  # any positive reply takes the recipient (RFC 5321 §4.2.1)
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.data_reply_delay)
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                      session.ssl is not None, list(envelope.mail_options)))
        return "250 2.0.0 OK queued"


def failing_tls_context() -> ssl.SSLContext:
    """A server context for STARTTLS whose handshake fails with any client that has no certificate.

    It demands a client certificate and allows nothing newer than TLS 1.2,
    where that demand is part of the handshake (TLS 1.3 makes it later).
    """
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example.net").configure_cert(context)
    ca.configure_trust(context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class _ScriptedSmtp(SMTP):
    """An aiosmtpd server that answers STARTTLS (offered: it has a context) or DATA with a fixed
    reply, and the next EHLO commands from ``ehlo_replies`` (None: as aiosmtpd does)."""

    def __init__(self, *args, starttls_reply: str | None, data_command_reply: str | None,
                 ehlo_replies: list[str | None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._starttls_reply = starttls_reply
        self._data_command_reply = data_command_reply
        self._ehlo_replies = ehlo_replies  # shared by the connections: a script for the next EHLOs

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        reply = self._ehlo_replies.pop(0) if self._ehlo_replies else None
        if reply is None:
            return await super().smtp_EHLO(hostname)
        await self.push(reply)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._starttls_reply is None:
            return await super().smtp_STARTTLS(arg)
        await self.push(self._starttls_reply)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self._data_command_reply is None:
            return await super().smtp_DATA(arg)
        await self.push(self._data_command_reply)


class _FreePortController(Controller):
    """aiosmtpd's Controller, on port 0: learn the bound port before the self-test connection."""

    def __init__(self, *args, starttls_reply: str | None = None, data_command_reply: str | None = None,
                 ehlo_replies: list[str | None] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._script = {"starttls_reply": starttls_reply, "data_command_reply": data_command_reply,
                        "ehlo_replies": list(ehlo_replies)}

    def factory(self) -> SMTP:
        return _ScriptedSmtp(self.handler, **self._script, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class Sink:
    def __init__(self, **controller_options) -> None:
        """``controller_options``: aiosmtpd's (``tls_context``, ``authenticator`` ...),
        ``starttls_reply``, ``data_command_reply`` and ``ehlo_replies``."""
        self.handler = SinkHandler()
        self.controller = _FreePortController(self.handler, hostname="127.0.0.1", port=0,
                                              **controller_options)
        self.controller.start()
        self.port = self.controller.port

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The messages, once there are ``count`` (fails the test after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"the sink got {len(self.messages)} of {count} messages"
            time.sleep(0.02)
        return self.messages

    def stop(self) -> None:
        self.controller.stop()


class _Drip(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        try:
            self.request.sendall(server.opening)
            if server.after_a_line:
                self.request.recv(1024)  # the client's first command
        except OSError:
            return
        for _ in range(server.count):
            try:
                self.request.sendall(server.drip)
            except OSError:
                return
            if server.stopping.wait(server.seconds):
                return


@contextlib.contextmanager
def dripping_server(drip: bytes, seconds: float, count: int, opening: bytes = b"",
                    after_a_line: bool = False) -> Iterator[tuple[str, int]]:
    """A server that sends ``opening``, reads the client's first line if
    ``after_a_line``, then sends ``drip`` every ``seconds``, ``count`` times
    at most (bound the test, should the client's deadline not hold).
    Yields its address; stopped on leaving the block."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    server.opening, server.after_a_line, server.drip, server.seconds, server.count = (
        opening, after_a_line, drip, seconds, count)
    server.stopping = threading.Event()
    threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,), daemon=True).start()
    try:
        yield server.server_address[:2]
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
