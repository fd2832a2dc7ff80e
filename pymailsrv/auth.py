"""SASL exchanges shared by SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034).

Both protocols carry the same conversation: the server sends a challenge,
the client answers with a line of base64, until the mechanism has what it
needs. The client may send its first answer on the AUTH line itself (the
*initial response*; "=" stands for an empty one) and may give up at any
time by answering "*". Each mechanism below is a generator that yields its
challenges and receives the decoded answers, so its steps read in order:

* PLAIN (RFC 4616 §2): one answer, ``authzid NUL authcid NUL passwd``.
* LOGIN (draft-murchison-sasl-login): "Username:", then "Password:".

The sessions check the credentials against the user store, as for
USER/PASS; this module knows nothing of users, sockets or replies.
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import struct
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from pymailsrv.limits import AUTH_THROTTLE_ADDRESSES, AUTH_THROTTLE_PROBES
from pymailsrv.shared import SharedRecords, client_key
from pymailsrv.users import UserError, UserStore, check_user_name

log = logging.getLogger("pymailsrv.auth")

# RFC 4954 §4 / RFC 5034 §4: "*" cancels, "=" is an empty initial response.
CANCEL = "*"
EMPTY_INITIAL_RESPONSE = "="


class SaslError(Exception):
    """The client's answer is not what the mechanism expects (bad base64, bad form)."""


class SaslCancelled(Exception):
    """The client answered "*"."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    # RFC 4616 §2: whom the user asks to act as; empty means itself.
    authzid: str = ""

    def check(self, users: UserStore) -> Callable[[str], bool]:
        """The test a login makes of these credentials (Session.check_login).

        RFC 4616 §2: the server "will verify that the authentication
        credentials permit the client to act as the (presented or derived)
        authorization identity (authzid). If both steps succeed, the user is
        authenticated": a refused authzid fails as a wrong password does.
        We let no user act for another: the authzid must be empty or the
        user itself, in any case, as every user name is read
        (users.check_user_name).
        """
        def valid(name: str) -> bool:
            if self.authzid and not _same_user(self.authzid, self.user):
                return False
            return users.check_password(name, self.password)

        return valid


Mechanism = Generator[bytes, bytes, Credentials]


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("credentials must be UTF-8") from None


def plain() -> Mechanism:
    """RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd,
    authcid and passwd each 1*SAFE: neither may be empty."""
    answer = yield b""  # the challenge is empty
    parts = answer.split(b"\0")
    if len(parts) != 3 or not (parts[1] and parts[2]):
        # Malformed, not a wrong password: no check, and no failure counted.
        raise SaslError("PLAIN expects authzid NUL authcid NUL password")
    authzid, authcid, password = (_text(part) for part in parts)
    return Credentials(authcid, password, authzid)


def _same_user(name: str, other: str) -> bool:
    try:
        return check_user_name(name) == check_user_name(other)
    except UserError:
        return False


def login() -> Mechanism:
    """The LOGIN mechanism: two prompts, the user name then the password."""
    user = yield b"Username:"
    password = yield b"Password:"
    return Credentials(_text(user), _text(password))


MECHANISMS: dict[str, Callable[[], Mechanism]] = {"PLAIN": plain, "LOGIN": login}


class SaslExchange:
    """One AUTH exchange. ``answer()`` returns the next challenge (base64) or the Credentials."""

    def __init__(self, mechanism: str) -> None:
        self._steps = MECHANISMS[mechanism]()
        self._challenge = next(self._steps)

    def challenge(self) -> str:
        """The pending challenge, base64-encoded as it goes on the wire."""
        return base64.b64encode(self._challenge).decode("ascii")

    def answer(self, line: str) -> str | Credentials:
        """The next challenge, or the credentials, for the client's ``line``:
        base64 and nothing else, which RFC 4954 §4 has a server "reject (and
        not ignore)", blanks around it too; or ``*``, which cancels."""
        if line == CANCEL:
            raise SaslCancelled
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise SaslError("the answer is not valid base64") from None
        try:
            self._challenge = self._steps.send(decoded)
        except StopIteration as finished:
            return finished.value
        return self.challenge()


class Admission(enum.Enum):
    """What the throttle says of a login about to be checked (FailureThrottle.begin)."""

    CHECK = "check"  # check it: it is counted as under way until end()
    WAIT = "wait"  # ask again shortly: the checks under way may yet use up what is left
    REFUSE = "refuse"  # the address has failed too often lately: answer it unchecked


class FailureThrottle:
    """Failed logins per client address, in windows of time (Postfix's anvil idea).

    Shared by every session of a server, and by its worker processes
    (shared.py). Once an address has failed ``limit`` times within
    ``window`` seconds of its first failure, ``begin`` refuses its logins
    until the window is over, and the sessions answer them unchecked, so a
    password cannot be guessed at line rate from many connections. Other
    addresses are not slowed by it, but for an IPv6 address's neighbours:
    one client may hold a whole /48, so the /48 is counted as one.

    Logins sent at once on many connections are held to the limit too: a
    login waits while the checks already under way, were they all to fail,
    would reach it. So at most ``limit`` guesses are checked in a window
    (while the table has room: see below), and right passwords sent at
    once only wait a check's time.

    The table is a hash table of ``size`` records - address, failures,
    checks under way, start of the window - each address in one of
    AUTH_THROTTLE_PROBES records after the one its key picks. A record with
    no check under way and no failure inside its window is free for another
    address. Where all of an address's places are taken, its login is
    checked uncounted, and logged: refusing it would let whoever fills the
    table lock everybody out. Where an address goes is keyed with a secret
    (``shared.address_key``), so no client can aim at another's places.
    Times are ``time.monotonic()``: one clock for every process of the
    machine.
    """

    # client_key (FREE: never used), failures, checks under way, window start
    _RECORD = struct.Struct("=Qqqd")

    def __init__(self, limit: int, window: float, size: int = AUTH_THROTTLE_ADDRESSES) -> None:
        self._limit = limit
        self._window = window
        self._table = SharedRecords(self._RECORD, size)
        self._size = size

    def _places(self, key: int) -> list[int]:
        """The indexes where ``key``'s record may be (open addressing, linear probing)."""
        return [(key + step) % self._size for step in range(min(AUTH_THROTTLE_PROBES, self._size))]

    def begin(self, address: str) -> Admission:
        """May a login from ``address`` be checked now? CHECK counts it as
        under way until ``end``; testing and counting happen under one lock."""
        key, now = client_key(address), time.monotonic()
        with self._table.locked():
            free = None
            for index in self._places(key):
                held, failures, checking, since = self._table.read(index)
                if held == key:
                    if failures and now - since >= self._window:
                        failures = 0  # a new window; checks under way from the old still count
                    if failures >= self._limit:
                        return Admission.REFUSE
                    if failures + checking >= self._limit:
                        return Admission.WAIT
                    self._table.write(index, key, failures, checking + 1, since)
                    return Admission.CHECK
                if free is None and self._is_free(failures, checking, since, now):
                    free = index
            if free is not None:
                self._table.write(free, key, 0, 1, now)
                return Admission.CHECK
        log.warning("failed-login table full: a login from %s is not counted", address)
        return Admission.CHECK

    def end(self, address: str, failed: bool) -> None:
        """A check that ``begin`` let through is over; ``failed``: a wrong password."""
        key, now = client_key(address), time.monotonic()
        with self._table.locked():
            for index in self._places(key):
                held, failures, checking, since = self._table.read(index)
                if held == key:
                    if failed:
                        if not failures or now - since >= self._window:
                            failures, since = 0, now  # the window starts at its first failure
                        failures += 1
                    self._table.write(index, key, failures, max(checking - 1, 0), since)
                    return

    def forget_checks(self) -> None:
        """Count no check as under way: a worker process died, and the checks
        it had begun will never end. (Those of the other workers that are
        under way are forgotten too: a moment's leeway, at a rare event.)"""
        with self._table.locked():
            for index in range(self._size):
                held, failures, checking, since = self._table.read(index)
                if checking:
                    self._table.write(index, held, failures, 0, since)

    def _is_free(self, failures: int, checking: int, since: float, now: float) -> bool:
        """May this record go to another address? Only if it remembers nothing
        that still counts: no check under way, no failure inside its window."""
        return not checking and (not failures or now - since >= self._window)
