"""Local user accounts: names, scrypt password hashes, APOP secrets.

The user database is one JSON file, ``ROOT/.pymailsrv/users.json``, mode
0600. Every change is a read-modify-write under an ``flock`` on
``users.lock``, and the new file is written beside the old one, fsynced and
renamed over it, so the CLI and a running server never see half a file. The
server re-reads the file when it changes on disk: ``user add`` and ``user
remove`` take effect without a restart.

Passwords are stored as PHC-style strings ``$scrypt$ln=14,r=8,p=1$salt$hash``
(``hashlib.scrypt``, random 16-octet salt) and compared in constant time.
APOP (RFC 1939 §7) cannot work from a hash: the server must compute
MD5(timestamp + secret) itself. ``user add --apop`` therefore also keeps the
plain secret for that user. That is weaker than the hash alone, which is why
it is opt-in and why the file is readable by its owner only.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pymailsrv.durable import ChangedFile, UnusableFile, exclusive_lock, write_atomically

if TYPE_CHECKING:
    from pymailsrv.maildir import MaildirStore

# Server state lives here, beside the users' Maildirs; a user name can never
# be this (it may not start with a dot).
STATE_DIR_NAME = ".pymailsrv"

USER_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

# scrypt cost: N = 2**14 (the scrypt paper's figure for interactive logins),
# r = 8, p = 1 (RFC 7914 §2: "At the current time, r=8 and p=1 appears to
# yield good results"): 16 MiB and ~50 ms a check. hashlib.scrypt refuses
# more than 32 MiB unless given maxmem (OpenSSL's default), so ln=15 with
# r=8 would fail every login: raise both together, or not at all.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_OCTETS = 16
SCRYPT_HASH_OCTETS = 32

# Each scrypt call allocates 128 * r * N octets (16 MiB here), and glibc
# keeps such a block in the allocating thread's arena once it is freed. Run
# from every session thread, ten logins at once held ~190 MB for good (seen
# with scripts/bench.py); run on these few threads, at most this many blocks
# are ever kept. Two threads keep both cores busy: scrypt releases the GIL.
SCRYPT_THREADS = 2
# The pool starts its threads at its first task, not here: importing this
# module starts none (a forking server, workers.py, must fork before any).
_scrypt_threads = concurrent.futures.ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="scrypt")


class UserError(Exception):
    """A request about a user that cannot be done; the message says why."""


def check_user_name(name: str) -> str:
    """The name lower-cased, if it is a valid user name; else UserError.

    The pattern keeps a name a single, harmless path component: no "/", no
    "\\", no NUL, no leading dot (so never "..", never ".pymailsrv").
    """
    # Check ASCII before lower-casing: str.lower() turns some non-ASCII
    # look-alikes into ASCII (KELVIN SIGN U+212A becomes "k"), which would let
    # a second spelling of a name through.
    lowered = name.lower() if name.isascii() else ""
    if not USER_NAME_PATTERN.fullmatch(lowered):
        raise UserError(f"invalid user name {name!r}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit")
    return lowered


def valid_new_password(password: object) -> str:
    """The password, if a login could ever give it; else UserError: text,
    not empty, and UTF-8 (SASL PLAIN carries UTF-8, RFC 4616 §2; an APOP
    secret is hashed as UTF-8 here, which RFC 1939 §7 leaves open)."""
    if not isinstance(password, str):
        raise UserError(f"a password is text, not {type(password).__name__}")
    if not password:
        raise UserError("the password may not be empty")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # octets that were not UTF-8, kept as lone surrogates
        raise UserError("the password must be UTF-8 text") from None
    return password


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    secret = password.encode("utf-8", "surrogateescape")
    return _scrypt_threads.submit(hashlib.scrypt, secret, salt=salt, n=2**log2_n, r=r, p=p,
                                  dklen=length).result()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SCRYPT_SALT_OCTETS)
    return _phc(salt, _scrypt(password, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, SCRYPT_HASH_OCTETS))


def _phc(salt: bytes, digest: bytes) -> str:
    """The PHC string format: scheme, cost, salt, hash."""
    return f"$scrypt$ln={SCRYPT_LOG2_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, phc: str) -> bool:
    try:
        _, scheme, params, salt, digest = phc.split("$")
        cost = dict(item.split("=") for item in params.split(","))
        expected = _unb64(digest)
        computed = _scrypt(password, _unb64(salt), int(cost["ln"]), int(cost["r"]), int(cost["p"]),
                           len(expected))
    except (ValueError, KeyError, TypeError):  # a hash edited by hand (TypeError: a cost out of range)
        return False
    return scheme == "scrypt" and hmac.compare_digest(computed, expected)


# A hash to check against when the user does not exist, so that an unknown
# name takes as long to refuse as a wrong password. Its digest is random, no
# password's: made without scrypt, so importing this module starts no
# thread (a forking server, workers.py, must fork before any thread runs).
_DECOY_HASH = _phc(secrets.token_bytes(SCRYPT_SALT_OCTETS), secrets.token_bytes(SCRYPT_HASH_OCTETS))


class DamagedUserFile(UnusableFile):
    """users.json is there but holds no users: no mail is refused for it,
    and no login succeeds, till it is mended."""


def _read_users(path: Path) -> dict[str, dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except ValueError as error:  # not JSON, or not UTF-8
        raise DamagedUserFile(f"{path} is damaged: {error}") from None
    except RecursionError:
        raise DamagedUserFile(f"{path} is damaged: it is nested too deep") from None
    users = document.get("users") if isinstance(document, dict) else None
    if not isinstance(users, dict):
        raise DamagedUserFile(f"{path} is damaged: it holds no users")
    for name, record in users.items():
        # A hand edit is checked as 'user add' checks its input: one bad
        # record would otherwise fail each login with a traceback, or, named
        # "../x", become the first user and so the postmaster.
        try:
            valid_name = check_user_name(name) == name
        except UserError:
            valid_name = False
        if not valid_name:
            raise DamagedUserFile(f"{path} is damaged: {name!r} is not a user name")
        if not (isinstance(record, dict) and isinstance(record.get("password"), str)
                and isinstance(record.get("apop_secret", ""), str)):
            raise DamagedUserFile(f"{path} is damaged: the record of {name!r} is not a password and its options")
        if "apop_secret" in record:
            # An empty secret would let anyone log in by APOP: the digest of
            # the greeting's timestamp alone would match it.
            try:
                valid_new_password(record["apop_secret"])
            except UserError as error:
                raise DamagedUserFile(f"{path} is damaged: the APOP secret of {name!r}: {error}") from None
    return users


class UserStore:
    """The accounts in ``users.json``: read through a cache that follows the
    file, changed under an flock. Names given to the readers (``exists``,
    ``check_password``, ``apop_secret``) are the checked, lower-cased ones
    (``check_user_name``); the CLI and the sessions check them first."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "users.json"
        self._lock_path = self.state_dir / "users.lock"
        self._file = ChangedFile(self.path, _read_users, missing={})
        # anyone_has_apop_secret's answer, with the users it was found in.
        self._apop_answer: tuple[object, bool] = (None, False)

    # --- reading ---------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, str]]:
        """The users, re-read only when the file changed on disk."""
        return self._file.get()

    def names(self) -> list[str]:
        return sorted(self._load())

    def exists(self, name: str) -> bool:
        return name in self._load()

    def check_password(self, name: str, password: str) -> bool:
        record = self._load().get(name)
        if record is None:
            verify_password(password, _DECOY_HASH)
            return False
        return verify_password(password, record["password"])

    def apop_secret(self, name: str) -> str | None:
        record = self._load().get(name)
        return record.get("apop_secret") if record else None

    def anyone_has_apop_secret(self) -> bool:
        """Could an APOP login succeed now? False too while users.json cannot
        be read, when no login can."""
        try:
            users = self._load()
        except (UnusableFile, OSError):
            return False
        seen_in, answer = self._apop_answer
        if seen_in is not users:  # users.json changed: ask again, once
            answer = any("apop_secret" in record for record in users.values())
            self._apop_answer = (users, answer)
        return answer

    # --- changing ----------------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, str]]]:
        """Read, let the caller change, and atomically write the users, under the lock."""
        with exclusive_lock(self._lock_path):
            # Read afresh, not from the cache, as aliases.py does: a rewrite by
            # another process could in principle get the old inode number back,
            # and with the same size and time look unchanged.
            try:
                users = _read_users(self.path)
            except FileNotFoundError:
                users = {}
            yield users
            write_atomically(self.path, json.dumps({"users": users}, indent=2, sort_keys=True).encode("utf-8"))

    def add(self, name: str, password: str, apop: bool = False) -> None:
        name = check_user_name(name)  # else the file holds a name that _read_users refuses
        with self._editing() as users:
            if name in users:
                raise UserError(f"user {name!r} already exists")
            users[name] = self._record(password, apop)

    def set_password(self, name: str, password: str) -> None:
        with self._editing() as users:
            if name not in users:
                raise UserError(f"no such user {name!r}")
            users[name] = self._record(password, apop="apop_secret" in users[name])

    def remove(self, name: str) -> None:
        with self._editing() as users:
            if users.pop(name, None) is None:
                raise UserError(f"no such user {name!r}")

    @staticmethod
    def _record(password: str, apop: bool) -> dict[str, str]:
        record = {"password": hash_password(valid_new_password(password))}
        if apop:
            record["apop_secret"] = password
        return record


def add_account(users: UserStore, mailboxes: MaildirStore, name: str, password: str, *,
                apop: bool = False) -> int:
    """Create user ``name`` and their Maildir, as 'user add', 'classroom setup'
    and the test kit all do; returns how many messages the Maildir already
    holds: 'user remove' keeps a user's mail, so a new account of the same
    name gets what an earlier one left (the caller says so).

    The Maildir comes first: a user whose Maildir cannot be made is not
    added. (Should adding the user fail after it, an empty Maildir is left:
    harmless.)
    """
    name = check_user_name(name)  # before the name becomes a path
    mailboxes.create_maildir(name)
    users.add(name, password, apop=apop)
    return len(mailboxes.messages(name))
