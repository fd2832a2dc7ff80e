"""The ``pymailsrv`` command line (``python -m pymailsrv`` is the same group).

Exit status: 0 ok; 1 a user error, told in one line on stderr, never a
traceback; 2 a usage error (click's own). ``deliver`` is a local delivery
agent that other MTAs call, so it answers in sysexits codes instead
(``EX_NOUSER`` 67, ``EX_TEMPFAIL`` 75, ``EX_DATAERR`` 65), as procmail and
Dovecot's ``dovecot-lda`` do.

Every subcommand takes ``--root`` (or ``$PYMAILSRV_ROOT``) and ``--config``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import click

from pymailsrv.cli_common import as_data_root_owner, echo_table, note_mail_left, read_password, require_data_root
from pymailsrv.config import ConfigError, Settings, load_settings
from pymailsrv.durable import UnusableFile
from pymailsrv.maildir import MaildirStore
from pymailsrv.storage import MaildropLocked, StorageError
from pymailsrv.users import UserError, UserStore, add_account, check_user_name

# sysexits.h, as mail delivery agents use them.
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75


def _settings(root: str | None, config: str | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, {"root": root, **overrides})
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def settings_options(command: Callable) -> Callable:
    """The ``--root`` and ``--config`` options every subcommand takes."""
    command = click.option("--config", type=click.Path(dir_okay=False),
                           help="TOML settings file (default: $PYMAILSRV_CONFIG or ./pymailsrv.toml).")(command)
    return click.option("--root", type=click.Path(file_okay=False), envvar="PYMAILSRV_ROOT",
                        help="Data root holding the Maildirs (default ./mailboxes).")(command)


def with_settings(command: Callable) -> Callable:
    """Give a subcommand ``--root`` and ``--config``; it receives ``settings``."""

    @settings_options
    @functools.wraps(command)
    def wrapper(root: str | None, config: str | None, **kwargs: Any) -> Any:
        settings = _settings(root, config)
        try:
            return command(settings=settings, **kwargs)
        except BrokenPipeError:
            # `... | head`: the reader took what it wanted and left; no error
            # to print. Python's "Note on SIGPIPE": stdout to devnull, so the
            # flush at exit cannot fail again, and exit 1.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as error:  # a data root that is not a directory, a file we may not read...
            raise click.ClickException(f"cannot use {error.filename}: {error.strerror}" if error.filename
                                       else str(error)) from None
        except UnusableFile as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def _user_name(name: str) -> str:
    try:
        return check_user_name(name)
    except UserError as error:
        raise click.ClickException(str(error)) from None


class LazyGroup(click.Group):
    """A group whose subcommands from other modules are imported when used.

    ``lazy`` maps a command name to ``"module:attribute"``: a click command,
    or a function that makes one from ``with_settings``. ``start`` then does
    not pay for importing ``probe``, ``grade`` and the rest: about 0.1 s of
    a 0.35 s start-up (click's documented pattern for lazy subcommands).
    """

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, _, attribute = self.lazy[name].partition(":")
            found = getattr(importlib.import_module(module), attribute)
            self.add_command(found if isinstance(found, click.Command) else found(with_settings), name)
        return super().get_command(ctx, name)


# Commands that live in their own modules. Those that need settings take
# with_settings as an argument rather than importing this module, so they
# import nothing from here.
_MAIN_ELSEWHERE = {
    "alias": "pymailsrv.cli_relay:alias_group",
    "classroom": "pymailsrv.classroom:classroom_group",
    "explain": "pymailsrv.explain:explain",
    "grade": "pymailsrv.grade:grade_command",
    "probe": "pymailsrv.probe:probe",
    "queue": "pymailsrv.cli_relay:queue_group",
    "transcripts": "pymailsrv.transcripts:transcripts_group",
}


@click.group(cls=LazyGroup, lazy=_MAIN_ELSEWHERE, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pymailsrv")
def main() -> None:
    """pymailsrv: an SMTP and POP3 mail server on Maildir."""


# --- start ------------------------------------------------------------------------


@main.command()
@settings_options
@click.option("--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0 or :: for every interface).")
@click.option("--smtp-port", type=int, help="SMTP port (default 2525; 0 picks a free port).")
@click.option("--pop3-port", type=int, help="POP3 port (default 1100; 0 picks a free port).")
@click.option("--domain", "domains", multiple=True, help="A mail domain this server is final for (repeatable).")
@click.option("--trace", is_flag=True, default=None, help="Print every protocol line to stderr.")
@click.option("--trace-bodies", is_flag=True, default=None, help="Trace message text line by line, not summarised.")
@click.option("--trace-format", type=click.Choice(["text", "json"]), help="Trace as text (default) or JSON lines.")
@click.option("--annotate", is_flag=True, default=None, help="Say in the trace what each line means, with its RFC.")
@click.option("--transcripts", is_flag=True, default=None, help="Save every session under ROOT/.pymailsrv/transcripts/.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (default: the 'cert generate' pair).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key for --tls-cert.")
@click.option("--pop3s-port", type=int, help="Implicit-TLS POP3 port, e.g. 995 (RFC 8314; default off).")
@click.option("--smtps-port", type=int, help="Implicit-TLS submission port, e.g. 465 (RFC 8314; default off).")
@click.option("--submission-port", type=int, help="Submission port, e.g. 587 (RFC 6409: AUTH before MAIL; default off).")
@click.option("--smarthost", metavar="HOST[:PORT]", help="Send all outbound mail through this host, port 25 if none (default: MX lookup).")
@click.option("--run-as", metavar="USER", help="Started as root: become USER once the ports are bound.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Misbehave on purpose, for testing clients, e.g. 'smtp:RCPT#2=452 4.2.2 mailbox full'.")
@click.option("--processes", type=int, metavar="N",
              help="Serve from N worker processes (default 1; about one per CPU core for a busy server).")
def start(root: str | None, config: str | None, host: str | None, smarthost: str | None, smtp_port: int | None,
          pop3_port: int | None, domains: tuple[str, ...], trace: bool | None, trace_bodies: bool | None,
          trace_format: str | None, annotate: bool | None, transcripts: bool | None, tls_cert: str | None,
          tls_key: str | None, pop3s_port: int | None, smtps_port: int | None,
          submission_port: int | None, run_as: str | None, faults: tuple[str, ...],
          processes: int | None) -> None:
    """Run the server in the foreground until SIGINT, SIGTERM or SIGHUP."""
    from pymailsrv.server import MailServer
    from pymailsrv.stopping import StopRequest
    from pymailsrv.workers import WATCH_INTERVAL_SECONDS, Workers, WorkersFailing

    settings = _settings(root, config, host=host, domains=domains or None, trace=trace,
                         trace_bodies=trace_bodies, trace_format=trace_format, annotate=annotate,
                         transcripts=transcripts, tls={"cert": tls_cert, "key": tls_key}, faults=faults or None,
                         run_as=run_as, processes=processes, pop3={"port": pop3_port, "pop3s_port": pop3s_port},
                         smtp={"port": smtp_port, "smtps_port": smtps_port, "submission_port": submission_port},
                         relay={"smarthost": smarthost})
    # The pid says which worker process wrote a line (start --processes), as
    # in Postfix's "smtpd[1234]:".
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    stop = StopRequest()
    try:
        server = MailServer(settings)
        workers = Workers(server, settings.processes) if settings.processes > 1 else None
        server.bind()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a listener's is a ConfigError; this, the data root's, say
        raise click.ClickException(f"cannot start: {error.strerror or error}"
                                   + (f" ({error.filename})" if error.filename else "")) from None
    if workers is None:
        server.serve()
    else:
        try:
            workers.start()  # forks: from here on this process only watches them
        except OSError as error:
            workers.stop()
            raise click.ClickException(f"cannot start the worker processes: {error.strerror or error}") from None
    click.echo(server.listening_line(), err=True)
    try:
        if workers is None:
            while not stop.wait(WATCH_INTERVAL_SECONDS):
                pass
        else:
            workers.watch(stop)
    except WorkersFailing as error:
        raise click.ClickException(str(error)) from None
    finally:
        (workers or server).stop()
    logging.getLogger("pymailsrv.server").info("stopped")


# --- cert -----------------------------------------------------------------------------


@main.group()
def cert() -> None:
    """TLS certificates."""


@cert.command("generate")
@click.option("--hostname", help="Name the certificate is for (default: the server's hostname).")
@click.option("--force", is_flag=True, help="Replace a pair that already exists.")
@with_settings
def cert_generate(settings: Settings, hostname: str | None, force: bool) -> None:
    """Write a self-signed certificate and key that 'start' then uses (for a lab)."""
    from pymailsrv.server import default_certificate_paths
    from pymailsrv.tls import self_signed_pair, write_pair

    cert_path, key_path = default_certificate_paths(settings)
    for path in (cert_path, key_path):  # a key alone may be one a CA certified
        if path.exists() and not force:
            raise click.ClickException(f"{path} already exists (use --force to replace it)")
    if hostname is None:  # given, even empty, it is what the user meant: "" is refused below
        hostname = settings.hostname
    try:
        # Made before the switch of user: cryptography is loaded on use, and the
        # data root's owner may not be able to read the Python it comes with.
        pair = self_signed_pair(hostname)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    as_data_root_owner(settings.root)
    write_pair(cert_path, key_path, pair)
    click.echo(f"wrote {cert_path} and {key_path} (self-signed for {hostname})")


# --- user ---------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Manage local user accounts."""


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--apop", is_flag=True, help="Also keep an APOP secret (weaker: stored in plain text, mode 0600).")
@with_settings
def user_add(settings: Settings, name: str, password_stdin: bool, apop: bool) -> None:
    """Create a user and their Maildir."""
    as_data_root_owner(settings.root)
    name = _user_name(name)
    users = UserStore(settings.state_dir)
    if users.exists(name):
        raise click.ClickException(f"user {name!r} already exists")
    password = read_password(password_stdin)
    try:
        left = add_account(users, MaildirStore(settings.root), name, password, apop=apop)
    except UserError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"added user {name}")
    note_mail_left(name, left)


@user.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the user's Maildir and all their mail.")
@with_settings
def user_remove(settings: Settings, name: str, purge: bool) -> None:
    """Remove a user (their mail stays on disk unless --purge)."""
    as_data_root_owner(settings.root)
    name = _user_name(name)
    users, store = UserStore(settings.state_dir), MaildirStore(settings.root)
    maildrop = None
    if purge and users.exists(name):
        # The maildrop's lock (RFC 1939 §4), as 'classroom reset' takes it: a
        # POP3 session must not read on in a Maildir deleted under it.
        try:
            maildrop = store.open_maildrop(name)
        except MaildropLocked:
            raise click.ClickException(f"{name} is logged in over POP3: nothing removed; "
                                       "try again once that session ends") from None
        except (OSError, StorageError) as error:
            raise click.ClickException(f"cannot take {name}'s mailbox: {error}") from None
    try:
        try:
            users.remove(name)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        if purge:
            try:
                store.remove_maildir(name)
            except StorageError as error:
                raise click.ClickException(f"removed user {name}, but not their mail: {error}") from None
    finally:
        if maildrop is not None:
            maildrop.release()
    click.echo(f"removed user {name}" + (" and their mail" if purge else ""))


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@with_settings
def user_passwd(settings: Settings, name: str, password_stdin: bool) -> None:
    """Change a user's password (and APOP secret, if they have one)."""
    as_data_root_owner(settings.root)
    name = _user_name(name)
    users = UserStore(settings.state_dir)
    if not users.exists(name):
        raise click.ClickException(f"no such user {name!r}")
    try:
        users.set_password(name, read_password(password_stdin))
    except UserError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"changed the password of {name}")


@user.command("list")
@with_settings
def user_list(settings: Settings) -> None:
    """List users with their message count and size on disk."""
    require_data_root(settings.root)
    store = MaildirStore(settings.root)
    rows = []
    for name in UserStore(settings.state_dir).names():
        try:
            messages = store.messages(name)
        except OSError as error:  # one broken Maildir must not hide everyone else's
            rows.append((name, f"(cannot read: {error.strerror or error})", ""))
            continue
        rows.append((name, len(messages), sum(_file_size(path) for _, path in messages)))
    echo_table(rows, ["user", "messages", "bytes"])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- mailbox -------------------------------------------------------------------------


@main.group(cls=LazyGroup, lazy={"show": "pymailsrv.mailview:show_command"})
def mailbox() -> None:
    """Look into users' mailboxes."""


@mailbox.command("list")
@click.argument("name")
@with_settings
def mailbox_list(settings: Settings, name: str) -> None:
    """List a user's messages as POP3 numbers them at login."""
    require_data_root(settings.root)  # else a mistyped --root is "no such user"
    name = _user_name(name)
    if not UserStore(settings.state_dir).exists(name):
        raise click.ClickException(f"no such user {name!r}")
    # Here, not at the top, as for `mailbox show`: start goes without it.
    from pymailsrv.mailview import summary

    # Fields are decoded as `mailbox show` decodes them: one the email package
    # cannot take apart, or a huge one, shows raw, and no message stops the listing.
    rows = []
    for msg_number, (info, path) in enumerate(MaildirStore(settings.root).messages(name), start=1):
        try:
            date, sender, subject = summary(path)
        except FileNotFoundError:
            continue
        except OSError as error:  # listed from its W= field, as POP3 lists it
            date, sender, subject = "", "", f"(cannot be read: {error.strerror or error})"
        rows.append((msg_number, info.uid, date, sender, subject, info.size))
    echo_table(rows, ["#", "uid", "date", "from", "subject", "size"])


# --- deliver ------------------------------------------------------------------------------


@main.command()
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default="-")
@settings_options
def deliver(root: str | None, config: str | None, name: str, file: str) -> None:
    """Deliver one RFC 5322 message from FILE (default stdin) into NAME's Maildir."""
    # What runs this (an MTA's pipe, a script) bounces the message on any
    # status but EX_TEMPFAIL. A broken config file or a data root not yet
    # mounted is ours to fix, and the message should wait for that.
    try:
        settings = load_settings(config, {"root": root})
    except ConfigError as error:
        _exit(EX_TEMPFAIL, f"cannot deliver now, try again later: {error}")
    if not settings.root.is_dir():
        _exit(EX_TEMPFAIL, f"cannot deliver now, try again later: no data root at {settings.root}")
    if file != "-":
        message = open(file, "rb")  # before as_data_root_owner: it may be root's alone
    elif sys.stdin is None:  # started with its standard input closed: the MTA's to mend
        _exit(EX_TEMPFAIL, "cannot deliver now, try again later: no message (standard input is closed)")
    else:
        message = sys.stdin.buffer
    as_data_root_owner(settings.root)
    try:
        user = check_user_name(name)
    except UserError as error:
        _exit(EX_NOUSER, str(error))
    users = UserStore(settings.state_dir)
    try:
        if not users.path.is_file():  # an empty directory: the mount point of a data root not mounted yet
            _exit(EX_TEMPFAIL, f"cannot deliver now, try again later: no users at {settings.root} "
                               f"(is the data root mounted?)")
        if not users.exists(user):
            _exit(EX_NOUSER, f"no such user {user!r}")
        with message:
            queue_id = MaildirStore(settings.root).deliver(user, _NotBlank(message))
    except BlankMessage:
        _exit(EX_DATAERR, "the message is empty")
    except (StorageError, OSError, UnusableFile) as error:
        _exit(EX_TEMPFAIL, f"cannot deliver now, try again later: {error}")
    click.echo(f"delivered to {user} as {queue_id}")


class BlankMessage(Exception):
    """What deliver was given holds nothing but white space."""


class _NotBlank:
    """A message read for delivery a block at a time, that raises
    BlankMessage at its end (the delivery then taken back) if it held
    nothing but white space: a message to refuse, though it streams."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._blank = True

    def read(self, size: int) -> bytes:
        block = self._file.read(size)
        if not block and self._blank:
            raise BlankMessage
        self._blank = self._blank and not block.strip()
        return block


def _exit(status: int, message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)
