"""Reverse-paths, forward-paths and ESMTP parameters (RFC 5321 §4.1.2).

The grammar we accept, from RFC 5321 §4.1.2 (with RFC 6531 §3.3 adding
UTF-8 when the client asked for SMTPUTF8)::

    Reverse-path   = Path / "<>"
    Forward-path   = Path
    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    Mail-parameters = esmtp-param *(SP esmtp-param)
    esmtp-param    = esmtp-keyword ["=" esmtp-value]

An address without its angle brackets is refused: accepting it is how
servers grew ambiguous parsers. A source route (``<@a,@b:user@c>``) is
accepted and ignored, as §4.1.1.3 and Appendix C ask. ``%`` and ``!`` are
ordinary characters of a local part: they never route mail anywhere.

Every parser raises ``PathError`` with a short reason; the SMTP session turns
that into ``501 5.1.7`` or ``501 5.1.3`` (a bad sender's or recipient's
address) or ``501 5.5.4`` (bad parameters).
"""

from __future__ import annotations

import codecs
import ipaddress
import re
import string
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from pymailsrv.commands import ascii_words

# RFC 3492, for A-labels (canonical_domain). Looked up now, not at the first
# UTF-8 domain: by then a server started with --run-as may no longer be
# able to read the Python it runs on, and a codec is loaded on first use.
PUNYCODE = codecs.lookup("punycode")

# RFC 5321 §4.5.3.1.1-3: local part 64 octets, domain 255, path 256.
LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
PATH_MAX = 256
# RFC 1035 §2.3.4: a label of a domain name is 63 octets at most.
LABEL_MAX = 63

# RFC 6531 §3.3: UTF8-non-ascii joins atext, qtext and domain labels. Whether
# the client may use it (it sent SMTPUTF8) is the session's question. Lone
# surrogates (undecodable octets) are not characters and never match, and
# the C1 controls (U+0080-U+009F) are left out, as RFC 5198 §2 asks of
# text on the net: echoed in a reply or a header, they could steer a terminal.
_NON_ASCII_LEFT_OUT = r"\x80-\x9f\ud800-\udfff"  # re reads the escapes


def with_utf8_text(ascii_characters: str) -> str:
    """A pattern for one character: one of ``ascii_characters``, or UTF8-non-ascii.

    It is written as its complement, ``[^...]``, the ASCII characters not
    given and what non-ASCII is left out. Named directly, the class would
    span U+00A0-U+D7FF, which Python's re takes some 5 ms to compile; the
    patterns here and smtp.py's would hold eleven of them, a tenth of the
    server's start-up.
    """
    ascii_left_out = "".join(f"\\x{code:02x}" for code in range(128) if chr(code) not in ascii_characters)
    return f"[^{ascii_left_out}{_NON_ASCII_LEFT_OUT}]"


# The ASCII of RFC 5321 §4.1.2's grammar: VCHAR (RFC 5234 Appendix B.1),
# atext (RFC 5322 §3.2.3), qtextSMTP, and Let-dig of domain labels.
VCHAR = "".join(map(chr, range(0x21, 0x7F)))  # printable, no space
_LETTERS_DIGITS = string.ascii_letters + string.digits
_ATEXT = _LETTERS_DIGITS + "!#$%&'*+-/=?^_`{|}~"
_QTEXT = (" " + VCHAR).replace('"', "").replace("\\", "")
_ATOM = with_utf8_text(_ATEXT) + "+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LETTER_DIGIT = with_utf8_text(_LETTERS_DIGITS)
_LABEL = rf"{_LETTER_DIGIT}(?:{with_utf8_text(_LETTERS_DIGITS + '-')}*{_LETTER_DIGIT})?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# qtextSMTP / quoted-pairSMTP: printable text, a backslash escapes any of it.
_QUOTED_STRING = re.compile(rf'"(?:{with_utf8_text(_QTEXT)}|\\[\x20-\x7e])*"')
# RFC 5321 §4.1.3: "[" IPv4 "]" or "[IPv6:" IPv6 "]"; ``ipaddress`` then checks
# the numbers (ASCII digits, each octet 0-255), which a pattern alone cannot.
_ADDRESS_LITERAL = re.compile(r"\[(IPv6:)?([0-9A-Fa-f:.]+)\]", re.IGNORECASE)
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value: printable ASCII except "=" and SP (or UTF-8, RFC 6531 §3.3).
_ESMTP_VALUE = re.compile(with_utf8_text(VCHAR.replace("=", "")) + "+")


class PathError(ValueError):
    """The path or its parameters do not follow RFC 5321 §4.1.2."""


@dataclass(frozen=True)
class Address:
    """A mailbox: ``local_part@domain``. The domain is kept lower-cased, but
    for an address literal's ``IPv6:`` tag, spelled as RFC 5321 §4.1.3 does."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def parse_path(text: str, *, reverse_path: bool) -> tuple[Address | None, str]:
    """Parse ``<path>`` at the start of ``text``; return (address, the rest).

    RFC 5321 §4.1.2: a reverse-path (MAIL) may be the null path ``<>``, and
    the address is then None; a forward-path (RCPT) may be a bare
    ``<Postmaster>`` (§4.1.1.3), which comes back with an empty domain.
    """
    text = text.lstrip(" ")  # tolerated: "MAIL FROM: <a@b>", as every MTA does
    if not text.startswith("<"):
        raise PathError("the address must be in angle brackets: <user@domain>")
    end = _closing_bracket(text)
    if end < 0:
        raise PathError("no closing '>'")
    inner, rest = text[1:end], text[end + 1:]
    if rest and not rest.startswith(" "):
        raise PathError("parameters must follow the path after a space")
    if _octets(inner) + 2 > PATH_MAX:
        raise PathError(f"the path is longer than {PATH_MAX} octets")
    if inner == "":
        if not reverse_path:
            raise PathError("the null path <> is not allowed here")
        return None, rest.strip(" ")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]  # RFC 5321 §4.1.1.3: source routes are ignored
    if inner.lower() == "postmaster" and not reverse_path:
        return Address("Postmaster", ""), rest.strip(" ")
    return parse_mailbox(inner), rest.strip(" ")


def parse_mailbox(text: str) -> Address:
    local_part, at, domain = text.rpartition("@")
    if not at or not local_part:
        raise PathError("expected local-part@domain")
    if not (_DOT_STRING.fullmatch(local_part) or _QUOTED_STRING.fullmatch(local_part)):
        raise PathError(f"bad local part {local_part!r}")
    if _octets(local_part) > LOCAL_PART_MAX:
        raise PathError(f"the local part is longer than {LOCAL_PART_MAX} octets")
    if not is_domain(domain):
        raise PathError(f"bad domain {domain!r}")
    if _octets(domain) > DOMAIN_MAX:
        raise PathError(f"the domain is longer than {DOMAIN_MAX} octets")
    domain = domain.lower()
    if domain.startswith("[ipv6:"):
        domain = "[IPv6:" + domain[len("[ipv6:"):]  # the tag as RFC 5321 §4.1.3 spells it
    return Address(local_part, domain)


def _closing_bracket(text: str) -> int:
    """The index of the ">" that closes the path opened at ``text[0]``, or -1.

    A quoted local part may hold ">" (qtextSMTP, RFC 5321 §4.1.2), so the
    first ">" is not always the end: skip quoted strings and their escapes.
    """
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def unquoted_local_part(local_part: str) -> str:
    """RFC 5321 §4.1.2: "alice" and alice are the same local part."""
    if len(local_part) >= 2 and local_part[0] == local_part[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local_part[1:-1])
    return local_part


def least_quoted(address: Address) -> str:
    """The address with its local part quoted the least, the form RFC 5321
    §4.1.2 has a sender transmit ("all quoted forms MUST be treated as
    equivalent"): ``"bob"@x`` is ``bob@x``; a local part that needs its
    quotes keeps them as given. One mailbox, one spelling."""
    unquoted = unquoted_local_part(address.local_part)
    local_part = unquoted if _DOT_STRING.fullmatch(unquoted) else address.local_part
    return str(Address(local_part, address.domain))


def is_domain(text: str) -> bool:
    """Is ``text`` a Domain or an address literal, as RFC 5321 §4.1.2 writes them?"""
    if _DOMAIN.fullmatch(text):
        # A longer label could never be looked up: the relay would retry it
        # for days. A UTF-8 label's limit is its A-label's (RFC 5890
        # §2.3.2.1), which only the resolver works out.
        return all(len(label) <= LABEL_MAX for label in text.split(".") if label.isascii())
    return _is_address_literal(text)


def unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 address written as IPv6 (``::ffff:a.b.c.d``, RFC 4291 §2.5.5.2)
    as the IPv4 address it is; any other address as it is."""
    return (address.ipv4_mapped or address) if address.version == 6 else address


def canonical_domain(domain: str) -> str:
    """One spelling of ``domain``, to tell whether two name the same place,
    and to ask DNS about it.

    A name in lower case with its UTF-8 labels in NFC (RFC 5891 §5.2) and as
    A-labels (RFC 5890 §2.3.2.1: ``bücher`` and ``xn--bcher-kva`` are one
    label); an address literal with its address as ``ipaddress`` writes it
    (``[IPv6:0::1]`` is ``[IPv6:::1]``, ``[IPv6:::ffff:127.0.0.1]`` is
    ``[127.0.0.1]``).

    An A-label is "xn--" and the label's Punycode (RFC 3492), as IDNA 2008
    makes it, with no mapping: Python's "idna" codec is IDNA 2003, whose
    mapping makes ``straße`` ``strasse``, another domain.
    """
    address = literal_address(domain)
    if address is not None:
        address = unmapped(address)
        return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"
    labels = unicodedata.normalize("NFC", domain.lower()).split(".")
    return ".".join(label if label.isascii() else "xn--" + PUNYCODE.encode(label)[0].decode("ascii")
                    for label in labels)


def in_domains(domain: str, domains: Iterable[str]) -> bool:
    """Is ``domain`` one of ``domains``, in whichever spelling (canonical_domain)?"""
    return canonical_domain(domain) in {canonical_domain(each) for each in domains}


def literal_address(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an address literal holds (``[192.0.2.1]``, ``[IPv6:::1]``,
    RFC 5321 §4.1.3), or None where ``domain`` is no literal of an address."""
    match = _ADDRESS_LITERAL.fullmatch(domain)
    if match is None:
        return None
    try:
        return (ipaddress.IPv6Address if match[1] else ipaddress.IPv4Address)(match[2])
    except ValueError:
        return None


def _is_address_literal(domain: str) -> bool:
    if literal_address(domain) is None:
        return False
    ipv6, address = _ADDRESS_LITERAL.fullmatch(domain).groups()
    return not ipv6 or _few_enough_groups(address)


def _few_enough_groups(ipv6: str) -> bool:
    """RFC 5321 §4.1.3 is stricter than RFC 4291, which ipaddress follows:
    "::" stands for "at least 2 16-bit groups of zeros", so "No more than 6
    groups in addition to the '::' may be present" (4, with an IPv4 part)."""
    if "::" not in ipv6:
        return True  # a full form: ipaddress has counted its groups
    parts = [part for part in re.split(":+", ipv6) if part]
    if "." in ipv6:  # the last part is the IPv4 address
        return len(parts) - 1 <= 4
    return len(parts) <= 6


def _octets(text: str) -> int:
    """Octets ``text`` took on the wire, for the §4.5.3.1 limits.

    The session decodes with surrogateescape, so an undecodable octet is one
    character and counts as one. Other lone surrogates cannot come from the
    wire, but a caller may pass them: count them rather than raise, since
    the grammar refuses them anyway.
    """
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def parse_parameters(text: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` -> {"KEY": "value", "KEY2": None}; keywords upper-cased."""
    parameters: dict[str, str | None] = {}
    # RFC 5321 §4.1.2: parameters are apart by SP; a Unicode space, which
    # RFC 6531 lets a value hold, divides nothing.
    for word in ascii_words(text):
        keyword, equals, value = word.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword):
            raise PathError(f"bad parameter {word!r}")
        if equals and not _ESMTP_VALUE.fullmatch(value):
            raise PathError(f"bad value in parameter {word!r}")
        keyword = keyword.upper()
        if keyword in parameters:  # "SIZE=99999 SIZE=1": which would count?
            raise PathError(f"parameter {keyword} given twice")
        parameters[keyword] = value if equals else None
    return parameters
