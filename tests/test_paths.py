"""Paths and parameters (RFC 5321 §4.1.2, §4.5.3.1): pure tests of ``pymailsrv.paths``.

No server here: the parser gets text and either returns an ``Address`` and
the parameter text after it, or raises ``PathError``. The SMTP session turns
that error into a 501; ``test_smtp.py`` checks that on the wire. The last
tests are properties: whatever text a client sends, the parsers raise
nothing but ``PathError``.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymailsrv.paths import (
    DOMAIN_MAX,
    LOCAL_PART_MAX,
    PATH_MAX,
    Address,
    PathError,
    canonical_domain,
    parse_mailbox,
    parse_parameters,
    parse_path,
    with_utf8_text,
)


def forward(text: str) -> Address:
    """A forward-path (RCPT) that must parse and carry no parameters."""
    address, rest = parse_path(text, reverse_path=False)
    assert rest == ""
    return address


# --- the path and its brackets ------------------------------------------------


def test_plain_path_gives_local_part_and_domain():
    assert parse_path("<alice@example.org>", reverse_path=False) == (Address("alice", "example.org"), "")


def test_domain_is_lower_cased_and_local_part_is_kept_as_sent():
    # RFC 5321 §2.4: domains are case-insensitive, local parts may not be.
    assert forward("<Alice@Example.ORG>") == Address("Alice", "example.org")


def test_null_reverse_path_is_none_where_allowed():
    assert parse_path("<>", reverse_path=True) == (None, "")


def test_null_path_is_refused_as_a_forward_path():
    with pytest.raises(PathError, match="null path"):
        parse_path("<>", reverse_path=False)


@pytest.mark.parametrize("text", ["alice@example.org", "alice", "", " ", "alice@example.org>"])
def test_address_without_angle_brackets_is_refused(text):
    with pytest.raises(PathError, match="angle brackets"):
        parse_path(text, reverse_path=True)


def test_path_without_closing_bracket_is_refused():
    with pytest.raises(PathError, match="closing"):
        parse_path("<alice@example.org", reverse_path=False)


def test_space_before_the_path_is_tolerated():
    # "MAIL FROM: <a@b>" is common enough that every MTA accepts it.
    assert parse_path("  <alice@example.org>", reverse_path=False) == (Address("alice", "example.org"), "")


def test_parameters_after_the_path_come_back_as_the_rest():
    assert parse_path("<a@example.org> SIZE=10 BODY=8BITMIME", reverse_path=True) == (
        Address("a", "example.org"), "SIZE=10 BODY=8BITMIME")


def test_parameters_glued_to_the_path_are_refused():
    with pytest.raises(PathError, match="after a space"):
        parse_path("<a@example.org>SIZE=10", reverse_path=True)


def test_source_route_is_accepted_and_ignored():
    # RFC 5321 §4.1.1.3 and Appendix C: a server SHOULD ignore the route.
    assert forward("<@relay.example,@hop.example:alice@example.org>") == Address("alice", "example.org")
    assert forward("<@relay.example:alice@example.org>") == Address("alice", "example.org")


@pytest.mark.parametrize("text", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_is_a_path_without_domain(text):
    # RFC 5321 §4.1.1.3: "RCPT TO:<Postmaster>" must be accepted, case-insensitively.
    address = forward(text)
    assert address == Address("Postmaster", "")
    assert str(address) == "Postmaster"


@pytest.mark.parametrize("text", ["<Postmaster>", "<@relay.example:postmaster>"])
def test_bare_postmaster_is_refused_as_a_reverse_path(text):
    # RFC 5321 §4.1.2: a reverse-path is a Mailbox, with its domain, or <>;
    # the bare <Postmaster> is for RCPT only.
    with pytest.raises(PathError, match="expected local-part@domain"):
        parse_path(text, reverse_path=True)


def test_postmaster_after_a_source_route_is_still_postmaster():
    assert forward("<@relay.example:Postmaster>") == Address("Postmaster", "")


def test_other_bare_local_parts_need_a_domain():
    with pytest.raises(PathError, match="local-part@domain"):
        forward("<alice>")


# --- local parts -----------------------------------------------------------------


@pytest.mark.parametrize("local_part", [
    '"john doe"', '"a\\"b"', '"a@b"', '"a>b"', '"a..b"', '""',
])
def test_quoted_local_part_is_kept_with_its_quotes(local_part):
    assert forward(f"<{local_part}@example.org>") == Address(local_part, "example.org")


@pytest.mark.parametrize("local_part", ["a%b", "a!b", "a+tag", "o'brien", "a/b", "x.y.z", "{x}"])
def test_atext_characters_are_ordinary_local_part_characters(local_part):
    # "%" and "!" never route anything: they are just characters (RFC 5321 §3.6.1).
    assert forward(f"<{local_part}@example.org>") == Address(local_part, "example.org")


@pytest.mark.parametrize("local_part", ["a..b", ".a", "a.", "..", "../x", ".pymailsrv", "a b", "a\\b",
                                        "a(b)", "a,b", "a\x00b", "a\x7fb"])
def test_local_part_that_is_neither_dot_string_nor_quoted_string_is_refused(local_part):
    with pytest.raises(PathError, match="local part"):
        forward(f"<{local_part}@example.org>")


def test_unbalanced_quote_leaves_the_path_unclosed():
    # Inside quotes ">" is text, so an unclosed quote runs past the bracket.
    with pytest.raises(PathError, match="closing"):
        forward('<"unclosed@example.org>')


def test_local_part_of_64_octets_is_accepted_and_65_refused():
    # RFC 5321 §4.5.3.1.1.
    assert LOCAL_PART_MAX == 64
    assert forward(f"<{'a' * 64}@example.org>").local_part == "a" * 64
    with pytest.raises(PathError, match="64 octets"):
        forward(f"<{'a' * 65}@example.org>")


def test_local_part_limit_counts_utf8_octets_not_characters():
    assert forward(f"<{'é' * 32}@example.org>").local_part == "é" * 32  # 64 octets
    with pytest.raises(PathError, match="64 octets"):
        forward(f"<{'é' * 32}a@example.org>")


# --- domains ---------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["", "-x.example", "x-.example", "x..example", ".example", "example.",
                                    "ex ample", "ex_ample", "[192.0.2.1", "exa(mple)"])
def test_malformed_domain_is_refused(domain):
    with pytest.raises(PathError, match="domain"):
        forward(f"<alice@{domain}>")


def test_domain_of_255_octets_is_accepted_and_256_refused():
    # RFC 5321 §4.5.3.1.2; checked on the mailbox, since a whole path is at most 256.
    assert DOMAIN_MAX == 255
    domain = ".".join(["a" * 63] * 4)
    assert len(domain) == 255
    assert parse_mailbox(f"x@{domain}") == Address("x", domain)
    too_long = ".".join(["a" * 63] * 3 + ["b" * 62, "c"])
    assert len(too_long) == 256
    with pytest.raises(PathError, match="255 octets"):
        parse_mailbox(f"x@{too_long}")


def test_a_label_of_63_octets_is_accepted_and_64_refused():
    # RFC 1035 §2.3.4: such a domain could never be looked up.
    assert forward(f"<x@{'a' * 63}.example>").domain == f"{'a' * 63}.example"
    with pytest.raises(PathError, match="domain"):
        forward(f"<x@{'a' * 64}.example>")


@pytest.mark.parametrize("literal, kept_as", [
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
    ("[ipv6:::1]", "[IPv6:::1]"),  # the tag as RFC 5321 §4.1.3 spells it
    ("[IPv6:1:2:3:4:5:6::]", "[IPv6:1:2:3:4:5:6::]"),  # six groups and "::": the most §4.1.3 allows
    ("[IPv6:1:2:3:4::1.2.3.4]", "[IPv6:1:2:3:4::1.2.3.4]"),  # four and an IPv4 part
])
def test_address_literal_is_a_domain(literal, kept_as):
    assert forward(f"<alice@{literal}>") == Address("alice", kept_as)


@pytest.mark.parametrize("literal", ["[256.1.1.1]", "[999.999.999.999]", "[1.2.3]", "[\u0661.\u0661.\u0661.\u0661]",
                                     "[IPv6:not-an-address]", "[IPv6:2001:db8::1::2]", "[2001:db8::1]",
                                     # RFC 5321 §4.1.3: "::" is at least two groups, so at most 6 others
                                     # (4 beside an IPv4 part), where RFC 4291 allows 7 (5).
                                     "[IPv6:1:2:3:4:5:6:7::]", "[IPv6:1::2:3:4:5:6:7]", "[IPv6:1:2:3:4:5::1.2.3.4]"])
def test_address_literal_that_is_not_an_ip_address_is_refused(literal):
    # RFC 5321 §4.1.3: IPv4 literals are four decimal octets (0-255, ASCII digits).
    with pytest.raises(PathError, match="domain"):
        forward(f"<alice@{literal}>")


def test_utf8_local_part_and_domain_parse_and_are_not_ascii():
    # RFC 6531 §3.3; whether the client may use them (SMTPUTF8) is the session's call.
    address = forward("<jürgen@bücher.example>")
    assert address == Address("jürgen", "bücher.example")
    assert not address.is_ascii
    assert forward("<alice@example.org>").is_ascii


@pytest.mark.parametrize("path", ["<a\u0085b@example.org>", "<alice@ex\u009fample.org>", '<"a\u0080b"@example.org>'])
def test_c1_control_characters_never_make_an_address(path):
    # RFC 5198 §2: no control characters in text on the net, UTF-8 or not.
    with pytest.raises(PathError):
        forward(path)


def test_undecodable_octets_never_make_an_address():
    # The session decodes with surrogateescape; such characters match no rule.
    raw = b"<al\xffice@example.org>".decode("utf-8", "surrogateescape")
    with pytest.raises(PathError):
        forward(raw)


# --- whole path length -------------------------------------------------------------


def test_path_of_256_octets_is_accepted_and_257_refused():
    # RFC 5321 §4.5.3.1.3: 256 octets "including the punctuation and element separators".
    assert PATH_MAX == 256
    domain = "a" * 63 + "." + "b" * 63 + "." + "c" * 61
    text = f"<{'x' * 64}@{domain}>"
    assert len(text) == 256
    assert forward(text).domain == domain
    with pytest.raises(PathError, match="256 octets"):
        forward(f"<{'x' * 64}@{domain}c>")


# --- parameters ---------------------------------------------------------------------


def test_no_parameter_text_gives_no_parameters():
    assert parse_parameters("") == {}


def test_parameters_map_upper_cased_keywords_to_values_or_none():
    assert parse_parameters("size=100 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_parameters_may_be_separated_by_several_spaces():
    assert parse_parameters("SIZE=1   BODY=7BIT") == {"SIZE": "1", "BODY": "7BIT"}


def test_utf8_parameter_value_is_allowed():
    # RFC 6531 §3.3 extends esmtp-value with UTF-8.
    assert parse_parameters("X-NOTE=grüße") == {"X-NOTE": "grüße"}


# RFC 5321 §4.1.2: parameters are apart by SP. str.split() would also split
# at Unicode spaces and controls: "SIZE=1<EM SPACE>SMTPUTF8" would switch
# SMTPUTF8 on, where a filter in front of the server sees one SIZE.
@pytest.mark.parametrize("text, parameters", [
    ("AUTH=x\xa0y SMTPUTF8", {"AUTH": "x\xa0y", "SMTPUTF8": None}),  # UTF-8 text a value may hold
    ("SIZE=1\u2003SMTPUTF8", {"SIZE": "1\u2003SMTPUTF8"}),  # one SIZE, and not a number
])
def test_only_ascii_white_space_parts_parameters(text, parameters):
    assert parse_parameters(text) == parameters


@pytest.mark.parametrize("text", ["SIZE=1\x1cSMTPUTF8", "AUTH=x\x85y"])
def test_a_control_that_str_split_parts_at_is_a_bad_value(text):
    with pytest.raises(PathError, match="bad value"):
        parse_parameters(text)


# Every edge of UTF8-non-ascii (RFC 6531 §3.3) less the C1 controls and lone
# surrogates: in, out.
UTF8_TEXT_EDGES = ["\xa0", "\xff", "\u0100", "\ud7ff", "\ue000", "\uffff", "\U00010000", "\U0010ffff"]
NOT_UTF8_TEXT = ["\x80", "\x85", "\x9f", "\ud800", "\udc80", "\udfff"]


def test_a_class_with_utf8_text_holds_exactly_its_ascii_and_utf8_text():
    letter_digit_or_hyphen = re.compile(with_utf8_text("abc-"))
    ascii_in = [chr(code) for code in range(128) if letter_digit_or_hyphen.fullmatch(chr(code))]
    assert ascii_in == ["-", "a", "b", "c"]
    assert all(letter_digit_or_hyphen.fullmatch(character) for character in UTF8_TEXT_EDGES)
    assert not any(letter_digit_or_hyphen.fullmatch(character) for character in NOT_UTF8_TEXT)


@pytest.mark.parametrize("text", ["=1", "-X=1", "X_Y=1", "SIZE=", "X=a=b", "X=\x7f", "X=\x01", "SIZE=1 =2",
                                  "ü=1"])
def test_malformed_parameter_is_refused(text):
    # RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
    # esmtp-value = 1*(%d33-60 / %d62-126).
    with pytest.raises(PathError, match="parameter"):
        parse_parameters(text)


# --- properties -----------------------------------------------------------------------

# What a client can put on the wire, as the session decodes it.
wire_text = st.binary(max_size=300).map(lambda data: data.decode("utf-8", "surrogateescape"))
# Any code point, lone surrogates included, with the grammar's punctuation
# drawn often enough that the parsers get past their first check.
any_text = st.text(alphabet=st.one_of(st.characters(exclude_categories=()),
                                      st.sampled_from('<>@:,.="\\ []\ud800\udcff')), max_size=300)
path_like = st.builds(lambda route, inner, rest: f"<{route}{inner}>{rest}",
                      st.sampled_from(["", "@a.example:", "@a,@b:"]),
                      st.one_of(any_text, wire_text,
                                st.builds(lambda local, domain: f"{local}@{domain}", any_text, any_text)),
                      st.one_of(st.just(""), any_text))


@given(text=st.one_of(any_text, wire_text, path_like), reverse_path=st.booleans())
def test_parse_path_raises_nothing_but_path_error(text, reverse_path):
    try:
        address, rest = parse_path(text, reverse_path=reverse_path)
    except PathError:
        return
    assert address is None or isinstance(address, Address)
    assert isinstance(rest, str)


@given(text=st.one_of(any_text, wire_text))
def test_parse_parameters_raises_nothing_but_path_error(text):
    try:
        parameters = parse_parameters(text)
    except PathError:
        return
    assert all(keyword.isupper() or not keyword.isalpha() for keyword in parameters)


@given(text=st.one_of(any_text, wire_text))
def test_parse_mailbox_raises_nothing_but_path_error(text):
    try:
        parse_mailbox(text)
    except PathError:
        pass


@pytest.mark.parametrize("domain, canonical", [
    ("Mail.Example", "mail.example"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.Example", "xn--bcher-kva.example"),
    ("[127.0.0.1]", "[127.0.0.1]"),
    ("[ipv6:0:0::1]", "[IPv6:::1]"),
    ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
    ("a" * 64 + ".example", "a" * 64 + ".example"),  # no name for DNS: compared as written, lower-cased
    ("straße.example", "xn--strae-oqa.example"),  # IDNA 2008; IDNA 2003 made it strasse, another domain
    ("ς.example", "xn--3xa.example"),  # final sigma is not σ (xn--4xa)
    ("bu\u0308cher.example", "xn--bcher-kva.example"),  # RFC 5891 §5.2: NFC first
    ("[IPv6:::ffff:127.0.0.1]", "[127.0.0.1]"),
])
def test_canonical_domain_is_one_spelling_of_each_place(domain, canonical):
    assert canonical_domain(domain) == canonical
