"""``pymailsrv mailbox show NAME N``: one stored message, taken apart for a class.

A message on disk has three layers, and this view keeps them apart because
students mix them up:

* the *envelope* facts the server knows but the message text does not say:
  which maildrop holds it, its Maildir file (``new/`` until a POP3 session
  has seen it, then ``cur/`` with flags such as ``S`` for seen), its UIDL
  (RFC 1939 §7), its size on disk and as POP3 sends it (CRLF line ends,
  RFC 1939 §11), and the reverse-path our SMTP server recorded in
  ``Return-Path:`` when it took the message in (RFC 5321 §4.4);
* the *header* fields of RFC 5322 §3.6 and MIME (RFC 2045), decoded with the
  standard ``email`` package under ``email.policy.default``: encoded words
  such as ``=?utf-8?q?Gr=C3=BC=C3=9Fe?=`` (RFC 2047) come out as text, and
  where decoding changed a field its raw form is shown under it, and a field
  the package cannot decode, or not in bounded time, is shown raw with a
  note why;
* the *MIME structure* (RFC 2046): a tree of parts, each with its content
  type, filename, transfer encoding and size, both decoded and as it sits
  in the message (base64 makes a part about a third bigger, RFC 2045 §6.8).

Messages are numbered as ``mailbox list`` numbers them and as a POP3 session
would at login: ``MaildirStore.messages`` order, from 1.

Anyone may send the message, so nothing in it may stop the view or forge a
line of it: every value taken from the message is shown on one line, its
line ends and control characters escaped as the trace shows them.
"""

from __future__ import annotations

import dataclasses
import datetime
import email
import email.policy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.policy import EmailPolicy
from email.utils import collapse_rfc2231_value
from pathlib import Path

import click

from pymailsrv.cli_common import echo_report, require_data_root
from pymailsrv.commands import is_decimal
from pymailsrv.config import Settings
from pymailsrv.maildir import INFO_SEPARATOR, SEEN_FLAG, MaildirStore, arrival_seconds
from pymailsrv.replies import counted
from pymailsrv.storage import MessageInfo
from pymailsrv.trace import shown
from pymailsrv.users import UserError, UserStore, check_user_name

# The fields shown, in the order a reader meets them: identity and date
# (RFC 5322 §3.6.4, §3.6.1), originator and destination (§3.6.2, §3.6.3),
# subject (§3.6.5), then MIME's (RFC 2045 §4, §5, §6).
HEADER_FIELDS = ("Message-ID", "Date", "From", "To", "Reply-To", "Subject",
                 "MIME-Version", "Content-Type", "Content-Transfer-Encoding")

# Transfer encodings that leave the octets as they are (RFC 2045 §6.2): for
# these the decoded and the stored size are the same, so only one is shown.
IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")

# What the standard email package raises on malformed input it cannot take
# apart, though anyone can send it, has no end (CPython 3.11): IndexError
# from the header parser on "Content-Type: text/plain; a*", AttributeError
# on "To: a@[\", UnboundLocalError on "From: a <b@[ ", OverflowError from a
# Date in a year past any clock, ValueError when a charset is no codec name,
# TypeError when an RFC 2231 charset comes back as a tuple, RecursionError
# from nested comments. So whatever it raises while taking a message apart
# is taken as its giving up on that field or part, and named in the view.
EMAIL_PACKAGE_ERRORS = Exception

# The most of one field's value that is decoded. RFC 5322 §2.1.1 limits a
# line to 998 octets, but a field may be folded over any number of lines,
# and CPython 3.11's header parser takes time and memory that grow with the
# square of a field's length: a Subject of 30 000 encoded words (480 KB)
# took 2 GB. Eight full lines (8 x 1000 octets, CRLF included) hold a To: of
# some 200 addresses and decode in under 0.1 s and 10 MB; past them a field
# is shown as stored, cut there.
FIELD_DECODE_MAX = 8 * 1000
# The most of all a message's fields together that is decoded. A message may
# hold hundreds of parts, each with fields just under FIELD_DECODE_MAX that
# the email package parses again at every question asked of the part: 640
# such parts (10 MB) took 4.5 minutes, and 1 277 To: fields just under it
# 2.5 minutes. Past this the fields are read raw.
MESSAGE_DECODE_MAX = 64 * 1000
# The most of the header section that is read at all. The email package
# keeps every field in memory, a few hundred octets each: a 10 MB message
# of 690 000 To: fields, which anyone may send, took 680 MB and 12 s to
# show. Past this the header is left out, and the view says how much.
# (Postfix's header_size_limit keeps 100 KB of a header.)
HEADER_SECTION_MAX = 256 * 1000
# At most this many fields of one name are shown, then a line counts the rest.
FIELDS_SHOWN_PER_NAME = 50


class MailviewError(Exception):
    """The message cannot be shown; the text says why, in one line."""


@dataclass(frozen=True)
class HeaderField:
    name: str
    value: str | None  # decoded; None when the message has no such field
    raw: str | None = None  # as stored, unfolded, when decoding changed it


@dataclass(frozen=True)
class Part:
    """One node of the MIME tree."""

    content_type: str
    charset: str | None
    filename: str | None
    disposition: str | None  # "inline", "attachment" or None (RFC 2183)
    encoding: str | None  # Content-Transfer-Encoding, lower case
    decoded_size: int | None  # the payload after undoing the encoding; None for containers
    stored_size: int | None  # the payload as it sits in the message
    defects: tuple[str, ...]
    children: tuple[Part, ...] = ()
    failure: str | None = None  # why the email package could not take the part apart


@dataclass(frozen=True)
class MessageView:
    user: str
    msg_number: int
    count: int  # messages in the maildrop
    info: MessageInfo
    file: str  # "new/<name>" or "cur/<name>", relative to the Maildir
    disk_size: int
    delivered: datetime.datetime | None
    return_path: str | None
    received: tuple[str, ...]  # the Received: trace fields, newest (ours) first
    headers: tuple[HeaderField, ...]
    structure: Part
    header_left_out: int = 0  # octets of the header section past HEADER_SECTION_MAX, not read

    @property
    def flags(self) -> str:
        """The Maildir info flags after ":2," (empty while the file is in new/)."""
        _, _, flags = self.file.partition(INFO_SEPARATOR)
        return flags

    @property
    def seen(self) -> bool:
        return SEEN_FLAG in self.flags


# --- finding and reading the message ---------------------------------------------------


# More digits than a maildrop's count could have; int() would refuse over 4300.
MSG_NUMBER_DIGITS_MAX = 18


def parse_msg_number(text: str) -> int:
    """A message number as the user typed it: 1, 2, ... (ASCII digits only)."""
    if not (is_decimal(text) and len(text) <= MSG_NUMBER_DIGITS_MAX) or int(text) < 1:
        typed = text if len(text) <= MSG_NUMBER_DIGITS_MAX else text[:MSG_NUMBER_DIGITS_MAX] + "..."
        raise MailviewError(f"bad message number {typed!r}: use 1, 2, ... as `mailbox list` shows")
    return int(text)


def view_message(store: MaildirStore, users: UserStore, name: str, msg_number: int) -> MessageView:
    """Find message ``msg_number`` of ``name``'s maildrop and take it apart."""
    try:
        user = check_user_name(name)
    except UserError as error:
        raise MailviewError(str(error)) from None
    if not users.exists(user):
        raise MailviewError(f"no such user {user!r}")
    # Two tries: a POP3 session may move the file from new/ to cur/ (or add a
    # flag) between our listing and our open, which changes its path only.
    for _attempt in range(2):
        listing = store.messages(user)
        if not 1 <= msg_number <= len(listing):
            raise MailviewError(f"no message {msg_number}: {user}'s maildrop has {counted(len(listing), 'message')}")
        info, path = listing[msg_number - 1]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            return build_view(user, msg_number, len(listing), info, path, data)
        except RecursionError:  # anyone may send multiparts nested a thousand deep
            raise MailviewError(f"message {msg_number} of {user} has MIME parts nested too deep to show; "
                                f"its file is {path}") from None
    raise MailviewError(f"message {msg_number} of {user} vanished while being read; try again")


def build_view(user: str, msg_number: int, count: int, info: MessageInfo, path: Path,
               data: bytes) -> MessageView:
    """The view of one message whose bytes have been read."""
    read, left_out = _header_cut(data)
    message = email.message_from_bytes(read, policy=reading_policy())
    return MessageView(
        user=user,
        msg_number=msg_number,
        count=count,
        info=info,
        file=f"{path.parent.name}/{path.name}",
        disk_size=len(data),
        delivered=_delivery_time(info.key),
        return_path=header_fields(message, "Return-Path")[0].value,
        received=tuple(field.value for field in header_fields(message, "Received") if field.value is not None),
        headers=tuple(field for name in HEADER_FIELDS for field in header_fields(message, name)),
        structure=mime_tree(message),
        header_left_out=left_out,
    )


def _header_cut(data: bytes) -> tuple[bytes, int]:
    """``data`` with its header section cut to HEADER_SECTION_MAX octets, at
    the start of a field (a field folded over the cut is left out whole),
    and how many octets of it were left out. The blank line that ends the
    header, and the body after it, stay."""
    blank_line = re.search(rb"^\r?\n", data, re.MULTILINE)
    header_end = blank_line.start() if blank_line else len(data)
    if header_end <= HEADER_SECTION_MAX:
        return data, 0
    cut = data.rfind(b"\n", 0, HEADER_SECTION_MAX) + 1
    while cut > 0 and data[cut:cut + 1] in (b" ", b"\t"):  # RFC 5322 §2.2.3: a folded line goes on a field
        cut = data.rfind(b"\n", 0, cut - 1) + 1
    return data[:cut] + data[header_end:], header_end - cut


def _delivery_time(key: str) -> datetime.datetime | None:
    seconds = arrival_seconds(key)
    if seconds is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(seconds).astimezone()
    except (OverflowError, ValueError, OSError):  # a name another program chose: no time we can show
        return None


# --- header fields ----------------------------------------------------------------


def _normalized(text: str) -> str:
    # RFC 5322 §2.2.3: unfolding removes the line breaks; §3.2.2: runs of
    # white space then mean one space, so they do not count as a change.
    return " ".join(text.split())


def decode_field(name: str, raw: str) -> tuple[str, str | None]:
    """Field ``name`` decoded under email.policy.default, and None; or, where
    it cannot be decoded at all or in bounded time, ``raw`` (cut at
    FIELD_DECODE_MAX) and a note why."""
    if len(raw) > FIELD_DECODE_MAX:
        # Octets, as the message was read with surrogateescape: one character each.
        rest = counted(len(raw) - FIELD_DECODE_MAX, "more octet", grouped=True)
        return raw[:FIELD_DECODE_MAX], f"not decoded: longer than {FIELD_DECODE_MAX} octets, {rest} not shown"
    try:
        # The policy unfolds the value (RFC 5322 §2.2.3) and parses it into a
        # header object that knows its field's grammar (addresses, dates,
        # encoded words).
        return email.policy.default.header_fetch_parse(name, raw), None
    except EMAIL_PACKAGE_ERRORS as error:
        return raw, f"not decoded: the email package raised {type(error).__name__}"


@dataclass
class _Decoding:
    """What one message's fields decoded to, and how many octets more may be."""

    fields: dict[tuple[str, str], tuple[str, str | None]] = dataclasses.field(default_factory=dict)
    octets_left: int = MESSAGE_DECODE_MAX

    def decode(self, name: str, raw: str) -> tuple[str, str | None]:
        """decode_field's answer, worked out once per field, while the
        message's MESSAGE_DECODE_MAX lasts; past it ``raw``, cut as
        decode_field cuts a long field, and a note why."""
        if (name, raw) not in self.fields:
            if self.octets_left > 0:
                self.octets_left -= len(raw)
                self.fields[name, raw] = decode_field(name, raw)
            else:
                self.fields[name, raw] = (raw[:FIELD_DECODE_MAX], f"not decoded: past the first {MESSAGE_DECODE_MAX} "
                                                                  "octets of the message's fields")
        return self.fields[name, raw]


class _ReadingPolicy(EmailPolicy):
    """email.policy.default for reading what anyone may send. The parser and
    Message's methods (get_content_type, get_param, ...) fetch every field
    through header_fetch_parse; here a long field is cut before anything
    unfolds it, and one that decode_field cannot decode comes back raw, a
    plain string (as under the compat32 policy), for them to read what they can.

    Its ``decoding`` (one per message: reading_policy()) decodes each field
    once however often it is asked for, and only the first
    MESSAGE_DECODE_MAX octets of the message's fields at all.
    """

    decoding: _Decoding | None = None  # a class attribute, so that Policy takes it as a keyword

    def header_fetch_parse(self, name: str, value: str) -> str:
        return self.decoding.decode(name, value)[0]


def reading_policy() -> _ReadingPolicy:
    """The policy to read one message with, with its own record of what it decoded."""
    return _ReadingPolicy(decoding=_Decoding())


def _as_text(raw: str) -> str:
    """A field as stored, its octets read as UTF-8 (RFC 6532 allows UTF-8
    in fields), any that are not UTF-8 shown as \\xNN. (The message was read
    as ASCII with surrogateescape: other octets are surrogates until here.)"""
    return raw.encode("ascii", "surrogateescape").decode("utf-8", "backslashreplace")


def header_fields(message: EmailMessage, name: str, *, first_only: bool = False) -> list[HeaderField]:
    """Every occurrence of field ``name`` (or the first), decoded, with its raw
    form where that differs; ``message`` read with a reading_policy()."""
    raw_values = [value for field, value in message.raw_items() if field.lower() == name.lower()]
    if not raw_values:
        return [HeaderField(name, None)]
    fields = []
    for raw in raw_values[:1] if first_only else raw_values[:FIELDS_SHOWN_PER_NAME]:
        value, note = message.policy.decoding.decode(name, raw)
        if note is not None:
            fields.append(HeaderField(name, f"{_normalized(_as_text(value))}  ({note})"))
            continue
        value, raw = _normalized(str(value)), _normalized(_as_text(raw))  # short: decode cut a long one
        fields.append(HeaderField(name, value, raw if raw != value else None))
    if not first_only and len(raw_values) > FIELDS_SHOWN_PER_NAME:
        rest = counted(len(raw_values) - FIELDS_SHOWN_PER_NAME, f"more {name}: field", grouped=True)
        fields.append(HeaderField(name, f"(and {rest}, not shown)"))
    return fields


def summary(path: Path) -> tuple[str, str, str]:
    """The Date, From and Subject of the message in ``path``, decoded as
    `mailbox show` decodes them (FileNotFoundError if it has gone)."""
    with open(path, "rb") as file:
        head = file.read(HEADER_SECTION_MAX + 1)  # enough for _header_cut to know whether to cut
    headers = BytesHeaderParser(policy=reading_policy()).parsebytes(_header_cut(head)[0])
    date, sender, subject = (header_fields(headers, name, first_only=True)[0].value or ""
                             for name in ("Date", "From", "Subject"))
    return date, sender, subject


# --- MIME structure ------------------------------------------------------------------


def mime_tree(part: Message) -> Part:
    """The part and everything inside it (RFC 2046), as ``Part`` records."""
    encoding = part.get("Content-Transfer-Encoding")
    encoding = str(encoding).strip().lower() if encoding is not None else None
    defects = tuple(type(defect).__name__ for defect in part.defects)
    children: tuple[Part, ...] = ()
    charset = filename = decoded_size = stored_size = failure = None
    if part.is_multipart():
        # multipart/* holds a list of parts; message/rfc822 a list of one message.
        children = tuple(mime_tree(child) for child in part.get_payload())
    try:
        if part.get_content_maintype() == "text" and part.get_param("charset") is not None:
            # An RFC 2231 value (charset*=utf-8''x) comes as a tuple; this makes it text.
            charset = collapse_rfc2231_value(part.get_param("charset"))
        filename = part.get_filename()
        if not part.is_multipart():
            stored = part.get_payload()
            stored_size = len(stored.encode("utf-8", "surrogateescape")) if isinstance(stored, str) else None
            payload = part.get_payload(decode=True)
            decoded_size = len(payload) if payload is not None else stored_size
    except EMAIL_PACKAGE_ERRORS as error:
        failure = f"the email package raised {type(error).__name__}"
    return Part(
        content_type=part.get_content_type(),
        charset=charset,
        filename=filename,
        disposition=part.get_content_disposition(),
        encoding=encoding,
        decoded_size=decoded_size,
        stored_size=stored_size,
        defects=defects,
        children=children,
        failure=failure,
    )


def describe_part(part: Part) -> str:
    """One line about a part: type, filename, disposition, encoding, sizes."""
    facts = [shown(part.content_type) + (f"; charset={shown(part.charset)}" if part.charset else "")]
    if part.filename is not None:
        facts.append(f'"{shown(part.filename)}"')
    if part.disposition is not None:
        facts.append(shown(part.disposition))
    if part.failure is not None:
        facts.append(f"not taken apart: {part.failure}")
    elif part.children:
        facts.append(counted(len(part.children), "part"))
    else:
        if part.encoding and part.encoding not in IDENTITY_ENCODINGS:
            facts.append(f"{shown(part.encoding)}, {part.decoded_size} octets decoded ({part.stored_size} as stored)")
        else:
            facts.append(f"{shown(part.encoding) + ', ' if part.encoding else ''}{part.decoded_size} octets")
    if part.defects:
        facts.append("defects: " + ", ".join(part.defects))
    return ", ".join(facts)


def tree_lines(part: Part, prefix: str = "", last: bool = True, root: bool = True) -> Iterator[str]:
    """The MIME tree drawn as `tree` draws directories."""
    branch = "" if root else ("└── " if last else "├── ")
    yield prefix + branch + describe_part(part)
    inner = prefix + ("" if root else ("    " if last else "│   "))
    for position, child in enumerate(part.children):
        yield from tree_lines(child, inner, position == len(part.children) - 1, root=False)


# --- the whole view -----------------------------------------------------------------------


def render(view: MessageView) -> str:
    """The view as text for a terminal."""
    info = view.info
    where = "new/ (no POP3 login since it arrived)" if view.file.startswith("new/") else "cur/"
    flags = (view.flags + (" (seen)" if view.seen else "")) if view.flags else "none"
    delivered = view.delivered.strftime("%Y-%m-%d %H:%M:%S %z") if view.delivered else "unknown"
    facts = [
        ("maildrop", f"{view.user}, message {view.msg_number} of {view.count}"),
        ("uid", f"{info.uid}  (UIDL, RFC 1939 §7)"),
        ("size", f"{view.disk_size} octets on disk, {info.size} as POP3 sends it "
                 "(CRLF line ends, RFC 1939 §11)"),
        ("folder", where),
        ("file", view.file),
        ("flags", flags),
        ("delivered", delivered),
        ("return path", f"{shown(view.return_path or '(none)')}  (the envelope's MAIL FROM, RFC 5321 §4.4)"),
        # RFC 5321 §4.4: each SMTP server on the way adds one at the top.
        *(("received", f"{shown(value)}  (a trace field, RFC 5321 §4.4)" if position == 0 else shown(value))
          for position, value in enumerate(view.received)),
    ]
    lines = ["Envelope (what the server knows)"]
    lines += [f"  {label + ':':<13}{value}" for label, value in facts]
    lines += ["", "Header (decoded with email.policy.default; raw form below a field decoding changed)"]
    if view.header_left_out:
        lines.append(f"  (only its first {counted(HEADER_SECTION_MAX, 'octet', grouped=True)} are read: "
                     f"{counted(view.header_left_out, 'more octet', grouped=True)} not shown)")
    width = max(len(name) for name in HEADER_FIELDS) + 2
    for field in view.headers:
        label = f"{field.name}:"
        lines.append(f"  {label:<{width}}{shown(field.value) if field.value is not None else '(absent)'}")
        if field.raw is not None:
            lines.append(f"  {'':<{width}}raw: {shown(field.raw)}")
    lines += ["", "MIME structure (RFC 2046)"]
    lines += ["  " + line for line in tree_lines(view.structure)]
    return "\n".join(lines) + "\n"


def show_command(with_settings: Callable) -> click.Command:
    """The ``mailbox show`` command; cli.py hands in its ``with_settings``.

    Taking the decorator as an argument lets this module stay free of an
    import of cli.py, which imports this module to register the command.
    """

    @click.command("show")
    @click.argument("name")
    @click.argument("msg_number", metavar="N")
    @with_settings
    def mailbox_show(settings: Settings, name: str, msg_number: str) -> None:
        """Show message N of NAME: envelope, decoded header fields, MIME tree."""
        require_data_root(settings.root)  # else a mistyped --root is "no such user"
        try:
            view = view_message(MaildirStore(settings.root), UserStore(settings.state_dir), name,
                                parse_msg_number(msg_number))
        except MailviewError as error:
            raise click.ClickException(str(error)) from None
        echo_report(render(view), nl=False)

    return mailbox_show
