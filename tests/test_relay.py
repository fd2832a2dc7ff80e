"""The relay against a real remote side: a DNS server and an SMTP sink on 127.0.0.1.

Most tests drive one delivery attempt at a time with ``Relay.run_once()``
on a MailServer that is built but not started, so each step can be looked
at; the last ones run the delivery threads, and a real ``pymailsrv start``
process that is killed with messages in its queue.

Every MX host's address is 127.0.0.1 (where the sink listens, on the port
``relay.port`` names) or 127.0.0.3, where nothing listens on that port: a
refused connection, as from an MX host that is down.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import errno
import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import AuthResult
from dnslib import DNSLabel

from pymailsrv.config import ConfigError
from pymailsrv.dsn import build_bounce
from pymailsrv.limits import SMTP_CLIENT_REPLY_KEPT, SMTP_CLIENT_REPLY_MAX
from pymailsrv.outqueue import OutboundQueue, Outcome, QueueEntry, Recipient, RetryPolicy, State
from pymailsrv.relay import MxResolver, Relay, RouteError, _HopClient, count_hops
from pymailsrv.server import MailServer
from pymailsrv.storage import storage_error
from tests.conftest import listening_line, make_settings, start_process, wait_until
from tests.test_queue import put_broken_entries
from tests.remote_side import FakeDns, Sink, dripping_server, failing_tls_context

SENDER = "alice@localhost"  # a local user: her bounces land in her Maildir
MESSAGE = b"From: Alice <alice@localhost>\nSubject: greetings\n\nHello over there.\n.a line with a dot\n"

ZONE = {
    # MX 10 is down (nothing listens on 127.0.0.3), MX 20 is the sink.
    "example.net": {"MX": [(20, "mx2.example.net"), (10, "mx1.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.3"]},
    "mx2.example.net": {"A": ["127.0.0.1"]},
    "ordered.example": {"MX": [(30, "c.example.net"), (10, "a.example.net"), (20, "b.example.net")]},
    "a.example.net": {"A": ["127.0.0.5"]},
    "b.example.net": {"A": ["127.0.0.6"]},
    "c.example.net": {"A": ["127.0.0.7"]},
    "implicit.example": {"A": ["127.0.0.1"]},  # no MX: the domain is its own mail host
    "nullmx.example": {"MX": [(0, ".")]},  # RFC 7505: takes no mail
    "noaddress.example": {"TXT": []},  # exists, but neither MX nor A
    # We (mx.ours.example) are a backup MX, or the best one.
    "backup.example": {"MX": [(30, "c.example.net"), (20, "mx.ours.example"), (10, "a.example.net"),
                              (20, "b.example.net")]},
    "ours.example": {"MX": [(10, "MX.Ours.Example"), (20, "a.example.net")]},
    "mx.ours.example": {"A": ["127.0.0.9"]},
    # straße.example, as IDNA 2008 writes it; IDNA 2003 would ask for strasse.example.
    "xn--strae-oqa.example": {"MX": [(10, "mx.xn--strae-oqa.example")]},
    "mx.xn--strae-oqa.example": {"A": ["127.0.0.1"]},
    # Two MX hosts at one address: the sink, tried twice (the tests listen on 127.0.0.1 only).
    "twice.example": {"MX": [(10, "first.twice.example"), (20, "second.twice.example")]},
    "first.twice.example": {"A": ["127.0.0.1"]},
    "second.twice.example": {"A": ["127.0.0.1"]},
    # An MX host whose name holds raw octets (UTF-8, not an A-label): dnspython
    # writes them as \DDD, a label of 82 characters that no SNI can carry.
    "rawoctets.example": {"MX": [(10, DNSLabel([b"mx" + "ü".encode() * 10, b"weird", b"example"]))]},
    "mx" + "\\195\\188" * 10 + ".weird.example": {"A": ["127.0.0.1"]},
}


@pytest.fixture(scope="module")
def dns():
    server = FakeDns(ZONE)
    yield server
    server.stop()


@pytest.fixture
def sink():
    started = []

    def start(**options) -> Sink:
        sink = Sink(**options)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def mta(root, dns, add_user):
    """mta(sink, **relay) -> a MailServer (not started) whose relay sends to ``sink``."""
    add_user("alice")

    def build(sink: Sink | None, **relay) -> MailServer:
        relay = {"dns_server": dns.address, "min_backoff": 60.0, "port": sink.port if sink else 1, **relay}
        return MailServer(make_settings(root, relay=relay))

    return build


def maildir_messages(root: Path, user: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            for path in sorted((root / user / "new").iterdir())]


def bounced_recipient(root: Path) -> dict:
    """The one recipient block of the one bounce alice (the sender) got."""
    [bounce] = maildir_messages(root, "alice")
    _, [recipient] = delivery_status(bounce)
    return recipient


def delivery_status(bounce: email.message.EmailMessage) -> tuple[dict, list[dict]]:
    """The per-message block and the per-recipient blocks of a DSN, as dicts."""
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    human, status, headers = bounce.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    first, *recipients = status.get_payload()
    # Long fields may be folded (RFC 5322 §2.2.3); unfolded they start with a space.
    return ({name: value.strip() for name, value in first.items()},
            [{name: value.strip() for name, value in block.items()} for block in recipients])


# --- routing (RFC 5321 §5.1, RFC 7505) ------------------------------------------


def test_mx_hosts_are_tried_in_order_of_preference(dns):
    hops = MxResolver(dns.address).hops("ordered.example", 25)
    assert [hop.name for hop in hops] == ["a.example.net", "b.example.net", "c.example.net"]


def test_a_utf8_domain_is_looked_up_by_its_idna_2008_a_label(dns):
    hops = MxResolver(dns.address).hops("straße.example", 25)
    assert [(hop.name, hop.address) for hop in hops] == [("mx.xn--strae-oqa.example", "127.0.0.1")]


def test_a_backup_mx_passes_mail_only_to_better_mx_hosts(dns):
    """RFC 5321 §5.1: MX records at our own preference or worse are discarded."""
    hops = MxResolver(dns.address).hops("backup.example", 25, myself="mx.ours.example")
    assert [hop.name for hop in hops] == ["a.example.net"]


def test_mail_for_a_domain_whose_best_mx_is_ourselves_is_a_loop(dns):
    with pytest.raises(RouteError) as raised:
        MxResolver(dns.address).hops("ours.example", 25, myself="mx.ours.example")
    assert (raised.value.outcome.state, raised.value.outcome.status) == (State.FAILED, "5.4.6")
    assert "loops back to myself" in raised.value.outcome.diagnostic


def test_a_domain_without_mx_is_its_own_mail_host(dns):
    assert [(hop.name, hop.address) for hop in MxResolver(dns.address).hops("implicit.example", 25)] == [
        ("implicit.example", "127.0.0.1")]


@pytest.mark.parametrize("domain, status", [("nullmx.example", "5.1.10"), ("nowhere.example", "5.1.2"),
                                            ("noaddress.example", "5.1.2"),
                                            ("ü" * 64 + ".example", "5.1.2")])  # its A-label is too long
def test_a_domain_that_takes_no_mail_fails_at_once(dns, domain, status):
    with pytest.raises(RouteError) as raised:
        MxResolver(dns.address).hops(domain, 25)
    assert raised.value.outcome.state is State.FAILED
    assert raised.value.outcome.status == status


def test_an_unreachable_dns_server_is_a_temporary_failure():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % unused.getsockname()[1]
        resolver = MxResolver(address)
        resolver._get_resolver("example.net").lifetime = 0.3
        with pytest.raises(RouteError) as raised:
            resolver.hops("example.net", 25)
    assert raised.value.outcome.state is State.PENDING
    assert raised.value.outcome.status == "4.4.3"


def test_the_next_mx_takes_the_mail_when_the_first_refuses_connections(mta, sink):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    assert server.relay.run_once() == 1
    [received] = remote.messages
    assert received.mail_from == SENDER and received.rcpt_tos == ["bob@example.net"]
    assert server.context.queue.ids() == []  # done: nothing left in the queue


@pytest.mark.parametrize("refusal", ["421 4.3.2 shutting down", "451 4.7.1 greylisted, try again later"])
def test_the_next_mx_takes_the_mail_when_the_first_refuses_mail_for_now(mta, sink, refusal):
    # RFC 5321 §5.1: each host is tried "until a delivery attempt succeeds".
    remote = sink()
    remote.handler.mail_replies.append(refusal)
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@twice.example"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["bob@twice.example"]]
    assert server.context.queue.ids() == []


def test_implicit_mx_delivery(mta, sink):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["carol@implicit.example"], MESSAGE)
    server.relay.run_once()
    assert remote.messages[0].rcpt_tos == ["carol@implicit.example"]


def test_null_mx_fails_at_once_and_bounces_with_status_5_1_10(mta, sink, root):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["dan@nullmx.example"], MESSAGE)
    server.relay.run_once()
    assert remote.messages == [] and server.context.queue.ids() == []
    recipient = bounced_recipient(root)
    assert recipient["Final-Recipient"] == "rfc822; dan@nullmx.example"
    assert recipient["Status"] == "5.1.10"


# --- what is sent ------------------------------------------------------------------


def test_the_message_goes_out_with_crlf_stuffed_dots_and_without_return_path(mta, sink):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], b"Return-Path: <alice@localhost>\n" + MESSAGE)
    server.relay.run_once()
    # aiosmtpd undoes the dot-stuffing; the text arrives as it was, in CRLF.
    assert remote.messages[0].content == MESSAGE.replace(b"\n", b"\r\n")


def _untrusted_certificate_context() -> ssl.SSLContext:
    """A certificate for the MX host from a CA nobody trusts."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx2.example.net").configure_cert(context)
    return context


def test_opportunistic_starttls_is_used_when_offered_without_checking_the_certificate(mta, sink):
    remote = sink(tls_context=_untrusted_certificate_context())
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert remote.messages[0].tls  # a CA nobody trusts, and still encrypted


@pytest.mark.parametrize("recipient, sni", [
    ("bob@example.net", "mx2.example.net"),  # the MX host's name, not the address we connect to
    ("bob@[127.0.0.1]", None),  # RFC 6066 §3: SNI carries host names only, never "[127.0.0.1]"
])
def test_starttls_names_the_mail_host_in_sni(mta, sink, recipient, sni):
    context = _untrusted_certificate_context()
    names = []
    context.sni_callback = lambda connection, name, context: names.append(name)
    remote = sink(tls_context=context)
    server = mta(remote)
    server.context.queue.enqueue(SENDER, [recipient], MESSAGE)
    server.relay.run_once()
    assert remote.messages[0].tls and names == [sni]


BROKEN_STARTTLS = {
    "the handshake fails": lambda: {"tls_context": failing_tls_context()},
    "STARTTLS is refused": lambda: {"tls_context": _untrusted_certificate_context(),
                                    "starttls_reply": "454 4.7.0 TLS not available due to temporary reason"},
    # Over smtplib's 8192 octets: it makes up a reply of its own, "500 Line too long."
    "STARTTLS is answered with a line too long": lambda: {"tls_context": _untrusted_certificate_context(),
                                                          "starttls_reply": "454 " + "x" * 9000},
}


@pytest.mark.parametrize("broken", BROKEN_STARTTLS)
def test_an_mx_whose_starttls_fails_gets_the_mail_in_plaintext(mta, sink, caplog, broken):
    """RFC 7435: TLS is opportunistic, so a failure of it must not hold the mail back."""
    remote = sink(**BROKEN_STARTTLS[broken]())
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    with caplog.at_level(logging.WARNING, logger="pymailsrv.relay"):
        server.relay.run_once()
    [received] = remote.messages
    assert not received.tls and received.rcpt_tos == ["bob@example.net"]
    assert server.context.queue.ids() == []
    [warning] = [record.getMessage() for record in caplog.records if record.name == "pymailsrv.relay"]
    assert warning.startswith("mx2.example.net[127.0.0.1]:") and warning.endswith("; delivering without TLS")


EIGHT_BIT_MESSAGE = b"From: Alice <alice@localhost>\nSubject: greetings\n\nGr\xc3\xbc\xc3\x9fe from over here.\n"


@pytest.mark.parametrize("script", [
    {"ehlo_replies": ["451 4.3.0 temporary trouble"]},
    # RFC 3207 §4.2: after the handshake the client starts over with EHLO.
    {"ehlo_replies": [None, "421 4.3.2 too busy, try later"], "tls_context": _untrusted_certificate_context()},
], ids=["before TLS", "after STARTTLS"])
def test_an_ehlo_refused_for_now_is_retried_not_taken_for_a_host_without_extensions(mta, sink, root, script):
    # A 4yz is a failure for now (RFC 5321 §4.2.1), so the mail waits for the
    # retry. It used to end in HELO's session, or in one whose extensions
    # smtplib had forgotten at STARTTLS: none, so the 8-bit text was bounced
    # at once for want of 8BITMIME.
    remote = sink(**script)
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], EIGHT_BIT_MESSAGE)
    server.relay.run_once()
    [recipient] = server.context.queue.get(queue_id).pending
    refusal = script["ehlo_replies"][-1]
    assert (recipient.status, recipient.last_error) == ("4.4.2", f"smtp; {refusal}")
    assert remote.messages == [] and maildir_messages(root, "alice") == []  # nothing sent, nothing bounced


def test_a_host_that_does_not_know_ehlo_gets_the_mail_after_helo(mta, sink):
    # RFC 5321 §4.1.4: such a host answers EHLO with 500, 501, 502 or 550.
    remote = sink(ehlo_replies=["502 5.5.1 command not implemented"])
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []


def test_an_mx_whose_name_cannot_go_in_sni_gets_the_mail_in_plaintext(mta, sink):
    # ssl's idna codec refused the name: a UnicodeError that no handler
    # took for a failed STARTTLS, so every attempt failed until the bounce.
    remote = sink(tls_context=_untrusted_certificate_context())
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@rawoctets.example"], MESSAGE)
    server.relay.run_once()
    [received] = remote.messages
    assert not received.tls and received.rcpt_tos == ["bob@rawoctets.example"]


def test_a_smarthost_that_must_use_tls_is_not_sent_plaintext_when_the_handshake_fails(mta, sink):
    remote = sink(tls_context=failing_tls_context())
    server = mta(None, smarthost=f"127.0.0.1:{remote.port}", smarthost_tls="required")
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert remote.messages == []
    [recipient] = server.context.queue.get(queue_id).pending
    assert recipient.status == "4.4.2" and "TLS handshake with" in recipient.last_error


# --- outcomes per recipient, retries, bounces ----------------------------------------


def test_a_451_is_retried_after_the_backoff_and_then_delivered(mta, sink):
    remote = sink()
    remote.handler.data_replies.append("451 4.3.0 try again later")
    backoff = 1.0  # long beside the steps before the second try, stalls and all
    server = mta(remote, min_backoff=backoff)
    queue = server.context.queue
    queue_id = queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    before = time.time()
    server.relay.run_once()
    entry = queue.get(queue_id)
    [recipient] = entry.pending
    assert recipient.last_error == "smtp; 451 4.3.0 try again later" and recipient.status == "4.3.0"
    assert before + backoff <= entry.next_attempt <= time.time() + backoff
    assert server.relay.run_once() == 0  # not due yet
    time.sleep(backoff + 0.05)
    assert server.relay.run_once() == 1
    assert len(remote.messages) == 1 and queue.ids() == []


def test_one_recipient_accepted_and_one_refused_are_both_honoured(mta, sink, root):
    remote = sink()
    remote.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: no such user"
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net", "nobody@example.net"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []
    [bounce] = maildir_messages(root, "alice")
    assert bounce["To"].addresses[0].addr_spec == "alice@localhost" and bounce["Return-Path"] == "<>"
    per_message, [recipient] = delivery_status(bounce)
    assert per_message["Reporting-MTA"].startswith("dns; ")
    assert per_message["Arrival-Date"]
    assert list(per_message) == ["Reporting-MTA", "Arrival-Date", "X-Queue-ID"]  # RFC 3464 §2.2: extensions last
    assert recipient == {
        "Final-Recipient": "rfc822; nobody@example.net", "Action": "failed", "Status": "5.1.1",
        "Remote-MTA": "dns; mx2.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <nobody@example.net>: no such user",
        "Last-Attempt-Date": recipient["Last-Attempt-Date"]}
    original_header = list(bounce.iter_parts())[2].get_content()
    assert "Subject: greetings" in original_header and "Hello over there" not in original_header


def test_a_host_that_never_answered_is_no_remote_mta_in_the_bounce(mta, root):
    # RFC 3464 §2.3.5: Remote-MTA names the MTA "that reported delivery
    # status". Every host of ordered.example refuses the connection: none
    # reported anything, and the diagnostic is ours.
    server = mta(None, max_queue_lifetime=0.0)
    server.context.queue.enqueue(SENDER, ["bob@ordered.example"], MESSAGE)
    server.relay.run_once()
    recipient = bounced_recipient(root)
    assert "Remote-MTA" not in recipient
    assert recipient["Diagnostic-Code"].startswith("X-pymailsrv; connect to ")


def test_a_status_with_leading_zeros_is_not_taken_as_one(mta, sink, root):
    # RFC 3463 §2: the sub-codes have no leading zeros; "5.01.1" would have
    # gone into the bounce's Status field as it was.
    remote = sink()
    remote.handler.rcpt_replies["bob@example.net"] = "550 5.01.1 no such user"
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    recipient = bounced_recipient(root)
    assert (recipient["Status"], recipient["Diagnostic-Code"]) == ("5.0.0", "smtp; 550 5.01.1 no such user")


def test_a_host_slow_to_answer_the_final_dot_is_waited_for(mta, sink):
    # RFC 5321 §4.5.3.2.6: 10 minutes for that reply, for "a spurious timeout
    # at this point would typically result in delivery of multiple copies".
    # relay.timeout, the other steps' limit, cut it off, and the message went
    # again at the retry.
    remote = sink()
    remote.handler.data_reply_delay = 1.5
    server = mta(remote, timeout=0.5)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert len(remote.messages) == 1 and server.context.queue.ids() == []


def test_a_temporary_and_a_permanent_refusal_in_one_transaction(mta, sink, root):
    remote = sink()
    remote.handler.rcpt_replies.update({"full@example.net": "452 4.2.2 mailbox full",
                                        "gone@example.net": "550 5.1.1 gone"})
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["full@example.net", "gone@example.net"], MESSAGE)
    server.relay.run_once()
    entry = server.context.queue.get(queue_id)
    states = {recipient.address: (recipient.state, recipient.reported) for recipient in entry.recipients}
    assert states == {"full@example.net": (State.PENDING, False), "gone@example.net": (State.FAILED, True)}
    [bounce] = maildir_messages(root, "alice")
    assert [block["Final-Recipient"] for block in delivery_status(bounce)[1]] == ["rfc822; gone@example.net"]


def test_a_refused_sender_fails_every_recipient(mta, sink, root):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    remote.handler.handle_MAIL = _refuse_mail
    server.relay.run_once()
    [bounce] = maildir_messages(root, "alice")
    assert delivery_status(bounce)[1][0]["Status"] == "5.7.1"


async def _refuse_mail(server, session, envelope, address, mail_options):
    return "550 5.7.1 we do not take mail from you"


async def _take_mail_with_251(server, session, envelope, address, mail_options):
    envelope.mail_from = address
    return "251 2.1.0 sender ok"


def test_any_2xx_to_mail_or_rcpt_goes_on_to_data(mta, sink):
    # RFC 5321 §4.2.1: the first digit decides. A 251 or 252 used to end
    # the transaction as "delivered", and the text was never sent.
    remote = sink()
    remote.handler.handle_MAIL = _take_mail_with_251
    remote.handler.rcpt_replies["bob@example.net"] = "252 2.1.5 cannot verify, will accept"
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []


def test_a_2xx_to_the_data_command_sends_nothing_and_is_retried(mta, sink):
    remote = sink(data_command_reply="250 2.0.0 ok")  # where 354 belongs
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert remote.messages == []
    [recipient] = server.context.queue.get(queue_id).pending
    assert (recipient.status, recipient.last_error) == ("4.0.0", "smtp; 250 2.0.0 ok")


def test_a_remote_reply_cannot_add_fields_to_the_bounce(mta, sink, root):
    remote = sink()
    remote.handler.rcpt_replies["bob@example.net"] = (
        "550 5.1.1 Empfänger unbekannt\rFinal-Recipient: rfc822; x@evil.example\x0bAction: delivered")
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    assert (recipient["Action"], recipient["Diagnostic-Code"]) == (
        "failed", "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt\\x0dFinal-Recipient: rfc822; x@evil.example"
                  "\\x0bAction: delivered")
    human = list(bounce.iter_parts())[0].get_content()
    assert "<bob@example.net>: smtp; 550 5.1.1 Empfänger unbekannt\\x0dFinal-Recipient:" in human


def pending_after_a_multi_line_rcpt_reply(mta, sink, code: str, lines: int, width: int) -> Recipient:
    """Bob, after RCPT was answered with ``lines`` lines of ``width`` x's each and a last line 'end'."""
    remote = sink()
    remote.handler.rcpt_replies["bob@example.net"] = "\r\n".join(
        [f"{code}-4.2.1 " + "x" * width] * lines + [f"{code} 4.2.1 end"])
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert remote.messages == []
    [recipient] = server.context.queue.get(queue_id).pending
    return recipient


def test_what_is_kept_of_a_long_remote_reply_is_bounded(mta, sink):
    # Each line under 512 octets (RFC 5321 §4.5.3.1.5), but many: the whole
    # reply went into the queue, the log, 'queue list' and the bounce.
    recipient = pending_after_a_multi_line_rcpt_reply(mta, sink, "450", 20, 500)
    assert recipient.status == "4.2.1"
    text = " ".join(["4.2.1 " + "x" * 500] * 20 + ["4.2.1 end"])  # smtplib joins the lines with LF
    assert recipient.last_error == "smtp; 450 " + text[:SMTP_CLIENT_REPLY_KEPT - 1] + "…"


def test_a_reply_without_end_is_a_broken_connection_not_a_full_memory(mta, sink):
    # smtplib keeps every line of a reply until its last: a host may send
    # lines, each under its 8192 octets, until the timeout.
    recipient = pending_after_a_multi_line_rcpt_reply(mta, sink, "550", 100, 1000)
    assert recipient.status == "4.4.2"
    assert recipient.last_error.endswith(f"Connection unexpectedly closed: a reply of more than "
                                         f"{SMTP_CLIENT_REPLY_MAX} octets")


def test_a_552_to_rcpt_is_retried_not_bounced(mta, sink, root):
    # RFC 5321 §4.5.3.1.10: an old server's "too many recipients"; the
    # client "SHOULD treat a 552 code in this case as a temporary ... failure".
    remote = sink()
    remote.handler.rcpt_replies["second@example.net"] = "552 5.5.3 too many recipients"
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["first@example.net", "second@example.net"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["first@example.net"]]
    [recipient] = server.context.queue.get(queue_id).pending
    assert (recipient.address, recipient.status) == ("second@example.net", "4.5.3")
    assert recipient.last_error == "smtp; 552 5.5.3 too many recipients"
    assert maildir_messages(root, "alice") == []


def test_recipients_past_a_hosts_limit_go_in_the_next_transaction_at_once(mta, sink):
    # RFC 5321 §4.5.3.1.10: the client sends the rest in "chunks", not
    # minutes later at the next retry.
    remote = sink()
    remote.handler.max_recipients = 2
    server = mta(remote)
    recipients = [f"r{number}@example.net" for number in range(5)]
    server.context.queue.enqueue(SENDER, recipients, MESSAGE)
    assert server.relay.run_once() == 1
    assert [message.rcpt_tos for message in remote.messages] == [recipients[:2], recipients[2:4], recipients[4:]]
    assert server.context.queue.ids() == []


def test_a_utf8_recipient_does_not_take_its_ascii_co_recipients_down_with_it(mta, sink, root):
    # RFC 6531 §3.2 keeps the non-ASCII address from a server without
    # SMTPUTF8; nothing keeps an ASCII one there.
    remote = sink(enable_SMTPUTF8=False)
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["jürgen@example.net", "bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    assert (recipient["Final-Recipient"], recipient["Status"]) == ("utf-8; j\\x{FC}rgen@example.net", "5.6.7")


UTF8_HEADER = "Subject: Grüße\n\nhello\n".encode()
UTF8_BODY = "Subject: greetings\n\nGrüße\n".encode()


@pytest.mark.parametrize("message, options", [
    (MESSAGE, []),
    (UTF8_BODY, ["BODY=8BITMIME"]),
    (UTF8_HEADER, ["BODY=8BITMIME", "SMTPUTF8"]),  # RFC 6531 §3.2: a UTF-8 header asks for it
], ids=["ascii", "8-bit body", "utf-8 header"])
def test_mail_names_the_extensions_the_message_needs(mta, sink, message, options):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], message)
    server.relay.run_once()
    [received] = remote.messages
    assert [option for option in received.mail_options if not option.startswith("SIZE=")] == options


@pytest.mark.parametrize("message, lacking, status", [
    # RFC 6531 §3.2: no UTF-8 header to a host without SMTPUTF8 (X.6.9).
    (UTF8_HEADER, {"enable_SMTPUTF8": False}, "5.6.9"),
    # RFC 6152 §3: no 8-bit text to one without 8BITMIME (aiosmtpd offers it
    # only where it leaves the text as bytes); we fail it rather than convert.
    (UTF8_BODY, {"decode_data": True}, "5.6.3"),
], ids=["utf-8 header", "8-bit body"])
def test_a_message_a_host_lacks_the_extension_for_is_bounced(mta, sink, root, message, lacking, status):
    remote = sink(**lacking)
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], message)
    server.relay.run_once()
    assert remote.messages == [] and server.context.queue.ids() == []
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    assert recipient["Status"] == status


def test_a_bug_met_in_a_delivery_is_a_failed_attempt_that_still_ends_the_message(mta, sink, root, monkeypatch):
    # A failure nobody foresaw must not leave a message retried for ever,
    # never bounced: it counts as a temporary failure, so the lifetime applies.
    server = mta(sink(), max_queue_lifetime=0.0)

    def bug(*arguments):
        raise AttributeError("'str' object has no attribute 'decode'")

    monkeypatch.setattr(server.relay, "_send", bug)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert server.context.queue.get(queue_id) is None
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    # The kind of error only: its text may hold what it was handed (a
    # non-ASCII smarthost password was in the bounce's diagnostic).
    assert recipient["Diagnostic-Code"] == "X-pymailsrv; local error: AttributeError (see the server's log)"


def dying_in_the_second_call(monkeypatch, server, method: str, queue_id: str) -> dict[str, State]:
    """Run an attempt that dies, as by kill -9, in its second call of the
    relay's ``method``; the recipients' states it leaves in the queue."""
    real = getattr(server.relay, method)
    calls = []

    def dies_in_the_second(*arguments):
        calls.append(arguments)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for kill -9: nothing after it runs
        return real(*arguments)

    monkeypatch.setattr(server.relay, method, dies_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        server.relay.run_once()
    monkeypatch.setattr(server.relay, method, real)
    return {recipient.address: recipient.state for recipient in server.context.queue.get(queue_id).recipients}


def test_a_message_file_gone_from_the_queue_is_bounced_not_dropped(mta, sink, root):
    # RFC 5321 §6.1: accepted mail is delivered or reported. The entry was
    # removed with a line in the log, and the sender never heard.
    remote = sink()
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.context.queue.message_path(queue_id).unlink()
    server.relay.run_once()
    assert remote.messages == [] and server.context.queue.ids() == []
    recipient = bounced_recipient(root)
    assert (recipient["Status"], recipient["Diagnostic-Code"]) == (
        "5.3.0", "X-pymailsrv; the message file is gone from the queue")


def unreadable(path: Path) -> None:
    """Make ``path`` a file no read gets through (as root, permissions would not stop one; EIO is the real case)."""
    path.unlink()
    path.symlink_to(path.name)  # itself: ELOOP


def test_a_message_file_that_cannot_be_read_backs_off_and_is_bounced_at_the_lifetime(mta, sink, root):
    # It raised out of the attempt: retried every min_backoff for ever,
    # never recorded, so never expired, never bounced.
    remote = sink()
    server = mta(remote, max_queue_lifetime=0.0)
    queue = server.context.queue
    queue_id = queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    unreadable(queue.message_path(queue_id))
    server.relay.run_once()
    assert remote.messages == [] and queue.ids() == []
    recipient = bounced_recipient(root)
    assert (recipient["Status"], recipient["Diagnostic-Code"]) == (
        "4.3.0", "X-pymailsrv; cannot read the message file: Too many levels of symbolic links")


def test_a_message_file_that_cannot_be_read_is_a_failed_attempt(mta, sink):
    server = mta(sink())
    queue = server.context.queue
    queue_id = queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    unreadable(queue.message_path(queue_id))
    before = time.time()
    server.relay.run_once()
    entry = queue.get(queue_id)
    assert entry.attempts == 1 and entry.next_attempt >= before + 60  # min_backoff
    assert entry.pending[0].last_error == "X-pymailsrv; cannot read the message file: Too many levels of symbolic links"


def test_a_crash_between_two_hosts_sends_nothing_again_to_the_first(mta, sink, monkeypatch):
    # One message to two domains is two transactions. The server dying in
    # the second used to leave the first domain's recipient pending, sent
    # again after the restart.
    remote = sink()
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net", "carol@implicit.example"], MESSAGE)
    states = dying_in_the_second_call(monkeypatch, server, "_send", queue_id)
    assert states == {"bob@example.net": State.DELIVERED, "carol@implicit.example": State.PENDING}
    server.relay.attempt(queue_id)  # the retry, after the restart
    assert sorted(rcpt for message in remote.messages for rcpt in message.rcpt_tos) == [
        "bob@example.net", "carol@implicit.example"]
    assert server.context.queue.get(queue_id) is None


def test_a_crash_between_two_chunks_for_one_host_sends_nothing_again_to_the_first(mta, sink, monkeypatch):
    # Past a host's recipient limit the rest go to it in a next transaction
    # (RFC 5321 §4.5.3.1.10). The server dying in that one used to leave the
    # first chunk's recipients pending, sent again after the restart.
    remote = sink()
    remote.handler.max_recipients = 2
    server = mta(remote)
    recipients = [f"r{number}@example.net" for number in range(3)]
    queue_id = server.context.queue.enqueue(SENDER, recipients, MESSAGE)
    states = dying_in_the_second_call(monkeypatch, server, "_mail", queue_id)
    assert states == {"r0@example.net": State.DELIVERED, "r1@example.net": State.DELIVERED,
                      "r2@example.net": State.PENDING}
    server.relay.attempt(queue_id)  # the retry, after the restart
    assert [message.rcpt_tos for message in remote.messages] == [recipients[:2], recipients[2:]]
    assert server.context.queue.get(queue_id) is None


def test_a_message_the_host_took_is_written_down_before_quit(mta, sink, monkeypatch):
    # The host has the message once it answers 250 to the final dot (RFC 5321
    # §6.1). A server stopped or killed while QUIT's reply was slow to come
    # used to find the recipient still pending after the restart, and send
    # the message again.
    remote = sink()
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)

    def killed_waiting_for_quits_reply(client):
        raise KeyboardInterrupt  # stands in for kill -9: nothing after it runs

    monkeypatch.setattr(_HopClient, "quit", killed_waiting_for_quits_reply)
    with pytest.raises(KeyboardInterrupt):
        server.relay.run_once()
    monkeypatch.undo()
    [recipient] = server.context.queue.get(queue_id).recipients
    assert recipient.state is State.DELIVERED
    server.relay.attempt(queue_id)  # after the restart
    assert len(remote.messages) == 1 and server.context.queue.get(queue_id) is None


def test_a_utf8_address_is_bounced_with_the_utf8_address_type(mta, sink, root):
    # RFC 6533 §3: "utf-8;" and the address in utf-8-addr-xtext form.
    server = mta(sink(enable_SMTPUTF8=False))
    server.context.queue.enqueue(SENDER, ["jürgen+x@example.net"], MESSAGE)
    server.relay.run_once()
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    assert (recipient["Final-Recipient"], recipient["Status"]) == ("utf-8; j\\x{FC}rgen\\x{2B}x@example.net", "5.6.7")


def test_bounce_fields_are_written_as_they_are_never_as_encoded_words():
    # Refolded, long fields became RFC 2047 "=?utf-8?b?...?=", which RFC
    # 3464's fields do not have; a status in other digits is no status.
    long_reply = "smtp; 550 5.1.1 see https://help.example.net/" + "x" * 120
    failed = Recipient("测试用户名字@例子.公司", State.FAILED, status="5.١.١", last_error=long_reply,
                       remote_mta="mx.example.net")
    entry = QueueEntry("Q1", SENDER, [failed], created=0.0, next_attempt=0.0)
    bounce = email.message_from_bytes(build_bounce(entry, [failed], MESSAGE, "mx.ours.example", 0.0),
                                      policy=email.policy.default)
    [recipient] = delivery_status(bounce)[1]
    assert recipient["Final-Recipient"] == (
        "utf-8; \\x{6D4B}\\x{8BD5}\\x{7528}\\x{6237}\\x{540D}\\x{5B57}@\\x{4F8B}\\x{5B50}.\\x{516C}\\x{53F8}")
    assert (recipient["Status"], recipient["Diagnostic-Code"]) == ("5.0.0", long_reply)


def test_a_long_remote_reply_makes_no_bounce_line_a_server_would_refuse():
    # A 21-line 550, joined into one diagnostic: 1,347 octets on one line of
    # a 7bit part, which the sender's server refused (RFC 5321 §4.5.3.1.6).
    reply = "smtp; 550 5.1.1 " + " ".join(f"line {n:02} of the reason, at some length" for n in range(21))
    failed = Recipient("bob@example.net", State.FAILED, status="5.1.1", last_error=reply)
    entry = QueueEntry("Q1", SENDER, [failed], created=0.0, next_attempt=0.0)
    raw = build_bounce(entry, [failed], MESSAGE, "mx.ours.example", 0.0)
    assert max(len(line) for line in raw.split(b"\n")) <= 998
    human = list(email.message_from_bytes(raw, policy=email.policy.default).iter_parts())[0].get_content()
    assert "line 20 of the reason" in human and max(len(line) for line in human.splitlines()) <= 76


def test_a_bounce_quotes_only_the_header_of_a_message_that_has_no_empty_line():
    # A log piped to sendmail: no empty line, so "everything before it" was the whole message.
    original = b"Subject: nightly log\nFrom: cron@example.org\n" + b"2026-12-07 12:00:00 all is well\n" * 50_000
    failed = Recipient("bob@example.net", State.FAILED, status="5.1.1", last_error="smtp; 550 5.1.1 no")
    entry = QueueEntry("Q1", SENDER, [failed], created=0.0, next_attempt=0.0)
    bounce = email.message_from_bytes(build_bounce(entry, [failed], original, "mx.ours.example", 0.0),
                                      policy=email.policy.default)
    assert list(bounce.iter_parts())[2].get_content() == "Subject: nightly log\nFrom: cron@example.org\n"


def refused_once(mta, sink, sender: str) -> tuple[MailServer, Sink]:
    """A message from ``sender`` to an address the remote refuses, after one pass of the relay."""
    remote = sink()
    remote.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    server = mta(remote)
    server.context.queue.enqueue(sender, ["nobody@example.net"], MESSAGE)
    server.relay.run_once()
    return server, remote


def test_a_bounce_to_a_utf8_sender_has_a_utf8_header(mta, sink):
    # Fails nobody@, queues the bounce, delivers the bounce by SMTPUTF8.
    _, remote = refused_once(mta, sink, "jürgen@example.net")
    [bounce] = remote.messages
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["jürgen@example.net"]
    parsed = email.message_from_string(bounce.content.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert parsed["To"].addresses[0].addr_spec == "jürgen@example.net"
    assert delivery_status(parsed)[1][0]["Final-Recipient"] == "rfc822; nobody@example.net"


def test_a_message_from_the_null_sender_is_never_bounced(mta, sink, root):
    server, _ = refused_once(mta, sink, "")
    assert server.context.queue.ids() == []  # dropped, not bounced
    assert maildir_messages(root, "alice") == []
    assert server.relay.run_once() == 0


def test_a_bounce_to_an_outside_sender_is_queued_from_the_null_path(mta, sink):
    _, remote = refused_once(mta, sink, "erin@example.net")  # fails nobody@, queues and delivers the bounce
    [bounce] = remote.messages
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["erin@example.net"]
    parsed = email.message_from_bytes(bounce.content, policy=email.policy.default)
    assert delivery_status(parsed)[1][0]["Final-Recipient"] == "rfc822; nobody@example.net"


def test_a_message_that_stays_deferred_too_long_fails_with_its_last_error(mta, sink, root):
    remote = sink()
    remote.handler.data_replies.append("451 4.3.0 try again later")
    server = mta(remote, max_queue_lifetime=0.0)
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    [bounce] = maildir_messages(root, "alice")
    [recipient] = delivery_status(bounce)[1]
    # RFC 3464 §2.3.3: a failed recipient may keep its last, temporary status.
    assert (recipient["Action"], recipient["Status"]) == ("failed", "4.3.0")
    # §2.3.6: the Diagnostic-Code is the remote's reply; why we gave up is
    # said in the text for the person.
    assert recipient["Diagnostic-Code"] == "smtp; 451 4.3.0 try again later"
    human = " ".join(next(bounce.iter_parts()).get_content().split())  # unwrapped
    assert "<bob@example.net>: smtp; 451 4.3.0 try again later (gave up after 0s in the queue)" in human


def test_a_message_with_more_than_30_received_fields_is_failed_as_a_loop(mta, sink, root):
    remote = sink()
    server = mta(remote)
    looping = b"".join(b"Received: from hop%d by hop%d\n" % (n, n + 1) for n in range(31)) + MESSAGE
    assert count_hops(looping) == 31
    server.context.queue.enqueue(SENDER, ["bob@example.net"], looping)
    server.relay.run_once()
    assert remote.messages == []
    [bounce] = maildir_messages(root, "alice")
    assert delivery_status(bounce)[1][0]["Status"] == "5.4.6"


def test_thirty_received_fields_still_pass(mta, sink):
    remote = sink()
    server = mta(remote)
    server.context.queue.enqueue(SENDER, ["bob@example.net"],
                                 b"Received: from a by b\n" * 30 + MESSAGE)
    server.relay.run_once()
    assert len(remote.messages) == 1


def test_a_host_that_drips_its_reply_is_given_up_within_the_timeout(mta):
    # smtplib times each read, and each line came in time: only a deadline on
    # the whole reply (RFC 5321 §4.5.3.2) frees the delivery thread. The host
    # greets, then answers EHLO with a '250-' line every 0.2 s, never the last
    # (a minute at most, should the deadline not hold).
    with dripping_server(b"250-still talking\r\n", 0.2, 300, opening=b"220 drip.example ESMTP\r\n",
                         after_a_line=True) as (_, port):
        server = mta(None, port=port, timeout=1.0)
        queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
        started = time.monotonic()
        server.relay.run_once()
        assert time.monotonic() - started < 5.0
        [recipient] = server.context.queue.get(queue_id).pending
        assert recipient.status == "4.4.2" and "failed before MAIL" in recipient.last_error


def test_a_stop_that_waits_for_a_delivery_says_so(mta, caplog):
    # A host that greets and then drips held the stop up for 5 s, unexplained.
    with dripping_server(b"250-still talking\r\n", 0.2, 100, opening=b"220 drip.example ESMTP\r\n",
                         after_a_line=True) as (_, port):
        server = mta(None, port=port)
        server.relay.start()
        server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
        wait_until(lambda: server.relay._in_flight, what="the delivery to start")
        with caplog.at_level(logging.INFO, logger="pymailsrv.relay"):
            server.relay.stop()
    assert ("stopping: waiting up to 5s for 1 delivery under way; what is not done stays queued"
            in caplog.messages)


def test_an_unreachable_host_is_retried_later(mta, sink):
    server = mta(None)  # port 1: nothing listens there
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    [recipient] = server.context.queue.get(queue_id).pending
    assert recipient.status == "4.4.1" and "Connection refused" in recipient.last_error


# --- local recipients and aliases --------------------------------------------------------


def test_an_alias_forwards_outside_keeping_the_original_sender(mta, sink, root, add_user):
    remote = sink()
    server = mta(remote)
    add_user("frank")
    server.context.aliases.add("team", ["frank", "bob@example.net"])
    server.context.queue.enqueue("someone@example.org", ["team@localhost"], MESSAGE)
    server.relay.run_once()  # team@localhost: frank's Maildir, and a new entry for bob
    assert len(maildir_messages(root, "frank")) == 1
    assert maildir_messages(root, "frank")[0]["Return-Path"] == "<someone@example.org>"
    [received] = remote.messages
    assert received.mail_from == "someone@example.org" and received.rcpt_tos == ["bob@example.net"]


def test_an_alias_whose_maildir_fails_forwards_outside_only_once(mta, sink, root, add_user):
    """The outside copy is held until the local one is in, and taken back when it fails: retries do not repeat it."""
    remote = sink()
    server = mta(remote)
    add_user("frank")
    server.context.aliases.add("team", ["frank", "bob@example.net"])
    new = root / "frank" / "new"
    new.rmdir()
    new.write_bytes(b"")  # frank's Maildir is broken: new/ is a file
    queue_id = server.context.queue.enqueue("someone@example.org", ["team@localhost"], MESSAGE)
    server.relay.run_once()
    [recipient] = server.context.queue.get(queue_id).pending
    assert recipient.status == "4.3.0" and "local delivery failed" in recipient.last_error
    assert server.context.queue.ids() == [queue_id] and remote.messages == []
    new.unlink()
    new.mkdir()  # repaired
    server.context.queue.flush()
    server.relay.run_once()
    assert len(maildir_messages(root, "frank")) == 1
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []


def test_an_alias_whose_outside_copy_cannot_be_queued_delivers_nothing_until_it_can(mta, sink, root, add_user,
                                                                                     monkeypatch):
    """All or nothing: with the local copy first, every retry while the queue
    refused the outside copy gave frank the message once more."""
    remote = sink()
    server = mta(remote)
    add_user("frank")
    server.context.aliases.add("team", ["frank", "bob@example.net"])
    queue = server.context.queue
    queue_id = queue.enqueue("someone@example.org", ["team@localhost"], MESSAGE)

    def refused():  # as a queue/tmp/ that the server may not write to
        raise storage_error(PermissionError(errno.EACCES, "Permission denied"), "creating a file in queue/tmp/")

    monkeypatch.setattr(queue, "receive", refused)
    for _ in range(2):
        queue.flush()
        server.relay.run_once()
        [recipient] = queue.get(queue_id).pending
        assert recipient.status == "4.3.0" and "local delivery failed" in recipient.last_error
        assert maildir_messages(root, "frank") == [] and remote.messages == []
    monkeypatch.undo()  # mended
    queue.flush()
    server.relay.run_once()
    assert len(maildir_messages(root, "frank")) == 1
    assert [message.rcpt_tos for message in remote.messages] == [["bob@example.net"]]
    assert server.context.queue.ids() == []


def test_an_unknown_local_recipient_fails_with_5_1_1(mta, root):
    server = mta(None)
    server.context.queue.enqueue(SENDER, ["nobody@localhost"], MESSAGE)
    server.relay.run_once()
    assert delivery_status(maildir_messages(root, "alice")[0])[1][0]["Status"] == "5.1.1"


def test_a_local_recipient_while_the_aliases_cannot_be_read_waits_and_is_one_log_line(mta, root, caplog):
    # The admin's to mend: the mail waits for the retry, and the log says
    # why in one line (it logged a traceback, as for a bug of ours).
    server = mta(None)
    queue_id = server.context.queue.enqueue(SENDER, ["alice@localhost"], MESSAGE)
    (root / ".pymailsrv" / "aliases").mkdir()  # unreadable as a file, even to root
    with caplog.at_level(logging.INFO, logger="pymailsrv.relay"):
        server.relay.run_once()
    [recipient] = server.context.queue.get(queue_id).pending
    assert recipient.status == "4.3.0" and "aliases cannot be read: Is a directory" in recipient.last_error
    [logged] = [record for record in caplog.records if record.name == "pymailsrv.relay"]
    assert logged.getMessage() == f"{queue_id}: to=<alice@localhost> relay=none pending: {recipient.last_error}"
    assert logged.exc_info is None


# --- the smarthost ---------------------------------------------------------------------------


def test_a_smarthost_takes_all_mail_whatever_the_domains_mx(mta, sink):
    remote = sink()
    server = mta(None, smarthost=f"127.0.0.1:{remote.port}")
    server.context.queue.enqueue(SENDER, ["x@nullmx.example", "y@nowhere.example"], MESSAGE)
    server.relay.run_once()
    assert remote.messages[0].rcpt_tos == ["x@nullmx.example", "y@nowhere.example"]


def test_a_smarthost_with_verified_tls_and_auth(mta, sink, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password, session.ssl is not None))
        return AuthResult(success=auth_data.password == b"s3cret")

    remote = sink(tls_context=server_context, authenticator=authenticator, auth_require_tls=True)
    server = mta(None, smarthost=f"localhost:{remote.port}", smarthost_tls="verified",
                 smarthost_ca_file=str(ca_file), smarthost_user="relay", smarthost_password="s3cret")
    server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert logins == [(b"relay", b"s3cret", True)]
    assert remote.messages[0].tls


def test_a_smarthost_password_goes_only_where_the_certificate_was_checked_unless_told_otherwise(mta, sink, caplog):
    # With smarthost_tls left at "opportunistic", the password went to any
    # certificate: whoever stood between the hosts could take it.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(server_context)  # a CA the relay does not trust
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append(auth_data.login)
        return AuthResult(success=True)

    remote = sink(tls_context=server_context, authenticator=authenticator, auth_require_tls=True)
    login = {"smarthost": f"localhost:{remote.port}", "smarthost_user": "relay", "smarthost_password": "s3cret"}
    server = mta(None, **login)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert logins == [] and remote.messages == []
    assert server.context.queue.get(queue_id).pending[0].status == "4.4.2"
    # Told otherwise, it goes, and the server warns as it starts.
    server = mta(None, smarthost_tls="required", **login)
    server.context.queue.enqueue(SENDER, ["carol@example.net"], MESSAGE)
    server.relay.run_once()
    assert logins == [b"relay"] and remote.messages[0].rcpt_tos == ["carol@example.net"]
    with caplog.at_level(logging.WARNING, logger="pymailsrv.relay"):
        server.relay.start().stop()
    assert ("relay.smarthost_tls is 'required': the smarthost password goes over TLS whose certificate is not "
            "checked, so whoever can stand between the hosts can take it") in caplog.text


def test_a_smarthost_ca_file_that_is_no_certificate_is_a_config_error(root, tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"^relay.smarthost_ca_file: cannot load '{re.escape(str(bogus))}': "):
        MailServer(make_settings(root, relay={"smarthost": "mail.example.net:587", "smarthost_tls": "verified",
                                              "smarthost_ca_file": str(bogus)}))


def test_a_smarthost_whose_certificate_does_not_verify_is_not_used(mta, sink, tmp_path):
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(server_context)
    other_ca = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    remote = sink(tls_context=server_context)
    server = mta(None, smarthost=f"localhost:{remote.port}", smarthost_tls="verified",
                 smarthost_ca_file=str(other_ca))
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    server.relay.run_once()
    assert remote.messages == []
    assert server.context.queue.get(queue_id).pending[0].status == "4.4.2"


# --- the delivery threads, and a crash -------------------------------------------------------


def test_the_running_server_delivers_what_is_enqueued(start_server, dns, sink, add_user):
    remote = sink()
    server = start_server(relay={"dns_server": dns.address, "port": remote.port})
    server.context.queue.enqueue("x@example.org", ["bob@example.net"], MESSAGE)
    remote.wait_for(1)


def test_broken_queue_files_neither_stop_the_delivery_threads_nor_the_good_mail(start_server, dns, sink, caplog):
    remote = sink()
    server = start_server(relay={"dns_server": dns.address, "port": remote.port, "queue_scan_interval": 0.05})
    queue = server.context.queue
    # First the queue directory is a file for a while: every look into it
    # fails, and that is said once (it was once a scan, as the workers that
    # did not look took it for a look that worked).
    queue.directory.write_bytes(b"not a directory")
    time.sleep(0.3)  # several looks, by every worker
    assert [record.getMessage() for record in caplog.records].count(
        "cannot look into the queue ([Errno 20] Not a directory: "
        f"{str(queue.directory)!r}); trying again every 0.05s") == 1
    queue.directory.unlink()
    # Then it holds broken entries beside the good one.
    put_broken_entries(queue)
    queue.enqueue("x@example.org", ["bob@example.net"], MESSAGE)
    [received] = remote.wait_for(1)
    assert received.rcpt_tos == ["bob@example.net"]
    assert all(thread.is_alive() for thread in server.relay._threads)


class _DiskFullQueue(OutboundQueue):
    """A queue whose disk fills up just as an attempt's outcome is written down."""

    def record(self, queue_id, outcomes, now=None):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_message_whose_outcome_cannot_be_recorded_is_not_sent_again_at_once(root, dns, sink, caplog):
    """The envelope's next_attempt never moves, so the relay postpones the message in memory."""
    remote = sink()
    settings = make_settings(root, relay={"dns_server": dns.address, "port": remote.port,
                                          "min_backoff": 60.0, "queue_scan_interval": 0.05})
    server = MailServer(settings)
    server.context = dataclasses.replace(server.context, queue=_DiskFullQueue(
        settings.state_dir, RetryPolicy.from_settings(settings.relay)))
    server.relay = Relay(server.context)
    server.start()
    try:
        queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
        remote.wait_for(1)
        time.sleep(1.0)  # not postponed, the message went to the sink ~1000 times a second
        assert len(remote.messages) == 1
        # The disk's complaint is one line, without a traceback.
        [failure] = [record for record in caplog.records if "it stays queued" in record.getMessage()]
        assert failure.getMessage() == (f"delivery of {queue_id} failed ([Errno 28] No space left on device); "
                                        "it stays queued, tried again in 60s")
        assert failure.levelno == logging.ERROR and not failure.exc_info
        assert "Traceback" not in caplog.text
    finally:
        server.stop()


def test_a_message_sent_but_not_recorded_is_recorded_before_it_is_sent_again(mta, sink):
    # A directory where the envelope's new version is written: the disk
    # refuses the record of a delivery that happened.
    remote = sink()
    server = mta(remote)
    queue_id = server.context.queue.enqueue(SENDER, ["bob@example.net"], MESSAGE)
    obstacle = server.context.queue.directory / f"{queue_id}.json.tmp"
    obstacle.mkdir()
    for _ in range(3):
        with pytest.raises(IsADirectoryError):
            server.relay.attempt(queue_id)
    assert len(remote.messages) == 1
    assert [recipient.state for recipient in server.context.queue.get(queue_id).recipients] == [State.PENDING]
    obstacle.rmdir()
    server.relay.attempt(queue_id)  # the delivery is written down, and the entry is done
    assert server.context.queue.get(queue_id) is None
    assert len(remote.messages) == 1


def test_a_bounce_sent_but_not_recorded_is_recorded_before_another_could_go(mta):
    server = mta(None)
    queue = server.context.queue
    queue_id = queue.enqueue("erin@example.org", ["nobody@example.net"], MESSAGE)
    queue.record(queue_id, {"nobody@example.net": Outcome(State.FAILED, "5.1.1", "smtp; 550 5.1.1 no such user")})
    obstacle = queue.directory / f"{queue_id}.json.tmp"  # the disk refuses to write down the report
    obstacle.mkdir()
    for _ in range(3):
        with pytest.raises(IsADirectoryError):
            server.relay.attempt(queue_id)
    bounces = [other for other in queue.ids() if other != queue_id]
    assert len(bounces) == 1 and queue.get(bounces[0]).sender == ""
    obstacle.rmdir()
    server.relay.attempt(queue_id)  # the report is written down, and the entry is done
    assert queue.ids() == bounces


def test_a_killed_server_delivers_its_queue_after_restart(root, sink, tmp_path):
    """kill -9 with messages queued and deferred; the next start delivers them all."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]  # nothing listens here once closed
    config = tmp_path / "pymailsrv.toml"
    config.write_text("[relay]\nmin_backoff = 0.2\nqueue_scan_interval = 0.1\n")
    queue = OutboundQueue(root / ".pymailsrv")
    ids = [queue.enqueue("x@example.org", [f"r{n}@example.net"], MESSAGE) for n in range(3)]

    first = _start_process(root, config, f"127.0.0.1:{nowhere}")
    try:
        wait_until(lambda: all(queue.get(queue_id).attempts for queue_id in ids), what="each one tried and deferred")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    assert sorted(queue.ids()) == sorted(ids)

    remote = sink()
    second = _start_process(root, config, f"127.0.0.1:{remote.port}")
    try:
        received = remote.wait_for(3)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=10)
    assert sorted(address for message in received for address in message.rcpt_tos) == [
        "r0@example.net", "r1@example.net", "r2@example.net"]
    assert queue.ids() == []


def _start_process(root: Path, config: Path, smarthost: str) -> subprocess.Popen:
    process = start_process(root, "--config", str(config), "--smarthost", smarthost)
    try:
        listening_line(process)
    except BaseException:  # pytest.fail's too
        process.kill()
        process.wait(timeout=10)
        raise
    # Keep reading stderr so the server never blocks on a full pipe.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process


# --- from SMTP in to the remote side: the session queues, the relay sends ----------------------


@pytest.fixture
def relaying_server(start_server, dns, sink, add_user):
    """(server, sink): a running server whose relay reaches the sink as example.net's MX."""
    add_user("alice")
    remote = sink()
    server = start_server(relay={"dns_server": dns.address, "port": remote.port})
    return server, remote


def test_mail_to_an_alias_that_points_outside_is_relayed_with_the_original_sender(relaying_server):
    server, remote = relaying_server
    server.context.aliases.add("carol", ["carol@example.net", "alice"])
    with smtplib.SMTP(*server.addresses["smtp"], timeout=10) as client:
        client.sendmail("x@example.org", ["carol@localhost"], b"Subject: forwarded\r\n\r\nhello\r\n")
    [received] = remote.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("x@example.org", ["carol@example.net"])
    assert b"Subject: forwarded" in received.content and b"Return-Path" not in received.content
    assert len(server.context.store.messages("alice")) == 1  # the alias keeps a local copy too


def test_a_local_copy_that_fails_takes_the_outside_copy_back_before_it_is_sent(relaying_server, root):
    """451 means nothing was delivered: the outside copy is held from the relay until the local ones are in."""
    server, remote = relaying_server
    server.context.aliases.add("carol", ["carol@example.net", "alice"])
    new = root / "alice" / "new"
    new.rmdir()
    new.write_bytes(b"")  # alice's Maildir is broken: new/ is a file
    with smtplib.SMTP(*server.addresses["smtp"], timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("x@example.org", ["carol@localhost"], b"Subject: forwarded\r\n\r\nhello\r\n")
    assert refused.value.smtp_code == 451
    server.relay.wake()
    time.sleep(0.5)  # time enough for a worker to send anything it was given
    assert remote.messages == [] and server.context.queue.ids() == []


def test_a_queue_that_cannot_take_the_message_refuses_data_and_leaves_nothing(relaying_server, root, caplog):
    server, remote = relaying_server
    server.context.aliases.add("carol", ["carol@example.net", "alice"])
    queue = server.context.queue.directory
    shutil.rmtree(queue, ignore_errors=True)
    queue.write_bytes(b"")  # the queue directory is a file
    with smtplib.SMTP(*server.addresses["smtp"], timeout=10) as client:
        client.ehlo()
        client.mail("x@example.org")
        assert client.rcpt("carol@localhost")[0] == 250
        code, reply = client.docmd("DATA")
    assert (code, reply) == (451, b"4.3.0 local error in processing, try again later")
    assert "Traceback" not in caplog.text
    assert list((root / "alice" / "tmp").iterdir()) == []  # the local copy begun is thrown away


def test_a_bounce_to_a_quoted_local_sender_reaches_her(mta, sink, root):
    # RFC 5321 §4.1.2: "alice"@localhost is alice@localhost.
    refused_once(mta, sink, '"alice"@localhost')
    [bounce] = maildir_messages(root, "alice")
    assert delivery_status(bounce)[1][0]["Final-Recipient"] == "rfc822; nobody@example.net"


def test_an_authenticated_client_reaches_another_domain_through_the_queue(relaying_server):
    server, remote = relaying_server
    with smtplib.SMTP(*server.addresses["smtp"], timeout=10) as client:
        client.login("alice", "correct horse")
        # One mailbox twice, quoted and plain (RFC 5321 §4.1.2: "all quoted
        # forms MUST be treated as equivalent"): it used to be queued twice.
        refused = client.sendmail("alice@localhost", ['"bob"@example.net', "bob@example.net"],
                                  b"Subject: out\r\n\r\nbye\r\n")
    assert refused == {}
    [received] = remote.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("alice@localhost", ["bob@example.net"])
    received_header = email.message_from_bytes(received.content, policy=email.policy.default)["Received"]
    assert " with ESMTPA id " in received_header
