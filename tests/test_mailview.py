"""``pymailsrv mailbox show``: envelope facts, decoded header fields, the MIME tree."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import smtplib

import pytest
from click.testing import CliRunner

from pymailsrv.cli import main
from pymailsrv.mailview import (
    FIELD_DECODE_MAX,
    FIELDS_SHOWN_PER_NAME,
    MESSAGE_DECODE_MAX,
    MailviewError,
    mime_tree,
    parse_msg_number,
    reading_policy,
)
from tests.conftest import CLIENT_TIMEOUT, PASSWORD

ATTACHMENT = bytes(range(256)) * 4  # 1024 octets: base64 makes 1368 of them, plus line ends
ATTACHMENT_BASE64 = base64.encodebytes(ATTACHMENT)  # lines of 76 characters, LF-ended

# Written out by hand, as a mail program would send it, so the test sees the
# exact octets: multipart/mixed holding a text/plain + text/html alternative
# and a PDF attachment; the Subject and From carry RFC 2047 encoded words.
MULTIPART = b"""\
Message-ID: <lesson1@school.example>
Date: Mon, 06 May 2024 10:00:00 +0200
From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@school.example>
To: alice@localhost
Reply-To: teacher@school.example
Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is a multi-part message in MIME format.

--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe!

--inner
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: 7bit

<p>Hello</p>

--inner--

--outer
Content-Type: application/pdf
Content-Disposition: attachment; filename="notes.pdf"
Content-Transfer-Encoding: base64

""" + ATTACHMENT_BASE64 + b"""
--outer--
"""


def show(root, *args: str):
    return CliRunner().invoke(main, ["mailbox", "show", "--root", str(root), *args])


@pytest.fixture
def alice_with_multipart(add_user, store):
    add_user("alice")
    store.deliver("alice", b"Subject: first\n\nplain text\n")
    store.deliver("alice", MULTIPART)
    return "alice"


def test_header_fields_are_decoded_and_the_raw_encoded_words_shown(root, alice_with_multipart):
    result = show(root, "alice", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  Subject:                   Grüße aus Köln" in lines
    assert "                             raw: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=" in lines
    assert "  From:                      Jürgen Müller <juergen@school.example>" in lines
    assert "  Message-ID:                <lesson1@school.example>" in lines
    assert "  Date:                      Mon, 06 May 2024 10:00:00 +0200" in lines
    assert "  Reply-To:                  teacher@school.example" in lines
    assert "  MIME-Version:              1.0" in lines
    assert '  Content-Type:              multipart/mixed; boundary="outer"' in lines
    assert "  Content-Transfer-Encoding: (absent)" in lines


def test_mime_structure_is_an_indented_tree_with_part_sizes(root, alice_with_multipart):
    output = show(root, "alice", "2").output
    tree = output[output.index("MIME structure (RFC 2046)\n"):].splitlines()[1:]
    assert tree == [
        "  multipart/mixed, 2 parts",
        "  ├── multipart/alternative, 2 parts",
        "  │   ├── text/plain; charset=utf-8, quoted-printable, 9 octets decoded (17 as stored)",
        "  │   └── text/html; charset=utf-8, 7bit, 13 octets",
        f'  └── application/pdf, "notes.pdf", attachment, base64, 1024 octets decoded '
        f"({len(ATTACHMENT_BASE64)} as stored)",
    ]


def test_envelope_facts_come_from_the_maildir(root, store, alice_with_multipart):
    info, path = store.messages("alice")[1]
    output = show(root, "alice", "2").output
    assert "  maildrop:    alice, message 2 of 2\n" in output
    assert f"  uid:         {info.uid}  (UIDL, RFC 1939 §7)\n" in output
    assert (f"  size:        {path.stat().st_size} octets on disk, {info.size} as POP3 sends it "
            "(CRLF line ends, RFC 1939 §11)\n") in output
    assert f"  file:        new/{path.name}\n" in output
    assert "  flags:       none\n" in output
    assert re.search(r"\n  delivered:   \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\n", output)


def test_a_message_read_over_pop3_shows_as_seen_in_cur(root, alice_with_multipart, pop3):
    client = pop3()
    client.user("alice")
    client.pass_(PASSWORD)
    client.retr(2)
    client.quit()
    output = show(root, "alice", "2").output
    assert re.search(r"\n  file:        cur/\S+:2,S\n", output)
    assert "  flags:       S (seen)\n" in output
    assert "  folder:      cur/\n" in output


def test_smtp_envelope_sender_shows_as_return_path(root, add_user, server):
    add_user("alice")
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.sendmail("bob@example.org", ["alice@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
    output = show(root, "alice", "1").output
    assert "  return path: <bob@example.org>  (the envelope's MAIL FROM, RFC 5321 §4.4)\n" in output
    # The other trace field the server adds (teaching.rst asks students to find both).
    assert re.search(r"\n  received:    from \S+ \(\[127\.0\.0\.1\]\) by \S+ \(pymailsrv\) with ESMTP id [0-9A-F]+ "
                     r"for <alice@localhost>; .+  \(a trace field, RFC 5321 §4\.4\)\n", output)


@pytest.mark.parametrize("arguments, error", [
    (("bob", "1"), "Error: no such user 'bob'\n"),
    (("alice", "3"), "Error: no message 3: alice's maildrop has 2 messages\n"),
    (("alice", "0"), "Error: bad message number '0': use 1, 2, ... as `mailbox list` shows\n"),
    (("alice", "x"), "Error: bad message number 'x': use 1, 2, ... as `mailbox list` shows\n"),
    (("alice", "1" * 5000), "Error: bad message number '111111111111111111...': use 1, 2, ... as "
                            "`mailbox list` shows\n"),  # int() would refuse it: over 4300 digits
    (("../etc", "1"), "Error: invalid user name '../etc': use 1-64 of a-z 0-9 . _ -, "
                      "starting with a letter or digit\n"),
])
def test_unknown_user_or_bad_number_is_a_one_line_error(root, alice_with_multipart, arguments, error):
    result = show(root, *arguments)
    assert result.exit_code == 1
    assert result.output == error


@pytest.mark.parametrize("name", ["²³.odd.example", "9" * 30 + ".odd.example"])
def test_a_file_name_that_is_no_time_shows_no_delivery_time(root, alice_with_multipart, name):
    # int() refuses "²"; 30 nines are past any date: neither may stop the listing.
    for message in (root / "alice" / "new").iterdir():
        message.unlink()
    for message in (root / "alice" / "cur").iterdir():
        message.unlink()
    (root / "alice" / "new" / name).write_bytes(b"Subject: odd\n\nx\n")
    result = show(root, "alice", "1")
    assert result.exit_code == 0, result.output


def test_single_part_message_is_a_tree_of_one():
    message = email.message_from_bytes(b"Subject: x\n\nhello\n", policy=email.policy.default)
    part = mime_tree(message)
    assert (part.content_type, part.charset, part.children, part.decoded_size) == ("text/plain", None, (), 6)


def test_message_numbers_are_ascii_digits_from_one():
    assert parse_msg_number("12") == 12
    for bad in ("0", "-1", "١", "1.0", ""):
        with pytest.raises(MailviewError):
            parse_msg_number(bad)


def test_a_message_nested_too_deep_is_a_one_line_error(root, add_user, store):
    # 500 multiparts, one inside the next: 30 KB that anyone may send.
    add_user("alice")
    depth = 500
    text = b"Subject: deep\nMIME-Version: 1.0\n"
    for level in range(depth):
        text += f'Content-Type: multipart/mixed; boundary="b{level}"\n\n--b{level}\n'.encode()
    text += b"Content-Type: text/plain\n\nbottom\n"
    for level in reversed(range(depth)):
        text += f"--b{level}--\n".encode()
    store.deliver("alice", text)
    result = show(root, "alice", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: message 1 of alice has MIME parts nested too deep to show; ")
    assert len(result.output.splitlines()) == 1


def mailbox_list(root, name: str):
    return CliRunner().invoke(main, ["mailbox", "list", "--root", str(root), name])


# Messages any SMTP client may send on which CPython 3.11's email package
# raises, and the line of the view that shows the field or part it could not
# take apart.
UNPARSABLE = [
    (b"Subject: one\nContent-Type: text/plain; a*\n\nhi\n",
     "  Content-Type:              text/plain; a*  (not decoded: the email package raised IndexError)"),
    (b"Subject: two\nTo: a@[\\\n\nhi\n",
     "  To:                        a@[\\  (not decoded: the email package raised AttributeError)"),
    (b"Subject: three\nContent-Type: text/plain; charset=a\x00b\n\nh\xe9\n",
     "  text/plain; charset=a\\x00b, not taken apart: the email package raised ValueError"),
    (b"Subject: four\nContent-Type: text/plain(; charset*=utf-8''x\n\nh\xe9\n",
     "  text/plain(; charset=x), not taken apart: the email package raised TypeError"),
    # These two stopped `mailbox show`, and `mailbox list` of the whole mailbox, with a traceback.
    (b"Subject: five\nDate: Mon, 1 Jan 99999999999 00:00:00 +0000\n\nhi\n",
     "  Date:                      Mon, 1 Jan 99999999999 00:00:00 +0000  "
     "(not decoded: the email package raised OverflowError)"),
    (b"Subject: six\nFrom: a <b@[ \n\nhi\n",
     "  From:                      a <b@[  (not decoded: the email package raised UnboundLocalError)"),
]


@pytest.mark.parametrize("message, line", UNPARSABLE, ids=["IndexError", "AttributeError", "ValueError", "TypeError",
                                                           "OverflowError", "UnboundLocalError"])
def test_what_the_email_package_cannot_take_apart_is_shown_raw_with_why(root, add_user, store, message, line):
    add_user("alice")
    store.deliver("alice", message)
    result = show(root, "alice", "1")
    assert result.exit_code == 0, result.output
    assert line in result.output.splitlines()


def test_mailbox_list_shows_every_message_the_email_package_cannot_take_apart(root, add_user, store):
    add_user("alice")
    for message, _ in UNPARSABLE:
        store.deliver("alice", message)
    result = mailbox_list(root, "alice")
    assert result.exit_code == 0, result.output
    assert [line.split()[-2] for line in result.output.splitlines()[2:]] == ["one", "two", "three", "four", "five",
                                                                              "six"]


def test_a_field_too_long_to_decode_in_bounded_time_is_shown_raw_and_cut(root, add_user, store):
    # CPython 3.11's header parser takes time and memory that grow with the
    # square of a field's length: 30 000 of these words take 2 GB. 2000 of
    # them (30 KB, folded as a mail program folds) are past the view's limit.
    add_user("alice")
    subject = "\n ".join(["=?utf-8?q?a?="] * 2000)
    store.deliver("alice", f"Subject: {subject}\n\nhi\n".encode())
    first = " ".join(subject[:FIELD_DECODE_MAX].split())  # unfolded, as the view shows a field
    note = "(not decoded: longer than 8000 octets, 21 998 more octets not shown)"
    assert f"  Subject:                   {first}  {note}" in show(root, "alice", "1").output.splitlines()
    assert f"{first}  {note}" in mailbox_list(root, "alice").output.splitlines()[2]


def test_fields_past_the_messages_decoding_budget_are_shown_raw_and_cut(root, add_user, store):
    # Each occurrence of a field was decoded whatever the budget: 1 277 To:
    # fields just under FIELD_DECODE_MAX took `mailbox show` 2.5 minutes.
    add_user("alice")
    words = " ".join(["word"] * 1550)  # 7 749 octets: each field is decoded, if the budget allows
    fields = "".join(f"Subject: {number} {words}\n" for number in range(10))  # each decoded once
    store.deliver("alice", fields.encode() + b"\nhi\n")
    subject_lines = [line for line in show(root, "alice", "1").output.splitlines() if line.startswith("  Subject:")]
    assert len(subject_lines) == 10
    past = "  (not decoded: past the first 64000 octets of the message's fields)"
    assert [line.endswith(past) for line in subject_lines] == [False] * 9 + [True]


def test_a_header_of_many_fields_is_read_and_shown_only_in_part(root, add_user, store):
    # 690 000 To: fields in 10 MB (anyone may send them) took `mailbox show`
    # 680 MB and 12 s: every field was parsed, and every one shown.
    add_user("alice")
    fields = "".join(f"To: a{number}@example.org\n" for number in range(30_000))  # 568 890 octets
    store.deliver("alice", fields.encode() + b"Subject: many\n\nhi\n")
    output = show(root, "alice", "1").output.splitlines()
    to_lines = [line for line in output if line.startswith("  To:")]
    assert to_lines[:2] == ["  To:                        a0@example.org", "  To:                        a1@example.org"]
    # The first 256 000 octets hold 11 613 whole fields: 10 of 19 octets (a0 to
    # a9), 90 of 20, 900 of 21, 9 000 of 22, and 1 613 of 23 (255 989 in all).
    assert to_lines[FIELDS_SHOWN_PER_NAME:] == ["  To:                        (and 11 563 more To: fields, not shown)"]
    assert "  (only its first 256 000 octets are read: 422 915 more octets not shown)" in output
    assert "  Subject:                   (absent)" in output  # it came after the cut
    # mailbox list reads as far as show does, and no further.
    assert "many" not in mailbox_list(root, "alice").output


def test_a_field_folded_over_the_header_cut_is_left_out_whole_by_show_and_list(root, add_user, store):
    add_user("alice")
    filler = "".join(f"X-Filler: {number:07d}\n" for number in range(14_221))  # 255 978 octets
    subject = "Subject: first part\n second part\n"  # its fold goes past octet 256 000 (RFC 5322 §2.2.3)
    store.deliver("alice", (filler + subject + "\nhi\n").encode())
    assert "  Subject:                   (absent)" in show(root, "alice", "1").output.splitlines()
    assert "first part" not in mailbox_list(root, "alice").output


def test_a_utf8_field_is_not_shown_again_as_raw_escapes(root, add_user, store):
    # RFC 6532 allows UTF-8 in fields (the server offers SMTPUTF8): decoded,
    # nothing changed, so no raw form is due; and none of \udcc3 and the like.
    add_user("alice")
    store.deliver("alice", "Subject: Grüße aus Köln\nFrom: Jürgen <j@x.example>\n\nhi\n".encode())
    lines = show(root, "alice", "1").output.splitlines()
    assert "  Subject:                   Grüße aus Köln" in lines
    assert not any("raw:" in line for line in lines)


def test_a_value_from_the_message_cannot_start_a_line_of_the_view(root, add_user, store):
    # RFC 2231 lets a parameter carry any octet, %0A too: decoded, the
    # filename and charset would print a "Subject:" line of the sender's own.
    add_user("alice")
    store.deliver("alice", b"""\
Subject: real
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: application/octet-stream
Content-Disposition: attachment; filename*=utf-8''evil%0A%0AHeader%20%28decoded%29%0A%20%20Subject%3A%20FAKE

hi
--b
Content-Type: text/plain; charset*=utf-8''x%0Ay%0D%0Az

hi
--b--
""")
    output = show(root, "alice", "1").output
    assert output[output.index("MIME structure (RFC 2046)\n"):].splitlines()[1:] == [
        "  multipart/mixed, 2 parts",
        '  ├── application/octet-stream, "evil\\x0a\\x0aHeader (decoded)\\x0a  Subject: FAKE", '
        'attachment, 2 octets',
        "  └── text/plain; charset=x\\x0ay\\x0d\\x0az, 2 octets",
    ]


def test_a_message_decodes_each_field_once_and_no_more_than_its_budget():
    # 640 parts with Content-Type fields just under FIELD_DECODE_MAX, each
    # parsed again at every question asked of its part, took 4.5 minutes.
    policy = reading_policy()
    first = policy.header_fetch_parse("Subject", "=?utf-8?q?caf=C3=A9?=")
    assert first == "café" and policy.header_fetch_parse("Subject", "=?utf-8?q?caf=C3=A9?=") is first
    long_type = "text/plain; " + "; ".join(f"p{n}=v" for n in range(FIELD_DECODE_MAX // 8))
    for n in range(MESSAGE_DECODE_MAX // len(long_type) + 1):
        policy.header_fetch_parse("Content-Type", f"{long_type}; n={n}")
    assert policy.header_fetch_parse("Subject", "=?utf-8?q?th=C3=A9?=") == "=?utf-8?q?th=C3=A9?="  # raw now
    message = email.message_from_bytes(b"Content-Type: text/html; charset=utf-8\n\nhi\n", policy=policy)
    assert message.get_content_type() == "text/html"  # a raw field still reads
