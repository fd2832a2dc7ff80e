"""``pymailsrv classroom``: accounts for a class, and a clean slate after it.

``classroom setup --students 24`` makes ``student01`` .. ``student24``, each
with a Maildir and a password, and prints a sheet the teacher can hand out:
user, password, address, and where the SMTP and POP3 servers listen. The
same rows can go to a CSV file for a mail merge; that file holds passwords,
so it is created readable by its owner only (mode 0600), like users.json.

* Names are the prefix and a number zero-padded to the width of the count,
  at least two digits, so they sort in order in every listing (student01 ..
  student09, student10; student001 .. student120).
* Passwords come from ``secrets`` (the OS's CSPRNG), 12 characters from an
  alphabet without look-alikes (no 0/o, 1/l/i), in three groups of four so
  they can be read aloud and typed from paper: ``k7dm-q3xa-9fpe``. That is
  31**12, about 59 bits: plenty for a classroom server, and the passwords
  are stored only as scrypt hashes (users.py). ``--password-stdin`` gives
  everyone one password instead, for a class that should share it.
* An account that already exists is left alone, password included, and
  named in a note: running setup twice never locks a student out. The CSV
  file must be a new one each time, so no earlier sheet's passwords are
  written over. Ctrl-C, SIGTERM or a closed terminal stops setup between
  two accounts: those made so far are still printed (and written to the CSV
  file).

``classroom reset`` empties every student mailbox between lessons. It takes
each maildrop's lock first, as a POP3 session does (RFC 1939 §4), so a
student who is still logged in keeps a consistent session: that mailbox is
skipped with a note, and the teacher can run reset again later. A mailbox
that cannot be opened is skipped with a note too, and the rest are emptied.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

import click
from tabulate import tabulate

from pymailsrv.cli_common import as_data_root_owner, note_mail_left, output_file, read_password, require_data_root
from pymailsrv.config import Settings, host_and_port
from pymailsrv.maildir import MaildirStore
from pymailsrv.replies import counted
from pymailsrv.paths import literal_address
from pymailsrv.stopping import StopRequest
from pymailsrv.storage import MaildropLocked, StorageError
from pymailsrv.users import UserError, UserStore, add_account, check_user_name

DEFAULT_PREFIX = "student"
NUMBER_MIN_DIGITS = 2
# The most accounts one setup makes: a typo stopper (100000 ran on and on,
# at a password hash each, and a SIGTERM lost the sheet of those made).
CLASS_SIZE_MAX = 1000

# Lower case and digits minus the ones that look alike on paper or a projector.
PASSWORD_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PASSWORD_GROUPS = 3
PASSWORD_GROUP_LENGTH = 4

# Listening on every address is no address a student can type; the sheet
# then names the machine instead.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


@dataclass(frozen=True)
class Account:
    """One row of the sheet handed to a student (and of the CSV file)."""

    user: str
    password: str
    address: str
    smtp: str  # host:port
    pop3: str  # host:port


SHEET_HEADERS = ("user", "password", "address", "SMTP server", "POP3 server")  # in Account's field order


@dataclass(frozen=True)
class SetupResult:
    created: list[Account]
    skipped: list[str]  # names that already existed
    # Created accounts whose Maildir already held mail an earlier account of
    # that name left ('user remove' keeps it): user -> messages.
    inherited: dict[str, int]


class SetupInterrupted(Exception):
    """setup_class stopped part way (Ctrl-C, a full disk ...): ``result`` holds
    the accounts made so far, whose passwords are written nowhere else."""

    def __init__(self, result: SetupResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result


@dataclass(frozen=True)
class ResetResult:
    removed: dict[str, int]  # user -> messages removed
    busy: list[str]  # users whose maildrop a POP3 session holds
    unopened: dict[str, str]  # user -> why their maildrop could not be opened
    failures: int  # messages that could not be removed


def _print_sheet(accounts: list[Account]) -> None:
    click.echo(tabulate([astuple(account) for account in accounts], headers=SHEET_HEADERS))


def check_prefix(prefix: str) -> None:
    """ValueError for the empty prefix: "01", "02" are names no one would take
    for a student's, and reset would empty every all-digit user's mailbox."""
    if not prefix:
        raise ValueError("give a prefix: user names are the prefix, then a number")


def student_names(prefix: str, count: int) -> list[str]:
    """``prefix01`` .. ``prefixNN``, padded to the width of ``count`` (at least 2 digits)."""
    if count < 1:
        raise ValueError("a class has at least one student")
    check_prefix(prefix)
    width = max(NUMBER_MIN_DIGITS, len(str(count)))
    try:
        return [check_user_name(f"{prefix}{number:0{width}d}") for number in range(1, count + 1)]
    except UserError as error:
        raise ValueError(f"prefix {prefix!r} does not make valid user names: {error}") from None


def is_student(name: str, prefix: str) -> bool:
    """True for names ``setup`` makes with this prefix: the prefix, then digits only."""
    return re.fullmatch(re.escape(prefix.lower()) + r"[0-9]+", name) is not None


def generate_password() -> str:
    """A random password that survives being read aloud, e.g. ``k7dm-q3xa-9fpe``."""
    groups = ("".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_GROUP_LENGTH))
              for _ in range(PASSWORD_GROUPS))
    return "-".join(groups)


def server_host(settings: Settings) -> str:
    """The host a student should connect to (``settings.host`` unless it is a
    wildcard), an address as an address ("[192.0.2.1]", as the hostname
    setting may write it, is 192.0.2.1)."""
    host = settings.hostname if settings.host in _WILDCARD_HOSTS else settings.host
    address = literal_address(host)
    return str(address) if address is not None else host


def setup_class(settings: Settings, count: int, prefix: str = DEFAULT_PREFIX,
                shared_password: str | None = None, stop: StopRequest | None = None) -> SetupResult:
    """Create the class's accounts and Maildirs; existing accounts are skipped untouched.

    SetupInterrupted if it stops part way, with the accounts made so far:
    on an error, or when ``stop`` is set (looked at between two accounts).
    """
    users = UserStore(settings.state_dir)
    store = MaildirStore(settings.root)
    host = server_host(settings)
    names = student_names(prefix, count)
    result = SetupResult(created=[], skipped=[], inherited={})
    try:
        for name in names:
            if stop is not None and stop.requested:
                raise KeyboardInterrupt  # as Ctrl-C would, but between two accounts
            if users.exists(name):
                result.skipped.append(name)
                continue
            password = shared_password if shared_password is not None else generate_password()
            try:
                # The Maildir first: an account whose Maildir could not be
                # made would be skipped, password unknown, next time.
                left = add_account(users, store, name, password)
            except UserError:  # created by someone else since we looked
                result.skipped.append(name)
                continue
            result.created.append(Account(name, password, f"{name}@{settings.domains[0]}",
                                          host_and_port(host, settings.smtp.port),
                                          host_and_port(host, settings.pop3.port)))
            if left:
                result.inherited[name] = left
    except (Exception, KeyboardInterrupt) as error:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        raise SetupInterrupted(result, reason) from error
    return result


def write_csv(path: str | os.PathLike, accounts: list[Account]) -> None:
    """The sheet as CSV, in a new file readable by its owner only: it holds
    passwords, and an earlier sheet's would be lost if it were written over."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(SHEET_HEADERS)
        writer.writerows(astuple(account) for account in accounts)


def reset_class(settings: Settings, prefix: str = DEFAULT_PREFIX) -> ResetResult:
    """Remove every message from every student maildrop that no session holds."""
    check_prefix(prefix)
    store = MaildirStore(settings.root)
    removed: dict[str, int] = {}
    busy: list[str] = []
    unopened: dict[str, str] = {}
    failures = 0
    for name in UserStore(settings.state_dir).names():
        if not is_student(name, prefix):
            continue
        try:
            maildrop = store.open_maildrop(name)
        except MaildropLocked:
            busy.append(name)
            continue
        except (OSError, StorageError) as error:  # one broken mailbox: the others are still emptied
            unopened[name] = str(error)
            continue
        try:
            keys = [message.key for message in maildrop.snapshot()]
            failed = maildrop.expunge(keys)
        finally:
            maildrop.release()
        removed[name] = len(keys) - failed
        failures += failed
    return ResetResult(removed, busy, unopened, failures)


# --- the command line -----------------------------------------------------------------


def classroom_group(with_settings: Callable) -> click.Group:
    """The ``classroom`` commands; cli.py hands in its ``with_settings``.

    Taking the decorator as an argument lets this module stay free of an
    import of cli.py, which imports this module to register the group.
    """

    @click.group()
    def classroom() -> None:
        """Accounts for a class of students."""

    @classroom.command("setup")
    @click.option("--students", type=click.IntRange(1, CLASS_SIZE_MAX), required=True,
                  help=f"How many accounts (at most {CLASS_SIZE_MAX}).")
    @click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="User names are PREFIX01, ...")
    @output_file("--csv", "csv_path", new=True,
                 help_text="Also write the sheet to this new CSV file (mode 0600: it holds passwords).")
    @click.option("--password-stdin", is_flag=True,
                  help="One password for everyone, from the first line of stdin.")
    @with_settings
    def setup(settings: Settings, students: int, prefix: str, csv_path: str | None,
              password_stdin: bool) -> None:
        """Create student accounts and print a sheet to hand out."""
        as_data_root_owner(settings.root)
        # The sheet is then written as that owner: a directory only root may
        # write into is refused now, before any account is made.
        if csv_path is not None and not os.access(Path(csv_path).parent, os.W_OK):
            raise click.ClickException(f"cannot write {csv_path}: not writable by the data root's "
                                       f"owner, whom this command runs as")
        shared = None
        if password_stdin:
            shared = read_password(from_stdin=True)
        stopped = None
        # Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop setup between
        # two accounts: else they could end it between an account's making
        # and its row on the sheet, a password written nowhere.
        stop = StopRequest()
        try:
            result = setup_class(settings, students, prefix, shared, stop)
        except SetupInterrupted as interruption:
            stopped, result = interruption, interruption.result
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        finally:
            stop.restore()
        if stopped is not None and not result.created:
            raise click.ClickException(f"no account made: {stopped}")
        made = counted(len(result.created), "account")
        # Those passwords exist nowhere else. The file first: after a SIGHUP
        # the terminal is gone, and the printed sheet with it.
        unwritten = None
        if csv_path is not None:
            try:
                write_csv(csv_path, result.created)
            except OSError as error:  # what no check beforehand can rule out: a full disk, say
                unwritten = error
        for name in result.skipped:
            click.echo(f"note: {name} already exists: skipped, password unchanged", err=True)
        for name, left in result.inherited.items():
            note_mail_left(name, left)
        _print_sheet(result.created)
        if unwritten is not None:
            raise click.ClickException(f"cannot write {csv_path}: {unwritten.strerror} "
                                       "(the accounts exist: their passwords are in the sheet above)")
        if csv_path is not None:
            click.echo(f"wrote {made} to {csv_path} (mode 0600)", err=True)
        if stopped is not None:
            raise click.ClickException(f"stopped after {made}: {stopped}; the sheet above holds their passwords")
        click.echo(f"created {made}, skipped {len(result.skipped)}", err=True)

    @classroom.command("reset")
    @click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
                  help="Empty the mailboxes of PREFIX followed by digits.")
    @with_settings
    def reset(settings: Settings, prefix: str) -> None:
        """Empty every student mailbox (accounts and passwords stay)."""
        require_data_root(settings.root)  # else a mistyped --root "removed 0 messages"
        as_data_root_owner(settings.root)
        try:
            result = reset_class(settings, prefix)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        for name in result.busy:
            click.echo(f"note: {name} is logged in over POP3: mailbox left as it is", err=True)
        for name, why in result.unopened.items():
            click.echo(f"note: {name}'s mailbox could not be opened: left as it is ({why})", err=True)
        total = sum(result.removed.values())
        click.echo(f"removed {counted(total, 'message')} "
                   f"from {counted(len(result.removed), 'mailbox', 'mailboxes')}")
        trouble = []
        if result.failures:
            trouble.append(f"{counted(result.failures, 'message')} could not be removed")
        if result.unopened:
            trouble.append(f"{counted(len(result.unopened), 'mailbox', 'mailboxes')} could not be opened")
        if trouble:
            raise click.ClickException("; ".join(trouble))

    return classroom
