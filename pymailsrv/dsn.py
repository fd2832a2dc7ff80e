"""Bounces: delivery status notifications (RFC 3464) built with ``email``.

When mail cannot be delivered, the sender hears of it through a message to
the envelope's reverse-path (RFC 5321 §4.5.5, §6.1), sent with the null
reverse-path ``<>`` so that a bounce can never itself bounce. Its shape is
RFC 3464's (with RFC 6522's multipart/report)::

    multipart/report; report-type=delivery-status
    ├── text/plain                 for the person: what failed, and why
    ├── message/delivery-status    for programs: one block for the message
    │                              (Reporting-MTA, Arrival-Date), then one per
    │                              recipient (Final-Recipient, Action, Status,
    │                              Remote-MTA, Diagnostic-Code, Last-Attempt-Date)
    └── text/rfc822-headers        the original message's header, not its body

Every field is built by the standard library's ``email`` package; nothing
here formats MIME by hand. Statuses are RFC 3463 codes; a diagnostic keeps
the remote server's own reply ("smtp; 550 5.1.1 ...", RFC 3464 §2.3.6).

A remote reply is text from a stranger: its control characters become
spaces, so it cannot end a field and start one of its own. The delivery
status is ASCII: a UTF-8 address there is written in RFC 6533 §3's form
(``utf-8; j\\x{FC}rgen@...``), and we borrow its ``\\x{E4}`` notation for
other characters in a diagnostic. The text for the person keeps them.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import textwrap
from collections.abc import Iterable
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from pymailsrv.outqueue import ENHANCED_STATUS, QueueEntry, Recipient, format_duration

# Stored like every message here: LF line ends (Maildir's convention); the
# relay turns them into CRLF on the wire. Fields are written as they are
# (refold_source="none"): refolded, a long one would get RFC 2047 encoded
# words, which RFC 3464's fields do not have.
_POLICY = email.policy.SMTP.clone(linesep="\n", refold_source="none")
# RFC 6531 §3.2: a bounce to a UTF-8 sender travels only by SMTPUTF8, so
# its header may be UTF-8 (the relay sends it on only where that is offered).
_UTF8_POLICY = _POLICY.clone(utf8=True)
# RFC 5322 §2.1.1: a line is at most 998 characters. A remote reply of many
# lines is joined into one diagnostic; it is cut to fit, with its field name.
DIAGNOSTIC_MAX = 900
# The text for the person is wrapped at the width RFC 5322 §2.1.1 advises
# (78), so a long reply gives many short lines, never one a server refuses.
TEXT_WIDTH = 76
# Postfix's header_size_limit: the most of the original header a bounce
# quotes. A "header" without an end (a log piped to sendmail) is no reason
# to send the whole message back.
ORIGINAL_HEADER_MAX = 102_400

# C0, DEL, C1 and the Unicode line and paragraph separators: the email
# package (str.splitlines) would end a field at several of them.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 5322 §2.2: a field name (printable ASCII but ":") and its colon, or
# white space that continues the field before (§2.2.3).
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")
# RFC 6533 §3, QCHAR: what utf-8-addr-xtext writes as itself.
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


def _one_line(text: str) -> str:
    return _LINE_BREAKING.sub(" ", text)


def _embedded_unicode(char: str) -> str:
    return f"\\x{{{ord(char):X}}}"  # RFC 6533 §3, EmbeddedUnicodeChar


def _ascii_field(text: str) -> str:
    """A delivery-status field's text: one line, other characters as ``\\x{HHHH}``."""
    return "".join(char if char.isascii() else _embedded_unicode(char) for char in _one_line(text))


def _final_recipient(address: str) -> str:
    """RFC 3464 §2.3.2, with RFC 6533 §3's "utf-8" address type for a UTF-8 address."""
    if address.isascii():
        return f"rfc822; {_one_line(address)}"
    return "utf-8; " + "".join(char if _QCHAR.fullmatch(char) else _embedded_unicode(char) for char in address)


def original_header(message: bytes) -> str:
    """The header section of a message: its lines up to the first that is
    neither a field nor a field's continuation (RFC 5322 §2.2, §2.2.3),
    normally the empty line before the body; at most about ORIGINAL_HEADER_MAX."""
    end = 0
    while end < min(len(message), ORIGINAL_HEADER_MAX) and _HEADER_LINE.match(message, end):
        line_end = message.find(b"\n", end)
        end = len(message) if line_end < 0 else line_end + 1
    header = message[:end].replace(b"\r\n", b"\n").decode("utf-8", errors="replace")
    return header if header.endswith("\n") else header + "\n"


def _status_block(fields: Iterable[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def _text_part(text: str, subtype: str) -> MIMEText:
    # Plain ASCII stays readable as it is; anything else is UTF-8 (base64).
    part = MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
    del part["MIME-Version"]  # only the top-level message carries it
    return part


def build_bounce(entry: QueueEntry, failures: list[Recipient], original: bytes, reporting_mta: str,
                 now: float) -> bytes:
    """A DSN to ``entry.sender`` saying that ``failures`` failed; LF line ends."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{_one_line(entry.sender)}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid(idstring=entry.queue_id, domain=reporting_mta)
    # RFC 3834 §5: a message sent automatically in reply to another says so,
    # so that vacation programs and the like do not answer it.
    report["Auto-Submitted"] = "auto-replied"

    lines = [f"This is the mail system at {reporting_mta}.", "",
             "Your message could not be delivered to the recipients below, and we",
             "have given up on it.", ""]
    for recipient in failures:
        why = f"{recipient.last_error or recipient.status}"
        if recipient.gave_up_after is not None:
            why += f" (gave up after {format_duration(recipient.gave_up_after)} in the queue)"
        lines += textwrap.wrap(_one_line(f"<{recipient.address}>: {why}"), TEXT_WIDTH, subsequent_indent="    ")
    lines += ["", "The delivery report and the header of your message follow.", ""]
    report.attach(_text_part("\n".join(lines), "plain"))

    status = MIMEBase("message", "delivery-status")
    del status["MIME-Version"]  # only the top-level message carries it
    blocks = [_status_block([  # RFC 3464 §2.2's order: extension fields (ours, X-) last
        ("Reporting-MTA", f"dns; {reporting_mta}"),
        ("Arrival-Date", email.utils.formatdate(entry.created, localtime=True)),
        ("X-Queue-ID", entry.queue_id),
    ])]
    for recipient in failures:
        fields = [("Final-Recipient", _final_recipient(recipient.address)),
                  ("Action", "failed"),
                  # RFC 3464 §2.3.4: an RFC 3463 code, whatever the queue file says.
                  ("Status", recipient.status if ENHANCED_STATUS.fullmatch(recipient.status or "") else "5.0.0")]
        # RFC 3464 §2.3.5: Remote-MTA names the MTA "that reported delivery
        # status": one that replied. A host we could not reach, or that we
        # judged ourselves (a missing extension), reported nothing.
        if recipient.remote_mta and (recipient.last_error or "").startswith("smtp;"):
            fields.append(("Remote-MTA", f"dns; {_ascii_field(recipient.remote_mta)}"))
        if recipient.last_error:
            fields.append(("Diagnostic-Code", _ascii_field(recipient.last_error)[:DIAGNOSTIC_MAX]))
        fields.append(("Last-Attempt-Date", email.utils.formatdate(now, localtime=True)))
        blocks.append(_status_block(fields))
    status.set_payload(blocks)
    report.attach(status)

    header = original_header(original)
    report.attach(_text_part(header, "rfc822-headers"))
    return report.as_bytes(policy=_POLICY if entry.sender.isascii() else _UTF8_POLICY)
